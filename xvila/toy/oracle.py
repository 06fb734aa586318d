"""Reading world media back without learned models: the referee of the toy evaluation.

    from xvila.toy import oracle, world
    seen = oracle.read_image(world.render_image(scene))   # background, things (colour, shape, position)
    seen = oracle.read_video(world.render_video(scene))   # ... and each thing's motion
    heard = oracle.read_audio(world.render_audio(scene))  # colour (pitch), shape (beats), glide

Pixels. Every pixel is named by its nearest colour in `world.COLOURS`. The background is
the colour most of the frame's border has. A thing is a non-background colour that holds
at least `MIN_PIXELS` pixels whose four neighbours share their name (this drops the thin
rims a blurry decoder leaves where two colours blend into a third). Its position is the
centroid of its colour's pixels, its shape comes from its outline: the farthest pixel per
angle around the centroid gives a radius profile r(angle), whose strongest Fourier
harmonic is 3 for a triangle, 4 for a square, 5 for a star, and none for a circle. Motion
is the centroid's path over the clip (a move of more than `MOVE` of the frame), else the
area's change (more than `AREA_CHANGE` times), else still.

Sound (see the world's mapping). The pitch of the first sounding `PITCH_WINDOW` seconds
names the colour (nearest colour pitch on a log scale; the glide has barely begun); the
number of beats names the shape; the pitch at the end against the start tells a glide
(vertical motion); the peak loudness gives the size. With two things sounding at once
the pitch is the louder one's and the beat count may be the mix's.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from xvila.toy import world

MIN_PIXELS = 10        # eroded pixels a colour needs to count as a thing (64x64 frame)
MOVE = 0.1             # centroid travel, fraction of the frame, that counts as moving
AREA_CHANGE = 1.5      # area factor that counts as growing / shrinking
ANGLE_BINS = 36
ROUND_HARMONIC = 0.06  # below this relative strength of harmonics 3-5 the outline is a circle
PITCH_WINDOW = 0.1     # seconds of sound the pitch is read from
SOUNDING = 0.05        # frame energy, relative to the loudest frame, that counts as sound
FRAME_SECONDS = 0.01

_NAMES = list(world.COLOURS)
_RGB = np.array([world.COLOURS[c] for c in _NAMES], np.float32)
_BEATS_TO_SHAPE = {n: s for s, n in world.BEATS.items()}


@dataclasses.dataclass
class SeenThing:
    colour: str
    shape: str
    position: tuple[float, float]  # centroid, (x, y) in [0, 1], y down
    area: float                    # fraction of the frame
    motion: str | None = None      # only from a video


@dataclasses.dataclass
class Seen:
    background: str
    things: list[SeenThing]        # largest first

    @property
    def main(self) -> SeenThing | None:
        return self.things[0] if self.things else None


@dataclasses.dataclass
class Heard:
    colour: str | None             # None: silence
    shape: str | None              # None: a beat count no shape has
    size: float                    # estimated extent, fraction of the frame
    glide: str                     # "up", "down" or "none"
    pitch_hz: float
    beats: int


# ----------------------------------------------------------------------------- pixels
def colour_names(frame: np.ndarray) -> np.ndarray:
    """[H, W] index into `world.COLOURS` of each pixel's nearest named colour."""
    rgb = np.asarray(frame, np.float32)[..., :3]
    d = ((rgb[..., None, :] - _RGB) ** 2).sum(-1)
    return d.argmin(-1)


def nearest_colour(rgb) -> str:
    return _NAMES[int(colour_names(np.asarray(rgb, np.float32).reshape(1, 1, 3))[0, 0])]


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise ValueError(f"an image is [H, W, 3] (or a PIL image), got shape {a.shape}")
    return a


def _background(names: np.ndarray) -> int:
    border = np.concatenate([names[0], names[-1], names[1:-1, 0], names[1:-1, -1]])
    return int(np.bincount(border, minlength=len(_NAMES)).argmax())


def _core(names: np.ndarray) -> np.ndarray:
    """Pixels whose 4 neighbours have their colour name (erosion by a plus)."""
    p = np.pad(names, 1, mode="edge")
    c = p[1:-1, 1:-1]
    return (c == p[:-2, 1:-1]) & (c == p[2:, 1:-1]) & (c == p[1:-1, :-2]) & (c == p[1:-1, 2:])


def _thing_colours(names: np.ndarray, background: int) -> list[int]:
    counts = np.bincount(names[_core(names)], minlength=len(_NAMES))
    counts[background] = 0
    found = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] >= MIN_PIXELS]
    return found


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h)


