"""Any-to-any end to end on tiny-random: media in, media files out, TA vs TA+VEH."""

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from xvila import XVila
from xvila import media as media_io
from xvila.chat import OutputError
from xvila.decoders.base import DecodeSettings

FAST = DecodeSettings(steps=2, frames=4, seconds=0.5)


def media_events(events):
    return [e for e in events if e.kind == "media"]


@pytest.mark.parametrize("source,target", [("image", "video"), ("video", "image"), ("audio", "video"), ("video", "audio")])
def test_any_to_any_writes_a_valid_file(model, files, tmp_path, source, target):
    chat = model.new_chat(outputs_dir=tmp_path)
    events = list(chat.send(f"Turn this {source} into a {target}", media=[files[source]], output=target, decode=FAST))
    (ev,) = media_events(events)
    assert ev.modality == target and ev.path and ev.path.startswith(str(tmp_path))
    progress = [(e.step, e.steps) for e in events if e.kind == "progress"]
    assert progress == [(1, 2), (2, 2)]
    if target == "image":
        with Image.open(ev.path) as im:
            assert im.format == "PNG" and im.size == (32, 32)  # the tiny decoder's default size
    elif target == "video":
        info = media_io.probe_video(ev.path)
        video = media_io.read_video(ev.path, with_audio=False)
        assert video.frames.shape[0] == FAST.frames and info.fps == pytest.approx(FAST.fps)
        import av
        with av.open(ev.path) as c:
            assert c.streams.video[0].codec_context.name == "h264"
    else:
        data, rate = sf.read(ev.path)
        assert rate == 16000 and len(data) == int(FAST.seconds * 16000)
    # A visual input makes the visual decoders use the highway; audio has none.
    assert ev.variant == ("TA+VEH" if source in ("image", "video") and target in ("image", "video") else "TA")


def test_fresh_controller_makes_ta_and_veh_identical_then_training_separates_them(files, tmp_path):
    model = XVila.from_pretrained("tiny-random")
    chat = model.new_chat(outputs_dir=tmp_path)
    ev_ta, ev_veh = media_events(chat.send("An image like this", media=[files["image"]], output="image",
                                           decode=FAST, compare=True, alpha=1.0, seed=3))
    assert (ev_ta.variant, ev_veh.variant) == ("TA", "TA+VEH")
    assert np.array_equal(np.asarray(Image.open(ev_ta.path)), np.asarray(Image.open(ev_veh.path)))
    for p in model.decoders["image"].controller.zero_convs.parameters():  # as after phase-3b training
        torch.nn.init.normal_(p, std=0.5)
    chat.undo()
    ev_ta, ev_veh = media_events(chat.send("An image like this", media=[files["image"]], output="image",
                                           decode=FAST, compare=True, alpha=1.0, seed=3))
    assert not np.array_equal(np.asarray(Image.open(ev_ta.path)), np.asarray(Image.open(ev_veh.path)))


def test_highway_off_alpha_zero_or_no_visual_input_give_plain_ta(model, files, tmp_path):
    chat = model.new_chat(outputs_dir=tmp_path)
    for kwargs in ({"highway": False}, {"alpha": 0.0}):
        (ev,) = media_events(chat.send("An image like this", media=[files["image"]], output="image", decode=FAST, **kwargs))
        assert ev.variant == "TA"
    chat.reset()
    (ev,) = media_events(chat.send("Draw a cat", output="image", decode=FAST, compare=True))
    assert ev.variant == "TA"  # nothing to compare without a visual input


def test_text_aligned_decoding_reads_the_reply_with_the_decoders_text_encoder(model, files, tmp_path, monkeypatch):
    seen = []
    encode = model.decoders["image"].encode_text
    monkeypatch.setattr(model.decoders["image"], "encode_text", lambda prompts: seen.append(prompts) or encode(prompts))
    chat = model.new_chat(outputs_dir=tmp_path)
    events = list(chat.send("Draw a red car", output="image", decoding="text", decode=FAST, temperature=1.0,
                            max_new_tokens=12, seed=1))
    (ev,) = media_events(events)
    reply = chat.records[-1].assistant.split("[IMG0]")[0].strip()  # the reply's text before its image tokens
    assert ev.variant == "text-aligned" and seen == [[reply or "Draw a red car"]]
    torch.testing.assert_close(ev.condition, encode([reply or "Draw a red car"])[0])


