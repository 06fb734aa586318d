"""X-VILA demo: any-to-any chat with the visual embedding highway.

    python app.py [--checkpoint NAME_OR_PATH] [--device cuda|cpu] [--4bit] [--offload]
                  [--port N] [--share] [--host ADDR] [--concurrency N] [--max-file-size SIZE]

Without --checkpoint it serves `toy`, the X-VILA trained on the toy world of coloured
shapes, shipped in `assets/toy/xvila/` (offline, on any machine; made by `python -m
train.toy base`, then `python -m train.toy xvila`); a checkpoint that cannot be loaded -
`toy` too, in a checkout or package without its assets - is explained in one terminal line
and replaced by the preset `tiny-random` (untrained, random weights). UI code only: the model is
reached through `xvila`'s public names and nothing is loaded at import time (`build(model)`
makes the page for a model you already have).

Each browser tab or API client is a session with its own chat and its own folder of files
(uploads and generated media), under a random name that no other client is told; the
folder is deleted when the tab closes, when an API client calls `/end_session`, or after
`SESSION_TTL` idle seconds. Turns run on a queue with a concurrency limit (one at a time by
default) so that the GPU is never shared by two generations, and a session runs one turn at
a time whatever the limit: a second call while its turn runs is refused with a message.
"""

from __future__ import annotations

import argparse
import atexit
import html
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Gradio phones home (analytics, version checks) unless told not to; the demo must start
# the same with or without a network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

try:  # ZeroGPU on Hugging Face Spaces: `spaces.GPU` leases a GPU per call (a no-op elsewhere)
    import spaces
except ImportError:  # not on a Space: run on whatever device the model is on
    spaces = None

from xvila import XVilaError  # noqa: E402
from xvila.toy import world  # noqa: E402  (numpy and PIL only: the example scenes and what the toy knows)

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
DEFAULT = "toy"  # the shipped toy-world model: offline, answers sensibly about its world
FALLBACK = "tiny-random"  # when nothing else loads: builds in seconds on a CPU, no download
TOY = ("toy", "toy-base")  # model names (config.name) of the toy world's models
# The toy's decoders make the world's 1 s clips (8 frames at 8 fps) and were measured at
# 20 steps, guidance 5 (train/toy/measure.py); longer outputs would be extrapolation.
TOY_SETTINGS = dict(steps=20, guidance=5.0, video_frames=world.FRAMES, audio_seconds=world.AUDIO_SECONDS)
EXAMPLES = ASSETS / "world"  # written by assets/make_examples.py
SESSION_TTL = 2 * 3600  # seconds an idle session (an API client that never says goodbye) is kept
REPLY_WITH = ["auto", "text", "image", "video", "audio"]
ALPHA_INFO = ("α: the share of denoising steps, the last and least noisy ones (t < α·T), on which the "
              "input's visual features steer the image/video decoder; 0 = off, 1 = every step.")
# A gallery inside a chat message keeps a fixed height; let it fit its thumbnails instead.
# The toy's pictures are 64 px: shown at least 256 px wide, upscaled without smoothing (nearest
# neighbour) in the page only - the files stay exactly what the model made.
CSS = """
#xvila-chat .gallery-container .grid-wrap { height: auto !important; min-height: 0 !important; }
#xvila-chat .gallery-container .grid-container { max-width: 540px; }
#xvila-chat img, #xvila-chat video { image-rendering: pixelated; min-width: 256px; }
#xvila-chat .gallery-container img { min-width: 0; }
"""


