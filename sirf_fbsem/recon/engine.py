"""The one reconstruction loop: OSEM, MLEM and FBSEM-Net on any acquisition model.

Every entry point (``sirf-fbsem reconstruct``, the SIRF-style reconstructor classes,
evaluation, the training targets) runs this loop::

    x_0 = x_init * M                                              (start-image rule)
    x_k = U_k( x_{k-1};  y_s, A_s, b_s ),    s = (k - 1 + o) mod num_subsets,   k = 1, 2, ...

``M`` is the model's support, the voxels some LOR sees (``A^T 1 > 0``; the voxels of STIR's
cylindrical FOV and those its ray tracer reaches at the FOV's edge;
:meth:`~sirf_fbsem.projectors.base.AcquisitionModel.support`), ``x_init`` the user's start
image (default 1, STIR's uniform start), ``o`` a subset
offset (0 unless a caller moves it, as ``set_current_subset_num``), ``y_s`` the measured
counts of subset ``s``. The update ``U_k`` is a rule object:

- :class:`EMUpdate`: the (OS)EM update ``x / sens_s * A_s^T( y_s / (A_s x + b_s) )``;
- :class:`FBSEMUpdate`: stage ``k - 1`` of an FBSEM network (EM update, CNN, fusion).

Since ``A (x M) = A x``, OSEM from ``x_init M`` gives exactly STIR's iterates from ``x_init``
(voxels no LOR sees stay 0); for FBSEM it is the start image the stages were trained from.

FBSEM networks with ``start_rule = "count_matched"`` (every network trained since 0.4) first
rescale ``x_0`` so that its expected counts on subset 0 match the measured ones
(:func:`count_matched_scale`)::

    x_0 <- s x_0,    s = max( sum(y_0) - sum(b_0), sum(y_0) / 10 ) / sum_j( sens_0,j x_0,j )

``s`` is positively homogeneous in the data (``y, b -> a y, a b`` gives ``s -> a s``) and every
FBSEM stage is too, so the whole reconstruction is scale-equivariant: data a times larger give an
image a times larger, whatever unit (counts, Bq/ml) or count level the data come in.

Shapes: images (Z, Y, X) or (B, Z, Y, X); prompts (T, S, V, N) or (B, T, S, V, N), counts;
images come out in the units of the acquisition model (SIRF's: see
:mod:`sirf_fbsem.projectors.embedded`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..autograd import em_update
from ..geometry import ImageGeometry
from ..projectors.base import AcquisitionModel

if TYPE_CHECKING:  # the model layer sits above this module; only its type is named here
    from ..model.fbsem import FBSEMNet

__all__ = [
    "fov_mask",
    "start_image",
    "UpdateRule",
    "EMUpdate",
    "FBSEMUpdate",
    "IterativeReconstruction",
    "reconstruct",
    "check_prompts",
    "count_matched_scale",
]


def fov_mask(image_geometry: ImageGeometry, radius_mm: float | None = None) -> torch.Tensor:
    """Boolean (Z,Y,X) mask of voxels whose centre lies inside a cylinder about the axis.

    ``radius_mm`` defaults to STIR's ray-tracing FOV radius for this image
    (:meth:`ImageGeometry.fov_radius_mm`).
    """
    r = image_geometry.fov_radius_mm() if radius_mm is None else radius_mm
    _, y, x = image_geometry.centred_coordinates_mm()
    inside = (y[:, None] ** 2 + x[None, :] ** 2) <= r * r
    return torch.from_numpy(np.broadcast_to(inside, image_geometry.shape).copy())


def start_image(model: AcquisitionModel, initial: torch.Tensor | None = None) -> torch.Tensor:
    """The start-image rule: ``initial`` (default 1) times the model's support (``A^T 1 > 0``).

    Args:
        model: acquisition model (gives the image geometry, device and dtype).
        initial: (Z,Y,X) or (B,Z,Y,X) start image, or None for 1 everywhere.
    Returns:
        a new tensor on the model's device and dtype, 0 where no LOR sees the voxel.
    """
    mask = model.support().to(device=model.device, dtype=model.dtype)
    if initial is None:
        return mask
    initial = torch.as_tensor(initial).to(device=model.device, dtype=model.dtype)
    if tuple(initial.shape[-3:]) != tuple(model.image_shape) or initial.dim() not in (3, 4):
        raise ValueError(
            f"start image has shape {tuple(initial.shape)}; the acquisition model expects "
            f"{tuple(model.image_shape)} (z, y, x), optionally with a leading batch axis"
        )
    return initial * mask


def count_matched_scale(
    x0: torch.Tensor, prompts: torch.Tensor, additive: torch.Tensor | float, sensitivity: torch.Tensor
) -> torch.Tensor:
    """Scale that makes ``x0``'s expected counts match the measured ones on one subset, shape (B,).

    ``s = max( sum(y) - sum(b), sum(y) / 10 ) / sum_j( sens_j x0_j )`` per sample, using
    ``sum_bins A x0 = sum_j sens_j x0_j`` (adjoint identity, ``sens = A^T 1``). The floor of a
    tenth of the prompts keeps ``s > 0`` when the additive estimate exceeds the prompts (very low
    counts); a start image no LOR sees, or no prompts, gives ``s = 1``.

    Args:
        x0: start image (B, Z, Y, X).
        prompts: measured counts of the subset (B, T, S, V_s, N).
        additive: randoms + scatter of the subset, broadcastable to ``prompts`` (counts).
        sensitivity: the subset's ``A_s^T 1``, broadcastable to ``x0``.
    Returns:
        (B,) tensor on ``x0``'s device and dtype; positively homogeneous of degree 1 in
        ``(prompts, additive)`` and of degree -1 in ``x0``.
    """
    b = x0.shape[0]
    y_sum = prompts.reshape(b, -1).sum(dim=1).to(x0.dtype)
    # a broadcast view, summed without materialising a sinogram per sample
    add = torch.broadcast_to(torch.as_tensor(additive, dtype=prompts.dtype, device=prompts.device), prompts.shape)
    b_sum = (add.sum().reshape(1) if b == 1 else add.sum(dim=tuple(range(1, add.dim())))).to(x0.dtype)
    expected = (torch.broadcast_to(sensitivity.to(x0), x0.shape) * x0).reshape(b, -1).sum(dim=1)
    true_counts = torch.maximum(y_sum - b_sum, y_sum / 10)
    ok = (expected > 0) & (true_counts > 0)
    return torch.where(ok, true_counts / torch.where(ok, expected, torch.ones_like(expected)),
                       torch.ones_like(expected))


def check_prompts(prompts: torch.Tensor, model: AcquisitionModel) -> torch.Tensor:
    """``prompts`` as a tensor on the model's device/dtype, after checking shape, finiteness and sign."""
    prompts = torch.as_tensor(prompts)
    if tuple(prompts.shape[-4:]) != tuple(model.sinogram_shape) or prompts.dim() not in (4, 5):
        raise ValueError(
            f"prompts have shape {tuple(prompts.shape)}; the acquisition model expects {model.sinogram_shape} "
            "(tof, sinograms, views, tangential)"
        )
    if not torch.isfinite(prompts).all():
        raise ValueError("prompts contain NaN or Inf")
    if (prompts < 0).any():
        raise ValueError(f"prompts have negative values (min {float(prompts.min()):g}); counts must be >= 0")
    return prompts.to(device=model.device, dtype=model.dtype)


