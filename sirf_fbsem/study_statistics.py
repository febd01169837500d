"""Statistics of a study (docs/studies/rules.md): spread over training seeds, bootstrap intervals
over phantoms, and the verdict a claim may make.

Written here rather than taken from scipy.stats.bootstrap because the paired ratio of means is
the statistic the studies report, and a dozen lines with a seeded numpy generator give it
exactly; scipy is only a test dependency of the package.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Interval", "paired_ratio_interval", "verdict", "seed_spread"]


@dataclass(frozen=True)
class Interval:
    """A statistic's estimate and its bootstrap interval ``[low, high]`` at ``level`` (e.g. 0.95)."""

    estimate: float
    low: float
    high: float
    level: float
    resamples: int

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def paired_ratio_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 10000, seed: int = 0
) -> Interval:
    """Ratio of means ``mean(a) / mean(b)`` of paired per-phantom values (``a[i]``, ``b[i]`` on
    phantom ``i``), with a percentile bootstrap interval over phantoms: the phantoms are drawn
    with replacement ``resamples`` times (numpy generator seeded by ``seed``), the pairs kept
    together, and the interval is the (1-level)/2 and (1+level)/2 quantiles of the ratios.

    Raises ValueError for unpaired, empty or non-finite input, or a zero mean of ``b``.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired values needed: got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or y.mean() == 0:
        raise ValueError("paired values must be finite, with a non-zero mean of the reference")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(int(resamples), x.size))
    ratios = x[idx].mean(axis=1) / y[idx].mean(axis=1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(x.mean() / y.mean()), float(lo), float(hi), float(level), int(resamples))


def verdict(ratio: Interval, lower_is_better: bool = True) -> str:
    """"better", "worse" or "inconclusive": a ratio (method / reference) is better only when its
    whole interval lies below 1 (above 1 for metrics where higher is better)."""
    if ratio.high < 1.0:
        return "better" if lower_is_better else "worse"
    if ratio.low > 1.0:
        return "worse" if lower_is_better else "better"
    return "inconclusive"


def seed_spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample std (ddof 1; None for one seed), min and max of one figure over training seeds."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    return {"num_seeds": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max())}
