"""Reading and writing images, video and audio, with typed errors a person can act on.

Every reader checks the file in the same order, cheapest first, so that a bad upload is
refused with a plain message before any decoder touches it:

1. the path exists and is a file (`MediaNotFoundError`);
2. the extension is one this reader handles (`UnsupportedFormatError`);
3. the file is not empty (`EmptyMediaError`);
4. the first bytes are not obviously another kind of file, e.g. a PNG named `.mp4`
   (`FormatMismatchError`), nor a RIFF file shorter than its own header says
   (`CorruptMediaError`);
5. budgets are checked from headers only: pixel count (`ImageTooLargeError`), pixels per
   frame and frame count of videos and animated GIFs (`VideoTooLargeError`), the aspect
   ratio of both (`AspectRatioError`), duration (`VideoTooLongError` / `AudioTooLongError`);
6. only then is content decoded; decoder failures become `CorruptMediaError` (and
   `MediaMemoryError` when a damaged header asks for more memory than there is).

These readers run in the calling process, which suits trusted files (training data). A
crash inside FFmpeg cannot be caught in-process: uploads go through
`xvila.media_worker.preprocess`, which runs the same readers in a worker process with
memory and time limits (`DecoderCrashError`, `DecodeTimeoutError`).

Decoding is done by the libraries: PIL for images, PyAV (FFmpeg) for video and for all
audio (one code path for WAV/FLAC/MP3/Ogg/M4A and audio tracks of videos, with FFmpeg's
resampler). soundfile writes WAV. Raw library exceptions never escape; each typed error
is raised `from` the original so the cause stays in the traceback.

Writers are atomic: they write a hidden temporary file next to the target and
`os.replace` it, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Union

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageOps, UnidentifiedImageError

from xvila.constants import (
    MAX_ASPECT_RATIO,
    MAX_AUDIO_SECONDS,
    MAX_IMAGE_PIXELS,
    MAX_VIDEO_FRAMES,
    MAX_VIDEO_PIXELS,
    MAX_VIDEO_SECONDS,
)
from xvila.errors import XVilaError
from xvila.fileio import atomic_path

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)

# Peak below which audio counts as silent: ~-80 dBFS, about 3 LSB of 16-bit audio, so
# dither noise on an otherwise empty recording is still flagged.
SILENCE_PEAK = 1e-4


# ----------------------------------------------------------------------------- errors
class MediaError(XVilaError, ValueError):
    """Base of media errors; the message names the file, says what is wrong and what to do."""


class MediaNotFoundError(MediaError):
    """The path does not exist or is not a regular file."""


class EmptyMediaError(MediaError):
    """The file has 0 bytes."""


class CorruptMediaError(MediaError):
    """The file is truncated or its content cannot be decoded."""


class FormatMismatchError(MediaError):
    """The content is a different kind of file than the extension says."""


class UnsupportedFormatError(MediaError):
    """The extension is not one we read."""


class NoFramesError(MediaError):
    """A video without any decodable frame (e.g. an audio-only .mp4)."""


class EmptyAudioError(MediaError):
    """Audio of zero length, or a video without an audio track read as audio."""


class ImageTooLargeError(MediaError):
    """The image header announces more pixels than the budget (decompression bomb)."""


class VideoTooLongError(MediaError):
    """The video lasts longer than the budget."""


class AudioTooLongError(MediaError):
    """The audio lasts longer than the budget."""


class VideoTooLargeError(MediaError):
    """A video's (or animated GIF's) frames are larger, or more, than the budget."""


class AspectRatioError(MediaError):
    """A picture so much longer than wide (or the reverse) that it cannot be scaled."""


class MediaMemoryError(MediaError):
    """Decoding needed more memory than allowed (usually a damaged size field)."""


class DecoderCrashError(MediaError):
    """The decoder crashed (a native fault, caught by the worker process that hosts it)."""


class DecodeTimeoutError(MediaError):
    """Decoding took longer than allowed (wall-clock or CPU time)."""


def _memory_error(name: str) -> MediaMemoryError:
    return MediaMemoryError(
        f"{name}: decoding this file needs more memory than the server allows; it is damaged "
        "or far too large. Please upload a smaller or re-saved copy."
    )


# What the decoders (PIL, PyAV) raise on malformed data besides their own error classes.
# Caught only around decoding, never around our own argument checks; the original is
# kept as the cause of the typed error.
_DECODER_FAILURES = (
    AttributeError, TypeError, ValueError, IndexError, KeyError, ZeroDivisionError,
    OverflowError, UnicodeDecodeError, EOFError, SyntaxError, struct.error, OSError,
)


# ------------------------------------------------------------------------- file kinds
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".webm", ".mov", ".avi", ".mkv", ".gif"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac"})

_IMAGE, _VIDEO, _AUDIO = "image", "video", "audio"
_NOUN = {_IMAGE: "an image", _VIDEO: "a video", _AUDIO: "an audio file"}
# read_audio also takes the audio track of a video file (GIFs have none).
_READABLE = {
    _IMAGE: IMAGE_EXTENSIONS,
    _VIDEO: VIDEO_EXTENSIONS,
    _AUDIO: AUDIO_EXTENSIONS | (VIDEO_EXTENSIONS - {".gif"}),
}

_I, _V, _A = frozenset({_IMAGE}), frozenset({_VIDEO}), frozenset({_AUDIO})
_AV = _V | _A  # containers that may hold video and/or audio
# Magic numbers, checked in order: what the bytes really are, which readers may take
# them, and the extension to suggest. Only used to refuse obvious mismatches early with a
# clear message; the decoders still decide whether the content is valid.
_SIGNATURES: tuple[tuple[re.Pattern[bytes], str, frozenset[str], str | None], ...] = tuple(
    (re.compile(pattern, re.DOTALL), label, kinds, ext)
    for pattern, label, kinds, ext in (
        (rb"\x89PNG\r\n\x1a\n", "a PNG image", _I, ".png"),
        (rb"\xff\xd8\xff", "a JPEG image", _I, ".jpg"),
        (rb"GIF8[79]a", "a GIF image", _I | _V, ".gif"),
        (rb"RIFF.{4}WEBP", "a WebP image", _I, ".webp"),
        (rb"II\*\x00|MM\x00\*", "a TIFF image", _I, ".tiff"),
        (rb"RIFF.{4}WAVE", "a WAV audio file", _A, ".wav"),
        (rb"RIFF.{4}AVI ", "an AVI video", _AV, ".avi"),
        (rb"fLaC", "a FLAC audio file", _A, ".flac"),
        (rb"OggS", "an Ogg audio file", _A, ".ogg"),
        (rb"ID3|\xff[\xe0-\xff]", "an MP3/AAC audio file", _A, ".mp3"),
        (rb"\x1a\x45\xdf\xa3", "a WebM/Matroska video", _AV, ".webm"),
        (rb".{4}ftypM4A ", "an M4A audio file", _A, ".m4a"),
        (rb".{4}ftypqt  ", "a QuickTime video", _AV, ".mov"),
        (rb".{4}ftyp", "an MP4 video", _AV, ".mp4"),
        (rb"%PDF", "a PDF document", frozenset(), None),
        (rb"PK\x03\x04", "a ZIP archive (or an Office document)", frozenset(), None),
    )
)
_BMP = (re.compile(rb"BM"), "a BMP image", _I, ".bmp")  # weak magic: tried after the text test


def media_kind(path: PathLike) -> str:
    """'image', 'video' or 'audio' from the extension (.gif counts as 'image')."""
    p = Path(path)
    ext = p.suffix.lower()
    for kind, extensions in ((_IMAGE, IMAGE_EXTENSIONS), (_VIDEO, VIDEO_EXTENSIONS), (_AUDIO, AUDIO_EXTENSIONS)):
        if ext in extensions:
            return kind
    raise UnsupportedFormatError(_unsupported_message(p.name, ext))


def _exts(extensions: frozenset[str]) -> str:
    return ", ".join(sorted(extensions))


def _unsupported_message(name: str, ext: str) -> str:
    what = f"'{ext}' files are" if ext else "files without an extension are"
    return (
        f"{name}: {what} not supported. Please upload an image ({_exts(IMAGE_EXTENSIONS)}), "
        f"a video ({_exts(VIDEO_EXTENSIONS)}) or an audio file ({_exts(AUDIO_EXTENSIONS)})."
    )


def _looks_like_text(head: bytes) -> bool:
    # Incremental decoding tolerates a multi-byte character cut off at the end of `head`.
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    text = text.lstrip("\ufeff")
    return bool(text) and all(c.isprintable() or c in "\t\r\n\f" for c in text)


def _sniff(head: bytes) -> tuple[str, frozenset[str], str | None] | None:
    """What the first bytes say the file is, or None when they are not recognised."""
    for pattern, label, kinds, ext in _SIGNATURES:
        if pattern.match(head):
            return label, kinds, ext
    if _looks_like_text(head):
        return "a text file", frozenset(), None
    if _BMP[0].match(head):
        return _BMP[1:]
    return None


def _riff_truncated(head: bytes, size: int) -> bool:
    """True when a RIFF file (WAV, AVI, WebP) is shorter than its header says.

    FFmpeg and libsndfile both quietly decode what is left of a cut WAV, so this is the
    only place a half-uploaded WAV is caught. 0 and values near 4 GiB are placeholders
    that streaming writers leave, not real sizes, so they are not trusted.
    """
    if len(head) < 12 or head[:4] != b"RIFF":
        return False
    declared = struct.unpack("<I", head[4:8])[0]
    return 0 < declared < 0x7FFF0000 and declared + 8 > size


def _check_file(path: PathLike, kind: str) -> Path:
    """Run the cheap checks (1-4 in the module docstring) and return the path."""
    p = Path(path)
    name, noun = p.name, _NOUN[kind]
    if not p.exists():
        raise MediaNotFoundError(f"{name}: file not found. Please check the path or upload it again.")
    if not p.is_file():
        raise MediaNotFoundError(f"{name}: this is a folder, not a file. Please choose {noun}.")
    ext = p.suffix.lower()
    if ext not in _READABLE[kind]:
        if any(ext in exts for exts in _READABLE.values()):
            raise UnsupportedFormatError(
                f"{name}: expected {noun} ({_exts(_READABLE[kind])}), got a '{ext}' file."
            )
        raise UnsupportedFormatError(_unsupported_message(name, ext))
    size = p.stat().st_size
    if size == 0:
        raise EmptyMediaError(f"{name}: the file is empty (0 bytes). Please upload the {noun.split()[-1]} again.")
    with p.open("rb") as f:
        head = f.read(512)
    found = _sniff(head)
    if found is not None and kind not in found[1]:
        label, _, right_ext = found
        todo = f"rename it to {right_ext} or upload {noun}" if right_ext else f"please upload {noun}"
        raise FormatMismatchError(f"{name}: this is {label}, not {noun}; {todo}.")
    if _riff_truncated(head, size):
        raise CorruptMediaError(
            f"{name}: the file is incomplete (shorter than its header says); it was probably "
            "cut off while uploading or copying. Please upload it again."
        )
    return p


# ----------------------------------------------------------------------------- images
def read_image(path: PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image into a fully loaded RGB `PIL.Image`.

    The pixel budget is checked from the header, before any pixel is decoded. GIFs give
    their first frame; transparent images are composited on white; EXIF rotation applied.
    """
    p = _check_file(path, _IMAGE)
    # PIL's own bomb guard warns or raises at its fixed limits; ours replaces it, and
    # neither its warning nor its error may reach the caller.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageTooLargeError(_too_many_pixels(p.name, w, h, max_pixels))
                _check_aspect(p.name, w, h, "image")
                im.load()
                return _flatten_to_rgb(_upright(im, p.name))
        except MediaError:  # ours (a ValueError) must not be re-labelled below
            raise
        except MemoryError as err:
            raise _memory_error(p.name) from err
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(
                f"{p.name}: the image is too large to open safely (over "
                f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels). Please resize it and upload again."
            ) from err
        except UnidentifiedImageError as err:
            raise CorruptMediaError(
                f"{p.name}: could not be read as an image; it is damaged or in a format we "
                f"do not read. Please upload a {_exts(IMAGE_EXTENSIONS)} file."
            ) from err
        except _DECODER_FAILURES as err:  # what PIL raises on bad data
            raise CorruptMediaError(
                f"{p.name}: the image data is damaged or incomplete. Please upload it again."
            ) from err


