"""The SIRF backend against sirf.STIR itself (runs only where SIRF is installed: the SIRF Docker image).

Data: SIRF's example brain template (6 rings, 512 detectors, 64 views, 90 tangential
bins, one segment of 11 axial positions) from ``sirf.Utilities.examples_data_path('PET')``
or ../shared/data/sirf/examples/PET. Images are smooth positive phantoms on the
template's default image grid, sinogram terms are made here, so nothing depends on
data outside those folders.

What each test pins down, and its tolerance:
* adjoint identity of the wrapped SIRF projector, full and per subset: normalised
  mismatch < 1e-4 (float32; STIR's matrix projector is an exact transpose, so this is
  rounding only);
* our linear part and our affine forward against explicit SIRF calls on one full SIRF
  model: relative max error < 1e-4 (the same projector, same factors; only float32 sums
  in another order and the 1e-20 floor SIRF puts on zero bin efficiencies differ);
* autograd gradients (batch of two different images, and one operator reused in three
  stages) against the same chain computed with explicit SIRF calls (1e-4) and against
  central finite differences (2e-2: float32 projections with a step of 1e-2 of the
  image scale);
* no aliasing: outputs of successive calls, and of items of one batch, are distinct;
* subsets: the subset forward equals the full SIRF forward restricted to the subset's
  views (no additive term from foreign bins);
* the embedded projector on the geometry read back from SIRF agrees with SIRF's ray
  tracer on a smooth image within 5% relative L2 over the sinogram: STIR's ray tracer
  integrates the voxelised image along 5 parallel rays per bin with exact (Siddon)
  intersection lengths, the embedded projector samples it once per plane with bilinear
  (Joseph) interpolation; for an image smooth on the scale of a voxel both are
  first-order accurate line integrals, whose difference is a few percent at most
  (largest at the edge of the object, where the interpolation kernels differ most);
* one FBSEM-like EM step: SIRF backend vs explicit SIRF calls (1e-4), vs the embedded
  backend (5% relative L2 in the voxels with sensitivity, for the projector reason
  above), and vs one OSMAPOSL sub-iteration of SIRF's own reconstructor with one
  subset (1e-3 relative L2 where the sensitivity is above 1e-3 of its maximum);
* the count level of count-aware stages: the support's projection equals SIRF's linear model
  on the support (1e-4; copies with other subsets or factors project their own), and on
  Poisson data the count level and a count-aware stage's output agree with the embedded
  backend's (1 %, and 5 % as the EM update).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

sirf = pytest.importorskip(
    "sirf.STIR", reason="sirf.STIR not installed: the SIRF backend suite runs inside the SIRF Docker image"
)
pet = sirf  # sirf.STIR, under the name SIRF's own scripts use

from sirf_fbsem.autograd import back_project, em_update, forward_project  # noqa: E402
from sirf_fbsem.projectors.base import adjoint_mismatch  # noqa: E402
from sirf_fbsem.projectors.sirf import (  # noqa: E402
    SIRFAcquisitionModel,
    from_sirf,
    image_geometry_from_sirf,
    sinogram_geometry_from_sirf,
    to_sirf_acquisition,
    to_sirf_image,
)

pytestmark = pytest.mark.sirf

NUM_SUBSETS = 4
NUM_LORS = 5
SHARED_PET = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sirf" / "examples" / "PET"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def quiet_sirf():
    pet.set_verbosity(0)
    redirector = pet.MessageRedirector(info=None, warn=None)  # errors still go to stderr
    pet.AcquisitionData.set_storage_scheme("memory")
    yield redirector


@pytest.fixture(scope="module")
def pet_data_dir() -> Path:
    import sirf.Utilities

    candidates = [Path(sirf.Utilities.examples_data_path("PET")), SHARED_PET]
    for d in candidates:
        if (d / "brain" / "template_sinogram.hs").is_file():
            return d
    pytest.skip(f"SIRF's PET example data not found in {[str(c) for c in candidates]}")


@pytest.fixture(scope="module")
def acq_template(pet_data_dir):
    return pet.AcquisitionData(str(pet_data_dir / "brain" / "template_sinogram.hs"))


@pytest.fixture(scope="module")
def image_template(acq_template):
    return acq_template.create_uniform_image(0.0)


def smooth_phantom(image_template, seed: int) -> torch.Tensor:
    """Sum of three Gaussian blobs (FWHM 25-40 mm) inside the FOV plus a small floor, (Z,Y,X) float32."""
    g = image_geometry_from_sirf(image_template)
    z, y, x = (torch.as_tensor(c, dtype=torch.float64) for c in g.centred_coordinates_mm())
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    gen = torch.Generator().manual_seed(seed)
    radius = 0.5 * g.fov_radius_mm()
    img = torch.zeros_like(xx)
    for _ in range(3):
        cx, cy = ((torch.rand(2, generator=gen, dtype=torch.float64) - 0.5) * radius).tolist()
        cz = float((torch.rand(1, generator=gen, dtype=torch.float64) - 0.5) * (z[-1] - z[0]) * 0.5)
        fwhm = 25.0 + 15.0 * float(torch.rand(1, generator=gen))
        s2 = (fwhm / 2.3548) ** 2
        img += (0.5 + float(torch.rand(1, generator=gen))) * torch.exp(
            -((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2) / (2 * s2)
        )
    inside = (xx**2 + yy**2) < (0.8 * g.fov_radius_mm()) ** 2
    return (img + 0.05 * inside).to(torch.float32)


@pytest.fixture(scope="module")
def factors(acq_template):
    """Bin efficiencies in [0.5, 1.5], smooth over views (like normalisation x attenuation)."""
    t, s, v, n = acq_template.shape
    views = torch.arange(v, dtype=torch.float32)
    tang = torch.linspace(-1, 1, n)
    f = 1.0 + 0.3 * torch.cos(2 * math.pi * views / v)[:, None] - 0.2 * tang[None, :] ** 2
    f = f.expand(t, s, v, n) * (1.0 + 0.1 * torch.rand((t, s, v, n), generator=torch.Generator().manual_seed(3)))
    return to_sirf_acquisition(f, acq_template)


@pytest.fixture(scope="module")
def additive(acq_template):
    t, s, v, n = acq_template.shape
    tang = torch.linspace(-1, 1, n)
    return (0.2 + 0.1 * (1 - tang**2)).expand(t, s, v, n).contiguous()


@pytest.fixture(scope="module")
def background(acq_template):
    t, s, v, n = acq_template.shape
    views = torch.arange(v, dtype=torch.float32)
    return (0.5 + 0.05 * (views % 7))[:, None].expand(t, s, v, n).contiguous()


@pytest.fixture(scope="module")
def model(acq_template, image_template, factors, additive, background):
    return SIRFAcquisitionModel.from_pieces(
        acq_template, image_template, acquisition_sensitivity=factors, additive=additive,
        background=background, projector="raytracing", num_tangential_LORs=NUM_LORS, num_subsets=NUM_SUBSETS,
    )


@pytest.fixture(scope="module")
def full_sirf_model(acq_template, image_template, factors, additive, background):
    """One ordinary affine SIRF model on the full sinogram: S (G x + a) + b."""
    am = pet.AcquisitionModelUsingRayTracingMatrix()
    am.set_num_tangential_LORs(NUM_LORS)
    am.set_acquisition_sensitivity(pet.AcquisitionSensitivityModel(factors))
    am.set_additive_term(to_sirf_acquisition(additive, acq_template))
    am.set_background_term(to_sirf_acquisition(background, acq_template))
    am.set_up(acq_template, image_template)
    return am


@pytest.fixture(scope="module")
def images(image_template) -> torch.Tensor:
    """A batch of two different smooth images, (2,Z,Y,X)."""
    return torch.stack([smooth_phantom(image_template, 1), smooth_phantom(image_template, 2)])


def rel_max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def sirf_direct(am, image_tensor, image_template):
    return from_sirf(am.direct(to_sirf_image(image_tensor, image_template)))


def sirf_adjoint(am, sino_tensor, template):
    return from_sirf(am.adjoint(to_sirf_acquisition(sino_tensor, template)))


# ----------------------------------------------------------------------------- shapes and geometry
def test_shapes_and_geometry_read_back(model, acq_template, image_template):
    dims = tuple(int(d) for d in acq_template.dimensions())
    assert model.sinogram_shape == (dims if len(dims) == 4 else (1,) + dims)
    assert model.image_shape == tuple(int(d) for d in image_template.dimensions())
    sg = sinogram_geometry_from_sirf(acq_template)
    assert sg.shape == model.sinogram_shape
    assert sg.scanner.num_rings == 6 and sg.scanner.num_detectors_per_ring == 512
    assert sg.scanner.ring_spacing_mm == pytest.approx(13.5)
    assert sg.num_views == 64 and sg.view_mash_factor == 4
    ig = image_geometry_from_sirf(image_template)
    assert ig.shape == model.image_shape
    assert ig.voxel_size_mm == pytest.approx(tuple(float(v) for v in image_template.voxel_sizes()))
    # the default image of the geometry is what SIRF's create_uniform_image gives
    assert sg.default_image().shape == ig.shape
    assert sg.default_image().voxel_size_mm == pytest.approx(ig.voxel_size_mm, rel=1e-5)
    for s in range(NUM_SUBSETS):
        views = model.subset_views(s)
        assert np.array_equal(views, np.arange(s, 64, NUM_SUBSETS))
        assert model.subset_sinogram_shape(s) == (1, dims[-3], len(views), dims[-1])
        sub = model.acquisition_template(s)
        assert from_sirf(sub).shape == model.subset_sinogram_shape(s)


# ----------------------------------------------------------------------------- adjointness
@pytest.mark.parametrize("subset", [None, 0, NUM_SUBSETS - 1])
def test_adjoint_identity(model, subset):
    assert adjoint_mismatch(model, subset=subset, seed=11) < 1e-4


# ----------------------------------------------------------------------------- against explicit SIRF calls
def test_direct_and_forward_match_one_full_sirf_model(model, full_sirf_model, images, image_template):
    linear = full_sirf_model.get_linear_acquisition_model()
    for x in images:
        ours = model.direct(x)
        theirs = sirf_direct(linear, x, image_template)
        assert rel_max_err(ours, theirs) < 1e-4
        ours_affine = model.forward(x)
        theirs_affine = from_sirf(full_sirf_model.forward(to_sirf_image(x, image_template)))
        assert rel_max_err(ours_affine, theirs_affine) < 1e-4
    assert rel_max_err(model.additive_term(), from_sirf(full_sirf_model.get_constant_term())) < 1e-5


@pytest.mark.parametrize("subset", range(NUM_SUBSETS))
def test_subset_forward_has_no_foreign_additive_term(model, full_sirf_model, images, image_template, subset):
    """Subset forward == full SIRF forward restricted to the subset's views (constant term included)."""
    views = torch.as_tensor(model.subset_views(subset))
    full = from_sirf(full_sirf_model.forward(to_sirf_image(images[0], image_template)))
    expected = full.index_select(2, views)
    got = model.forward(images[0], subset)
    assert got.shape == expected.shape == model.subset_sinogram_shape(subset)
    assert rel_max_err(got, expected) < 1e-4
    # the additive term of the subset is exactly the constant term's views
    const = from_sirf(full_sirf_model.get_constant_term()).index_select(2, views)
    assert rel_max_err(model.additive_term(subset), const) < 1e-5


