"""Joseph forward and back projection as numba CUDA kernels: one GPU thread per ray.

Same algorithm and the same per-ray set-up as the CPU kernels: every thread calls
:func:`.joseph_numba.ray_setup` and, per plane, :func:`.joseph_numba.plane_sample` (numba compiles
the CPU module's ``@njit`` functions again as CUDA device functions), so the GPU traces the planes
the CPU traces, with the same weights:

    y[b, r, v, t] = step / n * sum_{sub-rays j < n} sum_{k = k_lo .. k_hi} bilinear(x[b], plane k)

and the adjoint scatters ``y[b, r, v, t] * step / n`` with the same bilinear weights (float atomic
adds into the padded image; the sum's order, hence the last bits, varies from run to run).

Why a kernel of our own rather than vectorised torch (:mod:`.joseph_torch`, which runs on any
device): torch has to hold every sample of a chunk of rays in memory, padded to the longest ray,
and launches some 300 kernels per chunk. On an H200 (2026-12-04, mMR span 11, 127 x 128 x 128,
one subset of 7) that path took 0.49 s forward and 5.9 s back, slower than the numba CPU
kernels on 2 cores. A thread per ray reads its 4 corners per plane straight from the padded image:
on the same H200 a whole mMR span-11 sinogram (837 x 252 x 344) of a 127 x 285 x 285 image took
0.11 s forward and 0.06 s back (pipelines/results/bench_projector_cuda.json).

Threads are numbered with the row (sinogram) fastest, then the tangential position, the view and
the batch item: neighbouring threads trace neighbouring rows of a segment, which cross each plane
at neighbouring z, adjacent in the z-fastest padded image (:func:`.joseph_numba.layout_strides`),
so their loads (and atomic adds) are coalesced and do not collide.

Runs under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, numpy arrays) for the tests on
machines without a GPU (tests/projectors/test_joseph_cuda.py).
"""
from __future__ import annotations

import numpy as np
from numba import config, cuda

from .joseph_numba import PAD, axis_strides, layout_strides, plane_sample, ray_setup

__all__ = ["THREADS_PER_BLOCK", "forward_kernel", "adjoint_kernel", "launch", "simulated", "restore_row_stack"]


def restore_row_stack(numpy_module) -> bool:
    """Give ``numpy_module`` back ``row_stack`` (= ``vstack``) where it lacks it; True if it was added.

    numpy 2.5 removed ``np.row_stack`` (an alias of ``np.vstack`` since numpy 1.x), and numba-cuda
    (0.30.x, in maintenance mode: NVIDIA/numba-cuda#907, "we will unlikely fix this") registers an
    overload of it when it compiles its first kernel, so every kernel fails with "module 'numpy' has
    no attribute 'row_stack'". That is what an H200 with torch 2.11, numba-cuda and numpy 2.5.2 did
    (2026-12-04). The alias is put back only where it is missing, so no existing numpy name changes.
    """
    if hasattr(numpy_module, "row_stack"):
        return False
    numpy_module.row_stack = numpy_module.vstack
    return True


restore_row_stack(np)

#: threads per CUDA block
THREADS_PER_BLOCK = 256