def shape_of(mask: np.ndarray) -> str:
    """Circle, square, triangle or star from a boolean mask (see the module docstring)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return "circle"
    u, v = xs - xs.mean(), ys - ys.mean()
    angle = np.arctan2(v, u)
    radius = np.hypot(u, v) + 0.5  # to the pixel's far side, roughly
    bins = ((angle + math.pi) / (2 * math.pi) * ANGLE_BINS).astype(int) % ANGLE_BINS
    profile = np.zeros(ANGLE_BINS)
    np.maximum.at(profile, bins, radius)
    profile = _fill_gaps(profile)
    spectrum = np.abs(np.fft.rfft(profile)) / profile.sum()
    strengths = {3: spectrum[3], 4: spectrum[4], 5: spectrum[5]}
    k = max(strengths, key=strengths.get)
    if strengths[k] < ROUND_HARMONIC:
        return "circle"
    return {3: "triangle", 4: "square", 5: "star"}[k]


def _fill_gaps(profile: np.ndarray) -> np.ndarray:
    """Angle bins no pixel fell in (tiny shapes) take their nearest filled neighbour's radius."""
    filled = np.nonzero(profile)[0]
    if len(filled) == len(profile):
        return profile
    idx = np.arange(len(profile))
    gap = np.abs(idx[:, None] - filled[None, :])
    nearest = filled[np.minimum(gap, len(profile) - gap).argmin(1)]
    return profile[nearest]


def read_image(image) -> Seen:
    """Background and things of one frame (PIL image or [H, W, 3] array)."""
    names = colour_names(_as_array(image))
    background = _background(names)
    things = []
    for c in _thing_colours(names, background):
        mask = names == c
        things.append(SeenThing(_NAMES[c], shape_of(mask), centroid(mask), float(mask.mean())))
    return Seen(_NAMES[background], things)


def motion_of(first: tuple[float, float], last: tuple[float, float], area_ratio: float) -> str:
    dx, dy = last[0] - first[0], last[1] - first[1]
    if max(abs(dx), abs(dy)) > MOVE:
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if area_ratio > AREA_CHANGE:
        return "grow"
    if area_ratio < 1 / AREA_CHANGE:
        return "shrink"
    return "still"


def read_video(frames: np.ndarray) -> Seen:
    """Background and things of frame 0, each with the motion its colour makes over the clip."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"a video is [T >= 2, H, W, 3], got shape {frames.shape}")
    seen = read_image(frames[0])
    last = colour_names(frames[-1])
    for thing in seen.things:
        mask = last == _NAMES.index(thing.colour)
        if mask.sum() < MIN_PIXELS:
            thing.motion = "shrink"  # (almost) gone by the end
            continue
        thing.motion = motion_of(thing.position, centroid(mask), float(mask.mean()) / thing.area)
    return seen


# ----------------------------------------------------------------------------- sound
def _frame_energy(samples: np.ndarray, rate: int) -> np.ndarray:
    hop = max(1, int(FRAME_SECONDS * rate))
    n = len(samples) // hop
    return np.sqrt((samples[: n * hop].reshape(n, hop) ** 2).mean(axis=1))


def peak_hz(clip: np.ndarray, rate: int) -> float:
    """The strongest frequency of `clip` (Hann window, zero-padded FFT)."""
    n = 1 << 16
    spec = np.abs(np.fft.rfft(clip * np.hanning(len(clip)), n=n))
    return float(np.fft.rfftfreq(n, 1 / rate)[np.argmax(spec)])


def colour_of_pitch(hz: float) -> str:
    """The colour whose world pitch is nearest on a log scale."""
    pitches = np.array([world.pitch_hz(c) for c in _NAMES])
    return _NAMES[int(np.abs(np.log2(pitches / hz)).argmin())]


def read_audio(samples: np.ndarray, sample_rate: int = world.SAMPLE_RATE) -> Heard:
    x = np.asarray(samples, np.float64)
    if x.ndim == 2:  # [channels, n]
        x = x.mean(axis=0)
    if x.ndim != 1:
        raise ValueError(f"audio is [n] or [channels, n], got shape {x.shape}")
    energy = _frame_energy(x, sample_rate)
    if len(energy) == 0 or energy.max() < 1e-4:
        return Heard(None, None, 0.0, "none", 0.0, 0)
    on = energy > SOUNDING * energy.max()
    beats = int(on[0]) + int(np.sum(on[1:] & ~on[:-1]))
    hop = int(FRAME_SECONDS * sample_rate)
    window = int(PITCH_WINDOW * sample_rate)
    first, last = np.nonzero(on)[0][[0, -1]]
    start_hz = peak_hz(x[first * hop : first * hop + window], sample_rate)
    end = (last + 1) * hop
    end_hz = peak_hz(x[max(0, end - window) : end], sample_rate)
    size = float(np.abs(x).max()) / 0.9
    if start_hz <= 0 or end_hz <= 0:  # strongest at 0 Hz (an offset, a decoder's drift): no pitch, no colour
        return Heard(None, _BEATS_TO_SHAPE.get(beats), size, "none", start_hz, beats)
    semitones = 12 * math.log2(end_hz / start_hz)
    glide = "up" if semitones > 1.0 else "down" if semitones < -1.0 else "none"
    return Heard(colour_of_pitch(start_hz), _BEATS_TO_SHAPE.get(beats), size, glide, start_hz, beats)
