"""Joseph forward and back projection on the CPU (numba), for :mod:`.joseph`.

Both kernels take a *padded* image: ``PAD`` zero voxels added on each side of every
axis, flattened to ``(B, P)`` with ``P = (ny+4)(nx+4)(nz+4)`` in **(y, x, z) order, z
fastest** (:func:`layout_strides`, :func:`pad_image`; why below). The per-ray set-up
(:func:`ray_setup`) limits the samples to where the bilinear corners fall inside
the padded array, so the inner loops need no bounds checks.

Per ray (see :mod:`.joseph` for the algorithm and the frame), with principal axis
``p`` and the two other axes ``q1``, ``q2``, plane ``k`` of ``p`` is sampled at
continuous voxel indices ``w1 = A1 + k B1`` and ``w2 = A2 + k B2`` with weight
``step`` (mm). :mod:`.joseph_torch` repeats :func:`ray_setup` operation by
operation in float64, so both backends trace the same planes.

Sharing work between the rows of a segment: rows with the same ``tan_theta``, the
same axial sampling and ``m`` a whole number of voxels apart (the axial positions
of one segment when ``vz`` divides the axial sampling, as for the default image)
cross every transaxial principal plane at the same in-plane point and at z
positions a whole number of planes apart. The kernels take such rows in blocks
(:func:`row_blocks`, up to a whole segment): per (view, tangential position, plane)
the indices and the bilinear weights are computed once for the block; each row keeps
its own plane range (from the same set-up as :func:`ray_setup`).

Column kernels: when a block's rows are consecutive z voxels (span > 1 with the
default image, as the mMR's span 11) and z is interpolated, row a samples plane k at
``g2 C(i2 + a) + f2 C(i2 + a + 1)``, where ``C(z)`` is the in-plane interpolation in
slice z, so the ``C`` of the block's rows are computed once for all of them
(:func:`_cols4`): two loads per row and plane instead of four. With z fastest in
memory the ``C`` of consecutive rows lie next to each other, so each loop is a
contiguous vector load, blend and store; the rows sampling plane k are one run
(:func:`_window`). Other blocks (span 1, images whose ``vz`` does not divide the axial
sampling) take the per-row kernels (:func:`_rows_fwd4`), which give the same sums;
rays whose principal axis is z are traced one by one.

Work items are (view, tile of :data:`TILE` tangential positions, row block) triples,
block fastest (:func:`_work_item`), dealt round-robin to the threads: with z fastest a
block spans the whole image, so neighbouring items must share the band of the image
that one view's tile of rays crosses to keep it in cache. Layout, column kernels and
work order together: 3.8x / 2.7x forward / back against 0.8.1's kernels on SIRF's
127 x 285 x 285 mMR image (docs/benchmarks.md).
Adjoint: item ``i`` scatters into padded image buffer ``i mod C`` (one per thread: no
atomics, no races), and :func:`reduce_buffers` sums them and removes the padding.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import int64, njit, prange, uint64
from numba.extending import overload

__all__ = ["PAD", "CONST_TOL", "SNAP_TOL", "ROWS_PER_BLOCK", "ray_setup", "row_blocks", "layout_strides", "pad_image",
           "forward_kernel", "adjoint_kernel", "reduce_buffers", "num_threads", "plane_sample", "axis_strides"]

#: zero voxels added on each side of every image axis
PAD = 2
#: a secondary coordinate changing by less than this over the whole ray is held constant
CONST_TOL = 1e-12
#: a constant secondary coordinate this close to a voxel centre is put on it (weight 0 to the next)
SNAP_TOL = 1e-9
#: most rows per block: a whole segment of the mMR (127 rows), which shares the per-plane set-up
#: among most rows (measured on the mMR span 11, 2-core AMD EPYC: see docs/benchmarks.md)
ROWS_PER_BLOCK = 128
#: tangential positions per work item (8 to 32 equal on the mMR at 285 x 285, 64 slower)
TILE = 16


def layout_strides(nz: int, ny: int, nx: int) -> tuple[int, int, int]:
    """Strides (z, y, x) of the padded flat image of an ``nz x ny x nx`` image: (y, x, z) order, z fastest."""
    sx = nz + 2 * PAD
    return 1, sx * (nx + 2 * PAD), sx


def pad_image(x: np.ndarray) -> np.ndarray:
    """(B, Z, Y, X) -> (B, P): ``PAD`` zero voxels on every side of every axis, in the layout of
    :func:`layout_strides` (a copy)."""
    p = PAD
    b, nz, ny, nx = x.shape
    out = np.zeros((b, ny + 2 * p, nx + 2 * p, nz + 2 * p), dtype=x.dtype)
    out[:, p : p + ny, p : p + nx, p : p + nz] = x.transpose(0, 2, 3, 1)
    return out.reshape(b, -1)


_layout = njit(cache=True)(layout_strides)


def _ffloor(x):
    """``floor(x)`` as a float (``inf`` stays ``inf``), for the CPU and the CUDA target alike: the ray
    set-up is compiled for both (:mod:`.joseph_cuda`), and numba's CUDA target has no ``np.floor`` on
    scalars, while ``math.floor`` returns an integer, which overflows on the set-up's unbounded values."""
    return np.floor(x)


def _fceil(x):
    """``ceil(x)`` as a float, as :func:`_ffloor`."""
    return np.ceil(x)


def _min2(a, b):
    """``min(a, b)``: the builtin on the CPU; on the CUDA target, where numba fails to type the builtin
    in these CPU functions compiled as device functions, Python's rule (``a`` unless ``b < a``)."""
    return min(a, b)


