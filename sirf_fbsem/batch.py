"""Batch reconstruction: many inputs, sharded across the ranks of a torchrun job.

Inputs are given as paths, ``@LIST.txt`` files (one path a line; blank lines and lines
starting with ``#`` are skipped; relative paths are relative to the list file) or glob
patterns (``'scans/*.hs'``, sorted). Each input gets one output, ``DIR/<stem><suffix>``
(the stem is the file name without ``.l.hdr``, ``.hs``, ``.hdr`` ...). Item ``i`` belongs to
rank ``i mod W`` (:func:`~sirf_fbsem.distributed.shard_items`), so each output is
written by exactly one rank, atomically (the writers use
:func:`~sirf_fbsem.io.atomic.atomic_path`); an output that already exists is skipped, so
rerunning a job writes only what is missing. An input that fails is reported (stderr and
the summary) and the others go on. Rank 0 writes the JSON summary of all ranks.
"""
from __future__ import annotations

import glob
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from .io.atomic import atomic_path
from .io.outputs import JSON_MARK
from .distributed import SINGLE_PROCESS, DistContext, shard_items

__all__ = ["BatchItem", "ItemResult", "expand_inputs", "output_stem", "plan_outputs", "run_batch",
           "OUTPUT_SUFFIXES"]

#: image formats a batch can write, by suffix
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".hv")
#: input suffixes removed to form the output stem, longest first
_INPUT_SUFFIXES = (".l.hdr", ".n.hdr", ".hdr", ".hs", ".h33", ".s", ".l")
_GLOB_CHARS = set("*?[")

Status = Literal["written", "skipped", "failed"]


@dataclass(frozen=True)
class BatchItem:
    """One input and the output it gives."""

    input: Path
    output: Path


@dataclass(frozen=True)
class ItemResult:
    """What became of one item: ``written``, ``skipped`` (its output existed) or ``failed`` (``error``)."""

    input: str
    output: str
    status: Status
    rank: int
    seconds: float
    error: str | None = None


def expand_inputs(specs: Sequence[str | Path]) -> list[Path]:
    """Paths from paths, ``@LIST`` files and glob patterns, in order, without duplicates.

    Raises:
        FileNotFoundError: a list file is missing, or a pattern matches nothing.
    """
    out: list[Path] = []
    for spec in specs:
        text = str(spec)
        if text.startswith("@"):
            listing = Path(text[1:])
            if not listing.is_file():
                raise FileNotFoundError(f"input list {str(listing)!r} does not exist")
            for line in listing.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    p = Path(line)
                    out.append(p if p.is_absolute() else listing.parent / p)
        elif _GLOB_CHARS & set(text) and not Path(text).exists():
            matches = sorted(glob.glob(text))
            if not matches:
                raise FileNotFoundError(f"input pattern {text!r} matches no file")
            out.extend(Path(m) for m in matches)
        else:
            out.append(Path(text))
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def output_stem(path: Path) -> str:
    """File name without its input suffix: ``scan.hs`` -> ``scan``, ``PET.l.hdr`` -> ``PET``."""
    name = path.name
    for suffix in _INPUT_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return path.stem


def plan_outputs(inputs: Sequence[Path], output_dir: Path, suffix: str = ".nii.gz") -> list[BatchItem]:
    """``output_dir/<stem><suffix>`` for every input.

    Raises:
        ValueError: an unknown ``suffix``, or two inputs with the same stem (one output each is required).
    """
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output suffix must be one of {OUTPUT_SUFFIXES}, got {suffix!r}")
    items = [BatchItem(Path(p), Path(output_dir) / f"{output_stem(Path(p))}{suffix}") for p in inputs]
    by_output: dict[Path, Path] = {}
    for item in items:
        if item.output in by_output:
            raise ValueError(
                f"inputs {str(by_output[item.output])!r} and {str(item.input)!r} would both write "
                f"{str(item.output)!r}; rename one or reconstruct them into separate directories"
            )
        by_output[item.output] = item.input
    return items


def run_batch(
    items: Sequence[BatchItem],
    process: Callable[[BatchItem], None],
    ctx: DistContext = SINGLE_PROCESS,
    summary_path: Path | None = None,
    skip_existing: bool = True,
) -> list[ItemResult]:
    """Run ``process`` on this rank's items; gather every rank's results (in item order).

    Args:
        items: all items of the job (the same list on every rank).
        process: writes ``item.output`` (atomically) from ``item.input``; an exception marks
            the item failed (reported on stderr) and the batch goes on.
        ctx: the job's distributed context; item ``i`` runs on rank ``i mod world_size``.
        summary_path: rank 0 writes the JSON summary of all ranks there (atomically).
        skip_existing: items whose output exists are skipped (not rewritten).
    Returns:
        every item's :class:`ItemResult`, on every rank.
    """
    mine: list[tuple[int, ItemResult]] = []
    for i in shard_items(len(items), ctx.rank, ctx.world_size):
        item = items[i]
        t0 = time.perf_counter()
        if skip_existing and item.output.exists():
            mine.append((i, ItemResult(str(item.input), str(item.output), "skipped", ctx.rank, 0.0)))
            continue
        try:
            process(item)
        except Exception as err:  # one bad input must not stop the others
            message = f"{type(err).__name__}: {err}"
            print(f"sirf-fbsem reconstruct: {item.input}: failed: {message}", file=sys.stderr)
            last = traceback.extract_tb(err.__traceback__)[-1:]
            where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
            mine.append((i, ItemResult(str(item.input), str(item.output), "failed", ctx.rank,
                                       round(time.perf_counter() - t0, 3), message + where)))
            continue
        mine.append((i, ItemResult(str(item.input), str(item.output), "written", ctx.rank,
                                   round(time.perf_counter() - t0, 3))))
    gathered = sorted((pair for part in ctx.all_gather_object(mine) for pair in part), key=lambda p: p[0])
    results = [r for _, r in gathered]
    if ctx.is_main and summary_path is not None:
        counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
        with atomic_path(summary_path) as tmp:
            tmp.write_text(json.dumps({"written_by": JSON_MARK, "world_size": ctx.world_size, "counts": counts,
                                       "items": [asdict(r) for r in results]}, indent=1))
    return results
