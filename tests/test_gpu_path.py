"""Defects of the GPU path found by review, checked on the CPU (issue 11: 3, 5, 6, 7, 8, 9).

3. Decoding reads the embedding and LM-head matrices as they are: peft's trainable-tokens
   layer is merged for the turn, not rebuilt per forward, and unmerged afterwards.
5. E_vis, the sum of the vision trunk's block outputs, accumulates in float32 and reaches
   a float16 controller without overflowing.
7. One static KV cache for a chat's life: reset, never rebuilt, its buffers at the same
   addresses every turn (what CUDA graphs need), and no recompilation across turns.
6. With `offload_decoders`, decoders load on the CPU and are never placed on the compute
   device at load; the model holds no ImageBind text tower (so no 0-dim parameter either).
8. The 4-bit preset computes in float16 on a GPU without bfloat16.
9. ImageBind's config.json is read from a folder and from a Hub repo.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.errors
import pytest
import torch
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

import xvila.engine as engine_module
import xvila.errors
import xvila.fileio
from xvila import checkpoint
from xvila.config import XVilaConfig
from xvila.decoders.base import DecodeSettings, Decoder
from xvila.decoders.controller import VisualController
from xvila.encoders.imagebind import ImageBind, ImageBindConfig, Trunk
from xvila.encoders.imagebind_weights import load_imagebind, save_imagebind
from xvila.engine import Engine, Sampling
from xvila.model import XVila


@pytest.fixture(scope="module")
def model():
    """tiny-random with the new tokens' rows moved away from the base rows, so that merged
    and unmerged decoding differ unless the merge is right."""
    model = XVila.from_pretrained("tiny-random")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in trainable_layers(model):
            for delta in layer.trainable_tokens_delta.values():
                delta.add_(torch.randn(delta.shape, generator=g))
    return model


def trainable_layers(model) -> list[TrainableTokensLayer]:
    layers = [m for m in model.llm.modules() if isinstance(m, TrainableTokensLayer)]
    assert len(layers) == 2  # the input embeddings and the LM head
    return layers


def prompt(model, text: str) -> torch.Tensor:
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.splice(ids, {})


def decode(engine: Engine, embeds, output="image", n=6):
    steps = list(engine.generate(embeds, Sampling(max_new_tokens=n, temperature=0.0, min_new_tokens=n), output=output))
    return [s.token_id for s in steps], [s.states for s in steps if s.modality]


# ------------------------------------------------------------------ 3: merged new-token rows


def test_decoding_never_rebuilds_the_merged_matrices(model, monkeypatch):
    calls = []
    original = TrainableTokensLayer.get_merged_weights

    def counting(self, active_adapters):
        calls.append(self.base_layer.weight.numel())
        return original(self, active_adapters)

    monkeypatch.setattr(TrainableTokensLayer, "get_merged_weights", counting)
    embeds = prompt(model, "A cat sits on a mat.")
    calls.clear()  # the prompt's own embedding lookup is outside the decode loop
    tokens, _ = decode(Engine(model), embeds, output="text")
    _, states = decode(Engine(model), embeds, output="image")
    assert len(tokens) == 6 and len(states) == 1
    assert calls == []  # unmerged: two whole matrices rebuilt on every forward


def test_merged_decoding_matches_peft_unmerged_and_is_undone(model, monkeypatch):
    embeds = prompt(model, "Make a video like this photo.")
    before = [layer.base_layer.weight.clone() for layer in trainable_layers(model)]
    merged = decode(Engine(model), embeds, output="text"), decode(Engine(model), embeds)
    # The reference: peft's own unmerged forward (each matrix rebuilt per call).
    monkeypatch.setattr(engine_module, "merged_new_tokens", lambda llm: contextlib.nullcontext())
    unmerged = decode(Engine(model), embeds, output="text"), decode(Engine(model), embeds)
    assert merged[0][0] == unmerged[0][0] and len(merged[0][0]) == 6
    torch.testing.assert_close(merged[1][1][0], unmerged[1][1][0], atol=1e-5, rtol=1e-5)
    # After the turn the base rows are the originals again and training reaches the rows.
    layers = trainable_layers(model)
    assert not any(layer.merged for layer in layers)
    for layer, weight in zip(layers, before):
        assert torch.equal(layer.base_layer.weight, weight)
    ids = model.tokenizer("[IMG0]", return_tensors="pt", add_special_tokens=False)["input_ids"]
    model.llm.get_input_embeddings()(ids).sum().backward()
    delta = layers[0].trainable_tokens_delta["default"]
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    delta.grad = None


def test_a_stream_closed_early_unmerges(model):
    steps = Engine(model).generate(prompt(model, "Hello"), Sampling(max_new_tokens=8, temperature=0.0))
    next(steps)
    assert all(layer.merged for layer in trainable_layers(model))
    steps.close()
    assert not any(layer.merged for layer in trainable_layers(model))


# ------------------------------------------------------------------ 5: E_vis in float32


class _FixedBlock(torch.nn.Module):
    """A block whose output is `value` everywhere: fits float16, two of them summed do not."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, attn_mask=None):
        return torch.full_like(x, self.value)


