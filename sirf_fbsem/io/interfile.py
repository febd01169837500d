"""Interfile projection data (``.hs``/``.s``) and images (``.hv``/``.v``), as STIR reads and writes them.

The conventions follow STIR's sources, and the reader reproduces them exactly:

* Header syntax (``KeyParser.cxx``, ``interfile_keyword_functions``): ``key := value``
  lines; keys are matched after *standardising* them (space, tab, ``_`` and ``!``
  are white space; leading/trailing white space trimmed, runs collapsed, lower
  case); a ``[n]`` before ``:=`` is an index (a *vectored* key); lines starting
  with ``;`` are comments; a line ending in ``\\`` continues on the next one;
  numbers are read as C++ streams read them (``126 ; 252`` is 126); lists are
  ``{a, b, c}`` and a bare value is a list of one. The first key must be
  ``!INTERFILE``; parsing stops at ``!END OF INTERFILE``. Environment variables
  (``${NAME}``), which STIR substitutes, are not.
* Projection data (``InterfileHeader.cxx``, ``InterfilePDFSHeader``):
  ``matrix axis label [1] := tangential coordinate`` and ``[4] := segment``;
  ``[2] := axial coordinate``, ``[3] := view`` is STIR's default storage order
  Segment_View_AxialPos_TangPos (view outer, axial position inner); the older
  ``[2] := view``, ``[3] := axial coordinate`` is Segment_AxialPos_View_TangPos.
  Tangential positions run fastest. Segments lie in the file in the order of the
  per-segment lists; their numbers come from sorting the segments by
  ``min + max ring difference`` with segment 0 the one whose sum is 0
  (``find_segment_sequence``), which for STIR's own files is ascending order.
  Data are arc-corrected when ``applied corrections`` contains ``arc correction``
  (or ``arc corrected``, ``radial arc-correction``), and also when the key is
  absent or empty (STIR's default). The arc-corrected bin size is
  ``effective central bin size (cm)`` when > 0, else the scanner's default bin size.
* Scanner (``InterfilePDFSHeader::post_processing``, ``Scanner.cxx``): the
  ``Scanner parameters`` block (or the same keys at top level); lengths in cm are
  converted to mm (inner radius = diameter / 2). When ``originating system`` names
  a scanner STIR knows (here: Siemens mMR, the RPT/PRT-1, GE Signa PET/MR), values
  absent from the header are filled from STIR's table; values in the header win.
* Images (``interfile.cxx``): ``matrix size [1..3]`` and
  ``scaling factor (mm/pixel) [1..3]`` are x, y, z (default voxel size 1 mm, as in
  STIR); STIR's index ranges are ``z: 0..nz-1``, ``y: -(ny/2)..``, ``x: -(nx/2)..``
  and ``first pixel offset (mm) = min_index * voxel_size + origin``, so
  ``origin = first_pixel_offset - min_index * voxel_size`` (origin 0 on axes
  without an offset). ``image scaling factor [1]`` multiplies the data (one value,
  or one per plane); ``quantification units`` (Louvain-la-Neuve) is honoured as STIR
  does.
* Binary data: ``imagedata byte order`` LITTLEENDIAN or BIGENDIAN (STIR's default
  when absent: BIGENDIAN); ``number format`` float (4 or 8 bytes), signed integer
  or unsigned integer (1, 2 or 4 bytes) (STIR's default when absent: unsigned
  integer); ``data offset in bytes [1]`` skips a prefix.

Arrays are SIRF's: sinograms ``(tof=1, sinograms, views, tangential)`` float32 with
segments 0, +1, -1, +2, -2, ... and axial positions ascending within a segment;
images ``(z, y, x)`` float32. The writers write float32 little endian in STIR's
default layout with a STIR4-style header (a full scanner block) that STIR and SIRF
read, atomically: the data file first, the header last, nothing half-written.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from enum import Enum
from pathlib import Path
from typing import Mapping, Sequence

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
#: A header larger than this is not a header (a binary file passed by mistake).
_MAX_HEADER_BYTES = 16 * 1024 * 1024
_PATIENT_POSITIONS = {
    ("head in", "supine"): "HFS",
    ("head in", "prone"): "HFP",
    ("feet in", "supine"): "FFS",
    ("feet in", "prone"): "FFP",
}


class InterfileError(ValueError):
    """An Interfile header or data file that cannot be read or written as asked.

    The message names the file, the key (or field), what was expected and what was
    found. ``path`` and ``key`` hold the file and the key for programs.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.key = key


class SinogramStorageOrder(str, Enum):
    """Order of a segment's data in a ``.s`` file (STIR's ``ProjDataFromStream::StorageOrder``).

    Tangential positions always run fastest; segments are outermost.
    """

    #: ``matrix axis label [2] := axial coordinate``, ``[3] := view``: view outer, axial inner (STIR's default).
    SEGMENT_VIEW_AXIAL_TANG = "Segment_View_AxialPos_TangPos"
    #: ``matrix axis label [2] := view``, ``[3] := axial coordinate``: axial outer, view inner (older files).
    SEGMENT_AXIAL_VIEW_TANG = "Segment_AxialPos_View_TangPos"


# --------------------------------------------------------------------------- keys and values
_WHITE = re.compile(r"[ \t_!]+")
_INDEXED = re.compile(r"^(?P<name>[^\[]*?)\s*\[\s*(?P<index>[+-]?\d+)\s*\]\s*$")


def standardise_keyword(text: str) -> str:
    """STIR's ``standardise_interfile_keyword``: ``' '``, tab, ``_``, ``!`` are white space;
    trimmed, runs collapsed to one space, lower case. Also used for list values (byte order ...)."""
    return _WHITE.sub(" ", text).strip().lower()


