"""The image (SD1.5) and audio (AudioLDM) decoders on tiny random parts: files, seeds,
guidance, save/load, offline errors, the decoder's own text encoder, progress and cancel."""

import json
import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import soundfile as sf
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from xvila.decoders.audio import AUDIOLDM_REPO, AudioDecoder
from xvila.decoders.base import Cancelled, DecodeSettings, denoise, generate
from xvila.decoders.controller import VisualController
from xvila.decoders.image import SD15_REPO, ImageDecoder
from xvila.errors import WeightsUnavailableError

COND = 32  # tiny-random's E_text width
BUILD = {
    "image": lambda seed=0: ImageDecoder.tiny_random(seed=seed, cond_dim=COND),
    "audio": lambda seed=0: AudioDecoder.tiny_random(seed=seed, cond_dim=COND),
}
# One sample's E_text as P_out gives it (cond_shapes): image [77, C], audio [1, C].
E_SHAPE = {"image": (77, COND), "audio": (1, COND)}
SETTINGS = {"image": dict(), "audio": dict(seconds=0.25)}


def e_text(modality, seed=7):
    return torch.randn(E_SHAPE[modality], generator=torch.Generator().manual_seed(seed))


def settings(modality, **changes):
    return DecodeSettings(**{"steps": 2, "guidance": 7.5, "seed": 0, **SETTINGS[modality], **changes})


@pytest.fixture(scope="module", params=["image", "audio"])
def case(request):
    """(modality, a tiny decoder shared by the tests that do not change it)."""
    return request.param, BUILD[request.param]()


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


# ------------------------------------------------------------------------- files
@pytest.mark.parametrize("size", [None, (48, 64)])
def test_image_decoder_writes_a_png_of_the_asked_size(tmp_path, size):
    decoder = BUILD["image"]()
    s = settings("image") if size is None else settings("image", height=size[0], width=size[1])
    path = generate(decoder, e_text("image"), tmp_path / "out.png", s)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == ((32, 32) if size is None else (size[1], size[0]))  # tiny default: 4x4 latents x 8
        pixels = np.asarray(im)
    assert pixels.std() > 1.0  # a picture, not a flat fill


def test_image_size_must_be_a_multiple_of_the_vae_factor():
    with pytest.raises(ValueError, match="multiples of 8"):
        BUILD["image"]().latent_shape(DecodeSettings(height=36, width=32))


@pytest.mark.parametrize("seconds", [0.25, 0.3001])  # 0.3001 s: not a whole number of vocoder hops
def test_audio_decoder_writes_a_wav_of_the_asked_length(tmp_path, seconds):
    decoder = BUILD["audio"]()
    path = generate(decoder, e_text("audio"), tmp_path / "out.wav", settings("audio", seconds=seconds))
    info = sf.info(str(path))
    assert (info.format, info.samplerate, info.channels) == ("WAV", 16000, 1)
    assert info.frames == round(seconds * 16000)
    samples, _ = sf.read(str(path), dtype="int16")
    assert samples.std() > 10  # not silence


def test_audio_latents_follow_the_vocoder_hop_and_vae_factor():
    decoder = BUILD["audio"]()
    assert (decoder.hop_length, decoder.vae_scale_factor, decoder.sampling_rate) == (64, 2, 16000)
    # 0.3001 s = 4802 samples -> 76 frames of 64 (covering it) -> 38 latent rows; 8 mel bins / 2.
    assert decoder.latent_shape(DecodeSettings(seconds=0.3001)) == (4, 38, 4)
    with pytest.raises(ValueError, match="positive"):
        decoder.latent_shape(DecodeSettings(seconds=0.0))


# ------------------------------------------------------------------------- seeds
def test_same_seed_same_file_other_seed_other_file(tmp_path, case):
    modality, decoder = case
    suffix = decoder.file_suffix
    a = generate(decoder, e_text(modality), tmp_path / f"a{suffix}", settings(modality, seed=3)).read_bytes()
    b = generate(decoder, e_text(modality), tmp_path / f"b{suffix}", settings(modality, seed=3)).read_bytes()
    c = generate(decoder, e_text(modality), tmp_path / f"c{suffix}", settings(modality, seed=4)).read_bytes()
    assert a == b
    assert a != c


