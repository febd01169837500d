"""Property-based fuzzing of the readers (hypothesis): damaged headers and data files.

Every reader, given a mutated header (lines dropped, duplicated or swapped, values and keys
replaced by random text, numbers, negative, huge or NaN values, garbage and non-UTF-8 bytes,
truncation) or a mutated data file (truncated, random bytes, random 32-bit words), must
either return or raise an instance of :class:`sirf_fbsem.errors.SirfFbsemError` whose
message names the file; warnings are allowed. Never a ``KeyError``, ``IndexError``,
``struct.error``, ``TypeError``, ``UnicodeDecodeError``, ``OverflowError``, ``MemoryError``,
numpy error or ``ZeroDivisionError``. A header asking for a gigantic array must be refused
from the data file's size before anything is allocated (checked with ``tracemalloc``).

The base files are built here (the bundled ``test_data`` phantom, a hand-written PETLINK
header with synthetic words, a synthetic ECAT8 norm); the real mMR listmode header from
../shared/data is fuzzed too when present. Examples are derandomised (reproducible in CI);
set ``SIRF_FBSEM_FUZZ_EXAMPLES`` (and ``SIRF_FBSEM_FUZZ_RANDOM=1``) for longer, random runs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import tracemalloc
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sirf_fbsem.errors import InputError, SirfFbsemError
from sirf_fbsem.geometry import SinogramGeometry, scanner_preset
from sirf_fbsem.io import ecat8_norm, interfile, listmode, mumap

ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = ROOT / "test_data"
SHARED = ROOT.parent / "shared" / "data"
REAL_LM_HDR = SHARED / "stir" / "recon_test_pack" / "PET_ACQ_small.l.hdr.STIR"
MMR = scanner_preset("Siemens_mMR")

# Floats are drawn without subnormals: a library built with -ffast-math (SIRF, when another test imported it)
# can switch the process to flush-to-zero, where hypothesis refuses to draw them. (The readers' own checks
# work on bit patterns, so they do not depend on that mode.)
FUZZ = settings(
    max_examples=int(os.environ.get("SIRF_FBSEM_FUZZ_EXAMPLES", "80")),
    deadline=None,
    derandomize=os.environ.get("SIRF_FBSEM_FUZZ_RANDOM") != "1",
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- mutations
SPECIAL_VALUES = [
    "", " ", "0", "-0", "1", "-1", "2", "-7", "3.5", "0.0001", "1e9", "1000000000", "-1000000000", "4294967296",
    "99999999999999999999", "1e300", "1e999", "-1e999", "nan", "NaN", "inf", "-inf", "Infinity", "sNaN",
    "{}", "{", "}", "{1,2,3}", "{0}", "{-1,-1}", "{1e9}", "{ 5,11,15}", "{1,,2}", "1 ; 2", "0x10", "1_000",
    "LITTLEENDIAN", "BIGENDIAN", "float", "signed integer", "unsigned integer", "view", "segment",
    "axial coordinate", "tangential coordinate", "x", "z", ";", "\\", ":=", "Siemens mMR", "2008", "PRT-1",
    "2017:03:27", "99:99:99", "9999999999:1:1", "/nonexistent/file.s", "phantom_scan.hs", ".", "..",
]
VALUES = st.one_of(
    st.sampled_from(SPECIAL_VALUES),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False).map(repr),
    st.text(max_size=24),
)
GARBAGE = st.one_of(st.binary(min_size=1, max_size=24),
                    st.sampled_from([b"\x00", b"\xff\xfe", b"\xc3\x28", b"\xef\xbb\xbf", b"\r", b"\\", b"\x80" * 5]))


@st.composite
def mutated_text(draw, text: bytes) -> bytes:
    """``text`` (a header) after 1 to 4 random line, key, value or byte mutations."""
    lines = text.split(b"\n")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["value", "value", "value", "key", "drop", "dup", "swap", "garbage", "truncate",
                                   "insert"]))
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        if not lines:
            lines = [b""]
        line = lines[i]
        if op == "value" and b":=" in line:
            key = line.split(b":=", 1)[0]
            lines[i] = key + b":= " + draw(VALUES).encode("utf-8", "surrogatepass")
        elif op == "key" and b":=" in line:
            value = line.split(b":=", 1)[1]
            other = draw(st.one_of(st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
                                   st.sampled_from([ln.split(b":=", 1)[0] for ln in lines if b":=" in ln] or [b"x"])))
            lines[i] = other + b":=" + value
        elif op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, line)
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "garbage":
            pos = draw(st.integers(0, len(line)))
            lines[i] = line[:pos] + draw(GARBAGE) + line[pos:]
        elif op == "insert":
            lines.insert(i, draw(st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass"))))
        elif op == "truncate":
            joined = b"\n".join(lines)
            return joined[: draw(st.integers(0, len(joined)))]
    return b"\n".join(lines)


@st.composite
def mutated_data(draw, size: int) -> tuple[str, int, int]:
    """A data-file mutation: (kind, position, seed) applied by :func:`apply_data_mutation`."""
    kind = draw(st.sampled_from(["truncate", "truncate_odd", "append", "overwrite", "random_all", "empty"]))
    return kind, draw(st.integers(0, max(size - 1, 0))), draw(st.integers(0, 2**32 - 1))


def apply_data_mutation(path: Path, mutation: tuple[str, int, int]) -> None:
    kind, pos, seed = mutation
    raw = bytearray(path.read_bytes())
    pos = pos % max(len(raw), 1)
    rng = np.random.default_rng(seed)
    if kind == "truncate":
        raw = raw[:pos]
    elif kind == "truncate_odd":  # a length that is not a multiple of 4
        raw = raw[: (pos // 4) * 4 + 1 + seed % 3]
    elif kind == "append":
        raw += rng.integers(0, 256, 1 + seed % 7, dtype=np.uint8).tobytes()
    elif kind == "overwrite":
        n = min(len(raw) - pos, 1 + seed % 4096)
        raw[pos : pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == "random_all":
        raw = bytearray(rng.integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    elif kind == "empty":
        raw = bytearray()
    path.write_bytes(bytes(raw))


# --------------------------------------------------------------------------- the property
def expect_clean_outcome(call: Callable[[], object], *names: str) -> BaseException | None:
    """Run ``call``: it returns, or raises a SirfFbsemError whose message names one of ``names``
    (file names). Warnings are allowed. Anything else propagates and fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except SirfFbsemError as err:
        msg = str(err)
        assert msg.strip(), f"{type(err).__name__} without a message"
        assert any(n in msg for n in names), f"{type(err).__name__} names none of {names}: {msg}"
        return err
    return None


