"""Checkpoint files that a run continues from bit for bit, and that no kill can corrupt.

A checkpoint is one ``torch.save`` file (a dict of tensors and plain data, loadable with
``weights_only=True``). :mod:`asymprop.harness.experiment` fills it with the model's ``state_dict``
(weights, feedback weights, and rule state: frSF's M and NP's statistics are buffers, WM's
schedule and every layer's random-stream position are ``feedback_state``, saved as
``_extra_state``), the optimizer's and grad scaler's ``state_dict``, the random states from
:func:`capture_rng`, the position in the run and the ``metrics.csv`` rows so far.

:func:`write_atomic` writes to a temporary file beside the target, ``fsync``s it, renames it
over the target (``os.replace``: atomic on POSIX) and ``fsync``s the folder: a process killed at
any moment leaves either the previous checkpoint or the new one, never half a file.

    >>> write_atomic({"step": 3, "w": torch.zeros(2)}, "run/checkpoint.pt")
    >>> read_checkpoint("run/checkpoint.pt")["step"]
    3
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .folders import user_mode

__all__ = [
    "CheckpointError",
    "capture_rng",
    "read_checkpoint",
    "restore_rng",
    "tensor_digest",
    "write_atomic",
]

TEMP_PREFIX = ".tmp-"
"""Temporary files start with this (a killed write leaves one; :func:`remove_stale` deletes it)."""


class CheckpointError(ValueError):
    """A checkpoint is missing or unreadable (the message names the file and what to do)."""


def capture_rng(devices: list[torch.device] | None = None) -> dict[str, Any]:
    """Every global random state a training step may draw from: torch (CPU and the given CUDA
    devices), NumPy and Python's ``random``. Plain data and tensors only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "python": _python_state(random.getstate()),
    }
    cuda = [d for d in devices or [] if d.type == "cuda"]
    if cuda:
        state["cuda"] = {str(d): torch.cuda.get_rng_state(d) for d in cuda}
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the random states saved by :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for device, value in state.get("cuda", {}).items():
        torch.cuda.set_rng_state(value, torch.device(device))


def _python_state(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def write_atomic(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save(state, path)`` so that ``path`` is always a whole file: temporary file,
    fsync, rename over ``path``, fsync of the folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}.")
    user_mode(fd)
    try:
        with os.fdopen(fd, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    except (OSError, RuntimeError) as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, RuntimeError) and not _writer_failed(err):
            raise
        raise _write_error(target, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _writer_failed(err: RuntimeError) -> bool:
    """torch's file writer failed (a full disk, an I/O error), as opposed to an object that
    cannot be saved."""
    text = str(err)
    return any(key in text for key in ("inline_container", "PytorchStreamWriter", "unexpected pos"))


def _write_error(target: Path, err: BaseException) -> CheckpointError:
    """One line for a failed write; a full disk says so (torch's zip writer reports ENOSPC as
    ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos``)."""
    free = shutil.disk_usage(target.parent).free
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or (
        isinstance(err, RuntimeError) and "unexpected pos" in str(err)
    )
    kept = "the previous checkpoint is kept" if target.exists() else "no checkpoint was kept"
    if full:
        return CheckpointError(
            f"no space left on the device of {target.parent} ({free / 2**20:.0f} MiB free) "
            f"writing {target.name}; {kept}, no temporary file is left"
        )
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return CheckpointError(f"could not write {target} ({reason}); {kept}")


def tensor_digest(tensors: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict's tensors: names, dtypes, shapes and bytes, in key order.

    Stored in every checkpoint and checked when it is loaded: bytes changed after writing (a
    damaged disk, an edit) are caught instead of trained on.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        if not isinstance(value, torch.Tensor):
            continue
        data = value.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash of the machine, not only of the process)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale(folder: str | os.PathLike[str]) -> None:
    """Delete temporary files left in ``folder`` by writes that a kill interrupted."""
    for path in Path(folder).glob(f"{TEMP_PREFIX}*"):
        path.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike[str], device: torch.device | None = None) -> Any:
    """Load a checkpoint written by :func:`write_atomic` (tensors only, no pickled code).

    Raises:
        CheckpointError: the file does not exist or is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message advises weights_only=False: no
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} is not an asymprop checkpoint: it holds Python objects beyond tensors "
                "and plain data, which asymprop never writes (and will not run)"
            ) from err
        raise CheckpointError(
            f"{path} is not a checkpoint (not a complete torch.save file: truncated, damaged "
            "or another format)"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{path} is not a checkpoint (not a complete torch.save file: truncated, damaged "
            "or another format)"
        ) from err