def _max2(a, b):
    """``max(a, b)``, as :func:`_min2` (``a`` unless ``b > a``)."""
    return max(a, b)


@overload(_min2, target="cpu")
def _min2_cpu(a, b):
    return lambda a, b: min(a, b)


@overload(_max2, target="cpu")
def _max2_cpu(a, b):
    return lambda a, b: max(a, b)


@overload(_ffloor, target="cpu")
def _ffloor_cpu(x):
    return lambda x: np.floor(x)


@overload(_fceil, target="cpu")
def _fceil_cpu(x):
    return lambda x: np.ceil(x)


def _libdevice_floor(x):
    from numba.cuda import libdevice

    return lambda x: libdevice.floor(x)


def _libdevice_ceil(x):
    from numba.cuda import libdevice

    return lambda x: libdevice.ceil(x)


def _python_min(a, b):
    return lambda a, b: b if b < a else a


def _python_max(a, b):
    return lambda a, b: b if b > a else a


try:
    overload(_ffloor, target="cuda")(_libdevice_floor)
    overload(_fceil, target="cuda")(_libdevice_ceil)
    overload(_min2, target="cuda")(_python_min)
    overload(_max2, target="cuda")(_python_max)
except Exception:  # a numba without a CUDA target: the CPU kernels do not need these
    pass


# --------------------------------------------------------------------------- set-up


@njit(cache=True)
def _clip_axis(A, B, n, n_p, k_lo, k_hi):
    """Planes k with -1 <= A + k B <= n (corners inside the padded axis); snaps a constant A."""
    if abs(B) * n_p < CONST_TOL:
        B = 0.0
    if B == 0.0:
        r = _ffloor(A + 0.5)
        if abs(A - r) < SNAP_TOL:
            A = r
        if A <= -1.0 or A >= n:
            return A, B, 1.0, 0.0
        return A, B, k_lo, k_hi
    ka = (-1.0 - A) / B
    kb = (n - A) / B
    k_lo = _max2(k_lo, _fceil(_min2(ka, kb)))
    k_hi = _min2(k_hi, _ffloor(_max2(ka, kb)))
    return A, B, k_lo, k_hi


@njit(cache=True)
def _end_voxel_exit(u, direction, s, cphi, sphi, x0, y0, vx, vy):
    """u where the ray, going on from ``u`` in ``direction`` (+1 or -1), leaves the voxel holding X(u).

    In-plane, with X(u) = s cos(phi) + u sin(phi), Y(u) = s sin(phi) - u cos(phi) and voxel
    boundaries half-way between the voxel centres x0 + i vx, y0 + j vy.
    """
    out = math.inf
    for P, d, o, v in ((s * cphi, sphi, x0, vx), (s * sphi, -cphi, y0, vy)):
        if abs(d) > 1e-9:
            i = _ffloor((P + u * d - o) / v + 0.5)
            boundary = o + (i + 0.5 * direction * (1.0 if d > 0 else -1.0)) * v
            out = _min2(out, (boundary - P) / (d * direction))
    return direction * out


@njit(cache=True)
def stir_u_range(s, cphi, sphi, fov, x0, y0, vx, vy):
    """The traced part ``[u_lo, u_hi]`` of an in-plane ray, as STIR's ray tracer.

    STIR (``ProjMatrixByBinUsingRayTracing``) cuts the LOR at the cylindrical FOV,
    |u| <= sqrt(fov^2 - s^2), and its Siddon tracer (``RayTraceVoxelsOnCartesianGrid``) then
    runs from where the ray enters the voxel holding one end point to where it leaves the
    voxel holding the other: both ends reach out to their voxel's boundary.
    Returns (1, 0) when |s| >= fov (no ray).
    """
    if abs(s) >= fov:
        return 1.0, 0.0
    L = math.sqrt(fov * fov - s * s)
    u_hi = _end_voxel_exit(L, 1.0, s, cphi, sphi, x0, y0, vx, vy)
    u_lo = _end_voxel_exit(-L, -1.0, s, cphi, sphi, x0, y0, vx, vy)
    return u_lo, u_hi


@njit(cache=True)
def _fov_range(u_lo, u_hi, Pp, dp, op, vp, n_p):
    """Planes of the principal axis whose crossing lies in u_lo <= u <= u_hi and in the image."""
    if u_lo > u_hi:
        return 1.0, 0.0
    if u_hi < math.inf:
        wa = (Pp + u_lo * dp - op) / vp
        wb = (Pp + u_hi * dp - op) / vp
        return _max2(_fceil(_min2(wa, wb)), 0.0), _min2(_ffloor(_max2(wa, wb)), n_p - 1.0)
    return 0.0, n_p - 1.0


@njit(cache=True)
def _u_range(s, cphi, sphi, fov, x0, y0, vx, vy):
    if fov < math.inf:
        return stir_u_range(s, cphi, sphi, fov, x0, y0, vx, vy)
    return -math.inf, math.inf


