"""Siemens mMR PETLINK 32-bit listmode: header, scan, and histogramming into SIRF-ordered sinograms.

This reads the ECAT8 32-bit listmode format natively (no SIRF or STIR needed) and
bins it exactly as STIR's ``lm_to_projdata`` (and SIRF's ``ListmodeToSinograms``)
do. The conventions below were taken from STIR's sources and are cited by file.

Word layout (``src/include/stir/listmode/CListRecordECAT8_32bit.h``)
---------------------------------------------------------------------
The data file is a stream of little-endian unsigned 32-bit words (PETLINK
guideline); bit 31 is the most significant bit.

====================  ==========================================================
bits                  meaning
====================  ==========================================================
31 = 0                coincidence event (``CListEventDataECAT8_32bit::type``)
  30                  ``delayed`` field: **1 = prompt**, 0 = delayed coincidence
                      (``CListEventECAT8_32bit::is_prompt()`` returns
                      ``data.delayed == 1``)
  29..0               bin address ("offset") into the scanner's span-1 sinogram
31 = 1                tag word (``CListTimeDataECAT8_32bit``)
  30..29 = 00         time tag: bits 28..0 are milliseconds since the scan start
                      (``CListDataAnyECAT8_32bit::is_time()``)
  30..29 != 00        any other tag (singles/dead-time, gantry, control); ignored
                      when histogramming (``is_other()``)
====================  ==========================================================

Bin address (``src/listmode_buildblock/CListRecordECAT8_32bit.cxx``,
``CListEventECAT8_32bit::get_detection_position``)
--------------------------------------------------------------------------------
The address indexes a sinogram "organised by segment, axial coordinate, view,
tangential" with the listmode header's ``%number of projections`` (344) tangential
positions running fastest, then ``%number of views`` (252), then the sinograms::

    tang_pos_num = address % 344;  rest = address // 344
    view_num     = rest % 252;     z    = rest // 252

The sinogram number ``z`` runs over the span-1 segments (segment number = ring
difference ``ring2 - ring1``) in STIR's "segment sequence" for ECAT data,
``ecat::find_segment_sequence`` (``src/IO/stir_ecat_common.cxx``): **0, -1, +1,
-2, +2, ..., -max, +max** (negative before positive, the opposite of SIRF's
order), each segment holding ``num_rings - |d|`` axial positions, ascending.
``max`` is the header's ``%maximum ring difference`` (60 for the mMR);
``%axial compression`` must be 1 (STIR: "CListEventECAT8_32bit can only handle
axial compression==1"). The STIR bin is then ``Bin(segment, view, axial,
tang_pos_num - 344/2)``: the only adjustment is the tangential offset of
``num_tangential_poss/2``; there are **no view or tangential flips**, so in a
SIRF array the tangential index is ``tang_pos_num`` itself and the view index is
``view_num``.

From bin to output sinogram (``ProjDataInfoCylindricalNoArcCorr.{cxx,inl}``,
``ProjDataInfoCylindrical.{cxx,inl}``, ``CListEventCylindricalScannerWithDiscreteDetectors.inl``)
------------------------------------------------------------------------------------------------
STIR converts the span-1 bin to a detector pair and then to a bin of the output
template (``get_bin_for_det_pos_pair``):

* rings (``get_ring_pair_for_segment_axial_pos_num``): ``ring1 + ring2 = 2 a + |d|``,
  ``ring1 = (ring1+ring2 - d)/2``, ``ring2 = (ring1+ring2 + d)/2``; i.e. ``d >= 0``:
  ``(a, a+d)``; ``d < 0``: ``(a-d, a)``.
* detectors (``initialise_uncompressed_view_tangpos_to_det1det2``):
  ``det1 = (v + (t >> 1)) mod n``, ``det2 = (v - ((t+1) >> 1) + n/2) mod n`` with
  ``n`` = detectors per ring and ``>>`` an arithmetic shift. The inverse
  (``initialise_det1det2_to_uncompressed_view_tangpos``) returns the same (v, t)
  and "no swap" for every |t| < n/2 (344/2 < 252), so the ring order is kept.
* output bin (``get_segment_axial_pos_num_for_ring_pair``): the segment whose
  ring-difference range holds ``ring2 - ring1`` (else the event is dropped), and
  ``axial = (ring1 + ring2 - ax_pos_num_offset) * inc / 2`` with
  ``ax_pos_num_offset = (num_rings - 1) - 2 m_offset / ring_spacing`` and ``inc`` = 2
  for segments combining several ring differences (span > 1), else 1. View mashing
  divides the view by the mash factor. ``LmToProjData::process_data`` drops bins
  outside the template's tangential or axial range.

Time (``LmToProjData::process_data``)
--------------------------------------
The current time starts at 0 and is set by each time tag (``get_time_in_secs() =
ms / 1000``). An event belongs to the interval ``[t0, t1)`` if the current time
``t`` satisfies ``t0 <= t < t1``: events before ``t0`` are skipped and reading stops
at the first time tag with ``t >= t1``. Time tags are expected to increase. An interval
that holds no data (past the last time tag, or before 0) is a :class:`ListmodeError`
naming the file and where its data end; one that extends past the last tag warns
(:class:`~sirf_fbsem.io.interfile.PlausibilityWarning`) with the interval actually covered.
The last tag is found by reading the file's two ends only (``_time_tag_range``).

Differences from STIR's ``lm_to_projdata``
------------------------------------------
* Prompts and delayeds go into two separate sinograms. (STIR stores
  prompts - delayeds when both "Store prompts" and "Store delayeds" are set.)
* Addresses beyond the span-1 sinogram are counted as ``invalid_addresses`` and
  skipped (STIR's behaviour there is undefined).
* Counts are accumulated in float32, which is exact up to 2**24 counts per bin; a
  bin reaching that raises an error rather than losing counts silently.

Performance: three numba passes per chunk of words, while a background thread reads
the next chunk: (1) parallel decode of word ranges into flat output bins (a
precomputed table maps each listmode sinogram ``z`` to its output row), with a
histogram of bin blocks of 2**18 bins; (2) a parallel counting sort of the bins by
block; (3) a parallel scatter, one block at a time per thread, so the increments
stay in cache and threads never write the same bin. Memory: the output sinograms
plus four chunk-sized buffers (2 x read, codes, sorted), independent of the file size.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from numba import get_num_threads, njit, prange

from ..errors import InputFileNotFoundError
from ..geometry import GeometryError, Scanner, SinogramGeometry, scanner_preset
from ..progress import byte_progress
# the detector-pair <-> bin maps and the header-key helpers live in the geometry layer and in
# header_keys; they stay importable from here (ListmodeError, parse_interfile_keys, the maps)
from ..scanner_bins import (
    bin_for_detector_pair,
    det_pair_for_view_tangential,
    sinogram_row_for_ring_pair,
    span1_ring_pair,
    view_tangential_for_det_pair,
)
from .header_keys import (
    DATA_FILE_KEY,
    ListmodeError,
    get_int,
    parse_int_list,
    parse_interfile_keys,
    resolve_data_file,
    scanner_from_keys,
)
from .interfile import PlausibilityWarning, write_projdata

__all__ = [
    "ListmodeError",
    "ListmodeHeader",
    "ListmodeSummary",
    "ListmodeLayout",
    "parse_interfile_keys",
    "read_listmode_header",
    "scan_listmode",
    "histogram_listmode",
    "ListmodeHistogramInfo",
    "histogram_with_sirf",
    "decode_words",
    "decode_bin_address",
    "encode_event",
    "encode_time_tag",
    "span1_ring_pair",
    "det_pair_for_view_tangential",
    "target_row_table",
    "sinogram_row_for_ring_pair",
    "view_tangential_for_det_pair",
    "bin_for_detector_pair",
    "EVENT_TYPE_BIT",
    "PROMPT_BIT",
    "ADDRESS_MASK",
    "TIME_MASK",
]

#: bit 31: 0 = coincidence event, 1 = tag word
EVENT_TYPE_BIT = 1 << 31
#: bit 30 of an event: 1 = prompt, 0 = delayed ("delayed" bit field of STIR)
PROMPT_BIT = 1 << 30
#: bits 29..0 of an event: the bin address
ADDRESS_MASK = (1 << 30) - 1
#: bits 28..0 of a time tag: milliseconds since the scan start
TIME_MASK = (1 << 29) - 1
_TAG_SUBTYPE_SHIFT = 29

# header keys (normalised: lower case, no leading '!' or '%', single spaces)
_KEY_DATA_OFFSET = "data offset in bytes"


# ----------------------------------------------------------------------------- headers
def _get_float(keys: Mapping[str, str], key: str) -> float | None:
    """A finite number, or None when the key is absent or not a finite number (informational keys)."""
    v = keys.get(key, "").strip()
    try:
        x = float(v.split(None, 1)[0].split(";", 1)[0]) if v else None
    except (ValueError, IndexError):
        return None
    return x if x is not None and math.isfinite(x) else None


def _optional_int_list(value: str | None) -> tuple[int, ...] | None:
    """An informational list (``%segment table``): None when absent or unreadable (STIR does not use it)."""
    if not value:
        return None
    try:
        return tuple(parse_int_list(value))
    except ValueError:
        return None


def _parse_datetime(date: str | None, tm: str | None) -> datetime | None:
    if not date:
        return None
    try:
        y, mo, d = (int(x) for x in date.replace("-", ":").split(":")[:3])
        hh = mm = ss = 0
        if tm:
            parts = [int(float(x)) for x in tm.split(":")[:3]]
            hh, mm, ss = (parts + [0, 0, 0])[:3]
        return datetime(y, mo, d, hh, mm, ss, tzinfo=timezone.utc)
    except (ValueError, OverflowError):
        return None


@dataclass(frozen=True)
class ListmodeLayout:
    """The span-1 sinogram the bin addresses index (from the listmode header).

    ``segment_sequence`` is STIR's ECAT order 0, -1, +1, ...; ``segment_sizes`` the
    axial positions of each (``num_rings - |d|``).
    """

    num_rings: int
    num_detectors_per_ring: int
    max_ring_difference: int
    num_views: int
    num_tangential_poss: int

    def __post_init__(self) -> None:
        if not 0 <= self.max_ring_difference <= self.num_rings - 1:
            raise ListmodeError(
                f"maximum ring difference {self.max_ring_difference} outside [0, {self.num_rings - 1}]"
            )
        if self.num_views < 1 or self.num_tangential_poss < 1:
            raise ListmodeError(
                f"number of views / projections must be >= 1, got {self.num_views} / {self.num_tangential_poss}"
            )

    @property
    def segment_sequence(self) -> np.ndarray:
        seq = [0]
        for d in range(1, self.max_ring_difference + 1):
            seq += [-d, d]
        return np.asarray(seq, dtype=np.int64)

    @property
    def segment_sizes(self) -> np.ndarray:
        return self.num_rings - np.abs(self.segment_sequence)

    @property
    def num_sinograms(self) -> int:
        return int(self.segment_sizes.sum())

    @property
    def num_addresses(self) -> int:
        """Number of valid bin addresses (sinograms x views x tangential positions)."""
        return self.num_sinograms * self.num_views * self.num_tangential_poss

    def sinogram_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(segment = ring difference, axial position) of each listmode sinogram ``z``, shape (num_sinograms,)."""
        segs, ax = [], []
        for d, n in zip(self.segment_sequence, self.segment_sizes):
            segs.append(np.full(n, d, dtype=np.int64))
            ax.append(np.arange(n, dtype=np.int64))
        return np.concatenate(segs), np.concatenate(ax)


