"""The demo: `python app.py` serves tiny-random offline; the chat works through gradio_client.

One server for the module, started the way the README says (plus a port and a small upload
limit), with every outbound connection pointed at a dead proxy. The start-up fallback, the
stop flag and the session bookkeeping are tested in-process on stubs, in milliseconds.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import astuple
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
FAST = dict(steps=2, video_frames=4, audio_seconds=0.5, max_new_tokens=16)  # seconds, not minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(tmp_path: Path, *args: str, timeout: float = 120):
    """`python app.py --port N *args` with no network; yields (base url, log file)."""
    port = _free_port()
    dead = "http://127.0.0.1:9"  # nothing listens there: any attempt to reach the internet fails
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead,
           "http_proxy": dead, "https_proxy": dead, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.pop("GRADIO_TEMP_DIR", None)  # the app makes a folder of its own
    log = tmp_path / f"app-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited early:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"app.py did not serve its page within {timeout} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Pinned to tiny-random (seconds to build) whether or not the toy model is in the checkout.
    with app_server(tmp_path_factory.mktemp("app"), "--checkpoint", "tiny-random", "--max-file-size", "1mb") as (url, log):
        yield url, log


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def chat(client, text, files=(), **options):
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    return client.predict(message, **{**FAST, **options}, api_name="/chat")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# ------------------------------------------------------------------------------ serving
def test_header_says_which_model_on_which_device_and_that_it_is_untrained(server):
    url, log = server
    status, body = get(url + "config")
    header = next(c["props"]["value"] for c in json.loads(body)["components"]
                  if c["props"].get("elem_id") == "xvila-header")
    assert "Serving `tiny-random` on `cpu`" in header and "Untrained" in header
    assert "x-vila: serving tiny-random on cpu." in log.read_text()


def test_a_text_turn_streams(client):
    job = client.submit({"text": "Hello there", "files": []}, reply_with="text", max_new_tokens=24,
                        api_name="/chat")
    updates = [reply for reply, files in job]
    assert len(updates) >= 3, updates  # many partial replies, not one final answer
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:]))  # each extends the last
    assert updates[-1] and job.outputs()[-1][1] == []  # text only: no files


def test_image_in_video_out_returns_an_mp4(client):
    from xvila import media

    reply, files = chat(client, "Make a video from this picture", [ASSETS / "lighthouse.png"], reply_with="video")
    (path,) = files
    assert path.endswith(".mp4") and "ta-veh" in Path(path).name  # a picture in the chat: the highway is used
    with av.open(path) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    assert media.read_video(path, with_audio=False).frames.shape[0] == FAST["video_frames"]


def test_the_readme_api_example_runs(server, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### From Python: `gradio_client`"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    code = code.replace("http://127.0.0.1:7860/", server[0]).replace("steps=25", "steps=2, video_frames=4")
    monkeypatch.chdir(ROOT)  # the example names assets/ relative to the repository
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["files"][0].endswith("-video-ta-veh.mp4")
    assert scope["client"].predict(api_name="/history") == []  # the example ends its session


def test_compare_gives_ta_and_ta_veh_from_the_same_seed(client):
    _, files = chat(client, "An image like this", [ASSETS / "waves.mp4"], reply_with="image", compare=True,
                    alpha=0.3, seed=7)
    assert [re.sub(r"^\d+-", "", Path(f).name) for f in files] == ["image-ta.png", "image-ta-veh.png"]
    (turn,) = client.predict(api_name="/history")
    assert turn["options"]["alpha"] == pytest.approx(0.3) and turn["options"]["seed"] == 7


def test_bad_input_is_explained_and_the_next_turn_works(client, tmp_path):
    from gradio_client.exceptions import AppError

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really a picture" * 10)
    with pytest.raises(AppError, match="broken.png"):
        chat(client, "What is in this picture?", [corrupt])
    with pytest.raises(AppError, match="empty"):
        chat(client, "   ")
    long_video = tmp_path / "long.mp4"
    _write_long_video(long_video, seconds=601)
    with pytest.raises(AppError, match="long.mp4"):
        chat(client, "Summarise this video", [long_video])
    reply, files = chat(client, "Then tell me a story", reply_with="text")
    assert reply and files == []
    turns = client.predict(api_name="/history")
    assert [bool(t["error"]) for t in turns] == [True, True, True, False]
    assert "601" in turns[2]["error"] or "600" in turns[2]["error"]  # says how long is too long


def _write_long_video(path: Path, seconds: int) -> None:
    """A 16x16 video at 1 fps: over the duration budget, yet made in a moment."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1)
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for i in range(seconds):
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_two_clients_keep_separate_histories_and_files(server):
    from gradio_client import Client

    url, _ = server
    a, b = (Client(url, verbose=False, download_files=False) for _ in range(2))
    _, (file_a,) = chat(a, "alpha", [ASSETS / "lighthouse.png"], reply_with="image")
    _, (file_b,) = chat(b, "beta", [ASSETS / "bell.wav"], reply_with="audio")
    assert [t["user"] for t in a.predict(api_name="/history")] == ["alpha"]
    assert [(t["user"], t["inputs"]) for t in b.predict(api_name="/history")] == [("beta", ["000-bell.wav"])]
    folder = re.compile(r"/xvila-sessions/([0-9a-f]{32})/outputs/")
    folder_a, folder_b = folder.search(file_a["path"]).group(1), folder.search(file_b["path"]).group(1)
    assert folder_a != folder_b
    url_a, url_b = url + file_a["url"].split("/", 3)[3], url + file_b["url"].split("/", 3)[3]
    assert get(url_a)[0] == 200 and get(url_b)[0] == 200
    a.predict(api_name="/end_session")  # A leaves: its files go, B's stay
    assert get(url_a)[0] in (403, 404) and get(url_b)[0] == 200
    assert a.predict(api_name="/history") == []  # a new, empty session


