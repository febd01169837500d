"""``sirf-fbsem reconstruct LIST.l.hdr --norm norm.n.hdr --mu-map mu.hv ...`` on the real mMR files.

The full command (OSEM on the mMR's span-11 sinogram, 172 x 172 x 127 image) takes minutes
on a 2-core machine, so it is marked ``slow`` and runs only with ``SIRF_FBSEM_FULL_E2E=1``;
the fast test checks everything up to the reconstruction on the same files (histogram,
norm, mu-map attenuation on a coarse grid, randoms). The bad-input tests run the CLI on
tiny hand-made listmode files (only the mMR header is needed) and check that each error
names the file and what was expected, and that no output or DICOM folder is left behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sirf_fbsem.cli import main
from sirf_fbsem.geometry import ImageGeometry, SinogramGeometry, scanner_preset
from sirf_fbsem.io import listmode as lm

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LM_HDR = SHARED / "stir" / "recon_test_pack" / "PET_ACQ_small.l.hdr.STIR"
LM_DATA = SHARED / "stir" / "recon_test_pack" / "small_listmode_file.l"
NORM = SHARED / "sirf" / "examples" / "PET" / "mMR" / "norm.n.hdr"
MU = SHARED / "sirf" / "examples" / "PET" / "mMR" / "mu_map.hv"
MMR = scanner_preset("Siemens_mMR")

needs_data = pytest.mark.skipif(
    not all(p.is_file() for p in (LM_HDR, LM_DATA, NORM, MU)),
    reason=f"the mMR listmode, norm and mu-map files are not in {SHARED}",
)
needs_header = pytest.mark.skipif(not LM_HDR.is_file(), reason=f"mMR listmode header {LM_HDR} not present")
full_e2e = pytest.mark.skipif(
    os.environ.get("SIRF_FBSEM_FULL_E2E") != "1",
    reason="minutes on a 2-core CPU; set SIRF_FBSEM_FULL_E2E=1 to run the full mMR reconstruction",
)


def span11() -> SinogramGeometry:
    return SinogramGeometry.from_span(MMR, span=11, max_ring_diff=60)


# ----------------------------------------------------------------------------- the real files
@needs_data
def test_pipeline_up_to_the_reconstruction_on_the_real_mmr_files():
    """Histogram + ECAT8 norm + mu-map attenuation + randoms assembled into one acquisition, mMR span 11."""
    from sirf_fbsem.acquisition import load_acquisition

    summary = lm.scan_listmode(LM_HDR)
    coarse = ImageGeometry((32, 43, 43), (4 * 2.03125, 4 * 2.08626, 4 * 2.08626))  # 4x the default voxels
    acq = load_acquisition(LM_HDR, norm=NORM, mu_map=MU, image=coarse, time_interval_s=(0.0, 0.3), progress=False)
    geom = span11()
    assert acq.geometry == geom and acq.prompts.shape == acq.multiplicative.shape == acq.additive.shape == geom.shape
    # counts: the interval keeps the events before the 300 ms tag, all within the max ring difference 60
    info = acq.histogram.to_metadata()
    assert isinstance(acq.histogram, lm.ListmodeHistogramInfo) and acq.metadata == {**info, "mu_map": str(MU)}
    assert acq.prompts.sum() == info["prompts"] and 0 < info["prompts"] < summary.prompts
    # the header reaches the writers as its typed record (radiopharmaceutical, times)
    assert isinstance(acq.listmode_header, lm.ListmodeHeader) and acq.listmode_header == lm.read_listmode_header(LM_HDR)
    assert info["prompts_outside_geometry"] == 0 and info["current_time_at_end_ms"] == 300
    assert acq.additive.sum() == pytest.approx(info["delayeds"], rel=1e-4) and info["delayeds"] > 0
    # multiplicative = norm efficiencies x attenuation factors exp(-int mu) in (0, 1]
    from sirf_fbsem.io.ecat8_norm import read_ecat8_norm

    norm_only = read_ecat8_norm(NORM).efficiency_sinogram(geom)
    m = acq.multiplicative
    assert np.all(np.isfinite(m)) and m.min() >= 0
    live = norm_only > 0
    att = m[live] / norm_only[live]
    assert att.max() <= 1.0 + 1e-6 and att.min() > np.exp(-0.1 * 0.2 * 600)  # at most 600 mm of bone-like mu
    assert np.mean(att < 0.5) > 0.05 and np.mean(att > 0.999) > 0.05  # LORs through the head, LORs missing it
    assert np.all(m[~live] == 0)  # gap crystals stay dead
    # prompts fall mostly on LORs through the object (attenuation < 1)
    on_object = m < 0.999 * np.where(live, norm_only, 1.0)
    assert acq.prompts[on_object].sum() > 0.6 * acq.prompts.sum()


@needs_data
@pytest.mark.slow
@full_e2e
def test_cli_end_to_end_on_the_real_mmr_files(tmp_path):  # pragma: no cover - minutes; opt-in
    """The README's listmode command, OSEM 1 iteration x 21 subsets, with NIfTI and DICOM outputs."""
    import nibabel as nib
    import pydicom

    out, dcm = tmp_path / "out.nii.gz", tmp_path / "dicom"
    rc = main(["reconstruct", str(LM_HDR), "--norm", str(NORM), "--mu-map", str(MU), "--time", "0", "0.3",
               "--algorithm", "osem", "--iterations", "1", "--subsets", "21", "--output", str(out),
               "--dicom", str(dcm), "--no-progress"])
    assert rc == 0
    image = span11().default_image()
    nii = nib.load(str(out))
    vol = np.asarray(nii.dataobj, dtype=np.float32)
    assert vol.shape == image.shape[::-1] == (285, 285, 127)  # STIR's default image for 344 bins
    assert np.allclose(nii.affine, image.nifti_affine(MMR), atol=1e-4)
    assert np.all(np.isfinite(vol)) and vol.min() >= 0 and vol.sum() > 0
    files = sorted(dcm.glob("*.dcm"))
    assert len(files) == 127
    ds = [pydicom.dcmread(f) for f in files]
    assert {(d.Rows, d.Columns) for d in ds} == {(285, 285)}
    assert [float(v) for v in ds[0].PixelSpacing] == pytest.approx([2.08626, 2.08626], abs=1e-4)
    stack = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds])  # (z, y, x)
    ref = np.transpose(vol, (2, 1, 0))
    assert np.abs(stack - ref).max() <= 1e-3 * ref.max() + 1e-6


