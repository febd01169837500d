"""Patch-sampled sequential training (training/patches.py): a stage's output on a region from precomputed
terms is its whole-volume output there; training on patches lowers the loss, resumes exactly, and is
configured and refused clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sirf_fbsem.cli import main
from sirf_fbsem.model import FBSEMNet, RegulariserConfig, ResidualCNN, StageTerms
from sirf_fbsem.model.fbsem import FBSEMStage
from sirf_fbsem.samples import Batch
from sirf_fbsem.training import CheckpointMismatchError, TrainConfig, train, with_terms_factory
from sirf_fbsem.training.patches import draw_patches, patch_training_step, terms_payload
from sirf_fbsem.training.trainers import _initial, _net_inputs, sample_scales, stage_loss
from tiny_problems import perturb, small_net, tiny_samples


@pytest.fixture(scope="module")
def problem():
    """8 samples with an anatomical image, 2 subsets, targets for 2 stages, on the 1 x 32 x 32 test image."""
    return tiny_samples(num_samples=8, num_subsets=2, num_targets=2, counts=2e4, seed=0, anatomical=True)


def _config(**kw) -> TrainConfig:
    base = dict(epochs=3, lr=1e-2, batch_size=2, validation_fraction=0.25, seed=0, progress=False,
                patch_shape=(1, 12, 12), patches_per_sample=3)
    base.update(kw)
    return TrainConfig(**base)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


REGIONS = [None, (slice(0, 1), slice(0, 10), slice(5, 17)), (slice(0, 1), slice(20, 32), slice(28, 32)),
           (slice(0, 1), slice(13, 14), slice(0, 1))]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("anatomical", [False, True])
def test_stage_output_on_a_region_is_the_whole_volume_output_there(problem, dims, anatomical):
    """x_next[R] from (x, x_em, sens, c, c_u, unit) and the crop of x grown by R equals the stage's whole-volume
    output on R (stage 0 after the start rule, and a later stage); and so do the gradients of a loss on R."""
    base, samples = problem
    torch.manual_seed(0)
    net = FBSEMNet(2, 2, RegulariserConfig(dims=dims, channels=8, layers=3, in_channels=2 if anatomical else 1))
    perturb(net)
    batch = Batch.collate(samples[:2], "cpu")
    model = with_terms_factory(base)(batch)
    kw = _net_inputs(net, batch)
    x0 = _initial(batch, model)
    for k in (0, 1):
        x = x0 if k == 0 else torch.rand(x0.shape, generator=torch.Generator().manual_seed(3)) * (x0 > 0)
        whole = net(x, batch.prompts, model, stages=[k], **kw)
        with torch.no_grad():
            terms = net.stage_terms(k, x, batch.prompts, model, **kw)
        for region in REGIONS:
            out = net.stages[k].output_on(terms, region)
            ref = whole if region is None else whole[(Ellipsis, *region)]
            assert out.shape == ref.shape and _rel(out, ref) < 1e-5, (k, region)
        region = REGIONS[1]
        target = batch.targets[:, k]
        params = list(net.stages[k].parameters())
        g_ref = torch.autograd.grad(((whole[(Ellipsis, *region)] - target[(Ellipsis, *region)]) ** 2).mean(), params)
        out = net.stages[k].output_on(terms, region)
        g = torch.autograd.grad(((out - target[(Ellipsis, *region)]) ** 2).mean(), params)
        for a, b in zip(g, g_ref):
            assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("beta_units", ["normalised", "absolute"])
def test_output_on_regions_of_a_3d_volume_float64(beta_units):
    """Random 3D terms, float64: every region (edges, corners, one voxel, the whole) equals the whole
    output there to rounding, with and without blocks."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    stage = FBSEMStage(ResidualCNN(dims=3, channels=4, layers=3), beta_init=0.7, beta_units=beta_units).double()
    perturb(stage, scale=0.2)
    shape = (2, 6, 9, 10)
    sens = torch.rand(shape, generator=gen, dtype=torch.float64)
    sens[:, :, :2] = 0  # voxels outside the FOV
    terms = StageTerms(x=torch.rand(shape, generator=gen, dtype=torch.float64),
                       x_em=torch.rand(shape, generator=gen, dtype=torch.float64), sensitivity=sens,
                       scale=torch.tensor([0.4, 1.3], dtype=torch.float64),
                       unit=torch.tensor([2.0, 0.5], dtype=torch.float64))
    whole = stage.output_on(terms)
    regions = [(slice(0, 3), slice(0, 4), slice(0, 5)), (slice(2, 6), slice(5, 9), slice(3, 10)),
               (slice(3, 4), slice(4, 5), slice(9, 10)), (slice(0, 6), slice(0, 9), slice(0, 10))]
    for block in (None, (2, 3, 4)):
        stage.regulariser.block_shape = block
        for region in regions:
            assert _rel(stage.output_on(terms, region), whole[(Ellipsis, *region)]) < 1e-12, (block, region)
    for bad in [(slice(0, 7), slice(0, 9), slice(0, 10)), (slice(2, 2), slice(0, 9), slice(0, 10)),
                (slice(None), slice(0, 9), slice(0, 10))]:
        with pytest.raises(ValueError, match="region"):
            stage.output_on(terms, bad)
    assert terms.fov_box() == (slice(0, 6), slice(2, 9), slice(0, 10))


