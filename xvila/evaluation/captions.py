"""Captioning scores: CIDEr and BLEU-4 from the COCO caption evaluation package
(`pycocoevalcap`), on text normalised without Java.

The COCO toolkit tokenises with Stanford's PTB tokenizer, a Java program. Here a caption
is lower-cased, every character that is not a letter, digit, apostrophe or space becomes
a space, apostrophes are dropped ("don't" -> "dont"), and whitespace is collapsed; the
PTB tokenizer would split "don't" into "do n't" and keep a few symbols, so scores can
differ slightly from a Java-tokenised run (mostly on contractions).
"""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np

from xvila.evaluation.stats import EvaluationError, summary

_NOT_WORD = re.compile(r"[^0-9a-z' ]+")


def tokenize_caption(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.lower()).replace("'", "").split())


def _inputs(preds: list[str], refs: list[list[str]]) -> tuple[dict, dict]:
    if len(preds) != len(refs) or not preds:
        raise EvaluationError("captioning needs one prediction per item and at least one item")
    if any(not r for r in refs):
        raise EvaluationError("every item needs at least one reference caption")
    gts = {i: [tokenize_caption(c) for c in r] for i, r in enumerate(refs)}
    res = {i: [tokenize_caption(p)] for i, p in enumerate(preds)}
    return gts, res


def cider(preds: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and each item's CIDEr-D (their mean is the corpus score)."""
    from pycocoevalcap.cider.cider import Cider

    score, each = Cider().compute_score(*_inputs(preds, refs))
    return float(score), [float(x) for x in each]


def bleu4(preds: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 (brevity penalty over the corpus, as the COCO toolkit computes it)."""
    from pycocoevalcap.bleu.bleu import Bleu

    with contextlib.redirect_stdout(io.StringIO()):  # the scorer prints its n-gram counts
        scores, _ = Bleu(4).compute_score(*_inputs(preds, refs))
    return float(scores[3])


def caption_scores(preds: list[str], refs: list[list[str]], resamples: int = 200, seed: int = 0) -> dict:
    """{"CIDEr": summary, "BLEU-4": summary}, both ×100 with 95 % intervals: CIDEr's from
    the items' scores; BLEU-4, a corpus statistic, from `resamples` bootstrap corpora."""
    corpus_cider, each = cider(preds, refs)
    c = summary([100.0 * x for x in each], seed=seed)
    c["mean"] = 100.0 * corpus_cider
    b = 100.0 * bleu4(preds, refs)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(preds), size=len(preds))
        draws.append(100.0 * bleu4([preds[i] for i in idx], [refs[i] for i in idx]))
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (b, b)
    return {"CIDEr": c, "BLEU-4": {"n": len(preds), "mean": b, "low": min(float(low), b), "high": max(float(high), b)}}
