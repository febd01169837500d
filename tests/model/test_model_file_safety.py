"""Model file integrity (format version 2): checksums, metadata validation, tensor shapes,
the version 1 upgrade, and fuzzing.

The checksums are recomputed here from the module docstring's description (not with the
module's own functions), so the stored format is pinned. Files altered on purpose with
recomputed checksums reach the validation layer, which must name what is wrong; whatever
happens to a file, ``load_model`` returns the original weights or raises a
:class:`~sirf_fbsem.errors.SirfFbsemError`, never a bare ``KeyError``/``RuntimeError``/...
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from sirf_fbsem.errors import OutputPathError, SirfFbsemError
from sirf_fbsem.geometry import ImageGeometry, Scanner, SinogramGeometry
from sirf_fbsem.model import FBSEMNet, RegulariserConfig
from sirf_fbsem.model.io import (
    ModelFileError,
    load_model,
    metadata_sha256,
    save_model,
    state_dict_sha256,
    upgrade_model_file,
)

REPO = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO / "test_data" / "fbsem_model.pt"
BUNDLED_SCAN = REPO / "test_data" / "phantom_scan.hs"

# ----------------------------------------------------------------------------- helpers


def tiny_geometry() -> tuple[SinogramGeometry, ImageGeometry]:
    """One ring (one sinogram), 32 views x 32 bins; a 1 x 32 x 32 image of 4 mm voxels."""
    sc = Scanner(
        name="tiny 2D", num_rings=1, num_detectors_per_ring=64, inner_ring_radius_mm=70.0,
        average_depth_of_interaction_mm=0.0, ring_spacing_mm=4.0, default_bin_size_mm=4.0,
        max_num_non_arccorrected_bins=32, default_num_arccorrected_bins=32,
    )
    return SinogramGeometry.from_span(sc, span=1, max_ring_diff=0), ImageGeometry((1, 32, 32), (4.0, 4.0, 4.0))


def tiny_net(seed: int = 0) -> FBSEMNet:
    """2 stages, 2 subsets, a 2-layer 2D CNN of 3 channels; weights moved off their zero init."""
    torch.manual_seed(seed)
    net = FBSEMNet(2, 2, RegulariserConfig(dims=2, channels=3, layers=2), beta_init=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def documented_tensor_sha256(state: dict[str, torch.Tensor]) -> str:
    """``tensor_sha256`` as the module docstring describes it."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        header = json.dumps([key, str(t.dtype), list(t.shape)]).encode()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        for part in (header, raw):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def documented_metadata_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def raw_payload(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_payload(path: Path, payload: dict[str, Any], metadata: Any = None, state: dict | None = None,
                  recompute: bool = True) -> Path:
    """Save ``payload`` with replaced metadata (a dict, dumped to JSON) and/or state dict,
    its checksums recomputed (``recompute``) so that only the validation can object."""
    payload = dict(payload)
    if metadata is not None:
        payload["metadata_json"] = json.dumps(metadata, indent=2, sort_keys=True)
    if state is not None:
        payload["state_dict"] = state
    if recompute:
        payload["metadata_sha256"] = documented_metadata_sha256(payload["metadata_json"])
        payload["tensor_sha256"] = documented_tensor_sha256(payload["state_dict"])
    torch.save(payload, path)
    return path


def rewrite_tensor_member(src: Path, dst: Path, change: Callable[[bytes], bytes]) -> str:
    """Copy the zip ``src`` to ``dst`` with the largest tensor record (``*/data/N``) passed
    through ``change``; every other member as is, the container valid (sizes and CRCs
    rewritten). Returns the member's name."""
    with zipfile.ZipFile(src) as zin:
        infos = zin.infolist()
        records = [i for i in infos if re.fullmatch(r"[^/]+/data/\d+", i.filename)]
        target = max(records, key=lambda i: i.file_size)
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
            for info in infos:
                raw = zin.read(info)
                zout.writestr(zipfile.ZipInfo(info.filename, info.date_time),
                              change(raw) if info is target else raw)
    return target.filename


