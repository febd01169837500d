"""The main job on mMR-shaped data: listmode -> histogram -> randoms from delayeds -> norm x attenuation -> OSEM.

The bundled scan (``test_data/mmr_brain*``, made by ``pipelines/make_test_data.py``) is a
simulated mMR brain acquisition with a known truth; the real one is STIR's mMR listmode with
SIRF's mMR norm and mu-map (``../shared/data``, skipped when absent).

The command as ``pipelines/demo.sh`` runs it (FBSEM with the bundled 3D model, on the model's
127 x 128 x 128 grid; about 2 minutes on 2 CPU cores), and OSEM on the mMR's default
127 x 285 x 285 image, are ``slow`` and run only with ``SIRF_FBSEM_FULL_E2E=1`` (as
tests/test_cli_listmode.py); tests/test_mmr_fbsem_model.py runs the model in CI. CI runs the same functions the command
calls (:func:`~sirf_fbsem.acquisition.load_acquisition`, then
:func:`~sirf_fbsem.reconstructor.reconstruct_acquisition`, OSEM 1 iteration x 21 subsets) on a grid
with twice the in-plane voxel size and a quarter of the voxels, and compares with the truth.

Units: the projector's line integrals are in units of the x voxel size (as STIR's), so an image
on voxels k times wider comes out k times higher; the truth is in the units of the default image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from sirf_fbsem.acquisition import load_acquisition
from sirf_fbsem.cli import main
from sirf_fbsem.geometry import ImageGeometry, SinogramGeometry, scanner_preset
from sirf_fbsem.io import listmode as lm
from sirf_fbsem.io.ecat8_norm import read_ecat8_norm
from sirf_fbsem.io.interfile import read_image
from sirf_fbsem.io.mumap import read_mu_map, resample_to
from sirf_fbsem.reconstructor import reconstruct_acquisition
from sirf_fbsem.simulation.mmr_listmode import MMRListmodeParameters, bin_in_plane, crop_in_plane

from conftest import SHARED_DATA

TEST_DATA = Path(__file__).resolve().parents[1] / "test_data"
BUNDLED = {"listmode": TEST_DATA / "mmr_brain.l.hdr", "norm": TEST_DATA / "mmr_brain_norm.n.hdr",
           "mu_map": TEST_DATA / "mmr_brain_mu_map.hv"}
TRUTH, SUMMARY = TEST_DATA / "mmr_brain_truth.hv", TEST_DATA / "mmr_brain.json"
REAL = {"listmode": SHARED_DATA / "stir" / "recon_test_pack" / "PET_ACQ_small.l.hdr.STIR",
        "norm": SHARED_DATA / "sirf" / "examples" / "PET" / "mMR" / "norm.n.hdr",
        "mu_map": SHARED_DATA / "sirf" / "examples" / "PET" / "mMR" / "mu_map.hv"}
MMR = scanner_preset("Siemens_mMR")
DEFAULT_IMAGE = SinogramGeometry.from_span(MMR, 11, 60).default_image()  # what the command reconstructs
#: the simulation grid (centred in the default image) and its 2 x 2 in-plane binning: the CI grid
SIM_IMAGE = ImageGeometry(MMRListmodeParameters().image_shape, DEFAULT_IMAGE.voxel_size_mm)
COARSE = bin_in_plane(SIM_IMAGE, np.zeros(SIM_IMAGE.shape, np.float32), 2)[0]

needs_real = pytest.mark.skipif(not all(p.is_file() for p in REAL.values()),
                                reason=f"the real mMR listmode, norm and mu-map are not in {SHARED_DATA}")
full_e2e = pytest.mark.skipif(os.environ.get("SIRF_FBSEM_FULL_E2E") != "1",
                              reason="minutes on a 2-core CPU; set SIRF_FBSEM_FULL_E2E=1 to run the mMR command")
# the real file is a 1 MB excerpt of a 900 s scan; its header counts the whole scan's words
truncated_real_file = pytest.mark.filterwarnings("ignore:listmode file .* holds 254,816 words")


def _truth_on(image: ImageGeometry) -> np.ndarray:
    """The bundled truth on ``image`` (trilinear; exact where the grids align), in ``image``'s units."""
    geom, truth = read_image(TRUTH)
    return resample_to(truth, geom, image) * np.float32(image.voxel_size_mm[2] / DEFAULT_IMAGE.voxel_size_mm[2])


