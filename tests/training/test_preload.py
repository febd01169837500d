"""``train --preload``: samples read once and held in memory train the same network as samples read per use,
and a data set that does not fit is refused before anything is loaded or written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sirf_fbsem.cli import main
from sirf_fbsem.errors import InputError
from sirf_fbsem.model.io import load_model
from sirf_fbsem.simulation.dataset import FBSEMSampleDataset
from sirf_fbsem.training import resident
from sirf_fbsem.training.resident import ResidentDataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("preload") / "data"
    assert main(["simulate", "--out", str(d), "--num-samples", "4", "--2d", "--counts", "1e4", "--num-stages", "2",
                 "--num-subsets", "2", "--no-progress"]) == 0
    return d


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--stages", "2", "--channels", "4", "--layers", "2",
                 "--dims", "2", "--epochs", "2", "--no-progress", "--validation-fraction", "0.25", *extra])


@pytest.mark.parametrize("extra", [("--preload", "cpu"), ("--preload", "device", "--patch-size", "1,8,8")])
def test_preloaded_samples_train_the_same_network(data, tmp_path, extra):
    patch = tuple(a for a in extra if a.startswith("1,") or a == "--patch-size")
    assert _train(data, tmp_path / "disk", *patch) == 0
    assert _train(data, tmp_path / "held", *extra) == 0
    a, _ = load_model(tmp_path / "disk" / "model.pt")
    b, _ = load_model(tmp_path / "held" / "model.pt")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    disk = json.loads((tmp_path / "disk" / "losses.json").read_text())
    held = json.loads((tmp_path / "held" / "losses.json").read_text())
    assert [r["val_loss"] for r in disk["history"]] == [r["val_loss"] for r in held["history"]]


def test_held_samples_are_read_once(data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    ds = FBSEMSampleDataset(copy)
    held = ResidentDataset(ds, "cpu", progress=False)
    before = [ds[i].prompts.clone() for i in range(len(ds))]
    for f in ds.files:
        f.unlink()  # this test's own copy
    assert len(held) == len(before) == 4
    for i, p in enumerate(before):
        assert torch.equal(held[i].prompts, p) and held[i].prompts.device.type == "cpu"
    with pytest.raises(IndexError):
        held[4]


def test_samples_that_do_not_fit_are_refused_before_loading(data, tmp_path, monkeypatch):
    size = sum(f.stat().st_size for f in FBSEMSampleDataset(data).files)
    monkeypatch.setattr(resident, "available_bytes", lambda device: int(size))  # 85 % of it is too little
    loads = []
    monkeypatch.setattr(FBSEMSampleDataset, "__getitem__", lambda self, i: loads.append(i))
    with pytest.raises(InputError, match=r"--preload: the 4 training samples take .* GiB .* free on cpu"):
        ResidentDataset(FBSEMSampleDataset(data), "cpu", progress=False)
    assert loads == []
    out = tmp_path / "run"
    assert _train(data, out, "--preload", "cpu") == 2  # usage error
    assert not out.exists()  # nothing written
