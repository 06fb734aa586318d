"""The one training loop (`train`), and what it is made of: config, accelerator, checkpoints, logs.

    python -m train phase1 --config train/configs/phase1.yaml     # see train/__main__.py

`train(cfg)` runs the phase `cfg.phase` as its row in `train.phases.PHASES` describes it
(what trains, the data kinds, the samples, the loss); the pieces it uses live here:

- `TrainConfig`, `load_config`: flat YAML configs, `base:` inheritance, `key=value` overrides;
- `Run`: the `Accelerator` (bf16, accumulation up to the global batch, DDP/DeepSpeed,
  TensorBoard), the out folder, SIGTERM/SIGINT handling, the NaN/inf check, progress and
  logs, and checkpoints (`save`, `resume`, keep the last K);
- `load_init`: the model a phase starts from (a preset or the previous phase's output);
- `make_optimizer`: Adam(W) with linear warm-up and cosine decay.

A checkpoint is a folder written whole or not at all (`step-000120.tmp` renamed to
`step-000120` once complete):

    checkpoints/step-000120/
        trainable.safetensors       the parameters the phase trains, by name
        optimizer[-rank{r}].safetensors + optimizer[-rank{r}].json   its state (tensors + the rest)
        rng-rank{r}.safetensors + rng-rank{r}.json                   torch/CUDA, numpy, python RNGs
        state.json                  step, data positions per rank, scheduler, skip counts
        manifest.json               every file above with its size and SHA-256 (written last; train.checksums)

Resuming takes the newest checkpoint whose files match their manifest (warning about each
newer, damaged one) and loads all of it; the data position is the number of micro-batches each rank has
drawn, and micro-batch k is a pure function of (seed, k, rank) (`train.batches`), so an
interrupted and resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from torch import nn

from train import batches, export
from train.checksums import newest_intact, write_manifest
from train.phases import PHASES
from xvila.checkpoint import build_xvila
from xvila.config import PRESETS, XVilaConfig
from xvila.constants import VISUAL
from xvila.errors import ConfigError, ResumeError, XVilaError
from xvila.fileio import write_json, write_safetensors

CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"step-(\d+)")  # a finished save; `step-N.tmp` is one that never finished
FINAL = "final"


class NonFiniteLossError(XVilaError, FloatingPointError):
    """A loss went NaN or infinite; the message names the step, the samples and the last good checkpoint."""


# ---------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """One phase's settings. The shipped YAMLs (`train/configs/`) set the paper's values."""

    phase: str = "1"
    init: str = "tiny-random"  # a preset, or the previous phase's output folder (`.../final`)
    out_dir: str = "runs/phase1"
    # --- data: [{path, weight, root}] (root defaults to data_root) ------------------------
    manifests: list = field(default_factory=list)
    data_root: str = "data"
    feature_cache: str | None = None  # train.cache.FeatureCache folder; None: encode on the fly
    text_cache: str | None = None  # train.cache.TextCache folder; None: the decoders' text encoders
    num_workers: int = 4
    prefetch_factor: int = 4
    max_length: int = 2048  # longer samples are skipped (and counted), never cut
    # --- optimisation ---------------------------------------------------------------------
    steps: int = 20000
    global_batch: int = 200  # = micro_batch x processes x accumulation
    micro_batch: int = 25
    lr: float = 4e-4
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine decay ends at lr x min_lr_ratio
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0  # 0: Adam, as the paper
    grad_clip: float = 1.0
    # --- precision and memory ---------------------------------------------------------------
    mixed_precision: str = "bf16"  # no | fp16 | bf16
    load_in_4bit: bool | None = None  # None: as the init's config says; True: QLoRA
    # True: the init folder may name base parts by local paths outside it (your own base
    # models on a local disk); by default only its subfolders and Hub ids (xvila.checkpoint)
    allow_outside_paths: bool = False
    gradient_checkpointing: bool = False
    # --- phase 3b ----------------------------------------------------------------------------
    condition: str = "model"  # E_text for the U-Nets: "model" (P_out of the LLM's states) or "caption"
    video_frames: int = 16  # frames of a target video encoded by the VAE
    # --- bookkeeping ---------------------------------------------------------------------------
    seed: int = 0
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    log_with: str | None = "tensorboard"  # an accelerate tracker, or None
    push_to_hub: str | None = None  # a Hub repo id: the final folder is uploaded there

    def __post_init__(self):
        self.phase = str(self.phase)
        if self.phase not in PHASES:
            raise ConfigError(f"phase must be one of {tuple(PHASES)}, not {self.phase!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        if self.condition not in ("model", "caption"):
            raise ConfigError(f"condition must be 'model' or 'caption', not {self.condition!r}")
        for key in ("steps", "global_batch", "micro_batch", "save_every", "keep_last", "log_every"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be at least 1, not {getattr(self, key)}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch}")
        if not self.manifests:
            raise ConfigError("the config names no manifests")
        self.manifests = [{"path": m} if isinstance(m, str) else dict(m) for m in self.manifests]
        for m in self.manifests:
            if "path" not in m or set(m) - {"path", "weight", "root"}:
                raise ConfigError(f"a manifest entry is {{path, weight, root}}, got {m}")

    def to_dict(self) -> dict:
        return asdict(self)


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A YAML config with its `base:` (a path or a list, relative to the file) merged under it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: config inherits from itself")
    if not path.is_file():
        raise ConfigError(f"{path}: config not found")
    d = yaml.safe_load(path.read_text()) or {}
    bases = d.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged.update(_read_yaml(path.parent / base, seen + (path,)))
    merged.update(d)
    return merged


def load_config(paths: list[str], overrides: list[str] = (), phase: str | None = None) -> TrainConfig:
    """Configs merged left to right, then flat `key=value` overrides (values parsed as YAML)."""
    d: dict = {}
    for p in paths:
        d.update(_read_yaml(Path(p)))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"an override is key=value, got {item!r}")
        d[key.strip()] = yaml.safe_load(value)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known: {sorted(known)}")
    if phase is not None:
        if "phase" in d and str(d["phase"]) != phase:
            raise ConfigError(f"the config is for phase {d['phase']}, not phase {phase}")
        d["phase"] = phase
    return TrainConfig(**d)


def accumulation(global_batch: int, micro_batch: int, processes: int) -> int:
    """Micro-batches per optimiser step for the global batch on `processes` devices."""
    per_step = micro_batch * processes
    if global_batch % per_step:
        ok = sorted({b for b in range(max(per_step, global_batch - 4 * per_step), global_batch + 4 * per_step, per_step)})
        raise ConfigError(
            f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} x {processes} processes; "
            f"choose global_batch among {ok[:6]}, or a micro_batch / process count that divides it")
    return global_batch // per_step


# ------------------------------------------------------------------------------ model
def load_init(cfg: TrainConfig, device, decoders_on_device: bool = True):
    """The model this phase starts from: a preset name or a folder written by a phase.
    Without `decoders_on_device` (phases 1-3a, which run no U-Net or VAE) the decoders load
    on the CPU and stay there; only their text encoders come to `device`, and only when no
    text cache provides the E_text targets."""
    folder = None
    if cfg.init in PRESETS:
        config = XVilaConfig.from_name(cfg.init)
    else:
        folder = Path(cfg.init).expanduser()
        if not folder.is_dir():
            folder = Path(snapshot_download(cfg.init))  # a phase's output pushed to the Hub
        if not (folder / "config.json").is_file():
            raise ConfigError(f"init {cfg.init}: not a preset nor a folder written by a phase (no config.json)")
        config = XVilaConfig.from_json(folder / "config.json")
    if cfg.load_in_4bit is not None and cfg.load_in_4bit != config.load_in_4bit:
        config = config.replace(load_in_4bit=cfg.load_in_4bit, dtype="bfloat16" if cfg.load_in_4bit else config.dtype)
    model = build_xvila(config, device=device, folder=folder, seed=cfg.seed, offload_decoders=not decoders_on_device,
                        allow_outside_paths=cfg.allow_outside_paths)
    if not decoders_on_device and not cfg.text_cache:
        for decoder in model.decoders.values():
            decoder.text_encoder.to(device)
    return model


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_in_float32(model: nn.Module) -> int:
    """Trainable parameters in float32 (the master weights): on a GPU the model loads in
    fp16/bf16, where Adam's small updates (phase 3b's lr is 1e-6) would round away. The
    forward still computes in bf16 under the accelerator's autocast. Returns how many
    tensors were cast (none on a CPU, which loads float32)."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            cast += 1
    return cast


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig):
    """Adam (AdamW with the config's weight decay, 0 by default) and a per-step schedule:
    linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def enable_gradient_checkpointing(model, phase: str) -> None:
    """Recompute activations in the backward pass of what trains: the LLM's layers
    (phases 1-3a), the visual U-Nets (3b). Trades ~30% more compute for memory."""
    if phase == "3b":
        for m in VISUAL:
            unet = model.decoders[m].unet
            if unet._supports_gradient_checkpointing:
                unet.enable_gradient_checkpointing()
            else:  # diffusers' UNet3DConditionModel has none
                print(f"gradient checkpointing: {type(unet).__name__} ({m}) does not support it; left off")
    else:
        model.llm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Objective(nn.Module):
    """The model and its phase's loss as one module: what accelerate wraps, since DDP and
    DeepSpeed synchronise through `forward` (`loss_fn(model, batch)` -> named losses)."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_fn(self.model, batch)


