"""argparse types that check ranges, so that a bad number is a usage error naming the flag
(argparse prints ``argument --iterations: expected an integer from 1 to 1000, got '1e9'``
and exits 2) before anything runs."""
from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["bounded_int", "finite_float", "torch_device", "voxel_shape"]


def bounded_int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[lo, hi]`` (no upper bound when ``hi`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            span = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}")
        return value

    return parse


def finite_float(lo: float | None = None, hi: float | None = None, *, strict: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in ``[lo, hi]`` (``(lo, hi)`` when ``strict``); a bound
    that is None is not checked."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        below = lo is not None and (value <= lo if strict else value < lo)
        above = hi is not None and (value >= hi if strict else value > hi)
        if not math.isfinite(value) or below or above:
            op_lo, op_hi = (">", "<") if strict else (">=", "<=")
            bounds = " and ".join(b for b in (None if lo is None else f"{op_lo} {lo:g}",
                                              None if hi is None else f"{op_hi} {hi:g}") if b)
            raise argparse.ArgumentTypeError(f"expected a finite number{' ' + bounds if bounds else ''}, got {text!r}")
        return value

    return parse


def voxel_shape(text: str) -> tuple[int, int, int]:
    """argparse type: a box of voxels ``Z,Y,X`` (three positive integers; one, ``N``, stands for ``N,N,N``)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected Z,Y,X: three positive integers (voxels), e.g. 32,64,64 "
                                         f"(or one, 32 for 32,32,32), got {text!r}")
    return (values[0], values[1], values[2])


def torch_device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N`` for a CUDA device that this torch can use, so that
    ``--device cuda`` on a machine without one is a usage error before any data are read."""
    import re

    import torch

    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if text == "cpu":
        return text
    if m is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise argparse.ArgumentTypeError(f"{text!r} is not available here ({why}, torch {torch.__version__}); "
                                         f"use --device cpu")
    index, count = int(m.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), numbered from 0")
    return text
