"""Evaluation: the X²A benchmark and the paper's ablations, and understanding metrics.

    python -m xvila.evaluation x2a --checkpoint C --data heldout.jsonl --out runs/x2a
    python -m xvila.evaluation understand --task vqav2 --checkpoint C --data vqav2.jsonl --out runs/vqav2

The functions below are the public API that scripts and tests use; see the README's
Evaluation section for the commands, the manifest formats and what the numbers mean.
"""

from xvila.evaluation.answers import choice_accuracy, extract_choice, normalize_answer, vqa_accuracy
from xvila.evaluation.stats import EvaluationError, bootstrap_ci
from xvila.evaluation.x2a import Embedder, x2a_score

__all__ = ["x2a_score", "Embedder", "bootstrap_ci", "vqa_accuracy", "normalize_answer", "choice_accuracy",
           "extract_choice", "EvaluationError"]
