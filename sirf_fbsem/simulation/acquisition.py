"""Simulated PET acquisitions: attenuation, normalisation, randoms, scatter and Poisson noise.

Mean of the prompts in every sinogram bin i::

    ybar_i = m_i [G P (c f)]_i + r_i + sc_i,      m_i = n_i a_i,   a_i = exp(-0.1 [G mu]_i)

======  ==========================================  ===========================
symbol  meaning                                     variable
======  ==========================================  ===========================
f       phantom activity, Bq/ml                     ``phantom.activity``
c       activity scale, so that sum(ybar) = counts  ``activity_scale``
G, P    projector (line integrals, mm), PSF         the acquisition model
mu      attenuation map, 1/cm (0.1: mm -> cm)       ``phantom.mu_map``
a       attenuation factors, in (0, 1]              ``attenuation``
n       detection efficiencies (normalisation)      ``normalisation``
m       multiplicative factors n x a                ``multiplicative``
r       randoms                                     ``randoms``
sc      scatter                                     ``scatter``
======  ==========================================  ===========================

The randoms are ``randoms_fraction x counts`` in all, the scatter
``scatter_fraction x counts``, and the trues the rest. Images reconstructed from
these data come out in units of ``c f`` (the scaled activity, :attr:`SimulatedAcquisition.activity`);
divide by ``activity_scale`` for Bq/ml.

Sinograms are (T, S, V, N) float32 tensors on the model's device; the Poisson draw
runs on the CPU from a numpy Generator, so the same seed gives the same counts
on every device for the same mean.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import ImageGeometry, Scanner, SinogramGeometry
from ..projectors.base import AcquisitionModel
from ..projectors.embedded import EmbeddedAcquisitionModel
from ..projectors.factory import backend_name, make_acquisition_model
from .phantoms import Phantom

__all__ = [
    "AcquisitionParameters",
    "SimulatedAcquisition",
    "simulate_acquisition",
    "attenuation_factors",
    "detection_efficiencies",
    "randoms_distribution",
    "scatter_distribution",
    "detector_pairs",
    "single_slice_geometry",
]

RandomLike = np.random.Generator | int | np.random.SeedSequence | None


@dataclass(frozen=True)
class AcquisitionParameters:
    """How an acquisition is simulated.

    Attributes:
        counts: expected total number of prompts (trues + randoms + scatter).
        randoms_fraction, scatter_fraction: shares of the expected prompts; their sum < 1.
        crystal_efficiency_std: relative spread of the crystal efficiencies (normal, around 1).
        bin_efficiency_std: relative spread of an extra random factor per sinogram bin.
        geometric_profile: relative drop of the efficiencies at the edge of the tangential range.
        detector_gap_period: 0 for none; k > 0 makes every k-th detector of each ring dead
            (efficiency 0), as the gaps between the mMR's blocks (k = 9).
        randoms_fan_variation: relative amplitude of the smooth variation of the singles
            rates around the ring (it gives the randoms their fan-sum pattern).
        scatter_tangential_fwhm: FWHM of the scatter smoothing, as a fraction of the tangential range.
        scatter_view_fwhm_deg: FWHM of the scatter smoothing across views, degrees.
        scatter_axial_fwhm: FWHM of the scatter smoothing along each segment's axial
            positions, as a fraction of the segment's length.
        poisson: draw Poisson prompts (False: prompts = the noise-free mean).
    """

    counts: float = 1.0e6
    randoms_fraction: float = 0.2
    scatter_fraction: float = 0.2
    crystal_efficiency_std: float = 0.05
    bin_efficiency_std: float = 0.02
    geometric_profile: float = 0.1
    detector_gap_period: int = 0
    randoms_fan_variation: float = 0.1
    scatter_tangential_fwhm: float = 0.5
    scatter_view_fwhm_deg: float = 45.0
    scatter_axial_fwhm: float = 0.5
    poisson: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.counts) and self.counts > 0):
            raise ValueError(f"counts must be a positive number of prompts, got {self.counts}")
        for name in ("randoms_fraction", "scatter_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.randoms_fraction + self.scatter_fraction >= 1.0:
            raise ValueError(
                f"randoms_fraction + scatter_fraction must be < 1 (the rest are trues), got "
                f"{self.randoms_fraction} + {self.scatter_fraction}"
            )
        for name in ("crystal_efficiency_std", "bin_efficiency_std", "randoms_fan_variation"):
            v = getattr(self, name)
            if not 0.0 <= v <= 0.5:
                raise ValueError(f"{name} must be in [0, 0.5], got {v}")
        if not 0.0 <= self.geometric_profile < 1.0:
            raise ValueError(f"geometric_profile must be in [0, 1), got {self.geometric_profile}")
        if int(self.detector_gap_period) != self.detector_gap_period or self.detector_gap_period < 0:
            raise ValueError(f"detector_gap_period must be an integer >= 0, got {self.detector_gap_period}")
        if self.detector_gap_period == 1:
            raise ValueError("detector_gap_period = 1 would make every detector dead; use 0 for no gaps")
        for name in ("scatter_tangential_fwhm", "scatter_axial_fwhm", "scatter_view_fwhm_deg"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SimulatedAcquisition:
    """The simulated data of one phantom. Sinograms (T, S, V, N) float32, images (Z, Y, X).

    Attributes:
        prompts: Poisson counts (float32 holding integers) with mean ``noise_free``.
        noise_free: ``multiplicative x G P activity + additive``; sums to ``counts``.
        multiplicative: ``normalisation x attenuation``.
        additive: ``randoms + scatter`` (counts).
        activity_scale: c, the factor from Bq/ml to the image units of these data.
        counts: expected total prompts (the requested number).
        activity: the phantom's activity times ``activity_scale`` (what a converged
            reconstruction of ``noise_free`` approaches).
        attenuation, normalisation, randoms, scatter: the parts.
    """

    prompts: torch.Tensor
    noise_free: torch.Tensor
    multiplicative: torch.Tensor
    additive: torch.Tensor
    activity_scale: float
    counts: float
    activity: torch.Tensor
    attenuation: torch.Tensor
    normalisation: torch.Tensor
    randoms: torch.Tensor
    scatter: torch.Tensor

    def acquisition_model(self, model: AcquisitionModel) -> AcquisitionModel:
        """``model`` (same geometry, subsets, PSF) with this acquisition's factors and additive term."""
        return model.with_terms(self.multiplicative, self.additive)


