"""XVila: what each training phase trains, label masks, training losses, checkpoints, offline presets.

Expected values are derived here by hand (name patterns, separate tokenisations, a separate
cross-entropy / MSE over a plain forward), never read back from the code under test.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

import xvila.checkpoint
import xvila.fileio
from xvila.checkpoint import build_xvila
from xvila.config import XVilaConfig
from xvila.conversation import IGNORE_INDEX, Turn, render, tokenize
from xvila.decoders.video import ZEROSCOPE_REVISION
from xvila.errors import ConfigError, WeightsUnavailableError
from xvila.model import XVila

SYSTEM = "A chat between a curious user and an artificial intelligence assistant."
IMG = "".join(f"[IMG{i}]" for i in range(4))
VID = "".join(f"[VID{i}]" for i in range(24))
AUD = "".join(f"[AUD{i}]" for i in range(8))


@pytest.fixture(scope="module")
def model_k3():
    """Image inputs take k = 3 LLM embeddings (pooled from ImageBind's token grid)."""
    config = XVilaConfig.from_name("tiny-random").replace(tokens_per_input={"image": 3, "video": 1, "audio": 1})
    return build_xvila(config)


def ids_of(tokenizer, tokens: list[str]) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert tokenizer.unk_token_id not in ids
    return ids


def gen_names(tag: str, n: int) -> list[str]:
    return [f"[{tag}{i}]" for i in range(n)]


def expand_map(model) -> dict[int, int]:
    return {model.tokenizer.convert_tokens_to_ids(p): model.config.tokens_per_input[m]
            for m, p in (("image", "<image>"), ("video", "<video>"), ("audio", "<audio>"))}


def find_run(seq: list[int], sub: list[int], start: int) -> int:
    """First index >= start where `sub` occurs in `seq` as a contiguous run."""
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise AssertionError(f"{sub} not found in {seq[start:]}")


def expected_labels(tokenizer, ids: list[int], replies: list[str]) -> list[int]:
    """Labels derived independently: each reply (+ "</s>") tokenised on its own and located,
    in order, in the conversation's ids; everything else -100."""
    labels = [IGNORE_INDEX] * len(ids)
    pos = 0
    for reply in replies:
        sub = tokenizer(reply + "</s>", add_special_tokens=False)["input_ids"]
        assert sub[-1] == tokenizer.eos_token_id
        at = find_run(ids, sub, pos)
        labels[at:at + len(sub)] = sub
        pos = at + len(sub)
    return labels


# ------------------------------------------------------------------ 1. trainable groups per phase


def all_modality_batch(model):
    """One conversation with an image, a video and an audio input and a reply with each
    modality's generation tokens, so every P_in and P_out takes part."""
    reply = f"Sure, here is the video you asked for. {IMG} {VID} {AUD}"
    text, spans = render(SYSTEM, [Turn("Make a video like this photo.", ["image", "video", "audio"], reply)])
    ids, labels = tokenize(model.tokenizer, text, spans, expand_map(model))
    g = torch.Generator().manual_seed(0)
    out_dim = model.imagebind.config.out_embed_dim
    media = {m: {"pooled": torch.randn(1, out_dim, generator=g)} for m in ("image", "video", "audio")}
    shapes = model.config.cond_shapes
    targets = {m: torch.randn(1, *shapes[m], generator=g) for m in ("image", "video", "audio")}
    return ids[None], labels[None], media, targets


def expected_trainable(name: str, phase: str) -> bool:
    new = name.startswith("p_in.") or name.startswith("p_out.") or "trainable_tokens_delta" in name
    return new or (phase in ("2", "3a") and "lora_" in name)


@pytest.mark.parametrize("phase", ["1", "2", "3a"])
def test_set_trainable_changes_exactly_the_phase_parameters(model, phase):
    m = copy.deepcopy(model)
    names = [n for n, _ in m.named_parameters()]
    expected = {n for n in names if expected_trainable(n, phase)}
    # The patterns select what they should: both P's of every modality, the new token rows
    # of the input embeddings and the LM head, and (phases 2/3a) LoRA A and B of every layer.
    assert {n.split(".")[1] for n in expected if n.startswith(("p_in.", "p_out."))} == {"image", "video", "audio"}
    assert sum("trainable_tokens_delta" in n for n in expected) == 2
    n_lora = sum("lora_" in n for n in names)
    assert n_lora == 2 * 2 * 4  # 2 layers x q/k/v/o x (A, B)
    assert sum("lora_" in n for n in expected) == (n_lora if phase != "1" else 0)
    assert not any(n.startswith("imagebind.") for n in expected)

    counts = m.set_trainable(phase, verbose=False)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == expected
    numel = dict((n, p.numel()) for n, p in m.named_parameters())
    want_counts = {
        "p_in": sum(v for n, v in numel.items() if n.startswith("p_in.")),
        "p_out": sum(v for n, v in numel.items() if n.startswith("p_out.")),
        "new_tokens": sum(v for n, v in numel.items() if "trainable_tokens_delta" in n),
    }
    if phase != "1":
        want_counts["lora"] = sum(v for n, v in numel.items() if "lora_" in n)
    assert counts == want_counts

    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ids, labels, media, targets = all_modality_batch(m)
    # Every parameter goes to the optimiser: a frozen one must simply never get a gradient.
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)

    def step():
        opt.zero_grad()
        losses = m.forward_train(ids, labels, media=media, targets=targets)
        assert set(losses) == {"lm", "align/image", "align/video", "align/audio", "loss"}
        losses["loss"].backward()
        opt.step()
        return {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}

    changed = step()
    # LoRA B starts at zero, so A's gradient is zero on the first step (Adam then leaves it
    # unchanged); B and everything else moves at once.
    assert changed == {n for n in expected if "lora_A" not in n}
    changed = step()
    assert changed == expected
    assert not any(n.startswith("imagebind.") for n in changed)
    base_llm = {n for n in names if n.startswith("llm.") and "lora_" not in n and "trainable_tokens_delta" not in n}
    assert base_llm and not (changed & base_llm)


