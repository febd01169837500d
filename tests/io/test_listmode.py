"""Native PETLINK 32-bit listmode reader: header, word counts, bin addressing, time intervals, errors.

The expected values come from straightforward per-word decoding written here from
STIR's sources (CListRecordECAT8_32bit.{h,cxx}, stir_ecat_common.cxx
find_segment_sequence, ProjDataInfoCylindrical{,NoArcCorr}), not from the reader.
"""
from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from sirf_fbsem.geometry import GeometryError, SinogramGeometry, scanner_preset
from sirf_fbsem.io import listmode as lm

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STIR_PACK = SHARED / "stir" / "recon_test_pack"
LM_HDR = STIR_PACK / "PET_ACQ_small.l.hdr.STIR"
LM_DATA = STIR_PACK / "small_listmode_file.l"

needs_data = pytest.mark.skipif(not LM_DATA.is_file(), reason=f"shared listmode data {LM_DATA} not present")

MMR = scanner_preset("Siemens_mMR")
NUM_VIEWS, NUM_TANG, NUM_RINGS, MRD = 252, 344, 64, 60


# ----------------------------------------------------------------------------- an independent reference
def ref_segment_sequence(max_rd: int) -> list[tuple[int, int]]:
    """(segment, num axial positions) in STIR's ECAT order 0, -1, +1, -2, +2, ..."""
    out = [(0, NUM_RINGS)]
    for d in range(1, max_rd + 1):
        out += [(-d, NUM_RINGS - d), (d, NUM_RINGS - d)]
    return out


SEQ = ref_segment_sequence(MRD)


def ref_decode_word(w: int):
    """One word, decoded bit by bit: ('prompt'|'delayed', address) / ('time', ms) / ('other', None)."""
    if (w >> 31) & 1 == 0:
        return ("prompt" if (w >> 30) & 1 else "delayed"), w & ((1 << 30) - 1)
    if (w >> 29) & 3 == 0:
        return "time", w & ((1 << 29) - 1)
    return "other", None


def ref_span1_bin(address: int) -> tuple[int, int, int, int]:
    """STIR's CListEventECAT8_32bit::get_detection_position: (segment, axial, view, tangential_pos_num)."""
    tang = address % NUM_TANG
    rest = address // NUM_TANG
    view = rest % NUM_VIEWS
    z = rest // NUM_VIEWS
    for seg, size in SEQ:
        if z < size:
            return seg, z, view, tang - NUM_TANG // 2
        z -= size
    raise AssertionError(f"address {address} beyond the span-1 sinogram")


def ref_output_row(seg1: int, ax1: int, geometry: SinogramGeometry) -> int | None:
    """SIRF row of a span-1 bin in ``geometry``: rings, then get_segment_axial_pos_num_for_ring_pair (floats as STIR)."""
    # get_ring_pair_for_segment_axial_pos_num for span 1: m_offset = (n-1)*rs/2, ring1+ring2 = 2a - 2 m_off/rs + 63
    n_ax = NUM_RINGS - abs(seg1)
    rsum = round(2 * ax1 - 2 * ((n_ax - 1) / 2.0) + (NUM_RINGS - 1))
    ring1, ring2 = (rsum - seg1) // 2, (rsum + seg1) // 2
    assert ring2 - ring1 == seg1 and 0 <= ring1 < NUM_RINGS and 0 <= ring2 < NUM_RINGS
    for s in geometry.segments:
        if s.min_ring_diff <= ring2 - ring1 <= s.max_ring_diff:
            inc = 2 if s.max_ring_diff != s.min_ring_diff else 1
            samp = MMR.ring_spacing_mm / inc
            m_offset = (s.num_axial_poss - 1) * samp / 2
            ax_off = round((NUM_RINGS - 1) - 2 * m_offset / MMR.ring_spacing_mm)
            ax = (ring1 + ring2 - ax_off) * inc // 2
            if not 0 <= ax < s.num_axial_poss:
                return None
            row = 0
            for n in geometry.sirf_segment_order():  # 0, +1, -1, ...
                if n == s.segment_num:
                    return row + ax
                row += geometry.segment(n).num_axial_poss
    return None


