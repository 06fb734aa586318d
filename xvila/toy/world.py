"""The toy world: scenes of one or two coloured shapes, deterministic from a seed, with a
matching image, video, sound and caption.

    from xvila.toy import world
    scene = world.sample_scene(7)
    world.caption(scene)          # 'a large red star moving up on a blue background'
    world.render_image(scene)     # PIL RGB, 64x64 (frame 0 of the video)
    world.render_video(scene)     # uint8 [8, 64, 64, 3], 8 fps
    world.render_audio(scene)     # float32 [16000]: 1 s at SAMPLE_RATE

Geometry. Positions are (x, y) in [0, 1] with y pointing *down* as in images; a thing's
`position` is its centre in frame 0 and `size` its extent (circle diameter, star tip to
tip) as a fraction of the frame side. Over the clip a moving thing travels `TRAVEL` of the
frame (up = towards the top), a growing one ends `GROWTH` times larger, a shrinking one
`GROWTH` times smaller; every thing stays wholly in frame and apart from the other.

What the caption says and what it does not. A caption names each thing's shape, colour,
coarse size ("small" / "large") and motion, and the background colour. It never names the
position, the background texture, the exact shade (each colour is jittered per scene by up
to `SHADE_JITTER` per channel) nor the exact size: those are the instance details that
only the visual embedding highway can carry to an output (the paper's Table 2).

The sound encodes the picture (each thing sounds; the sounds add):
- colour -> pitch: the colour's index i in `COLOURS` gives 220 Hz * 2^(4i/12), a major third
  apart, so each colour is its own pitch (220 Hz ... 1.76 kHz);
- shape -> rhythm and timbre: circle one long tone (a sine), square 2 beats (odd harmonics),
  triangle 3 beats (all harmonics, 1/n), star 4 beats (harmonics 1, 4, 8);
- size -> loudness (amplitude 0.9 * size); growing/shrinking -> a crescendo/decrescendo
  by the same factor as the size;
- vertical motion -> a pitch glide of `GLIDE_SEMITONES` up (moving up) or down; horizontal
  motion is not heard (the sound is mono);
- instance details, so that a sound belongs to its own scene among scenes with the same
  caption: the exact shade detunes the pitch by up to 0.3 semitone, the exact size sets
  the loudness, the horizontal position delays the onset by up to 80 ms.

SAMPLE_RATE is 16 kHz, ImageBind's rate: its audio preprocessing reads files at 16 kHz and
the AudioLDM vocoder class is built for 16 kHz, so a world sound goes through both
unchanged (no resampling, exact round trips through MP4/WAV). What keeps the audio
decoder's mel small is its hop and bin count (e.g. a 256-sample hop gives 63 frames for
the 1 s clip), not the sample rate; the highest partial stays under 7.5 kHz.

Rendering is numpy on 64x64 grids: thousands of scenes per minute on one core, so
training renders on the fly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from xvila.errors import XVilaError

IMAGE_SIZE = 64
FRAMES = 8
FPS = 8
SAMPLE_RATE = 16000
AUDIO_SECONDS = 1.0

SHAPES = ("circle", "square", "triangle", "star")
# Picked so that any two are >= 90 apart in RGB, well beyond twice the shade jitter plus
# the texture contrast: the pixel oracle's nearest-colour rule stays exact.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 225, 40),
    "green": (40, 170, 50),
    "cyan": (40, 210, 225),
    "blue": (35, 60, 220),
    "purple": (140, 50, 190),
    "pink": (245, 140, 200),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
MOTIONS = ("still", "left", "right", "up", "down", "grow", "shrink")
TEXTURES = ("plain", "stripes", "dots")
# Coarse size word -> range of the exact size (fraction of the frame side).
SIZES: dict[str, tuple[float, float]] = {"small": (0.20, 0.26), "large": (0.34, 0.42)}
MOTION_WORDS = {"still": "standing still", "left": "moving left", "right": "moving right",
                "up": "moving up", "down": "moving down", "grow": "growing", "shrink": "shrinking"}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

TRAVEL = 0.3            # fraction of the frame a moving thing covers over the clip
GROWTH = 1.6            # size factor over the clip for grow / shrink
SHADE_JITTER = 10       # max per-channel offset of a scene's shade from the named colour
TEXTURE_CONTRAST = 14   # brightness offset of stripes and dots
TEXTURE_PERIOD = 8      # pixels between stripes / dots
MARGIN = 0.02           # free border kept around every thing, fraction of the frame
GAP = 0.04              # free space kept between two things at every frame
TWO_THINGS_P = 0.3      # share of scenes with two things
TEST_SEED_START = 10**9  # seeds from here on are held out (evaluation); below, training

BASE_HZ = 220.0
PITCH_STEP = 4          # semitones between neighbouring colours
GLIDE_SEMITONES = 2.5   # vertical motion's pitch glide; < PITCH_STEP, so a start pitch names the colour
DETUNE_SEMITONES = 0.3  # max detune from the shade jitter
ONSET_DELAY = 0.08      # seconds of onset delay at x = 1
MAX_PARTIAL_HZ = 7500.0
BEATS = {"circle": 1, "square": 2, "triangle": 3, "star": 4}
HARMONICS: dict[str, tuple[float, ...]] = {
    "circle": (1.0,),
    "square": (1.0, 0.0, 1 / 3, 0.0, 1 / 5, 0.0, 1 / 7),
    "triangle": (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6),
    "star": (1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.25),
}
BEAT_DUTY = 0.7         # share of each beat that sounds
RAMP_SECONDS = 0.01     # fade in/out of each beat, so no clicks


class WorldError(XVilaError, ValueError):
    """A scene or a sampling constraint names something the world does not have."""


def _check_name(kind: str, name: str, allowed) -> None:
    if name not in allowed:
        raise WorldError(f"unknown {kind} {name!r}; the world has: {', '.join(allowed)}")


def _check_shade(shade) -> tuple[int, int, int]:
    shade = tuple(int(v) for v in shade)
    if len(shade) != 3 or any(abs(v) > SHADE_JITTER for v in shade):
        raise WorldError(f"a shade is 3 channel offsets within +-{SHADE_JITTER}, got {shade}")
    return shade


@dataclasses.dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: float                      # extent, fraction of the frame side
    position: tuple[float, float]    # centre in frame 0, (x, y) in [0, 1], y down
    motion: str = "still"
    shade: tuple[int, int, int] = (0, 0, 0)  # per-channel offset from COLOURS[colour]

    def __post_init__(self):
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, COLOURS)
        _check_name("motion", self.motion, MOTIONS)
        if not 0.05 <= float(self.size) <= 0.9:
            raise WorldError(f"a thing's size is a fraction of the frame in [0.05, 0.9], got {self.size}")
        x, y = self.position
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise WorldError(f"a position is (x, y) in [0, 1], got {self.position}")
        object.__setattr__(self, "position", (float(x), float(y)))
        object.__setattr__(self, "size", float(self.size))
        object.__setattr__(self, "shade", _check_shade(self.shade))

    @property
    def rgb(self) -> tuple[int, int, int]:
        return _shaded(self.colour, self.shade)

    @property
    def size_word(self) -> str:
        return size_word(self.size)

    def at(self, f: float) -> tuple[tuple[float, float], float]:
        """(centre, size) at clip time f in [0, 1] (0 = first frame, 1 = last)."""
        dx, dy = DIRECTIONS.get(self.motion, (0.0, 0.0))
        centre = (self.position[0] + dx * TRAVEL * f, self.position[1] + dy * TRAVEL * f)
        return centre, self.size * _growth(self.motion, f)


@dataclasses.dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    texture: str = "plain"
    background_shade: tuple[int, int, int] = (0, 0, 0)
    texture_phase: tuple[float, float] = (0.0, 0.0)  # texture offset, in periods

    def __post_init__(self):
        things = tuple(self.things)
        if not 1 <= len(things) <= 2 or not all(isinstance(t, Thing) for t in things):
            raise WorldError(f"a scene holds 1 or 2 Things, got {self.things!r}")
        _check_name("colour", self.background, COLOURS)
        _check_name("texture", self.texture, TEXTURES)
        if any(t.colour == self.background for t in things):
            raise WorldError(f"a thing cannot have the background's colour ({self.background})")
        if len(things) == 2 and things[0].colour == things[1].colour:
            raise WorldError("the two things of a scene have different colours")
        object.__setattr__(self, "things", things)
        object.__setattr__(self, "background_shade", _check_shade(self.background_shade))
        object.__setattr__(self, "texture_phase", tuple(float(p) % 1.0 for p in self.texture_phase))

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return _shaded(self.background, self.background_shade)


def _shaded(colour: str, shade: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(COLOURS[colour], shade))


def _growth(motion: str, f: float) -> float:
    return GROWTH ** f if motion == "grow" else GROWTH ** -f if motion == "shrink" else 1.0


def size_word(size: float) -> str:
    """The caption's coarse size for an exact size: the nearer range's name."""
    return "small" if size < (SIZES["small"][1] + SIZES["large"][0]) / 2 else "large"


def split_of(seed: int) -> str:
    """"train" or "test": scenes from seeds >= TEST_SEED_START are held out, whole."""
    return "test" if seed >= TEST_SEED_START else "train"


# ----------------------------------------------------------------------------- captions
def attributes(scene: Scene) -> dict:
    """What the caption says, as data: {"background": ..., "things": [{"shape", "colour",
    "size", "motion"}, ...]} (size is the coarse word). Scenes with equal attributes have
    equal captions."""
    return {"background": scene.background,
            "things": [{"shape": t.shape, "colour": t.colour, "size": t.size_word, "motion": t.motion}
                       for t in scene.things]}


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def describe_thing(thing: Thing) -> str:
    return f"{_a(thing.size_word)} {thing.colour} {thing.shape} {MOTION_WORDS[thing.motion]}"


def caption(scene: Scene) -> str:
    things = " and ".join(describe_thing(t) for t in scene.things)
    return f"{things} on {_a(scene.background)} background"


def parse_caption(text: str) -> dict:
    """What a caption (or a request such as "draw a blue square on a yellow background")
    says, as `attributes` gives it; words it does not name are left out of each thing:
    {"background": "yellow", "things": [{"shape": "square", "colour": "blue"}]}."""
    lowered = " ".join(text.lower().replace(",", " ").replace(".", " ").split())
    background = re.search(r"\bon an? (\w+) background\b", lowered)
    if background:
        lowered = lowered[: background.start()]
    things = []
    for part in re.split(r"\band\b", lowered):
        words = part.split()
        spec = {"shape": _first(words, SHAPES), "colour": _first(words, COLOURS), "size": _first(words, SIZES),
                "motion": next((m for m, phrase in MOTION_WORDS.items() if phrase in part), None)}
        spec = {k: v for k, v in spec.items() if v is not None}
        if "shape" in spec or "colour" in spec:
            things.append(spec)
    bg = background.group(1) if background else None
    if not things or (bg is not None and bg not in COLOURS):
        raise WorldError(f"no world scene in {text!r}: name a shape or colour ({', '.join(SHAPES)}; "
                         f"{', '.join(COLOURS)}) and optionally 'on a <colour> background'")
    return {"background": bg, "things": things[:2]}


def _first(words: list[str], names) -> str | None:
    return next((w for w in words if w in names), None)


def scene_from_caption(text: str, seed: int) -> Scene:
    """A scene that the caption (or request) describes; the rest drawn from `seed`."""
    a = parse_caption(text)
    return sample_scene(seed, things=a["things"], background=a["background"])


# ----------------------------------------------------------------------------- sampling
def sample_scene(seed: int, *, things: Sequence[Mapping] | None = None, background: str | None = None,
                 texture: str | None = None) -> Scene:
    """The scene of `seed`. Optional constraints fix what a caption would say (and the
    texture): `things` is a list of 1-2 partial specs with keys shape / colour / size (a
    coarse word) / motion; anything not fixed is drawn from the seed."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise WorldError(f"a scene seed is an int >= 0, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    specs = [dict(s) for s in things] if things is not None else [{} for _ in range(1 + (rng.random() < TWO_THINGS_P))]
    _check_specs(specs, background, texture)
    bg = background or _pick(rng, [c for c in COLOURS if c not in {s.get("colour") for s in specs}])
    tex = texture or _pick(rng, TEXTURES)
    placed = _place_things(rng, specs, bg)
    if placed is None and things is None and len(specs) == 2:
        placed = _place_things(rng, specs[:1], bg)  # two things did not fit: keep one
    if placed is None:
        raise WorldError(f"could not place {len(specs)} things of sizes "
                         f"{[s.get('size') for s in specs]} apart in the frame")
    return Scene(tuple(placed), bg, tex, _jitter(rng), (float(rng.random()), float(rng.random())))


