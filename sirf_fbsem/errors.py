"""The package's error types: every failure it expects is one of these.

The command line turns them into one line on stderr and an exit code (README, "Errors and
safety"):

=========================  ====  ==================================================
error                      exit  meaning
=========================  ====  ==================================================
:class:`InputError`        2     bad input: a file, a header field, a flag, a model
:class:`OutputPathError`   2     an output that cannot or must not be written
                                 (found before any heavy work starts)
:class:`OutputWriteError`  1     writing failed at run time (disk full, I/O error)
:class:`RunError`          1     a run-time failure that is not the input's fault
=========================  ====  ==================================================

The readers' own classes (``InterfileError``, ``ListmodeError``, ``ModelFileError``,
``GeometryError``, ...) derive from :class:`InputError`, which is also a ``ValueError``
(so ``except ValueError`` keeps working). This module imports nothing from the package:
every layer may use it.
"""
from __future__ import annotations

import os

__all__ = [
    "SirfFbsemError",
    "InputError",
    "InputFileNotFoundError",
    "OutputPathError",
    "OutputWriteError",
    "RunError",
    "Interrupted",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130  # 128 + SIGINT, as shells report it
EXIT_SIGTERM = 143  # 128 + SIGTERM


class SirfFbsemError(Exception):
    """Base of every error sirf_fbsem raises on purpose (never a bug's traceback)."""

    exit_code = EXIT_RUNTIME


class InputError(SirfFbsemError, ValueError):
    """An input (file, header field, data, flag, model file) that cannot be used as given.

    The message names the file, the field or the flag, what was expected and what was found.
    """

    exit_code = EXIT_USAGE


class InputFileNotFoundError(InputError, FileNotFoundError):
    """An input file (or a file a header names) that does not exist."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OutputPathError(SirfFbsemError, ValueError):
    """An output that cannot be written where asked, or would replace what sirf_fbsem did not write.

    Raised by the pre-flight checks, before any heavy work; the message names the user's path.
    """

    exit_code = EXIT_USAGE


class OutputWriteError(SirfFbsemError, OSError):
    """Writing an output failed while the run was writing it (disk full, I/O error, ...).

    The message names the user's output path (never the temporary file beside it); nothing
    half-written is left behind.
    """

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RunError(SirfFbsemError, RuntimeError):
    """A run-time failure that is not the input's fault (for example a resume that cannot proceed)."""

    exit_code = EXIT_RUNTIME


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: raised in the main thread so that ``finally`` blocks and the
    atomic writers clean up, then the command line exits with 128 + the signal number.

    A ``BaseException`` (as ``KeyboardInterrupt``), so ``except Exception`` does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