def test_unknown_phase_is_a_config_error_and_changes_nothing(model):
    m = copy.deepcopy(model)
    m.set_trainable("1", verbose=False)
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    for phase in ("4", "3c", 1, ""):
        with pytest.raises(ConfigError, match="unknown phase"):
            m.set_trainable(phase, verbose=False)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == before


# ------------------------------------------------------------------ 2. label masks


def test_labels_keep_only_the_assistant_replies_and_their_eos(model):
    tok = model.tokenizer
    replies = [f"Here is an image {IMG}", "A cat sits on a mat."]
    turns = [Turn("Describe the photo.", ["image"], replies[0]), Turn("Now a dog.", [], replies[1])]
    text, spans = render(SYSTEM, turns)
    ids, labels = tokenize(tok, text, spans, expand_map(model))
    ids, labels = ids.tolist(), labels.tolist()

    # With k = 1 the ids are the plain tokenisation of the text.
    assert ids == tok(text)["input_ids"]
    want = expected_labels(tok, ids, replies)
    assert labels == want

    # Spelled out: two `</s>` are labelled, each right after its reply; the image
    # placeholder, the system prompt, both USER turns and "ASSISTANT:" are masked.
    eos = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
    assert len(eos) == 2 and all(labels[i] == tok.eos_token_id for i in eos)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 1 and labels[ids.index(image_id)] == IGNORE_INDEX
    first = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
    prefix = tok.decode(ids[:first], skip_special_tokens=False)
    assert prefix.replace("<s> ", "<s>").startswith("<s>" + SYSTEM) and prefix.rstrip().endswith("ASSISTANT:")
    labelled = [i for i, v in enumerate(labels) if v != IGNORE_INDEX]
    gap = [i for i in range(first, labelled[-1]) if labels[i] == IGNORE_INDEX]
    gap_text = tok.decode([ids[i] for i in gap], skip_special_tokens=False)
    assert gap_text.replace(" ", "") == "USER:Nowadog.ASSISTANT:"
    # The generation tokens are labelled (the model must learn to emit them).
    img_ids = ids_of(tok, gen_names("IMG", 4))
    assert all(labels[ids.index(t)] == t for t in img_ids)