# ------------------------------------------------------------------------------ settings
@dataclass
class Options:
    """Everything a turn can be asked for, in the order of the UI controls and API parameters."""

    reply_with: str = "auto"
    highway: bool = True
    alpha: float = 0.6
    compare: bool = False
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    video_frames: int = 16
    audio_seconds: float = 5.0
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256

    def send_kwargs(self) -> dict:
        """Keyword arguments of `Chat.send` (plain values: they may cross a process boundary)."""
        from xvila.decoders.base import DecodeSettings

        decode = DecodeSettings(steps=int(self.steps), guidance=float(self.guidance),
                                frames=int(self.video_frames), seconds=float(self.audio_seconds))
        # A comparison renders TA+VEH at α even with the switch off: that is what is compared.
        highway = bool(self.highway) or bool(self.compare)
        return dict(output=None if self.reply_with == "auto" else self.reply_with, highway=highway,
                    alpha=float(self.alpha), seed=int(self.seed), compare=bool(self.compare), decode=decode,
                    max_new_tokens=int(self.max_new_tokens), temperature=float(self.temperature),
                    top_p=float(self.top_p))


# ------------------------------------------------------------------------------ sessions
@dataclass
class Medium:
    modality: str
    variant: str
    path: str


@dataclass
class ShownTurn:
    """One exchange as the page shows it."""

    text: str
    inputs: list[str] = field(default_factory=list)  # the session's copies of the uploads
    reply: str = ""
    media: list[Medium] = field(default_factory=list)
    progress: tuple[str, str, int, int] | None = None  # modality, variant, step, steps
    error: str | None = None
    stopped: bool = False
    done: bool = False
    in_chat: bool = False  # the model's history holds this turn (undo must drop it there too)
    options: Options = field(default_factory=Options)


class Session:
    """One browser tab or API client: its chat history, its files, its stop flag."""

    def __init__(self, model, root: Path):
        self.folder = root / secrets.token_hex(16)  # unguessable: its files' URLs are capabilities
        (self.folder / "inputs").mkdir(parents=True)
        self.chat = model.new_chat(outputs_dir=self.folder / "outputs")
        self.turns: list[ShownTurn] = []
        self.started = 0  # turns started: each writes to a folder of its own, never reused
        self.stop = threading.Event()
        self.busy = False  # a turn (or an undo/clear) holds the session: see claim()
        self._claim_lock = threading.Lock()
        self.closed = False
        self.last_used = time.monotonic()

    def claim(self) -> bool:
        """Take the session for one turn, atomically; False when a turn already holds it.
        With --concurrency above 1 two calls of one client can run at once, and both would
        write one history: the second is refused instead (`SessionBusy`)."""
        with self._claim_lock:
            if self.busy:
                return False
            self.busy = True
            return True

    def release(self) -> None:
        self.busy = False
        if self.closed:  # the tab closed or the client said goodbye while the turn ran
            self.remove_files()

    def keep(self, upload: str) -> str:
        """A copy of an uploaded file in the session's folder (a hard link where possible)."""
        if Path(upload).resolve().is_relative_to(self.folder.resolve()):  # a retried turn's own copy
            return upload
        name = re.sub(r"[^\w.-]", "_", Path(upload).name)[-80:] or "upload"
        target = self.folder / "inputs" / f"{len(list((self.folder / 'inputs').iterdir())):03d}-{name}"
        try:
            os.link(upload, target)
        except OSError:
            shutil.copyfile(upload, target)
        return str(target)

    def reset(self) -> None:
        self.chat.reset()
        self.turns.clear()
        for sub in ("inputs", "outputs"):
            shutil.rmtree(self.folder / sub, ignore_errors=True)
        (self.folder / "inputs").mkdir(parents=True, exist_ok=True)

    def remove_files(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class SessionBusy(XVilaError):
    """A second turn of a session while its first one still runs."""


BUSY = "A reply is still being generated in this session: wait for it, or press stop."


class Sessions:
    """Sessions by Gradio's session hash; closed on tab close, on request, or when idle."""

    def __init__(self, model, root: Path, ttl: float = SESSION_TTL):
        self.model, self.root, self.ttl = model, root, ttl
        self._by_hash: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, request: gr.Request) -> Session:
        key = request.session_hash or "default"
        with self._lock:
            self._sweep()
            session = self._by_hash.get(key)
            if session is None:
                session = self._by_hash[key] = Session(self.model, self.root)
            session.last_used = time.monotonic()
            return session

    def close(self, key: str | None) -> None:
        with self._lock:
            session = self._by_hash.pop(key or "default", None)
        if session is not None:
            session.closed = True
            session.stop.set()
            if not session.busy:  # else the running turn removes them when it stops
                session.remove_files()

    def _sweep(self) -> None:
        now = time.monotonic()
        for key, s in list(self._by_hash.items()):
            if not s.busy and now - s.last_used > self.ttl:
                del self._by_hash[key]
                s.closed = True
                s.remove_files()


