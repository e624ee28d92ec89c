"""Data-parallel training with PyTorch's own engine (DistributedDataParallel under ``torchrun``).

Nothing here replaces DDP; these are the few helpers a training script needs around it, and the
reasons the feedback stays identical on every rank for every rule:

* fixed and recomputed rules (``fa``, ``rndf``, sign rules) derive B from W or from the seed of
  ``convert``, and W is identical on every rank;
* ``brsf`` redraws, ``wm`` mirror noise and ``np`` perturbations come from each layer's own
  seeded stream (``FeedbackLayer.feedback_generator``), a pure function of (seed, draw count):
  every rank draws the same numbers without communicating;
* ``kp``'s B is a Parameter, so DDP all-reduces its gradient with W's.

Launch::

    torchrun --nproc_per_node=4 -m asymprop train --rule kp --model resnet18 --data imagenet ...

and in a script of your own::

    info = asymprop.harness.distributed.init()   # reads torchrun's environment (no-op alone)
    model = asymprop.convert(build(), "kp", seed=0).to(info.device)
    model = asymprop.harness.distributed.wrap(model, info)  # DDP, or the model itself alone
    ... asymprop.train_step(model, opt, loss_fn, x, y)  # DDP-wrapped models are accepted
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..convert import feedback_layers

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "assert_in_sync",
    "init",
    "is_main",
    "wrap",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(backend: str | None = None, device: str | torch.device | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ...).

    Without those variables (a plain ``python`` run) this is a one-process "group" and nothing is
    initialised. The backend defaults to NCCL on GPUs and gloo on CPUs.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None (choose by device).
        device: the device to train on; default ``cuda:LOCAL_RANK`` when CUDA is available, else
            CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, dev)


def is_main() -> bool:
    """True on rank 0, or when not distributed: the process that writes files and progress."""
    return not dist.is_initialized() or dist.get_rank() == 0


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model``.

    Call after ``convert`` (so KP's B is among the parameters DDP reduces) and after moving the
    model to ``info.device``.
    """
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_mean(value: float | Tensor) -> float:
    """The mean of a number over all ranks (itself when not distributed)."""
    if not dist.is_initialized():
        return float(value)
    tensor = torch.as_tensor(float(value), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def assert_in_sync(model: nn.Module) -> None:
    """Raise if any weight, feedback weight or rule state differs between ranks (bit for bit).

    A cheap check to run every few epochs: one all-gather of a checksum per tensor.
    """
    if not dist.is_initialized():
        return
    names, sums = [], []
    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor) and tensor.numel():
            names.append(name)
            # Bitwise checksum: reinterpret as integers so -0.0 vs 0.0 and NaN payloads count.
            flat = tensor.detach().reshape(-1)
            if flat.is_floating_point():
                flat = flat.to(torch.float64).view(torch.int64)
            sums.append(flat.to(torch.int64).sum())
    for _, layer in feedback_layers(model):
        names.append("feedback_state")
        digest = zlib.crc32(repr(sorted(layer.feedback_state.items())).encode())
        sums.append(torch.tensor(digest, dtype=torch.int64))
    local = torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.int64)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    if dist.get_backend() == "nccl":
        local_dev = local.cuda()
        gathered_dev = [g.cuda() for g in gathered]
        dist.all_gather(gathered_dev, local_dev)
        gathered = [g.cpu() for g in gathered_dev]
    else:
        dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered):
        differ = (other != gathered[0]).nonzero().flatten().tolist()
        if differ:
            raise RuntimeError(
                f"rank {rank} differs from rank 0 in {', '.join(names[i] for i in differ[:5])}: "
                "the feedback or weights went out of sync"
            )