def test_patches_are_reproducible_inside_the_image_and_centred_in_the_fov_box():
    box = (slice(2, 5), slice(10, 20), slice(0, 40))
    a = draw_patches(box, (8, 32, 40), (4, 50, 8), 64, seed=1, stage=2, epoch=3, sample=7)
    assert a == draw_patches(box, (8, 32, 40), (4, 50, 8), 64, seed=1, stage=2, epoch=3, sample=7)
    assert a != draw_patches(box, (8, 32, 40), (4, 50, 8), 64, seed=1, stage=2, epoch=4, sample=7)
    assert a != draw_patches(box, (8, 32, 40), (4, 50, 8), 64, seed=1, stage=2, epoch=3, sample=6)
    for region in a:
        assert [s.stop - s.start for s in region] == [4, 32, 8]  # the y size cut to the image's 32
        assert all(0 <= s.start and s.stop <= n for s, n in zip(region, (8, 32, 40)))
        centre_z = region[0].start + 2
        assert 2 <= centre_z <= 5 or region[0].start in (0, 4)  # centred in the box unless pushed inside


def test_stage_terms_payload_holds_only_its_own_elements(problem, tmp_path):
    """The target is one of K and the sensitivity one of the subsets': the payload (written per sample and stage,
    read at every step) must not carry the whole tensors they are views of."""
    base, samples = problem
    net = small_net(num_stages=2, num_subsets=2)
    batch = Batch.collate(samples[:1], "cpu")
    model = with_terms_factory(base)(batch)
    kw = _net_inputs(net, batch)
    with torch.no_grad():
        terms = net.stage_terms(1, _initial(batch, model), batch.prompts, model, kw["sensitivities"], None)
    payload = terms_payload(terms, batch.targets[:, 1], sample_scales(batch.targets)[0])
    own = 0
    for name, t in payload.items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        own += t.numel() * t.element_size()
    torch.testing.assert_close(payload["target"], batch.targets[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(payload["sensitivity"][0], batch.sensitivity[0, 1], rtol=0, atol=0)
    torch.save(payload, tmp_path / "terms.pt")
    assert (tmp_path / "terms.pt").stat().st_size < own + 64 * 1024


def test_patch_training_step_averages_the_patch_losses():
    torch.manual_seed(0)
    stage = FBSEMStage(ResidualCNN(dims=2, channels=4, layers=2), beta_init=0.5)
    perturb(stage)
    gen = torch.Generator().manual_seed(0)
    terms = StageTerms(*(torch.rand(1, 2, 8, 8, generator=gen) for _ in range(3)), scale=torch.ones(1),
                       unit=torch.ones(1))
    target = torch.rand(1, 2, 8, 8, generator=gen)
    regions = [(slice(0, 1), slice(0, 4), slice(0, 4)), (slice(1, 2), slice(4, 8), slice(2, 6))]
    loss = patch_training_step(stage, [(terms, target, regions)])
    grads = [p.grad.clone() for p in stage.parameters()]
    stage.zero_grad()
    ref = sum(((stage.output_on(terms, r) - target[(Ellipsis, *r)]) ** 2).mean() for r in regions) / 2
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-6)
    for g, p in zip(grads, stage.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="at least one patch"):
        patch_training_step(stage, [(terms, target, [])])


def test_patch_training_lowers_every_stages_validation_loss(problem, tmp_path):
    base, samples = problem
    seen = []

    def watch(event):
        if event.kind == "step":
            seen.append((tmp_path / "cache" / f"stage_{event.stage:03d}" / "patch_terms" / "complete.json").is_file())

    result = train(small_net(num_stages=2, num_subsets=2), samples, "sequential", _config(), with_terms_factory(base),
                   tmp_path, callbacks=[watch])
    assert result.completed and seen and all(seen)
    for k in range(2):
        rows = [r for r in result.history if r["stage"] == k]
        assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
        assert min(r["val_loss"] for r in rows[1:]) < rows[0]["val_loss"], rows
    assert not (tmp_path / "cache").exists()  # removed after a completed run, patch terms included
    logged = json.loads((tmp_path / "losses.json").read_text())["config"]
    assert logged["patch_shape"] == [1, 12, 12] and logged["patches_per_sample"] == 3


class _CountingSamples(list):
    """The samples, counting the reads of each (what a dataset on disk pays per read)."""

    def __init__(self, samples):
        super().__init__(samples)
        self.reads = [0] * len(samples)

    def __getitem__(self, i):
        self.reads[i] += 1
        return super().__getitem__(i)


@pytest.mark.parametrize("cache,loss", [("disk", "scaled_mse"), ("memory", "mse")])
def test_patch_training_reads_each_sample_once_per_stage_and_validates_on_whole_volumes(problem, tmp_path, cache,
                                                                                         loss):
    """With patches, a stage reads and projects every sample once (its terms; the validation losses and the
    next stage's inputs come from them), and the validation loss is still the whole-volume stage loss: the
    kept weights of each stage (its best epoch) give, through the network's own forward pass from the start
    image, the lowest validation loss the run logged for that stage."""
    base, samples = problem
    data = _CountingSamples(samples)
    factory = with_terms_factory(base)
    result = train(small_net(num_stages=2, num_subsets=2), data, "sequential", _config(cache=cache, loss=loss),
                   factory, tmp_path)
    assert result.completed and result.val_indices
    assert data.reads == [2] * len(samples)  # 2 stages
    val = Batch.collate([samples[i] for i in result.val_indices], "cpu")
    model = factory(val)
    with torch.no_grad():
        outs = result.net(_initial(val, model), val.prompts, model, return_all=True, **_net_inputs(result.net, val))
    scales = sample_scales(val.targets) if loss == "scaled_mse" else None
    for k in range(2):
        best = min((r for r in result.history if r["stage"] == k), key=lambda r: r["val_loss"])
        assert best["val_loss"] == pytest.approx(float(stage_loss(outs[k], val.targets[:, k], scales)), rel=1e-5)
        # and each validation sample's logged loss is its own stage loss
        per = best["val_loss_per_sample"]
        assert sorted(per) == sorted(str(i) for i in result.val_indices)
        for j, i in enumerate(result.val_indices):
            own = stage_loss(outs[k][j : j + 1], val.targets[j : j + 1, k], None if scales is None else scales[j : j + 1])
            assert per[str(i)] == pytest.approx(float(own), rel=1e-5)
        assert best["val_loss"] == pytest.approx(sum(per.values()) / len(per), rel=1e-12)


class _Interrupt(RuntimeError):
    pass


def _reference_and_crashed_run(problem, tmp_path, cfg, crash_at_step):
    """A completed reference run in tmp_path/ref, and the same run in tmp_path/run stopped by a crash at the
    step ``crash_at_step`` (counted over the run); returns (reference result, samples, model factory)."""
    base, samples = problem
    factory = with_terms_factory(base)
    reference = train(small_net(num_stages=2, num_subsets=2), samples, "sequential", cfg, factory, tmp_path / "ref")

    def crash(event):
        if event.kind == "step" and event.step == crash_at_step:
            raise _Interrupt("simulated crash")

    with pytest.raises(_Interrupt):
        train(small_net(num_stages=2, num_subsets=2), samples, "sequential", cfg, factory, tmp_path / "run",
              callbacks=[crash])
    return reference, samples, factory


@pytest.mark.parametrize("cache,resume_blocks", [("disk", None), ("memory", None), ("disk", (1, 7, 9))])
def test_patch_training_resumed_after_interruption_ends_with_the_same_weights(problem, tmp_path, cache, resume_blocks):
    """Same weights bitwise; resumed with another block shape (allowed: it changes memory, not results),
    the same to rounding."""
    cfg = _config(epochs=2, cache=cache)
    reference, samples, factory = _reference_and_crashed_run(problem, tmp_path, cfg, 8)  # stage 2, epoch 1, step 2
    resumed = train(small_net(num_stages=2, num_subsets=2, seed=99), samples, "sequential",
                    _config(epochs=2, cache=cache, block_shape=resume_blocks), factory, tmp_path / "run", resume=True)
    assert resumed.completed
    ref, new = reference.net.state_dict(), resumed.net.state_dict()
    ref_val, new_val = [r["val_loss"] for r in reference.history], [r["val_loss"] for r in resumed.history]
    if resume_blocks is None:
        assert all(torch.equal(ref[key], new[key]) for key in ref) and new_val == ref_val
    else:
        assert all(torch.allclose(ref[key], new[key], rtol=1e-5, atol=1e-7) for key in ref)
        assert new_val == pytest.approx(ref_val, rel=1e-5)


def test_patch_training_resumes_a_run_whose_terms_lack_the_validation_samples(problem, tmp_path):
    """A run interrupted under sirf_fbsem <= 0.8.4 kept the terms of its training samples only (and marked them
    complete): resumed, the validation samples' terms are computed and the run ends with the same weights."""
    cfg = _config(epochs=2)
    reference, samples, factory = _reference_and_crashed_run(problem, tmp_path, cfg, 2)  # stage 1, epoch 1, step 2
    terms = tmp_path / "run" / "cache" / "stage_000" / "patch_terms"
    for i in reference.val_indices:
        (terms / f"sample_{i:06d}.pt").unlink()
    (terms / "complete.json").write_text(json.dumps({"stage": 0, "num_samples": len(reference.train_indices)}))
    resumed = train(small_net(num_stages=2, num_subsets=2), samples, "sequential", cfg, factory, tmp_path / "run",
                    resume=True)
    assert resumed.completed
    ref, new = reference.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(ref[key], new[key]) for key in ref)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in reference.history]