def test_from_acquisition_model_matches_from_pieces(model, full_sirf_model, acq_template, image_template, images):
    wrapped = SIRFAcquisitionModel.from_acquisition_model(
        full_sirf_model, acq_template, image_template, num_subsets=NUM_SUBSETS
    )
    for s in (None, 1):
        assert rel_max_err(wrapped.forward(images[1], s), model.forward(images[1], s)) < 1e-4
        assert rel_max_err(wrapped.additive_term(s), model.additive_term(s)) < 1e-5


def test_with_num_subsets_shares_data_not_caches(model, images):
    other = model.with_num_subsets(8)
    assert other.num_subsets == 8 and model.num_subsets == NUM_SUBSETS
    assert np.array_equal(other.subset_views(3), np.arange(3, 64, 8))
    full = model.direct(images[0])
    sub = other.direct(images[0], 3)
    assert rel_max_err(sub, full.index_select(2, torch.as_tensor(other.subset_views(3)))) < 1e-4


# ----------------------------------------------------------------------------- no aliasing
def test_no_aliasing_between_calls_and_batch_items(model, images, image_template):
    template_before = from_sirf(image_template)
    y1 = model.direct(images[0], 0)
    y2 = model.direct(images[1], 0)
    assert rel_l2(y1, y2) > 1e-2  # two different images give two different sinograms...
    y1_again = model.direct(images[0], 0)
    assert torch.equal(y1, y1_again)  # ...and the first result was not overwritten by the second call
    y1.zero_()  # outputs own their memory: writing to one changes nothing the model keeps
    assert torch.equal(model.direct(images[0], 0), y1_again)
    batch = model.direct(images, 0)
    assert torch.equal(batch[0], y1_again) and not torch.equal(batch[0], batch[1])
    b1 = model.adjoint(batch[0], 0)
    b2 = model.adjoint(batch[1], 0)
    assert rel_l2(b1, b2) > 1e-2
    # STIR back-projects with OpenMP threads, whose float32 sums come in a thread-dependent
    # order: two calls on the same data agree to rounding (~3e-7 of the maximum on 2 threads,
    # bitwise with OMP_NUM_THREADS=1), not bitwise. Aliasing would give the other item's image.
    batch_back = model.adjoint(batch, 0)
    assert rel_max_err(batch_back[0], b1) < 1e-5 and rel_max_err(batch_back[1], b2) < 1e-5
    assert rel_l2(batch_back[0], b2) > 1e-2
    assert torch.equal(from_sirf(image_template), template_before)  # templates are never filled
    # SIRF -> torch copies: changing the SIRF object afterwards does not reach the tensor
    obj = to_sirf_image(images[0], image_template)
    t = from_sirf(obj)
    obj.fill(0.0)
    assert torch.equal(t, images[0])


