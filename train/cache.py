"""python -m train.cache features --manifest data/pairs.jsonl --root data/ --model xvila-7b --out cache/features

Embedding caches, computed once so that training never runs the big frozen encoders:

    python -m train.cache features --manifest data/pairs.jsonl --root data/ --model xvila-7b \\
        --out cache/features --batch-size 16 --workers 8
    python -m train.cache text --manifest data/pairs.jsonl --model xvila-7b --out cache/text

- `build_feature_cache`: per media file, ImageBind's outputs through the model's own
  preprocessing and ImageBind (`imagebind_preprocess.load`, `XVila.encode`):
  ``pooled`` [out_dim]; ``tokens`` (the trunk's token grid, only where the model's
  `tokens_per_input` for that modality is > 1) [L, D]; ``highway`` (E_vis, image and video)
  [H, W, C]. For clip inputs (video, audio) tokens and highway are averaged over the clips,
  by `mean_clips`, as the chat's path does anyway (a video's 15 clip grids would
  be 15x the disk); `keep_clips=True` stores them per clip. Read with
  `FeatureCache(dir).get(rel_path)`.
- `build_text_cache`: per (modality, caption), the decoder text encoder's embedding,
  `decoders[m].encode_text([caption])[0]` (the E_text target of phases 1 and 3a). Read
  with `TextCache(dir).get(modality, caption)`.

On disk: shards `<kind>-00000.safetensors`, ... and `index.jsonl`, one line per finished
shard: ``{"shard": name, "entries": {key: {"n": i, ...}}, "skipped": [...]}``. A shard is
written atomically (`write_safetensors`: temporary file, rename) before its index line is
appended and fsync'ed, so the index only names whole shards; a torn last line is dropped.
A second call skips every key already indexed (broken files included: they are recorded
with their reason and not retried), so an interrupted build resumes where its last shard
ended. Keys: a feature is keyed by its media path relative to `root` (one cache per root),
a text embedding by modality and the SHA-1 of its caption.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from train.data import Skipped, UnsafePathError, read_manifest, record_captions, record_media, resolve
from xvila import media
from xvila.constants import AUDIO, IMAGE, VIDEO
from xvila.encoders import imagebind_preprocess as pre
from xvila.errors import ConfigError, XVilaError
from xvila.fileio import write_safetensors
from xvila.model import XVila

INDEX = "index.jsonl"


class NotCachedError(XVilaError, KeyError):
    """The key is not in the cache (never built, or skipped as broken)."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0])


@dataclass
class CacheReport:
    computed: int  # entries encoded by this call
    reused: int  # requests served without encoding: cached or skipped before, or repeated
    skipped: Skipped  # broken inputs, this call and earlier ones


# ------------------------------------------------------------------------------ storage
def _read_index(out_dir: Path) -> tuple[list[dict], int]:
    """The index's whole lines and the byte length they take (a torn last line is not counted)."""
    path, lines, good = out_dir / INDEX, [], 0
    if path.exists():
        with path.open("rb") as f:
            for raw in f:
                try:
                    lines.append(json.loads(raw))
                except ValueError:  # a crash mid-append: everything after is dropped
                    break
                good += len(raw)
    return lines, good


