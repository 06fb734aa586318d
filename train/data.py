"""Training manifests: the three JSONL formats, their validation and streaming readers.

A manifest is a JSONL file, one record per line; media paths are relative to a root folder
given beside the manifest (a builder's output folder, or a dataset's image folder).
`train/README.md` shows one example of each kind:

- pair (phase 1): ``{"id", "modality", "path", "caption"}``;
- interleaved (phase 2): ``{"id", "source", "chunks": [{"image", "audio", "video",
  "caption", "start", "end"}, ...]}``;
- conversation (phase 3): ``{"id", "type", "conversations": [{"from", "value"}, ...],
  "inputs": [{"modality", "path"}], "outputs": [{"modality", "path", "caption"}]}``. Human
  turns hold one placeholder (`<image>`, `<video>`, `<audio>`) per input, in the order of
  `inputs`; gpt turns hold one marker (`<gen:image>`, ...) per output, in the order of
  `outputs`, where that output's generation tokens go.

`read_manifest` streams and validates; a bad record raises `ManifestError` naming
``file:line``. `ManifestDataset` streams a manifest to DataLoader workers without
duplicates and can start after the records a resumed run has already seen. `Skipped` is
the counter of broken media shared by the builders and the caches.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from xvila.constants import AUDIO, IMAGE, MEDIA_MODALITIES, VIDEO
from xvila.conversation import PLACEHOLDERS
from xvila.errors import XVilaError
from xvila.fileio import atomic_path

X2X_TYPES = ("VID2IMG", "IMG2VID", "VID2VID", "AUD2VID", "VID2AUD", "IMG+AUD2VID")
CONVERSATION_TYPES = X2X_TYPES + ("sft",)
# Input and output modalities of one round of each X-to-X type (inputs in template order
# may differ: IMG+AUD2VID templates put the audio first in some phrasings).
X2X_MODALITIES = {
    "VID2IMG": ((VIDEO,), (IMAGE,)),
    "IMG2VID": ((IMAGE,), (VIDEO,)),
    "VID2VID": ((VIDEO,), (VIDEO,)),
    "AUD2VID": ((AUDIO,), (VIDEO,)),
    "VID2AUD": ((VIDEO,), (AUDIO,)),
    "IMG+AUD2VID": ((IMAGE, AUDIO), (VIDEO,)),
}
GEN_MARKERS = {m: f"<gen:{m}>" for m in MEDIA_MODALITIES}
HUMAN, GPT = "human", "gpt"
PAIR, INTERLEAVED, CONVERSATION = "pair", "interleaved", "conversation"

_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))
_MARKER_RE = re.compile("|".join(re.escape(p) for p in GEN_MARKERS.values()))
_BY_TEXT = {**{p: m for m, p in PLACEHOLDERS.items()}, **{p: m for m, p in GEN_MARKERS.items()}}


class ManifestError(XVilaError, ValueError):
    """A manifest record is malformed; the message names file:line and the field."""


class UnsafePathError(ManifestError):
    """A media path is absolute or climbs out of its root with `..`."""


# ------------------------------------------------------------------------------ paths
def check_rel(rel: str) -> str:
    """`rel` if it is a relative POSIX path that stays inside its root, else UnsafePathError."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"a media path must be a non-empty string, got {rel!r}")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", rel):
        raise UnsafePathError(f"{rel}: media paths must be relative to the manifest's root, not absolute")
    if ".." in p.parts:
        raise UnsafePathError(f"{rel}: media paths may not contain '..' (they must stay inside the root)")
    return rel


def resolve(root: str | os.PathLike, rel: str) -> Path:
    """`root / rel`, refusing absolute paths and `..` (a manifest cannot point outside its root)."""
    return Path(root) / check_rel(rel)


# ------------------------------------------------------------------------- validation
def placeholder_sequence(text: str) -> list[str]:
    """Modalities of the input placeholders in `text`, in order."""
    return [_BY_TEXT[t] for t in _PLACEHOLDER_RE.findall(text)]


def marker_sequence(text: str) -> list[str]:
    """Modalities of the output markers (`<gen:m>`) in `text`, in order."""
    return [_BY_TEXT[t] for t in _MARKER_RE.findall(text)]


def replace_gen_markers(text: str, token_names: Callable[[str], list[str]]) -> str:
    """Each `<gen:m>` replaced by m's generation tokens, e.g. with `XVilaConfig.gen_token_names`."""
    return _MARKER_RE.sub(lambda match: "".join(token_names(_BY_TEXT[match.group(0)])), text)


