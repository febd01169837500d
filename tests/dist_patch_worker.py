"""A patch-training job for tests/training/test_patch_training.py, run by torchrun on CPU ranks (gloo).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_patch_worker.py --samples samples.pt --out OUT

Trains ``small_net`` (tests/model/test_model.py) sequentially on patches (:data:`PATCH_CONFIG`), once with
each stage cache (``disk``, ``memory``), into OUT/<cache>; rank 0 writes the final weights to
OUT/<cache>/final.pt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_problems import small_net, tiny2d_geometry# noqa: E402

from sirf_fbsem.distributed import init_distributed, shutdown  # noqa: E402
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel  # noqa: E402
from sirf_fbsem.samples import Sample  # noqa: E402
from sirf_fbsem.training import TrainConfig, train, with_terms_factory  # noqa: E402

#: the settings the in-process reference run of the test uses too
PATCH_CONFIG = dict(epochs=2, lr=1e-2, batch_size=3, validation_fraction=0.2, seed=0, progress=False,
                    patch_shape=(1, 12, 12), patches_per_sample=3)
NUM_STAGES = 2
NUM_SUBSETS = 2


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    ctx = init_distributed("cpu")
    samples = [Sample.from_dict(d) for d in torch.load(args.samples, weights_only=True)]
    sino, image = tiny2d_geometry()
    factory = with_terms_factory(EmbeddedAcquisitionModel(sino, image, num_subsets=NUM_SUBSETS))
    try:
        for cache in ("disk", "memory"):
            result = train(small_net(num_stages=NUM_STAGES, num_subsets=NUM_SUBSETS), samples, "sequential",
                           TrainConfig(**PATCH_CONFIG, cache=cache), factory, args.out / cache, distributed=ctx)
            if ctx.is_main:
                torch.save({k: v.detach().clone() for k, v in result.net.state_dict().items()},
                           args.out / cache / "final.pt")
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
