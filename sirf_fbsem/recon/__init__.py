"""Classical reconstruction: OSEM, MLEM, the Poisson log-likelihood, FOV masks."""
from .osem import OSEM, fov_mask, mlem, osem, poisson_log_likelihood

__all__ = ["OSEM", "osem", "mlem", "poisson_log_likelihood", "fov_mask"]
