"""Atomic file writes: outputs and checkpoints are either whole or absent."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it into place only if the body succeeds.

    The temporary file sits in the same folder so that `os.replace` is an atomic rename,
    and is hidden (`.name.<random>.part`) so that nobody picks it up meanwhile. Writers
    that choose a format from the extension must name the format explicitly.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
