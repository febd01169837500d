"""Training FBSEM-Net in four modes on the same model and data.

Every mode minimises a mean squared error between stage outputs and targets;
``targets[k]`` of a sample is the (k+1)-th OSEM sub-iterate of its noise-free data
(same subsets, same order, same start image as the network's stages).

* ``sequential``: stage k is trained alone, on the detached and cached outputs of
  the already trained stages 0..k-1 (the start image for k = 0), against
  ``targets[k]``; only its parameters move. When it is done its outputs for every
  sample are computed without gradients and cached (on disk by default) as the
  inputs of stage k+1. Peak memory is that of one stage, whatever K.
* ``end_to_end``: one graph through all K stages; the loss is on the last output
  against the last target (or, with ``all_stages_loss``, the sum over stages).
* ``checkpointed``: as ``end_to_end``, with ``torch.utils.checkpoint`` around each
  stage (activations recomputed in the backward pass; same gradients).
* ``greedy`` (GLEAM-style): every step updates all stages, each on the detached
  output of the one before and against its own target; each stage's graph is
  freed right after its backward pass, so memory is again one stage.

Checkpoints (``out_dir/checkpoints``) are written atomically after every epoch with
the optimiser state, the early-stopping state, the loss history and the RNG states (a
finished stage's without the first two, and with its own loss rows only, so that a
K-stage run's checkpoints grow linearly in K);
batches are shuffled from a generator seeded by (seed, stage, epoch). A run stopped
at any point and restarted with ``resume=True`` redoes the unfinished epoch and ends
with the same weights (bitwise on CPU). Loss logs: ``losses.csv``, ``losses.json``,
``loss_curve.png``. With validation samples, the weights of the epoch with the
lowest validation loss are kept (per stage in sequential mode); in sequential mode
``losses.json`` also gives each validation sample's loss (``val_loss_per_sample``, by
sample index), so that a run on mixed count levels can be read level by level.

Distributed data parallel (``torchrun``; see :mod:`sirf_fbsem.distributed`): when the default
process group is initialised with more than one rank, every mode trains the network
wrapped in ``DistributedDataParallel``; each global batch (the same seeded order on
every rank) is split across ranks and the losses weighted so that the averaged gradient
is that of one process on the whole batch. Validation losses are gathered over ranks. In
sequential mode the cache of stage outputs is computed shard by shard (each sample on
one rank) into the shared ``out_dir/cache``; stage boundaries are barriers. Rank 0
writes checkpoints and logs (atomically) while the others wait at a barrier; on resume
every rank loads the same checkpoint. Callbacks run on every rank: one that raises
StopIteration must do so on every rank at the same step.

Sequential mode can train each stage on random patches (``TrainConfig.patch_shape``,
:mod:`sirf_fbsem.training.patches`): the stage's parameter-free terms (its input, OSEM
sub-update, sensitivity, per-sample scales) and its target are computed once per training
sample when the stage begins (kept like the stage cache: on disk in
``out_dir/cache/stage_NNN/patch_terms`` or in memory), and every step minimises the exact MSE
of the stage's output on ``patches_per_sample`` random regions per sample, drawn from
(seed, stage, epoch, sample). The validation samples' terms are computed in the same pass, so
the validation loss (still the whole-volume stage loss) costs one CNN pass per sample and epoch,
with no sample read and no projection; and when a stage is done its outputs, the next stage's
inputs, are computed from its terms in the same way (:meth:`FBSEMStage.output_on` equals the
stage's forward pass). A stage then reads and projects each sample once.

Any mode can run the CNNs block by block (``TrainConfig.block_shape``,
:mod:`sirf_fbsem.model.blockwise`): memory of a block, same outputs.

Greedy mode can place stages on several devices, round robin (GLEAM):
``TrainConfig.stage_devices``; stage k runs on ``stage_devices[k % len]`` and the
detached image moves between devices.
"""
from __future__ import annotations

import json
import math
import os
import re
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..io.atomic import atomic_path
from ..model.blockwise import check_block_shape
from ..model.fbsem import FBSEMNet, FBSEMStage
from ..model.io import safe_torch_load, save_model
from ..projectors.base import AcquisitionModel
from ..recon.engine import start_image
from ..samples import Batch, Sample
from ..distributed import DistContext, current_context, loss_weight, shard_batch, shard_items
from .patches import average_gradients, draw_patches, patch_training_step, terms_from_payload, terms_payload

__all__ = [
    "MODES",
    "TrainingMode",
    "training_mode",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "train",
    "training_step",
    "evaluate",
    "forward_stages",
    "stage_device",
    "split_indices",
    "with_terms_factory",
    "make_optimizer",
    "CheckpointMismatchError",
    "RunExistsError",
]

Mode = Literal["sequential", "end_to_end", "checkpointed", "greedy"]
MODES: tuple[str, ...] = ("sequential", "end_to_end", "checkpointed", "greedy")
#: :attr:`TrainConfig.loss` values
LOSSES: tuple[str, ...] = ("scaled_mse", "mse")

ModelFactory = Callable[[Batch], AcquisitionModel]


def _remove_stage_cache(cache_dir: Path) -> None:
    """Remove a stage-output cache this trainer wrote (``stage_NNN`` folders only); anything
    else in ``cache_dir`` is the user's and stops the run (never deleted)."""
    foreign = [p.name for p in cache_dir.iterdir() if not (p.is_dir() and re.fullmatch(r"stage_\d{3}", p.name))]
    if foreign:
        raise InputError(f"{str(cache_dir)!r} holds files the trainer did not write ({', '.join(sorted(foreign)[:5])}); "
                         f"the trainer keeps its stage cache there: choose another output directory")
    shutil.rmtree(cache_dir)


