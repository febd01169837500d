"""PETSIRD listmode (the ETSI's open PET raw-data standard) through the ``petsird`` package.

Reading: :func:`read_petsird_header` derives a cylindrical :class:`~sirf_fbsem.geometry.Scanner`
from the file's ``ScannerInformation``; :func:`histogram_petsird` bins its coincidences
into SIRF-ordered sinograms with the same detector-pair -> bin mapping as the mMR
listmode reader (:func:`sirf_fbsem.scanner_bins.bin_for_detector_pair`, STIR's
``get_bin_for_det_pair``). Writing: :func:`write_petsird` makes a file for any of our
cylindrical scanners with petsird's own writer (tests, examples, conversions).

PETSIRD (``petsird`` >= 0.7; written against 0.12)
--------------------------------------------------
* Geometry: ``ScannerGeometry.replicated_modules[type]`` is a module (a box of
  ``detecting_elements``: one crystal shape replicated by rigid transforms) replicated
  by rigid transforms (3 x 4 matrices, ``y = A [x, 1]``), in gantry coordinates (mm).
* A coincidence holds two ``DetectionBin`` numbers; for module type ``m``
  ``bin = energy + (element + module * elements_per_module) * energy_bins``
  (``petsird.helpers.make_detection_bin``), so the crystal is ``bin // energy_bins``.
* ``EventTimeBlock``: a time interval ``[start, stop)`` in ms since the acquisition
  start, ``prompt_events[type1][type2]`` and (when stored) ``delayed_events[type1][type2]``.
  Coincidences carry no time of their own: a time block is the time resolution.

From PETSIRD to our geometry
----------------------------
Only "regular cylinders" map onto STIR's ``ProjDataInfoCylindricalNoArcCorr``: one
module type; all crystal centres at one distance from the z axis (within
``radial_tolerance_mm``); crystal centres on equally spaced rings (z) and on a regular
angular grid of ``n`` (even) positions per ring (within ``grid_tolerance`` of a pitch;
positions without a crystal, such as the mMR's gaps, are allowed: they are STIR's
virtual crystals); one crystal per (ring, angle) (no DOI layers). Anything else raises
:class:`PetsirdError` naming the file and what does not fit.

PETSIRD gantry coordinates are taken as STIR's gantry axes (x horizontal, y down, z
along the axis). STIR puts detector ``d`` of a ring at ``(x, y) = (R sin psi, -R cos psi)``
with ``psi = 2 pi d / n + intrinsic tilt``; so ``d = round((atan2(x, -y) - tilt) n / 2 pi)``
and the tilt (the grid's angular offset) becomes the scanner's ``view_offset_deg``.
Rings are numbered by ascending z. The inner radius is where the crystals' inner faces
are; the average depth of interaction defaults to half the crystal depth (so LORs join
crystal centres) unless given. A derived scanner equal to a preset (rings, detectors,
ring spacing, inner radius, tilt) is replaced by the preset (e.g. ``Siemens_mMR``).

TOF bins are summed (our sinograms are non-TOF) and so are the energy windows.

Time selection: a time block belongs to ``[t0, t1)`` when its start ``s`` satisfies
``t0 <= s < t1`` (the analogue of a PETLINK time tag: the events of a block carry its
start time). An interval that selects no time block of the acquisition is an error.

Memory: the output sinograms plus ``chunk_events`` detection-bin pairs; the file is
streamed time block by time block (petsird's reader decodes each block into Python
objects, which bounds the rate to some 10^5-10^6 events per second).
"""
from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from numba import njit

from ..geometry import SCANNER_PRESETS, GeometryError, Scanner, SinogramGeometry
from ..progress import byte_progress
from ..scanner_bins import bin_for_detector_pair
from .header_keys import ListmodeError

__all__ = [
    "PetsirdError",
    "PetsirdScanner",
    "PetsirdTimeBlock",
    "petsird_format",
    "read_petsird_header",
    "scanner_from_petsird",
    "petsird_geometry",
    "histogram_petsird",
    "PetsirdHistogramInfo",
    "write_petsird",
    "detector_positions_mm",
]

_BINARY_MAGIC = b"yardl"
_FLOAT32_EXACT = 16777216.0  # 2**24: float32 counts are exact below this
_NDJSON_MAGIC = b'{"yardl"'


class PetsirdError(ListmodeError):
    """A PETSIRD file that cannot be read, or whose scanner does not fit our cylindrical geometry."""


def _petsird():
    try:
        import petsird
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading PETSIRD listmode needs the 'petsird' package: pip install petsird "
            "(or pip install 'sirf_fbsem[listmode]')"
        ) from exc
    return petsird


