"""The audio decoder: AudioLDM (cvssp/audioldm-s-full-v2).

    AudioDecoder.from_pretrained()             # cvssp/audioldm-s-full-v2
    AudioDecoder.tiny_random(cond_dim=32)      # tiny random parts, for tests and tiny-random
    decoder.save_pretrained("out/audio")       # the same subfolder layout, readable back

AudioLDM is a latent diffusion model over log-mel spectrograms. What follows is what
diffusers' (now removed) `AudioLDMPipeline` did, on our shared loop:

- E_text is CLAP's projected text embedding (`ClapTextModelWithProjection.text_embeds`,
  512-d), L2-normalised. It does not go through cross-attention: the U-Net's
  `class_embed_type="simple_projection"` maps it into the time embedding, concatenated
  (`class_embeddings_concat=True`), so it is passed as `class_labels` with
  `encoder_hidden_states=None` (the U-Net's attention blocks then attend to themselves).
- The latents are [C, frames / s, mel_bins / s] with s the VAE's downsampling; a frame is
  one vocoder hop (prod(upsample_rates) samples, 10 ms at 16 kHz).
- VAE decode gives the mel spectrogram [1, 1, frames, mel_bins]; the SpeechT5 HiFi-GAN
  vocoder turns it into a 16 kHz waveform, cut to the length asked for.

Lengths: the pipeline floored the frame count (`int(seconds / hop_seconds)`), so a length
that is not a whole number of hops came out a few samples short. Here the waveform is
always exactly `round(seconds * sampling_rate)` samples: the frame count is rounded up to
cover it (and then up to a multiple of the VAE factor), and the surplus is cut.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import (
    ClapTextConfig, ClapTextModelWithProjection, RobertaTokenizer, SpeechT5HifiGan, SpeechT5HifiGanConfig,
)

from xvila.constants import AUDIO
from xvila.decoders import tiny
from xvila.decoders.base import (
    DecodeSettings, DecodeSettingsError, Decoder, latent_diffusion_loaders, transformers_loader,
)
from xvila.media import write_wav

AUDIOLDM_REPO = "cvssp/audioldm-s-full-v2"


class AudioDecoder(Decoder):
    modality = "audio"
    file_suffix = ".wav"
    part_names = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "vocoder")

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler,
                 text_encoder: ClapTextModelWithProjection, tokenizer: RobertaTokenizer, vocoder: SpeechT5HifiGan):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.vocoder = unet, vae, text_encoder, vocoder
        self.scheduler, self.tokenizer = scheduler, tokenizer
        # Frozen and in eval mode: inference only (the paper trains no audio decoder part).
        self.eval().requires_grad_(False)
        if vocoder.config.model_in_dim % self.vae_scale_factor:
            raise ValueError(f"the vocoder's {vocoder.config.model_in_dim} mel bins are not divisible by the VAE's "
                             f"downsampling factor {self.vae_scale_factor}")

    @property
    def sampling_rate(self) -> int:
        return int(self.vocoder.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        """Waveform samples per spectrogram frame (160 for AudioLDM: 10 ms at 16 kHz)."""
        return int(np.prod(self.vocoder.config.upsample_rates))

    def num_samples(self, s: DecodeSettings) -> int:
        n = round(s.seconds * self.sampling_rate)
        if n < 1:
            raise DecodeSettingsError(f"audio length must be positive, got {s.seconds} s")
        return n

    # -- hooks ---------------------------------------------------------------------------
    def latent_shape(self, s: DecodeSettings) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        frames = math.ceil(self.num_samples(s) / self.hop_length)
        frames = math.ceil(frames / f) * f
        return (self.unet.config.in_channels, frames // f, self.vocoder.config.model_in_dim // f)

    def unet_condition(self, e_text: torch.Tensor, s: DecodeSettings) -> dict:
        # E_text arrives as [B, 1, 512] (cond_shapes) or [B, 512]; the class projection wants [B, 512].
        return {"encoder_hidden_states": None, "class_labels": e_text.reshape(e_text.shape[0], -1)}

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), 1, 512]: CLAP's projected text embedding, L2-normalised as the
        AudioLDM pipeline did (AudioLDM was trained on normalised CLAP embeddings)."""
        # RoBERTa positions start after the padding id: 514 positions hold 512 tokens. (The
        # cap only matters for a tokenizer saved without its model_max_length.)
        length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings - 2)
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                                return_tensors="pt")
        device = self.text_encoder.device
        out = self.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
        return F.normalize(out.text_embeds, dim=-1)[:, None]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, s: DecodeSettings) -> np.ndarray:
        """[1, C, h, w] latents -> float32 waveform [n] at `sampling_rate`, n = seconds * rate."""
        z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        mel = self.vae.decode(z, return_dict=False)[0]  # [1, 1, frames, mel_bins]
        waveform = self.vocoder(mel.squeeze(1).to(self.vocoder.dtype))  # [1, frames * hop]
        return waveform[0, : self.num_samples(s)].float().cpu().numpy()

    def write(self, media: np.ndarray, path: Path, s: DecodeSettings) -> Path:
        return write_wav(path, media, self.sampling_rate)

    # -- building, loading, saving -------------------------------------------------------
    def parts(self) -> dict:
        return {"unet": self.unet, "vae": self.vae, "scheduler": self.scheduler, "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer, "vocoder": self.vocoder}

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = AUDIOLDM_REPO, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "AudioDecoder":
        """A diffusers-layout Hub repo or folder (subfolders unet, vae, scheduler,
        text_encoder, tokenizer, vocoder), e.g. AudioLDM or what `save_pretrained` wrote.
        `device` defaults to CUDA when there is one; `dtype` to float16 there, float32 on a CPU."""
        return cls.load(source, lambda dtype: {
            **latent_diffusion_loaders(UNet2DConditionModel, dtype),
            "text_encoder": transformers_loader(ClapTextModelWithProjection, dtype),
            "tokenizer": RobertaTokenizer.from_pretrained,
            "vocoder": transformers_loader(SpeechT5HifiGan, dtype),
        }, f"audio decoder ({source})", device, dtype)

    @classmethod
    def tiny_random(cls, seed: int = 0, cond_dim: int = 32) -> "AudioDecoder":
        """AudioLDM's layout at toy sizes (`xvila.decoders.tiny`): 8 mel bins, a 64-sample
        hop at 16 kHz, a VAE that downsamples by 2, a 2-block U-Net conditioned on a
        `cond_dim` CLAP embedding, a 1-layer CLAP text encoder. Seeded; well under a second
        for a whole short decode on a CPU."""
        tokenizer = tiny.toy_roberta_tokenizer(tiny.TOY_WORDS[AUDIO])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**tiny.AUDIO_UNET, projection_class_embeddings_input_dim=cond_dim)
            vae = AutoencoderKL(**tiny.AUDIO_VAE)
            text_encoder = ClapTextModelWithProjection(ClapTextConfig(
                **tiny.CLAP_TEXT, **tiny.text_encoder_ids(tokenizer, cond_dim),
                max_position_embeddings=tokenizer.model_max_length + 2))
            vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**tiny.VOCODER))
        scheduler = DPMSolverMultistepScheduler(**tiny.SCHEDULERS[AUDIO])
        return cls(unet, vae, scheduler, text_encoder, tokenizer, vocoder)
