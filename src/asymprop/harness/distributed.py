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

**Sharded training (FSDP2).** ``--strategy fsdp`` (:func:`shard`) applies PyTorch's own
``torch.distributed.fsdp.fully_shard`` instead of DDP: every module that calls converted layers
(a transformer or residual block) becomes one FSDP unit, the root module a last one, and each
Parameter is a ``DTensor`` cut into row shards, one per rank, gathered for each unit's forward
and backward pass and freed after. What each rule keeps where:

* ``weight``, ``bias`` and every other Parameter, and KP's ``feedback_weight`` (a Parameter):
  sharded like W; their gradients are reduce-scattered (FSDP's own, instead of DDP's all-reduce);
* ``feedback_weight`` buffers (``fa``, sign rules, ``wm``, ``np``, ``dfa``'s lazily drawn B) and
  rule buffers (frSF's M, NP's ridge sums): whole on every rank (FSDP shards Parameters only),
  kept identical by the reasons above (same seed, same streams, all-reduced fits);
* the sign rules and ``wm`` read W between steps: ``FeedbackLayer.full_weight`` all-gathers it
  (``DTensor.full_tensor``), so their B is what one process computes, at the cost of one
  all-gather of W per layer and step (docs/distributed.md has the bytes);
* ``np``'s noisy pass is a forward pass without backward: ``asymprop.layers.reshard`` frees the
  weights it gathered.

Checkpoints of a sharded run go through ``torch.distributed.checkpoint`` (each rank writes its
shards; :mod:`asymprop.harness.experiment`).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..convert import feedback_layers, unwrap
from ..layers import FeedbackContainer, FeedbackLayer, is_sharded, reshard
from ..rules import did_you_mean

__all__ = [
    "STRATEGIES",
    "DistInfo",
    "all_reduce_mean",
    "assert_in_sync",
    "gathered",
    "init",
    "is_fsdp",
    "is_main",
    "shard",
    "wrap",
]

STRATEGIES = ("ddp", "fsdp")
"""How a torchrun job splits the work: ``ddp`` (whole model on every rank, gradients
all-reduced) or ``fsdp`` (parameters sharded over the ranks, :func:`shard`)."""


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


def wrap(model: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """``DistributedDataParallel(model)`` (``ddp``) or the model sharded in place by
    :func:`shard` (``fsdp``) when distributed, else ``model``.

    Call after ``convert`` (so KP's B is among the parameters DDP reduces or FSDP shards), after
    moving the model to ``info.device``, and before building the optimizer (under FSDP it must
    hold the sharded Parameters).
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}{did_you_mean(strategy, STRATEGIES)}; valid: "
            f"{', '.join(STRATEGIES)}"
        )
    if not info.distributed:
        return model
    if strategy == "fsdp":
        return shard(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard(model: nn.Module) -> nn.Module:
    """Shard a converted model over the ranks with FSDP2 (``fully_shard``), in place.

    Every module that calls converted layers or converted multi-weight modules (a transformer
    block, a residual block) becomes one FSDP unit, innermost first, and the root module takes
    the rest (layers called by the root itself, norms, embeddings). At most a unit's whole
    weights are gathered at a time in the passes: to shard a model, give it blocks (an MLP
    written as one ``nn.Sequential`` is one unit, the root).
    Call it after ``convert`` and ``.to(device)``, before building the optimizer; returns
    ``model`` (its class is now also an ``FSDPModule``).

    Example::

        model = asymprop.convert(build(), "wm", seed=0).to(info.device)
        model = distributed.shard(model)            # parameters are DTensors now
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        asymprop.train_step(model, opt, loss_fn, x[share], y[share])
    """
    from torch.distributed.fsdp import fully_shard

    root = unwrap(model)
    modules = dict(root.named_modules())
    units: set[int] = set()
    for name, module in modules.items():
        if not isinstance(module, FeedbackLayer | FeedbackContainer):
            continue
        # The unit is the module that calls the converted one (a residual or transformer
        # block), never a multi-weight module itself. Why not the layer itself: FSDP hands every
        # unit its input through an autograd node of its own, so a layer whose input is also
        # read elsewhere (a block's first layer and the residual add) would see a copy, and what
        # reads "the error at the layer's input" (delta alignment, sg's target) would get the
        # layer's path alone instead of the sum with the residual's; and attention tells self-
        # from cross-attention by ``query is key``, which three copies would fail.
        parent = name
        while parent and (parent == name or isinstance(modules[parent], FeedbackContainer)):
            parent = parent.rpartition(".")[0]
        units.add(id(modules[parent]))
    ordered = [m for m in root.modules() if id(m) in units and m is not root]
    for unit in reversed(ordered):  # innermost first: a unit never holds a child unit's weights
        fully_shard(unit)
    fully_shard(root)
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Some module of ``model`` is sharded by FSDP2 (``fully_shard``)."""
    return any(is_sharded(p) for p in unwrap(model).parameters())


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every Parameter of a sharded model is whole on every rank.

    ``FSDPModule.unshard`` on every unit (one all-gather of all weights), ``reshard`` after: for
    what reads the weights outside a forward pass and knows nothing of shards (``alignment``,
    the divergence report). It holds the whole model on each rank for the block. A no-op
    without FSDP.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        reshard(unwrap(model))


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

    A cheap check to run every few epochs: one all-gather of a checksum per tensor. Under FSDP
    the sharded Parameters are left out (each rank holds other rows); the buffers (feedback
    weights of every rule but KP) and the rule state are compared.
    """
    if not dist.is_initialized():
        return
    names, sums = [], []
    for name, tensor in model.state_dict().items():
        if is_sharded(tensor):  # FSDP: each rank holds other rows by design
            continue
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
