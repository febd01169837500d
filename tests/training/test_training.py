"""Training modes on a tiny 2D problem: sequential, end-to-end, checkpointed, greedy; resume; files."""
from __future__ import annotations

import json

import pytest
import torch

from sirf_fbsem.model import ModelFileError, load_model
from sirf_fbsem.samples import Batch
from sirf_fbsem.training import (
    CheckpointMismatchError,
    TrainConfig,
    evaluate,
    make_optimizer,
    split_indices,
    train,
    training_step,
    with_terms_factory,
)
from tiny_problems import perturb, small_net, tiny2d_geometry, tiny_samples


@pytest.fixture(scope="module")
def problem():
    """10 samples, 4 subsets, targets for 4 stages (one OSEM iteration); ~2e4 counts each."""
    return tiny_samples(num_samples=10, num_subsets=4, num_targets=4, counts=2e4, seed=0)


def _config(**kw) -> TrainConfig:
    base = dict(epochs=5, lr=1e-2, batch_size=2, validation_fraction=0.2, seed=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _params(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_sequential_training_beats_em_only_and_every_stage_improves(problem, tmp_path):
    base, samples = problem
    factory = with_terms_factory(base)
    net = small_net(num_stages=4, num_subsets=4)
    sino, image = tiny2d_geometry()
    result = train(net, samples, "sequential", _config(), factory, tmp_path,
                   metadata={"sinogram_geometry": sino, "image_geometry": image})
    assert result.completed
    em_only = small_net(num_stages=4, num_subsets=4, beta_init=0.0)
    em_loss = evaluate(em_only, samples, result.val_indices, factory)
    fbsem_loss = evaluate(result.net, samples, result.val_indices, factory)
    assert fbsem_loss[-1] < 0.95 * em_loss[-1], (fbsem_loss, em_loss)
    for k in range(4):
        rows = [r for r in result.history if r["stage"] == k]
        assert [r["epoch"] for r in rows] == list(range(6))
        # the stage's validation loss falls below that of the untrained stage (epoch 0)
        first, best = rows[0]["val_loss"], min(r["val_loss"] for r in rows[1:])
        assert best < first, (k, rows)
    # each validation sample's logged loss at the kept (best) epoch is that sample's loss through the trained net
    kept = min((r for r in result.history if r["stage"] == 3), key=lambda r: r["val_loss"])
    per = kept["val_loss_per_sample"]
    assert sorted(per) == sorted(str(i) for i in result.val_indices) and len(per) >= 2
    for i in result.val_indices:
        assert per[str(i)] == pytest.approx(evaluate(result.net, samples, [i], factory, loss="scaled_mse")[3], rel=1e-5)
    assert kept["val_loss"] == pytest.approx(sum(per.values()) / len(per), rel=1e-12)
    # only stage k moves while stage k trains: the betas of later stages keep their initial value
    stage0_rows = [r for r in result.history if r["stage"] == 0]
    assert all(b == pytest.approx(0.1) for b in stage0_rows[-1]["beta"][1:])
    # files: logs, plot, model; the disk cache is removed after a completed run
    assert (tmp_path / "losses.csv").read_text().startswith("mode,stage,epoch,train_loss,val_loss")
    assert len(json.loads((tmp_path / "losses.json").read_text())["history"]) == 24
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert not (tmp_path / "cache").exists()
    loaded, meta = load_model(result.model_path, expected_sinogram_geometry=sino)
    assert meta["training_mode"] == "sequential" and meta["train_config"]["epochs"] == 5
    assert evaluate(loaded, samples, result.val_indices, factory) == pytest.approx(fbsem_loss, rel=1e-6)


def test_sequential_warm_start_begins_each_stage_where_the_previous_ended(problem, tmp_path):
    """With warm_start, stage k starts as stage k-1's trained network: with a learning rate too small
    to move the weights, every stage ends equal to stage 0; without warm_start none does."""
    base, samples = problem
    factory = with_terms_factory(base)
    still = {}
    for warm in (True, False):
        net = small_net(num_stages=3, num_subsets=4)
        result = train(net, samples, "sequential", _config(epochs=1, lr=1e-12, warm_start=warm), factory,
                       tmp_path / str(warm))
        assert result.completed
        s0 = result.net.stages[0].state_dict()
        still[warm] = all(
            torch.allclose(result.net.stages[k].state_dict()[name], s0[name], atol=1e-9)
            for k in (1, 2) for name in s0)
    assert still[True] and not still[False]
    with pytest.raises(ValueError, match="warm_start"):
        TrainConfig(warm_start="yes")


class _Interrupt(RuntimeError):
    pass


def _interrupt_at(step: int):
    def callback(event):
        if event.kind == "step" and event.step == step:
            raise _Interrupt(f"simulated crash at step {step}")

    return callback


@pytest.mark.parametrize(
    "mode,cache,crash_step",
    [("sequential", "disk", 8), ("sequential", "memory", 8), ("greedy", "disk", 5)],
)
def test_resume_after_interruption_gives_the_same_weights(problem, tmp_path, mode, cache, crash_step):
    base, samples = problem
    samples = samples[:6]  # 5 training samples -> 3 steps per epoch
    factory = with_terms_factory(base)
    cfg = _config(epochs=2, cache=cache)
    reference = train(small_net(num_stages=3), samples, mode, cfg, factory, tmp_path / "ref")
    # interrupt in the middle of an epoch (sequential: stage 2, epoch 1, step 2 of 3; greedy: epoch 2, step 2)
    with pytest.raises(_Interrupt):
        train(small_net(num_stages=3), samples, mode, cfg, factory, tmp_path / "run",
              callbacks=[_interrupt_at(crash_step)])
    with pytest.raises(FileExistsError, match="resume"):
        train(small_net(num_stages=3), samples, mode, cfg, factory, tmp_path / "run")
    # a fresh network initialised differently: everything comes from the checkpoints
    resumed = train(small_net(num_stages=3, seed=99), samples, mode, cfg, factory, tmp_path / "run", resume=True)
    assert resumed.completed
    ref_params, new_params = _params(reference.net), _params(resumed.net)
    assert ref_params.keys() == new_params.keys()
    for k in ref_params:
        assert torch.equal(ref_params[k], new_params[k]), k
    untimed = [[{k: v for k, v in r.items() if k != "elapsed_s"} for r in h] for h in (resumed.history, reference.history)]
    assert untimed[0] == untimed[1]


def test_a_finished_stages_checkpoint_holds_its_weights_and_its_own_loss_rows(problem, tmp_path):
    """Sequential checkpoints do not grow with the stage number: a finished stage's file keeps its
    weights and bookkeeping, not the optimiser's moments, the early-stopping copy or the earlier
    stages' loss rows; resuming the finished run rebuilds the whole history from them."""
    from sirf_fbsem.model.io import safe_torch_load

    base, samples = problem
    factory = with_terms_factory(base)
    result = train(small_net(num_stages=3), samples[:6], "sequential", _config(epochs=2), factory, tmp_path)
    assert result.completed
    rows_before = 0
    for k in range(3):
        ck = safe_torch_load(tmp_path / "checkpoints" / f"stage_{k:03d}.pt", "stage checkpoint")
        assert ck["train_state"]["complete"] and ck["train_state"]["best_state"] is None
        assert ck["optimizer"]["state"] == {} and ck["optimizer"]["param_groups"]
        assert ck["history_start"] == rows_before and {r["stage"] for r in ck["history"]} == {k}
        assert len(ck["history"]) == 3  # the untrained stage (epoch 0) and 2 epochs
        rows_before += len(ck["history"])
        for name, w in result.net.stages[k].state_dict().items():
            assert torch.equal(ck["stage_state"][name], w), (k, name)
    again = train(small_net(num_stages=3, seed=99), samples[:6], "sequential", _config(epochs=2), factory, tmp_path,
                  resume=True)
    assert again.history == result.history


def test_a_run_begun_before_0_8_6_resumes(problem, tmp_path):
    """Checkpoints written before 0.8.6 hold the whole history up to their stage and no
    ``history_start``; a run interrupted then goes on with this version to the same weights and history."""
    from sirf_fbsem.io.atomic import atomic_path
    from sirf_fbsem.model.io import safe_torch_load

    base, samples = problem
    factory = with_terms_factory(base)
    cfg = _config(epochs=2)
    reference = train(small_net(num_stages=3), samples[:6], "sequential", cfg, factory, tmp_path / "ref")
    with pytest.raises(_Interrupt):
        train(small_net(num_stages=3), samples[:6], "sequential", cfg, factory, tmp_path / "run",
              callbacks=[_interrupt_at(14)])  # stage 3, epoch 1, step 2 of 3: stages 1 and 2 finished
    rows: list = []
    for k in range(2):
        path = tmp_path / "run" / "checkpoints" / f"stage_{k:03d}.pt"
        ck = safe_torch_load(path, "stage checkpoint")
        rows += ck.pop("history")
        del ck["history_start"]
        with atomic_path(path) as tmp:
            torch.save({**ck, "history": list(rows)}, tmp)
    resumed = train(small_net(num_stages=3, seed=99), samples[:6], "sequential", cfg, factory, tmp_path / "run",
                    resume=True)
    for name, w in _params(reference.net).items():
        assert torch.equal(_params(resumed.net)[name], w), name
    untimed = [[{k: v for k, v in r.items() if k != "elapsed_s"} for r in h] for h in (resumed.history, reference.history)]
    assert untimed[0] == untimed[1]


def test_a_run_carried_without_its_initial_weights_resumes_from_the_same_seeded_network(problem, tmp_path):
    """initial.pt is derivable (the command line seeds the network before building it), so a run
    carried without it resumes, given the network built from the same seed, to the same weights."""
    base, samples = problem
    factory = with_terms_factory(base)
    cfg = _config(epochs=2, warm_start=False)  # untrained stages start from their initial weights
    reference = train(small_net(num_stages=3), samples[:6], "sequential", cfg, factory, tmp_path / "ref")
    with pytest.raises(_Interrupt):
        train(small_net(num_stages=3), samples[:6], "sequential", cfg, factory, tmp_path / "run",
              callbacks=[_interrupt_at(8)])
    (tmp_path / "run" / "checkpoints" / "initial.pt").unlink()
    resumed = train(small_net(num_stages=3), samples[:6], "sequential", cfg, factory, tmp_path / "run", resume=True)
    for name, w in _params(reference.net).items():
        assert torch.equal(_params(resumed.net)[name], w), name


def test_resume_with_other_settings_is_refused(problem, tmp_path):
    base, samples = problem
    factory = with_terms_factory(base)
    cfg = _config(epochs=1)
    train(small_net(num_stages=2), samples[:4], "end_to_end", cfg, factory, tmp_path, callbacks=[_stop_after_epoch])
    with pytest.raises(CheckpointMismatchError, match="lr: 0.01 vs 0.001"):
        train(small_net(num_stages=2), samples[:4], "end_to_end", _config(epochs=1, lr=1e-3), factory, tmp_path,
              resume=True)


def test_a_run_begun_with_count_unaware_betas_resumes_as_such_and_says_how(problem, tmp_path):
    """Runs begun before 0.9 have count-unaware betas and signatures without the count keys: a network
    built with ``beta_counts="none"`` resumes them to the same weights; the new default is refused with
    the flag that resumes them."""
    base, samples = problem
    factory = with_terms_factory(base)
    cfg = _config(epochs=2)
    reference = train(small_net(num_stages=3, beta_counts="none"), samples[:6], "sequential", cfg, factory,
                      tmp_path / "ref")
    with pytest.raises(_Interrupt):
        train(small_net(num_stages=3, beta_counts="none"), samples[:6], "sequential", cfg, factory, tmp_path / "run",
              callbacks=[_interrupt_at(8)])
    sig = json.loads(torch.load(tmp_path / "run" / "checkpoints" / "initial.pt", weights_only=True)["run_signature"])
    assert "beta_counts" not in sig["network"]  # as 0.8 wrote them
    with pytest.raises(CheckpointMismatchError, match=r"network\.beta_counts: None vs 'log_linear'.*--beta-counts none"):
        train(small_net(num_stages=3), samples[:6], "sequential", cfg, factory, tmp_path / "run", resume=True)
    resumed = train(small_net(num_stages=3, beta_counts="none"), samples[:6], "sequential", cfg, factory,
                    tmp_path / "run", resume=True)
    for name, w in _params(reference.net).items():
        assert torch.equal(_params(resumed.net)[name], w), name


def test_warm_start_is_part_of_a_sequential_run_only(problem, tmp_path):
    """warm_start (default True) changes what a sequential run computes, so resuming one with the
    other value is refused; the other modes ignore it, so it never stands in their way."""
    base, samples = problem
    factory = with_terms_factory(base)
    assert TrainConfig().warm_start is True
    for mode in ("sequential", "end_to_end"):
        train(small_net(num_stages=2), samples[:4], mode, _config(epochs=2, warm_start=False), factory,
              tmp_path / mode, callbacks=[_stop_after_epoch])
    with pytest.raises(CheckpointMismatchError, match="warm_start: False vs True"):
        train(small_net(num_stages=2), samples[:4], "sequential", _config(epochs=2), factory,
              tmp_path / "sequential", resume=True)
    resumed = train(small_net(num_stages=2), samples[:4], "end_to_end", _config(epochs=2), factory,
                    tmp_path / "end_to_end", resume=True)
    assert resumed.completed and [r["epoch"] for r in resumed.history] == [0, 1, 2]


def _stop_after_epoch(event):
    if event.kind == "epoch":
        raise StopIteration


def test_callback_stop_iteration_ends_the_run_cleanly(problem, tmp_path):
    base, samples = problem
    result = train(small_net(num_stages=2), samples[:4], "greedy", _config(epochs=3),
                   with_terms_factory(base), tmp_path, callbacks=[_stop_after_epoch])
    assert not result.completed and result.model_path is None
    assert [r["epoch"] for r in result.history] == [0, 1]
    assert (tmp_path / "checkpoints" / "checkpoint.pt").is_file()


def test_checkpoint_with_pickled_payload_is_refused(problem, tmp_path):
    base, samples = problem
    factory = with_terms_factory(base)
    train(small_net(num_stages=2), samples[:4], "greedy", _config(epochs=1), factory, tmp_path,
          callbacks=[_stop_after_epoch])
    path = tmp_path / "checkpoints" / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    payload["extra"] = _Evil()
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="pickled Python objects"):
        train(small_net(num_stages=2), samples[:4], "greedy", _config(epochs=1), factory, tmp_path, resume=True)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_end_to_end_and_checkpointed_give_identical_gradients(problem):
    base, samples = problem
    batch = Batch.collate(samples[:2])
    model = with_terms_factory(base)(batch)
    grads = {}
    for mode in ("end_to_end", "checkpointed"):
        for all_stages in (False, True):
            net = small_net(num_stages=4, beta_init=0.5)
            perturb(net)
            loss = training_step(net, mode, batch, model, _config(all_stages_loss=all_stages))
            grads[mode, all_stages] = (loss, {n: p.grad.clone() for n, p in net.named_parameters()})
    for all_stages in (False, True):
        (l1, g1), (l2, g2) = grads["end_to_end", all_stages], grads["checkpointed", all_stages]
        assert l1 == l2
        assert all(torch.isfinite(g).all() for g in g1.values())
        assert any(float(g.abs().max()) > 0 for n, g in g1.items() if "stages.0." in n)  # reaches stage 1
        for n in g1:
            assert torch.equal(g1[n], g2[n]), n


def test_greedy_training_lowers_the_loss(problem, tmp_path):
    base, samples = problem
    factory = with_terms_factory(base)
    result = train(small_net(num_stages=4), samples, "greedy", _config(epochs=4), factory, tmp_path)
    val = [r["val_loss"] for r in result.history]
    train_loss = [r["train_loss"] for r in result.history[1:]]
    assert min(val[1:]) < val[0] and train_loss[-1] < train_loss[0], result.history
    # every stage is updated in every step
    assert all(abs(b - 0.1) > 1e-4 for b in result.history[-1]["beta"])


def test_end_to_end_training_runs_and_lowers_the_loss(problem, tmp_path):
    base, samples = problem
    result = train(small_net(num_stages=2), samples[:6], "checkpointed", _config(epochs=3, all_stages_loss=True),
                   with_terms_factory(base), tmp_path)
    val = [r["val_loss"] for r in result.history]
    assert min(val[1:]) < val[0], result.history


def test_train_config_and_split_are_validated():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        TrainConfig(validation_fraction=1.0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l1")
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="abacus")
    tr, va = split_indices(10, 0.2, seed=3)
    assert len(va) == 2 and sorted(tr + va) == list(range(10))
    assert split_indices(10, 0.2, seed=3) == (tr, va)
    assert split_indices(1, 0.5, seed=0) == ([0], [])


@pytest.mark.parametrize("shared", [False, True])
def test_make_optimizer_puts_the_betas_in_their_own_group(shared):
    """Every parameter is optimised exactly once; the stages' rho (and count slopes) at beta_lr, the rest at lr."""
    from sirf_fbsem.model import FBSEMNet, RegulariserConfig

    net = FBSEMNet(3, 4, RegulariserConfig(dims=2, channels=4, layers=2), shared_regulariser=shared)
    opt = make_optimizer(net, TrainConfig(lr=1e-3, beta_lr=0.05))
    groups = {g["lr"]: g["params"] for g in opt.param_groups}
    assert sorted(groups) == [1e-3, 0.05]
    assert {id(p) for p in groups[0.05]} == {id(st.rho) for st in net.stages} | {id(st.count_slope) for st in net.stages}
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted({id(p) for p in net.parameters()})
    single = make_optimizer(net.stages[1], TrainConfig(lr=1e-3, beta_lr=0.05))
    assert [p is net.stages[1].rho for p in single.param_groups[1]["params"]] == [True, False]
    assert single.param_groups[1]["params"][1] is net.stages[1].count_slope
    unaware = FBSEMNet(2, 4, RegulariserConfig(dims=2, channels=4, layers=2), beta_counts="none")
    assert {id(p) for p in make_optimizer(unaware, TrainConfig(lr=1e-3, beta_lr=0.05)).param_groups[1]["params"]} \
        == {id(st.rho) for st in unaware.stages}
    assert len(make_optimizer(net, TrainConfig(lr=1e-3)).param_groups) == 1  # beta_lr None: one group at lr
    for bad in (0.0, -1.0, float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="beta_lr"):
            TrainConfig(beta_lr=bad)


def test_beta_lr_moves_the_betas_faster_and_is_part_of_the_run(problem, tmp_path):
    """Same run but beta_lr 20x lr: the betas travel further from their start (count-unaware betas: a
    count-aware beta's rho and slope are not separable on data of one count level); resuming a run with
    another beta_lr is refused (the checkpoints were made with other settings). The count slopes of a
    count-aware network are trained and logged."""
    base, samples = problem
    factory = with_terms_factory(base)
    moved = {}
    for beta_lr in (None, 0.2):
        net = small_net(num_stages=2, num_subsets=4, beta_counts="none")
        result = train(net, samples, "sequential", _config(epochs=2, lr=1e-2, beta_lr=beta_lr), factory,
                       tmp_path / str(beta_lr))
        assert result.completed
        moved[beta_lr] = float((result.net.betas.detach() - 0.1).abs().max())
    assert moved[0.2] > 3 * moved[None] > 0, moved
    result = train(small_net(num_stages=2, num_subsets=4), samples, "sequential", _config(epochs=2, lr=1e-2),
                   factory, tmp_path / "aware")
    slopes = result.net.count_slopes.detach()
    assert bool((slopes != 0).all())
    logged = json.loads((tmp_path / "aware" / "losses.json").read_text())["history"][-1]
    assert logged["beta_count_slope"] == pytest.approx(slopes.tolist())
    with pytest.raises(CheckpointMismatchError, match="beta_lr"):
        train(small_net(num_stages=2, num_subsets=4, beta_counts="none"), samples, "sequential",
              _config(epochs=3, beta_lr=0.1), factory, tmp_path / "0.2", resume=True)


def test_sequential_refuses_a_shared_regulariser(problem, tmp_path):
    from sirf_fbsem.model import FBSEMNet, RegulariserConfig

    base, samples = problem
    net = FBSEMNet(2, 4, RegulariserConfig(dims=2, channels=4, layers=2), shared_regulariser=True)
    with pytest.raises(ValueError, match="shared regulariser"):
        train(net, samples, "sequential", _config(), with_terms_factory(base), tmp_path)


def test_train_cli_flags_map_onto_the_config():
    import argparse

    from sirf_fbsem.training.cli import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--data", "d", "--out", "o", "--mode", "greedy", "--stages", "6", "--shared",
                              "--epochs", "3", "--lr", "0.002", "--batch-size", "2", "--device", "cpu", "--resume",
                              "--dims", "2", "--anatomical", "--beta-lr", "0.05"])
    assert args.beta_lr == 0.05
    assert (args.mode, args.stages, args.shared, args.epochs, args.lr, args.batch_size) == ("greedy", 6, True, 3, 0.002, 2)
    assert (args.resume, args.dims, args.anatomical, list(map(str, args.data)), str(args.out)) == (
        True, 2, True, ["d"], "o")
    # sequential stages warm-start by default (unset flag: TrainConfig's default); --no-warm-start turns it off
    assert args.warm_start is None and TrainConfig().warm_start is True
    assert parser.parse_args(["--data", "d", "--out", "o", "--no-warm-start"]).warm_start is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "d", "--out", "o", "--mode", "fastest"])


def test_every_mode_has_one_strategy():
    from sirf_fbsem.training.trainers import MODES, training_mode

    rules = {m: training_mode(m) for m in MODES}
    assert [r.name for r in rules.values()] == list(MODES)
    assert [m for m, r in rules.items() if r.stage_by_stage] == ["sequential"]
    assert [m for m, r in rules.items() if r.places_stages] == ["greedy"]
    with pytest.raises(ValueError, match="mode must be one of"):
        training_mode("fastest")