def normalise_key(key: str) -> str:
    """A header key in the form :class:`InterfileHeader` stores: standardised, index as ``name[n]``.

    ``'!matrix size [1]'`` -> ``'matrix size[1]'``; ``'Inner ring diameter (cm)'`` ->
    ``'inner ring diameter (cm)'``.
    """
    m = _INDEXED.match(key)
    if m:
        return f"{standardise_keyword(m.group('name'))}[{int(m.group('index'))}]"
    return standardise_keyword(key)


def _display_key(key: str) -> str:
    """``'matrix size[1]'`` -> ``'matrix size [1]'`` for messages."""
    return re.sub(r"\[(\d+)\]$", r" [\1]", key)


def parse_list(text: str) -> list[str]:
    """The items of an Interfile list value: ``'{ 27,49 , 71}'`` -> ``['27', '49', '71']``.

    A value without braces is a list of one (STIR); ``'{}'`` is empty. Text after
    the closing brace is ignored. Raises ``ValueError`` when ``}`` is missing.
    """
    t = text.strip()
    if t.startswith("{"):
        end = t.find("}")
        if end < 0:
            raise ValueError(f"list {text!r} has no closing '}}'")
        inner = t[1:end].strip()
        if not inner:
            return []
        return [item.strip() for item in inner.split(",")]
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


# --------------------------------------------------------------------------- header
@dataclass(frozen=True)
class InterfileHeader:
    """A parsed Interfile header: normalised keys (see :func:`normalise_key`) to raw value strings.

    A key that occurs twice keeps its last value (as STIR). ``path`` is the header
    file; relative ``name of data file`` values resolve against its directory.
    """

    path: Path
    entries: Mapping[str, str]

    # ---------------------------------------------------------------- raw access
    def __contains__(self, key: str) -> bool:
        return normalise_key(key) in self.entries

    def get(self, key: str, default: str | None = None) -> str | None:
        """The raw value of ``key`` (any spelling STIR would accept), or ``default``."""
        return self.entries.get(normalise_key(key), default)

    def error(self, key: str, expected: str, found: str | None = None) -> InterfileError:
        """An :class:`InterfileError` naming this header, ``key``, what was expected and what was found."""
        k = normalise_key(key)
        if found is None:
            found = f"{self.entries[k]!r}" if k in self.entries else "no such key"
        return InterfileError(
            f"Interfile header '{self.path}': '{_display_key(k)}' should be {expected}; found {found}",
            path=self.path,
            key=_display_key(k),
        )

    def require(self, key: str, expected: str = "present") -> str:
        value = self.get(key)
        if value is None or not value.strip():
            raise self.error(key, expected, None if value is None else "an empty value")
        return value

    # ---------------------------------------------------------------- typed access
    def _scalar(self, key: str, default, convert, expected: str):
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

    def get_list(self, key: str, default=_MISSING, convert=None, expected: str = "a list such as '{ 1,2,3 }'"):
        """The items of a list value (see :func:`parse_list`), each passed through ``convert`` if given."""
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
        """A value from ``choices`` (compared standardised); returns the standardised value."""
        value = self.get(key)
        if value is None or not value.strip():
            if default is None:
                raise self.error(key, "one of " + ", ".join(repr(c) for c in choices))
            return standardise_keyword(default)
        v = standardise_keyword(value)
        std = [standardise_keyword(c) for c in choices]
        if v not in std:
            raise self.error(key, "one of " + ", ".join(repr(c) for c in choices))
        return v

    # ---------------------------------------------------------------- derived
    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def data_file(self) -> Path:
        """``name of data file``, resolved against the header's directory (STIR's ``prepend_directory_name``)."""
        name = self.require("name of data file", "the name of the binary data file")
        p = Path(name.strip())
        return p if p.is_absolute() else self.directory / p

    @property
    def patient_position(self) -> str | None:
        """``'HFS'``, ``'HFP'``, ``'FFS'`` or ``'FFP'`` from ``patient orientation``/``patient rotation``
        (or Siemens' ``%patient orientation``); ``None`` when unknown or absent."""
        siemens = self.get("%patient orientation")
        if siemens and siemens.strip().upper() in ("HFS", "HFP", "FFS", "FFP"):
            return siemens.strip().upper()
        orientation = self.get("patient orientation")
        rotation = self.get("patient rotation")
        if orientation is None or rotation is None:
            return None
        return _PATIENT_POSITIONS.get((standardise_keyword(orientation), standardise_keyword(rotation)))

    @property
    def time_frames(self) -> list[tuple[float, float]]:
        """(start, duration) in s of each time frame, from ``image relative start time (sec) [i]`` and
        ``image duration (sec) [i]`` (0 where absent); one entry per ``number of time frames``."""
        n = self.get_int("number of time frames", 1)
        return [
            (self.get_float(f"image relative start time (sec)[{i}]", 0.0), self.get_float(f"image duration (sec)[{i}]", 0.0))
            for i in range(1, max(n, 0) + 1)
        ]


def _read_header_lines(path: Path) -> list[str]:
    if not path.exists():
        raise InterfileError(f"Interfile header '{path}' does not exist", path=path, key="path")
    if not path.is_file():
        raise InterfileError(f"Interfile header '{path}' is not a file", path=path, key="path")
    size = path.stat().st_size
    if size > _MAX_HEADER_BYTES:
        raise InterfileError(
            f"'{path}' has {size:,} bytes, too large for an Interfile header (is it the binary data file?)",
            path=path,
            key="path",
        )
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise InterfileError(
            f"'{path}' contains NUL bytes: a binary file, not an Interfile header (pass the .hs/.hv header)",
            path=path,
            key="path",
        )
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    text = raw.decode("latin-1")
    lines: list[str] = []
    pending = ""
    for line in text.splitlines():
        line = pending + line
        if line.endswith("\\"):  # continuation: the next line is appended (STIR's read_line)
            pending = line[:-1]
            continue
        pending = ""
        lines.append(line)
    if pending:
        lines.append(pending)
    return lines