# ============================================================================ geometry helpers
def single_slice_geometry(
    scanner: Scanner, num_tangential_poss: int | None = None
) -> tuple[SinogramGeometry, ImageGeometry]:
    """A genuinely 2D problem: a single-ring copy of ``scanner`` and a one-slice image.

    One direct sinogram (T, S, V, N) = (1, 1, views, bins); the image (1, n, n) has
    the scanner's default in-plane grid and a slice as thick as a ring, so that the one
    LOR plane passes through the slice centre with weight 1. (A one-slice image inside a
    multi-ring scanner is seen only by the rings next to its centre, at partial weight.)
    """
    ring = dataclasses.replace(scanner, num_rings=1, name=f"{scanner.name} (single ring)")
    sino = SinogramGeometry.from_span(ring, span=1, max_ring_diff=0, num_tangential_poss=num_tangential_poss)
    default = sino.default_image()
    vxy = default.voxel_size_mm[1]
    image = ImageGeometry((1,) + default.shape[1:], (scanner.ring_spacing_mm, vxy, vxy))
    return sino, image


def _geometric_model(model: AcquisitionModel) -> AcquisitionModel:
    """The same geometry and backend without factors, additive term or PSF: ``G`` alone (pixel units)."""
    if isinstance(model, EmbeddedAcquisitionModel):
        return EmbeddedAcquisitionModel(
            model.sinogram_geometry,
            model.image_geometry,
            num_subsets=1,
            restrict_to_cylindrical_fov=model.restrict_to_cylindrical_fov,
            device=model.device,
            dtype=model.dtype,
            backend=model.backend,
        )
    return make_acquisition_model(backend_name(model), model.sinogram_geometry, model.image_geometry,
                                  device=model.device)