def _upright(im: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways). A malformed EXIF
    block is not worth refusing the picture for: keep it as stored."""
    try:
        return ImageOps.exif_transpose(im) or im
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error) as err:
        log.warning("%s: unreadable EXIF orientation (%s); using the image as stored.", name, err)
        return im


def _too_many_pixels(name: str, w: int, h: int, max_pixels: int) -> str:
    return (
        f"{name}: the image is {w}x{h} ({w * h:,} pixels), over the limit of {max_pixels:,} "
        "pixels. Please resize it and upload again."
    )


def _check_aspect(name: str, w: int, h: int, what: str) -> None:
    ratio = max(w, h) / max(1, min(w, h))
    if ratio > MAX_ASPECT_RATIO:
        raise AspectRatioError(
            f"{name}: the {what} is {w}x{h}, {ratio:.0f} times longer than it is wide; the limit is "
            f"{MAX_ASPECT_RATIO}:1. Please crop it and upload again."
        )


def _flatten_to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I"):
        # 16/32-bit greyscale: convert("RGB") would clip everything above 255 to white.
        im = Image.fromarray(np.rint(np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def write_png(path: PathLike, image: Image.Image | np.ndarray) -> Path:
    """Write a PIL image or a uint8 array ([H,W,3], also [H,W] or [H,W,4]) as PNG, atomically."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"write_png wants uint8 [H,W,3], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


