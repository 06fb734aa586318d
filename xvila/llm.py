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
from pathlib import Path

import sentencepiece as spm
from peft import LoraConfig, PeftModel, get_peft_model
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
