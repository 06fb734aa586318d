"""Runs phase 1 in this process under DeepSpeed ZeRO-2, bf16, as one process on the CPU
(the environment `accelerate launch` with the ZeRO-2 config gives a rank):

    python tests/deepspeed_run.py CONFIG.yaml [--resume]

Nothing is patched: the model holds no 0-dim parameter, which DeepSpeed 0.19.8 refuses
(its start-up broadcast views every parameter as bytes); the only one ImageBind has, its
text tower's logit scale, is not part of X-VILA's model (`xvila.model.IMAGEBIND_TOWERS`).
"""

import os
import sys

import torch
import yaml

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2",
                  ACCELERATE_GRADIENT_CLIPPING="1.0", ACCELERATE_MIXED_PRECISION="bf16")
os.environ.setdefault("MASTER_PORT", "29541")
torch.set_num_threads(1)

from train.loop import TrainConfig, train  # noqa: E402

if __name__ == "__main__":
    cfg = TrainConfig(**yaml.safe_load(open(sys.argv[1])))
    train(cfg, resume="--resume" in sys.argv)