def test_no_file_outside_the_session_folders_can_be_fetched(server):
    from gradio_client import Client

    url, _ = server
    _, (made,) = chat(Client(url, verbose=False, download_files=False), "an image", reply_with="image")
    folder = made["path"].rsplit("/outputs/", 1)[0]  # .../xvila-sessions/<32 hex>
    root = folder.rsplit("/", 1)[0]
    assert get(url + made["url"].split("/", 3)[3])[0] == 200  # the session's own file is served
    host, port = url.split("/")[2].split(":")
    attempts = [
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=../../../../../../etc/passwd",
        "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"/gradio_api/file={folder}/../../../../../../etc/passwd",
        f"/gradio_api/file={root}",  # no listing of the sessions
        f"/gradio_api/file={folder}/outputs",
        f"/gradio_api/file={root}/{'0' * 32}/outputs/{Path(made['path']).name}",  # a guessed session
        f"/gradio_api/file={ROOT / 'app.py'}",
        f"/gradio_api/file={ASSETS / 'lighthouse.png'}",  # the app's own files are not served raw
        "/gradio_api/file=/proc/self/environ",
    ]
    for path in attempts:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", path)  # sent as written: no client-side normalisation of ".."
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status in (400, 403, 404), (path, r.status)
        assert b"root:" not in body and b"import gradio" not in body and b"PNG" not in body, path


def test_an_oversized_upload_is_refused_and_a_small_one_accepted(server):
    url, _ = server

    def upload(size: int) -> int:
        boundary = "xvilaboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.wav\"\r\n"
                f"Content-Type: audio/wav\r\n\r\n").encode() + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    assert upload(3 * 1024 * 1024) == 413  # the server runs with --max-file-size 1mb
    assert upload(10 * 1024) == 200


