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
With :attr:`ResidualCNN.block_shape` set, the stack runs block by block under gradient
checkpointing (:mod:`sirf_fbsem.model.blockwise`): its memory is then that of one block.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import apply_blockwise, check_block_shape, receptive_radius

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


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, conv: dict) -> bool:
    """Whether :func:`_conv` may call oneDNN directly: CPU float32, oneDNN present, stride 1, dilation 1,
    one group, odd kernel with "same" padding (what the gradient formulas of :class:`_ReLUConv` assume)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and conv["groups"] == 1 and all(v == 1 for v in conv["stride"]) and all(v == 1 for v in conv["dilation"])
            and all(k % 2 == 1 for k in weight.shape[2:])
            and tuple(conv["padding"]) == tuple(k // 2 for k in weight.shape[2:]))


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: dict) -> torch.Tensor:
    """The convolution of ``conv`` (stride, padding, dilation, groups, onednn). With ``onednn`` (where
    :func:`_onednn_applies`) it calls oneDNN directly: PyTorch's CPU dispatch sends a float32 input
    with ``N * C * D * H <= 20480`` (a block, a patch) to a native kernel 3-10 times slower."""
    if conv.get("onednn") and _onednn_applies(x, weight, conv):
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, list(conv["padding"]),
                                                 list(conv["stride"]), list(conv["dilation"]), conv["groups"])
    fn = F.conv3d if weight.dim() == 5 else F.conv2d
    return fn(x, weight, bias, stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"],
              groups=conv["groups"])


class _ReLUConv(torch.autograd.Function):
    """``conv(relu(h))`` (``conv(h)`` when ``conv["relu"]`` is False) with a backward that masks the
    convolution's input gradient in place.

    Autograd's ReLU backward (``threshold_backward``) allocates its result while the incoming
    gradient is still alive: two activation-sized buffers at once, on top of the saved
    activations. Here the convolution's input gradient is computed by the same kernel
    autograd uses (``aten.convolution_backward``) into a tensor this function owns, and
    the ReLU mask is applied to it in place (in channel blocks, so the boolean mask stays
    small). Same gradients, bit for bit; one fewer buffer. Saves ``relu(h)`` (the
    convolution's input) only, like ``nn.ReLU(inplace=True)`` followed by the convolution.
    No double backward.

    With ``conv["onednn"]`` (blocks and patches, :func:`_conv`) the gradients are oneDNN
    convolutions too (stride 1, "same" padding ``p``, kernel flipped ``W~``)::

        dL/dh = conv(g, W~^T, p)         dL/dW = conv(a^T, g^T, p)^T         dL/db = sum(g)

    with ``^T`` swapping the first two axes (batch and channels for ``a`` and ``g``); equal to
    autograd's to rounding.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: dict) -> torch.Tensor:
        a = torch.relu(h) if conv.get("relu", True) else h
        ctx.save_for_backward(a, weight)
        ctx.conv = conv
        ctx.has_bias = bias is not None
        return _conv(a, weight, bias, conv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        a, weight = ctx.saved_tensors
        c = ctx.conv
        nd = weight.dim() - 2
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad = grad.contiguous()
        if c.get("onednn") and _onednn_applies(a, weight, c):
            pad, one = list(c["padding"]), [1] * nd
            spatial = tuple(range(2, weight.dim()))
            g_in = g_w = g_b = None
            if mask[0]:
                w_t = weight.flip(spatial).transpose(0, 1).contiguous()
                g_in = torch.ops.aten.mkldnn_convolution(grad, w_t, None, pad, one, one, 1)
            if mask[1]:
                a_t, g_t = a.transpose(0, 1).contiguous(), grad.transpose(0, 1).contiguous()
                g_w = torch.ops.aten.mkldnn_convolution(a_t, g_t, None, pad, one, one, 1).transpose(0, 1).contiguous()
            if mask[2]:
                g_b = grad.sum(dim=(0,) + spatial)
        else:
            g_in, g_w, g_b = torch.ops.aten.convolution_backward(
                grad, a, weight, [weight.shape[0]] if ctx.has_bias else None, list(c["stride"]),
                list(c["padding"]), list(c["dilation"]), False, [0] * nd, c["groups"], mask,
            )
        if g_in is not None and c.get("relu", True):
            for i in range(0, g_in.shape[1], 4):  # a (B, 4, ...) boolean at a time, not one of the whole
                g_in[:, i:i + 4].masked_fill_(a[:, i:i + 4] <= 0, 0)
        return g_in, g_w, g_b, None  # g_b is None without a bias (output_mask False)


def conv_relu_stack(net: nn.Sequential, h: torch.Tensor, onednn: bool = False) -> torch.Tensor:
    """``net(h)`` for a stack ``conv, ReLU, conv, ReLU, ..., conv``, with :class:`_ReLUConv`'s
    leaner backward when gradients are on (``net(h)`` itself, with in-place ReLUs, otherwise).

    Args:
        net: ``nn.Sequential`` of ``nn.Conv2d``/``nn.Conv3d`` (numeric padding) separated by single ``nn.ReLU``s.
        h: (N, C, [Z,] Y, X).
        onednn: call oneDNN directly for the convolutions and their gradients where it applies (CPU
            float32, stride 1, "same" padding), whatever the input's size (:func:`_conv`): for blocks and
            patches, which PyTorch would send to a slower kernel. Equal to rounding; off by default
            (whole volumes keep PyTorch's own choice, bit for bit).
    """
    layers = list(net)
    convs = layers[0::2]
    if not torch.is_grad_enabled() and not onednn:
        return net(h)
    if any(not isinstance(m, nn.ReLU) for m in layers[1::2]) or any(
        not isinstance(m, (nn.Conv2d, nn.Conv3d)) or isinstance(m.padding, str) for m in convs
    ):
        raise ValueError("conv_relu_stack needs conv, ReLU, conv, ..., conv with numeric padding")

    def spec(m: nn.Module, relu: bool) -> dict:
        return {"stride": tuple(m.stride), "padding": tuple(m.padding), "dilation": tuple(m.dilation),
                "groups": m.groups, "onednn": onednn, "relu": relu}

    if not torch.is_grad_enabled():  # onednn inference
        for i, m in enumerate(convs):
            h = _conv(h if i == 0 else torch.relu_(h), m.weight, m.bias, spec(m, i > 0))
        return h
    h = _ReLUConv.apply(h, convs[0].weight, convs[0].bias, spec(convs[0], False)) if onednn else convs[0](h)
    for m in convs[1:]:
        h = _ReLUConv.apply(h, m.weight, m.bias, spec(m, True))
    return h


class ResidualCNN(nn.Module):
    """``x_reg = c * relu(x/c + f(x/c [, u/c_u]))``: a residual conv-ReLU stack, non-negative output.

    The last convolution is initialised to zero, so an untrained regulariser is the
    identity on non-negative images (``x_reg = x``).

    Its three parts are usable on their own (e.g. on a crop of the volume with the
    whole volume's scales, :meth:`apply_scaled`):

    1. scales (:meth:`intensity_scales`): ``c`` = mean_mask(x), ``c_u`` = mean_mask(|u|), each (B,);
    2. normalisation (:meth:`normalise`): ``h = stack(x/c, u/c_u)``, (B, C, Z, Y, X), C = in_channels;
    3. body (:meth:`body`): ``f(h)``, (B, Z, Y, X), the conv-ReLU stack (``self.net``), zero "same"
       padding, receptive-field radius :attr:`receptive_radius`; block by block
       (:mod:`~sirf_fbsem.model.blockwise`) when :attr:`block_shape` is set;
    4. finish (:meth:`finish`): ``c * relu(x/c + f)``.

    ``block_shape`` ((z, y, x) voxels or None) is a runtime setting: it bounds the memory of
    the body by a block and leaves the output unchanged (to rounding), so it is not part of
    :class:`RegulariserConfig`, of the state dict or of a model file.

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
        self._block_shape: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ runtime settings
    @property
    def block_shape(self) -> tuple[int, int, int] | None:
        """Blocks (z, y, x) in voxels the body runs on (None: the whole volume at once)."""
        return self._block_shape

    @block_shape.setter
    def block_shape(self, value: Sequence[int] | None) -> None:
        self._block_shape = check_block_shape(value)

    @property
    def receptive_radius(self) -> tuple[int, int, int]:
        """``(R_z, R_y, R_x)`` voxels: ``layers * (kernel // 2)``, ``R_z = 0`` with 2D convolutions."""
        cfg = self.config
        return receptive_radius(cfg.layers, cfg.kernel, cfg.dims)

    # ------------------------------------------------------------------ parts
    def _check_inputs(self, x: torch.Tensor, anatomical: torch.Tensor | None) -> None:
        cfg = self.config
        if x.dim() != 4:
            raise ValueError(f"regulariser input must be (B, Z, Y, X), got shape {tuple(x.shape)}")
        if cfg.uses_anatomical and anatomical is None:
            raise ValueError("this regulariser has in_channels=2 and needs an anatomical image")
        if not cfg.uses_anatomical and anatomical is not None:
            raise ValueError("this regulariser has in_channels=1 (PET only) but got an anatomical image")

    def intensity_scales(
        self, x: torch.Tensor, anatomical: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(c, c_u)``, each (B,): ``c = mean_mask(x)`` and ``c_u = mean_mask(|u|)`` (None without ``u``);
        ones with ``normalisation="none"``. Differentiable in ``x``.

        Args:
            x: PET image (B, Z, Y, X), >= 0 (activity units).
            anatomical: (B, Z, Y, X) or (Z, Y, X), any units, or None.
            mask: voxels (bool, broadcastable to x) over which the means are taken (None: all).
        """
        self._check_inputs(x, anatomical)
        if self.config.normalisation == "mean":
            c = intensity_scale(x, mask)
            c_u = None
            if anatomical is not None:
                u = torch.broadcast_to(anatomical.to(dtype=x.dtype, device=x.device), x.shape)
                c_u = intensity_scale(u.abs(), mask)
            return c, c_u
        one = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return one, (None if anatomical is None else one)

    def normalise(
        self, x: torch.Tensor, anatomical: torch.Tensor | None, c: torch.Tensor, c_u: torch.Tensor | None
    ) -> torch.Tensor:
        """Network input ``h = stack(x / c, u / c_u)`` (B, C, Z, Y, X), dimensionless.

        Args:
            x: (B, Z, Y, X) (or a crop of it); anatomical: the same crop of ``u`` (broadcastable), or None.
            c, c_u: (B,) scales of :meth:`intensity_scales` (of the whole volume).
        """
        self._check_inputs(x, anatomical)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        channels = [x / c.reshape(shape)]
        if anatomical is not None:
            u = torch.broadcast_to(anatomical.to(dtype=x.dtype, device=x.device), x.shape)
            if self.config.normalisation == "mean":
                if c_u is None:
                    raise ValueError("normalise: an anatomical image needs its scale c_u")
                u = u / c_u.reshape(shape)
            channels.append(u)
        return torch.stack(channels, dim=1)

    def body(self, h: torch.Tensor, crop: bool = False) -> torch.Tensor:
        """``f(h)``: (B, C, Z, Y, X) -> (B, Z, Y, X); block by block when :attr:`block_shape` is set.
        ``crop``: ``h`` is a crop of the volume (a patch): its convolutions run on oneDNN as blocks' do
        (:func:`conv_relu_stack`)."""
        if self._block_shape is not None:
            return apply_blockwise(self._body_onednn, h, self._block_shape, self.receptive_radius)
        return self.body_whole(h, onednn=crop)

    def _body_onednn(self, h: torch.Tensor) -> torch.Tensor:
        return self.body_whole(h, onednn=True)

    def body_whole(self, h: torch.Tensor, onednn: bool = False) -> torch.Tensor:
        """``f(h)`` on the whole of ``h`` (B, C, Z, Y, X) -> (B, Z, Y, X): 3D convolutions, or 2D ones
        slice by slice on (B*Z, C, Y, X); ``onednn``: see :func:`conv_relu_stack`."""
        if self.config.dims == 3:
            return conv_relu_stack(self.net, h, onednn)[:, 0]
        b, ch, nz, ny, nx = h.shape
        h2 = h.permute(0, 2, 1, 3, 4).reshape(b * nz, ch, ny, nx)
        return conv_relu_stack(self.net, h2, onednn).reshape(b, nz, ny, nx)

    @staticmethod
    def finish(xn: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``relu(xn + f) * c``: ``xn = x/c`` and ``f`` (B, Z, Y, X), ``c`` (B,) -> x_reg (B, Z, Y, X) in x's units."""
        return torch.relu(xn + f) * c.reshape((c.shape[0],) + (1,) * (xn.dim() - 1))

    def apply_scaled(
        self,
        x: torch.Tensor,
        anatomical: torch.Tensor | None,
        c: torch.Tensor,
        c_u: torch.Tensor | None,
        inner: tuple[slice, slice, slice] | None = None,
    ) -> torch.Tensor:
        """``c * relu(x/c + f(x/c, u/c_u))`` with given scales, on ``x`` or a crop of it.

        On a crop ``x[R ⊕ radius ∩ V]`` with the whole volume's scales, ``inner`` (the region
        ``R`` inside the crop) gives exactly the whole-volume output on ``R``
        (:func:`~sirf_fbsem.model.blockwise.grown_region`).

        Args:
            x: (B, Z, Y, X) or a crop; anatomical: the same crop (or None).
            c, c_u: (B,) scales (:meth:`intensity_scales`).
            inner: slices (z, y, x) of the output to return (None: all).
        Returns:
            (B, z, y, x), >= 0.
        """
        h = self.normalise(x, anatomical, c, c_u)
        f = self.body(h, crop=inner is not None)
        xn = h[:, 0]
        if inner is not None:
            f, xn = f[(Ellipsis, *inner)], xn[(Ellipsis, *inner)]
        return self.finish(xn, f, c)

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
        c, c_u = self.intensity_scales(x, anatomical, mask)
        return self.apply_scaled(x, anatomical, c, c_u)


def build_regulariser(config: RegulariserConfig | Mapping[str, Any]) -> ResidualCNN:
    """A :class:`ResidualCNN` from a config object or its dict."""
    if not isinstance(config, RegulariserConfig):
        config = RegulariserConfig.from_dict(config)
    return ResidualCNN(config)
