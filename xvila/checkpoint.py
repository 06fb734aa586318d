"""The one place that finds, reads and writes weights.

Sources are resolved the same way for every component: a local file, a local folder, or
a Hugging Face Hub repo id (fetched once into the Hub cache by `huggingface_hub`). What we
write is safetensors, atomically; `.pth`/`.bin` files are read with
`torch.load(weights_only=True)` only. Loads are strict: a missing or unexpected key is an
error that lists the keys, never a warning.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import torch
from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn
from peft import PeftModel
from diffusers import DPMSolverMultistepScheduler
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, CLIPTokenizer, LlamaConfig, LlamaForCausalLM,
)

from xvila.config import PRESETS, XVilaConfig
from xvila.constants import AUDIO, IMAGE, VIDEO
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
        f"(`hf download {repo_id}`) or pass a local path"
        if offline
        else "check the repo id, your network and, for gated repos, `hf auth login`; or pass a local path"
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


# ---------------------------------------------------------------------------- decoders
# Parts in a diffusers layout (a subfolder per part), loaded each with its own library.
def load_parts(source: str | os.PathLike, loaders: dict[str, Callable], what: str) -> dict:
    """`{name: loader(source, subfolder=name)}` for each part of a diffusers-layout repo or
    folder, with every library error turned into a `WeightsUnavailableError` that names the
    repo and the part. transformers only warns about weights missing from a checkpoint
    (diffusers refuses them itself); here that is an error, as everywhere in this package."""
    path = Path(source).expanduser()
    source = str(path) if path.is_dir() else str(source)
    if not path.is_dir() and (path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1):
        raise WeightsUnavailableError(f"{what}: {source} is neither a folder nor a Hub repo id (owner/name)")
    parts = {}
    for name, loader in loaders.items():
        try:
            part = loader(source, subfolder=name)
        except (OSError, ValueError, HfHubHTTPError) as err:  # OSError covers the Hub's not-found errors
            reason = str(err).rstrip(".")
            raise WeightsUnavailableError(
                f"{what}: could not load its {name} from {source}: {reason}. {_hint(source)}"
            ) from err
        if isinstance(part, tuple):  # transformers' (model, loading info)
            part, info = part
            # Only missing parameters count: buffers such as CLAP's position and token-type
            # ids are constants the model rebuilds, and older checkpoints (AudioLDM's, from
            # before transformers made them persistent) do not hold them.
            missing = sorted(set(info.get("missing_keys", ())) & {n for n, _ in part.named_parameters()})
            if missing:
                raise WeightsUnavailableError(f"{what}: the {name} in {source} lacks {missing[:8]}")
        parts[name] = part
    return parts


def _hint(source: str) -> str:
    if Path(source).is_dir():
        return "The folder is not a complete decoder (written by `save_pretrained`, or a diffusers repo layout)"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return (f"HF_HUB_OFFLINE is set and {source} is not in the local Hub cache: download it once with network "
                f"(`hf download {source}`) or pass a local folder")
    return "Check the repo id and your network, or pass a local folder"


def transformers_loader(cls, dtype: torch.dtype | None) -> Callable:
    return lambda source, subfolder: cls.from_pretrained(source, subfolder=subfolder, dtype=dtype,
                                                         output_loading_info=True)


def diffusers_loader(cls, dtype: torch.dtype | None) -> Callable:
    return lambda source, subfolder: cls.from_pretrained(source, subfolder=subfolder, dtype=dtype)


def dpm_solver_loader(source, subfolder):
    # Any scheduler config of the repo (PNDM for SD1.5, DDIM for AudioLDM) keeps its betas,
    # timestep count and prediction type; DPM-Solver++ takes what it knows of it.
    return DPMSolverMultistepScheduler.from_pretrained(source, subfolder=subfolder, algorithm_type="dpmsolver++")


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


# ------------------------------------------------------------------------------ decoder

# ---------------------------------------------------------------------------- X-VILA
# A checkpoint folder:
#   config.json          XVilaConfig; base parts named by Hub id, or by a subfolder here
#   tokenizer/           the LLM tokenizer with X-VILA's added tokens
#   adapter/             peft: LoRA and the new tokens' embedding / LM-head rows
#   xvila.safetensors    P_in and P_out
#   llm/, imagebind/     only for base parts that have no Hub id (random, e.g. tiny-random)

XVILA_WEIGHTS = "xvila.safetensors"


def _torch_dtype(config: XVilaConfig, device: torch.device) -> torch.dtype:
    return config.torch_dtype(device)


def _hub_parts(config: XVilaConfig, folder: Path | None) -> list[tuple[str, str, str | None]]:
    """(repo, a file that must be there, revision) of every base part named by Hub id
    (parts stored in the checkpoint folder, or given as local paths, are not)."""
    parts = []
    llm, imagebind = _resolve_part(config.llm, folder), _resolve_part(config.imagebind, folder)
    if llm and not Path(llm).exists():
        parts += [(llm, "config.json", config.llm_revision), (llm, "tokenizer_config.json", config.llm_revision)]
    if imagebind and not Path(imagebind).exists():
        parts.append((imagebind, "model.safetensors", None))
    return parts


def check_offline_availability(config: XVilaConfig, folder: Path | None = None) -> None:
    """With HF_HUB_OFFLINE set, name every base part missing from the local cache at once,
    instead of failing on the first after minutes of loading."""
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    missing = [f"{repo} ({name})" for repo, name, rev in _hub_parts(config, folder)
               if not isinstance(try_to_load_from_cache(repo, name, revision=rev), str)]
    if missing:
        raise WeightsUnavailableError(
            f"{config.name}: HF_HUB_OFFLINE is set and these repos are not in the local Hub cache: "
            f"{', '.join(missing)}. Download them once with network (`hf download REPO`), "
            "or start from the offline preset `tiny-random`."
        )


def _load_llm(config: XVilaConfig, source: str, device: torch.device, vocab_size: int):
    dtype = _torch_dtype(config, device)
    kwargs: dict = {"dtype": dtype}
    if not Path(source).exists():
        kwargs["revision"] = config.llm_revision
    if config.load_in_4bit:
        if device.type != "cuda":
            raise WeightsUnavailableError(f"{config.name}: 4-bit loading needs a CUDA GPU (bitsandbytes)")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        )
    if device.type == "cuda":  # straight onto the GPU, not through a CPU copy
        kwargs["device_map"] = {"": device.index or 0}
    try:
        llm, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except OSError as err:
        raise WeightsUnavailableError(f"LLM ({source}): {err}") from err
    if info.get("missing_keys"):  # transformers only warns; a missing weight is an error here
        raise WeightsUnavailableError(f"LLM ({source}): the checkpoint lacks {sorted(info['missing_keys'])[:8]}")
    llm.resize_token_embeddings(vocab_size, mean_resizing=True)
    return llm


def _random_llm(config: XVilaConfig, vocab_size: int):
    llm_config = LlamaConfig(vocab_size=vocab_size, **config.llm_config)
    llm_config.bos_token_id, llm_config.eos_token_id = 1, 2
    return LlamaForCausalLM(llm_config)


def _resolve_part(value: str | None, folder: Path | None) -> str | None:
    """A part named by a subfolder of the checkpoint resolves against it."""
    if value is not None and folder is not None and (folder / value).exists():
        return str(folder / value)
    return value


def build_xvila(config: XVilaConfig, device: str | torch.device | None = None, folder: Path | None = None, seed: int = 0,
                offload_decoders: bool = False):
    """An XVila from `config`: base parts loaded (or random where named None), X-VILA parts
    fresh (seeded) unless `folder` is a checkpoint to read them from."""
    from xvila.llm import add_xvila_tokens, toy_llama_tokenizer, wrap_lora
    from xvila.model import XVila

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_offline_availability(config, folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ib_source = _resolve_part(config.imagebind, folder)
        if ib_source is None:
            ib_cfg = config.imagebind_config
            imagebind = ImageBind(ImageBindConfig.from_name(ib_cfg) if isinstance(ib_cfg, str) else ImageBindConfig(**ib_cfg))
            imagebind.eval().requires_grad_(False)
        else:
            imagebind = load_imagebind(ib_source)
        llm_source = _resolve_part(config.llm, folder)
        if folder is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        elif llm_source is None:
            tokenizer = toy_llama_tokenizer()
        else:
            tokenizer = _load_llm_tokenizer(config, llm_source)
        new_ids = add_xvila_tokens(tokenizer, config)
        llm = _random_llm(config, len(tokenizer)) if llm_source is None else _load_llm(config, llm_source, device, len(tokenizer))
        if folder is not None:
            llm = PeftModel.from_pretrained(llm, str(folder / "adapter"), is_trainable=True)
        else:
            llm = wrap_lora(llm, config, new_ids)
        model = XVila(config, imagebind, llm, tokenizer)
        model.decoders = nn.ModuleDict(_build_decoders(config, device, folder, imagebind.config.vision_embed_dim, seed))
    model.offload_decoders = offload_decoders
    if folder is not None:
        parts = read_state_dict(folder / XVILA_WEIGHTS)
        load_strict(_xvila_parts(model), parts, f"X-VILA parts ({folder})")
    if not config.load_in_4bit:  # a quantised LLM is already placed by its loader
        model.llm.to(device=device, dtype=_torch_dtype(config, device))
    model.imagebind.to(device=device, dtype=_torch_dtype(config, device))
    model.p_in.to(device)
    model.p_out.to(device)
    model.decoders.to("cpu" if offload_decoders else device)
    return model.eval()


def _xvila_parts(model) -> nn.ModuleDict:
    """What `xvila.safetensors` holds: P_in, P_out and the visual controllers."""
    controllers = {m: d.controller for m, d in model.decoders.items() if d.controller is not None}
    return nn.ModuleDict({"p_in": model.p_in, "p_out": model.p_out, "controllers": nn.ModuleDict(controllers)})


def _build_decoders(config: XVilaConfig, device: torch.device, folder: Path | None, vision_dim: int, seed: int) -> dict:
    """One decoder per modality (random tiny parts where the config names none), each image
    and video decoder with a visual controller sized from its U-Net."""
    from xvila.decoders.audio import AudioDecoder
    from xvila.decoders.controller import VisualController
    from xvila.decoders.image import ImageDecoder
    from xvila.decoders.video import VideoDecoder

    classes = {IMAGE: ImageDecoder, VIDEO: VideoDecoder, AUDIO: AudioDecoder}
    decoders = {}
    for m, source in config.decoders.items():
        source = _resolve_part(source, folder)
        dtype = _torch_dtype(config, device)
        if source is None:
            decoder = classes[m].tiny_random(seed=seed, cond_dim=config.cond_shapes[m][-1]).to(dtype=dtype)
        else:
            decoder = classes[m].from_pretrained(source, device=device, dtype=dtype)
        if m in (IMAGE, VIDEO):  # in the U-Net's dtype: its residuals are added to the U-Net's skips
            decoder.controller = VisualController.from_unet(decoder.unet, vision_dim).to(dtype=dtype)
        decoders[m] = decoder
    return decoders


def _load_llm_tokenizer(config: XVilaConfig, source: str):
    kwargs = {} if Path(source).exists() else {"revision": config.llm_revision}
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        raise WeightsUnavailableError(f"LLM tokenizer ({source}): {err}") from err


def load_xvila(source: str | os.PathLike, device: str | torch.device | None = None, offload_decoders: bool = False):
    """A preset name, a checkpoint folder, or a Hub repo holding one. `offload_decoders`
    keeps the decoders on the CPU between requests (for a 24 GB GPU with the 4-bit LLM)."""
    if isinstance(source, str) and source in PRESETS:
        return build_xvila(XVilaConfig.from_name(source), device, offload_decoders=offload_decoders)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        if str(source).count("/") != 1:
            raise WeightsUnavailableError(
                f"{source} is neither a preset ({', '.join(PRESETS)}), a checkpoint folder, nor a Hub repo id"
            )
        try:
            folder = Path(snapshot_download(str(source)))
        except (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as err:
            raise WeightsUnavailableError(f"X-VILA checkpoint {source}: could not get it from the Hub ({err})") from err
    if not (folder / "config.json").is_file():
        raise WeightsUnavailableError(f"{folder} is not an X-VILA checkpoint: it has no config.json")
    return build_xvila(XVilaConfig.from_json(folder / "config.json"), device, folder=folder,
                       offload_decoders=offload_decoders)


def _base_llm_state(llm) -> dict[str, torch.Tensor]:
    """The base LLM's own weights, without peft's wrappers and adapters."""
    state = {}
    for key, value in llm.get_base_model().state_dict().items():
        if "lora_" in key or "trainable_tokens_" in key:
            continue
        state[key.replace("token_adapter.base_layer.", "").replace(".base_layer.", ".")] = value
    return state


def save_xvila(model, folder: str | os.PathLike, write_decoders: tuple[str, ...] = ()) -> Path:
    """Writes the checkpoint folder (see the layout above). Base parts named by a Hub id are
    referenced; parts without one (random, or kept in the folder they were loaded from) are
    written into it, and so are the decoders in `write_decoders` (U-Nets fine-tuned in
    phase 3b, which the base repo does not hold)."""
    folder = Path(folder)
    config = model.config

    def stored_here(value, subfolder: str) -> bool:
        return value is None or value == subfolder

    changes = {}
    if stored_here(config.llm, "llm"):
        base = model.llm.get_base_model()
        write_safetensors(_base_llm_state(model.llm), folder / "llm" / "model.safetensors", metadata={"format": "pt"})
        write_json(base.config.to_dict(), folder / "llm" / "config.json")
        changes.update(llm="llm", llm_revision=None)
    if stored_here(config.imagebind, "imagebind"):
        save_imagebind(model.imagebind, folder / "imagebind")
        changes.update(imagebind="imagebind")
    decoders = dict(config.decoders)
    for m, source in config.decoders.items():
        if m in model.decoders and (stored_here(source, f"decoders/{m}") or m in write_decoders):
            model.decoders[m].save_pretrained(folder / "decoders" / m)
            decoders[m] = f"decoders/{m}"
    changes["decoders"] = decoders
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    model.llm.save_pretrained(str(folder / "adapter"))
    write_safetensors(_xvila_parts(model).state_dict(), folder / XVILA_WEIGHTS)
    write_json(config.replace(**changes).to_dict(), folder / "config.json")  # last: marks the folder complete
    return folder
