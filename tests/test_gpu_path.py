"""Defects of the GPU path found by review, checked on the CPU (issue 11: 3, 5, 7, 8).

3. Decoding reads the embedding and LM-head matrices as they are: peft's trainable-tokens
   layer is merged for the turn, not rebuilt per forward, and unmerged afterwards.
5. E_vis, the sum of the vision trunk's block outputs, accumulates in float32 and reaches
   a float16 controller without overflowing.
7. One static KV cache for a chat's life: reset, never rebuilt, its buffers at the same
   addresses every turn (what CUDA graphs need), and no recompilation across turns.
8. The 4-bit preset computes in float16 on a GPU without bfloat16.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

import xvila.engine as engine_module
from xvila import checkpoint
from xvila.config import XVilaConfig
from xvila.decoders.base import DecodeSettings, Decoder
from xvila.decoders.controller import VisualController
from xvila.encoders.imagebind import Trunk
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