@njit(cache=True)
def _setup_inplane(cphi, sphi, s, tt, fov, nz, ny, nx, vz, vy, vx, z0, y0, x0):
    """The part of :func:`ray_setup` that does not depend on the ray's z (when p is x or y).

    Returns ``(p, n_p, k_lo, k_hi, A1, B1, tp, B2, step)``: for p = 0 (z) only
    ``p``, ``n_p`` and ``step`` are meaningful. Otherwise q2 is z and ``A2 = (zc + tp * -tan_theta - z0) / vz``;
    ``k_lo, k_hi`` are limited by the FOV and by q1 (not yet by z). A NaN ``tt`` (no LOR:
    an arc-corrected bin with |s| >= R in an oblique segment, see :mod:`.rays`) gives an
    empty range with p = 2 and step 0.
    """
    if tt != tt:
        return 2, nx, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    dz = -tt
    dy = -cphi
    dx = sphi
    # principal axis: the one crossing most voxel planes (ties go to x, then y)
    p = 2
    best = abs(dx) / vx
    ry = abs(dy) / vy
    if ry > best:
        p = 1
        best = ry
    if abs(dz) / vz > best:
        step = vz * math.sqrt(dx * dx + dy * dy + dz * dz) / abs(dz)
        return 0, nz, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, step
    if p == 2:
        Pp, dp, op, vp, n_p = s * cphi, dx, x0, vx, nx
        P1, d1, o1, v1, n1 = s * sphi, dy, y0, vy, ny
    else:
        Pp, dp, op, vp, n_p = s * sphi, dy, y0, vy, ny
        P1, d1, o1, v1, n1 = s * cphi, dx, x0, vx, nx
    step = vp * math.sqrt(dx * dx + dy * dy + dz * dz) / abs(dp)
    u_lo, u_hi = _u_range(s, cphi, sphi, fov, x0, y0, vx, vy)
    k_lo, k_hi = _fov_range(u_lo, u_hi, Pp, dp, op, vp, n_p)
    tp = (op - Pp) / dp  # u at plane 0
    A1 = (P1 + tp * d1 - o1) / v1
    B1 = (vp * d1) / (dp * v1)
    B2 = (vp * dz) / (dp * vz)
    A1, B1, k_lo, k_hi = _clip_axis(A1, B1, n1, n_p, k_lo, k_hi)
    return p, n_p, k_lo, k_hi, A1, B1, tp, B2, step


@njit(cache=True)
def ray_setup(cphi, sphi, s, zc, tt, fov, nz, ny, nx, vz, vy, vx, z0, y0, x0):
    """Joseph set-up of one ray.

    The ray is (z, y, x)(u) = (zc, s sin(phi), s cos(phi)) + u (-tan(theta), -cos(phi), sin(phi)).
    Returns ``(k_lo, k_hi, p, A1, B1, A2, B2, step)``: planes ``k_lo..k_hi`` of the
    principal axis ``p`` (0 z, 1 y, 2 x; ``k_lo > k_hi`` when the ray misses), the
    secondary coordinates (axes ``q1, q2`` = (x, z) for p = y, (y, z) for p = x,
    (x, y) for p = z) and the path length per plane in mm. A NaN ``tt`` gives an empty range.
    """
    p, n_p, k_lo, k_hi, A1, B1, tp, B2, step = _setup_inplane(
        cphi, sphi, s, tt, fov, nz, ny, nx, vz, vy, vx, z0, y0, x0
    )
    if p != 0:
        A2 = (zc + tp * -tt - z0) / vz
        A2, B2, k_lo, k_hi = _clip_axis(A2, B2, nz, n_p, k_lo, k_hi)
    else:
        dz = -tt
        dy = -cphi
        dx = sphi
        u_lo, u_hi = _u_range(s, cphi, sphi, fov, x0, y0, vx, vy)
        k_lo, k_hi = _fov_range(u_lo, u_hi, zc, dz, z0, vz, nz)
        tp = (z0 - zc) / dz
        A1 = (s * cphi + tp * dx - x0) / vx
        B1 = (vz * dx) / (dz * vx)
        A2 = (s * sphi + tp * dy - y0) / vy
        B2 = (vz * dy) / (dz * vy)
        A1, B1, k_lo, k_hi = _clip_axis(A1, B1, nx, nz, k_lo, k_hi)
        A2, B2, k_lo, k_hi = _clip_axis(A2, B2, ny, nz, k_lo, k_hi)
    if k_lo > k_hi:
        return 1, 0, p, A1, B1, A2, B2, step
    return int(k_lo), int(k_hi), p, A1, B1, A2, B2, step


