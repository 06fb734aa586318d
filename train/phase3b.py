"""Phase 3b: X-to-X cross-modality instruction tuning, visual alignment (paper A.3b; settings from C).

    python -m train phase3b --config train/configs/phase3b.yaml        # init: runs/phase3a/final
    python -m train phase3b --config train/configs/phase3b.yaml --resume

This module holds the phase's loss; its row in `train.phases` and the loop in
`train.loop.train` do the rest.
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
from xvila.decoders.base import denoising_loss
from xvila.encoders.imagebind import mean_clips


def visual_alignment_loss(condition: str):
    """The phase's loss: `(model, batch) -> {"diffusion/image", "diffusion/video", "loss"}`."""

    def loss(model, batch: dict) -> dict[str, torch.Tensor]:
        dev = model.device
        features = batches.media_features(model, batch, highway=True)
        visual = batch["visual"]
        if condition == "model":
            with torch.no_grad():  # frozen: P_in, the LLM, P_out
                hidden = model.hidden_states(batch["input_ids"].to(dev), features, batch["attention_mask"].to(dev))
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
            e_vis = mean_clips(torch.stack([features[m_in]["highway"][j] for m_in, j in v["source"]]), 4)
            losses[f"diffusion/{m}"] = denoising_loss(decoder, x0, e_text[m], e_vis.to(x0.device))
        losses["loss"] = sum(losses.values())
        return losses

    return loss
