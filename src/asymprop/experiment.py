"""One training run, as one readable loop: data, model, rule, optimizer, epochs, logs.

    config = RunConfig(rule="usf", model="mlp", data="digits", epochs=5)
    rows = train(config)              # writes config.yaml, metrics.csv, checkpoint.pt, plots

``train`` is, in order:

1. :func:`prepare` -- everything that can fail on bad input, before any work: the config's
   names, types and ranges, the rule's options, the data on disk, the model fitting the data;
   it returns a :class:`Run` (model converted, optimizer built, data in memory);
2. :func:`evaluate` the untouched model (epoch 0: FA's angles start near 90 degrees);
3. for each epoch, :func:`train_epoch` (``asymprop.train_step`` per minibatch: the same lines
   as a backprop loop, plus the rule's feedback update) and :func:`evaluate` (test loss and
   accuracy, and per converted layer the alignment of B with W and of the rule's error with
   backprop's on a fixed test batch); one ``metrics.csv`` row and a ``checkpoint.pt`` each.

Randomness comes from ``config.seed`` only: ``torch.manual_seed(seed)`` before the model is
built (weights, dropout, noise), ``convert(..., seed=seed)`` for the feedback weights, and a
generator seeded by ``(seed, epoch)`` for each epoch's data order -- so the order of epoch ``e``
does not depend on what ran before it. Evaluation runs under ``torch.random.fork_rng`` and
leaves the training stream untouched. The train/test split itself is fixed (seed 0), so all
seeds are scored on the same test set.

The task follows from the model: a model whose output has one value per class is trained with
cross-entropy (classification); one whose output is the flattened input (the autoencoder) with
the mean squared reconstruction error, on pixels in [0, 1], and has no accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from .convert import convert, feedback_layers
from .data import Dataset, list_datasets, load_dataset
from .metrics import alignment, delta_alignment
from .models import build_model, list_models
from .optim import OPTIMIZERS, make_optimizer
from .records import METRIC_COLUMNS, append_row, layer_columns, write_yaml
from .rules import RULES, make_rule
from .train import train_step

__all__ = [
    "CHECKPOINT",
    "ConfigError",
    "DataCache",
    "Progress",
    "Run",
    "RunConfig",
    "check_config",
    "config_from_dict",
    "evaluate",
    "load_checkpoint",
    "prepare",
    "save_checkpoint",
    "train",
    "train_epoch",
]

CHECKPOINT = "checkpoint.pt"
DATA_SPLIT_SEED = 0
"""Seed of datasets' own train/test split (digits): fixed, so every run sees one test set."""
EVAL_BATCH_SIZE = 1000

Task = Literal["auto", "classification", "reconstruction"]


class ConfigError(ValueError):
    """A setting is missing, unknown, of the wrong type or out of range (the message says which)."""


