"""Running a base stage: a seeded step function under a progress bar, with atomic
checkpoints, exact resume, and the stage's wall and CPU time.

A stage trains some modules of `ToyParts` for a fixed number of steps. Step `i` draws its
batch from a generator seeded by (stage seed, i), so a resumed stage sees exactly the
batches it would have seen (no RNG state to save). Every `save_every` steps and at the end
the modules and optimiser go to `<work>/<name>.ckpt.pt` (atomic; read back with
`weights_only=True`); a finished stage's weights go to `<work>/<name>.safetensors` with its
metadata (times, losses, extra values such as a VAE's scaling factor), and a stage whose
file exists is skipped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from xvila.checkpoint import read_state_dict, write_safetensors
from xvila.fileio import atomic_path


@dataclass
class Stage:
    name: str
    modules: dict[str, nn.Module]  # what trains, by a stable key
    step: Callable[[int, torch.Generator], torch.Tensor]  # (step, generator) -> loss
    steps: int
    lr: float
    seed: int
    warmup: int = 50
    save_every: int = 50
    weight_decay: float = 0.0
    finish: Callable[[], dict] | None = None  # after training: extra metadata (e.g. a scaling factor)
    extra_params: list[nn.Parameter] = field(default_factory=list)


def stage_file(work: Path, name: str) -> Path:
    return Path(work) / f"{name}.safetensors"


def finished(work: Path, name: str) -> bool:
    return stage_file(work, name).is_file()


def load_stage(work: Path, name: str, modules: dict[str, nn.Module]) -> dict:
    """Load a finished stage's weights into `modules`; returns its metadata."""
    path = stage_file(work, name)
    state = read_state_dict(path)
    for key, module in modules.items():
        prefix = f"{key}."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata().get("meta", "{}"))


def _lr_at(stage: Stage, i: int) -> float:
    """Linear warm-up, then cosine to a tenth."""
    if i < stage.warmup:
        return stage.lr * (i + 1) / stage.warmup
    progress = (i - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_ckpt(path: Path, stage: Stage, opt, i: int, losses: list[float], times: dict) -> None:
    state = {"modules": {k: m.state_dict() for k, m in stage.modules.items()}, "opt": opt.state_dict(), "step": i,
             "losses": losses, "times": times}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def run_stage(stage: Stage, work: Path, log=print) -> dict:
    """Train `stage` to the end (resuming from its checkpoint), write its weights; returns
    its metadata. A finished stage is loaded, not retrained."""
    work = Path(work)
    if finished(work, stage.name):
        meta = load_stage(work, stage.name, stage.modules)
        log(f"[{stage.name}] finished earlier ({meta.get('wall_s', 0):.0f} s wall): skipped")
        return meta
    params = [p for m in stage.modules.values() for p in m.parameters()] + stage.extra_params
    for m in stage.modules.values():
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    ckpt = work / f"{stage.name}.ckpt.pt"
    start, losses, times = 0, [], {"wall_s": 0.0, "cpu_s": 0.0}
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for k, m in stage.modules.items():
            m.load_state_dict(state["modules"][k])
        opt.load_state_dict(state["opt"])
        start, losses, times = state["step"], state["losses"], state["times"]
        log(f"[{stage.name}] resuming at step {start}/{stage.steps}")
    n = sum(p.numel() for p in params)
    log(f"[{stage.name}] training {n / 1e6:.2f} M parameters ({', '.join(stage.modules)}) for {stage.steps} steps")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, desc=stage.name, mininterval=5)
    for i in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(stage, i)
        g = torch.Generator().manual_seed(stage.seed * 1_000_003 + i)
        loss = stage.step(i, g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{stage.name}] the loss is {loss.item()} at step {i}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(loss.item(), 5))
        if i % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if (i + 1) % stage.save_every == 0 and i + 1 < stage.steps:
            now = {"wall_s": times["wall_s"] + time.perf_counter() - wall0, "cpu_s": times["cpu_s"] + time.process_time() - cpu0}
            _save_ckpt(ckpt, stage, opt, i + 1, losses, now)
    bar.close()
    for m in stage.modules.values():
        m.eval().requires_grad_(False)
    meta = stage.finish() if stage.finish else {}
    meta.update(wall_s=times["wall_s"] + time.perf_counter() - wall0, cpu_s=times["cpu_s"] + time.process_time() - cpu0,
                steps=stage.steps, loss_first=_mean(losses[:20]), loss_last=_mean(losses[-20:]))
    state = {f"{k}.{name}": t for k, m in stage.modules.items() for name, t in m.state_dict().items()}
    write_safetensors(state, stage_file(work, stage.name), metadata={"meta": json.dumps(meta)})
    ckpt.unlink(missing_ok=True)
    log(f"[{stage.name}] done: loss {meta['loss_first']:.4f} -> {meta['loss_last']:.4f}, "
        f"{meta['wall_s']:.0f} s wall, {meta['cpu_s']:.0f} s CPU")
    return meta


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
