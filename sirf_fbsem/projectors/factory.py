"""Choose the backend of an acquisition model: the embedded projector or SIRF.

    ybar = S (G P x) + b        (both backends, SIRF's units: see :mod:`.embedded`)

:func:`make_acquisition_model` is the one place that turns a sinogram geometry, an
image geometry and the model terms (arrays) into an
:class:`~sirf_fbsem.projectors.base.AcquisitionModel` of the chosen backend, so that the
command line (``--backend embedded|sirf``), training, simulation and evaluation build
their models the same way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..geometry import ImageGeometry, SinogramGeometry
from .base import AcquisitionModel
from .embedded import EmbeddedAcquisitionModel
from .sirf import SIRFAcquisitionModel

__all__ = ["BACKENDS", "make_acquisition_model", "sirf_available", "backend_name", "check_backend", "add_backend_argument"]

#: names accepted by ``--backend`` and :func:`make_acquisition_model`
BACKENDS = ("embedded", "sirf")

Array = torch.Tensor | np.ndarray


def sirf_available() -> bool:
    """Whether ``import sirf.STIR`` works here."""
    try:
        import sirf.STIR  # noqa: F401
    except ImportError:
        return False
    return True


def add_backend_argument(parser) -> None:
    """``--backend embedded|sirf`` on an argparse parser (default embedded)."""
    parser.add_argument("--backend", choices=BACKENDS, default="embedded",
                        help="acquisition model: the embedded projector (default) or SIRF's ray tracing "
                             "(needs sirf.STIR); both give SIRF's numbers")


def check_backend(backend: str, flag: str = "--backend") -> None:
    """Raise ValueError naming ``flag`` when ``backend`` is unknown or SIRF is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"{flag} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "sirf" and not sirf_available():
        raise ValueError(f"{flag} sirf needs SIRF's Python package sirf.STIR, which does not import here; run "
                         f"inside the SIRF Docker image (docker/README.md) or use {flag} embedded")


def backend_name(model: AcquisitionModel) -> str:
    """``"embedded"`` or ``"sirf"``: the backend of an acquisition model."""
    if isinstance(model, EmbeddedAcquisitionModel):
        return "embedded"
    if isinstance(model, SIRFAcquisitionModel):
        return "sirf"
    raise TypeError(f"unknown acquisition model backend {type(model).__name__}")


def make_acquisition_model(
    backend: str,
    sinogram_geometry: SinogramGeometry,
    image_geometry: ImageGeometry,
    *,
    num_subsets: int = 1,
    multiplicative: Array | None = None,
    additive: Array | None = None,
    psf_fwhm_mm: float | Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    num_tangential_LORs: int = 1,
    ray_tracing: str = "joseph",
) -> AcquisitionModel:
    """An acquisition model of ``backend`` for these geometries and terms.

    Args:
        backend: ``"embedded"`` (Joseph projector, CPU or CUDA) or ``"sirf"``
            (``sirf.STIR.AcquisitionModelUsingRayTracingMatrix``, the ray tracing the embedded
            projector reproduces; SIRF computes on the CPU and the results are moved to ``device``).
        sinogram_geometry, image_geometry: the scanner's sinogram and the image grid.
        num_subsets: OSEM subsets by view.
        multiplicative: S (normalisation x attenuation), (T,S,V,N), or None (1).
        additive: b (randoms + scatter, counts), (T,S,V,N), or None (0).
        psf_fwhm_mm: image-space Gaussian PSF FWHM (z, y, x) or scalar, mm; None for none.
        device: where tensors are computed (embedded) or returned (SIRF).
        num_tangential_LORs: rays per bin across its width (STIR's ray tracer; 1 by default,
            SIRF's own default is 2).
        ray_tracing: embedded only: "joseph" (default), "siddon" (STIR's matrix row for row; CPU)
            or "auto" (Siddon where it runs, else Joseph); see :class:`EmbeddedAcquisitionModel`.
    Raises:
        ValueError: unknown backend; ImportError: ``"sirf"`` without ``sirf.STIR``.
    """
    if backend == "embedded":
        return EmbeddedAcquisitionModel(
            sinogram_geometry, image_geometry, num_subsets=num_subsets, multiplicative=multiplicative,
            additive=additive, psf_fwhm_mm=psf_fwhm_mm, device=device, num_tangential_LORs=num_tangential_LORs,
            ray_tracing=ray_tracing)
    if backend == "sirf":
        return SIRFAcquisitionModel.from_geometry(
            sinogram_geometry, image_geometry, num_subsets=num_subsets, multiplicative=multiplicative,
            additive=additive, psf_fwhm_mm=psf_fwhm_mm, device=device, num_tangential_LORs=num_tangential_LORs)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