class UpdateRule(Protocol):
    """One sub-iteration ``x_k = U_k(x_{k-1})`` of :class:`IterativeReconstruction`."""

    #: short name for progress bars ("OSEM", "FBSEM")
    label: str

    def __call__(self, x: torch.Tensor, k: int, subset: int, prompts: torch.Tensor,
                 model: AcquisitionModel) -> torch.Tensor:
        """The update of sub-iteration ``k`` (0-based) on ``subset`` with that subset's ``prompts``."""
        ...


@dataclass(frozen=True)
class EMUpdate:
    """The (OS)EM update ``x / sens_s * A_s^T( y_s / (A_s x + b_s) )`` (:func:`sirf_fbsem.autograd.em_update`)."""

    label: str = "OSEM"

    def __call__(self, x: torch.Tensor, k: int, subset: int, prompts: torch.Tensor,
                 model: AcquisitionModel) -> torch.Tensor:
        return em_update(x, prompts, model, subset)


@dataclass(frozen=True)
class FBSEMUpdate:
    """Stage ``k`` of an FBSEM network (:class:`sirf_fbsem.model.fbsem.FBSEMStage`).

    Stage ``k`` was trained on subset ``k mod num_subsets``; the loop's subset must match
    (a different one is refused, since the stage's CNN and beta were trained for it).

    Args:
        net: the network (its ``num_subsets`` must be the model's).
        anatomical: (Z,Y,X) or (B,Z,Y,X) anatomical image for PET+MR networks, else None.
        sensitivities: precomputed subset sensitivities (num_subsets,Z,Y,X) or
            (B,num_subsets,Z,Y,X), or None to let the model compute (and cache) them.
    """

    net: "FBSEMNet"
    anatomical: torch.Tensor | None = None
    sensitivities: torch.Tensor | None = None
    label: str = "FBSEM"

    def __call__(self, x: torch.Tensor, k: int, subset: int, prompts: torch.Tensor,
                 model: AcquisitionModel) -> torch.Tensor:
        if k >= self.net.num_stages:
            raise ValueError(f"sub-iteration {k + 1}: the FBSEM model has only {self.net.num_stages} stages")
        if subset != self.net.subset_of_stage(k):
            raise ValueError(f"FBSEM stage {k} was trained on subset {self.net.subset_of_stage(k)}; "
                             f"subset {subset} cannot be used")
        if self.net.uses_anatomical and self.anatomical is None:
            raise ValueError("this FBSEM model needs an anatomical image (its regulariser has 2 input channels)")
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        anat = None
        if self.anatomical is not None:
            anat = self.anatomical.to(device=x.device, dtype=x.dtype)
            anat = anat.unsqueeze(0) if anat.dim() == 3 else anat
        sens = None
        if self.sensitivities is not None:
            sens = self.sensitivities[..., subset, :, :, :].to(device=x.device, dtype=x.dtype)
        out = self.net.run_stage(k, xb, prompts, model, sens, anat)
        return out[0] if single else out


