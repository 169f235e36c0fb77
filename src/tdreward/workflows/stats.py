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


def share_negative(values: Sequence[float]) -> float | None:
    x = [v for v in values if v is not None]
    return sum(v < 0 for v in x) / len(x) if x else None


__all__ = ["bootstrap_ci", "compare_means", "describe", "share_negative"]
