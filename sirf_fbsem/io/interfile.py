"""Interfile projection data (``.hs``/``.s``) and images (``.hv``/``.v``), as STIR reads and writes them.

The reader follows STIR's sources:

* Header syntax (``KeyParser.cxx``, ``interfile_keyword_functions.cxx``): ``key := value``
  lines; keys match after *standardising* (space, tab, ``_`` and ``!`` are white space;
  trimmed, runs collapsed, lower case); ``[n]`` before ``:=`` is an index (a vectored
  key); lines starting with ``;`` are comments; a line ending in ``\\`` continues on the
  next; numbers are read as a C++ stream reads them (``126 ; 252`` is 126); lists are
  ``{a, b, c}`` and a bare value is a list of one; the first key must be ``!INTERFILE``
  and parsing stops at ``!END OF INTERFILE``. (STIR's ``${ENV}`` substitution is not done.)
* Projection data (``InterfileHeader.cxx``: ``InterfilePDFSHeader``): ``matrix axis label
  [1] := tangential coordinate``, ``[4] := segment``; ``[2] := axial coordinate`` with
  ``[3] := view`` is Segment_View_AxialPos_TangPos (STIR's default: view outer, axial
  inner), ``[2] := view`` with ``[3] := axial coordinate`` the older
  Segment_AxialPos_View_TangPos; tangential positions fastest. Segments lie in the file in
  the order of the per-segment lists; their numbers come from sorting by ``min + max ring
  difference``, segment 0 being the one whose sum is 0 (``find_segment_sequence``): for
  STIR's own files, ascending order. Data are arc-corrected when ``applied corrections``
  holds ``arc correction`` (``arc corrected``, ``radial arc-correction``) and, as in STIR,
  when the key is absent or empty; their bin size is ``effective central bin size (cm)``
  when > 0, else the scanner's default bin size.
* Scanner (``InterfilePDFSHeader::post_processing``, ``Scanner.cxx``): the ``Scanner
  parameters`` block (or the same keys at top level), cm converted to mm (inner radius =
  diameter / 2). When ``originating system`` names a scanner STIR knows (here the Siemens
  mMR, the RPT "PRT-1" and the GE Signa PET/MR), keys the header lacks come from STIR's
  table; keys in the header win.
* Images (``interfile.cxx``: ``read_interfile_image``): ``matrix size`` and ``scaling factor
  (mm/pixel)`` [1..3] are x, y, z (voxel size 1 mm when absent, as STIR); index ranges
  ``z 0..``, ``y -(ny/2)..``, ``x -(nx/2)..``, and ``first pixel offset (mm) = min_index *
  voxel_size + origin``, so ``origin = first_pixel_offset - min_index * voxel_size`` (0 on
  an axis without an offset). ``image scaling factor [1]`` (one value, or one per plane)
  multiplies the data; ``quantification units`` is honoured as STIR does.
* Binary data: ``imagedata byte order`` LITTLEENDIAN or BIGENDIAN (STIR's default:
  BIGENDIAN); ``number format`` float (4 or 8 bytes), signed or unsigned integer (1, 2 or 4
  bytes) (STIR's default: unsigned integer); ``data offset in bytes [1]`` skips a prefix.

Checks beyond STIR's, so that a header that lies is caught at the source, with the file and
the key named (:class:`InterfileError`, an :class:`~sirf_fbsem.errors.InputError`):

* sizes: every axis at most ``_MAX_AXIS_SIZE``; the data file's size is checked against the
  header (``offset + values x bytes per value``) before any array is made from the header;
  a missing data file is an :class:`InterfileDataNotFoundError` (a ``FileNotFoundError``);
* rings: the segments' ring differences and axial positions must fit ``number of rings``
  (:func:`_check_segments_fit_rings`), before the data are looked at;
* byte order: values that only the other byte order makes plausible (floats of absurd
  magnitude or spread, integers that are all multiples of 256) are refused naming
  ``imagedata byte order`` (:func:`_check_byte_order`, on a sample: milliseconds);
* counts: :func:`warn_if_not_counts` warns (:class:`PlausibilityWarning`) when prompts are
  not whole numbers (for the emission data only; factors and additive terms are not counts).

Arrays are SIRF's: sinograms float32 ``(tof=1, sinograms, views, tangential)`` with
segments 0, +1, -1, +2, -2, ... and axial positions ascending in each (see
:mod:`sirf_fbsem.geometry`); images float32 ``(z, y, x)``. The writers write
float32 little endian in STIR's default layout with a STIR4-style header (with the full
scanner block) that STIR and SIRF read; the data file first and the header last, each
through a temporary file, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from enum import Enum
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError, InputFileNotFoundError
from ..geometry import GeometryError, ImageGeometry, Scanner, Segment, SinogramGeometry
from .atomic import atomic_path
from .outputs import INTERFILE_MARK, PlannedOutput, absolute, check_replaceable

__all__ = [
    "WRITTEN_BY_COMMENT",
    "InterfileError",
    "InterfileDataNotFoundError",
    "PlausibilityWarning",
    "InterfileHeader",
    "SinogramStorageOrder",
    "standardise_keyword",
    "normalise_key",
    "parse_list",
    "parse_header",
    "scanner_from_header",
    "sinogram_geometry_from_header",
    "image_geometry_from_header",
    "read_projdata",
    "write_projdata",
    "read_image",
    "write_image",
    "warn_if_not_counts",
]

_MISSING = object()
_MAX_HEADER_BYTES = 16 * 1024 * 1024  # larger is not a header (a binary file passed by mistake)
#: largest size a header may give one axis (matrix size, rings, detectors, bins): far beyond any scanner,
#: small enough that a geometry built from the header (before its data file is checked) stays in memory
_MAX_AXIS_SIZE = 1 << 20
_MAX_TIME_FRAMES = 100_000  # dynamic scans have hundreds at most
_PATIENT_POSITIONS = {  # (patient orientation, patient rotation), standardised -> DICOM-style position
    ("head in", "supine"): "HFS",
    ("head in", "prone"): "HFP",
    ("feet in", "supine"): "FFS",
    ("feet in", "prone"): "FFP",
}


class InterfileError(InputError):
    """An Interfile header or data file that cannot be read or written as asked.

    The message names the file, the key (or field), what was expected and what was
    found; ``path`` and ``key`` hold the file and the key for programs.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.key = key


class InterfileDataNotFoundError(InterfileError, InputFileNotFoundError):
    """The data file a header names (``name of data file``) does not exist.

    Also a ``FileNotFoundError``: ``path`` is the header, ``key`` the header key and
    ``filename`` the missing data file.
    """

    def __init__(self, message: str, *, path: str | os.PathLike, key: str, missing: str | os.PathLike) -> None:
        super().__init__(message, path=path, key=key)
        self.filename = str(missing)


class PlausibilityWarning(UserWarning):
    """Input that can be read but looks wrong for its use (e.g. prompts that are not integer counts,
    a listmode time interval past the end of the data); the message names the file and says why."""


class SinogramStorageOrder(str, Enum):
    """Order of a segment's data in a ``.s`` file (STIR's ``ProjDataFromStream::StorageOrder``).

    Segments are outermost, tangential positions fastest.
    """

    #: ``matrix axis label [2] := axial coordinate``, ``[3] := view``: view outer, axial inner (STIR's default).
    SEGMENT_VIEW_AXIAL_TANG = "Segment_View_AxialPos_TangPos"
    #: ``matrix axis label [2] := view``, ``[3] := axial coordinate``: axial outer, view inner (older files).
    SEGMENT_AXIAL_VIEW_TANG = "Segment_AxialPos_View_TangPos"


# --------------------------------------------------------------------------- keys and values
_WHITE = re.compile(r"[ \t_!]+")
_INDEXED = re.compile(r"^(?P<name>[^\[]*?)\s*\[\s*(?P<index>[+-]?\d+)\s*\]\s*$")


def standardise_keyword(text: str) -> str:
    """STIR's ``standardise_interfile_keyword``: space, tab, ``_``, ``!`` are white space;
    trimmed, runs collapsed, lower case. Also used to compare values (byte order, ...)."""
    return _WHITE.sub(" ", text).strip().lower()


def normalise_key(key: str) -> str:
    """A key as :class:`InterfileHeader` stores it: ``'!matrix size [1]'`` -> ``'matrix size[1]'``."""
    m = _INDEXED.match(key)
    if m:
        return f"{standardise_keyword(m.group('name'))}[{int(m.group('index'))}]"
    return standardise_keyword(key)


def _display_key(key: str) -> str:
    return re.sub(r"\[(\d+)\]$", r" [\1]", key)  # 'matrix size[1]' -> 'matrix size [1]'


