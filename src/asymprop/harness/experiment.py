"""One training run, as one readable loop, and what lets it survive hours and many processes.

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

Randomness comes from ``config.seed`` only: ``torch.manual_seed(seed)`` (and NumPy's and
Python's) before the model is built (weights, dropout, noise), ``convert(..., seed=seed)`` for
the feedback weights, and a generator seeded by ``(seed, epoch)`` for each epoch's data order --
so the order of epoch ``e`` does not depend on what ran before it. Evaluation runs under
``torch.random.fork_rng`` and leaves the training stream untouched. The train/test split itself
is fixed (seed 0), so all seeds are scored on the same test set.

**Checkpoints and resume.** ``checkpoint.pt`` is replaced atomically
(``asymprop.harness.checkpoint``) after every epoch, every ``checkpoint_every_steps`` steps, and
when SIGINT/SIGTERM stop the run (:class:`~asymprop.harness.guard.StopSignals`). It holds all
the rest of the run depends on: the model's ``state_dict`` (weights, feedback weights and rule
state) with a SHA-256 digest of its tensors (checked on load), optimizer and grad-scaler state,
the random states, the position (epoch, step, batch within the epoch, the epoch's loss so far),
the learning-rate scale and the ``metrics.csv`` rows so far. The learning-rate schedule is a pure
function of the position and the data order of ``(seed, epoch)``, so nothing else is needed:
:func:`load_checkpoint` into a freshly prepared run and :func:`train` continues exactly (same
rows but ``seconds``, same weights, bit for bit on CPU with the same thread count).

**Divergence.** ``train_step`` refuses a non-finite loss, or one above ``explode_factor``
times the run's first loss, before touching the weights; every
``check_every_steps`` steps and before every checkpoint the weights, feedback weights and rule
buffers are scanned (:func:`~asymprop.harness.guard.first_nonfinite`), so no checkpoint ever holds a
NaN. ``on_divergence: stop`` raises :class:`RunDivergedError` naming rule, step and layer;
``skip`` skips a step whose loss is not finite, goes back to the last checkpoint when a weight
is (or when two steps in a row had a non-finite loss: the weights are finite but blown up), and
each time multiplies the learning rate by ``lr_backoff``, at most ``max_divergence_skips`` times.

**Several processes.** Under ``torchrun`` (:func:`prepare` with a ``DistInfo``) the model is
wrapped in ``DistributedDataParallel``; ``batch_size`` is the *global* batch: each global
minibatch (the same as in one process) is cut into ``world_size`` equal shares, rank ``r``
training on share ``r``, so a run on N processes equals a one-process run up to float rounding
(as a ``DistributedSampler`` would shard it, but with the one-process batches). The training
loss and the test metrics are reduced over ranks, and only rank 0 writes files. With
``strategy: fsdp`` the converted model is sharded instead (FSDP2's ``fully_shard``, see
:func:`asymprop.harness.distributed.shard`) before the optimizer is built; its checkpoints
put the model and optimizer state in a ``torch.distributed.checkpoint`` folder that every rank
writes (:func:`~asymprop.harness.checkpoint.save_sharded`), named by ``checkpoint.pt``.

The task follows from the model: a model whose output has one value per class is trained with
cross-entropy (classification); one whose output is the flattened input (the autoencoder) with
the mean squared reconstruction error, on pixels in [0, 1], and has no accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from ..convert import convert, feedback_layers
from ..layers import reshard
from ..metrics import alignment, delta_alignment
from ..norm import sigma_batchnorm
from ..optim import make_optimizer
from ..train import DivergenceError, feedback_step, train_step
from .checkpoint import (
    SHARDED_DIR,
    CheckpointError,
    capture_rng,
    load_sharded,
    read_checkpoint,
    remove_sharded,
    remove_stale,
    restore_rng,
    save_sharded,
    tensor_digest,
    write_atomic,
)
from .config import (
    RESUMABLE,
    ConfigError,
    LRSchedule,
    RunConfig,
    check_config,
    config_from_dict,
    resolve_device,
)
from .data import Dataset, load_dataset
from .distributed import DistInfo, gathered, wrap
from .guard import StopSignals, first_nonfinite, largest_weight, stalled
from .models import build_model
from .records import (
    METRIC_COLUMNS,
    append_row,
    code_identity,
    layer_columns,
    read_yaml,
    write_csv,
    write_yaml,
)

__all__ = [
    "CHECKPOINT",
    "RESUMABLE",
    "Autocast",
    "ConfigError",
    "DataCache",
    "Interrupted",
    "LRSchedule",
    "Progress",
    "Run",
    "RunConfig",
    "RunDivergedError",
    "check_config",
    "config_from_dict",
    "evaluate",
    "load_checkpoint",
    "minibatches",
    "prepare",
    "resume_config",
    "save_checkpoint",
    "train",
    "train_epoch",
]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
DATA_SPLIT_SEED = 0
"""Seed of datasets' own train/test split (digits): fixed, so every run sees one test set."""
EVAL_BATCH_SIZE = 1000


class RunDivergedError(DivergenceError):
    """The loss, a weight or a feedback weight became NaN or infinite; names rule, step, layer."""


