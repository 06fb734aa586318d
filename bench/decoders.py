"""Seconds per denoising step and per output, and peak memory, for each decoder, TA vs TA+VEH.

    python bench/decoders.py                  # tiny random decoders (any machine; checks the path)
    python bench/decoders.py --full           # full-size U-Nets/VAEs/vocoder, random weights (GPU)
    python bench/decoders.py --full --steps 25 --only image

Random weights time the same as real ones. `--full` builds SD1.5's U-Net and VAE (512x512),
VideoCrafter2's fps-conditioned U-Net3D with zeroscope's VAE (16 frames, 320x512) and an
AudioLDM-S-sized U-Net, VAE and HiFi-GAN (5 s), each with a visual controller sized from its
U-Net for ImageBind-huge's E_vis (16x16x1280). Text encoders stay tiny: they run once per
request, not per step. The highway's residuals are computed once per request; the table
shows what they cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig  # noqa: E402

from xvila.decoders.audio import AudioDecoder  # noqa: E402
from xvila.decoders.base import DecodeSettings, denoise  # noqa: E402
from xvila.decoders.controller import VisualController  # noqa: E402
from xvila.decoders.image import ImageDecoder  # noqa: E402
from xvila.decoders.video import UNet3DVideoCrafterConditionModel, VideoDecoder  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
VC2_UNET = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
                up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, cross_attention_dim=1024,
                attention_head_dim=64, fps_cond=True)
AUDIOLDM_UNET = dict(sample_size=128, in_channels=8, out_channels=8, layers_per_block=2, block_out_channels=(128, 256, 384, 640),
                     down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                     up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=(128, 256, 384, 640),
                     attention_head_dim=8, class_embed_type="simple_projection", projection_class_embeddings_input_dim=512,
                     class_embeddings_concat=True)
AUDIOLDM_VAE = dict(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(128, 256, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=256)
AUDIOLDM_VOCODER = dict(model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
                        upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
                        resblock_dilation_sizes=[[1, 3, 5]] * 3, normalize_before=False)
COND = {"image": 768, "video": 1024, "audio": 512}


def build(modality: str, full: bool, device: torch.device, dtype: torch.dtype):
    cls = {"image": ImageDecoder, "video": VideoDecoder, "audio": AudioDecoder}[modality]
    decoder = cls.tiny_random(cond_dim=COND[modality] if full else 32)
    if full:
        with torch.device(device):  # build on the device: full-size random init on a CPU is slow
            if modality == "image":
                decoder.unet, decoder.vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD_VAE)
            elif modality == "video":
                decoder.unet, decoder.vae = UNet3DVideoCrafterConditionModel(**VC2_UNET), AutoencoderKL(**SD_VAE)
                decoder.size = (320, 512)
            else:
                decoder.unet, decoder.vae = UNet2DConditionModel(**AUDIOLDM_UNET), AutoencoderKL(**AUDIOLDM_VAE)
                decoder.vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**AUDIOLDM_VOCODER))
    vision_dim = 1280 if full else 24
    if modality != "audio":
        decoder.controller = VisualController.from_unet(decoder.unet, vision_dim)
        for p in decoder.controller.zero_convs.parameters():  # as trained: residuals really added
            torch.nn.init.normal_(p, std=1e-3)
    return decoder.to(device=device, dtype=dtype).eval(), vision_dim


def run(decoder, e_text, e_vis, s: DecodeSettings, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stamps = []
    sync()
    t0 = time.perf_counter()
    latents = denoise(decoder, e_text, s, e_vis, progress=lambda i, n: (sync(), stamps.append(time.perf_counter())))
    with torch.no_grad():
        decoder.decode_latents(latents, s)
    sync()
    end = time.perf_counter()
    per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)  # steady state, first step excluded
    return per_step, end - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full-size parts with random weights")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--only", choices=["image", "video", "audio"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32 (default: float16 on CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    s = DecodeSettings(steps=args.steps, guidance=7.5, alpha=1.0, seconds=5.0, frames=16)
    print(f"{'full-size' if args.full else 'tiny'} decoders, random weights, {name}, {dtype}, {args.steps} steps, CFG 7.5\n")
    print("| decoder | output | mode | s/step | s/output | peak GPU memory | VEH overhead |")
    print("|---|---|---|---|---|---|---|")
    for m in [args.only] if args.only else ["image", "video", "audio"]:
        decoder, vision_dim = build(m, args.full, device, dtype)
        shape = decoder.latent_shape(s)
        g = torch.Generator().manual_seed(0)
        e_text = torch.randn(77 if m != "audio" else 1, COND[m] if args.full else 32, generator=g)
        e_vis = torch.randn(16, 16, vision_dim, generator=g)
        modes = [("TA", None)] + ([("TA+VEH", e_vis)] if m != "audio" else [])
        results = {}
        for mode, vis in modes:
            run(decoder, e_text, vis, DecodeSettings(**{**s.__dict__, "steps": 2}), device)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            per_step, total = run(decoder, e_text, vis, s, device)
            mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
            results[mode] = total
            overhead = f"{100 * (total / results['TA'] - 1):+.1f}%" if mode != "TA" else ""
            print(f"| {m} | {tuple(shape)} latents | {mode} | {per_step:.4f} | {total:.3f} | {mem} | {overhead} |")
        del decoder
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
