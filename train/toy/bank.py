"""The scene bank: world scenes rendered once into arrays that every base stage samples from.

Scenes come in groups of `VARIANTS` with the same caption (`world.scene_like`), differing
in position, texture, shade and exact size: ImageBind's instance-level contrast needs such
hard negatives in one batch, and the other stages do not mind.

Besides the raw renders (the decoders' targets), the bank keeps ImageBind's inputs as the
real preprocessing makes them from files: the video's two frames after an H.264 round
trip (chroma subsampling blurs colour edges, and every video ImageBind sees in use comes
from an MP4), and the Kaldi fbank of the sound (from the MP4's AAC track for odd scenes,
the exact WAV samples for even ones, as both reach ImageBind in use).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from xvila import media
from xvila.encoders import imagebind_preprocess as pre
from xvila.toy import world
from xvila.toy.parts import SIZES

VARIANTS = 4  # same-caption scenes per group
ARRAYS = ("video", "wave", "ib_frames", "ib_fbank")


def same_caption(scene: world.Scene, seed: int, tries: int = 9) -> world.Scene:
    """`world.scene_like`, retried with other seeds (seed + k * 10**8) when the drawn sizes
    leave no room for two things."""
    for k in range(tries):
        try:
            return world.scene_like(scene, seed + k * 10**8)
        except world.WorldError:
            if k == tries - 1:
                raise
    raise AssertionError("unreachable")


def group_scenes(group: int, seed_base: int = 0, size: int = VARIANTS) -> list[world.Scene]:
    """Group `group`'s scenes: a sampled scene and size - 1 others with its caption."""
    first = seed_base + group * size
    for k in range(10):  # a rare caption (two large moving things) may not fit again: take another
        scene = world.sample_scene(first + k * 10**7)
        try:
            return [scene] + [same_caption(scene, first + j) for j in range(1, size)]
        except world.WorldError:
            continue
    raise world.WorldError(f"group {group}: no caption that fits {size} times")


def ib_fbank(wave: np.ndarray) -> np.ndarray:
    """ImageBind's audio input for one sound, [mel_bins, frames] float32 (one clip)."""
    clips = pre.audio_to_clips(wave, world.SAMPLE_RATE, clips_per_video=1, num_mel_bins=SIZES.ib_mel_bins,
                               target_length=SIZES.ib_audio_frames)
    return clips[0, 0].numpy()


def _render_group(args) -> dict[str, np.ndarray | list]:
    group, seed_base, tmp = args
    out = {k: [] for k in ARRAYS}
    out["caption"], out["attributes"] = [], []
    for j, scene in enumerate(group_scenes(group, seed_base)):
        video, wave = world.render_video(scene), world.render_audio(scene)
        path = Path(tmp) / f"{group}_{j}.mp4"
        media.write_mp4(path, video, fps=world.FPS, audio=media.Audio(wave[None], world.SAMPLE_RATE))
        decoded = media.read_video(path, with_audio=(j % 2 == 1), audio_sample_rate=world.SAMPLE_RATE)
        path.unlink()
        heard = wave
        if j % 2 == 1:  # the AAC track, cut or padded to the world's length
            heard = np.zeros_like(wave)
            track = decoded.audio.samples.mean(axis=0)[: len(wave)]
            heard[: len(track)] = track
        out["video"].append(video)
        out["wave"].append(wave)
        out["ib_frames"].append(decoded.frames[[0, -1]])  # what UniformTemporalSubsample(2) keeps
        out["ib_fbank"].append(ib_fbank(heard))
        out["caption"].append(world.caption(scene))
        out["attributes"].append(world.attributes(scene))
    return out


@dataclass
class Bank:
    video: np.ndarray  # uint8 [N, T, H, W, 3]
    wave: np.ndarray  # float32 [N, samples]
    ib_frames: np.ndarray  # uint8 [N, 2, H, W, 3], after an MP4 round trip
    ib_fbank: np.ndarray  # float32 [N, mel_bins, frames], ImageBind-normalised
    captions: list[str]
    attributes: list[dict]  # world.attributes of each scene

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def groups(self) -> int:
        return len(self) // VARIANTS

    @staticmethod
    def build(folder: Path, groups: int, workers: int = 2, seed_base: int = 0) -> "Bank":
        """Render `groups` groups into `folder` (written whole or not at all)."""
        folder = Path(folder)
        tmp = Path(tempfile.mkdtemp(prefix=".bank.", dir=folder.parent))
        arrays = {k: [] for k in ARRAYS}
        captions, attributes = [], []
        jobs = [(g, seed_base, str(tmp)) for g in range(groups)]
        with ProcessPoolExecutor(workers) as pool:
            for out in tqdm(pool.map(_render_group, jobs, chunksize=8), total=groups, desc="bank", unit="group"):
                for k in ARRAYS:
                    arrays[k] += out[k]
                captions += out["caption"]
                attributes += out["attributes"]
        for k in ARRAYS:
            np.save(tmp / f"{k}.npy", np.stack(arrays[k]))
        (tmp / "captions.json").write_text(json.dumps({"captions": captions, "attributes": attributes}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return Bank.load(folder)

    @staticmethod
    def load(folder: Path) -> "Bank":
        folder = Path(folder)
        arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in ARRAYS}
        text = json.loads((folder / "captions.json").read_text())
        return Bank(**arrays, captions=text["captions"], attributes=text["attributes"])

    # -------------------------------------------------------------- batches
    def ib_vision(self, idx: np.ndarray, video: bool) -> torch.Tensor:
        """ImageBind vision input: images [B, 3, H, W] (the raw first frame, as a PNG
        gives it) or two-frame clips [B, 3, 2, H, W] (after the MP4 round trip)."""
        x = self.ib_frames[idx] if video else self.video[idx, :1]
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3).float() / 255  # B C T H W
        mean = torch.tensor(pre.CLIP_MEAN).view(1, 3, 1, 1, 1)
        std = torch.tensor(pre.CLIP_STD).view(1, 3, 1, 1, 1)
        x = (x - mean) / std
        return x if video else x[:, :, 0]

    def ib_audio(self, idx: np.ndarray) -> torch.Tensor:
        """[B, 1, mel_bins, frames]."""
        return torch.from_numpy(np.ascontiguousarray(self.ib_fbank[idx]))[:, None]

    def pixels(self, idx: np.ndarray, frame: np.ndarray | None = None) -> torch.Tensor:
        """Frames in [-1, 1]: [B, 3, H, W] of frame `frame[b]` (default 0)."""
        frame = np.zeros(len(idx), dtype=int) if frame is None else frame
        x = np.stack([self.video[i, f] for i, f in zip(idx, frame)])
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1

    def waves(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.wave[idx]))
