"""PET DICOM writer: one PET Image Storage instance per slice (pydicom), written atomically.

SOP Class 1.2.840.10008.5.1.4.1.1.128 (PET Image IOD, PS3.3 A.21), explicit VR little
endian, 16-bit pixels with a per-slice ``RescaleSlope`` (intercept 0, as the PET Image
module requires). Modules written: Patient, General Study, General Series, PET Series,
PET Isotope, NM/PET Patient Orientation, Frame of Reference, General Equipment,
General Image, Image Plane, Image Pixel, PET Image, SOP Common. PET Multi-gated
Acquisition is not written (it is required only for GATED series; these are STATIC).

Geometry (DESIGN.md): with ``(x0, y0, z0)`` the STIR physical position (mm) of voxel
``[0, 0, 0]`` (:meth:`ImageGeometry.first_voxel_physical_mm`: ``origin + (0, -(ny//2) vy,
-(nx//2) vx)`` in (z, y, x), the frame of STIR's NIfTI writer; STIR has no DICOM writer)
and ``(sx, sy, sz)`` the patient-position signs that take STIR's physical
``(x, y, z)`` to LPS (HFS ``(1, 1, -1)``, HFP ``(-1, -1, -1)``, FFS ``(-1, 1, 1)``,
FFP ``(1, -1, 1)``, the same signs :meth:`ImageGeometry.nifti_affine` uses)::

    ImageOrientationPatient = [sx, 0, 0,  0, sy, 0]     (row direction, column direction)
    ImagePositionPatient(k) = [sx*x0, sy*y0, sz*(z0 + k*vz)]
    PixelSpacing = [vy, vx]  (between rows, between columns);  SliceThickness = vz

so a voxel's LPS position here and its RAS position in the NIfTI written by
:func:`sirf_fbsem.io.nifti.write_nifti` agree (RAS = (-L, -P, S)).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import __version__
from ..geometry import ImageGeometry, Scanner, patient_flips
from .atomic import atomic_dir
from .outputs import JSON_MARK, SERIES_MANIFEST, PlannedOutput, absolute, check_replaceable, dicom_series_files
from .nifti import check_volume

__all__ = ["write_dicom_series", "radiopharmaceutical_from_header", "PET_IMAGE_STORAGE", "PET_UNITS", "PET_CORRECTIONS", "RADIONUCLIDES"]

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"

#: Defined terms of Units (0054,1001), PS3.3 C.8.9.1.1.3
PET_UNITS = frozenset(
    {"CNTS", "NONE", "CM2", "CM2ML", "PCNT", "CPS", "BQML", "MGMINML", "UMOLMINML", "MLMGM", "MLG",
     "1CM", "UMOLML", "PROPCNTS", "PROPCPS", "MLMINML", "MLML", "GML", "STDDEV"}
)
#: Defined terms of Corrected Image (0028,0051) for PET, PS3.3 C.8.9.1.1.4
PET_CORRECTIONS = frozenset({"DECY", "ATTN", "SCAT", "DTIM", "MOTN", "PMOT", "CLN", "RAN", "RADL", "DCAL", "NORM"})

#: PET radionuclides: name -> (SNOMED CT code of CID 4020, code meaning, half-life in s or None).
#: Half-lives from NNDC NuDat; pass ``half_life_s`` to override or where None.
RADIONUCLIDES: dict[str, tuple[str, str, float | None]] = {
    "F-18": ("77004003", "^18^Fluorine", 6586.2),  # 109.77 min
    "C-11": ("40565003", "^11^Carbon", 1221.84),  # 20.364 min
    "N-13": ("21576001", "^13^Nitrogen", 597.9),  # 9.965 min
    "O-15": ("129504001", "^15^Oxygen", 122.24),
    "Ga-68": ("35337001", "^68^Gallium", 4062.6),  # 67.71 min
    "Cu-64": ("3932008", "^64^Copper", 45723.6),  # 12.701 h
    "Zr-89": ("63360001", "^89^Zirconium", 282276.0),  # 78.41 h
    "Rb-82": ("79197006", "^82^Rubidium", None),
}
_RADIOPHARMACEUTICAL_KEYS = frozenset(
    {"radionuclide", "radiopharmaceutical", "total_dose_bq", "half_life_s", "positron_fraction",
     "start_datetime", "route"}
)

# NM/PET Patient Orientation codes (SNOMED CT; CID 19, 20, 21)
_RECUMBENT = ("102538003", "recumbent")
_SUPINE = ("40199007", "supine")
_PRONE = ("1240000", "prone")
_HEADFIRST = ("102540008", "headfirst")
_FEETFIRST = ("102541007", "feet-first")

_PYDICOM_HINT = "writing PET DICOM needs pydicom >= 2.2 (pip install pydicom)"


def _require_pydicom():
    try:
        import pydicom
        import pydicom.uid  # noqa: F401
    except ImportError as exc:  # pragma: no cover
        raise ImportError(_PYDICOM_HINT) from exc
    return pydicom


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) for ``value``; no negative zero."""
    from pydicom.valuerep import format_number_as_ds

    v = float(value) + 0.0
    if v == 0.0:
        return "0"
    return format_number_as_ds(v)


