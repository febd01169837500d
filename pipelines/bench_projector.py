"""Benchmark of the embedded Joseph projector on a full Siemens mMR span-11 sinogram.

For each (device, image) point a fresh Python process builds the ray table, JIT-
compiles (or loads from numba's cache) the kernels on a tiny geometry, then times
one forward projection of a uniform cylinder and one back projection of the
resulting sinogram, and reports its peak resident memory (``ru_maxrss``, which
also counts what torch and numba take on import). Results are compared with STIR's
ray tracer (``--stir-reference``, measured on a similar 2-core machine), printed
as a table, written as JSON and drawn as a bar plot.

    python pipelines/bench_projector.py                      # mMR, both images, CPU (+ CUDA if present)
    python pipelines/bench_projector.py --quick              # small test scanner, smoke test
    python pipelines/bench_projector.py --images 172 --devices cpu --threads 2
    python pipelines/bench_projector.py --sirf --devices cpu   # + SIRF's ray tracing in the same run

With ``--sirf`` (needs ``sirf.STIR``) each image is also projected by SIRF's
``AcquisitionModelUsingRayTracingMatrix`` (one tangential LOR, storage scheme 'memory', on
the same geometry and cylinder) in its own process, and the table gives the ratios
SIRF / embedded measured in this run.

Images: ``default`` is SIRF's default image for the scanner (285x285x127 for the
mMR); an integer n is an n x n x nz image with the same voxels. The cylinder has
value 1, a radius of a quarter of the image width and fills every plane.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STIR_REFERENCE = REPO.parent / "shared" / "bench" / "stir_reference.json"
DEFAULT_OUT = REPO / "pipelines" / "results" / "bench_projector.json"


# ----------------------------------------------------------------------------- one point (child process)


def _geometry(quick: bool):
    from sirf_fbsem.geometry import SinogramGeometry, scanner_preset

    if quick:
        return SinogramGeometry.from_span(scanner_preset("small_test"), span=3, max_ring_diff=4)
    return SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=60)


def _image(sino, spec: str):
    from sirf_fbsem.geometry import ImageGeometry

    im = sino.default_image()
    if spec == "default":
        return im
    n = int(spec)
    return ImageGeometry((im.shape[0], n, n), im.voxel_size_mm, im.origin_mm)


def _timed(fn):
    """``(fn(), wall seconds, CPU seconds of the process)``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _cylinder(im, torch):
    """Value 1 inside radius = width / 4 (voxel centres), every plane."""
    import numpy as np

    _, y, x = im.centred_coordinates_mm()
    radius = im.shape[2] * im.voxel_size_mm[2] / 4.0
    disc = (y[:, None] ** 2 + x[None, :] ** 2) < radius**2
    img = np.broadcast_to(disc, im.shape).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0), radius


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cuda_backend() -> str:
    """Which kernels the default CUDA path ran: numba's CUDA kernels, or torch after they failed."""
    from sirf_fbsem.projectors import joseph

    return "torch (CUDA kernels failed)" if joseph.cuda_kernel_failures() else "numba-cuda"


