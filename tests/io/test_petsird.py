"""PETSIRD listmode: files written with petsird's own writer, read back and histogrammed.

Expected values are independent of the reader: counts are those written; each count's
bin is checked against the geometry's LOR formula (phi, s, m, tan(theta), DESIGN.md), not
against the detector-pair -> bin function the reader uses; a span-1 sinogram sampled
from a phantom's forward projection goes to detector pairs and back unchanged.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

petsird = pytest.importorskip("petsird", reason="the PETSIRD tests need the 'petsird' package (pip install petsird)")

from sirf_fbsem.geometry import GeometryError, Scanner, SinogramGeometry, scanner_preset  # noqa: E402
from sirf_fbsem.io import listmode as lm  # noqa: E402
from sirf_fbsem.io import petsird as pio  # noqa: E402

SMALL = scanner_preset("small_test")
# a made-up scanner that is no preset, with an intrinsic tilt of a third of a crystal
TILTED = Scanner(
    name="tilted", num_rings=5, num_detectors_per_ring=64, inner_ring_radius_mm=90.0,
    average_depth_of_interaction_mm=6.0, ring_spacing_mm=3.3, default_bin_size_mm=0.0,
    view_offset_deg=360.0 / 64 / 3, max_num_non_arccorrected_bins=32, default_num_arccorrected_bins=32,
)
BLOCK_MS = 1000
NUM_BLOCKS = 5


def random_pairs(rng: np.random.Generator, scanner: Scanner, k: int, max_tang: int) -> np.ndarray:
    """(k, 4) ``(ring1, det1, ring2, det2)`` with detectors roughly opposite (|tangential position| < max_tang)."""
    n = scanner.num_detectors_per_ring
    r = rng.integers(0, scanner.num_rings, (k, 2))
    d1 = rng.integers(0, n, k)
    d2 = (d1 + n // 2 + rng.integers(-max_tang, max_tang + 1, k)) % n
    return np.stack([r[:, 0], d1, r[:, 1], d2], axis=1)


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> dict:
    """A small_test file: 5 blocks of 1 s, prompts and delayeds, permuted modules, 2 energy and 3 TOF bins."""
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("petsird")
    blocks = [
        pio.PetsirdTimeBlock(i * BLOCK_MS, (i + 1) * BLOCK_MS, random_pairs(rng, SMALL, 400 + 100 * i, 20),
                             random_pairs(rng, SMALL, 50 + 10 * i, 20))
        for i in range(NUM_BLOCKS)
    ]
    path = pio.write_petsird(folder / "scan.petsird", SMALL, blocks, num_energy_bins=2, num_tof_bins=3,
                             module_order=rng.permutation(SMALL.num_detectors_per_ring))
    return {"path": path, "blocks": blocks, "folder": folder}


def span1(scanner: Scanner) -> SinogramGeometry:
    return SinogramGeometry.from_span(scanner, span=1)


# ----------------------------------------------------------------------------- scanner geometry
def test_scanner_reads_back_as_the_preset(scan):
    header, ps = pio.read_petsird_header(scan["path"])
    assert ps.preset == "small_test" and ps.scanner == SMALL
    assert (ps.num_energy_bins, ps.num_tof_bins) == (2, 3)
    # every crystal has its own (ring, detector), and all 8 x 96 positions are there
    keys = ps.crystal_ring * SMALL.num_detectors_per_ring + ps.crystal_det
    assert sorted(keys.tolist()) == list(range(SMALL.num_rings * SMALL.num_detectors_per_ring))
    # without preset matching the derived numbers are the preset's own
    _, raw = pio.read_petsird_header(scan["path"], match_presets=False)
    sc = raw.scanner
    assert (sc.num_rings, sc.num_detectors_per_ring) == (8, 96)
    assert sc.inner_ring_radius_mm == pytest.approx(120.0, abs=1e-3)
    assert sc.average_depth_of_interaction_mm == pytest.approx(5.0, abs=1e-3)
    assert sc.ring_spacing_mm == pytest.approx(4.0, abs=1e-4)
    assert sc.view_offset_deg == pytest.approx(0.0, abs=1e-4)
    assert raw.z_first_ring_mm == pytest.approx(-14.0, abs=1e-3)  # rings centred on z = 0


def test_tilted_scanner_that_is_no_preset_is_derived(tmp_path):
    path = pio.write_petsird(tmp_path / "t.petsird", TILTED, [])
    _, ps = pio.read_petsird_header(path)
    sc = ps.scanner
    assert ps.preset is None and sc.name == "tilted"
    assert (sc.num_rings, sc.num_detectors_per_ring) == (5, 64)
    assert sc.inner_ring_radius_mm == pytest.approx(90.0, abs=1e-3)
    assert sc.effective_ring_radius_mm == pytest.approx(96.0, abs=1e-3)
    assert sc.ring_spacing_mm == pytest.approx(3.3, abs=1e-4)
    assert sc.view_offset_deg == pytest.approx(TILTED.view_offset_deg, abs=1e-3)
    # a DOI given by the user replaces half the crystal depth
    _, ps7 = pio.read_petsird_header(path, average_depth_of_interaction_mm=7.0)
    assert ps7.scanner.effective_ring_radius_mm == pytest.approx(97.0, abs=1e-3)


# ----------------------------------------------------------------------------- bins and LORs
def lor_ends(geom: SinogramGeometry, flat_bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each bin's LOR meets the detector cylinder, by the LOR formula (DESIGN.md): (K, 2) fractional
    detector numbers and (K, 2) fractional ring numbers of the two ends.

    LOR: X = s cos(phi) + u sin(phi), Y = s sin(phi) - u cos(phi), Z = m - u tan(theta) (Z scanner-centred),
    ends at u = +-sqrt(R^2 - s^2); detector angle psi = atan2(X, -Y) (STIR: x = R sin psi, y = -R cos psi).
    """
    sc = geom.scanner
    n, R = sc.num_detectors_per_ring, sc.effective_ring_radius_mm
    V, N = geom.num_views, geom.num_tangential_poss
    row, rest = np.divmod(flat_bins, V * N)
    view, tang = np.divmod(rest, N)
    seg_of_row, ax_of_row = geom.sinogram_index_table()
    phi, s = geom.phi_rad()[view], geom.s_mm()[tang]
    m = np.array([geom.m_mm(int(sg))[int(a)] for sg, a in zip(seg_of_row[row], ax_of_row[row])])
    tan_t = np.array([geom.tan_theta(int(sg))[int(t)] for sg, t in zip(seg_of_row[row], tang)])
    dets, rings = [], []
    for sign in (1.0, -1.0):
        u = sign * np.sqrt(R * R - s * s)
        x, y = s * np.cos(phi) + u * np.sin(phi), s * np.sin(phi) - u * np.cos(phi)
        z = m - u * tan_t + sc.axial_fov_centre_gantry_mm
        psi = np.arctan2(x, -y) - math.radians(sc.view_offset_deg)
        dets.append(np.mod(psi * n / (2 * math.pi), n))
        rings.append(z / sc.ring_spacing_mm)
    return np.stack(dets, axis=1), np.stack(rings, axis=1)


