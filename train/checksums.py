"""Checkpoint manifests: every file of a training checkpoint with its size and SHA-256.

A checkpoint folder is renamed into place only when whole, but a disk can still lose or
change its files afterwards (a full disk during a copy, a truncated sync, a bit flip), and
safetensors, JSON and the optimiser state would load such damage silently or fail with a
raw traceback. So `train.loop` writes `manifest.json` last (atomically) and, on
`--resume`, takes the newest checkpoint whose files all match it, warning about each newer
one that does not:

    {"format": 1, "files": {"state.json": {"size": 1234, "sha256": "…"}, …}}
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from xvila.errors import ResumeError
from xvila.fileio import write_json

MANIFEST = "manifest.json"
FORMAT = 1


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint's files do not match its manifest; an older one is used instead."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> Path:
    """`folder/manifest.json` over every other file in it (sub-folders included, hidden
    temporary files left out). Call it when everything else is written."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    listing = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    return write_json({"format": FORMAT, "files": listing}, folder / MANIFEST)


def damage(folder: Path) -> str | None:
    """What is wrong with `folder`, naming the file; None when every file matches its manifest."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"it has no {MANIFEST} (a save that never finished, or written by an older version)"
    try:
        manifest = json.loads(path.read_text())
        listing = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(listing, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{path} is not a readable manifest"
    for name, expected in sorted(listing.items()):
        file = folder / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected.get("size"):
            return f"{file} has {size} bytes, its manifest says {expected.get('size')} (truncated or overwritten)"
        if _sha256(file) != expected.get("sha256"):
            return f"{file} does not match its SHA-256 (its bytes changed after it was written)"
    return None


def newest_intact(folders: list[Path]) -> Path:
    """The newest of `folders` (oldest first) whose files match its manifest. Each newer,
    damaged one is named in a `DamagedCheckpointWarning`; when none is intact, a
    `ResumeError` names every folder and its first damaged file."""
    problems = []
    for folder in reversed(folders):
        why = damage(folder)
        if why is None:
            return folder
        problems.append(f"{folder.name}: {why}")
        warnings.warn(f"checkpoint {folder} is damaged: {why}; trying the one before it",
                      DamagedCheckpointWarning, stacklevel=2)
    raise ResumeError("--resume: no intact checkpoint to resume from (" + "; ".join(problems) + "). "
                      "Restore the files, or start the run again in a fresh out_dir")
