"""Nothing lost, nothing unclear (issue #15): the command line as a user meets it, in a subprocess.

Each test runs ``python -m sirf_fbsem`` and asserts the exit code, that the one-line message
names the user's path or flag, that no traceback is shown, and that no user file was deleted
or half-written (every file's bytes before and after).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from sirf_fbsem.cli import MAX_ITERATIONS, main

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "test_data"
MODEL = TEST_DATA / "fbsem_model.pt"


def cli(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "sirf_fbsem", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".part" in p.name or p.name.endswith(".old")]


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    """The bundled scan copied into ``tmp_path/scan`` with a user's own files beside it."""
    folder = tmp_path / "scan"
    folder.mkdir()
    for name in ("phantom_scan.hs", "phantom_scan.s"):
        shutil.copy(TEST_DATA / name, folder / name)
    (folder / "notes.txt").write_text("the user's notes\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "keep.dat").write_bytes(b"\x00\x01user data")
    return folder / "phantom_scan.hs"


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sirf-fbsem")]
    assert lines, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# ------------------------------------------------------------------ 1. data loss
def test_dicom_into_a_folder_with_user_files_is_refused_and_nothing_is_deleted(scan: Path, tmp_path: Path):
    before = snapshot(tmp_path)
    r = cli("reconstruct", str(scan), "--output", "out.nii.gz", "--dicom", str(scan.parent), "--no-progress",
            cwd=tmp_path)
    assert_one_line_error(r, 2, "--dicom", str(scan.parent), "did not write")
    assert snapshot(tmp_path) == before  # the scan's own .hs/.s, notes and subfolder untouched
    assert not (tmp_path / "out.nii.gz").exists() and no_leftovers(tmp_path)
    # the same with --overwrite: only a series sirf_fbsem wrote may be replaced
    r = cli("reconstruct", str(scan), "--output", "out.nii.gz", "--dicom", str(scan.parent), "--overwrite",
            "--no-progress", cwd=tmp_path)
    assert_one_line_error(r, 2, "--dicom")
    assert snapshot(tmp_path) == before


def test_dicom_at_a_regular_file_is_refused_and_the_file_kept(scan: Path, tmp_path: Path):
    target = tmp_path / "series"
    target.write_text("not a directory")
    before = snapshot(tmp_path)
    r = cli("reconstruct", str(scan), "--output", "o.nii.gz", "--dicom", str(target), "--no-progress", cwd=tmp_path)
    assert_one_line_error(r, 2, "--dicom", "is a file")
    assert snapshot(tmp_path) == before and not (tmp_path / ".series.old").exists() and no_leftovers(tmp_path)


def test_dicom_dot_in_an_empty_folder_writes_the_series_there_and_overwrite_replaces_only_it(scan: Path,
                                                                                            tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    r = cli("reconstruct", str(scan), "--output", str(tmp_path / "o.nii.gz"), "--dicom", ".", "--no-progress",
            cwd=work)
    assert r.returncode == 0, r.stderr
    first = sorted(p.name for p in work.iterdir())
    assert "sirf_fbsem_series.json" in first and sum(n.endswith(".dcm") for n in first) == 15
    manifest = json.loads((work / "sirf_fbsem_series.json").read_text())
    assert sorted(manifest["files"]) == [n for n in first if n.endswith(".dcm")]
    # a second run needs --overwrite for both outputs, and then replaces just the series
    r = cli("reconstruct", str(scan), "--output", str(tmp_path / "o.nii.gz"), "--dicom", ".", "--no-progress",
            cwd=work)
    assert_one_line_error(r, 2, "--overwrite")
    r = cli("reconstruct", str(scan), "--output", str(tmp_path / "o.nii.gz"), "--dicom", ".", "--overwrite",
            "--no-progress", cwd=work)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in work.iterdir()) == first
    second = json.loads((work / "sirf_fbsem_series.json").read_text())
    assert second["series_instance_uid"] != manifest["series_instance_uid"]
    # once the user adds a file of their own there, the folder is no longer the package's to replace
    (work / "report.pdf").write_bytes(b"%PDF user")
    before = snapshot(work)
    r = cli("reconstruct", str(scan), "--output", str(tmp_path / "o.nii.gz"), "--dicom", ".", "--overwrite",
            "--no-progress", cwd=work)
    assert_one_line_error(r, 2, "--dicom")
    assert snapshot(work) == before


def test_an_image_the_package_did_not_write_is_never_replaced(scan: Path, tmp_path: Path):
    for name in ("user.nii.gz", "user.hv", "user.png"):
        (tmp_path / name).write_bytes(b"user's file " + name.encode())
    before = snapshot(tmp_path)
    for argv in (["--output", "user.nii.gz"], ["--output", "user.hv"],
                 ["--output", "o.nii.gz", "--preview", "user.png"]):
        r = cli("reconstruct", str(scan), *argv, "--overwrite", "--no-progress", cwd=tmp_path)
        assert_one_line_error(r, 2, "user.", "not written by sirf_fbsem")
    assert snapshot(tmp_path) == before and no_leftovers(tmp_path)


def test_batch_refuses_a_user_file_at_an_output_name_before_any_work(scan: Path, tmp_path: Path):
    other = scan.parent / "second.hs"
    other.write_text(scan.read_text())  # same data file: a second input
    out = tmp_path / "recon"
    out.mkdir()
    (out / "second.nii.gz").write_bytes(b"the user's own image")
    before = snapshot(tmp_path)
    r = cli("reconstruct", str(scan), str(other), "--output-dir", str(out), "--no-progress", cwd=tmp_path)
    assert_one_line_error(r, 2, "second.nii.gz", "not written by sirf_fbsem")
    assert snapshot(tmp_path) == before  # not even the first input was reconstructed


# ------------------------------------------------------------------ 2. late failure
@pytest.mark.parametrize("where", ["under_a_file", "proc", "sys"])
def test_unwritable_outputs_are_found_before_the_reconstruction(scan: Path, tmp_path: Path, where: str):
    target = {"under_a_file": str(scan.parent / "notes.txt" / "out.nii.gz"), "proc": "/proc/sirf_fbsem_out.nii.gz",
              "sys": "/sys/sirf_fbsem_out.nii.gz"}[where]
    if where != "under_a_file" and not Path(target).parent.is_dir():
        pytest.skip(f"no {Path(target).parent} here")
    before = snapshot(tmp_path)
    r = cli("reconstruct", str(scan), "--output", target, "--no-progress", cwd=tmp_path)
    assert_one_line_error(r, 2, "--output", target)
    assert ".part" not in r.stderr and "OSEM" not in r.stdout  # the user's path; nothing was reconstructed
    assert snapshot(tmp_path) == before


def test_too_little_free_space_is_found_before_the_reconstruction(scan: Path, tmp_path: Path, monkeypatch, capsys):
    import sirf_fbsem.io.outputs as outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    rc = main(["reconstruct", str(scan), "--output", str(tmp_path / "o.nii.gz"), "--dicom", str(tmp_path / "d"),
               "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "MiB free" in captured.err and str(tmp_path) in captured.err
    assert "OSEM" not in captured.out and not (tmp_path / "o.nii.gz").exists()


def test_a_write_failure_at_run_time_names_the_users_path_and_leaves_nothing(scan: Path, tmp_path: Path,
                                                                             monkeypatch, capsys):
    import nibabel as nib

    def disk_full(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(nib, "save", disk_full)
    out = tmp_path / "out" / "o.nii.gz"
    rc = main(["reconstruct", str(scan), "--output", str(out), "--dicom", str(tmp_path / "out" / "dicom"),
               "--preview", str(tmp_path / "out" / "p.png"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and str(out) in err and "No space left" in err and ".part" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # DICOM and preview removed too


# ------------------------------------------------------------------ 4/5. options and their language
def test_options_that_do_not_apply_are_errors_naming_the_option(scan: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--model", str(MODEL), "--iterations", "50"], "--iterations"),
        (["--span", "4"], "--span"),
        (["--time", "0", "10"], "--time"),
        (["--override-geometry"], "--override-geometry"),
        (["--algorithm", "osem", "--model", str(MODEL)], "--model"),
        (["--algorithm", "mlem", "--subsets", "4"], "--subsets"),
        (["--format", "hv"], "--format"),
        (["--model", str(MODEL), "--psf-fwhm", "4"], "--psf-fwhm"),
        (["--iterations", "1e9"], "--iterations"),
        (["--iterations", str(MAX_ITERATIONS + 1)], f"from 1 to {MAX_ITERATIONS}"),
        (["--time", "10", "5"], "T0 < T1"),
        (["--backend", "sirf", "--ray-tracing", "siddon"], "--ray-tracing"),
    ]
    for extra, flag in cases:
        try:
            rc = main(["reconstruct", str(scan), "--output", "o.nii.gz", "--no-progress", *extra])
        except SystemExit as exit_:  # argparse's own usage errors
            rc = exit_.code
        err = capsys.readouterr().err
        assert rc == 2 and flag in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize("command", ["reconstruct", "train", "evaluate", "simulate"])
def test_a_device_this_machine_lacks_is_a_usage_error_before_any_work(scan: Path, tmp_path: Path, capsys,
                                                                      monkeypatch, command):
    """``--device cuda`` without a usable GPU, an unknown device and a GPU index past the last one are
    usage errors naming --device (before this, reconstruct read the scan and then failed inside torch,
    reported as a bug in sirf_fbsem)."""
    import torch

    monkeypatch.chdir(tmp_path)
    rest = {"reconstruct": [str(scan), "--output", "o.nii.gz"], "train": ["data", "--output", "m.pt"],
            "evaluate": ["--data", "t", "--model", f"seq={MODEL}", "--out", "e"],
            "simulate": ["--out", "s", "--num-samples", "1"]}[command]
    def refused(device: str, why: str) -> None:
        with pytest.raises(SystemExit) as exit_:
            main([command, *rest, "--device", device])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "--device" in err and why in err and "Traceback" not in err, (device, err)

    refused("gpu", "expected cpu, cuda or cuda:N")
    refused("cuda:x", "expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        refused("cuda", "use --device cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    refused("cuda:1", "has 1 CUDA device(s)")
    assert not list(tmp_path.glob("*.nii.gz")) and not list(tmp_path.glob("*.pt")) and not (tmp_path / "s").exists()


@pytest.mark.parametrize("extra, flag", [(["--model", str(MODEL), "--iterations", "50"], "--iterations"),
                                         (["--span", "4"], "--span"), (["--iterations", "1e9"], "--iterations")])
def test_options_that_were_silently_ignored_or_ran_for_ever_are_refused(scan: Path, tmp_path: Path, extra, flag):
    r = cli("reconstruct", str(scan), "--output", "o.nii.gz", "--no-progress", *extra, cwd=tmp_path)
    assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_library_parameter_names_are_shown_as_flags(shared_data: Path, scan: Path, tmp_path: Path):
    # a model trained for another scanner
    r = cli("reconstruct", str(shared_data / "stir/examples/recon_demo/smalllong.hs"), "--model", str(MODEL),
            "--output", "o.nii.gz", "--no-progress", cwd=tmp_path)
    assert_one_line_error(r, 2, "--override-geometry")
    assert "override_geometry" not in r.stderr
    # a subset count other than the model's
    r = cli("reconstruct", str(scan), "--model", str(MODEL), "--subsets", "3", "--output", "o.nii.gz",
            "--no-progress", cwd=tmp_path)
    assert_one_line_error(r, 2, "--subsets")
    assert "num_subsets" not in r.stderr
    # negative prompts under --negative error
    r = cli("reconstruct", str(shared_data / "stir/examples/recon_demo/smalllong.hs"), "--negative", "error",
            "--output", "o.nii.gz", "--no-progress", cwd=tmp_path)
    assert_one_line_error(r, 2, "negative")
    assert "allow_negative" not in r.stderr
    assert not (tmp_path / "o.nii.gz").exists()


# ------------------------------------------------------------------ 6. train: run directories and resume
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "d"
    r = cli("simulate", "--out", str(folder), "--num-samples", "3", "--2d", "--counts", "1e4", "--num-stages", "2",
            "--num-subsets", "2", "--no-progress", cwd=folder.parent)
    assert r.returncode == 0, r.stderr
    return folder


TRAIN = ["--stages", "2", "--channels", "4", "--layers", "2", "--dims", "2", "--no-progress"]


def test_train_into_a_crashed_run_or_with_other_settings_gives_a_message(dataset: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = cli("train", "--data", str(dataset), "--out", str(run), "--epochs", "1", *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run / "model.pt").unlink()  # as a crash before the end would leave it
    r = cli("train", "--data", str(dataset), "--out", str(run), "--epochs", "1", *TRAIN, cwd=tmp_path)
    assert_one_line_error(r, 2, "--resume", str(run))
    r = cli("train", "--data", str(dataset), "--out", str(run), "--epochs", "1", "--lr", "0.5", "--resume", *TRAIN,
            cwd=tmp_path)
    assert_one_line_error(r, 2, "cannot resume", "lr")
    # a folder of the user's that is not a run is refused, and left as it was
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.pt").write_bytes(b"the user's model")
    r = cli("train", "--data", str(dataset), "--out", str(mine), "--epochs", "1", *TRAIN, cwd=tmp_path)
    assert_one_line_error(r, 2, "--out", "not empty")
    assert (mine / "model.pt").read_bytes() == b"the user's model" and len(list(mine.iterdir())) == 1


def test_train_flags_that_do_not_apply_to_the_mode_are_errors(dataset: Path, tmp_path: Path, capsys):
    cases = [(["--mode", "sequential", "--stage-devices", "cpu"], "--stage-devices"),
             (["--mode", "end_to_end", "--cache", "memory"], "--cache"),
             (["--mode", "greedy", "--no-warm-start"], "--no-warm-start"),
             (["--mode", "sequential", "--all-stages-loss"], "--all-stages-loss"),
             (["--mode", "sequential", "--shared"], "--shared"),
             (["--epochs", "0"], "--epochs"), (["--lr", "-1"], "--lr"), (["--validation-fraction", "1.5"], "--validation")]
    for extra, flag in cases:
        try:
            rc = main(["train", "--data", str(dataset), "--out", str(tmp_path / "run"), *TRAIN, *extra])
        except SystemExit as exit_:
            rc = exit_.code
        err = capsys.readouterr().err
        assert rc == 2 and flag in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(scan: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="--span"):
        main(["reconstruct", str(scan), "--output", str(tmp_path / "o.nii.gz"), "--span", "3", "--debug"])


def test_simulate_checks_room_for_the_dataset_before_simulating(tmp_path: Path, monkeypatch, capsys):
    import sirf_fbsem.io.outputs as outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 50 << 20))
    rc = main(["simulate", "--out", str(tmp_path / "d"), "--num-samples", "100000", "--2d", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "MiB free" in err and not (tmp_path / "d").exists()


def test_simulate_into_a_folder_of_user_files_is_refused(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "sample_00000.pt").write_bytes(b"user")
    r = cli("simulate", "--out", str(tmp_path / "d"), "--num-samples", "1", "--2d", "--no-progress", cwd=tmp_path)
    assert_one_line_error(r, 2, "--out", "not empty")
    assert (tmp_path / "d" / "sample_00000.pt").read_bytes() == b"user"


# ------------------------------------------------------------------ signals
def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_sigterm_during_reconstruct_leaves_no_partial_output(scan: Path, tmp_path: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "sirf_fbsem", "reconstruct", str(scan), "--output", "o.nii.gz",
                             "--dicom", "dcm", "--preview", "p.png", "--iterations", str(MAX_ITERATIONS)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read(1), b"")), daemon=True)
    reader.start()
    _wait_for(lambda: b"%|" in b"".join(chunks), proc, 120)  # the iterations' progress bar is running
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = b"".join(chunks).decode()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err and "run it again" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan"]


@pytest.mark.parametrize("module, held", [("numba._sirf_fbsem_probe", True), ("sirf_fbsem_probe", False)])
def test_a_signal_inside_numbas_compiler_is_raised_once_the_compiler_returns(module: str, held: bool):
    """numba's compiler runs Python inside llvmlite's ctypes callbacks, where a raised exception is
    dropped and the process later dies of SIGSEGV (a CI run: SIGTERM while a cached kernel loaded).
    A signal landing in numba's (or llvmlite's) code must be raised only after it returned; in any
    other code at once."""
    from sirf_fbsem.cli import _signals_interrupt
    from sirf_fbsem.errors import Interrupted

    probe = types.ModuleType(module)
    exec(textwrap.dedent("""
        import os, signal, time
        def compile_kernel(log):
            os.kill(os.getpid(), signal.SIGTERM)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.3:  # Python runs the handler between these bytecodes
                pass
            log.append("compiled")
    """), probe.__dict__)
    log: list[str] = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    with pytest.raises(Interrupted) as caught:
        with _signals_interrupt():
            probe.compile_kernel(log)
            log.append("returned")
            time.sleep(10)
            log.append("not interrupted")
    assert caught.value.signum == signal.SIGTERM
    assert log == (["compiled", "returned"] if held else [])
    assert time.monotonic() - t0 < 5  # the held signal was raised within the sleep, not after it
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_sigint_during_train_keeps_checkpoints_and_prints_the_resume_command(dataset: Path, tmp_path: Path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "sirf_fbsem", "train", "--data", str(dataset), "--out", str(run), "--epochs", "40",
            *TRAIN]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # interrupt once stage 0 has checkpointed a few epochs
    _wait_for(lambda: len(list((run / "checkpoints").glob("*.pt"))) >= 3, proc, 240)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "interrupted (SIGINT)" in err and "--resume" in err and "Traceback" not in err
    assert no_leftovers(run) and not (run / "model.pt").exists()
    resume = err.strip().splitlines()[-1].strip()
    assert resume.startswith("sirf-fbsem train") and resume.endswith("--resume")
    from sirf_fbsem.model.io import safe_torch_load

    for ckpt in (run / "checkpoints").glob("*.pt"):
        assert isinstance(safe_torch_load(ckpt), dict)  # every checkpoint complete
    r = cli(*resume.split()[1:], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (run / "model.pt").is_file()