# ------------------------------------------------------------------------------ one turn
def gpu_task(fn):
    """`spaces.GPU` on ZeroGPU (the function then runs in a GPU worker process; arguments and
    yielded values are pickled, hence plain values, and the history as `Chat.export_history`
    data, passed in and out)."""
    return spaces.GPU(duration=120)(fn) if spaces is not None else fn


def make_sender(model):
    @gpu_task
    def send(history: dict, system_prompt: str, outputs_dir: str, text: str, media: list[str], kwargs: dict):
        """Runs `Chat.send` after `history` (`Chat.export_history` data); yields plain dicts:
        the history once the turn is accepted (so that a stopped turn stays in it) and last."""
        chat = model.new_chat(system_prompt, outputs_dir=outputs_dir)
        chat.import_history(history)
        accepted = False
        for ev in chat.send(text, media=media, **kwargs):
            if not accepted:  # the first event: the input was read and the turn joined the history
                accepted = True
                yield {"kind": "history", "history": chat.export_history()}
            yield {"kind": ev.kind, "text": ev.text, "modality": ev.modality, "path": ev.path,
                   "variant": ev.variant, "step": ev.step, "steps": ev.steps}
        yield {"kind": "history", "history": chat.export_history()}

    return send


def run_turn(session: Session, send, text: str, uploads: list[str], options: Options,
             retry: bool = False) -> Iterator[ShownTurn]:
    """Streams one turn as snapshots of its `ShownTurn`: after each token, denoising step and medium.

    One turn at a time per session, on every path: a call while another turn of the session
    runs raises `SessionBusy` before anything changes. `retry` replaces the last turn with a
    new run of its text and inputs (`text` and `uploads` are then ignored). Bad input ends
    the turn with `error` set and leaves the model's history as it was; the stop flag ends it
    between two tokens or two denoising steps (closing `Chat.send`'s generator there),
    keeping what was generated so far."""
    if not session.claim():
        raise SessionBusy(BUSY)
    try:
        if retry:
            if not session.turns:
                return
            last = pop_turn(session)
            text, uploads = last.text, last.inputs
        yield from _turn(session, send, text, uploads, options)
    finally:
        session.release()


def pop_turn(session: Session) -> ShownTurn:
    """The last turn, taken off the page and (when it got there) the model's history."""
    last = session.turns.pop()
    if last.in_chat:
        session.chat.undo()
    return last


