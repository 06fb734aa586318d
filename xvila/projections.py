"""P_in and P_out: the trainable bridges between encoders, the LLM and the decoders.

`InputProjection` (P_in, one per modality): ImageBind output -> k embeddings in the LLM's
input space. k = 1 projects the pooled embedding (NExT-GPT style); k > 1 average-pools the
trunk's token grid to k tokens and projects each.

`OutputProjection` (P_out, one per modality): the hidden states of a modality's generation
tokens, S_gen [n, hidden] -> the decoder's text-conditioning space E_text [L, C] (77x768
for SD1.5, 77x1024 for the video decoder, 1x512 for AudioLDM's CLAP). A small transformer
decoder whose L learned queries attend to the projected S_gen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InputProjection(nn.Module):
    def __init__(self, in_dim: int, hidden: int, k: int):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(in_dim, hidden)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """pooled [N, out_dim] (k = 1) or tokens [N, L, D] (k > 1) -> [N, k, hidden]."""
        if self.k == 1:
            return self.proj(pooled)[:, None]
        grid = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.k).transpose(1, 2)  # [N, k, D]
        return self.proj(grid)


class OutputProjection(nn.Module):
    def __init__(self, hidden: int, cond_shape: list[int], dim: int, layers: int, heads: int):
        super().__init__()
        length, channels = cond_shape
        self.cond_shape = (length, channels)
        self.inp = nn.Linear(hidden, dim)
        self.queries = nn.Parameter(torch.randn(length, dim) * dim**-0.5)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))
        self.out = nn.Linear(dim, channels)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """S_gen [N, n, hidden] -> E_text [N, L, C], in P_out's dtype (the LLM may run in
        fp16/bf16 while the projections keep float32)."""
        memory = self.inp(states.to(self.inp.weight.dtype))
        queries = self.queries.expand(states.shape[0], -1, -1)
        return self.out(self.decoder(queries, memory))
