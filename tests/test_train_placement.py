"""Phases 1-3a keep the decoders off the training device (issue 11).

Those phases run no U-Net, VAE or vocoder: their E_text targets come from the text cache
or the decoders' text encoders. So the decoders load on the CPU, only the text encoders
come to the device (and only without a text cache), and the module the accelerator
prepares (which it moves to the GPU, and DeepSpeed casts) holds no decoder. "meta" stands
for the GPU: a training device that is not the CPU.
"""

from __future__ import annotations

import pytest
import torch

from test_train_loop import MANIFESTS, config, make_world, run_phase
from train import loop
from train.loop import TrainConfig, load_init
from train.phases import PHASES
from xvila import XVila
from xvila.decoders.base import Decoder

META = torch.device("meta")


def devices(module) -> set[str]:
    return {p.device.type for p in module.parameters()}


@pytest.mark.parametrize("text_cache", [None, "cache/text"])
def test_llm_phases_load_their_decoders_on_the_cpu(text_cache):
    assert [k for k, p in PHASES.items() if p.uses_decoders] == ["3b"]
    cfg = TrainConfig(phase="1", manifests=["pairs.jsonl"], text_cache=text_cache)
    model = load_init(cfg, META, decoders_on_device=PHASES["1"].uses_decoders)
    assert model.device == META and devices(model.llm) == {"meta"}
    for decoder in model.decoders.values():
        rest = [part for name, part in decoder.named_children() if name != "text_encoder"]
        assert all(devices(part) <= {"cpu"} for part in rest)  # U-Net, VAE, vocoder, controller
        # the text encoder gives the targets on the device, unless the cache gives them
        assert devices(decoder.text_encoder) == ({"cpu"} if text_cache else {"meta"})


def test_phase_3b_has_its_decoders_on_the_device():
    cfg = TrainConfig(phase="3b", manifests=["x2x.jsonl"])
    model = load_init(cfg, META, decoders_on_device=PHASES["3b"].uses_decoders)
    assert all(devices(d) == {"meta"} for d in model.decoders.values())


def test_phase_1_prepares_no_decoder_and_its_final_folder_keeps_them(tmp_path, monkeypatch):
    world = make_world(tmp_path / "world")
    prepared = []
    original = loop.Run.prepare

    def prepare(self, objective, optimizer):
        prepared.append([type(m) for m in objective.modules() if isinstance(m, Decoder)])
        return original(self, objective, optimizer)

    monkeypatch.setattr(loop.Run, "prepare", prepare)
    # No text cache: the targets come from the decoders' text encoders, outside the objective.
    cfg = config(world, tmp_path, "1", MANIFESTS["1"], steps=2, text_cache=None)
    result = run_phase(cfg)
    assert prepared == [[]]
    assert result["losses"] and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["losses"])
    final, init = XVila.from_pretrained(str(result["final"])), XVila.from_pretrained("tiny-random")
    assert set(final.decoders) == {"image", "video", "audio"}
    for m in ("image", "video"):  # the controllers went back into the folder, unchanged
        a, b = final.decoders[m].controller.state_dict(), init.decoders[m].controller.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
