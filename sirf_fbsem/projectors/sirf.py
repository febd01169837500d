"""The SIRF backend: a ``sirf.STIR`` acquisition model behind the :class:`AcquisitionModel` contract.

Mean of the prompts in subset ``s`` (views ``v % num_subsets == s``), as SIRF writes it::

    ybar_s = S_s (G_s P x + a_s) + b_s  =  A_s x + c_s,     A_s = S_s G_s P,   c_s = S_s a_s + b_s

========  ==========================================  =============================================
symbol    meaning                                     here
========  ==========================================  =============================================
x         activity image (z, y, x)                    tensor (Z,Y,X) or (B,Z,Y,X)
G_s       ray tracing / parallelproj projector        a fresh ``sirf.STIR`` model per subset
P         optional image-space PSF                    ``image_data_processor``
S_s       multiplicative factors (norm x attn)        ``AcquisitionSensitivityModel`` of the subset's
                                                      factors (``get_subset`` of the full factors)
a_s, b_s  additive / background terms (counts)        kept as one tensor ``c = S a + b``, sliced per subset
========  ==========================================  =============================================

Why one SIRF model per subset: ``AcquisitionModel.forward(x, subset_num, num_subsets)``
returns a full-size sinogram that is zero outside the subset and then adds the
additive and background terms to *every* bin, and which views make up a subset
depends on the projector's symmetries. Here subset ``s`` is
``acq_template.get_subset(views)`` (STIR's ``ProjDataInfoSubsetByView``, the pattern of
SIRF-Contribs' partitioner used in PETRIC) with its own model set up on it, so a subset
projection has exactly ``len(views)`` views and no foreign additive term.

Conversions: torch -> SIRF fills a *fresh clone* of a template on every call (never a
template shared between calls or batch items); SIRF -> torch always copies. Batches are
looped over item by item. Outputs come back on the input's device and (floating) dtype;
SIRF itself computes in float32 on the CPU. Compared with SIRF's own ``sirf.torch``
(SIRF >= 3.10), which fills one shared template in place, keeps the output
``AcquisitionData`` for its backward and has no subsets, nothing here is kept between
calls but the (read-only) templates and models, so one model can serve many batch items
and many unrolled stages.

``import sirf.STIR`` happens only inside functions, so this module imports without SIRF;
building a model without SIRF raises ``ImportError`` with :data:`SIRF_MISSING_MESSAGE`.
"""
from __future__ import annotations

import os
import re
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..geometry import GeometryError, ImageGeometry, Scanner, Segment, SinogramGeometry, stir_view_symmetry, subset_views
from ..io.interfile import sinogram_geometry_from_header, write_image, write_projdata
from .base import AcquisitionModel

__all__ = [
    "SIRFAcquisitionModel",
    "SIRF_MISSING_MESSAGE",
    "from_sirf",
    "to_sirf_image",
    "to_sirf_acquisition",
    "image_geometry_from_sirf",
    "sinogram_geometry_from_sirf",
    "sinogram_geometry_from_stir_info",
    "image_origin_from_interfile_header",
]

SIRF_MISSING_MESSAGE = (
    "the SIRF backend needs sirf.STIR (SIRF >= 3.5); run inside the SIRF Docker image, see docker/README.md"
)

#: projector names accepted by :meth:`SIRFAcquisitionModel.from_pieces`
PROJECTORS = ("raytracing", "parallelproj")

SirfObject = Any  # sirf.STIR.ImageData / AcquisitionData / AcquisitionModel (not importable without SIRF)
SinogramTerm = Any  # sirf.STIR.AcquisitionData, torch.Tensor or numpy array of shape (T,S,V,N)


def _sirf_stir():
    """``sirf.STIR``, or ImportError naming the feature that needs it."""
    try:
        import sirf.STIR as pet
    except ImportError as err:
        raise ImportError(SIRF_MISSING_MESSAGE) from err
    return pet


# --------------------------------------------------------------------- conversions
def _to_float32_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def acq_shape(acq: SirfObject) -> tuple[int, int, int, int]:
    """(T,S,V,N) of AcquisitionData."""
    return _as_4d(_acquisition_dims(acq))


def _acquisition_dims(acq: SirfObject) -> tuple[int, ...]:
    """``dimensions()`` of AcquisitionData: (T,S,V,N) in SIRF >= 3.5, (S,V,N) before."""
    return tuple(int(d) for d in acq.dimensions())


def _as_4d(dims: tuple[int, ...]) -> tuple[int, int, int, int]:
    return tuple(dims) if len(dims) == 4 else (1,) + tuple(dims)  # type: ignore[return-value]


def to_sirf_image(tensor: torch.Tensor | np.ndarray, template: SirfObject) -> SirfObject:
    """A fresh ``sirf.STIR.ImageData`` (a clone of ``template``) filled with a (Z,Y,X) array."""
    pet = _sirf_stir()
    if not isinstance(template, pet.ImageData):
        raise TypeError(f"template must be sirf.STIR.ImageData, got {type(template).__name__}")
    arr = _to_float32_numpy(tensor)
    dims = tuple(int(d) for d in template.dimensions())
    if arr.shape != dims:
        raise ValueError(f"image has shape {arr.shape} (z,y,x); the SIRF image template has {dims}")
    out = template.clone()
    out.fill(arr)
    return out


