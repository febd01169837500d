"""The paper's findings from the confirmation runs of ``pipelines/paper_findings_2d.sh``: one row
per finding (setting, mean +- std over training seeds, paired bootstrap 95 % interval over
phantoms, verdict), printed as the Markdown tables of docs/studies/paper_findings.md and written
to JSON, with a figure of every learned method's NRMSE per training seed.

    python pipelines/paper_findings_table.py --proc RESULTS/paper_findings_2d_proc.json \\
        --mni RESULTS/paper_findings_2d_mni.json --memory pipelines/results/bench_training_memory_tensors.json \\
        [--n60 RESULTS/paper_findings_2d_n60_e2e_proc.json] --out pipelines/results/paper_findings_2d

Every figure is read from the JSON that ``sirf-fbsem evaluate`` wrote (``summary.*.learned_intervals``,
``seed_spread_intervals``, ``ratio_intervals`` and each method's ``spread_over_seeds``); this script
only picks them and applies the verdict rules stated with each finding (docs/studies/rules.md).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# "does not notably hurt" and "no effect": the ratio's whole interval inside [1 - m, 1 + m],
# a margin fixed before the confirmation runs were scored
EQUIVALENCE_MARGIN = 0.05


@dataclass(frozen=True)
class Row:
    """One comparison ``a / b`` of a finding, on one confirmation set."""

    finding: str
    setting: str
    a: str
    b: str
    metric: str
    a_mean_std: str
    b_mean_std: str
    ratio: float
    low: float
    high: float
    expected: str  # "a<b", "a=b" or "a>b": what the paper found
    verdict: str


def _level(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (key, summary), = result["summary"].items()  # one count level: a study's, or an at_level view
    return summary, result["count_levels"][key]["methods"]


def at_level(result: dict[str, Any], key: str) -> dict[str, Any]:
    """``result`` with only count level ``key`` (a key of ``count_levels``, e.g. ``"3e+07"``) in its
    ``count_levels`` and ``summary``: the one-level view every function here reads."""
    if key not in result["count_levels"]:
        raise KeyError(f"no count level {key!r}; the JSON has {sorted(result['count_levels'])}")
    return {**result, "count_levels": {key: result["count_levels"][key]},
            "summary": {key: result["summary"][key]} if "summary" in result else {}}


def count_level(result: dict[str, Any]) -> dict[str, Any]:
    """The one count level of an ``evaluate`` JSON (or of its ``at_level`` view); ValueError otherwise."""
    levels = result["count_levels"]
    if len(levels) != 1:
        raise ValueError(f"expected one count level, got {sorted(levels)}")
    return next(iter(levels.values()))


def _mean_std(method: dict[str, Any], metric: str) -> str:
    if metric.endswith("_seed_std"):  # a spread: mean over phantoms of the per-phantom std over seeds
        vals = [r[metric] for r in method["per_sample"]]
        return f"{sum(vals) / len(vals):.4f}"
    s = method.get("spread_over_seeds", {}).get(metric)
    if s is None:
        return f"{method['mean'][metric]:.4f}"
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def judge(low: float, high: float, expected: str, lower_is_better: bool = True) -> str:
    """reproduced / not reproduced / inconclusive for a ratio interval ``[low, high]`` of ``a / b``.

    ``a<b`` (``a`` better when lower is better): reproduced when ``high < 1``, not reproduced when
    ``low > 1``; ``a=b``: reproduced when the interval lies inside 1 +- EQUIVALENCE_MARGIN, not
    reproduced when it excludes that band's side (``low > 1 + m`` or ``high < 1 - m``).
    """
    if expected == "a=b":
        m = EQUIVALENCE_MARGIN
        if 1 - m <= low and high <= 1 + m:
            return "reproduced"
        return "not reproduced" if low > 1 + m or high < 1 - m else "inconclusive"
    want_below = (expected == "a<b") == lower_is_better
    if (high < 1) if want_below else (low > 1):
        return "reproduced"
    if (low > 1) if want_below else (high < 1):
        return "not reproduced"
    return "inconclusive"


def row(finding: str, setting: str, result: dict[str, Any], kind: str, a: str, b: str, metric: str,
        expected: str) -> Row:
    summary, methods = _level(result)
    ci = summary[kind][f"{a}/{b}"][metric]
    lower = metric != "ssim"
    return Row(finding, setting, a, b, metric, _mean_std(methods[a], metric), _mean_std(methods[b], metric),
               ci["estimate"], ci["low"], ci["high"], expected, judge(ci["low"], ci["high"], expected, lower))


def rows(proc: dict[str, Any], mni: dict[str, Any]) -> list[Row]:
    P, M = "procedural confirmation", "MNI152 confirmation"
    out = [
        row("1 consistency", f"{P}; trained on procedural", proc, "seed_spread_intervals", "seq_osem", "seq_truth",
            "nrmse_seed_std", "a<b"),
        row("1 consistency", f"{M}; trained on MNI152", mni, "seed_spread_intervals", "seq_osem_mni",
            "seq_truth_mni", "nrmse_seed_std", "a<b"),
        row("2 generalisation", f"{M}; trained on procedural", mni, "learned_intervals", "seq_osem", "seq_truth",
            "nrmse", "a<b"),
        row("2 generalisation", f"{P}; trained on MNI152", proc, "learned_intervals", "seq_osem_mni",
            "seq_truth_mni", "nrmse", "a<b"),
        row("2 (in-domain, for reference)", f"{P}; trained on procedural", proc, "learned_intervals", "seq_osem",
            "seq_truth", "nrmse", "a<b"),
        row("2 (in-domain, for reference)", f"{M}; trained on MNI152", mni, "learned_intervals", "seq_osem_mni",
            "seq_truth_mni", "nrmse", "a<b"),
        row("3 iteration-dependent vs shared", P, proc, "learned_intervals", "e2e", "e2e_shared", "nrmse", "a<b"),
        row("3 iteration-dependent vs shared", P, proc, "learned_intervals", "e2e", "e2e_shared", "ssim", "a<b"),
        row("4 sequential vs end-to-end", P, proc, "learned_intervals", "seq_osem", "e2e", "nrmse", "a=b"),
        row("4 sequential vs end-to-end", P, proc, "learned_intervals", "seq_osem", "e2e", "ssim", "a=b"),
        row("greedy vs sequential", P, proc, "learned_intervals", "seq_osem", "greedy", "nrmse", "a=b"),
        row("greedy vs end-to-end", P, proc, "learned_intervals", "e2e", "greedy", "nrmse", "a=b"),
        row("block-wise regulariser", P, proc, "learned_intervals", "seq_osem", "seq_block", "nrmse", "a=b"),
    ]
    for name, base in (("seq_osem", "osem_filtered"), ("seq_osem", "map_em"), ("e2e", "map_em"),
                       ("seq_osem_pm", "map_em_bowsher"), ("seq_osem_pm", "osem_filtered")):
        out.append(baseline_row(P, proc, name, base))
    return out


def baseline_row(setting: str, result: dict[str, Any], name: str, base: str) -> Row:
    """A learned method against a tuned baseline in NRMSE, with the verdict ``evaluate`` wrote
    (``summary.*.ratio_intervals``: better / worse / inconclusive)."""
    summary, methods = _level(result)
    ci = summary["ratio_intervals"][f"{name}/{base}"]["nrmse"]
    return Row("against baselines", setting, name, base, "nrmse", _mean_std(methods[name], "nrmse"),
               _mean_std(methods[base], "nrmse"), ci["estimate"], ci["low"], ci["high"], "a<b",
               {"better": "better", "worse": "worse"}.get(ci["verdict"], "inconclusive"))


def more_data_rows(result: dict[str, Any]) -> list[Row]:
    """Finding 3 again with 60 training phantoms (``e2e_n60`` / ``e2e_shared_n60``, K = 12, procedural
    confirmation set): does one shared network still win when each of the 12 networks sees 48 inputs?"""
    setting = "procedural confirmation; 60 training phantoms (48 train)"
    return [row("3 iteration-dependent vs shared", setting, result, "learned_intervals", "e2e_n60", "e2e_shared_n60",
                metric, "a<b") for metric in ("nrmse", "ssim")]


def memory_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Sequential / end-to-end peak tensor memory at every K where both were measured (no fit)."""
    by = {(r["mode"], r["stages"]): r for r in bench["results"] if r.get("status") == "ok" and r["device"] == "cpu"}
    out = []
    for (mode, k), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        e2e = by.get(("end_to_end", k))
        if mode != "sequential" or e2e is None or r.get("tensor_peak_mb") is None:
            continue
        out.append({"K": k, "sequential_mb": r["tensor_peak_mb"], "end_to_end_mb": e2e["tensor_peak_mb"],
                    "ratio": r["tensor_peak_mb"] / e2e["tensor_peak_mb"]})
    return out


