"""Conformance of OSEMReconstructor / FBSEMReconstructor with SIRF's OSMAPOSLReconstructor (embedded backend).

No SIRF needed: the scripts use ``sirf_fbsem.stir`` in place of ``sirf.STIR``. A small
phantom on the ``small_test`` scanner (span 3) is forward projected with the embedded
model, Poisson noise added, and written as Interfile; everything reads it back.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from sirf_fbsem.recon.engine import start_image

import sirf_fbsem.stir as pet
from conftest import readme_script, run_readme_script, small_span3
from sirf_fbsem.acquisition import Acquisition
from sirf_fbsem.autograd import em_update
from sirf_fbsem.geometry import SinogramGeometry, scanner_preset
from sirf_fbsem.io.interfile import read_image, write_projdata
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel as _Embedded
from sirf_fbsem.recon import OSEM
from sirf_fbsem.reconstructor import FBSEMReconstructor, OSEMReconstructor, reconstruct_acquisition


def EmbeddedAcquisitionModel(*args, **kwargs) -> _Embedded:  # noqa: N802 - the class it stands for
    """The reference model: as the facade's ray-tracing model traces (STIR's matrix: Siddon on the CPU)."""
    return _Embedded(*args, ray_tracing="auto", **kwargs)


SIRF_METHODS = [
    "set_objective_function", "set_num_subsets", "get_num_subsets", "set_num_subiterations",
    "get_num_subiterations", "set_input", "set_up", "set_current_estimate", "get_current_estimate",
    "update_current_estimate", "update", "process", "reconstruct", "get_output", "get_subiteration_num",
    "set_current_subset_num", "get_subset_sensitivity", "set_save_interval", "set_output_filename_prefix",
    "disable_output", "enable_output", "set_maximum_relative_change", "set_minimum_relative_change",
]


def phantom(image_geometry) -> np.ndarray:
    z, y, x = image_geometry.centred_coordinates_mm()
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    body = (X**2 + Y**2 < 50.0**2).astype(np.float32)
    hot = ((X - 15.0) ** 2 + (Y + 5.0) ** 2 < 12.0**2).astype(np.float32)
    return body * 1.0 + hot * 2.0


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """(path of a noisy sinogram .hs, its geometry, prompts (T,S,V,N))."""
    g = small_span3()
    img = g.default_image()
    model = EmbeddedAcquisitionModel(g, img)
    with torch.no_grad():
        mean = model.forward(torch.from_numpy(phantom(img))) * 3.0
    prompts = torch.poisson(mean, generator=torch.Generator().manual_seed(7)).numpy()
    path = tmp_path_factory.mktemp("scan") / "sino.hs"
    write_projdata(path, g, prompts)
    return path, g, prompts


def pet_objects(path):
    """The README script's objects: acquisition data, uniform start image, model, objective."""
    acq = pet.AcquisitionData(str(path))
    image = acq.create_uniform_image(1.0)
    am = pet.AcquisitionModelUsingRayTracingMatrix()
    assert am.get_num_tangential_LORs() == 2  # SIRF's default
    am.set_num_tangential_LORs(1)  # as the reference EmbeddedAcquisitionModel(...)s of these tests
    am.set_up(acq, image)
    obj = pet.make_Poisson_loglikelihood(acq, acq_model=am)
    return acq, image, am, obj


def make_net(num_stages=4, num_subsets=2, beta_init=0.0):
    from sirf_fbsem.model.fbsem import FBSEMNet
    from sirf_fbsem.model.regularisers import RegulariserConfig

    torch.manual_seed(0)
    cfg = RegulariserConfig(dims=3, channels=4, layers=2)
    return FBSEMNet(num_stages, num_subsets, regulariser_config=cfg, beta_init=beta_init)


def save_net(path, net, sino_geometry, image_geometry):
    from sirf_fbsem.model.io import save_model

    save_model(path, net, {"sinogram_geometry": sino_geometry, "image_geometry": image_geometry,
                           "training_mode": "sequential"})
    return path


def ready(cls_or_recon, path, num_subsets=2, num_subiterations=4):
    """A reconstructor set up on the scan with a uniform start image."""
    acq, image, am, obj = pet_objects(path)
    recon = cls_or_recon
    recon.set_objective_function(obj)
    if not isinstance(recon, FBSEMReconstructor):
        recon.set_num_subsets(num_subsets)
    recon.set_num_subiterations(num_subiterations)
    recon.set_progress_bar(False)
    recon.set_up(image)
    recon.set_current_estimate(image)
    return recon, image