def _turn(session: Session, send, text: str, uploads: list[str], options: Options) -> Iterator[ShownTurn]:
    session.stop.clear()
    turn = ShownTurn(text=text or "", options=options)
    session.turns.append(turn)
    turn.inputs = [session.keep(u) for u in uploads]
    if not turn.text.strip() and not turn.inputs:
        turn.error = "The message is empty: type something, or attach an image, a video or an audio file."
        turn.done = True
        yield turn
        return
    chat = session.chat
    before = len(chat.history)
    # Its own folder per turn: after an undo the chat numbers files from the same count again,
    # and a browser must never be shown an old picture from its cache under a reused name.
    session.started += 1
    outputs = session.folder / "outputs" / f"turn-{session.started:04d}"
    events = send(chat.export_history(), chat.system_prompt, str(outputs), turn.text, turn.inputs,
                  options.send_kwargs())
    try:
        for ev in events:
            kind = ev["kind"]
            if kind == "history":
                chat.import_history(ev["history"])
                continue
            if kind == "text":
                turn.reply += ev["text"]
            elif kind == "progress":
                turn.progress = (ev["modality"], ev["variant"], ev["step"], ev["steps"])
            elif kind == "media" and ev["path"]:
                turn.progress = None
                turn.media.append(Medium(ev["modality"], ev["variant"], ev["path"]))
            yield turn
            if session.stop.is_set():
                turn.stopped = True
                break
    except XVilaError as err:  # unreadable media, a message too long for the context, ...
        turn.error = str(err)
    except Exception as err:  # a bug or the GPU running out: say so, keep serving
        traceback.print_exc()
        turn.error = f"the turn failed ({type(err).__name__}: {err}); the server log has the details"
    finally:
        events.close()  # stops generation here if we left the loop early
        turn.in_chat = len(chat.history) > before  # Chat.send keeps a turn once its input is accepted
        if turn.in_chat and chat.records[-1].assistant is None:  # stopped before Chat.send could close it
            chat.records[-1].assistant = turn.reply
    turn.progress, turn.done = None, True
    yield turn


# ------------------------------------------------------------------------------ rendering
def _caption(m: Medium, o: Options, done: bool) -> str:
    if m.variant == "TA+VEH":
        how = f"TA+VEH, α {o.alpha:.2f}"
    elif done and m.modality in ("image", "video") and (o.highway or o.compare) and o.alpha > 0:
        how = "TA (no visual input in the chat, so no highway)"
    else:
        how = m.variant
    return f"*{m.modality} · {how} · seed {int(o.seed)}*"


def _media_content(turn: ShownTurn) -> list:
    """Generated media: a TA / TA+VEH pair side by side in a labelled gallery, others inline."""
    out, media, i = [], turn.media, 0
    while i < len(media):
        m = media[i]
        pair = i + 1 < len(media) and m.variant == "TA" and media[i + 1].variant == "TA+VEH" \
            and media[i + 1].modality == m.modality
        if pair:
            ta, veh = m, media[i + 1]
            out.append(gr.Gallery([(ta.path, "TA"), (veh.path, f"TA+VEH (α {turn.options.alpha:.2f})")],
                                  label=f"{m.modality}: TA vs TA+VEH, seed {int(turn.options.seed)}",
                                  columns=2, height="auto", object_fit="contain"))
            i += 2
        else:
            out += [{"path": m.path}, _caption(m, turn.options, turn.done)]
            i += 1
    return out


def to_messages(turns: list[ShownTurn]) -> list[dict]:
    messages = []
    for turn in turns:
        user = ([turn.text] if turn.text.strip() else []) + [{"path": p} for p in turn.inputs]
        if user:
            messages.append({"role": "user", "content": user})
        content: list = [turn.reply] if turn.reply.strip() else []
        if turn.progress:
            modality, variant, step, steps = turn.progress
            content.append(f'<progress value="{step}" max="{steps}"></progress> '
                           f"generating {modality} ({variant}): step {step}/{steps}")
        content += _media_content(turn)
        if turn.error:
            content.append(f"⚠️ {html.escape(turn.error)}")
        if turn.stopped:
            content.append("⏹ *stopped*")
        if content:
            messages.append({"role": "assistant", "content": content})
    return messages


SEVEN_B = ("The paper's architecture at full size (Vicuna-7B, ImageBind-huge, SD 1.5, VideoCrafter2, AudioLDM): "
           "`python app.py --checkpoint xvila-7b` on a GPU with about 48 GB (`--4bit --offload` fits 24 GB); "
           "its projections are untrained until trained X-VILA weights exist.")


