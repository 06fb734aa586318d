"""Load test of the demo: N concurrent `gradio_client` sessions x M turns against `app.py`.

    python bench/load_app.py                               # starts app.py itself (its default model), 16 x 10
    python bench/load_app.py --clients 4 --turns 3 --app-args="--checkpoint tiny-random --concurrency 2"
    python bench/load_app.py --url http://127.0.0.1:7860/ --pid 12345   # a server already running

Only a server on the loopback interface is accepted, and the run is bounded: at most
MAX_CLIENTS clients and MAX_TURNS turns each, and no turn starts after --time-limit
seconds. Each client's turns cycle through a text reply, an image made from a picture,
and an audio reply, each message tagged with the client and turn. It reports:

- turns answered, refused (the app's typed refusal, e.g. a busy session) and failed otherwise;
- seconds per turn (median, 95th percentile, max) and the whole run's wall time;
- cross-session leaks: at the end each client reads `/history`; its turns must be exactly
  its own messages in order, with the replies it was sent, and every file it got must lie in
  one session folder of its own that no other client's file shares;
- the server's resident memory (its process and children, from /proc) sampled each second.

`--json PATH` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
MAX_CLIENTS, MAX_TURNS = 64, 100
FAST = dict(steps=2, video_frames=4, audio_seconds=0.5, max_new_tokens=24, seed=0)
# (reply_with, input file or None): the kinds of turn each client cycles through
KINDS = [("text", None), ("image", "lighthouse.png"), ("audio", None)]
SESSION_FOLDER = re.compile(r"/xvila-sessions/([0-9a-f]{32})/")


class BenchError(Exception):
    """The bench cannot run as asked (a non-loopback URL, limits exceeded, the app did not start)."""


@dataclass
class ClientResult:
    index: int
    sent: list[str] = field(default_factory=list)  # messages of answered turns, in order
    replies: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # server-side paths of what it got
    seconds: list[float] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------ the server
def loopback(url: str) -> str:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise BenchError(f"{url}: the load test runs against a server on this machine's loopback only")
    return url if url.endswith("/") else url + "/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_app(app_args: list[str], timeout: float = 300):
    """`python app.py --host 127.0.0.1 --port N *app_args`; yields (url, pid)."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *app_args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise BenchError(f"app.py exited early: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            if time.time() > deadline:
                raise BenchError(f"app.py did not serve its page within {timeout:.0f} s")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def tree_rss_mb(pid: int) -> float | None:
    """Resident memory of `pid` and its descendants (Linux /proc), in MB; None once it is gone."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            if p == pid:
                return None
    return total / 1024


class MemorySampler(threading.Thread):
    """(seconds since start, MB) every `every` seconds until stopped."""

    def __init__(self, pid: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self._stop_event, self._t0 = threading.Event(), time.time()

    def run(self):
        while not self._stop_event.is_set():
            mb = tree_rss_mb(self.pid)
            if mb is not None:
                self.samples.append((round(time.time() - self._t0, 1), round(mb, 1)))
            self._stop_event.wait(self.every)

    def stop(self):
        self._stop_event.set()
        self.join()


# ------------------------------------------------------------------------------ the clients
def one_client(url: str, index: int, turns: int, deadline: float) -> ClientResult:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    result = ClientResult(index)
    client = Client(url, verbose=False, download_files=False)
    for turn in range(turns):
        if time.time() > deadline:
            break
        reply_with, upload = KINDS[turn % len(KINDS)]
        text = f"client {index} turn {turn}: reply with {reply_with}"
        files = [handle_file(str(ASSETS / upload))] if upload else []
        t0 = time.time()
        try:
            reply, made = client.predict({"text": text, "files": files}, reply_with=reply_with, **FAST,
                                         api_name="/chat")
        except AppError as err:  # the app's own refusal, with its message
            result.refused.append(str(err))
            continue
        except Exception as err:  # a dropped connection, a server error: counted apart
            result.failed.append(f"{type(err).__name__}: {err}")
            continue
        result.seconds.append(time.time() - t0)
        result.sent.append(text)
        result.replies.append(reply)
        result.files += [f["path"] if isinstance(f, dict) else str(f) for f in made or []]
    with contextlib.suppress(Exception):
        result.history = client.predict(api_name="/history")
        client.predict(api_name="/end_session")
    return result


def leaks(results: list[ClientResult]) -> list[str]:
    """Each way one session's history or files show another's, or its own are wrong."""
    found, owner = [], {}
    for r in results:
        if [t["user"] for t in r.history if not t["error"]] != r.sent:
            found.append(f"client {r.index}: its history's turns are not its own messages in order")
        if [t["reply"] for t in r.history if not t["error"]] != r.replies:
            found.append(f"client {r.index}: its history's replies are not the ones it was sent")
        stray = [t["user"] for t in r.history if not t["user"].startswith(f"client {r.index} ")]
        if stray:
            found.append(f"client {r.index}: its history holds other clients' turns {stray[:3]}")
        folders = {m.group(1) if (m := SESSION_FOLDER.search(p)) else p for p in r.files}
        if len(folders) > 1:
            found.append(f"client {r.index}: its files lie in {len(folders)} folders")
        for folder in folders:
            if owner.setdefault(folder, r.index) != r.index:
                found.append(f"clients {owner[folder]} and {r.index} got files from one session folder")
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def run(url: str, pid: int | None, clients: int, turns: int, time_limit: float) -> dict:
    if not (1 <= clients <= MAX_CLIENTS and 1 <= turns <= MAX_TURNS):
        raise BenchError(f"clients must be 1..{MAX_CLIENTS} and turns 1..{MAX_TURNS}")
    sampler = MemorySampler(pid) if pid else None
    if sampler:
        sampler.start()
    t0 = time.time()
    deadline = t0 + time_limit
    results: list[ClientResult | None] = [None] * clients

    def work(i):
        results[i] = one_client(url, i, turns, deadline)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline + 600 - time.time()))  # a turn started before the deadline may finish
    wall = time.time() - t0
    if sampler:
        sampler.stop()
    done = [r for r in results if r is not None]
    seconds = [s for r in done for s in r.seconds]
    memory = sampler.samples if sampler else []
    return {
        "url": url, "clients": clients, "turns_per_client": turns, "wall_s": round(wall, 1),
        "clients_finished": len(done),
        "answered": len(seconds), "refused": sum(len(r.refused) for r in done),
        "failed": sum(len(r.failed) for r in done),
        "not_started": clients * turns - sum(len(r.seconds) + len(r.refused) + len(r.failed) for r in done),
        "turn_s": {"median": round(statistics.median(seconds), 2) if seconds else None,
                   "p95": round(percentile(seconds, 0.95), 2), "max": round(max(seconds, default=float("nan")), 2)},
        "leaks": leaks(done),
        "refusals": sorted({m for r in done for m in r.refused})[:5],
        "failures": sorted({m for r in done for m in r.failed})[:5],
        "rss_mb": {"start": memory[0][1] if memory else None, "peak": max((m for _, m in memory), default=None),
                   "end": memory[-1][1] if memory else None,
                   "over_time": memory[:: max(1, len(memory) // 12)]},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running app.py on 127.0.0.1 (default: start one here)")
    p.add_argument("--pid", type=int, help="the running server's process id, for its memory")
    p.add_argument("--app-args", default="", help="options for the app.py this bench starts")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=1800, help="no turn starts after this many seconds")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.url:
        figures = run(loopback(args.url), args.pid, args.clients, args.turns, args.time_limit)
    else:
        with started_app(args.app_args.split()) as (url, pid):
            figures = run(url, pid, args.clients, args.turns, args.time_limit)
    figures["app_args"] = args.app_args
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        sys.exit(f"load_app: {err}")