def parse_header(path: str | os.PathLike) -> InterfileHeader:
    """Parse an Interfile header (``.hs``, ``.hv``, also Siemens ``.l.hdr``/``.n.hdr``) into an
    :class:`InterfileHeader`. Only syntax is checked here; the readers check the content."""
    path = Path(path)
    entries: dict[str, str] = {}
    started = False
    for lineno, line in enumerate(_read_header_lines(path), start=1):
        s = line.strip()
        if not s or s.startswith(";"):
            continue
        if ":=" in s:
            raw_key, value = s.split(":=", 1)
        else:
            raw_key, value = s, ""
        key = normalise_key(raw_key)
        value = value.strip(" \t")
        if not started:
            if key != "interfile":
                raise InterfileError(
                    f"Interfile header '{path}': the first keyword must be '!INTERFILE :='; "
                    f"found {s[:60]!r} on line {lineno}",
                    path=path,
                    key="!INTERFILE",
                )
            started = True
            continue
        if key == "end of interfile":
            break
        if key:
            entries[key] = value
    if not started:
        raise InterfileError(
            f"Interfile header '{path}': the first keyword must be '!INTERFILE :='; found an empty file",
            path=path,
            key="!INTERFILE",
        )
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
    (("GE Signa PET/MR", "PET/MR Signa", "Signa PET/MR"), ("45", "448", "62.36", "0.85", "0.556", "0.201565", "357", "331"),
     (4, 5, 9, 4, 1, 1, 1), ("0.105", "511")),
)


def _stir_scanner(name: str | None):
    """STIR's ``Scanner::get_scanner_from_name`` over the table above (names compared standardised):
    ``(canonical name, {key: value}, block/energy lines)`` or ``None``."""
    wanted = standardise_keyword(name or "")
    for names, values, blocks, energy in _STIR_SCANNERS:
        if wanted and any(standardise_keyword(n) == wanted for n in names):
            extra = [("Energy resolution", energy[0]), ("Reference energy (in keV)", energy[1])] if energy else []
            return names[0], dict(zip(_SCANNER_KEYS, values)), extra + list(zip(_BLOCK_KEYS, map(str, blocks)))
    return None


# --------------------------------------------------------------------------- scanner
def _decimal_mm(d_cm: Decimal, factor: Decimal = Decimal(10)) -> float:
    with localcontext() as ctx:
        ctx.prec = 50
        return float(d_cm * factor)


def scanner_from_header(hdr: InterfileHeader | str | os.PathLike) -> Scanner:
    """The :class:`Scanner` of a projection-data header (the ``Scanner parameters`` block).

    Lengths in cm become mm exactly (``inner ring diameter (cm) / 2 * 10`` is the
    inner radius). ``Default bin size (cm)`` of -1 or 0 stays <= 0 ("not given").
    Values absent from the header come from STIR's definition of the scanner named
    by ``originating system`` when STIR knows it; a scanner nobody can complete is
    an :class:`InterfileError` naming the missing key.
    """
    hdr = _as_header(hdr)
    geometry_key = next((k for k in hdr.entries if k.startswith("scanner geometry")), None)
    if geometry_key is not None and standardise_keyword(hdr.entries[geometry_key]) not in ("cylindrical", ""):
        raise hdr.error(
            geometry_key, "'Cylindrical' (block and generic scanner geometries are not supported)"
        )
    system = (hdr.get("originating system") or "").strip()
    known = _stir_scanner(system)

    def dec(key: str, missing: Decimal, fill_if) -> Decimal:
        value = hdr.get_decimal(key, missing)
        if known is not None and fill_if(value):
            value = Decimal(known[1][key])
        return value

    num_rings = int(dec("number of rings", Decimal(-1), lambda v: v < 1))
    num_dets = int(dec("number of detectors per ring", Decimal(-1), lambda v: v < 1))
    inner_diameter_cm = dec("inner ring diameter (cm)", Decimal(-1), lambda v: v < 0)
    doi_cm = dec("average depth of interaction (cm)", Decimal(-1), lambda v: v < 0)
    ring_spacing_cm = dec("distance between rings (cm)", Decimal(-1), lambda v: v < 0)
    bin_size_cm = dec("default bin size (cm)", Decimal(-1), lambda v: v < 0)
    max_non_arc = int(dec("maximum number of non-arc-corrected bins", Decimal(0), lambda v: v <= 0))
    default_arc = int(dec("default number of arc-corrected bins", Decimal(0), lambda v: v <= 0))
    view_offset_deg = hdr.get_float("view offset (degrees)", 0.0)

    where = f" (and '{system}' is not a scanner STIR knows)" if system and known is None else ""
    for key, ok, what in (
        ("number of rings", num_rings >= 1, "an integer >= 1"),
        ("number of detectors per ring", num_dets >= 2, "an integer >= 2"),
        ("inner ring diameter (cm)", inner_diameter_cm > 0, "a diameter > 0 cm"),
        ("average depth of interaction (cm)", doi_cm >= 0, "a depth >= 0 cm"),
        ("distance between rings (cm)", ring_spacing_cm > 0, "a ring spacing > 0 cm"),
    ):
        if not ok:
            raise hdr.error(key, what + where)
    if known is not None:
        name = known[0]
    else:
        name = system or (hdr.get("scanner type") or "").strip() or "unknown"
    try:
        return Scanner(
            name=name,
            num_rings=num_rings,
            num_detectors_per_ring=num_dets,
            inner_ring_radius_mm=_decimal_mm(inner_diameter_cm, Decimal(5)),
            average_depth_of_interaction_mm=_decimal_mm(doi_cm),
            ring_spacing_mm=_decimal_mm(ring_spacing_cm),
            default_bin_size_mm=_decimal_mm(bin_size_cm),
            view_offset_deg=view_offset_deg,
            max_num_non_arccorrected_bins=max_non_arc,
            default_num_arccorrected_bins=default_arc,
        )
    except GeometryError as exc:
        raise InterfileError(
            f"Interfile header '{hdr.path}': 'Scanner parameters' do not make a scanner: {exc}",
            path=hdr.path,
            key="Scanner parameters",
        ) from exc


