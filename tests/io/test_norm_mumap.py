"""ECAT8 normalisation, randoms from delayeds, and mu-maps (reading, units, resampling).

Expected normalisation values are computed bin by bin here from the raw norm.n
following STIR's BinNormalisationFromECAT8 (forward ring-pair -> bin mapping, not
the module's inverse one).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sirf_fbsem.geometry import GeometryError, ImageGeometry, SinogramGeometry, scanner_preset
from sirf_fbsem.io.ecat8_norm import NormError, read_ecat8_norm
from sirf_fbsem.io.listmode import det_pair_for_view_tangential
from sirf_fbsem.io.mumap import MuUnitsError, check_mu_units, read_mu_map, resample_to
from sirf_fbsem.io.randoms import additive_term, randoms_from_delayeds

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MMR_DIR = SHARED / "sirf" / "examples" / "PET" / "mMR"
NORM_HDR = MMR_DIR / "norm.n.hdr"
MU_HV = MMR_DIR / "mu_map.hv"
MMR = scanner_preset("Siemens_mMR")

needs_norm = pytest.mark.skipif(not NORM_HDR.is_file(), reason=f"{NORM_HDR} not present")
needs_mu = pytest.mark.skipif(not MU_HV.is_file(), reason=f"{MU_HV} not present")


@pytest.fixture(scope="module")
def norm():
    if not NORM_HDR.is_file():
        pytest.skip(f"{NORM_HDR} not present")
    return read_ecat8_norm(NORM_HDR)


@pytest.fixture(scope="module")
def eff11(norm):
    return norm.efficiency_sinogram(SinogramGeometry.from_span(MMR, span=11, max_ring_diff=60))


# ----------------------------------------------------------------------------- normalisation
def _raw_components():
    raw = np.fromfile(MMR_DIR / "norm.n", dtype="<f4")
    geo = raw[0:127 * 344].reshape(127, 344)
    ci = raw[174752 // 4: 174752 // 4 + 344 * 9].reshape(344, 9)
    eff_file = raw[187136 // 4: 187136 // 4 + 64 * 504].reshape(64, 504)
    ax = raw[316160 // 4: 316160 // 4 + 837]
    eff = np.empty_like(eff_file)  # STIR, mMR: efficiency_factors[r][c] = file[r][c-1], cyclic; then gaps
    for r in range(64):
        for c in range(504):
            eff[r, c] = eff_file[r, c - 1]
        for c in range(0, 504, 9):
            eff[r, c] = 0.0
    return geo, ci, eff, ax


def _forward_row(r1: int, r2: int, geometry: SinogramGeometry, ecat_order: bool = False):
    """(row, segment) of a ring pair, by STIR's get_segment_axial_pos_num_for_ring_pair; ECAT or SIRF order."""
    d = r2 - r1
    for s in geometry.segments:
        if s.min_ring_diff <= d <= s.max_ring_diff:
            inc = 2 if s.max_ring_diff != s.min_ring_diff else 1
            m_off = (s.num_axial_poss - 1) * (4.0625 / inc) / 2
            ax = (r1 + r2 - round(63 - 2 * m_off / 4.0625)) * inc // 2
            order = [0]
            for k in range(1, max(x.segment_num for x in geometry.segments) + 1):
                order += [-k, k] if ecat_order else [k, -k]
            row = 0
            for k in order:
                if k == s.segment_num:
                    return row + ax
                row += geometry.segment(k).num_axial_poss
    return None


def _reference_efficiency(geometry: SinogramGeometry, row: int, view: int, tidx: int) -> float:
    geo, ci, eff, ax = _raw_components()
    layout11 = SinogramGeometry.from_span(MMR, 11, 60)
    t = tidx - 172
    d1, d2 = det_pair_for_view_tangential(view, t, 504)
    total = 0.0
    for r1 in range(64):
        for r2 in range(64):
            if _forward_row(r1, r2, geometry) != row:
                continue
            sino = _forward_row(r1, r2, layout11, ecat_order=True)
            a = 1.0 if sino is None else float(ax[sino])
            total += float(eff[r1, int(d1)]) * float(eff[r2, int(d2)]) * float(geo[r1 + r2, tidx]) / a
    return total * float(ci[tidx, view % 9])


