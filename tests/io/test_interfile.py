"""Interfile I/O (sirf_fbsem.io.interfile): STIR's headers, layouts and errors.

Real files are read from ../shared/data (STIR's and SIRF's example data, never copied
into the repository); the tests that need them are skipped when that folder is absent.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sirf_fbsem.geometry import ImageGeometry, Scanner, SinogramGeometry, scanner_preset
from sirf_fbsem.io.interfile import (
    InterfileError,
    SinogramStorageOrder,
    image_geometry_from_header,
    normalise_key,
    parse_header,
    parse_list,
    read_image,
    read_projdata,
    scanner_from_header,
    sinogram_geometry_from_header,
    write_image,
    write_projdata,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared example data not found at {DATA}")


def _shared(pattern_list: list[str]) -> list[Path]:
    if not DATA.is_dir():
        return []
    found: set[Path] = set()
    for pattern in pattern_list:
        found.update(DATA.rglob(pattern))
    return sorted(found)


ALL_HEADERS = _shared(["*.hs", "*.hv", "*.hdr", "*.hdr.STIR"])
SINOGRAMS_WITH_DATA = {  # header -> (shape, allow_negative)
    "stir/recon_test_pack/scatter_cylinder.hs": ((1, 8, 32, 35), False),
    # arc-corrected demo data: arc correction (interpolation) left small negative values
    "stir/examples/recon_demo/smalllong.hs": ((1, 27, 64, 75), True),
}
IMAGES_WITH_DATA = {
    "stir/examples/recon_demo/init.hv": (31, 60, 60),
    "stir/recon_test_pack/test_image_3.hv": (31, 97, 97),
    "sirf/examples/PET/brain/emission.hv": (15, 211, 211),
    "sirf/examples/PET/brain/attenuation.hv": (15, 211, 211),
    "sirf/examples/PET/thorax_single_slice/emission.hv": (1, 155, 155),
    "sirf/examples/PET/thorax_single_slice/attenuation.hv": (1, 155, 155),
    "sirf/examples/PET/mMR/mu_map.hv": (127, 57, 57),
    "sirf/examples/PET/test_image_PM_QP_6.hv": (31, 60, 60),
}


def _assert_scanner_close(a: Scanner, b: Scanner) -> None:
    for f in dataclasses.fields(Scanner):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, float):
            assert va == pytest.approx(vb, rel=1e-9, abs=1e-12), f.name
        else:
            assert va == vb, f.name


def _small_geometry(arc_corrected: bool) -> SinogramGeometry:
    scanner = scanner_preset("small_test")
    return SinogramGeometry.from_span(scanner, span=3, max_ring_diff=4, arc_corrected=arc_corrected)


# --------------------------------------------------------------------------- header syntax
def test_keys_are_normalised_as_stir_does():
    assert normalise_key("!matrix size [1]") == "matrix size[1]"
    assert normalise_key("Inner   ring_diameter (cm)") == "inner ring diameter (cm)"
    assert normalise_key("energy window lower level[1]") == "energy window lower level[1]"
    assert parse_list("{ 27,49 , 71}") == ["27", "49", "71"]
    assert parse_list("{arc correction}") == ["arc correction"]
    assert parse_list("8") == ["8"]
    assert parse_list("{}") == []
    with pytest.raises(ValueError, match="closing"):
        parse_list("{1,2")


def test_parse_header_comments_indices_continuation(tmp_path):
    p = tmp_path / "x.hv"
    p.write_text(
        "!INTERFILE  :=\n"
        "; a comment := with a key-like text\n"
        "!Matrix_Size [2] := 126 ; 252\n"
        "name of data file := x.v\n"
        "minimum ring difference per segment := { -1,\\\n"
        "0, 1}\n"
        "number of time frames := 1\n"
        "number of time frames := 2\n"
        "!END OF INTERFILE :=\n"
        "after end := ignored\n"
    )
    hdr = parse_header(p)
    assert hdr.path == p
    assert hdr.get_int("matrix size [2]") == 126  # read as a C++ stream reads it
    assert hdr.get("Matrix size[2]") == "126 ; 252"
    assert hdr.get_int_list("minimum ring difference per segment") == [-1, 0, 1]
    assert hdr.get_int("number of time frames") == 2  # last occurrence wins (STIR)
    assert "after end" not in hdr
    assert hdr.data_file == tmp_path / "x.v"


def test_parse_header_rejects_non_headers(tmp_path):
    p = tmp_path / "no_start.hs"
    p.write_text("name of data file := x.s\n")
    with pytest.raises(InterfileError, match="INTERFILE") as e:
        parse_header(p)
    assert str(p) in str(e.value)
    b = tmp_path / "binary.s"
    b.write_bytes(np.zeros(16, np.float32).tobytes())
    with pytest.raises(InterfileError, match="binary"):
        parse_header(b)
    with pytest.raises(InterfileError, match="does not exist"):
        parse_header(tmp_path / "absent.hs")


# --------------------------------------------------------------------------- real headers and data
@needs_data
def test_mmr_span11_template_geometry():
    g = sinogram_geometry_from_header(DATA / "stir/examples/Siemens-mMR/template_span11.hs")
    assert len(g.segments) == 11
    assert g.num_sinograms == 837
    assert g.num_views == 252
    assert g.num_tangential_poss == 344
    assert not g.arc_corrected
    ref = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=60)
    _assert_scanner_close(g.scanner, ref.scanner)
    assert g.segments == ref.segments
    assert g.shape == ref.shape == (1, 837, 252, 344)
    assert g.tangential_bin_size_mm == pytest.approx(ref.tangential_bin_size_mm)


@needs_data
def test_mmr_span1_template_geometry():
    g = sinogram_geometry_from_header(DATA / "stir/examples/Siemens-mMR/template_span1.hs")
    ref = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=1, max_ring_diff=60)
    assert len(g.segments) == 121
    assert g.num_sinograms == 4084
    assert not g.arc_corrected
    _assert_scanner_close(g.scanner, ref.scanner)
    assert g.segments == ref.segments
    assert (g.num_views, g.num_tangential_poss) == (252, 344)


@needs_data
@pytest.mark.parametrize("path", ALL_HEADERS, ids=lambda p: str(p.relative_to(DATA)))
def test_every_shared_header_parses(path):
    hdr = parse_header(path)
    assert hdr.entries
    if path.suffix == ".hs":
        if "timing positions" in (hdr.get("matrix axis label [5]") or ""):
            with pytest.raises(InterfileError, match="TOF"):
                sinogram_geometry_from_header(hdr)
        else:
            g = sinogram_geometry_from_header(hdr)  # also when the data file is absent
            assert g.num_sinograms >= 1
    elif path.suffix == ".hv":
        assert image_geometry_from_header(hdr).num_voxels >= 1


@needs_data
@pytest.mark.parametrize("rel", sorted(SINOGRAMS_WITH_DATA))
def test_shared_sinograms_read(rel):
    shape, allow_negative = SINOGRAMS_WITH_DATA[rel]
    g, y = read_projdata(DATA / rel, allow_negative=allow_negative)
    assert y.shape == g.shape == shape
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    assert y.max() > 0


@needs_data
@pytest.mark.parametrize("rel", sorted(IMAGES_WITH_DATA))
def test_shared_images_read(rel):
    g, x = read_image(DATA / rel)
    assert x.shape == g.shape == IMAGES_WITH_DATA[rel]
    assert x.dtype == np.float32
    assert np.isfinite(x).all()


@needs_data
def test_shared_image_values_and_origin():
    # thorax: first pixel offset -240.933 = -(155 // 2) * 3.129, so STIR's origin is 0
    g, x = read_image(DATA / "sirf/examples/PET/thorax_single_slice/emission.hv")
    assert g.voxel_size_mm == (6.75, 3.129, 3.129)
    assert g.origin_mm == (0.0, 0.0, 0.0)
    raw = np.fromfile(DATA / "sirf/examples/PET/thorax_single_slice/emission.v", "<f4").reshape(1, 155, 155)
    np.testing.assert_array_equal(x, raw)


@needs_data
def test_smalllong_negative_values_are_an_error_by_default():
    with pytest.raises(InterfileError) as e:
        read_projdata(DATA / "stir/examples/recon_demo/smalllong.hs")
    msg = str(e.value)
    assert "smalllong.s" in msg and "negative" in msg and "allow_negative" in msg


@needs_data
def test_rewrite_stir_file_gives_identical_data_bytes(tmp_path):
    src = DATA / "stir/examples/recon_demo/smalllong.hs"
    g, y = read_projdata(src, allow_negative=True)
    write_projdata(tmp_path / "copy.hs", g, y)
    assert (tmp_path / "copy.s").read_bytes() == (DATA / "stir/examples/recon_demo/smalllong.s").read_bytes()
    g2, y2 = read_projdata(tmp_path / "copy.hs", allow_negative=True)
    assert g2 == g
    np.testing.assert_array_equal(y2, y)


@needs_data
def test_scanner_filled_from_stir_table_when_header_has_no_block():
    # Utahscat600k: 'originating system := PRT-1' and no scanner block (STIR's RPT)
    hdr = parse_header(DATA / "stir/recon_test_pack/Utahscat600k_ca_seg4.hs")
    s = scanner_from_header(hdr)
    assert (s.num_rings, s.num_detectors_per_ring) == (16, 384)
    assert s.inner_ring_radius_mm == 373.0 and s.average_depth_of_interaction_mm == 7.0
    assert s.ring_spacing_mm == 6.75 and s.default_bin_size_mm == 3.1088
    assert s.view_offset_deg == -0.46875
    g = sinogram_geometry_from_header(hdr)
    assert g.arc_corrected and g.tangential_bin_size_mm == 3.1088
    assert g.segment_nums == list(range(-4, 5))


@needs_data
def test_default_bin_size_minus_one_is_kept():
    s = scanner_from_header(DATA / "stir/recon_test_pack/scatter_cylinder.hs")
    assert s.default_bin_size_mm <= 0
    assert s.inner_ring_radius_mm == 443.1 and s.average_depth_of_interaction_mm == 8.4


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("arc_corrected", [False, True])
@pytest.mark.parametrize("order", list(SinogramStorageOrder))
def test_projdata_round_trip(tmp_path, rng, arc_corrected, order):
    g = _small_geometry(arc_corrected)
    y = rng.random(g.shape, dtype=np.float32) * 10
    write_projdata(tmp_path / "scan.hs", g, y, storage_order=order)
    g2, y2 = read_projdata(tmp_path / "scan.hs")
    assert g2 == g
    np.testing.assert_array_equal(y2, y)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.hs", "scan.s"]


def test_projdata_round_trip_mmr_span11_geometry(tmp_path):
    g = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=60)
    small = dataclasses.replace(g, num_views=2, num_tangential_poss=4)  # header exactly as mMR, few bins
    y = np.arange(np.prod(small.shape), dtype=np.float32).reshape(small.shape)
    write_projdata(tmp_path / "mmr", small, y, patient_position="HFS", time_frame=(10.0, 60.0))
    hdr = parse_header(tmp_path / "mmr.hs")
    assert hdr.get("originating system") == "Siemens mMR"
    assert hdr.get_int("number of crystals per block in transaxial direction") == 9
    assert hdr.get("inner ring diameter (cm)") == "65.6"
    assert hdr.patient_position == "HFS"
    assert hdr.time_frames == [(10.0, 60.0)]
    g2, y2 = read_projdata(tmp_path / "mmr.s")
    assert g2 == small
    np.testing.assert_array_equal(y2, y)


@needs_data
def test_round_trip_ge_signa_geometry(tmp_path, rng):
    # negative view offset, 45 segments of uneven ring-difference ranges
    g = sinogram_geometry_from_header(DATA / "stir/examples/GE-Signa-PETMR/template.hs")
    small = dataclasses.replace(g, num_views=2, num_tangential_poss=3)
    y = rng.random(small.shape, dtype=np.float32)
    write_projdata(tmp_path / "signa.hs", small, y)
    g2, y2 = read_projdata(tmp_path / "signa.hs")
    assert g2 == small and g2.scanner.view_offset_deg == -5.23
    np.testing.assert_array_equal(y2, y)


@needs_data
def test_written_header_matches_stirs_mmr_template(tmp_path):
    g = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=60)
    small = dataclasses.replace(g, num_views=2, num_tangential_poss=4)
    write_projdata(tmp_path / "mmr.hs", small, np.zeros(small.shape, np.float32))
    ours = parse_header(tmp_path / "mmr.hs")
    stirs = parse_header(DATA / "stir/examples/Siemens-mMR/template_span11.hs")
    differ = {  # file name, our views/bins, STIR's energy windows and key version
        "name of data file", "matrix size[1]", "matrix size[3]", "effective central bin size (cm)",
        "version of keys", "number of energy windows", "energy window lower level[1]", "energy window upper level[1]",
    }
    for key in stirs.entries.keys() - differ:
        assert key in ours.entries, key
        a, b = ours.entries[key], stirs.entries[key]
        try:
            assert [float(x) for x in parse_list(a)] == [float(x) for x in parse_list(b)], key
        except ValueError:
            assert a.replace(" ", "") == b.replace(" ", ""), key
    assert ours.get_float("effective central bin size (cm)") == pytest.approx(0.208815, abs=1e-6)


@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 9, 8)])
def test_image_round_trip(tmp_path, rng, shape):
    g = ImageGeometry(shape=shape, voxel_size_mm=(2.03125, 2.08626, 1.1), origin_mm=(-3.5, 12.25, 0.1))
    x = rng.standard_normal(shape).astype(np.float32)
    write_image(tmp_path / "img.hv", g, x, patient_position="FFP")
    g2, x2 = read_image(tmp_path / "img.hv")
    assert g2 == g  # voxel sizes and origin exactly
    np.testing.assert_array_equal(x2, x)
    assert parse_header(tmp_path / "img.hv").patient_position == "FFP"
    # STIR: first pixel offset = min_index * voxel_size + origin, min index -(n // 2) in x and y, 0 in z
    hdr = parse_header(tmp_path / "img.hv")
    assert hdr.get_float("first pixel offset (mm) [1]") == pytest.approx(0.1 - (shape[2] // 2) * 1.1)
    assert hdr.get_float("first pixel offset (mm) [2]") == pytest.approx(12.25 - (shape[1] // 2) * 2.08626)
    assert hdr.get_float("first pixel offset (mm) [3]") == pytest.approx(-3.5)
    assert (tmp_path / "img.v").stat().st_size == x.size * 4


# --------------------------------------------------------------------------- segment order on disk
def _coded_value(seg: int, ax: int, view: int) -> float:
    return 10000.0 * (seg + 5) + 100.0 * ax + view


def _hand_written_projdata(folder: Path, g: SinogramGeometry, order: SinogramStorageOrder,
                           file_segments: list[int], name: str = "hand") -> Path:
    """A .hs/.s pair written without the package's writer: data in STIR's file order, by explicit loops."""
    segs = [g.segment(n) for n in file_segments]
    values = []
    for seg in segs:
        if order is SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG:
            loops = ((v, a) for v in range(g.num_views) for a in range(seg.num_axial_poss))
        else:
            loops = ((v, a) for a in range(seg.num_axial_poss) for v in range(g.num_views))
        for v, a in loops:
            values.extend([_coded_value(seg.segment_num, a, v)] * g.num_tangential_poss)
    (folder / f"{name}.s").write_bytes(np.asarray(values, "<f4").tobytes())
    labels = ("axial coordinate", "view") if order is SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG \
        else ("view", "axial coordinate")
    sizes = {"view": str(g.num_views), "axial coordinate": "{" + ",".join(str(s.num_axial_poss) for s in segs) + "}"}
    s = g.scanner
    (folder / f"{name}.hs").write_text(
        "!INTERFILE  :=\n"
        f"name of data file := {name}.s\n"
        "!GENERAL DATA :=\n!GENERAL IMAGE DATA :=\n!type of data := PET\n"
        "imagedata byte order := LITTLEENDIAN\n"
        "!PET STUDY (General) :=\n!PET data type := Emission\n"
        "applied corrections := {None}\n"
        "!number format := float\n!number of bytes per pixel := 4\n"
        "number of dimensions := 4\n"
        f"matrix axis label [4] := segment\n!matrix size [4] := {len(segs)}\n"
        f"matrix axis label [3] := {labels[1]}\n!matrix size [3] := {sizes[labels[1]]}\n"
        f"matrix axis label [2] := {labels[0]}\n!matrix size [2] := {sizes[labels[0]]}\n"
        f"matrix axis label [1] := tangential coordinate\n!matrix size [1] := {g.num_tangential_poss}\n"
        "minimum ring difference per segment := {" + ",".join(str(x.min_ring_diff) for x in segs) + "}\n"
        "maximum ring difference per segment := {" + ",".join(str(x.max_ring_diff) for x in segs) + "}\n"
        "Scanner parameters:=\n"
        f"Number of rings := {s.num_rings}\n"
        f"Number of detectors per ring := {s.num_detectors_per_ring}\n"
        f"Inner ring diameter (cm) := {2 * s.inner_ring_radius_mm / 10}\n"
        f"Average depth of interaction (cm) := {s.average_depth_of_interaction_mm / 10}\n"
        f"Distance between rings (cm) := {s.ring_spacing_mm / 10}\n"
        f"Default bin size (cm) := {s.default_bin_size_mm / 10}\n"
        "end scanner parameters:=\n"
        "!END OF INTERFILE :=\n"
    )
    return folder / f"{name}.hs"


def _expected_sirf_array(g: SinogramGeometry) -> np.ndarray:
    seg_of_row, ax_of_row = g.sinogram_index_table()
    views = np.arange(g.num_views)
    rows = 10000.0 * (seg_of_row[:, None] + 5) + 100.0 * ax_of_row[:, None] + views[None, :]
    return np.broadcast_to(rows[None, :, :, None], g.shape).astype(np.float32)


@pytest.mark.parametrize("order", list(SinogramStorageOrder))
def test_hand_written_file_reads_into_sirf_order(tmp_path, order):
    g = _small_geometry(False)  # segments -1, 0, +1 with 11, 15, 11 axial positions
    hs = _hand_written_projdata(tmp_path, g, order, file_segments=[-1, 0, 1])
    g2, y = read_projdata(hs)
    assert g2.segments == g.segments
    np.testing.assert_array_equal(y, _expected_sirf_array(g))
    # SIRF order: rows 0..14 are segment 0, then +1, then -1
    assert y[0, 0, 3, 0] == _coded_value(0, 0, 3)
    assert y[0, 15, 0, 0] == _coded_value(+1, 0, 0)
    assert y[0, 26 + 10, 47, 5] == _coded_value(-1, 10, 47)


def test_segment_numbers_follow_ring_differences_not_file_position(tmp_path):
    # STIR's find_segment_sequence: a file listing segments as 0, -1, +1 is still read right
    g = _small_geometry(False)
    hs = _hand_written_projdata(tmp_path, g, SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG, file_segments=[0, -1, 1])
    _, y = read_projdata(hs)
    np.testing.assert_array_equal(y, _expected_sirf_array(g))


def test_writer_uses_stir_default_layout(tmp_path):
    g = _small_geometry(False)
    write_projdata(tmp_path / "w.hs", g, _expected_sirf_array(g))
    hand = _hand_written_projdata(tmp_path, g, SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG, [-1, 0, 1])
    assert (tmp_path / "w.s").read_bytes() == hand.with_suffix(".s").read_bytes()
    hdr = parse_header(tmp_path / "w.hs")
    assert hdr.get("matrix axis label [2]") == "axial coordinate"
    assert hdr.get("matrix axis label [3]") == "view"
    assert hdr.get_int_list("matrix size [2]") == [11, 15, 11]
    assert hdr.get_int_list("minimum ring difference per segment") == [-4, -1, 2]


# --------------------------------------------------------------------------- number formats and byte order
def _image_header(folder: Path, name: str, nx: int, ny: int, nz: int, fmt: str, nbytes: int, order: str,
                  extra: str = "") -> Path:
    p = folder / f"{name}.hv"
    p.write_text(
        "!INTERFILE  :=\n"
        f"name of data file := {name}.v\n"
        "!GENERAL DATA :=\n!GENERAL IMAGE DATA :=\n!type of data := PET\n"
        f"imagedata byte order := {order}\n"
        "!PET STUDY (General) :=\n!PET data type := Image\n"
        f"!number format := {fmt}\n!number of bytes per pixel := {nbytes}\n"
        "number of dimensions := 3\n"
        f"matrix axis label [1] := x\n!matrix size [1] := {nx}\nscaling factor (mm/pixel) [1] := 2\n"
        f"matrix axis label [2] := y\n!matrix size [2] := {ny}\nscaling factor (mm/pixel) [2] := 2\n"
        f"matrix axis label [3] := z\n!matrix size [3] := {nz}\nscaling factor (mm/pixel) [3] := 3\n"
        f"{extra}"
        "!END OF INTERFILE :=\n"
    )
    return p


def test_bigendian_float_image(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 7
    (tmp_path / "be.v").write_bytes(x.astype(">f4").tobytes())
    _, y = read_image(_image_header(tmp_path, "be", 4, 3, 2, "float", 4, "BIGENDIAN"))
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("order,code", [("LITTLEENDIAN", "<i2"), ("BIGENDIAN", ">i2")])
def test_signed_integer_image_with_scaling(tmp_path, order, code):
    x = np.arange(-12, 12, dtype=np.int16).reshape(2, 3, 4) * 100
    (tmp_path / "i2.v").write_bytes(x.astype(code).tobytes())
    hv = _image_header(tmp_path, "i2", 4, 3, 2, "signed integer", 2, order, "image scaling factor[1] := 0.5\n")
    _, y = read_image(hv)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float32) * 0.5)


def test_float64_and_offset(tmp_path):
    x = np.linspace(0, 1, 24).reshape(2, 3, 4)
    (tmp_path / "f8.v").write_bytes(b"\x00" * 16 + x.astype("<f8").tobytes())
    hv = _image_header(tmp_path, "f8", 4, 3, 2, "float", 8, "LITTLEENDIAN", "data offset in bytes[1] := 16\n")
    _, y = read_image(hv)
    np.testing.assert_array_equal(y, x.astype(np.float32))


def test_bigendian_signed_integer_projdata(tmp_path):
    g = _small_geometry(False)
    hs = _hand_written_projdata(tmp_path, g, SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG, [-1, 0, 1])
    raw = np.fromfile(hs.with_suffix(".s"), "<f4").astype(np.int32)
    hs.with_suffix(".s").write_bytes(raw.astype(">i4").tobytes())
    text = hs.read_text().replace("LITTLEENDIAN", "BIGENDIAN").replace(":= float", ":= signed integer")
    hs.write_text(text)
    _, y = read_projdata(hs)
    np.testing.assert_array_equal(y, _expected_sirf_array(g))


@pytest.mark.parametrize(
    "fmt,nbytes,order,key",
    [("complex", 8, "LITTLEENDIAN", "number format"), ("float", 2, "LITTLEENDIAN", "number of bytes per pixel"),
     ("float", 4, "MIDDLEENDIAN", "imagedata byte order")],
)
def test_unsupported_formats_name_the_key(tmp_path, fmt, nbytes, order, key):
    (tmp_path / "u.v").write_bytes(b"\x00" * 24 * nbytes)
    hv = _image_header(tmp_path, "u", 4, 3, 2, fmt, nbytes, order)
    with pytest.raises(InterfileError) as e:
        read_image(hv)
    msg = str(e.value)
    assert f"'{key}'" in msg and str(hv) in msg
    if key == "number format":
        assert "'complex'" in msg and "float" in msg and "signed integer" in msg


# --------------------------------------------------------------------------- bad input
def _written_scan(tmp_path: Path, rng) -> tuple[Path, SinogramGeometry, np.ndarray]:
    g = _small_geometry(False)
    y = rng.random(g.shape, dtype=np.float32)
    write_projdata(tmp_path / "scan.hs", g, y)
    return tmp_path / "scan.hs", g, y


@pytest.mark.parametrize("change", [-4, +4])
def test_data_file_of_wrong_size(tmp_path, rng, change):
    hs, g, _ = _written_scan(tmp_path, rng)
    data = hs.with_suffix(".s")
    good = data.read_bytes()
    data.write_bytes(good[:change] if change < 0 else good + b"\x00" * change)
    with pytest.raises(InterfileError) as e:
        read_projdata(hs)
    msg = str(e.value)
    _, S, V, N = g.shape
    assert "'scan.s'" in msg and str(hs) in msg and "matrix size" in msg
    assert f"has {len(good) + change:,} bytes" in msg and f"expects {len(good):,}" in msg
    assert f"{S}x{V}x{N} float32" in msg


def test_missing_data_file(tmp_path, rng):
    hs, _, _ = _written_scan(tmp_path, rng)
    hs.with_suffix(".s").unlink()
    with pytest.raises(InterfileError) as e:
        read_projdata(hs)
    assert "name of data file" in str(e.value) and "does not exist" in str(e.value) and str(hs) in str(e.value)
    # the geometry is still available from the header alone
    assert sinogram_geometry_from_header(hs) == _small_geometry(False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_is_an_error(tmp_path, rng, bad):
    hs, g, y = _written_scan(tmp_path, rng)
    y[0, 20, 3, 4] = bad
    # the writer refuses these (checked below), so put one into the file by hand
    raw = np.fromfile(hs.with_suffix(".s"), "<f4")
    raw[7] = bad
    raw.tofile(hs.with_suffix(".s"))
    with pytest.raises(InterfileError) as e:
        read_projdata(hs, allow_negative=True)
    assert "'scan.s'" in str(e.value) and "NaN or Inf" in str(e.value)
    with pytest.raises(InterfileError, match="NaN/Inf"):
        write_projdata(tmp_path / "out.hs", g, y)
    assert not (tmp_path / "out.hs").exists() and not (tmp_path / "out.s").exists()


def test_negative_values(tmp_path, rng):
    hs, g, y = _written_scan(tmp_path, rng)
    y[0, 16, 0, 1] = -2.0  # segment +1, axial position 1
    write_projdata(hs, g, y)
    with pytest.raises(InterfileError) as e:
        read_projdata(hs)
    msg = str(e.value)
    assert "'scan.s'" in msg and "negative" in msg and "segment 1, axial position 1, view 0" in msg
    _, y2 = read_projdata(hs, allow_negative=True)
    assert y2[0, 16, 0, 1] == -2.0


def test_non_finite_image_is_an_error(tmp_path):
    x = np.ones((2, 3, 4), np.float32)
    x[1, 2, 3] = np.nan
    (tmp_path / "n.v").write_bytes(x.astype("<f4").tobytes())
    with pytest.raises(InterfileError) as e:
        read_image(_image_header(tmp_path, "n", 4, 3, 2, "float", 4, "LITTLEENDIAN"))
    assert "'n.v'" in str(e.value) and "(1, 2, 3)" in str(e.value)


def test_missing_required_keys(tmp_path):
    hv = _image_header(tmp_path, "m", 4, 3, 2, "float", 4, "LITTLEENDIAN")
    hv.write_text(hv.read_text().replace("!matrix size [2] := 3\n", ""))
    with pytest.raises(InterfileError) as e:
        read_image(hv)
    assert "'matrix size [2]'" in str(e.value) and "no such key" in str(e.value)
    g = _small_geometry(False)
    hs = _hand_written_projdata(tmp_path, g, SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG, [-1, 0, 1])
    hs.write_text(hs.read_text().replace("Inner ring diameter (cm)", "Inner ring radius (cm)"))
    with pytest.raises(InterfileError) as e:
        sinogram_geometry_from_header(hs)
    assert "'inner ring diameter (cm)'" in str(e.value) and str(hs) in str(e.value)


def test_header_pointing_at_itself_has_no_data(tmp_path, rng):
    hs, _, _ = _written_scan(tmp_path, rng)
    hs.write_text(hs.read_text().replace("name of data file := scan.s", "name of data file := scan.hs"))
    with pytest.raises(InterfileError, match="header itself"):
        read_projdata(hs)


def test_writer_rejects_wrong_shape_and_leaves_nothing(tmp_path):
    g = _small_geometry(False)
    with pytest.raises(InterfileError, match="shape"):
        write_projdata(tmp_path / "s.hs", g, np.zeros((1, 3, 4, 5), np.float32))
    with pytest.raises(InterfileError, match="shape"):
        write_image(tmp_path / "i.hv", ImageGeometry((2, 3, 4), (1.0, 1.0, 1.0)), np.zeros((4, 3, 2)))
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_files(tmp_path, rng):
    hs, g, y = _written_scan(tmp_path, rng)
    before = (hs.read_bytes(), hs.with_suffix(".s").read_bytes())
    bad = y.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(InterfileError):
        write_projdata(hs, g, bad)
    assert (hs.read_bytes(), hs.with_suffix(".s").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.hs", "scan.s"]


def test_three_dimensional_input_is_accepted(tmp_path, rng):
    g = _small_geometry(True)
    y = rng.random(g.shape[1:], dtype=np.float32)
    write_projdata(tmp_path / "t", g, y)
    _, y2 = read_projdata(tmp_path / "t.hs")
    np.testing.assert_array_equal(y2[0], y)
