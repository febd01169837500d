"""Cross-domain table of the 2D K = 36 study: PET-only sequential FBSEM trained on procedural or on
MNI152 phantoms, each scored once on both confirmation sets (docs/studies/paper_findings.md).

Reads the four confirmation runs of ``pipelines/paper_findings_2d.sh`` (``evaluate`` JSON files)
and writes, per confirmation set: each model's NRMSE and SSIM (mean ± std over its training seeds)
and the paired ratio "trained on the other kind / trained on this kind" with a bootstrap 95 %
interval over the confirmation phantoms. The pairing is only valid when both runs scored the same
phantoms with the same data: the script checks that the runs' baselines agree phantom by phantom
(``--tolerance``) and refuses otherwise.

With the runs of the fixed-target networks trained on MNI152 phantoms (``--truth-mni-on-mni``,
``--truth-mni-on-proc``), it also gives findings 1 and 2 at K = 36 for that training set (paired
across runs in the same way), with the verdict rules of ``paper_findings_table.py``.

    python pipelines/paper_findings_k36_domains.py --proc-on-proc A.json --proc-on-mni B.json \\
        --mni-on-mni C.json --mni-on-proc D.json [--truth-mni-on-mni E.json --truth-mni-on-proc F.json] \\
        --out pipelines/results/paper_findings_2d_k36_domains.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from paper_findings_table import _mean_std, judge  # the sibling script's verdict rules and mean ± std format
from sirf_fbsem.study_statistics import paired_ratio_interval, verdict

METRICS = (("nrmse", True), ("ssim", False))
BASELINES = ("osem", "osem_filtered", "map_em")


def _level(result: dict[str, Any]) -> dict[str, Any]:
    levels = result["count_levels"]
    if len(levels) != 1:
        raise ValueError(f"expected one count level, got {sorted(levels)}")
    return next(iter(levels.values()))


def _network(level: dict[str, Any]) -> str:
    """The name of the run's learned method (the one with per-seed results)."""
    names = [k for k, v in level["methods"].items() if "seeds" in v]
    if len(names) != 1:
        raise ValueError(f"expected one learned method with seeds, got {names}")
    return names[0]


def _per_sample(level: dict[str, Any], method: str, metric: str) -> np.ndarray:
    rows = sorted(level["methods"][method]["per_sample"], key=lambda r: r["index"])
    return np.array([r[metric] for r in rows], dtype=np.float64)


def check_same_phantoms(a: dict[str, Any], b: dict[str, Any], tolerance: float, what: str) -> float:
    """The largest relative difference of the baselines' per-phantom NRMSE between two runs; ValueError
    naming ``what`` when the phantoms differ or the difference exceeds ``tolerance``."""
    la, lb = _level(a), _level(b)
    if la["sample_indices"] != lb["sample_indices"] or a["phantom_sets"]["scored"]["seeds"] != \
            b["phantom_sets"]["scored"]["seeds"]:
        raise ValueError(f"{what}: the two runs scored different phantom sets")
    worst = 0.0
    for m in BASELINES:
        x, y = _per_sample(la, m, "nrmse"), _per_sample(lb, m, "nrmse")
        worst = max(worst, float(np.max(np.abs(x - y) / np.abs(y))))
    if worst > tolerance:
        raise ValueError(f"{what}: the baselines differ by up to {worst:.2e} (relative) between the runs, more than "
                         f"--tolerance {tolerance:g}: the data are not the same, so the phantoms cannot be paired")
    return worst


def _model(level: dict[str, Any], trained_on: str) -> dict[str, Any]:
    name = _network(level)
    spread = level["methods"][name]["spread_over_seeds"]
    return {"method": name, "trained_on": trained_on,
            **{m: {"mean": spread[m]["mean"], "std": spread[m]["std"], "num_seeds": spread[m]["num_seeds"]}
               for m, _ in METRICS}}


def domain_table(own: dict[str, Any], other: dict[str, Any], kind: str, other_kind: str,
                 tolerance: float, files: str = "") -> dict[str, Any]:
    """Confirmation set ``kind``: the model trained on ``kind`` (run ``own``) against the one trained on
    ``other_kind`` (run ``other``), and both against the tuned baselines of ``own``; ``files`` names the
    two runs' files in messages."""
    worst = check_same_phantoms(own, other, tolerance, f"{kind} confirmation set{files}")
    lo, lx = _level(own), _level(other)
    a, b = _network(lx), _network(lo)
    out: dict[str, Any] = {
        "confirmation_set": kind,
        "phantom_seeds": own["phantom_sets"]["scored"]["seeds"],
        "num_phantoms": len(lo["sample_indices"]),
        "baselines_max_relative_difference_between_runs": worst,
        "models": [_model(lo, kind), _model(lx, other_kind)],
        "baselines": {m: {met: lo["methods"][m]["mean"][met] for met, _ in METRICS} for m in BASELINES},
        "ratios": {},
    }
    for metric, lower in METRICS:
        iv = paired_ratio_interval(_per_sample(lx, a, metric), _per_sample(lo, b, metric))
        out["ratios"][f"trained on {other_kind} / trained on {kind}: {metric}"] = {
            **iv.to_json(), "verdict": verdict(iv, lower_is_better=lower)}
        for base in ("osem_filtered", "map_em"):
            iv = paired_ratio_interval(_per_sample(lx, a, metric), _per_sample(lo, base, metric))
            out["ratios"][f"trained on {other_kind} / {base}: {metric}"] = {
                **iv.to_json(), "verdict": verdict(iv, lower_is_better=lower)}
    return out


