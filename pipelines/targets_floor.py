"""How many stages K iteration-dependent targets need: the targets' floor against the best baseline.

Stage k's training target is the k-th noise-free OSEM sub-iterate (the paper's iteration-dependent
targets), so a network that matched its targets exactly would keep the target's error against
the truth: ``floor(k) = mean over phantoms of NRMSE(target_k, truth)`` inside the head. FBSEM with
K stages can beat a baseline only where ``floor(K) < NRMSE(best baseline)``, and only by as much
as the network gets close to its targets. This script reads the JSON that ``sirf-fbsem evaluate``
wrote on the tuning set without a model (``pipelines/mmr_3d.sh WORK floor``: the data simulated
with many targets, the baselines' hyperparameters chosen on those same phantoms), and reports per
count level the smallest K whose floor is below ``f`` times the best baseline, for each ``f`` in
``--fractions``, with a figure of the floor against K.

    python pipelines/targets_floor.py WORK/eval/floor_k112.json --out pipelines/results/targets_floor_mmr3d
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

BASELINE_METHODS = ("osem", "osem_filtered", "map_em", "map_em_bowsher")


@dataclass(frozen=True)
class LevelFloor:
    """One count level: the floor by stage (entry k - 1 for K = k) and the best baseline's NRMSE."""

    counts: str
    floor_by_stage: list[float]
    best_method: str
    best_nrmse: float
    best_hyperparameters: dict[str, Any]
    stages_needed: dict[str, int | None]  # fraction f (as text) -> smallest K with floor(K) < f * best; None: none


def stages_needed(floor_by_stage: Sequence[float], bound: float) -> int | None:
    """The smallest K (1-based) with ``floor_by_stage[K - 1] < bound``; None where no simulated K gets there."""
    return next((k + 1 for k, v in enumerate(floor_by_stage) if v < bound), None)


def level_floors(result: dict[str, Any], fractions: Sequence[float]) -> list[LevelFloor]:
    """Per count level of an evaluate JSON: its floor, best baseline (lowest mean NRMSE) and K needed."""
    out = []
    for key, level in result["count_levels"].items():
        floor = [float(v) for v in level["targets_nrmse_by_stage"]]
        baselines = {m: e for m, e in level["methods"].items() if m in BASELINE_METHODS}
        if not baselines:
            raise ValueError(f"count level {key}: no baseline ({', '.join(BASELINE_METHODS)}) in the JSON")
        name = min(baselines, key=lambda m: baselines[m]["mean"]["nrmse"])
        best = float(baselines[name]["mean"]["nrmse"])
        out.append(LevelFloor(key, floor, name, best, dict(baselines[name].get("hyperparameters", {})),
                              {f"{f:g}": stages_needed(floor, f * best) for f in fractions}))
    return out


def save_plot(path: Path, levels: Sequence[LevelFloor], title: str) -> None:
    """Floor against K per level, with each level's best baseline as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, lv in enumerate(levels):
        colour = f"C{i}"
        ks = range(1, len(lv.floor_by_stage) + 1)
        ax.plot(ks, lv.floor_by_stage, color=colour, label=f"{lv.counts} counts: noise-free target k (floor)")
        ax.axhline(lv.best_nrmse, color=colour, ls="--",
                   label=f"{lv.counts} counts: best baseline ({lv.best_method}) {lv.best_nrmse:.3f}")
    finish_plot(fig, ax, path, title, "stages K (OSEM sub-iterations)",
                "NRMSE inside the head (mean over tuning phantoms)")


def finish_plot(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Label, title, grid and legend ``ax``; save ``fig`` to ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("evaluation", type=Path, help="JSON of 'sirf-fbsem evaluate' on the tuning set, without a model")
    p.add_argument("--out", type=Path, required=True, help="output stem: OUT.json and OUT.png")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.9, 0.8],
                   help="report the smallest K with floor(K) below each fraction of the best baseline")
    args = p.parse_args(argv)
    try:
        result = json.loads(args.evaluation.read_text())
        levels = level_floors(result, args.fractions)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{args.evaluation}: not a readable 'sirf-fbsem evaluate' JSON with "
                         f"targets_nrmse_by_stage and baselines ({type(e).__name__}: {e})") from None
    setting = result.get("setting", {})
    phantoms = result.get("phantom_sets", {}).get("scored")
    payload = {"source": str(args.evaluation), "setting": setting, "phantoms": phantoms,
               "selection": result.get("selection"), "levels": [asdict(lv) for lv in levels]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(payload, indent=1) + "\n")
    save_plot(Path(f"{args.out}.png"), levels, f"targets' floor: {setting.get('image', '')}")
    for lv in levels:
        needed = ", ".join(f"below {f}x at K = {k}" for f, k in lv.stages_needed.items())
        marks = {k: lv.floor_by_stage[k - 1] for k in (21, 42, 63) if k <= len(lv.floor_by_stage)}
        print(f"{lv.counts} counts: best baseline {lv.best_method} {lv.best_nrmse:.4f} "
              f"({lv.best_hyperparameters}); floor {', '.join(f'K={k}: {v:.4f}' for k, v in marks.items())}; "
              f"{needed}")
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
