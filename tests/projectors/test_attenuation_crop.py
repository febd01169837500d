"""Attenuation factors from a mu-map: the crop to the map's support changes no line integral.

``acquisition.attenuation_factors`` projects the mu-map on the smallest centred crop of its grid
whose traced cylinder holds the map's non-zero voxels (``crop_to_support``); the factors must be
those of the whole grid, for both ray tracings, and the crop must be smaller where it can be.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sirf_fbsem.acquisition import attenuation_factors, crop_to_support
from sirf_fbsem.geometry import ImageGeometry, SinogramGeometry, scanner_preset
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel


def _geometry():
    sino = SinogramGeometry.from_span(scanner_preset("small_test"), span=3, max_ring_diff=4)
    d = sino.default_image()
    # a grid wider than the default one, as a scanner's mu-map usually is
    return sino, ImageGeometry((d.shape[0], 61, 61), d.voxel_size_mm, d.origin_mm)


def _head(image: ImageGeometry, radius_mm: float, rng) -> np.ndarray:
    """A water ellipse with a denser rim and noise, zero outside, 1/cm."""
    z, y, x = image.centred_coordinates_mm()
    r = np.sqrt((y[:, None] / radius_mm) ** 2 + (x[None, :] / (0.8 * radius_mm)) ** 2)
    plane = np.where(r < 1, 0.096 + 0.05 * (r > 0.85), 0.0)
    mu = np.broadcast_to(plane, image.shape) * (1 + 0.1 * rng.random(image.shape))
    return (mu * (np.abs(z) < 0.4 * np.ptp(z))[:, None, None]).astype(np.float32)


def _line_integrals(mu, image, sino, ray_tracing):
    model = EmbeddedAcquisitionModel(sino, image, ray_tracing=ray_tracing)
    with torch.no_grad():
        return model.direct(torch.from_numpy(np.ascontiguousarray(mu))).numpy().astype(np.float64)


@pytest.mark.parametrize("ray_tracing", ["joseph", "siddon"])
def test_crop_keeps_every_line_integral(ray_tracing):
    sino, image = _geometry()
    mu = _head(image, 30.0, np.random.default_rng(7))
    mu_c, image_c = crop_to_support(mu, image)
    assert image_c.shape[1] < image.shape[1] and image_c.shape[0] == image.shape[0]
    assert mu_c.shape == image_c.shape and mu_c.sum() == pytest.approx(mu.sum(), rel=1e-6)
    whole = _line_integrals(mu, image, sino, ray_tracing)
    crop = _line_integrals(mu_c, image_c, sino, ray_tracing)
    assert whole.max() > 0
    np.testing.assert_allclose(crop, whole, rtol=1e-5, atol=1e-6 * whole.max())
    factors = attenuation_factors(mu, image, sino, ray_tracing=ray_tracing)
    np.testing.assert_allclose(factors, np.exp(-0.1 * whole * image.voxel_size_mm[2]), rtol=1e-5)


def test_crop_leaves_what_it_cannot_shrink():
    sino, image = _geometry()
    rng = np.random.default_rng(8)
    assert crop_to_support(np.zeros(image.shape, np.float32), image)[1] == image
    wide = _head(image, 0.5 * image.shape[1] * image.voxel_size_mm[1], rng)  # reaches the grid's edge
    assert crop_to_support(wide, image)[1] == image
    shifted = ImageGeometry(image.shape, image.voxel_size_mm, (0.0, 4.0, 0.0))
    assert crop_to_support(_head(image, 20.0, rng), shifted)[1] == shifted
