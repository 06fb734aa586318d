"""The toy X-VILA: the paper's recipe run end to end on the toy world, from the base parts.

    python -m train.toy xvila                          # data, phases 1, 2, 3a, 3b, export to assets/toy/xvila/
    python -m train.toy xvila --work runs/toy-xvila    # where data and phases live (the default); rerun to resume
    python -m train.toy xvila --steps-scale 0.1 --out /tmp/toy-xvila   # a trial at a tenth of the steps
    python -m train.toy xvila --base /tmp/base --work /tmp/w --out /tmp/o --videos 2 --steps 1 --batch 1   # a smoke test

Steps, each skipped when done and resumed when interrupted:
1. the data (`train.toy.data.build_data`: the world corpus, the real builders, the
   pair and Q&A adapters) under `<work>/data/`;
2. the init folder `<work>/init/`: SmolLM2 and the base parts (`--base`, default
   `assets/toy/`) with fresh P_in, P_out, LoRA and token rows (`XVilaConfig` preset
   `toy-base` over that base);
3. phases 1, 2, 3a, 3b, each as `python -m train phaseN --config train/configs/toy/phaseN.yaml`
   (the real loop, its progress bar, checkpoints and exact `--resume`) with the paths of
   this run as overrides; a phase whose `final/` exists is skipped;
4. the export: phase 3b's model in fp16 to `--out` (default `assets/toy/xvila/`, what
   `XVila.from_pretrained("toy")` loads), naming the base parts by paths relative to it, so
   the folder holds only what the recipe trained: LoRA, token rows, P_in, P_out, the
   visual controllers and the two fine-tuned U-Nets (with their decoders). `recipe.json`
   there records the steps, the wall and CPU seconds of every step of the run.

Threads: each phase runs one process with `--threads` torch threads (default 1). Measured
on the project's 2 shared CPU cores under load (load average ~12), SmolLM2-135M
forward+backward on 8 rows of 58 tokens took 8.5 s with one thread and 30-75 s with two
(threads that wait for a busy core spin); on an idle machine try `--threads 2`.

Sizing (train/configs/toy/): CPU seconds per step, one thread, from two trial runs on the
untrained base (2 and 8 steps; the difference over 6 steps), default batches of 8 records:
phase 1 5.7 (8 pairs = 16 rows), phase 2 6.8 (8 three-turn rows), phase 3a 6.2, phase 3b
3.4 (the U-Nets only); each phase's start (imports, loading) ~10-20 CPU s; the data for 280
videos about a minute. With `--threads 2` on an idle machine the first shipped model's
phases (180 / 120 / 220 / 200 steps) ran 2.9 s a step in phase 1 and took 10, 11 and 7
minutes for phases 2, 3a and 3b; phase 3a now has 300 steps (the first model named 67 % of
held-out colours; understanding gets the extra steps). The recipe with it took 61 min.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from train import export
from train.loop import CHECKPOINTS, FINAL, load_config
from train.toy import data as toy_data
from xvila.checkpoint import build_xvila, load_xvila
from xvila.config import TOY_ASSETS, XVilaConfig, toy_preset
from xvila.errors import XVilaError
from xvila.fileio import write_json

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "toy"
WORK = Path("runs/toy-xvila")
PHASES = ("1", "2", "3a", "3b")
# What each phase reads (names of `train.toy.data.manifests`) and the mixing weights.
PHASE_DATA = {
    "1": {"pairs": 1.0},
    "2": {"interleaved": 1.0},
    "3a": {"x2x": 0.6, "understand": 0.4},
    "3b": {"x2x": 1.0},
}
SIZE_LIMIT_MB = 80  # assets/toy/ in all (issue 14)


class RecipeError(XVilaError, RuntimeError):
    """A phase failed or the export is incomplete; the message says which and how to resume."""


# ------------------------------------------------------------------------------ steps
def make_init(folder: Path, base: Path, log=print) -> Path:
    """The model phase 1 starts from: SmolLM2 and the base parts with fresh X-VILA parts."""
    if (folder / "config.json").is_file():
        return folder
    for part in ("imagebind", "decoders/image", "decoders/video", "decoders/audio"):
        if not (base / part).is_dir():
            raise RecipeError(f"the toy base in {base} lacks {part}/: train it first (`python -m train.toy base`) "
                              "or pass --base")
    log(f"init: SmolLM2 + the base parts in {base}, fresh P_in / P_out / LoRA -> {folder}")
    model = build_xvila(XVilaConfig(name="toy", **toy_preset(base.resolve())), device="cpu")
    export.write_folder(model, folder)
    return folder


def phase_overrides(key: str, work: Path, manifests: dict[str, Path], scale: float, steps: int | None,
                    batch: int | None = None) -> list[str]:
    """`key=value` overrides that point a shipped toy config at this run's folders."""
    previous = work / "init" if key == "1" else work / f"phase{PHASES[PHASES.index(key) - 1]}" / FINAL
    entries = [{"path": str(manifests[name]), "root": str(manifests[name].parent), "weight": w}
               for name, w in PHASE_DATA[key].items()]
    out = [f"init={previous}", f"out_dir={work / f'phase{key}'}", f"data_root={work / 'data'}",
           f"manifests={json.dumps(entries)}"]
    if steps is not None or scale != 1.0:
        cfg = _read_config(key)
        n = steps if steps is not None else max(1, round(cfg["steps"] * scale))
        out += [f"steps={n}", f"warmup_steps={min(cfg['warmup_steps'], max(1, n // 10))}",
                f"save_every={max(1, min(cfg['save_every'], n))}", f"log_every={max(1, min(cfg['log_every'], n))}"]
    if batch is not None:  # trials and tests: a few rows per step
        out += [f"global_batch={batch}", f"micro_batch={batch}"]
    return out


