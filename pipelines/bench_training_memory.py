"""Peak memory of ONE FBSEM-Net training step versus the number of stages K, per training mode.

    python pipelines/bench_training_memory.py                 # CPU (+ CUDA when present), K = 1 2 4 8 16 32 60
    python pipelines/bench_training_memory.py --stages 1 2 4 8 16
    python pipelines/bench_training_memory.py --quick         # small smoke run

Each point (mode, K, device) runs in a FRESH Python process, so the CPU figure is
that process's peak resident set size (``ru_maxrss``), with the resident size just
before the step reported beside it (the step's own share is the difference). On
CUDA the figure is ``torch.cuda.max_memory_allocated`` over the step.

One step = forward, backward and Adam update of one sample (batch size 1):

* ``sequential``: one step of stage K's training; its input is a cached, detached
  image (here a stand-in, 0 where no LOR sees the voxel as a stage's output is), so the
  step holds one stage whatever K.
* ``end_to_end``: one graph through K stages, loss on the last output.
* ``checkpointed``: the same with ``torch.utils.checkpoint`` around every stage.
* ``greedy``: K stages, each on the detached output of the one before, each
  backpropagated as soon as its loss is known.

With ``--block-size Z,Y,X`` every stage's CNN runs block by block under gradient
checkpointing (the block-wise regulariser, ``FBSEMNet.set_block_shape``; same values and
gradients as the whole volume), in every mode; the JSON's problem records the blocks and the
default output name gains ``_blocks``.

Problem (printed and written to the JSON): a 3D image of 64 x 128 x 128 voxels of
2 mm (z, y, x), a made-up scanner of 32 rings (4 mm) and 128 detectors, span 3 with
maximum ring difference 1 (63 sinograms), view mashing 2 (32 views), 128
arc-corrected tangential bins of 2 mm, 4 subsets; 3D residual CNN with 32 channels
and 5 convolutions (the model's defaults). The targets are one image broadcast over
the K stages (no memory per stage): values do not change memory.

With ``--tensor-memory`` (CPU) the worker also runs the step under
``torch.distributed._tools.mem_tracker.MemTracker``, which follows every tensor storage
(parameters, data, activations, gradients, optimiser state, temporaries) and reports the
peak of live tensor bytes: the CPU counterpart of ``max_memory_allocated`` (no
interpreter, library or allocator-retention baseline, which RSS includes). MemTracker is
a private torch API: if it is missing the figure is left out. It refuses a step that calls the
network more than once (greedy: once per stage), so greedy points have RSS only.

The summary (printed, and ``summary`` in the JSON) gives per metric the ratio of the
sequential step at the largest K to the end-to-end step at that K, measured or, where
end-to-end was skipped, from a least-squares line through its measured points (its
largest relative residual is given as a check of linearity).

CPU points whose memory, extrapolated linearly in K from the points already
measured for that mode, would exceed ``--max-rss-gb`` are skipped (recorded as such).

Peak RSS includes what glibc's allocator keeps after ``free``: with its default
dynamic mmap threshold, freed image-sized blocks (4 MiB here) stay in the heap and
fragment it, so RSS creeps up with K even where live memory does not (checkpointed,
greedy). ``--mmap-threshold 1048576`` sets ``MALLOC_MMAP_THRESHOLD_`` in the workers,
so RSS follows live memory; the JSON records the setting.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sirf_fbsem.argtypes import voxel_shape  # noqa: E402  (argparse type only: no torch at import)

RESULTS = ROOT / "pipelines" / "results"
MODES = ("sequential", "end_to_end", "checkpointed", "greedy")
DEFAULT_STAGES = (1, 2, 4, 8, 16, 32, 60)


PROBLEMS = ("bench3d", "quick", "mmr2d", "mmr3d")


def problem_description(problem: str) -> dict:
    """The benchmark's problem: ``bench3d`` (module docstring), ``quick`` (a smoke run), ``mmr2d``
    (the 2D studies' setting: one Siemens mMR ring, 1 x 128 x 128 image of the ring's voxels,
    6 subsets, 2D CNN of 32 channels x 5 layers; docs/studies/paper_findings.md) or ``mmr3d`` (the
    bundled 3D model's setting: the mMR at span 11, 837 x 252 x 344 bins, 127 x 128 x 128 image of
    2.03 x 2.09 x 2.09 mm, 7 subsets, 3D CNN of 16 channels x 5 layers, whole-volume steps;
    docs/studies/mmr_3d.md)."""
    if problem == "mmr3d":
        return {"scanner": "Siemens_mMR", "span": 11, "max_ring_diff": 60, "image_shape_zyx": [127, 128, 128],
                "num_subsets": 7, "regulariser": {"dims": 3, "in_channels": 1, "channels": 16, "layers": 5,
                                                   "kernel": 3}}
    if problem == "mmr2d":
        return {"scanner": "Siemens_mMR", "single_ring": True, "image_shape_zyx": [1, 128, 128], "num_subsets": 6,
                "regulariser": {"dims": 2, "in_channels": 1, "channels": 32, "layers": 5, "kernel": 3}}
    if problem == "quick":
        return {
            "image_shape_zyx": [16, 32, 32], "voxel_size_mm": [4.0, 4.0, 4.0],
            "scanner": {"name": "bench quick", "num_rings": 8, "num_detectors_per_ring": 64,
                        "inner_ring_radius_mm": 100.0, "average_depth_of_interaction_mm": 0.0,
                        "ring_spacing_mm": 8.0, "default_bin_size_mm": 4.0,
                        "max_num_non_arccorrected_bins": 32, "default_num_arccorrected_bins": 32},
            "span": 3, "max_ring_diff": 1, "view_mash_factor": 2, "arc_corrected": True, "num_subsets": 4,
            "regulariser": {"dims": 3, "in_channels": 1, "channels": 8, "layers": 3, "kernel": 3},
        }
    return {
        "image_shape_zyx": [64, 128, 128], "voxel_size_mm": [2.0, 2.0, 2.0],
        "scanner": {"name": "bench 32 rings", "num_rings": 32, "num_detectors_per_ring": 128,
                    "inner_ring_radius_mm": 190.0, "average_depth_of_interaction_mm": 0.0,
                    "ring_spacing_mm": 4.0, "default_bin_size_mm": 2.0,
                    "max_num_non_arccorrected_bins": 128, "default_num_arccorrected_bins": 128},
        "span": 3, "max_ring_diff": 1, "view_mash_factor": 2, "arc_corrected": True, "num_subsets": 4,
        "regulariser": {"dims": 3, "in_channels": 1, "channels": 32, "layers": 5, "kernel": 3},
    }


# ----------------------------------------------------------------------------- worker (fresh process)
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _geometries(desc: dict):
    from sirf_fbsem.geometry import ImageGeometry, Scanner, SinogramGeometry, scanner_preset
    from sirf_fbsem.simulation.acquisition import single_slice_geometry

    if desc.get("single_ring"):
        sino, image = single_slice_geometry(scanner_preset(desc["scanner"]))
        return sino, ImageGeometry(tuple(desc["image_shape_zyx"]), image.voxel_size_mm)
    if isinstance(desc["scanner"], str):  # a preset scanner at its default voxels
        sino = SinogramGeometry.from_span(scanner_preset(desc["scanner"]), span=desc["span"],
                                          max_ring_diff=desc["max_ring_diff"])
        return sino, ImageGeometry(tuple(desc["image_shape_zyx"]), sino.default_image().voxel_size_mm)
    sino = SinogramGeometry.from_span(Scanner(**desc["scanner"]), span=desc["span"],
                                      max_ring_diff=desc["max_ring_diff"], view_mash_factor=desc["view_mash_factor"],
                                      arc_corrected=desc["arc_corrected"])
    return sino, ImageGeometry(tuple(desc["image_shape_zyx"]), tuple(desc["voxel_size_mm"]))


def run_worker(mode: str, k: int, device: str, problem: str, dims: int | None, tensor_memory: bool = False,
               block_shape: tuple[int, int, int] | None = None) -> dict:
    """One training step of ``mode`` at ``K = k`` stages on ``device``; its peak memory (MiB) and wall time (s).

    ``block_shape`` (z, y, x voxels): run the stages' CNNs block by block (the block-wise regulariser).
    """
    import torch

    from sirf_fbsem.model import FBSEMNet, RegulariserConfig
    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
    from sirf_fbsem.recon.engine import start_image
    from sirf_fbsem.samples import Batch
    from sirf_fbsem.training import TrainConfig, training_step

    torch.manual_seed(0)
    desc = problem_description(problem)
    sino, image = _geometries(desc)
    nsub = desc["num_subsets"]
    reg = dict(desc["regulariser"])
    if dims is not None:
        reg["dims"] = dims
    dev = torch.device(device)
    model = EmbeddedAcquisitionModel(sino, image, num_subsets=nsub, additive=torch.full(sino.shape, 0.5), device=dev)
    z, y, x = (torch.as_tensor(c, dtype=torch.float32) for c in image.centred_coordinates_mm())
    Z, Y, X = torch.meshgrid(z, y, x, indexing="ij")
    body = ((X**2 + Y**2) < (0.8 * image.fov_radius_mm()) ** 2).float()
    phantom = (body * (1 + 2 * ((X - 20) ** 2 + Y**2 + Z**2 < 15.0**2).float())).to(dev)
    with torch.no_grad():
        prompts = torch.poisson(model.forward(phantom.unsqueeze(0)), generator=torch.Generator(dev).manual_seed(0))
        sens = torch.stack([model.sensitivity(s) for s in range(nsub)], dim=0).unsqueeze(0)
    net = FBSEMNet(k, nsub, RegulariserConfig(**reg)).to(dev)
    if block_shape is not None:
        net.set_block_shape(block_shape)
    batch = Batch(prompts=prompts, sensitivity=sens, targets=phantom[None, None].expand(1, k, *phantom.shape))
    cfg = TrainConfig(epochs=1, lr=1e-3, device=device, progress=False)
    opt = torch.optim.Adam(net.parameters() if mode != "sequential" else net.stages[k - 1].parameters(), lr=1e-3)
    # stand-in for stage K's cached input: an image that is 0 where no LOR sees the voxel, as the start
    # image and every stage's output are (one that is not took the mmr3d step from 1379 to 1823 MiB of
    # tensors, measured 2026-12-07; the cause was not traced)
    cached = start_image(model, 0.5 + body).unsqueeze(0)
    # warm-up of the projector kernels (JIT) outside the measured step
    with torch.no_grad():
        model.direct(phantom.unsqueeze(0), 0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    # greedy calls the network once per stage in a step, which MemTracker takes for a new iteration
    # and refuses: greedy points are measured by RSS only
    tracker = _tensor_tracker(net, opt, model, batch, cached, phantom) if tensor_memory and mode != "greedy" else None
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    with tracker if tracker is not None else contextlib.nullcontext():
        opt.zero_grad(set_to_none=True)
        loss = training_step(net, mode, batch, model, cfg, stage=k - 1,
                             inputs=cached if mode == "sequential" else None)
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {
        "mode": mode, "stages": k, "device": device, "loss": loss, "step_wall_s": round(wall, 3),
        "rss_before_step_mb": round(rss_before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "torch_threads": torch.get_num_threads(),
        "block_shape": list(block_shape) if block_shape is not None else None,
    }
    if tracker is not None:
        peak = tracker.get_tracker_snapshot("peak").get(dev, {})
        out["tensor_peak_mb"] = round(peak.get("Total", 0) / 2**20, 1)
        out["tensor_peak_by_kind_mb"] = {str(kind).split(".")[-1].lower(): round(v / 2**20, 1)
                                         for kind, v in peak.items() if kind != "Total"}
    if dev.type == "cuda":
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_before_step_mb"] = round(base_alloc / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def _tensor_tracker(net, opt, model, batch, *tensors):
    """A MemTracker (torch private API) that knows every tensor made before the step; None if unavailable."""
    import torch

    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    tracker = MemTracker()
    model_tensors = [v for v in vars(model).values() if isinstance(v, torch.Tensor)]
    batch_tensors = [t for t in (batch.prompts, batch.targets, batch.multiplicative, batch.additive,
                                 batch.sensitivity, batch.anatomical) if t is not None]
    tracker.track_external(net, opt, *batch_tensors, *tensors, *model_tensors)
    return tracker


# ----------------------------------------------------------------------------- driver
def _predict(points: list[dict], k: int, key: str) -> float | None:
    """Linear extrapolation in K from the two largest measured K (None with < 2 points)."""
    pts = sorted((p["stages"], p[key]) for p in points if key in p)
    if len(pts) < 2:
        return None
    (k1, m1), (k2, m2) = pts[-2], pts[-1]
    slope = (m2 - m1) / (k2 - k1)
    return m2 + slope * (k - k2)


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def run_point(mode: str, k: int, device: str, problem: str, dims: int | None, timeout_s: float,
              mmap_threshold: int | None = None, tensor_memory: bool = False,
              block_shape: tuple[int, int, int] | None = None) -> dict:
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)  # glibc: fixed threshold, no dynamic growth
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--stages", str(k),
           "--device", device, "--problem", problem]
    if dims is not None:
        cmd += ["--dims", str(dims)]
    if tensor_memory and device == "cpu":
        cmd.append("--tensor-memory")
    if block_shape is not None:
        cmd += ["--block-size", ",".join(map(str, block_shape))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "stages": k, "device": device, "status": f"timeout after {timeout_s:.0f} s"}
    total = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        status = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"failed (rc {proc.returncode})"
        return {"mode": mode, "stages": k, "device": device, "status": status, "error": " | ".join(tail)}
    res = json.loads(lines[-1])
    res.update({"status": "ok", "process_wall_s": round(total, 1)})
    return res


def _fit_line(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least-squares ``m = a + b K`` through ``points``; returns (a, b, largest |relative residual|)."""
    import numpy as np

    k, m = np.array(points, dtype=float).T
    b, a = np.polyfit(k, m, 1)
    return float(a), float(b), float(np.max(np.abs(m - (a + b * k)) / m))


