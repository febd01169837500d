"""Reconstruction: the one loop (engine), OSEM, MLEM, the Poisson log-likelihood, FOV masks."""
from .engine import (EMUpdate, FBSEMUpdate, IterativeReconstruction, fov_mask, reconstruct,
                     start_image)
from .osem import OSEM, mlem, osem, poisson_log_likelihood

__all__ = ["OSEM", "osem", "mlem", "poisson_log_likelihood", "fov_mask", "start_image", "reconstruct",
           "IterativeReconstruction", "EMUpdate", "FBSEMUpdate"]
