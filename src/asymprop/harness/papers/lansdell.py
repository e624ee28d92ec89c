"""Lansdell et al. (004): node perturbation in the 784-50-20-10 network (Fig. 2, 4, App. B)
and in the bottleneck autoencoder (Table 2a, Fig. 3)."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...convert import convert, feedback_layers
from ...metrics import alignment, delta_alignment
from ...optim import make_optimizer
from ..data import load_dataset
from ..experiment import torch_threads
from ..models import build_model
from ..plotting import panels, save_figure
from ..records import format_values
from .common import (
    DPI,
    MAX_PNG_BYTES,
    ItemResult,
    Steps,
    minibatches,
    seed_table,
    train_steps,
)

log = logging.getLogger(__name__)

# --- item 4: Lansdell et al. Figure 2 and 4 ------------------------------------------------------


def _mse_onehot(outputs: Tensor, labels: Tensor) -> Tensor:
    """Lansdell's MSE loss on one-hot targets, summed over outputs, mean over examples."""
    target = F.one_hot(labels, outputs.shape[1]).to(outputs.dtype)
    return ((outputs - target) ** 2).sum(dim=1).mean()


def _layer_metrics(model: nn.Module, loss_fn: Any, x: Tensor, y: Tensor) -> dict[str, float]:
    """Per converted layer but the first: rel. error, sign concordance, delta angle."""
    names = [name for name, _ in feedback_layers(model)][1:]  # the first layer's B is never used
    stats = alignment(model)
    deltas = delta_alignment(model, loss_fn, x, y)
    row = {}
    for i, name in enumerate(names):
        row[f"rel_error/{i + 2}"] = stats[name]["rel_error"]
        row[f"sign_concordance/{i + 2}"] = stats[name]["sign_concordance"]
        row[f"delta_angle_deg/{i + 2}"] = deltas[name]
    return row


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def lansdell_mlp(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """NP at several noise levels vs FA and BP: B vs W and delta angles over training (Fig. 2),
    and NP's ridge fit of B for fixed W (App. B, Fig. 4).

    Paper: 004 sec. 4.1, Fig. 2, App. B and C.1/C.3.
    """
    started = time.perf_counter()
    data = load_dataset(config["data"], train_size=config["train_size"])
    x_train, y_train = data.train.tensors  # type: ignore[attr-defined]
    x_test, y_test = data.test.tensors  # type: ignore[attr-defined]
    probe = (x_test[:256], y_test[:256])
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with torch_threads(1):
        for label, spec in config["methods"].items():
            for seed in config["seeds"]:
                curve = _lansdell_train(config, spec, seed, x_train, y_train, probe)
                curves[(label, seed)] = curve
                acc = _accuracy(curve[-1].pop("model"), x_test, y_test)
                rows.append(
                    {
                        "part": "train",
                        "method": label,
                        "seed": seed,
                        "test_error": 1 - acc,
                        **curve[-1],
                    }
                )
                log.info("%s %s seed %d: %s", name, label, seed, rows[-1])
        fixed: dict[tuple[str, int], list[dict[str, Any]]] = {}
        fixed_seeds = config["fixed_w"].get("seeds", config["seeds"])
        for label, noise in config["fixed_w"]["noise"].items():
            for seed in fixed_seeds:
                fixed[(label, seed)] = _lansdell_fixed(config, noise, seed, x_train, y_train, probe)
                rows.append(
                    {"part": "fixed_w", "method": label, "seed": seed, **fixed[(label, seed)][-1]}
                )
    lines = [
        "| method | test error (%) | rel. error B,W (layer 2 / 3) | sign concordance (2 / 3) "
        "| delta angle (deg, 2 / 3) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label in config["methods"]:
        mine = [r for r in rows if r["part"] == "train" and r["method"] == label]
        error = format_values([r["test_error"] for r in mine], 1, 100)
        lines.append(f"| {label} | {error} | {_pairs(mine)} |")
    lines += [
        "",
        f"Fixed W (ridge fit of B, gamma 0.1), after {config['fixed_w']['steps']} steps:",
        "",
        "| noise c_h | rel. error (2 / 3) | sign concordance (2 / 3) | delta angle (deg, 2 / 3) |",
        "| --- | --- | --- | --- |",
    ]
    for label in config["fixed_w"]["noise"]:
        mine = [r for r in rows if r["part"] == "fixed_w" and r["method"] == label]
        lines.append(f"| {label} | {_pairs(mine)} |")
    figures = [
        _lansdell_figure(curves, config["seeds"], list(config["methods"]), out / f"{name}.png"),
        _lansdell_figure(
            fixed, fixed_seeds, list(config["fixed_w"]["noise"]), out / f"{name}-fixed-w.png"
        ),
    ]
    return ItemResult(name, "\n".join(lines), figures, rows, time.perf_counter() - started)


def _pair(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    digits = 1 if metric == "delta_angle_deg" else 2
    return " / ".join(format_values([r[f"{metric}/{i}"] for r in rows], digits) for i in (2, 3))


def _pairs(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table cells of :func:`_pair` for rel. error, sign concordance and delta angle."""
    return " | ".join(_pair(rows, m) for m in ("rel_error", "sign_concordance", "delta_angle_deg"))


def _lansdell_train(
    config: dict[str, Any],
    spec: Mapping[str, Any],
    seed: int,
    x: Tensor,
    y: Tensor,
    probe: tuple[Tensor, Tensor],
) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    model = build_model("lansdell-mlp", tuple(x.shape[1:]), 10)
    model = convert(model, spec["rule"], seed=seed, **spec.get("options", {}))
    done = _mse_steps(
        model, config, seed, x, y, probe, config["log_every"], epochs=config["epochs"]
    )
    done.curve[-1].update(diverged=done.diverged, model=model)
    return done.curve


def _mse_steps(
    model: nn.Module,
    config: Mapping[str, Any],
    seed: int,
    x: Tensor,
    y: Tensor,
    probe: tuple[Tensor, Tensor],
    every: int,
    epochs: int | None = None,
    steps: int | None = None,
) -> Steps:
    """Lansdell's training (004 App. C.1): plain SGD on the MSE of one-hot targets, for
    ``epochs`` epochs or ``steps`` steps; :func:`_layer_metrics` on ``probe`` every ``every``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(seed)
    batches = minibatches(len(x), config["batch_size"], generator, epochs)
    return train_steps(
        model,
        optimizer,
        _mse_onehot,
        ((x[idx], y[idx]) for idx in itertools.islice(batches, steps)),
        lambda step: _layer_metrics(model, _mse_onehot, *probe),
        every,
    )


def _lansdell_fixed(
    config: dict[str, Any],
    noise: float,
    seed: int,
    x: Tensor,
    y: Tensor,
    probe: tuple[Tensor, Tensor],
) -> list[dict[str, Any]]:
    """W fixed (random initialisation), B fitted by NP with online ridge regression."""
    settings = config["fixed_w"]
    torch.manual_seed(seed)
    model = build_model("lansdell-mlp", tuple(x.shape[1:]), 10)
    steps = settings["steps"]
    model = convert(
        model,
        "np",
        seed=seed,
        fit="ridge",
        gamma=settings["gamma"],
        noise_std=noise,
        warmup_steps=steps + 1,
    )  # warm-up: only B learns
    return _mse_steps(model, config, seed, x, y, probe, settings["log_every"], steps=steps).curve


def _lansdell_figure(
    curves: dict[tuple[str, int], list[dict[str, Any]]],
    seeds: Sequence[int],
    labels: Sequence[str],
    path: Path,
) -> Path:
    metrics = [
        ("rel_error", "||W - B|| / ||W||"),
        ("delta_angle_deg", "delta angle (deg)"),
        ("sign_concordance", "sign concordance"),
    ]
    fig, axes = panels(2, 3, 2.8, 2.2)
    for row, layer in enumerate((2, 3)):
        for col, (metric, ylabel) in enumerate(metrics):
            ax = axes[row][col]
            for label in labels:
                runs = [curves[(label, s)] for s in seeds]
                steps = [r["step"] for r in runs[0]]
                values = np.array([[r[f"{metric}/{layer}"] for r in run] for run in runs])
                ax.plot(steps, values.mean(0), label=label)
            ax.set_title(f"layer {layer}: {ylabel}", fontsize=8)
            ax.set_xlabel("step", fontsize=8)
    axes[0][0].legend(fontsize=6)
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


# --- item 5: Lansdell et al. autoencoder ---------------------------------------------------------


def _sum_mse(outputs: Tensor, inputs: Tensor) -> Tensor:
    """Squared error summed over the 784 pixels, mean over examples (the paper's loss scale)."""
    return ((outputs - inputs.reshape(outputs.shape)) ** 2).sum(dim=1).mean()


class _ActivationNoise:
    """Adds ``N(0, std^2)`` to the output of every hidden activation while training."""

    def __init__(self, model: nn.Module, std: float) -> None:
        self.std = std
        hidden = [m for m in model if isinstance(m, nn.Tanh | nn.Identity)]  # type: ignore[attr-defined]
        self.handles = [m.register_forward_hook(self._hook) for m in hidden]

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        if module.training and self.std > 0:
            return output + self.std * torch.randn_like(output)
        return None


def lansdell_autoencoder(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """The 784-200-2-200-784 autoencoder trained by BP (SGD, Adam), FA, DAE, NP, SG, matched.

    Paper: 004 sec. 4.2, Table 2a, Fig. 3, App. C.2.
    """
    started = time.perf_counter()
    data = load_dataset(config["data"], train_size=config["train_size"], normalize=False)
    x_train, _ = data.train.tensors  # type: ignore[attr-defined]
    x_test, y_test = data.test.tensors  # type: ignore[attr-defined]
    x_test, y_test = x_test[: config["test_size"]], y_test[: config["test_size"]]
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    with torch_threads(1):
        for label, spec in config["methods"].items():
            for seed in config["seeds"]:
                model, train_loss = _ae_train(config, spec, seed, x_train)
                model.eval()
                with torch.no_grad():
                    test_loss = float(_sum_mse(model(x_test), x_test))
                rows.append(
                    {
                        "method": label,
                        "seed": seed,
                        "train_loss": train_loss,
                        "test_loss": test_loss,
                    }
                )
                models.setdefault(label, model)
                log.info("%s %s seed %d: %s", name, label, seed, rows[-1])
    table = seed_table(
        ["method", "test loss (sum of squares per image)", "train loss"],
        rows,
        "method",
        [(label, label) for label in config["methods"]],
        [("test_loss", 1, 1), ("train_loss", 1, 1)],
    )
    figures = [_ae_figure(models, x_test, y_test, out / f"{name}.png")]
    return ItemResult(name, table, figures, rows, time.perf_counter() - started)


def _ae_train(
    config: dict[str, Any], spec: Mapping[str, Any], seed: int, x: Tensor
) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    model = build_model("autoencoder", tuple(x.shape[1:]), 10)
    model = convert(model, spec["rule"], seed=seed, **spec.get("options", {}))
    noise = _ActivationNoise(model, spec.get("activation_noise", 0.0))
    optimizer = make_optimizer(
        spec.get("optimizer", "sgd"),
        model.parameters(),
        spec["lr"],
        momentum=spec.get("momentum", 0.0),
    )
    generator = torch.Generator().manual_seed(seed)
    input_noise = spec.get("input_noise", 0.0)

    def noisy_batches() -> Iterator[tuple[Tensor, Tensor]]:  # (noisy input, clean target)
        for idx in minibatches(len(x), config["batch_size"], generator, config["epochs"]):
            batch = x[idx]
            noisy = batch + input_noise * torch.randn_like(batch) if input_noise else batch
            yield noisy, batch.flatten(1)

    done = train_steps(model, optimizer, _sum_mse, noisy_batches())
    for handle in noise.handles:
        handle.remove()
    if done.diverged:
        return model, math.nan
    per_epoch = len(x) // config["batch_size"]
    return model, float(np.mean(done.losses[-per_epoch:]))  # the last epoch's


def _ae_figure(models: dict[str, nn.Module], x: Tensor, y: Tensor, path: Path) -> Path:
    labels = list(models)
    fig, axes = panels(2, len(labels), 1.9, 1.9)
    shown = x[:6]
    for col, label in enumerate(labels):
        model = models[label]
        encoder = model[:5]  # type: ignore[index]  # Flatten, Linear, Tanh, Linear, Identity
        with torch.no_grad():
            z = encoder(x).numpy()
            recon = model(shown).reshape(-1, 28, 28).numpy()
        ax = axes[0][col]
        ax.scatter(z[:, 0], z[:, 1], c=y.numpy(), cmap="tab10", s=1)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        grid = np.concatenate(
            [np.concatenate([shown[i, 0].numpy(), recon[i]], axis=1) for i in range(len(shown))]
        )
        axes[1][col].imshow(grid, cmap="gray", vmin=0, vmax=1)
        axes[1][col].axis("off")
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


ITEMS = {"lansdell-mlp": lansdell_mlp, "lansdell-autoencoder": lansdell_autoencoder}
"""This module's items (:mod:`asymprop.harness.reproduce`)."""