def to_sirf_acquisition(tensor: torch.Tensor | np.ndarray, template: SirfObject) -> SirfObject:
    """A fresh ``sirf.STIR.AcquisitionData`` (a clone of ``template``) filled with a (T,S,V,N) array."""
    pet = _sirf_stir()
    if not isinstance(template, pet.AcquisitionData):
        raise TypeError(f"template must be sirf.STIR.AcquisitionData, got {type(template).__name__}")
    arr = _to_float32_numpy(tensor)
    dims = _acquisition_dims(template)
    if arr.shape != _as_4d(dims):
        raise ValueError(
            f"sinogram has shape {arr.shape} (tof, sinograms, views, tangential); "
            f"the SIRF acquisition template has {_as_4d(dims)}"
        )
    if len(dims) == 3:  # SIRF < 3.5 stores no TOF axis
        arr = arr[0]
    out = template.clone()
    out.fill(arr)
    return out


def from_sirf(obj: SirfObject) -> torch.Tensor:
    """A float32 CPU tensor copied from SIRF data: ImageData -> (Z,Y,X), AcquisitionData -> (T,S,V,N)."""
    pet = _sirf_stir()
    arr = np.array(obj.as_array(), dtype=np.float32, copy=True)
    if isinstance(obj, pet.AcquisitionData) and len(_acquisition_dims(obj)) == 3:
        arr = arr[np.newaxis]
    return torch.from_numpy(arr)


# --------------------------------------------------------------------- geometry
_KEY_VALUE = re.compile(r"^\s*(?P<key>[^:=]+?)\s*:=?\s*(?P<value>.*?)\s*$")
_RING_DIFFS = re.compile(r"ring differences per segment\s*:\s*((?:\(\s*-?\d+\s*,\s*-?\d+\s*\)\s*)+)", re.IGNORECASE)
_PAIR = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")


