"""Count-aware strengths (``beta_counts = "log_linear"``): beta_k = softplus(rho_k - gamma_k l) with l the
data's count level from the prompts' noise."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sirf_fbsem.model import FBSEMNet, fbsem_fusion
from sirf_fbsem.recon.count_level import estimated_counts, log_count_level
from sirf_fbsem.recon.engine import start_image

from tiny_problems import perturb, small_net, tiny_samples


@pytest.fixture(scope="module")
def levels():
    """The same phantoms at 2e2 and 2e4 counts, 4 subsets (a few counts per bin at most: the count
    level is close to the counts there, :mod:`sirf_fbsem.recon.count_level`)."""
    base, low = tiny_samples(num_samples=2, num_subsets=4, counts=2e2, seed=3)
    _, high = tiny_samples(num_samples=2, num_subsets=4, counts=2e4, seed=3)
    return base, low + high


def _batch(base, samples):
    prompts = torch.stack([s.prompts for s in samples])
    model = base.with_terms(torch.stack([s.multiplicative for s in samples]), torch.stack([s.additive for s in samples]))
    x0 = start_image(base).expand((len(samples),) + tuple(base.image_shape))
    return x0, prompts, model


def test_zero_slopes_give_the_count_unaware_network(levels):
    base, samples = levels
    aware = small_net(num_stages=4, beta_init=0.5)
    perturb(aware)
    with torch.no_grad():
        for st in aware.stages:
            st.count_slope.zero_()
    unaware = small_net(num_stages=4, beta_init=0.5, beta_counts="none")
    unaware.load_state_dict({k: v for k, v in aware.state_dict().items() if not k.endswith("count_slope")})
    x0, prompts, model = _batch(base, samples)
    with torch.no_grad():
        assert torch.equal(aware(x0, prompts, model), unaware(x0, prompts, model))


def test_strength_depends_on_the_count_level_as_documented():
    net = small_net(num_stages=2, beta_init=0.5)
    with torch.no_grad():
        net.stages[1].count_slope.fill_(0.7)
    st = net.stages[1]
    torch.testing.assert_close(st.strength(torch.tensor([0.0])), st.beta.reshape(1))
    levels = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(st.strength(levels), F.softplus(st.rho - 0.7 * levels))
    at = net.betas_at(1e9)  # ln(1e9 / 1e7) = ln 100
    torch.testing.assert_close(at[1], F.softplus(st.rho - 0.7 * math.log(100.0)))
    torch.testing.assert_close(at[0], net.betas[0])  # slope 0: the same at every level
    assert float(net.betas_at(1e9)[1].detach()) < float(net.betas_at(1e5)[1].detach())
    torch.testing.assert_close(net.count_slopes, torch.tensor([0.0, 0.7]))
    with pytest.raises(ValueError, match="count level"):
        st.strength(None)
    unaware = small_net(num_stages=2, beta_counts="none")
    assert unaware.stages[0].count_slope is None and torch.equal(unaware.count_slopes, torch.zeros(2))
    assert unaware.stages[0].strength(None) is not None
    with pytest.raises(ValueError, match="beta_counts"):
        small_net(beta_counts="linear")


def test_a_stage_fuses_with_the_strength_of_each_samples_count_level(levels):
    """Stage 0's output is the fusion with beta(l_b) for each sample b, l_b from its subset's prompts."""
    base, samples = levels
    net = small_net(num_stages=1, beta_init=0.5)
    perturb(net)
    with torch.no_grad():
        net.stages[0].count_slope.fill_(0.5)
    x0, prompts, model = _batch(base, samples)
    x = net.scaled_start(x0, model.take_subset(prompts, 0), model)
    terms = net.stage_terms(0, x0, prompts, model)
    counts = estimated_counts(model.take_subset(prompts, 0), model.additive_term(0),
                              model.support_projection(0)) * model.num_subsets
    torch.testing.assert_close(terms.log_counts, log_count_level(counts.double(), 1e7))
    # the level follows the counts: the same phantoms at 100x the counts are ln(100) higher, within 15 %
    gap = terms.log_counts[2:] - terms.log_counts[:2]
    assert torch.allclose(gap, torch.full_like(gap, math.log(100.0)), rtol=0.15)
    st = net.stages[0]
    strength = st.strength(terms.log_counts).detach()
    assert float(strength[2]) < float(strength[0]) and float(strength[3]) < float(strength[1])
    beta = strength.to(x.dtype) * terms.unit
    with torch.no_grad():
        out = net(x0, prompts, model)
        x_reg = st.regulariser(x, None, terms.sensitivity > 0)
        manual = fbsem_fusion(terms.x_em, x_reg, terms.sensitivity, beta.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-6 * float(out.amax()))
    # on a region, from the precomputed terms, the same
    region = (slice(0, 1), slice(4, 20), slice(8, 30))
    with torch.no_grad():
        torch.testing.assert_close(st.output_on(terms, region), out[(Ellipsis, *region)], rtol=1e-5,
                                   atol=1e-6 * float(out.amax()))


def test_the_count_slope_is_learned(levels):
    """The loss has a gradient in every stage's slope when the batch holds several count levels."""
    base, samples = levels
    net = small_net(num_stages=2, beta_init=0.5)
    perturb(net)
    x0, prompts, model = _batch(base, samples)
    out = net(x0, prompts, model)
    target = torch.stack([s.targets[1] for s in samples])
    ((out - target) ** 2).mean().backward()
    for st in net.stages:
        assert st.count_slope.grad is not None and math.isfinite(float(st.count_slope.grad))
        assert float(st.count_slope.grad.abs()) > 0


def test_config_round_trip_and_old_configs():
    net = small_net(num_stages=3)
    cfg = net.config()
    assert cfg["beta_counts"] == "log_linear" and cfg["beta_count_reference"] == 1e7
    again = FBSEMNet.from_config(cfg)
    assert again.beta_counts == "log_linear" and sorted(again.state_dict()) == sorted(net.state_dict())
    old = {k: v for k, v in cfg.items() if k not in ("beta_counts", "beta_count_reference")}
    assert FBSEMNet.from_config(old).beta_counts == "none"  # networks saved before 0.9
    with pytest.raises(ValueError, match="beta_count_reference"):
        FBSEMNet.from_config({**cfg, "beta_count_reference": 0.0})
