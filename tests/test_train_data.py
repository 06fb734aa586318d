"""Training data: manifests, builders (X2X, interleaved), caches and adapters, on tiny
generated captioned videos with sound (tests/train_factory.py)."""

from __future__ import annotations

import json
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch
from media_factory import dominant_frequency
from torch.utils.data import DataLoader
from train_factory import AUDIO_RATE, FPS, HEIGHT, WIDTH, frame_index, make_dataset

from train import builders
from train.adapters import alpaca, llava_instruct
from train.adapters import main as adapters_main
from train.builders import (ResumeError, activitynet_sources, build_interleaved, build_x2x, webvid_sources)
from train.cache import FeatureCache, NotCachedError, TextCache, build_feature_cache, build_text_cache
from train.cache import main as cache_main
from train.data import (GEN_MARKERS, X2X_MODALITIES, X2X_TYPES, ManifestDataset, ManifestError, Skipped,
                        UnsafePathError,
                        marker_sequence, placeholder_sequence, read_manifest, replace_gen_markers, resolve,
                        write_manifest)
from xvila import media
from xvila.constants import AUDIO, IMAGE, VIDEO
from xvila.conversation import PLACEHOLDERS
from xvila.decoders.controller import prepare_e_vis
from xvila.encoders import imagebind_preprocess as pre

HELDOUT = (2, 2, 2, 1, 1, 1)
ANET_SEGMENTS = {0: (0.0, 2.0, "A man chops onions."), 1: (2.0, 4.5, "He fries them in a pan."),
                 2: (4.5, 6.0, "He serves the dish.")}


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _x2x(ds, out, **kw):
    return build_x2x(webvid_sources(ds.webvid), ds.root, out, seed=0, rounds=2, heldout=HELDOUT, heldout_rate=1.0, **kw)