class Interrupted(Exception):  # noqa: N818 (an event, not an error)
    """SIGINT or SIGTERM stopped the run after a finished step; ``checkpoint.pt`` holds it."""

    def __init__(self, signal_name: str, signum: int, epoch: int, step: int) -> None:
        super().__init__(f"stopped by {signal_name} after step {step} (epoch {epoch})")
        self.signal_name, self.signum, self.epoch, self.step = signal_name, signum, epoch, step


class Progress(Protocol):
    """What the loop reports steps to (a ``tqdm`` bar fits)."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...


DataCache = dict[tuple[Any, ...], Dataset]
"""Datasets already loaded, shared by the runs of a comparison."""


@dataclass
class Run:
    """A prepared run: what the loop needs, and where it is (what a checkpoint restores).

    ``model`` is what the loop calls (the converted model, possibly inside :class:`Autocast`
    and ``DistributedDataParallel``); ``module`` is the converted model itself (its
    ``state_dict`` is checkpointed, its layers are measured).
    """

    config: RunConfig
    dataset: Dataset
    task: str
    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    device: torch.device
    probe: tuple[Tensor, Tensor]  # a fixed test batch (inputs, targets) for delta alignment
    layers: list[str]  # qualified names of the converted layers, module order
    schedule: LRSchedule | None = None
    scaler: torch.amp.GradScaler | None = None
    rank: int = 0
    world_size: int = 1
    sharded: bool = False  # FSDP2: parameters are DTensor shards, checkpoints go through DCP
    saves: int = 0  # checkpoints written (names the DCP folder of each)
    # --- position ---
    epoch: int = 0  # epochs finished
    step: int = 0  # steps taken (engaged or mirror), all epochs together
    batch: int = 0  # minibatches of epoch ``epoch + 1`` done
    loss_sum: float = 0.0  # their summed loss ...
    loss_count: int = 0  # ... over this many finite ones
    seconds: float = 0.0  # time earlier processes spent on epoch ``epoch + 1``
    lr_scale: float = 1.0  # lowered by ``on_divergence: skip``
    divergence_skips: int = 0
    skipped_step: int | None = None  # the last step skipped for a non-finite loss
    rollback: str | None = None  # why the loop must go back to the last checkpoint (skip mode)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv so far
    saved_step: int | None = None  # the step of the last checkpoint written or loaded
    epoch_started: float = field(default_factory=time.perf_counter)
    stall_reported: bool = False  # guard.stalled has been logged once
    first_loss: float | None = None  # the first finite batch loss (explode_factor's reference)

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes files and reports progress."""
        return self.rank == 0

    def steps_per_epoch(self) -> int:
        n = len(self.dataset.train)  # type: ignore[arg-type]
        return len(_batch_starts(n, self.config.batch_size, self.world_size))


def reconstruction_loss(outputs: Tensor, inputs: Tensor) -> Tensor:
    """Mean squared error between the output and the (flattened) input."""
    return F.mse_loss(outputs, inputs.reshape(outputs.shape))


class Autocast(nn.Module):
    """``module``'s forward under ``torch.autocast``, with float32 outputs.

    Only the forward pass (and so its backward) runs in reduced precision: the loss, the
    optimizer and the rules' between-step updates (mirror mode, sign recomputation), which run
    outside the model's forward, stay in float32.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            outputs = self.module(*args, **kwargs)
        return outputs.float()


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BN_FEEDBACK = ("full", "sigma")
"""``RunConfig.bn_feedback`` values: BN's exact backward, or ``gamma / sigma`` only (000 App. D.3,
:func:`asymprop.sigma_batchnorm`)."""


def _autocast(run: Run) -> contextlib.AbstractContextManager[Any]:
    """The run's autocast for a forward pass outside :class:`Autocast` (evaluation)."""
    if run.config.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=_AMP_DTYPES[run.config.amp])


def load_data(config: RunConfig, normalize: bool, cache: DataCache | None = None) -> Dataset:
    """The run's dataset (from ``cache`` when already loaded)."""
    key = (config.data, config.data_dir, config.train_size, config.test_size, normalize)
    if cache is not None and key in cache:
        return cache[key]
    dataset = load_dataset(
        config.data,
        data_dir=config.data_dir,
        download=config.download,
        seed=DATA_SPLIT_SEED,
        train_size=config.train_size,
        test_size=config.test_size,
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
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *dataset.input_shape))
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"the model cannot run on {dataset.name!r} inputs: {reason}") from err
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


