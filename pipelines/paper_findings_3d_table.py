"""Finding 4 in 3D from the confirmation run of ``pipelines/paper_findings_3d.sh``: sequential against
end-to-end training at K = 21 (NRMSE and SSIM, mean +- std over training seeds, paired bootstrap 95 %
interval over phantoms, verdict), each scheme against the tuned baselines, printed as the Markdown
table of docs/studies/paper_findings.md and written to JSON, with a figure of every run's NRMSE.

    python pipelines/paper_findings_3d_table.py --confirm RESULTS/paper_findings_3d.json \\
        --out pipelines/results/paper_findings_3d

The rows and verdicts are those of ``pipelines/paper_findings_table.py`` (the rules fixed before the
2D confirmation runs, docs/studies/rules.md), applied to this setting's JSON.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from paper_findings_table import EQUIVALENCE_MARGIN, Row, baseline_row, markdown, plot_runs, row

SETTING = "3D small test scanner (15 x 47 x 47), 3e6 prompts, K = 21, procedural confirmation"


def rows(result: dict[str, Any]) -> list[Row]:
    """Finding 4 (``seq`` / ``e2e``, NRMSE and SSIM: "does not notably hurt") and both schemes against
    post-filtered OSEM and MAP-EM (NRMSE, the JSON's verdict)."""
    out = [row("4 sequential vs end-to-end", SETTING, result, "learned_intervals", "seq", "e2e", metric, "a=b")
           for metric in ("nrmse", "ssim")]
    return out + [baseline_row(SETTING, result, name, base) for name in ("seq", "e2e")
                  for base in ("osem_filtered", "map_em")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--confirm", type=Path, required=True, help="evaluate JSON of seq and e2e on the confirmation set")
    ap.add_argument("--out", type=Path, required=True, help="output stem: STEM.json, STEM.png")
    args = ap.parse_args(argv)
    result = json.loads(args.confirm.read_text())
    if not result.get("phantom_sets", {}).get("confirmation"):
        ap.error(f"--confirm: {args.confirm} was not scored as a confirmation set (no --tune-data)")
    table = rows(result)
    out = {"equivalence_margin": EQUIVALENCE_MARGIN, "setting": SETTING, "sources": {"confirm": str(args.confirm)},
           "findings": [asdict(r) for r in table]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    plot_runs([("procedural confirmation set", [result])],
              "FBSEM-Net 3D, small test scanner, K = 21\neach dot one training seed, bar mean ± std",
              args.out.with_suffix(".png"))
    print(markdown(table, []))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
