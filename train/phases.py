"""The table of training phases: what each trains, which data it reads, its samples and loss.

    python -m train phase1 --config train/configs/phase1.yaml                 # init: a preset
    python -m train phase2 --config train/configs/phase2.yaml                 # init: runs/phase1/final
    python -m train phase3a --config train/configs/phase3a.yaml               # init: runs/phase2/final
    python -m train phase3b --config train/configs/phase3b.yaml               # init: runs/phase3a/final
    python -m train phase1 --config train/configs/phase1.yaml --resume        # after a stop
    accelerate launch --config_file train/configs/accelerate/1x24gb.yaml -m train phase1 \\
        --config train/configs/phase1.yaml --config train/configs/24gb.yaml

Every phase runs the one loop, `train.loop.train`; a row here is all that differs. What a
phase trains is `XVila.set_trainable(phase)` (the parameter groups of `xvila.model.PHASES`).

- 1, encoder-LLM-decoder alignment (paper A.1): X-text pairs (image, video, audio) align
  the encoders' and the decoders' ends with the LLM's text space. Only P_in, P_out and the
  new tokens' embedding rows train. X -> text, captioning: the next-token loss on the
  caption; text -> X, generation: "Generate an image of {caption}" -> [IMG0]..[IMG3], with
  the MSE between P_out(S_gen) and the decoder text encoder's embedding of the caption.
  Paper: 20k iterations, Adam, lr 4e-4 with warm-up, global batch 200 (pairs; each pair
  gives one captioning and one generation row).
- 2, interleaved data pre-training (A.2): sequences cut from captioned videos, n = 3 even
  chunks, each (image, audio, video clip, caption), become one multi-turn conversation
  (`train.batches.interleaved_samples`): each chunk shows one of its media, and the reply
  captions it or generates another medium of the same moment. LoRA trains too; the losses
  are phase 1's. Paper: 10k iterations, lr 1e-4, global batch 192.
- 3a, X-to-X instruction tuning, textual alignment (A.3a): the X-to-X conversations
  (VID2IMG, IMG2VID, VID2VID, AUD2VID, VID2AUD, IMG+AUD2VID) blended with SFT data (LLaVA,
  VideoChat, NExT-GPT, Alpaca) by the manifests' mixing weights (`train.batches.Order`);
  what trains and the losses are phase 2's; the decoders stay frozen. Paper: 30k
  iterations, lr 1e-4, global batch 192.
- 3b, visual alignment (A.3b): see `train.phase3b` for its loss. Paper: 20k iterations,
  lr 1e-6, global batch 64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from train import batches
from train.data import CONVERSATION, INTERLEAVED, PAIR
from train.phase3b import visual_alignment_loss
from xvila.constants import VISUAL
from xvila.model import PHASES as TRAINS


def _llm_phase_modes(model) -> None:
    model.train()
    model.imagebind.eval()  # frozen parts stay in eval mode (no drop-path, no dropout)
    model.decoders.eval()


def _visual_phase_modes(model) -> None:
    model.eval()  # the LLM, encoders, VAEs: frozen, in eval mode
    for m in VISUAL:
        model.decoders[m].unet.train()
        model.decoders[m].controller.train()


@dataclass(frozen=True)
class Phase:
    key: str  # "1", "2", "3a", "3b": what `XVilaConfig`, configs and checkpoints call it
    kinds: tuple[str, ...]  # the manifest record kinds it reads
    samples: Callable  # (record, rng, config) -> [Sample]: `train.batches`
    loss: Callable  # cfg -> (model, batch) -> {name: loss, "loss": total}
    modes: Callable = _llm_phase_modes  # which modules are in train mode
    data: Callable = lambda cfg: {}  # extra `Batches` options
    about: str = ""  # what `data:` prints after its counts
    record: Callable = lambda cfg: {}  # extra fields of the run's summary
    # Whether its loss runs the decoders' U-Nets/VAEs (3b). The others only need E_text
    # targets, from the text cache or the decoders' text encoders: their decoders stay on
    # the CPU, outside the module the accelerator prepares (`train.loop.train`).
    uses_decoders: bool = False

    @property
    def command(self) -> str:
        return f"phase{self.key}"

    @property
    def trains(self) -> tuple[str, ...]:
        return TRAINS[self.key]


def _lm_and_align(cfg):
    return batches.lm_and_align_loss


PHASES = {p.key: p for p in (
    Phase("1", (PAIR,), batches.pair_samples, _lm_and_align),
    Phase("2", (INTERLEAVED,), batches.interleaved_samples, _lm_and_align),
    Phase("3a", (CONVERSATION,), batches.conversation_samples, _lm_and_align),
    Phase("3b", (CONVERSATION,), batches.visual_samples, lambda cfg: visual_alignment_loss(cfg.condition),
          modes=_visual_phase_modes,
          data=lambda cfg: dict(visual=True, targets=cfg.condition == "caption", video_frames=cfg.video_frames,
                                keep=batches.has_visual_target),
          about=" (conversations with a visual input and a visual output)",
          record=lambda cfg: {"condition": cfg.condition}, uses_decoders=True),
)}
COMMANDS = {p.command: p for p in PHASES.values()}
