"""A short fixed-seed run of bench/fuzz_media.py: damaged files of every format, through
every public reader, give typed errors only; no decoder crash, no untyped exception."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from xvila import media as m
from xvila.media_worker import MediaWorker

FUZZ = Path(__file__).resolve().parent.parent / "bench" / "fuzz_media.py"
CASES = 2000  # ~45 s on 2 shared CPU cores


@pytest.fixture(scope="module")
def fuzz_media():
    spec = importlib.util.spec_from_file_location("fuzz_media", FUZZ)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_outcomes_are_classified(fuzz_media):
    assert fuzz_media.classify(None) == "read"
    assert fuzz_media.classify(m.CorruptMediaError("x")) == "typed"
    assert fuzz_media.classify(m.MediaMemoryError("x")) == "memory"
    assert fuzz_media.classify(m.DecoderCrashError("x")) == "crash"
    assert fuzz_media.classify(m.DecodeTimeoutError("x")) == "hang"
    assert fuzz_media.classify(AttributeError("x")) == "untyped"


def test_every_format_has_a_seed_that_reads(fuzz_media, tmp_path):
    seeds = fuzz_media.make_seeds()
    assert {Path(n).suffix for n in seeds} >= {".png", ".jpg", ".gif", ".webp", ".mp4", ".webm", ".mov", ".avi",
                                               ".mkv", ".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"}
    assert "seed-7.1.m4a" in seeds
    worker = MediaWorker()  # a crash (as 7.1 audio once caused) fails this test, not the run
    try:
        for name, data in seeds.items():  # unmutated seeds must read, or the fuzz tests nothing
            path = tmp_path / name
            path.write_bytes(data)
            for reader in fuzz_media.readers_for(name):
                try:
                    worker.call(reader, str(path), what=name)
                except m.EmptyAudioError:  # the audio readers on the two videos without sound
                    assert name in ("seed.mp4", "seed.avi") and "audio" in reader.__name__
    finally:
        worker.close()


def test_short_fuzz_run_has_no_untyped_errors_and_no_crashes(fuzz_media, tmp_path):
    report = fuzz_media.fuzz(CASES, seed_value=0, out=tmp_path, timeout=20.0)
    counts = report.counts
    saved = [(c["outcome"], c["reader"], c["seed"], c["mutations"], c["error"]) for c in report.saved]
    assert counts["untyped"] == 0 and counts["crash"] == 0, saved
    assert sum(counts.values()) == CASES
    # Not vacuous: damaged files were refused, others still read, and every reader ran.
    assert counts["typed"] > CASES // 4 and counts["read"] > CASES // 10
    assert len(report.by_reader) == 7
