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

A sharded run (``--strategy fsdp``) keeps its model and optimizer state out of that file:
:func:`save_sharded` writes them through ``torch.distributed.checkpoint`` (DCP), every rank its
own shards, into a new folder under ``checkpoint.dcp/`` for every checkpoint; ``checkpoint.pt``
(everything else, written atomically by rank 0 *after* DCP's collective save has finished on
every rank) names the folder, and only then are older folders deleted. A kill at any moment
leaves a ``checkpoint.pt`` whose folder is whole. :func:`load_sharded` loads it on any number of
ranks (DCP reshards on load).
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
    "SHARDED_DIR",
    "CheckpointError",
    "capture_rng",
    "load_sharded",
    "read_checkpoint",
    "remove_sharded",
    "restore_rng",
    "save_sharded",
    "tensor_digest",
    "write_atomic",
]

SHARDED_DIR = "checkpoint.dcp"
"""Folder (beside ``checkpoint.pt``) of the DCP checkpoints of sharded runs, one subfolder each."""

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


def save_sharded(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike[str]
) -> None:
    """Write a sharded model's and its optimizer's state with ``torch.distributed.checkpoint``.

    Collective: every rank calls it and writes its own shards (replicated tensors, such as the
    feedback-weight buffers, once). ``get_model_state_dict`` / ``get_optimizer_state_dict`` give
    the DTensor state dicts (keys: the module's own names; rule state ``_extra_state`` is
    saved as an object). An optimizer that has not stepped yet is left out:
    ``get_optimizer_state_dict`` would create its state by a step with lr 0, which leaves
    SGD's momentum buffer at ``weight_decay * W`` instead of empty.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state: dict[str, Any] = {"model": get_model_state_dict(module)}
    if optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(module, optimizer)
    dcp.save(state, checkpoint_id=os.fspath(folder))


def load_sharded(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike[str]
) -> None:
    """Load a :func:`save_sharded` folder into a sharded model and optimizer, in place.

    Collective. Buffers whose shape the first backward fixes (``dfa``'s B, NP's regression
    sums: empty in a fresh model) are first resized to the shapes DCP's metadata records.

    Raises:
        CheckpointError: the folder is missing or not a DCP checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(folder)
    try:
        metadata = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(
            f"{path} is not a readable sharded checkpoint ({err}); nothing to resume"
        ) from err
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            saved = metadata.get(f"model.{name}")
            size = getattr(saved, "size", None)
            if size is not None and tuple(size) != tuple(buffer.shape):
                buffer.resize_(tuple(size))
    model_state = {"model": get_model_state_dict(module)}
    dcp.load(model_state, checkpoint_id=os.fspath(path))
    set_model_state_dict(module, model_state["model"])
    if any(key.startswith("optimizer.") for key in metadata):
        optimizer_state = {"optimizer": get_optimizer_state_dict(module, optimizer)}
        dcp.load(optimizer_state, checkpoint_id=os.fspath(path))
        set_optimizer_state_dict(module, optimizer, optimizer_state["optimizer"])


def remove_sharded(run_dir: str | os.PathLike[str], keep: str | None) -> None:
    """Delete the DCP folders under ``run_dir/checkpoint.dcp`` but ``keep`` (relative to
    ``run_dir``, as ``checkpoint.pt`` names it; None: delete them all)."""
    root = Path(run_dir) / SHARDED_DIR
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if keep is None or folder != Path(run_dir) / keep:
            shutil.rmtree(folder, ignore_errors=True)
