"""Residual CNN regularisers for FBSEM-Net.

    x_reg = c * relu( x/c + f(x/c, u/c_u) )

with ``x`` the PET image entering the stage, ``u`` an optional anatomical image
(MR), ``f`` a stack of convolutions and ReLUs whose last convolution has one
output channel, and ``c`` (``c_u``) a per-sample intensity scale so that the
network sees values of order one whatever the count level or activity unit.

Intensity normalisation (``normalisation``):

* ``"mean"``: ``c`` = mean of ``x`` over the voxels of a mask (the field of view,
  passed by the FBSEM stage as the voxels with non-zero sensitivity; all voxels when
  no mask is given), per sample; the anatomical channel is divided by its own mean
  over the same mask. Multiplying back by ``c`` makes the regulariser positively
  homogeneous: ``R(a x) = a R(x)`` for ``a > 0``.
* ``"none"``: no scaling (``c = 1``).

Shapes: images ``(B, Z, Y, X)``; the network works on ``(B, C, Z, Y, X)`` with
3D convolutions (``dims=3``) or slice by slice on ``(B*Z, C, Y, X)`` with 2D
convolutions (``dims=2``). The output is ``(B, Z, Y, X)``, non-negative.

Memory: with gradients on, the conv-ReLU stack runs through :func:`conv_relu_stack`, whose
backward keeps one activation-sized gradient buffer alive instead of two (module
:class:`_ReLUConv`); the peak of a training step of one stage falls by about one hidden
activation (3D, 64 x 128 x 128 voxels, 32 channels: 776 -> 656 MiB), in every training mode.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RegulariserConfig", "ResidualCNN", "intensity_scale", "build_regulariser", "conv_relu_stack"]

Normalisation = Literal["mean", "none"]

#: smallest intensity scale used (guards an all-zero image)
_MIN_SCALE = 1e-12


@dataclass(frozen=True)
class RegulariserConfig:
    """Configuration of :class:`ResidualCNN`.

    Attributes:
        dims: 2 (slice-by-slice 2D convolutions) or 3 (3D convolutions).
        in_channels: 1 (PET only) or 2 (PET + anatomical image).
        channels: feature channels of the hidden convolutions.
        layers: number of convolutions (>= 2); all but the last are followed by ReLU.
        kernel: odd kernel size (voxels) of every convolution, zero ("same") padding.
        normalisation: ``"mean"`` (divide by the per-sample mean in the FOV) or ``"none"``.
    """

    dims: int = 3
    in_channels: int = 1
    channels: int = 32
    layers: int = 5
    kernel: int = 3
    normalisation: Normalisation = "mean"

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise ValueError(f"regulariser dims must be 2 or 3, got {self.dims!r}")
        if self.in_channels not in (1, 2):
            raise ValueError(
                f"regulariser in_channels must be 1 (PET) or 2 (PET + anatomical), got {self.in_channels!r}"
            )
        if not (isinstance(self.channels, int) and self.channels >= 1):
            raise ValueError(f"regulariser channels must be a positive integer, got {self.channels!r}")
        if not (isinstance(self.layers, int) and self.layers >= 2):
            raise ValueError(f"regulariser layers must be an integer >= 2, got {self.layers!r}")
        if not (isinstance(self.kernel, int) and self.kernel >= 1 and self.kernel % 2 == 1):
            raise ValueError(f"regulariser kernel must be a positive odd integer, got {self.kernel!r}")
        if self.normalisation not in ("mean", "none"):
            raise ValueError(f"regulariser normalisation must be 'mean' or 'none', got {self.normalisation!r}")

    @property
    def uses_anatomical(self) -> bool:
        return self.in_channels == 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RegulariserConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown regulariser config keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(d))


def intensity_scale(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of ``x`` (B, Z, Y, X) over ``mask`` (broadcastable, bool), shape (B,).

    Clamped below at 1e-12 so an all-zero image gives a finite scale. Differentiable.
    """
    if mask is None:
        c = x.flatten(1).mean(dim=1)
    else:
        m = torch.broadcast_to(mask, x.shape).to(x.dtype)
        c = (x * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1).clamp_min(1.0)
    return c.clamp_min(_MIN_SCALE)


