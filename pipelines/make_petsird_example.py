"""Write a small PETSIRD listmode file (a simulated phantom on the 8-ring test scanner) and say how to reconstruct it.

Usage: python pipelines/make_petsird_example.py [OUT.petsird] [--counts N] [--seconds S]

Counts are Poisson samples of the embedded projector's span-1 forward projection of a
hot and a warm block, spread over S one-second time blocks; a tenth as many delayeds
(uniform over the sinogram) are stored too. Then:

    sirf-fbsem reconstruct OUT.petsird --span 3 --time 0 5 --algorithm osem --output out/petsird.nii.gz
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sirf_fbsem.geometry import SinogramGeometry, scanner_preset
from sirf_fbsem.io import listmode as lm
from sirf_fbsem.io.petsird import PetsirdTimeBlock, write_petsird
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel


def sinogram_to_pairs(geom: SinogramGeometry, counts: np.ndarray) -> np.ndarray:
    """One ``(ring1, det1, ring2, det2)`` per count of a span-1 SIRF sinogram ``(1, S, V, N)``."""
    seg_of_row, ax_of_row = geom.sinogram_index_table()
    rows, views, tangs = np.nonzero(counts[0])
    r1, r2 = lm.span1_ring_pair(seg_of_row[rows], ax_of_row[rows])
    n = geom.scanner.num_detectors_per_ring
    d1, d2 = lm.det_pair_for_view_tangential(views, geom.tangential_pos_nums()[tangs], n)
    return np.repeat(np.stack([r1, d1, r2, d2], axis=1), counts[0][rows, views, tangs], axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("out/phantom.petsird"))
    ap.add_argument("--counts", type=float, default=2e5, help="expected prompts in all (default 2e5)")
    ap.add_argument("--seconds", type=int, default=5, help="number of 1 s time blocks (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    scanner = scanner_preset("small_test")
    geom = SinogramGeometry.from_span(scanner, span=1)
    image = geom.default_image()
    x = np.zeros(image.shape, dtype=np.float32)
    x[4:11, 14:34, 14:34] = 1.0
    x[6:9, 18:24, 26:32] = 4.0
    with torch.no_grad():
        y = EmbeddedAcquisitionModel(geom, image).direct(torch.from_numpy(x)).numpy()
    rng = np.random.default_rng(a.seed)
    blocks = []
    for s in range(a.seconds):
        prompts = rng.poisson(y * (a.counts / a.seconds / y.sum()))
        delayed = rng.poisson(np.full(y.shape, 0.1 * a.counts / a.seconds / y.size))
        blocks.append(PetsirdTimeBlock(1000 * s, 1000 * (s + 1), sinogram_to_pairs(geom, prompts),
                                       sinogram_to_pairs(geom, delayed)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_petsird(a.out, scanner, blocks, module_order=rng.permutation(scanner.num_detectors_per_ring))
    n = sum(len(b.prompts) for b in blocks)
    print(f"{a.out}: {n:,} prompts in {a.seconds} time blocks on the {scanner.name}\n"
          f"reconstruct: sirf-fbsem reconstruct {a.out} --span 3 --algorithm osem --output out/petsird.nii.gz")


if __name__ == "__main__":
    main()