def flip_64_bytes(raw: bytes) -> bytes:
    assert len(raw) >= 64, "the tensor record is too small for the test"
    start = (len(raw) - 64) // 2
    return raw[:start] + bytes(b ^ 0xFF for b in raw[start:start + 64]) + raw[start + 64:]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Any]:
    """A small model file, its bytes, payload, metadata and weights."""
    folder = tmp_path_factory.mktemp("model")
    sino, image = tiny_geometry()
    net = tiny_net()
    path = save_model(folder / "model.pt", net, {"sinogram_geometry": sino, "image_geometry": image,
                                                 "training_mode": "sequential"})
    payload = raw_payload(path)
    return {
        "folder": folder,
        "path": path,
        "bytes": path.read_bytes(),
        "payload": payload,
        "metadata": json.loads(payload["metadata_json"]),
        "state": {k: v.clone() for k, v in net.state_dict().items()},
    }


# ----------------------------------------------------------------------------- the format


def test_saved_file_carries_the_documented_checksums_and_schema(saved):
    payload = saved["payload"]
    assert payload["format_version"] == 2
    assert payload["tensor_sha256"] == documented_tensor_sha256(payload["state_dict"])
    assert payload["tensor_sha256"] == state_dict_sha256(saved["state"])
    assert payload["metadata_sha256"] == documented_metadata_sha256(payload["metadata_json"])
    assert payload["metadata_sha256"] == metadata_sha256(payload["metadata_json"])
    meta = saved["metadata"]
    assert meta["schema_version"] == 3 and meta["format_version"] == 2
    assert meta["network"]["start_rule"] == "count_matched"
    assert meta["network"]["beta_counts"] == "log_linear" and meta["network"]["beta_count_reference"] > 0
    assert saved["path"].with_suffix(".json").read_text() == payload["metadata_json"] + "\n"
    net, loaded_meta = load_model(saved["path"])
    assert same_weights(net.state_dict(), saved["state"])
    assert loaded_meta["schema_version"] == 3 and net.start_rule == "count_matched"
    assert net.beta_counts == "log_linear" and all(st.count_slope is not None for st in net.stages)


def test_bundled_model_is_format_version_2_with_its_json_copy():
    payload = raw_payload(BUNDLED_MODEL)
    assert payload["format_version"] == 2
    assert payload["tensor_sha256"] == documented_tensor_sha256(payload["state_dict"])
    assert payload["metadata_sha256"] == documented_metadata_sha256(payload["metadata_json"])
    assert BUNDLED_MODEL.with_suffix(".json").read_text() == payload["metadata_json"] + "\n"
    net, meta = load_model(BUNDLED_MODEL)
    assert meta["schema_version"] in (1, 2, 3) and net.num_stages == meta["num_stages"]
    assert net.start_rule == meta["network"].get("start_rule", "none")
    assert net.beta_counts == meta["network"].get("beta_counts", "none")


# ----------------------------------------------------------------------------- checksums


def test_64_flipped_bytes_in_tensor_data_are_detected(saved, tmp_path):
    bad = tmp_path / "flipped.pt"
    member = rewrite_tensor_member(saved["path"], bad, flip_64_bytes)
    # the container is valid and torch reads it: only the checksum can tell
    altered = raw_payload(bad)["state_dict"]
    assert not same_weights(altered, saved["state"]), member
    with pytest.raises(ModelFileError, match=r"corrupt or has been altered.*checksum of its tensors") as err:
        load_model(bad)
    assert str(bad) in str(err.value)
    assert re.search(r"expected sha256 [0-9a-f]{12}\.\.\., found [0-9a-f]{12}\.\.\.", str(err.value))