class RunExistsError(InputError, FileExistsError):
    """Starting a new run in a directory that holds an earlier run's checkpoints (resume it instead)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointMismatchError(InputError, RuntimeError):
    """Resuming from checkpoints written with another configuration."""


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (validated).

    Attributes:
        epochs: passes over the training samples (per stage in sequential mode).
        lr: Adam learning rate (of the regulariser CNNs; of the betas too unless ``beta_lr``).
        beta_lr: Adam learning rate of the stages' regularisation strengths (their ``rho``,
            ``beta = softplus(rho)``); None: ``lr``. A scalar per stage, it can take a larger
            step than the CNN weights: with a weak start (``beta_init`` 0.1) and ``lr`` 2e-3, beta
            moves by at most ~0.9 in ``rho`` in 400 steps and the CNN output barely reaches the
            fused image, so the stage stays near plain OSEM. In the 2D study of
            docs/studies/mmr_2d.md (``--beta-init 1 --beta-lr 0.05``) it lowered the later stages'
            validation loss, not the NRMSE against the phantom.
        batch_size: samples per step.
        validation_fraction: share of samples held out for validation (split fixed by ``seed``).
        seed: seeds the split and the per-epoch shuffles.
        patience: stop (a stage, in sequential mode) after this many epochs without a
            lower validation loss; None trains all epochs.
        loss: ``"scaled_mse"`` (default): each sample's squared error in units of its own
            scale, ``L = mean_b mean_j (x_bj - t_bj)^2 / c_b^2`` with ``c_b`` the mean of the
            positive voxels of sample b's last target (:func:`sample_scales`), so that samples
            at every count level weigh alike (image units grow with the counts: a 3e8-count
            sample would otherwise outweigh a 1e6-count one (300)^2 times). The networks are
            scale-equivariant, so this only balances the loss. ``"mse"``: the plain mean over
            voxels and samples (sirf_fbsem <= 0.4).
        device: torch device of the network and the data (the acquisition model's
            device is the model factory's choice).
        all_stages_loss: end_to_end / checkpointed: sum the loss over all stages
            (each against its own target) instead of the last stage only.
        cache: sequential mode: keep stage outputs on ``"disk"`` (peak memory one
            stage) or in ``"memory"``.
        keep_cache: keep the disk cache after a completed run.
        progress: show tqdm progress bars (on rank 0 only in a distributed run).
        stage_devices: greedy mode only: devices of the stages, round robin (stage k on
            ``stage_devices[k % len(stage_devices)]``, as GLEAM places them); None: all on ``device``.
        warm_start: sequential mode (default True): stage k starts from the trained weights
            (CNN and beta) of stage k-1 instead of its own initialisation; later stages then
            begin where the previous one ended and only learn what changes from stage to stage
            (README, Evaluation, 60 stages: the later stages' validation loss falls by a quarter to a half;
            the test NRMSE by 12 % with an MR channel, little PET-only). False: every stage from
            its own initialisation. Other modes ignore it.
        block_shape: run the regulariser CNNs block by block, blocks of (z, y, x) voxels under
            gradient checkpointing (:meth:`FBSEMNet.set_block_shape`): the CNN's memory is that
            of one block, its output unchanged (to rounding); every mode. None: the network's
            own setting (whole volumes unless set). Not part of the run's settings: a run may
            be resumed with another block shape.
        patch_shape: sequential mode only: train each stage on random patches of (z, y, x)
            voxels (cut to the image where larger) instead of whole volumes (module docstring;
            :mod:`sirf_fbsem.training.patches`). None: whole volumes.
        patches_per_sample: patches drawn per sample and step when ``patch_shape`` is set.
    """

    epochs: int = 10
    lr: float = 1e-3
    beta_lr: float | None = None
    batch_size: int = 1
    validation_fraction: float = 0.2
    seed: int = 0
    patience: int | None = None
    loss: Literal["mse", "scaled_mse"] = "scaled_mse"
    device: str = "cpu"
    all_stages_loss: bool = False
    cache: Literal["disk", "memory"] = "disk"
    keep_cache: bool = False
    progress: bool = True
    stage_devices: tuple[str, ...] | None = None
    warm_start: bool = True
    block_shape: tuple[int, int, int] | None = None
    patch_shape: tuple[int, int, int] | None = None
    patches_per_sample: int = 8

    def __post_init__(self) -> None:
        def _int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {lo}, got {v!r}")

        _int("epochs", 1)
        _int("batch_size", 1)
        _int("seed", 0)
        _int("patches_per_sample", 1)
        object.__setattr__(self, "block_shape", check_block_shape(self.block_shape, "TrainConfig.block_shape"))
        object.__setattr__(self, "patch_shape", check_block_shape(self.patch_shape, "TrainConfig.patch_shape"))
        if self.patience is not None:
            _int("patience", 1)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if self.beta_lr is not None and not (
            isinstance(self.beta_lr, (int, float)) and not isinstance(self.beta_lr, bool)
            and math.isfinite(self.beta_lr) and self.beta_lr > 0
        ):
            raise ValueError(f"TrainConfig.beta_lr must be None or a finite number > 0, got {self.beta_lr!r}")
        if not (isinstance(self.validation_fraction, (int, float)) and 0 <= self.validation_fraction < 1):
            raise ValueError(
                f"TrainConfig.validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.cache not in ("disk", "memory"):
            raise ValueError(f"TrainConfig.cache must be 'disk' or 'memory', got {self.cache!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"TrainConfig.device {self.device!r} is not a torch device: {err}") from None
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"TrainConfig.warm_start must be True or False, got {self.warm_start!r}")
        if self.stage_devices is not None:
            if isinstance(self.stage_devices, str) or len(self.stage_devices) == 0:
                raise ValueError(
                    f"TrainConfig.stage_devices must be a non-empty sequence of devices, got {self.stage_devices!r}"
                )
            object.__setattr__(self, "stage_devices", tuple(str(d) for d in self.stage_devices))
            for d in self.stage_devices:
                try:
                    torch.device(d)
                except (RuntimeError, TypeError) as err:
                    raise ValueError(f"TrainConfig.stage_devices entry {d!r} is not a torch device: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainEvent:
    """What a callback sees. ``kind``: ``"step"`` (after an optimiser step), ``"epoch"``
    (after an epoch, its checkpoint written) or ``"stage"`` (sequential: a stage done)."""

    kind: Literal["step", "epoch", "stage"]
    mode: str
    stage: int | None
    epoch: int
    step: int
    loss: float | None
    val_loss: float | None
    net: FBSEMNet


Callback = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    net: FBSEMNet
    history: list[dict[str, Any]]
    train_indices: list[int]
    val_indices: list[int]
    completed: bool
    out_dir: Path
    model_path: Path | None = None


# ---------------------------------------------------------------------------- data helpers
def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) sample indices, fixed by ``seed``; at least one training sample."""
    if n < 1:
        raise ValueError("the dataset is empty")
    n_val = int(round(validation_fraction * n))
    if validation_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    n_val = min(n_val, n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _signature_network(net: FBSEMNet) -> dict[str, Any]:
    """The network's config as a run signature holds it: without the count-level keys for
    ``beta_counts = "none"``, so that runs begun before 0.9 (whose networks had none) resume."""
    cfg = net.config()
    if cfg.get("beta_counts") == "none":
        cfg.pop("beta_counts")
        cfg.pop("beta_count_reference")
    return cfg


def make_optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam over ``module``'s parameters: the strength parameters of every :class:`FBSEMStage` in it
    (``rho`` and, when count-aware, ``count_slope``) at ``config.beta_lr`` when set, everything else
    at ``config.lr``."""
    if config.beta_lr is None:  # one group: the optimiser state of earlier checkpoints still loads
        return torch.optim.Adam(module.parameters(), lr=config.lr)
    betas = [p for m in module.modules() if isinstance(m, FBSEMStage)
             for p in (m.rho, m.count_slope) if p is not None]
    seen = {id(p) for p in betas}
    rest = [p for p in module.parameters() if id(p) not in seen]
    groups = [{"params": rest, "lr": config.lr}] + ([{"params": betas, "lr": config.beta_lr}] if betas else [])
    return torch.optim.Adam(groups, lr=config.lr)


def with_terms_factory(base_model: AcquisitionModel) -> ModelFactory:
    """Model factory: ``base_model`` with each batch's multiplicative factors and additive term."""
    base_model.support()  # computed once here, shared by every batch's model (the start image's mask)

    def factory(batch: Batch) -> AcquisitionModel:
        return base_model.with_terms(batch.multiplicative, batch.additive)

    return factory


def _initial(batch: Batch, model: AcquisitionModel) -> torch.Tensor:
    """Start image (B, Z, Y, X): the start image of the simulated targets,
    :func:`~sirf_fbsem.recon.engine.start_image` (1 where some LOR sees the voxel, 0 elsewhere)."""
    prompts = batch.prompts
    x0 = start_image(model).to(dtype=prompts.dtype, device=prompts.device)
    return x0.expand((prompts.shape[0],) + tuple(x0.shape)).clone()


def _net_inputs(net: FBSEMNet, batch: Batch) -> dict[str, Any]:
    anat = batch.anatomical if net.uses_anatomical else None
    if net.uses_anatomical and anat is None:
        raise ValueError("the network takes an anatomical image but the samples have no 'anatomical' tensor")
    return {"sensitivities": batch.sensitivity, "anatomical": anat}


def sample_scales(targets: torch.Tensor) -> torch.Tensor:
    """``c_b``, (B,): the mean of the positive voxels of each sample's last target (targets
    (B, K, Z, Y, X); the K-th noise-free OSEM iterate, positive where the scanner sees); 1 for a
    sample without positive voxels. Proportional to the sample's activity and counts."""
    last = targets[:, -1].flatten(1)
    n = (last > 0).sum(dim=1)
    mean = last.clamp(min=0).sum(dim=1) / n.clamp(min=1)
    return torch.where(n > 0, mean, torch.ones_like(mean))


def sample_losses(out: torch.Tensor, target: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Each sample's stage loss, shape (B,): ``mean_j (out_b - target_b)^2 / c_b^2`` for per-sample
    ``scales`` c (B,), with c_b = 1 when ``scales`` is None; :func:`stage_loss` is their mean."""
    per_sample = ((out - target) ** 2).flatten(1).mean(dim=1)
    return per_sample if scales is None else per_sample / scales.to(per_sample.device, per_sample.dtype) ** 2


def stage_loss(out: torch.Tensor, target: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """The stage loss (:attr:`TrainConfig.loss`): ``mean_b mean_j (out - target)^2 / c_b^2`` for
    per-sample ``scales`` c (B,), the plain mean squared error when ``scales`` is None."""
    if scales is None:
        return torch.mean((out - target) ** 2)
    return torch.mean(sample_losses(out, target, scales))


def _scales(loss: str, batch: Batch) -> torch.Tensor | None:
    return sample_scales(batch.targets) if loss == "scaled_mse" else None


def _check_targets(net: FBSEMNet, batch: Batch) -> None:
    k = batch.targets.shape[1]
    if k < net.num_stages:
        raise ValueError(f"samples have {k} targets (OSEM sub-iterates); the network has {net.num_stages} stages")


def stage_device(stage_devices: Sequence[str] | None, k: int) -> torch.device | None:
    """Device of stage ``k`` when stages are placed round robin (GLEAM), else None."""
    if not stage_devices:
        return None
    return torch.device(stage_devices[k % len(stage_devices)])


def _model_on(model: AcquisitionModel, device: torch.device) -> AcquisitionModel:
    """``model`` on ``device`` (a moved copy when it lives elsewhere)."""
    return model if model.device == device else model.to(device)


class _Placement:
    """Per-device copies of a batch's tensors and its acquisition model (greedy stages on several devices)."""

    def __init__(self, prompts: torch.Tensor, targets: torch.Tensor, kw: Mapping[str, Any], model: AcquisitionModel):
        self._src = (prompts, targets, dict(kw), model)
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor, dict[str, Any], AcquisitionModel]] = {}

    def on(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], AcquisitionModel]:
        if device is None:
            return self._src
        if device not in self._copies:
            prompts, targets, kw, model = self._src
            kw_d = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            self._copies[device] = (prompts.to(device), targets.to(device), kw_d, _model_on(model, device))
        return self._copies[device]