def run_sirf_point(image: str, quick: bool) -> dict:
    """Time SIRF's ray-tracing forward and back projection of the same cylinder (one LOR per bin)."""
    t_import = time.perf_counter()
    import numpy as np
    import sirf.STIR as pet
    import torch

    from sirf_fbsem.projectors.sirf import sirf_templates

    t_import = time.perf_counter() - t_import
    pet.set_verbosity(0)
    pet.MessageRedirector(info=None, warn=None)
    pet.AcquisitionData.set_storage_scheme("memory")
    sino = _geometry(quick)
    im = _image(sino, image)
    acq, img = sirf_templates(sino, im)
    x, radius = _cylinder(im, torch)
    img.fill(x.numpy().astype(np.float32).reshape(im.shape))
    am = pet.AcquisitionModelUsingRayTracingMatrix()
    am.set_num_tangential_LORs(1)
    t0 = time.perf_counter()
    am.set_up(acq, img)
    setup_s = time.perf_counter() - t0
    y, fwd_s, fwd_cpu_s = _timed(lambda: am.forward(img))
    b, back_s, back_cpu_s = _timed(lambda: am.backward(y))
    return {
        "scanner": sino.scanner.name, "span": sino.span, "sinogram_shape": list(sino.shape), "image": image,
        "image_shape": list(im.shape), "voxel_size_mm": list(im.voxel_size_mm), "device": "sirf",
        "device_name": f"SIRF {pet.__file__} (STIR ray tracing, 1 LOR, CPU)", "backend": "sirf",
        "dtype": "float32", "threads": os.cpu_count(), "import_s": round(t_import, 3), "jit_s": 0.0,
        "ray_table_s": round(setup_s, 3), "forward_s": round(fwd_s, 3), "back_s": round(back_s, 3),
        "forward_cpu_s": round(fwd_cpu_s, 3), "back_cpu_s": round(back_cpu_s, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "cylinder_radius_mm": round(radius, 3), "sino_sum": float(np.asarray(y.as_array(), np.float64).sum()),
        "backprojection_sum": float(np.asarray(b.as_array(), np.float64).sum()),
        "load_average_after": list(os.getloadavg()),
    }


def run_point(device: str, image: str, quick: bool) -> dict:
    """Time one forward and one back projection; returns a result record."""
    if device == "sirf":
        return run_sirf_point(image, quick)
    if device == "siddon":
        return run_siddon_point(image, quick)
    t_import = time.perf_counter()
    import numba
    import torch

    from sirf_fbsem.projectors.joseph import joseph_adjoint, joseph_forward
    from sirf_fbsem.projectors.rays import make_ray_table

    t_import = time.perf_counter() - t_import
    torch.set_grad_enabled(False)
    sino = _geometry(quick)
    im = _image(sino, image)
    # "cuda": the default CUDA path (numba CUDA kernels); "cuda-torch": the vectorised torch kernels
    dev = torch.device("cuda" if device.startswith("cuda") else device)
    backend = "torch" if device == "cuda-torch" else "auto"

    # JIT / kernel warm-up on a tiny geometry (numba: compile or load from its cache)
    from sirf_fbsem.geometry import SinogramGeometry, scanner_preset

    tiny = SinogramGeometry.from_span(scanner_preset("small_test"), span=3, max_ring_diff=4)
    tiny_rays = make_ray_table(tiny, tiny.default_image(), views=[0, 1])
    t0 = time.perf_counter()
    xt = torch.ones((1,) + tiny.default_image().shape, dtype=torch.float32, device=dev)
    yt = joseph_forward(xt, tiny_rays, backend=backend)
    joseph_adjoint(yt, tiny_rays, backend=backend)
    _sync(torch, device)
    jit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    rays = make_ray_table(sino, im)
    rays_s = time.perf_counter() - t0
    x, radius = _cylinder(im, torch)
    x = x.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(torch, device)
    t0, c0 = time.perf_counter(), time.process_time()
    y = joseph_forward(x, rays, backend=backend)
    _sync(torch, device)
    fwd_s, fwd_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    b = joseph_adjoint(y, rays, backend=backend)
    _sync(torch, device)
    back_s, back_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    rec = {
        "scanner": sino.scanner.name,
        "span": sino.span,
        "sinogram_shape": list(sino.shape),
        "image": image,
        "image_shape": list(im.shape),
        "voxel_size_mm": list(im.voxel_size_mm),
        "device": device,
        "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or platform.machine(),
        "backend": {"cpu": "numba", "cuda": _cuda_backend(), "cuda-torch": "torch"}[device],
        "dtype": "float32",
        "threads": numba.get_num_threads() if device == "cpu" else None,
        "import_s": round(t_import, 3),
        "jit_s": round(jit_s, 3),
        "ray_table_s": round(rays_s, 3),
        "forward_s": round(fwd_s, 3),
        "back_s": round(back_s, 3),
        # CPU seconds of the process (all threads): on a busy machine, cpu_s / threads is
        # what the wall time would be with the cores to ourselves
        "forward_cpu_s": round(fwd_cpu_s, 3),
        "back_cpu_s": round(back_cpu_s, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "cylinder_radius_mm": round(radius, 3),
        "sino_sum": float(y.double().sum()) / im.voxel_size_mm[2],  # SIRF's pixel units (the kernel gives mm)
        "backprojection_sum": float(b.double().sum()),
        "load_average_after": list(os.getloadavg()),  # 1, 5, 15 min: other work on the machine
    }
    if dev.type == "cuda":
        rec["cuda_max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return rec


def run_siddon_point(image: str, quick: bool) -> dict:
    """The embedded projector with ``ray_tracing="siddon"`` (STIR's matrix row for row, CPU):
    plan set-up, one forward and one back projection of the same cylinder."""
    import numba
    import torch

    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel

    torch.set_grad_enabled(False)
    sino = _geometry(quick)
    im = _image(sino, image)
    model = EmbeddedAcquisitionModel(sino, im, ray_tracing="siddon")
    from sirf_fbsem.geometry import SinogramGeometry, scanner_preset

    tiny = SinogramGeometry.from_span(scanner_preset("small_test"), span=3, max_ring_diff=4)
    t0 = time.perf_counter()
    warm = EmbeddedAcquisitionModel(tiny, tiny.default_image(), ray_tracing="siddon")
    warm.adjoint(warm.direct(torch.ones(tiny.default_image().shape)))
    jit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.siddon_plan(None)
    plan_s = time.perf_counter() - t0
    x, radius = _cylinder(im, torch)
    y, fwd_s, fwd_cpu_s = _timed(lambda: model.direct(x[0] if x.dim() == 4 else x))
    b, back_s, back_cpu_s = _timed(lambda: model.adjoint(y))
    return {
        "scanner": sino.scanner.name, "span": sino.span, "sinogram_shape": list(sino.shape), "image": image,
        "image_shape": list(im.shape), "voxel_size_mm": list(im.voxel_size_mm), "device": "siddon",
        "device_name": platform.processor() or platform.machine(), "backend": "numba (Siddon)",
        "dtype": "float32", "threads": numba.get_num_threads(), "jit_s": round(jit_s, 3),
        "ray_table_s": round(plan_s, 3), "forward_s": round(fwd_s, 3), "back_s": round(back_s, 3),
        "forward_cpu_s": round(fwd_cpu_s, 3), "back_cpu_s": round(back_cpu_s, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "cylinder_radius_mm": round(radius, 3),
        "sino_sum": float(y.double().sum()),  # pixel units already
        "backprojection_sum": float(b.double().sum()),
        "load_average_after": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------- driver


def _stir_reference(path: Path) -> dict[tuple[int, ...], dict]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {tuple(r["image_shape"]): r for r in data.get("results", [])}


def _spawn(device: str, image: str, quick: bool, threads: int | None, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--devices", device, "--images", image]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["NUMBA_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        return {"device": device, "image": image, "error": proc.stderr.strip().splitlines()[-5:]}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_wall_s"] = round(time.perf_counter() - t0, 3)
    return rec


def _table(results: list[dict]) -> str:
    head = (
        f"{'device':6} {'image (z,y,x)':16} {'thr':>3} {'jit s':>6} {'fwd s':>8} {'back s':>8} "
        f"{'fwd cpu':>8} {'back cpu':>8} {'RSS GB':>6} {'STIR fwd':>8} {'STIR back':>9} {'x fwd':>6} {'x back':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['device']:6} {r['image']:16} ERROR {' | '.join(r['error'])}")
            continue
        st = r.get("stir") or {}
        sf, sb = st.get("forward_s"), st.get("back_s")
        shape = "x".join(str(n) for n in r["image_shape"])
        lines.append(
            f"{r['device']:6} {shape:16} {r['threads'] or '-':>3} {r['jit_s']:6.1f} {r['forward_s']:8.2f} "
            f"{r['back_s']:8.2f} {r['forward_cpu_s']:8.1f} {r['back_cpu_s']:8.1f} {r['peak_rss_gb']:6.2f} "
            f"{sf if sf is not None else '-':>8} {sb if sb is not None else '-':>9} "
            f"{(sf / r['forward_s']) if sf else float('nan'):6.1f} {(sb / r['back_s']) if sb else float('nan'):6.1f}"
        )
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    labels, series = [], {}
    for r in ok:
        shape = "x".join(str(n) for n in r["image_shape"])
        labels.append(f"{shape} (z,y,x)\n{r['device']}")
        st = r.get("stir") or {}
        for key, val in (
            ("ours forward", r["forward_s"]),
            ("ours back", r["back_s"]),
            ("STIR forward", st.get("forward_s", math.nan)),
            ("STIR back", st.get("back_s", math.nan)),
        ):
            series.setdefault(key, []).append(val)
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(labels), 4))
    width = 0.2
    colours = {"ours forward": "#1f77b4", "ours back": "#aec7e8", "STIR forward": "#d62728", "STIR back": "#ff9896"}
    for j, (key, vals) in enumerate(series.items()):
        xs = [i + (j - 1.5) * width for i in range(len(labels))]
        ax.bar(xs, vals, width, label=key, color=colours[key])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("wall time (s)")
    ax.set_title(f"{ok[0]['scanner']} span {ok[0]['span']}: one full projection")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=None, help="comma-separated: 'default' and/or n (n x n x nz); default: default,172")
    ap.add_argument("--devices", default="cpu,cuda",
                    help="comma-separated subset of cpu,cuda,cuda-torch,siddon (cuda: the default CUDA path, "
                         "numba CUDA kernels; cuda-torch: the vectorised torch kernels; both skipped without "
                         "a GPU; siddon: the embedded ray_tracing='siddon' mode on the CPU)")
    ap.add_argument("--quick", action="store_true", help="small test scanner (smoke test); images default to default,31")
    ap.add_argument("--threads", type=int, default=None, help="numba threads (default: numba's, all cores)")
    ap.add_argument("--stir-reference", type=Path, default=DEFAULT_STIR_REFERENCE)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results; the plot goes next to it (.png)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per point")
    ap.add_argument("--sirf", action="store_true",
                    help="also time SIRF's ray tracing on each image in this run (needs sirf.STIR)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    images = (args.images or ("default,31" if args.quick else "default,172")).split(",")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    for d in devices:
        if d not in ("cpu", "cuda", "cuda-torch", "sirf", "siddon"):
            ap.error(f"--devices: expected cpu, cuda, cuda-torch and/or siddon (the embedded Siddon mode, CPU), "
                     f"got {d!r}")
    if args.sirf and "sirf" not in devices:
        devices.append("sirf")

    if args.worker:
        print(json.dumps(run_point(devices[0], images[0], args.quick)))
        return 0

    import torch

    if "sirf" in devices:
        try:
            import sirf.STIR  # noqa: F401
        except ImportError:
            ap.error("--sirf needs sirf.STIR, which does not import here")
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        print("CUDA not available: skipping the cuda points", file=sys.stderr)
        devices = [d for d in devices if not d.startswith("cuda")]
    stir = {} if args.quick else _stir_reference(args.stir_reference)
    if not args.quick and not stir:
        print(f"no STIR reference at {args.stir_reference}: no comparison", file=sys.stderr)
    results = []
    for device in devices:
        for image in images:
            print(f"... {device} {image}", file=sys.stderr, flush=True)
            rec = _spawn(device, image, args.quick, args.threads, args.timeout)
            if "error" not in rec and tuple(rec["image_shape"]) in stir:
                ref = stir[tuple(rec["image_shape"])]
                rec["stir"] = {k: ref.get(k) for k in ("forward_s", "back_s", "peak_rss_gb", "sino_sum", "projector")}
                rec["speedup_forward"] = round(ref["forward_s"] / rec["forward_s"], 2)
                rec["speedup_back"] = round(ref["back_s"] / rec["back_s"], 2)
            results.append(rec)
    sirf_runs = {tuple(r["image_shape"]): r for r in results if r.get("device") == "sirf" and "error" not in r}
    for rec in results:
        ref = sirf_runs.get(tuple(rec.get("image_shape", ())))
        if ref is not None and rec["device"] != "sirf" and "error" not in rec:
            rec["sirf_over_embedded_forward"] = round(ref["forward_s"] / rec["forward_s"], 2)
            rec["sirf_over_embedded_back"] = round(ref["back_s"] / rec["back_s"], 2)
            rec["sirf_sino_sum_ratio"] = round(rec["sino_sum"] / ref["sino_sum"], 5)
    report = {
        "description": "Embedded Joseph projector, one full forward and back projection of a uniform cylinder "
        "(float32); wall seconds; peak RSS of a fresh process per point.",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_start": list(os.getloadavg()),
        },
        "stir_reference": str(args.stir_reference) if stir else None,
        "results": results,
    }
    print(_table(results))
    for rec in results:
        if "sirf_over_embedded_forward" in rec:
            shape = "x".join(str(n) for n in rec["image_shape"])
            print(f"SIRF / embedded ({rec['device']}, {shape}): forward {rec['sirf_over_embedded_forward']}x, "
                  f"back {rec['sirf_over_embedded_back']}x; sinogram sums embedded/SIRF {rec['sirf_sino_sum_ratio']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    _plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
