"""FBSEM-Net: unrolled MAP-EM with a learned regulariser (Corda-D'Incan, Schnabel, Reader, TRPMS 2022).

Stage ``k`` (subset ``s = k mod num_subsets``) maps the image ``x`` to::

    x_em   = x / sens_s * A_s^T( y_s / (A_s x + b_s) )                      (OSEM sub-update)
    x_reg  = CNN_k(x)                                                        (residual CNN, >= 0)
    x_next = 2 x_em / ( (1 - beta_k x_reg / sens_s)
                        + sqrt( (1 - beta_k x_reg / sens_s)^2 + 4 beta_k x_em / sens_s ) )

``x_next`` is, voxel by voxel, the maximiser over ``x > 0`` of the separable MAP-EM
surrogate (EM surrogate of the Poisson log-likelihood plus a quadratic pull towards
the CNN output)::

    Q(x) = sens_s (x_em log x - x) - beta_k / 2 (x - x_reg)^2

whose stationarity condition ``beta x^2 + (sens - beta x_reg) x - sens x_em = 0`` has
the positive root above. With ``beta_k = 0`` the stage is exactly the OSEM update.

=========  ====================  ==============================================
symbol     variable              meaning (shape)
=========  ====================  ==============================================
x          ``x``                 stage input image (B, Z, Y, X), activity units
y_s        ``prompts``           measured counts of subset s (B, T, S, V_s, N)
A_s        ``model``             linear acquisition model of subset s (S G P)
b_s        ``model.additive``    randoms + scatter, counts (B, T, S, V_s, N)
sens_s     ``sensitivity``       subset sensitivity A_s^T 1 (B, Z, Y, X)
x_em       ``x_em``              OSEM sub-update of x (B, Z, Y, X)
x_reg      ``x_reg``             CNN output (B, Z, Y, X), >= 0
beta_k     ``stage.beta``        regularisation strength, >= 0 (softplus of a free parameter)
=========  ====================  ==============================================

Units of beta (``beta_units``): with ``"normalised"`` (default) the learned value
``softplus(rho_k)`` is multiplied per sample by ``mean_FOV(sens_s) / mean_FOV(x)``, the
natural scale of ``sens / x``; the stage is then positively homogeneous (scaling the
activity and the prompts and the additive term by ``a`` scales every output by ``a``)
and one trained network serves data of any count level. ``"absolute"`` uses
``beta_k = softplus(rho_k)`` as is, in units of sensitivity / activity.

Count level (``beta_counts``): with ``"none"`` beta_k is one number per stage, so a network
weighs its CNN proposal against the data alike at every count level, although the data's
noise, and so the best balance, changes with it (a network trained across 1e6-3e8 counts
compromises). With ``"log_linear"`` (default of new networks) each stage also learns a slope
``gamma_k`` (``stage.count_slope``, initially 0: the same strength at every level)::

    beta_k = softplus( rho_k - gamma_k * l ),    l = clip( ln(N_hat / N_ref), -20, 20 )

where ``N_hat`` is the count level the prompts' noise gives (counts in the whole acquisition,
``num_subsets`` times the subset's; invariant under ``y, b -> a y, a b``, so the network stays
scale-equivariant; :func:`~sirf_fbsem.recon.count_level.estimated_counts`) and ``N_ref``
(``beta_count_reference``, 1e7 counts) the level at which ``beta_k = softplus(rho_k)``.
``gamma_k > 0`` regularises less at higher counts.
The FOV is the set of voxels with ``sens_s > 0``; voxels outside it are 0.

The fusion is evaluated in two forms that never subtract nearly equal numbers
(``a = beta / sens``, ``b = 1 - a x_reg``, ``r = sqrt(b^2 + 4 a x_em)``)::

    b >  0:  x_next = 2 x_em / (b + r)
    b <= 0:  x_next = (r - b) / (2 a)          (then a x_reg >= 1, so a > 0)

which are the same root (multiply numerator and denominator by ``r - b``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..autograd import em_update
from ..projectors.base import AcquisitionModel
from ..recon.count_level import COUNT_REFERENCE, estimated_counts, log_count_level
from ..recon.engine import count_matched_scale
from .blockwise import Region, check_block_shape, grown_region
from .regularisers import RegulariserConfig, ResidualCNN, build_regulariser, intensity_scale

__all__ = ["fbsem_fusion", "FBSEMStage", "FBSEMNet", "StageTerms", "inverse_softplus", "BETA_COUNTS"]

BetaUnits = Literal["normalised", "absolute"]
BetaCounts = Literal["none", "log_linear"]
#: count-level rules of the stages' strengths (module docstring)
BETA_COUNTS = ("none", "log_linear")
StartRule = Literal["count_matched", "none"]
#: start rules of :class:`FBSEMNet`
START_RULES = ("count_matched", "none")


def inverse_softplus(beta: float) -> float:
    """``rho`` with ``softplus(rho) = beta``; ``beta = 0`` gives ``-inf`` (beta stays 0)."""
    if beta < 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta == 0:
        return -math.inf
    if beta > 20:
        return beta + math.log(-math.expm1(-beta))
    return math.log(math.expm1(beta))


def fbsem_fusion(
    x_em: torch.Tensor, x_reg: torch.Tensor, sensitivity: torch.Tensor, beta: torch.Tensor | float
) -> torch.Tensor:
    """Closed-form MAP-EM fusion (positive root), numerically stable, 0 where ``sensitivity == 0``.

    Args:
        x_em: EM update, >= 0, (B, Z, Y, X) (any broadcastable shapes).
        x_reg: regulariser output, >= 0.
        sensitivity: subset sensitivity, >= 0.
        beta: strength >= 0, scalar or broadcastable tensor (e.g. (B, 1, 1, 1)).
    Returns:
        ``argmax_x sens (x_em log x - x) - beta/2 (x - x_reg)^2`` per voxel; finite values
        and finite gradients everywhere, including zero-sensitivity voxels and beta = 0.
    """
    beta = torch.as_tensor(beta, dtype=x_em.dtype, device=x_em.device)
    has_sens = sensitivity > 0
    sens = torch.where(has_sens, sensitivity, torch.ones_like(sensitivity))
    a = beta / sens
    b = 1 - a * x_reg
    # clamp: the root's gradient stays finite where b = 0 and x_em = 0 (a null set)
    r = torch.sqrt((b * b + 4 * a * x_em).clamp_min(torch.finfo(x_em.dtype).tiny))
    pos = b > 0
    one = torch.ones_like(b)
    x_pos = 2 * x_em / torch.where(pos, b + r, one)
    x_neg = (r - b) / (2 * torch.where(pos, one, a))
    out = torch.where(pos, x_pos, x_neg)
    return torch.where(has_sens, out, torch.zeros_like(out))


@dataclass
class StageTerms:
    """What a stage's output depends on besides its own parameters (B samples; symbols as in the
    module docstring's table)::

        x_next[R] = fusion( x_em[R], c * relu(x/c + f(x/c, u/c_u))[R], sens_s[R], beta(l) * unit )

    For a stage trained alone on a detached input ``x`` (sequential training) none of these
    depends on the stage's parameters: they are computed once per sample, and the output on a
    region ``R`` needs only their crops (``x`` and ``u`` grown by the CNN's receptive-field
    radius) and the per-sample scalars (:meth:`FBSEMStage.output_on`).

    Attributes:
        x: stage input (B, Z, Y, X), activity units.
        x_em: OSEM sub-update of ``x`` (B, Z, Y, X), activity units.
        sensitivity: ``sens_s = A_s^T 1`` (B, Z, Y, X); the FOV is ``sens_s > 0``.
        scale: ``c = mean_FOV(x)`` (B,), the CNN's intensity scale (1 with normalisation "none").
        unit: beta's per-sample unit (B,): ``mean_FOV(sens_s) / mean_FOV(x)`` ("normalised") or 1 ("absolute").
        anatomical: ``u`` (B, Z, Y, X) or None.
        anatomical_scale: ``c_u = mean_FOV(|u|)`` (B,) or None.
        log_counts: ``l = ln(N_hat / N_ref)`` (B,), the count level of the data (module docstring),
            for stages with ``beta_counts = "log_linear"``; None for the others.
    """

    x: torch.Tensor
    x_em: torch.Tensor
    sensitivity: torch.Tensor
    scale: torch.Tensor
    unit: torch.Tensor
    anatomical: torch.Tensor | None = None
    anatomical_scale: torch.Tensor | None = None
    log_counts: torch.Tensor | None = None

    def _map(self, fn: Any) -> "StageTerms":
        return StageTerms(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                             for f in fields(self)})

    def to(self, device: str | torch.device) -> "StageTerms":
        """A copy on ``device``."""
        return self._map(lambda t: t.to(device))

    def select(self, i: int) -> "StageTerms":
        """Sample ``i`` as a batch of one."""
        return self._map(lambda t: t[i : i + 1])

    def detach(self) -> "StageTerms":
        return self._map(lambda t: t.detach())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X)."""
        z, y, x = self.x.shape[-3:]
        return (int(z), int(y), int(x))

    def fov_box(self) -> Region:
        """Bounding box (z, y, x slices) of the voxels with ``sens_s > 0`` in any sample (the whole
        volume if there are none)."""
        fov = (self.sensitivity > 0).reshape((-1,) + self.image_shape).any(dim=0)
        if not bool(fov.any()):
            return (slice(0, self.image_shape[0]), slice(0, self.image_shape[1]), slice(0, self.image_shape[2]))
        box = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = torch.nonzero(fov.any(dim=other)).flatten()
            box.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return (box[0], box[1], box[2])