@dataclass
class RunConfig:
    """Everything that defines one run; ``config.yaml`` is this, and ``--config`` reads it back.

    Attributes:
        rule: a name from ``asymprop.RULES``; rule_options: its options (``flip: 0.25``).
        model: a name from ``asymprop.models.list_models()``; model_options: the builder's
            keyword options (``widths: [128, 128]``, ``batchnorm: true``).
        data: a name from ``asymprop.data.list_datasets()``; data_dir, download: where to find
            or fetch its files; train_size: keep this many training examples (None: all).
        epochs, batch_size: passes over the training set, examples per step.
        optimizer: one of ``asymprop.optim.OPTIMIZERS``; lr: learning rate; momentum: None
            gives 0.9 for sgd, nesterov and bm1-3 and nothing for adam/adamw; weight_decay.
        seed: seeds the weights, the feedback weights, dropout and the data order.
        task: ``auto`` (from the model's output shape), ``classification`` (cross-entropy) or
            ``reconstruction`` (MSE against the input).
        normalize: standardise inputs; None: yes for classification, no (pixels in [0, 1])
            for reconstruction.
        align_batch_size: test examples in the fixed batch on which delta alignment is measured.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        threads: ``torch.set_num_threads`` for the run (None: torch's default). Small models
            train several times faster on one thread than on two busy cores.
        workers: ``DataLoader`` worker processes for datasets read from files (image folders).
        out: the run directory (None: ``runs/<rule>-<model>-<data>-seed<seed>``).
        tensorboard: also log every metric to ``out/tensorboard`` (needs the tensorboard package).
    """

    rule: str = "bp"
    rule_options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    train_size: int | None = None
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float | None = None
    weight_decay: float = 0.0
    seed: int = 0
    task: str = "auto"
    normalize: bool | None = None
    align_batch_size: int = 256
    device: str = "auto"
    threads: int | None = None
    workers: int = 0
    out: str | None = None
    tensorboard: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``config.yaml`` (``out`` filled in)."""
        data = dataclasses.asdict(self)
        data["out"] = str(self.run_dir)
        return data

    @property
    def run_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path("runs") / f"{self.rule}-{self.model}-{self.data}-seed{self.seed}"


# --- settings from files and command lines ------------------------------------------------------


def config_from_dict(cls: type[Any], data: Mapping[str, Any], source: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``, naming unknown keys and ill-typed values.

    A scalar given for a list setting becomes a one-item list, and a string with commas is split
    (``seeds: 0,1,2``), so command-line overrides read naturally.

    Raises:
        ConfigError: unknown key (lists the valid ones) or wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown setting {key!r}; valid settings: {', '.join(fields)}"
            )
        value = _coerce(value, hints[key])
        if not _matches(value, hints[key]):
            raise ConfigError(
                f"{source}: setting {key!r} must be {_describe(hints[key])}, got {value!r}"
            )
        values[key] = value
    return cls(**values)


def _coerce(value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) is not list:
        return value
    if isinstance(value, str):
        return [_scalar(part.strip()) for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        return [value]
    return list(value)


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and _matches(v, args[1]) for k, v in value.items()
        )
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, str(hint)
    )


def check_config(config: RunConfig) -> None:
    """Check names, ranges and the rule's options; cheap (no data, no model).

    Raises:
        ConfigError, ValueError, TypeError: the message names the setting and the valid values.
    """
    _choice("rule", config.rule, sorted(RULES))
    _choice("model", config.model, list_models())
    _choice("data", config.data, list_datasets())
    _choice("optimizer", config.optimizer, list(OPTIMIZERS))
    _choice("task", config.task, list(typing.get_args(Task)))
    if config.threads is not None and config.threads < 1:
        raise ConfigError(
            f"threads must be >= 1 (or null for torch's default), got {config.threads}"
        )
    if config.workers < 0:
        raise ConfigError(f"workers must be >= 0, got {config.workers}")
    for name in ("epochs", "batch_size", "align_batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.train_size is not None and config.train_size < 1:
        raise ConfigError(f"train_size must be >= 1 (or null for all), got {config.train_size}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ConfigError(f"lr must be a finite number > 0, got {config.lr}")
    if config.momentum is not None and not 0 <= config.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {config.momentum}")
    if not config.weight_decay >= 0:
        raise ConfigError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if config.momentum and config.optimizer in ("adam", "adamw"):
        raise ConfigError(
            f"optimizer {config.optimizer!r} takes no momentum (got {config.momentum}); "
            "leave momentum unset, or use sgd, nesterov or bm1-3"
        )
    _device(config.device)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tensorboard logging needs the tensorboard package: pip install 'asymprop[tensorboard]'"
            " (or leave out --tensorboard)"
        )
    make_rule(config.rule, **config.rule_options)  # unknown/ill-typed/out-of-range options


def _choice(name: str, value: str, valid: list[str]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use cpu or auto")
    return device


# --- one run ------------------------------------------------------------------------------------


class Progress(Protocol):
    """What the loop reports steps to (a ``tqdm`` bar fits)."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...


DataCache = dict[tuple[Any, ...], Dataset]
"""Datasets already loaded, shared by the runs of a comparison."""


@dataclass
class Run:
    """A prepared run: what the loop needs, and where it is (``epoch``, ``step``)."""

    config: RunConfig
    dataset: Dataset
    task: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    device: torch.device
    probe: tuple[Tensor, Tensor]  # a fixed test batch (inputs, targets) for delta alignment
    layers: list[str]  # qualified names of the converted layers, module order
    epoch: int = 0
    step: int = 0

    def steps_per_epoch(self) -> int:
        return len(_batch_starts(len(self.dataset.train), self.config.batch_size))  # type: ignore[arg-type]


def reconstruction_loss(outputs: Tensor, inputs: Tensor) -> Tensor:
    """Mean squared error between the output and the (flattened) input."""
    return F.mse_loss(outputs, inputs.reshape(outputs.shape))


def load_data(config: RunConfig, normalize: bool, cache: DataCache | None = None) -> Dataset:
    """The run's dataset (from ``cache`` when already loaded)."""
    key = (config.data, config.data_dir, config.train_size, normalize)
    if cache is not None and key in cache:
        return cache[key]
    dataset = load_dataset(
        config.data,
        data_dir=config.data_dir,
        download=config.download,
        seed=DATA_SPLIT_SEED,
        train_size=config.train_size,
        normalize=normalize,
    )
    if cache is not None:
        cache[key] = dataset
    return dataset


