"""The toy results' referee: scores of generated world media by the pixel oracle, and the
world's words read from a free-form reply. No learned model is involved.

    from train.toy import scoring
    scoring.detail_scores("out.mp4", "truth.mp4")   # position error, texture match, shade distance
    scoring.parse_reply("A red circle on a blue background.")   # {"colour": "red", "shape": "circle", ...}

The details are what a world caption never names (position, background texture, exact
shade), so only the visual embedding highway can carry them from an input to an output:
- position error: the distance (fraction of the frame) from the truth's main thing to the
  output's thing of its colour (else the output's largest thing; an output without any
  thing scores `MISS_POSITION`, what a guess at random scores);
- texture match: 1 when the background texture read from pixels (`background_texture`)
  is the truth's;
- shade distance: the RGB distance of the backgrounds' shades (medians, so texture marks
  do not count), averaged with that of the main thing and its match.
A video is scored on up to 4 frame pairs at matching relative times, the output resized
to the truth's size first.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
from PIL import Image

from xvila import media
from xvila.constants import IMAGE
from xvila.toy import oracle, world

MISS_POSITION = 0.52  # mean distance of two random points in the unit square: a missing thing scores as chance
PLAIN_MAX = 0.08      # share of marked background pixels below which a background is plain
_COLOURS = list(world.COLOURS)


def frames_of(path: str | os.PathLike) -> np.ndarray:
    """uint8 [T, H, W, 3] of an image (T = 1) or a video file."""
    if media.media_kind(path) == IMAGE:
        return np.asarray(media.read_image(path).convert("RGB"))[None]
    return media.read_video(path, with_audio=False).frames


def aligned(pred: np.ndarray, truth: np.ndarray, k: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to k (pred, truth) frame pairs at the same relative times; pred resized to truth's size."""
    n = min(k, len(pred), len(truth))
    pi = np.linspace(0, len(pred) - 1, n).round().astype(int)
    ti = np.linspace(0, len(truth) - 1, n).round().astype(int)
    size = (truth.shape[2], truth.shape[1])
    return [(np.asarray(Image.fromarray(pred[i]).resize(size, Image.BILINEAR)), truth[j]) for i, j in zip(pi, ti)]


def _match(seen: oracle.Seen, colour: str) -> oracle.SeenThing | None:
    """The thing of `colour` if the oracle sees one, else the largest thing, else None."""
    return next((t for t in seen.things if t.colour == colour), seen.main)


def position_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Distance (fraction of the frame) between the truth's main thing and its match in pred;
    NaN where the truth frame shows no thing (it has moved out of the picture): nothing to miss."""
    target = oracle.read_image(truth).main
    if target is None:
        return math.nan
    found = _match(oracle.read_image(pred), target.colour)
    if found is None:
        return MISS_POSITION
    return float(math.dist(found.position, target.position))


def _disagreement(marked: np.ndarray, mask: np.ndarray, dx: int, dy: int) -> float:
    h, w = marked.shape
    ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
    ys2, xs2 = slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx))
    both = mask[ys, xs] & mask[ys2, xs2]
    return float((marked[ys, xs] != marked[ys2, xs2])[both].mean()) if both.any() else 0.0


def background_texture(frame: np.ndarray) -> str:
    """"plain", "stripes" or "dots": background pixels TEXTURE_CONTRAST off the background's
    median brightness are marked; stripes run along the anti-diagonal, so shifting by
    (+1, -1) keeps their marks, which dots' do not."""
    rgb = np.asarray(frame, np.float32)
    names = oracle.colour_names(rgb)
    bg = _COLOURS.index(oracle.read_image(frame).background)
    mask = names == bg
    lum = rgb.mean(-1)
    marked = mask & (np.abs(lum - np.median(lum[mask])) > world.TEXTURE_CONTRAST / 2)
    if marked.sum() < PLAIN_MAX * mask.sum():
        return "plain"
    return "stripes" if _disagreement(marked, mask, 1, -1) < 0.5 * _disagreement(marked, mask, 1, 0) else "dots"


def texture_match(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(background_texture(pred) == background_texture(truth))


def _shade(frame: np.ndarray, colour: str, median: bool) -> np.ndarray:
    rgb = np.asarray(frame, np.float32).reshape(-1, 3)
    px = rgb[(oracle.colour_names(frame) == _COLOURS.index(colour)).reshape(-1)]
    return np.median(px, 0) if median else px.mean(0)


def shade_distance(pred: np.ndarray, truth: np.ndarray) -> float:
    """RGB distance between the backgrounds' shades (median, so texture marks do not count),
    averaged with that between the main thing and its match in pred (when pred has a thing)."""
    seen_t, seen_p = oracle.read_image(truth), oracle.read_image(pred)
    d = [float(np.linalg.norm(_shade(pred, seen_p.background, True) - _shade(truth, seen_t.background, True)))]
    target = seen_t.main
    found = _match(seen_p, target.colour) if target else None
    if found is not None:
        d.append(float(np.linalg.norm(_shade(pred, found.colour, False) - _shade(truth, target.colour, False))))
    return float(np.mean(d))


DETAILS = {"position error": position_error, "texture match": texture_match, "shade distance": shade_distance}


def detail_scores(pred_path: str | os.PathLike, truth_path: str | os.PathLike) -> dict[str, float]:
    """The three detail scores of a generated file against its truth, averaged over aligned
    frames (frames a score cannot judge, NaN, left out; NaN if it can judge none)."""
    pairs = aligned(frames_of(pred_path), frames_of(truth_path))
    out = {}
    for name, f in DETAILS.items():
        values = [v for v in (f(p, t) for p, t in pairs) if not math.isnan(v)]
        out[name] = float(np.mean(values)) if values else math.nan
    return out


# --------------------------------------------------------------------- reading replies
_MOTION_WORDS = [  # (pattern, motion); the earliest match in a reply wins
    (r"\bnot moving\b|\bstill\b|\bstanding\b|\bstationary\b|\bstatic\b", "still"),
    (r"\bleft\b|\bleftwards?\b", "left"), (r"\bright\b|\brightwards?\b", "right"),
    (r"\bup\b|\bupwards?\b|\brising\b", "up"), (r"\bdown\b|\bdownwards?\b|\bfalling\b", "down"),
    (r"\bgrow(s|ing)?\b|\bbigger\b|\blarger\b", "grow"), (r"\bshrink(s|ing)?\b|\bsmaller\b", "shrink"),
]


def _first_word(words: list[str], names) -> str | None:
    return next((w for w in words if w in names), None)


def parse_reply(text: str) -> dict[str, str | None]:
    """The world's words a free-form reply names: {"colour", "shape", "motion", "background"};
    the first of each (the thing's colour is not the background's: "on a blue background"
    is read apart); None where it names none."""
    t = " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())
    bg = re.search(r"\b(\w+) background\b", t)
    background = bg.group(1) if bg and bg.group(1) in world.COLOURS else None
    if bg:
        t = t[: bg.start()] + t[bg.end():]
    words = [w[:-1] if w.endswith("s") and w[:-1] in world.SHAPES else w for w in t.split()]
    hits = [(m.start(), motion) for pattern, motion in _MOTION_WORDS for m in [re.search(pattern, t)] if m]
    return {"colour": _first_word(words, world.COLOURS), "shape": _first_word(words, world.SHAPES),
            "motion": min(hits)[1] if hits else None, "background": background}
