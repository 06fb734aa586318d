"""What a benchmark run keeps on disk, so a killed run resumes where it stopped.

`DIR/run.json` holds the settings that change a sample's result (checkpoint, data,
steps...); a restart with other settings is refused rather than mixing two runs.
`DIR/samples.jsonl` is append-only: one line per finished sample, flushed and fsync'ed
before the next starts, so a kill loses at most the sample in flight. A line torn by the
kill is cut off on restart. Result files are written atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from xvila.evaluation.stats import EvaluationError
from xvila.fileio import atomic_path


class ResumeError(EvaluationError):
    """An output folder holds a run with other settings."""


class SampleLog:
    def __init__(self, out_dir: str | os.PathLike, settings: dict):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
        run = self.dir / "run.json"
        if run.exists():
            old = json.loads(run.read_text(encoding="utf-8"))
            if old != settings:
                diff = ", ".join(f"{k}: {old.get(k)!r} (now {settings.get(k)!r})"
                                 for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
                raise ResumeError(f"{self.dir} holds a run with other settings ({diff}); use a new --out "
                                  "folder or the same settings")
        else:
            write_json(run, settings)
        self.path = self.dir / "samples.jsonl"
        self.done: dict[str, dict] = dict(self._read())

    def _read(self) -> Iterator[tuple[str, dict]]:
        if not self.path.exists():
            return
        good = 0
        with self.path.open("rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    break  # torn by a kill mid-write: it and anything after is dropped
                if not line.endswith(b"\n"):
                    break
                good += len(line)
                yield record["key"], record
        os.truncate(self.path, good)

    def add(self, record: dict) -> None:
        """Record one finished sample (it must carry a unique "key") durably."""
        with self.path.open("ab") as f:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.done[record["key"]] = record


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def device_name(device: torch.device | str) -> str:
    """"cuda:0 (NVIDIA H200)" or "cpu (N threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


class Throughput:
    """Samples per second of this run (resumed samples are not counted)."""

    def __init__(self, device):
        self.device = device_name(device)
        self.start, self.samples = time.perf_counter(), 0

    def tick(self) -> None:
        self.samples += 1

    def record(self) -> dict:
        seconds = time.perf_counter() - self.start
        return {"samples": self.samples, "seconds": round(seconds, 3),
                "samples_per_s": round(self.samples / seconds, 4) if seconds > 0 else None, "device": self.device}

    def line(self) -> str:
        r = self.record()
        rate = "n/a" if r["samples_per_s"] is None else f"{r['samples_per_s']:.3f}"
        return f"{r['samples']} samples in {r['seconds']:.1f} s: {rate} samples/s on {r['device']}"
