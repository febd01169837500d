"""Acquisition models (embedded torch/numba projector, SIRF) behind one contract."""
from .base import AcquisitionModel, adjoint_mismatch
from .embedded import EmbeddedAcquisitionModel
from .sirf import SIRFAcquisitionModel  # imports sirf.STIR lazily, on first use

__all__ = ["AcquisitionModel", "adjoint_mismatch", "EmbeddedAcquisitionModel", "SIRFAcquisitionModel"]
