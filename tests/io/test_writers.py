"""NIfTI, DICOM and preview writers, checked against third-party readers.

The image is small (9 x 16 x 20, Z x Y x X) with three different voxel sizes and a
non-zero origin, so any mix-up of axes, signs or offsets shows. Expected world
positions are computed here from first principles (STIR's physical voxel placement,
as its ITK/NIfTI writer uses it, and STIR's physical -> LPS flips), not from the
package's own geometry helpers.

Validators (dciodvfy from dicom3tools, dcm2niix) are not installed by the tests;
tests that need them are skipped, with the reason, when they are absent.
"""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="NIfTI tests need nibabel")
pydicom = pytest.importorskip("pydicom", reason="DICOM tests need pydicom")

from sirf_fbsem.geometry import GeometryError, ImageGeometry, scanner_preset  # noqa: E402
from sirf_fbsem.io.dicom import PET_IMAGE_STORAGE, write_dicom_series  # noqa: E402
from sirf_fbsem.io.nifti import read_nifti, write_nifti  # noqa: E402
from sirf_fbsem.preview import save_montage  # noqa: E402

SCANNER = scanner_preset("small_test")  # 8 rings, 4 mm ring spacing
# (nz, ny, nx); (vz, vy, vx) mm; origin (z, y, x) mm
GEOM = ImageGeometry(shape=(9, 16, 20), voxel_size_mm=(2.5, 3.25, 2.0), origin_mm=(5.0, -7.5, 12.25))
HOT = (6, 3, 15)  # (k, j, i) of the hot voxel: z plane, row, column
POSITIONS = ["HFS", "HFP", "FFS", "FFP"]

# STIR DiscretisedDensity::swap_axes_based_on_orientation: physical (x, y, z) -> LPS
LPS_FROM_PHYSICAL = {
    "HFS": lambda x, y, z: (x, y, -z),
    "HFP": lambda x, y, z: (-x, -y, -z),
    "FFS": lambda x, y, z: (-x, y, z),
    "FFP": lambda x, y, z: (x, -y, z),
}


def physical_mm(k: float, j: float, i: float) -> tuple[float, float, float]:
    """STIR physical (x, y, z) of array voxel (k, j, i), as STIR's NIfTI (ITK) writer places it.

    ``get_physical_coordinates_for_indices``: origin + (k vz, j' vy, i' vx) with STIR's
    centred indices j' = j - ny//2, i' = i - nx//2 and k from 0. The first plane sits
    at origin z whatever the image's axial extent (not at a scanner-centred position).
    """
    nz, ny, nx = GEOM.shape
    vz, vy, vx = GEOM.voxel_size_mm
    oz, oy, ox = GEOM.origin_mm
    x = ox + (i - nx // 2) * vx
    y = oy + (j - ny // 2) * vy
    z = oz + k * vz
    return x, y, z


def expected_lps(position: str, k: float, j: float, i: float) -> np.ndarray:
    return np.array(LPS_FROM_PHYSICAL[position](*physical_mm(k, j, i)))


def expected_ras(position: str, k: float, j: float, i: float) -> np.ndarray:
    lps = expected_lps(position, k, j, i)
    return np.array([-lps[0], -lps[1], lps[2]])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """Positive image, different maximum in every slice, one clear hot voxel."""
    rng = np.random.default_rng(1234)
    img = rng.uniform(0.0, 1.0, GEOM.shape) * np.linspace(1.0, 40.0, GEOM.shape[0])[:, None, None]
    img[HOT] = 500.0
    return img


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (apt-get install dicom3tools dcm2niix)")
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------ NIfTI
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_readable_by_nibabel_with_geometry_affine(tmp_path, image, suffix):
    out = write_nifti(tmp_path / f"img{suffix}", image, GEOM, SCANNER, description="test")
    assert out == tmp_path / f"img{suffix}" and out.exists()
    assert leftovers(tmp_path) == [out.name]
    img = nib.load(str(out))
    assert isinstance(img, nib.Nifti1Image)
    assert img.shape == (20, 16, 9)  # (x, y, z)
    assert img.get_data_dtype() == np.float32
    expected = GEOM.nifti_affine(SCANNER, "HFS")
    assert not np.allclose(expected, np.eye(4))
    np.testing.assert_allclose(img.affine, expected, atol=1e-6)
    np.testing.assert_allclose(img.get_qform(), expected, atol=1e-5)
    np.testing.assert_allclose(img.get_sform(), expected, atol=1e-6)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 3.25, 2.5))
    # exact float32 round trip, both through nibabel and our reader
    want = image.astype(np.float32)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), want.transpose(2, 1, 0))
    data, affine = read_nifti(out)
    assert data.dtype == np.float32 and data.shape == GEOM.shape
    np.testing.assert_array_equal(data, want)
    np.testing.assert_array_equal(affine, img.affine)


