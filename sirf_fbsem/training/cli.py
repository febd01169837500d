"""``sirf-fbsem train``: flags mapped one to one onto :class:`TrainConfig`, :class:`FBSEMNet` and :func:`train`.

The data directories (``--data``, one or several trained on together) are written by
``sirf-fbsem simulate`` (read with :class:`~sirf_fbsem.simulation.dataset.FBSEMSampleDataset`:
``manifest.json`` with the
sinogram and image geometry, ``num_subsets``, ``num_stages``, ``psf_fwhm_mm`` and the
sample files). The trained network is written to ``OUT/model.pt`` (+ ``model.json``).

Under ``torchrun`` (``torchrun --nproc-per-node N -m sirf_fbsem train ...``) every rank
runs this command: the process group is joined from the environment (gloo for
``--device cpu``, nccl for ``--device cuda``, one GPU per local rank), the global batch
``--batch-size`` is split across ranks, and ``--out`` must be a directory every rank
sees. A job that torchrun restarts (``--max-restarts``) resumes from its checkpoints
without ``--resume``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..argtypes import bounded_int, finite_float, torch_device, voxel_shape
from ..distributed import DistContext, elastic_restart_count, init_distributed, local_device, shutdown
from ..errors import InputError
from ..geometry import image_geometry_from_dict, sinogram_geometry_from_dict
from ..io.outputs import check_run_directory
from ..model.fbsem import BETA_COUNTS, FBSEMNet
from ..model.regularisers import RegulariserConfig
from ..projectors.base import PROJECTION_UNITS
from ..projectors.factory import add_backend_argument, check_backend, make_acquisition_model
from ..simulation.dataset import SHARED_SETTINGS, open_datasets
from .resident import PRELOAD_CHOICES, ResidentDataset
from .export import export_model
from .model_record import model_metadata
from .stage_targets import IMAGE_UNITS, TARGET_KINDS, StageTargets, TargetRule
from .trainers import LOSSES, MODES, TrainConfig, train, with_terms_factory

__all__ = ["add_train_arguments", "run_train", "add_export_arguments", "run_export"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` flags to ``parser``."""
    parser.add_argument("--data", type=Path, nargs="+", required=True, metavar="DIR",
                        help="directories of simulated samples (manifest.json); several are trained on together "
                        "(same geometry, subsets, targets and PSF), e.g. one per count level")
    parser.add_argument("--out", type=Path, required=True, help="output directory (checkpoints, logs, model.pt)")
    parser.add_argument("--mode", choices=MODES, default="sequential", help="training mode (default sequential)")
    parser.add_argument("--stages", type=bounded_int(1, 1000), default=None,
                        help="number of unrolled stages K (default: the data's num_stages)")
    parser.add_argument("--shared", action="store_true", help="one regulariser shared by all stages")
    parser.add_argument("--epochs", type=bounded_int(1, 100000), default=10, help="epochs (per stage in sequential mode; default 10)")
    parser.add_argument("--lr", type=finite_float(0.0, strict=True), default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--beta-lr", type=finite_float(0.0, strict=True), default=None,
                        help="Adam learning rate of the stages' betas (default: --lr); e.g. 5e-2 with "
                        "--beta-init 1 lets a stage leave plain OSEM sooner (README, Evaluation)")
    parser.add_argument("--batch-size", type=bounded_int(1), default=1, help="samples per step (default 1)")
    parser.add_argument("--validation-fraction", type=finite_float(0.0, 1.0), default=0.2, help="held-out share (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and shuffles (default 0)")
    parser.add_argument("--patience", type=bounded_int(1), default=None, help="early-stopping patience in epochs")
    parser.add_argument("--loss", choices=LOSSES, default="scaled_mse",
                        help="scaled_mse (default): each sample's squared error divided by its own squared scale "
                        "(mean of its last target), so that every count level weighs alike; mse: the plain mean "
                        "squared error (sirf_fbsem <= 0.4; resumes runs begun with it)")
    parser.add_argument("--targets", choices=TARGET_KINDS, default="osem",
                        help="osem (default): stage k against the data's noise-free OSEM sub-iterate (k+1)*S "
                        "(iteration-dependent targets); truth: every stage against the ground-truth phantom")
    parser.add_argument("--target-stride", type=bounded_int(1, 1000), default=1, metavar="S",
                        help="with --targets osem: stage k's target is sub-iterate (k+1)*S (the data need K*S "
                        "targets: simulate with --num-stages K*S); default 1")
    parser.add_argument("--image-units", choices=IMAGE_UNITS, default="as_simulated",
                        help="as_simulated (default), or phantom_mean: each sample in units of its phantom's mean "
                        "over the support (prompts unchanged; reweights the loss across activities, as the "
                        "published 2D studies did with --loss mse)")
    parser.add_argument("--all-stages-loss", action="store_true",
                        help="end_to_end/checkpointed: sum the loss over every stage's output")
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu or cuda[:N] (default cpu)")
    add_backend_argument(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run whose checkpoints are in --out")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=3,
                        help="regulariser convolutions: 2 (slice by slice) or 3 (default 3)")
    parser.add_argument("--anatomical", action="store_true",
                        help="give the regulariser the anatomical (MR) image as a second channel")
    parser.add_argument("--channels", type=bounded_int(1, 4096), default=32, help="regulariser feature channels (default 32)")
    parser.add_argument("--layers", type=bounded_int(1, 1000), default=5, help="regulariser convolutions (default 5)")
    parser.add_argument("--beta-init", type=finite_float(0.0, strict=True), default=0.1, help="initial beta, normalised units (default 0.1)")
    parser.add_argument("--beta-counts", choices=BETA_COUNTS, default="log_linear",
                        help="log_linear (default): each stage's beta also depends on the data's count level, "
                        "estimated from the prompts' noise (beta = softplus(rho - gamma ln(N/1e7)), gamma learned, "
                        "initially 0); none: one beta per stage at every count level (runs begun before 0.9 "
                        "resume with it)")
    parser.add_argument("--cache", choices=("disk", "memory"), default=None,
                        help="sequential mode: where stage outputs are cached (default disk)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                        help="sequential: start stage k from the trained weights of stage k-1 (default); "
                        "--no-warm-start: every stage from its own initialisation")
    parser.add_argument("--stage-devices", nargs="+", default=None, metavar="DEVICE",
                        help="greedy mode: place stage k on DEVICE[k %% n], round robin (GLEAM), e.g. cuda:0 cuda:1")
    parser.add_argument("--block-size", type=voxel_shape, default=None, metavar="Z,Y,X",
                        help="run the regulariser CNNs block by block, blocks of Z,Y,X voxels, under gradient "
                        "checkpointing: memory of one block, same results (any mode; e.g. 32,64,64)")
    parser.add_argument("--patch-size", type=voxel_shape, default=None, metavar="Z,Y,X",
                        help="sequential mode: train each stage on random patches of Z,Y,X voxels (exact loss on "
                        "each patch; no projection per step) instead of whole images")
    parser.add_argument("--patches-per-sample", type=bounded_int(1, 100000), default=None, metavar="N",
                        help="with --patch-size: patches per sample and step (default 8)")
    parser.add_argument("--preload", choices=PRELOAD_CHOICES, default="none",
                        help="read every sample once and hold it in RAM ('cpu') or on --device ('device'; e.g. a "
                        "GPU's memory) instead of reading it from disk at each use (default none); refused before "
                        "loading if the samples do not fit")


