"""Siemens mMR ECAT8 component-based normalisation (``norm.n`` + ``norm.n.hdr``), as STIR computes it.

This follows STIR's ``BinNormalisationFromECAT8`` (``src/recon_buildblock/BinNormalisationFromECAT8.cxx``,
STIR 6) and returns its *bin efficiencies*: the multiplicative factor from true to
measured counts, ``measured = efficiency x true``. STIR stores these efficiencies
(not their inverse): ``BinNormalisation::apply`` divides data by them and ``undo``
multiplies, and SIRF's ``AcquisitionSensitivityModel(norm_file)`` multiplies in the
forward model. They are therefore what the projector's multiplicative term needs.

Components read (``read_norm_data``; float32 little endian, at the header's offsets)
------------------------------------------------------------------------------------
1. geometric effects ``g[ring1+ring2, t]``, 127 x 344 ("sinogram planes" x bins);
2. crystal interference ``c[t, v % 9]``, 344 x 9;
3. crystal efficiencies ``e[ring, crystal]``, 64 x 504. For the mMR STIR shifts them
   by one crystal (``e[r, c] = e_file[r, c-1]``, cyclically: "probably because of
   where the gap is inserted") and then sets the gap crystals to 0
   (``use_gaps``: crystal ``c`` with ``c % 9 == 0``; 9 = transaxial crystals per
   block including the one virtual crystal);
4. axial effects ``a[i]``, one per sinogram of the norm's own span-11 layout (837
   for max ring difference 60), in the ECAT segment order 0, -1, +1, ...
   (``construct_sino_lookup_table`` with ``ecat::find_segment_sequence``); ring
   pairs beyond that layout (|ring difference| > 60) use 1.
Components 5-8 (dead-time parameters, additional axial effects) are not used by
STIR (dead time needs singles rates; ``use_dead_time`` is off) and are ignored here.

Bin efficiency (``get_uncalibrated_bin_efficiency``)
----------------------------------------------------
For output bin (segment, axial a, view v, tangential t) of a geometry with view
mash factor ``m``::

    eff = sum_{u = v m}^{v m + m - 1} c[t, u % 9] *
          sum_{(r1, r2) in bin} e[r1, d1(u, t)] e[r2, d2(u, t)] g[r1 + r2, t] / a[idx(r1, r2)]

where the ring pairs of the bin all share ``r1 + r2`` (STIR's
``calc_ring1_plus_ring2``) and have ring differences ``r2 - r1`` of the segment with
the same parity, and ``(d1, d2)`` is STIR's detector pair of (u, t)
(:func:`~sirf_fbsem.scanner_bins.det_pair_for_view_tangential`). For span 11 this is
STIR's sum over the ring pairs combined into a sinogram. STIR's
``BinNormalisationWithCalibration`` then divides by ``calibration factor x
branching ratio``; ECAT8 sets the calibration factor to 1 and the branching ratio is
1 unless the data carry a radionuclide, so that global factor is left out here.
(STIR 6 accumulates ``view_efficiency`` across mashed views without resetting it;
for mashed geometries this module uses the plain sum above, identical for m = 1.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from numba import njit, prange

from ..errors import InputFileNotFoundError
from ..geometry import GeometryError, Scanner, SinogramGeometry
from ..scanner_bins import det_pair_for_view_tangential
from .header_keys import (
    ListmodeError,
    get_int,
    parse_int_list,
    parse_interfile_keys,
    resolve_data_file,
    scanner_from_keys,
)

__all__ = ["ECAT8Norm", "read_ecat8_norm", "NormError"]

#: mMR transaxial crystals per block (8 physical + 1 virtual gap crystal), STIR's Scanner
_CRYSTALS_PER_BLOCK = 9
_VIRTUAL_CRYSTALS_PER_BLOCK = 1


class NormError(ListmodeError):
    """An ECAT8 normalisation file that cannot be read."""


@dataclass(frozen=True)
class ECAT8Norm:
    """The components of an ECAT8 normalisation, after STIR's mMR crystal shift and gap zeroing.

    Arrays: ``geometric`` (2 rings - 1, T) indexed ``[ring1 + ring2, t + T//2]``;
    ``interference`` (T, 9) ``[t + T//2, view % 9]``; ``crystal_efficiencies``
    (rings, detectors) ``[ring, crystal]``; ``axial_effects`` (num norm sinograms,), one per
    sinogram of the norm's own layout (``norm_span``, ``norm_max_ring_diff``) in ECAT order.
    """

    header_path: Path
    data_path: Path
    scanner: Scanner
    geometric: np.ndarray
    interference: np.ndarray
    crystal_efficiencies: np.ndarray
    axial_effects: np.ndarray
    norm_span: int
    norm_max_ring_diff: int
    keys: Mapping[str, str] = field(repr=False, default_factory=dict)

    @property
    def num_tangential_poss(self) -> int:
        return int(self.geometric.shape[1])

    def gap_crystals(self) -> np.ndarray:
        """Crystal indices (in a ring) that are gaps: ``c % 9 == 0`` after STIR's shift."""
        n = self.scanner.num_detectors_per_ring
        return np.arange(0, n, _CRYSTALS_PER_BLOCK)

    def axial_effects_table(self) -> np.ndarray:
        """``idx[ring1, ring2]`` into :attr:`axial_effects` (-1 where not given), as STIR's sino_index."""
        nr = self.scanner.num_rings
        idx = np.full((nr, nr), -1, dtype=np.int64)
        layout = SinogramGeometry.from_span(self.scanner, self.norm_span, self.norm_max_ring_diff)
        segs = {s.segment_num: s for s in layout.segments}
        order = [0]
        for k in range(1, max(segs) + 1):
            order += [-k, k]
        i = 0
        for k in order:
            seg = segs[k]
            inc = seg.axial_poss_per_ring_inc
            for a in range(seg.num_axial_poss):
                rsum = (2 * a - (seg.num_axial_poss - 1)) // inc + nr - 1
                for d in range(seg.min_ring_diff, seg.max_ring_diff + 1):
                    if (rsum + d) % 2:
                        continue
                    r1, r2 = (rsum - d) // 2, (rsum + d) // 2
                    if 0 <= r1 < nr and 0 <= r2 < nr:
                        idx[r1, r2] = i
                i += 1
        if i != self.axial_effects.size:
            raise NormError(
                f"normalisation '{self.header_path}': {self.axial_effects.size} axial effects, but span "
                f"{self.norm_span} / max ring difference {self.norm_max_ring_diff} has {i} sinograms"
            )
        return idx

    def efficiency_sinogram(
        self,
        geometry: SinogramGeometry,
        use_geometric: bool = True,
        use_interference: bool = True,
        use_crystal_efficiencies: bool = True,
        use_axial_effects: bool = True,
    ) -> np.ndarray:
        """Bin efficiencies (measured = factor x true) as a float32 ``(1, S, V, N)`` SIRF-ordered array.

        Finite, positive where both detectors exist, 0 for LORs through a gap crystal.
        """
        sc = self.scanner
        g = geometry.scanner
        if g.num_rings != sc.num_rings or g.num_detectors_per_ring != sc.num_detectors_per_ring:
            raise GeometryError(
                f"normalisation '{self.header_path}' is for {sc.name} ({sc.num_rings} rings, "
                f"{sc.num_detectors_per_ring} detectors); the geometry is for {g.name}"
            )
        if geometry.arc_corrected:
            raise GeometryError("ECAT8 normalisation applies to non-arc-corrected sinograms only")
        n_det = sc.num_detectors_per_ring
        if (n_det // 2) % geometry.num_views:
            raise GeometryError(f"{geometry.num_views} views do not divide the {n_det // 2} detector views")
        mash = n_det // 2 // geometry.num_views
        T = self.num_tangential_poss
        t = geometry.tangential_pos_nums()
        if t[0] < -(T // 2) or t[-1] > T - T // 2 - 1:
            raise GeometryError(
                f"geometry has tangential positions {t[0]}..{t[-1]}; normalisation '{self.header_path}' "
                f"covers {-(T // 2)}..{T - T // 2 - 1}"
            )
        t_idx = t + T // 2
        u = np.arange(n_det // 2)
        d1, d2 = det_pair_for_view_tangential(u[:, None], t[None, :], n_det)  # (views, N)

        # ring pairs of every SIRF row, sharing ring1 + ring2
        nr = sc.num_rings
        ax_idx = self.axial_effects_table()
        seg_of_row, ax_of_row = geometry.sinogram_index_table()
        row_ptr = [0]
        r1s, r2s, wts = [], [], []
        rsums = np.empty(seg_of_row.size, dtype=np.int64)
        for row, (k, a) in enumerate(zip(seg_of_row, ax_of_row)):
            seg = geometry.segment(int(k))
            inc = seg.axial_poss_per_ring_inc
            rsum = (2 * int(a) - (seg.num_axial_poss - 1)) // inc + nr - 1
            rsums[row] = rsum
            for d in range(seg.min_ring_diff, seg.max_ring_diff + 1):
                if (rsum + d) % 2:
                    continue
                r1, r2 = (rsum - d) // 2, (rsum + d) // 2
                if 0 <= r1 < nr and 0 <= r2 < nr:
                    r1s.append(r1)
                    r2s.append(r2)
                    i = ax_idx[r1, r2]
                    w = 1.0 / float(self.axial_effects[i]) if (use_axial_effects and i >= 0) else 1.0
                    wts.append(w)
            row_ptr.append(len(r1s))
        if not np.all((rsums >= 0) & (rsums <= 2 * nr - 2)):
            raise GeometryError("geometry has axial positions outside the scanner's rings")

        # without crystal efficiencies STIR has no gaps either (they live in the efficiencies)
        eff = self.crystal_efficiencies if use_crystal_efficiencies else np.ones_like(self.crystal_efficiencies)
        geo = self.geometric[:, t_idx] if use_geometric else np.ones((2 * nr - 1, t.size), np.float32)
        ci = self.interference[t_idx, :] if use_interference else np.ones((t.size, _CRYSTALS_PER_BLOCK), np.float32)
        out = np.zeros(geometry.shape, dtype=np.float32)
        _efficiency_kernel(
            np.asarray(row_ptr, np.int64), np.asarray(r1s, np.int64), np.asarray(r2s, np.int64),
            np.asarray(wts, np.float64), rsums, np.ascontiguousarray(eff, np.float64),
            np.ascontiguousarray(geo, np.float64), np.ascontiguousarray(ci, np.float64),
            d1.astype(np.int64), d2.astype(np.int64), mash, _CRYSTALS_PER_BLOCK, out[0],
        )
        return out


@njit(parallel=True, cache=True)
def _efficiency_kernel(row_ptr, r1s, r2s, wts, rsums, eff, geo, ci, d1, d2, mash, cpb, out):
    S, V, N = out.shape
    for row in prange(S):
        rsum = rsums[row]
        for v in range(V):
            for t in range(N):
                total = 0.0
                for u in range(v * mash, v * mash + mash):
                    a = d1[u, t]
                    b = d2[u, t]
                    lor = 0.0
                    for k in range(row_ptr[row], row_ptr[row + 1]):
                        lor += eff[r1s[k], a] * eff[r2s[k], b] * wts[k]
                    total += lor * ci[t, u % cpb]
                out[row, v, t] = total * geo[rsum, t]


def _component_matrix(keys: Mapping[str, str], i: int, path: Path) -> tuple[int, list[int]]:
    off_key, size_key = f"data offset in bytes [{i}]", f"matrix size [{i}]"
    if off_key not in keys or size_key not in keys:
        raise NormError(f"normalisation header '{path}': missing key '{off_key}' or '{size_key}'")
    try:
        offset, sizes = get_int(keys, off_key, path), parse_int_list(keys[size_key])
    except (ValueError, ListmodeError):
        raise NormError(
            f"normalisation header '{path}': cannot read '{off_key}' = {keys[off_key]!r} / "
            f"'{size_key}' = {keys[size_key]!r}"
        ) from None
    if offset < 0 or offset % 4:
        raise NormError(f"normalisation header '{path}': '{off_key}' = {offset}; expected a multiple of 4 >= 0 "
                        "(the components are 4-byte floats)")
    return offset, sizes


def read_ecat8_norm(path: str | os.PathLike) -> ECAT8Norm:
    """Read an ECAT8 normalisation from its header (``norm.n.hdr``) or data file (``norm.n``, header beside it).

    Errors (:class:`NormError`; :class:`~sirf_fbsem.errors.InputFileNotFoundError` for a missing
    file) name the file and the field.
    """
    p = Path(path)
    if p.suffix.lower() != ".hdr":
        cand = p.with_name(p.name + ".hdr")
        if not cand.is_file():
            raise InputFileNotFoundError(f"ECAT8 normalisation header '{cand}' (for '{p}') does not exist", cand)
        p = cand
    if not p.is_file():
        raise InputFileNotFoundError(f"ECAT8 normalisation header '{p}' does not exist", p)
    try:
        return _read_ecat8_norm(p)
    except NormError:
        raise
    except ListmodeError as exc:  # the shared PETLINK header helpers: a norm's error all the same
        raise NormError(str(exc)) from exc


def _read_ecat8_norm(p: Path) -> ECAT8Norm:
    keys = parse_interfile_keys(p)
    scanner = scanner_from_keys(keys, p)
    data = resolve_data_file(p, keys)
    order = keys.get("image data byte order", "LITTLEENDIAN").replace(" ", "").upper()
    if order != "LITTLEENDIAN":
        raise NormError(f"normalisation header '{p}': 'image data byte order' is {order!r}; expected LITTLEENDIAN")
    if keys.get("number format", "float").strip().lower() != "float" or get_int(
            keys, "number of bytes per pixel", p, default=4) != 4:
        raise NormError(f"normalisation header '{p}': 'number format' must be 4-byte float")
    ncomp = get_int(keys, "number of normalization components", p)
    if ncomp < 4:
        raise NormError(f"normalisation header '{p}': 'number of normalization components' is {ncomp}; need >= 4")
    nr, nd = scanner.num_rings, scanner.num_detectors_per_ring
    (o1, s1), (o2, s2), (o3, s3), (o4, s4) = (_component_matrix(keys, i, p) for i in (1, 2, 3, 4))
    T = s1[0] if s1 else 0
    expected = {1: [T, 2 * nr - 1], 2: [_CRYSTALS_PER_BLOCK, T], 3: [nd, nr]}
    for i, s in ((1, s1), (2, s2), (3, s3)):
        if s != expected[i]:
            raise NormError(f"normalisation header '{p}': 'matrix size [{i}]' is {s}; expected {expected[i]}")
    if len(s4) != 1 or s4[0] < 1:
        raise NormError(f"normalisation header '{p}': 'matrix size [4]' is {s4}; expected one number >= 1")
    if T < 1:
        raise NormError(f"normalisation header '{p}': 'matrix size [1]' is {s1}; expected [bins >= 1, {2 * nr - 1}]")
    size = data.stat().st_size
    counts = {1: (2 * nr - 1) * T, 2: T * _CRYSTALS_PER_BLOCK, 3: nr * nd, 4: s4[0]}
    for i, off in ((1, o1), (2, o2), (3, o3), (4, o4)):  # every component inside the file, before reading it
        end = off + 4 * counts[i]
        if size < end:
            raise NormError(
                f"normalisation data '{data}' has {size:,} bytes (truncated?); component [{i}] of header '{p}' "
                f"('data offset in bytes [{i}]' = {off:,}, 'matrix size [{i}]') needs at least {end:,}"
            )
    raw = np.fromfile(data, dtype="<f4", count=size // 4)

    def comp(off: int, n: int, i: int) -> np.ndarray:
        return raw[off // 4: off // 4 + n].astype(np.float32)

    geometric = comp(o1, (2 * nr - 1) * T, 1).reshape(2 * nr - 1, T)
    interference = comp(o2, T * _CRYSTALS_PER_BLOCK, 2).reshape(T, _CRYSTALS_PER_BLOCK)
    eff = comp(o3, nr * nd, 3).reshape(nr, nd)
    axial = comp(o4, s4[0], 4)
    # STIR, for the mMR only: shift the crystal efficiencies by one crystal, then zero the gaps
    eff = np.roll(eff, 1, axis=1)
    for inc in range(_VIRTUAL_CRYSTALS_PER_BLOCK):
        eff[:, inc::_CRYSTALS_PER_BLOCK] = 0.0
    for name, arr, i in (("geometric effects", geometric, 1), ("crystal interference", interference, 2),
                         ("crystal efficiencies", eff, 3), ("axial effects", axial, 4)):
        if not np.all(np.isfinite(arr)):
            raise NormError(f"normalisation '{data}': component [{i}] ({name}) has non-finite values")
    if np.any(axial <= 0):
        raise NormError(f"normalisation '{data}': component [4] (axial effects) has values <= 0")
    span = get_int(keys, "axial compression", p, default=11)
    mrd = get_int(keys, "maximum ring difference", p, default=nr - 1)
    norm = ECAT8Norm(
        header_path=p, data_path=data, scanner=scanner, geometric=geometric, interference=interference,
        crystal_efficiencies=eff, axial_effects=axial, norm_span=span, norm_max_ring_diff=mrd, keys=dict(keys),
    )
    try:
        norm.axial_effects_table()  # checks the number of axial effects against the layout
    except GeometryError as exc:
        raise NormError(f"normalisation header '{p}': '%axial compression' = {span} with '%maximum ring difference' "
                        f"= {mrd} is not a sinogram layout of the {scanner.name}: {exc}") from None
    return norm