@needs_norm
def test_norm_loads_with_the_header_layout(norm):
    assert norm.geometric.shape == (127, 344) and norm.interference.shape == (344, 9)
    assert norm.crystal_efficiencies.shape == (64, 504) and norm.axial_effects.shape == (837,)
    assert (norm.norm_span, norm.norm_max_ring_diff) == (11, 60)
    assert norm.data_path.name == "norm.n"
    assert np.all(norm.crystal_efficiencies[:, ::9] == 0)  # gap crystal per block of 8 + 1
    assert np.all(np.delete(norm.crystal_efficiencies, np.s_[::9], axis=1) > 0)
    assert read_ecat8_norm(MMR_DIR / "norm.n").axial_effects.shape == (837,)  # the data file finds its header


@needs_norm
def test_span11_efficiencies_finite_positive_and_zero_in_gaps(eff11):
    assert eff11.shape == (1, 837, 252, 344) and eff11.dtype == np.float32
    assert np.all(np.isfinite(eff11))
    t = np.arange(344) - 172
    d1, d2 = det_pair_for_view_tangential(np.arange(252)[:, None], t[None, :], 504)
    gap = (d1 % 9 == 0) | (d2 % 9 == 0)  # (views, bins)
    assert 0.2 < gap.mean() < 0.22  # 1 - (8/9)^2 of the LORs
    assert np.all(eff11[0][:, gap] == 0)
    assert np.all(eff11[0][:, ~gap] > 0)


@needs_norm
@pytest.mark.parametrize("row, view, tidx", [(0, 0, 172), (63, 17, 10), (126, 251, 343), (127 + 30, 100, 200),
                                             (837 - 1, 5, 171), (127 + 115 + 57, 200, 90)])
def test_span11_efficiency_matches_stir_formula(eff11, row, view, tidx):
    g = SinogramGeometry.from_span(MMR, 11, 60)
    expected = _reference_efficiency(g, row, view, tidx)
    assert eff11[0, row, view, tidx] == pytest.approx(expected, rel=2e-6, abs=1e-12)


@needs_norm
def test_span1_efficiencies_sum_to_span11(norm, eff11):
    """A span-11 factor is STIR's sum over its ring pairs: the span-1 factors of those pairs, summed."""
    g1 = SinogramGeometry.from_span(MMR, span=1, max_ring_diff=5)
    e1 = norm.efficiency_sinogram(g1)
    assert e1.shape == (1, 64 + 2 * (63 + 62 + 61 + 60 + 59), 252, 344)
    g11 = SinogramGeometry.from_span(MMR, 11, 60)
    seg1, ax1 = g1.sinogram_index_table()
    summed = np.zeros((127, 252, 344))
    for row in range(seg1.size):
        d, a = int(seg1[row]), int(ax1[row])
        r1, r2 = (a, a + d) if d >= 0 else (a - d, a)
        summed[_forward_row(r1, r2, g11)] += e1[0, row]
    np.testing.assert_allclose(eff11[0, :127], summed, rtol=1e-5, atol=1e-7)
    # a geometry with fewer segments works too
    assert np.isfinite(norm.efficiency_sinogram(SinogramGeometry.from_span(MMR, 11, 16))).all()


def test_norm_errors_name_file_and_field(tmp_path):
    if not NORM_HDR.is_file():
        pytest.skip(f"{NORM_HDR} not present")
    text = NORM_HDR.read_text(encoding="latin-1")
    (tmp_path / "norm.n").write_bytes((MMR_DIR / "norm.n").read_bytes()[:1000])
    hdr = tmp_path / "norm.n.hdr"
    hdr.write_text(text)
    with pytest.raises(NormError) as err:
        read_ecat8_norm(hdr)
    assert "norm.n" in str(err.value) and "1,000 bytes" in str(err.value)
    hdr.write_text(text.replace("%matrix size [3]:={504,64}", "%matrix size [3]:={504,63}"))
    with pytest.raises(NormError, match=r"matrix size \[3\]"):
        read_ecat8_norm(hdr)
    (tmp_path / "norm.n").unlink()
    with pytest.raises(FileNotFoundError, match="name of data file"):
        read_ecat8_norm(hdr)


