"""The bundled 3D Siemens mMR model (``test_data/fbsem_mmr_model.pt``): 63 stages trained
sequentially on simulated mMR brains, with count-aware strengths (docs/studies/mmr_3d.md), used by
the main job.

- on the bundled simulated listmode scan, FBSEM on the model's grid beats OSEM of as many
  sub-iterations against the truth, with the brain's pattern and mean;
- on the real mMR listmode (../shared/data; skipped where absent) the activity lies in the
  patient, as the μ-map shows;
- scale equivariance with the trained weights: ``a·y`` with ``a·b`` gives ``a`` times the image
  (the first stages, where the start rule acts; every stage is positively homogeneous);
- the README's 3D figures are the scores of this model and two more training seeds of its recipe on a
  confirmation set disjoint by seed from their tuning and training sets
  (``pipelines/results/evaluate_mmr3d_k63_counts_seeds.json``).

Each FBSEM reconstruction is a few minutes on 2 CPU cores (63 subset projections on a
127 x 128 x 128 grid at span 11).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from sirf_fbsem.acquisition import load_acquisition
from sirf_fbsem.metrics import nrmse
from sirf_fbsem.model.io import load_model
from sirf_fbsem.recon.engine import FBSEMUpdate, reconstruct
from sirf_fbsem.reconstructor import reconstruct_acquisition

from test_docs import REPO
from test_mmr_main_job import BUNDLED, REAL, _check_against_truth, _mu_mask, _truth_on, needs_real, truncated_real_file

MODEL = REPO / "test_data" / "fbsem_mmr_model.pt"


@pytest.fixture(scope="module")
def model():
    net, meta = load_model(MODEL)
    return net, meta


@pytest.fixture(scope="module")
def bundled(model):
    _, meta = model
    return load_acquisition(BUNDLED["listmode"], norm=BUNDLED["norm"], mu_map=BUNDLED["mu_map"], progress=False)


def test_the_model_is_the_fully_unrolled_3d_mmr_model(model):
    net, meta = model
    assert net.num_stages >= 21 and net.num_stages % net.num_subsets == 0
    assert meta["image_geometry"].shape == (127, 128, 128) and meta["sinogram_geometry"].scanner.name == "Siemens mMR"
    assert meta["training_mode"] == "sequential" and net.start_rule == "count_matched"
    assert meta["projection_units"] == "stir_pixel_units"
    # trained and iteration-dependent: the betas moved from their initial value, stage by stage. A stage
    # whose validation loss never beat its warm start keeps the previous stage's weights (the best
    # validation epoch is kept, epoch 0 included), as stage 2 of the bundled model did: a few repeats only.
    betas = net.betas.detach().numpy()
    init = meta["network"]["beta_init"]
    assert np.all(betas > 0) and np.all(np.abs(betas - init) > 1e-5 * init)
    assert len(set(np.round(betas, 6))) >= net.num_stages - 2
    assert meta["training_data"]["seed"] == 1001
    # count-aware strengths (beta_k = softplus(rho_k - gamma_k ln(N / 1e7))): every slope learned, positive
    # (less regularisation at more counts), from 0 at initialisation
    assert net.beta_counts == "log_linear" and np.all(net.count_slopes.detach().numpy() > 0)


def test_fbsem_on_the_bundled_listmode_beats_osem_of_as_many_subiterations(model, bundled):
    net, meta = model
    grid = meta["image_geometry"]
    x_f, desc = reconstruct_acquisition(bundled, grid, "fbsem", model_path=MODEL, progress=False)
    x_o, _ = reconstruct_acquisition(bundled, grid, "osem", num_iterations=net.num_stages // net.num_subsets,
                                     num_subsets=net.num_subsets, progress=False)
    assert desc.startswith(f"FBSEM-Net ({net.num_stages} stages, sequential")
    x_f, x_o = x_f.numpy(), x_o.numpy()
    _check_against_truth(x_f, grid, sigma_voxels=1.0, min_pearson=0.7)
    truth = _truth_on(grid)
    head = ndimage.binary_dilation(truth > 0, iterations=2)
    e_f, e_o = nrmse(x_f[head], truth[head]), nrmse(x_o[head], truth[head])
    assert e_f < 0.9 * e_o, (e_f, e_o)


@needs_real
@truncated_real_file
def test_fbsem_on_the_real_mmr_listmode_puts_the_activity_in_the_patient(model):
    net, meta = model
    grid = meta["image_geometry"]
    acq = load_acquisition(REAL["listmode"], norm=REAL["norm"], mu_map=REAL["mu_map"], progress=False)
    x, _ = reconstruct_acquisition(acq, grid, "fbsem", model_path=MODEL, progress=False)
    x = x.numpy()
    assert np.all(np.isfinite(x)) and x.min() >= 0 and x.sum() > 0
    tissue = _mu_mask(REAL["mu_map"], grid)
    assert x[ndimage.binary_dilation(tissue, iterations=2)].sum() > 0.9 * x.sum()
    assert x[tissue].mean() > 10 * x[~ndimage.binary_dilation(tissue, iterations=2)].mean()


@pytest.mark.parametrize("a", [0.01, 100.0])
def test_trained_3d_model_is_scale_equivariant(model, bundled, a):
    net, meta = model
    grid = meta["image_geometry"]
    stages = 3  # the start rule acts at stage 0; later stages are the same homogeneous map
    scaled = dataclasses.replace(bundled, prompts=bundled.prompts * np.float32(a),
                                 additive=bundled.additive * np.float32(a))
    images = []
    for acq in (bundled, scaled):
        m = acq.model(grid, num_subsets=net.num_subsets)
        images.append(reconstruct(m, torch.as_tensor(acq.prompts), FBSEMUpdate(net), stages))
    x, xa = images
    rel = float((xa - a * x).norm() / (a * x).norm())
    assert rel < 1e-2, rel


CONFIRMATION = REPO / "pipelines" / "results" / "evaluate_mmr3d_k63_counts_seeds.json"
README = REPO / "README.md"


def test_the_readme_quotes_the_bundled_models_confirmation_scores(model):
    """The README's 3D figures come from one ``evaluate`` run of this very model (its strengths and
    slopes, as stored in the result) and two more training seeds of its recipe, on a confirmation set
    disjoint by seed from its tuning and training sets, with the baselines tuned on the tuning set: the
    mean over the seeds, its std, the best baseline and the ratio's interval."""
    net, meta = model
    result = json.loads(CONFIRMATION.read_text())
    sets = result["phantom_sets"]
    assert sets["confirmation"] and sets["disjoint_by_seed"] and not sets["unrecorded"]
    assert sets["scored"]["role"] == "confirmation" and sets["tuning"]["role"] == "tuning"
    scored, tuning = set(sets["scored"]["seeds"]), set(sets["tuning"]["seeds"])
    trained = {s for t in sets["training"] for s in t["seeds"]}
    assert trained == {meta["training_data"]["seed"]} and not (scored & tuning) and not (scored & trained)
    # three training seeds (the rules' minimum), the first of them this model
    assert sorted(result["networks"]) == [f"FBSEM sequential@{i}" for i in (1, 2, 3)]
    assert Path(result["model_files"]["FBSEM sequential@1"]).parts[-2:] == ("test_data", "fbsem_mmr_model.pt")
    stored = result["networks"]["FBSEM sequential@1"]
    assert stored["num_stages"] == net.num_stages and stored["beta_counts"] == net.beta_counts
    np.testing.assert_allclose(stored["betas"], net.betas.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(stored["beta_count_slopes"], net.count_slopes.detach().numpy(), rtol=1e-6)
    readme = README.read_text()
    for level in ("3e+07", "3e+08"):
        nrmse = result["summary"][level]["nrmse"]
        best_name, best = min(((k, v) for k, v in nrmse.items() if not k.startswith("FBSEM")), key=lambda kv: kv[1])
        spread = result["count_levels"][level]["methods"]["FBSEM sequential"]["spread_over_seeds"]["nrmse"]
        assert spread["num_seeds"] == 3 and spread["mean"] == pytest.approx(nrmse["FBSEM sequential"])
        std = f"{spread['std']:.3f}" if spread["std"] >= 0.001 else f"{spread['std']:.4f}"
        ci = result["summary"][level]["ratio_intervals"][f"FBSEM sequential/{best_name}"]["nrmse"]
        quoted = f"{ci['estimate']:.2f}× [{ci['low']:.2f}, {ci['high']:.2f}]"
        assert f"{spread['mean']:.3f} ± {std}" in readme and f"{best:.3f}" in readme and quoted in readme, level
