"""Training data on disk: one ``sample_NNNNN.pt`` per simulated acquisition, and a ``manifest.json``.

Sample file contract: ``torch.save`` of :meth:`~sirf_fbsem.samples.Sample.to_dict` with every
field of :class:`~sirf_fbsem.samples.Sample` set (:data:`SAMPLE_KEYS`; tensors and plain numbers
only, so ``torch.load(path, weights_only=True)`` reads it); :func:`load_sample` and the dataset
give it back as a :class:`~sirf_fbsem.samples.Sample`.

The targets start from :func:`.targets.default_initial_image` (1 where some LOR sees the voxel)
rescaled by the count-matched rule of the networks' stage 0 (manifest ``initial_image``:
``"support_count_matched"``; ``"support"`` in datasets made before 0.4, without the rescaling)
and use the subsets 0, 1, 2, ... of the model with ``num_subsets`` subsets.

``manifest.json`` holds the geometries (:func:`~sirf_fbsem.geometry.sinogram_geometry_to_dict`,
:func:`~sirf_fbsem.geometry.image_geometry_to_dict`), the simulation settings, the seeds
and ``files``, the completed samples. Samples and manifest are written atomically
(the manifest after every sample), so an interrupted run resumes where it stopped
and, as sample ``i`` always draws from ``numpy.random.SeedSequence([seed, i])``,
produces the same files as an uninterrupted one (on the same machine and device).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import InputError
from ..geometry import (
    GeometryError,
    ImageGeometry,
    SinogramGeometry,
    geometry_mismatch,
    image_geometry_from_dict,
    image_geometry_to_dict,
    sinogram_geometry_from_dict,
    sinogram_geometry_to_dict,
)
from ..io.atomic import atomic_path
from ..projectors.base import PROJECTION_UNITS, AcquisitionModel
from ..projectors.factory import make_acquisition_model
from ..samples import Sample, SampleError
from .acquisition import AcquisitionParameters, simulate_acquisition
from .phantoms import PHANTOM_KINDS, PhantomParameters, make_phantom
from .targets import START_RULE_OF_DATASET, osem_targets

__all__ = [
    "SimulationConfig",
    "FBSEMSampleDataset",
    "open_datasets",
    "DatasetError",
    "simulate_dataset",
    "simulate_sample",
    "load_manifest",
    "manifest_start_rule",
    "load_sample",
    "sample_filename",
    "MANIFEST_NAME",
    "FORMAT",
    "SAMPLE_KEYS",
]

MANIFEST_NAME = "manifest.json"
#: manifest "format" value; bump when the sample contract changes
FORMAT = "sirf_fbsem.simulation/1"
#: keys of every sample file: every field of :class:`~sirf_fbsem.samples.Sample`
SAMPLE_KEYS = tuple(f.name for f in dataclasses.fields(Sample))
_SEED_RULE = "numpy.random.SeedSequence([seed, index]).spawn(2) -> (phantom, acquisition) generators"
# manifest keys that must agree before a run may add samples to an existing directory
_SETTINGS_KEYS = (
    "format",
    "sinogram_geometry",
    "image_geometry",
    "num_subsets",
    "num_stages",
    "counts",
    "randoms_fraction",
    "scatter_fraction",
    "phantom",
    "acquisition",
    "phantom_parameters",
    "psf_fwhm_mm",
    "seed",
    "initial_image",
)


class DatasetError(InputError):
    """A dataset directory, manifest or sample file that is missing, inconsistent or malformed."""


@dataclass(frozen=True)
class SimulationConfig:
    """Everything but the geometry and the seed that decides a simulated dataset.

    Attributes:
        num_subsets: OSEM subsets of the targets (and of the network's stages).
        num_stages: K, the OSEM sub-iterates stored as targets.
        phantom: "procedural", "mni152", or "mixed" (sample ``i``: MNI152-based when ``i // 2`` is
            even, procedural when odd, so that two cycled count levels meet both kinds).
        acquisition: counts, randoms/scatter fractions, normalisation, ...
        count_levels: expected total prompts per sample, cycled by sample index (sample ``i``
            has ``count_levels[i % len(count_levels)]``); empty: ``acquisition.counts`` for all.
        phantom_parameters: ranges the phantoms are drawn from.
        psf_fwhm_mm: image-space PSF of the model (None: none); used for the data and the targets.
        mni152_templates: a file of the MNI152 templates (:func:`.phantoms.save_mni152_templates`) to read
            instead of nilearn's; not a setting of the data (the same templates give the same phantoms),
            so not in the manifest.
    """

    num_subsets: int = 4
    num_stages: int = 8
    phantom: str = "procedural"
    acquisition: AcquisitionParameters = field(default_factory=AcquisitionParameters)
    phantom_parameters: PhantomParameters = field(default_factory=PhantomParameters)
    psf_fwhm_mm: float | tuple[float, float, float] | None = None
    count_levels: tuple[float, ...] = ()
    mni152_templates: str | None = None

    def __post_init__(self) -> None:
        if int(self.num_subsets) != self.num_subsets or self.num_subsets < 1:
            raise ValueError(f"num_subsets must be a positive integer, got {self.num_subsets}")
        if int(self.num_stages) != self.num_stages or self.num_stages < 1:
            raise ValueError(f"num_stages must be a positive integer, got {self.num_stages}")
        if self.phantom not in PHANTOM_KINDS + ("mixed",):
            raise ValueError(f"phantom must be one of {PHANTOM_KINDS + ('mixed',)}, got {self.phantom!r}")
        object.__setattr__(self, "count_levels", tuple(float(c) for c in self.count_levels))
        for c in self.count_levels:
            AcquisitionParameters(counts=c)  # the same check as a single level

    def phantom_of(self, index: int) -> str:
        """The phantom kind of sample ``index``."""
        if self.phantom != "mixed":
            return self.phantom
        return "mni152" if (index // 2) % 2 == 0 else "procedural"

    def acquisition_of(self, index: int) -> AcquisitionParameters:
        """The acquisition settings of sample ``index`` (its count level)."""
        if not self.count_levels:
            return self.acquisition
        return dataclasses.replace(self.acquisition, counts=self.count_levels[index % len(self.count_levels)])

    def model(
        self, sinogram_geometry: SinogramGeometry, image_geometry: ImageGeometry, device: str | torch.device = "cpu",
        backend: str = "embedded",
    ) -> AcquisitionModel:
        """The acquisition model (geometry, subsets, PSF) the samples are simulated with, on ``backend``."""
        return make_acquisition_model(
            backend,
            sinogram_geometry,
            image_geometry,
            num_subsets=self.num_subsets,
            psf_fwhm_mm=self.psf_fwhm_mm,
            device=device,
        )


def sample_filename(index: int) -> str:
    return f"sample_{index:05d}.pt"


def _generators(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    phantom_ss, acquisition_ss = np.random.SeedSequence([int(seed), int(index)]).spawn(2)
    return np.random.default_rng(phantom_ss), np.random.default_rng(acquisition_ss)


def simulate_sample(model: AcquisitionModel, config: SimulationConfig, seed: int, index: int) -> Sample:
    """One sample (every field set; tensors on the CPU), from seed (seed, index).

    ``model`` gives the geometry, subsets, PSF and device; it should be ``config.model(...)``.
    """
    if model.num_subsets != config.num_subsets:
        raise ValueError(f"the model has {model.num_subsets} subsets; the config asks for {config.num_subsets}")
    phantom_rng, acquisition_rng = _generators(seed, index)
    phantom = make_phantom(config.phantom_of(index), model.image_geometry, phantom_rng, config.phantom_parameters,
                           config.mni152_templates)
    acq = simulate_acquisition(phantom, model, config.acquisition_of(index), acquisition_rng)
    sample_model = acq.acquisition_model(model)
    targets = osem_targets(sample_model, acq.noise_free, config.num_stages)
    sensitivity = torch.stack([sample_model.sensitivity(s) for s in range(config.num_subsets)])

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=torch.float32).contiguous()

    return Sample(
        prompts=cpu(acq.prompts),
        multiplicative=cpu(acq.multiplicative),
        additive=cpu(acq.additive),
        sensitivity=cpu(sensitivity),
        targets=cpu(targets),
        phantom=cpu(acq.activity),
        anatomical=torch.from_numpy(np.ascontiguousarray(phantom.anatomical, dtype=np.float32)),
        mu_map=torch.from_numpy(np.ascontiguousarray(phantom.mu_map, dtype=np.float32)),
        lesion_mask=torch.from_numpy(np.ascontiguousarray(phantom.lesion_mask, dtype=np.int8)),
        counts=float(acq.counts),
        seed=int(seed),
        index=int(index),
        activity_scale=float(acq.activity_scale),
    )


# ============================================================================ manifest
def _settings(
    sinogram_geometry: SinogramGeometry, image_geometry: ImageGeometry, config: SimulationConfig, seed: int
) -> dict[str, Any]:
    psf = config.psf_fwhm_mm
    return {
        "format": FORMAT,
        "sinogram_geometry": sinogram_geometry_to_dict(sinogram_geometry),
        "image_geometry": image_geometry_to_dict(image_geometry),
        "num_subsets": int(config.num_subsets),
        "num_stages": int(config.num_stages),
        "counts": list(config.count_levels) if config.count_levels else float(config.acquisition.counts),
        "randoms_fraction": float(config.acquisition.randoms_fraction),
        "scatter_fraction": float(config.acquisition.scatter_fraction),
        "phantom": config.phantom,
        "acquisition": config.acquisition.as_dict(),
        "phantom_parameters": config.phantom_parameters.as_dict(),
        "psf_fwhm_mm": list(psf) if isinstance(psf, (tuple, list)) else psf,
        "seed": int(seed),
        "initial_image": "support_count_matched",
    }


def _json_roundtrip(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _write_manifest(directory: Path, manifest: dict) -> None:
    with atomic_path(directory / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def load_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``directory/manifest.json``; errors name the file."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(f"no dataset manifest {str(path)!r}: simulate the dataset first (sirf-fbsem simulate)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"dataset manifest {str(path)!r} cannot be read: {err}") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"dataset manifest {str(path)!r} is not a JSON object")
    missing = [k for k in _SETTINGS_KEYS + ("files",) if k not in manifest]
    if missing:
        raise DatasetError(f"dataset manifest {str(path)!r} lacks keys {missing}")
    if manifest["format"] != FORMAT:
        raise DatasetError(f"dataset manifest {str(path)!r} has format {manifest['format']!r}; expected {FORMAT!r}")
    try:
        sinogram_geometry_from_dict(manifest["sinogram_geometry"])
        image_geometry_from_dict(manifest["image_geometry"])
    except GeometryError as err:
        raise DatasetError(f"dataset manifest {str(path)!r}: {err}") from None
    if not isinstance(manifest["files"], list) or not all(isinstance(f, str) for f in manifest["files"]):
        raise DatasetError(f"dataset manifest {str(path)!r}: 'files' must be a list of file names")
    return manifest


def manifest_start_rule(manifest: Mapping[str, Any], directory: str | os.PathLike) -> str:
    """The start rule a dataset's targets were made with (:attr:`sirf_fbsem.model.fbsem.FBSEMNet.start_rule`),
    from its manifest's ``initial_image`` (``directory``: named in the error)."""
    rule = manifest.get("initial_image", "support")
    if rule not in START_RULE_OF_DATASET:
        raise DatasetError(f"dataset {str(Path(directory) / MANIFEST_NAME)!r}: unknown initial_image {rule!r}; "
                           f"expected one of {sorted(START_RULE_OF_DATASET)}")
    return START_RULE_OF_DATASET[rule]


def simulate_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    sinogram_geometry: SinogramGeometry,
    image_geometry: ImageGeometry,
    config: SimulationConfig = SimulationConfig(),
    *,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device = "cpu",
    backend: str = "embedded",
) -> list[Path]:
    """Simulate ``num_samples`` samples into ``out_dir``; returns the sample files in index order.

    ``backend`` ("embedded" or "sirf") computes the projections (both in SIRF's units,
    recorded in the manifest as ``projection_units``).

    With ``resume`` (default), samples already listed in an existing manifest are kept
    and skipped; the existing settings must then equal these (else :class:`DatasetError`).
    Without it, an existing dataset in ``out_dir`` is replaced.
    """
    if int(num_samples) != num_samples or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0, got {num_samples}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _json_roundtrip(_settings(sinogram_geometry, image_geometry, config, seed))
    done: list[str] = []
    if (out / MANIFEST_NAME).exists():
        old = load_manifest(out)
        if resume:
            diff = [k for k in _SETTINGS_KEYS if old.get(k) != settings[k]]
            if diff:
                raise DatasetError(
                    f"{str(out / MANIFEST_NAME)!r} was simulated with other settings ({', '.join(diff)}); "
                    "use another directory, or resume=False (--no-resume) to replace it"
                )
            done = [f for f in old["files"] if (out / f).is_file()]
        else:
            for f in old["files"]:
                if Path(f).name == f and f.startswith("sample_"):
                    (out / f).unlink(missing_ok=True)
    manifest = dict(settings)
    manifest.update(
        {
            "num_samples": max(int(num_samples), len(done)),
            "seed_rule": _SEED_RULE,
            "sample_keys": list(SAMPLE_KEYS),
            "sinogram_shape": list(sinogram_geometry.shape),
            "image_shape": list(image_geometry.shape),
            "units": "images in Bq/ml x activity_scale (per sample); sinograms in counts",
            "sirf_fbsem_version": __version__,
            "projection_units": PROJECTION_UNITS,
            "backend": backend,
            "files": sorted(done),
        }
    )
    _write_manifest(out, manifest)
    todo = [i for i in range(int(num_samples)) if sample_filename(i) not in set(done)]
    model = config.model(sinogram_geometry, image_geometry, device, backend=backend)
    model.support()  # the targets' start-image mask, computed once for every sample's model
    n = int(num_samples)
    with tqdm(total=n, initial=n - len(todo), desc="simulate", unit="sample", disable=not progress) as bar:
        for i in todo:
            sample = simulate_sample(model, config, seed, i)
            name = sample_filename(i)
            with atomic_path(out / name) as tmp:
                torch.save(sample.to_dict(), tmp)
            manifest["files"] = sorted(set(manifest["files"]) | {name})
            _write_manifest(out, manifest)
            bar.update(1)
    return [out / sample_filename(i) for i in range(int(num_samples))]