def ref_histogram(words, geometry: SinogramGeometry, t0_ms=None, t1_ms=None):
    """Counter of (kind, row, view, tang index) with STIR's time semantics, one word at a time."""
    hist: Counter = Counter()
    t = 0
    for w in words:
        kind, val = ref_decode_word(int(w))
        if kind == "time":
            t = val
            if t1_ms is not None and t >= t1_ms:
                break
            continue
        if kind == "other" or (t0_ms is not None and t < t0_ms):
            continue
        seg, ax, view, tang = ref_span1_bin(val)
        row = ref_output_row(seg, ax, geometry)
        if row is not None:
            hist[(kind, row, view, tang + NUM_TANG // 2)] += 1
    return hist


def as_counter(prompts, delayeds) -> Counter:
    c: Counter = Counter()
    for kind, arr in (("prompt", prompts), ("delayed", delayeds)):
        nz = np.nonzero(arr[0])
        for (r, v, t), n in zip(zip(*nz), arr[0][nz]):
            c[(kind, int(r), int(v), int(t))] = int(n)
    return c


def write_lm(folder: Path, words, name: str = "test.l", header_text: str | None = None) -> Path:
    """Write ``words`` and an mMR header pointing at them; return the header path."""
    data = folder / name
    np.asarray(words, dtype="<u4").tofile(data)
    text = header_text if header_text is not None else LM_HDR.read_text()
    hdr = folder / (name + ".hdr")
    hdr.write_text(text.replace("small_listmode_file.l", name))
    return hdr


@pytest.fixture(scope="module")
def words() -> np.ndarray:
    if not LM_DATA.is_file():
        pytest.skip(f"shared listmode data {LM_DATA} not present")
    return np.fromfile(LM_DATA, dtype="<u4")


@pytest.fixture
def span11() -> SinogramGeometry:
    return SinogramGeometry.from_span(MMR, span=11, max_ring_diff=60)


@pytest.fixture
def span1() -> SinogramGeometry:
    return SinogramGeometry.from_span(MMR, span=1, max_ring_diff=60)


def _needs_header_copy(tmp_path: Path) -> Path:
    if not LM_HDR.is_file():
        pytest.skip(f"shared listmode header {LM_HDR} not present")
    return tmp_path


# ----------------------------------------------------------------------------- header
@needs_data
def test_read_header_of_stir_test_pack():
    h = lm.read_listmode_header(LM_HDR)
    assert h.data_path == LM_DATA.resolve() or h.data_path.samefile(LM_DATA)
    assert h.scanner.name == "Siemens mMR" and h.originating_system == "2008"
    assert h.isotope == "F-18" and h.radiopharmaceutical == "FDG" and h.patient_orientation == "HFS"
    assert h.start_time == datetime(2017, 3, 27, 17, 0, 35, tzinfo=timezone.utc)
    assert h.duration_s == 900.0 and h.timing_tag_interval_ms == 1.0 and h.word_bits == 32
    assert h.layout.max_ring_difference == 60 and h.layout.num_views == 252 and h.layout.num_tangential_poss == 344
    assert h.layout.num_sinograms == 4084  # span 1, max ring difference 60
    assert h.data_size_bytes == LM_DATA.stat().st_size == 254816 * 4


def test_header_pointing_at_missing_data_names_header_key_and_path(tmp_path):
    sample = SHARED / "stir" / "examples" / "samples" / "mMR_listmode.l.hdr"
    if not sample.is_file():
        pytest.skip(f"{sample} not present")
    hdr = tmp_path / "mMR_listmode.l.hdr"
    shutil.copy(sample, hdr)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        lm.read_listmode_header(hdr)
    msg = str(err.value)
    assert str(hdr) in msg and "name of data file" in msg and "mMR_listmode.l" in msg
    with pytest.raises(FileNotFoundError):
        lm.histogram_listmode(hdr, SinogramGeometry.from_span(MMR, 11, 60), progress=False)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


# ----------------------------------------------------------------------------- counts
@needs_data
def test_word_counts_match_a_per_word_decode_on_a_slice(words, tmp_path):
    piece = words[10_000:60_000]
    kinds = Counter(ref_decode_word(int(w))[0] for w in piece)
    data = tmp_path / "slice.l"
    piece.astype("<u4").tofile(data)
    s = lm.scan_listmode(data)  # a raw data file: mMR default layout
    assert (s.prompts, s.delayeds, s.time_tags, s.other_words) == (
        kinds["prompt"], kinds["delayed"], kinds["time"], kinds["other"])
    times = [ref_decode_word(int(w))[1] for w in piece if ref_decode_word(int(w))[0] == "time"]
    assert (s.first_time_ms, s.last_time_ms) == (times[0], times[-1])
    dec = lm.decode_words(piece)  # the vectorised classifier agrees too
    assert [int(dec[k].sum()) for k in ("prompt", "delayed", "time", "other")] == [
        kinds["prompt"], kinds["delayed"], kinds["time"], kinds["other"]]


@needs_data
def test_whole_file_counts_are_consistent(words):
    s = lm.scan_listmode(LM_HDR)
    assert s.words == words.size == LM_DATA.stat().st_size // 4
    assert s.prompts + s.delayeds + s.time_tags + s.other_words == s.words
    assert s.invalid_addresses == 0
    assert s.prompts > 0 and 0.05 < s.delayeds / s.prompts < 0.5  # randoms fraction of an FDG scan
    # one tag per millisecond, no gaps: first..last
    assert s.time_tags == s.last_time_ms - s.first_time_ms + 1
    assert (s.first_time_ms, s.last_time_ms) == (0, 612)
    assert (s.prompts, s.delayeds, s.time_tags, s.other_words) == (218881, 35320, 613, 2)


@needs_data
def test_every_bin_address_is_in_range(words):
    ev = (words >> 31) == 0
    addr = words[ev] & np.uint32(lm.ADDRESS_MASK)
    assert int(addr.max()) < 4084 * 252 * 344
    h = lm.read_listmode_header(LM_HDR)
    seg, ax, view, tang = lm.decode_bin_address(addr, h.layout)
    assert np.all(np.abs(seg) <= 60) and np.all((ax >= 0) & (ax < 64 - np.abs(seg)))
    assert np.all((view >= 0) & (view < 252)) and np.all((tang >= -172) & (tang < 172))
    for a in addr[:2000:37]:  # the vectorised decoder agrees with the per-word one
        i = int(np.nonzero(addr == a)[0][0])
        assert (int(seg[i]), int(ax[i]), int(view[i]), int(tang[i])) == ref_span1_bin(int(a))


# ----------------------------------------------------------------------------- histograms
@needs_data
def test_span11_and_span1_sums_equal_the_prompts(span11, span1):
    s = lm.scan_listmode(LM_HDR)
    p11, d11, info = lm.histogram_listmode(LM_HDR, span11, progress=False)
    assert p11.shape == (1, 837, 252, 344) and p11.dtype == np.float32
    assert float(p11.sum(dtype=np.float64)) == s.prompts == info.prompts
    assert float(d11.sum(dtype=np.float64)) == s.delayeds == info.delayeds
    assert info.prompts_outside_geometry == info.delayeds_outside_geometry == info.invalid_addresses == 0
    p1, d1, _ = lm.histogram_listmode(LM_HDR, span1, store_delayeds=False, progress=False)
    assert d1 is None and p1.shape == (1, 4084, 252, 344)
    rows1 = p1[0].sum(axis=(1, 2), dtype=np.float64)
    del p1
    assert rows1.sum() == s.prompts
    # span 11 = span 1 summed over the ring differences of each segment (same views and bins)
    rows11 = p11[0].sum(axis=(1, 2), dtype=np.float64)
    seg_of_row, _ = span11.sinogram_index_table()
    seg1_of_row, _ = span1.sinogram_index_table()
    for seg in span11.segments:
        in_k = (seg1_of_row >= seg.min_ring_diff) & (seg1_of_row <= seg.max_ring_diff)
        assert rows1[in_k].sum() == rows11[seg_of_row == seg.segment_num].sum() > 0


@needs_data
def test_span11_histogram_matches_per_event_reference(words, span11, tmp_path):
    piece = words[:40_000]
    hdr = write_lm(tmp_path, piece)
    p, d, _ = lm.histogram_listmode(hdr, span11, progress=False, chunk_words=4096)  # many chunks
    assert as_counter(p, d) == ref_histogram(piece, span11)
    # with a time interval: the current time carries across chunk boundaries
    p, d, info = lm.histogram_listmode(hdr, span11, (0.02, 0.05), progress=False, chunk_words=1000)
    assert as_counter(p, d) == ref_histogram(piece, span11, 20, 50)
    assert info.stopped_at_t1 and info.current_time_at_end_ms == 50


@needs_data
def test_time_intervals_select_the_right_events(words, span11):
    full_p, full_d, _ = lm.histogram_listmode(LM_HDR, span11, (0.0, 0.6), progress=False)
    a_p, a_d, ia = lm.histogram_listmode(LM_HDR, span11, (0.0, 0.25), progress=False)
    b_p, b_d, ib = lm.histogram_listmode(LM_HDR, span11, (0.25, 0.6), progress=False)
    assert float(a_p.sum(dtype=np.float64)) == ia.prompts
    a_p += b_p  # in place: these are 837 x 252 x 344 arrays
    a_d += b_d
    assert np.array_equal(a_p, full_p) and np.array_equal(a_d, full_d)
    assert ia.stopped_at_t1 and ia.current_time_at_end_ms == 250
    # counts in [0, 250) and [250, 600) ms from the per-word reference (current time = last tag; 0 before the first)
    kinds: Counter = Counter()
    t = 0
    for w in words:
        kind, val = ref_decode_word(int(w))
        if kind == "time":
            t = val
        elif kind in ("prompt", "delayed") and t < 600:
            kinds[(kind, t < 250)] += 1
    assert (ia.prompts, ia.delayeds) == (kinds[("prompt", True)], kinds[("delayed", True)])
    assert (ib.prompts, ib.delayeds) == (kinds[("prompt", False)], kinds[("delayed", False)])


def test_time_interval_outside_the_acquisition_is_an_error(tmp_path, span11):
    layout = lm.ListmodeLayout(64, 504, 60, 252, 344)
    ws = [lm.encode_time_tag(0), lm.encode_event(0, 10, 5, 0, layout), lm.encode_time_tag(1),
          lm.encode_event(1, 3, 7, -3, layout), lm.encode_time_tag(2)]
    hdr = write_lm(_needs_header_copy(tmp_path), ws)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError) as err:
        lm.histogram_listmode(hdr, span11, (5.0, 10.0), progress=False)
    msg = str(err.value)
    assert "test.l" in msg and "0.002 s" in msg and "[5, 10)" in msg
    with pytest.raises(ValueError):
        lm.histogram_listmode(hdr, span11, (-2.0, 0.0), progress=False)
    with pytest.raises(ValueError):
        lm.histogram_listmode(hdr, span11, (0.5, 0.1), progress=False)
    assert sorted(os.listdir(tmp_path)) == before


def test_truncated_file_is_an_error(tmp_path, span11):
    hdr = write_lm(_needs_header_copy(tmp_path), [lm.encode_time_tag(0)] * 10)
    data = tmp_path / "test.l"
    with open(data, "ab") as f:
        f.write(b"\x01\x02")  # half a word
    before = sorted(os.listdir(tmp_path))
    for call in (lambda: lm.scan_listmode(hdr), lambda: lm.histogram_listmode(hdr, span11, progress=False)):
        with pytest.raises(lm.ListmodeError) as err:
            call()
        assert str(data) in str(err.value) and "42 bytes" in str(err.value) and "mid-word" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == before


def test_raw_data_file_is_refused_for_histogramming(tmp_path, span11):
    data = tmp_path / "x.l"
    np.zeros(4, dtype="<u4").tofile(data)
    with pytest.raises(lm.ListmodeError, match="not a listmode header"):
        lm.histogram_listmode(data, span11, progress=False)


# ----------------------------------------------------------------------------- hand-made words
def _word(seg: int, ax: int, view: int, tang_index: int, prompt: bool = True) -> int:
    """Bin address by hand: z counts the sinograms of the segments before ``seg`` in 0, -1, +1, ... order."""
    z = 0
    for s, size in SEQ:
        if s == seg:
            break
        z += size
    return (((z + ax) * 252 + view) * 344 + tang_index) | ((1 << 30) if prompt else 0)


HAND_EVENTS = [
    # (segment = ring2-ring1, axial, view, tang index, prompt, span-1 SIRF row, span-11 SIRF row)
    # segment 0 is first in both orders: rows = axial (span 1) and ring1+ring2 = 2a (span 11)
    (0, 10, 5, 172, True, 10, 20),
    # segment -1 (rings 6, 5): SIRF span 1 puts +1 (63 rows) before -1: row 64 + 63 + 5; span 11: seg 0, 6+5
    (-1, 5, 10, 200, True, 132, 11),
    # segment +1 (rings 3, 4): row 64 + 3; span 11: segment 0, axial 7
    (1, 3, 0, 0, False, 67, 7),
    # segment +7 (rings 3, 10): span 1 row 64 + 2*(63+62+61+60+59+58) + 3; span 11 segment +1 (6..16):
    # axial = 3 + 10 - 6 = 7, row 127 + 7
    (7, 3, 251, 343, True, 64 + 2 * (63 + 62 + 61 + 60 + 59 + 58) + 3, 134),
    # segment -60 (rings 60, 0): the last span-1 segment pair; span 11 segment -5 (-60..-50):
    # axial = 60 + 0 - 50 = 10, row = 127 + 2*(115 + 93 + 71 + 49) + 27 + 10
    # span 1: segments +60 and -60 (4 rows each) are the last 8 rows, +60 first
    (-60, 0, 100, 1, True, 4084 - 4 + 0, 127 + 2 * (115 + 93 + 71 + 49) + 27 + 10),
    # segment +60 (rings 3, 63): span 1 row 4084 - 8 + 3; span 11 segment +5 (50..60): axial 3 + 63 - 50
    (60, 3, 7, 100, False, 4084 - 8 + 3, 127 + 2 * (115 + 93 + 71 + 49) + 16),
]


@pytest.mark.parametrize("span", [1, 11])
def test_hand_made_words_land_in_the_expected_bins(tmp_path, span):
    geom = SinogramGeometry.from_span(MMR, span=span, max_ring_diff=60)
    ws = [lm.encode_time_tag(0)]
    expected: Counter = Counter()
    for seg, ax, view, tang, prompt, row1, row11 in HAND_EVENTS:
        ws.append(_word(seg, ax, view, tang, prompt))
        expected[("prompt" if prompt else "delayed", row1 if span == 1 else row11, view, tang)] += 1
        # the helpers agree with the hand-made word and with the reference decoder
        layout = lm.ListmodeLayout(64, 504, 60, 252, 344)
        assert lm.encode_event(seg, ax, view, tang - 172, layout, prompt) == ws[-1]
        assert ref_span1_bin(ws[-1] & lm.ADDRESS_MASK) == (seg, ax, view, tang - 172)
        assert ref_output_row(seg, ax, geom) == (row1 if span == 1 else row11)
    ws += [lm.encode_time_tag(1), 0xE0000000 | 123]  # a time tag and an 'other' tag word
    hdr = write_lm(_needs_header_copy(tmp_path), ws)
    p, d, info = lm.histogram_listmode(hdr, geom, progress=False)
    assert as_counter(p, d) == expected
    assert (info.prompts, info.delayeds) == (4, 2)


def test_hand_made_rings_and_detectors_follow_stir():
    # get_ring_pair_for_segment_axial_pos_num (span 1): d >= 0 -> (a, a+d); d < 0 -> (a-d, a)
    r1, r2 = lm.span1_ring_pair([0, 5, -5, 60, -60], [10, 2, 2, 3, 0])
    assert r1.tolist() == [10, 2, 7, 3, 60] and r2.tolist() == [10, 7, 2, 63, 0]
    # initialise_uncompressed_view_tangpos_to_det1det2 with arithmetic shifts, n = 504
    d1, d2 = lm.det_pair_for_view_tangential([0, 0, 0, 10, 251], [0, 1, -1, -172, 171], 504)
    assert d1.tolist() == [0, 0, 503, (10 - 86) % 504, 251 + 85]
    assert d2.tolist() == [252, 251, 252, 10 + 86 + 252, (251 - 86 + 252) % 504]


def test_output_geometry_drops_what_it_cannot_hold(tmp_path):
    """Smaller max ring difference, fewer tangential positions and mashed views, as LmToProjData."""
    ws = [lm.encode_time_tag(0), _word(0, 10, 5, 172), _word(7, 3, 251, 343), _word(20, 1, 9, 30), _word(-1, 5, 10, 2)]
    hdr = write_lm(_needs_header_copy(tmp_path), ws)
    g = SinogramGeometry.from_span(MMR, span=11, max_ring_diff=16, view_mash_factor=2, num_tangential_poss=300)
    p, d, info = lm.histogram_listmode(hdr, g, progress=False)
    assert p.shape == (1, 127 + 2 * 115, 126, 300)
    # kept: (0, 10, view 5, index 172): rings (10, 10) -> row 20, view 5 // 2 = 2, tangential_pos_num 0 -> index 150.
    # dropped: index 343 (tangential_pos_num 171 > 149), ring difference 20 > 16, index 2 (-170 < -150)
    assert info.prompts == 1 and info.prompts_outside_geometry == 3
    assert as_counter(p, d) == Counter({("prompt", 20, 2, 150): 1})


def test_wrong_output_geometry_is_refused(tmp_path):
    hdr = write_lm(_needs_header_copy(tmp_path), [lm.encode_time_tag(0)])
    with pytest.raises(GeometryError, match="arc-corrected"):
        lm.histogram_listmode(hdr, SinogramGeometry.from_span(MMR, 11, 60, num_tangential_poss=200, arc_corrected=True),
                              progress=False)
    with pytest.raises(GeometryError, match="rings"):
        lm.histogram_listmode(hdr, SinogramGeometry.from_span(scanner_preset("small_test"), 3, 4), progress=False)


def test_time_tags_before_events_and_events_before_first_tag(tmp_path, span11):
    """Events before the first tag have time 0 (STIR's current_time starts at 0)."""
    ws = [_word(0, 0, 0, 172), lm.encode_time_tag(5), _word(0, 1, 0, 172), lm.encode_time_tag(6),
          _word(0, 2, 0, 172), _word(0, 3, 0, 172, prompt=False), lm.encode_time_tag(7), _word(0, 4, 0, 172)]
    hdr = write_lm(_needs_header_copy(tmp_path), ws)
    rows = lambda p: sorted(int(r) for r in np.nonzero(p[0])[0])  # noqa: E731
    p, d, _ = lm.histogram_listmode(hdr, span11, (0.0, 0.001), progress=False)
    assert rows(p) == [0]
    p, d, _ = lm.histogram_listmode(hdr, span11, (0.006, 0.007), progress=False)
    assert rows(p) == [4] and rows(d) == [6]
    p, d, info = lm.histogram_listmode(hdr, span11, (0.005, 1.0), progress=False)
    assert rows(p) == [2, 4, 8] and not info.stopped_at_t1


def test_histogram_with_sirf_names_the_missing_dependency():
    try:
        import sirf.STIR  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="histogram_with_sirf needs SIRF"):
            lm.histogram_with_sirf(LM_HDR, "template.hs", (0.0, 1.0))
    else:  # pragma: no cover - only where SIRF is installed
        pytest.skip("SIRF present: covered by test_sirf_matches_native")


