"""NRMSE on the bundled mMR scan: a 3D mMR model against OSEM, early-stopped OSEM and post-filtered OSEM.

    python pipelines/bundled_scan_nrmse.py --model test_data/fbsem_mmr_model.pt --out pipelines/results/NAME

Reconstructs ``test_data/mmr_brain.l.hdr`` (with its ECAT8 norm and μ-map: what ``pipelines/demo.sh``
reconstructs) on the model's grid, with the model and with OSEM of the model's subsets for 1 to
``--osem-iterations`` full iterations (each also Gaussian-filtered at ``--fwhm-mm``). NRMSE
``||x - t||_2 / ||t||_2`` is taken against the bundled truth ``t`` inside the head (its support
dilated by 2 voxels), as in ``tests/test_mmr_fbsem_model.py``. One scan, whose phantom is not in any
training set, and the baselines' best settings are picked on it: indicative, not a confirmation-set
figure. Writes ``OUT.json``; a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sirf_fbsem.acquisition import load_acquisition
from sirf_fbsem.evaluation import gaussian_filter, osem_iterates
from sirf_fbsem.geometry import SinogramGeometry, scanner_preset
from sirf_fbsem.io.interfile import read_image
from sirf_fbsem.io.mumap import resample_to
from sirf_fbsem.metrics import nrmse
from sirf_fbsem.model.io import load_model
from sirf_fbsem.reconstructor import reconstruct_acquisition

TEST_DATA = Path(__file__).resolve().parents[1] / "test_data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a 3D mMR model file (.pt)")
    parser.add_argument("--out", type=Path, required=True, help="output stem: OUT.json")
    parser.add_argument("--osem-iterations", type=int, default=9, help="OSEM full iterations scored (1..N)")
    parser.add_argument("--fwhm-mm", type=float, nargs="+", default=[2, 4, 6, 8, 10, 12],
                        help="post-filter FWHMs (mm) for OSEM + Gaussian")
    args = parser.parse_args(argv)
    net, meta = load_model(args.model)
    grid = meta["image_geometry"]
    acq = load_acquisition(TEST_DATA / "mmr_brain.l.hdr", norm=TEST_DATA / "mmr_brain_norm.n.hdr",
                           mu_map=TEST_DATA / "mmr_brain_mu_map.hv", progress=False)
    # the truth is stored on the command's default grid, in units per its voxel; put it on the model's grid
    default = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), 11, 60).default_image()
    geom, truth = read_image(TEST_DATA / "mmr_brain_truth.hv")
    truth = resample_to(truth, geom, grid) * np.float32(grid.voxel_size_mm[2] / default.voxel_size_mm[2])
    head = ndimage.binary_dilation(truth > 0, iterations=2)

    def score(x) -> float:
        x = np.asarray(x)
        return float(nrmse(x[head], truth[head]))

    t0 = time.perf_counter()
    x_f, desc = reconstruct_acquisition(acq, grid, "fbsem", model_path=args.model, progress=True)
    fbsem_s = time.perf_counter() - t0
    model = acq.model(grid, num_subsets=net.num_subsets)
    iterates = osem_iterates(model, torch.as_tensor(acq.prompts), args.osem_iterations)
    osem = [score(x) for x in iterates]
    filtered = {f: [score(gaussian_filter(x, f, grid.voxel_size_mm)) for x in iterates] for f in args.fwhm_mm}
    best_f, best_it = min(((f, i) for f in filtered for i in range(len(iterates))), key=lambda p: filtered[p[0]][p[1]])
    same = net.num_stages // net.num_subsets
    result = {
        "model": str(args.model), "description": desc, "num_stages": net.num_stages, "num_subsets": net.num_subsets,
        "fbsem_nrmse": score(x_f.numpy()), "fbsem_seconds": fbsem_s,
        "osem_nrmse_by_iteration": osem,
        "osem_same_subiterations": {"iterations": same, "nrmse": osem[same - 1] if same <= len(osem) else None},
        "osem_best": {"iterations": int(np.argmin(osem)) + 1, "nrmse": float(min(osem))},
        "osem_gaussian_best": {"iterations": best_it + 1, "fwhm_mm": best_f, "nrmse": filtered[best_f][best_it]},
        "osem_gaussian_nrmse": {str(f): v for f, v in filtered.items()},
        "note": "one scan; the baselines' settings picked on it: indicative, not a confirmation-set figure",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    for k in ("fbsem_nrmse", "osem_same_subiterations", "osem_best", "osem_gaussian_best"):
        print(k, result[k])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
