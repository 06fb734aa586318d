"""Tests of the toy world (xvila.toy.world) and of its pixel/audio oracle (xvila.toy.oracle).

The world's promises checked here: the API of issue 13, determinism per seed, captions that
name shape/colour/size/motion/background and never position, texture or shade, sounds that
differ by shape and colour as the module docstring says, things wholly in frame and apart.
"""

from __future__ import annotations

import itertools
import re
import time

import numpy as np
import pytest
from PIL import Image

from xvila.toy import world
from xvila.toy.world import Scene, Thing, WorldError

SEEDS = range(300)


def _frame_energy(audio: np.ndarray, hop: int = 160) -> np.ndarray:
    n = len(audio) // hop
    return np.sqrt((audio[: n * hop].reshape(n, hop) ** 2).mean(axis=1))


def _count_bursts(audio: np.ndarray) -> int:
    """Sounding stretches separated by silence, counted from 10 ms frame energies."""
    on = _frame_energy(audio) > 0.05 * _frame_energy(audio).max()
    return int(on[0]) + int(np.sum(on[1:] & ~on[:-1]))


def _peak_hz(audio: np.ndarray, seconds: float = 0.15) -> float:
    """Strongest frequency of the first sounding `seconds`, from a zero-padded FFT."""
    start = int(np.argmax(np.abs(audio) > 0.01))
    clip = audio[start : start + int(seconds * world.SAMPLE_RATE)]
    spec = np.abs(np.fft.rfft(clip * np.hanning(len(clip)), n=1 << 16))
    return float(np.fft.rfftfreq(1 << 16, 1 / world.SAMPLE_RATE)[np.argmax(spec)])


def one(shape="circle", colour="red", size=0.22, position=(0.5, 0.5), motion="still", shade=(0, 0, 0),
        background="blue", texture="plain") -> Scene:
    return Scene((Thing(shape, colour, size, position, motion, shade),), background, texture)


# ----------------------------------------------------------------------------- API
def test_vocabulary_has_what_the_issue_asks():
    assert {"circle", "square", "triangle", "star"} <= set(world.SHAPES)
    assert {"red", "green", "blue", "yellow"} <= set(world.COLOURS) and len(world.COLOURS) >= 8
    assert {"left", "right", "up", "down", "still"} <= set(world.MOTIONS)
    assert {"plain", "stripes", "dots"} <= set(world.TEXTURES)


def test_colours_are_far_apart_beyond_jitter_and_texture():
    rgb = {k: np.array(v, float) for k, v in world.COLOURS.items()}
    closest = min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in itertools.combinations(rgb, 2))
    worst_shift = np.sqrt(3) * (world.SHADE_JITTER + world.TEXTURE_CONTRAST)
    assert closest >= 90 and closest > 2 * worst_shift


def test_render_shapes_and_types():
    scene = world.sample_scene(3)
    image, video, audio = world.render_image(scene), world.render_video(scene), world.render_audio(scene)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert video.dtype == np.uint8 and video.shape[1:] == (64, 64, 3) and 8 <= video.shape[0] <= 16
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.0 <= len(audio) / world.SAMPLE_RATE <= 2.0 and np.abs(audio).max() <= 1.0
    np.testing.assert_array_equal(np.asarray(image), video[0])  # the picture is the clip's start


def test_same_seed_same_scene_and_media_other_seed_differs():
    a, b, c = world.sample_scene(11), world.sample_scene(11), world.sample_scene(12)
    assert a == b and a != c
    np.testing.assert_array_equal(world.render_video(a), world.render_video(b))
    np.testing.assert_array_equal(world.render_audio(a), world.render_audio(b))
    assert not np.array_equal(world.render_video(a), world.render_video(c))