# ---------------------------------------------------------------------- audio & video
@dataclass
class Audio:
    samples: np.ndarray  # float32 [channels, n], full scale = 1 (not clipped)
    sample_rate: int
    silent: bool = False

    @property
    def duration(self) -> float:
        return self.samples.shape[-1] / self.sample_rate


@dataclass
class VideoInfo:
    duration: float
    fps: float
    width: int
    height: int
    has_audio: bool


@dataclass
class Video:
    frames: np.ndarray  # uint8 [T,H,W,3] RGB
    times: np.ndarray  # float64 [T], seconds from the start of the file
    fps: float
    duration: float  # the whole file's
    audio: Audio | None = None  # the same span as `frames`


@contextlib.contextmanager
def _open_av(p: Path, noun: str) -> Iterator[av.container.InputContainer]:
    """Open with PyAV; any decoder error while open or decoding becomes CorruptMediaError.

    Tags that are not UTF-8 are decoded with replacement characters: PyAV raises
    UnicodeDecodeError on them by default, and a mangled title is no reason to refuse a file.
    """
    try:
        container = av.open(str(p), mode="r", metadata_errors="replace")
    except MemoryError as err:
        raise _memory_error(p.name) from err
    except (av.FFmpegError, *_DECODER_FAILURES) as err:
        raise CorruptMediaError(
            f"{p.name}: could not be opened as {noun}; the file is damaged or incomplete. "
            "Please upload it again."
        ) from err
    try:
        fmt = container.format.name
        if fmt == "image2" or fmt.endswith("_pipe"):
            raise FormatMismatchError(f"{p.name}: this is an image, not {noun}; please upload {noun}.")
        if not (container.streams.video or container.streams.audio):
            # e.g. an MP4 cut inside its header: FFmpeg opens it but finds no usable track.
            raise CorruptMediaError(
                f"{p.name}: no picture or sound track could be read; the file is damaged or "
                "incomplete. Please upload it again."
            )
        yield container
    except MediaError:  # ours (a ValueError) must not be re-labelled below
        raise
    except MemoryError as err:
        raise _memory_error(p.name) from err
    except (av.FFmpegError, *_DECODER_FAILURES) as err:
        raise CorruptMediaError(
            f"{p.name}: decoding failed part-way; the file is damaged or incomplete. Please upload it again."
        ) from err
    finally:
        container.close()


