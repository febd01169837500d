"""Scale equivariance of FBSEM: prompts and additive term ``a`` times larger give an image ``a``
times larger (the count-matched start rule, :func:`sirf_fbsem.recon.engine.count_matched_scale`).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sirf_fbsem.cli import main as cli
from sirf_fbsem.io.interfile import read_projdata, write_projdata
from sirf_fbsem.model.io import load_model
from sirf_fbsem.recon.engine import FBSEMUpdate, count_matched_scale, reconstruct, start_image

from tiny_problems import perturb, small_net, tiny_samples

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"
SCALES = (0.01, 100.0)


def test_count_matched_scale_matches_counts_and_is_homogeneous():
    base, samples = tiny_samples(num_samples=2, num_subsets=4)
    s = samples[0]
    model = base.with_terms(s.multiplicative, s.additive)
    x0 = start_image(model)[None]
    y0 = model.take_subset(s.prompts, 0)[None]
    b0 = model.additive_term(0)
    scale = count_matched_scale(x0, y0, b0, model.sensitivity(0))
    # x0 rescaled has the measured true counts as its expected counts on subset 0
    expected = model.direct(x0[0] * scale[0], 0).sum()
    torch.testing.assert_close(expected, y0.sum() - b0.sum(), rtol=1e-4, atol=0)
    for a in SCALES:
        torch.testing.assert_close(count_matched_scale(x0, a * y0, a * b0, model.sensitivity(0)), a * scale,
                                   rtol=1e-5, atol=0)
    # degree -1 in the start image
    torch.testing.assert_close(count_matched_scale(3 * x0, y0, b0, model.sensitivity(0)), scale / 3, rtol=1e-5,
                               atol=0)


def test_count_matched_scale_floor_and_degenerate_cases():
    x0 = torch.ones(2, 1, 2, 2)
    sens = torch.ones(1, 2, 2)
    y = torch.tensor([[10.0, 10.0], [0.0, 0.0]]).reshape(2, 1, 1, 1, 2)
    b = torch.full((2, 1, 1, 1, 2), 20.0)  # more additive than prompts
    s = count_matched_scale(x0, y, b, sens)
    assert s[0] == pytest.approx(2.0 / 4)  # a tenth of the prompts over the 4 voxels' expected counts
    assert s[1] == 1.0  # no prompts: the start image stays as given
    assert count_matched_scale(torch.zeros(1, 1, 2, 2), y[:1], 0.0, sens)[0] == 1.0


@pytest.mark.parametrize("a", SCALES)
def test_network_output_scales_with_the_data(a):
    base, samples = tiny_samples(num_samples=2, num_subsets=4)
    net = small_net(num_stages=6, num_subsets=4, beta_init=0.5)
    perturb(net)  # CNNs that do something
    assert net.start_rule == "count_matched"
    prompts = torch.stack([s.prompts for s in samples])
    mult = torch.stack([s.multiplicative for s in samples])
    add = torch.stack([s.additive for s in samples])
    x0 = start_image(base).expand((2,) + tuple(base.image_shape))
    with torch.no_grad():
        ref = net(x0, prompts, base.with_terms(mult, add))
        out = net(x0, a * prompts, base.with_terms(mult, a * add))
    assert float(ref.amax()) > 0
    torch.testing.assert_close(out, a * ref, rtol=1e-4, atol=1e-6 * a * float(ref.amax()))
    # the rule does not depend on the start image's level either
    with torch.no_grad():
        out3 = net(7.0 * x0, prompts, base.with_terms(mult, add))
    torch.testing.assert_close(out3, ref, rtol=1e-4, atol=1e-6 * float(ref.amax()))
    # the engine (every entry point's loop) runs the same rule
    model = base.with_terms(mult[0], add[0])
    x = reconstruct(model, prompts[0], FBSEMUpdate(net), net.num_stages)
    torch.testing.assert_close(x, ref[0], rtol=1e-4, atol=1e-6 * float(ref.amax()))


def test_network_without_the_rule_is_not_equivariant():
    """The check above can fail: a start image of 1 whatever the data's scale is not equivariant."""
    base, samples = tiny_samples(num_samples=1, num_subsets=4)
    net = small_net(num_stages=4, num_subsets=4, beta_init=0.5)
    net.start_rule = "none"
    perturb(net)
    s = samples[0]
    x0 = start_image(base)
    with torch.no_grad():
        ref = net(x0, s.prompts, base.with_terms(s.multiplicative, s.additive))
        out = net(x0, 100 * s.prompts, base.with_terms(s.multiplicative, 100 * s.additive))
    assert float((out - 100 * ref).abs().max() / (100 * ref).abs().max()) > 0.01


def _scaled_copy(src: Path, dst: Path, a: float) -> Path:
    sino, data = read_projdata(src)
    write_projdata(dst, sino, np.asarray(data, dtype=np.float32) * np.float32(a))
    return dst


@pytest.mark.parametrize("a", SCALES)
def test_bundled_model_reconstruction_scales_with_the_data(tmp_path, a):
    """The trained bundled model through ``sirf-fbsem reconstruct``: within 1 % of ``a`` times the image."""
    net, _ = load_model(TEST_DATA / "fbsem_model.pt")
    assert net.start_rule == "count_matched", "the bundled model predates the count-matched start rule"
    common = ["--model", str(TEST_DATA / "fbsem_model.pt"), "--norm", str(TEST_DATA / "phantom_mult.hs"),
              "--no-progress"]
    assert cli(["reconstruct", str(TEST_DATA / "phantom_scan.hs"), "--additive", str(TEST_DATA / "phantom_additive.hs"),
                "--output", str(tmp_path / "ref.nii"), *common]) == 0
    scan = _scaled_copy(TEST_DATA / "phantom_scan.hs", tmp_path / "scan.hs", a)
    additive = _scaled_copy(TEST_DATA / "phantom_additive.hs", tmp_path / "additive.hs", a)
    assert cli(["reconstruct", str(scan), "--additive", str(additive), "--output", str(tmp_path / "scaled.nii"),
                *common]) == 0
    ref = np.asarray(nib.load(tmp_path / "ref.nii").dataobj, dtype=np.float64)
    out = np.asarray(nib.load(tmp_path / "scaled.nii").dataobj, dtype=np.float64)
    assert ref.max() > 0
    assert np.linalg.norm(out - a * ref) <= 0.01 * np.linalg.norm(a * ref)
    assert out.sum() == pytest.approx(a * ref.sum(), rel=0.01)


def test_em_update_stays_finite_where_the_expected_counts_underflow():
    """Prompts in bins whose mean is ~1e-40 (a zero additive estimate at the FOV's edge, as on the
    real mMR listmode with few delayeds) must not give inf ratios and NaN voxels (STIR caps the ratio)."""
    from sirf_fbsem.autograd import MAX_QUOTIENT, em_update

    base, samples = tiny_samples(num_samples=1, num_subsets=1)
    s = samples[0]
    model = base.with_terms(s.multiplicative, torch.zeros_like(s.additive))
    x = start_image(model) * 2e-38  # tiny (normal float32) activity: ratios of ~1e37 whose sum overflows
    prompts = torch.ones_like(s.prompts) * 5
    out = em_update(x, prompts, model, 0)
    assert torch.isfinite(out).all()
    # the cap is STIR's: the update is at most MAX_QUOTIENT times the start where every ratio is capped
    assert float(out.max()) <= MAX_QUOTIENT * 2e-38 * 1.0001