# ============================================================================ reading
def _expected_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    sino = tuple(sinogram_geometry_from_dict(manifest["sinogram_geometry"]).shape)
    image = tuple(image_geometry_from_dict(manifest["image_geometry"]).shape)
    return {
        "prompts": sino,
        "multiplicative": sino,
        "additive": sino,
        "sensitivity": (int(manifest["num_subsets"]),) + image,
        "targets": (int(manifest["num_stages"]),) + image,
        "phantom": image,
        "anatomical": image,
        "mu_map": image,
        "lesion_mask": image,
    }


def load_sample(path: str | os.PathLike, manifest: dict | None = None) -> Sample:
    """Load one sample file (``weights_only=True``) and check its keys, and its shapes against ``manifest``.

    The file is memory-mapped (``torch.load(mmap=True)``, copy-on-write): its tensors are read from
    disk when used, so a training stage that needs one of a 3D sample's 42 targets does not read
    the other 41.

    Raises:
        DatasetError: naming the file: missing, unreadable, a key missing or unknown, a shape or dtype off.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"sample file {str(path)!r} is missing")
    try:
        sample = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        raise DatasetError(f"sample file {str(path)!r} cannot be loaded: {type(err).__name__}: {err}") from None
    if not isinstance(sample, dict):
        raise DatasetError(f"sample file {str(path)!r} holds a {type(sample).__name__}, not a dict")
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise DatasetError(f"sample file {str(path)!r} lacks keys {missing}")
    if manifest is not None:
        for key, shape in _expected_shapes(manifest).items():
            t = sample[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise DatasetError(f"sample file {str(path)!r}: {key!r} has shape {got}; the manifest expects {shape}")
    for key in ("prompts", "multiplicative", "additive", "sensitivity", "targets", "phantom", "anatomical", "mu_map"):
        if sample[key].dtype != torch.float32:
            raise DatasetError(f"sample file {str(path)!r}: {key!r} is {sample[key].dtype}; expected torch.float32")
    if sample["lesion_mask"].dtype != torch.int8:
        raise DatasetError(
            f"sample file {str(path)!r}: 'lesion_mask' is {sample['lesion_mask'].dtype}; expected torch.int8"
        )
    try:
        return Sample.from_dict(sample, f"sample file {str(path)!r}")
    except SampleError as err:
        raise DatasetError(str(err)) from None


class FBSEMSampleDataset(torch.utils.data.Dataset):
    """The samples listed in a directory's manifest; ``dataset[i]`` is a :class:`~sirf_fbsem.samples.Sample`.

    Args:
        directory: a directory written by :func:`simulate_dataset`.
        sinogram_geometry, image_geometry: if given, the manifest's geometries must match
            them (:class:`DatasetError` otherwise), e.g. the geometry a model was built for.
        num_stages, num_subsets: if given, must match the manifest.

    Every listed file must exist when the dataset is opened; a file that turns out
    malformed raises :class:`DatasetError` naming it when it is read.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        sinogram_geometry: SinogramGeometry | None = None,
        image_geometry: ImageGeometry | None = None,
        num_stages: int | None = None,
        num_subsets: int | None = None,
    ):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        where = str(self.directory / MANIFEST_NAME)
        self.sinogram_geometry = sinogram_geometry_from_dict(self.manifest["sinogram_geometry"])
        self.image_geometry = image_geometry_from_dict(self.manifest["image_geometry"])
        if sinogram_geometry is not None:
            diffs = geometry_mismatch(self.sinogram_geometry, sinogram_geometry)
            if diffs:
                raise DatasetError(
                    f"dataset {where!r}: sinogram geometry differs from the expected one: {'; '.join(diffs)}"
                )
        if image_geometry is not None:
            a, b = self.image_geometry, image_geometry
            same = np.allclose(a.voxel_size_mm, b.voxel_size_mm) and np.allclose(a.origin_mm, b.origin_mm)
            if a.shape != b.shape or not same:
                raise DatasetError(f"dataset {where!r}: image geometry {a} differs from the expected {b}")
        for name, want in (("num_stages", num_stages), ("num_subsets", num_subsets)):
            if want is not None and int(self.manifest[name]) != int(want):
                raise DatasetError(f"dataset {where!r} has {name} = {self.manifest[name]}; expected {want}")
        self.files = [self.directory / f for f in self.manifest["files"]]
        for f in self.files:
            if not f.is_file():
                raise DatasetError(f"sample file {str(f)!r} listed in {where!r} is missing")

    @property
    def num_stages(self) -> int:
        return int(self.manifest["num_stages"])

    @property
    def num_subsets(self) -> int:
        return int(self.manifest["num_subsets"])

    @property
    def start_rule(self) -> str:
        """The start rule the targets were made with (:attr:`sirf_fbsem.model.fbsem.FBSEMNet.start_rule`)."""
        return manifest_start_rule(self.manifest, self.directory)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        return load_sample(self.files[index], self.manifest)