def _origin(container: av.container.InputContainer) -> float:
    """Container start time: frame times are reported relative to it (MP3s start at ~25 ms)."""
    return container.start_time / av.time_base if container.start_time is not None else 0.0


def _metadata_duration(container: av.container.InputContainer, stream: av.stream.Stream | None = None) -> float | None:
    """Duration from headers only (the stream's when given and known, else the container's)."""
    if stream is not None and stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _scan_duration(container: av.container.InputContainer, stream: av.stream.Stream, budget: float) -> float:
    """Duration from packet timestamps (demuxing only, no decoding), for files whose
    headers lack it (e.g. WebM recorded live by a browser); stops once past `budget`."""
    origin, last = _origin(container), 0.0
    for packet in container.demux(stream):
        if packet.pts is None or packet.time_base is None:
            continue
        last = max(last, float((packet.pts + (packet.duration or 0)) * packet.time_base) - origin)
        if last > budget:
            break
    return last


def _iter_frames(container: av.container.InputContainer, stream: av.stream.Stream) -> Iterator[av.frame.Frame]:
    """All decoded frames of `stream` from the current position: the one place that decodes."""
    yield from container.decode(stream)


def _seek(container: av.container.InputContainer, stream: av.stream.Stream, t: float) -> None:
    """Jump to the keyframe at or before `t`, so a late span does not decode the file from 0."""
    if t <= 0:
        return
    target = int((t + _origin(container)) / stream.time_base)
    try:
        container.seek(target, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError:  # some demuxers cannot seek: decoding from 0 is only slower
        log.debug("seek to %.3fs failed in %s; decoding from the start", t, container.name)


def _too_long(name: str, what: str, seconds: float, budget: float, exact: bool = True) -> str:
    length = f"{seconds:.1f} s long" if exact else f"longer than {seconds:.1f} s"
    return (
        f"{name}: the {what} is {length}, over the limit of {budget:.0f} s. "
        f"Please trim it to under {budget:.0f} s and upload it again."
    )


def probe_video(
    path: PathLike, *, max_duration: float = MAX_VIDEO_SECONDS, max_pixels: int = MAX_VIDEO_PIXELS,
    max_frames: int = MAX_VIDEO_FRAMES,
) -> VideoInfo:
    """Video metadata without decoding a frame; raises the typed errors (over budget included:
    duration, pixels per frame, frame count)."""
    p = _check_file(path, _VIDEO)
    with _open_av(p, "a video") as container:
        stream = _video_stream(container, p.name)
        width, height = _frame_size(stream, p.name)
        if width * height > max_pixels:  # checked first: it needs no scan of the file
            raise VideoTooLargeError(_too_many_frame_pixels(p.name, width, height, max_pixels))
        _check_aspect(p.name, width, height, "video frame")
        duration = _metadata_duration(container)
        if duration is None:
            duration = _scan_duration(container, stream, max_duration)
        if duration > max_duration:
            raise VideoTooLongError(_too_long(p.name, "video", duration, max_duration))
        rate = stream.guessed_rate or stream.average_rate or stream.base_rate
        fps = float(rate) if rate else (stream.frames / duration if stream.frames and duration else 0.0)
        frames = int(stream.frames or 0) or round(duration * fps)
        if frames > max_frames:
            raise VideoTooLargeError(_too_many_frames(p.name, frames, max_frames))
        return VideoInfo(duration, fps, width, height, bool(container.streams.audio))


def _frame_size(stream: av.video.stream.VideoStream, name: str) -> tuple[int, int]:
    """Width and height from the stream header; a stream without them cannot be decoded."""
    ctx = stream.codec_context
    width, height = (ctx.width, ctx.height) if ctx is not None else (0, 0)
    if width <= 0 or height <= 0:
        raise CorruptMediaError(
            f"{name}: the video track has no picture size in its header; the file is damaged. "
            "Please upload it again."
        )
    return width, height


def _too_many_frame_pixels(name: str, w: int, h: int, max_pixels: int) -> str:
    return (
        f"{name}: the video frames are {w}x{h} ({w * h:,} pixels), over the limit of {max_pixels:,} "
        "pixels per frame. Please scale it down and upload again."
    )


def _too_many_frames(name: str, frames: int, max_frames: int) -> str:
    return (
        f"{name}: the video has {frames:,} frames, over the limit of {max_frames:,}. "
        "Please shorten it or lower its frame rate and upload again."
    )


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    # Cover art in music files shows up as a one-picture "video" stream; it is not a video.
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        raise NoFramesError(
            f"{name}: there is no video track in this file (it may be audio only). "
            "Please upload a video, or send it as audio."
        )
    return streams[0]


def read_video(
    path: PathLike,
    *,
    start: float = 0.0,
    end: float | None = None,
    max_duration: float = MAX_VIDEO_SECONDS,
    audio_sample_rate: int | None = None,
    with_audio: bool = True,
    max_pixels: int = MAX_VIDEO_PIXELS,
    max_frames: int = MAX_VIDEO_FRAMES,
) -> Video:
    """Decode the frames with start <= t < end (end=None: to the end) and, if asked, the
    audio of the same span, resampled to `audio_sample_rate` when given (channels kept).

    Every frame comes out at the first decoded frame's size: streams that change resolution
    part-way (browser recordings do) are scaled to it."""
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"read_video wants 0 <= start < end, got start={start}, end={end}")
    # Refuses over-budget files undecoded; the decoder re-checks, as headers can lie.
    info = probe_video(path, max_duration=max_duration, max_pixels=max_pixels, max_frames=max_frames)
    limits = _VideoLimits(max_duration, max_pixels, max_frames)
    p = Path(path)
    if start > 0 and start >= info.duration:
        raise NoFramesError(f"{p.name}: start={start:g} s is past the end of the video ({info.duration:.2f} s).")
    with _open_av(p, "a video") as container:
        stream = _video_stream(container, p.name)
        stream.thread_type = "AUTO"  # frame + slice threads: several times faster on H.264
        frames, times = _decode_video(container, stream, start, end, limits, p.name, info.fps)
        # The video stream's own length (the container's may include a longer audio track);
        # WebM/MKV have none per stream, only the container's.
        stream_end = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    if not frames:
        raise NoFramesError(f"{p.name}: no video frame could be decoded between {start:g} s and {end or info.duration:g} s.")
    known_end = stream_end or info.duration or None
    _check_not_cut_short(p.name, times, info.fps, min(end, known_end) if end and known_end else (end or known_end))
    audio = None
    if with_audio and info.has_audio:
        audio = _read_video_audio(p, start, end if end is not None else info.duration, audio_sample_rate, max_duration)
    return Video(np.stack(frames), np.asarray(times, dtype=np.float64), info.fps, info.duration, audio)