# --------------------------------------------------------- classifier-free guidance
def test_guidance_uses_the_empty_prompt_embedding_computed_once(case):
    modality = case[0]
    decoder = BUILD[modality]()
    calls = count_calls(decoder.text_encoder)
    unguided = denoise(decoder, e_text(modality), settings(modality, guidance=1.0))
    assert calls == []  # no guidance, no negative embedding
    guided = denoise(decoder, e_text(modality), settings(modality, guidance=7.5))
    again = denoise(decoder, e_text(modality), settings(modality, guidance=7.5))
    assert len(calls) == 1  # the negative embedding, once
    assert not torch.allclose(unguided, guided)
    assert torch.equal(guided, again)
    # It is the empty prompt's embedding, and the loop really uses it.
    assert torch.equal(decoder.negative_condition(), decoder.encode_text([""]))
    decoder._negative = torch.zeros_like(decoder._negative)
    assert not torch.allclose(denoise(decoder, e_text(modality), settings(modality)), guided)


# ------------------------------------------------------------------ save and load
def test_save_pretrained_round_trip(tmp_path, case):
    modality, decoder = case
    folder = decoder.save_pretrained(tmp_path / modality)
    parts = {"unet", "vae", "scheduler", "text_encoder", "tokenizer"} | ({"vocoder"} if modality == "audio" else set())
    assert {p.name for p in folder.iterdir()} == parts
    loaded = type(decoder).from_pretrained(folder)
    mine, theirs = decoder.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(decoder.scheduler.config)
    assert loaded.tokenizer("a dog barking").input_ids == decoder.tokenizer("a dog barking").input_ids
    assert loaded.tokenizer.model_max_length == decoder.tokenizer.model_max_length
    s = settings(modality, seed=5)
    a = generate(decoder, e_text(modality), tmp_path / f"a{decoder.file_suffix}", s)
    b = generate(loaded, e_text(modality), tmp_path / f"b{decoder.file_suffix}", s)
    assert a.read_bytes() == b.read_bytes()


def test_a_different_seed_builds_different_weights(case):
    modality, decoder = case
    other = BUILD[modality](seed=1)
    assert not torch.equal(decoder.unet.conv_in.weight, other.unet.conv_in.weight)
    assert torch.equal(decoder.unet.conv_in.weight, BUILD[modality](seed=0).unet.conv_in.weight)


def test_a_folder_missing_a_part_names_it(tmp_path, case):
    modality, decoder = case
    folder = decoder.save_pretrained(tmp_path / modality)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(WeightsUnavailableError, match="text_encoder"):
        type(decoder).from_pretrained(folder)


def test_a_text_encoder_missing_a_weight_is_refused_but_not_one_missing_buffers(tmp_path):
    """AudioLDM's CLAP checkpoint predates persistent position/token-type id buffers: those
    are rebuilt; a missing parameter is an error naming it (transformers only warns)."""
    decoder = BUILD["audio"]()
    folder = decoder.save_pretrained(tmp_path / "audio")
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    del state["text_model.embeddings.position_ids"], state["text_model.embeddings.token_type_ids"]
    save_file(state, weights, metadata={"format": "pt"})
    assert torch.equal(AudioDecoder.from_pretrained(folder).encode_text(["a dog"]), decoder.encode_text(["a dog"]))
    del state["text_projection.linear1.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(WeightsUnavailableError, match="text_projection.linear1.weight"):
        AudioDecoder.from_pretrained(folder)


def test_the_repos_scheduler_config_becomes_dpm_solver_plus_plus(tmp_path):
    """SD1.5 ships a PNDM scheduler config (AudioLDM a DDIM one): the loader keeps its
    betas and offset and runs DPM-Solver++."""
    folder = BUILD["image"]().save_pretrained(tmp_path / "sd")
    sd15_scheduler = {  # stable-diffusion-v1-5's scheduler/scheduler_config.json
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False,
    }
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd15_scheduler))
    scheduler = ImageDecoder.from_pretrained(folder).scheduler
    assert isinstance(scheduler, DPMSolverMultistepScheduler)
    config = scheduler.config
    assert config.algorithm_type == "dpmsolver++"
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.steps_offset == 1


@pytest.mark.parametrize("cls, repo", [(ImageDecoder, SD15_REPO), (AudioDecoder, AUDIOLDM_REPO)])
def test_offline_with_an_empty_hub_cache_names_the_repo(tmp_path, monkeypatch, cls, repo):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as err:
        cls.from_pretrained(repo)
    assert repo in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_a_source_that_is_neither_folder_nor_repo_id():
    with pytest.raises(WeightsUnavailableError, match="neither a folder nor a Hub repo id"):
        ImageDecoder.from_pretrained("no-such-folder")