def check_train_options(args: argparse.Namespace) -> None:
    """Refuse flags that do not apply to ``--mode`` (each message names the flag)."""
    mode = args.mode
    if args.stage_devices and mode != "greedy":
        raise InputError(f"--stage-devices places the stages of --mode greedy; --mode is {mode}")
    if args.cache is not None and mode != "sequential":
        raise InputError(f"--cache applies to --mode sequential (where stage outputs are cached); --mode is {mode}")
    if args.warm_start is not None and mode != "sequential":
        flag = "--warm-start" if args.warm_start else "--no-warm-start"
        raise InputError(f"{flag} applies to --mode sequential (stage k starts from stage k-1); --mode is {mode}")
    if args.all_stages_loss and mode not in ("end_to_end", "checkpointed"):
        raise InputError(f"--all-stages-loss applies to --mode end_to_end or checkpointed; --mode is {mode} "
                         f"(each stage is trained on its own target there already)")
    if args.patch_size is not None and mode != "sequential":
        raise InputError(f"--patch-size trains stages on patches in --mode sequential (one stage alone on a fixed "
                         f"input); --mode is {mode}")
    if args.patches_per_sample is not None and args.patch_size is None:
        raise InputError("--patches-per-sample applies with --patch-size Z,Y,X (patch training)")
    if args.target_stride != 1 and args.targets != "osem":
        raise InputError(f"--target-stride picks OSEM sub-iterates as targets; --targets is {args.targets}")
    if args.shared and mode == "sequential":
        raise InputError("--shared (one regulariser for all stages) cannot be trained stage by stage: use it with "
                         "--mode end_to_end, checkpointed or greedy")


