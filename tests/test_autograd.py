"""autograd Functions: gradcheck in float64, reuse across stages, EM step properties."""
from __future__ import annotations

import torch

from conftest import tiny_image, tiny_scanner_geometry
from sirf_fbsem.autograd import back_project, em_update, forward_project
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel


def _model(**kw):
    g = tiny_scanner_geometry(span=1, max_ring_diff=1)
    img = tiny_image(g, nxy=9)
    img = type(img)((3, 9, 9), img.voxel_size_mm)
    return EmbeddedAcquisitionModel(g, img, dtype=torch.float64, num_subsets=2, **kw)


def test_gradcheck_forward_and_back_projection():
    model = _model()
    x = torch.rand(model.image_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: forward_project(v, model, 1), (x,), eps=1e-6, atol=1e-6)
    y = torch.rand(model.subset_sinogram_shape(0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: back_project(v, model, 0), (y,), eps=1e-6, atol=1e-6)


def test_gradcheck_em_update_batch_of_two():
    model = _model()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand((2,) + model.image_shape, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    y = torch.poisson(model.direct(x.detach() * 3, 0) + 0.1, generator=gen)
    # rtol loosened: the EM ratio y/(Ax) amplifies finite-difference round-off
    assert torch.autograd.gradcheck(lambda v: em_update(v, y, model, 0), (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_one_model_reused_in_three_stages():
    model = _model()
    x0 = torch.rand(model.image_shape, dtype=torch.float64, requires_grad=True)
    y = [model.direct(torch.ones(model.image_shape, dtype=torch.float64), s) for s in (0, 1)]

    def three_stages(v):
        for k in range(3):
            v = em_update(v + 0.1, y[k % 2], model, k % 2)
        return v

    assert torch.autograd.gradcheck(three_stages, (x0,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_em_update_fixed_point_on_consistent_data():
    model = _model()
    x = torch.rand(model.image_shape, dtype=torch.float64) + 0.5
    y = model.direct(x, 1)
    x_em = em_update(x, y, model, 1)
    sens = model.sensitivity(1)
    torch.testing.assert_close(x_em[sens > 0], x[sens > 0])
    assert torch.all(x_em[sens == 0] == 0)
