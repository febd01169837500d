"""The AcquisitionModel contract, run on every backend present: embedded (CPU), embedded
(CUDA, where a GPU is), SIRF (where ``sirf.STIR`` imports).

Every upper layer (engine, FBSEM stages, training, evaluation) uses only what is tested
here, so a backend that passes this suite serves all of them:
* ``image_geometry``, ``image_shape``, ``sinogram_shape``, ``num_subsets``, ``subset_views``;
* ``direct``/``adjoint`` an exact transpose pair (CIL's dot test), full and per subset;
* batches equal their items one by one, and no output is overwritten by a later call;
* ``with_terms``/``with_num_subsets``/``to`` give models with the same geometry;
* autograd: gradients of a batch of two different images, and of one operator reused by
  two stages, equal the explicit adjoint chain and central finite differences;
* the engine's OSEM raises the Poisson log-likelihood;
* the backends give the same numbers (SIRF's units): SIRF vs embedded projections of a
  smooth image within 1% relative L2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sirf_fbsem.autograd import back_project, em_update, forward_project
from sirf_fbsem.projectors.base import AcquisitionModel, adjoint_mismatch
from sirf_fbsem.projectors.factory import make_acquisition_model, sirf_available
from sirf_fbsem.recon.engine import EMUpdate, reconstruct, start_image
from sirf_fbsem.recon.osem import poisson_log_likelihood

from conftest import small_span3

NUM_SUBSETS = 4

BACKENDS = [
    pytest.param(("embedded", "cpu"), id="embedded-cpu"),
    pytest.param(("embedded", "cuda"), id="embedded-cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    pytest.param(("sirf", "cpu"), id="sirf",
                 marks=[pytest.mark.sirf,
                        pytest.mark.skipif(not sirf_available(), reason="sirf.STIR does not import here")]),
]


@pytest.fixture(scope="module")
def geometry():
    sino = small_span3()
    return sino, sino.default_image()


def smooth_image(image, seed: int = 0) -> torch.Tensor:
    """A smooth positive blob image (Z,Y,X), float32, inside the FOV."""
    z, y, x = image.centred_coordinates_mm()
    g = np.random.default_rng(seed)
    cy, cx = g.uniform(-20, 20, 2)
    r2 = (y[:, None] - cy) ** 2 + (x[None, :] - cx) ** 2
    plane = np.exp(-r2 / (2 * 40.0**2)) + 0.3 * np.exp(-((y[:, None] + 30) ** 2 + x[None, :] ** 2) / (2 * 15.0**2))
    axial = 1.0 + 0.3 * np.cos(np.linspace(0, np.pi, len(z)) * (1 + seed))
    return torch.from_numpy((axial[:, None, None] * plane[None]).astype(np.float32))


def terms(sino, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mult = 0.5 + torch.rand(sino.shape, generator=g)
    add = 0.1 + 0.05 * torch.rand(sino.shape, generator=g)
    return mult, add


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, geometry) -> AcquisitionModel:
    backend, device = request.param
    if backend == "sirf":
        import sirf.STIR as pet

        pet.set_verbosity(0)
    sino, image = geometry
    mult, add = terms(sino)
    return make_acquisition_model(backend, sino, image, num_subsets=NUM_SUBSETS, multiplicative=mult,
                                  additive=add, device=device)


def test_contract_attributes(model, geometry):
    sino, image = geometry
    assert model.image_geometry == image
    assert tuple(model.image_shape) == image.shape
    assert tuple(model.sinogram_shape) == sino.shape
    assert model.num_subsets == NUM_SUBSETS
    views = np.concatenate([model.subset_views(s) for s in range(NUM_SUBSETS)])
    assert sorted(views.tolist()) == list(range(sino.num_views))
    x = smooth_image(image).to(model.device)
    for s in (None, 1):
        y = model.direct(x, s)
        assert tuple(y.shape) == model.subset_sinogram_shape(s)
        assert y.device.type == torch.device(model.device).type
        assert tuple(model.additive_term(s).shape) == model.subset_sinogram_shape(s)


@pytest.mark.parametrize("subset", [None, 0, 3])
def test_adjoint_identity(model, subset):
    assert adjoint_mismatch(model, subset=subset, seed=1) < 1e-4


def test_batches_equal_items_and_nothing_is_overwritten(model, geometry):
    _, image = geometry
    a, b = smooth_image(image, 0).to(model.device), smooth_image(image, 1).to(model.device)
    ya, yb = model.direct(a, 2), model.direct(b, 2)
    ya_copy = ya.clone()
    y = model.direct(torch.stack([a, b]), 2)
    torch.testing.assert_close(y[0], ya, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[1], yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ya, ya_copy, rtol=0, atol=0)  # not overwritten by later calls
    assert not torch.allclose(ya, yb)
    xa, xb = model.adjoint(ya, 2), model.adjoint(yb, 2)
    xa_copy = xa.clone()
    x = model.adjoint(torch.stack([ya, yb]), 2)
    torch.testing.assert_close(x[0], xa, rtol=1e-5, atol=1e-5 * float(xa.abs().max()))
    torch.testing.assert_close(x[1], xb, rtol=1e-5, atol=1e-5 * float(xb.abs().max()))
    torch.testing.assert_close(xa, xa_copy, rtol=0, atol=0)


def test_with_terms_with_num_subsets_and_to(model, geometry):
    sino, image = geometry
    x = smooth_image(image).to(model.device)
    plain = model.with_terms(None, None)
    assert plain.image_geometry == image and plain.num_subsets == NUM_SUBSETS
    mult, add = terms(sino)
    y_plain = plain.direct(x, 1)
    y = model.direct(x, 1)
    torch.testing.assert_close(y, y_plain * model.take_subset(mult.to(y.device), 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain.additive_term(1), torch.zeros_like(plain.additive_term(1)))
    torch.testing.assert_close(model.additive_term(1).to(y.device), model.take_subset(add, 1).to(y.device))
    one = model.with_num_subsets(1)
    assert one.num_subsets == 1 and tuple(one.direct(x).shape) == sino.shape
    moved = model.to("cpu")
    torch.testing.assert_close(moved.direct(x.cpu(), 1), y.cpu(), rtol=1e-5, atol=1e-5)


def test_gradients_of_a_batch_of_two_and_of_a_reused_operator(model, geometry):
    """L(x) = <w, A_s x> + <v, A_s^T(w * A_s x)>: one operator used by two stages (forward, back).

    dL/dx = A_s^T w + A_s^T(w * A_s v), per batch item; L is linear, so central finite
    differences are exact up to float32 rounding.
    """
    _, image = geometry
    dev = model.device
    x = torch.stack([smooth_image(image, 0), smooth_image(image, 1)]).to(dev).requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    w = torch.rand((2,) + model.subset_sinogram_shape(1), generator=g).to(dev)
    v = torch.rand((2,) + tuple(model.image_shape), generator=g).to(dev)

    def loss(xx: torch.Tensor) -> torch.Tensor:
        y = forward_project(xx, model, 1)  # stage 1
        z = back_project(w * y, model, 1)  # stage 2: the same operator, transposed
        return (w * y).sum() + (v * z).sum()

    (grad,) = torch.autograd.grad(loss(x), x)
    with torch.no_grad():
        explicit = model.adjoint(w, 1) + model.adjoint(w * model.direct(v, 1), 1)
    torch.testing.assert_close(grad, explicit, rtol=1e-4, atol=1e-4 * float(explicit.abs().max()))
    assert not torch.allclose(grad[0], grad[1])  # the items' own gradients, not one shared
    d = torch.rand(x.shape, generator=torch.Generator().manual_seed(6)).to(dev)
    h = 1e-2 * float(x.detach().abs().max())
    with torch.no_grad():
        fd = (loss(x.detach() + h * d) - loss(x.detach() - h * d)) / (2 * h)
    assert abs(float(fd) - float((grad * d).sum())) <= 1e-3 * abs(float(fd))


def test_engine_osem_raises_the_likelihood(model, geometry):
    _, image = geometry
    truth = smooth_image(image).to(model.device)
    with torch.no_grad():
        prompts = torch.poisson(model.forward(truth * 50.0).clamp_min(0).cpu(), generator=torch.Generator().manual_seed(0))
    values = []
    x = start_image(model)
    for _ in range(3):
        values.append(poisson_log_likelihood(model, prompts.to(model.device), x))
        x = reconstruct(model, prompts, EMUpdate(), NUM_SUBSETS, initial=x)
    values.append(poisson_log_likelihood(model, prompts.to(model.device), x))
    assert all(b > a for a, b in zip(values, values[1:])), values
    # one EM update through the engine is the autograd-level em_update
    x1 = reconstruct(model, prompts, EMUpdate(), 1)
    ref = em_update(start_image(model), model.take_subset(prompts.to(model.device), 0), model, 0)
    torch.testing.assert_close(x1, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.sirf
@pytest.mark.skipif(not sirf_available(), reason="sirf.STIR does not import here")
@pytest.mark.parametrize("lors", [1, 2])
def test_sirf_and_embedded_give_the_same_numbers(geometry, lors):
    """Same geometry, same terms, same tangential LORs per bin (SIRF's default is 2): projections within
    1% relative L2, sums within 0.5% (measured 0.3%, 0.03% with one LOR)."""
    sino, image = geometry
    mult, add = terms(sino)
    kwargs = dict(num_subsets=1, multiplicative=mult, additive=add, num_tangential_LORs=lors)
    emb = make_acquisition_model("embedded", sino, image, **kwargs)
    srf = make_acquisition_model("sirf", sino, image, **kwargs)
    x = smooth_image(image)
    ye, ys = emb.direct(x), srf.direct(x)
    rel = float((ye - ys).norm() / ys.norm())
    assert rel <= 0.01, rel
    assert abs(float(ye.sum()) / float(ys.sum()) - 1) <= 0.005
    # back projections: same totals; voxel by voxel the Joseph and Siddon weights of 48 views
    # leave different view-aliasing patterns (about 3% here), which OSEM averages out
    be, bs = emb.adjoint(ys), srf.adjoint(ys)
    inside = start_image(emb) > 0
    assert abs(float(be[inside].sum() / bs[inside].sum()) - 1) <= 0.005
    rel_b = float((be - bs)[inside].norm() / bs[inside].norm())
    assert rel_b <= 0.05, rel_b


def test_tangential_lors_embedded(geometry):
    """STIR's num_tangential_LORs on the embedded projector: an exact transpose pair, the mean of shifted rays."""
    sino, image = geometry
    two = make_acquisition_model("embedded", sino, image, num_subsets=4, num_tangential_LORs=2)
    one = make_acquisition_model("embedded", sino, image, num_subsets=4)
    assert adjoint_mismatch(two, subset=1) < 1e-4
    x = smooth_image(image)
    y1, y2 = one.direct(x, 1), two.direct(x, 1)
    assert 0 < float((y2 - y1).norm() / y1.norm()) < 0.05  # a different, nearby sampling of the bin
    assert abs(float(y2.sum() / y1.sum()) - 1) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("subset", [None, 1])
def test_embedded_cuda_gives_the_cpu_numbers(geometry, subset):
    """Joseph on CUDA (vectorised torch) and on the CPU (numba) trace the same planes with the same
    weights: forward, adjoint and the EM update agree to float32 rounding, so a model trained on a GPU
    reconstructs the same image on a CPU."""
    sino, image = geometry
    mult, add = terms(sino)
    cpu, gpu = (make_acquisition_model("embedded", sino, image, num_subsets=NUM_SUBSETS, multiplicative=mult,
                                       additive=add, device=d) for d in ("cpu", "cuda"))
    x = smooth_image(image)
    y_cpu, y_gpu = cpu.direct(x, subset), gpu.direct(x.cuda(), subset).cpu()
    assert float((y_gpu - y_cpu).norm() / y_cpu.norm()) < 1e-5
    b_cpu, b_gpu = cpu.adjoint(y_cpu, subset), gpu.adjoint(y_cpu.cuda(), subset).cpu()
    assert float((b_gpu - b_cpu).norm() / b_cpu.norm()) < 1e-5
    prompts = torch.poisson(cpu.forward(x, subset), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(gpu.sensitivity(subset).cpu(), cpu.sensitivity(subset), rtol=1e-5,
                               atol=1e-6 * float(cpu.sensitivity(subset).max()))

    def em(m, x, y):  # x_new = x / s * A^T (y / (A x + b))
        return x / m.sensitivity(subset).clamp_min(1e-12) * m.adjoint(y / m.forward(x, subset), subset)

    x_cpu, x_gpu = em(cpu, x, prompts), em(gpu, x.cuda(), prompts.cuda()).cpu()
    assert float((x_gpu - x_cpu).norm() / x_cpu.norm()) < 1e-5