def toy_knowledge() -> str:
    """What the toy model knows, from the world itself (so the page never drifts from it)."""
    return (f"It knows one small world and nothing else: scenes of one or two shapes "
            f"({', '.join(world.SHAPES)}) in {len(world.COLOURS)} colours ({', '.join(world.COLOURS)}) on a "
            f"coloured background, {', '.join(world.MOTION_WORDS.values())}, and their sounds (each colour "
            "its own pitch, each shape its own rhythm). Ask what a picture, clip or sound shows, or ask for a "
            "picture, a video or a sound of such a scene; the examples below are scenes of that world.")


def header(source: str, device: str, untrained: bool, note: str | None, toy: bool = False) -> str:
    lines = [
        "# X-VILA · any-to-any chat",
        "Send text with any number of images, videos and audio clips; the reply can be text, an "
        "image, a video or audio. The visual embedding highway (VEH) carries your picture's or "
        "video's own features into the image/video decoder.",
        f"**Serving `{source}` on `{device}`.**",
    ]
    if toy:
        lines[-1] += (" This is the **toy model**: X-VILA's recipe run on CPUs at toy size (SmolLM2-135M and "
                      "small diffusion decoders, 64 px pictures), not the paper's 7B model. " + toy_knowledge())
    if untrained:
        lines[-1] += (" ⚠️ **Untrained**: a tiny model with random weights, so its words and media are "
                      "noise. It shows how the demo works; `python app.py` serves the trained toy model "
                      "where it is in the checkout.")
    if note:
        lines.append(f"⚠️ {html.escape(note)}")
    lines.append(SEVEN_B)
    return "\n\n".join(lines)


def demo_defaults(model) -> "Options":
    """The page's starting settings: the decoders' defaults, the checkpoint's α, and the
    toy world's clip length and measured settings when serving a toy model."""
    from xvila.decoders.base import DecodeSettings

    d = DecodeSettings()
    base = dict(alpha=model.config.highway_alpha, steps=d.steps, guidance=d.guidance, video_frames=d.frames,
                audio_seconds=d.seconds)
    return Options(**{**base, **(TOY_SETTINGS if model.config.name in TOY else {})})


