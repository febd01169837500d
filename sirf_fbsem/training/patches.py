"""Patch-sampled training of one FBSEM stage (sequential mode): exact losses on random crops.

In sequential training stage ``k`` is trained alone on the detached output ``x`` of the
stages before it, so everything the stage computes that does not depend on its
parameters is fixed per sample: the OSEM sub-update ``x_em``, the sensitivity ``sens_s``,
the CNN's intensity scale ``c = mean_FOV(x)`` (``c_u`` of an anatomical image) and beta's
unit ``mean_FOV(sens_s) / mean_FOV(x)`` (:class:`~sirf_fbsem.model.fbsem.StageTerms`). The
fusion is voxel-wise and the CNN convolutional (receptive-field radius ``R``), so the
stage's output on a region ``P`` is, exactly (:meth:`~sirf_fbsem.model.fbsem.FBSEMStage.output_on`)::

    x_next[P] = fusion( x_em[P], c * relu(x/c + f(x[P ⊕ R ∩ V] / c))[P], sens_s[P], beta * unit )

and the loss of a step is, over the samples ``i`` of the batch and ``n`` patches ``P_ij`` each::

    L = 1 / (B n) * sum_i sum_j mean_{v in P_ij} ( x_next_i[v] - target_i[v] )^2

an unbiased estimate (up to where the patches may lie) of the whole-volume MSE. A step then
costs no projection and a CNN on ``n`` grown patches instead of the volume; each patch is
back-propagated as soon as its loss is known, so memory is one patch.

Patches (:func:`draw_patches`) have the configured shape (cut to the image where it is
smaller), lie inside the image, and have their centres uniform over the bounding box of the
field of view (voxels with ``sens_s > 0``), so they are not empty; they are a pure function of
(seed, stage, epoch, sample), so a resumed run draws the same ones.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Mapping, Sequence

import numpy as np
import torch

from ..distributed import DistContext
from ..model.blockwise import Region
from ..model.fbsem import FBSEMStage, StageTerms

#: the per-sample tensors of :class:`StageTerms`, as payloads hold them
TERM_NAMES = tuple(f.name for f in fields(StageTerms))

__all__ = ["draw_patches", "patch_training_step", "terms_payload", "terms_from_payload", "average_gradients"]


def draw_patches(
    box: Region,
    image_shape: Sequence[int],
    patch_shape: Sequence[int],
    count: int,
    seed: int,
    stage: int,
    epoch: int,
    sample: int,
) -> list[Region]:
    """``count`` regions of ``patch_shape`` (z, y, x voxels; cut to ``image_shape`` where larger) inside the
    image, centres uniform over ``box`` (z, y, x slices, e.g. the FOV's bounding box).

    A pure function of its arguments (a generator seeded by (seed, stage, epoch, sample)).
    """
    words = [int(seed), int(stage) + 1, int(epoch), int(sample), 0x9A7C]  # the last word: not _epoch_order's stream
    s = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)
    gen = torch.Generator().manual_seed(s)
    lows = [int(b.start) for b in box]
    spans = [max(1, int(b.stop) - int(b.start)) for b in box]
    centres = torch.stack([lo + torch.randint(span, (count,), generator=gen) for lo, span in zip(lows, spans)], dim=1)
    regions: list[Region] = []
    for centre in centres.tolist():
        sl = []
        for c, p, n in zip(centre, patch_shape, image_shape):
            p = min(int(p), int(n))
            lo = min(max(c - p // 2, 0), int(n) - p)
            sl.append(slice(lo, lo + p))
        regions.append((sl[0], sl[1], sl[2]))
    return regions


def patch_training_step(
    stage: FBSEMStage,
    items: Sequence[tuple[StageTerms, torch.Tensor, Sequence[Region]]],
    loss_scale: float = 1.0,
    sample_weights: Sequence[float] | None = None,
) -> float:
    """Forward and backward of the patch loss ``L`` (module docstring): gradients accumulate in ``.grad``.

    Args:
        stage: the stage trained.
        items: per sample: its terms (batch of one), its target (1, Z, Y, X) and its patches.
        loss_scale: the loss is multiplied by this before each backward pass (a rank's share
            of a global batch).
        sample_weights: per item, a factor on its patches' squared errors (``1/c^2`` of the
            ``scaled_mse`` loss, :func:`sirf_fbsem.training.trainers.sample_scales`); None: 1.
    Returns:
        the (unscaled) loss ``L``: the mean over all patches of their (weighted) mean squared error.
    """
    n = sum(len(regions) for _, _, regions in items)
    if n == 0:
        raise ValueError("patch_training_step needs at least one patch")
    if sample_weights is not None and len(sample_weights) != len(items):
        raise ValueError(f"{len(sample_weights)} sample weights for {len(items)} items")
    total = 0.0
    for j, (terms, target, regions) in enumerate(items):
        w = 1.0 if sample_weights is None else float(sample_weights[j])
        for region in regions:
            out = stage.output_on(terms, region)
            loss = w * torch.mean((out - target[(Ellipsis, *region)]) ** 2)
            (loss * (loss_scale / n)).backward()  # frees this patch's graph: memory is one patch
            total += float(loss.detach())
    return total / n


def average_gradients(module: torch.nn.Module, dist_ctx: DistContext) -> None:
    """Average ``module``'s parameter gradients over the ranks (what ``DistributedDataParallel`` does
    in its backward pass; the patch step does not run through its forward). Missing gradients count as 0."""
    if not dist_ctx.is_distributed:
        return
    import torch.distributed as dist

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(dist_ctx.comm_device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(params[0].device) / dist_ctx.world_size
    lo = 0
    for p in params:
        n = p.numel()
        p.grad = flat[lo : lo + n].view_as(p).to(p.dtype).clone()
        lo += n


def terms_payload(
    terms: StageTerms, target: torch.Tensor, loss_scale: torch.Tensor | float | None = None
) -> dict[str, torch.Tensor]:
    """A plain dict of tensors (``torch.save``-able, loadable with ``weights_only``) of one sample's terms
    (batch of one), its target (1, Z, Y, X), its FOV box (3, 2) int64 and, for the ``scaled_mse``
    loss, its scale ``c`` (``loss_scale``, a scalar tensor).

    Every tensor owns just its elements: the target is one of a sample's K targets and the
    sensitivity one of its subsets', views of larger tensors that ``torch.save`` would write whole
    (a 3D mMR payload: 424 MB instead of 33 MB at K = 42)."""
    box = terms.fov_box()
    out = {"target": _compact(target),
           "fov_box": torch.tensor([[b.start, b.stop] for b in box], dtype=torch.int64)}
    if loss_scale is not None:
        out["loss_scale"] = torch.as_tensor(loss_scale, dtype=torch.float64).reshape(())
    for name in TERM_NAMES:
        value = getattr(terms, name)
        if value is not None:
            out[name] = _compact(value)
    return out


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is contiguous and its storage holds nothing else, else a compact copy."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def terms_from_payload(
    payload: Mapping[str, torch.Tensor], device: str | torch.device
) -> tuple[StageTerms, torch.Tensor, Region]:
    """Inverse of :func:`terms_payload`, on ``device``: (terms, target, FOV box)."""
    terms = StageTerms(
        **{name: (payload[name].to(device) if name in payload else None)
           for name in TERM_NAMES}
    )
    b = payload["fov_box"].tolist()
    return terms, payload["target"].to(device), (slice(*b[0]), slice(*b[1]), slice(*b[2]))
