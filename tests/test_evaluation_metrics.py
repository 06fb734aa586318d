"""Metrics of `xvila.evaluation` that need no model: VQA accuracy, choice extraction,
bootstrap intervals, captioning scores. Expected values are worked by hand from the
official rules (see each test)."""

import numpy as np
import pytest

from xvila.evaluation import (EvaluationError, bootstrap_ci, choice_accuracy, extract_choice, normalize_answer,
                              vqa_accuracy)
from xvila.evaluation.captions import bleu4, caption_scores, cider, tokenize_caption


# ------------------------------------------------------------------ VQA accuracy
@pytest.mark.parametrize("pred, expected", [
    ("two", "2"),  # number words become digits
    ("A dog.", "dog"),  # articles and the final period go
    ("The Red  Car", "red car"),  # lower case, spaces collapsed
    ("yes/no", "yes no"),  # a mark between words separates them
    ("1,000", "1000"),  # a number's comma goes
    ("dont", "don’t"),  # the official contraction table (curly apostrophe)
])
def test_normalisation_follows_the_official_script(pred, expected):
    assert normalize_answer(pred) == expected


def test_vqa_accuracy_hand_worked():
    # All ten annotators said "2": every leave-one-out subset has 9 matches -> min(9/3, 1) = 1.
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("A dog.", ["dog"] * 10) == 1.0
    # 3 of 10 said "dog": leaving out a dog annotator leaves 2 matches (2/3), 3 times;
    # leaving out another leaves 3 (1), 7 times: (3 * 2/3 + 7) / 10 = 0.9.
    assert vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("the dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    # 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3.
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("bird", ["dog"] * 10) == 0.0


def test_vqa_accuracy_ground_truth_loses_punctuation_only_when_annotators_disagree():
    # Disagreeing answers lose their punctuation ("dog." -> "dog"): 4 of 10 match -> 1.
    assert vqa_accuracy("dog", ["dog."] * 4 + ["cat"] * 6) == 1.0
    # Unanimous answers are compared as written: "dog." never equals the normalised "dog".
    assert vqa_accuracy("dog", ["dog."] * 10) == 0.0
    # The annotation format's dicts are read too.
    assert vqa_accuracy("two", [{"answer": "2", "answer_confidence": "yes"}] * 10) == 1.0


def test_vqa_accuracy_bad_input():
    with pytest.raises(EvaluationError, match="at least one"):
        vqa_accuracy("dog", [])
    with pytest.raises(EvaluationError, match="string"):
        vqa_accuracy("dog", [3])


# ------------------------------------------------------------------ multiple choice
@pytest.mark.parametrize("reply, letter", [
    ("B", "B"),
    ("(C)", "C"),
    ("The answer is (A).", "A"),
    ("I would say B.", "B"),
    ("Not A, the answer is D", "D"),  # the last letter mentioned wins
    ("It shows a small grey cat sitting on the mat", "B"),  # the option's text, in a long reply
    ("no idea", None),
])
def test_extract_choice(reply, letter):
    assert extract_choice(reply, ["dog", "cat", "bird", "fish"]) == letter


def test_choice_accuracy():
    options = ["dog", "cat", "bird"]
    assert choice_accuracy("(b)".upper(), options, "B") == 1.0
    assert choice_accuracy("A", options, "B") == 0.0
    with pytest.raises(EvaluationError, match="not one of"):
        choice_accuracy("A", options, "E")


# ------------------------------------------------------------------ intervals
def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small, large = rng.normal(50, 10, 20), rng.normal(50, 10, 2000)
    m1, lo1, hi1 = bootstrap_ci(small, n=2000)
    m2, lo2, hi2 = bootstrap_ci(large, n=2000)
    assert m1 == pytest.approx(small.mean()) and lo1 < m1 < hi1
    assert m2 == pytest.approx(large.mean()) and lo2 < m2 < hi2
    assert (hi2 - lo2) < (hi1 - lo1) / 5  # 100x the data: about 10x narrower
    # A normal sample's 95 % interval is about mean ± 1.96 sd / sqrt(n).
    expected = 2 * 1.96 * large.std(ddof=1) / np.sqrt(large.size)
    assert (hi2 - lo2) == pytest.approx(expected, rel=0.15)


def test_bootstrap_is_seeded_and_handles_edges():
    values = [1.0, 2.0, 5.0, 9.0]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci([7.0] * 5) == (7.0, 7.0, 7.0)
    with pytest.raises(EvaluationError, match="at least one"):
        bootstrap_ci([])
    with pytest.raises(EvaluationError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(EvaluationError, match="level"):
        bootstrap_ci(values, level=95)


# ------------------------------------------------------------------ captions
def test_caption_tokenisation():
    assert tokenize_caption("A Dog's ball, red!") == "a dogs ball red"


def test_caption_scores():
    refs = [["a dog runs across the park", "a brown dog running in a park"],
            ["a cat sleeps on a red sofa", "the cat is asleep on the couch"]]
    # A prediction equal to a reference matches every n-gram: BLEU-4 = 1.
    assert bleu4(["a dog runs across the park", "a cat sleeps on a red sofa"], refs) == pytest.approx(1.0, abs=1e-6)
    good, good_each = cider(["a dog runs across the park", "a cat sleeps on a red sofa"], refs)
    bad, _ = cider(["blue whales sing underwater", "stock prices fell sharply"], refs)
    assert good > 1.0 and bad == 0.0  # no shared n-gram: CIDEr 0
    assert np.mean(good_each) == pytest.approx(good)
    s = caption_scores(["a dog runs across the park", "stock prices fell"], refs, resamples=50)
    for name in ("CIDEr", "BLEU-4"):
        assert s[name]["n"] == 2 and s[name]["low"] <= s[name]["mean"] <= s[name]["high"]
    with pytest.raises(EvaluationError, match="reference"):
        cider(["a dog"], [[]])
