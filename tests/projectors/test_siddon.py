"""The embedded projector's Siddon mode (``ray_tracing="siddon"``): STIR's ray-tracing matrix, row for row.

Without SIRF: the adjoint identity, analytic intersection lengths, agreement with the Joseph
mode on smooth images, determinism and how the option travels with copies. With SIRF
(``-m sirf``; skipped when ``sirf.STIR`` does not import): single matrix rows against
STIR's (one-hot back projections through SIRF's ``AcquisitionModelUsingRayTracingMatrix``),
forward projections of SIRF's examples, and OSEM of STIR's recon_demo against SIRF's
``OSMAPOSLReconstructor``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_span3, tiny_image, tiny_scanner_geometry
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
from sirf_fbsem.projectors.factory import sirf_available
from sirf_fbsem.projectors.siddon_numba import basic_bin_and_symmetry, make_siddon_plan, row_elements

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PET_EXAMPLES = SHARED / "sirf" / "examples" / "PET"
SMALLLONG = SHARED / "stir" / "examples" / "recon_demo" / "smalllong.hs"


def _model(arc=False, **kw):
    g = tiny_scanner_geometry(arc_corrected=arc)
    kw.setdefault("dtype", torch.float64)
    return EmbeddedAcquisitionModel(g, tiny_image(g), ray_tracing="siddon", **kw)


def _rel_dot_mismatch(model, subset, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(model.image_shape, generator=gen, dtype=model.dtype)
    y = torch.rand(model.subset_sinogram_shape(subset), generator=gen, dtype=model.dtype)
    lhs = float((model.direct(x, subset).double() * y.double()).sum())
    rhs = float((x.double() * model.adjoint(y, subset).double()).sum())
    return abs(lhs - rhs) / abs(lhs)


# ----------------------------------------------------------------------------- without SIRF


@pytest.mark.parametrize("arc", [False, True])
@pytest.mark.parametrize("subset", [None, 1])
@pytest.mark.parametrize("num_tangential_LORs", [1, 2])
def test_adjoint_identity(arc, subset, num_tangential_LORs):
    model = _model(arc=arc, num_subsets=3, num_tangential_LORs=num_tangential_LORs)
    # the same weights in both directions: float64 rounding only
    assert _rel_dot_mismatch(model, subset) < 1e-12


def test_adjoint_identity_square_fov_factors_psf():
    g = tiny_scanner_geometry()
    mult = np.random.default_rng(0).uniform(0.2, 1.0, g.shape)
    model = EmbeddedAcquisitionModel(g, tiny_image(g), ray_tracing="siddon", restrict_to_cylindrical_fov=False,
                                     multiplicative=mult, psf_fwhm_mm=4.0, num_subsets=2, dtype=torch.float64)
    assert _rel_dot_mismatch(model, 0) < 1e-12


def test_subsets_are_the_full_projection_restricted():
    model = _model(num_subsets=4)
    x = torch.rand(model.image_shape, dtype=torch.float64)
    full = model.direct(x)
    for s in range(4):
        np.testing.assert_array_equal(model.direct(x, s).numpy(), model.take_subset(full, s).numpy())


def test_deterministic():
    model = _model()
    y = torch.rand(model.sinogram_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = model.adjoint(y).numpy()
    b = model.adjoint(y).numpy()
    np.testing.assert_array_equal(a, b)


def test_ray_along_an_axis_through_a_uniform_image():
    """View 0 is a line along y: through ones it gives the number of voxels it crosses, end voxels whole.

    STIR's tracer runs from the entry of the voxel holding one end point (on the FOV circle)
    to the exit of the voxel holding the other, so the central ray of the 15 x 15 image
    (FOV radius 7 voxels) crosses 15 whole voxels: 15 x vy / vx = 15 in pixel units.
    """
    model = _model(arc=True)
    y = model.direct(torch.ones(model.image_shape, dtype=torch.float64))[0]
    sino = model.sinogram_geometry
    seg0 = slice(0, sino.segment(0).num_axial_poss)
    centre = sino.num_tangential_poss // 2  # s = 0
    np.testing.assert_allclose(y[seg0, 0, centre].numpy(), 15.0, rtol=1e-12)
    # |s| = 5 mm = one voxel: the line x = 1 voxel crosses 2 * floor(sqrt(49 - 1) + 0.5) + 1 = 15 voxels too
    np.testing.assert_allclose(y[seg0, 0, centre + 1].numpy(), 15.0, rtol=1e-12)


def test_ray_through_one_voxels_diagonal():
    """The 45-degree ray through the centre voxel crosses it along its diagonal: sqrt(2) vx / vx."""
    model = _model()
    sino = model.sinogram_geometry
    x = torch.zeros(model.image_shape, dtype=torch.float64)
    nz, ny, nx = model.image_shape
    k = nz // 2
    x[k, ny // 2, nx // 2] = 1.0
    y = model.direct(x)[0]
    v45 = sino.num_views // 4
    centre = sino.num_tangential_poss // 2
    z_planes = model.image_geometry.centred_coordinates_mm()[0]
    row = int(np.argmin(np.abs(sino.m_mm(0) - z_planes[k])))  # the direct row through plane k
    assert float(y[row, v45, centre]) == pytest.approx(math.sqrt(2.0), rel=1e-5)
    # the element is the whole row's only contribution from that voxel: its row holds it once
    plan = model.siddon_plan(None)
    el = row_elements(plan, row, v45, centre)
    at = el[(el[:, 0] == k) & (el[:, 1] == 0) & (el[:, 2] == 0)]
    assert at.shape[0] == 1 and at[0, 3] == pytest.approx(math.sqrt(2.0), rel=1e-5)


def test_row_sums_are_chord_lengths_in_pixel_units():
    """A direct row's elements sum to its traced length / vx (end voxels whole), whatever the z spread."""
    model = _model(arc=True)
    plan = model.siddon_plan(None)
    el = row_elements(plan, 0, 0, model.sinogram_geometry.num_tangential_poss // 2)
    assert el[:, 3].sum() == pytest.approx(15.0, rel=1e-12)
    assert set(el[:, 2].astype(int)) == {0} and el[:, 1].min() == -7 and el[:, 1].max() == 7


def test_agrees_with_joseph_on_a_smooth_image():
    """Siddon (box) and Joseph (linear interpolation) integrate the same lines of a smooth image.

    For a Gaussian of standard deviation sigma, the two kernels differ by a blur of about a
    voxel across the ray: the relative difference is of order (vx / sigma)^2 / 12, about
    0.5% for sigma = 4 voxels; end voxels at the FOV edge add nothing where the image is ~0.
    Measured 0.2% (small test scanner, span 3): the bound is 1%.
    """
    g = small_span3()
    img = g.default_image()
    z, yy, xx = img.centred_coordinates_mm()
    sigma = 4 * img.voxel_size_mm[2]
    x = np.exp(-(yy[:, None] ** 2 + (xx[None, :] - 10.0) ** 2) / (2 * sigma**2))[None] * np.ones(img.shape[0])[:, None, None]
    x = torch.from_numpy(x)
    out = {}
    for mode in ("joseph", "siddon"):
        model = EmbeddedAcquisitionModel(g, img, ray_tracing=mode, dtype=torch.float64)
        out[mode] = model.direct(x).numpy()
    rel = np.linalg.norm(out["siddon"] - out["joseph"]) / np.linalg.norm(out["joseph"])
    assert rel < 0.01, rel
    assert out["siddon"].sum() / out["joseph"].sum() == pytest.approx(1.0, abs=2e-3)


def test_option_travels_with_copies_and_is_checked():
    model = _model(num_subsets=2)
    assert model.with_terms(additive=np.ones(model.sinogram_shape)).ray_tracing == "siddon"
    assert model.with_num_subsets(4).ray_tracing == "siddon"
    m32 = model.to(dtype=torch.float32)
    assert m32.ray_tracing == "siddon" and m32.dtype == torch.float32
    x = torch.rand(model.image_shape, dtype=torch.float64)
    np.testing.assert_allclose(m32.direct(x.float(), 1).numpy(), model.direct(x, 1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.with_num_subsets(4).direct(x, 0).numpy(),
                                  _model(num_subsets=4).direct(x, 0).numpy())
    assert "ray_tracing=siddon" in repr(model)
    with pytest.raises(ValueError, match="ray_tracing"):
        model.to("cuda")
    g = tiny_scanner_geometry()
    with pytest.raises(ValueError, match="ray_tracing='siddon'"):
        EmbeddedAcquisitionModel(g, tiny_image(g), ray_tracing="siddon", device="cuda")
    with pytest.raises(ValueError, match="ray_tracing='siddon'"):
        EmbeddedAcquisitionModel(g, tiny_image(g), ray_tracing="siddon", backend="torch")
    with pytest.raises(ValueError, match="ray_tracing must be one of"):
        EmbeddedAcquisitionModel(g, tiny_image(g), ray_tracing="parallelproj")
    assert EmbeddedAcquisitionModel(g, tiny_image(g)).ray_tracing == "joseph"


def test_symmetry_table_maps_basic_bins_back():
    """Every bin's basic bin lies in STIR's basic range, and each in-plane map is a signed permutation."""
    V = 24
    for seg in (-1, 0, 1):
        for v in range(V):
            for t in (-3, 0, 2):
                bseg, bview, btang, op, zq = basic_bin_and_symmetry(seg, v, t, V, "90")
                assert bseg == abs(seg) and btang == abs(t) and 0 <= bview <= V // 4
                assert zq in (True, False)
    plan = make_siddon_plan(tiny_scanner_geometry(), tiny_image(tiny_scanner_geometry()))
    assert np.all(np.abs(np.linalg.det(plan.t_op.reshape(-1, 2, 2))) == 1)
    # every bin of the sinogram is filled exactly once
    filled = np.zeros(plan.sinogram_shape, dtype=int)
    for j in range(plan.t_row0.shape[0]):
        filled[plan.t_row0[j]:plan.t_row0[j] + plan.t_nax[j], plan.t_view[j], plan.t_tang[j]] += 1
    assert np.all(filled == 1)


# ----------------------------------------------------------------------------- with SIRF



@pytest.fixture(scope="module")
def pet():
    if not sirf_available():
        pytest.skip("sirf.STIR does not import here")
    import sirf.STIR as pet

    pet.set_verbosity(0)
    pet.MessageRedirector(info=None, warn=None)
    pet.AcquisitionData.set_storage_scheme("memory")
    return pet


def _rows_against_stir(pet, sino, img, num_tangential_LORs):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "pipelines"))
    from compare_sirf_osem import compare_rows, row_bins

    return compare_rows(pet, sino, img, num_tangential_LORs, row_bins(sino))


