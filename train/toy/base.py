"""Trains the toy world's base parts from nothing and writes them to `assets/toy/`.

    python -m train.toy base                       # all stages, then the export to assets/toy/
    python -m train.toy base --work runs/toy-base  # where stages keep their checkpoints (the default)
    python -m train.toy base --out /tmp/toy        # export somewhere else

Stages, in order (each with a progress bar; a killed run resumes where it stopped, and a
finished stage is skipped): the scene bank; ImageBind (vision, text, audio; contrastive and
instance-level); the pixel VAE (shared by the image and video decoders) and the latents of
every frame; the image U-Net with its CLIP text encoder; the mel VAE, the audio U-Net with
its CLAP text encoder, and the vocoder (a SpeechT5 HiFi-GAN trained without a
discriminator, on multi-resolution STFT and mel losses); the video U-Net with its own CLIP
text encoder; the export. Every U-Net predicts v on a zero-terminal-SNR schedule from its
first step (`xvila.toy.parts.sd_scheduler` says why).

The export writes fp16 safetensors in the layouts the real loaders read:
`assets/toy/imagebind/` (`xvila.checkpoint.load_imagebind`; its folder also holds the CLIP
tokenizer for `load_imagebind_tokenizer`) and `assets/toy/decoders/{image,video,audio}/`
(`ImageDecoder / VideoDecoder / AudioDecoder.from_pretrained`), plus `base.json` (every
stage's steps, losses, wall and CPU time).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.toy import binding
from train.toy.bank import VARIANTS, Bank
from train.toy.stages import Stage, finished, load_stage, run_stage
from xvila.decoders.base import denoising_loss
from xvila.encoders.clip_tokenizer import ImageBindTokenizer
from xvila.decoders.audio import AudioDecoder
from xvila.decoders.image import ImageDecoder
from xvila.decoders.video import VideoDecoder
from xvila.encoders.imagebind_weights import load_imagebind, load_imagebind_tokenizer, save_imagebind
from xvila.fileio import write_json
from xvila.toy import world
from xvila.toy.parts import SIZES, LogMel, ToyParts

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toy"
WORK = Path("runs/toy-base")
# x VARIANTS scenes in the bank (rendering costs 0.24 s a group). 512 groups (2,048 scenes)
# gave ImageBind 69 % shape accuracy on training scenes and 42.5 % held out; 1,536 gave 45 %
# held out, so the shape gap is not (only) overfitting.
GROUPS = 1536
# (steps, batch, learning rate) per stage. With this plan the base took 88 min on two idle CPU
# cores, over the hour it is meant to fit (per-step CPU seconds measured on one core:
# ImageBind 0.53, pixel VAE 0.45, image U-Net 0.92, mel VAE 0.64, audio U-Net 0.59, video
# U-Net 2.3, vocoder 0.2; before the video stage trained its own text encoder).
PLAN = {
    "imagebind": (2400, 16 * VARIANTS, 5e-4),
    "pixel_vae": (1000, 16, 2e-3),
    "image_unet": (1500, 32, 5e-4),
    "mel_vae": (600, 16, 1e-3),
    "audio_unet": (1200, 32, 5e-4),
    "vocoder": (1500, 16, 1e-3),
    "video_unet": (650, 8, 5e-4),
}
EMPTY_P = 0.1  # captions dropped for classifier-free guidance
AUDIO_FRAMES = 100  # mel frames of the 1 s sound: what AudioDecoder.latent_shape asks for 1 s


def world_words() -> list[str]:
    """Every word a caption or a prompt can hold: the tokenizers' vocabulary."""
    words = {"a", "an", "and", "on", "background", "thing", *world.SHAPES, *world.COLOURS, *world.SIZES}
    for phrase in world.MOTION_WORDS.values():
        words.update(phrase.split())
    return sorted(words)


def _idx(g: torch.Generator, n: int, batch: int) -> np.ndarray:
    return torch.randint(n, (batch,), generator=g).numpy()


def _drop(captions: list[str], g: torch.Generator) -> list[str]:
    keep = torch.rand(len(captions), generator=g) >= EMPTY_P
    return [c if k else "" for c, k in zip(captions, keep)]


