"""Every ``sirf-fbsem`` command shown in the README and docs/ runs, in the order shown, per document.

A command is run through the package's own ``cli`` (what the ``sirf-fbsem`` entry point calls), in
a scratch folder, after substitutions that keep it the same command on bundled data and at a
size CI can run; each substitution is listed here:

- placeholder files become bundled ones (``scan.hs`` -> test_data/phantom_scan.hs, ``LIST.l.hdr``
  -> the bundled mMR listmode, ``model.pt`` -> the bundled model of the scan's scanner, ...);
  a model a document trains first (``runs/seq/model.pt``) is the one its ``train`` command wrote;
- sizes: ``--num-samples`` at most 3, ``--epochs`` 1, ``--iterations`` 1, ``--time 0 1``;
  3D Siemens mMR simulations run on the small test scanner (``--scanner small_test``, its default
  image, 3 stages of 3 subsets), 2D mMR ones on 1 x 32 x 32 images (``--image-shape``),
  patches of 4,8,8;
- ``--device cuda`` runs on the CPU; each reconstruction writes into its own subfolder of the
  scratch folder (a document may show two commands with the same ``--output``).

Data a document's command reads but no earlier command of it writes (the tuning and confirmation
sets of an ``evaluate``) are simulated with the document's own ``simulate`` settings (without one:
the bundled small-scanner model's scanner and subsets) and fresh seeds. Shown commands that need hardware or a whole cluster (``torchrun`` over 4 processes) are
parsed by tests/test_docs.py and run in miniature by tests/training/test_distributed.py.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from sirf_fbsem.cli import main as cli
from test_docs import DOCS, REPO, _shown_commands

TEST_DATA = REPO / "test_data"
SHARED = REPO.parent / "shared" / "data"

FILES = {
    "scan.hs": TEST_DATA / "phantom_scan.hs",
    "mult_factors.hs": TEST_DATA / "phantom_mult.hs",
    "additive.hs": TEST_DATA / "phantom_additive.hs",
    "model.pt": TEST_DATA / "fbsem_model.pt",
    "LIST.l.hdr": TEST_DATA / "mmr_brain.l.hdr",
    "norm.n.hdr": TEST_DATA / "mmr_brain_norm.n.hdr",
    "mu.hv": TEST_DATA / "mmr_brain_mu_map.hv",
}


# data for a document that shows no simulate command: the bundled small-scanner model's setting
DEFAULT_SIMULATE = ["simulate", "--out", "data", "--scanner", "small_test", "--num-samples", "2", "--num-subsets", "4",
                    "--num-stages", "8", "--counts", "1e5", "--no-progress"]


def _sirf_fbsem_commands() -> dict[Path, list[list[str]]]:
    out: dict[Path, list[list[str]]] = {}
    for doc, cmd in _shown_commands():
        argv = shlex.split(cmd)
        if argv[0] == "sirf-fbsem":
            out.setdefault(doc, []).append(argv[1:])
    return out


COMMANDS = _sirf_fbsem_commands()


def _span(argv: list[str], flag: str) -> tuple[int, int]:
    """``argv[i:j]`` is ``flag`` and its values (up to the next flag); ``i == j`` when absent."""
    if flag not in argv:
        return len(argv), len(argv)
    i = j = argv.index(flag)
    j += 1
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    return i, j


def _set(argv: list[str], flag: str, *values: str) -> None:
    """Replace the values of ``flag``, or append it."""
    i, j = _span(argv, flag)
    argv[i:j] = [flag, *values]


def _drop(argv: list[str], flag: str) -> None:
    i, j = _span(argv, flag)
    del argv[i:j]


def _value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def scaled(argv: list[str], tmp: Path, trained: set[str]) -> list[str]:
    """The command with the module docstring's substitutions."""
    argv = list(argv)
    sub = argv[0]
    for i, a in enumerate(argv):
        name, eq, path = a.rpartition("=")
        if eq and argv[i - 1] == "--model" and path.startswith("runs/") and path not in trained:
            argv[i] = f"{name}={FILES['model.pt']}"  # evaluate's NAME=PATH
        elif a in FILES:
            argv[i] = str(FILES[a])
        elif a.endswith("model.pt") and a.startswith("runs/") and a not in trained:
            argv[i] = str(FILES["model.pt"])
        elif a.startswith("../shared/data/"):
            argv[i] = str(SHARED / a[len("../shared/data/"):])
        elif a == "test_data/fbsem_mmr_model.pt":
            argv[i] = str(REPO / a)
    if "--device" in argv:
        _set(argv, "--device", "cpu")
    if sub == "reconstruct":
        if "--iterations" in argv:
            _set(argv, "--iterations", "1")
        if "--time" in argv:
            _set(argv, "--time", "0", "1")
        if _value(argv, "--algorithm") == "osem":
            _set(argv, "--iterations", "1")
    if sub == "simulate":
        n = _value(argv, "--num-samples")
        _set(argv, "--num-samples", str(min(int(n or 3), 3)))
        if _value(argv, "--scanner") == "Siemens_mMR" and "--2d" not in argv:
            _set(argv, "--scanner", "small_test")
            for flag in ("--image-shape", "--span", "--max-ring-diff"):
                _drop(argv, flag)
            _set(argv, "--num-subsets", "3")
            _set(argv, "--num-stages", "3")
        elif "--2d" in argv:
            _set(argv, "--image-shape", "1,32,32")
        _set(argv, "--no-progress")
    if sub == "train":
        _set(argv, "--epochs", "1")
        if "--patch-size" in argv:
            _set(argv, "--patch-size", "4,8,8")
            _set(argv, "--patches-per-sample", "2")
        _set(argv, "--no-progress")
    if sub == "evaluate":
        _set(argv, "--no-progress")
        for flag, vals in (("--osem-iterations", ["1"]), ("--map-iterations", ["1"]), ("--betas", ["0.1"]),
                           ("--fwhm-mm", ["0", "4"])):
            _set(argv, flag, *vals)
    return argv