class FBSEMStage(nn.Module):
    """One FBSEM stage on subset s (symbols as in the module docstring's table)::

        x_em   = x / sens_s * A_s^T( y_s / (A_s x + b_s) )
        x_reg  = CNN(x)
        x_next = 2 x_em / ( (1 - beta x_reg / sens_s) + sqrt((1 - beta x_reg / sens_s)^2 + 4 beta x_em / sens_s) )

    ``beta = softplus(rho - gamma l)`` (``gamma = 0`` with ``beta_counts = "none"``; ``l`` the data's
    count level), times the per-sample unit of ``beta_units``; 0 outside the FOV.

    Args:
        regulariser: module ``(x (B,Z,Y,X), anatomical, mask) -> x_reg (B,Z,Y,X)``.
        beta_init: initial strength (in ``beta_units``); 0 gives a stage fixed at plain OSEM.
        beta_units: ``"normalised"`` or ``"absolute"`` (module docstring).
        beta_counts: ``"none"`` or ``"log_linear"`` (module docstring); the latter adds the
            parameter ``count_slope`` (gamma, initially 0).
        beta_count_reference: ``N_ref``, counts (module docstring).
    """

    def __init__(self, regulariser: nn.Module, beta_init: float = 0.1, beta_units: BetaUnits = "normalised",
                 beta_counts: BetaCounts = "none", beta_count_reference: float = COUNT_REFERENCE):
        super().__init__()
        if beta_units not in ("normalised", "absolute"):
            raise ValueError(f"beta_units must be 'normalised' or 'absolute', got {beta_units!r}")
        if beta_counts not in BETA_COUNTS:
            raise ValueError(f"beta_counts must be one of {BETA_COUNTS}, got {beta_counts!r}")
        if not (math.isfinite(beta_count_reference) and beta_count_reference > 0):
            raise ValueError(f"beta_count_reference must be a finite number of counts > 0, got {beta_count_reference!r}")
        self.regulariser = regulariser
        self.beta_units = beta_units
        self.beta_count_reference = float(beta_count_reference)
        self.rho = nn.Parameter(torch.tensor(inverse_softplus(float(beta_init)), dtype=torch.float32))
        self.count_slope: nn.Parameter | None = (
            nn.Parameter(torch.zeros((), dtype=torch.float32)) if beta_counts == "log_linear" else None)

    @property
    def beta(self) -> torch.Tensor:
        """Learned strength at the reference count level, ``softplus(rho)`` (before the per-sample
        unit of ``beta_units``)."""
        return F.softplus(self.rho)

    def strength(self, log_counts: torch.Tensor | None) -> torch.Tensor:
        """``beta(l) = softplus(rho - gamma l)`` per sample (B,) for the count levels ``l`` (B,)
        (:attr:`StageTerms.log_counts`), before the unit of ``beta_units``; a count-unaware stage
        gives ``softplus(rho)`` (a scalar) and ignores ``l``."""
        if self.count_slope is None:
            return self.beta
        if log_counts is None:
            raise ValueError("this stage's strength depends on the data's count level (beta_counts='log_linear'); "
                             "no count level was given")
        return F.softplus(self.rho - self.count_slope * log_counts.to(self.rho.dtype))

    def log_counts(self, prompts: torch.Tensor, model: AcquisitionModel, subset: int) -> torch.Tensor | None:
        """``l`` (B,) of the subset's prompts (B,T,S,V_s,N) for a count-aware stage (module docstring),
        None for the others: ``N_hat`` is the subset's estimate times ``model.num_subsets``."""
        if self.count_slope is None:
            return None
        with torch.no_grad():
            counts = estimated_counts(prompts.detach(), model.additive_term(subset),
                                      model.support_projection(subset)) * model.num_subsets
            return log_count_level(counts.to(torch.float64), self.beta_count_reference)

    def forward(
        self,
        x: torch.Tensor,
        prompts: torch.Tensor,
        model: AcquisitionModel,
        subset: int,
        sensitivity: torch.Tensor | None = None,
        anatomical: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (B,Z,Y,X) -> ``x_next`` (B,Z,Y,X); ``prompts`` are subset ``subset``'s counts (B,T,S,V_s,N).

        ``sensitivity`` (B,Z,Y,X) or (Z,Y,X) is ``A_s^T 1`` for this subset; computed by
        the model when None.
        """
        sens, x_em, fov, unit = self._data_terms(x, prompts, model, subset, sensitivity)
        x_reg = self.regulariser(x, anatomical, fov)
        beta = self.strength(self.log_counts(prompts, model, subset)).to(dtype=x.dtype) * unit
        return fbsem_fusion(x_em, x_reg, sens, beta.reshape((-1,) + (1,) * (x.dim() - 1)))

    def _data_terms(
        self, x: torch.Tensor, prompts: torch.Tensor, model: AcquisitionModel, subset: int,
        sensitivity: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sens_s, x_em, fov, unit)``: the subset sensitivity broadcast to ``x``, the OSEM
        sub-update, the FOV (``sens_s > 0``) and beta's per-sample unit (B,) (``beta_units``)."""
        sens = model.sensitivity(subset) if sensitivity is None else sensitivity
        sens = torch.broadcast_to(sens.to(dtype=x.dtype, device=x.device), x.shape)
        x_em = em_update(x, prompts, model, subset, sens)
        fov = sens > 0
        if self.beta_units == "normalised":
            unit = intensity_scale(sens, fov) / intensity_scale(x, fov)  # (B,): mean sens / mean x
        else:
            unit = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return sens, x_em, fov, unit

    # ------------------------------------------------------------------ on a region
    def _cnn(self) -> ResidualCNN:
        if not isinstance(self.regulariser, ResidualCNN):
            raise TypeError(f"a stage's output on a region needs a ResidualCNN regulariser (its receptive field "
                            f"and scales); this stage has a {type(self.regulariser).__name__}")
        return self.regulariser

    def stage_terms(
        self,
        x: torch.Tensor,
        prompts: torch.Tensor,
        model: AcquisitionModel,
        subset: int,
        sensitivity: torch.Tensor | None = None,
        anatomical: torch.Tensor | None = None,
    ) -> StageTerms:
        """The :class:`StageTerms` of input ``x`` (B, Z, Y, X); arguments as in :meth:`forward`.

        Differentiable in ``x`` (call it under ``torch.no_grad()`` to precompute them).
        """
        cnn = self._cnn()
        sens, x_em, fov, unit = self._data_terms(x, prompts, model, subset, sensitivity)
        c, c_u = cnn.intensity_scales(x, anatomical, fov)
        u = None if anatomical is None else torch.broadcast_to(anatomical.to(dtype=x.dtype, device=x.device), x.shape)
        return StageTerms(x, x_em, sens, c, unit, u, c_u, self.log_counts(prompts, model, subset))

    def output_on(self, terms: StageTerms, region: Region | None = None) -> torch.Tensor:
        """``x_next[R]`` (B, z, y, x) from precomputed terms, for the region ``R`` (z, y, x slices with
        explicit start and stop; None: the whole volume)::

            x_next[R] = fusion( x_em[R], CNN(x[R ⊕ radius ∩ V]; c, c_u)[R], sens_s[R], beta(l) * unit )

        Equal (to rounding) to ``forward``'s output on ``R``: the CNN runs on ``x`` grown by its
        receptive-field radius and clipped to the volume, normalised by the whole volume's
        scales; the fusion is voxel-wise. Differentiable in the stage's parameters (and the terms).
        """
        cnn = self._cnn()
        shape = terms.image_shape
        if region is None:
            region = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        for sl, n in zip(region, shape):
            if sl.start is None or sl.stop is None or not 0 <= sl.start < sl.stop <= n or sl.step not in (None, 1):
                raise ValueError(f"region {region} is not a non-empty box inside the image {shape} (z, y, x)")
        outer, inner = grown_region(region, cnn.receptive_radius, shape)
        anat = None if terms.anatomical is None else terms.anatomical[(Ellipsis, *outer)]
        x_reg = cnn.apply_scaled(terms.x[(Ellipsis, *outer)], anat, terms.scale, terms.anatomical_scale, inner)
        beta = self.strength(terms.log_counts).to(dtype=terms.x.dtype) * terms.unit
        at = (Ellipsis, *region)
        return fbsem_fusion(terms.x_em[at], x_reg, terms.sensitivity[at], beta.reshape((-1, 1, 1, 1)))


class FBSEMNet(nn.Module):
    """K unrolled FBSEM stages; stage k uses subset ``k mod num_subsets`` (the OSEM order).

    A pure ``nn.Module``: the acquisition model and the data are arguments of
    :meth:`forward`, so ``net.to(device)`` moves only the learned parameters.

    Args:
        num_stages: K.
        num_subsets: OSEM subsets; the acquisition model passed to ``forward`` must have as many.
        regulariser_config: :class:`RegulariserConfig` or its dict.
        shared_regulariser: one CNN for all stages (True) or one per stage (False,
            "iteration-dependent"). Each stage always has its own beta.
        beta_init: initial beta of every stage (``beta_units``).
        beta_units: ``"normalised"`` or ``"absolute"`` (module docstring).
        beta_counts: ``"log_linear"`` (every stage's strength depends on the data's count level)
            or ``"none"`` (networks saved before 0.9; module docstring).
        beta_count_reference: ``N_ref`` in counts (module docstring).
        start_rule: ``"count_matched"``: stage 0 first rescales its input ``x0`` to
            ``s x0`` with ``s`` = :func:`~sirf_fbsem.recon.engine.count_matched_scale` on subset 0
            (the measured counts less the additive term over ``x0``'s expected counts), which
            makes the network scale-equivariant: prompts and additive term ``a`` times larger
            give an image ``a`` times larger. ``"none"``: ``x0`` as given (networks saved before
            0.4, trained on targets from a start image of 1). The training targets must come
            from the same rule (:func:`sirf_fbsem.simulation.targets.osem_targets`).
    """

    def __init__(
        self,
        num_stages: int,
        num_subsets: int,
        regulariser_config: RegulariserConfig | Mapping[str, Any] | None = None,
        shared_regulariser: bool = False,
        beta_init: float = 0.1,
        beta_units: BetaUnits = "normalised",
        start_rule: StartRule = "count_matched",
        beta_counts: BetaCounts = "log_linear",
        beta_count_reference: float = COUNT_REFERENCE,
    ):
        super().__init__()
        if start_rule not in START_RULES:
            raise ValueError(f"start_rule must be one of {START_RULES}, got {start_rule!r}")
        if not (isinstance(num_stages, int) and num_stages >= 1):
            raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
        if not (isinstance(num_subsets, int) and num_subsets >= 1):
            raise ValueError(f"num_subsets must be a positive integer, got {num_subsets!r}")
        if regulariser_config is None:
            regulariser_config = RegulariserConfig()
        elif not isinstance(regulariser_config, RegulariserConfig):
            regulariser_config = RegulariserConfig.from_dict(regulariser_config)
        self.num_stages = num_stages
        self.num_subsets = num_subsets
        self.regulariser_config = regulariser_config
        self.shared_regulariser = bool(shared_regulariser)
        self.beta_init = float(beta_init)
        self.beta_units = beta_units
        self.start_rule: StartRule = start_rule
        self.beta_counts: BetaCounts = beta_counts
        self.beta_count_reference = float(beta_count_reference)
        shared = build_regulariser(regulariser_config) if shared_regulariser else None
        self.stages = nn.ModuleList(
            FBSEMStage(shared if shared is not None else build_regulariser(regulariser_config), beta_init, beta_units,
                       beta_counts, beta_count_reference)
            for _ in range(num_stages)
        )

    # ------------------------------------------------------------------ config
    def config(self) -> dict[str, Any]:
        """Plain-JSON constructor arguments (inverse: :meth:`from_config`)."""
        return {
            "num_stages": self.num_stages,
            "num_subsets": self.num_subsets,
            "regulariser_config": self.regulariser_config.to_dict(),
            "shared_regulariser": self.shared_regulariser,
            "beta_init": self.beta_init,
            "beta_units": self.beta_units,
            "start_rule": self.start_rule,
            "beta_counts": self.beta_counts,
            "beta_count_reference": self.beta_count_reference,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FBSEMNet":
        """Inverse of :meth:`config`; a config without ``start_rule`` (saved before 0.4) gets ``"none"``,
        one without ``beta_counts`` (saved before 0.9) gets ``"none"``."""
        known = {"num_stages", "num_subsets", "regulariser_config", "shared_regulariser", "beta_init", "beta_units",
                 "start_rule", "beta_counts", "beta_count_reference"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown FBSEMNet config keys {unknown}; known keys are {sorted(known)}")
        return cls(**{"start_rule": "none", "beta_counts": "none", **dict(config)})

    @property
    def uses_anatomical(self) -> bool:
        return self.regulariser_config.uses_anatomical

    def subset_of_stage(self, k: int) -> int:
        return k % self.num_subsets

    @property
    def block_shape(self) -> tuple[int, int, int] | None:
        """Blocks (z, y, x voxels) the stages' CNNs run on (:meth:`set_block_shape`); None: whole volumes."""
        shapes = {st.regulariser.block_shape for st in self.stages if isinstance(st.regulariser, ResidualCNN)}
        return shapes.pop() if len(shapes) == 1 else None

    def set_block_shape(self, block_shape: Sequence[int] | None) -> None:
        """Run every stage's CNN block by block, blocks of ``block_shape`` (z, y, x) voxels, under gradient
        checkpointing (:mod:`~sirf_fbsem.model.blockwise`); None: on the whole volume (default).

        A runtime setting, for training and inference alike: memory of the CNN bounded by a block,
        same outputs (to rounding); not part of :meth:`config` nor of a model file.
        """
        shape = check_block_shape(block_shape)
        for st in self.stages:
            if isinstance(st.regulariser, ResidualCNN):
                st.regulariser.block_shape = shape

    @property
    def betas(self) -> torch.Tensor:
        """softplus(rho_k) of every stage (the strength at the reference count level), shape (K,)."""
        return torch.stack([st.beta for st in self.stages])

    @property
    def count_slopes(self) -> torch.Tensor:
        """gamma_k of every stage, shape (K,) (zeros for ``beta_counts = "none"``)."""
        return torch.stack([st.count_slope if st.count_slope is not None else torch.zeros((), device=st.rho.device)
                            for st in self.stages])

    def betas_at(self, counts: float) -> torch.Tensor:
        """Every stage's strength (before the unit of ``beta_units``) at ``counts`` counts, shape (K,)."""
        level = log_count_level(torch.tensor([float(counts)], dtype=torch.float64), self.beta_count_reference)
        return torch.stack([st.strength(level.to(st.rho.device)).reshape(()) for st in self.stages])

    # ------------------------------------------------------------------ forward
    def scaled_start(
        self, x0: torch.Tensor, prompts_0: torch.Tensor, model: AcquisitionModel, sensitivity_0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stage 0's input under :attr:`start_rule`: ``s x0`` (``"count_matched"``) or ``x0``.

        Args:
            x0: start image (B, Z, Y, X).
            prompts_0: subset 0's measured counts (B, T, S, V_0, N).
            model: the acquisition model (its additive term and, when ``sensitivity_0`` is None,
                its subset-0 sensitivity are used).
            sensitivity_0: ``A_0^T 1``, broadcastable to ``x0``, or None.
        """
        if self.start_rule == "none":
            return x0
        if prompts_0.dim() == 5 and x0.shape[0] != prompts_0.shape[0]:
            x0 = x0.expand((prompts_0.shape[0],) + tuple(x0.shape[1:]))
        sens = model.sensitivity(0) if sensitivity_0 is None else sensitivity_0
        s = count_matched_scale(x0.detach(), prompts_0, model.additive_term(0), sens.detach())
        return x0 * s.reshape((-1,) + (1,) * (x0.dim() - 1))

    def run_stage(
        self,
        k: int,
        x: torch.Tensor,
        prompts_s: torch.Tensor,
        model: AcquisitionModel,
        sensitivity_s: torch.Tensor | None = None,
        anatomical: torch.Tensor | None = None,
        checkpointing: bool = False,
    ) -> torch.Tensor:
        """Stage ``k`` on ``x`` (B, Z, Y, X) with its subset's counts ``prompts_s`` (B, T, S, V_s, N);
        stage 0 first applies the start rule (:meth:`scaled_start`)."""
        s = self.subset_of_stage(k)
        if k == 0:
            x = self.scaled_start(x, prompts_s, model, sensitivity_s)
        stage = self.stages[k]
        if checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, prompts_s, model, s, sensitivity_s, anatomical, use_reentrant=False)
        return stage(x, prompts_s, model, s, sensitivity_s, anatomical)

    def stage_terms(
        self,
        k: int,
        x: torch.Tensor,
        prompts: torch.Tensor,
        model: AcquisitionModel,
        sensitivities: torch.Tensor | None = None,
        anatomical: torch.Tensor | None = None,
    ) -> StageTerms:
        """:meth:`FBSEMStage.stage_terms` of stage ``k`` on its input ``x`` (B, Z, Y, X), as :meth:`forward`
        runs it (stage 0 after the start rule); ``prompts`` the full sinogram (B, T, S, V, N) and
        ``sensitivities`` (B, num_subsets, Z, Y, X) as in :meth:`forward`."""
        if not 0 <= k < self.num_stages:
            raise ValueError(f"stage index {k} out of range [0, {self.num_stages - 1}]")
        s = self.subset_of_stage(k)
        prompts_s = model.take_subset(prompts, s)
        sens = None if sensitivities is None else sensitivities[..., s, :, :, :]
        if k == 0:
            x = self.scaled_start(x, prompts_s, model, sens)
        return self.stages[k].stage_terms(x, prompts_s, model, s, sens, anatomical)

    def forward(
        self,
        x0: torch.Tensor,
        prompts: torch.Tensor,
        model: AcquisitionModel,
        sensitivities: torch.Tensor | None = None,
        anatomical: torch.Tensor | None = None,
        return_all: bool = False,
        stages: Sequence[int] | None = None,
        checkpointing: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run stages on ``x0``.

        Args:
            x0: start image (B, Z, Y, X) or (Z, Y, X) (broadcast over a batch of prompts).
            prompts: full measured sinogram (B, T, S, V, N) or (T, S, V, N), counts.
            model: acquisition model with ``num_subsets == self.num_subsets`` (its
                factors and additive term may be per sample, (B, T, S, V, N)).
            sensitivities: subset sensitivities (B, num_subsets, Z, Y, X) or
                (num_subsets, Z, Y, X); computed by the model when None.
            anatomical: (B, Z, Y, X) or (Z, Y, X); required iff the regulariser has 2 channels.
            return_all: return the list of every stage's output instead of the last.
            stages: stage indices to run, in order (default ``range(num_stages)``); e.g.
                ``[k]`` applies stage k alone to a cached input.
            checkpointing: wrap every stage in ``torch.utils.checkpoint`` (recompute in backward).
        Returns:
            the last output (same batching as ``x0``), or the list of all outputs.
        """
        if model.num_subsets != self.num_subsets:
            raise ValueError(
                f"the acquisition model has {model.num_subsets} subsets; this network was built for "
                f"{self.num_subsets} (use model.with_num_subsets({self.num_subsets}))"
            )
        if self.uses_anatomical and anatomical is None:
            raise ValueError("this network's regulariser takes an anatomical image (in_channels=2); none given")
        single = x0.dim() == 3 and prompts.dim() == 4
        x = x0.unsqueeze(0) if single else x0
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(model.image_shape):
            raise ValueError(
                f"x0 has shape {tuple(x0.shape)}; expected (B,)+{tuple(model.image_shape)} (Z,Y,X) for this model"
            )
        if anatomical is not None and not self.uses_anatomical:
            raise ValueError("an anatomical image was given but this network's regulariser is PET-only")
        order = list(range(self.num_stages)) if stages is None else [int(k) for k in stages]
        for k in order:
            if not 0 <= k < self.num_stages:
                raise ValueError(f"stage index {k} out of range [0, {self.num_stages - 1}]")
        if sensitivities is not None:
            if tuple(sensitivities.shape[-3:]) != tuple(model.image_shape) or sensitivities.shape[-4] != self.num_subsets:
                raise ValueError(
                    f"sensitivities have shape {tuple(sensitivities.shape)}; expected "
                    f"(B, {self.num_subsets}, *{tuple(model.image_shape)}) or ({self.num_subsets}, Z, Y, X)"
                )
        subset_prompts: dict[int, torch.Tensor] = {}
        outputs: list[torch.Tensor] = []
        for k in order:
            s = self.subset_of_stage(k)
            if s not in subset_prompts:
                subset_prompts[s] = model.take_subset(prompts, s)
            sens = None if sensitivities is None else sensitivities[..., s, :, :, :]
            x = self.run_stage(k, x, subset_prompts[s], model, sens, anatomical, checkpointing)
            if return_all:
                outputs.append(x[0] if single else x)
        if return_all:
            return outputs
        return x[0] if single else x
