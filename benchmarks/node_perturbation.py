"""Node perturbation (004) against backprop and the baselines, as the paper runs them.

Four parts, each printing a Markdown table (all numbers measured by this script):

* ``fixed-w``: App. B / Fig. 4. 784-50-20-10 sigmoid network on Fashion-MNIST with W frozen; B
  fitted by ridge (gamma 0.1) and by SGD; relative error, sign concordance and delta angle of the
  top and the middle feedback layer against steps.
* ``classify``: Fig. 2D / sec. 4.1. The same network trained on Fashion-MNIST with ``bp``, ``fa``
  and ``np`` (App. C.1: batch 32, half squared error summed over the batch, W lr 4e-4, B lr 5e-4,
  noise 0.01, 1000 warm-up steps with W frozen for np); test accuracy.
* ``autoencoder``: Fig. 3 / Table 2a. 784-200-2-200-784 (tanh, identity, tanh, relu) on
  Fashion-MNIST pixels in [0, 1], plain SGD, batch 32; test reconstruction error for ``bp``,
  ``fa``, ``np``, ``kp`` (when registered), ``sg`` and ``matched``.
* ``cost``: seconds per training step of ``np`` (and ``sg``) against ``bp``.

Run (CPU, one thread; about an hour for everything on a busy 2-core machine)::

    python benchmarks/node_perturbation.py --part all --seeds 2

Options override the budgets (``--epochs``, ``--ae-epochs``, ``--fixed-steps``); the tables go to
stdout and, with ``--out FILE``, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import asymprop
from asymprop.harness.data import load_dataset
from asymprop.harness.models import build_model
from asymprop.harness.papers.lansdell import authors_init


def half_sse(outputs: Tensor, targets: Tensor) -> Tensor:
    """The authors' loss: 0.5 * squared error summed over the batch and the outputs."""
    return 0.5 * ((outputs - targets) ** 2).sum()


