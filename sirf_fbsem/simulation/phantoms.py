"""Brain phantoms for training data: FDG-like activity, a 511 keV mu-map and a T1-like MR image.

Two kinds, both drawn from a seeded :class:`numpy.random.Generator` and rendered on
any :class:`~sirf_fbsem.geometry.ImageGeometry` (3D, or a single slice ``nz = 1``):

* :func:`procedural_phantom`: an analytic head built from implicit surfaces: scalp
  (soft tissue), skull shell, subarachnoid CSF, a folded cortical grey-matter ribbon
  with an interhemispheric fissure, white matter, deep grey nuclei (caudate, putamen,
  thalamus) and ventricles. Sizes, positions, orientation, folding and intensities
  are random.
* :func:`mni152_phantom`: the MNI152 grey/white matter templates shipped with
  nilearn (optional extra ``pip install sirf_fbsem[phantoms]``), with skull and scalp
  grown around the brain, moved onto the image by a random affine deformation.

Tissue values (relative to white matter for activity):

============  =====================  =================  ==============
tissue        activity (x WM)        mu (1/cm)          T1-like
============  =====================  =================  ==============
air           0                      0                  0
scalp         0.5                    0.096 (water)      0.75
skull         0.25                   0.15 - 0.17        0.08
CSF           0.1                    0.096              0.2
grey matter   ratio (about 4)        0.096              0.55
white matter  1                      0.096              0.85
deep grey     ratio x 0.8 - 1.0      0.096              0.62
============  =====================  =================  ==============

Activity is in Bq/ml (white matter :attr:`PhantomParameters.white_matter_activity_bq_ml`),
modulated by a smooth random field (``intensity_variation``); hot and cold spherical
lesions multiply the activity of the tissue they sit in by their ``contrast``. Lesions
are not drawn in the MR-like image (the network must not learn to copy them from it).

Coordinates: the image's centred frame of :meth:`ImageGeometry.centred_coordinates_mm`
(z scanner-centred, mm). The head's own frame has superior = -z and posterior = +y,
as a head-first-supine patient in STIR's gantry axes.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..geometry import ImageGeometry
from ..io.atomic import atomic_path

__all__ = [
    "Tissue",
    "Lesion",
    "Phantom",
    "PhantomParameters",
    "procedural_phantom",
    "mni152_phantom",
    "make_phantom",
    "save_mni152_templates",
    "read_mni152_templates",
    "MNI152_FILE_KEYS",
    "PHANTOM_KINDS",
    "MU_WATER_PER_CM",
]

#: linear attenuation coefficient of water / soft tissue at 511 keV, 1/cm
MU_WATER_PER_CM = 0.096

#: phantom kinds accepted by :func:`make_phantom`
PHANTOM_KINDS = ("procedural", "mni152")

RandomLike = np.random.Generator | int | np.random.SeedSequence | None


class Tissue(IntEnum):
    """Labels of :attr:`Phantom.labels` (tissue at each voxel centre)."""

    BACKGROUND = 0
    SCALP = 1
    SKULL = 2
    CSF = 3
    GREY_MATTER = 4
    WHITE_MATTER = 5
    DEEP_GREY_MATTER = 6


_BRAIN_TISSUES = (Tissue.GREY_MATTER, Tissue.WHITE_MATTER, Tissue.DEEP_GREY_MATTER)
_INTRACRANIAL = (Tissue.CSF,) + _BRAIN_TISSUES


@dataclass(frozen=True)
class PhantomParameters:
    """Ranges the phantoms are drawn from. Pairs ``(lo, hi)`` are uniform ranges (inclusive for counts).

    Activities in Bq/ml, lengths in mm, attenuation in 1/cm, angles in degrees.
    """

    white_matter_activity_bq_ml: float = 5000.0
    grey_white_ratio: float = 4.0
    #: the ratio of a phantom is drawn in ``grey_white_ratio * (1 +- spread)``
    grey_white_ratio_spread: float = 0.1
    #: RMS of the smooth multiplicative activity variation (0: none)
    intensity_variation: float = 0.08
    scalp_activity_ratio: float = 0.5
    skull_activity_ratio: float = 0.25
    csf_activity_ratio: float = 0.1
    bone_mu_per_cm: tuple[float, float] = (0.15, 0.17)
    num_hot_lesions: tuple[int, int] = (1, 3)
    num_cold_lesions: tuple[int, int] = (0, 2)
    lesion_radius_mm: tuple[float, float] = (4.0, 10.0)
    #: lesion activity / activity of the tissue it replaces
    hot_lesion_contrast: tuple[float, float] = (1.5, 3.0)
    cold_lesion_contrast: tuple[float, float] = (0.0, 0.5)
    #: largest random rotation about z (yaw); pitch and roll get half of it
    max_rotation_deg: float = 10.0
    #: relative random variation of each head/brain size
    size_variation: float = 0.06
    #: level of the image's axial centre in the brain, as a fraction of the brain's
    #: superior half-axis (0: brain centre, 0.4: above the ventricles); chooses the
    #: slice of a 2D phantom
    slice_level: tuple[float, float] = (-0.1, 0.4)
    #: sub-samples per voxel along each axis (partial volume); 1 samples voxel centres only
    supersample: int = 2
    #: RMS of the Gaussian noise of the MR-like image (its white matter is about 0.85)
    anatomical_noise: float = 0.01

    def __post_init__(self) -> None:
        def rng_pair(name: str, lo_min: float = 0.0) -> None:
            lo, hi = getattr(self, name)
            if not (lo_min <= lo <= hi) or not math.isfinite(hi):
                raise ValueError(
                    f"PhantomParameters.{name} must be a range (lo, hi) with {lo_min} <= lo <= hi, got {(lo, hi)}"
                )

        if not self.white_matter_activity_bq_ml > 0:
            raise ValueError(f"white_matter_activity_bq_ml must be > 0, got {self.white_matter_activity_bq_ml}")
        if not self.grey_white_ratio > 0:
            raise ValueError(f"grey_white_ratio must be > 0, got {self.grey_white_ratio}")
        if not 0 <= self.grey_white_ratio_spread < 1:
            raise ValueError(f"grey_white_ratio_spread must be in [0, 1), got {self.grey_white_ratio_spread}")
        if not 0 <= self.intensity_variation < 0.5:
            raise ValueError(f"intensity_variation must be in [0, 0.5), got {self.intensity_variation}")
        for name in ("scalp_activity_ratio", "skull_activity_ratio", "csf_activity_ratio", "anatomical_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        rng_pair("bone_mu_per_cm", lo_min=MU_WATER_PER_CM)
        rng_pair("num_hot_lesions")
        rng_pair("num_cold_lesions")
        rng_pair("lesion_radius_mm", lo_min=1e-3)
        rng_pair("hot_lesion_contrast", lo_min=1.0)
        rng_pair("cold_lesion_contrast")
        if self.cold_lesion_contrast[1] > 1.0:
            raise ValueError(f"cold_lesion_contrast must lie in [0, 1], got {self.cold_lesion_contrast}")
        rng_pair("slice_level", lo_min=-0.9)
        if self.slice_level[1] > 0.9:
            raise ValueError(f"slice_level must lie in [-0.9, 0.9], got {self.slice_level}")
        if not 0 <= self.max_rotation_deg <= 45:
            raise ValueError(f"max_rotation_deg must be in [0, 45], got {self.max_rotation_deg}")
        if not 0 <= self.size_variation < 0.5:
            raise ValueError(f"size_variation must be in [0, 0.5), got {self.size_variation}")
        if int(self.supersample) != self.supersample or not 1 <= self.supersample <= 8:
            raise ValueError(f"supersample must be an integer in [1, 8], got {self.supersample}")

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Lesion:
    """A spherical lesion: activity inside = ``contrast`` x the activity of the tissue there."""

    centre_mm: tuple[float, float, float]  # (z, y, x), image's centred frame
    radius_mm: float
    contrast: float

    @property
    def hot(self) -> bool:
        return self.contrast > 1.0


@dataclass(frozen=True)
class Phantom:
    """A phantom on an image grid. Arrays are (Z, Y, X).

    Attributes:
        activity: float32, Bq/ml (lesions included).
        mu_map: float32, linear attenuation at 511 keV, 1/cm.
        anatomical: float32, T1-like MR image (white matter about 0.85, lesions absent).
        labels: uint8 :class:`Tissue` at each voxel centre.
        lesion_mask: int8, 1 in hot lesions, -1 in cold ones, 0 elsewhere (voxel centres).
        lesions: the lesions drawn.
        grey_white_ratio: the grey:white activity ratio drawn for this phantom.
        kind: "procedural" or "mni152".
    """

    activity: np.ndarray
    mu_map: np.ndarray
    anatomical: np.ndarray
    labels: np.ndarray
    lesion_mask: np.ndarray
    lesions: tuple[Lesion, ...]
    image_geometry: ImageGeometry
    grey_white_ratio: float
    kind: str

    def __post_init__(self) -> None:
        shape = tuple(self.image_geometry.shape)
        for name in ("activity", "mu_map", "anatomical", "labels", "lesion_mask"):
            a = getattr(self, name)
            if tuple(a.shape) != shape:
                raise ValueError(f"Phantom.{name} has shape {tuple(a.shape)}; the image geometry is {shape} (z,y,x)")

    def tissue_mask(self, *tissues: Tissue) -> np.ndarray:
        """Boolean mask of the voxels labelled with any of ``tissues``."""
        return np.isin(self.labels, [int(t) for t in tissues])

    @property
    def brain_mask(self) -> np.ndarray:
        """Grey, white and deep grey matter."""
        return self.tissue_mask(*_BRAIN_TISSUES)

    @property
    def head_mask(self) -> np.ndarray:
        return self.labels != Tissue.BACKGROUND


# ============================================================================ shared machinery
class _Evaluate(Protocol):
    """A phantom "model": points (z, y, x) in mm (broadcastable float32 arrays, image frame)
    -> (label uint8, activity Bq/ml, mu 1/cm, T1-like), without lesions."""

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]: ...

    def bounding_sphere(self) -> tuple[np.ndarray, float]: ...


_T1 = np.array([0.0, 0.75, 0.08, 0.2, 0.55, 0.85, 0.62], dtype=np.float32)  # by Tissue


def _rng(rng: RandomLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


@dataclass(frozen=True)
class _CosineField:
    """Smooth random field: sum_i a_i cos(k_i . p + phi_i), unit RMS. p = (z, y, x) in mm."""

    k: np.ndarray  # (n, 3) rad/mm
    phase: np.ndarray  # (n,)
    amp: np.ndarray  # (n,)

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]) -> "_CosineField":
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength_mm, size=n)
        phase = rng.uniform(0, 2 * np.pi, size=n)
        return cls(k=d * (2 * np.pi / lam)[:, None], phase=phase, amp=np.full(n, math.sqrt(2.0 / n)))

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
        for (kz, ky, kx), ph, a in zip(self.k.astype(np.float32), self.phase.astype(np.float32), self.amp):
            out += np.float32(a) * np.cos(kz * z + ky * y + kx * x + ph)
        return out

    def distance_to_zero_set(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """First-order distance (mm) to the field's zero level set, |f| / |grad f|: thin curved sheets."""
        shape = np.broadcast_shapes(z.shape, y.shape, x.shape)
        f = np.zeros(shape, dtype=np.float32)
        g = [np.zeros(shape, dtype=np.float32) for _ in range(3)]
        for (kz, ky, kx), ph, a in zip(self.k.astype(np.float32), self.phase.astype(np.float32), self.amp):
            arg = kz * z + ky * y + kx * x + ph
            f += np.float32(a) * np.cos(arg)
            sn = np.float32(a) * np.sin(arg)
            g[0] -= kz * sn
            g[1] -= ky * sn
            g[2] -= kx * sn
        grad = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)
        return np.abs(f) / np.maximum(grad, np.float32(1e-6))


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation matrix acting on (z, y, x) vectors: yaw about z up to max_deg, pitch/roll up to half."""
    yaw, pitch, roll = np.radians(rng.uniform(-1, 1, size=3) * np.array([max_deg, max_deg / 2, max_deg / 2]))
    cz, sz = math.cos(yaw), math.sin(yaw)
    rz = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])  # about z: mixes y, x
    cy, sy = math.cos(pitch), math.sin(pitch)
    rx = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])  # about x: mixes z, y
    cr, sr = math.cos(roll), math.sin(roll)
    ry = np.array([[cr, 0, -sr], [0, 1, 0], [sr, 0, cr]])  # about y: mixes z, x
    return rz @ rx @ ry


def _to_frame(R: np.ndarray, c: np.ndarray, z, y, x):
    """Head-frame coordinates p' = R^T (p - c) of image-frame points p = (z, y, x)."""
    dz = (z - np.float32(c[0])).astype(np.float32, copy=False)
    dy = (y - np.float32(c[1])).astype(np.float32, copy=False)
    dx = (x - np.float32(c[2])).astype(np.float32, copy=False)
    Rf = R.astype(np.float32)
    zp = Rf[0, 0] * dz + Rf[1, 0] * dy + Rf[2, 0] * dx
    yp = Rf[0, 1] * dz + Rf[1, 1] * dy + Rf[2, 1] * dx
    xp = Rf[0, 2] * dz + Rf[1, 2] * dy + Rf[2, 2] * dx
    return zp, yp, xp


