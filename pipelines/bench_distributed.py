"""Data-parallel training benchmark: time per epoch and per-rank peak memory, 1 vs N ranks (torchrun).

    python pipelines/bench_distributed.py [--samples 16] [--epochs 3] [--batch-size 8] [--ranks 1 2]

Simulates a small 2D training set (the small_test scanner, one ring: 48 views x 48 bins,
47 x 47 image; random disc phantoms, 4 subsets, targets = OSEM sub-iterates), then for
each rank count launches ``torchrun --standalone --nproc-per-node N`` on this script's
worker, which trains FBSEM-Net (``--stages`` stages, regulariser 32 channels x 5 layers)
in each ``--modes`` mode with the same global batch. Each rank records the wall time of
every epoch and its peak memory (CPU: peak resident set size; GPU: peak allocated CUDA
memory). CPU ranks use gloo; when CUDA is present the GPU runs (nccl) follow. Prints a
table and writes ``pipelines/results/bench_distributed.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------- data
def simulate(n: int, num_subsets: int, num_targets: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` samples: Poisson prompts (~1e5 counts), factors, additive term, sensitivities, OSEM targets."""
    from sirf_fbsem.geometry import scanner_preset
    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
    from sirf_fbsem.recon import fov_mask
    from sirf_fbsem.samples import Sample
    from sirf_fbsem.simulation.targets import osem_targets
    from sirf_fbsem.simulation.acquisition import single_slice_geometry

    sino, image = single_slice_geometry(scanner_preset("small_test"))
    base = EmbeddedAcquisitionModel(sino, image, num_subsets=num_subsets)
    g = torch.Generator().manual_seed(seed)
    _, y, x = image.centred_coordinates_mm()
    Y, X = torch.meshgrid(torch.as_tensor(y), torch.as_tensor(x), indexing="ij")
    samples = []
    for _ in range(n):
        img = ((X**2 + Y**2) < (60 + 20 * torch.rand((), generator=g)) ** 2).float()
        for _ in range(3):
            cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([80.0, 80.0, 15.0]) + torch.tensor([-40, -40, 5]))
            img = img + ((X - cx) ** 2 + (Y - cy) ** 2 < r**2).float() * float(torch.rand((), generator=g) * 2)
        phantom = img.unsqueeze(0)
        mult = 0.5 + 0.5 * torch.rand(sino.shape, generator=g)
        mult = mult * 1e5 / float(base.with_terms(mult, None).direct(phantom).sum())
        additive = torch.full(sino.shape, 1e4 / mult.numel())
        model = base.with_terms(mult, additive)
        ybar = model.forward(phantom)
        targets = osem_targets(model, ybar, num_targets, initial=fov_mask(image).float())
        samples.append(Sample(
            prompts=torch.poisson(ybar, generator=g), multiplicative=mult, additive=additive,
            sensitivity=torch.stack([model.sensitivity(s) for s in range(num_subsets)]),
            targets=targets,
        ))
    return samples


# ---------------------------------------------------------------------------- worker (under torchrun)
def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def worker(args: argparse.Namespace) -> int:
    """One rank: train each mode, time epochs, record peak memory, write RESULT.rank<r>.json."""
    from sirf_fbsem.distributed import init_distributed, local_device, shutdown
    from sirf_fbsem.geometry import scanner_preset
    from sirf_fbsem.model import FBSEMNet, RegulariserConfig
    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
    from sirf_fbsem.simulation.acquisition import single_slice_geometry
    from sirf_fbsem.training import TrainConfig, TrainEvent, train, with_terms_factory

    ctx = init_distributed(args.device)
    device = local_device(args.device, ctx.local_rank) if ctx.is_distributed else args.device
    samples = torch.load(args.data, weights_only=True)
    sino, image = single_slice_geometry(scanner_preset("small_test"))
    factory = with_terms_factory(EmbeddedAcquisitionModel(sino, image, num_subsets=args.subsets, device=device))
    rss_start = _peak_rss_mib()
    out: dict = {"rank": ctx.rank, "world_size": ctx.world_size, "device": device, "modes": {}}
    try:
        for mode in args.modes:
            stamps: list[float] = []

            def on_epoch(event: TrainEvent) -> None:
                if event.kind == "epoch":
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    stamps.append(time.perf_counter())

            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(0)
            net = FBSEMNet(args.stages, args.subsets, RegulariserConfig(dims=2, channels=32, layers=5))
            cfg = TrainConfig(epochs=args.epochs, lr=1e-3, batch_size=args.batch_size, validation_fraction=0.0,
                              seed=0, device=device, progress=False)
            # sequential mode: only the first stage (its epochs are the comparable unit)
            if mode == "sequential":
                net = FBSEMNet(1, args.subsets, RegulariserConfig(dims=2, channels=32, layers=5))
            ctx.barrier()
            t0 = time.perf_counter()
            train(net, samples, mode, cfg, factory, Path(args.work) / f"{mode}_{ctx.world_size}",
                  callbacks=[on_epoch], distributed=ctx)
            epochs = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
            out["modes"][mode] = {
                "epoch_s": epochs,
                "peak_mem_mib": (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                                 else _peak_rss_mib()),
            }
        out["rss_after_imports_mib"] = rss_start
        Path(f"{args.result}.rank{ctx.rank}.json").write_text(json.dumps(out))
    finally:
        shutdown(ctx)
    return 0