def finding_row(finding: str, setting: str, run_a: dict[str, Any], run_b: dict[str, Any], metric: str,
                tolerance: float, files: str = "") -> dict[str, Any]:
    """Finding row ``a / b`` (a: iteration-dependent targets, run ``run_a``; b: fixed targets, ``run_b``)
    on one confirmation set, paired across the two runs; expected "a<b" (the paper's finding)."""
    check_same_phantoms(run_a, run_b, tolerance, f"{setting}{files}")
    la, lb = _level(run_a), _level(run_b)
    a, b = _network(la), _network(lb)
    iv = paired_ratio_interval(_per_sample(la, a, metric), _per_sample(lb, b, metric))
    return {"finding": finding, "setting": setting, "a": a, "b": b, "metric": metric,
            "a_mean_std": _mean_std(la["methods"][a], metric), "b_mean_std": _mean_std(lb["methods"][b], metric),
            **iv.to_json(), "expected": "a<b",
            "verdict": judge(iv.low, iv.high, "a<b", lower_is_better=metric != "ssim")}


def markdown(tables: list[dict[str, Any]]) -> str:
    lines = ["| confirmation set | a / b | metric | ratio [95 % CI] | verdict |", "|---|---|---|---|---|"]
    for t in tables:
        for name, r in t["ratios"].items():
            pair, metric = name.rsplit(": ", 1)
            lines.append(f"| {t['confirmation_set']} | {pair} | {metric} | {r['estimate']:.3f} "
                         f"[{r['low']:.3f}, {r['high']:.3f}] | {r['verdict']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--proc-on-proc", "--proc-on-mni", "--mni-on-mni", "--mni-on-proc"):
        p.add_argument(flag, type=Path, required=True, help="evaluate JSON of that confirmation run")
    for flag in ("--truth-mni-on-mni", "--truth-mni-on-proc"):
        p.add_argument(flag, type=Path, default=None, help="evaluate JSON of the fixed-target networks trained "
                       "on MNI152 phantoms on that confirmation set (findings 1 and 2)")
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest relative difference of the baselines' "
                   "per-phantom NRMSE between two runs on one set (default 1e-6)")
    p.add_argument("--out", type=Path, required=True, help="output JSON")
    args = p.parse_args(argv)
    runs = {k: json.loads(getattr(args, k).read_text()) for k in ("proc_on_proc", "proc_on_mni", "mni_on_mni",
                                                                  "mni_on_proc")}
    tables = [domain_table(runs["proc_on_proc"], runs["mni_on_proc"], "procedural", "MNI152", args.tolerance,
                           f" ({args.proc_on_proc}, {args.mni_on_proc})"),
              domain_table(runs["mni_on_mni"], runs["proc_on_mni"], "MNI152", "procedural", args.tolerance,
                           f" ({args.mni_on_mni}, {args.proc_on_mni})")]
    findings = []
    if (args.truth_mni_on_mni is None) != (args.truth_mni_on_proc is None):
        p.error("--truth-mni-on-mni and --truth-mni-on-proc go together")
    if args.truth_mni_on_mni is not None:
        truth_mni = json.loads(args.truth_mni_on_mni.read_text())
        truth_proc = json.loads(args.truth_mni_on_proc.read_text())
        M, P = "MNI152 confirmation; trained on MNI152; K = 36", "procedural confirmation; trained on MNI152; K = 36"
        fm, fp = f" ({args.mni_on_mni}, {args.truth_mni_on_mni})", f" ({args.mni_on_proc}, {args.truth_mni_on_proc})"
        findings = [
            finding_row("1 consistency", M, runs["mni_on_mni"], truth_mni, "nrmse_seed_std", args.tolerance, fm),
            finding_row("2 generalisation", P, runs["mni_on_proc"], truth_proc, "nrmse", args.tolerance, fp),
            finding_row("2 (in-domain, for reference)", M, runs["mni_on_mni"], truth_mni, "nrmse", args.tolerance, fm),
        ]
    result = {"written_by": "pipelines/paper_findings_k36_domains.py",
              "sources": {k: str(getattr(args, k)) for k in runs}, "tables": tables, "findings": findings}
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(tables))
    for r in findings:
        print(f"| {r['finding']} | {r['setting']} | {r['a']} / {r['b']} | {r['metric']} | {r['a_mean_std']} | "
              f"{r['b_mean_std']} | {r['estimate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] | {r['verdict']} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
