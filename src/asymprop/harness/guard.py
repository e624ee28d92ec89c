"""What protects a long run: the scan for NaN/inf in weights and feedback, and stop signals.

* :func:`first_nonfinite` names the first tensor of a model's state (weight, bias, feedback
  weight, rule buffer, batch-norm statistic) holding a NaN or an infinity, with its layer; one
  device-to-host transfer when everything is finite.
* :func:`stalled` says when a classification run has stopped learning: its test accuracy has
  sat at chance for several epochs while the loss stays finite (dead units, a feedback scale
  that blows the hidden layers up: nothing a NaN check sees).
* :class:`StopSignals` turns SIGINT and SIGTERM into a flag that the training loop reads after
  each step, so it can finish the step, write a checkpoint and exit cleanly. A second signal
  while the first is being handled ends the process at once (the checkpoint files are written
  atomically, so even that leaves the last one intact).
"""

from __future__ import annotations

import os
import signal
import threading
import types
from typing import Any

import torch
from torch import nn

from ..convert import unwrap
from ..layers import is_sharded

__all__ = ["NonFinite", "StopSignals", "first_nonfinite", "largest_weight", "stalled"]

#: epochs at chance level after which :func:`stalled` speaks, and how close to chance counts
STALL_EPOCHS, STALL_MARGIN = 3, 0.02

NonFinite = tuple[str, str, str]
"""(layer qualified name, tensor name within the layer, ``"nan"`` or ``"inf"``)."""


def first_nonfinite(model: nn.Module) -> NonFinite | None:
    """The first floating-point entry of ``model.state_dict()`` holding NaN or inf, or None.

    Of a sharded (FSDP) model each rank scans its own shards (no communication): the caller
    combines the ranks' answers.

    Example:
        >>> model = asymprop.convert(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), "usf")
        >>> first_nonfinite(model) is None
        True
        >>> model[1].feedback_weight[0, 0] = float("nan")
        >>> first_nonfinite(model)
        ('1', 'feedback_weight', 'nan')
    """
    named = [
        (name, t.to_local() if is_sharded(t) else t)  # type: ignore[attr-defined]
        for name, t in unwrap(model).state_dict().items()
        if torch.is_tensor(t) and t.is_floating_point() and t.numel()
    ]
    named = [(name, t) for name, t in named if t.numel()]  # a rank may hold no rows
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])  # (tensors,) bool
    if bool(finite.all()):  # the only sync with the device
        return None
    name, tensor = named[int((~finite).nonzero()[0])]
    layer, _, attr = name.rpartition(".")
    kind = "nan" if bool(torch.isnan(tensor).any()) else "inf"
    return layer or "(model)", attr, kind


def largest_weight(model: nn.Module) -> tuple[str, float] | None:
    """The layer whose ``weight`` has the largest magnitude, and that magnitude."""
    best: tuple[str, float] | None = None
    for name, param in unwrap(model).named_parameters():
        layer, _, attr = name.rpartition(".")
        if attr == "weight" and param.numel():
            value = float(param.detach().abs().max())
            if best is None or value > best[1]:
                best = (layer or "(model)", value)
    return best


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGINT/SIGTERM set ``stop.signum`` instead of
    killing the process; the previous handlers come back on exit.

    Only the main thread can install handlers; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


def stalled(rows: list[dict[str, Any]], num_classes: int) -> str | None:
    """Why a classification run has stopped learning, or None.

    The run has stalled when the test accuracy of each of its last ``STALL_EPOCHS`` epochs (1
    and later) is within ``STALL_MARGIN`` of chance, ``1 / num_classes``: the network predicts
    about as well as a constant, though nothing is NaN. Regression runs (accuracy NaN) never
    stall here.

    Example:
        >>> rows = [{"epoch": e, "test_accuracy": 0.1, "train_loss": 2.3} for e in range(4)]
        >>> stalled(rows, 10).startswith("test accuracy 10.0% (chance 10.0%) for the last 3")
        True
    """
    trained = [row for row in rows if row.get("epoch", 0) >= 1]
    if num_classes < 2 or len(trained) < STALL_EPOCHS:
        return None
    chance = 1.0 / num_classes
    last = trained[-STALL_EPOCHS:]
    accuracies = [float(row.get("test_accuracy", float("nan"))) for row in last]
    if not all(abs(a - chance) <= STALL_MARGIN for a in accuracies):  # NaN: False
        return None
    return (
        f"test accuracy {100 * accuracies[-1]:.1f}% (chance {100 * chance:.1f}%) for the last "
        f"{STALL_EPOCHS} epochs, train loss {float(last[-1]['train_loss']):.3g}: the run has "
        "stopped learning (dead units or exploding hidden layers; try a smaller --lr, or for "
        "dfa scale=input or a smaller gain)"
    )