def forward_stages(
    net: FBSEMNet, batch: Batch, model: AcquisitionModel, stage_devices: Sequence[str] | None = None
) -> list[torch.Tensor]:
    """Every stage's output (B, Z, Y, X) from the start image; stage k on ``stage_device(stage_devices, k)``
    (outputs on the device of their stage)."""
    kw = _net_inputs(net, batch)
    x0 = _initial(batch, model)
    if not stage_devices:
        return net(x0, batch.prompts, model, return_all=True, **kw)
    place = _Placement(batch.prompts, batch.targets, kw, model)
    outs, x = [], x0
    for k in range(net.num_stages):
        dev = stage_device(stage_devices, k)
        prompts, _, kw_d, model_d = place.on(dev)
        x = net(x.to(dev), prompts, model_d, stages=[k], **kw_d)
        outs.append(x)
    return outs


# ---------------------------------------------------------------------------- one step
def training_step(
    net: FBSEMNet,
    mode: Mode,
    batch: Batch,
    model: AcquisitionModel,
    config: TrainConfig,
    stage: int | None = None,
    inputs: torch.Tensor | None = None,
    forward: Callable[..., Any] | None = None,
    loss_scale: float = 1.0,
) -> float:
    """Forward and backward of one batch in ``mode``: gradients accumulate in ``.grad``, no optimiser step.

    Args:
        stage: sequential mode: the stage trained.
        inputs: sequential mode: the stage's (cached, detached) input (B, Z, Y, X); for
            stage 0 the start image (the batch's ``initial``, else 1 inside the FOV) when None.
        forward: what runs the network's forward pass: ``net`` (default) or its
            ``DistributedDataParallel`` wrapper, whose backward averages gradients over ranks.
        loss_scale: the loss is multiplied by this before the backward pass (a rank's share
            of a global batch, :func:`~sirf_fbsem.distributed.loss_weight`).
    Returns:
        the (unscaled) loss value (sequential: stage's loss; end_to_end/checkpointed: the loss
        optimised; greedy: the sum of the per-stage losses).
    """
    _check_targets(net, batch)
    ctx = _StepContext(net, batch, model, config, net if forward is None else forward,
                       _net_inputs(net, batch), _scales(config.loss, batch), loss_scale)
    return training_mode(mode).step(ctx, stage, inputs)


@dataclass(frozen=True)
class _StepContext:
    """What every mode's step works on: the network (``run``: it or its DDP wrapper), the batch, its
    acquisition model, the network's extra inputs (``kw``), the per-sample loss scales and the
    factor applied to the loss before the backward pass."""

    net: FBSEMNet
    batch: Batch
    model: AcquisitionModel
    config: TrainConfig
    run: Callable[..., Any]
    kw: dict[str, Any]
    scales: torch.Tensor | None
    loss_scale: float

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.loss_scale == 1.0 else loss * self.loss_scale).backward()


def _sequential_step(ctx: _StepContext, stage: int | None, inputs: torch.Tensor | None) -> float:
    """Stage ``stage`` alone on its detached input: loss against ``targets[:, stage]``."""
    if stage is None:
        raise ValueError("sequential training_step needs the stage index")
    if inputs is None:
        if stage != 0:
            raise ValueError(f"stage {stage} needs its cached inputs (outputs of stage {stage - 1})")
        inputs = _initial(ctx.batch, ctx.model)
    out = ctx.run(inputs.detach(), ctx.batch.prompts, ctx.model, stages=[stage], **ctx.kw)
    loss = stage_loss(out, ctx.batch.targets[:, stage], ctx.scales)
    ctx.backward(loss)
    return float(loss.detach())


def _whole_network_step(checkpointing: bool) -> Callable[[_StepContext, int | None, torch.Tensor | None], float]:
    """One graph through every stage (under ``torch.utils.checkpoint`` per stage when ``checkpointing``):
    loss of the last output against the last target, or with ``all_stages_loss`` the sum over stages."""

    def step(ctx: _StepContext, stage: int | None, inputs: torch.Tensor | None) -> float:
        x0 = _initial(ctx.batch, ctx.model)
        targets, prompts = ctx.batch.targets, ctx.batch.prompts
        if ctx.config.all_stages_loss:
            outs = ctx.run(x0, prompts, ctx.model, return_all=True, checkpointing=checkpointing, **ctx.kw)
            loss = sum(stage_loss(o, targets[:, k], ctx.scales) for k, o in enumerate(outs))
        else:
            out = ctx.run(x0, prompts, ctx.model, checkpointing=checkpointing, **ctx.kw)
            loss = stage_loss(out, targets[:, ctx.net.num_stages - 1], ctx.scales)
        ctx.backward(loss)
        return float(loss.detach())

    return step


