"""Forward and back projection as ``torch.autograd.Function``s, and the EM update built on them.

Both Functions take any :class:`~sirf_fbsem.projectors.base.AcquisitionModel`
(embedded or SIRF), so the FBSEM code never knows which backend runs. Each is the
other's backward: d(A x)/dx applied to g is A^T g, and d(A^T y)/dy applied to g is A g.
The model's own calls run without autograd (numba/SIRF cannot be traced), and
nothing is kept between calls but the model and the subset index, so one model can
be reused across many unrolled stages and batch items safely.
"""
from __future__ import annotations

import torch

from .projectors.base import AcquisitionModel

__all__ = ["ForwardProject", "BackProject", "forward_project", "back_project", "em_update", "MAX_QUOTIENT"]


class ForwardProject(torch.autograd.Function):
    """y = A_s x (linear part); backward: A_s^T g."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, model: AcquisitionModel, subset: int | None) -> torch.Tensor:  # type: ignore[override]
        ctx.model, ctx.subset = model, subset
        ctx.x_dtype, ctx.x_device = x.dtype, x.device
        with torch.no_grad():
            return model.direct(x.detach(), subset).to(dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        g = BackProject.apply(grad, ctx.model, ctx.subset) if ctx.needs_input_grad[0] else None
        if g is not None:
            g = g.to(dtype=ctx.x_dtype, device=ctx.x_device)
        return g, None, None


class BackProject(torch.autograd.Function):
    """x = A_s^T y; backward: A_s g."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, model: AcquisitionModel, subset: int | None) -> torch.Tensor:  # type: ignore[override]
        ctx.model, ctx.subset = model, subset
        ctx.y_dtype, ctx.y_device = y.dtype, y.device
        with torch.no_grad():
            return model.adjoint(y.detach(), subset).to(dtype=y.dtype, device=y.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        g = ForwardProject.apply(grad, ctx.model, ctx.subset) if ctx.needs_input_grad[0] else None
        if g is not None:
            g = g.to(dtype=ctx.y_dtype, device=ctx.y_device)
        return g, None, None


def forward_project(x: torch.Tensor, model: AcquisitionModel, subset: int | None = None) -> torch.Tensor:
    """Differentiable ``A_s x``: (B,Z,Y,X) or (Z,Y,X) -> (B,T,S,V_s,N) or (T,S,V_s,N)."""
    return ForwardProject.apply(x, model, subset)


def back_project(y: torch.Tensor, model: AcquisitionModel, subset: int | None = None) -> torch.Tensor:
    """Differentiable ``A_s^T y``: sinogram -> image."""
    return BackProject.apply(y, model, subset)


#: largest measured/expected ratio in the EM update (STIR's ``max_quotient`` in ``divide_and_truncate``)
MAX_QUOTIENT = 10000.0


def em_update(
    x: torch.Tensor,
    prompts: torch.Tensor,
    model: AcquisitionModel,
    subset: int | None = None,
    sensitivity: torch.Tensor | None = None,
) -> torch.Tensor:
    """One (OS)EM update, differentiable in ``x``::

        x_em = x / sens_s * A_s^T( y_s / (A_s x + b_s) )

    ``prompts`` are the measured counts of the subset's views, (B,T,S,V_s,N) or
    (T,S,V_s,N). Voxels with zero sensitivity get 0 (as STIR); bins whose mean is 0
    contribute 0 to the ratio. The ratio is capped at :data:`MAX_QUOTIENT` (as STIR's
    ``divide_and_truncate``): near the FOV's edge a mean of a few 1e-40 (an additive estimate
    of 0 there, e.g. randoms from few delayeds) would otherwise overflow float32 to inf, and
    ``0 * inf`` in the back projection gives NaN voxels.
    """
    sens = model.sensitivity(subset) if sensitivity is None else sensitivity
    sens = sens.to(dtype=x.dtype, device=x.device)
    ybar = forward_project(x, model, subset) + model.additive_term(subset).to(dtype=x.dtype, device=x.device)
    positive = ybar > 0
    safe = torch.where(positive, ybar, torch.ones_like(ybar))
    ratio = torch.where(positive, prompts.to(dtype=x.dtype, device=x.device) / safe, torch.zeros_like(ybar))
    ratio = ratio.clamp(max=MAX_QUOTIENT)
    back = back_project(ratio, model, subset)
    has_sens = sens > 0
    safe_sens = torch.where(has_sens, sens, torch.ones_like(sens))
    return torch.where(has_sens, x * back / safe_sens, torch.zeros_like(back))