def test_cli_refuses_a_model_with_flipped_bytes(tmp_path):
    bad = tmp_path / "BAD.pt"
    rewrite_tensor_member(BUNDLED_MODEL, bad, flip_64_bytes)
    out = tmp_path / "OUT.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "sirf_fbsem", "reconstruct", str(BUNDLED_SCAN), "--model", str(bad),
         "--output", str(out), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "checksum" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_altered_metadata_or_tensors_with_the_old_checksums_are_refused(saved, tmp_path):
    payload = saved["payload"]
    text = payload["metadata_json"].replace('"num_stages": 2', '"num_stages": 1')
    assert text != payload["metadata_json"]
    bad = tmp_path / "meta.pt"
    torch.save(dict(payload, metadata_json=text), bad)  # checksums as they were
    with pytest.raises(ModelFileError, match="checksum of its metadata does not match") as err:
        load_model(bad)
    assert str(bad) in str(err.value)
    state = {k: v.clone() for k, v in payload["state_dict"].items()}
    state["stages.0.rho"] += 1.0
    torch.save(dict(payload, state_dict=state), bad)
    with pytest.raises(ModelFileError, match="checksum of its tensors does not match"):
        load_model(bad)
    torch.save({k: v for k, v in payload.items() if k != "tensor_sha256"}, bad)
    with pytest.raises(ModelFileError, match="has no checksum"):
        load_model(bad)


# ----------------------------------------------------------------------------- metadata validation


def test_empty_metadata_names_a_missing_field(saved, tmp_path):
    bad = write_payload(tmp_path / "empty.pt", saved["payload"], metadata={})
    with pytest.raises(ModelFileError, match=r"metadata field 'schema_version' is missing") as err:
        load_model(bad)
    assert str(bad) in str(err.value)


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def apply(meta: dict) -> None:
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return apply


def _delete(path: tuple) -> Callable[[dict], None]:
    def apply(meta: dict) -> None:
        node = meta
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return apply


