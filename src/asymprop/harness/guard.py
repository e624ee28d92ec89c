"""What protects a long run: the scan for NaN/inf in weights and feedback, and stop signals.

* :func:`first_nonfinite` names the first tensor of a model's state (weight, bias, feedback
  weight, rule buffer, batch-norm statistic) holding a NaN or an infinity, with its layer; one
  device-to-host transfer when everything is finite.
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

__all__ = ["NonFinite", "StopSignals", "first_nonfinite", "largest_weight"]

NonFinite = tuple[str, str, str]
"""(layer qualified name, tensor name within the layer, ``"nan"`` or ``"inf"``)."""


def first_nonfinite(model: nn.Module) -> NonFinite | None:
    """The first floating-point entry of ``model.state_dict()`` holding NaN or inf, or None.

    Example:
        >>> first_nonfinite(model)
        ('features.3', 'feedback_weight', 'nan')
    """
    named = [
        (name, t)
        for name, t in unwrap(model).state_dict().items()
        if torch.is_tensor(t) and t.is_floating_point() and t.numel()
    ]
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
