"""Runs ``sirf-fbsem`` command lines one after another inside one torchrun job (tests/training/test_distributed.py).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_reconstruct_driver.py RUNS.json RESULT_PREFIX

``RUNS.json`` holds a list of argument lists for :func:`sirf_fbsem.cli.main`. The process
group is joined once (gloo) and every command uses it, as ``torchrun -m sirf_fbsem`` would
with a fresh one; rank r writes the commands' exit codes to ``RESULT_PREFIX.rank<r>.json``,
and rank 0 copies run j's ``--output-dir`` summary to ``RESULT_PREFIX.run<j>.summary.json``.
One launch for several runs keeps the test fast (each torchrun start costs seconds).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from sirf_fbsem.cli import main as cli_main
from sirf_fbsem.distributed import init_distributed, shutdown


def main() -> int:
    runs = json.loads(Path(sys.argv[1]).read_text())
    prefix = sys.argv[2]
    ctx = init_distributed("cpu")
    try:
        codes = []
        for j, argv in enumerate(runs):
            codes.append(cli_main(list(argv)))
            if ctx.is_main and "--output-dir" in argv:
                summary = Path(argv[argv.index("--output-dir") + 1]) / "reconstruct_summary.json"
                shutil.copy2(summary, f"{prefix}.run{j}.summary.json")
            ctx.barrier()  # the next run starts when every rank has finished this one
        Path(f"{prefix}.rank{ctx.rank}.json").write_text(json.dumps({"rank": ctx.rank, "codes": codes}))
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
