"""The training phases end to end on CPU: tiny-random model, tiny generated media, a few steps.

What each test pins down, derived independently of the code under test:
- the parameters that change in a phase are exactly those its recipe trains (name patterns
  written out here, compared over every parameter of the whole model before and after);
- the loss falls when a phase overfits one fixed batch;
- a run killed with SIGTERM mid-phase and resumed ends with bit-identical weights and
  optimiser state to a run never stopped;
- a NaN loss stops the run naming the step and the samples, and the last good checkpoint
  stays intact; broken samples are skipped and counted;
- the final folder loads with `XVila.from_pretrained`, chats, and carries a model card;
- the shipped configs hold the paper's settings, the accelerate configs parse.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from media_factory import COLOURS, tone
from train_factory import write_captioned_video

from train import batches, export
from train.cache import FeatureCache, TextCache, build_feature_cache, build_text_cache
from train.data import write_manifest
from train.loop import NonFiniteLossError, ResumeError, accumulation, load_config
from xvila import XVila, media
from xvila.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "configs"

# What each phase trains, by parameter name (paper A.1-A.3, DESIGN.md's table).
PROJECTIONS = ("p_in.", "p_out.")
TRAINS = {
    "1": lambda n: n.startswith(PROJECTIONS) or "trainable_tokens_delta" in n,
    "2": lambda n: n.startswith(PROJECTIONS) or "trainable_tokens_delta" in n or "lora_" in n,
    "3a": lambda n: n.startswith(PROJECTIONS) or "trainable_tokens_delta" in n or "lora_" in n,
    "3b": lambda n: n.startswith(tuple(f"decoders.{m}.{part}." for m in ("image", "video")
                                       for part in ("unet", "controller"))),
}
CAPTIONS = {"red": "a red car on the street", "blue": "a blue bird in the sky", "green": "a green car in the park",
            "dog": "a dog barking", "piano": "music playing on the piano", "cat": "a cat running"}


# ------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("data"))


def make_world(root: Path) -> Path:
    """Media (2 images, 2 videos with sound, 2 sounds), the three kinds of manifests and
    feature / text caches built with the tiny-random model, in `root`."""
    for name, colour in (("red", 0), ("blue", 2)):
        img = np.broadcast_to(COLOURS[colour], (40, 48, 3)).astype(np.uint8).copy()
        img[:20] = COLOURS[colour + 1]
        media.write_png(root / f"img/{name}.png", img)
    write_captioned_video(root / "vid/green.mp4", 2.0, tone_hz=330.0)
    write_captioned_video(root / "vid/cat.mp4", 2.0, tone_hz=550.0)
    media.write_wav(root / "aud/dog.wav", tone((440.0,), 1.0, 16000)[0], 16000)
    media.write_wav(root / "aud/piano.wav", tone((880.0,), 1.0, 16000)[0], 16000)
    files = {"red": ("image", "img/red.png"), "blue": ("image", "img/blue.png"), "green": ("video", "vid/green.mp4"),
             "cat": ("video", "vid/cat.mp4"), "dog": ("audio", "aud/dog.wav"), "piano": ("audio", "aud/piano.wav")}

    pairs = [{"id": f"pair-{k}", "modality": m, "path": p, "caption": CAPTIONS[k]} for k, (m, p) in files.items()]
    interleaved = [{"id": f"il-{v}", "source": f"vid/{v}.mp4", "chunks": [
        {"image": files[i][1], "audio": files[a][1], "video": files[v][1], "caption": CAPTIONS[c], "start": s, "end": s + 1}
        for s, (i, a, c) in enumerate([(i1, "dog", i1), ("blue", "piano", v), (i1, a1, a1)])]}
        for v, i1, a1 in (("green", "red", "dog"), ("cat", "blue", "piano"))]

    def convo(cid, kind, ins, outs, ask, extra=()):
        placeholders = "".join(f"<{m}>" for m, _ in ins)
        turns = [{"from": "human", "value": f"{placeholders}\n{ask}"},
                 {"from": "gpt", "value": "Sure. " + "".join(f"<gen:{files[k][0]}>" for k in outs)}, *extra]
        return {"id": cid, "type": kind, "conversations": turns,
                "inputs": [{"modality": m, "path": p} for m, p in ins],
                "outputs": [{"modality": files[k][0], "path": files[k][1], "caption": CAPTIONS[k]} for k in outs]}

    x2x = [
        convo("c-vid2img", "VID2IMG", [files["green"]], ["red"], "Make an image like this video."),
        convo("c-img2vid", "IMG2VID", [files["blue"]], ["cat"], "Make a video of this photo."),
        convo("c-vid2vid", "VID2VID", [files["cat"]], ["green"], "Make a similar video."),
        convo("c-aud2vid", "AUD2VID", [files["dog"]], ["green"], "Make a video with this sound."),
        convo("c-vid2aud", "VID2AUD", [files["cat"]], ["piano"], "Make the sound of this video."),
        convo("c-imgaud2vid", "IMG+AUD2VID", [files["red"], files["piano"]], ["cat"], "Make a video of these."),
    ]
    sft = [{"id": "sft-1", "type": "sft", "inputs": [{"modality": "image", "path": "img/red.png"}],
            "outputs": [], "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                            {"from": "gpt", "value": "A red car on the street."}]},
           {"id": "sft-2", "type": "sft", "inputs": [], "outputs": [],
            "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}]}]
    manifests = {"pairs": pairs, "interleaved": interleaved, "x2x": x2x, "sft": sft}
    for name, records in manifests.items():
        write_manifest(records, root / f"{name}.jsonl")

    model = XVila.from_pretrained("tiny-random")
    build_feature_cache([(p, m) for m, p in files.values()], root, model, root / "cache/features")
    captions = [(m, CAPTIONS[k]) for k, (m, _) in files.items()]
    captions += [(m2, CAPTIONS[k]) for k in CAPTIONS for m2 in ("image", "video", "audio")]
    build_text_cache(captions, model.decoders, root / "cache/text")
    return root


def config(world: Path, tmp: Path, phase: str, manifests, **overrides) -> dict:
    """A tiny config (written YAML-ready) for `phase`, over the world's manifests."""
    cfg = dict(phase=phase, init="tiny-random", out_dir=str(tmp / f"phase{phase}"),
               manifests=[{"path": str(world / f"{m}.jsonl"), "root": str(world), "weight": w} for m, w in manifests],
               data_root=str(world), feature_cache=str(world / "cache/features"), text_cache=str(world / "cache/text"),
               num_workers=0, steps=3, global_batch=4, micro_batch=2, lr=1e-2, warmup_steps=1, min_lr_ratio=1.0,
               mixed_precision="no", save_every=100, keep_last=2, log_every=1, log_with=None, seed=0)
    cfg.update(overrides)
    return cfg


