"""The PETLINK listmode writer is the exact inverse of the histogrammer (and of STIR's lm_to_projdata).

Counts drawn on a sinogram are written as listmode; histogramming the file gives them back bin
for bin (prompts and delayeds), over the whole file and over a time interval, for span 1 and
compressed, mashed and narrowed geometries. The ring pairs of a compressed bin follow the crystal
efficiencies (none through a gap crystal). With SIRF, ``ListmodeToSinograms`` reads the file and
gives the same sinograms.
"""
from __future__ import annotations

import numpy as np
import pytest

from sirf_fbsem.geometry import GeometryError, SinogramGeometry, scanner_preset
from sirf_fbsem.io import listmode as lm
from sirf_fbsem.io.petlink_writer import events_from_counts, mmr_listmode_layout, write_petlink_listmode

from conftest import SHARED_DATA

MMR = scanner_preset("Siemens_mMR")
LAYOUT = mmr_listmode_layout()
REAL_LM_HDR = SHARED_DATA / "stir" / "recon_test_pack" / "PET_ACQ_small.l.hdr.STIR"

GEOMETRIES = {
    "span11_mash126_narrow": SinogramGeometry.from_span(MMR, 11, 5, view_mash_factor=126, num_tangential_poss=8),
    "span1_mash21": SinogramGeometry.from_span(MMR, 1, 2, view_mash_factor=21, num_tangential_poss=20),
    "span1_mrd0": SinogramGeometry.from_span(MMR, 1, 0),
}


def _efficiencies(rng: np.random.Generator) -> np.ndarray:
    """Crystal efficiencies around 1 with the mMR's gap crystals (c % 9 == 0) at 0."""
    eff = 1.0 + 0.2 * rng.random((64, 504))
    eff[:, ::9] = 0.0
    return eff


def _counts(geometry: SinogramGeometry, rng: np.random.Generator, mean: float, eff: np.ndarray | None) -> np.ndarray:
    """Poisson counts, zero in bins whose detector pairs all have efficiency 0."""
    y = rng.poisson(mean, size=geometry.shape).astype(np.float32)
    if eff is not None:  # no counts in bins whose every view passes through a gap crystal
        mash = 252 // geometry.num_views
        u = np.arange(geometry.num_views)[:, None] * mash + np.arange(mash)[None, :]
        d1, d2 = lm.det_pair_for_view_tangential(u[:, :, None], geometry.tangential_pos_nums()[None, None, :], 504)
        dead = ((eff[0][d1] * eff[0][d2]) == 0).all(axis=1)
        y[..., dead] = 0
    return y


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("with_eff", [False, True])
def test_histogramming_the_written_file_gives_the_counts_back(tmp_path, name, with_eff):
    geometry = GEOMETRIES[name]
    rng = np.random.default_rng(3)
    eff = _efficiencies(rng) if with_eff else None
    mean = 2.0 if geometry.num_sinograms * geometry.num_views * geometry.num_tangential_poss < 2e5 else 0.01
    prompts, delayeds = _counts(geometry, rng, mean, eff), _counts(geometry, rng, 0.3 * mean, eff)
    p_addr = events_from_counts(prompts, geometry, rng, crystal_efficiencies=eff)
    d_addr = events_from_counts(delayeds, geometry, rng, crystal_efficiencies=eff)
    assert p_addr.dtype == np.uint32 and p_addr.size == prompts.sum() and d_addr.size == delayeds.sum()
    written = write_petlink_listmode(tmp_path / "sim.l.hdr", p_addr, d_addr, 2.5, rng)
    assert written.data_path == tmp_path / "sim.l" and written.duration_ms == 2500 and written.time_tags == 2501

    hp, hd, info = lm.histogram_listmode(written.header_path, geometry, progress=False)
    np.testing.assert_array_equal(hp, prompts)
    np.testing.assert_array_equal(hd, delayeds)
    assert info.prompts_outside_geometry == info.delayeds_outside_geometry == info.invalid_addresses == 0
    assert (info.first_time_tag_ms, info.last_time_tag_ms) == (0, 2500)

    # a time interval keeps exactly the events whose millisecond k has 0.5 s <= k / 1000 < 1.2 s
    hp, hd, _ = lm.histogram_listmode(written.header_path, geometry, (0.5, 1.2), progress=False)
    for counts, times, hist in ((prompts, written.prompt_times_ms, hp), (delayeds, written.delayed_times_ms, hd)):
        flat = counts.reshape(-1)
        bins = np.repeat(np.flatnonzero(flat), flat[flat > 0].astype(np.int64))  # events_from_counts' order
        keep = (times >= 500) & (times < 1200)
        np.testing.assert_array_equal(hist.reshape(-1), np.bincount(bins[keep], minlength=flat.size))
        assert 0 < keep.sum() < counts.sum()