@pytest.mark.sirf
@needs_data
def test_sirf_matches_native(span11):  # pragma: no cover - needs SIRF
    pytest.importorskip("sirf.STIR")
    # the template is written from our geometry (SIRF's mMR_template_span11.hs has no data file here)
    p_sirf, d_sirf = lm.histogram_with_sirf(LM_HDR, span11, (0.0, 0.5))
    p, d, _ = lm.histogram_listmode(LM_HDR, span11, (0.0, 0.5), progress=False)
    np.testing.assert_array_equal(p_sirf, p)
    np.testing.assert_array_equal(d_sirf, d)


def test_decode_words_bits():
    ws = np.array([0x40000005, 0x00000007, 0x80000010, 0xA0000000, 0xC0000001, 0xE0000002], dtype=np.uint32)
    dec = lm.decode_words(ws)
    assert dec["prompt"].tolist() == [True, False, False, False, False, False]
    assert dec["delayed"].tolist() == [False, True, False, False, False, False]
    assert dec["time"].tolist() == [False, False, True, False, False, False]
    assert dec["other"].tolist() == [False, False, False, True, True, True]
    assert int(dec["address"][0]) == 5 and int(dec["time_ms"][2]) == 16
    assert math.isclose(lm.encode_time_tag(16), 0x80000010)


