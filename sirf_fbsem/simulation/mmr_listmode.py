"""A simulated Siemens mMR brain scan as the scanner delivers it: PETLINK listmode, ECAT8 norm, mu-map.

:func:`simulate_mmr_listmode` writes, into one folder (``<name>`` = ``mmr_brain`` by default):

=========================  ======================================================================
file                       content
=========================  ======================================================================
``<name>.l`` + ``.l.hdr``  PETLINK 32-bit listmode: prompts and delayeds, a time tag every ms
``<name>_norm.n`` + .hdr   ECAT8 normalisation components (:mod:`~sirf_fbsem.io.ecat8_norm_writer`)
``<name>_mu_map.hv``       attenuation map, 1/cm, 127 slices of 2.03125 mm, in-plane voxels
                           ``mu_map_binning`` x 2.08626 mm, cropped to the head
``<name>_truth.hv``        the phantom in the reconstruction's units (``c f``), 127 slices of
                           2.03125 mm, in-plane voxels ``truth_binning`` x 2.08626 mm (block
                           means of the simulation grid), cropped to the head
``<name>.json``            the settings, seed and counts
=========================  ======================================================================

The model (span 11, maximum ring difference 60, image ``image_shape`` on the mMR's default
voxels; see :mod:`.acquisition` for the symbols)::

    ybar = n a G f' + r + sc,    f' = c f,    delayeds ~ Poisson(r),    prompts ~ Poisson(ybar)

with ``n`` the efficiency sinogram of the written ECAT8 norm as STIR computes it
(:meth:`~sirf_fbsem.io.ecat8_norm.ECAT8Norm.efficiency_sinogram`, read back from the file, so the
reconstruction's ``--norm`` gives the very same factors), ``a`` the attenuation of the phantom's
own mu-map, ``r`` randoms (fan-sum singles model) and ``sc`` scatter (smoothed attenuated
projection), as :func:`~.acquisition.simulate_acquisition`. The span-11 counts are split into
span-1 listmode events by the crystal efficiencies of each bin's ring pairs
(:func:`~sirf_fbsem.io.petlink_writer.events_from_counts`). Histogramming the listmode into span
11 gives back the simulated prompts and delayeds exactly.

Units: the truth is what a reconstruction on the mMR's default voxels approaches (``c f``; the
projector's line integrals are in units of the x voxel size, as STIR's, so an image on voxels k
times wider comes out k times higher).

What a reconstruction from these files does not model: the scatter (``sirf-fbsem reconstruct``
estimates no scatter, so an image without ``--additive`` is biased up by about the scatter
fraction) and the resolution loss of the written mu-map (coarser than the phantom's).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..geometry import ImageGeometry, Scanner, SinogramGeometry, scanner_preset
from ..io.ecat8_norm import read_ecat8_norm
from ..io.ecat8_norm_writer import CRYSTALS_PER_BLOCK, ECAT8NormComponents, write_ecat8_norm
from ..io.interfile import write_image
from ..io.petlink_writer import events_from_counts, write_petlink_listmode
from ..projectors.embedded import EmbeddedAcquisitionModel
from .acquisition import AcquisitionParameters, simulate_acquisition
from .phantoms import PHANTOM_KINDS, make_phantom

__all__ = ["MMRListmodeParameters", "MMRListmodeScan", "simulated_ecat8_norm", "simulate_mmr_listmode",
           "bin_in_plane", "crop_in_plane"]


@dataclass(frozen=True)
class MMRListmodeParameters:
    """How the mMR listmode scan is simulated.

    Attributes:
        prompts: expected prompts (trues + scatter + randoms); the delayeds add about
            ``randoms_fraction x prompts`` events. 4 bytes an event.
        randoms_fraction, scatter_fraction: shares of the expected prompts.
        duration_s: acquisition length (a time tag every ms: 4 bytes a ms).
        image_shape: simulation image (z, y, x) on the mMR's default voxels (2.03125 x 2.08626 x
            2.08626 mm), centred in the default 127 x 285 x 285 image.
        phantom: "mni152" (needs nilearn) or "procedural".
        crystal_efficiency_std, geometric_profile, interference_std, axial_effects_std: spread
            of the ECAT8 components (crystal efficiencies, the drop of the geometric effects at the
            edge of the tangential range, crystal interference, axial effects), around 1.
        mu_map_binning, truth_binning: in-plane voxels of the simulation grid per voxel of the
            written mu-map and truth (2: 4.17 mm, a quarter of the bytes; 1: the reconstruction's voxels).
        crop_margin_voxels: voxels kept around the head when cropping the mu-map and truth.
    """

    prompts: float = 1.0e6
    randoms_fraction: float = 0.2
    scatter_fraction: float = 0.15
    duration_s: float = 10.0
    image_shape: tuple[int, int, int] = (127, 128, 128)
    phantom: str = "mni152"
    crystal_efficiency_std: float = 0.05
    geometric_profile: float = 0.1
    interference_std: float = 0.05
    axial_effects_std: float = 0.02
    mu_map_binning: int = 2
    truth_binning: int = 2
    crop_margin_voxels: int = 4

    def __post_init__(self) -> None:
        if self.phantom not in PHANTOM_KINDS:
            raise ValueError(f"phantom must be one of {PHANTOM_KINDS}, got {self.phantom!r}")
        if not (math.isfinite(self.duration_s) and self.duration_s >= 0.001):
            raise ValueError(f"duration_s must be >= 0.001 s, got {self.duration_s}")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be 3 positive sizes (z, y, x), got {self.image_shape}")
        for name in ("mu_map_binning", "truth_binning"):
            b = getattr(self, name)
            if int(b) != b or b < 1 or self.image_shape[1] % b or self.image_shape[2] % b:
                raise ValueError(f"{name} must be a whole number >= 1 dividing the image's y and x sizes "
                                 f"{self.image_shape[1:]}, got {b}")
        for name in ("crystal_efficiency_std", "interference_std", "axial_effects_std"):
            if not 0 <= getattr(self, name) <= 0.3:
                raise ValueError(f"{name} must be in [0, 0.3], got {getattr(self, name)}")
        if int(self.crop_margin_voxels) != self.crop_margin_voxels or self.crop_margin_voxels < 0:
            raise ValueError(f"crop_margin_voxels must be a whole number >= 0, got {self.crop_margin_voxels}")
        self.acquisition()  # prompts, fractions and geometric_profile checked there

    def acquisition(self) -> AcquisitionParameters:
        """:class:`~.acquisition.AcquisitionParameters` of the span-11 simulation (the norm gives the efficiencies)."""
        return AcquisitionParameters(counts=self.prompts, randoms_fraction=self.randoms_fraction,
                                     scatter_fraction=self.scatter_fraction, geometric_profile=self.geometric_profile)


@dataclass(frozen=True)
class MMRListmodeScan:
    """The files :func:`simulate_mmr_listmode` wrote and what they hold.

    ``activity_scale``: c, the truth is the phantom's Bq/ml times this; ``prompts`` /
    ``delayeds``: events in the listmode file; ``expected_prompts``: sum of the mean.
    """

    listmode_header: Path
    norm_header: Path
    mu_map: Path
    truth: Path
    summary: Path
    prompts: int
    delayeds: int
    expected_prompts: float
    activity_scale: float


def simulated_ecat8_norm(scanner: Scanner, params: MMRListmodeParameters,
                         rng: np.random.Generator) -> ECAT8NormComponents:
    """Random ECAT8 components around 1 for ``scanner`` (span 11, maximum ring difference 60).

    Crystal efficiencies ``1 + crystal_efficiency_std N(0, 1)`` (clipped to [0.3, 2]; STIR
    zeroes the gap crystals when reading); geometric effects ``1 - geometric_profile (t / t_max)^2``
    in every plane; interference and axial effects ``1 + std N(0, 1)`` (clipped to [0.5, 1.5]).
    """
    nr, nd, T = scanner.num_rings, scanner.num_detectors_per_ring, scanner.max_num_non_arccorrected_bins
    t = (np.arange(T) - T // 2) / (T // 2)
    geometric = np.broadcast_to(1.0 - params.geometric_profile * t**2, (2 * nr - 1, T))
    num_axial = SinogramGeometry.from_span(scanner, 11, 60).num_sinograms

    def around_one(shape: tuple[int, ...], std: float, lo: float, hi: float) -> np.ndarray:
        return np.clip(1.0 + std * rng.standard_normal(shape), lo, hi).astype(np.float32)

    return ECAT8NormComponents(
        geometric=geometric.astype(np.float32),
        interference=around_one((T, CRYSTALS_PER_BLOCK), params.interference_std, 0.5, 1.5),
        crystal_efficiencies=around_one((nr, nd), params.crystal_efficiency_std, 0.3, 2.0),
        axial_effects=around_one((num_axial,), params.axial_effects_std, 0.5, 1.5),
        span=11, max_ring_diff=60,
    )


def bin_in_plane(geometry: ImageGeometry, image: np.ndarray, factor: int) -> tuple[ImageGeometry, np.ndarray]:
    """Mean of ``factor x factor`` in-plane blocks; the coarse grid covers the same region (origin adjusted).

    Voxel ``J`` of the coarse grid is the mean of fine voxels ``factor J .. factor J + factor - 1``;
    its centre lies at their mean position: ``origin' = origin + ((factor - 1)/2 - n//2 + factor (n'//2)) v``
    along y and x (fine size n, coarse n' = n / factor, fine voxel v).
    """
    nz, ny, nx = geometry.shape
    if ny % factor or nx % factor:
        raise ValueError(f"binning factor {factor} does not divide the image's y, x sizes {ny}, {nx}")
    out = np.asarray(image, dtype=np.float64).reshape(nz, ny // factor, factor, nx // factor, factor).mean(axis=(2, 4))
    vz, vy, vx = geometry.voxel_size_mm
    oz, oy, ox = geometry.origin_mm

    def shift(n: int, v: float) -> float:
        return ((factor - 1) / 2 - n // 2 + factor * ((n // factor) // 2)) * v

    coarse = ImageGeometry((nz, ny // factor, nx // factor), (vz, factor * vy, factor * vx),
                           (oz, oy + shift(ny, vy), ox + shift(nx, vx)))
    return coarse, out.astype(np.float32)


def crop_in_plane(geometry: ImageGeometry, image: np.ndarray, keep: np.ndarray,
                  margin: int) -> tuple[ImageGeometry, np.ndarray]:
    """The in-plane box holding ``keep`` (a (Z, Y, X) mask) plus ``margin`` voxels; all slices kept.

    The crop's origin puts every voxel at its old position: cropping indices ``j0 .. j0 + n' - 1``
    of ``n`` gives ``origin' = origin + (j0 + n'//2 - n//2) v``. (Slices are kept because STIR places
    an image's axial middle at the scanner's centre: a z crop would move it.)
    """
    if not np.any(keep):
        raise ValueError("nothing to keep: the mask is empty")
    nz, ny, nx = geometry.shape
    ys, xs = np.nonzero(keep.any(axis=0))
    j0, j1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + 1 + margin, ny)
    i0, i1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + 1 + margin, nx)
    vz, vy, vx = geometry.voxel_size_mm
    oz, oy, ox = geometry.origin_mm
    cropped = ImageGeometry((nz, j1 - j0, i1 - i0), geometry.voxel_size_mm,
                            (oz, oy + (j0 + (j1 - j0) // 2 - ny // 2) * vy, ox + (i0 + (i1 - i0) // 2 - nx // 2) * vx))
    return cropped, np.ascontiguousarray(image[:, j0:j1, i0:i1])


def simulate_mmr_listmode(
    out_dir: str | os.PathLike,
    params: MMRListmodeParameters = MMRListmodeParameters(),
    seed: int = 0,
    name: str = "mmr_brain",
    overwrite: bool = False,
) -> MMRListmodeScan:
    """Simulate one mMR brain scan and write its files into ``out_dir`` (see the module docstring).

    Deterministic for a seed: ``numpy.random.SeedSequence(seed).spawn(2)`` gives the phantom's
    and the acquisition's generators (norm components, randoms pattern, Poisson counts,
    delayeds, span-1 split, event times, in that order). Memory: about 5 GB (span-11 sinograms of
    290 MB each); time: 1.5 to 2 minutes on 2 CPU cores (two forward projections of the image).
    Existing files are refused unless ``overwrite``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phantom_rng, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))
    scanner = scanner_preset("Siemens_mMR")
    geometry = SinogramGeometry.from_span(scanner, span=11, max_ring_diff=60)
    image = ImageGeometry(params.image_shape, geometry.default_image().voxel_size_mm)
    phantom = make_phantom(params.phantom, image, phantom_rng)

    norm_header = write_ecat8_norm(out / f"{name}_norm.n.hdr", simulated_ecat8_norm(scanner, params, rng),
                                   scanner, overwrite=overwrite)
    norm = read_ecat8_norm(norm_header)  # the factors exactly as --norm gives them to the reconstruction
    sim = simulate_acquisition(phantom, EmbeddedAcquisitionModel(geometry, image), params.acquisition(), rng,
                               normalisation=norm.efficiency_sinogram(geometry))
    prompts = sim.prompts.cpu().numpy()
    delayeds = rng.poisson(sim.randoms.cpu().numpy().astype(np.float64))
    expected, scale = float(sim.noise_free.sum(dtype=torch.float64)), sim.activity_scale
    truth = sim.activity.cpu().numpy()
    del sim
    eff = norm.crystal_efficiencies
    written = write_petlink_listmode(
        out / f"{name}.l.hdr",
        events_from_counts(prompts, geometry, rng, crystal_efficiencies=eff),
        events_from_counts(delayeds, geometry, rng, crystal_efficiencies=eff),
        params.duration_s, rng, overwrite=overwrite)

    paths = {"mu_map": out / f"{name}_mu_map.hv", "truth": out / f"{name}_truth.hv"}
    for key, values, binning in (("mu_map", phantom.mu_map, params.mu_map_binning),
                                 ("truth", truth, params.truth_binning)):
        geom, binned = bin_in_plane(image, values, binning)
        _, head = bin_in_plane(image, phantom.head_mask, binning)
        geom, binned = crop_in_plane(geom, binned, head > 0, -(-params.crop_margin_voxels // binning))
        write_image(paths[key], geom, binned, overwrite=overwrite)
    summary_path = out / f"{name}.json"
    if summary_path.exists() and not overwrite:
        raise FileExistsError(f"'{summary_path}' exists; pass overwrite=True to replace it")
    summary = {"seed": int(seed), "parameters": asdict(params), "prompts": int(prompts.sum()),
               "delayeds": int(delayeds.sum()), "expected_prompts": expected, "activity_scale": scale,
               "grey_white_ratio": phantom.grey_white_ratio, "lesions": [asdict(x) for x in phantom.lesions],
               "sinogram_geometry": geometry.describe(), "simulation_image": image.describe(),
               "files": {"listmode": written.header_path.name, "norm": norm_header.name,
                         "mu_map": paths["mu_map"].name, "truth": paths["truth"].name}}
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return MMRListmodeScan(written.header_path, norm_header, paths["mu_map"], paths["truth"], summary_path,
                           int(prompts.sum()), int(delayeds.sum()), expected, scale)
