"""Image-quality figures: NRMSE, PSNR, SSIM, ROI bias/std, contrast recovery.

All take arrays (Z,Y,X) (numpy or torch) and an optional boolean mask of the
region to score (e.g. the head or the FOV); values are plain floats.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["nrmse", "psnr", "ssim", "roi_mean_std", "contrast_recovery", "background_noise"]


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _masked(x, ref, mask):
    x, ref = _np(x).astype(np.float64), _np(ref).astype(np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"image shape {x.shape} differs from reference shape {ref.shape}")
    if mask is None:
        return x.ravel(), ref.ravel()
    m = _np(mask).astype(bool)
    return x[m], ref[m]


def nrmse(x, ref, mask=None) -> float:
    """||x - ref|| / ||ref|| over the mask (a fraction; x100 for %)."""
    a, b = _masked(x, ref, mask)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def psnr(x, ref, mask=None) -> float:
    """10 log10(max(ref)^2 / MSE) over the mask, dB."""
    a, b = _masked(x, ref, mask)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else float(10 * np.log10(b.max() ** 2 / mse))


def ssim(x, ref, mask=None, sigma_voxels: float = 1.5) -> float:
    """Mean structural similarity (Gaussian window, Wang et al. 2004), over the mask; data range = max(ref)."""
    a = torch.as_tensor(_np(x), dtype=torch.float64)
    b = torch.as_tensor(_np(ref), dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shape {tuple(a.shape)} differs from reference shape {tuple(b.shape)}")
    rng = float(b.max() - min(float(b.min()), 0.0)) or 1.0
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    half = int(math.ceil(3 * sigma_voxels))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma_voxels) ** 2)
    k = k / k.sum()

    def blur(v: torch.Tensor) -> torch.Tensor:
        v = v.reshape((1, 1) + tuple(v.shape))
        for axis in range(3):
            if v.shape[2 + axis] == 1:
                continue
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = k.numel()
            pad = [0, 0, 0]
            pad[axis] = half
            v = F.conv3d(v, k.reshape(shape), padding=tuple(pad))
        return v[0, 0]

    if a.dim() == 2:
        a, b = a[None], b[None]
    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a**2
    sbb = blur(b * b) - mu_b**2
    sab = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    if mask is not None:
        m = torch.as_tensor(_np(mask).astype(bool)).reshape(s.shape)
        return float(s[m].mean())
    return float(s.mean())


def roi_mean_std(x, roi) -> tuple[float, float]:
    """Mean and standard deviation of x in a boolean ROI."""
    v = _np(x)[_np(roi).astype(bool)]
    if v.size == 0:
        raise ValueError("ROI is empty")
    return float(v.mean()), float(v.std())


def contrast_recovery(x, ref, lesion, background) -> float:
    """(mean_L(x)/mean_B(x) - 1) / (mean_L(ref)/mean_B(ref) - 1): 1 is perfect recovery."""
    lx, _ = roi_mean_std(x, lesion)
    bx, _ = roi_mean_std(x, background)
    lr, _ = roi_mean_std(ref, lesion)
    br, _ = roi_mean_std(ref, background)
    true_c = lr / br - 1.0
    if abs(true_c) < 1e-12:
        raise ValueError("the reference has no contrast between lesion and background")
    return float((lx / bx - 1.0) / true_c)


def background_noise(x, background) -> float:
    """Coefficient of variation std/mean in a uniform background ROI."""
    m, s = roi_mean_std(x, background)
    return float(s / m) if m else math.inf
