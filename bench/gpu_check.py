"""The GPU path settled in one run: speed and memory of every part at full size, random weights.

    python bench/gpu_check.py                      # a CUDA GPU: writes gpu_check.md (under 8 min on an H100/H200)
    python bench/gpu_check.py --out report.md --steps 25 --tokens 128
    python bench/gpu_check.py --tiny               # the same code on tiny configs, on a CPU (the tests run it)

No network and no weights: every part is built at its real size with random values (speed
does not depend on them); `--tiny` builds tiny-random's sizes instead. The Markdown report:

1. LLM, batch 1: decode tok/s in fp16 with the dynamic cache, with the static cache +
   torch.compile, and with the 4-bit NF4 LLM; prefill of 512 tokens; time to first token
   of a turn with one image.
2. Each decoder at full size (SD1.5 512x512, VideoCrafter2 16 frames 320x512, AudioLDM 5 s),
   TA and TA+VEH: s/step, s/output, the highway's overhead (`bench/decoders.py`'s parts).
3. One IMG->VID turn end to end and its breakdown: encode, prefill, decode, denoise, VAE, write.
4. Peak GPU memory of that turn with every part resident in fp16, with the 4-bit LLM, and
   with the 4-bit LLM and the decoders offloaded (the 24 GB set-up).

The 4-bit and offload rows load the model as users do (`XVila.from_pretrained` of a
checkpoint folder this script writes first, with bitsandbytes quantising at load).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import xvila.chat  # noqa: E402
from bench import decoders as bench_decoders  # noqa: E402
from bench import generate as bench_generate  # noqa: E402
from xvila.config import XVilaConfig  # noqa: E402
from xvila.decoders.base import DecodeSettings  # noqa: E402
from xvila.engine import Engine  # noqa: E402
from xvila.fileio import atomic_path, write_json  # noqa: E402
from xvila.llm import merged_new_tokens  # noqa: E402
from xvila.model import XVila  # noqa: E402

MODALITIES = ("image", "video", "audio")
LLM, DECODERS, TURN, MEMORY = ("LLM, batch 1", "Decoders, TA and TA+VEH", "IMG→VID turn end to end",
                               "Peak memory of an IMG→VID turn")
TURN_PARTS = ("encode", "prefill", "decode", "denoise", "VAE", "write")
# What the issue asks of the GPU path (issue 11), shown beside the measured rows.
TARGETS = {"decode fp16, dynamic cache": "≥ 170 tok/s on an H100", "IMG→VID turn, fp16, every part resident": "≤ 4 s",
           "peak memory, 4-bit LLM, every part resident": "≤ 24 GB"}


# ------------------------------------------------------------------------------ the report
@dataclass
class Row:
    section: str
    check: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Report:
    title: str
    rows: list[Row] = field(default_factory=list)

    def add(self, section: str, check: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append(Row(section, check, float(value), unit, note))
        print(f"{section} | {check}: {value:.4g} {unit} {note}", flush=True)

    def markdown(self, preamble: list[str]) -> str:
        lines = [f"# {self.title}", "", *preamble]
        for section in (LLM, DECODERS, TURN, MEMORY):
            lines += ["", f"## {section}", "", "| check | value | unit | target | note |", "|---|---|---|---|---|"]
            lines += [f"| {r.check} | {r.value:.4g} | {r.unit} | {TARGETS.get(r.check, '')} | {r.note} |"
                      for r in self.rows if r.section == section]
        return "\n".join(lines) + "\n"


@dataclass
class Setup:
    tiny: bool
    device: torch.device
    steps: int
    tokens: int
    runs: int
    turn_tokens: int
    frames: int  # of the video the IMG->VID turn and the video decoder make
    folder: Path  # scratch: the photo, the checkpoint, the generated files

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.float32

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------ memory
def reset_peak(setup: Setup) -> None:
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(setup.device)


def peak_memory(setup: Setup, model) -> tuple[float, str, str]:
    """(value, unit, note): CUDA's peak allocation since `reset_peak`; on a CPU, which has
    no such counter, the weights resident on the model's device (what the row would hold
    before activations)."""
    if setup.device.type == "cuda":
        return torch.cuda.max_memory_allocated(setup.device) / 2**30, "GiB", "peak allocated"
    tensors = [*model.parameters(), *model.buffers()]
    resident = sum(t.numel() * t.element_size() for t in tensors if t.device == model.device)
    return resident / 2**20, "MiB", "CPU: weights resident on the compute device (no peak counter)"


# ------------------------------------------------------------------------------ building
def fp16_model(setup: Setup) -> XVila:
    """xvila-7b's sizes with random weights on the device (tiny-random's with --tiny), the
    decoders at full size as `bench/decoders.py` builds them."""
    config = XVilaConfig.from_name("tiny-random") if setup.tiny else bench_generate.random_7b_config()
    model = bench_generate.load("random-7b", setup.device, config=config)
    if not setup.tiny:  # tiny-random's own decoders are already the tiny ones, sized to its ImageBind
        for m in MODALITIES:
            model.decoders[m] = bench_decoders.build(m, True, setup.device, setup.dtype)[0]
    return model.eval()


def write_4bit_checkpoint(model: XVila, folder: Path) -> Path:
    """The model as a checkpoint folder whose config asks for the 4-bit LLM: loading it is
    what `--4bit` does with a trained checkpoint."""
    model.save_pretrained(folder)
    config = XVilaConfig.from_json(folder / "config.json").replace(load_in_4bit=True, dtype="bfloat16")
    write_json(config.to_dict(), folder / "config.json")
    return folder


# ------------------------------------------------------------------------------ timing
class Clock:
    """Seconds spent inside wrapped calls and generator steps, by name (CUDA synchronised)."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.seconds: dict[str, float] = dict.fromkeys(TURN_PARTS, 0.0)

    def call(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.setup.sync()
            self.seconds[name] += time.perf_counter() - t0
            return out
        return timed

    def steps(self, first: str, rest: str, fn):
        """A generator function whose first step counts as `first` and the others as `rest`."""
        def timed(*args, **kwargs):
            it, name = fn(*args, **kwargs), first
            try:
                while True:
                    t0 = time.perf_counter()
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                    finally:
                        self.setup.sync()
                        self.seconds[name] += time.perf_counter() - t0
                    name = rest
                    yield item
            finally:
                it.close()  # the engine unmerges its new-token rows in its own `finally`
        return timed


def img_to_vid_turn(model: XVila, setup: Setup, image: Path) -> tuple[float, dict[str, float]]:
    """One IMG->VID turn (after a warm-up turn): its wall time and the time in each part.
    "other" is what the parts leave out (prompt building, P_out, moving offloaded decoders)."""
    chat = model.new_chat(outputs_dir=setup.folder / "outputs")
    decode = DecodeSettings(steps=setup.steps, frames=setup.frames)
    for attempt in range(2):
        chat.reset()
        clock = Clock(setup)
        decoder = model.decoders["video"]
        with contextlib.ExitStack() as patches:
            patches.enter_context(mock.patch.object(model, "encode_media", clock.call("encode", model.encode_media)))
            patches.enter_context(mock.patch.object(chat.engine, "generate",
                                                    clock.steps("prefill", "decode", chat.engine.generate)))
            patches.enter_context(mock.patch.object(xvila.chat, "iter_denoise",
                                                    clock.steps("denoise", "denoise", xvila.chat.iter_denoise)))
            patches.enter_context(mock.patch.object(decoder, "decode_latents", clock.call("VAE", decoder.decode_latents)))
            patches.enter_context(mock.patch.object(decoder, "write", clock.call("write", decoder.write)))
            setup.sync()
            t0 = time.perf_counter()
            events = list(chat.send("Make a short video from this picture.", media=[str(image)], output="video",
                                    max_new_tokens=setup.turn_tokens, seed=attempt, decode=decode))
            setup.sync()
            total = time.perf_counter() - t0
        if not any(e.kind == "media" and e.path for e in events):
            raise RuntimeError("the IMG->VID turn wrote no video")
    return total, clock.seconds


@torch.inference_mode()
def prefill_seconds(model: XVila, setup: Setup, n: int = 512) -> float:
    """One forward over an n-token prompt into an empty cache (the new-token rows merged,
    as a turn runs), median of `runs` after a warm-up."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.tokenizer.vocab_size, (1, n), generator=g).to(model.device)
    times = []
    with merged_new_tokens(model.llm):
        for run in range(setup.runs + 1):
            setup.sync()
            t0 = time.perf_counter()
            model.llm(input_ids=ids, use_cache=True, logits_to_keep=1)
            setup.sync()
            if run:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------ sections
def llm_rows(report: Report, model: XVila, setup: Setup, image: Path) -> None:
    section = LLM
    chat = model.new_chat()
    ttft, tps = bench_generate.time_turns(chat, image, setup.tokens, setup.runs, setup.device)
    report.add(section, "decode fp16, dynamic cache", tps, "tok/s", f"{setup.tokens} new tokens")
    report.add(section, "time to first token, turn with one image (fp16)", ttft, "s", "encode + prefill + first token")
    report.add(section, "prefill 512 tokens (fp16)", prefill_seconds(model, setup), "s")
    chat.engine = Engine(model, compile=True)  # the static cache; compiled on CUDA
    t0 = time.perf_counter()
    chat.engine.warm_up(progress=None)
    warm = time.perf_counter() - t0
    _, tps = bench_generate.time_turns(chat, image, setup.tokens, setup.runs, setup.device)
    compiled = setup.device.type == "cuda"
    report.add(section, "decode fp16, static cache + compile", tps, "tok/s",
               f"warm-up (compile) {warm:.1f} s" if compiled else "CPU: static cache, not compiled")
    del chat
    torch._dynamo.reset()  # the compiled step holds the model and its CUDA graphs' memory


def decoder_rows(report: Report, setup: Setup) -> None:
    section = DECODERS
    s = DecodeSettings(steps=setup.steps, guidance=7.5, alpha=1.0, seconds=5.0, frames=setup.frames)
    for m in MODALITIES:
        decoder, vision_dim = bench_decoders.build(m, not setup.tiny, setup.device, setup.dtype)
        g = torch.Generator().manual_seed(0)
        e_text = torch.randn(1 if m == "audio" else 77, bench_decoders.COND[m] if not setup.tiny else 32, generator=g)
        e_vis = torch.randn(16, 16, vision_dim, generator=g)
        totals = {}
        for mode, vis in [("TA", None)] + ([("TA+VEH", e_vis)] if m != "audio" else []):
            bench_decoders.run(decoder, e_text, vis, DecodeSettings(**{**s.__dict__, "steps": 2}), setup.device)
            per_step, total = bench_decoders.run(decoder, e_text, vis, s, setup.device)
            totals[mode] = total
            only = " (no highway for audio: TA only)" if m == "audio" else ""
            report.add(section, f"{m} {mode}: s/step", per_step, "s", f"latents {tuple(decoder.latent_shape(s))}{only}")
            report.add(section, f"{m} {mode}: s/output", total, "s", f"{setup.steps} steps, CFG 7.5, VAE included")
        if m != "audio":
            report.add(section, f"{m} VEH overhead", 100 * (totals["TA+VEH"] / totals["TA"] - 1), "%", "α = 1")
        del decoder
        reset_peak(setup)


def turn_rows(report: Report, model: XVila, setup: Setup, image: Path, label: str, breakdown: bool) -> None:
    reset_peak(setup)
    total, parts = img_to_vid_turn(model, setup, image)
    value, unit, note = peak_memory(setup, model)
    report.add(TURN, f"IMG→VID turn, {label}", total, "s",
               f"{setup.turn_tokens} new tokens at most, {setup.steps} denoising steps, {setup.frames} frames")
    if breakdown:
        for name in TURN_PARTS:
            report.add(TURN, f"{name} ({label})", parts[name], "s")
        report.add(TURN, f"other ({label})", total - sum(parts.values()), "s", "prompt, P_out, moving offloaded decoders")
    report.add(MEMORY, f"peak memory, {label}", value, unit, note)


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny-random's sizes, on the CPU (checks the script)")
    ap.add_argument("--out", default=None, help="the Markdown report (default gpu_check.md, or gpu_check-tiny.md)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 25; 2 with --tiny)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per timed turn (default 128; 8 with --tiny)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs after a warm-up (default 3; 1 with --tiny)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("gpu_check: no CUDA device; pass --tiny to check the script on a CPU")
    out = Path(args.out or ("gpu_check-tiny.md" if args.tiny else "gpu_check.md"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xvila-gpu-check-") as tmp:
        setup = Setup(args.tiny, device, args.steps or (2 if args.tiny else 25), args.tokens or (8 if args.tiny else 128),
                      args.runs or (1 if args.tiny else 3), turn_tokens=8 if args.tiny else 16,
                      frames=4 if args.tiny else 16, folder=Path(tmp))
        report = Report("X-VILA GPU check" + (" (--tiny: tiny-random sizes on a CPU, not a measurement)" if args.tiny else ""))
        image = bench_generate.photo(setup.folder)
        # 1. fp16, every part resident: the LLM rows, the decoders, the turn.
        model = fp16_model(setup)
        turn_rows(report, model, setup, image, "fp16, every part resident", breakdown=True)
        llm_rows(report, model, setup, image)  # last: its static cache and CUDA graphs would count in the peak
        checkpoint = write_4bit_checkpoint(model, setup.folder / "checkpoint")
        del model
        reset_peak(setup)
        decoder_rows(report, setup)
        # 2. The 4-bit LLM, loaded from a checkpoint folder as users load one.
        t0 = time.perf_counter()
        model = XVila.from_pretrained(str(checkpoint), device=device)
        load = time.perf_counter() - t0
        _, tps = bench_generate.time_turns(model.new_chat(), image, setup.tokens, setup.runs, device)
        report.add(LLM, "decode 4-bit NF4, dynamic cache", tps, "tok/s", f"checkpoint loaded in {load:.0f} s")
        turn_rows(report, model, setup, image, "4-bit LLM, every part resident", breakdown=False)
        del model
        reset_peak(setup)
        # 3. The 24 GB set-up: the 4-bit LLM, the decoders on the CPU between requests.
        model = XVila.from_pretrained(str(checkpoint), device=device, offload_decoders=True)
        turn_rows(report, model, setup, image, "4-bit LLM, decoders offloaded", breakdown=False)
        del model
        reset_peak(setup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    sizes = ("tiny-random sizes, float32 where a row says fp16" if args.tiny else "full sizes (Vicuna-7B, "
             "ImageBind-huge; SD1.5 512², VideoCrafter2 16×320×512, AudioLDM 5 s with their real U-Nets/VAEs)")
    preamble = [f"Device: {name}; torch {torch.__version__}; random weights at {sizes}; {setup.steps} denoising steps; "
                f"timed runs: median of {setup.runs} after a warm-up; the whole check took "
                f"{time.perf_counter() - start:.0f} s."]
    with atomic_path(out) as part:
        part.write_text(report.markdown(preamble))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
