"""Run Joseph's CUDA kernels (sirf_fbsem.projectors.joseph_cuda) in numba's CUDA simulator and compare
them with the numba CPU kernels; prints one JSON line per case. Started by test_joseph_cuda.py in a
fresh process with NUMBA_ENABLE_CUDASIM=1 (the simulator must be chosen before numba.cuda is imported).

    NUMBA_ENABLE_CUDASIM=1 python tests/projectors/cuda_sim_worker.py CASE [CASE ...]
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_joseph_kernels import _case  # noqa: E402  (the kernel tests' geometries)

from sirf_fbsem.projectors import joseph_cuda as jc  # noqa: E402
from sirf_fbsem.projectors import joseph_numba as jn  # noqa: E402
from sirf_fbsem.projectors.joseph import joseph_adjoint, joseph_forward  # noqa: E402

#: views kept per case: the simulator runs every GPU thread as a Python thread
MAX_VIEWS = 2


def cuda_forward(x: np.ndarray, rays) -> np.ndarray:
    out = np.zeros((x.shape[0],) + tuple(rays.sinogram_shape), dtype=x.dtype)
    jc.launch(jc.forward_kernel, jn.pad_image(x), out, jc.tables(rays, np.asarray))
    return out


def cuda_adjoint(y: np.ndarray, rays) -> np.ndarray:
    nz, ny, nx = rays.image_shape
    ny2, nx2, nz2 = jc.padded_shape((nz, ny, nx))
    buf = np.zeros((y.shape[0], ny2 * nx2 * nz2), dtype=y.dtype)
    jc.launch(jc.adjoint_kernel, np.ascontiguousarray(y), buf, jc.tables(rays, np.asarray))
    p = jn.PAD
    return buf.reshape(-1, ny2, nx2, nz2)[:, p:p + ny, p:p + nx, p:p + nz].transpose(0, 3, 1, 2)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-300))


def main(cases: list[str]) -> None:
    assert jc.simulated(), "run with NUMBA_ENABLE_CUDASIM=1"
    for name in cases:
        rays, _ = _case(name)
        step = max(1, len(rays.cos_phi) // MAX_VIEWS)
        rays = dataclasses.replace(rays, cos_phi=rays.cos_phi[::step][:MAX_VIEWS], sin_phi=rays.sin_phi[::step][:MAX_VIEWS])
        g = np.random.default_rng(7)
        res = {"case": name, "sinogram_shape": list(rays.sinogram_shape), "image_shape": list(rays.image_shape)}
        for dt in (np.float64, np.float32):
            x = g.random((2,) + tuple(rays.image_shape)).astype(dt)
            y = g.random((2,) + tuple(rays.sinogram_shape)).astype(dt)
            y[:, :, 0, ::3] = 0.0  # bins the adjoint skips
            fc, ac = cuda_forward(x, rays), cuda_adjoint(y, rays)
            fn = joseph_forward(torch.from_numpy(x), rays, backend="numba").numpy()
            an = joseph_adjoint(torch.from_numpy(y), rays, backend="numba").numpy()
            key = "f64" if dt == np.float64 else "f32"
            res[f"forward_rel_{key}"] = rel(fc, fn)
            res[f"adjoint_rel_{key}"] = rel(ac, an)
            res[f"forward_batch_items_differ_{key}"] = rel(fc[0], fc[1]) > 0
            # <A x, y> = <x, A^T y> within the simulated kernels alone
            lhs, rhs = float(np.vdot(fc.astype(np.float64), y)), float(np.vdot(x.astype(np.float64), ac))
            res[f"adjoint_mismatch_{key}"] = abs(lhs - rhs) / abs(lhs)
            res[f"forward_sum_{key}"] = float(fc.sum())
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
