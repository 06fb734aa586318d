"""The image decoder: Stable Diffusion 1.5's U-Net, VAE and CLIP-L text encoder.

    ImageDecoder.from_pretrained()             # stable-diffusion-v1-5/stable-diffusion-v1-5
    ImageDecoder.tiny_random(cond_dim=32)      # tiny random parts, for tests and tiny-random
    decoder.save_pretrained("out/image")       # the same subfolder layout, readable back

The parts are diffusers' and transformers' own classes, loaded once; the denoising loop is
`xvila.decoders.base.denoise`. E_text is what SD1.5's pipeline feeds its U-Net as
`encoder_hidden_states`: CLIP-L's last hidden state for 77 padded tokens, [77, 768]. The
negative (empty-prompt) embedding for classifier-free guidance is computed once, on first
use, and kept.

The scheduler is DPM-Solver++ (2nd-order multistep) built from the repo's own scheduler
config (SD1.5 ships a PNDM config: the betas and timestep offset are what matter), which
gives good images in 20-25 steps instead of PNDM's 50.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from xvila.constants import IMAGE
from xvila.decoders import tiny
from xvila.decoders.base import (
    DecodeSettings, Decoder, latent_diffusion_loaders, resize_center_crop, transformers_loader,
)
from xvila.encoders.clip_tokenizer import toy_clip_tokenizer
from xvila.media import read_image, write_png

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ImageDecoder(Decoder):
    modality = "image"
    file_suffix = ".png"
    part_names = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.scheduler, self.tokenizer = scheduler, tokenizer
        # Frozen and in eval mode: inference only; phase 3b unfreezes the U-Net itself.
        self.eval().requires_grad_(False)

    @property
    def default_size(self) -> int:
        """The U-Net's native size in pixels: 512 for SD1.5, as its pipeline defaults to."""
        return self.unet.config.sample_size * self.vae_scale_factor

    # -- hooks ---------------------------------------------------------------------------
    def latent_shape(self, s: DecodeSettings) -> tuple[int, int, int]:
        h, w = self.latent_hw(s.height or self.default_size, s.width or self.default_size, "image")
        return (self.unet.config.in_channels, h, w)

    def unet_condition(self, e_text: torch.Tensor, s: DecodeSettings) -> dict:
        return {"encoder_hidden_states": e_text}

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), 77, 768]: CLIP's last hidden state, as SD1.5's pipeline computes it."""
        length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)  # 77
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                                return_tensors="pt")
        device = self.text_encoder.device
        # SD1.5's CLIP was trained without an attention mask over the padding; the pipeline
        # passes one only when the text encoder's config asks for it.
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, s: DecodeSettings) -> np.ndarray:
        """[1, 4, h, w] latents -> uint8 [H, W, 3]."""
        z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(z, return_dict=False)[0]
        image = (image[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
        return (image * 255).round().astype(np.uint8)

    def write(self, media: np.ndarray, path: Path, s: DecodeSettings) -> Path:
        return write_png(path, media)

    @torch.no_grad()
    def encode_latents(self, media_path_or_array, size: int | None = None) -> torch.Tensor:
        """A target image -> its latents [4, h, w], the x0 of phase 3b's denoising loss.

        `media_path_or_array`: an image file or uint8 [H, W, 3]. It is resized (short side)
        and centre-cropped to `size` (default: the U-Net's native size) and scaled to
        [-1, 1], as SD's VAE expects; the latents are the posterior's mean times the VAE's
        `scaling_factor`. The mean, not a sample: a target gives the same x0 every epoch
        and after a resume."""
        if isinstance(media_path_or_array, np.ndarray):
            image = Image.fromarray(media_path_or_array)
        else:
            image = read_image(media_path_or_array)
        size = size or self.default_size
        pixels = resize_center_crop(image, size, size)
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
        z = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return z[0] * self.vae.config.scaling_factor

    # -- building, loading, saving -------------------------------------------------------
    def parts(self) -> dict:
        return {"unet": self.unet, "vae": self.vae, "scheduler": self.scheduler, "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer}

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = SD15_REPO, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "ImageDecoder":
        """A diffusers-layout Hub repo or folder (subfolders unet, vae, scheduler,
        text_encoder, tokenizer), e.g. SD1.5 or what `save_pretrained` wrote. `device`
        defaults to CUDA when there is one; `dtype` to float16 there, float32 on a CPU."""
        return cls.load(source, lambda dtype: {
            **latent_diffusion_loaders(UNet2DConditionModel, dtype),
            "text_encoder": transformers_loader(CLIPTextModel, dtype),
            "tokenizer": CLIPTokenizer.from_pretrained,
        }, f"image decoder ({source})", device, dtype)

    @classmethod
    def tiny_random(cls, seed: int = 0, cond_dim: int = 32) -> "ImageDecoder":
        """SD1.5's layout at toy sizes (`xvila.decoders.tiny`): 32x32 images, 4x4x4 latents,
        a 2-block U-Net, a 1-layer CLIP text encoder of width `cond_dim`. Seeded; a few
        milliseconds per step on a CPU."""
        tokenizer = toy_clip_tokenizer(tiny.TOY_WORDS[IMAGE])
        tokenizer.model_max_length = 77
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**tiny.IMAGE_UNET, cross_attention_dim=cond_dim)
            vae = AutoencoderKL(**tiny.IMAGE_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**tiny.CLIP_TEXT, **tiny.text_encoder_ids(tokenizer, cond_dim),
                                                        hidden_size=cond_dim, intermediate_size=2 * cond_dim))
        return cls(unet, vae, DPMSolverMultistepScheduler(**tiny.SCHEDULERS[IMAGE]), text_encoder, tokenizer)