@pytest.mark.parametrize("scanner", [SMALL, TILTED], ids=["small_test", "tilted"])
def test_each_known_pair_lands_in_a_bin_whose_lor_joins_its_detectors(tmp_path, scanner):
    """Span 1: the LOR of every counted bin meets the cylinder at the pair's rings exactly and, transaxially,
    at the pair's detectors, exactly for even tangential positions and half a detector pitch away (towards
    higher detector numbers) for odd ones: STIR's interleaved sinogram, whose odd-t chords lie half way
    between two views and are given to view v (detectors v + (t-1)/2 and v - (t+1)/2 + n/2)."""
    rng = np.random.default_rng(3)
    n = scanner.num_detectors_per_ring
    pairs = random_pairs(rng, scanner, 300, scanner.max_num_non_arccorrected_bins // 2 - 1)
    keys = {tuple(sorted([(a, b), (c, d)])) for a, b, c, d in pairs}  # one event per distinct LOR
    pairs = np.array([[a, b, c, d] for (a, b), (c, d) in sorted(keys)])
    path = pio.write_petsird(tmp_path / "pairs.petsird", scanner, [pio.PetsirdTimeBlock(0, 10, pairs)],
                             module_order=rng.permutation(n), num_energy_bins=3)
    geom = span1(pio.read_petsird_header(path)[1].scanner)
    prompts, _, info = pio.histogram_petsird(path, geom, progress=False)
    assert info.prompts == len(pairs) and info.prompts_outside_geometry == 0
    flat = np.flatnonzero(prompts.reshape(-1))
    assert prompts.reshape(-1)[flat].tolist() == [1.0] * len(pairs)  # distinct LORs, distinct bins
    dets, rings = lor_ends(geom, flat)
    odd = (geom.tangential_pos_nums()[flat % geom.num_tangential_poss] % 2).astype(bool)
    dets[odd] -= 0.5  # the interleaving: odd-t LOR ends sit half a pitch past the detectors
    assert np.allclose(dets, np.round(dets), atol=1e-6) and np.allclose(rings, np.round(rings), atol=1e-6)
    found = sorted(tuple(sorted([(int(round(r0)), int(round(d0)) % n), (int(round(r1)), int(round(d1)) % n)]))
                   for (d0, d1), (r0, r1) in zip(dets, rings))
    assert found == sorted(keys)
    # the reader's bins are STIR's get_bin_for_det_pair, symmetric in the two detections
    expect = lm.bin_for_detector_pair(geom, *pairs.T)
    assert sorted(expect.tolist()) == flat.tolist()
    assert np.array_equal(expect, lm.bin_for_detector_pair(geom, pairs[:, 2], pairs[:, 3], pairs[:, 0], pairs[:, 1]))


def test_span3_bins_keep_the_transaxial_lor_and_the_mean_axial_position(scan):
    geom = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=7)
    pairs = np.concatenate([b.prompts for b in scan["blocks"]])
    flat = lm.bin_for_detector_pair(geom, *pairs.T)
    assert np.all(flat >= 0)
    prompts, _, _ = pio.histogram_petsird(scan["path"], geom, progress=False)
    assert np.array_equal(prompts.reshape(-1), np.bincount(flat, minlength=prompts.size).astype(np.float32))
    # axially the bin's m is the mean z of the two rings; transaxially the LOR passes through both detectors
    a = pio.detector_positions_mm(SMALL, pairs[:, 0], pairs[:, 1])
    b = pio.detector_positions_mm(SMALL, pairs[:, 2], pairs[:, 3])
    V, N = geom.num_views, geom.num_tangential_poss
    row = flat // (V * N)
    seg_of_row, ax_of_row = geom.sinogram_index_table()
    m = np.array([geom.m_mm(int(s))[int(x)] for s, x in zip(seg_of_row[row], ax_of_row[row])])
    assert np.allclose(m + SMALL.axial_fov_centre_gantry_mm, (a[:, 2] + b[:, 2]) / 2, atol=1e-6)
    # transaxially the LOR's ends are the pair's detectors (odd t: half a pitch on, see above)
    dets, _ = lor_ends(geom, flat)
    odd = (geom.tangential_pos_nums()[flat % N] % 2).astype(bool)
    dets[odd] -= 0.5
    assert np.allclose(dets, np.round(dets), atol=1e-6)
    n = SMALL.num_detectors_per_ring
    got = np.sort(np.mod(np.round(dets).astype(int), n), axis=1)
    assert np.array_equal(got, np.sort(pairs[:, [1, 3]], axis=1))


