"""python -m train.toy.corpus --out data/toy/corpus --videos 600 --test-videos 60

The world corpus: captioned videos of world scenes with their sound, in the format the
`train/` builders already read, so `build_x2x` and `build_interleaved` run on it unchanged:

    out/videos/train/<id>.mp4   H.264 + AAC (mono, 16 kHz): `scenes_per_video` scenes of
    out/videos/test/<id>.mp4    1 s each (8 frames at 8 fps), one after the other
    out/train.json, test.json   ActivityNet Captions style: {id: {"duration", "timestamps",
                                "sentences", "seeds"}}, one segment per scene
    out/corpus.json             the parameters (a re-run with others is refused)

    from train.builders import activitynet_sources, build_x2x, build_interleaved
    build_x2x(activitynet_sources("out/train.json", "videos/train"), "out", "out/x2x", heldout_rate=0)
    build_interleaved(activitynet_sources("out/train.json", "videos/train"), "out", "out/interleaved")

A video holds several scenes so that the builders' multi-round X2X conversations and the
interleaved sequences (n = 3 chunks = the 3 scenes) have several segments to draw from;
the scenes of a video are independent draws. `seeds` lists each segment's world seed, so an
evaluation can re-render the exact scene (`world.sample_scene(seed)`).

Held out by whole scene: test videos use only seeds >= `world.TEST_SEED_START`, training
videos only seeds below, so no held-out scene (nor any clip of it) reaches training. Scene
seeds are `offset + video * scenes_per_video + k`, `offset` = `seed * SEED_STRIDE`
(+ TEST_SEED_START for test): deterministic from `--seed`.

Resumable: each MP4 is written atomically and a re-run skips those that exist; the
annotations are a function of the parameters alone and are (re)written atomically at the
end.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xvila import media
from xvila.errors import XVilaError
from xvila.fileio import atomic_path
from xvila.toy import world

SEED_STRIDE = 10_000_000  # scene seeds per corpus seed: --seed k uses [k * stride, (k + 1) * stride)
SPLITS = ("train", "test")


class CorpusError(XVilaError, ValueError):
    """Bad corpus parameters, or an output folder built with other ones."""


@dataclass(frozen=True)
class CorpusSpec:
    videos: int = 600           # training videos
    test_videos: int = 60       # held-out videos
    scenes_per_video: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.videos < 0 or self.test_videos < 0 or self.scenes_per_video < 1:
            raise CorpusError(f"videos, test_videos >= 0 and scenes_per_video >= 1, got {self}")
        if not 0 <= self.seed < world.TEST_SEED_START // SEED_STRIDE:
            raise CorpusError(f"the corpus seed is in [0, {world.TEST_SEED_START // SEED_STRIDE}), got {self.seed}")
        if max(self.videos, self.test_videos) * self.scenes_per_video > SEED_STRIDE:
            raise CorpusError(f"at most {SEED_STRIDE} scenes per split")

    def count(self, split: str) -> int:
        return self.videos if split == "train" else self.test_videos

    def scene_seeds(self, split: str, video: int) -> list[int]:
        offset = self.seed * SEED_STRIDE + (world.TEST_SEED_START if split == "test" else 0)
        first = offset + video * self.scenes_per_video
        return list(range(first, first + self.scenes_per_video))


def video_id(split: str, video: int) -> str:
    return f"{split}{video:06d}"


def annotations(spec: CorpusSpec, split: str) -> dict:
    """The split's ActivityNet-style annotation, from the parameters alone."""
    out = {}
    for v in range(spec.count(split)):
        seeds = spec.scene_seeds(split, v)
        seconds = world.AUDIO_SECONDS
        out[video_id(split, v)] = {
            "duration": seconds * len(seeds),
            "timestamps": [[k * seconds, (k + 1) * seconds] for k in range(len(seeds))],
            "sentences": [world.caption(world.sample_scene(s)) for s in seeds],
            "seeds": seeds,
        }
    return out


def render_video_file(path: Path, seeds: list[int]) -> Path:
    """One corpus MP4: the scenes' frames one after the other, with their sounds."""
    scenes = [world.sample_scene(s) for s in seeds]
    frames = np.concatenate([world.render_video(s) for s in scenes])
    sound = np.concatenate([world.render_audio(s) for s in scenes])
    return media.write_mp4(path, frames, world.FPS, audio=media.Audio(sound[None], world.SAMPLE_RATE))


def build_corpus(out_dir: str | os.PathLike, spec: CorpusSpec = CorpusSpec(), progress: bool = True) -> dict[str, int]:
    """Write (or finish) the corpus in `out_dir`; returns how many MP4s each split has."""
    out = Path(out_dir)
    _check_params(out, spec)
    written = {}
    for split in SPLITS:
        todo = [v for v in range(spec.count(split)) if not _video_path(out, split, v).is_file()]
        for v in _bar(todo, f"world corpus ({split})", progress):
            render_video_file(_video_path(out, split, v), spec.scene_seeds(split, v))
        with atomic_path(out / f"{split}.json") as tmp:
            tmp.write_text(json.dumps(annotations(spec, split), indent=1))
        written[split] = spec.count(split)
    return written


def _video_path(out: Path, split: str, video: int) -> Path:
    return out / "videos" / split / f"{video_id(split, video)}.mp4"


def _check_params(out: Path, spec: CorpusSpec) -> None:
    params = out / "corpus.json"
    wanted = {**asdict(spec), "world": _world_version()}
    if params.is_file():
        old = json.loads(params.read_text())
        if old != wanted:
            raise CorpusError(f"{out} holds a corpus built with {old}, not {wanted}; use a new folder or the same settings")
        return
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(params) as tmp:
        tmp.write_text(json.dumps(wanted, indent=1))


def _world_version() -> dict:
    """What the corpus depends on in the world: a change here invalidates a resume."""
    return {"image_size": world.IMAGE_SIZE, "frames": world.FRAMES, "fps": world.FPS,
            "sample_rate": world.SAMPLE_RATE, "audio_seconds": world.AUDIO_SECONDS}


def _bar(items: list, desc: str, enabled: bool):
    if not enabled or not items:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="video")


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(prog="python -m train.toy.corpus", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", required=True, help="output folder; resumes if it holds a corpus with the same settings")
    parser.add_argument("--videos", type=int, default=CorpusSpec.videos)
    parser.add_argument("--test-videos", type=int, default=CorpusSpec.test_videos)
    parser.add_argument("--scenes-per-video", type=int, default=CorpusSpec.scenes_per_video)
    parser.add_argument("--seed", type=int, default=CorpusSpec.seed)
    args = parser.parse_args(argv)
    try:
        spec = CorpusSpec(args.videos, args.test_videos, args.scenes_per_video, args.seed)
        written = build_corpus(args.out, spec)
    except XVilaError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"world corpus in {args.out}: {written}")
    return written


if __name__ == "__main__":
    main()