def test_span1_unmashed_bins_have_one_address_each():
    """A span-1, unmashed, full-width bin is one listmode address: the writer draws nothing."""
    geometry = GEOMETRIES["span1_mrd0"]
    counts = np.zeros(geometry.shape, dtype=np.int64)
    counts[0, 10, 5, 172] = 2  # segment 0, axial 10, view 5, tangential_pos_num 0
    counts[0, 63, 251, 0] = 1
    addr = events_from_counts(counts, geometry, np.random.default_rng(0))
    expected = [lm.encode_event(0, 10, 5, 0, LAYOUT)] * 2 + [lm.encode_event(0, 63, 251, -172, LAYOUT)]
    np.testing.assert_array_equal(addr, np.asarray(expected, dtype=np.uint32) & np.uint32(lm.ADDRESS_MASK))


def test_events_of_a_compressed_bin_follow_the_crystal_efficiencies():
    """Span 11, segment 0, row of ring sum 6: ring pairs (3,3), (2,4), (4,2), (1,5), (5,1), (0,6) with
    probabilities e[r1, d1] e[r2, d2] / sum; one ring at efficiency 0 gets no event."""
    geometry = SinogramGeometry.from_span(MMR, 11, 5)
    eff = np.ones((64, 504))
    eff[2] = 3.0  # ring 2: pairs (2, 4) and (4, 2) weigh 3 each
    eff[0] = 0.0  # ring 0: pair (0, 6) never drawn
    counts = np.zeros(geometry.shape, dtype=np.int64)
    row, view, t = 6, 40, 172 + 11  # axial position 6 of segment 0 has ring1 + ring2 = 6
    counts[0, row, view, t] = 20000
    addr = events_from_counts(counts, geometry, np.random.default_rng(5), crystal_efficiencies=eff)
    seg, ax, v, tp = lm.decode_bin_address(addr, LAYOUT)
    r1, r2 = lm.span1_ring_pair(seg, ax)
    assert np.all(r1 + r2 == 6) and np.all(v == view) and np.all(tp == 11)
    pairs, n = np.unique(np.stack([r1, r2], axis=1), axis=0, return_counts=True)
    weights = {(3, 3): 1.0, (2, 4): 3.0, (4, 2): 3.0, (1, 5): 1.0, (5, 1): 1.0}
    assert {tuple(p) for p in pairs} == set(weights)
    for p, k in zip(pairs, n):
        expected = 20000 * weights[tuple(p)] / sum(weights.values())
        assert abs(k - expected) < 5 * np.sqrt(expected), (tuple(p), k, expected)


def test_no_event_through_a_gap_crystal():
    rng = np.random.default_rng(11)
    geometry = SinogramGeometry.from_span(MMR, 11, 60)
    eff = _efficiencies(rng)
    counts = _counts(geometry, rng, 0.002, eff)
    addr = events_from_counts(counts, geometry, rng, crystal_efficiencies=eff)
    seg, ax, v, tp = lm.decode_bin_address(addr, LAYOUT)
    r1, r2 = lm.span1_ring_pair(seg, ax)
    d1, d2 = lm.det_pair_for_view_tangential(v, tp, 504)
    assert addr.size > 1000 and np.all(eff[r1, d1] * eff[r2, d2] > 0)