class _ReLUConv(torch.autograd.Function):
    """``conv(relu(h))`` with a backward that masks the convolution's input gradient in place.

    Autograd's ReLU backward (``threshold_backward``) allocates its result while the incoming
    gradient is still alive: two activation-sized buffers at once, on top of the saved
    activations. Here the convolution's input gradient is computed by the same kernel
    autograd uses (``aten.convolution_backward``) into a tensor this function owns, and
    the ReLU mask is applied to it in place (in channel blocks, so the boolean mask stays
    small). Same gradients, bit for bit; one fewer buffer. Saves ``relu(h)`` (the
    convolution's input) only, like ``nn.ReLU(inplace=True)`` followed by the convolution.
    No double backward.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: dict) -> torch.Tensor:
        a = torch.relu(h)
        ctx.save_for_backward(a, weight)
        ctx.conv = conv
        ctx.has_bias = bias is not None
        fn = F.conv3d if weight.dim() == 5 else F.conv2d
        return fn(a, weight, bias, stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"],
                  groups=conv["groups"])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        a, weight = ctx.saved_tensors
        c = ctx.conv
        nd = weight.dim() - 2
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        g_in, g_w, g_b = torch.ops.aten.convolution_backward(
            grad.contiguous(), a, weight, [weight.shape[0]] if ctx.has_bias else None, list(c["stride"]),
            list(c["padding"]), list(c["dilation"]), False, [0] * nd, c["groups"], mask,
        )
        if g_in is not None:
            for i in range(0, g_in.shape[1], 4):  # a (B, 4, ...) boolean at a time, not one of the whole
                g_in[:, i:i + 4].masked_fill_(a[:, i:i + 4] <= 0, 0)
        return g_in, g_w, g_b, None  # g_b is None without a bias (output_mask False)


def conv_relu_stack(net: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """``net(h)`` for a stack ``conv, ReLU, conv, ReLU, ..., conv``, with :class:`_ReLUConv`'s
    leaner backward when gradients are on (``net(h)`` itself, with in-place ReLUs, otherwise).

    Args:
        net: ``nn.Sequential`` of ``nn.Conv2d``/``nn.Conv3d`` (numeric padding) separated by single ``nn.ReLU``s.
        h: (N, C, [Z,] Y, X).
    """
    if not torch.is_grad_enabled():
        return net(h)
    layers = list(net)
    convs = layers[0::2]
    if any(not isinstance(m, nn.ReLU) for m in layers[1::2]) or any(
        not isinstance(m, (nn.Conv2d, nn.Conv3d)) or isinstance(m.padding, str) for m in convs
    ):
        raise ValueError("conv_relu_stack needs conv, ReLU, conv, ..., conv with numeric padding")
    h = convs[0](h)
    for m in convs[1:]:
        conv = {"stride": tuple(m.stride), "padding": tuple(m.padding), "dilation": tuple(m.dilation),
                "groups": m.groups}
        h = _ReLUConv.apply(h, m.weight, m.bias, conv)
    return h


class ResidualCNN(nn.Module):
    """``x_reg = c * relu(x/c + f(x/c [, u/c_u]))``: a residual conv-ReLU stack, non-negative output.

    The last convolution is initialised to zero, so an untrained regulariser is the
    identity on non-negative images (``x_reg = x``).

    Args: see :class:`RegulariserConfig` (pass one, or its fields as keywords).
    """

    def __init__(self, config: RegulariserConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = RegulariserConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a RegulariserConfig or keyword fields, not both")
        self.config = config
        conv = nn.Conv3d if config.dims == 3 else nn.Conv2d
        pad = config.kernel // 2
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for _ in range(config.layers - 1):
            layers += [conv(c_in, config.channels, config.kernel, padding=pad), nn.ReLU(inplace=True)]
            c_in = config.channels
        last = conv(c_in, 1, config.kernel, padding=pad)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(
        self,
        x: torch.Tensor,
        anatomical: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Regularised image.

        Args:
            x: PET image (B, Z, Y, X), >= 0.
            anatomical: (B, Z, Y, X) or (Z, Y, X); required iff ``in_channels == 2``.
            mask: voxels (bool, broadcastable to x) over which the intensity scale is taken.
        Returns:
            (B, Z, Y, X), >= 0.
        """
        cfg = self.config
        if x.dim() != 4:
            raise ValueError(f"regulariser input must be (B, Z, Y, X), got shape {tuple(x.shape)}")
        if cfg.uses_anatomical and anatomical is None:
            raise ValueError("this regulariser has in_channels=2 and needs an anatomical image")
        if not cfg.uses_anatomical and anatomical is not None:
            raise ValueError("this regulariser has in_channels=1 (PET only) but got an anatomical image")
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if cfg.normalisation == "mean":
            c = intensity_scale(x, mask).reshape(shape)
        else:
            c = torch.ones(shape, dtype=x.dtype, device=x.device)
        xn = x / c
        channels = [xn]
        if anatomical is not None:
            u = torch.broadcast_to(anatomical.to(dtype=x.dtype, device=x.device), x.shape)
            if cfg.normalisation == "mean":
                u = u / intensity_scale(u.abs(), mask).reshape(shape)
            channels.append(u)
        h = torch.stack(channels, dim=1)  # (B, C, Z, Y, X)
        if cfg.dims == 3:
            f = conv_relu_stack(self.net, h)[:, 0]
        else:
            b, ch, nz, ny, nx = h.shape
            h2 = h.permute(0, 2, 1, 3, 4).reshape(b * nz, ch, ny, nx)
            f = conv_relu_stack(self.net, h2).reshape(b, nz, ny, nx)
        return torch.relu(xn + f) * c


def build_regulariser(config: RegulariserConfig | Mapping[str, Any]) -> ResidualCNN:
    """A :class:`ResidualCNN` from a config object or its dict."""
    if not isinstance(config, RegulariserConfig):
        config = RegulariserConfig.from_dict(config)
    return ResidualCNN(config)
