"""Mutation fuzzing of the media readers: every failure must be a typed MediaError.

    python bench/fuzz_media.py --cases 10000 --seed 0 --out fuzz-out

Seed files of every supported format are made here (PIL, PyAV, soundfile); each case
mutates one (bit flips, truncation, inserted/deleted/duplicated runs, a scrambled header,
huge declared sizes) and hands it to one public reader (`xvila.media.read_*`,
`probe_video`, and the ImageBind loaders the chat uses) inside a `MediaWorker` with a
5 s wall-clock limit, so that a crash or a hang ends one case, not the run. Outcomes:

  read        the reader returned a result
  typed       a MediaError (the expected refusal of a damaged file)
  memory      MediaMemoryError: the worker's address-space limit was reached (typed too)
  untyped     any other exception: a bug; the file is saved as a reproducer
  crash       the worker died (a native crash, contained by the worker); saved
  hang        the case took longer than the timeout; saved

Case i is reproducible alone (`--only i`): its random choices come from (seed, i).
Writes summary.json and the reproducers (listed in reproducers/reproducers.jsonl) under --out.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xvila import media  # noqa: E402
from xvila.encoders import imagebind_preprocess as pre  # noqa: E402
from xvila.media_worker import MediaWorker, WorkerLimits  # noqa: E402

OUTCOMES = ("read", "typed", "memory", "untyped", "crash", "hang")
SAVED = ("untyped", "crash", "hang")

# Which public readers take which seed (by extension).
IMAGE_READERS = (media.read_image, pre.load_image)
VIDEO_READERS = (media.probe_video, media.read_video, pre.load_video)
AUDIO_READERS = (media.read_audio, pre.load_audio)


# ----------------------------------------------------------------------------- seeds
def _frames(n: int = 8, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 4 * i, axis=1) for i in range(n)])


def _tone(seconds: float = 0.5, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.4 * np.sin(2 * np.pi * (440 + 110 * c) * t) for c in range(channels)]).astype(np.float32)


def _video(fmt: str, codec: str, pix_fmt: str = "yuv420p", audio: str | None = None) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=8)
        frames = _frames()
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        # Every stream is added before the first packet is written (the header goes out then).
        sound = _audio_stream(out, audio, 48000 if audio == "libopus" else 22050, 2) if audio else None
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if sound is not None:
            _encode_tone(out, sound)
    return buf.getvalue()


def _audio_stream(out, codec: str, rate: int, channels: int):
    stream = out.add_stream(codec, rate=rate, layout="mono" if channels == 1 else "stereo")
    stream.codec_context.options = {"strict": "experimental"}  # FFmpeg's own vorbis encoder
    return stream


def _encode_tone(out, stream) -> None:
    rate, layout = stream.codec_context.sample_rate, stream.codec_context.layout.name
    samples = _tone(0.5, rate, stream.codec_context.channels)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def _audio(fmt: str, codec: str, rate: int = 22050, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        _encode_tone(out, _audio_stream(out, codec, rate, channels))
    return buf.getvalue()


def _surround() -> bytes:
    """7.1 AAC, fed packed (PyAV 18 cannot build 8-channel planar frames safely)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="ipod") as out:
        stream = out.add_stream("aac", rate=22050, layout="7.1")
        samples = _tone(0.5, 22050, 8)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T.reshape(1, -1)), format="flt", layout="7.1")
        frame.sample_rate, frame.pts = 22050, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def _image(fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(f) for f in _frames(4)]
    if kwargs.pop("animated", False):
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
    else:
        frames[0].save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _soundfile(fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, _tone(0.5, 16000, 2).T, 16000, format=fmt, subtype=subtype)
    return buf.getvalue()


