"""Why Nøkland-scaled dfa stalls on a ReLU LeNet-5 where the other rules train, and the default.

LeNet-5 (conv 6 and 16 channels 5x5, ReLU, max pooling, FC 120-84-10) on Fashion-MNIST padded
to 32x32; SGD lr 0.01, momentum 0.9, weight decay 1e-3, batch 64; test error on the first 2000
test images. Parts:

* ``--part norms``: at initialisation, on one batch, the norm of the error each converted layer
  receives at its input and of its weight gradient, for bp, fa and dfa (each scale);
* ``--part train``: test error after ``--steps`` steps per ``rule[:lr][:option=value...]``.
* ``--part growth``: weight norms and the fraction of active ReLU units every ``--every`` steps.
* ``--part resnet20``: ResNet-20 (batch norm) on unpadded Fashion-MNIST, 200 steps of SGD
  (momentum 0.9, no weight decay, batch 64): mean loss of the first and last 20 steps per spec.
* ``--part mlp``: a tanh MLP (256-256) on digits and MNIST-1D, SGD momentum 0.9, ``--steps``.

    python benchmarks/dfa_lenet.py --part norms
    python benchmarks/dfa_lenet.py --part train bp fa dfa dfa::scale=output dfa:0.001:scale=output \
        dfa::scale=input dfa::scale=input:gain=0.1
    python benchmarks/dfa_lenet.py --part train --steps 4700 bp fa dfa dfa::scale=output
    python benchmarks/dfa_lenet.py --part growth --steps 300 dfa::scale=output dfa::scale=input
    python benchmarks/dfa_lenet.py --part resnet20 dfa dfa::scale=output dfa:0.001:scale=output \
        dfa::scale=input
    python benchmarks/dfa_lenet.py --part mlp --steps 1500 bp fa dfa dfa::scale=output
    python benchmarks/dfa_lenet.py --part mlp --steps 1500 --optimizer adam dfa dfa::scale=output

Needs Fashion-MNIST (``apt-get install dataset-fashion-mnist`` or ``ASYMPROP_DATA``).
"""

from __future__ import annotations

import argparse
import ast
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import asymprop
from asymprop.harness.data import load_dataset

LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.01, 0.9, 1e-3, 64


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


def data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ds = load_dataset("fashion-mnist")
    x, y = ds.train.tensors  # type: ignore[attr-defined]
    xt, yt = ds.test.tensors  # type: ignore[attr-defined]
    pad = (2, 2, 2, 2)  # 28x28 -> 32x32, LeNet-5's input
    return F.pad(x, pad), y, F.pad(xt[:2000], pad), yt[:2000]


def parse(spec: str) -> tuple[str, float, dict[str, Any]]:
    """``"dfa:0.001:scale=input"`` -> ``("dfa", 0.001, {"scale": "input"})`` (lr may be empty)."""
    rule, *rest = spec.split(":")
    lr = float(rest[0]) if rest and rest[0] else LR
    options: dict[str, Any] = {}
    for item in rest[1:]:
        key, _, text = item.partition("=")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return rule, lr, options


