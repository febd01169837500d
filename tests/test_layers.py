"""Layering: the SIRF-compatible facade's objects import without the reconstructors (no import cycle)."""
from __future__ import annotations

import subprocess
import sys


def test_facade_does_not_import_the_reconstructor_layer():
    code = ("import sys, sirf_fbsem.facade, sirf_fbsem.recon.engine, sirf_fbsem.projectors.factory; "
            "bad = [m for m in ('sirf_fbsem.reconstructor', 'sirf_fbsem.stir', 'sirf_fbsem.training', "
            "'sirf_fbsem.evaluation') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stir_facade_offers_sirfs_names():
    import sirf_fbsem.stir as pet
    from sirf_fbsem.reconstructor import OSEMReconstructor

    assert pet.OSMAPOSLReconstructor is OSEMReconstructor
    for name in ("AcquisitionData", "ImageData", "AcquisitionModelUsingRayTracingMatrix",
                 "make_Poisson_loglikelihood", "error", "FBSEMReconstructor"):
        assert hasattr(pet, name), name
