"""Evaluation on held-out simulated phantoms: OSEM, OSEM + post-filter, MAP-EM (quadratic, Bowsher), FBSEM.

Methods (all start from the FBSEM start image, 1 inside the cylindrical FOV, and use the
same subsets, visited 0, 1, 2, ...):

* ``osem``: OSEM, every full iteration 1..N; reported at the best iteration.
* ``osem_filtered``: OSEM iterate n, then a Gaussian post-filter of FWHM f (mm); best (n, f).
* ``map_em``: MAP-EM with a quadratic smoothness prior, each sub-iteration the OSEM
  sub-update followed by the *same* closed-form fusion as FBSEM
  (:func:`~sirf_fbsem.model.fbsem.fbsem_fusion`) with a fixed regulariser image::

      x_em   = x / sens_s * A_s^T( y_s / (A_s x + b_s) )
      x_reg  = ( x + N(x) ) / 2                     N(x)_j = sum_k w_jk x_k / sum_k w_jk
      x_next = fbsem_fusion(x_em, x_reg, sens_s, beta * mean_FOV(sens_s) / mean_FOV(x))

  ``N`` is the 1/distance-weighted mean over the 8 (2D) or 26 (3D) neighbours inside the
  FOV. This is De Pierro's separable surrogate of the prior
  ``beta_R/4 sum_j sum_k w_jk (x_j - x_k)^2`` (weights normalised per voxel), whose
  per-voxel form is ``-beta/2 (x_j - x_reg_j)^2``, i.e. exactly the pull towards
  ``x_reg`` that FBSEM's fusion maximises with a CNN output instead. ``beta`` is in
  FBSEM's "normalised" units (dimensionless; the same grid serves every count level).
  ``beta = 0`` gives OSEM exactly. Reported at the best (``beta``, iteration) of a log
  grid of beta and iterations 1..``map_iterations``.
* ``map_em_bowsher`` (when ``EvaluationConfig.bowsher_neighbours`` is not empty and the
  samples have an ``anatomical`` image): MR-guided MAP-EM with the Bowsher prior, the
  baseline of FBSEM's PET+MR variant (Mehranian & Reader 2020 compare FBSEM-pm with it).
  Same iteration as ``map_em`` with the weights ``w_jk`` of ``N`` replaced by
  ``(b_jk + b_kj) / d_jk``: ``b_jk = 1`` when k is one of the ``B`` neighbours of j
  (inside the FOV) whose anatomical value is closest to j's (ties: nearer first), else 0,
  i.e. the gradient of ``sum_j sum_k b_jk (x_j - x_k)^2`` (Bowsher et al. 2004). Best
  (``B``, ``beta``, iteration) of the grids.
* FBSEM networks (any number, by name), run as trained (their stages, their subsets).

Hyperparameters (OSEM iteration, filter iteration and FWHM, MAP-EM beta) are chosen per
count level by the lowest mean NRMSE over *tuning* samples; when none are given they are
chosen on the evaluated samples themselves (optimistic for the baselines), and the
result says which.

Metrics (:mod:`sirf_fbsem.metrics`), against the ground-truth phantom (same units):

* NRMSE = ||x - t|| / ||t|| over the *head mask*: the phantom's support (t > 0) dilated
  by ``mask_dilation_voxels`` voxels in-plane, inside the cylindrical FOV.
* PSNR = 10 log10(max(t)^2 / MSE) over the head mask, dB.
* SSIM: Gaussian window (sigma 1.5 voxels, separable, 2D per slice for a single-slice
  image, 3D otherwise; Wang et al. 2004 constants with data range max(t)), averaged
  over the head mask.
* CR (hot lesions): per connected hot lesion L (``lesion_mask == 1``, at least
  ``min_lesion_voxels`` voxels), ``(mean_L(x)/mean_B(x) - 1) / (mean_L(t)/mean_B(t) - 1)``,
  B the white-matter ROI; averaged over the sample's lesions (None when it has none).
  A lesion of low true contrast makes this ratio unstable, so the JSON gives the median
  over the samples next to the mean (for every metric).
* background noise: std/mean of x in the white-matter ROI: voxels of the T1-like
  image with value >= 0.8 (white matter is 0.85, grey matter <= 0.62), eroded by one
  voxel in-plane, minus the lesions dilated by 2 voxels. The phantom's own smooth
  intensity variation gives the truth a non-zero value (``background_noise`` of
  ``truth`` in the result), the floor of this figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__, metrics
from .argtypes import torch_device
from .autograd import em_update
from .errors import InputError
from .geometry import ImageGeometry, SinogramGeometry, image_geometry_from_dict, sinogram_geometry_from_dict
from .io.atomic import atomic_path
from .io.outputs import JSON_MARK, PNG_SOFTWARE, PlannedOutput, absolute, check_planned
from .model.fbsem import FBSEMNet, fbsem_fusion
from .model.io import load_model
from .model.regularisers import intensity_scale
from .projectors.base import AcquisitionModel
from .projectors.factory import add_backend_argument, check_backend, make_acquisition_model
from .recon.engine import FBSEMUpdate, IterativeReconstruction, start_image
from .recon.osem import OSEM, fov_mask
from .samples import Sample
from .simulation.dataset import open_datasets
from .study_sets import PhantomSet, check_disjoint, phantom_set_of_manifests, phantom_set_of_model
from .study_statistics import paired_ratio_interval, seed_spread, verdict
from .evaluation_store import PartialResults, weights_digest
from .evaluation_tuning import EVALUATION_FORMAT, GRID_KEYS, TuningResult, read_tuning_result

__all__ = [
    "EvaluationConfig",
    "EvaluationMasks",
    "gaussian_filter",
    "quadratic_prior_reference",
    "bowsher_weights",
    "weighted_prior_reference",
    "map_em",
    "osem_iterates",
    "network_stages",
    "evaluation_masks",
    "image_metrics",
    "evaluate_methods",
    "evaluation_signature",
    "montage_slice",
    "save_evaluation_montage",
    "write_json",
    "load_samples",
    "add_evaluate_arguments",
    "run_evaluate",
    "BASELINES",
]

#: baseline method names, in montage order (``map_em_bowsher`` only with anatomical images and a B grid)
BASELINES = ("osem", "osem_filtered", "map_em", "map_em_bowsher")
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_METRICS = ("nrmse", "psnr", "ssim", "contrast_recovery", "background_noise")


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of :func:`evaluate_methods`.

    Attributes:
        osem_iterations: full OSEM iterations computed (each one pass over all subsets).
        num_subsets: subsets of OSEM and MAP-EM (None: the data's manifest value).
        filter_fwhm_mm: post-filter FWHM grid, mm (0 = no filter).
        map_betas: MAP-EM strength grid (FBSEM's normalised units).
        map_iterations: full MAP-EM iterations computed; the best (beta, iteration) is chosen.
        bowsher_neighbours: grid of ``B`` (neighbours kept per voxel, of 8 in 2D or 26 in 3D)
            for the MR-guided MAP-EM baseline; empty: no such baseline. It uses the
            ``map_betas`` grid and ``map_iterations`` too.
        mask_dilation_voxels: in-plane dilation of the phantom support for the head mask.
        min_lesion_voxels: smallest hot lesion (connected voxels) scored for CR.
        device: torch device of the projector and networks.
    """

    osem_iterations: int = 10
    num_subsets: int | None = None
    filter_fwhm_mm: tuple[float, ...] = (0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0)
    map_betas: tuple[float, ...] = tuple(float(f"{b:.4g}") for b in 10.0 ** np.linspace(-3, 1, 9))
    map_iterations: int = 20
    bowsher_neighbours: tuple[int, ...] = ()
    mask_dilation_voxels: int = 2
    min_lesion_voxels: int = 4
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("osem_iterations", "map_iterations", "min_lesion_voxels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EvaluationConfig.{name} must be an integer >= 1, got {v!r}")
        if self.num_subsets is not None and (not isinstance(self.num_subsets, int) or self.num_subsets < 1):
            raise ValueError(f"EvaluationConfig.num_subsets must be None or an integer >= 1, got {self.num_subsets!r}")
        if not isinstance(self.mask_dilation_voxels, int) or self.mask_dilation_voxels < 0:
            raise ValueError(
                f"EvaluationConfig.mask_dilation_voxels must be an integer >= 0, got {self.mask_dilation_voxels!r}"
            )
        if not self.filter_fwhm_mm or any(not (f >= 0 and math.isfinite(f)) for f in self.filter_fwhm_mm):
            raise ValueError(f"EvaluationConfig.filter_fwhm_mm must be finite values >= 0, got {self.filter_fwhm_mm!r}")
        if not self.map_betas or any(not (b >= 0 and math.isfinite(b)) for b in self.map_betas):
            raise ValueError(f"EvaluationConfig.map_betas must be finite values >= 0, got {self.map_betas!r}")
        if any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 26 for b in self.bowsher_neighbours):
            raise ValueError(
                f"EvaluationConfig.bowsher_neighbours must be integers in [1, 26], got {self.bowsher_neighbours!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filter_fwhm_mm"] = list(self.filter_fwhm_mm)
        d["map_betas"] = list(self.map_betas)
        d["bowsher_neighbours"] = list(self.bowsher_neighbours)
        return d