def _need(record: dict, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        got = "missing" if key not in record else f"a {type(value).__name__}"
        raise ValueError(f"{where}'{key}' must be a {want}, got {got}")
    return value


def _text(record: dict, key: str, where: str = "") -> str:
    value = _need(record, key, str, where)
    if not value.strip():
        raise ValueError(f"{where}'{key}' is empty")
    return value


def _modality(record: dict, where: str) -> str:
    m = _need(record, "modality", str, where)
    if m not in MEDIA_MODALITIES:
        raise ValueError(f"{where}'modality' must be one of {', '.join(MEDIA_MODALITIES)}, got {m!r}")
    return m


def record_kind(record: dict) -> str:
    if "conversations" in record:
        return CONVERSATION
    if "chunks" in record:
        return INTERLEAVED
    return PAIR


def validate(record: Any) -> str:
    """Check one record; returns its kind, raises ValueError (UnsafePathError for paths)."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    _text(record, "id")
    kind = record_kind(record)
    if kind == PAIR:
        _modality(record, "")
        check_rel(_need(record, "path", str))
        _text(record, "caption")
    elif kind == INTERLEAVED:
        check_rel(_need(record, "source", str))
        chunks = _need(record, "chunks", list)
        if not chunks:
            raise ValueError("'chunks' is empty")
        for i, chunk in enumerate(chunks):
            where = f"chunks[{i}]."
            if not isinstance(chunk, dict):
                raise ValueError(f"chunks[{i}] must be an object")
            for m in MEDIA_MODALITIES:  # a chunk names its media by modality
                check_rel(_need(chunk, m, str, where))
            _text(chunk, "caption", where)
            start, end = _need(chunk, "start", (int, float), where), _need(chunk, "end", (int, float), where)
            if not 0 <= start < end:
                raise ValueError(f"{where}start/end must satisfy 0 <= start < end, got {start}, {end}")
    else:
        _validate_conversation(record)
    return kind


def _validate_conversation(record: dict) -> None:
    kind = _need(record, "type", str)
    if kind not in CONVERSATION_TYPES:
        raise ValueError(f"'type' must be one of {', '.join(CONVERSATION_TYPES)}, got {kind!r}")
    turns = _need(record, "conversations", list)
    if not turns:
        raise ValueError("'conversations' is empty")
    placeholders, markers = [], []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]."
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{i}] must be an object")
        speaker = _need(turn, "from", str, where)
        if speaker != (HUMAN if i % 2 == 0 else GPT):
            raise ValueError(f"{where}'from' must be {HUMAN!r} on even turns and {GPT!r} on odd ones, got {speaker!r}")
        value = _need(turn, "value", str, where)
        found, misplaced = (placeholder_sequence, marker_sequence) if speaker == HUMAN else (marker_sequence, placeholder_sequence)
        if misplaced(value):
            what = "output markers" if speaker == HUMAN else "input placeholders"
            raise ValueError(f"{where}value: a {speaker} turn may not hold {what}")
        (placeholders if speaker == HUMAN else markers).extend(found(value))
    if len(turns) % 2:
        raise ValueError("the conversation must end with a gpt turn")
    inputs, outputs = _need(record, "inputs", list), _need(record, "outputs", list)
    for name, items, keys in (("inputs", inputs, ()), ("outputs", outputs, ("caption",))):
        for i, item in enumerate(items):
            where = f"{name}[{i}]."
            if not isinstance(item, dict):
                raise ValueError(f"{name}[{i}] must be an object")
            _modality(item, where)
            check_rel(_need(item, "path", str, where))
            for key in keys:
                _text(item, key, where)
    if placeholders != [i["modality"] for i in inputs]:
        raise ValueError(f"the human turns' placeholders {placeholders} do not match 'inputs' "
                         f"{[i['modality'] for i in inputs]} (same modalities, same order)")
    if markers != [o["modality"] for o in outputs]:
        raise ValueError(f"the gpt turns' output markers {markers} do not match 'outputs' "
                         f"{[o['modality'] for o in outputs]} (same modalities, same order)")


# ---------------------------------------------------------------------------- reading
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines."""
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def parse_line(path: str | os.PathLike, lineno: int, line: str) -> dict:
    """One manifest line -> a validated record, or ManifestError naming file:line."""
    try:
        record = json.loads(line)
        validate(record)
    except UnsafePathError as err:
        raise UnsafePathError(f"{path}:{lineno}: {err}") from err
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ManifestError(f"{path}:{lineno}: {err}") from err
    return record


def read_manifest(path: str | os.PathLike) -> Iterator[dict]:
    """Stream the records of a JSONL manifest, validating each (ManifestError on the first bad one)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    for lineno, line in _lines(path):
        yield parse_line(path, lineno, line)


def write_manifest(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Validate and write records as JSONL, atomically (all or nothing); returns the count."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for n, record in enumerate(records, 1):
            try:
                validate(record)
            except ValueError as err:
                raise ManifestError(f"{path}: record {n} ({record.get('id', '?')}): {err}") from err
            f.write(dumps(record) + "\n")
    return n


def dumps(record: dict) -> str:
    """One record as a JSON line: UTF-8 kept, key order as built (stable output)."""
    return json.dumps(record, ensure_ascii=False)


def record_media(record: dict, outputs: bool = False) -> Iterator[tuple[str, str]]:
    """(modality, rel path) of every medium a record uses as input (and output if asked)."""
    kind = record_kind(record)
    if kind == PAIR:
        yield record["modality"], record["path"]
    elif kind == INTERLEAVED:
        for chunk in record["chunks"]:
            for m in MEDIA_MODALITIES:
                yield m, chunk[m]
    else:
        for item in record["inputs"] + (record["outputs"] if outputs else []):
            yield item["modality"], item["path"]


def record_captions(record: dict) -> Iterator[tuple[str, str]]:
    """(modality, caption) pairs whose decoder text embedding a record's training needs:
    a pair's caption for its modality, an interleaved chunk's caption for all three, a
    conversation's outputs' captions."""
    kind = record_kind(record)
    if kind == PAIR:
        yield record["modality"], record["caption"]
    elif kind == INTERLEAVED:
        for chunk in record["chunks"]:
            for m in MEDIA_MODALITIES:
                yield m, chunk["caption"]
    else:
        for item in record["outputs"]:
            yield item["modality"], item["caption"]


# ----------------------------------------------------------------------- broken media
@dataclass
class Skipped:
    """Media skipped as broken: counts per error class and (file, reason) for each."""

    counts: Counter = field(default_factory=Counter)
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, file: str, error: BaseException | str, kind: str | None = None) -> None:
        """Count `file`; `kind` defaults to the error's class name, the reason to its message."""
        if isinstance(error, BaseException):
            kind = kind or type(error).__name__
            reason = str(error)
        else:
            kind, reason = kind or "Skipped", error
        self.counts[kind] += 1
        self.items.append((str(file), f"{kind}: {reason}"))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def summary(self, limit: int = 20) -> str:
        if not self.total:
            return "skipped: none"
        by_kind = ", ".join(f"{k} {n}" for k, n in self.counts.most_common())
        lines = [f"skipped {self.total} ({by_kind}):"] + [f"  {f}: {r}" for f, r in self.items[:limit]]
        if len(self.items) > limit:
            lines.append(f"  ... and {len(self.items) - limit} more")
        return "\n".join(lines)

    def line(self, i: int) -> str:
        """Item i as a JSON line, for the append-only skip logs of builders."""
        file, reason = self.items[i]
        return dumps({"file": file, "kind": reason.split(":", 1)[0], "reason": reason})

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> "Skipped":
        out = cls()
        for line in lines:
            if line.strip():
                item = json.loads(line)
                out.counts[item["kind"]] += 1
                out.items.append((item["file"], item["reason"]))
        return out


# ---------------------------------------------------------------------------- dataset
class ManifestDataset(IterableDataset):
    """Records of a manifest, streamed and split between DataLoader workers (and ranks).

    Records are numbered from 0 in file order. Records before `start` are skipped (a
    resumed run passes how many it has consumed). The rest is dealt out in blocks of
    `block_size` records, round-robin over the `world_size * num_workers` readers. With
    `block_size` equal to the DataLoader's batch size, batches come out in file order (the
    DataLoader takes one batch from each worker in turn), so after n batches a run has seen
    exactly records start .. start + n*batch_size - 1. Each reader parses only its own lines.
    `transform` maps a record to a sample (e.g. cached features); None yields the record.
    """

    def __init__(self, path: str | os.PathLike, *, start: int = 0, block_size: int = 1, rank: int = 0,
                 world_size: int = 1, transform: Callable[[dict], Any] | None = None):
        super().__init__()
        if start < 0 or block_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad ManifestDataset arguments: start={start}, block_size={block_size}, "
                             f"rank={rank}, world_size={world_size}")
        self.path = Path(path)
        if not self.path.is_file():
            raise ManifestError(f"{self.path}: manifest not found")
        self.start, self.block_size, self.rank, self.world_size = start, block_size, rank, world_size
        self.transform = transform

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        for index, (lineno, line) in enumerate(_lines(self.path)):
            if index < self.start or ((index - self.start) // self.block_size) % readers != reader:
                continue
            record = parse_line(self.path, lineno, line)
            yield record if self.transform is None else self.transform(record)
