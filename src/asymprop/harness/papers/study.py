"""Beyond the seeds: every rule on modern architectures (a ViT, a conv1d, a transformer and a
GRU), verdicts against criteria written before the runs."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...train import DivergenceError
from ..experiment import DataCache, RunConfig, load_data
from ..plotting import panels, save_figure
from ..records import format_values, layers_of, mean_se, read_csv
from .common import (
    MAX_PNG_BYTES,
    ItemResult,
    classification_run,
    nanmean,
)

log = logging.getLogger(__name__)

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
    (:func:`classification_run`); a run that diverges counts as chance. The criteria's sources:
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
                    run_rows = classification_run(
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
            grouped[(metric, group)] = [nanmean([row[c] for c in columns]) for row in run_rows]
    return grouped


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
        error = format_values(errors, 1, 100) + (f" ({diverged} diverged)" if diverged else "")
        seconds = format_values([r["seconds"] for r in mine], 0)
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
    before, after = nanmean(start), nanmean(end)
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
    group_panels: dict[str, list[str]] = {}
    for label in labels:
        runs = curves[(label, config["rules"][0])]
        groups = {layer_group(layer) for layer in layers_of(runs[0][0])}
        group_panels[label] = [g for g, _ in (*LAYER_GROUPS, ("other", "")) if g in groups]
    with_error = metric == "delta_angle_deg"
    cols = max(len(groups) for groups in group_panels.values()) + int(with_error)
    fig, axes = panels(len(labels), cols, 2.5, 2.1)
    title = dict(STUDY_METRICS)[metric]
    for row, label in enumerate(labels):
        shown = (["test error"] if with_error else []) + group_panels[label]
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
                mean = [nanmean(seeds) for seeds in columns]
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
    return save_figure(fig, path, max_bytes=MAX_PNG_BYTES)  # plotting's DPI


ITEMS = {"study-vit-fashion-mnist": study, "study-mnist1d-sequence": study}
"""This module's items (:mod:`asymprop.harness.reproduce`)."""