def _check_against_truth(x: np.ndarray, image: ImageGeometry, sigma_voxels: float, min_pearson: float) -> None:
    """Finite, non-negative, the activity in the head, the brain's pattern and mean those of the truth.

    Brain: truth above half the median of the head (grey and white matter; scalp, skull and CSF are below).
    Bias: the scatter (15 % of the prompts) is not corrected by the command, so the brain comes out a
    little high; the bounds leave room for that and for the noise of 1e6 counts.
    """
    truth = _truth_on(image)
    assert np.all(np.isfinite(x)) and x.min() >= 0 and x.sum() > 0
    head = ndimage.binary_dilation(truth > 0, iterations=3)
    assert x[head].sum() > 0.9 * x.sum()
    brain = truth > 0.5 * np.median(truth[truth > 0])
    smooth = ndimage.gaussian_filter(x, sigma_voxels)
    pearson = np.corrcoef(smooth[brain], truth[brain])[0, 1]
    ratio = smooth[brain].mean() / truth[brain].mean()
    assert pearson > min_pearson, pearson
    assert 0.8 < ratio < 1.4, ratio


def _mu_mask(mu_map: Path, image: ImageGeometry) -> np.ndarray:
    """Where the mu-map holds tissue (mu > 0.05 /cm, i.e. more than half water's), on ``image``."""
    geom, mu = read_mu_map(mu_map)
    return resample_to(mu, geom, image) > 0.05


# ----------------------------------------------------------------------------- the bundled files
def test_bundled_mmr_scan_is_what_its_summary_says():
    summary = json.loads(SUMMARY.read_text())
    header = lm.read_listmode_header(BUNDLED["listmode"])
    assert header.scanner.name == MMR.name and header.duration_s == 10 and header.layout.max_ring_difference == 60
    scan = lm.scan_listmode(header)
    assert (scan.prompts, scan.delayeds) == (summary["prompts"], summary["delayeds"])
    assert (scan.first_time_ms, scan.last_time_ms, scan.time_tags) == (0, 10000, 10001)
    assert 1.0e6 < scan.events < 1.5e6 and scan.invalid_addresses == 0 and header.total_listmode_words == scan.words
    norm = read_ecat8_norm(BUNDLED["norm"])
    assert norm.scanner.name == MMR.name and norm.axial_effects.size == 837
    mu_geom, mu = read_mu_map(BUNDLED["mu_map"])  # checks 1/cm
    assert 0.09 < np.median(mu[mu > 0.05]) < 0.1 and mu.max() < 0.2
    truth_geom, truth = read_image(TRUTH)
    assert truth_geom.voxel_size_mm == COARSE.voxel_size_mm and truth.min() >= 0 and truth.max() > 0
    size = sum(p.stat().st_size for p in TEST_DATA.glob("mmr_brain*"))
    assert size < 10e6, size


def test_binning_and_cropping_keep_every_voxel_where_it_was():
    """The mu-map and truth are binned and cropped copies of the simulation grid, placed by their origins."""
    rng = np.random.default_rng(0)
    image = rng.random(SIM_IMAGE.shape).astype(np.float32)
    keep = np.zeros(SIM_IMAGE.shape, bool)
    keep[:, 30:90, 40:70] = True
    geom, cropped = crop_in_plane(SIM_IMAGE, image, keep, margin=2)
    assert geom.shape == (127, 64, 34)
    back = resample_to(cropped, geom, SIM_IMAGE)
    np.testing.assert_allclose(back[:, 28:92, 38:72], image[:, 28:92, 38:72], rtol=1e-6)
    coarse_geom, coarse = bin_in_plane(SIM_IMAGE, image, 2)
    assert coarse_geom == COARSE
    np.testing.assert_allclose(coarse[5, 10, 20], image[5, 20:22, 40:42].mean(), rtol=1e-6)
    # a coarse voxel's centre is its fine voxels' mean position: sampling the fine image there averages them
    up = resample_to(image, SIM_IMAGE, coarse_geom)
    np.testing.assert_allclose(up, coarse, rtol=1e-5)