# --------------------------------------------------------------------------- projection data structure
@dataclass(frozen=True)
class _ProjDataLayout:
    geometry: SinogramGeometry
    file_segment_nums: tuple[int, ...]  # segment numbers in the order the file stores them
    storage_order: SinogramStorageOrder


def _check_modality(hdr: InterfileHeader) -> None:
    modality = hdr.get("imaging modality")
    if modality is not None and standardise_keyword(modality) in ("nm", "nucmed", "spect"):
        raise hdr.error("imaging modality", "PET ('PT' or 'PET'; SPECT data are not supported)")


def _check_pet_data_type(hdr: InterfileHeader, wanted: str) -> None:
    value = hdr.get("pet data type")
    if value is not None and standardise_keyword(value) != standardise_keyword(wanted):
        raise hdr.error("PET data type", f"'{wanted}'")


def _axis_label(hdr: InterfileHeader, index: int) -> str:
    return standardise_keyword(hdr.get(f"matrix axis label[{index}]") or "")


def _single_int(hdr: InterfileHeader, key: str, what: str) -> int:
    values = hdr.get_int_list(key)
    if len(values) != 1 or values[0] < 1:
        raise hdr.error(key, f"one integer >= 1 ({what})")
    return values[0]


def _segment_sequence(hdr: InterfileHeader, min_rd: Sequence[int], max_rd: Sequence[int]) -> list[int]:
    """STIR's ``find_segment_sequence``: segment numbers, in file order, from sorted ring-difference sums."""
    n = len(min_rd)
    order = sorted(range(n), key=lambda i: min_rd[i] + max_rd[i])  # stable, as std::sort on pairs for distinct sums
    zero = 0
    while zero < n and min_rd[order[zero]] + max_rd[order[zero]] < 0:
        zero += 1
    if zero == n or min_rd[order[zero]] + max_rd[order[zero]] != 0:
        raise hdr.error(
            "minimum ring difference per segment",
            "per-segment lists with a segment 0 (one whose minimum + maximum ring difference is 0)",
            f"minimum {list(min_rd)}, maximum {list(max_rd)}",
        )
    seq = [0] * n
    for rank, i in enumerate(order):
        seq[i] = rank - zero
    return seq


def _is_arc_corrected(hdr: InterfileHeader) -> bool:
    corrections = hdr.get_list("applied corrections", [])
    if not corrections:  # STIR: keyword absent (or empty) -> assume arc-corrected
        return True
    return any(
        standardise_keyword(c) in ("arc correction", "arc corrected", "radial arc-correction") for c in corrections
    )


def _projdata_layout(hdr: InterfileHeader) -> _ProjDataLayout:
    _check_modality(hdr)
    if "%sms-mi version number" in hdr:
        raise hdr.error(
            "%SMS-MI version number",
            "absent: Siemens e7tools projection-data headers are not supported (convert with STIR first)",
            "a Siemens header",
        )
    _check_pet_data_type(hdr, "Emission")
    ndim = hdr.get_int("number of dimensions")
    if ndim != 4:
        labels = [_axis_label(hdr, i) for i in range(1, max(ndim, 0) + 1)]
        if "timing positions" in labels:
            raise hdr.error(
                "number of dimensions", "4 (TOF projection data, with 'timing positions', are not supported)", str(ndim)
            )
        raise hdr.error("number of dimensions", "4 (segment, view/axial, axial/view, tangential)", str(ndim))
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
        raise hdr.error(
            "matrix axis label[2]",
            "'axial coordinate' with [3] 'view' (Segment_View_AxialPos_TangPos) or 'view' with [3] "
            "'axial coordinate' (Segment_AxialPos_View_TangPos)",
            f"[2] {hdr.get('matrix axis label[2]')!r}, [3] {hdr.get('matrix axis label[3]')!r}",
        )
    num_bins = _single_int(hdr, "matrix size[1]", "tangential positions")
    num_segments = _single_int(hdr, "matrix size[4]", "segments")
    num_views = _single_int(hdr, view_key, "views")
    num_axial = hdr.get_int_list(axial_key)
    min_rd = hdr.get_int_list("minimum ring difference per segment")
    max_rd = hdr.get_int_list("maximum ring difference per segment")
    for key, values in ((axial_key, num_axial), ("minimum ring difference per segment", min_rd),
                        ("maximum ring difference per segment", max_rd)):
        if len(values) != num_segments:
            raise hdr.error(key, f"a list of {num_segments} values (one per segment, 'matrix size [4]')",
                            f"{len(values)} values {values}")
    if any(a < 1 for a in num_axial):
        raise hdr.error(axial_key, "axial positions >= 1 for every segment")
    frames = hdr.get_int("number of time frames", 1)
    if frames != 1:
        raise hdr.error("number of time frames", "1 (dynamic projection data are not supported)", str(frames))
    seq = _segment_sequence(hdr, min_rd, max_rd)
    segments = [Segment(seq[i], min_rd[i], max_rd[i], num_axial[i]) for i in range(num_segments)]
    scanner = scanner_from_header(hdr)
    arc = _is_arc_corrected(hdr)
    if arc:
        eff = hdr.get_decimal("effective central bin size (cm)", Decimal(-1))
        bin_size = _decimal_mm(eff) if eff > 0 else scanner.default_bin_size_mm
        if not bin_size > 0:
            raise hdr.error(
                "effective central bin size (cm)",
                "> 0 for arc-corrected data (or a 'Default bin size (cm)' > 0 in the scanner block)",
            )
    else:
        bin_size = scanner.default_bin_size_mm
    try:
        geometry = SinogramGeometry(
            scanner=scanner,
            segments=tuple(segments),
            num_views=num_views,
            num_tangential_poss=num_bins,
            arc_corrected=arc,
            tangential_bin_size_mm=bin_size,
        )
    except GeometryError as exc:
        raise InterfileError(
            f"Interfile header '{hdr.path}': the projection-data keys do not make a STIR geometry: {exc}",
            path=hdr.path,
            key="matrix size",
        ) from exc
    return _ProjDataLayout(geometry=geometry, file_segment_nums=tuple(seq), storage_order=order)


