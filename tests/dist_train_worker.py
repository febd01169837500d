"""A training job for tests/training/test_distributed.py, run by torchrun on CPU ranks (gloo).

    python -m torch.distributed.run --nproc-per-node 2 --max-restarts 1 tests/dist_train_worker.py \
        --samples samples.pt --out OUT --runs sequential:sequential greedy:greedy killed:sequential \
        [--kill killed 1 11]

Each run NAME:MODE trains ``small_net`` (tests/model/test_model.py) on the saved samples into
OUT/NAME; rank 0 writes the final weights to OUT/NAME/final.pt. Every rank appends
``attempt rank name step`` lines to OUT/steps.log. With ``--kill NAME R S`` rank R kills
itself (SIGKILL, no clean-up) at step S of run NAME in the first attempt only (torchrun's
``TORCHELASTIC_RESTART_COUNT`` is 0); torchrun then restarts every rank and the job
resumes from its checkpoints (finished runs return at once).
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_problems import small_net, tiny2d_geometry# noqa: E402

from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel  # noqa: E402
from sirf_fbsem.samples import Sample  # noqa: E402
from sirf_fbsem.training import TrainConfig, TrainEvent, train, with_terms_factory  # noqa: E402
from sirf_fbsem.distributed import elastic_restart_count, init_distributed, shutdown  # noqa: E402

#: the settings the in-process reference run of the tests uses too
CONFIG = dict(epochs=2, lr=1e-2, batch_size=2, validation_fraction=0.2, seed=0, progress=False)
NUM_STAGES = 2
NUM_SUBSETS = 4


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", nargs="+", default=["sequential:sequential"], help="NAME:MODE ...")
    p.add_argument("--kill", nargs=3, default=None, metavar=("NAME", "RANK", "STEP"))
    args = p.parse_args()
    kill_run, kill_rank, kill_step = (args.kill[0], int(args.kill[1]), int(args.kill[2])) if args.kill else (None, -1, -1)

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a stuck rank is
    ctx = init_distributed("cpu")
    attempt = elastic_restart_count()
    samples = [Sample.from_dict(d) for d in torch.load(args.samples, weights_only=True)]
    sino, image = tiny2d_geometry()
    factory = with_terms_factory(EmbeddedAcquisitionModel(sino, image, num_subsets=NUM_SUBSETS))
    log = args.out / "steps.log"
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for spec in args.runs:
            name, mode = spec.split(":")
            if (args.out / name / "final.pt").is_file():  # finished before a restart
                continue

            def callback(event: TrainEvent, name: str = name) -> None:
                if event.kind != "step":
                    return
                with open(log, "a") as f:
                    f.write(f"{attempt} {ctx.rank} {name} {event.step}\n")
                if (name, ctx.rank, event.step, attempt) == (kill_run, kill_rank, kill_step, 0):
                    os.kill(os.getpid(), signal.SIGKILL)

            result = train(small_net(num_stages=NUM_STAGES, num_subsets=NUM_SUBSETS), samples, mode,
                           TrainConfig(**CONFIG), factory, args.out / name, callbacks=[callback],
                           resume=attempt > 0, distributed=ctx)
            if ctx.is_main:
                torch.save({k: v.detach().clone() for k, v in result.net.state_dict().items()},
                           args.out / name / "final.pt")
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
