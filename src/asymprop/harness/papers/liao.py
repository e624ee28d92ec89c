"""Liao et al. (002 Tables 2-5, Experiment C2): sign-concordant and random feedback, batch
norm, Batch Manhattan and clamped layers, each entry the best of several learning rates."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...train import DivergenceError
from ..experiment import DataCache
from ..plotting import panels, save_figure
from ..records import format_values, mean_se
from .common import (
    DPI,
    MAX_PNG_BYTES,
    ItemResult,
    classification_run,
)

log = logging.getLogger(__name__)

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
                    run_rows = classification_run(
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
        lines += [f"| {e} | {format_values(best[e][1], 2, 100)} | {best[e][0]:g} |" for e in names]
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
    fig, axes = panels(1, len(tables), 3.0, 3.2)
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
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


ITEMS = {"liao-digits": liao, "liao-fashion-mnist": liao, "liao-mnist1d": liao}
"""This module's items (:mod:`asymprop.harness.reproduce`)."""