def sinogram_geometry_from_header(hdr: InterfileHeader | str | os.PathLike) -> SinogramGeometry:
    """The :class:`SinogramGeometry` of a projection-data header (its data file need not exist)."""
    return _projdata_layout(_as_header(hdr)).geometry


# --------------------------------------------------------------------------- binary format
_NUMBER_FORMATS = {
    ("float", 4): "f4",
    ("float", 8): "f8",
    ("signed integer", 1): "i1",
    ("signed integer", 2): "i2",
    ("signed integer", 4): "i4",
    ("unsigned integer", 1): "u1",
    ("unsigned integer", 2): "u2",
    ("unsigned integer", 4): "u4",
}
_SUPPORTED_FORMATS = "'float' (4 or 8 bytes), 'signed integer' or 'unsigned integer' (1, 2 or 4 bytes)"


@dataclass(frozen=True)
class _BinaryFormat:
    dtype: np.dtype
    offset: int
    scale: list[float]  # one value, or one per plane (images)

    @property
    def description(self) -> str:
        return f"{self.dtype.name} {'little' if self.dtype.byteorder in '<|' else 'big'} endian"


def _binary_format(hdr: InterfileHeader, num_scale_factors: int, per_plane_scaling: bool) -> _BinaryFormat:
    byte_order_key = "imagedata byte order" if "imagedata byte order" in hdr or "image data byte order" not in hdr \
        else "image data byte order"
    byte_order = hdr.get_choice(byte_order_key, ("LITTLEENDIAN", "BIGENDIAN"), default="BIGENDIAN")
    number_format = standardise_keyword(hdr.get("number format") or "unsigned integer")
    nbytes = hdr.get_int("number of bytes per pixel", -1)
    if nbytes <= 0:
        raise hdr.error("number of bytes per pixel", "an integer > 0")
    code = _NUMBER_FORMATS.get((number_format, nbytes))
    if code is None:
        if any(fmt == number_format for fmt, _ in _NUMBER_FORMATS):
            raise hdr.error("number of bytes per pixel", f"a size supported for '{number_format}': {_SUPPORTED_FORMATS}",
                            str(nbytes))
        raise hdr.error("number format", f"one of {_SUPPORTED_FORMATS}")
    dtype = np.dtype(("<" if byte_order == "littleendian" else ">") + code)
    if "data offset in bytes[1]" in hdr:
        offset = hdr.get_int("data offset in bytes[1]")
        offset_key = "data offset in bytes[1]"
    else:
        offset = hdr.get_int("data offset in bytes", 0)
        offset_key = "data offset in bytes"
    if offset < 0:
        raise hdr.error(offset_key, "an integer >= 0")
    # image scaling factor[1] (frame 1): one value, or one per plane (STIR); default 1
    factors = [float(d) for d in hdr.get_decimal_list("image scaling factor[1]", [Decimal(1)])] or [1.0]
    if len(factors) not in (1, num_scale_factors):
        raise hdr.error("image scaling factor[1]", f"one value or {num_scale_factors} values", f"{len(factors)} values")
    if len(factors) > 1 and not per_plane_scaling and any(f != factors[0] for f in factors):
        raise hdr.error("image scaling factor[1]", "equal values (one scale for all projection data)")
    units = hdr.get_float("quantification units", 1.0)
    if units != 1.0:  # Louvain-la-Neuve extension, handled as STIR's InterfileHeader::post_processing
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


def _read_raw(hdr: InterfileHeader, data_path: Path, fmt: _BinaryFormat, count: int, what: str, dims: str) -> np.ndarray:
    size = data_path.stat().st_size
    expected = fmt.offset + count * fmt.dtype.itemsize
    if size != expected:
        offset = f" after an offset of {fmt.offset:,} bytes" if fmt.offset else ""
        raise InterfileError(
            f"{what} '{data_path.name}' has {size:,} bytes; header '{hdr.path}' expects {expected:,} "
            f"({dims} {fmt.dtype.name}{offset}; keys 'matrix size', 'number format', "
            f"'number of bytes per pixel', 'data offset in bytes')",
            path=data_path,
            key="matrix size",
        )
    return np.fromfile(data_path, dtype=fmt.dtype, count=count, offset=fmt.offset)


def _check_finite(values: np.ndarray, where, what: str, path: Path, hdr_path: Path) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InterfileError(
            f"{what} '{path.name}' (header '{hdr_path}'): {int(bad.sum()):,} values are NaN or Inf; "
            f"expected finite numbers (first at {where(first)})",
            path=path,
            key="data",
        )


# --------------------------------------------------------------------------- projection data I/O
def _sino_where(geometry: SinogramGeometry):
    seg_of_row, ax_of_row = geometry.sinogram_index_table()

    def where(index: tuple[int, ...]) -> str:
        _, row, view, tang = index
        return (
            f"segment {int(seg_of_row[row])}, axial position {int(ax_of_row[row])}, view {view}, "
            f"tangential index {tang} (SIRF array index [0, {row}, {view}, {tang}])"
        )

    return where


