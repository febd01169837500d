"""The objects of the SIRF-compatible facade (data, acquisition models, objective function).

Users import them through :mod:`sirf_fbsem.stir` (``import sirf_fbsem.stir as pet``), which
adds ``OSMAPOSLReconstructor`` from :mod:`sirf_fbsem.reconstructor`, the layer above.

Names, arguments and array layouts are SIRF's (images ``(z, y, x)``, sinograms
``(tof, sinogram, view, tangential)``, SIRF's segment order). The acquisition model
is SIRF's::

    y = S (G x + a) + b            forward;   backward: G^T S y

with ``G`` the embedded Joseph projector
(:class:`~sirf_fbsem.projectors.embedded.EmbeddedAcquisitionModel`), ``S`` the
acquisition sensitivity (bin efficiencies x attenuation factors), ``a`` the additive
and ``b`` the background term (counts). Only the subset of sirf.STIR that scripts
like the one in :mod:`sirf_fbsem.stir` need is here; what differs from SIRF on purpose is listed in
each docstring ("Differs from SIRF"). Misuse raises :class:`error` (like
``sirf.Utilities.error``, with ``.value``).
"""
from __future__ import annotations

import contextlib
import numbers
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .acquisition import attenuation_factors
from .geometry import (
    GeometryError,
    ImageGeometry,
    Scanner,
    SinogramGeometry,
    geometry_mismatch,
    scanner_preset,
    subset_views,
)
from .io import ecat8_norm
from .io.interfile import read_image, read_projdata, write_image, write_projdata
from .io.nifti import write_nifti
from .projectors.embedded import EmbeddedAcquisitionModel
from .recon.osem import poisson_log_likelihood

__all__ = [
    "error",
    "MessageRedirector",
    "ImageData",
    "AcquisitionData",
    "AcquisitionSensitivityModel",
    "AcquisitionModel",
    "AcquisitionModelUsingMatrix",
    "AcquisitionModelUsingRayTracingMatrix",
    "AcquisitionModelUsingParallelproj",
    "PoissonLogLikelihoodWithLinearModelForMeanAndProjData",
    "make_Poisson_loglikelihood",
]


# ----------------------------------------------------------------------------- errors
class error(Exception):  # noqa: N801 - SIRF's name
    """The facade's exception, as ``sirf.Utilities.error``: the message is in ``.value``."""

    def __init__(self, value: Any):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return "??? " + repr(self.value)


class NotReadyError(error, AssertionError):
    """Raised where SIRF asserts (``get_output`` before a run, ...): both ``error`` and ``AssertionError``."""


@contextlib.contextmanager
def _as_error(what: str) -> Iterator[None]:
    """Re-raise the package's ValueError/OSError (GeometryError, InterfileError, ...) as :class:`error`."""
    try:
        yield
    except error:
        raise
    except (ValueError, OSError) as err:
        raise error(f"{what}: {err}") from err


class MessageRedirector:
    """Accepted for scripts that redirect STIR's messages; the embedded backend prints nothing to redirect."""

    def __init__(self, info: str | None = None, warn: str | None = "stdout", errr: str | None = "stdout"):
        for name, value in (("info", info), ("warn", warn), ("errr", errr)):
            if value is not None and not isinstance(value, str):
                raise error(f"wrong {name} argument for MessageRedirector: {value!r}")


# ----------------------------------------------------------------------------- data containers
class _Container:
    """Shared arithmetic of ImageData and AcquisitionData (element-wise, as SIRF 3)."""

    _array: np.ndarray | None

    def _require(self) -> np.ndarray:
        if self._array is None:
            raise error(f"{type(self).__name__} has no data (create it from a file, a template or initialise())")
        return self._array

    def _like(self, array: np.ndarray):
        raise NotImplementedError

    def as_array(self) -> np.ndarray:
        """A float32 copy of the values."""
        return self._require().copy()

    def clone(self):
        """A deep copy (geometry and values)."""
        return self._like(self._require().copy())

    def copy(self):
        """Alias of :meth:`clone`."""
        return self.clone()

    def _fill_from(self, value) -> None:
        arr = self._require()
        if isinstance(value, _Container):
            if type(value) is not type(self):
                raise error(f"cannot fill {type(self).__name__} from {type(value).__name__}")
            value = value._require()
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            if value.shape != arr.shape:
                raise error(f"fill: array has shape {value.shape}; {type(self).__name__} has shape {arr.shape}")
            arr[...] = value.astype(np.float32, copy=False)
        elif isinstance(value, numbers.Real):
            arr[...] = float(value)
        else:
            raise error(f"wrong fill value {type(value).__name__}: should be numpy.ndarray, {type(self).__name__}, float or int")

    def _operand(self, other):
        if isinstance(other, _Container):
            if type(other) is not type(self) or other._require().shape != self._require().shape:
                raise error(f"incompatible operands {type(self).__name__}{self._require().shape} and "
                            f"{type(other).__name__}{other._require().shape}")
            return other._require()
        if isinstance(other, numbers.Real):
            return np.float32(other)
        return NotImplemented

    def _binary(self, other, op):
        b = self._operand(other)
        if b is NotImplemented:
            return NotImplemented
        return self._like(op(self._require(), b).astype(np.float32))

    def __add__(self, other):
        return self._binary(other, np.add)

    __radd__ = __add__

    def __sub__(self, other):
        return self._binary(other, np.subtract)

    def __rsub__(self, other):
        return self._binary(other, lambda a, b: b - a)

    def __mul__(self, other):
        return self._binary(other, np.multiply)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._binary(other, np.divide)

    def __neg__(self):
        return self._like(-self._require())

    def norm(self) -> float:
        """2-norm of the values."""
        return float(np.linalg.norm(self._require().ravel().astype(np.float64)))

    def dot(self, other) -> float:
        """Sum of the element-wise product with another container of the same kind."""
        if not isinstance(other, _Container):
            raise error(f"dot needs another {type(self).__name__}, got {type(other).__name__}")
        return float(np.vdot(self._require().astype(np.float64), self._operand(other).astype(np.float64)))

    def sum(self) -> float:
        return float(self._require().sum(dtype=np.float64))

    def max(self) -> float:
        return float(self._require().max())

    def min(self) -> float:
        return float(self._require().min())