FIELD_CASES = [
    (_delete(("network", "num_stages")), r"metadata field 'network\.num_stages' is missing"),
    (_set(("network", "num_stages"), "abc"), r"'network\.num_stages' must be a positive integer, got 'abc'"),
    (_set(("network", "num_subsets"), 0), r"'network\.num_subsets' must be a positive integer, got 0"),
    (_set(("network", "num_stages"), True), r"'network\.num_stages' must be a positive integer, got True"),
    (_set(("num_stages",), 3), r"'num_stages' is 3 but 'network\.num_stages' is 2"),
    (_delete(("num_subsets",)), r"'num_subsets' is missing"),
    (_set(("network", "beta_units"), "furlongs"), r"'network\.beta_units' must be one of 'normalised', 'absolute'"),
    (_set(("network", "beta_init"), -1), r"'network\.beta_init' must be a finite number >= 0"),
    (_set(("network", "shared_regulariser"), "yes"), r"'network\.shared_regulariser' must be true or false"),
    (_set(("network", "colour"), "blue"), r"'network' has unknown keys \['colour'\]"),
    (_set(("network",), [1, 2]), r"'network' must be a JSON object"),
    (_delete(("network", "regulariser_config", "kernel")), r"'network\.regulariser_config\.kernel' is missing"),
    (_set(("network", "regulariser_config", "kernel"), 4),
     r"'network\.regulariser_config\.kernel' must be a positive odd integer, got 4"),
    (_set(("network", "regulariser_config", "dims"), 3.0), r"'network\.regulariser_config\.dims' must be 2 or 3"),
    (_set(("network", "regulariser_config", "normalisation"), None),
     r"'network\.regulariser_config\.normalisation' must be one of"),
    (_set(("network", "regulariser_config"), "big"), r"'network\.regulariser_config' must be a JSON object"),
    (_delete(("sinogram_geometry",)), r"'sinogram_geometry' is missing"),
    (_delete(("sinogram_geometry", "scanner", "num_rings")), r"'sinogram_geometry\.scanner\.num_rings' is missing"),
    (_set(("sinogram_geometry", "num_views"), -1), r"'sinogram_geometry\.num_views' must be a positive integer"),
    (_set(("sinogram_geometry", "num_tangential_poss"), 10**12), r"'sinogram_geometry\.num_tangential_poss'"),
    (_set(("sinogram_geometry", "segments"), [[0, 1, 0, 1]]),
     r"'sinogram_geometry' is not a valid sinogram geometry: segment 0: min ring difference 1 > max"),
    (_set(("sinogram_geometry", "scanner", "inner_ring_radius_mm"), 0.0),
     r"'sinogram_geometry' is not a valid sinogram geometry: .*inner_ring_radius_mm must be > 0"),
    (_set(("sinogram_geometry", "scanner", "wheels"), 4), r"'sinogram_geometry' is not a valid sinogram geometry"),
    (_set(("image_geometry", "shape"), [1, 32]), r"'image_geometry\.shape' must be a list of 3 entries"),
    (_set(("image_geometry", "voxel_size_mm"), [4.0, 4.0, "x"]),
     r"'image_geometry\.voxel_size_mm\[2\]' must be a finite number"),
    (_set(("image_geometry", "voxel_size_mm"), [4.0, 4.0, 0.0]),
     r"'image_geometry' is not a valid image geometry: voxel sizes must be 3 positive lengths"),
    (_delete(("schema_version",)), r"'schema_version' is missing"),
    (_set(("schema_version",), 4), r"'schema_version' is 4, newer than this sirf_fbsem reads \(3\)"),
    (_set(("schema_version",), "2"), r"'schema_version' must be one of \(1, 2, 3\), got '2'"),
    (_delete(("network", "beta_counts")), r"'network\.beta_counts' is missing"),
    (_set(("network", "beta_counts"), "linear"), r"'network\.beta_counts'"),
    (_set(("network", "beta_count_reference"), 0.0), r"'network\.beta_count_reference' must be a number of counts > 0"),
    (_set(("network", "beta_count_reference"), "1e7"), r"'network\.beta_count_reference' must be a finite number"),
    (_set(("schema_version",), 2), r"'network' has unknown keys \['beta_count_reference', 'beta_counts'\]"),
    (_delete(("network", "start_rule")), r"'network\.start_rule' is missing"),
    (_set(("network", "start_rule"), "ones"), r"'network\.start_rule'"),
    (_set(("schema_version",), 1), r"'network' has unknown keys \['beta_count_reference', 'beta_counts', 'start_rule'\]"),
    (_delete(("projection_units",)), r"former units"),
    (_set(("projection_units",), ["mm"]), r"metadata field 'projection_units' is \['mm'\]"),
]


@pytest.mark.parametrize("mutate, message", FIELD_CASES, ids=[m for _, m in FIELD_CASES])
def test_malformed_metadata_field_is_named(saved, tmp_path, mutate, message):
    meta = copy.deepcopy(saved["metadata"])
    mutate(meta)
    bad = write_payload(tmp_path / "bad.pt", saved["payload"], metadata=meta)
    with pytest.raises(ModelFileError, match=message) as err:
        load_model(bad)
    assert str(err.value).startswith(f"model file {str(bad)!r}") or str(bad) in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("[]", "must be a JSON object, got list"),
    ('{"schema_version": NaN}', "not valid JSON"),
    ("{", "not valid JSON"),
])
def test_metadata_that_is_not_a_json_object_is_refused(saved, tmp_path, text, message):
    payload = dict(saved["payload"], metadata_json=text)
    bad = write_payload(tmp_path / "bad.pt", payload)
    with pytest.raises(ModelFileError, match=message):
        load_model(bad)


# ----------------------------------------------------------------------------- tensors


