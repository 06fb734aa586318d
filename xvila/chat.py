"""A multi-turn chat: history of text and encoded media, context fitting, streaming events.

    chat = model.new_chat()
    for ev in chat.send("Make a video like this photo", media=["photo.jpg"], output="video"):
        ev.kind, ev.text, ev.modality, ev.path, ev.condition

Each input is decoded and encoded once, when it is sent; its embeddings stay in the
history (`chat.records`, one `Record` per turn) and are spliced into every later prompt.
`export_history()` turns the history into plain data (JSON for the text, safetensors bytes
for the embeddings) and `import_history()` reads it back, so that the demo, a test or a
ZeroGPU worker process passes the history without live tensors or objects. When the conversation would overflow the
context window, whole turns are dropped from the oldest, so a media input is never cut in
half; a single turn too long for the window is an error.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from xvila import media as media_io
from xvila.constants import TA, TA_VEH, TEXT_ALIGNED, VISUAL
from xvila.conversation import Turn, render, tokenize
from xvila.decoders.base import DecodeSettings, iter_denoise
from xvila.engine import Engine, Sampling
from xvila.errors import XVilaError
from xvila.model import MediaInput

# `decoding=` values: the variant labels, and the older "embed" / "text" (kept working).
# Each maps to (what conditions the decoder, the highway: forced off, or None: as `highway=`
# says; TA+VEH falls back to TA without a visual input, with the highway off or alpha 0).
DECODING = {TA: ("embed", False), TA_VEH: ("embed", None), TEXT_ALIGNED: ("text", None),
            "embed": ("embed", None), "text": ("text", None)}


class ContextOverflowError(XVilaError, ValueError):
    """One turn does not fit in the model's context window."""


class OutputError(XVilaError, ValueError):
    """An `output=` value the model cannot produce."""


class HistoryError(XVilaError, ValueError):
    """Data given to `import_history` is not a history that `export_history` wrote."""


@dataclass
class Event:
    """`kind` "text": `text` holds newly generated characters.
    `kind` "progress": a decoder finished `step` of `steps` for `modality` (and `variant`).
    `kind` "media": a generated medium: `modality`, `path` (the written file, when the model
    has a decoder for it), `variant` ("TA", "TA+VEH" or "text-aligned"), `condition` (the
    E_text the decoder used) and `states` (S_gen)."""

    kind: str
    text: str = ""
    modality: str | None = None
    path: str | None = None
    variant: str | None = None
    step: int = 0
    steps: int = 0
    condition: torch.Tensor | None = None
    states: torch.Tensor | None = None


@dataclass
class Record:
    """One turn of the history: the user's text and encoded inputs, the reply, its media."""

    user: str
    inputs: list[MediaInput]
    assistant: str | None = None  # the reply as the model wrote it, generation tokens included
    outputs: list[Event] = field(default_factory=list)


HISTORY_FORMAT = 1
_EVENT_TENSORS = ("condition", "states")


def export_records(records: list[Record]) -> dict:
    """`{"json": str, "safetensors": bytes}`: the text of every turn as JSON, with the tensors
    (input embeddings, E_vis, output conditions and S_gen) named in it and stored apart."""
    tensors: dict[str, torch.Tensor] = {}

    def keep(name: str, t: torch.Tensor | None) -> str | None:
        if t is None:
            return None
        tensors[name] = t.detach().cpu().clone()  # a copy: compare mode's events share one condition
        return name

    turns = []
    for r, record in enumerate(records):
        inputs = [{"modality": i.modality, "source": i.source, "embeds": keep(f"{r}.in{n}.embeds", i.embeds),
                   "highway": keep(f"{r}.in{n}.highway", i.highway)} for n, i in enumerate(record.inputs)]
        outputs = [{"kind": e.kind, "modality": e.modality, "path": e.path, "variant": e.variant,
                    **{k: keep(f"{r}.out{n}.{k}", getattr(e, k)) for k in _EVENT_TENSORS}}
                   for n, e in enumerate(record.outputs)]
        turns.append({"user": record.user, "assistant": record.assistant, "inputs": inputs, "outputs": outputs})
    text = json.dumps({"format": HISTORY_FORMAT, "turns": turns})
    return {"json": text, "safetensors": save_tensors(tensors) if tensors else b""}