def test_seeds_cover_the_vocabulary_and_both_counts():
    scenes = [world.sample_scene(s) for s in SEEDS]
    things = [t for s in scenes for t in s.things]
    assert {t.shape for t in things} == set(world.SHAPES)
    assert {t.colour for t in things} == set(world.COLOURS)
    assert {t.motion for t in things} == set(world.MOTIONS)
    assert {s.texture for s in scenes} == set(world.TEXTURES)
    assert {len(s.things) for s in scenes} == {1, 2}
    assert len({t.rgb for t in things if t.colour == "red"}) > 5  # shades jitter per scene


# ----------------------------------------------------------------------------- captions
def test_caption_of_a_hand_made_scene():
    scene = Scene((Thing("circle", "red", 0.22, (0.3, 0.6), "left", (4, -3, 2)),
                   Thing("star", "orange", 0.4, (0.7, 0.3), "grow")), "blue", "stripes", (1, 1, 1))
    assert world.caption(scene) == ("a small red circle moving left and a large orange star growing "
                                    "on a blue background")
    assert world.caption(one(background="orange")) == "a small red circle standing still on an orange background"


def test_captions_never_name_position_texture_or_shade():
    banned = re.compile(r"\d|\b(top|bottom|corner|cent(re|er)|middle|plain|stripes?|dots?|light|dark|shade)\b")
    for seed in SEEDS:
        text = world.caption(world.sample_scene(seed))
        assert not banned.search(text), text


def test_scene_like_keeps_the_caption_and_changes_the_details():
    for seed in range(40):
        scene = world.sample_scene(seed)
        other = world.scene_like(scene, seed + 10_000)
        assert world.caption(other) == world.caption(scene)
        assert world.attributes(other) == world.attributes(scene)
        assert [t.position for t in other.things] != [t.position for t in scene.things]
        assert not np.array_equal(world.render_video(other), world.render_video(scene))


def test_constraints_are_obeyed():
    spec = {"shape": "star", "colour": "green", "size": "large", "motion": "up"}
    for seed in range(20):
        scene = world.sample_scene(seed, things=[spec], background="white", texture="dots")
        assert world.attributes(scene) == {"background": "white", "things": [spec]}
        assert scene.texture == "dots"


# ----------------------------------------------------------------------------- pixels
def test_things_stay_in_frame_and_apart():
    for seed in SEEDS:
        scene = world.sample_scene(seed)
        for t in range(world.FRAMES):
            masks = [world.shape_mask(th.shape, *th.at(t / (world.FRAMES - 1))) for th in scene.things]
            for m in masks:
                assert m.sum() > 20
                assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()), seed
            if len(masks) == 2:
                assert not (masks[0] & masks[1]).any(), seed


def test_each_thing_is_drawn_in_its_shade_and_moves_its_way():
    scene = one(colour="red", shade=(5, -5, 3), motion="right", position=(0.3, 0.5))
    video = world.render_video(scene)
    red = np.all(video == np.array((225, 25, 33), np.uint8), axis=-1)  # COLOURS["red"] + shade
    xs = [np.nonzero(red[t])[1].mean() for t in range(len(video))]
    assert red[0].sum() > 50 and np.all(np.diff(xs) > 0)
    assert xs[-1] - xs[0] == pytest.approx(world.TRAVEL * 64, abs=1.5)


def test_growing_things_grow_and_small_is_smaller_than_large():
    grow = world.render_video(one(motion="grow", size=0.22))
    area = np.all(grow == np.array(world.COLOURS["red"], np.uint8), axis=-1).sum(axis=(1, 2))
    assert np.all(np.diff(area) > 0) and area[-1] / area[0] == pytest.approx(world.GROWTH ** 2, rel=0.15)
    small = [world.sample_scene(s, things=[{"size": "small"}]) for s in range(10)]
    large = [world.sample_scene(s, things=[{"size": "large"}]) for s in range(10)]
    assert max(s.things[0].size for s in small) < min(s.things[0].size for s in large)