Callback = Callable[["IterativeReconstruction"], None]


class IterativeReconstruction:
    """The loop of the module docstring, one sub-iteration per :meth:`update`.

    Args:
        model: acquisition model; its ``num_subsets`` sets the subsets.
        prompts: measured counts, full sinogram (T,S,V,N) or (B,T,S,V,N).
        rule: the update (:class:`EMUpdate`, :class:`FBSEMUpdate`).
        initial: start image before the support mask (default 1); see :func:`start_image`.
        mask: optional (Z,Y,X) mask applied after every update.
        post_update: optional ``f(x_old, x_new) -> x`` applied after every update (e.g.
            STIR's relative-change limits).
    """

    def __init__(
        self,
        model: AcquisitionModel,
        prompts: torch.Tensor,
        rule: UpdateRule | None = None,
        initial: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        post_update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model = model
        self.rule: UpdateRule = rule if rule is not None else EMUpdate()
        self.prompts = check_prompts(prompts, model)
        self.mask = None if mask is None else torch.as_tensor(mask).to(device=model.device, dtype=model.dtype)
        x = start_image(model, initial)
        self.x = x if self.mask is None else x * self.mask
        self.post_update = post_update
        self.subiteration = 0
        self.subset_offset = 0
        self._subset_prompts: dict[int, torch.Tensor] = {}

    @property
    def current_subset(self) -> int:
        """The subset the next update uses."""
        return (self.subiteration + self.subset_offset) % self.model.num_subsets

    def subset_prompts(self, subset: int) -> torch.Tensor:
        """Measured counts of a subset's views (cached)."""
        if subset not in self._subset_prompts:
            self._subset_prompts[subset] = self.model.take_subset(self.prompts, subset)
        return self._subset_prompts[subset]

    def update(self) -> torch.Tensor:
        """One sub-iteration on the current subset; returns the new estimate."""
        s = self.current_subset
        with torch.no_grad():
            x = self.rule(self.x, self.subiteration, s, self.subset_prompts(s), self.model)
            if self.post_update is not None:
                x = self.post_update(self.x, x)
            if self.mask is not None:
                x = x * self.mask
        self.x = x
        self.subiteration += 1
        return x

    def run(self, num_subiterations: int, callbacks: Iterable[Callback] = (), progress: bool = True) -> torch.Tensor:
        """Run sub-iterations; each callback sees this object after every update.

        A callback stops the run early by raising StopIteration (as CIL's Algorithm.run).
        """
        callbacks = list(callbacks)
        with tqdm(total=num_subiterations, desc=self.rule.label, unit="subiter", disable=not progress,
                  leave=False) as bar:
            for _ in range(num_subiterations):
                self.update()
                bar.update(1)
                try:
                    for cb in callbacks:
                        cb(self)
                except StopIteration:
                    break
        return self.x


def reconstruct(
    model: AcquisitionModel,
    prompts: torch.Tensor,
    rule: UpdateRule,
    num_subiterations: int,
    initial: torch.Tensor | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """``num_subiterations`` updates of ``rule`` from the start-image rule; the final image."""
    return IterativeReconstruction(model, prompts, rule, initial, **kwargs).run(num_subiterations, progress=progress)
