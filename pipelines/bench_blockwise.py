"""Memory and time of the regulariser CNN, whole volume versus block by block (sirf_fbsem.model.blockwise).

    python pipelines/bench_blockwise.py                          # CPU (+ CUDA when present), defaults below
    python pipelines/bench_blockwise.py --sizes 32 64 96 --channels 16 32 --block 32
    python pipelines/bench_blockwise.py --devices cuda --sizes 64 128 192 256

One point = one forward and backward pass (gradients of the weights; the input is detached, as a
stage's input is in sequential training) of a 3D :class:`~sirf_fbsem.model.regularisers.ResidualCNN`
(``--layers`` convolutions of 3^3, ``--channels`` feature channels) on a cube of ``size^3`` voxels,
batch of one, float32, once on the whole volume and once in blocks of ``--block``^3 voxels under
gradient checkpointing. Measured per point:

* ``peak_tensor_mib`` (CPU): the peak of live tensor bytes over the pass, from
  ``torch.distributed._tools.mem_tracker.MemTracker`` (a private torch API that follows every
  tensor storage: parameters, input, activations, gradients, temporaries): the CPU counterpart
  of ``torch.cuda.max_memory_allocated``, without the interpreter's or the allocator's own
  memory that RSS includes (RSS deltas of a few MiB drown in allocator noise). Left out if the
  API is missing.
* ``saved_mib``: bytes of the tensors saved for the backward pass during the forward pass
  (``torch.autograd.graph.saved_tensors_hooks``, sum of ``numel * element_size`` of each packed
  tensor; block-wise these are the blocks' input crops, views of one input volume) and
  ``saved_distinct_mib``, the distinct storages behind them (what they really hold).
  ``block_recompute_saved_mib``: what one block's recomputation saves in the backward pass (the
  largest grown block): block-wise, the peak is about ``saved_distinct + block_recompute_saved``.
* ``peak_allocated_mib`` (CUDA): ``torch.cuda.max_memory_allocated`` over the pass, less what was
  allocated before it.
* ``time_s``: wall time of the forward and backward pass (a separate run, without the memory
  tracker, after the memory run on the same shapes, which warms the kernels up).

Blocks of 32^3 (grown by R = 5 to 42^3) keep PyTorch's CPU convolutions on oneDNN (see
:mod:`sirf_fbsem.model.blockwise`); at 32^3 the volume is one block (the cost of checkpointing
alone). Writes ``pipelines/results/bench_blockwise.json`` and ``.png`` (``--out`` to change).
The default run (sizes 32 64, channels 16 32) takes about a minute and a half on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sirf_fbsem.model import ResidualCNN  # noqa: E402

RESULTS = ROOT / "pipelines" / "results"
MIB = 2**20


def _saved(fn) -> tuple[int, int]:
    """(sum of numel * element size of the tensors saved for backward during ``fn()``, bytes of their
    distinct storages)."""
    total, storages = 0, {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        st = t.untyped_storage()
        storages[(st.device, st.data_ptr())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, sum(storages.values()), out


def _tracker(*tracked):
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    tracker = MemTracker()
    tracker.track_external(*tracked)
    return tracker


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(channels: int, layers: int, size: int, block: int | None, device: str) -> dict:
    """One point (module docstring)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    cnn = ResidualCNN(dims=3, channels=channels, layers=layers).to(dev)
    with torch.no_grad():  # the last layer starts at zero: give it weights, as a trained network has
        cnn.net[-1].weight.normal_(0, 0.01)
    cnn.block_shape = None if block is None else (block, block, block)
    x = torch.rand(1, size, size, size, device=dev)
    fov = torch.ones(size, size, size, dtype=torch.bool, device=dev)

    def step() -> None:
        cnn.zero_grad(set_to_none=True)
        cnn(x, None, fov).square().mean().backward()

    point = {"device": device, "channels": channels, "layers": layers, "size": size, "voxels": size**3,
             "block": block, "mode": "whole" if block is None else "blocks"}
    # the memory pass first: it is also the warm-up (kernels, shapes) of the timed pass
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        point["peak_allocated_mib"] = round((torch.cuda.max_memory_allocated(dev) - before) / MIB, 3)
        point["gpu"] = torch.cuda.get_device_name(dev)
    else:
        tracker = _tracker(cnn, x, fov)
        if tracker is not None:
            with tracker:
                step()
            point["peak_tensor_mib"] = round(tracker.get_tracker_snapshot("peak")[dev]["Total"] / MIB, 3)
        else:
            step()
    _sync(dev)
    t0 = time.perf_counter()
    step()
    _sync(dev)
    point["time_s"] = round(time.perf_counter() - t0, 4)
    cnn.zero_grad(set_to_none=True)
    saved, distinct, out = _saved(lambda: cnn(x, None, fov))
    del out
    point["saved_mib"] = round(saved / MIB, 3)
    point["saved_distinct_mib"] = round(distinct / MIB, 3)
    if block is not None:
        r = cnn.receptive_radius[0]
        edge = min(size, block + 2 * r)
        crop = torch.rand(1, 1, edge, edge, edge, device=dev)
        per_block, _, out = _saved(lambda: cnn.body_whole(crop))
        del out
        point["block_recompute_saved_mib"] = round(per_block / MIB, 3)
        point["grown_block"] = edge
    return point


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({(p["device"], p["channels"], p["mode"]) for p in points})
    for device, channels, mode in keys:
        rows = sorted((p for p in points if (p["device"], p["channels"], p["mode"]) == (device, channels, mode)),
                      key=lambda p: p["size"])
        mem_key = "peak_allocated_mib" if device.startswith("cuda") else "peak_tensor_mib"
        if not all(mem_key in p for p in rows):
            mem_key = "saved_distinct_mib"
        label = f"{device}, {channels} ch, {mode}" + (f" {rows[0]['block']}^3" if mode == "blocks" else "")
        style = "-o" if mode == "whole" else "--s"
        axes[0].plot([p["size"] for p in rows], [p[mem_key] for p in rows], style, label=label)
        axes[1].plot([p["size"] for p in rows], [p["time_s"] for p in rows], style, label=label)
    axes[0].set_ylabel("peak memory of forward + backward (MiB)")
    axes[1].set_ylabel("forward + backward (s)")
    for ax in axes:
        ax.set_xlabel("volume edge (voxels)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle("ResidualCNN (3D, 5 x 3^3 convolutions): whole volume vs block-wise with checkpointing")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="volume edges (voxels)")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--block", type=int, default=32, help="block edge (voxels)")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 gives steadier times on a shared machine")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_blockwise.json")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    points = []
    for device in devices:
        for channels in args.channels:
            for size in args.sizes:
                for block in (None, args.block):
                    pt = measure(channels, args.layers, size, block, device)
                    points.append(pt)
                    mem = pt.get("peak_allocated_mib", pt.get("peak_tensor_mib", float("nan")))
                    print(f"{device:5s} {channels:3d} ch {size:4d}^3 {pt['mode']:6s}: peak {mem:9.1f} MiB, "
                          f"saved {pt['saved_mib']:9.1f} MiB ({pt['saved_distinct_mib']:8.1f} distinct), "
                          f"{pt['time_s']:7.2f} s", flush=True)
    summary = []
    for device in devices:
        for channels in args.channels:
            for size in args.sizes:
                w, b = (next(q for q in points if (q["device"], q["channels"], q["size"], q["mode"]) ==
                             (device, channels, size, m)) for m in ("whole", "blocks"))
                key = "peak_allocated_mib" if device.startswith("cuda") else "peak_tensor_mib"
                row = {"device": device, "channels": channels, "size": size,
                       "time_ratio": round(b["time_s"] / w["time_s"], 2)}
                if key in w and key in b:
                    row["memory_ratio"] = round(b[key] / w[key], 3)
                summary.append(row)
                print(f"{device} {channels} ch {size}^3: blocks/whole memory "
                      f"{row.get('memory_ratio', float('nan')):.3f}, time {row['time_ratio']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"description": __doc__.split("\n")[0], "layers": args.layers, "block": args.block,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
              "processor": platform.processor(), "points": points, "summary": summary}
    args.out.write_text(json.dumps(result, indent=1))
    plot(points, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
