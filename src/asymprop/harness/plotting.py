"""Figures of runs, drawn from the rows of ``metrics.csv`` (matplotlib, no display needed).

* ``accuracy.png`` -- test accuracy per epoch (classification), one line per rule;
* ``loss.png`` -- train (dashed) and test (solid) loss per epoch, one line per rule: the curve
  to read for reconstruction tasks (the autoencoder), which have no accuracy;
* ``alignment.png`` -- per converted layer (one panel each, titled with its module path): the
  angle between B and W (top row, 000/001's "angles of matrices") and between the rule's error
  and backprop's (bottom row, "angles of deltas"), over epochs. Epoch 0 is the model before
  training.
* ``summary.png`` (comparisons of several rules with an accuracy) -- the field's question at a
  glance: final test accuracy against the mean delta angle over layers (how far each rule's
  errors are from backprop's), and the rules ranked by final accuracy, both +- one standard
  error over seeds.

With several seeds a line is their mean and the band its standard error. With several
(model, dataset) pairs each gets its own row of panels. Each rule has its own colour and marker
(tab20's colours and thirteen markers: no two of twenty rules share both), every figure has a
title, epochs are whole-number ticks and the axes hold all the data (epoch 0 included).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never ``pyplot``: no
global state, no GUI backend, safe in threads and tests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .records import layers_of, mean_se

__all__ = ["Curve", "panels", "plot_curves", "plot_run", "save_figure"]

Rows = Sequence[Mapping[str, Any]]
Style = tuple[Any, str, str]  # (colour, linestyle, marker) of one label
DPI = 150
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "d")


@dataclass(frozen=True)
class Curve:
    """The epochs of one rule on one (model, dataset): one ``metrics.csv`` row list per seed."""

    label: str
    group: str
    seeds: Sequence[Rows]


def plot_run(rows: Rows, out_dir: str | os.PathLike[str], title: str = "") -> list[Path]:
    """Draw one run's figures into ``out_dir``; returns the files written."""
    return plot_curves([Curve(title or "run", "", [rows])], out_dir)