def _da(t: _dt.datetime) -> str:
    return t.strftime("%Y%m%d")


def _tm(t: _dt.datetime) -> str:
    return t.strftime("%H%M%S.%f")


def _dt_str(t: _dt.datetime) -> str:
    s = t.strftime("%Y%m%d%H%M%S.%f")
    if t.utcoffset() is not None:
        s += t.strftime("%z")
    return s


def _lo(name: str, value: str, limit: int = 64) -> str:
    value = "" if value is None else str(value)
    if len(value) > limit or "\\" in value or any(c in value for c in "\r\n\f"):
        raise ValueError(f"{name} must be at most {limit} characters without backslash or line breaks, got {value!r}")
    return value


def _code_item(code: tuple[str, str]):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = code[0]
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = code[1]
    return item


def _normalise_radionuclide(name: str) -> str:
    """'F-18', '18F', 'F18', '^18^Fluorine', 'fluorine-18' -> 'F-18'."""
    key = re.sub(r"[\s^\-_]", "", str(name)).upper()
    for nuclide, (_, meaning, _) in RADIONUCLIDES.items():
        sym, mass = nuclide.split("-")
        element = re.sub(r"[\^\d]", "", meaning).upper()
        if key in {f"{sym.upper()}{mass}", f"{mass}{sym.upper()}", f"{mass}{element}", f"{element}{mass}"}:
            return nuclide
    raise ValueError(
        f"radiopharmaceutical['radionuclide'] = {name!r} is not a known PET radionuclide; known: "
        f"{sorted(RADIONUCLIDES)}"
    )


