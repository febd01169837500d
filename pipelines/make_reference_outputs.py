"""Record what ``sirf-fbsem reconstruct`` gives on the bundled small scan, as the reference that
``tests/test_reference_outputs.py`` holds every later version to (a refactoring must not change
an image).

    python pipelines/make_reference_outputs.py              # with the package this Python imports
    PYTHONPATH=/path/to/old/checkout python pipelines/make_reference_outputs.py   # an older version's

Writes ``test_data/reference_outputs.npz`` (each case's image (Z, Y, X) float32, in the units
``reconstruct`` writes, and its NIfTI affine) and ``test_data/reference_outputs.json`` (the
cases' command lines, the sha256 of every input they read, the package version and git commit
that produced them). Regenerate only when a change is *meant* to change the images (a new
bundled model, a fixed bug), and say so in the commit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

import sirf_fbsem
from sirf_fbsem.cli import main as cli
from sirf_fbsem.io.atomic import atomic_path

ROOT = Path(__file__).resolve().parents[1]
_SCAN = ["test_data/phantom_scan.hs", "--norm", "test_data/phantom_mult.hs",
         "--additive", "test_data/phantom_additive.hs"]
#: name -> ``sirf-fbsem`` arguments (paths relative to the repository; OUT is the output image)
#: (the default ray tracing, Siddon on the CPU, and Joseph pinned: each projector is held to its images)
CASES: dict[str, list[str]] = {
    "fbsem_small": ["reconstruct", *_SCAN, "--model", "test_data/fbsem_model.pt", "--output", "OUT"],
    "osem_small": ["reconstruct", *_SCAN, "--algorithm", "osem", "--iterations", "2", "--subsets", "4",
                   "--output", "OUT"],
    "fbsem_small_joseph": ["reconstruct", *_SCAN, "--model", "test_data/fbsem_model.pt", "--ray-tracing", "joseph",
                           "--output", "OUT"],
    "osem_small_joseph": ["reconstruct", *_SCAN, "--algorithm", "osem", "--iterations", "2", "--subsets", "4",
                          "--ray-tracing", "joseph", "--output", "OUT"],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inputs_of(argv: list[str]) -> list[str]:
    """The repository files a case reads: its ``test_data/`` arguments and their data files."""
    out: list[str] = []
    for a in argv:
        if a.startswith("test_data/"):
            out.append(a)
            p = ROOT / a
            if p.suffix in (".hs", ".hv"):
                out.append(str((p.with_suffix(".s" if p.suffix == ".hs" else ".v")).relative_to(ROOT)))
            if p.suffix == ".pt":
                out.append(str(p.with_suffix(".json").relative_to(ROOT)))
    return [f for f in out if (ROOT / f).is_file()]


def run_case(argv: list[str], out_dir: Path) -> nib.Nifti1Image:
    """Run one case (cwd-independent: paths resolved against the repository) and load its image."""
    out = out_dir / "image.nii.gz"
    args = [str(ROOT / a) if a.startswith("test_data/") else (str(out) if a == "OUT" else a) for a in argv]
    rc = cli([*args, "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"sirf-fbsem {' '.join(args)} exited with {rc}")
    return nib.load(out)


def _commit(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "test_data" / "reference_outputs",
                   help="stem of the .npz and .json written (default test_data/reference_outputs)")
    args = p.parse_args(argv)
    arrays: dict[str, np.ndarray] = {}
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            img = run_case(case, Path(tmp))
            arrays[f"{name}_image"] = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0).copy()  # (Z, Y, X)
            arrays[f"{name}_affine"] = img.affine.astype(np.float64)
        print(f"{name}: shape {arrays[name + '_image'].shape}, sum {float(arrays[name + '_image'].sum()):.6g}")
    package_root = Path(sirf_fbsem.__file__).resolve().parents[1]
    record = {
        "produced_by": "pipelines/make_reference_outputs.py",
        "sirf_fbsem_version": sirf_fbsem.__version__,
        "package_path": str(package_root),
        "git_commit": _commit(package_root),
        "cases": CASES,
        "inputs_sha256": {f: sha256(ROOT / f) for case in CASES.values() for f in inputs_of(case)},
        "image_layout": "(Z, Y, X) float32 as written to NIfTI by reconstruct; affine: the NIfTI's (mm)",
    }
    with atomic_path(args.out.with_suffix(".npz")) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out.with_suffix('.npz')} and .json (commit {record['git_commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