def read_projdata(path: str | os.PathLike, allow_negative: bool = False) -> tuple[SinogramGeometry, np.ndarray]:
    """Read STIR Interfile projection data: ``(geometry, array)`` with the array float32
    ``(1, sinograms, views, tangential)`` in SIRF's order (segments 0, +1, -1, ...).

    Negative values are an error unless ``allow_negative`` (additive or multiplicative
    terms); NaN/Inf always are. ``image scaling factor [1]`` is applied. ``path`` is the
    ``.hs`` header (a ``.s`` path is taken to mean the ``.hs`` beside it).
    """
    hdr = parse_header(_header_of(path, ".hs", ".s"))
    layout = _projdata_layout(hdr)
    geometry = layout.geometry
    fmt = _binary_format(hdr, num_scale_factors=len(geometry.segments), per_plane_scaling=False)
    data_path = _data_path(hdr, "sinogram")
    _, S, V, N = geometry.shape
    raw = _read_raw(hdr, data_path, fmt, S * V * N, "sinogram", f"{S}x{V}x{N}")
    out = np.empty(geometry.shape, dtype=np.float32)
    scale = fmt.scale[0]
    pos = 0
    for seg_num in layout.file_segment_nums:
        A = geometry.segment(seg_num).num_axial_poss
        block = raw[pos : pos + A * V * N]
        pos += A * V * N
        if layout.storage_order is SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG:
            block = block.reshape(V, A, N).transpose(1, 0, 2)
        else:
            block = block.reshape(A, V, N)
        r0 = geometry.sirf_row_offset(seg_num)
        if scale != 1.0:
            block = block.astype(np.float64) * scale
        out[0, r0 : r0 + A] = block
    where = _sino_where(geometry)
    _check_finite(out, where, "sinogram", data_path, hdr.path)
    if not allow_negative:
        negative = out < 0
        if negative.any():
            first = tuple(int(i) for i in np.argwhere(negative)[0])
            raise InterfileError(
                f"sinogram '{data_path.name}' (header '{hdr.path}'): {int(negative.sum()):,} values are negative "
                f"(minimum {float(out.min()):g}, first at {where(first)}); expected counts >= 0. "
                f"Pass allow_negative=True for additive or multiplicative terms",
                path=data_path,
                key="data",
            )
    return geometry, out


def _header_of(path: str | os.PathLike, header_suffix: str, data_suffix: str) -> Path:
    path = Path(path)
    if path.suffix.lower() == data_suffix and path.with_suffix(header_suffix).is_file():
        return path.with_suffix(header_suffix)
    return path


def _paired_paths(path: str | os.PathLike, header_suffix: str, data_suffix: str) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix.lower() in (header_suffix, data_suffix):
        stem = path.with_suffix("")
    else:
        stem = path
    return stem.with_name(stem.name + header_suffix), stem.with_name(stem.name + data_suffix)


def _dec_str(d: Decimal) -> str:
    """A Decimal as plain text without exponent or trailing zeros (``Decimal('65.600')`` -> ``'65.6'``)."""
    d = d.normalize()
    text = format(d, "f")
    return "0" if text in ("-0", "0") else text


def _mm_to_cm(mm: float) -> str:
    with localcontext() as ctx:
        ctx.prec = 50
        return _dec_str(Decimal(repr(float(mm))) / 10)