def test_block_sum_accumulates_in_float32():
    trunk = Trunk(dim=8, depth=2, heads=2, pre_ln=True, add_bias_kv=False).half()
    trunk.blocks = torch.nn.Sequential(_FixedBlock(40960.0), _FixedBlock(49152.0))
    last, block_sum = trunk(torch.randn(1, 5, 8, dtype=torch.float16), sum_blocks=True)
    assert last.dtype == torch.float16
    assert block_sum.dtype == torch.float32
    assert torch.equal(block_sum, torch.full_like(block_sum, 90112.0))  # float16 tops out at 65504


class _HalfDecoder(Decoder):
    """A decoder reduced to a float16 U-Net-shaped parameter and a controller."""

    modality = "image"

    def __init__(self, controller):
        super().__init__()
        self.unet = torch.nn.Linear(1, 1).half()
        self.controller = controller


def test_a_float16_controller_takes_an_e_vis_beyond_float16():
    torch.manual_seed(0)
    controller = VisualController(in_channels=8, block_out_channels=[4, 8], slots=[(0, False), (0, True), (1, False)],
                                  mid_stage=1)
    for zero in controller.zero_convs:  # zero-initialised outputs would hide the values
        torch.nn.init.normal_(zero.weight)
    decoder = _HalfDecoder(controller.half())
    e_vis = torch.randn(4, 4, 8)
    s = DecodeSettings()
    small = decoder.highway_residuals(e_vis, (4, 8, 8), s)
    # LayerNorm is blind to scale: 1e5 x E_vis (past float16's range) must give the same residuals.
    large = decoder.highway_residuals(e_vis * 1e5, (4, 8, 8), s)
    for a, b in zip([*small[0], small[1]], [*large[0], large[1]]):
        assert a.dtype == torch.float16 and torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ 7: one static cache per chat


