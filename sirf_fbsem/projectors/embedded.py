"""The embedded acquisition model: STIR geometry, Joseph projector, factors, additive term, PSF.

    ybar_s = m_s * G_s(P x) + b_s,      G = L / vx

``L`` is the Joseph line integral (mm); ``G`` is in STIR's "pixel units": lengths
divided by the image's x voxel size ``vx`` (mm), as STIR's ``ProjMatrixByBinUsingRayTracing``
(and so SIRF's ``AcquisitionModelUsingRayTracingMatrix``) returns them. Projections,
sensitivities and reconstructed images therefore carry SIRF's numbers: an image of ones
projects to chord lengths in voxels, and OSEM of the same data gives the same image on
either backend (:data:`~sirf_fbsem.projectors.base.PROJECTION_UNITS`).

``G`` traces the LORs of :mod:`sirf_fbsem.geometry` through the image with the
Joseph kernels of :mod:`sirf_fbsem.projectors.joseph` (numba on CPU, torch on
CUDA), or, with ``ray_tracing="siddon"``, with :mod:`sirf_fbsem.projectors.siddon_numba`,
which reproduces STIR's ray-tracing matrix row for row (exact voxel intersection
lengths, STIR's end voxels, axial and tangential rays and symmetries; CPU only).
No system matrix is stored: rays are generated from a few small tables.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

from ..geometry import GeometryError, ImageGeometry, SinogramGeometry, stir_view_symmetry, subset_views
from .base import AcquisitionModel
from .joseph import joseph_adjoint, joseph_forward
from .psf import GaussianPSF
from .rays import RayTable, make_ray_table, tangential_lor_offsets_mm
from .siddon_numba import make_siddon_plan, siddon_adjoint, siddon_forward, siddon_unsupported_reason

__all__ = ["EmbeddedAcquisitionModel", "RAY_TRACING"]

#: accepted values of ``ray_tracing``
RAY_TRACING = ("auto", "joseph", "siddon")

Array = torch.Tensor | np.ndarray


def _resolve_ray_tracing(option: str, sino: SinogramGeometry, image: ImageGeometry, device: torch.device,
                         backend: str) -> str:
    """The ray tracing in effect: ``option`` unless "auto", which is Siddon where it runs."""
    if option != "auto":
        return option
    runs = device.type == "cpu" and backend in ("auto", "numba")
    return "siddon" if runs and siddon_unsupported_reason(sino, image) is None else "joseph"


class EmbeddedAcquisitionModel(AcquisitionModel):
    """PET acquisition model on the embedded projector.

    Args:
        sinogram_geometry: scanner and sinogram layout (STIR's ProjDataInfo).
        image_geometry: voxel grid (STIR's VoxelsOnCartesianGrid).
        num_subsets: OSEM subsets by view (v % num_subsets == subset).
        multiplicative: factors m (normalisation x attenuation), shape (T,S,V,N) or
            (B,T,S,V,N) per sample; None means 1.
        additive: additive term b (randoms + scatter, counts), same shapes; None means 0.
        psf_fwhm_mm: image-space Gaussian PSF FWHM (z, y, x) in mm, or a scalar for all axes.
        restrict_to_cylindrical_fov: trace only inside STIR's cylindrical FOV (STIR's default).
        num_tangential_LORs: rays per bin across its width, each weighted 1/n, as STIR's ray
            tracer (``set_num_tangential_LORs``; SIRF's default is 2, the embedded one 1).
        device, dtype: where and in which precision the model computes.
        backend: "auto" (numba on CPU, torch on CUDA), "numba" or "torch".
        ray_tracing: "siddon" (STIR's ray-tracing matrix row for row: exact intersection
            lengths, as SIRF's ``AcquisitionModelUsingRayTracingMatrix``; numba, CPU only),
            "joseph" (interpolating, numba or torch, CPU or CUDA; within ~0.5% of it on smooth
            images; the default, which the bundled model was trained with) or "auto" (Siddon
            where it runs, i.e. on the CPU for a geometry it supports, else Joseph). The choice
            in effect is ``self.ray_tracing``.
    """

    def __init__(
        self,
        sinogram_geometry: SinogramGeometry,
        image_geometry: ImageGeometry,
        *,
        num_subsets: int = 1,
        multiplicative: Array | None = None,
        additive: Array | None = None,
        psf_fwhm_mm: float | Sequence[float] | None = None,
        restrict_to_cylindrical_fov: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        num_tangential_LORs: int = 1,
        ray_tracing: Literal["auto", "joseph", "siddon"] = "joseph",
    ):
        if ray_tracing not in RAY_TRACING:
            raise ValueError(f"ray_tracing must be one of {RAY_TRACING}, got {ray_tracing!r}")
        self._ray_tracing_option = ray_tracing
        self.ray_tracing = _resolve_ray_tracing(ray_tracing, sinogram_geometry, image_geometry,
                                                torch.device(device), backend)
        self._check_siddon_device(torch.device(device), backend)
        image_geometry.check_fits(sinogram_geometry)
        #: STIR's view symmetries for this sinogram and image: they decide the subsets, as in SIRF's OSEM
        self.view_symmetry = stir_view_symmetry(sinogram_geometry, image_geometry)
        for s in range(int(num_subsets)):  # validates num_subsets (no empty subset)
            subset_views(sinogram_geometry.num_views, num_subsets, s, self.view_symmetry)
        self.sinogram_geometry = sinogram_geometry
        self.image_geometry = image_geometry
        self.image_shape = image_geometry.shape
        self.sinogram_shape = sinogram_geometry.shape
        self.num_subsets = int(num_subsets)
        self.restrict_to_cylindrical_fov = restrict_to_cylindrical_fov
        self.num_tangential_LORs = int(num_tangential_LORs)
        self._lor_offsets = (None if self.num_tangential_LORs == 1
                             else tangential_lor_offsets_mm(sinogram_geometry, self.num_tangential_LORs))
        self.backend = backend
        self._device = torch.device(device)
        self._dtype = dtype
        self.multiplicative = self._sinogram_term(multiplicative, "multiplicative")
        self.additive = self._sinogram_term(additive, "additive")
        if psf_fwhm_mm is None or (np.isscalar(psf_fwhm_mm) and float(psf_fwhm_mm) == 0):
            self.psf = None
        else:
            fwhm = (float(psf_fwhm_mm),) * 3 if np.isscalar(psf_fwhm_mm) else tuple(psf_fwhm_mm)
            self.psf = GaussianPSF(fwhm, image_geometry.voxel_size_mm)
        self._rays: dict[int | None, RayTable] = {}
        # G_s M (the support's projection without the factors), shared by every copy (with_terms,
        # to, with_num_subsets) and keyed by what it depends on: see support_projection
        self._geometric_support_projections: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    def _check_siddon_device(self, device: torch.device, backend: str) -> None:
        if self.ray_tracing != "siddon":
            return
        if device.type != "cpu":
            raise ValueError(f"ray_tracing='siddon' runs on the CPU only (numba), not on {device}; use "
                             f"ray_tracing='joseph' there")
        if backend not in ("auto", "numba"):
            raise ValueError(f"ray_tracing='siddon' has the numba backend only, got backend={backend!r}")

    def _sinogram_term(self, term: Array | None, name: str) -> torch.Tensor | None:
        if term is None:
            return None
        t = torch.as_tensor(term).to(device=self._device, dtype=self._dtype)
        if t.shape[-4:] != self.sinogram_shape or t.dim() not in (4, 5):
            raise GeometryError(
                f"{name} term has shape {tuple(t.shape)}; expected {self.sinogram_shape} (T,S,V,N) "
                f"or (B,)+that, for {self.sinogram_geometry.describe()}"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} term contains NaN or Inf")
        if (t < 0).any():
            raise ValueError(f"{name} term has negative values (min {float(t.min()):g}); expected >= 0")
        return t

    @property
    def _pixel_unit(self) -> float:
        """1 / vx (1/mm): turns Joseph's mm into STIR's pixel units."""
        return 1.0 / self.image_geometry.voxel_size_mm[2]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def subset_views(self, subset: int | None) -> np.ndarray:
        if subset is None:
            return np.arange(self.sinogram_geometry.num_views)
        return subset_views(self.sinogram_geometry.num_views, self.num_subsets, subset, self.view_symmetry)

    def rays(self, subset: int | None, lor: int = 0) -> RayTable:
        """Ray table of a subset (cached); ``lor``: the tangential sub-ray (< num_tangential_LORs)."""
        key = subset if lor == 0 else (subset, lor)
        if key not in self._rays:
            views = None if subset is None else self.subset_views(subset)
            offset = None if self._lor_offsets is None else self._lor_offsets[lor]
            self._rays[key] = make_ray_table(
                self.sinogram_geometry, self.image_geometry, views, self.restrict_to_cylindrical_fov, offset
            )
        return self._rays[key]

    def siddon_plan(self, subset: int | None):
        """The Siddon plan (basic bins and their related bins) of a subset (cached)."""
        key = ("siddon", subset)
        if key not in self._rays:
            views = None if subset is None else self.subset_views(subset)
            self._rays[key] = make_siddon_plan(self.sinogram_geometry, self.image_geometry, views,
                                               self.restrict_to_cylindrical_fov, self.num_tangential_LORs)
        return self._rays[key]

    def _term(self, term: torch.Tensor | None, subset: int | None) -> torch.Tensor | None:
        return None if term is None else self.take_subset(term, subset)

    def with_num_subsets(self, num_subsets: int) -> "EmbeddedAcquisitionModel":
        return self._copy(num_subsets=num_subsets)

    def with_terms(
        self, multiplicative: Array | None = None, additive: Array | None = None
    ) -> "EmbeddedAcquisitionModel":
        """The same geometry and subsets with other factors / additive term (e.g. per training sample)."""
        new = self._copy()
        new.multiplicative = new._sinogram_term(multiplicative, "multiplicative")
        new.additive = new._sinogram_term(additive, "additive")
        return new

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "EmbeddedAcquisitionModel":
        """A copy on another device and/or dtype (ray tables are shared)."""
        new = self._copy()
        new._device = torch.device(device) if device is not None else self._device
        new.ray_tracing = _resolve_ray_tracing(self._ray_tracing_option, self.sinogram_geometry,
                                               self.image_geometry, new._device, self.backend)
        new._check_siddon_device(new._device, self.backend)
        new._dtype = dtype or self._dtype
        for name in ("multiplicative", "additive"):
            t = getattr(self, name)
            setattr(new, name, None if t is None else t.to(device=new._device, dtype=new._dtype))
        return new

    def _copy(self, num_subsets: int | None = None) -> "EmbeddedAcquisitionModel":
        new = object.__new__(type(self))
        new.__dict__.update({k: v for k, v in self.__dict__.items()
                             if k != "_sens_cache"})  # depends on the factors
        if num_subsets is not None and num_subsets != self.num_subsets:
            for s in range(int(num_subsets)):
                subset_views(self.sinogram_geometry.num_views, num_subsets, s, self.view_symmetry)
            new.num_subsets = int(num_subsets)
            new._rays = {k: v for k, v in self._rays.items()
                         if k is None or (isinstance(k, tuple) and (k[0] is None or k == ("siddon", None)))}
        return new

    # ------------------------------------------------------------------ operators

    def direct(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        xb, single = self.as_batch(x, self.image_shape, "image (z,y,x)")
        y = self._geometric_direct(xb, subset)
        m = self._term(self.multiplicative, subset)
        if m is not None:
            y = y * m
        return y[0] if single and y.shape[0] == 1 else y

    def _geometric_direct(self, xb: torch.Tensor, subset: int | None) -> torch.Tensor:
        """``G_s x`` (B,1,S,V_s,N) of a batch ``xb`` (B,Z,Y,X): the projection before the factors
        (``A_s x = m_s * G_s x``)."""
        xb = xb.to(device=self._device, dtype=self._dtype)
        if self.psf is not None:
            xb = self.psf(xb)
        if self.ray_tracing == "siddon":
            y = siddon_forward(xb, self.siddon_plan(subset)).unsqueeze(1)  # pixel units, STIR's rows
        else:
            y = joseph_forward(xb, self.rays(subset), backend=self.backend)  # (B,S,Vs,N), mm
            for lor in range(1, self.num_tangential_LORs):
                y = y + joseph_forward(xb, self.rays(subset, lor), backend=self.backend)
            y = (y * (self._pixel_unit / self.num_tangential_LORs)).unsqueeze(1)
        return y

    def support_projection(self, subset: int | None = None) -> torch.Tensor:
        """``A_s M = m_s * (G_s M)`` (:meth:`AcquisitionModel.support_projection`).

        ``G_s M`` does not depend on the factors, so it is projected once per subset for this model
        and every copy of it that shares its support (``with_terms``: a training run's per-sample
        models), not once per copy; each copy multiplies in its own factors.
        """
        support = self.support()
        key = (id(support), self.num_subsets, subset, str(self._device), self._dtype)
        entry = self._geometric_support_projections.get(key)
        if entry is None or entry[0] is not support:  # the support is kept in the entry, so its id is not reused
            with torch.no_grad():
                entry = (support, self._geometric_direct(support.to(self._dtype).unsqueeze(0), subset)[0])
            self._geometric_support_projections[key] = entry
        m = self._term(self.multiplicative, subset)
        return entry[1] if m is None else entry[1] * m

    def adjoint(self, y: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        yb, single = self.as_batch(y, self.subset_sinogram_shape(subset), f"sinogram of subset {subset}")
        yb = yb.to(device=self._device, dtype=self._dtype)
        m = self._term(self.multiplicative, subset)
        if m is not None:
            yb = yb * m
        y_sum = yb.sum(dim=1)
        if self.ray_tracing == "siddon":
            x = siddon_adjoint(y_sum.contiguous(), self.siddon_plan(subset))
        else:
            x = joseph_adjoint(y_sum, self.rays(subset), backend=self.backend)
            for lor in range(1, self.num_tangential_LORs):
                x = x + joseph_adjoint(y_sum, self.rays(subset, lor), backend=self.backend)
            x = x * (self._pixel_unit / self.num_tangential_LORs)
        if self.psf is not None:
            x = self.psf(x)
        return x[0] if single and x.shape[0] == 1 else x

    def additive_term(self, subset: int | None = None) -> torch.Tensor:
        b = self._term(self.additive, subset)
        if b is None:
            return torch.zeros(self.subset_sinogram_shape(subset), dtype=self._dtype, device=self._device)
        return b

    def sensitivity(self, subset: int | None = None) -> torch.Tensor:
        """``A_s^T 1``, (Z,Y,X), or (B,Z,Y,X) when the factors are per sample. Cached."""
        cache = self.__dict__.setdefault("_sens_cache", {})
        if subset not in cache:
            shape = self.subset_sinogram_shape(subset)
            if self.multiplicative is not None and self.multiplicative.dim() == 5:
                shape = (self.multiplicative.shape[0],) + shape
            ones = torch.ones(shape, dtype=self._dtype, device=self._device)
            cache[subset] = self.adjoint(ones, subset)
        return cache[subset]

    def __repr__(self) -> str:
        return (
            f"EmbeddedAcquisitionModel({self.sinogram_geometry.describe()}; image {self.image_geometry.describe()}; "
            f"{self.num_subsets} subsets; psf={None if self.psf is None else self.psf.fwhm_mm}; "
            f"ray_tracing={self.ray_tracing}; device={self._device})"
        )