def _radiopharmaceutical_item(info: Mapping[str, Any]):
    """One item of RadiopharmaceuticalInformationSequence; returns (item, half-life s or None)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    unknown = set(info) - _RADIOPHARMACEUTICAL_KEYS
    if unknown:
        raise ValueError(
            f"radiopharmaceutical has unknown key(s) {sorted(unknown)}; allowed: {sorted(_RADIOPHARMACEUTICAL_KEYS)}"
        )
    if "radionuclide" not in info:
        raise ValueError("radiopharmaceutical needs a 'radionuclide' (e.g. 'F-18')")
    nuclide = _normalise_radionuclide(info["radionuclide"])
    code, meaning, table_half_life = RADIONUCLIDES[nuclide]
    half_life = info.get("half_life_s", table_half_life)
    item = Dataset()
    item.RadionuclideCodeSequence = DicomSequence([_code_item((code, meaning))])
    if info.get("route") is not None:
        item.RadiopharmaceuticalRoute = _lo("radiopharmaceutical['route']", info["route"])
    start = info.get("start_datetime")
    if start is not None:
        if not isinstance(start, _dt.datetime):
            raise TypeError(f"radiopharmaceutical['start_datetime'] must be a datetime, got {type(start).__name__}")
        item.RadiopharmaceuticalStartTime = _tm(start)
        item.RadiopharmaceuticalStartDateTime = _dt_str(start)
    if info.get("total_dose_bq") is not None:
        dose = float(info["total_dose_bq"])
        if not dose > 0:
            raise ValueError(f"radiopharmaceutical['total_dose_bq'] must be > 0 Bq, got {dose}")
        item.RadionuclideTotalDose = _ds(dose)
    if half_life is not None:
        half_life = float(half_life)
        if not half_life > 0:
            raise ValueError(f"radiopharmaceutical['half_life_s'] must be > 0 s, got {half_life}")
        item.RadionuclideHalfLife = _ds(half_life)
    if info.get("positron_fraction") is not None:
        frac = float(info["positron_fraction"])
        if not 0 < frac <= 1:
            raise ValueError(f"radiopharmaceutical['positron_fraction'] must be in (0, 1], got {frac}")
        item.RadionuclidePositronFraction = _ds(frac)
    if info.get("radiopharmaceutical") is not None:
        item.Radiopharmaceutical = _lo("radiopharmaceutical['radiopharmaceutical']", info["radiopharmaceutical"])
    return item, half_life


def radiopharmaceutical_from_header(header: Any) -> dict[str, Any] | None:
    """The ``radiopharmaceutical`` mapping of :func:`write_dicom_series` from a listmode header.

    Takes what the header knows (``isotope``, ``isotope_halflife_s``, ``radiopharmaceutical``,
    ``tracer_activity_bq``, ``tracer_injection_time``, as
    :class:`~sirf_fbsem.io.listmode.ListmodeHeader`); values a scanner writes as "unknown"
    (an activity or half-life of 0) are left out. None when the isotope is missing or not
    a known PET radionuclide: DICOM then carries no radiopharmaceutical rather than a wrong one.
    """
    isotope = getattr(header, "isotope", None)
    if not isotope:
        return None
    try:
        info: dict[str, Any] = {"radionuclide": _normalise_radionuclide(isotope)}
    except ValueError:
        return None
    name = getattr(header, "radiopharmaceutical", None)
    if name:
        info["radiopharmaceutical"] = str(name)[:64]
    half_life = getattr(header, "isotope_halflife_s", None)
    if half_life is not None and half_life > 0:
        info["half_life_s"] = float(half_life)
    dose = getattr(header, "tracer_activity_bq", None)
    if dose is not None and dose > 0:
        info["total_dose_bq"] = float(dose)
    start = getattr(header, "tracer_injection_time", None)
    if isinstance(start, _dt.datetime):
        info["start_datetime"] = start
    return info


def _quantise(arr: np.ndarray) -> tuple[np.ndarray, list[str], bool]:
    """Per-slice 16-bit integers and RescaleSlope strings; slice max |value| -> 32767 (signed) or 65535.

    Signed (int16) when any voxel is negative, else unsigned (uint16). The slope is
    rounded to its DS string first, so ``slope * pixel`` reproduces the image to
    within half a quantisation step.
    """
    signed = bool(arr.min() < 0) if arr.size else False
    limit = 32767 if signed else 65535
    out = np.empty(arr.shape, dtype=np.int16 if signed else np.uint16)
    slopes = []
    for k in range(arr.shape[0]):
        sl = arr[k]
        m = float(np.max(np.abs(sl))) if sl.size else 0.0
        slope_str = _ds(m / limit) if m > 0 else "1"
        slope = float(slope_str)
        q = np.rint(sl / slope)
        out[k] = np.clip(q, -limit if signed else 0, limit)
        slopes.append(slope_str)
    return out, slopes, signed


def write_dicom_series(
    directory: str | os.PathLike,
    image,
    geometry: ImageGeometry,
    scanner: Scanner,
    *,
    patient_position: str = "HFS",
    units: str = "BQML",
    series_description: str,
    patient_name: str = "Anonymous",
    patient_id: str = "0",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    acquisition_datetime: _dt.datetime | None = None,
    radiopharmaceutical: Mapping[str, Any] | None = None,
    decay_corrected: bool | None = None,
    manufacturer_model: str | None = None,
    corrections: Sequence[str] = (),
    frame_duration_s: float | None = None,
    reconstruction_method: str | None = None,
    series_number: int = 1,
    overwrite: bool = True,
) -> list[Path]:
    """Write a ``(Z, Y, X)`` image as a PET Image Storage series, one file per slice.

    A new ``directory`` appears at once (built beside it, then renamed); on any error
    nothing is left behind. Files are ``IM_0001.dcm`` ... in slice order (k = 0 first), and
    the manifest :data:`~sirf_fbsem.io.outputs.SERIES_MANIFEST` (JSON: ``written_by``,
    ``files``, ``series_instance_uid``) that marks the series as this package's.

    The directory may already exist when it is empty (the files are written into it) or
    holds only a series this package wrote (its manifest lists every file in it): that
    series is replaced, after the new one is complete, when ``overwrite`` (the default, as
    SIRF's ``write``; the command line passes ``--overwrite``). A directory holding anything
    else, or a file at ``directory``, is refused with
    :class:`~sirf_fbsem.errors.OutputPathError` before anything is written: files this
    package did not write are never deleted.

    Parameters (all but the first four keyword-only):

    - ``units``: PET Units (0054,1001), e.g. ``BQML`` (Bq/ml), ``CNTS``, ``PROPCPS``.
    - ``acquisition_datetime``: start of the acquisition; gives Series/Study/Acquisition
      date and time. When None, Acquisition date/time are left empty and Series and
      Study date/time (needed for the series reference time) are the time of writing.
    - ``radiopharmaceutical``: ``{'radionuclide': 'F-18', 'radiopharmaceutical': 'FDG',
      'total_dose_bq': ..., 'half_life_s': ..., 'positron_fraction': ...,
      'start_datetime': datetime, 'route': ...}`` (only ``radionuclide`` is required;
      half-life defaults from :data:`RADIONUCLIDES`). None: the sequence is written empty.
    - ``decay_corrected``: True writes DecayCorrection START, adds DECY to
      CorrectedImage and a DecayFactor (needs ``acquisition_datetime``,
      ``frame_duration_s`` and a half-life). None or False: DecayCorrection NONE (this
      package applies no decay correction of its own).
    - ``corrections``: other corrections applied, CorrectedImage defined terms
      (``ATTN``, ``SCAT``, ``RAN``, ``NORM``, ``DTIM`` ...). Empty by default: the writer
      does not claim corrections it was not told about.
    - ``frame_duration_s``: ActualFrameDuration; FrameReferenceTime is then the time
      of the mean count rate in the frame (T/2 without a half-life), else 0.

    Returns the paths of the written files.
    """
    pydicom = _require_pydicom()
    from pydicom.dataset import Dataset

    target = absolute(directory)
    owner = check_replaceable(PlannedOutput(target, "dicom_series", ""), overwrite)
    replace = (dicom_series_files(target) or []) if owner == "ours" else []
    arr = check_volume(image, geometry)
    settings = _checked_settings(
        patient_position=patient_position, units=units, series_description=series_description,
        patient_name=patient_name, patient_id=patient_id, study_uid=study_uid,
        frame_of_reference_uid=frame_of_reference_uid, acquisition_datetime=acquisition_datetime,
        decay_corrected=decay_corrected, manufacturer_model=manufacturer_model, corrections=corrections,
        frame_duration_s=frame_duration_s, reconstruction_method=reconstruction_method,
        series_number=series_number,
    )
    rp_item, half_life = (None, None)
    if radiopharmaceutical is not None:
        rp_item, half_life = _radiopharmaceutical_item(radiopharmaceutical)
    timing = _frame_timing(settings, half_life)
    pixels, slopes, signed = _quantise(arr)

    now = _dt.datetime.now()
    series_time = settings.acquisition_datetime or now
    uids = _SeriesUIDs(
        study=settings.study_uid or pydicom.uid.generate_uid(),
        series=pydicom.uid.generate_uid(),
        frame_of_reference=settings.frame_of_reference_uid or pydicom.uid.generate_uid(),
    )
    base = Dataset()  # the attributes every slice shares, module by module (PS3.3 A.21.3)
    _sop_common_module(base, now, settings)
    _patient_module(base, settings)
    _general_study_module(base, uids.study, series_time)
    _general_series_module(base, uids.series, settings)
    _pet_series_module(base, series_time, geometry.shape[0], timing.corrections, settings)
    _pet_isotope_module(base, rp_item)
    _patient_orientation_module(base, settings.position)
    _frame_of_reference_module(base, uids.frame_of_reference)
    model_name = settings.manufacturer_model
    _general_equipment_module(base, _lo("scanner.name", scanner.name) if model_name is None else model_name)
    _acquisition_timing(base, now, settings, timing)
    _image_plane_module(base, geometry, settings.position)
    _image_pixel_module(base, geometry, signed)

    positions, normal = _slice_positions(geometry, settings.position)
    written: list[str] = []
    with atomic_dir(target, replace=replace, last=SERIES_MANIFEST) as tmp:
        for k in range(geometry.shape[0]):
            name = f"IM_{k + 1:04d}.dcm"
            ds = _slice_instance(base, k, positions[k], normal, slopes[k], pixels[k], signed)
            pydicom.dcmwrite(tmp / name, ds, enforce_file_format=True)
            written.append(name)
        manifest = {"written_by": JSON_MARK, "sirf_fbsem_version": __version__, "files": written,
                    "series_instance_uid": str(uids.series), "series_description": settings.series_description}
        (tmp / SERIES_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return [target / n for n in written]


# ============================================================================ the writer's steps
@dataclass(frozen=True)
class _Settings:
    """:func:`write_dicom_series`'s options, checked and in DICOM's forms (upper-case terms, LO strings)."""

    position: str
    units: str
    series_description: str
    patient_name: str
    patient_id: str
    study_uid: str | None
    frame_of_reference_uid: str | None
    acquisition_datetime: _dt.datetime | None
    decay_corrected: bool
    manufacturer_model: str | None
    corrections: tuple[str, ...]
    frame_duration_s: float | None
    reconstruction_method: str | None
    series_number: int


@dataclass(frozen=True)
class _Timing:
    """FrameReferenceTime (ms from the series time), DecayFactor, and CorrectedImage with DECY when decay-corrected."""

    frame_reference_ms: float
    decay_factor: float | None
    corrections: tuple[str, ...]


@dataclass(frozen=True)
class _SeriesUIDs:
    study: str
    series: str
    frame_of_reference: str


def _checked_settings(
    *, patient_position: str, units: str, series_description: str, patient_name: str, patient_id: str,
    study_uid: str | None, frame_of_reference_uid: str | None, acquisition_datetime: _dt.datetime | None,
    decay_corrected: bool | None, manufacturer_model: str | None, corrections: Sequence[str],
    frame_duration_s: float | None, reconstruction_method: str | None, series_number: int,
) -> _Settings:
    """Check every option before anything is written; ValueError/TypeError naming the option."""
    from pydicom.uid import UID

    patient_flips(patient_position)  # raises for an unknown position
    units = str(units).upper()
    if units not in PET_UNITS:
        raise ValueError(f"units must be a PET Units defined term {sorted(PET_UNITS)}, got {units!r}")
    series_description = _lo("series_description", series_description)
    patient_id = _lo("patient_id", patient_id)
    if len(str(patient_name)) > 64 * 5 or any(c in str(patient_name) for c in "\\\r\n"):
        raise ValueError(f"patient_name must be a DICOM person name (no backslash), got {patient_name!r}")
    for name, uid in (("study_uid", study_uid), ("frame_of_reference_uid", frame_of_reference_uid)):
        if uid is not None and not UID(uid).is_valid:
            raise ValueError(f"{name} must be a valid DICOM UID (digits and dots, <= 64 chars), got {uid!r}")
    if acquisition_datetime is not None and not isinstance(acquisition_datetime, _dt.datetime):
        raise TypeError(f"acquisition_datetime must be a datetime, got {type(acquisition_datetime).__name__}")
    corrections = [str(c).upper() for c in corrections]
    bad = sorted(set(corrections) - PET_CORRECTIONS)
    if bad:
        raise ValueError(f"corrections {bad} are not CorrectedImage defined terms {sorted(PET_CORRECTIONS)}")
    if "DECY" in corrections and decay_corrected is not True:
        raise ValueError("corrections contains DECY but decay_corrected is not True; set decay_corrected=True")
    if frame_duration_s is not None and not float(frame_duration_s) > 0:
        raise ValueError(f"frame_duration_s must be > 0 s, got {frame_duration_s}")
    if isinstance(series_number, bool) or int(series_number) != series_number or series_number < 0:
        raise ValueError(f"series_number must be a non-negative integer, got {series_number!r}")
    return _Settings(
        position=patient_position.upper(), units=units, series_description=series_description,
        patient_name=str(patient_name), patient_id=patient_id, study_uid=study_uid,
        frame_of_reference_uid=frame_of_reference_uid, acquisition_datetime=acquisition_datetime,
        decay_corrected=bool(decay_corrected),
        manufacturer_model=None if manufacturer_model is None else _lo("manufacturer_model", manufacturer_model),
        corrections=tuple(corrections),
        frame_duration_s=None if frame_duration_s is None else float(frame_duration_s),
        reconstruction_method=(None if reconstruction_method is None
                               else _lo("reconstruction_method", reconstruction_method)),
        series_number=int(series_number),
    )


def _frame_timing(settings: _Settings, half_life_s: float | None) -> _Timing:
    """Frame reference time and decay factor of a frame of duration T with decay constant lam:

        FrameReferenceTime = ln(lam T / (1 - exp(-lam T))) / lam   (the time of the mean count rate;
                             T/2 without a half-life; 0 without a duration)
        DecayFactor        = lam T / (1 - exp(-lam T))             (only when decay-corrected)
    """
    duration = settings.frame_duration_s
    lam_t = None
    if duration is not None and half_life_s is not None:
        lam_t = math.log(2.0) / half_life_s * duration
    if duration is None:
        frame_ref_ms = 0.0
    elif lam_t is None or lam_t < 1e-12:
        frame_ref_ms = 500.0 * duration
    else:
        frame_ref_ms = 1000.0 * duration * math.log(lam_t / -math.expm1(-lam_t)) / lam_t
    corrections = list(settings.corrections)
    decay_factor = None
    if settings.decay_corrected:
        missing = [n for n, v in (("acquisition_datetime", settings.acquisition_datetime),
                                  ("frame_duration_s", duration),
                                  ("a half-life (radiopharmaceutical)", half_life_s)) if v is None]
        if missing:
            raise ValueError(
                f"decay_corrected=True (DecayCorrection START) needs {', '.join(missing)} to write the "
                "series reference time and DecayFactor (0054,1321)"
            )
        decay_factor = lam_t / -math.expm1(-lam_t) if lam_t >= 1e-12 else 1.0
        if "DECY" not in corrections:
            corrections.insert(0, "DECY")
    return _Timing(frame_ref_ms, decay_factor, tuple(corrections))


def _sop_common_module(ds, now: _dt.datetime, settings: _Settings) -> None:
    """SOP Common (C.12.1) and the image type of General Image."""
    text = f"{settings.patient_name}{settings.patient_id}{settings.series_description}"
    if any(ord(c) > 127 for c in text):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = PET_IMAGE_STORAGE
    ds.InstanceCreationDate = _da(now)
    ds.InstanceCreationTime = _tm(now)


def _patient_module(ds, settings: _Settings) -> None:
    """Patient (C.7.1.1)."""
    # a name without '^' is DICOM's retired single-component form; "Family^" means the same
    pn = settings.patient_name
    ds.PatientName = pn if ("^" in pn or "=" in pn or not pn) else pn + "^"
    ds.PatientID = settings.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""


def _general_study_module(ds, study_uid: str, series_time: _dt.datetime) -> None:
    """General Study (C.7.2.1)."""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = _da(series_time)
    ds.StudyTime = _tm(series_time)
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""


def _general_series_module(ds, series_uid: str, settings: _Settings) -> None:
    """General Series (C.7.3.1)."""
    ds.Modality = "PT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = settings.series_number
    ds.SeriesDescription = settings.series_description
    ds.Laterality = ""  # type 2C: unknown (whole-body or unpaired part)


def _pet_series_module(ds, series_time: _dt.datetime, num_slices: int, corrections: Sequence[str],
                       settings: _Settings) -> None:
    """PET Series (C.8.9.1)."""
    ds.SeriesDate = _da(series_time)
    ds.SeriesTime = _tm(series_time)
    ds.Units = settings.units
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.NumberOfSlices = num_slices
    ds.CorrectedImage = list(corrections)
    ds.DecayCorrection = "START" if settings.decay_corrected else "NONE"
    ds.CollimatorType = ""
    if settings.reconstruction_method:
        ds.ReconstructionMethod = settings.reconstruction_method


def _pet_isotope_module(ds, radiopharmaceutical_item) -> None:
    """PET Isotope (C.8.9.2): one radiopharmaceutical item, or an empty sequence (type 2)."""
    from pydicom.sequence import Sequence as DicomSequence

    items = [radiopharmaceutical_item] if radiopharmaceutical_item is not None else []
    ds.RadiopharmaceuticalInformationSequence = DicomSequence(items)


def _patient_orientation_module(ds, position: str) -> None:
    """NM/PET Patient Orientation (C.8.4.6): recumbent, supine/prone, head/feet first."""
    from pydicom.sequence import Sequence as DicomSequence

    orient = _code_item(_RECUMBENT)
    orient.PatientOrientationModifierCodeSequence = DicomSequence(
        [_code_item(_SUPINE if position.endswith("S") else _PRONE)]
    )
    ds.PatientOrientationCodeSequence = DicomSequence([orient])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence(
        [_code_item(_HEADFIRST if position.startswith("H") else _FEETFIRST)]
    )


def _frame_of_reference_module(ds, uid: str) -> None:
    """Frame of Reference (C.7.4.1)."""
    ds.FrameOfReferenceUID = uid
    ds.PositionReferenceIndicator = ""


def _general_equipment_module(ds, model_name: str) -> None:
    """General Equipment (C.7.5.1)."""
    ds.Manufacturer = ""
    ds.ManufacturerModelName = model_name
    ds.SoftwareVersions = f"sirf_fbsem {__version__}"


def _acquisition_timing(ds, now: _dt.datetime, settings: _Settings, timing: _Timing) -> None:
    """General Image content date/time and the PET Image module's timing (C.7.6.1, C.8.9.4)."""
    acq = settings.acquisition_datetime
    ds.ContentDate = _da(now)
    ds.ContentTime = _tm(now)
    ds.AcquisitionDate = _da(acq) if acq else ""
    ds.AcquisitionTime = _tm(acq) if acq else ""
    ds.FrameReferenceTime = _ds(timing.frame_reference_ms)
    duration = settings.frame_duration_s
    ds.ActualFrameDuration = int(round(1000.0 * duration)) if duration else ""
    if timing.decay_factor is not None:
        ds.DecayFactor = _ds(timing.decay_factor)


def _directions(position: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Row and column directions in LPS (module docstring)."""
    sx, sy, _ = patient_flips(position)
    return (float(sx), 0.0, 0.0), (0.0, float(sy), 0.0)


def _image_plane_module(ds, geometry: ImageGeometry, position: str) -> None:
    """Image Plane (C.7.6.2), the attributes every slice shares (position and location: per slice)."""
    vz, vy, vx = geometry.voxel_size_mm
    row_dir, col_dir = _directions(position)
    ds.PixelSpacing = [_ds(vy), _ds(vx)]
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    ds.SliceThickness = _ds(vz)


def _image_pixel_module(ds, geometry: ImageGeometry, signed: bool) -> None:
    """Image Pixel (C.7.6.3) and the PET Image module's rescale intercept (0)."""
    _, ny, nx = geometry.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = "0"


def _slice_positions(geometry: ImageGeometry, position: str) -> tuple[np.ndarray, np.ndarray]:
    """ImagePositionPatient of every slice, (Z, 3) mm in LPS: ``[sx x0, sy y0, sz (z0 + k vz)]``
    (module docstring), and the image plane's normal (row x column direction)."""
    sx, sy, sz = patient_flips(position)
    x0, y0, z0 = geometry.first_voxel_physical_mm()
    vz = geometry.voxel_size_mm[0]
    k = np.arange(geometry.shape[0], dtype=np.float64)
    positions = np.stack([np.full_like(k, sx * x0), np.full_like(k, sy * y0), sz * (z0 + k * vz)], axis=1)
    return positions, np.cross(*_directions(position))


def _slice_instance(base, k: int, ipp: np.ndarray, normal: np.ndarray, slope: str, pixels: np.ndarray,
                    signed: bool):
    """Slice k's instance: ``base`` plus its UID, index, ImagePositionPatient ``ipp`` (3,) mm,
    SliceLocation (its position along the plane ``normal``), slope and pixels, with its file meta
    information."""
    pydicom = _require_pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.update(base)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = k + 1
    ds.ImageIndex = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.SliceLocation = _ds(float(ipp @ normal))
    ds.RescaleSlope = slope
    ds.PixelData = np.ascontiguousarray(pixels).astype("<i2" if signed else "<u2").tobytes()
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = PET_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"SIRF_FBSEM_{__version__}"[:16]
    ds.file_meta = meta
    return ds