def markdown(table: list[Row], memory: list[dict[str, Any]]) -> str:
    """The findings' Markdown table, and the measured memory's when ``memory`` has rows."""
    lines = ["| finding | setting | a / b | metric | a (mean ± std over seeds) | b | ratio [95 % CI] | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r.finding} | {r.setting} | {r.a} / {r.b} | {r.metric} | {r.a_mean_std} | {r.b_mean_std} | "
                     f"{r.ratio:.3f} [{r.low:.3f}, {r.high:.3f}] | {r.verdict} |")
    if memory:
        lines += ["", "| K | sequential, MB | end-to-end, MB | sequential / end-to-end |", "|---:|---:|---:|---:|"]
        lines += [f"| {m['K']} | {m['sequential_mb']:.0f} | {m['end_to_end_mb']:.0f} | {m['ratio']:.3f} |"
                  for m in memory]
    return "\n".join(lines)


def plot_runs(panels: list[tuple[str, list[dict[str, Any]]]], title: str, path: Path) -> None:
    """One panel per confirmation set: every learned method of the panel's runs, one dot per training
    seed and a bar for mean ± std, with the first run's baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), constrained_layout=True, squeeze=False)
    for ax, (panel_title, results) in zip(axes[0], panels):
        learned = [(n, m) for result in results for n, m in count_level(result)["methods"].items()
                   if "seeds" in m]
        for i, (n, m) in enumerate(learned):
            vals = list(m["seeds"].values())
            ax.scatter([i] * len(vals), [v["nrmse"] for v in vals], color="C0", s=14)
            ax.errorbar(i, m["spread_over_seeds"]["nrmse"]["mean"], yerr=m["spread_over_seeds"]["nrmse"]["std"],
                        fmt="_", color="k", capsize=4)
        methods = count_level(results[0])["methods"]
        for j, base in enumerate(b for b in ("osem", "osem_filtered", "map_em", "map_em_bowsher") if b in methods):
            ax.axhline(methods[base]["mean"]["nrmse"], ls="--", lw=0.8, color=f"C{j + 1}", label=base)
        ax.set_xticks(range(len(learned)), [n for n, _ in learned], rotation=35, ha="right")
        ax.set_ylabel("mean NRMSE over phantoms")
        ax.set_title(panel_title)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(proc: dict[str, Any], mni: dict[str, Any], path: Path) -> None:
    plot_runs([("procedural confirmation set", [proc]), ("MNI152 confirmation set", [mni])],
              "FBSEM-Net 2D (mMR ring, 2e5 counts, K = 12): each dot one training seed, bar mean ± std", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proc", type=Path, required=True, help="evaluate JSON on the procedural confirmation set")
    ap.add_argument("--mni", type=Path, required=True, help="evaluate JSON on the MNI152 confirmation set")
    ap.add_argument("--memory", type=Path, required=True, help="bench_training_memory.py JSON (--tensor-memory)")
    ap.add_argument("--n60", type=Path, default=None, help="evaluate JSON of e2e_n60 and e2e_shared_n60 on the "
                    "procedural confirmation set (finding 3 with 60 training phantoms)")
    ap.add_argument("--out", type=Path, required=True, help="output stem: STEM.json, STEM.png")
    args = ap.parse_args(argv)
    proc, mni = (json.loads(p.read_text()) for p in (args.proc, args.mni))
    n60 = json.loads(args.n60.read_text()) if args.n60 is not None else None
    for name, result in (("--proc", proc), ("--mni", mni), ("--n60", n60)):
        if result is not None and not result.get("phantom_sets", {}).get("confirmation"):
            ap.error(f"{name}: {getattr(args, name[2:])} was not scored as a confirmation set (no --tune-data)")
    table = rows(proc, mni) + (more_data_rows(n60) if n60 is not None else [])
    memory = memory_rows(json.loads(args.memory.read_text()))
    sources = {"proc": str(args.proc), "mni": str(args.mni), "memory": str(args.memory)}
    if args.n60 is not None:
        sources["n60"] = str(args.n60)
    out = {"equivalence_margin": EQUIVALENCE_MARGIN, "sources": sources,
           "findings": [asdict(r) for r in table], "memory_measured": memory}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    plot(proc, mni, args.out.with_suffix(".png"))
    print(markdown(table, memory))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
