"""sirf_fbsem: FBSEM-Net learned PET reconstruction for SIRF and STIR.

Public API (import from the submodules named):

- :mod:`sirf_fbsem.geometry`: ``Scanner``, ``SinogramGeometry``, ``ImageGeometry``, presets.
- :mod:`sirf_fbsem.projectors`: ``AcquisitionModel`` contract; ``EmbeddedAcquisitionModel``.
- :mod:`sirf_fbsem.autograd`: forward/back projection as ``torch.autograd.Function``.
- :mod:`sirf_fbsem.recon`: OSEM, MLEM, Poisson log-likelihood, FOV mask.
- :mod:`sirf_fbsem.io`: Interfile, NIfTI, DICOM, listmode.
- :mod:`sirf_fbsem.samples`: ``Sample`` and ``Batch``, the typed training and evaluation data.
"""
__version__ = "0.10.0"
