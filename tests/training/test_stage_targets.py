"""What each stage is trained against (TargetRule, StageTargets) and the train flags that choose it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sirf_fbsem.cli import main
from sirf_fbsem.model import FBSEMNet, RegulariserConfig
from sirf_fbsem.training import TrainConfig, evaluate, train, with_terms_factory
from sirf_fbsem.training.stage_targets import StageTargets, TargetRule
from tiny_problems import tiny_samples


@pytest.fixture(scope="module")
def problem():
    return tiny_samples(num_samples=2, num_subsets=2, num_targets=6, seed=8)


def test_rules_pick_the_sub_iterates_or_the_truth(problem):
    _, samples = problem
    s = samples[0]
    osem = TargetRule("osem", stride=3).apply(s, 2)
    assert torch.equal(osem.targets, s.targets[[2, 5]]) and TargetRule("osem", 3).subiterates(2) == [3, 6]
    assert torch.equal(TargetRule().apply(s, 4).targets, s.targets[:4])
    truth = TargetRule("truth").apply(s, 3)
    assert truth.targets.shape == (3,) + s.phantom.shape and all(torch.equal(t, s.phantom) for t in truth.targets)
    scaled = TargetRule("osem", 2, units="phantom_mean").apply(s, 3)
    c = float(s.phantom[s.phantom > 0].mean())
    assert float(scaled.phantom[scaled.phantom > 0].mean()) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(scaled.targets * c, s.targets[[1, 3, 5]])
    assert torch.equal(scaled.prompts, s.prompts)


def test_bad_rules_and_too_few_targets_are_refused(problem):
    _, samples = problem
    with pytest.raises(ValueError, match="stride"):
        TargetRule("truth", stride=2)
    with pytest.raises(ValueError, match="targets must be one of"):
        TargetRule("noisy")
    with pytest.raises(ValueError, match=r"sample 1 has 6 targets .* 4 stages with stride 2 need 8"):
        StageTargets(samples, TargetRule("osem", 2), 4)[1]
    with pytest.raises(ValueError, match="no phantom"):
        TargetRule("truth").apply(samples[0].replace(phantom=None), 2)


def test_training_on_a_view_trains_against_its_targets(problem, tmp_path):
    """The validation loss the trainer logs is the loss against the view's targets, not the raw ones."""
    base, samples = problem
    rule = TargetRule("osem", stride=3)
    view = StageTargets(samples, rule, 2)
    torch.manual_seed(0)
    net = FBSEMNet(2, 2, RegulariserConfig(dims=2, channels=4, layers=2))
    cfg = TrainConfig(epochs=1, validation_fraction=0.5, progress=False, seed=0)
    result = train(net, view, "sequential", cfg, with_terms_factory(base), tmp_path / "run",
                   data_signature=rule.as_dict(2))
    logged = [r["val_loss"] for r in result.history if r["val_loss"] is not None]
    factory = with_terms_factory(base)
    want = evaluate(result.net, view, result.val_indices, factory, loss=cfg.loss)
    raw = evaluate(result.net, samples, result.val_indices, factory, loss=cfg.loss)
    assert logged[-1] == pytest.approx(want[-1], rel=1e-5) and abs(raw[-1] - want[-1]) > 1e-3 * want[-1]
    # the same run with other targets does not resume from these checkpoints
    with pytest.raises(Exception, match="target_stride"):
        train(FBSEMNet(2, 2, RegulariserConfig(dims=2, channels=4, layers=2)), StageTargets(samples, TargetRule(), 2),
              "sequential", cfg, factory, tmp_path / "run", resume=True, data_signature=TargetRule("osem", 2).as_dict(2))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "d"
    assert main(["simulate", "--out", str(folder), "--num-samples", "2", "--2d", "--counts", "1e4",
                 "--num-stages", "4", "--num-subsets", "2", "--no-progress"]) == 0
    return folder


TRAIN = ["--channels", "4", "--layers", "2", "--dims", "2", "--epochs", "1", "--no-progress"]


def test_train_flags_record_the_targets_in_the_model(dataset, tmp_path, capsys):
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "s"), "--target-stride", "2", *TRAIN]) == 0
    meta = json.loads((tmp_path / "s" / "model.json").read_text())
    assert meta["network"]["num_stages"] == 2  # 4 simulated sub-iterates / stride 2
    assert (meta["targets"], meta["target_stride"], meta["target_subiterates"]) == ("osem", 2, [2, 4])
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "t"), "--targets", "truth",
                 "--image-units", "phantom_mean", "--stages", "3", *TRAIN]) == 0
    meta = json.loads((tmp_path / "t" / "model.json").read_text())
    assert (meta["targets"], meta["image_units"], meta["target_subiterates"]) == ("truth", "phantom_mean", None)
    capsys.readouterr()
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "u"), "--target-stride", "2",
                 "--stages", "3", *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "4 noise-free OSEM sub-iterates" in err and "need 6" in err and not (tmp_path / "u").exists()
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "v"), "--targets", "truth",
                 "--target-stride", "2", *TRAIN]) == 2
    assert "--target-stride" in capsys.readouterr().err


def test_train_on_several_directories_records_each(dataset, tmp_path, capsys):
    """One directory per count level, as the 2D study simulates them: trained on together, each
    recorded (seed, indices), and evaluate refuses to confirm on any of them."""
    other = tmp_path / "d2"
    assert main(["simulate", "--out", str(other), "--num-samples", "1", "--2d", "--counts", "4e4", "--seed", "5",
                 "--num-stages", "4", "--num-subsets", "2", "--no-progress"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--data", str(dataset), str(other), "--out", str(out), "--stages", "2",
                 "--validation-fraction", "0.34", *TRAIN]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["training_data"] == [{"seed": 0, "indices": [0, 1], "counts": 1e4},
                                     {"seed": 5, "indices": [0], "counts": 4e4}]
    assert meta["data"] == [str(dataset), str(other)]
    capsys.readouterr()
    rc = main(["evaluate", "--data", str(other), "--model", f"m={out / 'model.pt'}", "--out", str(tmp_path / "ev"),
               "--osem-iterations", "1", "--map-iterations", "1", "--no-progress"])
    assert rc == 2 and "training of m" in capsys.readouterr().err
    # directories that disagree (here: targets for 2 stages vs 4) are refused, naming the entry
    short = tmp_path / "d3"
    assert main(["simulate", "--out", str(short), "--num-samples", "1", "--2d", "--counts", "1e4", "--seed", "6",
                 "--num-stages", "2", "--num-subsets", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(dataset), str(short), "--out", str(tmp_path / "r2"), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "num_stages" in err and str(short) in err and not (tmp_path / "r2").exists()