def infer_task(model: nn.Module, dataset: Dataset) -> str:
    """``classification`` if the model outputs one value per class, ``reconstruction`` if it
    outputs the flattened input; anything else is an error naming the shapes."""
    was_training = model.training
    model.eval()  # batch norm in eval mode: the dry run changes no running statistics
    with torch.no_grad():
        out = model(torch.zeros(2, *dataset.input_shape))
    model.train(was_training)
    features = math.prod(dataset.input_shape)
    if out.shape == (2, dataset.num_classes):
        return "classification"
    if out.shape == (2, features):
        return "reconstruction"
    raise ConfigError(
        f"model output {tuple(out.shape[1:])} fits neither {dataset.num_classes} classes nor a "
        f"reconstruction of the {features} input values of {dataset.name!r}"
    )


def prepare(config: RunConfig, cache: DataCache | None = None) -> Run:
    """Check the config, load the data, build and convert the model, build the optimizer.

    Every failure due to bad input happens here, before training starts.

    Raises:
        ConfigError, ValueError, TypeError: bad setting (names it and the valid values).
        asymprop.data.DatasetNotFoundError: the data is not on disk (says how to get it).
    """
    check_config(config)
    device = _device(config.device)
    normalize = config.normalize if config.normalize is not None else True
    dataset = load_data(config, normalize, cache)
    torch.manual_seed(config.seed)
    model = build_model(
        config.model, dataset.input_shape, dataset.num_classes, **config.model_options
    )
    task = config.task if config.task != "auto" else infer_task(model, dataset)
    if task == "reconstruction" and config.normalize is None:
        dataset = load_data(config, False, cache)  # a ReLU output cannot reach negative pixels
    if config.batch_size > len(dataset.train):  # type: ignore[arg-type]
        raise ConfigError(
            f"batch_size {config.batch_size} is larger than the {len(dataset.train)} training "  # type: ignore[arg-type]
            f"examples of {config.data!r}"
        )
    model = convert(model, config.rule, seed=config.seed, **config.rule_options).to(device)
    momentum = config.momentum
    if momentum is None:
        momentum = 0.0 if config.optimizer in ("adam", "adamw") else 0.9
    optimizer = make_optimizer(
        config.optimizer, model.parameters(), config.lr, momentum, config.weight_decay
    )
    loss_fn = F.cross_entropy if task == "classification" else reconstruction_loss
    inputs, labels = _first(dataset.test, config.align_batch_size)
    targets = labels if task == "classification" else inputs
    return Run(
        config=config,
        dataset=dataset,
        task=task,
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        device=device,
        probe=(inputs.to(device), targets.to(device)),
        layers=[name for name, _ in feedback_layers(model)],
    )


