"""Chat and Engine: streaming, forced outputs and their S_gen, multi-turn history with
media, context fitting, the static KV cache.

Reference values come from separate full (cache-free) forwards over the prompt plus the
reply, never from the engine or the chat themselves.
"""

from __future__ import annotations

import inspect
import pickle

import pytest
import torch

from xvila.chat import Chat, ContextOverflowError, HistoryError, OutputError, Record
from xvila.checkpoint import build_xvila
from xvila.config import XVilaConfig
from xvila.conversation import Turn, render, tokenize
from xvila.engine import Engine, Sampling
from xvila.errors import XVilaError

TAGS = {"image": ("IMG", 4), "video": ("VID", 24), "audio": ("AUD", 8)}
PLACEHOLDER = {"image": "<image>", "video": "<video>", "audio": "<audio>"}


def gen_ids(model, modality: str) -> list[int]:
    tag, n = TAGS[modality]
    ids = model.tokenizer.convert_tokens_to_ids([f"[{tag}{i}]" for i in range(n)])
    assert model.tokenizer.unk_token_id not in ids
    return ids


def all_gen_ids(model) -> set[int]:
    return {i for m in TAGS for i in gen_ids(model, m)}


def placeholder_id(model, modality: str) -> int:
    return model.tokenizer.convert_tokens_to_ids(PLACEHOLDER[modality])


class Recorder:
    """Wraps a chat's `engine.generate`: keeps the prompt embeddings and every Step."""

    def __init__(self, chat: Chat):
        self.embeds, self.steps = [], []
        original = chat.engine.generate

        def generate(inputs_embeds, sampling, **kwargs):
            self.embeds.append(inputs_embeds.clone())
            self.steps.append([])
            for step in original(inputs_embeds, sampling, **kwargs):
                self.steps[-1].append(step)
                yield step

        chat.engine.generate = generate

    def reply_ids(self, model, turn: int = -1) -> list[int]:
        ids = []
        for s in self.steps[turn]:
            ids += [s.token_id] if s.modality is None else gen_ids(model, s.modality)
        return ids


def prompt_ids(model, chat: Chat, records: list[Record]) -> list[int]:
    """The prompt for the last of `records`, whose reply is still to come."""
    turns = [Turn(r.user, [i.modality for i in r.inputs], r.assistant) for r in records[:-1]]
    turns.append(Turn(records[-1].user, [i.modality for i in records[-1].inputs]))
    text, spans = render(chat.system_prompt, turns)
    expand = {placeholder_id(model, m): model.config.tokens_per_input[m] for m in PLACEHOLDER}
    return tokenize(model.tokenizer, text, spans, expand)[0].tolist()