# ---------------------------------------------------------------- DeepSpeed
# With bf16 (or fp16) on, DeepSpeed casts every parameter of the module to 16 bits at
# `prepare`, the float32 masters `train_in_float32` made included, and keeps the float32
# masters of what trains in its ZeRO optimiser (the update lands there, then a 16-bit copy
# in the module). So checkpoints take the masters from the optimiser, not the module:
# at phase 3b's lr of 1e-6 the 16-bit copies do not move at all.


def deepspeed_masters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float32 master of every trainable parameter (a collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu() for n, p in trainable(model).items()}


def storable_zero_state(state: dict) -> dict:
    """A ZeRO-1/2 optimiser state without its Python objects: the loss scaler (static for
    bf16; the engine's own is kept on load) and the parameter-slice map (only DeepSpeed's
    universal checkpoints read it)."""
    state = {k: v for k, v in state.items() if k not in ("loss_scaler", "param_slice_mappings")}
    state["zero_stage"] = int(state["zero_stage"])
    return state


# ---------------------------------------------------------------- nested state <-> safetensors
def _flatten(obj, prefix: str, tensors: dict):
    """A nested structure of dicts/lists/tensors/numbers -> JSON skeleton + flat tensors."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(skel, tensors: dict):
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]].clone()  # own memory, not the file's mapping
        if "__dict__" in skel:
            return {k: _unflatten(v, tensors) for k, v in skel["__dict__"]}
        if "__list__" in skel:
            return [_unflatten(v, tensors) for v in skel["__list__"]]
        return tuple(_unflatten(v, tensors) for v in skel["__tuple__"])
    return skel


def save_nested(obj, stem: Path) -> None:
    tensors: dict = {}
    skeleton = _flatten(obj, "s", tensors)
    write_safetensors(tensors, stem.with_suffix(".safetensors"))
    write_json(skeleton, stem.with_suffix(".json"))


def load_nested(stem: Path):
    return _unflatten(json.loads(stem.with_suffix(".json").read_text()), load_file(stem.with_suffix(".safetensors")))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------- signals
class StopSignal:
    """SIGTERM / SIGINT ask the run to stop after the current step (with a checkpoint); a
    second Ctrl-C (SIGINT) stops at once. More SIGTERMs change nothing: a cluster's
    scheduler and the launcher (torchrun forwards its own) may both send one.
    Installed only in the main thread (signals need it)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: stop now
                signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


