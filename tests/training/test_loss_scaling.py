"""The ``scaled_mse`` training loss: every sample weighs alike whatever its count level.

Image units grow with the counts (the simulation's images are Bq/ml x a per-sample activity
scale), so with the plain MSE a sample with ``a`` times the counts weighs ``a^2`` times more.
FBSEM-Net is scale-equivariant (tests/model/test_scale_equivariance.py), so dividing each sample's
squared error by its own scale squared (``c`` = mean of its last target's positive voxels)
makes the loss, and its gradient, the same for ``a·(y, b, targets)`` as for ``(y, b, targets)``.
"""
from __future__ import annotations

import pytest
import torch

from sirf_fbsem.samples import Batch, Sample
from sirf_fbsem.training import TrainConfig, with_terms_factory
from sirf_fbsem.training.patches import draw_patches, patch_training_step, terms_from_payload, terms_payload
from sirf_fbsem.training.trainers import _initial, _net_inputs, sample_scales, stage_loss, training_step
from tiny_problems import perturb, small_net, tiny_samples


@pytest.fixture(scope="module")
def problem():
    return tiny_samples(num_samples=2, num_subsets=2, num_targets=2, seed=4)


def _scaled(sample: Sample, a: float) -> Sample:
    return sample.replace(prompts=a * sample.prompts, additive=a * sample.additive, targets=a * sample.targets,
                          phantom=a * sample.phantom)


def test_sample_scales_and_stage_loss_are_the_formula():
    t = torch.zeros(2, 3, 1, 4, 4)
    t[0, -1, 0, :2, :2] = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # mean of positives 2
    t[0, 0] = 100.0  # earlier targets do not enter c
    out, target = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    c = sample_scales(t)
    assert c.tolist() == [2.0, 1.0]  # no positive voxel: 1
    per = ((out - target) ** 2).flatten(1).mean(1)
    assert float(stage_loss(out, target, c)) == pytest.approx(float((per / c**2).mean()), rel=1e-6)
    assert float(stage_loss(out, target, None)) == pytest.approx(float(per.mean()), rel=1e-6)


@pytest.mark.parametrize("mode,stage", [("sequential", 0), ("end_to_end", None)])
@pytest.mark.parametrize("a", [0.01, 100.0])
def test_scaled_loss_and_gradient_do_not_depend_on_the_count_level(problem, mode, stage, a):
    base, samples = problem
    factory = with_terms_factory(base)
    results = {}
    for loss in ("scaled_mse", "mse"):
        for name, sample in (("y", samples[0]), ("ay", _scaled(samples[0], a))):
            net = small_net(num_stages=2, num_subsets=2)
            perturb(net)
            batch = Batch.collate([sample], "cpu")
            value = training_step(net, mode, batch, factory(batch), TrainConfig(loss=loss), stage=stage)
            grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
            results[loss, name] = (value, grads)
    (l1, g1), (l2, g2) = results["scaled_mse", "y"], results["scaled_mse", "ay"]
    assert l2 == pytest.approx(l1, rel=1e-3) and float((g2 - g1).norm() / g1.norm()) < 1e-3
    # the plain MSE weighs the sample a^2 times more: what the scaled loss removes
    (m1, _), (m2, _) = results["mse", "y"], results["mse", "ay"]
    assert m2 == pytest.approx(a**2 * m1, rel=1e-3)


def test_patch_loss_is_scaled_per_sample(problem):
    """The patch path stores c with the cached terms and weighs each sample's patches by 1/c^2."""
    base, samples = problem
    net = small_net(num_stages=2, num_subsets=2)
    perturb(net)
    values = []
    for sample in (samples[0], _scaled(samples[0], 100.0)):
        batch = Batch.collate([sample], "cpu")
        model = with_terms_factory(base)(batch)
        kw = _net_inputs(net, batch)
        with torch.no_grad():
            terms = net.stage_terms(0, _initial(batch, model), batch.prompts, model, **kw)
        payload = terms_payload(terms, batch.targets[:, 0], sample_scales(batch.targets)[0])
        terms2, target, box = terms_from_payload(payload, "cpu")
        regions = draw_patches(box, terms2.image_shape, (1, 8, 8), 3, 0, 0, 0, 0)
        w = float(payload["loss_scale"]) ** -2
        values.append(patch_training_step(net.stages[0], [(terms2, target, regions)], sample_weights=[w]))
        net.zero_grad()
    assert values[1] == pytest.approx(values[0], rel=1e-3)
    with pytest.raises(ValueError, match="sample weights"):
        patch_training_step(net.stages[0], [(terms2, target, regions)], sample_weights=[1.0, 2.0])


def test_config_refuses_an_unknown_loss():
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="l1")
    assert TrainConfig().loss == "scaled_mse"
