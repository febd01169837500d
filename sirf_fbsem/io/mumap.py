"""Attenuation (mu) maps: reading (Interfile ``.hv`` or NIfTI), a units check, and resampling.

Units: STIR and SIRF expect linear attenuation coefficients in **1/cm** at 511 keV
(water about 0.096 /cm, cortical bone about 0.17 /cm). Maps in other units (1/mm x
10, Siemens' 1/cm x 10000, Hounsfield units) are refused by :func:`check_mu_units`.

Positions. A NIfTI mu-map is read as the inverse of STIR's NIfTI writer
(:meth:`ImageGeometry.nifti_affine`): its first voxel's STIR physical position
``(x0, y0, z0)`` gives the origin (:meth:`ImageGeometry.from_first_voxel_physical`),
so a file SIRF/STIR wrote comes back with the geometry STIR had in memory.

For resampling, an image of geometry ``g`` (:class:`~sirf_fbsem.geometry.ImageGeometry`)
has voxel ``(k, j, i)`` at gantry coordinates
``g.first_voxel_gantry_mm(scanner) + (i vx, j vy, k vz)`` in (x, y, z), the frame
the projector uses, as STIR's ray tracer (z = 0 at the first ring; an image's axial
middle sits at the scanner's middle shifted by its ``origin_mm[0]``).
:func:`resample_to` samples the source at the target voxel centres in that frame
(trilinear, zero outside the source grid, which is exact separable linear
interpolation for axis-aligned grids), so a resampled mu-map attenuates the same
LORs as the original. For images of the same axial extent (e.g. both the scanner's
default) this frame and STIR's physical one differ by a constant and resampling in
either gives the same result.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, InputFileNotFoundError
from ..geometry import GeometryError, ImageGeometry, Scanner, patient_flips, scanner_preset
from .interfile import read_image

__all__ = ["read_mu_map", "check_mu_units", "resample_to", "MU_WATER_PER_CM", "MuUnitsError"]

#: linear attenuation coefficient of water at 511 keV, 1/cm
MU_WATER_PER_CM = 0.096
#: largest plausible mu at 511 keV in 1/cm (dense bone and metal implants stay below)
_MU_MAX_PER_CM = 1.0
#: most negative value accepted (interpolation undershoot); Hounsfield units go to -1000
_MU_MIN_PER_CM = -0.01

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


class MuUnitsError(InputError):
    """A mu-map whose values are not linear attenuation coefficients in 1/cm."""


def check_mu_units(mu: np.ndarray, path: str | os.PathLike | None = None) -> None:
    """Raise :class:`MuUnitsError` (a ``ValueError``) unless ``mu`` looks like 1/cm at 511 keV.

    Values above 1 /cm (1/mm x 10, 1/cm x 10000, HU) or below -0.01 (HU's -1000 for
    air) are refused; the message names ``path`` and says STIR expects 1/cm (water ~ 0.096).
    """
    a = np.asarray(mu)
    where = f"mu-map '{path}'" if path is not None else "mu-map"
    if a.size == 0:
        raise MuUnitsError(f"{where} is empty")
    if not np.all(np.isfinite(a)):
        raise MuUnitsError(f"{where} has non-finite values")
    lo, hi = float(a.min()), float(a.max())
    if hi > _MU_MAX_PER_CM or lo < _MU_MIN_PER_CM:
        raise MuUnitsError(
            f"{where} has values from {lo:g} to {hi:g}; STIR expects linear attenuation coefficients in 1/cm "
            f"at 511 keV (water ~ {MU_WATER_PER_CM}, bone ~ 0.17, all in [0, {_MU_MAX_PER_CM}]). Convert it first "
            "(e.g. divide 1/cm x 10000 maps by 10000; map Hounsfield units with a bilinear HU-to-mu curve)"
        )


def read_mu_map(
    path: str | os.PathLike,
    scanner: Scanner | str = "Siemens_mMR",
    patient_position: str = "HFS",
    check_units: bool = True,
) -> tuple[ImageGeometry, np.ndarray]:
    """Read a mu-map: ``(geometry, mu)`` with ``mu`` float32 ``(Z, Y, X)`` in 1/cm.

    Interfile (``.hv``, STIR's image header; a ``.v`` path finds its ``.hv``) or NIfTI
    (``.nii``, ``.nii.gz``) whose affine must be axis-aligned. For NIfTI,
    ``patient_position`` says how the file's RAS axes map to STIR's (the inverse of
    :meth:`ImageGeometry.nifti_affine`, i.e. of STIR's NIfTI writer). ``scanner`` (a preset
    name or a :class:`Scanner`) is validated but does not change where an image lies:
    STIR places images by their own coordinates. Units are checked unless ``check_units=False``.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileNotFoundError(f"mu-map '{p}' does not exist", p)
    name = p.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        if isinstance(scanner, str):
            scanner_preset(scanner)  # an unknown name is an error
        geom, mu = _read_nifti_mu(p, patient_position)
    elif name.endswith((".hv", ".v")):
        geom, mu = _read_interfile_image(p)
    else:
        raise InputError(f"mu-map '{p}': unknown format; expected an Interfile '.hv' or NIfTI '.nii'/'.nii.gz'")
    mu = np.ascontiguousarray(mu, dtype=np.float32)
    if check_units:
        check_mu_units(mu, p)
    return geom, mu


def _read_interfile_image(p: Path) -> tuple[ImageGeometry, np.ndarray]:
    return read_image(p)


def _read_nifti_mu(p: Path, patient_position: str) -> tuple[ImageGeometry, np.ndarray]:
    """(geometry, mu (Z, Y, X)) of an axis-aligned NIfTI file, inverting :meth:`ImageGeometry.nifti_affine`.

    The RAS affine's diagonal must be ``(-sx vx, -sy vy, sz vz)`` up to per-axis flips (undone
    by flipping the data); its translation ``(-sx x0, -sy y0, sz z0)`` gives STIR's physical
    first voxel ``(x0, y0, z0)`` (mm) and so the origin.
    """
    try:
        import nibabel as nib
    except ImportError as exc:  # pragma: no cover - nibabel is a dependency
        raise ImportError("reading NIfTI mu-maps needs nibabel (pip install nibabel)") from exc
    try:
        img = nib.load(str(p))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a damaged file
        raise InputError(f"mu-map '{p}' cannot be read as NIfTI: {exc}") from exc
    if len(img.shape) != 3:
        raise InputError(f"mu-map '{p}' has shape {img.shape}; expected a 3D (x, y, z) volume")
    aff = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(aff)):
        raise InputError(f"mu-map '{p}': the NIfTI affine has NaN/Inf entries:\n{aff}")
    lin = aff[:3, :3]
    off_diag = lin - np.diag(np.diag(lin))
    scale = np.max(np.abs(np.diag(lin)))
    if np.max(np.abs(off_diag)) > 1e-6 * max(scale, 1.0) or np.any(np.abs(np.diag(lin)) < 1e-9):
        raise GeometryError(
            f"mu-map '{p}': the NIfTI affine is not axis-aligned (rotation or shear):\n{aff}\n"
            "resample it onto an axis-aligned grid first"
        )
    try:
        data = np.asanyarray(img.dataobj).astype(np.float32)  # (x, y, z), scl_slope applied by nibabel
    except Exception as exc:  # noqa: BLE001 - truncated or damaged data
        raise InputError(f"mu-map '{p}': the NIfTI voxel data cannot be read: {exc}") from exc
    # expected RAS diagonal signs for this patient position (ImageGeometry.nifti_affine): (-sx, -sy, sz)
    sx, sy, sz = patient_flips(patient_position)
    expected = np.array([-sx, -sy, sz], dtype=np.float64)
    diag = np.diag(lin).copy()
    origin = aff[:3, 3].copy()
    shape = np.array(data.shape)
    for ax in range(3):
        if np.sign(diag[ax]) != expected[ax]:  # stored the other way round: flip to the STIR direction
            origin[ax] = origin[ax] + diag[ax] * (shape[ax] - 1)
            diag[ax] = -diag[ax]
            data = np.flip(data, axis=ax)
    vx, vy, vz = np.abs(diag)
    # ImageGeometry.nifti_affine has translation (-sx x0, -sy y0, sz z0) for the first voxel's physical (x0, y0, z0)
    x0, y0, z0 = origin[0] / (-sx), origin[1] / (-sy), origin[2] / sz
    nx, ny, nz = data.shape
    geom = ImageGeometry.from_first_voxel_physical((nz, ny, nx), (vz, vy, vx), (x0, y0, z0))
    canonical = np.eye(4)
    canonical[:3, :3] = np.diag(diag)
    canonical[:3, 3] = origin
    if not np.allclose(geom.nifti_affine(patient_position=patient_position), canonical, atol=1e-3):  # pragma: no cover
        raise GeometryError(f"mu-map '{p}': internal error converting the NIfTI affine to a STIR geometry")
    return geom, np.ascontiguousarray(data.transpose(2, 1, 0))