def parse_list(text: str) -> list[str]:
    """Items of an Interfile list value: ``'{ 27,49 , 71}'`` -> ``['27', '49', '71']``.

    A value without braces is a list of one (as in STIR); ``'{}'`` is empty. Raises
    ``ValueError`` when the closing brace is missing.
    """
    t = text.strip()
    if t.startswith("{"):
        end = t.find("}")
        if end < 0:
            raise ValueError(f"list {text!r} has no closing '}}'")
        inner = t[1:end].strip()
        return [item.strip() for item in inner.split(",")] if inner else []
    t = t.split(";", 1)[0].strip()
    return [t] if t else []


def _number_token(text: str) -> str:
    """The leading token of a numeric value, as a C++ stream reads it (``'126 ; 252'`` -> ``'126'``)."""
    t = text.strip()
    return t.split(None, 1)[0].split(";", 1)[0] if t else ""


#: decimal exponent beyond which a header number is refused: a C++ double (STIR's type) overflows near 1e308
_MAX_DECIMAL_EXPONENT = 300
#: an integer with more decimal digits than this is refused (beyond 64 bits; STIR reads sizes as C++ ints)
_MAX_INT_DIGITS = 18


def _to_decimal(token: str) -> Decimal:
    d = Decimal(token)
    if not d.is_finite() or (d != 0 and d.adjusted() > _MAX_DECIMAL_EXPONENT):
        raise InvalidOperation(token)
    return d


def _to_int(token: str) -> int:
    d = _to_decimal(token)
    if d != d.to_integral_value() or (d != 0 and d.adjusted() >= _MAX_INT_DIGITS):
        raise ValueError(token)
    return int(d)


def _fail(path: Path, key: str, message: str) -> InterfileError:
    return InterfileError(message, path=path, key=key)


# --------------------------------------------------------------------------- header
@dataclass(frozen=True, eq=False)
class InterfileHeader:
    """A parsed Interfile header: normalised keys (:func:`normalise_key`) -> raw value strings.

    A key given twice keeps its last value (as in STIR). ``path`` is the header file;
    a relative ``name of data file`` resolves against its directory.
    """

    path: Path
    entries: Mapping[str, str]

    def __contains__(self, key: str) -> bool:
        return normalise_key(key) in self.entries

    def get(self, key: str, default: str | None = None) -> str | None:
        """The raw value of ``key`` (in any spelling STIR accepts), or ``default``."""
        return self.entries.get(normalise_key(key), default)

    def error(self, key: str, expected: str, found: str | None = None) -> InterfileError:
        """An :class:`InterfileError` naming this header, ``key``, what was expected and what was found."""
        k = normalise_key(key)
        if found is None:
            found = f"{self.entries[k]!r}" if k in self.entries else "no such key"
        msg = f"Interfile header '{self.path}': '{_display_key(k)}' should be {expected}; found {found}"
        return _fail(self.path, _display_key(k), msg)

    def require(self, key: str, expected: str = "present") -> str:
        value = self.get(key)
        if value is None or not value.strip():
            raise self.error(key, expected, None if value is None else "an empty value")
        return value

    def _scalar(self, key: str, default, convert: Callable, expected: str):
        value = self.get(key)
        if value is None or not value.strip():
            if default is _MISSING:
                raise self.error(key, expected)
            return default
        try:
            return convert(_number_token(value))
        except (InvalidOperation, ValueError):
            raise self.error(key, expected) from None

    def get_int(self, key: str, default=_MISSING) -> int:
        """An integer; ``default`` when absent (without a default: an error naming the key)."""
        return self._scalar(key, default, _to_int, "an integer")

    def get_decimal(self, key: str, default=_MISSING) -> Decimal:
        """A number as the exact ``Decimal`` of its text (so cm -> mm stays exact)."""
        return self._scalar(key, default, _to_decimal, "a finite number")

    def get_float(self, key: str, default=_MISSING) -> float:
        return self._scalar(key, default, lambda t: float(_to_decimal(t)), "a finite number")

    def get_list(self, key: str, default=_MISSING, convert: Callable | None = None,
                 expected: str = "a list such as '{ 1,2,3 }'") -> list:
        """Items of a list value (:func:`parse_list`), each through ``convert`` when given."""
        value = self.get(key)
        if value is None:
            if default is _MISSING:
                raise self.error(key, expected)
            return default
        try:
            items = parse_list(value)
            return items if convert is None else [convert(_number_token(item)) for item in items]
        except (InvalidOperation, ValueError):
            raise self.error(key, expected) from None

    def get_int_list(self, key: str, default=_MISSING) -> list[int]:
        return self.get_list(key, default, _to_int, "a list of integers such as '{ 1,2,3 }'")

    def get_decimal_list(self, key: str, default=_MISSING) -> list[Decimal]:
        return self.get_list(key, default, _to_decimal, "a list of numbers such as '{ 1.5,2 }'")

    def get_choice(self, key: str, choices: Sequence[str], default: str | None = None) -> str:
        """A value among ``choices`` (compared standardised), returned standardised."""
        value = self.get(key)
        expected = "one of " + ", ".join(repr(c) for c in choices)
        if value is None or not value.strip():
            if default is None:
                raise self.error(key, expected)
            return standardise_keyword(default)
        if standardise_keyword(value) not in [standardise_keyword(c) for c in choices]:
            raise self.error(key, expected)
        return standardise_keyword(value)

    @property
    def data_file(self) -> Path:
        """``name of data file``, resolved against the header's directory (STIR's ``prepend_directory_name``)."""
        p = Path(self.require("name of data file", "the name of the binary data file").strip())
        return p if p.is_absolute() else self.path.parent / p

    @property
    def patient_position(self) -> str | None:
        """'HFS', 'HFP', 'FFS' or 'FFP' from ``patient orientation`` and ``patient rotation`` (or
        Siemens' ``%patient orientation``); ``None`` when absent or other."""
        siemens = (self.get("%patient orientation") or "").strip().upper()
        if siemens in ("HFS", "HFP", "FFS", "FFP"):
            return siemens
        orientation, rotation = self.get("patient orientation"), self.get("patient rotation")
        if orientation is None or rotation is None:
            return None
        return _PATIENT_POSITIONS.get((standardise_keyword(orientation), standardise_keyword(rotation)))

    @property
    def time_frames(self) -> list[tuple[float, float]]:
        """(start, duration) in s per ``number of time frames``, from ``image relative start time
        (sec) [i]`` and ``image duration (sec) [i]`` (0 when absent)."""
        n = self.get_int("number of time frames", 1)
        if n > _MAX_TIME_FRAMES:
            raise self.error("number of time frames", f"an integer <= {_MAX_TIME_FRAMES:,}")
        frames = [(0.0, 0.0)] * max(n, 0)
        for key in self.entries:  # only the frames the header describes (a key lookup per frame is slow)
            m = _INDEXED.match(key)
            if m and m.group("name") in ("image relative start time (sec)", "image duration (sec)"):
                i = int(m.group("index"))
                if 1 <= i <= n:
                    start, duration = frames[i - 1]
                    value = self.get_float(key, 0.0)
                    is_start = m.group("name").startswith("image relative")
                    frames[i - 1] = (value, duration) if is_start else (start, value)
        return frames


def _read_header_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise _fail(path, "path", f"Interfile header '{path}' does not exist or is not a file")
    size = path.stat().st_size
    if size > _MAX_HEADER_BYTES:
        raise _fail(path, "path", f"'{path}' has {size:,} bytes, too many for an Interfile header (a data file?)")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise _fail(path, "path", f"'{path}' holds NUL bytes: a binary file, not an Interfile header (pass the header)")
    text = raw[3:].decode("latin-1") if raw.startswith(b"\xef\xbb\xbf") else raw.decode("latin-1")
    lines: list[str] = []
    pending = ""
    for line in text.splitlines():
        line = pending + line
        if line.endswith("\\"):  # continues on the next line (STIR's read_line)
            pending = line[:-1]
            continue
        pending = ""
        lines.append(line)
    if pending:
        lines.append(pending)
    return lines


def parse_header(path: str | os.PathLike) -> InterfileHeader:
    """Parse an Interfile header (``.hs``, ``.hv``, also Siemens ``.l.hdr``/``.n.hdr``).

    Only the syntax is checked here; the readers check the content.
    """
    path = Path(path)
    entries: dict[str, str] = {}
    started = False
    for lineno, line in enumerate(_read_header_lines(path), start=1):
        s = line.strip()
        if not s or s.startswith(";"):
            continue
        raw_key, _, value = s.partition(":=")
        key = normalise_key(raw_key)
        if not started:
            if key != "interfile":
                raise _fail(path, "!INTERFILE", f"Interfile header '{path}': the first keyword must be "
                                                f"'!INTERFILE :='; found {s[:60]!r} on line {lineno}")
            started = True
        elif key == "end of interfile":
            break
        elif key:
            entries[key] = value.strip(" \t")
    if not started:
        raise _fail(path, "!INTERFILE", f"Interfile header '{path}': expected '!INTERFILE :=', found an empty file")
    return InterfileHeader(path=path, entries=entries)


def _as_header(hdr: InterfileHeader | str | os.PathLike) -> InterfileHeader:
    return hdr if isinstance(hdr, InterfileHeader) else parse_header(hdr)