def petsird_format(path: str | os.PathLike) -> str | None:
    """``"binary"`` or ``"ndjson"`` when ``path`` starts like a PETSIRD (yardl) stream, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head.startswith(_BINARY_MAGIC):
        return "binary"
    if head.lstrip().startswith(_NDJSON_MAGIC):
        return "ndjson"
    return None


def _open_reader(path: Path):
    """``(reader, raw file)``: a petsird reader on a file we own (its ``tell()`` drives progress bars)."""
    petsird = _petsird()
    fmt = petsird_format(path)
    if fmt is None:
        raise PetsirdError(f"'{path}' is not a PETSIRD file (no yardl binary or NDJSON header)")
    fh = open(path, "rb")
    try:
        if fmt == "binary":
            return petsird.BinaryPETSIRDReader(fh, skip_completed_check=True), fh
        text = io.TextIOWrapper(fh, encoding="utf-8")
        return petsird.NDJsonPETSIRDReader(text, skip_completed_check=True), fh
    except Exception as exc:  # noqa: BLE001 - the reader raises RuntimeError / ValueError on bad schemas
        fh.close()
        raise PetsirdError(f"PETSIRD file '{path}' cannot be opened: {exc}") from exc


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class PetsirdScanner:
    """A PETSIRD scanner mapped onto our cylindrical :class:`Scanner`.

    ``crystal_ring`` / ``crystal_det`` (int64, one per crystal ``module * elements_per_module
    + element``): STIR ring and detector numbers. ``num_energy_bins``, ``num_tof_bins``:
    of the (single) module type. ``z_first_ring_mm``: PETSIRD z of ring 0's crystal centres.
    ``preset``: the :data:`SCANNER_PRESETS` key when the scanner is a preset, else None.
    """

    scanner: Scanner
    crystal_ring: np.ndarray = field(repr=False)
    crystal_det: np.ndarray = field(repr=False)
    num_energy_bins: int
    num_tof_bins: int
    z_first_ring_mm: float
    crystal_depth_mm: float
    preset: str | None
    model_name: str

    @property
    def num_crystals(self) -> int:
        return int(self.crystal_ring.size)

    @property
    def num_detection_bins(self) -> int:
        return self.num_crystals * self.num_energy_bins


def _mat44(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64).reshape(3, 4)
    return np.vstack([m, [0.0, 0.0, 0.0, 1.0]])


def _num_bins(edges) -> int:
    n = int(np.asarray(edges.edges).size) - 1
    return max(n, 1)


def _cluster_1d(values: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Group sorted-able values closer than ``tol``: (cluster centres ascending, cluster index of each value)."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    starts = np.concatenate([[True], np.diff(v) > tol])
    label_sorted = np.cumsum(starts) - 1
    centres = np.array([v[label_sorted == k].mean() for k in range(label_sorted[-1] + 1)])
    labels = np.empty_like(label_sorted)
    labels[order] = label_sorted
    return centres, labels


def scanner_from_petsird(
    info,
    source: str | os.PathLike = "<PETSIRD header>",
    *,
    average_depth_of_interaction_mm: float | None = None,
    radial_tolerance_mm: float = 1.0,
    grid_tolerance: float = 0.1,
    match_presets: bool = True,
) -> PetsirdScanner:
    """Map a ``petsird.ScannerInformation`` onto a cylindrical :class:`Scanner` (see the module docstring).

    Args:
        info: the header's ``scanner`` (``petsird.ScannerInformation``).
        source: the file name, for error messages.
        average_depth_of_interaction_mm: STIR's DOI; default half the crystal depth.
        radial_tolerance_mm: largest spread of the crystal-centre distances from the axis.
        grid_tolerance: largest distance of a crystal from its ring / angular grid point,
            as a fraction of the ring spacing / angular pitch.
        match_presets: replace a scanner equal to a preset by the preset.
    """
    where = f"PETSIRD file '{source}'"
    pts = _crystal_corners(info.scanner_geometry, where)
    centre, inner, depth = _radial_extent(pts, where, radial_tolerance_mm)
    ring_z, ring_of, spacing = _ring_grid(centre, pts, where, grid_tolerance)
    n, det, tilt_deg = _angular_grid(centre, ring_of, where, grid_tolerance)
    ring = ring_of.astype(np.int64)
    key = ring * n + det
    if np.unique(key).size != key.size:
        raise PetsirdError(
            f"{where}: several crystals share one (ring, angle) position (depth-of-interaction layers?); "
            "not supported"
        )
    doi = depth / 2.0 if average_depth_of_interaction_mm is None else float(average_depth_of_interaction_mm)
    r_eff = inner + doi
    ntang = n // 2
    scanner = Scanner(
        name=info.model_name or "PETSIRD scanner",
        num_rings=int(ring_z.size),
        num_detectors_per_ring=n,
        inner_ring_radius_mm=inner,
        average_depth_of_interaction_mm=doi,
        ring_spacing_mm=spacing,
        default_bin_size_mm=r_eff * math.sin(math.pi / n),
        view_offset_deg=tilt_deg,
        max_num_non_arccorrected_bins=ntang,
        default_num_arccorrected_bins=ntang,
    )
    preset = _matching_preset(scanner) if match_presets else None
    if preset is not None:
        p = SCANNER_PRESETS[preset]
        scanner = p if average_depth_of_interaction_mm is None else replace(p, average_depth_of_interaction_mm=doi)
    en = info.event_energy_bin_edges
    n_en = _num_bins(en[0]) if len(en) else 1
    tof = info.tof_bin_edges
    n_tof = _num_bins(tof[0][0]) if len(tof) and len(tof[0]) else 1
    return PetsirdScanner(
        scanner=scanner,
        crystal_ring=ring,
        crystal_det=det,
        num_energy_bins=n_en,
        num_tof_bins=n_tof,
        z_first_ring_mm=float(ring_z[0]),
        crystal_depth_mm=depth,
        preset=preset,
        model_name=info.model_name,
    )


def _crystal_corners(geo, where: str) -> np.ndarray:
    """The 8 corners (mm) of every crystal, (C, 8, 3), crystal index = module * E + element."""
    n_types = len(geo.replicated_modules)
    if n_types != 1:
        raise PetsirdError(
            f"{where}: the scanner has {n_types} module types; only scanners with one module type "
            "(a single cylinder of identical modules) map onto a cylindrical STIR geometry"
        )
    rep = geo.replicated_modules[0]
    elements = rep.object.detecting_elements
    if not rep.transforms or not elements.transforms:
        raise PetsirdError(f"{where}: the scanner geometry has no modules or no detecting elements")
    corners = np.array([np.asarray(c.c, dtype=np.float64) for c in elements.object.shape.corners])  # (8, 3)
    mods = np.stack([_mat44(t.matrix) for t in rep.transforms])  # (M, 4, 4)
    els = np.stack([_mat44(t.matrix) for t in elements.transforms])  # (E, 4, 4)
    full = np.einsum("mij,ejk->meik", mods, els).reshape(-1, 4, 4)
    hom = np.concatenate([corners, np.ones((corners.shape[0], 1))], axis=1)  # (8, 4)
    return np.einsum("cij,kj->cki", full, hom)[..., :3]


def _radial_extent(pts: np.ndarray, where: str, radial_tolerance_mm: float) -> tuple[np.ndarray, float, float]:
    """Crystal centres (C, 3), inner radius and crystal depth (mm, medians over crystals); the centres
    must lie on one cylinder within ``radial_tolerance_mm``."""
    centre = pts.mean(axis=1)
    r_centre = np.hypot(centre[:, 0], centre[:, 1])
    if np.any(r_centre <= 0):
        raise PetsirdError(f"{where}: a crystal centre lies on the scanner axis")
    spread = float(r_centre.max() - r_centre.min())
    if spread > radial_tolerance_mm:
        raise PetsirdError(
            f"{where}: not a regular cylinder: crystal centres lie between {r_centre.min():.2f} and "
            f"{r_centre.max():.2f} mm from the z axis (spread {spread:.2f} mm > {radial_tolerance_mm} mm; "
            "polygonal/panel or multi-layer geometries are not supported)"
        )
    u = centre[:, :2] / r_centre[:, None]
    radial = np.einsum("cki,ci->ck", pts[..., :2], u)  # corner distances along each crystal's radial direction
    return centre, float(np.median(radial.min(axis=1))), float(np.median(radial.max(axis=1) - radial.min(axis=1)))


def _ring_grid(centre: np.ndarray, pts: np.ndarray, where: str,
               grid_tolerance: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Rings: the distinct crystal-centre z (mm, ascending), each crystal's ring, and the ring spacing
    (mm; the crystals' axial extent for one ring). The rings must be equally spaced."""
    z = centre[:, 2]
    ring_z, ring_of = _cluster_1d(z, tol=max(1e-3, 1e-6 * np.ptp(z)))
    num_rings = int(ring_z.size)
    if num_rings == 1:
        extents = pts[..., 2].max(axis=1) - pts[..., 2].min(axis=1)
        return ring_z, ring_of, float(np.median(extents))
    gaps = np.diff(ring_z)
    spacing = float(np.median(gaps))
    if np.any(np.abs(gaps - spacing) > grid_tolerance * spacing):
        raise PetsirdError(
            f"{where}: not a regular cylinder: the {num_rings} crystal rings are not equally spaced "
            f"(z steps from {gaps.min():.3f} to {gaps.max():.3f} mm)"
        )
    grid = ring_z[0] + spacing * np.arange(num_rings)  # each crystal's residual from its ring's grid position
    if np.any(np.abs(z - grid[ring_of]) > grid_tolerance * spacing):
        raise PetsirdError(f"{where}: crystal z positions scatter by more than {grid_tolerance} ring spacings")
    return ring_z, ring_of, spacing