@pytest.fixture(scope="module")
def model_file(scan, tmp_path_factory):
    """A model with beta = 0 (every stage is exactly OSEM): 4 stages, 2 subsets."""
    pytest.importorskip("sirf_fbsem.model.io")
    _, g, _ = scan
    return save_net(tmp_path_factory.mktemp("model") / "beta0.pt", make_net(beta_init=0.0), g, g.default_image())


def reconstructors(model_path):
    return [OSEMReconstructor(), FBSEMReconstructor(model_path)]


# ----------------------------------------------------------------------------- interface
@pytest.mark.parametrize("cls", [OSEMReconstructor, FBSEMReconstructor])
def test_every_sirf_method_exists(cls):
    missing = [m for m in SIRF_METHODS if not callable(getattr(cls, m, None))]
    assert not missing, f"{cls.__name__} lacks {missing}"
    assert callable(getattr(FBSEMReconstructor, "set_model")) and callable(getattr(FBSEMReconstructor, "set_device"))


def test_facade_names_osmaposl_and_error():
    assert pet.OSMAPOSLReconstructor is OSEMReconstructor
    err = pet.error("bad thing")
    assert err.value == "bad thing" and "bad thing" in str(err)
    pet.MessageRedirector(None, None, None)


def test_get_output_before_a_run_raises(scan, model_file):
    path, _, _ = scan
    for recon in reconstructors(model_file):
        with pytest.raises(pet.error) as info:
            recon.get_output()
        assert isinstance(info.value, AssertionError)  # SIRF asserts here
        with pytest.raises(pet.error):
            recon.process()


def test_set_current_estimate_and_get_output_clone(scan, model_file):
    path, _, _ = scan
    for recon in reconstructors(model_file):
        recon, image = ready(recon, path)
        image.fill(5.0)  # the caller's image changes; the reconstructor's estimate must not
        assert np.all(recon.get_current_estimate().as_array() == 1.0)
        recon.process()
        out = recon.get_output()
        ref = out.as_array()
        out.fill(-1.0)
        np.testing.assert_array_equal(recon.get_output().as_array(), ref)
        est = recon.get_current_estimate()
        est.fill(0.0)
        np.testing.assert_array_equal(recon.get_output().as_array(), ref)


def test_update_works_in_place_and_counter_advances(scan, model_file):
    path, _, _ = scan
    for recon in reconstructors(model_file):
        recon, image = ready(recon, path)
        assert recon.get_subiteration_num() == 1
        before = image.as_array()
        returned = recon.update(image)
        assert returned is image
        assert not np.array_equal(image.as_array(), before)
        assert recon.get_subiteration_num() == 2
        recon.update_current_estimate()
        assert recon.get_subiteration_num() == 3
        np.testing.assert_array_equal(recon.get_output().as_array(), image.as_array())  # update aliases, as SIRF


def test_subsets_and_subiterations_round_trip(model_file):
    recon = OSEMReconstructor()
    recon.set_num_subsets(6)
    recon.set_num_subiterations(12)
    assert recon.get_num_subsets() == 6 and recon.get_num_subiterations() == 12
    fb = FBSEMReconstructor(model_file)
    assert fb.get_num_subsets() == 2 and fb.get_num_subiterations() == 4  # the model's
    fb.set_num_subsets(2)
    fb.set_num_subiterations(3)
    assert fb.get_num_subsets() == 2 and fb.get_num_subiterations() == 3


# ----------------------------------------------------------------------------- numerics
def test_process_equals_osem(scan):
    path, g, prompts = scan
    recon, _ = ready(OSEMReconstructor(), path, num_subsets=3, num_subiterations=5)
    recon.process()
    model = EmbeddedAcquisitionModel(g, g.default_image(), num_subsets=3)
    ref = OSEM(model, torch.from_numpy(prompts)).run(5, progress=False)
    np.testing.assert_allclose(recon.get_output().as_array(), ref.numpy(), rtol=1e-5, atol=1e-6)
    assert recon.get_subiteration_num() == 6