def summarise(results: list[dict]) -> dict:
    """Per metric: sequential at the largest K vs end-to-end there (measured, else the fitted line),
    and at the largest K where both were measured (``largest_K_measured_both``)."""
    out: dict = {}
    for key, dev in (("peak_rss_mb", "cpu"), ("tensor_peak_mb", "cpu"), ("cuda_peak_allocated_mb", "cuda")):
        pts = {m: sorted((r["stages"], r[key]) for r in results if r["mode"] == m and r.get("status") == "ok"
                         and r["device"].startswith(dev) and key in r) for m in ("sequential", "end_to_end")}
        if not pts["sequential"] or len(pts["end_to_end"]) < 2:
            continue
        k, seq = pts["sequential"][-1]
        seq_values = [m for _, m in pts["sequential"]]
        e2e_at_k = dict(pts["end_to_end"]).get(k)
        entry = {"K": k, "sequential_mb": seq,
                 "sequential_max_over_min": round(max(seq_values) / min(seq_values), 3)}
        a, b, resid = _fit_line(pts["end_to_end"])
        entry["end_to_end_fit_mb"] = {"intercept": round(a, 1), "per_stage": round(b, 1),
                                      "max_relative_residual": round(resid, 4),
                                      "measured_K": [kk for kk, _ in pts["end_to_end"]]}
        if e2e_at_k is not None:
            entry["end_to_end_mb"], entry["end_to_end_source"] = e2e_at_k, "measured"
        else:
            entry["end_to_end_mb"], entry["end_to_end_source"] = round(a + b * k, 1), "fitted line"
        entry["sequential_over_end_to_end"] = round(seq / entry["end_to_end_mb"], 4)
        both = sorted(set(dict(pts["sequential"])) & set(dict(pts["end_to_end"])))
        if both:  # the ratio with no fit at all: the largest K where both modes were measured
            kb = both[-1]
            s_mb, e_mb = dict(pts["sequential"])[kb], dict(pts["end_to_end"])[kb]
            entry["largest_K_measured_both"] = {"K": kb, "sequential_mb": s_mb, "end_to_end_mb": e_mb,
                                                "sequential_over_end_to_end": round(s_mb / e_mb, 4)}
        out[key] = entry
    return out


