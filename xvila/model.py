"""`XVila`: ImageBind -> P_in -> LLM (LoRA, generation tokens) -> P_out.

The module holds its parts and does the maths; weights are read and written by
`xvila.checkpoint` (`XVila.from_pretrained` / `save_pretrained` delegate there), and turns
are run by `xvila.chat.Chat` with `xvila.engine.Engine`.

Training forward (`forward_train`) returns named losses:
- `lm`: next-token cross-entropy on the assistants' tokens only (labels from
  `xvila.conversation.tokenize`);
- `align/<modality>`: MSE between P_out(S_gen) and the decoder text encoder's embedding of
  the caption (E_text targets, precomputed tensors), for each generation-token run.
What trains in each phase is `set_trainable(phase)`, the one place that decides it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xvila.config import XVilaConfig
from xvila.constants import AUDIO, IMAGE, MEDIA_MODALITIES, VIDEO, VISUAL
from xvila.conversation import IGNORE_INDEX, PLACEHOLDERS
from xvila.encoders.imagebind import AUDIO as IB_AUDIO
from xvila.encoders.imagebind import VISION as IB_VISION
from xvila.encoders.imagebind import ImageBind, mean_clips
from xvila.errors import ConfigError
from xvila.media_worker import preprocess
from xvila.projections import InputProjection, OutputProjection

IB_KEY = {IMAGE: IB_VISION, VIDEO: IB_VISION, AUDIO: IB_AUDIO}
# The ImageBind towers the model holds: the chat's text goes to the LLM, never through
# ImageBind, so its text tower (354 M parameters in ImageBind-huge) is neither loaded nor
# placed on the GPU (nor handed to DeepSpeed, which refuses its 0-dim logit scale).
IMAGEBIND_TOWERS = tuple(dict.fromkeys(IB_KEY.values()))

# Parameter groups by name; `set_trainable` turns whole groups on.
GROUPS = {
    "p_in": lambda n: n.startswith("p_in."),
    "p_out": lambda n: n.startswith("p_out."),
    "new_tokens": lambda n: "trainable_tokens_delta" in n,
    "lora": lambda n: "lora_" in n,
    "controllers": lambda n: n.startswith(tuple(f"decoders.{m}.controller." for m in VISUAL)),
    "visual_unets": lambda n: n.startswith(tuple(f"decoders.{m}.unet." for m in VISUAL)),
}
PHASES = {
    "1": ("p_in", "p_out", "new_tokens"),
    "2": ("p_in", "p_out", "new_tokens", "lora"),
    "3a": ("p_in", "p_out", "new_tokens", "lora"),
    "3b": ("controllers", "visual_unets"),  # visual alignment: everything else frozen
}


@dataclass
class MediaInput:
    """One encoded input: its LLM embeddings and, for visual inputs, E_vis for the highway."""

    modality: str
    embeds: torch.Tensor  # [k, hidden]
    highway: torch.Tensor | None = None  # [H, W, C] (image) or [S, H, W, C] (video clips)
    source: str | None = None


class XVila(nn.Module):
    def __init__(self, config: XVilaConfig, imagebind: ImageBind, llm, tokenizer):
        super().__init__()
        self.config = config
        self.imagebind = imagebind
        self.llm = llm  # peft.PeftModel around LlamaForCausalLM
        self.tokenizer = tokenizer
        hidden = llm.get_base_model().config.hidden_size
        ib = imagebind.config
        trunk_dim = {IMAGE: ib.vision_embed_dim, VIDEO: ib.vision_embed_dim, AUDIO: ib.audio_embed_dim}
        k = config.tokens_per_input
        self.p_in = nn.ModuleDict({
            m: InputProjection(ib.out_embed_dim if k[m] == 1 else trunk_dim[m], hidden, k[m]) for m in MEDIA_MODALITIES
        })
        self.p_out = nn.ModuleDict({
            m: OutputProjection(hidden, config.cond_shapes[m], config.p_out_dim, config.p_out_layers, config.p_out_heads)
            for m in MEDIA_MODALITIES
        })
        ids = tokenizer.convert_tokens_to_ids
        # Decoders by modality (`xvila.decoders`); attached by the loader, may be empty.
        self.decoders = nn.ModuleDict()
        self.offload_decoders = False  # keep them on the CPU between requests (24 GB GPUs)
        self.placeholder_ids = {m: ids(PLACEHOLDERS[m]) for m in MEDIA_MODALITIES}
        self.gen_ids = {m: ids(config.gen_token_names(m)) for m in MEDIA_MODALITIES}
        if tokenizer.unk_token_id in set(self.placeholder_ids.values()) | {i for v in self.gen_ids.values() for i in v}:
            raise ConfigError("the tokenizer lacks X-VILA's added tokens (see xvila.llm.add_xvila_tokens)")

    # ------------------------------------------------------------------ entry points
    @classmethod
    def from_pretrained(cls, source: str = "tiny-random", device: str | torch.device | None = None,
                        offload_decoders: bool = False, allow_outside_paths: bool = False) -> "XVila":
        """A preset name (`xvila-7b`, `xvila-7b-4bit`, `tiny-random`), a folder written by
        `save_pretrained`, or a Hub repo id holding such a folder. `offload_decoders` keeps
        the decoders on the CPU between requests (a 24 GB GPU with the 4-bit LLM). A
        folder's parts must lie in it or be Hub ids unless `allow_outside_paths` (a
        checkpoint you trust that names base models on a local disk)."""
        from xvila.checkpoint import load_xvila

        return load_xvila(source, device=device, offload_decoders=offload_decoders,
                          allow_outside_paths=allow_outside_paths)

    def save_pretrained(self, folder, write_decoders: tuple[str, ...] = ()) -> None:
        """See `xvila.checkpoint.save_xvila`; `write_decoders` names fine-tuned decoders to
        store in the folder rather than reference."""
        from xvila.checkpoint import save_xvila

        save_xvila(self, folder, write_decoders)

    def new_chat(self, system_prompt: str | None = None, outputs_dir=None):
        """A conversation; generated files go to `outputs_dir` (a temporary folder if None)."""
        from xvila.chat import Chat

        return Chat(self, system_prompt, outputs_dir=outputs_dir)

    # ------------------------------------------------------------------ parts
    @property
    def device(self) -> torch.device:
        return next(self.p_in.parameters()).device

    @property
    def backbone(self):
        """The Llama decoder stack (with LoRA layers injected): hidden states, no LM head."""
        return self.llm.get_base_model().model

    @property
    def lm_head(self):
        return self.llm.get_base_model().lm_head

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    # ------------------------------------------------------------------ media in
    @torch.no_grad()
    def encode(self, modality: str, pixels: torch.Tensor, highway: bool = False,
               keep_clips: bool = True) -> dict[str, torch.Tensor]:
        """ImageBind features of a batch of preprocessed inputs of one modality: the one
        place media is encoded (chat, training batches and the feature cache call it).

        `pixels`: [N, ...] as `xvila.encoders.imagebind_preprocess` makes them. Returns
        `pooled` [N, out_dim]; `tokens` [N, (S,) L, D] when P_in takes k > 1 tokens;
        `highway` (E_vis) [N, (S,) H, W, C] for visual inputs when asked. A video's or an
        audio's S clips are averaged unless `keep_clips` (then `mean_clips` does it later)."""
        key = IB_KEY[modality]
        out = self.imagebind.encode({key: pixels.to(self.device, self.imagebind_dtype)},
                                    tokens=self.config.tokens_per_input[modality] > 1,
                                    vision_blocks=highway and modality in VISUAL)
        features = {"pooled": out.embeds[key]}
        if key in out.tokens:
            features["tokens"] = out.tokens[key] if keep_clips else mean_clips(out.tokens[key], 3)
        if out.vision_blocks is not None:
            features["highway"] = out.vision_blocks if keep_clips else mean_clips(out.vision_blocks, 4)
        return features

    @torch.no_grad()
    def encode_media(self, path: str, modality: str) -> MediaInput:
        """Decode, preprocess and encode one file; the result is cached in the chat history."""
        # decoded in the media worker: a crashing upload cannot take the process down
        features = self.encode(modality, preprocess(path, modality, self.imagebind.config)[None], highway=True)
        embeds = self.project_media(modality, features["pooled"], features.get("tokens"))
        highway = features["highway"][0] if "highway" in features else None
        return MediaInput(modality, embeds[0], highway, source=str(path))

    @contextlib.contextmanager
    def decoder_ready(self, modality: str):
        """The decoder for `modality` on the model's device for the duration of a request;
        with `offload_decoders`, back on the CPU afterwards (moved deliberately, never reloaded)."""
        decoder = self.decoders[modality]
        if self.offload_decoders:
            decoder.to(self.device)
        try:
            yield decoder
        finally:
            if self.offload_decoders:
                decoder.to("cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    @property
    def imagebind_dtype(self) -> torch.dtype:
        return next(self.imagebind.parameters()).dtype

    def project_media(self, modality: str, pooled: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """ImageBind output -> [N, k, hidden] in the LLM's dtype; `tokens` [N, (S,) L, D]."""
        if tokens is not None:
            tokens = mean_clips(tokens, 3)
        p = self.p_in[modality]
        if p.k > 1 and tokens is None:
            raise ConfigError(f"P_in[{modality}] takes k={p.k} tokens per input: it needs ImageBind's token grid, not only the pooled embedding")
        dtype = p.proj.weight.dtype
        return p(pooled.to(dtype), None if tokens is None else tokens.to(dtype))

    def splice(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with each placeholder run replaced by its input's embeddings.

        `media[m]` is [N_m, k, hidden], in the order the placeholders of m appear
        (row-major over the batch)."""
        embeds = self.embed_tokens(input_ids)
        for m, x in media.items():
            mask = input_ids == self.placeholder_ids[m]
            rows = x.reshape(-1, x.shape[-1]).to(embeds.dtype)
            if int(mask.sum()) != rows.shape[0]:
                raise ValueError(f"{int(mask.sum())} {m} placeholder tokens but {rows.shape[0]} embeddings")
            embeds = embeds.masked_scatter(mask[..., None], rows)
        return embeds

    def gen_states(self, hidden: torch.Tensor, input_ids: torch.Tensor, modality: str) -> torch.Tensor:
        """Hidden states at the positions of `modality`'s generation tokens: [runs, n, hidden]."""
        n = len(self.gen_ids[modality])
        mask = torch.isin(input_ids, torch.tensor(self.gen_ids[modality], device=input_ids.device))
        return hidden[mask].reshape(-1, n, hidden.shape[-1])

    def hidden_states(self, input_ids: torch.Tensor, media: dict | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's last hidden states over the prompt with its inputs spliced in.

        media: {m: {"pooled": [N, out_dim], "tokens": [N, (S,) L, D] or absent}}, ImageBind
        features (`encode`, or the feature cache) of the inputs, in placeholder order."""
        embeds = self.splice(input_ids, {m: self.project_media(m, f["pooled"], f.get("tokens"))
                                         for m, f in (media or {}).items()})
        return self.backbone(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    # ------------------------------------------------------------------ training
    def forward_train(self, input_ids, labels, attention_mask=None, media=None, targets=None) -> dict[str, torch.Tensor]:
        """Named losses for a batch.

        media:   {m: {"pooled": [N, out_dim], "tokens": [N, (S,) L, D] or absent}} ImageBind
                 features of the inputs, in placeholder order (precomputable).
        targets: {m: [runs, L, C]} E_text targets, one per generation-token run of m, in order.
        """
        hidden = self.hidden_states(input_ids, media, attention_mask)
        # Logits only where a label is: the same mean, without the vocabulary projection of
        # every prompt and media position (a fifth of SmolLM2's FLOPs, most of a 7B's memory peak).
        shifted = labels[:, 1:]
        keep = shifted != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][keep]).float()
        losses = {"lm": F.cross_entropy(logits, shifted[keep])}
        for m, target in (targets or {}).items():
            pred = self.p_out[m](self.gen_states(hidden, input_ids, m))
            losses[f"align/{m}"] = F.mse_loss(pred.float(), target.to(pred.device).float())
        losses["loss"] = sum(losses.values())
        return losses

    def set_trainable(self, phase: str, verbose: bool = True) -> dict[str, int]:
        """Unfreeze exactly the groups phase `phase` trains; returns parameter counts per group."""
        if phase not in PHASES:
            raise ConfigError(f"unknown phase {phase!r}; phases: {sorted(PHASES)}")
        groups = PHASES[phase]
        counts = dict.fromkeys(groups, 0)
        frozen = 0
        for name, p in self.named_parameters():
            group = next((g for g in groups if GROUPS[g](name)), None)
            p.requires_grad_(group is not None)
            if group is None:
                frozen += p.numel()
            else:
                counts[group] += p.numel()
        if verbose:
            trained = ", ".join(f"{g} {c:,}" for g, c in counts.items())
            print(f"phase {phase} trains {sum(counts.values()):,} parameters ({trained}); {frozen:,} frozen")
        return counts
