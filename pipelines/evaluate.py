"""The evaluation study: simulate, train FBSEM (sequential and end-to-end), compare with OSEM and MAP-EM.

    python pipelines/evaluate.py                  # the reported setting (~20-40 min on 2 CPU cores)
    python pipelines/evaluate.py --quick          # a 2-minute smoke run of the same steps

1. Simulates (``simulation.simulate_dataset``, seeded, resumable) on a 2D setting (one ring of
   the scanner, one direct sinogram, a single-slice image): training phantoms (half at each
   count level), and per count level separate *tuning* phantoms (to choose the baselines'
   hyperparameters) and held-out *test* phantoms.
2. Trains FBSEM-Net sequentially and end-to-end (``training.train``) on the same data, the
   same network, the same epochs (per stage in sequential mode) and the same targets.
3. Evaluates (``sirf_fbsem.evaluation``) OSEM, OSEM + Gaussian post-filter, MAP-EM with a
   quadratic prior and both networks on the test phantoms, and writes
   ``pipelines/results/evaluate_<setting>.json`` and ``.png``.

Targets (``--targets``): ``truth`` (default) trains every stage's output against the ground-truth
phantom (as the FBSEM-Net paper, Mehranian & Reader 2020, trained against the reference image);
``osem`` uses the simulated targets, the noise-free OSEM sub-iterates (the package's sequential
design): a network matching them can be no better than noise-free OSEM after K sub-iterations.
``--target-stride S`` (with ``osem``) simulates K*S noise-free OSEM sub-iterates (same subsets,
order and start image as the network) and gives stage k (0-based) sub-iterate (k+1)*S: still
iterates of one noise-free OSEM run, but the last stage's target is sub-iterate K*S, a far better
converged image (S = 8, K = 12, 6 subsets: 96 sub-iterations = 16 full iterations).

``--anatomical`` is FBSEM's PET+MR variant (FBSEM-pm of Mehranian & Reader 2020): the networks
take the simulated T1-like MR image (lesions absent from it) as a second channel, and the
baselines include MR-guided MAP-EM with the Bowsher prior (B over ``BOWSHER_NEIGHBOURS``), the
MAP-EM of that paper; the goals then compare with the better of the two MAP-EMs.

``--phantom mni152`` uses the MNI152 phantoms (nilearn) for every part instead of the procedural
ones; ``--beta-init`` / ``--beta-lr`` set the stages' initial beta and its Adam learning rate
(``TrainConfig.beta_lr``); ``--modes`` trains only the given modes (the evaluation then scores the
models present in the work directory).

Everything is reused when present (datasets, trained models, checkpoints of an interrupted
training); the evaluation is redone only with ``--force`` or when its JSON is missing.
Intermediate data go to ``--work`` (default ``out/evaluate_<setting>``); the default setting
name encodes the targets (``mmr2d``, ``mmr2d_osem``, ``mmr2d_osem_s<S>``). The training data
directories are keyed by the number of simulated sub-iterates when it is not K
(``train_<counts>_n<K*S>``), and ``<work>/study.json`` records the settings that the trained
models depend on: a work directory of other settings (targets, stride, stages, ...) is refused
instead of reused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sirf_fbsem.evaluation import EvaluationConfig, evaluate_methods, load_samples, save_evaluation_montage, write_json
from sirf_fbsem.geometry import ImageGeometry, scanner_preset
from sirf_fbsem.model.fbsem import FBSEMNet
from sirf_fbsem.model.io import load_model
from sirf_fbsem.model.regularisers import RegulariserConfig
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
from sirf_fbsem.simulation import AcquisitionParameters, FBSEMSampleDataset, SimulationConfig, simulate_dataset
from sirf_fbsem.simulation.acquisition import single_slice_geometry
from sirf_fbsem.training import TrainConfig, train, with_terms_factory
from sirf_fbsem.training.stage_targets import StageTargets, TargetRule
from sirf_fbsem.training.trainers import LOSSES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "pipelines" / "results"
SEEDS = {"train": 1000, "tune": 2000, "test": 3000}
# Bowsher MAP-EM (--anatomical): neighbours kept per voxel, of the 8 of a 2D image
BOWSHER_NEIGHBOURS = (2, 3, 4, 5)
# options added after the first studies: in the work-directory key and the setting name only when
# not at these defaults, so older work directories keep their key
LATER_DEFAULTS: dict[str, Any] = {"phantom": "procedural", "beta_init": 0.1, "beta_lr": None, "anatomical": False,
                                  "loss": "mse"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default=None, help="name of the outputs (default mmr2d, or quick with --quick)")
    p.add_argument("--work", type=Path, default=None, help="work directory (default out/evaluate_<setting>)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and PNG go (default pipelines/results)")
    p.add_argument("--scanner", default="Siemens_mMR", help="scanner preset; one ring of it is used (2D)")
    p.add_argument("--image-size", type=int, default=128, help="in-plane image size n (n x n, default voxels)")
    p.add_argument("--counts", type=float, nargs="+", default=[2e5, 1e6], help="count levels (prompts per slice)")
    p.add_argument("--phantom", choices=("procedural", "mni152"), default=LATER_DEFAULTS["phantom"],
                   help="phantoms of every part (mni152: nilearn's MNI152 grey/white-matter maps, deformed)")
    p.add_argument("--train-samples", type=int, default=40, help="training phantoms in all (split over count levels)")
    p.add_argument("--tune-samples", type=int, default=4, help="tuning phantoms per count level")
    p.add_argument("--test-samples", type=int, default=8, help="test phantoms per count level")
    p.add_argument("--subsets", type=int, default=6, help="subsets of every method")
    p.add_argument("--stages", type=int, default=12, help="FBSEM stages K")
    p.add_argument("--epochs", type=int, default=12, help="epochs (per stage in sequential mode)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--beta-init", type=float, default=LATER_DEFAULTS["beta_init"], help="initial beta of every stage (normalised units)")
    p.add_argument("--beta-lr", type=float, default=LATER_DEFAULTS["beta_lr"], help="Adam learning rate of the betas (default --lr)")
    p.add_argument("--loss", choices=LOSSES, default=LATER_DEFAULTS["loss"],
                   help="training loss (default mse, the reported studies' loss; samples in phantom-mean units)")
    p.add_argument("--anatomical", action="store_true", default=LATER_DEFAULTS["anatomical"],
                   help="PET+MR variant (the paper's FBSEM-pm): the networks take the T1-like MR image as a second "
                   "channel, and the baselines include MR-guided MAP-EM (Bowsher prior)")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--targets", choices=("truth", "osem"), default="truth")
    p.add_argument("--target-stride", type=int, default=1,
                   help="with --targets osem: simulate K*S noise-free OSEM sub-iterates and train stage k "
                   "against sub-iterate (k+1)*S (default 1: the k-th)")
    p.add_argument("--warm-start", action="store_true",
                   help="sequential: start stage k from the trained stage k-1 (TrainConfig.warm_start; the "
                   "package's default, off here unless given so that the settings without it reproduce)")
    p.add_argument("--osem-iterations", type=int, default=10)
    p.add_argument("--map-iterations", type=int, default=20)
    p.add_argument("--modes", nargs="+", choices=("sequential", "end_to_end"), default=["sequential", "end_to_end"],
                   help="train only these; models already trained in the work directory are evaluated too "
                   "(to add a mode later, run again with it and --force)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (small_test scanner, few samples, 1 epoch)")
    p.add_argument("--force", action="store_true", help="redo the evaluation even when its JSON exists")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.target_stride < 1:
        p.error("--target-stride must be >= 1")
    if args.target_stride > 1 and args.targets != "osem":
        p.error("--target-stride applies to --targets osem only")
    if args.quick:
        args.scanner, args.image_size = "small_test", 47
        args.train_samples, args.tune_samples, args.test_samples = 4, 1, 2
        args.subsets, args.stages, args.epochs, args.channels, args.layers = 4, 4, 1, 8, 3
        args.osem_iterations, args.map_iterations = 4, 4
    if args.setting is None:
        args.setting = "quick" if args.quick else "mmr2d"
        later = _later_options(args)
        if "phantom" in later:
            args.setting += "_" + args.phantom
        if args.targets == "osem":
            args.setting += "_osem" + (f"_s{args.target_stride}" if args.target_stride > 1 else "")
        if args.warm_start:
            args.setting += "_warm"
        if "anatomical" in later:
            args.setting += "_pm"
        if "beta_init" in later or "beta_lr" in later:
            args.setting += f"_b{args.beta_init:g}" + (f"_blr{args.beta_lr:g}" if "beta_lr" in later else "")
    args.work = args.work or ROOT / "out" / f"evaluate_{args.setting}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    progress = not args.no_progress
    sino, image = single_slice_geometry(scanner_preset(args.scanner))
    image = ImageGeometry((1, args.image_size, args.image_size), image.voxel_size_mm)
    timings: dict[str, float] = {}

    per_level = max(1, args.train_samples // len(args.counts))
    _check_work_dir(args, per_level)

    # ---- 1. data
    t0 = time.perf_counter()
    # noise-free OSEM sub-iterates simulated per training sample (the targets of tune/test are never read)
    sim_stages = {"train": args.stages * args.target_stride, "tune": args.stages, "test": args.stages}
    dirs: dict[str, list[Path]] = {"train": [], "tune": [], "test": []}
    for li, counts in enumerate(args.counts):
        for part, n in (("train", per_level), ("tune", args.tune_samples), ("test", args.test_samples)):
            cfg = SimulationConfig(num_subsets=args.subsets, num_stages=sim_stages[part], phantom=args.phantom,
                                   acquisition=AcquisitionParameters(counts=counts))
            suffix = "" if sim_stages[part] == args.stages else f"_n{sim_stages[part]}"
            d = args.work / f"{part}_{counts:.3g}{suffix}"
            # resumes only a directory of the same settings (num_stages included), else DatasetError
            simulate_dataset(d, n, sino, image, cfg, seed=SEEDS[part] + li, resume=True, progress=progress)
            dirs[part].append(d)
    timings["simulate_s"] = time.perf_counter() - t0

    # ---- 2. training (same network, data, targets, epochs)
    datasets = [FBSEMSampleDataset(d) for d in dirs["train"]]
    data: torch.utils.data.Dataset = torch.utils.data.ConcatDataset(datasets)
    rule = TargetRule(args.targets, args.target_stride, units="phantom_mean")  # parse(): stride 1 with truth
    data = StageTargets(data, rule, args.stages)
    base = EmbeddedAcquisitionModel(sino, image, num_subsets=args.subsets)
    reg = RegulariserConfig(dims=2, in_channels=2 if args.anatomical else 1, channels=args.channels,
                            layers=args.layers)
    models: dict[str, Path] = {}
    train_info: dict[str, Any] = {}
    skipped: list[str] = []
    for mode, name in (("sequential", "fbsem_sequential"), ("end_to_end", "fbsem_end_to_end")):
        run_dir = args.work / f"train_{mode}"
        model_path = run_dir / "model.pt"
        t0 = time.perf_counter()
        if mode not in args.modes and not model_path.exists():
            skipped.append(mode)
            continue
        if model_path.exists():
            _check_model(model_path, args)
        else:
            torch.manual_seed(0)
            net = FBSEMNet(args.stages, args.subsets, reg, beta_init=args.beta_init)
            config = TrainConfig(epochs=args.epochs, lr=args.lr, beta_lr=args.beta_lr, batch_size=1, loss=args.loss,
                                 validation_fraction=0.1, seed=0,
                                 progress=progress, warm_start=args.warm_start and mode == "sequential")
            resume = (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").glob("*.pt"))
            result = train(net, data, mode, config, with_terms_factory(base), run_dir, resume=resume,
                           metadata={"sinogram_geometry": sino, "image_geometry": image, **rule.as_dict(args.stages),
                                     "data": [str(d) for d in dirs["train"]]})
            if not result.completed or result.model_path is None:
                print(f"{mode} training did not complete", file=sys.stderr)
                return 1
            timings[f"train_{mode}_s"] = time.perf_counter() - t0
        log = run_dir / "losses.json"
        history = json.loads(log.read_text())["history"] if log.exists() else []
        last_val = [r["val_loss"] for r in history if r.get("val_loss") is not None]
        train_info[name] = {"model": str(model_path), "final_validation_mse": last_val[-1] if last_val else None,
                            "training_elapsed_s": history[-1].get("elapsed_s") if history else None}
        models[name] = model_path
    if skipped:
        print(f"{skipped} not trained (--modes) and not in {args.work}: evaluated without them")

    # ---- 3. evaluation
    json_path = args.results / f"evaluate_{args.setting}.json"
    png_path = args.results / f"evaluate_{args.setting}.png"
    if json_path.exists() and not args.force:
        print(f"{json_path} exists (use --force to redo the evaluation)")
        _print_table(json.loads(json_path.read_text()))
        return 0
    t0 = time.perf_counter()
    test, _ = load_samples(dirs["test"])
    tune, _ = load_samples(dirs["tune"])
    nets = {name: load_model(p, expected_sinogram_geometry=sino, expected_image_geometry=image)[0]
            for name, p in models.items()}
    config = EvaluationConfig(osem_iterations=args.osem_iterations, map_iterations=args.map_iterations,
                              bowsher_neighbours=BOWSHER_NEIGHBOURS if args.anatomical else ())
    result, images = evaluate_methods(test, nets, base, config, tuning_samples=tune, progress=progress)
    timings["evaluate_s"] = time.perf_counter() - t0
    timings["total_s_this_run"] = time.perf_counter() - t_start
    result["setting"] = {
        "name": args.setting,
        "scanner": f"{args.scanner}, one ring (2D): {sino.describe()}",
        "image": image.describe(),
        "image_shape": list(image.shape),
        "voxel_size_mm": list(image.voxel_size_mm),
        "counts": list(args.counts),
        "randoms_fraction": AcquisitionParameters().randoms_fraction,
        "scatter_fraction": AcquisitionParameters().scatter_fraction,
        "phantom": {"procedural": "procedural brain", "mni152": "MNI152 grey/white-matter maps (nilearn), "
                    "randomly deformed"}[args.phantom] + " (sirf_fbsem.simulation.phantoms)",
        "num_training_phantoms": per_level * len(args.counts),
        "validation_fraction": 0.1,
        "num_tuning_phantoms_per_level": args.tune_samples,
        "num_test_phantoms_per_level": args.test_samples,
        "subsets": args.subsets,
        "stages": args.stages,
        "epochs": args.epochs,
        "epochs_note": "sequential: epochs per stage; end_to_end: epochs over the whole network",
        "lr": args.lr,
        "beta_init": args.beta_init,
        "beta_lr": args.beta_lr if args.beta_lr is not None else args.lr,
        "regulariser": {"dims": reg.dims, "in_channels": reg.in_channels, "channels": reg.channels,
                        "layers": reg.layers},
        "anatomical": ("PET+MR: the networks take the T1-like MR image (lesions absent) as a second channel; "
                       "baselines include Bowsher MAP-EM" if args.anatomical else "PET only"),
        "targets": args.targets,
        "warm_start": args.warm_start,
        "target_stride": args.target_stride if args.targets == "osem" else None,
        "targets_note": (
            "ground-truth phantom at every stage" if args.targets == "truth" else
            f"stage k (0-based) vs noise-free OSEM sub-iterate (k+1)*{args.target_stride} of "
            f"{args.stages * args.target_stride} (same subsets, order and start image as the network; "
            f"last stage: {args.stages * args.target_stride / args.subsets:g} full iterations)"
        ),
        "training_units": "each training sample rescaled to phantom mean 1 over its support (prompts unchanged)",
        "seeds": SEEDS,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    result["training"] = train_info
    result["timings"] = timings
    result["goals"] = _goals(result)
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(json_path, result)
    title = f"{args.setting}: {image.describe()}, FBSEM {args.stages} stages, targets {args.targets}"
    if args.targets == "osem" and args.target_stride > 1:
        title += f" (stride {args.target_stride})"
    save_evaluation_montage(png_path, images, result, title=title)
    _print_table(result)
    print(f"wrote {json_path} and {png_path} ({time.perf_counter() - t_start:.0f} s)")
    return 0


def _study_key(args: argparse.Namespace, per_level: int) -> dict[str, Any]:
    """The settings the data and trained models of a work directory depend on."""
    return {
        "scanner": args.scanner, "image_size": args.image_size, "counts": [float(c) for c in args.counts],
        "train_per_level": per_level, "tune_samples": args.tune_samples, "test_samples": args.test_samples,
        "subsets": args.subsets, "stages": args.stages, "epochs": args.epochs, "lr": args.lr,
        "channels": args.channels, "layers": args.layers, "targets": args.targets,
        "target_stride": args.target_stride, "warm_start": args.warm_start,
        **_later_options(args),
    }


def _later_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :data:`LATER_DEFAULTS` that are not at their default."""
    return {k: getattr(args, k) for k, v in LATER_DEFAULTS.items() if getattr(args, k) != v}