def make_seeds() -> dict[str, bytes]:
    """name with extension -> file bytes; formats whose encoder is missing are left out."""
    makers = {
        "seed.png": lambda: _image("PNG"),
        "seed.jpg": lambda: _image("JPEG", quality=80),
        "seed.gif": lambda: _image("GIF", animated=True),
        "seed.webp": lambda: _image("WEBP", animated=True),
        "seed.mp4": lambda: _video("mp4", "libx264"),
        "seed-aac.mp4": lambda: _video("mp4", "libx264", audio="aac"),
        "seed.webm": lambda: _video("webm", "libvpx", audio="libopus"),
        "seed.mov": lambda: _video("mov", "mjpeg", "yuvj420p", audio="aac"),
        "seed.avi": lambda: _video("avi", "mpeg4"),
        "seed.mkv": lambda: _video("matroska", "libx264", audio="flac"),
        "seed.wav": lambda: _soundfile("WAV", "PCM_16"),
        "seed.flac": lambda: _soundfile("FLAC", "PCM_16"),
        "seed.mp3": lambda: _audio("mp3", "libmp3lame"),
        "seed.ogg": lambda: _audio("ogg", "vorbis", 44100, 2),
        "seed.opus": lambda: _audio("opus", "libopus", 48000),
        "seed.m4a": lambda: _audio("ipod", "aac"),
        "seed-7.1.m4a": _surround,
    }
    seeds = {}
    for name, make in makers.items():
        try:
            seeds[name] = make()
        except (av.FFmpegError, ValueError, OSError) as err:  # an encoder this FFmpeg lacks
            print(f"fuzz: no seed {name}: {err}", file=sys.stderr)
    return seeds


def readers_for(name: str) -> tuple:
    ext = Path(name).suffix
    found = []
    if ext in media.IMAGE_EXTENSIONS:
        found += IMAGE_READERS
    if ext in media.VIDEO_EXTENSIONS:
        found += VIDEO_READERS
    if ext in media.AUDIO_EXTENSIONS or (ext in media.VIDEO_EXTENSIONS and ext != ".gif"):
        found += AUDIO_READERS
    return tuple(found)


# ------------------------------------------------------------------------- mutations
def _flip_bits(data: bytearray, rng: random.Random) -> str:
    n = rng.choice((1, 2, 4, 16, 64))
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return f"flip {n} bits"


def _truncate(data: bytearray, rng: random.Random) -> str:
    n = rng.randrange(1, len(data))
    del data[n:]
    return f"truncate to {n}"


def _insert(data: bytearray, rng: random.Random) -> str:
    i, n = rng.randrange(len(data)), rng.choice((1, 4, 16, 256, 4096))
    data[i:i] = rng.randbytes(n) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * n
    return f"insert {n} at {i}"


def _delete(data: bytearray, rng: random.Random) -> str:
    i = rng.randrange(len(data))
    n = rng.choice((1, 4, 16, 256))
    del data[i:i + n]
    return f"delete {n} at {i}"


def _duplicate(data: bytearray, rng: random.Random) -> str:
    i = rng.randrange(len(data))
    chunk = data[i:i + rng.choice((16, 256, 2048))]
    j = rng.randrange(len(data))
    data[j:j] = chunk
    return f"copy {len(chunk)} from {i} to {j}"


def _scramble_header(data: bytearray, rng: random.Random) -> str:
    n = rng.randrange(4, 64)
    for _ in range(n // 4):
        data[rng.randrange(min(len(data), 256))] = rng.randrange(256)
    return f"scramble header ({n // 4} bytes)"


def _huge_size(data: bytearray, rng: random.Random) -> str:
    """A large integer (a declared size, count, width...) over 2 or 4 bytes near the start."""
    width = rng.choice((2, 4))
    i = rng.randrange(max(1, min(len(data), 1024) - width))
    value = rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 0x8000, 0xFFFF, 0x3FFF, 0))
    order = rng.choice(("big", "little"))
    data[i:i + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, order)
    return f"set {width} bytes at {i} to {value:#x} ({order})"


MUTATIONS = (_flip_bits, _truncate, _insert, _delete, _duplicate, _scramble_header, _huge_size)


