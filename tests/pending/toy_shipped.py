"""The shipped toy model answers fixed prompts sensibly (issue 14, "Done when").

NOT COLLECTED YET, on purpose and said so in issue 14's note: no trained toy model ships
(`assets/toy/xvila/` is empty), so this acceptance test would fail. Move it to
`tests/test_toy_shipped.py` in the commit that ships the model; it loads that model
(`XVila.from_pretrained("toy")`) and fails, not skips, without it. Run it by hand with
`python -m pytest tests/pending/toy_shipped.py`. Every
scene is held out (seeds >= world.TEST_SEED_START) and rendered by `xvila.toy.world`; the
referee is the reply parser of the results command and the pixel oracle.
"""

from __future__ import annotations

import numpy as np
import pytest

from train.toy.scoring import frames_of, parse_reply, position_error
from xvila import XVila, media
from xvila.decoders.base import DecodeSettings
from xvila.toy import oracle, world

SEED = world.TEST_SEED_START + 700_000_000
SETTINGS = DecodeSettings(steps=20, guidance=5.0, frames=world.FRAMES, seconds=world.AUDIO_SECONDS)


@pytest.fixture(scope="module")
def toy():
    return XVila.from_pretrained("toy", device="cpu")


def send(model, tmp_path, text, files=(), output="text", decoding="TA+VEH", seed=0):
    chat = model.new_chat(outputs_dir=tmp_path / f"out-{decoding}-{seed}")
    events = list(chat.send(text, media=[str(f) for f in files], output=output, temperature=0.0,
                            max_new_tokens=48, decode=SETTINGS, decoding=decoding, seed=seed))
    made = next((e.path for e in events if e.kind == "media" and e.path), None)
    return "".join(e.text for e in events if e.kind == "text"), made


@pytest.mark.parametrize("colour, shape", [("red", "circle"), ("blue", "square"), ("yellow", "star")])
def test_what_is_this_names_the_colour_and_the_shape(toy, tmp_path, colour, shape):
    scene = world.sample_scene(SEED, things=[{"colour": colour, "shape": shape, "size": "large", "motion": "still"}])
    path = media.write_png(tmp_path / "scene.png", world.render_image(scene))
    reply, _ = send(toy, tmp_path, "What is this?", [path])
    said = parse_reply(reply)
    assert (said["colour"], said["shape"]) == (colour, shape), reply


def test_a_drawn_request_shows_what_was_asked(toy, tmp_path):
    _, path = send(toy, tmp_path, "Draw a blue square on a yellow background.", output="image")
    seen = oracle.read_image(frames_of(path)[0])
    assert seen.background == "yellow" and seen.main is not None
    assert (seen.main.colour, seen.main.shape) == ("blue", "square")


def test_the_highway_keeps_the_objects_position_better_than_without(toy, tmp_path):
    errors = {"TA": [], "TA+VEH": []}
    for i in range(4):
        scene = world.sample_scene(SEED + 10 + i, things=[{"size": "large", "motion": "still"}])
        picture = media.write_png(tmp_path / f"in-{i}.png", world.render_image(scene))
        truth = np.asarray(world.render_image(scene))
        for decoding in errors:
            _, path = send(toy, tmp_path, "Make a video that starts from this image.", [picture], "video", decoding, i)
            errors[decoding].append(position_error(frames_of(path)[0], truth))
    assert np.mean(errors["TA+VEH"]) < np.mean(errors["TA"]), errors