# ----------------------------------------------------------------------------- counts and time
def test_sums_delayeds_and_time_intervals(scan):
    geom = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=7)  # keeps every ring difference
    p, d, info = pio.histogram_petsird(scan["path"], geom, progress=False)
    n_p = [len(b.prompts) for b in scan["blocks"]]
    n_d = [len(b.delayeds) for b in scan["blocks"]]
    assert p.sum() == sum(n_p) == info.prompts and d.sum() == sum(n_d) == info.delayeds
    assert (info.time_blocks, info.first_time_ms, info.last_time_ms) == (NUM_BLOCKS, 0, NUM_BLOCKS * BLOCK_MS)
    # [1, 3) s keeps the blocks starting at 1 s and 2 s
    p13, d13, i13 = pio.histogram_petsird(scan["path"], geom, time_interval_s=(1.0, 3.0), progress=False)
    assert p13.sum() == n_p[1] + n_p[2] and d13.sum() == n_d[1] + n_d[2] and i13.time_blocks_kept == 2
    assert i13.stopped_at_t1 and i13.time_blocks == 4  # blocks are in time order: reading stops at 3 s
    # disjoint intervals add up to the whole acquisition, bin by bin
    pa, _, _ = pio.histogram_petsird(scan["path"], geom, time_interval_s=(0.0, 2.5), progress=False)
    pb, _, _ = pio.histogram_petsird(scan["path"], geom, time_interval_s=(2.5, 100.0), progress=False)
    assert np.array_equal(pa + pb, p)
    # no delayed sinogram when not asked for
    assert pio.histogram_petsird(scan["path"], geom, store_delayeds=False, progress=False)[1] is None


