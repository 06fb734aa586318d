"""The decode loop: streams tokens and collects generation-token states, batch 1.

1. Prefill the prompt embeddings (text with media spliced in) into a KV cache.
2. Sample one token at a time from the LM head applied to the last hidden state of the
   step before, so every step is one forward of one token.
3. A modality's generation tokens always come as a whole run, `[IMG0]..[IMG3]`: the model
   may only *start* a run (later run tokens are masked out of sampling); once it samples
   `[IMG0]`, the run is fed in a single forward whose last-layer hidden states are S_gen.
   No second pass over the reply and no per-layer hidden states are ever computed.
4. `output="image"` (etc.) makes the reply end with that run: it replaces `</s>` or comes
   when the token budget runs out, and nothing follows it; other modalities' runs are
   masked. `output="text"` masks every generation token.
5. Stop on `</s>`, on the token budget, on the context window, or when `should_stop()`.

With `static_cache=True` the KV cache is a preallocated `StaticCache` (fixed shapes, the
precondition for `torch.compile` of the one-token step, which `compile=True` adds on CUDA).
One such cache serves every turn of the engine (of its chat): it is reset, never rebuilt,
so a compiled step's CUDA graphs, recorded against its buffers, are recorded once;
`warm_up()` does that recording (and the compilation) before the first turn.

While a turn is decoded the new tokens' embedding and LM-head rows are merged into the
base matrices (`xvila.llm.merged_new_tokens`): peft would otherwise rebuild both whole
matrices on every forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache

from xvila.constants import MEDIA_MODALITIES
from xvila.llm import merged_new_tokens


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7  # <= 0: greedy
    top_p: float = 0.9
    min_new_tokens: int = 0  # `</s>` is masked until this many tokens exist (benchmarks)


@dataclass
class Step:
    """What one iteration produced: a text token, or a whole generation-token run."""

    token_id: int | None = None
    modality: str | None = None
    states: torch.Tensor | None = None  # [n, hidden]: S_gen of `modality`


class Engine:
    def __init__(self, model, static_cache: bool = False, compile: bool = False):
        self.model = model
        self.eos_id = model.tokenizer.eos_token_id
        self.gen_ids = model.gen_ids
        self.first_of = {ids[0]: m for m, ids in self.gen_ids.items()}
        self.later_ids = [i for ids in self.gen_ids.values() for i in ids[1:]]
        self.placeholder_ids = list(model.placeholder_ids.values())
        self.static_cache = static_cache or compile
        self._cache: StaticCache | None = None
        self._cache_len = 0
        self.caches_built = 0  # static caches constructed so far (one per engine, unless outgrown)
        self._step = self._forward
        if compile and model.device.type == "cuda":
            self._step = torch.compile(self._forward, mode="reduce-overhead", dynamic=False)

    def _new_cache(self, max_len: int):
        if not self.static_cache:
            return DynamicCache()
        if self._cache is not None and self._cache_len >= max_len:
            self._cache.reset()  # zeroes the buffers in place: their addresses stay the same
            return self._cache
        base = self.model.llm.get_base_model()
        self._cache, self._cache_len = StaticCache(config=base.config, max_cache_len=max_len), max_len
        self.caches_built += 1
        return self._cache

    def warm_up(self, progress: Callable[[str], None] | None = print, new_tokens: int = 3) -> None:
        """One short greedy turn, so that compiling the step and recording its CUDA graphs
        happen at start-up rather than in the first reply. The static cache it allocates
        (the model's whole context) is the one every later turn reuses."""
        if progress:
            progress("warming up the decode loop (compiling it the first time; this can take a minute)...")
        ids = self.model.tokenizer("Hello", return_tensors="pt")["input_ids"].to(self.model.device)
        with torch.inference_mode():
            embeds = self.model.embed_tokens(ids)
        sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0, min_new_tokens=new_tokens)
        for _ in self.generate(embeds, sampling, output="text"):
            pass
        if progress:
            progress("decode loop ready")

    def _forward(self, cache, positions: torch.Tensor, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        # Positions come in as a tensor so that a compiled step does not specialise on them.
        out = self.model.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=cache,
                                  use_cache=True, cache_position=positions, position_ids=positions[None])
        return out.last_hidden_state

    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, sampling: Sampling, output: str | None = None, seed: int = 0,
                 max_context: int | None = None, should_stop: Callable[[], bool] | None = None) -> Iterator[Step]:
        max_context = max_context or self.model.config.max_context
        with merged_new_tokens(self.model.llm):
            yield from self._generate(inputs_embeds, sampling, output, seed, max_context, should_stop)

    def _generate(self, inputs_embeds, sampling, output, seed, max_context, should_stop) -> Iterator[Step]:
        device = inputs_embeds.device
        cache = self._new_cache(max_context)
        rng = torch.Generator(device=device).manual_seed(seed)
        pos = inputs_embeds.shape[1]
        hidden = self._forward(cache, torch.arange(pos, device=device), inputs_embeds=inputs_embeds)
        logits = self.model.lm_head(hidden[:, -1]).float()[0]
        produced: set[str] = set()
        new_tokens = 0
        while not (should_stop and should_stop()):
            forced = output if output in MEDIA_MODALITIES and output not in produced else None
            token_room = sampling.max_new_tokens - new_tokens
            context_room = max_context - pos
            if forced:
                run = len(self.gen_ids[forced])
                if context_room < run:
                    return  # the forced run cannot fit the window (Chat reserves room for it)
                # Text stops where only the run still fits; a budget smaller than the run
                # still gets the run (the reply then exceeds max_new_tokens by design).
                must_force = token_room <= run or context_room <= run
            elif min(token_room, context_room) <= 0:
                return  # out of budget
            room = min(token_room, context_room)
            banned = self._banned(output, produced, room)
            if new_tokens < sampling.min_new_tokens:
                banned.append(self.eos_id)
            next_id = self._sample(logits, sampling, rng, banned)
            if forced and (next_id == self.eos_id or must_force):
                next_id = self.gen_ids[forced][0]
            if next_id == self.eos_id:
                return
            modality = self.first_of.get(next_id)
            ids = self.gen_ids[modality] if modality else [next_id]
            # One token: the (possibly compiled) step; a whole run: one eager forward.
            step = self._step if len(ids) == 1 else self._forward
            hidden = step(cache, torch.arange(pos, pos + len(ids), device=device), input_ids=torch.tensor([ids], device=device))
            pos += len(ids)
            new_tokens += len(ids)
            logits = self.model.lm_head(hidden[:, -1]).float()[0]
            if modality:
                produced.add(modality)
                yield Step(modality=modality, states=hidden[0].clone())
                if modality == output:  # a forced reply ends with its generation tokens
                    return
            else:
                yield Step(token_id=next_id)

    def _banned(self, output: str | None, produced: set[str], room: int) -> list[int]:
        """Token ids sampling may not choose now: media placeholders (inputs only), the
        inside of runs, and the start of a run that is not allowed or would not fit."""
        banned = list(self.later_ids) + list(self.placeholder_ids)
        for m, ids in self.gen_ids.items():
            not_allowed = m in produced or output == "text" or (output in MEDIA_MODALITIES and m != output)
            if not_allowed or (m != output and len(ids) > room):
                banned.append(ids[0])
        return banned

    @staticmethod
    def _sample(logits: torch.Tensor, s: Sampling, rng: torch.Generator, banned: list[int]) -> int:
        logits = logits.clone()
        logits[banned] = float("-inf")
        if s.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < s.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=rng))
