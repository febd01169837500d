"""FBSEM-Net model files: tensors and a JSON string, loaded without unpickling code.

One ``.pt`` file holds a plain dict (``torch.load(..., weights_only=True)`` reads it)::

    {"format": "sirf_fbsem.fbsem_net", "format_version": 1,
     "metadata_json": "<JSON text>", "state_dict": {name: tensor}}

The JSON carries everything needed to rebuild the network and to check it against
data: the sinogram and image geometry (``geometry.*_to_dict``), the network config
(num_stages, num_subsets, regulariser config incl. its intensity normalisation,
shared flag, beta units), the training mode, the package version, and any extra
plain-JSON entries given by the caller, and ``projection_units`` (the units of the
projections the model was trained on, :data:`~sirf_fbsem.projectors.base.PROJECTION_UNITS`;
a model without it, trained before the package moved to SIRF's units, is refused). A copy of the JSON is written beside the
model (``model.json``) for people to read; :func:`load_model` never reads it.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import __version__
from ..projectors.base import PROJECTION_UNITS
from ..geometry import (
    GeometryError,
    ImageGeometry,
    SinogramGeometry,
    geometry_mismatch,
    image_geometry_from_dict,
    image_geometry_to_dict,
    sinogram_geometry_from_dict,
    sinogram_geometry_to_dict,
)
from ..io.atomic import atomic_path
from .fbsem import FBSEMNet

__all__ = ["save_model", "load_model", "ModelFileError", "safe_torch_load", "MODEL_FORMAT", "MODEL_FORMAT_VERSION"]

MODEL_FORMAT = "sirf_fbsem.fbsem_net"
MODEL_FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model or checkpoint file that is not in the expected, safe format."""


