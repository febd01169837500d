"""Shared fixtures: small geometries, seeded generators, the shared-data folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sirf_fbsem.geometry import ImageGeometry, Scanner, SinogramGeometry, scanner_preset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_script(after: str) -> str:
    """The first ```python block of the README after the line containing ``after``."""
    text = README.read_text()
    i = text.index(after)
    start = text.index("```python\n", i) + len("```python\n")
    return text[start:text.index("```", start)]


def run_readme_script(code: str, replacements: dict[str, str], without_sirf: bool = False) -> dict:
    """Run a README script (its file names replaced); ``without_sirf``: with its one-line change,
    ``import sirf_fbsem.stir as pet``. Returns the script's namespace."""
    assert "import sirf.STIR as pet" in code
    if without_sirf:
        code = code.replace("import sirf.STIR as pet", "import sirf_fbsem.stir as pet")
    for old, new in replacements.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    return namespace


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def torch_gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def small_span3() -> SinogramGeometry:
    """small_test scanner, span 3, max ring difference 4: 3 segments, non-arc-corrected."""
    return SinogramGeometry.from_span(scanner_preset("small_test"), span=3, max_ring_diff=4)


def tiny_scanner_geometry(arc_corrected: bool = False, span: int = 3, max_ring_diff: int = 4) -> SinogramGeometry:
    """A very small scanner (6 rings, 48 detectors) for float64 / gradcheck tests."""
    sc = Scanner(
        name="tiny", num_rings=6, num_detectors_per_ring=48, inner_ring_radius_mm=60.0,
        average_depth_of_interaction_mm=4.0, ring_spacing_mm=4.0, default_bin_size_mm=5.0,
        max_num_non_arccorrected_bins=20, default_num_arccorrected_bins=20,
    )
    return SinogramGeometry.from_span(sc, span=span, max_ring_diff=max_ring_diff, arc_corrected=arc_corrected)


def tiny_image(geom: SinogramGeometry, nxy: int = 15) -> ImageGeometry:
    d = geom.default_image()
    return ImageGeometry((d.shape[0], nxy, nxy), d.voxel_size_mm)
