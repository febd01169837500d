"""One sequential-stage training epoch: whole volumes versus random patches (sirf_fbsem.training.patches).

    python pipelines/bench_patch_training.py                 # defaults below, about a minute on 2 CPU cores
    python pipelines/bench_patch_training.py --image 64 128 128 --patch 32 --patches 8 --channels 32

Problem (printed and written to the JSON): a made-up scanner of ``--rings`` rings (4 mm) and
128 detectors, span 1 with every ring difference (``rings^2`` sinograms, as a 3D scan without
axial compression), 64 views, 96 tangential bins of 3 mm, 4 subsets; an image of ``--image``
voxels (2 mm in z, 3 mm in y and x); ``--samples`` phantoms (a cylinder with random spheres),
Poisson prompts with a flat additive term, and the phantom as target (the values do not change
the time). One stage (stage 0), 3D
:class:`~sirf_fbsem.model.regularisers.ResidualCNN` with ``--channels`` channels and 5
convolutions, batch size 1, no validation samples, memory cache.

Measured with :func:`sirf_fbsem.training.train` callbacks, for each of ``whole`` and ``patches``:

* ``epoch_s``: wall time of the second epoch (steps, optimiser, checkpoint): the steady state.
  Whole volumes: every step runs the stage's OSEM sub-update (a forward and a back projection)
  and the CNN on the volume. Patches: no projection; the CNN on ``--patches`` patches of
  ``--patch``^3 voxels grown by the receptive-field radius (5), one at a time.
* ``setup_s``: time to the end of the first epoch less ``epoch_s``: the patch run's terms
  (one OSEM sub-update per sample and stage, no gradients) and the start-up.

Writes ``pipelines/results/bench_patch_training.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sirf_fbsem.geometry import ImageGeometry, Scanner, SinogramGeometry  # noqa: E402
from sirf_fbsem.model import FBSEMNet, RegulariserConfig  # noqa: E402
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel  # noqa: E402
from sirf_fbsem.samples import Sample  # noqa: E402
from sirf_fbsem.training import TrainConfig, train, with_terms_factory  # noqa: E402

RESULTS = ROOT / "pipelines" / "results"
NUM_SUBSETS = 4


def make_problem(rings: int, image_shape: tuple[int, int, int], num_samples: int, seed: int = 0):
    scanner = Scanner(name="bench patches", num_rings=rings, num_detectors_per_ring=128, inner_ring_radius_mm=170.0,
                      average_depth_of_interaction_mm=0.0, ring_spacing_mm=4.0, default_bin_size_mm=3.0,
                      max_num_non_arccorrected_bins=96, default_num_arccorrected_bins=96)
    sino = SinogramGeometry.from_span(scanner, span=1, max_ring_diff=rings - 1, view_mash_factor=1, arc_corrected=True)
    image = ImageGeometry(image_shape, (2.0, 3.0, 3.0))
    base = EmbeddedAcquisitionModel(sino, image, num_subsets=NUM_SUBSETS)
    z, y, x = (torch.as_tensor(c, dtype=torch.float32) for c in image.centred_coordinates_mm())
    Z, Y, X = torch.meshgrid(z, y, x, indexing="ij")
    gen = torch.Generator().manual_seed(seed)
    body = ((X**2 + Y**2) < (0.8 * image.fov_radius_mm()) ** 2).float()
    samples = []
    for _ in range(num_samples):
        phantom = body.clone()
        for _ in range(4):
            c = (torch.rand(3, generator=gen) - 0.5) * torch.tensor([0.6 * float(z.max()), 0.6 * float(y.max()),
                                                                   0.6 * float(x.max())])
            r = 6 + 14 * float(torch.rand((), generator=gen))
            phantom += body * 2 * float(torch.rand((), generator=gen)) * (
                ((Z - c[0]) ** 2 + (Y - c[1]) ** 2 + (X - c[2]) ** 2) < r**2).float()
        additive = torch.full(sino.shape, 0.2)
        model = base.with_terms(None, additive)
        with torch.no_grad():
            prompts = torch.poisson(model.forward(phantom.unsqueeze(0))[0], generator=gen)
            sens = torch.stack([model.sensitivity(s) for s in range(NUM_SUBSETS)])
        samples.append(Sample(prompts=prompts, additive=additive, sensitivity=sens, targets=phantom[None]))
    return sino, image, base, samples


def time_run(base, samples, channels: int, patch: int | None, patches: int) -> dict:
    torch.manual_seed(0)
    net = FBSEMNet(1, NUM_SUBSETS, RegulariserConfig(dims=3, channels=channels, layers=5))
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=1, validation_fraction=0.0, progress=False, cache="memory",
                      patch_shape=None if patch is None else (patch, patch, patch), patches_per_sample=patches)
    ends: list[float] = []

    def on_epoch(event) -> None:
        if event.kind == "epoch":
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = train(net, samples, "sequential", cfg, with_terms_factory(base), out, callbacks=[on_epoch])
    epoch = ends[1] - ends[0]
    return {"mode": "whole" if patch is None else "patches", "patch": patch, "patches_per_sample": patches,
            "epoch_s": round(epoch, 3), "setup_s": round(ends[0] - t0 - epoch, 3),
            "train_loss": [r["train_loss"] for r in result.history if r["train_loss"] is not None]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", type=int, nargs=3, default=[32, 80, 80], metavar=("Z", "Y", "X"))
    p.add_argument("--rings", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--patch", type=int, default=24, help="patch edge (voxels)")
    p.add_argument("--patches", type=int, default=4, help="patches per sample and step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_patch_training.json")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    sino, image, base, samples = make_problem(args.rings, tuple(args.image), args.samples)
    print(f"problem: sinogram {tuple(sino.shape)}, image {tuple(image.shape)}, {args.samples} samples "
          f"({time.perf_counter() - t:.1f} s to simulate)", flush=True)
    runs = []
    for patch in (None, args.patch):
        runs.append(time_run(base, samples, args.channels, patch, args.patches))
        r = runs[-1]
        print(f"{r['mode']:8s}: epoch {r['epoch_s']:7.2f} s, setup {r['setup_s']:6.2f} s", flush=True)
    ratio = runs[0]["epoch_s"] / runs[1]["epoch_s"]
    grown = min(args.patch + 10, min(args.image)) ** 3
    voxels = args.image[0] * args.image[1] * args.image[2]
    print(f"one epoch: whole volumes / patches = {ratio:.1f} (CNN voxels per sample and step: {voxels} whole, "
          f"<= {args.patches} x {grown} = {args.patches * grown} patches)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "description": __doc__.split("\n")[0],
        "problem": {"sinogram_shape": list(sino.shape), "image_shape": list(image.shape),
                    "voxel_size_mm": list(image.voxel_size_mm), "num_subsets": NUM_SUBSETS,
                    "samples": args.samples, "channels": args.channels, "layers": 5},
        "runs": runs, "epoch_ratio_whole_over_patches": round(ratio, 2),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
