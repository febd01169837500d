"""A model file written from a training run's checkpoints (``sirf-fbsem export-model``).

``train`` writes ``OUT/model.pt`` when its run completes. :func:`export_model` writes the same
file from the run's checkpoints and the training data's ``manifest.json`` alone (the samples need
not be there): for a run whose model file was lost or never written (a run carried to another
machine without it), or, for a sequential run, a model of its first N stages while the later ones
are still training (stage k of a sequential run is trained against its own target, so the first N
stages are a network of N stages in their own right).

The weights are the checkpoints' exactly (for a finished stage, the weights early stopping kept).
The metadata is what ``train`` records (:func:`~sirf_fbsem.training.model_record.model_metadata`),
with two differences: ``train_config`` is rebuilt from the run's signature, which holds every
setting that defines the run (``progress``, ``keep_cache`` and ``block_shape``, which do not change
the weights, take their defaults, as does ``warm_start`` outside sequential runs, which ignore it);
and ``exported_from`` records the run, the stages exported and the stages its network has.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import InputError
from ..io.outputs import PlannedOutput, absolute, check_location, check_replaceable
from ..model.fbsem import FBSEMNet
from ..model.io import safe_torch_load, save_model
from ..projectors.base import PROJECTION_UNITS
from ..simulation.dataset import SHARED_SETTINGS, first_disagreement, load_manifest, manifest_start_rule
from .model_record import model_metadata
from .stage_targets import TargetRule
from .trainers import TrainConfig, training_mode

__all__ = ["RunCheckpoints", "read_run_checkpoints", "export_model", "ExportError"]


class ExportError(InputError):
    """The run or the data cannot give the model asked for (the message names the file or flag)."""


@dataclass(frozen=True)
class RunCheckpoints:
    """What a training run's ``checkpoints/`` hold.

    Attributes:
        run_dir: the run's directory (``train --out``).
        signature: the run's settings (mode, network config, train config, number of samples,
            and the target rule when not the default), as every checkpoint records them.
        states: sequential runs: the state of each stage checkpoint, stage 0 first (``stage_state``);
            other modes: one entry, the network's state (``net_state``).
        complete: per entry of ``states``, whether it is finished (all epochs, or stopped early).
    """

    run_dir: Path
    signature: dict[str, Any]
    states: list[dict[str, torch.Tensor]]
    complete: list[bool]

    @property
    def mode(self) -> str:
        return str(self.signature["mode"])

    @property
    def stage_by_stage(self) -> bool:
        return training_mode(self.mode).stage_by_stage

    @property
    def num_stages(self) -> int:
        """Stages of the run's network."""
        return int(self.signature["network"]["num_stages"])

    @property
    def finished_stages(self) -> int:
        """Sequential runs: the stages finished, 0, 1, ... without a gap; other modes: all or none."""
        if not self.stage_by_stage:
            return self.num_stages if self.complete[0] else 0
        n = 0
        while n < len(self.complete) and self.complete[n]:
            n += 1
        return n