def _greedy_step(ctx: _StepContext, stage: int | None, inputs: torch.Tensor | None) -> float:
    """Every stage on the detached output of the one before, against its own target; each stage's
    graph is freed by its backward pass, so memory is one stage. Returns the sum of the stage losses."""
    place = _Placement(ctx.batch.prompts, ctx.batch.targets, ctx.kw, ctx.model)
    x = _initial(ctx.batch, ctx.model)
    total = 0.0
    for k in range(ctx.net.num_stages):
        dev = stage_device(ctx.config.stage_devices, k)
        prompts_k, targets_k, kw_k, model_k = place.on(dev)
        x_k = x.detach() if dev is None else x.detach().to(dev)
        out = ctx.run(x_k, prompts_k, model_k, stages=[k], **kw_k)
        loss = stage_loss(out, targets_k[:, k], ctx.scales)
        ctx.backward(loss)  # frees stage k's graph now: memory stays one stage
        total += float(loss.detach())
        x = out.detach()
    return total


@dataclass(frozen=True)
class TrainingMode:
    """A training mode: its step, and how the run that repeats it is organised.

    Attributes:
        name: one of :data:`MODES`.
        step: forward and backward of one batch (:func:`training_step`).
        stage_by_stage: trained one stage at a time on cached inputs (sequential).
        one_stage_per_forward: each forward pass runs one stage, so DistributedDataParallel
            must expect unused parameters.
        places_stages: may place stages on several devices (``TrainConfig.stage_devices``).
    """

    name: str
    step: Callable[[_StepContext, int | None, torch.Tensor | None], float]
    stage_by_stage: bool = False
    one_stage_per_forward: bool = False
    places_stages: bool = False


_TRAINING_MODES: dict[str, TrainingMode] = {
    "sequential": TrainingMode("sequential", _sequential_step, stage_by_stage=True, one_stage_per_forward=True),
    "end_to_end": TrainingMode("end_to_end", _whole_network_step(checkpointing=False)),
    "checkpointed": TrainingMode("checkpointed", _whole_network_step(checkpointing=True)),
    "greedy": TrainingMode("greedy", _greedy_step, one_stage_per_forward=True, places_stages=True),
}


def training_mode(mode: str) -> TrainingMode:
    """The :class:`TrainingMode` called ``mode``; ValueError for another name."""
    if mode not in _TRAINING_MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _TRAINING_MODES[mode]


@torch.no_grad()
def evaluate(
    net: FBSEMNet,
    dataset: Sequence[Sample],
    indices: Sequence[int],
    model_factory: ModelFactory,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    stage_devices: Sequence[str] | None = None,
    loss: str = "mse",
) -> list[float]:
    """The loss (:attr:`TrainConfig.loss`; default the mean squared error) of every stage's output
    against its target over ``indices``, shape (K,) (zeros for no indices); ``stage_devices``:
    stages placed round robin as in greedy training."""
    sums = [0.0] * net.num_stages
    n = 0
    for lo in range(0, len(indices), batch_size):
        batch = Batch.collate([dataset[i] for i in indices[lo : lo + batch_size]], device)
        _check_targets(net, batch)
        model = model_factory(batch)
        outs = forward_stages(net, batch, model, stage_devices)
        b = batch.size
        scales = _scales(loss, batch)
        for k, o in enumerate(outs):
            sums[k] += float(stage_loss(o, batch.targets[:, k].to(o.device), scales)) * b
        n += b
    return [s / max(n, 1) for s in sums]


# ---------------------------------------------------------------------------- state helpers
def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(v) for v in internal], gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fresh_train_state() -> dict[str, Any]:
    """The train state of a stage (or joint run) before its first epoch."""
    return {"epoch": 0, "best_val": None, "best_state": None, "bad_epochs": 0, "complete": False}


def _mean(values: Mapping[int, float] | None) -> float | None:
    """The mean of per-sample losses (None for None)."""
    return None if values is None else sum(values.values()) / len(values)


