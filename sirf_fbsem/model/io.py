"""FBSEM-Net model files: tensors and a JSON string, checksummed, loaded without unpickling code.

Format version 2
----------------

One ``.pt`` file holds a plain dict (``torch.load(..., weights_only=True)`` reads it)::

    {"format": "sirf_fbsem.fbsem_net", "format_version": 2,
     "metadata_json": "<JSON text>", "metadata_sha256": "<64 hex digits>",
     "state_dict": {name: tensor}, "tensor_sha256": "<64 hex digits>"}

Checksums (:func:`metadata_sha256`, :func:`state_dict_sha256`), so that neither the
weights nor the metadata can be altered or damaged unnoticed:

* ``metadata_sha256``: SHA-256 of the UTF-8 bytes of ``metadata_json``, exactly as stored.
* ``tensor_sha256``: SHA-256 over the state dict in sorted key order; for every tensor
  the header ``json.dumps([key, str(dtype), list(shape)])`` and then the raw bytes of the
  contiguous CPU tensor (machine byte order, little-endian on every supported platform),
  each preceded by its length as an 8-byte little-endian integer.

They guard against damage and accidental edits, not against someone who rewrites the
file on purpose and recomputes them (the file is not signed).

The JSON (``schema_version`` 3) carries everything needed to rebuild the network and to
check it against data; required (:func:`load_model` checks each one and names the field
that is missing or malformed):

* ``schema_version``: 3 (1 and 2 are read too: files saved by 0.3, whose networks have no start
  rule, and by 0.4-0.8, whose betas do not depend on the count level).
* ``sinogram_geometry``, ``image_geometry``: ``geometry.*_to_dict`` of the training data.
* ``network``: :meth:`FBSEMNet.config` (num_stages, num_subsets, regulariser_config with its
  intensity normalisation, shared_regulariser, beta_init, beta_units, and from schema 2 on
  start_rule: ``"count_matched"`` makes the network scale-equivariant; schema 1 files get
  ``"none"``, the start image they were trained from; from schema 3 on ``beta_counts`` and
  ``beta_count_reference`` (counts): ``"log_linear"`` makes each stage's strength depend on the
  data's count level; schema 1 and 2 files get ``"none"``).
* ``num_stages``, ``num_subsets``: as in ``network``.
* ``projection_units``: the units of the projections the model was trained on,
  :data:`~sirf_fbsem.projectors.base.PROJECTION_UNITS`; a model without it, trained before
  the package moved to SIRF's units, is refused.

and for information: ``regulariser``, ``shared_regulariser``, ``intensity_scaling``,
``training_mode``, ``sirf_fbsem_version``, ``format_version`` (and
``upgraded_by_sirf_fbsem_version`` in upgraded files) and any extra plain-JSON entries
given by the caller. A copy of the JSON is written beside the model
(``model.json``) for people to read; :func:`load_model` never reads it.

Loading checks, in this order: the container (a readable torch zip of plain tensors and
containers, never unpickled code), the format and its version, both checksums, every
required metadata field (types, ranges, geometries that can be built), the geometries
against the data's (optional), and finally every tensor's name, shape and dtype (floating
point, no NaN) against the network the metadata describes, built on PyTorch's ``meta``
device first so that a malformed config allocates nothing (with a shared regulariser, the
per-stage copies in the file must agree). Every failure is a :class:`ModelFileError` (an
:class:`~sirf_fbsem.errors.InputError`) naming the file, or a
:class:`~sirf_fbsem.geometry.GeometryError` for a geometry mismatch.

Format version 1 (sirf_fbsem 0.2.0): the same without the checksums and without
``schema_version``. Such files are refused, since damage to them cannot be detected;
:func:`upgrade_model_file` converts one (after every check but the checksum) into a new
version 2 file beside it, with bitwise the same tensors.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import __version__
from ..errors import InputError, InputFileNotFoundError, OutputPathError
from ..geometry import (
    GeometryError,
    ImageGeometry,
    Scanner,
    SinogramGeometry,
    geometry_mismatch,
    image_geometry_from_dict,
    image_geometry_to_dict,
    sinogram_geometry_from_dict,
    sinogram_geometry_to_dict,
)
from ..io.atomic import atomic_path
from ..io.outputs import MODEL_MARK
from ..projectors.base import PROJECTION_UNITS
from .fbsem import BETA_COUNTS, START_RULES, FBSEMNet
from .regularisers import RegulariserConfig

__all__ = [
    "save_model",
    "load_model",
    "upgrade_model_file",
    "ModelFileError",
    "safe_torch_load",
    "metadata_sha256",
    "state_dict_sha256",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "METADATA_SCHEMA_VERSION",
]

#: the ``format`` entry of a model file (how its writer recognises a file it may replace: io.outputs)
MODEL_FORMAT = MODEL_MARK
#: format version written and read (1: sirf_fbsem 0.2.0, no checksums; see :func:`upgrade_model_file`)
MODEL_FORMAT_VERSION = 2
#: version of the metadata JSON's layout (its ``schema_version``)
METADATA_SCHEMA_VERSION = 3
#: schema versions :func:`load_model` reads (1: networks without ``start_rule``, sirf_fbsem 0.3;
#: 2: without ``beta_counts``, sirf_fbsem 0.4-0.8)
READABLE_SCHEMA_VERSIONS = (1, 2, 3)

#: largest count accepted in a geometry description (rings, detectors, views, bins, voxels per axis):
#: far beyond any scanner, small enough that describing the geometry allocates little memory
_MAX_COUNT = 1 << 20

#: errors ``torch.load`` raises on a damaged file (the zip reader, the weights-only unpickler,
#: tensor rebuilding from garbled sizes); anything else is a bug and keeps its traceback
_DAMAGED_FILE_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError,
    EOFError,
    ValueError,  # incl. UnicodeDecodeError
    struct.error,
    zipfile.BadZipFile,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    MemoryError,
    OSError,  # the C++ zip reader's EINVAL on garbled offsets (the file itself opened fine)
)


class ModelFileError(InputError):
    """A model or checkpoint file that is not in the expected, safe format, damaged, or inconsistent."""


# ----------------------------------------------------------------------------- reading torch files


def safe_torch_load(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with clear errors.

    A file that needs unpickling arbitrary Python objects is refused (never loaded
    with ``weights_only=False``); a damaged or truncated file raises :class:`ModelFileError`
    naming it, whatever the torch reader tripped over.

    Raises:
        InputFileNotFoundError: ``path`` is not a file (also a ``FileNotFoundError``).
        ModelFileError: the file cannot be read, is damaged, or holds pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"{what} {str(path)!r} does not exist", path)
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ModelFileError(f"{what} {str(path)!r} cannot be read: {err.strerror or err}") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ModelFileError(
                f"refusing to load {what} {str(path)!r}: it is damaged, or it contains pickled Python objects "
                f"that are not plain tensors/containers, and loading those would run arbitrary code. Only files "
                f"written by sirf_fbsem (tensors, numbers, strings, lists and dicts) are accepted. Details: "
                f"{_unpickling_detail(str(err))}"
            ) from None
        except _DAMAGED_FILE_ERRORS as err:
            raise ModelFileError(
                f"{what} {str(path)!r} is damaged or not a torch file (reading it failed: "
                f"{type(err).__name__}: {_first_line(err)})"
            ) from None
    for w in caught:  # warnings of a successful load are passed on (those of a failed one are noise)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return payload


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[0] if lines else repr(err))[:limit]


def _unpickling_detail(message: str) -> str:
    """The useful part of torch's weights-only error (never its advice to load unsafely)."""
    m = re.search(r"GLOBAL (\S+) was not an allowed global", message)
    if m:
        return f"it refers to the Python object {m.group(1)}"
    tail = message.split("WeightsUnpickler error:", 1)[-1].replace("Weights only load failed.", "")
    for line in tail.splitlines():
        line = line.strip()
        if line and "weights_only" not in line and "torch.serialization" not in line:
            return line[:200]
    return "its pickled index cannot be read"


