"""The count level of a sinogram from its noise (:mod:`sirf_fbsem.recon.count_level`): close to the
counts of Poisson data whatever the efficiencies and background, invariant under scaling, blind to
unmeasured bins, defined on degenerate data."""
from __future__ import annotations

import math

import pytest
import torch

from sirf_fbsem.recon.count_level import LOG_COUNT_LIMIT, estimated_counts, log_count_level

from tiny_problems import tiny_samples

SHAPE = (1, 3, 48, 96)


def smooth_mean(total: float, shape=SHAPE) -> torch.Tensor:
    """A smooth sinogram-like mean (a bump along the tangential axis, varying slowly over views) of
    ``total`` expected counts."""
    t, s, v, n = shape
    u = torch.linspace(-1, 1, n, dtype=torch.float64)
    views = 1.0 + 0.3 * torch.cos(torch.linspace(0, math.pi, v, dtype=torch.float64))
    m = torch.exp(-(u / 0.45) ** 2)[None, None, None, :] * views[None, None, :, None] * torch.ones(t, s, 1, 1)
    return m * (total / float(m.sum()))


ONES = torch.ones(SHAPE, dtype=torch.float64)


@pytest.mark.parametrize("total", [2e3, 3e4, 4e5])
def test_poisson_counts_are_recovered(total):
    """Up to ~30 counts per bin, N_hat is within 5 % of the counts the sinogram holds (mean of 4
    realisations: the estimate's own spread is ~1/sqrt(pairs))."""
    gen = torch.Generator().manual_seed(int(total))
    mean = smooth_mean(total)
    est = [float(estimated_counts(torch.poisson(mean, generator=gen), 0.0, ONES)[0]) for _ in range(4)]
    assert sum(est) / 4 == pytest.approx(total, rel=0.05)


def test_efficiencies_and_background_are_divided_out():
    """Bin-to-bin efficiencies (0.5-1, a normalisation's pattern) and a uniform background: with the
    factors as ``m`` and the background as ``b`` the estimate is within 5 % of the counts; without
    them it is far off at these counts per bin (~15)."""
    gen = torch.Generator().manual_seed(5)
    eff = 0.5 + 0.5 * torch.rand(SHAPE, generator=gen, dtype=torch.float64)
    background = torch.full(SHAPE, 2.0, dtype=torch.float64)
    mean = eff * smooth_mean(2e5) + background
    y = torch.poisson(mean, generator=gen)
    total = float(mean.sum())
    assert float(estimated_counts(y, background, eff)[0]) == pytest.approx(total, rel=0.05)
    assert float(estimated_counts(y, 0.0, ONES)[0]) < 0.75 * total
    # a constant factor on m changes nothing
    torch.testing.assert_close(estimated_counts(y, background, 7.0 * eff), estimated_counts(y, background, eff),
                               rtol=1e-9, atol=0)


def test_the_estimate_grows_with_the_counts_and_ignores_the_unit():
    gen = torch.Generator().manual_seed(0)
    levels = [float(estimated_counts(torch.poisson(smooth_mean(n), generator=gen), 0.0, ONES)[0])
              for n in (1e3, 1e4, 1e5, 1e6)]
    assert levels == sorted(levels) and levels[-1] > 100 * levels[0]
    y = torch.poisson(smooth_mean(1e4) + 0.5, generator=gen)
    ref = estimated_counts(y, 0.5, ONES)
    for a in (0.01, 100.0, 3.7e-5):
        torch.testing.assert_close(estimated_counts(a * y, a * 0.5, ONES), ref, rtol=1e-6, atol=0)


def test_unmeasured_bins_are_left_out():
    """Gaps (every 9th tangential bin never counts) bias the estimate by far unless left out."""
    gen = torch.Generator().manual_seed(1)
    m = ONES.clone()
    m[..., ::9] = 0.0
    y = torch.poisson(smooth_mean(1e5), generator=gen) * m
    held = float(y.sum())
    assert float(estimated_counts(y, 0.0, m)[0]) == pytest.approx(held, rel=0.05)
    assert float(estimated_counts(y, 0.0, ONES)[0]) < 0.8 * held