@pytest.mark.parametrize("position", POSITIONS)
def test_nifti_hot_voxel_world_position(tmp_path, image, position):
    out = write_nifti(tmp_path / "img.nii", image, GEOM, SCANNER, patient_position=position)
    img = nib.load(str(out))
    ijk = np.unravel_index(np.argmax(np.asanyarray(img.dataobj)), img.shape)  # (x, y, z) indices
    assert tuple(int(v) for v in ijk) == (HOT[2], HOT[1], HOT[0])
    world = img.affine @ np.array([*ijk, 1.0])
    np.testing.assert_allclose(world[:3], expected_ras(position, *HOT), atol=1e-6)
    # and the far corner, so that every voxel size and direction is checked
    far = np.array(img.shape) - 1
    np.testing.assert_allclose(
        (img.affine @ np.array([*far, 1.0]))[:3], expected_ras(position, far[2], far[1], far[0]), atol=1e-6
    )


def test_nifti_wrong_shape_fails_and_leaves_nothing(tmp_path, image):
    with pytest.raises(GeometryError, match=r"\(9, 16, 20\)"):
        write_nifti(tmp_path / "bad.nii.gz", image[:, :, :-1], GEOM, SCANNER)
    with pytest.raises(GeometryError, match="patient position"):
        write_nifti(tmp_path / "bad.nii", image, GEOM, SCANNER, patient_position="XYZ")
    with pytest.raises(ValueError, match=r"\.nii"):
        write_nifti(tmp_path / "bad.img", image, GEOM, SCANNER)
    assert leftovers(tmp_path) == []


def test_nifti_failure_during_save_leaves_nothing(tmp_path, image, monkeypatch):
    def broken_save(img, filename):
        Path(filename).write_bytes(b"half a header")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(tmp_path / "img.nii.gz", image, GEOM, SCANNER)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ DICOM
@pytest.fixture(scope="module")
def series(tmp_path_factory, image):
    """One series (and the matching NIfTI) per patient position, written once."""
    root = tmp_path_factory.mktemp("dicom")
    out = {}
    for position in POSITIONS:
        files = write_dicom_series(
            root / position,
            image,
            GEOM,
            SCANNER,
            patient_position=position,
            series_description=f"writer test {position}",
            acquisition_datetime=dt.datetime(2024, 3, 5, 10, 30, 0),
            radiopharmaceutical={
                "radionuclide": "F-18",
                "radiopharmaceutical": "FDG",
                "total_dose_bq": 3.5e8,
                "start_datetime": dt.datetime(2024, 3, 5, 9, 30, 0),
            },
            decay_corrected=True,
            frame_duration_s=600.0,
            corrections=["ATTN", "SCAT", "RAN", "NORM"],
        )
        nii = write_nifti(root / f"{position}.nii", image, GEOM, SCANNER, patient_position=position)
        out[position] = (root / position, files, nii)
    return out


