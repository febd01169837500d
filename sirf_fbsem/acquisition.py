"""Everything measured about one scan, gathered from the files a user points at.

``load_acquisition`` turns a sinogram (Interfile ``.hs``), an mMR listmode file
(``.l.hdr``) or a PETSIRD listmode file (recognised by its content, whatever its
name), plus optional normalisation, attenuation (mu-map) and additive terms, into an
:class:`Acquisition`: prompts and the terms of the acquisition model, all as
SIRF-ordered (T,S,V,N) float32 arrays.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .errors import InputError
from .geometry import ImageGeometry, SinogramGeometry, geometry_mismatch, scanner_preset
from .io import ecat8_norm, interfile, listmode, mumap, petsird, randoms
from .io.interfile import sinogram_geometry_from_header
from .io.petsird import petsird_format
from .projectors.base import AcquisitionModel
from .projectors.embedded import EmbeddedAcquisitionModel
from .projectors.factory import make_acquisition_model

__all__ = ["Acquisition", "load_acquisition", "attenuation_factors", "input_format", "estimated_image_geometry"]


@dataclass
class Acquisition:
    """Prompts (counts) and model terms on one sinogram geometry; arrays (T,S,V,N) float32.

    ``listmode_header``: the parsed header of an mMR listmode input (the DICOM writer takes the
    radiopharmaceutical and times from it); None for sinograms and PETSIRD. ``histogram``: what
    the embedded histogrammer read from listmode or PETSIRD input (typed record); None for
    sinograms and SIRF's histogrammer. ``metadata``: plain values the readers report (counts
    histogrammed, clipped values, the μ-map used), for logs.
    """

    geometry: SinogramGeometry
    prompts: np.ndarray
    multiplicative: np.ndarray | None = None
    additive: np.ndarray | None = None
    source: str = ""
    metadata: dict = field(default_factory=dict)
    listmode_header: listmode.ListmodeHeader | None = None
    histogram: listmode.ListmodeHistogramInfo | petsird.PetsirdHistogramInfo | None = None

    def model(self, image: ImageGeometry | None = None, backend: str = "embedded", **kwargs) -> AcquisitionModel:
        """The acquisition model of these data on ``backend`` ("embedded" or "sirf").

        ``image`` defaults to STIR's default image of the scanner; ``kwargs`` go to
        :func:`sirf_fbsem.projectors.factory.make_acquisition_model` (``num_subsets``,
        ``psf_fwhm_mm``, ``device``).
        """
        return make_acquisition_model(
            backend,
            self.geometry,
            image or self.geometry.default_image(),
            multiplicative=self.multiplicative,
            additive=self.additive,
            **kwargs,
        )


def crop_to_support(values: np.ndarray, image: ImageGeometry, margin_voxels: int = 3
                    ) -> tuple[np.ndarray, ImageGeometry]:
    """``values`` (Z, Y, X) and ``image`` cut by the same number of x/y voxels on every side, to the
    smallest image whose cylindrical FOV (:meth:`ImageGeometry.fov_radius_mm`, where the projectors
    trace) holds every non-zero voxel with ``margin_voxels`` to spare.

    Line integrals through the crop equal those through the whole image: the voxels dropped are 0,
    the kept ones keep their centres, and the rays' new end points (on the smaller cylinder) lie
    beyond the reach of Joseph's interpolation and of Siddon's end voxels from any non-zero voxel.
    A brain mu-map on SIRF's 285 x 285 mMR image shrinks to about a third of the voxels, and its
    projection takes about a third of the time. Images with an x/y origin shift are returned whole.
    """
    if abs(image.origin_mm[1]) > 0.05 or abs(image.origin_mm[2]) > 0.05:
        return values, image
    support = np.asarray(values != 0).any(axis=0)
    if not support.any():
        return values, image
    nz, ny, nx = image.shape
    _, y, x = image.centred_coordinates_mm()
    jy, jx = np.nonzero(support)
    voxel = max(image.voxel_size_mm[1], image.voxel_size_mm[2])
    need = float(np.sqrt(y[jy] ** 2 + x[jx] ** 2).max()) + margin_voxels * voxel
    best, best_image = 0, image
    for k in range(1, min(ny, nx) // 2):
        crop = ImageGeometry((nz, ny - 2 * k, nx - 2 * k), image.voxel_size_mm, image.origin_mm)
        if crop.fov_radius_mm() < need:
            break
        best, best_image = k, crop
    return values[:, best:ny - best, best:nx - best], best_image


def attenuation_factors(
    mu_map_per_cm: np.ndarray, image: ImageGeometry, geometry: SinogramGeometry, device: str = "cpu",
    ray_tracing: str = "joseph", num_tangential_LORs: int = 1,
) -> np.ndarray:
    """exp(-integral mu dl) per bin, (T,S,V,N): mu in 1/cm; the projector's pixel units x vx give mm (x 0.1 for cm).

    ``ray_tracing`` and ``num_tangential_LORs`` as :class:`EmbeddedAcquisitionModel`'s; SIRF
    projects the mu-map with its acquisition model's projector, which ``"siddon"`` (or
    ``"auto"`` on the CPU) with that model's tangential LORs reproduces. Joseph (the default here,
    as in simulation: about 3x faster) differs from it by 0.1-1 % in the correction factors 1/att
    (relative L2 on SIRF's brain and thorax examples; docs/sirf.md). The map is projected on its
    crop to its support (:func:`crop_to_support`: the same line integrals, a fraction of the time).
    """
    mu, image = crop_to_support(np.asarray(mu_map_per_cm, dtype=np.float32), image)
    model = EmbeddedAcquisitionModel(geometry, image, device=device, ray_tracing=ray_tracing,
                                     num_tangential_LORs=num_tangential_LORs)
    with torch.no_grad():
        line_mm = model.direct(torch.from_numpy(np.ascontiguousarray(mu)))
        line_mm = line_mm * image.voxel_size_mm[2]  # pixel units -> mm
    return torch.exp(-0.1 * line_mm).cpu().numpy().astype(np.float32)


def _is_petsird(path: Path) -> bool:
    return path.is_file() and petsird_format(path) is not None


def _is_listmode(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".l.hdr") or name.endswith(".l") or name.endswith(".hdr.stir")


def input_format(path: str | Path) -> Literal["petsird", "listmode", "sinogram"]:
    """What :func:`load_acquisition` reads ``path`` as: PETSIRD (by its first bytes), mMR
    listmode (``.l.hdr``, ``.l``, ``.hdr.stir``) or an Interfile sinogram (anything else)."""
    path = Path(path)
    if _is_petsird(path):
        return "petsird"
    return "listmode" if _is_listmode(path) else "sinogram"


def estimated_image_geometry(path: str | Path, span: int = 11) -> ImageGeometry | None:
    """The image grid :func:`load_acquisition` + ``geometry.default_image()`` will give for
    ``path``, from its header only (cheap: for output-space checks before the run); None for
    PETSIRD (its geometry is known after reading)."""
    kind = input_format(path)
    if kind == "listmode":
        return _mmr_geometry(span).default_image()
    if kind == "sinogram":
        return sinogram_geometry_from_header(path).default_image()
    return None


def load_acquisition(
    path: str | Path,
    *,
    norm: str | Path | None = None,
    mu_map: str | Path | None = None,
    additive: str | Path | None = None,
    time_interval_s: tuple[float, float] | None = None,
    span: int = 11,
    image: ImageGeometry | None = None,
    negative: str = "error",
    progress: bool = True,
    backend: str = "embedded",
    ray_tracing: str = "auto",
) -> Acquisition:
    """Read prompts and optional terms.

    Args:
        path: Interfile sinogram (.hs), mMR listmode header (.l.hdr) or PETSIRD file
            (binary or NDJSON; any name: recognised by its first bytes).
        norm: mMR ECAT8 norm (.n.hdr / .n) or an Interfile sinogram of multiplicative
            efficiency factors (.hs; counts = factor x true counts).
        mu_map: attenuation map (Interfile .hv or NIfTI) in 1/cm.
        additive: Interfile sinogram of randoms + scatter (counts). For listmode without
            it, randoms are estimated from the delayeds (when the file has any).
        time_interval_s: (t0, t1) seconds from the start, listmode only.
        span: axial compression when histogramming listmode (1 or 11 for the mMR; any odd
            span for PETSIRD, with the largest maximum ring difference it allows).
        image: image geometry for the mu-map resampling (default: the scanner's default image).
        negative: what to do with negative prompts (precorrected data such as STIR's
            recon_demo have them): "error" (default) or "zero" (clip to 0, with a warning).
        backend: "sirf" histograms mMR listmode with SIRF's ``ListmodeToSinograms`` and takes
            SIRF's randoms estimate from the delayeds; "embedded" (default) the package's own
            histogrammer (the same bins; tests/io/test_listmode.py) and fan-sum ML randoms.
        ray_tracing: how the mu-map is projected (:func:`attenuation_factors`); "auto" (default)
            is Siddon on the CPU, as SIRF projects it.
    """
    if negative not in ("error", "zero"):
        raise ValueError(f"negative must be 'error' or 'zero', got {negative!r}")
    path = Path(path)
    meta: dict = {}
    header: listmode.ListmodeHeader | None = None
    histogram: listmode.ListmodeHistogramInfo | petsird.PetsirdHistogramInfo | None = None
    add = None
    if _is_petsird(path):
        prompts, delayeds, info = petsird.histogram_petsird(
            path, span=span, time_interval_s=time_interval_s, store_delayeds=True, progress=progress
        )
        geom = info.sinogram_geometry
        histogram = info
        meta.update(info.to_metadata())
        if additive is None and delayeds is not None and delayeds.sum() > 0:
            add = randoms.randoms_from_delayeds(delayeds, geom, smooth=True).astype(np.float32)
    elif _is_listmode(path):
        hdr = listmode.read_listmode_header(path)
        geom = _mmr_geometry(span)
        if backend == "sirf":  # SIRF's ListmodeToSinograms and its randoms estimate from the delayeds
            prompts, delayeds, sirf_randoms = listmode.histogram_with_sirf(
                path, geom, time_interval_s, estimate_randoms=True)
            meta.update({"histogrammed_by": "sirf.STIR.ListmodeToSinograms", "prompts": float(prompts.sum()),
                         "delayeds": float(delayeds.sum())})
            if additive is None and delayeds.sum() > 0:
                add = sirf_randoms.astype(np.float32)
        else:
            prompts, delayeds, info = listmode.histogram_listmode(
                hdr, geom, time_interval_s=time_interval_s, store_delayeds=True, progress=progress
            )
            histogram = info
            meta.update(info.to_metadata())
            if additive is None and delayeds is not None:
                add = randoms.randoms_from_delayeds(delayeds, geom, smooth=True).astype(np.float32)
        header = hdr
    else:
        if time_interval_s is not None:
            raise InputError(f"a time interval applies to listmode input only; '{path}' is a sinogram")
        geom, prompts = interfile.read_projdata(path, allow_negative=negative == "zero")
        if interfile.warn_if_not_counts(prompts, path):  # prompts only: norm/additive/mu are not counts
            meta["prompts_not_integer_counts"] = True
        num_negative = int((prompts < 0).sum())
        if num_negative:
            warnings.warn(
                f"sinogram '{path}': {num_negative:,} negative values (minimum {float(prompts.min()):g}; "
                "precorrected data?) clipped to 0",
                stacklevel=2,
            )
            prompts = np.maximum(prompts, 0)
            meta["negative_values_clipped"] = num_negative
    mult = None
    if norm is not None:
        mult = _read_norm(Path(norm), geom)
    if mu_map is not None:
        img = image or geom.default_image()
        mu_geom, mu = mumap.read_mu_map(mu_map, scanner=geom.scanner)
        mumap.check_mu_units(mu, mu_map)
        if mu_geom != img:
            mu = mumap.resample_to(mu, mu_geom, img, geom.scanner)
        att = attenuation_factors(mu, img, geom, ray_tracing=ray_tracing)
        mult = att if mult is None else mult * att
        meta["mu_map"] = str(mu_map)
    if additive is not None:
        add_geom, add = interfile.read_projdata(additive)
        _check_same(add_geom, geom, additive, path)
    return Acquisition(geom, np.asarray(prompts, dtype=np.float32), mult, add, str(path), meta, header, histogram)


def _mmr_geometry(span: int) -> SinogramGeometry:
    return SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=span, max_ring_diff=60)


def _read_norm(path: Path, geom: SinogramGeometry) -> np.ndarray:
    name = path.name.lower()
    if name.endswith(".hs"):
        ngeom, factors = interfile.read_projdata(path, allow_negative=False)
        _check_same(ngeom, geom, path, "the prompts")
        return factors.astype(np.float32)
    return ecat8_norm.read_ecat8_norm(path).efficiency_sinogram(geom).astype(np.float32)


def _check_same(a: SinogramGeometry, b: SinogramGeometry, path_a, path_b) -> None:
    diffs = geometry_mismatch(a, b)
    if diffs:
        raise InputError(f"sinogram '{path_a}' does not match the geometry of '{path_b}': " + "; ".join(diffs))
