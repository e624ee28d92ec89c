"""The papers' claims, re-measured: one named experiment per claim, its table and its figure.

    python -m asymprop.harness.reproduce                      # every item (docs/REPRODUCTION.md)
    python -m asymprop.harness.reproduce --quick              # a reduced version of every item
    python -m asymprop.harness.reproduce --only liao-digits   # one item
    python -m asymprop.harness.reproduce --reuse              # train only the runs not yet finished

Each item reads its packaged config ``asymprop/harness/configs/<item>.yaml`` (its ``quick:``
section overrides the rest under ``--quick``), trains its runs one after another on one thread
each, and writes to ``<out>/<item>/``: ``results.csv`` (one row per run), ``table.md`` (the
report's table, mean ± s.e. over seeds) and its figures (PNG, also copied to ``docs/figures/``
for a full run from a checkout).

| item | paper | what |
| --- | --- | --- |
| ``akrout-fashion-mnist`` | 001 panels a-f | test error and B/delta angles of BP, FA, SS, WM, KP |
| ``akrout-fashion-mnist-cnn`` | 001 panels a-f | the same with Liao's MNIST CNN |
| ``akrout-fashion-mnist-resnet20`` | 001 panels a-f | the same with a 20-layer ResNet |
| ``liao-digits`` | 002 Tables 2-5, C2 | sign-concordant, random feedback, BN, BM, clamped layers |
| ``liao-fashion-mnist`` | 002 Tables 2-5, C2 | the same tables on Fashion-MNIST |
| ``liao-mnist1d`` | 002 Tables 2-5, C2 | the same tables on MNIST-1D |
| ``lansdell-mlp`` | 004 Fig. 2, 4 | NP vs FA vs BP in a 784-50-20-10 sigmoid MSE net; fixed W |
| ``lansdell-autoencoder`` | 004 Table 2a, Fig. 3 | the 784-200-2-200-784 autoencoder |
| ``feedback-convergence`` | 003 eq. 14, 000 eq. 21 | KP's B - W decay, WM's mirror mode: theory |
| ``study-vit-fashion-mnist`` | beyond the seeds | every rule in a small ViT, verdicts vs criteria |
| ``study-mnist1d-sequence`` | beyond the seeds | the same for a conv1d, a transformer and a GRU |

Classification items use the ordinary run loop (:func:`asymprop.harness.experiment.train`); the
Lansdell items need an MSE loss on one-hot targets, activation or input noise and per-step
metrics, so they run :func:`asymprop.train_step` in a loop here.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import convert, feedback_layers
from ..metrics import alignment, delta_alignment
from ..mirror import mirror
from ..optim import make_optimizer
from ..train import DivergenceError, train_step
from .config import CONFIGS, config_from_dict
from .data import ENV_VAR, DatasetNotFoundError, load_dataset
from .experiment import DataCache, RunConfig, load_data, prepare, train
from .models import build_model
from .records import layers_of, mean_se, read_csv, read_yaml

__all__ = [
    "ITEMS",
    "ItemResult",
    "item_config",
    "layer_group",
    "liao_best",
    "liao_entry",
    "main",
    "run_item",
    "study",
    "study_verdict",
    "study_verdicts",
]

log = logging.getLogger(__name__)

FIGURES = Path("docs") / "figures"
"""Where the figures of docs/REPRODUCTION.md live, relative to a checkout (the working folder)."""
DPI = 100
MAX_PNG_BYTES = 150_000
"""Figures larger than this are saved with a 64-colour palette (the report keeps them small)."""


@dataclass
class ItemResult:
    """What an item produced: its table (markdown), figures, rows and wall time."""

    name: str
    table: str
    figures: list[Path]
    rows: list[dict[str, Any]]
    seconds: float
    notes: list[str] = field(default_factory=list)


def item_config(name: str, quick: bool = False) -> dict[str, Any]:
    """The packaged config ``<name>.yaml``, its ``quick:`` section merged over it if ``quick``."""
    path = CONFIGS / f"{name}.yaml"
    config = read_yaml(path)
    overrides = config.pop("quick", {}) or {}
    if quick:
        config.update(overrides)
    return config


# --- helpers ------------------------------------------------------------------------------------


def _fmt(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, se, _ = mean_se(values)
    if not math.isfinite(mean):
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text if not math.isfinite(se) else f"{text} ± {se * scale:.{digits}f}"


def _seed_table(
    headers: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    key: str,
    groups: Sequence[tuple[str, Any]],
    columns: Sequence[tuple[str, float, int]],
) -> str:
    """Markdown, one line per ``(label, value)`` of ``groups``: the rows whose ``key`` is
    ``value``, each column ``(field, scale, digits)`` as mean ± s.e. over them (:func:`_fmt`)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for label, value in groups:
        mine = [r for r in rows if r[key] == value]
        cells = [_fmt([r[field] for r in mine], scale, digits) for field, scale, digits in columns]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def _figure(rows: int, cols: int, width: float = 3.2, height: float = 2.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path, dpi: int = DPI) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    if path.stat().st_size > MAX_PNG_BYTES:  # scatter plots: a 64-colour palette is plenty
        from PIL import Image

        with Image.open(path) as image:
            small = image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)
    return path


def finished_rows(config: RunConfig) -> list[dict[str, Any]] | None:
    """The ``metrics.csv`` rows of a finished run of exactly ``config`` in its directory, or None.

    Finished: ``config.yaml`` there describes the same run (settings added since it was written
    compare at their defaults) and ``metrics.csv`` reaches the last epoch.
    """
    directory = config.run_dir
    try:
        stored = config_from_dict(RunConfig, read_yaml(directory / "config.yaml"))
        rows = read_csv(directory / "metrics.csv")
    except (OSError, ValueError, TypeError):
        return None
    if stored.to_dict() != config.to_dict() or not rows or rows[-1]["epoch"] != config.epochs:
        return None
    return rows


