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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..geometry import GeometryError, ImageGeometry, SinogramGeometry

__all__ = ["RayTable", "make_ray_table"]


@dataclass(frozen=True)
class RayTable:
    """Flat LOR description. Arrays are float64 unless noted; shapes in brackets."""

    cos_phi: np.ndarray  # [V]
    sin_phi: np.ndarray  # [V]
    s: np.ndarray  # [N] mm
    m: np.ndarray  # [S] mm, scanner-centred axial position of the LOR middle
    tan_theta: np.ndarray  # [S, N]
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


def make_ray_table(
    sino: SinogramGeometry,
    image: ImageGeometry,
    views: np.ndarray | None = None,
    restrict_to_cylindrical_fov: bool = True,
) -> RayTable:
    """Rays of ``views`` (all when None) of ``sino`` through the voxel grid ``image``."""
    image.check_fits(sino)
    phi = sino.phi_rad()
    if views is not None:
        views = np.asarray(views, dtype=np.int64)
        if views.ndim != 1 or views.size == 0 or views.min() < 0 or views.max() >= sino.num_views:
            raise GeometryError(f"views must be a non-empty 1D list in [0, {sino.num_views - 1}], got {views}")
        phi = phi[views]
    s = sino.s_mm()
    m, delta, samp = sino.sinogram_lor_tables()
    R = sino.scanner.effective_ring_radius_mm
    beyond = np.abs(s) >= R  # arc-corrected bins outside the ring: no LOR
    if beyond.any() and not restrict_to_cylindrical_fov:
        raise GeometryError(
            f"{int(beyond.sum())} tangential positions reach |s| >= the ring radius {R:.1f} mm (largest "
            f"{float(np.abs(s).max()):.1f} mm); they have no LOR: use restrict_to_cylindrical_fov=True, "
            "which leaves them empty as STIR's ray tracer does"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        tan_theta = delta[:, None] * sino.scanner.ring_spacing_mm / (2.0 * np.sqrt(R * R - s[None, :] ** 2))
    tan_theta[np.abs(delta) < 1e-4, :] = 0.0
    tan_theta[:, beyond] = 0.0  # never traced: |s| >= R > FOV radius (check_fits)
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
        tan_theta=np.ascontiguousarray(tan_theta),
        axial_sampling=samp,
        num_axial_rays=n_ax,
        image_shape=image.shape,
        voxel_size=image.voxel_size_mm,
        first_voxel=(float(z[0]), float(y[0]), float(x[0])),
        fov_radius_mm=float(fov),
    )
