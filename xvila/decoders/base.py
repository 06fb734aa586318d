"""What every decoder provides, and the one denoising loop they all share.

A decoder (`ImageDecoder`, `VideoDecoder`, `AudioDecoder`) holds diffusers/transformers
parts that load once and stay resident; it says how to condition its U-Net on E_text, what
latent shape to start from, and how to turn latents into a file. `denoise()` is the loop:

    1. scheduler timesteps (DPM-Solver++ multistep by default, `steps` a setting)
    2. seeded initial noise
    3. for each step: classifier-free guidance over [negative, E_text]; the visual
       controller's residuals on the steps with t < T·α (eq. 4), none on the others;
       a progress callback; cancellation between steps
    4. the final latents

The diffusers text-to-video and AudioLDM pipelines are deprecated, and the highway needs
per-step control, hence our own loop over the library's models and schedulers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler
from torch import nn

from xvila.decoders.controller import prepare_e_vis
from xvila.errors import XVilaError
from xvila.fileio import Location, default_device, default_dtype, load_parts, own_memory, save_parts


class Cancelled(XVilaError):
    """Generation was stopped between two steps."""


class DecodeSettingsError(XVilaError, ValueError):
    """A decoder setting (size, frames, length) the decoder cannot honour."""


@dataclass
class DecodeSettings:
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    alpha: float = 0.6  # VEH conditioning rate: residuals on steps with t < T·alpha
    height: int | None = None  # None: the decoder's default
    width: int | None = None
    frames: int = 16  # video
    fps: int = 8  # video: the frame rate the MP4 is written at
    # video: the frame rate VideoCrafter2's U-Net is conditioned on, a setting apart from
    # the written rate (the official sampling runs the model at 28 and saves at 10); None:
    # the decoder's own (`VideoDecoder.condition_fps`)
    condition_fps: int | None = None
    seconds: float = 5.0  # audio


# (step done, steps in all) -> None; the demo turns it into a progress bar.
ProgressFn = Callable[[int, int], None]


@dataclass
class DenoiseEvent:
    """What `iter_denoise` yields: `kind` "progress" after each step (`step` of `steps`
    done), then once "latents" with the final `latents` [1, *latent_shape]."""

    kind: str
    step: int = 0
    steps: int = 0
    latents: torch.Tensor | None = None


class Decoder(nn.Module):
    """Base class: subclasses set `modality`, `unet`, `scheduler` and implement the hooks."""

    modality: str = ""
    file_suffix: str = ""
    unet: nn.Module
    scheduler: object  # a diffusers scheduler
    controller: nn.Module | None  # the visual controller (image and video only)
    part_names: tuple[str, ...] = ()  # the subfolders of its diffusers layout

    def __init__(self):
        super().__init__()
        # An instance attribute, not a class default: a class-level None would shadow the
        # submodule that nn.Module registers when a controller is assigned later.
        self.controller = None
        self._negative: torch.Tensor | None = None

    # -- hooks ------------------------------------------------------------------------
    def latent_shape(self, s: DecodeSettings) -> tuple[int, ...]:
        """Shape of one sample's initial latents (without the batch dimension)."""
        raise NotImplementedError

    def unet_condition(self, e_text: torch.Tensor, s: DecodeSettings) -> dict:
        """U-Net keyword arguments for a batch of E_text (`encoder_hidden_states=...`, or
        `class_labels=...` for AudioLDM, plus e.g. fps for VideoCrafter2)."""
        raise NotImplementedError

    def negative_condition(self) -> torch.Tensor:
        """E_text of the empty prompt, for classifier-free guidance: computed once, kept."""
        if self._negative is None:
            self._negative = self.encode_text([""])
        return self._negative

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """The decoder's own text encoder: Text-Aligned decoding, and phase-1/3a targets."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor, s: DecodeSettings):
        """Latents of one sample -> a numpy array of the medium."""
        raise NotImplementedError

    def write(self, media, path: Path, s: DecodeSettings) -> Path:
        raise NotImplementedError

    def parts(self) -> dict:
        """{subfolder: part} of the diffusers layout the decoder loads from and saves to."""
        raise NotImplementedError

    @classmethod
    def load(cls, source, loaders: Callable[[torch.dtype], dict], what: str, device=None, dtype=None, layout=None,
             unexpected: bool = False, **init) -> "Decoder":
        """The decoder from its parts, each loaded by `loaders(dtype)[name]` (see
        `xvila.fileio.load_parts`), on `device` (default CUDA when there is one) in `dtype`
        (default float16 there, float32 on a CPU). `init`: the constructor's other arguments."""
        device = default_device(device)
        dtype = dtype or default_dtype(device)
        parts = load_parts(source, loaders(dtype), what, layout, unexpected)
        return own_memory(cls(**parts, **init).to(device=device, dtype=dtype))

    @classmethod
    def locations(cls, source) -> dict[str, Location]:
        """Where `from_pretrained(source)` reads each part: a subfolder of a diffusers-layout
        repo or folder (the assembler's offline check looks them up before anything loads)."""
        source = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else str(source)
        return {name: Location.part(source, name) for name in cls.part_names}

    def save_pretrained(self, folder) -> Path:
        """Each part with its library's `save_pretrained`, in the layout `from_pretrained` reads."""
        return save_parts(self.parts(), folder)

    # -- shared ------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_hw(self, height: int, width: int, what: str) -> tuple[int, int]:
        """Pixels -> latent rows and columns, refusing sizes the VAE cannot produce."""
        f = self.vae_scale_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise DecodeSettingsError(f"{what} size {width}x{height}: width and height must be positive multiples of {f}")
        return height // f, width // f

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def highway_residuals(self, e_vis: torch.Tensor, latent_shape: tuple[int, ...], s: DecodeSettings):
        """(down residuals, mid residual) for one sample from a chat input's E_vis
        ([H, W, C], or [S, H, W, C] for a video); None for a decoder without a controller."""
        if self.controller is None:
            return None
        # E_vis keeps its float32: the controller normalises it before its own dtype.
        return self.controller(prepare_e_vis(e_vis).to(self.device), latent_shape)