def mutate(seed: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    data = bytearray(seed)
    done = [rng.choice(MUTATIONS)(data, rng) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    return bytes(data or b"\0"), done


# ------------------------------------------------------------------------------- run
@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    by_reader: dict = field(default_factory=dict)
    untyped_kinds: Counter = field(default_factory=Counter)
    peak_rss: list[int] = field(default_factory=list)
    saved: list[dict] = field(default_factory=list)


def classify(err: BaseException | None) -> str:
    if err is None:
        return "read"
    if isinstance(err, media.DecoderCrashError):
        return "crash"
    if isinstance(err, media.DecodeTimeoutError):
        return "hang"
    if isinstance(err, media.MediaMemoryError):
        return "memory"
    return "typed" if isinstance(err, media.MediaError) else "untyped"


def run_case(i: int, seed_value: int, seeds: dict[str, bytes], folder: Path, worker: MediaWorker) -> dict:
    rng = random.Random(f"{seed_value}-{i}")
    name = rng.choice(sorted(seeds))
    reader = rng.choice(readers_for(name))
    data, mutations = mutate(seeds[name], rng)
    path = folder / f"case{Path(name).suffix}"
    path.write_bytes(data)
    err: BaseException | None = None
    try:
        worker.call(reader, str(path), what=path.name)
    except Exception as caught:  # noqa: BLE001 - classifying every outcome is the point
        err = caught
    return {"case": i, "seed": name, "reader": f"{reader.__module__}.{reader.__name__}", "mutations": mutations,
            "outcome": classify(err), "error": f"{type(err).__name__}: {err}" if err else None, "data": data}


def fuzz(cases: int, seed_value: int = 0, out: Path | None = None, timeout: float = 5.0,
         memory_mb: int = 2048, only: int | None = None, progress: bool = False) -> Report:
    seeds = make_seeds()
    report = Report()
    worker = MediaWorker(WorkerLimits(memory_bytes=memory_mb << 20, cpu_seconds=timeout, wall_seconds=timeout))
    indices = [only] if only is not None else range(cases)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="fuzz-media-") as tmp:
            for n, i in enumerate(indices):
                case = run_case(i, seed_value, seeds, Path(tmp), worker)
                _record(report, case, worker.peak_rss, out)
                if progress and (n + 1) % 500 == 0:
                    print(f"fuzz: {n + 1} cases, {time.monotonic() - started:.0f} s, {dict(report.counts)}",
                          file=sys.stderr, flush=True)
    finally:
        worker.close()
    return report


def _record(report: Report, case: dict, peak: int, out: Path | None) -> None:
    outcome = case["outcome"]
    report.counts[outcome] += 1
    report.by_reader.setdefault(case["reader"], Counter())[outcome] += 1
    if outcome not in ("crash", "hang"):  # the worker was restarted: its peak is not this case's
        report.peak_rss.append(peak)
    if outcome == "untyped":
        report.untyped_kinds[case["error"].split(":")[0]] += 1
    if outcome in SAVED:
        data = case.pop("data")
        if out is not None:
            folder = out / "reproducers"
            folder.mkdir(parents=True, exist_ok=True)
            file = folder / f"{outcome}-{case['case']:06d}-{case['reader'].rsplit('.', 1)[-1]}{Path(case['seed']).suffix}"
            file.write_bytes(data)
            case["file"] = file.name
            with (folder / "reproducers.jsonl").open("a") as index:  # kept even if the run is stopped
                index.write(json.dumps(case) + "\n")
        report.saved.append(case)


def summary(report: Report, cases: int, seconds: float, seed_value: int, memory_mb: int, timeout: float) -> dict:
    peaks = np.array(report.peak_rss or [0]) / 2**20
    return {
        "cases": cases, "seed": seed_value, "seconds": round(seconds, 1),
        "outcomes": {k: report.counts.get(k, 0) for k in OUTCOMES},
        "by_reader": {r: dict(c) for r, c in sorted(report.by_reader.items())},
        "untyped_kinds": dict(report.untyped_kinds),
        "worker_peak_rss_mib": {"median": round(float(np.median(peaks)), 1), "max": round(float(peaks.max()), 1)},
        "worker_limits": {"address_space_extra_mib": memory_mb, "timeout_s": timeout},
        "fuzzer_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "saved": [{k: v for k, v in c.items() if k != "data"} for c in report.saved],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Mutation fuzzing of xvila.media's readers.")
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("fuzz-out"))
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per case before it counts as a hang")
    p.add_argument("--memory-mb", type=int, default=2048, help="the worker's address space on top of its start-up")
    p.add_argument("--only", type=int, help="run this one case (to reproduce it)")
    args = p.parse_args(argv)
    started = time.monotonic()
    report = fuzz(args.cases, args.seed, args.out, args.timeout, args.memory_mb, args.only, progress=True)
    result = summary(report, sum(report.counts.values()), time.monotonic() - started, args.seed, args.memory_mb,
                     args.timeout)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("saved", "by_reader")}, indent=1))
    return 1 if any(result["outcomes"][k] for k in SAVED) else 0


if __name__ == "__main__":
    sys.exit(main())