def _angular_grid(centre: np.ndarray, ring_of: np.ndarray, where: str,
                  grid_tolerance: float) -> tuple[int, np.ndarray, float]:
    """Detectors per ring n (even), each crystal's detector index, and the grid's tilt (deg):
    STIR's angle psi = atan2(x, -y) of the crystal centres on a regular grid of n positions."""
    psi = np.mod(np.arctan2(centre[:, 0], -centre[:, 1]), 2 * math.pi)
    sel = ring_of == np.bincount(ring_of).argmax()
    ang, _ = _cluster_1d(psi[sel], tol=1e-6)
    diffs = np.diff(np.concatenate([ang, [ang[0] + 2 * math.pi]]))
    if ang.size < 2:
        raise PetsirdError(f"{where}: a ring has fewer than 2 crystals")
    n = int(round(2 * math.pi / float(diffs.min())))
    if n % 2:
        raise PetsirdError(
            f"{where}: the crystals sit on a grid of {n} angular positions per ring; STIR's cylindrical "
            "geometry needs an even number"
        )
    step = 2 * math.pi / n
    k = psi / step
    frac = k - np.round(k)
    offset = math.atan2(np.sin(2 * math.pi * frac).mean(), np.cos(2 * math.pi * frac).mean()) / (2 * math.pi)
    k_shift = k - offset
    resid = np.abs(k_shift - np.round(k_shift))
    if np.any(resid > grid_tolerance):
        raise PetsirdError(
            f"{where}: not a regular cylinder: crystal angles are not on a grid of {n} positions per ring "
            f"(largest deviation {resid.max():.2f} of the {math.degrees(step):.4f} deg pitch)"
        )
    return n, np.mod(np.round(k_shift).astype(np.int64), n), math.degrees(offset * step)