def row_blocks(m: np.ndarray, tan_theta: np.ndarray, samp: np.ndarray, n_ax: np.ndarray, vz: float,
               max_rows: int = ROWS_PER_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of consecutive rows that share their in-plane samples (see the module docstring).

    Returns ``(start, length, dz)``: block g is rows ``start[g] .. start[g] + length[g] - 1``;
    ``dz[r]`` is row r's z offset from its block's first row, in whole voxels.
    """
    S = m.shape[0]
    start, length = [], []
    dz = np.zeros(S, dtype=np.int64)
    r0 = 0
    for r in range(S):
        if r > r0 and r - r0 < max_rows:
            d = (m[r] - m[r0]) / vz
            k = round(d)
            if (
                abs(d - k) < SNAP_TOL
                and samp[r] == samp[r0]
                and n_ax[r] == n_ax[r0]
                and np.array_equal(tan_theta[r], tan_theta[r0], equal_nan=True)
            ):
                dz[r] = k
                continue
        if r > 0:
            start.append(r0)
            length.append(r - r0)
        r0 = r
    start.append(r0)
    length.append(S - r0)
    return np.asarray(start, dtype=np.int64), np.asarray(length, dtype=np.int64), dz


# --------------------------------------------------------------------------- strides


@njit(cache=True)
def axis_strides(p, nz, ny, nx):
    """Strides (principal, q1, q2) and the offset of voxel (0,0,0) in the padded flat image."""
    sz, sy, sx = _layout(nz, ny, nx)
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
def _prepare(p, A1, B1, A2, B2, nz, ny, nx):
    """Strides, and whether the two-corner loop applies (swapping q1/q2 so that q2 is the constant one)."""
    sp, s1, s2, base = axis_strides(p, nz, ny, nx)
    if _on_grid(A1, B1) and not _on_grid(A2, B2):
        A1, B1, A2, B2 = A2, B2, A1, B1
        s1, s2 = s2, s1
    return sp, s1, s2, base, A1, B1, A2, B2, _on_grid(A2, B2)


# --------------------------------------------------------------------------- a block of rows


@njit(cache=True)
def _block_ranges(klo, khi, r0, nr, m, dzi, tp, tt, B2, n_p, k_lo0, k_hi0, nz, vz, z0):
    """Per-row plane ranges of a block (exactly as :func:`ray_setup`); returns the union and row 0's A2, B2."""
    kmin = 1 << 62
    kmax = -1
    A2ref = 0.0
    B2ref = B2
    for a in range(nr):
        zc = m[r0 + a] + dzi
        A2 = (zc + tp * -tt - z0) / vz
        A2, B2a, lo, hi = _clip_axis(A2, B2, nz, n_p, k_lo0, k_hi0)
        if a == 0:
            A2ref = A2
            B2ref = B2a
        if lo <= hi:
            klo[a] = int64(lo)
            khi[a] = int64(hi)
            kmin = min(kmin, klo[a])
            kmax = max(kmax, khi[a])
        else:
            klo[a] = 1
            khi[a] = 0
    return kmin, kmax, A2ref, B2ref


@njit(cache=True, inline="always")
def plane_sample(k, base, sp, s1, s2, A1, B1, A2, B2):
    """Plane k of a ray: ``(idx, c00, c10, c01, c11)``, the flat padded index of corner (0, 0) and the
    bilinear weights (float64) of corners (0,0), (1,0), (0,1), (1,1) at offsets 0, s1, s2, s1 + s2.
    Shared by the per-row CPU kernels and the CUDA kernels (:mod:`.joseph_cuda`)."""
    w1 = A1 + k * B1
    w2 = A2 + k * B2
    i1 = _ffloor(w1)
    i2 = _ffloor(w2)
    f1 = w1 - i1
    f2 = w2 - i2
    g1 = 1.0 - f1
    g2 = 1.0 - f2
    return base + k * sp + int64(i1) * s1 + int64(i2) * s2, g1 * g2, f1 * g2, g1 * f2, f1 * f2


@njit(cache=True)
def _rows_fwd4(img, acc, kmin, kmax, klo, khi, zo, base, sp, s1, s2, A1, B1, A2, B2):
    """acc[a] += bilinear samples of img (1D, padded) for the rows of a block, planes kmin..kmax."""
    cast = img.dtype.type
    u1 = uint64(s1)
    u2 = uint64(s2)
    u12 = uint64(s1 + s2)
    for k in range(kmin, kmax + 1):
        idx, w00, w10, w01, w11 = plane_sample(k, base, sp, s1, s2, A1, B1, A2, B2)
        c00 = cast(w00)
        c10 = cast(w10)
        c01 = cast(w01)
        c11 = cast(w11)
        for a in range(acc.shape[0]):
            if klo[a] <= k and k <= khi[a]:
                j = uint64(idx + zo[a])
                acc[a] += c00 * img[j] + c10 * img[j + u1] + c01 * img[j + u2] + c11 * img[j + u12]


@njit(cache=True)
def _rows_fwd2(img, acc, kmin, kmax, klo, khi, zo, off, sp, s1, A1, B1):
    """As :func:`_rows_fwd4` with the second secondary axis constant on a voxel centre (offset in ``off``)."""
    cast = img.dtype.type
    u1 = uint64(s1)
    for k in range(kmin, kmax + 1):
        w1 = A1 + k * B1
        i1 = np.floor(w1)
        f1 = w1 - i1
        c0 = cast(1.0 - f1)
        c1 = cast(f1)
        idx = off + k * sp + int64(i1) * s1
        for a in range(acc.shape[0]):
            if klo[a] <= k and k <= khi[a]:
                j = uint64(idx + zo[a])
                acc[a] += c0 * img[j] + c1 * img[j + u1]


@njit(cache=True)
def _rows_adj4(buf, val, kmin, kmax, klo, khi, zo, base, sp, s1, s2, A1, B1, A2, B2):
    """Transpose of :func:`_rows_fwd4`: buf (1D, padded) += val[a] x the bilinear weights."""
    cast = buf.dtype.type
    u1 = uint64(s1)
    u2 = uint64(s2)
    u12 = uint64(s1 + s2)
    for k in range(kmin, kmax + 1):
        idx, w00, w10, w01, w11 = plane_sample(k, base, sp, s1, s2, A1, B1, A2, B2)
        c00 = cast(w00)
        c10 = cast(w10)
        c01 = cast(w01)
        c11 = cast(w11)
        for a in range(val.shape[0]):
            if klo[a] <= k and k <= khi[a]:
                j = uint64(idx + zo[a])
                y = val[a]
                buf[j] += c00 * y
                buf[j + u1] += c10 * y
                buf[j + u2] += c01 * y
                buf[j + u12] += c11 * y


@njit(cache=True)
def _rows_adj2(buf, val, kmin, kmax, klo, khi, zo, off, sp, s1, A1, B1):
    """Transpose of :func:`_rows_fwd2`."""
    cast = buf.dtype.type
    u1 = uint64(s1)
    for k in range(kmin, kmax + 1):
        w1 = A1 + k * B1
        i1 = np.floor(w1)
        f1 = w1 - i1
        c0 = cast(1.0 - f1)
        c1 = cast(f1)
        idx = off + k * sp + int64(i1) * s1
        for a in range(val.shape[0]):
            if klo[a] <= k and k <= khi[a]:
                j = uint64(idx + zo[a])
                y = val[a]
                buf[j] += c0 * y
                buf[j + u1] += c1 * y


# --------------------------------------------------------------------------- a block of consecutive rows, by columns


@njit(cache=True)
def _window(klo, khi, nr, B2):
    """Whether the per-row plane ranges of a block allow the column kernels, and how to track them.

    Row a of a block whose rows are consecutive z voxels has ``A2 + a`` as its z coordinate, so its
    plane range moves monotonically with a: both ends non-increasing in a when ``B2 > 0``,
    non-decreasing when ``B2 < 0``, equal when ``B2 == 0``. Then the rows sampling plane k are one
    run ``lo(k)..hi(k)`` that :func:`_advance` tracks in O(1) per plane. Returns
    ``(e0, e1, direction)``: the non-empty rows ``e0..e1`` and -1 / +1 (non-increasing /
    non-decreasing ends, 0 counts as either); ``e0 = -1`` when the ranges are not of that form.
    """
    e0 = -1
    e1 = -1
    for a in range(nr):
        if klo[a] <= khi[a]:
            if e0 < 0:
                e0 = a
            elif e1 != a - 1:
                return -1, -1, 0  # a gap: the non-empty rows are not one run
            e1 = a
    if e0 < 0:
        return -1, -1, 0
    direction = 1 if B2 < 0.0 else -1
    for a in range(e0 + 1, e1 + 1):
        if direction * (klo[a] - klo[a - 1]) < 0 or direction * (khi[a] - khi[a - 1]) < 0:
            return -1, -1, 0
    return e0, e1, direction


@njit(cache=True)
def _advance(k, lo, hi, e0, e1, direction, klo, khi):
    """The run ``lo..hi`` of rows sampling plane k, from the run at plane k - 1 (see :func:`_window`).

    Start from :func:`_run_before`.
    """
    if direction < 0:
        while lo > e0 and klo[lo - 1] <= k:
            lo -= 1
        while hi >= lo and khi[hi] < k:
            hi -= 1
    else:
        while hi < e1 and klo[hi + 1] <= k:
            hi += 1
        while lo <= hi and khi[lo] < k:
            lo += 1
    return lo, hi


@njit(cache=True)
def _run_before(e0, e1, direction):
    """The (empty) run of rows before the first plane, for :func:`_advance`."""
    if direction < 0:
        return e1 + 1, e1
    return e0, e0 - 1


@njit(cache=True)
def _split(w, cast):
    """``(i, 1 - f, f)``: the voxel below the continuous index ``w`` and its two linear weights (type ``cast``)."""
    i = np.floor(w)
    f = cast(w - i)
    return int64(i), cast(1.0) - f, f


@njit(cache=True)
def _cols4(image, rows, col, forward, kmin, kmax, klo, khi, e0, e1, direction, base, sp, s1, A1, B1, A2, B2):
    """:func:`_rows_fwd4` (``forward``: ``rows += samples of image``) or :func:`_rows_adj4`
    (``image += rows x weights``) for rows one z voxel apart (q2 = z, contiguous), by columns.

    Forward: row a's sample at plane k is ``g2 C(i2 + a) + f2 C(i2 + a + 1)`` with ``C(z)`` the
    in-plane (q1) interpolation in slice z, and row a + 1 needs ``C(i2 + a + 1)`` again: the columns
    of the run of rows are interpolated once into ``col`` (length >= rows + 1), two loads per row
    instead of four. Adjoint: slice ``i2 + a`` gets ``g2 rows[a] + f2 rows[a - 1]``, spread over its
    two q1 corners, one corner per loop (computed in each loop rather than stored in ``col`` first:
    6 % faster, same sums). Every loop is contiguous and vectorises.
    """
    cast = image.dtype.type
    u1 = uint64(s1)
    lo, hi = _run_before(e0, e1, direction)
    for k in range(kmin, kmax + 1):
        lo, hi = _advance(k, lo, hi, e0, e1, direction, klo, khi)
        if lo > hi:
            continue
        i1, g1, f1 = _split(A1 + k * B1, cast)
        i2, g2, f2 = _split(A2 + k * B2, cast)
        j0 = base + k * sp + i1 * s1 + i2
        if forward:
            for a in range(lo, hi + 2):
                j = uint64(j0 + a)
                col[uint64(a)] = g1 * image[j] + f1 * image[j + u1]
            for a in range(lo, hi + 1):
                rows[uint64(a)] += g2 * col[uint64(a)] + f2 * col[uint64(a + 1)]
        else:
            # slice i2 + a gets f2 rows[a - 1] + g2 rows[a] (rows outside lo..hi: 0), spread over its two
            # q1 corners, one corner per loop; the run's two ends apart, so that the loops are contiguous
            first = g2 * rows[uint64(lo)]
            last = f2 * rows[uint64(hi)]
            image[uint64(j0 + lo)] += g1 * first
            image[uint64(j0 + lo) + u1] += f1 * first
            for a in range(lo + 1, hi + 1):
                image[uint64(j0 + a)] += g1 * (f2 * rows[uint64(a - 1)] + g2 * rows[uint64(a)])
            for a in range(lo + 1, hi + 1):
                image[uint64(j0 + a) + u1] += f1 * (f2 * rows[uint64(a - 1)] + g2 * rows[uint64(a)])
            image[uint64(j0 + hi + 1)] += g1 * last
            image[uint64(j0 + hi + 1) + u1] += f1 * last


@njit(cache=True)
def _cols2(image, rows, forward, klo, khi, e0, e1, off, sp, s1, A1, B1):
    """:func:`_rows_fwd2` / :func:`_rows_adj2` for rows one z voxel apart whose z is constant on a voxel
    centre (offset in ``off``): one plane range for all of them, contiguous loops (adjoint: one
    corner per loop)."""
    cast = image.dtype.type
    u1 = uint64(s1)
    for k in range(klo[e0], khi[e0] + 1):
        i1, g1, f1 = _split(A1 + k * B1, cast)
        j0 = off + k * sp + i1 * s1
        if forward:
            for a in range(e0, e1 + 1):
                j = uint64(j0 + a)
                rows[uint64(a)] += g1 * image[j] + f1 * image[j + u1]
        else:
            for a in range(e0, e1 + 1):
                image[uint64(j0 + a)] += g1 * rows[uint64(a)]
            for a in range(e0, e1 + 1):
                image[uint64(j0 + a) + u1] += f1 * rows[uint64(a)]


@njit(cache=True)
def _columns(image, rows, col, forward, two, kmin, kmax, klo, khi, e0, e1, direction, base, sp, s1, s2, A1, B1, A2, B2):
    """The column kernel for one batch item: forward (``rows += samples``) or adjoint (``image += ...``),
    two corners (z constant on ``A2``) or four."""
    if two:
        _cols2(image, rows, forward, klo, khi, e0, e1, base + int64(A2) * s2, sp, s1, A1, B1)
    else:
        _cols4(image, rows, col, forward, kmin, kmax, klo, khi, e0, e1, direction, base, sp, s1, A1, B1, A2, B2)


@njit(cache=True)
def _consecutive(zo, nr):
    """Whether the rows of a block are consecutive z voxels (offsets 0, 1, 2, ... with z fastest)."""
    for a in range(nr):
        if zo[a] != a:
            return False
    return nr > 1


@njit(cache=True)
def _column_run(klo, khi, nr, B2, two, s2, consecutive):
    """``(e0, e1, direction)`` of :func:`_window` when the column kernels apply to this block and ray, else e0 = -1.

    They apply to blocks of consecutive rows whose second secondary axis is z (stride 1); for the
    two-corner case every non-empty row must share one plane range.
    """
    if not consecutive or s2 != 1:
        return -1, -1, 0
    e0, e1, direction = _window(klo, khi, nr, B2)
    if e0 >= 0 and two:
        for a in range(e0 + 1, e1 + 1):
            if klo[a] != klo[e0] or khi[a] != khi[e0]:
                return -1, -1, 0
    return e0, e1, direction


@njit(cache=True)
def _scratch(nb, max_rows, like):
    """A thread's work arrays for blocks of up to ``max_rows`` rows (dtype of ``like``), allocated once
    per kernel call: (row values (nb x rows, flat), columns (rows + 1), first and last plane per row, and the
    one-row versions of the row values, planes and z offset for rays traced one by one)."""
    return (np.zeros(nb * max_rows, dtype=like.dtype), np.zeros(max_rows + 1, dtype=like.dtype),
            np.zeros(max_rows, np.int64), np.zeros(max_rows, np.int64), np.zeros(1, dtype=like.dtype),
            np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64))