def full_forward(model, ids: list[int], media: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last-layer hidden states of one cache-free forward over `ids`: [len, hidden]."""
    with torch.no_grad():
        embeds = model.splice(torch.tensor([ids]), media)
        return model.backbone(inputs_embeds=embeds).last_hidden_state[0]


# ------------------------------------------------------------------ 4. streaming


def test_send_streams_text_before_the_reply_is_finished(model, files, monkeypatch):
    forwards: list[list[int] | None] = []  # input ids of each forward (None: the prefill)
    original = Engine._forward

    def counting(self, cache, positions, input_ids=None, inputs_embeds=None):
        forwards.append(None if input_ids is None else input_ids[0].tolist())
        return original(self, cache, positions, input_ids=input_ids, inputs_embeds=inputs_embeds)

    monkeypatch.setattr(Engine, "_forward", counting)  # before the chat builds its Engine
    for seed in range(20):
        chat = model.new_chat()
        forwards.clear()
        stream = chat.send("Describe this photo.", media=[files["image0"]], output="text", temperature=1.0,
                           seed=seed, max_new_tokens=16)
        assert inspect.isgenerator(stream)
        assert forwards == []  # nothing runs until the caller asks for the first event
        first_at, texts = None, []
        for event in stream:
            assert event.kind == "text"
            if first_at is None:
                first_at = len(forwards)
            texts.append(event.text)
        if len(texts) >= 3:
            break
    else:
        pytest.fail("no seed in 0..19 gave a reply with 3 text events")
    total = len(forwards)
    # The first text arrived while the engine still had forwards to run: one per later event at least.
    assert first_at < total
    assert total - first_at >= len(texts) - 1
    # What was shown is the decoded reply (its prefix: trailing bytes of an unfinished
    # character are held back).
    reply = [ids[0] for ids in forwards[1:]]
    assert all(len(ids) == 1 for ids in forwards[1:])
    shown = "".join(texts)
    assert shown and model.tokenizer.decode(reply, skip_special_tokens=True).startswith(shown)


# ------------------------------------------------------------------ 5. forced outputs


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_forced_output_ends_with_its_generation_tokens(model, files, modality):
    tag, n = TAGS[modality]
    hidden_size = model.llm.get_base_model().config.hidden_size
    chat = model.new_chat()
    rec = Recorder(chat)
    user = "Make something like this photo."
    events = list(chat.send(user, media=[files["image0"]], output=modality, temperature=1.0, seed=7,
                            max_new_tokens=n + 6))

    media_events = [e for e in events if e.kind == "media"]
    assert len(media_events) == 1 and events[-1] is media_events[0]
    event = media_events[0]
    assert event.modality == modality
    assert tuple(event.states.shape) == (n, hidden_size)
    assert tuple(event.condition.shape) == tuple(model.config.cond_shapes[modality])

    # A separate cache-free forward over prompt + reply, the image's P_in embedding spliced in.
    image = chat.records[0].inputs[0]
    assert image.modality == "image" and tuple(image.embeds.shape) == (1, hidden_size)
    prompt = prompt_ids(model, chat, [Record(user, [image])])
    with torch.no_grad():
        assert torch.equal(model.splice(torch.tensor([prompt]), {"image": image.embeds[None]}), rec.embeds[0])
    reply = rec.reply_ids(model)
    assert reply[-n:] == gen_ids(model, modality)  # the reply ends with the whole run
    assert not (set(reply[:-n]) & all_gen_ids(model))
    hidden = full_forward(model, prompt + reply, {"image": image.embeds[None]})
    want_states = hidden[-n:]
    with torch.no_grad():
        want_condition = model.p_out[modality](want_states[None])[0]
    torch.testing.assert_close(event.states, want_states, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(event.condition, want_condition, atol=1e-4, rtol=1e-4)
    assert chat.records[0].assistant.endswith("".join(f"[{tag}{i}]" for i in range(n)))


def test_output_text_never_yields_media(model):
    produced_media_unforced = False
    for seed in range(6):
        chat = model.new_chat()
        rec = Recorder(chat)
        events = list(chat.send("Hello there", output=None, temperature=1.0, seed=seed, max_new_tokens=30))
        produced_media_unforced |= any(e.kind == "media" for e in events)
        chat.undo()
        events = list(chat.send("Hello there", output="text", temperature=1.0, seed=seed, max_new_tokens=30))
        assert all(e.kind == "text" for e in events)
        assert not (set(rec.reply_ids(model)) & all_gen_ids(model))
    # Without the restriction this model does emit generation tokens on some of these seeds.
    assert produced_media_unforced


def test_unknown_output_raises_before_the_history_changes(model):
    chat = model.new_chat()
    list(chat.send("Hello there", temperature=0.0, max_new_tokens=4))
    before = list(chat.records), chat.history
    for bad in ("picture", "IMAGE", "text+image"):
        with pytest.raises(OutputError) as err:
            next(chat.send("Make a picture", output=bad))
        assert isinstance(err.value, XVilaError) and repr(bad) in str(err.value)
    assert chat.records == before[0] and chat.history == before[1]


# ------------------------------------------------------------------ 6. multi-turn history


def test_three_turns_of_media_stay_in_the_prompt_then_undo_and_reset(model, files):
    chat = model.new_chat()
    turns = [("What is in this photo?", "image0"), ("What do you hear?", "audio0"), ("Describe the video.", "video0")]
    for seed, (text, key) in enumerate(turns):
        list(chat.send(text, media=[files[key]], output="text", temperature=0.0, seed=seed, max_new_tokens=8))
    assert [r.inputs[0].modality for r in chat.records] == ["image", "audio", "video"]
    assert all(r.assistant is not None for r in chat.records)
    # Each input was encoded once, when sent: its P_in embedding of the ImageBind output.
    for r, (_, key) in zip(chat.records, turns):
        assert r.inputs[0].source == files[key]
        with torch.no_grad():
            again = model.encode_media(files[key], r.inputs[0].modality)
        torch.testing.assert_close(r.inputs[0].embeds, again.embeds)

    rec = Recorder(chat)
    captured = {}
    original_prompt = chat.prompt

    def prompt(record, sampling):
        captured["ids"], captured["embeds"] = original_prompt(record, sampling)
        return captured["ids"], captured["embeds"]

    chat.prompt = prompt
    before = list(chat.records)
    list(chat.send("And now?", output="text", temperature=0.0, max_new_tokens=8))
    ids = captured["ids"][0].tolist()
    assert torch.equal(captured["embeds"], rec.embeds[0])
    assert len(ids) <= model.config.max_context
    assert ids == prompt_ids(model, chat, chat.records[:3] + [Record("And now?", [])])
    where = {m: [i for i, t in enumerate(ids) if t == placeholder_id(model, m)] for m in ("image", "audio", "video")}
    assert all(len(w) == 1 for w in where.values())
    assert where["image"][0] < where["audio"][0] < where["video"][0]
    for r, m in zip(before, ("image", "audio", "video")):
        assert torch.equal(rec.embeds[0][0, where[m][0]], r.inputs[0].embeds[0])
    # The other rows are the plain token embeddings.
    others = [i for i in range(len(ids)) if i not in sum(where.values(), [])]
    with torch.no_grad():
        table = model.llm.get_input_embeddings()(torch.tensor(ids))
    assert torch.equal(rec.embeds[0][0, others], table[others])

    history = chat.history
    assert len(history) == 4
    chat.undo()
    assert chat.records == before and chat.history == history[:3]
    chat.reset()
    assert chat.records == [] and chat.history == []
    list(chat.send("Hello", output="text", temperature=0.0, max_new_tokens=4))
    ids = captured["ids"][0].tolist()
    assert not {placeholder_id(model, m) for m in PLACEHOLDER} & set(ids)
    assert "photo" not in model.tokenizer.decode(ids)


# ------------------------------------------------------------------ 6b. context fitting

K = {"image": 3, "video": 2, "audio": 1}
MAX_CONTEXT = 150
NEW = 6  # max_new_tokens of every turn


@pytest.fixture(scope="module")
def small_model():
    config = XVilaConfig.from_name("tiny-random").replace(max_context=MAX_CONTEXT, tokens_per_input=dict(K))
    return build_xvila(config)


def test_old_turns_are_dropped_whole_and_a_too_long_message_is_refused(small_model, files):
    m = small_model
    chat = m.new_chat()
    budget = MAX_CONTEXT - NEW - 24  # room for the reply and the longest generation run
    captured = []
    original_prompt = chat.prompt

    def prompt(record, sampling):
        ids, embeds = original_prompt(record, sampling)
        captured.append((ids[0].tolist(), embeds[0]))
        return ids, embeds

    chat.prompt = prompt
    keys = ["image0", "audio0", "video0", "image1", "audio1", "video1", "image0"]
    kept_counts = []
    for turn, key in enumerate(keys):
        list(chat.send(f"Turn {turn}: what is this?", media=[files[key]], output="text", temperature=0.0,
                       seed=turn, max_new_tokens=NEW))
        ids, embeds = captured[-1]
        assert len(ids) <= budget
        # The kept turns are the newest ones; find how many from the media rows.
        runs = []  # (modality, start, length) of each placeholder run, in order
        i = 0
        while i < len(ids):
            m_here = next((mm for mm in PLACEHOLDER if ids[i] == placeholder_id(m, mm)), None)
            if m_here is None:
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            runs.append((m_here, i, j - i))
            i = j
        records = chat.records  # this turn's record is the last
        n_kept = len(runs)  # one input per turn
        kept = records[len(records) - n_kept:]
        assert n_kept >= 1
        for (mod, start, length), r in zip(runs, kept):
            # Never a partial media run: exactly k copies, filled with that input's k embeddings.
            assert mod == r.inputs[0].modality and length == K[mod]
            assert torch.equal(embeds[start:start + length], r.inputs[0].embeds)
        assert ids == prompt_ids(m, chat, kept)  # whole turns, the newest ones
        decoded = m.tokenizer.decode(ids)
        assert f"Turn {turn}:" in decoded
        if n_kept < len(records):  # dropped as few as possible: one more turn would not fit
            assert f"Turn {len(records) - n_kept - 1}:" not in decoded
            assert len(prompt_ids(m, chat, records[len(records) - n_kept - 1:])) > budget
        kept_counts.append(n_kept)
    assert max(kept_counts) >= 2 and kept_counts[-1] < len(keys)  # turns were kept, then dropped

    before, history = list(chat.records), chat.history
    with pytest.raises(ContextOverflowError):
        next(chat.send("A dog is barking in the park. " * 20, media=[files["image1"]], max_new_tokens=NEW))
    assert chat.records == before and chat.history == history
    # The budget counts the reply: a short message with a huge max_new_tokens is refused too.
    with pytest.raises(ContextOverflowError):
        next(chat.send("Hi", max_new_tokens=MAX_CONTEXT))
    assert chat.records == before and chat.history == history


# ------------------------------------------------------------------ 9. static cache


@pytest.fixture(scope="module")
def second_turn_prompt(model, files):
    """Embeddings of a second-turn prompt (an image and a reply in the history)."""
    chat = model.new_chat()
    list(chat.send("What is in this photo?", media=[files["image0"]], output="text", temperature=0.0, max_new_tokens=6))
    return chat.prompt(Record("Make one like it.", []), Sampling(max_new_tokens=32))[1]


@pytest.mark.parametrize("output", [None, "image", "video", "audio"])
def test_static_cache_matches_the_dynamic_cache(model, second_turn_prompt, output):
    embeds = second_turn_prompt
    sampling = Sampling(max_new_tokens=32, temperature=0.0)
    dynamic = list(Engine(model).generate(embeds, sampling, output=output))
    static = list(Engine(model, static_cache=True).generate(embeds, sampling, output=output))
    assert [(s.token_id, s.modality) for s in static] == [(s.token_id, s.modality) for s in dynamic]
    assert len(dynamic) > 1
    if output is not None:
        assert dynamic[-1].modality == output
    for a, b in zip(static, dynamic):
        if a.modality:
            torch.testing.assert_close(a.states, b.states, atol=1e-5, rtol=1e-5)
            with torch.no_grad():
                ca, cb = model.p_out[a.modality](a.states[None]), model.p_out[b.modality](b.states[None])
            torch.testing.assert_close(ca, cb, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ regressions (bugs found and fixed)


def boost(monkeypatch, token_id: int) -> None:
    """Makes `token_id` the model's favourite token wherever sampling may choose it."""
    original = Engine._sample

    def sample(logits, s, rng, banned):
        logits = logits.clone()
        logits[token_id] += 1e4
        return original(logits, s, rng, banned)

    monkeypatch.setattr(Engine, "_sample", staticmethod(sample))


def test_replies_never_contain_media_placeholders(model, files, monkeypatch):
    boost(monkeypatch, placeholder_id(model, "image"))
    chat = model.new_chat()
    rec = Recorder(chat)
    list(chat.send("What is in this photo?", media=[files["image0"]], output="text", temperature=0.0,
                   max_new_tokens=6))
    first_reply = rec.reply_ids(model)
    list(chat.send("And now?", output="text", temperature=0.0, max_new_tokens=6))
    placeholders = {placeholder_id(model, m) for m in PLACEHOLDER}
    assert not placeholders & set(first_reply) and not placeholders & set(rec.reply_ids(model))


@pytest.mark.parametrize("limit", ["max_new_tokens", "max_context"])
def test_an_unforced_run_is_only_started_when_it_fits(model, monkeypatch, limit):
    boost(monkeypatch, gen_ids(model, "video")[0])
    ids = model.tokenizer("A cat sits on a mat.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        embeds = model.splice(ids, {})
    if limit == "max_new_tokens":
        steps = list(Engine(model).generate(embeds, Sampling(max_new_tokens=5, temperature=0.0)))
        bound = 5
    else:
        steps = list(Engine(model, static_cache=True).generate(
            embeds, Sampling(max_new_tokens=100, temperature=0.0), max_context=ids.shape[1] + 5))
        bound = 5
    produced = sum(1 if s.modality is None else len(s.states) for s in steps)
    assert produced <= bound


def test_a_stream_closed_early_leaves_a_well_formed_history(model):
    chat = model.new_chat()
    stream = chat.send("Hello there", output="text", temperature=1.0, seed=0, max_new_tokens=20)
    assert next(stream).kind == "text"
    stream.close()
    assert all(r.assistant is not None for r in chat.records)


# ------------------------------------------------------------------ history as plain data
def test_history_exports_to_plain_data_and_imports_into_another_chat(model, files, tmp_path):
    chat = model.new_chat(outputs_dir=tmp_path)
    list(chat.send("What is in this video?", media=[files["video0"]], output="text", temperature=0.0, max_new_tokens=6))
    list(chat.send("Make a picture of it.", output="image", compare=True, temperature=0.0, max_new_tokens=6))
    data = chat.export_history()
    # Only plain values cross a process boundary: text and bytes, no tensors or objects.
    assert set(data) == {"json", "safetensors"}
    assert isinstance(data["json"], str) and isinstance(data["safetensors"], bytes)
    assert "What is in this video?" in data["json"]

    other = model.new_chat(outputs_dir=tmp_path)
    other.import_history(pickle.loads(pickle.dumps(data)))
    assert other.history == chat.history
    for a, b in zip(chat.records, other.records):
        assert [(i.modality, i.source) for i in a.inputs] == [(i.modality, i.source) for i in b.inputs]
        for x, y in zip(a.inputs, b.inputs):
            assert torch.equal(x.embeds, y.embeds)
            assert (x.highway is None) == (y.highway is None) and (x.highway is None or torch.equal(x.highway, y.highway))
        assert [(e.kind, e.modality, e.path, e.variant) for e in a.outputs] == \
               [(e.kind, e.modality, e.path, e.variant) for e in b.outputs]
        for e, f in zip(a.outputs, b.outputs):
            assert torch.equal(e.condition, f.condition) and torch.equal(e.states, f.states)
    assert [e.variant for e in chat.records[1].outputs] == ["TA", "TA+VEH"]  # the two share one condition
    # The next prompt is the same from either chat, embeddings included.
    nxt = Record("And now?", [])
    ids_a, embeds_a = chat.prompt(nxt, Sampling(max_new_tokens=8))
    ids_b, embeds_b = other.prompt(nxt, Sampling(max_new_tokens=8))
    assert torch.equal(ids_a, ids_b) and torch.equal(embeds_a, embeds_b)
    # The highway source survives too: a video input's E_vis.
    assert other.records[0].inputs[0].highway is not None


@pytest.mark.parametrize("data", [{}, {"json": "{", "safetensors": b""}, {"json": "{\"format\": 99}", "safetensors": b""},
                                  {"json": "{\"format\": 1, \"turns\": []}", "safetensors": b"not safetensors"}])
def test_importing_something_else_is_a_history_error_and_keeps_the_history(model, data):
    chat = model.new_chat()
    list(chat.send("Hello", output="text", temperature=0.0, max_new_tokens=3))
    before = chat.history
    with pytest.raises(HistoryError, match="not a chat history"):
        chat.import_history(data)
    assert isinstance(HistoryError("x"), XVilaError) and chat.history == before
