"""Liao et al. (002 Tables 2-5, Experiment C2 and sec. 1 (VI)): sign-concordant and random
feedback, batch norm, Batch Manhattan and clamped layers, each entry at a learning rate chosen by
a seed of its own and reported on three held-out seeds.

The learning-rate protocol (every item here). 002 sec. 5 ran each {model, dataset} pair at its
base learning rate times 100, 10, 1, 0.1 and 0.01 and reported the best test error of the five.
Here, stage 1 trains each entry at seed 0 at those five learning rates around its family's base
(the SGD family and the Batch Manhattan family have different bases, in the item's config); if
the lowest error sits at an edge of the grid, the grid is extended by one decade on that side,
at most twice (:func:`select_lr`). Stage 2 trains the chosen learning rate with the held-out
seeds 1, 2 and 3, and only those are reported (mean ± s.e.). The selection seed is not reported,
so the reported error is not biased down by the choice among learning rates, unlike the paper's
best-on-test (the held-out seeds share the test set with the selection run: they differ in
weights, feedback weights and data order). A run that diverges, or ends with a non-finite
accuracy, counts as chance (90% error).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..experiment import DataCache
from ..plotting import panels, save_figure
from ..records import format_values, mean_se
from .common import (
    DPI,
    MAX_PNG_BYTES,
    ItemResult,
    or_chance,
    run_error,
    run_slug,
)
from .verdicts import judge_all, verdict_table

log = logging.getLogger(__name__)

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


# --- the learning-rate protocol ------------------------------------------------------------------


def lr_grid(base: float, factors: Sequence[float]) -> list[float]:
    """``base`` times each of ``factors``, rounded to 3 significant digits, smallest first.

    Example:
        >>> lr_grid(0.01, [100, 10, 1, 0.1, 0.01])
        [0.0001, 0.001, 0.01, 0.1, 1.0]
    """
    if base <= 0 or not factors or any(f <= 0 for f in factors):
        raise ValueError(f"need a positive base lr and positive factors, got {base}, {factors}")
    return sorted({float(f"{base * f:.3g}") for f in factors})


def select_lr(
    error_at: Callable[[float], float], grid: Sequence[float], extensions: int = 2
) -> tuple[float, dict[float, float]]:
    """Stage 1 of the protocol (module docstring): the learning rate of lowest error, and every
    learning rate tried with its error.

    ``error_at(lr)`` trains the selection seed; a non-finite error (a diverged run) loses to
    every finite one (it is tried as infinite, and so never chosen while a run at another lr
    finished), and is recorded as ``inf`` in the learning rates tried.
    While the lowest error sits at an edge of the learning rates tried, one more decade is tried
    beyond that edge (lr x 10 or lr / 10), at most ``extensions`` times. Ties go to the smaller
    learning rate.

    Example:
        >>> select_lr(lambda lr: abs(math.log10(lr) + 5), [1e-3, 1e-2], extensions=1)
        (0.0001, {0.001: 2.0, 0.01: 3.0, 0.0001: 1.0})
    """
    if not grid or extensions < 0:
        raise ValueError(f"need a non-empty grid and extensions >= 0, got {grid}, {extensions}")

    def measured(lr: float) -> float:
        error = error_at(lr)
        return error if math.isfinite(error) else math.inf

    tried = {lr: measured(lr) for lr in sorted(grid)}
    for _ in range(extensions):
        best = min(tried, key=lambda lr: (tried[lr], lr))
        low, high = min(tried), max(tried)
        if len(tried) > 1 and best == low:
            new = float(f"{low / 10:.3g}")
        elif len(tried) > 1 and best == high:
            new = float(f"{high * 10:.3g}")
        else:
            break
        tried[new] = measured(new)
    return min(tried, key=lambda lr: (tried[lr], lr)), tried


@dataclass
class Choice:
    """One entry under the protocol: the chosen lr, every lr tried (selection-seed error) and the
    held-out seeds' errors at the chosen lr (fractions; a diverged run counts as chance)."""

    lr: float
    tried: dict[float, float]
    errors: list[float]


