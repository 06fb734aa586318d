"""The toy world's base parts: the real classes (ImageBind, SD1.5's, VideoCrafter2's and
AudioLDM's) at sizes that train from scratch on two CPU cores within the hour.

    parts = ToyParts.build(words)        # untrained, seeded; `words` is the world's vocabulary
    ToyParts.SIZES                        # every size in one place (see `ToySizes`)

`train/toy/base.py` trains them; what it writes under `assets/toy/` loads with the real
loaders (`xvila.checkpoint.load_imagebind`, `ImageDecoder/VideoDecoder/AudioDecoder.from_pretrained`).
Nothing here does I/O or builds a model at import time.

Shared choices, and why:
- 64x64 pixels, the world's size. ImageBind patches of 8x8 (2 frames) give an 8x8 token
  grid, so E_vis (the highway) is 8x8xC.
- one pixel VAE (downsampling 4: 16x16x4 latents) serves the image and the video decoder,
  as VideoCrafter2 and SD share a latent space in spirit; each has its own CLIP text encoder,
  as VideoCrafter2's OpenCLIP is not SD1.5's CLIP (and so the video stage does not wait for
  the image stage to finish training a shared one).
- zero terminal SNR (Lin et al. 2024) with v prediction for every U-Net, see `sd_scheduler`.
- audio at 16 kHz (ImageBind's and AudioLDM's rate); AudioLDM's mel: 64 bins, hop 160
  (10 ms), n_fft 1024, 0-8 kHz, natural log (rescaled, see `LogMel`), which the SpeechT5
  HiFi-GAN vocoder reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import (
    ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel, SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)
from transformers.audio_utils import mel_filter_bank

from xvila.decoders.audio import AudioDecoder
from xvila.decoders.image import ImageDecoder
from xvila.decoders.tiny import toy_roberta_tokenizer
from xvila.decoders.video import UNet3DVideoCrafterConditionModel, VideoDecoder
from xvila.encoders.clip_tokenizer import toy_clip_tokenizer
from xvila.encoders.imagebind import ImageBind, ImageBindConfig


@dataclass(frozen=True)
class ToySizes:
    image: int = 64  # pixels, the world's frames
    frames: int = 8  # video frames the video decoder makes
    fps: int = 8
    sample_rate: int = 16000
    embed: int = 64  # ImageBind's joint space
    cond: int = 64  # decoders' text-embedding width: E_text is 77x64 (image, video), 1x64 (audio)
    ib_mel_bins: int = 64  # ImageBind's Kaldi fbank bins (the official 128 is wasted on 64 px worlds)
    ib_audio_frames: int = 100  # 1 s of 10 ms frames: the world's sounds last 1 s (the official 204 is 2 s)
    mel_bins: int = 64  # AudioLDM's mel, the vocoder's input
    hop: int = 160
    n_fft: int = 1024
    mel_fmax: float = 8000.0


SIZES = ToySizes()


# ------------------------------------------------------------------------------ ImageBind
def imagebind_config(vocab_size: int, s: ToySizes = SIZES) -> ImageBindConfig:
    return ImageBindConfig(
        video_frames=2, kernel_size=(2, 8, 8), image_size=s.image, out_embed_dim=s.embed,
        vision_embed_dim=96, vision_num_blocks=3, vision_num_heads=4,
        text_embed_dim=64, text_num_blocks=2, text_num_heads=4, text_vocab_size=vocab_size,
        audio_embed_dim=64, audio_num_blocks=2, audio_num_heads=4,
        audio_num_mel_bins=s.ib_mel_bins, audio_target_len=s.ib_audio_frames, audio_drop_path=0.0,
    )


# ------------------------------------------------------------------------------ pixels
def pixel_vae() -> AutoencoderKL:
    """64x64x3 <-> 16x16x4 (three blocks: downsampling 4)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        # Four groups, so the 16 full-resolution channels are normalised four at a time: with
        # one channel per group (16 groups) GroupNorm is an instance norm that strips each
        # channel's mean, i.e. the flat background colour, and the VAE could not give it back
        # (measured: 300 steps put most backgrounds in the wrong colour; loss 0.55 -> 0.22 at 200 steps).
        norm_num_groups=4, sample_size=SIZES.image,
    )


def clip_text(tokenizer, s: ToySizes = SIZES) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=s.cond, intermediate_size=2 * s.cond, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=s.cond,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def image_unet(s: ToySizes = SIZES) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=s.image // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=s.cond, attention_head_dim=8, norm_num_groups=16,
    )


def video_unet(s: ToySizes = SIZES) -> UNet3DVideoCrafterConditionModel:
    return UNet3DVideoCrafterConditionModel(
        sample_size=s.image // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=s.cond, attention_head_dim=8, norm_num_groups=16, fps_cond=True,
    )