def test_dicom_files_and_pydicom_reread(series, image):
    directory, files, _ = series["HFS"]
    assert [f.name for f in files] == [f"IM_{k:04d}.dcm" for k in range(1, 10)]
    assert sorted(p.name for p in directory.iterdir()) == [f.name for f in files] + ["sirf_fbsem_series.json"]
    uids = set()
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == PET_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "PT" and ds.Units == "BQML" and list(ds.SeriesType) == ["STATIC", "IMAGE"]
        assert ds.NumberOfSlices == 9 and ds.ImageIndex == k + 1 and ds.InstanceNumber == k + 1
        assert ds.BitsAllocated == 16 and ds.BitsStored == 16 and ds.HighBit == 15
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        assert (ds.Rows, ds.Columns) == (16, 20)
        assert float(ds.RescaleIntercept) == 0.0
        assert [float(v) for v in ds.PixelSpacing] == [3.25, 2.0]  # [row spacing vy, column spacing vx]
        assert float(ds.SliceThickness) == 2.5
        assert ds.DecayCorrection == "START" and "DECY" in ds.CorrectedImage and float(ds.DecayFactor) > 1.0
        assert ds.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence[0].CodeValue == "77004003"
        pixels = ds.pixel_array
        assert pixels.dtype in (np.uint16, np.int16)
        values = float(ds.RescaleSlope) * pixels.astype(np.float64)
        slice_max = np.abs(image[k]).max()
        assert np.abs(values - image[k]).max() <= slice_max / 32767
        assert pixels.max() >= 32767  # the slice maximum uses the 16-bit range
        uids.add(ds.SOPInstanceUID)
        series_uid = ds.SeriesInstanceUID
    assert len(uids) == 9 and series_uid not in uids


@pytest.mark.parametrize("position", POSITIONS)
def test_dicom_hot_voxel_patient_position(series, position):
    """LPS of the hot voxel from IPP/IOP/PixelSpacing equals STIR's physical -> LPS."""
    _, files, _ = series[position]
    ds = pydicom.dcmread(files[HOT[0]])
    row, col = np.unravel_index(np.argmax(ds.pixel_array), ds.pixel_array.shape)
    assert (row, col) == HOT[1:]
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = ipp + col * dc * iop[:3] + row * dr * iop[3:]
    np.testing.assert_allclose(lps, expected_lps(position, *HOT), atol=1e-4)
    # slices step along the scanner axis by vz
    ipp_next = np.array([float(v) for v in pydicom.dcmread(files[HOT[0] + 1]).ImagePositionPatient])
    np.testing.assert_allclose(np.abs(ipp_next - ipp), [0, 0, 2.5], atol=1e-6)


@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_dciodvfy_reports_no_errors(series, position):
    dciodvfy = require("dciodvfy")
    _, files, _ = series[position]
    for f in files:
        res = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True, timeout=60)
        report = res.stdout + res.stderr
        errors = [line for line in report.splitlines() if "Error" in line]
        assert not errors, f"dciodvfy {f.name}:\n{report}"


def test_dciodvfy_minimal_series_no_errors(tmp_path, image):
    """Without radiopharmaceutical, times or corrections the type-2 elements are there, empty."""
    dciodvfy = require("dciodvfy")
    files = write_dicom_series(tmp_path / "s", image, GEOM, SCANNER, series_description="minimal")
    ds = pydicom.dcmread(files[0])
    assert len(ds.RadiopharmaceuticalInformationSequence) == 0
    assert ds.DecayCorrection == "NONE" and "DecayFactor" not in ds and ds.CorrectedImage in ("", None, [])
    res = subprocess.run([dciodvfy, str(files[0])], capture_output=True, text=True, timeout=60)
    report = res.stdout + res.stderr
    assert not [line for line in report.splitlines() if "Error" in line], report


