"""How many Poisson counts a sinogram holds, estimated from its noise whatever unit it is in.

FBSEM stages weigh their CNN proposal against the data with a strength that may depend on the
count level (:class:`~sirf_fbsem.model.fbsem.FBSEMStage`, ``beta_counts = "log_linear"``). The
total of the prompts cannot be that level: data in Bq/ml or multiplied by any factor ``a`` would
change it, and the networks must stay scale-equivariant (``y, b -> a y, a b`` gives ``x -> a x``).
The noise tells the unit instead. Prompts in units ``u`` (``y = u n``, ``n`` Poisson counts) have
``Var(y_i) = u E[y_i]``. Neighbouring bins differ in mean too, mostly through the multiplicative
factors (detector efficiencies, attenuation, the LOR's path through the image), so each bin is first
divided by ``m_i = (A M)_i``, the projection of the model's support ``M`` (which carries those
factors), after removing the additive term ``b``::

    z_i = (y_i - b_i) / m_i,       Var(z_i) = u E[y_i] / m_i^2

and over the pairs ``P`` of measured neighbours along the tangential axis (``m > 0`` for both),
with weights ``w = 1 / (1/m_i^2 + 1/m_{i+1}^2)`` that keep every pair's terms of the order of its
counts::

    u_hat = sum_P w (z_i - z_{i+1})^2 / sum_P w (y_i / m_i^2 + y_{i+1} / m_{i+1}^2)   (the count unit)
    N_hat = sum_{m > 0} y / u_hat                                                   (counts)

``N_hat`` is invariant under ``y, b -> a y, a b`` and under any constant factor on ``m`` (exactly, not
only in expectation). For Poisson data it is close to the counts where the ratio of the activity's
projection to the support's, ``E[z]``, changes little from bin to bin; where it changes a lot (very
high counts per bin, sharp edges) the squared change adds to the first sum and ``N_hat`` is
smaller than the counts. It is a monotone count-level feature, not a calibrated count rate: models
learn how to use it. Bins no LOR measures (``m = 0``: gaps between detector blocks, LORs missing
the FOV) hold no counts whatever the activity and are left out.

Why it is written here: it is a few tensor reductions; no library offers a count estimate from
one Poisson realisation in unknown units.
"""
from __future__ import annotations

import math

import torch

__all__ = ["estimated_counts", "log_count_level", "COUNT_REFERENCE", "LOG_COUNT_LIMIT", "SINOGRAMS_PER_BLOCK"]

#: the count level at which a count-aware strength equals softplus(rho) (counts); recorded in
#: model files (``network.beta_count_reference``)
COUNT_REFERENCE = 1.0e7
#: ``|ln(N_hat / N_ref)|`` is clipped here: data with no pair that differs (e.g. no counts at
#: all, or constant bins) give an infinite or undefined estimate
LOG_COUNT_LIMIT = 20.0
#: sinograms per block of :func:`estimated_counts`' sums (an mMR subset's block: 64 x 36 views x 344
#: bins, 6.3 MB in float64)
SINOGRAMS_PER_BLOCK = 64


def estimated_counts(prompts: torch.Tensor, additive: torch.Tensor | float, support_projection: torch.Tensor,
                     sinograms_per_block: int | None = SINOGRAMS_PER_BLOCK) -> torch.Tensor:
    """``N_hat`` (module docstring) per sample, shape (B,), in counts.

    Args:
        prompts: measured sinogram ``y`` (B, T, S, V, N) or (T, S, V, N) in any unit (counts, or
            counts times a constant).
        additive: ``b``, randoms + scatter in the prompts' unit, broadcastable to ``prompts``.
        support_projection: ``m = A M`` (:meth:`~sirf_fbsem.projectors.base.AcquisitionModel.support_projection`),
            broadcastable to ``prompts``; bins with ``m <= 0`` are left out.
        sinograms_per_block: the sums run over blocks of this many sinograms (axis S), whose float64
            temporaries stay cache-sized; None: one block (the same sums, slower on large sinograms:
            ``pipelines/bench_count_level.py``).
    Returns:
        (B,) float tensor (B = 1 for an unbatched sinogram): ``inf`` where no pair of measured
        neighbours differs while the bins hold counts, ``0`` where they hold none; scale-invariant.
    """
    y = prompts if prompts.dim() == 5 else prompts.unsqueeze(0)
    b = torch.broadcast_to(torch.as_tensor(additive, device=y.device), y.shape)
    m = torch.broadcast_to(support_projection.to(device=y.device), y.shape)
    squared = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    spread, total = torch.zeros_like(squared), torch.zeros_like(squared)
    step = y.shape[2] if sinograms_per_block is None else int(sinograms_per_block)
    if step < 1:
        raise ValueError(f"sinograms_per_block must be a positive number of sinograms or None, got {sinograms_per_block!r}")
    for start in range(0, y.shape[2], step):
        block = slice(start, start + step)
        sums = _pair_sums(y[:, :, block], b[:, :, block], m[:, :, block])
        squared, spread, total = squared + sums[0], spread + sums[1], total + sums[2]
    zero = torch.zeros((), dtype=torch.float64, device=y.device)
    # total / u_hat = total * spread / squared; 0 counts -> 0, no difference between neighbours -> inf
    counts = torch.where(squared > 0, total * spread / torch.where(squared > 0, squared, torch.ones_like(squared)),
                         torch.where(total > 0, torch.full_like(total, math.inf), zero))
    return counts.to(prompts.dtype if prompts.dtype.is_floating_point else torch.float32)


def _pair_sums(y: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample (B,): ``sum_P w (z_i - z_{i+1})^2``, ``sum_P w (y_i/m_i^2 + y_{i+1}/m_{i+1}^2)`` and
    ``sum_{m>0} y`` (module docstring) over a block (B, T, S_block, V, N), in float64."""
    y, b, m = y.to(torch.float64), b.to(torch.float64), m.to(torch.float64)
    measured = m > 0
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    inv_m = torch.where(measured, 1.0 / torch.where(measured, m, torch.ones_like(m)), zero)
    z = (y - b) * inv_m
    v = y * inv_m**2  # Var(z) / u
    pair = measured[..., 1:] & measured[..., :-1]
    w = torch.where(pair, 1.0 / torch.where(pair, inv_m[..., 1:] ** 2 + inv_m[..., :-1] ** 2, torch.ones_like(z[..., 1:])),
                    zero)
    dims = tuple(range(1, y.dim()))
    return ((w * (z[..., 1:] - z[..., :-1]) ** 2).sum(dim=dims), (w * (v[..., 1:] + v[..., :-1])).sum(dim=dims),
            torch.where(measured, y, zero).sum(dim=dims))


def log_count_level(counts: torch.Tensor, reference: float = COUNT_REFERENCE) -> torch.Tensor:
    """``clip( ln(counts / reference), -LOG_COUNT_LIMIT, LOG_COUNT_LIMIT )``, elementwise (0 counts give
    the lower limit, ``inf`` the upper)."""
    if not (math.isfinite(reference) and reference > 0):
        raise ValueError(f"the count reference must be a finite number > 0, got {reference!r}")
    ratio = counts.to(torch.float64) / float(reference)
    out = torch.log(ratio).nan_to_num(nan=0.0, posinf=LOG_COUNT_LIMIT, neginf=-LOG_COUNT_LIMIT)
    return out.clamp(-LOG_COUNT_LIMIT, LOG_COUNT_LIMIT).to(counts.dtype)
