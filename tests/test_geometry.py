"""Geometry follows STIR's ProjDataInfoCylindrical / VoxelsOnCartesianGrid conventions."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from sirf_fbsem.geometry import (
    GeometryError,
    GeometryWarning,
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
    with pytest.raises(GeometryError, match="voxel sizes"):
        ImageGeometry((10, 10, 10), (0.0, 1.0, 1.0))
    with pytest.raises(GeometryError, match="voxel sizes"):
        ImageGeometry((10, 10, 10), (2.0, math.inf, 1.0))
    with pytest.raises(GeometryError, match="origin"):
        ImageGeometry((10, 10, 10), (2.0, 1.0, 1.0), origin_mm=(0.0, math.nan, 0.0))
    with pytest.raises(GeometryError, match="unknown scanner"):
        scanner_preset("Nonexistent 9000")


def test_images_past_the_scanner_are_accepted_with_a_warning():
    """STIR projects images wider than the ring or longer than the scanner: a warning, never a refusal."""
    g = mmr()
    with pytest.warns(GeometryWarning, match="ring radius"):
        ImageGeometry((127, 400, 400), (2.03125, 2.0, 2.0)).check_fits(g)
    with pytest.warns(GeometryWarning, match="axial"):
        ImageGeometry((200, 100, 100), (2.03125, 2.0, 2.0)).check_fits(g)
    assert ImageGeometry((127, 400, 400), (2.03125, 2.0, 2.0)).extent_past_scanner(g)[0].startswith("reaches 400.0")
    assert g.default_image().extent_past_scanner(g) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.default_image().check_fits(g)  # the default image lies inside: silent


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
    x0, y0, z0 = img.first_voxel_physical_mm()
    assert z0 == pytest.approx(0.0)  # default image: first plane at the first ring
    assert img.first_voxel_gantry_mm(g.scanner) == pytest.approx((x0, y0, z0))
    assert x0 == pytest.approx(-142 * 2.08626)
    ras = a @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose(ras[:3], [-x0, -y0, -z0])
    ras = a @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(ras[:3], [-(x0 + 2.08626), -(y0 + 2 * 2.08626), -(z0 + 3 * 2.03125)])


# Expected NIfTI (RAS) affines, derived by hand from STIR rel_6.4.0's writer:
#   ITKOutputFileFormat::actual_write_to_file: ITK origin = get_LPS_coordinates_for_indices(min_indices),
#   direction column a = LPS step along index axis a (normalised), spacing = (vx, vy, vz);
#   get_physical_coordinates_for_indices(k, j, i) = origin + (k vz, j vy, i vx), min indices (0, -(ny//2), -(nx//2));
#   swap_axes_based_on_orientation: LPS = (x, y, -z) HFS, (-x, -y, -z) HFP, (-x, y, z) FFS, (x, -y, z) FFP;
#   NIfTI (ITK's writer, nibabel's reader): RAS = diag(-1, -1, 1) LPS.
# So with (x0, y0, z0) = (ox - (nx//2) vx, oy - (ny//2) vy, oz), HFS gives
#   [[-vx, 0, 0, -x0], [0, -vy, 0, -y0], [0, 0, -vz, -z0], [0, 0, 0, 1]].
STIR_NIFTI_AFFINES = {
    # mMR default image (127, 285, 285), (2.03125, 2.08626, 2.08626) mm, origin 0: x0 = y0 = -142 * 2.08626, z0 = 0
    "mmr_default_HFS": (
        ImageGeometry((127, 285, 285), (2.03125, 2.08626, 2.08626)), "HFS",
        [[-2.08626, 0, 0, 296.24892], [0, -2.08626, 0, 296.24892], [0, 0, -2.03125, 0], [0, 0, 0, 1]],
    ),
    # SIRF's brain/emission.hv: 15 planes of 6.75 mm on a 6-ring scanner (not the default extent);
    # first pixel offset (-105, -105, 0) = min index * voxel + origin, so origin 0, x0 = y0 = -105, z0 = 0.
    # (A scanner-centred placement would give z0 = -7 * 6.75 + 5 * 13.5 / 2 = -13.5: not what STIR writes.)
    "brain_emission_HFS": (
        ImageGeometry((15, 211, 211), (6.75, 1.0, 1.0)), "HFS",
        [[-1, 0, 0, 105], [0, -1, 0, 105], [0, 0, -6.75, 0], [0, 0, 0, 1]],
    ),
    # SIRF's mMR/mu_map.hv: 57 x 57 of 13.0391 mm (wider than the ring): x0 = y0 = -28 * 13.0391 = -365.0948
    "mmr_mu_map_HFS": (
        ImageGeometry((127, 57, 57), (2.03125, 13.0391, 13.0391)), "HFS",
        [[-13.0391, 0, 0, 365.0948], [0, -13.0391, 0, 365.0948], [0, 0, -2.03125, 0], [0, 0, 0, 1]],
    ),
    # (9, 16, 20), (2.5, 3.25, 2.0) mm, origin (z, y, x) = (5, -7.5, 12.25):
    # x0 = 12.25 - 10 * 2 = -7.75, y0 = -7.5 - 8 * 3.25 = -33.5, z0 = 5
    "offset_HFS": (
        ImageGeometry((9, 16, 20), (2.5, 3.25, 2.0), (5.0, -7.5, 12.25)), "HFS",
        [[-2, 0, 0, 7.75], [0, -3.25, 0, 33.5], [0, 0, -2.5, -5], [0, 0, 0, 1]],
    ),
    # HFP: LPS = (-x, -y, -z), RAS = (x, y, -z)
    "offset_HFP": (
        ImageGeometry((9, 16, 20), (2.5, 3.25, 2.0), (5.0, -7.5, 12.25)), "HFP",
        [[2, 0, 0, -7.75], [0, 3.25, 0, -33.5], [0, 0, -2.5, -5], [0, 0, 0, 1]],
    ),
    # FFS: LPS = (-x, y, z), RAS = (x, -y, z)
    "offset_FFS": (
        ImageGeometry((9, 16, 20), (2.5, 3.25, 2.0), (5.0, -7.5, 12.25)), "FFS",
        [[2, 0, 0, -7.75], [0, -3.25, 0, 33.5], [0, 0, 2.5, 5], [0, 0, 0, 1]],
    ),
    # FFP: LPS = (x, -y, z), RAS = (-x, y, z)
    "offset_FFP": (
        ImageGeometry((9, 16, 20), (2.5, 3.25, 2.0), (5.0, -7.5, 12.25)), "FFP",
        [[-2, 0, 0, 7.75], [0, 3.25, 0, -33.5], [0, 0, 2.5, 5], [0, 0, 0, 1]],
    ),
}


@pytest.mark.parametrize("case", sorted(STIR_NIFTI_AFFINES))
def test_nifti_affine_equals_stirs_itk_writer(case):
    geom, position, expected = STIR_NIFTI_AFFINES[case]
    np.testing.assert_allclose(geom.nifti_affine(scanner_preset("Siemens_mMR"), position), expected, atol=1e-9)
    np.testing.assert_allclose(geom.nifti_affine(patient_position=position), expected, atol=1e-9)


def test_physical_first_voxel_round_trip_and_default_image_frames_agree():
    geom = ImageGeometry((9, 16, 20), (2.5, 3.25, 2.0), (5.0, -7.5, 12.25))
    assert geom.first_voxel_physical_mm() == pytest.approx((-7.75, -33.5, 5.0))
    back = ImageGeometry.from_first_voxel_physical(geom.shape, geom.voxel_size_mm, geom.first_voxel_physical_mm())
    assert back.origin_mm == pytest.approx(geom.origin_mm)
    # for the default image, STIR's physical frame and the projector's gantry frame coincide
    g = mmr()
    img = g.default_image()
    np.testing.assert_allclose(img.first_voxel_physical_mm(), img.first_voxel_gantry_mm(g.scanner), atol=1e-9)
    # for another axial extent they differ: the projector centres the image axially
    short = ImageGeometry((63, 285, 285), img.voxel_size_mm)
    assert short.first_voxel_physical_mm()[2] == 0.0
    assert short.first_voxel_gantry_mm(g.scanner)[2] == pytest.approx(32 * 2.03125)


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


@pytest.mark.parametrize("restrict", [True, False])
def test_arccorrected_bins_beyond_the_ring_as_in_stir(restrict):
    """Arc-corrected data may reach |s| >= R (STIR's mMR arc-corrected template: 344 x 2.0445 mm).

    STIR accepts the geometry. Its FOV comes from the image, so for an image wider than the
    ring (here the default image) it traces segment-0 bins beyond the ring (tan theta = 0);
    in oblique segments tan theta is undefined there (STIR: sqrt of a negative number) and
    we leave those bins empty, with or without the cylindrical FOV. The projector stays an
    exact transpose.
    """
    import torch

    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel

    sc = scanner_preset("small_test")
    R = sc.effective_ring_radius_mm
    n = int(2 * math.ceil(1.1 * R / sc.default_bin_size_mm)) + 1
    g = SinogramGeometry.from_span(sc, span=3, max_ring_diff=4, arc_corrected=True, num_tangential_poss=n)
    beyond = np.abs(g.s_mm()) >= R
    assert beyond.any()
    assert np.isnan(g.tan_theta(1)[beyond]).all() and np.isfinite(g.tan_theta(1)[~beyond]).all()
    im = g.default_image()
    assert im.fov_radius_mm() > R
    with pytest.warns(GeometryWarning, match="ring radius"):
        model = EmbeddedAcquisitionModel(g, im, restrict_to_cylindrical_fov=restrict, dtype=torch.float64)
    x = torch.rand(im.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    y = model.direct(x)  # (T, S, V, N)
    assert torch.isfinite(y).all()
    seg0 = slice(0, g.segment(0).num_axial_poss)
    oblique = slice(g.segment(0).num_axial_poss, None)
    b = torch.from_numpy(beyond)
    assert torch.all(y[0, oblique][..., b] == 0)
    traced = b & torch.from_numpy(np.abs(g.s_mm()) < im.fov_radius_mm() - 1e-6)
    assert traced.any() and torch.all(y[0, seg0][..., traced] > 0)
    r = torch.rand(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lhs, rhs = float((y * r).sum()), float((x * model.adjoint(r)).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-6
    with pytest.raises(GeometryError, match="ring radius"):
        SinogramGeometry.from_span(sc, span=3, max_ring_diff=4, arc_corrected=False, num_tangential_poss=4 * n)


def test_subsets_follow_stirs_view_symmetries():
    """STIR's subsets (find_basic_vs_nums_in_subset): basic views b = s mod n with their symmetric views.

    Expected lists read off SIRF 3.10 / STIR 6.4 (AcquisitionModel.forward(x, s, 4) on recon_demo's
    64 views, square voxels: the 90-degree symmetries).
    """
    from sirf_fbsem.geometry import basic_views, stir_view_symmetry

    assert subset_views(64, 4, 1, "90").tolist() == [1, 5, 9, 13, 19, 23, 27, 31, 33, 37, 41, 45, 51, 55, 59, 63]
    assert subset_views(64, 4, 3, "90").tolist() == [3, 7, 11, 15, 17, 21, 25, 29, 35, 39, 43, 47, 49, 53, 57, 61]
    for sym, top in (("90", 16), ("180", 32)):
        b = basic_views(64, sym)
        assert b.max() == top and set(b.tolist()) == set(range(top + 1))
        for n in (1, 3, 4, 6, 8):
            views = np.concatenate([subset_views(64, n, s, sym) for s in range(n)])
            assert sorted(views.tolist()) == list(range(64))  # a partition
    assert subset_views(64, 4, 1, "none").tolist() == list(range(1, 64, 4))
    g = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=60)
    assert stir_view_symmetry(g, g.default_image()) == "90"
    shifted = ImageGeometry(g.default_image().shape, g.default_image().voxel_size_mm, (0.0, 5.0, 0.0))
    assert stir_view_symmetry(g, shifted) == "none"
    oblong = ImageGeometry((127, 100, 100), (2.03125, 2.0, 2.1))
    assert stir_view_symmetry(g, oblong) == "180"
    with pytest.raises(GeometryError, match="empty"):
        subset_views(64, 20, 19, "90")