def _epoch_order(indices: Sequence[int], seed: int, stage: int, epoch: int) -> list[int]:
    """Shuffled training order of an epoch, a pure function of (seed, stage, epoch)."""
    s = int(np.random.SeedSequence([seed, stage + 1, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(s)).tolist()
    return [indices[i] for i in perm]


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _save(path: Path, payload: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)


def _save_tensor(path: Path, t: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        torch.save(t, tmp)


# ---------------------------------------------------------------------------- the run
@dataclass
class _Shard:
    """This rank's part of a global batch: ``idx`` the samples it runs (its share, or one
    sample with weight 0 when its share is empty), ``n_local`` its share's size, ``weight``
    its loss scale."""

    global_idx: list[int]
    idx: list[int]
    n_local: int
    weight: float
    batch: Batch | None  # None for patch steps, which read their own terms


class _Trainer:
    """One training run; ``run()`` does the work (see :func:`train`)."""

    def __init__(
        self,
        net: FBSEMNet,
        dataset: Sequence[Sample],
        mode: Mode,
        config: TrainConfig,
        model_factory: ModelFactory,
        out_dir: Path,
        callbacks: Sequence[Callback],
        resume: bool,
        distributed: DistContext | None = None,
        data_signature: Mapping[str, Any] | None = None,
    ):
        rule = training_mode(mode)
        if config.stage_devices is not None and not rule.places_stages:
            raise ValueError(f"TrainConfig.stage_devices places the stages of greedy training; mode is {mode!r}")
        if config.patch_shape is not None and not rule.stage_by_stage:
            raise ValueError(f"TrainConfig.patch_shape trains stages on patches in sequential mode only (a stage "
                             f"alone on a fixed input); mode is {mode!r}")
        if rule.stage_by_stage and net.shared_regulariser:
            raise ValueError(
                "sequential training trains each stage's own parameters; a network with a shared regulariser "
                "(shared_regulariser=True) cannot be trained stage by stage: use end_to_end, checkpointed or greedy"
            )
        data_rule = getattr(dataset, "start_rule", None)
        if data_rule is not None and data_rule != net.start_rule:
            raise ValueError(
                f"the dataset's targets were made with start rule {data_rule!r}; the network's is "
                f"{net.start_rule!r} (build it with FBSEMNet(..., start_rule={data_rule!r}))"
            )
        self.net = net.to(config.device)
        if config.block_shape is not None:
            self.net.set_block_shape(config.block_shape)
        if config.stage_devices is not None:
            for k, st in enumerate(self.net.stages):
                st.to(stage_device(config.stage_devices, k))
        self.dist = current_context() if distributed is None else distributed
        self.forward: Callable[..., Any] = self.net  # the DDP wrapper in a distributed run
        self.dataset = dataset
        self.mode = mode
        self.rule = rule
        self.config = config
        self.factory = model_factory
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.cache_dir = self.out_dir / "cache"
        self.callbacks = list(callbacks)
        self.resume = resume
        self.train_idx, self.val_idx = split_indices(len(dataset), config.validation_fraction, config.seed)
        self.history: list[dict[str, Any]] = []
        self.step_count = 0
        self.t0 = time.perf_counter()
        self.run_signature = json.dumps(
            {
                "mode": mode,
                "network": _signature_network(net),
                "config": self._signature_config(),
                "num_samples": len(dataset),
                # only when given: the signatures of runs that had none are unchanged
                **({"data": dict(data_signature)} if data_signature else {}),
            },
            sort_keys=True,
        )

    def _signature_config(self) -> dict[str, Any]:
        """The settings a resumed run must share (ranks of a distributed run differ only in the
        device index, so the device type stands for it there)."""
        # options at their None default are left out, so runs of older versions still resume
        cfg = {k: v for k, v in self.config.to_dict().items()
               if k not in ("progress", "keep_cache", "block_shape")  # block_shape: same outputs, any memory
               and not (k in ("stage_devices", "beta_lr", "patch_shape") and v is None)}
        if self.config.patch_shape is None:
            cfg.pop("patches_per_sample")
        if not self.rule.stage_by_stage:
            cfg["warm_start"] = False  # ignored there: runs begun under the old default still resume
        if self.dist.is_distributed:
            cfg["device"] = torch.device(self.config.device).type
        return cfg

    # -------------------------------------------------------------- bookkeeping
    def _emit(self, event: TrainEvent) -> None:
        for cb in self.callbacks:
            cb(event)

    def _log(self, stage: int | None, epoch: int, train_loss: float | None, val_loss: float | None,
             val_stages: list[float] | None = None, val_samples: dict[int, float] | None = None) -> None:
        row = {
            "mode": self.mode,
            "stage": stage,
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_loss_per_stage": val_stages,
            # by validation sample index (JSON keys are strings); sequential mode, since 0.9.2
            "val_loss_per_sample": None if val_samples is None else {str(i): v for i, v in val_samples.items()},
            "beta": [float(b) for b in self.net.betas.detach().cpu()],
            **({"beta_count_slope": [float(g) for g in self.net.count_slopes.detach().cpu()]}
               if self.net.beta_counts != "none" else {}),
            "elapsed_s": round(time.perf_counter() - self.t0, 3),
        }
        self.history.append(row)
        self._write_logs(plot=False)

    def _write_logs(self, plot: bool) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out_dir / "losses.json") as tmp:
            tmp.write_text(json.dumps({"mode": self.mode, "config": self.config.to_dict(), "history": self.history},
                                      indent=1))
        cols = ["mode", "stage", "epoch", "train_loss", "val_loss", "elapsed_s"]
        lines = [",".join(cols)]
        for r in self.history:
            lines.append(",".join("" if r[c] is None else str(r[c]) for c in cols))
        with atomic_path(self.out_dir / "losses.csv") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        if plot:
            _plot_history(self.history, self.mode, self.out_dir / "loss_curve.png")

    def _check_signature(self, payload: Mapping[str, Any], path: Path) -> None:
        if payload.get("run_signature") != self.run_signature:
            old = json.loads(payload.get("run_signature", "{}"))
            new = json.loads(self.run_signature)
            diffs = _dict_diff(old, new)
            hint = ("; a run begun before sirf_fbsem 0.9 has count-unaware betas: resume it with --beta-counts none"
                    if "network" in old and "beta_counts" not in old["network"] and "beta_counts" in new["network"]
                    else "")
            raise CheckpointMismatchError(
                f"cannot resume from {str(path)!r}: it was written by a run with other settings "
                f"(checkpoint vs now): {'; '.join(diffs) or 'unreadable signature'}{hint}"
            )

    def _prepare_dir(self) -> None:
        initial = self.ckpt_dir / "initial.pt"
        existing = self.ckpt_dir.exists() and any(self.ckpt_dir.glob("*.pt"))
        self.dist.barrier()  # every rank has looked before rank 0 writes
        if existing:
            if not self.resume:
                raise RunExistsError(
                    f"output directory {str(self.out_dir)!r} holds the checkpoints of an earlier run "
                    f"({str(self.ckpt_dir)!r}); pass resume=True (--resume) to continue it, or choose a new or "
                    f"empty output directory"
                )
            if initial.is_file():
                payload = safe_torch_load(initial, "initial checkpoint")
                self._check_signature(payload, initial)
                self.net.load_state_dict(payload["net"])
                return
            # a run carried without its initial weights (derivable: the command line seeds the network with
            # --seed before building it): the network given is taken as the initial one; the stage and
            # joint checkpoints' signatures are still checked as each is read
            if self.dist.is_main:
                _save(initial, {"run_signature": self.run_signature, "net": _clone_state(self.net)})
            self.dist.barrier()
            return
        if self.dist.is_main:
            if self.cache_dir.exists():
                _remove_stage_cache(self.cache_dir)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            _save(initial, {"run_signature": self.run_signature, "net": _clone_state(self.net)})
        if self.dist.is_distributed:  # every rank starts from rank 0's initial weights
            self.dist.barrier()
            self.net.load_state_dict(safe_torch_load(initial, "initial checkpoint")["net"])

    def _resume(self, path: Path, what: str, state_key: str, module: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Continue from the checkpoint at ``path`` (written by :meth:`_write_checkpoint`; checked
        against this run's settings): ``module`` and ``optimizer`` get its states, the trainer its
        history, step count and RNG states. Returns its train state (epoch, early-stopping state,
        ``complete``), or None when there is no checkpoint yet. One implementation for every mode."""
        if not path.is_file():
            return None
        payload = safe_torch_load(path, what)
        self._check_signature(payload, path)
        start = int(payload.get("history_start", 0))  # absent in checkpoints before 0.8.6: the whole history
        if start > len(self.history):
            raise CheckpointMismatchError(
                f"cannot resume from {str(path)!r}: its loss history continues row {start} of the run, but the "
                f"checkpoints read before it hold {len(self.history)} rows (an earlier stage's checkpoint missing?)")
        module.load_state_dict(payload[state_key])
        optimizer.load_state_dict(payload["optimizer"])
        self.history = self.history[:start] + list(payload["history"])
        self.step_count = int(payload["step"])
        _set_rng_state(payload["rng"])
        return dict(payload["train_state"])

    def _write_checkpoint(self, path: Path, state_key: str, module: torch.nn.Module,
                          optimizer: torch.optim.Optimizer, state: Mapping[str, Any], history_start: int = 0,
                          **extra: Any) -> None:
        """The checkpoint :meth:`_resume` reads: the run's signature, ``module``'s state under
        ``state_key``, the optimiser's, the train state, the history from row ``history_start`` (the
        rows before it are in the checkpoints read before this one: the earlier stages' in
        sequential mode), step count and RNG states.

        A complete state is written without the optimiser's moments and the early-stopping copy
        of the weights (``module`` holds the kept weights; nothing reads either again), so that a
        finished stage's checkpoint is its weights and bookkeeping: about 0.1 MB for the 3D mMR
        stage instead of 0.4 MB, with no history repeated from stage to stage.
        """
        opt_state = optimizer.state_dict()
        if state["complete"]:
            opt_state = {"state": {}, "param_groups": opt_state["param_groups"]}
            state = {**state, "best_state": None}
        self._save_checkpoint(path, {
            "run_signature": self.run_signature, **extra, state_key: _clone_state(module),
            "optimizer": opt_state, "train_state": state, "history": self.history[history_start:],
            "history_start": history_start, "step": self.step_count, "rng": _rng_state()})

    def _save_checkpoint(self, path: Path, payload: Mapping[str, Any]) -> None:
        """Rank 0 writes (atomically); the others wait until the file is complete."""
        if self.dist.is_main:
            _save(path, payload)
        self.dist.barrier()

    def _wrap(self) -> None:
        """Distributed run: the DistributedDataParallel wrapper that runs the forward passes."""
        if not self.dist.is_distributed:
            return
        from torch.nn.parallel import DistributedDataParallel

        devices = {p.device for p in self.net.parameters()}
        single_cuda = len(devices) == 1 and next(iter(devices)).type == "cuda"
        self.forward = DistributedDataParallel(
            self.net,
            device_ids=[next(iter(devices))] if single_cuda else None,
            # sequential and greedy passes run one stage: the others' parameters are unused
            find_unused_parameters=self.rule.one_stage_per_forward,
        )

    def _train_batches(self, order: Sequence[int], load: bool = True) -> Iterable[_Shard]:
        """Global batches of ``order``, each cut to this rank's share (the whole batch for one process);
        ``load=False``: the shards' batches are left empty (patch steps read their own terms)."""
        bs, world = self.config.batch_size, self.dist.world_size

        def batch(idx: list[int]) -> Batch | None:
            return Batch.collate([self.dataset[i] for i in idx], self.config.device) if load else None

        for lo in range(0, len(order), bs):
            gidx = list(order[lo : lo + bs])
            if world == 1:
                yield _Shard(gidx, gidx, len(gidx), 1.0, batch(gidx))
                continue
            mine = shard_batch(gidx, self.dist.rank, world)
            run = mine or gidx[:1]  # an empty share joins the gradient reduction with weight 0
            yield _Shard(gidx, run, len(mine), loss_weight(len(mine), len(gidx), world), batch(run))

    def _local_val(self) -> list[int]:
        """This rank's validation samples (all of them for one process)."""
        return shard_batch(self.val_idx, self.dist.rank, self.dist.world_size)

    def _batches(self, order: Sequence[int]) -> Iterable[tuple[list[int], Batch]]:
        bs = self.config.batch_size
        for lo in range(0, len(order), bs):
            idx = list(order[lo : lo + bs])
            yield idx, Batch.collate([self.dataset[i] for i in idx], self.config.device)

    def _early_stopping(self, state: dict[str, Any], val: float | None, module: torch.nn.Module) -> bool:
        """Update best/bad-epoch counters; True when patience is exhausted."""
        if val is None:
            return False
        if state["best_val"] is None or val < state["best_val"]:
            state["best_val"] = val
            state["best_state"] = _clone_state(module)
            state["bad_epochs"] = 0
            return False
        state["bad_epochs"] += 1
        return self.config.patience is not None and state["bad_epochs"] >= self.config.patience

    def run(self) -> bool:
        self._prepare_dir()
        self._wrap()
        try:
            return self._run()
        except StopIteration:  # a callback ended the run (after the last epoch's checkpoint)
            return False
        finally:
            self._write_logs(plot=True)

    def _run(self) -> bool:
        """Train to the end (True) or until early stopping of the whole run (False)."""
        raise NotImplementedError


class _SequentialTrainer(_Trainer):
    """Sequential mode: stage k alone on the cached outputs of the trained stages 0..k-1
    (whole volumes, or patches with ``TrainConfig.patch_shape``), then its outputs cached for k+1."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # stage outputs (cache "memory") and patch terms, by stage then sample: the current stage's only
        self._memory_cache: dict[int, dict[int, torch.Tensor]] = {}
        self._patch_terms: dict[int, dict[int, dict[str, torch.Tensor]]] = {}

    def _cache_path(self, stage: int, i: int) -> Path:
        return self.cache_dir / f"stage_{stage:03d}" / f"sample_{i:06d}.pt"

    def _cache_complete(self, stage: int) -> bool:
        if self.config.cache == "memory":
            return len(self._memory_cache.get(stage, {})) == len(self.dataset)
        return (self.cache_dir / f"stage_{stage:03d}" / "complete.json").is_file()

    def _cached_output(self, stage: int, i: int) -> torch.Tensor:
        if self.config.cache == "memory":
            return self._memory_cache[stage][i]
        return safe_torch_load(self._cache_path(stage, i), "cached stage output")

    def _stage_inputs(self, stage: int, idx: Sequence[int], batch: Batch, model: AcquisitionModel) -> torch.Tensor:
        if stage == 0:
            return _initial(batch, model)
        return torch.stack([self._cached_output(stage - 1, i) for i in idx]).to(self.config.device)

    @torch.no_grad()
    def _fill_cache(self, stage: int) -> None:
        """Outputs of ``stage`` for every sample (one at a time: deterministic), as inputs of ``stage + 1``.

        Distributed: each rank computes its shard of the samples (round robin) and writes
        them to the shared cache (memory cache: the shards are gathered on every rank);
        rank 0 marks the stage complete between two barriers."""
        if stage < 0 or self._cache_complete(stage):
            return
        self._fill_cache(stage - 1)
        store: dict[int, torch.Tensor] = {}
        mine = shard_items(len(self.dataset), self.dist.rank, self.dist.world_size)
        for i in tqdm(mine, desc=f"cache stage {stage + 1}", leave=False,
                      disable=not (self.config.progress and self.dist.is_main)):
            payload = self._stored_terms(stage, i)
            if payload is not None:  # the stage's terms are at hand: no read, no projection
                out = self.net.stages[stage].output_on(terms_from_payload(payload, self.config.device)[0])[0]
            else:
                batch = Batch.collate([self.dataset[i]], self.config.device)
                model = self.factory(batch)
                x_in = self._stage_inputs(stage, [i], batch, model)
                kw = _net_inputs(self.net, batch)
                if self.config.patch_shape is not None:  # as from stored terms: the same numbers either way
                    terms = self.net.stage_terms(stage, x_in, batch.prompts, model, kw["sensitivities"],
                                                 kw["anatomical"])
                    out = self.net.stages[stage].output_on(terms)[0]
                else:
                    out = self.net(x_in, batch.prompts, model, stages=[stage], **kw)[0]
            if self.config.cache == "memory":
                store[i] = out.detach().clone()
            else:
                _save_tensor(self._cache_path(stage, i), out.detach().cpu())
        if self.config.cache == "memory":
            if self.dist.is_distributed:
                for part in self.dist.all_gather_object({i: t.cpu() for i, t in store.items()}):
                    store.update({i: t.to(self.config.device) for i, t in part.items()})
            self._memory_cache[stage] = store
            self._memory_cache.pop(stage - 1, None)  # the inputs of ``stage`` are no longer needed
            return
        self.dist.barrier()  # every shard is on disk
        if self.dist.is_main:
            with atomic_path(self.cache_dir / f"stage_{stage:03d}" / "complete.json") as tmp:
                tmp.write_text(json.dumps({"stage": stage, "num_samples": len(self.dataset)}))
            if not self.config.keep_cache:  # the inputs of ``stage`` are no longer needed
                shutil.rmtree(self.cache_dir / f"stage_{stage - 1:03d}", ignore_errors=True)
        self.dist.barrier()

    # -------------------------------------------------------------- sequential on patches
    def _patch_dir(self, stage: int) -> Path:
        return self.cache_dir / f"stage_{stage:03d}" / "patch_terms"

    def _terms_samples(self) -> list[int]:
        """The samples whose stage terms are computed: training (patch steps) and validation (losses)."""
        return sorted(self.train_idx + self.val_idx)

    def _patch_terms_complete(self, stage: int) -> bool:
        if self.config.cache == "memory":
            return len(self._patch_terms.get(stage, {})) == len(self._terms_samples())
        marker = self._patch_dir(stage) / "complete.json"
        # a run begun before validation terms were kept marked the training samples only
        return marker.is_file() and json.loads(marker.read_text()).get("num_samples") == len(self._terms_samples())

    def _stored_terms(self, stage: int, i: int) -> dict[str, torch.Tensor] | None:
        """Sample ``i``'s terms of ``stage`` (:func:`terms_payload`) where they are kept, else None."""
        if self.config.patch_shape is None:
            return None
        if self.config.cache == "memory":
            return self._patch_terms.get(stage, {}).get(i)
        path = self._patch_dir(stage) / f"sample_{i:06d}.pt"  # written atomically: complete when present
        return safe_torch_load(path, "cached patch terms") if path.is_file() else None

    @torch.no_grad()
    def _fill_patch_terms(self, stage: int) -> None:
        """Per training and validation sample: the terms of ``stage`` on its input and its target
        (:func:`terms_payload`), computed once (the stage's parameters do not enter them), on disk or in
        memory like the stage cache. On disk, samples whose terms are there already (an interrupted
        fill) are not computed again.

        Distributed: each rank computes its shard of the samples; as :meth:`_fill_cache`."""
        if self._patch_terms_complete(stage):
            return
        self._patch_terms.pop(stage - 1, None)  # the previous stage's terms are no longer needed
        store: dict[int, dict[str, torch.Tensor]] = {}
        samples = self._terms_samples()
        mine = [samples[j] for j in shard_items(len(samples), self.dist.rank, self.dist.world_size)]
        if self.config.cache == "disk":
            mine = [i for i in mine if not (self._patch_dir(stage) / f"sample_{i:06d}.pt").is_file()]
        for i in tqdm(mine, desc=f"stage terms {stage + 1}", leave=False,
                      disable=not (self.config.progress and self.dist.is_main)):
            batch = Batch.collate([self.dataset[i]], self.config.device)
            _check_targets(self.net, batch)
            model = self.factory(batch)
            x_in = self._stage_inputs(stage, [i], batch, model)
            kw = _net_inputs(self.net, batch)
            terms = self.net.stage_terms(stage, x_in, batch.prompts, model, kw["sensitivities"], kw["anatomical"])
            scales = _scales(self.config.loss, batch)
            payload = terms_payload(terms, batch.targets[:, stage], None if scales is None else scales[0])
            if self.config.cache == "memory":
                store[i] = {k: v.detach().clone() for k, v in payload.items()}
            else:
                _save(self._patch_dir(stage) / f"sample_{i:06d}.pt", {k: v.cpu() for k, v in payload.items()})
        if self.config.cache == "memory":
            if self.dist.is_distributed:
                for part in self.dist.all_gather_object({i: {k: v.cpu() for k, v in p.items()}
                                                         for i, p in store.items()}):
                    store.update({i: {k: v.to(self.config.device) for k, v in p.items()} for i, p in part.items()})
            self._patch_terms[stage] = store
            return
        self.dist.barrier()  # every shard is on disk
        if self.dist.is_main:
            with atomic_path(self._patch_dir(stage) / "complete.json") as tmp:
                tmp.write_text(json.dumps({"stage": stage, "num_samples": len(samples)}))
        self.dist.barrier()

    def _patch_step(self, stage: FBSEMStage, k: int, epoch: int, sh: _Shard) -> float:
        """Forward and backward of the patch loss of this rank's share of a batch (gradients averaged over ranks)."""
        cfg = self.config
        items = []
        weights: list[float] = []
        for i in sh.idx:
            if cfg.cache == "memory":
                payload = self._patch_terms[k][i]
            else:
                payload = safe_torch_load(self._patch_dir(k) / f"sample_{i:06d}.pt", "cached patch terms")
            terms, target, box = terms_from_payload(payload, cfg.device)
            regions = draw_patches(box, terms.image_shape, cfg.patch_shape, cfg.patches_per_sample, cfg.seed, k,
                                   epoch, i)
            items.append((terms, target, regions))
            if cfg.loss == "scaled_mse":
                weights.append(float(payload["loss_scale"]) ** -2)
        loss = patch_training_step(stage, items, loss_scale=sh.weight, sample_weights=weights or None)
        average_gradients(stage, self.dist)
        return loss

    @torch.no_grad()
    def _stage_val_losses(self, stage: int) -> dict[int, float] | None:
        """The whole-volume stage loss (:func:`sample_losses`) of each validation sample, by sample
        index (every rank's samples, on every rank); from the stage terms (one CNN pass per sample)
        when patch training keeps them. None without validation samples."""
        if not self.val_idx:
            return None
        local: dict[int, float] = {}
        if self.config.patch_shape is not None:
            st = self.net.stages[stage]
            for i in self._local_val():
                payload = self._stored_terms(stage, i)
                if payload is None:
                    raise RuntimeError(f"the terms of stage {stage + 1} for validation sample {i} are missing")
                terms, target, _ = terms_from_payload(payload, self.config.device)
                scale = payload["loss_scale"].reshape(1) if self.config.loss == "scaled_mse" else None
                local[i] = float(stage_loss(st.output_on(terms), target, scale))
        else:
            for idx, batch in self._batches(self._local_val()):
                model = self.factory(batch)
                x_in = self._stage_inputs(stage, idx, batch, model)
                out = self.net(x_in, batch.prompts, model, stages=[stage], **_net_inputs(self.net, batch))
                losses = sample_losses(out, batch.targets[:, stage], _scales(self.config.loss, batch))
                local.update(zip(idx, (float(v) for v in losses)))
        # each rank fills its own samples' places; the sum over ranks gathers them
        summed = self.dist.all_reduce_sum([local.get(i, 0.0) for i in self.val_idx])
        return dict(zip(self.val_idx, summed))

    def _run(self) -> bool:
        cfg = self.config
        for k in range(self.net.num_stages):
            stage = self.net.stages[k]
            path = self.ckpt_dir / f"stage_{k:03d}.pt"
            opt = make_optimizer(stage, cfg)
            state = self._resume(path, "stage checkpoint", "stage_state", stage, opt)
            if state is not None:
                if state["complete"]:
                    continue
            elif cfg.warm_start and k > 0:
                stage.load_state_dict(self.net.stages[k - 1].state_dict())  # stage k-1 is trained (its best)
            self._fill_cache(k - 1)
            if cfg.patch_shape is not None:
                self._fill_patch_terms(k)
            state = state or _fresh_train_state()
            if state["epoch"] == 0:
                # the untrained stage is a candidate too (kept if no epoch beats it)
                per0 = self._stage_val_losses(k)
                val0 = _mean(per0)
                self._early_stopping(state, val0, stage)
                if not any(r["stage"] == k and r["epoch"] == 0 for r in self.history):
                    self._log(k, 0, None, val0, val_samples=per0)
            bar = tqdm(range(state["epoch"], cfg.epochs), desc=f"{self.mode} stage {k + 1}/{self.net.num_stages}",
                       initial=state["epoch"], total=cfg.epochs, disable=not (cfg.progress and self.dist.is_main),
                       leave=False)
            for epoch in bar:
                stage.train()
                total, n = 0.0, 0
                patches = cfg.patch_shape is not None
                for sh in self._train_batches(_epoch_order(self.train_idx, cfg.seed, k, epoch), load=not patches):
                    opt.zero_grad(set_to_none=True)
                    if patches:
                        loss = self._patch_step(stage, k, epoch, sh)
                    else:
                        model = self.factory(sh.batch)
                        x_in = self._stage_inputs(k, sh.idx, sh.batch, model)
                        loss = training_step(self.net, "sequential", sh.batch, model, cfg, stage=k, inputs=x_in,
                                             forward=self.forward, loss_scale=sh.weight)
                    opt.step()
                    self.step_count += 1
                    total += loss * sh.n_local
                    n += sh.n_local
                    self._emit(TrainEvent("step", self.mode, k, epoch + 1, self.step_count, loss, None, self.net))
                total, n = self.dist.all_reduce_sum([total, n])
                stage.eval()
                per = self._stage_val_losses(k)
                val = _mean(per)
                stop = self._early_stopping(state, val, stage)
                state["epoch"] = epoch + 1
                if stop or state["epoch"] == cfg.epochs:
                    if state["best_state"] is not None:
                        stage.load_state_dict(state["best_state"])
                    state["complete"] = True
                self._log(k, epoch + 1, total / n, val, val_samples=per)
                bar.set_postfix(train=f"{total / n:.4g}", val="-" if val is None else f"{val:.4g}")
                first_row = next((i for i, r in enumerate(self.history) if r["stage"] == k), len(self.history))
                self._write_checkpoint(path, "stage_state", stage, opt, state, history_start=first_row, stage=k)
                self._emit(TrainEvent("epoch", self.mode, k, epoch + 1, self.step_count, total / n, val, self.net))
                if state["complete"]:
                    break
            bar.close()
            if cfg.patch_shape is not None:
                if k + 1 < self.net.num_stages:
                    self._fill_cache(k)  # the next stage's inputs, from this stage's terms
                # the stage's terms are no longer needed
                self._patch_terms.pop(k, None)
                if cfg.cache == "disk" and not cfg.keep_cache and self.dist.is_main:
                    shutil.rmtree(self._patch_dir(k), ignore_errors=True)
            self._emit(TrainEvent("stage", self.mode, k, state["epoch"], self.step_count, None,
                                  state["best_val"], self.net))
        return True


class _JointTrainer(_Trainer):
    """end_to_end, checkpointed and greedy modes: every step updates every stage."""

    def _joint_val(self) -> tuple[float | None, list[float] | None]:
        if not self.val_idx:
            return None, None
        mine = self._local_val()
        per_stage = evaluate(self.net, self.dataset, mine, self.factory, self.config.device,
                             self.config.batch_size, self.config.stage_devices, self.config.loss)
        if self.dist.is_distributed:
            sums = self.dist.all_reduce_sum([v * len(mine) for v in per_stage] + [len(mine)])
            per_stage = [v / sums[-1] for v in sums[:-1]]
        return per_stage[-1], per_stage

    def _run(self) -> bool:
        cfg = self.config
        path = self.ckpt_dir / "checkpoint.pt"
        opt = make_optimizer(self.net, cfg)
        state = self._resume(path, "checkpoint", "net_state", self.net, opt) or _fresh_train_state()
        if state["complete"]:
            return True
        if state["epoch"] == 0:
            self.net.eval()
            val, per = self._joint_val()
            self._early_stopping(state, val, self.net)
            if not self.history:
                self._log(None, 0, None, val, per)
        bar = tqdm(range(state["epoch"], cfg.epochs), desc=self.mode, initial=state["epoch"], total=cfg.epochs,
                   disable=not (cfg.progress and self.dist.is_main), leave=False)
        for epoch in bar:
            self.net.train()
            total, n = 0.0, 0
            for sh in self._train_batches(_epoch_order(self.train_idx, cfg.seed, -1, epoch)):
                model = self.factory(sh.batch)
                opt.zero_grad(set_to_none=True)
                loss = training_step(self.net, self.mode, sh.batch, model, cfg, forward=self.forward,
                                     loss_scale=sh.weight)
                opt.step()
                self.step_count += 1
                total += loss * sh.n_local
                n += sh.n_local
                self._emit(TrainEvent("step", self.mode, None, epoch + 1, self.step_count, loss, None, self.net))
            total, n = self.dist.all_reduce_sum([total, n])
            self.net.eval()
            val, per = self._joint_val()
            stop = self._early_stopping(state, val, self.net)
            state["epoch"] = epoch + 1
            if stop or state["epoch"] == cfg.epochs:
                if state["best_state"] is not None:
                    self.net.load_state_dict(state["best_state"])
                state["complete"] = True
            self._log(None, epoch + 1, total / n, val, per)
            bar.set_postfix(train=f"{total / n:.4g}", val="-" if val is None else f"{val:.4g}")
            self._write_checkpoint(path, "net_state", self.net, opt, state)
            self._emit(TrainEvent("epoch", self.mode, None, epoch + 1, self.step_count, total / n, val, self.net))
            if state["complete"]:
                break
        bar.close()
        return True

    # -------------------------------------------------------------- entry


def train(
    net: FBSEMNet,
    dataset: Sequence[Sample],
    mode: Mode,
    config: TrainConfig,
    model_factory: ModelFactory,
    out_dir: str | os.PathLike,
    callbacks: Iterable[Callback] = (),
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
    distributed: DistContext | None = None,
    data_signature: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``net`` on ``dataset`` in ``mode`` (module docstring); writes checkpoints and logs to ``out_dir``.

    Args:
        net: the network (its parameters are trained in place, on ``config.device``).
        dataset: indexable :class:`~sirf_fbsem.samples.Sample` (``prompts``, ``targets`` (K',Z,Y,X)
            with K' >= K, stage k trained against ``targets[k]``, and optionally ``multiplicative``,
            ``additive``, ``sensitivity`` (num_subsets,Z,Y,X), ``anatomical`` (Z,Y,X)); the start
            image is 1 inside the FOV (count-matched by the network), as for the simulated targets.
            E.g. :class:`sirf_fbsem.simulation.dataset.FBSEMSampleDataset`, a list, or a
            :class:`~sirf_fbsem.training.stage_targets.StageTargets` view of either.
        mode: ``"sequential"``, ``"end_to_end"``, ``"checkpointed"`` or ``"greedy"``.
        config: :class:`TrainConfig`.
        model_factory: ``batch -> AcquisitionModel`` (e.g. :func:`with_terms_factory`); the
            batch holds the stacked sample tensors on ``config.device``.
        out_dir: output directory (checkpoints/, cache/, losses.csv/json, loss_curve.png, model.pt).
        callbacks: called with a :class:`TrainEvent` after every step, epoch and (sequential)
            stage; raising StopIteration ends the run cleanly after the last checkpoint.
        resume: continue the run whose checkpoints are in ``out_dir`` (its settings must match).
        metadata: when given (with ``sinogram_geometry`` and ``image_geometry``), the trained
            network is written to ``out_dir/model.pt`` with :func:`~sirf_fbsem.model.io.save_model`.
        distributed: the job's :class:`~sirf_fbsem.distributed.DistContext`; None:
            the initialised default process group if any (``torchrun``), else one process.
            Every rank calls :func:`train` with the same arguments and ``out_dir`` (a shared
            directory); rank 0 writes the files.
        data_signature: what else defines the data (e.g. the :class:`~.stage_targets.TargetRule`):
            part of the run's signature, so a run resumes only with the same.
    """
    runner = _SequentialTrainer if training_mode(mode).stage_by_stage else _JointTrainer
    trainer = runner(net, dataset, mode, config, model_factory, Path(out_dir), list(callbacks), resume,
                     distributed, data_signature)
    completed = trainer.run()
    model_path = None
    if completed:
        main = trainer.dist.is_main
        if (main and training_mode(mode).stage_by_stage and config.cache == "disk" and not config.keep_cache
                and trainer.cache_dir.exists()):
            shutil.rmtree(trainer.cache_dir)
        if metadata is not None:
            meta = dict(metadata)
            meta.update({"training_mode": mode, "train_config": config.to_dict()})
            model_path = Path(out_dir) / "model.pt"
            if main:
                model_path = save_model(model_path, trainer.net, meta)
        trainer.dist.barrier()
    return TrainResult(trainer.net, trainer.history, trainer.train_idx, trainer.val_idx, completed, Path(out_dir),
                       model_path)


# ---------------------------------------------------------------------------- misc
def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]


def _plot_history(history: Sequence[Mapping[str, Any]], mode: str, path: Path) -> None:
    """Loss curves (log scale): per stage in sequential mode, train/validation otherwise."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    stages = sorted({r["stage"] for r in history if r["stage"] is not None})
    groups = [(f"stage {k + 1}", [r for r in history if r["stage"] == k]) for k in stages] or [("", list(history))]
    for label, rows in groups:
        tr = [(r["epoch"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
        va = [(r["epoch"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
        if va:
            line = ax.plot(*zip(*va), marker="o", ms=3, label=f"{label} validation".strip())[0]
            color = line.get_color()
        else:
            color = None
        if tr:
            ax.plot(*zip(*tr), ls="--", color=color, label=f"{label} training".strip())
    ax.set_xlabel("epoch" + (" (within stage)" if stages else ""))
    ax.set_ylabel("MSE")
    if all((r["train_loss"] or 1) > 0 and (r["val_loss"] or 1) > 0 for r in history):
        ax.set_yscale("log")
    ax.set_title(f"FBSEM-Net training ({mode})")
    if len(groups) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