def run_phase(cfg: dict, resume: bool = False) -> dict:
    """What `python -m train phaseN` runs, in this process."""
    from train.loop import TrainConfig, train

    return train(TrainConfig(**cfg), resume=resume)


def parameters(folder_or_preset) -> dict[str, torch.Tensor]:
    model = XVila.from_pretrained(str(folder_or_preset))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


MANIFESTS = {"1": [("pairs", 1.0)], "2": [("interleaved", 1.0)], "3a": [("x2x", 2.0), ("sft", 1.0)],
             "3b": [("x2x", 1.0)]}


@pytest.fixture(scope="module")
def chain(world, tmp_path_factory):
    """Phases 1 -> 2 -> 3a -> 3b, each from the previous one's final folder; for each, the
    whole model's parameters before and after, and what the run returned."""
    tmp = tmp_path_factory.mktemp("runs")
    out, init = {}, "tiny-random"
    before = parameters(init)
    for phase in ("1", "2", "3a", "3b"):
        extra = {"lr": 1e-3} if phase == "3b" else {}
        result = run_phase(config(world, tmp, phase, MANIFESTS[phase], init=init, **extra))
        after = parameters(result["final"])
        out[phase] = {"before": before, "after": after, "result": result}
        init, before = str(result["final"]), after
    return out


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("phase", ["1", "2", "3a", "3b"])
def test_each_phase_changes_exactly_the_parameters_it_trains(chain, phase):
    before, after = chain[phase]["before"], chain[phase]["after"]
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {n for n in before if TRAINS[phase](n)}
    assert expected, "the pattern matches no parameter"
    assert changed == expected, (f"changed but not trained: {sorted(changed - expected)[:5]}; "
                                 f"trained but unchanged: {sorted(expected - changed)[:5]}")
    result = chain[phase]["result"]
    assert result["step"] == 3 and not result["stopped"]
    assert all(np.isfinite(h["loss"]) for h in result["losses"])