# --------------------------------------------------------------------------- STIR's scanner table (subset)
#: Keys of STIR's scanner block that a known scanner fills when the header lacks them.
_SCANNER_KEYS = (
    "number of rings", "number of detectors per ring", "inner ring diameter (cm)",
    "average depth of interaction (cm)", "distance between rings (cm)", "default bin size (cm)",
    "maximum number of non-arc-corrected bins", "default number of arc-corrected bins",
)
#: Block/bucket keys, in the order of STIR's ``Scanner::parameter_info()``.
_BLOCK_KEYS = (
    "Number of blocks per bucket in transaxial direction", "Number of blocks per bucket in axial direction",
    "Number of crystals per block in axial direction", "Number of crystals per block in transaxial direction",
    "Number of detector layers", "Number of crystals per singles unit in axial direction",
    "Number of crystals per singles unit in transaxial direction",
)
#: STIR's ``Scanner(Type)`` (``src/buildblock/Scanner.cxx``) for the scanners of the example data, in header
#: units: names; values of ``_SCANNER_KEYS``; values of ``_BLOCK_KEYS``; (energy resolution, reference keV).
_STIR_SCANNERS = (
    (("Siemens mMR", "mMR", "2008"), ("64", "504", "65.6", "0.7", "0.40625", "0.208626", "344", "344"),
     (1, 2, 8, 9, 1, 16, 9), ("0.145", "511")),
    (("PRT-1", "RPT"), ("16", "384", "74.6", "0.7", "0.675", "0.31088", "128", "128"),
     (4, 1, 8, 8, 1, 8, 32), None),
    (("GE Signa PET/MR", "PET/MR Signa", "Signa PET/MR"),
     ("45", "448", "62.36", "0.85", "0.556", "0.201565", "357", "331"), (4, 5, 9, 4, 1, 1, 1), ("0.105", "511")),
)


def _stir_scanner(name: str | None):
    """STIR's ``Scanner::get_scanner_from_name`` over the table above (names compared standardised):
    ``(canonical name, {key: value}, [(block/energy key, value)])``, or ``None``."""
    wanted = standardise_keyword(name or "")
    for names, values, blocks, energy in _STIR_SCANNERS:
        if wanted and any(standardise_keyword(n) == wanted for n in names):
            extra = [("Energy resolution", energy[0]), ("Reference energy (in keV)", energy[1])] if energy else []
            return names[0], dict(zip(_SCANNER_KEYS, values)), extra + list(zip(_BLOCK_KEYS, map(str, blocks)))
    return None


# --------------------------------------------------------------------------- scanner
def _mm(value_cm: Decimal, factor: int = 10) -> float:
    with localcontext() as ctx:
        ctx.prec = 50
        return float(value_cm * factor)


def scanner_from_header(hdr: InterfileHeader | str | os.PathLike) -> Scanner:
    """The :class:`Scanner` of a projection-data header (its ``Scanner parameters`` block).

    cm become mm exactly (inner radius = ``inner ring diameter (cm)`` * 10 / 2). A
    ``Default bin size (cm)`` of -1 or 0 stays <= 0 ("not given"). Keys the header lacks
    come from STIR's definition of the ``originating system`` when STIR knows it; a
    scanner that stays incomplete is an :class:`InterfileError` naming the key.
    """
    hdr = _as_header(hdr)
    geometry_key = next((k for k in hdr.entries if k.startswith("scanner geometry")), None)
    if geometry_key and standardise_keyword(hdr.entries[geometry_key]) not in ("cylindrical", ""):
        raise hdr.error(geometry_key, "'Cylindrical' (block and generic scanner geometries are not supported)")
    system = (hdr.get("originating system") or "").strip()
    known = _stir_scanner(system)

    def value(key: str, missing: int, fill_if: Callable[[Decimal], bool]) -> Decimal:
        v = hdr.get_decimal(key, Decimal(missing))
        return Decimal(known[1][key]) if known is not None and fill_if(v) else v  # STIR's rules for filling

    num_rings = int(value("number of rings", -1, lambda v: v < 1))
    num_dets = int(value("number of detectors per ring", -1, lambda v: v < 1))
    num_rings, num_dets = (n if n <= _MAX_AXIS_SIZE else -1 for n in (num_rings, num_dets))  # refused below
    diameter = value("inner ring diameter (cm)", -1, lambda v: v < 0)
    doi = value("average depth of interaction (cm)", -1, lambda v: v < 0)
    spacing = value("distance between rings (cm)", -1, lambda v: v < 0)
    bin_size = value("default bin size (cm)", -1, lambda v: v < 0)
    max_non_arc = int(value("maximum number of non-arc-corrected bins", 0, lambda v: v <= 0))
    default_arc = int(value("default number of arc-corrected bins", 0, lambda v: v <= 0))
    unknown = f" (and STIR does not know the originating system '{system}')" if system and known is None else ""
    for key, ok, expected in (
        ("number of rings", num_rings >= 1, f"an integer from 1 to {_MAX_AXIS_SIZE:,}"),
        ("number of detectors per ring", num_dets >= 2, f"an integer from 2 to {_MAX_AXIS_SIZE:,}"),
        ("inner ring diameter (cm)", diameter > 0, "a diameter > 0 cm"),
        ("average depth of interaction (cm)", doi >= 0, "a depth >= 0 cm"),
        ("distance between rings (cm)", spacing > 0, "a ring spacing > 0 cm"),
        ("maximum number of non-arc-corrected bins", max_non_arc <= _MAX_AXIS_SIZE,
         f"an integer <= {_MAX_AXIS_SIZE:,}"),
        ("default number of arc-corrected bins", default_arc <= _MAX_AXIS_SIZE, f"an integer <= {_MAX_AXIS_SIZE:,}"),
    ):
        if not ok:
            raise hdr.error(key, expected + unknown)
    name = known[0] if known is not None else system or (hdr.get("scanner type") or "").strip() or "unknown"
    try:
        return Scanner(
            name=name, num_rings=num_rings, num_detectors_per_ring=num_dets,
            inner_ring_radius_mm=_mm(diameter, 5), average_depth_of_interaction_mm=_mm(doi),
            ring_spacing_mm=_mm(spacing), default_bin_size_mm=_mm(bin_size),
            view_offset_deg=hdr.get_float("view offset (degrees)", 0.0),
            max_num_non_arccorrected_bins=max_non_arc, default_num_arccorrected_bins=default_arc,
        )
    except GeometryError as exc:
        raise _fail(hdr.path, "Scanner parameters",
                    f"Interfile header '{hdr.path}': 'Scanner parameters' do not make a scanner: {exc}") from exc


# --------------------------------------------------------------------------- projection-data structure
@dataclass(frozen=True)
class _ProjDataLayout:
    geometry: SinogramGeometry
    file_segment_nums: tuple[int, ...]  # segment numbers in the order the file stores them
    storage_order: SinogramStorageOrder


def _check_study(hdr: InterfileHeader, pet_data_type: str) -> None:
    modality = hdr.get("imaging modality")
    if modality is not None and standardise_keyword(modality) in ("nm", "nucmed", "spect"):
        raise hdr.error("imaging modality", "PET ('PT' or 'PET'; SPECT data are not supported)")
    value = hdr.get("pet data type")
    if value is not None and standardise_keyword(value) != standardise_keyword(pet_data_type):
        raise hdr.error("PET data type", f"'{pet_data_type}'")


def _axis_label(hdr: InterfileHeader, index: int) -> str:
    return standardise_keyword(hdr.get(f"matrix axis label[{index}]") or "")


def _single_int(hdr: InterfileHeader, key: str, what: str) -> int:
    values = hdr.get_int_list(key)
    if len(values) != 1 or not 1 <= values[0] <= _MAX_AXIS_SIZE:
        raise hdr.error(key, f"one integer from 1 to {_MAX_AXIS_SIZE:,} ({what})")
    return values[0]


def _segment_sequence(hdr: InterfileHeader, min_rd: Sequence[int], max_rd: Sequence[int]) -> list[int]:
    """STIR's ``find_segment_sequence``: segment numbers, in file order, by sorted ring-difference sums."""
    n = len(min_rd)
    order = sorted(range(n), key=lambda i: min_rd[i] + max_rd[i])
    zero = next((rank for rank, i in enumerate(order) if min_rd[i] + max_rd[i] >= 0), n)
    if zero == n or min_rd[order[zero]] + max_rd[order[zero]] != 0:
        raise hdr.error("minimum ring difference per segment",
                        "lists with a segment 0 (one whose minimum + maximum ring difference is 0)",
                        f"minimum {list(min_rd)}, maximum {list(max_rd)}")
    seq = [0] * n
    for rank, i in enumerate(order):
        seq[i] = rank - zero
    return seq


