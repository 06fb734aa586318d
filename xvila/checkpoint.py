"""The one place that finds, reads and writes weights.

Sources are resolved the same way for every component: a local file, a local folder, or
a Hugging Face Hub repo id (fetched once into the Hub cache by `huggingface_hub`). What we
write is safetensors, atomically; `.pth`/`.bin` files are read with
`torch.load(weights_only=True)` only. Loads are strict: a missing or unexpected key is an
error that lists the keys, never a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTokenizer

from xvila.encoders.clip_tokenizer import CLIP_TOKENIZER_REPO, ImageBindTokenizer
from xvila.encoders.imagebind import ImageBind, ImageBindConfig
from xvila.errors import WeightsUnavailableError
from xvila.fileio import atomic_path

IMAGEBIND_REPO = "nielsr/imagebind-huge"
# nielsr/imagebind-huge ships safetensors; the official release is a .pth that users may
# have downloaded themselves (or mirrored into a repo of their own).
IMAGEBIND_FILES = ("model.safetensors", "imagebind_huge.pth")


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
    if path.is_absolute() or str(source).startswith((".", "~")) or repo_id.count("/") != 1:
        raise WeightsUnavailableError(f"{what}: {source} is neither a file, a folder, nor a Hub repo id (owner/name)")
    errors = []
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name))
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError) as err:
            errors.append(f"{name}: {type(err).__name__}")
        except OSError as err:  # network down, disk full, permission
            errors.append(f"{name}: {err}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (
        "HF_HUB_OFFLINE is set and the files are not in the local Hub cache: download them once with network "
        f"(`huggingface-cli download {repo_id}`) or pass a local path"
        if offline
        else "check the repo id, your network and, for gated repos, `huggingface-cli login`; or pass a local path"
    )
    raise WeightsUnavailableError(f"{what}: could not get {' or '.join(filenames)} from the Hub repo {repo_id} "
                                  f"({'; '.join(errors)}). {hint}.")


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


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """`load_state_dict(strict=True)` with a message that names the keys and the part."""
    expected, given = set(module.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = ([f"missing {show(missing)}"] if missing else []) + ([f"unexpected {show(unexpected)}"] if unexpected else [])
        raise WeightsUnavailableError(f"{what}: the weights do not match the model: {'; '.join(parts)}")
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as err:  # shape mismatch: the config does not match the weights
        raise WeightsUnavailableError(f"{what}: the weights do not match the model's config: {err}") from err


# ---------------------------------------------------------------------------- ImageBind


def filter_imagebind_state(state: dict[str, torch.Tensor], modalities: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop the official checkpoint's depth/thermal/IMU (or any unbuilt modality) keys.
    Keys of our modalities and keys that fit no modality are kept, so strict loading
    still catches a foreign checkpoint."""
    groups = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
    all_modalities = ("vision", "text", "audio", "depth", "thermal", "imu")

    def keep(key: str) -> bool:
        group, _, rest = key.partition(".")
        modality = rest.partition(".")[0]
        return not (group in groups and modality in all_modalities and modality not in modalities)

    return {k: v for k, v in state.items() if keep(k)}


def load_imagebind(
    source: str | os.PathLike = IMAGEBIND_REPO,
    config: ImageBindConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ImageBind:
    """ImageBind in eval mode with frozen weights from an official-format checkpoint.

    `config` defaults to the `config.json` beside the weights (our own, or the official
    constructor's kwargs as in `nielsr/imagebind-huge`), else ImageBind-huge.
    """
    what = f"ImageBind ({source})"
    weights = resolve_file(source, IMAGEBIND_FILES, what)
    if config is None:
        config_file = weights.with_name("config.json")
        config = ImageBindConfig.from_dict(json.loads(config_file.read_text())) if config_file.is_file() else ImageBindConfig()
    state = filter_imagebind_state(read_state_dict(weights), config.modalities)
    with torch.device("meta"):  # no time or memory spent on a random init we overwrite
        model = ImageBind(config)
    load_strict(model, state, what, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def save_imagebind(model: ImageBind, folder: str | os.PathLike) -> Path:
    """Writes `config.json` + `model.safetensors` with the official key names."""
    folder = Path(folder)
    write_safetensors(model.state_dict(), folder / "model.safetensors")
    write_json(model.config.to_dict(), folder / "config.json")
    return folder


def load_imagebind_tokenizer(source: str | os.PathLike = CLIP_TOKENIZER_REPO, context_length: int = 77) -> ImageBindTokenizer:
    """CLIP's BPE from a folder or Hub repo with `tokenizer.json` (or `vocab.json` + `merges.txt`)."""
    # Resolve the files ourselves: transformers quietly builds an empty tokenizer when
    # they are missing.
    what = f"CLIP tokenizer ({source})"
    try:
        folder = resolve_file(source, ("tokenizer.json",), what).parent
    except WeightsUnavailableError:
        folder = resolve_file(source, ("vocab.json",), what).parent
        if resolve_file(source, ("merges.txt",), what).parent != folder:
            raise WeightsUnavailableError(f"{what}: pass the folder or repo that holds the tokenizer files") from None
    tokenizer = ImageBindTokenizer(CLIPTokenizer.from_pretrained(str(folder)), context_length)
    if tokenizer.vocab_size < 258:  # fewer than the byte alphabet and the two special tokens
        raise WeightsUnavailableError(f"{what}: the vocabulary in {folder} is empty or broken")
    return tokenizer
