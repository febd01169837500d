"""Training-data simulation: phantoms, acquisitions, OSEM targets, the on-disk dataset.

- :mod:`.phantoms`: procedural and MNI152 brain phantoms (activity, mu-map, MR-like image, lesions).
- :mod:`.acquisition`: attenuation, normalisation, randoms, scatter, Poisson noise at a set number of counts.
- :mod:`.targets`: OSEM sub-iterates of the noise-free data (the sequential-training targets).
- :mod:`.dataset`: ``simulate_dataset`` (resumable), ``FBSEMSampleDataset``, the sample-file contract.
- :mod:`.cli`: the ``sirf-fbsem simulate`` arguments.
"""
from .acquisition import (
    AcquisitionParameters,
    SimulatedAcquisition,
    attenuation_factors,
    detection_efficiencies,
    simulate_acquisition,
    single_slice_geometry,
)
from .dataset import (
    DatasetError,
    FBSEMSampleDataset,
    SimulationConfig,
    load_manifest,
    load_sample,
    simulate_dataset,
    simulate_sample,
)
from .phantoms import Lesion, Phantom, PhantomParameters, Tissue, make_phantom, mni152_phantom, procedural_phantom
from .targets import default_initial_image, osem_targets

__all__ = [
    "AcquisitionParameters",
    "SimulatedAcquisition",
    "attenuation_factors",
    "detection_efficiencies",
    "simulate_acquisition",
    "single_slice_geometry",
    "DatasetError",
    "FBSEMSampleDataset",
    "SimulationConfig",
    "load_manifest",
    "load_sample",
    "simulate_dataset",
    "simulate_sample",
    "Lesion",
    "Phantom",
    "PhantomParameters",
    "Tissue",
    "make_phantom",
    "mni152_phantom",
    "procedural_phantom",
    "default_initial_image",
    "osem_targets",
]
