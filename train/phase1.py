"""Phase 1: encoder-LLM-decoder alignment (paper A.1; settings from C).

    python -m train phase1 --config train/configs/phase1.yaml
    python -m train phase1 --config train/configs/phase1.yaml --resume          # after a stop
    accelerate launch --config_file train/configs/accelerate/1x24gb.yaml -m train phase1 \\
        --config train/configs/phase1.yaml --config train/configs/24gb.yaml

X-text pairs (image, video, audio) align the encoders' and the decoders' ends with the
LLM's text space. Only P_in, P_out and the new tokens' embedding rows train:
- X -> text, captioning: the next-token loss on the caption;
- text -> X, generation: "Generate an image of {caption}" -> [IMG0]..[IMG3], with the MSE
  between P_out(S_gen) and the decoder text encoder's embedding of the caption.
Paper: 20k iterations, Adam, lr 4e-4 with warm-up, global batch 200 (pairs; each pair gives
one captioning and one generation row).
"""

from __future__ import annotations

from train import batches
from train.data import PAIR
from train.loop import (Objective, Run, TrainConfig, enable_gradient_checkpointing, load_init, make_optimizer,
                        train_in_float32, trainable)

PHASE = "1"


def main(cfg: TrainConfig, resume: bool = False) -> dict:
    with Run(cfg, resume) as run:
        acc = run.accelerator
        # ---------------------------------------------------------------- model
        model = load_init(cfg, run.device)
        counts = model.set_trainable(PHASE, verbose=acc.is_main_process)
        train_in_float32(model)
        model.train()
        model.imagebind.eval()  # frozen parts stay in eval mode (no drop-path, no dropout)
        model.decoders.eval()
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model, PHASE)

        # ---------------------------------------------------------------- data
        batches.check_kind(cfg.manifests, (PAIR,), PHASE)
        data = batches.Batches.from_config(cfg, batches.pair_samples, model, run.rank, run.world)
        acc.print(f"data: {data.manifest_counts()}; {run.accum} micro-batches of {cfg.micro_batch} x "
                  f"{run.world} processes per step = {cfg.global_batch}")

        # ---------------------------------------------------------------- optimiser
        params = list(trainable(model).values())
        optimizer, scheduler = make_optimizer(params, cfg)
        objective, optimizer = run.prepare(Objective(model, batches.lm_and_align_loss), optimizer)
        run.attach(objective, optimizer, scheduler)

        # ---------------------------------------------------------------- resume
        start = run.resume()
        loader = batches.loader(data, start.position, cfg.num_workers, cfg.prefetch_factor, cfg.seed)

        # ---------------------------------------------------------------- training loop
        stopped = False
        for step in range(start.step, cfg.steps):
            for _ in range(run.accum):
                batch = run.next_batch(loader)
                with acc.accumulate(objective):
                    losses = objective(batch)
                    run.check_finite(losses, step, batch)
                    acc.backward(losses["loss"])
            acc.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if run.end_step(step + 1, scheduler.get_last_lr()[0]):
                stopped = True
                break

        # ---------------------------------------------------------------- the end
        return run.finish(stopped, record={"phase": PHASE, "trains": counts, "data": data.manifest_counts()})
