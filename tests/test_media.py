"""Tests of xvila.media: typed errors for every bad file, and round trips that check content.

Every file is made here, in tmp_path, with real encoders (see media_factory.py).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from media_factory import (
    COLOURS,
    SURROUND_FREQS,
    audio_only_mp4,
    colour_frames,
    dominant_frequency,
    nearest_colour,
    png_claiming_size,
    tone,
    write_audio,
    write_surround_m4a,
    write_video,
)
from PIL import Image, ImageFile

from xvila import media as m
from xvila.errors import XVilaError

READERS = {"image": m.read_image, "video": m.read_video, "audio": m.read_audio}


def raises(cls: type[m.MediaError], path: Path, fn, *args, **kwargs) -> m.MediaError:
    """Assert `fn` raises exactly `cls` and that the message names the file."""
    with pytest.raises(m.MediaError) as info:
        fn(path, *args, **kwargs)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert path.name in str(info.value)
    return info.value


@pytest.fixture
def count_decoded(monkeypatch):
    """Count the frames the module decodes (video and audio) through its single decode loop."""
    counter = {"n": 0}
    real = m._iter_frames

    def counting(container, stream):
        for frame in real(container, stream):
            counter["n"] += 1
            yield frame

    monkeypatch.setattr(m, "_iter_frames", counting)
    return counter


# ------------------------------------------------------------------------ error cases
def test_errors_are_value_errors_and_xvila_errors():
    assert issubclass(m.CorruptMediaError, m.MediaError)
    assert issubclass(m.MediaError, XVilaError) and issubclass(m.MediaError, ValueError)


@pytest.mark.parametrize("kind,name", [("image", "photo.jpg"), ("video", "clip.mp4"), ("audio", "voice.wav")])
def test_missing_file(tmp_path, kind, name):
    raises(m.MediaNotFoundError, tmp_path / name, READERS[kind])


def test_folder_is_not_a_file(tmp_path):
    folder = tmp_path / "album.png"
    folder.mkdir()
    raises(m.MediaNotFoundError, folder, m.read_image)


@pytest.mark.parametrize("kind,name", [("image", "photo.jpg"), ("video", "clip.mp4"), ("audio", "voice.wav")])
def test_empty_file(tmp_path, kind, name):
    path = tmp_path / name
    path.write_bytes(b"")
    err = raises(m.EmptyMediaError, path, READERS[kind])
    assert "0 bytes" in str(err)


def test_truncated_png(tmp_path):
    path = m.write_png(tmp_path / "noise.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    raises(m.CorruptMediaError, path, m.read_image)


def test_truncated_mp4_header(tmp_path):
    # Only the first 200 bytes: the moov atom (the index of the file) is cut.
    path = m.write_mp4(tmp_path / "clip.mp4", colour_frames(), 8)
    path.write_bytes(path.read_bytes()[:200])
    raises(m.CorruptMediaError, path, m.read_video)


def test_truncated_mp4_without_moov(tmp_path):
    # No faststart: moov is at the end, so cutting in half removes it.
    path = write_video(tmp_path / "clip.mp4", colour_frames(48))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    raises(m.CorruptMediaError, path, m.probe_video)


def test_truncated_mp4_half_of_the_frames(tmp_path):
    # Faststart: the index survives the cut, the frame data does not; decoding fails part-way.
    path = m.write_mp4(tmp_path / "clip.mp4", colour_frames(48), 8, m.Audio(tone((440.0,) * 2, 6.0, 44100), 44100))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    raises(m.CorruptMediaError, path, m.read_video)


def test_truncated_wav(tmp_path):
    path = m.write_wav(tmp_path / "voice.wav", tone((440.0, 440.0), 1.0, 16000), 16000)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = raises(m.CorruptMediaError, path, m.read_audio)
    assert "incomplete" in str(err)


def test_png_saved_as_mp4(tmp_path):
    path = tmp_path / "clip.mp4"
    m.write_png(path.with_suffix(".png"), np.zeros((8, 8, 3), np.uint8)).rename(path)
    err = raises(m.FormatMismatchError, path, m.read_video)
    assert str(err) == "clip.mp4: this is a PNG image, not a video; rename it to .png or upload a video."
    raises(m.FormatMismatchError, path, m.probe_video)


def test_text_saved_as_jpg(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("Hello, this is not a picture.\n")
    err = raises(m.FormatMismatchError, path, m.read_image)
    assert "text file" in str(err)


def test_wav_saved_as_png(tmp_path):
    path = tmp_path / "photo.png"
    m.write_wav(path.with_suffix(".wav"), tone((440.0,), 0.1, 16000), 16000).rename(path)
    err = raises(m.FormatMismatchError, path, m.read_image)
    assert "WAV audio" in str(err) and ".wav" in str(err)


@pytest.mark.parametrize("name", ["report.docx", "data.xyz", "README"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 whatever")
    raises(m.UnsupportedFormatError, path, m.read_image)
    with pytest.raises(m.UnsupportedFormatError, match=name):
        m.media_kind(path)


def test_wrong_reader_for_extension(tmp_path):
    path = m.write_wav(tmp_path / "voice.wav", tone((440.0,), 0.1, 16000), 16000)
    raises(m.UnsupportedFormatError, path, m.read_video)


def test_media_kind():
    assert [m.media_kind(p) for p in ("a.PNG", "b.gif", "c.webm", "d.mp3", "e.m4a")] == [
        "image", "image", "video", "audio", "audio",
    ]
    assert ".gif" in m.IMAGE_EXTENSIONS and ".gif" in m.VIDEO_EXTENSIONS


def test_audio_only_mp4_has_no_frames(tmp_path):
    path = audio_only_mp4(tmp_path / "song.mp4")
    raises(m.NoFramesError, path, m.read_video)
    raises(m.NoFramesError, path, m.probe_video)
    assert m.read_audio(path).sample_rate == 44100  # still fine as audio


def test_zero_length_wav(tmp_path):
    path = tmp_path / "voice.wav"
    sf.write(path, np.zeros((0, 1), np.float32), 16000, subtype="PCM_16")
    raises(m.EmptyAudioError, path, m.read_audio)


def test_video_without_audio_track_read_as_audio(tmp_path):
    path = m.write_mp4(tmp_path / "clip.mp4", colour_frames(4), 8)
    raises(m.EmptyAudioError, path, m.read_audio)


def test_silent_audio_is_flagged_not_refused(tmp_path, caplog):
    path = m.write_wav(tmp_path / "quiet.wav", np.zeros((2, 8000), np.float32), 16000)
    with caplog.at_level(logging.WARNING, logger="xvila.media"):
        audio = m.read_audio(path)
    assert audio.silent and audio.samples.shape == (2, 8000)
    assert any("quiet.wav" in r.getMessage() and "silent" in r.getMessage() for r in caplog.records)
    loud = m.read_audio(m.write_wav(tmp_path / "loud.wav", tone((440.0,), 0.5, 16000), 16000))
    assert not loud.silent


# ----------------------------------------------------------------------- budgets
def test_image_over_pixel_budget_from_header(tmp_path, monkeypatch):
    # 9000x9000 = 81 M pixels: over our 64 M default, under PIL's own limits. The pixel data
    # is 1x1, so only a header check can give ImageTooLargeError; decoding is forbidden.
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    path = png_claiming_size(tmp_path / "bomb.png", 9000, 9000)
    err = raises(m.ImageTooLargeError, path, m.read_image)
    assert "9000x9000" in str(err)


def test_image_over_small_budget(tmp_path, monkeypatch):
    path = m.write_png(tmp_path / "photo.png", np.zeros((80, 100, 3), np.uint8))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    raises(m.ImageTooLargeError, path, m.read_image, max_pixels=5000)


def test_pil_bomb_error_and_warning_never_leak(tmp_path):
    huge = png_claiming_size(tmp_path / "huge.png", 20000, 20000)  # PIL itself raises at open
    large = png_claiming_size(tmp_path / "large.png", 12000, 12000)  # PIL itself warns at open
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raises(m.ImageTooLargeError, huge, m.read_image)
        raises(m.ImageTooLargeError, huge, m.read_image, max_pixels=10**9)
        raises(m.ImageTooLargeError, large, m.read_image)
        # Allowed by a bigger budget: no warning escapes, and the bogus data is then found.
        raises(m.CorruptMediaError, large, m.read_image, max_pixels=10**9)


def two_hour_video(path: Path, **kwargs) -> Path:
    """Three frames at 0 s, 3600 s and 7199 s: a 2-hour video in a few kB."""
    return write_video(path, colour_frames(3, 16, 16), 1, pts_seconds=[0, 3600, 7199], **kwargs)


def test_video_over_duration_budget(tmp_path, count_decoded):
    path = two_hour_video(tmp_path / "movie.mp4")
    began = time.perf_counter()
    err = raises(m.VideoTooLongError, path, m.read_video)
    raises(m.VideoTooLongError, path, m.probe_video)
    assert time.perf_counter() - began < 1.0
    assert count_decoded["n"] == 0
    assert "7200" in str(err) and "600" in str(err)
    assert m.probe_video(path, max_duration=8000).duration == pytest.approx(7200, abs=1)


def test_video_over_budget_without_duration_metadata(tmp_path, count_decoded):
    # A "live" Matroska file (as browsers record) has no duration in its header.
    path = two_hour_video(tmp_path / "stream.mkv", fmt="matroska", options={"live": "1"})
    with av.open(str(path)) as c:
        assert c.duration is None
    began = time.perf_counter()
    raises(m.VideoTooLongError, path, m.probe_video)
    raises(m.VideoTooLongError, path, m.read_video)
    assert time.perf_counter() - began < 1.0
    assert count_decoded["n"] == 0


def test_decoding_stops_when_timestamps_pass_budget(tmp_path, monkeypatch, count_decoded):
    # Metadata that lies (says 1 s): the decode loop itself stops at the first frame past budget.
    path = two_hour_video(tmp_path / "movie.mp4")
    monkeypatch.setattr(m, "_metadata_duration", lambda container, stream=None: 1.0)
    raises(m.VideoTooLongError, path, m.read_video)
    assert count_decoded["n"] == 2  # the frame at 0 s and the one at 3600 s, not the third


def test_audio_over_duration_budget(tmp_path):
    path = m.write_wav(tmp_path / "talk.wav", np.zeros((1, 16000 * 3), np.float32), 16000)
    raises(m.AudioTooLongError, path, m.read_audio, max_duration=2.0)


# ------------------------------------------------------------------ round trips
def test_png_round_trip_pixel_equal(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    path = m.write_png(tmp_path / "sub" / "dir" / "noise.png", pixels)  # parent folders created
    image = m.read_image(path)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)


def test_transparent_png_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2, :, :] = (255, 0, 0, 255)  # opaque red top; the bottom is fully transparent
    path = m.write_png(tmp_path / "logo.png", rgba)
    out = np.asarray(m.read_image(path))
    assert (out[:2] == (255, 0, 0)).all() and (out[2:] == 255).all()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.array([[0, 257 * 128], [65535, 65535]], np.uint16)).save(path)
    assert np.asarray(m.read_image(path))[..., 0].tolist() == [[0, 128], [255, 255]]


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (4, 2), (10, 20, 30)).save(path, exif=exif)
    assert m.read_image(path).size == (2, 4)


def test_gif_first_frame_as_image(tmp_path):
    path = tmp_path / "anim.gif"
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=100)
    assert m.read_image(path).getpixel((0, 0)) == (255, 0, 0)


def test_write_mp4_round_trip(tmp_path):
    frames = colour_frames(12, 48, 64)
    path = m.write_mp4(tmp_path / "out" / "clip.mp4", frames, 8)
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.name, v.codec_context.pix_fmt, v.frames) == ("h264", "yuv420p", 12)
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart
    info = m.probe_video(path)
    assert (info.fps, info.width, info.height, info.has_audio) == (8.0, 64, 48, False)
    assert info.duration == pytest.approx(1.5, abs=1e-3)
    video = m.read_video(path)
    assert video.frames.shape == (12, 48, 64, 3) and video.frames.dtype == np.uint8
    np.testing.assert_allclose(video.times, np.arange(12) / 8)
    means = video.frames.reshape(12, -1, 3).mean(axis=1)
    np.testing.assert_allclose(means, COLOURS.astype(float), atol=6)  # H.264 + yuv420p of flat colours
    assert video.audio is None


def test_read_video_span(tmp_path):
    path = m.write_mp4(tmp_path / "clip.mp4", colour_frames(12), 8)
    video = m.read_video(path, start=0.5, end=1.0)
    np.testing.assert_allclose(video.times, [0.5, 0.625, 0.75, 0.875])
    assert [nearest_colour(f) for f in video.frames] == [4, 5, 6, 7]
    assert video.duration == pytest.approx(1.5, abs=1e-3)
    with pytest.raises(m.NoFramesError, match="clip.mp4"):
        m.read_video(path, start=5.0)


def test_read_video_seeks_instead_of_decoding_from_zero(tmp_path, count_decoded):
    # 10 s, keyframe every 8 frames (1 s): reading 9.0-9.5 s should decode about one GOP.
    path = write_video(
        tmp_path / "long.mp4", colour_frames(80, 16, 16), 8, codec_options={"g": "8", "x264-params": "scenecut=0"}
    )
    video = m.read_video(path, start=9.0, end=9.5)
    np.testing.assert_allclose(video.times, [9.0, 9.125, 9.25, 9.375])
    assert [nearest_colour(f) for f in video.frames] == [i % 12 for i in range(72, 76)]
    assert count_decoded["n"] <= 12  # from decoding from 0 it would be 77


def test_odd_size_is_padded(tmp_path):
    frames = colour_frames(3, 47, 33)
    video = m.read_video(m.write_mp4(tmp_path / "odd.mp4", frames, 8))
    assert video.frames.shape == (3, 48, 34, 3)
    assert [nearest_colour(f[-1:, -1:]) for f in video.frames] == [0, 1, 2]  # padding repeats the edge


def test_video_with_tone_audio(tmp_path):
    rate = 44100
    path = m.write_mp4(tmp_path / "clip.mp4", colour_frames(12), 8, m.Audio(tone((440.0, 440.0), 1.5, rate), rate))
    assert m.probe_video(path).has_audio
    video = m.read_video(path, audio_sample_rate=16000)
    audio = video.audio
    assert audio.sample_rate == 16000 and audio.samples.shape == (2, round(video.duration * 16000))
    assert audio.samples.dtype == np.float32 and not audio.silent
    assert dominant_frequency(audio.samples[0], 16000) == pytest.approx(440, abs=2)
    span = m.read_video(path, start=0.5, end=1.0, audio_sample_rate=16000)
    assert span.audio.samples.shape == (2, 8000) and np.abs(span.audio.samples).max() > 0.3
    native = m.read_video(path)
    assert native.audio.sample_rate == rate
    assert m.read_video(path, with_audio=False).audio is None
    # The audio track of a video, read as audio: AAC pads to whole 1024-sample frames, and
    # that padding is cut at the duration the MP4 header declares, so the length is exact.
    track = m.read_audio(path)
    assert track.samples.shape == (2, round(1.5 * rate))
    track = m.read_audio(path, sample_rate=16000, mono=True)
    assert track.samples.shape[0] == 1 and abs(track.samples.shape[1] - 24000) <= 1


# Source rate 44.1 kHz stereo -> 16 kHz. Tolerance on the length: one codec frame at the
# source rate (encoder padding), converted to 16 kHz; WAV and FLAC are exact to a sample.
CODEC_FRAME = {"wav": 1, "flac": 1, "mp3": 1152, "ogg": 2048, "opus": 960}


def make_tone_file(tmp_path: Path, ext: str) -> Path:
    samples = tone((440.0, 660.0), 1.0, 44100)
    path = tmp_path / f"tone.{ext}"
    if ext in ("wav", "flac", "ogg"):  # libsndfile: PCM, FLAC, Ogg Vorbis
        sf.write(path, samples.T, 44100, format={"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}[ext])
    elif ext == "mp3":
        write_audio(path, samples, 44100, fmt="mp3", codec="libmp3lame")
    else:  # Opus only runs at 48 kHz: the encoder resamples
        write_audio(path, samples, 44100, fmt="ogg", codec="libopus", codec_rate=48000)
    return path


@pytest.mark.parametrize("ext", list(CODEC_FRAME))
def test_read_audio_resampled_mono(tmp_path, ext):
    path = make_tone_file(tmp_path, ext)
    audio = m.read_audio(path, sample_rate=16000, mono=True)
    assert audio.sample_rate == 16000 and audio.samples.shape[0] == 1 and audio.samples.dtype == np.float32
    source_rate = 48000 if ext == "opus" else 44100
    assert abs(audio.samples.shape[1] - 16000) <= CODEC_FRAME[ext] * 16000 / source_rate + 1
    assert abs(audio.duration - 1.0) < 0.15
    assert -1.0 <= audio.samples.min() and audio.samples.max() <= 1.0
    # Mono mixes 440 Hz and 660 Hz equally: both are the spectrum's peaks.
    assert dominant_frequency(audio.samples[0], 16000) == pytest.approx(440, abs=2) or dominant_frequency(
        audio.samples[0], 16000
    ) == pytest.approx(660, abs=2)


@pytest.mark.parametrize("ext", list(CODEC_FRAME))
def test_read_audio_keeps_stereo(tmp_path, ext):
    audio = m.read_audio(make_tone_file(tmp_path, ext), sample_rate=16000)
    assert audio.samples.shape[0] == 2
    assert dominant_frequency(audio.samples[0], 16000) == pytest.approx(440, abs=2)
    assert dominant_frequency(audio.samples[1], 16000) == pytest.approx(660, abs=2)


def test_read_audio_native_rate(tmp_path):
    audio = m.read_audio(make_tone_file(tmp_path, "flac"))
    assert audio.sample_rate == 44100 and audio.samples.shape == (2, 44100)


def test_write_wav_round_trip(tmp_path):
    samples = tone((300.0, 500.0), 0.25, 22050)
    path = m.write_wav(tmp_path / "new" / "speech.wav", samples, 22050)
    data, rate = sf.read(path, dtype="float32")
    assert rate == 22050 and sf.info(path).subtype == "PCM_16"
    np.testing.assert_allclose(data.T, samples, atol=1 / 32767)
    mono = m.write_wav(tmp_path / "mono.wav", samples[0], 22050)
    assert sf.info(mono).channels == 1


@pytest.mark.parametrize(
    "fmt,codec,pix_fmt,ext,atol",
    [
        ("webm", "libvpx-vp9", "yuv420p", "webm", 8),
        ("avi", "mpeg4", "yuv420p", "avi", 12),
        ("mov", "libx264", "yuv420p", "mov", 8),
        ("gif", "gif", "rgb8", "gif", 40),  # GIF's 3-3-2 palette: 128 becomes 109 or 146
    ],
)
def test_read_other_video_formats(tmp_path, fmt, codec, pix_fmt, ext, atol):
    path = write_video(tmp_path / f"clip.{ext}", colour_frames(12), 8, fmt=fmt, codec=codec, pix_fmt=pix_fmt)
    video = m.read_video(path)
    assert len(video.frames) == 12
    assert [nearest_colour(f) for f in video.frames] == list(range(12))
    np.testing.assert_allclose(video.frames.reshape(12, -1, 3).mean(axis=1), COLOURS.astype(float), atol=atol)
    np.testing.assert_allclose(video.times, np.arange(12) / 8, atol=0.006)  # GIF ticks are 10 ms
    assert video.fps == pytest.approx(8, abs=0.5) and video.duration == pytest.approx(1.5, abs=0.02)
    span = m.read_video(path, start=0.5, end=1.0)
    assert [nearest_colour(f) for f in span.frames] == [4, 5, 6, 7]


# ------------------------------------------------------------------- atomic writes
def only_file_left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_png_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "photo.png"
    target.write_bytes(b"old")

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        m.write_png(target, np.zeros((4, 4, 3), np.uint8))
    assert only_file_left(tmp_path) == ["photo.png"] and target.read_bytes() == b"old"


def test_write_mp4_failure_leaves_nothing(tmp_path, monkeypatch):
    # Fail after the video track is encoded and muxed, so a partial file really exists.
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"old")
    seen: list[int] = []

    def failing(audio, layout):
        seen.extend(p.stat().st_size for p in tmp_path.iterdir() if p.name != "clip.mp4")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(m, "_to_audio_frame", failing)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        m.write_mp4(target, colour_frames(12), 8, m.Audio(tone((440.0,), 1.5, 16000), 16000))
    assert seen and seen[0] > 0  # the temporary file had been written to
    assert only_file_left(tmp_path) == ["clip.mp4"] and target.read_bytes() == b"old"


def test_write_wav_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_write(file, data, *args, **kwargs):
        Path(file).write_bytes(b"RIFF half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(sf, "write", broken_write)
    with pytest.raises(RuntimeError, match="interrupted"):
        m.write_wav(tmp_path / "voice.wav", np.zeros(100, np.float32), 16000)
    assert only_file_left(tmp_path) == []


def test_video_cut_in_half_after_its_header_is_corrupt_not_short(tmp_path):
    # write_mp4 puts the header first (+faststart), so FFmpeg can decode the first half of
    # a cut file without an error; the reader must notice that frames stop early.
    frames = np.random.default_rng(0).integers(0, 255, (48, 48, 64, 3), dtype=np.uint8)
    full = m.write_mp4(tmp_path / "full.mp4", frames, fps=8)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert m.read_video(full).frames.shape[0] == 48
    with pytest.raises(m.CorruptMediaError, match="cut.mp4.*stops at"):
        m.read_video(cut)


# ---------------------------------------------------- frame budgets and decoder failures
def test_video_over_frame_pixel_budget_refused_from_header(tmp_path, count_decoded):
    # 3842x2162: just over 4K UHD; the default budget refuses it before a frame is decoded.
    path = write_video(tmp_path / "big.mp4", colour_frames(2, 2162, 3842), codec="mpeg4")
    began = time.perf_counter()
    err = raises(m.VideoTooLargeError, path, m.read_video)
    raises(m.VideoTooLargeError, path, m.probe_video)
    assert time.perf_counter() - began < 1.0
    assert count_decoded["n"] == 0
    assert "3842x2162" in str(err) and f"{m.MAX_VIDEO_PIXELS:,}" in str(err)


def gif_claiming_size(path: Path, width: int, height: int, frames: int = 3) -> Path:
    """A small animated GIF whose logical screen is rewritten to width x height (a few
    hundred bytes that would decode to gigabytes of frames)."""
    images = [Image.fromarray(f) for f in colour_frames(frames, 8, 8)]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    data = bytearray(path.read_bytes())
    data[6:10] = width.to_bytes(2, "little") + height.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


def test_animated_gif_declaring_huge_frames_refused_by_every_reader(tmp_path, count_decoded, monkeypatch):
    path = gif_claiming_size(tmp_path / "bomb.gif", 8001, 8000)
    assert path.stat().st_size < 1000
    err = raises(m.VideoTooLargeError, path, m.read_video)
    assert "8001x8000" in str(err) and f"{m.MAX_VIDEO_PIXELS:,}" in str(err)
    assert count_decoded["n"] == 0
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    assert f"{m.MAX_IMAGE_PIXELS:,}" in str(raises(m.ImageTooLargeError, path, m.read_image))


def test_frame_count_budget_from_header(tmp_path, count_decoded):
    video = write_video(tmp_path / "many.mp4", colour_frames(12))  # 12 frames in its header
    gif = tmp_path / "many.gif"
    images = [Image.fromarray(f) for f in colour_frames(12, 8, 8)]
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    for path in (video, gif):
        err = raises(m.VideoTooLargeError, path, m.read_video, max_frames=5)
        assert "12 frames" in str(err) and "limit of 5" in str(err)
    assert count_decoded["n"] == 0
    assert len(m.read_video(gif, max_frames=12).frames) == 12


def test_frame_budgets_rechecked_while_decoding(tmp_path, monkeypatch):
    # Headers that lie (no frame count, a tiny picture): the decode loop enforces both.
    path = write_video(tmp_path / "clip.mp4", colour_frames(12, 48, 64))
    monkeypatch.setattr(m, "_frame_size", lambda stream, name: (1, 1))
    raises(m.VideoTooLargeError, path, m.read_video, max_pixels=1000)
    monkeypatch.undo()
    monkeypatch.setattr(av.video.stream.VideoStream, "frames", property(lambda self: 0))
    monkeypatch.setattr(m, "_metadata_duration", lambda container, stream=None: 0.1)
    err = raises(m.VideoTooLargeError, path, m.read_video, max_frames=5)
    assert "limit of 5" in str(err)


def test_resolution_change_mid_stream_is_scaled_to_the_first_size(tmp_path):
    # Two MPEG-TS segments back to back (as a stream that switches resolution sends them).
    small = write_video(tmp_path / "a.ts", colour_frames(8, 48, 64), fmt="mpegts")
    large = write_video(tmp_path / "b.ts", colour_frames(8, 96, 128), fmt="mpegts")
    path = tmp_path / "switch.mp4"
    path.write_bytes(small.read_bytes() + large.read_bytes())
    video = m.read_video(path, with_audio=False)
    assert video.frames.shape[1:] == (48, 64, 3)
    assert len(video.frames) == 16
    assert [nearest_colour(f) for f in video.frames] == [i % 12 for i in range(8)] * 2


@pytest.mark.parametrize("fmt, ext", [("matroska", ".mkv"), ("mp4", ".mp4"), ("mov", ".mov")])
def test_metadata_that_is_not_utf8_is_tolerated(tmp_path, fmt, ext):
    path = tmp_path / f"tagged{ext}"
    with av.open(str(path), "w", format=fmt) as out:
        out.metadata["title"] = "ÄÄÄÄÄÄ"
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i, rgb in enumerate(colour_frames(4)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    data = path.read_bytes()
    assert data.count("ÄÄÄÄÄÄ".encode()) == 1
    path.write_bytes(data.replace("ÄÄÄÄÄÄ".encode(), b"\xc4" * 12))  # Latin-1 bytes: invalid UTF-8
    assert m.probe_video(path).width == 64
    assert len(m.read_video(path).frames) == 4


@pytest.mark.parametrize("offset, value", [(20, b"\x00\x00"), (20, b"\xfe\xff"), (34, b"\x00\x00")])
def test_wav_with_corrupt_fmt_chunk(tmp_path, offset, value):
    # Format tag 0 / 0xFFFE without its extension, or 0 bits per sample: FFmpeg opens the
    # file but gives the stream no decoder.
    path = m.write_wav(tmp_path / "voice.wav", tone((440.0,), 0.2, 16000), 16000)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"fmt "
    data[offset:offset + len(value)] = value
    path.write_bytes(bytes(data))
    err = raises(m.CorruptMediaError, path, m.read_audio)
    assert "header is damaged" in str(err)


@pytest.mark.parametrize("failure", [AttributeError("no codec"), TypeError("x"), IndexError("x"),
                                     ZeroDivisionError("x"), UnicodeDecodeError("utf-8", b"\xc4", 0, 1, "bad")])
def test_decoder_internals_failing_become_corrupt_media(tmp_path, monkeypatch, failure):
    path = write_video(tmp_path / "clip.mp4", colour_frames(4))

    def failing(container, stream):
        raise failure
        yield

    monkeypatch.setattr(m, "_iter_frames", failing)
    err = raises(m.CorruptMediaError, path, m.read_video)
    assert err.__cause__ is failure
    wav = m.write_wav(tmp_path / "voice.wav", tone((440.0,), 0.2, 16000), 16000)
    assert raises(m.CorruptMediaError, wav, m.read_audio).__cause__ is failure


def test_memory_error_while_decoding_is_typed(tmp_path, monkeypatch):
    image = m.write_png(tmp_path / "photo.png", np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(MemoryError()))
    assert "more memory" in str(raises(m.MediaMemoryError, image, m.read_image))
    video = write_video(tmp_path / "clip.mp4", colour_frames(4))
    monkeypatch.setattr(m, "_iter_frames", lambda container, stream: (_ for _ in ()).throw(MemoryError()))
    raises(m.MediaMemoryError, video, m.read_video)


def test_short_webm_without_stream_duration_is_read(tmp_path):
    # 1.5 s of VP8 at 8 fps: WebM stores no per-stream duration, only the container's.
    path = write_video(tmp_path / "clip.webm", colour_frames(12), fmt="webm", codec="libvpx")
    with av.open(str(path)) as c:
        assert c.streams.video[0].duration is None and c.duration == 1_500_000
    video = m.read_video(path, start=1.0, end=2.06)  # a window past the end, as load_video asks
    assert [nearest_colour(f) for f in video.frames] == [8, 9, 10, 11]
    whole = m.read_video(path)
    assert len(whole.frames) == 12 and whole.duration == pytest.approx(1.5)


def test_webm_cut_short_is_still_caught(tmp_path):
    path = write_video(tmp_path / "clip.webm", colour_frames(48), fmt="webm", codec="libvpx")  # 6 s
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # the container's header still says 6 s
    raises(m.CorruptMediaError, path, m.read_video)


def test_extreme_aspect_ratio_refused_from_header(tmp_path, monkeypatch, count_decoded):
    # Found by the fuzzer: a GIF frame of 61504x48 is within the pixel budget, but the
    # ImageBind preprocessing scales its short side to 224 (a 1.5 GB tensor, 40 s of CPU).
    gif = gif_claiming_size(tmp_path / "strip.gif", 61504, 48)
    err = raises(m.AspectRatioError, gif, m.read_video)
    assert "61504x48" in str(err) and f"{m.MAX_ASPECT_RATIO}:1" in str(err)
    assert count_decoded["n"] == 0
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    raises(m.AspectRatioError, png_claiming_size(tmp_path / "line.png", 3, 5000), m.read_image)
    monkeypatch.undo()
    assert m.read_image(m.write_png(tmp_path / "panorama.png", np.zeros((20, 1000, 3), np.uint8))).size == (1000, 20)


def test_seven_point_one_audio_is_read_with_every_channel(tmp_path):
    # Used to segfault the process (PyAV's planar 8-channel frames); read packed now. Read
    # in a worker, so that a regression fails this test instead of killing the test run.
    from xvila.media_worker import MediaWorker

    path = write_surround_m4a(tmp_path / "surround.m4a")
    worker = MediaWorker()
    try:
        audio = worker.call(m.read_audio, str(path))
    finally:
        worker.close()
    assert audio.samples.shape == (8, 44100) and audio.sample_rate == 44100
    middle = audio.samples[:, 4410:-4410]
    found = [dominant_frequency(channel, 44100) for channel in middle]
    assert found == pytest.approx(list(SURROUND_FREQS), abs=5)
    assert m.read_audio(path, sample_rate=16000, mono=True).samples.shape == (1, 16000)


def test_video_stream_without_codec_context_is_corrupt(tmp_path, monkeypatch, count_decoded):
    path = write_video(tmp_path / "clip.mp4", colour_frames(4))
    monkeypatch.setattr(av.video.stream.VideoStream, "codec_context", property(lambda self: None))
    assert "no picture size" in str(raises(m.CorruptMediaError, path, m.probe_video))
    assert count_decoded["n"] == 0
