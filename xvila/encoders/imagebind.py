"""ImageBind (vision, text, audio): our own module, a drop-in for the official checkpoint.

The parameter and buffer names are those of `facebookresearch/ImageBind`'s
`ImageBindModel` (`modality_preprocessors.*`, `modality_trunks.*`, `modality_heads.*`,
`modality_postprocessors.*`), so `imagebind_huge.pth` (or `nielsr/imagebind-huge`'s
safetensors) loads strictly once the depth/thermal/IMU keys are dropped. The forward is
the official one for the same inputs:

    model({"vision": x, "text": t, "audio": a}) -> {"vision": [B, out], ...}

with images `[B,3,224,224]`, videos `[B,S,3,2,224,224]` (S clips) and audio
`[B,S,1,128,204]`; inputs with clips (ndim >= 5) are embedded per clip and averaged.

X-VILA needs more than the pooled embedding, so `encode()` also returns the trunk's
token grid (input to P_in with k > 1) and the vision trunk's per-block outputs summed
and laid out as H x W x C (the visual embedding highway's E_vis).

This module does no I/O: weights are loaded by `xvila.encoders.imagebind_weights.load_imagebind`.
The encoder is frozen in every X-VILA phase, so stochastic depth (the official
`audio_drop_path`) is kept as a config field for fidelity but never applied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from xvila.errors import ConfigError

VISION, TEXT, AUDIO = "vision", "text", "audio"
MODALITIES = (VISION, TEXT, AUDIO)


@dataclass
class ImageBindConfig:
    """Field names mirror the official `ImageBindModel` constructor; defaults are huge."""

    video_frames: int = 2
    kernel_size: tuple[int, int, int] = (2, 14, 14)
    audio_kernel_size: int = 16
    audio_stride: int = 10
    out_embed_dim: int = 1024
    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    audio_drop_path: float = 0.1
    text_embed_dim: int = 1024
    text_num_blocks: int = 24
    text_num_heads: int = 16
    # Fixed inside the official constructor; fields here so a tiny model can shrink them.
    image_size: int = 224
    text_context_length: int = 77
    text_vocab_size: int = 49408
    modalities: tuple[str, ...] = field(default=MODALITIES)

    def __post_init__(self):
        self.kernel_size = tuple(self.kernel_size)
        self.modalities = tuple(self.modalities)
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            raise ConfigError(f"ImageBind modalities {sorted(unknown)} are not supported; use {MODALITIES}")
        for m in (VISION, TEXT, AUDIO):
            dim, heads = getattr(self, f"{m}_embed_dim"), getattr(self, f"{m}_num_heads")
            if dim % heads:
                raise ConfigError(f"{m}_embed_dim={dim} is not divisible by {m}_num_heads={heads}")

    @classmethod
    def from_name(cls, name: str) -> "ImageBindConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown ImageBind preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "ImageBindConfig":
        """Reads our own config and the official constructor's kwargs (extra keys such as
        depth/thermal/IMU sizes are ignored: those modalities are not built)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    # Token layouts, derived from the stems (the official code probes them with a dummy input).
    @property
    def vision_grid(self) -> tuple[int, int, int]:
        kt, kh, kw = self.kernel_size
        return (self.video_frames // kt, self.image_size // kh, self.image_size // kw)

    @property
    def audio_grid(self) -> tuple[int, int]:
        k, s = self.audio_kernel_size, self.audio_stride
        return ((self.audio_num_mel_bins - k) // s + 1, (self.audio_target_len - k) // s + 1)


PRESETS: dict[str, dict] = {
    "imagebind-huge": {},
    # A few seconds to build on a CPU; same layouts (224 px, 128x204 mel, 77 text tokens).
    "tiny": dict(
        out_embed_dim=16,
        vision_embed_dim=32, vision_num_blocks=2, vision_num_heads=2,
        audio_embed_dim=32, audio_num_blocks=2, audio_num_heads=2,
        text_embed_dim=32, text_num_blocks=2, text_num_heads=2,
        text_vocab_size=1024,
    ),
}


# ---------------------------------------------------------------------------- helpers
# Small parameter-free modules sit where the official model has them so that the indices
# inside nn.Sequential (and hence the state-dict keys) are the same.


class PadIm2Video(nn.Module):
    """An image [B,C,H,W] becomes a clip of `ntimes` identical frames [B,C,T,H,W]."""

    def __init__(self, ntimes: int):
        super().__init__()
        self.ntimes = ntimes

    def forward(self, x):
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.ntimes, -1, -1)
        return x


class SelectToken(nn.Module):
    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[:, self.index]


class Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1, p=2)