# ----------------------------------------------------------------------------- randoms
def _single_segment_geometry(num_axial: int = 5) -> SinogramGeometry:
    import dataclasses

    g = SinogramGeometry.from_span(MMR, 11, 60)
    seg0 = dataclasses.replace(g.segment(0), num_axial_poss=127)
    return SinogramGeometry(MMR, (seg0,), 252, 344, False, MMR.default_bin_size_mm)


def test_fan_sum_randoms_keep_totals_zero_gaps_and_reduce_noise(rng):
    g = _single_segment_geometry()
    singles = rng.uniform(0.5, 1.5, (127, 504))
    singles[:, ::9] = 0  # gaps
    t = g.tangential_pos_nums()
    d1, d2 = det_pair_for_view_tangential(np.arange(252)[:, None], t[None, :], 504)
    mean = (0.1 * singles[:, d1] * singles[:, d2])[None].astype(np.float32)
    delayeds = rng.poisson(mean).astype(np.float32)
    r = randoms_from_delayeds(delayeds, g)
    assert r.shape == delayeds.shape and r.dtype == np.float32
    np.testing.assert_allclose(r.sum(axis=(2, 3)), delayeds.sum(axis=(2, 3)), rtol=1e-4)
    gap = (d1 % 9 == 0) | (d2 % 9 == 0)
    assert np.all(r[0][:, gap] == 0)
    err_smooth = np.abs(r - mean).mean()
    err_raw = np.abs(delayeds - mean).mean()
    assert err_smooth < 0.2 * err_raw
    raw = randoms_from_delayeds(delayeds, g, smooth=False)
    np.testing.assert_array_equal(raw, delayeds)
    assert raw is not delayeds


def test_randoms_input_checks(rng):
    g = _single_segment_geometry()
    with pytest.raises(GeometryError, match="shape"):
        randoms_from_delayeds(np.zeros((1, 3, 252, 344), np.float32), g)
    with pytest.raises(ValueError, match="negative"):
        randoms_from_delayeds(-np.ones(g.shape, np.float32), g)
    mashed = SinogramGeometry.from_span(MMR, 11, 5, view_mash_factor=2)
    with pytest.raises(GeometryError, match="unmashed"):
        randoms_from_delayeds(np.zeros(mashed.shape, np.float32), mashed)
    r = rng.random((1, 2, 3, 4)).astype(np.float32)
    s = rng.random((1, 2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(additive_term(r, s), r + s)
    np.testing.assert_array_equal(additive_term(r), r)
    with pytest.raises(GeometryError):
        additive_term(r, s[:, :1])
    with pytest.raises(ValueError):
        additive_term(r, -s)


# ----------------------------------------------------------------------------- mu-maps
@needs_mu
def test_mu_map_loads_in_per_cm():
    geom, mu = read_mu_map(MU_HV)
    assert mu.shape == (127, 57, 57) and geom.shape == (127, 57, 57) and mu.dtype == np.float32
    assert geom.voxel_size_mm == pytest.approx((2.03125, 13.0391, 13.0391))
    assert mu.min() >= 0 and 0.08 < mu.max() <= 0.2  # water ~ 0.096 /cm
    with pytest.raises(MuUnitsError) as err:
        check_mu_units(mu * 10, MU_HV)
    assert str(MU_HV) in str(err.value) and "1/cm" in str(err.value) and "0.096" in str(err.value)
    with pytest.raises(ValueError):
        check_mu_units(mu * 1000 - 1000, MU_HV)  # Hounsfield-like


@needs_mu
def test_mu_map_times_ten_raises_on_read(tmp_path):
    from sirf_fbsem.io.interfile import write_image

    geom, mu = read_mu_map(MU_HV)
    path = tmp_path / "mu10.hv"
    write_image(path, geom, mu * 10)
    with pytest.raises(MuUnitsError, match="1/cm"):
        read_mu_map(path)
    g2, m2 = read_mu_map(path, check_units=False)
    np.testing.assert_allclose(m2, mu * 10, rtol=1e-6)


@needs_mu
def test_nifti_mu_map_round_trip_and_flipped_axes(tmp_path):
    nib = pytest.importorskip("nibabel")
    from sirf_fbsem.io.nifti import write_nifti

    geom, mu = read_mu_map(MU_HV)
    geom = ImageGeometry(geom.shape, geom.voxel_size_mm, origin_mm=(4.0, -6.5, 13.0))
    path = tmp_path / "mu.nii.gz"
    write_nifti(path, mu, geom, MMR)
    g2, m2 = read_mu_map(path)
    np.testing.assert_array_equal(m2, mu)
    assert g2.shape == geom.shape
    np.testing.assert_allclose(g2.voxel_size_mm, geom.voxel_size_mm, rtol=1e-6)
    np.testing.assert_allclose(g2.origin_mm, geom.origin_mm, atol=1e-3)
    # the same volume stored with x reversed (positive x step) reads back identically
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)[::-1]
    aff = img.affine.copy()
    aff[0, 3] = aff[0, 3] + aff[0, 0] * (data.shape[0] - 1)
    aff[0, 0] = -aff[0, 0]
    flipped = tmp_path / "flipped.nii"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), aff), str(flipped))
    g3, m3 = read_mu_map(flipped)
    np.testing.assert_array_equal(m3, mu)
    np.testing.assert_allclose(g3.origin_mm, geom.origin_mm, atol=1e-3)
    # rotated affines are refused
    rot = img.affine.copy()
    rot[0, 1] = 0.2
    bad = tmp_path / "rotated.nii"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), rot), str(bad))
    with pytest.raises(GeometryError, match="axis-aligned"):
        read_mu_map(bad)


