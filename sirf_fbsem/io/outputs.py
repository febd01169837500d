"""Output safety: what may be written where, checked before any heavy work.

The rule (README, "Errors and safety"): **sirf_fbsem never deletes or replaces a file it did
not write.** An output path is one of

- *absent*: written (atomically, :mod:`sirf_fbsem.io.atomic`);
- *ours*: an earlier output of sirf_fbsem, recognised by a mark every writer leaves: the NIfTI
  header's ``intent_name`` (:data:`NIFTI_MARK`), the comment line :data:`INTERFILE_MARK` in
  Interfile headers, the PNG text
  chunk ``Software: sirf_fbsem ...``, the key ``"written_by": "sirf_fbsem"`` in JSON files, and
  for a DICOM series directory its manifest :data:`SERIES_MANIFEST`, which lists the series'
  files. The command line replaces it only with ``--overwrite`` (a batch skips it instead);
  the library writers replace it (as SIRF's ``write`` does);
- *foreign*: anything else (a user's file, a directory holding other files, a file where a
  directory is wanted or the reverse): refused, with or without ``--overwrite``.

:func:`check_location` finds, before the run, outputs that cannot be written at all: a parent
under a regular file, a read-only file system or directory, a pseudo file system, too little
free space for the estimated size. All errors are :class:`~sirf_fbsem.errors.OutputPathError`
and name the user's path and the flag that gave it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from ..errors import OutputPathError

__all__ = [
    "OutputKind",
    "Ownership",
    "PlannedOutput",
    "NIFTI_MARK",
    "INTERFILE_MARK",
    "PNG_SOFTWARE",
    "SERIES_MANIFEST",
    "JSON_MARK",
    "MODEL_MARK",
    "absolute",
    "ownership",
    "check_replaceable",
    "check_location",
    "check_planned",
    "dicom_series_files",
    "interfile_data_path",
    "check_run_directory",
]

OutputKind = Literal["nifti", "interfile_image", "png", "json", "dicom_series", "model"]  # interfile_image: .hv or .hs
Ownership = Literal["absent", "ours", "foreign"]

#: NIfTI-1 ``intent_name`` (16 bytes at most) of every NIfTI file the package writes
NIFTI_MARK = b"sirf_fbsem"
#: comment line in every Interfile header the package writes
INTERFILE_MARK = "; written by sirf_fbsem"
#: first word of the PNG ``Software`` text chunk of every PNG the package writes
PNG_SOFTWARE = "sirf_fbsem"
#: manifest in every DICOM series directory the package writes: {"written_by", "files", ...}
SERIES_MANIFEST = "sirf_fbsem_series.json"
#: ``"written_by"`` value in JSON outputs (reports, summaries, manifests)
JSON_MARK = "sirf_fbsem"
#: ``"format"`` entry of every model file the package writes (:data:`sirf_fbsem.model.io.MODEL_FORMAT`)
MODEL_MARK = "sirf_fbsem.fbsem_net"

#: slack added to size estimates for headers, file-system blocks and temporary copies
_SPACE_MARGIN_BYTES = 1 << 20


@dataclass(frozen=True)
class PlannedOutput:
    """An output a command will write.

    Attributes:
        path: the user's path, made absolute (:func:`absolute`).
        kind: what it is (decides how an earlier output of the package is recognised).
        flag: how the user named it (``"--output"``, ``"--dicom"``, ...), for messages.
        estimated_bytes: its expected size (0: unknown), for the free-space check.
        replace_own: an earlier output of the package there is always replaced (a batch's
            summary, rewritten by every run), without ``--overwrite``.
    """

    path: Path
    kind: OutputKind
    flag: str
    estimated_bytes: int = 0
    replace_own: bool = False


def absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalised (``.`` and ``..`` resolved lexically, links kept):
    ``Path('.')`` becomes the working directory's path, which has a name."""
    return Path(os.path.abspath(os.fspath(path)))


def interfile_data_path(header: Path) -> Path:
    """The data file the package writes beside an Interfile header (``x.hv`` -> ``x.v``,
    ``x.hs`` -> ``x.s``)."""
    return header.with_suffix(".s" if header.suffix.lower() == ".hs" else ".v")


def _nifti_is_ours(path: Path) -> bool:
    try:
        import nibabel as nib

        header = nib.load(str(path)).header
        return bytes(header.get("intent_name", b"")).rstrip(b"\0") == NIFTI_MARK
    except Exception:  # not a readable NIfTI file: not ours (never replaced)
        return False


def _interfile_is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("ascii", "replace").splitlines()
    except OSError:
        return False
    return INTERFILE_MARK in (line.strip() for line in head[:4])


