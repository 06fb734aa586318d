"""ImageBind preprocessing: checked against values derived by hand from the official recipe.

Expected numbers come from the arithmetic of imagebind/data.py and the libraries it calls
(torchvision Resize/CenterCrop, pytorchvideo's clip sampler / temporal subsample /
short-side scale / uniform_crop, torchaudio's Kaldi fbank), worked out in the comments,
or from deliberately different float64 reference code written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from xvila.constants import CLIP_MEAN, CLIP_STD, IMAGEBIND_AUDIO_MEAN, IMAGEBIND_AUDIO_STD
from xvila.encoders import imagebind_preprocess as ip

MEAN32 = torch.tensor(CLIP_MEAN, dtype=torch.float32)
STD32 = torch.tensor(CLIP_STD, dtype=torch.float32)
LOG_EPS = math.log(float(np.finfo(np.float32).eps))  # ln(2**-23) = -15.942385...


def _normed(value_0_255, channel):
    """What a pixel of value v becomes in channel c: (v / 255 - mean) / std, float32."""
    v = torch.tensor(float(value_0_255), dtype=torch.float32) / 255
    return ((v - MEAN32[channel]) / STD32[channel]).item()


# ----------------------------------------------------------------------------- image


def test_image_shape_and_flat_colour_normalises_exactly():
    # 448 x 300 -> short side 300 -> 224; long side int(224 * 448 / 300) = int(334.506) = 334.
    for colour in [(0, 0, 0), (255, 255, 255), (12, 200, 77)]:
        img = Image.new("RGB", (448, 300), colour)
        x = ip.image_to_tensor(img)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        for c in range(3):
            assert torch.allclose(x[c], torch.full((224, 224), _normed(colour[c], c)), atol=1e-6, rtol=0)


def test_image_crop_of_resized_448x300():
    # Resize to (w=334, h=224), then crop left = round((334 - 224) / 2) = 55, top = 0.
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (300, 448, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    resized = np.asarray(img.resize((334, 224), Image.BICUBIC))
    expected = resized[0:224, 55:279]
    x = ip.image_to_tensor(img)
    for c in range(3):
        ref = (torch.from_numpy(expected[..., c].copy()).float() / 255 - MEAN32[c]) / STD32[c]
        assert torch.equal(x[c], ref)


def test_image_tall_crop_offset():
    # 300 x 451 (w x h): new_h = int(224 * 451 / 300) = int(336.75) = 336; top = round(112 / 2) = 56.
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (451, 300, 3), dtype=np.uint8))
    resized = np.asarray(img.resize((224, 336), Image.BICUBIC))
    x = ip.image_to_tensor(img)
    ref = (torch.from_numpy(resized[56:280, 0:224, 1].copy()).float() / 255 - MEAN32[1]) / STD32[1]
    assert torch.equal(x[1], ref)


@pytest.mark.parametrize("width,left", [(225, 0), (227, 2), (229, 2), (231, 4), (224, 0)])
def test_image_centre_crop_rounds_half_to_even(width, left):
    # Height 224: no resize (short side already 224).  left = round((width - 224) / 2):
    # round(0.5) = 0, round(1.5) = 2, round(2.5) = 2, round(3.5) = 4 (Python rounds half to even).
    cols = np.arange(width, dtype=np.uint8)
    arr = np.zeros((224, width, 3), dtype=np.uint8)
    arr[..., 0] = cols[None, :]
    x = ip.image_to_tensor(Image.fromarray(arr))
    assert x[0, 0, 0].item() == pytest.approx(_normed(left, 0), abs=1e-6)
    assert x[0, 0, 223].item() == pytest.approx(_normed(left + 223, 0), abs=1e-6)


def test_image_centre_square_lands_in_the_centre():
    # A 100 x 100 green square centred in a white 448 x 300 image.  Scale 224 / 300: the square
    # spans x 174..274 -> 129.9..204.5 -> minus the crop's 55 -> 74.9..149.5; y 100..200 -> 74.7..149.3.
    arr = np.full((300, 448, 3), 255, dtype=np.uint8)
    arr[100:200, 174:274] = (0, 255, 0)
    x = ip.image_to_tensor(Image.fromarray(arr))
    green, white = _normed(0, 0), _normed(255, 0)  # red channel
    assert x[0, 112, 112].item() == pytest.approx(green, abs=1e-6)
    for y, xx in [(80, 80), (80, 144), (144, 80), (144, 144)]:  # inside, near the corners
        assert x[0, y, xx].item() == pytest.approx(green, abs=1e-6)
    for y, xx in [(0, 0), (0, 223), (223, 0), (223, 223), (112, 60), (112, 165), (60, 112), (165, 112)]:
        assert x[0, y, xx].item() == pytest.approx(white, abs=1e-6)


def test_image_non_rgb_is_converted():
    x = ip.image_to_tensor(Image.new("L", (224, 224), 100))
    for c in range(3):
        assert x[c, 5, 5].item() == pytest.approx(_normed(100, c), abs=1e-6)


# ----------------------------------------------------------------------------- clip spans


@pytest.mark.parametrize(
    "duration,clips,expected",
    [
        # max_start = 10 - 2 = 8, step = 8 / 4 = 2
        (10.0, 5, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]),
        # max_start = 1, step = 1 / 4
        (3.0, 5, [(0, 2), (0.25, 2.25), (0.5, 2.5), (0.75, 2.75), (1, 3)]),
        # shorter than a clip: max_start = 0, every clip at 0
        (1.0, 5, [(0, 2)] * 5),
        (2.0, 3, [(0, 2)] * 3),
        # audio: 5 s, 3 clips: max_start = 3, step = 1.5
        (5.0, 3, [(0, 2), (1.5, 3.5), (3, 5)]),
        # one clip: step = max_start / 1, only index 0
        (10.0, 1, [(0, 2)]),
    ],
)
def test_clip_spans(duration, clips, expected):
    got = ip.clip_spans(duration, 2, clips)
    assert len(got) == clips
    assert got == [(float(s), float(e)) for s, e in expected]


def test_clip_spans_rejects_zero_clips():
    with pytest.raises(ValueError):
        ip.clip_spans(10.0, 2, 0)


# ----------------------------------------------------------------------------- video


def _index_video(n, fps, h=240, w=320):
    """Flat frames whose value is their index (mod 256), times k / fps."""
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    frames[:] = (np.arange(n) % 256).astype(np.uint8)[:, None, None, None]
    return frames, np.arange(n) / fps


def _chosen_indices(out, clips, crops=3, channel=0):
    """Read back the frame index encoded in each clip's (first crop's) frames."""
    got = []
    for i in range(clips):
        clip = out[i * crops, channel]  # [T, H, W]
        vals = clip[:, 100, 100] * STD32[channel] + MEAN32[channel]
        got.append(tuple(int(round(v.item() * 255)) for v in vals))
    return got


def test_video_10s_picks_first_and_last_frame_of_each_clip():
    # 30 fps, 300 frames.  Clip [2i, 2i+2) holds frames 60i .. 60i+59; linspace(0, 59, 2) -> 0, 59.
    frames, times = _index_video(300, 30)
    spans = ip.clip_spans(10.0, 2, 5)
    out = ip.video_frames_to_clips(frames, times, spans)
    assert out.shape == (15, 3, 2, 224, 224)
    expected = [(0, 59), (60, 119), (120, 179), (180, 239), (240, 299)]
    assert _chosen_indices(out, 5) == [(a % 256, b % 256) for a, b in expected]
    # all three crops of a flat video are the same, in every channel
    assert torch.equal(out[3], out[4]) and torch.equal(out[4], out[5])
    assert out[0, 2, 1, 7, 9].item() == pytest.approx(_normed(59, 2), abs=1e-6)


def test_video_3s_fractional_starts():
    # 30 fps, 90 frames, spans start 0, .25, .5, .75, 1 and end 2 s later.
    # first = ceil(30 * start) = 0, 8, 15, 23, 30; last = ceil(30 * end) - 1 = 59, 67, 74, 82, 89.
    frames, times = _index_video(90, 30)
    spans = ip.clip_spans(3.0, 2, 5)
    expected = [(0, 59), (8, 67), (15, 74), (23, 82), (30, 89)]
    assert _chosen_indices(ip.video_frames_to_clips(frames, times, spans), 5) == expected
    # Timestamps with time-base jitter: with fps given, frame numbers decide (as decord does).
    jitter = np.where(np.arange(90) % 2 == 0, -1e-7, 1e-7)
    out = ip.video_frames_to_clips(frames, times + jitter, spans, fps=30.0)
    assert _chosen_indices(out, 5) == expected


def test_video_boundary_frame_belongs_to_next_clip():
    # A frame exactly at t = 2.0 is outside [0, 2) and inside [2, 4).
    frames, times = _index_video(120, 30)
    out = ip.video_frames_to_clips(frames, times, [(0.0, 2.0), (2.0, 4.0)])
    assert _chosen_indices(out, 2) == [(0, 59), (60, 119)]


def test_video_short_video_and_more_frames_per_clip():
    # 1 s at 10 fps: every span is [0, 2), holding frames 0..9 -> (0, 9) five times.
    frames, times = _index_video(10, 10)
    out = ip.video_frames_to_clips(frames, times, ip.clip_spans(1.0, 2, 5))
    assert _chosen_indices(out, 5) == [(0, 9)] * 5
    # 3 frames from 60: linspace(0, 59, 3) = 0, 29.5, 59 -> long() -> 0, 29, 59.
    frames, times = _index_video(60, 30)
    out = ip.video_frames_to_clips(frames, times, [(0.0, 2.0)], frames_per_clip=3)
    assert out.shape == (3, 3, 3, 224, 224)
    assert _chosen_indices(out, 1) == [(0, 29, 59)]
    # A single frame is repeated.
    out = ip.video_frames_to_clips(frames[:1], times[:1], [(0.0, 2.0)])
    assert _chosen_indices(out, 1) == [(0, 0)]


def _ramp_video(h, w, axis):
    """Two identical frames holding a ramp 0, 1, 2, ... along `axis` (0 = rows, 1 = columns)."""
    ramp = np.arange(h if axis == 0 else w, dtype=np.uint8)
    frame = np.empty((h, w, 3), dtype=np.uint8)
    frame[:] = ramp[:, None, None] if axis == 0 else ramp[None, :, None]
    return np.stack([frame, frame]), np.array([0.0, 0.5])


def _ramp_value(j, src, dst):
    """Bilinear (align_corners=False) resample of the ramp v(x) = x at output position j."""
    s = (j + 0.5) * src / dst - 0.5
    return min(max(s, 0.0), src - 1.0)


def test_video_wide_crops_slide_along_width():
    # 256 x 192 (w x h): short side 192 -> 224, width floor(256 / 192 * 224) = floor(298.67) = 298.
    # x offsets: 0, ceil((298 - 224) / 2) = 37, 298 - 224 = 74; y offset 0.
    frames, times = _ramp_video(192, 256, axis=1)
    out = ip.video_frames_to_clips(frames, times, [(0.0, 2.0)])
    assert out.shape == (3, 3, 2, 224, 224)
    for crop, off in enumerate([0, 37, 74]):
        for j in [3, 100, 200]:
            want = _ramp_value(j + off, 256, 298)
            got = out[crop, 0, 0, 50, j].item() * STD32[0].item() + MEAN32[0].item()
            assert got * 255 == pytest.approx(want, abs=2e-3)
    # rows are constant: the image was not cropped vertically
    assert torch.equal(out[1, 0, 0, 0], out[1, 0, 0, 223])


def test_video_tall_crops_slide_along_height():
    # 192 x 256 (w x h): width -> 224, height floor(256 / 192 * 224) = 298; y offsets 0, 37, 74.
    frames, times = _ramp_video(256, 192, axis=0)
    out = ip.video_frames_to_clips(frames, times, [(0.0, 2.0)])
    for crop, off in enumerate([0, 37, 74]):
        for i in [3, 100, 200]:
            want = _ramp_value(i + off, 256, 298)
            got = out[crop, 1, 1, i, 50].item() * STD32[1].item() + MEAN32[1].item()
            assert got * 255 == pytest.approx(want, abs=2e-3)


def test_video_square_crops_are_identical():
    frames, times = _ramp_video(300, 300, axis=1)
    out = ip.video_frames_to_clips(frames, times, [(0.0, 2.0)])
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_video_span_without_frames_uses_frame_on_screen():
    # 0.25 fps: frames at 0, 4, 8 s.  Span [5, 7) holds none -> the frame shown then (t = 4).
    frames, times = _index_video(3, 0.25)
    out = ip.video_frames_to_clips(frames, times, [(5.0, 7.0)])
    assert _chosen_indices(out, 1) == [(1, 1)]


# ----------------------------------------------------------------------------- Kaldi fbank


def _np_kaldi_fbank(x, sr=16000, bins=128):
    """float64 Kaldi fbank from the formulas, written independently (explicit DFT and loops)."""
    x = np.asarray(x, dtype=np.float64)
    win, hop, nfft = 400, 160, 512
    m = 1 + (len(x) - win) // hop
    n = np.arange(win)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / (win - 1))
    k = np.arange(nfft // 2 + 1)
    dft = np.exp(-2j * np.pi * np.outer(np.arange(nfft), k) / nfft)  # [512, 257]

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(sr / 2)
    d = (hi - lo) / (bins + 1)
    weights = np.zeros((bins, nfft // 2 + 1))
    for b in range(bins):
        left, centre, right = lo + b * d, lo + (b + 1) * d, lo + (b + 2) * d
        for j in range(nfft // 2):  # the Nyquist bin keeps weight 0
            mj = mel(j * sr / nfft)
            if left < mj <= centre:
                weights[b, j] = (mj - left) / (centre - left)
            elif centre < mj < right:
                weights[b, j] = (right - mj) / (right - centre)
    out = np.empty((m, bins))
    for f in range(m):
        fr = x[f * hop : f * hop + win].copy()
        fr -= fr.mean()
        pre = np.empty_like(fr)
        pre[0] = fr[0] - 0.97 * fr[0]
        pre[1:] = fr[1:] - 0.97 * fr[:-1]
        padded = np.zeros(nfft)
        padded[:win] = pre * hann
        power = np.abs(padded @ dft) ** 2
        out[f] = np.log(np.maximum(weights @ power, np.finfo(np.float32).eps))
    return out


@pytest.mark.parametrize("n,frames", [(32000, 198), (400, 1), (559, 1), (560, 2), (399, 0), (0, 0)])
def test_fbank_frame_count(n, frames):
    # snip_edges: 1 + (n - 400) // 160 frames, none below 400 samples (32000: 1 + 31600 // 160 = 198).
    out = ip.kaldi_fbank(torch.zeros(1, n), 16000)
    assert out.shape == (frames, 128)


def test_fbank_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    t = torch.arange(8000, dtype=torch.float64) / 16000
    signals = [
        0.1 * torch.randn(8000, generator=g, dtype=torch.float64),
        0.5 * torch.sin(2 * math.pi * 440 * t) + 0.05 * torch.randn(8000, generator=g, dtype=torch.float64) + 0.2,
    ]
    for s in signals:
        got = ip.kaldi_fbank(s.float()[None], 16000).double().numpy()
        ref = _np_kaldi_fbank(s.float().double().numpy())
        assert got.shape == ref.shape == (48, 128)
        # float32 FFT vs float64 DFT: ~3e-6 typically, ~1e-4 in the weakest (lowest) bins
        assert np.median(np.abs(got - ref)) < 1e-5
        assert np.max(np.abs(got - ref)) < 5e-4


def test_fbank_tone_peaks_in_nearest_mel_bin():
    # mel(f) = 1127 ln(1 + f/700): mel(20) = 31.749, mel(8000) = 2840.038, spacing
    # (2840.038 - 31.749) / 129 = 21.770; bin b is centred at mel(20) + (b + 1) * 21.770.
    # mel(1000) = 999.991 -> (999.991 - 31.749) / 21.770 = 44.48 -> b + 1 = 44 -> bin 43.
    t = torch.arange(32000) / 16000
    tone = torch.sin(2 * math.pi * 1000 * t)[None].float()
    fb = ip.kaldi_fbank(tone, 16000)
    assert fb.shape == (198, 128)
    assert int(fb.mean(0).argmax()) == 43
    assert (fb.argmax(dim=1) == 43).all()


def test_fbank_silence_is_log_eps():
    fb = ip.kaldi_fbank(torch.zeros(1, 16000), 16000)
    assert torch.allclose(fb, torch.full_like(fb, LOG_EPS), atol=1e-6, rtol=0)
    assert fb[0, 0].item() == pytest.approx(-15.942385, abs=1e-5)


def test_fbank_reads_channel_zero_only():
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(16000, generator=g)
    silent_first = torch.stack([torch.zeros(16000), noise])
    assert torch.allclose(ip.kaldi_fbank(silent_first, 16000), torch.tensor(LOG_EPS), atol=1e-6, rtol=0)
    loud_first = torch.stack([noise, torch.zeros(16000)])
    assert torch.equal(ip.kaldi_fbank(loud_first, 16000), ip.kaldi_fbank(noise[None], 16000))
    assert (ip.kaldi_fbank(loud_first, 16000) > 0).float().mean() > 0.5


# ----------------------------------------------------------------------------- melspec / clips


def test_melspec_pads_with_zeros_and_cuts():
    g = torch.Generator().manual_seed(5)
    w = 0.1 * torch.randn(1, 40000, generator=g)
    # 32000 samples -> 198 frames -> 6 zero columns
    m = ip.waveform_to_melspec(w[:, :32000], 16000)
    assert m.shape == (1, 128, 204)
    assert torch.equal(m[0, :, 198:], torch.zeros(128, 6))
    assert torch.equal(m[0, :, :198], ip.kaldi_fbank(w[:, :32000] - w[:, :32000].mean(), 16000).T)
    # 40000 samples -> 248 frames -> the first 204
    m = ip.waveform_to_melspec(w, 16000)
    assert torch.equal(m[0], ip.kaldi_fbank(w - w.mean(), 16000).T[:, :204])


def test_melspec_leaves_input_alone_and_ignores_channel_one():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16000, generator=g)
    before = x.clone()
    m2 = ip.waveform_to_melspec(x, 16000)
    assert torch.equal(x, before)
    # channel 1 only moves the mean, which the per-frame DC removal takes out again
    m1 = ip.waveform_to_melspec(x[:1] - x.mean(), 16000)
    # (float32 rounding of the re-removed mean reaches ~2e-4 in the weakest bins)
    assert torch.allclose(m2, m1, atol=2e-3, rtol=0)


def test_melspec_of_a_clip_shorter_than_one_window_is_zero():
    m = ip.waveform_to_melspec(torch.randn(1, 300), 16000)
    assert torch.equal(m, torch.zeros(1, 128, 204))


def test_audio_clips_silence_values():
    # 2 s of silence: 198 frames of log(eps), 6 padded zeros; normalised (x + 4.268) / 9.138.
    out = ip.audio_to_clips(np.zeros((1, 32000), dtype=np.float32))
    assert out.shape == (3, 1, 128, 204)
    silent = (LOG_EPS - IMAGEBIND_AUDIO_MEAN) / IMAGEBIND_AUDIO_STD  # -1.27756
    padded = (0.0 - IMAGEBIND_AUDIO_MEAN) / IMAGEBIND_AUDIO_STD  # 0.46706
    assert silent == pytest.approx(-1.27756, abs=1e-5) and padded == pytest.approx(0.46706, abs=1e-5)
    assert torch.allclose(out[..., :198], torch.tensor(silent), atol=1e-5, rtol=0)
    assert torch.allclose(out[..., 198:], torch.tensor(padded), atol=1e-6, rtol=0)
    # mono [n] input and a torch tensor are accepted
    assert torch.equal(ip.audio_to_clips(torch.zeros(32000)), out)


def test_audio_clips_short_audio_repeats_and_empty_audio():
    g = torch.Generator().manual_seed(7)
    w = 0.1 * torch.randn(1, 16000, generator=g)  # 1 s -> three clips of samples [0:32000] = all
    out = ip.audio_to_clips(w)
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[1], out[2], atol=1e-5)
    # 1 s -> 1 + 15600 // 160 = 98 frames, then 106 padded columns
    assert torch.allclose(out[0, 0, :, 98:], torch.tensor(-IMAGEBIND_AUDIO_MEAN / IMAGEBIND_AUDIO_STD))
    empty = ip.audio_to_clips(np.zeros((2, 0), dtype=np.float32))
    assert torch.allclose(empty, torch.tensor(-IMAGEBIND_AUDIO_MEAN / IMAGEBIND_AUDIO_STD))


def test_audio_clips_mean_removal_is_in_place_over_all_channels():
    # 5 s, 2 channels: channel 0 silent, channel 1 constant 1.  Clips: samples [0:32000],
    # [24000:56000], [48000:80000].
    # Clip 0: mean over both channels = 0.5, subtracted in place from the shared waveform, so
    # channel 0 holds -0.5 on [0:32000].  Clip 1 then sees a step at its local sample 8000;
    # only frames 48 (7680..8079) and 49 (7840..8239) straddle it - every other frame is
    # constant and DC removal makes it silent.  Its mean (-0.5*8000 + 32000) / 64000 = 0.4375
    # leaves a step at local sample 8000 of clip 2 too (56000 - 48000).  Clip 0 is all silent.
    # (Were the mean taken over channel 0 only, it would be 0 and nothing would ever change.)
    w = np.zeros((2, 80000), dtype=np.float32)
    w[1] = 1.0
    out = ip.audio_to_clips(w, clips_per_video=3)
    silent = (LOG_EPS - IMAGEBIND_AUDIO_MEAN) / IMAGEBIND_AUDIO_STD
    assert torch.allclose(out[0, 0, :, :198], torch.tensor(silent), atol=1e-4)
    for clip in (1, 2):
        loud_frames = (out[clip, 0, :, :198] > silent + 0.1).any(dim=0).nonzero().flatten().tolist()
        assert loud_frames == [48, 49]
    assert np.all(w[0] == 0)  # the caller's array is not modified


def test_audio_clips_normalisation():
    g = torch.Generator().manual_seed(8)
    w = 0.1 * torch.randn(1, 32000, generator=g)
    out = ip.audio_to_clips(w, clips_per_video=1)
    mel = ip.waveform_to_melspec(w, 16000)
    assert torch.allclose(out[0], (mel - IMAGEBIND_AUDIO_MEAN) / IMAGEBIND_AUDIO_STD, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- files


def test_load_image(tmp_path):
    media = pytest.importorskip("xvila.media")
    rng = np.random.default_rng(9)
    path = tmp_path / "im.png"
    Image.fromarray(rng.integers(0, 256, (300, 448, 3), dtype=np.uint8)).save(path)
    assert torch.equal(ip.load_image(path), ip.image_to_tensor(media.read_image(path)))
    assert torch.equal(ip.load_image(path), ip.image_to_tensor(Image.open(path).convert("RGB")))


def _write_index_video(path, n, fps, w=320, h=240, audio_seconds=0.0):
    """A video whose frame k is flat grey of level 5 * (k // 2) (two frames per level),
    with an optional (longer) AAC track of `audio_seconds`."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "0", "preset": "ultrafast"}
        a = c.add_stream("aac", rate=16000) if audio_seconds else None
        for k in range(n):
            level = 5 * (k // 2)
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), level, dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            sr = 16000
            x = (0.2 * np.sin(2 * np.pi * 440 * np.arange(int(audio_seconds * sr)) / sr)).astype(np.float32)
            for i in range(0, len(x), 1024):
                fr = av.AudioFrame.from_ndarray(x[None, i : i + 1024].copy(), format="flt", layout="mono")
                fr.sample_rate, fr.pts = sr, i
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)


