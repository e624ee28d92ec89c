"""Many runs side by side (Liao et al.'s method): rules x models x datasets x seeds, one by one.

    results, table = compare(CompareConfig(rules=["bp", "fa", "usf"], seeds=[0, 1, 2]))

Every run is an ordinary :func:`asymprop.harness.experiment.train` run in
``out/runs/<name>/``. After each run ``out/results.csv`` is rewritten (one row per finished run,
so an interrupted comparison keeps what it did); at the end ``out/summary.md`` (mean ± s.e. over
seeds per rule, model and dataset) and the plots of :mod:`asymprop.harness.plotting`.
:func:`report` redraws both from the files alone.

With no settings, :class:`CompareConfig` is *the main job*: every registered rule on ``digits``
with a small MLP, offline, about a minute on two CPU cores. Its choices, the same for every
rule so that only the rule differs:

* ``mlp`` with two hidden layers of 128 ReLU units and no batch norm (three converted layers,
  so the alignment figure shows how angles grow with depth);
* Adam, lr 1e-3, batch 32, 10 epochs. Adam divides each weight's step by its own running
  gradient scale, so rules whose errors are far larger than backprop's (``usf``: sign(W) is tens
  of times larger than W) learn without batch norm or Batch Manhattan;
* one thread: these tiny matrix products run several times faster on one thread than on two
  busy cores.

Rule-specific settings go in ``rule_options`` and apply only when that rule is in the
comparison; the main job sets none (:data:`MAIN_JOB_RULE_OPTIONS`), and gives ``kp`` weight
decay 1e-2 (:data:`MAIN_JOB_RULE_SETTINGS`: Kolen-Pollack's B - W shrinks only by it) unless a
comparison sets ``weight_decay`` itself. ``rule_settings``
overrides shared run settings for one rule (sign symmetry's learning rate 0.5, weight mirrors'
two mirror-only epochs and later warm-up in 000 App. D.1-D.2: see the packaged config
``imagenet-resnet18``).

Under ``torchrun`` every run of the comparison is a data-parallel run on all processes, one
after another; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..rules import RULES, did_you_mean
from ..train import DivergenceError
from .distributed import DistInfo
from .experiment import (
    ConfigError,
    DataCache,
    Progress,
    RunConfig,
    check_config,
    config_from_dict,
    prepare,
    train,
)
from .plotting import Curve, plot_curves, plot_run
from .records import (
    LAYER_METRICS,
    RESULT_COLUMNS,
    read_csv,
    read_yaml,
    summarize,
    summary_table,
    write_csv,
    write_yaml,
)

__all__ = [
    "MAIN_JOB_MODEL_OPTIONS",
    "MAIN_JOB_RULE_OPTIONS",
    "MAIN_JOB_RULE_SETTINGS",
    "MAIN_JOB_SETTINGS",
    "CompareConfig",
    "compare",
    "compare_config",
    "plan",
    "report",
    "result_row",
]

log = logging.getLogger(__name__)

PER_RUN = ("rule", "rule_options", "model", "model_options", "data", "seed", "out")
"""RunConfig settings that a comparison sets per run; all others are shared by every run."""
SHARED = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in PER_RUN)

MAIN_JOB_SETTINGS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 32,
    "optimizer": "adam",
    "lr": 1e-3,
    "threads": 1,
}
"""Shared run settings of the main job (defaults of every comparison)."""
MAIN_JOB_MODEL_OPTIONS: dict[str, dict[str, Any]] = {"mlp": {"widths": [128, 128]}}
MAIN_JOB_RULE_OPTIONS: dict[str, dict[str, Any]] = {}
"""Per-rule options of the main job (none: every rule runs with its defaults)."""
MAIN_JOB_RULE_SETTINGS: dict[str, dict[str, Any]] = {"kp": {"weight_decay": 1e-2}}
"""Per-rule run settings of the main job: Kolen-Pollack needs weight decay (B - W shrinks by
it; without, KP is FA with a moving B); each applies unless the comparison sets that setting
itself (shared or for that rule)."""


def _registered(options: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The entries for registered rules, and of those only the options the rule has."""
    kept = {}
    for name, values in options.items():
        if name in RULES:
            fields = {f.name for f in dataclasses.fields(RULES[name])}
            kept[name] = {k: v for k, v in values.items() if k in fields}
    return kept