@pytest.mark.sirf
@pytest.mark.skipif(not sirf_available(), reason="sirf.STIR does not import here")
@pytest.mark.parametrize("num_tangential_LORs", [1, 2])
def test_rows_equal_stirs_oblique_segments(pet, num_tangential_LORs):
    """Rows of direct and oblique bins, edge and central tangential positions, views around 0/45/90/135
    degrees: STIR's float32 rows to 1e-4 of the row maximum (measured <= 4e-6)."""
    g = tiny_scanner_geometry()
    res = _rows_against_stir(pet, g, tiny_image(g), num_tangential_LORs)
    assert res["worst_max_abs_diff_over_row_max"] <= 1e-4, res


@pytest.mark.sirf
@pytest.mark.skipif(not sirf_available(), reason="sirf.STIR does not import here")
@pytest.mark.parametrize("num_tangential_LORs", [1, 2])
def test_rows_equal_stirs_recon_demo(pet, num_tangential_LORs):
    """STIR's recon_demo geometry (arc-corrected, span 17): rows to 1e-4 of their maximum (measured <= 5e-5)."""
    from sirf_fbsem.io.interfile import read_projdata
    from sirf_fbsem.projectors.sirf import image_geometry_from_sirf

    if not SMALLLONG.is_file():
        pytest.skip(f"{SMALLLONG} not present")
    geom, _ = read_projdata(SMALLLONG, allow_negative=True)
    img = image_geometry_from_sirf(pet.AcquisitionData(str(SMALLLONG)).create_uniform_image(1.0))
    res = _rows_against_stir(pet, geom, img, num_tangential_LORs)
    assert res["worst_max_abs_diff_over_row_max"] <= 1e-4, res