def _float_str(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _patient_lines(patient_position: str | None, target: Path) -> list[str]:
    if patient_position is None:
        return []
    table = {v: k for k, v in _PATIENT_POSITIONS.items()}
    key = patient_position.strip().upper()
    if key not in table:
        raise InterfileError(
            f"writing '{target}': patient_position must be one of {sorted(table)} or None, got {patient_position!r}",
            path=target,
            key="patient_position",
        )
    orientation, rotation = table[key]
    return [f"patient orientation := {orientation.replace(' ', '_')}", f"patient rotation := {rotation}"]


def _frame_lines(time_frame: tuple[float, float] | None, target: Path) -> list[str]:
    lines = ["number of time frames := 1"]
    if time_frame is not None:
        start, duration = (float(v) for v in time_frame)
        if not (math.isfinite(start) and math.isfinite(duration) and duration >= 0):
            raise InterfileError(
                f"writing '{target}': time_frame must be (start s, duration s >= 0), got {time_frame!r}",
                path=target,
                key="time_frame",
            )
        lines += [f"image relative start time (sec)[1] := {_float_str(start)}",
                  f"image duration (sec)[1] := {_float_str(duration)}"]
    return lines


def _scanner_block(scanner: Scanner) -> list[str]:
    known = _stir_scanner(scanner.name)
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
    # Block/bucket info only for scanners STIR knows, and only when ours is that scanner: STIR
    # compares it with its own table (a mismatch makes STIR drop the scanner type).
    if known is not None and (int(known[1]["number of rings"]), int(known[1]["number of detectors per ring"])) == (
        scanner.num_rings, scanner.num_detectors_per_ring
    ):
        lines += [f"{k} := {v}" for k, v in known[2]]
    lines.append("end scanner parameters:=")
    return lines


def _effective_central_bin_size_mm(geometry: SinogramGeometry) -> float:
    """STIR's ``get_sampling_in_s(Bin(0,0,0,0))`` = (s(+1) - s(-1)) / 2: the bin size, or R sin(pi/n_det)."""
    if geometry.arc_corrected:
        return geometry.tangential_bin_size_mm
    return geometry.scanner.effective_ring_radius_mm * math.sin(math.pi / geometry.scanner.num_detectors_per_ring)


def _projdata_header_text(
    geometry: SinogramGeometry,
    data_name: str,
    storage_order: SinogramStorageOrder,
    patient_position: str | None,
    time_frame: tuple[float, float] | None,
    target: Path,
) -> str:
    segs = geometry.segments  # ascending segment number, as STIR writes them
    if storage_order is SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG:
        view_index, axial_index = 3, 2
    else:
        view_index, axial_index = 2, 3
    eff = (
        _mm_to_cm(geometry.tangential_bin_size_mm)
        if geometry.arc_corrected
        else repr(_effective_central_bin_size_mm(geometry) / 10)
    )
    axis_lines = {
        4: [f"matrix axis label [4] := segment", f"!matrix size [4] := {len(segs)}"],
        view_index: [f"matrix axis label [{view_index}] := view", f"!matrix size [{view_index}] := {geometry.num_views}"],
        axial_index: [
            f"matrix axis label [{axial_index}] := axial coordinate",
            f"!matrix size [{axial_index}] := {{ {','.join(str(s.num_axial_poss) for s in segs)}}}",
        ],
        1: ["matrix axis label [1] := tangential coordinate", f"!matrix size [1] := {geometry.num_tangential_poss}"],
    }
    lines = [
        "!INTERFILE  :=",
        "!imaging modality := PT",
        f"name of data file := {data_name}",
        f"originating system := {geometry.scanner.name}",
        "!version of keys := STIR4.0",
        "!GENERAL DATA :=",
        "!GENERAL IMAGE DATA :=",
        "!type of data := PET",
        *_patient_lines(patient_position, target),
        "imagedata byte order := LITTLEENDIAN",
        "!PET STUDY (General) :=",
        "!PET data type := Emission",
        f"applied corrections := {{{'arc correction' if geometry.arc_corrected else 'None'}}}",
        "!number format := float",
        "!number of bytes per pixel := 4",
        "number of dimensions := 4",
        *axis_lines[4],
        *axis_lines[3],
        *axis_lines[2],
        *axis_lines[1],
        f"minimum ring difference per segment := {{ {','.join(str(s.min_ring_diff) for s in segs)}}}",
        f"maximum ring difference per segment := {{ {','.join(str(s.max_ring_diff) for s in segs)}}}",
        *_scanner_block(geometry.scanner),
        f"effective central bin size (cm) := {eff}",
        *_frame_lines(time_frame, target),
        "!END OF INTERFILE :=",
    ]
    return "\n".join(lines) + "\n"


def _as_real_array(data, target: Path) -> np.ndarray:
    arr = np.asarray(data)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InterfileError(
            f"writing '{target}': data must be a real numeric array, got dtype {arr.dtype}", path=target, key="data"
        )
    return arr


def _check_writable_values(arr: np.ndarray, target: Path, where) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InterfileError(
            f"writing '{target}': data has {int((~finite).sum()):,} NaN/Inf values (first at {where(first)}); "
            f"expected finite numbers",
            path=target,
            key="data",
        )
    big = np.abs(arr) > np.finfo(np.float32).max
    if big.any():
        first = tuple(int(i) for i in np.argwhere(big)[0])
        raise InterfileError(
            f"writing '{target}': data has values beyond float32 range (first at {where(first)})",
            path=target,
            key="data",
        )


def write_projdata(
    path: str | os.PathLike,
    geometry: SinogramGeometry,
    data: np.ndarray,
    *,
    storage_order: SinogramStorageOrder | str = SinogramStorageOrder.SEGMENT_VIEW_AXIAL_TANG,
    patient_position: str | None = None,
    time_frame: tuple[float, float] | None = None,
) -> None:
    """Write projection data as STIR Interfile: ``<stem>.hs`` + ``<stem>.s`` (float32 little endian).

    ``path`` may end in ``.hs``, ``.s`` or neither. ``data`` is SIRF-ordered,
    ``geometry.shape`` (or without the leading TOF axis of 1). Segments are written
    in ascending segment number; ``storage_order`` defaults to STIR's
    Segment_View_AxialPos_TangPos. ``patient_position`` ('HFS', 'HFP', 'FFS', 'FFP')
    and ``time_frame`` (start s, duration s) are written when given. The data file is
    written first and the header last, each through a temporary file.
    """
    if not isinstance(geometry, SinogramGeometry):
        raise TypeError(f"geometry must be a SinogramGeometry, got {type(geometry).__name__}")
    storage_order = SinogramStorageOrder(storage_order)
    header_path, data_path = _paired_paths(path, ".hs", ".s")
    arr = _as_real_array(data, header_path)
    if arr.shape == geometry.shape[1:]:
        arr = arr[None]
    if arr.shape != geometry.shape:
        raise InterfileError(
            f"writing '{header_path}': data has shape {arr.shape}; the geometry needs {geometry.shape} "
            f"(tof, sinograms, views, tangential) for {geometry.describe()}",
            path=header_path,
            key="data",
        )
    _check_writable_values(arr, header_path, _sino_where(geometry))
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
        # leaving the block renames the data file first, then the header


# --------------------------------------------------------------------------- images
def _image_layout(hdr: InterfileHeader) -> ImageGeometry:
    _check_modality(hdr)
    _check_pet_data_type(hdr, "Image")
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
    nx, ny, nz = (_single_int(hdr, f"matrix size[{i}]", axis) for i, axis in ((1, "x"), (2, "y"), (3, "z")))
    sizes = [hdr.get_decimal(f"scaling factor (mm/pixel)[{i}]", Decimal(1)) for i in (1, 2, 3)]  # STIR default 1 mm
    for i, v in zip((1, 2, 3), sizes):
        if not v > 0:
            raise hdr.error(f"scaling factor (mm/pixel)[{i}]", "a voxel size > 0 mm")
    min_indices = (-(nx // 2), -(ny // 2), 0)  # x, y, z
    origin = []
    with localcontext() as ctx:
        ctx.prec = 50
        for i, v, m in zip((1, 2, 3), sizes, min_indices):
            offset = hdr.get_decimal(f"first pixel offset (mm)[{i}]", None)
            # first_pixel_offset = min_index * voxel_size + origin
            origin.append(0.0 if offset is None else float(offset - v * m))
    try:
        return ImageGeometry(
            shape=(nz, ny, nx),
            voxel_size_mm=(float(sizes[2]), float(sizes[1]), float(sizes[0])),
            origin_mm=(origin[2] + 0.0, origin[1] + 0.0, origin[0] + 0.0),
        )
    except GeometryError as exc:
        raise InterfileError(
            f"Interfile header '{hdr.path}': the image keys do not make a geometry: {exc}", path=hdr.path, key="matrix size"
        ) from exc


def image_geometry_from_header(hdr: InterfileHeader | str | os.PathLike) -> ImageGeometry:
    """The :class:`ImageGeometry` of an image header (its data file need not exist)."""
    return _image_layout(_as_header(hdr))


def read_image(path: str | os.PathLike) -> tuple[ImageGeometry, np.ndarray]:
    """Read a STIR Interfile image: ``(geometry, array)``, the array float32 ``(z, y, x)``.

    ``image scaling factor [1]`` (one value or one per plane) is applied; NaN/Inf are an error.
    ``path`` is the ``.hv`` header (a ``.v`` path is taken to mean the ``.hv`` beside it).
    """
    hdr = parse_header(_header_of(path, ".hv", ".v"))
    geometry = _image_layout(hdr)
    nz, ny, nx = geometry.shape
    fmt = _binary_format(hdr, num_scale_factors=nz, per_plane_scaling=True)
    data_path = _data_path(hdr, "image")
    raw = _read_raw(hdr, data_path, fmt, nz * ny * nx, "image", f"{nx}x{ny}x{nz} (x, y, z)")
    raw = raw.reshape(nz, ny, nx)
    if all(f == 1.0 for f in fmt.scale):
        out = raw.astype(np.float32)
    else:
        factors = np.asarray(fmt.scale if len(fmt.scale) == nz else fmt.scale * nz, dtype=np.float64)
        out = (raw.astype(np.float64) * factors[:, None, None]).astype(np.float32)

    def where(index: tuple[int, ...]) -> str:
        return f"voxel (z, y, x) = {index}"

    _check_finite(out, where, "image", data_path, hdr.path)
    return geometry, out


def write_image(
    path: str | os.PathLike,
    geometry: ImageGeometry,
    data: np.ndarray,
    *,
    patient_position: str | None = None,
    time_frame: tuple[float, float] | None = None,
) -> None:
    """Write an image as STIR Interfile: ``<stem>.hv`` + ``<stem>.v`` (float32 little endian, x fastest).

    ``data`` is ``(z, y, x)`` of ``geometry.shape``. ``first pixel offset (mm)`` is
    written from the origin (STIR: ``min_index * voxel_size + origin``), exactly, so
    that :func:`read_image` gives back the same geometry. Data first, header last.
    """
    if not isinstance(geometry, ImageGeometry):
        raise TypeError(f"geometry must be an ImageGeometry, got {type(geometry).__name__}")
    header_path, data_path = _paired_paths(path, ".hv", ".v")
    arr = _as_real_array(data, header_path)
    if arr.shape != geometry.shape:
        raise InterfileError(
            f"writing '{header_path}': data has shape {arr.shape}; the geometry needs {geometry.shape} (z, y, x)",
            path=header_path,
            key="data",
        )
    _check_writable_values(arr, header_path, lambda index: f"voxel (z, y, x) = {index}")
    nz, ny, nx = geometry.shape
    vz, vy, vx = geometry.voxel_size_mm
    oz, oy, ox = geometry.origin_mm
    offsets = []
    with localcontext() as ctx:
        ctx.prec = 50
        for o, v, m in ((ox, vx, -(nx // 2)), (oy, vy, -(ny // 2)), (oz, vz, 0)):
            offsets.append(_dec_str(Decimal(repr(float(o))) + Decimal(repr(float(v))) * m))
    lines = [
        "!INTERFILE  :=",
        "!imaging modality := PT",
        f"name of data file := {data_path.name}",
        "!version of keys := STIR4.0",
        "!GENERAL DATA :=",
        "!GENERAL IMAGE DATA :=",
        "!type of data := PET",
        *_patient_lines(patient_position, header_path),
        "imagedata byte order := LITTLEENDIAN",
        "!PET STUDY (General) :=",
        "!PET data type := Image",
        "process status := Reconstructed",
        "!number format := float",
        "!number of bytes per pixel := 4",
        "number of dimensions := 3",
        "matrix axis label [1] := x",
        f"!matrix size [1] := {nx}",
        f"scaling factor (mm/pixel) [1] := {repr(float(vx))}",
        "matrix axis label [2] := y",
        f"!matrix size [2] := {ny}",
        f"scaling factor (mm/pixel) [2] := {repr(float(vy))}",
        "matrix axis label [3] := z",
        f"!matrix size [3] := {nz}",
        f"scaling factor (mm/pixel) [3] := {repr(float(vz))}",
        f"first pixel offset (mm) [1] := {offsets[0]}",
        f"first pixel offset (mm) [2] := {offsets[1]}",
        f"first pixel offset (mm) [3] := {offsets[2]}",
        *_frame_lines(time_frame, header_path),
        "!END OF INTERFILE :=",
    ]
    with atomic_path(header_path) as tmp_header, atomic_path(data_path) as tmp_data:
        with open(tmp_data, "wb") as f:
            f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())
        tmp_header.write_text("\n".join(lines) + "\n", encoding="ascii", errors="replace")