# The toy U-Nets predict v on a schedule rescaled to zero terminal SNR, sampled from the last
# timestep ("trailing"), as Lin et al. ("Common diffusion noise schedules and sample steps
# are flawed") prescribe. With SD1.5's betas as they are, t = 999 keeps sqrt(alpha_bar) = 0.068
# of the picture, and in a 16x16 latent the per-channel spatial mean -- which here *is* the
# background colour -- survives averaging over 256 noise values: measured on the first toy
# base's latents, its signal std is 0.055 against the noise mean's 0.062 at t = 999, and
# dominates from t = 900 on (video: the noise mean averages over 2048 values). The U-Nets
# learned to read the background off the noisy input and, at sampling, drew the background of
# the starting noise whatever the caption said (1 of 80 held-out captions drawn in both
# colours). At zero terminal SNR the last step holds nothing but noise, so only the caption
# can say what to draw.
PREDICTION = "v_prediction"
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def sd_scheduler() -> DPMSolverMultistepScheduler:
    # SD1.5's (= VideoCrafter2's) betas.
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, algorithm_type="dpmsolver++",
                                       prediction_type=PREDICTION, **ZERO_SNR)


# ------------------------------------------------------------------------------ sound
def mel_vae() -> AutoencoderKL:
    """A log-mel [1, frames, 64] <-> [4, frames/4, 16]."""
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=SIZES.mel_bins,
    )


def audio_unet(s: ToySizes = SIZES) -> UNet2DConditionModel:
    # AudioLDM's layout: the CLAP embedding as a class condition concatenated to the time
    # embedding, self-attention (cross_attention_dim = the block's own width) in the deeper blocks.
    widths = (32, 64, 64)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=widths,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=widths, attention_head_dim=8, norm_num_groups=16,
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=s.cond,
        class_embeddings_concat=True,
    )


def clap_text(tokenizer, s: ToySizes = SIZES) -> ClapTextModelWithProjection:
    return ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length + 2, type_vocab_size=1, projection_dim=s.cond,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))


def vocoder(s: ToySizes = SIZES) -> SpeechT5HifiGan:
    # 5*4*4*2 = 160 samples a frame: AudioLDM's hop. Narrow, with one residual kernel.
    return SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=s.mel_bins, sampling_rate=s.sample_rate, upsample_initial_channel=64,
        upsample_rates=[5, 4, 4, 2], upsample_kernel_sizes=[10, 8, 8, 4], resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3], [1, 3]], normalize_before=False,
    ))


def audioldm_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                                       beta_schedule="scaled_linear", steps_offset=1, algorithm_type="dpmsolver++",
                                       prediction_type=PREDICTION, **ZERO_SNR)


class LogMel(torch.nn.Module):
    """AudioLDM's mel: |STFT| (Hann, n_fft 1024, hop 160, centred) through 64 Slaney mel
    filters (0-8 kHz), natural log of max(x, 1e-5), then shifted and scaled, (log + 4) / 4,
    to about [-2, 2]: the world's silence (-11.5) and tones (up to ~4) would otherwise take a
    small VAE hundreds of steps just to reach. waveform [B, n] -> [B, n // hop + 1, 64]."""

    def __init__(self, s: ToySizes = SIZES):
        super().__init__()
        self.s = s
        banks = mel_filter_bank(num_frequency_bins=s.n_fft // 2 + 1, num_mel_filters=s.mel_bins, min_frequency=0.0,
                                max_frequency=s.mel_fmax, sampling_rate=s.sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("banks", torch.from_numpy(np.asarray(banks, dtype=np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(s.n_fft), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave, self.s.n_fft, self.s.hop, window=self.window, center=True, return_complex=True).abs()
        return (torch.log(torch.clamp(spec.transpose(1, 2) @ self.banks, min=1e-5)) + 4) / 4


# ------------------------------------------------------------------------------ all of them
def _clip_tokenizer(words: list[str]):
    tok = toy_clip_tokenizer(words)
    tok.model_max_length = 77  # CLIP's context, which the text encoders' positions are sized for
    return tok


@dataclass
class ToyParts:
    """Every base part, untrained. The image and the video decoder hold the same pixel VAE
    object; each has its own CLIP text encoder."""

    imagebind: ImageBind
    ib_tokenizer: object
    image: ImageDecoder
    video: VideoDecoder
    audio: AudioDecoder
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, words: list[str], seed: int = 0, s: ToySizes = SIZES) -> "ToyParts":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ib_tok = _clip_tokenizer(words)
            imagebind = ImageBind(imagebind_config(len(ib_tok), s))
            clip_tok = _clip_tokenizer(words)
            vae = pixel_vae()
            image = ImageDecoder(image_unet(s), vae, sd_scheduler(), clip_text(clip_tok, s), clip_tok)
            video_tok = _clip_tokenizer(words)
            video = VideoDecoder(video_unet(s), vae, clip_text(video_tok, s), video_tok, sd_scheduler(), variant="videocrafter2",
                                 size=(s.image, s.image), condition_fps=s.fps)
            rob_tok = toy_roberta_tokenizer(words)
            audio = AudioDecoder(audio_unet(s), mel_vae(), audioldm_scheduler(), clap_text(rob_tok, s), rob_tok,
                                 vocoder(s))
        return cls(imagebind, ib_tok, image, video, audio)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
