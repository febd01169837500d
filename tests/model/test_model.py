"""FBSEM stage, network, regulariser and model files.

The stage's fusion is checked against the voxel-wise MAP-EM objective it maximises::

    Q(x) = sens (x_em log x - x) - beta/2 (x - x_reg)^2,
    Q'(x) = 0  <=>  beta x^2 + (sens - beta x_reg) x - sens x_em = 0,

whose positive root is the closed form of :func:`fbsem_fusion`.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle

import pytest
import torch

from sirf_fbsem.recon.engine import start_image

from sirf_fbsem.autograd import em_update
from sirf_fbsem.geometry import GeometryError, ImageGeometry
from sirf_fbsem.model import (
    FBSEMNet,
    FBSEMStage,
    ModelFileError,
    RegulariserConfig,
    ResidualCNN,
    fbsem_fusion,
    inverse_softplus,
    load_model,
    save_model,
)
from sirf_fbsem.recon import OSEM
from sirf_fbsem.simulation.targets import osem_targets
from tiny_problems import perturb, small_net, tiny2d_geometry, tiny_samples

# ----------------------------------------------------------------------------- fusion


def test_inverse_softplus_round_trip():
    for beta in (1e-6, 0.1, 1.0, 5.0, 30.0):
        assert math.isclose(float(torch.nn.functional.softplus(torch.tensor(inverse_softplus(beta), dtype=torch.float64))),
                            beta, rel_tol=1e-12)
    assert inverse_softplus(0.0) == -math.inf
    with pytest.raises(ValueError, match="beta"):
        inverse_softplus(-1.0)


def test_fusion_with_zero_beta_is_exactly_the_em_image():
    g = torch.Generator().manual_seed(0)
    x_em, x_reg, sens = torch.rand(3, 1000, generator=g) * torch.tensor([[5.0], [5.0], [3.0]])
    sens[:10] = 0
    out = fbsem_fusion(x_em, x_reg, sens, 0.0)
    assert torch.equal(out[10:], x_em[10:])
    assert torch.equal(out[:10], torch.zeros(10))


def test_fusion_is_the_maximiser_of_the_voxelwise_map_objective():
    g = torch.Generator().manual_seed(1)
    n = 300
    x_em = torch.rand(n, generator=g, dtype=torch.float64) * 4
    x_reg = torch.rand(n, generator=g, dtype=torch.float64) * 4
    sens = 0.05 + torch.rand(n, generator=g, dtype=torch.float64) * 3
    beta = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2)  # 1e-2 .. 1e2
    x = fbsem_fusion(x_em, x_reg, sens, beta)
    b = 1 - beta * x_reg / sens
    assert (b > 0).any() and (b < 0).any()  # both branches of the stable form are exercised
    # stationarity of Q: sens (x_em / x - 1) - beta (x - x_reg) = 0
    grad = sens * (x_em / x - 1) - beta * (x - x_reg)
    scale = sens * (x_em / x + 1) + beta * (x + x_reg)
    assert float((grad.abs() / scale).max()) < 1e-12
    # Q is strictly concave: the root is the global maximiser; confirm on a dense grid per voxel
    q = lambda t: sens[:, None] * (x_em[:, None] * torch.log(t) - t) - beta[:, None] / 2 * (t - x_reg[:, None]) ** 2  # noqa: E731
    hi = 2 * torch.maximum(x_em, x_reg) + 1
    grid = torch.linspace(1e-6, 1, 20001, dtype=torch.float64)[None, :] * hi[:, None]
    best = grid.gather(1, q(grid).argmax(dim=1, keepdim=True))[:, 0]
    step = hi / 20000
    assert float(((best - x).abs() / step).max()) <= 1.0
    assert bool((q(x[:, None])[:, 0] >= q(best[:, None])[:, 0] - 1e-12 * q(best[:, None])[:, 0].abs()).all())


def test_fusion_stable_in_both_branches_in_float32():
    # b = 1 - beta x_reg / sens strongly negative (beta x_reg >> sens) and positive; float64 reference
    x_em = torch.tensor([1e-3, 0.5, 2.0, 1.0, 1e-4, 3.0], dtype=torch.float64)
    x_reg = torch.tensor([5.0, 4.0, 3.0, 0.1, 2.0, 0.0], dtype=torch.float64)
    sens = torch.tensor([1e-2, 1e-1, 1.0, 1.0, 1e-3, 2.0], dtype=torch.float64)
    beta = torch.tensor([1e3, 1e2, 1e3, 1e-2, 1e4, 0.5], dtype=torch.float64)
    b = 1 - beta * x_reg / sens
    assert (b < -100).sum() >= 3 and (b > 0).sum() >= 2
    a = beta / sens
    ref = (-b + torch.sqrt(b * b + 4 * a * x_em)) / (2 * a)  # float64, fine here
    ref = torch.where(b > 0, 2 * x_em / (b + torch.sqrt(b * b + 4 * a * x_em)), ref)
    out = fbsem_fusion(x_em.float(), x_reg.float(), sens.float(), beta.float()).double()
    assert torch.allclose(out, ref, rtol=2e-6, atol=0)
    # the textbook form 2 x_em / (b + sqrt(b^2 + 4 a x_em)) cancels catastrophically for b << 0
    bf, af = b.float(), a.float()
    naive = (2 * x_em.float() / (bf + torch.sqrt(bf * bf + 4 * af * x_em.float()))).double()
    assert float(((naive - ref).abs() / ref)[b < -100].max()) > 1e-4
    # and the other branch formula would cancel for b >> 0 with tiny a x_em (sanity of the split)
    assert float(out[5]) == pytest.approx(float(ref[5]), rel=1e-6)


def test_fusion_finite_with_zero_sensitivity_and_zero_values_incl_gradients():
    g = torch.Generator().manual_seed(2)
    x_em = torch.rand(200, generator=g, dtype=torch.float64)
    x_reg = torch.rand(200, generator=g, dtype=torch.float64)
    sens = torch.rand(200, generator=g, dtype=torch.float64)
    sens[::7] = 0
    x_em[::7] = 0
    x_em[1::11] = 0  # zero EM value inside the FOV
    x_reg[2::13] = 0
    sens[3] = 0.5  # b = 0 exactly with x_em = 0: the root's clamp keeps gradients finite
    x_reg[3] = 1.0
    x_em[3] = 0.0
    for beta0 in (0.0, 0.5, 1e4):
        xe, xr = x_em.clone().requires_grad_(), x_reg.clone().requires_grad_()
        beta = torch.tensor(beta0, dtype=torch.float64, requires_grad=True)
        out = fbsem_fusion(xe, xr, sens, beta)
        assert torch.isfinite(out).all() and (out >= 0).all()
        assert torch.equal(out[sens == 0], torch.zeros_like(out[sens == 0]))
        out.sum().backward()
        for t in (xe.grad, xr.grad, beta.grad):
            assert torch.isfinite(t).all()


def test_fusion_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    x_em = (0.1 + torch.rand(12, generator=g, dtype=torch.float64)).requires_grad_()
    x_reg = (0.1 + 2 * torch.rand(12, generator=g, dtype=torch.float64)).requires_grad_()
    sens = 0.2 + torch.rand(12, generator=g, dtype=torch.float64)
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: fbsem_fusion(a, b, sens, c), (x_em, x_reg, beta))


# ----------------------------------------------------------------------------- regulariser


@pytest.mark.parametrize("dims", [2, 3])
def test_residual_cnn_shapes_identity_at_init_nonnegative_and_homogeneous(dims):
    cnn = ResidualCNN(dims=dims, in_channels=1, channels=4, layers=3)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(cnn(x), x, rtol=1e-6)  # zero-initialised last layer: x_reg = x
    perturb(cnn, scale=0.5)
    out = cnn(x)
    assert out.shape == x.shape and (out >= 0).all() and not torch.allclose(out, x)
    # intensity normalisation; atol: float32 rounding of the scale, relative to the image maximum
    assert torch.allclose(cnn(7.0 * x), 7.0 * out, rtol=1e-5, atol=1e-5 * 7.0 * float(out.detach().max()))
    cnn2 = ResidualCNN(RegulariserConfig(dims=dims, in_channels=2, channels=4, layers=3))
    assert cnn2(x, anatomical=torch.rand(2, 3, 8, 8)).shape == x.shape
    with pytest.raises(ValueError, match="anatomical"):
        cnn2(x)
    with pytest.raises(ValueError, match="PET-only|in_channels=1"):
        cnn(x, anatomical=x)


def test_regulariser_config_is_validated():
    with pytest.raises(ValueError, match="dims"):
        RegulariserConfig(dims=4)
    with pytest.raises(ValueError, match="kernel"):
        RegulariserConfig(kernel=4)
    with pytest.raises(ValueError, match="unknown regulariser config keys"):
        RegulariserConfig.from_dict({"dims": 2, "colour": "red"})
    assert RegulariserConfig.from_dict(RegulariserConfig(dims=2).to_dict()) == RegulariserConfig(dims=2)


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_relu_stack_gives_autograds_gradients_exactly(dims):
    """The leaner backward of the conv-ReLU stack: same outputs and same gradients (input,
    weights, biases) as ``nn.Sequential``'s own, with dead ReLUs present (negative biases)."""
    from sirf_fbsem.model.regularisers import conv_relu_stack

    torch.manual_seed(0)
    cnn = ResidualCNN(dims=dims, in_channels=2, channels=6, layers=4)
    perturb(cnn, scale=0.5)
    with torch.no_grad():
        for m in cnn.net[0::2]:
            m.bias.sub_(0.3)  # many units below zero
    shape = (3, 2, 5, 9, 9) if dims == 3 else (3, 2, 9, 9)
    h = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    cnn = cnn.double()
    w = torch.randn((shape[0], 1) + shape[2:], dtype=torch.float64)
    grads = []
    for run in (lambda t: cnn.net(t.clone()), lambda t: conv_relu_stack(cnn.net, t)):
        cnn.zero_grad(set_to_none=True)
        h.grad = None
        out = run(h)
        (out * w).sum().backward()
        grads.append((out.detach(), h.grad.clone(), [p.grad.clone() for p in cnn.parameters()]))
    (o0, gh0, gp0), (o1, gh1, gp1) = grads
    assert torch.equal(o0, o1)
    assert torch.allclose(gh0, gh1, rtol=1e-12, atol=1e-12) and (gh0 != 0).any()
    for a, b in zip(gp0, gp1):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="conv, ReLU"):
        conv_relu_stack(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Conv2d(2, 1, 3)),
                        torch.zeros(1, 1, 5, 5))