@pytest.mark.parametrize("position", POSITIONS)
def test_dcm2niix_matches_our_nifti(series, tmp_path, position):
    dcm2niix = require("dcm2niix")
    directory, _, nii = series[position]
    res = subprocess.run(
        [dcm2niix, "-z", "n", "-f", "out", "-o", str(tmp_path), str(directory)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    converted = sorted(tmp_path.glob("out*.nii"))
    assert len(converted) == 1, f"{[p.name for p in tmp_path.iterdir()]}\n{res.stdout}"
    theirs = nib.as_closest_canonical(nib.load(str(converted[0])))
    ours = nib.as_closest_canonical(nib.load(str(nii)))
    assert theirs.shape == ours.shape
    # same voxel -> world mapping (dcm2niix may flip or reorder axes: canonical RAS+ undoes that)
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=0.01)
    # the 8 corner voxel centres land on the same world points
    corners = np.array([[i, j, k, 1.0] for i in (0, 19) for j in (0, 15) for k in (0, 8)]).T
    np.testing.assert_allclose((theirs.affine @ corners)[:3], (ours.affine @ corners)[:3], atol=0.01)
    # values: get_fdata applies dcm2niix's scl_slope/scl_inter (float32 output when slopes vary)
    a, b = theirs.get_fdata(), ours.get_fdata()
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_dicom_signed_pixels_for_negative_values(tmp_path, image):
    img = image - 0.3 * image.max(axis=(1, 2), keepdims=True)
    files = write_dicom_series(tmp_path / "neg", img, GEOM, SCANNER, series_description="signed")
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
        values = float(ds.RescaleSlope) * ds.pixel_array.astype(np.float64)
        assert np.abs(values - img[k]).max() <= np.abs(img[k]).max() / 32767


def test_dicom_failure_midway_leaves_nothing(tmp_path, image, monkeypatch):
    real_dcmwrite = pydicom.dcmwrite
    calls = {"n": 0}

    def flaky_dcmwrite(filename, dataset, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(filename).write_bytes(b"DICM partial")
            raise OSError("disk full on slice 3")
        return real_dcmwrite(filename, dataset, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmwrite", flaky_dcmwrite)
    with pytest.raises(OSError, match="slice 3"):
        write_dicom_series(tmp_path / "series", image, GEOM, SCANNER, series_description="fails")
    assert calls["n"] == 3
    assert leftovers(tmp_path) == []

    # an existing series is kept whole when a rewrite fails
    monkeypatch.setattr(pydicom, "dcmwrite", real_dcmwrite)
    first = write_dicom_series(tmp_path / "series", image, GEOM, SCANNER, series_description="first")
    calls["n"] = 0
    monkeypatch.setattr(pydicom, "dcmwrite", flaky_dcmwrite)
    with pytest.raises(OSError):
        write_dicom_series(tmp_path / "series", image, GEOM, SCANNER, series_description="second")
    assert leftovers(tmp_path) == ["series"]
    assert sorted((tmp_path / "series").iterdir()) == sorted(first + [tmp_path / "series" / "sirf_fbsem_series.json"])
    assert pydicom.dcmread(first[0]).SeriesDescription == "first"


def test_dicom_bad_arguments_write_nothing(tmp_path, image):
    with pytest.raises(GeometryError, match=r"\(9, 16, 20\)"):
        write_dicom_series(tmp_path / "a", image[:-1], GEOM, SCANNER, series_description="x")
    with pytest.raises(ValueError, match="units"):
        write_dicom_series(tmp_path / "b", image, GEOM, SCANNER, units="Bq/ml", series_description="x")
    with pytest.raises(ValueError, match="unknown key"):
        write_dicom_series(
            tmp_path / "c", image, GEOM, SCANNER, series_description="x",
            radiopharmaceutical={"radionuclide": "F-18", "dose": 1.0},
        )
    with pytest.raises(ValueError, match="frame_duration_s"):
        write_dicom_series(tmp_path / "d", image, GEOM, SCANNER, series_description="x", decay_corrected=True,
                           radiopharmaceutical={"radionuclide": "18F"},
                           acquisition_datetime=dt.datetime(2024, 1, 1))
    bad = image.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        write_dicom_series(tmp_path / "e", bad, GEOM, SCANNER, series_description="x")
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ preview
def test_montage_png(tmp_path):
    import matplotlib.image as mpimg

    z, y, x = np.mgrid[0:9, 0:16, 0:20]
    blob = 10.0 * np.exp(-((x - 12) ** 2 / 20 + (y - 7) ** 2 / 10 + (z - 4) ** 2 / 6))
    out = save_montage(tmp_path / "one.png", blob, num_slices=4, title="test", voxel_size_mm=GEOM.voxel_size_mm)
    two = save_montage(tmp_path / "two.png", [("blob", blob), ("squared", blob**2)], num_slices=8, cmap="hot")
    for p in (out, two):
        assert p.exists()
        px = mpimg.imread(str(p))
        assert px.ndim == 3 and px.shape[0] > 50 and px.shape[1] > 50
        grey = px[..., :3].mean(axis=2)
        assert grey.std() > 0.01
        assert ((grey > 0.1) & (grey < 0.9)).mean() > 0.02  # shaded image content, not just frames and text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]
    with pytest.raises(ValueError, match="png"):
        save_montage(tmp_path / "x.jpg", blob)
