"""Time to first token and decode speed of one chat turn (one image in, 128 tokens out).

    python bench/generate.py                         # tiny-random, on whatever device is present
    python bench/generate.py --preset random-7b      # Vicuna-7B-sized LLM + ImageBind-huge, random weights, tiny decoders (GPU)
    python bench/generate.py --preset xvila-7b       # the real weights (needs the Hub or a warm cache)
    python bench/generate.py --static-cache --compile

Random weights time the same as real ones. The reply is forced to plain text of exactly
--tokens tokens (`</s>` masked, generation tokens masked), so runs are comparable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xvila.checkpoint import build_xvila  # noqa: E402
from xvila.config import XVilaConfig  # noqa: E402
from xvila.constants import MEDIA_MODALITIES  # noqa: E402
from xvila.engine import Engine  # noqa: E402
from xvila.model import XVila  # noqa: E402

VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def random_7b_config() -> XVilaConfig:
    """xvila-7b's sizes with random weights and no Hub id anywhere: a Vicuna-7B-sized LLM,
    ImageBind-huge, and tiny random decoders (this bench generates text only; full-size
    decoders would add their memory to the peak it reports, and real ones a download)."""
    return XVilaConfig.from_name("xvila-7b").replace(
        name="random-7b", llm=None, llm_revision=None, llm_config=VICUNA_7B, imagebind=None,
        decoders={m: None for m in MEDIA_MODALITIES},
    )


def load(preset: str, device: torch.device, config: XVilaConfig | None = None) -> XVila:
    """A preset by name; "random-7b" (or `config`, any config without Hub ids) built
    straight on the device with random weights."""
    if preset != "random-7b" and config is None:
        return XVila.from_pretrained(preset, device=device)
    config = config or random_7b_config()
    dtype = config.torch_dtype(device)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # build straight on the device: a CPU copy of 7B would take minutes
            return build_xvila(config, device)
    finally:
        torch.set_default_dtype(default)


def photo(folder: Path) -> Path:
    """A random 448x336 photo: the turn's one image."""
    path = Path(folder) / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (336, 448, 3), dtype=np.uint8)).save(path)
    return path


def sync_fn(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_turns(chat, image: Path, tokens: int, runs: int, device: torch.device) -> tuple[float, float]:
    """Median time to first token and decode tokens/s of `runs` text turns with one image,
    after one warm-up turn (which also compiles a compiled step)."""
    sync = sync_fn(device)
    rows = []
    for run in range(runs + 1):
        chat.reset()
        t0 = time.perf_counter()
        first = None
        for ev in chat.send("Describe this photo.", media=[str(image)], output="text", temperature=0.7,
                            max_new_tokens=tokens, seed=run):
            if ev.kind == "text":
                sync()
                first = first or time.perf_counter()
        sync()
        end = time.perf_counter()
        if run:
            rows.append((first - t0, tokens / (end - first)))
    return statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-random")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--static-cache", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the one-token step (CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = load(args.preset, device)
    chat = model.new_chat()
    chat.engine = Engine(model, static_cache=args.static_cache, compile=args.compile)
    if args.static_cache or args.compile:
        chat.engine.warm_up()  # compiles and allocates the one cache every run reuses
    with tempfile.TemporaryDirectory() as tmp:
        ttft, tps = time_turns(chat, photo(Path(tmp)), args.tokens, args.runs, device)
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print("| preset | device | cache | compile | TTFT (s) | decode tok/s | peak GPU memory |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {name} | {'static' if args.static_cache or args.compile else 'dynamic'} | "
          f"{args.compile} | {ttft:.3f} | {tps:.1f} | {mem} |")
    print(f"(median of {args.runs} runs after a warm-up; {args.tokens} new tokens, one {args.preset} turn with one image)")


if __name__ == "__main__":
    main()
