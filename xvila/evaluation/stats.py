"""Confidence intervals: the paper reports bare means; with 62 samples per type the
interval is as wide as some of the differences it claims, so every table here carries one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xvila.errors import XVilaError


class EvaluationError(XVilaError, ValueError):
    """Evaluation input (values, manifests, options) that cannot be evaluated."""


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile-bootstrap interval.

    `n` resamples of len(values) draws with replacement; the interval is the central
    `level` of their means. One value gives a zero-width interval; none is an error.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise EvaluationError("bootstrap_ci needs at least one value")
    if not np.isfinite(x).all():
        raise EvaluationError("bootstrap_ci got a NaN or infinite value")
    if not 0.0 < level < 1.0:
        raise EvaluationError(f"level must be between 0 and 1, not {level}")
    if n < 1:
        raise EvaluationError(f"n (the number of resamples) must be positive, not {n}")
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    # Resample in blocks so 10k resamples of a large set stay within a few hundred MB.
    block = max(1, 2_000_000 // x.size)
    for start in range(0, n, block):
        stop = min(n, start + block)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    mean = float(x.mean())
    # Percentiles of resampled means can sit a rounding error off a constant sample's mean.
    return mean, min(float(low), mean), max(float(high), mean)


def summary(values: Sequence[float], level: float = 0.95, seed: int = 0) -> dict:
    """{"n", "mean", "low", "high"} of `values` (mean and interval None when empty)."""
    values = list(values)
    if not values:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean, low, high = bootstrap_ci(values, level=level, seed=seed)
    return {"n": len(values), "mean": mean, "low": low, "high": high}


def cell(s: dict, digits: int = 2) -> str:
    """A table cell "mean [low, high]" (or "–" when there is no sample)."""
    if not s.get("n"):
        return "–"
    return f"{s['mean']:.{digits}f} [{s['low']:.{digits}f}, {s['high']:.{digits}f}]"