def _check_work_dir(args: argparse.Namespace, per_level: int) -> None:
    """Refuse to reuse a work directory made with other settings; record them in ``study.json``.

    A work directory of an older driver has no ``study.json``; then the trained models' metadata
    (targets, stride; :func:`_check_model`) are the check, and the file is written now.
    """
    key = _study_key(args, per_level)
    path = args.work / "study.json"
    if path.exists():
        old = json.loads(path.read_text())
        # both ways: options at their default are left out of the key (older work directories match)
        diff = {k: (old.get(k), key.get(k)) for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)}
        if diff:
            raise SystemExit(f"{path} was made with other settings (work dir vs now): {diff}; "
                             "use another --setting or --work")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(key, indent=1) + "\n")


def _check_model(model_path: Path, args: argparse.Namespace) -> None:
    """Refuse a trained model of other targets, target stride or inputs (PET / PET+MR) than asked for."""
    net, meta = load_model(model_path)
    got = (meta.get("targets"), int(meta.get("target_stride", 1)), net.uses_anatomical)
    want = (args.targets, args.target_stride, bool(args.anatomical))
    if got != want:
        raise SystemExit(f"{model_path} was trained with (targets, stride, anatomical) {got}, not {want}; "
                         "use another --setting or --work")


def _goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's quality goals at the lowest count level; "map_em" is the best MAP-EM present
    (quadratic, or Bowsher when it scores lower)."""
    levels = result["count_levels"]
    low = min(levels, key=lambda k: float(k))
    nr = {m: v["mean"]["nrmse"] for m, v in levels[low]["methods"].items()}
    seq, e2e = nr.get("fbsem_sequential"), nr.get("fbsem_end_to_end")
    out: dict[str, Any] = {"count_level": low}
    best_map = min((m for m in ("map_em", "map_em_bowsher") if nr.get(m) is not None), key=lambda m: nr[m])
    out["best_map_em"] = best_map
    if seq is not None:
        out["sequential/map_em"] = seq / nr[best_map]
        out["sequential/map_em <= 0.80"] = bool(seq / nr[best_map] <= 0.80)
        if best_map != "map_em":
            out["sequential/map_em_quadratic"] = seq / nr["map_em"]
        out["sequential/osem_filtered"] = seq / nr["osem_filtered"]
        out["sequential/osem_filtered <= 0.70"] = bool(seq / nr["osem_filtered"] <= 0.70)
    if seq is not None and e2e is not None:
        out["sequential/end_to_end"] = seq / e2e
        out["sequential within 5% of end_to_end"] = bool(abs(seq / e2e - 1) <= 0.05)
    return out


def _print_table(result: dict[str, Any]) -> None:
    metrics = ("nrmse", "psnr", "ssim", "contrast_recovery", "background_noise")
    for key, lv in result["count_levels"].items():
        print(f"\n{key} counts ({lv['num_samples']} test phantoms)")
        print(f"{'method':<20}" + "".join(f"{m[:12]:>14}" for m in metrics))
        for name, entry in lv["methods"].items():
            vals = "".join(f"{entry['mean'][m]:>14.4f}" if entry["mean"][m] is not None else f"{'-':>14}"
                           for m in metrics)
            print(f"{name:<20}{vals}   {entry.get('hyperparameters', '')}")
    if "goals" in result:
        print("\ngoals:", json.dumps(result["goals"]))


if __name__ == "__main__":
    sys.exit(main())