# ----------------------------------------------------------------------------- bad input through the CLI
def _tiny_listmode(folder: Path, words, name: str = "tiny.l") -> Path:
    """Hand-made PETLINK words and a copy of the mMR header pointing at them; returns the header."""
    data = folder / name
    np.asarray(words, dtype="<u4").tofile(data)
    hdr = folder / (name + ".hdr")
    hdr.write_text(LM_HDR.read_text().replace("small_listmode_file.l", name))
    return hdr


def _events(n_ms: int = 3) -> list[int]:
    layout = lm.ListmodeLayout(64, 504, 60, 252, 344)
    ws = []
    for t in range(n_ms):
        ws += [lm.encode_time_tag(t), lm.encode_event(0, 10 + t, 5, 0, layout), lm.encode_event(1, 3, 7, -3, layout)]
    return ws + [lm.encode_time_tag(n_ms)]


def _run_failing(args: list[str], out: Path, dicom: Path, capsys) -> str:
    """Run the CLI, expect exit code 2 and no outputs; return stderr."""
    rc = main(["reconstruct", *args, "--algorithm", "osem", "--iterations", "1", "--output", str(out),
               "--dicom", str(dicom), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists() and not dicom.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, dicom.name, "."))]
    assert leftovers == [], leftovers
    return err


@needs_header
def test_truncated_listmode_names_the_file_and_the_bytes(tmp_path, capsys):
    hdr = _tiny_listmode(tmp_path, _events())
    with open(tmp_path / "tiny.l", "ab") as f:
        f.write(b"\x07\x00")  # half a word
    err = _run_failing([str(hdr)], tmp_path / "out.nii.gz", tmp_path / "dcm", capsys)
    assert "tiny.l" in err and "mid-word" in err and "not a multiple of 4" in err


@needs_header
def test_header_pointing_at_a_missing_file_names_header_key_and_path(tmp_path, capsys):
    hdr = _tiny_listmode(tmp_path, _events())
    (tmp_path / "tiny.l").unlink()
    err = _run_failing([str(hdr)], tmp_path / "out.nii.gz", tmp_path / "dcm", capsys)
    assert str(hdr) in err and "name of data file" in err and "tiny.l" in err and "does not exist" in err


@needs_header
def test_time_interval_outside_the_acquisition_names_file_and_range(tmp_path, capsys):
    hdr = _tiny_listmode(tmp_path, _events(3))
    err = _run_failing([str(hdr), "--time", "60", "120"], tmp_path / "out.nii.gz", tmp_path / "dcm", capsys)
    assert "tiny.l" in err and "[60, 120)" in err and "0.003 s" in err


@needs_header
def test_mu_map_in_the_wrong_units_names_the_map_and_the_expected_units(tmp_path, capsys):
    from sirf_fbsem.io.interfile import read_image, write_image

    if not MU.is_file():
        pytest.skip(f"mu-map {MU} not present")
    geom, mu = read_image(MU)
    bad = tmp_path / "mu_per_mm_x10.hv"
    write_image(bad, geom, (mu * 10).astype(np.float32))  # 1/mm x 10 instead of 1/cm: values > 1
    hdr = _tiny_listmode(tmp_path, _events())
    err = _run_failing([str(hdr), "--mu-map", str(bad)], tmp_path / "out.nii.gz", tmp_path / "dcm", capsys)
    assert "mu_per_mm_x10.hv" in err and "1/cm" in err and "water" in err


def test_petsird_interval_outside_the_acquisition_leaves_nothing(tmp_path, capsys):
    pio = pytest.importorskip("sirf_fbsem.io.petsird")
    pytest.importorskip("petsird")
    pairs = np.array([[0, 0, 1, 48], [2, 5, 2, 50]])
    path = pio.write_petsird(tmp_path / "scan.petsird", scanner_preset("small_test"),
                             [pio.PetsirdTimeBlock(0, 1000, pairs)])
    err = _run_failing([str(path), "--time", "5", "6"], tmp_path / "out.nii.gz", tmp_path / "dcm", capsys)
    assert "scan.petsird" in err and "[5, 6)" in err