@contextmanager
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sirf_fbsem_fuzz_") as d:
        yield Path(d)


# --------------------------------------------------------------------------- base files
SINO_HDR = (TEST_DATA / "phantom_scan.hs").read_bytes()
IMAGE_HDR = (TEST_DATA / "phantom_truth.hv").read_bytes()


def _copy_sinogram(dest: Path, header: bytes | None = None) -> Path:
    shutil.copyfile(TEST_DATA / "phantom_scan.s", dest / "phantom_scan.s")
    (dest / "phantom_scan.hs").write_bytes(SINO_HDR if header is None else header)
    return dest / "phantom_scan.hs"


def _copy_image(dest: Path, header: bytes | None = None) -> Path:
    shutil.copyfile(TEST_DATA / "phantom_truth.v", dest / "phantom_truth.v")
    (dest / "phantom_truth.hv").write_bytes(IMAGE_HDR if header is None else header)
    return dest / "phantom_truth.hv"


#: a minimal PETLINK header written here (the keys the reader uses), for runs without ../shared/data
MINIMAL_LM_HDR = b"""!INTERFILE:=
!originating system:=2008
%SMS-MI header name space:=PETLINK bin address
!GENERAL DATA:=
!data offset in bytes:=0
name of data file := fuzz.l
%study date (yyyy:mm:dd):=2020:01:02
%study time (hh:mm:ss GMT+00:00):=10:11:12
isotope name:=F-18
isotope gamma halflife (sec):=6586.2
image duration (sec):=900
%total listmode word counts:=21
number of rings:=64
%LM event and tag words format (bits):=32
%timing tagwords interval (msec):=1
%axial compression:=1
%maximum ring difference:=60
%number of projections:=344
%number of views:=252
%number of segments :=121
%segment table :={64,63,63}
!END OF INTERFILE:=
"""
LM_LAYOUT = listmode.ListmodeLayout(64, 504, 60, 252, 344)


