"""Output folders: a run or a comparison writes only where it may, and never over another's.

:func:`claim` is called by the command line before any data is loaded:

* the folder must be creatable and writable (a read-only file system, a path under a file, a
  path that is a file: one line, exit 2);
* a folder that already holds a run or a comparison (files asymprop writes: ``config.yaml``,
  ``metrics.csv``, ``checkpoint.pt``, ``results.csv``, ...) is refused unless the run is resumed
  or ``--overwrite`` is given; ``--overwrite`` removes only those files (and the run folders of a
  comparison), never anything else;
* a lock (``fcntl.flock`` on ``.asymprop.lock``, which holds the owner's PID) keeps two
  processes out of one folder: the second fails at once, naming the first's PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LIBRARY_FILES", "LOCK", "FolderError", "claim", "library_files", "user_mode"]

LOCK = ".asymprop.lock"
#: what asymprop writes into a run or comparison folder (and all ``--overwrite`` removes)
LIBRARY_FILES = (
    "config.yaml",
    "metrics.csv",
    "checkpoint.pt",
    "code.yaml",
    "results.csv",
    "summary.md",
    "summary.png",
    "accuracy.png",
    "loss.png",
    "alignment.png",
)
LIBRARY_DIRS = ("runs", "tensorboard")


def user_mode(fd: int) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode the user's umask gives
    any new file (0644 under the usual 022), before it is renamed into place."""
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


class FolderError(ValueError):
    """The output folder cannot be used (the message names it, why, and the fix)."""


def library_files(out: Path) -> list[Path]:
    """The files and folders asymprop wrote in ``out`` (empty if none, or no folder)."""
    if not out.is_dir():
        return []
    found = [out / name for name in LIBRARY_FILES if (out / name).is_file()]
    return found + [out / name for name in LIBRARY_DIRS if (out / name).is_dir()]


def _writable(out: Path) -> None:
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                where = "is a file" if place == out else f"is under the file {place}"
                raise FolderError(f"output folder {out} {where}: choose another --out")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FolderError(f"cannot create the output folder {out}: {err.strerror}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise FolderError(f"the output folder {out} is not writable: choose another --out")


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    path = out / LOCK
    try:
        stream = open(path, "a+")  # noqa: SIM115 (held for the whole run)
    except OSError as err:
        raise FolderError(f"cannot write in the output folder {out}: {err.strerror}") from err
    try:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            holder = stream.read().strip() or "unknown"
            raise FolderError(
                f"{out} is in use by another asymprop process (PID {holder}): wait for it to "
                "finish, or choose another --out"
            ) from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"{os.getpid()}\n")
        stream.flush()
        try:
            yield
        finally:
            fcntl.flock(stream, fcntl.LOCK_UN)
    finally:
        stream.close()


def _clear(out: Path) -> None:
    """Remove what asymprop wrote in ``out`` (and in the run folders under ``runs/``)."""
    for path in library_files(out):
        if path.is_file():
            path.unlink()
            continue
        for sub in sorted(path.iterdir()) if path.name == "runs" else []:
            if sub.is_dir():
                _clear(sub)
                _remove_if_empty(sub)
        if path.name == "tensorboard":
            for event in path.glob("events.out.tfevents.*"):
                event.unlink()
        _remove_if_empty(path)


def _remove_if_empty(folder: Path) -> None:
    lock = folder / LOCK
    if lock.is_file() and not any(p != lock for p in folder.iterdir()):
        lock.unlink()
    with contextlib.suppress(OSError):  # not empty: the user's files stay
        folder.rmdir()


@contextlib.contextmanager
def claim(out: Path, *, what: str, resume: bool = False, overwrite: bool = False) -> Iterator[None]:
    """Make ``out`` this process's output folder for the block (see the module docstring).

    Args:
        out: the folder.
        what: ``"run"`` or ``"comparison"`` (for the messages).
        resume: the run continues the one in ``out`` (its files are expected).
        overwrite: replace a run or comparison found in ``out``.

    Raises:
        FolderError: not usable, in use, or holding results that would be lost.
    """
    out = Path(out)
    created = [place for place in (out, *out.parents) if not place.exists()]  # leaf first
    try:
        _writable(out)
        with _lock(out):
            found = library_files(out)
            if found and not resume:
                if not overwrite:
                    names = ", ".join(p.name for p in found)
                    fix = (
                        f"continue it with asymprop train --resume {out}, " if what == "run" else ""
                    )
                    raise FolderError(
                        f"{out} already holds results ({names}): {fix}replace them with "
                        "--overwrite, or choose another --out"
                    )
                _clear(out)
            yield
    finally:
        for folder in created:  # a run refused before writing leaves no folder behind
            _remove_if_empty(folder)
