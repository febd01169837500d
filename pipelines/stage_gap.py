"""Where a trained FBSEM model loses to its targets: per stage, its output's error beside its target's.

Stage k of a model trained with iteration-dependent targets is fitted to the k-th noise-free OSEM
sub-iterate, so ``NRMSE(target_k, truth)`` is the floor under ``NRMSE(x_k, truth)`` (both inside
the head, as ``sirf-fbsem evaluate`` scores them). The ratio ``NRMSE(x_k) / NRMSE(target_k)``
by stage shows whether the model falls behind its targets from the first stage or more and more
as the stages go. Run it on tuning data only (the data must hold at least K targets).

    python pipelines/stage_gap.py --data WORK/tune --model test_data/fbsem_mmr_model.pt \\
        --out pipelines/results/stage_gap_mmr3d
    python pipelines/stage_gap.py --data WORK/tune --run WORK/run --out ...   # a sequential run in progress

With ``--run``, the model is the stages a sequential training run has finished so far (its
``checkpoints/stage_*.pt``, the network settings from their run signature): stage k of a
sequential run does not depend on the stages after it, so these are the first stages of the model
the run will write, and a long run can be checked on the tuning set before it ends.

Writes OUT.json (per sample and mean by stage: the output's and the target's NRMSE against the
truth, and the output's NRMSE against the target) and OUT.png.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from sirf_fbsem import metrics
from sirf_fbsem.evaluation import EvaluationConfig, evaluation_masks, network_stages
from sirf_fbsem.geometry import image_geometry_from_dict, sinogram_geometry_from_dict
from sirf_fbsem.model.fbsem import FBSEMNet, inverse_softplus
from sirf_fbsem.model.io import load_model, safe_torch_load
from sirf_fbsem.projectors.factory import make_acquisition_model
from sirf_fbsem.simulation.dataset import open_datasets
from targets_floor import finish_plot  # a sibling: pipelines/ is on sys.path when run as a script


@dataclass(frozen=True)
class SampleGap:
    """One sample: per stage k (entry k - 1), NRMSE inside the head."""

    index: int
    counts: float
    output_vs_truth: list[float]
    target_vs_truth: list[float]
    output_vs_target: list[float]


@torch.no_grad()
def sample_gap(net, base, sample, image, config: EvaluationConfig) -> SampleGap:
    """Run ``net`` stage by stage on ``sample`` (:func:`sirf_fbsem.evaluation.network_stages`: as
    ``evaluate`` runs it) and score every stage's output and target."""
    if len(sample.targets) < net.num_stages:
        raise ValueError(f"sample {sample.index} holds {len(sample.targets)} targets; the model has "
                         f"{net.num_stages} stages (simulate with --num-stages >= {net.num_stages})")
    masks = evaluation_masks(sample, image, config.mask_dilation_voxels, config.min_lesion_voxels)
    model = base.with_terms(sample.multiplicative, sample.additive)
    anatomical = None if sample.anatomical is None else torch.as_tensor(sample.anatomical)
    out, tgt, diff = [], [], []
    for k, x in enumerate(network_stages(net, model, sample.prompts, sample, anatomical)):
        out.append(metrics.nrmse(x, sample.phantom, masks.head))
        tgt.append(metrics.nrmse(sample.targets[k], sample.phantom, masks.head))
        diff.append(metrics.nrmse(x, sample.targets[k], masks.head))
    return SampleGap(-1 if sample.index is None else int(sample.index),
                     float("nan") if sample.counts is None else float(sample.counts), out, tgt, diff)


def finished_stages(run: Path) -> FBSEMNet:
    """The network of the stages a sequential training run in ``run`` has finished, in order from the
    first (``run/checkpoints/stage_000.pt`` on, up to the first missing or unfinished one), built from
    the network settings in their run signature.

    Raises:
        ValueError: no finished stage, a checkpoint of another run (its signature differs from the
            first's) or not a sequential run.
    """
    ckpts = Path(run) / "checkpoints"
    states, signature = [], None
    for k in itertools.count():
        path = ckpts / f"stage_{k:03d}.pt"
        if not path.is_file():
            break
        payload = safe_torch_load(path, "stage checkpoint")
        sig = json.loads(payload["run_signature"])  # the trainer stores it as JSON text
        if signature is None:
            signature = sig
            if sig.get("mode") != "sequential":
                raise ValueError(f"{path}: a {sig.get('mode')!r} run; --run takes a sequential run's checkpoints")
        elif sig != signature:
            raise ValueError(f"{path}: another run's checkpoint (its run signature differs from stage_000.pt's)")
        if not payload["train_state"]["complete"]:
            break
        states.append(payload["stage_state"])
    if not states:
        raise ValueError(f"--run {run}: no finished stage in {ckpts} (stage_000.pt missing or unfinished)")
    net = FBSEMNet.from_config({**signature["network"], "num_stages": len(states)})
    for stage, state in zip(net.stages, states):
        stage.load_state_dict(state)
    return net