def prepare(
    config: RunConfig, cache: DataCache | None = None, dist_info: DistInfo | None = None
) -> Run:
    """Check the config, load the data, build and convert the model, build the optimizer.

    Every failure due to bad input happens here, before training starts.

    Args:
        config: the run.
        cache: datasets shared between runs.
        dist_info: this process's place in a torchrun job (``asymprop.harness.distributed.init()``);
            the model is wrapped in ``DistributedDataParallel`` when there are several, or
            sharded in place with FSDP2 (``config.strategy == "fsdp"``).

    Raises:
        ConfigError, ValueError, TypeError: bad setting (names it and the valid values).
        asymprop.harness.data.DatasetNotFoundError: the data is not on disk (says how to get it).
    """
    world_size = dist_info.world_size if dist_info is not None else 1
    check_config(config, world_size)
    if config.bn_feedback not in BN_FEEDBACK:
        raise ConfigError(
            f"bn_feedback must be one of {', '.join(BN_FEEDBACK)}, not {config.bn_feedback!r}"
        )
    schedule = config.schedule()
    if dist_info is not None and dist_info.distributed:
        device = dist_info.device
    else:
        device = resolve_device(config.device)
    normalize = config.normalize if config.normalize is not None else True
    dataset = load_data(config, normalize, cache)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    try:
        module = build_model(
            config.model, dataset.input_shape, dataset.num_classes, **config.model_options
        )
    except RuntimeError as err:  # torch's own complaint about a size, e.g. widths: [-3]
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(
            f"model {config.model!r} cannot be built with options {config.model_options}: {reason}"
        ) from err
    task = config.task if config.task != "auto" else infer_task(module, dataset)
    if task == "reconstruction" and config.normalize is None:
        dataset = load_data(config, False, cache)  # a ReLU output cannot reach negative pixels
    n_train = len(dataset.train)  # type: ignore[arg-type]
    if config.batch_size > n_train:
        raise ConfigError(
            f"batch_size {config.batch_size} is larger than the {n_train} training examples of "
            f"{config.data!r}"
        )
    if config.bn_feedback == "sigma":  # 000 App. D.3: BN's feedback path carries gamma / sigma
        module = sigma_batchnorm(module)
    module = convert(module, config.rule, seed=config.seed, **config.rule_options).to(device)
    sharded = dist_info is not None and dist_info.distributed and config.strategy == "fsdp"
    if sharded:  # before the optimizer: it must hold the sharded Parameters
        assert dist_info is not None
        module = wrap(module, dist_info, "fsdp")
    momentum = config.momentum
    if momentum is None:
        momentum = 0.0 if config.optimizer in ("adam", "adamw") else 0.9
    lr = config.lr
    if config.lr_reference_batch is not None:  # linear scaling rule (Goyal et al. 2017)
        lr *= config.batch_size / config.lr_reference_batch
    optimizer = make_optimizer(
        config.optimizer, module.parameters(), lr, momentum, config.weight_decay
    )
    for group in optimizer.param_groups:  # the schedule multiplies this
        group["initial_lr"] = group["lr"]
    trained_feedback = any(layer.rule.trainable_feedback for _, layer in feedback_layers(module))
    if trained_feedback and config.weight_decay == 0 and (dist_info is None or dist_info.rank == 0):
        log.warning(
            "rule %r with weight_decay=0: B - W never shrinks (Kolen-Pollack aligns B with W "
            "through the shared weight decay), so B stays as far from W as it started and the run "
            "is feedback alignment with a trained B; set --weight-decay (e.g. 1e-4)",
            config.rule,
        )
    model = module
    if config.amp != "none":
        model = Autocast(model, device.type, _AMP_DTYPES[config.amp])
    if dist_info is not None and not sharded:
        model = wrap(model, dist_info)
    loss_fn = F.cross_entropy if task == "classification" else reconstruction_loss
    inputs, labels = _first(dataset.test, config.align_batch_size)
    targets = labels if task == "classification" else inputs
    return Run(
        config=config,
        dataset=dataset,
        task=task,
        model=model,
        module=module,
        optimizer=optimizer,
        loss_fn=loss_fn,
        device=device,
        probe=(inputs.to(device), targets.to(device)),
        layers=[name for name, _ in feedback_layers(module)],
        schedule=schedule,
        scaler=torch.amp.GradScaler(device.type) if config.amp == "fp16" else None,
        rank=dist_info.rank if dist_info is not None else 0,
        world_size=world_size,
        sharded=sharded,
    )


