"""A SIRF-compatible facade over the embedded projector: ``import sirf_fbsem.stir as pet``.

A script written for ``sirf.STIR`` runs without SIRF when only its import changes::

    import sirf_fbsem.stir as pet            # instead of: import sirf.STIR as pet
    acq = pet.AcquisitionData('sino.hs')
    image = acq.create_uniform_image(1.0)
    am = pet.AcquisitionModelUsingRayTracingMatrix(); am.set_up(acq, image)
    obj = pet.make_Poisson_loglikelihood(acq, acq_model=am)
    recon = pet.OSMAPOSLReconstructor()
    recon.set_objective_function(obj); recon.set_num_subsets(6); recon.set_num_subiterations(12)
    recon.set_up(image); recon.set_current_estimate(image); recon.process()
    out = recon.get_output()

The data containers, acquisition models and objective function live in
:mod:`sirf_fbsem.facade`; the reconstructors in :mod:`sirf_fbsem.reconstructor` (which
uses the facade, so this module joins the two without an import cycle).
"""
from .facade import *  # noqa: F401,F403
from .facade import __all__ as _facade_all
from .facade import NotReadyError  # noqa: F401
from .reconstructor import FBSEMReconstructor, OSEMReconstructor

#: SIRF's name for the (prior-free) OSEM reconstructor
OSMAPOSLReconstructor = OSEMReconstructor

__all__ = [*_facade_all, "OSMAPOSLReconstructor", "OSEMReconstructor", "FBSEMReconstructor"]
