"""``sirf-fbsem reconstruct`` gives the images recorded by an earlier version on the bundled data.

The reference (``test_data/reference_outputs.{npz,json}``) was written by
``pipelines/make_reference_outputs.py`` run on the commit its JSON names; a refactoring must not
change it. "The same" is float32 rounding (rtol 1e-5): the reference machine's BLAS and this one's
may sum in other orders. A change meant to alter the images regenerates the reference.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "test_data" / "reference_outputs"


def _script():
    spec = importlib.util.spec_from_file_location("make_reference_outputs",
                                                  ROOT / "pipelines" / "make_reference_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECORD = json.loads(REFERENCE.with_suffix(".json").read_text())


def test_the_reference_was_made_from_the_bundled_inputs_of_today():
    changed = [f for f, digest in RECORD["inputs_sha256"].items()
               if hashlib.sha256((ROOT / f).read_bytes()).hexdigest() != digest]
    assert not changed, (f"{changed} changed since the reference was made (commit {RECORD['git_commit']}): "
                         "if the images are meant to change, rerun pipelines/make_reference_outputs.py")
    assert RECORD["git_commit"] and set(RECORD["cases"]) == {"fbsem_small", "osem_small", "fbsem_small_joseph",
                                                       "osem_small_joseph"}


@pytest.mark.parametrize("name", sorted(RECORD["cases"]))
def test_reconstruct_gives_the_reference_image(name, tmp_path):
    ref = np.load(REFERENCE.with_suffix(".npz"))
    img = _script().run_case(RECORD["cases"][name], tmp_path)
    got = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)
    want = ref[f"{name}_image"]
    assert got.shape == want.shape
    np.testing.assert_array_equal(img.affine, ref[f"{name}_affine"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                               err_msg=f"{name} differs from the image of commit {RECORD['git_commit']}")
    assert float(want.sum()) > 0
