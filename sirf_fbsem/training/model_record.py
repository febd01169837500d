"""What a trained model's file records of its run besides the weights: the training data's
geometry and phantoms, the stage targets, the backend. One function, used by ``train`` (which
writes ``OUT/model.pt`` when the run completes) and by ``export-model`` (which writes the same
file from the run's checkpoints), so that the two cannot record different things.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from .stage_targets import TargetRule

__all__ = ["model_metadata", "training_data_record"]


def training_data_record(manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    """What a model's metadata records of its training phantoms (:mod:`sirf_fbsem.study_sets`): per
    dataset (its ``manifest.json``) its base seed, the sample indices used (training and validation)
    and the counts; one dict for one dataset, a list for several."""
    records = [{"seed": m.get("seed"), "indices": list(range(len(m["files"]))), "counts": m.get("counts")}
               for m in manifests]
    return records[0] if len(records) == 1 else records


def model_metadata(manifests: Sequence[Mapping[str, Any]], data: Sequence[str | os.PathLike], rule: TargetRule,
                   num_stages: int, backend: str) -> dict[str, Any]:
    """The run's part of a model's metadata (:func:`sirf_fbsem.model.io.save_model` adds the network's,
    :func:`~sirf_fbsem.training.trainers.train` the mode and settings).

    Args:
        manifests: the training data's manifests (one per ``--data`` directory, in order); the
            geometry and PSF are the first's (the directories trained on together share them).
        data: the directories, as given (recorded as a path, or a list of paths for several).
        rule: the stage targets; recorded for ``num_stages`` stages.
        backend: the projector the run trained with (``embedded`` or ``sirf``).
    """
    first = manifests[0]
    return {
        **rule.as_dict(num_stages),
        "sinogram_geometry": first["sinogram_geometry"],
        "image_geometry": first["image_geometry"],
        "data": str(data[0]) if len(data) == 1 else [str(d) for d in data],
        "psf_fwhm_mm": first.get("psf_fwhm_mm"),
        "backend": backend,
        # the phantoms every choice of this run saw (training and validation split), so that
        # 'evaluate' can refuse to confirm on them (sirf_fbsem.study_sets)
        "training_data": training_data_record(manifests),
    }