def test_textures_mark_the_background_only():
    plain, stripes = world.render_image(one()), world.render_image(one(texture="stripes"))
    differs = np.any(np.asarray(plain) != np.asarray(stripes), axis=-1)
    assert 0.2 < differs.mean() < 0.6
    thing = world.shape_mask("circle", (0.5, 0.5), 0.22)
    assert not differs[thing].any()


# ----------------------------------------------------------------------------- sound
def test_each_colour_has_its_own_pitch():
    peaks = {c: _peak_hz(world.render_audio(one(colour=c, background="black" if c != "black" else "white")))
             for c in world.COLOURS}
    assert peaks["red"] == pytest.approx(220, rel=0.02)  # the documented base pitch
    ordered = sorted(peaks.values())
    semitones = 12 * np.log2(np.array(ordered[1:]) / np.array(ordered[:-1]))
    assert semitones.min() > 3  # colours a major third apart


def test_each_shape_has_its_own_rhythm_and_timbre():
    sounds = {s: world.render_audio(one(shape=s)) for s in world.SHAPES}
    assert {s: _count_bursts(a) for s, a in sounds.items()} == {"circle": 1, "square": 2, "triangle": 3, "star": 4}
    for a, b in itertools.combinations(sounds.values(), 2):
        assert not np.allclose(a, b, atol=1e-3)


def test_size_is_loudness_and_vertical_motion_glides():
    quiet, loud = world.render_audio(one(size=0.2)), world.render_audio(one(size=0.4))
    assert np.abs(loud).max() == pytest.approx(2 * np.abs(quiet).max(), rel=0.02)
    up = world.render_audio(one(motion="up"))
    n = int(0.15 * world.SAMPLE_RATE)
    assert _peak_hz(up[-n:]) / _peak_hz(up) == pytest.approx(2 ** (world.GLIDE_SEMITONES / 12), rel=0.03)


def test_same_caption_scenes_sound_different():
    scene = world.sample_scene(5)
    other = world.scene_like(scene, 77)
    assert not np.allclose(world.render_audio(scene), world.render_audio(other), atol=1e-3)


# ----------------------------------------------------------------------------- errors and speed
@pytest.mark.parametrize("make", [
    lambda: one(colour="mauve"),
    lambda: one(shape="hexagon"),
    lambda: one(motion="spin"),
    lambda: one(colour="blue", background="blue"),
    lambda: one(position=(1.5, 0.2)),
    lambda: one(shade=(50, 0, 0)),
    lambda: world.sample_scene(-1),
    lambda: world.sample_scene(1, things=[{"colour": "red"}], background="red"),
    lambda: world.sample_scene(1, things=[{"hue": "red"}]),
])
def test_bad_input_is_a_world_error_naming_it(make):
    with pytest.raises(WorldError) as err:
        make()
    assert len(str(err.value)) > 20


def test_rendering_is_fast_enough_to_train_on_the_fly():
    start = time.perf_counter()
    for seed in range(100):
        scene = world.sample_scene(seed)
        world.render_video(scene), world.render_audio(scene)
    per_minute = 100 / (time.perf_counter() - start) * 60
    assert per_minute > 1000, per_minute  # ~12,000 measured on one shared core


def test_split_holds_out_high_seeds():
    assert world.split_of(0) == "train" and world.split_of(world.TEST_SEED_START) == "test"


# ----------------------------------------------------------------------------- the oracle
def test_oracle_reads_clean_videos_exactly():
    from xvila.toy import oracle

    for seed in range(200):
        scene = world.sample_scene(seed)
        seen = oracle.read_video(world.render_video(scene))
        assert seen.background == scene.background, seed
        assert sorted(t.colour for t in seen.things) == sorted(t.colour for t in scene.things), seed
        for thing in scene.things:
            got = next(t for t in seen.things if t.colour == thing.colour)
            assert (got.shape, got.motion) == (thing.shape, thing.motion), (seed, thing)
            # the centroid of the drawn shape, from the world's own mask
            ys, xs = np.nonzero(world.shape_mask(thing.shape, *thing.at(0.0)))
            assert np.hypot(got.position[0] - (xs.mean() + 0.5) / 64, got.position[1] - (ys.mean() + 0.5) / 64) < 1 / 64


