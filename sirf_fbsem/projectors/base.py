"""The acquisition-model contract every backend (embedded, SIRF) follows.

Mean of the measured prompts in a subset ``s`` of views::

    ybar_s = A_s x + b_s,     A_s = S_s G_s P

with ``G`` the geometric projector (line integrals in STIR's "pixel units": intersection
lengths in mm divided by the image's x voxel size, as STIR's ray tracer and SIRF's
``AcquisitionModelUsingRayTracingMatrix`` give them; :data:`PROJECTION_UNITS`), ``P`` an optional
image-space PSF, ``S`` the multiplicative factors (normalisation x attenuation,
per sinogram bin) and ``b`` the additive term (randoms + scatter, counts).

Names follow SIRF where users meet them: ``direct``/``adjoint`` are the linear
part ``A`` and its transpose, ``forward`` is the affine model ``A x + b`` and
``backward`` is ``A^T`` (as ``AcquisitionModel.backward`` in SIRF).

Shapes: images ``(B, Z, Y, X)`` or unbatched ``(Z, Y, X)`` (Bq/ml-like activity
units; the model is linear so any unit works); sinograms ``(B, T, S, V_s, N)`` or
``(T, S, V_s, N)`` in counts, where ``V_s`` is the number of views in the subset
(all views when ``subset is None``).
"""
from __future__ import annotations

import abc
import math

import numpy as np
import torch

from ..geometry import ImageGeometry

__all__ = ["AcquisitionModel", "adjoint_mismatch", "PROJECTION_UNITS"]

#: The units of every backend's projections, recorded in model files
#: (:mod:`sirf_fbsem.model.io`): intersection lengths divided by the image's x voxel size
#: (STIR's ProjMatrixByBinUsingRayTracing without NEWSCALE; what SIRF returns). Images
#: reconstructed from counts are then in counts x (x voxel size / mm) per voxel, SIRF's numbers.
PROJECTION_UNITS = "stir_pixel_units"