# ============================================================================ image operations
def gaussian_filter(x: torch.Tensor, fwhm_mm: float, voxel_size_mm: Sequence[float]) -> torch.Tensor:
    """Isotropic Gaussian filter of FWHM ``fwhm_mm`` on (Z, Y, X) or (B, Z, Y, X); axes of length 1 are skipped.

    Zero padding (the images are 0 outside the FOV); the kernel is truncated at 3 sigma
    and normalised to sum 1. ``fwhm_mm = 0`` returns ``x`` unchanged.
    """
    if fwhm_mm <= 0:
        return x
    single = x.dim() == 3
    v = (x[None] if single else x).unsqueeze(1)  # (B, 1, Z, Y, X)
    for axis in range(3):
        n = v.shape[2 + axis]
        sigma = fwhm_mm * _FWHM_TO_SIGMA / float(voxel_size_mm[axis])
        if n == 1 or sigma <= 0:
            continue
        half = min(int(math.ceil(3 * sigma)), n - 1)
        t = torch.arange(-half, half + 1, dtype=v.dtype, device=v.device)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0]
        pad[axis] = half
        v = F.conv3d(v, k.reshape(shape), padding=tuple(pad))
    out = v[:, 0]
    return out[0] if single else out


def _neighbour_offsets(nz: int, voxel_size_mm: Sequence[float]) -> list[tuple[tuple[int, int, int], float]]:
    """The 8 (``nz == 1``) or 26 neighbour offsets (dz, dy, dx) with their distances (mm), nearest first."""
    dzs = (0,) if nz == 1 else (-1, 0, 1)
    out = []
    for dz in dzs:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dz, dy, dx) != (0, 0, 0):
                    d = math.sqrt((dz * voxel_size_mm[0]) ** 2 + (dy * voxel_size_mm[1]) ** 2
                                  + (dx * voxel_size_mm[2]) ** 2)
                    out.append(((dz, dy, dx), d))
    return sorted(out, key=lambda od: od[1])  # stable: equal distances keep the scan order


