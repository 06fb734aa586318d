"""Phase 3b: X-to-X cross-modality instruction tuning, visual alignment (paper A.3b; settings from C).

    python -m train phase3b --config train/configs/phase3b.yaml        # init: runs/phase3a/final
    python -m train phase3b --config train/configs/phase3b.yaml --resume

X-to-X conversations with a visual input and an image or video output train the visual
embedding highway: the visual controllers and the image/video U-Nets, with everything else
(P_in, P_out, the LLM, the encoders) frozen. The loss is the U-Nets' denoising loss
(`xvila.decoders.base.denoising_loss`) for each image/video output, with
- x0: the VAE latents of the output's target medium (`decoder.encode_latents`);
- e_vis: E_vis of the latest visual input before it (the highway, as at inference);
- e_text: with `condition: model` (the default), P_out of the LLM's own generation-token
  states for that output, teacher-forced on the conversation and computed without
  gradients (P_out and the LLM are frozen). That is what the U-Net is conditioned on at
  inference, so the decoder learns to work from it; the paper keeps the LLM and the
  projections in the loop, fixed. `condition: caption` uses the decoder text encoder's
  embedding of the output's caption instead (the TextCache), which skips the LLM forward.
Paper: 20k iterations, lr 1e-6, global batch 64.
"""

from __future__ import annotations

import torch

from train import batches
from train.data import CONVERSATION
from train.loop import (Objective, Run, TrainConfig, enable_gradient_checkpointing, load_init, make_optimizer,
                        train_in_float32, trainable)
from xvila.decoders.base import denoising_loss

PHASE = "3b"


def visual_alignment_loss(condition: str):
    """The phase's loss: `(model, batch) -> {"diffusion/image", "diffusion/video", "loss"}`."""

    def loss(model, batch: dict) -> dict[str, torch.Tensor]:
        dev = model.device
        features = batches.media_features(model, batch, highway=True)
        visual = batch["visual"]
        if condition == "model":
            with torch.no_grad():  # frozen: P_in, the LLM, P_out
                embeds = model.splice(batch["input_ids"].to(dev), {
                    m: model.project_media(m, f["pooled"], f.get("tokens")) for m, f in features.items()})
                hidden = model.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(dev)).last_hidden_state
                e_text = {m: model.p_out[m](model.gen_states(hidden, batch["input_ids"].to(dev), m)[v["run"].to(dev)])
                          for m, v in visual.items()}
        else:
            targets = batches.text_targets(model, batch)
            e_text = {m: targets[m][v["run"].to(dev)] for m, v in visual.items()}
        losses = {}
        for m, v in visual.items():
            decoder = model.decoders[m]
            with torch.no_grad():
                x0 = torch.stack([decoder.encode_latents(x.numpy()) for x in v["x0"]]).to(decoder.dtype)
            e_vis = torch.stack([batches.mean_clips(features[m_in]["highway"][j]) for m_in, j in v["source"]])
            losses[f"diffusion/{m}"] = denoising_loss(decoder, x0, e_text[m], e_vis.to(x0.device))
        losses["loss"] = sum(losses.values())
        return losses

    return loss


def main(cfg: TrainConfig, resume: bool = False) -> dict:
    with Run(cfg, resume) as run:
        acc = run.accelerator
        # ---------------------------------------------------------------- model
        model = load_init(cfg, run.device)
        counts = model.set_trainable(PHASE, verbose=acc.is_main_process)
        train_in_float32(model)
        model.eval()  # the LLM, encoders, VAEs: frozen, in eval mode
        for m in batches.VISUAL:
            model.decoders[m].unet.train()
            model.decoders[m].controller.train()
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model, PHASE)

        # ---------------------------------------------------------------- data
        batches.check_kind(cfg.manifests, (CONVERSATION,), PHASE)
        data = batches.Batches.from_config(cfg, batches.visual_samples, model, run.rank, run.world, visual=True,
                                           targets=cfg.condition == "caption", video_frames=cfg.video_frames,
                                           keep=batches.has_visual_target)
        acc.print(f"data: {data.manifest_counts()} (conversations with a visual input and a visual output); "
                  f"{run.accum} micro-batches of {cfg.micro_batch} x {run.world} processes per step = {cfg.global_batch}")

        # ---------------------------------------------------------------- optimiser
        params = list(trainable(model).values())
        optimizer, scheduler = make_optimizer(params, cfg)
        objective, optimizer = run.prepare(Objective(model, visual_alignment_loss(cfg.condition)), optimizer)
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
        return run.finish(stopped, record={"phase": PHASE, "trains": counts, "data": data.manifest_counts(),
                                           "condition": cfg.condition})