def simulated() -> bool:
    """Whether numba runs CUDA kernels in its simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(config.ENABLE_CUDASIM)


@cuda.jit(device=True)
def _ray_of_thread(i, shape):
    """``(b, r, v, t)`` of thread ``i`` over a (B, S, V, N) sinogram, row fastest; b = -1 past the end."""
    nb, S, V, N = shape[0], shape[1], shape[2], shape[3]
    if i >= nb * S * V * N:
        return -1, 0, 0, 0
    rest = i // S
    return rest // (N * V), i % S, (rest // N) % V, rest % N


@cuda.jit(device=True)
def _sub_ray(j, n, r, v, t, cos_phi, sin_phi, s, m, tan_theta, samp, dims, vox, first, fov):
    """:func:`.joseph_numba.ray_setup` of sub-ray ``j`` of ``n`` (offset in z) of bin (r, v, t)."""
    dzi = ((j + 0.5) / n - 0.5) * samp[r]
    return ray_setup(cos_phi[v], sin_phi[v], s[t], m[r] + dzi, tan_theta[r, t], fov, dims[0], dims[1], dims[2],
                     vox[0], vox[1], vox[2], first[0], first[1], first[2])


@cuda.jit
def forward_kernel(img, out, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, dims, vox, first, fov):
    """``out[b, r, v, t]`` (B, S, V, N) = line integral (mm) of ``img[b]`` (B, P: padded, flat, z fastest)."""
    b, r, v, t = _ray_of_thread(cuda.grid(1), out.shape)
    if b < 0:
        return
    n = n_ax[r]
    acc = 0.0
    step = 0.0
    for j in range(n):
        k_lo, k_hi, p, A1, B1, A2, B2, step = _sub_ray(j, n, r, v, t, cos_phi, sin_phi, s, m, tan_theta, samp, dims,
                                                       vox, first, fov)
        if k_lo > k_hi:
            continue
        sp, s1, s2, base = axis_strides(p, dims[0], dims[1], dims[2])
        for k in range(k_lo, k_hi + 1):
            idx, c00, c10, c01, c11 = plane_sample(k, base, sp, s1, s2, A1, B1, A2, B2)
            acc += c00 * img[b, idx] + c10 * img[b, idx + s1] + c01 * img[b, idx + s2] + c11 * img[b, idx + s1 + s2]
    out[b, r, v, t] = acc * step / n


@cuda.jit
def adjoint_kernel(sino, buf, cos_phi, sin_phi, s, m, tan_theta, samp, n_ax, dims, vox, first, fov):
    """``buf[b]`` (B, P: padded, flat, z fastest, zeroed) += transpose of :func:`forward_kernel` applied to ``sino``."""
    b, r, v, t = _ray_of_thread(cuda.grid(1), sino.shape)
    if b < 0 or sino[b, r, v, t] == 0.0:
        return
    n = n_ax[r]
    for j in range(n):
        k_lo, k_hi, p, A1, B1, A2, B2, step = _sub_ray(j, n, r, v, t, cos_phi, sin_phi, s, m, tan_theta, samp, dims,
                                                       vox, first, fov)
        if k_lo > k_hi:
            continue
        val = sino[b, r, v, t] * step / n
        sp, s1, s2, base = axis_strides(p, dims[0], dims[1], dims[2])
        for k in range(k_lo, k_hi + 1):
            idx, c00, c10, c01, c11 = plane_sample(k, base, sp, s1, s2, A1, B1, A2, B2)
            cuda.atomic.add(buf, (b, idx), c00 * val)
            cuda.atomic.add(buf, (b, idx + s1), c10 * val)
            cuda.atomic.add(buf, (b, idx + s2), c01 * val)
            cuda.atomic.add(buf, (b, idx + s1 + s2), c11 * val)


def padded_shape(image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(Y, X, Z) of the padded image in the layout of :func:`.joseph_numba.layout_strides`."""
    nz, ny, nx = image_shape
    assert layout_strides(nz, ny, nx)[0] == 1  # z fastest
    return ny + 2 * PAD, nx + 2 * PAD, nz + 2 * PAD


def tables(rays, asarray) -> tuple:
    """The ray table as the kernels take it, each array made by ``asarray(numpy array)`` (on the device)."""
    f64 = np.float64
    return (
        asarray(np.ascontiguousarray(rays.cos_phi, dtype=f64)),
        asarray(np.ascontiguousarray(rays.sin_phi, dtype=f64)),
        asarray(np.ascontiguousarray(rays.s, dtype=f64)),
        asarray(np.ascontiguousarray(rays.m, dtype=f64)),
        asarray(np.ascontiguousarray(rays.tan_theta, dtype=f64)),
        asarray(np.ascontiguousarray(rays.axial_sampling, dtype=f64)),
        asarray(np.ascontiguousarray(rays.num_axial_rays, dtype=np.int64)),
        asarray(np.asarray(rays.image_shape, dtype=np.int64)),
        asarray(np.asarray(rays.voxel_size, dtype=f64)),
        asarray(np.asarray(rays.first_voxel, dtype=f64)),
        float(rays.fov_radius_mm),
    )


def launch(kernel, data, target, table: tuple, stream=0) -> None:
    """Run ``kernel`` (:func:`forward_kernel` with data = padded images, target = sinograms, or
    :func:`adjoint_kernel` with data = sinograms, target = zeroed padded images) over every ray."""
    sino = target if kernel is forward_kernel else data
    total = int(np.prod(sino.shape))
    if total == 0:
        return
    blocks = (total + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    kernel[blocks, THREADS_PER_BLOCK, stream](data, target, *table)