def test_interval_outside_the_acquisition_is_an_error(scan):
    with pytest.raises(ValueError) as err:
        pio.histogram_petsird(scan["path"], span=3, time_interval_s=(10.0, 20.0), progress=False)
    msg = str(err.value)
    assert "scan.petsird" in msg and "[10, 20)" in msg and "0 s to 5 s" in msg
    with pytest.raises(ValueError, match="t0 < t1"):
        pio.histogram_petsird(scan["path"], span=3, time_interval_s=(2.0, 1.0), progress=False)


def test_chunking_energy_windows_tof_and_ndjson_do_not_change_the_sinogram(scan, tmp_path):
    geom = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=7)
    ref, ref_d, _ = pio.histogram_petsird(scan["path"], geom, progress=False)
    small, small_d, _ = pio.histogram_petsird(scan["path"], geom, chunk_events=7, progress=False)
    assert np.array_equal(ref, small) and np.array_equal(ref_d, small_d)
    plain = pio.write_petsird(tmp_path / "plain.json", SMALL, scan["blocks"], ndjson=True)
    assert pio.petsird_format(plain) == "ndjson" and pio.petsird_format(scan["path"]) == "binary"
    p, d, _ = pio.histogram_petsird(plain, geom, progress=False)
    assert np.array_equal(ref, p) and np.array_equal(ref_d, d)


def test_sampled_span1_sinogram_survives_the_round_trip_through_detector_pairs(tmp_path):
    """Counts drawn from the forward projection of a phantom -> detector pairs -> PETSIRD -> the same sinogram."""
    import torch

    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel

    geom = span1(SMALL)
    img = geom.default_image()
    x = np.zeros(img.shape, dtype=np.float32)
    x[4:10, 18:24, 10:16] = 1.0
    with torch.no_grad():
        y = EmbeddedAcquisitionModel(geom, img).direct(torch.from_numpy(x)).numpy()
    counts = np.random.default_rng(5).poisson(y * (20000.0 / y.sum())).astype(np.int64)
    pairs = sinogram_to_pairs(geom, counts)
    path = pio.write_petsird(tmp_path / "phantom.petsird", SMALL, [pio.PetsirdTimeBlock(0, 1000, pairs)])
    p, _, info = pio.histogram_petsird(path, geom, progress=False)
    assert info.prompts == counts.sum() > 10000
    assert np.array_equal(p, counts.astype(np.float32))