def _table(results: list[dict], key: str, stages: list[int]) -> str:
    head = f"{'mode':<14}" + "".join(f"{k:>10}" for k in stages)
    rows = [head]
    for mode in MODES:
        cells = []
        for k in stages:
            p = next((r for r in results if r["mode"] == mode and r["stages"] == k), None)
            if p is None:
                cells.append(f"{'-':>10}")
            elif p.get("status") != "ok":
                cells.append(f"{p['status'].split()[0]:>10}")
            elif key not in p:  # e.g. no tensor figure for greedy
                cells.append(f"{'-':>10}")
            else:
                cells.append(f"{p[key]:>10.0f}")
        rows.append(f"{mode:<14}" + "".join(cells))
    return "\n".join(rows)


def _print_tables(results: list[dict], stages: list[int], summary: dict) -> None:
    if any(r["device"] == "cpu" for r in results):
        print("\nCPU peak RSS (MiB) of one training step, fresh process per point:")
        print(_table([r for r in results if r["device"] == "cpu"], "peak_rss_mb", stages))
    if any("tensor_peak_mb" in r for r in results):
        print("\nCPU peak live tensor bytes (MiB, MemTracker):")
        print(_table([r for r in results if r["device"] == "cpu"], "tensor_peak_mb", stages))
    if any(r["device"].startswith("cuda") for r in results):
        print("\nCUDA peak allocated (MiB):")
        print(_table([r for r in results if r["device"].startswith("cuda")], "cuda_peak_allocated_mb", stages))
    if summary:
        print("\nsequential / end-to-end at the largest K:")
        for key, v in summary.items():
            print(f"  {key}: {json.dumps(v)}")