def _chunks(nz: int, points_per_slice: int, budget: int = 4_000_000):
    step = max(1, budget // max(points_per_slice, 1))
    for k0 in range(0, nz, step):
        yield k0, min(nz, k0 + step)


def _render(
    evaluate: _Evaluate,
    geom: ImageGeometry,
    supersample: int,
    lesions: tuple[Lesion, ...] = (),
    labels_only: bool = False,
):
    """Evaluate a model on the grid, averaging ``supersample**3`` sub-samples per voxel.

    Only the voxels within the model's bounding sphere are evaluated (the rest is air).
    Returns labels (at voxel centres) when ``labels_only``, else (activity, mu, t1).
    """
    z_all, y_all, x_all = (c.astype(np.float32) for c in geom.centred_coordinates_mm())
    centre, radius = evaluate.bounding_sphere()
    box = []
    for c_axis, centre_a, v in zip((z_all, y_all, x_all), centre, geom.voxel_size_mm):
        inside = np.nonzero(np.abs(c_axis - centre_a) <= radius + v)[0]
        box.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
    full_shape = geom.shape
    z, y, x = z_all[box[0]], y_all[box[1]], x_all[box[2]]
    nz, ny, nx = z.size, y.size, x.size
    ss = 1 if labels_only else int(supersample)
    off = ((np.arange(ss) + 0.5) / ss - 0.5).astype(np.float32)
    vz, vy, vx = (np.float32(v) for v in geom.voxel_size_mm)
    ys = (y[:, None] + off[None, :] * vy).reshape(-1)
    xs = (x[:, None] + off[None, :] * vx).reshape(-1)
    labels = np.zeros(full_shape, dtype=np.uint8)
    act = np.zeros(full_shape, dtype=np.float32)
    mu = np.zeros(full_shape, dtype=np.float32)
    t1 = np.zeros(full_shape, dtype=np.float32)
    if min(nz, ny, nx) == 0:
        return labels if labels_only else (act, mu, t1)
    sub = (box[0], box[1], box[2])
    lab_v, act_v, mu_v, t1_v = labels[sub], act[sub], mu[sub], t1[sub]
    for k0, k1 in _chunks(nz, ny * nx * ss**3):
        zs = (z[k0:k1, None] + off[None, :] * vz).reshape(-1)
        Z, Y, X = zs[:, None, None], ys[None, :, None], xs[None, None, :]
        lab, a, m, t = evaluate(Z, Y, X)
        if labels_only:
            lab_v[k0:k1] = np.broadcast_to(lab, (k1 - k0, ny, nx))
            continue
        a = np.broadcast_to(a, (zs.size, ys.size, xs.size)).copy()
        for les in lesions:
            cz, cy, cx = (np.float32(c) for c in les.centre_mm)
            inside = (Z - cz) ** 2 + (Y - cy) ** 2 + (X - cx) ** 2 <= np.float32(les.radius_mm) ** 2
            a = np.where(inside, a * np.float32(les.contrast), a)
        shape6 = (k1 - k0, ss, ny, ss, nx, ss)
        act_v[k0:k1] = a.reshape(shape6).mean(axis=(1, 3, 5))
        mu_v[k0:k1] = np.broadcast_to(m, a.shape).reshape(shape6).mean(axis=(1, 3, 5))
        t1_v[k0:k1] = np.broadcast_to(t, a.shape).reshape(shape6).mean(axis=(1, 3, 5))
    return labels if labels_only else (act, mu, t1)


def _sphere_surface_points() -> np.ndarray:
    """Unit vectors (z, y, x): the 26 neighbour directions of a voxel, normalised."""
    steps = (-1, 0, 1)
    d = np.array([(a, b, c) for a in steps for b in steps for c in steps if (a, b, c) != (0, 0, 0)], float)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _draw_lesions(
    rng: np.random.Generator,
    params: PhantomParameters,
    geom: ImageGeometry,
    labels: np.ndarray,
    evaluate: _Evaluate,
    max_tries: int = 200,
) -> tuple[Lesion, ...]:
    """Hot and cold spheres inside the intracranial space, centred in brain tissue, not overlapping.

    A lesion is kept only if it covers at least one voxel centre; a lesion that finds
    no place in ``max_tries`` draws is dropped (e.g. a 2D slice above the brain).
    """
    n_hot = int(rng.integers(params.num_hot_lesions[0], params.num_hot_lesions[1] + 1))
    n_cold = int(rng.integers(params.num_cold_lesions[0], params.num_cold_lesions[1] + 1))
    candidates = np.argwhere(np.isin(labels, [int(t) for t in _BRAIN_TISSUES]))
    lesions: list[Lesion] = []
    if candidates.size == 0:
        return ()
    zc, yc, xc = geom.centred_coordinates_mm()
    vox = np.array(geom.voxel_size_mm)
    dirs = _sphere_surface_points()
    for hot in [True] * n_hot + [False] * n_cold:
        contrast_range = params.hot_lesion_contrast if hot else params.cold_lesion_contrast
        for _ in range(max_tries):
            k, j, i = candidates[rng.integers(len(candidates))]
            radius = float(rng.uniform(*params.lesion_radius_mm))
            jitter = rng.uniform(-0.5, 0.5, size=3) * vox
            jitter[0] = np.clip(jitter[0], -0.5 * radius, 0.5 * radius)
            centre = np.array([zc[k], yc[j], xc[i]]) + jitter
            contrast = float(rng.uniform(*contrast_range))
            if any(np.linalg.norm(centre - np.array(o.centre_mm)) < radius + o.radius_mm + 2.0 for o in lesions):
                continue
            pts = centre[None, :] + radius * dirs
            lab_c = evaluate(*(np.array([centre[a]], dtype=np.float32) for a in range(3)))[0]
            lab_s = evaluate(*(pts[:, a].astype(np.float32) for a in range(3)))[0]
            if int(np.asarray(lab_c).reshape(-1)[0]) not in [int(t) for t in _BRAIN_TISSUES]:
                continue
            if not np.isin(np.asarray(lab_s).reshape(-1), [int(t) for t in _INTRACRANIAL]).all():
                continue
            if not _sphere_mask(geom, tuple(centre), radius).any():
                continue
            lesions.append(Lesion(tuple(float(c) for c in centre), radius, contrast))
            break
    return tuple(lesions)


def _sphere_mask(geom: ImageGeometry, centre: tuple[float, float, float], radius: float) -> np.ndarray:
    z, y, x = geom.centred_coordinates_mm()
    d2 = (z[:, None, None] - centre[0]) ** 2 + (y[None, :, None] - centre[1]) ** 2 + (x[None, None, :] - centre[2]) ** 2
    return d2 <= radius * radius


def _lesion_mask(geom: ImageGeometry, lesions: tuple[Lesion, ...]) -> np.ndarray:
    mask = np.zeros(geom.shape, dtype=np.int8)
    for les in lesions:
        mask[_sphere_mask(geom, les.centre_mm, les.radius_mm)] = 1 if les.hot else -1
    return mask


def _finish(
    evaluate: _Evaluate,
    geom: ImageGeometry,
    rng: np.random.Generator,
    params: PhantomParameters,
    ratio: float,
    kind: str,
) -> Phantom:
    labels = _render(evaluate, geom, 1, labels_only=True)
    lesions = _draw_lesions(rng, params, geom, labels, evaluate)
    act, mu, t1 = _render(evaluate, geom, params.supersample, lesions)
    if params.anatomical_noise > 0:
        noisy = t1 + rng.normal(0.0, params.anatomical_noise, size=t1.shape).astype(np.float32)
        t1 = np.where(t1 > 0, np.maximum(noisy, 0.0), 0.0).astype(np.float32)  # air stays 0
    return Phantom(
        activity=np.ascontiguousarray(act, dtype=np.float32),
        mu_map=np.ascontiguousarray(mu, dtype=np.float32),
        anatomical=np.ascontiguousarray(t1, dtype=np.float32),
        labels=labels,
        lesion_mask=_lesion_mask(geom, lesions),
        lesions=lesions,
        image_geometry=geom,
        grey_white_ratio=float(ratio),
        kind=kind,
    )


def _draw_ratio(rng: np.random.Generator, params: PhantomParameters) -> float:
    s = params.grey_white_ratio_spread
    return float(params.grey_white_ratio * rng.uniform(1 - s, 1 + s))


# ============================================================================ procedural
# Adult sizes (mm): brain semi-axes (superior-inferior z, antero-posterior y, left-right x),
# and structures relative to the brain centre in the head frame (superior = -z, posterior = +y).
_BRAIN_SEMI_AXES = np.array([68.0, 80.0, 66.0])
# (centre z, y, x), semi-axes (z, y, x); mirrored in x when x != 0
_NUCLEI = {
    "caudate": ((-10.0, -18.0, 12.0), (12.0, 12.0, 5.0)),
    "putamen": ((0.0, -4.0, 24.0), (12.0, 15.0, 5.0)),
    "thalamus": ((-4.0, 10.0, 10.0), (9.0, 14.0, 8.0)),
}
_VENTRICLES = {
    "lateral": ((-18.0, -2.0, 7.0), (8.0, 28.0, 4.5)),
    "third": ((-2.0, 6.0, 0.0), (9.0, 10.0, 1.5)),
}


@dataclass(frozen=True)
class _Ellipsoid:
    centre: np.ndarray  # head frame (z, y, x) mm
    semi: np.ndarray
    value: float = 1.0

    def inside(self, zp, yp, xp) -> np.ndarray:
        c, a = self.centre.astype(np.float32), self.semi.astype(np.float32)
        return ((zp - c[0]) / a[0]) ** 2 + ((yp - c[1]) / a[1]) ** 2 + ((xp - c[2]) / a[2]) ** 2 <= 1.0


@dataclass(frozen=True)
class _ProceduralHead:
    centre: np.ndarray  # image frame (z, y, x) mm
    R: np.ndarray
    brain: np.ndarray  # semi-axes (z, y, x) mm
    csf_mm: float
    skull_mm: float
    scalp_mm: float
    cortex_mm: float
    fold_mm: float
    sulcus_half_width_mm: float
    fissure_half_width_mm: float
    fissure_depth_mm: float
    fold: _CosineField
    intensity: _CosineField
    bias: _CosineField
    nuclei: tuple[_Ellipsoid, ...]
    ventricles: tuple[_Ellipsoid, ...]
    ratio: float
    bone_mu: float
    wm_activity: float
    rel: tuple[float, float, float]  # scalp, skull, csf activity / WM
    intensity_amp: float

    def bounding_sphere(self) -> tuple[np.ndarray, float]:
        """(centre (z, y, x), radius) in mm of a sphere holding the whole head."""
        return self.centre, float(self.brain.max() + self.csf_mm + self.skull_mm + self.scalp_mm) + 1.0

    def __call__(self, z, y, x):
        zp, yp, xp = _to_frame(self.R, self.centre, z, y, x)
        shape = np.broadcast_shapes(zp.shape, yp.shape, xp.shape)
        zp, yp, xp = (np.broadcast_to(v, shape) for v in (zp, yp, xp))

        def radius(extra: float) -> np.ndarray:
            a = (self.brain + extra).astype(np.float32)
            return np.sqrt((zp / a[0]) ** 2 + (yp / a[1]) ** 2 + (xp / a[2]) ** 2)

        rb = radius(0.0)
        norm_p = np.sqrt(zp * zp + yp * yp + xp * xp)
        depth = (1.0 - rb) * norm_p / np.maximum(rb, 1e-6)  # mm below the brain surface, along the ray from the centre
        lab = np.zeros(shape, dtype=np.uint8)
        act = np.zeros(shape, dtype=np.float32)
        ratio = np.float32(self.ratio)

        def put(mask, tissue: Tissue, a: float) -> None:
            lab[mask] = tissue
            act[mask] = a

        put(radius(self.csf_mm + self.skull_mm + self.scalp_mm) <= 1.0, Tissue.SCALP, self.rel[0])
        put(radius(self.csf_mm + self.skull_mm) <= 1.0, Tissue.SKULL, self.rel[1])
        put(radius(self.csf_mm) <= 1.0, Tissue.CSF, self.rel[2])
        brain = rb <= 1.0
        put(brain, Tissue.WHITE_MATTER, 1.0)
        # cortex: a ribbon under the surface, folded into sulci (zero sheets of a random field)
        # that reach fold_mm deep, each a thin CSF cleft lined with grey matter on both banks
        sulcus = self.fold.distance_to_zero_set(zp, yp, xp)
        folded = brain & (depth < self.fold_mm)
        put(brain & (depth < self.cortex_mm), Tissue.GREY_MATTER, ratio)
        put(folded & (sulcus < self.sulcus_half_width_mm + self.cortex_mm), Tissue.GREY_MATTER, ratio)
        cleft = folded & (sulcus < self.sulcus_half_width_mm) & (depth < self.fold_mm - self.cortex_mm)
        put(cleft, Tissue.CSF, self.rel[2])
        # interhemispheric fissure above the corpus callosum, lined with cortex
        upper = brain & (depth < self.fissure_depth_mm) & (zp < 0.25 * self.brain[0])
        put(upper & (np.abs(xp) < self.fissure_half_width_mm + self.cortex_mm), Tissue.GREY_MATTER, ratio)
        put(upper & (np.abs(xp) < self.fissure_half_width_mm), Tissue.CSF, self.rel[2])
        for e in self.nuclei:
            put(brain & e.inside(zp, yp, xp), Tissue.DEEP_GREY_MATTER, self.ratio * e.value)
        for e in self.ventricles:
            put(brain & e.inside(zp, yp, xp), Tissue.CSF, self.rel[2])
        field_ = 1.0 + np.float32(self.intensity_amp) * self.intensity(zp, yp, xp)
        act = act * np.float32(self.wm_activity) * np.maximum(field_, 0.3)
        mu = np.where(lab == Tissue.BACKGROUND, 0.0, MU_WATER_PER_CM).astype(np.float32)
        mu[lab == Tissue.SKULL] = self.bone_mu
        t1 = _T1[lab] * (1.0 + np.float32(0.05) * self.bias(zp, yp, xp))
        return lab, act, mu, t1


def _draw_procedural_head(geom: ImageGeometry, rng: np.random.Generator, params: PhantomParameters) -> _ProceduralHead:
    sv = params.size_variation
    csf, skull, scalp = 2.0, float(rng.uniform(5.0, 8.0)), float(rng.uniform(4.0, 6.0))
    # shrink the whole head (not the lesions) to fit the image's field of view
    head_max = (_BRAIN_SEMI_AXES[1:].max() + csf + skull + scalp) * (1 + sv)
    fov = geom.fov_radius_mm()
    s = min(1.0, 0.9 * fov / head_max) if fov > 0 else 1.0
    brain = _BRAIN_SEMI_AXES * rng.uniform(1 - sv, 1 + sv, size=3) * s
    scale_xyz = brain / _BRAIN_SEMI_AXES
    R = _rotation(rng, params.max_rotation_deg)
    level = float(rng.uniform(*params.slice_level))
    z_mid = geom.origin_mm[0]  # centred frame: the image's axial middle sits at origin_z
    shift_xy = rng.uniform(-5.0, 5.0, size=2) * s
    centre = np.array([z_mid + level * brain[0], shift_xy[0], shift_xy[1]])

    def structures(table: dict, value_range: tuple[float, float], size_factor: float = 1.0) -> tuple[_Ellipsoid, ...]:
        out = []
        for c, a in table.values():
            c = np.array(c) * scale_xyz + rng.uniform(-2.0, 2.0, size=3) * s
            a = np.array(a) * scale_xyz * size_factor * rng.uniform(0.9, 1.1, size=3)
            value = float(rng.uniform(*value_range))
            out.append(_Ellipsoid(c, a, value))
            if c[2] != 0.0:
                out.append(_Ellipsoid(c * np.array([1, 1, -1]), a, value))
        return tuple(out)

    nuclei = structures(_NUCLEI, (0.8, 1.0))
    ventricles = structures(_VENTRICLES, (1.0, 1.0), size_factor=float(rng.uniform(0.8, 1.4)))
    return _ProceduralHead(
        centre=centre,
        R=R,
        brain=brain,
        csf_mm=csf * s,
        skull_mm=skull * s,
        scalp_mm=scalp * s,
        cortex_mm=float(rng.uniform(2.5, 3.5)) * s,
        fold_mm=float(rng.uniform(10.0, 18.0)) * s,
        sulcus_half_width_mm=float(rng.uniform(0.4, 0.8)) * s,
        fissure_half_width_mm=float(rng.uniform(0.75, 1.5)) * s,
        fissure_depth_mm=float(rng.uniform(0.35, 0.5)) * brain[2],
        fold=_CosineField.draw(rng, 12, (25.0 * s, 50.0 * s)),
        intensity=_CosineField.draw(rng, 8, (40.0, 120.0)),
        bias=_CosineField.draw(rng, 4, (150.0, 300.0)),
        nuclei=nuclei,
        ventricles=ventricles,
        ratio=_draw_ratio(rng, params),
        bone_mu=float(rng.uniform(*params.bone_mu_per_cm)),
        wm_activity=params.white_matter_activity_bq_ml,
        rel=(params.scalp_activity_ratio, params.skull_activity_ratio, params.csf_activity_ratio),
        intensity_amp=params.intensity_variation,
    )


def procedural_phantom(
    image_geometry: ImageGeometry, rng: RandomLike = None, params: PhantomParameters = PhantomParameters()
) -> Phantom:
    """A random analytic head phantom on ``image_geometry`` (see the module docstring).

    The head is shrunk (never enlarged) to fit 90% of the image's field-of-view radius;
    for a single slice (nz = 1) the slice cuts the brain at a random level
    (:attr:`PhantomParameters.slice_level`). Deterministic for a given ``rng`` seed.
    """
    rng = _rng(rng)
    head = _draw_procedural_head(image_geometry, rng, params)
    return _finish(head, image_geometry, rng, params, head.ratio, "procedural")


# ============================================================================ MNI152
@dataclass(frozen=True)
class _MNITemplates:
    """Tissue fractions on the MNI grid (arrays (i, j, k) in RAS voxel order) and its affine."""

    volumes: np.ndarray  # (6, I, J, K): gm, wm, csf, skull, scalp, t1
    affine: np.ndarray  # voxel -> RAS mm
    brain_centre_ras: np.ndarray
    head_radius_mm: float  # largest distance of a head voxel from the brain centre in an axial plane
    head_extent_mm: float  # largest distance of a head voxel from the brain centre


def _dilate(mask, radius_mm: float, voxel_mm: float):
    import torch
    import torch.nn.functional as F

    r = int(math.ceil(radius_mm / voxel_mm))
    g = torch.arange(-r, r + 1, dtype=torch.float32) * voxel_mm
    ball = ((g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) <= radius_mm**2).float()
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return (F.conv3d(m, ball[None, None], padding=r)[0, 0] > 0.5).numpy()


#: the arrays of a templates file (:func:`save_mni152_templates`)
MNI152_FILE_KEYS = ("gm", "wm", "t1", "affine")


def _nilearn_mni152(resolution_mm: int) -> dict[str, np.ndarray]:
    """nilearn's MNI152 grey matter, white matter and T1 templates (float32, (i, j, k)) and their affine."""
    try:
        from nilearn import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mni152_phantom needs nilearn (the MNI152 templates): pip install sirf_fbsem[phantoms], or a "
            "templates file written by save_mni152_templates (simulate --mni152-templates FILE)"
        ) from err
    gm_img = datasets.load_mni152_gm_template(resolution=resolution_mm)
    return {
        "gm": np.asarray(gm_img.dataobj, dtype=np.float32),
        "wm": np.asarray(datasets.load_mni152_wm_template(resolution=resolution_mm).dataobj, dtype=np.float32),
        "t1": np.asarray(datasets.load_mni152_template(resolution=resolution_mm).dataobj, dtype=np.float32),
        "affine": np.asarray(gm_img.affine, dtype=np.float64),
    }


