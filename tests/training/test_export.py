"""``sirf-fbsem export-model``: a training run's model file written from its checkpoints and the
training data's manifest alone is the file ``train`` wrote (weights bit for bit, metadata but the
export record); a stopped sequential run's finished stages export as a network of their own; bad
runs, data and outputs are refused before anything is written, and no file the package did not
write is replaced."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sirf_fbsem.cli import main
from sirf_fbsem.model.io import load_model, safe_torch_load

TRAIN = ["--stages", "2", "--channels", "4", "--layers", "2", "--dims", "2", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "d"
    assert main(["simulate", "--out", str(folder), "--num-samples", "3", "--2d", "--counts", "1e4", "--num-stages",
                 "2", "--num-subsets", "2", "--no-progress"]) == 0
    # the samples themselves are not needed: export reads the manifest
    manifest_only = folder.parent / "manifest_only"
    manifest_only.mkdir()
    shutil.copy(folder / "manifest.json", manifest_only / "manifest.json")
    return folder


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for mode in ("sequential", "end_to_end"):
        run = tmp_path_factory.mktemp("runs") / mode
        assert main(["train", "--data", str(data), "--out", str(run), "--mode", mode, *TRAIN]) == 0
        out[mode] = run
    return out


def _export(*argv: str) -> int:
    return main(["export-model", *argv])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sirf-fbsem export-model: error:") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("mode", ["sequential", "end_to_end"])
def test_a_finished_runs_export_is_the_model_train_wrote(runs, data: Path, tmp_path: Path, mode: str):
    run = runs[mode]
    out = tmp_path / "exported.pt"
    assert _export("--run", str(run), "--data", str(data.parent / "manifest_only"), "--output", str(out)) == 0
    trained_net, trained = load_model(run / "model.pt")
    net, meta = load_model(out)
    a, b = trained_net.state_dict(), net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta.pop("exported_from") == {"run": str(run), "stages": 2, "run_stages": 2}
    assert trained.pop("data") == str(data) and meta.pop("data") == str(data.parent / "manifest_only")
    # settings that do not change the weights are not in the checkpoints: they take their defaults
    unrecorded = {"progress", "keep_cache", "block_shape"}
    cfg, trained_cfg = meta.pop("train_config"), trained.pop("train_config")
    assert cfg["progress"] is True and trained_cfg["progress"] is False  # trained with --no-progress
    assert {k: v for k, v in cfg.items() if k not in unrecorded} == \
        {k: v for k, v in trained_cfg.items() if k not in unrecorded}
    assert meta == trained
    assert json.loads(out.with_suffix(".json").read_text())["training_mode"] == mode


def test_a_stopped_sequential_runs_finished_stages_export_as_a_network_of_their_own(runs, data: Path,
                                                                                  tmp_path: Path, capsys):
    run = tmp_path / "stopped"
    shutil.copytree(runs["sequential"] / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "stage_001.pt").unlink()  # stopped before stage 2's first epoch ended
    out = tmp_path / "first.pt"
    assert _export("--run", str(run), "--data", str(data), "--output", str(out)) == 2
    err = _error(capsys)
    assert "1 of the run's 2 stages are finished" in err and "--stages 1" in err and not out.exists()
    assert _export("--run", str(run), "--data", str(data), "--output", str(out), "--stages", "2") == 2
    assert "1 of the run's 2 stages" in _error(capsys)
    assert _export("--run", str(run), "--data", str(data), "--output", str(out), "--stages", "3") == 2
    assert "--stages 3" in _error(capsys)

    assert _export("--run", str(run), "--data", str(data), "--output", str(out), "--stages", "1") == 0
    net, meta = load_model(out)
    assert net.num_stages == meta["num_stages"] == 1 and meta["target_subiterates"] == [1]
    assert meta["exported_from"]["stages"] == 1 and meta["exported_from"]["run_stages"] == 2
    kept = safe_torch_load(run / "checkpoints" / "stage_000.pt")["stage_state"]
    assert all(torch.equal(kept[k], v) for k, v in net.stages[0].state_dict().items())
    # the one-stage network is the whole run's first stage: same config otherwise
    whole, _ = load_model(runs["sequential"] / "model.pt")
    assert {**whole.config(), "num_stages": 1} == net.config()


def test_an_end_to_end_run_exports_whole_or_not_at_all(runs, data: Path, tmp_path: Path, capsys):
    out = tmp_path / "m.pt"
    assert _export("--run", str(runs["end_to_end"]), "--data", str(data), "--output", str(out), "--stages", "1") == 2
    assert "--stages" in _error(capsys) and not out.exists()
    run = tmp_path / "mid"
    shutil.copytree(runs["end_to_end"] / "checkpoints", run / "checkpoints")
    ck = safe_torch_load(run / "checkpoints" / "checkpoint.pt")
    ck["train_state"]["complete"] = False  # as a run stopped between epochs leaves it
    torch.save(ck, run / "checkpoints" / "checkpoint.pt")
    assert _export("--run", str(run), "--data", str(data), "--output", str(out)) == 2
    assert "has not finished" in _error(capsys) and not out.exists()


def test_runs_and_data_that_cannot_give_the_model_are_refused_naming_them(runs, data: Path, tmp_path: Path, capsys):
    out = tmp_path / "m.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export("--run", str(empty), "--data", str(data), "--output", str(out)) == 2
    assert f"--run {str(empty)!r}" in _error(capsys)
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    manifest = json.loads((data / "manifest.json").read_text())
    (fewer / "manifest.json").write_text(json.dumps({**manifest, "files": manifest["files"][:2]}))
    assert _export("--run", str(runs["sequential"]), "--data", str(fewer), "--output", str(out)) == 2
    err = _error(capsys)
    assert "--data" in err and "2 samples" in err and "trained on 3" in err
    assert _export("--run", str(runs["sequential"]), "--data", str(tmp_path / "none"), "--output", str(out)) == 2
    assert "manifest" in _error(capsys)
    # two directories that together hold the 3 samples, but not from one simulation setting
    first, second = tmp_path / "first", tmp_path / "second"
    for d, files, fwhm in ((first, manifest["files"][:2], manifest["psf_fwhm_mm"]),
                           (second, manifest["files"][2:], (manifest["psf_fwhm_mm"] or 0.0) + 1.0)):
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({**manifest, "files": files, "psf_fwhm_mm": fwhm}))
    assert _export("--run", str(runs["sequential"]), "--data", str(first), str(second), "--output", str(out)) == 2
    err = _error(capsys)
    assert f"--data {str(second / 'manifest.json')!r}" in err and "another --psf-fwhm" in err
    gap = tmp_path / "gap"
    shutil.copytree(runs["sequential"] / "checkpoints", gap / "checkpoints")
    (gap / "checkpoints" / "stage_000.pt").unlink()
    assert _export("--run", str(gap), "--data", str(data), "--output", str(out)) == 2
    assert "stage_000.pt missing" in _error(capsys)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_an_output_the_package_did_not_write_is_never_replaced(runs, data: Path, tmp_path: Path, capsys):
    base = ["--run", str(runs["sequential"]), "--data", str(data)]
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"the user's file")
    assert _export(*base, "--output", str(mine), "--overwrite") == 2
    assert "not written by sirf_fbsem" in _error(capsys) and mine.read_bytes() == b"the user's file"
    assert not mine.with_suffix(".json").exists()

    lone = tmp_path / "lone.pt"
    lone.with_suffix(".json").write_text('{"the user": 1}')
    assert _export(*base, "--output", str(lone)) == 2
    assert "lone.json" in _error(capsys) and not lone.exists()
    assert lone.with_suffix(".json").read_text() == '{"the user": 1}'

    assert _export(*base, "--output", str(tmp_path / "model.pth")) == 2
    assert ".pt" in _error(capsys)

    ours = tmp_path / "ours.pt"
    assert _export(*base, "--output", str(ours)) == 0
    first = ours.read_bytes()
    assert _export(*base, "--output", str(ours)) == 2
    assert "--overwrite" in _error(capsys) and ours.read_bytes() == first
    ours.with_suffix(".json").write_text("not the model's metadata")  # its sidecar replaced by the user's
    assert _export(*base, "--output", str(ours), "--overwrite") == 2
    assert "not written by sirf_fbsem" in _error(capsys)
    assert ours.with_suffix(".json").read_text() == "not the model's metadata"
    ours.with_suffix(".json").unlink()
    assert _export(*base, "--output", str(ours), "--overwrite") == 0
    assert load_model(ours)[1]["exported_from"]["stages"] == 2
