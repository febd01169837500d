"""The documents: README and docs/ say only what the package does.

- the README stays a short user's document (under 200 lines);
- every relative link resolves, and every file in ``pipelines/results``, ``docs/studies`` and
  the figures in ``docs/`` is cited by a document (nothing orphaned);
- every ``sirf-fbsem`` command shown (also under ``torchrun ... -m sirf_fbsem``) is accepted by
  the real parser, and every script it names exists;
- the Python examples run: the README's API example on the bundled scan, the user guide's
  simulation loop on the bundled scan's geometry (the README's SIRF scripts run in
  ``test_reconstructor.py`` and ``test_readme_sirf_script.py``).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from sirf_fbsem.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").rglob("*.md")) + [README, REPO / "docker" / "README.md"]
BUNDLED = REPO / "test_data" / "phantom_scan.hs"

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)


def _blocks(path: Path, lang: str) -> list[str]:
    out = []
    for m in FENCE.finditer(path.read_text()):
        if m["lang"] == lang:
            indent = len(m["indent"])
            out.append("\n".join(line[indent:] for line in m["body"].splitlines()))
    return out


def _commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _shown_commands() -> list[tuple[Path, str]]:
    return [(doc, cmd) for doc in DOCS for lang in ("bash", "sh") for b in _blocks(doc, lang) for cmd in _commands(b)]


def test_readme_is_a_short_users_document():
    lines = README.read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; studies and details belong in docs/"
    assert "## Two commands" in README.read_text()


def test_relative_links_resolve():
    link = re.compile(r"\]\((?!https?://|#)([^)#\s]+)")
    missing = [(str(doc.relative_to(REPO)), target) for doc in DOCS for target in link.findall(doc.read_text())
               if not (doc.parent / target).exists()]
    assert not missing, missing


def _cited(name: str, text: str) -> bool:
    stem, _, ext = name.rpartition(".")
    if name in text:
        return True
    # the brace form `stem.{json,png}`
    return any(ext in m.split(",") for m in re.findall(re.escape(stem) + r"\.\{([^}]*)\}", text))


def test_every_result_and_study_file_is_cited_by_a_document():
    text = "\n".join(doc.read_text() for doc in DOCS)
    files = [*(REPO / "pipelines" / "results").iterdir(), *(REPO / "docs" / "studies").iterdir(),
             *(REPO / "docs").glob("*.png")]
    assert files
    orphans = [str(f.relative_to(REPO)) for f in files if not _cited(f.name, text)]
    assert not orphans, f"cited by no document (delete them or cite them): {orphans}"


def test_shown_sirf_fbsem_commands_are_accepted_by_the_parser(monkeypatch):
    import torch

    # as on the GPU machine a shown ``--device cuda`` command is meant for (the flag checks for one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    parser = build_parser()
    seen = 0
    for doc, cmd in _shown_commands():
        argv = shlex.split(cmd)
        if argv[0] == "torchrun":
            argv = argv[argv.index("sirf_fbsem") + 1:]
        elif argv[0] == "sirf-fbsem":
            argv = argv[1:]
        else:
            continue
        seen += 1
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc.relative_to(REPO)}: the parser rejects the command shown: {cmd}")
    assert seen >= 15, seen


def test_scripts_named_by_shown_commands_exist():
    named = [(doc, tok) for doc, cmd in _shown_commands() for tok in shlex.split(cmd)
             if re.fullmatch(r"(pipelines|docker|tests)/[\w./-]+\.(py|sh)", tok)]
    assert named
    missing = [(str(doc.relative_to(REPO)), tok) for doc, tok in named if not (REPO / tok).is_file()]
    assert not missing, missing


def test_python_examples_compile():
    for doc in DOCS:
        for block in _blocks(doc, "python"):
            compile(block, str(doc), "exec")


def test_readme_python_api_example_runs_on_the_bundled_scan(tmp_path, monkeypatch):
    from sirf_fbsem.io.interfile import read_projdata
    from sirf_fbsem.io.nifti import read_nifti
    from sirf_fbsem.recon import osem

    code = next(b for b in _blocks(README, "python") if "EmbeddedAcquisitionModel(" in b)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code.replace('"scan.hs"', repr(str(BUNDLED))), "README.md", "exec"), ns)  # noqa: S102
    img, _ = read_nifti(tmp_path / "out.nii.gz")
    assert img.shape == ns["image"].shape and np.isfinite(img).all() and img.sum() > 0
    # the example is OSEM on the embedded projector: the same as calling it directly
    geom, prompts = read_projdata(BUNDLED)
    assert np.allclose(img, ns["x"].numpy(), rtol=1e-6, atol=1e-6 * float(img.max()))
    assert geom.default_image().shape == img.shape and prompts.sum() > 0
    assert osem is ns["osem"]


def test_user_guide_simulation_loop_runs_on_a_scanner_read_from_its_header(tmp_path, monkeypatch):
    """The guide's loop, on the bundled scan's header: three sets with disjoint seeds, each with the
    guide's settings; the first set simulated for real with one sample."""
    import sirf_fbsem.simulation as simulation
    from sirf_fbsem.simulation.dataset import FBSEMSampleDataset

    guide = REPO / "docs" / "user_guide.md"
    text = guide.read_text()
    code = FENCE.search(text, text.index("<!-- guide-simulate -->"))["body"]
    calls = []
    monkeypatch.setattr(simulation, "simulate_dataset", lambda *a, **k: calls.append((a, k)))
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"template.hs"', repr(str(BUNDLED))), str(guide), "exec"), {})  # noqa: S102
    assert [a[0] for a, _ in calls] == ["data/train", "data/tune", "data/confirm"]
    assert len({k["seed"] for _, k in calls}) == 3
    (out, n, geom, image, config), kw = calls[0]
    assert n > 1 and config.count_levels and config.num_stages == config.num_subsets * 3
    from sirf_fbsem.simulation.dataset import simulate_dataset

    simulate_dataset(tmp_path / out, 1, geom, image, config, seed=kw["seed"], progress=False)
    ds = FBSEMSampleDataset(tmp_path / out)
    assert len(ds) == 1 and ds.manifest["seed"] == kw["seed"] and ds.num_stages == config.num_stages
