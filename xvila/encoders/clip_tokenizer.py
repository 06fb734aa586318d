"""CLIP BPE tokenisation as ImageBind's text encoder expects it.

The BPE itself is transformers' `CLIPTokenizer` (the vocabulary of OpenAI CLIP, which is
ImageBind's `bpe_simple_vocab_16e6`). Around it we reproduce what the official
`SimpleTokenizer.__call__` does that the transformers tokenizer does not: ftfy and a double
HTML unescape before lower-casing, `<|startoftext|> … <|endoftext|>` with the text cut so
that the end token always survives, and zero padding to 77 tokens. The model pools at the
end token by `argmax`, which works because it has the largest id in the vocabulary.
"""

from __future__ import annotations

import html

import ftfy
import torch
from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CLIP_TOKENIZER_REPO = "openai/clip-vit-large-patch14"


def basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


class ImageBindTokenizer:
    def __init__(self, tokenizer: CLIPTokenizer, context_length: int = 77):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.sot_id = tokenizer.convert_tokens_to_ids(SOT)
        self.eot_id = tokenizer.convert_tokens_to_ids(EOT)
        if self.eot_id != max(tokenizer.get_vocab().values()):
            raise ValueError("the end-of-text token must have the largest id: ImageBind pools at argmax(ids)")

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer.get_vocab())

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without the start/end tokens."""
        # The tokenizer's own normaliser does NFC, whitespace squeezing and lower-casing.
        return self.tokenizer(basic_clean(text), add_special_tokens=False)["input_ids"]

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """[len(texts), context_length] int64 ids (a single string gives one row too)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = ([self.sot_id] + self.encode(text))[: self.context_length - 1] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def save_pretrained(self, folder) -> None:
        self.tokenizer.save_pretrained(folder)


def toy_clip_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP-style byte-level BPE over a small list of ASCII words, for tiny random models.

    Same shape as the real one: every byte (alone and word-final, `</w>`), then merges
    that build each word left to right, then the start and end tokens last.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for sym in symbols[1:]:
            pair = (merged, sym)
            merged += sym
            if pair not in merges:
                merges.append(pair)
                vocab.append(merged)
    vocab += [SOT, EOT]
    vocab = list(dict.fromkeys(vocab))
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges)