def _read_config(key: str) -> dict:
    return load_config([str(CONFIGS / f"phase{key}.yaml")]).to_dict()


def run_phase(key: str, work: Path, overrides: list[str], threads: int, log=print) -> dict:
    """`python -m train phaseN` in its own process (fresh, or `--resume` after a stop)."""
    out_dir = work / f"phase{key}"
    if (out_dir / FINAL / "config.json").is_file():
        log(f"phase {key}: done before ({out_dir / FINAL}), skipped")
        return {"skipped": True}
    resume = any((out_dir / CHECKPOINTS).glob("step-*/state.json"))
    cmd = [sys.executable, "-m", "train", f"phase{key}", "--config", str(CONFIGS / f"phase{key}.yaml"), *overrides]
    cmd += ["--resume"] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    log(f"phase {key}{' (resuming)' if resume else ''}: {' '.join(cmd[1:4])} ...")
    cpu0, t0 = _children_cpu(), time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[2], check=False)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if done.returncode != 0:
        raise RecipeError(f"phase {key} failed (exit status {done.returncode}, see above); "
                          "run the same command again to resume it")
    if not (out_dir / FINAL / "config.json").is_file():
        raise RecipeError(f"phase {key} stopped before its last step (a signal?); run the same command again to resume")
    log(f"phase {key}: {wall / 60:.1f} min wall, {cpu / 60:.1f} CPU min")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def export_toy(final: Path, out: Path, base: Path, record: dict) -> Path:
    """Phase 3b's folder -> `out` in fp16, the base parts named relative to `out`."""
    model = load_xvila(final, device="cpu", allow_outside_paths=True)  # our own run: its parts lie beside it
    out = Path(out).resolve()

    def rel(path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), out)

    config = model.config
    model.config = config.replace(name="toy", imagebind=rel(base / "imagebind"),
                                  decoders={**config.decoders, "audio": rel(base / "decoders" / "audio")})
    with torch.no_grad():
        model.half()
    export.write_folder(model, out, history=export.read_history(final))
    write_json(record, out / "recipe.json")
    return out


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


# ------------------------------------------------------------------------------ the run
def run_recipe(work: Path = WORK, base: Path = TOY_ASSETS, out: Path | None = None,
               spec: toy_data.DataSpec = toy_data.DataSpec(), steps_scale: float = 1.0, steps: int | None = None,
               threads: int = 1, batch: int | None = None, log=print) -> Path:
    """Data, init, the four phases, the export (see the module docstring); returns `out`."""
    torch.set_num_threads(threads)
    work, base = Path(work).resolve(), Path(base).resolve()
    out = Path(out) if out is not None else base / "xvila"
    record: dict = {"threads": threads, "data": spec.__dict__, "steps_scale": steps_scale, "steps": steps,
                    "batch": batch, "wall_s": {}, "cpu_s": {}}
    t0, c0 = time.perf_counter(), time.process_time()
    manifests = toy_data.build_data(work / "data", spec, log=log)
    make_init(work / "init", base, log)
    record["wall_s"]["data+init"] = round(time.perf_counter() - t0, 1)
    record["cpu_s"]["data+init"] = round(time.process_time() - c0, 1)
    for key in PHASES:
        timing = run_phase(key, work, phase_overrides(key, work, manifests, steps_scale, steps, batch), threads, log)
        for k in ("wall_s", "cpu_s"):
            if k in timing:
                record[k][f"phase{key}"] = timing[k]
    record["total_wall_s"] = round(time.perf_counter() - t0, 1)
    export_toy(work / "phase3b" / FINAL, out, base, record)
    size = folder_mb(out.parent if out.parent == base else out)
    log(f"toy X-VILA written to {out} ({folder_mb(out):.1f} MB; {out.parent}: {size:.1f} MB) after "
        f"{record['total_wall_s'] / 60:.1f} min")
    if out.parent == base and size > SIZE_LIMIT_MB:
        log(f"warning: {base} holds {size:.1f} MB, over the {SIZE_LIMIT_MB} MB the repository allows for it")
    return out