def sinogram_to_pairs(geom: SinogramGeometry, counts: np.ndarray) -> np.ndarray:
    """One ``(ring1, det1, ring2, det2)`` per count of a span-1 SIRF sinogram (STIR's bin -> detectors)."""
    seg_of_row, ax_of_row = geom.sinogram_index_table()
    rows, views, tangs = np.nonzero(counts[0])
    reps = counts[0][rows, views, tangs]
    r1, r2 = lm.span1_ring_pair(seg_of_row[rows], ax_of_row[rows])
    n = geom.scanner.num_detectors_per_ring
    d1, d2 = lm.det_pair_for_view_tangential(views, geom.tangential_pos_nums()[tangs], n)
    return np.repeat(np.stack([r1, d1, r2, d2], axis=1), reps, axis=0)


# ----------------------------------------------------------------------------- bad input
def _rewrite_header(src: Path, dst: Path, edit) -> Path:
    """Copy a PETSIRD file with ``edit(header)`` applied, through petsird's reader and writer."""
    with petsird.BinaryPETSIRDReader(str(src)) as r:
        header = r.read_header()
        edit(header)
        blocks = list(r.read_time_blocks())
    with petsird.BinaryPETSIRDWriter(str(dst)) as w:
        w.write_header(header)
        w.write_time_blocks(blocks)
    return dst


def test_a_scanner_that_is_not_a_regular_cylinder_is_a_clear_error(scan, tmp_path):
    bumpy = pio.write_petsird(tmp_path / "bumpy.petsird", SMALL, [], crystal_radius_jitter_mm=5.0)
    with pytest.raises(pio.PetsirdError) as err:
        pio.read_petsird_header(bumpy)
    assert "bumpy.petsird" in str(err.value) and "not a regular cylinder" in str(err.value)
    assert "from the z axis" in str(err.value)

    def second_module_type(h):
        h.scanner.scanner_geometry.replicated_modules.append(h.scanner.scanner_geometry.replicated_modules[0])

    two = _rewrite_header(scan["path"], tmp_path / "two_types.petsird", second_module_type)
    with pytest.raises(pio.PetsirdError, match=r"two_types\.petsird.*2 module types"):
        pio.histogram_petsird(two, progress=False)

    def uneven_rings(h):
        els = h.scanner.scanner_geometry.replicated_modules[0].object.detecting_elements.transforms
        els[-1].matrix[2, 3] += 2.5  # the last ring 2.5 mm further out

    uneven = _rewrite_header(scan["path"], tmp_path / "uneven.petsird", uneven_rings)
    with pytest.raises(pio.PetsirdError, match=r"uneven\.petsird.*not equally spaced"):
        pio.read_petsird_header(uneven)


def test_damaged_files_name_the_file(scan, tmp_path):
    data = scan["path"].read_bytes()
    cut = tmp_path / "cut.petsird"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(pio.PetsirdError, match=r"cut\.petsird.*(damaged|truncated)"):
        pio.histogram_petsird(cut, span=3, progress=False)
    not_petsird = tmp_path / "x.petsird"
    not_petsird.write_bytes(b"\x00" * 64)
    with pytest.raises(pio.PetsirdError, match=r"x\.petsird.*not a PETSIRD file"):
        pio.read_petsird_header(not_petsird)
    with pytest.raises(FileNotFoundError, match="missing.petsird"):
        pio.histogram_petsird(tmp_path / "missing.petsird", progress=False)


def test_detection_bins_beyond_the_scanner_are_an_error(scan, tmp_path):
    with petsird.BinaryPETSIRDReader(str(scan["path"])) as r:
        header = r.read_header()
        list(r.read_time_blocks())
    bad = tmp_path / "bad_bins.petsird"
    n_bins = SMALL.num_rings * SMALL.num_detectors_per_ring * 2
    with petsird.BinaryPETSIRDWriter(str(bad)) as w:
        w.write_header(header)
        w.write_time_blocks([petsird.TimeBlock.EventTimeBlock(petsird.EventTimeBlock(
            time_interval=petsird.TimeInterval(start=0, stop=1),
            prompt_events=[[[petsird.CoincidenceEvent(detection_bins=[n_bins + 5, 0])]]]))])
    msg = rf"bad_bins\.petsird.*detection bin {n_bins + 5} outside \[0, {n_bins}\)"
    with pytest.raises(pio.PetsirdError, match=msg):
        pio.histogram_petsird(bad, span=3, progress=False)


