"""Partial results of an ``evaluate`` run, kept so that a stopped run resumes where it stopped.

A 3D mMR evaluation on a CPU takes hours (per phantom: the baselines' tuning grids, then every
method's reconstruction). :class:`PartialResults` keeps each finished unit of work in a directory
beside the outputs (``OUT/NAME.partial``):

* ``grid_<level>_<i>.npz``: the tuning grids of the i-th tuning phantom of a count level
  (NRMSE arrays, as :func:`sirf_fbsem.evaluation.evaluate_methods` builds them);
* ``scored_<level>_<i>.json`` (and ``.npz`` for the first phantom of a level: the montage's central
  slices, not the volumes): every method's metrics on the i-th scored phantom and OSEM's NRMSE per
  iteration.

The store of a 3D mMR evaluation is then a few hundred kB, so a run stopped on one host can be
copied to another and resumed there (``pipelines/mmr_3d.sh``'s ``carry`` step).

Every file is written atomically, so a unit is either whole or absent. ``signature.json`` records
what the results depend on (the grids, the networks' weights, the phantoms, the package version);
a run resumes only with the same (:class:`~sirf_fbsem.errors.InputError` naming what differs
otherwise). The directory is made when the first unit is done (a run refused before that leaves
nothing) and removed once the final JSON and figure are written. A directory of that name that
this package did not write is refused and left alone.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import InputError
from .io.atomic import atomic_path

__all__ = ["PARTIAL_FORMAT", "PartialResults", "weights_digest"]

#: the ``format`` entry of a partial directory's signature.json
PARTIAL_FORMAT = "sirf_fbsem.evaluation.partial/1"


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, values): two runs with the
    same digest evaluate the same network."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _safe(level: str) -> str:
    return re.sub(r"[^0-9A-Za-z.+-]", "_", level)


@dataclass(frozen=True)
class PartialResults:
    """The finished units of one ``evaluate`` run in ``directory`` (module docstring); use :meth:`open`."""

    directory: Path
    signature: Mapping[str, Any]

    @classmethod
    def open(cls, directory: str | Path, signature: Mapping[str, Any], resume: bool,
             flag: str = "--resume") -> "PartialResults":
        """The store in ``directory``: created with ``signature``, or an earlier run's when ``resume``.

        Raises:
            InputError: ``directory`` holds a stopped run and ``resume`` is False (naming ``flag``); it
                holds one with another signature (naming the entries that differ); or it is not a
                directory this package wrote.
        """
        directory = Path(directory)
        sig = json.loads(json.dumps({"format": PARTIAL_FORMAT, **signature}))  # as it reads back from the file
        marker = directory / "signature.json"
        if directory.exists():
            try:
                old = json.loads(marker.read_text())
            except (OSError, ValueError):
                old = None
            if not isinstance(old, dict) or old.get("format") != PARTIAL_FORMAT:
                raise InputError(f"{str(directory)!r} exists and was not written by sirf-fbsem evaluate (no "
                                 f"{marker.name} of format {PARTIAL_FORMAT}); move it away or choose another "
                                 f"--out or --name")
            if not resume:
                raise InputError(f"{str(directory)!r} holds the partial results of a stopped evaluate run: pass "
                                 f"{flag} to continue it (same data, models and grids), or remove that directory "
                                 f"to start again")
            if old != sig:
                diff = sorted(k for k in set(old) | set(sig) if old.get(k) != sig.get(k))
                raise InputError(f"{flag}: the stopped run in {str(directory)!r} differs in {', '.join(diff)}; "
                                 f"resume it with the same settings, or remove that directory to start again")
        return cls(directory, sig)  # a new store's directory is made when its first unit is done

    def _writable(self) -> Path:
        """The directory, made (with its signature) if this is the first unit stored."""
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            with atomic_path(self.directory / "signature.json") as tmp:
                tmp.write_text(json.dumps(self.signature, indent=1, sort_keys=True))
        return self.directory

    # ---------------------------------------------------------------- tuning grids
    def _grid_path(self, level: str, i: int) -> Path:
        return self.directory / f"grid_{_safe(level)}_{i:04d}.npz"

    def grid(self, level: str, i: int) -> dict[str, np.ndarray] | None:
        """The stored tuning grids of tuning phantom ``i`` of ``level``, or None."""
        path = self._grid_path(level, i)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def save_grid(self, level: str, i: int, grids: Mapping[str, np.ndarray]) -> None:
        self._writable()
        with atomic_path(self._grid_path(level, i)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{k: np.asarray(v) for k, v in grids.items()})

    # ---------------------------------------------------------------- scored phantoms
    def _scored_path(self, level: str, i: int, suffix: str) -> Path:
        return self.directory / f"scored_{_safe(level)}_{i:04d}{suffix}"

    def scored(self, level: str, i: int) -> tuple[dict[str, dict[str, Any]], list[float],
                                                  dict[str, np.ndarray] | None] | None:
        """(metrics per method, OSEM's NRMSE per iteration, montage slices per method or None) of scored phantom
        ``i`` of ``level``, or None when it is not stored."""
        path = self._scored_path(level, i, ".json")
        if not path.is_file():
            return None
        entry = json.loads(path.read_text())
        images = None
        if entry["image_names"]:
            with np.load(self._scored_path(level, i, ".npz"), allow_pickle=False) as f:
                images = {name: f[f"arr_{j}"] for j, name in enumerate(entry["image_names"])}
        return entry["rows"], entry["osem_curve"], images

    def save_scored(self, level: str, i: int, rows: Mapping[str, Mapping[str, Any]], osem_curve: Sequence[float],
                    images: Mapping[str, np.ndarray] | None = None) -> None:
        """Store one scored phantom; the images (the montage's) first, then the JSON that marks it done."""
        self._writable()
        names = list(images) if images else []
        if images:
            with atomic_path(self._scored_path(level, i, ".npz")) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, *[np.asarray(images[n]) for n in names])
        entry = {"rows": rows, "osem_curve": [float(v) for v in osem_curve], "image_names": names}
        with atomic_path(self._scored_path(level, i, ".json")) as tmp:
            tmp.write_text(json.dumps(entry))

    def remove(self) -> None:
        """Delete the store (this package's files only: the directory is one it wrote, checked by :meth:`open`)."""
        if self.directory.is_dir():
            shutil.rmtree(self.directory)