# ------------------------------------------------------------------------------ the page
class Handlers:
    """The page's event handlers; each finds the caller's session from its request."""

    def __init__(self, sessions: Sessions, send):
        self.sessions, self.send = sessions, send

    def _stream(self, session: Session, text: str, uploads: list[str], options: Options, retry: bool = False):
        # While a turn runs, the box's send button becomes a stop button.
        busy = gr.MultimodalTextbox(value=None, submit_btn=False, stop_btn=True)
        try:
            for _ in run_turn(session, self.send, text, uploads, options, retry=retry):
                yield to_messages(session.turns), busy
        except SessionBusy as err:  # raised before the turn starts: nothing changed
            gr.Warning(str(err))
            yield to_messages(session.turns), gr.MultimodalTextbox()
            return
        yield to_messages(session.turns), gr.MultimodalTextbox(submit_btn=True, stop_btn=False)

    def respond(self, request: gr.Request, message: dict | None, *values):
        session, message = self.sessions.get(request), message or {}
        yield from self._stream(session, message.get("text") or "", list(message.get("files") or []), Options(*values))

    def retry(self, request: gr.Request, *values):
        yield from self._stream(self.sessions.get(request), "", [], Options(*values), retry=True)

    def undo(self, request: gr.Request):
        session = self.sessions.get(request)
        if not session.claim():
            return to_messages(session.turns), gr.MultimodalTextbox()
        try:
            if not session.turns:
                return to_messages(session.turns), gr.MultimodalTextbox()
            last = pop_turn(session)
            return to_messages(session.turns), {"text": last.text, "files": last.inputs}  # back in the box
        finally:
            session.release()

    def clear(self, request: gr.Request):
        session = self.sessions.get(request)
        if not session.claim():
            gr.Warning("A reply is still being generated: press stop first, then clear.")
            return to_messages(session.turns)
        try:
            session.reset()
        finally:
            session.release()
        return to_messages(session.turns)

    def stop(self, request: gr.Request):
        self.sessions.get(request).stop.set()

    def api_chat(self, message: dict | None, reply_with: str, highway: bool, alpha: float, compare: bool,
                 steps: int, guidance: float, seed: int, video_frames: int, audio_seconds: float,
                 temperature: float, top_p: float, max_new_tokens: int, request: gr.Request):
        """One turn of this client's chat: streams (reply text so far, generated files so far).
        `message` is {"text": ..., "files": [...]}; bad input raises an error with the reason."""
        session, message = self.sessions.get(request), message or {}
        options = Options(reply_with, highway, alpha, compare, steps, guidance, seed, video_frames,
                          audio_seconds, temperature, top_p, max_new_tokens)
        turn = None
        try:
            for turn in run_turn(session, self.send, message.get("text") or "", list(message.get("files") or []),
                                 options):
                if not turn.error:
                    yield turn.reply, [m.path for m in turn.media]
        except SessionBusy as err:  # another call of this client is still running its turn
            raise gr.Error(str(err), print_exception=False) from None
        if turn is not None and turn.error:
            raise gr.Error(turn.error, print_exception=False)

    def history(self, request: gr.Request) -> list[dict]:
        """This session's turns: user text, reply text, file names of inputs and outputs, error."""
        return [{"user": t.text, "reply": t.reply, "inputs": [Path(p).name for p in t.inputs],
                 "outputs": [Path(m.path).name for m in t.media], "error": t.error,
                 "options": asdict(t.options)} for t in self.sessions.get(request).turns]

    def end_session(self, request: gr.Request) -> None:
        """Forget this session's chat and delete its files now (a closed tab does this too)."""
        self.sessions.close(request.session_hash)


def build(model, *, source: str | None = None, note: str | None = None, concurrency: int = 1,
          session_ttl: float = SESSION_TTL) -> gr.Blocks:
    """The demo page for `model` (an `XVila`). `source` names it in the header; `note` says
    why it is not the checkpoint that was asked for. Launch it with `css=CSS`."""
    defaults = demo_defaults(model)
    gpu = dict(concurrency_id="gpu", concurrency_limit=concurrency)  # one queue for every generation
    source = source or model.config.name
    if model.config.name == "toy-base":  # the recipe's starting point, not the shipped model
        note = " ".join(filter(None, [note, "toy-base is the world's trained base parts with untrained X-VILA "
                                      "projections and LoRA (where `python -m train.toy xvila` starts), so its "
                                      "replies do not yet follow the inputs."]))
    with gr.Blocks(title="X-VILA", delete_cache=(3600, 24 * 3600)) as demo:
        demo.xvila_sessions = Sessions(model, Path(demo.GRADIO_CACHE) / "xvila-sessions", session_ttl)
        on = Handlers(demo.xvila_sessions, make_sender(model))
        gr.Markdown(header(source, str(model.device), source == FALLBACK, note, model.config.name in TOY),
                    elem_id="xvila-header")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=560, elem_id="xvila-chat",
                                     buttons=["copy", "copy_all"], feedback_options=None,
                                     placeholder="Ask something, or attach a picture, a video or a sound.")
                msg = gr.MultimodalTextbox(
                    placeholder="Type a message; attach images, videos or audio, or record with the microphone",
                    file_count="multiple", sources=["upload", "microphone"], show_label=False,
                    submit_btn=True, stop_btn=False, elem_id="xvila-input")
                reply_with = gr.Radio(REPLY_WITH, value="auto", label="Reply with",
                                      info="auto: the model decides; otherwise the reply ends with that medium")
            with gr.Column(scale=1, min_width=280):
                controls = [reply_with, *highway_controls(defaults), *generation_controls(defaults)]
        gr.Examples(examples_of(), inputs=[msg, reply_with],
                    label="Examples: scenes of the toy world (assets/world/, drawn by xvila.toy.world)")
        # The API endpoint's outputs and trigger (not shown on the page).
        api_out = [gr.Textbox(label="reply", visible=False), gr.File(label="media", file_count="multiple", visible=False)]
        api_trigger = gr.Button(visible=False)

        msg.submit(on.respond, [msg, *controls], [chatbot, msg], api_visibility="private", **gpu)
        msg.stop(on.stop, None, None, queue=False, api_visibility="private")
        chatbot.retry(on.retry, controls, [chatbot, msg], api_visibility="private", **gpu)
        chatbot.undo(on.undo, None, [chatbot, msg], queue=False, api_visibility="private")
        chatbot.clear(on.clear, None, chatbot, queue=False, api_visibility="private")
        api_trigger.click(on.api_chat, [msg, *controls], api_out, api_name="chat", **gpu)
        gr.api(on.history, api_name="history", queue=False)
        gr.api(on.end_session, api_name="end_session", queue=False)
        demo.unload(on.end_session)  # a closed tab
    return demo