class _Runs:
    """Trains the runs of an item once each: a second entry with the same settings (``BM`` and
    ``BM1``) reads the first one's error; every run is a row of the item's CSV."""

    def __init__(self, name: str, config: Mapping[str, Any], out: Path) -> None:
        self.name, self.config, self.out = name, config, out
        self.cache: DataCache = {}
        self.rows: list[dict[str, Any]] = []
        self.errors: dict[str, float] = {}
        protocol = config["protocol"]
        self.select_seed = int(protocol["select_seed"])
        self.seeds = [int(s) for s in protocol["seeds"]]
        if self.select_seed in self.seeds:
            raise ValueError(
                f"the selection seed {self.select_seed} must not be one of the reported seeds "
                f"{self.seeds}"
            )
        self.factors = [float(f) for f in protocol["factors"]]
        self.extensions = int(protocol["extensions"])

    def error(
        self, entry: str, lr: float, seed: int, stage: str, run: Mapping[str, Any], tag: str = ""
    ) -> float:
        """The test error of ``entry`` at ``lr`` and ``seed`` with run settings ``run`` (NaN if
        the run diverged)."""
        spec = liao_entry(entry)
        settings = {
            **run,
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
        key = json.dumps([settings, spec["freeze"]], sort_keys=True)
        if key not in self.errors:
            directory = self.out / "runs" / f"{run_slug(entry)}{tag}-lr{lr:g}-seed{seed}"
            reuse = bool(self.config.get("reuse", False))
            error, _ = run_error(settings, directory, self.cache, spec["freeze"], reuse)
            self.errors[key] = error  # NaN: diverged (chance in the reported errors)
            log.info("%s %s%s lr %g seed %d: error %.4f", self.name, entry, tag, lr, seed, error)
        error = self.errors[key]
        extra = {k: run[k] for k in ("train_size", "batch_size") if tag and k in run}
        self.rows.append(
            {"entry": entry, **extra, "stage": stage, "lr": lr, "seed": seed, "test_error": error}
        )
        return error

    def choose(self, entry: str, run: Mapping[str, Any], tag: str = "") -> Choice:
        """The protocol (module docstring) for one entry under run settings ``run``."""
        family = "bm" if liao_entry(entry)["optimizer"].startswith("bm") else "sgd"
        grid = lr_grid(float(self.config["lr_base"][family]), self.factors)
        lr, tried = select_lr(
            lambda lr: self.error(entry, lr, self.select_seed, "select", run, tag),
            grid,
            self.extensions,
        )
        errors = [or_chance(self.error(entry, lr, seed, "report", run, tag)) for seed in self.seeds]
        return Choice(lr, tried, errors)


def _tried(choice: Choice) -> str:
    return ", ".join(
        f"{lr:g}: " + (f"{100 * e:.1f}" if math.isfinite(e) else "diverged")
        for lr, e in sorted(choice.tried.items())
    )


def liao(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """Liao et al.'s tables on a small dataset, each entry under the learning-rate protocol of
    the module docstring, and the config's claims judged on the held-out seeds.

    Paper: 002 Tables 2-5 and Experiment C2 (error rates; the paper's is the best of five
    learning rates on the test set, ours the held-out seeds at the lr chosen by seed 0).
    Values for the claims: each entry's test error (%) per held-out seed, and for each ``[A,
    B]`` of the config's ``differences`` the value ``"A - B"``, A's error minus B's, seed by
    seed.
    """
    started = time.perf_counter()
    runs = _Runs(name, config, out)
    entries: list[str] = []
    for names in config["tables"].values():
        entries += [e for e in names if e not in entries]
    chosen = {entry: runs.choose(entry, config["run"]) for entry in entries}
    seeds = ", ".join(str(s) for s in runs.seeds)
    tables = []
    for title, names in config["tables"].items():
        lines = [
            f"**{title}**",
            "",
            f"| entry | test error (%), seeds {seeds} | chosen lr | lrs tried: seed "
            f"{runs.select_seed} error (%) |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {e} | {format_values(chosen[e].errors, 2, 100)} | {chosen[e].lr:g} | "
            f"{_tried(chosen[e])} |"
            for e in names
        ]
        tables.append("\n".join(lines))
    values = {e: [100 * x for x in c.errors] for e, c in chosen.items()}
    for a, b in config.get("differences", []):
        values[f"{a} - {b}"] = [
            x - y for x, y in zip(values[a], values[b], strict=True)
        ]  # seed by seed
    tables.append(verdict_table(judge_all(config.get("claims", []), values)))
    figures = [_liao_figure(config, chosen, out / f"{name}.png")]
    return ItemResult(name, "\n\n".join(tables), figures, runs.rows, time.perf_counter() - started)


def liao_best(
    rows: Sequence[Mapping[str, Any]], entries: Sequence[str]
) -> dict[str, tuple[float, list[float]]]:
    """Per entry, the chosen learning rate and the reported errors (a diverged run counts as
    chance, 90%, in the errors, and loses to any finished run in the choice): the protocol's
    choice read back from an item's rows (``results.csv``).

    The chosen lr has the lowest mean error over the entry's ``stage == "select"`` rows; the
    errors are its ``stage == "report"`` rows at that lr (the held-out seeds). A row without a
    ``stage`` counts as both: the best mean over all seeds, the paper's best-of-learning-rates.
    """
    best: dict[str, tuple[float, list[float]]] = {}
    for entry in entries:
        mine = [r for r in rows if r["entry"] == entry]
        select = [r for r in mine if r.get("stage", "select") == "select"]
        if not select:
            raise ValueError(f"no selection runs of entry {entry!r}")
        options = []
        for lr in sorted({r["lr"] for r in select}):
            errors = [r["test_error"] for r in select if r["lr"] == lr]
            mean = float(np.mean(errors)) if all(math.isfinite(e) for e in errors) else math.inf
            options.append((mean, lr))  # a diverged run is never chosen over a finished one
        _, lr = min(options)
        report = [r for r in mine if r.get("stage", "report") == "report" and r["lr"] == lr]
        best[entry] = (lr, [or_chance(r["test_error"]) for r in report])
    return best


def _liao_figure(config: dict[str, Any], chosen: dict[str, Choice], path: Path) -> Path:
    tables = list(config["tables"].items())
    fig, axes = panels(1, len(tables), 3.0, 0.6 + 0.22 * max(len(n) for _, n in tables))
    for ax, (title, names) in zip(axes[0], tables, strict=True):
        means = [100 * float(np.mean(chosen[e].errors)) for e in names]
        ses = [100 * mean_se(chosen[e].errors)[1] for e in names]
        ses = [s if math.isfinite(s) else 0.0 for s in ses]
        ax.barh(range(len(names)), means, xerr=ses, color="tab:blue")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        right = max(5.0, 1.3 * max(m + e for m, e in zip(means, ses, strict=True)))
        ax.set_xlim(0, right)
        for i, e in enumerate(names):
            ax.text(right * 0.98, i, f"lr {chosen[e].lr:g}", fontsize=5, ha="right", va="center")
        ax.set_xlabel("test error (%), held-out seeds", fontsize=8)
        ax.set_title(title, fontsize=8)
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


# --- 002 sec. 1 (VI) and sec. 3: Batch Manhattan against training-set size and batch size -------


def _point(size: int, batch: int) -> str:
    return f"n{size} b{batch}"


def liao_bm_sweep(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """Batch Manhattan against training-set size and batch size, each pair of entries (without
    and with BM) under the learning-rate protocol at every point.

    Paper: 002 sec. 1 (VI) and sec. 3: BM "did not lower performance in most cases ... this was
    especially true for smaller training sets"; "in the cases of very small batch sizes,
    discarding the magnitudes of the weight updates was sometimes detrimental". Values: test
    error (%) per held-out seed, ``"<entry> n<size> b<batch>"``, and the gain of BM, ``"gain
    <pair> n<size> b<batch>"``: error without BM minus error with BM, seed by seed.
    """
    started = time.perf_counter()
    runs = _Runs(name, config, out)
    sizes = [int(s) for s in config["train_sizes"]]
    batches = [int(b) for b in config["batch_sizes"]]
    pairs = [(str(a), str(b)) for a, b in config["pairs"]]
    values: dict[str, list[float]] = {}
    chosen: dict[tuple[str, int, int], Choice] = {}
    for plain, with_bm in pairs:
        for size in sizes:
            for batch in batches:
                run = {**config["run"], "train_size": size, "batch_size": batch}
                for entry in (plain, with_bm):
                    choice = runs.choose(entry, run, f"-n{size}-b{batch}")
                    chosen[entry, size, batch] = choice
                    values[f"{entry} {_point(size, batch)}"] = [100 * e for e in choice.errors]
                gain = [
                    100 * (a - b)
                    for a, b in zip(
                        chosen[plain, size, batch].errors,
                        chosen[with_bm, size, batch].errors,
                        strict=True,
                    )
                ]
                values[f"gain {plain}->{with_bm} {_point(size, batch)}"] = gain
    seeds = ", ".join(str(s) for s in runs.seeds)
    lines = [
        f"| entry | training set | batch | test error (%), seeds {seeds} | chosen lr | lrs "
        f"tried: seed {runs.select_seed} error (%) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (entry, size, batch), choice in chosen.items():
        lines.append(
            f"| {entry} | {size} | {batch} | {format_values(choice.errors, 2, 100)} | "
            f"{choice.lr:g} | {_tried(choice)} |"
        )
    lines += ["", "| gain of BM (points of error) | " + " | ".join(f"b{b}" for b in batches) + " |"]
    lines.append("| --- |" + " --- |" * len(batches))
    for plain, with_bm in pairs:
        for size in sizes:
            cells = [
                format_values(values[f"gain {plain}->{with_bm} {_point(size, b)}"], 2)
                for b in batches
            ]
            lines.append(f"| {plain} -> {with_bm}, n{size} | " + " | ".join(cells) + " |")
    lines += ["", verdict_table(judge_all(config.get("claims", []), values))]
    figure = _sweep_figure(pairs, sizes, batches, values, out / f"{name}.png")
    return ItemResult(name, "\n".join(lines), [figure], runs.rows, time.perf_counter() - started)


def _sweep_figure(
    pairs: Sequence[tuple[str, str]],
    sizes: Sequence[int],
    batches: Sequence[int],
    values: Mapping[str, Sequence[float]],
    path: Path,
) -> Path:
    fig, axes = panels(1, len(pairs), 3.2, 2.8)
    for ax, (plain, with_bm) in zip(axes[0], pairs, strict=True):
        for batch in batches:
            stats = [mean_se(values[f"gain {plain}->{with_bm} {_point(s, batch)}"]) for s in sizes]
            ax.errorbar(
                sizes,
                [m for m, _, _ in stats],
                yerr=[s if math.isfinite(s) else 0.0 for _, s, _ in stats],
                marker="o",
                capsize=2,
                label=f"batch {batch}",
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training examples", fontsize=8)
        ax.set_ylabel("error without BM - with BM (points)", fontsize=7)
        ax.set_title(f"{plain} -> {with_bm}", fontsize=8)
        ax.legend(fontsize=6)
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


ITEMS = {
    "liao-digits": liao,
    "liao-fashion-mnist": liao,
    "liao-fashion-mnist-cnn": liao,
    "liao-mnist1d": liao,
    "liao-bm-sweep": liao_bm_sweep,
}
"""This module's items (:mod:`asymprop.harness.reproduce`)."""