def test_oracle_survives_blur_and_noise():
    from PIL import ImageFilter

    from xvila.toy import oracle

    rng = np.random.default_rng(0)
    right = {"background": 0, "colour": 0, "shape": 0}
    scenes = [world.sample_scene(s, things=[{}]) for s in range(100)]
    for scene in scenes:
        image = world.render_image(scene).filter(ImageFilter.GaussianBlur(0.7))
        noisy = np.clip(np.asarray(image) + rng.normal(0, 6, (64, 64, 3)), 0, 255).astype(np.uint8)
        seen = oracle.read_image(noisy)
        right["background"] += seen.background == scene.background
        right["colour"] += seen.main is not None and seen.main.colour == scene.things[0].colour
        right["shape"] += seen.main is not None and seen.main.shape == scene.things[0].shape
    assert right["background"] == right["colour"] == 100 and right["shape"] >= 90, right


def test_oracle_hears_colour_shape_and_glide():
    from xvila.toy import oracle

    for seed in range(150):
        scene = world.sample_scene(seed)
        heard = oracle.read_audio(world.render_audio(scene))
        if len(scene.things) == 2:  # the louder thing's pitch
            assert heard.colour in {t.colour for t in scene.things}, seed
            continue
        thing = scene.things[0]
        assert (heard.colour, heard.shape) == (thing.colour, thing.shape), seed
        assert heard.glide == {"up": "up", "down": "down"}.get(thing.motion, "none"), seed


def test_oracle_on_silence_and_bad_shapes():
    from xvila.toy import oracle

    assert oracle.read_audio(np.zeros(16000, np.float32)).colour is None
    # a loud offset (strongest at 0 Hz) has no pitch, hence no colour: not an error
    drift = np.linspace(0.2, 0.8, 16000, dtype=np.float32)
    heard = oracle.read_audio(drift)
    assert heard.colour is None and heard.glide == "none"
    with pytest.raises(ValueError, match="image"):
        oracle.read_image(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="video"):
        oracle.read_video(np.zeros((64, 64, 3), np.uint8))


# ----------------------------------------------------------------------------- the corpus
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from train.toy.corpus import CorpusSpec, build_corpus

    out = tmp_path_factory.mktemp("corpus")
    spec = CorpusSpec(videos=3, test_videos=2, scenes_per_video=3, seed=1)
    build_corpus(out, spec, progress=False)
    return out, spec


def _annotation(out, split):
    import json

    return json.loads((out / f"{split}.json").read_text())


def test_corpus_annotations_hold_out_whole_scenes(corpus):
    out, spec = corpus
    train, test = _annotation(out, "train"), _annotation(out, "test")
    assert len(train) == 3 and len(test) == 2
    train_seeds = [s for e in train.values() for s in e["seeds"]]
    test_seeds = [s for e in test.values() for s in e["seeds"]]
    assert all(s < world.TEST_SEED_START for s in train_seeds) and all(s >= world.TEST_SEED_START for s in test_seeds)
    assert len(set(train_seeds)) == 9 and len(set(test_seeds)) == 6
    for split, ann in (("train", train), ("test", test)):
        for vid, e in ann.items():
            assert (out / "videos" / split / f"{vid}.mp4").is_file()
            assert e["sentences"] == [world.caption(world.sample_scene(s)) for s in e["seeds"]]
            assert e["timestamps"] == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]] and e["duration"] == 3.0