def _neighbour_kernel(shape: Sequence[int], voxel_size_mm: Sequence[float], dtype, device) -> torch.Tensor:
    """(1,1,kz,3,3) kernel of 1/distance weights over the 8 (nz = 1) or 26 neighbours; centre 0."""
    kz = 1 if shape[0] == 1 else 3
    w = torch.zeros((kz, 3, 3), dtype=torch.float64)
    for (dz, dy, dx), dist in _neighbour_offsets(shape[0], voxel_size_mm):
        w[dz + kz // 2, dy + 1, dx + 1] = 1.0 / dist
    return w.to(dtype=dtype, device=device)[None, None]


def quadratic_prior_reference(x: torch.Tensor, fov: torch.Tensor, voxel_size_mm: Sequence[float]) -> torch.Tensor:
    """De Pierro reference image of the quadratic prior: ``(x + N(x)) / 2`` (module docstring).

    Args:
        x: image (Z, Y, X) or (B, Z, Y, X), >= 0.
        fov: boolean (Z, Y, X) (or broadcastable) support; neighbours outside it are ignored.
        voxel_size_mm: (vz, vy, vx), for the 1/distance weights.
    Returns:
        same shape as ``x``, >= 0; 0 outside ``fov``.
    """
    single = x.dim() == 3
    v = x[None] if single else x
    m = torch.broadcast_to(fov.to(device=v.device), v.shape).to(v.dtype)
    k = _neighbour_kernel(v.shape[1:], voxel_size_mm, v.dtype, v.device)
    pad = (k.shape[2] // 2, 1, 1)
    num = F.conv3d((v * m).unsqueeze(1), k, padding=pad)[:, 0]
    den = F.conv3d(m.unsqueeze(1), k, padding=pad)[:, 0]
    neighbours = torch.where(den > 0, num / den.clamp_min(1e-30), v)
    out = 0.5 * (v + neighbours) * m
    return out[0] if single else out


def _shifted(a: torch.Tensor, offset: tuple[int, int, int]) -> torch.Tensor:
    """``b[..., j] = a[..., j + offset]`` over the last three axes; 0 where ``j + offset`` is outside."""
    z, y, x = a.shape[-3:]
    p = F.pad(a, (1, 1, 1, 1, 1, 1))
    dz, dy, dx = offset
    return p[..., 1 + dz:1 + dz + z, 1 + dy:1 + dy + y, 1 + dx:1 + dx + x]


def bowsher_weights(
    anatomical: torch.Tensor, fov: torch.Tensor, voxel_size_mm: Sequence[float], num_neighbours: int
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Symmetric Bowsher neighbour weights (module docstring): ``(b_jk + b_kj) / d_jk``.

    Args:
        anatomical: (Z, Y, X) anatomical (MR) image, any units.
        fov: boolean (Z, Y, X); neighbours outside it are never chosen, voxels outside get no weights.
        voxel_size_mm: (vz, vy, vx), for the distances ``d_jk`` (mm).
        num_neighbours: ``B``, neighbours kept per voxel (of 8 if Z == 1, else 26).
    Returns:
        weights (O, Z, Y, X) float64 for the O offsets, and the offsets (dz, dy, dx): weight
        ``[o, j]`` belongs to the pair (j, j + offsets[o]); ``weights[o, j] == weights[o', j + o]``
        where ``offsets[o'] == -offsets[o]``.
    """
    u = torch.as_tensor(anatomical).to(torch.float64)
    if u.dim() != 3:
        raise ValueError(f"anatomical image must be (Z, Y, X), got shape {tuple(u.shape)}")
    inside = torch.broadcast_to(torch.as_tensor(fov).to(device=u.device, dtype=torch.bool), u.shape)
    offs = _neighbour_offsets(u.shape[0], voxel_size_mm)
    if not 1 <= num_neighbours <= len(offs):
        raise ValueError(f"num_neighbours must be in [1, {len(offs)}] for this image, got {num_neighbours}")
    offsets = [o for o, _ in offs]
    inside_f = inside.to(torch.float64)
    diffs = []
    for o in offsets:
        ok = (_shifted(inside_f, o) > 0) & inside
        diffs.append(torch.where(ok, (_shifted(u, o) - u).abs(), torch.full_like(u, math.inf)))
    d = torch.stack(diffs)  # (O, Z, Y, X); offsets sorted nearest first, so a stable sort breaks ties by distance
    order = torch.sort(d, dim=0, stable=True).indices[:num_neighbours]
    chosen = torch.zeros_like(d, dtype=torch.bool).scatter_(0, order, True) & torch.isfinite(d)
    chosen_f = chosen.to(torch.float64)
    index = {o: i for i, o in enumerate(offsets)}
    weights = []
    for i, (o, dist) in enumerate(offs):
        back = index[(-o[0], -o[1], -o[2])]
        # b_jk + b_kj: j chose k (offset o), or k = j + o chose j (its offset -o)
        weights.append((chosen_f[i] + _shifted(chosen_f[back], o)) / dist)
    return torch.stack(weights) * inside_f, offsets


def weighted_prior_reference(
    x: torch.Tensor, fov: torch.Tensor, weights: torch.Tensor, offsets: Sequence[tuple[int, int, int]]
) -> torch.Tensor:
    """De Pierro reference ``(x + N(x)) / 2`` with per-voxel neighbour weights (e.g. :func:`bowsher_weights`).

    Args:
        x: (Z, Y, X) or (B, Z, Y, X), >= 0.
        fov: boolean (Z, Y, X); 0 outside.
        weights: (O, Z, Y, X), >= 0; ``N(x)_j = sum_o w_oj x_{j+o} / sum_o w_oj`` (``x_j`` where the sum is 0).
        offsets: the O offsets (dz, dy, dx).
    """
    w = weights.to(dtype=x.dtype, device=x.device)
    num = torch.zeros_like(x)
    for i, o in enumerate(offsets):
        num = num + w[i] * _shifted(x, o)
    den = w.sum(dim=0)
    neighbours = torch.where(den > 0, num / den.clamp_min(1e-30), x)
    m = torch.as_tensor(fov).to(device=x.device, dtype=x.dtype)
    return 0.5 * (x + neighbours) * m


def osem_iterates(
    model: AcquisitionModel, prompts: torch.Tensor, num_iterations: int, initial: torch.Tensor | None = None
) -> torch.Tensor:
    """OSEM images after each full iteration 1..``num_iterations``: (num_iterations, Z, Y, X).

    ``initial`` defaults to FBSEM's start image (1 inside the cylindrical FOV).
    """
    algo = OSEM(model, prompts, initial=start_image(model) if initial is None else initial)
    out = []
    for _ in range(int(num_iterations)):
        for _ in range(model.num_subsets):
            algo.update()
        out.append(algo.x.clone())
    return torch.stack(out)


def map_em(
    model: AcquisitionModel,
    prompts: torch.Tensor,
    beta: float,
    num_iterations: int,
    voxel_size_mm: Sequence[float],
    initial: torch.Tensor | None = None,
    return_iterates: bool = False,
    anatomical: torch.Tensor | None = None,
    bowsher_neighbours: int | None = None,
) -> torch.Tensor:
    """MAP-EM with a quadratic prior through FBSEM's fusion (module docstring); returns (Z, Y, X),
    or (num_iterations, Z, Y, X), the image after every full iteration, with ``return_iterates``.
    With ``anatomical`` (Z, Y, X) and ``bowsher_neighbours`` B: the Bowsher prior instead.

    Args:
        model: acquisition model with this sample's factors and additive term (its subsets are used).
        prompts: measured counts (T, S, V, N).
        beta: strength >= 0 in FBSEM's normalised units; 0 gives OSEM exactly.
        num_iterations: full iterations (each ``model.num_subsets`` sub-iterations).
        voxel_size_mm: (vz, vy, vx) for the neighbour weights.
        initial: start image (Z, Y, X); default 1 inside the cylindrical FOV.
    """
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if (anatomical is None) != (bowsher_neighbours is None):
        raise ValueError("the Bowsher prior needs both anatomical and bowsher_neighbours")
    x = (start_image(model) if initial is None else initial).to(device=model.device, dtype=model.dtype).clone()
    prompts = torch.as_tensor(prompts).to(device=model.device, dtype=model.dtype)
    subset_prompts = [model.take_subset(prompts, s) for s in range(model.num_subsets)]
    iterates: list[torch.Tensor] = []
    bowsher: dict[int, tuple[torch.Tensor, list]] = {}  # weights by subset (its FOV), made on first use
    with torch.no_grad():
        for _ in range(int(num_iterations)):
            for s in range(model.num_subsets):
                sens = model.sensitivity(s).to(x)
                x_em = em_update(x, subset_prompts[s], model, s, sens)
                fov = sens > 0
                if anatomical is None:
                    x_reg = quadratic_prior_reference(x, fov, voxel_size_mm)
                else:
                    if s not in bowsher:
                        w, offs = bowsher_weights(anatomical.to(x.device), fov, voxel_size_mm, int(bowsher_neighbours))
                        bowsher[s] = (w.to(x.dtype), offs)
                    x_reg = weighted_prior_reference(x, fov, *bowsher[s])
                unit = intensity_scale(sens[None], fov[None]) / intensity_scale(x[None], fov[None])
                x = fbsem_fusion(x_em, x_reg, sens, beta * unit[0])
            iterates.append(x.clone())
    return torch.stack(iterates) if return_iterates else x


# ============================================================================ masks and metrics
@dataclass
class EvaluationMasks:
    """Boolean (Z, Y, X) masks of one sample (module docstring), numpy arrays."""

    head: np.ndarray
    white_matter: np.ndarray
    lesions: list[np.ndarray] = field(default_factory=list)


def _dilate(mask: np.ndarray, voxels: int) -> np.ndarray:
    """In-plane (y, x) binary dilation by a (2r+1)^2 square."""
    if voxels <= 0:
        return mask.copy()
    t = torch.from_numpy(mask.astype(np.float32))[:, None]
    out = F.max_pool2d(t, 2 * voxels + 1, stride=1, padding=voxels)
    return out[:, 0].numpy() > 0.5


def _erode(mask: np.ndarray, voxels: int) -> np.ndarray:
    return ~_dilate(~mask, voxels)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (26-connectivity) of a boolean (Z, Y, X) mask, as boolean masks."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    shape = mask.shape
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        queue = deque([start])
        seen[start] = True
        while queue:
            p = queue.popleft()
            comp[p] = True
            for o in offsets:
                q = (p[0] + o[0], p[1] + o[1], p[2] + o[2])
                if all(0 <= q[i] < shape[i] for i in range(3)) and mask[q] and not seen[q]:
                    seen[q] = True
                    queue.append(q)
        comps.append(comp)
    return comps


def evaluation_masks(
    sample: Sample, image_geometry: ImageGeometry, dilation_voxels: int = 2, min_lesion_voxels: int = 4
) -> EvaluationMasks:
    """Head mask, white-matter ROI and hot lesions of a sample (from its ``phantom``, ``anatomical`` and ``lesion_mask``)."""
    truth = _np(sample.phantom)
    fov = fov_mask(image_geometry).numpy()
    head = _dilate(truth > 0, dilation_voxels) & fov
    lesion_mask = _np(sample.lesion_mask)
    hot = lesion_mask == 1
    lesions = [c for c in _components(hot) if int(c.sum()) >= min_lesion_voxels]
    anat = _np(sample.anatomical)
    wm = _erode(anat >= 0.8, 1) & fov & (truth > 0) & ~_dilate(lesion_mask != 0, 2)
    return EvaluationMasks(head=head, white_matter=wm, lesions=lesions)


def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def image_metrics(
    x: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray, masks: EvaluationMasks
) -> dict[str, float | None]:
    """NRMSE, PSNR (dB), SSIM, mean hot-lesion CR and white-matter CV of ``x`` (Z, Y, X) against ``truth``."""
    x, truth = _np(x).astype(np.float64), _np(truth).astype(np.float64)
    out: dict[str, float | None] = {
        "nrmse": metrics.nrmse(x, truth, masks.head),
        "psnr": metrics.psnr(x, truth, masks.head),
        "ssim": metrics.ssim(x, truth, masks.head),
        "contrast_recovery": None,
        "background_noise": None,
    }
    if masks.white_matter.sum() >= 2:
        out["background_noise"] = metrics.background_noise(x, masks.white_matter)
        if masks.lesions:
            crs = [metrics.contrast_recovery(x, truth, les, masks.white_matter) for les in masks.lesions]
            out["contrast_recovery"] = float(np.mean(crs))
    return out


# ============================================================================ the study
def _statistics(rows: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Mean, median and std of every metric over the samples (finite values only); the median
    because a lesion of low true contrast can make one sample's CR far from the others."""
    out: dict[str, dict[str, float | None]] = {"mean": {}, "median": {}, "std": {}}
    for k in _METRICS:
        v = [r[k] for r in rows if r.get(k) is not None and math.isfinite(r[k])]
        for stat, f in (("mean", np.mean), ("median", np.median), ("std", np.std)):
            out[stat][k] = float(f(v)) if v else None
    return out


def _level_key(counts: float) -> str:
    return f"{float(counts):.3g}"


def _group(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(_level_key(s.counts), []).append(s)
    return dict(sorted(groups.items(), key=lambda kv: float(kv[0])))


class _Prepared:
    """One sample on the device: its acquisition model, prompts, truth and masks."""

    def __init__(self, sample: Sample, base: AcquisitionModel, config: EvaluationConfig):
        dev = torch.device(config.device)
        self.sample = sample
        self.model = base.with_terms(sample.multiplicative.to(dev), sample.additive.to(dev))
        self.prompts = sample.prompts.to(dev)
        anat = sample.anatomical
        self.anatomical = None if anat is None else torch.as_tensor(anat).to(dev)
        self.truth = sample.phantom
        self.masks = evaluation_masks(sample, base.image_geometry, config.mask_dilation_voxels,
                                      config.min_lesion_voxels)
        self.index = -1 if sample.index is None else int(sample.index)

    def nrmse(self, x: torch.Tensor) -> float:
        return metrics.nrmse(x, self.truth, self.masks.head)


def _targets_nrmse(prepared: Sequence[_Prepared]) -> list[float]:
    """Mean NRMSE over samples of each stage's training target against the truth, ``[k]`` for stage k + 1.

    The data's targets are the noise-free OSEM sub-iterates (``Sample.targets``), so entry k is the
    error a network of k + 1 stages trained on them would keep if it matched its targets exactly:
    the floor that iteration-dependent targets set at that number of stages.
    """
    return [float(v) for v in np.mean([[p.nrmse(t) for t in p.sample.targets] for p in prepared], axis=0)]


def _sample_grids(p: _Prepared, config: EvaluationConfig, vox: Sequence[float], bar: tqdm) -> dict[str, np.ndarray]:
    """NRMSE grids of one tuning phantom: osem (iters), filtered (iters, fwhm), map (betas, iters) and, with a
    Bowsher grid, bowsher (B, betas, iters)."""
    grids = {"osem": np.zeros(config.osem_iterations),
             "filtered": np.zeros((config.osem_iterations, len(config.filter_fwhm_mm))),
             "map": np.zeros((len(config.map_betas), config.map_iterations))}
    its = osem_iterates(p.model, p.prompts, config.osem_iterations).cpu()
    for it in range(config.osem_iterations):
        grids["osem"][it] = p.nrmse(its[it])
        for j, f in enumerate(config.filter_fwhm_mm):
            grids["filtered"][it, j] = p.nrmse(gaussian_filter(its[it], f, vox))
    bar.update(1)
    for j, b in enumerate(config.map_betas):
        its_b = map_em(p.model, p.prompts, b, config.map_iterations, vox, return_iterates=True).cpu()
        grids["map"][j] = [p.nrmse(x) for x in its_b]
        bar.update(1)
    if config.bowsher_neighbours:
        grids["bowsher"] = np.zeros((len(config.bowsher_neighbours), len(config.map_betas), config.map_iterations))
    for jb, nb in enumerate(config.bowsher_neighbours):
        for j, b in enumerate(config.map_betas):
            its_b = map_em(p.model, p.prompts, b, config.map_iterations, vox, return_iterates=True,
                           anatomical=p.anatomical, bowsher_neighbours=nb).cpu()
            grids["bowsher"][jb, j] = [p.nrmse(x) for x in its_b]
            bar.update(1)
    return grids


def _baseline_grids(
    prepared: Sequence[_Prepared], base: AcquisitionModel, config: EvaluationConfig, bar: tqdm,
    partial: PartialResults | None = None, level: str = "",
) -> dict[str, np.ndarray]:
    """NRMSE grids over samples: osem (n_samples, iters), filtered (n_samples, iters, fwhm), map (n_samples,
    betas, iters) and, with a Bowsher grid, bowsher (n_samples, B, betas, iters); each phantom's taken from
    ``partial`` when a stopped run stored it, and stored there when computed."""
    vox = base.image_geometry.voxel_size_mm
    per_sample = []
    for i, p in enumerate(prepared):
        grids = partial.grid(level, i) if partial is not None else None
        if grids is None:
            grids = _sample_grids(p, config, vox, bar)
            if partial is not None:
                partial.save_grid(level, i, grids)
        else:
            bar.update(1 + len(config.map_betas) * (1 + len(config.bowsher_neighbours)))
        per_sample.append(grids)
    return {k: np.stack([g[k] for g in per_sample]) for k in per_sample[0]}


def _select(grids: Mapping[str, np.ndarray], config: EvaluationConfig) -> dict[str, dict[str, Any]]:
    osem_mean = grids["osem"].mean(axis=0)
    filt_mean = grids["filtered"].mean(axis=0)
    map_mean = grids["map"].mean(axis=0)
    it_f, j_f = np.unravel_index(int(np.argmin(filt_mean)), filt_mean.shape)
    j_b, it_b = np.unravel_index(int(np.argmin(map_mean)), map_mean.shape)
    edge = (0, len(config.map_betas) - 1)
    chosen: dict[str, dict[str, Any]] = {
        "osem": {"iterations": int(np.argmin(osem_mean)) + 1},
        "osem_filtered": {"iterations": int(it_f) + 1, "fwhm_mm": float(config.filter_fwhm_mm[j_f])},
        "map_em": {"beta": float(config.map_betas[j_b]), "iterations": int(it_b) + 1,
                   "beta_at_grid_edge": int(j_b) in edge},
    }
    if "bowsher" in grids:
        bow_mean = grids["bowsher"].mean(axis=0)
        k_n, j_n, it_n = np.unravel_index(int(np.argmin(bow_mean)), bow_mean.shape)
        chosen["map_em_bowsher"] = {"neighbours": int(config.bowsher_neighbours[k_n]),
                                    "beta": float(config.map_betas[j_n]), "iterations": int(it_n) + 1,
                                    "beta_at_grid_edge": int(j_n) in edge}
    for name, entry in chosen.items():
        entry["at_grid_edge"] = _edges(entry, config)
    return chosen


def _edges(chosen: Mapping[str, Any], config: EvaluationConfig) -> list[str]:
    """The hyperparameters of ``chosen`` that sit at an edge of their grid, where a wider grid might
    choose otherwise (docs/studies/rules.md): the last iteration, the largest FWHM, beta or number of
    neighbours, and the smallest of a grid that does not start at its natural bound (FWHM 0, beta 0:
    no filter, OSEM; one neighbour)."""
    grids = {"iterations": (1, config.map_iterations if "beta" in chosen else config.osem_iterations),
             "fwhm_mm": tuple(config.filter_fwhm_mm), "beta": tuple(config.map_betas),
             "neighbours": tuple(config.bowsher_neighbours)}
    natural = {"iterations": 1, "fwhm_mm": 0.0, "beta": 0.0, "neighbours": 1}
    out = []
    for key in ("iterations", "fwhm_mm", "beta", "neighbours"):
        if key not in chosen or not grids[key]:
            continue
        lo, hi = min(grids[key]), max(grids[key])
        if len(set(grids[key])) > 1 or key == "iterations":
            if chosen[key] == hi or (chosen[key] == lo and lo != natural[key]):
                out.append(key)
    return out


def _grid_json(grids: Mapping[str, np.ndarray], config: EvaluationConfig) -> dict[str, Any]:
    """The grids' means over the tuning phantoms as JSON (:data:`GRID_KEYS` names them; read back by
    :func:`sirf_fbsem.evaluation_tuning.read_tuning_result`)."""
    out: dict[str, Any] = {GRID_KEYS[k]: grids[k].mean(axis=0).astype(np.float64).tolist()
                           for k in GRID_KEYS if k in grids}
    out["fwhm_mm"] = list(config.filter_fwhm_mm)
    out["map_betas"] = list(config.map_betas)
    if "bowsher" in grids:
        out["bowsher_neighbours"] = list(config.bowsher_neighbours)
    return out


def network_stages(
    net: FBSEMNet, model: AcquisitionModel, prompts: torch.Tensor, sample: Sample,
    anatomical: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """The network's image after each of its stages k = 1..K on one sample, as ``evaluate`` scores it.

    Starts from the engine's start image (1 inside the FOV). ``model`` is the sample's acquisition
    model (its multiplicative and additive terms set), moved to the network's number of subsets
    where it differs; the sample's stored subset sensitivities are used when their count matches
    the network's subsets (else the model computes them). ``prompts``: the sample's, on the
    model's device. ``anatomical``: the MR image, used only by a network that takes one.

    Yields (Z, Y, X) tensors on the model's device, in the data's units.
    """
    if model.num_subsets != net.num_subsets:
        model = model.with_num_subsets(net.num_subsets)
    sens = sample.sensitivity
    sens = None if sens is None or sens.shape[0] != net.num_subsets else sens.to(prompts.device)
    rule = FBSEMUpdate(net, anatomical=anatomical if net.uses_anatomical else None, sensitivities=sens)
    recon = IterativeReconstruction(model, prompts, rule, None)
    for _ in range(net.num_stages):
        yield recon.update()  # under torch.no_grad (the engine's update)


def _run_network(net: FBSEMNet, p: _Prepared) -> torch.Tensor:
    """The network's reconstruction of one sample (its last stage), (Z, Y, X) on the CPU."""
    *_, last = network_stages(net, p.model, p.prompts, p.sample, p.anatomical)
    return last.cpu()


def _check_evaluation_inputs(
    samples: Sequence[Sample], tuning_samples: Sequence[Sample] | None, test_groups: Mapping[str, Any],
    tune_groups: Mapping[str, Any], networks: Mapping[str, FBSEMNet], config: EvaluationConfig,
) -> tuple[str, ...]:
    """The baselines to score; ValueError for a count level without tuning samples, a Bowsher
    baseline without MR images, or a network named like a baseline."""
    for key in test_groups:
        if tuning_samples and key not in tune_groups:
            raise ValueError(f"no tuning samples at {key} counts; tuning count levels are {sorted(tune_groups)}")
    baselines = tuple(b for b in BASELINES if b != "map_em_bowsher" or config.bowsher_neighbours)
    if config.bowsher_neighbours:
        missing = [i for i, s in enumerate([*samples, *(tuning_samples or [])]) if s.anatomical is None]
        if missing:
            raise ValueError(f"the Bowsher MAP-EM baseline needs every sample's 'anatomical' image; samples {missing} "
                             "have none (set EvaluationConfig.bowsher_neighbours=() to leave it out)")
    for name in networks:
        if name in BASELINES or name == "truth":
            raise ValueError(f"network name {name!r} clashes with a baseline method name")
    return baselines


def _check_tuning_result(tuning_result: TuningResult, test_groups: Mapping[str, Any],
                         tune_groups: Mapping[str, Sequence[Sample]]) -> None:
    """InputError unless ``tuning_result`` has every scored count level's grids, computed on as many
    tuning phantoms as ``tune_groups`` holds at that level."""
    for key in test_groups:
        if key not in tuning_result.grids:
            raise InputError(f"--tuning-result {tuning_result.path}: no tuning grids at {key} counts "
                             f"(it has {sorted(tuning_result.grids)})")
        n, expected = tuning_result.num_tuning_samples[key], len(tune_groups.get(key, ()))
        if n != expected:
            raise InputError(f"--tuning-result {tuning_result.path}: its grids at {key} counts are over {n} tuning "
                             f"phantoms, --tune-data has {expected} at that level")


def _reconstruct_sample(
    p: _Prepared, chosen: Mapping[str, Mapping[str, Any]], nets: Mapping[str, FBSEMNet], config: EvaluationConfig,
    vox: Sequence[float], device: torch.device, bar: tqdm,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Every method's image of one sample with the chosen hyperparameters (and the truth), and
    OSEM's NRMSE at every iteration."""
    its = osem_iterates(p.model, p.prompts, config.osem_iterations).cpu()
    filtered = chosen["osem_filtered"]
    recon = {
        "osem": its[chosen["osem"]["iterations"] - 1],
        "osem_filtered": gaussian_filter(its[filtered["iterations"] - 1], filtered["fwhm_mm"], vox),
    }
    bar.update(2)
    recon["map_em"] = map_em(p.model, p.prompts, chosen["map_em"]["beta"], chosen["map_em"]["iterations"], vox).cpu()
    bar.update(1)
    if "map_em_bowsher" in chosen:
        c = chosen["map_em_bowsher"]
        recon["map_em_bowsher"] = map_em(p.model, p.prompts, c["beta"], c["iterations"], vox,
                                         anatomical=p.anatomical, bowsher_neighbours=c["neighbours"]).cpu()
        bar.update(1)
    for name, net in nets.items():
        recon[name] = _run_network(net, p)
        bar.update(1)
    recon["truth"] = p.truth
    return recon, [p.nrmse(x) for x in its]


def _method_entries(rows: Mapping[str, list[dict[str, Any]]], chosen: Mapping[str, Any],
                    seed_groups: Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    """Per method: statistics over samples, the per-sample rows and its chosen hyperparameters; per
    group of seeds, the means over its runs (:func:`_seed_group_entry`)."""
    methods: dict[str, Any] = {}
    for name, r in rows.items():
        entry: dict[str, Any] = {**_statistics(r), "per_sample": r}
        if name in chosen:
            entry["hyperparameters"] = chosen[name]
        methods[name] = entry
    for name, members in (seed_groups or {}).items():
        methods[name] = _seed_group_entry([rows[m] for m in members], list(members))
    return methods


def evaluate_methods(
    samples: Sequence[Sample],
    networks: Mapping[str, FBSEMNet],
    base_model: AcquisitionModel,
    config: EvaluationConfig = EvaluationConfig(),
    tuning_samples: Sequence[Sample] | None = None,
    progress: bool = True,
    seed_groups: Mapping[str, Sequence[str]] | None = None,
    partial: PartialResults | None = None,
    tuning_result: TuningResult | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Score every method on ``samples`` (:class:`~sirf_fbsem.samples.Sample`, every field set), per count level.

    ``seed_groups`` names learned methods trained with several seeds: method -> the names in
    ``networks`` of its runs. Such a method's per-sample metrics are the means over its runs (with
    ``nrmse_seed_std`` and ``ssim_seed_std``, their std over runs on that phantom), and its entry
    adds ``seeds`` (each run's mean metrics) and ``spread_over_seeds`` (mean, std, min and max over
    runs of each mean metric). The summary (:func:`_summary`) gives, for every learned method against
    every baseline and against every other learned method, the ratio of mean NRMSE and of mean SSIM
    with a paired bootstrap 95 % interval over phantoms and a verdict
    (:mod:`sirf_fbsem.study_statistics`), and for two methods with several seeds the ratio of their
    run-to-run spread.

    Args:
        samples: held-out samples; grouped by their ``counts``.
        networks: name -> trained FBSEM network (built for ``base_model``'s geometry).
        base_model: acquisition model of the data's geometry (no factors); its subsets are
            OSEM's and MAP-EM's (``config.num_subsets`` overrides).
        config: grids and iteration numbers.
        tuning_samples: samples (same count levels) on which hyperparameters are chosen;
            None: chosen on ``samples`` (reported as such).
        progress: tqdm bars.
        partial: where each finished phantom's grids and metrics are kept, and taken from when a
            stopped run stored them (:class:`~sirf_fbsem.evaluation_store.PartialResults`, opened with
            :func:`evaluation_signature` of the same arguments); None: nothing kept.
        tuning_result: the baselines' grids on ``tuning_samples`` as an earlier run computed them
            (:func:`~sirf_fbsem.evaluation_tuning.read_tuning_result`); the tuning phantoms are then
            not reconstructed. Needs ``tuning_samples`` (checked against it per count level).
    Returns:
        (results dict, plain JSON), and per count level the central z slice of the first sample's images
        ``{"truth": (Y,X), method: (Y,X), ...}`` for a montage (:func:`montage_slice`; a slice, not the
        volume, so that a stopped run's partial results stay small enough to carry between hosts).
    """
    device = torch.device(config.device)
    base = base_model if config.num_subsets is None else base_model.with_num_subsets(config.num_subsets)
    base.support()  # the start-image mask, computed once and shared by every sample's model
    vox = base.image_geometry.voxel_size_mm
    test_groups = _group(samples)
    tune_groups = _group(tuning_samples) if tuning_samples else {}
    baselines = _check_evaluation_inputs(samples, tuning_samples, test_groups, tune_groups, networks, config)
    if tuning_result is not None:
        _check_tuning_result(tuning_result, test_groups, tune_groups)
    nets = {name: net.to(device).eval() for name, net in networks.items()}
    levels: dict[str, Any] = {}
    images: dict[str, dict[str, np.ndarray]] = {}
    n_map = len(config.map_betas) * (1 + len(config.bowsher_neighbours))
    for key, group in test_groups.items():
        t0 = time.perf_counter()
        prepared = [_Prepared(s, base, config) for s in group]
        if tuning_result is not None:
            tune: list[_Prepared] = []
        else:
            tune = [_Prepared(s, base, config) for s in tune_groups[key]] if tuning_samples else prepared
        total = len(tune) * (1 + n_map) + len(prepared) * (len(baselines) + len(nets))
        with tqdm(total=total, desc=f"evaluate {key} counts", unit="recon", disable=not progress) as bar:
            if tuning_result is not None:
                grids = tuning_result.grids[key]
            else:
                grids = _baseline_grids(tune, base, config, bar, partial, key)
            chosen = _select(grids, config)
            rows: dict[str, list[dict[str, Any]]] = {m: [] for m in (*baselines, *nets, "truth")}
            osem_curves = []
            for i, p in enumerate(prepared):
                stored = partial.scored(key, i) if partial is not None else None
                if stored is None:
                    recon, curve = _reconstruct_sample(p, chosen, nets, config, vox, device, bar)
                    sample_rows = {name: {"index": p.index, **image_metrics(x, p.truth, p.masks),
                                          "num_hot_lesions": len(p.masks.lesions)} for name, x in recon.items()}
                    first = {name: montage_slice(x) for name, x in recon.items()} if i == 0 else None
                    if partial is not None:
                        partial.save_scored(key, i, sample_rows, curve, first)
                else:
                    sample_rows, curve, first = stored
                    bar.update(len(baselines) + len(nets))
                osem_curves.append(curve)
                for name, row in sample_rows.items():
                    rows[name].append(row)
                if i == 0:
                    images[key] = first
        methods = _method_entries(rows, chosen, seed_groups)
        levels[key] = {
            "counts": float(group[0].counts),
            "num_samples": len(prepared),
            "sample_indices": [p.index for p in prepared],
            "num_tuning_samples": len(tune_groups[key]) if tuning_samples else len(prepared),
            "osem_nrmse_by_iteration": [float(v) for v in np.mean(osem_curves, axis=0)],
            "targets_nrmse_by_stage": _targets_nrmse(prepared),
            "tuning_grids": _grid_json(grids, config),
            "methods": methods,
            "seconds": time.perf_counter() - t0,
        }
    selection = (
        "hyperparameters chosen per count level by the lowest mean NRMSE on the separate tuning samples"
        + (f" (their grids as the tuning run {tuning_result.path} computed them)" if tuning_result else "")
        if tuning_samples
        else "hyperparameters chosen per count level by the lowest mean NRMSE on the evaluated samples themselves "
        "(no separate tuning set: optimistic for the baselines)"
    )
    result = {
        "format": EVALUATION_FORMAT,
        "selection": selection,
        "config": config.to_dict(),
        "num_subsets": base.num_subsets,
        "networks": {name: {"num_stages": net.num_stages, "num_subsets": net.num_subsets,
                            "betas": [float(b) for b in net.betas.detach().cpu()],
                            "beta_counts": net.beta_counts,
                            "beta_count_slopes": [float(g) for g in net.count_slopes.detach().cpu()]}
                     for name, net in nets.items()},
        "definitions": _DEFINITIONS,
        "count_levels": levels,
        "summary": _summary(levels, _learned_methods(nets, seed_groups or {}), baselines),
    }
    return result, images


def evaluation_signature(
    samples: Sequence[Sample], networks: Mapping[str, FBSEMNet], base_model: AcquisitionModel,
    config: EvaluationConfig, tuning_samples: Sequence[Sample] | None = None,
    tuning_result: TuningResult | None = None,
) -> dict[str, Any]:
    """What the results of :func:`evaluate_methods` with these arguments depend on, for a stopped run's
    :class:`~sirf_fbsem.evaluation_store.PartialResults`: the grids, the networks' weights (digests),
    the scored and tuning phantoms (seed, index, counts, in order), the tuning grids read from an
    earlier run (digest), the sinogram shape and image geometry, the subsets and the package version."""
    def phantoms(group: Sequence[Sample] | None) -> list[list[Any]] | None:
        return None if group is None else [[s.seed, s.index, s.counts] for s in group]

    signature = {"config": config.to_dict(), "networks": {n: weights_digest(net) for n, net in networks.items()},
                 "scored": phantoms(samples), "tuning": phantoms(tuning_samples),
                 "sinogram_shape": list(base_model.sinogram_shape), "image": base_model.image_geometry.describe(),
                 "num_subsets": base_model.num_subsets if config.num_subsets is None else config.num_subsets,
                 "version": __version__}
    if tuning_result is not None:  # only then: runs stopped without one resume as before
        signature["tuning_result"] = tuning_result.digest
    return signature


def _learned_methods(nets: Mapping[str, Any], seed_groups: Mapping[str, Sequence[str]]) -> list[str]:
    """The learned methods a summary compares: seed groups, and networks in no group."""
    grouped = {m for members in seed_groups.values() for m in members}
    return [*seed_groups, *(n for n in nets if n not in grouped)]


def _seed_group_entry(runs: Sequence[Sequence[Mapping[str, Any]]], names: Sequence[str]) -> dict[str, Any]:
    """A method trained with several seeds: per-sample metrics averaged over its runs (same
    phantoms, same order), each run's means, and the spread of the means over runs."""
    per_sample = []
    for rows in zip(*runs):
        row: dict[str, Any] = {"index": rows[0]["index"], "num_hot_lesions": rows[0]["num_hot_lesions"]}
        for k in _METRICS:
            v = [r[k] for r in rows if r.get(k) is not None and math.isfinite(r[k])]
            row[k] = float(np.mean(v)) if v else None
            if k in ("nrmse", "ssim"):  # run-to-run spread on this phantom (sample std, ddof 1)
                row[f"{k}_seed_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else None
        per_sample.append(row)
    run_means = {n: _statistics(r)["mean"] for n, r in zip(names, runs)}
    spread = {k: seed_spread([m[k] for m in run_means.values()])
              for k in _METRICS if all(m[k] is not None for m in run_means.values())}
    return {**_statistics(per_sample), "per_sample": per_sample, "seeds": run_means, "spread_over_seeds": spread}


_DEFINITIONS = {
    "nrmse": "||x - t|| / ||t|| over the head mask (phantom support dilated in-plane, inside the FOV); fraction",
    "psnr": "10 log10(max(t)^2 / MSE) over the head mask, dB",
    "ssim": "mean SSIM over the head mask; Gaussian window sigma 1.5 voxels (2D per slice for single-slice images, "
    "3D otherwise); C1 = (0.01 max t)^2, C2 = (0.03 max t)^2",
    "contrast_recovery": "mean over hot lesions (>= min_lesion_voxels connected voxels) of "
    "(mean_L x / mean_WM x - 1) / (mean_L t / mean_WM t - 1); 1 = perfect",
    "background_noise": "std/mean of x in the white-matter ROI (T1-like image >= 0.8, eroded 1 voxel, lesions "
    "dilated by 2 voxels removed); see 'truth' for the phantom's own value",
    "targets_nrmse_by_stage": "per count level: mean NRMSE of the data's stage-k training target (noise-free OSEM "
    "sub-iterate k) against the truth, k = 1..K: the floor of a network matching its iteration-dependent targets",
    "osem": "OSEM from 1 inside the FOV, best full iteration",
    "osem_filtered": "OSEM iterate + isotropic Gaussian post-filter, best (iteration, FWHM)",
    "map_em": "MAP-EM, quadratic prior (De Pierro surrogate, 1/distance neighbours) through FBSEM's fusion, "
    "best (beta, full iteration) of the grid (beta in FBSEM's normalised units)",
    "map_em_bowsher": "MR-guided MAP-EM, Bowsher prior (B most similar neighbours in the anatomical image, "
    "symmetrised, 1/distance) through FBSEM's fusion, best (B, beta, full iteration) of the grids",
}


def _pair_intervals(a_rows: Sequence[Mapping[str, Any]], b_rows: Sequence[Mapping[str, Any]],
                    metrics: Sequence[tuple[str, bool]]) -> dict[str, Any]:
    """Paired ratio of means ``a / b`` over phantoms with its bootstrap interval and verdict, per
    ``(metric, lower_is_better)``; a metric with a missing value or a zero reference mean is left out."""
    pair: dict[str, Any] = {}
    for metric, lower_is_better in metrics:
        try:
            ci = paired_ratio_interval([r[metric] for r in a_rows], [r[metric] for r in b_rows])
        except (ValueError, TypeError, KeyError):
            continue
        pair[metric] = {**ci.to_json(), "verdict": verdict(ci, lower_is_better)}
    return pair


_QUALITY = (("nrmse", True), ("ssim", False))
_SEED_STD = (("nrmse_seed_std", True), ("ssim_seed_std", True))


def _summary(levels: Mapping[str, Any], learned: Sequence[str], baselines: Sequence[str]) -> dict[str, Any]:
    """Per count level: mean NRMSE per method, its ratios to MAP-EM and filtered OSEM, and paired
    bootstrap intervals (docs/studies/rules.md):

    - ``ratio_intervals``: every learned method against every baseline (NRMSE, SSIM);
    - ``learned_intervals``: every pair of learned methods ``a/b`` (``a`` before ``b`` in the order
      given), on the same phantoms (NRMSE, SSIM);
    - ``seed_spread_intervals``: every pair of learned methods with several seeds, the ratio of their
      mean per-phantom std over seeds (NRMSE and SSIM): below 1 when ``a``'s runs agree more.
    """
    out: dict[str, Any] = {}
    for key, lv in levels.items():
        m = lv["methods"]
        nr = {name: m[name]["mean"]["nrmse"] for name in m if name != "truth"}
        entry: dict[str, Any] = {"nrmse": nr}
        intervals: dict[str, Any] = {}
        present = [name for name in learned if nr.get(name) is not None]
        for name in present:
            entry[f"{name}/map_em"] = nr[name] / nr["map_em"] if nr["map_em"] else None
            if nr.get("map_em_bowsher"):
                entry[f"{name}/map_em_bowsher"] = nr[name] / nr["map_em_bowsher"]
            entry[f"{name}/osem_filtered"] = nr[name] / nr["osem_filtered"] if nr["osem_filtered"] else None
            for base in baselines:
                intervals[f"{name}/{base}"] = _pair_intervals(m[name]["per_sample"], m[base]["per_sample"], _QUALITY)
        entry["ratio_intervals"] = intervals
        pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
        entry["learned_intervals"] = {f"{a}/{b}": _pair_intervals(m[a]["per_sample"], m[b]["per_sample"], _QUALITY)
                                      for a, b in pairs}
        entry["seed_spread_intervals"] = {
            f"{a}/{b}": _pair_intervals(m[a]["per_sample"], m[b]["per_sample"], _SEED_STD)
            for a, b in pairs if "seeds" in m[a] and "seeds" in m[b]}
        out[key] = entry
    return out


# ============================================================================ outputs
def write_json(path: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    """Write ``result`` as indented JSON atomically (NaN/inf become null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(u) for k, u in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(u) for u in v]
        return v

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"written_by": JSON_MARK, **clean(result)}, indent=2, allow_nan=False) + "\n")
    return path


def montage_slice(image: Any) -> np.ndarray:
    """The slice of a (Z, Y, X) image that :func:`save_evaluation_montage` shows: the central one,
    ``image[Z // 2]`` (Y, X)."""
    a = _np(image)
    if a.ndim != 3:
        raise ValueError(f"montage_slice: expected a (Z, Y, X) image, got shape {a.shape}")
    return np.ascontiguousarray(a[a.shape[0] // 2])


def save_evaluation_montage(
    path: str | os.PathLike,
    images: Mapping[str, Mapping[str, np.ndarray]],
    result: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """PNG grid: one row per count level, columns truth then every method, NRMSE in the titles.

    ``images``: per count level, ``{"truth": (Y, X), method: (Y, X), ...}``, the slices to show (the
    central slice of the first evaluated sample, :func:`montage_slice`, as :func:`evaluate_methods`
    returns them); one grey scale per row, 0 to the truth slice's maximum."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not images:
        raise ValueError("no images to show")
    levels = list(images)
    cols = ["truth"] + [m for m in images[levels[0]] if m != "truth"]
    fig = Figure(figsize=(2.1 * len(cols), 2.3 * len(levels) + (0.4 if title else 0)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(levels), len(cols), squeeze=False)
    for r, key in enumerate(levels):
        truth = np.asarray(images[key]["truth"])
        if truth.ndim != 2:
            raise ValueError(f"save_evaluation_montage: expected (Y, X) slices, got {truth.shape} at {key}")
        vmax = float(truth.max()) or 1.0
        for c, name in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(images[key][name], cmap="gray_r", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            label = name
            if result is not None and name != "truth":
                rows = result["count_levels"][key]["methods"][name]["per_sample"]
                label += f"\nNRMSE {rows[0]['nrmse']:.3f}"
            ax.set_title(label, fontsize=7)
        axes[r, 0].set_ylabel(f"{key} counts", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    return path


# ============================================================================ command line
def _model_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model takes NAME=PATH (e.g. fbsem_seq=runs/seq/model.pt), got {text!r}")
    return name, Path(path)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` flags to ``parser``."""
    d = EvaluationConfig()
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="held-out dataset directories written by 'sirf-fbsem simulate' (grouped by counts)")
    parser.add_argument("--tune-data", type=Path, nargs="+", default=None,
                        help="separate dataset directories to choose the baselines' hyperparameters on "
                        "(default: choose on --data, reported as optimistic)")
    parser.add_argument("--tuning-result", type=Path, default=None, metavar="JSON",
                        help="with --tune-data: take the baselines' tuning grids from this earlier evaluate run on the "
                        "same tuning phantoms (a study's tuning run) instead of computing them again; its phantoms, "
                        "grids, subsets and setting are checked against this run's")
    parser.add_argument("--model", type=_model_arg, action="append", default=[], metavar="NAME=PATH",
                        help="a trained FBSEM model to evaluate (repeatable); the same NAME given several times: "
                        "runs of one method with different training seeds, reported as mean and spread over them")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--name", default="evaluate", help="output file stem: NAME.json, NAME.png (default evaluate)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace NAME.json/NAME.png of an earlier evaluate run (never files it did not write)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run from OUT/NAME.partial (each finished phantom is kept there "
                        "until NAME.json and NAME.png are written); same data, models and grids")
    parser.add_argument("--max-samples", type=int, default=None, help="use at most this many samples per directory")
    parser.add_argument("--osem-iterations", type=int, default=d.osem_iterations, help="full OSEM iterations")
    parser.add_argument("--subsets", type=int, default=None, help="OSEM / MAP-EM subsets (default: the data's)")
    parser.add_argument("--fwhm-mm", type=float, nargs="+", default=list(d.filter_fwhm_mm),
                        help="post-filter FWHM grid, mm")
    parser.add_argument("--betas", type=float, nargs="+", default=list(d.map_betas),
                        help="MAP-EM beta grid (normalised units)")
    parser.add_argument("--map-iterations", type=int, default=d.map_iterations, help="full MAP-EM iterations")
    parser.add_argument("--bowsher", type=int, nargs="+", default=list(d.bowsher_neighbours), metavar="B",
                        help="add MR-guided MAP-EM (Bowsher prior, needs the samples' anatomical image) with this "
                        "grid of neighbours kept per voxel (of 8 in 2D, 26 in 3D), e.g. --bowsher 2 3 4 5")
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu or cuda[:N]")
    add_backend_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _num_used(ds: Any, max_samples: int | None) -> int:
    return len(ds) if max_samples is None else min(len(ds), int(max_samples))


def phantom_set_of_datasets(role: str, datasets: Sequence[Any], max_samples: int | None = None) -> PhantomSet:
    """The phantoms (``(seed, index)`` pairs from the manifests) of the samples :func:`load_samples`
    uses from ``datasets``, without loading them."""
    return phantom_set_of_manifests(role, [(str(ds.directory), ds.manifest, _num_used(ds, max_samples))
                                           for ds in datasets])


def samples_of(datasets: Sequence[Any], max_samples: int | None = None) -> list[Sample]:
    """The samples (up to ``max_samples`` per dataset) of datasets opened by :func:`open_datasets`."""
    return [ds[i] for ds in datasets for i in range(_num_used(ds, max_samples))]


def load_samples(
    directories: Sequence[Path], max_samples: int | None = None
) -> tuple[list[Sample], dict[str, Any]]:
    """Samples of several dataset directories (same geometry and subsets) and the first manifest."""
    datasets = open_datasets(directories)
    return samples_of(datasets, max_samples), datasets[0].manifest


def _seed_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Methods given more than once (``--model fbsem=seed0.pt --model fbsem=seed1.pt``): runs of one
    method with several training seeds, named ``fbsem@1``, ``fbsem@2``, ... in the JSON."""
    return {n: [f"{n}@{i + 1}" for i in range(c)] for n, c in Counter(names).items() if c > 1}


def _checked_phantom_sets(
    args: argparse.Namespace,
    data_sets: Sequence[Any],
    tune_sets: Sequence[Any] | None,
    training_sets: Sequence[PhantomSet],
) -> dict[str, Any]:
    """The study's phantom sets as plain JSON, after refusing a scored set that shares phantoms
    with the tuning set or with a model's training data (:func:`sirf_fbsem.study_sets.check_disjoint`).

    With ``--tune-data`` the scored set is the confirmation set; without it the baselines' choices
    are made on the scored set itself, which is then recorded as ``"tuned_on_scored_set"``
    (optimistic for the baselines) rather than as a confirmation set.
    """
    scored_role = "confirmation" if tune_sets is not None else "scored (baselines tuned on it)"
    scored = phantom_set_of_datasets(scored_role, data_sets, args.max_samples)
    others = list(training_sets)
    tune_set = None
    if tune_sets is not None:
        tune_set = phantom_set_of_datasets("tuning", tune_sets, args.max_samples)
        others.insert(0, tune_set)
    check_disjoint(scored, others)
    unknown = [s.role for s in [scored, *others] if s.pairs is None]
    return {"scored": scored.to_json(), "tuning": tune_set.to_json() if tune_set else None,
            "training": [s.to_json() for s in training_sets],
            "confirmation": tune_sets is not None,
            "disjoint_by_seed": None if unknown else True,
            "unrecorded": unknown}


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed flags; writes ``OUT/NAME.json`` and ``OUT/NAME.png``; returns 0."""
    t0 = time.perf_counter()
    check_backend(args.backend)
    out = Path(args.out)
    if "/" in args.name or args.name in ("", ".", ".."):
        raise ValueError(f"--name must be a file stem without '/', got {args.name!r}")
    check_planned([PlannedOutput(absolute(out / f"{args.name}.json"), "json", "--out/--name", 1 << 20),
                   PlannedOutput(absolute(out / f"{args.name}.png"), "png", "--out/--name", 4 << 20)],
                  args.overwrite)
    if args.tuning_result is not None and not args.tune_data:
        raise InputError("--tuning-result needs --tune-data: the tuning phantoms its grids were computed on")
    data_sets = open_datasets(args.data)
    tune_sets = open_datasets(args.tune_data) if args.tune_data else None
    manifest = data_sets[0].manifest
    if tune_sets is not None:
        for k in ("sinogram_geometry", "image_geometry"):
            if tune_sets[0].manifest[k] != manifest[k]:
                raise ValueError(f"--tune-data has another {k} than --data")
    sino: SinogramGeometry = sinogram_geometry_from_dict(manifest["sinogram_geometry"])
    image: ImageGeometry = image_geometry_from_dict(manifest["image_geometry"])
    config = EvaluationConfig(
        osem_iterations=args.osem_iterations, num_subsets=args.subsets, filter_fwhm_mm=tuple(args.fwhm_mm),
        map_betas=tuple(args.betas), map_iterations=args.map_iterations,
        bowsher_neighbours=tuple(args.bowsher), device=args.device,
    )
    base = make_acquisition_model(args.backend, sino, image, num_subsets=int(manifest["num_subsets"]),
                                  psf_fwhm_mm=manifest.get("psf_fwhm_mm"), device=args.device)
    networks: dict[str, FBSEMNet] = {}
    model_files: dict[str, str] = {}
    training_sets: list[PhantomSet] = []
    seed_groups = _seed_groups([name for name, _ in args.model])
    run_names = {name: iter(members) for name, members in seed_groups.items()}
    for name, path in args.model:
        if name in (*BASELINES, "truth") or "@" in name:
            raise ValueError(f"--model {name}={path}: the name must not be a baseline's ({', '.join(BASELINES)}) "
                             f"or 'truth', nor contain '@'")
        run = next(run_names[name]) if name in run_names else name
        net, meta = load_model(path, expected_sinogram_geometry=sino, expected_image_geometry=image)
        networks[run] = net
        model_files[run] = str(path)
        training_sets.append(phantom_set_of_model(run, str(path), meta))
    phantom_sets = _checked_phantom_sets(args, data_sets, tune_sets, training_sets)
    setting = {"sinogram": sino.describe(), "image": image.describe(), "image_shape": list(image.shape),
               "voxel_size_mm": list(image.voxel_size_mm), "psf_fwhm_mm": manifest.get("psf_fwhm_mm")}
    tuning_result = None
    if args.tuning_result is not None:
        subsets = base.num_subsets if config.num_subsets is None else config.num_subsets
        tuning_result = read_tuning_result(args.tuning_result, config.to_dict(), subsets, setting,
                                           phantom_set_of_datasets("tuning", tune_sets, args.max_samples))
    samples = samples_of(data_sets, args.max_samples)
    tuning = samples_of(tune_sets, args.max_samples) if tune_sets is not None else None
    partial = PartialResults.open(out / f"{args.name}.partial",
                                  evaluation_signature(samples, networks, base, config, tuning, tuning_result),
                                  args.resume)
    result, images = evaluate_methods(samples, networks, base, config, tuning, progress=not args.no_progress,
                                      seed_groups=seed_groups, partial=partial, tuning_result=tuning_result)
    result["data"] = [str(d) for d in args.data]
    result["tune_data"] = [str(d) for d in args.tune_data] if args.tune_data else None
    result["tuning_result"] = tuning_result.path if tuning_result is not None else None
    result["model_files"] = model_files
    result["phantom_sets"] = phantom_sets
    result["setting"] = setting
    result["seconds"] = time.perf_counter() - t0
    json_path = write_json(out / f"{args.name}.json", result)
    png_path = save_evaluation_montage(out / f"{args.name}.png", images, result, title=f"{image.describe()}")
    partial.remove()
    for key, entry in result["summary"].items():
        line = ", ".join(f"{m} {v:.4f}" for m, v in entry["nrmse"].items() if v is not None and "@" not in m)
        print(f"{key} counts: NRMSE {line}")
        floor = result["count_levels"][key]["targets_nrmse_by_stage"]
        print(f"  NRMSE of the noise-free training target at stage {len(floor)} (the floor of a network "
              f"matching its targets): {floor[-1]:.4f}")
        for pair, ci in {**entry["ratio_intervals"], **entry["learned_intervals"]}.items():
            if "nrmse" in ci:
                c = ci["nrmse"]
                print(f"  NRMSE {pair} = {c['estimate']:.3f} [{c['low']:.3f}, {c['high']:.3f}]: {c['verdict']}")
    print(f"wrote {json_path} and {png_path} ({result['seconds']:.1f} s)")
    return 0