@pytest.mark.parametrize("audio_seconds", [0.0, 4.6])
def test_load_video(tmp_path, audio_seconds):
    media = pytest.importorskip("xvila.media")
    path = tmp_path / "v.mp4"
    _write_index_video(path, 100, 25, audio_seconds=audio_seconds)  # 4 s of video at 25 fps
    if audio_seconds:
        # the container lasts as long as the audio; the clips still follow the frames
        assert media.probe_video(path).duration > 4.5
    out = ip.load_video(path)
    assert out.shape == (15, 3, 2, 224, 224)
    # duration = 100 frames / 25 fps = 4 s (decord's), not the container's;
    # spans start 0, .5, 1, 1.5, 2 (max_start 2, step .5); frames ceil(25 s) .. ceil(25 (s+2)) - 1:
    # (0, 49), (13, 62), (25, 74), (38, 87), (50, 99) -> levels 5 * (k // 2).
    expected = [(0, 49), (13, 62), (25, 74), (38, 87), (50, 99)]
    for clip, (a, b) in enumerate(expected):
        for t, k in enumerate((a, b)):
            level = 5 * (k // 2)
            got = out[3 * clip + 1, :, t, 112, 112] * STD32 + MEAN32
            assert torch.allclose(got * 255, torch.full((3,), float(level)), atol=2.5), (clip, t, got * 255)


def test_load_audio(tmp_path):
    media = pytest.importorskip("xvila.media")
    sf = pytest.importorskip("soundfile")
    g = np.random.default_rng(10)
    x = (0.1 * g.standard_normal((2, 48000))).astype(np.float32)
    path = tmp_path / "a.wav"
    sf.write(str(path), x.T, 16000, subtype="FLOAT")
    out = ip.load_audio(path)
    assert out.shape == (3, 1, 128, 204)
    assert torch.allclose(out, ip.audio_to_clips(x, 16000), atol=1e-5)
    # another rate is resampled to 16 kHz by the decoder: still 3 clips of 204 frames
    path44 = tmp_path / "b.wav"
    sf.write(str(path44), x[:, :44100].T, 44100, subtype="FLOAT")
    out44 = ip.load_audio(path44)
    assert out44.shape == (3, 1, 128, 204) and torch.isfinite(out44).all()
    assert media.read_audio(path44, sample_rate=16000).sample_rate == 16000
