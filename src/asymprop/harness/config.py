"""The settings of a run (:class:`RunConfig`), read from YAML files and command lines, and every
check that can be made on them before any data is loaded (:func:`check_config`).

    config = config_from_dict(RunConfig, {"rule": "fa", "lr": 0.01})   # names bad keys/types
    check_config(config)                                                 # names bad values

Every rejection is a :class:`ConfigError` (or the rule's own ``ValueError``/``TypeError``) whose
one-line message names the setting, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..optim import OPTIMIZERS
from ..rules import RULES, did_you_mean, make_rule
from .data import list_datasets
from .models import list_models
from .records import parse_scalar

__all__ = [
    "CONFIGS",
    "RESUMABLE",
    "ConfigError",
    "LRSchedule",
    "RunConfig",
    "check_config",
    "config_from_dict",
    "find_config",
    "named_configs",
    "resolve_device",
]

CONFIGS = Path(__file__).resolve().parent / "configs"
"""The named configs shipped with the package (``asymprop list`` shows them)."""


def named_configs() -> list[str]:
    """The names of the packaged configs, sorted."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def find_config(name: str) -> Path:
    """A config file: ``name`` as a path, else ``./experiments/<name>.yaml`` (your own named
    configs), else the packaged ``<name>.yaml``.

    Raises:
        FileNotFoundError: none exists; the message says where it looked and lists the names.
    """
    path = Path(name)
    if path.is_dir():
        raise FileNotFoundError(f"config {name!r} is a directory, not a YAML file")
    if path.is_file():
        return path
    places = [Path("experiments") / f"{name}.yaml", CONFIGS / f"{name}.yaml"]
    for place in places:
        if place.is_file():
            return place
    raise FileNotFoundError(
        f"config {name!r} not found{did_you_mean(name, named_configs())}: looked for the file "
        f"{str(path)!r}, "
        f"{str(places[0])!r} and the packaged {str(places[1])!r}; "
        f"packaged configs: {', '.join(named_configs())}"
    )


Task = Literal["auto", "classification", "reconstruction"]
Amp = Literal["none", "bf16", "fp16"]
OnDivergence = Literal["stop", "skip"]
Strategy = Literal["ddp", "fsdp"]

RESUMABLE = (
    "epochs",
    "threads",
    "workers",
    "device",
    "data_dir",
    "download",
    "tensorboard",
    "checkpoint_every_steps",
    "check_every_steps",
    "on_divergence",
    "lr_backoff",
    "max_divergence_skips",
    "explode_factor",
)
"""Settings that ``--resume`` may change: none of them changes what the next step computes."""


SEED_MAX = 2**32 - 1
"""The largest seed every generator a run seeds (torch, NumPy, Python) accepts."""


class ConfigError(ValueError):
    """A setting is missing, unknown, of the wrong type or out of range (the message says which)."""