def test_dtype_and_device_follow_the_input(model, images):
    y64 = model.direct(images[0].double(), 1)
    assert y64.dtype == torch.float64
    assert torch.allclose(y64.float(), model.direct(images[0], 1))
    if torch.cuda.is_available():
        yc = model.direct(images[0].cuda(), 1)
        assert yc.device.type == "cuda"
        assert model.forward(images.cuda(), 1).device.type == "cuda"


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("subset", [None, 2])
def test_forward_project_gradient_batch_of_two(model, images, image_template, subset):
    """L = 1/2 sum w (A_s x)^2 for a batch of two different images: grad = A_s^T (w A_s x)."""
    x = images.clone().double().requires_grad_(True)
    shape = (2,) + model.subset_sinogram_shape(subset)
    w = torch.rand(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = forward_project(x, model, subset)
    loss = 0.5 * (w * y**2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    am = model.sirf_model(subset)
    template = model.acquisition_template(subset)
    for b in range(2):
        ax = sirf_direct(am, images[b], image_template).double()
        expected = sirf_adjoint(am, (w[b] * ax).float(), template)
        assert rel_max_err(grad[b], expected) < 1e-4
    assert rel_l2(grad[0], grad[1]) > 1e-2  # the two items got their own gradients
    # central finite difference along a random direction
    v = torch.rand(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    eps = 1e-2 * float(images.abs().max())

    def loss_at(z):
        with torch.no_grad():
            return float(0.5 * (w * model.direct(z, subset).double() ** 2).sum())

    fd = (loss_at(x.detach() + eps * v) - loss_at(x.detach() - eps * v)) / (2 * eps)
    assert fd == pytest.approx(float((grad * v).sum()), rel=2e-2)


def test_back_project_gradient_batch_of_two(model, images, subset=1):
    """L = 1/2 sum u (A_s^T y)^2: grad = A_s (u A_s^T y), for two different sinograms."""
    y0 = model.forward(images, subset).detach().double()
    y = y0.clone().requires_grad_(True)
    u = torch.rand((2,) + model.image_shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    loss = 0.5 * (u * back_project(y, model, subset) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, y)
    am = model.sirf_model(subset)
    template = model.acquisition_template(subset)
    for b in range(2):
        aty = sirf_adjoint(am, y0[b].float(), template).double()
        expected = sirf_direct(am, (u[b] * aty).float(), model.image_template)
        assert rel_max_err(grad[b], expected) < 1e-4
    v = torch.rand(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    eps = 1e-2 * float(y0.abs().max())

    def loss_at(z):
        with torch.no_grad():
            return float(0.5 * (u * model.adjoint(z, subset).double() ** 2).sum())

    fd = (loss_at(y0 + eps * v) - loss_at(y0 - eps * v)) / (2 * eps)
    assert fd == pytest.approx(float((grad * v).sum()), rel=2e-2)


def test_one_operator_reused_in_three_stages(model, images):
    """Three Landweber stages x <- x + alpha A_s^T (y_s - A_s x), s = 0, 1, 2, one model, one backward.

    dL/dx0 for L = 1/2 ||x3 - t||^2 is (I - alpha A_0^T A_0)(I - alpha A_1^T A_1)(I - alpha A_2^T A_2)(x3 - t),
    computed here with explicit SIRF calls on the subset models.
    """
    subsets = (0, 1, 2)
    measured = model.direct(images.flip(0)).detach()  # data of the *other* image, so x moves
    x0 = images.clone().requires_grad_(True)
    probe = images[0]
    alpha = 0.5 * float(probe.norm() ** 2 / (model.direct(probe, 0).norm() ** 2))
    x = x0
    for s in subsets:
        residual = model.take_subset(measured, s) - forward_project(x, model, s)
        x = x + alpha * back_project(residual, model, s)
    target = torch.zeros_like(images)
    loss = 0.5 * ((x - target) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, x0)
    for b in range(2):
        g = (x[b] - target[b]).detach()
        for s in reversed(subsets):
            am = model.sirf_model(s)
            ag = sirf_direct(am, g, model.image_template)
            g = g - alpha * sirf_adjoint(am, ag, model.acquisition_template(s))
        assert rel_max_err(grad[b], g) < 1e-4


def test_three_em_stages_gradient_by_finite_differences(model, images):
    """x3 = EM_2(EM_1(EM_0(x0))) with the model reused; d<w, x3>/dx0 along a direction vs central differences."""
    prompts = model.forward(images.flip(0)).detach()
    floor = 0.05
    x0 = images.clamp_min(floor).double().requires_grad_(True)
    w = torch.rand(x0.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)

    def three_stages(x):
        for s in (0, 1, 2):
            x = em_update(x, model.take_subset(prompts, s), model, s)
        return x

    loss = (w * three_stages(x0)).sum()
    (grad,) = torch.autograd.grad(loss, x0)
    v = torch.rand(x0.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    eps = 1e-2 * floor  # keeps x0 +- eps v positive
    with torch.no_grad():
        lp = float((w * three_stages(x0.detach() + eps * v)).sum())
        lm = float((w * three_stages(x0.detach() - eps * v)).sum())
    fd = (lp - lm) / (2 * eps)
    assert fd == pytest.approx(float((grad * v).sum()), rel=2e-2)


# ----------------------------------------------------------------------------- EM update
def test_em_update_matches_explicit_sirf(model, images):
    prompts = model.forward(images[1]).detach()
    x = images[0]
    for s in (0, 3):
        ours = em_update(x, model.take_subset(prompts, s), model, s)
        am = model.sirf_model(s)
        template = model.acquisition_template(s)
        ybar = sirf_direct(am, x, model.image_template) + model.additive_term(s)
        ratio = model.take_subset(prompts, s) / ybar
        back = sirf_adjoint(am, ratio, template)
        sens = sirf_adjoint(am, torch.ones(model.subset_sinogram_shape(s)), template)
        expected = torch.where(sens > 0, x * back / sens.clamp_min(1e-30), torch.zeros_like(x))
        assert rel_max_err(ours, expected) < 1e-4


def test_em_update_matches_osmaposl_one_subiteration(acq_template, image_template, full_sirf_model, images):
    """One MLEM step (one subset) from our EM update vs SIRF's OSMAPOSLReconstructor."""
    one = SIRFAcquisitionModel.from_acquisition_model(full_sirf_model, acq_template, image_template, num_subsets=1)
    prompts = full_sirf_model.forward(to_sirf_image(images[1], image_template))
    x0 = torch.where(images[0] > 0, images[0], torch.full_like(images[0], 0.05))
    obj = pet.make_Poisson_loglikelihood(prompts, acq_model=full_sirf_model)
    recon = pet.OSMAPOSLReconstructor()
    recon.set_objective_function(obj)
    recon.set_num_subsets(1)
    recon.set_num_subiterations(1)
    start = to_sirf_image(x0, image_template)
    recon.set_up(start)
    recon.set_current_estimate(start)
    recon.update_current_estimate()
    theirs = from_sirf(recon.get_current_estimate())
    ours = em_update(x0, from_sirf(prompts), one, None)
    sens = one.sensitivity(None)
    keep = sens > 1e-3 * sens.max()
    assert rel_l2(ours[keep], theirs[keep]) < 1e-3


# ----------------------------------------------------------------------------- against the embedded backend
@pytest.fixture(scope="module")
def embedded_pair(acq_template, image_template, factors, additive, background):
    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel

    sirf_model = SIRFAcquisitionModel.from_pieces(
        acq_template, image_template, acquisition_sensitivity=factors, additive=additive, background=background,
        num_tangential_LORs=NUM_LORS, num_subsets=NUM_SUBSETS,
    )
    embedded = EmbeddedAcquisitionModel(
        sinogram_geometry_from_sirf(acq_template), image_geometry_from_sirf(image_template),
        num_subsets=NUM_SUBSETS, multiplicative=from_sirf(factors), additive=sirf_model.additive_term(),
    )
    return sirf_model, embedded


def test_embedded_backend_agrees_on_a_smooth_image(embedded_pair, images):
    sirf_model, embedded = embedded_pair
    for x in images:
        ys = sirf_model.direct(x)
        ye = embedded.direct(x)
        assert ye.shape == ys.shape
        assert rel_l2(ye, ys) < 0.05, "embedded Joseph vs STIR ray tracing on a smooth image (module docstring)"


def test_em_update_agrees_with_embedded_backend(embedded_pair, images):
    sirf_model, embedded = embedded_pair
    prompts = sirf_model.forward(images[1]).detach()
    s = 1
    ours = em_update(images[0], sirf_model.take_subset(prompts, s), sirf_model, s)
    emb = em_update(images[0], embedded.take_subset(prompts, s), embedded, s)
    sens = sirf_model.sensitivity(s)
    keep = sens > 1e-3 * sens.max()
    assert rel_l2(emb[keep], ours[keep]) < 0.05


# ----------------------------------------------------------------------------- count level
def test_support_projection_matches_explicit_sirf(model, full_sirf_model, image_template, factors):
    """``A_s M`` (the count level's ``m``, :meth:`AcquisitionModel.support_projection`): SIRF's linear
    model (factors included) on the support, restricted to the subset's views (1e-4, as the
    forward above); a copy with other subsets or factors projects its own, not the cached one."""
    support = model.support().to(torch.float32)
    want = sirf_direct(full_sirf_model.get_linear_acquisition_model(), support, image_template)
    for s in (None, 2, 3):  # subset 3 cached here: the 8-subset copy below must not reuse it
        views = None if s is None else torch.as_tensor(model.subset_views(s))
        assert rel_max_err(model.support_projection(s), want if s is None else want.index_select(2, views)) < 1e-4
    other = model.with_num_subsets(8)
    assert rel_max_err(other.support_projection(3),
                       want.index_select(2, torch.as_tensor(other.subset_views(3)))) < 1e-4
    doubled = model.with_terms(2.0 * from_sirf(factors), None)
    assert rel_max_err(doubled.support_projection(2), 2.0 * model.support_projection(2)) < 1e-5


@pytest.mark.parametrize("total", [3e5, 3e6])
def test_count_level_agrees_with_embedded_backend(embedded_pair, images, total):
    """Poisson prompts simulated through SIRF (1 segment, 63 360 bins: ~5 and ~50 counts per bin):
    the count level from SIRF's support projection equals the embedded backend's within 1 % (the two
    projectors differ by a few % at the FOV's edge only, which the ratio ``y / m`` barely sees), and
    a count-aware stage fuses with the same strength: its output agrees with the embedded one's as
    the EM update does (5 %, module docstring)."""
    from sirf_fbsem.model.fbsem import FBSEMStage
    from sirf_fbsem.model.regularisers import RegulariserConfig, build_regulariser
    from sirf_fbsem.recon.count_level import estimated_counts

    sirf_model, embedded = embedded_pair
    mean = sirf_model.forward(images[0]).detach().double()
    a = total / float(mean.sum())
    prompts = torch.poisson(mean * a, generator=torch.Generator().manual_seed(1)).float()
    sirf_scaled, embedded_scaled = (m.with_terms(None, m.additive_term() * a) for m in (sirf_model, embedded))
    s = 1
    y_s = sirf_model.take_subset(prompts, s)
    counts = [float(estimated_counts(y_s, m.additive_term(s), m.support_projection(s))[0]) * NUM_SUBSETS
              for m in (sirf_scaled, embedded_scaled)]
    assert counts[0] == pytest.approx(counts[1], rel=0.01)
    assert 0.5 * total < counts[0] < 1.05 * total  # a count level, below the counts where E[z] varies (docs)
    torch.manual_seed(0)
    stage = FBSEMStage(build_regulariser(RegulariserConfig(dims=3, channels=4, layers=2)), beta_init=0.05,
                       beta_counts="log_linear")
    with torch.no_grad():
        stage.count_slope.fill_(0.8)
        levels = [stage.log_counts(y_s, m, s) for m in (sirf_scaled, embedded_scaled)]
        torch.testing.assert_close(levels[0], levels[1], atol=0.01, rtol=0)
        x = images[1].unsqueeze(0) * a
        outs = [stage(x, y_s, m, s) for m in (sirf_scaled, embedded_scaled)]
    sens = sirf_scaled.sensitivity(s)
    keep = (sens > 1e-3 * sens.max()).unsqueeze(0)
    assert rel_l2(outs[1][keep], outs[0][keep]) < 0.05


# ----------------------------------------------------------------------------- other projectors
def test_parallelproj_backend_adjoint(acq_template, image_template):
    if getattr(pet, "AcquisitionModelUsingParallelproj", None) is None:
        pytest.skip("this SIRF was built without parallelproj")
    pp = SIRFAcquisitionModel.from_pieces(acq_template, image_template, projector="parallelproj", num_subsets=2)
    for subset in (None, 1):
        assert adjoint_mismatch(pp, subset=subset, seed=4) < 1e-4


def test_clear_errors(acq_template, image_template, model):
    with pytest.raises(ValueError, match="projector must be one of"):
        SIRFAcquisitionModel.from_pieces(acq_template, image_template, projector="siddon")
    with pytest.raises(ValueError, match="expects"):
        model.direct(torch.zeros(3, 4, 5))
    with pytest.raises(TypeError, match="model_factory"):
        SIRFAcquisitionModel.from_acquisition_model(
            pet.AcquisitionModelUsingMatrix(), acq_template, image_template
        )
    with pytest.raises(ValueError, match="negative"):
        SIRFAcquisitionModel.from_pieces(acq_template, image_template, background=-torch.ones(model.sinogram_shape))
