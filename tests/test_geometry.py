"""Geometry follows STIR's ProjDataInfoCylindrical / VoxelsOnCartesianGrid conventions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sirf_fbsem.geometry import (
    GeometryError,
    ImageGeometry,
    SinogramGeometry,
    geometry_mismatch,
    image_geometry_from_dict,
    image_geometry_to_dict,
    scanner_preset,
    sinogram_geometry_from_dict,
    sinogram_geometry_to_dict,
    subset_views,
)


def mmr(span=11):
    return SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=span, max_ring_diff=60)


def test_mmr_span11_layout():
    g = mmr()
    assert g.shape == (1, 837, 252, 344)
    assert [s.num_axial_poss for s in g.segments] == [27, 49, 71, 93, 115, 127, 115, 93, 71, 49, 27]
    assert [s.min_ring_diff for s in g.segments] == [-60, -49, -38, -27, -16, -5, 6, 17, 28, 39, 50]
    assert g.sirf_segment_order() == [0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5]
    seg, ax = g.sinogram_index_table()
    assert seg[:127].tolist() == [0] * 127 and seg[127] == 1 and seg[127 + 115] == -1
    assert ax[127] == 0 and g.sirf_row_offset(-1) == 127 + 115


def test_mmr_span1_layout():
    g = mmr(span=1)
    # all 64x64 ring pairs except ring differences 61..63 (3+2+1 pairs each sign)
    assert len(g.segments) == 121 and g.num_sinograms == 64 * 64 - 2 * (3 + 2 + 1)
    assert g.segment(60).num_axial_poss == 4 and g.segment(-3).num_axial_poss == 61


def test_default_image_matches_sirf():
    img = mmr().default_image()
    assert img.shape == (127, 285, 285)
    assert img.voxel_size_mm == pytest.approx((2.03125, 2.08626, 2.08626))


def test_non_arccorrected_s_uses_detector_angles():
    g = mmr()
    R = 328.0 + 7.0
    t = g.tangential_pos_nums()
    assert t[0] == -172 and t[-1] == 171
    np.testing.assert_allclose(g.s_mm(), R * np.sin(t * math.pi / 504))


def test_arccorrected_s_is_linear():
    g = SinogramGeometry.from_span(scanner_preset("small_test"), span=3, max_ring_diff=4, arc_corrected=True)
    np.testing.assert_allclose(np.diff(g.s_mm()), 4.0)
    assert g.s_mm()[g.num_tangential_poss // 2] == 0.0


def test_m_is_centred_and_matches_ring_pairs():
    g = mmr()
    # segment +1 of span 11: ring differences 6..16, axial position a has ring1+ring2 = 6 + a
    m = g.m_mm(1)
    rs = 4.0625
    z_mid_gantry = m + 63 * rs / 2
    np.testing.assert_allclose(z_mid_gantry, (6 + np.arange(115)) * rs / 2)
    np.testing.assert_allclose(g.m_mm(0), -g.m_mm(0)[::-1])


def test_tan_theta_formula():
    g = mmr()
    s = g.s_mm()
    R = 335.0
    np.testing.assert_allclose(g.tan_theta(2), 22 * 4.0625 / (2 * np.sqrt(R * R - s * s)))
    assert np.all(g.tan_theta(0) == 0)


def test_view_offset_and_mashing():
    g = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=60, view_mash_factor=2)
    assert g.num_views == 126
    # STIR adds pi/(n_det/2) * (mash-1)/2 for mashed views
    assert g.phi_rad()[0] == pytest.approx(math.pi / 252 * 0.5)
    assert g.phi_rad()[1] - g.phi_rad()[0] == pytest.approx(math.pi / 126)


def test_subsets_partition_views():
    views = [subset_views(252, 6, s) for s in range(6)]
    allv = np.sort(np.concatenate(views))
    np.testing.assert_array_equal(allv, np.arange(252))
    assert views[2][:3].tolist() == [2, 8, 14]
    with pytest.raises(GeometryError, match="num_subsets"):
        subset_views(10, 11, 0)


def test_bad_span_and_image_errors():
    with pytest.raises(GeometryError, match="multiple of span"):
        SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=59)
    g = mmr()
    with pytest.raises(GeometryError, match="ring radius"):
        ImageGeometry((127, 400, 400), (2.03125, 2.0, 2.0)).check_fits(g)
    with pytest.raises(GeometryError, match="axial"):
        ImageGeometry((200, 100, 100), (2.03125, 2.0, 2.0)).check_fits(g)
    with pytest.raises(GeometryError, match="voxel sizes"):
        ImageGeometry((10, 10, 10), (0.0, 1.0, 1.0))
    with pytest.raises(GeometryError, match="unknown scanner"):
        scanner_preset("Nonexistent 9000")


def test_serialisation_round_trip_and_mismatch():
    g = mmr()
    assert sinogram_geometry_from_dict(sinogram_geometry_to_dict(g)) == g
    img = g.default_image()
    assert image_geometry_from_dict(image_geometry_to_dict(img)) == img
    assert geometry_mismatch(g, g) == []
    diffs = geometry_mismatch(g, mmr(span=1))
    assert any("segments" in d for d in diffs)


def test_nifti_affine_hfs_places_first_voxel():
    g = mmr()
    img = g.default_image()
    a = img.nifti_affine(g.scanner)
    x0, y0, z0 = img.first_voxel_gantry_mm(g.scanner)
    assert z0 == pytest.approx(0.0)  # default image: first plane at the first ring
    assert x0 == pytest.approx(-142 * 2.08626)
    ras = a @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(ras[:3], [-x0, -y0, -z0])
    ras = a @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(ras[:3], [-(x0 + 2.08626), -(y0 + 2 * 2.08626), -(z0 + 3 * 2.03125)])


@pytest.mark.parametrize("shape_yx", [(31, 31), (32, 32), (30, 33)])
def test_cylindrical_fov_cuts_lors_as_stir(shape_yx):
    """STIR's ray tracer traces a LOR only when |s| <= min(max index, -min index) * voxel size.

    A uniform image projects to zero on every bin outside that radius and to a positive
    line integral on every bin inside it (odd and even image sizes).
    """
    import torch

    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel

    g = SinogramGeometry.from_span(scanner_preset("small_test"), span=1, max_ring_diff=0, arc_corrected=True,
                                   num_tangential_poss=61)
    shape = (2 * g.scanner.num_rings - 1, *shape_yx)  # every plane of segment 0
    im = ImageGeometry(shape=shape, voxel_size_mm=(g.scanner.ring_spacing_mm / 2, 4.0, 4.0))
    ny, nx = shape_yx
    expected = 4.0 * min(ny // 2, ny - 1 - ny // 2, nx // 2, nx - 1 - nx // 2)
    assert im.fov_radius_mm() == pytest.approx(expected)
    y = EmbeddedAcquisitionModel(g, im).direct(torch.ones(shape, dtype=torch.float64))[0, 0]
    s = np.abs(g.s_mm())
    outside = s > expected + 1e-6
    inside = s < expected - 1e-6
    assert outside.any() and inside.any()
    assert torch.all(y[:, torch.from_numpy(outside)] == 0)
    assert torch.all(y[:, torch.from_numpy(inside)] > 0)


def test_arccorrected_bins_beyond_the_ring_are_empty_as_in_stir():
    """Arc-corrected data may reach |s| >= R (STIR's mMR arc-corrected template: 344 x 2.0445 mm).

    STIR accepts the geometry and its ray tracer leaves those bins empty; so do we, and the
    projector stays an exact transpose. Without the cylindrical FOV there is no LOR to trace:
    a clear error.
    """
    import torch

    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
    from sirf_fbsem.projectors.rays import make_ray_table

    sc = scanner_preset("small_test")
    R = sc.effective_ring_radius_mm
    n = int(2 * math.ceil(1.1 * R / sc.default_bin_size_mm)) + 1
    g = SinogramGeometry.from_span(sc, span=3, max_ring_diff=4, arc_corrected=True, num_tangential_poss=n)
    beyond = np.abs(g.s_mm()) >= R
    assert beyond.any()
    assert np.isnan(g.tan_theta(1)[beyond]).all() and np.isfinite(g.tan_theta(1)[~beyond]).all()
    # STIR's default image for such data reaches beyond the ring too, where STIR's tan(theta) is NaN;
    # check_fits refuses it (test_bad_span_and_image_errors), so use an image inside the ring.
    with pytest.raises(GeometryError, match="ring radius"):
        g.default_image().check_fits(g)
    im = ImageGeometry(shape=(15, 61, 61), voxel_size_mm=(sc.ring_spacing_mm / 2, 4.0, 4.0))
    model = EmbeddedAcquisitionModel(g, im)
    x = torch.rand(im.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = model.direct(x)
    assert torch.isfinite(y).all()
    assert torch.all(y[..., torch.from_numpy(beyond)] == 0) and y.sum() > 0
    r = torch.rand(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lhs, rhs = float((y * r).sum()), float((x * model.adjoint(r)).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-6
    with pytest.raises(GeometryError, match="ring radius"):
        make_ray_table(g, im, restrict_to_cylindrical_fov=False)
    with pytest.raises(GeometryError, match="ring radius"):
        SinogramGeometry.from_span(sc, span=3, max_ring_diff=4, arc_corrected=False, num_tangential_poss=4 * n)
