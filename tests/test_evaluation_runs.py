"""The X²A score and the benchmark runners on tiny-random, with a held-out manifest made by
the project's own builders (`train.builders.build_x2x`) from generated captioned videos."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from train_factory import make_dataset

from train.builders import build_x2x, webvid_sources
from xvila import XVila
from xvila.chat import Chat
from xvila.evaluation import Embedder, EvaluationError, x2a_score
from xvila.evaluation import understand as und
from xvila.evaluation.__main__ import main
from xvila.evaluation.benchmark import X2ASettings, run_x2a
from xvila.evaluation.manifests import ManifestError, read_x2x
from xvila.evaluation.records import ResumeError

PNG = b"\x89PNG\r\n\x1a\n"
REAL_SEND = Chat.send
FAST = ["--steps", "2", "--max-new-tokens", "8", "--no-progress"]


@pytest.fixture(scope="module")
def model():
    return XVila.from_pretrained("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """heldout.jsonl with one conversation of each of the six types, cut from one video."""
    root = tmp_path_factory.mktemp("eval-data")
    ds = make_dataset(root / "src", corrupt=False, activitynet=False)
    build_x2x(webvid_sources(ds.webvid), ds.root, root / "x2x", heldout=(1,) * 6, heldout_rate=1.0, rounds=1,
              max_sources=1)
    return root / "x2x" / "heldout.jsonl"


class CountingSend:
    """Counts `Chat.send` calls (each round of each sample is one); fails on call `fail_at`."""

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at = 0, fail_at
        real = REAL_SEND

        def send(chat, *args, **kwargs):
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise KeyboardInterrupt  # as a kill between two samples' generations
            return real(chat, *args, **kwargs)

        monkeypatch.setattr(Chat, "send", send)


# ------------------------------------------------------------------ the score
def test_x2a_of_a_file_against_itself_is_100_and_lower_against_another(model, heldout):
    convs = {c.type: c for c in read_x2x(heldout)}
    image = convs["VID2IMG"].rounds[0].truth  # a frame
    video = convs["IMG2VID"].rounds[0].truth  # a clip
    audio = convs["VID2AUD"].rounds[0].truth
    other = heldout.parent / "other.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(other)
    for path in (image, video, audio):
        assert x2a_score(path, path, model) == pytest.approx(100.0, abs=1e-3)
    assert x2a_score(other, image, model) < 99.0
    assert x2a_score(convs["VID2VID"].rounds[0].truth, video, model) < 99.9  # the clip's second half


def test_embeddings_are_batched_and_cached_by_content(model, heldout, tmp_path):
    convs = read_x2x(heldout)
    truths = [c.rounds[0].truth for c in convs]
    copy = tmp_path / "same-content.png"
    shutil.copy(next(t for t in truths if t.endswith(".png")), copy)
    emb = Embedder(model, batch_size=2)
    first = emb.embed(truths)
    distinct = len({open(t, "rb").read() for t in truths})
    assert emb.encoded == distinct
    again = emb.embed([*truths, str(copy)])  # a renamed copy is the same content: no new encoding
    assert emb.encoded == distinct
    assert np.allclose(first.numpy(), again[:-1].numpy())
    assert np.allclose(again[-1].norm().item(), 1.0, atol=1e-5)
    with pytest.raises(EvaluationError, match="no such file"):
        emb.embed([str(tmp_path / "missing.png")])
    with pytest.raises(EvaluationError, match="XVila or an ImageBind"):
        x2a_score(copy, copy, object())


# ------------------------------------------------------------------ the X²A runner
def test_x2a_runner_writes_results_tables_and_plot(model, heldout, tmp_path):
    out = tmp_path / "run"
    results = main(["x2a", "--data", str(heldout), "--out", str(out), "--modes", "text,ta,veh", "--limit", "3",
                    "--seed", "5", *FAST], model=model)
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(results))
    assert len(data["samples"]) == 9  # 3 conversations x 3 modes, same seed
    fresh = Embedder(model)
    for s in data["samples"]:
        assert s["seed"] == 5 and s["type"] in ("VID2IMG", "IMG2VID", "VID2VID")
        assert s["alpha"] == (model.config.highway_alpha if s["mode"] == "veh" else None)
        (f,) = s["files"]
        assert (out / f["pred"]).is_file()
        # The recorded score is the ImageBind cosine of the written file and the truth.
        assert f["score"] == pytest.approx(fresh.score(out / f["pred"], f["truth"]), abs=1e-3)
        assert s["score"] == f["score"]
    variants = {(s["mode"], s["type"]): s["variant"] for s in data["samples"]}
    assert variants[("text", "VID2IMG")] == "text-aligned"
    assert variants[("ta", "VID2VID")] == "TA" and variants[("veh", "VID2VID")] == "TA+VEH"
    summary = {(x["type"], x["mode"]): x for x in data["summary"]}
    assert len(summary) == 9 and all(x["n"] == 1 for x in summary.values())
    s = summary[("IMG2VID", "ta")]
    assert s["low"] <= s["mean"] <= s["high"]
    t = data["throughput"]
    assert t["samples"] == 9 and t["samples_per_s"] > 0 and t["device"].startswith("cpu")
    md = (out / "results.md").read_text()
    assert "| decoding | VID2IMG | VID2VID | IMG2VID |" in md
    for label in ("| Text-Aligned |", "| TA |", "| TA+VEH |", "samples/s", "43.95"):
        assert label in md
    row = next(line for line in md.splitlines() if line.startswith("| TA |"))
    assert f"{summary[('VID2IMG', 'ta')]['mean']:.2f} [" in row.split("|")[2]
    assert (out / "modes.png").read_bytes()[:8] == PNG


def test_alpha_sweep_runs_veh_on_visual_samples_and_plots(model, heldout, tmp_path):
    out = tmp_path / "sweep"
    data = main(["x2a", "--data", str(heldout), "--out", str(out), "--alpha-sweep", "0,1", *FAST], model=model)
    visual = [c.id for c in read_x2x(heldout) if c.visual_to_visual]
    assert len(visual) == 4  # VID2IMG, IMG2VID, VID2VID, IMG+AUD2VID: not AUD2VID, VID2AUD
    assert sorted((s["id"], s["alpha"]) for s in data["samples"]) == sorted((i, a) for i in visual for a in (0.0, 1.0))
    assert {s["variant"] for s in data["samples"] if s["alpha"] == 0.0} == {"TA"}  # α = 0: highway off
    assert {s["variant"] for s in data["samples"] if s["alpha"] == 1.0} == {"TA+VEH"}
    md = (out / "results.md").read_text()
    assert "| α | VID2IMG | VID2VID | IMG2VID | IMG+AUD2VID |" in md and "| 0 |" in md and "| 1 |" in md
    assert (out / "alpha_sweep.png").read_bytes()[:8] == PNG


def test_a_killed_run_resumes_without_redoing_finished_samples(model, heldout, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    s = X2ASettings(modes=("ta", "veh"), steps=2, max_new_tokens=8)
    killed = CountingSend(monkeypatch, fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_x2a(model, str(heldout), str(out), s, progress=False)
    finished = (out / "samples.jsonl").read_text().splitlines()
    assert len(finished) == 4 and killed.calls == 5
    with (out / "samples.jsonl").open("a") as f:
        f.write('{"key": "torn li')  # a line cut short by the kill
    resumed = CountingSend(monkeypatch)
    data = run_x2a(model, str(heldout), str(out), s, progress=False)
    assert resumed.calls == 12 - 4  # 6 conversations x 2 modes, one round each; 4 were done
    keys = [json.loads(line)["key"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 12
    assert data["throughput"]["samples"] == 8
    again = CountingSend(monkeypatch)
    run_x2a(model, str(heldout), str(out), s, progress=False)
    assert again.calls == 0
    with pytest.raises(ResumeError, match="steps"):
        run_x2a(model, str(heldout), str(out), X2ASettings(modes=("ta",), steps=3), progress=False)


def test_bad_manifests_and_options(heldout, tmp_path):
    bad = tmp_path / "bad.jsonl"
    record = json.loads(heldout.read_text().splitlines()[0])
    record["outputs"][0]["path"] = "../../etc/passwd.png"
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(ManifestError, match="without '..'"):
        read_x2x(bad)
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(ManifestError, match="bad.jsonl:1"):
        read_x2x(bad)
    with pytest.raises(SystemExit):
        main(["x2a", "--data", str(heldout), "--out", str(tmp_path), "--modes", "fast"], model=object())
    with pytest.raises(SystemExit):
        main(["x2a", "--data", str(heldout), "--out", str(tmp_path), "--alpha-sweep", "0,2"], model=object())


# ------------------------------------------------------------------ understanding
def _image(path, colour):
    Image.new("RGB", (32, 32), colour).save(path)
    return path.name


def test_understand_vqa_and_mmmu_score_the_replies(model, tmp_path, monkeypatch):
    a, b = _image(tmp_path / "a.png", (255, 0, 0)), _image(tmp_path / "b.png", (0, 0, 255))
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text("\n".join(json.dumps(r) for r in [
        {"id": "q1", "image": a, "question": "How many dogs?", "answers": ["2"] * 10},
        {"id": "q2", "image": b, "question": "What colour?", "answers": ["blue"] * 3 + ["navy"] * 7},
    ]) + "\n")
    (tmp_path / "gone.jsonl").write_text(json.dumps({"id": "q3", "image": "missing.png", "question": "?",
                                                     "answers": ["2"]}) + "\n")
    vqa.write_text(vqa.read_text() + (tmp_path / "gone.jsonl").read_text())
    replies = {"q1": "Two.", "q2": "blue"}
    real_reply = und.reply

    def fake_reply(model, item, n):
        return real_reply(model, item, n) if item.id == "q3" else replies[item.id]  # q3: a missing file

    monkeypatch.setattr(und, "reply", fake_reply)
    data = main(["understand", "--task", "vqav2", "--data", str(vqa), "--out", str(tmp_path / "vqa"), *FAST[2:]],
                model=model)
    assert [s["score"] for s in data["samples"][:2]] == pytest.approx([100.0, 90.0])  # hand-worked: 1 and 0.9
    assert data["failed"] == 1 and "missing.png" in data["samples"][2]["error"]
    assert data["metrics"]["VQA accuracy"]["mean"] == pytest.approx(95.0)
    assert "| VQA accuracy | 95.00 [" in (tmp_path / "vqa" / "results.md").read_text()
    mmmu = tmp_path / "mmmu.jsonl"
    mmmu.write_text(json.dumps({"id": "m1", "image": a, "question": "<image 1> Which colour?",
                                "options": ["red", "blue"], "answer": "A"}) + "\n")
    monkeypatch.setattr(und, "reply", lambda model, item, n: "The answer is (A)")
    data = main(["understand", "--task", "mmmu", "--data", str(mmmu), "--out", str(tmp_path / "mmmu")], model=model)
    assert data["metrics"]["accuracy"]["mean"] == 100.0
    mmmu.write_text(json.dumps({"id": "m1", "question": "?", "options": ["red", "blue"], "answer": "C"}) + "\n")
    with pytest.raises(ManifestError, match="mmmu.jsonl:1: 'answer' 'C'"):
        und.read_items("mmmu", str(mmmu))


def test_understand_runs_the_model_and_scores_captions(model, tmp_path):
    a, b = _image(tmp_path / "a.png", (255, 0, 0)), _image(tmp_path / "b.png", (0, 255, 0))
    data_file = tmp_path / "caps.jsonl"
    data_file.write_text("\n".join(json.dumps({"id": i, "path": p, "captions": [c, c + " again"]})
                                   for i, p, c in [("c1", a, "a red square"), ("c2", b, "a green square")]) + "\n")
    out = tmp_path / "caps"
    data = main(["understand", "--task", "caption", "--data", str(data_file), "--out", str(out), "--max-new-tokens",
                 "6", "--no-progress"], model=model)
    assert [s["id"] for s in data["samples"]] == ["c1", "c2"]
    assert all(isinstance(s["reply"], str) for s in data["samples"])  # tiny-random's words
    for name in ("CIDEr", "BLEU-4"):
        m = data["metrics"][name]
        assert m["n"] == 2 and m["low"] <= m["mean"] <= m["high"]
    assert data["throughput"]["samples"] == 2
    md = (out / "results.md").read_text()
    assert "| CIDEr |" in md and "| BLEU-4 |" in md


def test_a_broken_input_fails_its_sample_and_the_run_goes_on(model, heldout, tmp_path):
    records = [json.loads(line) for line in heldout.read_text().splitlines()[:2]]
    broken = heldout.parent / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    assert records[0]["inputs"][0]["modality"] == "video"
    records[0]["inputs"][0]["path"] = broken.name
    manifest = heldout.parent / "with-broken.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "broken"
    data = main(["x2a", "--data", str(manifest), "--out", str(out), "--modes", "ta", *FAST], model=model)
    bad, good = data["samples"]
    assert bad["score"] is None and "broken.mp4" in bad["error"]
    assert good["score"] is not None and "error" not in good
    assert sum(x["failed"] for x in data["summary"]) == 1
    assert "1 samples failed" in (out / "results.md").read_text()


def test_cli_reports_a_bad_manifest_before_loading_any_model(tmp_path):
    # "no/such-model" would fail to load: the manifest error must come first.
    run = subprocess.run([sys.executable, "-m", "xvila.evaluation", "x2a", "--checkpoint", "no/such-model",
                          "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "missing.jsonl: manifest not found" in run.stderr and "Traceback" not in run.stderr
