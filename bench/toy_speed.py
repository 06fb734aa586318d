"""Time to first token and seconds per image, video and audio reply, at the demo's default settings.

    python bench/toy_speed.py                          # the toy model, 2 CPU threads, median of 3 runs
    python bench/toy_speed.py --checkpoint DIR --runs 5 --threads 2 [--json out.json]
    python bench/toy_speed.py --quick                  # tiny-random, 1 run, 2 steps: checks the script

Each run is a fresh chat, as a new visitor of the page: "What is this?" about a world
picture (time to the first streamed token, and to the end of the reply), then one turn per
medium - a picture drawn from text, a video from a picture, a sound from a video - timed
from `send` to the written file (the reply's tokens, P_out and the whole denoising loop).
The settings are the demo's own (`app.demo_defaults`: for the toy, the world's 8 frames and
1 s of sound, 20 steps), so the numbers are what a visitor waits. The first run warms up
and is not counted; the median of the rest is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere; `app` holds the demo's settings

import torch  # noqa: E402

import app  # noqa: E402
from xvila import XVila  # noqa: E402

PICTURE, CLIP = app.EXAMPLES / "red-circle.png", app.EXAMPLES / "green-star-up.mp4"
# (label, prompt, inputs, reply medium)
TURNS = [
    ("image reply (s)", "Draw a blue square on a yellow background.", [], "image"),
    ("video reply (s)", "Make a video that starts from this image.", [PICTURE], "video"),
    ("audio reply (s)", "What would this video sound like? Please generate its audio.", [CLIP], "audio"),
]
QUICK = dict(steps=2, video_frames=4, audio_seconds=0.5, max_new_tokens=8)


def first_token(model, options: app.Options, out: str) -> tuple[float, float]:
    """(seconds to the first streamed token, seconds to the end of the text reply)."""
    chat = model.new_chat(outputs_dir=out)
    kwargs = {**options.send_kwargs(), "output": "text"}
    start, first = time.perf_counter(), None
    for ev in chat.send("What is this?", media=[str(PICTURE)], **kwargs):
        if ev.kind == "text" and first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return (total if first is None else first), total


def reply_seconds(model, options: app.Options, prompt: str, inputs: list[Path], medium: str, out: str) -> tuple[float, int]:
    """(seconds from `send` to the written file, streamed text pieces of the reply)."""
    chat = model.new_chat(outputs_dir=out)
    kwargs = {**options.send_kwargs(), "output": medium}
    start = time.perf_counter()
    events = list(chat.send(prompt, media=[str(p) for p in inputs], **kwargs))
    seconds = time.perf_counter() - start
    if not any(ev.kind == "media" and ev.modality == medium and ev.path for ev in events):
        raise RuntimeError(f"the {medium} turn made no {medium} file")
    return seconds, sum(ev.kind == "text" for ev in events)


def one_run(model, options: app.Options, out: str) -> dict[str, float]:
    ttft, text = first_token(model, options, out)
    row = {"first token (s)": ttft, "text reply (s)": text}
    for label, prompt, inputs, medium in TURNS:
        # The reply's length varies with the model (an untrained one talks to the token limit):
        # its count goes beside the time.
        row[label], row[f"{medium} reply tokens"] = reply_seconds(model, options, prompt, inputs, medium, out)
    return row


def bench(model, options: app.Options, runs: int) -> dict[str, float]:
    """Median of `runs` timed runs after one warm-up run."""
    with tempfile.TemporaryDirectory(prefix="xvila-bench-") as out:
        one_run(model, options, out)
        rows = [one_run(model, options, out) for _ in range(runs)]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: toy (tiny-random with --quick)")
    p.add_argument("--runs", type=int, default=None, help="timed runs after the warm-up (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny-random, 2 steps, short outputs: checks the script")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the demo's (an untrained model "
                   "never stops early)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or ("tiny-random" if args.quick else app.DEFAULT)
    runs = args.runs or (1 if args.quick else 3)
    if runs < 1:
        p.error("--runs must be at least 1")
    start = time.perf_counter()
    model = XVila.from_pretrained(checkpoint, device=args.device)
    load = time.perf_counter() - start
    options = app.demo_defaults(model)
    if args.quick:
        options = replace(options, **QUICK)
    if args.max_new_tokens:
        options = replace(options, max_new_tokens=args.max_new_tokens)
    medians = bench(model, options, runs)
    result = {"checkpoint": checkpoint, "device": str(model.device), "threads": torch.get_num_threads(),
              "cpus": len(os.sched_getaffinity(0)), "runs": runs, "load (s)": load,
              "settings": {k: getattr(options, k) for k in ("steps", "guidance", "video_frames", "audio_seconds",
                                                            "temperature", "top_p", "max_new_tokens")},
              "median": medians}
    print(f"{checkpoint} on {model.device}, {result['threads']} torch threads ({result['cpus']} CPUs usable), "
          f"median of {runs} runs after a warm-up; load {load:.1f} s; settings {result['settings']}")
    for k, v in medians.items():
        print(f"  {k:<20} {v:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
