"""Keys of Siemens Interfile-like headers (``.l.hdr`` listmode, ``.n.hdr`` normalisation).

Shared by the PETLINK listmode reader (:mod:`sirf_fbsem.io.listmode`) and the ECAT8
normalisation reader (:mod:`sirf_fbsem.io.ecat8_norm`): keys parsed with STIR's keyword rules
and normalised for lookups, integers read as a C++ stream reads them, the scanner named by
``originating system``, and the data file a header names. Their errors are
:class:`ListmodeError` (re-exported by :mod:`sirf_fbsem.io.listmode`).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping

from ..errors import InputError, InputFileNotFoundError
from ..geometry import Scanner, scanner_preset
from .interfile import parse_header

__all__ = [
    "ListmodeError",
    "DATA_FILE_KEY",
    "parse_interfile_keys",
    "int_value",
    "get_int",
    "parse_int_list",
    "scanner_from_keys",
    "resolve_data_file",
]

#: the key naming the data file (normalised: lower case, no leading '!' or '%', single spaces)
DATA_FILE_KEY = "name of data file"


class ListmodeError(InputError):
    """A listmode file or header that cannot be read as PETLINK 32-bit data."""


def _normalise_key(key: str) -> str:
    key = key.replace("_", " ").strip().lstrip("!%").strip()
    key = re.sub(r"\s+", " ", key).lower()
    key = re.sub(r"\s*\[\s*(\d+)\s*\]", r" [\1]", key)
    return key


def parse_interfile_keys(path: str | os.PathLike) -> dict[str, str]:
    """Keys and values of an Interfile-like header (Siemens ``.l.hdr`` / ``.n.hdr``, STIR ``.hv``).

    Parsed by :func:`sirf_fbsem.io.interfile.parse_header` (STIR's keyword rules; its
    errors name the file), with keys re-normalised for lookups here: leading ``!``/``%``
    removed, ``_`` as space, lower case, whitespace collapsed, indices as ``"key [1]"``.
    """
    hdr = parse_header(path)
    return {_normalise_key(k): v.strip() for k, v in hdr.entries.items() if _normalise_key(k)}


#: largest integer a header value may hold here (sizes, offsets, counts): beyond it the value is refused
_MAX_HEADER_INT = (1 << 62) - 1


def int_value(text: str) -> int:
    """An integer as a C++ stream reads it (leading token; ``'3.0'`` -> 3, ``'126 ; 252'`` -> 126).

    Raises ``ValueError`` for text that is not a finite number within +-2**62.
    """
    token = text.strip().split(None, 1)[0].split(";", 1)[0] if text.strip() else ""
    v = float(token)  # ValueError for text
    if not math.isfinite(v) or abs(v) > _MAX_HEADER_INT:
        raise ValueError(text)
    return int(v)


def get_int(keys: Mapping[str, str], key: str, path: Path, default: int | None = None) -> int:
    """The integer value of ``key`` (:func:`int_value`); ``default`` when the key is absent or empty,
    else :class:`ListmodeError` naming the header ``path``."""
    if key not in keys or keys[key] == "":
        if default is None:
            raise ListmodeError(f"header '{path}': missing key '{key}'")
        return default
    try:
        return int_value(keys[key])
    except ValueError:
        raise ListmodeError(f"header '{path}': key '{key}' should be an integer, got {keys[key]!r}") from None


def parse_int_list(value: str) -> list[int]:
    """``"{127,115, 115}"`` -> ``[127, 115, 115]``; ``ValueError`` for an item that is not an integer."""
    return [int_value(x) for x in value.strip().strip("{}").split(",") if x.strip()]


_SCANNER_NAMES = {"2008": "Siemens_mMR", "siemens mmr": "Siemens_mMR", "mmr": "Siemens_mMR"}


def scanner_from_keys(keys: Mapping[str, str], path: Path) -> Scanner:
    """The scanner preset of the header's ``originating system`` (the Siemens mMR only)."""
    name = keys.get("originating system", "").strip()
    preset = _SCANNER_NAMES.get(name.lower())
    if preset is None:
        raise ListmodeError(
            f"header '{path}': 'originating system' is {name!r}; only the Siemens mMR ('2008') is supported"
        )
    return scanner_preset(preset)


def resolve_data_file(header: Path, keys: Mapping[str, str], key: str = DATA_FILE_KEY) -> Path:
    """The data file named in ``key``, relative to the header's folder (as STIR's prepend_directory_name)."""
    name = keys.get(key, "").strip()
    if not name:
        raise ListmodeError(f"header '{header}': missing key '{key}'")
    p = Path(name)
    if not p.is_absolute():
        p = header.parent / p
    if not p.is_file():  # False for names the file system cannot hold (NUL bytes)
        what = "a folder, not a file" if p.is_dir() else "does not exist"
        raise InputFileNotFoundError(
            f"header '{header}': key '{key}' names data file '{name}', which {what} (looked for '{p}')", p
        )
    return p