# ---------------------------------------------------------------------------- driver
def run_config(nproc: int, device: str, args: argparse.Namespace, data: Path, work: Path) -> list[dict]:
    """Launch one torchrun job; every rank's record."""
    result = work / f"res_{device}_{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(Path(__file__).resolve()), "--worker", "--data", str(data), "--work", str(work),
           "--result", str(result), "--device", device, "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--stages", str(args.stages), "--subsets", str(args.subsets),
           "--modes", *args.modes]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)), MPLBACKEND="Agg")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun ({nproc} ranks, {device}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(nproc)]


def summarise(records: list[dict], mode: str) -> dict:
    """Median epoch time after the first (warm-up) epoch, slowest rank; peak memory per rank."""
    per_rank = [r["modes"][mode]["epoch_s"] for r in records]
    steady = [max(ep[i] for ep in per_rank) for i in range(1 if len(per_rank[0]) > 1 else 0, len(per_rank[0]))]
    return {"epoch_s_median": statistics.median(steady), "epoch_s_first": max(ep[0] for ep in per_rank),
            "peak_mem_mib_per_rank": [round(r["modes"][mode]["peak_mem_mib"], 1) for r in records],
            "rss_after_imports_mib_per_rank": [round(r["rss_after_imports_mib"], 1) for r in records]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (split across ranks)")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--subsets", type=int, default=4)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", default=["sequential", "greedy", "end_to_end"])
    p.add_argument("--out", type=Path, default=RESULTS)
    # worker flags (set by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    t0 = time.perf_counter()
    data = work / "samples.pt"
    torch.save(simulate(args.samples, args.subsets, args.stages), data)
    print(f"simulated {args.samples} samples in {time.perf_counter() - t0:.1f} s")
    configs = [("cpu", n) for n in args.ranks]
    if torch.cuda.is_available():
        configs += [("cuda", n) for n in args.ranks if n <= torch.cuda.device_count()]
    rows = []
    for device, nproc in configs:
        records = run_config(nproc, device, args, data, work)
        for mode in args.modes:
            rows.append({"device": device, "ranks": nproc, "mode": mode, **summarise(records, mode)})
            print(f"  {device} x{nproc} {mode}: {rows[-1]['epoch_s_median']:.2f} s/epoch")
    base = {(r["device"], r["mode"]): r["epoch_s_median"] for r in rows if r["ranks"] == 1}
    for r in rows:
        r["speedup_vs_1_rank"] = round(base[r["device"], r["mode"]] / r["epoch_s_median"], 3) \
            if (r["device"], r["mode"]) in base else None

    header = f"{'device':6} {'ranks':>5} {'mode':12} {'s/epoch':>8} {'1st ep s':>8} {'speedup':>7}  peak MiB per rank"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['device']:6} {r['ranks']:5d} {r['mode']:12} {r['epoch_s_median']:8.2f} {r['epoch_s_first']:8.2f} "
              f"{r['speedup_vs_1_rank'] or float('nan'):7.2f}  {r['peak_mem_mib_per_rank']}")
    info = {
        "problem": {"scanner": "small_test single ring", "sinogram": [1, 1, 48, 48], "image": [1, 47, 47],
                    "samples": args.samples, "global_batch": args.batch_size, "stages": args.stages,
                    "subsets": args.subsets, "epochs": args.epochs,
                    "regulariser": "2D, 32 channels x 5 layers",
                    "sequential": "first stage only (1-stage network)"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "notes": "s/epoch: median over epochs 2.. of the slowest rank; peak memory: CPU peak RSS per process "
                 "(includes ~the interpreter + torch), GPU peak allocated CUDA memory",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from sirf_fbsem.io.atomic import atomic_path

    with atomic_path(args.out / "bench_distributed.json") as tmp:
        tmp.write_text(json.dumps(info, indent=1))
    _plot(rows, args.out / "bench_distributed.png")
    print(f"wrote {args.out / 'bench_distributed.json'} and .png")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sirf_fbsem.io.atomic import atomic_path

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    groups = sorted({(r["device"], r["mode"]) for r in rows})
    for dev, mode in groups:
        rr = sorted((r for r in rows if (r["device"], r["mode"]) == (dev, mode)), key=lambda r: r["ranks"])
        a1.plot([r["ranks"] for r in rr], [r["epoch_s_median"] for r in rr], marker="o", label=f"{dev} {mode}")
        a2.plot([r["ranks"] for r in rr], [max(r["peak_mem_mib_per_rank"]) for r in rr], marker="o",
                label=f"{dev} {mode}")
    a1.set_xlabel("ranks")
    a1.set_ylabel("time per epoch (s)")
    a2.set_xlabel("ranks")
    a2.set_ylabel("peak memory per rank (MiB)")
    for a in (a1, a2):
        a.set_xticks(sorted({r["ranks"] for r in rows}))
        a.legend(fontsize="small")
    fig.suptitle("FBSEM-Net data-parallel training (torchrun, same global batch)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