def test_phases_chain_and_the_final_folder_loads_chats_and_has_a_model_card(chain, tmp_path):
    final = Path(chain["3b"]["result"]["final"])
    history = json.loads((final / "training.json").read_text())
    assert [h["phase"] for h in history] == ["1", "2", "3a", "3b"]
    assert [h["init"] for h in history][1:] == [str(chain[p]["result"]["final"]) for p in ("1", "2", "3a")]
    assert history[0]["hyperparameters"]["lr"] == 1e-2 and history[3]["hyperparameters"]["lr"] == 1e-3
    card = (final / "README.md").read_text()
    for needle in ("CC-BY-NC-SA 4.0", "Llama 2", "CreativeML OpenRAIL-M", "VideoCrafter2", "interleaved pre-training",
                   "pairs.jsonl", "x2x.jsonl", "sft.jsonl", "| 3b |", "from_pretrained"):
        assert needle in card, needle
    model = XVila.from_pretrained(str(final))
    probe = media.write_png(tmp_path / "probe.png", np.full((32, 32, 3), 200, np.uint8))
    events = list(model.new_chat(outputs_dir=tmp_path).send("Make an image like this.", media=[str(probe)],
                                                            output="image", decode=_fast_decode()))
    kinds = {e.kind for e in events}
    assert "media" in kinds
    image = [e for e in events if e.kind == "media"][0]
    assert Path(image.path).is_file() and image.modality == "image"
    # the U-Nets phase 3b trained are the ones in the folder, not fresh random ones
    trained = load_file(Path(chain["3b"]["result"]["checkpoint"]) / "trainable.safetensors")
    unet = dict(model.decoders["image"].unet.named_parameters())
    name = next(n for n in trained if n.startswith("decoders.image.unet."))
    assert torch.equal(unet[name.removeprefix("decoders.image.unet.")], trained[name])


def _fast_decode():
    from xvila.decoders.base import DecodeSettings

    return DecodeSettings(steps=2, guidance=1.0)