def _first(dataset: TorchDataset, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` examples of a dataset as one batch."""
    return next(_in_order(dataset, n))


def _in_order(dataset: TorchDataset, batch_size: int, workers: int = 0) -> Iterator[Any]:
    """Batches of a dataset in its own order (slices for in-memory tensors)."""
    if isinstance(dataset, TensorDataset):
        n = len(dataset)
        for start in range(0, n, batch_size):
            yield tuple(t[start : start + batch_size] for t in dataset.tensors)
    else:
        yield from DataLoader(dataset, batch_size=batch_size, num_workers=workers)


def minibatches(run: Run, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Epoch ``epoch``'s minibatches, in an order drawn from ``(seed, epoch)`` alone.

    A last minibatch of a single example is left out (batch norm cannot train on it).

    In-memory datasets are sliced directly (much faster than a ``DataLoader`` of single
    examples); others (image folders) go through a ``DataLoader`` with the same order.
    """
    train, batch_size = run.dataset.train, run.config.batch_size
    generator = torch.Generator().manual_seed(run.config.seed * 1_000_003 + epoch)
    order = torch.randperm(len(train), generator=generator)  # type: ignore[arg-type]
    batches = [order[start : start + batch_size] for start in _batch_starts(len(order), batch_size)]
    if isinstance(train, TensorDataset):
        inputs, labels = train.tensors
        for batch in batches:
            yield inputs[batch], labels[batch]
    else:
        yield from DataLoader(
            train, batch_sampler=[b.tolist() for b in batches], num_workers=run.config.workers
        )


def _batch_starts(n: int, batch_size: int) -> range:
    """Start of each minibatch; a last batch of one example is dropped (batch norm needs 2)."""
    stop = n - 1 if n % batch_size == 1 and n > batch_size else n
    return range(0, stop, batch_size)


def train_epoch(run: Run, epoch: int, progress: Progress | None = None) -> float:
    """One pass over the training set; returns the mean minibatch loss.

    Raises:
        asymprop.DivergenceError: the loss became NaN or infinite (weights not updated).
    """
    run.model.train()
    total, batches = 0.0, 0
    for inputs, labels in minibatches(run, epoch):
        inputs, labels = inputs.to(run.device), labels.to(run.device)
        targets = labels if run.task == "classification" else inputs
        # zero_grad, forward, loss.backward(), optimizer.step(), update_feedback(model)
        loss = train_step(run.model, run.optimizer, run.loss_fn, inputs, targets)
        total, batches = total + loss, batches + 1
        run.step += 1
        if progress is not None:  # redrawn by update() at most every 0.1 s
            progress.set_postfix_str(f"{run.config.rule} epoch {epoch} loss {loss:.3f}", False)
            progress.update(1)
    run.epoch = epoch
    return total / batches


def evaluate(run: Run) -> dict[str, float]:
    """Test loss and accuracy; per converted layer alignment and delta alignment.

    Returns ``{"test_loss", "test_accuracy", "angle_deg/<layer>", ...}`` (accuracy NaN for
    reconstruction). The model's mode and the training random stream are left as they were.
    """
    model, was_training = run.model, run.model.training
    loader = _in_order(run.dataset.test, EVAL_BATCH_SIZE, run.config.workers)
    loss_sum, correct, count = 0.0, 0, 0
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        with torch.no_grad():
            for inputs, labels in loader:
                inputs, labels = inputs.to(run.device), labels.to(run.device)
                outputs = model(inputs)
                targets = labels if run.task == "classification" else inputs
                loss_sum += float(run.loss_fn(outputs, targets)) * len(inputs)
                if run.task == "classification":
                    correct += int((outputs.argmax(dim=1) == labels).sum())
                count += len(inputs)
        # Delta alignment in training mode: the errors the rule sends while it learns.
        model.train()
        deltas = delta_alignment(model, run.loss_fn, *run.probe)
    model.train(was_training)
    metrics = {
        "test_loss": loss_sum / count,
        "test_accuracy": correct / count if run.task == "classification" else math.nan,
    }
    angles = alignment(model)
    for layer in run.layers:
        metrics[f"angle_deg/{layer}"] = angles[layer]["angle_deg"]
        metrics[f"sign_concordance/{layer}"] = angles[layer]["sign_concordance"]
        metrics[f"rel_error/{layer}"] = angles[layer]["rel_error"]
        metrics[f"delta_angle_deg/{layer}"] = deltas[layer]
    return metrics


def save_checkpoint(run: Run, path: str | os.PathLike[str]) -> None:
    """Write model (weights, feedback, rule state), optimizer and position, atomically."""
    state = {
        "config": run.config.to_dict(),
        "task": run.task,
        "epoch": run.epoch,
        "step": run.step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "torch_rng_state": torch.get_rng_state(),
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(run: Run, path: str | os.PathLike[str]) -> None:
    """Restore a :func:`save_checkpoint` file into a prepared run of the same config."""
    state = torch.load(path, map_location=run.device, weights_only=False)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng_state"])
    run.epoch, run.step = state["epoch"], state["step"]


def train(
    config: RunConfig,
    *,
    cache: DataCache | None = None,
    progress: Progress | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    run: Run | None = None,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """Train one run and write its directory; returns the ``metrics.csv`` rows.

    Writes ``config.yaml`` first, then after every epoch a ``metrics.csv`` row (see
    ``asymprop.records``) and ``checkpoint.pt``, and at the end the plots of
    ``asymprop.plotting``. A ``metrics.csv`` left by an earlier run in the same directory is
    replaced.

    Args:
        config: the run; checked by :func:`prepare` unless ``run`` is given (already prepared).
        cache: datasets shared between runs.
        progress: gets one ``update`` per training step.
        on_epoch: called with each row as it is written.
        run: ``config`` already prepared by :func:`prepare` (else prepared here).
        plots: draw the run's figures at the end.

    Raises:
        asymprop.DivergenceError: the loss became NaN or infinite; the rows and the checkpoint
            of the last finished epoch are on disk.
    """
    from .plotting import plot_run  # matplotlib only when a run finishes

    run = run if run is not None else prepare(config, cache)
    config = run.config
    out = config.run_dir
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", config.to_dict())
    metrics_path = out / "metrics.csv"
    metrics_path.unlink(missing_ok=True)
    writer = _tensorboard(out) if config.tensorboard else None
    columns = [*METRIC_COLUMNS, *layer_columns(run.layers)]

    rows: list[dict[str, Any]] = []
    for epoch in range(0, config.epochs + 1):
        start = time.perf_counter()
        with _torch_threads(config.threads):
            train_loss = train_epoch(run, epoch, progress) if epoch > 0 else math.nan
            row = {"epoch": epoch, "step": run.step, "train_loss": train_loss, **evaluate(run)}
        row["seconds"] = time.perf_counter() - start
        row = {key: row[key] for key in columns}
        append_row(metrics_path, row)
        save_checkpoint(run, out / CHECKPOINT)
        if writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and math.isfinite(value):
                    writer.add_scalar(key, value, epoch)
            writer.flush()
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
    if writer is not None:
        writer.close()
    if plots:
        plot_run(rows, out, title=config.rule)
    return rows


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block only (None: leave it)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tensorboard(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard"))