def plot_curves(curves: Sequence[Curve], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Draw ``accuracy.png`` (if any run has an accuracy), ``loss.png``, ``alignment.png`` and,
    for several rules with an accuracy, ``summary.png``.

    Returns the files written, in that order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(dict.fromkeys(c.label for c in curves))
    styles = _styles(labels)
    groups = list(dict.fromkeys(c.group for c in curves))
    written = []
    if any(_finite(_column(rows, "test_accuracy")) for c in curves for rows in c.seeds):
        written.append(
            _metric_figure(curves, groups, styles, out / "accuracy.png", "test_accuracy")
        )
    written.append(_metric_figure(curves, groups, styles, out / "loss.png", "test_loss"))
    written.append(_alignment_figure(curves, groups, styles, out / "alignment.png"))
    if len(labels) > 1 and written[0].name == "accuracy.png":
        written.append(_summary_figure(curves, groups, styles, out / "summary.png"))
    return written


# --- figures ------------------------------------------------------------------------------------


def _metric_figure(
    curves: Sequence[Curve],
    groups: Sequence[str],
    styles: Mapping[str, Style],
    path: Path,
    metric: str,
) -> Path:
    fig = Figure(figsize=(6.4 * len(groups) + 1.6, 4.6), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups, strict=True):
        for curve in (c for c in curves if c.group == group):
            style = styles[curve.label]
            if metric == "test_accuracy":
                _line(ax, curve.seeds, "test_accuracy", style, curve.label, scale=100.0)
            else:  # losses: test bold, train faint
                _line(ax, curve.seeds, "test_loss", style, curve.label)
                _line(ax, curve.seeds, "train_loss", style, None, faint=True)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == "test_accuracy":
            ax.set_ylabel("test accuracy (%)")
        else:
            ax.set_ylabel("loss (test; train faint)")
            if _all_positive(curves, group):
                ax.set_yscale("log")
        ax.margins(x=0.02, y=0.05)  # every point inside the frame, none on an edge
        ax.set_title(group)
        ax.grid(alpha=0.3)
    _legend(fig, list(styles))
    what = "test accuracy" if metric == "test_accuracy" else "loss"
    fig.suptitle(f"{what} per epoch\n(mean over seeds, band +- s.e.; epoch 0: before training)",
                 fontsize=10)  # fmt: skip
    return _save(fig, path)


def _summary_figure(
    curves: Sequence[Curve], groups: Sequence[str], styles: Mapping[str, Style], path: Path
) -> Path:
    fig = Figure(figsize=(11.0, 4.2 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for (scatter, ranking), group in zip(axes, groups, strict=True):
        finals = [(c.label, _final(c)) for c in curves if c.group == group]
        for label, (acc, acc_se, angle, angle_se, _) in finals:
            colour, _, marker = styles[label]
            if math.isfinite(acc) and math.isfinite(angle):
                scatter.errorbar(angle, acc, xerr=angle_se, yerr=acc_se, fmt=marker,
                                 color=colour, ms=7, capsize=3, label=label)  # fmt: skip
        scatter.set_xlabel("mean delta angle over layers, final epoch (deg; 0 = backprop)")
        scatter.set_ylabel("final test accuracy (%)")
        scatter.set_title(f"{group}: accuracy against alignment" if group else "accuracy "
                          "against alignment")  # fmt: skip
        scatter.margins(0.08)
        scatter.grid(alpha=0.3)
        if scatter.get_legend_handles_labels()[1]:
            scatter.legend(fontsize=7, ncols=2, loc="best")
        ranked = sorted(
            (item for item in finals if math.isfinite(item[1][0])), key=lambda item: item[1][0]
        )
        for row, (label, (acc, acc_se, _, _, _)) in enumerate(ranked):
            colour, _, marker = styles[label]
            ranking.errorbar(acc, row, xerr=acc_se, fmt=marker, color=colour, ms=7, capsize=3)
        # a seed without a final accuracy (a diverged run) is left out: say how many are in
        seeds = {c.label: len(c.seeds) for c in curves if c.group == group}
        names = [
            label if n == seeds[label] else f"{label} ({n} of {seeds[label]} seeds)"
            for label, (*_, n) in ranked
        ]
        ranking.set_yticks(range(len(ranked)), names)
        ranking.set_xlabel("final test accuracy (%)")
        ranking.set_title(f"{group}: rules ranked" if group else "rules ranked")
        ranking.margins(x=0.08, y=0.05)
        ranking.grid(alpha=0.3, axis="x")
    fig.suptitle("final test accuracy and delta angle per rule (+- s.e. over seeds)")
    return _save(fig, path)


def _final(curve: Curve) -> tuple[float, float, float, float, int]:
    """Final test accuracy (%) and mean delta angle over layers, (mean, s.e.) of each over seeds
    (s.e. 0 for one seed: no bar), and how many seeds have a final accuracy.

    A seed's value is its last epoch's; a seed without a finite one is left out.
    """
    accuracies, angles = [], []
    for rows in curve.seeds:
        if not rows:
            continue
        last = rows[-1]
        accuracies.append(_number(last.get("test_accuracy")) * 100.0)
        layer_angles = [
            _number(last.get(f"delta_angle_deg/{layer}")) for layer in layers_of(last.keys())
        ]
        finite = [a for a in layer_angles if math.isfinite(a)]
        angles.append(sum(finite) / len(finite) if finite else math.nan)
    accuracy, accuracy_se, finished = mean_se(accuracies)
    angle, angle_se, counted = mean_se(angles)
    return (
        accuracy,
        accuracy_se if finished > 1 else 0.0,
        angle,
        angle_se if counted > 1 else 0.0,
        finished,
    )


def _alignment_figure(
    curves: Sequence[Curve], groups: Sequence[str], styles: Mapping[str, Style], path: Path
) -> Path:
    layers = {g: _layers(c for c in curves if c.group == g) for g in groups}
    ncols = max([len(v) for v in layers.values()] + [1])
    nrows = 2 * len(groups)
    fig = Figure(figsize=(3.2 * ncols + 1.5, 2.6 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for g, group in enumerate(groups):
        for row, (metric, ylabel) in enumerate(
            (("angle_deg", "angle(B, W) (deg)"), ("delta_angle_deg", "delta angle (deg)"))
        ):
            panel_row = axes[2 * g + row]
            for col, ax in enumerate(panel_row):
                if col >= len(layers[group]):
                    ax.set_visible(False)
                    continue
                layer = layers[group][col]
                column = f"{metric}/{layer}"
                for curve in (c for c in curves if c.group == group):
                    _line(ax, curve.seeds, column, styles[curve.label], curve.label)
                ax.set_ylim(-3, 93)
                ax.set_yticks([0, 30, 60, 90])
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.margins(x=0.02)
                ax.grid(alpha=0.3)
                ax.set_title(f"{group}: {layer}" if group else layer, fontsize=9)
                if col == 0:
                    ax.set_ylabel(ylabel)
                if 2 * g + row == nrows - 1:
                    ax.set_xlabel("epoch")
    _legend(fig, list(styles))
    fig.suptitle(
        "alignment per converted layer, by module path\n(0 deg = backprop; NaN angles not drawn)",
        fontsize=10,
    )
    return _save(fig, path)


# --- helpers ------------------------------------------------------------------------------------


def _column(rows: Rows, key: str) -> np.ndarray:
    return np.array([_number(row.get(key)) for row in rows], dtype=float)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).any())


def _line(
    ax: Axes,
    seeds: Sequence[Rows],
    key: str,
    style: Style,
    label: str | None,
    *,
    scale: float = 1.0,
    faint: bool = False,
) -> None:
    """Mean over seeds (per epoch) with a band of +- one standard error."""
    series = [(_column(rows, "epoch"), _column(rows, key) * scale) for rows in seeds if rows]
    if not series or not any(_finite(values) for _, values in series):
        return
    length = min(len(epochs) for epochs, _ in series)
    epochs = series[0][0][:length]
    values = np.stack([v[:length] for _, v in series])  # (seeds, epochs)
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    total = np.where(finite, values, 0.0).sum(axis=0)
    mean = np.divide(total, count, out=np.full(length, np.nan), where=count > 0)
    colour, linestyle, marker = style
    width, alpha = (0.8, 0.45) if faint else (1.5, 1.0)
    ax.plot(epochs, mean, color=colour, label=label, linestyle=linestyle, lw=width, alpha=alpha,
            marker=None if faint else marker, ms=4, markevery=max(1, length // 12))  # fmt: skip
    if len(series) > 1:
        deviation = np.where(finite, values - mean, 0.0)
        var = np.divide(
            (deviation**2).sum(axis=0), count - 1, out=np.full(length, np.nan), where=count > 1
        )
        se = np.sqrt(var / np.maximum(count, 1))
        ax.fill_between(epochs, mean - se, mean + se, color=colour, alpha=0.2, linewidth=0)


def _layers(curves: Any) -> list[str]:
    names: list[str] = []
    for curve in curves:
        for rows in curve.seeds:
            if rows:
                names += [n for n in layers_of(rows[0].keys()) if n not in names]
    return names


def _all_positive(curves: Sequence[Curve], group: str) -> bool:
    values = [
        _column(rows, key)
        for c in curves
        if c.group == group
        for rows in c.seeds
        for key in ("train_loss", "test_loss")
    ]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    return finite.size > 0 and bool((finite > 0).all())


def _styles(labels: Sequence[str]) -> dict[str, Style]:
    """A colour, line style and marker per label: tab20's dark shades then its light ones,
    thirteen markers; no two of twenty labels share colour and marker, more also change dash."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    colours = [cmap(i) for i in range(0, 20, 2)] + [cmap(i) for i in range(1, 20, 2)]
    dashes = ("-", "--", ":", "-.")
    return {
        label: (colours[i % 20], dashes[(i // 20) % len(dashes)], MARKERS[i % len(MARKERS)])
        for i, label in enumerate(labels)
    }


def _legend(fig: Figure, order: Sequence[str]) -> None:
    """One legend for the figure, labels in ``order`` (a label may be missing from some panels)."""
    handles: dict[str, Any] = {}
    for axis in fig.axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        labels = [label for label in order if label in handles]
        fig.legend([handles[k] for k in labels], labels, loc="outside right upper", fontsize=8)


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path)


def panels(rows: int, cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows`` x ``cols`` panels of ``width`` x ``height`` inches each, laid out
    tight when drawn; ``axes[row][col]`` (always two-dimensional). No pyplot."""
    fig = Figure(figsize=(width * cols, height * rows), layout="tight")
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig: Figure, path: Path, dpi: int = DPI, max_bytes: int | None = None) -> Path:
    """Write ``fig`` to ``path`` as a PNG at ``dpi``, atomically (a temporary file renamed).

    ``max_bytes``: a PNG larger than this is saved again with a 64-colour palette (scatter
    plots of thousands of points; the report keeps its figures small).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    if max_bytes is not None and tmp.stat().st_size > max_bytes:
        from PIL import Image

        with Image.open(tmp) as image:
            small = image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        small.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path