def scale_betas(net: FBSEMNet, factor: float) -> None:
    """Multiply every stage's learned strength beta_k = softplus(rho_k) by ``factor`` > 0, in place: a
    diagnostic (is the model over- or under-regularised on some data?), not a trained model. Count-unaware
    strengths only: a count-aware one, softplus(rho_k - gamma_k l), is not scaled at every level by
    changing rho_k."""
    if not factor > 0:
        raise ValueError(f"--beta-scale must be > 0, got {factor!r}")
    if net.beta_counts != "none":
        raise ValueError(f"--beta-scale scales count-unaware strengths only; this network's depend on the count "
                         f"level (beta_counts {net.beta_counts!r})")
    with torch.no_grad():
        for stage in net.stages:
            stage.rho.fill_(inverse_softplus(float(stage.beta) * factor))


def save_plot(path: Path, gaps: Sequence[SampleGap], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.arange(1, len(gaps[0].output_vs_truth) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(gaps):
        ax.plot(ks, g.output_vs_truth, color=f"C{i}", label=f"sample {g.index} ({g.counts:.3g}): model")
        ax.plot(ks, g.target_vs_truth, color=f"C{i}", ls="--", label=f"sample {g.index}: its targets")
    finish_plot(fig, ax, path, title, "stage k", "NRMSE against the truth, inside the head")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a dataset written by 'sirf-fbsem simulate' (tuning set)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="a trained model file")
    which.add_argument("--run", type=Path, help="a sequential training run's directory (its finished stages)")
    p.add_argument("--out", type=Path, required=True, help="output stem: OUT.json and OUT.png")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--indices", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="only these samples of --data (comma-separated positions), e.g. one count level's")
    p.add_argument("--beta-scale", type=float, default=1.0,
                   help="diagnostic: every stage's beta times this factor (default 1: the model as trained)")
    args = p.parse_args(argv)
    ds = open_datasets([args.data])[0]
    sino = sinogram_geometry_from_dict(ds.manifest["sinogram_geometry"])
    image = image_geometry_from_dict(ds.manifest["image_geometry"])
    if args.model is not None:
        net, _ = load_model(args.model, expected_sinogram_geometry=sino, expected_image_geometry=image)
    else:
        net = finished_stages(args.run)
        if net.num_subsets != int(ds.manifest["num_subsets"]):
            raise ValueError(f"--run {args.run}: {net.num_subsets} subsets; --data {args.data} was simulated "
                             f"with {ds.manifest['num_subsets']}")
    net.eval()
    if args.beta_scale != 1.0:
        scale_betas(net, args.beta_scale)
    source = args.model if args.model is not None else args.run
    base = make_acquisition_model("embedded", sino, image, num_subsets=net.num_subsets,
                                  psf_fwhm_mm=ds.manifest.get("psf_fwhm_mm"))
    n = len(ds) if args.max_samples is None else min(len(ds), args.max_samples)
    indices = list(range(n)) if args.indices is None else args.indices
    if any(not 0 <= i < len(ds) for i in indices):
        raise ValueError(f"--indices {args.indices}: --data {args.data} holds samples 0 to {len(ds) - 1}")
    gaps = [sample_gap(net, base, ds[i], image, EvaluationConfig()) for i in tqdm(indices, desc="samples")]
    mean = {f: np.mean([getattr(g, f) for g in gaps], axis=0).tolist()
            for f in ("output_vs_truth", "target_vs_truth", "output_vs_target")}
    mean["ratio"] = (np.array(mean["output_vs_truth"]) / np.array(mean["target_vs_truth"])).tolist()
    payload = {"data": str(args.data), "model": str(args.model) if args.model else None,
               "run": str(args.run) if args.run else None, "num_stages": net.num_stages,
               "beta_scale": args.beta_scale,
               "definitions": __doc__.split("\n\n")[1], "mean_by_stage": mean, "samples": [asdict(g) for g in gaps]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(payload, indent=1) + "\n")
    save_plot(Path(f"{args.out}.png"), gaps, f"{source.name} on {args.data.name}: {image.describe()}")
    for k in sorted({1, 3, 7, 14, 21, net.num_stages}):
        if k <= net.num_stages:
            print(f"stage {k}: model {mean['output_vs_truth'][k - 1]:.4f}, target {mean['target_vs_truth'][k - 1]:.4f}"
                  f" (ratio {mean['ratio'][k - 1]:.3f}), model vs target {mean['output_vs_target'][k - 1]:.4f}")
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
