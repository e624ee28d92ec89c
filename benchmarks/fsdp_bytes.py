"""Communication of one training step under FSDP2, per rule: bytes per step measured on gloo.

A small transformer (``nn.TransformerEncoder`` of ``--layers`` layers, d_model ``--width``, 4
heads, feed-forward 4x, a Linear embedding of 16 features and a Linear head to 10 classes; float32)
is converted with each rule, sharded with ``asymprop.harness.distributed.shard`` over the
processes of ``torchrun`` and trained with ``asymprop.train_step`` (SGD, batch 8 of sequences
of 12 per process). After one step (wm's warm-up, dfa's first draw), a ``TorchDispatchMode``
catches every collective of ``--steps`` steps (FSDP's all-gathers and reduce-scatters, DTensor's
all-gathers, ``all_reduce``) and sums their sizes, as the size of the whole tensor each one
moves: an all-gather's output, a reduce-scatter's input, an all-reduce's tensor. The table gives
the mean per step, and each rule's excess over ``bp`` (the same FSDP traffic with no feedback).

    torchrun --nproc_per_node=2 benchmarks/fsdp_bytes.py
    torchrun --nproc_per_node=2 benchmarks/fsdp_bytes.py --width 128 --layers 2
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import asymprop
from asymprop.harness import distributed

RULES = ["bp", "fa", "usf", "brsf", "frsf", "kp", "wm", "dfa", "np", "sg", "matched"]


class Net(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        block = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))  # type: ignore[no-any-return]


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tensors) if torch.is_tensor(t))


class Collectives(TorchDispatchMode):
    """Sums, per kind, the size of the whole tensor each collective moves (see the docstring)."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world, self.bytes = world, Counter[str]()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = str(func)
        if name.startswith(("c10d._allgather_base_", "c10d.allgather_")):  # (output(s), ...)
            self.bytes["all-gather"] += _nbytes(args[0])
        elif name.startswith("_c10d_functional.all_gather_into_tensor"):  # DTensor.full_tensor
            self.bytes["all-gather"] += _nbytes(args[0]) * self.world
        elif name.startswith(("c10d._reduce_scatter_base_", "c10d.reduce_scatter")):
            self.bytes["reduce-scatter"] += _nbytes(args[1])  # the input: every rank's whole grad
        elif name.startswith(("c10d.allreduce", "_c10d_functional.all_reduce")):
            self.bytes["all-reduce"] += _nbytes(args[0])
        elif name.startswith(("c10d.", "_c10d_functional.")) and not any(
            skip in name
            for skip in ("wait", "wrap_tensor_autograd")  # no data moved
        ):
            self.bytes[f"other ({name})"] += _nbytes(args)
        return func(*args, **(kwargs or {}))


def measure(rule: str, width: int, layers: int, steps: int, info: Any) -> dict[str, float]:
    torch.manual_seed(0)
    model = distributed.shard(asymprop.convert(Net(width, layers), rule, seed=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1 + info.rank)
    batches = [
        (torch.randn(8, 12, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen))
        for _ in range(steps + 1)
    ]
    asymprop.train_step(model, opt, F.cross_entropy, *batches[0])  # warm-ups, first draws
    with Collectives(info.world_size) as caught:
        for x, y in batches[1:]:
            asymprop.train_step(model, opt, F.cross_entropy, x, y)
    return {kind: total / steps for kind, total in caught.bytes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = distributed.init(backend="gloo", device="cpu")
    params = sum(p.numel() * p.element_size() for p in Net(args.width, args.layers).parameters())
    rows = [(rule, measure(rule, args.width, args.layers, args.steps, info)) for rule in RULES]
    if info.rank == 0:
        base = sum(rows[0][1].values())
        print(
            f"{info.world_size} processes, transformer width {args.width}, {args.layers} "
            f"layer(s): {params} bytes of parameters (float32); KiB per step, mean of "
            f"{args.steps} steps\n"
        )
        print("| rule | all-gather | reduce-scatter | all-reduce | total | extra over bp |")
        print("|---|---:|---:|---:|---:|---:|")
        for rule, found in rows:
            kinds = [found.get(k, 0.0) for k in ("all-gather", "reduce-scatter", "all-reduce")]
            total = sum(found.values())
            others = {k: v for k, v in found.items() if k.startswith("other")}
            cells = " | ".join(f"{v / 1024:.1f}" for v in kinds)
            print(
                f"| {rule} | {cells} | {total / 1024:.1f} | {(total - base) / 1024:+.1f} |"
                + (f" {others}" if others else "")
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
