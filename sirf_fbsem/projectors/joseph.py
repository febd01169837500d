"""Joseph's method: the embedded projector's line integrals, and their exact transpose.

    y[b, r, v, t] = sum_k  step(r, v, t) * bilinear(x[b], plane k of the principal axis)

Shapes: images ``(B, Z, Y, X)`` (activity per voxel), sinograms ``(B, S, V, N)``
(activity x mm) for the rows, views and tangential positions of a
:class:`~.rays.RayTable`. ``joseph_forward(x, rays)`` is the line integral of the
voxel-interpolated image along every ray, so an image of ones gives chord lengths
in mm; ``joseph_adjoint`` applies the transpose of the same weights.

Algorithm (Joseph 1982, as in parallelproj). A ray runs along
``d = (dX, dY, dZ) = (sin phi, -cos phi, -tan theta)`` per unit of the in-plane
parameter u. Its principal axis is the one crossing most voxel planes,
``argmax(|dX|/vx, |dY|/vy, |dZ|/vz)``. At every voxel-centre plane of that axis
whose crossing lies in the traced part of the ray (inside the image and, when the
ray table has one, inside the cylindrical FOV: ``|u| <= sqrt(R_fov^2 - s^2)``) the
image is interpolated bilinearly in the other two axes (corners outside the
image count as 0) and weighted by the path length per plane,
``v_p sqrt(dX^2 + dY^2 + dZ^2) / |d_p|`` (mm). Rows with ``num_axial_rays = n > 1``
trace n sub-rays offset in z, each weighted 1/n (STIR's axial "thickness").

Why Joseph rather than Siddon (STIR's ray tracer): one sample per plane, a fixed
amount of work per sample (two index computations, four loads, a bilinear blend)
and no branching on which voxel boundary comes next, so it is cheaper per sample,
vectorises and maps onto GPU threads; the interpolation makes it smooth in the
LOR coordinates (no aliasing spikes for rays along voxel rows); and the same
weights serve the forward and the adjoint, so the pair is an exact transpose.

Backends: ``"numba"`` (CPU, :mod:`.joseph_numba`), ``"cuda"`` (numba CUDA kernels, one
thread per ray, :mod:`.joseph_cuda`) and ``"torch"`` (vectorised torch on any device,
:mod:`.joseph_torch`) trace identical planes with identical weights; ``"auto"`` picks numba
for CPU tensors and, for CUDA tensors, the CUDA kernels where numba finds a GPU, else torch
(also, with a warning, if the CUDA kernels fail to compile or launch). No autograd
here: inputs are detached; the autograd layer calls these under ``no_grad``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from . import joseph_numba as _nb
from . import joseph_torch as _jt

try:  # numba's CUDA target (built in, or the numba-cuda package); without it, no CUDA kernels
    from . import joseph_cuda as _jc
except ImportError:  # pragma: no cover - every numba this package supports has one
    _jc = None
from .rays import RayTable

__all__ = ["joseph_forward", "joseph_adjoint", "BACKENDS", "cuda_kernel_failures"]

#: accepted values of ``backend``
BACKENDS = ("auto", "numba", "torch", "cuda")

#: per-thread adjoint buffers are limited to this many bytes in all (fewer chunks than threads beyond it)
_ADJOINT_BUFFER_BYTES = 2 << 30


#: why "auto" no longer uses the CUDA kernels in this process (empty: they have not failed)
_cuda_kernels_failed: list[str] = []


def _pick(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' projects CUDA tensors, got a tensor on {device}")
    if backend == "cuda" and _jc is None:
        raise ValueError("backend 'cuda' needs numba's CUDA target, which this numba lacks; use backend 'torch'")
    if backend == "auto":
        if device.type == "cpu":
            return "numba"
        return "auto-cuda" if device.type == "cuda" and not _cuda_kernels_failed and _numba_sees_a_gpu() else "torch"
    return backend


def cuda_kernel_failures() -> tuple[str, ...]:
    """Why ``backend="auto"`` stopped using the CUDA kernels in this process (empty: it has not)."""
    return tuple(_cuda_kernels_failed)


def _numba_sees_a_gpu() -> bool:
    return _jc is not None and bool(_jc.cuda.is_available())


def _run_cuda(kind: str, fn, fallback, *args) -> torch.Tensor:
    """``fn(*args)`` (the CUDA kernels) under ``kind`` "cuda", or under "auto-cuda" with ``fallback`` (torch)
    if the kernels cannot run here (compilation or launch fails): a warning says why, once per process."""
    if kind == "cuda":
        return fn(*args)
    try:
        return fn(*args)
    except Exception as err:  # numba's compile/driver errors have no common base class
        _cuda_kernels_failed.append(f"{type(err).__name__}: {err}")
        warnings.warn(f"Joseph's CUDA kernels failed ({_cuda_kernels_failed[-1]}); projecting with the vectorised "
                      f"torch kernels instead (same numbers, slower)", RuntimeWarning, stacklevel=3)
        return fallback(*args)


def _cuda_call(kernel_name: str, data: torch.Tensor, target: torch.Tensor, rays: RayTable) -> None:
    """Run a :mod:`.joseph_cuda` kernel on torch CUDA tensors, on torch's current stream of their device."""
    if _jc is None:
        raise RuntimeError("this numba has no CUDA target: Joseph's CUDA kernels cannot run (backend 'torch' can)")
    cuda = _jc.cuda
    dev = data.device
    with cuda.gpus[dev.index if dev.index is not None else torch.cuda.current_device()]:
        stream = cuda.external_stream(torch.cuda.current_stream(dev).cuda_stream)
        table = _jc.tables(rays, lambda a: cuda.to_device(a, stream=stream))
        kernel = getattr(_jc, kernel_name)
        _jc.launch(kernel, cuda.as_cuda_array(data), cuda.as_cuda_array(target), table, stream)