@pytest.fixture
def counted_caches(monkeypatch):
    built = []

    class CountingCache(engine_module.StaticCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(engine_module, "StaticCache", CountingCache)
    return built


def test_one_static_cache_serves_every_turn_at_the_same_addresses(model, counted_caches):
    chat = model.new_chat()
    chat.engine = Engine(model, static_cache=True)
    addresses = []
    for text in ["Hello there", "A cat sits on a mat and the rain falls on the roof", "Rain"]:
        list(chat.send(text, output="text", temperature=0.0, max_new_tokens=4))
        layer = counted_caches[0].layers[0]
        addresses.append((layer.keys.data_ptr(), layer.values.data_ptr(),
                          trainable_layers(model)[1].base_layer.weight.data_ptr()))
    assert len(counted_caches) == 1
    assert len(set(addresses)) == 1


def test_a_reset_cache_decodes_as_a_fresh_one(model):
    engine = Engine(model, static_cache=True)
    decode(engine, prompt(model, "A long first prompt about the sound of waves on the beach at sunset"))
    second = prompt(model, "Rain")
    reused, fresh = decode(engine, second), decode(Engine(model, static_cache=True), second)
    assert reused[0] == fresh[0]
    torch.testing.assert_close(reused[1][0], fresh[1][0], atol=0, rtol=0)


def test_warm_up_says_so_and_allocates_the_cache_the_turns_reuse(model, counted_caches):
    lines = []
    engine = Engine(model, static_cache=True)
    engine.warm_up(progress=lines.append)
    assert lines and "warming up" in lines[0]
    decode(engine, prompt(model, "Hello"))
    assert len(counted_caches) == 1 and counted_caches[0].layers[0].max_cache_len == model.config.max_context


def test_no_recompilation_across_turns(model):
    """`torch.compile` with the eager backend (Dynamo's tracing and guards without Inductor,
    fast on a CPU): turns of different prompt lengths reuse the one compiled step. The CUDA
    graphs of `mode="reduce-overhead"` need the stable addresses checked above; that part
    is for a GPU."""
    torch._dynamo.reset()
    engine = Engine(model, static_cache=True)
    engine._step = torch.compile(engine._forward, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for text in ["Hello there", "A cat sits on a mat and more words", "Rain"]:
            tokens, _ = decode(engine, prompt(model, text), output="text", n=4)
            assert len(tokens) == 4


# ------------------------------------------------------------------ 8: bf16 only where the GPU has it


def fake_gpu(monkeypatch, major: int):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))