class LogitScale(nn.Module):
    """exp(log_logit_scale), capped at 100, times x; a parameter or a fixed buffer."""

    def __init__(self, init: float, learnable: bool, max_scale: float = 100.0):
        super().__init__()
        self.max_scale = max_scale
        value = torch.tensor(math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x):
        return torch.clip(self.log_logit_scale.exp(), max=self.max_scale) * x


# ---------------------------------------------------------------------------- preprocessors


class PatchStem(nn.Module):
    """Patchify with a strided conv, flatten to tokens, optional LayerNorm."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)  # B C (T) H W -> B (T)HW C
        return self.norm_layer(x) if self.norm_layer is not None else x


class PosEmbed(nn.Module):
    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * dim**-0.5)


class PatchPreprocessor(nn.Module):
    """Patch tokens, a CLS token in front, learned positions (official RGBDTPreprocessor)."""

    def __init__(self, stem: PatchStem, num_patches: int, dim: int):
        super().__init__()
        self.rgbt_stem = stem
        self.pos_embedding_helper = PosEmbed(1 + num_patches, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)

    def forward(self, x):
        tokens = self.rgbt_stem(x)
        pos = self.pos_embedding_helper.pos_embed
        if tokens.shape[1] + 1 != pos.shape[1]:
            raise ValueError(
                f"input gives {tokens.shape[1]} patches but the model has positions for "
                f"{pos.shape[1] - 1}; preprocess inputs to the model's size (see imagebind_preprocess)"
            )
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + pos


class TextPreprocessor(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, dim) * 0.01)
        # Persistent, as in the official model: the checkpoint carries it.
        self.register_buffer("mask", torch.full((context_length, context_length), float("-inf")).triu_(1))

    def forward(self, text):
        return self.token_embedding(text) + self.pos_embed


# ---------------------------------------------------------------------------- trunk


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; torch's MultiheadAttention has the official key names."""

    def __init__(self, dim: int, heads: int, add_bias_kv: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=add_bias_kv, batch_first=True)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, attn_mask=None):
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, pre_ln: bool, add_bias_kv: bool):
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6) if pre_ln else nn.Identity())
        self.blocks = nn.Sequential(*[Block(dim, heads, add_bias_kv) for _ in range(depth)])
        for m in self.modules():  # the official "jax" init
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens, attn_mask=None, sum_blocks: bool = False):
        """Returns the last hidden state and, if asked, the sum of every block's output in
        float32: 32 ViT-H block outputs can sum past float16's range (65504)."""
        x = self.pre_transformer_layer(tokens)
        block_sum = torch.zeros_like(x, dtype=torch.float32) if sum_blocks else None
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask)
            if sum_blocks:
                block_sum = block_sum + x
        return x, block_sum


# ---------------------------------------------------------------------------- heads


