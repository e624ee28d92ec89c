"""Learned feedback on real data: accuracy, alignment and cost of ``kp``, ``wm``, ``bp``, ``fa``.

Issue 3, must-show 4 and 6. On Fashion-MNIST (Debian's ``dataset-fashion-mnist``), for an MLP with
two hidden layers of 256 (3 epochs) and Liao et al.'s MNIST CNN (002 Table 1; 2 epochs), trains
every rule with the same seed, initial weights, data order, learning rate and weight decay, then
prints one table: test accuracy, gap to ``bp``, final per-layer angles between B and W, final
per-layer delta angles (on 1000 test images), and the wall time per training step (median over
the run, ratio to ``bp``). KP's angles are printed at every epoch (its alignment speed is set by
lr x weight decay), and WM's cost is split into the engaged step and its mirror steps, beside the
time of one forward pass of every mirrored layer on a mirror batch (000 App. B).

Run (about 8 minutes on 2 busy cores)::

    python benchmarks/learned_feedback.py

Quick check: ``--train-size 5000 --models mlp``. Options: ``--help``. WM options can be given as
``--wm key=value ...`` (e.g. ``--wm decay=0.2 mirror_batch=512``).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import asymprop
from asymprop.harness.data import load_dataset
from asymprop.harness.models import build_model
from asymprop.harness.records import parse_scalar
from asymprop.mirror import WM

MODELS = {"mlp": ("mlp", 3), "lenet": ("liao-mnist", 2)}
START = time.perf_counter()
ROUNDS = 15
STEPS_PER_ROUND = 4


def _parse_value(text: str) -> Any:
    """A ``--wm key=value`` value: ``None``, or as :func:`asymprop.harness.records.parse_scalar`."""
    return None if text == "None" else parse_scalar(text)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 2000) -> float:
    """Test accuracy in percent (eval mode, no grad)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train()
    return 100.0 * correct / len(x)


def angles(model: nn.Module) -> list[float]:
    return [a["angle_deg"] for a in asymprop.alignment(model).values()]


def fmt(values: Sequence[float]) -> str:
    return "/".join("nan" if math.isnan(v) else f"{v:.0f}" for v in values)


def plateau_table(batches: Sequence[int], decays: Sequence[float], seed: int = 0) -> None:
    """Must-show 2: WM's angle plateau for a fixed Linear(100, 50) against mirror batch and decay.

    Measured: mean angle over 50 mirror steps after ``8 / decay`` steps from a random B, and the
    mirror steps until the angle first comes within 1.2x of that plateau; predicted:
    ``atan(sqrt(c fan_in decay / ((2 - decay) N)))`` with ``c = 2 - 2/pi`` for the ReLU drive.
    """
    logging.getLogger("asymprop.mirror").setLevel(logging.ERROR)  # the lag warning of decay < 0.5
    print("\nWM plateau, fixed W, Linear(100, 50), ReLU drive, k = 1 (default eta_b):")
    print("| mirror batch | decay | plateau deg (measured) | predicted | steps to reach |")
    print("|---|---|---|---|---|")
    for batch in batches:
        for decay in decays:
            torch.manual_seed(seed)
            layer = asymprop.convert(
                nn.Linear(100, 50), "wm", seed=seed, decay=decay, mirror_batch=batch, warmup_steps=0
            )
            trace = []
            for _ in range(int(8 / decay) + 50):
                asymprop.mirror(layer, steps=1)
                trace.append(asymprop.angle_deg(layer.weight, layer.feedback_weight))
            measured = statistics.fmean(trace[-50:])
            reach = next(i + 1 for i, a in enumerate(trace) if a < 1.2 * measured)
            c = 2 - 2 / math.pi  # relative variance of a batch-centred ReLU drive
            predicted = math.degrees(math.atan(math.sqrt(c * 100 * decay / ((2 - decay) * batch))))
            print(f"| {batch} | {decay} | {measured:.1f} | {predicted:.1f} | {reach} |")