def test_concurrent_api_calls_of_one_session_do_not_interleave(tmp_path):
    """With --concurrency 4 the queue would run three calls of one client at once on one
    history; the session takes one turn at a time and refuses the others with a message."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    with app_server(tmp_path, "--concurrency", "4") as (url, _):
        client = Client(url, verbose=False)
        jobs = [client.submit({"text": f"call {i}", "files": []}, reply_with="text", max_new_tokens=600,
                              temperature=1.0, api_name="/chat") for i in range(3)]
        answered, refused = {}, []
        for i, job in enumerate(jobs):
            try:
                answered[f"call {i}"] = job.result()[0]
            except AppError as err:
                refused.append(str(err))
        history = client.predict(api_name="/history")
    assert refused and all("still being generated" in r for r in refused), refused
    assert len(answered) + len(refused) == 3 and answered
    # the history holds exactly the answered turns, each with its own whole reply
    assert {t["user"]: t["reply"] for t in history} == answered and len(history) == len(answered)
    assert all(t["error"] is None for t in history)


# ------------------------------------------------------------------------------ in-process
@pytest.fixture(scope="module")
def app():
    sys.path.insert(0, str(ROOT))
    import app as module

    return module


class StubChat:
    """The public history interface of `xvila.chat.Chat`, over a plain list."""

    def __init__(self, outputs_dir):
        self.records, self.system_prompt, self.outputs_dir = [], "", Path(outputs_dir)

    @property
    def history(self):
        return [(r.user, r.assistant) for r in self.records]

    def export_history(self):
        return {"records": [vars(r).copy() for r in self.records]}

    def import_history(self, data):
        self.records = [SimpleNamespace(**r) for r in data["records"]]

    def undo(self):
        self.records.pop()

    def reset(self):
        self.records.clear()


STUB_MODEL = SimpleNamespace(new_chat=lambda system_prompt=None, outputs_dir=None: StubChat(outputs_dir),
                             config=SimpleNamespace(name="stub", highway_alpha=0.45), device="cpu")


def test_stop_ends_the_turn_between_steps_and_keeps_what_was_made(app, tmp_path):
    session = app.Session(STUB_MODEL, tmp_path)
    consumed, closed = [], []

    def send(history, system_prompt, outputs_dir, text, media, kwargs):
        # As the real sender does once Chat.send accepted the input: the history with the turn.
        yield {"kind": "history", "history": {"records": history["records"] + [{"user": text, "assistant": None}]}}
        try:
            for i in range(1000):
                consumed.append(i)
                yield {"kind": "text", "text": f"w{i} "}
        finally:
            closed.append(True)

    turns = app.run_turn(session, send, "go", [], app.Options())
    for n, turn in enumerate(turns):
        if n == 2:
            session.stop.set()  # what the stop button does
    assert turn.stopped and turn.done and closed == [True]
    assert turn.reply == "w0 w1 w2 " and len(consumed) == 3  # not one step more
    assert turn.in_chat and not session.busy  # undo knows the chat holds the partial turn


def test_errors_leave_the_session_usable(app, tmp_path):
    from xvila.errors import XVilaError

    session = app.Session(STUB_MODEL, tmp_path)

    def failing(*args):
        raise XVilaError("clip.mp4 is not a video")
        yield  # a generator, like the real one

    (turn,) = list(app.run_turn(session, failing, "look", [], app.Options()))[-1:]
    assert turn.error == "clip.mp4 is not a video" and not turn.in_chat and not session.busy
    messages = app.to_messages(session.turns)
    assert messages[-1]["role"] == "assistant" and "clip.mp4 is not a video" in messages[-1]["content"][-1]


def test_sessions_have_their_own_unguessable_folders_and_are_swept_when_idle(app, tmp_path):
    sessions = app.Sessions(STUB_MODEL, tmp_path, ttl=60)
    a = sessions.get(SimpleNamespace(session_hash="a"))
    b = sessions.get(SimpleNamespace(session_hash="b"))
    assert a is sessions.get(SimpleNamespace(session_hash="a")) and a.folder != b.folder
    assert re.fullmatch(r"[0-9a-f]{32}", a.folder.name) and a.folder.is_dir()
    a.last_used -= 61  # a client that went away without saying so
    sessions.get(SimpleNamespace(session_hash="c"))
    assert not a.folder.exists() and b.folder.exists()
    b.busy = True
    sessions.close("b")  # a tab closed mid-turn: the turn removes the files when it ends
    assert b.folder.exists() and b.stop.is_set()


def test_a_checkpoint_that_cannot_load_falls_back_with_one_line(app, monkeypatch, capsys):
    import torch
    from xvila import XVila

    real = XVila.from_pretrained
    stub = object()

    def from_pretrained(source, device=None, offload_decoders=False):
        if source == "tiny-random":
            return stub  # the fallback itself is tested by the server above
        if source == "oom-checkpoint":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(source, device=device, offload_decoders=offload_decoders)

    monkeypatch.setattr(XVila, "from_pretrained", from_pretrained)
    model, source, note = app.load_model("xvila-7b", "cpu")  # offline and not cached: fails at once
    err = capsys.readouterr().err.strip().splitlines()
    assert model is stub and source == "tiny-random" and "xvila-7b" in note
    assert len(err) == 1 and err[0].startswith("x-vila: could not load xvila-7b (WeightsUnavailableError")
    assert "Serving tiny-random (untrained" in err[0]
    app.load_model("oom-checkpoint", "cuda")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "OutOfMemoryError" in line and "--4bit" in line and "--offload" in line


def test_start_up_options(app, tmp_path):
    args = app.parse_args(["--checkpoint", "xvila-7b", "--4bit", "--offload", "--device", "cuda",
                           "--port", "9000", "--share"])
    assert (args.four_bit, args.offload, args.device, args.port, args.share) == (True, True, "cuda", 9000, True)
    assert app.requested_source("xvila-7b", True) == ("xvila-7b-4bit", None)
    source, note = app.requested_source(str(tmp_path), True)
    assert source == str(tmp_path) and "--4bit" in note  # a folder loads as saved, and we say so
    assert app.requested_source(None, False)[0] == "toy"  # the shipped toy model, on any machine


def test_turns_share_one_gpu_queue(app):
    demo = app.build(STUB_MODEL, concurrency=1)  # built, not launched
    try:
        gpu = [fn for fn in demo.fns.values() if fn.concurrency_id == "gpu"]
        assert {fn.name for fn in gpu} == {"respond", "retry", "api_chat"}
        assert all(fn.concurrency_limit == 1 for fn in gpu)
        (chat_fn,) = [fn for fn in demo.fns.values() if fn.api_name == "chat"]
        assert chat_fn in gpu
        alpha = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "xvila-alpha")
        assert alpha.value == 0.45 and alpha.step == 0.05  # α defaults to the checkpoint's
    finally:
        demo.close()


def test_one_turn_at_a_time_per_session_on_every_path(app, tmp_path):
    """While a turn runs, a second API call, a UI send, retry, undo and clear of the same
    session are refused and change nothing; another session is not held up."""
    import gradio as gr

    sessions = app.Sessions(STUB_MODEL, tmp_path)
    started, go = threading.Event(), threading.Event()

    def send(history, system_prompt, outputs_dir, text, media, kwargs):
        yield {"kind": "history", "history": {"records": history["records"] + [{"user": text, "assistant": text}]}}
        if text == "first":
            started.set()
            assert go.wait(10)
        yield {"kind": "text", "text": f"reply to {text}"}

    on, values = app.Handlers(sessions, send), astuple(app.Options(max_new_tokens=8))
    one, other = SimpleNamespace(session_hash="one"), SimpleNamespace(session_hash="other")
    done: list = []
    first = threading.Thread(target=lambda: done.append(list(on.api_chat({"text": "first"}, *values, request=one))))
    first.start()
    assert started.wait(10)
    with pytest.raises(gr.Error, match="still being generated"):
        list(on.api_chat({"text": "second"}, *values, request=one))
    with pytest.warns(UserWarning, match="still being generated"):
        list(on.respond(one, {"text": "third", "files": []}, *values))
    list(on.retry(one, *values))
    on.undo(one)
    on.clear(one)
    assert list(on.api_chat({"text": "elsewhere"}, *values, request=other))[-1] == ("reply to elsewhere", [])
    go.set()
    first.join(10)
    assert done[0][-1] == ("reply to first", [])
    session = sessions.get(one)
    assert [(t.text, t.reply) for t in session.turns] == [("first", "reply to first")]
    assert session.chat.history == [("first", "first")] and not session.busy
    assert list(on.api_chat({"text": "next"}, *values, request=one))[-1] == ("reply to next", [])  # free again
