"""STIR's detector-pair <-> sinogram-bin geometry of cylindrical scanners (non-arc-corrected).

The maps between a pair of detectors ``(ring1, det1, ring2, det2)`` and a bin of a SIRF
sinogram, as STIR's ``ProjDataInfoCylindricalNoArcCorr`` computes them (sources cited per
function). The listmode readers (:mod:`sirf_fbsem.io.listmode`, :mod:`sirf_fbsem.io.petsird`),
the randoms and normalisation models and the writers bin events and factors with them.
"""
from __future__ import annotations

import numpy as np

from .geometry import GeometryError, SinogramGeometry

__all__ = [
    "span1_ring_pair",
    "det_pair_for_view_tangential",
    "sinogram_row_for_ring_pair",
    "view_tangential_for_det_pair",
    "bin_for_detector_pair",
]


def span1_ring_pair(segment, axial) -> tuple[np.ndarray, np.ndarray]:
    """(ring1, ring2) of span-1 bins, as STIR's ``get_ring_pair_for_segment_axial_pos_num``.

    ``ring1 + ring2 = 2 axial + |d|``; ``ring1 = (sum - d)/2``; ``ring2 = (sum + d)/2``.
    """
    d = np.asarray(segment, dtype=np.int64)
    a = np.asarray(axial, dtype=np.int64)
    s = 2 * a + np.abs(d)
    return (s - d) // 2, (s + d) // 2


