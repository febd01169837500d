"""NIfTI-1 writer and reader (nibabel), with the affine taken from the STIR geometry.

Arrays are ``(Z, Y, X)`` as SIRF/STIR hold them; NIfTI stores ``(x, y, z)``, so the
writer transposes and the reader transposes back. The affine maps (i, j, k) of the
stored ``(x, y, z)`` array to RAS+ mm and is :meth:`ImageGeometry.nifti_affine`
(DESIGN.md "Geometry and coordinate facts")::

    HFS:  [[-vx, 0, 0, -x0], [0, -vy, 0, -y0], [0, 0, -vz, -z0], [0, 0, 0, 1]]

with ``(x0, y0, z0)`` the STIR physical position (mm) of voxel ``[0, 0, 0]``,
``origin + (0, -(ny//2) vy, -(nx//2) vx)`` (:meth:`ImageGeometry.first_voxel_physical_mm`);
other patient positions flip axes. This is exactly what STIR's own NIfTI writer
(``ITKOutputFileFormat``, which SIRF's ``ImageData.write_par`` uses) writes, for any
axial extent and origin; for the scanner's default image (x0, y0, z0) is also the gantry
position (z = 0 at the first ring). The writer never falls back to an identity affine.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..geometry import GeometryError, ImageGeometry, Scanner
from .atomic import atomic_path
from .outputs import NIFTI_MARK, PlannedOutput, absolute, check_replaceable

__all__ = ["write_nifti", "read_nifti", "check_volume"]

#: NIfTI xform codes (nifti1.h): 1 = NIFTI_XFORM_SCANNER_ANAT, 2 = NIFTI_XFORM_ALIGNED_ANAT
_XFORM_SCANNER = 1
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DESCRIP_BYTES = 80


def _require_nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - nibabel is a dependency of the writers
        raise ImportError("writing/reading NIfTI needs nibabel (pip install nibabel)") from exc
    return nibabel


def check_volume(image, geometry: ImageGeometry, what: str = "image") -> np.ndarray:
    """``image`` as a finite float64 (Z, Y, X) array matching ``geometry.shape``; else a clear error."""
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise GeometryError(f"{what} must be a 3D (Z, Y, X) array, got shape {arr.shape}")
    if tuple(arr.shape) != tuple(geometry.shape):
        raise GeometryError(
            f"{what} has shape {tuple(arr.shape)} (Z, Y, X); the image geometry expects {geometry.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise ValueError(f"{what} has {bad} non-finite voxel(s) (NaN/inf); refusing to write it")
    return arr


def _nifti_target(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not any(p.name.endswith(s) for s in _NIFTI_SUFFIXES) or p.name in _NIFTI_SUFFIXES:
        raise ValueError(f"NIfTI path must end in .nii or .nii.gz, got {str(path)!r}")
    return p


def write_nifti(
    path: str | os.PathLike,
    image,
    geometry: ImageGeometry,
    scanner: Scanner | None = None,
    patient_position: str = "HFS",
    units: str | None = "Bq/ml",
    description: str = "",
    overwrite: bool = True,
) -> Path:
    """Write a ``(Z, Y, X)`` image as a NIfTI-1 file (``.nii`` or ``.nii.gz``), atomically.

    Stored as float32 in (x, y, z) order. qform and sform are both
    ``geometry.nifti_affine(scanner, patient_position)`` with code 1 (scanner
    anatomical), the affine STIR's NIfTI writer gives; spatial unit mm, time unit s.
    ``scanner`` does not change the affine (STIR places an image by its own
    coordinates); it is accepted so that all writers take the same arguments. NIfTI has
    no field for intensity units, so ``units`` goes in ``descrip`` after
    ``description`` (at most 80 ASCII bytes together).

    The header's ``intent_name`` is :data:`~sirf_fbsem.io.outputs.NIFTI_MARK`, by which an
    earlier output of this package is recognised: an existing file at ``path`` is replaced
    only when it is one and ``overwrite`` (default True); any other file is refused with
    :class:`~sirf_fbsem.errors.OutputPathError` (files this package did not write are never
    replaced).

    Raises :class:`GeometryError` when the image does not match the geometry or the
    patient position is unknown; nothing is written then. Returns the path.
    """
    nib = _require_nibabel()
    target = _nifti_target(path)
    check_replaceable(PlannedOutput(absolute(target), "nifti", ""), overwrite)
    arr = check_volume(image, geometry)
    affine = geometry.nifti_affine(scanner, patient_position)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or np.allclose(affine, np.eye(4)):
        raise GeometryError(f"refusing to write NIfTI {target.name!r} with a missing or identity affine: {affine}")
    descrip = description if not units else (f"{description} [{units}]" if description else f"[{units}]")
    try:
        descrip_bytes = descrip.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"NIfTI description and units must be ASCII, got {descrip!r}") from None
    if len(descrip_bytes) > _DESCRIP_BYTES:
        raise ValueError(
            f"NIfTI description plus units is {len(descrip_bytes)} bytes ({descrip!r}); the header holds "
            f"{_DESCRIP_BYTES}"
        )

    data = np.ascontiguousarray(arr.astype(np.float32).transpose(2, 1, 0))  # (z, y, x) -> (x, y, z)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    img = nib.Nifti1Image(data, affine, header=hdr)
    img.set_qform(affine, code=_XFORM_SCANNER)
    img.set_sform(affine, code=_XFORM_SCANNER)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    img.header["descrip"] = descrip_bytes
    img.header["intent_name"] = NIFTI_MARK
    if data.size:
        img.header["cal_min"] = float(data.min())
        img.header["cal_max"] = float(data.max())
    with atomic_path(target) as tmp:
        nib.save(img, tmp)
    return target


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file back as ``(image (Z, Y, X), affine 4x4)``.

    The data keep their stored dtype when no scaling is set (float32 for files from
    :func:`write_nifti`, so the round trip is exact); scaled data come back as
    floats. The affine is nibabel's best (sform, else qform).
    """
    nib = _require_nibabel()
    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"NIfTI {str(path)!r} has shape {img.shape}; expected a 3D (x, y, z) image")
    data = np.asanyarray(img.dataobj)  # nibabel applies scl_slope/scl_inter only when set
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.array(img.affine, dtype=np.float64)
