"""What the papers' items share: their result, the ordinary run of one setting (with
``--reuse`` and Liao's clamped layers), tables of mean ± s.e. over seeds, and the one per-step
loop (:func:`train_steps`) of the items that the harness's run loop cannot serve."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...convert import feedback_layers
from ...train import DivergenceError, train_step
from ..config import config_from_dict
from ..experiment import DataCache, RunConfig, prepare, train
from ..records import code_identity, format_values, read_csv, read_yaml

log = logging.getLogger(__name__)

DPI = 100
"""The papers' figures (the study's have :data:`asymprop.harness.plotting.DPI`)."""
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


# --- helpers ------------------------------------------------------------------------------------


def seed_table(
    headers: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    key: str,
    groups: Sequence[tuple[str, Any]],
    columns: Sequence[tuple[str, float, int]],
) -> str:
    """Markdown, one line per ``(label, value)`` of ``groups``: the rows whose ``key`` is
    ``value``, each column ``(field, scale, digits)`` as mean ± s.e. over them
    (:func:`~asymprop.harness.records.format_values`)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for label, value in groups:
        mine = [r for r in rows if r[key] == value]
        cells = [
            format_values([r[field] for r in mine], digits, scale)
            for field, scale, digits in columns
        ]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def finished_rows(config: RunConfig) -> list[dict[str, Any]] | None:
    """The ``metrics.csv`` rows of a finished run of exactly ``config`` in its directory, or None.

    Finished: ``config.yaml`` there describes the same run (settings added since it was written
    compare at their defaults), ``code.yaml`` names this very code (the same asymprop version and
    source hash, :func:`~asymprop.harness.records.code_identity`; a run resumed by other code
    does not count) and ``metrics.csv`` reaches the last epoch.
    """
    directory = config.run_dir
    try:
        stored = config_from_dict(RunConfig, read_yaml(directory / "config.yaml"))
        code = read_yaml(directory / "code.yaml")
        rows = read_csv(directory / "metrics.csv")
    except (OSError, ValueError, TypeError):
        return None
    if code != code_identity():
        log.info("not reusing %s: made by other code (%s)", directory, code)
        return None
    if stored.to_dict() != config.to_dict() or not rows or rows[-1]["epoch"] != config.epochs:
        return None
    return rows


def classification_run(
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


CHANCE_ERROR = 0.9
"""The test error a diverged run counts as in a ten-class item's table (the papers' items)."""


def or_chance(error: float) -> float:
    """``error``, or :data:`CHANCE_ERROR` if it is not finite (a diverged run, in a table)."""
    return error if math.isfinite(error) else CHANCE_ERROR


def run_error(
    settings: Mapping[str, Any],
    out: Path,
    cache: DataCache,
    freeze: str | None = None,
    reuse: bool = False,
) -> tuple[float, list[dict[str, Any]]]:
    """The final test error of one :func:`classification_run` and its ``metrics.csv`` rows.

    A run that diverged (:class:`asymprop.train.DivergenceError`) gives NaN and no rows; a
    non-finite final accuracy gives NaN too. Items decide what NaN counts as: chance
    (:data:`CHANCE_ERROR`) in a reported table, a loss to every finished run in a selection.
    """
    try:
        rows = classification_run(settings, out, cache, freeze, reuse)
    except DivergenceError as diverged:
        log.warning("%s diverged: %s", out, diverged)
        return math.nan, []
    error = 1 - float(rows[-1]["test_accuracy"])
    return (error if math.isfinite(error) else math.nan), rows


def run_slug(label: str) -> str:
    """A run folder's name from an entry's label: ``"uSF+BN+BM Bottom"`` -> ``uSF_BN_BM-Bottom``,
    ``"brSF@25"`` -> ``brSFp25``."""
    return label.replace(" ", "-").replace("+", "_").replace("@", "p")


def final_mean(rows: Sequence[Mapping[str, Any]], prefix: str) -> float:
    """Mean over layers of a per-layer metric in the last row (NaNs skipped)."""
    return nanmean([v for k, v in rows[-1].items() if k.startswith(prefix)])


def minibatches(
    n: int, batch_size: int, generator: torch.Generator, epochs: int | None = None
) -> Iterator[Tensor]:
    """Indices of the minibatches of ``n`` examples, for ``epochs`` epochs (None: no end).

    Each epoch is a fresh permutation drawn from ``generator``; its last incomplete minibatch
    is left out (the papers' batching, not the harness's: see :func:`train_steps`).
    """
    for _ in itertools.count() if epochs is None else range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@dataclass
class Steps:
    """What :func:`train_steps` did: the measurements, the losses, the steps that finished."""

    curve: list[dict[str, Any]]
    losses: list[float]
    steps: int
    diverged: bool


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    measure: Callable[[int], dict[str, Any]] | None = None,
    every: int = 1,
) -> Steps:
    """:func:`asymprop.train_step` on each ``(inputs, targets)`` of ``batches``, measured per step.

    ``measure(step)`` runs before every ``every``-th step and once after the last, each giving
    a row of ``curve`` (with ``step``, the steps finished). A step whose loss is not finite
    (:class:`asymprop.train.DivergenceError`) ends the loop; the weights are those before it,
    and the last row measures them.

    The loop of the Lansdell and KP items. The harness's run loop
    (:func:`asymprop.harness.experiment.train`) cannot give their numbers: it measures per
    epoch, not every few steps (Lansdell's curves, KP's geometric law per step); it trains
    classifiers with cross-entropy, not Lansdell's MSE on one-hot targets or a reconstruction
    of noisy inputs; and it batches differently (a seeded permutation per epoch that keeps the
    last short minibatch, not one generator for the whole run, see :func:`minibatches`).
    """
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    step, diverged = 0, False
    for inputs, targets in batches:
        if measure is not None and step % every == 0:
            curve.append({"step": step, **measure(step)})
        try:
            losses.append(train_step(model, optimizer, loss_fn, inputs, targets))
        except DivergenceError:
            diverged = True
            break
        step += 1
    if measure is not None:
        curve.append({"step": step, **measure(step)})
    return Steps(curve, losses, step, diverged)


def nanmean(values: Sequence[float]) -> float:
    """The mean of the finite ``values`` (NaN if none): DFA draws no B for a layer fed data."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