def det_pair_for_view_tangential(view, tangential_pos_num, num_detectors: int) -> tuple[np.ndarray, np.ndarray]:
    """Detector pair of an unmashed non-arc-corrected (view, tangential_pos_num), as STIR's
    ``ProjDataInfoCylindricalNoArcCorr::initialise_uncompressed_view_tangpos_to_det1det2``:
    ``det1 = (v + (t >> 1)) mod n``, ``det2 = (v - ((t + 1) >> 1) + n/2) mod n``."""
    v = np.asarray(view, dtype=np.int64)
    t = np.asarray(tangential_pos_num, dtype=np.int64)
    n = int(num_detectors)
    det1 = (v + (t >> 1) + n) % n
    det2 = (v - ((t + 1) >> 1) + n // 2) % n
    return det1, det2


def sinogram_row_for_ring_pair(geometry: SinogramGeometry, ring1, ring2) -> np.ndarray:
    """SIRF sinogram row of ring pairs ``(ring1, ring2)`` (-1 where the geometry drops them); int64, broadcast shape.

    STIR's ``get_segment_axial_pos_num_for_ring_pair``: the segment whose ring-difference
    range holds ``ring2 - ring1``, and ``axial = (ring1 + ring2 - ax_pos_num_offset) * inc / 2``
    with ``ax_pos_num_offset = (num_rings - 1) - 2 m_offset / ring_spacing`` and ``inc`` = 2 for
    segments combining several ring differences (span > 1), else 1. Rings outside
    ``[0, num_rings)`` give -1.
    """
    r1, r2 = np.broadcast_arrays(np.asarray(ring1, dtype=np.int64), np.asarray(ring2, dtype=np.int64))
    diff = r2 - r1
    rsum = r1 + r2
    rows = np.full(r1.shape, -1, dtype=np.int64)
    nr = geometry.scanner.num_rings
    valid = (r1 >= 0) & (r1 < nr) & (r2 >= 0) & (r2 < nr)
    for seg in geometry.segments:
        inc = seg.axial_poss_per_ring_inc
        # STIR: ax_pos_num_offset = (num_rings-1) - 2*m_offset/ring_spacing, m_offset = (n_ax-1)*ring_spacing/inc/2
        twice_off = 2 * (nr - 1) * inc - 2 * (seg.num_axial_poss - 1)
        if twice_off % (2 * inc) != 0:
            raise GeometryError(
                f"segment {seg.segment_num} of the output geometry has {seg.num_axial_poss} axial positions, "
                "which do not lie between physical rings (STIR refuses such data)"
            )
        ax_off = twice_off // (2 * inc)
        sel = valid & (diff >= seg.min_ring_diff) & (diff <= seg.max_ring_diff)
        axial = (rsum[sel] - ax_off) * inc // 2
        ok = (axial >= 0) & (axial < seg.num_axial_poss)
        r = np.full(axial.shape, -1, dtype=np.int64)
        r[ok] = geometry.sirf_row_offset(seg.segment_num) + axial[ok]
        rows[sel] = r
    return rows


def view_tangential_for_det_pair(det1, det2, num_detectors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unmashed ``(view, tangential_pos_num, swapped)`` of detector pairs, as STIR's
    ``ProjDataInfoCylindricalNoArcCorr::initialise_det1det2_to_uncompressed_view_tangpos``.

    The inverse of :func:`det_pair_for_view_tangential`: ``t = (det1 - det2 + 3n/2) mod n``,
    ``v = (det1 - (t >> 1)) mod n``, then folded into ``0 <= v < n/2``, ``-n/2 <= t < n/2``;
    ``swapped`` is True where the fold exchanged the detectors (the rings must then be
    exchanged too, as in STIR's ``get_bin_for_det_pair``). ``det1 == det2`` is no LOR:
    its view is returned as -1.
    """
    d1 = np.asarray(det1, dtype=np.int64)
    d2 = np.asarray(det2, dtype=np.int64)
    n = int(num_detectors)
    if n % 2:
        raise GeometryError(f"STIR's detector-pair sinogram needs an even number of detectors per ring, got {n}")
    half = n // 2
    t = (d1 - d2 + 3 * half) % n
    v = (d1 - (t >> 1) + n) % n
    low_view = v < half
    big_t = t >= half
    t_out = np.where(low_view, np.where(big_t, n - t, t), np.where(big_t, t - n, -t))
    v_out = np.where(low_view, v, v - half)
    swapped = np.where(low_view, big_t, ~big_t)
    v_out = np.where(d1 == d2, -1, v_out)
    return v_out, t_out, swapped


def bin_for_detector_pair(geometry: SinogramGeometry, ring1, det1, ring2, det2) -> np.ndarray:
    """Flat SIRF bin ``(row * V + view) * N + tangential index`` of detector pairs; -1 where the geometry drops them.

    STIR's ``get_bin_for_det_pair`` on a non-arc-corrected geometry (any span, maximum
    ring difference, view mashing): detectors -> unmashed (view, tangential position,
    swap) by :func:`view_tangential_for_det_pair`, rings (exchanged when swapped) ->
    sinogram row by :func:`sinogram_row_for_ring_pair`, view divided by the mash factor,
    and tangential positions outside the geometry's range dropped (as ``lm_to_projdata``).
    The flat index addresses ``prompts.reshape(-1)`` of a ``(1, S, V, N)`` SIRF array.
    Symmetric: ``(ring1, det1, ring2, det2)`` and ``(ring2, det2, ring1, det1)`` give the same bin.
    """
    if geometry.arc_corrected:
        raise GeometryError("detector pairs map to bins of non-arc-corrected geometries only")
    n = geometry.scanner.num_detectors_per_ring
    d1, d2 = np.asarray(det1, dtype=np.int64), np.asarray(det2, dtype=np.int64)
    if np.any((d1 < 0) | (d1 >= n) | (d2 < 0) | (d2 >= n)):
        raise GeometryError(f"detector numbers must lie in [0, {n})")
    v, t, swapped = view_tangential_for_det_pair(d1, d2, n)
    r1, r2 = np.asarray(ring1, dtype=np.int64), np.asarray(ring2, dtype=np.int64)
    row = sinogram_row_for_ring_pair(geometry, np.where(swapped, r2, r1), np.where(swapped, r1, r2))
    mash = geometry.view_mash_factor
    if (n // 2) % geometry.num_views != 0:
        raise GeometryError(f"{geometry.num_views} views do not divide the {n // 2} detector-pair views")
    tidx = t - int(geometry.tangential_pos_nums()[0])
    V, N = geometry.num_views, geometry.num_tangential_poss
    ok = (row >= 0) & (v >= 0) & (tidx >= 0) & (tidx < N)
    flat = (row * V + np.maximum(v, 0) // mash) * N + tidx
    return np.where(ok, flat, -1).astype(np.int64)