#: manifest entries that datasets read together must share (geometry, subsets, PSF)
SHARED_SETTINGS = ("sinogram_geometry", "image_geometry", "num_subsets", "psf_fwhm_mm")


def first_disagreement(manifests: Sequence[Mapping[str, Any]],
                       same: Sequence[str] = SHARED_SETTINGS) -> tuple[int, str] | None:
    """The first ``(index, entry)`` where ``manifests[index][entry]`` differs from
    ``manifests[0][entry]`` for an entry in ``same``; ``None`` when all manifests agree."""
    for i, m in enumerate(manifests[1:], start=1):
        for k in same:
            if m.get(k) != manifests[0].get(k):
                return i, k
    return None


def open_datasets(directories: Sequence[str | os.PathLike],
                  same: Sequence[str] = SHARED_SETTINGS) -> list[FBSEMSampleDataset]:
    """The datasets of several directories (manifests read, no sample loaded), checked to share the
    manifest entries ``same`` (:class:`DatasetError` naming the directory and the entry otherwise)."""
    if not directories:
        raise DatasetError("no dataset directory given")
    datasets = [FBSEMSampleDataset(d) for d in directories]
    clash = first_disagreement([ds.manifest for ds in datasets], same)
    if clash is not None:
        i, k = clash
        raise DatasetError(f"dataset {str(directories[i])!r} has another {k} ({datasets[i].manifest.get(k)!r}) than "
                           f"{str(directories[0])!r} ({datasets[0].manifest.get(k)!r}); datasets used together "
                           f"must agree")
    return datasets
