"""Regenerate test_data/: the bundled scan and the bundled FBSEM model.

    python pipelines/make_test_data.py [--train-samples 32] [--epochs 6] [--out test_data]

1. Simulates one brain phantom on the small 8-ring test scanner (span 3, 37 sinograms x
   48 views x 48 bins, default image 15 x 47 x 47) with attenuation, normalisation,
   randoms + scatter and Poisson noise, and writes it as Interfile:
   ``phantom_scan.hs`` (prompts), ``phantom_mult.hs`` (normalisation x attenuation
   factors), ``phantom_additive.hs`` (randoms + scatter) and ``phantom_truth.hv``
   (the phantom, same units as the reconstruction).
2. Simulates a training set on the same scanner (other seeds) and trains FBSEM-Net
   sequentially on it, writing ``fbsem_model.pt`` (+ ``fbsem_model.json``).

Everything is seeded: rerunning gives the same scan; the model is the same on the same
torch build and CPU.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from sirf_fbsem.cli import main as cli
from sirf_fbsem.geometry import image_geometry_from_dict, sinogram_geometry_from_dict
from sirf_fbsem.io.interfile import write_image, write_projdata
from sirf_fbsem.simulation.dataset import load_manifest

COMMON = ["--scanner", "small_test", "--span", "3", "--num-subsets", "4", "--num-stages", "8",
          "--counts", "3e5", "--no-progress"]


def write_scan(sample_dir: Path, out: Path) -> None:
    manifest = load_manifest(sample_dir)
    sino = sinogram_geometry_from_dict(manifest["sinogram_geometry"])
    image = image_geometry_from_dict(manifest["image_geometry"])
    sample = torch.load(sample_dir / manifest["files"][0], weights_only=True)
    write_projdata(out / "phantom_scan.hs", sino, sample["prompts"].numpy())
    write_projdata(out / "phantom_mult.hs", sino, sample["multiplicative"].numpy())
    write_projdata(out / "phantom_additive.hs", sino, sample["additive"].numpy())
    write_image(out / "phantom_truth.hv", image, sample["phantom"].numpy())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "test_data")
    p.add_argument("--train-samples", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--work", type=Path, default=None, help="keep intermediate data here (default: a temp dir)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="sirf_fbsem_testdata_"))
    try:
        cli(["simulate", "--out", str(work / "scan"), "--num-samples", "1", "--seed", "20261121", *COMMON])
        write_scan(work / "scan", args.out)
        cli(["simulate", "--out", str(work / "train"), "--num-samples", str(args.train_samples), "--seed", "7",
             *COMMON])
        cli(["train", "--data", str(work / "train"), "--out", str(work / "run"), "--mode", "sequential",
             "--epochs", str(args.epochs), "--channels", "16", "--no-progress",
             "--no-warm-start"])  # as the bundled model was trained (before warm start became the default)
        for suffix in (".pt", ".json"):
            src = work / "run" / f"model{suffix}"
            if src.exists():
                shutil.copyfile(src, args.out / f"fbsem_model{suffix}")
        print(f"wrote {sorted(p.name for p in args.out.iterdir())} into {args.out}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