@pytest.mark.sirf
@pytest.mark.skipif(not sirf_available(), reason="sirf.STIR does not import here")
@pytest.mark.parametrize("example", ["brain", "thorax_single_slice"])
def test_sirf_examples_forward_projection(pet, example):
    """SIRF's examples with their own images: relative L2 <= 1e-4 (measured ~2e-6), sums to 1e-5."""
    from sirf_fbsem.io.interfile import read_image, sinogram_geometry_from_header
    from sirf_fbsem.projectors.sirf import sirf_templates

    folder = PET_EXAMPLES / example
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    geom, emission = read_image(folder / "emission.hv")
    sino = sinogram_geometry_from_header(folder / "template_sinogram.hs")
    acq, image = sirf_templates(sino, geom)
    x = np.asarray(emission, dtype=np.float32)
    image.fill(x)
    am = pet.AcquisitionModelUsingRayTracingMatrix()
    am.set_num_tangential_LORs(1)
    am.set_up(acq, image)
    theirs = np.asarray(am.forward(image).as_array()[0], dtype=np.float64)
    ours = EmbeddedAcquisitionModel(sino, geom, ray_tracing="siddon").direct(torch.from_numpy(x))[0].numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= 1e-4
    assert ours.sum() / theirs.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.sirf
@pytest.mark.slow
@pytest.mark.skipif(not sirf_available(), reason="sirf.STIR does not import here")
def test_mmr_span11_every_bin(pet):
    """Siemens mMR span 11 (72.6 M bins): every bin's row applied to a random image, as SIRF's
    (max |difference| <= 1e-4 of the maximum; measured 3e-5, relative L2 2e-6). About 1.5 minutes."""
    from sirf_fbsem.projectors.sirf import image_geometry_from_sirf, sinogram_geometry_from_sirf

    acq = pet.AcquisitionData("Siemens_mMR", span=11, max_ring_diff=60)
    image = acq.create_uniform_image(0.0, xy=128)
    x = np.random.default_rng(0).random(tuple(image.dimensions())).astype(np.float32)
    image.fill(x)
    am = pet.AcquisitionModelUsingRayTracingMatrix()
    am.set_num_tangential_LORs(1)
    am.set_up(acq, image)
    theirs = np.asarray(am.forward(image).as_array()[0], dtype=np.float64)
    model = EmbeddedAcquisitionModel(sinogram_geometry_from_sirf(acq), image_geometry_from_sirf(image),
                                     ray_tracing="siddon")
    ours = model.direct(torch.from_numpy(x))[0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * theirs.max()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= 1e-5


@pytest.mark.sirf
@pytest.mark.skipif(not sirf_available(), reason="sirf.STIR does not import here")
def test_osem_of_recon_demo_equals_osmaposl(pet):
    """OSEM 4 subsets x 4 iterations of recon_demo's smalllong.hs: Siddon mode vs SIRF's OSMAPOSL voxel by
    voxel, NRMSE inside the FOV <= 2% and scale within 0.1% (measured 1.3e-6 and 2e-7; the Joseph mode: 6%)."""
    from sirf_fbsem.io.interfile import read_projdata
    from sirf_fbsem.projectors.sirf import image_geometry_from_sirf
    from sirf_fbsem.recon.engine import EMUpdate, fov_mask, reconstruct

    if not SMALLLONG.is_file():
        pytest.skip(f"{SMALLLONG} not present")
    geom, prompts = read_projdata(SMALLLONG, allow_negative=True)
    prompts = np.maximum(prompts, 0)
    acq = pet.AcquisitionData(str(SMALLLONG))
    data = acq.get_uniform_copy(0.0)
    data.fill(prompts.reshape(data.shape))
    image = data.create_uniform_image(1.0)
    img = image_geometry_from_sirf(image)
    am = pet.AcquisitionModelUsingRayTracingMatrix()
    am.set_num_tangential_LORs(1)
    recon = pet.OSMAPOSLReconstructor()
    recon.set_objective_function(pet.make_Poisson_loglikelihood(data, acq_model=am))
    recon.set_num_subsets(4)
    recon.set_num_subiterations(16)
    recon.set_up(image)
    recon.set_current_estimate(image)
    recon.process()
    theirs = np.asarray(recon.get_output().as_array(), dtype=np.float64)
    model = EmbeddedAcquisitionModel(geom, img, num_subsets=4, ray_tracing="siddon")
    ours = reconstruct(model, torch.from_numpy(prompts), EMUpdate(), 16).numpy().astype(np.float64)
    inside = fov_mask(img).numpy()
    nrmse = np.linalg.norm(ours[inside] - theirs[inside]) / np.linalg.norm(theirs[inside])
    assert nrmse <= 0.02, nrmse
    assert ours[inside].sum() / theirs[inside].sum() == pytest.approx(1.0, abs=1e-3)


def test_auto_is_siddon_where_it_runs_and_joseph_elsewhere():
    from dataclasses import replace

    from sirf_fbsem.projectors.embedded import _resolve_ray_tracing

    sino, img = tiny_scanner_geometry(), None
    img = sino.default_image()
    assert EmbeddedAcquisitionModel(sino, img, ray_tracing="auto").ray_tracing == "siddon"
    assert EmbeddedAcquisitionModel(sino, img).ray_tracing == "joseph"  # the default the bundled model knows
    assert _resolve_ray_tracing("auto", sino, img, torch.device("cuda"), "auto") == "joseph"
    assert _resolve_ray_tracing("auto", sino, img, torch.device("cpu"), "torch") == "joseph"
    shifted = replace(img, origin_mm=(img.origin_mm[0], 2.0, 0.0))  # Siddon (as STIR) needs no x/y shift
    assert _resolve_ray_tracing("auto", sino, shifted, torch.device("cpu"), "auto") == "joseph"
    with pytest.raises(ValueError, match="ray_tracing"):
        EmbeddedAcquisitionModel(sino, img, ray_tracing="exact")