def _axis_weights(target: np.ndarray, source0: float, step: float, n: int) -> np.ndarray:
    """Dense (len(target), n) linear-interpolation weights onto a uniform source axis; zero padding outside."""
    f = (target - source0) / step
    i0 = np.floor(f).astype(np.int64)
    w1 = f - i0
    # snap indices that are integers up to rounding, so that identical grids give exact copies
    near = np.abs(w1 - np.round(w1)) < 1e-6
    i0 = np.where(near & (np.round(w1) == 1), i0 + 1, i0)
    w1 = np.where(near, 0.0, w1)
    W = np.zeros((target.size, n))
    rows = np.arange(target.size)
    for idx, w in ((i0, 1.0 - w1), (i0 + 1, w1)):
        ok = (idx >= 0) & (idx < n) & (w != 0.0)
        W[rows[ok], idx[ok]] += w[ok]
    return W


def resample_to(
    mu: np.ndarray,
    mu_geometry: ImageGeometry,
    target_geometry: ImageGeometry,
    scanner: Scanner | str = "Siemens_mMR",
) -> np.ndarray:
    """Trilinear resampling of ``mu`` (Z, Y, X) onto ``target_geometry`` by gantry coordinates.

    Returns float32 (Z', Y', X'). Target voxels whose centre lies outside the source
    grid interpolate towards 0 (air) over one source voxel and are 0 beyond.
    Resampling onto the same geometry returns an exact copy.
    """
    sc = scanner_preset(scanner) if isinstance(scanner, str) else scanner
    a = np.asarray(mu, dtype=np.float64)
    if tuple(a.shape) != tuple(mu_geometry.shape):
        raise GeometryError(f"mu has shape {a.shape}; its geometry says {mu_geometry.shape} (Z, Y, X)")
    sx0, sy0, sz0 = mu_geometry.first_voxel_gantry_mm(sc)
    tx0, ty0, tz0 = target_geometry.first_voxel_gantry_mm(sc)
    svz, svy, svx = mu_geometry.voxel_size_mm
    tvz, tvy, tvx = target_geometry.voxel_size_mm
    nz, ny, nx = target_geometry.shape
    Wz = _axis_weights(tz0 + np.arange(nz) * tvz, sz0, svz, a.shape[0])
    Wy = _axis_weights(ty0 + np.arange(ny) * tvy, sy0, svy, a.shape[1])
    Wx = _axis_weights(tx0 + np.arange(nx) * tvx, sx0, svx, a.shape[2])
    out = np.einsum("zk,kji->zji", Wz, a, optimize=True)
    out = np.einsum("yj,zji->zyi", Wy, out, optimize=True)
    out = np.einsum("xi,zyi->zyx", Wx, out, optimize=True)
    return out.astype(np.float32)