@njit(cache=True)
def _for_rows(scratch, nb, nr):
    """The parts of :func:`_scratch` for a block of ``nr`` rows (contiguous: the loops vectorise)."""
    rows, col, klo, khi, one, kl1, kh1, zo1 = scratch
    return rows[: nb * nr].reshape((nb, nr)), col[: nr + 1], klo[:nr], khi[:nr], one, kl1, kh1, zo1


@njit(cache=True)
def _block_sub_ray(klo, khi, r0, nr, m, dzi, tp, tt, B2, p, n_p, k_lo0, k_hi0, A1, B1, shape, vz, z0, consecutive):
    """One sub-ray of a block's rows, the part the forward and the adjoint share: the per-row plane
    ranges (into ``klo``, ``khi``) and their union ``kmin..kmax`` (empty: ``kmin > kmax``), the
    strides and coordinates of :func:`_prepare`, and the run of :func:`_column_run` (``e0 < 0``:
    the per-row kernels)."""
    nz, ny, nx = shape[0], shape[1], shape[2]
    kmin, kmax = 1, 0
    if k_lo0 <= k_hi0:
        kmin, kmax, A2, B2r = _block_ranges(klo, khi, r0, nr, m, dzi, tp, tt, B2, n_p, k_lo0, k_hi0, nz, vz, z0)
    else:
        A2, B2r = 0.0, B2
    sp, s1, s2, base, Af, Bf, Ag, Bg, two = _prepare(p, A1, B1, A2, B2r, nz, ny, nx)
    e0, e1, direction = -1, -1, 0
    if kmin <= kmax:
        e0, e1, direction = _column_run(klo, khi, nr, Bg, two, s2, consecutive)
    return kmin, kmax, sp, s1, s2, base, Af, Bf, Ag, Bg, two, e0, e1, direction


