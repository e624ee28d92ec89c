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
from asymprop.data import load_dataset
from asymprop.mirror import WM
from asymprop.models import build_model

MODELS = {"mlp": ("mlp", 3), "lenet": ("liao-mnist", 2)}


def _parse_value(text: str) -> Any:
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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


def mirror_costs(model: nn.Module, repeats: int = 5) -> tuple[float, float]:
    """Seconds for one mirror step of every WM layer, and for one plain forward pass of every
    mirrored layer on its mirror batch (the App. B yardstick)."""
    layers = [layer for _, layer in asymprop.feedback_layers(model)]
    rule = layers[0].rule
    assert isinstance(rule, WM)
    start = time.perf_counter()
    asymprop.mirror(model, steps=repeats)
    per_step = (time.perf_counter() - start) / repeats
    inputs = [torch.randn(rule.noise_shape(layer)) for layer in layers]
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(repeats):
            for layer, x in zip(layers, inputs, strict=True):
                layer.native_forward(x)
    return per_step, (time.perf_counter() - start) / repeats


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
    step_times: list[float] = []
    mirror_times: list[float] = []
    history: list[str] = [f"e0 {fmt(angles(model))}"]
    diverged = ""
    steps = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(x_train) - args.batch_size + 1, args.batch_size):
            idx = perm[i : i + args.batch_size]
            start = time.perf_counter()
            try:
                asymprop.train_step(model, optimizer, F.cross_entropy, x_train[idx], y_train[idx])
            except asymprop.DivergenceError as error:
                diverged = f"diverged at step {steps}: {error}"
                break
            step_times.append(time.perf_counter() - start)
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
    if rule == "wm" and not diverged:
        # the engaged part of a WM step is the whole step minus its mirror steps, timed here
        per_mirror, per_forward = mirror_costs(model)
        mirror_times = [per_mirror * model_rule(model).mirror_steps, per_forward]
    return {
        "model": model_name,
        "rule": rule,
        "accuracy": accuracy,
        "angles": final_angles,
        "deltas": deltas,
        "step_ms": 1e3 * statistics.median(step_times[1:]) if len(step_times) > 1 else math.nan,
        "mirror_ms": [1e3 * t for t in mirror_times],
        "history": history,
        "diverged": diverged,
        "steps": steps,
    }


def model_rule(model: nn.Module) -> WM:
    rule = asymprop.feedback_layers(model)[0][1].rule
    assert isinstance(rule, WM)
    return rule


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
    for model_name in args.models.split(","):
        for rule in args.rules.split(","):
            options = wm_options if rule == "wm" else {}
            result = run(model_name, rule, options, data, args)
            results.append(result)
            print(
                f"  {model_name} {rule}: acc {result['accuracy']:.2f} "
                f"angles by epoch {' | '.join(result['history'])} {result['diverged']}",
                flush=True,
            )
    print()
    print(
        "| model | rule | test acc % | gap to bp | angle(B, W) deg per layer | "
        "delta angle deg per layer | ms/step | x bp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        bp = next((r for r in results if r["model"] == result["model"] and r["rule"] == "bp"), None)
        gap = result["accuracy"] - bp["accuracy"] if bp else math.nan
        ratio = result["step_ms"] / bp["step_ms"] if bp else math.nan
        print(
            f"| {result['model']} | {result['rule']} | {result['accuracy']:.2f} | {gap:+.2f} | "
            f"{fmt(result['angles'])} | {fmt(result['deltas'])} | {result['step_ms']:.1f} | "
            f"{ratio:.2f} |"
        )
    for result in results:
        if result["mirror_ms"]:
            mirror, forward = result["mirror_ms"]
            print(
                f"\nwm on {result['model']}: mirror steps {mirror:.1f} ms per engaged step, "
                f"engaged part {result['step_ms'] - mirror:.1f} ms; one forward pass of every "
                f"mirrored layer on a mirror batch {forward:.1f} ms (000 App. B: mirror step ~ "
                "drive forward + covariance, i.e. about 2 such passes)"
            )


if __name__ == "__main__":
    main()
