"""python -m train.builders x2x --sources webvid.csv --root data/ --out data/x2x

Builders of the phase-2 and phase-3 corpora from captioned videos (paper §3.1, App. A):

    python -m train.builders x2x --sources webvid.csv --root data/ --out data/x2x \\
        --rounds 2 --heldout 200,200,200,62,62,62 --heldout-rate 0.01
    python -m train.builders interleaved --sources activitynet/train.json --format activitynet \\
        --video-dir activitynet/videos --root data/ --out data/interleaved

Sources are WebVid-style (a CSV or JSONL of ``{"video": rel, "caption": str}``: one caption
per clip) or ActivityNet-Captions-style (``{video_id: {"duration", "timestamps",
"sentences"}}``, videos at ``<video-dir>/<video_id>.mp4``). `webvid_sources` and
`activitynet_sources` turn both into ``{"video": rel, "segments": [(start, end, caption),
...]}`` (end None: to the end of the video).

- `build_x2x` writes the six X-to-X conversation types (VID2IMG, IMG2VID, VID2VID, AUD2VID,
  VID2AUD, IMG+AUD2VID) per captioned segment, cutting frames (PNG), clips (silent MP4) and
  audio (mono 16 kHz WAV) with PyAV through `xvila.media`. Conversations have 1..`rounds`
  rounds: further segments of the same video, then one describe-it text round.
  `conversations.jsonl` is the train split, `heldout.jsonl` the evaluation split (see
  `build_x2x` for how it is drawn).
- `build_interleaved` cuts n = 3 evenly spaced chunks per video, each (image, audio, clip,
  caption) -> `interleaved.jsonl`.

Both stream their sources (one video in memory at a time), skip a broken video with its
reason (`Skipped`, logged to `<name>.skipped.jsonl`) and are resumable: manifests are
append-only JSONL; after each source the files are flushed and fsync'ed and
`<name>.state.json` records the next source and the files' sizes (written to a temporary
file, fsync'ed, renamed). A re-run truncates the files to those sizes (dropping a half-done
source) and continues, so an interrupted run ends with the same manifests as an
uninterrupted one. Media are written atomically by `xvila.media`'s writers.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from train.data import (GPT, HUMAN, X2X_TYPES, Skipped, UnsafePathError, check_rel, dumps, marker_sequence,
                        placeholder_sequence, resolve)
from xvila import media
from xvila.constants import AUDIO, IMAGE, IMAGEBIND_SAMPLE_RATE, VIDEO
from xvila.errors import ResumeError, XVilaError
from xvila.fileio import atomic_path

log = logging.getLogger(__name__)
PAPER_HELDOUT = (200, 200, 200, 62, 62, 62)  # per X2X_TYPES, as the paper's evaluation set


# ------------------------------------------------------------------------------ sources
def webvid_sources(path: str | os.PathLike) -> Iterator[dict]:
    """A WebVid-style CSV (columns `video` or `videoid`, `caption` or `name`) or JSONL
    (``{"video", "caption"}``) -> one whole-clip segment per video. WebVid's own CSV has
    `videoid`, `page_dir` and `name`: its video is then `<page_dir>/<videoid>.mp4`."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f) if path.suffix.lower() == ".csv" else (json.loads(line) for line in f if line.strip())
        for row in rows:
            video = row.get("video") or row.get("path")
            if not video and row.get("videoid"):
                video = str(PurePosixPath(row.get("page_dir") or "") / f"{row['videoid']}.mp4")
            caption = row.get("caption") or row.get("name") or ""
            yield {"video": video or "", "segments": [(0.0, None, caption)]}


def activitynet_sources(path: str | os.PathLike, video_dir: str = "", ext: str = ".mp4") -> Iterator[dict]:
    """ActivityNet Captions JSON -> one source per video, its timestamped sentences as
    segments; the video is `<video_dir>/<video_id><ext>` (relative to the builders' root)."""
    with Path(path).open(encoding="utf-8") as f:
        annotations = json.load(f)  # the annotation file itself is small (~10k videos)
    for video_id, entry in annotations.items():
        segments = [(float(s), float(e), str(text)) for (s, e), text in zip(entry["timestamps"], entry["sentences"])]
        yield {"video": str(PurePosixPath(video_dir or ".") / f"{video_id}{ext}"), "segments": segments}