def run(
    model_name: str,
    rule: str,
    options: dict[str, Any],
    data: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    arch, epochs = MODELS[model_name]
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    if args.train_size:
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    torch.manual_seed(args.seed)
    model = asymprop.convert(
        build_model(arch, data.input_shape, data.num_classes), rule, seed=args.seed, **options
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    order = torch.Generator().manual_seed(args.seed)
    history: list[str] = [f"e0 {fmt(angles(model))}"]
    diverged = ""
    steps = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(x_train) - args.batch_size + 1, args.batch_size):
            idx = perm[i : i + args.batch_size]
            try:
                asymprop.train_step(model, optimizer, F.cross_entropy, x_train[idx], y_train[idx])
            except asymprop.DivergenceError as error:
                diverged = f"diverged at step {steps}: {error}"
                break
            steps += 1
        if diverged:
            break
        history.append(f"e{epoch + 1} {fmt(angles(model))}")
    accuracy = evaluate(model, x_test, y_test) if not diverged else float("nan")
    final_angles = angles(model)
    deltas = (
        list(
            asymprop.delta_alignment(model, F.cross_entropy, x_test[:1000], y_test[:1000]).values()
        )
        if not diverged
        else []
    )
    return {
        "model": model_name,
        "rule": rule,
        "accuracy": accuracy,
        "angles": final_angles,
        "deltas": deltas,
        "history": history,
        "diverged": diverged,
        "steps": steps,
    }


def timing(
    model_name: str, rules: Sequence[str], wm_options: dict[str, Any], data: Any, args: Any
) -> dict[str, dict[str, float]]:
    """Median wall time per training step of every rule, measured round-robin.

    Each round runs ``STEPS_PER_ROUND`` steps of every rule in turn on the same batch, so a
    change of machine load hits all rules alike. For ``wm`` it also times one mirror step alone
    and one plain forward pass of every mirrored layer on its own mirror batch (the yardstick of
    000 App. B: a mirror step costs that forward, the drive, plus a covariance op of the same
    size, the weight gradient's, plus drawing the noise).
    """
    arch, _ = MODELS[model_name]
    x_train, y_train = data.train.tensors
    x, y = x_train[: args.batch_size], y_train[: args.batch_size]
    runs = {}
    # "wm-x1": wm with the first layer excluded (left a plain layer): its B would carry the error
    # to the data, which nothing uses, so training is the same (000 Alg. 1 mirrors B_2..B_L only).
    for rule in [*rules, *(["wm-x1"] if "wm" in rules else [])]:
        torch.manual_seed(args.seed)
        net = build_model(arch, data.input_shape, data.num_classes)
        first = next(n for n, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv2d))
        model = asymprop.convert(
            net,
            rule.removesuffix("-x1"),
            seed=args.seed,
            exclude=[first] if rule == "wm-x1" else [],
            **(wm_options if rule.startswith("wm") else {}),
        )
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        for _ in range(3):  # warm-up (and WM's pure-mirror warm-up)
            asymprop.train_step(model, optimizer, F.cross_entropy, x, y)
        runs[rule] = (model, optimizer)
    samples: dict[str, list[float]] = {rule: [] for rule in runs}
    mirror_alone: list[float] = []
    forward_alone: list[float] = []
    for _ in range(ROUNDS):
        for rule, (model, optimizer) in runs.items():
            start = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                asymprop.train_step(model, optimizer, F.cross_entropy, x, y)
            samples[rule].append((time.perf_counter() - start) / STEPS_PER_ROUND)
            if rule == "wm":
                layers = [layer for _, layer in asymprop.feedback_layers(model)]
                start = time.perf_counter()
                asymprop.mirror(model, steps=STEPS_PER_ROUND)
                mirror_alone.append((time.perf_counter() - start) / STEPS_PER_ROUND)
                inputs = [torch.randn(layer.rule.noise_shape(layer)) for layer in layers]  # type: ignore[attr-defined]
                start = time.perf_counter()
                with torch.no_grad():
                    for _ in range(STEPS_PER_ROUND):
                        for layer, noise in zip(layers, inputs, strict=True):
                            layer.native_forward(noise)
                forward_alone.append((time.perf_counter() - start) / STEPS_PER_ROUND)
    result = {rule: {"step_ms": 1e3 * statistics.median(v)} for rule, v in samples.items()}
    if "wm" in result:
        model = runs["wm"][0]
        result["wm"]["mirror_ms"] = 1e3 * statistics.median(mirror_alone)
        result["wm"]["forward_ms"] = 1e3 * statistics.median(forward_alone)
        result["wm"]["batches"] = "/".join(
            str(layer.rule.noise_shape(layer)[0])  # type: ignore[attr-defined]
            for _, layer in asymprop.feedback_layers(model)
        )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--rules", default="bp,fa,kp,wm")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=0, help="0: all 60000")
    parser.add_argument("--wm", nargs="*", default=[], help="wm options as key=value")
    parser.add_argument(
        "--no-plateau", dest="plateau", action="store_false", help="skip the plateau table"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wm_options = {k: _parse_value(v) for k, v in (kv.split("=", 1) for kv in args.wm)}
    if args.plateau:
        plateau_table([64, 256, 1024, 2048], [0.5, 0.2, 0.1, 0.02])
    if not args.models:
        return
    data = load_dataset("fashion-mnist")
    print(
        f"Fashion-MNIST, SGD lr {args.lr} momentum {args.momentum} weight decay "
        f"{args.weight_decay}, batch {args.batch_size}, seed {args.seed}, "
        f"{args.threads} threads; wm options {WM(**wm_options)}",
        flush=True,
    )
    results = []
    costs: dict[str, dict[str, dict[str, float]]] = {}
    rules = args.rules.split(",")
    for model_name in args.models.split(","):
        for rule in rules:
            options = wm_options if rule == "wm" else {}
            result = run(model_name, rule, options, data, args)
            results.append(result)
            print(
                f"  {model_name} {rule}: acc {result['accuracy']:.2f}, angles(B, W) by epoch "
                f"{' | '.join(result['history'])} {result['diverged']}",
                flush=True,
            )
        costs[model_name] = timing(model_name, rules, wm_options, data, args)
    print()
    print(
        "| model | rule | test acc % | gap to bp | angle(B, W) deg per layer | "
        "delta angle deg per layer | ms/step | x bp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        name, rule = result["model"], result["rule"]
        bp = next((r for r in results if r["model"] == name and r["rule"] == "bp"), None)
        gap = result["accuracy"] - bp["accuracy"] if bp else math.nan
        step = costs[name][rule]["step_ms"]
        ratio = step / costs[name]["bp"]["step_ms"] if "bp" in costs[name] else math.nan
        print(
            f"| {name} | {rule} | {result['accuracy']:.2f} | {gap:+.2f} | "
            f"{fmt(result['angles'])} | {fmt(result['deltas'])} | {step:.1f} | {ratio:.2f} |"
        )
    for name, cost in costs.items():
        if "wm-x1" in cost:
            print(
                f"| {name} | wm, first layer excluded | (same training) | | | | "
                f"{cost['wm-x1']['step_ms']:.1f} | "
                f"{cost['wm-x1']['step_ms'] / cost['bp']['step_ms']:.2f} |"
            )
    for name, cost in costs.items():
        if "wm" in cost:
            wm = cost["wm"]
            print(
                f"\nwm on {name} (mirror batches per layer {wm['batches']}): one mirror step "
                f"{wm['mirror_ms']:.1f} ms = {wm['mirror_ms'] / wm['forward_ms']:.1f} x one plain "
                f"forward pass of every mirrored layer on its mirror batch ({wm['forward_ms']:.1f}"
                " ms); 000 App. B expects about 2 (the drive and a covariance op of the same "
                "size) plus drawing the noise."
            )
    print(f"\nwall time {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()