def fashion(normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = load_dataset("fashion-mnist", normalize=normalize)
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    return x_train.flatten(1), y_train, x_test.flatten(1), y_test


def table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# App. B: W fixed
# ---------------------------------------------------------------------------------------------


def fixed_w(steps: int, batch: int) -> dict[str, Any]:
    x, labels, _, _ = fashion(normalize=True)
    y = F.one_hot(labels, 10).float()
    checkpoints = sorted({0, steps // 8, steps // 4, steps // 2, steps})
    results: dict[str, Any] = {}
    for label, options in (
        ("ridge gamma=0.1", {"fit": "ridge", "gamma": 0.1}),
        ("sgd lr_b=5e-4", {"fit": "sgd", "lr_b": 5e-4}),
    ):
        torch.manual_seed(0)
        model = build_model("lansdell-mlp", (1, 28, 28), 10)
        authors_init(model)
        model = asymprop.convert(model, "np", seed=0, noise_std=0.01, warmup_steps=10**9, **options)
        names = [name for name, _ in asymprop.feedback_layers(model)]
        middle, top = names[1], names[2]
        opt = torch.optim.SGD(model.parameters(), lr=4e-4)
        gen = torch.Generator().manual_seed(0)
        probe = torch.randperm(len(x), generator=gen)[:512]
        rows = []
        start = time.perf_counter()
        for step in range(steps + 1):
            if step in checkpoints:
                stats = asymprop.alignment(model)
                deltas = asymprop.delta_alignment(model, half_sse, x[probe], y[probe])
                rows.append(
                    [step]
                    + [stats[top][k] for k in ("rel_error", "sign_concordance")]
                    + [deltas[top]]
                    + [stats[middle][k] for k in ("rel_error", "sign_concordance")]
                    + [deltas[middle]]
                )
            if step < steps:
                idx = torch.randint(0, len(x), (batch,), generator=gen)
                asymprop.train_step(model, opt, half_sse, x[idx], y[idx])
        header = [
            "step",
            "top rel. error",
            "top concordance",
            "top delta (deg)",
            "middle rel. error",
            "middle concordance",
            "middle delta (deg)",
        ]
        print(f"\n### W fixed, B by {label}, batch {batch} ({time.perf_counter() - start:.0f} s)")
        print(table(header, rows))
        results[label] = {"header": header, "rows": rows}
    return results


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
) -> float:
    """Plain SGD; returns the mean seconds per engaged step (warm-up steps excluded)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(warmup_steps):  # np's warm-up: W frozen (the rule clears W's gradients)
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        asymprop.train_step(model, opt, loss_fn, x[idx], y[idx])
    steps, start = 0, time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            if len(idx) < batch:
                continue
            asymprop.train_step(model, opt, loss_fn, x[idx], y[idx])
            steps += 1
    return (time.perf_counter() - start) / steps


def classify(epochs: int, seeds: int) -> dict[str, Any]:
    x, labels, x_test, labels_test = fashion(normalize=True)
    y = F.one_hot(labels, 10).float()
    rules: dict[str, dict[str, Any]] = {
        "bp": {},
        "fa": {},
        "np": {"lr_b": 5e-4, "noise_std": 0.01, "warmup_steps": 1000},
    }
    accuracy: dict[str, list[float]] = {rule: [] for rule in rules}
    for seed in range(seeds):
        for rule, options in rules.items():
            torch.manual_seed(seed)
            model = build_model("lansdell-mlp", (1, 28, 28), 10)
            authors_init(model)
            model = asymprop.convert(model, rule, seed=seed, **options)
            warmup = int(options.get("warmup_steps", 0))
            seconds = train(
                model, half_sse, x, y, epochs=epochs, lr=4e-4, batch=32, seed=seed,
                warmup_steps=warmup,
            )  # fmt: skip
            with torch.no_grad():
                acc = float((model(x_test).argmax(1) == labels_test).float().mean())
            accuracy[rule].append(100 * acc)
            print(f"classify seed {seed} {rule}: {100 * acc:.2f}% ({seconds * 1e3:.2f} ms/step)")
    rows = [
        [rule, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)]
        for rule, v in accuracy.items()
    ]
    print(f"\n### 784-50-20-10 sigmoid, Fashion-MNIST, {epochs} epochs: test accuracy (%)")
    print(table(["rule", "mean", "std", "seeds"], rows))
    return {"accuracy": accuracy}


def autoencoder(epochs: int, seeds: int) -> dict[str, Any]:
    x, _, x_test, _ = fashion(normalize=False)
    lr = 3e-4  # the largest stable rate for bp in a pilot (1e-3 kills the ReLU output)
    rules: dict[str, dict[str, Any]] = {
        "bp": {},
        "fa": {},
        "np": {"lr_b": 1e-4, "noise_std": 0.02},
        "sg": {"lr_b": 1e-4},
        "matched": {"lr_b": lr, "weight_decay": 1e-4},
    }
    if "kp" in asymprop.RULES:
        rules["kp"] = {}
    decay = {"matched": 1e-4 / lr, "kp": 1e-4 / lr}  # W's decay matched to B's (per step)
    errors: dict[str, list[float]] = {rule: [] for rule in rules}
    for seed in range(seeds):
        for rule, options in rules.items():
            torch.manual_seed(seed)
            model = asymprop.convert(
                build_model("autoencoder", (1, 28, 28), 0), rule, seed=seed, **options
            )
            seconds = train(
                model, half_sse, x, x, epochs=epochs, lr=lr, batch=32, seed=seed,
                weight_decay=decay.get(rule, 0.0),
            )  # fmt: skip
            with torch.no_grad():
                mse = float(F.mse_loss(model(x_test), x_test))
            errors[rule].append(mse)
            print(
                f"autoencoder seed {seed} {rule}: test MSE {mse:.5f} ({seconds * 1e3:.2f} ms/step)"
            )
    rows = []
    for rule, v in errors.items():
        mean = statistics.mean(v)
        rows.append([rule, mean, 0.5 * 784 * 32 * mean, statistics.stdev(v) if len(v) > 1 else 0.0])
    print(f"\n### Autoencoder 784-200-2-200-784, Fashion-MNIST, {epochs} epochs: test error")
    print(table(["rule", "MSE per pixel", "paper's units (1/2 SSE per batch of 32)", "std"], rows))
    return {"mse": errors}


def cost(repeats: int = 7, steps: int = 100) -> dict[str, Any]:
    """Seconds per train step; rules interleaved within each repeat so load drifts cancel.

    Reported: the median over repeats of each rule's mean step time, and the median over repeats
    of its ratio to ``bp`` in the same repeat.
    """
    x, labels, _, _ = fashion(normalize=False)
    y = F.one_hot(labels, 10).float()
    rules = ("bp", "fa", "np", "sg")
    results: dict[str, Any] = {}
    rows = []
    for model_name, targets in (("lansdell-mlp", y), ("autoencoder", x)):
        for batch in (32, 256):
            models, optimizers = {}, {}
            for rule in rules:
                torch.manual_seed(0)
                models[rule] = asymprop.convert(
                    build_model(model_name, (1, 28, 28), 10), rule, seed=0
                )
                optimizers[rule] = torch.optim.SGD(models[rule].parameters(), lr=1e-6)
            samples: dict[str, list[float]] = {rule: [] for rule in rules}
            for repeat in range(repeats + 1):  # repeat 0 warms up and is not recorded
                for rule in rules:
                    start = time.perf_counter()
                    for i in range(steps if repeat else 10):
                        j = (i * batch) % (len(x) - batch)
                        asymprop.train_step(
                            models[rule], optimizers[rule], half_sse,
                            x[j : j + batch], targets[j : j + batch],
                        )  # fmt: skip
                    if repeat:
                        samples[rule].append((time.perf_counter() - start) / steps)
            for rule in rules:
                ratio = statistics.median(
                    a / b for a, b in zip(samples[rule], samples["bp"], strict=True)
                )
                median = statistics.median(samples[rule])
                rows.append([model_name, batch, rule, median * 1e3, ratio])
                results[f"{model_name}/{batch}/{rule}"] = {"seconds": median, "x_bp": ratio}
    print("\n### Time per step (one CPU thread)")
    print(table(["model", "batch", "rule", "ms / step", "x bp"], rows))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["fixed-w", "classify", "autoencoder", "cost", "all"], default="all"
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10, help="classification epochs")
    parser.add_argument("--ae-epochs", type=int, default=5, help="autoencoder epochs")
    parser.add_argument("--fixed-steps", type=int, default=4000)
    parser.add_argument("--fixed-batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = ["cost", "fixed-w", "classify", "autoencoder"] if args.part == "all" else [args.part]
    results: dict[str, Any] = {"args": vars(args), "torch": torch.__version__}
    for part in parts:
        if part == "fixed-w":
            results[part] = fixed_w(args.fixed_steps, args.fixed_batch)
        elif part == "classify":
            results[part] = classify(args.epochs, args.seeds)
        elif part == "autoencoder":
            results[part] = autoencoder(args.ae_epochs, args.seeds)
        else:
            results[part] = cost()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
