"""Finding 4 in 3D from the confirmation run of ``pipelines/paper_findings_3d.sh``: sequential against
end-to-end training at K = 21 (NRMSE and SSIM, mean +- std over training seeds, paired bootstrap 95 %
interval over phantoms, verdict), each scheme against the tuned baselines, at every count level the run
scored, printed as the Markdown table of docs/studies/paper_findings.md and written to JSON, with a
figure of every run's NRMSE (one panel per count level).

    python pipelines/paper_findings_3d_table.py --confirm RESULTS/paper_findings_3d.json \\
        --out pipelines/results/paper_findings_3d
    python pipelines/paper_findings_3d_table.py --scale mmr --confirm RESULTS/paper_findings_mmr3d.json \\
        --out pipelines/results/paper_findings_mmr3d

``--scale`` names the script's SCALE (small: the small test scanner, one count level; mmr: the Siemens
mMR at span 11, 3e7 and 3e8 prompts) for the settings the rows name. The rows and verdicts are those of
``pipelines/paper_findings_table.py`` (the rules fixed before the 2D confirmation runs,
docs/studies/rules.md), applied to this setting's JSON.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from paper_findings_table import EQUIVALENCE_MARGIN, Row, at_level, baseline_row, markdown, plot_runs, row

# the scanner and image, and the confirmation phantoms, of each SCALE of paper_findings_3d.sh
SCALES = {"small": ("small test scanner (15 x 47 x 47)", "procedural"),
          "mmr": ("Siemens mMR span 11 (127 x 128 x 128)", "mixed MNI152-based and procedural")}


def prompts(key: str) -> str:
    """A count level's key (``"3e+07"``) as the docs write it (``"3e7"``)."""
    return f"{float(key):.0e}".replace("e+0", "e").replace("e+", "e")


def setting(scale: str, keys: list[str]) -> str:
    scanner, phantoms = SCALES[scale]
    return f"3D {scanner}, {' and '.join(prompts(k) for k in keys)} prompts, K = 21, {phantoms} confirmation"


def rows(result: dict[str, Any], scale: str = "small") -> list[Row]:
    """At every count level: finding 4 (``seq`` / ``e2e``, NRMSE and SSIM: "does not notably hurt") and both
    schemes against post-filtered OSEM and MAP-EM (NRMSE, the JSON's verdict)."""
    out: list[Row] = []
    for key in result["count_levels"]:
        level, where = at_level(result, key), setting(scale, [key])
        out += [row("4 sequential vs end-to-end", where, level, "learned_intervals", "seq", "e2e", metric, "a=b")
                for metric in ("nrmse", "ssim")]
        out += [baseline_row(where, level, name, base) for name in ("seq", "e2e")
                for base in ("osem_filtered", "map_em")]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--confirm", type=Path, required=True, help="evaluate JSON of seq and e2e on the confirmation set")
    ap.add_argument("--scale", choices=sorted(SCALES), default="small",
                    help="paper_findings_3d.sh's SCALE that made the run (names the setting in the rows)")
    ap.add_argument("--out", type=Path, required=True, help="output stem: STEM.json, STEM.png")
    args = ap.parse_args(argv)
    result = json.loads(args.confirm.read_text())
    if not result.get("phantom_sets", {}).get("confirmation"):
        ap.error(f"--confirm: {args.confirm} was not scored as a confirmation set (no --tune-data)")
    keys = list(result["count_levels"])
    table = rows(result, args.scale)
    out = {"equivalence_margin": EQUIVALENCE_MARGIN, "setting": setting(args.scale, keys),
           "sources": {"confirm": str(args.confirm)}, "findings": [asdict(r) for r in table]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    scanner, phantoms = SCALES[args.scale]
    plot_runs([(f"confirmation set, {prompts(k)} prompts", [at_level(result, k)]) for k in keys],
              f"FBSEM-Net 3D, {scanner}, K = 21, {phantoms} phantoms\neach dot one training seed, bar mean ± std",
              args.out.with_suffix(".png"))
    print(markdown(table, []))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
