"""SIRF-style reconstructors: ``OSEMReconstructor`` and ``FBSEMReconstructor``.

Both mirror ``sirf.STIR.OSMAPOSLReconstructor`` (set_objective_function, set_up,
set_current_estimate, process, get_output, ...), so a SIRF script becomes FBSEM by
changing the class and loading a model::

    recon = FBSEMReconstructor('model.pt')      # instead of pet.OSMAPOSLReconstructor()
    recon.set_objective_function(obj)
    recon.set_up(image); recon.set_current_estimate(image); recon.process()
    out = recon.get_output()

One sub-iteration ``k`` (0-based) on subset ``s``:

* OSEM: ``x <- x * clamp( A_s^T(y_s / (A_s x + b_s)) / sens_s, min_rel, max_rel )``,
  ``s = k mod num_subsets`` (STIR's order; see :meth:`set_current_subset_num`).
* FBSEM: ``x <- stage_k(x)`` (OSEM sub-update, CNN, MAP-EM fusion; see
  :mod:`sirf_fbsem.model.fbsem`), ``s = k mod num_subsets`` of the model.

Backends (decided in one place, :func:`_build_backend`): when the objective function
is a real ``sirf.STIR`` object, projections run in SIRF
(:class:`~sirf_fbsem.projectors.sirf.SIRFAcquisitionModel`), images are
``sirf.STIR.ImageData`` and misuse raises ``sirf.Utilities.error``; otherwise the
embedded projector runs with :mod:`sirf_fbsem.stir`'s objects and
:class:`sirf_fbsem.stir.error`. SIRF's objective function does not give back its
acquisition data or model, so with SIRF objects also call ``set_input(acq_data)``
and ``set_acquisition_model(acq_model)``.

Counter: as in STIR, :meth:`get_subiteration_num` is the number of the *next*
sub-iteration, 1 after ``set_up``; :meth:`process` runs sub-iterations
1..num_subiterations (restarting the count) on the current estimate.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import facade
from .geometry import ImageGeometry, Scanner, SinogramGeometry, geometry_mismatch
from .model.blockwise import check_block_shape
from .model.fbsem import FBSEMNet
from .model.io import load_model
from .projectors import sirf as sirf_projector
from .projectors.base import AcquisitionModel
from .recon.engine import EMUpdate, FBSEMUpdate, IterativeReconstruction, UpdateRule, reconstruct, start_image

__all__ = ["OSEMReconstructor", "FBSEMReconstructor", "reconstruct_acquisition"]


# ----------------------------------------------------------------------------- backend decision
def _is_sirf_object(obj: Any) -> bool:
    """True for objects of the real SIRF package (module ``sirf`` or ``sirf.*``; not ``sirf_fbsem``)."""
    module = type(obj).__module__ or ""
    return module == "sirf" or module.startswith("sirf.")


_SIRF_NOT_READY: dict[type, type] = {}


def _error_classes(sirf: bool) -> tuple[type[Exception], type[Exception]]:
    """(error, not-ready error) of a backend; the not-ready one is also an AssertionError, as SIRF asserts."""
    if not sirf:
        return facade.error, facade.NotReadyError
    from sirf.Utilities import error as sirf_error

    if sirf_error not in _SIRF_NOT_READY:
        _SIRF_NOT_READY[sirf_error] = type("NotReadyError", (sirf_error, AssertionError), {})
    return sirf_error, _SIRF_NOT_READY[sirf_error]


def _image_class(sirf: bool) -> type:
    if not sirf:
        return facade.ImageData
    import sirf.STIR

    return sirf.STIR.ImageData


def _acquisition_class(sirf: bool) -> type:
    if not sirf:
        return facade.AcquisitionData
    import sirf.STIR

    return sirf.STIR.AcquisitionData


@dataclass
class _Backend:
    """What a reconstructor computes with, built from the objects a script passed."""

    sirf: bool
    model: AcquisitionModel  # torch contract, num_subsets set
    prompts: torch.Tensor  # (T,S,V,N) counts
    sinogram_geometry: SinogramGeometry | None
    image_geometry: ImageGeometry | None
    scanner: Scanner | None


def _build_backend(objective: Any, input_data: Any, acq_model: Any, image: Any, num_subsets: int,
                   device: torch.device) -> _Backend:
    """The one place that decides between the SIRF and the embedded backend."""
    sirf = _is_sirf_object(objective)
    err, _ = _error_classes(sirf)
    if sirf:
        if input_data is None or acq_model is None:
            raise err(
                "sirf.STIR's objective function does not give back its acquisition data and acquisition model; "
                "call recon.set_input(acq_data) and recon.set_acquisition_model(acq_model) before set_up()"
            )
        try:
            model = sirf_projector.SIRFAcquisitionModel.from_acquisition_model(
                acq_model, input_data, image, num_subsets)
            prompts = sirf_projector.from_sirf(input_data)
        except (ValueError, TypeError) as e:
            raise err(f"cannot use the SIRF acquisition model and data: {e}") from e
        try:  # geometries for the FBSEM model check and for writing estimates; None if SIRF hides them
            sino = sirf_projector.sinogram_geometry_from_sirf(input_data)
            img = sirf_projector.image_geometry_from_sirf(image)
        except (ValueError, OSError):
            sino = img = None
        return _Backend(True, model, prompts, sino, img, None if sino is None else sino.scanner)
    data = input_data if input_data is not None else objective.get_acquisition_data()
    am = acq_model if acq_model is not None else objective.get_acquisition_model()
    if not isinstance(am, facade.AcquisitionModel) or not isinstance(data, facade.AcquisitionData):
        raise err("acquisition model and data must be sirf_fbsem.stir objects with a sirf_fbsem.stir objective")
    if am.acq_templ is None:
        raise err("the acquisition model is not set up (am.set_up(acq_templ, img_templ))")
    if data.shape != am.acq_templ.shape:
        raise err(f"acquisition data have shape {data.shape}; the acquisition model was set up for "
                  f"{am.acq_templ.shape}")
    if image.geometry != am.img_templ.geometry:
        raise err(f"image {image.geometry.describe()} differs from the acquisition model's image "
                  f"{am.img_templ.geometry.describe()}")
    model = am.get_backend_model(num_subsets, device)
    prompts = torch.from_numpy(data.as_array()).to(device)
    if (prompts < 0).any() or not torch.isfinite(prompts).all():
        raise err("acquisition data must be finite counts >= 0")
    return _Backend(False, model, prompts, data.geometry, image.geometry, data.geometry.scanner)


def _image_mismatch(a: ImageGeometry, b: ImageGeometry, tol_mm: float = 1e-3) -> str | None:
    """A description of how two image grids differ (None when they agree within ``tol_mm``)."""
    close = all(abs(u - v) <= tol_mm for u, v in zip(a.voxel_size_mm + a.origin_mm, b.voxel_size_mm + b.origin_mm))
    if tuple(a.shape) == tuple(b.shape) and close:
        return None
    return f"image: {a.describe()}, origin {a.origin_mm} vs {b.describe()}, origin {b.origin_mm}"


def _clamp_ratio(x: torch.Tensor, x_new: torch.Tensor, min_rel: float, max_rel: float) -> torch.Tensor:
    """``x * clamp(x_new / x, min_rel, max_rel)`` where ``x > 0`` (STIR's relative-change limits), else 0."""
    if min_rel <= 0 and math.isinf(max_rel):
        return x_new
    pos = x > 0
    ratio = torch.where(pos, x_new / torch.where(pos, x, torch.ones_like(x)), torch.zeros_like(x))
    ratio = ratio.clamp(min=min_rel, max=max_rel)
    return torch.where(pos, x * ratio, torch.zeros_like(x))


# ----------------------------------------------------------------------------- common machinery
class _IterativeReconstructor:
    """SIRF's IterativeReconstructor interface over the engine's loop (:mod:`sirf_fbsem.recon.engine`).

    Subclasses give the update rule (:meth:`_rule`); the loop, the start-image rule, the
    subset order and STIR's relative-change limits are the engine's.
    """

    _label = "reconstruction"

    def __init__(self) -> None:
        self._objective: Any = None
        self._input: Any = None
        self._acq_model: Any = None
        self._num_subsets: int | None = 1
        self._num_subiterations: int | None = 1
        self._subiteration = 1
        self._subset_offset = 0
        self._image: Any = None
        self._template: Any = None
        self._backend: _Backend | None = None
        self._loop: IterativeReconstruction | None = None
        self._save_interval = 1
        self._output_enabled = False  # SIRF disables output in the constructor
        self._prefix = "reconstructed_image"
        self._max_rel = math.inf
        self._min_rel = 0.0
        self._device = torch.device("cpu")
        self._progress = True

    # -------------------------------------------------------------- errors and types
    def _sirf_mode(self) -> bool:
        if self._objective is not None:
            return _is_sirf_object(self._objective)
        return self._image is not None and _is_sirf_object(self._image)

    def _error(self, message: str) -> Exception:
        return _error_classes(self._sirf_mode())[0](message)

    def _not_ready(self, message: str) -> Exception:
        return _error_classes(self._sirf_mode())[1](message)

    def _check_image(self, image: Any, what: str = "image") -> None:
        cls = _image_class(_is_sirf_object(image) if self._objective is None else self._sirf_mode())
        if not isinstance(image, cls):
            raise self._error(f"{what} must be a {cls.__module__}.{cls.__name__}, got "
                              f"{type(image).__module__}.{type(image).__name__}")

    def _invalidate(self) -> None:
        self._backend = None
        self._loop = None

    # -------------------------------------------------------------- configuration
    def set_objective_function(self, obj: Any) -> None:
        """The Poisson log-likelihood (``make_Poisson_loglikelihood``) of sirf.STIR or sirf_fbsem.stir."""
        if _is_sirf_object(obj):
            import sirf.STIR

            ok = isinstance(obj, sirf.STIR.ObjectiveFunction)
        else:
            ok = isinstance(obj, facade.PoissonLogLikelihoodWithLinearModelForMeanAndProjData)
        if not ok:
            raise _error_classes(_is_sirf_object(obj))[0](
                f"objective function must come from make_Poisson_loglikelihood, got {type(obj).__name__}")
        self._objective = obj
        self._invalidate()

    def get_objective_function(self) -> Any:
        return self._objective

    def set_input(self, input_data: Any) -> None:
        """The acquisition data to reconstruct (default: the objective function's)."""
        if not isinstance(input_data, _acquisition_class(_is_sirf_object(input_data))):
            raise self._error(f"input must be AcquisitionData, got {type(input_data).__name__}")
        self._input = input_data
        self._invalidate()

    def set_acquisition_model(self, acq_model: Any) -> None:
        """The acquisition model (default: the objective function's; needed with sirf.STIR objects)."""
        self._acq_model = acq_model
        self._invalidate()

    def set_num_subsets(self, n: int) -> None:
        if not isinstance(n, numbers.Integral) or n < 1:
            raise self._error(f"num_subsets must be an integer >= 1, got {n!r}")
        self._num_subsets = int(n)
        self._invalidate()

    def get_num_subsets(self) -> int:
        return int(self._num_subsets or 1)

    def set_num_subiterations(self, n: int) -> None:
        if not isinstance(n, numbers.Integral) or n < 1:
            raise self._error(f"num_subiterations must be an integer >= 1, got {n!r}")
        self._num_subiterations = int(n)

    def get_num_subiterations(self) -> int:
        return int(self._num_subiterations or 1)

    def set_device(self, device: str | torch.device) -> None:
        """Where the computation runs (``'cpu'``, ``'cuda'``, ``'cuda:1'``); the embedded projector follows it."""
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise self._error(f"device {device!r} requested but CUDA is not available")
        self._device = dev
        self._invalidate()

    def set_progress_bar(self, enabled: bool) -> None:
        """Show (default) or hide the tqdm progress bar of :meth:`process`."""
        self._progress = bool(enabled)

    def set_maximum_relative_change(self, value: float) -> None:
        """Upper limit of the multiplicative update factor per sub-iteration (STIR's OSMAPOSL)."""
        if not value > 0:
            raise self._error(f"maximum relative change must be > 0, got {value!r}")
        self._max_rel = float(value)

    def set_minimum_relative_change(self, value: float) -> None:
        """Lower limit of the multiplicative update factor per sub-iteration (STIR's OSMAPOSL)."""
        if not value >= 0:
            raise self._error(f"minimum relative change must be >= 0, got {value!r}")
        self._min_rel = float(value)

    # -------------------------------------------------------------- output files
    def set_save_interval(self, n: int) -> None:
        """Write the estimate every ``n`` sub-iterations and after the last; ``n <= 0`` disables output."""
        if not isinstance(n, numbers.Integral):
            raise self._error(f"save interval must be an integer, got {n!r}")
        if n > 0:
            self._save_interval = int(n)
            self.enable_output()
        else:
            self.disable_output()

    def set_output_filename_prefix(self, prefix: str | os.PathLike) -> None:
        """Files are ``<prefix>_<subiteration>.hv`` (Interfile), or NIfTI when the prefix ends in .nii/.nii.gz."""
        self._prefix = os.fspath(prefix)

    def disable_output(self) -> None:
        self._output_enabled = False

    def enable_output(self) -> None:
        self._output_enabled = True

    def _output_path(self, subiteration: int) -> Path:
        prefix = self._prefix
        for ext in (".nii.gz", ".nii"):
            if prefix.lower().endswith(ext):
                return Path(f"{prefix[: -len(ext)]}_{subiteration}{ext}")
        return Path(f"{prefix}_{subiteration}.hv")

    def _save(self, x: torch.Tensor, subiteration: int) -> None:
        b = self._require_backend()
        if b.image_geometry is None:
            raise self._error("cannot write estimates: the image geometry of the SIRF backend is unknown")
        image = facade.ImageData.from_array(x.detach().cpu().numpy(), b.image_geometry, b.scanner)
        try:
            image.write(self._output_path(subiteration))
        except facade.error as e:
            raise self._error(str(e.value)) from e

    # -------------------------------------------------------------- set-up and state
    def set_up(self, image: Any) -> None:
        """Prepare for reconstruction on ``image``'s grid (builds the projector; sub-iteration counter to 1)."""
        if self._objective is None:
            raise self._error("set_objective_function() must be called before set_up()")
        self._check_image(image, "set_up image")
        self._prepare()
        n = self.get_num_subsets()
        try:
            self._objective.set_num_subsets(n)  # as STIR's set_up does
            backend = _build_backend(self._objective, self._input, self._acq_model, image, n, self._device)
        except facade.error as e:
            raise self._error(str(e.value)) from e
        if self._output_enabled and self._save_interval > self.get_num_subiterations():
            raise self._error(f"save interval {self._save_interval} exceeds the number of sub-iterations "
                              f"{self.get_num_subiterations()} (STIR refuses this)")
        self._backend = backend
        self._check_backend(backend)
        self._loop = IterativeReconstruction(backend.model, backend.prompts, self._rule(),
                                             post_update=self._post_update)
        self._template = image
        self._subiteration = 1
        self._subset_offset = 0

    def _prepare(self) -> None:
        """Hook run before the backend is built."""

    def _check_backend(self, backend: _Backend) -> None:
        """Hook run after the backend is built."""

    def _require_backend(self) -> _Backend:
        if self._backend is None:
            raise self._not_ready("set_up(image) has not been called since the last configuration change")
        return self._backend

    def set_current_estimate(self, image: Any) -> None:
        """Start image for further sub-iterations; ``image`` is cloned."""
        self._check_image(image)
        self._image = image.clone()

    def get_current_estimate(self) -> Any:
        """A clone of the current estimate."""
        if self._image is None:
            raise self._not_ready("current estimate not set")
        return self._image.clone()

    def get_output(self) -> Any:
        """A clone of the reconstructed image."""
        if self._image is None:
            raise self._not_ready("current estimate not set. Did you run a reconstruction already?")
        return self._image.clone()

    def get_subiteration_num(self) -> int:
        """Number of the next sub-iteration (STIR: 1 after set_up)."""
        return self._subiteration

    def _next_subset(self) -> int:
        return (self._subiteration - 1 + self._subset_offset) % self.get_num_subsets()

    def set_current_subset_num(self, subset: int) -> None:
        """Use ``subset`` for the next sub-iteration; later ones follow in order (subset + 1, ...)."""
        n = self.get_num_subsets()
        if not isinstance(subset, numbers.Integral) or not 0 <= subset < n:
            raise self._error(f"subset must be an integer in [0, {n - 1}], got {subset!r}")
        self._subset_offset = (int(subset) - (self._subiteration - 1)) % n

    def get_subset_sensitivity(self) -> Any:
        """Sensitivity ``A_s^T 1`` of the subset the next sub-iteration uses, as an image."""
        b = self._require_backend()
        sens = b.model.sensitivity(self._next_subset())
        image = self._template.clone()
        image.fill(sens.detach().cpu().numpy().astype(np.float32))
        return image

    # -------------------------------------------------------------- iterations
    def _to_tensor(self, image: Any) -> torch.Tensor:
        b = self._require_backend()
        x = torch.from_numpy(np.asarray(image.as_array(), dtype=np.float32)).to(self._device)
        if tuple(x.shape) != tuple(b.model.image_shape):
            raise self._error(f"image has shape {tuple(x.shape)}; set_up() was for {tuple(b.model.image_shape)}")
        return x

    def _rule(self) -> UpdateRule:
        """The engine's update rule of this reconstructor (EM, FBSEM stage)."""
        raise NotImplementedError

    def _post_update(self, x_old: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        return _clamp_ratio(x_old, x_new, self._min_rel, self._max_rel)

    def _run(self, num: int, progress: bool) -> None:
        """``num`` sub-iterations of the engine on the current estimate, written back into it in place.

        Sub-iteration 1 starts from the current estimate under the engine's start-image rule
        (times STIR's cylindrical FOV mask); later calls continue from the estimate as it is.
        """
        self._require_backend()
        if self._image is None:
            raise self._not_ready("current estimate not set")
        loop = self._loop
        assert loop is not None  # built with the backend
        x = self._to_tensor(self._image)
        loop.x = start_image(loop.model, x) if self._subiteration == 1 else x.to(loop.model.device)
        loop.subiteration = self._subiteration - 1
        loop.subset_offset = self._subset_offset
        with tqdm(total=num, desc=self._label, unit="subiter", disable=not progress, leave=False) as bar:
            for _ in range(num):
                try:
                    x = loop.update()
                except ValueError as e:
                    raise self._error(str(e)) from e
                if self._output_enabled and (self._subiteration % self._save_interval == 0
                                             or self._subiteration == self.get_num_subiterations()):
                    self._save(x, self._subiteration)
                self._subiteration += 1
                bar.update(1)
        self._image.fill(x.detach().cpu().numpy().astype(np.float32))

    def update_current_estimate(self) -> None:
        """One sub-iteration on the current estimate."""
        self._run(1, progress=False)

    def update(self, image: Any) -> Any:
        """One sub-iteration applied to ``image`` in place (it becomes the current estimate); returns it."""
        self._check_image(image)
        self._image = image
        self.update_current_estimate()
        return image

    def process(self) -> None:
        """Sub-iterations 1 .. num_subiterations on the current estimate (STIR restarts the count)."""
        if self._image is None:
            raise self._not_ready("current estimate not set.")
        self._require_backend()
        self._subiteration = 1
        self._subset_offset = 0
        self._run(self.get_num_subiterations(), progress=self._progress)

    def reconstruct(self, image: Any) -> None:
        """Run :meth:`process` on ``image`` itself (updated in place; it becomes the current estimate)."""
        self._check_image(image)
        self._image = image
        self.process()


# ----------------------------------------------------------------------------- OSEM
class OSEMReconstructor(_IterativeReconstructor):
    """OSEM with SIRF's ``OSMAPOSLReconstructor`` interface (no prior), on the engine's loop.

    Differs from OSMAPOSL: the first sub-iteration starts from the current estimate times
    STIR's cylindrical FOV mask (the engine's start-image rule), so voxels outside the FOV
    stay 0; inside the FOV the images agree (tests/projectors/test_sirf_agreement.py).

    ``OSEMReconstructor(filename)``: STIR parameter files are not read; pass no argument.
    """

    _label = "OSEM"

    def __init__(self, filename: str = ""):
        super().__init__()
        if filename:
            raise facade.error(f"{type(self).__name__}({filename!r}): STIR parameter files are not supported; "
                               f"configure the object with its set_* methods")

    def _rule(self) -> UpdateRule:
        return EMUpdate()


# ----------------------------------------------------------------------------- FBSEM
class FBSEMReconstructor(_IterativeReconstructor):
    """FBSEM-Net with SIRF's ``OSMAPOSLReconstructor`` interface: one sub-iteration = one stage.

    Stage ``k`` (sub-iteration ``k + 1``) uses subset ``k mod num_subsets``, the
    model's number of subsets (another value is refused); ``num_subiterations``
    defaults to the model's number of stages and cannot exceed it. A model trained
    on another sinogram or image geometry is refused unless ``override_geometry``.
    Differs from OSMAPOSL: the first stage takes the current estimate times STIR's
    cylindrical FOV mask (0 outside), the start image the stages were trained from.

    Args:
        model: model file written by :func:`sirf_fbsem.model.io.save_model`, or an
            :class:`~sirf_fbsem.model.fbsem.FBSEMNet`; or None and :meth:`set_model` later.
        override_geometry: use a model trained on another geometry.
    """

    _label = "FBSEM"

    def __init__(self, model: str | os.PathLike | Any = None, override_geometry: bool = False):
        super().__init__()
        self._net: Any = None
        self._meta: dict[str, Any] = {}
        self._model_name = ""
        self._override_geometry = False
        self._anatomical: Any = None
        self._anatomical_tensor: torch.Tensor | None = None
        self._num_subsets = None
        self._num_subiterations = None
        self._block_shape: tuple[int, int, int] | None = None
        if model is not None:
            self.set_model(model, override_geometry)

    # -------------------------------------------------------------- model
    def set_model(self, model: str | os.PathLike | Any, override_geometry: bool = False) -> None:
        """Load a model file (weights only) or take an FBSEMNet."""
        if isinstance(model, FBSEMNet):
            net, meta, name = model, {}, type(model).__name__
        elif isinstance(model, (str, os.PathLike)):
            try:
                net, meta = load_model(model)
            except (ValueError, OSError) as e:
                raise self._error(f"cannot load FBSEM model {os.fspath(model)!r}: {e}") from e
            name = Path(model).name
        else:
            raise self._error(f"model must be a model file path or an FBSEMNet, got {type(model).__name__}")
        if self._num_subsets is not None and self._num_subsets != net.num_subsets:
            raise self._error(self._subsets_message(net.num_subsets, self._num_subsets))
        if self._num_subiterations is not None and self._num_subiterations > net.num_stages:
            raise self._error(self._stages_message(net.num_stages, self._num_subiterations))
        net.eval()
        if self._block_shape is not None:  # set before the model: applies to it
            net.set_block_shape(self._block_shape)
        self._net, self._meta, self._model_name = net, meta, name
        self._override_geometry = bool(override_geometry)
        self._invalidate()

    def get_model(self) -> Any:
        """The FBSEMNet in use (None before :meth:`set_model`)."""
        return self._net

    def set_block_shape(self, block_shape: Sequence[int] | None) -> None:
        """Run the model's CNNs block by block, blocks of (z, y, x) voxels (package extension;
        :meth:`~sirf_fbsem.model.fbsem.FBSEMNet.set_block_shape`): memory of one block, same image.
        None (default): whole images."""
        try:
            self._block_shape = check_block_shape(block_shape)
        except ValueError as e:
            raise self._error(str(e)) from None
        if self._net is not None:
            self._net.set_block_shape(self._block_shape)

    def get_block_shape(self) -> tuple[int, int, int] | None:
        """The model's block shape (the one set here before a model is given)."""
        return self._block_shape if self._net is None else self._net.block_shape

    def _require_net(self) -> Any:
        if self._net is None:
            raise self._not_ready("no FBSEM model: pass one to FBSEMReconstructor(model) or call set_model()")
        return self._net

    @staticmethod
    def _subsets_message(model_subsets: int, requested: int) -> str:
        return (f"this FBSEM model was trained with {model_subsets} subsets (stage k uses subset k mod "
                f"{model_subsets}); {requested} subsets cannot be used. Leave num_subsets unset or set "
                f"{model_subsets}")

    @staticmethod
    def _stages_message(num_stages: int, requested: int) -> str:
        return f"this FBSEM model has {num_stages} stages; {requested} sub-iterations cannot be run"

    def set_anatomical_image(self, image: Any) -> None:
        """Anatomical (MR) image for models whose regulariser takes one (package extension)."""
        self._check_image(image, "anatomical image")
        self._anatomical = image.clone()

    # -------------------------------------------------------------- subsets and stages
    def set_num_subsets(self, n: int) -> None:
        """Must equal the model's number of subsets (an error otherwise)."""
        if not isinstance(n, numbers.Integral) or n < 1:
            raise self._error(f"num_subsets must be an integer >= 1, got {n!r}")
        if self._net is not None and int(n) != self._net.num_subsets:
            raise self._error(self._subsets_message(self._net.num_subsets, int(n)))
        self._num_subsets = int(n)
        self._invalidate()

    def get_num_subsets(self) -> int:
        if self._net is not None:
            return int(self._net.num_subsets)
        if self._num_subsets is not None:
            return self._num_subsets
        raise self._not_ready("no FBSEM model yet: its number of subsets is unknown")

    def set_num_subiterations(self, n: int) -> None:
        """At most the model's number of stages."""
        if not isinstance(n, numbers.Integral) or n < 1:
            raise self._error(f"num_subiterations must be an integer >= 1, got {n!r}")
        if self._net is not None and int(n) > self._net.num_stages:
            raise self._error(self._stages_message(self._net.num_stages, int(n)))
        self._num_subiterations = int(n)

    def get_num_subiterations(self) -> int:
        if self._num_subiterations is not None:
            return self._num_subiterations
        if self._net is not None:
            return int(self._net.num_stages)
        raise self._not_ready("no FBSEM model yet: its number of stages is unknown")

    def set_current_subset_num(self, subset: int) -> None:
        """FBSEM stages are tied to their subsets: only the next stage's subset is accepted."""
        n = self.get_num_subsets()
        k = self._subiteration - 1
        if subset != k % n:
            raise self._error(f"FBSEM stage {k} was trained on subset {k % n}; subset {subset} cannot be used")

    # -------------------------------------------------------------- set-up checks
    def _prepare(self) -> None:
        self._require_net()

    def _check_backend(self, backend: _Backend) -> None:
        net = self._net
        meta_sino, meta_img = self._meta.get("sinogram_geometry"), self._meta.get("image_geometry")
        diffs = []
        if meta_sino is not None:
            if backend.sinogram_geometry is None:
                diffs.append("the data's sinogram geometry could not be read from SIRF")
            else:
                diffs += geometry_mismatch(meta_sino, backend.sinogram_geometry)
        if meta_img is not None:
            if backend.image_geometry is None:
                diffs.append("the image geometry could not be read from SIRF")
            elif _image_mismatch(meta_img, backend.image_geometry):
                diffs.append(_image_mismatch(meta_img, backend.image_geometry))
        if diffs and not self._override_geometry:
            self._backend = None
            raise self._error(f"FBSEM model {self._model_name!r} was trained for another geometry than the data "
                              "(model vs data): " + "; ".join(diffs) + ". Use set_model(..., override_geometry=True) "
                              "to use it anyway")
        self._anatomical_tensor = None
        if net.uses_anatomical:
            if self._anatomical is None:
                self._backend = None
                raise self._error("this FBSEM model needs an anatomical image: call set_anatomical_image() first")
            self._anatomical_tensor = torch.from_numpy(
                np.asarray(self._anatomical.as_array(), dtype=np.float32)).to(self._device)
        net.to(self._device)

    def _rule(self) -> UpdateRule:
        return FBSEMUpdate(self._require_net(), anatomical=self._anatomical_tensor)


# ----------------------------------------------------------------------------- CLI entry
def _model_psf(model_path, trained, requested) -> float | list[float] | None:
    """The PSF FWHM (mm) an FBSEM model is run with: the one it was trained with; a request for
    another is refused (its stages learned to undo their own projector's blur)."""
    trained_arr = np.zeros(3) if not trained else np.broadcast_to(np.asarray(trained, dtype=float), (3,))
    if requested is not None:
        req_arr = np.broadcast_to(np.asarray(requested if requested else 0.0, dtype=float), (3,))
        if not np.allclose(req_arr, trained_arr, atol=1e-6):
            raise ValueError(f"psf_fwhm_mm {requested:g}: FBSEM model {str(model_path)!r} was trained with a PSF "
                             f"of {trained or 0} mm, which it uses; leave psf_fwhm_mm unset")
    return None if not trained else trained


def reconstruct_acquisition(
    acq: Any,
    image_geom: ImageGeometry,
    algorithm: str = "osem",
    model_path: str | os.PathLike | None = None,
    override_geometry: bool = False,
    num_iterations: int = 4,
    block_shape: Sequence[int] | None = None,
    num_subsets: int | None = None,
    psf_fwhm_mm: float = 0.0,
    device: str = "cpu",
    progress: bool = True,
    backend: str = "embedded",
    ray_tracing: str = "auto",
) -> tuple[torch.Tensor, str]:
    """Reconstruct an :class:`~sirf_fbsem.acquisition.Acquisition` with the engine (:mod:`.recon.engine`).

    Args:
        acq: prompts and model terms.
        image_geom: output grid.
        algorithm: ``'osem'`` (default 4 subsets), ``'mlem'`` (one subset) or ``'fbsem'``
            (the model's subsets and stages; ``num_iterations`` is ignored).
        model_path: FBSEM model file (``'fbsem'`` only).
        override_geometry: use a model trained on another geometry.
        num_iterations: OSEM/MLEM iterations.
        block_shape: ``'fbsem'`` only: run the model's CNNs block by block, blocks of (z, y, x) voxels
            (:meth:`~sirf_fbsem.model.fbsem.FBSEMNet.set_block_shape`): memory of one block, same image.
        num_subsets: OSEM subsets; for FBSEM it must be None or the model's.
        psf_fwhm_mm: image-space PSF FWHM in mm (0 or None: none). FBSEM: None uses the PSF the
            model was trained with (its metadata); another value is refused.
        device: ``'cpu'`` or ``'cuda[:N]'``.
        progress: tqdm progress bar.
        backend: acquisition model backend, ``'embedded'`` or ``'sirf'``.
        ray_tracing: the embedded projector's ray tracing: ``'auto'`` (default: Siddon where it
            runs, i.e. on the CPU, so that the image is SIRF's; else Joseph), ``'siddon'`` (STIR's
            matrix row for row, CPU) or ``'joseph'``; SIRF's is always Siddon.
    Returns:
        (image (Z, Y, X) float32 tensor on ``device``, in SIRF's units, description such as
        ``"OSEM 4 it x 4 subsets"``).
    """
    if algorithm not in ("osem", "mlem", "fbsem"):
        raise ValueError(f"algorithm must be 'osem', 'mlem' or 'fbsem', got {algorithm!r}")
    if not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}")
    if block_shape is not None and algorithm != "fbsem":
        raise ValueError(f"block_shape runs an FBSEM model's CNNs block by block; algorithm is {algorithm!r}")
    prompts = torch.as_tensor(np.asarray(acq.prompts, dtype=np.float32))
    psf = float(psf_fwhm_mm) if psf_fwhm_mm else None
    psf_text = f", PSF {psf_fwhm_mm:g} mm" if psf else ""
    backend_text = "" if backend == "embedded" else f", {backend} backend"
    if algorithm in ("osem", "mlem"):
        if algorithm == "mlem":
            if num_subsets not in (None, 1):
                raise ValueError(f"MLEM uses one subset; got num_subsets={num_subsets}")
            n = 1
        else:
            n = 4 if num_subsets is None else int(num_subsets)
        model = acq.model(image_geom, backend=backend, num_subsets=n, psf_fwhm_mm=psf, device=device,
                          ray_tracing=ray_tracing)
        x = reconstruct(model, prompts, EMUpdate(), num_iterations * n, progress=progress)
        desc = f"MLEM {num_iterations} it" if algorithm == "mlem" else f"OSEM {num_iterations} it x {n} subsets"
        return x, desc + psf_text + backend_text

    if model_path is None:
        raise ValueError("algorithm 'fbsem' needs model_path")
    block_shape = check_block_shape(block_shape)
    net, meta = load_model(model_path, expected_sinogram_geometry=acq.geometry, override_geometry=override_geometry)
    psf = _model_psf(model_path, meta.get("psf_fwhm_mm"), psf_fwhm_mm)
    psf_text = f", PSF {np.max(psf):g} mm" if psf is not None else ""
    if num_subsets is not None and int(num_subsets) != net.num_subsets:
        raise ValueError(FBSEMReconstructor._subsets_message(net.num_subsets, int(num_subsets)))
    image_diff = _image_mismatch(meta["image_geometry"], image_geom)
    if image_diff and not override_geometry:
        raise ValueError(f"FBSEM model {str(model_path)!r} was trained on another image grid than the output's "
                         f"(model vs output) {image_diff}. Pass override_geometry=True to use it anyway")
    if net.uses_anatomical:
        raise ValueError(f"FBSEM model {str(model_path)!r} needs an anatomical image, which this entry point "
                         f"does not take")
    net.to(device)
    net.set_block_shape(block_shape)
    model = acq.model(image_geom, backend=backend, num_subsets=net.num_subsets, psf_fwhm_mm=psf, device=device,
                      ray_tracing=ray_tracing)
    x = reconstruct(model, prompts, FBSEMUpdate(net), net.num_stages, progress=progress)
    mode = meta.get("training_mode") or "unknown training"
    desc = f"FBSEM-Net ({net.num_stages} stages, {mode}, {Path(model_path).name}){psf_text}{backend_text}"
    return x, desc
