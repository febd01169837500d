"""Images that reach past the scanner are projected as STIR projects them.

STIR rel_6.4.0, ``ProjMatrixByBinUsingRayTracing.cxx``: the FOV radius is
``min(min(max_x, -min_x) vx, min(max_y, -min_y) vy)`` from the image's indices alone
(no ring radius), each LOR is traced between the points where it crosses that FOV
cylinder "assuming infinitely long scanner", and voxels outside the image's planes are
dropped (``ProjMatrixElemsForOneBin::forward_project``). So an image wider than the
ring is traced out to its own FOV, past the detectors, and planes past the scanner's
axial extent contribute wherever oblique LORs cross them.

Expected values: exact equalities between a large image and the same activity on a
smaller grid, chord lengths of a uniform cylinder, and a z-reach computed by hand.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from sirf_fbsem.geometry import GeometryWarning, ImageGeometry, SinogramGeometry, scanner_preset
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
from sirf_fbsem.projectors.joseph import joseph_adjoint, joseph_forward
from sirf_fbsem.projectors.rays import make_ray_table

SMALL = scanner_preset("small_test")  # R = 125 mm, 8 rings of 4 mm (axial extent +-16 mm)
BACKENDS = ["numba", "torch"]
VXY = 4.0
#: 71 x 71 voxels of 4 mm: FOV radius 35 * 4 = 140 mm > R = 125 mm
WIDE_NXY = 71
#: 41 x 41 voxels of 4 mm: FOV radius 80 mm, inside the ring
NARROW_NXY = 41


def _span1(max_ring_diff: int = 7, arc_corrected: bool = False) -> SinogramGeometry:
    return SinogramGeometry.from_span(SMALL, span=1, max_ring_diff=max_ring_diff, arc_corrected=arc_corrected)


def _image(nz: int, nxy: int) -> ImageGeometry:
    """nz planes of ring spacing / 2 = 2 mm, centred on the scanner; nxy x nxy voxels of 4 mm."""
    return ImageGeometry((nz, nxy, nxy), (SMALL.ring_spacing_mm / 2.0, VXY, VXY))


def _quiet_model(sino: SinogramGeometry, image: ImageGeometry) -> EmbeddedAcquisitionModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        return EmbeddedAcquisitionModel(sino, image, dtype=torch.float64, ray_tracing="joseph")  # its ray tables


def _disc(image: ImageGeometry, radius_mm: float, gen: torch.Generator) -> torch.Tensor:
    """Random activity inside |(x, y)| < radius_mm, zero outside, (Z, Y, X) float64."""
    _, y, x = image.centred_coordinates_mm()
    inside = torch.from_numpy((y[:, None] ** 2 + x[None, :] ** 2) < radius_mm**2)
    return torch.rand(image.shape, generator=gen, dtype=torch.float64) * inside


def _pad_xy(x: torch.Tensor, nxy: int) -> torch.Tensor:
    """Zero-pad (Z, n, n) to (Z, nxy, nxy), centred (n and nxy odd)."""
    p = (nxy - x.shape[-1]) // 2
    return torch.nn.functional.pad(x, (p, p, p, p))


def _pad_z(x: torch.Tensor, extra: int) -> torch.Tensor:
    """Zero-pad ``extra`` planes at each end of z."""
    return torch.nn.functional.pad(x, (0, 0, 0, 0, extra, extra))


# ----------------------------------------------------------------------------- acceptance


def test_model_is_built_with_a_warning_not_a_refusal():
    g = _span1()
    with pytest.warns(GeometryWarning, match="ring radius"):
        EmbeddedAcquisitionModel(g, _image(15, WIDE_NXY))
    with pytest.warns(GeometryWarning, match="axial extent"):
        EmbeddedAcquisitionModel(g, _image(23, NARROW_NXY))


def test_ray_table_fov_comes_from_the_image_not_the_ring():
    """STIR: fovrad = min(min(max_x, -min_x) vx, min(max_y, -min_y) vy); no ring radius in it."""
    rays = make_ray_table(_span1(), _image(15, WIDE_NXY))
    assert rays.fov_radius_mm == pytest.approx(35 * VXY)
    assert rays.fov_radius_mm > SMALL.effective_ring_radius_mm
    # SIRF's mMR mu map geometry: 57 x 57 voxels of 13.0391 mm, FOV 28 * 13.0391 = 365.1 mm > 335 mm
    mmr = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=60)
    mu = ImageGeometry((127, 57, 57), (2.03125, 13.0391, 13.0391))
    assert make_ray_table(mmr, mu, views=np.array([0])).fov_radius_mm == pytest.approx(28 * 13.0391)


# ----------------------------------------------------------------------------- transaxially


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_image_projects_like_the_same_activity_on_a_smaller_grid(backend):
    """Activity inside the narrow grid's FOV projects identically on the wide grid (zero-padded)."""
    g = _span1(max_ring_diff=3)
    wide, narrow = _image(15, WIDE_NXY), _image(15, NARROW_NXY)
    x = _disc(narrow, 72.0, torch.Generator().manual_seed(0))  # 72 mm: two voxels inside the 80 mm FOV
    y_narrow = joseph_forward(x[None], make_ray_table(g, narrow), backend=backend)
    y_wide = joseph_forward(_pad_xy(x, WIDE_NXY)[None], make_ray_table(g, wide), backend=backend)
    assert float(y_narrow.sum()) > 0
    torch.testing.assert_close(y_wide, y_narrow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_wide_image_gives_chords_of_its_own_fov_past_the_ring(backend):
    """Segment 0 of an image of ones: the chord through the image's FOV cylinder (radius 140 mm),
    longer than the ring's (R = 125 mm): the LOR is traced past the detectors, as in STIR."""
    g = _span1(max_ring_diff=0)
    wide = _image(15, WIDE_NXY)
    rays = make_ray_table(g, wide)
    y = joseph_forward(torch.ones((1,) + wide.shape, dtype=torch.float64), rays, backend=backend)[0]
    s = g.s_mm()
    fov = 35 * VXY
    chord = 2.0 * np.sqrt(fov**2 - s**2)
    middle = y[4].numpy()  # (V, N), ring 4: m = 2 mm, tube well inside the image
    # Joseph samples one point per principal plane: within two voxel diagonals of the exact chord
    assert np.abs(middle - chord[None, :]).max() < 2 * VXY * math.sqrt(2)
    centre = g.num_tangential_poss // 2
    assert middle[:, centre].min() > 2 * SMALL.effective_ring_radius_mm + 2 * VXY


@pytest.mark.parametrize("arc_corrected", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adjoint_identity_past_the_scanner(arc_corrected, backend):
    """Wide (140 mm FOV > R) and long (8 planes past each end) image: still an exact transpose."""
    g = _span1(max_ring_diff=7, arc_corrected=arc_corrected)
    im = _image(31, WIDE_NXY)
    rays = make_ray_table(g, im, views=np.arange(0, g.num_views, 5))
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((1,) + im.shape, generator=gen, dtype=torch.float64)
    y = torch.rand((1,) + rays.sinogram_shape, generator=gen, dtype=torch.float64)
    ax = joseph_forward(x, rays, backend=backend)
    aty = joseph_adjoint(y, rays, backend=backend)
    lhs, rhs = float((ax * y).sum()), float((x * aty).sum())
    assert lhs > 0 and abs(lhs - rhs) / (float(ax.norm()) * float(y.norm())) < 1e-12
    assert float(aty[0, :8].sum()) > 0 and float(aty[0, -8:].sum()) > 0  # extra planes are reached


def test_numba_and_torch_agree_past_the_scanner():
    g = _span1(max_ring_diff=7)
    im = _image(31, WIDE_NXY)
    rays = make_ray_table(g, im, views=np.arange(1, g.num_views, 6))
    x = torch.rand((1,) + im.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fn, ft = joseph_forward(x, rays, backend="numba"), joseph_forward(x, rays, backend="torch")
    assert float((fn - ft).abs().max()) / float(fn.abs().max()) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_arccorrected_bins_past_the_ring_in_a_wide_image(backend):
    """Arc-corrected bins with |s| >= R: traced in segment 0 (tan theta = 0, as STIR) where they
    cross the wide image's FOV; empty in oblique segments (no LOR; STIR's tan theta is NaN)."""
    n = 71  # 71 bins of 4 mm: |s| up to 140 mm > R = 125 mm
    g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4, arc_corrected=True, num_tangential_poss=n)
    rays = make_ray_table(g, _image(15, WIDE_NXY), views=np.arange(0, g.num_views, 3))
    beyond = np.abs(rays.s) >= SMALL.effective_ring_radius_mm
    n0 = g.segment(0).num_axial_poss
    assert beyond.any() and np.isnan(rays.tan_theta[n0:][:, beyond]).all()
    gen = torch.Generator().manual_seed(6)
    x = torch.rand((1,) + rays.image_shape, generator=gen, dtype=torch.float64) + 0.1
    y = joseph_forward(x, rays, backend=backend)[0]
    b = torch.from_numpy(beyond)
    inside = torch.from_numpy(np.abs(rays.s) < rays.fov_radius_mm - 1e-6)
    assert torch.all(y[n0:][..., b] == 0)
    assert torch.all(y[:n0][..., b & inside] > 0)
    r = torch.rand((1,) + rays.sinogram_shape, generator=gen, dtype=torch.float64)
    aty = joseph_adjoint(r, rays, backend=backend)
    lhs, rhs = float((y * r[0]).sum()), float((x * aty).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-12
    other = "torch" if backend == "numba" else "numba"
    torch.testing.assert_close(joseph_forward(x, rays, backend=other)[0], y, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- axially


def test_extra_planes_contribute_only_to_lors_that_cross_them():
    """An image 8 planes (16 mm) longer at each end than the scanner's default image.

    (a) With zeros in the extra planes it projects exactly as the default image.
    (b) Activity only in the extra planes (|z| >= 16 mm) reaches a bin only if its traced
        tube reaches past the centre of the last inner plane (z_inner = 14 mm):
        ``reach = |m| + d + |tan theta| sqrt(R_fov^2 - s^2) > z_inner``, with
        ``d = samp/2 (1 - 1/n)`` the offset of the outer of STIR's n axial rays per bin
        (n = 2 here: rays at m +- 1 mm). Every bin reaching past it by more than a plane
        (plus the slack of Joseph's plane sampling) sees it. In segment 0 (tan theta = 0)
        that is only the end rows, m = +-14 mm, whose tube [12, 16] mm overlaps the
        plane at 16 mm by a quarter, as STIR's ``add_adjacent_z`` gives; the other
        segment-0 rows see nothing. Oblique rows reach the extra planes where the LOR,
        continued past the detectors to the image's FOV (140 mm > R = 125 mm), crosses them.
    """
    g = _span1(max_ring_diff=7)
    default = _image(15, WIDE_NXY)
    long = _image(31, WIDE_NXY)
    m_default, m_long = _quiet_model(g, default), _quiet_model(g, long)
    gen = torch.Generator().manual_seed(5)
    inner = _disc(default, 130.0, gen) + 0.5 * _disc(default, 60.0, gen)
    torch.testing.assert_close(m_long.direct(_pad_z(inner, 8)), m_default.direct(inner), rtol=1e-12, atol=1e-12)

    extra = torch.ones(long.shape, dtype=torch.float64)
    extra[8:-8] = 0.0
    y = m_long.direct(extra)[0].numpy().transpose(0, 2, 1)  # (S, N, V)
    rays = m_long.rays(None)
    vz = long.voxel_size_mm[0]
    z_inner = 7 * vz
    half = np.sqrt(np.clip(rays.fov_radius_mm**2 - rays.s**2, 0.0, None))  # (N,)
    d = rays.axial_sampling / 2 * (1 - 1 / rays.num_axial_rays)  # (S,)
    reach = (np.abs(rays.m) + d)[:, None] + np.abs(rays.tan_theta) * half[None, :]  # (S, N), mm
    assert np.all(y[reach <= z_inner] == 0)
    far = reach > z_inner + vz + np.abs(rays.tan_theta) * VXY * math.sqrt(2)
    assert np.all(y[far] > 0)
    assert far[g.segment(0).num_axial_poss:].any()  # oblique rows reach them
    # segment 0: only the two end rows, with a quarter of the plane at +-16 mm
    n0 = g.segment(0).num_axial_poss
    assert np.all(y[1 : n0 - 1] == 0)
    inside = np.abs(rays.s) < rays.fov_radius_mm - VXY
    chord_ones = m_long.direct(torch.ones(long.shape, dtype=torch.float64))[0].numpy().transpose(0, 2, 1)
    # the end row's tube: planes 12, 14, 16 mm with 1/4, 1/2, 1/4 of the chord; only 16 mm is "extra"
    np.testing.assert_allclose(y[0][inside], 0.25 * chord_ones[0][inside], rtol=1e-12)
    np.testing.assert_allclose(y[n0 - 1][inside], 0.25 * chord_ones[n0 - 1][inside], rtol=1e-12)


def test_sirf_brain_example_planes_past_the_scanner(shared_data):
    """SIRF's brain/emission.hv (15 planes of 6.75 mm, 101 mm) on brain/template_sinogram.hs (6 rings,
    81 mm, segment 0 only): accepted; planes past |m| <= 33.75 mm (0, 1, 13, 14) are crossed by no LOR
    and contribute nothing; the rest projects as the image cropped to planes 2..12."""
    from sirf_fbsem.io.interfile import read_image, sinogram_geometry_from_header

    brain = shared_data / "sirf" / "examples" / "PET" / "brain"
    if not (brain / "emission.hv").exists():
        pytest.skip(f"{brain / 'emission.hv'} not present")
    image_geometry, x = read_image(brain / "emission.hv")
    sino = sinogram_geometry_from_header(brain / "template_sinogram.hs")
    assert image_geometry.shape == (15, 211, 211) and image_geometry.extent_past_scanner(sino)
    with pytest.warns(GeometryWarning, match="axial extent"):
        model = EmbeddedAcquisitionModel(sino, image_geometry, num_subsets=8)
    xt = torch.from_numpy(x)
    y = model.direct(xt, subset=0)
    bumped = xt.clone()
    bumped[[0, 1, 13, 14]] += 1.0
    torch.testing.assert_close(model.direct(bumped, subset=0), y, rtol=0, atol=0)
    cropped = ImageGeometry((11, 211, 211), image_geometry.voxel_size_mm, image_geometry.origin_mm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crop_model = EmbeddedAcquisitionModel(sino, cropped, num_subsets=8)
    torch.testing.assert_close(crop_model.direct(xt[2:13], subset=0), y, rtol=1e-6, atol=1e-6 * float(y.max()))
