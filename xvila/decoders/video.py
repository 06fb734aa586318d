"""The video decoder: VideoCrafter2 (default) or zeroscope, as diffusers and transformers parts.

    VideoDecoder.from_pretrained()                         # VideoCrafter2 U-Net + zeroscope's VAE/CLIP
    VideoDecoder.from_pretrained(variant="zeroscope")      # cerspense/zeroscope_v2_576w whole
    VideoDecoder.tiny_random(cond_dim=32)                  # tiny random parts, for tests and tiny-random
    decoder.save_pretrained("out/video")                   # subfolders + decoder.json, readable back

VideoCrafter2 in diffusers form is `adamdad/videocrafterv2_diffusers`: only a U-Net
(`config.json` + `diffusion_pytorch_model.safetensors` at the repo root) whose config names
the class `UNet3DVideoCrafterConditionModel`, which diffusers does not have. It is diffusers'
`UNet3DConditionModel` layout plus one thing, the fps condition of VideoCrafter's
`openaimodel3d.UNetModel` (`fps_cond: true`): the frame rate goes through the same
sinusoidal projection as the timestep (320 channels, cos first, no frequency shift) and its
own two-layer MLP, `fps_embedding.linear_1/linear_2` (320 -> 1280 -> 1280, SiLU), and the
result is added to the time embedding. Our `UNet3DVideoCrafterConditionModel` below adds
exactly that to diffusers' class and keeps its class name, so the repo's config and weights
load into it strictly, and what we save loads in the converter's code too.

The VAE, the text encoder (OpenCLIP-H's text tower as a `CLIPTextModel`, 1024-d; VideoCrafter2
conditions on that tower's penultimate layer, which is what the ModelScope/zeroscope
conversions keep as the last) and the tokenizer come from `cerspense/zeroscope_v2_576w`, as
in the conversion's own pipeline; so does the scheduler config (DDIM, 1000 steps,
scaled-linear betas 0.00085-0.012, epsilon prediction: VideoCrafter's "linear" schedule,
which squares a linspace of square roots). We sample with DPM-Solver++ built from it.
VideoCrafter2's own DDIM sampler also rescales x0 by a per-step factor (`use_scale`,
1.0 -> 0.7 over t = 0..400); diffusers' schedulers have no such option and the
conversion's pipeline does not do it either.

Frames are decoded by the 2D VAE one chunk of frames at a time and written as H.264 MP4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet3DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from xvila.constants import VIDEO
from xvila.decoders import tiny
from xvila.decoders.base import (
    DecodeSettings, DecodeSettingsError, Decoder, latent_diffusion_loaders, resize_center_crop, transformers_loader,
)
from xvila.encoders.clip_tokenizer import toy_clip_tokenizer
from xvila.errors import ConfigError, WeightsUnavailableError
from xvila.fileio import Location, default_device, default_dtype, load_parts, own_memory, write_json
from xvila.media import read_video, write_mp4

VIDEOCRAFTER2_REPO = "adamdad/videocrafterv2_diffusers"
ZEROSCOPE_REPO = "cerspense/zeroscope_v2_576w"
# The zeroscope repo's main branch holds pickled .bin weights only; this commit (its open
# pull request refs/pr/46) adds safetensors of the same weights.
ZEROSCOPE_REVISION = "1f35e3dc3350d649f342bb7618fe34ac8fae5c9e"
VARIANTS = ("videocrafter2", "zeroscope")
# (height, width) each U-Net was trained at: VideoCrafter2 320x512, zeroscope_v2_576w 320x576.
DEFAULT_SIZE = {"videocrafter2": (320, 512), "zeroscope": (320, 576)}
# The fps VideoCrafter2's U-Net is conditioned on when sampling, apart from the rate the
# video is written at. The authors sample VideoCrafter2 (base_512_v2) at fps 28
# (github.com/AILab-CVC/VideoCrafter, commit 11bcd76: scripts/run_text2video.sh line 21,
# `--fps 28`, passed as the `fps` condition by scripts/evaluation/inference.py lines 34 and
# 101-110) and write the file at `--savefps` (inference.py line 26, default 10). The script's
# own default (line 34) and the diffusers conversion's pipeline (`VideoCrafterPipeline.__call__`,
# `kwargs.pop("fps", 24)`) use 24, VideoCrafter1's setting; we follow the authors' v2 script.
VIDEOCRAFTER2_CONDITION_FPS = 28
DECODER_CONFIG = "decoder.json"  # written last by save_pretrained: marks the folder complete
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# VideoCrafter2's U-Net as published (huggingface.co/adamdad/videocrafterv2_diffusers, config.json).
VIDEOCRAFTER2_UNET_CONFIG = dict(
    sample_size=None, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=64,
    num_attention_heads=None, fps_cond=True,
)



# ----------------------------------------------------------------------------- the U-Net
class _TimeEmbedding(TimestepEmbedding):
    """The time embedding MLP (same parameters as diffusers'), plus an embedding added to
    its output. `UNet3DConditionModel.forward` hands its `timestep_cond` to the time
    embedding and nowhere else; with no `cond_proj` that argument is otherwise unusable, so
    the fps embedding travels through it and the library's forward stays as it is."""

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        emb = super().forward(sample)
        return emb if condition is None else emb + condition


class UNet3DVideoCrafterConditionModel(UNet3DConditionModel):
    """diffusers' `UNet3DConditionModel` with VideoCrafter2's fps condition (`fps_cond`).

    `forward(sample, timestep, encoder_hidden_states, fps=...)`: `fps` is an int or a
    tensor of shape [] or [batch]. Everything else, ControlNet-style
    `down_block_additional_residuals` / `mid_block_additional_residual` included, is the
    parent's. With `fps_cond=False` it is the parent exactly (and takes no fps).
    """

    _skip_layerwise_casting_patterns = [*UNet3DConditionModel._skip_layerwise_casting_patterns, "fps_embedding"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = VIDEOCRAFTER2_UNET_CONFIG["down_block_types"],
        up_block_types: tuple[str, ...] = VIDEOCRAFTER2_UNET_CONFIG["up_block_types"],
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        attention_head_dim: int | tuple[int] = 64,
        num_attention_heads: int | tuple[int] | None = None,
        time_cond_proj_dim: int | None = None,
        fps_cond: bool = True,
    ):
        if time_cond_proj_dim is not None:
            raise ValueError("UNet3DVideoCrafterConditionModel: time_cond_proj_dim is not supported (the fps "
                             "embedding uses the time embedding's condition input)")
        super().__init__(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            down_block_types=down_block_types, up_block_types=up_block_types, block_out_channels=block_out_channels,
            layers_per_block=layers_per_block, downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor, act_fn=act_fn, norm_num_groups=norm_num_groups,
            norm_eps=norm_eps, cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
        )
        channels, time_embed_dim = block_out_channels[0], block_out_channels[0] * 4
        self.time_embedding = _TimeEmbedding(channels, time_embed_dim, act_fn=act_fn)
        if fps_cond:
            # VideoCrafter's timestep_embedding: [cos, sin], frequencies 10000^(-i/half).
            self.fps_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.fps_embedding = TimestepEmbedding(channels, time_embed_dim, act_fn=act_fn)
        else:
            self.fps_proj = self.fps_embedding = None

    def fps_condition(self, fps: int | float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """The embedding added to the time embedding: [batch, 4 * block_out_channels[0]]."""
        fps = torch.as_tensor(fps, device=device)
        if fps.dim() == 0:
            fps = fps.expand(batch)
        if fps.shape != (batch,):
            raise ValueError(f"fps must be a number or a tensor of shape [{batch}], got shape {tuple(fps.shape)}")
        # The projection has no weights and computes in float32; the MLP runs in the model's dtype.
        return self.fps_embedding(self.fps_proj(fps).to(dtype=self.dtype))

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                fps: int | float | torch.Tensor | None = None, **kwargs):
        if kwargs.get("timestep_cond") is not None:
            raise ValueError("UNet3DVideoCrafterConditionModel takes no timestep_cond")
        if self.fps_embedding is not None:
            if fps is None:
                raise ValueError("this VideoCrafter U-Net is fps-conditioned: pass fps=")
            kwargs["timestep_cond"] = self.fps_condition(fps, sample.shape[0], sample.device)
        elif fps is not None:
            raise ValueError("this U-Net has no fps condition (fps_cond=False): do not pass fps=")
        return super().forward(sample, timestep, encoder_hidden_states, **kwargs)


# ------------------------------------------------------------------------------- loading
def _layout(source: str, variant: str, base: str, base_revision: str | None) -> dict[str, Location]:
    """Where each part of the decoder lives. A local folder: the U-Net in unet/ (our layout,
    zeroscope's) or at the root (the VideoCrafter2 conversion's), the other parts in its
    subfolders, or from `base` when it has none. A Hub id: VideoCrafter2's U-Net at the root
    with the other parts from `base`; zeroscope's repo whole."""
    folder = Path(source)
    if folder.is_dir():
        unet = Location(source, "unet" if (folder / "unet").is_dir() else None)
        rest, revision = (source, None) if (folder / "vae").is_dir() else (base, base_revision)
    elif variant == "videocrafter2":
        unet, rest, revision = Location(source, None), base, base_revision
    else:
        revision = base_revision if source == base else None
        unet, rest = Location.part(source, "unet", revision), source
    return {"unet": unet, **{name: Location.part(rest, name, revision) for name in PARTS if name != "unet"}}


def _loaders(variant: str, dtype: torch.dtype | None) -> dict:
    """Each part's library loader, with loading info for the strict check."""
    unet_cls = UNet3DVideoCrafterConditionModel if variant == "videocrafter2" else UNet3DConditionModel
    return {
        **latent_diffusion_loaders(unet_cls, dtype, loading_info=True),
        "text_encoder": transformers_loader(CLIPTextModel, dtype),
        "tokenizer": CLIPTokenizer.from_pretrained,
    }


def load_unet(where: Location | str, variant: str, dtype: torch.dtype | None = None, what: str = "video decoder"):
    """The variant's U-Net class from a folder or repo, strictly: a missing or unexpected
    key (e.g. an fps-embedding weight) is an error that names it."""
    where = where if isinstance(where, Location) else Location(str(where), None)
    unet = load_parts(where.source, {"unet": _loaders(variant, dtype)["unet"]}, what, {"unet": where},
                      unexpected=True)["unet"]
    _check_fps(unet, variant, f"{what}: the U-Net in {where}")
    return unet


def _resolve(source, variant: str | None, base: str) -> tuple[str, str, dict]:
    """(source, variant, decoder.json) as `from_pretrained` reads them: a folder written by
    `save_pretrained` names its variant; otherwise the variant's default repo."""
    meta = {}
    if source is not None and (Path(source).expanduser() / DECODER_CONFIG).is_file():
        source = str(Path(source).expanduser())
        meta = json.loads((Path(source) / DECODER_CONFIG).read_text())
        if variant is not None and variant != meta["variant"]:
            raise ConfigError(f"{source} holds a {meta['variant']} video decoder, not {variant}")
    variant = meta.get("variant") or variant or "videocrafter2"
    if variant not in VARIANTS:
        raise ConfigError(f"video decoder variant must be one of {VARIANTS}, not {variant!r}")
    if source is None:
        source = VIDEOCRAFTER2_REPO if variant == "videocrafter2" else base
    source = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else str(source)
    return source, variant, meta


def _check_fps(unet, variant: str, what: str) -> None:
    if variant == "videocrafter2" and unet.fps_embedding is None:
        raise WeightsUnavailableError(f"{what} has fps_cond=false; VideoCrafter2's takes fps")


# ------------------------------------------------------------------------------- decoder
class VideoDecoder(Decoder):
    """Text (E_text [77, 1024]) to a 16-frame video. `variant` "videocrafter2" conditions
    the U-Net on a frame rate too: `DecodeSettings.condition_fps`, else the decoder's
    `condition_fps` (default 28, as VideoCrafter2 is sampled); "zeroscope" has no fps input.
    `DecodeSettings.fps` is only ever the rate the MP4 is written at."""

    modality = VIDEO
    file_suffix = ".mp4"
    decode_chunk = 8  # frames through the VAE at once

    def __init__(self, unet: UNet3DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, scheduler, variant: str = "videocrafter2",
                 size: tuple[int, int] | None = None, condition_fps: int | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"video decoder variant must be one of {VARIANTS}, not {variant!r}")
        fps_conditioned = getattr(unet, "fps_embedding", None) is not None
        if fps_conditioned != (variant == "videocrafter2"):
            wanted, got = ("with", "without") if variant == "videocrafter2" else ("without", "with")
            raise ConfigError(f"video decoder variant {variant!r} needs a U-Net {wanted} an fps input; "
                              f"got a {type(unet).__name__} {got} one")
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.variant = variant
        self.size = tuple(size) if size is not None else DEFAULT_SIZE[variant]
        self.condition_fps = VIDEOCRAFTER2_CONDITION_FPS if condition_fps is None else condition_fps
        # Frozen and in eval mode: inference only; phase 3b unfreezes the U-Net itself.
        self.eval().requires_grad_(False)

    @property
    def fps_conditioned(self) -> bool:
        return getattr(self.unet, "fps_embedding", None) is not None

    # -- hooks ---------------------------------------------------------------------------
    def latent_shape(self, s: DecodeSettings) -> tuple[int, int, int, int]:
        h, w = self.latent_hw(s.height or self.size[0], s.width or self.size[1], "video")
        if s.frames < 1:
            raise DecodeSettingsError(f"a video needs at least 1 frame, not {s.frames}")
        return (self.unet.config.in_channels, s.frames, h, w)

    def unet_condition(self, e_text: torch.Tensor, s: DecodeSettings) -> dict:
        cond = {"encoder_hidden_states": e_text}
        if self.fps_conditioned:
            fps = s.condition_fps if s.condition_fps is not None else self.condition_fps
            cond["fps"] = torch.full((e_text.shape[0],), int(round(fps)), dtype=torch.long, device=e_text.device)
        return cond

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), 77, 1024]: the CLIP text tower's last hidden state (OpenCLIP-H's
        penultimate layer, after the final LayerNorm), without an attention mask, as
        VideoCrafter2 and the zeroscope pipeline compute it."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, s: DecodeSettings) -> np.ndarray:
        """[1, 4, T, h, w] latents -> uint8 [T, H, W, 3], the 2D VAE decoding frame by frame."""
        z = latents[0].transpose(0, 1).to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        frames = torch.cat([self.vae.decode(z[i:i + self.decode_chunk], return_dict=False)[0]
                            for i in range(0, len(z), self.decode_chunk)])
        frames = (frames / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return (frames * 255).round().astype(np.uint8)

    def write(self, media: np.ndarray, path: Path, s: DecodeSettings) -> Path:
        return write_mp4(path, media, fps=s.fps)

    @torch.no_grad()
    def encode_latents(self, media_path_or_array, frames: int | None = None) -> torch.Tensor:
        """A target video -> its latents [4, T, h, w], the x0 of phase 3b's denoising loss.

        `media_path_or_array`: a video file or uint8 frames [T, H, W, 3]. `frames` evenly
        spaced frames are kept (default: all of an array's, `DecodeSettings().frames` of a
        file's); each is resized (short side) and centre-cropped to the decoder's size,
        scaled to [-1, 1] and encoded by the 2D VAE, `decode_chunk` frames at a time. The
        latents are the posterior's mean times the VAE's `scaling_factor` (deterministic)."""
        video = media_path_or_array
        if not isinstance(video, np.ndarray):
            video = read_video(video, with_audio=False).frames
            frames = frames or DecodeSettings().frames
        if frames:
            video = video[np.linspace(0, len(video) - 1, frames).round().astype(int)]
        h, w = self.size
        out = [resize_center_crop(Image.fromarray(frame), h, w) for frame in video]
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = x.to(self.vae.device, self.vae.dtype)
        z = torch.cat([self.vae.encode(x[i:i + self.decode_chunk]).latent_dist.mode()
                       for i in range(0, len(x), self.decode_chunk)])
        return z.transpose(0, 1) * self.vae.config.scaling_factor

    # -- building, loading, saving -------------------------------------------------------
    def parts(self) -> dict:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "scheduler": self.scheduler}

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, variant: str | None = None, base: str = ZEROSCOPE_REPO,
                        base_revision: str | None = ZEROSCOPE_REVISION) -> "VideoDecoder":
        """A folder written by `save_pretrained` (its decoder.json gives the variant), or
        the variant's weights: VideoCrafter2's U-Net from `source` (default
        adamdad/videocrafterv2_diffusers) with the other parts from `base`, or zeroscope
        whole from `source` (default `base`). Each part loads with its library's
        `from_pretrained`; any failure is a `WeightsUnavailableError` naming the repos.
        `device` defaults to CUDA when there is one; `dtype` to float16 there, float32 on a CPU."""
        device = default_device(device)
        dtype = dtype or default_dtype(device)
        source, variant, meta = _resolve(source, variant, base)
        what = f"video decoder ({variant}, {source})"
        layout = _layout(source, variant, base, base_revision)
        parts = load_parts(source, _loaders(variant, dtype), what, layout, unexpected=True)
        _check_fps(parts["unet"], variant, f"{what}: the U-Net in {layout['unet']}")
        decoder = cls(**parts, variant=variant, size=meta.get("size"), condition_fps=meta.get("condition_fps"))
        return own_memory(decoder.to(device=device, dtype=dtype))

    @classmethod
    def locations(cls, source: str | os.PathLike | None = None, variant: str | None = None, base: str = ZEROSCOPE_REPO,
                  base_revision: str | None = ZEROSCOPE_REVISION) -> dict[str, Location]:
        """Where `from_pretrained` with the same arguments reads each part (the assembler's
        offline check looks them up before anything loads)."""
        source, variant, _ = _resolve(source, variant, base)
        return _layout(source, variant, base, base_revision)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Each part with its library's `save_pretrained` (safetensors) in its subfolder, then
        decoder.json, last, so that a folder with it is complete."""
        super().save_pretrained(folder)
        write_json({"variant": self.variant, "size": list(self.size), "condition_fps": self.condition_fps},
                   Path(folder) / DECODER_CONFIG)
        return Path(folder)

    @classmethod
    def tiny_random(cls, seed: int = 0, cond_dim: int = 32, variant: str = "videocrafter2") -> "VideoDecoder":
        """The real layout at toy sizes (`xvila.decoders.tiny`): 16x16-pixel frames, 4x8x8
        latents per frame, a 2-block 3D U-Net of widths 8/16 (with the fps embedding for
        VideoCrafter2), a 1-layer CLIP text encoder of width `cond_dim`. Seeded; a few
        milliseconds per step on a CPU for 2-4 frames."""
        if variant not in VARIANTS:
            raise ConfigError(f"video decoder variant must be one of {VARIANTS}, not {variant!r}")
        tokenizer = toy_clip_tokenizer(tiny.TOY_WORDS[VIDEO])
        tokenizer.model_max_length = 77
        unet_config = dict(tiny.VIDEO_UNET, cross_attention_dim=cond_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if variant == "videocrafter2":
                unet = UNet3DVideoCrafterConditionModel(**unet_config, fps_cond=True)
            else:
                unet = UNet3DConditionModel(**unet_config)
            vae = AutoencoderKL(**tiny.VIDEO_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**tiny.CLIP_TEXT, **tiny.text_encoder_ids(tokenizer, cond_dim),
                                                        hidden_size=cond_dim, intermediate_size=2 * cond_dim,
                                                        hidden_act="gelu"))
        scheduler = DPMSolverMultistepScheduler(**tiny.SCHEDULERS[VIDEO])
        return cls(unet, vae, text_encoder, tokenizer, scheduler, variant=variant, size=tiny.VIDEO_SIZE)