def test_export_cli_copies_the_history_and_push_without_network_is_a_clear_typed_error(chain, tmp_path, capsys):
    from train.__main__ import main

    final = chain["1"]["result"]["final"]
    assert main(["export", "--from", str(final), "--to", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out/training.json").read_text()) == json.loads((final / "training.json").read_text())
    assert "encoder-LLM-decoder alignment" in (tmp_path / "out/README.md").read_text()
    with pytest.raises(export.PushToHubError, match="HF_HUB_OFFLINE"):
        export.push_to_hub(final, "someone/xvila-test")
    assert main(["export", "--from", str(final), "--push-to-hub", "someone/xvila-test"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_export_writes_the_unets_phase_3b_trained_instead_of_referencing_their_base(tmp_path):
    from xvila.checkpoint import build_xvila
    from xvila.config import XVilaConfig
    from xvila.decoders.image import ImageDecoder

    base = ImageDecoder.tiny_random(cond_dim=32).save_pretrained(tmp_path / "base-image")  # stands in for SD1.5
    preset = XVilaConfig.from_name("tiny-random")
    model = build_xvila(preset.replace(decoders={**preset.decoders, "image": str(base)}))
    before = export.write_folder(model, tmp_path / "before", history=[{"phase": "3a"}])
    assert json.loads((before / "config.json").read_text())["decoders"]["image"] == str(base)
    with torch.no_grad():
        next(model.decoders["image"].unet.parameters()).add_(1.0)  # "trained"
    after = export.write_folder(model, tmp_path / "after", history=[{"phase": "3b"}])
    assert json.loads((after / "config.json").read_text())["decoders"]["image"] == "decoders/image"
    reloaded = XVila.from_pretrained(str(after))
    name, p = next(iter(model.decoders["image"].unet.named_parameters()))
    assert torch.equal(dict(reloaded.decoders["image"].unet.named_parameters())[name], p)


@pytest.mark.parametrize("phase, lr, factor", [("1", 3e-2, 0.8), ("3a", 1e-2, 0.5)])
def test_loss_falls_when_overfitting_one_fixed_batch(world, tmp_path, phase, lr, factor):
    # two records, global batch 2: every step sees the same two samples
    one = {"1": "pairs", "3a": "x2x"}[phase]
    records = [json.loads(line) for line in (world / f"{one}.jsonl").read_text().splitlines()][:2]
    write_manifest(records, tmp_path / "fixed.jsonl")
    cfg = config(world, tmp_path, phase, [], steps=30, global_batch=2, micro_batch=2, lr=lr, log_every=10)
    cfg["manifests"] = [{"path": str(tmp_path / "fixed.jsonl"), "root": str(world)}]
    history = run_phase(cfg)["losses"]
    assert len(history) == 30

    def mean(key, part):
        return np.mean([h[key] for h in part])

    first, last = history[:5], history[-5:]
    # phase 1 trains no LLM weight, only the projections and the new tokens: its
    # next-token loss on the captions falls slowly, the alignment losses fast
    assert mean("loss", last) < factor * mean("loss", first), [h["loss"] for h in history]
    for key in set(first[0]) - {"step", "loss"}:
        assert mean(key, last) < mean(key, first), key


@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(world, tmp_path, processes):
    """Phase 3b (its loss draws noise and timesteps from the RNG, so the RNG state matters
    too) as `python -m train` processes, side by side: one never stopped, one sent SIGTERM
    mid-phase then resumed. With 2 processes: torchrun, DDP over gloo, the signal sent to
    torchrun (which forwards it to both ranks), each rank its own data and RNG."""
    steps = 6
    base = config(world, tmp_path, "3b", MANIFESTS["3b"], steps=steps, lr=1e-3, save_every=4, keep_last=2,
                  video_frames=2, global_batch=4, micro_batch=4 // processes)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]

    def command(name):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**base, "out_dir": str(tmp_path / name)}))
        return launcher + ["-m", "train", "phase3b", "--config", str(tmp_path / f"{name}.yaml")]

    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("whole", "killed")}
    whole = subprocess.Popen(command("whole"), cwd=REPO, env=env, stdout=logs["whole"], stderr=subprocess.STDOUT)
    cmd = command("killed")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=logs["killed"], text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)  # a real signal, mid-phase
            break
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert whole.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()
    for f in logs.values():
        f.close()
    if processes == 1:  # (torchrun itself reports the signal it got as a failure)
        assert proc.returncode == 0, out + (tmp_path / "killed.log").read_text()
    assert "stopped by a signal" in out, out + (tmp_path / "killed.log").read_text()
    state = json.loads(sorted((tmp_path / "killed/checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert 3 <= state["step"] < steps, "the signal came too late to interrupt the run"
    assert len(state["positions"]) == processes
    assert not (tmp_path / "killed/final").exists()

    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    a = tmp_path / f"whole/checkpoints/step-{steps:06d}"
    b = tmp_path / f"killed/checkpoints/step-{steps:06d}"
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        different = [k for k in x if not torch.equal(x[k], y[k])]
        assert not different, f"{name}: {different[:5]}"
    # keep_last=2: only the two latest complete checkpoints remain
    assert sorted(p.name for p in (tmp_path / "killed/checkpoints").iterdir()) == \
        sorted(p.name for p in (tmp_path / "whole/checkpoints").iterdir())
    assert len(list((tmp_path / "whole/checkpoints").iterdir())) == 2


def test_a_nan_loss_stops_naming_step_and_samples_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    calls = []
    real = batches.lm_and_align_loss

    def poisoned(model, batch):
        calls.append(batch["ids"])
        losses = real(model, batch)
        if len(calls) == 5:  # step 3's first micro-batch (2 per step)
            losses["align/image"] = torch.tensor(float("nan"))
            losses["loss"] = losses["loss"] + losses["align/image"]
        return losses

    monkeypatch.setattr(batches, "lm_and_align_loss", poisoned)
    cfg = config(world, tmp_path, "1", MANIFESTS["1"], steps=6, save_every=2)
    with pytest.raises(NonFiniteLossError) as info:
        run_phase(cfg)
    message = str(info.value)
    good = tmp_path / "phase1/checkpoints/step-000002"
    assert "step 3" in message and "align/image = nan" in message
    assert all(i in message for i in calls[4]), (message, calls[4])
    assert str(good) in message
    assert sorted(p.name for p in good.parent.iterdir()) == ["step-000002"]
    assert json.loads((good / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "phase1/final").exists()
    # the checkpoint is whole: the run resumes from it (and now finishes)
    monkeypatch.setattr(batches, "lm_and_align_loss", real)
    assert run_phase(cfg, resume=True)["step"] == 6


def test_broken_samples_are_skipped_and_counted_without_caches(world, tmp_path):
    import shutil

    root = tmp_path / "data"
    for folder in ("img", "aud"):  # no videos: ImageBind's video preprocessing is slow on a CPU
        shutil.copytree(world / folder, root / folder)
    (root / "broken.mp4").write_bytes(b"\x00\x01junk" * 500)  # not a video at all
    records = [json.loads(line) for line in (world / "pairs.jsonl").read_text().splitlines()]
    records = [r for r in records if r["modality"] != "video"]
    records += [{"id": "bad-video", "modality": "video", "path": "broken.mp4", "caption": "broken"},
                {"id": "gone", "modality": "image", "path": "img/missing.png", "caption": "missing"}]
    write_manifest(records, tmp_path / "pairs.jsonl")
    # no caches: features from the model's ImageBind, targets from the decoders' text encoders
    cfg = config(world, tmp_path, "1", [], steps=3, global_batch=6, micro_batch=3, feature_cache=None,
                 text_cache=None, data_root=str(root))
    cfg["manifests"] = [{"path": str(tmp_path / "pairs.jsonl"), "root": str(root)}]
    result = run_phase(cfg)
    assert result["step"] == 3
    # 18 records drawn from 6 (3 epochs): the corrupt video and the missing image 3 times each
    assert result["skipped"] == {"CorruptMediaError": 3, "MediaNotFoundError": 3}
    state = json.loads((Path(result["checkpoint"]) / "state.json").read_text())
    assert state["skipped"] == result["skipped"]


def test_an_existing_run_needs_resume_and_resume_needs_a_checkpoint_and_logs_go_to_tensorboard(world, tmp_path):
    cfg = config(world, tmp_path, "1", MANIFESTS["1"], steps=1, log_with="tensorboard")
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        run_phase(cfg, resume=True)
    run_phase(cfg)
    with pytest.raises(ResumeError, match="--resume"):
        run_phase(cfg)
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: no TensorBoard logs to check")
    events = list((tmp_path / "phase1").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"loss/loss", "loss/lm", "lr", "samples_per_s"} <= set(acc.Tags()["scalars"])


def test_phase3b_conditioned_on_captions_uses_their_cached_text_embeddings(world, tmp_path, monkeypatch):
    import train.phase3b

    seen = []
    real = train.phase3b.denoising_loss

    def spy(decoder, x0, e_text, e_vis=None, generator=None):
        seen.append((decoder.modality, e_text.detach().clone(), x0.shape, e_vis.shape))
        return real(decoder, x0, e_text, e_vis, generator)

    monkeypatch.setattr(train.phase3b, "denoising_loss", spy)
    records = {r["id"]: r for r in map(json.loads, (world / "x2x.jsonl").read_text().splitlines())}
    write_manifest([records["c-vid2img"]], tmp_path / "one.jsonl")
    cfg = config(world, tmp_path, "3b", [], steps=1, global_batch=1, micro_batch=1, condition="caption",
                 video_frames=2)
    cfg["manifests"] = [{"path": str(tmp_path / "one.jsonl"), "root": str(world)}]
    run_phase(cfg)
    ((modality, e_text, x0_shape, e_vis_shape),) = seen
    expected = TextCache(world / "cache/text").get("image", CAPTIONS["red"])
    assert modality == "image" and torch.equal(e_text[0], expected)
    assert x0_shape == (1, 4, 4, 4)  # the tiny SD's latents of the 32x32 target
    highway = FeatureCache(world / "cache/features").get("vid/green.mp4")["highway"]
    assert e_vis_shape == (1, *highway.shape[-3:])


# ------------------------------------------------------------------------ batches
def test_micro_batches_are_a_pure_function_of_seed_index_and_rank(world):
    model = XVila.from_pretrained("tiny-random")
    manifests = [{"path": str(world / "x2x.jsonl"), "root": str(world), "weight": 3.0},
                 {"path": str(world / "sft.jsonl"), "root": str(world), "weight": 1.0}]
    kw = dict(micro_batch=2, seed=0, data_root=str(world), feature_cache=str(world / "cache/features"),
              text_cache=str(world / "cache/text"))
    ranks = [batches.Batches(manifests, batches.conversation_samples, model, rank=r, world=2, **kw) for r in (0, 1)]
    ids = [[ranks[r][k]["ids"] for k in range(12)] for r in (0, 1)]
    again = batches.Batches(manifests, batches.conversation_samples, model, rank=1, world=2, **kw)
    assert [again[k]["ids"] for k in (7, 3, 11)] == [ids[1][7], ids[1][3], ids[1][11]]  # any order, same batch
    # the DataLoader's workers build the same batches, in order, from any start
    loader = batches.loader(ranks[1], start=5, num_workers=2, prefetch_factor=2, seed=0)
    assert [next(loader)["ids"] for _ in range(4)] == ids[1][5:9]
    drawn = [i for r in (0, 1) for b in ids[r] for i in b]
    assert len(drawn) == 48
    sft = sum(i.startswith("sft") for i in drawn)
    assert 4 <= sft <= 20  # weight 1 of 4: about 12 of 48
    b = ranks[0][0]
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()


def test_conversation_rendering_puts_generation_tokens_where_the_markers_were(world):
    model = XVila.from_pretrained("tiny-random")
    record = json.loads((world / "x2x.jsonl").read_text().splitlines()[0])
    (sample,) = batches.conversation_samples(record, None, model.config)
    assert sample.turns[0].media == ["video"]
    assert sample.turns[0].assistant == "Sure. " + "".join(f"[IMG{i}]" for i in range(4))
    assert sample.outputs == [("image", CAPTIONS["red"], "img/red.png")]
    assert sample.highway_source == [0]
    pair = {"id": "p", "modality": "audio", "path": "a.wav", "caption": "a dog barking"}
    caption, generate = batches.pair_samples(pair, __import__("random").Random(0), model.config)
    assert caption.inputs == [("audio", "a.wav")] and caption.turns[0].assistant == "a dog barking"
    assert generate.inputs == [] and generate.turns[0].assistant == "".join(f"[AUD{i}]" for i in range(8))
    assert "a dog barking" in generate.turns[0].user


def test_order_blends_by_weight_and_covers_each_source_once_per_epoch():
    order = batches.Order([5, 3], [1.0, 1.0], seed=1)
    draws = [order[j] for j in range(4000)]
    first = [i for s, i in draws if s == 0][:10]
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert 0.45 < sum(s == 0 for s, _ in draws) / 4000 < 0.55
    assert batches.Order([5, 3], [1.0, 1.0], seed=1)[3999] == draws[3999]


def test_encode_latents_gives_phase_3b_its_x0_from_a_file_or_an_array(world):
    from xvila.decoders.base import DecodeSettings
    from xvila.decoders.image import ImageDecoder
    from xvila.decoders.video import VideoDecoder

    image = ImageDecoder.tiny_random()
    z = image.encode_latents(world / "img/red.png")  # 48x40 -> centre crop at 32x32
    assert z.shape == image.latent_shape(DecodeSettings())
    assert torch.equal(z, image.encode_latents(np.array(media.read_image(world / "img/red.png"))))
    video = VideoDecoder.tiny_random()
    z = video.encode_latents(world / "vid/green.mp4", frames=3)
    assert z.shape == video.latent_shape(DecodeSettings(frames=3))
    frames = media.read_video(world / "vid/green.mp4", with_audio=False).frames
    assert torch.equal(z, video.encode_latents(frames[np.linspace(0, len(frames) - 1, 3).round().astype(int)]))
    # a flat colour stays flat whatever the resize: x0 = the VAE posterior's mean of the
    # pixels scaled to [-1, 1], times the VAE's scaling factor
    for decoder, flat, size in ((image, np.full((30, 50, 3), 77, np.uint8), (32, 32)),
                                (video, np.full((2, 30, 50, 3), 77, np.uint8), video.size)):
        x = torch.full((1, 3, *size), 77 / 127.5 - 1)
        expected = decoder.vae.encode(x).latent_dist.mean[0] * decoder.vae.config.scaling_factor
        got = decoder.encode_latents(flat)
        got = got[:, 0] if got.dim() == 4 else got
        assert torch.allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------------ configs
def test_shipped_phase_configs_hold_the_papers_settings():
    paper = {"1": (20000, 200, 4e-4), "2": (10000, 192, 1e-4), "3a": (30000, 192, 1e-4), "3b": (20000, 64, 1e-6)}
    inits = {"1": "xvila-7b", "2": "runs/phase1/final", "3a": "runs/phase2/final", "3b": "runs/phase3a/final"}
    for phase, (steps, batch, lr) in paper.items():
        cfg = load_config([CONFIGS / f"phase{phase}.yaml"], phase=phase)
        assert (cfg.steps, cfg.global_batch, cfg.lr) == (steps, batch, lr)
        assert cfg.init == inits[phase] and cfg.mixed_precision == "bf16" and cfg.warmup_steps > 0
        assert cfg.weight_decay == 0.0  # Adam
        accumulation(cfg.global_batch, cfg.micro_batch, 1)  # divides on one GPU
        small = load_config([CONFIGS / f"phase{phase}.yaml", CONFIGS / "24gb.yaml"], phase=phase)
        assert small.load_in_4bit and small.gradient_checkpointing and small.global_batch == batch
        assert accumulation(small.global_batch, small.micro_batch, 1) * small.micro_batch == batch
    three_a = load_config([CONFIGS / "phase3a.yaml"], phase="3a")
    assert len(three_a.manifests) > 1 and all(m["weight"] > 0 for m in three_a.manifests)
    # 192 and 64 split over 4 x 8 GPUs; 200 does not, and the error says what would
    assert accumulation(192, 6, 32) == 1 and accumulation(64, 2, 32) == 1
    with pytest.raises(ConfigError, match="192"):
        accumulation(200, 6, 32)


def test_overrides_and_phase_mismatch():
    cfg = load_config([CONFIGS / "phase2.yaml"], ["steps=5", "lr=0.5", "out_dir=/tmp/x"], phase="2")
    assert (cfg.steps, cfg.lr, cfg.out_dir, cfg.global_batch) == (5, 0.5, "/tmp/x", 192)
    with pytest.raises(ConfigError, match="phase 2"):
        load_config([CONFIGS / "phase2.yaml"], phase="3b")
    with pytest.raises(ConfigError, match="unknown config keys"):
        load_config([CONFIGS / "phase2.yaml"], ["stepz=5"], phase="2")


def test_accelerate_launch_configs_parse_with_accelerates_schema():
    from accelerate.commands.config.config_args import load_config_from_file

    big = load_config_from_file(str(CONFIGS / "accelerate/4x8-a100-zero2.yaml"))
    assert (big.distributed_type.value, big.num_machines, big.num_processes, big.mixed_precision) == \
        ("DEEPSPEED", 4, 32, "bf16")
    assert big.deepspeed_config["zero_stage"] == 2
    assert "gradient_accumulation_steps" not in big.deepspeed_config  # the loop sets it
    small = load_config_from_file(str(CONFIGS / "accelerate/1x24gb.yaml"))
    assert (small.distributed_type.value, small.num_processes, small.mixed_precision) == ("NO", 1, "bf16")


def test_one_table_of_phases_drives_the_cli_and_the_trainable_groups():
    from train.__main__ import parse
    from train.phases import COMMANDS, PHASES
    from xvila.model import PHASES as TRAINS

    assert list(PHASES) == ["1", "2", "3a", "3b"] and set(PHASES) == set(TRAINS)
    assert list(COMMANDS) == ["phase1", "phase2", "phase3a", "phase3b"]
    assert PHASES["3b"].trains == ("controllers", "visual_unets") and "lora" not in PHASES["1"].trains
    assert parse(["phase3a", "--config", "c.yaml", "steps=5"]).overrides == ["steps=5"]
    with pytest.raises(SystemExit):
        parse(["phase4", "--config", "c.yaml"])


# ------------------------------------------------------------------------------ damaged checkpoints
@pytest.fixture(scope="module")
def checkpointed(world, tmp_path_factory):
    """Phase 1 run to step 4 with checkpoints at steps 2 and 4: (its config, its folder)."""
    tmp = tmp_path_factory.mktemp("checkpointed")
    cfg = config(world, tmp, "1", MANIFESTS["1"], steps=4, save_every=2, keep_last=3)
    run_phase(cfg)
    return cfg, Path(cfg["out_dir"])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit_in_the_last_tensor(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the tensor data, past the header: the file still parses
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated trainable": ("trainable.safetensors", _truncate),
    "truncated optimizer": ("optimizer.safetensors", _truncate),
    "truncated rng": ("rng-rank0.safetensors", _truncate),
    "truncated state": ("state.json", _truncate),
    "deleted optimizer.json": ("optimizer.json", Path.unlink),
    "bit flip in trainable": ("trainable.safetensors", _flip_a_bit_in_the_last_tensor),
}


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_good_one_chosen(checkpointed, tmp_path, kind):
    import shutil

    from train.checksums import DamagedCheckpointWarning, newest_intact

    _, out = checkpointed
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    older, newest = tmp_path / "checkpoints/step-000002", tmp_path / "checkpoints/step-000004"
    assert newest_intact([older, newest]) == newest  # intact as written
    name, harm = DAMAGES[kind]
    harm(newest / name)
    if kind == "bit flip in trainable":  # silent damage: the file still loads, only its checksum tells
        assert set(load_file(newest / name)) == set(load_file(older / name))
    with pytest.warns(DamagedCheckpointWarning, match=f"step-000004/{name}"):
        assert newest_intact([older, newest]) == older
    harm(older / name)
    with pytest.raises(ResumeError, match=f"step-000002/{name}") as info:
        newest_intact([older, newest])
    assert f"step-000004/{name}" in str(info.value)


def test_resume_falls_back_past_a_bit_flip_and_ends_bit_identical(checkpointed, tmp_path, capsys):
    """--resume after a bit flip in the newest checkpoint: a warning, the step-2 checkpoint,
    the damaged one set aside, and the run ends where the undamaged run ended, bit for bit."""
    import shutil

    from train.checksums import DamagedCheckpointWarning

    cfg, out = checkpointed
    shutil.copytree(out / "checkpoints", tmp_path / "run/checkpoints")
    damaged = tmp_path / "run/checkpoints/step-000004"
    _flip_a_bit_in_the_last_tensor(damaged / "trainable.safetensors")
    with pytest.warns(DamagedCheckpointWarning, match="trainable.safetensors does not match its SHA-256"):
        result = run_phase({**cfg, "out_dir": str(tmp_path / "run")}, resume=True)
    assert "resumed from" in capsys.readouterr().out and result["step"] == 4
    assert (tmp_path / "run/checkpoints/step-000004.damaged").is_dir()
    a, b = (load_file(p / "checkpoints/step-000004/trainable.safetensors") for p in (out, tmp_path / "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