def test_conv_relu_stack_backward_needs_one_activation_less():
    """Peak live tensor bytes of one backward (torch's MemTracker): at least 3/4 of a hidden activation
    below autograd's own conv-ReLU backward."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    from sirf_fbsem.model.regularisers import conv_relu_stack

    torch.manual_seed(0)
    cnn = ResidualCNN(dims=3, in_channels=1, channels=16, layers=5)
    perturb(cnn, scale=0.5)
    x = torch.rand(1, 1, 8, 48, 48)
    activation = 16 * 8 * 48 * 48 * 4  # bytes of one hidden activation
    peaks = []
    for run in (cnn.net, lambda t: conv_relu_stack(cnn.net, t)):
        cnn.zero_grad(set_to_none=True)
        tracker = mem_tracker.MemTracker()
        tracker.track_external(cnn, x)
        with tracker:
            run(x).square().mean().backward()
        peaks.append(sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values()))
    assert peaks[0] - peaks[1] >= 0.75 * activation, peaks


# ----------------------------------------------------------------------------- stage and network


def test_stage_with_zero_beta_equals_em_update_exactly():
    base, samples = tiny_samples(num_samples=2)
    s = samples[0]
    model = base.with_terms(s.multiplicative, s.additive)
    stage = FBSEMStage(ResidualCNN(dims=2, channels=4, layers=3), beta_init=0.0)
    perturb(stage.regulariser)
    x = s.targets[0].unsqueeze(0)
    y1 = model.take_subset(s.prompts, 1)
    out = stage(x, y1, model, 1, s.sensitivity[1])
    assert torch.equal(out, em_update(x, y1, model, 1, s.sensitivity[1]))


@pytest.mark.parametrize("start_rule", ["none", "count_matched"])
def test_em_only_network_reproduces_osem_subiterates_in_order(start_rule):
    base, samples = tiny_samples(num_samples=1, num_subsets=4)
    s = samples[0]
    model = base.with_terms(s.multiplicative, s.additive)
    net = small_net(num_stages=6, num_subsets=4, beta_init=0.0)
    net.start_rule = start_rule
    perturb(net)
    outs = net(start_image(model), s.prompts, model, s.sensitivity, return_all=True)
    # the targets' rule is the network's: the same iterates as OSEM from its start image
    expected = osem_targets(model, s.prompts, 6, start_rule=start_rule)
    x0 = start_image(model)
    if start_rule == "count_matched":  # the scale written out: subset 0's counts less b over A_0 x0
        y0, b0 = model.take_subset(s.prompts, 0), model.additive_term(0)
        x0 = x0 * (y0.sum() - b0.sum()) / (model.sensitivity(0) * x0).sum()
    algo = OSEM(model, s.prompts, initial=x0)
    for k in range(6):
        x = algo.update()
        assert torch.allclose(outs[k], x, rtol=1e-5, atol=1e-6), k
        assert torch.allclose(expected[k], x, rtol=1e-5, atol=1e-6), k


def test_network_outputs_and_gradients_finite_with_zero_sensitivity_voxels():
    base, samples = tiny_samples(num_samples=2)
    s = samples[0]
    model = base.with_terms(s.multiplicative, s.additive)
    assert bool((s.sensitivity == 0).any())  # corners of the square image lie outside the FOV
    net = small_net(beta_init=2.0)
    perturb(net)
    x0 = torch.ones((1,) + model.image_shape, requires_grad=True)
    out = net(x0, s.prompts, model, s.sensitivity)
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert torch.equal(out[0][s.sensitivity[3] == 0], torch.zeros(int((s.sensitivity[3] == 0).sum())))
    out.square().mean().backward()
    assert torch.isfinite(x0.grad).all()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_stage_is_positively_homogeneous_with_normalised_beta():
    base, samples = tiny_samples(num_samples=1)
    s = samples[0]
    net = small_net(beta_init=1.0)
    perturb(net)
    m1 = base.with_terms(s.multiplicative, s.additive)
    m2 = base.with_terms(s.multiplicative, 5.0 * s.additive)
    x0 = torch.ones((1,) + m1.image_shape)
    out1 = net(x0, s.prompts, m1, s.sensitivity)
    out2 = net(5.0 * x0, 5.0 * s.prompts, m2, s.sensitivity)
    assert torch.allclose(out2, 5.0 * out1, rtol=1e-4, atol=1e-5)


def test_network_options_and_argument_checks():
    net = small_net(num_stages=5, num_subsets=2)
    assert net.subset_of_stage(3) == 1
    assert len(net.betas) == 5 and torch.allclose(net.betas, torch.full((5,), 0.1))
    shared = FBSEMNet(5, 2, RegulariserConfig(dims=2, channels=4, layers=3), shared_regulariser=True)
    single = FBSEMNet(1, 2, RegulariserConfig(dims=2, channels=4, layers=3))
    # one CNN; every stage has its own rho and count slope (2 scalars per extra stage)
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in single.parameters()) + 2 * 4
    assert FBSEMNet.from_config(net.config()).config() == net.config()
    base, samples = tiny_samples(num_samples=1, num_subsets=4)
    s = samples[0]
    with pytest.raises(ValueError, match="4 subsets"):
        net(torch.ones(base.image_shape), s.prompts, base)
    anat = small_net(in_channels=2)
    with pytest.raises(ValueError, match="anatomical"):
        anat(torch.ones(base.image_shape), s.prompts, base)


# ----------------------------------------------------------------------------- model files


def _metadata():
    sino, image = tiny2d_geometry()
    return {"sinogram_geometry": sino, "image_geometry": image, "training_mode": "sequential"}


def test_model_file_round_trip(tmp_path):
    net = small_net(num_stages=3)
    perturb(net)
    path = save_model(tmp_path / "model.pt", net, _metadata())
    assert (tmp_path / "model.json").is_file()
    sino, _ = tiny2d_geometry()
    loaded, meta = load_model(path, expected_sinogram_geometry=sino)
    assert meta["num_stages"] == 3 and meta["training_mode"] == "sequential"
    assert meta["intensity_scaling"] == {"regulariser_input": "mean", "beta_units": "normalised", "start_rule": "count_matched"}
    assert meta["sinogram_geometry"] == sino
    for (k1, v1), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    raw = torch.load(path, weights_only=True)  # plain tensors and strings only
    assert isinstance(raw["metadata_json"], str)
    shared = FBSEMNet(3, 4, RegulariserConfig(dims=2, channels=4, layers=2), shared_regulariser=True)
    perturb(shared)
    loaded, meta = load_model(save_model(tmp_path / "shared.pt", shared, _metadata()))
    assert meta["shared_regulariser"] and loaded.stages[0].regulariser is loaded.stages[2].regulariser
    assert all(torch.equal(a, b) for a, b in zip(shared.parameters(), loaded.parameters()))


def test_model_for_another_geometry_is_refused(tmp_path):
    net = small_net(num_stages=2)
    path = save_model(tmp_path / "model.pt", net, _metadata())
    other, _ = tiny2d_geometry(num_detectors=96, num_bins=40)
    with pytest.raises(GeometryError, match=r"num_detectors_per_ring: 64 vs 96.*num_views: 32 vs 48"):
        load_model(path, expected_sinogram_geometry=other)
    loaded, _ = load_model(path, expected_sinogram_geometry=other, override_geometry=True)
    assert loaded.num_stages == 2
    with pytest.raises(GeometryError, match=r"voxel size \(z,y,x\) mm: \(4.0, 4.0, 4.0\) vs \(4.0, 2.0, 2.0\)"):
        load_model(path, expected_image_geometry=ImageGeometry((1, 32, 32), (4.0, 2.0, 2.0)))


class _Payload:
    """Stands for any custom object in a pickled file."""

    def __init__(self):
        self.value = 1


def test_model_file_with_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "sirf_fbsem.fbsem_net", "state_dict": {}, "extra": _Payload()}, path)
    with pytest.raises(ModelFileError, match="pickled Python objects"):
        load_model(path)
    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump({"a": _Payload()}, f)
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "plain.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a sirf_fbsem FBSEM-Net model"):
        load_model(tmp_path / "other.pt")


def test_model_file_records_units_and_old_convention_is_refused(tmp_path):
    """Models record SIRF's projection units; a model without them (trained on line integrals in mm) is refused."""
    from sirf_fbsem.model.io import ModelFileError
    from sirf_fbsem.projectors.base import PROJECTION_UNITS

    path = save_model(tmp_path / "model.pt", small_net(), _metadata())
    _, meta = load_model(path)
    assert meta["projection_units"] == PROJECTION_UNITS == "stir_pixel_units"
    payload = torch.load(path, weights_only=True)
    for units, message in ((None, "former units"), ("mm", "metadata field 'projection_units' is 'mm'")):
        old = json.loads(payload["metadata_json"])
        old.pop("projection_units", None)
        if units is not None:
            old["projection_units"] = units
        payload["metadata_json"] = json.dumps(old)
        payload["metadata_sha256"] = hashlib.sha256(payload["metadata_json"].encode()).hexdigest()  # only units differ
        bad = tmp_path / f"old_{units}.pt"
        torch.save(payload, bad)
        with pytest.raises(ModelFileError, match=message):
            load_model(bad)
