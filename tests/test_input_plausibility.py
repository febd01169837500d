"""Inputs that can be read but lie (issue #15), as a user hits them: through the command line.

Each test copies the bundled phantom sinogram (``test_data/phantom_scan.hs`` + ``.s``) into a
temporary folder, damages it the way a user's file was damaged, runs ``python -m sirf_fbsem
reconstruct`` in a subprocess and checks the exit code (2 for bad input), that stderr names
the file and the header field (and says what to do), that no traceback is shown and that no
output was written. Plausible-but-odd input (prompts that are not counts) runs to the end
with a warning on stderr.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from sirf_fbsem.errors import InputError
from sirf_fbsem.geometry import SinogramGeometry, scanner_preset
from sirf_fbsem.io import interfile
from sirf_fbsem.io import listmode as lm

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "test_data"


def _phantom(folder: Path, name: str = "scan") -> Path:
    """A copy of the phantom sinogram as ``folder/<name>.hs`` + ``.s``; returns the header."""
    shutil.copyfile(TEST_DATA / "phantom_scan.s", folder / f"{name}.s")
    text = (TEST_DATA / "phantom_scan.hs").read_text().replace("phantom_scan.s", f"{name}.s")
    (folder / f"{name}.hs").write_text(text)
    return folder / f"{name}.hs"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def _reconstruct(folder: Path, *args: str) -> subprocess.CompletedProcess:
    out = folder / "out.nii.gz"
    return subprocess.run([sys.executable, "-m", "sirf_fbsem", "reconstruct", *args, "--output", str(out),
                           "--iterations", "1", "--no-progress"],
                          cwd=folder, capture_output=True, text=True, timeout=300)


def _assert_refused(folder: Path, run: subprocess.CompletedProcess, *names: str) -> str:
    """Exit code 2, one clean error line naming every one of ``names``, no traceback, no output."""
    err = run.stderr
    assert run.returncode == 2, f"exit {run.returncode}\nstdout: {run.stdout}\nstderr: {err}"
    assert "Traceback" not in err, err
    assert "sirf-fbsem reconstruct: error:" in err, err
    for name in names:
        assert name in err, f"{name!r} not in: {err}"
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith(("out", ".out")))
    assert leftovers == [], leftovers
    return err


# --------------------------------------------------------------------------- (a) a lying byte order
def test_bigendian_header_on_little_endian_float_data(tmp_path):
    hs = _phantom(tmp_path)
    _edit(hs, "imagedata byte order := LITTLEENDIAN", "imagedata byte order := BIGENDIAN")
    err = _assert_refused(tmp_path, _reconstruct(tmp_path, str(hs)), "scan.hs", "scan.s", "'imagedata byte order'")
    assert "LITTLEENDIAN" in err and "plausible" in err  # the other byte order reads right: say so


def test_wrong_byte_order_of_integer_counts(tmp_path):
    hs = _phantom(tmp_path)
    counts = np.fromfile(tmp_path / "scan.s", dtype="<f4")
    assert np.all(counts == np.rint(counts)) and counts.max() < 256
    counts.astype("<i2").tofile(tmp_path / "scan.s")
    _edit(hs, "imagedata byte order := LITTLEENDIAN", "imagedata byte order := BIGENDIAN")
    _edit(hs, "!number format := float", "!number format := signed integer")
    _edit(hs, "!number of bytes per pixel := 4", "!number of bytes per pixel := 2")
    err = _assert_refused(tmp_path, _reconstruct(tmp_path, str(hs)), "scan.hs", "'imagedata byte order'")
    assert "multiple of 256" in err and "LITTLEENDIAN" in err


def test_bigendian_mu_map_on_little_endian_data(tmp_path):
    hs = _phantom(tmp_path)
    shutil.copyfile(TEST_DATA / "phantom_truth.v", tmp_path / "mu.v")
    text = (TEST_DATA / "phantom_truth.hv").read_text().replace("phantom_truth.v", "mu.v")
    (tmp_path / "mu.hv").write_text(text.replace("LITTLEENDIAN", "BIGENDIAN"))
    _assert_refused(tmp_path, _reconstruct(tmp_path, str(hs), "--mu-map", "mu.hv"), "mu.hv",
                    "'imagedata byte order'")


def test_correct_byte_orders_are_not_questioned(tmp_path):
    """Little- and big-endian files that say so truthfully read the same values."""
    hs = _phantom(tmp_path)
    _, y = interfile.read_projdata(hs)
    be = _phantom(tmp_path, "be")
    np.fromfile(tmp_path / "be.s", dtype="<f4").astype(">f4").tofile(tmp_path / "be.s")
    _edit(be, "imagedata byte order := LITTLEENDIAN", "imagedata byte order := BIGENDIAN")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, y_be = interfile.read_projdata(be)
    np.testing.assert_array_equal(y, y_be)


# --------------------------------------------------------------------------- (b) prompts that are not counts
def test_prompts_that_are_not_integer_counts_warn_and_run(tmp_path):
    hs = _phantom(tmp_path)
    data = np.fromfile(tmp_path / "scan.s", dtype="<f4")
    (data * np.float32(0.73)).astype("<f4").tofile(tmp_path / "scan.s")  # scaled (e.g. decay-corrected) data
    run = _reconstruct(tmp_path, str(hs))
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "PlausibilityWarning" in run.stderr and "not integer counts" in run.stderr and "scan.hs" in run.stderr
    assert (tmp_path / "out.nii.gz").is_file()


def test_integer_prompts_and_non_count_terms_do_not_warn(tmp_path):
    """The warning is for the prompts only: the phantom's additive term has fractions, and is fine."""
    from sirf_fbsem.acquisition import load_acquisition

    hs = _phantom(tmp_path)
    for name in ("phantom_additive.hs", "phantom_additive.s"):
        shutil.copyfile(TEST_DATA / name, tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", interfile.PlausibilityWarning)
        acq = load_acquisition(hs, additive=tmp_path / "phantom_additive.hs", progress=False)
    assert not np.all(acq.additive == np.rint(acq.additive))
    with pytest.warns(interfile.PlausibilityWarning, match="phantom_additive.hs"):
        load_acquisition(tmp_path / "phantom_additive.hs", progress=False)


# --------------------------------------------------------------------------- (c) ring count vs axial layout
@pytest.mark.parametrize("rings", [6, 7])
def test_number_of_rings_too_small_for_the_segments(tmp_path, rings):
    hs = _phantom(tmp_path)
    _edit(hs, "Number of rings                          := 8", f"Number of rings := {rings}")
    err = _assert_refused(tmp_path, _reconstruct(tmp_path, str(hs)), "scan.hs", f"'number of rings' := {rings}")
    assert "ring difference" in err and "extent" not in err  # the header fields, not an image-extent symptom


def test_axial_positions_beyond_the_rings(tmp_path):
    hs = _phantom(tmp_path)
    _edit(hs, "{ 5,11,15,11,5}", "{ 5,11,17,11,5}")
    err = _assert_refused(tmp_path, _reconstruct(tmp_path, str(hs)), "scan.hs", "'number of rings' := 8",
                          "'matrix size [2]' gives 17", "at most 15")
    assert "bytes" not in err  # the header's own inconsistency, found before the data file's size


def test_axial_positions_off_the_ring_pairs(tmp_path):
    hs = _phantom(tmp_path)
    _edit(hs, "{ 5,11,15,11,5}", "{ 5,11,14,11,5}")
    _assert_refused(tmp_path, _reconstruct(tmp_path, str(hs)), "scan.hs", "'number of rings' := 8",
                    "'matrix size [2]' gives 14")


# --------------------------------------------------------------------------- (d) --time past the data
MINIMAL_LM_HDR = """!INTERFILE:=
!originating system:=2008
!data offset in bytes:=0
name of data file := tiny.l
%LM event and tag words format (bits):=32
%timing tagwords interval (msec):=1
%axial compression:=1
%maximum ring difference:=60
!END OF INTERFILE:=
"""


def _tiny_listmode(folder: Path, n_ms: int = 300) -> Path:
    layout = lm.ListmodeLayout(64, 504, 60, 252, 344)
    words = []
    for t in range(n_ms):
        words += [lm.encode_time_tag(t), lm.encode_event(0, 10, 5, 0, layout), lm.encode_event(1, 3, 7, -3, layout)]
    np.asarray(words + [lm.encode_time_tag(n_ms)], dtype="<u4").tofile(folder / "tiny.l")
    (folder / "tiny.l.hdr").write_text(MINIMAL_LM_HDR)
    return folder / "tiny.l.hdr"


def test_time_interval_wholly_past_the_end_of_the_listmode(tmp_path):
    hdr = _tiny_listmode(tmp_path)
    err = _assert_refused(tmp_path, _reconstruct(tmp_path, str(hdr), "--time", "60", "120"), "tiny.l",
                          "[60, 120) s", "ends at 0.3 s")
    assert "time_interval_s" not in err


def test_time_interval_partly_past_the_end_warns_with_the_effective_interval(tmp_path):
    """Through the library: the CLI would go on to a full mMR reconstruction (minutes)."""
    hdr = _tiny_listmode(tmp_path)
    geom = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=5,
                                      view_mash_factor=126, num_tangential_poss=8)
    with pytest.warns(interfile.PlausibilityWarning) as rec:
        _, _, info = lm.histogram_listmode(hdr, geom, (0.1, 900.0), progress=False)
    msg = str(rec[0].message)
    assert "tiny.l" in msg and "[0.1, 900) s" in msg and "ends at 0.3 s" in msg and "from 0.1 s to 0.3 s" in msg
    assert info.effective_time_interval_s == (0.1, 0.3)
    assert info.prompts == 400  # 2 prompts a millisecond from 100 ms to the last tag at 300 ms
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.histogram_listmode(hdr, geom, (0.1, 0.301), progress=False)  # within a tag interval: no warning