def _cuda_forward(image: torch.Tensor, rays: RayTable) -> torch.Tensor:
    nb, p = image.shape[0], _nb.PAD
    ny2, nx2, nz2 = _jc.padded_shape(tuple(rays.image_shape))
    padded = torch.zeros((nb, ny2, nx2, nz2), dtype=image.dtype, device=image.device)
    padded[:, p:ny2 - p, p:nx2 - p, p:nz2 - p] = image.permute(0, 2, 3, 1)
    out = torch.empty((nb,) + tuple(rays.sinogram_shape), dtype=image.dtype, device=image.device)
    _cuda_call("forward_kernel", padded.view(nb, -1), out, rays)
    return out


def _cuda_adjoint(sino: torch.Tensor, rays: RayTable) -> torch.Tensor:
    nb, p = sino.shape[0], _nb.PAD
    nz, ny, nx = (int(n) for n in rays.image_shape)
    ny2, nx2, nz2 = _jc.padded_shape((nz, ny, nx))
    buf = torch.zeros((nb, ny2 * nx2 * nz2), dtype=sino.dtype, device=sino.device)
    _cuda_call("adjoint_kernel", sino.contiguous(), buf, rays)
    return buf.view(nb, ny2, nx2, nz2)[:, p:p + ny, p:p + nx, p:p + nz].permute(0, 3, 1, 2).contiguous()


def _check(t: torch.Tensor, name: str, shape: tuple[int, ...], what: str) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dim() != 4 or tuple(t.shape[1:]) != shape:
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}) ({what}), got {tuple(t.shape)}")


def _tables(rays: RayTable) -> tuple:
    """The ray table as the numba kernels take it (float64 / int64 contiguous arrays)."""
    f64 = np.ascontiguousarray
    return (
        f64(rays.cos_phi, dtype=np.float64),
        f64(rays.sin_phi, dtype=np.float64),
        f64(rays.s, dtype=np.float64),
        f64(rays.m, dtype=np.float64),
        f64(rays.tan_theta, dtype=np.float64),
        f64(rays.axial_sampling, dtype=np.float64),
        f64(rays.num_axial_rays, dtype=np.int64),
        np.asarray(rays.image_shape, dtype=np.int64),
        np.asarray(rays.voxel_size, dtype=np.float64),
        np.asarray(rays.first_voxel, dtype=np.float64),
        float(rays.fov_radius_mm),
        *_nb.row_blocks(rays.m, rays.tan_theta, rays.axial_sampling, rays.num_axial_rays, rays.voxel_size[0]),
    )


def joseph_forward(image: torch.Tensor, rays: RayTable, backend: str = "auto") -> torch.Tensor:
    """Line integrals (mm x activity) of ``image`` (B, Z, Y, X) along ``rays``: (B, S, V, N), same dtype/device."""
    _check(image, "image", tuple(rays.image_shape), "Z, Y, X of the ray table")
    image = image.detach()
    kind = _pick(backend, image.device)
    if kind == "torch":
        return _jt.forward(image, rays)
    if kind in ("cuda", "auto-cuda"):
        return _run_cuda(kind, _cuda_forward, _jt.forward, image.contiguous(), rays)
    x = image.cpu().contiguous().numpy()
    out = np.empty((x.shape[0],) + rays.sinogram_shape, dtype=x.dtype)
    _nb.forward_kernel(_nb.pad_image(x), out, *_tables(rays), _nb.num_threads())
    return torch.from_numpy(out).to(image.device)


def joseph_adjoint(sino: torch.Tensor, rays: RayTable, backend: str = "auto") -> torch.Tensor:
    """Exact transpose of :func:`joseph_forward`: sinogram (B, S, V, N) -> image (B, Z, Y, X), same dtype/device."""
    _check(sino, "sino", tuple(rays.sinogram_shape), "S, V, N of the ray table")
    sino = sino.detach()
    kind = _pick(backend, sino.device)
    if kind == "torch":
        return _jt.adjoint(sino, rays)
    if kind in ("cuda", "auto-cuda"):
        return _run_cuda(kind, _cuda_adjoint, _jt.adjoint, sino.contiguous(), rays)
    y = sino.cpu().contiguous().numpy()
    nb = y.shape[0]
    nz, ny, nx = rays.image_shape
    p = _nb.PAD
    padded = (nz + 2 * p) * (ny + 2 * p) * (nx + 2 * p)
    per_buffer = nb * padded * y.dtype.itemsize
    n_chunks = max(1, min(_nb.num_threads(), _ADJOINT_BUFFER_BYTES // per_buffer))
    bufs = np.zeros((n_chunks, nb, padded), dtype=y.dtype)
    _nb.adjoint_kernel(y, bufs, *_tables(rays))
    out = np.empty((nb, nz, ny, nx), dtype=y.dtype)
    _nb.reduce_buffers(bufs, out)
    return torch.from_numpy(out).to(sino.device)
