"""Joseph forward and back projection on the CPU (numba), for :mod:`.joseph`.

Both kernels take a *padded* image: 2 zero voxels added on each side of every
axis, flattened to ``(B, P)`` with ``P = (nz+4)(ny+4)(nx+4)``. The per-ray set-up
(:func:`ray_setup`) limits the samples to where the bilinear corners fall inside
the padded array, so the inner loops need no bounds checks.

Per ray (see :mod:`.joseph` for the algorithm and the frame), with principal axis
``p`` and the two other axes ``q1``, ``q2``, plane ``k`` of ``p`` is sampled at
continuous voxel indices ``w1 = A1 + k B1`` and ``w2 = A2 + k B2`` with weight
``step`` (mm). :mod:`.joseph_torch` repeats the set-up operation by operation, so
both backends trace the same planes.

Adjoint: the (row, view) pairs are split into as many contiguous chunks as there
are buffers; each chunk scatters into its own padded image buffer (no atomics, no
races), and :func:`reduce_buffers` sums the buffers and removes the padding.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

__all__ = ["PAD", "ray_setup", "forward_kernel", "adjoint_kernel", "reduce_buffers"]

#: zero voxels added on each side of every image axis
PAD = 2
#: a secondary coordinate changing by less than this over the whole ray is held constant
_CONST_TOL = 1e-12
#: a constant secondary coordinate this close to a voxel centre is put on it (weight 0 to the next)
_SNAP_TOL = 1e-9


@njit(cache=True)
def _clip_axis(A, B, n, n_p, k_lo, k_hi):
    """Planes k with -1 <= A + k B <= n (corners inside the padded axis); snaps constant A."""
    if abs(B) * n_p < _CONST_TOL:
        B = 0.0
    if B == 0.0:
        r = np.floor(A + 0.5)
        if abs(A - r) < _SNAP_TOL:
            A = r
        if A <= -1.0 or A >= n:
            return A, B, 1.0, 0.0
        return A, B, k_lo, k_hi
    ka = (-1.0 - A) / B
    kb = (n - A) / B
    k_lo = max(k_lo, np.ceil(min(ka, kb)))
    k_hi = min(k_hi, np.floor(max(ka, kb)))
    return A, B, k_lo, k_hi


@njit(cache=True)
def ray_setup(cphi, sphi, s, zc, tt, fov, nz, ny, nx, vz, vy, vx, z0, y0, x0):
    """Joseph set-up of one ray.

    The ray is (z, y, x)(u) = (zc, s sin(phi), s cos(phi)) + u (-tan(theta), -cos(phi), sin(phi)).
    Returns ``(k_lo, k_hi, p, A1, B1, A2, B2, step)``: planes ``k_lo..k_hi`` of the
    principal axis ``p`` (0 z, 1 y, 2 x; ``k_lo > k_hi`` when the ray misses), the
    secondary coordinates (axes ``q1, q2`` = (x, z) for p = y, (y, z) for p = x,
    (x, y) for p = z) and the path length per plane in mm.
    """
    dz = -tt
    dy = -cphi
    dx = sphi
    pz = zc
    py = s * sphi
    px = s * cphi
    # principal axis: the one crossing most voxel planes (ties go to x, then y)
    p = 2
    best = abs(dx) / vx
    ry = abs(dy) / vy
    if ry > best:
        p = 1
        best = ry
    if abs(dz) / vz > best:
        p = 0
    if p == 2:
        Pp, dp, op, vp, n_p = px, dx, x0, vx, nx
        P1, d1, o1, v1, n1 = py, dy, y0, vy, ny
        P2, d2, o2, v2, n2 = pz, dz, z0, vz, nz
    elif p == 1:
        Pp, dp, op, vp, n_p = py, dy, y0, vy, ny
        P1, d1, o1, v1, n1 = px, dx, x0, vx, nx
        P2, d2, o2, v2, n2 = pz, dz, z0, vz, nz
    else:
        Pp, dp, op, vp, n_p = pz, dz, z0, vz, nz
        P1, d1, o1, v1, n1 = px, dx, x0, vx, nx
        P2, d2, o2, v2, n2 = py, dy, y0, vy, ny
    step = vp * math.sqrt(dx * dx + dy * dy + dz * dz) / abs(dp)
    # planes inside the traced part of the line (cylindrical FOV) and the image
    if fov < math.inf:
        if abs(s) >= fov:
            return 1, 0, p, 0.0, 0.0, 0.0, 0.0, step
        L = math.sqrt(fov * fov - s * s)
        wa = (Pp - L * dp - op) / vp
        wb = (Pp + L * dp - op) / vp
        k_lo = max(np.ceil(min(wa, wb)), 0.0)
        k_hi = min(np.floor(max(wa, wb)), n_p - 1.0)
    else:
        k_lo = 0.0
        k_hi = n_p - 1.0
    tp = (op - Pp) / dp  # u at plane 0
    A1 = (P1 + tp * d1 - o1) / v1
    B1 = (vp * d1) / (dp * v1)
    A2 = (P2 + tp * d2 - o2) / v2
    B2 = (vp * d2) / (dp * v2)
    A1, B1, k_lo, k_hi = _clip_axis(A1, B1, n1, n_p, k_lo, k_hi)
    A2, B2, k_lo, k_hi = _clip_axis(A2, B2, n2, n_p, k_lo, k_hi)
    if k_lo > k_hi:
        return 1, 0, p, A1, B1, A2, B2, step
    return int(k_lo), int(k_hi), p, A1, B1, A2, B2, step


@njit(cache=True)
def _strides(p, nz, ny, nx):
    """Strides (principal, q1, q2) and the offset of voxel (0,0,0) in the padded flat image."""
    sx = 1
    sy = nx + 2 * PAD
    sz = sy * (ny + 2 * PAD)
    base = PAD * (sx + sy + sz)
    if p == 2:
        return sx, sy, sz, base
    if p == 1:
        return sy, sx, sz, base
    return sz, sx, sy, base


@njit(cache=True)
def _on_grid(A, B):
    return B == 0.0 and A == np.floor(A)


@njit(cache=True)
def _trace_fwd(img, k_lo, k_hi, sp, s1, s2, base, A1, B1, A2, B2, two):
    """Sum of the bilinear samples of one ray over planes k_lo..k_hi (float64)."""
    acc = 0.0
    if two:
        # q2 constant on a voxel centre: only the corners of q1 contribute
        off = base + int(A2) * s2
        for k in range(k_lo, k_hi + 1):
            w1 = A1 + k * B1
            i1 = math.floor(w1)
            f1 = w1 - i1
            idx = off + k * sp + int(i1) * s1
            acc += (1.0 - f1) * img[idx] + f1 * img[idx + s1]
    else:
        for k in range(k_lo, k_hi + 1):
            w1 = A1 + k * B1
            w2 = A2 + k * B2
            i1 = math.floor(w1)
            i2 = math.floor(w2)
            f1 = w1 - i1
            f2 = w2 - i2
            idx = base + k * sp + int(i1) * s1 + int(i2) * s2
            acc += (1.0 - f2) * ((1.0 - f1) * img[idx] + f1 * img[idx + s1]) + f2 * (
                (1.0 - f1) * img[idx + s2] + f1 * img[idx + s1 + s2]
            )
    return acc


@njit(cache=True)
def _trace_adj(buf, val, k_lo, k_hi, sp, s1, s2, base, A1, B1, A2, B2, two):
    """Scatter ``val`` times the bilinear weights of one ray into ``buf``."""
    if two:
        off = base + int(A2) * s2
        for k in range(k_lo, k_hi + 1):
            w1 = A1 + k * B1
            i1 = math.floor(w1)
            f1 = w1 - i1
            idx = off + k * sp + int(i1) * s1
            buf[idx] += val * (1.0 - f1)
            buf[idx + s1] += val * f1
    else:
        for k in range(k_lo, k_hi + 1):
            w1 = A1 + k * B1
            w2 = A2 + k * B2
            i1 = math.floor(w1)
            i2 = math.floor(w2)
            f1 = w1 - i1
            f2 = w2 - i2
            idx = base + k * sp + int(i1) * s1 + int(i2) * s2
            g = val * (1.0 - f2)
            h = val * f2
            buf[idx] += g * (1.0 - f1)
            buf[idx + s1] += g * f1
            buf[idx + s2] += h * (1.0 - f1)
            buf[idx + s1 + s2] += h * f1


@njit(cache=True)
def _prepare(p, A1, B1, A2, B2, nz, ny, nx):
    """Strides, and whether the two-corner loop applies (swapping q1/q2 if needed)."""
    sp, s1, s2, base = _strides(p, nz, ny, nx)
    if _on_grid(A1, B1) and not _on_grid(A2, B2):
        A1, B1, A2, B2 = A2, B2, A1, B1
        s1, s2 = s2, s1
    two = _on_grid(A2, B2)
    return sp, s1, s2, base, A1, B1, A2, B2, two


@njit(parallel=True, cache=True)
def forward_kernel(img, out, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, shape, vox, first, fov):
    """``out[b, r, v, t]`` = line integral (mm) of ``img[b]`` (padded, flat) along ray (r, v, t).

    ``out`` (B, S, V, N) is overwritten. Work items are (view, row) pairs, view-major,
    so that the static split between threads gets mirror-symmetric halves.
    """
    nb = img.shape[0]
    S = m.shape[0]
    V = cos_phi.shape[0]
    N = s.shape[0]
    nz, ny, nx = shape[0], shape[1], shape[2]
    vz, vy, vx = vox[0], vox[1], vox[2]
    z0, y0, x0 = first[0], first[1], first[2]
    for item in prange(S * V):
        v = item // S
        r = item % S
        n = n_ax[r]
        for t in range(N):
            for b in range(nb):
                out[b, r, v, t] = 0.0
            for i in range(n):
                zc = m[r] + ((i + 0.5) / n - 0.5) * samp[r]
                k_lo, k_hi, p, A1, B1, A2, B2, step = ray_setup(
                    cos_phi[v], sin_phi[v], s[t], zc, tan_theta[r, t], fov, nz, ny, nx, vz, vy, vx, z0, y0, x0
                )
                if k_lo > k_hi:
                    continue
                sp, s1, s2, base, A1, B1, A2, B2, two = _prepare(p, A1, B1, A2, B2, nz, ny, nx)
                w = step / n
                for b in range(nb):
                    out[b, r, v, t] += w * _trace_fwd(img[b], k_lo, k_hi, sp, s1, s2, base, A1, B1, A2, B2, two)


@njit(parallel=True, cache=True)
def adjoint_kernel(sino, bufs, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, shape, vox, first, fov):
    """Scatter ``sino`` (B, S, V, N) into ``bufs`` (C, B, P), zeroed: chunk c of the (view, row) pairs into ``bufs[c]``."""
    nb = sino.shape[0]
    S = m.shape[0]
    V = cos_phi.shape[0]
    N = s.shape[0]
    nz, ny, nx = shape[0], shape[1], shape[2]
    vz, vy, vx = vox[0], vox[1], vox[2]
    z0, y0, x0 = first[0], first[1], first[2]
    n_chunks = bufs.shape[0]
    n_items = S * V
    for c in prange(n_chunks):
        start = (c * n_items) // n_chunks
        stop = ((c + 1) * n_items) // n_chunks
        for item in range(start, stop):
            v = item // S
            r = item % S
            n = n_ax[r]
            for t in range(N):
                for i in range(n):
                    zc = m[r] + ((i + 0.5) / n - 0.5) * samp[r]
                    k_lo, k_hi, p, A1, B1, A2, B2, step = ray_setup(
                        cos_phi[v], sin_phi[v], s[t], zc, tan_theta[r, t], fov, nz, ny, nx, vz, vy, vx, z0, y0, x0
                    )
                    if k_lo > k_hi:
                        continue
                    sp, s1, s2, base, A1, B1, A2, B2, two = _prepare(p, A1, B1, A2, B2, nz, ny, nx)
                    w = step / n
                    for b in range(nb):
                        val = w * sino[b, r, v, t]
                        if val != 0.0:
                            _trace_adj(bufs[c, b], val, k_lo, k_hi, sp, s1, s2, base, A1, B1, A2, B2, two)


@njit(parallel=True, cache=True)
def reduce_buffers(bufs, out):
    """``out[b, z, y, x]`` = sum over c of ``bufs[c, b]`` at the unpadded voxel (z, y, x)."""
    n_chunks, nb = bufs.shape[0], bufs.shape[1]
    nz, ny, nx = out.shape[1], out.shape[2], out.shape[3]
    sy = nx + 2 * PAD
    sz = sy * (ny + 2 * PAD)
    for zb in prange(nz * nb):
        b = zb // nz
        z = zb % nz
        for y in range(ny):
            off = (z + PAD) * sz + (y + PAD) * sy + PAD
            for x in range(nx):
                acc = bufs[0, b, off + x]
                for c in range(1, n_chunks):
                    acc += bufs[c, b, off + x]
                out[b, z, y, x] = acc


def num_threads() -> int:
    """numba's current number of threads."""
    return numba.get_num_threads()
