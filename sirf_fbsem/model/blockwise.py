"""Block-wise application of a convolutional body: memory bounded by the block, output unchanged.

After "memory-efficient model-based deep learning for high-resolution 3D non-Cartesian
MRI": the volume is tiled into blocks, each block goes through the network under
gradient checkpointing, and the blocks' outputs are put back together into the volume
the data-consistency step (here the MAP-EM fusion) needs.

A stack of ``L`` "same"-padded convolutions of kernel ``k`` has the receptive-field
radius ``R = L * (k // 2)`` voxels: an output voxel depends on the input voxels within
``R`` of it (a ``(2R+1)^3`` cube, or ``(2R+1)^2`` in its own slice for 2D convolutions).
So the body's output on a block ``B`` (``[z0,z1) x [y0,y1) x [x0,x1)``) is::

    f(h)[B] = f( h[B ⊕ R ∩ V] )[B - origin]

with ``B ⊕ R ∩ V`` the block grown by ``R`` on every side **and clipped to the volume**
``V``: past the volume's edge the whole-volume network zero-pads every layer, which the
cropped network does too at the same place, so the equality is exact there as well
(zero-padding the input once by ``R`` would not be: a convolution with a bias is not
zero on zero input). Between blocks only rounding differs (~1e-7 relative in float32).

Memory (one sample, ``C`` hidden channels, ``L`` layers, gradients on): the whole-volume
body saves about ``(L - 1) C`` activation volumes for the backward pass; block-wise, the
forward pass saves nothing inside the body (``torch.utils.checkpoint``, non-reentrant:
each block's input crop, a view of ``h``, is kept, and its activations are recomputed in
the backward pass one block at a time), so the peak is ``(L - 1) C`` activations of one
grown block, ``prod(b_i + 2 R_i)`` voxels, on top of what lies outside the body (a few
one-channel volumes). The price: every block is computed twice (forward and recompute),
and the margins are computed by every block that overlaps them, a factor
``prod((b_i + 2 R_i) / b_i)`` of convolution work (blocks of 32^3 with R = 5: 2.3; of 64^3:
1.6). The backward pass of each crop also writes a volume-sized gradient of ``h`` (autograd's
slice backward), so blocks much smaller than the volume cost ``O(blocks x volume)`` extra.

CPU speed: PyTorch runs a float32 convolution with oneDNN only when its input's
``N * C * D * H`` exceeds 20480, else with a native kernel 3-10 times slower, which a block
or a patch of 16 channels under ~36^2 voxels in (z, y) would get; so
:class:`~sirf_fbsem.model.regularisers.ResidualCNN` calls oneDNN directly for blocks and
patches (``conv_relu_stack(..., onednn=True)``).

Shapes: ``h`` is ``(B, C, Z, Y, X)``; the body maps ``(B, C, z, y, x)`` crops to
``(B, z, y, x)``. Block shapes are in voxels, ``(z, y, x)``.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Region",
    "check_block_shape",
    "receptive_radius",
    "block_regions",
    "grown_region",
    "apply_blockwise",
]

#: a box of voxels ``(z, y, x)`` as three slices with explicit, non-negative start and stop
Region = tuple[slice, slice, slice]
Body = Callable[[torch.Tensor], torch.Tensor]


def check_block_shape(block_shape: Sequence[int] | None, name: str = "block_shape") -> tuple[int, int, int] | None:
    """``block_shape`` as a tuple of three positive ints ``(z, y, x)`` (voxels), or None.

    Raises:
        ValueError: naming ``name``, what was expected and what came.
    """
    if block_shape is None:
        return None
    try:
        values = tuple(block_shape)
    except TypeError:
        values = ()
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be None or three positive integers (z, y, x) in voxels, got {block_shape!r}")
    return (int(values[0]), int(values[1]), int(values[2]))


def receptive_radius(layers: int, kernel: int, dims: int) -> tuple[int, int, int]:
    """Receptive-field radius ``(R_z, R_y, R_x)`` in voxels of ``layers`` "same" convolutions of odd
    size ``kernel``: ``R = layers * (kernel // 2)``; ``R_z = 0`` for slice-by-slice 2D convolutions."""
    r = layers * (kernel // 2)
    return (0 if dims == 2 else r, r, r)


def _cuts(n: int, b: int) -> list[int]:
    """Edges of ``ceil(n / b)`` intervals covering ``[0, n)``, sizes as equal as possible (each <= b)."""
    k = -(-n // b)
    return [i * n // k for i in range(k + 1)]


def block_regions(shape: Sequence[int], block_shape: Sequence[int]) -> Iterator[Region]:
    """Tiles of ``shape`` (Z, Y, X) in C order (x fastest): along each axis ``ceil(n / b)`` blocks of at
    most ``b`` voxels, as equal as possible (a volume of 50 in blocks of 24: 16, 17, 17, not 24, 24, 2,
    whose thin last block would cost a whole margin for little interior); ``b >= n``: one block."""
    cz, cy, cx = (_cuts(int(n), max(1, int(b))) for n, b in zip(shape, block_shape))
    for z0, z1 in zip(cz[:-1], cz[1:]):
        for y0, y1 in zip(cy[:-1], cy[1:]):
            for x0, x1 in zip(cx[:-1], cx[1:]):
                yield (slice(z0, z1), slice(y0, y1), slice(x0, x1))


def grown_region(region: Region, margin: Sequence[int], shape: Sequence[int]) -> tuple[Region, Region]:
    """``(outer, inner)``: ``region`` grown by ``margin`` voxels per side and clipped to ``shape`` (Z, Y, X),
    and ``region``'s place inside that grown box (slices relative to the box's origin)."""
    outer, inner = [], []
    for sl, m, n in zip(region, margin, shape):
        lo, hi = max(0, sl.start - int(m)), min(int(n), sl.stop + int(m))
        outer.append(slice(lo, hi))
        inner.append(slice(sl.start - lo, sl.stop - lo))
    return (outer[0], outer[1], outer[2]), (inner[0], inner[1], inner[2])


class _Interior:
    """``body(crop)[..., inner]``: what one block contributes (the function each checkpoint recomputes)."""

    def __init__(self, body: Body, inner: Region):
        self.body, self.inner = body, inner

    def __call__(self, crop: torch.Tensor) -> torch.Tensor:
        return self.body(crop)[(Ellipsis, *self.inner)]


def apply_blockwise(
    body: Body,
    h: torch.Tensor,
    block_shape: Sequence[int],
    margin: Sequence[int],
    checkpointing: bool | None = None,
) -> torch.Tensor:
    """``body(h)`` computed block by block (module docstring), equal to the whole-volume result.

    Args:
        body: ``(B, C, z, y, x) -> (B, z, y, x)``, translation-equivariant with receptive-field
            radius at most ``margin`` and the volume's edge handled by per-layer zero padding
            (a conv-ReLU stack of "same" convolutions).
        h: input (B, C, Z, Y, X).
        block_shape: largest tile (z, y, x) in voxels (:func:`block_regions`; a block larger than
            the volume is the whole volume).
        margin: receptive-field radius (z, y, x) in voxels, e.g. :func:`receptive_radius`.
        checkpointing: run each block under ``torch.utils.checkpoint(use_reentrant=False)``;
            None (default): when gradients are enabled.
    Returns:
        (B, Z, Y, X), assembled with ``torch.cat`` (whose backward pass only slices).
    """
    if h.dim() != 5:
        raise ValueError(f"apply_blockwise needs h of shape (B, C, Z, Y, X), got {tuple(h.shape)}")
    shape = tuple(h.shape[2:])
    use_ckpt = torch.is_grad_enabled() if checkpointing is None else bool(checkpointing)
    block_shape = check_block_shape(block_shape)
    planes: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    row: list[torch.Tensor] = []
    regions = list(block_regions(shape, block_shape))
    for i, region in enumerate(regions):
        outer, inner = grown_region(region, margin, shape)
        fn = _Interior(body, inner)
        crop = h[(Ellipsis, *outer)]
        row.append(checkpoint(fn, crop, use_reentrant=False, preserve_rng_state=False) if use_ckpt else fn(crop))
        nxt = regions[i + 1] if i + 1 < len(regions) else None
        if nxt is None or nxt[1].start != region[1].start or nxt[0].start != region[0].start:  # end of an x row
            rows.append(row[0] if len(row) == 1 else torch.cat(row, dim=-1))
            row = []
        if nxt is None or nxt[0].start != region[0].start:  # end of a z plane of rows
            planes.append(rows[0] if len(rows) == 1 else torch.cat(rows, dim=-2))
            rows = []
    return planes[0] if len(planes) == 1 else torch.cat(planes, dim=-3)
