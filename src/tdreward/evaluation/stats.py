"""Summary statistics for comparisons: mean, median, std, percentile-bootstrap 95% CI, range."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

N_BOOT = 10_000


def bootstrap_ci(values: Sequence[float], n_boot: int = N_BOOT, level: float = 0.95,
                 seed: int = 0) -> list[float]:
    """Percentile bootstrap CI of the mean; [nan, nan] without data, [x, x] for one value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return [math.nan, math.nan]
    if x.size == 1:
        return [float(x[0]), float(x[0])]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return [float(lo), float(hi)]


def describe(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """n, mean, median, std (n-1), 95% bootstrap CI of the mean, min, max."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "ci95": [None, None],
                "min": None, "max": None}
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "ci95": bootstrap_ci(x, n_boot, seed=seed),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def compare_means(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT,
                  seed: int = 0) -> dict:
    """mean(b) - mean(a): the difference, its bootstrap 95% CI (each group resampled on its
    own) and Cohen's d with the pooled standard deviation."""
    x = np.asarray([v for v in a if v is not None], dtype=np.float64)
    y = np.asarray([v for v in b if v is not None], dtype=np.float64)
    if x.size == 0 or y.size == 0:
        return {"diff": None, "ci95": [None, None], "cohens_d": None}
    rng = np.random.default_rng(seed)
    bx = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    by = y[rng.integers(0, y.size, size=(n_boot, y.size))].mean(axis=1)
    lo, hi = np.percentile(by - bx, [2.5, 97.5])
    d = None
    if x.size > 1 and y.size > 1:
        pooled = math.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1))
                           / (x.size + y.size - 2))
        d = float((y.mean() - x.mean()) / pooled) if pooled > 0 else None
    return {"diff": float(y.mean() - x.mean()), "ci95": [float(lo), float(hi)], "cohens_d": d}


def compare_paired(a: Sequence[float | None], b: Sequence[float | None], n_boot: int = N_BOOT,
                   seed: int = 0) -> dict:
    """mean(b[i] - a[i]) over the pairs (a[i], b[i]) with both values: the mean difference,
    the percentile-bootstrap 95% CI of that mean (pairs resampled together), Cohen's d with
    the pooled standard deviation (as in compare_means), "paired": True and "n_pairs".

    Pairing removes what both members of a pair share (the prompt, the seed): identical
    responses differ by exactly 0 with CI [0, 0], where resampling each group on its own
    (compare_means) would report a spread that is only the prompts' spread."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not both:
        return {"diff": None, "ci95": [None, None], "cohens_d": None, "paired": True,
                "n_pairs": 0}
    x, y = (np.asarray(v, dtype=np.float64) for v in zip(*both))
    d = y - x
    lo, hi = bootstrap_ci(d, n_boot, seed=seed)
    effect = None
    if x.size > 1:
        pooled = math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
        effect = float(d.mean() / pooled) if pooled > 0 else None
    return {"diff": float(d.mean()), "ci95": [lo, hi], "cohens_d": effect, "paired": True,
            "n_pairs": int(d.size)}


def share_negative(values: Sequence[float]) -> float | None:
    x = [v for v in values if v is not None]
    return sum(v < 0 for v in x) / len(x) if x else None


__all__ = ["bootstrap_ci", "compare_means", "compare_paired", "describe",
           "share_negative"]