def test_output_geometry_for_another_scanner_is_refused(scan):
    with pytest.raises(GeometryError, match="rings"):
        pio.histogram_petsird(scan["path"], span1(TILTED), progress=False)


def test_default_geometry_follows_the_span():
    g = pio.petsird_geometry(scanner_preset("Siemens_mMR"), 11)
    assert (g.num_sinograms, g.segment(g.segment_nums[-1]).max_ring_diff) == (837, 60)
    assert pio.petsird_geometry(SMALL, 11).span == 11 and pio.petsird_geometry(SMALL, 11).num_sinograms == 15
    assert pio.petsird_geometry(SMALL, 1).num_sinograms == 64
    assert pio.petsird_geometry(SMALL, 21).segment(0).max_ring_diff == 7  # wider than the scanner


# ----------------------------------------------------------------------------- acquisition and CLI
def test_load_acquisition_dispatches_on_the_file_content(scan, tmp_path):
    from sirf_fbsem.acquisition import load_acquisition
    from sirf_fbsem.io.randoms import randoms_from_delayeds

    odd_name = tmp_path / "scan.bin"  # the content, not the name, says PETSIRD
    shutil.copy(scan["path"], odd_name)
    acq = load_acquisition(odd_name, span=3, progress=False)
    p, d, _ = pio.histogram_petsird(scan["path"], span=3, progress=False)
    assert acq.geometry == pio.petsird_geometry(SMALL, 3)
    assert np.array_equal(acq.prompts, p)
    assert np.allclose(acq.additive, randoms_from_delayeds(d, acq.geometry))
    assert acq.additive.sum() == pytest.approx(d.sum(), rel=1e-5)
    assert acq.histogram.petsird_scanner.preset == "small_test" and acq.metadata["prompts"] == acq.prompts.sum()
    p12 = load_acquisition(odd_name, span=3, time_interval_s=(1.0, 2.0), progress=False).prompts
    assert p12.sum() == len(scan["blocks"][1].prompts)


def test_cli_reconstructs_a_petsird_file(tmp_path):
    """``sirf-fbsem reconstruct scan.petsird --output out.nii.gz``: the hot block comes back where it was."""
    import nibabel as nib
    import torch

    from sirf_fbsem.cli import main
    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel

    geom = pio.petsird_geometry(SMALL, 3)
    img = geom.default_image()
    x = np.zeros(img.shape, dtype=np.float32)
    x[5:10, 8:14, 20:26] = 1.0  # off-centre block
    with torch.no_grad():
        y = EmbeddedAcquisitionModel(span1(SMALL), img).direct(torch.from_numpy(x)).numpy()
    counts = np.random.default_rng(11).poisson(y * (200000.0 / y.sum())).astype(np.int64)
    path = pio.write_petsird(tmp_path / "scan.petsird", SMALL,
                             [pio.PetsirdTimeBlock(0, 1000, sinogram_to_pairs(span1(SMALL), counts))])
    out, dcm = tmp_path / "out.nii.gz", tmp_path / "dicom"
    rc = main(["reconstruct", str(path), "--output", str(out), "--algorithm", "osem", "--iterations", "2",
               "--subsets", "4", "--span", "3", "--dicom", str(dcm), "--no-progress"])
    assert rc == 0 and out.is_file()
    assert len(list(dcm.glob("*.dcm"))) == img.shape[0]
    vol = np.asarray(nib.load(str(out)).dataobj)  # (x, y, z)
    assert vol.shape == img.shape[::-1] and np.all(np.isfinite(vol)) and vol.min() >= 0
    rec = np.transpose(vol, (2, 1, 0))
    inside = rec[5:10, 8:14, 20:26].mean()
    assert inside > 5 * rec[x == 0].mean()
    com = [(np.indices(rec.shape)[k] * rec).sum() / rec.sum() for k in range(3)]
    truth = [(np.indices(x.shape)[k] * x).sum() / x.sum() for k in range(3)]
    assert np.allclose(com, truth, atol=1.0)