def _needed_data(argv: list[str]) -> list[str]:
    if argv[0] not in ("train", "evaluate"):
        return []
    dirs = []
    for flag in ("--data", "--tune-data"):
        i, j = _span(argv, flag)
        dirs += argv[i + 1:j]
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("doc", sorted(COMMANDS, key=str), ids=lambda d: str(d.relative_to(REPO)))
def test_shown_commands_run(doc: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = COMMANDS[doc]
    simulate_settings: list[str] | None = None
    trained: set[str] = set()
    ran = 0
    for shown in commands:
        argv = scaled(shown, tmp_path, trained)
        if any(str(SHARED) in a for a in argv) and not SHARED.is_dir():
            continue
        if argv[0] == "reconstruct" and "scan.petsird" in argv:
            argv[argv.index("scan.petsird")] = str(_petsird_scan(tmp_path))
        if argv[0] == "simulate":
            simulate_settings = argv
        for k, d in enumerate(_needed_data(argv)):
            if not (tmp_path / d / "manifest.json").exists():
                # the document's own simulate settings, else the bundled model's scanner and subsets
                extra = list(simulate_settings or DEFAULT_SIMULATE)
                _set(extra, "--out", d)
                _set(extra, "--seed", str(9000 + 100 * k + len(d)))
                assert cli(extra) == 0
        if argv[0] == "reconstruct":  # each reconstruction its own outputs (a document may reuse a name)
            for flag in ("--output", "--dicom", "--output-dir"):
                if _value(argv, flag) is not None:
                    _set(argv, flag, str(Path(f"command{ran}") / _value(argv, flag)))
        rc = cli(argv)
        assert rc == 0, f"{doc.relative_to(REPO)}: exit {rc} for the command shown as: sirf-fbsem {shlex.join(shown)}"
        ran += 1
        if argv[0] == "train":
            out = tmp_path / _value(argv, "--out")
            assert (out / "model.pt").is_file()
            trained.add(f"{_value(shown, '--out')}/model.pt")
        if argv[0] == "reconstruct" and "--output" in argv:
            from sirf_fbsem.io.nifti import read_nifti

            img, _ = read_nifti(tmp_path / _value(argv, "--output"))
            assert np.isfinite(img).all() and img.sum() > 0
    assert ran > 0


def _petsird_scan(tmp_path: Path) -> Path:
    """A small PETSIRD scan (2 s) written by the package's example writer, pipelines/make_petsird_example.py."""
    import subprocess
    import sys

    pytest.importorskip("petsird")
    out = tmp_path / "scan.petsird"
    subprocess.run([sys.executable, str(REPO / "pipelines" / "make_petsird_example.py"), str(out), "--counts", "2e4",
                    "--seconds", "2"], check=True, capture_output=True, cwd=REPO)
    return out


def test_every_document_with_sirf_fbsem_commands_is_covered():
    assert {d.name for d in COMMANDS} >= {"README.md", "command_line.md", "user_guide.md"}
    assert sum(len(c) for c in COMMANDS.values()) >= 20
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", c[0]) for cs in COMMANDS.values() for c in cs)
    assert DOCS
