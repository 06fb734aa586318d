"""The toy product: the results command, its oracle scorers and reply parser, the demo's toy
default and world examples, the speed bench (all on tiny-random or rendered world scenes)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from train.toy import results, scoring
from xvila import WeightsUnavailableError, media
from xvila.toy import oracle, world

ROOT = Path(__file__).resolve().parents[1]
SEED = world.TEST_SEED_START + 123


def _app():
    sys.path.insert(0, str(ROOT))
    import app

    return app


def frame(scene: world.Scene) -> np.ndarray:
    return np.asarray(world.render_image(scene))


def one_thing(seed: int = SEED, **kw) -> world.Scene:
    return world.sample_scene(seed, things=[{"size": "large", "motion": "still"}], **kw)


# ------------------------------------------------------------------------------ the command
def test_results_command_writes_every_section_and_the_plots(model, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    path = results.main(["--checkpoint", "tiny-random", "--n", "2", "--alpha-n", "1", "--steps", "2", "--alphas", "0,1",
                         "--max-new-tokens", "8", "--threads", "1", "--work", str(work), "--out", str(out)], model=model)
    text = path.read_text()
    for heading in ("## 1. X²A by decoding mode", "## 2. Details only the highway carries", "## 3. The conditioning rate α",
                    "## 4. Understanding", "## 5. Emergent: IMG2AUD and AUD2IMG", "## 6. Long context"):
        assert heading in text
    for row in ("| Text-Aligned |", "| TA |", "| TA+VEH |", "| IMG2AUD |", "| AUD2IMG |", "| video → motion |",
                "| audio → colour |", "| text → image: colour and background |", "| colours found |"):
        assert row in text
    assert "Samples per type: VID2IMG 2, VID2VID 2, IMG2VID 2, AUD2VID 2, IMG+AUD2VID 2, VID2AUD 2." in text
    assert "Machine: " in text and "threads" in text and "--n 2" in text  # the command that regenerates it
    for name in results.PLOTS.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name})" in text
    saved = json.loads((work / "results.json").read_text())
    assert set(saved["details"]) == set(results.DETAIL_TYPES)
    assert all(saved["details"][t]["position error"]["n"] == 2 for t in results.DETAIL_TYPES)
    # Every scene the results use is held out.
    ids = [json.loads(line)["id"] for f in ("x2x", "emergent") for line in (work / "data" / f"{f}.jsonl").open()]
    assert ids and all(world.split_of(int(i.split(":")[1])) == "test" for i in ids)
    assert all(world.split_of(s["seed"]) == "test" for s in saved["understanding_samples"])


def test_results_refuses_bad_options_and_a_work_folder_it_did_not_write(tmp_path):
    with pytest.raises(SystemExit, match="--alphas"):
        results.main(["--alphas", "0,2", "--work", str(tmp_path)])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="did not write"):
        results.main(["--work", str(tmp_path), "--out", str(tmp_path / "out")], model=object())
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------ the oracle's scores
@pytest.mark.parametrize("seed", range(SEED, SEED + 6))
def test_the_truth_scores_perfectly_against_itself(seed):
    truth = frame(world.sample_scene(seed))
    assert scoring.position_error(truth, truth) == pytest.approx(0.0, abs=1e-9)
    assert scoring.texture_match(truth, truth) == 1.0
    assert scoring.shade_distance(truth, truth) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("texture", world.TEXTURES)
def test_the_background_texture_is_read_from_pixels_also_through_mp4(texture, tmp_path):
    for seed in range(SEED, SEED + 4):
        scene = world.sample_scene(seed, texture=texture)
        assert scoring.background_texture(frame(scene)) == texture
    path = media.write_mp4(tmp_path / "clip.mp4", world.render_video(scene), world.FPS)
    assert scoring.background_texture(scoring.frames_of(path)[0]) == texture


def test_a_shifted_thing_scores_its_shift_and_other_details_score_worse():
    scene = one_thing()
    thing = scene.things[0]
    x, y = thing.position
    dx = 0.2 if x < 0.5 else -0.2
    shifted = dataclasses.replace(scene, things=(dataclasses.replace(thing, position=(x + dx, y)),))
    truth = frame(scene)
    assert scoring.position_error(frame(shifted), truth) == pytest.approx(0.2, abs=0.03)
    other = next(t for t in world.TEXTURES if t != scene.texture)
    assert scoring.texture_match(frame(dataclasses.replace(scene, texture=other)), truth) == 0.0
    shade = tuple(int(np.clip(s + 10, -10, 10)) - s for s in scene.background_shade)  # as far as the jitter allows
    lighter = dataclasses.replace(scene, background_shade=tuple(s + d for s, d in zip(scene.background_shade, shade)))
    # The background moves by |shade| in RGB, the thing not at all: the mean of the two.
    assert scoring.shade_distance(frame(lighter), truth) == pytest.approx(np.linalg.norm(shade) / 2, abs=1.5)


def test_an_output_without_a_thing_scores_as_chance():
    scene = one_thing()
    empty = np.broadcast_to(np.array(scene.background_rgb, np.uint8), frame(scene).shape).copy()
    assert scoring.position_error(empty, frame(scene)) == scoring.MISS_POSITION


def test_a_truth_frame_without_a_thing_is_left_out_not_an_error():
    """A thing can move out of the picture by the last frames: position is unjudgeable there
    (NaN), and the file's score is the mean over the frames that can be judged."""
    scene = one_thing()
    empty = np.broadcast_to(np.array(scene.background_rgb, np.uint8), frame(scene).shape).copy()
    assert math.isnan(scoring.position_error(frame(scene), empty))
    assert scoring.position_error(frame(scene), frame(scene)) == pytest.approx(0.0, abs=1e-9)