# ---------------------------------------------------------------------------- templates
# Several phrasings per type, drawn by a RNG seeded with (seed, conversation id), so a
# conversation's text does not depend on what was built before it. {where}: VID2IMG's frame.
HUMAN_TEMPLATES = {
    "VID2IMG": [
        "<video>\nCan you show me an image of the {where} of this video?",
        "Here is a video: <video>\nPlease generate a picture of what it shows at the {where}.",
        "<video>\nDraw the scene at the {where} of this clip.",
        "Give me a still image from the {where} of this video. <video>",
    ],
    "IMG2VID": [
        "<image>\nMake a video that starts from this image.",
        "Can you turn this picture into a video? <image>",
        "<image>\nGenerate a short video clip that begins with this scene.",
        "Animate this image for me: <image>",
    ],
    "VID2VID": [
        "<video>\nWhat happens next? Please generate the following video.",
        "Continue this video: <video>",
        "<video>\nCan you generate a video of what comes after this clip?",
        "Here is the first half of a clip: <video>\nShow me the second half.",
    ],
    "AUD2VID": [
        "<audio>\nGenerate a video that matches this sound.",
        "What could be making this sound? Show me a video. <audio>",
        "<audio>\nCan you make a video for this audio?",
        "Listen to this: <audio>\nNow create a matching video.",
    ],
    "VID2AUD": [
        "<video>\nWhat would this video sound like? Please generate its audio.",
        "Generate a soundtrack for this clip: <video>",
        "<video>\nCan you create the sound of this scene?",
        "Make audio that matches this video. <video>",
    ],
    "IMG+AUD2VID": [
        "<image>\n<audio>\nMake a video of this scene with this sound.",
        "Here is a picture <image> and a sound <audio>. Generate a video that combines them.",
        "<audio>\n<image>\nCreate a video that starts from this image and matches the audio.",
        "Combine this image <image> with this audio <audio> into a video.",
    ],
}
GPT_TEMPLATES = {
    "VID2IMG": ["Sure, here is an image of the {where} of the video: {caption}. <gen:image>",
                "{Caption} <gen:image>", "Here it is. <gen:image>"],
    "IMG2VID": ["Sure! Here is a video starting from the image: {caption}. <gen:video>",
                "{Caption} <gen:video>", "Here is the video. <gen:video>"],
    "VID2VID": ["Here is what happens next: {caption}. <gen:video>",
                "{Caption} <gen:video>", "Sure, here is the continuation. <gen:video>"],
    "AUD2VID": ["Here is a video that fits the sound: {caption}. <gen:video>",
                "{Caption} <gen:video>", "This sound could come from a scene like this. <gen:video>"],
    "VID2AUD": ["Here is the sound of the scene: {caption}. <gen:audio>",
                "{Caption} <gen:audio>", "Sure, here is the audio. <gen:audio>"],
    "IMG+AUD2VID": ["Here is a video with that scene and sound: {caption}. <gen:video>",
                    "{Caption} <gen:video>", "Sure, here is the video. <gen:video>"],
}
DESCRIBE_HUMAN = ["What is happening in it?", "Can you describe the scene?", "Briefly, what does it show?"]
DESCRIBE_GPT = ["{Caption}", "Sure. {Caption}", "In short: {caption}."]
WHERE = {"first": "beginning", "middle": "middle", "last": "end"}  # frame -> words
# Per type: input artifact per modality, output artifact (None: VID2IMG's chosen frame).
ROLES = {
    "VID2IMG": ({VIDEO: "clip"}, None),
    "IMG2VID": ({IMAGE: "first"}, "clip"),
    "VID2VID": ({VIDEO: "head"}, "tail"),
    "AUD2VID": ({AUDIO: "audio"}, "clip"),
    "VID2AUD": ({VIDEO: "clip"}, "audio"),
    "IMG+AUD2VID": ({IMAGE: "first", AUDIO: "audio"}, "clip"),
}
ARTIFACTS = {"clip": "clip.mp4", "head": "head.mp4", "tail": "tail.mp4", "first": "first.png",
             "middle": "middle.png", "last": "last.png", "audio": "audio.wav"}


