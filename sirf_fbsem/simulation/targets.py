"""Iteration-dependent training targets: OSEM sub-iterates of the noise-free data.

Sequential FBSEM training matches stage k to the k-th OSEM sub-iterate of the
noise-free data (Corda-D'Incan et al.), computed with the same subsets, the same
subset order (0, 1, 2, ..., as :class:`sirf_fbsem.recon.OSEM`) and the same start
image as the network's unrolled reconstruction::

    x_0 = s initial,   x_k = x_{k-1} / sens_s * A_s^T( ybar_s / (A_s x_{k-1} + b_s) ),   s = (k-1) mod num_subsets

with ``ybar`` the noise-free mean prompts and ``s`` the network's start rule
(:meth:`sirf_fbsem.model.fbsem.FBSEMNet.scaled_start`): the count-matched scale of
:func:`~sirf_fbsem.recon.engine.count_matched_scale` on subset 0 (``start_rule="count_matched"``),
or 1 (``"none"``, datasets made before 0.4). The ground-truth phantom (scaled to the
same units) is stored beside them by :mod:`.dataset`.
"""
from __future__ import annotations

import torch

from ..projectors.base import AcquisitionModel
from ..recon.engine import count_matched_scale, start_image
from ..recon.osem import OSEM

__all__ = ["osem_targets", "default_initial_image", "START_RULE_OF_DATASET"]

#: manifest ``initial_image`` -> the start rule of networks trained on the dataset
START_RULE_OF_DATASET = {"support": "none", "support_count_matched": "count_matched"}


def default_initial_image(model: AcquisitionModel) -> torch.Tensor:
    """The start image of the targets and of FBSEM (the engine's rule): 1 where some LOR sees the voxel, else 0."""
    return start_image(model)


def osem_targets(
    model_with_terms: AcquisitionModel,
    noise_free_prompts: torch.Tensor,
    num_stages: int,
    initial: torch.Tensor | None = None,
    start_rule: str = "count_matched",
) -> torch.Tensor:
    """The first ``num_stages`` OSEM sub-iterates of ``noise_free_prompts``: (K, Z, Y, X).

    Args:
        model_with_terms: the acquisition model with this sample's multiplicative factors
            and additive term; its ``num_subsets`` sets the subsets.
        noise_free_prompts: mean prompts (T, S, V, N).
        num_stages: K, the number of sub-iterations (FBSEM stages).
        initial: start image (Z, Y, X); default :func:`default_initial_image`.
        start_rule: ``"count_matched"`` (``initial`` rescaled to match the counts of subset 0,
            as the network's stage 0 does) or ``"none"``.

    Target k (0-based) is the image after k + 1 updates, the first on subset 0.
    """
    if int(num_stages) != num_stages or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages}")
    if start_rule not in ("count_matched", "none"):
        raise ValueError(f"start_rule must be 'count_matched' or 'none', got {start_rule!r}")
    if initial is None:
        initial = default_initial_image(model_with_terms)
    if start_rule == "count_matched":
        x0 = torch.as_tensor(initial).to(device=model_with_terms.device, dtype=model_with_terms.dtype)
        y0 = model_with_terms.take_subset(torch.as_tensor(noise_free_prompts).to(x0), 0)
        scale = count_matched_scale(x0[None], y0[None], model_with_terms.additive_term(0).to(x0),
                                    model_with_terms.sensitivity(0))
        initial = x0 * scale[0]
    algo = OSEM(model_with_terms, noise_free_prompts, initial=initial)
    shape = (int(num_stages),) + tuple(model_with_terms.image_shape)
    out = torch.empty(shape, dtype=algo.x.dtype, device=algo.x.device)
    for k in range(int(num_stages)):
        out[k] = algo.update()
    return out