@pytest.mark.parametrize("major, expected", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_the_4bit_preset_computes_in_float16_without_bfloat16(monkeypatch, major, expected):
    fake_gpu(monkeypatch, major)
    config = XVilaConfig.from_name("xvila-7b-4bit")
    assert config.torch_dtype("cuda") == expected
    assert config.torch_dtype("cpu") == torch.float32
    assert XVilaConfig.from_name("xvila-7b").torch_dtype("cuda") == torch.float16

    captured = {}

    class Captured(Exception):
        pass

    def from_pretrained(source, **kwargs):
        captured.update(kwargs)
        raise Captured

    monkeypatch.setattr(checkpoint.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(Captured):
        checkpoint._load_llm(config, "lmsys/vicuna-7b-v1.5", torch.device("cuda"), vocab_size=32000)
    assert captured["dtype"] == expected
    assert captured["quantization_config"].bnb_4bit_compute_dtype == expected


# ------------------------------------------------------------------ 6: offloaded decoders, no text tower


@pytest.fixture(scope="module")
def decoder_folders(tmp_path_factory):
    """Tiny decoders saved as folders, so that the build goes through their loaders."""
    out = tmp_path_factory.mktemp("decoders")
    for m, cls in checkpoint.DECODER_CLASSES.items():
        cls.tiny_random(cond_dim=32).save_pretrained(out / m)
    return {m: str(out / m) for m in checkpoint.DECODER_CLASSES}


def decoder_placements(monkeypatch) -> list[str]:
    """The device type of every `Decoder.to(device)` call from now on."""
    seen = []
    original = Decoder.to

    def to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
        if device is not None:
            seen.append(torch.device(device).type)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "to", to)
    return seen


@pytest.mark.parametrize("offload", [True, False])
def test_offloaded_decoders_load_on_the_cpu_and_never_visit_the_compute_device(decoder_folders, monkeypatch, offload):
    placed = decoder_placements(monkeypatch)
    config = XVilaConfig.from_name("tiny-random").replace(decoders=decoder_folders)
    # "meta" stands for the GPU: a compute device that is not the CPU, and costs nothing.
    model = checkpoint.build_xvila(config, device="meta", offload_decoders=offload)
    assert model.device.type == "meta" and len(placed) == 3  # each decoder's loader placed it once
    resident = {p.device.type for d in model.decoders.values() for p in d.parameters()}
    if offload:
        assert set(placed) == {"cpu"} and resident == {"cpu"}
    else:  # the contrast: resident decoders do go to the compute device
        assert set(placed) == {"meta"} and resident == {"meta"}


def test_the_model_holds_no_imagebind_text_tower_and_no_0_dim_parameter(model, tmp_path):
    assert set(model.imagebind.modality_trunks) == {"vision", "audio"}
    assert [n for n, p in model.named_parameters() if p.dim() == 0] == []  # DeepSpeed 0.19.8 refuses those
    # A checkpoint whose ImageBind folder still holds the text tower loads without it.
    full = ImageBind(ImageBindConfig.from_name("tiny"))
    save_imagebind(full, tmp_path / "ib")
    towers = load_imagebind(tmp_path / "ib", modalities=("vision", "audio"))
    assert set(towers.modality_trunks) == {"vision", "audio"}
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(towers({"vision": x})["vision"], full.eval()({"vision": x})["vision"], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ 9: ImageBind's config.json


def tiny_imagebind_config() -> dict:
    """The official constructor's kwargs at toy sizes, as nielsr/imagebind-huge lays them
    out (PyTorchModelHubMixin's config.json: the kwargs, extra modalities' sizes included)."""
    return {"out_embed_dim": 16, "vision_embed_dim": 32, "vision_num_blocks": 2, "vision_num_heads": 2,
            "audio_embed_dim": 24, "audio_num_blocks": 2, "audio_num_heads": 2, "text_embed_dim": 16,
            "text_num_blocks": 2, "text_num_heads": 2, "depth_embed_dim": 8, "depth_num_blocks": 1}


def write_imagebind_repo(folder: Path) -> ImageBindConfig:
    """model.safetensors of a tiny ImageBind and its config.json (kwargs only, no modalities)."""
    config = ImageBindConfig.from_dict(tiny_imagebind_config())
    save_imagebind(ImageBind(config), folder)
    (folder / "config.json").write_text(json.dumps(tiny_imagebind_config()))
    return config


def test_imagebind_config_json_is_read_from_a_folder(tmp_path):
    config = write_imagebind_repo(tmp_path / "ib")
    loaded = load_imagebind(tmp_path / "ib")
    assert loaded.config == config and loaded.config.audio_embed_dim == 24  # not huge's 768, not tiny's 32


def test_imagebind_config_json_is_read_from_a_hub_repo(tmp_path, monkeypatch):
    """A fake Hub: each file asked for is copied into a snapshot folder, as
    `hf_hub_download` does, so config.json is there only if the loader asks for it."""
    remote, snapshot = tmp_path / "remote", tmp_path / "snapshot"
    config = write_imagebind_repo(remote)
    snapshot.mkdir()
    asked = []

    def hf_hub_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if not (remote / filename).is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} is not in {repo_id}")
        (snapshot / filename).write_bytes((remote / filename).read_bytes())
        return str(snapshot / filename)

    monkeypatch.setattr(xvila.fileio, "hf_hub_download", hf_hub_download)
    loaded = load_imagebind("someone/imagebind-tiny")
    assert ("someone/imagebind-tiny", "config.json") in asked and loaded.config == config
    # As the assembler loads it: the same config, the chat's towers only.
    towers = load_imagebind("someone/imagebind-tiny", modalities=("vision", "audio"))
    assert towers.config.vision_embed_dim == 32 and set(towers.modality_trunks) == {"vision", "audio"}
    # A repo without config.json (Meta's .pth mirrored) still loads, as ImageBind-huge's sizes.
    (remote / "config.json").unlink()
    (snapshot / "config.json").unlink()
    with pytest.raises(xvila.errors.WeightsUnavailableError, match="do not match"):
        load_imagebind("someone/imagebind-tiny")  # huge's sizes against tiny weights: strict load refuses