@needs_mu
def test_resampling_onto_the_same_grid_is_the_identity():
    geom, mu = read_mu_map(MU_HV)
    np.testing.assert_array_equal(resample_to(mu, geom, geom, MMR), mu)


def _centroid_mm(img: np.ndarray, geom: ImageGeometry) -> np.ndarray:
    """Intensity-weighted gantry (z, y, x) of an image, mm."""
    x0, y0, z0 = geom.first_voxel_gantry_mm(MMR)
    vz, vy, vx = geom.voxel_size_mm
    nz, ny, nx = img.shape
    w = float(img.sum())
    z = ((z0 + np.arange(nz) * vz) * img.sum(axis=(1, 2))).sum() / w
    y = ((y0 + np.arange(ny) * vy) * img.sum(axis=(0, 2))).sum() / w
    x = ((x0 + np.arange(nx) * vx) * img.sum(axis=(0, 1))).sum() / w
    return np.array([z, y, x])


def test_resampling_a_shifted_grid_moves_features_by_the_right_mm():
    src = ImageGeometry((31, 40, 40), (2.0, 3.0, 3.0))
    mu = np.zeros(src.shape, np.float32)
    mu[14:17, 18:21, 22:25] = 0.1  # a small block, symmetric about voxel (15, 19, 23)
    c_src = _centroid_mm(mu, src)
    # same spacing, origin shifted by fractions of a voxel: the block keeps its gantry position
    for shift in [(0.0, 0.0, 1.5), (1.0, -0.75, 0.0), (0.5, 1.2, -2.1)]:
        tgt = ImageGeometry(src.shape, src.voxel_size_mm, origin_mm=shift)
        out = resample_to(mu, src, tgt, MMR)
        assert out.sum() == pytest.approx(mu.sum(), rel=1e-5)
        np.testing.assert_allclose(_centroid_mm(out, tgt), c_src, atol=1e-4)
    # an integer-voxel x shift moves the array by exactly that many voxels
    tgt = ImageGeometry(src.shape, src.voxel_size_mm, origin_mm=(0.0, 0.0, 6.0))  # +2 voxels in x
    out = resample_to(mu, src, tgt, MMR)
    np.testing.assert_array_equal(out[:, :, :-2], mu[:, :, 2:])
    # finer target grid: same physical centroid
    fine = ImageGeometry((61, 80, 80), (1.0, 1.5, 1.5))
    out = resample_to(mu, src, fine, MMR)
    np.testing.assert_allclose(_centroid_mm(out, fine), c_src, atol=1e-3)


def test_resample_checks_shapes():
    g = ImageGeometry((3, 4, 4), (2.0, 2.0, 2.0))
    with pytest.raises(GeometryError, match="shape"):
        resample_to(np.zeros((3, 4, 5)), g, g, MMR)


def test_mu_map_unknown_format(tmp_path):
    p = tmp_path / "mu.raw"
    p.write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="unknown format"):
        read_mu_map(p)
    assert sorted(os.listdir(tmp_path)) == ["mu.raw"]