def import_records(data: dict, device: torch.device | str = "cpu") -> list[Record]:
    """The records `export_records` described, with their tensors on `device`."""
    try:
        doc = json.loads(data["json"])
        tensors = load_tensors(data["safetensors"]) if data["safetensors"] else {}
        if doc.get("format") != HISTORY_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {HISTORY_FORMAT}")

        def get(name: str | None) -> torch.Tensor | None:
            return None if name is None else tensors[name].to(device)

        return [Record(
            t["user"],
            [MediaInput(i["modality"], get(i["embeds"]), get(i["highway"]), i["source"]) for i in t["inputs"]],
            t["assistant"],
            [Event(e["kind"], modality=e["modality"], path=e["path"], variant=e["variant"],
                   **{k: get(e[k]) for k in _EVENT_TENSORS}) for e in t["outputs"]],
        ) for t in doc["turns"]]
    except (KeyError, TypeError, ValueError, SafetensorError) as err:  # ValueError covers bad JSON
        raise HistoryError(f"not a chat history written by export_history: {type(err).__name__}: {err}") from err


class Chat:
    def __init__(self, model, system_prompt: str | None = None, engine: Engine | None = None,
                 outputs_dir: str | Path | None = None):
        self.model = model
        self.system_prompt = system_prompt if system_prompt is not None else model.config.system_prompt
        self.engine = engine or Engine(model)
        self.records: list[Record] = []
        self._outputs_dir = Path(outputs_dir) if outputs_dir else None

    @property
    def outputs_dir(self) -> Path:
        """Where generated files go (a fresh temporary folder unless given)."""
        if self._outputs_dir is None:
            self._outputs_dir = Path(tempfile.mkdtemp(prefix="xvila-chat-"))
        self._outputs_dir.mkdir(parents=True, exist_ok=True)
        return self._outputs_dir

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

    def export_history(self) -> dict:
        """The history as plain data: `{"json": str, "safetensors": bytes}` (see `export_records`)."""
        return export_records(self.records)

    def import_history(self, data: dict) -> None:
        """Replace the history with one `export_history` wrote (this chat's or another's)."""
        self.records = import_records(data, self.model.device)

    # ------------------------------------------------------------------ one turn
    def send(self, text: str, media: list[str] | tuple[str, ...] = (), output: str | None = None,
             highway: bool = True, alpha: float | None = None, seed: int = 0,
             max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
             decode: DecodeSettings | None = None, decoding: str = TA_VEH, compare: bool = False,
             should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Streams the reply to `text` (+ `media` files) as events; the turn joins the history.

        Bad input (unreadable media, placeholders that do not match, an unknown `output`)
        raises a typed error before anything is generated and leaves the history as it was.

        Media: `decoding="TA+VEH"` (the default) conditions the decoder on P_out(S_gen)
        (TA), plus the visual embedding highway when `highway` is on, the conversation has a
        visual input and the decoder is visual (TA+VEH, rate `alpha`, default from the
        config), else TA; `decoding="TA"` turns the highway off; `decoding="text-aligned"` is
        Text-Aligned decoding: the reply's text, read by the decoder's own text encoder.
        The older values `"embed"` (= "TA+VEH") and `"text"` (= "text-aligned") still work.
        `compare=True` renders TA and TA+VEH from the same seed.
        `decode` holds the decoders' settings (steps, guidance, size, frames, seconds).
        """
        if output not in (None, "text", *self.model.gen_ids):
            raise OutputError(f"output must be None, 'text', 'image', 'video' or 'audio', not {output!r}")
        if decoding not in DECODING:
            raise OutputError(f"decoding must be one of {', '.join(map(repr, DECODING))}, not {decoding!r}")
        decoding, forced = DECODING[decoding]
        highway = highway if forced is None else forced
        alpha = self.model.config.highway_alpha if alpha is None else alpha
        if not 0.0 <= alpha <= 1.0:
            raise OutputError(f"alpha must be between 0 and 1, not {alpha}")
        decode = replace(decode or DecodeSettings(), seed=seed, alpha=alpha if highway else 0.0)
        inputs = [self.model.encode_media(p, media_io.media_kind(p)) for p in media]
        record = Record(text, inputs)
        sampling = Sampling(max_new_tokens, temperature, top_p)
        ids, embeds = self.prompt(record, sampling)
        self.records.append(record)
        reply: list[int] = []
        shown = ""
        try:
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
                caption = shown.strip() or text
                yield from self._media(record, step, decode, decoding, compare, caption, should_stop)
        finally:
            # Also when the consumer stops early (a closed stream, a cancelled turn): the
            # history keeps what was generated, so the next prompt stays well formed.
            record.assistant = self.model.tokenizer.decode(reply, skip_special_tokens=False).strip()

    def _visual_input(self) -> MediaInput | None:
        """The latest image or video in the conversation: the highway's source."""
        for r in reversed(self.records):
            for i in reversed(r.inputs):
                if i.highway is not None:
                    return i
        return None

    def _media(self, record: Record, step, s: DecodeSettings, decoding: str, compare: bool, caption: str,
               should_stop) -> Iterator[Event]:
        """One generation-token run -> media events (with files when there is a decoder)."""
        m = step.modality
        with torch.no_grad():
            condition = self.model.p_out[m](step.states[None].to(self.model.device))[0]
        if m not in self.model.decoders:
            event = Event("media", modality=m, condition=condition, states=step.states, variant=TA)
            record.outputs.append(event)
            yield event
            return
        visual = self._visual_input() if m in VISUAL else None
        if decoding == "text":
            variants = [(TEXT_ALIGNED, None)]
        elif compare and visual is not None:
            variants = [(TA, None), (TA_VEH, visual.highway)]
        else:
            variants = [(TA_VEH, visual.highway) if visual is not None and s.alpha > 0 else (TA, None)]
        with self.model.decoder_ready(m) as decoder:
            if decoding == "text":
                with torch.no_grad():
                    condition = decoder.encode_text([caption])[0]
            for variant, e_vis in variants:
                for denoised in iter_denoise(decoder, condition, s, e_vis, should_stop):
                    if denoised.kind == "progress":
                        yield Event("progress", modality=m, variant=variant, step=denoised.step, steps=denoised.steps)
                    else:
                        latents = denoised.latents
                with torch.no_grad():
                    media = decoder.decode_latents(latents, s)
                name = f"{len(self.records):03d}-{m}-{variant.replace('+', '-').lower()}{decoder.file_suffix}"
                path = decoder.write(media, self.outputs_dir / name, s)
                event = Event("media", modality=m, path=str(path), variant=variant, condition=condition,
                              states=step.states)
                record.outputs.append(event)
                yield event

    def prompt(self, record: Record, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and embeddings of the conversation so far plus `record`, oldest turns
        dropped until it fits with room for the reply."""
        model = self.model
        reserve = sampling.max_new_tokens + max(len(ids) for ids in model.gen_ids.values())
        budget = model.config.max_context - reserve
        records = self.records + [record]
        expand = {model.placeholder_ids[m]: k for m, k in model.config.tokens_per_input.items()}
        while True:
            turns = [Turn(r.user, [i.modality for i in r.inputs], r.assistant) for r in records]
            text, spans = render(self.system_prompt, turns, model.config.chat_template, model.tokenizer)
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
