"""Optimizers: Batch Manhattan (sign-of-batch-gradient updates) and a by-name factory.

Sign-based feedback rules make error magnitudes explode or vanish with depth; Batch Manhattan
discards the magnitude of the batch gradient and keeps only its sign, which makes training immune
to that (Liao, Leibo & Poggio 2016, seed 002_0d29cd9de61c1642, section 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .rules import did_you_mean

__all__ = ["OPTIMIZERS", "SETTINGS", "BatchManhattan", "make_optimizer"]

SETTINGS: tuple[int, ...] = (1, 2, 3)
"""The Batch Manhattan settings of Liao et al. 2016, section 3 (setting 0 is plain SGD)."""

OPTIMIZERS: tuple[str, ...] = ("sgd", "nesterov", "adam", "adamw", "bm1", "bm2", "bm3")
"""Names accepted by `make_optimizer`."""


def _check_hyperparameters(lr: Any, momentum: Any, weight_decay: Any, setting: Any) -> None:
    # `not x > 0` (rather than `x <= 0`) also rejects NaN.
    if not lr > 0:
        raise ValueError(f"BatchManhattan: lr must be > 0, got lr={lr!r}")
    if not momentum >= 0:
        raise ValueError(f"BatchManhattan: momentum must be >= 0, got momentum={momentum!r}")
    if not weight_decay >= 0:
        raise ValueError(
            f"BatchManhattan: weight_decay must be >= 0, got weight_decay={weight_decay!r}"
        )
    if isinstance(setting, bool) or setting not in SETTINGS:
        raise ValueError(
            f"BatchManhattan: unknown setting={setting!r}; valid choices are {list(SETTINGS)} "
            "(setting 0 of the paper is plain SGD: use torch.optim.SGD or make_optimizer('sgd'))"
        )


class BatchManhattan(torch.optim.Optimizer):
    r"""Batch Manhattan: step along the sign of the batch gradient (Liao et al. 2016, settings 1-3).

    With ``g`` the batch gradient (``p.grad``, already summed or averaged over the minibatch),
    ``m`` the momentum and ``d`` the weight decay, every parameter ``w`` is updated by

        w(t+1) = w(t) + lr * tau(t)

    where, exactly as in the paper (eq. 3 and the list after it),

        setting 1: tau(t)   = -sign(g) + m * tau(t-1) - d * w(t)
        setting 2: tau(t)   = sign(-sign(g) + m * tau(t-1) - d * w(t))
        setting 3: tau(t)   = sign(kappa(t)),
                   kappa(t) = -sign(g) + m * kappa(t-1) - d * w(t)

    with ``tau(-1) = kappa(-1) = 0``. ``sign`` is ``torch.sign``, so ``sign(0) = 0``: an entry
    whose gradient is exactly zero gets no gradient term, and under settings 2-3 an entry whose
    whole argument is exactly zero does not move. (The paper says sign is "-1 or 1" and does not
    treat 0.) Setting 1 is SGD with momentum and weight decay fed ``sign(g)`` instead of ``g``;
    setting 2 moves every entry by exactly ``lr`` or 0; setting 3 also moves by ``lr`` or 0 but its
    momentum accumulates the unsigned ``kappa``.

    State per parameter (``self.state[p]``, saved by ``state_dict()``): ``tau``, the last update
    direction (every setting), and ``kappa`` (setting 3 only). Parameters whose ``grad`` is None
    are skipped and their state is left untouched.

    Args:
        params: parameters or param groups; a group may override ``lr``, ``momentum``,
            ``weight_decay`` and ``setting``.
        lr: learning rate ``eta`` (> 0): the step size per entry when ``|tau| = 1``.
        momentum: ``m`` (>= 0).
        weight_decay: ``d`` (>= 0).
        setting: 1, 2 or 3 (the paper uses 1 by default and finds the three alike).

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = BatchManhattan(model.parameters(), lr=1e-3, momentum=0.9, setting=1)
        >>> model(torch.randn(4, 3)).pow(2).mean().backward()
        >>> opt.step()

    Paper: Liao, Leibo & Poggio 2016, "How important is weight symmetry in backpropagation?",
    section 3 "Batch Manhattan" (seeds/002_0d29cd9de61c1642.txt).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        setting: int = 1,
    ) -> None:
        _check_hyperparameters(lr, momentum, weight_decay, setting)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "setting": setting,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, checking its (possibly overridden) hyperparameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(
            group["lr"], group["momentum"], group["weight_decay"], group["setting"]
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one Batch Manhattan update to every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, d = group["lr"], group["momentum"], group["weight_decay"]
            setting = group["setting"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "BatchManhattan does not support sparse gradients; "
                        "use a dense embedding (sparse=False)"
                    )
                state = self.state[p]
                if "tau" not in state:
                    state["tau"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                tau = state["tau"]
                # Recurrent term: tau(t-1) for settings 1-2, kappa(t-1) for setting 3.
                if setting == 3:
                    if "kappa" not in state:
                        state["kappa"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    acc = state["kappa"]
                else:
                    acc = tau
                # acc <- -sign(g) + m * acc - d * w(t), in place; w(t) is read before it changes.
                acc.mul_(m).sub_(torch.sign(p.grad))
                if d != 0:
                    acc.sub_(p, alpha=d)
                if setting == 2:
                    tau.sign_()
                elif setting == 3:
                    torch.sign(acc, out=tau)
                p.add_(tau, alpha=lr)
        return loss


def make_optimizer(
    name: str,
    params: ParamsT,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    **kw: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer by name: one of `OPTIMIZERS`.

    ``sgd`` is ``torch.optim.SGD`` (setting 0 of Liao et al. 2016), ``nesterov`` is SGD with
    ``nesterov=True`` (needs momentum > 0), ``adam``/``adamw`` are ``torch.optim.Adam``/``AdamW``
    (they take ``betas`` through ``kw``, not ``momentum``; ``weight_decay`` is passed as given, so
    AdamW's own default of 0.01 is not used), and ``bm1``/``bm2``/``bm3`` are `BatchManhattan`
    settings 1/2/3, whose update is ``w(t+1) = w(t) + lr * tau(t)`` (see `BatchManhattan`).

    Args:
        name: optimizer name, case-insensitive; see `OPTIMIZERS`.
        params: parameters or param groups.
        lr: learning rate.
        momentum: momentum (SGD, Nesterov, Batch Manhattan); must be 0 for Adam/AdamW.
        weight_decay: weight decay, passed to every optimizer.
        **kw: extra keyword arguments for the underlying torch optimizer (e.g. ``betas``).

    Returns:
        The optimizer.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = make_optimizer("bm1", model.parameters(), lr=1e-3, momentum=0.9)

    Paper: Liao, Leibo & Poggio 2016, section 3 (seeds/002_0d29cd9de61c1642.txt).
    """
    key = name.lower()
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kw)
    if key == "nesterov":
        if not momentum > 0:
            raise ValueError(
                f"make_optimizer('nesterov') needs momentum > 0, got momentum={momentum!r}; "
                "pass e.g. momentum=0.9, or use 'sgd'"
            )
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True, **kw
        )
    if key in ("adam", "adamw"):
        if momentum != 0:
            raise ValueError(
                f"make_optimizer({name!r}) has no momentum argument, got momentum={momentum!r}; "
                "set momentum=0 and pass betas=(beta1, beta2) instead"
            )
        cls = torch.optim.Adam if key == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=weight_decay, **kw)
    if key in ("bm1", "bm2", "bm3"):
        if kw:
            raise ValueError(
                f"make_optimizer({name!r}) got unexpected keyword arguments {sorted(kw)}; "
                "BatchManhattan takes only lr, momentum and weight_decay"
            )
        return BatchManhattan(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, setting=int(key[2])
        )
    raise ValueError(
        f"unknown optimizer name {name!r}{did_you_mean(key, OPTIMIZERS)}; valid names are "
        f"{list(OPTIMIZERS)}"
    )
