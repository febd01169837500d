"""Scanner, sinogram and image geometry, exactly as STIR defines them.

Everything here follows STIR's ``ProjDataInfoCylindrical`` (``...ArcCorr`` and
``...NoArcCorr``) and ``VoxelsOnCartesianGrid`` sources, so that sinograms read
from STIR/SIRF files map to the same lines of response (LORs) here as there.

Coordinates (STIR "gantry" axes, mm): x horizontal, y pointing down, z along the
scanner axis. Two z frames are used and named explicitly:

* *scanner-centred* z (``m`` in STIR): 0 at the axial centre of the scanner. LOR
  axial positions (``get_m``) and the projector work in this frame.
* *gantry* z: 0 at the centre of the first ring (``z_gantry = z_centred +
  (num_rings - 1) * ring_spacing / 2``).

Writers (NIfTI, DICOM) use STIR's *physical* image coordinates instead (voxel
(k, j, i) at ``origin + (k vz, j vy, i vx)``, j and i centred), as STIR's own NIfTI
writer does; for the scanner's default image these equal gantry coordinates.

A sinogram bin (segment, axial position a, view v, tangential position t) is the
LOR ``X = s cos(phi) + u sin(phi)``, ``Y = s sin(phi) - u cos(phi)``,
``Z = m - u tan(theta)`` for ``u`` along the line (STIR's ray tracer), with

* ``phi = v * pi / num_views + view offset`` (intrinsic tilt, plus STIR's extra
  offset for view mashing),
* ``s = t * bin_size`` (arc-corrected) or ``s = R sin(t * pi / detectors_per_ring)``
  (not arc-corrected; ``R`` = inner radius + average depth of interaction),
* ``m = a * axial_sampling - m_offset`` with the offset centring the segment,
  axial sampling = ring spacing / 2 when the segment combines several ring
  differences and ring spacing otherwise,
* ``tan(theta) = mean ring difference * ring spacing / (2 sqrt(R^2 - s^2))``.

Array layouts are SIRF's: images ``(z, y, x)``; sinograms
``(tof, sinogram, view, tangential)`` with segments in the order 0, +1, -1, +2,
-2, ... and axial positions ascending within a segment.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np

from .errors import InputError

__all__ = [
    "patient_flips",
    "Scanner",
    "Segment",
    "SinogramGeometry",
    "ImageGeometry",
    "GeometryError",
    "GeometryWarning",
    "scanner_preset",
    "SCANNER_PRESETS",
    "subset_views",
    "sinogram_geometry_to_dict",
    "sinogram_geometry_from_dict",
    "image_geometry_to_dict",
    "image_geometry_from_dict",
    "geometry_mismatch",
]


class GeometryError(InputError):
    """A geometry that is inconsistent or impossible (non-finite or non-positive sizes, bad layouts)."""


class GeometryWarning(UserWarning):
    """A geometry that is valid but unusual, e.g. an image reaching past the scanner."""


@dataclass(frozen=True)
class Scanner:
    """A cylindrical PET scanner, as STIR's ``Scanner`` describes one.

    Lengths in mm, angles in degrees. ``default_bin_size_mm <= 0`` means "not
    given" (STIR then uses the central sampling in s).
    """

    name: str
    num_rings: int
    num_detectors_per_ring: int
    inner_ring_radius_mm: float
    average_depth_of_interaction_mm: float
    ring_spacing_mm: float
    default_bin_size_mm: float
    view_offset_deg: float = 0.0
    max_num_non_arccorrected_bins: int = 0
    default_num_arccorrected_bins: int = 0

    def __post_init__(self) -> None:
        if self.num_rings < 1:
            raise GeometryError(f"scanner {self.name!r}: num_rings must be >= 1, got {self.num_rings}")
        if self.num_detectors_per_ring < 2:
            raise GeometryError(
                f"scanner {self.name!r}: num_detectors_per_ring must be >= 2, got {self.num_detectors_per_ring}"
            )
        if not self.inner_ring_radius_mm > 0:
            raise GeometryError(
                f"scanner {self.name!r}: inner_ring_radius_mm must be > 0, got {self.inner_ring_radius_mm}"
            )
        if not self.ring_spacing_mm > 0:
            raise GeometryError(f"scanner {self.name!r}: ring_spacing_mm must be > 0, got {self.ring_spacing_mm}")

    @property
    def effective_ring_radius_mm(self) -> float:
        """Inner radius plus average depth of interaction (STIR's ``get_effective_ring_radius``)."""
        return self.inner_ring_radius_mm + self.average_depth_of_interaction_mm

    @property
    def axial_fov_centre_gantry_mm(self) -> float:
        """Gantry z of the scanner's axial centre (gantry z = 0 at the first ring's centre)."""
        return (self.num_rings - 1) * self.ring_spacing_mm / 2.0


@dataclass(frozen=True)
class Segment:
    """One STIR segment: a range of ring differences (ring2 - ring1) and its axial positions."""

    segment_num: int
    min_ring_diff: int
    max_ring_diff: int
    num_axial_poss: int

    def __post_init__(self) -> None:
        if self.min_ring_diff > self.max_ring_diff:
            raise GeometryError(
                f"segment {self.segment_num}: min ring difference {self.min_ring_diff} > "
                f"max ring difference {self.max_ring_diff}"
            )
        if self.num_axial_poss < 1:
            raise GeometryError(f"segment {self.segment_num}: num_axial_poss must be >= 1, got {self.num_axial_poss}")

    @property
    def axial_poss_per_ring_inc(self) -> int:
        """2 when the segment combines ring differences (span > 1), else 1 (STIR)."""
        return 2 if self.max_ring_diff != self.min_ring_diff else 1

    @property
    def average_ring_diff(self) -> float:
        return (self.min_ring_diff + self.max_ring_diff) / 2.0


def _span_segments(num_rings: int, span: int, max_ring_diff: int) -> tuple[Segment, ...]:
    """Segments of STIR's ``construct_proj_data_info`` for a span and maximum ring difference."""
    if span < 1 or span % 2 == 0:
        raise GeometryError(f"span must be a positive odd number, got {span}")
    if not 0 <= max_ring_diff <= num_rings - 1:
        raise GeometryError(f"max_ring_diff must be in [0, {num_rings - 1}], got {max_ring_diff}")
    if span == 1:
        return tuple(
            Segment(d, d, d, num_rings - abs(d)) for d in range(-max_ring_diff, max_ring_diff + 1)
        )
    half = (span - 1) // 2
    if (max_ring_diff - half) % span != 0:
        raise GeometryError(
            f"span {span} with max_ring_diff {max_ring_diff}: (max_ring_diff - (span-1)/2) must be a "
            f"multiple of span; try max_ring_diff = {half + span * ((max_ring_diff - half) // span)}"
        )
    num_segments_per_side = (max_ring_diff - half) // span
    segs = []
    for k in range(-num_segments_per_side, num_segments_per_side + 1):
        if k == 0:
            lo, hi = -half, half
        elif k > 0:
            lo, hi = k * span - half, k * span + half
        else:
            lo, hi = k * span - half, k * span + half
        min_abs = 0 if k == 0 else min(abs(lo), abs(hi))
        segs.append(Segment(k, lo, hi, 2 * num_rings - 1 - 2 * min_abs))
    return tuple(segs)


@dataclass(frozen=True)
class SinogramGeometry:
    """STIR's ``ProjDataInfoCylindrical`` (arc-corrected or not), non-TOF.

    ``segments`` are stored by ascending ``segment_num`` (STIR's own order);
    :meth:`sirf_segment_order` gives the order of the SIRF sinogram axis.
    ``tangential_bin_size_mm`` is the arc-corrected bin size; for data that are not
    arc-corrected it is informative only (s follows the detector angles).
    """

    scanner: Scanner
    segments: tuple[Segment, ...]
    num_views: int
    num_tangential_poss: int
    arc_corrected: bool
    tangential_bin_size_mm: float
    num_tof_bins: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(sorted(self.segments, key=lambda s: s.segment_num)))
        nums = [s.segment_num for s in self.segments]
        if not nums or 0 not in nums:
            raise GeometryError(f"sinogram geometry needs a segment 0, got segments {nums}")
        if nums != list(range(nums[0], nums[-1] + 1)):
            raise GeometryError(f"segment numbers must be consecutive, got {nums}")
        if self.num_views < 1 or self.num_tangential_poss < 1:
            raise GeometryError(
                f"num_views and num_tangential_poss must be >= 1, got {self.num_views}, {self.num_tangential_poss}"
            )
        if self.num_tof_bins != 1:
            raise GeometryError(f"only non-TOF data are supported (num_tof_bins = 1), got {self.num_tof_bins}")
        if self.arc_corrected and not self.tangential_bin_size_mm > 0:
            raise GeometryError(
                f"arc-corrected data need a tangential bin size > 0 mm, got {self.tangential_bin_size_mm}"
            )
        R = self.scanner.effective_ring_radius_mm
        smax = float(np.max(np.abs(self.s_mm())))
        # Arc-corrected data may reach beyond the ring (STIR's mMR arc-corrected template: 344 bins of
        # 2.0445 mm); those bins have no LOR and STIR's ray tracer leaves them empty (cylindrical FOV).
        if smax >= R and not self.arc_corrected:
            raise GeometryError(
                f"tangential positions reach |s| = {smax:.1f} mm, beyond the effective ring radius {R:.1f} mm "
                f"(num_tangential_poss = {self.num_tangential_poss})"
            )

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_span(
        cls,
        scanner: Scanner,
        span: int = 1,
        max_ring_diff: int | None = None,
        view_mash_factor: int = 1,
        num_tangential_poss: int | None = None,
        arc_corrected: bool = False,
    ) -> "SinogramGeometry":
        """Geometry as STIR's ``ProjDataInfo::construct_proj_data_info`` (SIRF's
        ``AcquisitionData(scanner, span, max_ring_diff, view_mash_factor)``) builds it."""
        if max_ring_diff is None:
            max_ring_diff = scanner.num_rings - 1
        if scanner.num_detectors_per_ring % (2 * view_mash_factor) != 0:
            raise GeometryError(
                f"view_mash_factor {view_mash_factor} does not divide {scanner.num_detectors_per_ring // 2} views"
            )
        if num_tangential_poss is None:
            num_tangential_poss = (
                scanner.default_num_arccorrected_bins if arc_corrected else scanner.max_num_non_arccorrected_bins
            )
        return cls(
            scanner=scanner,
            segments=_span_segments(scanner.num_rings, span, max_ring_diff),
            num_views=scanner.num_detectors_per_ring // 2 // view_mash_factor,
            num_tangential_poss=num_tangential_poss,
            arc_corrected=arc_corrected,
            tangential_bin_size_mm=scanner.default_bin_size_mm,
        )

    # ----------------------------------------------------------------- sizes
    @property
    def segment_nums(self) -> list[int]:
        return [s.segment_num for s in self.segments]

    def segment(self, segment_num: int) -> Segment:
        for s in self.segments:
            if s.segment_num == segment_num:
                return s
        raise GeometryError(f"no segment {segment_num}; segments are {self.segment_nums}")

    def sirf_segment_order(self) -> list[int]:
        """Segment numbers in the order of SIRF's sinogram axis: 0, +1, -1, +2, -2, ..."""
        nums = set(self.segment_nums)
        order = [0]
        for k in range(1, max(abs(n) for n in nums) + 1):
            for n in (k, -k):
                if n in nums:
                    order.append(n)
        return order

    @property
    def num_sinograms(self) -> int:
        return sum(s.num_axial_poss for s in self.segments)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """SIRF shape (tof, sinograms, views, tangential)."""
        return (self.num_tof_bins, self.num_sinograms, self.num_views, self.num_tangential_poss)

    @property
    def view_mash_factor(self) -> int:
        n = self.scanner.num_detectors_per_ring
        if n > 2 and n % (2 * self.num_views) == 0:
            return n // 2 // self.num_views
        return 1

    @property
    def span(self) -> int:
        """Axial compression of segment 0 (1 + its ring-difference range)."""
        s0 = self.segment(0)
        return s0.max_ring_diff - s0.min_ring_diff + 1

    def sinogram_index_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(segment_num, axial_pos) of every row of the SIRF sinogram axis, shape (num_sinograms,) each."""
        segs, ax = [], []
        for n in self.sirf_segment_order():
            k = self.segment(n).num_axial_poss
            segs.append(np.full(k, n, dtype=np.int64))
            ax.append(np.arange(k, dtype=np.int64))
        return np.concatenate(segs), np.concatenate(ax)

    def sirf_row_offset(self, segment_num: int) -> int:
        """First row of ``segment_num`` on SIRF's sinogram axis."""
        off = 0
        for n in self.sirf_segment_order():
            if n == segment_num:
                return off
            off += self.segment(n).num_axial_poss
        raise GeometryError(f"no segment {segment_num}")

    # ----------------------------------------------------------------- LOR coordinates
    @property
    def azimuthal_angle_offset_rad(self) -> float:
        """STIR: intrinsic tilt, plus pi/(n_det/2) * (mash - 1)/2 for view-mashed data."""
        off = math.radians(self.scanner.view_offset_deg)
        n = self.scanner.num_detectors_per_ring
        if n > 2 and self.num_views * 2 != n and n % (self.num_views * 2) == 0:
            off += math.pi / (n / 2) * (self.view_mash_factor - 1) / 2.0
        return off

    def phi_rad(self) -> np.ndarray:
        """Azimuthal angle of every view, shape (num_views,), radians."""
        return np.arange(self.num_views) * (math.pi / self.num_views) + self.azimuthal_angle_offset_rad

    def tangential_pos_nums(self) -> np.ndarray:
        """STIR tangential position numbers -(n//2) ... -(n//2)+n-1, shape (num_tangential_poss,)."""
        lo = -(self.num_tangential_poss // 2)
        return np.arange(lo, lo + self.num_tangential_poss)

    @property
    def angular_increment_rad(self) -> float:
        """Angle between adjacent tangential positions of non-arc-corrected data: pi / detectors per ring."""
        return math.pi / self.scanner.num_detectors_per_ring

    def s_mm(self, tangential_pos_nums: np.ndarray | None = None) -> np.ndarray:
        """Signed distance of the LOR of tangential positions t from the axis, mm.

        ``t`` defaults to every tangential position (shape (num_tangential_poss,)); any t,
        fractional or outside the sinogram, gives STIR's ``get_s`` formula there.
        """
        if tangential_pos_nums is None:
            tangential_pos_nums = self.tangential_pos_nums()
        t = np.asarray(tangential_pos_nums, dtype=np.float64)
        if self.arc_corrected:
            return t * self.tangential_bin_size_mm
        return self.scanner.effective_ring_radius_mm * np.sin(t * self.angular_increment_rad)

    def sampling_in_s_mm(self) -> float:
        """Tangential sampling at the central bin, mm (STIR's ``get_sampling_in_s(Bin(0,0,0,0))``,
        i.e. (s(1) - s(-1)) / 2: R sin(pi / detectors) for data that are not arc-corrected)."""
        if self.arc_corrected:
            return self.tangential_bin_size_mm
        return self.scanner.effective_ring_radius_mm * math.sin(self.angular_increment_rad)

    def axial_sampling_mm(self, segment_num: int) -> float:
        return self.scanner.ring_spacing_mm / self.segment(segment_num).axial_poss_per_ring_inc

    def m_mm(self, segment_num: int) -> np.ndarray:
        """Scanner-centred axial position of the LOR middles of a segment, shape (num_axial_poss,), mm."""
        seg = self.segment(segment_num)
        samp = self.axial_sampling_mm(segment_num)
        a = np.arange(seg.num_axial_poss, dtype=np.float64)
        m_offset = (seg.num_axial_poss - 1) * samp / 2.0
        return a * samp - m_offset

    def tan_theta(self, segment_num: int) -> np.ndarray:
        """tan of the polar angle of a segment's LORs, per tangential position, shape (num_tangential_poss,).

        NaN (as in STIR) for arc-corrected bins with |s| >= R, which have no LOR.
        """
        delta = self.segment(segment_num).average_ring_diff
        if abs(delta) < 1e-4:
            return np.zeros(self.num_tangential_poss)
        R = self.scanner.effective_ring_radius_mm
        s = self.s_mm()
        with np.errstate(invalid="ignore", divide="ignore"):
            t = delta * self.scanner.ring_spacing_mm / (2.0 * np.sqrt(R * R - s * s))
        return np.where(np.abs(s) < R, t, np.nan)

    def sinogram_lor_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per SIRF sinogram row: m (mm, scanner-centred), mean ring difference, and axial sampling (mm).

        Shapes (num_sinograms,). Together with :meth:`phi_rad` and :meth:`s_mm` these
        define every LOR; ``tan(theta) = delta * ring_spacing / (2 sqrt(R^2 - s^2))``.
        """
        m, delta, samp = [], [], []
        for n in self.sirf_segment_order():
            seg = self.segment(n)
            m.append(self.m_mm(n))
            delta.append(np.full(seg.num_axial_poss, seg.average_ring_diff))
            samp.append(np.full(seg.num_axial_poss, self.axial_sampling_mm(n)))
        return np.concatenate(m), np.concatenate(delta), np.concatenate(samp)

    # ----------------------------------------------------------------- derived geometries
    def default_image(self, zoom: float = 1.0) -> "ImageGeometry":
        """The image SIRF's ``create_uniform_image`` / STIR's ``VoxelsOnCartesianGrid(proj_data_info)`` gives.

        vz = ring spacing / 2; nz = segment 0's axial positions if it is axially
        compressed, else 2 * that - 1; vxy = default bin size / zoom (or the central
        s sampling when no bin size is given); nxy = 2 * ceil(FOV radius / vxy) + 1.
        """
        seg0 = self.segment(0)
        vz = self.scanner.ring_spacing_mm / 2.0
        nz = seg0.num_axial_poss if seg0.max_ring_diff > seg0.min_ring_diff else 2 * seg0.num_axial_poss - 1
        s_samp = self.scanner.default_bin_size_mm
        if not s_samp > 0:
            s_samp = self.sampling_in_s_mm()
        vxy = s_samp / zoom
        s = self.s_mm()
        fov_radius = max(float(s[-1]), float(-s[0]))
        # float32 as STIR computes it, so that ceil() lands on the same integer
        nxy = 2 * int(math.ceil(np.float32(fov_radius) / np.float32(vxy))) + 1
        return ImageGeometry(shape=(nz, nxy, nxy), voxel_size_mm=(vz, vxy, vxy))

    def with_views(self, num_views: int) -> "SinogramGeometry":
        return replace(self, num_views=num_views)

    def describe(self) -> str:
        return (
            f"{self.scanner.name}: {len(self.segments)} segments (span {self.span}), {self.num_sinograms} sinograms, "
            f"{self.num_views} views, {self.num_tangential_poss} tangential bins, "
            f"{'arc-corrected' if self.arc_corrected else 'not arc-corrected'}"
        )


@dataclass(frozen=True)
class ImageGeometry:
    """A voxel grid as STIR's ``VoxelsOnCartesianGrid``.

    ``shape`` (nz, ny, nx); ``voxel_size_mm`` (vz, vy, vx); ``origin_mm`` (z, y, x),
    STIR's origin. Indices: k = 0..nz-1; j, i run from -(n//2) (STIR's centred
    x/y index ranges). Voxel (k, j, i) of the array sits at
    ``origin + (k*vz, (j - ny//2)*vy, (i - nx//2)*vx)`` in STIR physical coordinates
    (:meth:`first_voxel_physical_mm`; the frame of NIfTI/DICOM output, as STIR's writers);
    the projector (like STIR's ray tracer) places the z middle of the image at the
    scanner's axial centre shifted by ``origin_z`` (:meth:`first_voxel_gantry_mm`).
    The two z frames agree for the scanner's default image and differ otherwise.
    Images may reach past the scanner (:meth:`check_fits` only warns).
    """

    shape: tuple[int, int, int]
    voxel_size_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        vs = tuple(float(v) for v in self.voxel_size_mm)
        org = tuple(float(v) for v in self.origin_mm)
        if len(shape) != 3 or min(shape) < 1:
            raise GeometryError(f"image shape must be 3 positive sizes (z, y, x), got {self.shape}")
        if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
            raise GeometryError(f"voxel sizes must be 3 positive lengths in mm (z, y, x), got {self.voxel_size_mm}")
        if len(org) != 3 or not all(math.isfinite(v) for v in org):
            raise GeometryError(f"origin must be 3 finite coordinates in mm (z, y, x), got {self.origin_mm}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "voxel_size_mm", vs)
        object.__setattr__(self, "origin_mm", org)

    @property
    def num_voxels(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    def min_indices(self) -> tuple[int, int, int]:
        """STIR's minimum indices (0, -(ny//2), -(nx//2))."""
        return (0, -(self.shape[1] // 2), -(self.shape[2] // 2))

    def centred_coordinates_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates in the projector's frame (z scanner-centred), mm.

        Returns (z[nz], y[ny], x[nx]). As STIR's ray tracer:
        z_k = k*vz + origin_z - (nz-1)/2*vz; y_j = (j - ny//2)*vy + origin_y; same for x.
        """
        nz, ny, nx = self.shape
        vz, vy, vx = self.voxel_size_mm
        oz, oy, ox = self.origin_mm
        z = np.arange(nz) * vz + oz - (nz - 1) / 2.0 * vz
        y = (np.arange(ny) - ny // 2) * vy + oy
        x = (np.arange(nx) - nx // 2) * vx + ox
        return z, y, x

    def first_voxel_gantry_mm(self, scanner: Scanner) -> tuple[float, float, float]:
        """Gantry (x0, y0, z0) of array voxel [0, 0, 0] where the projector places it, mm.

        Gantry z = 0 at the centre of the first ring; z0 = origin_z - (nz-1)/2 vz + (rings-1)/2 ring
        spacing (STIR's ray tracer puts the image's axial middle at the scanner's centre, shifted by
        origin_z). Writers use :meth:`first_voxel_physical_mm` instead, as STIR's do; the two agree
        for the scanner's default image.
        """
        z, y, x = self.centred_coordinates_mm()
        return float(x[0]), float(y[0]), float(z[0] + scanner.axial_fov_centre_gantry_mm)

    def fov_radius_mm(self) -> float:
        """Cylindrical FOV radius of STIR's ProjMatrixByBinUsingRayTracing, mm.

        ``min(max index, -min index) * voxel size``, the smaller over x and y, with STIR's
        indices (``-(n // 2) .. n - 1 - n // 2``). STIR dropped its former ``- 1`` in 2003;
        LORs with ``|s| >`` this radius are not traced.
        """
        ny, nx = self.shape[1], self.shape[2]
        rx = min(nx - 1 - nx // 2, nx // 2) * self.voxel_size_mm[2]
        ry = min(ny - 1 - ny // 2, ny // 2) * self.voxel_size_mm[1]
        return max(min(rx, ry), 0.0)

    def first_voxel_physical_mm(self) -> tuple[float, float, float]:
        """STIR physical (x0, y0, z0) of array voxel [0, 0, 0], mm: ``origin + min_indices * voxel size``.

        STIR's ``get_physical_coordinates_for_indices`` (``DiscretisedDensity.inl``) with
        ``get_relative_coordinates_for_indices = indices * grid spacing``
        (``DiscretisedDensityOnCartesianGrid.inl``) and minimum indices (0, -(ny//2), -(nx//2)):
        ``x0 = ox - (nx//2) vx``, ``y0 = oy - (ny//2) vy``, ``z0 = oz``. This is the frame STIR's
        image writers use (ITK/NIfTI): plane k sits at ``oz + k vz`` whatever the image's axial
        extent. For the scanner's default image (origin 0) it equals :meth:`first_voxel_gantry_mm`.
        """
        nz, ny, nx = self.shape
        vz, vy, vx = self.voxel_size_mm
        oz, oy, ox = self.origin_mm
        return ox - (nx // 2) * vx, oy - (ny // 2) * vy, oz

    @classmethod
    def from_first_voxel_physical(
        cls,
        shape: tuple[int, int, int],
        voxel_size_mm: tuple[float, float, float],
        first_voxel_xyz_mm: tuple[float, float, float],
    ) -> "ImageGeometry":
        """The geometry whose :meth:`first_voxel_physical_mm` is ``first_voxel_xyz_mm`` (x0, y0, z0).

        Inverse of that method: ``origin = (z0, y0 + (ny//2) vy, x0 + (nx//2) vx)`` (z, y, x).
        """
        nz, ny, nx = (int(n) for n in shape)
        vz, vy, vx = (float(v) for v in voxel_size_mm)
        x0, y0, z0 = (float(v) for v in first_voxel_xyz_mm)
        return cls((nz, ny, nx), (vz, vy, vx), (z0, y0 + (ny // 2) * vy, x0 + (nx // 2) * vx))

    def extent_past_scanner(self, sino: SinogramGeometry) -> list[str]:
        """How this image reaches past the scanner, in words (empty when it lies inside).

        Transaxially: voxel centres at ``|x|`` or ``|y|`` >= the effective ring radius R.
        Axially: voxel centres beyond ``+-num_rings * ring_spacing / 2`` (scanner-centred z).
        Both are accepted, as STIR accepts them (see :meth:`check_fits`).
        """
        z, y, x = self.centred_coordinates_mm()
        R = sino.scanner.effective_ring_radius_mm
        notes = []
        reach = max(abs(x[0]), abs(x[-1]), abs(y[0]), abs(y[-1]))
        if reach >= R:
            notes.append(f"reaches {reach:.1f} mm from the axis in x/y, past the ring radius {R:.1f} mm")
        half_axial = sino.scanner.num_rings * sino.scanner.ring_spacing_mm / 2.0
        if z[0] < -half_axial - 1e-3 or z[-1] > half_axial + 1e-3:
            notes.append(
                f"spans z {z[0]:.1f} .. {z[-1]:.1f} mm (scanner-centred), past the scanner's axial extent "
                f"+-{half_axial:.1f} mm"
            )
        return notes

    def check_fits(self, sino: SinogramGeometry) -> None:
        """Warn (:class:`GeometryWarning`) when this image reaches past the scanner; never refuse it.

        STIR's ray tracer (``ProjMatrixByBinUsingRayTracing::calculate_proj_matrix_elems_for_one_bin``)
        takes its FOV from the image alone (radius ``min(max index, -min index) * voxel size``, no
        ring radius), traces each LOR through that FOV "assuming infinitely long scanner", and
        drops voxels outside the image's planes (``ProjMatrixElemsForOneBin::forward_project``).
        The embedded projector does the same, so an image past the ring or past the axial extent
        is projected: its outer parts contribute where LORs (continued past the detectors) cross
        them, and planes that no LOR crosses contribute nothing.
        """
        notes = self.extent_past_scanner(sino)
        if notes:
            warnings.warn(
                f"image geometry {self.shape} (z,y,x) with voxels {self.voxel_size_mm} mm "
                + " and ".join(notes)
                + "; projecting it as STIR does (LORs continue past the detectors; parts no LOR crosses "
                "do not contribute)",
                GeometryWarning,
                stacklevel=2,
            )

    def nifti_affine(self, scanner: Scanner | None = None, patient_position: str = "HFS") -> np.ndarray:
        """4x4 RAS affine for the array transposed to (x, y, z), as STIR's NIfTI (ITK) writer gives it.

        STIR's ``ITKOutputFileFormat::actual_write_to_file`` sets the ITK origin to the LPS
        position of the first voxel and the direction columns to the LPS steps along x, y, z;
        LPS = flips(patient position) * physical (``swap_axes_based_on_orientation``); NIfTI
        stores RAS = diag(-1, -1, 1) LPS. With ``(x0, y0, z0)`` = :meth:`first_voxel_physical_mm`
        and ``(sx, sy, sz)`` the flips (HFS (1, 1, -1))::

            [[-sx vx, 0, 0, -sx x0], [0, -sy vy, 0, -sy y0], [0, 0, sz vz, sz z0], [0, 0, 0, 1]]

        ``scanner`` is accepted for the callers' convenience and not needed: STIR's writer
        places an image by its own coordinates (first plane at ``origin_z``), not by the scanner.
        """
        x0, y0, z0 = self.first_voxel_physical_mm()
        vz, vy, vx = self.voxel_size_mm
        sx, sy, sz = patient_flips(patient_position)
        a = np.zeros((4, 4))
        a[0, 0], a[0, 3] = -sx * vx, -sx * x0
        a[1, 1], a[1, 3] = -sy * vy, -sy * y0
        a[2, 2], a[2, 3] = sz * vz, sz * z0
        a[3, 3] = 1.0
        return a

    def describe(self) -> str:
        return f"{self.shape} (z,y,x) voxels of {tuple(round(v, 5) for v in self.voxel_size_mm)} mm"


def patient_flips(patient_position: str) -> tuple[int, int, int]:
    """Signs that take gantry (x, y, z) to patient LPS for a patient position.

    HFS: LPS = (x, y, -z) -> returns (1, 1, -1). HFP: (-x, -y, -z); FFS: (-x, y, z);
    FFP: (x, -y, z).
    """
    table = {"HFS": (1, 1, -1), "HFP": (-1, -1, -1), "FFS": (-1, 1, 1), "FFP": (1, -1, 1)}
    try:
        return table[patient_position.upper()]
    except KeyError:
        raise GeometryError(
            f"patient position must be one of {sorted(table)}, got {patient_position!r}"
        ) from None


#: STIR's view symmetries (DataSymmetriesForBins_PET_CartesianGrid): "90" (90 and 180 degrees
#: minus phi), "180" (180 degrees minus phi only) or "none"
VIEW_SYMMETRIES = ("none", "180", "90")


def stir_view_symmetry(sino: "SinogramGeometry", image: "ImageGeometry") -> str:
    """Which view symmetries STIR's ray-tracing projector uses for this sinogram and image.

    As ``DataSymmetriesForBins_PET_CartesianGrid`` (STIR 6.4): none with a non-zero
    azimuthal offset of view 0, with TOF, or with an image shifted in x or y (> 0.01 mm);
    "90" when the number of views is a multiple of 4 and vx = vy (within 2e-3 mm); else
    "180" when it is even; else none. They decide STIR's OSEM subsets (:func:`subset_views`).
    """
    if abs(sino.azimuthal_angle_offset_rad) > 1e-4 or sino.num_tof_bins != 1:
        return "none"
    if abs(image.origin_mm[1]) > 0.01 or abs(image.origin_mm[2]) > 0.01:
        return "none"
    if sino.num_views % 4 == 0 and abs(image.voxel_size_mm[1] - image.voxel_size_mm[2]) <= 2e-3:
        return "90"
    if sino.num_views % 2 == 0:
        return "180"
    return "none"


def basic_views(num_views: int, symmetry: str = "none") -> np.ndarray:
    """For every view, the basic view STIR computes it with (``find_basic_view_segment_numbers``).

    "90": views in (45, 90) degrees map to ``V/2 - v``, [90, 135) to ``v - V/2``,
    [135, 180) to ``V - v``; "180": views past 90 degrees map to ``V - v``; "none": itself.
    """
    if symmetry not in VIEW_SYMMETRIES:
        raise GeometryError(f"symmetry must be one of {VIEW_SYMMETRIES}, got {symmetry!r}")
    v = np.arange(num_views)
    if symmetry == "none":
        return v
    view90 = num_views // 2
    if symmetry == "180":
        return np.where(v > view90, num_views - v, v)
    view45 = view90 // 2
    view135 = view90 + view45
    return np.select([v >= view135, v >= view90, v > view45], [num_views - v, v - view90, view90 - v], v)


def subset_views(num_views: int, num_subsets: int, subset: int, symmetry: str = "none") -> np.ndarray:
    """Views of an OSEM subset, as STIR forms them (``find_basic_vs_nums_in_subset``).

    The basic views b with b % num_subsets == subset, each with the views STIR computes
    from it by symmetry (:func:`basic_views`), sorted. Without symmetries ("none") these are
    the views v with v % num_subsets == subset. SIRF's OSMAPOSLReconstructor uses the
    symmetries of its projector (:func:`stir_view_symmetry`), so the same subsets give the
    same OSEM iterates.
    """
    if not 1 <= num_subsets <= num_views:
        raise GeometryError(f"num_subsets must be in [1, {num_views}] (the number of views), got {num_subsets}")
    if not 0 <= subset < num_subsets:
        raise GeometryError(f"subset must be in [0, {num_subsets - 1}], got {subset}")
    if symmetry == "none":
        return np.arange(subset, num_views, num_subsets)
    views = np.nonzero(basic_views(num_views, symmetry) % num_subsets == subset)[0]
    if views.size == 0:
        raise GeometryError(
            f"subset {subset} of {num_subsets} is empty under STIR's view symmetries ({symmetry}) for "
            f"{num_views} views: use at most {int(basic_views(num_views, symmetry).max()) + 1} subsets"
        )
    return views


SCANNER_PRESETS: dict[str, Scanner] = {
    # STIR's Scanner::Siemens_mMR (template_span11.hs in STIR's examples)
    "Siemens_mMR": Scanner(
        name="Siemens mMR",
        num_rings=64,
        num_detectors_per_ring=504,
        inner_ring_radius_mm=328.0,
        average_depth_of_interaction_mm=7.0,
        ring_spacing_mm=4.0625,
        default_bin_size_mm=2.08626,
        view_offset_deg=0.0,
        max_num_non_arccorrected_bins=344,
        default_num_arccorrected_bins=344,
    ),
    # A small made-up scanner for tests, examples and the bundled scan: 8 rings, 96 detectors.
    "small_test": Scanner(
        name="small test scanner",
        num_rings=8,
        num_detectors_per_ring=96,
        inner_ring_radius_mm=120.0,
        average_depth_of_interaction_mm=5.0,
        ring_spacing_mm=4.0,
        default_bin_size_mm=4.0,
        view_offset_deg=0.0,
        max_num_non_arccorrected_bins=48,
        default_num_arccorrected_bins=48,
    ),
}

_ALIASES = {"siemens mmr": "Siemens_mMR", "mmr": "Siemens_mMR", "siemens_mmr": "Siemens_mMR"}


def scanner_preset(name: str) -> Scanner:
    """A preset scanner by name (``Siemens_mMR``, ``small_test``); unknown names are an error."""
    key = _ALIASES.get(name.strip().lower(), name.strip())
    if key not in SCANNER_PRESETS:
        raise GeometryError(f"unknown scanner {name!r}; known presets: {sorted(SCANNER_PRESETS)}")
    return SCANNER_PRESETS[key]


# --------------------------------------------------------------------- serialisation
def scanner_to_dict(scanner: Scanner) -> dict:
    """Plain-JSON description of a scanner."""
    return dict(scanner.__dict__)


def sinogram_geometry_to_dict(geom: SinogramGeometry) -> dict:
    """Plain-JSON description of a sinogram geometry (inverse: :func:`sinogram_geometry_from_dict`)."""
    return {
        "scanner": scanner_to_dict(geom.scanner),
        "segments": [[s.segment_num, s.min_ring_diff, s.max_ring_diff, s.num_axial_poss] for s in geom.segments],
        "num_views": geom.num_views,
        "num_tangential_poss": geom.num_tangential_poss,
        "arc_corrected": geom.arc_corrected,
        "tangential_bin_size_mm": geom.tangential_bin_size_mm,
        "num_tof_bins": geom.num_tof_bins,
    }


def sinogram_geometry_from_dict(d: dict) -> SinogramGeometry:
    try:
        return SinogramGeometry(
            scanner=Scanner(**d["scanner"]),
            segments=tuple(Segment(*map(int, s)) for s in d["segments"]),
            num_views=int(d["num_views"]),
            num_tangential_poss=int(d["num_tangential_poss"]),
            arc_corrected=bool(d["arc_corrected"]),
            tangential_bin_size_mm=float(d["tangential_bin_size_mm"]),
            num_tof_bins=int(d.get("num_tof_bins", 1)),
        )
    except (KeyError, TypeError) as err:
        raise GeometryError(f"sinogram geometry description is incomplete or malformed: {err!r}") from None


def image_geometry_to_dict(geom: ImageGeometry) -> dict:
    return {"shape": list(geom.shape), "voxel_size_mm": list(geom.voxel_size_mm), "origin_mm": list(geom.origin_mm)}


def image_geometry_from_dict(d: dict) -> ImageGeometry:
    try:
        return ImageGeometry(tuple(d["shape"]), tuple(d["voxel_size_mm"]), tuple(d.get("origin_mm", (0, 0, 0))))
    except (KeyError, TypeError) as err:
        raise GeometryError(f"image geometry description is incomplete or malformed: {err!r}") from None


def geometry_mismatch(a: SinogramGeometry, b: SinogramGeometry, tol_mm: float = 1e-3) -> list[str]:
    """Human-readable differences between two sinogram geometries (empty if they match)."""
    diffs = []
    for f in ("num_rings", "num_detectors_per_ring"):
        if getattr(a.scanner, f) != getattr(b.scanner, f):
            diffs.append(f"scanner {f}: {getattr(a.scanner, f)} vs {getattr(b.scanner, f)}")
    for f in ("inner_ring_radius_mm", "average_depth_of_interaction_mm", "ring_spacing_mm", "view_offset_deg"):
        if abs(getattr(a.scanner, f) - getattr(b.scanner, f)) > tol_mm:
            diffs.append(f"scanner {f}: {getattr(a.scanner, f)} vs {getattr(b.scanner, f)}")
    if [(s.min_ring_diff, s.max_ring_diff, s.num_axial_poss) for s in a.segments] != [
        (s.min_ring_diff, s.max_ring_diff, s.num_axial_poss) for s in b.segments
    ]:
        diffs.append(f"segments: {len(a.segments)} (span {a.span}) vs {len(b.segments)} (span {b.span})")
    for f in ("num_views", "num_tangential_poss", "arc_corrected"):
        if getattr(a, f) != getattr(b, f):
            diffs.append(f"{f}: {getattr(a, f)} vs {getattr(b, f)}")
    if a.arc_corrected and abs(a.tangential_bin_size_mm - b.tangential_bin_size_mm) > tol_mm:
        diffs.append(f"tangential_bin_size_mm: {a.tangential_bin_size_mm} vs {b.tangential_bin_size_mm}")
    return diffs