def _check_not_cut_short(name: str, times: list[float], fps: float, expected_end: float | None) -> None:
    """FFmpeg decodes a truncated file up to the cut without an error: compare the last
    frame with where the header says the span ends (half a second and 3 frames of slack)."""
    if expected_end is None or not times:
        return
    step = 1.0 / fps if fps else 0.0
    if expected_end - (times[-1] + step) > max(0.5, 3 * step):
        raise CorruptMediaError(
            f"{name}: the video stops at {times[-1] + step:.2f} s but its header says {expected_end:.2f} s; "
            "the file is truncated or damaged. Please upload it again."
        )


def _read_video_audio(p: Path, start: float, end: float, rate: int | None, budget: float) -> Audio:
    # A fresh container: the video pass has moved the demuxer past the span.
    with _open_av(p, "a video") as container:
        samples, rate = _decode_audio(container, container.streams.audio[0], start, end, rate, budget, p.name, VideoTooLongError)
    # Pad/trim to the span so audio and frames line up even where the track is shorter.
    n = round((end - start) * rate)
    samples = np.pad(samples[:, :n], ((0, 0), (0, max(0, n - samples.shape[1]))))
    return _make_audio(samples, rate, p.name)


@dataclass
class _VideoLimits:
    seconds: float
    pixels: int
    frames: int


