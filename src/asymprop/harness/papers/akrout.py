"""Akrout et al. (000, 001 panels a-f): test error of BP, FA, SS, WM and KP, the angles of B and
of the deltas per epoch, and their variants (BN's feedback path, the paper's mirror settings,
000 App. C.2/C.4, the plateau of the mirror angle per layer), with the ordinary run loop."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...convert import feedback_layers
from ...mirror import WM, record_input_shapes
from ..experiment import DataCache, RunConfig, prepare
from ..plotting import panels, save_figure
from ..records import format_values
from .common import (
    DPI,
    MAX_PNG_BYTES,
    ItemResult,
    classification_run,
    final_mean,
    seed_table,
)
from .verdicts import judge_all, verdict_table

log = logging.getLogger(__name__)

# --- items 1 and 2: Akrout et al. ----------------------------------------------------------------

AKROUT_LABELS = {"bp": "BP", "fa": "FA", "usf": "SS", "wm": "WM", "kp": "KP"}
_ENTRY_KEYS = {"key", "label", "rule", "rule_options", "run"}


@dataclass(frozen=True)
class Entry:
    """One line of an Akrout table: a rule, its options and the run settings it changes.

    ``key`` names the entry's runs (``runs/<key>-seed<s>``) and its values in the claims.
    """

    key: str
    label: str
    rule: str
    rule_options: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)


def akrout_entries(config: Mapping[str, Any]) -> list[Entry]:
    """The entries of an item config: one per name in ``rules`` (options from ``rule_options``),
    then one per mapping in ``variants`` (``key``, ``label``, ``rule``, optional
    ``rule_options`` and ``run``: settings of ``config["run"]`` it changes, e.g.
    ``bn_feedback: sigma``).

    Example:
        >>> [e.key for e in akrout_entries({"rules": ["bp"], "variants": [
        ...     {"key": "bp-sigma", "label": "BP, BN sigma", "rule": "bp",
        ...      "run": {"bn_feedback": "sigma"}}]})]
        ['bp', 'bp-sigma']
    """
    options = config.get("rule_options", {})
    entries = [
        Entry(rule, AKROUT_LABELS.get(rule, rule), rule, dict(options.get(rule, {})))
        for rule in config.get("rules", [])
    ]
    for variant in config.get("variants", []):
        unknown = sorted(set(variant) - _ENTRY_KEYS)
        missing = sorted({"key", "label", "rule"} - set(variant))
        if unknown or missing:
            raise ValueError(
                f"variant {dict(variant)}: unknown keys {unknown or 'none'}, missing "
                f"{missing or 'none'}; valid keys: {', '.join(sorted(_ENTRY_KEYS))}"
            )
        entries.append(
            Entry(
                str(variant["key"]),
                str(variant["label"]),
                str(variant["rule"]),
                dict(variant.get("rule_options", {})),
                dict(variant.get("run", {})),
            )
        )
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"entry keys must be unique, got {keys}")
    return entries


def entry_settings(config: Mapping[str, Any], entry: Entry, seed: int) -> dict[str, Any]:
    """The :class:`~asymprop.harness.experiment.RunConfig` settings of one run of ``entry``."""
    return {
        **config["run"],
        **entry.run,
        "rule": entry.rule,
        "rule_options": entry.rule_options,
        "seed": seed,
    }


def plateau_deg(fan_in: int, decay: float, pairs: float, relu: bool = True) -> float:
    """The predicted angle between B and a fixed W under weight mirrors (000 eq. 21).

    ``atan(sqrt(c fan_in decay / ((2 - decay) pairs)))``, with ``pairs = N P`` input/output
    pairs per weight and mirror step (N examples, P positions sharing the weight) and
    ``c = 2 - 2/pi`` for ReLU, 1 for the identity (:class:`asymprop.mirror.WM`, docs/rules.md).

    Example:
        >>> round(plateau_deg(fan_in=100, decay=0.5, pairs=200), 1)
        25.5
    """
    c = 2 - 2 / math.pi if relu else 1.0
    return math.degrees(math.atan(math.sqrt(c * fan_in * decay / ((2 - decay) * pairs))))


def mirror_geometry(settings: Mapping[str, Any], cache: DataCache) -> list[dict[str, Any]]:
    """Per converted layer of a ``wm`` run: fan-in, mirror batch N, output positions P per
    example sharing a weight (mean over the weight's entries) and the predicted plateau.

    Builds the run's model (:func:`~asymprop.harness.experiment.prepare`, no training) and lets
    every layer see one batch, as the run's first step does. Only for the plain mirror
    (``schedule="layerwise"``, no ``baseline``): the formula assumes one update per step and
    batch-mean subtraction.
    """
    run = prepare(RunConfig(**{**settings, "out": None}), cache)
    record_input_shapes(run.module, run.probe[0])
    geometry = []
    for name, layer in feedback_layers(run.module):
        rule = layer.rule
        assert isinstance(rule, WM)
        shape = rule.noise_shape(layer)
        positions = float(layer.pairs(shape).float().mean())
        pairs = shape[0] * positions
        geometry.append(
            {
                "layer": name,
                "fan_in": layer.fan_in,
                "N": shape[0],
                "P": positions,
                "plateau_deg": plateau_deg(
                    layer.fan_in, rule.decay, pairs, rule.nonlinearity == "relu"
                ),
            }
        )
    return geometry


def _predicts(entry: Entry) -> bool:
    options = entry.rule_options
    return (
        entry.rule == "wm"
        and options.get("schedule", "layerwise") == "layerwise"
        and options.get("baseline") is None
        and options.get("drive", "gaussian") == "gaussian"
    )


def akrout(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """Test error, final B and delta angles of each entry (:func:`akrout_entries`), judged
    against the config's ``claims`` (:mod:`.verdicts`).

    Values for the claims, per seed: ``<key>`` test error (%), ``<key>/angle`` and
    ``<key>/delta`` the mean over layers of the final angle between B and W and between the
    entry's delta and backprop's (degrees), ``<key>/angle/<i>`` and ``<key>/delta/<i>`` those of
    layer i (1: the input layer), and for plain ``wm`` entries ``<key>/plateau/<i>`` the
    predicted plateau of layer i (:func:`plateau_deg`, the same number for every seed).

    Paper: 001 panels a-f (ImageNet ResNet-18/50), 000 App. C.2, C.4, D.2, D.3; here batch-norm
    networks on Fashion-MNIST.
    """
    started = time.perf_counter()
    cache: DataCache = {}
    entries = akrout_entries(config)
    rows, curves = [], {}
    values: dict[str, list[float]] = {}
    geometries: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if _predicts(entry):
            geometries[entry.key] = mirror_geometry(
                entry_settings(config, entry, config["seeds"][0]), cache
            )
        for seed in config["seeds"]:
            run_rows = classification_run(
                entry_settings(config, entry, seed),
                out / "runs" / f"{entry.key}-seed{seed}",
                cache,
                reuse=config.get("reuse", False),
            )
            curves[(entry.key, seed)] = run_rows
            last = run_rows[-1]
            rows.append(
                {
                    "entry": entry.key,
                    "rule": entry.rule,
                    "seed": seed,
                    "test_error": 1 - last["test_accuracy"],
                    "angle_deg": final_mean(run_rows, "angle_deg/"),
                    "delta_angle_deg": final_mean(run_rows, "delta_angle_deg/"),
                    "seconds": sum(r["seconds"] for r in run_rows),
                }
            )
            log.info("%s %s seed %d: %s", name, entry.key, seed, rows[-1])
            _add_values(values, entry.key, last, rows[-1])
        for i, layer in enumerate(geometries.get(entry.key, []), 1):
            values[f"{entry.key}/plateau/{i}"] = [layer["plateau_deg"]] * len(config["seeds"])
    table = seed_table(
        ["entry", "test error (%)", "angle B,W (deg)", "delta angle (deg)", "seconds/run"],
        rows,
        "entry",
        [(entry.label, entry.key) for entry in entries],
        [("test_error", 100, 1), ("angle_deg", 1, 1), ("delta_angle_deg", 1, 1), ("seconds", 1, 0)],
    )
    if geometries:
        table += "\n\n" + _plateau_table(geometries, values, entries)
    table += "\n\n" + verdict_table(judge_all(config["claims"], values))
    figures = [
        _akrout_error_figure(config, entries, curves, out / f"{name}-error.png"),
        _akrout_angle_figure(config, entries, curves, out / f"{name}-angles.png"),
    ]
    return ItemResult(name, table, figures, rows, time.perf_counter() - started)


def _add_values(
    values: dict[str, list[float]],
    key: str,
    last: Mapping[str, Any],
    row: Mapping[str, Any],
) -> None:
    values.setdefault(key, []).append(100 * row["test_error"])
    values.setdefault(f"{key}/angle", []).append(row["angle_deg"])
    values.setdefault(f"{key}/delta", []).append(row["delta_angle_deg"])
    for prefix, short in (("angle_deg/", "angle"), ("delta_angle_deg/", "delta")):
        layers = [k for k in last if k.startswith(prefix)]
        for i, column in enumerate(layers, 1):
            values.setdefault(f"{key}/{short}/{i}", []).append(float(last[column]))


def _plateau_table(
    geometries: Mapping[str, Sequence[Mapping[str, Any]]],
    values: Mapping[str, Sequence[float]],
    entries: Sequence[Entry],
) -> str:
    """Per layer of each plain ``wm`` entry: the plateau's inputs, the prediction, and the
    measured final angles (mean ± s.e. over seeds)."""
    lines = [
        "| entry | layer | fan_in | mirror batch N | positions P | predicted plateau (deg) "
        "| angle B,W (deg) | delta angle (deg) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels = {e.key: e.label for e in entries}
    for key, layers in geometries.items():
        for i, layer in enumerate(layers, 1):
            measured = [
                format_values(values.get(f"{key}/{kind}/{i}", []), 1) for kind in ("angle", "delta")
            ]
            lines.append(
                f"| {labels[key]} | {i} ({layer['layer']}) | {layer['fan_in']} | {layer['N']} "
                f"| {layer['P']:g} | {layer['plateau_deg']:.1f} | {measured[0]} | {measured[1]} |"
            )
    return "\n".join(lines)


def _akrout_error_figure(
    config: Mapping[str, Any],
    entries: Sequence[Entry],
    curves: Mapping[Any, Any],
    path: Path,
) -> Path:
    fig, axes = panels(1, 1, 4.6 if len(entries) <= 6 else 5.6, 3.2)
    ax = axes[0][0]
    for i, entry in enumerate(entries):
        runs = [curves[(entry.key, s)] for s in config["seeds"]]
        epochs = [r["epoch"] for r in runs[0]]
        err = np.array([[100 * (1 - r["test_accuracy"]) for r in run] for run in runs])
        style = "-" if i < 10 else "--"
        ax.plot(epochs, err.mean(0), style, label=entry.label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(top=min(60.0, ax.get_ylim()[1]))
    ax.legend(fontsize=6 if len(entries) > 6 else 8)
    ax.set_title(f"{config['run']['model']} on Fashion-MNIST, mean over seeds", fontsize=9)
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


def _akrout_angle_figure(
    config: Mapping[str, Any],
    entries: Sequence[Entry],
    curves: Mapping[Any, Any],
    path: Path,
) -> Path:
    """B and delta angles per layer and epoch, seed 0, for the entries named in
    ``angle_panels`` (default: every entry whose rule is not ``bp``)."""
    import matplotlib

    chosen = config.get("angle_panels")
    shown = [e for e in entries if (e.key in chosen if chosen is not None else e.rule != "bp")]
    fig, axes = panels(2, len(shown), 2.6, 2.3)
    layers: list[str] = []
    for col, entry in enumerate(shown):
        run = curves[(entry.key, config["seeds"][0])]
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
                ax.set_title(entry.label, fontsize=8)
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
    "akrout-resnet20-bn-feedback": akrout,
    "akrout-kp-long": akrout,
    "akrout-wm-conv": akrout,
}
"""This module's items (:mod:`asymprop.harness.reproduce`)."""