class ImageData(_Container):
    """A PET image on a voxel grid (STIR's ``VoxelsOnCartesianGrid``): values ``(z, y, x)`` float32.

    ``ImageData(filename)`` reads an Interfile image (``.hv``); ``ImageData(acq_data)``
    gives the scanner's default image (zeros); ``ImageData(image)`` copies the
    geometry of another image (zeros); ``ImageData()`` is empty until :meth:`initialise`.

    Differs from SIRF: NIfTI/DICOM files are not read (use ``.hv``); :meth:`write`
    writes real NIfTI for names ending in ``.nii``/``.nii.gz`` (SIRF's writes
    Interfile under that name).
    """

    def __init__(self, arg: "str | os.PathLike | AcquisitionData | ImageData | None" = None):
        self._geometry: ImageGeometry | None = None
        self._array = None
        self._scanner: Scanner | None = None
        if isinstance(arg, (str, os.PathLike)):
            self.read_from_file(arg)
        elif isinstance(arg, AcquisitionData):
            self._set(arg.geometry.default_image(), None, arg.geometry.scanner)
        elif isinstance(arg, ImageData):
            self._set(arg.geometry, None, arg._scanner)
        elif arg is not None:
            raise error(f"wrong argument {arg!r} for ImageData constructor")

    def _set(self, geometry: ImageGeometry, array: np.ndarray | None, scanner: Scanner | None) -> None:
        self._geometry = geometry
        self._array = np.zeros(geometry.shape, np.float32) if array is None else np.asarray(array, np.float32)
        self._scanner = scanner

    def _like(self, array: np.ndarray) -> "ImageData":
        new = type(self)()
        new._set(self.geometry, np.array(array, dtype=np.float32, copy=True), self._scanner)
        return new

    @classmethod
    def from_array(cls, array, geometry: ImageGeometry, scanner: Scanner | None = None) -> "ImageData":
        """An image with the given values and geometry (package extension; not in SIRF)."""
        arr = np.asarray(array, dtype=np.float32)
        if arr.shape != geometry.shape:
            raise error(f"array has shape {arr.shape}; the image geometry is {geometry.shape} (z, y, x)")
        img = cls()
        img._set(geometry, arr.copy(), scanner)
        return img

    def read_from_file(self, filename: str | os.PathLike) -> None:
        """Replace the contents by an Interfile image (``.hv``)."""
        name = str(filename)
        if name.lower().endswith((".nii", ".nii.gz")):
            raise error(f"ImageData({name!r}): reading NIfTI is not supported without SIRF (its STIR origin "
                        f"needs the scanner); use an Interfile .hv image")
        with _as_error(f"ImageData({name!r})"):
            geometry, array = read_image(filename)
        self._set(geometry, array, None)

    def initialise(self, dim: Sequence[int], vsize: Sequence[float] = (1.0, 1.0, 1.0),
                   origin: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        """Make a zero image of ``dim`` voxels (z, y, x), voxel sizes ``vsize`` (mm) and ``origin`` (mm)."""
        with _as_error("ImageData.initialise"):
            geometry = ImageGeometry(tuple(dim), tuple(vsize), tuple(origin))
        self._set(geometry, None, None)

    @property
    def geometry(self) -> ImageGeometry:
        """The :class:`~sirf_fbsem.geometry.ImageGeometry` (package extension)."""
        if self._geometry is None:
            raise error("ImageData has no geometry yet (initialise() it or create it from AcquisitionData)")
        return self._geometry

    @property
    def scanner(self) -> Scanner | None:
        """The scanner whose gantry frame the image lives in, when known (needed for NIfTI)."""
        return self._scanner

    def dimensions(self) -> tuple[int, int, int]:
        """(nz, ny, nx)."""
        return tuple(self.geometry.shape)  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.dimensions()

    def voxel_sizes(self) -> tuple[float, float, float]:
        """(vz, vy, vx) in mm."""
        return tuple(self.geometry.voxel_size_mm)  # type: ignore[return-value]

    def fill(self, value) -> "ImageData":
        """Set the values from a (z, y, x) array, another ImageData or a scalar; returns self."""
        self._fill_from(value)
        return self

    def get_uniform_copy(self, value: float = 1.0) -> "ImageData":
        """A copy of the geometry filled with ``value``."""
        return self._like(np.full(self.geometry.shape, value, np.float32))

    def write(self, filename: str | os.PathLike, patient_position: str = "HFS") -> None:
        """Write Interfile (``.hv`` + ``.v``; ``.hv`` is added when the name has no suffix) or NIfTI.

        Names ending in ``.nii``/``.nii.gz`` give real NIfTI-1 with the affine from the
        STIR geometry (unlike SIRF's ``write``, which writes Interfile under that name);
        that needs the scanner, known for images made from AcquisitionData. Files are
        written atomically.
        """
        arr = self._require()
        name = str(filename)
        if name.lower().endswith((".nii", ".nii.gz")):
            if self._scanner is None:
                raise error(f"writing NIfTI {name!r} needs the scanner (gantry frame) of the image; this image "
                            f"was not made from AcquisitionData. Write Interfile (.hv) instead")
            with _as_error(f"ImageData.write({name!r})"):
                write_nifti(name, arr, self.geometry, self._scanner, patient_position=patient_position)
            return
        path = Path(name)
        if path.suffix.lower() != ".hv":
            path = path.with_name(path.name + ".hv")
        with _as_error(f"ImageData.write({name!r})"):
            write_image(path, self.geometry, arr)

    def __repr__(self) -> str:
        return f"ImageData({self._geometry.describe() if self._geometry else 'empty'})"


class AcquisitionData(_Container):
    """Sinograms with their geometry (STIR's ``ProjData``): values ``(tof, sinogram, view, tangential)``.

    ``AcquisitionData(filename)`` reads Interfile (``.hs``); ``AcquisitionData(template)``
    has the template's geometry (zeros); ``AcquisitionData(scanner_name, span=1,
    max_ring_diff=-1, view_mash_factor=1)`` builds STIR's geometry for a preset
    scanner (``'Siemens_mMR'``, ``'small_test'``; zeros).

    Differs from SIRF: data are always held in memory and writable (SIRF's default
    file storage makes read data read-only); ``max_ring_diff=-1`` means the largest
    ring difference the span allows (60 for the mMR at span 11).
    """

    _storage_scheme = "memory"

    def __init__(self, src: "str | os.PathLike | AcquisitionData | None" = None, span: int = 1,
                 max_ring_diff: int = -1, view_mash_factor: int = 1):
        self._geometry: SinogramGeometry | None = None
        self._array = None
        self._views: np.ndarray | None = None  # set on subsets from get_subset()
        if isinstance(src, AcquisitionData):
            self._set(src.geometry, np.zeros(src._require().shape, np.float32), src._views)
        elif isinstance(src, (str, os.PathLike)):
            name = str(src)
            if isinstance(src, os.PathLike) or name.lower().endswith((".hs", ".s")) or os.path.exists(name):
                self.read_from_file(name)
            else:
                self._set(_scanner_geometry(name, span, max_ring_diff, view_mash_factor), None, None)
        elif src is not None:
            raise error(f"wrong source {src!r} for AcquisitionData constructor")

    def _set(self, geometry: SinogramGeometry, array: np.ndarray | None, views: np.ndarray | None) -> None:
        self._geometry = geometry
        self._views = None if views is None else np.asarray(views, dtype=np.int64)
        shape = geometry.shape if views is None else geometry.shape[:2] + (len(views), geometry.shape[3])
        self._array = np.zeros(shape, np.float32) if array is None else np.asarray(array, np.float32)
        if self._array.shape != shape:
            raise error(f"acquisition data have shape {self._array.shape}; the geometry needs {shape}")

    def _like(self, array: np.ndarray) -> "AcquisitionData":
        new = type(self)()
        new._set(self.geometry, np.array(array, dtype=np.float32, copy=True), self._views)
        return new

    @classmethod
    def from_array(cls, array, geometry: SinogramGeometry) -> "AcquisitionData":
        """Acquisition data with the given values (T,S,V,N) and geometry (package extension)."""
        arr = np.asarray(array, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        data = cls()
        data._set(geometry, arr.copy(), None)
        return data

    @staticmethod
    def set_storage_scheme(scheme: str) -> None:
        """Accepted for SIRF scripts (``'file'`` or ``'memory'``); data are always in memory here."""
        if scheme not in ("file", "memory"):
            raise error(f"storage scheme must be 'file' or 'memory', got {scheme!r}")
        AcquisitionData._storage_scheme = scheme

    @staticmethod
    def get_storage_scheme() -> str:
        return AcquisitionData._storage_scheme

    def read_from_file(self, filename: str | os.PathLike) -> None:
        with _as_error(f"AcquisitionData({str(filename)!r})"):
            geometry, array = read_projdata(filename)
        self._set(geometry, array, None)

    @property
    def geometry(self) -> SinogramGeometry:
        """The :class:`~sirf_fbsem.geometry.SinogramGeometry` (package extension)."""
        if self._geometry is None:
            raise error("AcquisitionData has no geometry yet")
        return self._geometry

    @property
    def subset_views(self) -> np.ndarray | None:
        """View indices of data made by :meth:`get_subset` (None for full data)."""
        return None if self._views is None else self._views.copy()

    def dimensions(self) -> tuple[int, int, int, int]:
        """(tof bins, sinograms, views, tangential positions)."""
        return tuple(self._require().shape)  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.dimensions()

    def fill(self, value) -> "AcquisitionData":
        """Set the values from a (T,S,V,N) array, another AcquisitionData or a scalar; returns self."""
        self._fill_from(value)
        return self

    def get_uniform_copy(self, value: float = 0) -> "AcquisitionData":
        return self._like(np.full(self._require().shape, value, np.float32))

    def create_uniform_image(self, value: float = 0, xy: int | None = None) -> ImageData:
        """The scanner's default image (STIR's ``VoxelsOnCartesianGrid(proj_data_info)``) filled with ``value``.

        ``xy`` sets nx = ny, keeping the voxel sizes.
        """
        geom = self.geometry.default_image()
        if xy is not None:
            with _as_error("create_uniform_image"):
                geom = ImageGeometry((geom.shape[0], int(xy), int(xy)), geom.voxel_size_mm, geom.origin_mm)
        return ImageData.from_array(np.full(geom.shape, value, np.float32), geom, self.geometry.scanner)

    def get_subset(self, views: Sequence[int]) -> "AcquisitionData":
        """The data of the given views (SIRF: ``get_subset``); they keep the full geometry and remember the views.

        Differs from SIRF: acquisition models of the facade are set up on full data
        only; use ``forward(image, subset_num, num_subsets)`` for subsets.
        """
        if self._views is not None:
            raise error("get_subset of a subset is not supported; take the views from the full data")
        v = np.asarray(list(views), dtype=np.int64)
        n = self.geometry.num_views
        if v.ndim != 1 or v.size == 0 or v.min() < 0 or v.max() >= n:
            raise error(f"get_subset: views must be indices in [0, {n - 1}], got {list(views)}")
        sub = type(self)()
        sub._set(self.geometry, self._require()[:, :, v, :].copy(), v)
        return sub

    def write(self, filename: str | os.PathLike) -> None:
        """Write Interfile (``<stem>.hs`` + ``<stem>.s``), atomically."""
        if self._views is not None:
            raise error("a view subset cannot be written as Interfile (its views are not a STIR geometry)")
        with _as_error(f"AcquisitionData.write({str(filename)!r})"):
            write_projdata(filename, self.geometry, self._require())

    def __repr__(self) -> str:
        return f"AcquisitionData({self._geometry.describe() if self._geometry else 'empty'})"


def _scanner_geometry(name: str, span: int, max_ring_diff: int, view_mash_factor: int) -> SinogramGeometry:
    try:
        scanner = scanner_preset(name)
    except GeometryError as err:
        raise error(f"AcquisitionData({name!r}): not a file and not a known scanner ({err})") from None
    if max_ring_diff is None or max_ring_diff < 0:
        max_ring_diff = scanner.num_rings - 1
        if span > 1:
            half = (span - 1) // 2
            max_ring_diff = half + span * ((max_ring_diff - half) // span)
    with _as_error(f"AcquisitionData({name!r}, span={span}, max_ring_diff={max_ring_diff})"):
        return SinogramGeometry.from_span(scanner, span=span, max_ring_diff=max_ring_diff,
                                          view_mash_factor=view_mash_factor)


def _check_type(obj, cls, what: str) -> None:
    if not isinstance(obj, cls):
        raise error(f"{what} must be a sirf_fbsem.stir.{cls.__name__}, got {type(obj).__module__}."
                    f"{type(obj).__name__}")


# ----------------------------------------------------------------------------- sensitivity model
class AcquisitionSensitivityModel:
    """Bin efficiencies ``S`` of the acquisition model (detector efficiencies x attenuation factors).

    ``AcquisitionSensitivityModel(acq_data)``: the values are the factors.
    ``AcquisitionSensitivityModel(norm_file)``: an Interfile sinogram of factors (.hs)
    or a Siemens mMR ECAT8 norm (.n.hdr). ``AcquisitionSensitivityModel(mu_map,
    acq_model)``: attenuation factors exp(-line integral of mu), mu in 1/cm on the
    image's grid, projected as ``acq_model`` projects (its ray tracing and tangential LORs), as SIRF.
    ``AcquisitionSensitivityModel(asm1, asm2)``: the product.
    """

    def __init__(self, src, other=None):
        self._factors: np.ndarray | None = None
        self._source = src
        self._other = other
        if isinstance(src, AcquisitionData):
            self._factors = src.as_array()
            self._geometry = src.geometry
        elif isinstance(src, (str, os.PathLike)):
            pass
        elif isinstance(src, ImageData) and isinstance(other, AcquisitionModel):
            pass
        elif isinstance(src, AcquisitionSensitivityModel) and isinstance(other, AcquisitionSensitivityModel):
            pass
        else:
            raise error(f"wrong arguments for AcquisitionSensitivityModel: {type(src).__name__}, "
                        f"{type(other).__name__}")

    def set_up(self, acq: AcquisitionData) -> None:
        """Compute the factors for ``acq``'s geometry."""
        _check_type(acq, AcquisitionData, "AcquisitionSensitivityModel.set_up argument")
        geom = acq.geometry
        src, other = self._source, self._other
        with _as_error("AcquisitionSensitivityModel.set_up"):
            if isinstance(src, AcquisitionData):
                factors = src.as_array()
            elif isinstance(src, (str, os.PathLike)):
                factors = _read_factors(Path(src), geom)
            elif isinstance(src, ImageData):
                # as SIRF: the mu-map is projected by the given acquisition model's projector
                factors = attenuation_factors(src.as_array(), src.geometry, geom,
                                              ray_tracing=other._ray_tracing,
                                              num_tangential_LORs=other._num_tangential_LORs)
            else:
                src.set_up(acq)
                other.set_up(acq)
                factors = src.get_factors() * other.get_factors()
        if factors.shape != acq.geometry.shape:
            raise error(f"sensitivity factors have shape {factors.shape}; the data have {acq.geometry.shape}")
        self._factors = np.asarray(factors, np.float32)
        self._geometry = geom

    def get_factors(self) -> np.ndarray:
        """The factors (T,S,V,N) (package extension)."""
        if self._factors is None:
            raise error("AcquisitionSensitivityModel: call set_up(acq_data) first")
        return self._factors

    def _apply(self, ad: AcquisitionData, inverse: bool) -> np.ndarray:
        _check_type(ad, AcquisitionData, "acquisition data")
        f = self.get_factors()
        if ad._views is not None:
            f = f[:, :, ad._views, :]
        a = ad._require()
        if a.shape != f.shape:
            raise error(f"acquisition data have shape {a.shape}; the sensitivity model has {f.shape}")
        if not inverse:
            return a * f
        return np.divide(a, f, out=np.zeros_like(a), where=f != 0)

    def forward(self, ad: AcquisitionData) -> AcquisitionData:
        """A new AcquisitionData: ``ad`` times the efficiencies."""
        return ad._like(self._apply(ad, False))

    def invert(self, ad: AcquisitionData) -> AcquisitionData:
        """A new AcquisitionData: ``ad`` divided by the efficiencies (0 where they are 0)."""
        return ad._like(self._apply(ad, True))

    def unnormalise(self, ad: AcquisitionData) -> None:
        """Multiply ``ad`` by the efficiencies, in place."""
        ad.fill(self._apply(ad, False))

    def normalise(self, ad: AcquisitionData) -> None:
        """Divide ``ad`` by the efficiencies, in place."""
        ad.fill(self._apply(ad, True))


def _read_factors(path: Path, geom: SinogramGeometry) -> np.ndarray:
    if path.name.lower().endswith(".hs"):
        fgeom, factors = read_projdata(path)
        diffs = geometry_mismatch(fgeom, geom)
        if diffs:
            raise error(f"norm file '{path}' does not match the data: " + "; ".join(diffs))
        return factors
    return ecat8_norm.read_ecat8_norm(path).efficiency_sinogram(geom)


# ----------------------------------------------------------------------------- acquisition models
class AcquisitionModel:
    """PET acquisition model ``y = S (G x + a) + b`` on the embedded projector (SIRF's class and methods).

    ``forward``/``backward`` take ``subset_num``/``num_subsets`` (defaults: the
    ``subset_num``/``num_subsets`` properties); subset ``s`` of ``n`` is STIR's (the views
    of :func:`sirf_fbsem.geometry.subset_views` with the projector's view symmetries). As in SIRF, a subset forward projection is full size, zero outside
    the subset's views, plus the constant term ``S a + b`` in every bin.
    ``direct``/``adjoint`` are the linear part and refuse a model with a constant term.
    """

    def __init__(self):
        self.acq_templ: AcquisitionData | None = None
        self.img_templ: ImageData | None = None
        self.at: AcquisitionData | None = None
        self.bt: AcquisitionData | None = None
        self.asm: AcquisitionSensitivityModel | None = None
        self.const = False
        self._num_subsets = 1
        self._subset_num = 0
        self._models: dict[tuple[int, str], Any] = {}
        self._num_tangential_LORs = 1
        #: the embedded projector's ray tracing (EmbeddedAcquisitionModel's ``ray_tracing``)
        self._ray_tracing = "joseph"

    # -------------------------------------------------------------- set-up
    def set_up(self, acq_templ: AcquisitionData, img_templ: ImageData) -> None:
        """Prepare for projections between ``acq_templ``'s sinograms and ``img_templ``'s images."""
        if self.const:
            raise error("cannot set_up a const (linear part) acquisition model")
        _check_type(acq_templ, AcquisitionData, "acquisition template")
        _check_type(img_templ, ImageData, "image template")
        if acq_templ._views is not None:
            raise error("the facade sets up acquisition models on full data only (not on get_subset() data); "
                        "use forward(image, subset_num, num_subsets)")
        with _as_error("AcquisitionModel.set_up"):
            img_templ.geometry.check_fits(acq_templ.geometry)
        self.acq_templ, self.img_templ = acq_templ, img_templ
        self._models.clear()

    def _require_set_up(self) -> None:
        if self.acq_templ is None or self.img_templ is None:
            raise error("AcquisitionModel.set_up(acq_templ, img_templ) call missing")

    def _terms(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Multiplicative ``S`` and additive ``S a + b`` (T,S,V,N), or None."""
        self._require_set_up()
        mult = None
        if self.asm is not None:
            if self.asm._factors is None or self.asm._geometry != self.acq_templ.geometry:
                self.asm.set_up(self.acq_templ)
            mult = self.asm.get_factors()
        add = None
        if self.at is not None:
            add = self.at.as_array() * (mult if mult is not None else 1.0)
        if self.bt is not None:
            add = self.bt.as_array() if add is None else add + self.bt.as_array()
        return mult, add

    def get_backend_model(self, num_subsets: int = 1, device: str | torch.device = "cpu"):
        """The :class:`EmbeddedAcquisitionModel` (torch) behind this object (package extension; cached)."""
        self._require_set_up()
        key = (int(num_subsets), str(torch.device(device)))
        if key not in self._models:
            mult, add = self._terms()
            with _as_error("AcquisitionModel"):
                self._models[key] = EmbeddedAcquisitionModel(
                    self.acq_templ.geometry, self.img_templ.geometry, num_subsets=int(num_subsets),
                    multiplicative=mult, additive=add, device=device,
                    num_tangential_LORs=self._num_tangential_LORs, ray_tracing=self._ray_tracing,
                )
        return self._models[key]

    # -------------------------------------------------------------- terms
    def _check_mutable(self, what: str) -> None:
        if self.const:
            raise error(f"cannot {what} for a const (linear part) acquisition model")
        self._models.clear()

    def set_additive_term(self, at: AcquisitionData) -> None:
        """The additive term ``a`` (counts before ``S``)."""
        self._check_mutable("set_additive_term")
        _check_type(at, AcquisitionData, "additive term")
        self.at = at

    def set_background_term(self, bt: AcquisitionData) -> None:
        """The background term ``b`` (counts, after ``S``)."""
        self._check_mutable("set_background_term")
        _check_type(bt, AcquisitionData, "background term")
        self.bt = bt

    def set_acquisition_sensitivity(self, asm: AcquisitionSensitivityModel) -> None:
        """The bin efficiencies ``S``."""
        self._check_mutable("set_acquisition_sensitivity")
        _check_type(asm, AcquisitionSensitivityModel, "acquisition sensitivity model")
        self.asm = asm

    def set_num_tangential_LORs(self, n: int) -> None:  # noqa: N802 - SIRF's name
        """Rays per bin across its width, each weighted 1/n (STIR's ray tracer; SIRF's default 2)."""
        if int(n) < 1:
            raise error(f"number of tangential LORs must be >= 1, got {n}")
        self._num_tangential_LORs = int(n)
        self._models.clear()

    def get_num_tangential_LORs(self) -> int:  # noqa: N802 - SIRF's name
        return self._num_tangential_LORs

    def get_additive_term(self) -> AcquisitionData:
        self._require_set_up()
        return self.at if self.at is not None else self.acq_templ.get_uniform_copy(0)

    def get_background_term(self) -> AcquisitionData:
        self._require_set_up()
        return self.bt if self.bt is not None else self.acq_templ.get_uniform_copy(0)

    def get_constant_term(self) -> AcquisitionData:
        """``S a + b``."""
        _, add = self._terms()
        return self.acq_templ.get_uniform_copy(0).fill(add if add is not None else 0.0)

    def is_affine(self) -> bool:
        return True

    def is_linear(self) -> bool:
        """True when there is no constant term (or it is zero)."""
        return all(t is None or t.norm() == 0 for t in (self.at, self.bt))

    def get_linear_acquisition_model(self) -> "AcquisitionModel":
        """The linear part ``S G`` (shares templates and ``S``; const)."""
        lin = type(self).__new__(type(self))
        AcquisitionModel.__init__(lin)
        lin.acq_templ, lin.img_templ, lin.asm = self.acq_templ, self.img_templ, self.asm
        lin._num_subsets, lin._subset_num = self._num_subsets, self._subset_num
        lin._num_tangential_LORs, lin._ray_tracing = self._num_tangential_LORs, self._ray_tracing
        lin.const = True
        return lin

    def range_geometry(self) -> AcquisitionData:
        self._require_set_up()
        return self.acq_templ.get_uniform_copy(0)

    def domain_geometry(self) -> ImageData:
        self._require_set_up()
        return self.img_templ.get_uniform_copy(0)

    # -------------------------------------------------------------- subsets
    @property
    def num_subsets(self) -> int:
        return self._num_subsets

    @num_subsets.setter
    def num_subsets(self, value: int) -> None:
        if not isinstance(value, numbers.Integral) or value < 1:
            raise error(f"num_subsets must be an integer >= 1, got {value!r}")
        self._num_subsets = int(value)
        self._subset_num = 0

    @property
    def subset_num(self) -> int:
        return self._subset_num

    @subset_num.setter
    def subset_num(self, value: int) -> None:
        if not isinstance(value, numbers.Integral) or not 0 <= value < self._num_subsets:
            raise error(f"subset_num must be an integer in [0, {self._num_subsets - 1}], got {value!r}")
        self._subset_num = int(value)

    def _subset_args(self, subset_num, num_subsets) -> tuple[int, int]:
        n = self._num_subsets if num_subsets is None else int(num_subsets)
        s = self._subset_num if subset_num is None else int(subset_num)
        self._require_set_up()
        with _as_error("subsets"):
            subset_views(self.acq_templ.geometry.num_views, n, s)
        return s, n

    # -------------------------------------------------------------- projections
    def _image_tensor(self, image: ImageData) -> torch.Tensor:
        _check_type(image, ImageData, "image")
        if image.geometry != self.img_templ.geometry:
            raise error(f"image {image.geometry.describe()} differs from the template "
                        f"{self.img_templ.geometry.describe()} of set_up()")
        return torch.from_numpy(image.as_array())

    def forward(self, image: ImageData, subset_num: int | None = None, num_subsets: int | None = None,
                out: AcquisitionData | None = None) -> AcquisitionData | None:
        """``S (G x + a) + b``; with subsets: full size, zero outside the subset, constant term everywhere."""
        s, n = self._subset_args(subset_num, num_subsets)
        x = self._image_tensor(image)
        model = self.get_backend_model(n)
        with torch.no_grad():
            if n == 1:
                y = model.direct(x)
            else:
                y = torch.zeros(model.sinogram_shape, dtype=model.dtype)
                y[:, :, torch.as_tensor(model.subset_views(s))] = model.direct(x, s)
            if model.additive is not None:
                y = y + model.additive
        return self._deliver(self.acq_templ, y.numpy(), out)

    def backward(self, ad: AcquisitionData, subset_num: int | None = None, num_subsets: int | None = None,
                 out: ImageData | None = None) -> ImageData | None:
        """``G^T S y`` over the subset's views of the full-size ``ad``."""
        s, n = self._subset_args(subset_num, num_subsets)
        _check_type(ad, AcquisitionData, "acquisition data")
        if ad.shape != self.acq_templ.shape:
            raise error(f"backward: acquisition data have shape {ad.shape}; the model's template has "
                        f"{self.acq_templ.shape}")
        model = self.get_backend_model(n)
        y = torch.from_numpy(ad.as_array())
        with torch.no_grad():
            x = model.adjoint(model.take_subset(y, s if n > 1 else None), s if n > 1 else None)
        return self._deliver(self.img_templ, x.numpy(), out)

    @staticmethod
    def _deliver(template, array: np.ndarray, out):
        if out is None:
            return template._like(array)
        _check_type(out, type(template), "out")
        out.fill(array)
        return None

    def direct(self, image: ImageData, out: AcquisitionData | None = None):
        """Linear forward projection on the ``subset_num``/``num_subsets`` members (CIL compatibility)."""
        if not self.is_linear():
            raise error("AcquisitionModel is not linear; use get_linear_acquisition_model()")
        return self.forward(image, self._subset_num, self._num_subsets, out)

    def adjoint(self, ad: AcquisitionData, out: ImageData | None = None):
        """Back projection on the ``subset_num``/``num_subsets`` members."""
        if not self.is_linear():
            raise error("AcquisitionModel is not linear; use get_linear_acquisition_model()")
        return self.backward(ad, self._subset_num, self._num_subsets, out)


class AcquisitionModelUsingMatrix(AcquisitionModel):
    """SIRF's matrix-based model; here the embedded Joseph projector (no matrix is stored)."""

    def __init__(self, matrix: Any = None):
        super().__init__()

    def set_matrix(self, matrix: Any) -> None:
        """Accepted for SIRF scripts; the embedded projector has no matrix."""


class AcquisitionModelUsingRayTracingMatrix(AcquisitionModelUsingMatrix):
    """SIRF's ray-tracing model: STIR's ray-tracing matrix row for row (the embedded Siddon
    projector, on the CPU; Joseph on a GPU), 2 tangential LORs by default, as SIRF."""

    def __init__(self, matrix: Any = None):
        super().__init__(matrix)
        self._num_tangential_LORs = 2
        self._ray_tracing = "auto"


class AcquisitionModelUsingParallelproj(AcquisitionModelUsingMatrix):
    """SIRF's parallelproj model (Joseph's method): the embedded Joseph projector, CPU or GPU."""


# ----------------------------------------------------------------------------- objective function
class PoissonLogLikelihoodWithLinearModelForMeanAndProjData:
    """Poisson log-likelihood ``L(x) = sum_i y_i log(ybar_i) - ybar_i``, ``ybar = forward(x)``.

    Subset ``s`` of ``n`` (views ``v % n == s``): gradient ``G_s^T S_s (y_s / ybar_s - 1)``,
    sensitivity ``G_s^T S_s 1``. Priors are not supported.
    """

    def __init__(self):
        self._acq_data: AcquisitionData | None = None
        self._acq_model: AcquisitionModel | None = None
        self._num_subsets = 1

    def set_acquisition_data(self, ad: AcquisitionData) -> None:
        _check_type(ad, AcquisitionData, "acquisition data")
        if ad._views is not None:
            raise error("the objective function needs full acquisition data, not a get_subset() subset")
        self._acq_data = ad

    def set_acquisition_model(self, am: AcquisitionModel) -> None:
        _check_type(am, AcquisitionModel, "acquisition model")
        self._acq_model = am

    def get_acquisition_data(self) -> AcquisitionData:
        """(package extension; SIRF has no getter)."""
        if self._acq_data is None:
            raise error("the objective function has no acquisition data (set_acquisition_data)")
        return self._acq_data

    def get_acquisition_model(self) -> AcquisitionModel:
        """(package extension; SIRF has no getter)."""
        if self._acq_model is None:
            raise error("the objective function has no acquisition model (set_acquisition_model)")
        return self._acq_model

    def set_num_subsets(self, n: int) -> None:
        if not isinstance(n, numbers.Integral) or n < 1:
            raise error(f"num_subsets must be an integer >= 1, got {n!r}")
        self._num_subsets = int(n)

    def get_num_subsets(self) -> int:
        return self._num_subsets

    def set_prior(self, prior: Any) -> None:
        raise error("priors are not supported by the embedded backend (sirf_fbsem.stir)")

    def set_recompute_sensitivity(self, flag: bool) -> None:
        """Accepted for SIRF scripts; sensitivities are computed when first needed."""

    def set_up(self, image: ImageData) -> None:
        """Check that data, model and ``image`` fit together."""
        model = self._model()
        _check_type(image, ImageData, "image")
        if tuple(image.shape) != tuple(model.image_shape):
            raise error(f"image has shape {image.shape}; the acquisition model expects {model.image_shape}")

    def _model(self, num_subsets: int | None = None):
        am, ad = self.get_acquisition_model(), self.get_acquisition_data()
        if am.acq_templ is None:
            raise error("the acquisition model is not set up (am.set_up(acq_templ, img_templ))")
        if ad.shape != am.acq_templ.shape:
            raise error(f"acquisition data have shape {ad.shape}; the acquisition model was set up for "
                        f"{am.acq_templ.shape}")
        return am.get_backend_model(self._num_subsets if num_subsets is None else num_subsets)

    def _subset(self, subset: int) -> int | None:
        if subset is None or subset < 0:
            return None
        if not 0 <= subset < self._num_subsets:
            raise error(f"subset must be in [0, {self._num_subsets - 1}] (or -1 for all), got {subset}")
        return int(subset)

    def _ratio_backprojection(self, image: ImageData, subset: int | None, minus_one: bool) -> ImageData:
        model = self._model()
        x = self.get_acquisition_model()._image_tensor(image)
        y = model.take_subset(torch.from_numpy(self.get_acquisition_data().as_array()), subset)
        with torch.no_grad():
            ybar = model.forward(x, subset)
            pos = ybar > 0
            ratio = torch.where(pos, y / torch.where(pos, ybar, torch.ones_like(ybar)), torch.zeros_like(ybar))
            back = model.adjoint(ratio, subset)
            if minus_one:
                back = back - model.sensitivity(subset)
        return image._like(back.numpy())

    def value(self, image: ImageData) -> float:
        model = self._model()
        x = self.get_acquisition_model()._image_tensor(image)
        return poisson_log_likelihood(model, torch.from_numpy(self.get_acquisition_data().as_array()), x)

    __call__ = value
    get_value = value

    def gradient(self, image: ImageData, subset: int = -1, out: ImageData | None = None) -> ImageData:
        """Gradient of the subset's part (all subsets for ``subset=-1``)."""
        g = self._ratio_backprojection(image, self._subset(subset), minus_one=True)
        if out is None:
            return g
        return out.fill(g)

    def get_gradient(self, image: ImageData) -> ImageData:
        return self.gradient(image, -1)

    def get_subset_gradient(self, image: ImageData, subset: int) -> ImageData:
        return self.gradient(image, subset)

    def get_backprojection_of_acquisition_ratio(self, image: ImageData, subset: int) -> ImageData:
        """``G_s^T S_s (y_s / ybar_s)``."""
        return self._ratio_backprojection(image, self._subset(subset), minus_one=False)

    def get_subset_sensitivity(self, subset: int) -> ImageData:
        """``G_s^T S_s 1``."""
        s = self._subset(subset)
        model = self._model()
        template = self.get_acquisition_model().img_templ
        return template._like(model.sensitivity(s).detach().cpu().numpy())


def make_Poisson_loglikelihood(acq_data: AcquisitionData, likelihood_type: str = "LinearModelForMean",  # noqa: N802
                               acq_model: AcquisitionModel | None = None
                               ) -> PoissonLogLikelihoodWithLinearModelForMeanAndProjData:
    """The Poisson log-likelihood of ``acq_data`` (SIRF's factory)."""
    if likelihood_type != "LinearModelForMean":
        raise error("only PoissonLogLikelihoodWithLinearModelForMeanAndProjData is implemented")
    obj = PoissonLogLikelihoodWithLinearModelForMeanAndProjData()
    obj.set_acquisition_data(acq_data)
    if acq_model is not None:
        obj.set_acquisition_model(acq_model)
    return obj
