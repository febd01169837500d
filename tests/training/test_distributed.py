"""Distributed training and batch reconstruction under torchrun: CPU ranks, gloo over loopback.

The multi-process tests start their own jobs (``python -m torch.distributed.run``) in a
new process group, bounded by a timeout; the whole group is killed if a job hangs or
fails. Two launches in all (each start costs seconds): one training job (reference runs
of three modes plus a run whose rank 1 is killed and restarted) and one reconstruction
job (three command lines).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sirf_fbsem.batch import expand_inputs, output_stem, plan_outputs
from sirf_fbsem.distributed import (
    SINGLE_PROCESS,
    backend_for_device,
    init_distributed,
    local_device,
    loss_weight,
    shard_batch,
    shard_items,
)
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
from sirf_fbsem.training import TrainConfig, train, with_terms_factory
from dist_train_worker import CONFIG, NUM_STAGES, NUM_SUBSETS
from torchrun_jobs import tail as _tail, torchrun as _torchrun
from tiny_problems import small_net, tiny_samples

TESTS = Path(__file__).resolve().parents[1]  # tests/, where the torchrun workers are
#: sequential run: 5 training samples, global batch 2 -> 3 steps an epoch, 2 epochs, 2 stages: 12 steps.
#: Step 11 is the second step of stage 2's second epoch; the last checkpoint before it ends step 9.
KILL_STEP = 11
REFERENCE_MODES = ("sequential", "greedy", "end_to_end")


# ----------------------------------------------------------------------------- helpers
def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- pure helpers
def test_global_batch_shards_cover_the_batch_and_weights_average_to_the_global_mean():
    for n in range(1, 8):
        for world in (1, 2, 3):
            batch = list(range(10, 10 + n))
            shares = [shard_batch(batch, r, world) for r in range(world)]
            assert sum(shares, []) == batch  # contiguous, in order, each sample once
            sizes = [len(s) for s in shares]
            assert max(sizes) - min(sizes) <= 1
            # DDP averages over ranks: (1/W) sum_r w_r grad(mean_r) is the global-batch gradient
            # sum_r (n_r/n) grad(mean_r) exactly when w_r / W = n_r / n
            for s in shares:
                assert loss_weight(len(s), n, world) / world == pytest.approx(len(s) / n)
    assert sorted(shard_items(7, 0, 2) + shard_items(7, 1, 2)) == list(range(7))
    with pytest.raises(ValueError, match="rank"):
        shard_batch([1, 2], 2, 2)


def test_single_process_context_without_torchrun():
    assert init_distributed("cpu", env={}) is SINGLE_PROCESS
    assert init_distributed("cpu", env={"RANK": "0", "WORLD_SIZE": "1"}) is SINGLE_PROCESS
    assert not SINGLE_PROCESS.is_distributed and SINGLE_PROCESS.is_main
    assert SINGLE_PROCESS.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert backend_for_device("cpu") == "gloo" and backend_for_device("cuda:1") == "nccl"
    assert local_device("cuda", 3) == "cuda:3" and local_device("cuda:1", 3) == "cuda:1"
    assert local_device("cpu", 3) == "cpu"


def test_batch_inputs_from_paths_lists_and_globs(tmp_path):
    for name in ("b.hs", "a.hs", "PET.l.hdr"):
        (tmp_path / name).write_text("x")
    (tmp_path / "list.txt").write_text("# scans\n\nb.hs\n" + str(tmp_path / "PET.l.hdr") + "\n")
    got = expand_inputs([f"@{tmp_path / 'list.txt'}", str(tmp_path / "*.hs")])
    assert [p.name for p in got] == ["b.hs", "PET.l.hdr", "a.hs"]  # list order, then sorted glob; no duplicates
    assert output_stem(Path("PET.l.hdr")) == "PET" and output_stem(Path("x.y.hs")) == "x.y"
    items = plan_outputs(got, tmp_path / "out", ".hv")
    assert [i.output.name for i in items] == ["b.hv", "PET.hv", "a.hv"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.nothing")])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.hs").write_text("x")
    with pytest.raises(ValueError, match="would both write"):
        plan_outputs([tmp_path / "a.hs", tmp_path / "sub" / "a.hs"], tmp_path / "out")


def test_reconstruct_cli_checks_outputs_before_any_work(tmp_path, capsys):
    from sirf_fbsem.cli import main

    (tmp_path / "a.hs").write_text("x")
    (tmp_path / "b.hs").write_text("x")
    for argv, message in (
        ([str(tmp_path / "a.hs"), str(tmp_path / "b.hs"), "--output", str(tmp_path / "o.nii")], "--output-dir"),
        ([str(tmp_path / "a.hs")], "is required"),
        ([str(tmp_path / "a.hs"), "--output", str(tmp_path / "o.png")], "ending in"),
    ):
        assert main(["reconstruct", *argv]) == 2
        assert message in capsys.readouterr().err


def test_greedy_stages_placed_round_robin_train_as_on_one_device(tmp_path):
    base, samples = tiny_samples(num_samples=3, num_subsets=2, num_targets=2, counts=2e4, seed=3)
    factory = with_terms_factory(base)
    cfg = dict(epochs=1, lr=1e-2, batch_size=2, validation_fraction=0.3, seed=0, progress=False)
    one = train(small_net(2, 2), samples, "greedy", TrainConfig(**cfg), factory, tmp_path / "one")
    placed = train(small_net(2, 2), samples, "greedy", TrainConfig(**cfg, stage_devices=("cpu", "cpu")),
                   factory, tmp_path / "placed")
    a, b = one.net.state_dict(), placed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_loss"] for r in one.history] == [r["val_loss"] for r in placed.history]
    with pytest.raises(ValueError, match="stage_devices"):
        train(small_net(2, 2), samples, "sequential", TrainConfig(**cfg, stage_devices=("cpu",)), factory,
              tmp_path / "seq")
    with pytest.raises(ValueError, match="stage_devices"):
        TrainConfig(stage_devices=("abacus",))


# ----------------------------------------------------------------------------- training on 2 ranks
@pytest.fixture(scope="module")
def problem():
    """6 samples (5 training, 1 validation): global batches of 2, 2 and 1 (the last leaves rank 1 empty)."""
    return tiny_samples(num_samples=6, num_subsets=NUM_SUBSETS, num_targets=4, counts=2e4, seed=0)


@pytest.fixture(scope="module")
def two_rank_job(problem, tmp_path_factory) -> Path:
    """One torchrun job, 2 CPU ranks, --max-restarts 1: reference runs of three modes, then a
    sequential run whose rank 1 kills itself (SIGKILL) at step KILL_STEP of the first attempt."""
    _, samples = problem
    root = tmp_path_factory.mktemp("ddp")
    torch.save([s.to_dict() for s in samples], root / "samples.pt")
    runs = [f"{m}:{m}" for m in REFERENCE_MODES] + ["killed:sequential"]
    rc = _torchrun([str(TESTS / "dist_train_worker.py"), "--samples", str(root / "samples.pt"), "--out",
                    str(root / "out"), "--runs", *runs, "--kill", "killed", "1", str(KILL_STEP)],
                   root / "job.log", max_restarts=1)
    assert rc == 0, _tail(root / "job.log")
    return root / "out"


@pytest.mark.parametrize("mode", REFERENCE_MODES)
def test_two_ranks_train_as_one_process_on_the_global_batch(problem, two_rank_job, tmp_path, mode):
    base, samples = problem
    init = small_net(num_stages=NUM_STAGES, num_subsets=NUM_SUBSETS).state_dict()
    single = train(small_net(num_stages=NUM_STAGES, num_subsets=NUM_SUBSETS), samples, mode,
                   TrainConfig(**CONFIG), with_terms_factory(base), tmp_path)
    ddp = _state(two_rank_job / mode / "final.pt")
    ref = single.net.state_dict()
    assert ddp.keys() == ref.keys()
    moved = max(float((ref[k] - init[k]).abs().max()) for k in ref)
    assert moved > 1e-3  # training did move the weights: equality is not trivial
    for k in ref:
        # DDP's gradient average vs autograd's batch mean: equal up to float rounding
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-4, atol=1e-6, msg=f"{mode}: {k}")
    history = json.loads((two_rank_job / mode / "losses.json").read_text())["history"]
    assert [(r["stage"], r["epoch"]) for r in history] == [(r["stage"], r["epoch"]) for r in single.history]
    for mine, theirs in zip(history, single.history):
        for key in ("train_loss", "val_loss"):
            assert (mine[key] is None) == (theirs[key] is None)
            if mine[key] is not None:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4)
    assert not (two_rank_job / mode / "cache").exists()  # the shared cache is removed after a completed run


def test_killed_rank_restarts_and_ends_with_the_weights_of_an_uninterrupted_run(two_rank_job):
    steps: dict[tuple[int, int], list[int]] = {}
    for line in (two_rank_job / "steps.log").read_text().split("\n"):
        if line.strip() and line.split()[2] == "killed":
            attempt, rank, _, step = line.split()
            steps.setdefault((int(attempt), int(rank)), []).append(int(step))
    # first attempt: both ranks reached the kill step, then rank 1 died (and torchrun stopped rank 0)
    assert steps[0, 1][-1] == KILL_STEP and max(steps[0, 0]) <= KILL_STEP
    # second attempt: every rank resumed at the start of the unfinished epoch (the checkpoint after
    # step 9): stage 1 and the finished epoch of stage 2 were not redone
    for rank in (0, 1):
        assert steps[1, rank] == [10, 11, 12], steps
    final, reference = _state(two_rank_job / "killed" / "final.pt"), _state(two_rank_job / "sequential" / "final.pt")
    assert final.keys() == reference.keys()
    for k in final:
        assert torch.equal(final[k], reference[k]), k
    killed = json.loads((two_rank_job / "killed" / "losses.json").read_text())["history"]
    uninterrupted = json.loads((two_rank_job / "sequential" / "losses.json").read_text())["history"]
    assert [r["val_loss"] for r in killed] == [r["val_loss"] for r in uninterrupted]


# ----------------------------------------------------------------------------- batch reconstruction
def _write_scans(folder: Path, n: int) -> list[Path]:
    """``n`` small single-slice sinograms (small_test scanner, one ring) of random images."""
    from sirf_fbsem.geometry import scanner_preset
    from sirf_fbsem.io.interfile import write_projdata
    from sirf_fbsem.simulation.acquisition import single_slice_geometry

    sino, image = single_slice_geometry(scanner_preset("small_test"))
    model = EmbeddedAcquisitionModel(sino, image, num_subsets=1)
    g = torch.Generator().manual_seed(5)
    paths = []
    for i in range(n):
        y = torch.poisson(10 * model.direct(torch.rand(image.shape, generator=g)), generator=g)
        paths.append(folder / f"scan{i}.hs")
        write_projdata(paths[-1], sino, y.numpy())
    return paths


def test_batch_reconstruction_on_two_ranks_writes_each_output_once(tmp_path):
    import nibabel as nib

    scans = _write_scans(tmp_path / "scans", 4)
    bad = tmp_path / "bad" / "broken.hs"  # a header whose data file is cut short
    bad.parent.mkdir()
    bad.write_text(scans[0].read_text().replace("scan0.s", "broken.s"))
    (bad.parent / "broken.s").write_bytes((tmp_path / "scans" / "scan0.s").read_bytes()[:1000])
    (tmp_path / "good.txt").write_text("\n".join(str(p) for p in scans) + "\n")
    (tmp_path / "mixed.txt").write_text("\n".join(str(p) for p in [*scans[1:], bad]) + "\n")
    common = ["--iterations", "1", "--subsets", "2", "--no-progress"]
    runs = [
        ["reconstruct", f"@{tmp_path / 'good.txt'}", "--output-dir", str(tmp_path / "A"), *common],
        ["reconstruct", str(tmp_path / "scans" / "*.hs"), "--output-dir", str(tmp_path / "A"), *common],  # rerun
        ["reconstruct", f"@{tmp_path / 'mixed.txt'}", "--output-dir", str(tmp_path / "B"), *common],
    ]
    (tmp_path / "runs.json").write_text(json.dumps(runs))

    rc = _torchrun([str(TESTS / "dist_reconstruct_driver.py"), str(tmp_path / "runs.json"),
                    str(tmp_path / "codes")], tmp_path / "job.log")
    log = _tail(tmp_path / "job.log")
    assert rc == 0, log
    for rank in (0, 1):
        assert json.loads((tmp_path / f"codes.rank{rank}.json").read_text())["codes"] == [0, 0, 1], log

    # run 1: 4 outputs, each written once, by the rank that owns it (item i on rank i mod 2)
    first = json.loads((tmp_path / "codes.run0.summary.json").read_text())
    assert first["world_size"] == 2 and first["counts"] == {"written": 4, "skipped": 0, "failed": 0}
    assert [(Path(it["output"]).name, it["rank"], it["status"]) for it in first["items"]] == [
        (f"scan{i}.nii.gz", i % 2, "written") for i in range(4)]
    out_a = sorted(p.name for p in (tmp_path / "A").iterdir())
    assert out_a == ["reconstruct_summary.json"] + [f"scan{i}.nii.gz" for i in range(4)]  # no temporary leftovers
    for i in range(4):
        img = nib.load(tmp_path / "A" / f"scan{i}.nii.gz").get_fdata()
        assert img.shape[:2] == (47, 47) and float(img.sum()) > 0
    # the rerun writes nothing: every output exists, none is newer than run 1's summary
    rerun = json.loads((tmp_path / "A" / "reconstruct_summary.json").read_text())
    assert rerun["counts"] == {"written": 0, "skipped": 4, "failed": 0}
    run1_done = (tmp_path / "codes.run0.summary.json").stat().st_mtime_ns
    assert all((tmp_path / "A" / f"scan{i}.nii.gz").stat().st_mtime_ns <= run1_done for i in range(4))
    assert "0 written, 4 skipped" in log

    mixed = json.loads((tmp_path / "B" / "reconstruct_summary.json").read_text())
    assert mixed["counts"] == {"written": 3, "skipped": 0, "failed": 1}
    failed = [item for item in mixed["items"] if item["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["input"] == str(bad) and failed[0]["error"]
    assert sorted(p.name for p in (tmp_path / "B").glob("*.nii.gz")) == [f"scan{i}.nii.gz" for i in (1, 2, 3)]
    assert f"{bad}: failed" in log  # reported on stderr by the rank that ran it