def test_patch_settings_are_in_the_run_signature_only_when_set(problem, tmp_path):
    base, samples = problem
    factory = with_terms_factory(base)

    def stop(event):
        if event.kind == "epoch":
            raise StopIteration

    plain = dict(epochs=2, lr=1e-2, batch_size=2, validation_fraction=0.25, progress=False)
    train(small_net(num_stages=1, num_subsets=2), samples[:4], "sequential", TrainConfig(**plain), factory,
          tmp_path / "plain", callbacks=[stop])
    initial = torch.load(tmp_path / "plain" / "checkpoints" / "initial.pt", weights_only=True)
    signature = json.loads(initial["run_signature"])["config"]
    assert not {"patch_shape", "patches_per_sample", "block_shape"} & set(signature)  # older runs still resume
    with pytest.raises(CheckpointMismatchError, match="patch_shape"):
        train(small_net(num_stages=1, num_subsets=2), samples[:4], "sequential",
              TrainConfig(**plain, patch_shape=(1, 8, 8)), factory, tmp_path / "plain", resume=True)
    resumed = train(small_net(num_stages=1, num_subsets=2), samples[:4], "sequential", TrainConfig(**plain),
                    factory, tmp_path / "plain", resume=True)
    assert resumed.completed
    train(small_net(num_stages=1, num_subsets=2), samples[:4], "sequential",
          TrainConfig(**plain, patch_shape=(1, 8, 8)), factory, tmp_path / "patches", callbacks=[stop])
    with pytest.raises(CheckpointMismatchError, match="patches_per_sample"):
        train(small_net(num_stages=1, num_subsets=2), samples[:4], "sequential",
              TrainConfig(**plain, patch_shape=(1, 8, 8), patches_per_sample=2), factory, tmp_path / "patches",
              resume=True)


