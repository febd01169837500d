"""Image-space Gaussian PSF: a separable, symmetric blur (self-adjoint with zero padding)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["GaussianPSF"]


class GaussianPSF:
    """Separable Gaussian blur with FWHM in mm along (z, y, x).

    The kernel is truncated at 3 sigma and normalised to sum 1; with zero padding and
    a symmetric kernel the operator equals its own transpose, so the same call serves
    forward and adjoint. A FWHM of 0 along an axis leaves that axis untouched.
    """

    def __init__(self, fwhm_mm: tuple[float, float, float], voxel_size_mm: tuple[float, float, float]):
        if len(fwhm_mm) != 3 or any(f < 0 or not math.isfinite(f) for f in fwhm_mm):
            raise ValueError(f"PSF FWHM must be 3 non-negative lengths in mm (z, y, x), got {fwhm_mm}")
        self.fwhm_mm = tuple(float(f) for f in fwhm_mm)
        self.kernels: list[torch.Tensor | None] = []
        for fwhm, vox in zip(self.fwhm_mm, voxel_size_mm):
            if fwhm == 0:
                self.kernels.append(None)
                continue
            sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / vox
            half = max(1, int(math.ceil(3.0 * sigma)))
            t = torch.arange(-half, half + 1, dtype=torch.float64)
            k = torch.exp(-0.5 * (t / sigma) ** 2)
            self.kernels.append(k / k.sum())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Blur images (B, Z, Y, X); returns a new tensor."""
        b, nz, ny, nx = x.shape
        out = x.reshape(b, 1, nz, ny, nx)
        for axis, k in enumerate(self.kernels):
            if k is None:
                continue
            k = k.to(dtype=x.dtype, device=x.device)
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = k.numel()
            pad = [0, 0, 0]
            pad[axis] = k.numel() // 2
            out = F.conv3d(out, k.reshape(shape), padding=tuple(pad))
        return out.reshape(b, nz, ny, nx)