def _lm_words() -> np.ndarray:
    ws = []
    for t in range(5):
        ws += [listmode.encode_time_tag(t), listmode.encode_event(0, 10 + t, 5, 0, LM_LAYOUT),
               listmode.encode_event(1, 3, 7, -3, LM_LAYOUT, prompt=False), 0xA0000000 | t]
    return np.asarray(ws + [listmode.encode_time_tag(5)], dtype="<u4")


LM_HEADERS = [MINIMAL_LM_HDR]
if REAL_LM_HDR.is_file():
    LM_HEADERS.append(REAL_LM_HDR.read_bytes().replace(b"small_listmode_file.l", b"fuzz.l"))


def _small_mmr_geometry() -> SinogramGeometry:
    """The mMR with one span-11 segment, 2 views (mash 126) and 8 tangential positions: tiny arrays."""
    return SinogramGeometry.from_span(MMR, span=11, max_ring_diff=5, view_mash_factor=126, num_tangential_poss=8)


SMALL_MMR = _small_mmr_geometry()


def _write_norm(dest: Path, header: bytes | None = None) -> Path:
    """A synthetic mMR ECAT8 norm (components 1-4 only; smooth positive values) and its header."""
    nr, nd, T = 64, 504, 344
    rng = np.random.default_rng(7)
    comps = [1 + 0.1 * rng.random((2 * nr - 1) * T), 1 + 0.1 * rng.random(T * 9), 1 + 0.1 * rng.random(nr * nd),
             1 + 0.1 * rng.random(837)]
    offsets = np.cumsum([0] + [4 * c.size for c in comps])[:-1]
    (dest / "fuzz.n").write_bytes(b"".join(c.astype("<f4").tobytes() for c in comps))
    sizes = [f"{{{T},{2 * nr - 1}}}", f"{{9,{T}}}", f"{{{nd},{nr}}}", "{837}"]
    text = ("!INTERFILE:=\n!originating system:=2008\n!name of data file:=fuzz.n\n"
            "image data byte order:=LITTLEENDIAN\nnumber format:=float\nnumber of bytes per pixel:=4\n"
            "%number of normalization components:=4\n"
            + "".join(f"data offset in bytes [{i}]:={o}\n" for i, o in enumerate(offsets, start=1))
            + "".join(f"%matrix size [{i}]:={s}\n" for i, s in enumerate(sizes, start=1))
            + "%axial compression:=11\n%maximum ring difference:=60\nnumber of rings:=64\n!END OF INTERFILE:=\n")
    (dest / "fuzz.n.hdr").write_bytes(text.encode() if header is None else header)
    return dest / "fuzz.n.hdr"


with tempfile.TemporaryDirectory() as _d:
    NORM_HDR = _write_norm(Path(_d)).read_bytes()


