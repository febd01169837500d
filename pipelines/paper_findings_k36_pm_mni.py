"""The paper's findings 1 to 4 at K = 36 for PET+MR FBSEM (trained on procedural and on MNI152
phantoms) and findings 3 and 4 for PET-only FBSEM trained on MNI152 phantoms
(docs/studies/paper_findings.md, "Findings 1 to 4 with the MR image, and on the MNI152 training set").

Reads the confirmation runs of ``pipelines/paper_findings_2d.sh`` (``evaluate`` JSON files), one per
flag below. Each configuration was scored once, in its own run, so a comparison may pair two runs: the
runs' baselines must agree phantom by phantom (``--tolerance``), as in ``paper_findings_k36_domains.py``,
whose pairing and verdict rules this script uses. Every comparison whose runs are all given is made;
a run that takes part in none of them (its partner missing) is refused.

=====================  =========================================================  ==================
flag                   learned methods (3 training seeds each)                    confirmation set
=====================  =========================================================  ==================
``--pm-proc``          ``seq_osem_pm_k36``                                         procedural
``--truth-pm-proc``    ``seq_truth_pm_k36``                                        procedural
``--e2e-pm-proc``      ``e2e_pm_k36``, ``e2e_shared_pm_k36``                       procedural
``--pm-on-mni``        ``seq_osem_pm_k36``, ``seq_truth_pm_k36``                   MNI152
``--pm-mni-on-mni``    ``seq_osem_pm_mni_k36``, ``seq_truth_pm_mni_k36``           MNI152
``--pm-mni-on-proc``   ``seq_osem_pm_mni_k36``, ``seq_truth_pm_mni_k36``           procedural
``--mni-on-mni``       ``seq_osem_mni_k36``                                        MNI152
``--e2e-mni``          ``e2e_mni_k36``, ``e2e_shared_mni_k36``                     MNI152
=====================  =========================================================  ==================

Writes OUT (JSON: the finding rows and each network against the tuned baselines) and the figure of
every network's NRMSE per training seed next to it (same stem, ``.png``).

    python pipelines/paper_findings_k36_pm_mni.py --pm-proc A.json --truth-pm-proc B.json ... \\
        --out pipelines/results/paper_findings_2d_k36_pm_mni.json
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paper_findings_k36_domains import _per_sample, check_same_phantoms, finding_markdown, finding_row  # same rules
from paper_findings_table import _mean_std, plot_runs
from paper_findings_table import count_level as _level
from sirf_fbsem.study_statistics import paired_ratio_interval, verdict

RUNS = {  # flag (without "--") -> (confirmation set, its learned methods)
    "pm-proc": ("procedural", ("seq_osem_pm_k36",)),
    "truth-pm-proc": ("procedural", ("seq_truth_pm_k36",)),
    "e2e-pm-proc": ("procedural", ("e2e_pm_k36", "e2e_shared_pm_k36")),
    "pm-on-mni": ("MNI152", ("seq_osem_pm_k36", "seq_truth_pm_k36")),
    "pm-mni-on-mni": ("MNI152", ("seq_osem_pm_mni_k36", "seq_truth_pm_mni_k36")),
    "pm-mni-on-proc": ("procedural", ("seq_osem_pm_mni_k36", "seq_truth_pm_mni_k36")),
    "mni-on-mni": ("MNI152", ("seq_osem_mni_k36",)),
    "e2e-mni": ("MNI152", ("e2e_mni_k36", "e2e_shared_mni_k36")),
}


@dataclass(frozen=True)
class Comparison:
    """Finding ``finding`` on one confirmation set: network ``a`` of run ``a_run`` over network ``b`` of
    run ``b_run`` (flags of RUNS), for each metric; ``expected`` is what the paper found ("a<b": a
    better; "a=b": no notable difference)."""

    finding: str
    setting: str
    a_run: str
    a: str
    b_run: str
    b: str
    metrics: tuple[str, ...]
    expected: str = "a<b"


_S = {k: f"{c} confirmation; trained on {t}; {m}; K = 36" for k, c, t, m in (
    ("pm", "procedural", "procedural", "PET+MR"), ("pm_out", "MNI152", "procedural", "PET+MR"),
    ("pm_mni", "MNI152", "MNI152", "PET+MR"), ("pm_mni_out", "procedural", "MNI152", "PET+MR"),
    ("mni", "MNI152", "MNI152", "PET-only"))}
NRMSE, BOTH = ("nrmse",), ("nrmse", "ssim")
COMPARISONS = (
    Comparison("1 consistency", _S["pm"], "pm-proc", "seq_osem_pm_k36", "truth-pm-proc", "seq_truth_pm_k36",
               ("nrmse_seed_std",)),
    Comparison("1 consistency", _S["pm_mni"], "pm-mni-on-mni", "seq_osem_pm_mni_k36", "pm-mni-on-mni",
               "seq_truth_pm_mni_k36", ("nrmse_seed_std",)),
    Comparison("2 generalisation", _S["pm_out"], "pm-on-mni", "seq_osem_pm_k36", "pm-on-mni", "seq_truth_pm_k36",
               NRMSE),
    Comparison("2 generalisation", _S["pm_mni_out"], "pm-mni-on-proc", "seq_osem_pm_mni_k36", "pm-mni-on-proc",
               "seq_truth_pm_mni_k36", NRMSE),
    Comparison("2 (in-domain, for reference)", _S["pm"], "pm-proc", "seq_osem_pm_k36", "truth-pm-proc",
               "seq_truth_pm_k36", NRMSE),
    Comparison("2 (in-domain, for reference)", _S["pm_mni"], "pm-mni-on-mni", "seq_osem_pm_mni_k36", "pm-mni-on-mni",
               "seq_truth_pm_mni_k36", NRMSE),
    Comparison("3 iteration-dependent vs shared", _S["pm"], "e2e-pm-proc", "e2e_pm_k36", "e2e-pm-proc",
               "e2e_shared_pm_k36", BOTH),
    Comparison("3 iteration-dependent vs shared", _S["mni"], "e2e-mni", "e2e_mni_k36", "e2e-mni", "e2e_shared_mni_k36",
               BOTH),
    Comparison("4 sequential vs end-to-end", _S["pm"], "pm-proc", "seq_osem_pm_k36", "e2e-pm-proc", "e2e_pm_k36", BOTH,
               "a=b"),
    Comparison("4 sequential vs end-to-end", _S["mni"], "mni-on-mni", "seq_osem_mni_k36", "e2e-mni", "e2e_mni_k36",
               BOTH, "a=b"),
)


def baseline_rows(flag: str, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each learned network of ``run`` against the tuned baselines of the same run, paired phantom by
    phantom: MR-guided MAP-EM (Bowsher) for the PET+MR networks, post-filtered OSEM and MAP-EM otherwise."""
    kind, networks = RUNS[flag]
    level = _level(run)
    out = []
    for net in networks:
        bases = ("map_em_bowsher",) if "_pm" in net else ("osem_filtered", "map_em")
        for base in bases:
            if base not in level["methods"]:
                raise ValueError(f"--{flag}: the run has no {base} baseline to compare {net} with")
            for metric in BOTH:
                iv = paired_ratio_interval(_per_sample(level, net, metric), _per_sample(level, base, metric))
                out.append({"confirmation_set": kind, "a": net, "b": base, "metric": metric,
                            "a_mean_std": _mean_std(level["methods"][net], metric),
                            "b_mean": level["methods"][base]["mean"][metric], **iv.to_json(),
                            "verdict": verdict(iv, lower_is_better=metric != "ssim")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, (kind, networks) in RUNS.items():
        p.add_argument(f"--{flag}", type=Path, default=None,
                       help=f"evaluate JSON of {', '.join(networks)} on the {kind} confirmation set")
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest relative difference of the baselines' "
                   "per-phantom NRMSE between two runs on one set (default 1e-6)")
    p.add_argument("--out", type=Path, required=True, help="output JSON (and the figure: same stem, .png)")
    args = p.parse_args(argv)
    paths = {flag: getattr(args, flag.replace("-", "_")) for flag in RUNS}
    given = {flag for flag, path in paths.items() if path is not None}
    if not given:
        p.error("no run given: pass at least one pair of runs (see --help)")
    usable = [c for c in COMPARISONS if {c.a_run, c.b_run} <= given]
    for flag in sorted(given - {f for c in usable for f in (c.a_run, c.b_run)}):
        partners = sorted({f"--{f}" for c in COMPARISONS if flag in (c.a_run, c.b_run) for f in (c.a_run, c.b_run)}
                          - {f"--{flag}"})
        p.error(f"--{flag} ({paths[flag]}) takes part in no comparison without {' or '.join(partners)}")
    runs = {flag: json.loads(paths[flag].read_text()) for flag in sorted(given)}
    for flag, run in runs.items():
        if not run.get("phantom_sets", {}).get("confirmation"):
            p.error(f"--{flag}: {paths[flag]} was not scored as a confirmation set (no --tune-data)")
        names = [n for n, m in _level(run)["methods"].items() if "seeds" in m]
        if sorted(names) != sorted(RUNS[flag][1]):
            p.error(f"--{flag}: {paths[flag]} holds the networks {names}, expected {list(RUNS[flag][1])}")
    findings = []
    for c in usable:
        files = f" ({paths[c.a_run]}, {paths[c.b_run]})"
        findings += [finding_row(c.finding, c.setting, runs[c.a_run], runs[c.b_run], metric, args.tolerance, files,
                                 expected=c.expected, a=c.a, b=c.b) for metric in c.metrics]
    # runs on one set that are not compared above must still hold the same phantoms and data
    for kind in ("procedural", "MNI152"):
        on_set = [f for f in sorted(given) if RUNS[f][0] == kind]
        for f in on_set[1:]:
            check_same_phantoms(runs[on_set[0]], runs[f], args.tolerance,
                                f"{kind} confirmation set ({paths[on_set[0]]}, {paths[f]})")
    against = [r for flag in sorted(given) for r in baseline_rows(flag, runs[flag])]
    result = {"written_by": "pipelines/paper_findings_k36_pm_mni.py",
              "sources": {flag: str(paths[flag]) for flag in sorted(given)},
              "findings": findings, "against_baselines": against}
    args.out.write_text(json.dumps(result, indent=1))
    panels = [(f"{kind} confirmation set", [runs[f] for f in RUNS if f in runs and RUNS[f][0] == kind])
              for kind in ("procedural", "MNI152")]
    plot_runs([pnl for pnl in panels if pnl[1]],
              "FBSEM-Net 2D (mMR ring, 2e5 counts, K = 36), PET+MR and MNI152-trained: each dot one training seed",
              args.out.with_suffix(".png"))
    for r in findings:
        print(finding_markdown(r))
    for r in against:
        print(f"| {r['confirmation_set']} | {r['a']} / {r['b']} | {r['metric']} | {r['a_mean_std']} | "
              f"{r['b_mean']:.4f} | {r['estimate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] | {r['verdict']} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
