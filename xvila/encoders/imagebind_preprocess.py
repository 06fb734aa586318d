"""ImageBind input preprocessing, in plain torch / numpy / PIL.

This module is an independent re-implementation of what the official ImageBind loaders
(``imagebind/data.py`` in facebookresearch/ImageBind: ``load_and_transform_vision_data``,
``load_and_transform_video_data`` and ``load_and_transform_audio_data``) compute, without
torchvision, torchaudio, pytorchvideo or decord.  The arithmetic of every step follows the
libraries the official code calls, so that the tensors fed to the encoder are the same:

Image (torchvision ``Resize(224, BICUBIC)``, ``CenterCrop(224)``, ``ToTensor``, ``Normalize``)
    * PIL bicubic resize of the short side to 224; the long side is
      ``int(224 * long / short)`` (torchvision's ``_compute_resized_output_size``).
    * centre crop with ``top = int(round((h - 224) / 2.0))`` (Python's round: half to even),
      ``left`` likewise.
    * ``uint8 -> float32 / 255``, then ``(x - mean) / std`` with the CLIP mean/std in float32.

Clip sampling (pytorchvideo ``ConstantClipsPerVideoSampler``, exact ``Fraction`` arithmetic)
    * ``max_start = Fraction(max(duration - clip_duration, 0))`` (the subtraction itself is a
      float subtraction), ``step = max_start / max(clips - 1, 1)``, clip ``i`` spans
      ``[step * i, step * i + clip_duration)``.  Sampling stops after ``clips`` clips or once
      ``step * (i + 1) > max_start``; with this step the second test never fires first, so
      there are always exactly ``clips`` clips.  A medium shorter than one clip gives
      ``clips`` identical clips ``[0, clip_duration)``.

Video (``load_and_transform_video_data``: decord, 5 clips x 2 s)
    * the frames of a clip are decord frame indices ``ceil(fps * start) ..
      min(ceil(fps * end), num_frames) - 1`` (``EncodedVideoDecord.get_clip``), i.e. the
      frames whose nominal time ``index / fps`` lies in ``[start, end)``; the video duration
      that the clips are spread over is ``num_frames / fps``.
    * ``UniformTemporalSubsample(clip_duration)``: indices
      ``torch.linspace(0, T - 1, n).clamp(0, T - 1).long()`` - for 2 frames, the first and
      last frame of the clip.
    * ``/ 255``, then pytorchvideo ``ShortSideScale(224)``: bilinear
      ``F.interpolate(align_corners=False)`` on ``[C, T, H, W]`` to short side 224 and long
      side ``int(floor(long / short * 224))`` (note: a different rounding than the image path).
    * normalise with the CLIP mean/std, then three crops (``uniform_crop``): offsets
      ``ceil((dim - 224) / 2)``; along the longer side (width when ``H <= W``) the crops sit
      at 0, at the centre offset and at the end.  Output order is clip-major:
      ``[clip0 crop0, clip0 crop1, clip0 crop2, clip1 crop0, ...]`` -> ``[15, 3, 2, 224, 224]``.

Audio (``load_and_transform_audio_data``: 16 kHz, 3 clips x 2 s, 128 x 204 log-mel)
    * clips are spread over ``duration = num_samples / 16000``; clip samples are
      ``[int(start * sr) : int(end * sr)]`` computed on the exact fractions.
    * each clip: ``clip -= clip.mean()`` (mean over *all* channels and samples), then
      torchaudio's Kaldi ``fbank`` (htk_compat, no energy, Hanning window, 128 bins, no
      dither, 25 ms / 10 ms), which only reads channel 0.  The official code subtracts the
      mean *in place on a view of the whole waveform*, so where clips overlap a later clip
      sees the samples already shifted by the mean of the earlier clips; this is reproduced.
    * Kaldi fbank details (torchaudio ``compliance.kaldi``): ``snip_edges`` framing
      (``1 + (n - 400) // 160`` frames), per-frame DC removal, pre-emphasis 0.97 with the
      first sample replicated, symmetric Hann window (``torch.hann_window(400,
      periodic=False)``), zero padding to a 512-point FFT, power spectrum ``|rfft|^2``,
      Kaldi mel banks (``1127 ln(1 + f / 700)``, 20 Hz .. Nyquist, triangles evaluated on FFT
      bins 0..255, a zero column for the Nyquist bin), ``log(max(x, float32 eps))``.
    * transpose to ``[128, frames]``, zero-pad on the right or cut to 204 frames,
      ``[1, 128, 204]``, then ``(x - (-4.268)) / 9.138``.

Deliberate differences from the official code:
    * audio resampling to 16 kHz is done by the decoder (``xvila.media.read_audio``, i.e.
      libswresample through PyAV), not by ``torchaudio.functional.resample``'s windowed-sinc
      filter, so audio that is not already at 16 kHz differs slightly (well inside what the
      model tolerates; 16 kHz input is identical).
    * a clip shorter than one Kaldi window (400 samples = 25 ms) makes the official code fail
      (an assertion in torchaudio, then a division by zero); here it yields zero frames, so
      after the zero padding the clip's spectrogram is all zeros (the official padding value).
    * a video clip span containing no frame (a video with under 0.5 fps) makes the official
      code fail; here the clip uses the last frame shown before the span ends (or the first
      frame of the video).
    * video frames are decoded with PyAV (``xvila.media``) instead of decord; the frames
      and their selection are the same for ordinary constant-frame-rate files.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xvila import media
from xvila.constants import (
    AUDIO,
    IMAGE,
    VIDEO,
    CLIP_MEAN,
    CLIP_STD,
    IMAGEBIND_AUDIO_MEAN,
    IMAGEBIND_AUDIO_STD,
    IMAGEBIND_SAMPLE_RATE,
)

__all__ = [
    "image_to_tensor",
    "clip_spans",
    "video_frames_to_clips",
    "kaldi_fbank",
    "waveform_to_melspec",
    "audio_to_clips",
    "load_image",
    "load_video",
    "load_audio",
    "load",
]

logger = logging.getLogger(__name__)

# Kaldi's floor on the mel energies before the log: std::numeric_limits<float>::epsilon().
_FLOAT32_EPS = torch.finfo(torch.float32).eps


def _normalise_channels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std along dim 0, in x's dtype (as torchvision's Normalize)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    m = torch.as_tensor(mean, dtype=x.dtype).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype).view(shape)
    return (x - m) / s


# --------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------


def image_to_tensor(image: Image.Image, size: int = 224) -> torch.Tensor:
    """One image -> ``[3, size, size]`` float32, as ImageBind's vision transform."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    # Short side to `size`; long side int(size * long / short) (integer product, float division).
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # [H, W, 3]
    x = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return _normalise_channels(x, CLIP_MEAN, CLIP_STD)


