"""The X²A score (paper §3.1): ImageBind embeddings of a generated file and of its ground
truth, cosine similarity ×100.

    from xvila.evaluation import x2a_score
    x2a_score("generated.mp4", "truth.mp4", model)   # model: an XVila or an ImageBind

Files go through ImageBind's official preprocessing (`xvila.encoders.imagebind_preprocess`:
an image at 224 px; a video as 5 clips of 2 frames, 3 crops each; audio as 3 clips of 2 s
of mel filterbanks), so the score of a file against itself is 100. `Embedder` encodes in
batches and caches by file content (sha256), so a benchmark encodes each file once however
often it is scored.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from xvila import media
from xvila.constants import AUDIO, IMAGE, VIDEO
from xvila.encoders import imagebind_preprocess as pre
from xvila.encoders.imagebind import AUDIO as IB_AUDIO
from xvila.encoders.imagebind import VISION as IB_VISION
from xvila.encoders.imagebind import ImageBind
from xvila.evaluation.stats import EvaluationError
from xvila.model import XVila



def imagebind_embed(model, modality: str, batch: torch.Tensor) -> torch.Tensor:
    """Official ImageBind embeddings [N, D] of a preprocessed batch of one modality.

    `model` is an XVila (its one encoding method, `XVila.encode`, is used) or an ImageBind.
    """
    if isinstance(model, XVila):
        with torch.no_grad():
            return model.encode(modality, batch)["pooled"].float()
    imagebind = imagebind_of(model)
    key = IB_AUDIO if modality == AUDIO else IB_VISION
    param = next(imagebind.parameters())
    with torch.no_grad():
        out = imagebind.encode({key: batch.to(param.device, param.dtype)}, tokens=False, vision_blocks=False)
    return out.embeds[key].float()


def imagebind_of(model) -> ImageBind:
    """The ImageBind of an XVila, or `model` itself when it is one."""
    imagebind = model if isinstance(model, ImageBind) else getattr(model, "imagebind", None)
    if not isinstance(imagebind, ImageBind):
        raise EvaluationError(f"the X²A score needs an XVila or an ImageBind, not a {type(model).__name__}")
    return imagebind


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Embedder:
    """Unit-length ImageBind embeddings of files, batched per modality, cached by content."""

    def __init__(self, model, batch_size: int = 8):
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be positive, not {batch_size}")
        imagebind_of(model)  # a wrong model fails here, not at the first file
        self.model, self.batch_size = model, batch_size
        self.cache: dict[tuple[str, str], torch.Tensor] = {}  # (modality, sha256) -> [D] on the CPU
        self.encoded = 0  # files run through ImageBind (cache misses), for tests and logs

    def embed(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """[len(paths), D] unit vectors; each file's modality comes from its extension."""
        if not paths:
            raise EvaluationError("nothing to embed: no files given")
        keys = []
        for p in paths:
            if not Path(p).is_file():
                raise EvaluationError(f"{p}: no such file to score")
            keys.append((media.media_kind(p), file_digest(p)))
        todo: dict[tuple[str, str], str] = {}
        for key, p in zip(keys, paths):
            if key not in self.cache:
                todo.setdefault(key, str(p))
        for modality in (IMAGE, VIDEO, AUDIO):
            items = [(k, p) for k, p in todo.items() if k[0] == modality]
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                batch = torch.stack([pre.load(p, modality, imagebind_of(self.model).config) for _, p in chunk])
                emb = torch.nn.functional.normalize(imagebind_embed(self.model, modality, batch), dim=-1).cpu()
                for (k, _), e in zip(chunk, emb):
                    self.cache[k] = e
                self.encoded += len(chunk)
        return torch.stack([self.cache[k] for k in keys])

    def score(self, pred: str | os.PathLike, truth: str | os.PathLike) -> float:
        a, b = self.embed([pred, truth])
        return float((a @ b).clamp(-1.0, 1.0)) * 100.0

    def scores(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Scores of many (pred, truth) pairs, every new file encoded in one batched pass."""
        if not pairs:
            return []
        emb = self.embed([p for pair in pairs for p in pair]).reshape(len(pairs), 2, -1)
        return [float(c) * 100.0 for c in (emb[:, 0] * emb[:, 1]).sum(-1).clamp(-1.0, 1.0)]


# One embedder (and its cache) per model, kept only while the model lives.
_EMBEDDERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def embedder_for(model) -> Embedder:
    imagebind_of(model)
    if model not in _EMBEDDERS:
        _EMBEDDERS[model] = Embedder(model)
    return _EMBEDDERS[model]


def x2a_score(pred: str | os.PathLike, truth: str | os.PathLike, model) -> float:
    """The X²A score of one generated file against its ground truth: cosine similarity of
    their ImageBind embeddings ×100 (100: the same content; unrelated content scores lower)."""
    return embedder_for(model).score(pred, truth)