@dataclass
class CompareConfig:
    """A comparison: the product ``rules x models x data x seeds`` with shared ``settings``.

    In a YAML file or on the command line the shared settings sit beside the others, flat
    (``epochs: 5``); see :func:`compare_config`.

    Attributes:
        rules: rule names, or ``all`` for every registered rule (registry order).
        models, data, seeds: the other axes.
        rule_options: per rule name, its options (``{brsf: {flip: 0.25}}``); used when that
            rule runs.
        model_options: per model name, the builder's options.
        rule_settings: per rule name, shared settings that differ for that rule
            (``{usf: {lr: 0.5}}``); they replace the shared value, whole (a ``lr_schedule``
            given here replaces the shared schedule).
        settings: every other :class:`~asymprop.harness.experiment.RunConfig` setting, shared by all
            runs (epochs, batch_size, optimizer, lr, ...).
        out: the comparison's directory.
    """

    rules: list[str] = field(default_factory=lambda: ["all"])
    models: list[str] = field(default_factory=lambda: ["mlp"])
    data: list[str] = field(default_factory=lambda: ["digits"])
    seeds: list[int] = field(default_factory=lambda: [0])
    rule_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: _registered(MAIN_JOB_RULE_OPTIONS)
    )
    model_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {k: dict(v) for k, v in MAIN_JOB_MODEL_OPTIONS.items()}
    )
    rule_settings: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {k: dict(v) for k, v in MAIN_JOB_RULE_SETTINGS.items()}
    )
    settings: dict[str, Any] = field(default_factory=lambda: dict(MAIN_JOB_SETTINGS))
    out: str = "runs/compare"

    def rule_names(self) -> list[str]:
        """``rules`` with ``all`` expanded to every registered rule, duplicates dropped."""
        names: list[str] = []
        for name in self.rules:
            names += list(RULES) if name == "all" else [name]
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        """Flat plain data for ``config.yaml``: readable back by :func:`compare_config`."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        settings = data.pop("settings")
        full = dataclasses.asdict(RunConfig(**settings))
        return {**data, **{key: full[key] for key in SHARED}}


def compare_config(data: Mapping[str, Any], source: str = "config") -> CompareConfig:
    """A :class:`CompareConfig` from flat settings over the main job's defaults.

    Keys are the comparison's own (``rules``, ``models``, ``data``, ``seeds``, ``rule_options``,
    ``model_options``, ``rule_settings``, ``out``) or any shared run setting (``epochs``,
    ``lr``, ...). The per-rule and per-model options given are merged into the defaults, option
    by option.

    Raises:
        ConfigError: unknown key (lists the valid ones) or wrong type.
    """
    own = {f.name for f in dataclasses.fields(CompareConfig)} - {"settings"}
    unknown = [key for key in data if key not in own and key not in SHARED]
    if unknown:
        per_run = [key for key in unknown if key in PER_RUN]
        hint = (
            f" (a comparison takes lists: {', '.join(_PLURAL[k] for k in per_run)})"
            if per_run
            else ""
        )
        raise ConfigError(
            f"{source}: unknown setting {unknown[0]!r}{hint or did_you_mean(unknown[0], own)}; "
            "valid settings: "
            f"{', '.join(sorted(own))}, {', '.join(SHARED)}"
        )
    mine = {key: value for key, value in data.items() if key in own}
    config: CompareConfig = config_from_dict(CompareConfig, mine, source)
    defaults = CompareConfig()
    for name in ("rule_options", "model_options"):
        merged = {k: dict(v) for k, v in getattr(defaults, name).items()}
        for key, options in mine.get(name, {}).items():
            merged.setdefault(key, {}).update(options)
        setattr(config, name, merged)
    shared = {key: value for key, value in data.items() if key in SHARED}
    config_from_dict(RunConfig, shared, source)  # types of the shared settings
    config.settings = {**MAIN_JOB_SETTINGS, **shared}
    merged = {rule: dict(changes) for rule, changes in mine.get("rule_settings", {}).items()}
    for rule, defaults_of_rule in MAIN_JOB_RULE_SETTINGS.items():  # unless set here
        for key, value in defaults_of_rule.items():
            if key not in shared:
                merged.setdefault(rule, {}).setdefault(key, value)
    config.rule_settings = merged
    for rule, changes in config.rule_settings.items():
        wrong = [key for key in changes if key not in SHARED]
        if wrong:
            raise ConfigError(
                f"{source}: rule_settings.{rule}: {wrong[0]!r} is not a shared run setting "
                f"(per-rule options go in rule_options); valid: {', '.join(SHARED)}"
            )
        config_from_dict(RunConfig, changes, f"{source}: rule_settings.{rule}")
    return config


_PLURAL = {"rule": "rules", "model": "models", "data": "data", "seed": "seeds"}
_PLURAL.update({"rule_options": "rule_options", "model_options": "model_options", "out": "out"})


def plan(
    config: CompareConfig, cache: DataCache | None = None, world_size: int = 1
) -> list[tuple[RunConfig, int]]:
    """Every run of the comparison with its number of training steps, all checked up front.

    Each (rule, model, dataset) is prepared once (data loaded, model built and converted) so a
    bad name, option, missing dataset or a model that does not fit fails before any training.
    ``world_size``: the processes of a torchrun job (the global batch must split evenly).

    Raises:
        ConfigError, ValueError, TypeError, asymprop.harness.data.DatasetNotFoundError.
    """
    rules = config.rule_names()
    for axis, values in (("rules", rules), ("models", config.models), ("data", config.data)):
        if not values:
            raise ConfigError(f"{axis} is empty: name at least one")
    if not config.seeds:
        raise ConfigError("seeds is empty: name at least one")
    for what in ("rule_options", "rule_settings"):
        for name in getattr(config, what):
            if name not in RULES:
                raise ConfigError(
                    f"{what} names unknown rule {name!r}{did_you_mean(name, RULES)}; valid "
                    f"rules: {', '.join(RULES)}"
                )
    runs: list[tuple[RunConfig, int]] = []
    steps: dict[tuple[str, str, str], int] = {}
    out = Path(config.out)
    for data in config.data:
        for model in config.models:
            for rule in rules:
                for seed in config.seeds:
                    run_config = RunConfig(
                        **{**config.settings, **config.rule_settings.get(rule, {})},
                        rule=rule,
                        rule_options=dict(config.rule_options.get(rule, {})),
                        model=model,
                        model_options=dict(config.model_options.get(model, {})),
                        data=data,
                        seed=seed,
                        out=str(out / "runs" / f"{rule}-{model}-{data}-seed{seed}"),
                    )
                    key = (rule, model, data)
                    if key not in steps:
                        check_config(run_config, world_size)
                        prepared = prepare(run_config, cache)
                        prepared.world_size = world_size  # its steps per epoch, not a DDP model
                        steps[key] = prepared.steps_per_epoch() * run_config.epochs
                        del prepared
                    runs.append((run_config, steps[key]))
    return runs


def result_row(
    config: RunConfig, rows: Sequence[Mapping[str, Any]], status: str, failure: str = ""
) -> dict[str, Any]:
    """The ``results.csv`` row of one run: final metrics and per-layer columns; a run that is
    not ``ok`` keeps its last finished epoch's numbers, and says in ``failure`` why and where
    it stopped (summaries leave it out of the means)."""
    last = dict(rows[-1]) if rows else {}
    row: dict[str, Any] = {
        "rule": config.rule,
        "model": config.model,
        "dataset": config.data,
        "seed": config.seed,
        "status": status,
        "epochs": last.get("epoch", 0),
        "train_loss": last.get("train_loss", math.nan),
        "test_loss": last.get("test_loss", math.nan),
        "test_accuracy": last.get("test_accuracy", math.nan),
        "mean_angle_deg": _mean_over_layers(last, "angle_deg"),
        "mean_delta_angle_deg": _mean_over_layers(last, "delta_angle_deg"),
        "seconds": sum(r.get("seconds", 0.0) for r in rows),
        "run_dir": config.run_dir.name,
        "failure": failure,
    }
    for key, value in last.items():
        if key.split("/")[0] in LAYER_METRICS:
            row[key] = value
    return row


def _mean_over_layers(row: Mapping[str, Any], metric: str) -> float:
    values = [
        v
        for k, v in row.items()
        if k.startswith(f"{metric}/") and isinstance(v, int | float) and math.isfinite(v)
    ]
    return sum(values) / len(values) if values else math.nan


def compare(
    config: CompareConfig,
    *,
    runs: Sequence[tuple[RunConfig, int]] | None = None,
    cache: DataCache | None = None,
    progress: Progress | None = None,
    dist_info: DistInfo | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Run every run of ``config`` and write the comparison; returns the rows and the table.

    A run that diverges (NaN or infinite loss) is recorded with status ``diverged`` and its
    last finished epoch; the others go on.

    Args:
        config: the comparison.
        runs, cache: the output of an earlier :func:`plan` and the datasets it loaded (else
            planned here).
        progress: gets one ``update`` per training step of all runs together.
        dist_info: this process's place in a torchrun job (each run is data-parallel over all
            processes; only rank 0 writes).
    """
    cache = cache if cache is not None else {}
    world_size = dist_info.world_size if dist_info is not None else 1
    runs = runs if runs is not None else plan(config, cache, world_size)
    main = dist_info is None or dist_info.rank == 0
    out = Path(config.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / "config.yaml", config.to_dict())
        (out / "results.csv").unlink(missing_ok=True)
    counter = _Counter(progress)
    results: list[dict[str, Any]] = []
    curves: list[tuple[RunConfig, list[dict[str, Any]]]] = []
    for run_config, steps in runs:
        start = counter.n
        try:
            rows = train(
                run_config, cache=cache, progress=counter, plots=False, dist_info=dist_info
            )
            status, failure = "ok", ""
        except DivergenceError as err:
            log.warning("%s diverged: %s", run_config.run_dir.name, err)
            rows, status = _rows_so_far(run_config), "diverged"
            failure = _short(str(err))
        counter.update(start + steps - counter.n)  # a diverged run's remaining steps
        results.append(result_row(run_config, rows, status, failure))
        curves.append((run_config, rows))
        if main:
            write_csv(out / "results.csv", results, RESULT_COLUMNS)
    table = _write_summary(out, results, curves) if main else ""
    return results, table