# --------------------------------------------------------------------------------------
# Clip sampling
# --------------------------------------------------------------------------------------


def _clip_spans_exact(duration: float, clip_duration: float, clips_per_video: int) -> list[tuple[Fraction, Fraction]]:
    """The (start, end) pairs ConstantClipsPerVideoSampler yields, as exact fractions."""
    if clips_per_video < 1:
        raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
    clip = Fraction(clip_duration)
    # float - Fraction is a float subtraction; only its result is made exact.
    max_start = Fraction(max(float(duration) - float(clip), 0))
    step = Fraction(max_start, max(clips_per_video - 1, 1))
    spans = []
    index = 0
    while True:
        start = step * index
        spans.append((start, start + clip))
        index += 1
        if index >= clips_per_video or step * index > max_start:
            break
    return spans


def clip_spans(duration: float, clip_duration: float, clips_per_video: int) -> list[tuple[float, float]]:
    """Start/end times (seconds) of the clips ImageBind takes from a medium of `duration` s."""
    return [(float(s), float(e)) for s, e in _clip_spans_exact(duration, clip_duration, clips_per_video)]


# --------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------


def _frames_in_span(times: np.ndarray, start: float, end: float, fps: float | None) -> np.ndarray:
    """Indices (into `times`) of the frames a clip [start, end) holds.

    With `fps`, decord's rule on nominal frame numbers: ``ceil(fps*start) <= k < ceil(fps*end)``
    with ``k = round(t * fps)``, which is immune to time-base rounding of the timestamps.
    Without it, ``start <= t < end`` on the timestamps themselves.
    """
    times = np.asarray(times, dtype=np.float64)
    if fps is not None and fps > 0:
        k = np.rint(times * fps)
        lo, hi = math.ceil(fps * float(start)), math.ceil(fps * float(end))
        inside = (k >= lo) & (k < hi)
    else:
        inside = (times >= float(start)) & (times < float(end))
    picked = np.flatnonzero(inside)
    if picked.size == 0 and times.size:
        # No frame inside the span (very low frame rate): the frame on screen at its end.
        before = np.flatnonzero(times < float(end))
        picked = np.array([before[-1] if before.size else int(np.argmin(times))])
    return picked