def _decode_video(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, start: float,
    end: float | None, limits: _VideoLimits, name: str, fps: float,
) -> tuple[list[np.ndarray], list[float]]:
    origin, step = _origin(container), (1.0 / fps if fps else 0.0)
    _seek(container, stream, start)
    frames: list[np.ndarray] = []
    times: list[float] = []
    t = start - step
    size: tuple[int, int] | None = None
    for frame in _iter_frames(container, stream):
        # A frame without a timestamp is assumed to follow the previous one.
        t = frame.time - origin if frame.time is not None else t + step
        # The header said the file was within budget; the frames may say otherwise.
        if t > limits.seconds:
            raise VideoTooLongError(_too_long(name, "video", limits.seconds, limits.seconds, exact=False))
        if frame.width * frame.height > limits.pixels:
            raise VideoTooLargeError(_too_many_frame_pixels(name, frame.width, frame.height, limits.pixels))
        if t < start - 1e-6:  # between the keyframe we seeked to and `start`
            continue
        if end is not None and t >= end - 1e-6:
            break
        if len(frames) >= limits.frames:
            raise VideoTooLargeError(_too_many_frames(name, len(frames) + 1, limits.frames))
        size = size or (frame.width, frame.height)
        frames.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
        times.append(t)
    return frames, times


