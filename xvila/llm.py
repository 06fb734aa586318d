"""The LLM side: Vicuna's tokenizer with X-VILA's tokens, LoRA, and a toy tokenizer.

X-VILA adds to Vicuna's vocabulary one placeholder per media modality (`<image>`,
`<video>`, `<audio>`) and the generation tokens (`[IMG0..3]`, `[VID0..23]`, `[AUD0..7]`).
Their embedding rows (input embeddings and LM head) are the only base-model weights that
train, through peft's trainable tokens; everything else of the base model is frozen and
adapted with LoRA on q/k/v/o.
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import sentencepiece as spm
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from transformers import AutoTokenizer

from xvila.config import XVilaConfig
from xvila.constants import MEDIA_MODALITIES
from xvila.conversation import PLACEHOLDERS


def added_tokens(config: XVilaConfig) -> list[str]:
    return [PLACEHOLDERS[m] for m in MEDIA_MODALITIES] + [t for m in MEDIA_MODALITIES for t in config.gen_token_names(m)]


def add_xvila_tokens(tokenizer, config: XVilaConfig) -> list[int]:
    """Adds the placeholders and generation tokens as special (never split) tokens; returns their ids."""
    tokens = added_tokens(config)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(tokens)


def wrap_lora(llm, config: XVilaConfig, new_token_ids: list[int]) -> PeftModel:
    """LoRA on the attention projections, plus trainable rows for the new tokens in both
    the input embeddings and the (untied) LM head."""
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        trainable_token_indices={"embed_tokens": list(new_token_ids), "lm_head": list(new_token_ids)},
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, lora)


_merge_lock = threading.Lock()
_merge_users: dict[int, int] = {}  # id(llm) -> generations running with its rows merged


@contextmanager
def merged_new_tokens(llm):
    """The new tokens' rows merged into the embedding and LM-head matrices for as long as
    the block runs (decoding), then taken out again (training sees the trainable rows).

    Unmerged, peft's trainable-tokens layer builds a merged copy of the whole matrix on
    every forward (`get_merged_weights`: 2 x 32k x 4096 for Vicuna, about 1 GB of memory
    traffic per token); merged, a forward reads the base matrix as it is. Concurrent
    generations (the demo's `--concurrency`) share one merge, counted, so that the first
    to finish does not unmerge under the others."""
    layers = [m for m in llm.modules() if isinstance(m, TrainableTokensLayer)]
    key = id(llm)
    with _merge_lock:
        if layers and _merge_users.get(key, 0) == 0:
            _in_place(layers, "merge")
        _merge_users[key] = _merge_users.get(key, 0) + 1
    try:
        yield
    finally:
        with _merge_lock:
            _merge_users[key] -= 1
            if layers and _merge_users[key] == 0:
                _in_place(layers, "unmerge")
                del _merge_users[key]


def _in_place(layers, action: str) -> None:
    """Writes the new rows into the base matrix where it lies (peft's `merge` builds a new
    matrix: a new address each turn, which would make a compiled step re-record its CUDA
    graphs); peft's own `unmerge` then restores the original rows, also in place. Outside
    inference mode, so the weights stay ordinary tensors that training can use later."""
    with torch.inference_mode(False), torch.no_grad():
        for layer in layers:
            if action == "merge" and not layer.merged and not layer.disable_adapters:
                weight = layer.base_layer.weight
                for name in layer.active_adapters:
                    index = torch.tensor(layer.token_indices[name], device=weight.device)
                    weight.index_copy_(0, index, layer.trainable_tokens_delta[name].to(weight))
                    layer.merged_adapters.append(name)
            elif action == "unmerge" and layer.merged:
                layer.unmerge()


# ---------------------------------------------------------------------------- toy tokenizer
# A few sentences in the spirit of X-VILA's data, so that the toy vocabulary has whole
# words; anything else still encodes, through SentencePiece's byte fallback.
TOY_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
Make a video like this photo. Please generate an image similar to the input.
What do you hear in this audio? Describe the video. Here is an image of a red car.
A dog is barking in the park. A cat sits on a mat. Rain falls on the roof.
The sound of waves on the beach at sunset. A man plays the guitar on a stage.
Generate a video of the scene with music. Sure, here is the video you asked for.
"""


def toy_llama_tokenizer(folder: str | Path | None = None, vocab_size: int = 512):
    """A Llama tokenizer (SentencePiece BPE with byte fallback, `<unk>`/`<s>`/`</s>` at 0/1/2)
    trained in-process on `TOY_CORPUS`, then loaded through `AutoTokenizer` exactly as
    Vicuna's `tokenizer.model` is. Deterministic (one thread)."""
    model = io.BytesIO()
    sentences = [s for s in TOY_CORPUS.splitlines() if s] * 8
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        character_coverage=1.0, add_dummy_prefix=True, normalization_rule_name="identity",
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.model").write_bytes(model.getvalue())
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
        }))
        return AutoTokenizer.from_pretrained(str(folder))