# --------------------------------------------------------------------------- the base files read cleanly
@pytest.mark.filterwarnings("ignore:listmode file .* holds 21 words")  # the real header counts the full scan
def test_base_files_read_cleanly():
    with folder() as d:
        g, y = interfile.read_projdata(_copy_sinogram(d))
        assert y.shape == g.shape and y.sum() > 0
        geom, x = interfile.read_image(_copy_image(d))
        assert x.shape == geom.shape
        np.asarray(_lm_words()).tofile(d / "fuzz.l")
        for text in LM_HEADERS:
            (d / "fuzz.l.hdr").write_bytes(text)
            p, dl, info = listmode.histogram_listmode(d / "fuzz.l.hdr", SMALL_MMR, progress=False)
            assert info.prompts == 5 and info.delayeds == 5
        norm = ecat8_norm.read_ecat8_norm(_write_norm(d))
        assert np.isfinite(norm.efficiency_sinogram(SMALL_MMR)).all()


# --------------------------------------------------------------------------- Interfile
@FUZZ
@given(header=mutated_text(SINO_HDR))
def test_sinogram_header_mutations(header):
    with folder() as d:
        hs = _copy_sinogram(d, header)
        expect_clean_outcome(lambda: interfile.read_projdata(hs, allow_negative=True), "phantom_scan")
        expect_clean_outcome(lambda: interfile.sinogram_geometry_from_header(hs), "phantom_scan")


@FUZZ
@given(header=mutated_text(IMAGE_HDR))
def test_image_header_mutations(header):
    with folder() as d:
        hv = _copy_image(d, header)
        expect_clean_outcome(lambda: interfile.read_image(hv), "phantom_truth")
        expect_clean_outcome(lambda: mumap.read_mu_map(hv, check_units=False), "phantom_truth")


@FUZZ
@given(mutation=mutated_data(433152), which=st.sampled_from(["sinogram", "image"]),
       order=st.sampled_from([b"LITTLEENDIAN", b"BIGENDIAN", None]))
def test_interfile_data_mutations(mutation, which, order):
    with folder() as d:
        if which == "sinogram":
            path, data, read = _copy_sinogram(d), d / "phantom_scan.s", interfile.read_projdata
        else:
            path, data, read = _copy_image(d), d / "phantom_truth.v", interfile.read_image
        if order is not None:
            path.write_bytes(path.read_bytes().replace(b"LITTLEENDIAN", order))
        apply_data_mutation(data, mutation)
        expect_clean_outcome(lambda: read(path), path.stem)


SIZE_KEYS = {  # header -> keys whose value sizes an array
    "sinogram": [b"!matrix size [1]", b"!matrix size [3]", b"!matrix size [2]", b"Number of rings",
                 b"Number of detectors per ring", b"Maximum number of non-arc-corrected bins"],
    "image": [b"!matrix size [1]", b"!matrix size [2]", b"!matrix size [3]", b"number of time frames"],
}


@FUZZ
@given(which=st.sampled_from(["sinogram", "image"]), key_index=st.integers(0, 5),
       value=st.sampled_from([10**6, 10**9, 2**31, 2**40, 10**17, 3 * 10**17]))
def test_gigantic_declared_sizes_are_refused_before_allocating(which, key_index, value):
    with folder() as d:
        path = _copy_sinogram(d) if which == "sinogram" else _copy_image(d)
        keys = SIZE_KEYS[which]
        key = keys[key_index % len(keys)]
        lines = path.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            if line.split(b":=")[0].strip().lower() == key.lower():
                head, _, old = line.partition(b":=")
                new = f"{{ 5,11,{value},11,5}}" if b"{" in old else str(value)
                lines[i] = head + b":= " + new.encode()
        path.write_bytes(b"\n".join(lines))
        read = interfile.read_projdata if which == "sinogram" else interfile.read_image
        tracemalloc.start()
        try:
            err = expect_clean_outcome(lambda: read(path), path.stem)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        if b"matrix size" in key:  # the data file cannot hold that many values
            assert isinstance(err, InputError), f"{key!r} := {value} was accepted"
            assert "matrix size" in str(err)
        assert peak < 64 * 2**20, f"{key!r} := {value}: {peak / 2**20:.0f} MiB allocated before refusing"


