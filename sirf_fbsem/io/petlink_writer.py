"""Write Siemens mMR PETLINK 32-bit listmode (``.l`` + ``.l.hdr``): the inverse of :mod:`.listmode`.

Two steps, each the inverse of one step of :func:`~sirf_fbsem.io.listmode.histogram_listmode`:

1. :func:`events_from_counts`: integer counts per bin of any non-arc-corrected mMR sinogram
   (span 1 or compressed, views mashed or not, all or fewer tangential positions) -> one
   span-1 PETLINK bin address per event. A span-1, unmashed, full-width geometry has one
   address per bin. Otherwise each event of a bin draws one of the span-1 ring pairs (and
   unmashed views) that STIR's ``lm_to_projdata`` adds into that bin, with probability
   proportional to ``e[r1, d1] e[r2, d2]`` (``crystal_efficiencies``; uniform without them).
   Drawing Poisson counts on the compressed bins and then splitting them this way is the same
   as drawing independent Poisson counts on the span-1 bins with means in those proportions,
   the model of STIR's span-11 projector and ECAT8 normalisation (all ring pairs of a bin
   share its geometric line and ``ring1 + ring2``).
2. :func:`write_petlink_listmode`: prompt and delayed addresses -> events in time order with a
   time tag every millisecond, as the mMR writes them (``%timing tagwords interval (msec)
   := 1``), and the Interfile header with the keys of a real mMR ``.l.hdr``.

Word layout (see :mod:`.listmode`): an event is ``address | PROMPT_BIT`` for a prompt,
``address`` for a delayed (bit 31 = 0); a time tag is ``EVENT_TYPE_BIT | ms``. The stream is
``tag 0, events of ms 0, tag 1, events of ms 1, ..., tag D`` (D = duration in ms): STIR and
the reader give an event the time of the last tag before it, so an event of ms ``k`` has time
``k / 1000`` s and the time-interval selection ``[t0, t1)`` keeps exactly the events with
``ceil(1000 t0) <= k < ceil(1000 t1)``. Events arrive at a constant rate: each event's
millisecond is drawn uniformly from ``[0, D)``, independently of its kind and bin. No singles
or gantry tags are written (readers skip them).

Example (a span-11 sinogram of Poisson counts ``y`` and delayeds ``d``)::

    rng = np.random.default_rng(1)
    prompts = events_from_counts(y, geometry, rng, crystal_efficiencies=eff)
    delayeds = events_from_counts(d, geometry, rng, crystal_efficiencies=eff)
    written = write_petlink_listmode("scan.l.hdr", prompts, delayeds, duration_s=10.0, rng=rng)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..geometry import GeometryError, SinogramGeometry, scanner_preset
from ..scanner_bins import det_pair_for_view_tangential, span1_ring_pair
from .atomic import atomic_path
from .listmode import (
    EVENT_TYPE_BIT,
    PROMPT_BIT,
    TIME_MASK,
    ListmodeLayout,
    target_row_table,
)

__all__ = ["header_and_data_paths", "mmr_listmode_layout", "events_from_counts", "WrittenListmode",
           "write_petlink_listmode"]


def header_and_data_paths(header_path: str | os.PathLike, data_suffix: str, overwrite: bool) -> tuple[Path, Path]:
    """``(<name><data_suffix>.hdr, <name><data_suffix>)``: a Siemens header and the data file it names.

    ``ValueError`` unless ``header_path`` ends in ``<data_suffix>.hdr``; ``FileExistsError`` naming
    an existing one of the two unless ``overwrite``. (Listmode: ``.l``; ECAT8 norm: ``.n``.)
    """
    header = Path(header_path)
    if not header.name.endswith(data_suffix + ".hdr"):
        raise ValueError(f"header '{header}' must end in '{data_suffix}.hdr' (the data file is '<name>{data_suffix}')")
    data = header.with_name(header.name[: -len(".hdr")])
    existing = [str(p) for p in (header, data) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{' and '.join(existing)} exist(s); pass overwrite=True to replace")
    return header, data


def mmr_listmode_layout(max_ring_difference: int = 60) -> ListmodeLayout:
    """The span-1 address layout of the Siemens mMR's listmode (64 rings, 252 views, 344 bins)."""
    sc = scanner_preset("Siemens_mMR")
    return ListmodeLayout(sc.num_rings, sc.num_detectors_per_ring, max_ring_difference,
                          sc.num_detectors_per_ring // 2, sc.max_num_non_arccorrected_bins)


def _candidates(layout: ListmodeLayout, geometry: SinogramGeometry) -> np.ndarray:
    """Listmode sinograms ``z`` of every output row: (S, K) int64, padded with -1 (``target_row_table`` inverted)."""
    row_of_z = target_row_table(layout, geometry)
    z = np.flatnonzero(row_of_z >= 0)
    rows = row_of_z[z]
    order = np.argsort(rows, kind="stable")
    z, rows = z[order], rows[order]
    per_row = np.bincount(rows, minlength=geometry.num_sinograms)
    table = np.full((geometry.num_sinograms, max(int(per_row.max(initial=0)), 1)), -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    table[rows, np.arange(z.size) - starts[rows]] = z
    return table


def _mash_factor(geometry: SinogramGeometry, layout: ListmodeLayout) -> int:
    """Views of ``layout`` per view of ``geometry``; ``GeometryError`` unless the addresses histogram into it."""
    sc = geometry.scanner
    if (sc.num_rings, sc.num_detectors_per_ring) != (layout.num_rings, layout.num_detectors_per_ring):
        raise GeometryError(f"writing listmode events: the geometry is for {sc.name} ({sc.num_rings} rings, "
                            f"{sc.num_detectors_per_ring} detectors); the listmode layout has {layout.num_rings} "
                            f"rings, {layout.num_detectors_per_ring} detectors")
    if geometry.arc_corrected or layout.num_views % geometry.num_views:
        raise GeometryError("writing listmode events: the geometry must be non-arc-corrected with a number of "
                            f"views dividing {layout.num_views}")
    return layout.num_views // geometry.num_views


def events_from_counts(
    counts: np.ndarray,
    geometry: SinogramGeometry,
    rng: np.random.Generator,
    crystal_efficiencies: np.ndarray | None = None,
    layout: ListmodeLayout | None = None,
    chunk_events: int = 1 << 20,
) -> np.ndarray:
    """One PETLINK bin address per event: ``counts[b]`` events in each bin ``b`` of ``geometry``.

    Args:
        counts: ``(1, S, V, N)`` (or ``(S, V, N)``) SIRF-ordered non-negative integer counts
            (any dtype holding integers) on ``geometry``.
        geometry: a non-arc-corrected mMR sinogram (any span, maximum ring difference, view
            mashing, tangential range) that ``layout``'s addresses histogram into.
        rng: draws the ring pair (and unmashed view) of each event of a compressed bin.
        crystal_efficiencies: ``(rings, detectors)`` ``e``; an event of a bin takes span-1 bin
            ``(r1, d1, r2, d2)`` with probability ``e[r1, d1] e[r2, d2] / sum`` over the bin's
            span-1 bins (STIR's ECAT8 model within a bin). None: uniform.
        layout: the listmode's address layout (default: the mMR's, maximum ring difference 60).
        chunk_events: events handled at a time (memory: about 50 x this x span-1 bins per bin bytes).

    Returns:
        uint32 addresses (bits 29..0 of an event word), bin by bin in flat SIRF order; histogramming
        them into ``geometry`` gives ``counts`` back exactly.

    Raises:
        ValueError: counts that are negative or not integers, or counts in a bin that no span-1
            bin of ``layout`` reaches or whose span-1 bins all have efficiency 0.
    """
    layout = layout or mmr_listmode_layout()
    mash = _mash_factor(geometry, layout)
    c = np.asarray(counts)
    if c.shape not in (geometry.shape, geometry.shape[1:]):
        raise ValueError(f"counts have shape {c.shape}; the geometry's is {geometry.shape}")
    c = c.reshape(-1)
    bins = np.flatnonzero(c)
    n = c[bins]
    if np.any(n < 0) or np.any(n != np.round(n)):
        raise ValueError("counts must be non-negative integers")
    bins = np.repeat(bins, n.astype(np.int64))
    eff = None
    if crystal_efficiencies is not None:
        eff = np.asarray(crystal_efficiencies, dtype=np.float64)
        if eff.shape != (layout.num_rings, layout.num_detectors_per_ring):
            raise ValueError(f"crystal_efficiencies have shape {eff.shape}; expected "
                             f"{(layout.num_rings, layout.num_detectors_per_ring)} (rings, detectors)")
    table = _candidates(layout, geometry)
    out = np.empty(bins.size, dtype=np.uint32)
    for start in range(0, bins.size, chunk_events):
        sl = slice(start, start + chunk_events)
        out[sl] = _draw_addresses(bins[sl], geometry, layout, table, mash, eff, rng)
    return out


def _draw_addresses(bins: np.ndarray, geometry: SinogramGeometry, layout: ListmodeLayout, table: np.ndarray,
                    mash: int, eff: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Addresses of events in flat output ``bins``: each draws (listmode sinogram z, unmashed view u) of its bin."""
    V, N = geometry.num_views, geometry.num_tangential_poss
    row, rest = np.divmod(bins, V * N)
    view, tidx = np.divmod(rest, N)
    n0, v0 = layout.num_tangential_poss, layout.num_views
    tp = tidx + n0 // 2 + int(geometry.tangential_pos_nums()[0])  # listmode tangential index
    z, u = np.broadcast_arrays(table[row][:, :, None], (view[:, None] * mash + np.arange(mash))[:, None, :])
    valid = z >= 0  # (E, K, mash)
    if eff is None:
        w = valid.astype(np.float64)
    else:
        seg_of_z, ax_of_z = layout.sinogram_table()
        zc = np.where(valid, z, 0)
        r1, r2 = span1_ring_pair(seg_of_z[zc], ax_of_z[zc])
        d1, d2 = det_pair_for_view_tangential(u, (tp - n0 // 2)[:, None, None], layout.num_detectors_per_ring)
        w = np.where(valid, eff[r1, d1] * eff[r2, d2], 0.0)
    w = w.reshape(w.shape[0], -1)
    cum = np.cumsum(w, axis=1)
    total = cum[:, -1]
    if np.any(total <= 0):
        bad = int(bins[np.argmax(total <= 0)])
        raise ValueError(f"counts in sinogram bin {tuple(int(i) for i in np.unravel_index(bad, geometry.shape[1:]))} "
                         "(row, view, tangential), which no span-1 bin of the listmode reaches with efficiency > 0")
    pick = np.minimum((cum <= (rng.random(w.shape[0]) * total)[:, None]).sum(axis=1), w.shape[1] - 1)
    idx = np.arange(pick.size)
    zz = z.reshape(z.shape[0], -1)[idx, pick]
    uu = u.reshape(u.shape[0], -1)[idx, pick]
    return ((zz * v0 + uu) * n0 + tp).astype(np.uint32)


@dataclass(frozen=True)
class WrittenListmode:
    """What :func:`write_petlink_listmode` wrote.

    ``prompt_times_ms`` / ``delayed_times_ms``: the millisecond of each event, in the order of
    the addresses given; ``words``: 32-bit words in the data file (events + ``time_tags``).
    """

    header_path: Path
    data_path: Path
    prompt_times_ms: np.ndarray
    delayed_times_ms: np.ndarray
    time_tags: int
    words: int
    duration_ms: int


def _segment_table(layout: ListmodeLayout) -> str:
    return "{" + ",".join(str(int(n)) for n in layout.segment_sizes) + "}"


def _header_text(data_name: str, layout: ListmodeLayout, duration_s: float, words: int, start: datetime,
                 isotope: tuple[str, float], radiopharmaceutical: str, patient_orientation: str) -> str:
    """A PETLINK ``.l.hdr`` with the keys (and sections) of a real mMR listmode header."""
    date, time_ = start.strftime("%Y:%m:%d"), start.strftime("%H:%M:%S")
    keys = [
        ("!INTERFILE", ""), ("%comment", "simulated listmode written by sirf_fbsem"),
        ("!originating system", "2008"), ("%SMS-MI header name space", "PETLINK bin address"),
        ("%SMS-MI version number", "3.4"),
        ("!GENERAL DATA", ""), ("!data offset in bytes", "0"), ("name of data file", data_name),
        ("!GENERAL IMAGE DATA", ""), ("!type of data", "PET"),
        ("%study date (yyyy:mm:dd)", date), ("%study time (hh:mm:ss GMT+00:00)", time_),
        ("isotope name", isotope[0]), ("isotope gamma halflife (sec)", f"{isotope[1]:g}"),
        ("radiopharmaceutical", radiopharmaceutical), ("%patient orientation", patient_orientation),
        ("PET data type", "Emission"), ("data format", "CoincidenceList"),
        ("horizontal bed translation", "stepped"), ("start horizontal bed position (mm)", "0"),
        ("end horizontal bed position (mm)", "0"), ("start vertical bed position (mm)", "0"),
        ("%bed zero offset (mm)", "0"),
        ("number of energy windows", "1"), ("%energy window lower level (keV) [1]", "430"),
        ("%energy window upper level (keV) [1]", "610"),
        ("!PET STUDY (Emission data)", ""), ("PET scanner type", "cylindrical"),
        ("transaxial FOV diameter (cm)", "59.6"), ("number of rings", str(layout.num_rings)),
        ("distance between rings (cm)", "0.40625"), ("gantry tilt angle (degrees)", "0"),
        ("gantry crystal radius (cm)", "32.8"),
        ("bin size (cm)", "0.20445"), ("septa state", "none"), ("%number of TOF time bins", "1"),
        ("%TOF mashing factor", "1"),
        ("!IMAGE DATA DESCRIPTION", ""), ("%preset type", "time"), ("%preset value", f"{duration_s:g}"),
        ("%preset unit", "seconds"), ("image duration (sec)", f"{duration_s:g}"),
        ("%total listmode word counts", str(words)),
        ("%COINCIDENCE LIST DATA", ""), ("%LM event and tag words format (bits)", "32"),
        ("%timing tagwords interval (msec)", "1"), ("%axial compression", "1"),
        ("%maximum ring difference", str(layout.max_ring_difference)),
        ("%number of projections", str(layout.num_tangential_poss)), ("%number of views", str(layout.num_views)),
        ("%number of segments", str(layout.segment_sequence.size)), ("%segment table", _segment_table(layout)),
        ("!END OF INTERFILE", ""),
    ]
    return "".join(f"{k}:={v}\n" for k, v in keys)


def write_petlink_listmode(
    header_path: str | os.PathLike,
    prompts: np.ndarray,
    delayeds: np.ndarray,
    duration_s: float,
    rng: np.random.Generator,
    *,
    layout: ListmodeLayout | None = None,
    start_time: datetime = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc),
    isotope: tuple[str, float] = ("F-18", 6586.2),
    radiopharmaceutical: str = "FDG",
    patient_orientation: str = "HFS",
    overwrite: bool = False,
) -> WrittenListmode:
    """Write prompt and delayed events as PETLINK 32-bit listmode: ``<name>.l`` and its header ``<name>.l.hdr``.

    Args:
        header_path: ``<name>.l.hdr``; the data file is ``<name>.l`` beside it (named in the header).
        prompts, delayeds: span-1 bin addresses (e.g. from :func:`events_from_counts`), any order.
        duration_s: acquisition length, rounded to whole milliseconds D >= 1. Each event's
            millisecond is drawn uniformly from ``[0, D)`` (a constant rate); a time tag is
            written for every millisecond ``0..D``.
        rng: draws the event times.
        layout: the address layout the header declares (default: the mMR's, maximum ring difference 60).
        start_time, isotope (name, half-life in s), radiopharmaceutical, patient_orientation: header values.
        overwrite: replace existing files (otherwise ``FileExistsError``).

    Returns:
        :class:`WrittenListmode`, with every event's millisecond (to select time intervals in tests).
    """
    layout = layout or mmr_listmode_layout()
    header, data = header_and_data_paths(header_path, ".l", overwrite)
    duration_ms = round(1000.0 * float(duration_s)) if math.isfinite(duration_s) else 0
    if not 1 <= duration_ms <= TIME_MASK:
        raise ValueError(f"duration_s must be from 0.001 to {TIME_MASK / 1000:g} s (whole milliseconds), "
                         f"got {duration_s!r}")
    p = np.asarray(prompts, dtype=np.int64).reshape(-1)
    d = np.asarray(delayeds, dtype=np.int64).reshape(-1)
    for name, a in (("prompts", p), ("delayeds", d)):
        if a.size and (a.min() < 0 or a.max() >= layout.num_addresses):
            raise GeometryError(f"{name}: bin addresses must lie in [0, {layout.num_addresses}) for this layout")
    codes = np.concatenate([p | PROMPT_BIT, d]).astype(np.uint32)
    ms = rng.integers(0, duration_ms, size=codes.size, dtype=np.int64)
    order = np.argsort(ms, kind="stable")
    tags = np.arange(duration_ms + 1, dtype=np.int64)
    positions = np.searchsorted(ms[order], tags, side="left")  # tag k goes before the first event of ms >= k
    words = np.insert(codes[order], positions, (tags | EVENT_TYPE_BIT).astype(np.uint32))
    text = _header_text(data.name, layout, duration_ms / 1000.0, int(words.size), start_time, isotope,
                        radiopharmaceutical, patient_orientation)
    with atomic_path(data) as tmp:
        words.astype("<u4").tofile(tmp)
    with atomic_path(header) as tmp:
        tmp.write_text(text, encoding="ascii")
    return WrittenListmode(header, data, ms[: p.size], ms[p.size:], int(tags.size), int(words.size), duration_ms)
