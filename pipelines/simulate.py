"""Simulate an FBSEM training set (same options as ``sirf-fbsem simulate``).

    python pipelines/simulate.py --out data/train --num-samples 100 --scanner small_test --2d
"""
from __future__ import annotations

import argparse
import sys

from sirf_fbsem.simulation.cli import add_simulate_arguments, run_simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_simulate_arguments(parser)
    return run_simulate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