def scene_like(scene: Scene, seed: int) -> Scene:
    """A scene with the same caption as `scene`, differing in position, texture, shade and
    exact size (instance-level contrast: same caption, other details)."""
    a = attributes(scene)
    return sample_scene(seed, things=a["things"], background=a["background"])


def _check_specs(specs: list[dict], background: str | None, texture: str | None) -> None:
    if not 1 <= len(specs) <= 2:
        raise WorldError(f"a scene holds 1 or 2 things, got {len(specs)} specs")
    allowed = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "motion": MOTIONS}
    for spec in specs:
        for key, value in spec.items():
            if key not in allowed:
                raise WorldError(f"unknown thing attribute {key!r}; use {', '.join(allowed)}")
            _check_name(key, value, allowed[key])
    if background is not None:
        _check_name("colour", background, COLOURS)
    if texture is not None:
        _check_name("texture", texture, TEXTURES)
    colours = [s["colour"] for s in specs if "colour" in s]
    if len(set(colours)) < len(colours) or (background is not None and background in colours):
        raise WorldError(f"things and background need distinct colours, got {colours} on {background}")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _jitter(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, size=3))


def _place_things(rng: np.random.Generator, specs: list[dict], background: str, tries: int = 60):
    """Draw each spec's free attributes, then positions until all things keep apart over
    the whole clip; None when `tries` layouts all collide."""
    taken = {background} | {s["colour"] for s in specs if "colour" in s}
    drawn = []
    for spec in specs:
        colour = spec.get("colour") or _pick(rng, [c for c in COLOURS if c not in taken])
        taken.add(colour)
        lo, hi = SIZES[spec.get("size") or _pick(rng, tuple(SIZES))]
        drawn.append(dict(shape=spec.get("shape") or _pick(rng, SHAPES), colour=colour,
                          size=float(rng.uniform(lo, hi)), motion=spec.get("motion") or _pick(rng, MOTIONS),
                          shade=_jitter(rng)))
    for _ in range(tries):
        things = [Thing(position=_free_position(rng, d["size"], d["motion"]), **d) for d in drawn]
        if len(things) == 1 or _apart(*things):
            return things
    return None


