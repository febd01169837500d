"""The README's SIRF scripts, run as written against the real ``sirf.STIR`` (skipped without it).

The FBSEM script reconstructs the bundled scan with the bundled model under SIRF's own
defaults (storage scheme ``'file'``, which is not changed here), and its image must equal the
embedded backend's within 2% NRMSE at the same scale: both backends compute in SIRF's units.
The OSEM script's image must equal the engine's OSEM on the embedded backend likewise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import readme_script, run_readme_script

from sirf_fbsem.metrics import nrmse
from sirf_fbsem.projectors.factory import sirf_available

pytestmark = [pytest.mark.sirf,
              pytest.mark.skipif(not sirf_available(), reason="sirf.STIR does not import here")]

REPO = Path(__file__).resolve().parents[1]
SCAN = REPO / "test_data" / "phantom_scan.hs"
MODEL = REPO / "test_data" / "fbsem_model.pt"




@pytest.fixture
def default_storage():
    """SIRF's default storage scheme, as a user's script has it; restored afterwards."""
    import sirf.STIR as pet

    pet.set_verbosity(0)
    before = pet.AcquisitionData.get_storage_scheme()
    pet.AcquisitionData.set_storage_scheme("file")
    yield
    assert pet.AcquisitionData.get_storage_scheme() == "file"  # the package left the user's scheme alone
    pet.AcquisitionData.set_storage_scheme(before)


def _run_both(after: str, replacements: dict[str, str], tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The README script run as written (SIRF), and with its one-line change (the embedded backend)."""
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # SIRF's 'file' scheme writes scratch files into the working directory
    try:
        with_sirf = run_readme_script(readme_script(after), replacements)["out"].as_array()
    finally:
        os.chdir(cwd)
    # its own output folder: sirf_fbsem never replaces a file it did not write (here: SIRF's output)
    own = tmp_path / "embedded"
    own.mkdir()
    replacements = {k: v.replace(str(tmp_path), str(own)) for k, v in replacements.items()}
    embedded = run_readme_script(readme_script(after), replacements, without_sirf=True)["out"].as_array()
    return np.asarray(with_sirf, dtype=np.float64), np.asarray(embedded, dtype=np.float64)


def test_readme_fbsem_script_with_sirf_equals_the_embedded_backend(tmp_path, default_storage):
    """Bundled scan + bundled model, SIRF's defaults (storage 'file', 2 tangential LORs) on both sides."""
    from sirf_fbsem.recon.engine import fov_mask
    from sirf_fbsem.io.interfile import read_image

    with_sirf, embedded = _run_both("<!-- readme-fbsem-script -->", {
        "'sino.hs'": repr(str(SCAN)), "'model.pt'": repr(str(MODEL)),
        "'fbsem.hv'": repr(str(tmp_path / "fbsem.hv"))}, tmp_path)
    geom, _ = read_image(REPO / "test_data" / "phantom_truth.hv")
    inside = fov_mask(geom).numpy()
    assert abs(with_sirf[inside].sum() / embedded[inside].sum() - 1) <= 1e-4
    # voxel by voxel: the facade's ray-tracing model is STIR's matrix (embedded Siddon): measured 1.2e-6
    assert nrmse(with_sirf[inside], embedded[inside]) <= 1e-4


def test_readme_osem_script_with_sirf_equals_the_engine(tmp_path, default_storage):
    """The OSEM script (6 subsets x 12 sub-iterations on the raw prompts) on both backends.

    OSEM of the bundled scan's raw counts (about 3.5 per bin) without regularisation. The
    facade's ``AcquisitionModelUsingRayTracingMatrix`` traces with the embedded Siddon
    projector (STIR's matrix row for row), so the images agree voxel by voxel.
    """
    from scipy.ndimage import gaussian_filter

    from sirf_fbsem.recon.engine import fov_mask
    from sirf_fbsem.io.interfile import read_image

    with_sirf, embedded = _run_both("A typical SIRF OSEM script", {"'sino.hs'": repr(str(SCAN))}, tmp_path)
    geom, _ = read_image(REPO / "test_data" / "phantom_truth.hv")
    inside = fov_mask(geom).numpy()
    assert abs(with_sirf[inside].sum() / embedded[inside].sum() - 1) <= 0.01  # measured 0.1%
    error = nrmse(gaussian_filter(with_sirf, 1.5)[inside], gaussian_filter(embedded, 1.5)[inside])
    assert error <= 0.04, error
    # voxel by voxel, with the facade's ray-tracing model (embedded Siddon, STIR's matrix): measured 2.1e-6
    assert nrmse(with_sirf[inside], embedded[inside]) <= 1e-4
    assert np.isfinite(with_sirf).all()