def test_phase_3b_trains_only_the_controllers_and_visual_unets(model):
    counts = model.set_trainable("3b", verbose=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("decoders.image.controller.", "decoders.video.controller.",
                                         "decoders.image.unet.", "decoders.video.unet.")) for n in trained)
    assert any(n.startswith("decoders.video.controller.") for n in trained)
    assert not any(n.startswith("decoders.audio.") for n in trained)
    assert sum(counts.values()) == sum(p.numel() for n, p in model.named_parameters() if n in trained)
    model.set_trainable("1", verbose=False)


def test_checkpoint_with_decoders_round_trips_to_identical_files(model, files, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt" / "decoders").iterdir()} == {"image", "video", "audio"}
    again = XVila.from_pretrained(tmp_path / "ckpt")
    outs = []
    for i, m in enumerate((model, again)):
        chat = m.new_chat(outputs_dir=tmp_path / f"out{i}")
        (ev,) = media_events(chat.send("A video like this", media=[files["image"]], output="video", decode=FAST, seed=2))
        outs.append(media_io.read_video(ev.path, with_audio=False).frames)
    assert np.array_equal(*outs)


def test_a_loaded_checkpoint_saves_again_with_its_own_parts(model, tmp_path):
    model.save_pretrained(tmp_path / "first")
    loaded = XVila.from_pretrained(tmp_path / "first")
    loaded.save_pretrained(tmp_path / "second")  # llm/, imagebind/, decoders/ must be written again
    for part in ("llm", "imagebind", "decoders/image", "decoders/video", "decoders/audio"):
        assert (tmp_path / "second" / part).is_dir(), part
    again = XVila.from_pretrained(tmp_path / "second")
    theirs = dict(loaded.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in again.named_parameters())


def test_decoding_accepts_the_variant_labels_and_the_old_values(model, files, tmp_path):
    def variant(**kwargs):
        chat = model.new_chat(outputs_dir=tmp_path)
        (ev,) = media_events(chat.send("An image like this", media=[files["image"]], output="image", decode=FAST,
                                       seed=2, max_new_tokens=6, temperature=0.0, **kwargs))
        return ev

    assert variant(decoding="TA").variant == "TA"  # the label turns the highway off
    assert variant(decoding="TA+VEH").variant == "TA+VEH" and variant(decoding="TA+VEH", highway=False).variant == "TA"
    assert variant(decoding="embed").variant == "TA+VEH" and variant(decoding="embed", highway=False).variant == "TA"
    a, b = variant(decoding="text-aligned"), variant(decoding="text")
    assert a.variant == b.variant == "text-aligned" and torch.equal(a.condition, b.condition)
    chat = model.new_chat(outputs_dir=tmp_path)
    with pytest.raises(OutputError, match="'TA', 'TA\\+VEH', 'text-aligned'"):
        next(chat.send("An image", output="image", decoding="veh"))
    assert chat.history == []


def test_half_precision_parts_with_float32_projections(files, tmp_path, monkeypatch):
    """As `from_pretrained` builds on a GPU: the LLM, ImageBind, decoders and controllers in
    16-bit, P_in/P_out in float32 (bfloat16 here, which a CPU runs)."""
    import xvila.checkpoint

    monkeypatch.setattr(xvila.checkpoint, "_torch_dtype", lambda config, device: torch.bfloat16)
    model = XVila.from_pretrained("tiny-random")
    assert model.decoders["image"].controller.proj_in.weight.dtype == torch.bfloat16
    assert model.llm.get_base_model().lm_head.weight.dtype == torch.bfloat16
    chat = model.new_chat(outputs_dir=tmp_path)
    for target in ("image", "audio"):
        events = media_events(chat.send("Like this", media=[files["image"]], output=target, decode=FAST, compare=True))
        assert {e.modality for e in events} == {target} and all(e.path for e in events)
        assert events[0].condition.dtype == torch.float32
