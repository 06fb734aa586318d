"""Small captioned videos with sound, made on the fly, for the training tests.

    from train_factory import make_dataset, frame_index
    ds = make_dataset(tmp_path)            # a few 64x48, 8 fps, 4-6 s clips with sine audio
    ds.root, ds.webvid, ds.activitynet     # the folder, a WebVid CSV, an ActivityNet JSON
    ds.videos                              # rel path -> Clip(seconds, caption, tone_hz)

Frame i of a clip is a flat colour, `COLOURS[i % 12]` (see `media_factory`), so a decoded
frame tells which frame it was (`frame_index(frame)` -> i % 12) even after H.264. Each
clip's audio is one sine (`tone_hz`), mono, 16 kHz, as long as the video; sources list
paths relative to `root`. `ds.corrupt` is an MP4 cut in half: its header reads, its
frames do not (xvila.media raises CorruptMediaError while decoding).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from media_factory import COLOURS, nearest_colour, tone

from xvila import media

FPS = 8
WIDTH, HEIGHT = 64, 48
AUDIO_RATE = 16000


@dataclass
class Clip:
    seconds: float
    caption: str
    tone_hz: float


@dataclass
class Dataset:
    root: Path
    webvid: Path  # CSV, columns video,caption; lists the corrupt video too when there is one
    activitynet: Path | None  # JSON {video_id: {duration, timestamps, sentences}}, videos in root/anet/
    videos: dict[str, Clip] = field(default_factory=dict)  # every readable video, rel -> Clip
    corrupt: str | None = None  # rel path of the broken video


def write_captioned_video(path: str | Path, seconds: float = 4.0, *, tone_hz: float = 440.0, fps: int = FPS,
                          width: int = WIDTH, height: int = HEIGHT, audio: bool = True) -> Path:
    """An H.264 MP4 (with a mono AAC sine track unless audio=False); frame i is COLOURS[i % 12]."""
    n = round(seconds * fps)
    frames = np.broadcast_to(COLOURS[np.arange(n) % len(COLOURS)][:, None, None, :], (n, height, width, 3)).copy()
    sound = media.Audio(tone((tone_hz,), seconds, AUDIO_RATE), AUDIO_RATE) if audio else None
    return media.write_mp4(path, frames, fps, audio=sound)


def write_corrupt_video(path: str | Path, seconds: float = 4.0) -> Path:
    """A captioned video cut in half, as an interrupted download leaves it."""
    path = Path(path)
    write_captioned_video(path, seconds)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def frame_index(frame: np.ndarray) -> int:
    """Which frame (modulo 12) a decoded frame or PNG of a factory video is."""
    return nearest_colour(np.asarray(frame))


WEBVID_CLIPS = {  # rel -> (seconds, caption, tone)
    "webvid/dog.mp4": (4.0, "A dog runs across a sunny park.", 330.0),
    "webvid/sea.mp4": (5.0, "Waves crash on a rocky shore", 440.0),
    "webvid/car.mp4": (6.0, "a red car drives down an empty road", 550.0),
    "webvid/cat.mp4": (4.0, "A cat plays with a ball of yarn.", 660.0),
}
ANET = {  # video_id -> (seconds, [(start, end, sentence)])
    "v_cook": (6.0, [(0.0, 2.0, "A man chops onions."), (2.0, 4.5, "He fries them in a pan."),
                     (4.5, 6.0, "He serves the dish.")]),
}


def make_dataset(root: str | Path, *, corrupt: bool = True, activitynet: bool = True) -> Dataset:
    """Four WebVid-style clips (4, 5, 6, 4 s) in a CSV with, if `corrupt`, a broken one
    listed third; and, if `activitynet`, one 6 s video with three timestamped sentences."""
    root = Path(root)
    ds = Dataset(root, root / "webvid.csv", None)
    rows = []
    for rel, (seconds, caption, hz) in WEBVID_CLIPS.items():
        write_captioned_video(root / rel, seconds, tone_hz=hz)
        ds.videos[rel] = Clip(seconds, caption, hz)
        rows.append({"video": rel, "caption": caption})
    if corrupt:
        ds.corrupt = "webvid/broken.mp4"
        write_corrupt_video(root / ds.corrupt)
        rows.insert(2, {"video": ds.corrupt, "caption": "A broken download."})
    with ds.webvid.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    if activitynet:
        ds.activitynet = root / "activitynet.json"
        annotations = {}
        for video_id, (seconds, segments) in ANET.items():
            rel = f"anet/{video_id}.mp4"
            write_captioned_video(root / rel, seconds, tone_hz=770.0)
            ds.videos[rel] = Clip(seconds, segments[0][2], 770.0)
            annotations[video_id] = {"duration": seconds, "timestamps": [[s, e] for s, e, _ in segments],
                                     "sentences": [text for _, _, text in segments]}
        ds.activitynet.write_text(json.dumps(annotations))
    return ds
