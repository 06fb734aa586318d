"""Tests of xvila.media_worker: a crash, a hang or a blow-up while decoding becomes a
MediaError, the caller survives, and the next request is served.

Each test that breaks a worker uses its own `MediaWorker`; the process-wide one that
`preprocess` uses is shared (it is started once, as in the server).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import media_factory
from media_factory import colour_frames, png_claiming_size, tone, write_video

from xvila import media as m
from xvila import media_worker as mw
from xvila.encoders import imagebind_preprocess as pre


@pytest.fixture
def worker():
    w = mw.MediaWorker(mw.WorkerLimits(memory_bytes=512 << 20, cpu_seconds=30, wall_seconds=30))
    yield w
    w.close()


@pytest.fixture
def files(tmp_path):
    return {
        "image": m.write_png(tmp_path / "photo.png", colour_frames(1, 40, 56)[0]),
        "video": write_video(tmp_path / "clip.mp4", colour_frames(12)),
        "audio": m.write_wav(tmp_path / "voice.wav", tone((440.0, 660.0), 1.0, 22050), 22050),
    }


def test_a_crash_in_the_worker_is_a_media_error_and_the_next_request_works(worker, files):
    assert worker.call(m.read_image, str(files["image"])).size == (56, 40)
    first = worker.pid
    with pytest.raises(m.DecoderCrashError) as info:
        worker.call(os.abort, what="evil.m4a")  # what a segfault in FFmpeg does to a process
    assert "evil.m4a" in str(info.value) and "crashed" in str(info.value) and "SIGABRT" in str(info.value)
    assert worker.pid is None  # gone; the next call starts a fresh one
    assert worker.call(m.read_image, str(files["image"])).size == (56, 40)
    assert worker.pid not in (None, first)


def test_a_real_segfault_in_pyav_is_contained(monkeypatch, files):
    # A native crash, not a simulated one: PyAV 18 reading an 8-channel planar frame.
    monkeypatch.setenv("PYTHONPATH", str(Path(media_factory.__file__).parent))  # the worker imports it
    w = mw.MediaWorker()
    try:
        with pytest.raises(m.DecoderCrashError, match="SIGSEGV"):
            w.call(media_factory.pyav_planar_7_1_to_ndarray, what="surround.m4a")
        assert w.call(m.read_audio, str(files["audio"])).samples.shape == (2, 22050)
    finally:
        w.close()


def test_a_hang_is_stopped_by_the_wall_clock_limit(files):
    w = mw.MediaWorker(mw.WorkerLimits(wall_seconds=1.0))
    try:
        w.call(len, "warm")  # start-up is not counted against the limit
        began = time.monotonic()
        with pytest.raises(m.DecodeTimeoutError) as info:
            w.call(time.sleep, 60, what="slow.mp4")
        assert time.monotonic() - began < 10
        assert "slow.mp4" in str(info.value) and "1 s" in str(info.value)
        assert w.call(len, "again") == 5
    finally:
        w.close()


def test_cpu_time_is_limited_per_request():
    w = mw.MediaWorker(mw.WorkerLimits(cpu_seconds=1, wall_seconds=60))
    try:
        assert w.call(sum, range(1000)) == 499500  # within the limit, on a warm worker
        with pytest.raises(m.DecodeTimeoutError) as info:
            w.call(sum, range(10**12), what="spin.gif")
        assert "CPU time" in str(info.value) and "spin.gif" in str(info.value)
        assert w.call(sum, range(10)) == 45
    finally:
        w.close()


def test_a_memory_blow_up_is_media_memory_error_and_the_worker_survives(worker):
    assert worker.call(len, "x") == 1
    pid = worker.pid
    with pytest.raises(m.MediaMemoryError) as info:
        worker.call(bytearray, 4 << 30, what="bomb.png")  # 4 GiB against a 512 MiB limit
    assert "bomb.png" in str(info.value) and "memory" in str(info.value)
    assert worker.call(len, "xy") == 2 and worker.pid == pid


def test_a_png_whose_pixels_do_not_fit_the_memory_limit(worker, tmp_path):
    # 8000x8000 is within the pixel budget, but its pixels need ~256 MB; with 128 MB the
    # worker's address-space limit stops PIL's allocation, inside read_image.
    small = mw.MediaWorker(mw.WorkerLimits(memory_bytes=128 << 20))
    try:
        path = png_claiming_size(tmp_path / "huge.png", 8000, 8000)
        with pytest.raises(m.MediaMemoryError) as info:
            small.call(m.read_image, str(path))
        assert "huge.png" in str(info.value)
    finally:
        small.close()


def test_typed_errors_from_the_worker_keep_their_class(worker, tmp_path):
    (tmp_path / "notes.mp4").write_text("hello, this is not a video\n")
    with pytest.raises(m.FormatMismatchError) as info:
        worker.call(pre.load_video, str(tmp_path / "notes.mp4"))
    assert "notes.mp4" in str(info.value)
    with pytest.raises(m.MediaNotFoundError):
        mw.preprocess(tmp_path / "missing.png", "image")


@pytest.mark.parametrize("kind", ["image", "video", "audio"])
def test_isolated_and_in_process_preprocessing_agree(files, kind):
    isolated = mw.preprocess(files[kind], kind)
    here = mw.preprocess(files[kind], kind, isolated=False)
    assert isolated.shape == here.shape == {"image": (3, 224, 224), "video": (15, 3, 2, 224, 224),
                                            "audio": (3, 1, 128, 204)}[kind]
    torch.testing.assert_close(isolated, here, rtol=0, atol=0)


def test_a_warm_worker_costs_little_per_request(files):
    mw.preprocess(files["image"], "image")  # started
    began = time.perf_counter()
    for _ in range(10):
        mw.preprocess(files["image"], "image")
    assert (time.perf_counter() - began) / 10 < 0.5  # ~5 ms measured; a restart costs ~2 s


def test_unknown_kind_is_refused(files):
    with pytest.raises(m.UnsupportedFormatError, match="unknown media kind"):
        mw.preprocess(files["image"], "hologram")


def test_the_default_is_the_worker_and_can_be_switched(monkeypatch, files):
    calls = []
    real = mw.MediaWorker.call

    def spy(self, fn, *args, **kwargs):
        calls.append(fn)
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(mw.MediaWorker, "call", spy)
    mw.preprocess(files["image"], "image")
    assert calls == [mw._load]
    monkeypatch.setattr(mw, "_isolated", mw._isolated)  # restored after the test
    mw.set_default_isolation(False)
    mw.preprocess(files["image"], "image")
    assert calls == [mw._load]


@pytest.fixture(scope="module")
def model():
    from xvila import XVila

    return XVila.from_pretrained("tiny-random", device="cpu")


def test_encode_media_decodes_in_the_worker(monkeypatch, files, model):
    seen = []
    real = mw.MediaWorker.call
    monkeypatch.setattr(mw.MediaWorker, "call", lambda self, fn, *a, **k: seen.append(a[1]) or real(self, fn, *a, **k))
    out = model.encode_media(str(files["audio"]), "audio")
    assert seen == ["audio"] and out.modality == "audio" and np.isfinite(out.embeds.float().numpy()).all()


def test_a_chat_turn_whose_upload_crashes_the_decoder_fails_alone(monkeypatch, files, model, tmp_path):
    # The first request's worker dies as a segfaulting FFmpeg would; the turn fails with the
    # typed error the demo shows, the history is untouched, and the next turn is served.
    crashed = []
    real = mw.MediaWorker.call

    def crash_once(self, fn, *args, **kwargs):
        if not crashed:
            crashed.append(True)
            return real(self, os.abort, what=kwargs.get("what", "the file"))
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(mw.MediaWorker, "call", crash_once)
    chat = model.new_chat(outputs_dir=tmp_path)
    with pytest.raises(m.DecoderCrashError, match="photo.png"):
        list(chat.send("What is this?", media=[str(files["image"])], output="text", max_new_tokens=2))
    assert chat.records == []
    events = list(chat.send("What is this?", media=[str(files["image"])], output="text", max_new_tokens=2))
    assert len(chat.records) == 1 and events
