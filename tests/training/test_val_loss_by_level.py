"""pipelines/val_loss_by_level.py: a sequential run on data at two count levels, read level by level
from the per-sample validation losses that ``sirf-fbsem train`` logs."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sirf_fbsem.cli import main
from sirf_fbsem.simulation.dataset import FBSEMSampleDataset

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


@pytest.fixture(scope="module")
def script(request):
    spec = importlib.util.spec_from_file_location("val_loss_by_level", PIPELINES / "val_loss_by_level.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["val_loss_by_level"] = mod
    request.addfinalizer(lambda: sys.modules.pop("val_loss_by_level", None))
    spec.loader.exec_module(mod)
    return mod


def test_run_on_two_count_levels_is_read_level_by_level(script, tmp_path):
    data = tmp_path / "data"
    assert main(["simulate", "--out", str(data), "--num-samples", "6", "--2d", "--counts", "1e4,1e5", "--num-stages",
                 "2", "--num-subsets", "2", "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--stages", "2", "--channels", "4", "--layers", "2",
                 "--dims", "2", "--epochs", "2", "--no-progress", "--validation-fraction", "0.5"]) == 0
    out = tmp_path / "levels"
    script.main(["--run", str(run), "--data", str(data), "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    history = json.loads((run / "losses.json").read_text())["history"]
    samples = FBSEMSampleDataset(data)
    assert [s["stage"] for s in result["stages"]] == [1, 2]
    for row in result["stages"]:
        kept = min((r for r in history if r["stage"] == row["stage"] - 1), key=lambda r: r["val_loss"])
        per = kept["val_loss_per_sample"]
        assert len(per) == 3 and len(row["by_level"]) == 2 and row["epoch"] == kept["epoch"] and row["val_loss"] == kept["val_loss"]
        # the level of each validation sample is the counts its own file records
        expected: dict[str, list[float]] = {}
        for i, loss in per.items():
            expected.setdefault(f"{samples[int(i)].counts:.0e}", []).append(loss)
        assert row["samples_by_level"] == {k: len(v) for k, v in expected.items()}
        assert row["by_level"] == pytest.approx({k: sum(v) / len(v) for k, v in expected.items()}, rel=1e-12)
        # the levels' means, weighted by their sample counts, give the logged mean
        weighted = sum(row["by_level"][k] * n for k, n in row["samples_by_level"].items()) / len(per)
        assert weighted == pytest.approx(row["val_loss"], rel=1e-9)


def test_samples_outside_the_data_are_refused(script):
    history = [{"stage": 0, "epoch": 1, "val_loss": 0.5, "val_loss_per_sample": {"7": 0.5}}]
    with pytest.raises(ValueError, match="validation sample 7 is not in the --data directories"):
        script.levels_by_stage(history, [1e6] * 3)
    # stages logged before per-sample losses are listed without levels
    old = script.levels_by_stage([{"stage": 0, "epoch": 1, "val_loss": 0.5}], [1e6])
    assert old[0].by_level is None and old[0].val_loss == 0.5