# --------------------------------------------------------------------------------- run
@dataclass
class Progress:
    """What a resumed run must know of the one before it."""

    step: int = 0
    position: int = 0  # micro-batches this rank has drawn from its loader
    skipped: Counter = field(default_factory=Counter)
    samples: int = 0  # samples trained on, all ranks


class Run:
    """One phase's run: the accelerator and everything around the loop but the loop.
    A context manager: SIGTERM/SIGINT are caught while it is open."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedDataParallelKwargs, is_tensorboard_available, set_seed

        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / CHECKPOINTS
        self.resuming = resume
        if not resume and self.checkpoints():
            raise ResumeError(f"{self.ckpt_dir} already holds checkpoints: pass --resume to continue that run, "
                              "or choose another out_dir")
        log_with = cfg.log_with
        if log_with == "tensorboard" and not is_tensorboard_available():
            print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)", file=sys.stderr)
            log_with = None
        # accelerate keeps its settings in process-wide singletons: a second run in the same
        # process (tests, a notebook) may use another precision and accumulation. The
        # distributed state (process group) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        launcher_accum = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_dir=str(self.out),
            # batches differ in modalities, so some projections go unused in a step
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        # the global batch decides the accumulation, once the number of processes is known
        self.accum = accumulation(cfg.global_batch, cfg.micro_batch, acc.num_processes)
        if launcher_accum and launcher_accum.isdigit() and int(launcher_accum) != self.accum:
            raise ConfigError(f"the launcher set gradient accumulation to {launcher_accum}; this config needs "
                              f"{self.accum} for global_batch {cfg.global_batch}: do not set it there")
        acc.gradient_accumulation_steps = self.accum
        set_seed(cfg.seed + acc.process_index)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.device = acc.device
        self.progress = Progress()
        self.stop = StopSignal()
        self.last_checkpoint: Path | None = None
        self.losses: dict[str, float] = {}
        self._sums: Counter = Counter()
        self._counts: Counter = Counter()
        self._step_samples = 0
        self._t0 = time.time()
        self._window = (time.time(), 0)
        self._bar = None
        self.history: list[dict] = []  # (step, loss) of every step, for tests and the summary
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(cfg.to_dict(), self.out / "config.json")
            for stale in self.ckpt_dir.glob("step-*.tmp"):  # saves a crash interrupted
                shutil.rmtree(stale, ignore_errors=True)
        if log_with:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in cfg.to_dict().items()}
            acc.init_trackers(f"phase{cfg.phase}", config=flat)

    def __enter__(self) -> "Run":
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop.__exit__(*exc)
        if self._bar is not None:
            self._bar.close()
        return False

    # ------------------------------------------------------------------ model and optimiser
    def prepare(self, objective: Objective, optimizer):
        acc = self.accelerator
        if acc.state.deepspeed_plugin is not None:  # no dataloader goes through prepare: say the sizes
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = self.cfg.micro_batch
            ds["gradient_clipping"] = self.cfg.grad_clip
        return acc.prepare(objective, optimizer)

    # ------------------------------------------------------------------ data
    def next_batch(self, loader) -> dict:
        """The next non-empty micro-batch; empty ones (every sample broken) are counted and passed."""
        for _ in range(1000):
            batch = next(loader)
            self.progress.position += 1
            self.progress.skipped.update(batch["skipped"])
            if batch["size"]:
                self._step_samples += batch["size"]
                return batch
        raise XVilaError(f"1000 micro-batches in a row had no usable sample; skipped so far: "
                         f"{dict(self.progress.skipped)}")

    # ------------------------------------------------------------------ loss
    def check_finite(self, losses: dict[str, torch.Tensor], step: int, batch: dict) -> None:
        """Stop the run when a loss is NaN/inf: the step and the samples named, no checkpoint
        written (the last good one stays as it was)."""
        bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(v.detach()).all()}
        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, "max")
        if flag.item():
            where = f"step {step + 1}, micro-batch {batch['index']} of rank {self.rank}"
            what = ", ".join(f"{k} = {v}" for k, v in bad.items()) or "a loss on another rank"
            kept = str(self.last_checkpoint) if self.last_checkpoint else "none (no checkpoint written yet)"
            raise NonFiniteLossError(f"non-finite loss ({what}) at {where}, samples {batch['ids']}; "
                                     f"the run stops. Last good checkpoint: {kept}")
        for k, v in losses.items():
            self._sums[k] += float(v.detach())
            self._counts[k] += 1  # a part (align/video) may be absent from some micro-batches

    # ------------------------------------------------------------------ after each step
    def end_step(self, step: int, lr: float) -> bool:
        """Log, checkpoint every `save_every` steps; True when the run must stop now (a signal)."""
        cfg, acc = self.cfg, self.accelerator
        # "loss" last, the parts in a fixed order (batches differ in which parts they have)
        self.losses = {k: self._sums[k] / self._counts[k] for k in sorted(self._sums, key=lambda k: (k == "loss", k))}
        samples = self._step_samples
        if self.world > 1:
            samples = int(acc.reduce(torch.tensor(samples, device=self.device), "sum").item())
        self.progress.step = step
        self.progress.samples += samples
        self._sums.clear()
        self._counts.clear()
        self._step_samples = 0
        self.history.append({"step": step, **self.losses})
        t, n = self._window
        self._window = (t, n + samples)
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=cfg.steps, initial=step - 1, desc=f"phase {cfg.phase}", unit="step", dynamic_ncols=True,
                             disable=not acc.is_local_main_process)
        self._bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = self._window[1] / max(1e-9, time.time() - t)
            self._window = (time.time(), 0)
            self._bar.set_postfix(loss=f"{self.losses['loss']:.4f}", samples_s=f"{rate:.1f}")
            acc.log({**{f"loss/{k}": v for k, v in self.losses.items()}, "lr": lr, "samples_per_s": rate}, step=step)
            parts = " | ".join(f"{k} {v:.4f}" for k, v in self.losses.items())
            acc.print(f"step {step}/{cfg.steps} | {parts} | lr {lr:.3g} | {rate:.1f} samples/s", flush=True)
        stop = self.stop.signum is not None
        if self.world > 1:
            stop = bool(acc.reduce(torch.tensor(float(stop), device=self.device), "max").item())
        if stop or step % cfg.save_every == 0 or step == cfg.steps:
            self.save()
        return stop

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (a `.tmp` folder is a save that never finished);
        whether their files are intact is `resume`'s check."""
        if not self.ckpt_dir.is_dir():
            return []
        done = [p for p in self.ckpt_dir.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
        return sorted(done, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))

    def save(self) -> Path:
        """Write the checkpoint of the current step: into `step-N.tmp`, renamed when whole;
        then only the last `keep_last` are kept."""
        acc, step = self.accelerator, self.progress.step
        final, tmp = self.ckpt_dir / f"step-{step:06d}", self.ckpt_dir / f"step-{step:06d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.objective).model
        sharded = acc.state.deepspeed_plugin is not None  # ZeRO partitions the optimiser state per rank
        weights = deepspeed_masters(model) if sharded else {n: p.detach() for n, p in trainable(model).items()}
        if acc.is_main_process:
            write_safetensors(weights, tmp / "trainable.safetensors")
        if sharded or acc.is_main_process:
            state = storable_zero_state(self.optimizer.optimizer.state_dict()) if sharded else self.optimizer.state_dict()
            save_nested(state, tmp / (f"optimizer-rank{self.rank}" if sharded else "optimizer"))
        save_nested(rng_state(), tmp / f"rng-rank{self.rank}")
        positions = [self.progress.position]
        if self.world > 1:
            positions = acc.gather(torch.tensor([self.progress.position], device=self.device)).tolist()
        skipped = self._per_rank_skipped()
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json({
                "step": step, "positions": positions, "world_size": self.world, "phase": self.cfg.phase,
                "skipped": dict(sum((Counter(c) for c in skipped), Counter())), "skipped_per_rank": skipped,
                "samples": self.progress.samples,
                "scheduler": self.scheduler.state_dict(), "trainable": sorted(trainable(model)),
                "sharded_optimizer": sharded,
            }, tmp / "state.json")
            write_manifest(tmp)  # last: every rank's files are written (the barrier above)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
            for old in self.checkpoints()[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def resume(self) -> Progress:
        """With --resume, load the newest intact checkpoint (its files match its manifest;
        a damaged newer one is warned about and passed over) into the model, optimiser,
        scheduler and RNGs; returns where the run stands (step 0 when starting fresh)."""
        if not self.resuming:
            return self.progress
        found = self.checkpoints()
        if not found:
            raise ResumeError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
        folder = newest_intact(found)
        self._set_aside(found[found.index(folder) + 1:])
        state = json.loads((folder / "state.json").read_text())
        if state["phase"] != self.cfg.phase:
            raise ResumeError(f"{folder} is a phase-{state['phase']} checkpoint, this is phase {self.cfg.phase}")
        if state["world_size"] != self.world:
            raise ResumeError(f"{folder} was written by {state['world_size']} processes; exact resumption needs the "
                              f"same number (this run has {self.world})")
        model = self.accelerator.unwrap_model(self.objective).model
        params = trainable(model)
        saved = load_file(folder / "trainable.safetensors")
        if set(saved) != set(params):
            missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
            raise ResumeError(f"{folder} does not hold this phase's trainable parameters "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        stem = folder / (f"optimizer-rank{self.rank}" if state["sharded_optimizer"] else "optimizer")
        if state["sharded_optimizer"]:
            # ZeRO reads one state per data-parallel rank, by rank; with its float32 masters
            # (not rebuilt from the 16-bit module weights, which would lose what they hold).
            shards = [None] * self.world
            shards[self.rank] = load_nested(stem)
            self.optimizer.optimizer.load_state_dict(shards, load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(load_nested(stem))
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(load_nested(folder / f"rng-rank{self.rank}"))
        self.progress = Progress(state["step"], state["positions"][self.rank],
                                 Counter(state["skipped_per_rank"][self.rank]), state["samples"])
        self.last_checkpoint = folder
        self.accelerator.print(f"resumed from {folder} (step {state['step']}, {state['samples']:,} samples seen)")
        return self.progress

    def _set_aside(self, damaged: list[Path]) -> None:
        """Rename damaged checkpoints newer than the one resumed to `step-N.damaged`: kept for
        a look, but out of the way of `keep_last` (which must not delete the run's new, good
        checkpoints in their favour) and of the next --resume."""
        self.accelerator.wait_for_everyone()  # every rank has chosen before any folder moves
        if damaged and self.accelerator.is_main_process:
            for p in damaged:
                aside = p.with_name(p.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(p, aside)
                self.accelerator.print(f"set aside the damaged checkpoint {p} as {aside.name}")
        self.accelerator.wait_for_everyone()

    def attach(self, objective, optimizer, scheduler) -> None:
        """The prepared objects checkpoints save and resume."""
        self.objective, self.optimizer, self.scheduler = objective, optimizer, scheduler

    # ------------------------------------------------------------------ the end
    def finish(self, stopped: bool, record: dict | None = None, decoders: nn.ModuleDict | None = None) -> dict:
        """The summary line; at the last step, the final model folder (and a push to the Hub),
        with `decoders` put back into the model if the loop kept them apart."""
        acc, cfg = self.accelerator, self.cfg
        if self._bar is not None:
            self._bar.close()
        elapsed = time.time() - self._t0
        totals = self._skipped_totals()
        skipped = sum(totals.values())
        detail = f" ({', '.join(f'{k} {n}' for k, n in totals.most_common())})" if skipped else ""
        final = None
        if not stopped and acc.is_main_process:
            model = acc.unwrap_model(self.objective).model
            if decoders is not None:
                model.decoders = decoders
            record = {"phase": cfg.phase, "init": cfg.init, "steps_done": self.progress.step,
                      "hyperparameters": {k: getattr(cfg, k) for k in export.HYPERPARAMETERS},
                      "samples": self.progress.samples, "skipped": dict(totals), **(record or {})}
            final = export.write_folder(model, self.out / FINAL, phase_record=record)
            if cfg.push_to_hub:
                export.push_to_hub(final, cfg.push_to_hub)
        acc.wait_for_everyone()
        loss = f"{self.losses['loss']:.4f}" if self.losses else "n/a"
        state = "stopped by a signal at" if stopped else "done:"
        acc.print(f"phase {cfg.phase} {state} step {self.progress.step}/{cfg.steps} in {_hms(elapsed)}, last loss {loss}, "
                  f"{self.progress.samples:,} samples ({self.progress.samples / max(elapsed, 1e-9):.1f}/s), "
                  f"{skipped} skipped{detail}; checkpoint {self.last_checkpoint}"
                  + (f"; model {final}" if final else ""), flush=True)
        acc.end_training()  # last: it ends the process group
        return {"stopped": stopped, "step": self.progress.step, "losses": self.history, "final": final,
                "skipped": dict(totals), "checkpoint": self.last_checkpoint}

    def _per_rank_skipped(self) -> list[dict]:
        if self.world == 1:
            return [dict(self.progress.skipped)]
        from accelerate.utils import gather_object

        return gather_object([dict(self.progress.skipped)])

    def _skipped_totals(self) -> Counter:
        return sum((Counter(c) for c in self._per_rank_skipped()), Counter())


def _hms(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run phase `cfg.phase` to `cfg.steps` (or to a stop signal, with a checkpoint); the summary."""
    phase = PHASES[cfg.phase]
    with Run(cfg, resume) as run:
        acc = run.accelerator
        # ---------------------------------------------------------------- model
        model = load_init(cfg, run.device, decoders_on_device=phase.uses_decoders)
        counts = model.set_trainable(phase.key, verbose=acc.is_main_process)
        train_in_float32(model)
        phase.modes(model)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model, phase.key)
        # Phases 1-3a run no U-Net or VAE: their decoders leave the module the accelerator
        # prepares (it would move them to the GPU, DeepSpeed would cast them, DDP refuses a
        # module on two devices), give the E_text targets from outside it, and rejoin the
        # model for the final folder (its controllers are part of it).
        decoders = model.decoders
        if not phase.uses_decoders:
            model.decoders = nn.ModuleDict()

        # ---------------------------------------------------------------- data
        batches.check_kind(cfg.manifests, phase.kinds, phase.key)
        data = batches.Batches.from_config(cfg, phase.samples, model, run.rank, run.world, **phase.data(cfg))
        acc.print(f"data: {data.manifest_counts()}{phase.about}; {run.accum} micro-batches of {cfg.micro_batch} x "
                  f"{run.world} processes per step = {cfg.global_batch}")

        # ---------------------------------------------------------------- optimiser
        params = list(trainable(model).values())
        optimizer, scheduler = make_optimizer(params, cfg)
        objective, optimizer = run.prepare(Objective(model, phase.loss(cfg)), optimizer)
        run.attach(objective, optimizer, scheduler)

        # ---------------------------------------------------------------- resume
        start = run.resume()
        loader = batches.loader(data, start.position, cfg.num_workers, cfg.prefetch_factor, cfg.seed)

        # ---------------------------------------------------------------- training loop
        stopped = False
        for step in range(start.step, cfg.steps):
            for _ in range(run.accum):
                batch = batches.with_text_targets(model, run.next_batch(loader), decoders)
                with acc.accumulate(objective):
                    losses = objective(batch)
                    run.check_finite(losses, step, batch)
                    acc.backward(losses["loss"])
            acc.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if run.end_step(step + 1, scheduler.get_last_lr()[0]):
                stopped = True
                break

        # ---------------------------------------------------------------- the end
        record = {"phase": phase.key, "trains": counts, "data": data.manifest_counts(), **phase.record(cfg)}
        return run.finish(stopped, record=record, decoders=decoders)