def _free_position(rng: np.random.Generator, size: float, motion: str) -> tuple[float, float]:
    """A start centre from which the whole path stays inside the frame, MARGIN from its edge."""
    radius = size * max(_growth(motion, 0.0), _growth(motion, 1.0)) / 2 + MARGIN
    dx, dy = DIRECTIONS.get(motion, (0.0, 0.0))
    x = rng.uniform(radius - min(0.0, dx * TRAVEL), 1 - radius - max(0.0, dx * TRAVEL))
    y = rng.uniform(radius - min(0.0, dy * TRAVEL), 1 - radius - max(0.0, dy * TRAVEL))
    return float(x), float(y)


def _apart(a: Thing, b: Thing) -> bool:
    for f in np.linspace(0.0, 1.0, FRAMES):
        (ca, sa), (cb, sb) = a.at(f), b.at(f)
        if math.dist(ca, cb) < (sa + sb) / 2 + GAP:
            return False
    return True


# ----------------------------------------------------------------------------- pixels
@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], as [size, size] arrays (x, y)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)


# Unit normals of an upright equilateral triangle's edges (y down, apex at the top) and
# the star's outline parameters.
_TRIANGLE_NORMALS = np.array([(0.0, 1.0), (-math.sqrt(3) / 2, -0.5), (math.sqrt(3) / 2, -0.5)], np.float32)
_STAR_POINTS, _STAR_INNER = 5, 0.5