def _short_side_scale(x: torch.Tensor, size: int) -> torch.Tensor:
    """pytorchvideo ShortSideScale on [C, T, H, W] float32 (bilinear, align_corners=False)."""
    _, _, h, w = x.shape
    if w < h:
        new_h, new_w = int(math.floor((float(h) / w) * size)), size
    else:
        new_h, new_w = size, int(math.floor((float(w) / h) * size))
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)


def _three_crop_offsets(height: int, width: int, size: int, num_crops: int) -> list[tuple[int, int]]:
    """(y, x) offsets of ImageBind's uniform_crop for spatial indices 0, 1, 2 (or 1 only)."""
    y_mid = int(math.ceil((height - size) / 2))
    x_mid = int(math.ceil((width - size) / 2))
    if num_crops == 3:
        indices = (0, 1, 2)
    elif num_crops == 1:
        indices = (1,)
    else:
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    offsets = []
    for idx in indices:
        y, x = y_mid, x_mid
        if height > width:
            y = {0: 0, 1: y_mid, 2: height - size}[idx]
        else:
            x = {0: 0, 1: x_mid, 2: width - size}[idx]
        offsets.append((y, x))
    return offsets


def _clip_to_crops(frames: np.ndarray, frames_per_clip: int, size: int, num_crops: int) -> list[torch.Tensor]:
    """uint8 [T, H, W, 3] frames of one clip -> num_crops tensors [3, frames_per_clip, size, size]."""
    t = frames.shape[0]
    idx = torch.linspace(0, t - 1, frames_per_clip).clamp(0, t - 1).long()
    chosen = torch.from_numpy(np.ascontiguousarray(frames))[idx]  # [n, H, W, 3] uint8
    x = chosen.permute(3, 0, 1, 2).contiguous().to(torch.float32) / 255.0  # [3, n, H, W]
    x = _short_side_scale(x, size)
    x = _normalise_channels(x, CLIP_MEAN, CLIP_STD)
    _, _, h, w = x.shape
    return [x[:, :, y : y + size, xo : xo + size] for y, xo in _three_crop_offsets(h, w, size, num_crops)]


