"""Lansdell et al. (004) Table 1 and Table 2b: the CNN of App. C.4 (after Crafton et al. 2019)
trained by BP, DFA, node perturbation with the DFA-shaped estimator, synthetic gradients and,
for the noise ablation, BP and DFA with activation noise; each method's hyperparameters from the
same bounded random search, then the chosen ones at every seed.

The search (004 App. C.4: "found through random search") is the autoencoder's
(:func:`~asymprop.harness.papers.lansdell.search_draws`, ``searched_spec``): ``K``
configurations per method, each hyperparameter the method has (``lr``; ``lr_b``, ``noise_std``
for ``np``; ``lr_b`` for ``sg``) drawn log-uniformly from one range shared by all methods
(:func:`searched_method`), from the same uniform draws for every method; each configuration is
trained once on a search subset of the training split and scored on a disjoint validation
subset of it (:func:`search_cache`); the one with the lowest validation error wins. The "noise"
entries take their method's winner and, as activation noise, the noise level ``c_h`` that node
perturbation chose (004 App. C.5).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..data import Dataset, load_dataset
from ..experiment import DataCache, RunConfig, load_data
from ..plotting import panels, save_figure
from ..records import format_values
from .common import (
    DPI,
    MAX_PNG_BYTES,
    ItemResult,
    nanmean,
    or_chance,
    run_error,
    run_slug,
    seed_table,
)
from .lansdell import SEARCHED, search_draws, searched_spec
from .verdicts import judge_all, verdict_table

log = logging.getLogger(__name__)


def searched_method(
    spec: Mapping[str, Any], ranges: Mapping[str, Sequence[float]]
) -> dict[str, Any]:
    """The method ``spec`` (``rule``, ``options``, ``tune``: the hyperparameters it searches) as
    a spec of :func:`~asymprop.harness.papers.lansdell.searched_spec`: each name of ``tune``
    gets the shared range ``ranges[name]``, so every method searches the same ranges.

    Example:
        >>> searched_method({"rule": "sg", "tune": ["lr", "lr_b"]},
        ...                 {"lr": [1e-4, 1e-2], "lr_b": [1e-4, 1e-2], "noise_std": [0.01, 1]})
        {'rule': 'sg', 'options': {}, 'search': {'lr': [0.0001, 0.01], 'lr_b': [0.0001, 0.01]}}

    Raises:
        ValueError: a name of ``tune`` with no range (or not one of ``SEARCHED``).
    """
    tune = list(spec.get("tune", ["lr"]))
    for name in tune:
        if name not in SEARCHED or name not in ranges:
            raise ValueError(
                f"cannot search {name!r}: searchable are {', '.join(SEARCHED)}, with a range in "
                f"search.ranges ({', '.join(ranges) or 'none'})"
            )
    options = dict(spec.get("options", {}))
    return {"rule": spec["rule"], "options": options, "search": {k: ranges[k] for k in tune}}


def method_settings(run: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """The run settings (``run`` and the method) of a drawn ``spec`` (``rule``, ``lr``,
    ``options``, as :func:`~asymprop.harness.papers.lansdell.searched_spec` returns it).

    Example:
        >>> method_settings({"optimizer": "adam"}, {"rule": "np", "lr": 1e-4,
        ...                                         "options": {"lr_b": 1e-3}})
        {'optimizer': 'adam', 'rule': 'np', 'rule_options': {'lr_b': 0.001}, 'lr': 0.0001}
    """
    settings = {**run, "rule": spec["rule"], "rule_options": dict(spec.get("options", {}))}
    if "lr" in spec:
        settings["lr"] = spec["lr"]
    return settings


def search_cache(settings: Mapping[str, Any], search: Mapping[str, Any]) -> DataCache:
    """A data cache whose dataset, for runs of ``settings``, holds out validation data.

    It trains on ``search["train_size"]`` examples of the training split and scores (as its
    "test" split) on ``search["val_size"]`` other examples of the training split, both drawn by
    ``search["draw_seed"]``; the test split is never seen. ``settings`` must carry those two
    sizes as ``train_size`` and ``test_size`` (the cache is keyed by them).
    """
    config = RunConfig(**settings)
    full = load_dataset(config.data, data_dir=config.data_dir, download=config.download)
    x, y = full.train.tensors  # type: ignore[attr-defined]
    train_size, val_size = int(search["train_size"]), int(search["val_size"])
    if train_size + val_size > len(x):
        raise ValueError(
            f"search.train_size {train_size} + val_size {val_size} exceed the {len(x)} training "
            f"examples of {config.data!r}"
        )
    generator = torch.Generator().manual_seed(int(search["draw_seed"]))
    order = torch.randperm(len(x), generator=generator)
    val, train = order[:val_size], order[val_size : val_size + train_size]
    held_out = Dataset(
        full.name,
        TensorDataset(x[train], y[train]),
        TensorDataset(x[val], y[val]),
        full.input_shape,
        full.num_classes,
    )
    cache: DataCache = {}
    load_data(config, True, cache)  # the key the run will look up (classification: normalized)
    (key,) = cache
    cache[key] = held_out
    return cache


def crafton(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """BP, DFA, NP (DFA-shaped), SG and the noise ablation on the Crafton CNN, each method's
    hyperparameters from the same random search; test error over seeds and the verdicts.

    Paper: 004 sec. 4.3-4.4, Table 1, Table 2b, App. C.4-C.5 (CIFAR-10; here Fashion-MNIST).
    """
    started = time.perf_counter()
    reuse = bool(config.get("reuse", False))
    run, search, methods = config["run"], config["search"], config["methods"]
    if config.get("noise_ablation"):
        source = config.get("noise_from")
        if source not in methods or "noise_std" not in methods[source].get("tune", []):
            raise ValueError(
                f"noise_from must name a method that searches noise_std (its c_h is the "
                f"activation noise), not {source!r}; such methods: "
                + ", ".join(m for m, spec in methods.items() if "noise_std" in spec.get("tune", []))
            )
        unknown = [b for b in config["noise_ablation"].values() if b not in methods]
        if unknown:
            raise ValueError(f"noise_ablation names {unknown}, not among methods {list(methods)}")
    search_run = {
        **run,
        "train_size": search["train_size"],
        "test_size": search["val_size"],
        "epochs": search["epochs"],
        "seed": search["seed"],
    }
    held_out = search_cache(search_run, search)
    rows: list[dict[str, Any]] = []
    chosen: dict[str, dict[str, Any]] = {}  # method -> its winning drawn spec
    draws = search_draws(int(search["configs"]), int(search["draw_seed"]))
    for label, spec in methods.items():
        ranged = searched_method(spec, search["ranges"])
        tried = []
        for k, draw in enumerate(draws):
            drawn = searched_spec(ranged, draw)
            hyper = {n: v for n, v in drawn["options"].items() if n in SEARCHED}
            hyper = {"lr": drawn.get("lr", search_run.get("lr")), **hyper}
            directory = out / "search" / f"draw{search['draw_seed']}" / f"{run_slug(label)}-{k}"
            settings = method_settings(search_run, drawn)
            error, _ = run_error(settings, directory, held_out, reuse=reuse)
            # a diverged draw loses to every finished one (its 90% is not a measured error)
            tried.append((error if math.isfinite(error) else math.inf, k, drawn))
            error = or_chance(error)
            rows.append(
                {"part": "search", "entry": label, "config": k, **hyper, "val_error": error}
            )
            log.info("%s search %s %d %s: validation error %.4f", name, label, k, hyper, error)
        chosen[label] = min(tried, key=lambda t: (t[0], t[1]))[2]
        if all(math.isinf(t[0]) for t in tried):
            log.warning("%s: every search draw of %s diverged; it runs the first", name, label)
    entries = {label: method_settings(run, chosen[label]) for label in methods}
    for label, base in config.get("noise_ablation", {}).items():
        noise_std = chosen[config["noise_from"]]["options"]["noise_std"]  # NP's c_h (C.5)
        settings = method_settings(run, chosen[base])
        options = {**settings.get("model_options", {}), "activation_noise": noise_std}
        entries[label] = {**settings, "model_options": options}
    cache: DataCache = {}
    for label, settings in entries.items():
        for seed in config["seeds"]:
            directory = out / "runs" / f"{run_slug(label)}-seed{seed}"
            error, run_rows = run_error({**settings, "seed": seed}, directory, cache, reuse=reuse)
            error = or_chance(error)
            last = run_rows[-1] if run_rows else {}  # a diverged run: chance, no metrics
            deltas = [v for k, v in last.items() if k.startswith("delta_angle_deg/")]
            rows.append(
                {
                    "part": "final",
                    "entry": label,
                    "seed": seed,
                    "lr": settings["lr"],
                    "lr_b": settings["rule_options"].get("lr_b", math.nan),
                    "noise_std": settings["rule_options"].get("noise_std", math.nan),
                    "activation_noise": settings.get("model_options", {}).get(
                        "activation_noise", 0.0
                    ),
                    "test_error": error,
                    "train_loss": last.get("train_loss", math.nan),
                    # the error each layer sends to its input (metrics.delta_alignment), but
                    # the first's (its input is the image): the errors the hidden layers get
                    "delta_angle_deg": nanmean(deltas[1:]),
                    "seconds": sum(r["seconds"] for r in run_rows),
                }
            )
            log.info("%s %s seed %d: %s", name, label, seed, rows[-1])
    finals = [r for r in rows if r["part"] == "final"]
    values = {
        label: [100 * r["test_error"] for r in finals if r["entry"] == label] for label in entries
    }
    table = "\n\n".join(
        [
            seed_table(
                [
                    "entry",
                    "test error (%)",
                    "delta angle (deg, errors sent to hidden layers)",
                    "train loss",
                    "s/run",
                ],
                finals,
                "entry",
                [(label, label) for label in entries],
                [
                    ("test_error", 100, 2),
                    ("delta_angle_deg", 1, 1),
                    ("train_loss", 1, 3),
                    ("seconds", 1, 0),
                ],
            ),
            _choice_table(config, entries, rows),
            verdict_table(judge_all(config.get("claims", []), values)),
        ]
    )
    figures = [_figure(config, list(entries), rows, out / f"{name}.png")]
    return ItemResult(name, table, figures, rows, time.perf_counter() - started)


def _choice_table(
    config: Mapping[str, Any],
    entries: Mapping[str, Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
) -> str:
    """Per entry: the paper's number, the chosen hyperparameters and their validation error."""
    lines = [
        "| entry | paper: CIFAR-10 test acc. (%) | ours: test acc. (%) | lr | lr_b | c_h | "
        "validation error of the chosen (%) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, settings in entries.items():
        options = settings["rule_options"]
        base = config.get("noise_ablation", {}).get(label, label)
        searched = [r for r in rows if r["part"] == "search" and r["entry"] == base]
        best = min(searched, key=lambda r: (r["val_error"], r["config"]))
        accuracy = [
            1 - r["test_error"] for r in rows if r["part"] == "final" and r["entry"] == label
        ]
        c_h = options.get("noise_std", settings.get("model_options", {}).get("activation_noise"))
        cells = [
            label,
            str(config.get("paper", {}).get(label, "--")),
            format_values(accuracy, 2, 100),
            f"{settings['lr']:.3g}",
            f"{options['lr_b']:.3g}" if "lr_b" in options else "--",
            f"{c_h:.3g}" + (" (activations)" if label != base else "") if c_h else "--",
            f"{100 * best['val_error']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(
    config: Mapping[str, Any], labels: Sequence[str], rows: Sequence[Mapping[str, Any]], path: Path
) -> Path:
    """Left: test error per entry (mean ± s.e., seeds as dots); right: the search."""
    fig, axes = panels(1, 2, 4.2, 3.2)
    ax = axes[0][0]
    for i, label in enumerate(labels):
        errors = [
            100 * r["test_error"] for r in rows if r["part"] == "final" and r["entry"] == label
        ]
        ax.bar(i, np.mean(errors), color="tab:blue", alpha=0.6)
        ax.scatter([i] * len(errors), errors, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    ax.set_ylabel("test error (%)")
    ax.set_title("Fashion-MNIST, crafton-cnn", fontsize=9)
    ax = axes[0][1]
    for label in config["methods"]:
        searched = [r for r in rows if r["part"] == "search" and r["entry"] == label]
        ax.scatter(
            [r["lr"] for r in searched], [100 * r["val_error"] for r in searched], label=label, s=14
        )
    ax.set_xscale("log")
    ax.set_xlabel("Adam lr")
    ax.set_ylabel("validation error (%)")
    ax.set_title(f"random search, {config['search']['configs']} configurations each", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


ITEMS = {"crafton-fashion-mnist": crafton}
"""This module's items (:mod:`asymprop.harness.reproduce`)."""