def test_tensor_of_the_wrong_shape_is_named(saved, tmp_path):
    key = "stages.1.regulariser.net.0.weight"
    state = {k: v.clone() for k, v in saved["state"].items()}
    assert tuple(state[key].shape) == (3, 1, 3, 3)
    state[key] = torch.zeros(3, 2, 3, 3)
    bad = write_payload(tmp_path / "shape.pt", saved["payload"], state=state)
    with pytest.raises(ModelFileError, match=re.escape(
            f"tensor {key!r} has shape (3, 2, 3, 3); the network config needs (3, 1, 3, 3)")) as err:
        load_model(bad)
    assert str(bad) in str(err.value)
    # and the other way round: the config changed, the tensors kept
    meta = copy.deepcopy(saved["metadata"])
    meta["network"]["regulariser_config"]["in_channels"] = 2
    bad = write_payload(tmp_path / "config.pt", saved["payload"], metadata=meta)
    expected = ("tensor 'stages.0.regulariser.net.0.weight' has shape (3, 1, 3, 3); "
                "the network config needs (3, 2, 3, 3)")
    with pytest.raises(ModelFileError, match=re.escape(expected)):
        load_model(bad)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("stages.1.rho"), r"tensors 'stages\.1\.rho' are missing"),
    (lambda s: s.update({"stages.2.rho": torch.tensor(0.0)}), r"tensors 'stages\.2\.rho' are unexpected"),
    (lambda s: s.update({"stages.0.rho": torch.tensor(1)}), r"tensor 'stages\.0\.rho' has dtype torch\.int64"),
    (lambda s: s.update({"stages.0.rho": torch.tensor(float("nan"))}), r"tensor 'stages\.0\.rho' contains NaN"),
    (lambda s: s.update({"stages.0.rho": torch.zeros(1)}),
     re.escape("tensor 'stages.0.rho' has shape (1,); the network config needs ()")),
])
def test_missing_unexpected_or_malformed_tensors_are_named(saved, tmp_path, change, message):
    state = {k: v.clone() for k, v in saved["state"].items()}
    change(state)
    bad = write_payload(tmp_path / "bad.pt", saved["payload"], state=state)
    with pytest.raises(ModelFileError, match=message):
        load_model(bad)


def test_network_config_that_cannot_be_built_is_refused(saved, tmp_path):
    meta = copy.deepcopy(saved["metadata"])
    meta["network"]["regulariser_config"]["channels"] = 10**15
    meta["network"]["regulariser_config"]["kernel"] = 10**15 + 1
    bad = write_payload(tmp_path / "huge.pt", saved["payload"], metadata=meta)
    with pytest.raises(ModelFileError, match="metadata field 'network'"):
        load_model(bad)
    meta = copy.deepcopy(saved["metadata"])
    meta["network"]["num_stages"] = meta["num_stages"] = 10**9
    bad = write_payload(tmp_path / "stages.pt", saved["payload"], metadata=meta)
    with pytest.raises(ModelFileError, match=r"'network\.num_stages' is 1000000000 but the file holds only"):
        load_model(bad)


def test_shared_regulariser_flag_must_match_the_tensors(saved, tmp_path):
    """Per-stage CNNs declared shared would load as the last stage's CNN for every stage."""
    meta = copy.deepcopy(saved["metadata"])
    meta["network"]["shared_regulariser"] = True
    bad = write_payload(tmp_path / "shared.pt", saved["payload"], metadata=meta)
    with pytest.raises(ModelFileError, match=r"'network\.shared_regulariser' is true, but tensor 'stages\.1\."):
        load_model(bad)


# ----------------------------------------------------------------------------- format version 1