def test_detail_scores_of_files_align_frames_and_resize(tmp_path):
    scene = world.sample_scene(SEED + 7)
    clip = media.write_mp4(tmp_path / "clip.mp4", world.render_video(scene), world.FPS)
    small = media.write_png(tmp_path / "small.png", world.render_image(scene, resolution=32))
    big = media.write_png(tmp_path / "big.png", world.render_image(scene))
    same = scoring.detail_scores(clip, clip)
    assert same["position error"] == pytest.approx(0.0, abs=1e-9) and same["texture match"] == 1.0
    assert scoring.detail_scores(small, big)["position error"] < 0.03  # 32 px against 64 px
    scene = world.sample_scene(SEED + 7, things=[{"motion": "right", "size": "small"}])
    forth = media.write_mp4(tmp_path / "forth.mp4", world.render_video(scene), world.FPS)
    back = media.write_mp4(tmp_path / "back.mp4", world.render_video(scene)[::-1], world.FPS)
    # Frames at the same times: the ends are a whole travel apart, the middles close.
    assert scoring.detail_scores(back, forth)["position error"] == pytest.approx(world.TRAVEL * 2 / 3, abs=0.04)


# ------------------------------------------------------------------------------ reading replies
@pytest.mark.parametrize("reply, expected", [
    ("It is a red circle.", dict(colour="red", shape="circle", motion=None, background=None)),
    ("A large green star moving up on a yellow background", dict(colour="green", shape="star", motion="up",
                                                                 background="yellow")),
    ("On a blue background there is an orange triangle.", dict(colour="orange", shape="triangle", background="blue")),
    ("The square is not moving.", dict(shape="square", motion="still")),
    ("It moves to the left.", dict(motion="left", colour=None)),
    ("The circles are growing", dict(shape="circle", motion="grow")),
    ("Sure! This sound was made by a blue square.", dict(colour="blue", shape="square")),
    ("a bright pink star", dict(colour="pink", shape="star", motion=None)),
    ("I don't know.", dict(colour=None, shape=None, motion=None, background=None)),
    ("It is shrinking, then it goes down", dict(motion="shrink")),
])
def test_replies_are_read_for_the_worlds_words(reply, expected):
    parsed = scoring.parse_reply(reply)
    assert {k: parsed[k] for k in expected} == expected


# ------------------------------------------------------------------------------ the demo
def test_the_header_says_it_is_the_toy_model_what_it_knows_and_how_to_run_7b():
    app = _app()
    text = app.header("toy", "cpu", False, None, toy=True)
    assert "toy model" in text and "Untrained" not in text and "--checkpoint xvila-7b" in text
    for word in (*world.SHAPES, *world.COLOURS, *world.MOTION_WORDS.values(), "sounds"):
        assert word in text


def test_without_the_toy_model_the_demo_serves_tiny_random_and_says_so(monkeypatch, capsys):
    app = _app()
    from xvila import XVila

    stub = SimpleNamespace(config=SimpleNamespace(name="tiny-random"))

    def from_pretrained(source, device=None, offload_decoders=False):
        if source == "toy":
            raise WeightsUnavailableError("the toy model is not in this checkout (assets/toy/xvila has no "
                                          "config.json): train it with `python -m train.toy xvila`")
        assert source == "tiny-random"
        return stub

    monkeypatch.setattr(XVila, "from_pretrained", from_pretrained)
    model, source, note = app.load_model(None, None)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert model is stub and source == "tiny-random"
    assert line.startswith("x-vila: could not load toy (WeightsUnavailableError") and "Serving tiny-random" in line
    header = app.header(source, "cpu", True, note)
    assert "toy model is not in this checkout" in header and "Untrained" in header