def resize_center_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]: `image` in RGB, scaled (bicubic) so that it covers the size,
    then cropped at the centre; how phase-3b targets reach a VAE's input size."""
    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height))).copy()


def use_highway(t, num_train_timesteps: int, alpha: float) -> bool:
    """Eq. 4: the controller's residuals go in on the steps with t < T·alpha."""
    return float(t) < num_train_timesteps * alpha


@torch.no_grad()  # torch applies it around each resumption of the generator
def iter_denoise(decoder: Decoder, e_text: torch.Tensor, s: DecodeSettings, e_vis: torch.Tensor | None = None,
                 should_stop: Callable[[], bool] | None = None):
    """The shared denoising loop for one sample, as a generator of `DenoiseEvent`s: progress
    after each step, then the final latents, so that a chat can stream progress without
    threads."""
    device, dtype = decoder.device, decoder.dtype
    # A scheduler keeps per-run state (timesteps, solver history): each run gets its own,
    # so that two requests on one decoder cannot corrupt each other.
    scheduler = type(decoder.scheduler).from_config(decoder.scheduler.config)
    # 1. timesteps
    scheduler.set_timesteps(s.steps, device=device)
    T = scheduler.config.num_train_timesteps
    # 2. initial noise, seeded on the CPU so that a seed gives the same output on any device
    shape = decoder.latent_shape(s)
    g = torch.Generator().manual_seed(s.seed)
    latents = (torch.randn((1, *shape), generator=g) * scheduler.init_noise_sigma).to(device, dtype)
    # 3. conditioning: [negative, positive] for classifier-free guidance
    cfg = s.guidance > 1.0
    e = e_text.to(device, dtype)[None] if e_text.dim() == 2 else e_text.to(device, dtype)
    if cfg:
        e = torch.cat([decoder.negative_condition().to(device, dtype).expand_as(e), e])
    cond = decoder.unet_condition(e, s)
    # 4. the highway: residuals depend on E_vis only, so they are computed once
    residuals = None
    if e_vis is not None and s.alpha > 0:
        residuals = decoder.highway_residuals(e_vis, shape, s)
    if residuals is not None and cfg:  # the same guidance signal on both halves, as ControlNet
        down, mid = residuals
        residuals = ([torch.cat([r, r]) for r in down], torch.cat([mid, mid]))
    # 5. denoising loop
    for i, t in enumerate(scheduler.timesteps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped after {i} of {s.steps} steps")
        x = torch.cat([latents, latents]) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        extra = {}
        if residuals is not None and use_highway(t, T, s.alpha):
            extra = {"down_block_additional_residuals": residuals[0], "mid_block_additional_residual": residuals[1]}
        noise = decoder.unet(x, t, **cond, **extra, return_dict=False)[0]
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + s.guidance * (text - uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        yield DenoiseEvent("progress", step=i + 1, steps=s.steps)
    yield DenoiseEvent("latents", step=s.steps, steps=s.steps, latents=latents)


@torch.no_grad()
def denoise(decoder: Decoder, e_text: torch.Tensor, s: DecodeSettings, e_vis: torch.Tensor | None = None,
            progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """`iter_denoise` run to the end, with an optional (step, steps) progress callback."""
    for event in iter_denoise(decoder, e_text, s, e_vis, should_stop):
        if event.kind == "latents":
            return event.latents
        if progress is not None:
            progress(event.step, event.steps)
    raise AssertionError("iter_denoise ended without its latents")  # unreachable: it always yields them last


def generate(decoder: Decoder, e_text: torch.Tensor, path: Path, s: DecodeSettings, e_vis: torch.Tensor | None = None,
             progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> Path:
    """E_text (+ E_vis) -> a written file, in one call. The chat streams `iter_denoise`
    instead; this is the form for scripts, benches and the decoder tests, which exercise a
    decoder alone, without a model around it."""
    latents = denoise(decoder, e_text, s, e_vis, progress, should_stop)
    with torch.no_grad():
        media = decoder.decode_latents(latents, s)
    return decoder.write(media, Path(path), s)


def denoising_loss(decoder: Decoder, x0: torch.Tensor, e_text: torch.Tensor, e_vis: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, prediction_type: str | None = None) -> torch.Tensor:
    """Phase 3b's objective: the U-Net's noise-prediction loss with the controller's residuals.

    x0: clean latents [B, *latent_shape] (VAE-encoded targets, precomputable); e_text:
    [B, L, C]; e_vis: [B, H, W, C] or None. The residuals go in at every sampled t: eq. 4's
    α only schedules them at inference, and α may be 1, so the controller must learn every
    noise level. The target follows the scheduler's `prediction_type` (epsilon or v) unless
    `prediction_type` names another (a U-Net pre-trained on one before it is fine-tuned to the other).
    """
    config = decoder.scheduler.config
    # Noise by the training (DDPM) form of the same schedule, not the sampler's: the
    # DPM-Solver scheduler's `add_noise` looks sigmas up by position in its timesteps, which
    # before `set_timesteps` run 999 -> 0 while its sigmas run 0 -> 999, so t = 999 came out
    # nearly clean and a U-Net trained on it learns the noise levels backwards.
    forward = DDPMScheduler.from_config(config)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    noisy = forward.add_noise(x0, noise, t)
    extra = {}
    if e_vis is not None and decoder.controller is not None:
        down, mid = decoder.controller(e_vis, tuple(x0.shape[1:]))
        extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    pred = decoder.unet(noisy, t, **decoder.unet_condition(e_text.to(x0.dtype), DecodeSettings()), **extra,
                        return_dict=False)[0]
    target = forward.get_velocity(x0, noise, t) if (prediction_type or config.prediction_type) == "v_prediction" else noise
    return torch.nn.functional.mse_loss(pred.float(), target.float())


# ------------------------------------------------------------------ loading parts
# `xvila.fileio.load_parts` calls one of these per subfolder: the library's own loader.
def latent_diffusion_loaders(unet_cls, dtype: torch.dtype | None, loading_info: bool = False) -> dict:
    """The U-Net, VAE and scheduler loaders every decoder shares."""
    return {"unet": diffusers_loader(unet_cls, dtype, loading_info),
            "vae": diffusers_loader(AutoencoderKL, dtype, loading_info), "scheduler": dpm_solver_loader}


def transformers_loader(cls, dtype: torch.dtype | None) -> Callable:
    return lambda source, **where: cls.from_pretrained(source, dtype=dtype, output_loading_info=True, **where)


def diffusers_loader(cls, dtype: torch.dtype | None, loading_info: bool = False) -> Callable:
    """`loading_info`: return diffusers' loading info too, so that `load_parts` checks it
    (diffusers refuses missing weights itself, but only warns about unexpected ones)."""
    if loading_info:
        return lambda source, **where: cls.from_pretrained(source, dtype=dtype, output_loading_info=True, **where)
    return lambda source, **where: cls.from_pretrained(source, dtype=dtype, **where)


def dpm_solver_loader(source, **where):
    # Any scheduler config of the repo (PNDM for SD1.5, DDIM for AudioLDM and zeroscope)
    # keeps its betas, timestep count and prediction type; DPM-Solver++ takes what it knows of it.
    return DPMSolverMultistepScheduler.from_pretrained(source, algorithm_type="dpmsolver++", **where)