def _classification_run(
    settings: Mapping[str, Any],
    out: Path,
    cache: DataCache,
    freeze: str | None = None,
    reuse: bool = False,
) -> list[dict[str, Any]]:
    """One :func:`asymprop.harness.experiment.train` run; ``freeze`` clamps layers (Liao's C2).

    ``freeze="bottom"``: the last layer keeps its random initial weights and only the layers
    below learn; ``"top"``: only the last layer learns. Clamped parameters are taken out of the
    optimizer, so they never move, while errors still flow through them. ``reuse``: return the
    rows of a finished run of the same settings already in ``out`` (:func:`finished_rows`).
    """
    config = RunConfig(**{**settings, "out": str(out)})
    if reuse and (rows := finished_rows(config)) is not None:
        log.info("reusing the finished run in %s", out)
        return rows
    run = prepare(config, cache)
    if freeze is not None:
        last = {id(p) for p in feedback_layers(run.module)[-1][1].parameters()}
        everything = {id(p) for p in run.module.parameters()}
        if freeze == "bottom":
            frozen = last
        elif freeze == "top":
            frozen = everything - last
        else:
            raise ValueError(f"freeze must be 'bottom' or 'top', not {freeze!r}")
        for group in run.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in frozen]
    return train(config, run=run, plots=False)


