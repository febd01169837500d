"""Acquisition models (embedded torch/numba projector, SIRF) behind one contract."""
from .base import AcquisitionModel, adjoint_mismatch

__all__ = ["AcquisitionModel", "adjoint_mismatch"]
