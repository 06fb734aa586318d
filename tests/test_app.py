"""The README's demo command starts a working page with no network."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited early:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("app.py did not serve its page within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_page_says_what_it_is(server):
    with urllib.request.urlopen(server, timeout=10) as r:
        html = r.read().decode()
    assert "<title>X-VILA</title>" in html or "X-VILA" in html


def test_media_check_reports_good_files_and_explains_bad_ones(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    good = tmp_path / "photo.png"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(good)
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"this is not a video at all")
    assert "64×48" in client.predict(handle_file(str(good)), api_name="/describe")
    message = client.predict(handle_file(str(bad)), api_name="/describe")
    assert "⚠️" in message and "clip.mp4" in message
    # The server keeps serving after a bad file.
    assert "image" in client.predict(handle_file(str(good)), api_name="/describe")
