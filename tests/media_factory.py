"""Test media made on the fly with real encoders (PyAV, PIL, soundfile): no binary fixtures."""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

# Twelve flat colours far apart from each other, so a decoded frame can be matched back to
# the frame it came from even after lossy compression.
COLOURS = np.array(
    [
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
        (255, 255, 255), (0, 0, 0), (128, 128, 128), (255, 128, 0), (128, 0, 255), (0, 128, 128),
    ],
    dtype=np.uint8,
)


def colour_frames(n: int = 12, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 [n,H,W,3]; frame i is flat COLOURS[i % 12]."""
    return np.broadcast_to(COLOURS[np.arange(n) % len(COLOURS)][:, None, None, :], (n, height, width, 3)).copy()


def nearest_colour(frame: np.ndarray) -> int:
    mean = frame.reshape(-1, 3).mean(axis=0)
    return int(np.argmin(np.abs(COLOURS.astype(float) - mean).sum(axis=1)))


def tone(freqs: tuple[float, ...], seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    """float32 [len(freqs), n]: one sine per channel."""
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * np.asarray(freqs)[:, None] * t)).astype(np.float32)


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def write_video(
    path: Path,
    frames: np.ndarray,
    fps: int = 8,
    *,
    fmt: str = "mp4",
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    codec_options: dict[str, str] | None = None,
    options: dict[str, str] | None = None,
    pts_seconds: list[float] | None = None,
    audio: np.ndarray | None = None,
    audio_rate: int = 44100,
) -> Path:
    """Encode frames with PyAV; `pts_seconds` sets each frame's timestamp explicitly."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if codec_options:
            stream.options = codec_options
        if pts_seconds is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts_seconds is None:
                frame.pts = i
            else:
                frame.pts, frame.time_base = round(pts_seconds[i] * 1000), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if audio is not None:
            _encode_audio(out, audio, audio_rate, "aac", audio_rate)
    return path


def _encode_audio(out, samples: np.ndarray, rate: int, codec: str, codec_rate: int) -> None:
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    stream = out.add_stream(codec, rate=codec_rate, layout=layout)
    stream.codec_context.options = {"strict": "experimental"}  # FFmpeg's own vorbis encoder
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def write_audio(path: Path, samples: np.ndarray, rate: int, *, fmt: str, codec: str, codec_rate: int | None = None) -> Path:
    """Encode float32 [channels, n] with PyAV (mp3, opus, aac...)."""
    with av.open(str(path), "w", format=fmt) as out:
        _encode_audio(out, samples, rate, codec, codec_rate or rate)
    return path


def audio_only_mp4(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        _encode_audio(out, tone((440.0,), 0.5, 44100), 44100, "aac", 44100)
    return path


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header is rewritten to announce width x height (CRC fixed up), so
    only a reader that decodes pixels would notice that the data is far too short."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
    path.write_bytes(bytes(data))
    return path


def sample_media(folder: Path) -> dict[str, str]:
    """The chat and any-to-any tests' inputs, by key, written into `folder`:
    image0/1 (48x64 PNG), video0/1 (2.5 s at 8 fps), audio0/1 (2 s sine WAVs at 16 kHz), and
    image / video (12 frames at 8 fps with a 0.5 s tone) / audio (that tone)."""
    from xvila import media as media_io  # the package's own writers: what a user's files look like

    rng = np.random.default_rng(0)
    out = {}
    for i in range(2):
        out[f"image{i}"] = str(folder / f"photo{i}.png")
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(out[f"image{i}"])
        video = rng.integers(0, 256, (20, 48, 64, 3), dtype=np.uint8)
        out[f"video{i}"] = str(media_io.write_mp4(folder / f"clip{i}.mp4", video, 8))
        t = np.arange(32000) / 16000
        wave = 0.5 * np.sin(2 * np.pi * (440 + 330 * i) * t)
        out[f"audio{i}"] = str(media_io.write_wav(folder / f"tone{i}.wav", wave, 16000))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "photo.png")
    frames = rng.integers(0, 255, (12, 48, 64, 3), dtype=np.uint8)
    t = np.arange(8000) / 16000
    sound = media_io.Audio(np.sin(2 * np.pi * 440 * t, dtype=np.float32)[None] * 0.3, 16000)
    media_io.write_mp4(folder / "clip.mp4", frames, fps=8, audio=sound)
    media_io.write_wav(folder / "bark.wav", sound.samples, 16000)
    out.update(image=str(folder / "photo.png"), video=str(folder / "clip.mp4"), audio=str(folder / "bark.wav"))
    return out


SURROUND_FREQS = (300.0, 500.0, 700.0, 100.0, 900.0, 1100.0, 1300.0, 1500.0)  # 7.1; LFE (4th) low


def write_surround_m4a(path: Path, seconds: float = 1.0, rate: int = 44100) -> Path:
    """A valid 7.1 AAC file, one tone per channel. Fed to the encoder packed: PyAV 18 builds
    8-channel planar frames with a ninth plane (see `pyav_planar_7_1_to_ndarray`)."""
    samples = tone(SURROUND_FREQS, seconds, rate)
    with av.open(str(path), "w", format="ipod") as out:
        stream = out.add_stream("aac", rate=rate, layout="7.1")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T.reshape(1, -1)), format="flt", layout="7.1")
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def pyav_planar_7_1_to_ndarray() -> None:
    """Segfaults in PyAV 18: an 8-channel planar frame reports 9 planes and to_ndarray reads
    the missing one. This is how a 7.1 upload used to kill the demo; a real native crash."""
    av.AudioFrame(format="fltp", layout="7.1", samples=1024).to_ndarray()