def run_train(args: argparse.Namespace) -> int:
    """Train from parsed flags; returns 0 when the run completed, 1 when it was stopped early.

    Joins the torchrun job when there is one (:func:`~sirf_fbsem.distributed.init_distributed`)."""
    ctx = init_distributed(args.device)
    try:
        return _run_train(args, ctx, resume=args.resume or elastic_restart_count() > 0,
                          device=local_device(args.device, ctx.local_rank) if ctx.is_distributed else args.device)
    finally:
        shutdown(ctx)


def _run_train(args: argparse.Namespace, ctx: DistContext, resume: bool, device: str) -> int:
    check_backend(args.backend)
    check_train_options(args)
    out = Path(args.out)
    has_run = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("*.pt"))
    check_run_directory(out, "--out", has_run, "training run (checkpoints/)")
    if has_run and not resume:
        raise InputError(f"--out {str(out)!r} holds the checkpoints of an earlier run; pass --resume to continue "
                         f"it (with the same settings), or choose a new or empty --out")
    if args.backend == "sirf" and args.batch_size != 1:
        raise ValueError(f"--backend sirf trains one sample at a time (one SIRF model holds one set of factors); "
                         f"use --batch-size 1, not {args.batch_size}")
    datasets = open_datasets(args.data, same=(*SHARED_SETTINGS, "num_stages", "initial_image"))
    manifest = datasets[0].manifest
    for d, ds in zip(args.data, datasets):
        if ds.manifest.get("projection_units") != PROJECTION_UNITS:
            raise ValueError(f"--data {d}: simulated with the embedded projector's former units (line "
                             f"integrals in mm); this sirf_fbsem trains in SIRF's units ({PROJECTION_UNITS}): "
                             f"simulate the data again with this version")
    dataset = datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)
    sino = sinogram_geometry_from_dict(manifest["sinogram_geometry"])
    image = image_geometry_from_dict(manifest["image_geometry"])
    num_subsets = int(manifest["num_subsets"])
    rule = TargetRule(args.targets, args.target_stride, args.image_units)
    simulated = int(manifest["num_stages"])
    num_stages = (simulated // args.target_stride if args.targets == "osem" else simulated) \
        if args.stages is None else args.stages
    if num_stages < 1 or rule.targets_needed(num_stages) > simulated:
        raise InputError(
            f"--data {args.data[0]}: {simulated} noise-free OSEM sub-iterates were simulated (manifest num_stages); "
            f"{num_stages} stages with --target-stride {args.target_stride} need {rule.targets_needed(num_stages)}"
        )
    config = TrainConfig(
        epochs=args.epochs, lr=args.lr, beta_lr=args.beta_lr, batch_size=args.batch_size,
        validation_fraction=args.validation_fraction,
        seed=args.seed, patience=args.patience, device=device, all_stages_loss=args.all_stages_loss, loss=args.loss,
        cache=args.cache or "disk", progress=not args.no_progress and ctx.is_main,
        stage_devices=tuple(args.stage_devices) if args.stage_devices else None,
        warm_start=True if args.warm_start is None else args.warm_start,
        block_shape=args.block_size, patch_shape=args.patch_size,
        **({} if args.patches_per_sample is None else {"patches_per_sample": args.patches_per_sample}),
    )
    reg = RegulariserConfig(dims=args.dims, in_channels=2 if args.anatomical else 1, channels=args.channels,
                            layers=args.layers)
    torch.manual_seed(args.seed)
    net = FBSEMNet(num_stages, num_subsets, reg, shared_regulariser=args.shared, beta_init=args.beta_init,
                   start_rule=datasets[0].start_rule, beta_counts=args.beta_counts)
    base = make_acquisition_model(
        args.backend, sino, image, num_subsets=num_subsets, psf_fwhm_mm=manifest.get("psf_fwhm_mm"), device=device
    )
    if args.preload != "none":
        dataset = ResidentDataset(dataset, "cpu" if args.preload == "cpu" else device, progress=config.progress)
    data = dataset if rule.is_default else StageTargets(dataset, rule, num_stages)
    result = train(
        net, data, args.mode, config, with_terms_factory(base), args.out, resume=resume, distributed=ctx,
        data_signature=None if rule.is_default else rule.as_dict(num_stages),
        metadata=model_metadata([ds.manifest for ds in datasets], args.data, rule, num_stages, args.backend),
    )
    last = next((r for r in reversed(result.history) if r["val_loss"] is not None), None)
    status = "completed" if result.completed else "stopped"
    if not ctx.is_main:
        return 0 if result.completed else 1
    print(f"training {status} ({args.mode}, {num_stages} stages"
          + (f", {ctx.world_size} ranks" if ctx.is_distributed else "") + f"); logs in {result.out_dir}"
          + (f"; last validation MSE {last['val_loss']:.4g}" if last else "")
          + (f"; model {result.model_path}" if result.model_path else ""))
    return 0 if result.completed else 1


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export-model`` flags to ``parser`` (:func:`~sirf_fbsem.training.export.export_model`)."""
    parser.add_argument("--run", type=Path, required=True, metavar="DIR",
                        help="the training run's directory (train --out), holding checkpoints/")
    parser.add_argument("--data", type=Path, nargs="+", required=True, metavar="DIR",
                        help="the run's training data directories (train --data, in order); only their "
                        "manifest.json is read: the samples need not be there")
    parser.add_argument("--output", type=Path, required=True, metavar="FILE.pt",
                        help="the model file to write (its metadata beside it as FILE.json)")
    parser.add_argument("--stages", type=bounded_int(1), default=None,
                        help="sequential runs: export the first N stages (each finished), e.g. while the run "
                        "trains the later ones (default: every stage; the run must have completed)")
    parser.add_argument("--backend", choices=["embedded", "sirf"], default="embedded",
                        help="the projector the run trained with (train --backend), recorded in the metadata")
    parser.add_argument("--overwrite", action="store_true", help="replace a model file sirf_fbsem wrote at --output")


def run_export(args: argparse.Namespace) -> int:
    """Write the model of a training run from its checkpoints (``sirf-fbsem export-model``); returns 0."""
    path = export_model(args.run, args.data, args.output, stages=args.stages, backend=args.backend,
                        overwrite=args.overwrite)
    print(f"model written: {path} (and {path.with_suffix('.json').name})")
    return 0