def _matching_preset(scanner: Scanner) -> str | None:
    """The name of the preset with the same rings, detectors, ring spacing (0.1 %), inner radius
    (0.5 mm) and view offset (1e-3 deg), if any."""
    for name, p in SCANNER_PRESETS.items():
        if (
            p.num_rings == scanner.num_rings
            and p.num_detectors_per_ring == scanner.num_detectors_per_ring
            and abs(p.ring_spacing_mm - scanner.ring_spacing_mm) <= 1e-3 * scanner.ring_spacing_mm
            and abs(p.inner_ring_radius_mm - scanner.inner_ring_radius_mm) <= 0.5
            and abs(p.view_offset_deg - scanner.view_offset_deg) <= 1e-3
        ):
            return name
    return None


def read_petsird_header(path: str | os.PathLike, **kwargs: Any):
    """``(header, PetsirdScanner)`` of a PETSIRD file (binary or NDJSON); kwargs go to :func:`scanner_from_petsird`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"PETSIRD file '{p}' does not exist")
    reader, fh = _open_reader(p)
    try:
        try:
            header = reader.read_header()
        except Exception as exc:  # noqa: BLE001 - EOF / decode errors of a damaged file
            raise PetsirdError(f"PETSIRD file '{p}': cannot read the header ({type(exc).__name__}: {exc})") from exc
    finally:
        _close(reader, fh)
    return header, scanner_from_petsird(header.scanner, p, **kwargs)


def petsird_geometry(scanner: Scanner, span: int = 11, max_ring_diff: int | None = None) -> SinogramGeometry:
    """Non-arc-corrected output geometry for ``scanner`` at ``span``.

    Without ``max_ring_diff``: the largest STIR accepts for the span (``(span-1)/2 + k span``
    up to ``num_rings - 1``; 60 for the mMR at span 11). A span wider than the scanner is
    reduced to ``2 (num_rings - 1) + 1`` (all ring differences in segment 0).
    """
    nr = scanner.num_rings
    if span < 1 or span % 2 == 0:
        raise GeometryError(f"span must be a positive odd number, got {span}")
    if max_ring_diff is None:
        if span == 1:
            max_ring_diff = nr - 1
        else:
            half = (span - 1) // 2
            if half > nr - 1:
                span, half = 2 * (nr - 1) + 1, nr - 1
            max_ring_diff = half + span * ((nr - 1 - half) // span)
    return SinogramGeometry.from_span(scanner, span=span, max_ring_diff=max_ring_diff)


def detector_positions_mm(scanner: Scanner, ring, det) -> np.ndarray:
    """STIR gantry position (x, y, z) of detectors at the effective radius, shape ``ring.shape + (3,)``, mm.

    ``x = R sin psi``, ``y = -R cos psi``, ``psi = 2 pi det / n + view offset``, ``z = ring * ring spacing``
    (gantry z: 0 at the first ring), ``R`` = inner radius + average depth of interaction.
    """
    psi = 2 * math.pi * np.asarray(det, dtype=np.float64) / scanner.num_detectors_per_ring + math.radians(
        scanner.view_offset_deg
    )
    R = scanner.effective_ring_radius_mm
    zz = np.asarray(ring, dtype=np.float64) * scanner.ring_spacing_mm
    return np.stack(np.broadcast_arrays(R * np.sin(psi), -R * np.cos(psi), zz), axis=-1)


# ----------------------------------------------------------------------------- histogram
@njit(cache=True, nogil=True)
def _scatter_add(flat, out):
    for b in flat:
        out[b] += np.float32(1.0)


def _event_arrays(events: Sequence) -> np.ndarray:
    """(K, 2) int64 detection bins of a list of ``CoincidenceEvent``."""
    k = len(events)
    out = np.fromiter((b for e in events for b in e.detection_bins[:2]), dtype=np.int64, count=2 * k)
    return out.reshape(k, 2)


def _coincidences(matrix) -> list:
    """The type-(0, 0) list of a LowerTriangularMatrix of coincidence lists (empty when not stored)."""
    if matrix is None or len(matrix) == 0 or len(matrix[0]) == 0:
        return []
    return matrix[0][0]


@dataclass(frozen=True)
class PetsirdHistogramInfo:
    """What :func:`histogram_petsird` read and kept.

    Counts are coincidences; times are milliseconds since the acquisition start unless named
    ``_s``. ``time_blocks``: event time blocks read, ``time_blocks_kept`` those inside the
    interval, ``time_blocks_ordered`` whether their starts were in time order (reading stops at
    the first block at or after ``t1`` only then), ``other_time_blocks``: the non-event blocks
    by type (dead time, bed and gantry motion, external signals; ignored).
    """

    format: str
    petsird_header: Any  # petsird.Header
    petsird_scanner: PetsirdScanner
    sinogram_geometry: SinogramGeometry
    time_interval_s: tuple[float, float] | None
    prompts: int
    delayeds: int
    prompts_outside_geometry: int
    delayeds_outside_geometry: int
    time_blocks: int
    time_blocks_kept: int
    time_blocks_ordered: bool
    stopped_at_t1: bool
    other_time_blocks: dict[str, int]
    first_time_ms: int | None
    last_time_ms: int | None
    elapsed_s: float

    @property
    def scanner(self) -> Scanner:
        return self.petsird_scanner.scanner

    @property
    def events_per_s(self) -> float:
        return (self.prompts + self.delayeds) / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def to_metadata(self) -> dict[str, Any]:
        """Plain values for logs and JSON (the scanner and geometry described)."""
        skip = {"petsird_header", "petsird_scanner", "sinogram_geometry"}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**out, "model_name": self.petsird_scanner.model_name, "geometry": self.sinogram_geometry.describe(),
                "events_per_s": self.events_per_s}


def histogram_petsird(
    path: str | os.PathLike,
    geometry: SinogramGeometry | None = None,
    *,
    span: int = 11,
    time_interval_s: tuple[float, float] | None = None,
    store_delayeds: bool = True,
    chunk_events: int = 1 << 20,
    progress: bool = True,
    scanner_kwargs: dict | None = None,
) -> tuple[np.ndarray, np.ndarray | None, PetsirdHistogramInfo]:
    """Histogram a PETSIRD file's coincidences into SIRF-ordered sinograms ``(1, S, V, N)`` float32.

    Args:
        path: PETSIRD file (binary, or NDJSON).
        geometry: output sinogram geometry for the file's scanner (non-arc-corrected; any
            span, maximum ring difference, view mashing). Default: :func:`petsird_geometry`
            of the derived scanner at ``span``.
        span: axial compression of the default geometry.
        time_interval_s: ``(t0, t1)`` s since the acquisition start; time blocks whose
            start ``s`` has ``t0 <= s < t1`` are kept (None: all).
        store_delayeds: also histogram ``delayed_events`` (a separate sinogram).
        chunk_events: detection-bin pairs buffered before binning (memory bound).
        progress: tqdm progress bar over the file's bytes.
        scanner_kwargs: passed to :func:`scanner_from_petsird`.

    Returns:
        ``(prompts, delayeds, info)``; ``delayeds`` is None unless ``store_delayeds``.
        ``info`` (:class:`PetsirdHistogramInfo`) holds the counts kept and dropped, the time range read (reading stops at the
        first block starting at or after ``t1`` when the blocks are in time order), the
        scanner, and the numbers of non-event time blocks (ignored: dead time, bed and
        gantry motion, external signals).
    """
    t_start = time.perf_counter()
    p = Path(path)
    header, ps = read_petsird_header(p, **(scanner_kwargs or {}))
    geom = geometry if geometry is not None else petsird_geometry(ps.scanner, span)
    _check_output_scanner(p, geom, ps)
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    interval_ms = _interval_ms(time_interval_s)

    binner = _PairBinner(p, geom, ps, store_delayeds, chunk_events)
    scan = _read_event_blocks(p, binner, interval_ms, store_delayeds, progress)
    if interval_ms is not None and scan.kept_blocks == 0:
        rng = ("no event time blocks" if scan.first_ms is None
               else f"time blocks from {scan.first_ms / 1000:g} s to {scan.last_ms / 1000:g} s")
        raise ValueError(
            f"time interval [{interval_ms[0] / 1000:g}, {interval_ms[1] / 1000:g}) s lies outside the acquisition "
            f"in '{p}', which has {rng}"
        )
    for arr in (binner.prompts, binner.delayeds):
        if arr is not None and arr.size and arr.max() >= _FLOAT32_EXACT:
            raise PetsirdError(
                f"histogramming '{p}': a sinogram bin reached 2**24 counts, beyond which float32 counts are "
                "not exact; histogram shorter time intervals and add them"
            )
    elapsed = time.perf_counter() - t_start
    counts = binner.counts
    info = PetsirdHistogramInfo(
        format="PETSIRD " + (petsird_format(p) or "?"),
        petsird_header=header,
        petsird_scanner=ps,
        sinogram_geometry=geom,
        time_interval_s=None if interval_ms is None else (interval_ms[0] / 1000.0, interval_ms[1] / 1000.0),
        prompts=counts["prompts"],
        delayeds=counts["delayeds"],
        prompts_outside_geometry=counts["prompts_outside_geometry"],
        delayeds_outside_geometry=counts["delayeds_outside_geometry"],
        time_blocks=scan.blocks,
        time_blocks_kept=scan.kept_blocks,
        time_blocks_ordered=scan.ordered,
        stopped_at_t1=scan.stopped,
        other_time_blocks=dict(scan.other_blocks),
        first_time_ms=scan.first_ms,
        last_time_ms=scan.last_ms,
        elapsed_s=elapsed,
    )
    out_d = binner.delayeds.reshape(geom.shape) if binner.delayeds is not None else None
    return binner.prompts.reshape(geom.shape), out_d, info


def _check_output_scanner(path: Path, geom: SinogramGeometry, ps: PetsirdScanner) -> None:
    """The output geometry's scanner has the file's rings and detectors per ring (GeometryError otherwise)."""
    sc = geom.scanner
    if (sc.num_rings, sc.num_detectors_per_ring) != (ps.scanner.num_rings, ps.scanner.num_detectors_per_ring):
        raise GeometryError(
            f"histogramming '{path}': output geometry is for {sc.name} ({sc.num_rings} rings, "
            f"{sc.num_detectors_per_ring} detectors); the file's scanner has {ps.scanner.num_rings} rings, "
            f"{ps.scanner.num_detectors_per_ring} detectors"
        )


def _interval_ms(time_interval_s: tuple[float, float] | None) -> tuple[float, float] | None:
    """``(t0, t1)`` in ms from ``(t0, t1)`` in s, checked (finite, t0 < t1); None for None."""
    if time_interval_s is None:
        return None
    t0, t1 = (float(x) for x in time_interval_s)
    if not (math.isfinite(t0) and math.isfinite(t1)) or t1 <= t0:
        raise ValueError(f"time_interval_s must be (t0, t1) with t0 < t1, got {time_interval_s}")
    return t0 * 1000.0, t1 * 1000.0


class _PairBinner:
    """Accumulates coincidences (pairs of detection bins) into the flat prompt and delayed sinograms.

    Pairs are buffered per kind and binned ``chunk_events`` at a time: detection bin ``b`` is crystal
    ``b // num_energy_bins``, whose (ring, detector) give the sinogram bin
    (:func:`~sirf_fbsem.scanner_bins.bin_for_detector_pair`); pairs outside the geometry are counted
    in ``<kind>_outside_geometry``.
    """

    def __init__(self, path: Path, geom: SinogramGeometry, ps: PetsirdScanner, store_delayeds: bool,
                 chunk_events: int):
        nbins = geom.num_sinograms * geom.num_views * geom.num_tangential_poss
        self.path, self.geom, self.ps, self.chunk_events = path, geom, ps, chunk_events
        self.prompts = np.zeros(nbins, dtype=np.float32)
        self.delayeds = np.zeros(nbins, dtype=np.float32) if store_delayeds else None
        self.counts = {"prompts": 0, "delayeds": 0, "prompts_outside_geometry": 0, "delayeds_outside_geometry": 0}
        self._buffers: dict[str, list[np.ndarray]] = {"prompts": [], "delayeds": []}
        self._buffered = {"prompts": 0, "delayeds": 0}

    def add(self, kind: str, events: Sequence) -> None:
        """Buffer ``events`` (a block's coincidences) of ``kind`` ("prompts" or "delayeds")."""
        if not events:
            return
        self._buffers[kind].append(_event_arrays(events))
        self._buffered[kind] += len(events)
        if self._buffered[kind] >= self.chunk_events:
            self.flush(kind)

    def flush(self, kind: str) -> None:
        """Bin what is buffered of ``kind``."""
        if not self._buffers[kind]:
            return
        pairs = np.concatenate(self._buffers[kind])
        self._buffers[kind].clear()
        self._buffered[kind] = 0
        ps, n_en, n_total = self.ps, self.ps.num_energy_bins, self.ps.num_detection_bins
        if pairs.size and (pairs.min() < 0 or pairs.max() >= n_total):
            bad = pairs[(pairs < 0) | (pairs >= n_total)][0]
            raise PetsirdError(
                f"PETSIRD file '{self.path}': detection bin {int(bad)} outside [0, {n_total}) "
                f"({ps.num_crystals} crystals x {n_en} energy windows)"
            )
        c = pairs // n_en
        ring_of, det_of = ps.crystal_ring, ps.crystal_det
        flat = bin_for_detector_pair(self.geom, ring_of[c[:, 0]], det_of[c[:, 0]], ring_of[c[:, 1]], det_of[c[:, 1]])
        kept = flat[flat >= 0]
        self.counts[kind] += int(kept.size)
        self.counts[f"{kind}_outside_geometry"] += int(flat.size - kept.size)
        _scatter_add(kept, self.prompts if kind == "prompts" else self.delayeds)


@dataclass
class _BlockScan:
    """What reading the time blocks found: event blocks seen and kept, their time range (ms), whether
    their starts were in order, whether reading stopped at t1, and the other blocks by type."""

    blocks: int = 0
    kept_blocks: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    ordered: bool = True
    stopped: bool = False
    other_blocks: dict[str, int] = field(default_factory=dict)


def _read_event_blocks(path: Path, binner: _PairBinner, interval_ms: tuple[float, float] | None,
                       store_delayeds: bool, progress: bool) -> _BlockScan:
    """Feed every event time block whose start lies in ``interval_ms`` to ``binner`` (all without an
    interval); with time-ordered blocks, stop at the first block starting at or after t1."""
    event_block_type = _petsird().EventTimeBlock
    scan = _BlockScan()
    prev_start = -1
    size = path.stat().st_size
    bar = byte_progress(size, progress, f"histogram {path.name}")
    reader, fh = _open_reader(path)
    try:
        try:
            reader.read_header()
            stream = iter(reader.read_time_blocks())
            while True:
                try:
                    tb = next(stream)
                except StopIteration:
                    break
                if not isinstance(tb.value, event_block_type):
                    kind = type(tb.value).__name__
                    scan.other_blocks[kind] = scan.other_blocks.get(kind, 0) + 1
                    continue
                blk = tb.value
                start, stop = int(blk.time_interval.start), int(blk.time_interval.stop)
                scan.blocks += 1
                scan.first_ms = start if scan.first_ms is None else min(scan.first_ms, start)
                scan.last_ms = max(stop, start) if scan.last_ms is None else max(scan.last_ms, stop, start)
                scan.ordered = scan.ordered and start >= prev_start
                prev_start = start
                if interval_ms is not None and not (interval_ms[0] <= start < interval_ms[1]):
                    if scan.ordered and start >= interval_ms[1] and scan.kept_blocks:
                        scan.stopped = True  # time-ordered blocks: nothing later can be inside [t0, t1)
                        break
                    continue
                scan.kept_blocks += 1
                binner.add("prompts", _coincidences(blk.prompt_events))
                if store_delayeds:
                    binner.add("delayeds", _coincidences(blk.delayed_events))
                if bar is not None and scan.blocks % 64 == 0:
                    bar.update(max(0, min(size, fh.tell()) - bar.n))
        except PetsirdError:
            raise
        except Exception as exc:  # noqa: BLE001 - EOF or decode errors inside a damaged stream
            raise PetsirdError(
                f"PETSIRD file '{path}' is damaged or truncated after {scan.blocks} event time blocks "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        binner.flush("prompts")
        if store_delayeds:
            binner.flush("delayeds")
    finally:
        _close(reader, fh)
        if bar is not None:
            bar.close()
    return scan


def _close(reader, fh) -> None:
    try:
        reader.close()
    except Exception:  # noqa: BLE001 - closing a partly read or damaged stream
        pass
    fh.close()


# ----------------------------------------------------------------------------- writer
@dataclass
class PetsirdTimeBlock:
    """Events of one time block for :func:`write_petsird`.

    ``prompts`` / ``delayeds``: int arrays ``(K, 4)`` of ``(ring1, det1, ring2, det2)``
    (STIR numbering of the scanner); ``start_ms`` / ``stop_ms``: the block's interval.
    """

    start_ms: int
    stop_ms: int
    prompts: np.ndarray
    delayeds: np.ndarray | None = None


def write_petsird(
    path: str | os.PathLike,
    scanner: Scanner,
    time_blocks: Iterable[PetsirdTimeBlock],
    *,
    num_energy_bins: int = 1,
    num_tof_bins: int = 1,
    crystal_depth_mm: float | None = None,
    module_order: Sequence[int] | None = None,
    ndjson: bool = False,
    model_name: str | None = None,
    crystal_radius_jitter_mm: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a PETSIRD file of ``scanner`` with petsird's own writer; returns the path.

    Geometry: one module type; one module per transaxial detector ``d`` (a column of
    ``num_rings`` crystals), placed by rotating about z so that ring ``r``'s crystal centre is
    STIR's detector ``(r, d)`` at the effective radius. Crystals are ``depth x w x ring spacing``
    boxes with ``w = 2 R_inner tan(pi / n)``, inner face at the inner radius and, by default,
    depth = 2 x the scanner's average depth of interaction (the reader's default DOI is half
    the depth, so the scanner reads back unchanged). ``module_order`` permutes the modules
    (module ``m`` holds detector ``module_order[m]``), so readers cannot rely on numbering.
    ``crystal_radius_jitter_mm`` moves crystals radially at random (to make a scanner that is
    not a regular cylinder). Events: detection bins with energy windows cycling over
    ``num_energy_bins`` and TOF index cycling over ``num_tof_bins``; each pair is ordered
    (first bin >= second) as PETSIRD requires.
    """
    petsird = _petsird()
    n, nr = scanner.num_detectors_per_ring, scanner.num_rings
    depth = 2.0 * scanner.average_depth_of_interaction_mm if crystal_depth_mm is None else float(crystal_depth_mm)
    if not depth > 0:
        raise ValueError(f"crystal depth must be > 0 mm, got {depth}")
    # the reader's DOI is depth/2 from the inner face: shift the face so that the crystal centre sits at R_eff
    inner = scanner.effective_ring_radius_mm - depth / 2.0
    width = 2.0 * scanner.inner_ring_radius_mm * math.tan(math.pi / n)
    dz = scanner.ring_spacing_mm
    order = np.arange(n) if module_order is None else np.asarray(module_order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"module_order must be a permutation of range({n})")
    rng = np.random.default_rng(seed)

    def coord(x, y, z):
        return petsird.Coordinate(c=np.array([x, y, z], dtype=np.float32))

    box = petsird.BoxShape(corners=[coord(0, 0, 0), coord(0, 0, dz), coord(0, width, dz), coord(0, width, 0),
                                    coord(depth, 0, 0), coord(depth, 0, dz), coord(depth, width, dz),
                                    coord(depth, width, 0)])
    crystal = petsird.BoxSolidVolume(shape=box, material_id=0)
    z_centre = (nr - 1) * dz / 2.0
    el_transforms = []
    for r in range(nr):
        jitter = float(rng.uniform(-1, 1) * crystal_radius_jitter_mm)
        m = np.array([[1, 0, 0, inner + jitter], [0, 1, 0, -width / 2], [0, 0, 1, r * dz - z_centre - dz / 2]],
                     dtype=np.float32)
        el_transforms.append(petsird.RigidTransformation(matrix=m))
    module = petsird.DetectorModule(detecting_elements=petsird.ReplicatedBoxSolidVolume(
        object=crystal, transforms=el_transforms))
    mod_transforms = []
    tilt = math.radians(scanner.view_offset_deg)
    for d in order:
        # the unrotated crystal points along +x, STIR angle pi/2: rotate by psi_d - pi/2 about z
        a = 2 * math.pi * int(d) / n + tilt - math.pi / 2
        m = np.array([[math.cos(a), -math.sin(a), 0, 0], [math.sin(a), math.cos(a), 0, 0], [0, 0, 1, 0]],
                     dtype=np.float32)
        mod_transforms.append(petsird.RigidTransformation(matrix=m))
    rep = petsird.ReplicatedDetectorModule(object=module, transforms=mod_transforms)
    info = petsird.ScannerInformation(
        model_name=model_name if model_name is not None else scanner.name,
        scanner_geometry=petsird.ScannerGeometry(replicated_modules=[rep]),
    )
    r_max = 2 * scanner.effective_ring_radius_mm
    info.tof_bin_edges = [[petsird.BinEdges(edges=np.linspace(-r_max, r_max, num_tof_bins + 1, dtype=np.float32))]]
    info.tof_resolution = [[float(2 * r_max)]]
    info.event_energy_bin_edges = [petsird.BinEdges(edges=np.linspace(430, 650, num_energy_bins + 1,
                                                                       dtype=np.float32))]
    info.energy_resolution_at_511 = [0.12]
    info.prompt_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
    info.delayed_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
    info.detection_efficiencies = petsird.DetectionEfficiencies(calibration_factor=1.0)
    header = petsird.Header(scanner=info)
    module_of_det = np.empty(n, dtype=np.int64)
    module_of_det[order] = np.arange(n)

    def events(pairs: np.ndarray | None) -> list:
        if pairs is None:
            return []
        a = np.asarray(pairs, dtype=np.int64).reshape(-1, 4)
        if a.size and (a[:, [0, 2]].min() < 0 or a[:, [0, 2]].max() >= nr or a[:, [1, 3]].min() < 0
                       or a[:, [1, 3]].max() >= n):
            raise ValueError(f"event rings must lie in [0, {nr}) and detectors in [0, {n})")
        k = np.arange(a.shape[0])
        b1 = (module_of_det[a[:, 1]] * nr + a[:, 0]) * num_energy_bins + k % num_energy_bins
        b2 = (module_of_det[a[:, 3]] * nr + a[:, 2]) * num_energy_bins + (k // num_energy_bins) % num_energy_bins
        hi, lo = np.maximum(b1, b2), np.minimum(b1, b2)
        return [petsird.CoincidenceEvent(detection_bins=[int(x), int(y)], tof_idx=int(i % num_tof_bins))
                for i, (x, y) in enumerate(zip(hi, lo))]

    def blocks() -> Iterator:
        for tb in time_blocks:
            yield petsird.TimeBlock.EventTimeBlock(petsird.EventTimeBlock(
                time_interval=petsird.TimeInterval(start=int(tb.start_ms), stop=int(tb.stop_ms)),
                prompt_events=[[events(tb.prompts)]],
                delayed_events=[[events(tb.delayeds)]] if tb.delayeds is not None else [],
            ))

    out = Path(path)
    tmp = out.with_name(out.name + ".part")
    try:
        if ndjson:
            with petsird.NDJsonPETSIRDWriter(str(tmp)) as w:
                w.write_header(header)
                w.write_time_blocks(blocks())
        else:
            with petsird.BinaryPETSIRDWriter(str(tmp)) as w:
                w.write_header(header)
                w.write_time_blocks(blocks())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
