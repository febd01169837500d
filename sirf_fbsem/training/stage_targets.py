"""What each stage is trained against, and in which image units: a view of a dataset of
:class:`~sirf_fbsem.samples.Sample` that swaps targets and rescales images.

Target rules (:class:`TargetRule`):

* ``osem`` (default; iteration-dependent targets, Corda-D'Incan et al. 2022): stage k (0-based)
  against noise-free OSEM sub-iterate ``(k+1) S`` of the sample, i.e. ``targets[(k+1) S - 1]``.
  ``S`` (``stride``, default 1) lets K stages follow a longer noise-free run: with S = 8, K = 12
  and 6 subsets the last target is 96 sub-iterations (16 iterations) in. Needs K S simulated targets.
* ``truth`` (fixed targets, as FBSEM-Net of Mehranian & Reader 2021): every stage against the
  ground-truth ``phantom``.

Image units (``units``): ``as_simulated`` (default) leaves the sample as it is; ``phantom_mean``
expresses it in units of c = mean of the phantom over its support, :meth:`Sample.in_units`
(images / c; multiplicative factors and sensitivities x c; prompts and the forward model
unchanged). The networks are scale-equivariant, so this only reweights the loss across samples
of different activity; the ``scaled_mse`` loss does the same from the data alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from ..samples import Sample

__all__ = ["TargetRule", "StageTargets", "TARGET_KINDS", "IMAGE_UNITS"]

TARGET_KINDS: tuple[str, ...] = ("osem", "truth")
IMAGE_UNITS: tuple[str, ...] = ("as_simulated", "phantom_mean")


@dataclass(frozen=True)
class TargetRule:
    """Stage k's target: ``osem`` sub-iterate (k+1)*stride, or the ``truth`` (module docstring)."""

    kind: Literal["osem", "truth"] = "osem"
    stride: int = 1
    units: Literal["as_simulated", "phantom_mean"] = "as_simulated"

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"targets must be one of {TARGET_KINDS}, got {self.kind!r}")
        if int(self.stride) != self.stride or self.stride < 1:
            raise ValueError(f"the target stride must be an integer >= 1, got {self.stride}")
        if self.kind == "truth" and self.stride != 1:
            raise ValueError("a target stride applies to osem targets; truth targets are the same at every stage")
        if self.units not in IMAGE_UNITS:
            raise ValueError(f"image units must be one of {IMAGE_UNITS}, got {self.units!r}")

    @property
    def is_default(self) -> bool:
        """The samples as simulated: ``targets[k]`` for stage k."""
        return self == TargetRule()

    def targets_needed(self, num_stages: int) -> int:
        """How many simulated OSEM sub-iterates K stages need (0 for ``truth``)."""
        return 0 if self.kind == "truth" else num_stages * self.stride

    def subiterates(self, num_stages: int) -> list[int] | None:
        """The noise-free OSEM sub-iterate (1-based) of each stage's target; None for ``truth``."""
        return None if self.kind == "truth" else [(k + 1) * self.stride for k in range(num_stages)]

    def apply(self, sample: Sample, num_stages: int, where: str = "sample") -> Sample:
        """``sample`` with its ``num_stages`` targets (K, Z, Y, X) under this rule, in its units.

        Raises:
            ValueError: fewer simulated targets than the rule needs, or no phantom where one is needed
                (named with ``where``).
        """
        if self.kind == "osem" and sample.num_targets < self.targets_needed(num_stages):
            raise ValueError(f"{where} has {sample.num_targets} targets (noise-free OSEM sub-iterates); "
                             f"{num_stages} stages with stride {self.stride} need {self.targets_needed(num_stages)}")
        if (self.kind == "truth" or self.units == "phantom_mean") and sample.phantom is None:
            raise ValueError(f"{where} has no phantom: targets {self.kind!r} with units {self.units!r} need one")
        if self.units == "phantom_mean":
            support = sample.phantom[sample.phantom > 0]
            if support.numel() == 0:
                raise ValueError(f"{where}: the phantom is 0 everywhere; its mean over its support is undefined")
            sample = sample.in_units(float(support.mean()))
        if self.kind == "truth":
            image = sample.phantom
            return sample.replace(targets=image.unsqueeze(0).expand((num_stages,) + tuple(image.shape)).clone())
        return sample.replace(targets=sample.targets[[s - 1 for s in self.subiterates(num_stages)]])

    def as_dict(self, num_stages: int) -> dict[str, Any]:
        """The rule as recorded in a model's metadata."""
        return {"targets": self.kind, "target_stride": self.stride,
                "target_subiterates": self.subiterates(num_stages), "image_units": self.units}


class StageTargets(torch.utils.data.Dataset):
    """``base[i]`` under ``rule``, for a network of ``num_stages`` stages (:meth:`TargetRule.apply`)."""

    def __init__(self, base: Sequence[Sample], rule: TargetRule, num_stages: int):
        self.base, self.rule, self.num_stages = base, rule, int(num_stages)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def start_rule(self) -> str | None:
        """The start rule of the base dataset's OSEM targets (None for ``truth`` targets, which have none)."""
        if self.rule.kind == "truth":
            return None
        return getattr(self.base, "start_rule", None)  # a plain list of samples has none

    def __getitem__(self, i: int) -> Sample:
        return self.rule.apply(self.base[i], self.num_stages, where=f"sample {i}")
