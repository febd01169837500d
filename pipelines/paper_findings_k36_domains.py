"""The K = 36 tables of the 2D study (docs/studies/paper_findings.md): PET-only FBSEM trained on
procedural or on MNI152 phantoms across phantom kinds, and the paper's findings 1 to 4 at K = 36.

Reads the confirmation runs of ``pipelines/paper_findings_2d.sh`` (``evaluate`` JSON files). Each
configuration was scored once, in its own run, so most comparisons pair two runs: that is only
valid when both scored the same phantoms with the same data. The script checks that the runs'
baselines agree phantom by phantom (``--tolerance``) and refuses otherwise.

- Cross-domain (the four required runs): per confirmation set, each model's NRMSE and SSIM (mean ±
  std over its training seeds) and the paired ratio "trained on the other kind / trained on this
  kind" with a bootstrap 95 % interval over the confirmation phantoms.
- Findings 1 and 2 with the fixed-target networks (``--truth-mni-on-mni`` / ``--truth-mni-on-proc``
  for the MNI152 training set, ``--truth-proc-on-proc`` / ``--truth-proc-on-mni`` for the
  procedural one).
- Findings 3 and 4 with the end-to-end run (``--e2e-proc``: ``e2e_k36`` and ``e2e_shared_k36`` on the
  procedural confirmation set): iteration-dependent against one shared network, and sequential
  (``--proc-on-proc``) against end-to-end.
- Greedy training and the block-wise regulariser (``--schemes-proc``: ``greedy_k36`` and
  ``seq_block_k36`` on the procedural confirmation set), against sequential and end-to-end.

Verdicts follow the rules of ``paper_findings_table.py``, fixed before any confirmation run. Next to the
JSON it draws every learned method's NRMSE per training seed on each confirmation set (same stem, ``.png``).

    python pipelines/paper_findings_k36_domains.py --proc-on-proc A.json --proc-on-mni B.json \\
        --mni-on-mni C.json --mni-on-proc D.json [--truth-mni-on-mni E.json --truth-mni-on-proc F.json] \\
        [--truth-proc-on-proc G.json --truth-proc-on-mni H.json] [--e2e-proc I.json [--schemes-proc J.json]] \\
        --out pipelines/results/paper_findings_2d_k36_domains.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from paper_findings_table import _mean_std, judge, plot_runs  # the sibling script's rules, format and figure
from paper_findings_table import count_level as _level
from sirf_fbsem.study_statistics import paired_ratio_interval, verdict

METRICS = (("nrmse", True), ("ssim", False))
BASELINES = ("osem", "osem_filtered", "map_em")


def _network(level: dict[str, Any], name: str | None = None) -> str:
    """The name of the run's learned method (the one with per-seed results), or ``name`` when the run
    has it among several."""
    names = [k for k, v in level["methods"].items() if "seeds" in v]
    if name is not None:
        if name not in names:
            raise ValueError(f"expected a learned method {name!r} with seeds, got {names}")
        return name
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
                tolerance: float, files: str = "", expected: str = "a<b", a: str | None = None,
                b: str | None = None) -> dict[str, Any]:
    """Finding row ``a / b`` on one confirmation set: learned method ``a`` of run ``run_a`` (its only one
    unless named) against ``b`` of ``run_b``, paired phantom by phantom (the two runs may be one);
    ``expected`` is what the paper found ("a<b": a better; "a=b": no notable difference)."""
    check_same_phantoms(run_a, run_b, tolerance, f"{setting}{files}")
    la, lb = _level(run_a), _level(run_b)
    a, b = _network(la, a), _network(lb, b)
    iv = paired_ratio_interval(_per_sample(la, a, metric), _per_sample(lb, b, metric))
    return {"finding": finding, "setting": setting, "a": a, "b": b, "metric": metric,
            "a_mean_std": _mean_std(la["methods"][a], metric), "b_mean_std": _mean_std(lb["methods"][b], metric),
            **iv.to_json(), "expected": expected,
            "verdict": judge(iv.low, iv.high, expected, lower_is_better=metric != "ssim")}


def finding_markdown(r: dict[str, Any]) -> str:
    """One finding row (``finding_row``) as a line of the doc's Markdown tables."""
    return (f"| {r['finding']} | {r['setting']} | {r['a']} / {r['b']} | {r['metric']} | {r['a_mean_std']} | "
            f"{r['b_mean_std']} | {r['estimate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] | {r['verdict']} |")


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
    for flag in ("--truth-proc-on-proc", "--truth-proc-on-mni"):
        p.add_argument(flag, type=Path, default=None, help="evaluate JSON of the fixed-target networks trained "
                       "on procedural phantoms on that confirmation set (findings 1 and 2)")
    p.add_argument("--e2e-proc", type=Path, default=None, help="evaluate JSON of the end-to-end networks "
                   "(e2e_k36 and e2e_shared_k36) on the procedural confirmation set (findings 3 and 4)")
    p.add_argument("--schemes-proc", type=Path, default=None, help="evaluate JSON of greedy_k36 and seq_block_k36 on "
                   "the procedural confirmation set (with --e2e-proc)")
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest relative difference of the baselines' "
                   "per-phantom NRMSE between two runs on one set (default 1e-6)")
    p.add_argument("--out", type=Path, required=True, help="output JSON (and the figure: same stem, .png)")
    args = p.parse_args(argv)
    runs = {k: json.loads(getattr(args, k).read_text()) for k in ("proc_on_proc", "proc_on_mni", "mni_on_mni",
                                                                  "mni_on_proc")}
    tables = [domain_table(runs["proc_on_proc"], runs["mni_on_proc"], "procedural", "MNI152", args.tolerance,
                           f" ({args.proc_on_proc}, {args.mni_on_proc})"),
              domain_table(runs["mni_on_mni"], runs["proc_on_mni"], "MNI152", "procedural", args.tolerance,
                           f" ({args.mni_on_mni}, {args.proc_on_mni})")]
    for a, b in (("truth_mni_on_mni", "truth_mni_on_proc"), ("truth_proc_on_proc", "truth_proc_on_mni")):
        if (getattr(args, a) is None) != (getattr(args, b) is None):
            p.error(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} go together")
    extra = {k: json.loads(getattr(args, k).read_text()) for k in ("truth_mni_on_mni", "truth_mni_on_proc",
                                                                  "truth_proc_on_proc", "truth_proc_on_mni", "e2e_proc",
                                                                  "schemes_proc")
             if getattr(args, k) is not None}
    if "schemes_proc" in extra and "e2e_proc" not in extra:
        p.error("--schemes-proc needs --e2e-proc (greedy training is also compared with end-to-end)")
    findings = []

    def pair(x: str, y: str) -> str:
        return f" ({getattr(args, x)}, {getattr(args, y)})"

    for kind, k in (("MNI152", "mni"), ("procedural", "proc")):  # training set: findings 1 and 2
        if f"truth_{k}_on_{k}" not in extra:
            continue
        other, o = ("procedural", "proc") if k == "mni" else ("MNI152", "mni")
        own_set, other_set = (f"{c} confirmation; trained on {kind}; K = 36" for c in (kind, other))
        on_own, on_other = runs[f"{k}_on_{k}"], runs[f"{k}_on_{o}"]
        truth_own, truth_other = extra[f"truth_{k}_on_{k}"], extra[f"truth_{k}_on_{o}"]
        f_own, f_other = pair(f"{k}_on_{k}", f"truth_{k}_on_{k}"), pair(f"{k}_on_{o}", f"truth_{k}_on_{o}")
        findings += [
            finding_row("1 consistency", own_set, on_own, truth_own, "nrmse_seed_std", args.tolerance, f_own),
            finding_row("2 generalisation", other_set, on_other, truth_other, "nrmse", args.tolerance, f_other),
            finding_row("2 (in-domain, for reference)", own_set, on_own, truth_own, "nrmse", args.tolerance, f_own),
        ]
    P = "procedural confirmation; trained on procedural; K = 36"  # findings 3, 4, greedy and block-wise
    if "e2e_proc" in extra:
        e2e = extra["e2e_proc"]
        f3, f4 = f" ({args.e2e_proc})", pair("proc_on_proc", "e2e_proc")
        findings += [
            finding_row("3 iteration-dependent vs shared", P, e2e, e2e, metric, args.tolerance, f3,
                        a="e2e_k36", b="e2e_shared_k36") for metric in ("nrmse", "ssim")]
        findings += [
            finding_row("4 sequential vs end-to-end", P, runs["proc_on_proc"], e2e, metric, args.tolerance, f4,
                        expected="a=b", b="e2e_k36") for metric in ("nrmse", "ssim")]
    if "schemes_proc" in extra:
        sch = extra["schemes_proc"]
        f_seq, f_e2e = pair("proc_on_proc", "schemes_proc"), pair("e2e_proc", "schemes_proc")
        findings += [
            finding_row("greedy vs sequential", P, runs["proc_on_proc"], sch, "nrmse", args.tolerance, f_seq,
                        expected="a=b", b="greedy_k36"),
            finding_row("greedy vs end-to-end", P, extra["e2e_proc"], sch, "nrmse", args.tolerance, f_e2e,
                        expected="a=b", a="e2e_k36", b="greedy_k36"),
            finding_row("block-wise regulariser", P, runs["proc_on_proc"], sch, "nrmse", args.tolerance, f_seq,
                        expected="a=b", b="seq_block_k36"),
        ]
    result = {"written_by": "pipelines/paper_findings_k36_domains.py",
              "sources": {k: str(getattr(args, k)) for k in [*runs, *extra]}, "tables": tables, "findings": findings}
    args.out.write_text(json.dumps(result, indent=1))
    plot_runs([("procedural confirmation set", [runs["proc_on_proc"], runs["mni_on_proc"]]
                + [extra[k] for k in ("truth_proc_on_proc", "truth_mni_on_proc", "e2e_proc", "schemes_proc") if k in extra]),
               ("MNI152 confirmation set", [runs["mni_on_mni"], runs["proc_on_mni"]]
                + [extra[k] for k in ("truth_mni_on_mni", "truth_proc_on_mni") if k in extra])],
              "FBSEM-Net 2D (mMR ring, 2e5 counts, K = 36): each dot one training seed, bar mean ± std",
              args.out.with_suffix(".png"))
    print(markdown(tables))
    for r in findings:
        print(finding_markdown(r))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