def _decode_audio(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, start: float,
    end: float | None, rate: int | None, budget: float, name: str, too_long: type[MediaError],
) -> tuple[np.ndarray, int]:
    """Audio samples [channels, n] of start <= t < end, float32 at `rate` (None: native)."""
    origin = _origin(container)
    ctx = stream.codec_context
    if ctx is None or not ctx.sample_rate:  # e.g. a WAV whose fmt chunk names no known codec
        raise CorruptMediaError(
            f"{name}: the sound track's header is damaged (no usable codec or sample rate). "
            "Please re-save the file and upload it again."
        )
    out_rate = rate or ctx.sample_rate
    # FFmpeg's resampler also converts any sample format to float and keeps the layout.
    # Packed ("flt"), not planar: PyAV 18 counts 9 planes in an 8-channel (7.1) planar
    # frame and its to_ndarray then reads past the plane table (a segfault).
    resampler = av.AudioResampler(format="flt", rate=out_rate)
    chunks: list[np.ndarray] = []
    first: float | None = None
    t_next = 0.0
    _seek(container, stream, start)
    for frame in _iter_frames(container, stream):
        # A frame without a timestamp is assumed to follow the previous one.
        t = frame.time - origin if frame.time is not None else t_next
        t_next = t + frame.samples / frame.sample_rate
        if t > budget:
            raise too_long(_too_long(name, "audio", budget, budget, exact=False))
        if end is not None and t >= end:
            break
        if t_next <= start:
            continue
        if first is None:
            first = t  # the resampler's output starts at its first input's time
        chunks.extend(_channels_first(out) for out in resampler.resample(frame))
    if first is None:
        return np.zeros((ctx.channels, 0), np.float32), out_rate
    chunks.extend(_channels_first(out) for out in resampler.resample(None))  # flush
    samples = np.concatenate(chunks, axis=1)
    offset = round((first - start) * out_rate)
    # Drop what precedes `start`; if the track starts late, pad so sample 0 is at `start`.
    samples = samples[:, -offset:] if offset < 0 else np.pad(samples, ((0, 0), (offset, 0)))
    if end is not None:
        samples = samples[:, : max(0, round((end - start) * out_rate))]
    return np.ascontiguousarray(samples, dtype=np.float32), out_rate


def _channels_first(frame: av.AudioFrame) -> np.ndarray:
    """[channels, n] from a packed frame ([1, n * channels], interleaved)."""
    return frame.to_ndarray().reshape(-1, frame.layout.nb_channels).T


def _make_audio(samples: np.ndarray, rate: int, name: str) -> Audio:
    # Not clipped: lossy decoders and float WAVs may exceed full scale slightly, and the
    # official ImageBind loader (torchaudio) keeps those values.
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    silent = peak < SILENCE_PEAK
    if silent:
        log.warning("%s: the audio is silent (peak %.1e); it is used as is.", name, peak)
    return Audio(samples, int(rate), silent)


