"""ImageBind: official-function parity, strict official-format loading, shapes, tokenizer."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from xvila.encoders.imagebind_weights import (
    filter_imagebind_state, load_imagebind, load_imagebind_tokenizer, save_imagebind,
)
from xvila.encoders.clip_tokenizer import ImageBindTokenizer, toy_clip_tokenizer
from xvila.encoders.imagebind import ImageBind, ImageBindConfig
from xvila.errors import WeightsUnavailableError
from xvila.fileio import read_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "imagebind-tiny-official"


def _hashed(shape, salt):
    """Deterministic noise in [-1, 1); the same formula made the reference outputs."""
    i = torch.arange(math.prod(shape), dtype=torch.float64) + salt * 1000.0
    x = torch.frac(torch.sin(i * 12.9898 + 78.233) * 43758.5453) * 2 - 1
    return x.reshape(shape).float()


@pytest.fixture(scope="module")
def official():
    return load_imagebind(OFFICIAL)


@pytest.fixture(scope="module")
def reference():
    with safe_open(FIXTURES / "imagebind-tiny-reference.safetensors", "pt") as f:
        texts = json.loads(f.metadata()["texts"])
    return load_file(FIXTURES / "imagebind-tiny-reference.safetensors"), texts


INPUTS = {  # name -> (modality, shape, salt) exactly as the reference was made
    "image": ("vision", (2, 3, 224, 224), 1),
    "video": ("vision", (1, 2, 3, 2, 224, 224), 2),
    "audio": ("audio", (2, 1, 128, 204), 3),
    "audio_clips": ("audio", (1, 3, 1, 128, 204), 4),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_matches_official_outputs(official, reference, name):
    modality, shape, salt = INPUTS[name]
    with torch.no_grad():
        got = official({modality: _hashed(shape, salt)})[modality]
    torch.testing.assert_close(got, reference[0][f"embed.{name}"], atol=2e-5, rtol=1e-4)


def test_text_matches_official_outputs(official, reference):
    ref, _ = reference
    with torch.no_grad():
        got = official({"text": ref["text_ids"]})["text"]
    torch.testing.assert_close(got, ref["embed.text"], atol=2e-5, rtol=1e-4)


def test_token_grid_and_highway_features_match_official_trunk(official, reference):
    ref, _ = reference
    with torch.no_grad():
        out = official.encode({"vision": _hashed((2, 3, 224, 224), 1)})
    torch.testing.assert_close(out.tokens["vision"], ref["vision_last_hidden.image"], atol=2e-5, rtol=1e-4)
    # E_vis: the block sum without the CLS token, laid out H x W x C in patch order.
    expected = ref["vision_block_sum.image"][:, 1:].reshape(2, 16, 16, 32)
    torch.testing.assert_close(out.vision_blocks, expected, atol=2e-5, rtol=1e-4)


def test_loads_official_checkpoint_strictly_dropping_only_unused_modalities():
    state = read_state_dict(OFFICIAL / "model.safetensors")
    kept = filter_imagebind_state(state, ("vision", "text", "audio"))
    dropped = set(state) - set(kept)
    assert dropped and all(k.split(".")[1] in ("depth", "thermal", "imu") for k in dropped)
    model = ImageBind(ImageBindConfig.from_dict(json.loads((OFFICIAL / "config.json").read_text())))
    assert set(model.state_dict()) == set(kept)  # every official key, nothing more


def test_official_pth_loads_with_weights_only(tmp_path, official):
    state = read_state_dict(OFFICIAL / "model.safetensors")
    torch.save(state, tmp_path / "imagebind_huge.pth")
    (tmp_path / "config.json").write_text((OFFICIAL / "config.json").read_text())
    model = load_imagebind(tmp_path)  # the folder: finds the .pth beside config.json
    theirs = official.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_load_rejects_missing_foreign_and_misshapen_keys(tmp_path):
    state = read_state_dict(OFFICIAL / "model.safetensors")
    config = ImageBindConfig.from_dict(json.loads((OFFICIAL / "config.json").read_text()))
    cases = {
        "missing": {k: v for k, v in state.items() if k != "modality_heads.vision.2.weight"},
        "unexpected": {**state, "modality_trunks.vision.extra.weight": torch.zeros(1)},
        "shape": {**state, "modality_heads.vision.2.weight": torch.zeros(3, 3)},
    }
    for case, bad in cases.items():
        path = tmp_path / f"{case}.pth"
        torch.save(bad, path)
        with pytest.raises(WeightsUnavailableError) as err:
            load_imagebind(path, config=config)
        assert ("modality_" in str(err.value)) and (case in str(err.value) or case == "shape"), str(err.value)


def test_save_load_round_trip_is_bit_exact_with_official_key_names(tmp_path):
    model = ImageBind(ImageBindConfig.from_name("tiny")).eval()
    save_imagebind(model, tmp_path / "ib")
    prefixes = ("modality_preprocessors.", "modality_trunks.", "modality_heads.", "modality_postprocessors.")
    assert all(k.startswith(prefixes) for k in load_file(tmp_path / "ib" / "model.safetensors"))
    loaded = load_imagebind(tmp_path / "ib")
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen encoder


def test_offline_hub_load_fails_with_a_clear_message(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(WeightsUnavailableError) as err:
        load_imagebind("nielsr/imagebind-huge")
    msg = str(err.value)
    assert "nielsr/imagebind-huge" in msg and "HF_HUB_OFFLINE" in msg and "model.safetensors" in msg


def test_huge_config_has_the_official_size():
    # Official imagebind_huge(), vision+text+audio: 864 tensors, 1,073,103,659 values
    # (counted on the official code; buffers included).
    with torch.device("meta"):
        model = ImageBind(ImageBindConfig.from_name("imagebind-huge"))
    state = model.state_dict()
    assert len(state) == 864
    assert sum(v.numel() for v in state.values()) == 1_073_103_659
    assert state["modality_preprocessors.vision.pos_embedding_helper.pos_embed"].shape == (1, 257, 1280)
    assert state["modality_preprocessors.audio.pos_embedding_helper.pos_embed"].shape == (1, 229, 768)


def test_encode_shapes_for_images_video_clips_and_audio():
    model = ImageBind(ImageBindConfig.from_name("tiny")).eval()
    c = model.config
    with torch.no_grad():
        img = model.encode({"vision": torch.randn(2, 3, 224, 224), "audio": torch.randn(2, 1, 128, 204)})
        vid = model.encode({"vision": torch.randn(1, 3, 3, 2, 224, 224)})
    assert img.embeds["vision"].shape == (2, c.out_embed_dim)
    assert img.tokens["vision"].shape == (2, 257, c.vision_embed_dim)
    assert img.tokens["audio"].shape == (2, 1 + 12 * 19, c.audio_embed_dim)
    assert img.vision_blocks.shape == (2, 16, 16, c.vision_embed_dim)
    assert vid.embeds["vision"].shape == (1, c.out_embed_dim)
    assert vid.tokens["vision"].shape == (1, 3, 257, c.vision_embed_dim)
    assert vid.vision_blocks.shape == (1, 3, 16, 16, c.vision_embed_dim)
    # Embeddings are unit vectors (vision) or scaled unit vectors (audio: x20, fixed).
    torch.testing.assert_close(img.embeds["vision"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(img.embeds["audio"].norm(dim=-1), torch.full((2,), 20.0))


def test_clip_inputs_average_per_clip_embeddings_and_items_are_independent():
    model = ImageBind(ImageBindConfig.from_name("tiny")).eval()
    clips = torch.randn(2, 3, 1, 128, 204)
    with torch.no_grad():
        pooled = model({"audio": clips})["audio"]
        per_clip = torch.stack([model({"audio": clips[:, s]})["audio"] for s in range(3)], 1)
        alone = model({"audio": clips[1:]})["audio"]
        again = model({"audio": clips})["audio"]
    torch.testing.assert_close(pooled, per_clip.mean(1))
    torch.testing.assert_close(alone[0], pooled[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(pooled, again)


def test_wrong_input_size_is_a_clear_error():
    model = ImageBind(ImageBindConfig.from_name("tiny")).eval()
    with pytest.raises(ValueError, match="patches"):
        model({"vision": torch.randn(1, 3, 112, 112)})
    with pytest.raises(ValueError, match="no 'depth' encoder"):
        model({"depth": torch.randn(1, 1, 224, 224)})


# ---------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def toy_tokenizer():
    return ImageBindTokenizer(toy_clip_tokenizer(["a", "dog", "barking", "rain", "cat"]))


def test_tokenizer_packs_like_the_official_one(toy_tokenizer):
    tok = toy_tokenizer.tokenizer
    vocab = tok.get_vocab()
    ids = toy_tokenizer("A  Dog barking.")[0]
    expected = [vocab["<|startoftext|>"], vocab["a</w>"], vocab["dog</w>"], vocab["barking</w>"], vocab[".</w>"],
                vocab["<|endoftext|>"]]
    assert ids[:6].tolist() == expected
    assert ids[6:].eq(0).all() and ids.shape == (77,)
    assert ids.argmax().item() == 5  # the model pools at the end token


def test_tokenizer_cleans_html_and_keeps_the_end_token_when_truncating(toy_tokenizer):
    vocab = toy_tokenizer.tokenizer.get_vocab()
    assert toy_tokenizer("dog &amp;amp; cat")[0, 1:5].tolist() == [vocab["dog</w>"], vocab["&</w>"], vocab["cat</w>"],
                                                               vocab["<|endoftext|>"]]
    long = toy_tokenizer(["rain " * 200, "dog"])
    assert long.shape == (2, 77)
    assert long[0, -1].item() == vocab["<|endoftext|>"] and long[0, 1:-1].eq(vocab["rain</w>"]).all()


def test_tokenizer_round_trips_through_a_folder(tmp_path, toy_tokenizer):
    toy_tokenizer.save_pretrained(tmp_path)
    again = load_imagebind_tokenizer(tmp_path)
    assert torch.equal(again(["a dog", "rain cat"]), toy_tokenizer(["a dog", "rain cat"]))


def test_tokenizer_offline_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="CLIP tokenizer"):
        load_imagebind_tokenizer(tmp_path / "nowhere")


@pytest.mark.hub
def test_real_clip_vocab_gives_the_official_ids(reference):
    """Needs openai/clip-vit-large-patch14's tokenizer in the Hub cache (skipped otherwise)."""
    ref, texts = reference
    try:
        tokenizer = load_imagebind_tokenizer()
    except WeightsUnavailableError:
        pytest.skip("CLIP tokenizer files are not in the local Hub cache")
    assert torch.equal(tokenizer(texts), ref["text_ids"])