def _caption_forms(caption: str) -> dict[str, str]:
    """{caption}: mid-sentence form (no final stop, lower first letter unless an acronym),
    {Caption}: a sentence."""
    text = " ".join(caption.split()).rstrip(".")
    first = text.split(" ", 1)[0]
    lower = text[:1].lower() + text[1:] if first[1:] == first[1:].lower() else text
    return {"caption": lower, "Caption": text[:1].upper() + text[1:] + "."}


# ------------------------------------------------------------------------- resumption
@dataclass
class BuildReport:
    sources: int  # sources consumed so far (all runs), broken ones included
    counts: dict[str, int]  # e.g. "train/VID2IMG", "heldout/VID2IMG", "videos", "chunks"
    skipped: Skipped  # all runs
    done: bool  # False when stopped by max_sources
    heldout_short: dict[str, int] = field(default_factory=dict)  # x2x: quota left unfilled


class _SkipSource(Exception):
    """A readable source that cannot be used (no audio track, no caption...): counted as `kind`."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


class _Run:
    """Append-only outputs of one builder, checkpointed after each source."""

    def __init__(self, out_dir: Path, name: str, outputs: tuple[str, ...], params: dict, init: dict):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.state_path = out_dir, out_dir / f"{name}.state.json"
        self.skip_log = f"{name}.skipped.jsonl"
        self.files = (*outputs, self.skip_log)
        params = json.loads(json.dumps(params))  # tuples -> lists, as stored
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
            old = self.state["params"]
            if old != params:
                diff = ", ".join(f"{k} {old.get(k)} (now {params.get(k)})" for k in sorted(set(old) | set(params))
                                 if old.get(k) != params.get(k))
                raise ResumeError(f"{out_dir} holds a {name} run with other settings: {diff}; "
                                  "use a new folder or the same settings")
        else:  # a fresh run: whatever a crash before the first checkpoint left is dropped
            self.state = {"params": params, "next_source": 0, "sizes": dict.fromkeys(self.files, 0), **init}
        for name_ in self.files:
            self._truncate(out_dir / name_, self.state["sizes"][name_])
        self.counts = Counter(self.state.get("counts", {}))
        self.skipped = Skipped.from_lines((out_dir / self.skip_log).read_text(encoding="utf-8").splitlines())
        self._logged = len(self.skipped.items)
        self.handles = {f: (out_dir / f).open("ab") for f in self.files}

    @staticmethod
    def _truncate(path: Path, size: int) -> None:
        if not path.exists():
            if size:
                raise ResumeError(f"{path} is missing but the run's state says it held {size} bytes")
            path.touch()
        elif path.stat().st_size < size:
            raise ResumeError(f"{path} is shorter than the run's state says ({path.stat().st_size} < {size} bytes)")
        else:
            os.truncate(path, size)

    def write(self, file: str, record: dict) -> None:
        self.handles[file].write((dumps(record) + "\n").encode("utf-8"))

    def checkpoint(self, next_source: int) -> None:
        for i in range(self._logged, len(self.skipped.items)):
            self.handles[self.skip_log].write((self.skipped.line(i) + "\n").encode("utf-8"))
        self._logged = len(self.skipped.items)
        for f in self.handles.values():
            f.flush()
            os.fsync(f.fileno())
        self.state["sizes"] = {name: f.tell() for name, f in self.handles.items()}
        self.state["next_source"] = next_source
        self.state["counts"] = dict(self.counts)
        with atomic_path(self.state_path) as tmp, tmp.open("w") as f:
            json.dump(self.state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.handles.values():
            f.close()


def _run_sources(sources: Iterable[dict], run: _Run, root: Path, process, shard: tuple[int, int],
                 max_sources: int | None) -> bool:
    """Feed the unfinished sources of this shard to `process(rel, path, source)`, checkpointing
    after each. A broken medium skips the whole source. True when all were consumed."""
    index, mine, done = run.state["next_source"], 0, True
    todo = iter(sources)
    try:
        for _ in range(index):  # consumed by an earlier run
            next(todo, None)
        for source in todo:
            ours = index % shard[1] == shard[0]
            if ours:
                if max_sources is not None and mine >= max_sources:
                    done = False
                    break
                rel = source.get("video") or ""
                try:
                    process(rel, resolve(root, rel), source)
                except (media.MediaError, UnsafePathError) as err:
                    run.skipped.add(rel, err)
                    run.counts["sources_skipped"] += 1
                except _SkipSource as err:
                    run.skipped.add(rel, str(err), kind=err.kind)
                    run.counts["sources_skipped"] += 1
                mine += 1
            index += 1
            if ours:
                run.checkpoint(index)
                if mine % 100 == 0:
                    log.info("%d sources done; %s", index, dict(run.counts))
        run.checkpoint(index)  # sources of other shards after our last one
        return done
    finally:  # on an error the last source's records stay past the checkpoint: truncated on resume
        run.close()


def _key(rel: str) -> str:
    return str(PurePosixPath(check_rel(rel)).with_suffix(""))


def _bucket(key: str) -> float:
    """A stable number in [0, 1) per source, for the held-out draw."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


