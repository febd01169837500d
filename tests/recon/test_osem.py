"""OSEM approaches the phantom on noiseless data; MLEM raises the Poisson log-likelihood."""
from __future__ import annotations

import numpy as np
import torch

from conftest import small_span3
from sirf_fbsem.metrics import nrmse
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
from sirf_fbsem.recon import OSEM, fov_mask, mlem, poisson_log_likelihood


def smooth_phantom(image):
    z, y, x = image.centred_coordinates_mm()
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    body = (X**2 + Y**2 < 60.0**2).astype(np.float64)
    blob = np.exp(-((X - 20) ** 2 + (Y + 10) ** 2) / (2 * 15.0**2))
    return torch.as_tensor(body * (1.0 + 1.5 * blob), dtype=torch.float32)


def test_osem_noiseless_interior_nrmse_falls_below_10_percent():
    g = small_span3()
    img = g.default_image()
    model = EmbeddedAcquisitionModel(g, img, num_subsets=4)
    phantom = smooth_phantom(img)
    y = model.forward(phantom)
    z, yy, xx = img.centred_coordinates_mm()
    interior = torch.as_tensor(
        np.broadcast_to((yy[:, None] ** 2 + xx[None, :] ** 2) < 45.0**2, img.shape)[1:-1].copy()
    )
    errors = []
    algo = OSEM(model, y, mask=fov_mask(img))
    done = 0
    for total in (1, 2, 4, 8, 16):  # sub-iterations
        algo.run(total - done, progress=False)
        done = total
        errors.append(nrmse(algo.x[1:-1], phantom[1:-1], interior))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.10, errors


def test_mlem_raises_log_likelihood_every_iteration():
    g = small_span3()
    img = g.default_image()
    rng = torch.Generator().manual_seed(3)
    add = torch.full(g.shape, 0.2)
    model = EmbeddedAcquisitionModel(g, img, additive=add)
    y = torch.poisson(model.forward(smooth_phantom(img) * 2), generator=rng)
    values = []
    cb = lambda algo: values.append(poisson_log_likelihood(algo.model, y, algo.x))  # noqa: E731
    mlem(model, y, 8, callbacks=[cb])
    assert len(values) == 8
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_osem_rejects_bad_prompts():
    g = small_span3()
    model = EmbeddedAcquisitionModel(g, g.default_image(), num_subsets=2)
    import pytest

    bad = torch.zeros(g.shape)
    bad[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        OSEM(model, bad)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        OSEM(model, bad)