def _clip_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ------------------------------------------------------------------------------ ImageBind
def imagebind_stage(parts: ToyParts, bank: Bank) -> Stage:
    steps, batch, lr = PLAN["imagebind"]
    ib, tok = parts.imagebind, ImageBindTokenizer(parts.ib_tokenizer, 77)

    def step(i, g):
        groups = torch.randperm(bank.groups, generator=g)[: batch // VARIANTS].numpy()
        idx = (groups[:, None] * VARIANTS + np.arange(VARIANTS)).reshape(-1)
        specs = [binding.sample_text(bank.attributes[j], bank.captions[j], g) for j in idx]
        match = torch.tensor([[binding.fits(s, bank.attributes[j], bank.captions[j]) for j in idx] for s in specs])
        image = ib({"vision": bank.ib_vision(idx, video=False)})["vision"]
        video = ib({"vision": bank.ib_vision(idx, video=True)[:, None]})["vision"]
        audio = ib({"audio": bank.ib_audio(idx)})["audio"]
        text = ib({"text": tok([binding.text_of(s) for s in specs])})["text"]
        losses = [binding.multi_positive_nce(text, m, match) for m in (image, video, audio)]
        losses += [binding.instance_nce(a, b) for a, b in ((image, video), (image, audio), (video, audio))]
        return sum(losses) / len(losses)

    return Stage("imagebind", {"imagebind": ib}, step, steps, lr, seed=1, warmup=100, weight_decay=0.05)


# ------------------------------------------------------------------------------ VAEs
def _vae_loss(vae, x: torch.Tensor) -> torch.Tensor:
    # Reconstruct from the posterior mean, which is what the U-Nets' latents are
    # (`_encode_all`); decoding a sample spends the first hundreds of steps on the unit noise
    # of a fresh encoder's variance (measured on the pixel VAE: loss 0.57 vs 0.37 at step 100).
    # The tiny KL term still keeps the latents near the unit Gaussian's scale.
    post = vae.encode(x).latent_dist
    recon = vae.decode(post.mode()).sample
    return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * post.kl().mean()


@torch.no_grad()
def _encode_all(vae, x_of, n: int, batch: int = 256) -> np.ndarray:
    """Posterior means of items 0..n-1 (`x_of(slice)` gives their VAE inputs), float16."""
    out = [vae.encode(x_of(slice(i, min(i + batch, n)))).latent_dist.mode().half().numpy() for i in range(0, n, batch)]
    return np.concatenate(out)


def pixel_vae_stage(parts: ToyParts, bank: Bank, work: Path) -> Stage:
    steps, batch, lr = PLAN["pixel_vae"]
    vae = parts.image.vae

    def step(i, g):
        idx = _idx(g, len(bank), batch)
        return _vae_loss(vae, bank.pixels(idx, torch.randint(world.FRAMES, (batch,), generator=g).numpy()))

    def finish():
        frames = bank.video.reshape(-1, *bank.video.shape[2:])  # [N*T, H, W, 3]
        lat = _encode_all(vae, lambda s: torch.from_numpy(np.array(frames[s])).permute(0, 3, 1, 2).float()
                          / 127.5 - 1, len(frames))
        np.save(work / "pixel_latents.npy", lat.reshape(len(bank), world.FRAMES, *lat.shape[1:]))
        return {"scaling_factor": float(1 / lat.astype(np.float32).std())}

    return Stage("pixel_vae", {"vae": vae}, step, steps, lr, seed=2, finish=finish)


def mel_vae_stage(parts: ToyParts, bank: Bank, work: Path, logmel: LogMel) -> Stage:
    steps, batch, lr = PLAN["mel_vae"]
    vae = parts.audio.vae

    def mels(idx_or_slice) -> torch.Tensor:
        return logmel(torch.from_numpy(np.array(bank.wave[idx_or_slice])))[:, None, :AUDIO_FRAMES]

    def finish():
        lat = _encode_all(vae, mels, len(bank))
        np.save(work / "mel_latents.npy", lat)
        return {"scaling_factor": float(1 / lat.astype(np.float32).std())}

    return Stage("mel_vae", {"vae": vae}, lambda i, g: _vae_loss(vae, mels(_idx(g, len(bank), batch))),
                 steps, lr, seed=3, finish=finish)


# ------------------------------------------------------------------------------ U-Nets
def clap_embed(dec, captions: list[str]) -> torch.Tensor:
    """AudioDecoder.encode_text with gradients: normalised CLAP text embeddings [B, 1, D]."""
    tokens = dec.tokenizer(captions, padding="max_length", max_length=dec.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
    out = dec.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)
    return F.normalize(out.text_embeds, dim=-1)[:, None]


def _clip_embed(dec, captions: list[str]) -> torch.Tensor:
    return dec.text_encoder(_clip_ids(dec.tokenizer, captions))[0]


# Each U-Net trains with its own text encoder, predicting v (its scheduler's `prediction_type`):
# name -> (decoder, its latents of bank items as [B, *latent_shape], caption embedding, seed).
UNETS = {
    "image_unet": (lambda p: p.image, lambda lat, idx: lat[idx, 0], _clip_embed, 4),
    "video_unet": (lambda p: p.video, lambda lat, idx: np.swapaxes(lat[idx], 1, 2), _clip_embed, 5),  # B C T h w
    "audio_unet": (lambda p: p.audio, lambda lat, idx: lat[idx], clap_embed, 6),
}


def unet_stage(name: str, parts: ToyParts, bank: Bank, latents: np.ndarray) -> Stage:
    decoder_of, latents_of, embed, seed = UNETS[name]
    steps, batch, lr = PLAN[name]
    dec = decoder_of(parts)  # the video decoder's pixel VAE is the image decoder's, trained and frozen

    def step(i, g):
        idx = _idx(g, len(bank), batch)
        x0 = torch.from_numpy(latents_of(latents, idx).astype(np.float32)) * dec.vae.config.scaling_factor
        e = embed(dec, _drop([bank.captions[j] for j in idx], g))
        return denoising_loss(dec, x0, e, generator=g)

    return Stage(name, {"unet": dec.unet, "text_encoder": dec.text_encoder}, step, steps, lr, seed=seed)


# ------------------------------------------------------------------------------ vocoder
STFT_RESOLUTIONS = ((256, 64), (512, 128), (1024, 256))
SEGMENT = 32  # mel frames per training segment


def stft_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT loss (spectral convergence + log magnitude), as Parallel WaveGAN."""
    loss = 0.0
    for n_fft, hop in STFT_RESOLUTIONS:
        window = torch.hann_window(n_fft)
        sy = torch.stft(y, n_fft, hop, window=window, return_complex=True).abs().clamp(min=1e-5)
        sx = torch.stft(x, n_fft, hop, window=window, return_complex=True).abs().clamp(min=1e-5)
        loss = loss + torch.linalg.norm(sx - sy) / torch.linalg.norm(sx) + F.l1_loss(sy.log(), sx.log())
    return loss / len(STFT_RESOLUTIONS)


def vocoder_stage(parts: ToyParts, bank: Bank, logmel: LogMel) -> Stage:
    steps, batch, lr = PLAN["vocoder"]
    voc, hop = parts.audio.vocoder, SIZES.hop

    def step(i, g):
        idx = _idx(g, len(bank), batch)
        start = int(torch.randint(AUDIO_FRAMES - SEGMENT, (1,), generator=g))
        wave = bank.waves(idx)
        mel = logmel(wave)[:, start:start + SEGMENT]
        target = wave[:, start * hop:(start + SEGMENT) * hop]
        y = voc(mel)
        return stft_loss(y, target) + F.l1_loss(logmel(y)[:, 2:SEGMENT - 2], mel[:, 2:-2])

    return Stage("vocoder", {"vocoder": voc}, step, steps, lr, seed=7, warmup=100)


# ------------------------------------------------------------------------------ the run
STAGE_MODULES = {  # what each finished stage's file holds, to reload it into fresh parts
    "imagebind": lambda p: {"imagebind": p.imagebind},
    "pixel_vae": lambda p: {"vae": p.image.vae},
    "image_unet": lambda p: {"unet": p.image.unet, "text_encoder": p.image.text_encoder},
    "mel_vae": lambda p: {"vae": p.audio.vae},
    "audio_unet": lambda p: {"unet": p.audio.unet, "text_encoder": p.audio.text_encoder},
    "vocoder": lambda p: {"vocoder": p.audio.vocoder},
    "video_unet": lambda p: {"unet": p.video.unet, "text_encoder": p.video.text_encoder},
}
# Chains of stages, one process (one thread) each: on two cores this is faster than one
# process with two threads, and far faster when other work shares the cores (threads that
# wait for each other's core spin). A stage waits for the stage it needs (NEEDS) when that
# one runs in another chain.
CHAINS = (("imagebind", "vocoder"), ("mel_vae", "audio_unet"), ("pixel_vae", "image_unet"), ("video_unet",))
NEEDS = {"image_unet": "pixel_vae", "video_unet": "pixel_vae", "audio_unet": "mel_vae"}


def _set_scaling_factor(parts: ToyParts, name: str, meta: dict) -> None:
    if "scaling_factor" in meta:
        next(iter(STAGE_MODULES[name](parts).values())).register_to_config(scaling_factor=meta["scaling_factor"])


def load_finished(parts: ToyParts, work: Path) -> dict:
    """Every finished stage's weights into `parts` (VAE scaling factors included)."""
    metas = {}
    for name, modules in STAGE_MODULES.items():
        if finished(work, name):
            metas[name] = load_stage(work, name, modules(parts))
            _set_scaling_factor(parts, name, metas[name])
    return metas


def _make_stage(name: str, parts: ToyParts, bank: Bank, work: Path, logmel: LogMel) -> Stage:
    if name == "imagebind":
        return imagebind_stage(parts, bank)
    if name in ("pixel_vae", "mel_vae"):
        return pixel_vae_stage(parts, bank, work) if name == "pixel_vae" else mel_vae_stage(parts, bank, work, logmel)
    if name == "vocoder":
        return vocoder_stage(parts, bank, logmel)
    vae_stage, latents_file = ("mel_vae", "mel_latents.npy") if name.startswith("audio") else ("pixel_vae", "pixel_latents.npy")
    if not (work / latents_file).is_file():  # the VAE stage finished but its latents were lost
        _make_stage(vae_stage, parts, bank, work, logmel).finish()
    return unet_stage(name, parts, bank, np.load(work / latents_file, mmap_mode="r"))


def run_chain(chain: tuple[str, ...], work: Path, plan: dict, threads: int = 1) -> None:
    """One chain's stages in order, in this process (the finished ones are loaded)."""
    _die_with(os.getppid())
    torch.set_num_threads(threads)
    PLAN.update(plan)
    work = Path(work)
    bank, parts, logmel = Bank.load(work / "bank"), ToyParts.build(world_words()), LogMel()
    load_finished(parts, work)
    for name in chain:
        need = NEEDS.get(name)
        if need and not finished(work, need):
            print(f"[{name}] waiting for {need}", flush=True)
            while not finished(work, need):
                time.sleep(10)
            _set_scaling_factor(parts, need, load_stage(work, need, STAGE_MODULES[need](parts)))
        meta = run_stage(_make_stage(name, parts, bank, work, logmel), work, lambda m: print(m, flush=True))
        _set_scaling_factor(parts, name, meta)


def _die_with(parent: int) -> None:
    """A chain process ends when the `base` process that started it is killed (its last
    checkpoint stays; rerunning resumes), instead of training on as an orphan."""
    def watch():
        while os.getppid() == parent:
            time.sleep(5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_base(work: Path = WORK, out: Path = ASSETS, log=print, groups: int = GROUPS, steps_scale: float = 1.0,
             jobs: int = len(CHAINS)) -> dict:
    """The bank, every chain (each in its own process; `jobs=1`: one after another in this
    process, two threads), then the export. `groups` and `steps_scale` shrink a trial run."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    plan = {k: (max(2, round(n * steps_scale)), b, lr) for k, (n, b, lr) in PLAN.items()}
    t0 = time.perf_counter()
    bank_dir = work / "bank"
    if not (bank_dir / "captions.json").is_file():
        Bank.build(bank_dir, groups)
    bank_wall = time.perf_counter() - t0
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=run_chain, args=(chain, work, plan), name=chain[0]) for chain in CHAINS]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.name for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"the stage chains starting with {failed} failed (see above); rerun to resume")
    else:
        for chain in CHAINS:
            run_chain(chain, work, plan, threads=2)
    parts = ToyParts.build(world_words())
    metas = {"bank": {"wall_s": bank_wall, "scenes": len(Bank.load(bank_dir))}, **load_finished(parts, work)}
    # The wall time of every `base` run on this work folder (a stopped run is resumed by
    # another), so that the total is what building the base took, not its last leg.
    walls = work / "wall.json"
    before = json.loads(walls.read_text()) if walls.is_file() else {"wall_s": 0.0, "runs": 0}
    total = {"wall_s": before["wall_s"] + time.perf_counter() - t0, "runs": before["runs"] + 1}
    write_json(total, walls)
    metas["total"] = {**total, "jobs": jobs}
    export(parts, out, metas)
    log(f"base written to {out} in {metas['total']['wall_s'] / 60:.1f} min wall")
    return metas


def export(parts: ToyParts, out: Path, metas: dict) -> Path:
    """Every part in fp16, in the layouts the real loaders read."""
    out = Path(out)
    with torch.no_grad():
        save_imagebind(parts.imagebind.half(), out / "imagebind")
        parts.ib_tokenizer.save_pretrained(str(out / "imagebind"))
        for m in ("image", "video", "audio"):
            getattr(parts, m).half().save_pretrained(out / "decoders" / m)
    write_json({"sizes": SIZES.__dict__, "groups": metas["bank"]["scenes"] // VARIANTS, "variants": VARIANTS, "plan": PLAN, "stages": metas},
               out / "base.json")
    return out


def load_base(folder: Path = ASSETS, device: str = "cpu") -> dict:
    """The exported base through the real loaders: {"imagebind", "ib_tokenizer", "image", "video", "audio"}."""
    folder = Path(folder)
    return {
        "imagebind": load_imagebind(folder / "imagebind", device=device, dtype=torch.float32),
        "ib_tokenizer": load_imagebind_tokenizer(folder / "imagebind"),
        "image": ImageDecoder.from_pretrained(folder / "decoders" / "image", device=device),
        "video": VideoDecoder.from_pretrained(folder / "decoders" / "video", device=device),
        "audio": AudioDecoder.from_pretrained(folder / "decoders" / "audio", device=device),
    }


def base_report(folder: Path = ASSETS) -> dict:
    return json.loads((Path(folder) / "base.json").read_text())