def _first(dataset: TorchDataset, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` examples of a dataset as one batch."""
    return next(_in_order(dataset, n))


def _in_order(
    dataset: TorchDataset, batch_size: int, workers: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[Any]:
    """Batches of a dataset in its own order (slices for in-memory tensors); with several
    processes, rank ``r`` gets batches ``r, r + world_size, ...``."""
    n = len(dataset)  # type: ignore[arg-type]
    starts = list(range(0, n, batch_size))[rank::world_size]
    if isinstance(dataset, TensorDataset):
        for start in starts:
            yield tuple(t[start : start + batch_size] for t in dataset.tensors)
    else:
        batches = [list(range(s, min(s + batch_size, n))) for s in starts]
        yield from DataLoader(
            dataset, batch_sampler=batches, num_workers=workers, worker_init_fn=_worker_init
        )


def minibatches(run: Run, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Epoch ``epoch``'s minibatches from number ``start`` on, in an order drawn from
    ``(seed, epoch)`` alone.

    With several processes each global minibatch is cut into ``world_size`` equal shares and
    this process gets share ``rank``. A last minibatch that cannot be split into shares of at
    least two examples is left out (batch norm cannot train on one).

    In-memory datasets are sliced directly (much faster than a ``DataLoader`` of single
    examples); others (image folders) go through a ``DataLoader`` with the same order.
    """
    train, batch_size = run.dataset.train, run.config.batch_size
    generator = torch.Generator().manual_seed(run.config.seed * 1_000_003 + epoch)
    order = torch.randperm(len(train), generator=generator)  # type: ignore[arg-type]
    starts = _batch_starts(len(order), batch_size, run.world_size)[start:]
    batches = [order[s : s + batch_size] for s in starts]
    if run.world_size > 1:
        share = [len(b) // run.world_size for b in batches]
        batches = [
            b[run.rank * k : (run.rank + 1) * k] for b, k in zip(batches, share, strict=True)
        ]
    if isinstance(train, TensorDataset):
        inputs, labels = train.tensors
        for batch in batches:
            yield inputs[batch], labels[batch]
    else:
        yield from DataLoader(
            train,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=run.config.workers,
            worker_init_fn=_worker_init,
        )


def _worker_init(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which finishes its step first
    (the terminal sends SIGINT to the whole process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _batch_starts(n: int, batch_size: int, world_size: int = 1) -> range:
    """Start of each global minibatch; a last one that does not split into ``world_size``
    shares of >= 2 examples is dropped (with one process: a last batch of one)."""
    last = n % batch_size
    if last and n > batch_size and (last % world_size or last // world_size < 2):
        return range(0, n - last, batch_size)
    return range(0, n, batch_size)


# --- the loop -----------------------------------------------------------------------------------


def train_epoch(
    run: Run,
    epoch: int,
    progress: Progress | None = None,
    stop: StopSignals | None = None,
    *,
    checkpoints: bool = False,
) -> float:
    """Train epoch ``epoch`` from minibatch ``run.batch`` on; returns its mean minibatch loss.

    An epoch ``<= mirror_warmup_epochs`` runs one pure mirror-mode step per minibatch instead
    (and returns NaN). After each step: a NaN/inf scan every ``check_every_steps`` steps; with
    ``checkpoints``, ``checkpoint.pt`` every ``checkpoint_every_steps`` steps and when ``stop``
    has caught a signal.

    Under ``on_divergence: skip`` a non-finite weight (or two skipped steps in a row) ends the
    epoch early with ``run.rollback`` saying why: the caller goes back to the last checkpoint.

    Raises:
        RunDivergedError: a NaN or inf in the loss, a weight or a feedback weight.
        Interrupted: ``stop`` caught SIGINT/SIGTERM (after a checkpoint, with ``checkpoints``).
    """
    config = run.config
    mirror_only = epoch <= config.mirror_warmup_epochs
    example = _mirror_example(run) if mirror_only else None
    every = config.checkpoint_every_steps
    run.model.train()
    for inputs, labels in minibatches(run, epoch, start=run.batch):
        inputs, labels = inputs.to(run.device), labels.to(run.device)
        targets = labels if run.task == "classification" else inputs
        if mirror_only:  # 000 App. D.2: B learns W's transpose before any engaged step
            feedback_step(run.module, example_input=example)  # wm: one mirror step
            example, loss = None, math.nan
        else:
            loss = _engaged_step(run, epoch, inputs, targets)
            if run.rollback is not None:  # two skipped steps in a row: the caller goes back
                return math.nan
        run.step, run.batch = run.step + 1, run.batch + 1
        if math.isfinite(loss):
            run.loss_sum, run.loss_count = run.loss_sum + loss, run.loss_count + 1
        if progress is not None:  # redrawn by update() at most every 0.1 s
            progress.set_postfix_str(f"{config.rule} epoch {epoch} loss {loss:.3f}", False)
            progress.update(1)
        if run.rollback is None and run.step % config.check_every_steps == 0:
            run.rollback = _check_state(run, epoch)
        if run.rollback is not None:  # the caller goes back to the last checkpoint
            return math.nan
        stopping = stop is not None and _any_rank(run, stop.requested)
        if checkpoints and (stopping or (every is not None and run.step % every == 0)):
            run.rollback = _check_state(run, epoch)  # never write NaN weights over a good one
            if run.rollback is not None:
                return math.nan
            save_checkpoint(run, config.run_dir / CHECKPOINT)
        if stopping:
            assert stop is not None and stop.signum is not None
            raise Interrupted(stop.name, stop.signum, epoch, run.step)
    count = _reduce_sum(run, [run.loss_sum, run.loss_count])
    return count[0] / count[1] if count[1] else math.nan


def _mirror_example(run: Run) -> Tensor:
    """The first minibatch of epoch 1, from which mirror mode learns the layers' input shapes
    (the same batch whenever a run starts or resumes, so the noise shapes never change)."""
    inputs, _ = next(minibatches(run, 1))
    return inputs.to(run.device)


def _engaged_step(run: Run, epoch: int, inputs: Tensor, targets: Tensor) -> float:
    """One ``asymprop.train_step`` at the scheduled learning rate; NaN for a skipped step."""
    config = run.config
    steps = run.steps_per_epoch()
    start = epoch - 1 + run.batch / steps
    factor = run.schedule.factor(start, start + 1 / steps) if run.schedule is not None else 1.0
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor * run.lr_scale
    loss_fn = _GuardedLoss(run)
    try:
        return train_step(run.model, run.optimizer, loss_fn, inputs, targets, scaler=run.scaler)
    except DivergenceError as err:
        detail = str(err).split(" (rule")[0]
        if config.on_divergence == "skip" and run.divergence_skips < config.max_divergence_skips:
            if run.skipped_step == run.step:  # the step before was skipped too
                run.rollback = f"steps {run.step} and {run.step + 1}: {detail}"
                return math.nan
            _back_off(run, f"step {run.step + 1}: {detail}; step skipped")
            run.skipped_step = run.step + 1
            return math.nan
        where = _culprit(run)
        raise _diverged(run, epoch, run.step + 1, f"{detail}; {where}") from err


class _GuardedLoss:
    """The loss function of one step, checked at its first call (the batch loss) before any
    weight changes: a loss above ``explode_factor`` times the run's first loss raises
    ``DivergenceError`` as a NaN would; under DDP every rank learns whether any rank's loss is
    not finite or exploding, and all raise together (a rank left alone would wait forever in
    backward's all-reduce)."""

    def __init__(self, run: Run) -> None:
        self.run, self.first = run, True

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = self.run.loss_fn(outputs, targets)
        if not self.first:
            return loss  # node perturbation's per-example calls
        self.first = False
        run = self.run
        value = float(loss.detach())  # the sync train_step makes anyway
        limit = run.config.explode_factor * (run.first_loss or math.inf)
        exploding = math.isfinite(value) and abs(value) > limit
        if math.isfinite(value) and run.first_loss is None and value > 0:
            run.first_loss = value
        if run.world_size > 1 and _any_rank(run, not math.isfinite(value) or exploding):
            return loss + math.nan
        if exploding:
            raise DivergenceError(
                f"loss {value:.3g} exceeds explode_factor={run.config.explode_factor:g} times "
                f"the run's first loss {run.first_loss:.3g}"
            )
        return loss


def _back_off(run: Run, what: str) -> None:
    run.lr_scale *= run.config.lr_backoff
    run.divergence_skips += 1
    if run.is_main:
        log.warning(
            "%s (rule %s); learning rate scaled by %g (divergence %d of at most %d)",
            what,
            run.config.rule,
            run.lr_scale,
            run.divergence_skips,
            run.config.max_divergence_skips,
        )


def _culprit(run: Run) -> str:
    """Where the trouble is: the first non-finite tensor, or the layer with the largest weight."""
    bad = _first_nonfinite(run)
    if bad is not None:
        layer, attr, kind = bad
        return f"{attr} of layer {layer!r} is {kind}"
    with gathered(run.module) if run.sharded else contextlib.nullcontext():
        largest = largest_weight(run.module)
    if largest is None:
        return "the weights are finite"
    return (
        f"the weights are finite, the largest |weight| is {largest[1]:.3g} in layer {largest[0]!r}"
    )


def _check_state(run: Run, epoch: int) -> str | None:
    """Scan weights, feedback weights and rule buffers for NaN/inf: None when all are finite,
    else why to go back to the last checkpoint (``on_divergence: skip`` with skips left).

    Raises:
        RunDivergedError: a NaN/inf with ``on_divergence: stop`` or no skip left.
    """
    bad = _first_nonfinite(run)
    if bad is None:
        return None
    layer, attr, kind = bad
    what = f"{attr} of layer {layer!r} is {kind}"
    config = run.config
    if config.on_divergence == "skip" and run.divergence_skips < config.max_divergence_skips:
        return f"after step {run.step}: {what}"
    raise _diverged(run, epoch, run.step, f"{what} after this step")


def _first_nonfinite(run: Run) -> tuple[str, str, str] | None:
    """``guard.first_nonfinite`` of the model; sharded, the first rank's finding (every rank
    scans its own shards, and all must agree on stopping)."""
    bad = first_nonfinite(run.module)
    if not run.sharded:
        return bad
    if not _any_rank(run, bad is not None):  # one all-reduce of a flag when all is finite
        return None
    found: list[Any] = [None] * run.world_size
    dist.all_gather_object(found, bad)
    return next(tuple(b) for b in found if b is not None)


def _diverged(run: Run, epoch: int, step: int, what: str) -> RunDivergedError:
    return RunDivergedError(
        f"rule {run.config.rule!r} diverged at step {step} (epoch {epoch}): {what}"
    )


def _any_rank(run: Run, flag: bool) -> bool:
    """``flag`` on any rank (itself in one process)."""
    if run.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=_comm_device(run))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _reduce_sum(run: Run, values: list[float]) -> list[float]:
    """Sums over ranks (the values themselves in one process)."""
    if run.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device(run))
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def _comm_device(run: Run) -> torch.device:
    return run.device if dist.get_backend() == "nccl" else torch.device("cpu")


def evaluate(run: Run) -> dict[str, float]:
    """Test loss and accuracy; per converted layer alignment and delta alignment.

    Returns ``{"test_loss", "test_accuracy", "angle_deg/<layer>", ...}`` (accuracy NaN for
    reconstruction). With several processes each scores a share of the test set and the sums
    are reduced. The model's mode and the training random stream are left as they were.
    """
    model, was_training = run.module, run.module.training
    config = run.config
    loader = _in_order(run.dataset.test, EVAL_BATCH_SIZE, config.workers, run.rank, run.world_size)
    loss_sum, correct, count = 0.0, 0, 0
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        with torch.no_grad(), _autocast(run):
            for inputs, labels in loader:
                inputs, labels = inputs.to(run.device), labels.to(run.device)
                outputs = model(inputs).float()
                targets = labels if run.task == "classification" else inputs
                loss_sum += float(run.loss_fn(outputs, targets)) * len(inputs)
                if run.task == "classification":
                    correct += int((outputs.argmax(dim=1) == labels).sum())
                count += len(inputs)
            if run.sharded:  # every forward pass is collective: all ranks run as many
                starts = range(0, len(run.dataset.test), EVAL_BATCH_SIZE)  # type: ignore[arg-type]
                most = -(-len(starts) // run.world_size)
                mine = len(starts[run.rank :: run.world_size])
                for _ in range(most - mine):
                    model(run.probe[0])  # not scored
        reshard(model)  # FSDP: no backward frees what the test passes gathered
        # Delta alignment in training mode: the errors the rule sends while it learns.
        model.train()
        deltas = delta_alignment(model, run.loss_fn, *run.probe)
        reshard(model)
    model.train(was_training)
    total, hits, n = _reduce_sum(run, [loss_sum, correct, count])
    metrics = {
        "test_loss": total / n,
        "test_accuracy": hits / n if run.task == "classification" else math.nan,
    }
    angles = alignment(model)  # B against the whole W (alignment gathers each layer's W)
    for layer in run.layers:
        metrics[f"angle_deg/{layer}"] = angles[layer]["angle_deg"]
        metrics[f"sign_concordance/{layer}"] = angles[layer]["sign_concordance"]
        metrics[f"rel_error/{layer}"] = angles[layer]["rel_error"]
        metrics[f"delta_angle_deg/{layer}"] = deltas[layer]
    return metrics


# --- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(run: Run, path: str | Path) -> None:
    """Write everything the rest of the run depends on to ``path``, atomically (rank 0 only).

    Model (weights, feedback weights, rule state), optimizer, grad scaler, random states,
    position, learning-rate scale and the ``metrics.csv`` rows so far.
    """
    run.saved_step = run.step
    # Each rank's share of the epoch's loss so far (its own batches): a resumed rank continues
    # from its own sums, so the epoch's mean is the uninterrupted run's, bit for bit.
    losses = [[run.loss_sum, float(run.loss_count)]]
    if run.world_size > 1:
        local = torch.tensor(losses[0], dtype=torch.float64, device=_comm_device(run))
        gathered_losses = [torch.zeros_like(local) for _ in range(run.world_size)]
        dist.all_gather(gathered_losses, local)
        losses = [t.tolist() for t in gathered_losses]
    sharded = None
    if run.sharded:  # every rank writes its shards; a new folder each time (atomic: see below)
        run.saves += 1
        sharded = f"{SHARDED_DIR}/step{run.step:09d}-{run.saves}"
        save_sharded(run.module, run.optimizer, Path(path).parent / sharded)
    if not run.is_main:
        return
    seconds = run.seconds + time.perf_counter() - run.epoch_started if run.batch else 0.0
    state = {
        "config": run.config.to_dict(),
        "task": run.task,
        "epoch": run.epoch,
        "step": run.step,
        "batch": run.batch,
        "loss_sum": run.loss_sum,
        "loss_count": run.loss_count,
        "rank_losses": losses,  # [[loss_sum, loss_count] of rank r, ...]
        "seconds": seconds,
        "lr_scale": run.lr_scale,
        "divergence_skips": run.divergence_skips,
        "skipped_step": run.skipped_step,
        "first_loss": run.first_loss,
        "rows": run.rows,
        "model": (model := {} if sharded else run.module.state_dict()),
        "digest": tensor_digest(model),
        "optimizer": None if sharded else run.optimizer.state_dict(),
        "sharded": sharded,  # the DCP folder holding model and optimizer, or None
        "saves": run.saves,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": capture_rng([run.device]),
    }
    write_atomic(state, path)
    if sharded is not None:  # checkpoint.pt names the new folder now: the old ones can go
        remove_sharded(Path(path).parent, keep=sharded)


def load_checkpoint(run: Run, path: str | Path) -> None:
    """Restore a :func:`save_checkpoint` file into a prepared run of the same config.

    Raises:
        asymprop.harness.checkpoint.CheckpointError: no such file, or not a checkpoint.
        ConfigError: the checkpoint was written by a run with other settings (names them).
    """
    state = _checked(read_checkpoint(path), Path(path))
    saved = config_from_dict(RunConfig, state["config"], f"{path}")
    changed = [
        name
        for name in RunConfig.__dataclass_fields__
        if name not in (*RESUMABLE, "out") and getattr(saved, name) != getattr(run.config, name)
    ]
    if changed:
        raise ConfigError(
            f"{path} was written by a run with other settings ({', '.join(changed)}); only "
            f"{', '.join(RESUMABLE)} may change on resume"
        )
    sharded = state.get("sharded")
    if (sharded is not None) != run.sharded:
        written = "a sharded (fsdp) run" if sharded is not None else "an unsharded run"
        raise CheckpointError(
            f"{path} was written by {written}; this run is "
            f"{'sharded' if run.sharded else 'not sharded'}: resume under torchrun with "
            "the same --strategy and several processes, or one process for an unsharded one"
        )
    if sharded is not None:  # collective: DCP reads every rank's shards
        load_sharded(run.module, run.optimizer, Path(path).parent / sharded)
    else:
        run.module.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    run.saves = state.get("saves", 0)
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    run.epoch, run.step, run.batch = state["epoch"], state["step"], state["batch"]
    run.loss_sum, run.loss_count = state["loss_sum"], state["loss_count"]
    losses = state.get("rank_losses")  # absent in checkpoints of earlier versions
    if losses is not None and len(losses) == run.world_size:
        run.loss_sum, run.loss_count = losses[run.rank][0], int(losses[run.rank][1])
    elif losses is not None:  # another process count: the whole sums on rank 0
        total = [sum(r[0] for r in losses), sum(int(r[1]) for r in losses)]
        run.loss_sum, run.loss_count = (total[0], total[1]) if run.is_main else (0.0, 0)
    run.seconds, run.lr_scale = state["seconds"], state["lr_scale"]
    run.divergence_skips, run.rows = state["divergence_skips"], list(state["rows"])
    run.skipped_step = state["skipped_step"]
    run.first_loss = state.get("first_loss")  # absent in checkpoints before explode_factor
    run.saved_step = run.step


_CHECKPOINT_KEYS = ("config", "model", "optimizer", "rng", "epoch", "step", "rows")


def _checked(state: Any, path: Path) -> dict[str, Any]:
    """A loaded checkpoint, refused if it is not one of ours, damaged or holds NaN/inf."""
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint of asymprop train (it has no {', '.join(missing)})"
        )
    digest = state.get("digest")
    if digest is not None and digest != tensor_digest(state["model"]):
        raise CheckpointError(
            f"{path} is damaged: its tensors no longer match the SHA-256 digest written with "
            "them (bytes changed after the write)"
        )
    for name, tensor in state["model"].items():
        finite = not isinstance(tensor, Tensor) or not tensor.is_floating_point()
        if not finite and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{path} holds non-finite values in {name}: not a good state to resume from"
            )
    return state


def resume_config(
    directory: str | Path, changes: dict[str, Any] | None = None, source: str = "--resume"
) -> RunConfig:
    """The config of the run whose ``checkpoint.pt`` is in ``directory``, with ``changes``.

    ``out`` becomes ``directory`` (a moved run directory still resumes).

    Raises:
        asymprop.harness.checkpoint.CheckpointError: no readable checkpoint there.
        ConfigError: a change to a setting not in :data:`RESUMABLE` (names it).
    """
    directory = Path(directory)
    state = _checked(read_checkpoint(directory / CHECKPOINT), directory / CHECKPOINT)
    saved = dict(state["config"])
    _agrees_with_config_yaml(directory, saved)
    changes = dict(changes or {})
    for key, value in changes.items():
        if key not in RESUMABLE and key in saved and saved[key] != value:
            raise ConfigError(
                f"{source}: {key} cannot change when resuming (the run used {saved[key]!r}); "
                f"settings that may change: {', '.join(RESUMABLE)}"
            )
    config: RunConfig = config_from_dict(
        RunConfig, {**saved, **changes, "out": str(directory)}, source
    )
    return config


def _agrees_with_config_yaml(directory: Path, saved: dict[str, Any]) -> None:
    """The run's ``config.yaml`` says what its checkpoint says (not another run's checkpoint,
    not an edited file that resuming would silently ignore and overwrite)."""
    path = directory / "config.yaml"
    if not path.is_file():
        return
    written = config_from_dict(RunConfig, {**read_yaml(path), "out": str(directory)}, str(path))
    loaded = config_from_dict(RunConfig, {**saved, "out": str(directory)}, "checkpoint")
    differ = [
        f"{name} ({getattr(written, name)!r} in config.yaml, {getattr(loaded, name)!r} in "
        f"{CHECKPOINT})"
        for name in RunConfig.__dataclass_fields__
        if getattr(written, name) != getattr(loaded, name)
    ]
    if differ:
        raise ConfigError(
            f"{path} disagrees with {directory / CHECKPOINT} on {'; '.join(differ)}: the "
            "checkpoint belongs to another run, or config.yaml was edited (resuming would "
            "overwrite it); change settings on resume with flags or key=value overrides"
        )


# --- one run ------------------------------------------------------------------------------------


def train(
    config: RunConfig,
    *,
    cache: DataCache | None = None,
    progress: Progress | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    run: Run | None = None,
    plots: bool = True,
    stop: StopSignals | None = None,
    dist_info: DistInfo | None = None,
) -> list[dict[str, Any]]:
    """Train one run (or the rest of a resumed one) and write its directory; returns the
    ``metrics.csv`` rows.

    Writes ``config.yaml`` first, then after every epoch ``checkpoint.pt`` and a
    ``metrics.csv`` row (see ``asymprop.harness.records``), and at the end the plots of
    ``asymprop.harness.plotting``. A run given with a loaded checkpoint (:func:`load_checkpoint`)
    continues where it stopped, and its ``metrics.csv`` is rewritten from the checkpoint's rows;
    otherwise files of an earlier run in the same directory are replaced.

    Args:
        config: the run; checked by :func:`prepare` unless ``run`` is given (already prepared).
        cache: datasets shared between runs.
        progress: gets one ``update`` per training step.
        on_epoch: called with each row as it is written (rank 0 only).
        run: ``config`` already prepared by :func:`prepare` (else prepared here).
        plots: draw the run's figures at the end.
        stop: a :class:`~asymprop.harness.guard.StopSignals` whose signals end the run after a step.
        dist_info: for :func:`prepare` when ``run`` is not given.

    Raises:
        RunDivergedError: a NaN or inf in the loss, a weight or a feedback weight; the rows
            and the checkpoint of the last good state are on disk.
        Interrupted: ``stop`` caught a signal; the checkpoint holds the last step.
    """
    run = run if run is not None else prepare(config, cache, dist_info)
    config = run.config
    out = config.run_dir
    path = out / CHECKPOINT
    columns = [*METRIC_COLUMNS, *layer_columns(run.layers)]
    writer = None
    if run.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        if not run.rows:  # a fresh run: an earlier run's sharded checkpoints go too
            remove_sharded(out, keep=None)
        write_yaml(out / "config.yaml", config.to_dict())
        _write_code(out / "code.yaml", run.epoch if run.rows else None)
        _rewrite_metrics(run, columns)
        writer = _tensorboard(out) if config.tensorboard else None

    def record(row: dict[str, Any]) -> None:
        row = {key: row[key] for key in columns}
        run.rows.append(row)
        save_checkpoint(run, path)  # first the checkpoint: it holds the row too
        if not run.is_main:
            return
        append_row(out / "metrics.csv", row)
        if writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and math.isfinite(value):
                    writer.add_scalar(key, value, row["epoch"])
            writer.flush()
        if on_epoch is not None:
            on_epoch(row)

    with _torch_threads(config.threads):
        if not run.rows:  # epoch 0: the untouched model
            run.epoch_started = time.perf_counter()
            row = {"epoch": 0, "step": 0, "train_loss": math.nan, **evaluate(run)}
            record({**row, "seconds": time.perf_counter() - run.epoch_started})
        while run.epoch < config.epochs:
            _epochs(run, progress, stop, record)
            if run.rollback is not None:  # on_divergence: skip, and a weight went non-finite
                _roll_back(run, path, run.rollback)
                if run.is_main:
                    _rewrite_metrics(run, columns)
    if writer is not None:
        writer.close()
    if plots and run.is_main:
        from .plotting import plot_run  # matplotlib only when a run finishes

        plot_run(run.rows, out, title=config.rule)
    return run.rows


def _write_code(path: Path, resumed_at: int | None) -> None:
    """Record the code that makes the run (:func:`~asymprop.harness.records.code_identity`).

    A fresh run (``resumed_at`` None) writes the identity; a run resumed at an epoch by other
    code keeps the original and appends ``resumed: [{epoch, version, source_sha256}, ...]``, so
    the file never claims that one code made a run two made. A resumed run without a readable
    ``code.yaml`` (made before asymprop wrote one) starts from ``unknown`` code.
    """
    identity = code_identity()
    if resumed_at is None:
        write_yaml(path, identity)
        return
    unknown: dict[str, Any] = {key: "unknown" for key in identity}  # no code.yaml, or unreadable
    recorded: dict[str, Any]
    try:
        recorded = read_yaml(path) if path.is_file() else dict(unknown)
    except (OSError, ValueError):
        recorded = dict(unknown)
    latest = (recorded.get("resumed") or [recorded])[-1]
    if {k: latest.get(k) for k in identity} != identity:
        recorded["resumed"] = [*recorded.get("resumed", []), {"epoch": resumed_at, **identity}]
        write_yaml(path, recorded)


def _epochs(
    run: Run,
    progress: Progress | None,
    stop: StopSignals | None,
    record: Callable[[dict[str, Any]], None],
) -> None:
    while run.epoch < run.config.epochs:
        epoch = run.epoch + 1
        run.epoch_started = time.perf_counter()
        train_loss = train_epoch(run, epoch, progress, stop, checkpoints=True)
        if run.rollback is None:
            row = {"epoch": epoch, "step": run.step, "train_loss": train_loss, **evaluate(run)}
            run.rollback = _check_state(run, epoch)
        if run.rollback is not None:
            return  # train() goes back to the last checkpoint
        row["seconds"] = run.seconds + time.perf_counter() - run.epoch_started
        run.epoch, run.batch, run.loss_sum, run.loss_count, run.seconds = epoch, 0, 0.0, 0, 0.0
        record(row)
        note = stalled(run.rows, run.dataset.num_classes) if run.task == "classification" else None
        if note is not None and run.is_main and not run.stall_reported:
            run.stall_reported = True
            log.warning("%s: %s", run.config.run_dir, note)
        if stop is not None and _any_rank(run, stop.requested):
            assert stop.signum is not None
            raise Interrupted(stop.name, stop.signum, epoch, run.step)


def _roll_back(run: Run, path: Path, what: str) -> None:
    """``on_divergence: skip`` after a non-finite weight: the last checkpoint, a lower lr."""
    run.rollback = None
    if not path.exists():
        raise _diverged(run, run.epoch + 1, run.step, f"{what}; no checkpoint to go back to")
    scale, skips = run.lr_scale, run.divergence_skips
    if run.world_size > 1:
        dist.barrier()  # rank 0 finished writing before anyone reads
    load_checkpoint(run, path)
    run.lr_scale, run.divergence_skips = scale, skips
    _back_off(run, f"{what}; back to the checkpoint of step {run.step}")


def _rewrite_metrics(run: Run, columns: list[str]) -> None:
    path = run.config.run_dir / "metrics.csv"
    if run.rows:
        write_csv(path, run.rows, columns)
    else:
        path.unlink(missing_ok=True)


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


torch_threads = _torch_threads
"""The public name of :func:`_torch_threads` (the papers' items run their loops on one thread)."""


def _tensorboard(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard"))