@pytest.fixture(scope="module")
def x2x(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("x2x")
    return out, _x2x(ds, out)


@pytest.fixture(scope="module")
def x2x_anet(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("x2x_anet")
    report = build_x2x(activitynet_sources(ds.activitynet, "anet"), ds.root, out, seed=3, rounds=3, heldout=(0,) * 6)
    return out, report


def _all_sources(ds):
    return chain(webvid_sources(ds.webvid), activitynet_sources(ds.activitynet, "anet"))


@pytest.fixture(scope="module")
def interleaved(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("interleaved")
    return out, build_interleaved(_all_sources(ds), ds.root, out)


@pytest.fixture(scope="module")
def model():
    from xvila import XVila

    return XVila.from_pretrained("tiny-random", device="cpu")


def _frames_in(start: float, end: float, seconds: float) -> list[int]:
    """Frame numbers xvila.media decodes for [start, end) of a factory video (frame i at i/FPS)."""
    return [i for i in range(round(seconds * FPS)) if start - 1e-6 <= i / FPS < end - 1e-6]


def _source_of(record_id: str) -> str:
    return record_id.split(":")[0] + ".mp4"


# ---------------------------------------------------------------------------- X2X
def _conversations(out: Path) -> list[dict]:
    return list(read_manifest(out / "conversations.jsonl"))


def test_x2x_media_exist_and_decode_to_the_expected_kind_size_and_length(ds, x2x):
    out, _ = x2x
    records = _conversations(out) + list(read_manifest(out / "heldout.jsonl"))
    assert records
    checked = Counter()
    for record in records:
        clip = ds.videos[_source_of(record["id"])]
        n = round(clip.seconds * FPS)  # WebVid: the whole clip is the segment
        for item in record["inputs"] + record["outputs"]:
            path, name = resolve(out, item["path"]), Path(item["path"]).name
            assert path.is_file(), item
            if item["modality"] == IMAGE:
                image = media.read_image(path)
                assert image.size == (WIDTH, HEIGHT)
                expected = {"first.png": 0, "middle.png": n // 2, "last.png": n - 1}[name]
                assert frame_index(np.asarray(image)) == expected % 12, (record["id"], name)
            elif item["modality"] == VIDEO:
                video = media.read_video(path)
                frames = {"clip.mp4": n, "head.mp4": n // 2, "tail.mp4": n - n // 2}[name]
                assert video.frames.shape == (frames, HEIGHT, WIDTH, 3) and video.audio is None
                assert frame_index(video.frames[0]) == (n // 2 if name == "tail.mp4" else 0) % 12
            else:
                audio = media.read_audio(path)
                assert audio.sample_rate == AUDIO_RATE and audio.samples.shape[0] == 1
                assert audio.duration == pytest.approx(clip.seconds, abs=1e-3)
                assert dominant_frequency(audio.samples[0], AUDIO_RATE) == pytest.approx(clip.tone_hz, abs=3)
            checked[(item["modality"], name)] += 1
    assert {name for _, name in checked} >= {"clip.mp4", "head.mp4", "tail.mp4", "first.png", "audio.wav"}
    frames_cut = 0  # VID2IMG's three candidate frames, referenced or not
    for png in (out / "media" / "x2x").rglob("*.png"):
        n = round(ds.videos[png.parent.parent.relative_to(out / "media" / "x2x").as_posix() + ".mp4"].seconds * FPS)
        expected = {"first.png": 0, "middle.png": n // 2, "last.png": n - 1}[png.name]
        assert frame_index(np.asarray(media.read_image(png))) == expected % 12, png
        frames_cut += 1
    assert frames_cut == 4 * 3


def test_x2x_six_types_with_their_modalities_placeholders_and_markers(x2x, x2x_anet):
    records = _conversations(x2x[0]) + _conversations(x2x_anet[0])
    assert set(r["type"] for r in _conversations(x2x[0])) == set(X2X_TYPES)
    phrasings = {t: set() for t in X2X_TYPES}
    for record in records:
        ins, outs = X2X_MODALITIES[record["type"]]
        humans = [t["value"] for t in record["conversations"][::2]]
        gpts = [t["value"] for t in record["conversations"][1::2]]
        rounds = len(record["outputs"])
        assert rounds >= 1 and all(o["modality"] == outs[0] for o in record["outputs"])
        assert Counter(i["modality"] for i in record["inputs"]) == Counter({m: rounds for m in ins})
        # the placeholders, counted here independently of the validator, match the inputs
        for modality, placeholder in PLACEHOLDERS.items():
            assert sum(h.count(placeholder) for h in humans) == sum(i["modality"] == modality for i in record["inputs"])
            assert sum(g.count(GEN_MARKERS[modality]) for g in gpts) == sum(o["modality"] == modality
                                                                         for o in record["outputs"])
        assert [m for h in humans for m in placeholder_sequence(h)] == [i["modality"] for i in record["inputs"]]
        assert all(o["caption"] for o in record["outputs"])
        phrasings[record["type"]].add(humans[0].replace("<", "").split()[0])
    assert all(len(p) >= 2 for p in phrasings.values()), phrasings  # templates vary


def test_x2x_heldout_has_the_asked_composition_and_is_disjoint_from_train(x2x):
    out, report = x2x
    train, heldout = _conversations(out), list(read_manifest(out / "heldout.jsonl"))
    assert Counter(r["type"] for r in heldout) == dict(zip(X2X_TYPES, HELDOUT))
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    # whole videos are held out, the first ones in source order (rate 1): no clip leaks
    assert {_source_of(r["id"]) for r in heldout} == {"webvid/dog.mp4", "webvid/sea.mp4"}
    assert not {_source_of(r["id"]) for r in train} & {_source_of(r["id"]) for r in heldout}
    assert not {i["path"] for r in train for i in r["inputs"] + r["outputs"]} & {
        i["path"] for r in heldout for i in r["inputs"] + r["outputs"]}
    assert report.heldout_short == {} and report.done
    assert sum(v for k, v in report.counts.items() if k.startswith("dropped/")) == 3  # sea's audio types


def test_x2x_heldout_rate_picks_videos_by_hash(ds, tmp_path):
    report = build_x2x(webvid_sources(ds.webvid), ds.root, tmp_path, heldout=(9,) * 6, heldout_rate=0.5)
    held = {_source_of(r["id"]) for r in read_manifest(tmp_path / "heldout.jsonl")}
    picked = {rel for rel in ds.videos if rel.startswith("webvid/") and builders._bucket(rel[:-4]) < 0.5}
    assert held == picked and 0 < len(picked) < 4  # the hash splits our four videos
    assert report.heldout_short  # 9 per type cannot be filled: reported


def test_x2x_multi_round_conversations_follow_the_videos_segments(x2x_anet):
    records = _conversations(x2x_anet[0])
    assert Counter(r["type"] for r in records) == {t: 3 for t in X2X_TYPES}  # 3 segments x 6 types
    multi = 0
    for record in records:
        segs = [int(o["path"].split("/")[-2]) for o in record["outputs"]]
        start = int(record["id"].split(":")[1])
        assert segs == list(range(start, start + len(segs)))  # consecutive events of the video
        assert [o["caption"] for o in record["outputs"]] == [ANET_SEGMENTS[j][2] for j in segs]
        rounds = len(record["conversations"]) // 2
        assert len(segs) <= rounds <= 3
        if rounds > len(segs):  # a describe round only once the segments ran out
            assert segs[-1] == 2 and record["conversations"][-1]["value"].rstrip(".").endswith(
                ANET_SEGMENTS[2][2].rstrip(".").lower()[1:])
        multi += len(segs) > 1
        for o in record["outputs"]:
            if o["path"].endswith("clip.mp4"):
                s, e, _ = ANET_SEGMENTS[int(o["path"].split("/")[-2])]
                assert len(media.read_video(resolve(x2x_anet[0], o["path"])).frames) == len(_frames_in(s, e, 6.0))
    assert multi >= 3


def test_corrupt_video_is_skipped_and_counted_with_its_reason(ds, x2x, interleaved):
    for out, report, log in ((*x2x, "x2x.skipped.jsonl"), (*interleaved, "interleaved.skipped.jsonl")):
        assert report.skipped.counts == {"CorruptMediaError": 1}
        (file, reason), = report.skipped.items
        assert file == ds.corrupt and reason.startswith("CorruptMediaError:") and "damaged" in reason
        assert report.counts["sources_skipped"] == 1 and report.sources == 5 + (out == interleaved[0])
        logged = [json.loads(line) for line in (out / log).read_text().splitlines()]
        assert [(x["file"], x["kind"]) for x in logged] == [(ds.corrupt, "CorruptMediaError")]
    text = (x2x[0] / "conversations.jsonl").read_text() + (interleaved[0] / "interleaved.jsonl").read_text()
    assert "broken" not in text


# ---------------------------------------------------------------------- interleaved
def test_interleaved_three_even_chunks_per_video(ds, interleaved):
    out, report = interleaved
    records = list(read_manifest(out / "interleaved.jsonl"))
    assert [r["source"] for r in records] == [*[rel for rel in ds.videos if rel.startswith("webvid/")], "anet/v_cook.mp4"]
    assert report.counts["videos"] == 5 and report.counts["chunks"] == 15
    for record in records:
        clip = ds.videos[record["source"]]
        d = clip.seconds
        assert len(record["chunks"]) == 3
        assert [c["start"] for c in record["chunks"]] == pytest.approx([0, d / 3, 2 * d / 3], abs=1e-6)
        assert [c["end"] for c in record["chunks"]] == pytest.approx([d / 3, 2 * d / 3, d], abs=1e-6)
        for chunk in record["chunks"]:
            frames = _frames_in(chunk["start"], chunk["end"], d)
            image = np.asarray(media.read_image(resolve(out, chunk["image"])))
            assert image.shape == (HEIGHT, WIDTH, 3) and frame_index(image) == frames[len(frames) // 2] % 12
            video = media.read_video(resolve(out, chunk["video"]))
            assert len(video.frames) == len(frames) and frame_index(video.frames[0]) == frames[0] % 12
            audio = media.read_audio(resolve(out, chunk["audio"]))
            assert audio.sample_rate == AUDIO_RATE
            assert audio.samples.shape == (1, round((chunk["end"] - chunk["start"]) * AUDIO_RATE))
            assert dominant_frequency(audio.samples[0], AUDIO_RATE) == pytest.approx(clip.tone_hz, abs=5)
    anet = records[-1]["chunks"]  # [0,2) [2,4) [4,6): most overlap with segments 0, 1 (2-4.5), 2 (4.5-6)
    assert [c["caption"] for c in anet] == [ANET_SEGMENTS[j][2] for j in (0, 1, 2)]
    assert all(c["caption"] == ds.videos[records[0]["source"]].caption for c in records[0]["chunks"])


def test_interleaved_skips_videos_without_sound(ds, tmp_path):
    from train_factory import write_captioned_video

    write_captioned_video(ds.root / "mute/a.mp4", 4.0, audio=False)
    report = build_interleaved([{"video": "mute/a.mp4", "segments": [(0.0, None, "quiet")]}], ds.root, tmp_path)
    assert report.skipped.counts == {"NoAudio": 1} and (tmp_path / "interleaved.jsonl").read_text() == ""


# ------------------------------------------------------------------------ resumption
def _manifests(out: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {n: (out / n).read_text() for n in names}


X2X_FILES = ("conversations.jsonl", "heldout.jsonl", "x2x.skipped.jsonl")


def test_x2x_interrupted_then_rerun_equals_an_uninterrupted_run(ds, x2x, tmp_path, monkeypatch):
    reference = _manifests(x2x[0], X2X_FILES)
    real, calls = builders._Run.checkpoint, []

    def crash_on_fourth(self, next_source):
        calls.append(next_source)
        if len(calls) == 4:  # source 3's records are written but not checkpointed
            raise RuntimeError("power cut")
        real(self, next_source)

    monkeypatch.setattr(builders._Run, "checkpoint", crash_on_fourth)
    with pytest.raises(RuntimeError, match="power cut"):
        _x2x(ds, tmp_path)
    state = json.loads((tmp_path / "x2x.state.json").read_text())
    assert state["next_source"] == 3
    assert (tmp_path / "conversations.jsonl").stat().st_size > state["sizes"]["conversations.jsonl"]  # half a source
    monkeypatch.setattr(builders._Run, "checkpoint", real)
    report = _x2x(ds, tmp_path)
    assert _manifests(tmp_path, X2X_FILES) == reference
    assert report.counts == x2x[1].counts and report.skipped.counts == x2x[1].skipped.counts


def test_builders_stopped_by_max_sources_resume_to_the_same_result(ds, x2x, interleaved, tmp_path):
    first = _x2x(ds, tmp_path / "x", max_sources=2)
    assert not first.done and first.sources == 2
    assert _x2x(ds, tmp_path / "x").done
    assert _manifests(tmp_path / "x", X2X_FILES) == _manifests(x2x[0], X2X_FILES)
    for limit in (1, 3):
        build_interleaved(_all_sources(ds), ds.root, tmp_path / "i", max_sources=limit)
    report = build_interleaved(_all_sources(ds), ds.root, tmp_path / "i")
    names = ("interleaved.jsonl", "interleaved.skipped.jsonl")
    assert _manifests(tmp_path / "i", names) == _manifests(interleaved[0], names)
    assert report.counts == interleaved[1].counts
    with pytest.raises(ResumeError, match="other settings"):
        build_x2x(webvid_sources(ds.webvid), ds.root, tmp_path / "x", seed=1, heldout=HELDOUT, heldout_rate=1.0)


# --------------------------------------------------------------------- manifests
def _pairs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "modality": "image", "path": f"im/{i}.png",
                                        "caption": f"picture {i}"}) + "\n" for i in range(n)))
    return path


def test_manifest_dataset_two_workers_yield_each_record_once_and_start_skips(tmp_path):
    path = _pairs(tmp_path / "pairs.jsonl", 23)
    ids = [r["id"] for r in DataLoader(ManifestDataset(path), batch_size=None, num_workers=2)]
    assert sorted(ids) == sorted(f"p{i}" for i in range(23)) and len(set(ids)) == 23
    ids = [r["id"] for r in DataLoader(ManifestDataset(path, start=5), batch_size=None, num_workers=2)]
    assert sorted(ids, key=lambda s: int(s[1:])) == [f"p{i}" for i in range(5, 23)]
    # blocks of a batch: batches come out in file order, so `start` = batches seen x batch size
    loader = DataLoader(ManifestDataset(path, start=3, block_size=4), batch_size=4, num_workers=2, collate_fn=list)
    assert [r["id"] for batch in loader for r in batch] == [f"p{i}" for i in range(3, 23)]
    ranks = [[r["id"] for r in ManifestDataset(path, rank=k, world_size=2)] for k in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 23


def test_resolve_refuses_paths_outside_the_root(tmp_path):
    assert resolve(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"
    for bad in ("../x", "/etc/passwd", "a/../../x", "C:\\x.png", ""):
        with pytest.raises(UnsafePathError):
            resolve(tmp_path, bad)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "modality": "image", "path": "../secret.png", "caption": "x"}) + "\n")
    with pytest.raises(UnsafePathError, match=f"{path}:1"):
        list(read_manifest(path))


@pytest.mark.parametrize("record, message", [
    ("{not json", "Expecting property name"),
    ({"id": "c", "modality": "smell", "path": "a.png", "caption": "x"}, "'modality' must be one of"),
    ({"id": "c", "modality": "image", "path": "a.png"}, "'caption' must be a str, got missing"),
    ({"id": "c", "type": "VID2IMG", "conversations": [{"from": "human", "value": "<video> hi"},
      {"from": "gpt", "value": "ok <gen:image>"}], "inputs": [], "outputs": [
      {"modality": "image", "path": "a.png", "caption": "x"}]}, "placeholders \\['video'\\] do not match"),
    ({"id": "c", "type": "sft", "conversations": [{"from": "gpt", "value": "hi"}], "inputs": [], "outputs": []},
     "'from' must be 'human' on even turns"),
    ({"id": "c", "type": "sft", "conversations": [{"from": "human", "value": "<gen:audio>"},
      {"from": "gpt", "value": "x"}], "inputs": [], "outputs": []}, "may not hold output markers"),
    ({"id": "c", "source": "v.mp4", "chunks": [{"image": "a.png", "audio": "a.wav", "video": "a.mp4",
      "caption": "x", "start": 2, "end": 1}]}, "0 <= start < end"),
])
def test_read_manifest_names_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "m.jsonl"
    good = {"id": "ok", "modality": "audio", "path": "a.wav", "caption": "rain"}
    path.write_text(json.dumps(good) + "\n\n" + (record if isinstance(record, str) else json.dumps(record)) + "\n")
    reader = read_manifest(path)
    assert next(reader) == good
    with pytest.raises(ManifestError, match=f"{path}:3: .*{message}"):
        next(reader)


def test_gen_markers_expand_to_the_configs_generation_tokens():
    from xvila.config import XVilaConfig

    config = XVilaConfig.from_name("tiny-random")
    text = replace_gen_markers("Here: <gen:image> and <gen:audio>", config.gen_token_names)
    assert text == "Here: " + "".join(config.gen_token_names(IMAGE)) + " and " + "".join(config.gen_token_names(AUDIO))
    assert marker_sequence(text) == []


# ------------------------------------------------------------------------- adapters
def test_llava_instruct_adapter(tmp_path):
    items = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the bus?"}, {"from": "gpt", "value": "White."},
            {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "On a street."}]},
        {"id": "2", "image": "b.jpg", "conversations": [  # no placeholder: one goes in front
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A cat."}]},
        {"id": "3", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]},
        {"id": "4", "image": "c.jpg", "conversations": [  # two placeholders for one image
            {"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "?"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(items))
    skipped = Skipped()
    records = list(llava_instruct(path, "coco/train2017", skipped))
    assert records[0] == {"id": "000000033471", "type": "sft", "conversations": items[0]["conversations"],
                          "inputs": [{"modality": "image", "path": "coco/train2017/000000033471.jpg"}], "outputs": []}
    assert records[1]["conversations"][0] == {"from": "human", "value": "<image>\nDescribe it."}
    assert records[1]["inputs"] == [{"modality": "image", "path": "coco/train2017/b.jpg"}]
    assert records[2] == {"id": "3", "type": "sft", "conversations": [{"from": "human", "value": "Hi"},
                          {"from": "gpt", "value": "Hello"}], "inputs": [], "outputs": []}
    assert len(records) == 3 and skipped.counts == {"BadItem": 1}
    assert skipped.items[0][0] == f"{path}#3" and "2 <image> placeholder(s) for 1 file(s)" in skipped.items[0][1]


def test_alpaca_adapter_and_cli(tmp_path):
    items = [{"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well..."},
             {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(items, indent=2))
    records = list(alpaca(path))
    assert records == [
        {"id": "alpaca-0", "type": "sft", "conversations": [
            {"from": "human", "value": "Give three tips for staying healthy."},
            {"from": "gpt", "value": "1. Eat well..."}], "inputs": [], "outputs": []},
        {"id": "alpaca-1", "type": "sft", "conversations": [
            {"from": "human", "value": "Translate to French.\n\nGood morning"},
            {"from": "gpt", "value": "Bonjour"}], "inputs": [], "outputs": []},
    ]
    assert adapters_main(["alpaca", "--input", str(path), "--out", str(tmp_path / "a.jsonl")]) == 2
    assert list(read_manifest(tmp_path / "a.jsonl")) == records


def test_sources_readers(tmp_path):
    (tmp_path / "w.csv").write_text("videoid,page_dir,name\n1066,006001_006050,Aerial shot of winter forest\n")
    assert list(webvid_sources(tmp_path / "w.csv")) == [
        {"video": "006001_006050/1066.mp4", "segments": [(0.0, None, "Aerial shot of winter forest")]}]
    (tmp_path / "w.jsonl").write_text(json.dumps({"video": "a/b.mp4", "caption": "x"}) + "\n")
    assert list(webvid_sources(tmp_path / "w.jsonl")) == [{"video": "a/b.mp4", "segments": [(0.0, None, "x")]}]


# --------------------------------------------------------------------------- caches
def _counting(monkeypatch, obj, name):
    calls, real = [], getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def _reference(model, path, modality):
    load = {IMAGE: pre.load_image, VIDEO: pre.load_video, AUDIO: pre.load_audio}[modality]
    key = "audio" if modality == AUDIO else "vision"
    with torch.no_grad():
        out = model.imagebind.encode({key: load(path)[None]}, tokens=model.config.tokens_per_input[modality] > 1,
                                     vision_blocks=modality != AUDIO)
    ref = {"pooled": out.embeds[key][0]}
    if key in out.tokens:
        tokens = out.tokens[key][0]
        ref["tokens"] = tokens.mean(0) if tokens.ndim == 3 else tokens
    if out.vision_blocks is not None:
        blocks = out.vision_blocks[0]
        ref["highway"] = blocks.mean(0) if blocks.ndim == 4 else blocks
    return ref


@pytest.fixture(scope="module")
def cache_inputs(ds):
    media.write_png(ds.root / "img/a.png", np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    # cut inside its header: (ds.corrupt, cut in half, still yields its first frames to load_video)
    (ds.root / "bad").mkdir()
    (ds.root / "bad/cut.mp4").write_bytes((ds.root / "webvid/dog.mp4").read_bytes()[:1000])
    records = [{"id": "i", "modality": "image", "path": "img/a.png", "caption": "noise"},
               {"id": "v", "modality": "video", "path": "webvid/dog.mp4", "caption": "a dog"},
               {"id": "a", "modality": "audio", "path": "webvid/sea.mp4", "caption": "waves"},
               {"id": "b", "modality": "video", "path": "bad/cut.mp4", "caption": "broken"},
               {"id": "v2", "modality": "video", "path": "webvid/dog.mp4", "caption": "the same file again"}]
    return records


def test_feature_cache_matches_imagebind_and_a_second_build_computes_nothing(ds, model, cache_inputs, tmp_path,
                                                                            monkeypatch):
    encodes = _counting(monkeypatch, model.imagebind, "encode")
    report = build_feature_cache(cache_inputs, ds.root, model, tmp_path, shard_size=2, batch_size=2, workers=2)
    assert report.computed == 3 and len(encodes) == 3  # one batch per modality; the repeat is reused
    assert report.skipped.counts == {"CorruptMediaError": 1} and report.skipped.items[0][0] == "bad/cut.mp4"
    cache = FeatureCache(tmp_path)
    assert len(cache) == 3 and len(list(tmp_path.glob("features-*.safetensors"))) == 2
    for record in cache_inputs[:3]:
        got, m = cache.get(record["path"]), record["modality"]
        ref = _reference(model, ds.root / record["path"], m)
        assert set(got) == set(ref) == ({"pooled"} if m == AUDIO else {"pooled", "highway"})
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)
        # what a training step gets from the cache is what the chat gets from the file
        live = model.encode_media(str(ds.root / record["path"]), m)
        torch.testing.assert_close(model.project_media(m, got["pooled"][None])[0], live.embeds, rtol=1e-5, atol=1e-6)
        if m != AUDIO:
            torch.testing.assert_close(prepare_e_vis(got["highway"]), prepare_e_vis(live.highway), rtol=1e-5, atol=1e-6)
    with pytest.raises(NotCachedError, match="skipped as broken"):
        cache.get("bad/cut.mp4")

    encodes.clear()
    loads = _counting(monkeypatch, pre, "load_video")
    again = build_feature_cache(cache_inputs, ds.root, model, tmp_path, shard_size=2)
    assert (again.computed, len(encodes), len(loads)) == (0, 0, 0) and again.reused == 5
    assert again.skipped.counts == {"CorruptMediaError": 1}  # recorded, not retried


def test_feature_cache_keeps_the_token_grid_when_p_in_takes_k_tokens(ds, model, cache_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(model, "config", model.config.replace(tokens_per_input={IMAGE: 4, VIDEO: 4, AUDIO: 1}))
    model.imagebind.train()  # as in a training process: the cache sets eval mode and gives the mode back
    try:
        build_feature_cache(cache_inputs[:3], ds.root, model, tmp_path)
        assert model.imagebind.training  # and the mode is given back
    finally:
        model.imagebind.eval()
    cache = FeatureCache(tmp_path)
    for record in cache_inputs[:3]:
        got, ref = cache.get(record["path"]), _reference(model, ds.root / record["path"], record["modality"])
        assert set(got) == set(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)
        if record["modality"] != AUDIO:
            assert got["tokens"].shape == (257, 32)  # CLS + 16x16 patches (a video's averaged over clips)
    assert "tokens" not in cache.get("webvid/sea.mp4")  # audio keeps k = 1


def test_text_cache_equals_the_decoders_text_encoders(model, tmp_path, monkeypatch):
    captions = {IMAGE: ["a dog", "a cat", "a dog"], VIDEO: ["a dog"], AUDIO: ["rain on a roof", "  "]}
    calls = {m: _counting(monkeypatch, model.decoders[m], "encode_text") for m in captions}
    model.decoders.train()  # as in a training process: CLAP's dropout must not reach the targets
    try:
        report = build_text_cache(captions, model.decoders, tmp_path, shard_size=2, batch_size=2)
        assert all(d.training for d in model.decoders.values())  # the mode is given back
    finally:
        model.decoders.eval()
    assert (report.computed, report.reused, report.skipped.counts) == (4, 1, {"EmptyCaption": 1})
    assert len(list(tmp_path.glob("text-*.safetensors"))) == 2
    cache = TextCache(tmp_path)
    for m, texts in captions.items():
        for caption in texts[:2] if m != AUDIO else texts[:1]:
            with torch.no_grad():
                ref = model.decoders[m].encode_text([caption])[0]
            torch.testing.assert_close(cache.get(m, caption), ref, rtol=1e-5, atol=1e-6)
    assert cache.get(IMAGE, "a dog").shape == (77, 32) and cache.get(AUDIO, "rain on a roof").shape == (1, 32)
    with pytest.raises(NotCachedError):
        cache.get(VIDEO, "a cat")

    for c in calls.values():
        c.clear()
    with (tmp_path / "index.jsonl").open("a") as f:
        f.write('{"shard": "text-000')  # a crash in the middle of an index append
    again = build_text_cache(captions, model.decoders, tmp_path)
    assert again.computed == 0 and not any(calls.values()) and again.reused == 6
    assert len(TextCache(tmp_path)) == 4 and (tmp_path / "index.jsonl").read_text().endswith("\n")


def test_cache_cli_on_a_manifest(ds, model, cache_inputs, tmp_path, monkeypatch):
    from xvila import XVila

    monkeypatch.setattr(XVila, "from_pretrained", lambda *args, **kwargs: model)
    manifest = tmp_path / "pairs.jsonl"
    write_manifest(cache_inputs[:3], manifest)
    report = cache_main(["features", "--manifest", str(manifest), "--root", str(ds.root), "--out",
                         str(tmp_path / "f"), "--workers", "0"])
    assert report.computed == 3 and "webvid/dog.mp4" in FeatureCache(tmp_path / "f")
    report = cache_main(["text", "--manifest", str(manifest), "--out", str(tmp_path / "t")])
    assert report.computed == 3 and (VIDEO, "a dog") in TextCache(tmp_path / "t")


def test_builders_cli(ds, tmp_path):
    report = builders.main(["interleaved", "--sources", str(ds.activitynet), "--video-dir", "anet",
                            "--root", str(ds.root), "--out", str(tmp_path)])
    assert report.counts == {"videos": 1, "chunks": 3}
    assert [r["source"] for r in read_manifest(tmp_path / "interleaved.jsonl")] == ["anet/v_cook.mp4"]
