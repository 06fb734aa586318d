"""The benches (issue 11): what they build, and `bench/gpu_check.py --tiny` end to end.

1. `bench/generate.py --preset random-7b` names no Hub repo: a random Vicuna-7B-sized LLM
   and ImageBind-huge, tiny random decoders; nothing is resolved or downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from xvila import checkpoint
from xvila.config import PRESETS
from xvila.decoders.audio import AudioDecoder
from xvila.decoders.image import ImageDecoder
from xvila.decoders.video import VideoDecoder

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refuse_decoder_repos(monkeypatch) -> list:
    """Every way a decoder reaches its repo, recorded and refused."""
    calls = []
    for cls in (ImageDecoder, VideoDecoder, AudioDecoder):
        def refuse(*args, _cls=cls, **kwargs):
            calls.append((_cls.__name__, args))
            raise AssertionError(f"{_cls.__name__} resolved a repo")

        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))
        monkeypatch.setattr(cls, "locations", classmethod(refuse))
    return calls


def test_random_7b_names_no_repo_and_builds_no_real_decoder(monkeypatch):
    generate = bench_module("generate")
    config = generate.random_7b_config()
    assert config.llm_config == generate.VICUNA_7B and config.imagebind_config == "imagebind-huge"
    assert set(config.decoders.values()) == {None}
    assert checkpoint._part_locations(config, None) == {}  # the offline check finds nothing to look up
    # The same settings at toy size build without touching a decoder repo, decoders tiny.
    calls = refuse_decoder_repos(monkeypatch)
    tiny = config.replace(llm_config=PRESETS["tiny-random"]["llm_config"], imagebind_config="tiny")
    model = generate.load("random-7b", torch.device("cpu"), config=tiny)
    assert calls == []
    assert set(model.decoders) == {"image", "video", "audio"}
    # tiny parts (the text encoders keep the real widths, 768/1024/512): SD1.5 alone has ~1.07e9
    assert all(sum(p.numel() for p in d.parameters()) < 20_000_000 for d in model.decoders.values())