@njit(cache=True)
def _fwd_block(img, out, v, r0, nr, zo, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, shape, vox, first, fov, columns, t0, t1,
               scratch):
    """Forward projection of rows r0..r0+nr-1 of view v (all tangential positions).

    ``columns``: use the column kernels (:func:`_cols4`) where the block allows them."""
    nb = img.shape[0]
    consecutive = columns and _consecutive(zo, nr)
    nz, ny, nx = shape[0], shape[1], shape[2]
    vz, vy, vx = vox[0], vox[1], vox[2]
    z0, y0, x0 = first[0], first[1], first[2]
    rows, col, klo, khi, one, kl1, kh1, zo1 = _for_rows(scratch, nb, nr)
    acc = rows
    n = n_ax[r0]
    for t in range(t0, t1):
        acc[:] = 0.0
        tt = tan_theta[r0, t]
        p, n_p, k_lo0, k_hi0, A1, B1, tp, B2, step = _setup_inplane(
            cos_phi[v], sin_phi[v], s[t], tt, fov, nz, ny, nx, vz, vy, vx, z0, y0, x0
        )
        for i in range(n):
            dzi = ((i + 0.5) / n - 0.5) * samp[r0]
            if p == 0:
                # principal axis z: the rows share nothing, trace them one by one
                for a in range(nr):
                    k_lo, k_hi, q, a1, b1, a2, b2, _ = ray_setup(
                        cos_phi[v], sin_phi[v], s[t], m[r0 + a] + dzi, tt, fov, nz, ny, nx, vz, vy, vx, z0, y0, x0
                    )
                    if k_lo > k_hi:
                        continue
                    sp, s1, s2, base, a1, b1, a2, b2, two = _prepare(q, a1, b1, a2, b2, nz, ny, nx)
                    kl1[0] = k_lo
                    kh1[0] = k_hi
                    for b in range(nb):
                        one[0] = 0.0
                        if two:
                            _rows_fwd2(img[b], one, k_lo, k_hi, kl1, kh1, zo1, base + int64(a2) * s2, sp, s1, a1, b1)
                        else:
                            _rows_fwd4(img[b], one, k_lo, k_hi, kl1, kh1, zo1, base, sp, s1, s2, a1, b1, a2, b2)
                        acc[b, a] += one[0]
                continue
            kmin, kmax, sp, s1, s2, base, Af, Bf, Ag, Bg, two, e0, e1, direction = _block_sub_ray(
                klo, khi, r0, nr, m, dzi, tp, tt, B2, p, n_p, k_lo0, k_hi0, A1, B1, shape, vz, z0, consecutive)
            if kmin > kmax:
                continue
            if e0 >= 0:
                for b in range(nb):
                    _columns(img[b], acc[b], col, True, two, kmin, kmax, klo, khi, e0, e1, direction, base, sp, s1, s2,
                             Af, Bf, Ag, Bg)
                continue
            for b in range(nb):
                if two:
                    _rows_fwd2(img[b], acc[b], kmin, kmax, klo, khi, zo, base + int64(Ag) * s2, sp, s1, Af, Bf)
                else:
                    _rows_fwd4(img[b], acc[b], kmin, kmax, klo, khi, zo, base, sp, s1, s2, Af, Bf, Ag, Bg)
        w = step / n
        for a in range(nr):
            for b in range(nb):
                out[b, r0 + a, v, t] = acc[b, a] * w


