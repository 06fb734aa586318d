"""Multi-process training on the engines the launch configs name, as far as a CPU allows.

- Both 4x8 launch configs (DeepSpeed ZeRO-2, FSDP2) go through `accelerate launch`'s own
  argument handling, and accelerate builds its plugin object from the environment that
  launch would give the processes.
- Phase 1 under `accelerate launch` with 2 CPU processes (DDP over gloo) ends with the
  same weights as 1 process: with the global batch fixed, rank r's micro-batch k is the
  1-process run's micro-batch 2k+r (`train.batches`), phase 1's losses draw no random
  numbers, and DDP's mean over ranks is the 1-process mean over accumulated micro-batches.
- Phase 1 under DeepSpeed ZeRO-2 in bf16 (one CPU process): checkpoints hold the float32
  masters DeepSpeed keeps in its optimiser (it casts the module itself to bf16), and a
  resumed run ends bit-identical to one never stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_train_loop import MANIFESTS, config, make_world
from xvila import XVila

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "train" / "configs" / "accelerate"


def launch_env(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file F` gives each process (its
    launcher replaced by a function that keeps what it would have passed on)."""
    import accelerate.commands.launch as launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    seen: dict[str, str] = {}
    args = launch.launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "train", "phase2"])
    with mock.patch.object(launch, "deepspeed_launcher", lambda a: seen.update(prepare_deepspeed_cmd_env(a)[1])), \
            mock.patch.object(launch, "multi_gpu_launcher", lambda a: seen.update(prepare_multi_gpu_env(a))):
        launch.launch_command(args)
    return {k: v for k, v in seen.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_the_deepspeed_config_builds_accelerates_zero2_plugin():
    import deepspeed  # noqa: F401  requirements-test.txt installs it (through requirements-train.txt)

    from accelerate.utils import DeepSpeedPlugin

    env = launch_env(ACCELERATE_CONFIGS / "4x8-a100-zero2.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["gradient_clipping"] == 1.0
    assert ds["gradient_accumulation_steps"] == "auto"  # the loop sets it from global_batch


def test_the_fsdp_config_builds_accelerates_fsdp2_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    raw = yaml.safe_load((ACCELERATE_CONFIGS / "4x8-a100-fsdp.yaml").read_text())
    assert (raw["num_machines"], raw["num_processes"], raw["mixed_precision"]) == (4, 32, "bf16")
    env = launch_env(ACCELERATE_CONFIGS / "4x8-a100-fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is False  # SHARD_GRAD_OP: ZeRO-2's sharding
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.activation_checkpointing is False  # the loop's gradient_checkpointing does it
    # the class to wrap exists under that name in the pinned transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert LlamaDecoderLayer.__name__ == "LlamaDecoderLayer"


# ------------------------------------------------------------------ 2 processes == 1 process


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("data"))


def accelerate_phase1(world: Path, tmp: Path, processes: int) -> dict[str, torch.Tensor]:
    """Phase 1, 3 steps of global batch 4 in micro-batches of 2, under `accelerate launch`
    on the CPU (gloo); the trainable weights at the end."""
    name = f"p{processes}"
    cfg = config(world, tmp, "1", MANIFESTS["1"], steps=3, global_batch=4, micro_batch=2, lr=1e-2, save_every=3,
                 out_dir=str(tmp / name))
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # `--cpu` launches one process (more need MPI); `--multi_gpu` is torchrun, and
    # ACCELERATE_USE_CPU keeps its processes on the CPU, where accelerate picks gloo.
    env["ACCELERATE_USE_CPU"] = "true"
    mode = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "train", "phase1", "--config", str(tmp / f"{name}.yaml")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"x {processes} processes per step = 4" in done.stdout, done.stdout[:600]
    return load_file(tmp / name / "checkpoints" / "step-000003" / "trainable.safetensors")


def test_two_cpu_processes_under_accelerate_train_the_same_weights_as_one(world, tmp_path):
    one, two = accelerate_phase1(world, tmp_path, 1), accelerate_phase1(world, tmp_path, 2)
    start = {n: p.detach() for n, p in XVila.from_pretrained("tiny-random").named_parameters()}
    assert one.keys() == two.keys() and one
    moved = [n for n in one if not torch.equal(one[n], start[n])]
    assert len(moved) > len(one) // 2  # the run did train
    for n in one:  # equal up to the order of float additions (all-reduce vs accumulation)
        torch.testing.assert_close(two[n], one[n], atol=1e-6, rtol=1e-5, msg=n)


# ------------------------------------------------------------------ DeepSpeed ZeRO-2, bf16


def deepspeed_phase1(cfg: dict, tmp: Path, resume: bool = False) -> None:
    path = tmp / f"ds-{len(list(tmp.glob('ds-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(REPO / "tests" / "deepspeed_run.py"), str(path)] + (["--resume"] if resume else [])
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_deepspeed_bf16_checkpoints_hold_the_float32_masters_and_resume_exactly(world, tmp_path):
    """DeepSpeed casts the whole module to bf16 and keeps the float32 masters in its ZeRO
    optimiser: at a small lr the bf16 copies do not move, the masters do. Checkpoints must
    hold the masters, and a run resumed from one ends as the run never stopped."""
    import shutil

    base = config(world, tmp_path, "1", MANIFESTS["1"], steps=4, global_batch=4, micro_batch=4, lr=1e-6,
                  save_every=2, keep_last=5, mixed_precision="bf16")
    whole = tmp_path / "whole"
    deepspeed_phase1({**base, "out_dir": str(whole)}, tmp_path)
    ckpt = whole / "checkpoints"
    at2, at4 = (load_file(ckpt / f"step-00000{s}" / "trainable.safetensors") for s in (2, 4))
    assert {v.dtype for v in at4.values()} == {torch.float32}
    p_in = [n for n in at4 if n.startswith("p_in.")]
    moved = [n for n in p_in if not torch.equal(at4[n], at2[n])]
    assert moved == p_in  # the masters moved, and mostly by less than bf16 can show:
    hidden = sum(int((at4[n].bfloat16() == at2[n].bfloat16()).sum()) for n in p_in)
    assert hidden > 0.5 * sum(at4[n].numel() for n in p_in)
    # the module's bf16 copies would have been saved as values bf16 represents exactly
    assert all(not torch.equal(at4[n], at4[n].bfloat16().float()) for n in p_in)

    resumed = tmp_path / "resumed"  # the same run, stopped after its step-2 checkpoint
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "final")
    deepspeed_phase1({**base, "out_dir": str(resumed)}, tmp_path, resume=True)
    for name in ("trainable.safetensors", "optimizer-rank0.safetensors"):
        a, b = load_file(ckpt / "step-000004" / name), load_file(resumed / "checkpoints" / "step-000004" / name)
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], name