# --------------------------------------------------------------------------- (e) missing and short data files
def test_header_naming_a_missing_data_file(tmp_path):
    hs = _phantom(tmp_path)
    (tmp_path / "scan.s").unlink()
    _assert_refused(tmp_path, _reconstruct(tmp_path, str(hs)), "scan.hs", "'name of data file'", "scan.s",
                    "does not exist")
    with pytest.raises(FileNotFoundError):  # also for programs
        interfile.read_projdata(hs)


def test_truncated_data_file(tmp_path):
    hs = _phantom(tmp_path)
    full = (tmp_path / "scan.s").read_bytes()
    (tmp_path / "scan.s").write_bytes(full[: len(full) // 2 + 3])
    err = _assert_refused(tmp_path, _reconstruct(tmp_path, str(hs)), "scan.hs", "scan.s",
                          f"{len(full) // 2 + 3:,} bytes", f"expects {len(full):,}")
    assert "truncated" in err


def test_listmode_header_naming_a_missing_data_file(tmp_path):
    hdr = _tiny_listmode(tmp_path, 3)
    (tmp_path / "tiny.l").unlink()
    _assert_refused(tmp_path, _reconstruct(tmp_path, str(hdr)), "tiny.l.hdr", "name of data file", "does not exist")
    with pytest.raises(InputError):
        lm.read_listmode_header(hdr)


def test_listmode_shorter_than_its_header_says_warns(tmp_path):
    """A copy cut at a word boundary reads, but the header's word count shows it is not the whole scan."""
    hdr = _tiny_listmode(tmp_path, 3)
    hdr.write_text(MINIMAL_LM_HDR.replace("!END OF INTERFILE:=",
                                          "%total listmode word counts:=1000\n!END OF INTERFILE:="))
    geom = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=5,
                                      view_mash_factor=126, num_tangential_poss=8)
    with pytest.warns(interfile.PlausibilityWarning, match=r"holds 10 words .*'%total listmode word counts' := 1,000"):
        lm.histogram_listmode(hdr, geom, progress=False)