# ----------------------------------------------------------------------------- checksums


def metadata_sha256(text: str) -> str:
    """SHA-256 (hex) of a model file's metadata JSON text, as stored in ``metadata_sha256``."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict, as stored in ``tensor_sha256`` (module docstring).

    Keys in sorted order; for each, the header ``json.dumps([key, str(dtype), list(shape)])``
    and the raw bytes of the contiguous CPU tensor, each preceded by its length (8 bytes,
    little-endian). Depends on the values, dtypes and shapes only (not on strides or storage
    sharing).
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        header = json.dumps([key, str(t.dtype), list(t.shape)]).encode("utf-8", "surrogatepass")
        flat = t.detach().cpu().reshape(-1)
        if flat.stride(0) != 1:  # a size-1 (or empty) tensor may be "contiguous" with any stride
            flat = flat.clone(memory_format=torch.contiguous_format)
        raw = flat.view(torch.uint8).numpy()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(int(raw.nbytes).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing


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


def _write_model_file(path: Path, meta: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> Path:
    """Write a format-version-2 file (atomically) and its ``.json`` copy beside it."""
    try:
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model metadata must be plain JSON (numbers, strings, lists, dicts): {err}") from None
    state = dict(state)
    payload = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "metadata_json": text,
        "metadata_sha256": metadata_sha256(text),
        "state_dict": state,
        "tensor_sha256": state_dict_sha256(state),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(text + "\n")
    return path


def save_model(path: str | os.PathLike, net: FBSEMNet, metadata: Mapping[str, Any]) -> Path:
    """Write ``net`` and its metadata to ``path`` (atomically, format version 2) and a readable ``.json`` beside it.

    Args:
        path: target file, conventionally ``*.pt``.
        net: the network (its config is recorded from the object itself).
        metadata: plain-JSON dict with at least ``sinogram_geometry`` and ``image_geometry``
            (geometry objects or their dicts) and ``training_mode``; other keys are kept
            (the entries this function writes, module docstring, take precedence).
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
                "start_rule": net.start_rule,
            },
            "training_mode": metadata.get("training_mode"),
            "projection_units": PROJECTION_UNITS,
            "sirf_fbsem_version": __version__,
            "format_version": MODEL_FORMAT_VERSION,
            "schema_version": METADATA_SCHEMA_VERSION,
        }
    )
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return _write_model_file(path, meta, state)