@dataclass(frozen=True)
class ListmodeHeader:
    """A Siemens PETLINK 32-bit listmode header (``.l.hdr``).

    ``data_path`` is resolved relative to the header's folder and exists.
    Times: ``start_time`` (UTC, from study date/time), ``duration_s`` ("image duration").
    """

    header_path: Path
    data_path: Path
    data_offset_bytes: int
    originating_system: str
    scanner: Scanner
    layout: ListmodeLayout
    axial_compression: int
    word_bits: int
    timing_tag_interval_ms: float | None
    isotope: str | None
    isotope_halflife_s: float | None
    radiopharmaceutical: str | None
    patient_orientation: str | None
    start_time: datetime | None
    tracer_injection_time: datetime | None
    tracer_activity_bq: float | None
    duration_s: float | None
    total_listmode_words: int | None
    segment_table: tuple[int, ...] | None
    keys: Mapping[str, str] = field(repr=False, default_factory=dict)

    @property
    def data_size_bytes(self) -> int:
        return self.data_path.stat().st_size - self.data_offset_bytes

    def describe(self) -> str:
        return (
            f"{self.scanner.name} listmode '{self.data_path.name}' ({self.data_size_bytes:,} bytes), "
            f"{self.isotope or '?'} / {self.radiopharmaceutical or '?'}, start {self.start_time}, "
            f"duration {self.duration_s} s, span-1 addresses with max ring difference "
            f"{self.layout.max_ring_difference}"
        )