def _png_is_ours(path: Path) -> bool:
    """True when the PNG's ``Software`` tEXt chunk starts with :data:`PNG_SOFTWARE`."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            for _ in range(64):  # text chunks come before the image data in matplotlib's PNGs
                head = f.read(8)
                if len(head) < 8:
                    return False
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind == b"IDAT" or kind == b"IEND" or length > 1 << 20:
                    return False
                body = f.read(length)
                f.read(4)  # CRC
                if kind == b"tEXt":
                    key, _, value = body.partition(b"\0")
                    if key == b"Software" and value.decode("latin-1").split(" ")[0] == PNG_SOFTWARE:
                        return True
    except OSError:
        return False
    return False


def _json_is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(64 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("written_by") == JSON_MARK


def _model_is_ours(path: Path) -> bool:
    """True for a model file the package wrote (:func:`sirf_fbsem.model.io.save_model`: a
    weights-only torch file with its ``format`` tag) whose ``.json`` copy beside it is absent or
    its metadata (a JSON object with ``sirf_fbsem_version``): the two are written, and replaced, together."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no tensor read
    except Exception:  # not a readable torch file, or one with pickled objects: not ours (never replaced)
        return False
    if not (isinstance(payload, dict) and payload.get("format") == MODEL_MARK):
        return False
    sidecar = path.with_suffix(".json")
    if not os.path.lexists(sidecar):
        return True
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return sidecar.is_file() and not sidecar.is_symlink() and isinstance(meta, dict) and "sirf_fbsem_version" in meta


def dicom_series_files(target: Path) -> list[str] | None:
    """Names of the files of the package's series in ``target`` (manifest included), when the
    directory holds exactly that series and nothing else; ``[]`` for an empty directory; None
    when it holds anything else (or the manifest is unreadable)."""
    try:
        names = sorted(os.listdir(target))
    except OSError:
        return None
    if not names:
        return []
    if SERIES_MANIFEST not in names:
        return None
    try:
        manifest = json.loads((target / SERIES_MANIFEST).read_text())
        files = manifest["files"] if manifest.get("written_by") == JSON_MARK else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(files, list) or not all(isinstance(n, str) and Path(n).name == n for n in files):
        return None
    listed = set(files) | {SERIES_MANIFEST}
    if set(names) - listed or any((target / n).is_dir() for n in names):
        return None
    return names


def ownership(path: Path, kind: OutputKind) -> Ownership:
    """Whether ``path`` is absent, an earlier output of the package, or something else."""
    if kind == "dicom_series":
        if not os.path.lexists(path):
            return "absent"
        if not path.is_dir() or path.is_symlink():
            return "foreign"
        files = dicom_series_files(path)
        if files == []:
            return "absent"  # an empty directory is written into, never replaced
        return "ours" if files else "foreign"
    if kind == "interfile_image":
        data = interfile_data_path(path)
        if not os.path.lexists(path):
            return "foreign" if os.path.lexists(data) else "absent"
        if not path.is_file() or path.is_symlink() or not _interfile_is_ours(path):
            return "foreign"
        return "ours" if not os.path.lexists(data) or (data.is_file() and not data.is_symlink()) else "foreign"
    if not os.path.lexists(path):
        return "absent"
    if not path.is_file() or path.is_symlink():
        return "foreign"
    recognise = {"nifti": _nifti_is_ours, "png": _png_is_ours, "json": _json_is_ours, "model": _model_is_ours}[kind]
    return "ours" if recognise(path) else "foreign"


def _describe(kind: OutputKind) -> str:
    return {"nifti": "NIfTI image", "interfile_image": "Interfile image", "png": "PNG", "json": "JSON file",
            "dicom_series": "DICOM series directory", "model": "model file (.pt)"}[kind]


def check_replaceable(output: PlannedOutput, overwrite: bool) -> Ownership:
    """Raise :class:`OutputPathError` unless ``output`` may be written; return its ownership.

    Args:
        output: the planned output.
        overwrite: an earlier output of the package may be replaced (``--overwrite``).
    """
    owner = ownership(output.path, output.kind)
    overwrite = overwrite or output.replace_own
    where = f"{output.flag} {str(output.path)!r}" if output.flag else repr(str(output.path))
    if owner == "foreign":
        if output.kind == "dicom_series" and output.path.is_dir():
            what = ("is a directory that holds files sirf_fbsem did not write (a DICOM series goes into a new "
                    "or empty directory, or replaces a series sirf_fbsem wrote there, listed in its "
                    f"{SERIES_MANIFEST})")
        elif output.path.is_dir():
            what = f"is a directory; a {_describe(output.kind)} is expected there"
        elif output.kind == "dicom_series":
            what = "is a file; the DICOM series needs a directory"
        else:
            what = "exists and was not written by sirf_fbsem"
        raise OutputPathError(f"{where} {what}. sirf_fbsem never replaces or deletes files it did not write: "
                              f"move it away or choose another path")
    if owner == "ours" and not overwrite:
        raise OutputPathError(f"{where} exists (an earlier output of sirf_fbsem); pass --overwrite to replace it, "
                              f"or choose another path")
    return owner


