"""``sirf-fbsem reconstruct`` on STIR's recon_demo sinogram and on bad input (issue: core)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sirf_fbsem.cli import main
from sirf_fbsem.io.interfile import read_projdata
from sirf_fbsem.recon import fov_mask

nib = pytest.importorskip("nibabel")

SMALLLONG = "stir/examples/recon_demo/smalllong.hs"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_reconstruct_stir_recon_demo(shared_data: Path, tmp_path: Path, capsys):
    """OSEM of smalllong.hs (arc-corrected, precorrected so it has negatives) gives a plausible image.

    Finite, non-negative, almost all activity inside the FOV, the NIfTI affine is the STIR
    geometry's, and the isolated hot spot that the sinogram shows at view 0 (a sinusoid
    through s = +90 mm) is reconstructed where s = x cos(phi) + y sin(phi) puts it.
    """
    out, png = tmp_path / "recon.nii.gz", tmp_path / "recon.png"
    with pytest.warns(UserWarning, match="negative"):
        rc = main(["reconstruct", str(shared_data / SMALLLONG), "--algorithm", "osem", "--iterations", "2",
                   "--subsets", "4", "--output", str(out), "--preview", str(png), "--no-progress"])
    assert rc == 0
    assert "OSEM" in capsys.readouterr().out
    assert _files(tmp_path) == ["recon.nii.gz", "recon.png"]
    assert png.stat().st_size > 1000

    geom, prompts = read_projdata(shared_data / SMALLLONG, allow_negative=True)
    image = geom.default_image()
    nii = nib.load(str(out))
    x = np.asarray(nii.dataobj, dtype=np.float64).transpose(2, 1, 0)  # (z, y, x)
    assert x.shape == image.shape
    np.testing.assert_allclose(nii.affine, image.nifti_affine(geom.scanner), atol=1e-4)
    assert np.isfinite(x).all() and x.min() >= 0
    inside = fov_mask(image).numpy()
    assert x[inside].sum() > 0.99 * x.sum()

    # a hot spot: the brightest tangential bin of view 0 (phi = 0) is an isolated peak at s0, so a
    # point-like source must be reconstructed on the plane x = s0 (s = x cos(phi) + y sin(phi))
    seg0 = prompts[0, : geom.segment(0).num_axial_poss, 0]
    s0 = geom.s_mm()[int(np.argmax(seg0.max(axis=0)))]
    _, _, xx = image.centred_coordinates_mm()
    on_plane = np.abs(xx - s0) <= image.voxel_size_mm[2] + 1e-6
    assert on_plane.any()
    assert x[:, :, on_plane].max() > 3 * np.percentile(x[inside], 99)


def test_reconstruct_missing_input_names_the_file(tmp_path: Path, capsys):
    missing = tmp_path / "nothere.hs"
    rc = main(["reconstruct", str(missing), "--output", str(tmp_path / "o.nii.gz"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nothere.hs" in err
    assert _files(tmp_path) == []


def test_reconstruct_truncated_data_leaves_no_output(shared_data: Path, tmp_path: Path, capsys):
    """A data file shorter than the header says: clear error naming file and size, nothing written."""
    src = shared_data / SMALLLONG
    shutil.copy(src, tmp_path / "scan.hs")
    data = (src.parent / "smalllong.s").read_bytes()
    (tmp_path / "smalllong.s").write_bytes(data[: len(data) - 100])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = main(["reconstruct", str(tmp_path / "scan.hs"), "--output", str(out_dir / "o.nii.gz"),
               "--dicom", str(out_dir / "dicom"), "--preview", str(out_dir / "p.png"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "smalllong.s" in err and str(len(data)) in err.replace(",", "")
    assert _files(out_dir) == []


def test_reconstruct_negative_values_error_when_asked(shared_data: Path, tmp_path: Path, capsys):
    rc = main(["reconstruct", str(shared_data / SMALLLONG), "--negative", "error",
               "--output", str(tmp_path / "o.nii.gz"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "smalllong.s" in err and "negative" in err
    assert _files(tmp_path) == []


def test_reconstruct_bad_output_suffix_is_refused_before_work(shared_data: Path, tmp_path: Path, capsys):
    assert main(["reconstruct", str(shared_data / SMALLLONG), "--output", str(tmp_path / "o.tiff"),
                 "--iterations", "1", "--no-progress"]) == 2
    assert "--output must be a file name ending in .nii" in capsys.readouterr().err
    assert _files(tmp_path) == []


BUNDLED = Path(__file__).resolve().parents[1] / "test_data" / "phantom_scan.hs"


def test_failed_image_write_removes_the_dicom_series_already_written(tmp_path: Path, capsys, monkeypatch):
    """Outputs of one input are all or nothing: the image (written last) fails, the DICOM goes too."""
    import sirf_fbsem.io.nifti as nifti

    def failing_write(path, *args, **kwargs):
        raise ValueError(f"cannot write '{path}': disk full (injected)")

    monkeypatch.setattr(nifti, "write_nifti", failing_write)
    rc = main(["reconstruct", str(BUNDLED), "--algorithm", "osem", "--iterations", "1",
               "--output", str(tmp_path / "o.nii.gz"), "--dicom", str(tmp_path / "dicom"),
               "--preview", str(tmp_path / "p.png"), "--no-progress"])
    assert rc == 2
    assert "disk full" in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_listmode_header_fills_dicom_radiopharmaceutical(shared_data: Path, tmp_path: Path):
    """The mMR listmode header's isotope, half-life, tracer and injection time reach the DICOM series;
    its activity of 0 Bq ("unknown") is left out rather than written as a dose."""
    pydicom = pytest.importorskip("pydicom")
    from sirf_fbsem.geometry import scanner_preset
    from sirf_fbsem.io.dicom import radiopharmaceutical_from_header, write_dicom_series
    from sirf_fbsem.io.listmode import read_listmode_header

    # the header of SIRF's mMR example; its .l data file is not in the shared data: a stand-in file
    shutil.copy(shared_data / "sirf/examples/PET/mMR/list.l.hdr", tmp_path / "list.l.hdr")
    (tmp_path / "list.l").write_bytes(b"")
    hdr = read_listmode_header(tmp_path / "list.l.hdr")
    info = radiopharmaceutical_from_header(hdr)
    assert info is not None and info["radionuclide"] == "F-18"
    assert info["half_life_s"] == pytest.approx(hdr.isotope_halflife_s)
    assert "total_dose_bq" not in info  # the header says 0 Bq
    geom = scanner_preset("small_test")
    from sirf_fbsem.geometry import SinogramGeometry

    image_geom = SinogramGeometry.from_span(geom, span=3, max_ring_diff=4).default_image()
    image = np.ones(image_geom.shape, dtype=np.float32)
    write_dicom_series(tmp_path / "s", image, image_geom, geom, series_description="test", radiopharmaceutical=info)
    first = pydicom.dcmread(sorted((tmp_path / "s").iterdir())[0])
    item = first.RadiopharmaceuticalInformationSequence[0]
    assert item.Radiopharmaceutical == hdr.radiopharmaceutical
    assert float(item.RadionuclideHalfLife) == pytest.approx(hdr.isotope_halflife_s)
    assert item.RadionuclideCodeSequence[0].CodeMeaning.replace("^", "").lower().startswith("18fluorine")
    assert "RadionuclideTotalDose" not in item
    assert radiopharmaceutical_from_header(type("H", (), {"isotope": "Unobtainium-1"})()) is None


def test_bundled_model_reconstructs_the_bundled_scan_better_than_osem(tmp_path: Path):
    """The main job: the bundled model (SIRF's units) on the bundled scan beats OSEM of as many sub-iterations."""
    from sirf_fbsem.io.interfile import read_image
    from sirf_fbsem.io.nifti import read_nifti
    from sirf_fbsem.metrics import nrmse
    from sirf_fbsem.model.io import load_model

    data = BUNDLED.parent
    net, meta = load_model(data / "fbsem_model.pt")
    assert meta["projection_units"] == "stir_pixel_units"
    terms = ["--norm", str(data / "phantom_mult.hs"), "--additive", str(data / "phantom_additive.hs"), "--no-progress"]
    assert main(["reconstruct", str(BUNDLED), "--model", str(data / "fbsem_model.pt"),
                 "--output", str(tmp_path / "fbsem.nii.gz"), *terms]) == 0
    iterations = net.num_stages // net.num_subsets
    assert main(["reconstruct", str(BUNDLED), "--algorithm", "osem", "--subsets", str(net.num_subsets),
                 "--iterations", str(iterations), "--output", str(tmp_path / "osem.nii.gz"), *terms]) == 0
    _, truth = read_image(data / "phantom_truth.hv")
    fbsem, _ = read_nifti(tmp_path / "fbsem.nii.gz")
    osem, _ = read_nifti(tmp_path / "osem.nii.gz")
    e_fbsem, e_osem = nrmse(fbsem, truth), nrmse(osem, truth)
    assert e_fbsem < e_osem, (e_fbsem, e_osem)
    assert abs(fbsem.sum() / truth.sum() - 1) < 0.2  # same units as the truth


def test_a_model_reconstructs_on_the_grid_it_was_trained_on(tmp_path: Path):
    """An FBSEM model trained on a smaller grid than the scanner's default image (as the 3D mMR
    model: 127 x 128 x 128 of the mMR's 127 x 344 x 344) reconstructs on its own grid; OSEM and
    --override-geometry stay on the default image."""
    import dataclasses

    import torch

    from sirf_fbsem.io.interfile import read_projdata
    from sirf_fbsem.io.nifti import read_nifti
    from sirf_fbsem.model.fbsem import FBSEMNet
    from sirf_fbsem.model.io import save_model
    from sirf_fbsem.model.regularisers import RegulariserConfig

    data = BUNDLED.parent
    geom, _ = read_projdata(BUNDLED)
    default = geom.default_image()
    z, y, x = default.shape
    small = dataclasses.replace(default, shape=(z, y - 14, x - 14))
    torch.manual_seed(0)
    net = FBSEMNet(2, 4, RegulariserConfig(dims=3, channels=4, layers=2), beta_init=0.05)
    model = save_model(tmp_path / "m.pt", net, {"sinogram_geometry": geom, "image_geometry": small,
                                                "training_mode": "untrained"})
    terms = ["--norm", str(data / "phantom_mult.hs"), "--additive", str(data / "phantom_additive.hs"), "--no-progress"]
    assert main(["reconstruct", str(BUNDLED), "--model", str(model), "--output", str(tmp_path / "f.nii.gz"),
                 *terms]) == 0
    assert main(["reconstruct", str(BUNDLED), "--model", str(model), "--override-geometry",
                 "--output", str(tmp_path / "o.nii.gz"), *terms]) == 0
    f, f_affine = read_nifti(tmp_path / "f.nii.gz")
    o, o_affine = read_nifti(tmp_path / "o.nii.gz")
    assert f.shape == small.shape and o.shape == default.shape
    # the same centre: the small grid is the default one cropped by 7 voxels each side in y and x
    assert np.allclose(f_affine[:3, :3], o_affine[:3, :3])
    centre = lambda a, shape: a[:3, :3] @ ((np.array(shape[::-1]) - 1) / 2) + a[:3, 3]  # noqa: E731
    assert np.allclose(centre(f_affine, f.shape), centre(o_affine, o.shape), atol=1e-3)


def test_reconstruct_traces_as_sirf_by_default_on_the_cpu(tmp_path: Path):
    """Without --ray-tracing, reconstruct on the CPU uses the Siddon mode (STIR's matrix: SIRF's image);
    --ray-tracing joseph gives Joseph's image, which differs from it."""
    from sirf_fbsem.io.nifti import read_nifti

    data = BUNDLED.parent
    common = [str(BUNDLED), "--norm", str(data / "phantom_mult.hs"), "--additive", str(data / "phantom_additive.hs"),
              "--algorithm", "osem", "--iterations", "1", "--subsets", "4", "--no-progress"]
    images = {}
    for name, extra in {"default": [], "siddon": ["--ray-tracing", "siddon"], "joseph": ["--ray-tracing", "joseph"]}.items():
        out = tmp_path / f"{name}.nii"
        assert main(["reconstruct", *common, *extra, "--output", str(out)]) == 0
        images[name], _ = read_nifti(out)
    np.testing.assert_array_equal(images["default"], images["siddon"])
    diff = np.linalg.norm(images["joseph"] - images["siddon"]) / np.linalg.norm(images["siddon"])
    assert diff > 1e-3, diff