def test_header_is_read_as_a_real_mmr_header(tmp_path):
    rng = np.random.default_rng(0)
    written = write_petlink_listmode(tmp_path / "a.l.hdr", np.array([5, 6], np.uint32), np.array([7], np.uint32),
                                     0.003, rng)
    h = lm.read_listmode_header(written.header_path)
    assert h.scanner.name == MMR.name and h.layout == LAYOUT and h.data_path == tmp_path / "a.l"
    assert h.duration_s == 0.003 and h.timing_tag_interval_ms == 1 and h.total_listmode_words == 3 + 4
    assert h.isotope == "F-18" and h.patient_orientation == "HFS" and h.segment_table == tuple(LAYOUT.segment_sizes)
    summary = lm.scan_listmode(written.header_path)
    assert (summary.prompts, summary.delayeds, summary.time_tags, summary.other_words) == (2, 1, 4, 0)
    words = np.fromfile(written.data_path, dtype="<u4")
    tags = lm.decode_words(words)["time"]
    assert tags[0] and tags[-1] and list(words[tags] & lm.TIME_MASK) == [0, 1, 2, 3]
    if REAL_LM_HDR.is_file():  # every key of a real mMR header that STIR or the reader uses is there
        real = lm.parse_interfile_keys(REAL_LM_HDR)
        ours = lm.parse_interfile_keys(written.header_path)
        informational = {k for k in real if k.startswith(("tracer", "relative time", "injected", "isotope branching",
                                                          "singles", "total number of singles", "time sync"))}
        assert set(real) - informational - set(ours) == set()


def test_writer_refuses_what_it_cannot_write(tmp_path):
    rng = np.random.default_rng(0)
    geometry = GEOMETRIES["span11_mash126_narrow"]
    with pytest.raises(ValueError, match="non-negative integers"):
        events_from_counts(np.full(geometry.shape, 0.5), geometry, rng)
    with pytest.raises(ValueError, match="shape"):
        events_from_counts(np.zeros((1, 2, 3, 4)), geometry, rng)
    eff = np.zeros((64, 504))
    counts = np.zeros(geometry.shape)
    counts[0, 3, 1, 2] = 1
    with pytest.raises(ValueError, match=r"sinogram bin \(3, 1, 2\)"):
        events_from_counts(counts, geometry, rng, crystal_efficiencies=eff)
    with pytest.raises(GeometryError):
        events_from_counts(np.zeros((1, 37, 48, 48)), SinogramGeometry.from_span(scanner_preset("small_test"), 3, 4),
                           rng)
    with pytest.raises(ValueError, match="duration_s"):
        write_petlink_listmode(tmp_path / "b.l.hdr", [], [], 0.0, rng)
    with pytest.raises(ValueError, match=".l.hdr"):
        write_petlink_listmode(tmp_path / "b.hdr", [], [], 1.0, rng)
    with pytest.raises(GeometryError, match="bin addresses"):
        write_petlink_listmode(tmp_path / "b.l.hdr", [LAYOUT.num_addresses], [], 1.0, rng)
    write_petlink_listmode(tmp_path / "c.l.hdr", [1], [], 1.0, rng)
    with pytest.raises(FileExistsError, match="c.l"):
        write_petlink_listmode(tmp_path / "c.l.hdr", [1], [], 1.0, rng)
    write_petlink_listmode(tmp_path / "c.l.hdr", [1, 2], [], 1.0, rng, overwrite=True)
    assert lm.scan_listmode(tmp_path / "c.l.hdr").prompts == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.l", "c.l.hdr"]  # nothing half-written left


@pytest.mark.sirf
def test_sirf_reads_the_written_file_into_the_same_sinograms(tmp_path):  # pragma: no cover - needs SIRF
    pytest.importorskip("sirf.STIR")
    geometry = SinogramGeometry.from_span(MMR, 11, 5)  # segment 0 of the usual template: a smaller file for SIRF
    rng = np.random.default_rng(8)
    eff = _efficiencies(rng)
    prompts, delayeds = _counts(geometry, rng, 5e-3, eff), _counts(geometry, rng, 1e-3, eff)
    written = write_petlink_listmode(tmp_path / "sirf.l.hdr",
                                     events_from_counts(prompts, geometry, rng, crystal_efficiencies=eff),
                                     events_from_counts(delayeds, geometry, rng, crystal_efficiencies=eff), 2.0, rng)
    # bounds exact in float32: SIRF passes the interval to STIR as float32 (0.4 would become 0.40000001 s and
    # drop the events of ms 400, which histogram_listmode keeps)
    interval = (0.5, 1.25)
    p_sirf, d_sirf = lm.histogram_with_sirf(written.header_path, geometry, interval)
    p, d, _ = lm.histogram_listmode(written.header_path, geometry, interval, progress=False)
    assert p.sum() > 0 and d.sum() > 0
    np.testing.assert_array_equal(p_sirf, p)
    np.testing.assert_array_equal(d_sirf, d)