def test_data_offset_and_empty_file(tmp_path, span11):
    _needs_header_copy(tmp_path)
    text = LM_HDR.read_text()
    ws = [lm.encode_time_tag(0), _word(0, 10, 5, 172), _word(1, 3, 0, 0, prompt=False)]
    hdr = write_lm(tmp_path, [0xDEADBEEF, 0x12345678] + ws, header_text=text.replace(
        "!data offset in bytes:=0", "!data offset in bytes:=8"))
    p, d, info = lm.histogram_listmode(hdr, span11, progress=False)
    assert as_counter(p, d) == Counter({("prompt", 20, 5, 172): 1, ("delayed", 7, 0, 0): 1})
    assert info.words_in_file == 3 and lm.scan_listmode(hdr).words == 3
    empty = write_lm(tmp_path, [], name="empty.l")
    s = lm.scan_listmode(empty)
    assert (s.words, s.first_time_ms, s.last_time_ms) == (0, None, None)
    p, d, info = lm.histogram_listmode(empty, span11, progress=False)
    assert info.prompts == 0 and not p.any()


# ----------------------------------------------------------------------------- the shared detector-pair mapping
@pytest.mark.parametrize("n", [96, 504])
def test_view_tangential_for_det_pair_inverts_stirs_det_pair_table(n):
    """STIR's det1det2 -> (view, tang, swap) inverts (view, tang) -> det1det2 for |t| < n/2, without a swap;
    exchanging the detectors gives the same (view, tang) with the swap flag set."""
    v = np.arange(n // 2)[:, None]
    t = np.arange(-(n // 2) + 1, n // 2)[None, :]
    d1, d2 = lm.det_pair_for_view_tangential(v, t, n)
    vv, tt, sw = lm.view_tangential_for_det_pair(d1, d2, n)
    assert np.array_equal(vv, np.broadcast_to(v, vv.shape)) and np.array_equal(tt, np.broadcast_to(t, tt.shape))
    assert not sw.any()
    vv, tt, sw = lm.view_tangential_for_det_pair(d2, d1, n)
    assert np.array_equal(vv, np.broadcast_to(v, vv.shape)) and np.array_equal(tt, np.broadcast_to(t, tt.shape))
    assert sw.all()


@pytest.mark.parametrize("span", [1, 11])
def test_detector_pair_mapping_agrees_with_the_address_decoder(span):
    """The function PETSIRD histogramming uses (rings + detectors -> bin) puts random span-1 mMR bins where the
    independent per-word reference (ref_span1_bin, ref_output_row) does, whichever detector comes first."""
    geom = SinogramGeometry.from_span(MMR, span=span, max_ring_diff=60)
    layout = lm.ListmodeLayout(64, 504, 60, 252, 344)
    rng = np.random.default_rng(11)
    addresses = rng.integers(0, layout.num_addresses, 2000)
    expected = []
    for a in addresses:
        seg, ax, view, tang = ref_span1_bin(int(a))
        row = ref_output_row(seg, ax, geom)
        expected.append(-1 if row is None else (row * 252 + view) * 344 + tang + 172)
    seg, ax, view, tang = lm.decode_bin_address(addresses, layout)
    r1, r2 = lm.span1_ring_pair(seg, ax)
    d1, d2 = lm.det_pair_for_view_tangential(view, tang, 504)
    assert lm.bin_for_detector_pair(geom, r1, d1, r2, d2).tolist() == expected
    assert lm.bin_for_detector_pair(geom, r2, d2, r1, d1).tolist() == expected