def _plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = []
    if any(r["device"] == "cpu" and r.get("status") == "ok" for r in results):
        keys.append(("peak_rss_mb", "CPU peak RSS (MiB)", "cpu"))
    if any("tensor_peak_mb" in r for r in results):
        keys.append(("tensor_peak_mb", "CPU peak live tensors (MiB)", "cpu"))
    if any(r["device"].startswith("cuda") and r.get("status") == "ok" for r in results):
        keys.append(("cuda_peak_allocated_mb", "CUDA peak allocated (MiB)", "cuda"))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 4.4), squeeze=False)
    for ax, (key, label, dev) in zip(axes[0], keys):
        for mode in MODES:
            pts = sorted((r["stages"], r[key]) for r in results
                         if r["mode"] == mode and r.get("status") == "ok" and r["device"].startswith(dev) and key in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("stages K")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _title(desc: dict, mmap_threshold: int | None) -> str:
    reg = desc["regulariser"]
    t = (f"one training step (batch 1): image {desc['image_shape_zyx']} (z,y,x), {reg['dims']}D CNN "
         f"{reg['channels']} ch x {reg['layers']} conv, {desc['num_subsets']} subsets")
    if desc.get("block_shape_zyx"):
        t += f", CNN in blocks of {'x'.join(map(str, desc['block_shape_zyx']))} voxels (checkpointed)"
    if mmap_threshold is not None:
        t += f"; MALLOC_MMAP_THRESHOLD_={mmap_threshold}"
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, nargs="+", default=None, help=f"K values (default {DEFAULT_STAGES})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--quick", action="store_true", help="small problem, K = 1 2 4 (smoke run; --problem quick)")
    p.add_argument("--problem", choices=PROBLEMS, default=None,
                   help="bench3d (default; module docstring), quick, mmr2d (the 2D studies' setting) or mmr3d "
                        "(the bundled 3D mMR model's setting)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=None, help="regulariser dims (default 3)")
    p.add_argument("--block-size", type=voxel_shape, default=None, metavar="Z,Y,X",
                   help="run every stage's CNN block by block, blocks of Z,Y,X voxels under checkpointing "
                        "(the block-wise regulariser); default: whole volumes")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--max-rss-gb", type=float, default=None,
                   help="skip CPU points predicted above this (default 80%% of MemAvailable at start)")
    p.add_argument("--point-timeout", type=float, default=3600.0, help="seconds per point (default 3600)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default pipelines/results/...)")
    p.add_argument("--resume", action="store_true", help="keep the points already in the JSON (same problem)")
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="set glibc MALLOC_MMAP_THRESHOLD_ (bytes) in the workers: large freed blocks go back to "
                        "the OS at once, so RSS follows live memory instead of heap retention")
    p.add_argument("--tensor-memory", action="store_true",
                   help="CPU: also the peak of live tensor bytes over the step (MemTracker; module docstring)")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.problem not in (None, "quick"):
        p.error("--quick is --problem quick")
    problem = "quick" if args.quick else (args.problem or "bench3d")
    suffix = {"bench3d": "", "quick": "_quick", "mmr2d": "_mmr2d", "mmr3d": "_mmr3d"}[problem]
    if args.block_size is not None:
        suffix += "_blocks"

    if args.worker:
        print(json.dumps(run_worker(args.mode, args.stages[0], args.device, problem, args.dims,
                                    args.tensor_memory, args.block_size)), flush=True)
        return 0

    if args.replot:
        path = args.output or RESULTS / f"bench_training_memory{suffix}.json"
        data = json.loads(path.read_text())
        # a run cut short (a time limit on a lent GPU) has its points but no summary yet
        data["summary"] = summarise(data["results"])
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
        _print_tables(data["results"], sorted({r["stages"] for r in data["results"]}), data["summary"])
        _plot(data["results"], path.with_suffix(".png"), _title(data["problem"], data.get("malloc_mmap_threshold")))
        print(f"wrote {path} (summary) and {path.with_suffix('.png')}")
        return 0
    stages = args.stages or ([1, 2, 4] if problem == "quick" else list(DEFAULT_STAGES))
    if args.devices is None:
        import torch

        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    max_rss_mb = 1024 * (args.max_rss_gb if args.max_rss_gb is not None else 0.8 * _mem_available_gb())
    out_json = args.output or RESULTS / f"bench_training_memory{suffix}.json"
    desc = problem_description(problem)
    if args.dims is not None:
        desc["regulariser"]["dims"] = args.dims
    if args.block_size is not None:
        desc["block_shape_zyx"] = list(args.block_size)
    print("problem:", json.dumps(desc))
    results: list[dict] = []
    meta = {
        "problem": desc, "stages": stages, "modes": args.modes, "devices": args.devices,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "mem_available_gb_at_start": round(_mem_available_gb(), 1)},
        "cpu_skip_threshold_mb": round(max_rss_mb),
        "malloc_mmap_threshold": args.mmap_threshold,
        "tensor_memory": args.tensor_memory,
        "notes": "peak_rss_mb: ru_maxrss of a fresh process (setup + one step); rss_before_step_mb: VmRSS just "
                 "before the step. cuda_peak_allocated_mb: torch.cuda.max_memory_allocated over the step.",
    }

    if args.resume and out_json.is_file():
        old = json.loads(out_json.read_text())
        if old.get("problem") == desc and old.get("malloc_mmap_threshold") == args.mmap_threshold:
            results = [r for r in old.get("results", []) if r.get("status") == "ok"]
            print(f"resuming: {len(results)} points kept from {out_json}")

    def save() -> None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_json.with_suffix(".json.part")
        tmp.write_text(json.dumps({**meta, "results": results}, indent=1))
        os.replace(tmp, out_json)

    for device in args.devices:
        for mode in args.modes:
            done = [r for r in results if r["mode"] == mode and r["device"] == device and r.get("status") == "ok"]
            for k in stages:
                if any(r["stages"] == k for r in done):
                    continue
                if device == "cpu":
                    pred = _predict(done, k, "peak_rss_mb")
                    if pred is not None and pred > max_rss_mb:
                        results.append({"mode": mode, "stages": k, "device": device,
                                        "status": f"skipped (predicted {pred / 1024:.1f} GiB > "
                                                  f"{max_rss_mb / 1024:.1f} GiB)"})
                        print(f"{device} {mode:<13} K={k:<3} {results[-1]['status']}", flush=True)
                        save()
                        continue
                res = run_point(mode, k, device, problem, args.dims, args.point_timeout, args.mmap_threshold,
                                args.tensor_memory, args.block_size)
                results.append(res)
                if res["status"] == "ok":
                    done.append(res)
                    extra = f" cuda {res['cuda_peak_allocated_mb']:.0f} MiB" if "cuda_peak_allocated_mb" in res else ""
                    if "tensor_peak_mb" in res:
                        extra += f" tensors {res['tensor_peak_mb']:.0f} MiB"
                    print(f"{device} {mode:<13} K={k:<3} peak RSS {res['peak_rss_mb']:8.0f} MiB "
                          f"(before step {res['rss_before_step_mb']:.0f}){extra}; step {res['step_wall_s']:.1f} s",
                          flush=True)
                else:
                    print(f"{device} {mode:<13} K={k:<3} {res['status']} {res.get('error', '')}", flush=True)
                save()
    summary = summarise(results)
    _print_tables(results, stages, summary)
    meta["summary"] = summary
    save()
    png = out_json.with_suffix(".png")
    _plot(results, png, _title(desc, args.mmap_threshold))
    print(f"\nwrote {out_json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
