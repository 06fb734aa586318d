"""Runs phase 1 in this process under DeepSpeed ZeRO-2, bf16, as one process on the CPU
(the environment `accelerate launch` with the ZeRO-2 config gives a rank):

    python tests/deepspeed_run.py CONFIG.yaml [--resume]

DeepSpeed 0.19.8 refuses a 0-dim parameter (its start-up broadcast views every parameter
as bytes). The model's only one is ImageBind's text-tower logit scale, a part X-VILA does
not use (issue 11 takes the text tower out of the trained model); until then it is made
1-dim here, before the model is built.
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

import xvila.encoders.imagebind as imagebind  # noqa: E402

_init = imagebind.LogitScale.__init__


def _one_dim(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if isinstance(self.log_logit_scale, torch.nn.Parameter) and self.log_logit_scale.dim() == 0:
        self.log_logit_scale = torch.nn.Parameter(self.log_logit_scale.data.reshape(1), requires_grad=False)


imagebind.LogitScale.__init__ = _one_dim

from train import phase1  # noqa: E402
from train.loop import TrainConfig  # noqa: E402

if __name__ == "__main__":
    cfg = TrainConfig(**yaml.safe_load(open(sys.argv[1])))
    phase1.main(cfg, resume="--resume" in sys.argv)