def _ordinal(i: int) -> str:
    """0 -> '1st', 1 -> '2nd', ... (the position of a value in a header list)."""
    n = i + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _max_axial_poss(num_rings: int, min_rd: int, max_rd: int) -> int:
    """Axial positions of a segment that uses every ring pair (as STIR's ``construct_proj_data_info``).

    A segment of one ring difference ``d`` has ``num_rings - |d|`` positions (one per ring pair,
    a ring apart); a segment combining ring differences ``min_rd..max_rd`` has one position per
    value of ``ring1 + ring2`` (half a ring apart): ``2 num_rings - 1 - 2 min |d|``.
    """
    min_abs = 0 if min_rd <= 0 <= max_rd else min(abs(min_rd), abs(max_rd))
    return num_rings - min_abs if min_rd == max_rd else 2 * num_rings - 1 - 2 * min_abs


def _check_segments_fit_rings(hdr: InterfileHeader, scanner: Scanner, axial_key: str, num_axial: Sequence[int],
                              min_rd: Sequence[int], max_rd: Sequence[int], seq: Sequence[int]) -> None:
    """The segments' ring differences and axial positions must fit the scanner's rings.

    Ring differences lie in ``-(num_rings - 1) .. num_rings - 1`` and segments do not share
    one; a segment has at most :func:`_max_axial_poss` axial positions, and STIR centres fewer
    on the scanner (SIRF's single-slice templates keep 1 of 3), so the shortfall must be even
    for the positions to fall on ring pairs. Errors name 'number of rings' and the list keys
    (with where the ring count came from), not the downstream symptom.
    """
    nr = scanner.num_rings
    given = hdr.get("number of rings")
    if given is not None and given.strip():
        rings = f"'number of rings' := {nr}"
    else:
        rings = f"'number of rings' (absent from the header; {nr} from STIR's definition of the {scanner.name})"
    where = f"Interfile header '{hdr.path}'"
    axial_display = _display_key(axial_key)
    for i, (lo, hi, n, k) in enumerate(zip(min_rd, max_rd, num_axial, seq)):
        if max(abs(lo), abs(hi)) > nr - 1:
            raise _fail(hdr.path, "number of rings",
                        f"{where}: {rings} allows ring differences from {-(nr - 1)} to {nr - 1}, but segment {k} has "
                        f"{lo}..{hi} ('minimum/maximum ring difference per segment'); check 'number of rings' and the "
                        "ring-difference lists")
        n_max = _max_axial_poss(nr, lo, hi)
        kind = f"sinograms in segment {k}"
        if n > n_max:
            raise _fail(hdr.path, "number of rings",
                        f"{where}: {rings} gives at most {n_max} {kind} (ring differences {lo}..{hi}), but "
                        f"'{axial_display}' gives {n}: the header's ring count and its axial layout disagree "
                        "(check 'number of rings' and 'matrix size' for the axial coordinate)")
        if (n_max - n) % 2:
            raise _fail(hdr.path, "number of rings",
                        f"{where}: {rings} gives {n_max} {kind} (ring differences {lo}..{hi}); "
                        f"'{axial_display}' gives {n}, which cannot be centred on the scanner's ring pairs "
                        f"(STIR keeps a centred subset: {n_max}, {n_max - 2}, {n_max - 4}, ...); check "
                        "'number of rings' and 'matrix size' for the axial coordinate")
    spans = sorted(zip(min_rd, max_rd, seq))
    for (lo1, hi1, k1), (lo2, hi2, k2) in zip(spans, spans[1:]):
        if lo2 <= hi1:
            raise hdr.error("minimum ring difference per segment", "segments that do not share ring differences",
                            f"segment {k1} ({lo1}..{hi1}) and segment {k2} ({lo2}..{hi2}) overlap")


def _is_arc_corrected(hdr: InterfileHeader) -> bool:
    corrections = [standardise_keyword(c) for c in hdr.get_list("applied corrections", [])]
    if not corrections:  # STIR: keyword absent (or empty) -> arc-corrected
        return True
    return any(c in ("arc correction", "arc corrected", "radial arc-correction") for c in corrections)


def _projdata_layout(hdr: InterfileHeader,
                     check_data: Callable[[int, int, str], None] | None = None) -> _ProjDataLayout:
    """The layout of a projection-data header, every key checked against STIR's rules.

    ``check_data(num_segments, num_values, dims)``, when given, is called once the sizes are
    known and checked (segments, values in the file, ``'SxVxN'``) but before any array is made
    from them: the reader checks the data file's size there, so that a header asking for a
    gigantic array is refused by its file size before anything is allocated.
    """
    _check_study(hdr, "Emission")
    if "%sms-mi version number" in hdr:
        raise hdr.error("%SMS-MI version number", "absent: Siemens e7tools sinogram headers are not supported "
                        "(convert with STIR first)", "a Siemens header")
    ndim = hdr.get_int("number of dimensions")
    if ndim != 4:
        labels = [standardise_keyword(v) for k, v in hdr.entries.items() if k.startswith("matrix axis label[")]
        tof = "timing positions" in labels
        raise hdr.error("number of dimensions", "4 (TOF data, with 'timing positions', are not supported)" if tof
                        else "4 (segment, view/axial coordinate, axial coordinate/view, tangential)", str(ndim))
    if _axis_label(hdr, 1) != "tangential coordinate":
        raise hdr.error("matrix axis label[1]", "'tangential coordinate'")
    if _axis_label(hdr, 4) != "segment":
        raise hdr.error("matrix axis label[4]", "'segment'")
    labels23 = (_axis_label(hdr, 2), _axis_label(hdr, 3))
    if labels23 == ("axial coordinate", "view"):
        order, view_key, axial_key = SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG, "matrix size[3]", "matrix size[2]"
    elif labels23 == ("view", "axial coordinate"):
        order, view_key, axial_key = SinogramStorageOrder.SEGMENT_AXIAL_VIEW_TANG, "matrix size[2]", "matrix size[3]"
    else:
        raise hdr.error("matrix axis label[2]", "'axial coordinate' with [3] 'view' (Segment_View_AxialPos_TangPos) "
                        "or 'view' with [3] 'axial coordinate' (Segment_AxialPos_View_TangPos)",
                        f"[2] {hdr.get('matrix axis label[2]')!r}, [3] {hdr.get('matrix axis label[3]')!r}")
    num_bins = _single_int(hdr, "matrix size[1]", "tangential positions")
    num_segments = _single_int(hdr, "matrix size[4]", "segments")
    num_views = _single_int(hdr, view_key, "views")
    num_axial = hdr.get_int_list(axial_key)
    min_rd = hdr.get_int_list("minimum ring difference per segment")
    max_rd = hdr.get_int_list("maximum ring difference per segment")
    for key, values in ((axial_key, num_axial), ("minimum ring difference per segment", min_rd),
                        ("maximum ring difference per segment", max_rd)):
        if len(values) != num_segments:
            raise hdr.error(key, f"{num_segments} values (one per segment, 'matrix size [4]')",
                            f"{len(values)} values {values}")
    if min(num_axial) < 1 or max(num_axial) > _MAX_AXIS_SIZE:
        raise hdr.error(axial_key, f"axial positions from 1 to {_MAX_AXIS_SIZE:,} in every segment")
    for i, (lo, hi) in enumerate(zip(min_rd, max_rd)):
        if lo > hi:
            raise hdr.error("minimum ring difference per segment",
                            "values <= 'maximum ring difference per segment' in every segment",
                            f"minimum {lo} > maximum {hi} in the segment listed {_ordinal(i)}")
    frames = hdr.get_int("number of time frames", 1)
    if frames != 1:
        raise hdr.error("number of time frames", "1 (dynamic projection data are not supported)", str(frames))
    seq = _segment_sequence(hdr, min_rd, max_rd)
    scanner = scanner_from_header(hdr)
    _check_segments_fit_rings(hdr, scanner, axial_key, num_axial, min_rd, max_rd, seq)
    if check_data is not None:
        check_data(num_segments, sum(num_axial) * num_views * num_bins, f"{sum(num_axial)}x{num_views}x{num_bins}")
    arc = _is_arc_corrected(hdr)
    bin_size = scanner.default_bin_size_mm
    if arc:
        eff = hdr.get_decimal("effective central bin size (cm)", Decimal(-1))
        bin_size = _mm(eff) if eff > 0 else bin_size
        if not bin_size > 0:
            raise hdr.error("effective central bin size (cm)",
                            "> 0 for arc-corrected data (or a 'Default bin size (cm)' > 0 in the scanner block)")
    segments = tuple(Segment(seq[i], min_rd[i], max_rd[i], num_axial[i]) for i in range(len(seq)))
    try:
        geometry = SinogramGeometry(
            scanner=scanner, segments=segments,
            num_views=num_views, num_tangential_poss=num_bins, arc_corrected=arc, tangential_bin_size_mm=bin_size,
        )
    except GeometryError as exc:
        raise _fail(hdr.path, "matrix size", f"Interfile header '{hdr.path}': the projection-data keys do not make "
                                             f"a STIR geometry: {exc}") from exc
    return _ProjDataLayout(geometry=geometry, file_segment_nums=tuple(seq), storage_order=order)


