"""Training-data simulation: phantoms, acquisition, OSEM targets, the on-disk dataset.

Runs on a genuinely 2D problem (a single-ring copy of the small test scanner, one
direct sinogram, a one-slice image; see ``single_slice_geometry``) plus a small 3D case.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import pytest
import torch

from sirf_fbsem.geometry import ImageGeometry, SinogramGeometry, scanner_preset
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
from sirf_fbsem.recon.osem import OSEM
from sirf_fbsem.simulation import (
    AcquisitionParameters,
    DatasetError,
    FBSEMSampleDataset,
    PhantomParameters,
    SimulationConfig,
    Tissue,
    attenuation_factors,
    load_manifest,
    load_sample,
    osem_targets,
    procedural_phantom,
    simulate_acquisition,
    simulate_dataset,
    single_slice_geometry,
)
from sirf_fbsem.errors import InputError
from sirf_fbsem.samples import Sample
from sirf_fbsem.simulation import dataset as dataset_module
from sirf_fbsem.simulation import phantoms as phantoms_module
from sirf_fbsem.simulation.cli import add_simulate_arguments, geometry_from_args, run_simulate
from sirf_fbsem.simulation.phantoms import MU_WATER_PER_CM

NUM_SUBSETS = 4


@pytest.fixture(scope="module")
def geom2d():
    return single_slice_geometry(scanner_preset("small_test"))


@pytest.fixture(scope="module")
def model2d(geom2d):
    sino, image = geom2d
    return EmbeddedAcquisitionModel(sino, image, num_subsets=NUM_SUBSETS)


@pytest.fixture(scope="module")
def geom3d():
    sino = SinogramGeometry.from_span(scanner_preset("small_test"), span=3, max_ring_diff=7)
    return sino, ImageGeometry((15, 31, 31), (2.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def phantom2d(geom2d):
    return procedural_phantom(geom2d[1], 0, PhantomParameters(supersample=1))


@pytest.fixture(scope="module")
def acq2d(phantom2d, model2d):
    return simulate_acquisition(phantom2d, model2d, AcquisitionParameters(counts=2e6), rng=1)


# ============================================================================ geometry of the 2D case
def test_single_slice_geometry_is_2d(geom2d, model2d):
    sino, image = geom2d
    assert sino.shape == (1, 1, 48, 48)
    assert image.shape[0] == 1
    # the LOR plane passes through the slice centre: a uniform slice projects to the length of
    # the traced part of each LOR (STIR's: the FOV chord reaching out to its end voxels' edges),
    # in STIR's pixel units (mm / x voxel size)
    from sirf_fbsem.projectors.joseph_numba import stir_u_range

    y = model2d.direct(torch.ones(image.shape)) * image.voxel_size_mm[2]
    r = image.fov_radius_mm()
    _, yc, xc = image.centred_coordinates_mm()
    phi, s = sino.phi_rad(), sino.s_mm()
    vz, vy, vx = image.voxel_size_mm

    def length(p: float, st: float) -> float:
        u_lo, u_hi = stir_u_range(st, np.cos(p), np.sin(p), r, xc[0], yc[0], vx, vy)
        return u_hi - u_lo

    traced = torch.tensor([[length(p, st) for st in s] for p in phi], dtype=torch.float32)
    central = torch.as_tensor(np.abs(s) < 0.5 * r)
    torch.testing.assert_close(y[0, 0][:, central], traced[:, central], rtol=0.03, atol=0.0)


# ============================================================================ phantoms
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_phantom_tissue_values(seed, dims, geom2d, geom3d):
    image = geom2d[1] if dims == "2d" else geom3d[1]
    ph = procedural_phantom(image, seed, PhantomParameters(supersample=1))
    assert ph.activity.shape == ph.mu_map.shape == ph.anatomical.shape == ph.labels.shape == image.shape
    assert ph.activity.dtype == np.float32 and ph.lesion_mask.dtype == np.int8
    gm = ph.tissue_mask(Tissue.GREY_MATTER) & (ph.lesion_mask == 0)
    wm = ph.tissue_mask(Tissue.WHITE_MATTER) & (ph.lesion_mask == 0)
    assert gm.sum() > 10 and wm.sum() > 10
    ratio = ph.activity[gm].mean() / ph.activity[wm].mean()
    assert 3.4 < ratio < 4.6
    assert ratio == pytest.approx(ph.grey_white_ratio, rel=0.1)
    # attenuation: air 0, soft tissue water, bone in the documented range
    assert np.all(ph.mu_map[ph.labels == Tissue.BACKGROUND] == 0)
    soft = ph.tissue_mask(Tissue.SCALP, Tissue.CSF, Tissue.GREY_MATTER, Tissue.WHITE_MATTER, Tissue.DEEP_GREY_MATTER)
    np.testing.assert_allclose(ph.mu_map[soft], MU_WATER_PER_CM, rtol=1e-6)
    bone = ph.mu_map[ph.labels == Tissue.SKULL]
    assert bone.size > 0 and np.all((bone >= 0.15) & (bone <= 0.17))
    # MR-like contrast: white > grey > CSF
    t1 = ph.anatomical
    assert t1[wm].mean() > t1[gm].mean() > t1[ph.labels == Tissue.CSF].mean()
    assert np.all(ph.activity >= 0) and np.all(ph.activity[ph.labels == Tissue.BACKGROUND] == 0)


@pytest.mark.parametrize("seed", range(6))
def test_lesions_inside_the_head(seed, geom2d, geom3d):
    image = geom3d[1] if seed % 2 else geom2d[1]
    params = PhantomParameters(num_hot_lesions=(2, 3), num_cold_lesions=(1, 2))
    ph = procedural_phantom(image, seed, params)
    assert len(ph.lesions) >= 1
    assert set(np.unique(ph.lesion_mask)) <= {-1, 0, 1}
    in_lesion = ph.lesion_mask != 0
    assert in_lesion.any()
    intracranial = ph.tissue_mask(Tissue.CSF, Tissue.GREY_MATTER, Tissue.WHITE_MATTER, Tissue.DEEP_GREY_MATTER)
    assert np.all(intracranial[in_lesion])
    for les in ph.lesions:
        assert (les.contrast > 1) == les.hot
    assert (ph.lesion_mask == 1).any() == any(les.hot for les in ph.lesions)


def test_phantom_partial_volume_and_determinism(geom2d):
    image = geom2d[1]
    a = procedural_phantom(image, 5)
    b = procedural_phantom(image, 5)
    c = procedural_phantom(image, 6)
    for name in ("activity", "mu_map", "anatomical", "labels", "lesion_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.activity, c.activity)
    assert a.mu_map.min() >= 0 and a.mu_map.max() <= 0.17


@pytest.mark.slow
def test_mni152_phantom(geom2d, geom3d):
    pytest.importorskip("nilearn")
    ph = phantoms_module.mni152_phantom(geom3d[1], 3)
    assert ph.kind == "mni152" and ph.activity.shape == geom3d[1].shape
    gm = ph.tissue_mask(Tissue.GREY_MATTER) & (ph.lesion_mask == 0)
    wm = ph.tissue_mask(Tissue.WHITE_MATTER) & (ph.lesion_mask == 0)
    assert gm.any() and wm.any()
    assert ph.activity[gm].mean() > 1.5 * ph.activity[wm].mean()  # 4 mm voxels: partial volume blurs the 4:1
    assert ph.mu_map.min() >= 0 and ph.mu_map.max() <= 0.17
    assert ph.mu_map[ph.labels == Tissue.SKULL].max() > 0.12
    assert np.all(ph.labels[ph.lesion_mask != 0] != Tissue.BACKGROUND)
    ph2 = phantoms_module.mni152_phantom(geom2d[1], 3)
    assert ph2.brain_mask.any()


def test_mni152_without_nilearn_names_the_extra(monkeypatch, geom2d):
    phantoms_module._load_mni152.cache_clear()
    monkeypatch.setitem(sys.modules, "nilearn", None)
    with pytest.raises(ImportError, match=r"pip install sirf_fbsem\[phantoms\]"):
        phantoms_module.mni152_phantom(geom2d[1], 0)
    phantoms_module._load_mni152.cache_clear()


def test_mni152_templates_file_gives_nilearns_phantoms(tmp_path, geom2d, monkeypatch):
    """``simulate --mni152-templates``: the templates written to a file make the same phantoms and samples,
    where nilearn is absent (a GPU node)."""
    pytest.importorskip("nilearn")
    path = phantoms_module.save_mni152_templates(tmp_path / "mni152.npz")
    assert path.stat().st_size < 8e6
    ref = phantoms_module.mni152_phantom(geom2d[1], 7)
    monkeypatch.setitem(sys.modules, "nilearn", None)
    got = phantoms_module.mni152_phantom(geom2d[1], 7, templates_file=path)
    for name in ("activity", "mu_map", "anatomical", "labels", "lesion_mask"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    # the command line: the same data set as with nilearn, and the manifest does not name the file
    monkeypatch.undo()
    common = ["--num-samples", "1", "--2d", "--counts", "1e4", "--num-stages", "1", "--num-subsets", "1",
              "--phantom", "mni152", "--seed", "4"]
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    assert run_simulate(parser.parse_args(["--out", str(tmp_path / "a"), *common, "--no-progress"])) == 0
    monkeypatch.setitem(sys.modules, "nilearn", None)
    assert run_simulate(parser.parse_args(["--out", str(tmp_path / "b"), *common, "--no-progress",
                                           "--mni152-templates", str(path)])) == 0
    a = torch.load(tmp_path / "a" / "sample_00000.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "sample_00000.pt", weights_only=True)
    for k in ("prompts", "targets", "phantom", "mu_map"):
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()


def test_a_bad_mni152_templates_file_is_refused_before_any_sample(tmp_path, geom2d):
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    bad = tmp_path / "bad.npz"
    np.savez(bad, gm=np.zeros((4, 4, 4), np.float32), affine=np.eye(4))
    for path, why in ((tmp_path / "none.npz", "no such file"), (bad, r"lacks \['wm', 't1'\]")):
        args = parser.parse_args(["--out", str(tmp_path / "o"), "--num-samples", "1", "--2d", "--phantom", "mixed",
                                  "--mni152-templates", str(path)])
        with pytest.raises(InputError, match=f"{path}.*{why}" if path == bad else why):
            run_simulate(args)
        assert not (tmp_path / "o").exists()
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--num-samples", "1", "--2d", "--mni152-templates",
                              str(bad)])
    with pytest.raises(InputError, match="--phantom is procedural"):
        run_simulate(args)


def test_phantom_parameters_validated():
    with pytest.raises(ValueError, match="bone_mu_per_cm"):
        PhantomParameters(bone_mu_per_cm=(0.2, 0.1))
    with pytest.raises(ValueError, match="supersample"):
        PhantomParameters(supersample=0)


# ============================================================================ acquisition
def test_attenuation_factors(phantom2d, model2d, acq2d, geom2d):
    sino, image = geom2d
    att = acq2d.attenuation
    assert att.shape == sino.shape
    assert torch.all(att > 0) and torch.all(att <= 1)
    # independent: exp(-0.1 * line integrals in mm of mu in 1/cm); the projector's pixel units x vx = mm
    geo = EmbeddedAcquisitionModel(sino, image)
    expected = torch.exp(-0.1 * geo.direct(torch.from_numpy(phantom2d.mu_map)) * image.voxel_size_mm[2])
    torch.testing.assert_close(att, expected, rtol=1e-6, atol=1e-7)
    # LORs that miss the head are not attenuated
    misses = geo.direct(torch.from_numpy(phantom2d.head_mask.astype(np.float32))) == 0
    assert misses.any()
    assert torch.all(att[misses] == 1)
    assert att.min() < 0.5
    torch.testing.assert_close(acq2d.multiplicative, acq2d.normalisation * att)


def test_attenuation_of_a_water_disc_by_hand(model2d, geom2d):
    """Through the centre of a 60 mm-radius water disc: exp(-0.096 /cm x 12 cm)."""
    _, image = geom2d
    _, y, x = image.centred_coordinates_mm()
    disc = (y[:, None] ** 2 + x[None, :] ** 2 <= 60.0**2).astype(np.float32)[None] * MU_WATER_PER_CM
    att = attenuation_factors(model2d, disc)
    t0 = int(np.argmin(np.abs(model2d.sinogram_geometry.s_mm())))
    expected = math.exp(-MU_WATER_PER_CM * 12.0)
    np.testing.assert_allclose(att[0, 0, :, t0].numpy(), expected, rtol=0.05)


def test_expected_counts_and_fractions(acq2d, model2d):
    counts = 2e6
    assert float(acq2d.noise_free.double().sum()) == pytest.approx(counts, rel=1e-4)
    assert float(acq2d.randoms.double().sum()) == pytest.approx(0.2 * counts, rel=1e-4)
    assert float(acq2d.scatter.double().sum()) == pytest.approx(0.2 * counts, rel=1e-4)
    torch.testing.assert_close(acq2d.additive, acq2d.randoms + acq2d.scatter)
    # the noise-free data are the model with these terms applied to the scaled activity
    m = acq2d.acquisition_model(model2d)
    torch.testing.assert_close(m.forward(acq2d.activity), acq2d.noise_free, rtol=1e-4, atol=1e-3)
    assert acq2d.activity_scale > 0
    assert torch.all(acq2d.randoms >= 0) and torch.all(acq2d.scatter >= 0)


def test_poisson_noise_statistics(acq2d):
    y, mean = acq2d.prompts.double(), acq2d.noise_free.double()
    assert torch.equal(y, y.round()) and torch.all(y >= 0)
    total = float(mean.sum())
    assert abs(float(y.sum()) - total) < 5 * math.sqrt(total)
    busy = mean > 20
    z = (y[busy] - mean[busy]) / mean[busy].sqrt()
    assert abs(float(z.mean())) < 0.1
    assert float(z.var()) == pytest.approx(1.0, abs=0.15)


def test_noise_free_option_and_gaps(phantom2d, model2d):
    p = AcquisitionParameters(counts=1e5, poisson=False, detector_gap_period=8)
    acq = simulate_acquisition(phantom2d, model2d, p, rng=3)
    assert torch.equal(acq.prompts, acq.noise_free)
    dead = acq.normalisation == 0
    assert dead.any()
    assert torch.all(acq.noise_free[dead] == 0)
    assert float(acq.noise_free.double().sum()) == pytest.approx(1e5, rel=1e-4)


def test_acquisition_parameters_validated():
    with pytest.raises(ValueError, match="must be < 1"):
        AcquisitionParameters(randoms_fraction=0.6, scatter_fraction=0.5)
    with pytest.raises(ValueError, match="counts"):
        AcquisitionParameters(counts=0)


def test_acquisition_3d_counts(geom3d):
    sino, image = geom3d
    model = EmbeddedAcquisitionModel(sino, image, num_subsets=2)
    ph = procedural_phantom(image, 11)
    params = AcquisitionParameters(counts=3e6, randoms_fraction=0.1, scatter_fraction=0.3)
    acq = simulate_acquisition(ph, model, params, 4)
    assert acq.prompts.shape == sino.shape
    assert float(acq.noise_free.double().sum()) == pytest.approx(3e6, rel=1e-4)
    assert float(acq.scatter.double().sum()) == pytest.approx(0.9e6, rel=1e-4)


# ============================================================================ targets
def test_targets_equal_an_independent_osem_run(acq2d, model2d, geom2d):
    sino, image = geom2d
    K = 7  # more than one full iteration of 4 subsets
    targets = osem_targets(acq2d.acquisition_model(model2d), acq2d.noise_free, K)
    assert targets.shape == (K,) + image.shape
    # an independently built model with the same terms, OSEM stepped by hand
    model = EmbeddedAcquisitionModel(
        sino, image, num_subsets=NUM_SUBSETS, multiplicative=acq2d.multiplicative, additive=acq2d.additive
    )
    x0 = model.support().float()  # the engine's start image: 1 where some LOR sees the voxel
    # the count-matched rule: x0's expected true counts on subset 0 equal the noise-free ones
    y0 = model.take_subset(acq2d.noise_free, 0)
    x0 = x0 * (y0.sum() - model.additive_term(0).sum()) / model.direct(x0, 0).sum()
    algo = OSEM(model, acq2d.noise_free, initial=x0)
    for k in range(K):
        torch.testing.assert_close(targets[k], algo.update(), rtol=1e-6, atol=1e-6)
    # and the first two sub-iterates written out: subset 0 from the start image, then subset 1
    x = x0
    for k, s in enumerate((0, 1)):
        y_s = model.take_subset(acq2d.noise_free, s)
        ratio = y_s / (model.direct(x, s) + model.additive_term(s))
        sens = model.adjoint(torch.ones_like(y_s), s)
        x = torch.where(sens > 0, x / sens.clamp_min(1e-30) * model.adjoint(ratio, s), torch.zeros_like(x))
        torch.testing.assert_close(targets[k], x, rtol=1e-5, atol=1e-6)


def test_targets_approach_the_phantom(acq2d, model2d):
    targets = osem_targets(acq2d.acquisition_model(model2d), acq2d.noise_free, 12)
    truth = acq2d.activity
    err = [(t - truth).norm() / truth.norm() for t in targets]
    assert err[-1] < err[0]
    assert float(targets[-1].sum()) == pytest.approx(float(truth.sum()), rel=0.1)


# ============================================================================ dataset
def _config(**kw) -> SimulationConfig:
    base = dict(num_subsets=2, num_stages=3, acquisition=AcquisitionParameters(counts=5e4))
    base.update(kw)
    return SimulationConfig(**base)


def _tensors_equal(a: Sample, b: Sample) -> None:
    a, b = a.to_dict(), b.to_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_dataset_contract_and_resume(tmp_path, geom2d, monkeypatch):
    sino, image = geom2d
    cfg = _config()
    full = tmp_path / "full"
    files = simulate_dataset(full, 3, sino, image, cfg, seed=7, progress=False)
    assert [f.name for f in files] == ["sample_00000.pt", "sample_00001.pt", "sample_00002.pt"]
    manifest = load_manifest(full)
    assert manifest["files"] == [f.name for f in files]
    assert manifest["num_subsets"] == 2 and manifest["num_stages"] == 3 and manifest["counts"] == 5e4
    assert manifest["seed"] == 7 and manifest["phantom"] == "procedural"
    assert manifest["randoms_fraction"] == 0.2 and manifest["scatter_fraction"] == 0.2
    raw = torch.load(files[0], weights_only=True)  # the file contract: a plain dict of every field
    assert isinstance(raw, dict) and sorted(raw) == sorted(dataset_module.SAMPLE_KEYS)
    samples = [load_sample(f, manifest) for f in files]
    s0 = samples[0]
    assert isinstance(s0, Sample) and all(torch.equal(raw[k], v) if isinstance(v, torch.Tensor) else raw[k] == v
                                          for k, v in s0.to_dict().items())
    assert s0.prompts.shape == sino.shape and s0.prompts.dtype == torch.float32
    assert s0.multiplicative.shape == s0.additive.shape == sino.shape
    assert s0.sensitivity.shape == (2,) + image.shape
    assert s0.targets.shape == (3,) + image.shape
    for key in ("phantom", "anatomical", "mu_map", "lesion_mask"):
        assert getattr(s0, key).shape == image.shape
    assert s0.lesion_mask.dtype == torch.int8
    assert isinstance(s0.counts, float) and isinstance(s0.seed, int) and s0.index == 0
    assert not torch.equal(samples[0].phantom, samples[1].phantom)
    # the stored sensitivities are those of the sample's model
    m = EmbeddedAcquisitionModel(sino, image, num_subsets=2, multiplicative=s0.multiplicative)
    torch.testing.assert_close(s0.sensitivity[1], m.sensitivity(1))

    ds = FBSEMSampleDataset(full, sinogram_geometry=sino, image_geometry=image, num_stages=3)
    assert len(ds) == 3 and ds.num_subsets == 2
    _tensors_equal(ds[2], samples[2])

    # interrupted run: drop the last sample and its manifest entry, then resume
    part = tmp_path / "part"
    simulate_dataset(part, 3, sino, image, cfg, seed=7, progress=False)
    (part / "sample_00002.pt").unlink()
    m_part = json.loads((part / "manifest.json").read_text())
    m_part["files"].remove("sample_00002.pt")
    (part / "manifest.json").write_text(json.dumps(m_part))
    calls = []
    real = dataset_module.simulate_sample

    def counting(model, config, seed, index):
        calls.append(index)
        return real(model, config, seed, index)

    monkeypatch.setattr(dataset_module, "simulate_sample", counting)
    simulate_dataset(part, 3, sino, image, cfg, seed=7, progress=False)
    assert calls == [2]
    assert load_manifest(part)["files"] == manifest["files"]
    for f in files:
        _tensors_equal(load_sample(part / f.name), load_sample(f))
    # nothing left to do
    calls.clear()
    simulate_dataset(part, 3, sino, image, cfg, seed=7, progress=False)
    assert calls == []

    # other settings do not mix into an existing dataset
    with pytest.raises(DatasetError, match="num_stages"):
        simulate_dataset(part, 3, sino, image, _config(num_stages=4), seed=7, progress=False)
    with pytest.raises(DatasetError, match="seed"):
        simulate_dataset(part, 3, sino, image, cfg, seed=8, progress=False)


def test_dataset_errors_name_the_file(tmp_path, geom2d, geom3d):
    sino, image = geom2d
    d = tmp_path / "ds"
    simulate_dataset(d, 2, sino, image, _config(), seed=1, progress=False)
    (d / "sample_00001.pt").write_bytes(b"this is not a torch file")
    ds = FBSEMSampleDataset(d)
    ds[0]
    with pytest.raises(DatasetError, match="sample_00001.pt"):
        ds[1]
    # a file missing a key
    sample = torch.load(d / "sample_00000.pt", weights_only=True)
    del sample["targets"]
    torch.save(sample, d / "sample_00001.pt")
    with pytest.raises(DatasetError, match=r"sample_00001.pt.*targets"):
        ds[1]
    # wrong shapes
    sample = torch.load(d / "sample_00000.pt", weights_only=True)
    sample["prompts"] = sample["prompts"][..., :-1]
    torch.save(sample, d / "sample_00001.pt")
    with pytest.raises(DatasetError, match=r"sample_00001.pt.*prompts"):
        ds[1]
    # a listed file that is gone
    (d / "sample_00001.pt").unlink()
    with pytest.raises(DatasetError, match="sample_00001.pt"):
        FBSEMSampleDataset(d)
    # geometry validation
    with pytest.raises(DatasetError, match="manifest"):
        FBSEMSampleDataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="geometry"):
        FBSEMSampleDataset(d, sinogram_geometry=geom3d[0])


def test_datasets_read_together_must_share_geometry_subsets_and_psf(tmp_path, geom2d):
    sino, image = geom2d
    a, b = tmp_path / "a", tmp_path / "b"
    simulate_dataset(a, 1, sino, image, _config(), seed=1, progress=False)
    simulate_dataset(b, 1, sino, image, _config(), seed=2, progress=False)
    assert [len(ds) for ds in dataset_module.open_datasets([a, b])] == [1, 1]
    manifest = load_manifest(b)
    (b / "manifest.json").write_text(json.dumps({**manifest, "num_subsets": manifest["num_subsets"] + 1}))
    with pytest.raises(DatasetError, match=rf"{b.name}.*num_subsets.*{a.name}"):
        dataset_module.open_datasets([a, b])
    assert dataset_module.first_disagreement([load_manifest(a), load_manifest(b)]) == (1, "num_subsets")
    assert dataset_module.first_disagreement([load_manifest(a), load_manifest(a)]) is None


def test_truncated_sample_files_are_refused_when_loaded_and_a_good_one_reads_in_full(tmp_path, geom2d):
    """Samples are memory-mapped: a file cut anywhere is refused by name when loaded (not a crash when a tensor
    is first touched), and the tensors of a whole file equal what was saved."""
    sino, image = geom2d
    d = tmp_path / "ds"
    simulate_dataset(d, 2, sino, image, _config(), seed=1, progress=False)
    saved = torch.load(d / "sample_00000.pt", weights_only=True)
    loaded = FBSEMSampleDataset(d)[0]
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(loaded, key), value), key
    whole = (d / "sample_00001.pt").read_bytes()
    for cut in (len(whole) // 3, len(whole) - 100, len(whole) - 1):
        (d / "sample_00001.pt").write_bytes(whole[:cut])
        with pytest.raises(DatasetError, match="sample_00001.pt.*cannot be loaded"):
            FBSEMSampleDataset(d)[1]


def test_resume_false_replaces(tmp_path, geom2d):
    sino, image = geom2d
    d = tmp_path / "ds"
    simulate_dataset(d, 2, sino, image, _config(), seed=1, progress=False)
    simulate_dataset(d, 1, sino, image, _config(num_stages=2), seed=1, resume=False, progress=False)
    assert load_manifest(d)["files"] == ["sample_00000.pt"]
    assert not (d / "sample_00001.pt").exists()
    assert torch.load(d / "sample_00000.pt", weights_only=True)["targets"].shape[0] == 2


# ============================================================================ CLI
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return parser.parse_args(argv)


def test_cli_geometry():
    sino, image = geometry_from_args(_parse(["--out", "x", "--num-samples", "1"]))
    assert sino.span == 3 and image.shape == (15, 47, 47)
    sino, image = geometry_from_args(_parse(["--out", "x", "--num-samples", "1", "--2d"]))
    assert sino.shape == (1, 1, 48, 48) and image.shape == (1, 47, 47)
    sino, image = geometry_from_args(
        _parse(["--out", "x", "--num-samples", "1", "--span", "1", "--max-ring-diff", "0", "--image-shape", "15,31,31"])
    )
    assert sino.num_sinograms == 8 and image.shape == (15, 31, 31)
    sino, image = geometry_from_args(_parse(["--out", "x", "--num-samples", "1", "--scanner", "Siemens_mMR"]))
    assert sino.shape == (1, 837, 252, 344) and image.shape == (127, 285, 285)


def test_cli_runs(tmp_path, capsys):
    args = _parse(
        ["--out", str(tmp_path / "cli"), "--num-samples", "1", "--2d", "--counts", "1e4", "--num-stages", "2",
         "--num-subsets", "2", "--no-progress"]
    )
    assert run_simulate(args) == 0
    m = load_manifest(tmp_path / "cli")
    assert m["files"] == ["sample_00000.pt"] and m["counts"] == 1e4
    from sirf_fbsem.cli import main

    capsys.readouterr()
    assert main(["simulate", "--out", str(tmp_path / "bad"), "--num-samples", "1", "--2d", "--randoms-fraction",
                 "0.9", "--scatter-fraction", "0.2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--randoms-fraction + --scatter-fraction must be < 1" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_count_levels_and_mixed_phantoms_are_cycled_by_sample_index(tmp_path, capsys):
    args = _parse(
        ["--out", str(tmp_path / "mix"), "--num-samples", "4", "--2d", "--counts", "1e4,4e4", "--phantom", "mixed",
         "--num-stages", "2", "--num-subsets", "2", "--no-progress"]
    )
    assert run_simulate(args) == 0
    m = load_manifest(tmp_path / "mix")
    assert m["counts"] == [1e4, 4e4] and m["phantom"] == "mixed"
    samples = [load_sample(tmp_path / "mix" / f) for f in m["files"]]
    assert [s.counts for s in samples] == [1e4, 4e4, 1e4, 4e4]
    for s in samples:  # each sample's expected total is its own level
        assert float(s.prompts.sum()) == pytest.approx(s.counts, rel=0.05)
    cfg = _config(phantom="mixed", count_levels=(1e4, 4e4))
    assert [cfg.phantom_of(i) for i in range(6)] == ["mni152", "mni152", "procedural", "procedural", "mni152",
                                                     "mni152"]
    assert [cfg.acquisition_of(i).counts for i in range(3)] == [1e4, 4e4, 1e4]
    with pytest.raises(ValueError, match="counts"):
        _config(count_levels=(1e4, -1.0))
    from sirf_fbsem.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # a usage error, from argparse
        main(["simulate", "--out", str(tmp_path / "bad"), "--num-samples", "1", "--2d", "--counts", "1e4,x"])
    assert exc.value.code == 2
    assert "--counts" in capsys.readouterr().err and not (tmp_path / "bad").exists()