def _final(rows: Sequence[Mapping[str, Any]], prefix: str) -> float:
    """Mean over layers of a per-layer metric in the last row (NaNs skipped)."""
    values = [v for k, v in rows[-1].items() if k.startswith(prefix) and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


# --- item 1 and 2: Akrout et al. ------------------------------------------------------------------

AKROUT_LABELS = {"bp": "BP", "fa": "FA", "usf": "SS", "wm": "WM", "kp": "KP"}


def akrout(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """Test error of BP, FA, SS (uSF + BN), WM and KP, and their B and delta angles per epoch.

    Paper: 001 panels a-f (ImageNet ResNet-18/50); here a batch-norm network on Fashion-MNIST.
    """
    started = time.perf_counter()
    cache: DataCache = {}
    rows, curves = [], {}
    for rule in config["rules"]:
        for seed in config["seeds"]:
            settings = {**config["run"], "rule": rule, "seed": seed}
            settings["rule_options"] = config.get("rule_options", {}).get(rule, {})
            run_rows = _classification_run(
                settings,
                out / "runs" / f"{rule}-seed{seed}",
                cache,
                reuse=config.get("reuse", False),
            )
            curves[(rule, seed)] = run_rows
            last = run_rows[-1]
            rows.append(
                {
                    "rule": rule,
                    "seed": seed,
                    "test_error": 1 - last["test_accuracy"],
                    "angle_deg": _final(run_rows, "angle_deg/"),
                    "delta_angle_deg": _final(run_rows, "delta_angle_deg/"),
                    "seconds": sum(r["seconds"] for r in run_rows),
                }
            )
            log.info("%s %s seed %d: %s", name, rule, seed, rows[-1])
    table = _seed_table(
        ["rule", "test error (%)", "angle B,W (deg)", "delta angle (deg)", "seconds/run"],
        rows,
        "rule",
        [(AKROUT_LABELS.get(rule, rule), rule) for rule in config["rules"]],
        [("test_error", 100, 1), ("angle_deg", 1, 1), ("delta_angle_deg", 1, 1), ("seconds", 1, 0)],
    )
    figures = [
        _akrout_error_figure(config, curves, out / f"{name}-error.png"),
        _akrout_angle_figure(config, curves, out / f"{name}-angles.png"),
    ]
    return ItemResult(name, table, figures, rows, time.perf_counter() - started)


def _akrout_error_figure(config: dict[str, Any], curves: dict[Any, Any], path: Path) -> Path:
    fig, axes = _figure(1, 1, 4.2, 3.0)
    ax = axes[0][0]
    for rule in config["rules"]:
        runs = [curves[(rule, s)] for s in config["seeds"]]
        epochs = [r["epoch"] for r in runs[0]]
        err = np.array([[100 * (1 - r["test_accuracy"]) for r in run] for run in runs])
        ax.plot(epochs, err.mean(0), label=AKROUT_LABELS.get(rule, rule))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(top=min(60.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.set_title(f"{config['run']['model']} on Fashion-MNIST, mean over seeds", fontsize=9)
    return _save(fig, path)


def _akrout_angle_figure(config: dict[str, Any], curves: dict[Any, Any], path: Path) -> Path:
    import matplotlib

    rules = [r for r in config["rules"] if r != "bp"]
    fig, axes = _figure(2, len(rules), 2.6, 2.3)
    for col, rule in enumerate(rules):
        run = curves[(rule, config["seeds"][0])]
        epochs = [r["epoch"] for r in run]
        for row, (prefix, label) in enumerate(
            [("angle_deg/", "angle B, W (deg)"), ("delta_angle_deg/", "delta angle (deg)")]
        ):
            ax = axes[row][col]
            layers = [k for k in run[0] if k.startswith(prefix)]
            for i, key in enumerate(layers):
                colour = matplotlib.colormaps["viridis"](i / max(1, len(layers) - 1))
                ax.plot(epochs, [r[key] for r in run], label=f"layer {i + 1}", color=colour)
            ax.set_ylim(0, 95)
            ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(AKROUT_LABELS.get(rule, rule))
    if len(layers) <= 6:
        axes[0][0].legend(fontsize=7)
    else:  # a deep network: colour alone says the depth
        fig.suptitle(
            f"colour: layer 1 (input, dark) to layer {len(layers)} (output, yellow)", fontsize=8
        )
    return _save(fig, path)


# --- item 3: Liao et al. -----------------------------------------------------------------------

_LIAO_RULES = {"usf": "usf", "nusf": "nusf", "brsf": "brsf", "frsf": "frsf", "rndf": "rndf"}


def liao_entry(entry: str) -> dict[str, Any]:
    """The run settings of one of Liao et al.'s table entries, from its name.

    ``"uSF+BN+BM"`` is sign-concordant feedback with batch norm and Batch Manhattan (setting 1);
    ``BM2``/``BM3`` pick the other settings; ``brSF@25`` flips 25% of the signs (Table 3, 25%
    discordant); a trailing ``" Bottom"`` or ``" Top"`` clamps layers (Experiment C2). Batch
    norm has no learnable scale/shift except in the plain ``BN`` and ``BN+BM`` entries (002
    sec. 4).

    Example:
        >>> liao_entry("brSF@25+BN+BM")["rule_options"]
        {'flip': 0.25}
    """
    name, _, freeze = entry.partition(" ")
    rule, rule_options, batchnorm, optimizer = "bp", {}, False, "sgd"
    for token in name.split("+"):
        key = token.lower()
        if key == "bn":
            batchnorm = True
        elif key in ("bm", "bm1", "bm2", "bm3"):
            optimizer = "bm1" if key == "bm" else key
        elif key == "sgd":
            continue
        else:
            base, _, percent = key.partition("@")
            if base not in _LIAO_RULES:
                raise ValueError(f"unknown token {token!r} in Liao entry {entry!r}")
            rule = _LIAO_RULES[base]
            if percent:
                rule_options["flip"] = int(percent) / 100
    return {
        "rule": rule,
        "rule_options": rule_options,
        "batchnorm": batchnorm,
        "bn_affine": batchnorm and rule == "bp",
        "optimizer": optimizer,
        "freeze": freeze.lower() or None,
    }


def liao(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """Liao et al.'s tables on a small dataset; each entry is the best of several learning rates.

    Paper: 002 Tables 2-5 and Experiment C2 (error rates, best of several learning rates).
    """
    started = time.perf_counter()
    cache: DataCache = {}
    entries: list[str] = []
    for names in config["tables"].values():
        entries += [e for e in names if e not in entries]
    rows = []
    for entry in entries:
        spec = liao_entry(entry)
        family = "bm" if spec["optimizer"].startswith("bm") else "sgd"
        for lr in config["lrs"][family]:
            for seed in config["seeds"]:
                settings = {
                    **config["run"],
                    "rule": spec["rule"],
                    "rule_options": spec["rule_options"],
                    "optimizer": spec["optimizer"],
                    "lr": lr,
                    "seed": seed,
                }
                settings["model_options"] = {
                    **settings.get("model_options", {}),
                    "batchnorm": spec["batchnorm"],
                    "bn_affine": spec["bn_affine"],
                }
                slug = entry.replace(" ", "-").replace("+", "_").replace("@", "p")
                try:
                    run_rows = _classification_run(
                        settings,
                        out / "runs" / f"{slug}-lr{lr}-seed{seed}",
                        cache,
                        spec["freeze"],
                        config.get("reuse", False),
                    )
                    error = 1 - run_rows[-1]["test_accuracy"]
                    if not math.isfinite(error):
                        error = 0.9
                except DivergenceError:
                    error = math.nan
                rows.append({"entry": entry, "lr": lr, "seed": seed, "test_error": error})
                log.info("%s %s lr %g seed %d: error %.4f", name, entry, lr, seed, error)
    best = liao_best(rows, entries)
    tables = []
    for title, names in config["tables"].items():
        lines = [f"**{title}**", "", "| entry | test error (%) | best lr |", "| --- | --- | --- |"]
        lines += [f"| {e} | {_fmt(best[e][1], 100, 2)} | {best[e][0]:g} |" for e in names]
        tables.append("\n".join(lines))
    figures = [_liao_figure(config, best, out / f"{name}.png")]
    return ItemResult(name, "\n\n".join(tables), figures, rows, time.perf_counter() - started)


def liao_best(
    rows: Sequence[Mapping[str, Any]], entries: Sequence[str]
) -> dict[str, tuple[float, list[float]]]:
    """Per entry, the learning rate with the lowest mean test error over seeds, and those
    errors (a diverged run counts as chance, 90%)."""
    best: dict[str, tuple[float, list[float]]] = {}
    for entry in entries:
        options = []
        for lr in sorted({r["lr"] for r in rows if r["entry"] == entry}):
            errors = [r["test_error"] for r in rows if r["entry"] == entry and r["lr"] == lr]
            errors = [e if math.isfinite(e) else 0.9 for e in errors]  # diverged: chance
            options.append((float(np.mean(errors)), lr, errors))
        _, lr, errors = min(options)
        best[entry] = (lr, errors)
    return best


def _liao_figure(
    config: dict[str, Any], best: dict[str, tuple[float, list[float]]], path: Path
) -> Path:
    tables = list(config["tables"].items())
    fig, axes = _figure(1, len(tables), 3.0, 3.2)
    for ax, (title, names) in zip(axes[0], tables, strict=True):
        means = [100 * float(np.mean(best[e][1])) for e in names]
        ses = [100 * mean_se(best[e][1])[1] for e in names]
        ses = [s if math.isfinite(s) else 0.0 for s in ses]
        ax.barh(range(len(names)), means, xerr=ses, color="tab:blue")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(5.0, 1.1 * max(m + e for m, e in zip(means, ses, strict=True))))
        ax.set_xlabel("test error (%)", fontsize=8)
        ax.set_title(title, fontsize=8)
    return _save(fig, path)


# --- item 4: Lansdell et al. Figure 2 and 4 ------------------------------------------------------


def _mse_onehot(outputs: Tensor, labels: Tensor) -> Tensor:
    """Lansdell's MSE loss on one-hot targets, summed over outputs, mean over examples."""
    target = F.one_hot(labels, outputs.shape[1]).to(outputs.dtype)
    return ((outputs - target) ** 2).sum(dim=1).mean()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


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
    with _threads(1):
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
        lines.append(
            f"| {label} | {_fmt([r['test_error'] for r in mine], 100)} | "
            + " | ".join(
                _pair(mine, m) for m in ("rel_error", "sign_concordance", "delta_angle_deg")
            )
            + " |"
        )
    lines += [
        "",
        f"Fixed W (ridge fit of B, gamma 0.1), after {config['fixed_w']['steps']} steps:",
        "",
        "| noise c_h | rel. error (2 / 3) | sign concordance (2 / 3) | delta angle (deg, 2 / 3) |",
        "| --- | --- | --- | --- |",
    ]
    for label in config["fixed_w"]["noise"]:
        mine = [r for r in rows if r["part"] == "fixed_w" and r["method"] == label]
        lines.append(
            f"| {label} | "
            + " | ".join(
                _pair(mine, m) for m in ("rel_error", "sign_concordance", "delta_angle_deg")
            )
            + " |"
        )
    figures = [
        _lansdell_figure(curves, config["seeds"], list(config["methods"]), out / f"{name}.png"),
        _lansdell_figure(
            fixed, fixed_seeds, list(config["fixed_w"]["noise"]), out / f"{name}-fixed-w.png"
        ),
    ]
    return ItemResult(name, "\n".join(lines), figures, rows, time.perf_counter() - started)


def _pair(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    digits = 1 if metric == "delta_angle_deg" else 2
    return " / ".join(_fmt([r[f"{metric}/{i}"] for r in rows], 1, digits) for i in (2, 3))


@dataclass
class _threads:  # noqa: N801 (a context manager used like a function)
    n: int

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


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
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(seed)
    curve: list[dict[str, Any]] = []
    step, diverged = 0, False
    for _ in range(config["epochs"]):
        if diverged:
            break
        for idx in _batches(len(x), config["batch_size"], generator):
            if step % config["log_every"] == 0:
                curve.append({"step": step, **_layer_metrics(model, _mse_onehot, *probe)})
            try:
                train_step(model, optimizer, _mse_onehot, x[idx], y[idx])
            except DivergenceError:  # the weights are those before the step: score them
                diverged = True
                break
            step += 1
    final = {"step": step, **_layer_metrics(model, _mse_onehot, *probe)}
    curve.append({**final, "diverged": diverged, "model": model})
    return curve


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
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(seed)
    curve, step = [], 0
    while step < steps:
        for idx in _batches(len(x), config["batch_size"], generator):
            if step % settings["log_every"] == 0:
                curve.append({"step": step, **_layer_metrics(model, _mse_onehot, *probe)})
            train_step(model, optimizer, _mse_onehot, x[idx], y[idx])
            step += 1
            if step >= steps:
                break
    curve.append({"step": step, **_layer_metrics(model, _mse_onehot, *probe)})
    return curve


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
    fig, axes = _figure(2, 3, 2.8, 2.2)
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
    return _save(fig, path)


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
    with _threads(1):
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
    table = _seed_table(
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
    losses: list[float] = []
    for _ in range(config["epochs"]):
        losses = []
        for idx in _batches(len(x), config["batch_size"], generator):
            batch = x[idx]
            clean = batch.flatten(1)
            noisy = batch + input_noise * torch.randn_like(batch) if input_noise else batch
            try:
                losses.append(train_step(model, optimizer, _sum_mse, noisy, clean))
            except DivergenceError:
                return model, math.nan
    for handle in noise.handles:
        handle.remove()
    return model, float(np.mean(losses))


def _ae_figure(models: dict[str, nn.Module], x: Tensor, y: Tensor, path: Path) -> Path:
    labels = list(models)
    fig, axes = _figure(2, len(labels), 1.9, 1.9)
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
    return _save(fig, path)


# --- item 6: convergence of KP and WM ------------------------------------------------------------


def feedback_convergence(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """KP: ``W - B`` shrinks as ``(1 - eta lambda)^t`` (003 eq. 14) under plain SGD; WM: mirror
    mode moves B towards ``k W`` as ``E[B_t] = (1 - lambda)^t B_0 + (1 - (1 - lambda)^t) k W``
    (000 eq. 21), up to the noise of finite mirror batches.

    Paper: 003 eq. (12)-(18); 000 App. A eq. (21)-(22), Alg. 1.
    """
    started = time.perf_counter()
    data = load_dataset(config["data"])
    x, y = data.train.tensors  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    kp_curves, wm_curves = {}, {}
    with _threads(1):
        for wd in config["kp"]["weight_decay"]:
            kp_curves[wd] = _kp_curve(config, wd, x, y)
            rows.append({"rule": "kp", "setting": f"lambda={wd}", **kp_curves[wd][-1]})
        for setting in config["wm"]["settings"]:
            key = f"eta_b={setting['eta_b']}, lambda={setting['decay']}"
            wm_curves[key] = _wm_curve(config, setting, x)
            rows.append({"rule": "wm", "setting": key, **wm_curves[key][-1]})
    lines = [
        "| rule | setting | steps | measured (last layer) | theory |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        what = "||W-B|| / ||W0-B0||" if row["rule"] == "kp" else "angle B, W (deg)"
        lines.append(
            f"| {row['rule'].upper()} | {row['setting']} | {row['step']} | "
            f"{what} = {row['measured']:.4g} | {row['theory']:.4g} |"
        )
    figures = [_convergence_figure(config, kp_curves, wm_curves, out / f"{name}.png")]
    return ItemResult(name, "\n".join(lines), figures, rows, time.perf_counter() - started)


def _kp_curve(config: dict[str, Any], wd: float, x: Tensor, y: Tensor) -> list[dict[str, Any]]:
    settings = config["kp"]
    torch.manual_seed(0)
    model = convert(
        build_model("mlp", tuple(x.shape[1:]), 10, widths=settings["widths"]), "kp", seed=0
    )
    lr = settings["lr"]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    layer = feedback_layers(model)[-1][1]
    gap0 = float((layer.weight - layer.feedback_weight).detach().norm())
    generator = torch.Generator().manual_seed(0)
    curve, step = [], 0
    while step <= settings["steps"]:
        for idx in _batches(len(x), settings["batch_size"], generator):
            if step % settings["log_every"] == 0:
                gap = float((layer.weight - layer.feedback_weight).detach().norm())
                curve.append(
                    {
                        "step": step,
                        "measured": gap / gap0,
                        "theory": (1 - lr * wd) ** step,
                        "angle_deg": alignment(model)[feedback_layers(model)[-1][0]]["angle_deg"],
                    }
                )
            train_step(model, optimizer, F.cross_entropy, x[idx], y[idx])
            step += 1
            if step > settings["steps"]:
                break
    return curve


def _wm_curve(
    config: dict[str, Any], setting: Mapping[str, Any], x: Tensor
) -> list[dict[str, Any]]:
    settings = config["wm"]
    torch.manual_seed(0)
    model = build_model("mlp", tuple(x.shape[1:]), 10, widths=settings["widths"])
    model = convert(
        model,
        "wm",
        seed=0,
        warmup_steps=0,
        mirror_batch=settings["mirror_batch"],
        eta_b=setting["eta_b"],
        decay=setting["decay"],
    )
    name, layer = feedback_layers(model)[-1]
    mirror(model, 0, example_input=x[:8])
    w = layer.weight.detach().clone()
    b0 = layer.feedback_weight.detach().clone()
    decay = setting["decay"]
    k = setting["eta_b"] * 1.0**2 * 0.5 / decay  # sigma = 1, ReLU slope 1/2
    # The plateau set by finite mirror batches (asymprop.mirror.WM): tan^2 = c n_in decay /
    # ((2 - decay) N), c = 2 - 2/pi for a ReLU drive with batch means subtracted, reached as the
    # noise accumulates, (1 - (1 - decay)^(2t)).
    c = 2 - 2 / math.pi
    tan2_floor = c * w.shape[1] * decay / ((2 - decay) * settings["mirror_batch"])
    unit = w / w.norm()
    curve = []
    for step in range(settings["steps"] + 1):
        if step % settings["log_every"] == 0 or step == settings["steps"]:
            keep = (1 - decay) ** step
            expected = keep * b0 + (1 - keep) * k * w  # 000 eq. 21 in expectation
            along = float((expected * unit).sum())
            across2 = float((expected - along * unit).norm()) ** 2
            noise2 = (1 - keep**2) * tan2_floor * float(k * w.norm()) ** 2
            theory = math.degrees(math.atan2(math.sqrt(across2 + noise2), along))
            curve.append(
                {"step": step, "measured": alignment(model)[name]["angle_deg"], "theory": theory}
            )
        if step < settings["steps"]:
            mirror(model, 1)
    return curve


def _convergence_figure(
    config: dict[str, Any],
    kp: dict[Any, list[dict[str, Any]]],
    wm: dict[str, list[dict[str, Any]]],
    path: Path,
) -> Path:
    fig, axes = _figure(1, 2, 3.6, 2.8)
    ax = axes[0][0]
    for i, (wd, curve) in enumerate(kp.items()):
        steps = [r["step"] for r in curve]
        color = f"C{i}"
        ax.semilogy(steps, [r["measured"] for r in curve], color=color, label=f"lambda={wd}")
        ax.semilogy(steps, [r["theory"] for r in curve], color=color, ls=":", lw=2)
    ax.set_title(f"KP, SGD lr {config['kp']['lr']}: ||W-B|| / ||W0-B0||", fontsize=8)
    ax.set_xlabel("step")
    ax.legend(fontsize=7, title="dotted: (1 - lr lambda)^t", title_fontsize=6)
    ax = axes[0][1]
    for i, (key, curve) in enumerate(wm.items()):
        steps = [r["step"] for r in curve]
        color = f"C{i}"
        ax.plot(steps, [r["measured"] for r in curve], color=color, label=key)
        ax.plot(steps, [r["theory"] for r in curve], color=color, ls=":", lw=2)
    ax.set_title("WM mirror mode: angle B, W (deg)", fontsize=8)
    ax.set_xlabel("mirror step")
    ax.legend(fontsize=6, title="dotted: E[B_t] (eq. 21)", title_fontsize=6)
    return _save(fig, path)


# --- beyond the seeds: the modern-architecture study ---------------------------------------------

STUDY_LABELS = {
    "bp": "BP",
    "fa": "FA",
    "usf": "SS (uSF)",
    "frsf": "SS (frSF)",
    "kp": "KP",
    "wm": "WM",
    "dfa": "DFA",
    "np": "NP",
}
STUDY_STYLE = {  # colour and marker per rule, the same in every figure
    "bp": ("black", "o"),
    "fa": ("tab:blue", "s"),
    "usf": ("tab:orange", "^"),
    "frsf": ("tab:orange", "v"),
    "kp": ("tab:green", "D"),
    "wm": ("tab:purple", "P"),
    "dfa": ("tab:red", "X"),
    "np": ("tab:brown", "*"),
}
LAYER_GROUPS: tuple[tuple[str, str], ...] = (
    ("attention", r"(^|\.)self_attn\."),
    ("transformer MLP", r"(^|\.)linear[12]$"),
    ("recurrent W_hh", r"(^|\.)hh_l\d+(_reverse)?$"),
    ("recurrent W_ih", r"(^|\.)ih_l\d+(_reverse)?$"),
    ("embedding", r"(^|\.)embed$"),
    ("conv", r"^features\."),
    ("fully connected", r"^classifier\.\d+$"),
    ("head", r"(^|\.)head$"),
)
"""Layer groups of the study's tables and figures: ``(label, regex on the module path)``; the
first match wins, a layer that matches none is in ``other``."""
STUDY_METRICS = (("angle_deg", "angle B,W (deg)"), ("delta_angle_deg", "delta angle (deg)"))
STUDY_DPI = 150


def layer_group(layer: str) -> str:
    """The :data:`LAYER_GROUPS` label of a converted layer's module path.

    Example:
        >>> layer_group("encoder.layers.0.self_attn.in_proj")
        'attention'
    """
    for label, pattern in LAYER_GROUPS:
        if re.search(pattern, layer):
            return label
    return "other"


def study_verdict(
    criterion: Mapping[str, Any], errors: Sequence[float], bp_errors: Sequence[float], chance: float
) -> tuple[bool, str]:
    """Whether a rule's test errors meet its criterion, and the bounds checked, in words.

    ``criterion`` (a config's ``criteria: {rule: ...}``, in percentage points): ``max_gap_pp``
    (mean error minus bp's at most this), ``min_gap_pp`` (at least this: the rule falls behind),
    ``below_chance_pp`` (mean error at most ``chance`` minus this); ``claim`` is its text.
    Errors are fractions; a diverged run is NaN and counts as chance. Every bound given must
    hold; a criterion without bounds is refused, so that a verdict can always fail.

    Example:
        >>> study_verdict({"max_gap_pp": 3}, [0.25, 0.27], [0.20, 0.21], 0.9)
        (False, 'gap 5.5 > 3')
    """
    bounds = ("max_gap_pp", "min_gap_pp", "below_chance_pp")
    unknown = sorted(set(criterion) - {*bounds, "claim"})
    if unknown or not set(bounds) & set(criterion):
        raise ValueError(
            f"criterion {dict(criterion)} needs one or more of {', '.join(bounds)} (and an "
            f"optional claim); unknown keys: {', '.join(unknown) or 'none'}"
        )
    mean = 100 * float(np.mean([e if math.isfinite(e) else chance for e in errors]))
    gap = mean - 100 * float(np.mean([e if math.isfinite(e) else chance for e in bp_errors]))
    checks: list[tuple[bool, str]] = []
    if "max_gap_pp" in criterion:
        bound = float(criterion["max_gap_pp"])
        checks.append((gap <= bound, f"gap {gap:.1f} {'<=' if gap <= bound else '>'} {bound:g}"))
    if "min_gap_pp" in criterion:
        bound = float(criterion["min_gap_pp"])
        checks.append((gap >= bound, f"gap {gap:.1f} {'>=' if gap >= bound else '<'} {bound:g}"))
    if "below_chance_pp" in criterion:
        below, bound = 100 * chance - mean, float(criterion["below_chance_pp"])
        sign = ">=" if below >= bound else "<"
        checks.append((below >= bound, f"{below:.1f} below chance {sign} {bound:g}"))
    met = all(ok for ok, _ in checks)
    failed = [text for ok, text in checks if not ok]
    return met, "; ".join(failed if failed else [text for _, text in checks])


def study(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """Every rule on modern architectures: test error, gap to bp, a verdict per rule against the
    config's ``criteria``, and angle(B, W) and delta angle per layer group over training.

    Each entry of ``config["models"]`` (``model``, ``model_options``, ``rule_options`` merged
    over the item's) is trained by each rule and seed with the ordinary run loop
    (:func:`_classification_run`); a run that diverges counts as chance. The criteria's sources:
    Launay et al. 2020 (DFA trains transformers, with a gap), Sanfiz & Akrout 2021 (sign
    symmetry near bp in deep convnets, FA behind), 000/001 (WM and KP keep pace), 004 (NP).
    """
    started = time.perf_counter()
    cache: DataCache = {}
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
    for label, entry in config["models"].items():
        for rule in config["rules"]:
            options = {
                **config.get("rule_options", {}).get(rule, {}),
                **entry.get("rule_options", {}).get(rule, {}),
            }
            for seed in config["seeds"]:
                settings = {
                    **config["run"],
                    **entry.get("run", {}),
                    "model": entry["model"],
                    "model_options": entry.get("model_options", {}),
                    "rule": rule,
                    "rule_options": options,
                    "seed": seed,
                }
                directory = out / "runs" / f"{label}-{rule}-seed{seed}"
                try:
                    run_rows = _classification_run(
                        settings, directory, cache, reuse=config.get("reuse", False)
                    )
                    status = "ok"
                except DivergenceError as error:  # its last finished epochs, scored as chance
                    log.warning("%s %s %s seed %d: %s", name, label, rule, seed, error)
                    run_rows, status = read_csv(directory / "metrics.csv"), "diverged"
                curves.setdefault((label, rule), []).append(run_rows)
                row: dict[str, Any] = {
                    "model": label,
                    "rule": rule,
                    "seed": seed,
                    "status": status,
                    "test_error": 1 - run_rows[-1]["test_accuracy"] if status == "ok" else math.nan,
                    "seconds": sum(r["seconds"] for r in run_rows),
                }
                for (metric, group), values in _grouped(run_rows).items():
                    row[f"{metric}/{group}/start"], row[f"{metric}/{group}/end"] = (
                        values[0],
                        values[-1],
                    )
                rows.append(row)
                log.info("%s %s %s seed %d: %s", name, label, rule, seed, row)
    chance = 1 - 1 / load_data(RunConfig(**config["run"]), True, cache).num_classes
    tables = []
    for label in config["models"]:
        mine = [r for r in rows if r["model"] == label]
        verdicts = study_verdicts(config, mine, chance)
        for row in mine:
            row["criterion_met"] = verdicts[row["rule"]][0]
        tables.append(_study_tables(config, label, mine, verdicts))
    figures = [
        _study_figure(config, curves, "delta_angle_deg", out / f"{name}-delta-angles.png"),
        _study_figure(config, curves, "angle_deg", out / f"{name}-angles.png"),
    ]
    return ItemResult(name, "\n\n".join(tables), figures, rows, time.perf_counter() - started)


def study_verdicts(
    config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], chance: float
) -> dict[str, tuple[bool, str]]:
    """Per rule with a criterion in ``config["criteria"]``, :func:`study_verdict` on the
    ``test_error`` of its ``rows`` (one model's runs) against bp's."""
    bp = [r["test_error"] for r in rows if r["rule"] == "bp"]
    return {
        rule: study_verdict(
            criterion, [r["test_error"] for r in rows if r["rule"] == rule], bp, chance
        )
        for rule, criterion in config.get("criteria", {}).items()
        if any(r["rule"] == rule for r in rows)
    }


def _grouped(run_rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[float]]:
    """Per (metric, layer group), the mean over the group's layers at every epoch (NaNs
    skipped: DFA draws no B for a layer whose input is data)."""
    layers = layers_of(run_rows[0])
    grouped: dict[tuple[str, str], list[float]] = {}
    for metric, _ in STUDY_METRICS:
        groups: dict[str, list[str]] = {}
        for layer in layers:
            groups.setdefault(layer_group(layer), []).append(f"{metric}/{layer}")
        for group, columns in groups.items():
            grouped[(metric, group)] = [_nanmean([row[c] for c in columns]) for row in run_rows]
    return grouped


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _study_tables(
    config: Mapping[str, Any],
    label: str,
    rows: Sequence[Mapping[str, Any]],
    verdicts: Mapping[str, tuple[bool, str]],
) -> str:
    """The model's error table (error, gap to bp, criterion, verdict) and its alignment tables
    (per layer group, epoch 0 -> last epoch, mean over seeds)."""
    entry = config["models"][label]
    bp = [r["test_error"] for r in rows if r["rule"] == "bp"]
    lines = [
        f"**{label}** (`{entry['model']}`, {entry.get('model_options', {})})",
        "",
        "| rule | test error (%) | gap to bp (pp) | criterion (claim) | verdict | seconds/run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    criteria = config.get("criteria", {})
    for rule in config["rules"]:
        mine = [r for r in rows if r["rule"] == rule]
        errors = [r["test_error"] for r in mine]
        diverged = sum(1 for r in mine if r["status"] != "ok")
        gap = "-" if rule == "bp" else _gap(errors, bp)
        claim = criteria.get(rule, {}).get("claim", "-")
        met, why = verdicts.get(rule, (None, ""))
        verdict = "-" if met is None else f"{'holds' if met else 'fails'} ({why})"
        error = _fmt(errors, 100) + (f" ({diverged} diverged)" if diverged else "")
        seconds = _fmt([r["seconds"] for r in mine], 1, 0)
        name = STUDY_LABELS.get(rule, rule)
        lines.append(f"| {name} | {error} | {gap} | {claim} | {verdict} | {seconds} |")
    for metric, title in STUDY_METRICS:
        groups = [g for g, _ in LAYER_GROUPS if any(f"{metric}/{g}/end" in r for r in rows)]
        groups += ["other"] if any(f"{metric}/other/end" in r for r in rows) else []
        lines += [
            "",
            f"{title}, epoch 0 → last, mean over the group's layers and the seeds:",
            "",
            "| rule | " + " | ".join(groups) + " |",
            "| --- | " + " | ".join("---" for _ in groups) + " |",
        ]
        for rule in config["rules"]:
            if rule == "bp":
                continue  # B = W: every angle is 0
            mine = [r for r in rows if r["rule"] == rule]
            cells = [
                _fmt_change(
                    [r[f"{metric}/{g}/start"] for r in mine], [r[f"{metric}/{g}/end"] for r in mine]
                )
                for g in groups
            ]
            lines.append(f"| {STUDY_LABELS.get(rule, rule)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gap(errors: Sequence[float], bp: Sequence[float]) -> str:
    """Mean error minus bp's in points, ± the s.e. of that difference (independent seeds)."""
    mean, se, _ = mean_se([e for e in errors if math.isfinite(e)])
    bp_mean, bp_se, _ = mean_se(bp)
    if not math.isfinite(mean):
        return "-"
    gap = 100 * (mean - bp_mean)
    spread = math.hypot(se, bp_se) if math.isfinite(se) and math.isfinite(bp_se) else math.nan
    return f"{gap:+.1f}" + (f" ± {100 * spread:.1f}" if math.isfinite(spread) else "")


def _fmt_change(start: Sequence[float], end: Sequence[float]) -> str:
    before, after = _nanmean(start), _nanmean(end)
    if not math.isfinite(after):
        return "-"
    return f"{before:.0f} → {after:.0f}" if math.isfinite(before) else f"{after:.0f}"


def _study_figure(
    config: Mapping[str, Any],
    curves: Mapping[tuple[str, str], Sequence[Sequence[Mapping[str, Any]]]],
    metric: str,
    path: Path,
) -> Path:
    """Rows: models; columns: test error per epoch (with the delta angles) and the metric per
    layer group over the epochs, mean over seeds, one colour and marker per rule."""
    labels = list(config["models"])
    panels: dict[str, list[str]] = {}
    for label in labels:
        runs = curves[(label, config["rules"][0])]
        groups = {layer_group(layer) for layer in layers_of(runs[0][0])}
        panels[label] = [g for g, _ in (*LAYER_GROUPS, ("other", "")) if g in groups]
    with_error = metric == "delta_angle_deg"
    cols = max(len(groups) for groups in panels.values()) + int(with_error)
    fig, axes = _figure(len(labels), cols, 2.5, 2.1)
    title = dict(STUDY_METRICS)[metric]
    for row, label in enumerate(labels):
        shown = (["test error"] if with_error else []) + panels[label]
        for col in range(len(shown), cols):
            axes[row][col].axis("off")
        for col, panel in enumerate(shown):
            ax = axes[row][col]
            for rule in config["rules"]:
                if panel != "test error" and rule == "bp":
                    continue  # B = W: every angle is 0
                runs = curves[(label, rule)]
                epochs = [r["epoch"] for r in runs[0]]
                if panel == "test error":
                    values = [[100 * (1 - r["test_accuracy"]) for r in run] for run in runs]
                else:
                    values = [_grouped(run)[(metric, panel)] for run in runs]
                length = min(len(v) for v in values)  # a diverged run stops early
                columns = zip(*(v[:length] for v in values), strict=True)  # per epoch
                mean = [_nanmean(seeds) for seeds in columns]
                colour, marker = STUDY_STYLE.get(rule, ("grey", "."))
                ax.plot(epochs[:length], mean, color=colour, marker=marker, markersize=3,
                        lw=1, label=STUDY_LABELS.get(rule, rule))  # fmt: skip
            ax.set_title(f"{label}: {panel}", fontsize=7)
            ax.set_xlabel("epoch", fontsize=7)
            ax.set_ylabel("test error (%)" if panel == "test error" else title, fontsize=7)
            ax.tick_params(labelsize=6)
            if panel != "test error":
                ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=5)
    fig.suptitle(f"{path.stem}: mean over seeds", fontsize=8)
    return _save(fig, path, dpi=STUDY_DPI)


# --- the suite ------------------------------------------------------------------------------------

ITEMS: dict[str, Callable[[str, dict[str, Any], Path], ItemResult]] = {
    "akrout-fashion-mnist": akrout,
    "akrout-fashion-mnist-cnn": akrout,
    "akrout-fashion-mnist-resnet20": akrout,
    "liao-digits": liao,
    "liao-fashion-mnist": liao,
    "liao-mnist1d": liao,
    "lansdell-mlp": lansdell_mlp,
    "lansdell-autoencoder": lansdell_autoencoder,
    "feedback-convergence": feedback_convergence,
    "study-vit-fashion-mnist": study,
    "study-mnist1d-sequence": study,
}
"""Item name -> its function; the config is the packaged ``configs/<name>.yaml``."""


def run_item(
    name: str,
    quick: bool = False,
    out: str | Path = "runs/reproduce",
    figures: Path | None = None,
    reuse: bool = False,
) -> ItemResult:
    """Run one item; write ``results.csv``, ``table.md`` and figures to ``out/<name>/``.

    ``figures``: also copy the figures there (``docs/figures`` for the report). ``reuse``: runs
    of the Akrout, Liao and study items that already finished with the same settings in ``out`` are
    read back instead of trained again (adding seeds or table entries trains only the new runs).
    """
    if name not in ITEMS:
        raise ValueError(f"unknown item {name!r}; valid: {', '.join(ITEMS)}")
    config = item_config(name, quick)
    config["reuse"] = reuse
    directory = Path(out) / name
    directory.mkdir(parents=True, exist_ok=True)
    result = ITEMS[name](name, config, directory)
    _write_rows(directory / "results.csv", result.rows)
    command = f"python -m asymprop.harness.reproduce --only {name}" + (" --quick" if quick else "")
    (directory / "table.md").write_text(
        f"{result.table}\n\nWall time: {result.seconds:.0f} s (`{command}`)\n"
    )
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        for path in result.figures:
            shutil.copy(path, figures / path.name)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m asymprop.harness.reproduce [--quick] [--only ITEM ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m asymprop.harness.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a reduced version of every item")
    parser.add_argument("--only", nargs="+", choices=list(ITEMS), help="run these items only")
    parser.add_argument("--out", default="runs/reproduce", help="output folder")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read back runs that already finished with the same settings instead of training "
        "them again (Akrout, Liao and study items)",
    )
    parser.add_argument(
        "--no-figures",
        action="store_true",
        help="do not copy figures to docs/figures (always so under --quick, and outside a "
        "checkout of asymprop)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the datasets' files are (sets ASYMPROP_DATA): the Fashion-MNIST items need "
        "its IDX files (Debian: apt-get install dataset-fashion-mnist)",
    )
    args = parser.parse_args(argv)
    if args.data_dir:
        os.environ[ENV_VAR] = args.data_dir
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("asymprop.harness.experiment").setLevel(logging.WARNING)
    # figures are copied into docs/figures only when run from a checkout (docs/REPRODUCTION.md)
    in_checkout = (FIGURES.parent / "REPRODUCTION.md").is_file()
    figures = None if (args.quick or args.no_figures or not in_checkout) else FIGURES
    for name in args.only or list(ITEMS):
        try:
            result = run_item(name, args.quick, args.out, figures, args.reuse)
        except DatasetNotFoundError as error:
            dataset = str(error).split("'")[1] if "'" in str(error) else "its dataset"
            print(
                f"asymprop reproduce: error: item {name!r} needs {dataset!r}, which is not on "
                f"this machine: pass --data-dir DIR (the folder of its files, or of a "
                f"'{dataset}' folder), set {ENV_VAR}=DIR, or on Debian apt-get install "
                f"dataset-{dataset}",
                file=sys.stderr,
            )
            return 2
        print(f"## {name} ({result.seconds:.0f} s)\n\n{result.table}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