def sinogram_geometry_from_header(hdr: InterfileHeader | str | os.PathLike) -> SinogramGeometry:
    """The :class:`SinogramGeometry` of a projection-data header (its data file need not exist)."""
    return _projdata_layout(_as_header(hdr)).geometry


# --------------------------------------------------------------------------- binary format
_NUMBER_FORMATS = {
    ("float", 4): "f4", ("float", 8): "f8",
    ("signed integer", 1): "i1", ("signed integer", 2): "i2", ("signed integer", 4): "i4",
    ("unsigned integer", 1): "u1", ("unsigned integer", 2): "u2", ("unsigned integer", 4): "u4",
}
_SUPPORTED_FORMATS = "'float' (4 or 8 bytes), 'signed integer' or 'unsigned integer' (1, 2 or 4 bytes)"


@dataclass(frozen=True)
class _BinaryFormat:
    dtype: np.dtype
    offset: int
    scale: list[float]  # one value, or one per plane (images)
    byte_order_key: str = "imagedata byte order"  # the key the header uses (Siemens: 'image data byte order')
    byte_order_given: bool = True  # False: absent, STIR's default BIGENDIAN


def _binary_format(hdr: InterfileHeader, num_scale_factors: int, per_plane_scaling: bool) -> _BinaryFormat:
    siemens_key = "image data byte order" in hdr and "imagedata byte order" not in hdr
    byte_order_key = "image data byte order" if siemens_key else "imagedata byte order"
    byte_order = hdr.get_choice(byte_order_key, ("LITTLEENDIAN", "BIGENDIAN"), default="BIGENDIAN")
    number_format = standardise_keyword(hdr.get("number format") or "unsigned integer")
    nbytes = hdr.get_int("number of bytes per pixel", -1)
    if nbytes <= 0:
        raise hdr.error("number of bytes per pixel", "an integer > 0")
    code = _NUMBER_FORMATS.get((number_format, nbytes))
    if code is None:
        if any(fmt == number_format for fmt, _ in _NUMBER_FORMATS):
            raise hdr.error("number of bytes per pixel", f"a size for '{number_format}': {_SUPPORTED_FORMATS}")
        raise hdr.error("number format", f"one of {_SUPPORTED_FORMATS}")
    dtype = np.dtype(("<" if byte_order == "littleendian" else ">") + code)
    offset_key = "data offset in bytes[1]" if "data offset in bytes[1]" in hdr else "data offset in bytes"
    offset = hdr.get_int(offset_key, 0)
    if offset < 0:
        raise hdr.error(offset_key, "an integer >= 0")
    factors = [float(d) for d in hdr.get_decimal_list("image scaling factor[1]", [Decimal(1)])] or [1.0]
    if len(factors) not in (1, num_scale_factors):
        raise hdr.error("image scaling factor[1]", f"one value or {num_scale_factors}", f"{len(factors)} values")
    if len(factors) > 1 and not per_plane_scaling and len(set(factors)) > 1:
        raise hdr.error("image scaling factor[1]", "equal values (one scale for all projection data)")
    units = hdr.get_float("quantification units", 1.0)
    if units != 1.0:  # Louvain-la-Neuve's key, as STIR's InterfileHeader::post_processing handles it
        all_one = factors[0] == 1.0
        if any((f != 1.0) if all_one else (f != units) for f in factors):
            raise hdr.error("quantification units", "used only without 'image scaling factor' or with equal values")
        factors = [units] * len(factors)
    return _BinaryFormat(dtype=dtype, offset=offset, scale=factors, byte_order_key=byte_order_key,
                         byte_order_given=bool((hdr.get(byte_order_key) or "").strip()))


def _data_path(hdr: InterfileHeader, what: str) -> Path:
    key = "name of data file"
    path = hdr.data_file
    try:
        is_header = path.resolve() == hdr.path.resolve()
        exists = path.is_file()
    except (OSError, ValueError):  # a name the file system cannot hold (NUL byte, too long)
        raise hdr.error(key, f"the name of an existing {what} data file") from None
    if is_header:
        raise hdr.error(key, f"the {what} data file", "the header itself (a template without data)")
    if not exists:
        raise InterfileDataNotFoundError(
            f"Interfile header '{hdr.path}': 'name of data file' names the {what} data file '{path}', which does "
            f"not exist{' (it is a folder)' if path.is_dir() else ''}", path=hdr.path, key=key, missing=path)
    return path


def _check_data_size(hdr: InterfileHeader, data_path: Path, fmt: _BinaryFormat, count: int, what: str,
                     dims: str) -> None:
    """The data file must hold ``offset + count x bytes per value`` bytes exactly (checked before reading)."""
    size = data_path.stat().st_size
    expected = fmt.offset + count * fmt.dtype.itemsize
    if size != expected:
        offset = f" after an offset of {fmt.offset:,} bytes" if fmt.offset else ""
        short = " (truncated?)" if size < expected else ""
        raise _fail(data_path, "matrix size",
                    f"{what} '{data_path.name}' has {size:,} bytes{short}; header '{hdr.path}' expects {expected:,} "
                    f"({dims} {fmt.dtype.name}{offset}; from 'matrix size', 'number format', "
                    f"'number of bytes per pixel', 'data offset in bytes')")


def _read_raw(hdr: InterfileHeader, data_path: Path, fmt: _BinaryFormat, count: int, what: str, dims: str):
    """The ``count`` values of the data file, after checking its size and the plausibility of its byte order."""
    _check_data_size(hdr, data_path, fmt, count, what, dims)
    try:
        raw = np.fromfile(data_path, dtype=fmt.dtype, count=count, offset=fmt.offset)
    except OSError as exc:
        raise _fail(data_path, "name of data file",
                    f"{what} '{data_path}' (header '{hdr.path}') cannot be read: {exc}") from exc
    if raw.size != count:  # changed while being read
        raise _fail(data_path, "matrix size", f"{what} '{data_path}' (header '{hdr.path}'): read {raw.size:,} of "
                                              f"{count:,} values (was the file truncated while being read?)")
    _check_byte_order(hdr, data_path, fmt, raw, what)
    return raw


# --------------------------------------------------------------------------- plausibility of the values
#: at most this many values (evenly spaced over the file) are looked at by the plausibility checks
_SAMPLE_SIZE = 1 << 18
#: float magnitudes a PET file plausibly holds: counts, factors, Bq/ml, 1/cm are far inside this range
_PLAUSIBLE_FLOAT_RANGE = (1e-30, 1e30)
#: share of NaN/Inf/subnormal values among the nonzero ones from which the byte order is suspected
_MAX_BAD_FLOAT_SHARE = 0.05
#: decades between the 10th and 90th percentiles of |x| beyond which floats look like bytes in the wrong order
#: (real PET files: < 7 decades; float32 read in the wrong order: ~60, exponents from the mantissa's low byte)
_MAX_FLOAT_SPREAD_DECADES = 20.0