def count_unaware_state(saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The saved weights without the count slopes (new in 0.9): a network as 0.2-0.8 had them."""
    return {k: v.clone() for k, v in saved["state"].items() if not k.endswith(".count_slope")}


def write_version_1(path: Path, saved: dict[str, Any]) -> Path:
    """A model file as sirf_fbsem 0.2.0 wrote it: no checksums, no schema_version, count-unaware
    betas (:func:`count_unaware_state`)."""
    meta = copy.deepcopy(saved["metadata"])
    del meta["schema_version"]
    del meta["network"]["start_rule"]  # new in 0.4
    del meta["network"]["beta_counts"], meta["network"]["beta_count_reference"]  # new in 0.9
    meta["format_version"] = 1
    text = json.dumps(meta, indent=2, sort_keys=True)
    torch.save({"format": "sirf_fbsem.fbsem_net", "format_version": 1, "metadata_json": text,
                "state_dict": count_unaware_state(saved)}, path)
    return path


def test_version_1_file_is_refused_and_the_suggested_upgrade_works(saved, tmp_path):
    old = write_version_1(tmp_path / "old model.pt", saved)
    before = old.read_bytes()
    with pytest.raises(ModelFileError, match="no checksum") as err:
        load_model(old)
    message = str(err.value)
    assert str(old) in message and "upgrade_model_file" in message
    # run the command the message suggests
    command = re.search(r'python -c "([^"]+)"', message)
    assert command, message
    subprocess.run([sys.executable, "-c", command.group(1)], cwd=tmp_path, check=True, timeout=120)
    new = tmp_path / "old model.v2.pt"
    assert new.is_file() and new.with_suffix(".json").is_file()
    assert old.read_bytes() == before  # the original is never touched
    net, meta = load_model(new)
    assert same_weights(net.state_dict(), count_unaware_state(saved))
    assert same_weights(raw_payload(new)["state_dict"], count_unaware_state(saved))
    assert meta["schema_version"] == 1 and meta["format_version"] == 2 and net.beta_counts == "none"
    assert new.with_suffix(".json").read_text() == raw_payload(new)["metadata_json"] + "\n"
    # never replaces an existing file, and a version 2 file needs no upgrade
    with pytest.raises(OutputPathError, match="exists"):
        upgrade_model_file(old)
    assert same_weights(load_model(new)[0].state_dict(), count_unaware_state(saved))
    with pytest.raises(ModelFileError, match="already in format version 2"):
        upgrade_model_file(new, tmp_path / "again.pt")


def test_upgrade_to_an_explicit_path_checks_the_file_first(saved, tmp_path):
    old = write_version_1(tmp_path / "old.pt", saved)
    dst = upgrade_model_file(old, tmp_path / "sub" / "new.pt")
    assert dst == tmp_path / "sub" / "new.pt"
    assert same_weights(load_model(dst)[0].state_dict(), count_unaware_state(saved))
    (tmp_path / "taken.json").write_text("mine")
    with pytest.raises(OutputPathError, match="taken.json"):
        upgrade_model_file(old, tmp_path / "taken.pt")
    assert (tmp_path / "taken.json").read_text() == "mine" and not (tmp_path / "taken.pt").exists()
    # a version 1 file with a malformed field is not upgraded
    payload = raw_payload(old)
    meta = json.loads(payload["metadata_json"])
    meta["network"]["num_stages"] = "two"
    torch.save(dict(payload, metadata_json=json.dumps(meta)), tmp_path / "broken.pt")
    with pytest.raises(ModelFileError, match=r"'network\.num_stages' must be a positive integer"):
        upgrade_model_file(tmp_path / "broken.pt")
    assert not (tmp_path / "broken.v2.pt").exists()


# ----------------------------------------------------------------------------- fuzzing


def outcome(path: Path, saved: dict[str, Any]) -> bool:
    """True if ``load_model`` accepts ``path`` (then with the original weights), False if it
    refuses with a SirfFbsemError; any other exception fails the test."""
    try:
        net, _ = load_model(path)
    except SirfFbsemError as err:
        note(f"refused: {err}")
        return False
    assert same_weights(net.state_dict(), saved["state"]), "a damaged file loaded other weights"
    return True


FUZZ = settings(max_examples=60, deadline=None)


@FUZZ
@given(data=st.data())
def test_random_byte_flips_never_escape_as_other_errors(saved, data):
    raw = bytearray(saved["bytes"])
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1, max_size=8))
    for pos, mask in flips:
        raw[pos] ^= mask
    path = saved["folder"] / "flipped.pt"
    path.write_bytes(bytes(raw))
    loaded = outcome(path, saved)
    if bytes(raw) == saved["bytes"]:
        assert loaded
    elif loaded:  # flips the zip reader ignores (padding, timestamps): the payload itself is intact
        payload = raw_payload(path)
        assert payload["metadata_json"] == saved["payload"]["metadata_json"]


@FUZZ
@given(data=st.data())
def test_truncated_files_are_refused(saved, data):
    n = data.draw(st.integers(0, len(saved["bytes"]) - 1))
    path = saved["folder"] / "truncated.pt"
    path.write_bytes(saved["bytes"][:n])
    assert not outcome(path, saved)


def json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) in a JSON tree, the root excluded."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(json_paths(child, prefix + (key,)))
    return out


def kind(value: Any) -> str:
    """JSON type, numbers as one kind (an int where a float is expected is fine)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    # no subnormals: a library compiled with -ffast-math may have switched them off in this process
    | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
#: top-level fields load_model needs; everything inside them is type-checked
REQUIRED = {"schema_version", "projection_units", "sinogram_geometry", "image_geometry", "network", "num_stages",
            "num_subsets"}
#: entries the geometry descriptions may leave out (their defaults apply)
OPTIONAL = {("sinogram_geometry", "num_tof_bins"), ("image_geometry", "origin_mm")} | {
    ("sinogram_geometry", "scanner", k)
    for k in ("view_offset_deg", "max_num_non_arccorrected_bins", "default_num_arccorrected_bins")
}


@FUZZ
@given(data=st.data())
def test_random_metadata_mutations_are_validated(saved, data):
    meta = copy.deepcopy(saved["metadata"])
    path = data.draw(st.sampled_from(json_paths(meta)))
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    action = data.draw(st.sampled_from(["delete", "retype", "nest", "revalue", "add key"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "retype":
        parent[path[-1]] = data.draw(JSON_VALUES.filter(lambda v: kind(v) != kind(old)))
    elif action == "nest":
        parent[path[-1]] = data.draw(st.sampled_from([[old], {"value": old}]))
    elif action == "revalue":
        parent[path[-1]] = data.draw(JSON_VALUES)
    elif isinstance(old, dict):
        old[data.draw(st.text(max_size=6))] = data.draw(JSON_VALUES)
    else:
        parent[path[-1]] = {"extra": old}
    note(f"{action} at {path}: {old!r} -> {parent.get(path[-1], '<deleted>') if isinstance(parent, dict) else ''}")
    bad = write_payload(saved["folder"] / "meta.pt", saved["payload"], metadata=meta)
    loaded = outcome(bad, saved)
    in_required = path[0] in REQUIRED
    must_fail = in_required and (
        action in ("retype", "nest") or (action == "delete" and path not in OPTIONAL)
    )
    if must_fail:
        assert not loaded, f"{action} at {path} was accepted"


@FUZZ
@given(data=st.data())
def test_random_tensor_mutations_are_refused(saved, data):
    state = {k: v.clone() for k, v in saved["state"].items()}
    key = data.draw(st.sampled_from(sorted(state)))
    action = data.draw(st.sampled_from(["delete", "rename", "grow", "add dim", "integer", "extra"]))
    t = state[key]
    if action == "delete":
        del state[key]
    elif action == "rename":
        state[key + data.draw(st.sampled_from([".x", "_", "0"]))] = state.pop(key)
    elif action == "grow":
        state[key] = torch.zeros([n + 1 for n in t.shape] or [1])
    elif action == "add dim":
        state[key] = t.unsqueeze(0)
    elif action == "integer":
        state[key] = t.to(torch.int32)
    else:
        state[data.draw(st.text(min_size=1, max_size=12))] = torch.zeros(2)
    note(f"{action} {key}")
    bad = write_payload(saved["folder"] / "tensors.pt", saved["payload"], state=state)
    assert not outcome(bad, saved)