# ----------------------------------------------------------------------------- reading model files


def load_model(
    path: str | os.PathLike,
    expected_sinogram_geometry: SinogramGeometry | None = None,
    override_geometry: bool = False,
    expected_image_geometry: ImageGeometry | None = None,
) -> tuple[FBSEMNet, dict[str, Any]]:
    """Read a model written by :func:`save_model` (weights only; pickled payloads are refused).

    Args:
        path: the ``.pt`` file (format version 2; version 1 files are refused with the
            command that converts them, :func:`upgrade_model_file`).
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
    Raises:
        InputFileNotFoundError: no such file.
        ModelFileError: the file is not a model file, is damaged or altered (checksum), has a
            missing or malformed metadata field, or tensors that do not fit its network.
        GeometryError: the model was trained for another geometry than the expected one.
    """
    payload = safe_torch_load(path, "model file")
    version = _format_version(path, payload)
    if version == 1:
        raise ModelFileError(
            f"model file {str(path)!r} is in format version 1 (sirf_fbsem 0.2.0), which has no checksum, so "
            f"damage to its weights or metadata could not be detected; this sirf_fbsem reads format version "
            f"{MODEL_FORMAT_VERSION} only. Convert it once (the original is kept; the new file is "
            f"{str(_default_upgrade_path(Path(path)))!r}) with:  python -c \"from sirf_fbsem.model.io import "
            f"upgrade_model_file; upgrade_model_file({str(path)!r})\""
        )
    text, state = _payload_entries(path, payload, checksums=True)
    _verify_checksums(path, payload, text, state)
    meta = _parse_metadata(path, text)
    sino, img, network = _validate_metadata(path, meta)
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
    net = _build_network(path, network, state)
    meta["sinogram_geometry"] = sino
    meta["image_geometry"] = img
    return net, meta


