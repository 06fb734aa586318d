"""Manifest records -> model batches, for every phase.

Three steps, the first two in DataLoader workers (so that decoding never holds up the
accelerator), the last in the training process:

1. `*_samples(record, rng, config)`: a record -> conversations (`Sample`: turns in
   Vicuna's template, its inputs in placeholder order, its outputs in generation order).
   Pure functions, one per phase:
   - phase 1, pairs: a captioning row ("<image>\\nDescribe this image briefly." -> the
     caption) and a generation row ("Generate an image of {caption}" -> `[IMG0]..[IMG3]`);
   - phase 2, interleaved: one multi-turn conversation over the record's chunks; per
     chunk one input modality is drawn, and the turn either captions it or asks for another
     modality of the same moment (-> that modality's generation tokens, target: E_text of
     the chunk's caption);
   - phase 3a/3b, conversations: as written, `<gen:m>` markers replaced by m's tokens.
2. `Batches[k]`: micro-batch k of this rank. Its records are a pure function of
   (seed, k, rank) (`Order`: seeded permutations, sources blended by weight), so a resumed
   run picks up exactly where it stopped and any worker can build any batch. Each sample is
   tokenised, its media features read from the `FeatureCache` (or its media decoded and
   preprocessed, for ImageBind to encode in step 3), its E_text targets read from the
   `TextCache` (or its captions kept, for the decoders' text encoders). A broken sample is
   skipped and counted by error class, never fatal. Rows are right-padded and collated.
3. `model_inputs(model, batch)`: what the cache did not give is computed with the model's
   own ImageBind and decoder text encoders; everything moves to the model's device.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from train.cache import FeatureCache, TextCache
from train.data import GEN_MARKERS, placeholder_sequence, read_manifest, record_kind, replace_gen_markers, resolve
from xvila import media
from xvila.constants import AUDIO, IMAGE, MEDIA_MODALITIES, VIDEO, VISUAL
from xvila.conversation import IGNORE_INDEX, PLACEHOLDERS, Turn, render, tokenize
from xvila.encoders import imagebind_preprocess as pre
from xvila.errors import XVilaError

NOUN = {IMAGE: "an image", VIDEO: "a video", AUDIO: "a sound"}
CAPTION_PROMPTS = {
    IMAGE: ["Describe this image briefly.", "What is in this picture?", "Give a short caption for this image."],
    VIDEO: ["Describe this video briefly.", "What happens in this video?", "Give a short caption for this video."],
    AUDIO: ["Describe this audio briefly.", "What do you hear?", "Give a short caption for this sound."],
}
GENERATE_PROMPTS = ["Generate {noun} of {caption}", "Please create {noun} of {caption}", "Make {noun}: {caption}"]
ANSWER_PROMPTS = ["Here is {noun} of that moment.", "Now make {noun} of the same moment.", "Show it as {noun}."]
# Errors that make one sample unusable: broken media, missing cache entries, bad records.
# Anything else (TypeError, AttributeError, ...) is a bug and stops the run.
SAMPLE_ERRORS = (XVilaError, OSError, ValueError, KeyError, IndexError, EOFError, RuntimeError)


class SampleTooLongError(XVilaError, ValueError):
    """The conversation is longer than `max_length` tokens (cut samples would lose targets)."""


class NoVisualTargetError(XVilaError, ValueError):
    """Phase 3b: the conversation has no image/video output after a visual input."""


@dataclass
class Sample:
    """One conversation to train on."""

    id: str
    turns: list[Turn]
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (modality, rel path), placeholder order
    outputs: list[tuple[str, str, str | None]] = field(default_factory=list)  # (modality, caption, rel path)
    # phase 3b: for each output, the index in `inputs` of the visual input the highway reads
    # (the latest image or video before it, as at inference), or None
    highway_source: list[int | None] = field(default_factory=list)


# ------------------------------------------------------------------ records -> samples
def _gen(config, m: str) -> str:
    return "".join(config.gen_token_names(m))


def pair_samples(record: dict, rng: random.Random, config) -> list[Sample]:
    """Phase 1: X -> text (captioning) and text -> X (generation) rows of one pair."""
    m, caption = record["modality"], record["caption"].strip()
    noun = NOUN[m]
    describe = Turn(f"{PLACEHOLDERS[m]}\n{rng.choice(CAPTION_PROMPTS[m])}", [m], caption)
    generate = Turn(rng.choice(GENERATE_PROMPTS).format(noun=noun, caption=caption.rstrip(".")), [], _gen(config, m))
    return [Sample(record["id"] + "/caption", [describe], inputs=[(m, record["path"])]),
            Sample(record["id"] + "/generate", [generate], outputs=[(m, caption, record["path"])])]


def interleaved_samples(record: dict, rng: random.Random, config) -> list[Sample]:
    """Phase 2: the chunks in order as one multi-turn conversation (A.2: "the modalities are
    sampled ... to align varying targets"). Chunk i shows one drawn medium; the reply is
    its caption, or the generation tokens of another medium of the chunk (target: E_text of
    the chunk's caption in that medium's decoder space)."""
    turns, inputs, outputs = [], [], []
    for chunk in record["chunks"]:
        m_in = rng.choice(MEDIA_MODALITIES)
        inputs.append((m_in, chunk[m_in]))
        caption = chunk["caption"].strip()
        if rng.random() < 0.5:
            turns.append(Turn(f"{PLACEHOLDERS[m_in]}\n{rng.choice(CAPTION_PROMPTS[m_in])}", [m_in], caption))
        else:
            m_out = rng.choice([m for m in MEDIA_MODALITIES if m != m_in])
            ask = rng.choice(ANSWER_PROMPTS).format(noun=NOUN[m_out])
            turns.append(Turn(f"{PLACEHOLDERS[m_in]}\n{ask}", [m_in], f"{caption} {_gen(config, m_out)}"))
            outputs.append((m_out, caption, chunk[m_out]))
    return [Sample(record["id"], turns, inputs, outputs)]


def conversation_samples(record: dict, rng: random.Random, config) -> list[Sample]:
    """Phase 3: a conversation as written; the gpt turns' `<gen:m>` markers become m's tokens."""
    convo = record["conversations"]
    turns = []
    highway, latest_visual, n_inputs = [], None, 0
    for human, gpt in zip(convo[0::2], convo[1::2]):
        media = placeholder_sequence(human["value"])
        for m in media:
            if m in VISUAL:
                latest_visual = n_inputs
            n_inputs += 1
        highway += [latest_visual] * sum(gpt["value"].count(GEN_MARKERS[m]) for m in MEDIA_MODALITIES)
        turns.append(Turn(human["value"], media, replace_gen_markers(gpt["value"], config.gen_token_names)))
    return [Sample(record["id"], turns,
                   inputs=[(i["modality"], i["path"]) for i in record["inputs"]],
                   outputs=[(o["modality"], o["caption"], o["path"]) for o in record["outputs"]],
                   highway_source=highway)]


def visual_samples(record: dict, rng: random.Random, config) -> list[Sample]:
    """Phase 3b: a conversation with at least one image/video output after a visual input."""
    (sample,) = conversation_samples(record, rng, config)
    if not any(m in VISUAL and src is not None for (m, _, _), src in zip(sample.outputs, sample.highway_source)):
        raise NoVisualTargetError(f"{record['id']}: no image or video output follows a visual input")
    return [sample]


def has_visual_target(record: dict) -> bool:
    try:
        visual_samples(record, random.Random(0), _AnyTokens())
    except NoVisualTargetError:
        return False
    return True


class _AnyTokens:
    """Stands in for XVilaConfig where only the structure of a conversation matters."""

    @staticmethod
    def gen_token_names(m):
        return [f"<{m}>"]


# ------------------------------------------------------------------------------ order
class Order:
    """Sample j of a run -> (source, record index). The sources are blended by weight, each
    walked through its own seeded permutation, epoch after epoch; a pure function of
    (sizes, weights, seed, j), computed lazily in chunks."""

    CHUNK = 4096

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if not sizes or min(sizes) < 1:
            raise XVilaError(f"every manifest needs at least one usable record (sizes {sizes})")
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(sizes) or (w <= 0).any():
            raise XVilaError(f"manifest weights must be positive, one per manifest; got {weights}")
        self.sizes, self.p, self.seed = list(sizes), w / w.sum(), seed
        self._sources: list[np.ndarray] = []  # source of each sample, per chunk
        self._nth: list[np.ndarray] = []  # how many samples of that source came before
        self._drawn = np.zeros(len(sizes), dtype=np.int64)
        self._perms: dict = {}

    def _extend(self) -> None:
        c = len(self._sources)
        src = np.random.default_rng([self.seed, 7919, c]).choice(len(self.sizes), size=self.CHUNK, p=self.p)
        nth = np.empty(self.CHUNK, dtype=np.int64)
        for s in range(len(self.sizes)):
            where = np.flatnonzero(src == s)
            nth[where] = self._drawn[s] + np.arange(len(where))
            self._drawn[s] += len(where)
        self._sources.append(src)
        self._nth.append(nth)

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 16:
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, source, epoch]).permutation(self.sizes[source])
        return self._perms[key]

    def __getitem__(self, j: int) -> tuple[int, int]:
        c, i = divmod(j, self.CHUNK)
        while len(self._sources) <= c:
            self._extend()
        s, n = int(self._sources[c][i]), int(self._nth[c][i])
        epoch, pos = divmod(n, self.sizes[s])
        return s, int(self._perm(s, epoch)[pos])


# ------------------------------------------------------------------------- features
def preprocess(path: Path, modality: str, config=None) -> torch.Tensor:
    """A medium decoded and preprocessed for the ImageBind built from `config` (what the
    FeatureCache would hold encoded)."""
    return pre.load(path, modality, config)


def read_target(path: Path, modality: str, frames: int) -> np.ndarray:
    """Phase 3b: a target image [H, W, 3] or `frames` evenly spaced video frames [T, H, W, 3], uint8."""
    if modality == IMAGE:
        return np.array(media.read_image(path))
    video = media.read_video(path, with_audio=False).frames
    return np.ascontiguousarray(video[np.linspace(0, len(video) - 1, frames).round().astype(int)])


def _as_target(e: torch.Tensor) -> torch.Tensor:
    """A cached E_text as [L, C] (a cache may keep the batch dimension of one prompt)."""
    return e[0] if e.dim() == 3 else e


# -------------------------------------------------------------------------- dataset
class Batches(Dataset):
    """Micro-batch k of rank `rank`: records g*B .. g*B+B-1 of `Order` with g = k*world+rank.

    `make_samples(record, rng, config)` turns a record into Samples (the phase's function
    above); `visual=True` adds phase 3b's fields (target media, highway sources);
    `targets=False` skips E_text targets (phase 3b conditioned on the model's own states).
    """

    def __init__(self, manifests: list[dict], make_samples, model, *, micro_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0, data_root: str = "data", feature_cache: str | None = None, text_cache: str | None = None,
                 max_length: int = 2048, visual: bool = False, targets: bool = True, video_frames: int = 16,
                 keep=None):
        self.manifests = manifests
        self.sources, self.roots, weights = [], [], []
        for m in manifests:
            records = list(read_manifest(m["path"]))
            if keep is not None:
                records = [r for r in records if keep(r)]
            self.sources.append(records)
            self.roots.append(Path(m.get("root", data_root)))
            weights.append(float(m.get("weight", 1.0)))
        self.order = Order([len(s) for s in self.sources], weights, seed)
        self.make_samples, self.seed = make_samples, seed
        self.micro_batch, self.rank, self.world = micro_batch, rank, world
        self.config, self.tokenizer = model.config, model.tokenizer
        self.imagebind_config = model.imagebind.config
        self.expand = {model.placeholder_ids[m]: model.config.tokens_per_input[m] for m in MEDIA_MODALITIES}
        self.pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        self.max_length, self.visual, self.want_targets, self.video_frames = max_length, visual, targets, video_frames
        self.features = self.texts = None
        if feature_cache or text_cache:
            self.features = FeatureCache(feature_cache) if feature_cache else None
            self.texts = TextCache(text_cache) if text_cache else None

    @classmethod
    def from_config(cls, cfg, make_samples, model, rank: int, world: int, **kw) -> "Batches":
        return cls(cfg.manifests, make_samples, model, micro_batch=cfg.micro_batch, rank=rank, world=world,
                   seed=cfg.seed, data_root=cfg.data_root, feature_cache=cfg.feature_cache,
                   text_cache=cfg.text_cache, max_length=cfg.max_length, **kw)

    def manifest_counts(self) -> list[dict]:
        """Per manifest: path, weight and usable records (for the logs and the model card)."""
        return [{"path": str(m["path"]), "weight": float(m.get("weight", 1.0)), "records": len(s)}
                for m, s in zip(self.manifests, self.sources)]

    def __len__(self) -> int:
        return 2**62  # endless: epochs follow one another in `Order`

    def __getitem__(self, k: int) -> dict:
        g = k * self.world + self.rank
        rows, skipped, ids = [], Counter(), []
        for j in range(g * self.micro_batch, (g + 1) * self.micro_batch):
            source, i = self.order[j]
            record = self.sources[source][i]
            try:
                # seeded by the sample's place in the run: the same draws after a resume
                samples = self.make_samples(record, random.Random(self.seed * 1_000_003 + j), self.config)
                built = [self.encode(s, self.roots[source]) for s in samples]
            except SAMPLE_ERRORS as err:
                skipped[type(err).__name__] += 1
                continue
            rows += built
            ids.append(record["id"])
        return self.collate(rows, k, ids, skipped)

    # ----------------------------------------------------------------- one sample
    def encode(self, s: Sample, root: Path) -> dict:
        text, spans = render(self.config.system_prompt, s.turns, self.config.chat_template, self.tokenizer)
        input_ids, labels = tokenize(self.tokenizer, text, spans, self.expand)
        if len(input_ids) > self.max_length:
            raise SampleTooLongError(f"{s.id}: {len(input_ids)} tokens > max_length {self.max_length}")
        row = {"input_ids": input_ids, "labels": labels, "inputs": [], "outputs": []}
        for m, rel in s.inputs:
            if self.features is not None:
                f = self.features.get(rel)  # E_vis ("highway") only matters to phase 3b
                row["inputs"].append((m, {k: v for k, v in f.items() if self.visual or k != "highway"}))
            else:
                row["inputs"].append((m, {"pixels": preprocess(resolve(root, rel), m, self.imagebind_config)}))
        for n, (m, caption, rel) in enumerate(s.outputs):
            out = {"modality": m}
            if self.want_targets:
                out["target"] = _as_target(self.texts.get(m, caption)) if self.texts is not None else caption
            if self.visual and m in VISUAL and s.highway_source[n] is not None:
                out["x0"] = torch.from_numpy(read_target(resolve(root, rel), m, self.video_frames))
                out["highway_source"] = s.highway_source[n]
            row["outputs"].append(out)
        return row

    # ----------------------------------------------------------------- collate
    def collate(self, rows: list[dict], k: int, ids: list[str], skipped: Counter) -> dict:
        """Right-padded rows; media and targets per modality in placeholder / run order,
        row-major over the batch (the order `XVila.splice` and `gen_states` use)."""
        batch = {"index": k, "ids": ids, "size": len(rows), "skipped": skipped}
        if not rows:
            return batch
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        media: dict[str, list[dict]] = {}
        targets: dict[str, list] = {}
        visual: dict[str, dict[str, list]] = {}
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[b, :n], labels[b, :n], mask[b, :n] = r["input_ids"], r["labels"], 1
            where = []  # (modality, index among the batch's inputs of it) of each of this row's inputs
            for m, f in r["inputs"]:
                where.append((m, len(media.setdefault(m, []))))
                media[m].append(f)
            for out in r["outputs"]:
                m = out["modality"]
                run = len(targets.setdefault(m, []))
                targets[m].append(out.get("target"))
                if "x0" in out:
                    v = visual.setdefault(m, {"run": [], "x0": [], "source": []})
                    v["run"].append(run)
                    v["x0"].append(out["x0"])
                    v["source"].append(where[out["highway_source"]])
        batch.update(input_ids=input_ids, labels=labels, attention_mask=mask,
                     media={m: _stack_features(fs) for m, fs in media.items()})
        if self.want_targets:
            batch["targets"] = {m: torch.stack(t) if isinstance(t[0], torch.Tensor) else t for m, t in targets.items()}
        if self.visual:
            batch["visual"] = {m: {"run": torch.tensor(v["run"]), "x0": v["x0"], "source": v["source"]}
                               for m, v in visual.items()}
        return batch


def _stack_features(fs: list[dict]) -> dict:
    """[{"pooled", "tokens"?, "highway"?} or {"pixels"}] -> stacked tensors (keys all rows share)."""
    keys = set.intersection(*(set(f) for f in fs))
    return {k: torch.stack([torch.as_tensor(f[k]) for f in fs]) for k in sorted(keys)}


def _identity(x):
    return x


def loader(dataset: Batches, start: int, num_workers: int, prefetch_factor: int, seed: int):
    """Micro-batches start, start+1, ... of `dataset`, built ahead by `num_workers` workers."""
    kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False} if num_workers else {}
    return iter(DataLoader(
        dataset, batch_size=None, sampler=_From(start), num_workers=num_workers, collate_fn=_identity,
        pin_memory=torch.cuda.is_available(),
        # its own generator: creating the loader must not draw from the training RNG
        generator=torch.Generator().manual_seed(seed), **kwargs))


class _From(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        k = self.start
        while True:
            yield k
            k += 1


# ------------------------------------------------------------------ training process
def media_features(model, batch: dict, highway: bool = False) -> dict[str, dict]:
    """The batch's input features on the model's device: cached, or encoded now (clips
    averaged, as the FeatureCache holds them)."""
    features = {}
    for m, f in batch["media"].items():
        if "pixels" in f:
            f = model.encode(m, f["pixels"], highway=highway, keep_clips=False)
        features[m] = {k: v.to(model.device) for k, v in f.items()}
    return features


@torch.no_grad()
def text_targets(model, batch: dict, decoders=None) -> dict[str, torch.Tensor]:
    """E_text targets [runs, L, C] per modality on the model's device: cached, or from the
    text encoders of `decoders` (default: the model's own)."""
    decoders = model.decoders if decoders is None else decoders
    out = {}
    for m, t in batch.get("targets", {}).items():
        if not isinstance(t, torch.Tensor):
            t = decoders[m].encode_text(list(t))  # wherever that text encoder is
        out[m] = t.to(model.device)
    return out


def with_text_targets(model, batch: dict, decoders) -> dict:
    """The batch with every E_text target computed (by `decoders`' text encoders where the
    text cache gave none): what the training loop hands the objective when the decoders are
    kept out of it (phases 1-3a)."""
    if not batch.get("targets"):
        return batch
    return {**batch, "targets": text_targets(model, batch, decoders)}


def lm_and_align_loss(model, batch: dict) -> dict[str, torch.Tensor]:
    """Phases 1, 2, 3a: next-token loss on the replies + MSE of P_out(S_gen) to E_text."""
    dev = model.device
    return model.forward_train(batch["input_ids"].to(dev), batch["labels"].to(dev), batch["attention_mask"].to(dev),
                               media=media_features(model, batch), targets=text_targets(model, batch))


def check_kind(manifests: list[dict], kinds: tuple[str, ...], phase: str) -> None:
    """Fail early when a manifest holds records of another phase."""
    for m in manifests:
        first = next(iter(read_manifest(m["path"])), None)
        if first is not None and record_kind(first) not in kinds:
            raise XVilaError(f"{m['path']} holds {record_kind(first)} records; phase {phase} reads {' or '.join(kinds)}")

