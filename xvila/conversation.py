"""Conversations in the LLM's chat format, with media placeholders and training labels.

The format is the config's `chat_template`: `vicuna_v1.1` (X-VILA's, below) or
`tokenizer`, the LLM tokenizer's own template through `tokenizer.apply_chat_template`
(e.g. SmolLM2's ChatML). Either way `render` gives the text and the character spans of the
assistants' replies, and labels come from those spans.

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
VICUNA_TEMPLATE, TOKENIZER_TEMPLATE = "vicuna_v1.1", "tokenizer"
CHAT_TEMPLATES = (VICUNA_TEMPLATE, TOKENIZER_TEMPLATE)
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


def render(system: str, turns: list[Turn], template: str = VICUNA_TEMPLATE,
           tokenizer=None) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text and the character spans of the assistants' replies, each with its
    end-of-turn marker (`</s>`, or the template's, e.g. `<|im_end|>`).

    The last turn may have `assistant=None`: the text then ends with the generation prompt
    (`ASSISTANT:`, or the template's). `template="tokenizer"` needs the tokenizer.
    """
    if template == TOKENIZER_TEMPLATE:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PromptError("chat_template 'tokenizer' needs an LLM tokenizer that has a chat template")
        return _render_with_tokenizer(system, turns, tokenizer)
    if template != VICUNA_TEMPLATE:
        raise PromptError(f"unknown chat template {template!r}; known: {', '.join(CHAT_TEMPLATES)}")
    text, spans = system + " ", []
    for turn in turns:
        text += f"{USER}: {user_content(turn.user, turn.media)} {ASSISTANT}:"
        if turn.assistant is not None:
            text += " "
            start = len(text)
            text += turn.assistant + "</s>"
            spans.append((start, len(text)))
    return text, spans


def _render_with_tokenizer(system: str, turns: list[Turn], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The tokenizer's own template. A reply's span runs from the end of the generation
    prompt (rendered without the reply) to the end of the reply's end-of-turn marker
    (rendered with it), so labels hold exactly what generation must produce."""
    def apply(messages: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    messages = [{"role": "system", "content": system}] if system else []
    spans, prefixes = [], []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": user_content(turn.user, turn.media)})
        if turn.assistant is None:
            if i != len(turns) - 1:
                raise PromptError("only the last turn may wait for its reply")
            break
        before = apply(messages, True)
        messages.append({"role": "assistant", "content": turn.assistant})
        after = apply(messages, False).rstrip()  # the newline after the marker is the next turn's
        if not after.startswith(before + turn.assistant):
            raise PromptError("the tokenizer's chat template does not render a reply verbatim after its "
                              "generation prompt; use chat_template 'vicuna_v1.1'")
        spans.append((len(before), len(after)))
        prefixes.append(after)
    text = apply(messages, bool(turns) and turns[-1].assistant is None)
    if not all(text.startswith(p) for p in prefixes):
        raise PromptError("the tokenizer's chat template renders earlier turns differently once later ones "
                          "follow; use chat_template 'vicuna_v1.1'")
    return _without_double_bos(text, spans, tokenizer)


def _without_double_bos(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Templates that write the BOS token themselves would get a second one from a
    tokenizer that adds it: drop the template's."""
    bos = tokenizer.bos_token
    adds_bos = tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    if bos and adds_bos and text.startswith(bos):
        n = len(bos)
        return text[n:], [(a - n, b - n) for a, b in spans]
    return text, spans


def tokenize(tokenizer, text: str, spans: list[tuple[int, int]], expand: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of a rendered conversation.

    The whole text is tokenised at once (as at inference) and a token is labelled when its
    characters lie in an assistant span; a token may start one character early when that
    character is a space, because a SentencePiece word token carries the space before it
    (Vicuna's prompt ends with `ASSISTANT:`, so the space is the reply's). `expand` maps a
    placeholder id to its number of copies.
    """
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    spans = [(s - 1 if text[s - 1 : s] == " " else s, e) for s, e in spans]
    ids, labels = [], []
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = b > a and any(s <= a and b <= e for s, e in spans)
        n = expand.get(tid, 1)
        ids += [tid] * n
        labels += [tid if inside and n == 1 and tid not in expand else IGNORE_INDEX] * n
    return torch.tensor(ids), torch.tensor(labels)