def test_corpus_videos_show_and_sound_their_scenes(corpus):
    from xvila import media
    from xvila.toy import oracle

    out, _ = corpus
    for vid, e in _annotation(out, "test").items():
        video = media.read_video(out / "videos" / "test" / f"{vid}.mp4", audio_sample_rate=world.SAMPLE_RATE)
        assert video.frames.shape == (24, 64, 64, 3) and video.fps == world.FPS
        assert video.audio.samples.shape[-1] == pytest.approx(3 * world.SAMPLE_RATE, abs=1200)
        for k, seed in enumerate(e["seeds"]):
            scene = world.sample_scene(seed)
            seen = oracle.read_video(video.frames[8 * k : 8 * k + 8])
            assert seen.background == scene.background
            assert sorted(t.colour for t in seen.things) == sorted(t.colour for t in scene.things)
            heard = oracle.read_audio(video.audio.samples[0, k * world.SAMPLE_RATE : (k + 1) * world.SAMPLE_RATE])
            assert heard.colour in {t.colour for t in scene.things}


def test_corpus_resumes_and_refuses_other_settings(corpus, tmp_path):
    import shutil

    from train.toy.corpus import CorpusError, CorpusSpec, build_corpus

    out, spec = corpus
    copy = tmp_path / "c"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("x2x*", "interleaved*"))
    gone, kept = copy / "videos/train/train000001.mp4", copy / "videos/train/train000000.mp4"
    gone.unlink()
    before = kept.stat().st_mtime_ns
    build_corpus(copy, spec, progress=False)
    assert gone.is_file() and kept.stat().st_mtime_ns == before
    with pytest.raises(CorpusError, match="other|built with"):
        build_corpus(copy, CorpusSpec(videos=4, test_videos=2, scenes_per_video=3, seed=1), progress=False)


def test_the_real_builders_run_on_the_corpus_unchanged(corpus):
    import json

    from train.builders import activitynet_sources, build_interleaved, build_x2x
    from train.data import X2X_TYPES

    out, _ = corpus
    train = activitynet_sources(out / "train.json", "videos/train")
    report = build_x2x(train, out, out / "x2x", heldout_rate=0)
    assert report.done and not report.skipped.items
    assert {t: report.counts[f"train/{t}"] for t in X2X_TYPES} == dict.fromkeys(X2X_TYPES, 9)
    captions = {c for e in _annotation(out, "train").values() for c in e["sentences"]}
    lines = (out / "x2x" / "conversations.jsonl").read_text().splitlines()
    assert {o["caption"] for line in lines for o in json.loads(line)["outputs"]} == captions

    held = build_x2x(activitynet_sources(out / "test.json", "videos/test"), out, out / "x2x-test",
                     heldout_rate=1, heldout=(6,) * len(X2X_TYPES))
    assert {t: held.counts[f"heldout/{t}"] for t in X2X_TYPES} == dict.fromkeys(X2X_TYPES, 6)

    inter = build_interleaved(activitynet_sources(out / "train.json", "videos/train"), out, out / "interleaved")
    assert inter.counts == {"videos": 3, "chunks": 9}
    rows = [json.loads(x) for x in (out / "interleaved" / "interleaved.jsonl").read_text().splitlines()]
    by_video = {e: a["sentences"] for e, a in _annotation(out, "train").items()}
    for row in rows:  # chunk k is scene k
        assert [c["caption"] for c in row["chunks"]] == by_video[row["id"].rsplit("/", 1)[-1]]


# ----------------------------------------------------------------------------- captions back to scenes
def test_parse_caption_reads_every_sampled_caption_back():
    for seed in SEEDS:
        scene = world.sample_scene(seed)
        assert world.parse_caption(world.caption(scene)) == world.attributes(scene)


def test_a_request_gives_a_scene_it_describes():
    scene = world.scene_from_caption("Draw a blue square on a yellow background.", 3)
    assert scene.background == "yellow" and [(t.colour, t.shape) for t in scene.things] == [("blue", "square")]
    assert world.parse_caption("a large red star growing") == {
        "background": None, "things": [{"shape": "star", "colour": "red", "size": "large", "motion": "grow"}]}
    with pytest.raises(WorldError, match="no world scene"):
        world.parse_caption("a cat on a mat")