def test_bad_patch_settings_are_refused(problem, tmp_path):
    for bad in [(1, 0, 8), (8, 8), (1.5, 8, 8)]:
        with pytest.raises(ValueError, match="TrainConfig.patch_shape"):
            TrainConfig(patch_shape=bad)
    for bad in [0, -1, 2.0, True]:
        with pytest.raises(ValueError, match="patches_per_sample"):
            TrainConfig(patch_shape=(1, 8, 8), patches_per_sample=bad)
    base, samples = problem
    for mode in ("end_to_end", "checkpointed", "greedy"):
        with pytest.raises(ValueError, match="sequential"):
            train(small_net(num_stages=2, num_subsets=2), samples[:4], mode, _config(), with_terms_factory(base),
                  tmp_path / mode)
        assert not (tmp_path / mode).exists()


def test_train_flags_for_patches_and_blocks(tmp_path, capsys):
    cases = [(["--mode", "end_to_end", "--patch-size", "1,8,8"], "--patch-size"),
             (["--mode", "greedy", "--patch-size", "8"], "--patch-size"),
             (["--patches-per-sample", "4"], "--patches-per-sample"),
             (["--patch-size", "1,0,8"], "--patch-size"), (["--patch-size", "1,8"], "--patch-size"),
             (["--block-size", "a,b,c"], "--block-size"), (["--patch-size", "8", "--patches-per-sample", "0"],
                                                          "--patches-per-sample")]
    for extra, flag in cases:
        try:
            rc = main(["train", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--no-progress",
                       *extra])
        except SystemExit as exit_:  # argparse's own usage errors
            rc = exit_.code
        err = capsys.readouterr().err
        assert rc == 2 and flag in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "run").exists()
    from sirf_fbsem.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--patch-size", "4,16,16",
                                      "--patches-per-sample", "5", "--block-size", "32"])
    assert (args.patch_size, args.patches_per_sample, args.block_size) == ((4, 16, 16), 5, (32, 32, 32))


