"""Typed records of the data FBSEM-Net learns from: one acquisition (:class:`Sample`) and a
stack of them (:class:`Batch`).

Shapes use SIRF's conventions: sinograms (T, S, V, N) = (TOF bins, sinograms in STIR's
segment order, views, tangential positions); images (Z, Y, X). A batch puts B in front.

Units: ``prompts`` and ``additive`` in counts per bin; ``multiplicative`` (normalisation x
attenuation) dimensionless; images (``targets``, ``phantom``) in the activity units of the
simulation, which the forward model ``y = m * G x + b`` maps to counts with ``G`` in SIRF's
units (:data:`~sirf_fbsem.projectors.base.PROJECTION_UNITS`); ``sensitivity`` is
``A_s^T 1`` of subset s in those units; ``mu_map`` in 1/cm.

The simulation (:mod:`sirf_fbsem.simulation.dataset`) writes samples, training and
evaluation read them. On disk a sample is the plain dict of :meth:`Sample.to_dict`
(tensors and numbers only, so ``torch.load(..., weights_only=True)`` reads it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

__all__ = ["Sample", "Batch", "SampleError", "BATCH_FIELDS"]

#: the :class:`Sample` fields a :class:`Batch` stacks (when every sample has them)
BATCH_FIELDS = ("prompts", "targets", "multiplicative", "additive", "sensitivity", "anatomical")


class SampleError(ValueError):
    """A record that does not fit the :class:`Sample` contract (unknown field, missing tensor, bad shape)."""


@dataclass(frozen=True)
class Sample:
    """One acquisition with what the networks are trained and scored against.

    ==================  ===========================  =============================================
    field               shape, dtype                 meaning
    ==================  ===========================  =============================================
    ``prompts``         (T, S, V, N) float32         measured (Poisson) counts
    ``targets``         (K, Z, Y, X) float32         stage k's target: the (k+1)-th OSEM
                                                     sub-iterate of the noise-free data
    ``multiplicative``  (T, S, V, N) float32         normalisation x attenuation; None: 1
    ``additive``        (T, S, V, N) float32         randoms + scatter (counts); None: 0
    ``sensitivity``     (num_subsets, Z, Y, X) f32   ``A_s^T 1`` of this sample's model;
                                                     None: computed from the model
    ``phantom``         (Z, Y, X) float32            ground truth, units of ``targets``
    ``anatomical``      (Z, Y, X) float32            T1-like MR image (lesions absent)
    ``mu_map``          (Z, Y, X) float32            attenuation, 1/cm
    ``lesion_mask``     (Z, Y, X) int8               1 hot lesion, -1 cold lesion, 0 none
    ``counts``          float                        expected total prompts
    ``seed``            int                          the dataset's base seed
    ``index``           int                          the sample's index (its seed is (seed, index))
    ``activity_scale``  float                        ``phantom`` = activity in Bq/ml x this
    ==================  ===========================  =============================================

    Training needs ``prompts`` and ``targets``; evaluation also ``phantom`` and
    ``lesion_mask`` (and ``anatomical`` for PET+MR methods). The simulation fills every field.
    """

    prompts: torch.Tensor
    targets: torch.Tensor
    multiplicative: torch.Tensor | None = None
    additive: torch.Tensor | None = None
    sensitivity: torch.Tensor | None = None
    phantom: torch.Tensor | None = None
    anatomical: torch.Tensor | None = None
    mu_map: torch.Tensor | None = None
    lesion_mask: torch.Tensor | None = None
    counts: float | None = None
    seed: int | None = None
    index: int | None = None
    activity_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("prompts", "targets"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise SampleError(f"Sample.{name} must be a tensor, got {type(getattr(self, name)).__name__}")
        if self.targets.dim() != 4:
            raise SampleError(f"Sample.targets must be (K, Z, Y, X), got shape {tuple(self.targets.shape)}")
        image = tuple(self.targets.shape[1:])
        for name in ("phantom", "anatomical", "mu_map", "lesion_mask"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != image:
                raise SampleError(f"Sample.{name} has shape {tuple(t.shape)}; the targets' images are {image}")
        for name in ("multiplicative", "additive"):
            t = getattr(self, name)
            if t is not None and t.shape != self.prompts.shape:
                raise SampleError(f"Sample.{name} has shape {tuple(t.shape)}; the prompts are "
                                  f"{tuple(self.prompts.shape)}")
        if self.sensitivity is not None and tuple(self.sensitivity.shape[1:]) != image:
            raise SampleError(f"Sample.sensitivity must be (num_subsets,) + {image}, got "
                              f"{tuple(self.sensitivity.shape)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "sample") -> "Sample":
        """The sample of a dict with the field names as keys (a sample file's contents).

        Raises:
            SampleError: a key that is not a field (named, with ``where``), or a missing
                ``prompts``/``targets``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SampleError(f"{where}: unknown keys {unknown}; a sample has {sorted(names)}")
        missing = [k for k in ("prompts", "targets") if d.get(k) is None]
        if missing:
            raise SampleError(f"{where}: lacks {missing}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, as a dict (what a sample file holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def replace(self, **changes: Any) -> "Sample":
        """A copy with ``changes`` (:func:`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    @property
    def num_targets(self) -> int:
        """K, the number of targets (stages that can be trained)."""
        return int(self.targets.shape[0])

    def in_units(self, c: float) -> "Sample":
        """The same acquisition with images in units of ``c`` (images / c).

        Images (``targets``, ``phantom``) are divided by ``c``; ``multiplicative`` and
        ``sensitivity`` multiplied by it, so ``y = m G x + b`` and the prompts are unchanged.
        """
        if not c > 0:
            raise SampleError(f"the image unit must be positive, got {c}")
        m = self.multiplicative if self.multiplicative is not None else torch.ones_like(self.prompts)
        return self.replace(
            targets=self.targets / c,
            phantom=None if self.phantom is None else self.phantom / c,
            multiplicative=m * c,
            sensitivity=None if self.sensitivity is None else self.sensitivity * c,
        )


@dataclass(frozen=True)
class Batch:
    """B samples stacked, on one device: the :data:`BATCH_FIELDS` of :class:`Sample` with a
    leading batch axis (``prompts`` (B, T, S, V, N), ``targets`` (B, K, Z, Y, X), ...). A field
    is None unless every sample has it."""

    prompts: torch.Tensor
    targets: torch.Tensor
    multiplicative: torch.Tensor | None = None
    additive: torch.Tensor | None = None
    sensitivity: torch.Tensor | None = None
    anatomical: torch.Tensor | None = None

    @classmethod
    def collate(cls, samples: Sequence[Sample], device: str | torch.device = "cpu") -> "Batch":
        """Stack ``samples`` onto ``device``.

        A batch of one sample already on ``device`` shares its tensors' memory (``unsqueeze(0)``:
        no copy, which for a 3D mMR sample saves copying 1.3 GB per use); the package never writes
        into a batch's tensors.

        Raises:
            ValueError: no samples.
            SampleError: an item that is not a :class:`Sample`.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        for i, s in enumerate(samples):
            if not isinstance(s, Sample):
                raise SampleError(f"item {i} is a {type(s).__name__}, not a sirf_fbsem.samples.Sample "
                                  f"(build one with Sample(...) or Sample.from_dict)")
        fields: dict[str, torch.Tensor | None] = {}
        for name in BATCH_FIELDS:
            values = [getattr(s, name) for s in samples]
            if any(v is None for v in values):
                fields[name] = None
            else:
                fields[name] = (values[0].unsqueeze(0) if len(values) == 1 else torch.stack(values)).to(device)
        return cls(**fields)  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        """B."""
        return int(self.prompts.shape[0])

    @property
    def num_targets(self) -> int:
        """K."""
        return int(self.targets.shape[1])