def shape_mask(shape: str, centre: tuple[float, float], size: float, resolution: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [res, res] mask of a shape of extent `size` centred at `centre`."""
    _check_name("shape", shape, SHAPES)
    gx, gy = _grid(resolution)
    r = size / 2
    u, v = (gx - centre[0]) / r, (gy - centre[1]) / r  # unit: the circumradius
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":  # corners on the circle would make it look larger than the rest
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":  # circumradius 1.1; apex-to-base centred on the centre, not the centroid
        u, v = u / 1.1, v / 1.1 - 0.25
        return np.all(_TRIANGLE_NORMALS[:, 0, None, None] * u + _TRIANGLE_NORMALS[:, 1, None, None] * v <= 0.5, axis=0)
    return _star_mask(u, v)


def _star_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside a 5-pointed star with a tip up: fold the angle into one tip's half-sector and
    test against the edge from the tip (1, 0) to the inner corner."""
    sector = 2 * math.pi / _STAR_POINTS
    angle = np.arctan2(v, u) + math.pi / 2  # 0 at the top tip
    a = np.abs((angle + sector / 2) % sector - sector / 2)
    rho = np.hypot(u, v)
    px, py = rho * np.cos(a), rho * np.sin(a)
    ix, iy = _STAR_INNER * math.cos(sector / 2), _STAR_INNER * math.sin(sector / 2)
    # Inside when on the centre's side of the line through (1, 0) and (ix, iy).
    return (px - 1.0) * (iy - 0.0) - py * (ix - 1.0) <= 0.0


def _background(scene: Scene, resolution: int) -> np.ndarray:
    rgb = np.array(scene.background_rgb, np.float32)
    frame = np.broadcast_to(rgb, (resolution, resolution, 3)).copy()
    if scene.texture == "plain":
        return frame
    gx, gy = _grid(resolution)
    px, py = gx * resolution / TEXTURE_PERIOD, gy * resolution / TEXTURE_PERIOD  # in periods
    phx, phy = scene.texture_phase
    if scene.texture == "stripes":  # diagonal bands, 3/8 of each period
        marked = (px + py + phx) % 1.0 < 0.375
    else:  # dots on a grid
        marked = np.hypot((px + phx) % 1.0 - 0.5, (py + phy) % 1.0 - 0.5) < 0.25
    # Darker on light backgrounds, lighter on dark ones, so the mark never clips.
    delta = -TEXTURE_CONTRAST if rgb.mean() > 128 else TEXTURE_CONTRAST
    frame[marked] += delta
    return frame


def render_frame(scene: Scene, f: float, resolution: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [res, res, 3]: the scene at clip time f in [0, 1]."""
    frame = _background(scene, resolution)
    for thing in scene.things:
        centre, size = thing.at(f)
        frame[shape_mask(thing.shape, centre, size, resolution)] = thing.rgb
    return np.clip(frame, 0, 255).astype(np.uint8)


def render_image(scene: Scene, resolution: int = IMAGE_SIZE) -> Image.Image:
    """The scene's picture: frame 0 of its video, as an RGB PIL image."""
    return Image.fromarray(render_frame(scene, 0.0, resolution), "RGB")


def render_video(scene: Scene, frames: int = FRAMES, resolution: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [frames, res, res, 3] at FPS, from the picture (frame 0) to the end of the motion."""
    if frames < 2:
        raise WorldError(f"a video has at least 2 frames, got {frames}")
    return np.stack([render_frame(scene, t / (frames - 1), resolution) for t in range(frames)])


# ----------------------------------------------------------------------------- sound
def pitch_hz(colour: str) -> float:
    """The base pitch of a colour (before detune and glide)."""
    _check_name("colour", colour, COLOURS)
    return BASE_HZ * 2 ** (PITCH_STEP * list(COLOURS).index(colour) / 12)


def _thing_sound(thing: Thing, t: np.ndarray) -> np.ndarray:
    f = t / AUDIO_SECONDS
    detune = DETUNE_SEMITONES * float(np.mean(thing.shade)) / SHADE_JITTER
    glide = {"up": GLIDE_SEMITONES, "down": -GLIDE_SEMITONES}.get(thing.motion, 0.0) * f
    hz = pitch_hz(thing.colour) * 2 ** ((detune + glide) / 12)
    phase = 2 * math.pi * np.cumsum(hz) / SAMPLE_RATE
    partials = HARMONICS[thing.shape]
    wave = np.zeros_like(t)
    for n, amp in enumerate(partials, start=1):
        if amp and n * hz.max() < MAX_PARTIAL_HZ:
            wave += amp * np.sin(n * phase)
    wave /= sum(partials)  # peak <= 1 whatever the recipe
    loudness = 0.9 * thing.size * _growth(thing.motion, f)  # follows the size
    return (wave * loudness * _beat_envelope(thing, t)).astype(np.float32)


def _beat_envelope(thing: Thing, t: np.ndarray) -> np.ndarray:
    """1 while a beat sounds, 0 between beats, with short linear ramps; starts after the
    onset delay that the horizontal position sets."""
    delay = ONSET_DELAY * thing.position[0]
    beats = BEATS[thing.shape]
    period = (AUDIO_SECONDS - delay) / beats
    local = t - delay
    inside = np.clip(local, 0, None) % period
    on = period * BEAT_DUTY if beats > 1 else period - RAMP_SECONDS
    ramp = np.minimum(inside / RAMP_SECONDS, (on - inside) / RAMP_SECONDS)
    return np.where((local >= 0) & (inside < on), np.clip(ramp, 0.0, 1.0), 0.0)


def render_audio(scene: Scene) -> np.ndarray:
    """float32 mono [AUDIO_SECONDS * SAMPLE_RATE] in [-1, 1]: the sum of each thing's sound."""
    t = np.arange(round(AUDIO_SECONDS * SAMPLE_RATE), dtype=np.float64) / SAMPLE_RATE
    return np.sum([_thing_sound(thing, t) for thing in scene.things], axis=0).astype(np.float32)
