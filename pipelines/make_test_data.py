"""Regenerate test_data/: the bundled scans and the bundled FBSEM model.

    python pipelines/make_test_data.py [--train-samples 32] [--epochs 6] [--out test_data]
    python pipelines/make_test_data.py --skip-small   # the mMR listmode scan only (about 2 min, 5 GB)

1. Simulates one brain phantom on the small 8-ring test scanner (span 3, 37 sinograms x
   48 views x 48 bins, default image 15 x 47 x 47) with attenuation, normalisation,
   randoms + scatter and Poisson noise, and writes it as Interfile:
   ``phantom_scan.hs`` (prompts), ``phantom_mult.hs`` (normalisation x attenuation
   factors), ``phantom_additive.hs`` (randoms + scatter) and ``phantom_truth.hv``
   (the phantom, same units as the reconstruction).
2. Simulates a training set on the same scanner (other seeds) and trains FBSEM-Net
   sequentially on it, writing ``fbsem_model.pt`` (+ ``fbsem_model.json``).
   (``--skip-small`` leaves 1 and 2 out.)
3. ``--mmr`` (default; ``--no-mmr`` to leave it out): a Siemens mMR 3D brain scan as the scanner
   delivers it (:func:`sirf_fbsem.simulation.mmr_listmode.simulate_mmr_listmode`): an MNI152
   brain phantom, span 11, 1e6 expected prompts (20 % randoms, 15 % scatter) plus the delayeds
   in 10 s, written as PETLINK 32-bit listmode ``mmr_brain.l`` + ``mmr_brain.l.hdr``, its ECAT8
   normalisation ``mmr_brain_norm.n`` + ``.n.hdr``, mu-map ``mmr_brain_mu_map.hv`` (1/cm), truth
   ``mmr_brain_truth.hv`` (reconstruction units) and ``mmr_brain.json`` (settings and counts).
   A 3D mMR FBSEM model, once trained, goes beside them as ``fbsem_mmr_model.pt``, where
   ``pipelines/demo.sh`` picks it up.

Everything is seeded: rerunning gives the same scans; the model is the same on the same
torch build and CPU.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from sirf_fbsem.cli import main as cli
from sirf_fbsem.geometry import image_geometry_from_dict, sinogram_geometry_from_dict
from sirf_fbsem.io.interfile import write_image, write_projdata
from sirf_fbsem.simulation.dataset import load_manifest, load_sample
from sirf_fbsem.simulation.mmr_listmode import MMRListmodeParameters, simulate_mmr_listmode

COMMON = ["--scanner", "small_test", "--span", "3", "--num-subsets", "4", "--num-stages", "8",
          "--counts", "3e5", "--no-progress"]
#: seed of the bundled mMR listmode scan
MMR_SEED = 20261203


def write_scan(sample_dir: Path, out: Path) -> None:
    manifest = load_manifest(sample_dir)
    sino = sinogram_geometry_from_dict(manifest["sinogram_geometry"])
    image = image_geometry_from_dict(manifest["image_geometry"])
    sample = load_sample(sample_dir / manifest["files"][0], manifest)
    write_projdata(out / "phantom_scan.hs", sino, sample.prompts.numpy())
    write_projdata(out / "phantom_mult.hs", sino, sample.multiplicative.numpy())
    write_projdata(out / "phantom_additive.hs", sino, sample.additive.numpy())
    write_image(out / "phantom_truth.hv", image, sample.phantom.numpy())


def write_mmr_scan(out: Path) -> None:
    """The mMR listmode scan (step 3 of the module docstring), replacing an earlier one."""
    scan = simulate_mmr_listmode(out, MMRListmodeParameters(), seed=MMR_SEED, overwrite=True)
    print(f"mMR listmode scan: {scan.prompts:,} prompts + {scan.delayeds:,} delayeds in {scan.listmode_header.name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "test_data")
    p.add_argument("--train-samples", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--work", type=Path, default=None, help="keep intermediate data here (default: a temp dir)")
    p.add_argument("--skip-small", action="store_true", help="leave out the small-scanner scan and model")
    p.add_argument("--mmr", action=argparse.BooleanOptionalAction, default=True,
                   help="write the simulated mMR listmode scan (default: yes)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mmr:
        write_mmr_scan(args.out)
    if args.skip_small:
        return 0
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