def highway_controls(d: Options) -> list:
    gr.Markdown("### Visual embedding highway")
    return [
        gr.Checkbox(value=True, label="VEH on", elem_id="xvila-veh"),
        gr.Slider(0, 1, value=d.alpha, step=0.05, label="α (conditioning rate)", info=ALPHA_INFO, elem_id="xvila-alpha"),
        gr.Checkbox(value=False, label="Compare TA vs TA+VEH (same turn, same seed)", elem_id="xvila-compare"),
    ]


def generation_controls(d: Options) -> list:
    with gr.Accordion("Generation settings", open=False, elem_id="xvila-settings"):
        return [
            gr.Slider(1, 100, value=d.steps, step=1, label="Denoising steps", elem_id="xvila-steps"),
            gr.Slider(1, 15, value=d.guidance, step=0.5, label="Guidance scale"),
            gr.Number(value=d.seed, precision=0, label="Seed", minimum=0),
            gr.Slider(1, 64, value=d.video_frames, step=1, label="Video frames"),
            gr.Slider(0.5, 10, value=d.audio_seconds, step=0.5, label="Audio seconds"),
            gr.Slider(0, 2, value=d.temperature, step=0.05, label="Temperature"),
            gr.Slider(0.05, 1, value=d.top_p, step=0.05, label="Top-p"),
            gr.Slider(8, 1024, value=d.max_new_tokens, step=8, label="Max new tokens"),
        ]


# (prompt, files in assets/world/, reply with): every answer is a fact of the scene the file
# shows, asked as the toy's training data asks (train/toy/data.py, train/builders.py) (assets/make_examples.py: red circle on blue, a green star moving up on yellow, the
# sound of a large blue square on white).
WORLD_EXAMPLES = [
    ("What is this?", ["red-circle.png"], "text"),
    ("How is it moving?", ["green-star-up.mp4"], "text"),
    ("What made this sound?", ["blue-square.wav"], "text"),
    ("Draw a blue square on a yellow background.", [], "image"),
    ("Make a video that starts from this image.", ["red-circle.png"], "video"),
    ("What would this video sound like? Please generate its audio.", ["green-star-up.mp4"], "audio"),
    ("Can you draw a picture of what makes this sound?", ["blue-square.wav"], "image"),
]


def examples_of() -> list[list]:
    return [[{"text": text, "files": [str(EXAMPLES / f) for f in files]}, reply] for text, files, reply in WORLD_EXAMPLES]


# ------------------------------------------------------------------------------ start-up
def default_checkpoint() -> str:
    return DEFAULT


