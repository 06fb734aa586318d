"""The Vicuna v1.1 template, placeholders and label spans."""

import pytest

from xvila.config import VICUNA_SYSTEM
from xvila.conversation import PromptError, Turn, render, user_content


def test_render_matches_fastchat_vicuna_v1_1_by_hand():
    # FastChat ADD_COLON_TWO: system + " ", then "ROLE: msg" + (" " after user, "</s>" after
    # assistant), and a bare "ASSISTANT:" for the turn to be generated.
    text, spans = render(VICUNA_SYSTEM, [Turn("Hi there", [], "Hello! How can I help?"), Turn("Thanks", [])])
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Hi there ASSISTANT: "
        "Hello! How can I help?</s>USER: Thanks ASSISTANT:"
    )
    assert text == expected
    assert [text[a:b] for a, b in spans] == ["Hello! How can I help?</s>"]


def test_media_placeholders_are_prefixed_in_input_order():
    text, _ = render("S", [Turn("Make a video like this", ["image", "audio"])])
    assert text == "S USER: <image>\n<audio>\nMake a video like this ASSISTANT:"


def test_placeholders_in_the_text_are_kept_and_checked():
    assert user_content("compare <image> with <video>", ["image", "video"]) == "compare <image> with <video>"
    with pytest.raises(PromptError, match="1 <image> placeholder"):
        user_content("only <image>", ["image", "image"])
    with pytest.raises(PromptError, match="order"):
        user_content("<video> then <image>", ["image", "video"])
