"""The output rule (sirf_fbsem.io.outputs, io.atomic): the package recognises what it wrote and
replaces nothing else."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sirf_fbsem.errors import OutputPathError, OutputWriteError
from sirf_fbsem.geometry import ImageGeometry, scanner_preset
from sirf_fbsem.io.atomic import atomic_dir, atomic_path
from sirf_fbsem.io.dicom import write_dicom_series
from sirf_fbsem.io.interfile import write_image
from sirf_fbsem.io.nifti import write_nifti
from sirf_fbsem.io.outputs import (
    SERIES_MANIFEST,
    PlannedOutput,
    absolute,
    check_location,
    check_planned,
    check_replaceable,
    dicom_series_files,
    ownership,
)
from sirf_fbsem.preview import save_montage

GEOM = ImageGeometry((3, 8, 8), (2.0, 2.0, 2.0))
SCANNER = scanner_preset("small_test")
IMAGE = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)


def test_every_writer_leaves_a_mark_that_ownership_recognises(tmp_path: Path):
    write_nifti(tmp_path / "a.nii.gz", IMAGE, GEOM, SCANNER)
    write_nifti(tmp_path / "a.nii", IMAGE, GEOM, SCANNER)
    write_image(tmp_path / "a.hv", GEOM, IMAGE)
    save_montage(tmp_path / "a.png", IMAGE)
    write_dicom_series(tmp_path / "dcm", IMAGE, GEOM, SCANNER, series_description="t")
    for name, kind in (("a.nii.gz", "nifti"), ("a.nii", "nifti"), ("a.hv", "interfile_image"), ("a.png", "png"),
                       ("dcm", "dicom_series")):
        assert ownership(tmp_path / name, kind) == "ours", name
        assert ownership(tmp_path / ("x" + name), kind) == "absent", name


def test_files_of_the_same_format_from_elsewhere_are_foreign(tmp_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    nib.save(nib.Nifti1Image(IMAGE, np.eye(4)), tmp_path / "b.nii.gz")  # a NIfTI another tool wrote
    plt.imsave(tmp_path / "b.png", IMAGE[0])  # a PNG matplotlib wrote for the user
    write_image(tmp_path / "b.hv", GEOM, IMAGE)
    text = (tmp_path / "b.hv").read_text().replace("; written by sirf_fbsem\n", "")
    (tmp_path / "b.hv").write_text(text)  # as STIR writes it: no mark
    (tmp_path / "c.v").write_bytes(b"data of a header that is missing")
    (tmp_path / "d.json").write_text(json.dumps({"written_by": "someone else"}))
    for name, kind in (("b.nii.gz", "nifti"), ("b.png", "png"), ("b.hv", "interfile_image"),
                       ("c.hv", "interfile_image"), ("d.json", "json")):
        assert ownership(tmp_path / name, kind) == "foreign", name
        with pytest.raises(OutputPathError, match="not written by sirf_fbsem"):
            check_replaceable(PlannedOutput(tmp_path / name, kind, "--x"), overwrite=True)
    # and the library writers refuse them too
    with pytest.raises(OutputPathError):
        write_nifti(tmp_path / "b.nii.gz", IMAGE, GEOM, SCANNER)
    with pytest.raises(OutputPathError):
        save_montage(tmp_path / "b.png", IMAGE)


def test_a_dicom_directory_is_ours_only_while_it_holds_just_the_series(tmp_path: Path):
    files = write_dicom_series(tmp_path / "dcm", IMAGE, GEOM, SCANNER, series_description="t")
    names = dicom_series_files(tmp_path / "dcm")
    assert names == sorted([f.name for f in files] + [SERIES_MANIFEST])
    (tmp_path / "dcm" / "extra.txt").write_text("user")
    assert dicom_series_files(tmp_path / "dcm") is None and ownership(tmp_path / "dcm", "dicom_series") == "foreign"
    with pytest.raises(OutputPathError):
        write_dicom_series(tmp_path / "dcm", IMAGE, GEOM, SCANNER, series_description="t")
    assert (tmp_path / "dcm" / "extra.txt").read_text() == "user" and all(f.exists() for f in files)
    (tmp_path / "dcm" / "extra.txt").unlink()
    (tmp_path / "dcm" / SERIES_MANIFEST).write_text("{not json")
    assert ownership(tmp_path / "dcm", "dicom_series") == "foreign"
    (tmp_path / "empty").mkdir()
    assert ownership(tmp_path / "empty", "dicom_series") == "absent"


def test_overwrite_is_needed_for_an_earlier_output(tmp_path: Path):
    write_nifti(tmp_path / "a.nii.gz", IMAGE, GEOM, SCANNER)
    planned = PlannedOutput(absolute(tmp_path / "a.nii.gz"), "nifti", "--output")
    with pytest.raises(OutputPathError, match="--overwrite"):
        check_planned([planned], overwrite=False)
    assert check_planned([planned], overwrite=True) == ["ours"]
    with pytest.raises(OutputPathError, match="also given"):
        check_planned([planned, planned], overwrite=True)


def test_location_checks_name_the_path(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        check_location(PlannedOutput(tmp_path / "f" / "deeper" / "o.nii", "nifti", "--output"))
    with pytest.raises(OutputPathError, match="MiB free"):
        check_location(PlannedOutput(tmp_path / "o.nii", "nifti", "--output", estimated_bytes=1 << 62))
    check_location(PlannedOutput(tmp_path / "new" / "dir" / "o.nii", "nifti", "--output", 100))
    assert not (tmp_path / "new").exists()  # the check creates nothing
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_absolute_gives_dot_a_name(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute(".") == tmp_path and absolute(".").name == tmp_path.name


def test_atomic_dir_into_an_existing_directory_touches_only_what_it_may(tmp_path: Path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.dcm").write_text("old")
    (target / "keep.txt").write_text("user")
    with atomic_dir(target, replace=["old.dcm"], last="m.json") as tmp:
        (tmp / "new.dcm").write_text("new")
        (tmp / "m.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["keep.txt", "m.json", "new.dcm"]
    # a name taken by a file it may not replace stops the move, and nothing changes
    with pytest.raises(OutputWriteError, match="keep.txt"):
        with atomic_dir(target, replace=[]) as tmp:
            (tmp / "keep.txt").write_text("clobber")
            (tmp / "a.dcm").write_text("a")
    assert sorted(os.listdir(target)) == ["keep.txt", "m.json", "new.dcm"]
    assert (target / "keep.txt").read_text() == "user"


def test_atomic_path_names_the_target_not_the_temporary_file(tmp_path: Path):
    target = tmp_path / "o.bin"
    with pytest.raises(OutputWriteError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device", str(tmp))
    assert str(target) in str(info.value) and ".part" not in str(info.value)
    assert os.listdir(tmp_path) == []
