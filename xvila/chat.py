"""A multi-turn chat: history of text and encoded media, context fitting, streaming events.

    chat = model.new_chat()
    for ev in chat.send("Make a video like this photo", media=["photo.jpg"], output="video"):
        ev.kind, ev.text, ev.modality, ev.path, ev.condition

Each input is decoded and encoded once, when it is sent; its embeddings stay in the
history and are spliced into every later prompt. When the conversation would overflow the
context window, whole turns are dropped from the oldest, so a media input is never cut in
half; a single turn too long for the window is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from xvila import media as media_io
from xvila.conversation import Turn, render, tokenize
from xvila.engine import Engine, Sampling
from xvila.errors import XVilaError
from xvila.model import MediaInput


class ContextOverflowError(XVilaError, ValueError):
    """One turn does not fit in the model's context window."""


class OutputError(XVilaError, ValueError):
    """An `output=` value the model cannot produce."""


@dataclass
class Event:
    """`kind` "text": `text` holds newly generated characters.
    `kind` "media": a generated medium; `modality`, `condition` (E_text for the decoder),
    `states` (S_gen) and, once a decoder has written it, `path`."""

    kind: str
    text: str = ""
    modality: str | None = None
    path: str | None = None
    condition: torch.Tensor | None = None
    states: torch.Tensor | None = None


@dataclass
class _Record:
    user: str
    inputs: list[MediaInput]
    assistant: str | None = None  # the reply as the model wrote it, generation tokens included
    outputs: list[Event] = field(default_factory=list)


class Chat:
    def __init__(self, model, system_prompt: str | None = None, engine: Engine | None = None):
        self.model = model
        self.system_prompt = system_prompt if system_prompt is not None else model.config.system_prompt
        self.engine = engine or Engine(model)
        self.records: list[_Record] = []

    # ------------------------------------------------------------------ history
    def undo(self) -> None:
        """Forget the last turn (question and answer)."""
        if self.records:
            self.records.pop()

    def reset(self) -> None:
        self.records.clear()

    @property
    def history(self) -> list[tuple[str, str | None]]:
        return [(r.user, r.assistant) for r in self.records]

    # ------------------------------------------------------------------ one turn
    def send(self, text: str, media: list[str] | tuple[str, ...] = (), output: str | None = None,
             highway: bool = True, alpha: float | None = None, seed: int = 0,
             max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
             should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Streams the reply to `text` (+ `media` files) as events; the turn joins the history.

        Bad input (unreadable media, placeholders that do not match, an unknown `output`)
        raises a typed error before anything is generated and leaves the history as it was.
        `highway` and `alpha` are the visual embedding highway's switch and rate (used by
        the decoders).
        """
        if output not in (None, "text", *self.model.gen_ids):
            raise OutputError(f"output must be None, 'text', 'image', 'video' or 'audio', not {output!r}")
        inputs = [self.model.encode_media(p, media_io.media_kind(p)) for p in media]
        record = _Record(text, inputs)
        sampling = Sampling(max_new_tokens, temperature, top_p)
        ids, embeds = self._prompt(record, sampling)
        self.records.append(record)
        reply: list[int] = []
        shown = ""
        for step in self.engine.generate(embeds, sampling, output=output, seed=seed, should_stop=should_stop):
            if step.modality is None:
                reply.append(step.token_id)
                # Decode the whole reply each time: tokens that start a multi-byte character
                # or a word are shown only once they decode cleanly.
                now = self.model.tokenizer.decode(reply, skip_special_tokens=True)
                if len(now) > len(shown) and not now.endswith("\ufffd"):
                    yield Event("text", text=now[len(shown):])
                    shown = now
                continue
            reply += self.model.gen_ids[step.modality]
            with torch.no_grad():
                condition = self.model.p_out[step.modality](step.states[None].to(self.model.device))[0]
            event = Event("media", modality=step.modality, condition=condition, states=step.states)
            record.outputs.append(event)
            yield event
        record.assistant = self.model.tokenizer.decode(reply, skip_special_tokens=False).strip()

    def _prompt(self, record: _Record, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and embeddings of the conversation so far plus `record`, oldest turns
        dropped until it fits with room for the reply."""
        model = self.model
        reserve = sampling.max_new_tokens + max(len(ids) for ids in model.gen_ids.values())
        budget = model.config.max_context - reserve
        records = self.records + [record]
        expand = {model.placeholder_ids[m]: k for m, k in model.config.tokens_per_input.items()}
        while True:
            turns = [Turn(r.user, [i.modality for i in r.inputs], r.assistant) for r in records]
            text, spans = render(self.system_prompt, turns)
            ids, _ = tokenize(model.tokenizer, text, spans, expand)
            if len(ids) <= budget:
                break
            if len(records) == 1:
                raise ContextOverflowError(
                    f"the message takes {len(ids)} tokens, more than the {budget} the context window leaves "
                    f"(window {model.config.max_context}, {reserve} kept for the reply); shorten it or send fewer media"
                )
            records = records[1:]
        media: dict[str, list[torch.Tensor]] = {}
        for r in records:
            for i in r.inputs:
                media.setdefault(i.modality, []).append(i.embeds)
        ids = ids[None].to(model.device)
        with torch.no_grad():
            embeds = model.splice(ids, {m: torch.stack(x) for m, x in media.items()})
        return ids, embeds
