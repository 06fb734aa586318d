"""bench/load_app.py's checks, on made-up results: a leak it must see, a clean run it must pass,
and its refusal of anything but a loopback server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("load_app", ROOT / "bench" / "load_app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def client(bench, index: int, folder: str, turns: int = 2):
    r = bench.ClientResult(index)
    r.sent = [f"client {index} turn {t}: reply with text" for t in range(turns)]
    r.replies = [f"reply {index}.{t}" for t in range(turns)]
    r.files = [f"/tmp/x/xvila-sessions/{folder * 32}/outputs/turn-0001/001-image-ta.png"]
    r.history = [{"user": u, "reply": a, "error": None} for u, a in zip(r.sent, r.replies)]
    return r


def test_a_clean_run_has_no_leaks(bench):
    assert bench.leaks([client(bench, 0, "a"), client(bench, 1, "b")]) == []


def test_each_kind_of_leak_is_reported(bench):
    a, b = client(bench, 0, "a"), client(bench, 1, "b")
    a.history.insert(1, b.history[0])  # B's turn in A's history
    b.replies[1] = "something else"  # B's history does not hold the reply B was sent
    c, d = client(bench, 2, "c"), client(bench, 3, "c")  # two clients' files in one session folder
    found = bench.leaks([a, b, c, d])
    assert any("client 0: its history holds other clients' turns" in f for f in found), found
    assert any("client 1: its history's replies" in f for f in found), found
    assert any("clients 2 and 3 got files from one session folder" in f for f in found), found


def test_only_a_loopback_server_is_accepted(bench):
    assert bench.loopback("http://127.0.0.1:7860") == "http://127.0.0.1:7860/"
    with pytest.raises(bench.BenchError, match="loopback"):
        bench.loopback("https://example.org/")
    with pytest.raises(bench.BenchError, match="clients must be"):
        bench.run("http://127.0.0.1:9/", None, clients=1000, turns=1, time_limit=1)