def test_train_command_trains_on_patches_in_blocks(tmp_path):
    """``sirf-fbsem train --patch-size --patches-per-sample --block-size`` end to end on a tiny 2D data set."""
    data = tmp_path / "data"
    assert main(["simulate", "--out", str(data), "--num-samples", "3", "--2d", "--counts", "1e4", "--num-stages", "2",
                 "--num-subsets", "2", "--no-progress"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--stages", "2", "--channels", "4", "--layers", "2",
                 "--dims", "2", "--epochs", "1", "--no-progress", "--patch-size", "1,8,8", "--patches-per-sample",
                 "2", "--block-size", "1,16,16"]) == 0
    config = json.loads((out / "losses.json").read_text())["config"]
    assert (config["patch_shape"], config["patches_per_sample"], config["block_shape"]) == ([1, 8, 8], 2, [1, 16, 16])
    assert (out / "model.pt").is_file()
    # the model records the phantoms it saw (all 3, training and validation), for evaluate's set check
    meta = json.loads((out / "model.json").read_text())
    assert meta["training_data"] == {"seed": 0, "indices": [0, 1, 2], "counts": 1e4}


def test_two_ranks_train_on_patches_as_one_process(tmp_path):
    """torchrun, 2 CPU ranks: the patch steps do not run through DistributedDataParallel's forward, so the
    trainer averages the stage's gradients itself; the result is that of one process (global batches of 3:
    shares of 2 and 1, then 1 and 0)."""
    from dist_patch_worker import NUM_STAGES, NUM_SUBSETS, PATCH_CONFIG
    from torchrun_jobs import tail as _tail, torchrun as _torchrun

    base, samples = tiny_samples(num_samples=5, num_subsets=NUM_SUBSETS, num_targets=NUM_STAGES, seed=1)
    torch.save([s.to_dict() for s in samples], tmp_path / "samples.pt")
    rc = _torchrun([str(Path(__file__).resolve().parents[1] / "dist_patch_worker.py"), "--samples",
                    str(tmp_path / "samples.pt"), "--out", str(tmp_path / "out")], tmp_path / "job.log")
    assert rc == 0, _tail(tmp_path / "job.log")
    init = small_net(num_stages=NUM_STAGES, num_subsets=NUM_SUBSETS).state_dict()
    single = train(small_net(num_stages=NUM_STAGES, num_subsets=NUM_SUBSETS), samples, "sequential",
                   TrainConfig(**PATCH_CONFIG), with_terms_factory(base), tmp_path / "single").net.state_dict()
    assert max(float((single[k] - init[k]).abs().max()) for k in single) > 1e-3
    for cache in ("disk", "memory"):
        ddp = torch.load(tmp_path / "out" / cache / "final.pt", weights_only=True)
        for k in single:
            torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-6, msg=f"{cache}: {k}")