class TextHead(nn.Module):
    """OpenCLIP pooling: the features at the end-of-text token, then LN + projection."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim, bias=False))

    def forward(self, x, eos_index):
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eos_index])


def _cls_head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), SelectToken(0), nn.Linear(dim, out_dim, bias=False))


# ---------------------------------------------------------------------------- model


@dataclass
class ImageBindOutput:
    """`embeds[m]`: the official output, [B, out_embed_dim] (averaged over clips).
    `tokens[m]`: the trunk's last hidden state, [B, L, D] or [B, S, L, D] for clip inputs.
    `vision_blocks`: E_vis, the vision trunk's block outputs summed, patch tokens only,
    as [B, H, W, C] or [B, S, H, W, C] for clip inputs (H = W = 16 for 224 px / 14 px)."""

    embeds: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    vision_blocks: torch.Tensor | None = None


class ImageBind(nn.Module):
    def __init__(self, config: ImageBindConfig):
        super().__init__()
        self.config = c = config
        pre, trunks, heads, post = {}, {}, {}, {}
        if VISION in c.modalities:
            stem = PatchStem(nn.Sequential(
                PadIm2Video(ntimes=c.video_frames),
                nn.Conv3d(3, c.vision_embed_dim, kernel_size=c.kernel_size, stride=c.kernel_size, bias=False),
            ))
            pre[VISION] = PatchPreprocessor(stem, math.prod(c.vision_grid), c.vision_embed_dim)
            trunks[VISION] = Trunk(c.vision_embed_dim, c.vision_num_blocks, c.vision_num_heads, pre_ln=True, add_bias_kv=False)
            heads[VISION] = _cls_head(c.vision_embed_dim, c.out_embed_dim)
            post[VISION] = Normalize()
        if TEXT in c.modalities:
            pre[TEXT] = TextPreprocessor(c.text_vocab_size, c.text_context_length, c.text_embed_dim)
            trunks[TEXT] = Trunk(c.text_embed_dim, c.text_num_blocks, c.text_num_heads, pre_ln=False, add_bias_kv=False)
            heads[TEXT] = TextHead(c.text_embed_dim, c.out_embed_dim)
            post[TEXT] = nn.Sequential(Normalize(), LogitScale(init=1 / 0.07, learnable=True))
        if AUDIO in c.modalities:
            stem = PatchStem(
                nn.Conv2d(1, c.audio_embed_dim, kernel_size=c.audio_kernel_size, stride=c.audio_stride, bias=False),
                norm_layer=nn.LayerNorm(c.audio_embed_dim),
            )
            pre[AUDIO] = PatchPreprocessor(stem, math.prod(c.audio_grid), c.audio_embed_dim)
            trunks[AUDIO] = Trunk(c.audio_embed_dim, c.audio_num_blocks, c.audio_num_heads, pre_ln=False, add_bias_kv=True)
            heads[AUDIO] = _cls_head(c.audio_embed_dim, c.out_embed_dim)
            post[AUDIO] = nn.Sequential(Normalize(), LogitScale(init=20.0, learnable=False))
        self.modality_preprocessors = nn.ModuleDict(pre)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(post)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official forward: normalised (and, for text/audio, scaled) embeddings."""
        return self.encode(inputs, tokens=False, vision_blocks=False).embeds

    def encode(self, inputs: dict[str, torch.Tensor], tokens: bool = True, vision_blocks: bool = True) -> ImageBindOutput:
        out = ImageBindOutput(embeds={})
        for m, x in inputs.items():
            if m not in self.modality_trunks:
                raise ValueError(f"this ImageBind has no {m!r} encoder (it has {list(self.modality_trunks)})")
            clips = x.shape[:2] if x.ndim >= 5 else None  # [B, S, ...]: S clips per item
            if clips is not None:
                x = x.flatten(0, 1)
            want_blocks = vision_blocks and m == VISION
            hidden, block_sum = self._trunk(m, x, want_blocks)
            emb = self.modality_postprocessors[m](self._head(m, hidden, x))
            if clips is not None:
                emb = emb.unflatten(0, clips).mean(dim=1)
            out.embeds[m] = emb
            if tokens:
                out.tokens[m] = hidden.unflatten(0, clips) if clips is not None else hidden
            if want_blocks:
                grid = block_sum[:, 1:].unflatten(1, self.config.vision_grid[1:])  # drop CLS; (T=1) H W
                out.vision_blocks = grid.unflatten(0, clips) if clips is not None else grid
        return out

    def _trunk(self, m: str, x: torch.Tensor, sum_blocks: bool):
        tokens = self.modality_preprocessors[m](x)
        mask = self.modality_preprocessors[m].mask.to(tokens.dtype) if m == TEXT else None
        return self.modality_trunks[m](tokens, attn_mask=mask, sum_blocks=sum_blocks)

    def _head(self, m: str, hidden: torch.Tensor, x: torch.Tensor):
        if m == TEXT:
            # The end-of-text token has the largest id in CLIP's vocabulary.
            return self.modality_heads[m](hidden, eos_index=x.argmax(dim=-1))
        return self.modality_heads[m](hidden)


def mean_clips(x: torch.Tensor, rank: int) -> torch.Tensor:
    """A batch [N, S, *item] of a video's or an audio's S clips -> [N, *item], the clips
    averaged; a batch without a clip axis ([N, *item], `rank` dimensions) as it is. The one
    place where clips of token grids and of E_vis are averaged (ImageBind's own pooled
    embedding averages its clips in `encode`)."""
    if x.ndim == rank + 1:
        return x.mean(dim=1)
    if x.ndim != rank:
        raise ValueError(f"expected a batch of {rank} dimensions, or {rank + 1} with clips; got shape {tuple(x.shape)}")
    return x