def _sample(values: np.ndarray, size: int = _SAMPLE_SIZE) -> np.ndarray:
    """At most about ``size`` values evenly spaced over ``values`` (flattened; a view, no copy)."""
    flat = values.reshape(-1)
    return flat[:: max(1, -(-flat.size // size))]


@dataclass(frozen=True)
class _FloatStats:
    nonzero: int  # nonzero values in the sample (NaN included)
    median_abs: float  # median |x| of the finite nonzero ones (NaN when there is none)
    bad_share: float  # share of the nonzero values that are NaN, Inf or subnormal
    spread: float  # decades from the 10th to the 90th percentile of |x| (finite nonzero; 0 when none)

    @property
    def plausible(self) -> bool:
        lo, hi = _PLAUSIBLE_FLOAT_RANGE
        return self.nonzero == 0 or (lo <= self.median_abs <= hi and self.bad_share <= _MAX_BAD_FLOAT_SHARE
                                     and self.spread <= _MAX_FLOAT_SPREAD_DECADES)

    def describe(self) -> str:
        return (f"median |value| ~{self.median_abs:.2g}, 80% of them within {self.spread:.2g} decades, "
                f"{100 * self.bad_share:.3g}% NaN/Inf/subnormal")


def _float_stats(sample: np.ndarray) -> _FloatStats:
    """Statistics of float values computed from their bit patterns (sign, exponent, mantissa).

    Integer arithmetic only, so that the result does not depend on the processor's
    flush-to-zero / denormals-are-zero mode (which libraries built with ``-ffast-math``, such as
    some SIRF builds, switch on for the whole process, making subnormals compare equal to 0).
    Magnitudes are ``2**e`` with ``e`` the binary exponent (to a factor of 2: enough here).
    """
    nbytes = sample.dtype.itemsize
    mant_bits, exp_bits = (23, 8) if nbytes == 4 else (52, 11)
    bias, exp_max = (1 << (exp_bits - 1)) - 1, (1 << exp_bits) - 1
    bits = sample.view(np.dtype(f"{sample.dtype.byteorder}u{nbytes}")).astype(np.uint64)
    exponent = ((bits >> np.uint64(mant_bits)) & np.uint64(exp_max)).astype(np.int64)
    mantissa = bits & np.uint64((1 << mant_bits) - 1)
    nonzero = (exponent != 0) | (mantissa != 0)
    n = int(nonzero.sum())
    if n == 0:
        return _FloatStats(0, math.nan, 0.0, 0.0)
    special = nonzero & (exponent == exp_max)  # NaN, Inf
    subnormal = (exponent == 0) & (mantissa != 0)
    bad_share = int((special | subnormal).sum()) / n
    finite = nonzero & ~special
    # binary exponent of |x| (floor of log2): normal e - bias; subnormal floor(log2 mantissa) + 1 - bias - mant_bits
    e = exponent[finite] - bias
    sub = subnormal[finite]
    if sub.any():
        e[sub] = np.floor(np.log2(mantissa[finite][sub].astype(np.float64))).astype(np.int64) + 1 - bias - mant_bits
    if e.size == 0:
        return _FloatStats(n, math.nan, bad_share, 0.0)
    p10, p50, p90 = np.percentile(e, [10, 50, 90])
    return _FloatStats(n, math.ldexp(1.0, int(round(p50))), bad_share, float((p90 - p10) * math.log10(2)))


def _int_byte_order_suspect(sample: np.ndarray) -> bool:
    """Integers written in the other byte order: (nearly) every nonzero value has a zero least
    significant byte and a nonzero most significant one (small counts c read as c x 256 or c x 2**24).

    Data in the right order look like this only if nearly all values are multiples of 256 at
    least 256 (int16) or 2**24 (int32), which counts and scaled integers are not.
    """
    nbytes = sample.dtype.itemsize
    if nbytes < 2:
        return False
    bits = sample.astype(np.int64) & ((1 << (8 * nbytes)) - 1)  # two's complement pattern, value order
    bits = bits[bits != 0]
    if bits.size < 16:
        return False
    low_zero = (bits & 0xFF) == 0
    high_set = (bits >> (8 * (nbytes - 1))) != 0
    return float(np.mean(low_zero & high_set)) >= 0.99


def _order_name(dtype: np.dtype, other: bool = False) -> str:
    """'LITTLEENDIAN' or 'BIGENDIAN' for ``dtype`` (or for the other byte order)."""
    little = dtype.byteorder == "<" or (dtype.byteorder in "=|" and sys.byteorder == "little")
    return "LITTLEENDIAN" if little != other else "BIGENDIAN"


def _check_byte_order(hdr: InterfileHeader, data_path: Path, fmt: _BinaryFormat, raw: np.ndarray, what: str) -> None:
    """Refuse data whose values show that the header's byte order is wrong (or that the data are not
    what 'number format' says), naming the file and the byte-order key.

    Floats: the finite nonzero values of a sample must have a median magnitude within
    ``_PLAUSIBLE_FLOAT_RANGE`` (1e-30 .. 1e30): float32 1.0 (and any small whole number) read
    in the wrong order is a subnormal such as 4.6e-41. Values with full mantissas read in the
    wrong order take their exponent from a mantissa byte, so their magnitudes spread over ~60
    decades (``log10 |x|`` from the 10th to the 90th percentile) where real data span a few;
    that, or many NaN/Inf/subnormal values, is blamed on the byte order when the other order
    gives plausible values with a far smaller spread and no NaN/Inf/subnormal (otherwise the
    finite-value check reports the NaNs). Integers: see :func:`_int_byte_order_suspect`.
    Only a sample of at most ``_SAMPLE_SIZE`` values is examined (vectorised: milliseconds).
    """
    if raw.dtype.itemsize == 1 or raw.size == 0:
        return
    sample = _sample(raw)
    swapped = sample.byteswap().view(sample.dtype)  # the same bytes in the other order
    declared = (f"'{_display_key(fmt.byte_order_key)}' := {_order_name(raw.dtype)}" if fmt.byte_order_given
                else f"'{_display_key(fmt.byte_order_key)}' absent (STIR's default: BIGENDIAN)")
    head = (f"{what} '{data_path}' (header '{hdr.path}'): read as {fmt.dtype.name} with {declared}, the values are "
            "implausible")
    if raw.dtype.kind == "f":
        native, other = _float_stats(sample), _float_stats(swapped)
        lo, hi = _PLAUSIBLE_FLOAT_RANGE
        out_of_range = native.nonzero > 0 and not lo <= native.median_abs <= hi  # NaN median: out of range too
        other_better = (not native.plausible and other.plausible and other.bad_share == 0
                        and other.spread <= native.spread / 4 + 1)
        if not (out_of_range or other_better):
            return
        found = f"{head} ({native.describe()})"
    else:
        if not _int_byte_order_suspect(sample) or _int_byte_order_suspect(swapped):
            return
        native_max = int(np.abs(sample.astype(np.int64)).max())
        other_max = int(np.abs(swapped.astype(np.int64)).max())
        other = None
        found = (f"{head}: nearly every nonzero value is a multiple of 256 (up to {native_max:,}), as small "
                 f"integers in the other byte order read; {_order_name(raw.dtype, other=True)} gives values up to "
                 f"{other_max:,}")
    if other is None or other.plausible:
        hint = (f"; the other byte order gives plausible values ({other.describe()})" if other is not None else "")
        advice = (f". Set '{_display_key(fmt.byte_order_key)} := {_order_name(raw.dtype, other=True)}' in the header "
                  "if that "
                  "is how the data were written")
    else:
        hint = f"; the other byte order is no better ({other.describe()})"
        advice = (". Check 'number format', 'number of bytes per pixel' and 'data offset in bytes' against how the "
                  "data were written")
    raise _fail(hdr.path, _display_key(fmt.byte_order_key), found + hint + advice)


def _count_like(values: np.ndarray) -> tuple[float, float | None]:
    """(share of sampled values that are not whole numbers, the first such value or None)."""
    sample = _sample(values)
    frac = sample != np.rint(sample)
    if not frac.any():
        return 0.0, None
    return float(np.mean(frac)), float(sample[np.argmax(frac)])


def warn_if_not_counts(values: np.ndarray, path: str | os.PathLike, what: str = "prompts") -> bool:
    """Warn (:class:`PlausibilityWarning`) when ``values`` are not whole numbers: prompts of a scan are
    counts, so values with fractions are precorrected or scaled data, for which the Poisson
    likelihood of the reconstruction does not hold. Looks at a sample of at most
    ``_SAMPLE_SIZE`` values. Returns True when it warned.
    """
    share, example = _count_like(np.asarray(values))
    if example is None:
        return False
    warnings.warn(PlausibilityWarning(
        f"{what} '{path}' are not integer counts ({100 * share:.3g}% of the values looked at have fractions, "
        f"e.g. {example:.6g}): precorrected, scaled or smoothed data? The reconstruction models raw counts "
        "(Poisson): give it the measured prompts, with the corrections as separate normalisation, attenuation "
        "and additive inputs"), stacklevel=2)
    return True


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_finite(values: np.ndarray, where: Callable, what: str, path: Path, hdr_path: Path) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        raise _fail(path, "data", f"{what} '{path.name}' (header '{hdr_path}'): {int(bad.sum()):,} values are NaN "
                                  f"or Inf; expected finite numbers (first at {where(_first(bad))})")


# --------------------------------------------------------------------------- projection data I/O
def _sino_where(geometry: SinogramGeometry) -> Callable[[tuple[int, ...]], str]:
    seg_of_row, ax_of_row = geometry.sinogram_index_table()

    def where(index: tuple[int, ...]) -> str:
        _, row, view, tang = index
        return (f"segment {int(seg_of_row[row])}, axial position {int(ax_of_row[row])}, view {view}, "
                f"tangential index {tang}; SIRF array index [0, {row}, {view}, {tang}]")

    return where


def _header_of(path: str | os.PathLike, header_suffix: str, data_suffix: str) -> Path:
    path = Path(path)
    if path.suffix.lower() == data_suffix and path.with_suffix(header_suffix).is_file():
        return path.with_suffix(header_suffix)
    return path


def read_projdata(path: str | os.PathLike, allow_negative: bool = False) -> tuple[SinogramGeometry, np.ndarray]:
    """Read STIR Interfile projection data: ``(geometry, y)``, ``y`` float32
    ``(1, sinograms, views, tangential)`` in SIRF's order (segments 0, +1, -1, ...).

    ``path`` is the ``.hs`` header (for a ``.s`` path, the ``.hs`` beside it).
    ``image scaling factor [1]`` is applied. NaN/Inf are an error; so are negative
    values unless ``allow_negative`` (for additive or multiplicative terms). The header is
    checked before the data (rings against segments, the data file's size before any array
    is made), and the values against the byte order (see the module docstring); every error
    is an :class:`InterfileError` naming the file and the key.
    """
    hdr = parse_header(_header_of(path, ".hs", ".s"))
    found: dict = {}

    def check_data(num_segments: int, count: int, dims: str) -> None:  # before the geometry makes any array
        found["fmt"] = _binary_format(hdr, num_scale_factors=num_segments, per_plane_scaling=False)
        found["data_path"] = _data_path(hdr, "sinogram")
        _check_data_size(hdr, found["data_path"], found["fmt"], count, "sinogram", dims)

    layout = _projdata_layout(hdr, check_data)
    geometry = layout.geometry
    fmt, data_path = found["fmt"], found["data_path"]
    _, S, V, N = geometry.shape
    raw = _read_raw(hdr, data_path, fmt, S * V * N, "sinogram", f"{S}x{V}x{N}")
    out = np.empty(geometry.shape, dtype=np.float32)
    pos = 0
    for seg_num in layout.file_segment_nums:
        A = geometry.segment(seg_num).num_axial_poss
        block = raw[pos : pos + A * V * N]
        pos += A * V * N
        if layout.storage_order is SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG:
            block = block.reshape(V, A, N).transpose(1, 0, 2)  # file (view, axial, tang) -> (axial, view, tang)
        else:
            block = block.reshape(A, V, N)
        if fmt.scale[0] != 1.0:
            block = block.astype(np.float64) * fmt.scale[0]
        r0 = geometry.sirf_row_offset(seg_num)
        out[0, r0 : r0 + A] = block
    where = _sino_where(geometry)
    _check_finite(out, where, "sinogram", data_path, hdr.path)
    negative = out < 0
    if not allow_negative and negative.any():
        raise _fail(data_path, "data",
                    f"sinogram '{data_path.name}' (header '{hdr.path}'): {int(negative.sum()):,} values are negative "
                    f"(minimum {float(out.min()):g}, first at {where(_first(negative))}); expected counts >= 0. "
                    f"Pass allow_negative=True for additive or multiplicative terms")
    return geometry, out


def _paired_paths(path: str | os.PathLike, header_suffix: str, data_suffix: str) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (header_suffix, data_suffix) else path
    return stem.with_name(stem.name + header_suffix), stem.with_name(stem.name + data_suffix)


def _dec_str(d: Decimal) -> str:
    """Plain text without exponent or trailing zeros (``Decimal('65.600')`` -> ``'65.6'``)."""
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _mm_to_cm(mm: float) -> str:
    with localcontext() as ctx:
        ctx.prec = 50
        return _dec_str(Decimal(repr(float(mm))) / 10)


def _float_str(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


#: comment line in every header this package writes: how output checks recognise its own files
WRITTEN_BY_COMMENT = INTERFILE_MARK


def _common_lines(data_name: str, target: Path, patient_position: str | None, pet_data_type: str,
                  originating_system: str | None = None) -> list[str]:
    """The header's opening lines, as STIR writes them."""
    lines = ["!INTERFILE  :=", WRITTEN_BY_COMMENT, "!imaging modality := PT", f"name of data file := {data_name}"]
    if originating_system is not None:
        lines.append(f"originating system := {originating_system}")
    lines += ["!version of keys := STIR4.0", "!GENERAL DATA :=", "!GENERAL IMAGE DATA :=", "!type of data := PET"]
    if patient_position is not None:
        table = {v: k for k, v in _PATIENT_POSITIONS.items()}
        if patient_position.strip().upper() not in table:
            raise _fail(target, "patient_position", f"writing '{target}': patient_position must be one of "
                                                    f"{sorted(table)} or None, got {patient_position!r}")
        orientation, rotation = table[patient_position.strip().upper()]
        lines += [f"patient orientation := {orientation.replace(' ', '_')}", f"patient rotation := {rotation}"]
    return lines + ["imagedata byte order := LITTLEENDIAN", "!PET STUDY (General) :=",
                    f"!PET data type := {pet_data_type}"]


def _frame_lines(time_frame: tuple[float, float] | None, target: Path) -> list[str]:
    lines = ["number of time frames := 1"]
    if time_frame is not None:
        start, duration = (float(v) for v in time_frame)
        if not (math.isfinite(start) and math.isfinite(duration) and duration >= 0):
            raise _fail(target, "time_frame",
                        f"writing '{target}': time_frame must be (start s, duration s >= 0), got {time_frame!r}")
        lines += [f"image relative start time (sec)[1] := {_float_str(start)}",
                  f"image duration (sec)[1] := {_float_str(duration)}"]
    return lines


def _scanner_block(scanner: Scanner) -> list[str]:
    """STIR's ``Scanner::parameter_info()`` for our scanner."""
    lines = [
        "Scanner parameters:=",
        f"Scanner type := {scanner.name}",
        f"Number of rings                          := {scanner.num_rings}",
        f"Number of detectors per ring             := {scanner.num_detectors_per_ring}",
        f"Inner ring diameter (cm)                 := {_mm_to_cm(2 * scanner.inner_ring_radius_mm)}",
        f"Average depth of interaction (cm)        := {_mm_to_cm(scanner.average_depth_of_interaction_mm)}",
        f"Distance between rings (cm)              := {_mm_to_cm(scanner.ring_spacing_mm)}",
        f"Default bin size (cm)                    := {_mm_to_cm(scanner.default_bin_size_mm)}",
        f"View offset (degrees)                    := {_float_str(scanner.view_offset_deg)}",
        f"Maximum number of non-arc-corrected bins := {scanner.max_num_non_arccorrected_bins}",
        f"Default number of arc-corrected bins     := {scanner.default_num_arccorrected_bins}",
    ]
    # Block/bucket info only when ours is a scanner STIR knows: STIR compares it with its table
    # (a mismatch makes it drop the scanner type); for other scanners STIR only warns that it is unset.
    known = _stir_scanner(scanner.name)
    if known is not None and (int(known[1]["number of rings"]), int(known[1]["number of detectors per ring"])) == (
            scanner.num_rings, scanner.num_detectors_per_ring):
        lines += [f"{k} := {v}" for k, v in known[2]]
    return lines + ["end scanner parameters:="]


def _projdata_header_text(geometry: SinogramGeometry, data_name: str, storage_order: SinogramStorageOrder,
                          patient_position: str | None, time_frame: tuple[float, float] | None, target: Path) -> str:
    segs = geometry.segments  # ascending segment numbers, as STIR writes them
    axial = f"{{ {','.join(str(s.num_axial_poss) for s in segs)}}}"
    axes = [("axial coordinate", axial), ("view", geometry.num_views)]  # [2], [3]
    if storage_order is SinogramStorageOrder.SEGMENT_AXIAL_VIEW_TANG:
        axes.reverse()
    if geometry.arc_corrected:
        eff = _mm_to_cm(geometry.tangential_bin_size_mm)
    else:  # STIR's get_sampling_in_s(Bin(0,0,0,0)) = (s(1) - s(-1)) / 2 = R sin(pi / detectors per ring)
        scanner = geometry.scanner
        eff = repr(scanner.effective_ring_radius_mm * math.sin(math.pi / scanner.num_detectors_per_ring) / 10)
    lines = _common_lines(data_name, target, patient_position, "Emission", geometry.scanner.name)
    lines += [
        f"applied corrections := {{{'arc correction' if geometry.arc_corrected else 'None'}}}",
        "!number format := float",
        "!number of bytes per pixel := 4",
        "number of dimensions := 4",
        "matrix axis label [4] := segment",
        f"!matrix size [4] := {len(segs)}",
        f"matrix axis label [3] := {axes[1][0]}",
        f"!matrix size [3] := {axes[1][1]}",
        f"matrix axis label [2] := {axes[0][0]}",
        f"!matrix size [2] := {axes[0][1]}",
        "matrix axis label [1] := tangential coordinate",
        f"!matrix size [1] := {geometry.num_tangential_poss}",
        f"minimum ring difference per segment := {{ {','.join(str(s.min_ring_diff) for s in segs)}}}",
        f"maximum ring difference per segment := {{ {','.join(str(s.max_ring_diff) for s in segs)}}}",
        *_scanner_block(geometry.scanner),
        f"effective central bin size (cm) := {eff}",
        *_frame_lines(time_frame, target),
        "!END OF INTERFILE :=",
    ]
    return "\n".join(lines) + "\n"


def _checked_array(data, shape: tuple[int, ...], target: Path, where: Callable, what: str) -> np.ndarray:
    arr = np.asarray(data)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise _fail(target, "data", f"writing '{target}': data must be a real numeric array, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise _fail(target, "data", f"writing '{target}': data has shape {arr.shape}; the geometry needs {shape} "
                                    f"{what}")
    finite = np.isfinite(arr)
    if not finite.all():
        raise _fail(target, "data", f"writing '{target}': data has {int((~finite).sum()):,} NaN/Inf values "
                                    f"(first at {where(_first(~finite))}); expected finite numbers")
    big = np.abs(arr) > np.finfo(np.float32).max
    if big.any():
        raise _fail(target, "data",
                    f"writing '{target}': data exceed the float32 range (first at {where(_first(big))})")
    return arr


def write_projdata(
    path: str | os.PathLike,
    geometry: SinogramGeometry,
    data: np.ndarray,
    *,
    storage_order: SinogramStorageOrder | str = SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG,
    patient_position: str | None = None,
    time_frame: tuple[float, float] | None = None,
    overwrite: bool = True,
) -> None:
    """Write projection data as STIR Interfile: ``<stem>.hs`` + ``<stem>.s``, float32 little endian.

    An existing header is replaced only when this package wrote it (its
    :data:`WRITTEN_BY_COMMENT` line) and ``overwrite``; other files are refused
    (:class:`~sirf_fbsem.errors.OutputPathError`): files it did not write are never replaced.

    ``path`` may end in ``.hs``, ``.s`` or neither. ``data`` is SIRF-ordered, of
    ``geometry.shape`` (or that without the leading TOF axis). Segments go in ascending
    segment number, each in ``storage_order`` (STIR's default Segment_View_AxialPos_TangPos).
    ``patient_position`` ('HFS', 'HFP', 'FFS', 'FFP') and ``time_frame`` (start s,
    duration s) are written when given. Data file first, header last, atomically.
    """
    if not isinstance(geometry, SinogramGeometry):
        raise TypeError(f"geometry must be a SinogramGeometry, got {type(geometry).__name__}")
    storage_order = SinogramStorageOrder(storage_order)
    header_path, data_path = _paired_paths(path, ".hs", ".s")
    check_replaceable(PlannedOutput(absolute(header_path), "interfile_image", ""), overwrite)
    arr = np.asarray(data)
    arr = arr[None] if arr.shape == geometry.shape[1:] else arr
    arr = _checked_array(arr, geometry.shape, header_path, _sino_where(geometry),
                         f"(tof, sinograms, views, tangential) for {geometry.describe()}")
    text = _projdata_header_text(geometry, data_path.name, storage_order, patient_position, time_frame, header_path)
    with atomic_path(header_path) as tmp_header, atomic_path(data_path) as tmp_data:
        with open(tmp_data, "wb") as f:
            for seg in geometry.segments:
                r0 = geometry.sirf_row_offset(seg.segment_num)
                block = arr[0, r0 : r0 + seg.num_axial_poss]  # (axial, view, tangential)
                if storage_order is SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG:
                    block = block.transpose(1, 0, 2)
                f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
        tmp_header.write_text(text, encoding="ascii", errors="replace")
    # leaving the with-block renamed the data file first, then the header


# --------------------------------------------------------------------------- images
def _image_layout(hdr: InterfileHeader) -> ImageGeometry:
    _check_study(hdr, "Image")
    ndim = hdr.get_int("number of dimensions")
    if ndim != 3:
        raise hdr.error("number of dimensions", "3 (x, y, z)", str(ndim))
    labels = [_axis_label(hdr, i) for i in (1, 2, 3)]
    if labels[0] and labels != ["x", "y", "z"]:
        raise hdr.error("matrix axis label[1]", "x, y, z for [1], [2], [3] (STIR's only image order)", str(labels))
    for key in ("number of time frames", "number of image data types"):
        n = hdr.get_int(key, 1)
        if n != 1:
            raise hdr.error(key, "1 (dynamic or multi-type images are not supported)", str(n))
    n_xyz = [_single_int(hdr, f"matrix size[{i}]", axis) for i, axis in ((1, "x"), (2, "y"), (3, "z"))]
    v_xyz = [hdr.get_decimal(f"scaling factor (mm/pixel)[{i}]", Decimal(1)) for i in (1, 2, 3)]  # STIR: 1 mm
    for i, v in enumerate(v_xyz, start=1):
        if not v > 0:
            raise hdr.error(f"scaling factor (mm/pixel)[{i}]", "a voxel size > 0 mm")
    min_xyz = (-(n_xyz[0] // 2), -(n_xyz[1] // 2), 0)
    origin_xyz = []
    with localcontext() as ctx:
        ctx.prec = 50
        for i, (v, m) in enumerate(zip(v_xyz, min_xyz), start=1):
            first = hdr.get_decimal(f"first pixel offset (mm)[{i}]", None)
            origin_xyz.append(0.0 if first is None else float(first - v * m) + 0.0)  # first = m * v + origin
    try:
        return ImageGeometry(shape=tuple(reversed(n_xyz)), voxel_size_mm=tuple(float(v) for v in reversed(v_xyz)),
                             origin_mm=tuple(reversed(origin_xyz)))
    except GeometryError as exc:
        raise _fail(hdr.path, "matrix size",
                    f"Interfile header '{hdr.path}': the image keys do not make a geometry: {exc}") from exc


def image_geometry_from_header(hdr: InterfileHeader | str | os.PathLike) -> ImageGeometry:
    """The :class:`ImageGeometry` of an image header (its data file need not exist)."""
    return _image_layout(_as_header(hdr))


def _voxel_where(index: tuple[int, ...]) -> str:
    return f"voxel (z, y, x) = {index}"


def read_image(path: str | os.PathLike) -> tuple[ImageGeometry, np.ndarray]:
    """Read a STIR Interfile image: ``(geometry, x)``, ``x`` float32 ``(z, y, x)``.

    ``path`` is the ``.hv`` header (for a ``.v`` path, the ``.hv`` beside it).
    ``image scaling factor [1]`` (one value or one per plane) is applied; NaN/Inf are an error,
    as are values that show the header's byte order to be wrong (:func:`_check_byte_order`).
    """
    hdr = parse_header(_header_of(path, ".hv", ".v"))
    geometry = _image_layout(hdr)
    nz, ny, nx = geometry.shape
    fmt = _binary_format(hdr, num_scale_factors=nz, per_plane_scaling=True)
    data_path = _data_path(hdr, "image")
    raw = _read_raw(hdr, data_path, fmt, nz * ny * nx, "image", f"{nx}x{ny}x{nz} (x, y, z)").reshape(nz, ny, nx)
    if all(f == 1.0 for f in fmt.scale):
        out = raw.astype(np.float32)
    else:
        factors = np.asarray(fmt.scale if len(fmt.scale) == nz else fmt.scale * nz, dtype=np.float64)
        out = (raw.astype(np.float64) * factors[:, None, None]).astype(np.float32)
    _check_finite(out, _voxel_where, "image", data_path, hdr.path)
    return geometry, out


def write_image(
    path: str | os.PathLike,
    geometry: ImageGeometry,
    data: np.ndarray,
    *,
    patient_position: str | None = None,
    time_frame: tuple[float, float] | None = None,
    overwrite: bool = True,
) -> None:
    """Write an image as STIR Interfile: ``<stem>.hv`` + ``<stem>.v``, float32 little endian, x fastest.

    ``data`` is ``(z, y, x)`` of ``geometry.shape``. ``first pixel offset (mm)`` is written
    from the origin (STIR: ``min_index * voxel_size + origin``) in exact decimal, so
    :func:`read_image` gives back the same geometry. Data file first, header last, atomically.
    An existing header is replaced only when this package wrote it and ``overwrite``; other
    files are refused (:class:`~sirf_fbsem.errors.OutputPathError`).
    """
    if not isinstance(geometry, ImageGeometry):
        raise TypeError(f"geometry must be an ImageGeometry, got {type(geometry).__name__}")
    header_path, data_path = _paired_paths(path, ".hv", ".v")
    check_replaceable(PlannedOutput(absolute(header_path), "interfile_image", ""), overwrite)
    arr = _checked_array(data, geometry.shape, header_path, _voxel_where, "(z, y, x)")
    lines = _common_lines(data_path.name, header_path, patient_position, "Image")
    lines += ["process status := Reconstructed", "!number format := float", "!number of bytes per pixel := 4",
              "number of dimensions := 3"]
    offsets = []
    with localcontext() as ctx:
        ctx.prec = 50
        for i, axis in enumerate("xyz", start=1):
            k = 3 - i  # array axis of x, y, z
            n, v, o = geometry.shape[k], geometry.voxel_size_mm[k], geometry.origin_mm[k]
            m = 0 if axis == "z" else -(n // 2)
            lines += [f"matrix axis label [{i}] := {axis}", f"!matrix size [{i}] := {n}",
                      f"scaling factor (mm/pixel) [{i}] := {float(v)!r}"]
            offsets.append(f"first pixel offset (mm) [{i}] := {_dec_str(Decimal(repr(o)) + Decimal(repr(v)) * m)}")
    lines += offsets + _frame_lines(time_frame, header_path) + ["!END OF INTERFILE :="]
    with atomic_path(header_path) as tmp_header, atomic_path(data_path) as tmp_data:
        with open(tmp_data, "wb") as f:
            f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())
        tmp_header.write_text("\n".join(lines) + "\n", encoding="ascii", errors="replace")
