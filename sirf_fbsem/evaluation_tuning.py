"""The baselines' tuning grids of an earlier ``evaluate`` run, read back to be reused.

A study's tuning run (``sirf-fbsem evaluate --data TUNE``) computes, per count level, the
baselines' NRMSE over the tuning phantoms at every point of their grids (OSEM iterations;
post-filter FWHM x iterations; MAP-EM beta x iterations; Bowsher neighbours x beta x iterations)
and records the means in its JSON (``count_levels[level]["tuning_grids"]``). The confirmation run
(``--data CONFIRM --tune-data TUNE``) chooses the baselines' hyperparameters on those same means,
so computing them again is hours of wasted work at the mMR's scale (one tuning phantom at one count
level: 15 min on one CPU core with the mMR grids). ``--tuning-result TUNE.json`` takes them from the
tuning run instead, after checking that they are the grids this run would compute: the same
tuning phantoms (base seeds and number, from the JSON's phantom-set record), the same grids and
masks (the evaluation config, device aside), the same subsets and the same scanner and image.

The choice made from the read grids is the one :func:`sirf_fbsem.evaluation.evaluate_methods`
makes from computed ones: it selects on the mean over the tuning phantoms, which is what the JSON
keeps.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import InputError
from .study_sets import PhantomSet

__all__ = ["EVALUATION_FORMAT", "GRID_KEYS", "TuningResult", "read_tuning_result"]

#: grid name (as ``evaluate_methods`` keeps them) -> the JSON entry of its mean over the tuning phantoms:
#: osem (iterations), filtered (iterations, fwhm), map (betas, iterations), bowsher (neighbours, betas, iterations)
GRID_KEYS = {
    "osem": "osem_nrmse_by_iteration",
    "filtered": "filtered_nrmse_by_iteration_and_fwhm",
    "map": "map_em_nrmse_by_beta_and_iteration",
    "bowsher": "map_em_bowsher_nrmse_by_neighbours_beta_and_iteration",
}
#: the ``format`` of the JSON ``evaluate`` writes
EVALUATION_FORMAT = "sirf_fbsem.evaluation/1"


@dataclass(frozen=True)
class TuningResult:
    """Per count level (``evaluate``'s level keys, e.g. ``"3e+07"``) the baselines' mean NRMSE grids
    of a tuning run, as arrays of shape ``(1, ...)`` (one row: the mean over ``num_tuning_samples[level]``
    phantoms), which the selection reads as it reads the per-phantom grids; ``path`` the JSON read and
    ``digest`` the SHA-256 of its grids (for a stopped run's signature)."""

    path: str
    grids: dict[str, dict[str, np.ndarray]]
    num_tuning_samples: dict[str, int]
    digest: str


def _fail(path: Path, what: str) -> InputError:
    return InputError(f"--tuning-result {path}: {what}")


def read_tuning_result(
    path: str | Path, config: Mapping[str, Any], num_subsets: int, setting: Mapping[str, Any],
    tuning: PhantomSet,
) -> TuningResult:
    """Read the tuning grids of the ``evaluate`` JSON at ``path`` and check they are this run's.

    Args:
        path: the JSON of an earlier ``evaluate`` run (a tuning run, scored on the tuning set, or a
            confirmation run, whose tuning set is recorded as such).
        config: this run's :meth:`EvaluationConfig.to_dict` (grids, masks; ``device`` is not compared).
        num_subsets: the subsets of this run's OSEM and MAP-EM.
        setting: this run's ``"setting"`` record (scanner, image, PSF), as ``evaluate`` writes it.
        tuning: this run's tuning phantoms (``--tune-data``).
    Raises:
        InputError naming the file and what differs, before any reconstruction.
    """
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _fail(path, f"cannot be read as JSON ({e})") from e
    if not isinstance(result, dict) or result.get("format") != EVALUATION_FORMAT:
        got = result.get("format") if isinstance(result, dict) else type(result).__name__
        raise _fail(path, f"not a sirf-fbsem evaluate result (format {got!r}, expected {EVALUATION_FORMAT!r})")
    theirs = {k: v for k, v in (result.get("config") or {}).items() if k != "device"}
    ours = {k: v for k, v in config.items() if k != "device"}
    differ = sorted(k for k in {*theirs, *ours} if theirs.get(k) != ours.get(k))
    if differ:
        raise _fail(path, "its grids are not this run's: " + "; ".join(
            f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ))
    if result.get("num_subsets") != num_subsets:
        raise _fail(path, f"its baselines used {result.get('num_subsets')} subsets, this run {num_subsets}")
    for k, v in setting.items():
        if (result.get("setting") or {}).get(k) != v:
            raise _fail(path, f"another {k} ({(result.get('setting') or {}).get(k)!r}; expected {v!r})")
    sets = result.get("phantom_sets") or {}
    record = sets.get("tuning") or sets.get("scored") or {}
    if tuning.pairs is None or record.get("seeds") is None:
        raise _fail(path, "cannot check that its grids were computed on the --tune-data phantoms (base seeds not "
                    "recorded); leave --tuning-result out to compute them")
    if record["seeds"] != tuning.seeds or record.get("num_phantoms") != len(tuning.pairs):
        raise _fail(path, f"its grids were computed on {record.get('num_phantoms')} phantoms of base seed(s) "
                    f"{record['seeds']}, but --tune-data holds {len(tuning.pairs)} of base seed(s) {tuning.seeds}")
    grids: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, int] = {}
    for level, entry in (result.get("count_levels") or {}).items():
        tg = entry.get("tuning_grids")
        if not isinstance(tg, dict):
            raise _fail(path, f"count level {level} has no tuning_grids")
        grids[level] = {name: np.asarray(tg[key], dtype=np.float64)[None]
                        for name, key in GRID_KEYS.items() if key in tg}
        counts[level] = int(entry["num_tuning_samples"])
    _check_shapes(path, grids, config)
    digest = hashlib.sha256(json.dumps({lv: {k: v.tolist() for k, v in g.items()} for lv, g in grids.items()},
                                       sort_keys=True).encode()).hexdigest()
    return TuningResult(str(path), grids, counts, digest)


def _check_shapes(path: Path, grids: Mapping[str, Mapping[str, np.ndarray]], config: Mapping[str, Any]) -> None:
    """Each level's grids have the shapes ``config``'s grids give (a malformed or edited file is refused)."""
    it, fw, betas, mit = (config["osem_iterations"], len(config["filter_fwhm_mm"]), len(config["map_betas"]),
                          config["map_iterations"])
    expected = {"osem": (1, it), "filtered": (1, it, fw), "map": (1, betas, mit)}
    if config.get("bowsher_neighbours"):
        expected["bowsher"] = (1, len(config["bowsher_neighbours"]), betas, mit)
    for level, g in grids.items():
        for name, shape in expected.items():
            if name not in g or g[name].shape != shape:
                got = None if name not in g else g[name].shape[1:]
                raise _fail(path, f"count level {level}: {GRID_KEYS[name]} has shape {got}, expected {shape[1:]}")