def convert(rule: str, options: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    return asymprop.convert(lenet(), rule, seed=0, **options)


def norms(x: Tensor, y: Tensor) -> None:
    print("| rule | error norm at each layer's input | weight-gradient norm per layer |")
    print("| --- | --- | --- |")
    for spec in ["bp", "fa", "dfa", "dfa::scale=output", "dfa::scale=input"]:
        rule, _, options = parse(spec)
        model = convert(rule, options)
        inputs: dict[str, Tensor] = {}

        def hook(name: str, seen: dict[str, Tensor]) -> Any:
            def capture(module: nn.Module, args: tuple[Tensor, ...]) -> None:
                if args[0].requires_grad:
                    args[0].retain_grad()
                    seen[name] = args[0]

            return capture

        layers = asymprop.feedback_layers(model)
        handles = [layer.register_forward_pre_hook(hook(n, inputs)) for n, layer in layers]
        F.cross_entropy(model(x[:BATCH]), y[:BATCH]).backward()
        for handle in handles:
            handle.remove()
        errors = ", ".join(f"{n}: {float(h.grad.norm()):.3g}" for n, h in inputs.items())
        grads = ", ".join(f"{n}: {float(layer.weight.grad.norm()):.3g}" for n, layer in layers)
        print(f"| {spec} | {errors} | {grads} |")


def train(spec: str, x: Tensor, y: Tensor, xt: Tensor, yt: Tensor, steps: int, every: int) -> None:
    rule, lr, options = parse(spec)
    model = convert(rule, options)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    loss = float("nan")
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        loss = asymprop.train_step(model, opt, F.cross_entropy, x[idx], y[idx])
        if every and step % every == 0:
            with torch.no_grad():
                h, active = x[idx], []
                for module in model:
                    h = module(h)
                    if isinstance(module, nn.ReLU):
                        active.append(f"{float((h > 0).float().mean()):.2f}")
            weights = [
                f"{float(m.weight.detach().norm()):.3g}" for _, m in asymprop.feedback_layers(model)
            ]
            print(f"| {spec} | {step} | {loss:.3g} | {' '.join(weights)} | {' '.join(active)} |")
    with torch.no_grad():
        error = float((model(xt).argmax(1) != yt).float().mean())
    if not every:
        seconds = time.perf_counter() - start
        print(f"| {spec} | {lr} | {steps} | {100 * error:.1f}% | {loss:.3g} | {seconds:.0f} |")


def resnet20(specs: Sequence[str]) -> None:
    from asymprop.harness.models import build_model

    x, y = load_dataset("fashion-mnist").train.tensors  # type: ignore[attr-defined]
    print("| rule | lr | loss, first 20 steps | loss, last 20 of 200 |")
    print("| --- | --- | --- | --- |")
    for spec in specs:
        rule, lr, options = parse(spec)
        torch.manual_seed(0)
        model = asymprop.convert(build_model("resnet20", (1, 28, 28), 10), rule, seed=0, **options)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(200):
            idx = torch.randint(0, len(x), (BATCH,), generator=gen)
            losses.append(asymprop.train_step(model, opt, F.cross_entropy, x[idx], y[idx]))
        print(f"| {spec} | {lr} | {sum(losses[:20]) / 20:.3g} | {sum(losses[-20:]) / 20:.3g} |")


def mlp(specs: Sequence[str], steps: int, optimizer: str = "sgd") -> None:
    """A tanh MLP (256-256) on digits and MNIST-1D, batch 64: test error. ``sgd``: momentum
    0.9 at the spec's lr; ``adam``: Adam at lr 1e-3 (the spec's lr is ignored)."""
    print("| data | rule | lr | steps | test error |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("digits", "mnist1d"):
        ds = load_dataset(name)
        x, y = ds.train.tensors  # type: ignore[attr-defined]
        xt, yt = ds.test.tensors  # type: ignore[attr-defined]
        x, xt = x.flatten(1), xt.flatten(1)
        for spec in specs:
            rule, lr, options = parse(spec)
            torch.manual_seed(0)
            net = nn.Sequential(
                nn.Linear(x.shape[1], 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                nn.Linear(256, 10),
            )  # fmt: skip
            model = asymprop.convert(net, rule, seed=0, **options)
            opt: torch.optim.Optimizer = (
                torch.optim.Adam(model.parameters(), lr=1e-3)
                if optimizer == "adam"
                else torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
            )
            gen = torch.Generator().manual_seed(0)
            for _ in range(steps):
                idx = torch.randint(0, len(x), (BATCH,), generator=gen)
                asymprop.train_step(model, opt, F.cross_entropy, x[idx], y[idx])
            with torch.no_grad():
                error = float((model(xt).argmax(1) != yt).float().mean())
            print(f"| {name} | {spec} | {lr} | {steps} | {100 * error:.1f}% |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["norms", "train", "growth", "resnet20", "mlp"], default="norms"
    )
    parser.add_argument("specs", nargs="*", default=["bp", "fa", "dfa"])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="--part mlp")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.part == "resnet20":
        resnet20(args.specs)
        return
    if args.part == "mlp":
        mlp(args.specs, args.steps, args.optimizer)
        return
    x, y, xt, yt = data()
    if args.part == "norms":
        norms(x, y)
    elif args.part == "train":
        print("| rule | lr | steps | test error | last loss | seconds |")
        print("| --- | --- | --- | --- | --- | --- |")
        for spec in args.specs:
            train(spec, x, y, xt, yt, args.steps, every=0)
    else:
        print("| rule | step | loss | weight norms (layer order) | active ReLU fraction |")
        print("| --- | --- | --- | --- | --- |")
        for spec in args.specs:
            train(spec, x, y, xt, yt, args.steps, every=args.every)


if __name__ == "__main__":
    main()