def _key_values(text: str) -> dict[str, str]:
    """``key := value`` and ``key: value`` lines, keys lower-cased with blanks collapsed (first wins)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _KEY_VALUE.match(line)
        if m:
            key = " ".join(m.group("key").lower().split())
            out.setdefault(key, m.group("value"))
    return out


def sinogram_geometry_from_stir_info(text: str) -> SinogramGeometry:
    """Sinogram geometry from STIR's ``ProjDataInfo::parameter_info()`` (what ``AcquisitionData.get_info()`` shows).

    Reads the scanner block (Interfile keys in cm, as in .hs headers), the
    ``ProjDataInfoCylindrical{Arc,NoArc}Corr :=`` line, ``Segment_num range``,
    ``Number of Views``, ``Number of axial positions per seg``, ``Number of tangential
    positions``, ``ring differences per segment`` and, for arc-corrected data,
    ``tangential sampling`` (mm). Raises :class:`GeometryError` naming what is missing.
    """
    kv = _key_values(text)

    def need(key: str) -> str:
        if key not in kv:
            raise GeometryError(f"STIR's description of the acquisition data has no '{key}' line")
        return kv[key]

    def number(key: str, cast=float, default=None):
        if key not in kv and default is not None:
            return default
        raw = need(key)
        try:
            return cast(raw.split()[0])
        except (ValueError, IndexError):
            raise GeometryError(f"STIR's '{key}' is {raw!r}; expected a number") from None

    if "projdatainfocylindricalarccorr" in kv:
        arc_corrected = True
    elif "projdatainfocylindricalnoarccorr" in kv:
        arc_corrected = False
    else:
        raise GeometryError(
            "acquisition data are not ProjDataInfoCylindricalArcCorr/NoArcCorr (block or generic geometries "
            "are not supported by the embedded projector)"
        )
    scanner = Scanner(
        name=kv.get("scanner type", "unknown"),
        num_rings=number("number of rings", int),
        num_detectors_per_ring=number("number of detectors per ring", int),
        inner_ring_radius_mm=number("inner ring diameter (cm)") * 10.0 / 2.0,
        average_depth_of_interaction_mm=number("average depth of interaction (cm)") * 10.0,
        ring_spacing_mm=number("distance between rings (cm)") * 10.0,
        default_bin_size_mm=number("default bin size (cm)") * 10.0,
        view_offset_deg=number("view offset (degrees)", float, 0.0),
        max_num_non_arccorrected_bins=number("maximum number of non-arc-corrected bins", int, 0),
        default_num_arccorrected_bins=number("default number of arc-corrected bins", int, 0),
    )
    seg_range = [int(v) for v in re.findall(r"-?\d+", need("segment_num range"))]
    if len(seg_range) != 2:
        raise GeometryError(f"STIR's 'Segment_num range' is {kv['segment_num range']!r}; expected '(min, max)'")
    seg_nums = list(range(seg_range[0], seg_range[1] + 1))
    axial = [int(v) for v in re.findall(r"-?\d+", need("number of axial positions per seg"))]
    m = _RING_DIFFS.search(text)
    if m is None:
        raise GeometryError("STIR's description of the acquisition data has no 'ring differences per segment' line")
    ring_diffs = [(int(a), int(b)) for a, b in _PAIR.findall(m.group(1))]
    if not len(axial) == len(ring_diffs) == len(seg_nums):
        raise GeometryError(
            f"STIR lists {len(seg_nums)} segments, {len(axial)} axial position counts and "
            f"{len(ring_diffs)} ring-difference ranges; they must agree"
        )
    num_tof = number("number of tof positions in data", int, 1)
    if arc_corrected:
        bin_size = number("tangential sampling")
    else:
        bin_size = scanner.default_bin_size_mm
    return SinogramGeometry(
        scanner=scanner,
        segments=tuple(Segment(n, lo, hi, k) for n, (lo, hi), k in zip(seg_nums, ring_diffs, axial)),
        num_views=number("number of views", int),
        num_tangential_poss=number("number of tangential positions", int),
        arc_corrected=arc_corrected,
        tangential_bin_size_mm=bin_size,
        num_tof_bins=num_tof,
    )


def sinogram_geometry_from_sirf(acq: SirfObject) -> SinogramGeometry:
    """The :class:`SinogramGeometry` of a ``sirf.STIR.AcquisitionData``.

    Parses ``acq.get_info()`` (STIR's parameter_info). If that text cannot be read,
    writes the data to a temporary Interfile and reads its header with
    :func:`sirf_fbsem.io.interfile.sinogram_geometry_from_header`. The result is
    checked against ``acq.dimensions()``.
    """
    pet = _sirf_stir()
    if not isinstance(acq, pet.AcquisitionData):
        raise TypeError(f"acq must be sirf.STIR.AcquisitionData, got {type(acq).__name__}")
    try:
        geom = sinogram_geometry_from_stir_info(acq.get_info())
    except GeometryError as info_err:
        geom = _sinogram_geometry_via_header(acq, info_err)
    dims = _as_4d(_acquisition_dims(acq))
    if tuple(geom.shape) != dims:
        raise GeometryError(
            f"geometry read from SIRF gives sinogram shape {geom.shape}; the data have {dims} "
            f"(tof, sinograms, views, tangential)"
        )
    return geom


def _sinogram_geometry_via_header(acq: SirfObject, info_err: GeometryError) -> SinogramGeometry:
    with tempfile.TemporaryDirectory(prefix="sirf_fbsem_") as tmp:
        header = Path(tmp) / "sinogram.hs"
        acq.write(str(header))
        return sinogram_geometry_from_header(header)


def image_origin_from_interfile_header(
    text: str, shape: tuple[int, int, int], voxel_size_mm: tuple[float, float, float]
) -> tuple[float, float, float]:
    """STIR origin (z, y, x) in mm from an Interfile image header STIR wrote.

    STIR writes ``first pixel offset (mm) [1,2,3] = origin + voxel_size * min_indices``
    for (x, y, z) with min_indices (-(nx//2), -(ny//2), 0); absent offsets mean origin 0
    (STIR's default). Rounded to 1e-3 mm, the precision STIR prints with.
    """
    offsets = {}
    for axis in (1, 2, 3):
        m = re.search(rf"first pixel offset \(mm\)\s*\[\s*{axis}\s*\]\s*:=\s*(\S+)", text, re.IGNORECASE)
        if m:
            try:
                offsets[axis] = float(m.group(1))
            except ValueError:
                raise GeometryError(f"image header: 'first pixel offset (mm) [{axis}]' is {m.group(1)!r}") from None
    if not offsets:
        return (0.0, 0.0, 0.0)
    nz, ny, nx = shape
    vz, vy, vx = voxel_size_mm
    origin_x = offsets.get(1, -(nx // 2) * vx) + (nx // 2) * vx
    origin_y = offsets.get(2, -(ny // 2) * vy) + (ny // 2) * vy
    origin_z = offsets.get(3, 0.0)
    return tuple(round(v, 3) + 0.0 for v in (origin_z, origin_y, origin_x))  # type: ignore[return-value]


def image_geometry_from_sirf(image: SirfObject) -> ImageGeometry:
    """The :class:`ImageGeometry` of a ``sirf.STIR.ImageData``: dimensions(), voxel_sizes() and STIR's origin.

    The origin is read from the Interfile header STIR writes for the image (into a
    temporary folder), since SIRF has no getter for STIR's origin.
    """
    pet = _sirf_stir()
    if not isinstance(image, pet.ImageData):
        raise TypeError(f"image must be sirf.STIR.ImageData, got {type(image).__name__}")
    shape = tuple(int(n) for n in image.dimensions())
    vsize = tuple(float(v) for v in image.voxel_sizes())
    with tempfile.TemporaryDirectory(prefix="sirf_fbsem_") as tmp:
        image.write(str(Path(tmp) / "image.hv"))
        headers = sorted(Path(tmp).glob("*.hv"))
        if not headers:
            raise GeometryError(f"ImageData.write wrote no Interfile header (.hv) into {tmp}; cannot read the origin")
        header = headers[0].read_text(errors="replace")
    origin = image_origin_from_interfile_header(header, shape, vsize)  # type: ignore[arg-type]
    return ImageGeometry(shape, vsize, origin)  # type: ignore[arg-type]


def sirf_templates(sinogram_geometry: SinogramGeometry, image_geometry: ImageGeometry) -> tuple[SirfObject, SirfObject]:
    """``sirf.STIR`` (AcquisitionData, ImageData) templates of our geometries, held in memory.

    Both are written as Interfile by the package's own writer (the same headers STIR
    reads from scanner exports) into a temporary folder, read by SIRF, and copied into
    memory-backed objects before the folder goes; SIRF's storage scheme is restored.
    """
    pet = _sirf_stir()
    with tempfile.TemporaryDirectory(prefix="sirf_fbsem_") as tmp, _memory_storage(pet):
        sino_path, image_path = Path(tmp) / "template.hs", Path(tmp) / "template.hv"
        write_projdata(sino_path, sinogram_geometry, np.zeros(sinogram_geometry.shape, dtype=np.float32))
        write_image(image_path, image_geometry, np.zeros(image_geometry.shape, dtype=np.float32))
        acq = _in_memory(pet, pet.AcquisitionData(str(sino_path)))
        image = pet.ImageData(str(image_path)).clone()
    return acq, image


class _memory_storage:
    """Context: SIRF's AcquisitionData storage scheme is ``'memory'`` inside, the caller's after."""

    def __init__(self, pet: Any):
        self.pet = pet
        self.saved = "memory"

    def __enter__(self) -> None:
        self.saved = self.pet.AcquisitionData.get_storage_scheme()
        if self.saved != "memory":
            self.pet.AcquisitionData.set_storage_scheme("memory")

    def __exit__(self, *exc: Any) -> None:
        if self.saved != "memory":
            self.pet.AcquisitionData.set_storage_scheme(self.saved)


def _in_memory(pet: Any, acq: SirfObject) -> SirfObject:
    """A memory-backed copy of AcquisitionData (call inside :class:`_memory_storage`).

    File-backed data (SIRF's default ``'file'`` scheme, or data read from a file) cannot
    give subsets (``get_subset`` fails in STIR's Interfile writer); a copy made while the
    scheme is ``'memory'`` can.
    """
    out = acq.get_uniform_copy(0.0)
    out.fill(acq)
    return out


# --------------------------------------------------------------------- model factories
def _ray_tracing_model(num_tangential_LORs: int):
    pet = _sirf_stir()
    am = pet.AcquisitionModelUsingRayTracingMatrix()
    am.set_num_tangential_LORs(int(num_tangential_LORs))
    return am


def _parallelproj_model():
    pet = _sirf_stir()
    cls = getattr(pet, "AcquisitionModelUsingParallelproj", None)
    if cls is None:
        raise ValueError("projector 'parallelproj': this SIRF was built without parallelproj")
    return cls()


def _factory_like(am: SirfObject) -> Callable[[], SirfObject]:
    """A callable returning fresh, not set-up models of the same kind as ``am``."""
    pet = _sirf_stir()
    if isinstance(am, pet.AcquisitionModelUsingRayTracingMatrix):
        return partial(_ray_tracing_model, int(am.get_num_tangential_LORs()))
    pp = getattr(pet, "AcquisitionModelUsingParallelproj", None)
    if pp is not None and isinstance(am, pp):
        return _parallelproj_model
    raise TypeError(
        f"cannot rebuild a {type(am).__name__} for each subset; pass model_factory= "
        f"(a callable that returns a fresh, not set-up sirf.STIR acquisition model of that kind)"
    )


# --------------------------------------------------------------------- terms
def _factors_from(sensitivity: Any, acq_template: SirfObject) -> SirfObject | None:
    """Multiplicative factors S as AcquisitionData, from factors, a sensitivity model or a norm file."""
    pet = _sirf_stir()
    if sensitivity is None:
        return None
    if isinstance(sensitivity, pet.AcquisitionData):
        if _acquisition_dims(sensitivity) != _acquisition_dims(acq_template):
            raise ValueError(
                f"acquisition_sensitivity has shape {_acquisition_dims(sensitivity)}; "
                f"the acquisition template has {_acquisition_dims(acq_template)}"
            )
        return sensitivity
    if isinstance(sensitivity, (str, os.PathLike)):
        sensitivity = pet.AcquisitionSensitivityModel(str(sensitivity))
    if isinstance(sensitivity, pet.AcquisitionSensitivityModel):
        # S of the model's forward, evaluated once on a uniform sinogram
        sensitivity.set_up(acq_template)
        return sensitivity.forward(acq_template.get_uniform_copy(1.0))
    raise TypeError(
        "acquisition_sensitivity must be None, sirf.STIR.AcquisitionData (the factors), "
        f"sirf.STIR.AcquisitionSensitivityModel or a normalisation file name; got {type(sensitivity).__name__}"
    )


def _term_tensor(term: SinogramTerm | None, name: str, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    if term is None:
        return None
    pet = _sirf_stir()
    t = from_sirf(term) if isinstance(term, pet.AcquisitionData) else torch.as_tensor(term, dtype=torch.float32)
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape} (tof, sinograms, views, tangential)")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    if (t < 0).any():
        raise ValueError(f"{name} has negative values (min {float(t.min()):g}); expected >= 0 counts")
    return t.clone()


# --------------------------------------------------------------------- the model
_KEEP = object()  # SIRFAcquisitionModel._copy: leave this part as it is


class SIRFAcquisitionModel(AcquisitionModel):
    """PET acquisition model computed by ``sirf.STIR`` (see the module docstring for the equation).

    Build it with :meth:`from_acquisition_model` (an existing SIRF model) or
    :meth:`from_pieces`. The constructor takes the pieces already in SIRF form:

    Args:
        acquisition_template: ``sirf.STIR.AcquisitionData`` of the full sinogram (only its
            geometry is used; never modified).
        image_template: ``sirf.STIR.ImageData`` giving the image geometry (never modified).
        model_factory: callable returning a fresh, not set-up ``sirf.STIR`` acquisition
            model (ray tracing, parallelproj, ...); one is made per subset.
        multiplicative_factors: ``AcquisitionData`` of S (norm x attenuation) or None (S = 1).
        constant_term: tensor (T,S,V,N) of ``c = S a + b`` in counts, or None (0).
        image_data_processor: optional ``sirf.STIR.ImageDataProcessor`` for P (PSF).
        num_subsets: views v with v % num_subsets == s form subset s.

    Storage: SIRF's AcquisitionData storage scheme is left as the caller set it (SIRF's
    default ``'file'`` included). The model keeps memory-backed copies of the templates and
    factors, and switches the scheme to ``'memory'`` only while it makes SIRF objects
    (subsets, conversions), restoring it afterwards; file-backed data cannot give
    subsets, and file-backed scratch data would make every conversion touch the disk.

    Memory: the full factors and the constant term (one sinogram each), plus per-subset
    templates and factors (one more of each in all), plus what each SIRF model caches.
    """

    def __init__(
        self,
        acquisition_template: SirfObject,
        image_template: SirfObject,
        *,
        model_factory: Callable[[], SirfObject],
        multiplicative_factors: SirfObject | None = None,
        constant_term: torch.Tensor | None = None,
        image_data_processor: SirfObject | None = None,
        num_subsets: int = 1,
        device: str | torch.device = "cpu",
    ):
        pet = _sirf_stir()
        if not isinstance(acquisition_template, pet.AcquisitionData):
            raise TypeError(
                f"acquisition_template must be sirf.STIR.AcquisitionData, got {type(acquisition_template).__name__}"
            )
        if not isinstance(image_template, pet.ImageData):
            raise TypeError(f"image_template must be sirf.STIR.ImageData, got {type(image_template).__name__}")
        if not callable(model_factory):
            raise TypeError(f"model_factory must be callable, got {type(model_factory).__name__}")
        if multiplicative_factors is not None and not isinstance(multiplicative_factors, pet.AcquisitionData):
            raise TypeError(
                f"multiplicative_factors must be sirf.STIR.AcquisitionData or None, "
                f"got {type(multiplicative_factors).__name__}"
            )
        with _memory_storage(pet):
            acquisition_template = _in_memory(pet, acquisition_template)
            if multiplicative_factors is not None:
                multiplicative_factors = _in_memory(pet, multiplicative_factors)
        self.image_template = image_template
        self.image_shape = tuple(int(n) for n in image_template.dimensions())  # type: ignore[assignment]
        self.sinogram_shape = _as_4d(_acquisition_dims(acquisition_template))
        subset_views(self.sinogram_shape[2], num_subsets, 0)  # validates num_subsets
        self.num_subsets = int(num_subsets)
        if constant_term is not None:
            constant_term = _term_tensor(constant_term, "constant_term", self.sinogram_shape)
        self._acq_template = acquisition_template
        self._factory = model_factory
        self._factors = multiplicative_factors
        self._constant = constant_term
        self._processor = image_data_processor
        self._templates: dict[int | None, SirfObject] = {None: acquisition_template}
        self._models: dict[int | None, SirfObject] = {}
        self._device = torch.device(device)
        self._image_geometry: ImageGeometry | None = None
        self._sinogram_geometry: SinogramGeometry | None = None
        self._view_symmetry: str | None = None

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_acquisition_model(
        cls,
        acquisition_model: SirfObject,
        acquisition_template: SirfObject,
        image_template: SirfObject,
        num_subsets: int = 1,
        *,
        model_factory: Callable[[], SirfObject] | None = None,
        image_data_processor: SirfObject | None = None,
    ) -> "SIRFAcquisitionModel":
        """Wrap a ``sirf.STIR`` acquisition model (set up, or at least configured).

        Its sensitivity model, additive and background terms are taken from the SIRF
        object (``asm``/``at``/``bt``, which SIRF's Python class keeps when they are set);
        the full factors S are ``asm.forward`` of a uniform sinogram, computed once, and
        the constant term is ``get_constant_term()``. Ray-tracing (with its number of
        tangential LORs) and parallelproj models are rebuilt per subset automatically;
        other kinds need ``model_factory``. A PSF set with ``set_image_data_processor``
        cannot be read back from SIRF: pass it again as ``image_data_processor``.
        """
        pet = _sirf_stir()
        if not isinstance(acquisition_model, pet.AcquisitionModel):
            raise TypeError(
                f"acquisition_model must be a sirf.STIR acquisition model, got {type(acquisition_model).__name__}"
            )
        if acquisition_model.const:
            raise ValueError(
                "acquisition_model is the result of get_linear_acquisition_model(), whose sensitivity model SIRF "
                "does not expose: pass the acquisition model itself"
            )
        if not isinstance(acquisition_template, pet.AcquisitionData):
            raise TypeError(
                f"acquisition_template must be sirf.STIR.AcquisitionData, got {type(acquisition_template).__name__}"
            )
        factory = model_factory if model_factory is not None else _factory_like(acquisition_model)
        factors = _factors_from(acquisition_model.asm, acquisition_template)
        constant = None
        if acquisition_model.at is not None or acquisition_model.bt is not None:
            if acquisition_model.acq_templ is None:
                acquisition_model.set_up(acquisition_template, image_template)
            constant = from_sirf(acquisition_model.get_constant_term())
        return cls(
            acquisition_template,
            image_template,
            model_factory=factory,
            multiplicative_factors=factors,
            constant_term=constant,
            image_data_processor=image_data_processor,
            num_subsets=num_subsets,
        )

    @classmethod
    def from_pieces(
        cls,
        acquisition_template: SirfObject,
        image_template: SirfObject,
        acquisition_sensitivity: Any = None,
        additive: SinogramTerm | None = None,
        background: SinogramTerm | None = None,
        projector: str = "raytracing",
        num_tangential_LORs: int = 5,
        num_subsets: int = 1,
        *,
        image_data_processor: SirfObject | None = None,
    ) -> "SIRFAcquisitionModel":
        """Build from SIRF data: ``ybar = S (G P x + additive) + background``.

        Args:
            acquisition_template, image_template: SIRF templates (geometry only).
            acquisition_sensitivity: S as ``AcquisitionData`` of factors, an
                ``AcquisitionSensitivityModel`` (norm file, attenuation, or a chain), a
                normalisation file name, or None.
            additive: a (counts before S; ``AcquisitionData`` or a (T,S,V,N) array), or None.
            background: b (counts after S), or None.
            projector: ``'raytracing'`` (``AcquisitionModelUsingRayTracingMatrix``) or
                ``'parallelproj'`` (if SIRF was built with it).
            num_tangential_LORs: rays per bin of the ray tracer (5, as SIRF-Contribs'
                partitioner and PETRIC use; STIR's own default of 1 aliases more).
            num_subsets: OSEM subsets by view.
        """
        pet = _sirf_stir()
        if not isinstance(acquisition_template, pet.AcquisitionData):
            raise TypeError(
                f"acquisition_template must be sirf.STIR.AcquisitionData, got {type(acquisition_template).__name__}"
            )
        if projector == "raytracing":
            if int(num_tangential_LORs) < 1:
                raise ValueError(f"num_tangential_LORs must be >= 1, got {num_tangential_LORs}")
            factory: Callable[[], SirfObject] = partial(_ray_tracing_model, int(num_tangential_LORs))
        elif projector == "parallelproj":
            if getattr(pet, "AcquisitionModelUsingParallelproj", None) is None:
                raise ValueError("projector 'parallelproj': this SIRF was built without parallelproj")
            factory = _parallelproj_model
        else:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
        shape = _as_4d(_acquisition_dims(acquisition_template))
        factors = _factors_from(acquisition_sensitivity, acquisition_template)
        a = _term_tensor(additive, "additive", shape)
        b = _term_tensor(background, "background", shape)
        constant = None
        if a is not None:
            constant = a * from_sirf(factors) if factors is not None else a
        if b is not None:
            constant = b if constant is None else constant + b
        return cls(
            acquisition_template,
            image_template,
            model_factory=factory,
            multiplicative_factors=factors,
            constant_term=constant,
            image_data_processor=image_data_processor,
            num_subsets=num_subsets,
        )

    @classmethod
    def from_geometry(
        cls,
        sinogram_geometry: SinogramGeometry,
        image_geometry: ImageGeometry,
        *,
        num_subsets: int = 1,
        multiplicative: Any = None,
        additive: Any = None,
        psf_fwhm_mm: Any = None,
        num_tangential_LORs: int = 1,
        device: str | torch.device = "cpu",
    ) -> "SIRFAcquisitionModel":
        """SIRF's ray-tracing model for the package's geometries and (T,S,V,N) arrays of terms.

        ``ybar = S (G P x) + b`` with S = ``multiplicative`` (None: 1), b = ``additive``
        (counts, None: 0), P a SIRF ``SeparableGaussianImageFilter`` of ``psf_fwhm_mm``
        (z, y, x) when given. One tangential LOR by default: the ray tracing the embedded
        projector reproduces (``--backend sirf`` gives the embedded backend's numbers).
        """
        pet = _sirf_stir()
        acq, image = sirf_templates(sinogram_geometry, image_geometry)
        factors = None
        if multiplicative is not None:
            with _memory_storage(pet):
                factors = to_sirf_acquisition(_term_tensor(multiplicative, "multiplicative", acq_shape(acq)), acq)
        processor = None
        if psf_fwhm_mm is not None and np.any(np.asarray(psf_fwhm_mm, dtype=float) > 0):
            fwhm = np.broadcast_to(np.asarray(psf_fwhm_mm, dtype=np.float32), (3,))
            processor = pet.SeparableGaussianImageFilter()
            processor.set_fwhms(tuple(float(v) for v in fwhm))
        model = cls(
            acq, image,
            model_factory=partial(_ray_tracing_model, int(num_tangential_LORs)),
            constant_term=None if additive is None else _term_tensor(additive, "additive", acq_shape(acq)),
            image_data_processor=processor,
            num_subsets=num_subsets,
            device=device,
        )
        model._image_geometry, model._sinogram_geometry = image_geometry, sinogram_geometry
        return model if factors is None else model._copy(multiplicative_factors=factors)  # factors: made in memory

    # ------------------------------------------------------------------ geometry, device
    @property
    def image_geometry(self) -> ImageGeometry:
        """The :class:`ImageGeometry` of the image template (read from SIRF once)."""
        if self._image_geometry is None:
            self._image_geometry = image_geometry_from_sirf(self.image_template)
        return self._image_geometry

    @property
    def sinogram_geometry(self) -> SinogramGeometry:
        """The :class:`SinogramGeometry` of the acquisition template (read from SIRF once)."""
        if self._sinogram_geometry is None:
            self._sinogram_geometry = sinogram_geometry_from_sirf(self._acq_template)
        return self._sinogram_geometry

    @property
    def device(self) -> torch.device:
        """Where results are returned (SIRF itself computes on the CPU)."""
        return self._device

    def _copy(self, *, num_subsets: int | None = None, multiplicative_factors: Any = _KEEP,
              constant_term: Any = _KEEP, device: str | torch.device | None = None) -> "SIRFAcquisitionModel":
        """This model with some of its parts changed, sharing the rest without copying.

        The memory-backed templates and factors made by the constructor are shared, and so are
        the subset templates and SIRF models that stay valid (models depend on the factors and
        the subsets). ``multiplicative_factors`` must already be memory-backed AcquisitionData
        (or None); ``constant_term`` a checked tensor (or None).
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.pop("_sens_cache", None)
        new.__dict__.pop("_support_projection_cache", None)
        new._templates, new._models = dict(self._templates), dict(self._models)
        if num_subsets is not None and int(num_subsets) != self.num_subsets:
            subset_views(self.sinogram_shape[2], num_subsets, 0)  # validates num_subsets
            new.num_subsets = int(num_subsets)
            new._templates = {None: self._acq_template}
            new._models = {k: v for k, v in self._models.items() if k is None}
        if multiplicative_factors is not _KEEP:
            new._factors, new._models = multiplicative_factors, {}
        if constant_term is not _KEEP:
            new._constant = constant_term
        if device is not None:
            new._device = torch.device(device)
        return new

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "SIRFAcquisitionModel":
        """The same model returning results on ``device`` (SIRF computes in float32 on the CPU)."""
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"the SIRF backend computes in float32; dtype {dtype} is not available")
        return self._copy(device=device)

    def with_terms(self, multiplicative: Any = None, additive: Any = None) -> "SIRFAcquisitionModel":
        """The same geometry and subsets with other factors S and additive term b ((T,S,V,N) each, or None).

        Per-sample terms (B,T,S,V,N) are not available on the SIRF backend (one SIRF model
        holds one set of factors); a batch of one is accepted.
        """
        pet = _sirf_stir()
        factors = None
        if multiplicative is not None:
            with _memory_storage(pet):
                factors = to_sirf_acquisition(self._one_term(multiplicative, "multiplicative"), self._acq_template)
        constant = None if additive is None else self._one_term(additive, "additive")
        return self._copy(multiplicative_factors=factors, constant_term=constant)

    def _one_term(self, term: Any, name: str) -> torch.Tensor:
        """A (T,S,V,N) float32 tensor from a (T,S,V,N) or (1,T,S,V,N) term (checked: finite, >= 0)."""
        t = torch.as_tensor(term)
        if t.dim() == 5:
            if t.shape[0] != 1:
                raise ValueError(f"the SIRF backend takes one {name} term, not a batch of {t.shape[0]}; "
                                 "loop over the samples (train with --batch-size 1)")
            t = t[0]
        return _term_tensor(t, name, self.sinogram_shape)

    # ------------------------------------------------------------------ SIRF objects
    def _key(self, subset: int | None) -> int | None:
        """None when the subset is the whole sinogram (then the full template and model serve)."""
        if subset is None or self.num_subsets == 1:
            if subset is not None:
                subset_views(self.sinogram_shape[2], 1, subset)  # validates subset == 0
            return None
        return int(subset)

    def acquisition_template(self, subset: int | None = None) -> SirfObject:
        """The ``AcquisitionData`` template of a subset (``get_subset`` of the full one); never modify it."""
        key = self._key(subset)
        if key not in self._templates:
            views = [int(v) for v in self.subset_views(key)]
            with _memory_storage(_sirf_stir()):
                self._templates[key] = self._acq_template.get_subset(views)
        return self._templates[key]

    def sirf_model(self, subset: int | None = None) -> SirfObject:
        """The linear ``sirf.STIR`` model ``A_s = S_s G_s P`` of a subset, set up on its own template."""
        key = self._key(subset)
        if key not in self._models:
            pet = _sirf_stir()
            with _memory_storage(pet):
                self._models[key] = self._new_sirf_model(pet, key)
        return self._models[key]

    def _new_sirf_model(self, pet: Any, key: int | None) -> SirfObject:
        """A set-up SIRF model of one subset (call with the storage scheme at 'memory')."""
        am = self._factory()
        template = self.acquisition_template(key)
        if self._factors is not None:
            views = self.subset_views(key)
            factors = self._factors if key is None else self._factors.get_subset([int(v) for v in views])
            asm = pet.AcquisitionSensitivityModel(factors)  # S from bin factors (SIRF inverts them once)
            asm.set_up(template)
            am.set_acquisition_sensitivity(asm)
        if self._processor is not None:
            am.set_image_data_processor(self._processor)
        am.set_up(template, self.image_template)
        return am

    def multiplicative_factors(self, subset: int | None = None) -> torch.Tensor | None:
        """S of a subset as a tensor (T,S,V_s,N), or None when S = 1."""
        if self._factors is None:
            return None
        return self.take_subset(from_sirf(self._factors), subset)

    # ------------------------------------------------------------------ contract
    @property
    def view_symmetry(self) -> str:
        """STIR's view symmetries of this sinogram and image (they decide the subsets, as in SIRF's OSEM)."""
        if self._view_symmetry is None:
            self._view_symmetry = stir_view_symmetry(self.sinogram_geometry, self.image_geometry)
        return self._view_symmetry

    def subset_views(self, subset: int | None) -> np.ndarray:
        if subset is None:
            return np.arange(self.sinogram_shape[2])
        return subset_views(self.sinogram_shape[2], self.num_subsets, subset, self.view_symmetry)

    def with_num_subsets(self, num_subsets: int) -> "SIRFAcquisitionModel":
        return self._copy(num_subsets=num_subsets)

    @staticmethod
    def _out_dtype(t: torch.Tensor) -> torch.dtype:
        return t.dtype if t.is_floating_point() else torch.float32

    def direct(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """``A_s x``: (Z,Y,X) or (B,Z,Y,X) -> (T,S,V_s,N) or (B,T,S,V_s,N)."""
        xb, single = self.as_batch(x, self.image_shape, "image (z,y,x)")
        model = self.sirf_model(subset)
        with _memory_storage(_sirf_stir()):
            out = [from_sirf(model.direct(to_sirf_image(item, self.image_template))) for item in xb]
        y = torch.stack(out).to(device=x.device, dtype=self._out_dtype(x))
        return y[0] if single else y

    def adjoint(self, y: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """``A_s^T y``: (T,S,V_s,N) or (B,T,S,V_s,N) -> (Z,Y,X) or (B,Z,Y,X)."""
        yb, single = self.as_batch(y, self.subset_sinogram_shape(subset), f"sinogram of subset {subset}")
        model = self.sirf_model(subset)
        template = self.acquisition_template(subset)
        with _memory_storage(_sirf_stir()):
            out = [from_sirf(model.adjoint(to_sirf_acquisition(item, template))) for item in yb]
        x = torch.stack(out).to(device=y.device, dtype=self._out_dtype(y))
        return x[0] if single else x

    def additive_term(self, subset: int | None = None) -> torch.Tensor:
        """``c_s = S_s a_s + b_s`` (counts), (T,S,V_s,N), float32 on the CPU."""
        if self._constant is None:
            return torch.zeros(self.subset_sinogram_shape(subset), dtype=torch.float32, device=self._device)
        return self.take_subset(self._constant, subset).to(self._device)

    def forward(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """``A_s x + c_s`` on the input's device and dtype."""
        y = self.direct(x, subset)
        return y + self.additive_term(subset).to(device=y.device, dtype=y.dtype)

    def __repr__(self) -> str:
        return (
            f"SIRFAcquisitionModel(sinogram {self.sinogram_shape} (T,S,V,N); image {self.image_shape} (z,y,x); "
            f"{self.num_subsets} subsets; factors={'yes' if self._factors is not None else 'no'}; "
            f"constant term={'yes' if self._constant is not None else 'no'})"
        )