def read_audio(
    path: PathLike, *, sample_rate: int | None = None, mono: bool = False, max_duration: float = MAX_AUDIO_SECONDS
) -> Audio:
    """Decode an audio file (or a video's audio track) to float32 [channels, n].

    Resampled to `sample_rate` when given; `mono=True` averages the channels. Zero length
    raises EmptyAudioError; silence is allowed but flagged (`silent=True`, warning logged).
    """
    p = _check_file(path, _AUDIO)
    with _open_av(p, "audio") as container:
        if not container.streams.audio:
            raise EmptyAudioError(f"{p.name}: there is no audio track in this file. Please upload a file with sound.")
        stream = container.streams.audio[0]
        declared = _metadata_duration(container, stream)
        if declared is not None and declared > max_duration:
            raise AudioTooLongError(_too_long(p.name, "audio", declared, max_duration))
        samples, rate = _decode_audio(container, stream, 0.0, None, sample_rate, max_duration, p.name, AudioTooLongError)
    if declared is not None:
        # AAC in MP4 decodes to whole 1024-sample frames: cut the padding past the declared
        # end. A larger excess means the header was an estimate (VBR MP3): keep everything.
        n = round(declared * rate)
        if 0 < samples.shape[1] - n <= 0.1 * rate:
            samples = samples[:, :n]
    if samples.shape[1] == 0:
        raise EmptyAudioError(f"{p.name}: the audio is empty (0 seconds long). Please record or upload it again.")
    if mono:
        samples = samples.mean(axis=0, keepdims=True)
    return _make_audio(samples, rate, p.name)


# ---------------------------------------------------------------------------- writers
def write_wav(path: PathLike, samples: np.ndarray, sample_rate: int) -> Path:
    """Write float samples ([channels, n] or [n], in [-1, 1]) as 16-bit PCM WAV, atomically."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"write_wav wants [channels, n] or [n], got shape {x.shape}")
    data = np.clip(x if x.ndim == 1 else x.T, -1.0, 1.0)  # soundfile wants [n, channels]
    with atomic_path(path) as tmp:
        sf.write(tmp, data, int(sample_rate), subtype="PCM_16", format="WAV")
    return Path(path)


def _to_video_frame(rgb: np.ndarray) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(rgb, format="rgb24")


def _even_size(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: pad an odd side by repeating its last pixel
    row/column (padding rather than cropping, so no content is lost)."""
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


def write_mp4(path: PathLike, frames: np.ndarray, fps: float, audio: Audio | None = None) -> Path:
    """Write uint8 [T,H,W,3] RGB frames as H.264/yuv420p MP4 (+faststart, so browsers can
    start playing before the download ends), with an AAC track if `audio` is given, atomically.
    An odd width or height is padded by one pixel (see `_even_size`)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise ValueError(f"write_mp4 wants uint8 [T,H,W,3] with T >= 1, got {frames.dtype} {frames.shape}")
    if not fps > 0:
        raise ValueError(f"write_mp4 wants fps > 0, got {fps}")
    frames = _even_size(frames)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            astream = None
            if audio is not None:
                layout = "mono" if audio.samples.ndim == 1 or audio.samples.shape[0] == 1 else "stereo"
                astream = container.add_stream("aac", rate=audio.sample_rate, layout=layout)
            for i, rgb in enumerate(frames):
                frame = _to_video_frame(rgb)
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
            if astream is not None:
                container.mux(astream.encode(_to_audio_frame(audio, astream.layout.name)))
                container.mux(astream.encode(None))
    return Path(path)


def _to_audio_frame(audio: Audio, layout: str) -> av.AudioFrame:
    x = np.clip(np.asarray(audio.samples, dtype=np.float32), -1.0, 1.0)
    if x.ndim == 1:
        x = x[None]
    if x.shape[0] > 2:  # AAC here is mono or stereo: keep the first two channels
        x = x[:2]
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x), format="fltp", layout=layout)
    frame.sample_rate, frame.pts, frame.time_base = audio.sample_rate, 0, Fraction(1, audio.sample_rate)
    return frame