# ------------------------------------------------------------------------------ cutting
@dataclass
class _Segment:
    index: int  # position in the source's segment list
    start: float
    end: float
    caption: str


def _segments(rel: str, source: dict, duration: float, max_clip: float, min_seconds: float,
              skipped: Skipped) -> list[_Segment]:
    """The source's segments clipped to the video, at most `max_clip` s (the middle part)."""
    out = []
    for i, (start, end, caption) in enumerate(source.get("segments") or []):
        start, end = max(float(start), 0.0), duration if end is None else min(float(end), duration)
        if not str(caption).strip():
            skipped.add(f"{rel}#{i}", "the segment has no caption", kind="BadSegment")
        elif end - start < min_seconds:
            skipped.add(f"{rel}#{i}", f"{start:g}-{end:g} s: shorter than {min_seconds:g} s "
                        f"(or past the video's end, {duration:.2f} s)", kind="BadSegment")
        else:
            if end - start > max_clip:
                start = (start + end - max_clip) / 2
                end = start + max_clip
            out.append(_Segment(i, start, end, str(caption).strip()))
    return out


def _read_span(path: Path, start: float, end: float, audio_rate: int) -> media.Video:
    """Frames and audio of [start, end); a video track that stops well before `end` (a cut
    download decodes without error up to the cut) is refused as CorruptMediaError."""
    video = media.read_video(path, start=start, end=end, audio_sample_rate=audio_rate)
    if video.times[-1] < end - max(3 / (video.fps or 1), 0.5):
        raise media.CorruptMediaError(f"{path.name}: the picture stops at {video.times[-1]:.2f} s, before "
                                      f"{end:.2f} s; the file is truncated or damaged.")
    return video


def _mono(audio: media.Audio) -> np.ndarray:
    return audio.samples.mean(axis=0)