@dataclass
class LRSchedule:
    """A factor on the learning rate: linear warm-up, then a ``gamma`` decay at each milestone.

    Epochs count in fractions, updated every step (Goyal et al. 2017 warm up per iteration). A
    step that runs from fractional epoch ``t0`` to ``t1`` gets::

        ramp   = clamp((t1 - warmup_start_epoch) / warmup_epochs, 0, 1)      # 1 if no warm-up
        factor = (warmup_start_factor + (1 - warmup_start_factor) * ramp)
                 * gamma ** (number of milestones m with m <= t0)

    so "10x decay after epoch 32" holds from the first step of epoch 33.

    Attributes:
        warmup_epochs: length of the linear ramp in epochs (0: none).
        warmup_start_epoch: epochs before the ramp starts (2 for weight mirrors, whose first two
            epochs are mirror mode only: the ramp then spans epochs 3-8).
        warmup_start_factor: the factor before and at the start of the ramp.
        milestones: epochs after which the factor is multiplied by ``gamma``.
        gamma: the decay per milestone.

    Example: ``lr_schedule: {warmup_epochs: 6, milestones: [32, 62, 82], gamma: 0.1}``.
    Paper: 000 App. D.1 (after Goyal et al. 2017).
    """

    warmup_epochs: float = 0.0
    warmup_start_epoch: float = 0.0
    warmup_start_factor: float = 0.0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first value out of range."""
        for name in ("warmup_epochs", "warmup_start_epoch"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"lr_schedule.{name} must be a number >= 0, got {value}")
        if not 0 <= self.warmup_start_factor <= 1:
            raise ConfigError(
                f"lr_schedule.warmup_start_factor must be in [0, 1], got {self.warmup_start_factor}"
            )
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"lr_schedule.gamma must be in (0, 1], got {self.gamma}")
        ordered = sorted(self.milestones)
        if any(not m > 0 for m in ordered) or ordered != self.milestones:
            raise ConfigError(
                f"lr_schedule.milestones must be increasing epochs > 0, got {self.milestones}"
            )

    def factor(self, start: float, end: float) -> float:
        """The factor for a step from fractional epoch ``start`` to ``end``."""
        ramp = 1.0
        if self.warmup_epochs > 0:
            ramp = min(max((end - self.warmup_start_epoch) / self.warmup_epochs, 0.0), 1.0)
        warm = self.warmup_start_factor + (1 - self.warmup_start_factor) * ramp
        return warm * self.gamma ** sum(1 for m in self.milestones if m <= start)


@dataclass
class RunConfig:
    """Everything that defines one run; ``config.yaml`` is this, and ``--config`` reads it back.

    Attributes:
        rule: a name from ``asymprop.RULES``; rule_options: its options (``flip: 0.25``).
        model: a name from ``asymprop.harness.models.list_models()``; model_options: the builder's
            keyword options (``widths: [128, 128]``, ``batchnorm: true``,
            ``bn_position: after``).
        data: a name from ``asymprop.harness.data.list_datasets()``; data_dir, download: where to
            find or fetch its files; train_size: keep this many training examples (None: all);
            test_size: score on the first this many test examples (None: all).
        epochs, batch_size: passes over the training set, examples per step (the global batch:
            under torchrun each of N processes trains on ``batch_size / N`` of them).
        optimizer: one of ``asymprop.optim.OPTIMIZERS`` (``nesterov``: SGD with Nesterov
            momentum); lr: learning rate; momentum: None gives 0.9 for sgd, nesterov and bm1-3
            and nothing for adam/adamw; weight_decay.
        lr_reference_batch: scale lr by ``batch_size / lr_reference_batch`` (Goyal et al.'s
            linear scaling: ``lr: 0.1, lr_reference_batch: 256`` is 0.8 at batch 2048); None:
            lr as given.
        lr_schedule: :class:`LRSchedule` settings (warm-up, milestones); None: constant.
        mirror_warmup_epochs: weight mirrors only: the first epochs run pure mirror mode
            (``asymprop.mirror``, one mirror step per minibatch, no engaged training; 000 D.2).
        seed: seeds the weights, the feedback weights, dropout and the data order.
        task: ``auto`` (from the model's output shape), ``classification`` (cross-entropy) or
            ``reconstruction`` (MSE against the input).
        normalize: standardise inputs; None: yes for classification, no (pixels in [0, 1])
            for reconstruction.
        align_batch_size: test examples in the fixed batch on which delta alignment is measured.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ... (under
            torchrun: ``cuda:LOCAL_RANK``, or ``cpu``).
        amp: mixed precision of the forward pass on GPU: ``bf16``, ``fp16`` (with a gradient
            scaler) or ``none``. The loss, the weights, the optimizer and the feedback updates
            (mirror mode, sign recomputation) stay in float32.
        threads: ``torch.set_num_threads`` for the run (None: torch's default). Small models
            train several times faster on one thread than on two busy cores.
        workers: ``DataLoader`` worker processes for datasets read from files (image folders).
        out: the run directory (None: ``runs/<rule>-<model>-<data>-seed<seed>``).
        tensorboard: also log every metric to ``out/tensorboard`` (needs the tensorboard package).
        checkpoint_every_steps: also write ``checkpoint.pt`` every this many steps (None: after
            every epoch only).
        check_every_steps: scan weights, feedback weights and rule buffers for NaN/inf every
            this many steps (the loss is checked at every step, and the weights before every
            checkpoint).
        on_divergence: ``stop`` (exit with the last good checkpoint kept) or ``skip`` (skip the
            step, or go back to the last checkpoint, and multiply lr by ``lr_backoff``; at most
            ``max_divergence_skips`` times in a run).
        explode_factor: a finite loss above this many times the run's first loss counts as
            divergence too (``inf`` turns the check off): a run whose loss explodes without
            becoming NaN stops (exit 3) with its last good checkpoint, instead of "finishing".
        bn_feedback: how the error crosses batch norm: ``full`` (autograd's exact BN backward:
            mean, batch sigma and gamma) or ``sigma`` (only ``gamma / sigma`` per channel, 000
            App. D.3; ``asymprop.sigma_batchnorm``). Forward values are the same.
        strategy: how ``torchrun`` processes share the work: ``ddp`` (every process holds the
            whole model, DistributedDataParallel) or ``fsdp`` (parameters sharded over the
            processes with FSDP2's ``fully_shard``, checkpoints through
            ``torch.distributed.checkpoint``; docs/distributed.md). One process: no effect.
    """

    rule: str = "bp"
    rule_options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float | None = None
    weight_decay: float = 0.0
    lr_reference_batch: int | None = None
    lr_schedule: dict[str, Any] | None = None
    mirror_warmup_epochs: int = 0
    seed: int = 0
    task: str = "auto"
    normalize: bool | None = None
    align_batch_size: int = 256
    device: str = "auto"
    amp: str = "none"
    threads: int | None = None
    workers: int = 0
    out: str | None = None
    tensorboard: bool = False
    checkpoint_every_steps: int | None = None
    check_every_steps: int = 50
    on_divergence: str = "stop"
    lr_backoff: float = 0.5
    max_divergence_skips: int = 10
    explode_factor: float = 1e4
    strategy: str = "ddp"
    bn_feedback: str = "full"

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

    def schedule(self) -> LRSchedule | None:
        """The :class:`LRSchedule` of ``lr_schedule`` (checked), or None."""
        if self.lr_schedule is None:
            return None
        schedule: LRSchedule = config_from_dict(LRSchedule, self.lr_schedule, "lr_schedule")
        schedule.check()
        return schedule


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
                f"{source}: unknown setting {key!r}{did_you_mean(key, fields)}; valid settings: "
                f"{', '.join(fields)}"
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
        return [parse_scalar(part.strip()) for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        return [value]
    return list(value)


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


def check_config(config: RunConfig, world_size: int = 1) -> None:
    """Check names, ranges and the rule's options; cheap (no data, no model).

    Args:
        config: the run.
        world_size: processes the run is split over (``batch_size`` must split evenly).

    Raises:
        ConfigError, ValueError, TypeError: the message names the setting and the valid values.
    """
    _choice("rule", config.rule, sorted(RULES))
    _choice("model", config.model, list_models())
    _choice("data", config.data, list_datasets())
    _choice("optimizer", config.optimizer, list(OPTIMIZERS))
    _choice("task", config.task, list(typing.get_args(Task)))
    _choice("amp", config.amp, list(typing.get_args(Amp)))
    _choice("on_divergence", config.on_divergence, list(typing.get_args(OnDivergence)))
    _choice("strategy", config.strategy, list(typing.get_args(Strategy)))
    if config.threads is not None and config.threads < 1:
        raise ConfigError(
            f"threads must be >= 1 (or null for torch's default), got {config.threads}"
        )
    for name in ("workers", "seed", "mirror_warmup_epochs", "max_divergence_skips"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.seed > SEED_MAX:  # NumPy's generator takes 32 bits
        raise ConfigError(f"seed must be in [0, {SEED_MAX}], got {config.seed}")
    for name in ("epochs", "batch_size", "align_batch_size", "check_every_steps"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("train_size", "test_size", "lr_reference_batch", "checkpoint_every_steps"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 (or null), got {value}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ConfigError(f"lr must be a finite number > 0, got {config.lr}")
    if config.momentum is not None and not 0 <= config.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {config.momentum}")
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {config.weight_decay}")
    if not 0 < config.lr_backoff < 1:
        raise ConfigError(f"lr_backoff must be in (0, 1), got {config.lr_backoff}")
    if not config.explode_factor > 1:  # NaN fails too
        raise ConfigError(f"explode_factor must be > 1 (inf: off), got {config.explode_factor}")
    if config.momentum and config.optimizer in ("adam", "adamw"):
        raise ConfigError(
            f"optimizer {config.optimizer!r} takes no momentum (got {config.momentum}); "
            "leave momentum unset, or use sgd, nesterov or bm1-3"
        )
    if config.optimizer == "nesterov" and config.momentum == 0:
        raise ConfigError("optimizer 'nesterov' needs momentum > 0 (leave it unset for 0.9)")
    if world_size > 1 and (config.batch_size % world_size or config.batch_size < 2 * world_size):
        raise ConfigError(
            f"batch_size {config.batch_size} (the global batch) must split into {world_size} "
            f"equal shares of at least 2 examples, one per process: use a multiple of {world_size}"
        )
    config.schedule()
    device = resolve_device(config.device)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tensorboard logging needs the tensorboard package: pip install 'asymprop[tensorboard]'"
            " (or leave out --tensorboard)"
        )
    rule = make_rule(config.rule, **config.rule_options)  # unknown/ill-typed/out-of-range options
    if config.mirror_warmup_epochs and not rule.has_feedback_mode:
        modes = ", ".join(sorted(name for name, cls in RULES.items() if cls.has_feedback_mode))
        raise ConfigError(
            f"mirror_warmup_epochs runs a rule's feedback-only mode, which {config.rule!r} does "
            f"not have (rules with one: {modes})"
        )
    if config.mirror_warmup_epochs > config.epochs:
        raise ConfigError(
            f"mirror_warmup_epochs {config.mirror_warmup_epochs} is more than epochs "
            f"{config.epochs}"
        )
    if config.amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("amp 'fp16' needs a CUDA device; on CPU use amp: bf16 or none")
        if rule.needs_train_step:
            raise ConfigError(
                f"amp 'fp16' scales the loss, which rule {config.rule!r} reads to learn its "
                "feedback: use amp: bf16 or none"
            )


def _choice(name: str, value: str, valid: list[str]) -> None:
    if value not in valid:
        raise ConfigError(
            f"unknown {name} {value!r}{did_you_mean(value, valid)}; valid: {', '.join(valid)}"
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; other names checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device
