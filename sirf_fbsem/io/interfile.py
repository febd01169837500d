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

Arrays are SIRF's: sinograms float32 ``(tof=1, sinograms, views, tangential)`` with
segments 0, +1, -1, +2, -2, ... and axial positions ascending in each (see
:class:`~sirf_fbsem.geometry.SinogramAxis`); images float32 ``(z, y, x)``. The writers write
float32 little endian in STIR's default layout with a STIR4-style header (with the full
scanner block) that STIR and SIRF read; the data file first and the header last, each
through a temporary file, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from enum import Enum
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..geometry import GeometryError, ImageGeometry, Scanner, Segment, SinogramGeometry
from .atomic import atomic_path

__all__ = [
    "InterfileError",
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
]

_MISSING = object()
_MAX_HEADER_BYTES = 16 * 1024 * 1024  # larger is not a header (a binary file passed by mistake)
_PATIENT_POSITIONS = {  # (patient orientation, patient rotation), standardised -> DICOM-style position
    ("head in", "supine"): "HFS",
    ("head in", "prone"): "HFP",
    ("feet in", "supine"): "FFS",
    ("feet in", "prone"): "FFP",
}


class InterfileError(ValueError):
    """An Interfile header or data file that cannot be read or written as asked.

    The message names the file, the key (or field), what was expected and what was
    found; ``path`` and ``key`` hold the file and the key for programs.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.key = key


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


def _to_decimal(token: str) -> Decimal:
    d = Decimal(token)
    if not d.is_finite():
        raise InvalidOperation(token)
    return d


def _to_int(token: str) -> int:
    d = _to_decimal(token)
    if d != d.to_integral_value():
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
        return [(self.get_float(f"image relative start time (sec)[{i}]", 0.0),
                 self.get_float(f"image duration (sec)[{i}]", 0.0)) for i in range(1, max(n, 0) + 1)]


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
    diameter = value("inner ring diameter (cm)", -1, lambda v: v < 0)
    doi = value("average depth of interaction (cm)", -1, lambda v: v < 0)
    spacing = value("distance between rings (cm)", -1, lambda v: v < 0)
    bin_size = value("default bin size (cm)", -1, lambda v: v < 0)
    max_non_arc = int(value("maximum number of non-arc-corrected bins", 0, lambda v: v <= 0))
    default_arc = int(value("default number of arc-corrected bins", 0, lambda v: v <= 0))
    unknown = f" (and STIR does not know the originating system '{system}')" if system and known is None else ""
    for key, ok, expected in (
        ("number of rings", num_rings >= 1, "an integer >= 1"),
        ("number of detectors per ring", num_dets >= 2, "an integer >= 2"),
        ("inner ring diameter (cm)", diameter > 0, "a diameter > 0 cm"),
        ("average depth of interaction (cm)", doi >= 0, "a depth >= 0 cm"),
        ("distance between rings (cm)", spacing > 0, "a ring spacing > 0 cm"),
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
    if len(values) != 1 or values[0] < 1:
        raise hdr.error(key, f"one integer >= 1 ({what})")
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


def _is_arc_corrected(hdr: InterfileHeader) -> bool:
    corrections = [standardise_keyword(c) for c in hdr.get_list("applied corrections", [])]
    if not corrections:  # STIR: keyword absent (or empty) -> arc-corrected
        return True
    return any(c in ("arc correction", "arc corrected", "radial arc-correction") for c in corrections)


def _projdata_layout(hdr: InterfileHeader) -> _ProjDataLayout:
    _check_study(hdr, "Emission")
    if "%sms-mi version number" in hdr:
        raise hdr.error("%SMS-MI version number", "absent: Siemens e7tools sinogram headers are not supported "
                        "(convert with STIR first)", "a Siemens header")
    ndim = hdr.get_int("number of dimensions")
    if ndim != 4:
        tof = "timing positions" in [_axis_label(hdr, i) for i in range(1, max(ndim, 0) + 1)]
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
    if min(num_axial) < 1:
        raise hdr.error(axial_key, "axial positions >= 1 in every segment")
    frames = hdr.get_int("number of time frames", 1)
    if frames != 1:
        raise hdr.error("number of time frames", "1 (dynamic projection data are not supported)", str(frames))
    seq = _segment_sequence(hdr, min_rd, max_rd)
    scanner = scanner_from_header(hdr)
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
    return _BinaryFormat(dtype=dtype, offset=offset, scale=factors)


def _data_path(hdr: InterfileHeader, what: str) -> Path:
    path = hdr.data_file
    if path.resolve() == hdr.path.resolve():
        raise hdr.error("name of data file", f"the {what} data file", "the header itself (a template without data)")
    if not path.is_file():
        raise hdr.error("name of data file", f"an existing {what} data file", f"'{path}', which does not exist")
    return path


def _read_raw(hdr: InterfileHeader, data_path: Path, fmt: _BinaryFormat, count: int, what: str, dims: str):
    size = data_path.stat().st_size
    expected = fmt.offset + count * fmt.dtype.itemsize
    if size != expected:
        offset = f" after an offset of {fmt.offset:,} bytes" if fmt.offset else ""
        raise _fail(data_path, "matrix size",
                    f"{what} '{data_path.name}' has {size:,} bytes; header '{hdr.path}' expects {expected:,} "
                    f"({dims} {fmt.dtype.name}{offset}; from 'matrix size', 'number format', "
                    f"'number of bytes per pixel', 'data offset in bytes')")
    return np.fromfile(data_path, dtype=fmt.dtype, count=count, offset=fmt.offset)


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
    values unless ``allow_negative`` (for additive or multiplicative terms).
    """
    hdr = parse_header(_header_of(path, ".hs", ".s"))
    layout = _projdata_layout(hdr)
    geometry = layout.geometry
    fmt = _binary_format(hdr, num_scale_factors=len(geometry.segments), per_plane_scaling=False)
    data_path = _data_path(hdr, "sinogram")
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


def _common_lines(data_name: str, target: Path, patient_position: str | None, pet_data_type: str,
                  originating_system: str | None = None) -> list[str]:
    """The header's opening lines, as STIR writes them."""
    lines = ["!INTERFILE  :=", "!imaging modality := PT", f"name of data file := {data_name}"]
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
) -> None:
    """Write projection data as STIR Interfile: ``<stem>.hs`` + ``<stem>.s``, float32 little endian.

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
    ``image scaling factor [1]`` (one value or one per plane) is applied; NaN/Inf are an error.
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
) -> None:
    """Write an image as STIR Interfile: ``<stem>.hv`` + ``<stem>.v``, float32 little endian, x fastest.

    ``data`` is ``(z, y, x)`` of ``geometry.shape``. ``first pixel offset (mm)`` is written
    from the origin (STIR: ``min_index * voxel_size + origin``) in exact decimal, so
    :func:`read_image` gives back the same geometry. Data file first, header last, atomically.
    """
    if not isinstance(geometry, ImageGeometry):
        raise TypeError(f"geometry must be an ImageGeometry, got {type(geometry).__name__}")
    header_path, data_path = _paired_paths(path, ".hv", ".v")
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