def safe_torch_load(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with clear errors.

    A file that needs unpickling arbitrary Python objects is refused (never loaded
    with ``weights_only=False``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelFileError(
            f"refusing to load {what} {str(path)!r}: it contains pickled Python objects that are not plain "
            f"tensors/containers, and loading it would run arbitrary code. Only files written by sirf_fbsem "
            f"(tensors, numbers, strings, lists and dicts) are accepted. Details: {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ModelFileError(f"{what} {str(path)!r} is not a readable torch file: {err}") from None


def _geometry_dicts(metadata: Mapping[str, Any]) -> tuple[dict, dict]:
    try:
        sino, img = metadata["sinogram_geometry"], metadata["image_geometry"]
    except KeyError as err:
        raise ValueError(f"model metadata needs 'sinogram_geometry' and 'image_geometry'; missing {err}") from None
    if isinstance(sino, SinogramGeometry):
        sino = sinogram_geometry_to_dict(sino)
    if isinstance(img, ImageGeometry):
        img = image_geometry_to_dict(img)
    # validate (raises GeometryError on malformed descriptions)
    sinogram_geometry_from_dict(sino)
    image_geometry_from_dict(img)
    return dict(sino), dict(img)


def save_model(path: str | os.PathLike, net: FBSEMNet, metadata: Mapping[str, Any]) -> Path:
    """Write ``net`` and its metadata to ``path`` (atomically) and a readable ``.json`` beside it.

    Args:
        path: target file, conventionally ``*.pt``.
        net: the network (its config is recorded from the object itself).
        metadata: plain-JSON dict with at least ``sinogram_geometry`` and ``image_geometry``
            (geometry objects or their dicts) and ``training_mode``; other keys are kept.
    Returns:
        the path written.
    """
    path = Path(path)
    sino, img = _geometry_dicts(metadata)
    meta = {k: v for k, v in metadata.items() if k not in ("sinogram_geometry", "image_geometry")}
    meta.update(
        {
            "sinogram_geometry": sino,
            "image_geometry": img,
            "network": net.config(),
            "num_stages": net.num_stages,
            "num_subsets": net.num_subsets,
            "regulariser": net.regulariser_config.to_dict(),
            "shared_regulariser": net.shared_regulariser,
            "intensity_scaling": {
                "regulariser_input": net.regulariser_config.normalisation,
                "beta_units": net.beta_units,
            },
            "training_mode": metadata.get("training_mode"),
            "projection_units": PROJECTION_UNITS,
            "sirf_fbsem_version": __version__,
            "format_version": MODEL_FORMAT_VERSION,
        }
    )
    try:
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model metadata must be plain JSON (numbers, strings, lists, dicts): {err}") from None
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    payload = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "metadata_json": text,
        "state_dict": state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(text + "\n")
    return path


def load_model(
    path: str | os.PathLike,
    expected_sinogram_geometry: SinogramGeometry | None = None,
    override_geometry: bool = False,
    expected_image_geometry: ImageGeometry | None = None,
) -> tuple[FBSEMNet, dict[str, Any]]:
    """Read a model written by :func:`save_model` (weights only; pickled payloads are refused).

    Args:
        path: the ``.pt`` file.
        expected_sinogram_geometry: geometry of the data to reconstruct; a model trained
            for another geometry is refused (the differences are listed) unless
            ``override_geometry``.
        override_geometry: load anyway when the geometries differ.
        expected_image_geometry: image grid of the reconstruction; a model trained on
            another voxel grid (shape or voxel size: the CNN is resolution dependent) is
            refused likewise unless ``override_geometry``.
    Returns:
        (network on CPU in eval mode, metadata dict). In the metadata,
        ``sinogram_geometry`` and ``image_geometry`` are geometry objects.
    """
    payload = safe_torch_load(path, "model file")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFileError(
            f"{str(path)!r} is not a sirf_fbsem FBSEM-Net model file (expected format {MODEL_FORMAT!r}, "
            f"got {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})"
        )
    version = payload.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise ModelFileError(
            f"model file {str(path)!r} has format version {version}; this sirf_fbsem reads {MODEL_FORMAT_VERSION}"
        )
    try:
        meta = json.loads(payload["metadata_json"])
        state = payload["state_dict"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"model file {str(path)!r} is incomplete or corrupt: {err!r}") from None
    _check_units(path, meta)
    sino = sinogram_geometry_from_dict(meta["sinogram_geometry"])
    img = image_geometry_from_dict(meta["image_geometry"])
    if expected_sinogram_geometry is not None:
        diffs = geometry_mismatch(sino, expected_sinogram_geometry)
        if diffs and not override_geometry:
            raise GeometryError(
                f"model {str(path)!r} was trained for another sinogram geometry than the data's "
                f"(model vs data): " + "; ".join(diffs) + ". Pass override_geometry=True to use it anyway."
            )
    if expected_image_geometry is not None:
        diffs = _image_mismatch(img, expected_image_geometry)
        if diffs and not override_geometry:
            raise GeometryError(
                f"model {str(path)!r} was trained on another image grid than requested (model vs requested): "
                + "; ".join(diffs) + ". Pass override_geometry=True to use it anyway."
            )
    net = FBSEMNet.from_config(meta["network"])
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFileError(
            f"model file {str(path)!r} does not match its own network config: missing {missing}, "
            f"unexpected {unexpected}"
        )
    net.eval()
    meta["sinogram_geometry"] = sino
    meta["image_geometry"] = img
    return net, meta


def _check_units(path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Refuse a model trained on projections in other units than :data:`PROJECTION_UNITS`."""
    units = meta.get("projection_units")
    if units == PROJECTION_UNITS:
        return
    if units is None:
        raise ModelFileError(
            f"model file {str(path)!r} was trained in the embedded projector's former units (line integrals "
            f"in mm, sirf_fbsem before 0.2); this sirf_fbsem computes in SIRF's units ({PROJECTION_UNITS!r}: "
            f"lengths divided by the x voxel size), so its images would be on another scale. Retrain the "
            f"model with this version (sirf-fbsem simulate + train)"
        )
    raise ModelFileError(
        f"model file {str(path)!r}: field 'projection_units' is {units!r}; this sirf_fbsem reads models "
        f"trained in {PROJECTION_UNITS!r}"
    )


def _image_mismatch(a: ImageGeometry, b: ImageGeometry, tol_mm: float = 1e-3) -> list[str]:
    diffs = []
    if a.shape != b.shape:
        diffs.append(f"image shape (z,y,x): {a.shape} vs {b.shape}")
    if any(abs(u - v) > tol_mm for u, v in zip(a.voxel_size_mm, b.voxel_size_mm)):
        diffs.append(f"voxel size (z,y,x) mm: {a.voxel_size_mm} vs {b.voxel_size_mm}")
    return diffs
