"""The package's one leaf for files, weights and the Hub: it imports nothing of `xvila` but errors.

Sources are resolved the same way for every part: a local file, a local folder, or a
Hugging Face Hub repo id (fetched once into the Hub cache by `huggingface_hub`). What we
write is safetensors or JSON, atomically (a temporary file beside the target, then a
rename). `.pth`/`.bin` files are read with `torch.load(weights_only=True)` only. Loads are
strict: a missing or unexpected key is an error that lists the keys, never a warning.
Each part's own loader sits beside the part (`xvila.encoders.imagebind_weights`, each
decoder's module) and uses only this module; `xvila.checkpoint` assembles the whole model.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn

from xvila.errors import WeightsUnavailableError


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


def offline_env() -> bool:
    """HF_HUB_OFFLINE as the environment has it (for messages; checks read the library's constant)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def is_hub_id(source: str | os.PathLike) -> bool:
    """`owner/name`, not a path: what may be looked up on the Hub."""
    text = str(source)
    return not (Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") != 1)


def missing_from_cache(files: list[tuple[str, str, str | None]]) -> list[tuple[str, str, str | None]]:
    """With HF_HUB_OFFLINE set, the (repo, file, revision) of `files` not in the local Hub
    cache: the one offline-availability check, so that a load names every missing repo at
    once instead of failing on the first after minutes of loading. Empty when online."""
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        return []
    return [(repo, name, rev) for repo, name, rev in files
            if not isinstance(try_to_load_from_cache(repo, name, revision=rev), str)]


def resolve_file(source: str | os.PathLike, filenames: tuple[str, ...], what: str) -> Path:
    """A local file, the first of `filenames` in a local folder, or in a Hub repo."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in filenames:
            if (path / name).is_file():
                return path / name
        raise WeightsUnavailableError(f"{what}: none of {list(filenames)} is in the folder {path}")
    repo_id = str(source)
    if not is_hub_id(repo_id):
        raise WeightsUnavailableError(f"{what}: {source} is neither a file, a folder, nor a Hub repo id (owner/name)")
    errors = []
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name))
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError) as err:
            errors.append(f"{name}: {type(err).__name__}")
        except OSError as err:  # network down, disk full, permission
            errors.append(f"{name}: {err}")
    hint = (
        "HF_HUB_OFFLINE is set and the files are not in the local Hub cache: download them once with network "
        f"(`hf download {repo_id}`) or pass a local path"
        if offline_env()
        else "check the repo id, your network and, for gated repos, `hf auth login`; or pass a local path"
    )
    raise WeightsUnavailableError(f"{what}: could not get {' or '.join(filenames)} from the Hub repo {repo_id} "
                                  f"({'; '.join(errors)}). {hint}.")


def optional_hub_file(repo_id: str, filename: str) -> Path | None:
    """`filename` of a Hub repo (from the cache, or downloaded), or None when the repo has
    no such file or it cannot be had (offline and not cached)."""
    try:
        return Path(hf_hub_download(repo_id, filename))
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError):
        return None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # common training-checkpoint envelopes
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def write_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write to a temp file beside `path`, then rename: a crash never leaves half a file."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def write_json(obj, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return Path(path)


def show_keys(keys) -> str:
    """The first few of `keys`, sorted, and how many there are: for error messages."""
    keys = sorted(map(str, keys))
    return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """`load_state_dict(strict=True)` with a message that names the keys and the part."""
    expected, given = set(module.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = ([f"missing {show_keys(missing)}"] if missing else []) + (
            [f"unexpected {show_keys(unexpected)}"] if unexpected else [])
        raise WeightsUnavailableError(f"{what}: the weights do not match the model: {'; '.join(parts)}")
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as err:  # shape mismatch: the config does not match the weights
        raise WeightsUnavailableError(f"{what}: the weights do not match the model's config: {err}") from err


# ---------------------------------------------------------------------------- multi-part folders
# Parts in a diffusers layout (a subfolder per part), loaded each with its own library.
@dataclass(frozen=True)
class Location:
    """Where one part of a multi-part model lives: a Hub repo id or local folder, a
    subfolder, a revision, and the file that marks it (for the offline check)."""

    source: str
    subfolder: str | None
    revision: str | None = None
    config_name: str = "config.json"

    @classmethod
    def part(cls, source: str, name: str, revision: str | None = None) -> "Location":
        """Part `name` in its subfolder of a diffusers-layout repo or folder."""
        return cls(source, name, revision, CONFIG_FILES.get(name, "config.json"))

    @property
    def is_local(self) -> bool:
        return Path(self.source).is_dir()

    def kwargs(self) -> dict:
        kw: dict = {"subfolder": self.subfolder} if self.subfolder else {}
        if self.revision and not self.is_local:
            kw["revision"] = self.revision
        return kw

    def __str__(self) -> str:
        at = f"{self.source}/{self.subfolder}" if self.subfolder else self.source
        return f"{at}@{self.revision}" if self.revision and not self.is_local else at


# The file each kind of part keeps its config in (the rest: config.json).
CONFIG_FILES = {"tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}


def load_parts(source: str | os.PathLike, loaders: dict[str, Callable], what: str,
               layout: dict[str, Location] | None = None, unexpected: bool = False) -> dict:
    """`{name: loader(where.source, **where.kwargs())}` for each part, where `layout[name]`
    says where it lives (default: subfolder `name` of `source`, a diffusers-layout repo or
    folder). Every library error becomes a `WeightsUnavailableError` that names the repo and
    the part; offline, every repo missing from the local cache is named at once, before
    anything loads. A loader may return (part, loading info) (`output_loading_info=True`):
    transformers and diffusers only warn about weights missing from a checkpoint; here a
    missing parameter is an error, and so, with `unexpected`, is a weight the model has no
    place for (position-id buffers excepted: old CLIP checkpoints carry them)."""
    path = Path(source).expanduser()
    source = str(path) if path.is_dir() else str(source)
    if not path.is_dir() and not is_hub_id(source):
        raise WeightsUnavailableError(f"{what}: {source} is neither a folder nor a Hub repo id (owner/name)")
    layout = layout or {name: Location.part(source, name) for name in loaders}
    _check_offline(layout, what)
    parts = {}
    for name, loader in loaders.items():
        where = layout[name]
        try:
            part = loader(where.source, **where.kwargs())
        except (OSError, ValueError, HfHubHTTPError) as err:  # OSError covers the Hub's not-found errors
            reason = str(err).rstrip(".")
            raise WeightsUnavailableError(
                f"{what}: could not load its {name} from {where}: {reason}. {_hint(where.source)}"
            ) from err
        if isinstance(part, tuple):  # (model, loading info)
            part, info = part
            _check_loading_info(part, info, f"{what}: the {name} weights in {where}", unexpected)
        parts[name] = part
    return parts


def _check_loading_info(part: nn.Module, info: dict, what: str, unexpected: bool) -> None:
    # Only missing parameters count: buffers such as CLAP's position and token-type ids are
    # constants the model rebuilds, and older checkpoints (AudioLDM's, from before
    # transformers made them persistent) do not hold them.
    params = {n for n, _ in part.named_parameters()}
    found = {
        "missing": [k for k in info.get("missing_keys") or [] if k in params],
        "unexpected": [k for k in info.get("unexpected_keys") or [] if not k.endswith("position_ids")]
        if unexpected else [],
        "mismatched": [str(k) for k in info.get("mismatched_keys") or []],
    }
    problems = [f"{kind} {show_keys(keys)}" for kind, keys in found.items() if keys]
    if problems:
        raise WeightsUnavailableError(f"{what} do not match the model: {'; '.join(problems)}")


def _check_offline(layout: dict[str, Location], what: str) -> None:
    """With HF_HUB_OFFLINE set, name every Hub repo of `layout` missing from the local cache."""
    missing = offline_missing(layout)
    if missing:
        raise WeightsUnavailableError(f"{what}: {missing_repos_message(missing)}")


def offline_missing(layout: dict[str, Location]) -> dict[tuple[str, str | None], list[str]]:
    """With HF_HUB_OFFLINE set, {(repo, revision): [its parts]} of the Hub repos of `layout`
    missing from the local cache (empty online, or when everything is cached)."""
    wanted = {(w.source, f"{w.subfolder}/{w.config_name}" if w.subfolder else w.config_name, w.revision): name
              for name, w in layout.items() if not w.is_local and is_hub_id(w.source)}  # the loader names bad paths
    missing: dict[tuple[str, str | None], list[str]] = {}
    for repo, file, revision in missing_from_cache(list(wanted)):
        missing.setdefault((repo, revision), []).append(wanted[repo, file, revision])
    return missing


def download_command(repo: str, revision: str | None = None) -> str:
    """The command that puts `repo` (at `revision`) into the local Hub cache."""
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "")


def missing_repos_message(missing: dict[tuple[str, str | None], list[str]]) -> str:
    """Each missing repo, what it is for, and the exact command that fetches it; one line
    (the demo prints it as its one line of explanation)."""
    commands = "; ".join(f"`{download_command(repo, rev)}` ({', '.join(parts)})" for (repo, rev), parts in missing.items())
    return (f"HF_HUB_OFFLINE is set and {len(missing)} Hub repo(s) are not in the local cache. Download them once "
            f"with network: {commands}; or pass local folders.")


def _hint(source: str) -> str:
    if Path(source).is_dir():
        return "The folder is not a complete decoder (written by `save_pretrained`, or a diffusers repo layout)"
    if offline_env():
        return (f"HF_HUB_OFFLINE is set and {source} is not in the local Hub cache: download it once with network "
                f"(`hf download {source}`) or pass a local folder")
    return "Check the repo id and your network, or pass a local folder"


def default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_dtype(device: torch.device) -> torch.dtype:
    # Half precision is for accelerators; a CPU runs (and tests) in float32.
    return torch.float16 if device.type == "cuda" else torch.float32


def own_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Copies every CPU tensor into memory of its own. Weights read from safetensors sit at
    arbitrary offsets of a memory-mapped file, and CPU BLAS kernels round differently (in
    the last bit) on unaligned memory, so without this a reloaded model would not
    reproduce its outputs bit for bit. (A GPU copy is fresh, aligned memory already.)"""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
    return module


def save_parts(parts: dict, folder: str | os.PathLike) -> Path:
    """Each part with its library's `save_pretrained`, in the subfolder `load_parts` reads."""
    folder = Path(folder)
    for name, part in parts.items():
        part.save_pretrained(str(folder / name))
    return folder