def _attenuation(model: AcquisitionModel, mu: torch.Tensor) -> torch.Tensor:
    """``exp(-0.1 vx G mu)``: ``G`` in pixel units (lengths / vx), so ``vx G mu`` is in mm x 1/cm."""
    line = _geometric_model(model).direct(mu) * model.image_geometry.voxel_size_mm[2]
    return torch.exp(-0.1 * line.clamp_min(0))


def detector_pairs(geom: SinogramGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Approximate detector and ring pairs of every bin.

    Returns ``det1, det2`` (V, N) for views of the unmashed sinogram (STIR's interleaved
    convention: ``det1 = v + t//2``, ``det2 = v - (t+1)//2 + D/2`` modulo D), and
    ``ring1, ring2`` (S,) from each row's axial position and mean ring difference (the
    central ring pair for axially compressed rows). Meant for simulating efficiency
    patterns, not for listmode binning.
    """
    D = geom.scanner.num_detectors_per_ring
    v = (np.arange(geom.num_views) * geom.view_mash_factor)[:, None]
    t = geom.tangential_pos_nums()[None, :]
    det1 = np.mod(v + np.floor_divide(t, 2), D)
    det2 = np.mod(v - np.floor_divide(t + 1, 2) + D // 2, D)
    m, delta, _ = geom.sinogram_lor_tables()
    nr = geom.scanner.num_rings
    centre = m / geom.scanner.ring_spacing_mm + (nr - 1) / 2.0
    ring1 = np.clip(np.round(centre - delta / 2.0), 0, nr - 1).astype(np.int64)
    ring2 = np.clip(np.round(centre + delta / 2.0), 0, nr - 1).astype(np.int64)
    return det1.astype(np.int64), det2.astype(np.int64), ring1, ring2


def _rng(rng: RandomLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _pair_product(per_detector: np.ndarray, geom: SinogramGeometry) -> np.ndarray:
    """(rings, D) per-detector values -> (S, V, N) products over each bin's detector pair."""
    det1, det2, ring1, ring2 = detector_pairs(geom)
    return per_detector[ring1][:, det1] * per_detector[ring2][:, det2]


# ============================================================================ the factors
def attenuation_factors(model: AcquisitionModel, mu_map: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``exp(-integral mu dl)``: mu in 1/cm, lengths in cm. (T, S, V, N), in (0, 1].

    Uses the model's geometry only (no factors, no PSF); LORs that miss the object get 1.
    """
    return _attenuation(model, _mu_tensor(model, mu_map))


def _mu_tensor(model: AcquisitionModel, mu_map: np.ndarray | torch.Tensor) -> torch.Tensor:
    mu = mu_map if isinstance(mu_map, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(mu_map))
    if tuple(mu.shape) != tuple(model.image_shape):
        raise ValueError(f"mu_map has shape {tuple(mu.shape)}; the model's image is {model.image_shape} (z,y,x)")
    if (mu < 0).any():
        raise ValueError(f"mu_map has negative values (min {float(mu.min()):g} 1/cm)")
    return mu.to(device=model.device, dtype=model.dtype)


def detection_efficiencies(
    geom: SinogramGeometry, params: AcquisitionParameters = AcquisitionParameters(), rng: RandomLike = None
) -> np.ndarray:
    """Normalisation (detection efficiency) of every bin, (T, S, V, N) float32, around 1.

    ``e[r1, d1] e[r2, d2] g(s) b`` with crystal efficiencies ``e`` ~ N(1, crystal_efficiency_std)
    (0 for detector gaps), a tangential geometric profile ``g = 1 - geometric_profile (s/s_max)^2``
    and per-bin factors ``b`` ~ N(1, bin_efficiency_std).
    """
    rng = _rng(rng)
    nr, D = geom.scanner.num_rings, geom.scanner.num_detectors_per_ring
    crystal = np.clip(1.0 + params.crystal_efficiency_std * rng.standard_normal((nr, D)), 0.3, 2.0).astype(np.float32)
    if params.detector_gap_period:
        crystal[:, params.detector_gap_period - 1 :: params.detector_gap_period] = 0.0
    eff = _pair_product(crystal, geom)
    s = geom.s_mm()
    eff *= (1.0 - params.geometric_profile * (s / max(np.abs(s).max(), 1e-9)) ** 2).astype(np.float32)[None, None, :]
    if params.bin_efficiency_std > 0:
        noise = rng.standard_normal(eff.shape, dtype=np.float32)
        noise *= np.float32(params.bin_efficiency_std)
        noise += np.float32(1.0)
        eff *= np.clip(noise, 0.5, 1.5, out=noise)
    return eff[None]


def randoms_distribution(
    geom: SinogramGeometry,
    efficiencies: np.ndarray,
    params: AcquisitionParameters = AcquisitionParameters(),
    rng: RandomLike = None,
) -> np.ndarray:
    """Shape of the randoms (sums to 1), (T, S, V, N): a fan-sum model ``s_i s_j``.

    Singles ``s`` vary smoothly around each ring and along the axis
    (``randoms_fan_variation``); the randoms of a bin are the product of its two
    detectors' singles times the bin's detection efficiency (dead detectors see none).
    """
    rng = _rng(rng)
    nr, D = geom.scanner.num_rings, geom.scanner.num_detectors_per_ring
    angle = 2 * np.pi * np.arange(D) / D
    ring_pos = np.linspace(-1.0, 1.0, nr)
    fan = np.ones((nr, D))
    for harmonic in (1, 2, 3):
        amplitude = params.randoms_fan_variation / harmonic * rng.uniform(-1, 1)
        fan += amplitude * np.cos(harmonic * angle + rng.uniform(0, 2 * np.pi))[None, :]
    var = params.randoms_fan_variation
    fan *= (1.0 + var * rng.uniform(-1, 1) * ring_pos - 0.5 * var * ring_pos**2)[:, None]
    fan = np.clip(fan, 0.1, None).astype(np.float32)
    r = _pair_product(fan, geom)[None]
    r *= efficiencies
    total = float(r.sum(dtype=np.float64))
    if total <= 0:
        raise ValueError("the randoms distribution is zero everywhere (all detectors dead?)")
    r /= np.float32(total)
    return r


def _gaussian_filter_dim(x: torch.Tensor, dim: int, sigma: float, circular: bool) -> torch.Tensor:
    """Gaussian smoothing (sigma in samples) along ``dim`` by FFT; edges replicated unless circular."""
    if sigma <= 0 or x.shape[dim] < 2:
        return x
    n = x.shape[dim]
    if not circular:
        p = min(int(math.ceil(3 * sigma)), 4 * n)
        first = x.narrow(dim, 0, 1).expand(*[p if d == dim % x.dim() else -1 for d in range(x.dim())])
        last = x.narrow(dim, n - 1, 1).expand(*[p if d == dim % x.dim() else -1 for d in range(x.dim())])
        x = torch.cat([first, x, last], dim=dim)
    L = x.shape[dim]
    f = torch.fft.rfftfreq(L, device=x.device, dtype=torch.float64)
    h = torch.exp(-2.0 * (math.pi * sigma * f) ** 2).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = h.numel()
    y = torch.fft.irfft(torch.fft.rfft(x, dim=dim) * h.view(shape), n=L, dim=dim)
    if not circular:
        y = y.narrow(dim, p, n)
    return y


_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def scatter_distribution(
    geom: SinogramGeometry,
    attenuated_projection: torch.Tensor,
    efficiencies: torch.Tensor,
    params: AcquisitionParameters = AcquisitionParameters(),
) -> torch.Tensor:
    """Shape of the scatter (sums to 1), (T, S, V, N): the attenuated projection, heavily smoothed.

    Gaussian smoothing along the tangential bins, across views (periodic over 2 pi,
    the sinogram continued by its tangential mirror image after pi) and along the axial
    positions of each segment; then times the detection efficiencies.
    """
    y = attenuated_projection.to(torch.float32)
    T, S, V, N = y.shape
    y = _gaussian_filter_dim(y, 3, params.scatter_tangential_fwhm * N * _FWHM_TO_SIGMA, circular=False)
    sigma_v = params.scatter_view_fwhm_deg / (180.0 / V) * _FWHM_TO_SIGMA
    if sigma_v > 0 and V > 1:
        y = torch.cat([y, y.flip(3)], dim=2)
        y = _gaussian_filter_dim(y, 2, sigma_v, circular=True)[:, :, :V]
    if params.scatter_axial_fwhm > 0:
        rows = []
        for seg in geom.sirf_segment_order():
            k = geom.segment(seg).num_axial_poss
            off = geom.sirf_row_offset(seg)
            sigma = params.scatter_axial_fwhm * k * _FWHM_TO_SIGMA
            rows.append(_gaussian_filter_dim(y[:, off : off + k], 1, sigma, circular=False))
        y = torch.cat(rows, dim=1)
    y = y.clamp_min(0) * efficiencies.to(y)
    total = float(y.sum(dtype=torch.float64))
    if total <= 0:
        raise ValueError("the scatter distribution is zero everywhere (empty activity, or all detectors dead)")
    return (y / total).to(attenuated_projection.dtype)


# ============================================================================ the acquisition
def simulate_acquisition(
    phantom: Phantom,
    model: AcquisitionModel,
    params: AcquisitionParameters = AcquisitionParameters(),
    rng: RandomLike = None,
    normalisation: np.ndarray | torch.Tensor | None = None,
) -> SimulatedAcquisition:
    """Simulate the prompts of ``phantom`` on ``model``'s geometry (see the module docstring).

    Only the model's geometry, PSF, device and dtype are used; its own factors and
    additive term are ignored. ``normalisation``: the detection efficiencies n (T, S, V, N)
    to use (e.g. an ECAT8 norm's efficiency sinogram); None draws them with
    :func:`detection_efficiencies`. Random draws, in this order from ``rng``: the
    efficiencies (unless given), the randoms' singles pattern, the Poisson counts.
    """
    rng = _rng(rng)
    if tuple(phantom.image_geometry.shape) != tuple(model.image_shape):
        raise ValueError(
            f"phantom image {phantom.image_geometry.shape} (z,y,x) does not match the model's image {model.image_shape}"
        )
    geom = model.sinogram_geometry
    dev, dt = model.device, model.dtype
    mu = _mu_tensor(model, phantom.mu_map)
    activity = torch.from_numpy(np.ascontiguousarray(phantom.activity)).to(device=dev, dtype=dt)
    attenuation = _attenuation(model, mu)
    projection = model.with_terms(None, None).direct(activity)  # G P f, (T,S,V,N)
    if normalisation is None:
        normalisation = detection_efficiencies(geom, params, rng)
    normalisation = torch.as_tensor(normalisation).to(device=dev, dtype=dt)
    if tuple(normalisation.shape) != tuple(geom.shape):
        raise ValueError(f"normalisation has shape {tuple(normalisation.shape)}; the sinogram is {geom.shape}")
    multiplicative = normalisation * attenuation
    trues_shape = (projection * multiplicative).to(torch.float64)
    trues_sum = float(trues_shape.sum())
    if not trues_sum > 0:
        raise ValueError("the phantom's activity projects to zero trues (empty phantom, or outside the FOV)")
    counts = float(params.counts)
    trues_total = (1.0 - params.randoms_fraction - params.scatter_fraction) * counts
    scale = trues_total / trues_sum
    randoms = torch.from_numpy(randoms_distribution(geom, normalisation.cpu().numpy(), params, rng)).to(dev)
    randoms = (randoms.to(torch.float64) * (params.randoms_fraction * counts)).to(dt)
    scatter = scatter_distribution(geom, projection * attenuation, normalisation, params)
    scatter = (scatter.to(torch.float64) * (params.scatter_fraction * counts)).to(dt)
    additive = randoms + scatter
    noise_free64 = trues_shape * scale + randoms.to(torch.float64) + scatter.to(torch.float64)
    noise_free = noise_free64.to(dt)
    if params.poisson:
        prompts_np = rng.poisson(noise_free64.cpu().numpy()).astype(np.float32)
        prompts = torch.from_numpy(prompts_np).to(device=dev, dtype=dt)
    else:
        prompts = noise_free.clone()
    return SimulatedAcquisition(
        prompts=prompts,
        noise_free=noise_free,
        multiplicative=multiplicative,
        additive=additive,
        activity_scale=float(scale),
        counts=counts,
        activity=activity * scale,
        attenuation=attenuation,
        normalisation=normalisation,
        randoms=randoms,
        scatter=scatter,
    )
