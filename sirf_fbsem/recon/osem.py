"""OSEM / MLEM on any :class:`~sirf_fbsem.projectors.base.AcquisitionModel`.

    x <- x / sens_s * A_s^T( y_s / (A_s x + b_s) ),   s = k mod num_subsets

Subsets are views v with v % num_subsets == s, visited in order 0, 1, 2, ...
(STIR's OSMAPOSL default). MLEM is OSEM with one subset.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..projectors.base import AcquisitionModel
from .engine import Callback, EMUpdate, IterativeReconstruction, fov_mask

__all__ = ["OSEM", "osem", "mlem", "poisson_log_likelihood", "fov_mask"]


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


class OSEM(IterativeReconstruction):
    """Ordered-subsets EM: the engine's loop (:mod:`.engine`) with the EM update.

    Args:
        model: acquisition model (its ``num_subsets`` sets the subsets).
        prompts: measured counts, full sinogram (T,S,V,N) (or (B,T,S,V,N)).
        initial: start image (Z,Y,X) before the start-image rule's FOV mask; default 1
            (STIR's uniform start). The FBSEM stages and their targets start from the same image.
        mask: optional (Z,Y,X) mask applied after each update.
    """

    def __init__(
        self,
        model: AcquisitionModel,
        prompts: torch.Tensor,
        initial: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ):
        super().__init__(model, prompts, EMUpdate(), initial=initial, mask=mask)


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