def read_run_checkpoints(run_dir: str | os.PathLike) -> RunCheckpoints:
    """Read ``run_dir/checkpoints`` (``stage_NNN.pt`` of a sequential run, ``checkpoint.pt``
    otherwise; loaded weights-only) and check that they are one run's.

    Raises:
        ExportError: no checkpoints, a gap in the stages, or checkpoints of different runs.
    """
    run = Path(run_dir)
    ckpts = run / "checkpoints"
    stage_files = sorted(ckpts.glob("stage_*.pt")) if ckpts.is_dir() else []
    joint = ckpts / "checkpoint.pt"
    if not stage_files and not joint.is_file():
        raise ExportError(f"--run {str(run)!r}: no training checkpoints in {str(ckpts)!r} (stage_NNN.pt of a "
                          f"sequential run, checkpoint.pt of the other modes); give the --out of a 'sirf-fbsem "
                          f"train' run")
    if stage_files and joint.is_file():
        raise ExportError(f"--run {str(run)!r}: {str(ckpts)!r} holds both stage checkpoints and checkpoint.pt; "
                          f"a run is one or the other")
    files = stage_files or [joint]
    if stage_files:
        expected = [f"stage_{k:03d}.pt" for k in range(len(stage_files))]
        names = [p.name for p in stage_files]
        if names != expected:
            missing = sorted(set(expected) - set(names))
            raise ExportError(f"--run {str(run)!r}: the stage checkpoints have a gap ({', '.join(missing[:3])} "
                              f"missing): copy the run's checkpoints/ whole")
    key = "stage_state" if stage_files else "net_state"
    signatures, states, complete = set(), [], []
    for path in files:
        payload = safe_torch_load(path, "training checkpoint")
        if not isinstance(payload, dict) or key not in payload or "run_signature" not in payload:
            raise ExportError(f"{str(path)!r} is not a sirf-fbsem training checkpoint (no {key!r} or run signature)")
        signatures.add(payload["run_signature"])
        states.append({k: v.detach().cpu() for k, v in payload[key].items()})
        complete.append(bool(payload.get("train_state", {}).get("complete")))
    if len(signatures) != 1:
        raise ExportError(f"--run {str(run)!r}: the checkpoints in {str(ckpts)!r} are from {len(signatures)} runs "
                          f"with different settings; a model is exported from one run")
    signature = json.loads(signatures.pop())
    mode = signature.get("mode")
    try:
        by_stage = training_mode(str(mode)).stage_by_stage
    except ValueError:
        raise ExportError(f"{str(files[0])!r}: unknown training mode {mode!r} in the run's signature") from None
    if by_stage != bool(stage_files):
        raise ExportError(f"--run {str(run)!r}: a {mode} run keeps "
                          f"{'stage_NNN.pt' if by_stage else 'checkpoint.pt'} checkpoints; {str(ckpts)!r} holds the other")
    return RunCheckpoints(run, signature, states, complete)


def _target_rule(run: RunCheckpoints) -> TargetRule:
    d = run.signature.get("data")
    if not d:
        return TargetRule()
    return TargetRule(d["targets"], int(d["target_stride"]), d["image_units"])


def _train_config(run: RunCheckpoints) -> TrainConfig:
    """The run's :class:`TrainConfig` from its signature (the keys it leaves out at their defaults)."""
    known = {f.name for f in fields(TrainConfig)}
    cfg = {k: v for k, v in run.signature["config"].items() if k in known}
    if not run.stage_by_stage:
        cfg.pop("warm_start", None)  # ignored outside sequential runs, and recorded as False in their signature
    for k in ("patch_shape", "block_shape"):
        if cfg.get(k) is not None:
            cfg[k] = tuple(cfg[k])
    if cfg.get("stage_devices") is not None:
        cfg["stage_devices"] = tuple(cfg["stage_devices"])
    return TrainConfig(**cfg)


def _check_data(run: RunCheckpoints, data: Sequence[Path], rule: TargetRule,
                num_stages: int) -> list[dict[str, Any]]:
    """The manifests of ``data``, checked to be data this run can have trained on."""
    if not data:
        raise ExportError("--data: give the run's training data directories (their manifest.json is read)")
    manifests = [load_manifest(d) for d in data]
    where = [str(Path(d) / "manifest.json") for d in data]
    clash = first_disagreement(manifests, (*SHARED_SETTINGS, "num_stages", "initial_image"))
    if clash is not None:
        i, k = clash
        raise ExportError(f"--data {where[i]!r} has another {k} than {where[0]!r}; the directories of one run "
                          f"share it")
    net = run.signature["network"]
    n_files = sum(len(m["files"]) for m in manifests)
    if n_files != int(run.signature["num_samples"]):
        raise ExportError(f"--data {', '.join(where)}: {n_files} samples, but the run in {str(run.run_dir)!r} "
                          f"trained on {run.signature['num_samples']}; give the directories it trained on, in order")
    if int(manifests[0]["num_subsets"]) != int(net["num_subsets"]):
        raise ExportError(f"--data {where[0]!r}: num_subsets {manifests[0]['num_subsets']}, but the run's network "
                          f"has {net['num_subsets']} subsets")
    if manifests[0].get("projection_units") != PROJECTION_UNITS:
        raise ExportError(f"--data {where[0]!r}: simulated in other projection units than {PROJECTION_UNITS!r} "
                          f"(projection_units {manifests[0].get('projection_units')!r})")
    if rule.kind == "osem":
        start = manifest_start_rule(manifests[0], data[0])
        if start != net.get("start_rule", "none"):
            raise ExportError(f"--data {where[0]!r}: targets made with start rule {start!r}, but the run's network "
                              f"has {net.get('start_rule', 'none')!r}")
    if rule.targets_needed(num_stages) > int(manifests[0]["num_stages"]):
        raise ExportError(f"--data {where[0]!r}: {manifests[0]['num_stages']} OSEM targets simulated; the run's "
                          f"{num_stages} stages need {rule.targets_needed(num_stages)}")
    return manifests


