"""Step time of converted recurrent layers (``asymprop.recurrent``) against torch's fused kernels.

A classifier on sequences: ``nn.LSTM`` (or ``nn.GRU``, ``nn.RNN``) with ``batch_first`` input
``(N, T, F)`` and a linear head on the last hidden state; one fixed random batch; the whole
training step (``zero_grad``, forward, loss, backward, SGD with momentum and weight decay at lr 0
as in ``bench.py``; ``asymprop.train_step`` for the rules), on the CPU. Plain is the unconverted
model: torch's fused kernel (oneDNN). Each rule is timed next to plain in
interleaved A/B rounds (``harness.ab_rounds``); the ratio is the median of the rule's blocks over
the median of the plain blocks paired with them, the spread half the IQR of the per-pair ratios;
``plain-copy`` is the A/A control. Target: ``fa`` within 2x of ``nn.LSTM`` on CPU.

Workloads (``--models``): ``lstm-40`` (MNIST-1D-like: batch 64, 40 steps, 40 features, hidden
64), ``lstm-100`` (100 steps), ``lstm-40-h128`` (hidden 128), ``gru-40``, ``rnn-40``.

    python benchmarks/recurrent.py --threads 1 --budget 30
    python benchmarks/recurrent.py --models lstm-40 --rules fa wm --per-step   # the T-call path
    python benchmarks/recurrent.py --models lstm-40 --profile fa   # torch.profiler, plain vs fa
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    PLAIN_COPY,
    ModelSpec,
    Variant,
    Workload,
    ab_rounds,
    build_variant,
    choose_block,
    choose_rounds,
)

import asymprop
import asymprop.recurrent  # registers nn.RNN/LSTM/GRU


class SequenceClassifier(nn.Module):
    """``(N, T, F)`` -> recurrent layer -> last hidden state -> ``Linear`` -> ``(N, classes)``."""

    def __init__(self, kind: str, features: int, hidden: int, classes: int = 10) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])  # type: ignore[no-any-return]


#: name -> (module type, steps T, features F, hidden H, batch N)
WORKLOADS: dict[str, tuple[str, int, int, int, int]] = {
    "lstm-40": ("LSTM", 40, 40, 64, 64),
    "lstm-100": ("LSTM", 100, 40, 64, 64),
    "lstm-40-h128": ("LSTM", 40, 40, 128, 64),
    "gru-40": ("GRU", 40, 40, 64, 64),
    "rnn-40": ("RNN", 40, 40, 64, 64),
}


def workload(name: str) -> Workload:
    kind, steps, features, hidden, batch = WORKLOADS[name]
    torch.manual_seed(0)
    base = SequenceClassifier(kind, features, hidden)
    inputs = torch.randn(batch, steps, features)
    targets = torch.randint(0, 10, (batch,))
    spec = ModelSpec(name, (steps, features), batch)
    return Workload(name, spec, base, inputs, targets, torch.device("cpu"))


def _no_op(module: nn.Module, args: tuple[Tensor, ...]) -> None:
    """A forward pre-hook whose presence sends the hh sites down the per-step path."""


def per_step(model: nn.Module) -> None:
    """Observe every hh site: the recurrence then calls it once per time step."""
    for name, layer in asymprop.feedback_layers(model):
        if name.rsplit(".", 1)[-1].startswith("hh_"):
            layer.register_forward_pre_hook(_no_op)


def profile_rule(name: str, rule: str, steps: int = 5) -> None:
    """torch.profiler tables of plain and ``rule`` on one workload (self CPU time)."""
    work = workload(name)
    for spec in ("plain", rule):
        variant = build_variant(work, spec)
        for _ in range(3):
            variant.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                variant.step()
        print(f"\n### {name}, {spec}: {steps} steps\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def variants(
    work: Workload, rules: Sequence[str], stepped: bool
) -> tuple[list[Variant], dict[str, str]]:
    """plain, plain-copy and the rules (and each rule on the per-step path), warmed up."""
    built: list[Variant] = []
    failed: dict[str, str] = {}
    for spec in ["plain", PLAIN_COPY, *rules]:
        try:
            variant = build_variant(work, spec)
            for _ in range(3):
                variant.step()
        except (RuntimeError, ValueError, TypeError) as error:
            failed[spec] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            continue
        built.append(variant)
        if stepped and spec in rules:
            again = build_variant(work, spec)
            per_step(again.model)
            for _ in range(2):
                again.step()
            built.append(Variant(f"{spec} (per step)", again.model, again.optimizer, again.step))
    return built, failed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lstm-40", "lstm-100"], choices=WORKLOADS)
    parser.add_argument("--rules", nargs="+", default=["fa", "kp", "usf"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of rounds per model")
    parser.add_argument(
        "--per-step", action="store_true", help="also time each rule on the per-step path"
    )
    parser.add_argument("--profile", metavar="RULE", help="print profiles of plain and RULE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), process CPU time")
    if args.profile:
        for name in args.models:
            profile_rule(name, args.profile)
        return
    print("| model | variant | ms/step | ratio to plain | spread |")
    print("| --- | --- | --- | --- | --- |")
    device = torch.device("cpu")
    for name in args.models:
        work = workload(name)
        built, failed = variants(work, args.rules, args.per_step)
        plain, others = built[0], built[1:]
        block = choose_block(plain, device, 0.25)
        rounds = choose_rounds(built, block, device, args.budget, 40)
        timing = ab_rounds(plain, others, rounds, block, device)
        print(f"| {name} | plain | {timing.median('plain') * 1e3:.2f} | 1 | |")
        for variant in others:
            label = variant.label
            print(
                f"| {name} | {label} | {timing.median(label) * 1e3:.2f} | "
                f"{timing.ratio(label):.3f} | {timing.spread(label):.3f} |"
            )
        for spec, error in failed.items():
            print(f"| {name} | {spec} | | failed: {error} | |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
