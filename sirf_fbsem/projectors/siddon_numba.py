"""Siddon ray tracing on the CPU (numba): STIR's ``ProjMatrixByBinUsingRayTracing``, row for row.

    y[b, r, v, t] = sum_voxels  w(r, v, t; voxel) x[b, voxel]

with ``w`` the matrix element STIR's ray-tracing projector (and so SIRF's
``AcquisitionModelUsingRayTracingMatrix``) computes for bin (r, v, t): exact intersection
lengths of the bin's ray(s) with the voxels, in STIR's "pixel units" (mm / x voxel size),
averaged over its ``num_tangential_LORs`` tangential rays and its axial rays. This module
re-implements, from the published description of the algorithm and STIR 6.4's behaviour,
what that projector does, including the details that decide single matrix elements:

* **The traced segment** (``ray_trace_one_lor``): the LOR ``X = s cos(phi) + a sin(phi)``,
  ``Y = s sin(phi) - a cos(phi)``, ``Z = m + offset_z - a tan(theta)`` is cut at the
  cylindrical FOV ``|a| <= sqrt(R_fov^2 - s^2)`` (or STIR's square FOV when the cylinder
  restriction is off); z is not cut ("infinitely long scanner"), voxels outside the image's
  planes are dropped when projecting. The end points, in voxel units, are ordered by z,
  then y, then x.
* **The Siddon walk** (``RayTraceVoxelsOnCartesianGrid``, after Siddon 1985 / Jacobs et al.
  1998, incremental form): it starts where the ray enters the voxel holding the first end
  point and stops where it leaves the voxel holding the last one, so both end voxels get
  their full chord; an axis along which the ray moves by <= 1e-4 voxel is held constant;
  a ray lying on a voxel boundary plane (within 1e-4) is traced half a voxel to each side
  with half weight; the stop is tested against 0.9999 x the exact exit parameter (a last
  sliver shorter than 1e-4 of the traced length is dropped), as STIR does.
* **Axial rays**: ``n = ceil(sampling_m / vz - 1e-3)`` rays per bin; for oblique bins the
  first sits at ``-(n - 1)/(2n)`` of the axial sampling and the others are copies shifted
  by whole planes; for direct bins (tan theta = 0) one ray is traced (moved by 0.1 plane
  off a plane boundary) and spread over the planes the bin's axial extent overlaps, with
  the overlap as weight (``add_adjacent_z``). Weight ``1 / (vx n n_tangential)`` per ray.
* **Symmetries**: STIR computes the row of a *basic* bin (segment >= 0, view in [0, 45]
  degrees, tangential position >= 0, axial position 0) and maps its voxels to the related
  bins (x/y swaps and sign changes, a mirror in z about the LOR's centre, shifts by whole
  planes). Rows are therefore not exactly mirror-symmetric where the 0.9999 stop test
  bites, and which end gets it depends on the basic bin. The kernels do the same: one
  trace per basic bin, applied to every related bin of the sinogram (or subset), which
  also makes them several times faster than tracing every bin.

Arithmetic is float64 (STIR's is float32): elements agree with STIR's to float32
rounding (~1e-5 of a voxel's chord) except where a tolerance test (the 1e-4, 0.001, 0.9999
thresholds above) falls the other way within that rounding, which is rare.

The kernels: :func:`forward_kernel` writes every output bin once (no races);
:func:`adjoint_kernel` splits the basic bins into as many contiguous chunks as there are
buffers, each scattering into its own image (no atomics), summed by :func:`reduce_buffers`
in a fixed order, so both are deterministic for a given number of threads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..geometry import GeometryError, ImageGeometry, SinogramGeometry, stir_view_symmetry

__all__ = ["SiddonPlan", "make_siddon_plan", "siddon_forward", "siddon_adjoint", "forward_kernel", "adjoint_kernel",
           "reduce_buffers", "basic_bin_and_symmetry", "row_elements", "XY_OPS"]

#: (a, b, c, d) of each symmetry's in-plane map of centred voxel indices: x' = a x + b y, y' = c x + d y
XY_OPS = {
    "id": (1, 0, 0, 1),
    "xmx": (-1, 0, 0, 1),
    "ymy": (1, 0, 0, -1),
    "xmx_ymy": (-1, 0, 0, -1),
    "xy_yx": (0, 1, 1, 0),
    "xmy_yx": (0, -1, 1, 0),
    "xy_ymx": (0, 1, -1, 0),
    "xmy_ymx": (0, -1, -1, 0),
}
_OP_NAMES = list(XY_OPS)


def basic_bin_and_symmetry(segment: int, view: int, tang: int, num_views: int, symmetry: str):
    """STIR's basic bin of (segment, view, tangential_pos_num) and the symmetry mapping it there.

    As ``DataSymmetriesForBins_PET_CartesianGrid`` (STIR 6.4, cylindrical scanner, segment
    and s symmetries on, view symmetries per ``symmetry`` = "90" / "180" / "none", z shift on):
    returns ``(basic_segment, basic_view, basic_tang, xy_op, zq)``; the basic axial position is 0.
    """
    do90 = symmetry == "90"
    do180 = symmetry in ("90", "180")
    v90 = num_views // 2
    v45 = num_views // 4
    v135 = v45 * 3
    sp = tang > 0
    if do90 and v90 < view <= v135:
        bview = num_views - view if view >= v135 else view - v90
        if segment > 0:
            op, zq = ("xmy_yx", False) if sp else ("xy_ymx", True)
        elif segment < 0:
            op, zq = ("xmy_yx", True) if sp else ("xy_ymx", False)
        else:
            op, zq = ("xmy_yx", False) if sp else ("xy_ymx", False)
    elif do90 and v45 < view <= v90:
        bview = v90 - view
        if segment > 0:
            op, zq = ("xy_yx", True) if sp else ("xmy_ymx", False)
        elif segment < 0:
            op, zq = ("xy_yx", False) if sp else ("xmy_ymx", True)
        else:
            op, zq = ("xy_yx", False) if sp else ("xmy_ymx", False)
    elif do180 and view > v90:
        bview = num_views - view
        if segment > 0:
            op, zq = ("xmx", True) if sp else ("ymy", False)
        else:
            op, zq = ("xmx", False) if sp else ("ymy", True)
    else:
        bview = view
        sn = tang < 0
        if segment > 0:
            op, zq = ("xmx_ymy", True) if sn else ("id", False)
        elif segment < 0:
            op, zq = ("xmx_ymy", False) if sn else ("id", True)
        else:
            op, zq = ("xmx_ymy", False) if sn else ("id", False)
    return abs(segment), bview, abs(tang), op, zq


@dataclass(frozen=True)
class SiddonPlan:
    """Basic bins to trace and, per basic bin, the sinogram bins it fills (CSR).

    Basic bin arrays have one entry per basic bin (``NB``); target arrays one per related
    (segment, view, tangential position) of the sinogram or subset (``NT``), the axial
    positions of the target's segment being looped over in the kernel.
    """

    # basic bins
    b_s: np.ndarray  # [NB, n_tan] s of every tangential ray, mm
    b_cphi: np.ndarray  # [NB]
    b_sphi: np.ndarray  # [NB]
    b_tt: np.ndarray  # [NB] tan theta (NaN: no LOR)
    b_zc: np.ndarray  # [NB] float32, mm: (zc - a tan theta) / vz is the first axial ray's z index at a
    b_nax: np.ndarray  # [NB] int64 axial rays
    b_zfirst: np.ndarray  # [NB] z (voxel units, from the lower edge of the bin's axial extent) of voxel index 0
    b_zwidth: np.ndarray  # [NB] the bin's axial extent in voxels (sampling_m / vz)
    b_target_start: np.ndarray  # [NB + 1] int64
    # targets
    t_row0: np.ndarray  # [NT] first SIRF row of the target's segment
    t_nax: np.ndarray  # [NT] its axial positions
    t_view: np.ndarray  # [NT] local view index (in the plan's views)
    t_tang: np.ndarray  # [NT] tangential index (0..N-1)
    t_op: np.ndarray  # [NT, 4] int64 in-plane map (XY_OPS)
    t_zq: np.ndarray  # [NT] int64 1: z -> q - z
    t_q: np.ndarray  # [NT] int64
    t_npp: np.ndarray  # [NT] int64 planes per axial position
    # geometry
    image_shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    centre_index: tuple[int, int]  # (ny // 2, nx // 2): array index of centred index 0
    fov_radius_mm: float
    restrict_to_cylindrical_fov: bool
    num_tangential_LORs: int
    sinogram_shape: tuple[int, int, int]  # (S, V_subset, N)
    buffer_size: int  # elements one basic bin can produce (upper bound)

    def kernel_args(self) -> tuple:
        return (self.b_s, self.b_cphi, self.b_sphi, self.b_tt, self.b_zc, self.b_nax, self.b_zfirst,
                self.b_zwidth, self.b_target_start, self.t_row0, self.t_nax, self.t_view, self.t_tang,
                self.t_op, self.t_zq, self.t_q, self.t_npp,
                np.asarray(self.image_shape, dtype=np.int64), np.asarray(self.voxel_size, dtype=np.float32),
                np.asarray(self.centre_index, dtype=np.int64), np.float32(self.fov_radius_mm),
                bool(self.restrict_to_cylindrical_fov), int(self.buffer_size))


def _tan_theta(sino: SinogramGeometry, delta: float, s: float) -> float:
    if abs(delta) < 1e-4:
        return 0.0
    R = sino.scanner.effective_ring_radius_mm
    if abs(s) >= R:
        return math.nan
    return delta * sino.scanner.ring_spacing_mm / (2.0 * math.sqrt(R * R - s * s))


class _Float32Lor:
    """A basic bin's LOR parameters computed as STIR computes them, in float32.

    STIR's ray tracer decides which voxel holds an end point (``round``) and whether a ray
    lies on a voxel boundary from float32 numbers; end points on a voxel boundary (common:
    the FOV radius is a whole number of voxels) go to one voxel or the other depending on
    the last bit, so the numbers that decide them are reproduced bit for bit here
    (``get_phi``, ``get_s``, ``get_m``, ``get_tantheta``, the z offset of
    ``calculate_proj_matrix_elems_for_one_bin``, and the FOV radius).
    """

    def __init__(self, sino: SinogramGeometry, image: ImageGeometry):
        f32 = np.float32
        self.sino = sino
        sc = sino.scanner
        self.R = f32(f32(sc.inner_ring_radius_mm) + f32(sc.average_depth_of_interaction_mm))
        self.ring_spacing = f32(sc.ring_spacing_mm)
        self.az_sampling = f32(math.pi / sino.num_views)
        self.az_offset = f32(sino.azimuthal_angle_offset_rad)
        self.ang_inc = f32(math.pi / sc.num_detectors_per_ring)
        self.bin_size = f32(sino.tangential_bin_size_mm) if sino.arc_corrected else None
        nz, ny, nx = image.shape
        vz, vy, vx = (f32(v) for v in image.voxel_size_mm)
        self.vz = vz
        self.oz = f32(image.origin_mm[0])
        self.zmid = f32(f32(nz - 1) / f32(2.0))  # (max_index.z + min_index.z) / 2.F
        mx = min(nx - 1 - nx // 2, nx // 2)
        my = min(ny - 1 - ny // 2, ny // 2)
        self.fov = min(f32(f32(mx) * vx), f32(f32(my) * vy))

    def s(self, tang: int) -> np.float32:
        f32 = np.float32
        if self.bin_size is not None:
            return f32(f32(tang) * self.bin_size)
        return f32(self.R * f32(math.sin(float(f32(f32(tang) * self.ang_inc)))))

    def basic_bin(self, seg_num: int, view: int, tang: int):
        f32 = np.float32
        sino = self.sino
        seg = sino.segment(seg_num)
        phi = f32(f32(view) * self.az_sampling + self.az_offset)
        cphi = f32(math.cos(float(phi)))
        sphi = f32(math.sin(float(phi)))
        s = self.s(tang)
        delta = f32(seg.average_ring_diff)
        if abs(delta) < f32(0.0001):
            tt = f32(0.0)
        elif self.R * self.R - s * s <= 0:
            tt = f32(np.nan)
        else:
            tt = f32(delta * self.ring_spacing / (f32(2.0) * f32(math.sqrt(float(f32(self.R * self.R - s * s))))))
        samp_m = f32(self.ring_spacing / f32(seg.axial_poss_per_ring_inc))
        if tt != tt:
            return s, cphi, sphi, tt, f32(0.0), 1, 0.0, 0.0, f32(0.0)
        costheta = f32(f32(1.0) / f32(math.sqrt(float(f32(f32(1.0) + tt * tt)))))
        m_offset = f32(f32(f32(seg.num_axial_poss - 1) * samp_m) / f32(2.0))
        m = f32(f32(0.0) * samp_m - m_offset)  # axial position 0
        t = f32(m * costheta)
        samp_z = f32(f32(samp_m * costheta) / costheta)
        n_ax = int(math.ceil(float(samp_z / self.vz) - 1e-3))
        first = f32(f32(-samp_z / f32(2 * n_ax)) * f32(n_ax - 1) - self.oz)
        offset_in_z = f32(first + f32(self.zmid * self.vz))
        if tt == 0:
            r = float(f32(f32(t + offset_in_z) / self.vz))
            if abs((r - math.floor(r)) - 0.5) < 0.001:
                offset_in_z = f32(offset_in_z - f32(f32(0.1) * self.vz))
        zc = f32(f32(t / costheta) + offset_in_z)  # mm; z (voxels) at a: (zc - a tan theta) / vz
        # add_adjacent_z: voxel k's centre from the bin's lower axial edge, voxels: k + zfirst; width zwidth
        left = f32(f32(t - f32(samp_z / f32(2.0))) / self.vz)
        right = f32(f32(t + f32(samp_z / f32(2.0))) / self.vz)
        zfirst = float(f32(f32(self.oz / self.vz) - self.zmid)) - float(left)
        zwidth = float(f32(right - left))
        if self.bin_size is not None:
            s_samp = self.bin_size
        else:
            s_samp = f32(abs(f32(self.s(tang + 1) - self.s(tang - 1))) / f32(2.0))
        return s, cphi, sphi, tt, zc, n_ax, zfirst, zwidth, s_samp


def siddon_unsupported_reason(sino: SinogramGeometry, image: ImageGeometry) -> str | None:
    """Why the Siddon projector cannot trace ``sino`` on ``image`` as STIR does, or None when it can.

    It needs an image without x/y origin shift and, in every segment, an axial sampling that is a
    whole number of image planes (as STIR's ray tracer assumes)."""
    vz = image.voxel_size_mm[0]
    if abs(image.origin_mm[1]) > 0.05 or abs(image.origin_mm[2]) > 0.05:
        return "the Siddon projector (as STIR's ray tracer) needs an image without x/y origin shift"
    for n in sino.segment_nums:
        samp = sino.axial_sampling_mm(n)
        if abs(samp / vz - round(samp / vz)) > 1e-2 or round(samp / vz) < 1:
            return (f"the Siddon projector (as STIR's) needs the axial sampling ({samp} mm) of segment {n} "
                    f"to be a whole number of image planes ({vz} mm)")
    return None


def make_siddon_plan(
    sino: SinogramGeometry,
    image: ImageGeometry,
    views: np.ndarray | None = None,
    restrict_to_cylindrical_fov: bool = True,
    num_tangential_LORs: int = 1,
) -> SiddonPlan:
    """The basic bins and targets for ``views`` (all when None) of ``sino`` on ``image``."""
    n_tan = int(num_tangential_LORs)
    if n_tan < 1:
        raise GeometryError(f"num_tangential_LORs must be >= 1, got {num_tangential_LORs}")
    V, N = sino.num_views, sino.num_tangential_poss
    views = np.arange(V) if views is None else np.asarray(views, dtype=np.int64)
    if views.ndim != 1 or views.size == 0 or views.min() < 0 or views.max() >= V:
        raise GeometryError(f"views must be a non-empty 1D list in [0, {V - 1}], got {views}")
    nz, ny, nx = image.shape
    vz, vy, vx = image.voxel_size_mm
    reason = siddon_unsupported_reason(sino, image)
    if reason is not None:
        raise GeometryError(reason)
    symmetry = stir_view_symmetry(sino, image)
    oz_planes = image.origin_mm[0] / vz
    tang_nums = sino.tangential_pos_nums()
    fov = image.fov_radius_mm()

    seg_info = {}
    for n in sino.segment_nums:
        seg = sino.segment(n)
        samp = sino.axial_sampling_mm(n)
        npp = int(round(samp / vz))
        q = int(math.floor(nz - 1 - 2 * oz_planes - npp * (seg.num_axial_poss - 1) + 0.5))
        seg_info[n] = (sino.sirf_row_offset(n), seg.num_axial_poss, npp, q, samp, seg.average_ring_diff)

    local_view = {int(v): i for i, v in enumerate(views)}
    basic_index: dict[tuple[int, int, int], int] = {}
    basic_keys: list[tuple[int, int, int]] = []
    targets: list[list[tuple]] = []
    for n in sino.segment_nums:
        row0, nax, npp, _, _, _ = seg_info[n]
        for v in views:
            for ti, t in enumerate(tang_nums):
                bseg, bview, btang, op, zq = basic_bin_and_symmetry(n, int(v), int(t), V, symmetry)
                if bseg not in seg_info:
                    raise GeometryError(f"segment {-bseg} without segment {bseg}: not a STIR sinogram")
                key = (bseg, bview, btang)
                if key not in basic_index:
                    basic_index[key] = len(basic_keys)
                    basic_keys.append(key)
                    targets.append([])
                targets[basic_index[key]].append(
                    (row0, nax, local_view[int(v)], ti, XY_OPS[op], int(zq), seg_info[bseg][3], npp))

    NB = len(basic_keys)
    b_s = np.zeros((NB, n_tan), dtype=np.float32)
    b_cphi = np.zeros(NB, dtype=np.float32)
    b_sphi = np.zeros(NB, dtype=np.float32)
    b_tt = np.zeros(NB, dtype=np.float32)
    b_zc = np.zeros(NB, dtype=np.float32)
    b_nax = np.zeros(NB, dtype=np.int64)
    b_zfirst = np.zeros(NB)
    b_zwidth = np.zeros(NB)
    starts = np.zeros(NB + 1, dtype=np.int64)
    f32 = np.float32
    stir = _Float32Lor(sino, image)
    for i, (bseg, bview, btang) in enumerate(basic_keys):
        npp = seg_info[bseg][2]
        s, cphi, sphi, tt, zc, n_ax, zfirst, zwidth, s_inc = stir.basic_bin(bseg, bview, btang)
        if n_tan > 1:
            s_inc = f32(s_inc / f32(n_tan))
            cur = f32(s - s_inc * f32(n_tan - 1) / f32(2.0))
            for k in range(n_tan):
                b_s[i, k] = cur
                cur = f32(cur + s_inc)
        else:
            b_s[i] = s
        b_cphi[i], b_sphi[i], b_tt[i], b_zc[i] = cphi, sphi, tt, zc
        b_nax[i] = n_ax
        b_zfirst[i] = zfirst
        b_zwidth[i] = zwidth
        starts[i + 1] = starts[i] + len(targets[i])
    flat = [t for ts in targets for t in ts]
    NT = len(flat)
    t_row0 = np.array([t[0] for t in flat], dtype=np.int64).reshape(NT)
    t_nax = np.array([t[1] for t in flat], dtype=np.int64).reshape(NT)
    t_view = np.array([t[2] for t in flat], dtype=np.int64).reshape(NT)
    t_tang = np.array([t[3] for t in flat], dtype=np.int64).reshape(NT)
    t_op = np.array([t[4] for t in flat], dtype=np.int64).reshape(NT, 4)
    t_zq = np.array([t[5] for t in flat], dtype=np.int64).reshape(NT)
    t_q = np.array([t[6] for t in flat], dtype=np.int64).reshape(NT)
    t_npp = np.array([t[7] for t in flat], dtype=np.int64).reshape(NT)
    # elements one basic bin can produce: per ray at most (planes crossed in x, y, z) + 3, times
    # 4 for boundary splits in two axes, times the axial copies (+2 for the overlap spread)
    tt_max = float(np.nanmax(np.abs(b_tt.astype(np.float64)))) if NB else 0.0
    reach = fov if restrict_to_cylindrical_fov else fov * math.sqrt(2.0)
    dz_max = 2 * reach * tt_max / vz
    per_ray = int(2 * reach / vx + 2 * reach / vy + dz_max) + 8
    buffer_size = n_tan * 4 * per_ray * (int(b_nax.max(initial=1)) + 2)
    return SiddonPlan(
        b_s=np.ascontiguousarray(b_s), b_cphi=b_cphi, b_sphi=b_sphi, b_tt=b_tt, b_zc=b_zc, b_nax=b_nax,
        b_zfirst=b_zfirst, b_zwidth=b_zwidth, b_target_start=starts,
        t_row0=t_row0, t_nax=t_nax, t_view=t_view, t_tang=t_tang, t_op=np.ascontiguousarray(t_op), t_zq=t_zq,
        t_q=t_q, t_npp=t_npp,
        image_shape=(nz, ny, nx), voxel_size=(vz, vy, vx), centre_index=(ny // 2, nx // 2),
        fov_radius_mm=float(stir.fov), restrict_to_cylindrical_fov=bool(restrict_to_cylindrical_fov),
        num_tangential_LORs=n_tan, sinogram_shape=(sino.num_sinograms, int(views.size), N),
        buffer_size=int(buffer_size),
    )


# --------------------------------------------------------------------------- one ray


@njit(cache=True)
def _stir_round(x):
    """STIR's round(): half away from zero."""
    if x >= 0:
        return int(math.floor(x + 0.5))
    return -int(math.floor(-x + 0.5))


@njit(cache=True)
def _is_half_integer(a):
    return abs(math.floor(a) + 0.5 - a) < 1e-4


@njit(cache=True)
def _walk(bz, by, bx, bw, cnt, x0, y0, z0, x1, y1, z1, vx, vy, vz, normc):
    """Siddon walk from the voxel holding (x0,y0,z0) to the one holding (x1,y1,z1) (voxel units).

    Appends (z, y, x, length) to the buffers from ``cnt`` on; returns the new count.
    ``normc`` scales the lengths (mm -> output units). No boundary-plane handling here.
    """
    dx = x1 - x0
    dy = y1 - y0
    dz = z1 - z0
    d12 = math.sqrt((dx * vx) ** 2 + (dy * vy) ** 2 + (dz * vz) ** 2) * normc
    sx = 1 if dx >= 0 else -1
    sy = 1 if dy >= 0 else -1
    sz = 1 if dz >= 0 else -1
    zx = abs(dx) <= 1e-4
    zy = abs(dy) <= 1e-4
    zz = abs(dz) <= 1e-4
    big = d12 * 1e6
    inc_x = big if zx else d12 / abs(dx)
    inc_y = big if zy else d12 / abs(dy)
    inc_z = big if zz else d12 / abs(dz)
    xmax = _stir_round(x1) + sx * 0.5
    ymax = _stir_round(y1) + sy * 0.5
    zmax = _stir_round(z1) + sz * 0.5
    axend = big if zx else (xmax - x0) * inc_x * sx * 0.9999
    ayend = big if zy else (ymax - y0) * inc_y * sy * 0.9999
    azend = big if zz else (zmax - z0) * inc_z * sz * 0.9999
    amax = min(axend, min(ayend, azend))
    cx = _stir_round(x0)
    cy = _stir_round(y0)
    cz = _stir_round(z0)
    az = -inc_z if zz else ((cz - z0) - sz * 0.5) * inc_z * sz
    ax = -inc_x if zx else ((cx - x0) - sx * 0.5) * inc_x * sx
    ay = -inc_y if zy else ((cy - y0) - sy * 0.5) * inc_y * sy
    a = max(ax, max(ay, az))
    ax = axend if zx else ax + inc_x
    ay = ayend if zy else ay + inc_y
    az = azend if zz else az + inc_z
    n = bw.shape[0]
    while a < amax and cnt < n:
        bz[cnt] = cz
        by[cnt] = cy
        bx[cnt] = cx
        if ax < ay and ax < az:
            bw[cnt] = ax - a
            a = ax
            ax += inc_x
            cx += sx
        elif ay < az and not ax < ay:
            bw[cnt] = ay - a
            a = ay
            ay += inc_y
            cy += sy
        else:
            bw[cnt] = az - a
            a = az
            az += inc_z
            cz += sz
        cnt += 1
    return cnt


@njit(cache=True)
def _trace_segment(bz, by, bx, bw, cnt, x0, y0, z0, x1, y1, z1, vx, vy, vz, normc):
    """STIR's RayTraceVoxelsOnCartesianGrid: a ray on a voxel boundary plane goes half to each side."""
    dx = x1 - x0
    dy = y1 - y0
    dz = z1 - z0
    if math.sqrt(dx * dx + dy * dy + dz * dz) <= 1e-5:
        return cnt
    hz = 0.5 if (abs(dz) <= 1e-4 and _is_half_integer(z0)) else 0.0
    hy = 0.5 if (abs(dy) <= 1e-4 and _is_half_integer(y0)) else 0.0
    hx = 0.5 if (abs(dx) <= 1e-4 and _is_half_integer(x0)) else 0.0
    nsplit = (2 if hz > 0 else 1) * (2 if hy > 0 else 1) * (2 if hx > 0 else 1)
    w = normc / nsplit
    for iz in range(2 if hz > 0 else 1):
        oz = -hz if iz == 0 else hz
        for iy in range(2 if hy > 0 else 1):
            oy = -hy if iy == 0 else hy
            for ix in range(2 if hx > 0 else 1):
                ox = -hx if ix == 0 else hx
                cnt = _walk(bz, by, bx, bw, cnt, x0 + ox, y0 + oy, z0 + oz, x1 + ox, y1 + oy, z1 + oz,
                            vx, vy, vz, w)
    return cnt


@njit(cache=True)
def _trace_lor(bz, by, bx, bw, cnt, s, cphi, sphi, tt, zc, fov, restrict, vx, vy, vz, normc):
    """STIR's ray_trace_one_lor: cut at the FOV, order the end points, trace.

    ``s, cphi, sphi, tt, zc, fov, vx, vy, vz`` are float32 and the end points are computed in
    float32 as STIR does (``zc``: mm, the ray's z at a = 0 plus STIR's z offset); the walk is float64.
    """
    f32 = np.float32
    zero = f32(0.0)
    if restrict:
        if abs(s) > fov:
            return cnt
        if abs(s) == fov:
            max_a = zero
        else:
            max_a = f32(math.sqrt(f32(fov * fov - s * s)))
        min_a = -max_a
    else:
        if abs(cphi) < f32(1e-3) or abs(sphi) < f32(1e-3):
            if fov < abs(s):
                return cnt
            max_a = fov
            min_a = -fov
        else:
            sgs = f32(1.0) if sphi >= 0 else f32(-1.0)
            sgc = f32(1.0) if cphi >= 0 else f32(-1.0)
            max_a = min(f32((fov * sgs - s * cphi) / sphi), f32((fov * sgc + s * sphi) / cphi))
            min_a = max(f32((-fov * sgs - s * cphi) / sphi), f32((-fov * sgc + s * sphi) / cphi))
            if min_a > max_a - f32(1e-3) * vx:
                return cnt
    xa = f32(f32(s * cphi) + f32(max_a * sphi)) / vx
    ya = f32(f32(s * sphi) - f32(max_a * cphi)) / vy
    za = f32(zc - f32(max_a * tt)) / vz
    xb = f32(f32(s * cphi) + f32(min_a * sphi)) / vx
    yb = f32(f32(s * sphi) - f32(min_a * cphi)) / vy
    zb = f32(zc - f32(min_a * tt)) / vz
    forward = za < zb or (za == zb and (ya < yb or (ya == yb and xa <= xb)))
    X, Y, Z = float(vx), float(vy), float(vz)
    if forward:
        return _trace_segment(bz, by, bx, bw, cnt, float(xa), float(ya), float(za), float(xb), float(yb),
                              float(zb), X, Y, Z, normc)
    return _trace_segment(bz, by, bx, bw, cnt, float(xb), float(yb), float(zb), float(xa), float(ya),
                          float(za), X, Y, Z, normc)


@njit(cache=True)
def _trace_basic(i, bz, by, bx, bw, b_s, b_cphi, b_sphi, b_tt, b_zc, b_nax, b_zfirst, b_zwidth,
                 fov, restrict, vx, vy, vz):
    """All elements (z index, centred y, centred x, weight) of basic bin i; returns their number.

    Duplicates (the same voxel from several rays) are kept: projections only sum them.
    """
    tt = b_tt[i]
    if tt != tt:
        return 0
    n_tan = b_s.shape[1]
    n_ax = b_nax[i]
    normc = 1.0 / float(vx) / (n_ax * n_tan)
    cnt = 0
    for k in range(n_tan):
        cnt = _trace_lor(bz, by, bx, bw, cnt, b_s[i, k], b_cphi[i], b_sphi[i], tt, b_zc[i], fov, restrict,
                         vx, vy, vz, normc)
    if cnt == 0:
        return 0
    org = cnt
    n = bw.shape[0]
    if tt == 0.0:
        # STIR's add_adjacent_z: spread over the planes the bin's axial extent overlaps
        z_first = bz[0]
        zf = b_zfirst[i] + z_first  # first voxel's centre, from the extent's lower edge (voxels)
        right = b_zwidth[i]
        zi = 1
        while True:
            ov = min(right, zf + zi + 0.5) - max(0.0, zf + zi - 0.5)
            if ov <= 0.0001:
                break
            f = 1.0 if ov > 0.9999 else ov
            for e in range(org):
                if cnt < n:
                    bz[cnt] = z_first + zi
                    by[cnt] = by[e]
                    bx[cnt] = bx[e]
                    bw[cnt] = bw[e] * f
                    cnt += 1
            zi += 1
        if zf > 0.5:
            ov = zf - 0.5
            f = 1.0 if ov > 0.9999 else ov
            for e in range(org):
                if cnt < n:
                    bz[cnt] = z_first - 1
                    by[cnt] = by[e]
                    bx[cnt] = bx[e]
                    bw[cnt] = bw[e] * f
                    cnt += 1
        ov = min(right, zf + 0.5) - max(0.0, zf - 0.5)
        if ov < 0.9999:
            for e in range(org):
                bw[e] *= ov
    elif n_ax > 1:
        for c in range(1, n_ax):
            for e in range(org):
                if cnt < n:
                    bz[cnt] = bz[e] + c
                    by[cnt] = by[e]
                    bx[cnt] = bx[e]
                    bw[cnt] = bw[e]
                    cnt += 1
    return cnt


@njit(cache=True)
def _map_inplane(off, by, bx, cnt, a, b, c, d, cy, cx, ny, nx):
    """Flat in-plane array offsets of the mapped elements (-1: outside the image)."""
    for e in range(cnt):
        x = a * bx[e] + b * by[e] + cx
        y = c * bx[e] + d * by[e] + cy
        if 0 <= x < nx and 0 <= y < ny:
            off[e] = y * nx + x
        else:
            off[e] = -1


# --------------------------------------------------------------------------- kernels


@njit(cache=True)
def _scratch(buffer_size):
    """One thread's buffers for a traced row: voxel z, y, x, weight and in-plane offset."""
    return (np.empty(buffer_size, np.int64), np.empty(buffer_size, np.int64), np.empty(buffer_size, np.int64),
            np.empty(buffer_size, np.float64), np.empty(buffer_size, np.int64))


@njit(parallel=True, cache=True)
def forward_kernel(img, out, b_s, b_cphi, b_sphi, b_tt, b_zc, b_nax, b_zfirst, b_zwidth, b_target_start,
                   t_row0, t_nax, t_view, t_tang, t_op, t_zq, t_q, t_npp, shape, vox, centre, fov, restrict,
                   buffer_size):
    """``out[b, r, v, t]`` = STIR's row of bin (r, v, t) applied to ``img[b]`` (B, Z*Y*X), overwritten.

    ``out`` (B, S, V, N) must be zeroed for bins no basic bin fills (none in a complete plan).
    """
    nz, ny, nx = shape[0], shape[1], shape[2]
    vz, vy, vx = vox[0], vox[1], vox[2]
    cy, cx = centre[0], centre[1]
    nyx = ny * nx
    nb = img.shape[0]
    NB = b_cphi.shape[0]
    n_chunks = min(NB, 8 * 64) if NB > 0 else 0
    for c in prange(n_chunks):
        bz, by, bx, bw, off = _scratch(buffer_size)
        for i in range(c * NB // n_chunks, (c + 1) * NB // n_chunks):
            cnt = _trace_basic(i, bz, by, bx, bw, b_s, b_cphi, b_sphi, b_tt, b_zc, b_nax, b_zfirst, b_zwidth,
                               fov, restrict, vx, vy, vz)
            for j in range(b_target_start[i], b_target_start[i + 1]):
                v = t_view[j]
                t = t_tang[j]
                row0 = t_row0[j]
                if cnt == 0:
                    for a in range(t_nax[j]):
                        for b in range(nb):
                            out[b, row0 + a, v, t] = 0.0
                    continue
                _map_inplane(off, by, bx, cnt, t_op[j, 0], t_op[j, 1], t_op[j, 2], t_op[j, 3], cy, cx, ny, nx)
                zsign = -1 if t_zq[j] == 1 else 1
                for a in range(t_nax[j]):
                    zbase = (t_q[j] if t_zq[j] == 1 else 0) + t_npp[j] * a
                    for b in range(nb):
                        acc = 0.0
                        for e in range(cnt):
                            z = zbase + zsign * bz[e]
                            o = off[e]
                            if 0 <= z < nz and o >= 0:
                                acc += img[b, z * nyx + o] * bw[e]
                        out[b, row0 + a, v, t] = acc


@njit(parallel=True, cache=True)
def adjoint_kernel(sino, bufs, b_s, b_cphi, b_sphi, b_tt, b_zc, b_nax, b_zfirst, b_zwidth, b_target_start,
                   t_row0, t_nax, t_view, t_tang, t_op, t_zq, t_q, t_npp, shape, vox, centre, fov, restrict,
                   buffer_size):
    """Scatter ``sino`` (B, S, V, N) into ``bufs`` (C, B, Z*Y*X), zeroed: chunk c of the basic bins into ``bufs[c]``."""
    nz, ny, nx = shape[0], shape[1], shape[2]
    vz, vy, vx = vox[0], vox[1], vox[2]
    cy, cx = centre[0], centre[1]
    nyx = ny * nx
    nb = sino.shape[0]
    NB = b_cphi.shape[0]
    n_chunks = bufs.shape[0]
    for c in prange(n_chunks):
        bz, by, bx, bw, off = _scratch(buffer_size)
        buf = bufs[c]
        for i in range(c * NB // n_chunks, (c + 1) * NB // n_chunks):
            nonzero = False
            for j in range(b_target_start[i], b_target_start[i + 1]):
                for a in range(t_nax[j]):
                    for b in range(nb):
                        if sino[b, t_row0[j] + a, t_view[j], t_tang[j]] != 0.0:
                            nonzero = True
            if not nonzero:
                continue
            cnt = _trace_basic(i, bz, by, bx, bw, b_s, b_cphi, b_sphi, b_tt, b_zc, b_nax, b_zfirst, b_zwidth,
                               fov, restrict, vx, vy, vz)
            if cnt == 0:
                continue
            for j in range(b_target_start[i], b_target_start[i + 1]):
                v = t_view[j]
                t = t_tang[j]
                row0 = t_row0[j]
                _map_inplane(off, by, bx, cnt, t_op[j, 0], t_op[j, 1], t_op[j, 2], t_op[j, 3], cy, cx, ny, nx)
                zsign = -1 if t_zq[j] == 1 else 1
                for a in range(t_nax[j]):
                    zbase = (t_q[j] if t_zq[j] == 1 else 0) + t_npp[j] * a
                    for b in range(nb):
                        y = sino[b, row0 + a, v, t]
                        if y == 0.0:
                            continue
                        for e in range(cnt):
                            z = zbase + zsign * bz[e]
                            o = off[e]
                            if 0 <= z < nz and o >= 0:
                                buf[b, z * nyx + o] += bw[e] * y


@njit(parallel=True, cache=True)
def reduce_buffers(bufs, out):
    """``out[b, p]`` = sum over c of ``bufs[c, b, p]`` (fixed order)."""
    n_chunks, nb, P = bufs.shape
    for bp in prange(nb * P):
        b = bp // P
        p = bp % P
        acc = bufs[0, b, p]
        for c in range(1, n_chunks):
            acc += bufs[c, b, p]
        out[b, p] = acc


# --------------------------------------------------------------------------- inspection


@njit(cache=True)
def _row_elements_kernel(i, j, a_pos, b_s, b_cphi, b_sphi, b_tt, b_zc, b_nax, b_zfirst, b_zwidth,
                         t_op, t_zq, t_q, t_npp, fov, restrict, vox, buffer_size):
    bz = np.empty(buffer_size, np.int64)
    by = np.empty(buffer_size, np.int64)
    bx = np.empty(buffer_size, np.int64)
    bw = np.empty(buffer_size, np.float64)
    cnt = _trace_basic(i, bz, by, bx, bw, b_s, b_cphi, b_sphi, b_tt, b_zc, b_nax, b_zfirst, b_zwidth,
                       fov, restrict, vox[2], vox[1], vox[0])
    out = np.empty((cnt, 4))
    for e in range(cnt):
        x = t_op[j, 0] * bx[e] + t_op[j, 1] * by[e]
        y = t_op[j, 2] * bx[e] + t_op[j, 3] * by[e]
        z = (t_q[j] - bz[e] if t_zq[j] == 1 else bz[e]) + t_npp[j] * a_pos
        out[e, 0] = z
        out[e, 1] = y
        out[e, 2] = x
        out[e, 3] = bw[e]
    return out


def row_elements(plan: SiddonPlan, row: int, view: int, tang: int, merge: bool = True) -> np.ndarray:
    """The matrix row of sinogram bin (SIRF row, local view index, tangential index): (K, 4) array of
    (z index, centred y index, centred x index, value), as STIR's ``ProjMatrixElemsForOneBin``
    (voxels outside the image's planes included, as STIR keeps them; duplicates merged when ``merge``)."""
    hit = np.nonzero((plan.t_view == view) & (plan.t_tang == tang) & (plan.t_row0 <= row)
                     & (row < plan.t_row0 + plan.t_nax))[0]
    if hit.size != 1:
        raise ValueError(f"bin (row {row}, view {view}, tangential {tang}) is not in this plan")
    j = int(hit[0])
    i = int(np.searchsorted(plan.b_target_start, j, side="right") - 1)
    el = _row_elements_kernel(i, j, row - int(plan.t_row0[j]), plan.b_s, plan.b_cphi, plan.b_sphi, plan.b_tt,
                              plan.b_zc, plan.b_nax, plan.b_zfirst, plan.b_zwidth, plan.t_op, plan.t_zq, plan.t_q,
                              plan.t_npp, np.float32(plan.fov_radius_mm), bool(plan.restrict_to_cylindrical_fov),
                              np.asarray(plan.voxel_size, dtype=np.float32), int(plan.buffer_size))
    if not merge or el.shape[0] == 0:
        return el
    keys, inv = np.unique(el[:, :3].astype(np.int64), axis=0, return_inverse=True)
    vals = np.zeros(keys.shape[0])
    np.add.at(vals, inv.reshape(-1), el[:, 3])
    return np.concatenate([keys.astype(np.float64), vals[:, None]], axis=1)


# --------------------------------------------------------------------------- torch wrappers

#: per-thread adjoint buffers are limited to this many bytes in all (fewer chunks than threads beyond it)
_ADJOINT_BUFFER_BYTES = 2 << 30


def _check_tensor(t, name: str, shape) -> None:
    """A (B, *shape) float32/float64 CPU tensor, or a clear error naming ``name``."""
    import torch

    if t.device.type != "cpu":
        raise ValueError(f"ray_tracing='siddon' runs on the CPU only (numba); use ray_tracing='joseph' on "
                         f"{t.device.type}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dim() != 4 or tuple(t.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}), got {tuple(t.shape)}")


def siddon_forward(image, plan: SiddonPlan):
    """STIR's ray-tracing projection of ``image`` (B, Z, Y, X) torch (CPU): (B, S, V, N), pixel units, same dtype."""
    import torch

    _check_tensor(image, "image", plan.image_shape)
    x = image.detach().contiguous().numpy()
    xf = x.reshape(x.shape[0], -1)
    out = np.zeros((x.shape[0],) + tuple(plan.sinogram_shape), dtype=x.dtype)
    forward_kernel(xf, out, *plan.kernel_args())
    return torch.from_numpy(out)


def siddon_adjoint(sino, plan: SiddonPlan):
    """Exact transpose of :func:`siddon_forward`: (B, S, V, N) -> (B, Z, Y, X), same dtype."""
    import numba
    import torch

    _check_tensor(sino, "sino", plan.sinogram_shape)
    y = sino.detach().contiguous().numpy()
    nb = y.shape[0]
    P = int(np.prod(plan.image_shape))
    per_buffer = nb * P * y.dtype.itemsize
    n_chunks = max(1, min(numba.get_num_threads(), _ADJOINT_BUFFER_BYTES // per_buffer))
    bufs = np.zeros((n_chunks, nb, P), dtype=y.dtype)
    adjoint_kernel(y, bufs, *plan.kernel_args())
    out = np.empty((nb, P), dtype=y.dtype)
    reduce_buffers(bufs, out)
    return torch.from_numpy(out.reshape((nb,) + tuple(plan.image_shape)))
