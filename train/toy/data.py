"""The toy model's training and held-out data, built by the real builders from the world corpus.

    python -m train.toy xvila                    # builds this first (data/ under --work), then trains
    from train.toy.data import DataSpec, build_data
    manifests = build_data("runs/toy-xvila/data", DataSpec(videos=240, test_videos=40))

What is built, in `out/` (every step resumable; a finished one is skipped):

    corpus/                     the world corpus (`train.toy.corpus`): train and test MP4s
    x2x/conversations.jsonl     phase 3: `build_x2x` on the training videos, the six types
    interleaved/interleaved.jsonl  phase 2: `build_interleaved` (n = 3 chunks = a video's 3 scenes)
    interleaved/pairs.jsonl     phase 1: X-text pairs, the chunks' image, video and sound with
                                their caption (captioning and generation rows)
    interleaved/understand.jsonl   phase 3a: understanding Q&A (`sft` conversations) about the
                                chunks: colour, shape, motion, what made this sound
    heldout/x2x/heldout.jsonl   evaluation: `build_x2x` on the test videos, all six types
    heldout/interleaved/understand.jsonl   evaluation: the same questions on test scenes

Held out by whole scene: the corpus draws test videos from seeds >= `world.TEST_SEED_START`
only, and nothing built from a test video reaches a training manifest. IMG2AUD and AUD2IMG
conversations are never built (the builders' six types exclude them; the paper's emergent
claim is tested on them). Answers come from the world's attributes of each chunk's scene
(the corpus records every segment's seed), never from a learned model.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from train.builders import activitynet_sources, build_interleaved, build_x2x
from train.data import GPT, HUMAN, X2X_TYPES, read_manifest, write_manifest
from train.toy.corpus import CorpusSpec, build_corpus
from xvila.constants import AUDIO, IMAGE, VIDEO
from xvila.errors import XVilaError
from xvila.fileio import atomic_path
from xvila.toy import world

SPLIT_DIRS = {"train": ".", "test": "heldout"}  # where each split's builds go, under out/
EMERGENT_TYPES = ("IMG2AUD", "AUD2IMG")  # never in training


class ToyDataError(XVilaError, ValueError):
    """The corpus and the annotations disagree, or the data folder holds another build."""


@dataclass(frozen=True)
class DataSpec:
    videos: int = 240  # training videos, 3 scenes each
    test_videos: int = 40  # held-out videos
    seed: int = 0
    rounds: int = 2  # X2X rounds per conversation (the builders' default)

    def corpus(self) -> CorpusSpec:
        return CorpusSpec(videos=self.videos, test_videos=self.test_videos, scenes_per_video=3, seed=self.seed)


# ------------------------------------------------------------------------------ questions
# (question, how the answer is made) per input modality; each chunk gets one question of
# each kind its medium can answer.
QUESTIONS = {
    "colour": ["What colour is the shape?", "What colour is it?", "Which colours do you see?"],
    "shape": ["What shape is this?", "Which shape do you see?", "What shape is in the picture?"],
    "what": ["What is this?", "What do you see?", "Describe this picture briefly."],
    "background": ["What colour is the background?", "What is the background colour?"],
    "motion": ["How is it moving?", "Which way does it move?", "What is the motion in this video?"],
    "sound": ["What made this sound?", "What do you hear?", "What could make this sound?"],
}
ASKED = {IMAGE: ("colour", "shape", "what", "background"), VIDEO: ("motion", "colour"), AUDIO: ("sound",)}


def _join(parts: list[str]) -> str:
    return " and ".join(parts)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def answer(scene: world.Scene, kind: str) -> str:
    """The answer to a question of `kind` about `scene`, from its attributes."""
    things = scene.things
    if kind == "colour":
        return _sentence(_join([f"the {t.shape} is {t.colour}" for t in things]))
    if kind == "shape":
        return _sentence(_join([f"a {t.shape}" for t in things]))
    if kind == "what":  # a picture: no motion (a still does not show it)
        return _sentence(_join([f"{_a(t.size_word)} {t.colour} {t.shape}" for t in things])
                         + f" on {_a(scene.background)} background")
    if kind == "background":
        return _sentence(f"the background is {scene.background}")
    if kind == "motion":
        return _sentence(_join([f"the {t.colour} {t.shape} is {world.MOTION_WORDS[t.motion]}" for t in things]))
    if kind == "sound":  # the sound carries shape (rhythm), colour (pitch) and size (loudness)
        return _sentence(_join([f"{_a(t.size_word)} {t.colour} {t.shape}" for t in things]))
    raise ToyDataError(f"unknown question kind {kind!r}; kinds: {sorted(QUESTIONS)}")


def understanding_records(record: dict, seeds: list[int], seed: int = 0) -> list[dict]:
    """`sft` conversations about one interleaved record's chunks (chunk k = scene seeds[k])."""
    if len(seeds) != len(record["chunks"]):
        raise ToyDataError(f"{record['id']}: {len(record['chunks'])} chunks but {len(seeds)} scene seeds")
    out = []
    for k, (chunk, scene_seed) in enumerate(zip(record["chunks"], seeds)):
        scene = world.sample_scene(scene_seed)
        if chunk["caption"] != world.caption(scene):
            raise ToyDataError(f"{record['id']} chunk {k}: caption {chunk['caption']!r} is not scene "
                               f"{scene_seed}'s ({world.caption(scene)!r}); the corpus and its annotations disagree")
        for m, kinds in ASKED.items():
            for kind in kinds:
                qid = f"{record['id']}:{k}:{m}:{kind}"
                question = random.Random(f"{seed}:{qid}").choice(QUESTIONS[kind])
                placeholder = {IMAGE: "<image>", VIDEO: "<video>", AUDIO: "<audio>"}[m]
                out.append({"id": qid, "type": "sft", "scene_seed": scene_seed,
                            "conversations": [{"from": HUMAN, "value": f"{placeholder}\n{question}"},
                                              {"from": GPT, "value": answer(scene, kind)}],
                            "inputs": [{"modality": m, "path": chunk[m]}], "outputs": []})
    return out