def _cut(path: Path, seg: _Segment, folder: Path, names: set[str], audio_rate: int) -> dict[str, Path]:
    """Decode one segment and write the artifacts in `names` (those it can give: halves need
    two frames, audio needs sound that is not silence)."""
    video = _read_span(path, seg.start, seg.end, audio_rate)
    frames, n = video.frames, len(video.frames)
    sound = video.audio is not None and not video.audio.silent
    writers = {
        "clip": lambda p: media.write_mp4(p, frames, video.fps),
        "head": lambda p: media.write_mp4(p, frames[: n // 2], video.fps),
        "tail": lambda p: media.write_mp4(p, frames[n // 2:], video.fps),
        "first": lambda p: media.write_png(p, frames[0]),
        "middle": lambda p: media.write_png(p, frames[n // 2]),
        "last": lambda p: media.write_png(p, frames[-1]),
        "audio": lambda p: media.write_wav(p, _mono(video.audio), video.audio.sample_rate),
    }
    paths = {}
    for name in names:
        if (name in ("head", "tail") and n < 2) or (name == "audio" and not sound):
            continue
        paths[name] = writers[name](folder / ARTIFACTS[name])
    return paths


# ---------------------------------------------------------------------------------- X2X
def _usable(kind: str, paths: dict[str, Path]) -> bool:
    inputs, output = ROLES[kind]
    return all(a in paths for a in inputs.values()) and (output is None or output in paths)


def _gen_round(kind: str, seg: _Segment, paths: dict[str, str], rng: random.Random) -> tuple[str, str, list, list]:
    """One cross-modal round: (human text, gpt text, inputs, outputs)."""
    inputs, output = ROLES[kind]
    frame = rng.choice(sorted(WHERE)) if output is None else None
    where = WHERE.get(frame, "")
    human = rng.choice(HUMAN_TEMPLATES[kind]).format(where=where)
    gpt = rng.choice(GPT_TEMPLATES[kind]).format(where=where, **_caption_forms(seg.caption))
    ins = [{"modality": m, "path": paths[inputs[m]]} for m in placeholder_sequence(human)]
    outs = [{"modality": m, "path": paths[output or frame], "caption": seg.caption} for m in marker_sequence(gpt)]
    return human, gpt, ins, outs


def _conversation(cid: str, kind: str, chain: list[tuple[_Segment, dict]], describe: bool, seed: int) -> dict:
    rng = random.Random(f"{seed}:{cid}")  # str seeds hash with SHA-512: stable across runs
    turns, inputs, outputs = [], [], []
    for seg, paths in chain:
        human, gpt, ins, outs = _gen_round(kind, seg, paths, rng)
        turns += [{"from": HUMAN, "value": human}, {"from": GPT, "value": gpt}]
        inputs += ins
        outputs += outs
    if describe:
        forms = _caption_forms(chain[-1][0].caption)
        turns += [{"from": HUMAN, "value": rng.choice(DESCRIBE_HUMAN)},
                  {"from": GPT, "value": rng.choice(DESCRIBE_GPT).format(**forms)}]
    return {"id": cid, "type": kind, "conversations": turns, "inputs": inputs, "outputs": outputs}


def _plan_x2x(key: str, cuts: list[tuple[_Segment, dict]], types: tuple[str, ...], rounds: int, seed: int) -> list[dict]:
    """Conversations of one source: per segment and type, 1..rounds rounds (this segment,
    the next usable ones of the video, then one describe round if segments run out)."""
    out = []
    for pos, (seg, paths) in enumerate(cuts):
        for kind in types:
            if not _usable(kind, paths):
                continue
            cid = f"{key}:{seg.index}:{kind}"
            wanted = random.Random(f"{seed}:{cid}:rounds").randint(1, rounds)
            chain = [(seg, paths)] + [c for c in cuts[pos + 1:] if _usable(kind, c[1])][: wanted - 1]
            out.append(_conversation(cid, kind, chain, len(chain) < wanted, seed))
    return out


def build_x2x(sources: Iterable[dict], root: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0,
              rounds: int = 2, heldout: tuple[int, ...] = PAPER_HELDOUT, heldout_rate: float = 0.01,
              types: tuple[str, ...] = X2X_TYPES, max_clip_seconds: float = 8.0, min_seconds: float = 1.0,
              audio_rate: int = IMAGEBIND_SAMPLE_RATE, shard: tuple[int, int] = (0, 1),
              max_sources: int | None = None) -> BuildReport:
    """X-to-X conversations -> `conversations.jsonl` (train) and `heldout.jsonl` (evaluation).

    Held-out split: a source (a whole video, so no clip of it reaches training) is held out
    when its id's hash falls below `heldout_rate` and some type it yields still has room in
    `heldout` (counts in X2X_TYPES order). Its conversations fill those quotas; those of
    full types are dropped. So the split takes the first N per type among the videos the
    hash picks, in source order: deterministic, streaming, disjoint from training. Use
    `heldout_rate=1` on a small set so the first videos fill it; a shortfall is reported.
    Audio types need sound (not silent) in the segment, VID2VID two frames.
    """
    unknown = set(types) - set(X2X_TYPES)
    if unknown or len(heldout) != len(X2X_TYPES) or rounds < 1:
        raise ValueError(f"bad build_x2x arguments: unknown types {sorted(unknown)}, heldout {heldout}, rounds {rounds}")
    out_dir, root = Path(out_dir), Path(root)
    params = dict(seed=seed, rounds=rounds, heldout=heldout, heldout_rate=heldout_rate, types=types,
                  max_clip_seconds=max_clip_seconds, min_seconds=min_seconds, audio_rate=audio_rate, shard=shard)
    run = _Run(out_dir, "x2x", ("conversations.jsonl", "heldout.jsonl"), params,
               {"room": dict(zip(X2X_TYPES, heldout))})
    names = {a for kind in types for a in [*ROLES[kind][0].values(), ROLES[kind][1]] if a} | (
        set(WHERE) if "VID2IMG" in types else set())
    room, counts = run.state["room"], run.counts

    def process(rel: str, path: Path, source: dict) -> None:
        info = media.probe_video(path)
        key = _key(rel)
        cuts = []
        for seg in _segments(rel, source, info.duration, max_clip_seconds, min_seconds, run.skipped):
            folder = out_dir / "media" / "x2x" / key / str(seg.index)
            paths = _cut(path, seg, folder, names, audio_rate)
            cuts.append((seg, {a: p.relative_to(out_dir).as_posix() for a, p in paths.items()}))
        plan = _plan_x2x(key, cuts, types, rounds, seed)
        held = _bucket(key) < heldout_rate and any(room[c["type"]] > 0 for c in plan)
        for conv in plan:
            if not held:
                split = "train"
            elif room[conv["type"]] > 0:
                room[conv["type"]] -= 1
                split = "heldout"
            else:
                split = "dropped"  # a held-out video's surplus: never used for training
            counts[f"{split}/{conv['type']}"] += 1
            if split != "dropped":
                run.write("conversations.jsonl" if split == "train" else "heldout.jsonl", conv)
        counts["videos"] += 1

    done = _run_sources(sources, run, root, process, shard, max_sources)
    short = {t: n for t, n in room.items() if n > 0 and t in types}
    if done and short:
        log.warning("held-out split short of its composition by %s: raise --heldout-rate or lower --heldout", short)
    return BuildReport(run.state["next_source"], dict(counts), run.skipped, done, short)


# -------------------------------------------------------------------------- interleaved
def even_chunks(duration: float, n: int) -> list[tuple[float, float]]:
    """n equal consecutive spans covering [0, duration] (the paper's even sampling)."""
    return [(duration * k / n, duration * (k + 1) / n) for k in range(n)]


def _chunk_caption(segments: list[tuple[float, float | None, str]], start: float, end: float, duration: float) -> str | None:
    """The caption of the segment overlapping [start, end) most (nearest if none overlaps)."""
    best, best_score = None, None
    for s, e, caption in segments:
        if not str(caption).strip():
            continue
        e = duration if e is None else e
        overlap = min(end, e) - max(start, s)
        score = overlap if overlap > 0 else -abs((s + e) / 2 - (start + end) / 2) - duration
        if best_score is None or score > best_score:
            best, best_score = str(caption).strip(), score
    return best


def build_interleaved(sources: Iterable[dict], root: str | os.PathLike, out_dir: str | os.PathLike, *, n: int = 3,
                      max_clip_seconds: float = 8.0, audio_rate: int = IMAGEBIND_SAMPLE_RATE,
                      shard: tuple[int, int] = (0, 1), max_sources: int | None = None) -> BuildReport:
    """Interleaved sequences -> `interleaved.jsonl`: per video, n chunks evenly spaced over its
    duration, each with its middle frame (PNG), its audio (WAV), its clip (silent MP4, the
    middle `max_clip_seconds` of a longer chunk; start/end say what was cut) and the caption
    of the segment overlapping it most. Videos without an audio track, or all silent, are
    skipped and counted (NoAudio, SilentAudio)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir, root = Path(out_dir), Path(root)
    params = dict(n=n, max_clip_seconds=max_clip_seconds, audio_rate=audio_rate, shard=shard)
    run = _Run(out_dir, "interleaved", ("interleaved.jsonl",), params, {})
    counts = run.counts

    def process(rel: str, path: Path, source: dict) -> None:
        info = media.probe_video(path)
        if not info.has_audio:
            raise _SkipSource("NoAudio", "the video has no audio track")
        key, chunks, silent = _key(rel), [], True
        for k, (start, end) in enumerate(even_chunks(info.duration, n)):
            caption = _chunk_caption(source.get("segments") or [], start, end, info.duration)
            if caption is None:
                raise _SkipSource("NoCaption", "the source has no caption")
            if end - start > max_clip_seconds:
                start = (start + end - max_clip_seconds) / 2
                end = start + max_clip_seconds
            video = _read_span(path, start, end, audio_rate)
            silent = silent and video.audio.silent
            stem = f"media/interleaved/{key}/{k}"
            media.write_png(out_dir / f"{stem}.png", video.frames[len(video.frames) // 2])
            media.write_wav(out_dir / f"{stem}.wav", _mono(video.audio), video.audio.sample_rate)
            media.write_mp4(out_dir / f"{stem}.mp4", video.frames, video.fps)
            chunks.append({"image": f"{stem}.png", "audio": f"{stem}.wav", "video": f"{stem}.mp4",
                           "caption": caption, "start": round(start, 6), "end": round(end, 6)})
        if silent:
            raise _SkipSource("SilentAudio", "the audio track is silent")
        run.write("interleaved.jsonl", {"id": key, "source": rel, "chunks": chunks})
        counts["videos"] += 1
        counts["chunks"] += len(chunks)

    done = _run_sources(sources, run, root, process, shard, max_sources)
    return BuildReport(run.state["next_source"], dict(counts), run.skipped, done)


# ---------------------------------------------------------------------------------- CLI
def _sources(args) -> Iterator[dict]:
    fmt = args.format or ("activitynet" if Path(args.sources).suffix.lower() == ".json" else "webvid")
    if fmt == "activitynet":
        return activitynet_sources(args.sources, args.video_dir)
    return webvid_sources(args.sources)


def main(argv: list[str] | None = None) -> BuildReport:
    parser = argparse.ArgumentParser(prog="python -m train.builders", description=__doc__.split("\n\n")[1])
    parser.add_argument("builder", choices=["x2x", "interleaved"])
    parser.add_argument("--sources", required=True, help="WebVid CSV/JSONL or ActivityNet Captions JSON")
    parser.add_argument("--format", choices=["webvid", "activitynet"], help="default: .json is activitynet")
    parser.add_argument("--video-dir", default="", help="ActivityNet: folder of <video_id>.mp4, relative to --root")
    parser.add_argument("--root", required=True, help="folder the sources' video paths are relative to")
    parser.add_argument("--out", required=True, help="output folder (manifests, media/, state); resumes if it has a state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="x2x: at most this many rounds per conversation")
    parser.add_argument("--heldout", default=",".join(map(str, PAPER_HELDOUT)), help=f"x2x: per {'/'.join(X2X_TYPES)}")
    parser.add_argument("--heldout-rate", type=float, default=0.01, help="x2x: share of videos eligible for held-out")
    parser.add_argument("--types", default=",".join(X2X_TYPES), help="x2x: conversation types to build")
    parser.add_argument("--n", type=int, default=3, help="interleaved: chunks per video")
    parser.add_argument("--max-clip-seconds", type=float, default=8.0)
    parser.add_argument("--shard", default="0/1", help="i/k: only sources with index %% k == i (one --out per shard)")
    parser.add_argument("--max-sources", type=int, help="stop after this many sources (resume later)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shard = tuple(int(x) for x in args.shard.split("/"))
    common = dict(max_clip_seconds=args.max_clip_seconds, shard=shard, max_sources=args.max_sources)
    try:
        if args.builder == "x2x":
            report = build_x2x(_sources(args), args.root, args.out, seed=args.seed, rounds=args.rounds,
                               heldout=tuple(int(x) for x in args.heldout.split(",")), heldout_rate=args.heldout_rate,
                               types=tuple(args.types.split(",")), **common)
        else:
            report = build_interleaved(_sources(args), args.root, args.out, n=args.n, **common)
    except XVilaError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{report.sources} sources{'' if report.done else ' (stopped early; run again to resume)'}: "
          f"{json.dumps(report.counts, sort_keys=True)}")
    if report.heldout_short:
        print(f"held-out split short by {report.heldout_short}")
    print(report.skipped.summary())
    return report


if __name__ == "__main__":
    main()
