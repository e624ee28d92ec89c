"""Akrout et al. (001 panels a-f): test error of BP, FA, SS, WM and KP, and the angles of B
and of the deltas per epoch, with the ordinary run loop."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..experiment import DataCache
from ..plotting import panels, save_figure
from .common import (
    DPI,
    MAX_PNG_BYTES,
    ItemResult,
    classification_run,
    final_mean,
    seed_table,
)

log = logging.getLogger(__name__)

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
            run_rows = classification_run(
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
                    "angle_deg": final_mean(run_rows, "angle_deg/"),
                    "delta_angle_deg": final_mean(run_rows, "delta_angle_deg/"),
                    "seconds": sum(r["seconds"] for r in run_rows),
                }
            )
            log.info("%s %s seed %d: %s", name, rule, seed, rows[-1])
    table = seed_table(
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
    fig, axes = panels(1, 1, 4.2, 3.0)
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
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


def _akrout_angle_figure(config: dict[str, Any], curves: dict[Any, Any], path: Path) -> Path:
    import matplotlib

    rules = [r for r in config["rules"] if r != "bp"]
    fig, axes = panels(2, len(rules), 2.6, 2.3)
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
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


ITEMS = {
    "akrout-fashion-mnist": akrout,
    "akrout-fashion-mnist-cnn": akrout,
    "akrout-fashion-mnist-resnet20": akrout,
}
"""This module's items (:mod:`asymprop.harness.reproduce`)."""
