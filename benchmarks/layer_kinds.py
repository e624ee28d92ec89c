"""Step time of the new layer kinds under fa, kp and usf against plain PyTorch (issue: layer kinds).

Models (one fixed random batch each, SGD with momentum and weight decay at lr 0 as in bench.py,
so every round times the same numbers):

* ``transformer``: 4 ``nn.TransformerEncoderLayer`` (d=128, 4 heads, FFN 512, batch_first), seq 64,
  batch 32, a linear head on the mean token: every projection of attention and the MLP blocks
  carries feedback;
* ``conv1d``: 3 ``nn.Conv1d`` (64 channels, kernel 5, the middle one strided), seq 256, batch 64;
* ``lstm``: ``nn.LSTM(40, 128)`` over 40 steps (MNIST-1D's length), batch 64, a linear head on
  the last hidden state; plain is torch's fused ``nn.LSTM``.

Each variant is timed next to plain in interleaved A/B rounds (``harness.ab_rounds``: load that
drifts touches both halves of a pair alike); the ratio is the median of the variant's blocks over
the median of the plain blocks paired with them, and the spread half the IQR of per-pair ratios.
``plain-copy`` is the A/A control. Targets (issue text): transformer and conv1d within 5% of plain
for fa/usf and 10% for kp; the LSTM within 2x of ``nn.LSTM`` for fa.

    python benchmarks/layer_kinds.py --threads 1 --budget 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ModelSpec, Workload, time_model

import asymprop  # noqa: F401  (registers the layer kinds)


class Transformer(nn.Module):
    def __init__(self, d: int = 128, heads: int = 4, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, d) -> (N, classes)
        return self.head(self.encoder(x).mean(1))


class Recurrent(nn.Module):
    def __init__(self, inputs: int = 40, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.rnn = nn.LSTM(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, F) -> (N, classes)
        return self.head(self.rnn(x)[0][:, -1])


def conv1d_net(channels: int = 64, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(channels, classes),
    )


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "transformer": (Transformer, (64, 128), 32),
    "conv1d": (conv1d_net, (1, 256), 64),
    "lstm": (Recurrent, (40, 40), 64),
}


def workload(name: str) -> Workload:
    build, shape, batch = WORKLOADS[name]
    torch.manual_seed(0)
    base = build()
    inputs = torch.randn(batch, *shape)
    targets = torch.randint(0, 10, (batch,))
    return Workload(name, ModelSpec(name, shape, batch), base, inputs, targets, torch.device("cpu"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--rules", nargs="+", default=["fa", "usf", "kp"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--budget", type=float, default=60.0, help="A/B seconds per model")
    parser.add_argument(
        "--write", action="store_true", help="put the table in its section of RESULTS.md"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    given = sys.argv[1:] if argv is None else list(argv)
    emit(f"`python benchmarks/layer_kinds.py {' '.join(given)}` (torch {torch.__version__}, "
         f"{torch.get_num_threads()} thread(s), process CPU time)")  # fmt: skip
    emit("")
    emit("| model | variant | ms/step | ratio to plain | spread |")
    emit("| --- | --- | --- | --- | --- |")
    for name in args.models:
        specs = ["plain", "plain-copy", *args.rules]
        timing = time_model(
            workload(name), specs, warmup=3, block_seconds=0.25, budget_s=args.budget,
            most_rounds=40,
        )  # fmt: skip
        plain_ms = statistics.median(timing.times["plain"]) * 1e3
        emit(f"| {name} | plain | {plain_ms:.2f} | 1 | |")
        for spec in specs[1:]:
            if spec in timing.failed:
                emit(f"| {name} | {spec} | | failed: {timing.failed[spec]} | |")
                continue
            ms = timing.median(spec) * 1e3
            ratio, spread = timing.ratio(spec), timing.spread(spec)
            emit(f"| {name} | {spec} | {ms:.2f} | {ratio:.3f} | {spread:.3f} |")
    if args.write:
        write_section("layer_kinds.py", "Layer kinds: step time against plain PyTorch", lines)


def write_section(name: str, title: str, lines: list[str]) -> None:
    """Replace (or append) this script's marked section of benchmarks/RESULTS.md (bench.py keeps
    such sections when it rewrites the file)."""
    path = Path(__file__).resolve().parent / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    section = "\n".join([begin, f"## {title}", "", *lines, end]) + "\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(f"wrote the {name} section of {path}")


if __name__ == "__main__":
    main()
