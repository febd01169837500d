"""A sequential training run's validation loss, count level by count level.

A run on data simulated at several count levels (``simulate --counts 1e6,3e7,3e8``) logs one
validation loss per stage and epoch, the mean over its validation samples. Since sirf_fbsem 0.9.2
``losses.json`` also gives each validation sample's loss (``val_loss_per_sample``); this script
groups them by the sample's expected prompts (sample ``i`` of a directory simulated with levels
``L`` has ``L[i % len(L)]``) at each stage's kept epoch (its lowest mean validation loss, the
weights training keeps), so that one can see which level a rising loss comes from.

    python pipelines/val_loss_by_level.py --run WORK/run --data WORK/train --out pipelines/results/val_by_level

``--data`` takes the training directories in the order given to ``sirf-fbsem train --data``.
Stages logged before 0.9.2 (no per-sample losses) are listed with ``null`` levels. Writes OUT.json
and OUT.png (loss by stage, one line per level).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from sirf_fbsem.simulation.dataset import load_manifest


@dataclass(frozen=True)
class StageLevels:
    """One stage (1-based) at its kept epoch: the mean validation loss, and the mean over the
    validation samples of each count level (keys: expected prompts as ``"%.0e"``; None before 0.9.2)."""

    stage: int
    epoch: int
    val_loss: float
    by_level: dict[str, float] | None
    samples_by_level: dict[str, int] | None


def sample_levels(directories: Sequence[str | Path]) -> list[float]:
    """Expected total prompts of every sample of the concatenated ``directories``, by global index."""
    levels: list[float] = []
    for d in directories:
        manifest = load_manifest(d)
        counts = manifest["counts"]
        cycle = [float(c) for c in counts] if isinstance(counts, list) else [float(counts)]
        levels += [cycle[i % len(cycle)] for i in range(int(manifest["num_samples"]))]
    return levels


def levels_by_stage(history: Sequence[dict[str, Any]], levels: Sequence[float]) -> list[StageLevels]:
    """Per stage of a sequential run's ``history`` (``losses.json``), the kept epoch's losses by level."""
    out = []
    stages = sorted({r["stage"] for r in history if r.get("stage") is not None and r.get("val_loss") is not None})
    for k in stages:
        rows = [r for r in history if r["stage"] == k and r.get("val_loss") is not None]
        kept = min(rows, key=lambda r: r["val_loss"])
        per = kept.get("val_loss_per_sample")
        by_level = counts = None
        if per:
            groups: dict[str, list[float]] = {}
            for i, loss in per.items():
                if int(i) >= len(levels):
                    raise ValueError(f"validation sample {i} is not in the --data directories ({len(levels)} samples): "
                                     "give the run's training directories, in its order")
                groups.setdefault(f"{levels[int(i)]:.0e}", []).append(float(loss))
            by_level = {key: math.fsum(v) / len(v) for key, v in sorted(groups.items(), key=lambda kv: float(kv[0]))}
            counts = {key: len(v) for key, v in groups.items()}
        out.append(StageLevels(k + 1, int(kept["epoch"]), float(kept["val_loss"]), by_level, counts))
    return out


def plot(rows: Sequence[StageLevels], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r.stage for r in rows], [r.val_loss for r in rows], "k-", label="all validation samples")
    keys = sorted({key for r in rows if r.by_level for key in r.by_level}, key=float)
    for key in keys:
        pts = [(r.stage, r.by_level[key]) for r in rows if r.by_level and key in r.by_level]
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"{key} prompts")
    ax.set_xlabel("stage")
    ax.set_ylabel("validation loss (kept epoch)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the training run's --out directory")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="its training directories, in order")
    parser.add_argument("--out", type=Path, required=True, help="output stem: OUT.json and OUT.png")
    args = parser.parse_args(argv)
    losses = args.run / "losses.json"
    if not losses.is_file():
        parser.error(f"--run: {losses} not found (a run writes it after its first epoch)")
    log = json.loads(losses.read_text())
    if log.get("mode") != "sequential":
        parser.error(f"--run: {losses} is a {log.get('mode')!r} run; per-stage levels need a sequential one")
    rows = levels_by_stage(log["history"], sample_levels(args.data))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"run": str(args.run), "data": [str(d) for d in args.data], "stages": [asdict(r) for r in rows]}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    for r in rows:
        levels = "  ".join(f"{k}: {v:.4g}" for k, v in (r.by_level or {}).items())
        print(f"stage {r.stage:3d} (epoch {r.epoch:2d}): {r.val_loss:.4g}  {levels}")


if __name__ == "__main__":
    main()
