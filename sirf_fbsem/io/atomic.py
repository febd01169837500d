"""Write to a temporary name beside the target, then rename: no half-written output.

A failure while writing (disk full, I/O error, a signal) removes the temporary file and
leaves the target as it was; an ``OSError`` is re-raised as
:class:`~sirf_fbsem.errors.OutputWriteError` naming the user's target, never the temporary
name. These helpers replace only what their caller decided may be replaced
(:mod:`sirf_fbsem.io.outputs` holds that rule).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import OutputWriteError

__all__ = ["atomic_path", "atomic_dir"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(target: Path, err: OSError) -> OutputWriteError:
    reason = err.strerror or str(err)
    return OutputWriteError(f"cannot write {str(target)!r}: {reason}", target)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM for the block (main thread, POSIX); a no-op elsewhere."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary file path in the target's directory; rename it onto ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left as it was.
    ``suffix`` (default: the target's full suffix, e.g. ``.nii.gz``) lets writers
    that choose a format by extension see the right one.

    Raises:
        OutputWriteError: an ``OSError`` while creating, writing or renaming (names ``target``).
    """
    target = Path(target)
    if suffix is None:
        suffix = "".join(target.suffixes)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # SIGINT/SIGTERM (the CLI's Interrupted) held off until the name is known, so that no
        # .part file can be left behind between its creation and the cleanup below
        with _signals_held():
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".part{suffix}", dir=target.parent)
            tmp_path = Path(tmp)
    except OutputWriteError:
        raise
    except OSError as err:
        raise _write_error(target, err) from None
    try:
        os.close(fd)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get the usual mode
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(err, OSError) and not isinstance(err, OutputWriteError):
            raise _write_error(target, err) from None
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: Sequence[str] = (), last: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success its files become ``target``'s.

    - ``target`` absent: the temporary directory is made beside it and renamed onto it.
    - ``target`` an existing directory: the temporary directory is made inside it (hidden); on
      success the files named in ``replace`` (an earlier output the caller may replace) are
      removed and the new files moved in (``last``, e.g. a manifest, after the others);
      nothing else in ``target`` is touched. A new file
      whose name is taken by a file not in ``replace`` stops the move, which is then undone.

    On any exception the temporary directory is removed and ``target`` keeps what it held.

    Raises:
        OutputWriteError: an ``OSError`` while writing or moving (names ``target``).
    """
    target = Path(target)
    existing = target.is_dir()
    try:
        if existing:
            tmp = Path(tempfile.mkdtemp(prefix=".sirf_fbsem.", suffix=".part", dir=target))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as err:
        raise _write_error(target, err) from None
    try:
        yield tmp
        if not existing:
            os.replace(tmp, target)
            return
        _move_in(tmp, target, set(replace), last)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, OutputWriteError):
            raise _write_error(target, err) from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _move_in(tmp: Path, target: Path, replace: set[str], last: str | None) -> None:
    """Remove ``replace`` from ``target``, then move ``tmp``'s files in; undo the moves on failure."""
    new = sorted((p.name for p in tmp.iterdir()), key=lambda n: (n == last, n))
    clash = [n for n in new if n not in replace and os.path.lexists(target / n)]
    if clash:
        raise FileExistsError(errno.EEXIST, f"{str(target / clash[0])!r} exists and is not to be replaced")
    for name in sorted(replace):
        with contextlib.suppress(FileNotFoundError):
            (target / name).unlink()
    moved: list[Path] = []
    try:
        for name in new:
            os.replace(tmp / name, target / name)
            moved.append(target / name)
    except BaseException:
        for path in moved:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


