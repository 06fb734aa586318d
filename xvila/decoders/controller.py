"""The visual controller of the visual embedding highway (VEH, paper §2.1, Fig. 3).

E_vis (ImageBind's vision-trunk block outputs, summed: H×W×C, 16×16×1280 for huge) is
normalised, projected to the U-Net's first width and resized to the latent grid; then
4 stages (one per U-Net down block) of 2 residual conv blocks each, a stride-2 conv
between stages, so that stage i has the channels and resolution of down block i. Each
stage ends in one zero-initialised 1×1 conv (`zero_module`, as ControlNet's), so a fresh
controller changes nothing.

The stage outputs go into the U-Net as ControlNet-style residuals, which diffusers adds
to the skip connections only when *both* `down_block_additional_residuals` and
`mid_block_additional_residual` are passed (with the down ones alone it treats them as
T2I-Adapter residuals). The U-Net exposes one skip per resnet of each down block, one for
`conv_in` and one per downsampler; each slot takes the output of the stage of its block
(`conv_in`: stage 0; a downsampler: its block's stage, pooled to the next resolution);
the mid block takes the last stage.

Video (3D U-Net): the skips are [batch·frames, C, h, w]; the controller's residual is the
same for every frame. When the visual input was itself a video, its per-clip E_vis are
averaged first: the controller has no temporal layers, ImageBind's 5 two-second clips do
not line up with the 16 generated frames, and the highway's job is appearance (layout,
colours, style) while the video U-Net's temporal layers own the motion.

The residuals depend on E_vis only, not on the noisy latent or the step, so they are
computed once per request and reused on every step where eq. 4 lets them in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xvila.encoders.imagebind import mean_clips


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


def unet_skip_slots(unet_config) -> tuple[list[tuple[int, bool]], int]:
    """For each skip the U-Net's down path produces, (stage, pooled): which stage feeds it
    and whether it is a downsampler's output (half resolution); plus the mid block's stage.
    Read from a diffusers U-Net config (2D or 3D)."""
    n = len(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    layers = [layers] * n if isinstance(layers, int) else list(layers)
    slots = [(0, False)]  # conv_in
    for i in range(n):
        slots += [(i, False)] * layers[i]
        if i < n - 1:  # every down block but the last ends in a downsampler
            slots.append((i, True))
    return slots, n - 1


class VisualController(nn.Module):
    def __init__(self, in_channels: int, block_out_channels: list[int], slots: list[tuple[int, bool]], mid_stage: int,
                 blocks_per_stage: int = 2):
        super().__init__()
        self.slots, self.mid_stage = slots, mid_stage
        self.norm_in = nn.LayerNorm(in_channels)
        self.proj_in = nn.Conv2d(in_channels, block_out_channels[0], 1)
        self.downs = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.zero_convs = nn.ModuleList()
        prev = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            self.downs.append(nn.Identity() if i == 0 else nn.Conv2d(prev, ch, 3, stride=2, padding=1))
            self.stages.append(nn.Sequential(*[ResBlock(ch) for _ in range(blocks_per_stage)]))
            self.zero_convs.append(zero_module(nn.Conv2d(ch, ch, 1)))
            prev = ch

    @classmethod
    def from_unet(cls, unet, in_channels: int, blocks_per_stage: int = 2) -> "VisualController":
        """Reads the U-Net's down-block layout (like diffusers' `ControlNetModel.from_unet`)."""
        slots, mid = unet_skip_slots(unet.config)
        return cls(in_channels, list(unet.config["block_out_channels"]), slots, mid, blocks_per_stage)

    def forward(self, e_vis: torch.Tensor, latent_shape: tuple[int, ...]):
        """E_vis [B, H, W, C] -> (down residuals, mid residual) for latents of `latent_shape`
        ((C, h, w), or (C, frames, h, w) for a 3D U-Net)."""
        frames = latent_shape[1] if len(latent_shape) == 4 else None
        # E_vis (a sum of block outputs) comes in float32 and may not fit float16: normalise
        # it in float32, then go on in the controller's own dtype.
        n = self.norm_in
        x = F.layer_norm(e_vis.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)
        x = x.to(n.weight.dtype).permute(0, 3, 1, 2)
        x = F.interpolate(self.proj_in(x), size=tuple(latent_shape[-2:]), mode="bilinear", align_corners=False)
        outs = []
        for down, stage, zero in zip(self.downs, self.stages, self.zero_convs):
            x = stage(down(x))
            outs.append(zero(x))
        down_res = []
        for stage, pooled in self.slots:
            r = outs[stage]
            if pooled:  # a downsampler's skip: its block's channels at the next block's size
                r = F.adaptive_avg_pool2d(r, outs[stage + 1].shape[-2:])
            down_res.append(r)
        mid = outs[self.mid_stage]
        if frames is not None:  # [B, C, h, w] -> [B*frames, C, h, w], the same for every frame
            down_res = [r.repeat_interleave(frames, dim=0) for r in down_res]
            mid = mid.repeat_interleave(frames, dim=0)
        return down_res, mid


def prepare_e_vis(highway: torch.Tensor) -> torch.Tensor:
    """A chat input's E_vis ([H, W, C], or [S, H, W, C] for a video's clips) -> [1, H, W, C]."""
    return mean_clips(highway[None], 4)
