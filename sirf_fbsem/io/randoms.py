"""Randoms estimates from delayed coincidences, and the additive term of the forward model.

The delayed-window sinogram ``D`` of a listmode acquisition (see
:func:`sirf_fbsem.io.listmode.histogram_listmode`) is an unbiased but noisy
(Poisson) estimate of the randoms in the prompt window. Two estimates are offered:

* ``smooth=False``: ``R = D`` itself.
* ``smooth=True`` (default): a fan-sum ("randoms from singles") estimate per
  sinogram. In each sinogram row (one segment and axial position: fixed ring
  pairs) the delayeds of bin ``(v, t)`` with detector pair ``(i, j)`` (STIR's
  ``det1, det2`` of the view and tangential position,
  :func:`~sirf_fbsem.scanner_bins.det_pair_for_view_tangential`) are modelled as
  ``D_ij ~ Poisson(s_i s_j)`` with one "singles" factor ``s`` per transaxial
  crystal. The maximum-likelihood ``s`` solves ``s_i = F_i / sum_{j in fan(i)} s_j``
  with ``F_i`` the fan sum of crystal ``i`` (the delayeds of all bins it takes part
  in); the damped fixed-point iteration ``s <- sqrt(s F / sum_j s_j)`` from ``s = sqrt(F)``
  converges in a few iterations (this is the
  equation STIR's ``find_ML_singles_from_delayed`` solves on 3D fan sums; here it is
  solved per sinogram row, which needs no span-1 data). Then ``R_ij = s_i s_j``,
  rescaled so that every sinogram keeps exactly its delayed counts. Crystals with no
  delayeds (the mMR's gap crystals) get ``s = 0`` and hence zero randoms.
  The estimate has far lower variance than ``D``; it is unbiased where the
  product model holds (randoms rate proportional to the product of the singles
  rates, the standard 2 tau S_i S_j model).

``additive_term(randoms, scatter)`` returns ``randoms + scatter``: the background
``b`` in ``y ~ Poisson(A x + b)``, in counts per bin of the measured sinogram (not
normalisation-corrected).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..errors import InputError
from ..geometry import GeometryError, SinogramGeometry
from ..scanner_bins import det_pair_for_view_tangential

__all__ = ["randoms_from_delayeds", "additive_term"]


def _check_sinogram(arr, geometry: SinogramGeometry, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if tuple(a.shape) != tuple(geometry.shape):
        raise GeometryError(f"{what} has shape {tuple(a.shape)}; the geometry expects {geometry.shape} (1, S, V, N)")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what} has non-finite values")
    if np.any(a < 0):
        raise InputError(f"{what} has negative values; counts must be >= 0")
    return a


def randoms_from_delayeds(
    delayeds: np.ndarray, geometry: SinogramGeometry, smooth: bool = True, iterations: int = 10
) -> np.ndarray:
    """Randoms estimate ``(1, S, V, N)`` float32 from the delayed sinogram (see the module docstring).

    ``smooth=False`` returns a float32 copy of the delayeds; ``smooth=True`` the
    per-sinogram ML fan-sum estimate (needs unmashed views of a non-arc-corrected
    geometry). Each sinogram's total equals its delayed counts in both cases.
    """
    d = _check_sinogram(delayeds, geometry, "delayeds")
    if not smooth:
        return d.copy()
    if geometry.arc_corrected:
        raise GeometryError("fan-sum randoms need non-arc-corrected data (bins map to detector pairs)")
    n_det = geometry.scanner.num_detectors_per_ring
    if geometry.num_views * 2 != n_det:
        raise GeometryError(
            f"fan-sum randoms need unmashed views ({n_det // 2}), got {geometry.num_views}; "
            "use smooth=False for view-mashed data"
        )
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    v = np.arange(geometry.num_views)
    d1, d2 = det_pair_for_view_tangential(v[:, None], geometry.tangential_pos_nums()[None, :], n_det)
    out = np.empty_like(d)
    _fan_sum_randoms(d[0], d1.astype(np.int64), d2.astype(np.int64), n_det, int(iterations), out[0])
    return out


@njit(parallel=True, cache=True)
def _fan_sum_randoms(d, d1, d2, n_det, iterations, out):
    S, V, N = d.shape
    for s in prange(S):
        f = np.zeros(n_det)
        total = 0.0
        for v in range(V):
            for t in range(N):
                c = d[s, v, t]
                f[d1[v, t]] += c
                f[d2[v, t]] += c
                total += c
        if total <= 0.0:
            for v in range(V):
                for t in range(N):
                    out[s, v, t] = 0.0
            continue
        sing = np.sqrt(f)
        den = np.zeros(n_det)
        for _ in range(iterations):
            den[:] = 0.0
            for v in range(V):
                for t in range(N):
                    a = d1[v, t]
                    b = d2[v, t]
                    den[a] += sing[b]
                    den[b] += sing[a]
            for i in range(n_det):  # damped fixed point: same solution, no scale oscillation
                sing[i] = np.sqrt(sing[i] * f[i] / den[i]) if den[i] > 0.0 else 0.0
        est = 0.0
        for v in range(V):
            for t in range(N):
                r = sing[d1[v, t]] * sing[d2[v, t]]
                out[s, v, t] = r
                est += r
        scale = total / est if est > 0.0 else 0.0
        for v in range(V):
            for t in range(N):
                out[s, v, t] *= scale


def additive_term(randoms: np.ndarray, scatter: np.ndarray | None = None) -> np.ndarray:
    """Background ``b = randoms + scatter`` (float32, counts per bin; same shapes, non-negative)."""
    r = np.asarray(randoms)
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise InputError("randoms must be finite and >= 0")
    if scatter is None:
        return r.astype(np.float32, copy=True)
    s = np.asarray(scatter)
    if s.shape != r.shape:
        raise GeometryError(f"scatter has shape {s.shape}; randoms have {r.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise InputError("scatter must be finite and >= 0")
    return (r.astype(np.float32) + s.astype(np.float32)).astype(np.float32)