def video_frames_to_clips(
    frames: np.ndarray,
    times: np.ndarray,
    spans: Sequence[tuple[float, float]],
    frames_per_clip: int = 2,
    size: int = 224,
    num_crops: int = 3,
    *,
    fps: float | None = None,
) -> torch.Tensor:
    """Decoded frames -> ImageBind video input ``[len(spans) * num_crops, 3, frames_per_clip, size, size]``.

    frames: uint8 ``[T, H, W, 3]``; times: their timestamps in seconds ``[T]``; spans: clip
    (start, end) times, e.g. from :func:`clip_spans`.  A clip holds the frames with
    ``start <= t < end``; pass the video's `fps` to decide that on frame numbers as decord does.
    """
    frames = np.asarray(frames)
    times = np.asarray(times, dtype=np.float64)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("no frames")
    if times.shape != (frames.shape[0],):
        raise ValueError(f"times must be [{frames.shape[0]}], got {times.shape}")
    out: list[torch.Tensor] = []
    for start, end in spans:
        picked = _frames_in_span(times, start, end, fps)
        out.extend(_clip_to_crops(frames[picked], frames_per_clip, size, num_crops))
    return torch.stack(out, dim=0)


# --------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------


def _mel_scale(freq):
    return 1127.0 * (1.0 + freq / 700.0).log()


