"""Training FBSEM-Net: sequential, end-to-end, checkpointed and greedy modes (one entry point, :func:`train`),
in one process or data-parallel under ``torchrun`` (:mod:`sirf_fbsem.distributed`)."""
from ..distributed import DistContext, init_distributed
from .trainers import (
    MODES,
    CheckpointMismatchError,
    TrainConfig,
    TrainEvent,
    TrainResult,
    evaluate,
    split_indices,
    train,
    training_step,
    with_terms_factory,
    make_optimizer,
)
from .patches import draw_patches, patch_training_step

__all__ = [
    "MODES",
    "CheckpointMismatchError",
    "DistContext",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "evaluate",
    "init_distributed",
    "split_indices",
    "train",
    "training_step",
    "with_terms_factory",
    "make_optimizer",
    "draw_patches",
    "patch_training_step",
]