def test_batches_and_degenerate_data():
    gen = torch.Generator().manual_seed(2)
    low, high = torch.poisson(smooth_mean(1e3), generator=gen), torch.poisson(smooth_mean(1e5), generator=gen)
    both = estimated_counts(torch.stack([low, high]), 0.0, ONES)
    assert both.shape == (2,)
    torch.testing.assert_close(both, torch.cat([estimated_counts(low, 0.0, ONES), estimated_counts(high, 0.0, ONES)]))
    zero = estimated_counts(torch.zeros_like(low), 0.0, ONES)
    flat = estimated_counts(torch.full_like(low, 3.0), 0.0, ONES)
    assert float(zero[0]) == 0.0 and math.isinf(float(flat[0]))
    levels = log_count_level(torch.cat([zero, flat, torch.tensor([1e7, 1e8], dtype=zero.dtype)]), 1e7)
    torch.testing.assert_close(levels, torch.tensor([-LOG_COUNT_LIMIT, LOG_COUNT_LIMIT, 0.0, math.log(10.0)],
                                                    dtype=zero.dtype))
    with pytest.raises(ValueError, match="count reference"):
        log_count_level(both, 0.0)


def test_support_projection_is_the_projection_of_the_support():
    base, samples = tiny_samples(num_samples=1, num_subsets=4)
    mult = samples[0].multiplicative.clone()
    mult[..., 5] = 0.0  # a tangential gap
    model = base.with_terms(mult, samples[0].additive)
    for s in (None, 2):
        m = model.support_projection(s)
        assert m.shape == model.subset_sinogram_shape(s)
        assert not bool((m[..., 5] != 0).any()) and float(m.amin()) >= 0
        torch.testing.assert_close(m, model.direct(model.support().float(), s))
    # another model's factors: its own, not the first model's
    other = base.with_terms(samples[0].multiplicative, None)
    assert bool((other.support_projection(2)[..., 5] > 0).any())
    torch.testing.assert_close(other.support_projection(2), other.direct(other.support().float(), 2))


def test_support_projection_is_projected_once_for_every_copy(monkeypatch):
    """A training run builds one model per sample (``with_terms``); the support's projection
    without the factors is shared by them, so each subset is projected once, not once per sample."""
    base, samples = tiny_samples(num_samples=3, num_subsets=4)
    base.support()  # as the trainer's model factory does: every copy shares the support
    calls = []
    geometric = type(base)._geometric_direct

    def counting(self, xb, subset):
        calls.append(subset)
        return geometric(self, xb, subset)

    monkeypatch.setattr(type(base), "_geometric_direct", counting)
    for sample in samples:
        model = base.with_terms(sample.multiplicative, sample.additive)
        for s in (1, 2):
            torch.testing.assert_close(model.support_projection(s),
                                       sample.multiplicative[..., model.subset_views(s), :]
                                       * base.with_terms(None, None).direct(base.support().float(), s))
    assert calls.count(1) == 1 + len(samples) and calls.count(2) == 1 + len(samples)  # once, plus each check's own
    # another subset count, dtype or device is another key; an other support is not reused
    base.with_num_subsets(2).support_projection(1)
    assert calls.count(1) == 2 + len(samples)


@pytest.mark.parametrize("block", [1, 2, 5])
def test_blocks_of_sinograms_give_the_sums_of_one_block(block):
    """The sums run over blocks of sinograms (cache-sized temporaries); any block size gives the
    one-block estimate to rounding, for a batch with gaps, background and efficiencies."""
    gen = torch.Generator().manual_seed(11)
    shape = (2, 1, 7, 12, 40)
    eff = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
    eff[..., 3] = 0.0
    y = torch.poisson(eff * 20.0 + 1.0, generator=gen)
    whole = estimated_counts(y, 1.0, eff, sinograms_per_block=None)
    torch.testing.assert_close(estimated_counts(y, 1.0, eff, sinograms_per_block=block), whole, rtol=1e-12, atol=0)
    assert bool((whole > 0).all())
    with pytest.raises(ValueError, match="sinograms_per_block"):
        estimated_counts(y, 1.0, eff, sinograms_per_block=0)