@njit(cache=True)
def _adj_block(sino, buf, v, r0, nr, zo, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, shape, vox, first, fov, columns, t0, t1,
               scratch):
    """Scatter rows r0..r0+nr-1 of view v of ``sino`` into ``buf`` (B, P); ``columns`` as in :func:`_fwd_block`."""
    nb = sino.shape[0]
    consecutive = columns and _consecutive(zo, nr)
    nz, ny, nx = shape[0], shape[1], shape[2]
    vz, vy, vx = vox[0], vox[1], vox[2]
    z0, y0, x0 = first[0], first[1], first[2]
    rows, col, klo, khi, one, kl1, kh1, zo1 = _for_rows(scratch, nb, nr)
    val = rows
    n = n_ax[r0]
    for t in range(t0, t1):
        tt = tan_theta[r0, t]
        p, n_p, k_lo0, k_hi0, A1, B1, tp, B2, step = _setup_inplane(
            cos_phi[v], sin_phi[v], s[t], tt, fov, nz, ny, nx, vz, vy, vx, z0, y0, x0
        )
        w = step / n
        nonzero = False
        for a in range(nr):
            for b in range(nb):
                val[b, a] = sino[b, r0 + a, v, t] * w
                if val[b, a] != 0.0:
                    nonzero = True
        if not nonzero:
            continue
        for i in range(n):
            dzi = ((i + 0.5) / n - 0.5) * samp[r0]
            if p == 0:
                # principal axis z: the rows share nothing, trace them one by one
                for a in range(nr):
                    k_lo, k_hi, q, a1, b1, a2, b2, _ = ray_setup(
                        cos_phi[v], sin_phi[v], s[t], m[r0 + a] + dzi, tt, fov, nz, ny, nx, vz, vy, vx, z0, y0, x0
                    )
                    if k_lo > k_hi:
                        continue
                    sp, s1, s2, base, a1, b1, a2, b2, two = _prepare(q, a1, b1, a2, b2, nz, ny, nx)
                    kl1[0] = k_lo
                    kh1[0] = k_hi
                    for b in range(nb):
                        one[0] = val[b, a]
                        if two:
                            _rows_adj2(buf[b], one, k_lo, k_hi, kl1, kh1, zo1, base + int64(a2) * s2, sp, s1, a1, b1)
                        else:
                            _rows_adj4(buf[b], one, k_lo, k_hi, kl1, kh1, zo1, base, sp, s1, s2, a1, b1, a2, b2)
                continue
            kmin, kmax, sp, s1, s2, base, Af, Bf, Ag, Bg, two, e0, e1, direction = _block_sub_ray(
                klo, khi, r0, nr, m, dzi, tp, tt, B2, p, n_p, k_lo0, k_hi0, A1, B1, shape, vz, z0, consecutive)
            if kmin > kmax:
                continue
            if e0 >= 0:
                for b in range(nb):
                    _columns(buf[b], val[b], col, False, two, kmin, kmax, klo, khi, e0, e1, direction, base, sp, s1, s2,
                             Af, Bf, Ag, Bg)
                continue
            for b in range(nb):
                if two:
                    _rows_adj2(buf[b], val[b], kmin, kmax, klo, khi, zo, base + int64(Ag) * s2, sp, s1, Af, Bf)
                else:
                    _rows_adj4(buf[b], val[b], kmin, kmax, klo, khi, zo, base, sp, s1, s2, Af, Bf, Ag, Bg)


