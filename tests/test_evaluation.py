"""Evaluation: metrics, baselines (OSEM, post-filter, MAP-EM through FBSEM's fusion), the evaluate command."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sirf_fbsem import metrics
from sirf_fbsem.cli import main as cli
from sirf_fbsem.evaluation import (
    EvaluationConfig,
    bowsher_weights,
    evaluation_masks,
    gaussian_filter,
    image_metrics,
    map_em,
    osem_iterates,
    quadratic_prior_reference,
    weighted_prior_reference,
)
from sirf_fbsem.geometry import scanner_preset
from sirf_fbsem.model.fbsem import FBSEMNet
from sirf_fbsem.model.io import save_model
from sirf_fbsem.model.regularisers import RegulariserConfig
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
from sirf_fbsem.recon.osem import fov_mask
from sirf_fbsem.simulation import AcquisitionParameters, SimulationConfig, simulate_dataset
from sirf_fbsem.simulation.acquisition import single_slice_geometry
from sirf_fbsem.simulation.dataset import FBSEMSampleDataset
from sirf_fbsem.study_sets import PhantomSet, SetOverlapError, check_disjoint, phantom_set_of_manifests

COUNTS = (2e4, 3e5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """small_test scanner, one ring (48 views x 48 bins), 1 x 47 x 47 image of 4 mm voxels; per count level
    2 test and 1 tuning phantom; 4 subsets, 2 stages of targets."""
    root = tmp_path_factory.mktemp("evaluation")
    sino, image = single_slice_geometry(scanner_preset("small_test"))
    dirs: dict[str, list] = {"test": [], "tune": []}
    for i, counts in enumerate(COUNTS):
        cfg = SimulationConfig(num_subsets=4, num_stages=2, acquisition=AcquisitionParameters(counts=counts))
        for part, n, seed in (("test", 2, 10), ("tune", 1, 20)):
            d = root / f"{part}_{i}"
            simulate_dataset(d, n, sino, image, cfg, seed=seed + i, progress=False)
            dirs[part].append(d)
    return root, sino, image, dirs


def _sample_and_model(data, level: int = 0, index: int = 0):
    _, sino, image, dirs = data
    sample = FBSEMSampleDataset(dirs["test"][level])[index]
    model = EmbeddedAcquisitionModel(sino, image, num_subsets=4)
    model = model.with_terms(sample.multiplicative, sample.additive)
    return sample, model, image


# ----------------------------------------------------------------------------- metrics
def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    ref = (1.0 + ((x - 20) ** 2 + (y - 20) ** 2 < 150).double() * 3.0)[None]  # (1, 40, 40)
    assert metrics.ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    values = [metrics.ssim(ref + s * torch.randn(ref.shape, generator=g, dtype=torch.float64), ref)
              for s in (0.05, 0.2, 0.8)]
    assert 1.0 > values[0] > values[1] > values[2]


def test_truth_scores_perfectly_and_masks_are_sensible(data):
    sample, _, image = _sample_and_model(data, level=1)
    masks = evaluation_masks(sample, image)
    truth = sample.phantom
    m = image_metrics(truth, truth, masks)
    assert m["nrmse"] == 0.0 and math.isinf(m["psnr"]) and m["ssim"] == pytest.approx(1.0)
    # the head mask covers the phantom; the white-matter ROI is inside it and away from lesions
    assert bool(masks.head[truth.numpy() > 0].all())
    assert masks.white_matter.sum() > 20 and not (masks.white_matter & (sample.lesion_mask.numpy() != 0)).any()
    if masks.lesions:
        assert m["contrast_recovery"] == pytest.approx(1.0)
        assert all((sample.lesion_mask.numpy()[les] == 1).all() for les in masks.lesions)
    # a uniformly scaled image has NRMSE |a - 1| exactly
    assert image_metrics(1.1 * truth, truth, masks)["nrmse"] == pytest.approx(0.1, rel=1e-6)


# ----------------------------------------------------------------------------- baselines
def test_quadratic_prior_reference_keeps_a_constant_image_and_averages_neighbours():
    fov = torch.zeros(1, 9, 9, dtype=torch.bool)
    fov[:, 2:7, 2:7] = True
    const = 3.0 * fov.double()
    assert torch.equal(quadratic_prior_reference(const, fov, (4.0, 2.0, 2.0)), const)
    spike = torch.zeros(1, 9, 9, dtype=torch.float64)
    spike[0, 4, 4] = 8.0
    ref = quadratic_prior_reference(spike, fov, (4.0, 2.0, 2.0))
    assert float(ref[0, 4, 4]) == pytest.approx(4.0)  # (x + mean of zero neighbours) / 2
    w_edge, w_diag = 1 / 2.0, 1 / (2.0 * math.sqrt(2))
    # its edge neighbour: all 8 of its neighbours are in the FOV, one (weight 1/2 mm) holds 8
    assert float(ref[0, 4, 5]) == pytest.approx(0.5 * 8.0 * w_edge / (4 * w_edge + 4 * w_diag))
    assert float(ref[0, 0, 0]) == 0.0  # outside the FOV


def test_map_em_with_zero_beta_is_exactly_osem(data):
    sample, model, image = _sample_and_model(data)
    osem = osem_iterates(model, sample.prompts, 3)
    mapem = map_em(model, sample.prompts, 0.0, 3, image.voxel_size_mm, return_iterates=True)
    assert torch.equal(mapem, osem)


def test_larger_beta_gives_smoother_images(data):
    sample, model, image = _sample_and_model(data)  # low counts
    masks = evaluation_masks(sample, image)
    noise = [metrics.background_noise(map_em(model, sample.prompts, b, 6, image.voxel_size_mm), masks.white_matter)
             for b in (0.0, 0.1, 1.0)]
    assert noise[0] > noise[1] > noise[2], noise
    # roughness: mean squared difference of horizontal neighbours inside the FOV
    fov = fov_mask(image)
    rough = []
    for b in (0.0, 1.0):
        x = map_em(model, sample.prompts, b, 6, image.voxel_size_mm)
        d = (x[..., 1:] - x[..., :-1]) ** 2
        rough.append(float(d[fov[..., 1:] & fov[..., :-1]].mean()))
    assert rough[1] < 0.5 * rough[0]


def _step_anatomy():
    """(1, 9, 10) MR image with a vertical edge between columns 4 and 5, and a whole-image FOV."""
    u = torch.full((1, 9, 10), 0.2, dtype=torch.float64)
    u[..., 5:] = 0.85
    return u, torch.ones(1, 9, 10, dtype=torch.bool)


def test_bowsher_weights_are_symmetric_and_keep_the_b_most_similar_neighbours():
    g = torch.Generator().manual_seed(1)
    u = torch.rand(1, 12, 11, generator=g, dtype=torch.float64)
    fov = torch.zeros(1, 12, 11, dtype=torch.bool)
    fov[:, 1:11, 2:10] = True
    for b in (1, 3, 8):
        w, offsets = bowsher_weights(u, fov, (4.0, 2.0, 3.0), b)
        assert w.shape == (8, 1, 12, 11) and (w >= 0).all()
        assert not w[:, ~fov].any()  # nothing outside the FOV
        index = {o: i for i, o in enumerate(offsets)}
        for i, (dz, dy, dx) in enumerate(offsets):
            back = index[(-dz, -dy, -dx)]
            for y in range(12):
                for x in range(11):
                    if 0 <= y + dy < 12 and 0 <= x + dx < 11:
                        assert float(w[i, 0, y, x]) == float(w[back, 0, y + dy, x + dx])  # w_jk = w_kj
                    else:
                        assert float(w[i, 0, y, x]) == 0.0
        # every FOV voxel keeps at least its own B choices; b_jk + b_kj <= 2
        linked = (w > 0).sum(dim=0)[fov]
        assert int(linked.min()) >= min(b, 3)  # a FOV corner voxel has only 3 neighbours in the FOV
        dist = torch.tensor([math.hypot(dy * 2.0, dx * 3.0) for _, dy, dx in offsets], dtype=torch.float64)
        assert float((w * dist[:, None, None, None]).max()) <= 2.0 + 1e-12
    # j's own choice: the B smallest |u_j - u_k|
    w, offsets = bowsher_weights(u, fov, (4.0, 2.0, 3.0), 2)
    y, x = 5, 5
    diffs = sorted((abs(float(u[0, y + dy, x + dx] - u[0, y, x])), i) for i, (_, dy, dx) in enumerate(offsets))
    assert all(float(w[i, 0, y, x]) > 0 for _, i in diffs[:2])


def test_bowsher_reference_keeps_an_edge_of_the_anatomy_that_the_quadratic_prior_blurs():
    u, fov = _step_anatomy()
    x = 1.0 + 3.0 * (u > 0.5).double()  # activity with the MR image's edge
    w, offsets = bowsher_weights(u, fov, (4.0, 2.0, 2.0), 3)
    assert torch.allclose(weighted_prior_reference(x, fov, w, offsets), x, rtol=0, atol=1e-12)
    assert float((quadratic_prior_reference(x, fov, (4.0, 2.0, 2.0)) - x).abs().max()) > 0.5
    # with a featureless MR image and all 8 neighbours it is the quadratic prior's reference
    spike = torch.zeros(1, 9, 10, dtype=torch.float64)
    spike[0, 4, 4] = 8.0
    small = torch.zeros_like(fov)
    small[:, 2:7, 2:8] = True
    w, offsets = bowsher_weights(torch.ones(1, 9, 10), small, (4.0, 2.0, 2.0), 8)
    assert torch.allclose(weighted_prior_reference(spike, small, w, offsets),
                          quadratic_prior_reference(spike, small, (4.0, 2.0, 2.0)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_neighbours"):
        bowsher_weights(u, fov, (4.0, 2.0, 2.0), 9)


def test_bowsher_map_em_is_osem_at_zero_beta_and_beats_the_quadratic_prior_with_a_true_anatomy(data):
    sample, model, image = _sample_and_model(data)  # low counts
    anat = sample.anatomical
    osem = osem_iterates(model, sample.prompts, 3)
    assert torch.equal(map_em(model, sample.prompts, 0.0, 3, image.voxel_size_mm, return_iterates=True,
                              anatomical=anat, bowsher_neighbours=3), osem)
    with pytest.raises(ValueError, match="Bowsher"):
        map_em(model, sample.prompts, 0.1, 1, image.voxel_size_mm, anatomical=anat)
    masks = evaluation_masks(sample, image)
    truth = sample.phantom
    betas = (0.03, 0.1, 0.3, 1.0, 3.0)
    best = {}
    for name, kw in (("quadratic", {}), ("bowsher", {"anatomical": anat, "bowsher_neighbours": 3})):
        best[name] = min(min(metrics.nrmse(x, truth, masks.head) for x in
                             map_em(model, sample.prompts, b, 8, image.voxel_size_mm, return_iterates=True, **kw))
                         for b in betas)
    assert best["bowsher"] < best["quadratic"], best


def test_gaussian_filter_keeps_counts_and_the_best_filter_beats_no_filter(data):
    sample, model, image = _sample_and_model(data)
    x = osem_iterates(model, sample.prompts, 4)[-1]
    assert torch.equal(gaussian_filter(x, 0.0, image.voxel_size_mm), x)
    y = gaussian_filter(x, 8.0, image.voxel_size_mm)
    assert float(y.sum()) == pytest.approx(float(x.sum()), rel=1e-3)  # the head lies well inside the image
    masks = evaluation_masks(sample, image)
    truth = sample.phantom
    grid = [metrics.nrmse(gaussian_filter(x, f, image.voxel_size_mm), truth, masks.head) for f in (0, 3, 5, 8, 12)]
    assert min(grid) < 0.97 * grid[0], grid  # at 2e4 counts, smoothing helps


def test_evaluation_config_is_validated():
    with pytest.raises(ValueError, match="osem_iterations"):
        EvaluationConfig(osem_iterations=0)
    with pytest.raises(ValueError, match="map_betas"):
        EvaluationConfig(map_betas=(-1.0,))
    with pytest.raises(ValueError, match="bowsher_neighbours"):
        EvaluationConfig(bowsher_neighbours=(0,))


# ----------------------------------------------------------------------------- command line
def test_evaluate_cli_writes_json_with_every_method_and_a_png(data, tmp_path):
    _, sino, image, dirs = data
    torch.manual_seed(0)
    net = FBSEMNet(2, 4, RegulariserConfig(dims=2, channels=4, layers=2), beta_init=0.05)
    model_path = save_model(tmp_path / "m.pt", net, {"sinogram_geometry": sino, "image_geometry": image,
                                                     "training_mode": "untrained"})
    out = tmp_path / "res"
    rc = cli(["evaluate", "--data", *map(str, dirs["test"]), "--tune-data", *map(str, dirs["tune"]),
              "--model", f"fbsem_tiny={model_path}", "--out", str(out), "--osem-iterations", "3",
              "--map-iterations", "2", "--betas", "0", "0.1", "1", "--fwhm-mm", "0", "6", "--bowsher", "2", "3",
              "--no-progress"])
    assert rc == 0
    result = json.loads((out / "evaluate.json").read_text())
    assert set(result["count_levels"]) == {f"{c:.3g}" for c in COUNTS}
    assert "separate tuning samples" in result["selection"]
    assert result["config"]["bowsher_neighbours"] == [2, 3]
    assert all("fbsem_tiny/map_em_bowsher" in entry for entry in result["summary"].values())
    for lv in result["count_levels"].values():
        assert lv["num_samples"] == 2 and lv["num_tuning_samples"] == 1
        assert len(lv["osem_nrmse_by_iteration"]) == 3
        methods = lv["methods"]
        assert set(methods) == {"osem", "osem_filtered", "map_em", "map_em_bowsher", "fbsem_tiny", "truth"}
        for name in ("osem", "osem_filtered", "map_em", "map_em_bowsher", "fbsem_tiny"):
            mean = methods[name]["mean"]
            assert 0 < mean["nrmse"] < 2 and mean["ssim"] < 1 and len(methods[name]["per_sample"]) == 2
            rows = methods[name]["per_sample"]
            for stat, f in (("mean", np.mean), ("median", np.median), ("std", np.std)):
                assert methods[name][stat]["nrmse"] == pytest.approx(f([r["nrmse"] for r in rows]), rel=1e-12)
        assert methods["map_em"]["hyperparameters"]["beta"] in (0.0, 0.1, 1.0)
        # choices at a grid's edge are flagged (the grid must be widened); beta 0, FWHM 0 and
        # iteration 1 are natural bounds, not edges; the neighbours grid 2, 3 is all edge
        for name, edges in (("osem", {"iterations": {3}}), ("osem_filtered", {"iterations": {3}, "fwhm_mm": {6.0}}),
                            ("map_em", {"iterations": {2}, "beta": {1.0}}),
                            ("map_em_bowsher", {"iterations": {2}, "beta": {1.0}, "neighbours": {2, 3}})):
            h = methods[name]["hyperparameters"]
            assert sorted(h["at_grid_edge"]) == sorted(k for k, v in edges.items() if h[k] in v), (name, h)
        bowsher = methods["map_em_bowsher"]["hyperparameters"]
        assert bowsher["neighbours"] in (2, 3) and bowsher["beta"] in (0.0, 0.1, 1.0)
        bgrid = np.array(lv["tuning_grids"]["map_em_bowsher_nrmse_by_neighbours_beta_and_iteration"])
        assert bgrid.shape == (2, 3, 2)
        # beta = 0 is OSEM whatever B: the same tuning NRMSE as the quadratic grid's beta = 0 row
        qgrid = np.array(lv["tuning_grids"]["map_em_nrmse_by_beta_and_iteration"])
        assert np.allclose(bgrid[:, 0, :], qgrid[0], rtol=0, atol=1e-12)
        assert methods["osem_filtered"]["hyperparameters"]["fwhm_mm"] in (0.0, 6.0)
        # selection on the tuning sample: the filtered grid contains the unfiltered OSEM iterates
        grid = np.array(lv["tuning_grids"]["filtered_nrmse_by_iteration_and_fwhm"])
        assert grid.min() <= min(lv["tuning_grids"]["osem_nrmse_by_iteration"]) + 1e-12
        assert methods["truth"]["mean"]["nrmse"] == 0.0
    # the targets' floor: each stage's noise-free target against the truth, on the scored phantoms
    _, _, image, _ = data
    for i, c in enumerate(COUNTS):
        ds = FBSEMSampleDataset(dirs["test"][i])
        expect = np.mean([[metrics.nrmse(t, s.phantom, evaluation_masks(s, image).head) for t in s.targets]
                          for s in (ds[0], ds[1])], axis=0)
        got = result["count_levels"][f"{c:.3g}"]["targets_nrmse_by_stage"]
        assert len(got) == 2 and got == pytest.approx(list(expect), rel=1e-9)
        assert 0 < got[-1] < 1
    png = (out / "evaluate.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    sets = result["phantom_sets"]
    assert sets["confirmation"] is True and sets["scored"]["role"] == "confirmation"
    assert sets["scored"]["seeds"] == [10, 11] and sets["scored"]["num_phantoms"] == 4
    assert sets["tuning"]["seeds"] == [20, 21] and sets["tuning"]["num_phantoms"] == 2
    # a model saved without training_data (as before 0.5) cannot be checked: recorded, not guessed
    assert sets["training"][0]["seeds"] is None and sets["disjoint_by_seed"] is None
    assert sets["unrecorded"] == ["training of fbsem_tiny"]


def _tiny_model(tmp_path, sino, image, training_data=None):
    torch.manual_seed(0)
    net = FBSEMNet(2, 4, RegulariserConfig(dims=2, channels=4, layers=2), beta_init=0.05)
    meta = {"sinogram_geometry": sino, "image_geometry": image, "training_mode": "untrained"}
    if training_data is not None:
        meta["training_data"] = training_data
    return save_model(tmp_path / "m.pt", net, meta)


def test_evaluate_refuses_a_confirmation_set_that_shares_phantoms_with_the_tuning_set(data, tmp_path, capsys):
    """Same base seed = same phantoms, whatever the count level: the confirmation set is refused
    before any sample is loaded or reconstructed, and nothing is written."""
    root, sino, image, dirs = data
    # the tuning set of seed 11 at a count level the confirmation set does not have
    cfg = SimulationConfig(num_subsets=4, num_stages=2, acquisition=AcquisitionParameters(counts=7e4))
    same_seed = tmp_path / "tune_seed11"
    simulate_dataset(same_seed, 1, sino, image, cfg, seed=11, progress=False)
    out = tmp_path / "res"
    for tune, shared in (([str(same_seed)], "1 phantom(s) (base seed(s) [11])"),
                         (list(map(str, dirs["test"])), "4 phantom(s) (base seed(s) [10, 11])")):
        capsys.readouterr()
        rc = cli(["evaluate", "--data", *map(str, dirs["test"]), "--tune-data", *tune,
                  "--out", str(out), "--osem-iterations", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert rc != 0 and err.startswith("sirf-fbsem evaluate: error: the confirmation set (")
        assert f"shares {shared} with the tuning set ({tune[0]}" in err and "another --seed" in err
    assert not out.exists()
    # disjoint seeds pass the check (and run)
    model = _tiny_model(tmp_path, sino, image, {"seed": 20, "indices": [0], "counts": [2e4]})
    torch.manual_seed(1)
    other = save_model(tmp_path / "m2.pt", FBSEMNet(2, 4, RegulariserConfig(dims=2, channels=4, layers=2),
                                                    beta_init=0.2),
                       {"sinogram_geometry": sino, "image_geometry": image, "training_mode": "untrained",
                        "training_data": {"seed": 21, "indices": [0], "counts": [3e5]}})
    torch.manual_seed(2)
    third = save_model(tmp_path / "m3.pt", FBSEMNet(2, 4, RegulariserConfig(dims=2, channels=4, layers=2),
                                                    beta_init=1.0),
                       {"sinogram_geometry": sino, "image_geometry": image, "training_mode": "untrained",
                        "training_data": {"seed": 22, "indices": [0], "counts": [3e5]}})
    rc = cli(["evaluate", "--data", str(dirs["test"][0]), "--tune-data", str(dirs["tune"][0]),
              "--model", f"m={model}", "--model", f"m={other}", "--model", f"n={model}", "--model", f"n={third}",
              "--out", str(out), "--osem-iterations", "1",
              "--map-iterations", "1", "--betas", "0.1", "--fwhm-mm", "0", "--no-progress"])
    assert rc == 0
    result = json.loads((out / "evaluate.json").read_text())
    sets = result["phantom_sets"]
    assert sets["disjoint_by_seed"] is True and sets["scored"]["num_phantoms"] == 2
    assert sets["training"][0] == {"role": "training of m@1", "sources": [str(model)], "seeds": [20],
                                   "num_phantoms": 1}
    assert sets["training"][1]["seeds"] == [21]
    # one method given twice: two runs (seeds) of "m", averaged per phantom, with their spread
    methods = result["count_levels"]["2e+04"]["methods"]
    m, runs = methods["m"], [methods["m@1"], methods["m@2"]]
    assert set(m["seeds"]) == {"m@1", "m@2"}
    for i in range(2):
        assert m["per_sample"][i]["nrmse"] == pytest.approx(np.mean([r["per_sample"][i]["nrmse"] for r in runs]))
    spread = m["spread_over_seeds"]["nrmse"]
    assert spread["num_seeds"] == 2 and spread["std"] == pytest.approx(
        np.std([r["mean"]["nrmse"] for r in runs], ddof=1))
    for i in range(2):  # each phantom's run-to-run spread
        assert m["per_sample"][i]["nrmse_seed_std"] == pytest.approx(
            np.std([r["per_sample"][i]["nrmse"] for r in runs], ddof=1))
    level = result["summary"]["2e+04"]
    summary = level["ratio_intervals"]
    # the groups, not their runs
    assert set(summary) == {f"{g}/{b}" for g in "mn" for b in ("osem", "osem_filtered", "map_em")}
    ci = summary["m/map_em"]["nrmse"]
    assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["verdict"] in ("better", "worse", "inconclusive")
    assert ci["estimate"] == pytest.approx(m["mean"]["nrmse"] / methods["map_em"]["mean"]["nrmse"])
    # learned against learned, on the same phantoms; and their run-to-run spreads
    n = methods["n"]
    assert set(level["learned_intervals"]) == {"m/n"} and set(level["seed_spread_intervals"]) == {"m/n"}
    ci = level["learned_intervals"]["m/n"]["ssim"]
    assert ci["estimate"] == pytest.approx(m["mean"]["ssim"] / n["mean"]["ssim"])
    ci = level["seed_spread_intervals"]["m/n"]["nrmse_seed_std"]
    assert ci["estimate"] == pytest.approx(np.mean([r["nrmse_seed_std"] for r in m["per_sample"]])
                                           / np.mean([r["nrmse_seed_std"] for r in n["per_sample"]]))
    assert ci["low"] <= ci["estimate"] <= ci["high"]


def test_evaluate_refuses_to_score_a_models_training_phantoms(data, tmp_path):
    _, sino, image, dirs = data
    # trained on sample 1 of seed 10: scoring dirs["test"][0] (seed 10, samples 0 and 1) is refused
    model = _tiny_model(tmp_path, sino, image, {"seed": 10, "indices": [1], "counts": [2e4]})
    args = ["evaluate", "--data", str(dirs["test"][0]), "--tune-data", str(dirs["tune"][0]),
            "--model", f"fbsem={model}", "--out", str(tmp_path / "res"), "--no-progress"]
    with pytest.raises(SetOverlapError, match=r"shares 1 phantom\(s\) .* training of fbsem set"):
        cli([*args, "--debug"])
    # with --max-samples 1 only sample 0 is scored: no overlap
    cli([*args, "--max-samples", "1", "--osem-iterations", "1", "--map-iterations", "1", "--betas", "0.1",
         "--fwhm-mm", "0"])
    assert (tmp_path / "res" / "evaluate.json").exists()


def test_phantom_sets_overlap_by_seed_and_index_and_unrecorded_sets_pass():
    a = phantom_set_of_manifests("confirmation", [("c", {"seed": 3}, 4)])
    assert a.pairs == {(3, i) for i in range(4)} and a.seeds == [3]
    check_disjoint(a, [phantom_set_of_manifests("tuning", [("t", {"seed": 4}, 9)])])
    check_disjoint(a, [phantom_set_of_manifests("tuning", [("t", {}, 9)])])  # no seed recorded
    both = phantom_set_of_manifests("tuning", [("t", {"seed": 4}, 2), ("u", {"seed": 3}, 4)])
    assert both.pairs == {(4, 0), (4, 1), *((3, i) for i in range(4))} and both.sources == ("t", "u")
    with pytest.raises(SetOverlapError, match=r"shares 1 phantom\(s\) \(base seed\(s\) \[3\]\) with the training of x"):
        check_disjoint(a, [phantom_set_of_manifests("tuning", [("t", {"seed": 4}, 2), ("u", {"seed": 5}, 4)]),
                           PhantomSet("training of x", ("x.pt",), frozenset({(3, 2)}))])


def test_evaluate_cli_rejects_a_malformed_model_flag(data, tmp_path):
    _, _, _, dirs = data
    with pytest.raises(SystemExit):
        cli(["evaluate", "--data", str(dirs["test"][0]), "--model", "no_equals_sign", "--out", str(tmp_path)])


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


class _Stop(RuntimeError):
    pass


def test_a_stopped_evaluate_resumes_from_its_finished_phantoms_to_the_same_results(data, tmp_path, monkeypatch, capsys):
    """Stopped by an error during the third network reconstruction: the tuning grids and two scored phantoms are
    kept in OUT/NAME.partial; a rerun without --resume is refused (naming --resume), with other grids refused
    (naming what differs), and with --resume computes only what was missing, writes the JSON an uninterrupted run
    writes (but for times) and removes the partial results."""
    import sirf_fbsem.evaluation as ev

    _, sino, image, dirs = data
    model = _tiny_model(tmp_path, sino, image)
    args = ["evaluate", "--data", *map(str, dirs["test"]), "--tune-data", *map(str, dirs["tune"]),
            "--model", f"fbsem_tiny={model}", "--osem-iterations", "2", "--map-iterations", "2",
            "--betas", "0", "0.1", "--fwhm-mm", "0", "6", "--no-progress"]
    assert cli([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "evaluate.json").read_text())
    assert not (tmp_path / "whole" / "evaluate.partial").exists()

    calls = {"grids": 0, "networks": 0}
    sample_grids, run_network = ev._sample_grids, ev._run_network

    def counted_grids(*a, **k):
        calls["grids"] += 1
        return sample_grids(*a, **k)

    def failing_network(*a, **k):
        calls["networks"] += 1
        if calls["networks"] == 3:
            raise _Stop("stopped")
        return run_network(*a, **k)

    monkeypatch.setattr(ev, "_sample_grids", counted_grids)
    monkeypatch.setattr(ev, "_run_network", failing_network)
    out = tmp_path / "res"
    assert cli([*args, "--out", str(out)]) != 0  # the error is reported, the finished phantoms kept
    partial = out / "evaluate.partial"
    assert not (out / "evaluate.json").exists()
    assert len(list(partial.glob("grid_*.npz"))) == 2 and len(list(partial.glob("scored_*.json"))) == 2
    for f in partial.glob("scored_*.npz"):  # the montage's slices, not volumes: small enough to carry
        with np.load(f) as images:
            assert images.files and all(images[k].ndim == 2 for k in images.files)
    kept = sorted(p.name for p in partial.iterdir())

    capsys.readouterr()
    assert cli([*args, "--out", str(out)]) != 0
    assert "--resume" in capsys.readouterr().err
    assert cli([*args, "--out", str(out), "--resume", "--betas", "0", "1"]) != 0
    err = capsys.readouterr().err
    assert "--resume" in err and "config" in err
    assert sorted(p.name for p in partial.iterdir()) == kept  # refused runs touch nothing

    calls.update(grids=0, networks=0)
    monkeypatch.setattr(ev, "_run_network", run_network)
    assert cli([*args, "--out", str(out), "--resume"]) == 0
    assert calls["grids"] == 0  # both levels' tuning grids were kept
    resumed = json.loads((out / "evaluate.json").read_text())
    assert _without_seconds(resumed) == _without_seconds(whole)
    assert not partial.exists()


def test_evaluate_leaves_alone_a_partial_directory_it_did_not_write(data, tmp_path, capsys):
    _, sino, image, dirs = data
    foreign = tmp_path / "res" / "evaluate.partial"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    rc = cli(["evaluate", "--data", str(dirs["test"][0]), "--tune-data", str(dirs["tune"][0]),
              "--out", str(tmp_path / "res"), "--osem-iterations", "1", "--no-progress", "--resume"])
    assert rc != 0 and "not written by sirf-fbsem evaluate" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "res" / "evaluate.json").exists()


def test_stage_gap_script_agrees_with_evaluate_on_the_last_stage_and_the_targets(data, tmp_path, monkeypatch):
    """pipelines/stage_gap.py runs the model stage by stage; its last stage's NRMSE and its targets'
    NRMSE by stage are what ``sirf-fbsem evaluate`` reports for the same model and samples."""
    import importlib.util
    from pathlib import Path

    _, sino, image, dirs = data
    torch.manual_seed(0)
    net = FBSEMNet(2, 4, RegulariserConfig(dims=2, channels=4, layers=2), beta_init=0.05)
    model_path = save_model(tmp_path / "m.pt", net, {"sinogram_geometry": sino, "image_geometry": image,
                                                     "training_mode": "untrained"})
    rc = cli(["evaluate", "--data", str(dirs["test"][0]), "--model", f"tiny={model_path}", "--out",
              str(tmp_path / "ev"), "--osem-iterations", "1", "--map-iterations", "1", "--betas", "0.1",
              "--fwhm-mm", "0", "--no-progress"])
    assert rc == 0
    level = next(iter(json.loads((tmp_path / "ev" / "evaluate.json").read_text())["count_levels"].values()))
    spec = importlib.util.spec_from_file_location("stage_gap", Path(__file__).resolve().parents[1] / "pipelines"
                                                  / "stage_gap.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "pipelines"))  # its sibling's helpers
    monkeypatch.setitem(__import__("sys").modules, "stage_gap", mod)
    spec.loader.exec_module(mod)
    assert mod.main(["--data", str(dirs["test"][0]), "--model", str(model_path), "--out", str(tmp_path / "gap")]) == 0
    gap = json.loads((tmp_path / "gap.json").read_text())
    mean = gap["mean_by_stage"]
    assert mean["output_vs_truth"][-1] == pytest.approx(level["methods"]["tiny"]["mean"]["nrmse"], rel=1e-5)
    assert mean["target_vs_truth"] == pytest.approx(level["targets_nrmse_by_stage"], rel=1e-9)
    assert len(gap["samples"]) == 2 and all(v > 0 for v in mean["output_vs_target"])
    assert (tmp_path / "gap.png").stat().st_size > 0
    # a model with more stages than the data's targets is refused, naming the sample and the flag
    big = save_model(tmp_path / "big.pt", FBSEMNet(3, 4, RegulariserConfig(dims=2, channels=4, layers=2)),
                     {"sinogram_geometry": sino, "image_geometry": image, "training_mode": "untrained"})
    with pytest.raises(ValueError, match="--num-stages >= 3"):
        mod.main(["--data", str(dirs["test"][0]), "--model", str(big), "--out", str(tmp_path / "gap2")])
    assert not (tmp_path / "gap2.json").exists()

    # --run: the stages a sequential run has finished, before it writes its model
    run = tmp_path / "run"
    assert cli(["train", "--data", str(dirs["test"][0]), "--out", str(run), "--mode", "sequential", "--epochs", "1",
                "--dims", "2", "--channels", "4", "--layers", "2", "--validation-fraction", "0", "--no-progress"]) == 0
    assert mod.main(["--data", str(dirs["test"][0]), "--model", str(run / "model.pt"), "--out",
                     str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())["mean_by_stage"]
    assert mod.main(["--data", str(dirs["test"][0]), "--run", str(run), "--out", str(tmp_path / "run2")]) == 0
    by_run = json.loads((tmp_path / "run2.json").read_text())["mean_by_stage"]
    assert by_run.keys() == whole.keys() and all(by_run[k] == pytest.approx(whole[k], rel=1e-6) for k in whole)
    last = run / "checkpoints" / "stage_001.pt"  # stage 2 unfinished: stage 1 alone, as the model's stage 1
    payload = torch.load(last, weights_only=True)
    payload["train_state"]["complete"] = False
    torch.save(payload, last)
    assert mod.main(["--data", str(dirs["test"][0]), "--run", str(run), "--out", str(tmp_path / "run1")]) == 0
    part = json.loads((tmp_path / "run1.json").read_text())
    assert part["num_stages"] == 1
    assert part["mean_by_stage"]["output_vs_truth"] == pytest.approx(whole["output_vs_truth"][:1], rel=1e-6)
    # diagnostics: every beta times a factor, on chosen samples (count-unaware strengths only)
    net = mod.finished_stages(run)
    assert net.beta_counts == "log_linear"  # as trained: the run signature's network
    with pytest.raises(ValueError, match="count-unaware strengths only"):
        mod.scale_betas(net, 0.25)
    unaware = tmp_path / "run_unaware"
    assert cli(["train", "--data", str(dirs["test"][0]), "--out", str(unaware), "--mode", "sequential", "--epochs",
                "1", "--dims", "2", "--channels", "4", "--layers", "2", "--validation-fraction", "0", "--no-progress",
                "--beta-counts", "none"]) == 0
    net = mod.finished_stages(unaware)
    before = net.betas.detach().clone()
    mod.scale_betas(net, 0.25)
    assert torch.allclose(net.betas, 0.25 * before, rtol=1e-5)
    assert mod.main(["--data", str(dirs["test"][0]), "--run", str(unaware), "--out", str(tmp_path / "as_trained"),
                     "--indices", "1"]) == 0
    assert mod.main(["--data", str(dirs["test"][0]), "--run", str(unaware), "--out", str(tmp_path / "scaled"),
                     "--indices", "1", "--beta-scale", "0.25"]) == 0
    trained = json.loads((tmp_path / "as_trained.json").read_text())
    scaled = json.loads((tmp_path / "scaled.json").read_text())
    assert scaled["beta_scale"] == 0.25 and len(scaled["samples"]) == 1
    assert scaled["samples"][0]["output_vs_truth"] != pytest.approx(trained["samples"][0]["output_vs_truth"], rel=1e-4)
    assert scaled["samples"][0]["target_vs_truth"] == pytest.approx(trained["samples"][0]["target_vs_truth"], rel=1e-9)
    (run / "checkpoints" / "stage_000.pt").unlink()
    with pytest.raises(ValueError, match="no finished stage"):
        mod.main(["--data", str(dirs["test"][0]), "--run", str(run), "--out", str(tmp_path / "run0")])


def test_a_confirmation_run_takes_the_tuning_runs_grids_and_makes_the_same_choices(data, tmp_path, monkeypatch, capsys):
    """``--tuning-result TUNE.json``: the confirmation run reads the baselines' grids from the study's tuning run
    (``evaluate --data TUNE``) instead of reconstructing the tuning phantoms again, and writes what a run that
    computes them writes (choices, grids, every method's metrics; the selection names the file). A tuning result
    from other phantoms, other grids or another subset count, one lacking a count level, or one given without
    --tune-data, is refused before any reconstruction, naming the file and what differs, and nothing is written."""
    import sirf_fbsem.evaluation as ev

    _, sino, image, dirs = data
    model = _tiny_model(tmp_path, sino, image)
    grid = ["--osem-iterations", "3", "--map-iterations", "2", "--betas", "0", "0.1", "1", "--fwhm-mm", "0", "6",
            "--no-progress"]
    tune_dirs = list(map(str, dirs["tune"]))
    assert cli(["evaluate", "--data", *tune_dirs, "--out", str(tmp_path / "tune"), "--name", "tune", *grid]) == 0
    tune_json = tmp_path / "tune" / "tune.json"
    confirm = ["evaluate", "--data", *map(str, dirs["test"]), "--tune-data", *tune_dirs,
               "--model", f"fbsem_tiny={model}", *grid]
    assert cli([*confirm, "--out", str(tmp_path / "computed")]) == 0
    computed = json.loads((tmp_path / "computed" / "evaluate.json").read_text())

    calls = {"grids": 0}
    sample_grids = ev._sample_grids

    def counted(*a, **k):
        calls["grids"] += 1
        return sample_grids(*a, **k)

    monkeypatch.setattr(ev, "_sample_grids", counted)
    assert cli([*confirm, "--tuning-result", str(tune_json), "--out", str(tmp_path / "read")]) == 0
    assert calls["grids"] == 0  # no tuning phantom reconstructed
    read = json.loads((tmp_path / "read" / "evaluate.json").read_text())
    assert read["tuning_result"] == str(tune_json) and str(tune_json) in read["selection"]
    assert computed["tuning_result"] is None
    for key, level in computed["count_levels"].items():
        got = read["count_levels"][key]
        assert got["num_tuning_samples"] == level["num_tuning_samples"] == 1
        for name, values in level["tuning_grids"].items():
            np.testing.assert_allclose(got["tuning_grids"][name], values, rtol=1e-12, atol=0)
        for name, method in level["methods"].items():
            assert got["methods"][name].get("hyperparameters") == method.get("hyperparameters"), name
            assert got["methods"][name]["per_sample"] == method["per_sample"], name
    assert _without_seconds(read["summary"]) == _without_seconds(computed["summary"])

    # refusals, before any reconstruction (the patched grids would count one) and with nothing written
    other_phantoms = tmp_path / "on_test"  # a "tuning run" scored on the confirmation phantoms
    assert cli(["evaluate", "--data", *map(str, dirs["test"]), "--out", str(other_phantoms), *grid]) == 0
    one_level = tmp_path / "one_level"
    assert cli(["evaluate", "--data", tune_dirs[0], "--out", str(one_level), *grid]) == 0
    calls["grids"] = 0
    out = tmp_path / "refused"
    for extra, needle in (
        (["--tuning-result", str(other_phantoms / "evaluate.json")], "base seed(s) [10, 11], but --tune-data holds 2 "
                                                                    "of base seed(s) [20, 21]"),
        (["--tuning-result", str(tune_json), "--betas", "0", "0.3"], "map_betas [0.0, 0.1, 1.0] there, [0.0, 0.3] here"),
        (["--tuning-result", str(tune_json), "--subsets", "2"], "--subsets None there, 2 here"),
        (["--tuning-result", str(one_level / "evaluate.json")], "phantoms of base seed(s) [20], but --tune-data"),
        (["--tuning-result", str(tmp_path / "missing.json")], "cannot be read as JSON"),
        (["--tuning-result", str(model)], "cannot be read as JSON"),
    ):
        capsys.readouterr()
        assert cli([*confirm, *extra, "--out", str(out)]) != 0
        err = capsys.readouterr().err
        assert err.startswith("sirf-fbsem evaluate: error: --tuning-result ") and needle in err, (needle, err)
    capsys.readouterr()
    assert cli(["evaluate", "--data", *map(str, dirs["test"]), "--tuning-result", str(tune_json),
                "--out", str(out), *grid]) != 0
    assert "--tuning-result needs --tune-data" in capsys.readouterr().err
    # the grids of a count level the scored set has and the tuning result lacks: refused by level
    edited = json.loads(tune_json.read_text())
    del edited["count_levels"]["3e+05"]
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    capsys.readouterr()
    assert cli([*confirm, "--tuning-result", str(tmp_path / "edited.json"), "--out", str(out)]) != 0
    assert "no tuning grids at 3e+05 counts (it has ['2e+04'])" in capsys.readouterr().err
    assert calls["grids"] == 0 and not out.exists()
