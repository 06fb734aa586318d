"""Makes the demo's example files: toy-world scenes, and a picture, a video and a sound of our own.

    python assets/make_examples.py      # rewrites assets/world/*, assets/lighthouse.png, waves.mp4, bell.wav

The demo's examples are scenes of the toy world (`xvila.toy.world`, held-out seeds, so the
toy model never saw them in training), chosen so that each example's prompt in `app.py`
has a plain answer: a red circle on blue, a green star moving up on yellow (with its
sound), the sound of a large blue square. The lighthouse, waves and bell stay for the tests
and for models of the real world.

Everything is drawn and synthesised here (numpy + PIL), seeded, and written through
`xvila.media`'s writers, so the files are ours to ship, small (well under 100 kB together),
and read back by the same code that reads uploads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from xvila import media  # noqa: E402
from xvila.toy import world  # noqa: E402

HERE = Path(__file__).resolve().parent
WORLD = HERE / "world"
# name -> (held-out seed, the scene's constraints): what app.WORLD_EXAMPLES asks about.
WORLD_SCENES = {
    "red-circle": (world.TEST_SEED_START + 900_000_001,
                   dict(things=[{"shape": "circle", "colour": "red", "size": "large", "motion": "still"}],
                        background="blue", texture="stripes")),
    "green-star-up": (world.TEST_SEED_START + 900_000_002,
                      dict(things=[{"shape": "star", "colour": "green", "size": "large", "motion": "up"}],
                           background="yellow", texture="dots")),
    "blue-square": (world.TEST_SEED_START + 900_000_003,
                    dict(things=[{"shape": "square", "colour": "blue", "size": "large", "motion": "still"}],
                         background="white", texture="plain")),
}
RATE = 16000  # audio sample rate (ImageBind's)


def lighthouse(width: int = 256, height: int = 192) -> Image.Image:
    """A lighthouse on a rock at sunset, over the sea."""
    y = np.linspace(0, 1, height)[:, None, None]
    sky = (1 - y) * np.array([255, 150, 90]) + y * np.array([250, 210, 150])
    image = np.broadcast_to(sky, (height, width, 3)).astype(np.uint8).copy()
    horizon = int(height * 0.62)
    im = Image.fromarray(image)
    d = ImageDraw.Draw(im)
    d.ellipse([150, horizon - 40, 210, horizon + 20], fill=(255, 200, 80))  # the sun, setting behind the sea
    sea = np.linspace(0, 1, height - horizon)[:, None, None] * np.array([-30, -20, 10]) + np.array([40, 90, 140])
    sea = np.broadcast_to(np.clip(sea, 0, 255), (height - horizon, width, 3)).astype(np.uint8)
    im.paste(Image.fromarray(sea), (0, horizon))
    d.polygon([(20, height), (60, horizon - 5), (120, horizon + 8), (150, height)], fill=(70, 60, 55))  # the rock
    d.polygon([(72, horizon - 2), (80, 60), (96, 60), (104, horizon - 2)], fill=(240, 240, 235))  # the tower
    for band in (80, 110):
        d.polygon([(78, band), (98, band), (99, band + 12), (77, band + 12)], fill=(200, 40, 40))
    d.rectangle([76, 48, 100, 60], fill=(40, 40, 45))  # the lamp room
    d.polygon([(74, 48), (88, 36), (102, 48)], fill=(200, 40, 40))
    d.polygon([(100, 52), (180, 38), (180, 66)], fill=(255, 250, 200))  # the beam
    rng = np.random.default_rng(0)
    for _ in range(40):  # glints on the water, right of the rock
        x, yy = int(rng.integers(130, width - 8)), int(rng.integers(horizon + 4, height))
        d.line([(x, yy), (x + int(rng.integers(3, 9)), yy)], fill=(230, 200, 160))
    return im


def waves(seconds: float = 2.0, fps: int = 8, width: int = 160, height: int = 120) -> tuple[np.ndarray, media.Audio]:
    """Waves rolling onto a beach, with surf noise swelling in time with them."""
    n = int(seconds * fps)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        phase = 2 * np.pi * i / n
        shore = height * 0.55 + 10 * np.sin(xx / 18 + phase) + 8 * np.sin(phase)
        water = yy < shore
        foam = np.abs(yy - shore) < 3
        frames[i] = np.where(water[..., None], [30, 110, 170], [225, 205, 150])
        frames[i][foam] = [245, 245, 240]
        frames[i][: int(height * 0.2)] = [150, 200, 240]  # sky
    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.convolve(rng.standard_normal(t.size), np.ones(8) / 8, mode="same")  # soft, low-passed
    swell = 0.5 - 0.5 * np.cos(2 * np.pi * t / seconds)
    audio = media.Audio((0.4 * noise * swell).astype(np.float32)[None], RATE)
    return frames, audio


def bell(seconds: float = 2.0) -> np.ndarray:
    """A bell: a few inharmonic partials that decay at different rates."""
    t = np.arange(int(seconds * RATE)) / RATE
    partials = [(440.0, 1.0, 1.5), (880.0 * 1.003, 0.5, 2.5), (1320.0 * 0.997, 0.3, 4.0), (2093.0, 0.15, 6.0)]
    x = sum(a * np.exp(-d * t) * np.sin(2 * np.pi * f * t) for f, a, d in partials)
    x *= np.minimum(1.0, t / 0.005)  # no click at the start
    return (0.5 * x / np.abs(x).max()).astype(np.float32)[None]


def world_scene(name: str) -> world.Scene:
    seed, constraints = WORLD_SCENES[name]
    return world.sample_scene(seed, **constraints)


def write_world_examples(folder: Path = WORLD) -> list[Path]:
    """red-circle.png, green-star-up.mp4 (with its sound), blue-square.wav."""
    red, star, square = (world_scene(n) for n in ("red-circle", "green-star-up", "blue-square"))
    sound = media.Audio(world.render_audio(star)[None], world.SAMPLE_RATE)
    return [media.write_png(folder / "red-circle.png", world.render_image(red)),
            media.write_mp4(folder / "green-star-up.mp4", world.render_video(star), world.FPS, sound),
            media.write_wav(folder / "blue-square.wav", world.render_audio(square)[None], world.SAMPLE_RATE)]


def main() -> None:
    for path in write_world_examples():
        print(f"{path}: {path.stat().st_size / 1024:.1f} kB")
    media.write_png(HERE / "lighthouse.png", lighthouse())
    frames, audio = waves()
    media.write_mp4(HERE / "waves.mp4", frames, fps=8, audio=audio)
    media.write_wav(HERE / "bell.wav", bell(), RATE)
    for name in ("lighthouse.png", "waves.mp4", "bell.wav"):
        print(f"{HERE / name}: {(HERE / name).stat().st_size / 1024:.1f} kB")


if __name__ == "__main__":
    main()
