"""The typed records of training data: Sample (one acquisition) and Batch (a stack)."""
from __future__ import annotations

import pytest
import torch

from sirf_fbsem.samples import BATCH_FIELDS, Batch, Sample, SampleError
from tiny_problems import tiny_samples


@pytest.fixture(scope="module")
def problem():
    return tiny_samples(num_samples=2, num_subsets=2, num_targets=2, seed=3)


def test_file_round_trip_is_exact(problem, tmp_path):
    _, samples = problem
    s = samples[0].replace(counts=1e4, seed=5, index=1)
    torch.save(s.to_dict(), tmp_path / "s.pt")
    back = Sample.from_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back.counts == 1e4 and back.seed == 5 and back.index == 1 and back.mu_map is None
    for name, value in s.to_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(back, name), value), name


def test_bad_records_are_refused_with_the_field_named(problem):
    _, samples = problem
    d = samples[0].to_dict()
    with pytest.raises(SampleError, match=r"sample_7\.pt: unknown keys \['phantomm'\]"):
        Sample.from_dict({**d, "phantomm": d["phantom"]}, "sample_7.pt")
    with pytest.raises(SampleError, match=r"lacks \['targets'\]"):
        Sample.from_dict({k: v for k, v in d.items() if k != "targets"})
    with pytest.raises(SampleError, match="Sample.phantom has shape"):
        samples[0].replace(phantom=d["phantom"][:, :-1])
    with pytest.raises(SampleError, match="Sample.additive has shape"):
        samples[0].replace(additive=d["additive"][..., :-1])
    with pytest.raises(SampleError, match=r"targets must be \(K, Z, Y, X\)"):
        samples[0].replace(targets=d["targets"][0])


def test_in_units_keeps_the_forward_model_and_the_prompts(problem):
    """Images / c, multiplicative and sensitivity x c: m G x + b is unchanged, so are the prompts."""
    base, samples = problem
    s = samples[0]
    c = 3.7
    u = s.in_units(c)
    assert torch.equal(u.prompts, s.prompts) and torch.equal(u.additive, s.additive)
    torch.testing.assert_close(u.targets * c, s.targets)
    torch.testing.assert_close(u.phantom * c, s.phantom)
    ybar = base.with_terms(s.multiplicative, s.additive).forward(s.phantom)
    ybar_u = base.with_terms(u.multiplicative, u.additive).forward(u.phantom)
    torch.testing.assert_close(ybar_u, ybar, rtol=1e-5, atol=1e-6)
    model_u = base.with_terms(u.multiplicative, u.additive)
    torch.testing.assert_close(u.sensitivity[1], model_u.sensitivity(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(SampleError, match="positive"):
        s.in_units(0.0)


def test_batch_stacks_fields_every_sample_has(problem):
    _, samples = problem
    b = Batch.collate(samples)
    assert b.size == 2 and b.num_targets == 2
    for name in BATCH_FIELDS:
        v = getattr(b, name)
        if getattr(samples[0], name) is None:
            assert v is None
        else:
            assert torch.equal(v[1], getattr(samples[1], name)), name
    partial = Batch.collate([samples[0], samples[1].replace(sensitivity=None)])
    assert partial.sensitivity is None and partial.multiplicative is not None
    with pytest.raises(SampleError, match="item 0 is a dict"):
        Batch.collate([samples[0].to_dict()])
    with pytest.raises(ValueError, match="empty"):
        Batch.collate([])


def test_a_batch_of_one_shares_its_samples_memory_and_a_larger_batch_copies(problem):
    """One sample on the batch's device: views (no 1.3 GB copy per use of a 3D sample); several: a stack."""
    _, samples = problem
    one = Batch.collate(samples[:1])
    two = Batch.collate(samples[:2])
    for name in BATCH_FIELDS:
        v = getattr(samples[0], name)
        if v is None:
            continue
        assert getattr(one, name).shape == (1,) + tuple(v.shape), name
        assert getattr(one, name).data_ptr() == v.data_ptr(), name
        assert getattr(two, name).data_ptr() != v.data_ptr(), name
        torch.testing.assert_close(getattr(two, name)[0], v, rtol=0, atol=0)