def test_toy_models_get_the_worlds_settings_and_others_the_decoders():
    app = _app()
    from xvila.decoders.base import DecodeSettings

    toy = app.demo_defaults(SimpleNamespace(config=SimpleNamespace(name="toy", highway_alpha=0.5)))
    assert (toy.video_frames, toy.audio_seconds, toy.steps, toy.alpha) == (world.FRAMES, world.AUDIO_SECONDS, 20, 0.5)
    other = app.demo_defaults(SimpleNamespace(config=SimpleNamespace(name="tiny-random", highway_alpha=0.6)))
    assert (other.video_frames, other.steps) == (DecodeSettings().frames, DecodeSettings().steps)


def test_the_examples_are_world_scenes_whose_answers_the_prompts_ask_for():
    app = _app()
    examples = app.examples_of()
    assert len(examples) == len(app.WORLD_EXAMPLES) and {e[1] for e in examples} == {"text", "image", "video", "audio"}
    for message, _ in examples:
        assert all(Path(f).is_file() and Path(f).stat().st_size < 100_000 for f in message["files"])
    seen = oracle.read_image(media.read_image(app.EXAMPLES / "red-circle.png"))
    assert (seen.main.colour, seen.main.shape, seen.background) == ("red", "circle", "blue")
    clip = oracle.read_video(media.read_video(app.EXAMPLES / "green-star-up.mp4").frames)
    assert (clip.main.colour, clip.main.shape, clip.main.motion) == ("green", "star", "up")
    sound = media.read_audio(app.EXAMPLES / "blue-square.wav", mono=True)
    heard = oracle.read_audio(sound.samples[0], sound.sample_rate)
    assert (heard.colour, heard.shape) == ("blue", "square")
    drawn = world.parse_caption("Draw a blue square on a yellow background.")
    assert drawn == {"background": "yellow", "things": [{"shape": "square", "colour": "blue"}]}


def test_small_media_are_shown_upscaled_without_smoothing_and_the_file_is_untouched(tmp_path):
    app = _app()
    assert "image-rendering: pixelated" in app.CSS and "min-width: 256px" in app.CSS
    path = str(media.write_png(tmp_path / "out.png", world.render_image(one_thing())))
    turn = app.ShownTurn(text="draw", media=[app.Medium("image", "TA", path)], done=True)
    assert app._media_content(turn)[0] == {"path": path}  # the model's own 64 px file


# ------------------------------------------------------------------------------ the bench
def test_the_speed_bench_quick_mode_times_every_reply(model, monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("toy_speed", ROOT / "bench" / "toy_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench.XVila, "from_pretrained", lambda *a, **k: model)
    out = tmp_path / "speed.json"
    result = bench.main(["--quick", "--threads", "1", "--json", str(out)])
    m = result["median"]
    seconds = {"first token (s)", "text reply (s)", "image reply (s)", "video reply (s)", "audio reply (s)"}
    assert seconds | {"image reply tokens", "video reply tokens", "audio reply tokens"} == set(m)
    assert all(m[k] > 0 and math.isfinite(m[k]) for k in seconds) and m["first token (s)"] <= m["text reply (s)"]
    assert 0 <= m["image reply tokens"] <= 8  # --quick's token limit
    assert result["threads"] == 1 and result["settings"]["steps"] == 2
    assert json.loads(out.read_text())["median"] == m


def test_held_out_conversations_list_their_media_in_the_prompts_order(tmp_path):
    """IMG+AUD2VID prompts name the audio first in some phrasings: the inputs must follow the
    placeholders, or the chat refuses the message (PromptError) and the sample is lost."""
    from train.data import X2X_TYPES

    orders = set()
    for kind in X2X_TYPES:
        for k in range(24 if kind == "IMG+AUD2VID" else 4):
            r = results.x2x_conversation(kind, world.TEST_SEED_START + 4_000_000 + k, tmp_path)
            said = re.findall(r"<(image|video|audio)>", r["conversations"][0]["value"])
            assert [i["modality"] for i in r["inputs"]] == said, r
            if kind == "IMG+AUD2VID":
                orders.add(tuple(said))
    assert orders == {("image", "audio"), ("audio", "image")}  # both phrasings were drawn
