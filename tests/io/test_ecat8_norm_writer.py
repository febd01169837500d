"""The ECAT8 norm writer: what :func:`read_ecat8_norm` (and STIR, through SIRF) reads back is what was written."""
from __future__ import annotations

import numpy as np
import pytest

from sirf_fbsem.geometry import SinogramGeometry, scanner_preset
from sirf_fbsem.io.ecat8_norm import read_ecat8_norm
from sirf_fbsem.io.ecat8_norm_writer import ECAT8NormComponents, write_ecat8_norm
from sirf_fbsem.io.listmode import det_pair_for_view_tangential, parse_interfile_keys

from conftest import SHARED_DATA

MMR = scanner_preset("Siemens_mMR")
REAL_NORM_HDR = SHARED_DATA / "sirf" / "examples" / "PET" / "mMR" / "norm.n.hdr"


def _components(rng: np.random.Generator) -> ECAT8NormComponents:
    return ECAT8NormComponents(
        geometric=1 + 0.2 * rng.random((127, 344)), interference=1 + 0.2 * rng.random((344, 9)),
        crystal_efficiencies=1 + 0.2 * rng.random((64, 504)), axial_effects=1 + 0.2 * rng.random(837))


def test_round_trip_through_the_reader(tmp_path):
    comp = _components(np.random.default_rng(1))
    header = write_ecat8_norm(tmp_path / "sim_norm.n.hdr", comp)
    assert header == tmp_path / "sim_norm.n.hdr" and (tmp_path / "sim_norm.n").stat().st_size == 323404  # as a real one
    norm = read_ecat8_norm(header)
    np.testing.assert_array_equal(norm.geometric, comp.geometric.astype(np.float32))
    np.testing.assert_array_equal(norm.interference, comp.interference.astype(np.float32))
    np.testing.assert_array_equal(norm.axial_effects, comp.axial_effects.astype(np.float32))
    gaps = np.arange(504) % 9 == 0  # STIR zeroes the gap crystals after its one-crystal shift
    np.testing.assert_array_equal(norm.crystal_efficiencies[:, ~gaps],
                                  comp.crystal_efficiencies[:, ~gaps].astype(np.float32))
    assert np.all(norm.crystal_efficiencies[:, gaps] == 0)
    assert (norm.norm_span, norm.norm_max_ring_diff) == (11, 60)

    # one bin by hand: segment 0, axial 0 is ring pair (0, 0); view 4, tangential_pos_num 3
    geometry = SinogramGeometry.from_span(MMR, 11, 5)
    eff = norm.efficiency_sinogram(geometry)
    d1, d2 = det_pair_for_view_tangential(4, 3, 504)
    e = norm.crystal_efficiencies
    expected = e[0, d1] * e[0, d2] * norm.geometric[0, 172 + 3] / norm.axial_effects[0] * norm.interference[175, 4]
    assert eff[0, 0, 4, 172 + 3] == pytest.approx(expected, rel=1e-5)


def test_header_has_the_keys_of_a_real_mmr_norm_header(tmp_path):
    header = write_ecat8_norm(tmp_path / "n.n.hdr", _components(np.random.default_rng(2)))
    ours = parse_interfile_keys(header)
    assert ours["originating system"] == "2008" and ours["number of normalization components"] == "8"
    if REAL_NORM_HDR.is_file():
        real = parse_interfile_keys(REAL_NORM_HDR)
        for key in [k for k in real if k.startswith(("data offset in bytes", "matrix size", "number of dimensions"))]:
            assert ours[key].replace(" ", "") == real[key].replace(" ", ""), key


def test_writer_refuses_bad_components_and_existing_files(tmp_path):
    rng = np.random.default_rng(3)
    comp = _components(rng)
    bad = ECAT8NormComponents(comp.geometric[:-1], comp.interference, comp.crystal_efficiencies, comp.axial_effects)
    with pytest.raises(ValueError, match="'geometric' has shape"):
        write_ecat8_norm(tmp_path / "a.n.hdr", bad)
    zero = ECAT8NormComponents(comp.geometric, comp.interference, comp.crystal_efficiencies, 0 * comp.axial_effects)
    with pytest.raises(ValueError, match="axial_effects"):
        write_ecat8_norm(tmp_path / "a.n.hdr", zero)
    with pytest.raises(ValueError, match=".n.hdr"):
        write_ecat8_norm(tmp_path / "a.hdr", comp)
    write_ecat8_norm(tmp_path / "a.n.hdr", comp)
    with pytest.raises(FileExistsError):
        write_ecat8_norm(tmp_path / "a.n.hdr", comp)
    write_ecat8_norm(tmp_path / "a.n.hdr", comp, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.n", "a.n.hdr"]


@pytest.mark.sirf
def test_stir_computes_the_same_efficiencies_from_the_written_file(tmp_path):  # pragma: no cover - needs SIRF
    pet = pytest.importorskip("sirf.STIR")
    header = write_ecat8_norm(tmp_path / "n.n.hdr", _components(np.random.default_rng(4)))
    template = pet.AcquisitionData("Siemens_mMR", span=11, max_ring_diff=5, view_mash_factor=1)  # segment 0 only
    model = pet.AcquisitionSensitivityModel(str(header))
    model.set_up(template)
    stir_eff = model.forward(template.get_uniform_copy(1.0)).as_array()
    ours = read_ecat8_norm(header).efficiency_sinogram(SinogramGeometry.from_span(MMR, 11, 5))
    np.testing.assert_allclose(stir_eff.reshape(ours.shape), ours, rtol=1e-5, atol=1e-6)