def test_labels_with_a_placeholder_expanded_to_k_copies(model_k3):
    tok = model_k3.tokenizer
    image_id, audio_id = ids_of(tok, ["<image>", "<audio>"])
    replies = ["The sound of waves on the beach.", f"Sure, here is an image {IMG}"]
    turns = [Turn("<image> and <audio>: what is it?", ["image", "audio"], replies[0]),
             Turn("Make an image.", [], replies[1])]
    text, spans = render(SYSTEM, turns)
    ids, labels = tokenize(tok, text, spans, {image_id: 3, audio_id: 1, tok.convert_tokens_to_ids("<video>"): 1})
    ids, labels = ids.tolist(), labels.tolist()

    plain = tok(text)["input_ids"]
    expanded = [t for x in plain for t in ([x] * 3 if x == image_id else [x])]
    assert ids == expanded
    at = ids.index(image_id)
    assert ids[at:at + 3] == [image_id] * 3 and ids.count(image_id) == 3 and ids.count(audio_id) == 1
    assert labels == expected_labels(tok, ids, replies)
    assert labels[at:at + 3] == [IGNORE_INDEX] * 3 and labels[ids.index(audio_id)] == IGNORE_INDEX

    # P_in fills the 3 copies with the token grid average-pooled to 3 (by hand: 6 tokens ->
    # 3 pairs), projected.
    g = torch.Generator().manual_seed(1)
    trunk = model_k3.imagebind.config.vision_embed_dim
    tokens = torch.randn(1, 6, trunk, generator=g)
    pooled = torch.randn(1, model_k3.imagebind.config.out_embed_dim, generator=g)
    audio = torch.randn(1, model_k3.imagebind.config.out_embed_dim, generator=g)
    p = model_k3.p_in["image"].proj
    want_rows = tokens.view(1, 3, 2, trunk).mean(2) @ p.weight.T + p.bias
    pa = model_k3.p_in["audio"].proj
    want_audio = audio @ pa.weight.T + pa.bias
    with torch.no_grad():
        media = {"image": model_k3.project_media("image", pooled, tokens), "audio": model_k3.project_media("audio", audio)}
        embeds = model_k3.splice(torch.tensor([ids]), media)[0]
        table = model_k3.llm.get_input_embeddings()(torch.tensor(ids))
    torch.testing.assert_close(embeds[at:at + 3], want_rows[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds[ids.index(audio_id)], want_audio[0], atol=1e-5, rtol=1e-5)
    others = [i for i, t in enumerate(ids) if t not in (image_id, audio_id)]
    assert torch.equal(embeds[others], table[others])


# ------------------------------------------------------------------ 3. training losses


def test_forward_train_losses_match_a_separate_computation(model):
    tok = model.tokenizer
    replies = [f"Here is an image {IMG}", "A dog is barking in the park."]
    turns = [Turn("Make an image like this.", ["image"], replies[0]), Turn("What do you hear?", [], replies[1])]
    text, spans = render(SYSTEM, turns)
    ids, labels = tokenize(tok, text, spans, expand_map(model))
    g = torch.Generator().manual_seed(2)
    pooled = torch.randn(1, model.imagebind.config.out_embed_dim, generator=g)
    target = torch.randn(1, *model.config.cond_shapes["image"], generator=g)

    with torch.no_grad():
        losses = model.forward_train(ids[None], labels[None], media={"image": {"pooled": pooled}},
                                     targets={"image": target})
        p = model.p_in["image"].proj
        row = pooled @ p.weight.T + p.bias
        embeds = model.splice(ids[None], {"image": row[:, None]})
        image_pos = ids.tolist().index(tok.convert_tokens_to_ids("<image>"))
        assert torch.equal(embeds[0, image_pos], row[0])
        out = model.llm(inputs_embeds=embeds, output_hidden_states=True)
        logits, hidden = out.logits[0].float(), out.hidden_states[-1][0]

        # lm: mean next-token NLL over the labelled positions only.
        want_labels = expected_labels(tok, ids.tolist(), replies)
        targets_at = [t for t in range(1, len(ids)) if want_labels[t] != IGNORE_INDEX]
        nll = [-torch.log_softmax(logits[t - 1], dim=-1)[want_labels[t]] for t in targets_at]
        lm = torch.stack(nll).mean()
        torch.testing.assert_close(losses["lm"], lm, atol=1e-5, rtol=1e-5)

        # align/image: MSE between P_out(hidden states at [IMG0..3]) and the target.
        img_ids = ids_of(tok, gen_names("IMG", 4))
        where = [ids.tolist().index(t) for t in img_ids]
        assert where == list(range(where[0], where[0] + 4))
        pred = model.p_out["image"](hidden[where][None])
        align = ((pred - target) ** 2).mean()
        torch.testing.assert_close(losses["align/image"], align, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(losses["loss"], lm + align, atol=1e-5, rtol=1e-5)
        assert set(losses) == {"lm", "align/image", "loss"}


# ------------------------------------------------------------------ 7. checkpoints


def perturbed_copy(model) -> XVila:
    """A copy whose every weight differs from a fresh build, so that a load which quietly
    rebuilt anything from the config (and its seed) would be caught. The base rows of the
    new tokens are kept, as peft keeps a copy of them (`trainable_tokens_original`)."""
    m = copy.deepcopy(model)
    new_ids = torch.tensor(sorted(set(m.gen_ids["image"] + m.gen_ids["video"] + m.gen_ids["audio"])
                                  | set(m.placeholder_ids.values())))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.02
            if name.endswith("token_adapter.base_layer.weight"):
                noise[new_ids] = 0
            p.add_(noise)
    return m


def image_file(folder) -> str:
    rng = np.random.default_rng(0)
    path = os.path.join(folder, "photo.png")
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def run_chat(model, image: str) -> list:
    chat = model.new_chat()
    events = list(chat.send("Describe this photo.", media=[image], temperature=1.0, seed=4, max_new_tokens=20))
    events += list(chat.send("Now make an image of it.", output="image", temperature=1.0, seed=5, max_new_tokens=20))
    return events


def assert_same_events(a, b):
    """Same texts exactly; same media to float noise: the loaded weights are bit-equal, but
    tensors read from safetensors sit at other memory alignments, which changes the CPU
    kernels' summation order (cloning them makes the outputs bit-identical)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.kind, x.text, x.modality) == (y.kind, y.text, y.modality)
        if x.kind == "media":
            torch.testing.assert_close(x.states, y.states, atol=1e-5, rtol=0)
            torch.testing.assert_close(x.condition, y.condition, atol=1e-5, rtol=0)


def test_save_load_round_trip(model, tmp_path, monkeypatch):
    original = perturbed_copy(model)
    folder = tmp_path / "ckpt"
    original.save_pretrained(folder)

    # Layout of the checkpoint folder.
    assert (folder / "config.json").is_file() and (folder / "xvila.safetensors").is_file()
    assert (folder / "tokenizer").is_dir() and (folder / "adapter").is_dir()
    assert (folder / "llm").is_dir() and (folder / "imagebind").is_dir()
    assert (folder / "llm" / "model.safetensors").is_file() and (folder / "imagebind" / "model.safetensors").is_file()
    assert XVilaConfig.from_dict(json.loads((folder / "config.json").read_text())).name == "tiny-random"

    # Workaround for the offline check resolving relative part names against the working
    # directory (see test_checkpoint_loads_offline_from_any_working_directory).
    monkeypatch.chdir(folder)
    loaded = XVila.from_pretrained(str(folder))

    a, b = dict(original.named_parameters()), dict(loaded.named_parameters())
    assert set(a) == set(b)
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    a, b = dict(original.named_buffers()), dict(loaded.named_buffers())
    assert set(a) == set(b)
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    assert loaded.gen_ids == original.gen_ids and loaded.placeholder_ids == original.placeholder_ids

    image = image_file(tmp_path)
    first, second = run_chat(original, image), run_chat(loaded, image)
    assert any(e.kind == "text" for e in first) and first[-1].kind == "media"
    assert_same_events(first, second)
    # The perturbation matters: the fresh model answers differently.
    fresh = run_chat(model, image)
    assert (fresh[-1].condition - first[-1].condition).abs().max() > 1e-2


def test_checkpoint_loads_offline_from_any_working_directory(model, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    monkeypatch.chdir(tmp_path)  # anywhere but the checkpoint folder itself
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = XVila.from_pretrained(str(folder))
    assert torch.equal(loaded.p_out["image"].queries, model.p_out["image"].queries)


def test_folder_without_config_json_is_not_a_checkpoint(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsUnavailableError, match="config.json"):
        XVila.from_pretrained(str(empty))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsUnavailableError, match="config.json"):
        XVila.from_pretrained(str(folder))


# ------------------------------------------------------------------ 8. offline xvila-7b

IMPORT_WITHOUT_NETWORK = textwrap.dedent("""
    import socket, sys

    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    socket.socket.connect = socket.socket.connect_ex = socket.create_connection = refuse
    import huggingface_hub, huggingface_hub.file_download
    calls = []

    def no_download(*args, **kwargs):
        calls.append(args)
        raise AssertionError("download")

    huggingface_hub.hf_hub_download = huggingface_hub.file_download.hf_hub_download = no_download
    huggingface_hub.snapshot_download = no_download
    import xvila
    from xvila.config import XVilaConfig
    config = XVilaConfig.from_name("xvila-7b")
    assert (config.llm, config.imagebind) == ("lmsys/vicuna-7b-v1.5", "nielsr/imagebind-huge"), config
    assert calls == [], calls
    print("no network")
""")


def test_import_and_xvila_7b_config_touch_no_network():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # a download would really try
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_NETWORK], env=env, cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no network"


def write_cached_file(cache, repo: str, filename: str) -> None:
    """A Hub cache entry as huggingface_hub lays it out (refs/main -> snapshots/<sha>/file)."""
    sha = "0" * 40
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)
    (base / "snapshots" / sha).mkdir(parents=True)
    (base / "snapshots" / sha / filename).write_bytes(b"")


def test_xvila_7b_offline_with_empty_cache_names_the_missing_repos(tmp_path, monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(("connect", args))
        raise AssertionError("network access")

    def no_download(*args, **kwargs):
        calls.append(("download", args))
        raise AssertionError("download")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.setattr(xvila.fileio, "hf_hub_download", no_download)
    monkeypatch.setattr(xvila.checkpoint, "snapshot_download", no_download)
    # xvila.fileio holds `try_to_load_from_cache` by name; it reads the cache folder from
    # huggingface_hub.constants.HF_HUB_CACHE at call time, so patching the constant suffices.
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        XVila.from_pretrained("xvila-7b")
    assert time.perf_counter() - start < 5  # before anything loads
    message = str(err.value)
    # Every repo, each with the command that fetches it (pinned revisions included).
    for command in ("hf download lmsys/vicuna-7b-v1.5 --revision refs/pr/3", "hf download nielsr/imagebind-huge",
                    "hf download stable-diffusion-v1-5/stable-diffusion-v1-5", "hf download adamdad/videocrafterv2_diffusers",
                    f"hf download cerspense/zeroscope_v2_576w --revision {ZEROSCOPE_REVISION}",
                    "hf download cvssp/audioldm-s-full-v2"):
        assert f"`{command}`" in message, (command, message)
    assert message.count("hf download") == 6 and "\n" not in message  # one line: the demo prints it as it is
    assert calls == []

    # The check really reads that cache: with ImageBind's weights there, only Vicuna is named.
    write_cached_file(cache, "nielsr/imagebind-huge", "model.safetensors")
    with pytest.raises(WeightsUnavailableError) as err:
        xvila.checkpoint.check_offline_availability(XVilaConfig.from_name("xvila-7b"))
    assert "lmsys/vicuna-7b-v1.5" in str(err.value) and "nielsr/imagebind-huge" not in str(err.value)
    assert calls == []
