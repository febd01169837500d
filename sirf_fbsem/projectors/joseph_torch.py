"""Joseph forward and back projection in vectorised torch (the CUDA path; runs on CPU too).

Same algorithm, same padded image and the same per-ray set-up as
:mod:`.joseph_numba` (:func:`_setup` repeats :func:`.joseph_numba.ray_setup`
operation by operation in float64, so both backends trace the same planes).
Rays are processed in chunks of (row, view) pairs such that a chunk holds at most
about ``SAMPLE_BUDGET`` samples; within a chunk the samples form a (rays, planes)
array, padded to the longest ray with zero weights: gathers with bilinear weights
for the forward, ``index_add_`` for the adjoint.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .joseph_numba import CONST_TOL, PAD, SNAP_TOL
from .rays import RayTable

__all__ = ["forward", "adjoint", "SAMPLE_BUDGET"]

#: upper bound on the samples (rays x planes) held at once in a chunk, on a GPU
SAMPLE_BUDGET = 1 << 24
#: the same on the CPU, where large temporaries cost page faults on every allocation
SAMPLE_BUDGET_CPU = 1 << 20


class _Tables:
    """The ray table as float64/int64 tensors on one device."""

    def __init__(self, rays: RayTable, device: torch.device):
        f64 = dict(dtype=torch.float64, device=device)
        self.cos_phi = torch.as_tensor(np.asarray(rays.cos_phi), **f64)
        self.sin_phi = torch.as_tensor(np.asarray(rays.sin_phi), **f64)
        self.s = torch.as_tensor(np.asarray(rays.s), **f64)
        self.m = torch.as_tensor(np.asarray(rays.m), **f64)
        self.tan_theta = torch.as_tensor(np.asarray(rays.tan_theta), **f64)
        self.samp = torch.as_tensor(np.asarray(rays.axial_sampling), **f64)
        self.n_ax = torch.as_tensor(np.asarray(rays.num_axial_rays), dtype=torch.int64, device=device)
        self.shape = tuple(int(n) for n in rays.image_shape)
        self.vox = tuple(float(v) for v in rays.voxel_size)
        self.first = tuple(float(v) for v in rays.first_voxel)
        self.fov = float(rays.fov_radius_mm)
        nz, ny, nx = self.shape
        sy = nx + 2 * PAD
        sz = sy * (ny + 2 * PAD)
        self.padded_shape = (nz + 2 * PAD, ny + 2 * PAD, nx + 2 * PAD)
        self.strides = torch.tensor([sz, sy, 1], dtype=torch.int64, device=device)  # per axis z, y, x
        self.base = PAD * (1 + sy + sz)
        self.max_nax = int(rays.num_axial_rays.max())


# secondary axes for principal axis p = 0 (z), 1 (y), 2 (x)
_Q1 = (2, 2, 1)
_Q2 = (1, 0, 0)


def _clip_axis(A, B, n, n_p, k_lo, k_hi, empty):
    """Vectorised :func:`.joseph_numba._clip_axis`."""
    B = torch.where(B.abs() * n_p < CONST_TOL, torch.zeros_like(B), B)
    zero = B == 0.0
    r = torch.floor(A + 0.5)
    A = torch.where(zero & ((A - r).abs() < SNAP_TOL), r, A)
    empty = empty | (zero & ((A <= -1.0) | (A >= n)))
    Bs = torch.where(zero, torch.ones_like(B), B)
    ka = (-1.0 - A) / Bs
    kb = (n - A) / Bs
    k_lo = torch.where(zero, k_lo, torch.maximum(k_lo, torch.ceil(torch.minimum(ka, kb))))
    k_hi = torch.where(zero, k_hi, torch.minimum(k_hi, torch.floor(torch.maximum(ka, kb))))
    return A, B, k_lo, k_hi, empty


def _end_voxel_exit(u, direction: float, s, cphi, sphi, x0, y0, vx: float, vy: float):
    """Vectorised :func:`.joseph_numba._end_voxel_exit`."""
    out = torch.full_like(s, math.inf)
    for P, d, o, v in ((s * cphi, sphi, x0, vx), (s * sphi, -cphi, y0, vy)):
        ok = d.abs() > 1e-9
        ds = torch.where(ok, d, torch.ones_like(d))
        i = torch.floor((P + u * ds - o) / v + 0.5)
        boundary = o + (i + 0.5 * direction * torch.sign(ds)) * v
        out = torch.where(ok, torch.minimum(out, (boundary - P) / (ds * direction)), out)
    return direction * out


def _stir_u_range(s, cphi, sphi, fov: float, x0, y0, vx: float, vy: float):
    """Vectorised :func:`.joseph_numba.stir_u_range` (callers mark |s| >= fov empty)."""
    L = torch.sqrt((fov * fov - s * s).clamp_min(0.0))
    return (_end_voxel_exit(-L, -1.0, s, cphi, sphi, x0, y0, vx, vy),
            _end_voxel_exit(L, 1.0, s, cphi, sphi, x0, y0, vx, vy))


def _setup(tb: _Tables, r: torch.Tensor, v: torch.Tensor, t: torch.Tensor, sub: torch.Tensor):
    """Set-up of the rays (row r, view v, tangential t, sub-ray sub), vectorised.

    Returns (k_lo, count, sp, s1, s2, A1, B1, A2, B2, weight) per ray; weight
    includes the 1/n of the sub-rays.
    """
    dev = r.device
    n = tb.n_ax[r].to(torch.float64)
    zc = tb.m[r] + ((sub.to(torch.float64) + 0.5) / n - 0.5) * tb.samp[r]
    cphi, sphi, s, tt = tb.cos_phi[v], tb.sin_phi[v], tb.s[t], tb.tan_theta[r, t]
    no_lor = torch.isnan(tt)  # arc-corrected |s| >= R in an oblique segment: not traced (see .rays)
    tt = torch.where(no_lor, torch.zeros_like(tt), tt)
    dz, dy, dx = -tt, -cphi, sphi
    P = torch.stack([zc, s * sphi, s * cphi], dim=1)
    D = torch.stack([dz, dy, dx], dim=1)
    vz, vy, vx = tb.vox
    # principal axis, ties to x then y (as the numba kernel)
    p = torch.full_like(r, 2)
    best = dx.abs() / vx
    ry = dy.abs() / vy
    p = torch.where(ry > best, torch.ones_like(p), p)
    best = torch.where(ry > best, ry, best)
    p = torch.where(dz.abs() / vz > best, torch.zeros_like(p), p)
    q1 = torch.tensor(_Q1, device=dev)[p]
    q2 = torch.tensor(_Q2, device=dev)[p]
    O = torch.tensor(tb.first, dtype=torch.float64, device=dev)
    Vx = torch.tensor(tb.vox, dtype=torch.float64, device=dev)
    Nn = torch.tensor(tb.shape, dtype=torch.float64, device=dev)

    def axis(q):
        qq = q[:, None]
        return P.gather(1, qq)[:, 0], D.gather(1, qq)[:, 0], O[q], Vx[q], Nn[q]

    Pp, dp, op, vp, n_p = axis(p)
    P1, d1, o1, v1, n1 = axis(q1)
    P2, d2, o2, v2, n2 = axis(q2)
    step = vp * torch.sqrt(dx * dx + dy * dy + dz * dz) / dp.abs()
    if math.isfinite(tb.fov):
        fov = tb.fov
        empty = s.abs() >= fov
        u_lo, u_hi = _stir_u_range(s, cphi, sphi, fov, O[2], O[1], vx, vy)
        wa = (Pp + u_lo * dp - op) / vp
        wb = (Pp + u_hi * dp - op) / vp
        k_lo = torch.ceil(torch.minimum(wa, wb)).clamp_min(0.0)
        k_hi = torch.minimum(torch.floor(torch.maximum(wa, wb)), n_p - 1.0)
    else:
        empty = torch.zeros_like(s, dtype=torch.bool)
        k_lo = torch.zeros_like(s)
        k_hi = n_p - 1.0
    empty = empty | no_lor
    tp = (op - Pp) / dp
    A1 = (P1 + tp * d1 - o1) / v1
    B1 = (vp * d1) / (dp * v1)
    A2 = (P2 + tp * d2 - o2) / v2
    B2 = (vp * d2) / (dp * v2)
    A1, B1, k_lo, k_hi, empty = _clip_axis(A1, B1, n1, n_p, k_lo, k_hi, empty)
    A2, B2, k_lo, k_hi, empty = _clip_axis(A2, B2, n2, n_p, k_lo, k_hi, empty)
    count = torch.where(empty | (k_lo > k_hi), torch.zeros_like(k_lo), k_hi - k_lo + 1.0).to(torch.int64)
    k_lo = torch.where(count > 0, k_lo, torch.zeros_like(k_lo)).to(torch.int64)
    st = tb.strides
    return k_lo, count, st[p], st[q1], st[q2], A1, B1, A2, B2, step / n


def _chunks(tb: _Tables):
    """Ranges of (row, view) items (row-major) holding at most SAMPLE_BUDGET(_CPU) samples."""
    S, V, N = tb.m.shape[0], tb.cos_phi.shape[0], tb.s.shape[0]
    per_item = N * tb.max_nax * max(tb.shape)
    budget = SAMPLE_BUDGET_CPU if tb.m.device.type == "cpu" else SAMPLE_BUDGET
    size = max(1, budget // per_item)
    for i0 in range(0, S * V, size):
        yield i0, min(S * V, i0 + size)


def _rays_of(tb: _Tables, i0: int, i1: int):
    """(r, v, t, sub, local bin index) of every (sub-)ray of items i0..i1-1."""
    dev = tb.m.device
    V, N = tb.cos_phi.shape[0], tb.s.shape[0]
    bins = torch.arange(i0 * N, i1 * N, device=dev)
    item = bins // N
    t = bins % N
    r = item // V
    v = item % V
    local = bins - i0 * N
    if tb.max_nax == 1:
        return r, v, t, torch.zeros_like(r), local
    n = tb.n_ax[r]
    rep = torch.repeat_interleave(torch.arange(bins.numel(), device=dev), n)
    sub = torch.arange(rep.numel(), device=dev) - (torch.cumsum(n, 0) - n)[rep]
    return r[rep], v[rep], t[rep], sub, local[rep]


def _samples(tb: _Tables, ray):
    """Samples as (rays, K) arrays, K the most planes of a ray: flat padded index of corner (0,0)
    and the 4 bilinear weights (float64, 0 beyond a ray's last plane, whose index is then 0)."""
    k_lo, count, sp, s1, s2, A1, B1, A2, B2, _ = ray
    dev = k_lo.device
    K = int(count.max()) if count.numel() else 0
    j = torch.arange(K, device=dev)
    valid = j[None, :] < count[:, None]
    k = k_lo[:, None] + j[None, :]
    kf = k.to(torch.float64)
    w1 = A1[:, None] + kf * B1[:, None]
    w2 = A2[:, None] + kf * B2[:, None]
    i1 = torch.floor(w1)
    i2 = torch.floor(w2)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    f1 = torch.where(valid, w1 - i1, zero)
    g1 = torch.where(valid, 1.0 - (w1 - i1), zero)
    f2 = w2 - i2
    g2 = 1.0 - f2
    idx = tb.base + k * sp[:, None] + i1.to(torch.int64) * s1[:, None] + i2.to(torch.int64) * s2[:, None]
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    return idx, s1[:, None], s2[:, None], (g1 * g2, f1 * g2, g1 * f2, f1 * f2)


def forward(image: torch.Tensor, rays: RayTable) -> torch.Tensor:
    """Joseph forward projection: (B, Z, Y, X) -> (B, S, V, N), same dtype and device."""
    tb = _Tables(rays, image.device)
    nb = image.shape[0]
    dt = image.dtype
    img = torch.nn.functional.pad(image, (PAD,) * 6).reshape(nb, -1)
    S, V, N = rays.sinogram_shape
    out = torch.zeros((nb, S * V * N), dtype=dt, device=image.device)
    for i0, i1 in _chunks(tb):
        r, v, t, sub, local = _rays_of(tb, i0, i1)
        ray = _setup(tb, r, v, t, sub)
        idx, s1, s2, c = _samples(tb, ray)
        c = [ci.to(dt) for ci in c]
        w = ray[-1].to(dt)
        corners = (idx, idx + s1, idx + s2, idx + s1 + s2)
        for b in range(nb):
            x = img[b]
            vals = x.take(corners[0]) * c[0]
            for j in range(1, 4):
                vals += x.take(corners[j]) * c[j]
            out[b, i0 * N : i1 * N].index_add_(0, local, vals.sum(dim=1) * w)
    return out.reshape(nb, S, V, N)


def adjoint(sino: torch.Tensor, rays: RayTable) -> torch.Tensor:
    """Transpose of :func:`forward`: (B, S, V, N) -> (B, Z, Y, X), same dtype and device."""
    tb = _Tables(rays, sino.device)
    nb = sino.shape[0]
    dt = sino.dtype
    S, V, N = rays.sinogram_shape
    y = sino.reshape(nb, -1)
    buf = torch.zeros((nb,) + tb.padded_shape, dtype=dt, device=sino.device)
    flat = buf.view(nb, -1)
    for i0, i1 in _chunks(tb):
        r, v, t, sub, local = _rays_of(tb, i0, i1)
        ray = _setup(tb, r, v, t, sub)
        idx, s1, s2, c = _samples(tb, ray)
        c = [ci.to(dt) for ci in c]
        w = ray[-1].to(dt)
        corners = [(idx + off).reshape(-1) for off in (0, s1, s2, s1 + s2)]
        for b in range(nb):
            val = (y[b, i0 * N : i1 * N][local] * w)[:, None]
            for j in range(4):
                flat[b].index_add_(0, corners[j], (val * c[j]).reshape(-1))
    nz, ny, nx = tb.shape
    return buf[:, PAD : PAD + nz, PAD : PAD + ny, PAD : PAD + nx].contiguous()