def _plan_output(output: Path, overwrite: bool) -> Path:
    path = absolute(output)
    if path.suffix != ".pt":
        raise ExportError(f"--output {str(output)!r}: a model file is written as NAME.pt (its metadata beside it "
                          f"as NAME.json)")
    planned = PlannedOutput(path, "model", "--output")
    owner = check_replaceable(planned, overwrite)
    sidecar = path.with_suffix(".json")
    if owner == "absent" and os.path.lexists(sidecar):
        raise ExportError(f"--output {str(output)!r}: {str(sidecar)!r} exists without its model file (the model's "
                          f"metadata is written there); sirf_fbsem never replaces files it did not write: move it "
                          f"away or choose another path")
    check_location(planned)
    return path


def export_model(run_dir: str | os.PathLike, data: Sequence[str | os.PathLike], output: str | os.PathLike,
                 stages: int | None = None, backend: str = "embedded", overwrite: bool = False) -> Path:
    """Write the model of the training run in ``run_dir`` to ``output`` (and its metadata to
    ``output`` with ``.json``), as :func:`~sirf_fbsem.training.trainers.train` writes it (module docstring).

    Args:
        run_dir: the run's directory (``train --out``), holding ``checkpoints/``.
        data: the run's ``--data`` directories, in order; only their ``manifest.json`` is read
            (geometry, PSF, phantoms), checked against the run (number of samples, subsets,
            start rule, targets).
        output: the model file, ``NAME.pt``.
        stages: sequential runs only: export the first ``stages`` stages (each must be finished);
            None: all of the run's stages, which must all be finished (the run completed).
        backend: the projector the run trained with (``train --backend``), recorded in the metadata;
            it is not in the checkpoints and does not change the weights.
        overwrite: replace a model file sirf_fbsem wrote at ``output`` (a file it did not write is
            never replaced).

    Returns:
        the path written.

    Raises:
        ExportError: unfinished stages, a run without checkpoints, data the run cannot have
            trained on, or an output that may not be written; checked before anything is written.
    """
    if backend not in ("embedded", "sirf"):
        raise ExportError(f"--backend must be 'embedded' or 'sirf', got {backend!r}")
    run = read_run_checkpoints(run_dir)
    where = f"--run {str(run.run_dir)!r}"
    if stages is not None and not run.stage_by_stage:
        raise ExportError(f"--stages exports the first stages of a sequential run (each trained against its own "
                          f"target); the {run.mode} run in {str(run.run_dir)!r} trained its stages together")
    want = run.num_stages if stages is None else int(stages)
    if not 1 <= want <= run.num_stages:
        raise ExportError(f"--stages {stages}: the run's network has {run.num_stages} stages; give 1 to "
                          f"{run.num_stages}")
    done = run.finished_stages
    if done < want:
        if not run.stage_by_stage:
            raise ExportError(f"{where}: the {run.mode} run has not finished (its checkpoint is mid-training); "
                              f"resume it with 'sirf-fbsem train ... --resume'")
        raise ExportError(f"{where}: {done} of the run's {run.num_stages} stages are finished"
                          + (f"; --stages {done} exports those" if done else "")
                          + (" (the model of a whole run needs every stage)" if stages is None else ""))
    rule = _target_rule(run)
    data_paths = [Path(d) for d in data]
    manifests = _check_data(run, data_paths, rule, run.num_stages)
    path = _plan_output(Path(output), overwrite)

    net = FBSEMNet.from_config({**run.signature["network"], "num_stages": want})
    if run.stage_by_stage:
        for k in range(want):
            net.stages[k].load_state_dict(run.states[k])
    else:
        net.load_state_dict(run.states[0])
    meta = model_metadata(manifests, data, rule, want, backend)
    meta.update({"training_mode": run.mode, "train_config": _train_config(run).to_dict(),
                 "exported_from": {"run": str(absolute(run.run_dir)), "stages": want,
                                   "run_stages": run.num_stages}})
    return save_model(path, net, _plain(meta))


def _plain(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` as plain JSON (tuples as lists), as ``train``'s metadata reaches the file."""
    return json.loads(json.dumps(meta))