def _first_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def _anchor(output: PlannedOutput) -> Path:
    """The nearest existing ancestor of where ``output``'s files are created."""
    parent = output.path if output.kind == "dicom_series" and output.path.is_dir() else output.path.parent
    return _first_existing(parent)


def _where(output: PlannedOutput) -> str:
    return f"{output.flag} {str(output.path)!r}" if output.flag else repr(str(output.path))


def _check_writable(output: PlannedOutput, anchor: Path) -> None:
    if not anchor.is_dir():
        raise OutputPathError(f"{_where(output)}: {str(anchor)!r} is a file, so nothing can be created under it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sirf_fbsem.probe.", dir=anchor)
    except OSError as err:
        reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "the directory does not allow new files (immutable or protected)",
                  errno.ENOSPC: "no space left on the device"}.get(err.errno, err.strerror or str(err))
        raise OutputPathError(f"{_where(output)}: cannot create files in {str(anchor)!r}: {reason}") from None
    os.close(fd)
    os.unlink(probe)


def _check_space(output: PlannedOutput, anchor: Path, num_bytes: int) -> None:
    if num_bytes <= 0:
        return
    free = shutil.disk_usage(anchor).free
    need = int(num_bytes) + _SPACE_MARGIN_BYTES
    if free < need:
        raise OutputPathError(f"{_where(output)}: needs about {need / 2**20:.1f} MiB, {str(anchor)!r} has "
                              f"{free / 2**20:.1f} MiB free")


def check_location(output: PlannedOutput) -> None:
    """Raise :class:`OutputPathError` when ``output`` cannot be written where asked.

    Checks, without leaving anything behind: the nearest existing ancestor is a directory (not
    a regular file); a file can be created in it (a probe file, removed at once: this finds
    read-only file systems, immutable directories, ``/proc`` and ``/sys``); it has room for
    ``estimated_bytes`` (plus 1 MiB).
    """
    anchor = _anchor(output)
    _check_writable(output, anchor)
    _check_space(output, anchor, output.estimated_bytes)


def check_planned(outputs: Sequence[PlannedOutput], overwrite: bool) -> list[Ownership]:
    """:func:`check_replaceable` then :func:`check_location` for every output, and no two
    outputs at the same path; returns each output's ownership. Free space is checked for all
    outputs on one device together."""
    seen: dict[Path, str] = {}
    for out in outputs:
        if out.path in seen:
            raise OutputPathError(f"{out.flag} {str(out.path)!r} is also given as {seen[out.path]}; "
                                  f"each output needs its own path")
        seen[out.path] = out.flag
    owners = [check_replaceable(out, overwrite) for out in outputs]
    by_device: dict[int, tuple[PlannedOutput, Path, int]] = {}
    for out in outputs:
        anchor = _anchor(out)
        _check_writable(out, anchor)
        dev = os.stat(anchor).st_dev
        first, first_anchor, total = by_device.get(dev, (out, anchor, 0))
        by_device[dev] = (first, first_anchor, total + int(out.estimated_bytes))
    for out, anchor, total in by_device.values():
        _check_space(out, anchor, total)
    return owners


def check_run_directory(path: Path, flag: str, is_ours: bool, what: str, estimated_bytes: int = 0) -> None:
    """Raise :class:`OutputPathError` unless the directory ``path`` can take a command's outputs.

    It must be absent, empty, or (``is_ours``) one the same command wrote before (a training
    run's checkpoints, a dataset's manifest); and a file must be creatable in it or at its place.
    ``what`` says what the command keeps there, for the message; ``estimated_bytes``: the room the
    command's outputs need (checked like :func:`check_location`).
    """
    path = absolute(path)
    if os.path.lexists(path):
        if not path.is_dir():
            raise OutputPathError(f"{flag} {str(path)!r} is a file; {what} needs a directory")
        entries = sorted(os.listdir(path))
        if entries and not is_ours:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise OutputPathError(
                f"{flag} {str(path)!r} is not empty ({shown}) and holds no {what}; sirf_fbsem writes into a new "
                f"or empty directory, or continues its own there, and never replaces files it did not write: "
                f"choose another directory")
    check_location(PlannedOutput(path / ".probe", "json", flag, int(estimated_bytes)))
