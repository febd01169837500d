"""OSEM / MLEM on any :class:`~sirf_fbsem.projectors.base.AcquisitionModel`.

    x <- x / sens_s * A_s^T( y_s / (A_s x + b_s) ),   s = k mod num_subsets

Subsets are views v with v % num_subsets == s, visited in order 0, 1, 2, ...
(STIR's OSMAPOSL default). MLEM is OSEM with one subset.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..autograd import em_update
from ..geometry import ImageGeometry
from ..projectors.base import AcquisitionModel

__all__ = ["OSEM", "osem", "mlem", "poisson_log_likelihood", "fov_mask"]

Callback = Callable[["OSEM"], None]


def fov_mask(image_geometry: ImageGeometry, radius_mm: float | None = None) -> torch.Tensor:
    """Boolean (Z,Y,X) mask of voxels whose centre lies inside a cylinder about the axis.

    ``radius_mm`` defaults to STIR's ray-tracing FOV radius for this image.
    """
    r = image_geometry.fov_radius_mm() if radius_mm is None else radius_mm
    _, y, x = image_geometry.centred_coordinates_mm()
    inside = (y[:, None] ** 2 + x[None, :] ** 2) <= r * r
    return torch.from_numpy(np.broadcast_to(inside, image_geometry.shape).copy())


def poisson_log_likelihood(model: AcquisitionModel, prompts: torch.Tensor, x: torch.Tensor) -> float:
    """sum_i y_i log(ybar_i) - ybar_i (the constant -log y_i! dropped), ybar = A x + b.

    Bins with ybar = 0 contribute 0 when y = 0 and -inf otherwise.
    """
    with torch.no_grad():
        ybar = model.forward(x).to(torch.float64)
        y = prompts.to(device=ybar.device, dtype=torch.float64)
        pos = ybar > 0
        if bool(((~pos) & (y > 0)).any()):
            return -math.inf
        safe = torch.where(pos, ybar, torch.ones_like(ybar))
        return float(torch.where(pos, y * torch.log(safe) - ybar, torch.zeros_like(ybar)).sum())


class OSEM:
    """Ordered-subsets EM as an object with ``update`` (one sub-iteration) and ``run``.

    Args:
        model: acquisition model (its ``num_subsets`` sets the subsets).
        prompts: measured counts, full sinogram (T,S,V,N) (or (B,T,S,V,N)).
        initial: start image (Z,Y,X); default 1 everywhere (STIR's uniform start). FBSEM targets start
            from 1 inside the FOV mask (simulation.targets.default_initial_image): pass that to compare.
        mask: optional (Z,Y,X) mask applied after each update.
    """

    def __init__(
        self,
        model: AcquisitionModel,
        prompts: torch.Tensor,
        initial: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ):
        prompts = torch.as_tensor(prompts)
        if not torch.isfinite(prompts).all():
            raise ValueError("prompts contain NaN or Inf")
        if (prompts < 0).any():
            raise ValueError(f"prompts have negative values (min {float(prompts.min()):g}); counts must be >= 0")
        if tuple(prompts.shape[-4:]) != tuple(model.sinogram_shape):
            raise ValueError(f"prompts have shape {tuple(prompts.shape)}; the model expects {model.sinogram_shape}")
        self.model = model
        self.prompts = prompts.to(device=model.device, dtype=model.dtype)
        if initial is None:
            initial = torch.ones(model.image_shape, dtype=model.dtype, device=model.device)
        initial = torch.as_tensor(initial).to(device=model.device, dtype=model.dtype)
        if tuple(initial.shape[-3:]) != tuple(model.image_shape):
            raise ValueError(f"initial image has shape {tuple(initial.shape)}; the model expects {model.image_shape}")
        self.mask = None if mask is None else torch.as_tensor(mask).to(device=model.device, dtype=model.dtype)
        self.x = initial.clone() if self.mask is None else initial * self.mask
        self.subiteration = 0
        self._subset_prompts: dict[int, torch.Tensor] = {}

    @property
    def current_subset(self) -> int:
        return self.subiteration % self.model.num_subsets

    def subset_prompts(self, subset: int) -> torch.Tensor:
        if subset not in self._subset_prompts:
            self._subset_prompts[subset] = self.model.take_subset(self.prompts, subset)
        return self._subset_prompts[subset]

    def update(self) -> torch.Tensor:
        """One sub-iteration on the current subset; returns the new estimate."""
        s = self.current_subset
        with torch.no_grad():
            x = em_update(self.x, self.subset_prompts(s), self.model, s)
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
        with tqdm(total=num_subiterations, desc="OSEM", unit="subiter", disable=not progress, leave=False) as bar:
            for _ in range(num_subiterations):
                self.update()
                bar.update(1)
                try:
                    for cb in callbacks:
                        cb(self)
                except StopIteration:
                    break
        return self.x


def osem(
    model: AcquisitionModel,
    prompts: torch.Tensor,
    num_iterations: int,
    initial: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    callbacks: Iterable[Callback] = (),
    progress: bool = False,
) -> torch.Tensor:
    """``num_iterations`` full OSEM iterations (each = ``model.num_subsets`` sub-iterations)."""
    algo = OSEM(model, prompts, initial, mask)
    return algo.run(num_iterations * model.num_subsets, callbacks, progress)


def mlem(
    model: AcquisitionModel,
    prompts: torch.Tensor,
    num_iterations: int,
    initial: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    callbacks: Iterable[Callback] = (),
    progress: bool = False,
) -> torch.Tensor:
    """MLEM: OSEM with one subset."""
    return osem(model.with_num_subsets(1), prompts, num_iterations, initial, mask, callbacks, progress)