# --------------------------------------------------------------------------- listmode
@FUZZ
@given(header=st.sampled_from(range(len(LM_HEADERS))).flatmap(lambda i: mutated_text(LM_HEADERS[i])))
def test_listmode_header_mutations(header):
    with folder() as d:
        _lm_words().tofile(d / "fuzz.l")
        hdr = d / "fuzz.l.hdr"
        hdr.write_bytes(header)
        names = ("fuzz.l", str(d))
        expect_clean_outcome(lambda: listmode.read_listmode_header(hdr), *names)
        expect_clean_outcome(lambda: listmode.scan_listmode(hdr), *names)
        expect_clean_outcome(lambda: listmode.histogram_listmode(hdr, SMALL_MMR, progress=False), *names)


WORDS = st.lists(st.one_of(st.integers(0, 2**32 - 1),
                           st.integers(0, 2**29 - 1).map(lambda t: 0x80000000 | t),  # time tags
                           st.integers(0, 2**30 - 1)), max_size=200)  # events
TIMES = st.one_of(st.none(), st.tuples(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
                                       st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)),
                  st.tuples(*[st.integers(-5, 2000).map(lambda t: t / 1000)] * 2))


@FUZZ
@given(words=WORDS, extra=st.binary(max_size=3), interval=TIMES, offset=st.sampled_from([0, 3, 8, 10**6]))
def test_listmode_data_mutations(words, extra, interval, offset):
    with folder() as d:
        data = d / "fuzz.l"
        data.write_bytes(np.asarray(words, dtype="<u4").tobytes() + extra)
        hdr = d / "fuzz.l.hdr"
        hdr.write_bytes(MINIMAL_LM_HDR.replace(b"!data offset in bytes:=0", b"!data offset in bytes:=%d" % offset))
        names = ("fuzz.l",)
        expect_clean_outcome(lambda: listmode.scan_listmode(hdr), *names)
        expect_clean_outcome(lambda: listmode.scan_listmode(data), *names)
        expect_clean_outcome(lambda: listmode.histogram_listmode(hdr, SMALL_MMR, interval, progress=False), *names)


# --------------------------------------------------------------------------- ECAT8 norm
@FUZZ
@given(header=mutated_text(NORM_HDR), mutation=st.one_of(st.none(), mutated_data(321_000)))
def test_ecat8_norm_mutations(header, mutation):
    with folder() as d:
        hdr = _write_norm(d, header)
        if mutation is not None:
            apply_data_mutation(d / "fuzz.n", mutation)

        def read_and_use():
            norm = ecat8_norm.read_ecat8_norm(hdr)
            norm.efficiency_sinogram(SMALL_MMR)

        expect_clean_outcome(read_and_use, "fuzz.n")


# --------------------------------------------------------------------------- the acquisition loader
@FUZZ
@given(header=mutated_text(SINO_HDR))
def test_load_acquisition_on_mutated_sinograms(header):
    from sirf_fbsem.acquisition import load_acquisition

    with folder() as d:
        hs = _copy_sinogram(d, header)
        expect_clean_outcome(lambda: load_acquisition(hs, progress=False), "phantom_scan")


@pytest.mark.parametrize("missing", ["sinogram", "image", "listmode", "norm"])
def test_missing_data_files_are_file_not_found_errors_naming_header_key_and_path(missing):
    with folder() as d:
        if missing == "sinogram":
            hdr, data, read = _copy_sinogram(d), d / "phantom_scan.s", interfile.read_projdata
        elif missing == "image":
            hdr, data, read = _copy_image(d), d / "phantom_truth.v", interfile.read_image
        elif missing == "listmode":
            hdr, data, read = d / "fuzz.l.hdr", d / "fuzz.l", listmode.read_listmode_header
            hdr.write_bytes(MINIMAL_LM_HDR)
        else:
            hdr, data, read = _write_norm(d), d / "fuzz.n", ecat8_norm.read_ecat8_norm
        data.unlink(missing_ok=True)
        with pytest.raises(InputError) as err:
            read(hdr)
        assert isinstance(err.value, FileNotFoundError)
        msg = str(err.value)
        assert str(hdr) in msg and "name of data file" in msg and data.name in msg and "does not exist" in msg


