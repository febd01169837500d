"""NIfTI affines equal what SIRF/STIR writes (STIR's ITK output file format), for any image.

SIRF's ``ImageData.write_par(filename, par_file)`` parses ``par_file`` with STIR's
``OutputFileFormat`` registry (``STIRImageData::write``: start key
``OutputFileFormat Parameters``, ``output file format type``, stop key ``END``); the ITK
format writes NIfTI for a ``.nii`` name (``ITKOutputFileFormat::actual_write_to_file``).
nibabel's affine of that file must equal :meth:`ImageGeometry.nifti_affine`, and the
voxel values must land in the same (x, y, z) cells as in :func:`write_nifti`'s file.

The ITK writer's origin and direction come from STIR's ``get_LPS_coordinates_for_indices``;
SIRF's ``get_geometrical_info()`` is built from the same calls (``STIRImageData::set_up_geom_info``),
so its index-to-LPS matrix is checked too (``RAS = diag(-1, -1, 1) LPS``); that check needs
no ITK in STIR. Everything is skipped (with the reason) when ``sirf.STIR`` cannot be
imported; the file comparisons are skipped when STIR was built without ITK.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="NIfTI comparison needs nibabel")

try:
    import sirf.STIR as pet
except Exception as exc:  # ImportError, or a broken installation (missing shared libraries)
    pytest.skip(f"sirf.STIR cannot be imported ({exc!r})", allow_module_level=True)

from sirf_fbsem.geometry import ImageGeometry, SinogramGeometry, scanner_preset  # noqa: E402
from sirf_fbsem.io.nifti import write_nifti  # noqa: E402

pytestmark = [
    pytest.mark.sirf,
    # SIRF 3.10 warns on every STIR get_geometrical_info(); the values are what this file checks
    pytest.mark.filterwarnings("ignore:geometrical info for STIR.ImageData might be incorrect"),
]

#: SIRF's examples/parameter_files/STIR_output_file_format_nifti.par
ITK_NIFTI_PAR = """OutputFileFormat Parameters:=
output file format type := ITK
  ITK Output File Format Parameters:=
  number format := float
  number_of_bytes_per_pixel:=4
  default extension:=.nii
  End ITK Output File Format Parameters:=
End:=
"""

#: RAS from LPS (NIfTI's world frame from ITK's)
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: (shape (z, y, x), voxel sizes (z, y, x) mm, origin (z, y, x) mm); none of a scanner's default extent
GEOMETRIES = {
    "offset_odd_even": ((9, 16, 20), (2.5, 3.25, 2.0), (5.0, -7.5, 12.25)),
    "offset_z_only": ((21, 31, 31), (2.03125, 2.08626, 2.08626), (-17.0, 0.0, 0.0)),
    "brain_like": ((15, 35, 35), (6.75, 3.0, 3.0), (0.0, 0.0, 0.0)),
}


def _sirf_image(geom: ImageGeometry, values: np.ndarray | None = None) -> "pet.ImageData":
    image = pet.ImageData()
    image.initialise(tuple(geom.shape), tuple(geom.voxel_size_mm), tuple(geom.origin_mm))
    if values is not None:
        image.fill(values.astype(np.float32))
    return image


def _write_itk_nifti(image: "pet.ImageData", out: Path) -> Path:
    """SIRF's write_par with the ITK/NIfTI format; skips when this STIR has no ITK output format."""
    par = out.with_name("nifti.par")
    par.write_text(ITK_NIFTI_PAR)
    try:
        image.write_par(str(out), str(par))
    except Exception as exc:  # SIRF raises (its own error class) when STIR cannot parse the format
        if "ITK" in str(exc) or "output format" in str(exc).lower() or not out.exists():
            pytest.skip(f"STIR's ITK output file format is not available in this build ({exc!s:.200})")
        raise
    if not out.exists():
        pytest.skip("STIR wrote no NIfTI file (built without ITK?)")
    return out


def _sirf_ras_affine(image: "pet.ImageData") -> np.ndarray:
    """SIRF's index (x, y, z) -> LPS matrix, as RAS."""
    return RAS_FROM_LPS @ np.asarray(image.get_geometrical_info().get_index_to_physical_point_matrix(), np.float64)


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_affine_equals_sirf_geometrical_info(case):
    geom = ImageGeometry(*GEOMETRIES[case])
    np.testing.assert_allclose(_sirf_ras_affine(_sirf_image(geom)), geom.nifti_affine(), atol=1e-3)


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_affine_equals_sirf_nifti(tmp_path, case):
    geom = ImageGeometry(*GEOMETRIES[case])
    rng = np.random.default_rng(7)
    values = rng.uniform(0.0, 1.0, geom.shape)
    values[geom.shape[0] // 3, 2, geom.shape[2] - 3] = 10.0  # a hot voxel off every axis' centre
    theirs = nib.load(str(_write_itk_nifti(_sirf_image(geom, values), tmp_path / "sirf.nii")))
    np.testing.assert_allclose(theirs.affine, geom.nifti_affine(), atol=1e-3)
    ours = nib.load(str(write_nifti(tmp_path / "ours.nii", values, geom, scanner_preset("Siemens_mMR"))))
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(np.asanyarray(theirs.dataobj), np.asanyarray(ours.dataobj), rtol=1e-6)


def _default_mmr() -> tuple["pet.ImageData", ImageGeometry]:
    """SIRF's default image for the mMR (ImageData(AcquisitionData)) and ours."""
    pet.AcquisitionData.set_storage_scheme("memory")
    acq = pet.AcquisitionData("Siemens_mMR", span=11, max_ring_diff=60)
    image = pet.ImageData(acq)
    geom = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=60).default_image()
    assert tuple(image.dimensions()) == geom.shape
    np.testing.assert_allclose(image.voxel_sizes(), geom.voxel_size_mm, rtol=1e-5)
    return image, geom


def test_default_mmr_image_affine_equals_sirf(tmp_path):
    """DESIGN.md's affine for the default image, from SIRF's geometry and SIRF's NIfTI file."""
    image, geom = _default_mmr()
    np.testing.assert_allclose(_sirf_ras_affine(image), geom.nifti_affine(), atol=1e-3)
    out = _write_itk_nifti(image, tmp_path / "default.nii")
    np.testing.assert_allclose(nib.load(str(out)).affine, geom.nifti_affine(), atol=1e-3)


def test_interfile_image_affine_equals_sirf(tmp_path, shared_data):
    """SIRF's brain/emission.hv (15 planes of 6.75 mm: not its scanner's default extent)."""
    from sirf_fbsem.io.interfile import read_image

    hv = shared_data / "sirf" / "examples" / "PET" / "brain" / "emission.hv"
    if not hv.exists():
        pytest.skip(f"{hv} not present")
    geom, _ = read_image(hv)
    image = pet.ImageData(str(hv))
    np.testing.assert_allclose(_sirf_ras_affine(image), geom.nifti_affine(), atol=1e-3)
    out = _write_itk_nifti(image, tmp_path / "emission.nii")
    np.testing.assert_allclose(nib.load(str(out)).affine, geom.nifti_affine(), atol=1e-3)