def upgrade_model_file(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """Convert a format-version-1 model file (sirf_fbsem 0.2.0, no checksums) to version 2.

    Every check :func:`load_model` makes, except the checksums version 1 lacks, is made
    first (metadata fields, units, geometries, tensor names, shapes and dtypes); the new
    file holds bitwise the same tensors, the same metadata plus ``schema_version``,
    ``format_version`` 2 and ``upgraded_by_sirf_fbsem_version``, and both checksums. It is
    written atomically, with its ``.json`` copy beside it; ``src`` is left as it is.

    Args:
        src: the version 1 file.
        dst: where to write; default ``<stem>.v2.pt`` beside ``src``. An existing file
            (or its ``.json`` copy) is never replaced.
    Returns:
        the path written.
    Raises:
        ModelFileError: ``src`` is not a valid version 1 model file (a version 2 file needs
            no upgrade).
        OutputPathError: ``dst`` or its ``.json`` copy exists, or ``dst`` ends in ``.json``.
    """
    src = Path(src)
    dst = _default_upgrade_path(src) if dst is None else Path(dst)
    if dst.suffix == ".json":
        raise OutputPathError(f"upgraded model path {str(dst)!r} must not end in .json (that name is its JSON copy)")
    for target in (dst, dst.with_suffix(".json")):
        if target.exists() or target.is_symlink():
            raise OutputPathError(
                f"refusing to upgrade {str(src)!r} to {str(dst)!r}: {str(target)!r} exists (it is never "
                f"replaced); remove it or pass another dst"
            )
    payload = safe_torch_load(src, "model file")
    version = _format_version(src, payload)
    if version != 1:
        raise ModelFileError(
            f"model file {str(src)!r} is already in format version {version}; only version 1 files need "
            f"upgrade_model_file"
        )
    text, state = _payload_entries(src, payload, checksums=False)
    meta = _parse_metadata(src, text)
    if "schema_version" not in meta:  # version 1 predates it; its layout is schema 1
        meta["schema_version"] = 1
    _, _, network = _validate_metadata(src, meta)
    _build_network(src, network, state)  # names, shapes, dtypes: the new file will load
    meta.update(
        {
            "format_version": MODEL_FORMAT_VERSION,
            "upgraded_by_sirf_fbsem_version": __version__,
        }
    )
    return _write_model_file(dst, meta, state)


def _default_upgrade_path(src: Path) -> Path:
    return src.with_name(f"{src.stem}.v2.pt")


def _format_version(path: str | os.PathLike, payload: Any) -> int:
    """The payload's format version (1 or 2), after checking it is a sirf_fbsem model at all."""
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(
            f"{str(path)!r} is not a sirf_fbsem FBSEM-Net model file (expected format {MODEL_FORMAT!r}, "
            f"got {_show(got)})"
        )
    version = payload.get("format_version")
    if not _is_int(version) or version not in (1, MODEL_FORMAT_VERSION):
        newer = _is_int(version) and version > MODEL_FORMAT_VERSION
        raise ModelFileError(
            f"model file {str(path)!r} has format version {_show(version)}; this sirf_fbsem reads "
            f"{MODEL_FORMAT_VERSION}" + (" (the file was written by a newer sirf_fbsem)" if newer else "")
        )
    return version


def _payload_entries(path: str | os.PathLike, payload: Mapping[str, Any], checksums: bool) -> tuple[str, dict]:
    """``metadata_json`` and ``state_dict`` (dense CPU tensors under string keys), type-checked."""
    needed = ["metadata_json", "state_dict"] + (["metadata_sha256", "tensor_sha256"] if checksums else [])
    for key in needed:
        if key not in payload:
            what = "has no checksum" if key.endswith("sha256") else "is incomplete"
            raise ModelFileError(f"model file {str(path)!r} is corrupt: it {what} (entry {key!r} is missing)")
    for key in needed:
        value, kind = payload[key], (dict if key == "state_dict" else str)
        if not isinstance(value, kind):
            raise ModelFileError(
                f"model file {str(path)!r} is corrupt: entry {key!r} is a {type(value).__name__}, "
                f"not a {kind.__name__}"
            )
    state = payload["state_dict"]
    for key, t in state.items():
        if not isinstance(key, str):
            raise ModelFileError(f"model file {str(path)!r} is corrupt: state dict key {_show(key)} is not a string")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
            raise ModelFileError(
                f"model file {str(path)!r} is corrupt: state dict entry {key!r} is not a dense CPU tensor "
                f"(got {type(t).__name__})"
            )
    return payload["metadata_json"], state


def _verify_checksums(path: str | os.PathLike, payload: Mapping[str, Any], text: str, state: Mapping) -> None:
    for what, stored, found in (
        ("metadata", payload["metadata_sha256"], metadata_sha256(text)),
        ("tensors", payload["tensor_sha256"], state_dict_sha256(state)),
    ):
        if stored.strip().lower() != found:
            raise ModelFileError(
                f"model file {str(path)!r} is corrupt or has been altered: the checksum of its {what} does not "
                f"match (expected sha256 {stored[:12]}..., found {found[:12]}...). Do not use it; restore it "
                f"from a good copy or retrain the model"
            )


def _parse_metadata(path: str | os.PathLike, text: str) -> dict[str, Any]:
    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        meta = json.loads(text, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ModelFileError(f"model file {str(path)!r}: its metadata is not valid JSON ({_first_line(err)})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(
            f"model file {str(path)!r}: its metadata must be a JSON object, got {type(meta).__name__}"
        )
    return meta


# ----------------------------------------------------------------------------- metadata validation


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


class _Fields:
    """Reads required metadata fields of one file, each error naming the file and the field."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)

    def error(self, field: str, problem: str) -> ModelFileError:
        return ModelFileError(f"model file {self.path!r}: metadata field {field!r} {problem}")

    def get(self, d: Mapping[str, Any], key: str, prefix: str = "", required: bool = True) -> Any:
        field = prefix + key
        if key not in d:
            if required:
                raise self.error(field, "is missing")
            return None
        return d[key]

    def as_dict(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(field, f"must be a JSON object, got {_show(value)}")
        return value

    def as_int(self, value: Any, field: str, minimum: int | None = 1, maximum: int | None = None) -> int:
        ok = _is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
        if not ok:
            if minimum in (0, 1):
                want = ("a positive integer" if minimum == 1 else "a non-negative integer") + (
                    "" if maximum is None else f" <= {maximum}"
                )
            elif minimum is None:
                want = "an integer" if maximum is None else f"an integer <= {maximum}"
            else:
                want = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
            raise self.error(field, f"must be {want}, got {_show(value)}")
        return value

    def as_number(self, value: Any, field: str, minimum: float | None = None) -> float:
        if not _is_number(value) or (minimum is not None and value < minimum):
            want = "a finite number" + ("" if minimum is None else f" >= {minimum}")
            raise self.error(field, f"must be {want}, got {_show(value)}")
        return value

    def as_bool(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(field, f"must be true or false, got {_show(value)}")
        return value

    def as_str(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {_show(value)}")
        return value

    def as_choice(self, value: Any, field: str, choices: tuple[Any, ...]) -> Any:
        if not (isinstance(value, str) and value in choices):
            raise self.error(field, f"must be one of {', '.join(map(repr, choices))}, got {_show(value)}")
        return value

    def as_list(self, value: Any, field: str, length: int | None = None, max_length: int = _MAX_COUNT) -> list:
        if not isinstance(value, list) or (length is not None and len(value) != length) or len(value) > max_length:
            want = "a list" if length is None else f"a list of {length} entries"
            raise self.error(field, f"must be {want}, got {_show(value)}")
        return value

    def keys(self, d: Mapping[str, Any], field: str, known: set[str]) -> None:
        unknown = sorted(set(d) - known)
        if unknown:
            raise self.error(field, f"has unknown keys {unknown}; known keys are {sorted(known)}")


def _validate_metadata(
    path: str | os.PathLike, meta: Mapping[str, Any]
) -> tuple[SinogramGeometry, ImageGeometry, dict[str, Any]]:
    """Check every required field (module docstring); return the geometries and the network config."""
    f = _Fields(path)
    schema = f.get(meta, "schema_version")
    if _is_int(schema) and schema > METADATA_SCHEMA_VERSION:
        raise f.error(
            "schema_version",
            f"is {schema}, newer than this sirf_fbsem reads ({METADATA_SCHEMA_VERSION}); update sirf_fbsem",
        )
    if not (_is_int(schema) and schema in READABLE_SCHEMA_VERSIONS):
        raise f.error("schema_version", f"must be one of {READABLE_SCHEMA_VERSIONS}, got {_show(schema)}")
    _check_units(path, meta)
    sino = _sinogram_geometry(f, f.get(meta, "sinogram_geometry"))
    img = _image_geometry(f, f.get(meta, "image_geometry"))
    network = _network_config(f, f.get(meta, "network"), schema)
    for key in ("num_stages", "num_subsets"):
        value = f.as_int(f.get(meta, key), key)
        if value != network[key]:
            raise f.error(key, f"is {value} but 'network.{key}' is {network[key]}")
    return sino, img, network


def _sinogram_geometry(f: _Fields, d: Any) -> SinogramGeometry:
    field = "sinogram_geometry"
    d = f.as_dict(d, field)
    scanner = f.as_dict(f.get(d, "scanner", field + "."), field + ".scanner")
    checks: dict[str, Callable[[Any, str], Any]] = {
        "str": f.as_str,
        "int": lambda v, name: f.as_int(v, name, minimum=0, maximum=_MAX_COUNT),
        "float": f.as_number,
    }
    for fld in dataclasses.fields(Scanner):
        required = fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING
        name = f"{field}.scanner.{fld.name}"
        value = f.get(scanner, fld.name, f"{field}.scanner.", required=required)
        if fld.name in scanner and str(fld.type) in checks:
            checks[str(fld.type)](value, name)
    segments = f.as_list(f.get(d, "segments", field + "."), field + ".segments")
    if not segments:
        raise f.error(field + ".segments", "must list at least one segment")
    for i, seg in enumerate(segments):
        name = f"{field}.segments[{i}]"
        f.as_list(seg, name, length=4)
        for j, v in enumerate(seg):
            f.as_int(v, f"{name}[{j}]", minimum=1 if j == 3 else -_MAX_COUNT, maximum=_MAX_COUNT)
    for key in ("num_views", "num_tangential_poss"):
        f.as_int(f.get(d, key, field + "."), f"{field}.{key}", maximum=_MAX_COUNT)
    f.as_bool(f.get(d, "arc_corrected", field + "."), field + ".arc_corrected")
    f.as_number(f.get(d, "tangential_bin_size_mm", field + "."), field + ".tangential_bin_size_mm")
    if "num_tof_bins" in d:
        f.as_int(d["num_tof_bins"], field + ".num_tof_bins", maximum=_MAX_COUNT)
    try:
        return sinogram_geometry_from_dict(d)
    except (ValueError, TypeError, KeyError, ArithmeticError) as err:  # GeometryError is a ValueError
        raise f.error(field, f"is not a valid sinogram geometry: {_first_line(err)}") from None


def _image_geometry(f: _Fields, d: Any) -> ImageGeometry:
    field = "image_geometry"
    d = f.as_dict(d, field)
    for i, v in enumerate(f.as_list(f.get(d, "shape", field + "."), field + ".shape", length=3)):
        f.as_int(v, f"{field}.shape[{i}]", maximum=_MAX_COUNT)
    for i, v in enumerate(f.as_list(f.get(d, "voxel_size_mm", field + "."), field + ".voxel_size_mm", length=3)):
        f.as_number(v, f"{field}.voxel_size_mm[{i}]", minimum=0.0)
    if "origin_mm" in d:
        for i, v in enumerate(f.as_list(d["origin_mm"], field + ".origin_mm", length=3)):
            f.as_number(v, f"{field}.origin_mm[{i}]")
    try:
        return image_geometry_from_dict(d)
    except (ValueError, TypeError, KeyError, ArithmeticError) as err:  # GeometryError is a ValueError
        raise f.error(field, f"is not a valid image geometry: {_first_line(err)}") from None


#: keys of FBSEMNet.config(); all are required in a model file (a missing one would silently
#: fall back to the constructor's default, e.g. another beta_units)
_NETWORK_KEYS = ("num_stages", "num_subsets", "regulariser_config", "shared_regulariser", "beta_init", "beta_units")


def _network_config(f: _Fields, d: Any, schema: int = METADATA_SCHEMA_VERSION) -> dict[str, Any]:
    """``network`` checked key by key, so that ``FBSEMNet.from_config`` gets what it needs
    (``start_rule`` is required from schema 2 on, ``beta_counts`` and ``beta_count_reference`` from
    schema 3 on, and absent before)."""
    field = "network"
    d = f.as_dict(d, field)
    f.keys(d, field, set(_NETWORK_KEYS) | ({"start_rule"} if schema >= 2 else set())
           | ({"beta_counts", "beta_count_reference"} if schema >= 3 else set()))
    p = field + "."
    f.as_int(f.get(d, "num_stages", p), p + "num_stages")
    f.as_int(f.get(d, "num_subsets", p), p + "num_subsets")
    f.as_bool(f.get(d, "shared_regulariser", p), p + "shared_regulariser")
    f.as_number(f.get(d, "beta_init", p), p + "beta_init", minimum=0.0)
    f.as_choice(f.get(d, "beta_units", p), p + "beta_units", ("normalised", "absolute"))
    if schema >= 2:  # schema 1 files have none: FBSEMNet.from_config gives them "none"
        f.as_choice(f.get(d, "start_rule", p), p + "start_rule", START_RULES)
    if schema >= 3:  # earlier files have none: FBSEMNet.from_config gives them "none"
        f.as_choice(f.get(d, "beta_counts", p), p + "beta_counts", BETA_COUNTS)
        if not f.as_number(f.get(d, "beta_count_reference", p), p + "beta_count_reference", minimum=0.0) > 0:
            raise f.error(p + "beta_count_reference", "must be a number of counts > 0, got 0")
    reg = f.as_dict(f.get(d, "regulariser_config", p), p + "regulariser_config")
    p = field + ".regulariser_config."
    known = {fld.name for fld in dataclasses.fields(RegulariserConfig)}
    f.keys(reg, field + ".regulariser_config", known)
    for key in sorted(known):
        f.get(reg, key, p)
    checks: dict[str, Callable[[Any], bool]] = {
        "dims": lambda v: v in (2, 3),
        "in_channels": lambda v: v in (1, 2),
        "channels": lambda v: v >= 1,
        "layers": lambda v: v >= 2,
        "kernel": lambda v: v >= 1 and v % 2 == 1,
    }
    wants = {
        "dims": "2 or 3",
        "in_channels": "1 or 2",
        "channels": "a positive integer",
        "layers": "an integer >= 2",
        "kernel": "a positive odd integer",
    }
    for key, ok in checks.items():
        value = reg.get(key)
        if key in reg and not (_is_int(value) and ok(value)):
            raise f.error(p + key, f"must be {wants[key]}, got {_show(value)}")
    if "normalisation" in reg:
        f.as_choice(reg["normalisation"], p + "normalisation", ("mean", "none"))
    return d


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
        f"model file {str(path)!r}: metadata field 'projection_units' is {_show(units)}; this sirf_fbsem reads "
        f"models trained in {PROJECTION_UNITS!r}"
    )


# ----------------------------------------------------------------------------- the network


def _build_network(path: str | os.PathLike, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> FBSEMNet:
    """The network ``config`` describes, with the weights of ``state``, on CPU in eval mode.

    ``config`` has passed :func:`_network_config`. The network is first built on the ``meta``
    device (no memory) and every tensor of ``state`` compared with it, by name, shape and
    dtype, before anything is allocated or loaded.
    """
    p = str(path)
    f = _Fields(path)
    n = len(state)
    # each stage has its own beta ('rho'); each convolution a weight and a bias
    if config["num_stages"] > n:
        raise f.error(
            "network.num_stages",
            f"is {config['num_stages']} but the file holds only {n} tensors (every stage has its own beta)",
        )
    layers = config["regulariser_config"]["layers"]
    if 2 * layers > n:
        raise f.error(
            "network.regulariser_config.layers",
            f"is {layers} but the file holds only {n} tensors (every layer has a weight and a bias)",
        )
    try:
        with torch.device("meta"):
            skeleton = FBSEMNet.from_config(config)
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as err:
        raise ModelFileError(
            f"model file {p!r}: metadata field 'network' does not describe a network that can be built: "
            f"{_first_line(err)}"
        ) from None
    expected = skeleton.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        def listing(keys: list[str]) -> str:
            return ", ".join(map(repr, keys[:5])) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        parts = ([f"tensors {listing(missing)} are missing"] if missing else []) + (
            [f"tensors {listing(unexpected)} are unexpected"] if unexpected else []
        )
        raise ModelFileError(
            f"model file {p!r} does not match the network its metadata describes: " + "; ".join(parts)
        )
    for key, want in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(want.shape):
            raise ModelFileError(
                f"model file {p!r}: tensor {key!r} has shape {tuple(t.shape)}; the network config needs "
                f"{tuple(want.shape)}"
            )
        if not t.is_floating_point():
            raise ModelFileError(
                f"model file {p!r}: tensor {key!r} has dtype {t.dtype}; a floating-point one is needed"
            )
        if bool(torch.isnan(t).any()):
            raise ModelFileError(f"model file {p!r}: tensor {key!r} contains NaN")
    if config["shared_regulariser"]:
        # one CNN serves every stage: the file's per-stage copies must agree, else loading would
        # silently keep the last stage's copy for all of them
        for key in expected:
            first = re.sub(r"^stages\.\d+\.regulariser\.", "stages.0.regulariser.", key)
            if first != key and not torch.equal(state[key], state[first]):
                raise ModelFileError(
                    f"model file {p!r}: metadata field 'network.shared_regulariser' is true, but tensor {key!r} "
                    f"differs from {first!r} (a shared regulariser has one set of weights)"
                )
    net = FBSEMNet.from_config(config)
    net.load_state_dict(state, strict=True)
    for key, value in net.state_dict().items():  # what was loaded is what the file holds
        if not torch.equal(value, state[key].to(value.dtype)):
            raise ModelFileError(f"model file {p!r}: tensor {key!r} does not load as stored into its network")
    net.eval()
    return net


def _image_mismatch(a: ImageGeometry, b: ImageGeometry, tol_mm: float = 1e-3) -> list[str]:
    diffs = []
    if a.shape != b.shape:
        diffs.append(f"image shape (z,y,x): {a.shape} vs {b.shape}")
    if any(abs(u - v) > tol_mm for u, v in zip(a.voxel_size_mm, b.voxel_size_mm)):
        diffs.append(f"voxel size (z,y,x) mm: {a.voxel_size_mm} vs {b.voxel_size_mm}")
    return diffs