def requested_source(checkpoint: str | None, four_bit: bool) -> tuple[str, str | None]:
    """(what to load, a note for the terminal) for --checkpoint and --4bit."""
    source = checkpoint or default_checkpoint()
    if not four_bit or source.endswith("-4bit"):
        return source, None
    if source == "xvila-7b":
        return "xvila-7b-4bit", None
    return source, f"--4bit applies to the preset xvila-7b only; {source} loads as it was saved"


def _advice(err: BaseException) -> str:
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return "not enough GPU memory: try --4bit and/or --offload, or a larger GPU"
    if isinstance(err, XVilaError):
        return "check the name or path, or download the weights once with a network"
    return "check the checkpoint name or path and the device (--device cpu runs without a GPU)"


def load_model(checkpoint: str | None, device: str | None, four_bit: bool = False, offload: bool = False):
    """(model, source shown in the header, note) — the requested checkpoint, or FALLBACK with
    the reason printed in one line when it cannot be loaded."""
    from xvila import XVila

    source, note = requested_source(checkpoint, four_bit)
    if note:
        print(f"x-vila: {note}.", file=sys.stderr)
    try:
        return XVila.from_pretrained(source, device=device, offload_decoders=offload), source, None
    except Exception as err:  # any load failure: say why, serve the offline default
        why = " ".join(str(err).split()) or type(err).__name__
        advice = "" if source == DEFAULT else f"; {_advice(err)}"  # the toy's own message says how to make it
        line = (f"could not load {source} ({type(err).__name__}: {why}){advice}. "
                f"Serving {FALLBACK} (untrained, random weights) instead.")
        print(f"x-vila: {line}", file=sys.stderr, flush=True)
        note = (f"The toy model is not in this checkout, so this is {FALLBACK}; `python -m train.toy xvila` trains it."
                if source == DEFAULT else f"{source} could not be loaded: see the terminal.")
        return XVila.from_pretrained(FALLBACK, device="cpu"), FALLBACK, note


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; XVILA_CHECKPOINT, XVILA_DEVICE, XVILA_4BIT and XVILA_OFFLOAD set
    their defaults (a Space runs `python app.py` without arguments)."""
    env = os.environ.get
    p = argparse.ArgumentParser(description="X-VILA demo: any-to-any chat in the browser.")
    p.add_argument("--checkpoint", default=env("XVILA_CHECKPOINT") or None,
                   help="toy (the shipped toy-world model), a preset (xvila-7b, xvila-7b-4bit, toy-base, "
                        "tiny-random), a checkpoint folder or a Hub repo id; default: toy (tiny-random when it "
                        "is not in the checkout)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=env("XVILA_DEVICE") or None,
                   help="default: cuda when available")
    p.add_argument("--4bit", dest="four_bit", action="store_true", default=_env_flag("XVILA_4BIT"),
                   help="the LLM in 4-bit NF4 (preset xvila-7b-4bit)")
    p.add_argument("--offload", action="store_true", default=_env_flag("XVILA_OFFLOAD"),
                   help="keep the decoders on the CPU between requests")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--concurrency", type=int, default=1, help="turns generated at once (default 1)")
    p.add_argument("--max-file-size", default="200mb", help="largest upload accepted (default 200mb)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.environ.get("GRADIO_TEMP_DIR"):  # uploads and session files: a folder of our own
        os.environ["GRADIO_TEMP_DIR"] = workdir = tempfile.mkdtemp(prefix="xvila-demo-")
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped server cleans up too
    print(f"x-vila: loading {args.checkpoint or default_checkpoint()} ...", flush=True)
    model, source, note = load_model(args.checkpoint, args.device, args.four_bit, args.offload)
    print(f"x-vila: serving {source} on {model.device}.", file=sys.stderr, flush=True)
    demo = build(model, source=source, note=note, concurrency=args.concurrency)
    demo.queue(max_size=64).launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                                   max_file_size=args.max_file_size, allowed_paths=[])


if __name__ == "__main__":
    main()