class AcquisitionModel(abc.ABC):
    """Abstract PET acquisition model on torch tensors, with view-based subsets."""

    #: (Z, Y, X) of the image
    image_shape: tuple[int, int, int]
    #: (T, S, V, N) of the full sinogram
    sinogram_shape: tuple[int, int, int, int]
    #: number of OSEM subsets (views v with v % num_subsets == s form subset s)
    num_subsets: int
    #: the voxel grid of the images (STIR's VoxelsOnCartesianGrid: shape, voxel sizes in mm, origin)
    image_geometry: ImageGeometry

    # -------------------------------------------------------------- to implement
    @abc.abstractmethod
    def direct(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """Linear part ``A_s x``: image (B,Z,Y,X) or (Z,Y,X) -> sinogram (B,T,S,V_s,N) or (T,S,V_s,N)."""

    @abc.abstractmethod
    def adjoint(self, y: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """Exact transpose ``A_s^T y``: sinogram -> image, same batching as the input."""

    @abc.abstractmethod
    def additive_term(self, subset: int | None = None) -> torch.Tensor:
        """Additive term ``b_s`` (counts), shape (T,S,V_s,N) or (B,T,S,V_s,N) when per-sample."""

    @abc.abstractmethod
    def subset_views(self, subset: int | None) -> np.ndarray:
        """View indices of a subset (all views when ``subset is None``)."""

    @abc.abstractmethod
    def with_num_subsets(self, num_subsets: int) -> "AcquisitionModel":
        """The same model with another number of subsets (shares data, not caches)."""

    @abc.abstractmethod
    def with_terms(self, multiplicative=None, additive=None) -> "AcquisitionModel":
        """The same geometry and subsets with other factors S and additive term b.

        Each term is a (T,S,V,N) array (or (B,T,S,V,N) per sample where the backend allows
        it), or None (S = 1, b = 0). Training uses this for each batch's terms.
        """

    @abc.abstractmethod
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "AcquisitionModel":
        """The same model computing on / returning to ``device`` (and ``dtype`` where the backend can)."""

    # -------------------------------------------------------------- provided
    def forward(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """Affine model ``A_s x + b_s`` (SIRF's ``forward``)."""
        y = self.direct(x, subset)
        return y + self.additive_term(subset).to(device=y.device, dtype=y.dtype)

    def backward(self, y: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """``A_s^T y`` (SIRF's ``backward``)."""
        return self.adjoint(y, subset)

    def sensitivity(self, subset: int | None = None) -> torch.Tensor:
        """Subset sensitivity ``A_s^T 1``, shape (Z,Y,X) (or (B,Z,Y,X) with per-sample factors)."""
        cache = self.__dict__.setdefault("_sens_cache", {})
        if subset not in cache:
            shape = self.subset_sinogram_shape(subset)
            ones = torch.ones(shape, dtype=self.dtype, device=self.device)
            cache[subset] = self.adjoint(ones, subset)
        return cache[subset]

    def support(self) -> torch.Tensor:
        """Boolean (Z,Y,X) mask of the voxels some LOR of the model sees: ``A^T 1 > 0``. Cached.

        The engine's start image is 0 outside it (:func:`sirf_fbsem.recon.engine.start_image`):
        ``A (x * support) = A x`` for every x, so OSEM from it equals OSEM from x (STIR's
        uniform start), and no voxel that no data constrain is ever non-zero.
        """
        cached = self.__dict__.get("_support")
        if cached is None:
            with torch.no_grad():
                sens = self.sensitivity(None)  # cached too: MLEM and the model's users share it
            cached = (sens.amax(dim=0) if sens.dim() == 4 else sens) > 0
            self.__dict__["_support"] = cached
        return cached

    def support_projection(self, subset: int | None = None) -> torch.Tensor:
        """``A_s M`` (M: :meth:`support` as 0/1), shape (T,S,V_s,N) or (B,T,S,V_s,N) with per-sample
        factors: each bin's multiplicative factors times its LOR's path through the support. Bins where
        it is 0 (gaps between detector blocks, LORs missing the FOV) hold no counts whatever the
        activity. Cached per subset (one projection of the support each)."""
        cache = self.__dict__.setdefault("_support_projection_cache", {})
        if subset not in cache:
            with torch.no_grad():
                cache[subset] = self.direct(self.support().to(self.dtype), subset)
        return cache[subset]

    def subset_sinogram_shape(self, subset: int | None) -> tuple[int, int, int, int]:
        t, s, _, n = self.sinogram_shape
        return (t, s, len(self.subset_views(subset)), n)

    def take_subset(self, y: torch.Tensor, subset: int | None) -> torch.Tensor:
        """The views of ``subset`` from a full sinogram (B,T,S,V,N) or (T,S,V,N)."""
        if subset is None:
            return y
        idx = torch.as_tensor(self.subset_views(subset), device=y.device)
        return y.index_select(y.dim() - 2, idx)

    @staticmethod
    def as_batch(t: torch.Tensor, item_shape: tuple[int, ...], what: str) -> tuple[torch.Tensor, bool]:
        """``t`` with a leading batch axis, and whether it had none; checks the item shape."""
        n = len(item_shape)
        if t.dim() == n:
            t, single = t.unsqueeze(0), True
        elif t.dim() == n + 1:
            single = False
        else:
            raise ValueError(f"{what} must have {n} or {n + 1} dimensions, got shape {tuple(t.shape)}")
        if tuple(t.shape[1:]) != tuple(item_shape):
            raise ValueError(f"{what} has shape {tuple(t.shape[1:])}; the model expects {tuple(item_shape)}")
        return t, single

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def adjoint_test(self, subset: int | None = None, seed: int = 0, dtype: torch.dtype | None = None) -> float:
        """Normalised mismatch |<Ax,y> - <x,A^T y>| / (||A|| ||x|| ||y||) for random x, y (CIL's dot test)."""
        return adjoint_mismatch(self, subset=subset, seed=seed, dtype=dtype)


def adjoint_mismatch(
    model: AcquisitionModel, subset: int | None = None, seed: int = 0, dtype: torch.dtype | None = None
) -> float:
    """See :meth:`AcquisitionModel.adjoint_test`. ||A|| is estimated by 5 power iterations."""
    dtype = dtype or model.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(model.image_shape, generator=g, dtype=dtype).to(model.device)
    y = torch.rand(model.subset_sinogram_shape(subset), generator=g, dtype=dtype).to(model.device)
    ax = model.direct(x, subset)
    aty = model.adjoint(y, subset)
    lhs = float((ax * y).sum())
    rhs = float((x * aty).sum())
    v = torch.rand(model.image_shape, generator=g, dtype=dtype).to(model.device)
    norm = 1.0
    for _ in range(5):
        v = model.adjoint(model.direct(v, subset), subset)
        norm = float(v.norm())
        v = v / max(norm, 1e-30)
    op_norm = math.sqrt(norm)
    return abs(lhs - rhs) / max(op_norm * float(x.norm()) * float(y.norm()), 1e-30)
