"""Joseph's CUDA kernels (sirf_fbsem.projectors.joseph_cuda) give the CPU kernels' numbers.

Everywhere: the kernels run in numba's CUDA simulator (a fresh process with NUMBA_ENABLE_CUDASIM=1,
tests/projectors/cuda_sim_worker.py) on the kernel tests' geometries, cut to 2 views, batches of 2,
float64 and float32, against the numba CPU kernels. Where a GPU is: the compiled kernels on it
against the CPU, on the same geometries at full size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sirf_fbsem.projectors.joseph import joseph_adjoint, joseph_forward

from test_joseph_kernels import _case

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: sub-rays (span 1), principal axis z, an image off the scanner's grid, arc-corrected bins with no LOR (NaN)
SIM_CASES = ["span1_thick", "steep", "odd_image", "arc_span3"]


def test_cuda_kernels_in_the_simulator_equal_the_cpu_kernels():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(HERE / "cuda_sim_worker.py"), *SIM_CASES], capture_output=True,
                          text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in results] == SIM_CASES
    for r in results:
        assert r["forward_rel_f64"] < 1e-12 and r["adjoint_rel_f64"] < 1e-12, r
        assert r["forward_rel_f32"] < 2e-6 and r["adjoint_rel_f32"] < 2e-6, r
        assert r["adjoint_mismatch_f64"] < 1e-12 and r["adjoint_mismatch_f32"] < 1e-5, r
        assert r["forward_batch_items_differ_f64"] and r["forward_sum_f64"] > 0, r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", SIM_CASES + ["mmr_span11_rings"])
def test_cuda_kernels_on_the_gpu_equal_the_cpu_kernels(case):
    rays, _ = _case(case)
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2,) + tuple(rays.image_shape), generator=g)
    y = torch.rand((2,) + tuple(rays.sinogram_shape), generator=g)
    for fn, arg in ((joseph_forward, x), (joseph_adjoint, y)):
        ref = fn(arg, rays, backend="numba")
        got = fn(arg.cuda(), rays, backend="cuda").cpu()
        assert float((got - ref).norm() / ref.norm()) < 2e-6, (case, fn.__name__)


def test_auto_falls_back_to_torch_with_a_warning_when_the_cuda_kernels_fail(monkeypatch):
    """Where the CUDA kernels cannot compile or launch, ``auto`` projects with torch (same numbers), says
    why once, and does not try the kernels again in this process; ``backend="cuda"`` raises instead."""
    from sirf_fbsem.projectors import joseph

    monkeypatch.setattr(joseph, "_cuda_kernels_failed", [])
    monkeypatch.setattr(joseph, "_numba_sees_a_gpu", lambda: True)
    cuda = torch.device("cuda")
    assert joseph._pick("auto", cuda) == "auto-cuda" and joseph._pick("auto", torch.device("cpu")) == "numba"

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    with pytest.warns(RuntimeWarning, match="no kernel image"):
        out = joseph._run_cuda("auto-cuda", broken, lambda a: a + 1, 1)
    assert out == 2 and joseph.cuda_kernel_failures()
    assert joseph._pick("auto", cuda) == "torch"  # not tried again
    with pytest.raises(RuntimeError, match="no kernel image"):
        joseph._run_cuda("cuda", broken, lambda a: a + 1, 1)
    with pytest.raises(ValueError, match="CUDA tensors"):
        joseph._pick("cuda", torch.device("cpu"))


def test_row_stack_is_put_back_only_where_numpy_lacks_it():
    """numba-cuda compiles no kernel under numpy >= 2.5 without np.row_stack (NVIDIA/numba-cuda#907)."""
    import types

    import numpy as np
    from sirf_fbsem.projectors.joseph_cuda import restore_row_stack

    without = types.SimpleNamespace(vstack=np.vstack)
    assert restore_row_stack(without) is True
    assert without.row_stack is np.vstack
    np.testing.assert_array_equal(without.row_stack(([1, 2], [3, 4])), [[1, 2], [3, 4]])
    own = object()
    with_own = types.SimpleNamespace(vstack=np.vstack, row_stack=own)
    assert restore_row_stack(with_own) is False and with_own.row_stack is own
    assert hasattr(np, "row_stack")  # importing the kernels' module leaves this numpy with it