# --------------------------------------------------------------------------- what the fuzzing found (regressions)
def _edited(text: bytes, old: bytes, new: bytes) -> bytes:
    assert old in text, old
    return text.replace(old, new)


@pytest.mark.parametrize("old,new,key", [
    (b"number of dimensions := 4", b"number of dimensions := 100000000000000000", "number of dimensions"),  # hung
    (b"!matrix size [1] := 48", b"!matrix size [1] := 1000000000", "matrix size [1]"),  # allocated 7.5 GiB
    (b"!matrix size [3] := 48", b"!matrix size [3] := 2147483648", "matrix size [3]"),  # allocated 16 GiB
    (b"Number of rings                          := 8", b"Number of rings := 1e400", "number of rings"),
    (b"number of time frames := 1", b"number of time frames := 1e17", "number of time frames"),
])
def test_found_by_fuzzing_interfile(old, new, key):
    with folder() as d:
        hs = _copy_sinogram(d, _edited(SINO_HDR, old, new))
        err = expect_clean_outcome(lambda: interfile.read_projdata(hs), "phantom_scan")
        assert isinstance(err, InputError) and key in str(err)


@pytest.mark.parametrize("old,new", [
    (b"%maximum ring difference:=60", b"%maximum ring difference:=inf"),  # OverflowError
    (b"%maximum ring difference:=60", b"%maximum ring difference:=nan"),  # ValueError from int(nan)
    (b"%total listmode word counts:=21", b"%total listmode word counts:=-inf"),
    (b"%segment table :={64,63,63}", b"%segment table :={64,nan}"),
    (b"%study date (yyyy:mm:dd):=2020:01:02", b"%study date (yyyy:mm:dd):=9999999999:1:1"),
    (b"%number of views:=252", b"%number of views:=1e300"),
    (b"!data offset in bytes:=0", b"!data offset in bytes:=-8"),
])
def test_found_by_fuzzing_listmode_header(old, new):
    with folder() as d:
        _lm_words().tofile(d / "fuzz.l")
        hdr = d / "fuzz.l.hdr"
        hdr.write_bytes(_edited(MINIMAL_LM_HDR, old, new))
        expect_clean_outcome(lambda: listmode.histogram_listmode(hdr, SMALL_MMR, progress=False), "fuzz.l")


@pytest.mark.parametrize("interval", [(0.0, 1.797693134862316e305), (0.0, 5e-324), (0.0, 0.0), (np.nan, 1.0),
                                      (-np.inf, np.inf)])
def test_found_by_fuzzing_listmode_time_interval(interval):
    """Plain ValueError / OverflowError before; now a ListmodeError naming the file, or a warning."""
    with folder() as d:
        _lm_words().tofile(d / "fuzz.l")
        (d / "fuzz.l.hdr").write_bytes(MINIMAL_LM_HDR)
        err = expect_clean_outcome(
            lambda: listmode.histogram_listmode(d / "fuzz.l.hdr", SMALL_MMR, interval, progress=False), "fuzz.l")
        assert err is None or isinstance(err, listmode.ListmodeError)


@pytest.mark.parametrize("old,new", [
    (b"%axial compression:=11", b"%axial compression:=0"),  # GeometryError without the file's name
    (b"%maximum ring difference:=60", b"%maximum ring difference:=63"),
    (b"%number of normalization components:=4", b"%number of normalization components:=inf"),  # OverflowError
    (b"data offset in bytes [4]:=", b"data offset in bytes [4]:=-"),  # negative offset
])
def test_found_by_fuzzing_ecat8_norm(old, new):
    with folder() as d:
        hdr = _write_norm(d, _edited(NORM_HDR, old, new))
        err = expect_clean_outcome(lambda: ecat8_norm.read_ecat8_norm(hdr), "fuzz.n")
        assert isinstance(err, ecat8_norm.NormError)
