"""ImageBind's weights: read an official-format checkpoint into `ImageBind`, write one back.

    load_imagebind()                          # nielsr/imagebind-huge from the Hub (cached)
    load_imagebind("imagebind_huge.pth")      # the official release, read with weights_only
    save_imagebind(model, "out/imagebind")    # config.json + model.safetensors, official key names

Uses only `xvila.fileio` for files and the Hub; the model itself does no I/O.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from xvila.encoders.clip_tokenizer import CLIP_TOKENIZER_REPO, ImageBindTokenizer
from xvila.encoders.imagebind import ImageBind, ImageBindConfig
from xvila.errors import WeightsUnavailableError
from xvila.fileio import (
    is_hub_id, load_strict, optional_hub_file, read_state_dict, resolve_file, write_json, write_safetensors,
)

IMAGEBIND_REPO = "nielsr/imagebind-huge"
# nielsr/imagebind-huge ships safetensors; the official release is a .pth that users may
# have downloaded themselves (or mirrored into a repo of their own).
IMAGEBIND_FILES = ("model.safetensors", "imagebind_huge.pth")


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
    modalities: tuple[str, ...] | None = None,
) -> ImageBind:
    """ImageBind in eval mode with frozen weights from an official-format checkpoint.

    `config` defaults to the `config.json` of the folder or Hub repo (our own, or the
    official constructor's kwargs, as `nielsr/imagebind-huge` ships them), else
    ImageBind-huge. `modalities` builds only those towers (the others' weights are dropped):
    X-VILA's chat reads images, video and audio, never text through ImageBind.
    """
    what = f"ImageBind ({source})"
    weights = resolve_file(source, IMAGEBIND_FILES, what)
    if config is None:
        config_file = _config_file(source, weights)
        config = ImageBindConfig.from_dict(json.loads(config_file.read_text())) if config_file else ImageBindConfig()
    if modalities is not None:
        config = dataclasses.replace(config, modalities=tuple(modalities))
    state = filter_imagebind_state(read_state_dict(weights), config.modalities)
    with torch.device("meta"):  # no time or memory spent on a random init we overwrite
        model = ImageBind(config)
    load_strict(model, state, what, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def _config_file(source, weights: Path) -> Path | None:
    """The config.json beside the weights; from a Hub repo it is fetched as well (it is
    optional there: Meta's .pth comes without one)."""
    beside = weights.with_name("config.json")
    if beside.is_file() or not is_hub_id(source) or Path(source).expanduser().exists():
        return beside if beside.is_file() else None
    return optional_hub_file(str(source), "config.json")


def save_imagebind(model: ImageBind, folder: str | os.PathLike) -> Path:
    """Writes `config.json` + `model.safetensors` with the official key names."""
    folder = Path(folder)
    write_safetensors(model.state_dict(), folder / "model.safetensors")
    write_json(model.config.to_dict(), folder / "config.json")
    return folder


def load_imagebind_tokenizer(source: str | os.PathLike = CLIP_TOKENIZER_REPO, context_length: int = 77) -> ImageBindTokenizer:
    """CLIP's BPE from a folder or Hub repo with `tokenizer.json` (or `vocab.json` + `merges.txt`).

    X-VILA itself never reads text through ImageBind (its text goes to the LLM), so nothing in
    the package calls this. It is kept for ImageBind's text tower: the check of our port
    against the official text embeddings (tests/test_imagebind.py), and anyone who wants
    ImageBind text embeddings, e.g. for retrieval-style evaluation."""
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