def _short(message: str) -> str:
    """``"at step 12 (epoch 1): loss is nan"`` from a divergence message (rule named already)."""
    text = message.split(" diverged ", 1)[-1]
    return text.split("; ")[0]


class _Counter:
    """Passes steps on to the progress bar and counts them."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress, self.n = progress, 0

    def update(self, n: float | None = 1) -> bool | None:
        self.n += int(n or 0)
        return self.progress.update(n) if self.progress is not None and n else None

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(s, refresh)


def _rows_so_far(config: RunConfig) -> list[dict[str, Any]]:
    path = config.run_dir / "metrics.csv"
    return read_csv(path) if path.exists() else []


def _write_summary(
    out: Path,
    results: Sequence[Mapping[str, Any]],
    curves: Sequence[tuple[RunConfig, Sequence[Mapping[str, Any]]]],
) -> str:
    """``summary.md`` and the plots; returns the Markdown table."""
    by = ["rule"]
    for key in ("model", "dataset"):
        if len({r[key] for r in results}) > 1:
            by.append(key)
    table = summary_table(summarize(results, by), by)
    models = ", ".join(dict.fromkeys(str(r["model"]) for r in results))
    datasets = ", ".join(dict.fromkeys(str(r["dataset"]) for r in results))
    seeds = ", ".join(dict.fromkeys(str(r["seed"]) for r in results))
    epochs = max((int(r["epochs"]) for r in results), default=0)
    heading = (
        f"# asymprop compare\n\nmodel {models}; data {datasets}; seeds {seeds}; {epochs} epochs. "
        "Final epoch, mean ± s.e. over seeds; angles averaged over the converted layers "
        "(angle B,W: between feedback and forward weights; delta angle: between the rule's "
        "and backprop's error, on a fixed test batch).\n\n"
    )
    (out / "summary.md").write_text(heading + table)
    groups: dict[tuple[str, str], dict[str, list[Sequence[Mapping[str, Any]]]]] = {}
    for run_config, rows in curves:
        group = groups.setdefault((run_config.model, run_config.data), {})
        group.setdefault(run_config.rule, []).append(rows)
    plot_curves(
        [
            Curve(rule, f"{model} / {data}", seeds)
            for (model, data), by_rule in groups.items()
            for rule, seeds in by_rule.items()
        ],
        out,
    )
    return table


def report(directory: str | Path) -> str:
    """Redraw the plots and summary of a ``compare`` or ``train`` directory from its files.

    Returns the summary table.

    Raises:
        ConfigError: the directory holds neither ``results.csv`` nor ``metrics.csv``.
    """
    out = Path(directory)
    if (out / "results.csv").exists():
        results = read_csv(out / "results.csv")
        curves = []
        for result in results:
            config = RunConfig(
                rule=str(result["rule"]),
                model=str(result["model"]),
                data=str(result["dataset"]),
                seed=int(result["seed"]),
                out=str(out / "runs" / str(result["run_dir"])),
            )
            curves.append((config, _rows_so_far(config)))
        return _write_summary(out, results, curves)
    if (out / "metrics.csv").exists():
        rows = read_csv(out / "metrics.csv")
        saved = read_yaml(out / "config.yaml") if (out / "config.yaml").exists() else {}
        config = config_from_dict(RunConfig, {**saved, "out": str(out)}, str(out / "config.yaml"))
        plot_run(rows, out, title=config.rule)
        return summary_table(summarize([result_row(config, rows, "ok")]), ["rule"])
    raise ConfigError(
        f"{out} holds neither results.csv (from asymprop compare) nor metrics.csv (from "
        "asymprop train)"
    )
