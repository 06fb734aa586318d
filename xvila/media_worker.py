"""Decode and preprocess uploads in a worker process, so that no file can take the caller down.

    from xvila.media_worker import preprocess
    x = preprocess("upload.mp4", "video")                  # in the worker (the default)
    x = preprocess("clip.mp4", "video", isolated=False)    # trusted files: in this process

A segfault inside FFmpeg cannot be caught in-process, and a damaged header can make a
decoder allocate gigabytes or spin. `preprocess` therefore runs the ImageBind
preprocessing (`load_image` / `load_video` / `load_audio`, which decode with `xvila.media`)
in a separate Python process and returns its plain tensor. The worker is started once and
reused (a request costs a pickle of the result, not a start-up); it runs one request at a
time and is limited in:

* address space: what it uses after its imports plus `memory_bytes` (RLIMIT_AS), so a
  blow-up ends as MemoryError inside the worker -> `MediaMemoryError`;
* CPU time per request (RLIMIT_CPU, raised before each request) -> `DecodeTimeoutError`;
* wall-clock time per request: the caller stops waiting and kills it -> `DecodeTimeoutError`.

A worker that dies (a native crash, a kill) becomes `DecoderCrashError`, and the next
request starts a fresh one. Every one of these is a `MediaError` with a plain message.

Where the files are trusted (training data, tests), `isolated=False` or
`set_default_isolation(False)` (or XVILA_MEDIA_IN_PROCESS=1) decodes in the calling
process; the choice is logged once.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from xvila.constants import AUDIO, IMAGE, VIDEO
from xvila.encoders import imagebind_preprocess as pre
from xvila.media import (
    DecodeTimeoutError,
    DecoderCrashError,
    MediaError,
    PathLike,
    UnsupportedFormatError,
    _memory_error,
)

log = logging.getLogger(__name__)

# Defaults sized for the largest file within the media budgets: a 4K, 30 fps clip span is
# ~1.5 GB of RGB frames; a 64-megapixel image ~1 GB while it is converted.
MEMORY_BYTES = 4 << 30
SECONDS = 120.0


@dataclass(frozen=True)
class WorkerLimits:
    memory_bytes: int = MEMORY_BYTES  # address space on top of the worker's own after start-up
    cpu_seconds: float = SECONDS  # CPU time per request
    wall_seconds: float = SECONDS  # wall-clock time per request, start-up excluded


class MediaWorker:
    """One reusable worker process; `call(fn, *args)` runs a module-level function in it.

    Thread-safe: concurrent callers take turns. The process starts on the first call and
    again after a crash or a timeout; `close()` ends it.
    """

    def __init__(self, limits: WorkerLimits | None = None):
        self.limits = limits or WorkerLimits()
        self.peak_rss = 0  # bytes: the worker's peak resident memory during the last call
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._send: Connection | None = None
        # No atexit hook: when this process ends (or drops the worker), the pipe closes and
        # the worker, waiting on it, exits by itself.

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def call(self, fn: Callable[..., Any], *args: Any, what: str = "the file", **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in the worker. Exceptions raised there are re-raised here;
        a crash, a hang or a blow-up becomes a MediaError naming `what`."""
        with self._lock:
            if self.pid is None:
                self._start()
            try:
                self._send.send_bytes(pickle.dumps((fn, args, kwargs, what)))
                if not self._conn.poll(self.limits.wall_seconds):
                    self._stop()
                    raise DecodeTimeoutError(_timeout_message(what, self.limits.wall_seconds))
                status, value, self.peak_rss = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError) as err:  # the worker died mid-request
                raise self._died(what) from err
            except BaseException:  # e.g. KeyboardInterrupt: its reply would answer the next call
                self._stop()
                raise
        if status == "error":
            raise value
        return value

    def _start(self) -> None:
        self._stop()
        # The worker gets its own end of two pipes (requests in, replies out).
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
                   # Each decoder thread would otherwise reserve a 64 MB malloc arena,
                   # address space that counts against the worker's limit.
                   MALLOC_ARENA_MAX="2")
        cmd = [sys.executable, "-m", "xvila.media_worker", str(req_r), str(rep_w),
               str(self.limits.memory_bytes), str(self.limits.cpu_seconds)]
        try:
            self._proc = subprocess.Popen(cmd, pass_fds=(req_r, rep_w), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._send, self._conn = Connection(req_w, readable=False), Connection(rep_r, writable=False)
        # The worker says it is ready once its imports are done and its limits are set.
        try:
            if not self._conn.poll(60.0) or self._conn.recv_bytes() != b"ready":
                raise EOFError
        except (EOFError, OSError) as err:
            self._stop()
            raise DecoderCrashError("The media decoder process could not be started; see the server log.") from err
        log.info("media: decoding uploads in worker process %d (memory +%d MiB, %.0f s per file)",
                 self._proc.pid, self.limits.memory_bytes >> 20, self.limits.wall_seconds)

    def _died(self, what: str) -> MediaError:
        code = None
        if self._proc is not None:
            try:
                code = self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # alive but its pipe is gone: end it
                pass
        self._stop()
        if code == -signal.SIGXCPU:
            return DecodeTimeoutError(_timeout_message(what, self.limits.cpu_seconds, cpu=True))
        why = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        log.warning("media: the decoder process died (%s) while reading %s; starting a new one", why, what)
        return DecoderCrashError(
            f"{what}: the decoder crashed while reading this file ({why}); the file is damaged or "
            "malformed. Please re-save or re-encode it and upload it again."
        )

    def _stop(self) -> None:
        for conn in (self._send, self._conn):
            if conn is not None:
                conn.close()
        self._send = self._conn = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()


def _timeout_message(what: str, seconds: float, cpu: bool = False) -> str:
    kind = "of CPU time " if cpu else ""
    return (f"{what}: decoding took longer than {seconds:.0f} s {kind}and was stopped; the file is "
            "damaged or too demanding. Please upload a shorter or re-encoded copy.")


# ------------------------------------------------------------------------- the public API
_default_worker: MediaWorker | None = None
_default_lock = threading.Lock()
_isolated = os.environ.get("XVILA_MEDIA_IN_PROCESS", "").strip().lower() not in ("1", "true", "yes", "on")
_announced: set[bool] = set()


def set_default_isolation(isolated: bool) -> None:
    """Where `preprocess(..., isolated=None)` decodes: True = the worker, False = in-process."""
    global _isolated
    _isolated = bool(isolated)


def default_worker() -> MediaWorker:
    """The process-wide worker that `preprocess` uses (started on first use)."""
    global _default_worker
    with _default_lock:
        if _default_worker is None:
            _default_worker = MediaWorker()
        return _default_worker


def _load(path: PathLike, kind: str, config=None):
    """ImageBind preprocessing of one file: what runs in the worker."""
    return pre.load(path, kind, config)


def preprocess(path: PathLike, kind: str, config=None, *, isolated: bool | None = None):
    """The ImageBind input tensor of a media file (`kind`: image, video or audio), sized for
    the ImageBind built from `config` (an `ImageBindConfig`; None: ImageBind-huge's sizes).

    `isolated` (default: `set_default_isolation`, initially True) decodes in the worker
    process; False decodes here, for trusted files."""
    if kind not in (IMAGE, VIDEO, AUDIO):
        raise UnsupportedFormatError(f"{Path(path).name}: unknown media kind {kind!r}; expected image, video or audio.")
    isolated = _isolated if isolated is None else isolated
    if isolated not in _announced:
        _announced.add(isolated)
        log.info("media: decoding %s", "in a worker process (untrusted files)" if isolated
                 else "in this process (trusted files only: a decoder crash ends this process)")
    if not isolated:
        try:
            return _load(path, kind, config)
        except MemoryError as err:
            raise _memory_error(Path(path).name) from err
        except RuntimeError as err:
            if _OUT_OF_MEMORY in str(err):
                raise _memory_error(Path(path).name) from err
            raise
    return default_worker().call(_load, str(path), kind, config, what=Path(path).name)


# ----------------------------------------------------------------------- the worker side
def _status_bytes(field: str) -> int:
    """A size from /proc/self/status (e.g. VmHWM, the peak RSS; VmSize, the address space)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    return _status_bytes("VmHWM")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _address_space() -> int:
    return _status_bytes("VmSize")


_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


def _serve(requests: Connection, replies: Connection, memory_bytes: int, cpu_seconds: float) -> None:
    # The decoders (PyAV, PIL, torch) were imported with this module, before the limits below.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not write a core dump
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + memory_bytes, hard))
    replies.send_bytes(b"ready")
    while True:
        try:
            fn, args, kwargs, what = pickle.loads(requests.recv_bytes())
        except EOFError:  # the caller has gone
            return
        used = resource.getrusage(resource.RUSAGE_SELF)
        _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (int(used.ru_utime + used.ru_stime + cpu_seconds) + 1, cpu_hard))
        _reset_peak_rss()
        try:
            reply = ("ok", fn(*args, **kwargs))
        except MemoryError:  # past the address-space limit; the memory is free again here
            reply = ("error", _memory_error(what))
        except RuntimeError as err:
            # torch's CPU allocator reports the same limit as a RuntimeError with this text.
            reply = ("error", _memory_error(what) if _OUT_OF_MEMORY in str(err) else err)
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the caller
            reply = ("error", err)
        reply = (*reply, _peak_rss())
        try:
            data = pickle.dumps(reply)
        except Exception as err:  # noqa: BLE001 - an exception that will not pickle
            data = pickle.dumps(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({err})"), reply[2]))
        replies.send_bytes(data)


if __name__ == "__main__":
    _req, _rep, _mem, _cpu = sys.argv[1:5]
    _serve(Connection(int(_req), writable=False), Connection(int(_rep), readable=False), int(_mem), float(_cpu))
