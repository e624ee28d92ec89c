"""Figures of runs, drawn from the rows of ``metrics.csv`` (matplotlib, no display needed).

* ``accuracy.png`` -- test accuracy per epoch (classification), one line per rule;
* ``loss.png`` -- train (dashed) and test (solid) loss per epoch, one line per rule: the curve
  to read for reconstruction tasks (the autoencoder), which have no accuracy;
* ``alignment.png`` -- per converted layer (one panel each): the angle between B and W (top
  row, 000/001's "angles of matrices") and between the rule's error and backprop's (bottom row,
  "angles of deltas"), over epochs. Epoch 0 is the model before training.

With several seeds a line is their mean and the band its standard error. With several
(model, dataset) pairs each gets its own row of panels.

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

from .records import layers_of

__all__ = ["Curve", "plot_curves", "plot_run"]

Rows = Sequence[Mapping[str, Any]]
Style = tuple[Any, str]  # (colour, linestyle) of one label


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
    """Draw ``accuracy.png`` (if any run has an accuracy), ``loss.png`` and ``alignment.png``.

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
    return written


# --- figures ------------------------------------------------------------------------------------


def _metric_figure(
    curves: Sequence[Curve],
    groups: Sequence[str],
    styles: Mapping[str, Style],
    path: Path,
    metric: str,
) -> Path:
    fig = Figure(figsize=(6.4 * len(groups), 4.4), layout="constrained")
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
        if metric == "test_accuracy":
            ax.set_ylabel("test accuracy (%)")
            _zoom_past_first_epoch(ax, curves, group)
        else:
            ax.set_ylabel("loss (test; train faint)")
            if _all_positive(curves, group):
                ax.set_yscale("log")
        ax.set_title(group)
        ax.grid(alpha=0.3)
    _legend(fig, list(styles))
    return _save(fig, path)


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
                ax.grid(alpha=0.3)
                ax.set_title(f"{group}: layer {layer}" if group else f"layer {layer}", fontsize=9)
                if col == 0:
                    ax.set_ylabel(ylabel)
                if 2 * g + row == nrows - 1:
                    ax.set_xlabel("epoch")
    _legend(fig, list(styles))
    fig.suptitle("alignment per converted layer (0 deg = backprop; NaN angles are not drawn)")
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
    colour, linestyle = style
    width, alpha = (0.8, 0.45) if faint else (1.5, 1.0)
    ax.plot(epochs, mean, color=colour, label=label, linestyle=linestyle, lw=width, alpha=alpha)
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


def _zoom_past_first_epoch(ax: Axes, curves: Sequence[Curve], group: str) -> None:
    """Accuracy axis from the lowest value after epoch 0 (chance level would flatten the rest)."""
    values = [
        _column(rows, "test_accuracy")[_column(rows, "epoch") > 0] * 100.0
        for c in curves
        if c.group == group
        for rows in c.seeds
    ]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if finite.size:
        low = float(finite.min())
        ax.set_ylim(max(0.0, low - 0.05 * (100.5 - low)), 100.5)


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
    """tab10's colours, solid for the first ten labels, then dashed, then dotted."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    dashes = ("-", "--", ":", "-.")
    return {
        label: (cmap(i % 10), dashes[(i // 10) % len(dashes)]) for i, label in enumerate(labels)
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
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path