def save_mni152_templates(path: str | os.PathLike, resolution_mm: int = 2) -> Path:
    """Write nilearn's MNI152 templates (what :func:`mni152_phantom` reads) to ``path`` (.npz), for machines
    without nilearn (``simulate --mni152-templates``); the phantoms made from it are the same."""
    raw = _nilearn_mni152(int(resolution_mm))
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **raw)
    return path


def read_mni152_templates(path: str) -> dict[str, np.ndarray]:
    """The arrays of a templates file (:func:`save_mni152_templates`), checked (:class:`InputError` naming the file)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: np.asarray(z[k]) for k in MNI152_FILE_KEYS if k in z.files}
    except (OSError, ValueError) as err:
        raise InputError(f"MNI152 templates file {path!r} cannot be read: {err}") from None
    missing = [k for k in MNI152_FILE_KEYS if k not in raw]
    if missing:
        raise InputError(f"MNI152 templates file {path!r} lacks {missing}; expected the arrays {MNI152_FILE_KEYS} "
                         f"(written by save_mni152_templates)")
    shape = raw["gm"].shape
    if raw["gm"].ndim != 3 or raw["wm"].shape != shape or raw["t1"].shape != shape or raw["affine"].shape != (4, 4):
        raise InputError(f"MNI152 templates file {path!r}: gm, wm, t1 must be 3D of one shape and affine 4 x 4; got "
                         f"{raw['gm'].shape}, {raw['wm'].shape}, {raw['t1'].shape}, {raw['affine'].shape}")
    return {k: v.astype(np.float64 if k == "affine" else np.float32) for k, v in raw.items()}


@functools.lru_cache(maxsize=2)
def _load_mni152(resolution_mm: int, templates_file: str | None = None) -> _MNITemplates:
    raw = _nilearn_mni152(resolution_mm) if templates_file is None else read_mni152_templates(templates_file)
    gm, wm, t1, affine = raw["gm"], raw["wm"], raw["t1"], raw["affine"]
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    vox = float(abs(affine[0, 0]))
    intracranial = (t1 > 0.02) | (gm + wm > 0.3)
    csf = np.clip(intracranial.astype(np.float32) - gm - wm, 0.0, 1.0)
    # the population templates are blurred across subjects; sharpen the tissue fractions
    # (p^3, renormalised to the same intracranial total) towards a single-subject segmentation
    total = gm + wm + csf
    sharp = np.stack([gm, wm, csf]) ** 3
    sharp *= total / np.maximum(sharp.sum(axis=0), 1e-12)
    gm, wm, csf = sharp
    skull_outer = _dilate(intracranial, 7.0, vox)
    head = _dilate(intracranial, 12.0, vox)
    skull = (skull_outer & ~intracranial).astype(np.float32)
    scalp = (head & ~skull_outer).astype(np.float32)
    t1n = t1 / max(float(np.percentile(t1[wm > 0.9], 50)), 1e-6) * 0.85 if (wm > 0.9).any() else t1
    ijk = np.argwhere(gm + wm > 0.5)
    centre_ijk = ijk.mean(axis=0)
    centre = (affine @ np.append(centre_ijk, 1.0))[:3]
    head_ijk = np.argwhere(head)
    head_ras = (affine[:3, :3] @ head_ijk.T).T + affine[:3, 3]
    head_r = float(np.sqrt(((head_ras[:, :2] - centre[:2]) ** 2).sum(axis=1)).max())
    head_ext = float(np.sqrt(((head_ras - centre) ** 2).sum(axis=1)).max())
    vols = np.stack([gm, wm, csf, skull, scalp, t1n]).astype(np.float32)
    return _MNITemplates(vols, affine, centre, head_r, head_ext)


@dataclass(frozen=True)
class _MNIHead:
    tpl: _MNITemplates
    centre: np.ndarray  # image frame (z, y, x)
    A: np.ndarray  # head frame (z, y, x) -> image frame, rotation x scaling x shear
    ratio: float
    bone_mu: float
    wm_activity: float
    rel: tuple[float, float, float]
    intensity_amp: float
    intensity: _CosineField
    bias: _CosineField

    def bounding_sphere(self) -> tuple[np.ndarray, float]:
        """(centre (z, y, x), radius) in mm of a sphere holding the whole head."""
        return self.centre, float(self.tpl.head_extent_mm * np.linalg.norm(self.A, 2)) + 2.0

    def __call__(self, z, y, x):
        import torch
        import torch.nn.functional as F

        shape = np.broadcast_shapes(np.shape(z), np.shape(y), np.shape(x))
        a_inv = np.linalg.inv(self.A)  # image frame -> head frame (z: inferior, y: posterior, x: left)
        # head frame -> RAS about the brain centre: (R, A, S) = (-x, -y, -z); RAS -> template voxels
        flip = np.array([[0, 0, -1], [0, -1, 0], [-1, 0, 0]], dtype=np.float64)
        inv = np.linalg.inv(self.tpl.affine)
        dims = np.array(self.tpl.volumes.shape[1:], dtype=np.float64)
        norm = np.diag(2.0 / (dims - 1))  # grid_sample's [-1, 1] (align_corners)
        M = norm @ inv[:3, :3] @ flip @ a_inv
        d = norm @ (inv[:3, :3] @ self.tpl.brain_centre_ras + inv[:3, 3]) - 1.0
        gi, gj, gk = _to_frame(M.T, self.centre, z, y, x)
        # grid_sample wants (x, y, z) = (k, j, i) of an (N, C, I, J, K) input
        grid = torch.stack(
            [torch.from_numpy(np.broadcast_to(g + np.float32(o), shape).copy()) for g, o in zip((gk, gj, gi), d[::-1])],
            dim=-1,
        )
        vol = torch.from_numpy(self.tpl.volumes)[None]
        out = F.grid_sample(vol, grid.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out[0, :, :, 0, 0].reshape((6,) + tuple(shape))
        gm, wm, csf, skull, scalp, t1 = out
        frac = torch.stack([torch.zeros_like(gm), scalp, skull, csf, gm, wm])
        lab = frac.argmax(dim=0).to(torch.uint8)
        lab[frac.sum(dim=0) < 0.5] = int(Tissue.BACKGROUND)
        s_rel, k_rel, c_rel = self.rel
        hz, hy, hx = _to_frame(a_inv.T, self.centre, z, y, x)
        field_ = torch.from_numpy(np.maximum(1.0 + np.float32(self.intensity_amp) * self.intensity(hz, hy, hx), 0.3))
        bias = torch.from_numpy(1.0 + np.float32(0.05) * self.bias(hz, hy, hx))
        act = (gm * self.ratio + wm + csf * c_rel + skull * k_rel + scalp * s_rel) * field_ * self.wm_activity
        soft = (gm + wm + csf + scalp).clamp(0.0, 1.0)
        skull = torch.minimum(skull.clamp_min(0.0), 1.0 - soft)
        mu = soft * MU_WATER_PER_CM + skull * self.bone_mu
        t1 = (t1 + scalp * float(_T1[Tissue.SCALP]) + skull * float(_T1[Tissue.SKULL])) * bias
        return lab.numpy(), act.float().numpy(), mu.float().numpy(), t1.float().numpy()


def mni152_phantom(
    image_geometry: ImageGeometry,
    rng: RandomLike = None,
    params: PhantomParameters = PhantomParameters(),
    resolution_mm: int = 2,
    templates_file: str | os.PathLike | None = None,
) -> Phantom:
    """A phantom from nilearn's MNI152 grey/white matter templates under a random affine deformation.

    CSF is the intracranial space the templates leave to neither grey nor white matter;
    the three fractions are sharpened (cubed and renormalised), as the population
    templates are blurrier than one subject's segmentation. Skull (7 mm) and scalp
    (5 mm) are grown around the intracranial space. The head is rotated (as
    :func:`procedural_phantom`), scaled by 1 +- ``size_variation`` per axis, sheared
    slightly, shrunk to fit 90% of the field-of-view radius, and shifted so that the
    image's axial middle lies at a random level (:attr:`PhantomParameters.slice_level`).
    Needs nilearn (``pip install sirf_fbsem[phantoms]``), or ``templates_file``: the same templates
    written by :func:`save_mni152_templates` (then ``resolution_mm`` is the file's).
    """
    tpl = _load_mni152(int(resolution_mm), None if templates_file is None else str(templates_file))
    rng = _rng(rng)
    geom = image_geometry
    sv = params.size_variation
    fov = geom.fov_radius_mm()
    s = min(1.0, 0.9 * fov / (tpl.head_radius_mm * (1 + sv))) if fov > 0 else 1.0
    R = _rotation(rng, params.max_rotation_deg)
    scales = rng.uniform(1 - sv, 1 + sv, size=3) * s
    shear = np.eye(3) + np.triu(rng.uniform(-0.03, 0.03, size=(3, 3)), 1)
    A = R @ np.diag(scales) @ shear
    level = float(rng.uniform(*params.slice_level))
    brain_half_height = 65.0 * scales[0]
    shift_xy = rng.uniform(-5.0, 5.0, size=2) * s
    centre = np.array([geom.origin_mm[0] + level * brain_half_height, shift_xy[0], shift_xy[1]])
    head = _MNIHead(
        tpl=tpl,
        centre=centre,
        A=A,
        ratio=_draw_ratio(rng, params),
        bone_mu=float(rng.uniform(*params.bone_mu_per_cm)),
        wm_activity=params.white_matter_activity_bq_ml,
        rel=(params.scalp_activity_ratio, params.skull_activity_ratio, params.csf_activity_ratio),
        intensity_amp=params.intensity_variation,
        intensity=_CosineField.draw(rng, 8, (40.0, 120.0)),
        bias=_CosineField.draw(rng, 4, (150.0, 300.0)),
    )
    return _finish(head, geom, rng, params, head.ratio, "mni152")


def make_phantom(
    kind: str, image_geometry: ImageGeometry, rng: RandomLike = None, params: PhantomParameters = PhantomParameters(),
    mni152_templates: str | os.PathLike | None = None,
) -> Phantom:
    """``procedural_phantom`` or ``mni152_phantom`` (from ``mni152_templates`` if given) by name."""
    if kind == "procedural":
        return procedural_phantom(image_geometry, rng, params)
    if kind == "mni152":
        return mni152_phantom(image_geometry, rng, params, templates_file=mni152_templates)
    raise ValueError(f"phantom kind must be one of {PHANTOM_KINDS}, got {kind!r}")