class _Index:
    """The entries and skips of a cache folder, read from its index."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        lines, self._good_bytes = _read_index(self.out_dir)
        self.entries: dict[str, dict] = {}  # key -> {"shard", "n", ...}
        self.skipped = Skipped()
        self.skipped_keys: set[str] = set()
        self.shards = 0
        for line in lines:
            if line.get("shard"):
                self.shards += 1
                for key, meta in line["entries"].items():
                    self.entries[key] = {"shard": line["shard"], **meta}
            for item in line.get("skipped", []):
                self.skipped.add(item["file"], item["reason"].split(": ", 1)[-1], kind=item["kind"])
                self.skipped_keys.add(item["key"])
        self._handles: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def tensors(self, key: str, fields: list[str]) -> dict[str, torch.Tensor]:
        meta = self.entries.get(key)
        if meta is None:
            why = " (skipped as broken)" if key in self.skipped_keys else ""
            raise NotCachedError(f"{key} is not in the cache at {self.out_dir}{why}")
        shard = meta["shard"]
        if shard not in self._handles:  # opened lazily, per process (DataLoader workers)
            self._handles[shard] = safe_open(str(self.out_dir / shard), framework="pt")
        return {f: self._handles[shard].get_tensor(f"{meta['n']}.{f}") for f in fields}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


class _Writer(_Index):
    """Appends shards: `add` buffers, `flush` writes the shard, then its index line."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str, shard_size: int):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(out_dir)
        index = out_dir / INDEX
        if index.exists() and index.stat().st_size > self._good_bytes:
            os.truncate(index, self._good_bytes)
        self.prefix, self.shard_size = prefix, shard_size
        self.pending: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}
        self.pending_skips: list[dict] = []

    def known(self, key: str) -> bool:
        return key in self.entries or key in self.pending or key in self.skipped_keys

    def add(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.pending[key] = (tensors, {**meta, "fields": sorted(tensors)})
        if len(self.pending) >= self.shard_size:
            self.flush()

    def skip(self, key: str, file: str, error: BaseException | str, kind: str | None = None) -> None:
        self.skipped.add(file, error, kind)
        self.skipped_keys.add(key)
        file, reason = self.skipped.items[-1]
        self.pending_skips.append({"key": key, "file": file, "kind": reason.split(":", 1)[0], "reason": reason})

    def flush(self) -> None:
        if not self.pending and not self.pending_skips:
            return
        line = {"shard": None, "entries": {}, "skipped": self.pending_skips}
        if self.pending:
            line["shard"] = f"{self.prefix}-{self.shards:05d}.safetensors"
            state = {}
            for n, (key, (tensors, meta)) in enumerate(self.pending.items()):
                state.update({f"{n}.{f}": t for f, t in tensors.items()})
                line["entries"][key] = {"n": n, **meta}
            write_safetensors(state, self.out_dir / line["shard"])
            self.shards += 1
            for key, meta in line["entries"].items():
                self.entries[key] = {"shard": line["shard"], **meta}
        with (self.out_dir / INDEX).open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.pending, self.pending_skips = {}, []


# ----------------------------------------------------------------------------- features
class FeatureCache:
    """ImageBind features by media path: `get(rel) -> {"pooled", ["tokens"], ["highway"]}`."""

    def __init__(self, out_dir: str | os.PathLike):
        self.index = _Index(out_dir)

    def get(self, rel: str) -> dict[str, torch.Tensor]:
        return self.index.tensors(rel, self.index.entries.get(rel, {}).get("fields", []))

    def modality(self, rel: str) -> str:
        return self.index.entries[rel]["modality"]

    def __contains__(self, rel: str) -> bool:
        return rel in self.index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def skipped(self) -> Skipped:
        return self.index.skipped


def _media_items(records_or_paths: Iterable, outputs: bool) -> Iterator[tuple[str, str]]:
    """(modality, rel) from manifest records, (rel, modality) pairs or bare rel paths."""
    for item in records_or_paths:
        if isinstance(item, dict):
            yield from record_media(item, outputs)
        elif isinstance(item, (tuple, list)):
            yield item[1], str(item[0])
        else:
            yield media.media_kind(str(item)), str(item)


def _load(root: Path, modality: str, rel: str, config) -> torch.Tensor | BaseException:
    try:
        return pre.load(resolve(root, rel), modality, config)
    except (media.MediaError, UnsafePathError) as err:
        return err


@torch.no_grad()
def _encode(model, modality: str, xs: list[torch.Tensor], keep_clips: bool, dtype) -> list[dict[str, torch.Tensor]]:
    """ImageBind outputs for a batch of preprocessed inputs of one modality, per item."""
    fields = model.encode(modality, torch.stack(xs), highway=True, keep_clips=keep_clips)
    return [{name: value[b].to(dtype or value.dtype).cpu() for name, value in fields.items()} for b in range(len(xs))]


def build_feature_cache(records_or_paths: Iterable, root: str | os.PathLike, model, out_dir: str | os.PathLike, *,
                        shard_size: int = 256, batch_size: int = 8, workers: int = 0, outputs: bool = False,
                        keep_clips: bool = False, dtype: torch.dtype | None = None) -> CacheReport:
    """ImageBind features of every medium the records use (inputs; outputs too if asked),
    or of the given paths, into `out_dir`, encoded by `model.encode` (an `XVila`). `workers`
    threads decode and preprocess ahead of the encoder."""
    root = Path(root)
    store = _Writer(out_dir, "features", shard_size)
    was_training = model.imagebind.training
    model.imagebind.eval()  # drop-path and dropout off: the cache must be deterministic
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    computed = reused = 0
    try:
        todo: list[tuple[str, str]] = []
        queued: set[str] = set()
        items = _media_items(records_or_paths, outputs)
        while True:
            for modality, rel in items:
                if store.known(rel) or rel in queued:
                    reused += 1
                    continue
                todo.append((modality, rel))
                queued.add(rel)
                if len(todo) >= batch_size:
                    break
            if not todo:
                break
            loaded = list((pool.map if pool else map)(lambda mr: _load(root, *mr, model.imagebind.config), todo))
            for modality in (IMAGE, VIDEO, AUDIO):
                batch = [(rel, x) for (m, rel), x in zip(todo, loaded) if m == modality and isinstance(x, torch.Tensor)]
                if batch:
                    for (rel, _), tensors in zip(batch, _encode(model, modality, [x for _, x in batch], keep_clips, dtype)):
                        store.add(rel, tensors, {"modality": modality})
                    computed += len(batch)
            for (_, rel), x in zip(todo, loaded):
                if not isinstance(x, torch.Tensor):
                    store.skip(rel, rel, x)
            todo, queued = [], set()
        store.flush()
    finally:
        model.imagebind.train(was_training)
        if pool is not None:
            pool.shutdown()
    return CacheReport(computed, reused, store.skipped)


# --------------------------------------------------------------------------------- text
def text_key(modality: str, caption: str) -> str:
    return f"{modality}/{hashlib.sha1(caption.encode('utf-8')).hexdigest()}"


class TextCache:
    """Decoder text embeddings: `get(modality, caption)` == `decoders[m].encode_text([caption])[0]`."""

    def __init__(self, out_dir: str | os.PathLike):
        self.index = _Index(out_dir)

    def get(self, modality: str, caption: str) -> torch.Tensor:
        return self.index.tensors(text_key(modality, caption), ["e_text"])["e_text"]

    def __contains__(self, item: tuple[str, str]) -> bool:
        return text_key(*item) in self.index

    def __len__(self) -> int:
        return len(self.index)


@torch.no_grad()
def build_text_cache(captions_by_modality: Mapping[str, Iterable[str]] | Iterable[tuple[str, str]], decoders,
                     out_dir: str | os.PathLike, *, shard_size: int = 1024, batch_size: int = 32,
                     dtype: torch.dtype | None = None) -> CacheReport:
    """Each decoder's text embedding of each caption, for {modality: captions} or an
    iterable of (modality, caption); `decoders` maps modality -> decoder (`model.decoders`)."""
    pairs = (((m, c) for m, captions in captions_by_modality.items() for c in captions)
             if isinstance(captions_by_modality, Mapping) else captions_by_modality)
    store = _Writer(out_dir, "text", shard_size)
    queues: dict[str, list[tuple[str, str]]] = {}
    queued: set[str] = set()
    computed = reused = 0

    def encode(modality: str) -> int:
        batch, queues[modality] = queues.get(modality, []), []
        if batch:
            e_text = decoders[modality].encode_text([c for _, c in batch])
            for (key, _), e in zip(batch, e_text):
                store.add(key, {"e_text": e.to(dtype or e.dtype).cpu()}, {"modality": modality})
                queued.discard(key)
        return len(batch)

    modes = {m: d.training for m, d in decoders.items()}
    try:
        for d in decoders.values():
            d.eval()  # e.g. CLAP's RoBERTa has dropout: the targets must be deterministic
        for modality, caption in pairs:
            if modality not in decoders:
                raise ConfigError(f"no decoder for {modality!r} captions (decoders: {', '.join(decoders)})")
            key = text_key(modality, caption)
            if store.known(key) or key in queued:
                reused += 1
                continue
            if not caption.strip():
                store.skip(key, f"{modality} caption {caption!r}", "the caption is empty", kind="EmptyCaption")
                continue
            queues.setdefault(modality, []).append((key, caption))
            queued.add(key)
            if len(queues[modality]) >= batch_size:
                computed += encode(modality)
        for modality in list(queues):
            computed += encode(modality)
        store.flush()
    finally:
        for m, d in decoders.items():
            d.train(modes[m])
    return CacheReport(computed, reused, store.skipped)


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> CacheReport:
    parser = argparse.ArgumentParser(prog="python -m train.cache", description=__doc__.split("\n\n")[1])
    parser.add_argument("cache", choices=["features", "text"])
    parser.add_argument("--manifest", action="append", required=True, help="a JSONL manifest (repeatable)")
    parser.add_argument("--root", help="features: the folder the manifests' media paths are relative to")
    parser.add_argument("--model", default="xvila-7b", help="preset name or checkpoint folder (XVila.from_pretrained)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--shard-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int, default=4, help="features: decoding threads")
    parser.add_argument("--outputs", action="store_true", help="features: conversation outputs too")
    args = parser.parse_args(argv)
    if args.cache == "features" and not args.root:
        parser.error("features needs --root")
    records = itertools.chain.from_iterable(read_manifest(m) for m in args.manifest)
    sizes = {k: v for k, v in (("shard_size", args.shard_size), ("batch_size", args.batch_size)) if v}
    try:
        model = XVila.from_pretrained(args.model, device=args.device)
        if args.cache == "features":
            report = build_feature_cache(records, args.root, model, args.out, workers=args.workers,
                                         outputs=args.outputs, **sizes)
        else:
            captions = (pair for record in records for pair in record_captions(record))
            report = build_text_cache(captions, model.decoders, args.out, **sizes)
    except XVilaError as err:  # a bad manifest line, missing weights...
        parser.exit(2, f"error: {err}\n")
    print(f"computed {report.computed}, already cached {report.reused}")
    print(report.skipped.summary())
    return report


if __name__ == "__main__":
    main()