# ----------------------------------------------------------------------------- the main job (CI grid)
def test_main_job_on_the_bundled_listmode_gives_back_the_truth():
    acq = load_acquisition(BUNDLED["listmode"], norm=BUNDLED["norm"], mu_map=BUNDLED["mu_map"], image=COARSE,
                           progress=False)
    summary = json.loads(SUMMARY.read_text())
    assert acq.prompts.sum() == summary["prompts"]  # all within maximum ring difference 60
    assert acq.additive.sum() == pytest.approx(summary["delayeds"], rel=1e-4)  # randoms from the delayeds
    x, description = reconstruct_acquisition(acq, COARSE, "osem", num_iterations=1, num_subsets=21, progress=False)
    assert description == "OSEM 1 it x 21 subsets"
    _check_against_truth(x.numpy(), COARSE, sigma_voxels=1.0, min_pearson=0.55)


@needs_real
@truncated_real_file
def test_main_job_on_the_real_mmr_files_puts_the_activity_in_the_head():
    image = ImageGeometry((127, 90, 90), COARSE.voxel_size_mm)  # 375 mm wide: the whole mu-map's object
    acq = load_acquisition(REAL["listmode"], norm=REAL["norm"], mu_map=REAL["mu_map"], image=image, progress=False)
    x, _ = reconstruct_acquisition(acq, image, "osem", num_iterations=1, num_subsets=21, progress=False)
    x = x.numpy()
    assert np.all(np.isfinite(x)) and x.min() >= 0 and x.sum() > 0
    tissue = _mu_mask(REAL["mu_map"], image)
    assert x[ndimage.binary_dilation(tissue, iterations=1)].sum() > 0.95 * x.sum()
    assert x[tissue].mean() > 20 * x[~tissue].mean()


# ----------------------------------------------------------------------------- the command (opt-in)
@pytest.mark.slow
@full_e2e
@truncated_real_file
@pytest.mark.parametrize("scan", ["bundled", pytest.param("real", marks=needs_real)])
@pytest.mark.parametrize("algorithm", ["fbsem", "osem"])
def test_the_mmr_command_of_demo_sh(tmp_path, scan, algorithm):  # pragma: no cover - minutes; opt-in
    """``sirf-fbsem reconstruct LIST.l.hdr --norm N.n.hdr --mu-map MU.hv`` as pipelines/demo.sh runs it:
    with the bundled 3D model (on its grid), and OSEM 1 x 21 (on the default image)."""
    import pydicom

    from sirf_fbsem.io.nifti import read_nifti
    from sirf_fbsem.model.io import load_model

    files = BUNDLED if scan == "bundled" else REAL
    out, dicom, png = tmp_path / "recon.nii.gz", tmp_path / "dicom", tmp_path / "recon.png"
    if algorithm == "fbsem":
        model = TEST_DATA / "fbsem_mmr_model.pt"
        how, image = ["--model", str(model)], load_model(model)[1]["image_geometry"]
    else:
        how, image = ["--iterations", "1", "--subsets", "21"], DEFAULT_IMAGE
    rc = main(["reconstruct", str(files["listmode"]), "--norm", str(files["norm"]), "--mu-map", str(files["mu_map"]),
               *how, "--output", str(out), "--dicom", str(dicom), "--preview", str(png), "--no-progress"])
    assert rc == 0 and png.stat().st_size > 0
    x, affine = read_nifti(out)
    assert x.shape == image.shape
    np.testing.assert_allclose(affine, image.nifti_affine(MMR), atol=1e-4)
    slices = sorted(dicom.glob("*.dcm"))
    assert len(slices) == image.shape[0]
    mid = pydicom.dcmread(slices[63])
    assert (mid.Rows, mid.Columns) == image.shape[1:] and mid.Modality == "PT"
    if scan == "bundled":
        _check_against_truth(x, image, sigma_voxels=2.0, min_pearson=0.6)
    else:
        tissue = _mu_mask(REAL["mu_map"], image)
        assert np.all(np.isfinite(x)) and x.min() >= 0
        assert x[ndimage.binary_dilation(tissue, iterations=2)].sum() > 0.9 * x.sum()
