"""Bootstrap intervals, verdicts and seed spread (sirf_fbsem.study_statistics)."""
from __future__ import annotations

import numpy as np
import pytest

from sirf_fbsem.study_statistics import Interval, paired_ratio_interval, seed_spread, verdict


def test_paired_ratio_interval_contains_the_estimate_and_narrows_with_more_phantoms():
    rng = np.random.default_rng(1)
    widths = []
    for n in (8, 64):
        b = rng.uniform(0.2, 0.4, n)
        a = 0.8 * b + rng.normal(0, 0.01, n)  # a method 20 % better on every phantom, small noise
        ci = paired_ratio_interval(a, b, seed=3)
        assert ci.estimate == pytest.approx(a.mean() / b.mean(), rel=1e-12)
        assert ci.low < ci.estimate < ci.high < 1.0 and ci.level == 0.95
        assert verdict(ci) == "better" and verdict(ci, lower_is_better=False) == "worse"
        widths.append(ci.high - ci.low)
    assert widths[1] < widths[0]


def test_pairing_matters_equal_methods_are_inconclusive():
    """Phantom-to-phantom spread is large, the paired difference tiny and of either sign: the
    interval straddles 1 (an unpaired bootstrap would not even see the pairing)."""
    rng = np.random.default_rng(2)
    b = rng.uniform(0.1, 0.6, 12)
    a = b * (1 + rng.choice([-1, 1], 12) * 0.01)
    ci = paired_ratio_interval(a, b)
    assert ci.low < 1.0 < ci.high and verdict(ci) == "inconclusive"
    # the same seed gives the same interval; another seed a slightly different one
    assert paired_ratio_interval(a, b) == ci and paired_ratio_interval(a, b, seed=9) != ci


def test_interval_matches_scipy_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    b = rng.uniform(0.2, 0.4, 20)
    a = b * rng.uniform(0.7, 1.0, 20)
    ours = paired_ratio_interval(a, b, resamples=20000)
    ref = scipy_stats.bootstrap((a, b), lambda x, y: x.mean() / y.mean(), paired=True, vectorized=False,
                                n_resamples=20000, method="percentile", random_state=np.random.default_rng(5))
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.01)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="paired"):
        paired_ratio_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_ratio_interval([1.0, np.nan], [1.0, 1.0])
    with pytest.raises(ValueError, match="no values"):
        seed_spread([])


def test_seed_spread_and_verdict_edges():
    s = seed_spread([0.30, 0.32, 0.34])
    assert s["num_seeds"] == 3 and s["mean"] == pytest.approx(0.32) and s["std"] == pytest.approx(0.02)
    assert (s["min"], s["max"]) == (0.30, 0.34) and seed_spread([0.3])["std"] is None
    assert verdict(Interval(1.1, 1.01, 1.2, 0.95, 10)) == "worse"
    assert verdict(Interval(1.0, 0.99, 1.0, 0.95, 10)) == "inconclusive"  # touching 1 is not excluding it
