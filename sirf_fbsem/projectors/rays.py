"""The LORs of a sinogram (or of a subset of its views) as flat tables for the kernels.

This is the only place where :mod:`sirf_fbsem.geometry` is turned into numbers the
projection kernels read; both kernels (numba on CPU, torch on CUDA) take a
:class:`RayTable` and nothing else, so they trace identical lines.

Ray of (row r, view v, tangential t), in the projector frame (mm, z scanner-centred),
parametrised by the in-plane coordinate u (STIR's ray tracer):

    X(u) = s[t] cos(phi[v]) + u sin(phi[v])
    Y(u) = s[t] sin(phi[v]) - u cos(phi[v])
    Z(u) = m[r] + dz - u tan_theta[r, t]

Axial "thickness" as STIR's ray tracer: when a row's axial sampling is n > 1 times
the voxel size in z, n rays are traced at ``dz = ((i + 0.5)/n - 0.5) * sampling``,
each weighted 1/n (for n = 2 this is STIR's half-weight neighbour planes).
With ``fov_radius_mm`` finite, only |u| <= sqrt(R_fov^2 - s^2) is traced (STIR's
default ``restrict_to_cylindrical_FOV``).

What is traced, as STIR's ``ProjMatrixByBinUsingRayTracing`` (rel_6.4.0) does it:

* R_fov comes from the image alone, ``min(min(max i, -min i) vx, min(max j, -min j) vy)``
  (:meth:`ImageGeometry.fov_radius_mm`); it is not limited by the detector ring, so an
  image wider than the ring is traced out to its own FOV, past the detectors.
* In z nothing bounds a ray but the image's planes (STIR: "assuming infinitely long
  scanner"; voxels outside the image's planes are dropped in ``forward_project``), so
  planes past the scanner's axial extent contribute wherever oblique LORs cross them.
* Arc-corrected bins with |s| >= R (the ring radius) have no detector pair. In segments
  with a mean ring difference of 0 they are ordinary lines (tan theta = 0) and are
  traced where they cross the FOV, as STIR does; in oblique segments STIR's tan theta is
  undefined (sqrt of a negative number) and the table holds NaN there: the kernels
  leave such rays empty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..geometry import GeometryError, ImageGeometry, SinogramGeometry

__all__ = ["RayTable", "make_ray_table", "tangential_lor_offsets_mm"]


@dataclass(frozen=True)
class RayTable:
    """Flat LOR description. Arrays are float64 unless noted; shapes in brackets."""

    cos_phi: np.ndarray  # [V]
    sin_phi: np.ndarray  # [V]
    s: np.ndarray  # [N] mm
    m: np.ndarray  # [S] mm, scanner-centred axial position of the LOR middle
    tan_theta: np.ndarray  # [S, N]; NaN: no LOR, not traced
    axial_sampling: np.ndarray  # [S] mm
    num_axial_rays: np.ndarray  # [S] int64, >= 1
    image_shape: tuple[int, int, int]  # (nz, ny, nx)
    voxel_size: tuple[float, float, float]  # (vz, vy, vx) mm
    first_voxel: tuple[float, float, float]  # (z0, y0, x0) mm, centre of voxel [0,0,0], projector frame
    fov_radius_mm: float  # math.inf for no restriction

    @property
    def sinogram_shape(self) -> tuple[int, int, int]:
        """(S, V, N) of the (subset) sinogram these rays fill."""
        return (self.m.shape[0], self.cos_phi.shape[0], self.s.shape[0])


def _tan_theta_table(sino: SinogramGeometry, s: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """tan(theta) per (row, tangential position), shape (S, N).

    ``tan theta = delta * ring_spacing / (2 sqrt(R^2 - s^2))`` (STIR's ``get_tantheta``); 0 for
    rows with a mean ring difference of 0; NaN (not traced) for |s| >= R in the other rows.
    """
    R = sino.scanner.effective_ring_radius_mm
    beyond = np.abs(s) >= R
    with np.errstate(invalid="ignore", divide="ignore"):
        tan_theta = delta[:, None] * sino.scanner.ring_spacing_mm / (2.0 * np.sqrt(R * R - s[None, :] ** 2))
    tan_theta[:, beyond] = np.nan
    tan_theta[np.abs(delta) < 1e-4, :] = 0.0
    return np.ascontiguousarray(tan_theta)


def tangential_lor_offsets_mm(sino: SinogramGeometry, num_tangential_LORs: int) -> np.ndarray:
    """s offsets (mm) of STIR's tangential sub-rays, shape (n, N).

    As ``ProjMatrixByBinUsingRayTracing`` with ``num_tangential_LORs = n``: sub-ray i of bin t
    sits at ``s(t) + (i - (n - 1)/2) * sampling(t) / n`` with STIR's
    ``get_sampling_in_s(t) = |s(t+1) - s(t-1)| / 2``; each has weight 1/n, and all keep the
    bin's tan(theta).
    """
    n = int(num_tangential_LORs)
    if n < 1:
        raise GeometryError(f"num_tangential_LORs must be >= 1, got {num_tangential_LORs}")
    t = sino.tangential_pos_nums()
    sampling = np.abs(sino.s_mm(t + 1) - sino.s_mm(t - 1)) / 2.0
    return (np.arange(n)[:, None] - (n - 1) / 2.0) * sampling[None, :] / n


def make_ray_table(
    sino: SinogramGeometry,
    image: ImageGeometry,
    views: np.ndarray | None = None,
    restrict_to_cylindrical_fov: bool = True,
    s_offset_mm: np.ndarray | None = None,
) -> RayTable:
    """Rays of ``views`` (all when None) of ``sino`` through the voxel grid ``image``.

    Any image is accepted, including one reaching past the ring or the scanner's axial
    extent (see the module docstring); :meth:`ImageGeometry.check_fits` says so.
    """
    phi = sino.phi_rad()
    if views is not None:
        views = np.asarray(views, dtype=np.int64)
        if views.ndim != 1 or views.size == 0 or views.min() < 0 or views.max() >= sino.num_views:
            raise GeometryError(f"views must be a non-empty 1D list in [0, {sino.num_views - 1}], got {views}")
        phi = phi[views]
    s = sino.s_mm()
    m, delta, samp = sino.sinogram_lor_tables()
    tan_theta = _tan_theta_table(sino, s, delta)  # of the bin, also for its tangential sub-rays
    if s_offset_mm is not None:  # a tangential sub-ray (tangential_lor_offsets_mm)
        s = s + np.asarray(s_offset_mm, dtype=np.float64)
    vz = image.voxel_size_mm[0]
    # STIR: ceil(sampling / vz - 1e-3) rays per axial position
    n_ax = np.maximum(1, np.ceil(samp / vz - 1e-3)).astype(np.int64)
    z, y, x = image.centred_coordinates_mm()
    fov = image.fov_radius_mm() if restrict_to_cylindrical_fov else math.inf
    return RayTable(
        cos_phi=np.cos(phi),
        sin_phi=np.sin(phi),
        s=s,
        m=m,
        tan_theta=tan_theta,
        axial_sampling=samp,
        num_axial_rays=n_ax,
        image_shape=image.shape,
        voxel_size=image.voxel_size_mm,
        first_voxel=(float(z[0]), float(y[0]), float(x[0])),
        fov_radius_mm=float(fov),
    )