def pair_records(record: dict) -> list[dict]:
    """Phase-1 X-text pairs: each chunk's image, clip and sound with its caption."""
    return [{"id": f"{record['id']}:{k}:{m}", "modality": m, "path": chunk[m], "caption": chunk["caption"]}
            for k, chunk in enumerate(record["chunks"]) for m in (IMAGE, VIDEO, AUDIO)]


# ------------------------------------------------------------------------------ building
def _seeds_by_source(corpus: Path, split: str) -> dict[str, list[int]]:
    """{"videos/<split>/<id>" (the builders' record id): the video's scene seeds}."""
    annotations = json.loads((corpus / f"{split}.json").read_text())
    return {str(PurePosixPath("videos", split, vid)): entry["seeds"] for vid, entry in annotations.items()}


def _adapt(interleaved: Path, corpus: Path, split: str, seed: int, log) -> dict[str, int]:
    """pairs.jsonl (training split only) and understand.jsonl beside interleaved.jsonl."""
    seeds = _seeds_by_source(corpus, split)
    records = list(read_manifest(interleaved / "interleaved.jsonl"))
    qa = [r for rec in records for r in understanding_records(rec, seeds[rec["id"]], seed)]
    counts = {"understand": write_manifest(qa, interleaved / "understand.jsonl")}
    if split == "train":
        counts["pairs"] = write_manifest([p for rec in records for p in pair_records(rec)], interleaved / "pairs.jsonl")
    log(f"data ({split}): {counts}")
    return counts


def _check_spec(out: Path, spec: DataSpec) -> None:
    params = out / "data.json"
    if params.is_file():
        old = json.loads(params.read_text())
        if old != asdict(spec):
            raise ToyDataError(f"{out} holds toy data built with {old}, not {asdict(spec)}; use a new --work folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(params) as tmp:
        tmp.write_text(json.dumps(asdict(spec), indent=1))


def build_data(out: str | Path, spec: DataSpec = DataSpec(), log=print, progress: bool = True) -> dict[str, Path]:
    """Every manifest of the toy recipe (see the module docstring); returns their paths by
    name. Each builder resumes where it stopped; finished steps are skipped."""
    out = Path(out)
    _check_spec(out, spec)
    corpus = out / "corpus"
    build_corpus(corpus, spec.corpus(), progress=progress)
    # The test split's quotas: every conversation of every held-out video (the builders
    # then write them all to heldout.jsonl); the training split holds nothing out.
    everything = (3 * spec.test_videos,) * len(X2X_TYPES)
    for split in ("train", "test"):
        root = out / SPLIT_DIRS[split]
        sources = lambda: activitynet_sources(corpus / f"{split}.json", f"videos/{split}")  # noqa: E731
        if not (root / "interleaved" / "understand.jsonl").is_file():
            heldout, rate = (everything, 1.0) if split == "test" else ((0,) * len(X2X_TYPES), 0.0)
            report = build_x2x(sources(), corpus, root / "x2x", seed=spec.seed, rounds=spec.rounds, heldout=heldout,
                               heldout_rate=rate)
            log(f"x2x ({split}): {json.dumps(report.counts, sort_keys=True)}; {report.skipped.summary()}")
            report = build_interleaved(sources(), corpus, root / "interleaved")
            log(f"interleaved ({split}): {json.dumps(report.counts, sort_keys=True)}; {report.skipped.summary()}")
            _adapt(root / "interleaved", corpus, split, spec.seed, log)
    return manifests(out)


def manifests(out: str | Path) -> dict[str, Path]:
    """The manifests `build_data` writes, by name (training: pairs, interleaved, x2x,
    understand; evaluation: heldout_x2x, heldout_understand)."""
    out = Path(out)
    return {
        "pairs": out / "interleaved" / "pairs.jsonl",
        "interleaved": out / "interleaved" / "interleaved.jsonl",
        "x2x": out / "x2x" / "conversations.jsonl",
        "understand": out / "interleaved" / "understand.jsonl",
        "heldout_x2x": out / "heldout" / "x2x" / "heldout.jsonl",
        "heldout_understand": out / "heldout" / "interleaved" / "understand.jsonl",
    }


TRAINING = ("pairs", "interleaved", "x2x", "understand")
