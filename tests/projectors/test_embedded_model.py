"""The embedded acquisition model: adjoint identity with subsets, factors and PSF; terms; errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import small_span3, tiny_image, tiny_scanner_geometry
from sirf_fbsem.geometry import GeometryError, GeometryWarning, ImageGeometry
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel


def _model(arc=False, **kw):
    g = tiny_scanner_geometry(arc_corrected=arc)
    return EmbeddedAcquisitionModel(g, tiny_image(g), dtype=torch.float64, **kw)


def _rel_dot_mismatch(model, subset, seed=0, batch=None):
    gen = torch.Generator().manual_seed(seed)
    xs = model.image_shape if batch is None else (batch,) + model.image_shape
    ys = model.subset_sinogram_shape(subset) if batch is None else (batch,) + model.subset_sinogram_shape(subset)
    x = torch.rand(xs, generator=gen, dtype=torch.float64)
    y = torch.rand(ys, generator=gen, dtype=torch.float64)
    lhs = float((model.direct(x, subset) * y).sum())
    rhs = float((x * model.adjoint(y, subset)).sum())
    return abs(lhs - rhs) / abs(lhs)


@pytest.mark.parametrize("arc", [False, True])
@pytest.mark.parametrize("subset", [None, 0, 2])
def test_adjoint_identity_with_subsets(arc, subset):
    model = _model(arc=arc, num_subsets=3)
    assert _rel_dot_mismatch(model, subset) < 1e-5


def test_adjoint_identity_with_factors_psf_and_batch(rng):
    g = tiny_scanner_geometry()
    mult = rng.uniform(0.2, 1.0, g.shape)
    model = EmbeddedAcquisitionModel(g, tiny_image(g), multiplicative=mult, psf_fwhm_mm=(3.0, 5.0, 5.0),
                                     num_subsets=4, dtype=torch.float64)
    assert _rel_dot_mismatch(model, 1) < 1e-5
    assert _rel_dot_mismatch(model, None, batch=2) < 1e-5
    assert model.adjoint_test(subset=3) < 1e-6


def test_subset_projection_equals_full_projection_restricted():
    model = _model(num_subsets=4)
    x = torch.rand(model.image_shape, dtype=torch.float64)
    full = model.direct(x)
    for s in range(4):
        np.testing.assert_allclose(model.direct(x, s).numpy(), model.take_subset(full, s).numpy(), rtol=1e-12)


def test_sensitivity_sums_subsets():
    model = _model(num_subsets=3)
    total = sum(model.sensitivity(s) for s in range(3))
    torch.testing.assert_close(total, model.sensitivity(None))


def test_forward_adds_additive_term(rng):
    g = tiny_scanner_geometry()
    add = rng.uniform(0, 2, g.shape)
    model = EmbeddedAcquisitionModel(g, tiny_image(g), additive=add, num_subsets=2, dtype=torch.float64)
    x = torch.rand(model.image_shape, dtype=torch.float64)
    torch.testing.assert_close(model.forward(x, 1) - model.direct(x, 1), model.take_subset(torch.as_tensor(add), 1))


def test_batched_equals_per_item():
    model = _model()
    x = torch.rand((3,) + model.image_shape, dtype=torch.float64)
    yb = model.direct(x)
    assert yb.shape == (3,) + model.sinogram_shape
    for b in range(3):
        torch.testing.assert_close(yb[b], model.direct(x[b]))


def test_bad_terms_and_shapes_are_rejected():
    g = tiny_scanner_geometry()
    img = tiny_image(g)
    with pytest.raises(GeometryError, match="multiplicative term has shape"):
        EmbeddedAcquisitionModel(g, img, multiplicative=np.ones((1, 2, 3, 4)))
    bad = np.ones(g.shape)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="additive term contains NaN"):
        EmbeddedAcquisitionModel(g, img, additive=bad)
    with pytest.warns(GeometryWarning, match="ring radius"):  # accepted, as STIR accepts it
        EmbeddedAcquisitionModel(g, ImageGeometry((img.shape[0], 60, 60), (2.0, 5.0, 5.0)))
    model = EmbeddedAcquisitionModel(g, img)
    with pytest.raises(ValueError, match="expects"):
        model.direct(torch.ones(2, 3, 4))


def test_small_test_scanner_model_runs_float32():
    g = small_span3()
    model = EmbeddedAcquisitionModel(g, g.default_image(), num_subsets=4)
    x = torch.ones(model.image_shape)
    y = model.direct(x, 0)
    assert y.dtype == torch.float32 and y.shape == model.subset_sinogram_shape(0)
    assert float(y.max()) > 0
