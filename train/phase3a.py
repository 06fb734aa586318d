"""Phase 3a: X-to-X cross-modality instruction tuning, textual alignment (paper A.3a; settings from C).

    python -m train phase3a --config train/configs/phase3a.yaml        # init: runs/phase2/final
    python -m train phase3a --config train/configs/phase3a.yaml --resume

The X-to-X conversations (VID2IMG, IMG2VID, VID2VID, AUD2VID, VID2AUD, IMG+AUD2VID)
blended with SFT data (LLaVA, VideoChat, NExT-GPT, Alpaca) by the manifests' mixing
weights (`train.batches.Order`). P_in, P_out, the new tokens and LoRA train; the decoders
stay frozen; the losses are phase 1's (next-token + MSE of P_out(S_gen) to the decoder
text encoder's embedding of each output's caption). Paper: 30k iterations, lr 1e-4,
global batch 192.
"""

from __future__ import annotations

from train import batches
from train.data import CONVERSATION
from train.loop import (Objective, Run, TrainConfig, enable_gradient_checkpointing, load_init, make_optimizer,
                        train_in_float32, trainable)

PHASE = "3a"


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
        batches.check_kind(cfg.manifests, (CONVERSATION,), PHASE)
        data = batches.Batches.from_config(cfg, batches.conversation_samples, model, run.rank, run.world)
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
