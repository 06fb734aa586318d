"""Conversations in Vicuna v1.1's format, with media placeholders and training labels.

FastChat's `vicuna_v1.1` template (sep_style ADD_COLON_TWO, sep " ", sep2 "</s>"):

    {system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:

A user message holds one placeholder (`<image>`, `<video>`, `<audio>`) per media input, in
the order the inputs were given; where the text has none, they are put in front of it.
After tokenisation each placeholder becomes k copies of itself (k = the modality's
`tokens_per_input`), whose embeddings P_in fills in. Labels keep only the assistants'
tokens (their text, generation tokens and `</s>`); the system prompt, user turns and media
are masked with -100.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xvila.constants import AUDIO, IMAGE, MEDIA_MODALITIES, VIDEO
from xvila.errors import XVilaError

PLACEHOLDERS = {IMAGE: "<image>", VIDEO: "<video>", AUDIO: "<audio>"}
USER, ASSISTANT = "USER", "ASSISTANT"
IGNORE_INDEX = -100


class PromptError(XVilaError, ValueError):
    """The text's placeholders do not match the media given with it."""


@dataclass
class Turn:
    """One exchange. `media` lists the modality of each input, in placeholder order."""

    user: str
    media: list[str] = field(default_factory=list)
    assistant: str | None = None  # None: the reply is still to be generated


def user_content(text: str, media: list[str]) -> str:
    """The user's text with one placeholder per input: the text's own, checked, or prefixed."""
    counts = {m: text.count(p) for m, p in PLACEHOLDERS.items()}
    if not any(counts.values()):
        return "".join(PLACEHOLDERS[m] + "\n" for m in media) + text
    for m in MEDIA_MODALITIES:
        given = media.count(m)
        if counts[m] != given:
            raise PromptError(f"the message has {counts[m]} {PLACEHOLDERS[m]} placeholder(s) but {given} {m} input(s)")
    order = sorted((i, m) for m, p in PLACEHOLDERS.items() for i in _find_all(text, p))
    if [m for _, m in order] != list(media):
        raise PromptError("the placeholders in the message are not in the same order as the media inputs")
    return text


def _find_all(text: str, sub: str) -> list[int]:
    out, i = [], text.find(sub)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out


def render(system: str, turns: list[Turn]) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text and the character spans of the assistants' replies (with `</s>`).

    The last turn may have `assistant=None`: the text then ends with `ASSISTANT:`, ready
    for generation.
    """
    text, spans = system + " ", []
    for turn in turns:
        text += f"{USER}: {user_content(turn.user, turn.media)} {ASSISTANT}:"
        if turn.assistant is not None:
            text += " "
            start = len(text)
            text += turn.assistant + "</s>"
            spans.append((start, len(text)))
    return text, spans


def tokenize(tokenizer, text: str, spans: list[tuple[int, int]], expand: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of a rendered conversation.

    The whole text is tokenised at once (as at inference) and a token is labelled when its
    characters lie in an assistant span; a token may start one character early, because a
    SentencePiece word token carries the space before it. `expand` maps a placeholder id
    to its number of copies.
    """
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, labels = [], []
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = b > a and any(s - 1 <= a and b <= e for s, e in spans)
        n = expand.get(tid, 1)
        ids += [tid] * n
        labels += [tid if inside and n == 1 and tid not in expand else IGNORE_INDEX] * n
    return torch.tensor(ids), torch.tensor(labels)