# ------------------------------------------------------------ the decoder's own text encoder
def test_encode_text_gives_the_conditioning_the_decoder_takes(case):
    modality, decoder = case
    e = decoder.encode_text(["a dog"])
    assert e.shape == (1, *E_SHAPE[modality])
    assert not torch.allclose(e, decoder.encode_text(["a cat"]))
    latents = denoise(decoder, e, settings(modality))
    assert latents.shape == (1, *decoder.latent_shape(settings(modality)))
    assert torch.isfinite(latents).all()
    if modality == "audio":  # AudioLDM's CLAP embeddings are L2-normalised
        assert torch.allclose(e.norm(dim=-1), torch.ones(1, 1))


def test_audio_takes_e_text_with_or_without_the_token_axis():
    decoder = BUILD["audio"]()
    e = e_text("audio")  # [1, C]
    s = settings("audio")
    assert torch.equal(denoise(decoder, e, s), denoise(decoder, e[None], s))  # [1, 1, C]


# -------------------------------------------------------------- progress and cancel
def test_progress_is_reported_every_step(case):
    modality, decoder = case
    seen = []
    denoise(decoder, e_text(modality), settings(modality, steps=3), progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_should_stop_cancels_between_steps(case):
    modality, decoder = case
    asked, seen = [], []

    def stop():
        asked.append(1)
        return len(asked) == 3  # True before step index 2

    with pytest.raises(Cancelled):
        denoise(decoder, e_text(modality), settings(modality, steps=4), progress=lambda i, n: seen.append(i),
                should_stop=stop)
    assert seen == [1, 2]


# ------------------------------------------------------------------ visual controller
def test_the_tiny_image_unet_takes_a_visual_controller(tmp_path):
    """The controller reads the U-Net's block layout; a fresh (zero-initialised) one leaves
    the image unchanged, a trained-looking one changes it."""
    decoder = BUILD["image"]()
    e_vis = torch.randn(16, 16, 24, generator=torch.Generator().manual_seed(0))
    s = settings("image", alpha=1.0)
    plain = denoise(decoder, e_text("image"), s)
    decoder.controller = VisualController.from_unet(decoder.unet, 24)
    assert torch.equal(denoise(decoder, e_text("image"), s, e_vis=e_vis), plain)
    with torch.no_grad():
        for conv in decoder.controller.zero_convs:
            conv.weight.normal_(0, 0.1)
    assert not torch.allclose(denoise(decoder, e_text("image"), s, e_vis=e_vis), plain)


# ------------------------------------------------------------------- real checkpoints
def _real(cls, repo):
    try:
        return cls.from_pretrained(repo, device="cpu")
    except WeightsUnavailableError:
        pytest.skip(f"{repo} is not in the local Hub cache")


@pytest.mark.hub
@pytest.mark.slow
def test_real_stable_diffusion_1_5_has_the_layout_we_rely_on():
    decoder = _real(ImageDecoder, SD15_REPO)
    config = decoder.unet.config
    assert len(config.down_block_types) == 4 and config.cross_attention_dim == 768
    assert decoder.vae_scale_factor == 8 and decoder.default_size == 512
    assert decoder.latent_shape(DecodeSettings()) == (4, 64, 64)
    assert decoder.encode_text(["a dog"]).shape == (1, 77, 768)
    assert decoder.scheduler.config.algorithm_type == "dpmsolver++"


@pytest.mark.hub
@pytest.mark.slow
def test_real_audioldm_has_the_layout_we_rely_on():
    decoder = _real(AudioDecoder, AUDIOLDM_REPO)
    config = decoder.unet.config
    assert (config.class_embed_type, config.projection_class_embeddings_input_dim) == ("simple_projection", 512)
    assert config.class_embeddings_concat
    assert (decoder.sampling_rate, decoder.hop_length, decoder.vae_scale_factor) == (16000, 160, 4)
    assert decoder.latent_shape(DecodeSettings(seconds=5.0)) == (8, 125, 16)
    e = decoder.encode_text(["a dog barking"])
    assert e.shape == (1, 1, 512) and torch.allclose(e.norm(dim=-1), torch.ones(1, 1))