def _kaldi_mel_banks(num_bins: int, fft_size: int, sample_rate: float, low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi triangular mel filters on the FFT bins, float32 ``[num_bins, fft_size // 2 + 1]``.

    The triangles are evaluated (in float32, as torchaudio does) on bins 0 .. fft_size/2 - 1;
    the Nyquist bin gets a zero weight.
    """
    if num_bins <= 3:
        raise ValueError("need more than 3 mel bins")
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel range {low_freq}..{high_freq} Hz for Nyquist {nyquist} Hz")
    bin_width = sample_rate / fft_size
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    centre = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _mel_scale(bin_width * torch.arange(fft_size / 2)).unsqueeze(0)  # float32 [1, fft/2]
    rising = (mel - left) / (centre - left)
    falling = (right - mel) / (right - centre)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return F.pad(banks, (0, 1))


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> torch.Tensor:
    """Kaldi log-mel filterbank as ImageBind calls torchaudio's ``compliance.kaldi.fbank``.

    waveform: ``[C, n]`` (or ``[n]``); only channel 0 is used.  Returns float32
    ``[frames, num_mel_bins]`` with ``frames = 1 + (n - window) // shift`` (0 when
    ``n < window``).  Options fixed as in ImageBind: hanning window, dither 0, no energy,
    snip_edges, DC removal, pre-emphasis 0.97, FFT size rounded up to a power of two,
    20 Hz .. Nyquist.
    """
    wave = torch.as_tensor(waveform)
    if wave.dim() == 2:
        wave = wave[0]
    elif wave.dim() != 1:
        raise ValueError(f"waveform must be [C, n] or [n], got {tuple(wave.shape)}")
    if not wave.is_floating_point():
        wave = wave.to(torch.float32)
    dtype = wave.dtype
    shift = int(sample_rate * frame_shift_ms * 0.001)
    length = int(sample_rate * frame_length_ms * 0.001)
    if length < 2 or shift < 1:
        raise ValueError("frame length must be >= 2 samples and shift >= 1 sample")
    fft_size = 2 ** (length - 1).bit_length()  # next power of two (400 -> 512)
    banks = _kaldi_mel_banks(num_mel_bins, fft_size, sample_rate).to(dtype)
    n = wave.shape[0]
    if n < length:
        return torch.zeros((0, num_mel_bins), dtype=dtype)
    frames = wave.unfold(0, length, shift)  # [m, length], frames start every `shift` samples
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous
    frames = frames * torch.hann_window(length, periodic=False, dtype=dtype).unsqueeze(0)
    frames = F.pad(frames, (0, fft_size - length))
    power = torch.fft.rfft(frames).abs().pow(2.0)  # [m, fft/2 + 1]
    energies = torch.mm(power, banks.T)
    return torch.maximum(energies, torch.tensor(_FLOAT32_EPS, dtype=dtype)).log()


def _melspec_in_place(clip: torch.Tensor, sample_rate: int, num_mel_bins: int, target_length: int) -> torch.Tensor:
    """ImageBind's waveform2melspec; subtracts the clip mean from `clip` in place (as it does)."""
    clip -= clip.mean()
    fbank = kaldi_fbank(clip, sample_rate, num_mel_bins).transpose(0, 1)  # [bins, frames]
    n_frames = fbank.shape[1]
    gap = target_length - n_frames
    if n_frames == 0 or abs(gap) / n_frames > 0.2:
        logger.debug("audio clip has %d fbank frames for a target of %d", n_frames, target_length)
    if gap > 0:
        fbank = F.pad(fbank, (0, gap), value=0.0)
    elif gap < 0:
        fbank = fbank[:, :target_length]
    return fbank.unsqueeze(0)


def waveform_to_melspec(
    waveform: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = 128,
    target_length: int = 204,
) -> torch.Tensor:
    """One clip ``[C, n]`` -> ``[1, num_mel_bins, target_length]`` log-mel (not normalised).

    Removes the clip's mean (over all channels), computes the Kaldi fbank of channel 0 and
    zero-pads / cuts it to `target_length` frames.  The input is left unchanged.
    """
    clip = torch.as_tensor(waveform)
    if clip.dim() == 1:
        clip = clip.unsqueeze(0)
    clip = clip.to(torch.float32).clone()
    return _melspec_in_place(clip, sample_rate, num_mel_bins, target_length)


def audio_to_clips(
    samples: np.ndarray | torch.Tensor,
    sample_rate: int = IMAGEBIND_SAMPLE_RATE,
    clip_duration: float = 2,
    clips_per_video: int = 3,
    num_mel_bins: int = 128,
    target_length: int = 204,
) -> torch.Tensor:
    """Waveform ``[C, n]`` (or ``[n]``) -> ImageBind audio input ``[clips, 1, num_mel_bins, target_length]``.

    `samples` should already be at 16 kHz (ImageBind's rate); `sample_rate` is only used for
    the clip arithmetic and the fbank.  The input is left unchanged.
    """
    wave = torch.as_tensor(np.asarray(samples) if not isinstance(samples, torch.Tensor) else samples)
    if wave.dim() == 1:
        wave = wave.unsqueeze(0)
    if wave.dim() != 2:
        raise ValueError(f"samples must be [C, n] or [n], got {tuple(wave.shape)}")
    # A private copy: the official loader removes each clip's mean in place on a view of the
    # whole waveform, so overlapping clips see earlier clips' shifts.  Reproduce that.
    wave = wave.to(torch.float32).clone()
    duration = wave.shape[1] / sample_rate
    mean = torch.tensor(IMAGEBIND_AUDIO_MEAN, dtype=torch.float32)
    std = torch.tensor(IMAGEBIND_AUDIO_STD, dtype=torch.float32)
    clips = []
    for start, end in _clip_spans_exact(duration, clip_duration, clips_per_video):
        view = wave[:, int(start * sample_rate) : int(end * sample_rate)]
        mel = _melspec_in_place(view, sample_rate, num_mel_bins, target_length)
        clips.append((mel - mean) / std)
    return torch.stack(clips, dim=0)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def load_image(path, size: int = 224) -> torch.Tensor:
    """Image file -> ``[3, size, size]`` (``[3, 224, 224]``)."""

    return image_to_tensor(media.read_image(path), size)


def _video_timeline(path) -> tuple[int, float, float] | None:
    """(frame count, average frame rate, first frame's time) from the video stream's header.

    The official loader (decord) numbers the frames from the stream's first one and spreads
    its clips over ``num_frames / avg_fps``, not over the container's duration (which an
    audio track can make longer).  The first frame's time is relative to the container's
    start, as ``xvila.media`` reports frame times.  None when the header lacks the numbers.
    """
    import av

    try:
        with av.open(str(path), metadata_errors="replace") as container:  # tags need not be UTF-8
            for stream in container.streams.video:
                if stream.disposition & av.stream.Disposition.attached_pic:
                    continue
                if not stream.average_rate:
                    return None
                count = int(stream.frames or 0)
                if count <= 0:
                    # No count in the header (WebM, some AVI): count the packets, as decord
                    # indexes them - demuxing only, no decoding.
                    count = sum(1 for packet in container.demux(stream) if packet.size)
                    if count <= 0:
                        return None
                first = 0.0
                if stream.start_time is not None and stream.time_base:
                    first = float(stream.start_time * stream.time_base)
                    if container.start_time is not None:
                        first -= container.start_time / av.time_base
                return count, float(stream.average_rate), max(first, 0.0)
    except Exception:  # noqa: BLE001 - media.probe_video reports unreadable files properly
        return None
    return None


def load_video(path, clip_duration: float = 2, clips_per_video: int = 5, size: int = 224) -> torch.Tensor:
    """Video file -> ``[clips_per_video * 3, 3, clip_duration, size, size]`` (``[15, 3, 2, 224, 224]``).

    As the official loader: clips are spread over ``num_frames / avg_fps``, a clip holds the
    frames numbered ``ceil(fps * start) .. ceil(fps * end) - 1`` and keeps ``clip_duration``
    of them (``UniformTemporalSubsample(clip_duration)``).  Only the frames near each clip
    span are decoded.
    """

    info = media.probe_video(path)  # typed errors and budgets first
    timeline = _video_timeline(path)
    if timeline is not None:
        num_frames, fps, first = timeline
        duration = float(num_frames) / float(fps)
    else:
        fps, duration, first = (float(info.fps) or None), float(info.duration), 0.0
    frames_per_clip = int(clip_duration)
    margin = 0.5 / fps if fps else 0.0
    out = []
    for start, end in clip_spans(duration, clip_duration, clips_per_video):
        # Decode a half-frame margin each side; frame numbers then decide, as in decord.
        lo, hi = max(first + start - margin, 0.0), first + end + margin
        try:
            video = media.read_video(path, start=lo, end=hi, with_audio=False)
        except media.NoFramesError:
            # No frame near the span (a frame rate under 0.5 fps, or a header that
            # overstates the length): use what precedes its end, else the whole video.
            try:
                video = media.read_video(path, start=0.0, end=hi, with_audio=False)
            except media.NoFramesError:
                video = media.read_video(path, with_audio=False)
        times = video.times - first
        out.append(video_frames_to_clips(video.frames, times, [(start, end)], frames_per_clip, size, fps=fps))
    return torch.cat(out, dim=0)


def load_audio(path, clip_duration: float = 2, clips_per_video: int = 3, num_mel_bins: int = 128,
               target_length: int = 204) -> torch.Tensor:
    """Audio (or video) file -> ``[clips_per_video, 1, num_mel_bins, target_length]``
    (``[3, 1, 128, 204]``), resampled to 16 kHz."""
    audio = media.read_audio(path, sample_rate=IMAGEBIND_SAMPLE_RATE, mono=False)
    return audio_to_clips(audio.samples, audio.sample_rate, clip_duration, clips_per_video, num_mel_bins, target_length)


def load(path, modality: str, config=None) -> torch.Tensor:
    """A file of `modality` ("image", "video", "audio") -> the input of an ImageBind built
    from `config` (an `ImageBindConfig`; None: ImageBind-huge's 224 px, 128 x 204 mel).
    Only the sizes follow the config; clip sampling is the official one."""
    if modality == IMAGE:
        return load_image(path) if config is None else load_image(path, config.image_size)
    if modality == VIDEO:
        return load_video(path) if config is None else load_video(path, size=config.image_size)
    if modality == AUDIO:
        if config is None:
            return load_audio(path)
        return load_audio(path, num_mel_bins=config.audio_num_mel_bins, target_length=config.audio_target_len)
    raise ValueError(f"ImageBind preprocessing has no modality {modality!r}; use image, video or audio")
