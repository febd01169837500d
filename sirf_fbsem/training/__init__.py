"""Training FBSEM-Net: sequential, end-to-end, checkpointed and greedy modes (one entry point, :func:`train`)."""
from .trainers import (
    MODES,
    CheckpointMismatchError,
    TrainConfig,
    TrainEvent,
    TrainResult,
    collate,
    evaluate,
    split_indices,
    train,
    training_step,
    with_terms_factory,
)

__all__ = [
    "MODES",
    "CheckpointMismatchError",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "collate",
    "evaluate",
    "split_indices",
    "train",
    "training_step",
    "with_terms_factory",
]