# --------------------------------------------------------------------------- kernels


@njit(cache=True)
def _work_item(item, n_blocks, N, tile, blk_start, blk_len, dz):
    """``(view, first row, rows, row z offsets, first and end tangential position)`` of a work item.

    Items are (view, tangential tile, row block) triples, block fastest: consecutive items (and the
    threads, which take every T-th item) trace the rays of one view and ``tile`` neighbouring
    tangential positions through every segment, which all cross the same band of the image, so that
    band stays in cache (with z fastest every block spans the whole image)."""
    g = item % n_blocks
    rest = item // n_blocks
    n_tiles = (N + tile - 1) // tile
    t0 = (rest % n_tiles) * tile
    r0 = blk_start[g]
    nr = blk_len[g]
    return rest // n_tiles, r0, nr, dz[r0 : r0 + nr], t0, min(t0 + tile, N)


@njit(parallel=True, cache=True)
def forward_kernel(img, out, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, shape, vox, first, fov, blk_start, blk_len, dz,
                   n_threads, columns=True):
    """``out[b, r, v, t]`` = line integral (mm) of ``img[b]`` (padded, flat) along ray (r, v, t).

    ``out`` (B, S, V, N) is overwritten. Work items are (view, tangential tile, row block)
    triples (:func:`_work_item`); thread ``th`` of ``n_threads`` takes items ``th, th + n_threads, ...``.
    ``columns=False`` takes the per-row kernels everywhere (for tests: same sums).
    """
    V = cos_phi.shape[0]
    N = s.shape[0]
    n_items = V * ((N + TILE - 1) // TILE) * blk_start.shape[0]
    n_threads = max(1, min(n_threads, n_items))
    for th in prange(n_threads):
        scratch = _scratch(img.shape[0], blk_len.max(), img)
        for item in range(th, n_items, n_threads):
            v, r0, nr, zo, t0, t1 = _work_item(item, blk_start.shape[0], N, TILE, blk_start, blk_len, dz)
            _fwd_block(img, out, v, r0, nr, zo, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, shape, vox, first, fov,
                       columns, t0, t1, scratch)


@njit(parallel=True, cache=True)
def adjoint_kernel(sino, bufs, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, shape, vox, first, fov, blk_start, blk_len, dz,
                   columns=True):
    """Scatter ``sino`` (B, S, V, N) into ``bufs`` (C, B, P), zeroed: items ``c, c + C, ...`` into ``bufs[c]``.

    Items as in :func:`forward_kernel`; the fixed item-to-buffer assignment keeps the result
    independent of thread timing.
    """
    V = cos_phi.shape[0]
    n_chunks = bufs.shape[0]
    N = s.shape[0]
    n_items = V * ((N + TILE - 1) // TILE) * blk_start.shape[0]
    for c in prange(n_chunks):
        scratch = _scratch(sino.shape[0], blk_len.max(), bufs)
        for item in range(c, n_items, n_chunks):
            v, r0, nr, zo, t0, t1 = _work_item(item, blk_start.shape[0], N, TILE, blk_start, blk_len, dz)
            _adj_block(sino, bufs[c], v, r0, nr, zo, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, shape, vox, first, fov,
                       columns, t0, t1, scratch)


@njit(parallel=True, cache=True)
def reduce_buffers(bufs, out):
    """``out[b, z, y, x]`` = sum over c of ``bufs[c, b]`` at the unpadded voxel (z, y, x)."""
    n_chunks, nb = bufs.shape[0], bufs.shape[1]
    nz, ny, nx = out.shape[1], out.shape[2], out.shape[3]
    sz, sy, sx = _layout(nz, ny, nx)
    base = PAD * (sz + sy + sx)
    for zb in prange(nz * nb):
        b = zb // nz
        z = zb % nz
        for y in range(ny):
            off = base + z * sz + y * sy
            for x in range(nx):
                acc = bufs[0, b, off + x * sx]
                for c in range(1, n_chunks):
                    acc += bufs[c, b, off + x * sx]
                out[b, z, y, x] = acc


def num_threads() -> int:
    """numba's current number of threads."""
    return numba.get_num_threads()