def _is_text_header(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return b"\x00" not in head and b":=" in head


def read_listmode_header(path: str | os.PathLike) -> ListmodeHeader:
    """Read a Siemens mMR PETLINK listmode header (``.l.hdr``, also STIR's ``.l.hdr.STIR``).

    Raises :class:`ListmodeError` for a header that is not PETLINK 32-bit data of a
    supported scanner (naming the header and the key), and
    :class:`~sirf_fbsem.errors.InputFileNotFoundError` (a ``FileNotFoundError``) naming the
    header, the key and the path when the data file is missing. ``%number of views`` and
    ``%number of projections`` must be the scanner's (STIR decodes the bin addresses with
    those); ``%segment table`` and ``%total listmode word counts`` are informational (None
    when unreadable).
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileNotFoundError(f"listmode header '{p}' does not exist", p)
    keys = parse_interfile_keys(p)
    scanner = scanner_from_keys(keys, p)
    bits = get_int(keys, "lm event and tag words format (bits)", p, default=32)
    if bits != 32:
        raise ListmodeError(f"header '{p}': 'LM event and tag words format (bits)' is {bits}; only 32 is supported")
    ax_comp = get_int(keys, "axial compression", p, default=1)
    if ax_comp != 1:
        raise ListmodeError(
            f"header '{p}': 'axial compression' is {ax_comp}; PETLINK bin addresses are read for axial "
            "compression 1 only (as STIR's CListEventECAT8_32bit)"
        )
    num_rings = get_int(keys, "number of rings", p, default=scanner.num_rings)
    if num_rings != scanner.num_rings:
        raise ListmodeError(
            f"header '{p}': 'number of rings' is {num_rings}; the {scanner.name} has {scanner.num_rings}"
        )
    for key, value in (("number of views", scanner.num_detectors_per_ring // 2),
                       ("number of projections", scanner.max_num_non_arccorrected_bins)):
        given = get_int(keys, key, p, default=value)
        if given != value:
            raise ListmodeError(f"header '{p}': '%{key}' is {given}; the {scanner.name}'s PETLINK bin addresses have "
                                f"{value} (as STIR decodes them)")
    mrd = get_int(keys, "maximum ring difference", p, default=scanner.num_rings - 1)
    if not 0 <= mrd <= scanner.num_rings - 1:
        raise ListmodeError(f"header '{p}': '%maximum ring difference' is {mrd}; expected 0 to {scanner.num_rings - 1} "
                            f"for the {scanner.num_rings} rings of the {scanner.name}")
    layout = ListmodeLayout(
        num_rings=num_rings,
        num_detectors_per_ring=scanner.num_detectors_per_ring,
        max_ring_difference=mrd,
        num_views=scanner.num_detectors_per_ring // 2,
        num_tangential_poss=scanner.max_num_non_arccorrected_bins,
    )
    data = resolve_data_file(p, keys)
    offset = get_int(keys, _KEY_DATA_OFFSET, p, default=0)
    if offset < 0:
        raise ListmodeError(f"header '{p}': '!data offset in bytes' is {offset}; expected an integer >= 0")
    seg_table = _optional_int_list(keys.get("segment table"))
    total_words = _get_float(keys, "total listmode word counts")
    return ListmodeHeader(
        header_path=p,
        data_path=data,
        data_offset_bytes=offset,
        originating_system=keys.get("originating system", ""),
        scanner=scanner,
        layout=layout,
        axial_compression=ax_comp,
        word_bits=bits,
        timing_tag_interval_ms=_get_float(keys, "timing tagwords interval (msec)"),
        isotope=keys.get("isotope name") or None,
        isotope_halflife_s=_get_float(keys, "isotope gamma halflife (sec)"),
        radiopharmaceutical=keys.get("radiopharmaceutical") or None,
        patient_orientation=keys.get("patient orientation") or None,
        start_time=_parse_datetime(
            keys.get("study date (yyyy:mm:dd)"), keys.get("study time (hh:mm:ss gmt+00:00)")
        ),
        tracer_injection_time=_parse_datetime(
            keys.get("tracer injection date (yyyy:mm:dd)"), keys.get("tracer injection time (hh:mm:ss gmt+00:00)")
        ),
        tracer_activity_bq=_get_float(keys, "tracer activity at time of injection (bq)"),
        duration_s=_get_float(keys, "image duration (sec)"),
        total_listmode_words=int(total_words) if total_words is not None and total_words >= 0 else None,
        segment_table=seg_table,
        keys=dict(keys),
    )


def _as_header(path_or_header: str | os.PathLike | ListmodeHeader) -> ListmodeHeader:
    if isinstance(path_or_header, ListmodeHeader):
        if not path_or_header.data_path.is_file():
            raise InputFileNotFoundError(
                f"header '{path_or_header.header_path}': key '{DATA_FILE_KEY}' names data file "
                f"'{path_or_header.data_path}', which does not exist", path_or_header.data_path
            )
        return path_or_header
    p = Path(path_or_header)
    if not p.is_file():
        raise InputFileNotFoundError(f"listmode header '{p}' does not exist", p)
    if not _is_text_header(p):
        raise ListmodeError(
            f"'{p}' is not a listmode header (it looks like binary data); pass the '.l.hdr' header, "
            "which says how the bin addresses are laid out"
        )
    return read_listmode_header(p)


def _data_word_count(path: Path, offset: int) -> int:
    size = path.stat().st_size
    if size < offset:
        raise ListmodeError(f"listmode data '{path}' has {size:,} bytes, less than the data offset {offset:,}")
    if (size - offset) % 4 != 0:
        raise ListmodeError(
            f"listmode data '{path}' has {size:,} bytes ({size - offset:,} after the offset of {offset:,}), "
            "not a multiple of 4: the file is truncated mid-word"
        )
    return (size - offset) // 4


# ----------------------------------------------------------------------------- pure decoders
def decode_words(words: np.ndarray) -> dict[str, np.ndarray]:
    """Classify words (vectorised): boolean masks ``prompt``, ``delayed``, ``time``, ``other``;
    ``address`` (events) and ``time_ms`` (time tags), both uint32 (meaningless elsewhere)."""
    w = np.asarray(words, dtype=np.uint32)
    is_event = (w & np.uint32(EVENT_TYPE_BIT)) == 0
    prompt = is_event & ((w & np.uint32(PROMPT_BIT)) != 0)
    subtype = (w >> np.uint32(_TAG_SUBTYPE_SHIFT)) & np.uint32(3)
    is_time = ~is_event & (subtype == 0)
    return {
        "prompt": prompt,
        "delayed": is_event & ~prompt,
        "time": is_time,
        "other": ~is_event & ~is_time,
        "address": w & np.uint32(ADDRESS_MASK),
        "time_ms": w & np.uint32(TIME_MASK),
    }


def decode_bin_address(address, layout: ListmodeLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """STIR's span-1 bin of bin addresses: (segment = ring2-ring1, axial pos, view, tangential_pos_num).

    ``tangential_pos_num`` is centred (``tang - num_tangential_poss//2``), as STIR's
    ``Bin``. Addresses beyond the sinogram raise :class:`ListmodeError`.
    """
    a = np.asarray(address, dtype=np.int64)
    if np.any(a < 0) or np.any(a >= layout.num_addresses):
        raise ListmodeError(f"bin address outside [0, {layout.num_addresses}) for this listmode layout")
    N, V = layout.num_tangential_poss, layout.num_views
    tang = a % N
    rest = a // N
    view = rest % V
    z = rest // V
    seg_of_z, ax_of_z = layout.sinogram_table()
    return seg_of_z[z], ax_of_z[z], view, tang - N // 2


def encode_event(segment: int, axial: int, view: int, tangential_pos_num: int, layout: ListmodeLayout,
                 prompt: bool = True) -> int:
    """The 32-bit word of one coincidence event (the inverse of :func:`decode_bin_address`)."""
    seq = list(layout.segment_sequence)
    if segment not in seq:
        raise ListmodeError(f"segment {segment} beyond the maximum ring difference {layout.max_ring_difference}")
    i = seq.index(segment)
    size = int(layout.segment_sizes[i])
    if not 0 <= axial < size:
        raise ListmodeError(f"axial position {axial} outside [0, {size}) for segment {segment}")
    N, V = layout.num_tangential_poss, layout.num_views
    if not 0 <= view < V:
        raise ListmodeError(f"view {view} outside [0, {V})")
    tp = tangential_pos_num + N // 2
    if not 0 <= tp < N:
        raise ListmodeError(f"tangential position {tangential_pos_num} outside [{-(N // 2)}, {N - N // 2})")
    z = int(layout.segment_sizes[:i].sum()) + axial
    address = (z * V + view) * N + tp
    return int(address | (PROMPT_BIT if prompt else 0))


def encode_time_tag(time_ms: int) -> int:
    """The 32-bit time tag word for ``time_ms`` milliseconds."""
    if not 0 <= time_ms <= TIME_MASK:
        raise ListmodeError(f"time tag {time_ms} ms outside [0, {TIME_MASK}]")
    return int(EVENT_TYPE_BIT | time_ms)


def _check_target(geometry: SinogramGeometry, layout: ListmodeLayout, scanner: Scanner, what: str) -> int:
    """Validate an output geometry for data of ``scanner``; return the view mash factor."""
    sc = geometry.scanner
    if sc.num_rings != scanner.num_rings or sc.num_detectors_per_ring != scanner.num_detectors_per_ring:
        raise GeometryError(
            f"{what}: output geometry is for {sc.name} ({sc.num_rings} rings, {sc.num_detectors_per_ring} "
            f"detectors); the data are from {scanner.name} ({scanner.num_rings} rings, "
            f"{scanner.num_detectors_per_ring} detectors)"
        )
    if geometry.arc_corrected:
        raise GeometryError(f"{what}: the output geometry must not be arc-corrected (listmode bins are not)")
    if layout.num_views % geometry.num_views != 0:
        raise GeometryError(
            f"{what}: output has {geometry.num_views} views, which does not divide the {layout.num_views} "
            "views of the listmode data"
        )
    return layout.num_views // geometry.num_views


def target_row_table(layout: ListmodeLayout, geometry: SinogramGeometry) -> np.ndarray:
    """SIRF sinogram row of each listmode sinogram ``z`` (-1 where the output drops it), shape (num_sinograms,).

    Ring pair from :func:`span1_ring_pair`, then :func:`sinogram_row_for_ring_pair`
    (STIR's ``get_segment_axial_pos_num_for_ring_pair``) on the output geometry.
    """
    seg_of_z, ax_of_z = layout.sinogram_table()
    r1, r2 = span1_ring_pair(seg_of_z, ax_of_z)
    return sinogram_row_for_ring_pair(geometry, r1, r2)


# ----------------------------------------------------------------------------- numba kernels
@njit(cache=True, nogil=True)
def _range_start_time(words, start, carried_ms):
    """Time (ms) in force at word ``start``: the last time tag before it, else ``carried_ms``."""
    i = start - 1
    while i >= 0:
        w = words[i]
        if (w >> 31) == 1 and ((w >> 29) & 3) == 0:
            return np.int64(w & 0x1FFFFFFF)
        i -= 1
    return carried_ms


@njit(parallel=True, cache=True, nogil=True)
def _scan_kernel(words, n, nthreads, num_addresses, out):
    """Per thread (contiguous range): out[p] = (prompts, delayeds, time tags, other words, invalid
    addresses, first tag index, first tag ms, last tag index, last tag ms); -1 where no tag."""
    step = (n + nthreads - 1) // nthreads
    for p in prange(nthreads):
        cnt = np.zeros(5, np.int64)
        first_i, first_t, last_i, last_t = -1, -1, -1, -1
        for i in range(p * step, min(n, (p + 1) * step)):
            w = words[i]
            if (w >> 31) == 0:
                cnt[0 if (w >> 30) & 1 else 1] += 1
                if (w & ADDRESS_MASK) >= num_addresses:
                    cnt[4] += 1
            elif ((w >> 29) & 3) == 0:
                cnt[2] += 1
                last_i, last_t = i, np.int64(w & TIME_MASK)
                if first_i < 0:
                    first_i, first_t = last_i, last_t
            else:
                cnt[3] += 1
        out[p, :5] = cnt
        out[p, 5], out[p, 6], out[p, 7], out[p, 8] = first_i, first_t, last_i, last_t


_SKIP = 0xFFFFFFFF  # code of a word that is not an event, or is outside the time interval
_DROP_PROMPT = 0xFFFFFFFE  # prompt outside the output geometry
_DROP_DELAYED = 0xFFFFFFFD  # delayed outside the output geometry
_INVALID = 0xFFFFFFFC  # bin address beyond the span-1 sinogram (all codes >= this are not kept)
_DELAYED_FLAG = 0x80000000
_MAX_BINS = 0x7FFFFFFC  # flat bins must stay below the special codes once the delayed flag is set
_BUCKET_SHIFT = 18  # the scatter works on 2**18 consecutive bins (1 MiB of counts) at a time
_FLOAT32_EXACT = 16777216.0  # 2**24: float32 counts are exact below this


@njit(cache=True, nogil=True)
def _floor_div(a, b, inv_b):
    """a // b for 0 <= a < 2**31 without a slow 64-bit division (inv_b = 1.0 / b)."""
    q = np.int64(a * inv_b)
    if q * b > a:
        q -= 1
    elif (q + 1) * b <= a:
        q += 1
    return q


@njit(parallel=True, cache=True, nogil=True)
def _decode_kernel(words, n, nthreads, carried_ms, t0_ms, t1_ms, has_interval, row_of_z, vn0, n0, mash,
                   v_out, n_out, tang_shift, fast, codes, stats, shift, nbk, hist, counts):
    """Decode words[:n] into codes: a flat output bin (with _DELAYED_FLAG for delayeds) or a special code.

    Thread p takes one contiguous range of words; it fills stats[p] = (index of the first
    time tag with t >= t1, or n; index of its last time tag, or -1; that tag's ms),
    hist[p, key] with key = flat >> shift (+ nbk for delayeds), and counts[p] = (prompts,
    delayeds kept; prompts, delayeds outside the geometry; invalid addresses).
    """
    step = (n + nthreads - 1) // nthreads
    inv_vn0 = 1.0 / vn0
    inv_n0 = 1.0 / n0
    num_z = row_of_z.size
    for p in prange(nthreads):
        lo = p * step
        hi = min(n, lo + step)
        t = _range_start_time(words, lo, carried_ms)
        stop, last_i, last_t = n, -1, -1
        hist[p, :] = 0
        cnt = np.zeros(5, np.int64)
        for i in range(lo, hi):
            w = words[i]
            codes[i] = _SKIP
            if (w >> 31) == 1:
                if ((w >> 29) & 3) == 0:
                    t = np.int64(w & TIME_MASK)
                    last_i, last_t = i, t
                    if has_interval and t >= t1_ms and stop == n:
                        stop = i
                continue
            if has_interval and (t < t0_ms or t >= t1_ms):
                continue
            prompt = (w >> 30) & 1
            off = np.int64(w & ADDRESS_MASK)
            z = _floor_div(off, vn0, inv_vn0)
            if z >= num_z:
                codes[i] = _INVALID
                cnt[4] += 1
                continue
            row = row_of_z[z]
            rem = off - z * vn0
            flat = row * vn0 + rem
            if row >= 0 and not fast:
                v = _floor_div(rem, n0, inv_n0)
                tg = rem - v * n0 - tang_shift
                flat = (row * v_out + v // mash) * n_out + tg if 0 <= tg < n_out else -1
            if row < 0 or flat < 0:
                codes[i] = _DROP_PROMPT if prompt else _DROP_DELAYED
                cnt[2 if prompt else 3] += 1
                continue
            key = flat >> shift
            if prompt:
                codes[i] = np.uint32(flat)
                cnt[0] += 1
            else:
                codes[i] = np.uint32(flat) | np.uint32(_DELAYED_FLAG)
                key += nbk
                cnt[1] += 1
            hist[p, key] += 1
        stats[p, 0], stats[p, 1], stats[p, 2] = stop, last_i, last_t
        counts[p, :] = cnt


def _recount(codes: np.ndarray, used: int, nthreads: int, nbk: int, hist: np.ndarray, counts: np.ndarray) -> None:
    """hist and counts of _decode_kernel for codes[:used] (after a stop at t1), in the thread
    ranges that _partition_kernel(codes, used, ...) uses."""
    step = (used + nthreads - 1) // nthreads
    for p in range(nthreads):
        c = codes[p * step: min(used, (p + 1) * step)]
        kept = c < np.uint32(_INVALID)
        delayed = (c & np.uint32(_DELAYED_FLAG)) != 0
        key = ((c & np.uint32(~_DELAYED_FLAG & 0xFFFFFFFF)) >> np.uint32(_BUCKET_SHIFT)).astype(np.int64)
        key += np.where(delayed, nbk, 0)
        hist[p] = np.bincount(key[kept], minlength=2 * nbk)
        counts[p] = [np.count_nonzero(kept & ~delayed), np.count_nonzero(kept & delayed),
                     np.count_nonzero(c == np.uint32(_DROP_PROMPT)), np.count_nonzero(c == np.uint32(_DROP_DELAYED)),
                     np.count_nonzero(c == np.uint32(_INVALID))]


@njit(parallel=True, cache=True, nogil=True)
def _partition_kernel(codes, n, nthreads, shift, nbk, pos, sorted_bins):
    """Counting-sort the kept codes[:n] by key into ``sorted_bins``; pos[p, key] = next slot of thread p."""
    step = (n + nthreads - 1) // nthreads
    for p in prange(nthreads):
        for i in range(p * step, min(n, (p + 1) * step)):
            c = codes[i]
            if c >= _INVALID:
                continue
            flat = c & np.uint32(~_DELAYED_FLAG & 0xFFFFFFFF)
            key = np.int64(flat >> shift) + (nbk if c & _DELAYED_FLAG else 0)
            sorted_bins[pos[p, key]] = flat
            pos[p, key] += 1


@njit(parallel=True, cache=True, nogil=True)
def _scatter_kernel(sorted_bins, starts, nbk, prompts, delayeds, store_delayeds, saturated):
    """Count the bins of each key (2**shift consecutive bins, which stay in cache); one key per thread at a time.

    Counts are float32, exact below 2**24; saturated[key] is set when a bin of the key reaches it.
    """
    for key in prange(2 * nbk):
        is_delayed = key >= nbk
        if is_delayed and not store_delayeds:
            continue
        out = delayeds if is_delayed else prompts
        for j in range(starts[key], starts[key + 1]):
            b = sorted_bins[j]
            c = out[b] + np.float32(1.0)
            out[b] = c
            if c >= _FLOAT32_EXACT:
                saturated[key] = True


# ----------------------------------------------------------------------------- chunked reading
class _ChunkReader:
    """Reads uint32 words in chunks into two alternating buffers, the next one in a background thread."""

    def __init__(self, path: Path, offset: int, num_words: int, chunk_words: int):
        self.path, self.offset, self.num_words, self.chunk = path, offset, num_words, int(chunk_words)
        self._bufs = [np.empty(self.chunk, dtype="<u4") for _ in range(2)]
        self._f = open(path, "rb")
        self._f.seek(offset)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pos = 0
        self._k = 0
        self._pending = self._pool.submit(self._read, 0) if num_words else None

    def _read(self, k: int) -> int:
        buf = self._bufs[k]
        want = min(self.chunk, self.num_words - self._pos)
        mv = memoryview(buf).cast("B")[: want * 4]
        got = 0
        while got < want * 4:
            r = self._f.readinto(mv[got:])
            if not r:
                break
            got += r
        if got != want * 4:
            raise ListmodeError(f"listmode data '{self.path}': short read ({got} of {want * 4} bytes)")
        self._pos += want
        return want

    def __iter__(self):
        try:
            while self._pending is not None:
                n = self._pending.result()
                buf = self._bufs[self._k]
                self._k ^= 1
                self._pending = self._pool.submit(self._read, self._k) if self._pos < self.num_words else None
                words = buf[:n] if sys.byteorder == "little" else buf[:n].byteswap().view(np.uint32)
                yield words  # the consumer is done with `buf` when it asks for the next chunk
        finally:
            self.close()

    def close(self) -> None:
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:  # noqa: BLE001 - closing after an error elsewhere
                pass
            self._pending = None
        self._pool.shutdown(wait=True)
        self._f.close()


# ----------------------------------------------------------------------------- scan
@dataclass(frozen=True)
class ListmodeSummary:
    """Word counts of a listmode file. ``prompts + delayeds + time_tags + other_words == words``.

    ``first_time_ms`` / ``last_time_ms``: first and last time tag (None without tags).
    ``invalid_addresses``: events whose bin address lies beyond the span-1 sinogram.
    """

    path: Path
    words: int
    prompts: int
    delayeds: int
    time_tags: int
    other_words: int
    invalid_addresses: int
    first_time_ms: int | None
    last_time_ms: int | None

    @property
    def events(self) -> int:
        return self.prompts + self.delayeds

    @property
    def duration_s(self) -> float | None:
        if self.first_time_ms is None or self.last_time_ms is None:
            return None
        return (self.last_time_ms - self.first_time_ms) / 1000.0


def _layout_and_data(path_or_header) -> tuple[ListmodeHeader | None, Path, int, ListmodeLayout]:
    if isinstance(path_or_header, ListmodeHeader):
        h = _as_header(path_or_header)
        return h, h.data_path, h.data_offset_bytes, h.layout
    p = Path(path_or_header)
    if not p.is_file():
        raise InputFileNotFoundError(f"listmode file '{p}' does not exist", p)
    if _is_text_header(p):
        h = read_listmode_header(p)
        return h, h.data_path, h.data_offset_bytes, h.layout
    sc = scanner_preset("Siemens_mMR")
    layout = ListmodeLayout(sc.num_rings, sc.num_detectors_per_ring, 60, sc.num_detectors_per_ring // 2,
                            sc.max_num_non_arccorrected_bins)
    return None, p, 0, layout


def scan_listmode(path: str | os.PathLike | ListmodeHeader, chunk_words: int = 2**24,
                  progress: bool = False) -> ListmodeSummary:
    """Count prompts, delayeds, time tags and other words of a listmode file (header or raw ``.l``).

    A raw data file (no header) is checked against the mMR's default layout (max ring
    difference 60) for ``invalid_addresses``. Memory: two chunks of ``chunk_words`` words.
    """
    header, data, offset, layout = _layout_and_data(path)
    n_words = _data_word_count(data, offset)
    nthreads = max(1, get_num_threads())
    tot = np.zeros(5, dtype=np.int64)
    first = last = None
    out = np.zeros((nthreads, 9), dtype=np.int64)
    bar = byte_progress(n_words * 4, progress, f"scan {data.name}")
    for words in _ChunkReader(data, offset, n_words, chunk_words):
        n = words.size
        _scan_kernel(words, n, nthreads, layout.num_addresses, out)
        tot += out[:, :5].sum(axis=0)
        for p in range(nthreads):
            if out[p, 5] >= 0 and first is None:
                first = int(out[p, 6])
            if out[p, 7] >= 0:
                last = int(out[p, 8])
        if bar is not None:
            bar.update(n * 4)
    if bar is not None:
        bar.close()
    return ListmodeSummary(
        path=data, words=n_words, prompts=int(tot[0]), delayeds=int(tot[1]), time_tags=int(tot[2]),
        other_words=int(tot[3]), invalid_addresses=int(tot[4]), first_time_ms=first, last_time_ms=last,
    )


def _time_tag_range(data: Path, offset: int, n_words: int, probe_words: int = 1 << 20) -> tuple[int | None, int | None]:
    """First and last time tag (ms), reading only from the two ends of the file."""
    first = last = None
    with open(data, "rb") as f:
        pos = 0
        while pos < n_words and first is None:
            k = min(probe_words, n_words - pos)
            f.seek(offset + 4 * pos)
            w = np.fromfile(f, dtype="<u4", count=k)
            m = np.nonzero(((w >> 31) == 1) & (((w >> 29) & 3) == 0))[0]
            if m.size:
                first = int(w[m[0]] & TIME_MASK)
            pos += k
        end = n_words
        while end > 0 and last is None:
            k = min(probe_words, end)
            f.seek(offset + 4 * (end - k))
            w = np.fromfile(f, dtype="<u4", count=k)
            m = np.nonzero(((w >> 31) == 1) & (((w >> 29) & 3) == 0))[0]
            if m.size:
                last = int(w[m[-1]] & TIME_MASK)
            end -= k
    return first, last


# ----------------------------------------------------------------------------- histogram
def _warn_if_fewer_words(header: ListmodeHeader, n_words: int) -> None:
    """Warn (:class:`PlausibilityWarning`) when the data file holds fewer words than the header's
    ``%total listmode word counts`` says: a truncated copy (the histogram then misses the rest)."""
    expected = header.total_listmode_words
    if expected is not None and n_words < expected:
        warnings.warn(PlausibilityWarning(
            f"listmode file '{header.data_path}' holds {n_words:,} words ({4 * n_words:,} bytes after the offset); "
            f"its header '{header.header_path}' says '%total listmode word counts' := {expected:,}: a truncated "
            "copy? Only the events in the file are histogrammed"), stacklevel=3)


_MAX_MS = 1 << 62  # interval bounds are clamped to +-this (beyond any 29-bit time tag) for the int64 kernels


def _ceil_ms(t_s: float) -> int:
    """``ceil(1000 t)`` (less a rounding margin of 1e-9 ms) clamped to +-``_MAX_MS``: an int64 for the kernels."""
    ms = t_s * 1000.0 - 1e-9  # may overflow to +-inf for |t| near 1.8e305 s: clamped below
    return int(math.ceil(ms)) if -_MAX_MS < ms < _MAX_MS else (_MAX_MS if ms > 0 else -_MAX_MS)


def _check_time_interval(time_interval_s, header: ListmodeHeader, first_tag: int | None,
                         last_tag: int | None) -> tuple[int, int, tuple[float, float]]:
    """Integer ms bounds ``(t0_ms, t1_ms)`` of a time interval ``(t0, t1)`` s, and the interval the data cover.

    STIR keeps events whose current time ``t`` (ms / 1000, the last time tag before them; 0
    before the first) satisfies ``t0 <= t < t1``; with integer ``ms``, that is
    ``ceil(1000 t0) <= ms < ceil(1000 t1)``. The data end at the last time tag ``T`` (events
    after it have time ``T``, up to one ``timing tagwords interval`` later). Raises
    :class:`ListmodeError` for an interval that is not ``t0 < t1`` (finite), ends at or before 0,
    or starts after ``T`` (no events), naming the listmode file and where it ends. Warns
    (:class:`PlausibilityWarning`) when ``t1`` lies past ``T`` + the tag interval: the result then
    covers ``[max(t0, 0), T]`` s only, which the warning states.
    """
    data = header.data_path
    try:
        t0, t1 = (float(x) for x in time_interval_s)
    except (TypeError, ValueError):
        raise ListmodeError(f"time interval {time_interval_s!r} for listmode '{data}': expected two times "
                            "(t0, t1) in seconds") from None
    if not (math.isfinite(t0) and math.isfinite(t1)) or t1 <= t0:
        raise ListmodeError(f"time interval [{t0:g}, {t1:g}) s for listmode '{data}': expected finite times "
                            "t0 < t1 in seconds from the scan start")
    # integer ms bounds equivalent to STIR's comparison of ms/1000 with seconds; clamped for the kernels
    t0_ms, t1_ms = _ceil_ms(t0), _ceil_ms(t1)
    end_ms = last_tag if last_tag is not None else 0
    tags = ("it has no time tags (all its events count as time 0 s)" if last_tag is None else
            f"its time tags run from {0 if first_tag is None else first_tag / 1000:g} s to {end_ms / 1000:g} s; "
            "events before the first tag count as time 0")
    interval = f"time interval [{t0:g}, {t1:g}) s"
    if t1_ms <= 0:
        raise ListmodeError(f"{interval} ends before the listmode file '{data}' starts at 0 s ({tags}): "
                            "no events to histogram")
    if t0_ms > end_ms:
        raise ListmodeError(f"{interval} starts after the end of the listmode file '{data}', which ends at "
                            f"{end_ms / 1000:g} s ({tags}): no events to histogram")
    if t1_ms <= t0_ms:
        raise ListmodeError(f"{interval} holds no time tag of the listmode file '{data}' (time tags count whole "
                            "milliseconds): no events to histogram")
    tag_ms = header.timing_tag_interval_ms if header.timing_tag_interval_ms and header.timing_tag_interval_ms > 0 \
        else 1.0
    start_s, stop_s = max(t0, 0.0), min(t1, end_ms / 1000)
    if t1_ms > end_ms + tag_ms:
        warnings.warn(PlausibilityWarning(
            f"{interval} extends past the end of the listmode file '{data}', which ends at {end_ms / 1000:g} s "
            f"(its last time tag): the sinograms hold the events from {start_s:g} s to {stop_s:g} s only "
            f"({stop_s - start_s:g} s of the {t1 - t0:g} s asked for)"), stacklevel=3)
    return t0_ms, t1_ms, (start_s, stop_s)


@dataclass(frozen=True)
class ListmodeHistogramInfo:
    """What :func:`histogram_listmode` read and kept.

    Counts are events (coincidences); times are milliseconds since the scan start (the file's
    time tags) unless named ``_s``. ``prompts_outside_geometry`` / ``delayeds_outside_geometry``:
    events outside the output sinogram (ring difference above its maximum);
    ``invalid_addresses``: bin addresses past the span-1 sinogram; ``stopped_at_t1``: reading
    stopped at the interval's end before the end of the file.
    """

    header: ListmodeHeader
    geometry: str  # the output sinogram, described
    time_interval_s: tuple[float, float] | None
    effective_time_interval_s: tuple[float, float] | None
    prompts: int
    delayeds: int
    prompts_outside_geometry: int
    delayeds_outside_geometry: int
    invalid_addresses: int
    words_read: int
    words_in_file: int
    stopped_at_t1: bool
    current_time_at_end_ms: int
    first_time_tag_ms: int | None
    last_time_tag_ms: int | None
    elapsed_s: float

    @property
    def words_per_s(self) -> float:
        return self.words_read / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    @property
    def events(self) -> int:
        """Every coincidence word read: kept, outside the geometry or invalid."""
        return (self.prompts + self.delayeds + self.prompts_outside_geometry + self.delayeds_outside_geometry
                + self.invalid_addresses)

    def to_metadata(self) -> dict[str, Any]:
        """Plain values for logs and JSON (the header by its path)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "header"}
        return {**out, "listmode_header": str(self.header.header_path), "events_per_s": self.events_per_s}


def histogram_listmode(
    path_or_header: str | os.PathLike | ListmodeHeader,
    geometry: SinogramGeometry,
    time_interval_s: tuple[float, float] | None = None,
    store_delayeds: bool = True,
    chunk_words: int = 2**22,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, ListmodeHistogramInfo]:
    """Histogram a PETLINK 32-bit listmode file into SIRF-ordered sinograms, as STIR's lm_to_projdata.

    Args:
        path_or_header: the ``.l.hdr`` header (or a :class:`ListmodeHeader`).
        geometry: the output sinogram (the mMR, not arc-corrected; any span and
            maximum ring difference; views may be mashed). Span 11 / max ring
            difference 60 gives STIR's usual mMR template (837 sinograms).
        time_interval_s: ``(t0, t1)`` seconds since the scan start; events with
            current time ``t0 <= t < t1`` are kept (None: all). An interval that
            does not overlap the acquisition raises :class:`ListmodeError` (a ``ValueError``);
            one that extends past the last time tag warns (:class:`PlausibilityWarning`)
            with the interval actually covered (see :func:`_check_time_interval`).
        store_delayeds: also histogram the delayed coincidences (separately).
        chunk_words: words per chunk; four buffers of this many 32-bit words are used
            (2**22: 64 MiB in all, whatever the file size).
        progress: show a tqdm progress bar.

    Returns:
        ``(prompts, delayeds, info)``: float32 ``(1, S, V, N)`` counts in SIRF order
        (``delayeds`` is None unless ``store_delayeds``), and a :class:`ListmodeHistogramInfo`
        (the counts kept and dropped, the time range read, the throughput).
    """
    t_start = time.perf_counter()
    header = _as_header(path_or_header)
    plan = _histogram_plan(header, geometry)
    if chunk_words < 1:
        raise ValueError(f"chunk_words must be >= 1, got {chunk_words}")
    data, offset = header.data_path, header.data_offset_bytes
    n_words = _data_word_count(data, offset)
    _warn_if_fewer_words(header, n_words)
    first_tag, last_tag = _time_tag_range(data, offset, n_words)  # reads the two ends of the file only
    window = None
    effective_s = None
    if time_interval_s is not None:
        t0_ms, t1_ms, effective_s = _check_time_interval(time_interval_s, header, first_tag, last_tag)
        window = (t0_ms, t1_ms)

    prompts = np.zeros(plan.nbins, dtype=np.float32)
    delayeds = np.zeros(plan.nbins if store_delayeds else 1, dtype=np.float32)
    run = _histogram_words(header, n_words, plan, window, prompts, delayeds, store_delayeds, chunk_words, progress)
    elapsed = time.perf_counter() - t_start
    tot = run.totals
    info = ListmodeHistogramInfo(
        header=header,
        geometry=geometry.describe(),
        time_interval_s=None if window is None else (float(time_interval_s[0]), float(time_interval_s[1])),
        effective_time_interval_s=effective_s,
        prompts=int(tot[0]),
        delayeds=int(tot[1]),
        prompts_outside_geometry=int(tot[2]),
        delayeds_outside_geometry=int(tot[3]),
        invalid_addresses=int(tot[4]),
        words_read=int(run.words_read),
        words_in_file=int(n_words),
        stopped_at_t1=run.stopped,
        current_time_at_end_ms=int(run.current_time_ms),
        first_time_tag_ms=first_tag,
        last_time_tag_ms=last_tag,
        elapsed_s=elapsed,
    )
    return prompts.reshape(geometry.shape), (delayeds.reshape(geometry.shape) if store_delayeds else None), info


@dataclass(frozen=True)
class _HistogramPlan:
    """How listmode bin addresses map onto the output sinogram (flat index ``(s V + v) N + n``).

    ``row_of_z``: output sinogram of each listmode (segment, axial) row, -1 outside the geometry;
    ``n0``, ``v0``: the listmode's tangential positions and views; ``mash``: views combined;
    ``V``, ``N``: the output's views and tangential positions; ``tang_shift``: output index =
    listmode index - ``tang_shift``; ``fast``: identity in (v, n) (no mashing, same sizes).
    """

    row_of_z: np.ndarray
    n0: int
    v0: int
    mash: int
    V: int
    N: int
    tang_shift: int
    fast: bool
    nbins: int


def _histogram_plan(header: ListmodeHeader, geometry: SinogramGeometry) -> _HistogramPlan:
    layout = header.layout
    mash = _check_target(geometry, layout, header.scanner, f"histogramming '{header.header_path}'")
    n0, v0 = layout.num_tangential_poss, layout.num_views
    V, N = geometry.num_views, geometry.num_tangential_poss
    # listmode tang index tp has tangential_pos_num tp - n0//2; output index = tp - n0//2 - tmin
    tang_shift = n0 // 2 + int(geometry.tangential_pos_nums()[0])
    nbins = geometry.num_sinograms * V * N
    if nbins > _MAX_BINS:
        raise GeometryError(f"output geometry has {nbins:,} bins; at most {_MAX_BINS:,} are supported")
    return _HistogramPlan(target_row_table(layout, geometry), n0, v0, mash, V, N, tang_shift,
                          mash == 1 and V == v0 and N == n0 and tang_shift == 0, nbins)


@dataclass(frozen=True)
class _HistogramRun:
    """What a pass over the words counted: ``totals`` (prompts, delayeds kept; prompts, delayeds
    outside the geometry; invalid addresses), words read, whether it stopped at t1, and the
    current time (ms) at its end."""

    totals: np.ndarray
    words_read: int
    stopped: bool
    current_time_ms: int


def _histogram_words(header: ListmodeHeader, n_words: int, plan: _HistogramPlan,
                     window_ms: tuple[int, int] | None, prompts: np.ndarray, delayeds: np.ndarray,
                     store_delayeds: bool, chunk_words: int, progress: bool) -> _HistogramRun:
    """Add the file's events (in ``window_ms``, all without one) to ``prompts`` and ``delayeds``
    (flat float32), chunk by chunk: decode (time tags and bin addresses, by thread), partition
    the bins into buckets, scatter-add. Reading stops at the first time tag at or after t1, as STIR's."""
    data, offset = header.data_path, header.data_offset_bytes
    has_interval = window_ms is not None
    t0_ms, t1_ms = window_ms if has_interval else (0, 0)
    nbins = plan.nbins
    nthreads = max(1, get_num_threads())
    chunk = min(chunk_words, max(n_words, 1))
    codes = np.empty(chunk, dtype=np.uint32)
    sorted_bins = np.empty(chunk, dtype=np.uint32)
    nbk = (nbins + (1 << _BUCKET_SHIFT) - 1) >> _BUCKET_SHIFT
    hist = np.zeros((nthreads, 2 * nbk), dtype=np.int64)
    saturated = np.zeros(2 * nbk, dtype=np.bool_)
    stats = np.zeros((nthreads, 3), dtype=np.int64)
    counts = np.zeros((nthreads, 5), dtype=np.int64)
    tot = np.zeros(5, dtype=np.int64)  # prompts, delayeds kept; prompts, delayeds dropped; invalid
    carried = np.int64(0)
    words_read = 0
    stopped = False
    vn0 = plan.n0 * plan.v0
    bar = byte_progress(n_words * 4, progress, f"histogram {data.name}")
    reader = _ChunkReader(data, offset, n_words, chunk_words)
    try:
        for words in reader:
            n = words.size
            _decode_kernel(words, n, nthreads, carried, t0_ms, t1_ms, has_interval, plan.row_of_z, vn0, plan.n0,
                           plan.mash, plan.V, plan.N, plan.tang_shift, plan.fast, codes, stats, _BUCKET_SHIFT, nbk,
                           hist, counts)
            stop = int(stats[:, 0].min())
            used = n if stop >= n else stop  # STIR stops reading at the first time tag with t >= t1
            if used < n:  # recount without the words from the stop on
                _recount(codes, used, nthreads, nbk, hist, counts)
            tot += counts.sum(axis=0)
            # slots: key-major, then thread, so each thread writes its own contiguous runs
            per_key = hist.sum(axis=0)
            starts = np.zeros(2 * nbk + 1, dtype=np.int64)
            np.cumsum(per_key, out=starts[1:])
            pos = starts[:-1][None, :] + np.cumsum(hist, axis=0) - hist
            _partition_kernel(codes, used, nthreads, _BUCKET_SHIFT, nbk, pos, sorted_bins)
            _scatter_kernel(sorted_bins, starts, nbk, prompts, delayeds, store_delayeds, saturated)
            if stop < n:
                carried = np.int64(words[stop] & TIME_MASK)
                words_read += stop + 1
                stopped = True
            else:
                last = stats[:, 1] >= 0
                if np.any(last):
                    carried = np.int64(stats[last, 2][-1])
                words_read += n
            if bar is not None:
                bar.update(min(n, used + 1) * 4)
            if stopped:
                break
    finally:
        reader.close()
        if bar is not None:
            bar.close()
    if saturated.any():
        raise ListmodeError(
            f"histogramming '{data}': a sinogram bin reached 2**24 counts, beyond which float32 counts are "
            "not exact; histogram shorter time intervals and add them"
        )
    return _HistogramRun(tot, words_read, stopped, int(carried))


# ----------------------------------------------------------------------------- SIRF path
def histogram_with_sirf(
    header_path: str | os.PathLike,
    template,
    time_interval_s: tuple[float, float] | None,
    store_delayeds: bool = True,
    estimate_randoms: bool = False,
) -> tuple[np.ndarray, np.ndarray | None] | tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The same histogramming through SIRF (``sirf.STIR.ListmodeToSinograms``), when SIRF is installed.

    ``template``: a template sinogram (``.hs`` file name, ``sirf.STIR.AcquisitionData``, or a
    :class:`~sirf_fbsem.geometry.SinogramGeometry`, written as a template here).
    STIR stores prompts - delayeds when both flags are on, so this runs twice: prompts
    only, then (``store_delayeds``) delayeds only. With ``estimate_randoms`` it also returns
    SIRF's randoms estimate from the delayeds (``ListmodeToSinograms.estimate_randoms``:
    STIR's ML singles fit to the fan sums). Returns float32 arrays shaped ``(1, S, V, N)``
    (SIRF order): ``(prompts, delayeds)`` or ``(prompts, delayeds, randoms)``. Output files
    go to a temporary folder that is removed. ``time_interval_s`` None: the whole file.
    """
    try:
        import sirf.STIR as pet
    except ImportError as exc:
        raise ImportError("histogram_with_sirf needs SIRF (sirf.STIR); use histogram_listmode without it") from exc
    if time_interval_s is not None:  # the same checks (and warning) as histogram_listmode, before SIRF runs
        header = _as_header(header_path)
        n_words = _data_word_count(header.data_path, header.data_offset_bytes)
        _check_time_interval(time_interval_s, header,
                             *_time_tag_range(header.data_path, header.data_offset_bytes, n_words))

    def run(prompts: bool, folder: str, randoms: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        lm2sino = pet.ListmodeToSinograms()
        lm2sino.set_input(str(header_path))
        lm2sino.set_output_prefix(os.path.join(folder, "prompts" if prompts else "delayeds"))
        lm2sino.set_template(template_arg)
        if time_interval_s is not None:
            lm2sino.set_time_interval(*(float(x) for x in time_interval_s))
        if prompts:
            lm2sino.flag_on("store_prompts")
            lm2sino.flag_off("store_delayeds")
        else:
            lm2sino.flag_off("store_prompts")
            lm2sino.flag_on("store_delayeds")
        lm2sino.set_up()
        lm2sino.process()
        arr = np.array(lm2sino.get_output().as_array(), dtype=np.float32)  # a copy
        arr = arr.reshape((1,) + arr.shape[-3:])
        if not randoms:
            return arr
        est = np.array(lm2sino.estimate_randoms().as_array(), dtype=np.float32)
        return arr, est.reshape((1,) + est.shape[-3:])

    with tempfile.TemporaryDirectory(prefix="sirf_fbsem_lm_") as folder:
        template_arg = template
        if isinstance(template, SinogramGeometry):
            template_arg = os.path.join(folder, "template.hs")
            write_projdata(template_arg, template, np.zeros(template.shape, dtype=np.float32))
        elif isinstance(template, (str, os.PathLike)):
            template_arg = str(template)
        prompts = run(True, folder)
        if estimate_randoms:
            delayeds, randoms = run(False, folder, randoms=True)
            return prompts, delayeds, randoms
        delayeds = run(False, folder) if store_delayeds else None
    return prompts, delayeds