def test_set_current_subset_num_picks_the_next_subset(scan):
    path, g, prompts = scan
    recon, image = ready(OSEMReconstructor(), path, num_subsets=3)
    recon.set_current_subset_num(2)
    model = EmbeddedAcquisitionModel(g, g.default_image(), num_subsets=3)
    sens2 = model.sensitivity(2)
    np.testing.assert_allclose(recon.get_subset_sensitivity().as_array(), sens2.numpy(), rtol=1e-6)
    recon.update_current_estimate()
    x0 = start_image(model)  # the engine's start-image rule: 1 inside STIR's cylindrical FOV
    ref = em_update(x0, model.take_subset(torch.from_numpy(prompts), 2), model, 2)
    np.testing.assert_allclose(recon.get_output().as_array(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_maximum_relative_change_clamps_the_update_factor(scan):
    path, _, _ = scan
    recon, image = ready(OSEMReconstructor(), path)
    recon.set_maximum_relative_change(1.05)
    recon.set_minimum_relative_change(0.9)
    recon.update_current_estimate()
    x = recon.get_output().as_array()
    inside = x > 0
    assert np.all(x[inside] <= 1.05 * (1 + 1e-6)) and np.all(x[inside] >= 0.9 * (1 - 1e-6))


def test_save_interval_writes_files_that_read_back(scan, tmp_path):
    path, _, _ = scan
    recon, _ = ready(OSEMReconstructor(), path, num_subiterations=5)
    recon.set_save_interval(2)
    recon.set_output_filename_prefix(tmp_path / "est")
    recon.process()
    names = sorted(p.name for p in tmp_path.glob("est_*.hv"))
    assert names == ["est_2.hv", "est_4.hv", "est_5.hv"]  # every 2nd and the last, as STIR
    geom, data = read_image(tmp_path / "est_5.hv")
    assert geom.shape == recon.get_output().dimensions()
    np.testing.assert_allclose(data, recon.get_output().as_array(), rtol=1e-6)
    assert not list(tmp_path.glob("*.part*"))  # atomic writes leave no temporaries


def test_save_interval_nifti(scan, tmp_path):
    nib = pytest.importorskip("nibabel")
    path, _, _ = scan
    recon, _ = ready(OSEMReconstructor(), path, num_subiterations=2)
    recon.set_save_interval(1)
    recon.set_output_filename_prefix(str(tmp_path / "est.nii.gz"))
    recon.process()
    img = nib.load(str(tmp_path / "est_2.nii.gz"))
    np.testing.assert_allclose(np.asarray(img.dataobj).transpose(2, 1, 0), recon.get_output().as_array(), rtol=1e-6)
    assert not np.allclose(img.affine, np.eye(4))


def test_output_disabled_by_default(scan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, _, _ = scan
    recon, _ = ready(OSEMReconstructor(), path, num_subiterations=2)
    recon.process()
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- FBSEM
def test_fbsem_with_beta_zero_equals_osem_subiterates(scan, model_file):
    path, g, prompts = scan
    recon, image = ready(FBSEMReconstructor(model_file), path)
    model = EmbeddedAcquisitionModel(g, g.default_image(), num_subsets=2)
    # FBSEM starts from the estimate on the model's support (the engine's rule, the training start image)
    algo = OSEM(model, torch.from_numpy(prompts))
    for k in range(4):
        recon.update(image)
        algo.update()
        np.testing.assert_allclose(image.as_array(), algo.x.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"stage {k}")
    with pytest.raises(pet.error, match="4 stages"):
        recon.update(image)


def test_fbsem_process_with_beta_zero_equals_osem(scan, model_file):
    path, g, prompts = scan
    recon, _ = ready(FBSEMReconstructor(model_file), path)
    recon.process()
    model = EmbeddedAcquisitionModel(g, g.default_image(), num_subsets=2)
    ref = OSEM(model, torch.from_numpy(prompts)).run(4, progress=False)
    np.testing.assert_allclose(recon.get_output().as_array(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_fbsem_refuses_other_subsets_and_too_many_subiterations(model_file):
    recon = FBSEMReconstructor(model_file)
    with pytest.raises(pet.error, match="trained with 2 subsets"):
        recon.set_num_subsets(3)
    with pytest.raises(pet.error, match="4 stages"):
        recon.set_num_subiterations(5)
    early = FBSEMReconstructor()
    early.set_num_subsets(6)
    with pytest.raises(pet.error, match="trained with 2 subsets"):
        early.set_model(model_file)
    with pytest.raises(pet.error, match="subset"):
        recon.set_current_subset_num(1)  # stage 0 is tied to subset 0


def test_fbsem_refuses_a_model_of_another_geometry(scan, tmp_path):
    path, _, _ = scan
    other = SinogramGeometry.from_span(scanner_preset("small_test"), span=1, max_ring_diff=3)
    mfile = save_net(tmp_path / "other.pt", make_net(beta_init=0.0), other, other.default_image())
    acq, image, am, obj = pet_objects(path)
    recon = FBSEMReconstructor(mfile)
    recon.set_objective_function(obj)
    with pytest.raises(pet.error, match="another geometry"):
        recon.set_up(image)
    recon.set_model(mfile, override_geometry=True)
    recon.set_up(image)


def test_fbsem_without_model_is_an_error(scan):
    path, _, _ = scan
    acq, image, am, obj = pet_objects(path)
    recon = FBSEMReconstructor()
    recon.set_objective_function(obj)
    with pytest.raises(pet.error, match="model"):
        recon.set_up(image)


# ----------------------------------------------------------------------------- README scripts




def run_without_sirf(code: str, replacements: dict[str, str]) -> dict:
    """Run a README script with its one-line change: ``import sirf_fbsem.stir as pet``."""
    return run_readme_script(code, replacements, without_sirf=True)


def test_readme_osem_script_runs_without_sirf(scan):
    path, _, _ = scan
    ns = run_without_sirf(readme_script("A typical SIRF OSEM script"), {"'sino.hs'": repr(str(path))})
    out, image = ns["out"], ns["image"]
    assert isinstance(ns["recon"], pet.OSMAPOSLReconstructor) and isinstance(out, pet.ImageData)
    arr = out.as_array()
    assert arr.shape == image.dimensions() and np.isfinite(arr).all() and arr.min() >= 0
    truth = phantom(image.geometry) * 3.0
    inner = truth > 0
    assert abs(arr[inner].mean() / truth[inner].mean() - 1) < 0.2  # counts come back in the right units


def test_readme_fbsem_script_runs_without_sirf(scan, tmp_path):
    pytest.importorskip("sirf_fbsem.model.io")
    path, g, _ = scan
    model_path = save_net(tmp_path / "model.pt", make_net(num_stages=3, num_subsets=3, beta_init=0.1),
                          g, g.default_image())
    ns = run_without_sirf(readme_script("<!-- readme-fbsem-script -->"), {
        "'sino.hs'": repr(str(path)), "'model.pt'": repr(str(model_path)),
        "'fbsem.hv'": repr(str(tmp_path / "fbsem.hv"))})
    out, image, recon = ns["out"], ns["image"], ns["recon"]
    assert isinstance(recon, FBSEMReconstructor) and isinstance(out, pet.ImageData)
    arr = out.as_array()
    assert arr.shape == image.dimensions() and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() > 0
    assert recon.get_subiteration_num() == 4  # STIR's counter: the next sub-iteration, after 3 stages
    written = pet.ImageData(str(tmp_path / "fbsem.hv")).as_array()
    np.testing.assert_array_equal(written, arr)


# ----------------------------------------------------------------------------- facade and CLI entry
def test_facade_objective_gradient_and_sensitivity(scan):
    path, g, prompts = scan
    acq, image, am, obj = pet_objects(path)
    obj.set_num_subsets(2)
    obj.set_up(image)
    model = EmbeddedAcquisitionModel(g, g.default_image(), num_subsets=2)
    np.testing.assert_allclose(obj.get_subset_sensitivity(1).as_array(), model.sensitivity(1).numpy(), rtol=1e-6)
    full = obj.gradient(image).as_array()
    parts = obj.gradient(image, 0).as_array() + obj.gradient(image, 1).as_array()
    np.testing.assert_allclose(full, parts, rtol=1e-4, atol=1e-2)
    assert np.isfinite(obj.value(image))


def test_facade_forward_with_subsets_is_full_size(scan):
    path, g, _ = scan
    acq, image, am, _ = pet_objects(path)
    bt = acq.get_uniform_copy(0.5)
    am.set_background_term(bt)
    y = am.forward(image, subset_num=1, num_subsets=4).as_array()
    assert y.shape == acq.shape
    np.testing.assert_allclose(y[:, :, 0::4], 0.5)  # other views: the constant term only, as SIRF
    assert (y[:, :, 1::4] > 0.5).any()
    with pytest.raises(pet.error, match="not linear"):
        am.direct(image)
    lin = am.get_linear_acquisition_model()
    np.testing.assert_allclose(lin.direct(image).as_array() + 0.5, am.forward(image).as_array(), rtol=1e-5)


def test_reconstruct_acquisition_osem_and_fbsem(scan, model_file):
    path, g, prompts = scan
    acq = Acquisition(g, prompts)
    img = g.default_image()
    x, desc = reconstruct_acquisition(acq, img, algorithm="osem", num_iterations=2, num_subsets=2, progress=False)
    assert desc == "OSEM 2 it x 2 subsets"
    # its default ray tracing, "auto": Siddon on the CPU, SIRF's matrix (and Joseph when asked for)
    ref = OSEM(EmbeddedAcquisitionModel(g, img, num_subsets=2), torch.from_numpy(prompts)).run(4, progress=False)
    np.testing.assert_allclose(x.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    xf, desc = reconstruct_acquisition(acq, img, algorithm="fbsem", model_path=model_file, progress=False)
    assert desc == "FBSEM-Net (4 stages, sequential, beta0.pt)"
    # beta = 0, 4 stages = 2 it x 2 subsets of OSEM from the same start image (the engine's rule)
    np.testing.assert_allclose(xf.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 subsets"):
        reconstruct_acquisition(acq, img, algorithm="fbsem", model_path=model_file, num_subsets=4, progress=False)
    xj, _ = reconstruct_acquisition(acq, img, algorithm="osem", num_iterations=2, num_subsets=2, progress=False,
                                    ray_tracing="joseph")
    ref_j = OSEM(_Embedded(g, img, num_subsets=2, ray_tracing="joseph"), torch.from_numpy(prompts)).run(4, progress=False)
    np.testing.assert_allclose(xj.numpy(), ref_j.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(xj.numpy(), ref.numpy(), rtol=1e-3)  # the two ray tracings differ


# ----------------------------------------------------------------------------- backend dispatch (fake SIRF)
def test_sirf_fbsem_objects_are_not_taken_for_sirf_ones():
    from sirf_fbsem.reconstructor import _is_sirf_object

    assert not _is_sirf_object(pet.ImageData())  # module 'sirf_fbsem.stir' starts with 'sirf' too


@pytest.fixture
def fake_sirf(monkeypatch, scan):
    """Stand-ins for sirf.STIR / sirf.Utilities (module names 'sirf.*'), projecting with the embedded model.

    Exercises the reconstructors' SIRF branch (types, errors, set_input) without SIRF;
    the real SIRF backend is tested in test_sirf_backend.py where SIRF is installed.
    """
    import sys
    import types

    import sirf_fbsem.projectors.sirf as sirf_projector

    stir_mod, util_mod, root = (types.ModuleType(n) for n in ("sirf.STIR", "sirf.Utilities", "sirf"))

    class error(Exception):  # noqa: N801 - SIRF's name
        def __init__(self, value):
            super().__init__(value)
            self.value = value

    class ImageData(pet.ImageData):
        pass

    class AcquisitionData(pet.AcquisitionData):
        pass

    class ObjectiveFunction:
        def set_num_subsets(self, n):
            self.num_subsets = n

    for cls in (error, ImageData, AcquisitionData, ObjectiveFunction):
        cls.__module__ = "sirf.Utilities" if cls is error else "sirf.STIR"
    util_mod.error = error
    stir_mod.ImageData, stir_mod.AcquisitionData, stir_mod.ObjectiveFunction = ImageData, AcquisitionData, ObjectiveFunction
    root.STIR, root.Utilities = stir_mod, util_mod
    for name, mod in (("sirf", root), ("sirf.STIR", stir_mod), ("sirf.Utilities", util_mod)):
        monkeypatch.setitem(sys.modules, name, mod)

    def from_acquisition_model(cls, am, acq, image, num_subsets=1):
        return EmbeddedAcquisitionModel(acq.geometry, image.geometry, num_subsets=num_subsets)

    monkeypatch.setattr(sirf_projector.SIRFAcquisitionModel, "from_acquisition_model",
                        classmethod(from_acquisition_model))
    monkeypatch.setattr(sirf_projector, "from_sirf", lambda obj: torch.from_numpy(obj.as_array()))
    monkeypatch.setattr(sirf_projector, "sinogram_geometry_from_sirf", lambda acq: acq.geometry)
    monkeypatch.setattr(sirf_projector, "image_geometry_from_sirf", lambda img: img.geometry)
    path, _, _ = scan
    acq = AcquisitionData(str(path))
    image = ImageData(acq).fill(1.0)
    return types.SimpleNamespace(error=error, ImageData=ImageData, acq=acq, image=image,
                                 objective=ObjectiveFunction())


def test_sirf_objects_give_sirf_images_and_sirf_errors(fake_sirf, scan, model_file):
    _, g, prompts = scan
    recon = FBSEMReconstructor(model_file)
    with pytest.raises(fake_sirf.error) as info:
        recon.set_objective_function(object.__new__(type(fake_sirf.acq)))  # not an objective
    recon.set_objective_function(fake_sirf.objective)
    recon.set_progress_bar(False)
    with pytest.raises(fake_sirf.error) as info:
        recon.get_output()
    assert isinstance(info.value, AssertionError)
    with pytest.raises(fake_sirf.error, match="set_input"):
        recon.set_up(fake_sirf.image)  # SIRF's objective hides its data and model
    recon.set_input(fake_sirf.acq)
    recon.set_acquisition_model(object())
    with pytest.raises(fake_sirf.error, match="must be a sirf.STIR.ImageData"):
        recon.set_up(pet.ImageData(fake_sirf.acq))  # a sirf_fbsem image with a SIRF objective
    recon.set_up(fake_sirf.image)
    assert fake_sirf.objective.num_subsets == 2
    with pytest.raises(fake_sirf.error, match="trained with 2 subsets"):
        recon.set_num_subsets(3)
    recon.set_current_estimate(fake_sirf.image)
    recon.process()
    out = recon.get_output()
    assert type(out) is fake_sirf.ImageData
    ref = OSEM(EmbeddedAcquisitionModel(g, g.default_image(), num_subsets=2), torch.from_numpy(prompts)).run(
        4, progress=False)
    np.testing.assert_allclose(out.as_array(), ref.numpy(), rtol=1e-5, atol=1e-6)
    assert type(recon.get_subset_sensitivity()) is fake_sirf.ImageData


def test_sensitivity_and_background_terms_reach_the_reconstruction(scan):
    path, g, prompts = scan
    acq, image, am, obj = pet_objects(path)
    factors = np.random.default_rng(3).uniform(0.5, 1.0, g.shape).astype(np.float32)
    am.set_acquisition_sensitivity(pet.AcquisitionSensitivityModel(acq.get_uniform_copy(0).fill(factors)))
    am.set_background_term(acq.get_uniform_copy(0.2))
    am.set_additive_term(acq.get_uniform_copy(0.1))
    recon = OSEMReconstructor()
    recon.set_objective_function(obj)
    recon.set_num_subsets(2)
    recon.set_num_subiterations(3)
    recon.set_progress_bar(False)
    recon.set_up(image)
    recon.set_current_estimate(image)
    recon.process()
    model = EmbeddedAcquisitionModel(g, g.default_image(), num_subsets=2, multiplicative=factors,
                                     additive=0.1 * factors + 0.2)
    ref = OSEM(model, torch.from_numpy(prompts)).run(3, progress=False)
    np.testing.assert_allclose(recon.get_output().as_array(), ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fbsem_on_cuda_matches_cpu(scan, tmp_path):
    """The same model and the same projector (Joseph: SIRF's parallelproj model) give the same image on
    the GPU as on the CPU. (SIRF's ray-tracing matrix model is Siddon on the CPU, as STIR's, and Joseph
    on a GPU: those two images differ as the two projectors do, docs/sirf.md.)"""
    path, g, _ = scan
    mfile = save_net(tmp_path / "m.pt", make_net(num_stages=2, num_subsets=2, beta_init=0.1), g, g.default_image())
    outs = []
    for device in ("cpu", "cuda"):
        acq = pet.AcquisitionData(str(path))
        image = acq.create_uniform_image(1.0)
        am = pet.AcquisitionModelUsingParallelproj()
        am.set_up(acq, image)
        recon = FBSEMReconstructor(mfile)
        recon.set_device(device)
        recon.set_objective_function(pet.make_Poisson_loglikelihood(acq, acq_model=am))
        recon.set_num_subiterations(2)
        recon.set_progress_bar(False)
        recon.set_up(image)
        recon.set_current_estimate(image)
        recon.process()
        outs.append(recon.get_output().as_array())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-3, atol=1e-3 * outs[0].max())
