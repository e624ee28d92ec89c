"""The engaged-mode step, and the between-step feedback update.

The whole loop, for any rule, is the one you would write for backprop plus one line::

    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        asymprop.update_feedback(model)   # sign rules recompute B, brSF redraws M, WM mirrors

``train_step`` is exactly these lines, plus the hooks that rules needing the batch and the loss
(node perturbation) use; such rules set ``needs_train_step`` and refuse ``update_feedback`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .convert import feedback_layers
from .layers import FeedbackLayer
from .rules import RULES, FeedbackRule, StepContext

__all__ = ["DivergenceError", "feedback_step", "rules_of", "train_step", "update_feedback"]


class DivergenceError(FloatingPointError):
    """The loss, a weight or a feedback weight became NaN or infinite."""


def rules_of(
    layers: Sequence[tuple[str, FeedbackLayer]],
) -> list[tuple[FeedbackRule, list[FeedbackLayer]]]:
    """Group layers by rule object, both in module order (one rule may own many layers)."""
    groups: dict[int, tuple[FeedbackRule, list[FeedbackLayer]]] = {}
    for _, layer in layers:
        groups.setdefault(id(layer.rule), (layer.rule, []))[1].append(layer)
    return list(groups.values())


def update_feedback(model: nn.Module) -> None:
    """Run each rule's between-step change of B; call it after ``optimizer.step()``.

    What it does per rule: ``usf``/``nusf``/``frsf`` recompute B from the new sign(W), ``brsf``
    redraws M, ``wm`` runs its mirror steps; ``bp``, ``fa``, ``rndf`` and ``kp`` (whose B the
    optimizer updates) do nothing. Rules that must see the batch and the loss (``np``) need
    :func:`train_step` instead and raise here.

    Example:
        >>> model = asymprop.convert(nn.Sequential(nn.Linear(20, 4)), "usf", seed=0)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> F.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 4, (8,))).backward()
        >>> optimizer.step(); asymprop.update_feedback(model)  # usf: B = sign(W) again
        >>> bool(torch.equal(model[0].feedback_weight, torch.sign(model[0].weight)))
        True

    Raises:
        ValueError: ``model`` has no converted layer.
        RuntimeError: a rule of the model needs ``train_step``.
    """
    layers = _layers(model)
    for rule, _ in rules_of(layers):
        if rule.needs_train_step:
            raise RuntimeError(
                f"rule {rule.name!r} learns its feedback from the batch and the loss, so it needs "
                "asymprop.train_step(model, optimizer, loss_fn, inputs, targets) for each step "
                "instead of optimizer.step() + asymprop.update_feedback(model)"
            )
    _update(layers)


def feedback_step(model: nn.Module, example_input: Tensor | None = None) -> None:
    """One step of the feedback-only mode of the model's rules (weight mirrors: one mirror
    step, 000 App. D.2), the forward path untouched; e.g. epochs of it before training.

    Args:
        model: a converted model.
        example_input: a batch, run once (eval mode, no grad) so that layers learn their input
            shapes; needed once before the first step for layers that have not run yet.

    Raises:
        ValueError: no rule of ``model`` has a feedback-only mode (``has_feedback_mode``).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> model = asymprop.convert(net, "wm", seed=0)
        >>> asymprop.feedback_step(model, example_input=torch.randn(4, 8))
    """
    groups = [(rule, owned) for rule, owned in rules_of(_layers(model)) if rule.has_feedback_mode]
    if not groups:
        names = ", ".join(sorted(rule.name for rule in RULES.values() if rule.has_feedback_mode))
        raise ValueError(
            f"{type(model).__name__} has no rule with a feedback-only mode (rules that have one: "
            f"{names})"
        )
    for rule, owned in groups:
        rule.feedback_step(model, owned, example_input)


def _update(layers: Sequence[tuple[str, FeedbackLayer]]) -> None:
    for rule, owned in rules_of(layers):
        rule.update(owned)


def _layers(model: nn.Module) -> list[tuple[str, FeedbackLayer]]:
    layers = feedback_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no feedback layers: call asymprop.convert(model, rule) "
            "first"
        )
    return layers


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One engaged-mode step for any rule; returns the loss as a float.

    ``zero_grad``; forward; ``loss = loss_fn(outputs, targets)``; ``loss.backward()``;
    ``optimizer.step()``; ``update_feedback``. Rules' ``before_forward``/``after_backward`` hooks
    run around the pass (node perturbation's noisy pass). The model's train/eval mode is left as
    the caller set it. The whole step, written out (what to copy for a loop of your own)::

        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)          # under torch.autocast for AMP
        scaler.scale(loss).backward()                   # loss.backward() without a scaler
        scaler.step(optimizer); scaler.update()         # optimizer.step() without a scaler
        asymprop.update_feedback(model)

    Args:
        model: a converted model (or a DDP wrapper of one).
        optimizer: any ``torch.optim`` optimizer over ``model.parameters()``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
        inputs, targets: one minibatch.
        scaler: float16's ``torch.amp.GradScaler``: the loss is scaled for ``backward`` and
            ``scaler.step`` unscales the gradients; on an overflow it skips the step and lowers
            the scale, and the feedback update is skipped too (the step did not happen). Not
            with rules that learn B from the batch's errors (``np``, ``sg``: their regression
            would read scaled errors). Autocast
            belongs to the forward pass: run ``model`` under ``torch.autocast`` (e.g. a module
            whose ``forward`` enters it), so that every pass a rule makes uses it too.

    Raises:
        DivergenceError: the loss is NaN or infinite (checked before the weights change).
        ValueError: a ``scaler`` with a rule that learns from the batch's errors.

    Example:
        >>> model = asymprop.convert(nn.Sequential(nn.Linear(20, 4)), "fa", seed=0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
        >>> loss = asymprop.train_step(model, opt, nn.functional.cross_entropy, x, y)
        >>> isinstance(loss, float)
        True
    """
    layers = _layers(model)
    groups = rules_of(layers)
    if scaler is not None and any(rule.needs_train_step for rule, _ in groups):
        names = ", ".join(sorted(rule.name for rule, _ in groups if rule.needs_train_step))
        raise ValueError(
            f"train_step(scaler=...) with rule {names}: its regression would read the scaled "
            "errors; train it in float32 or bfloat16 (no scaler needed)"
        )
    step = StepContext(model, optimizer, loss_fn, inputs, targets, layers)
    for rule, _ in groups:
        rule.before_forward(step)
    optimizer.zero_grad(set_to_none=True)
    step.outputs = model(inputs)
    step.loss = loss = loss_fn(step.outputs, targets)
    value = float(loss.detach())
    if not math.isfinite(value):
        names = ", ".join(sorted({rule.name for rule, _ in groups}))
        raise DivergenceError(
            f"loss is {value} (rule {names}); the weights were not updated by this step"
        )
    (loss if scaler is None else scaler.scale(loss)).backward()
    for rule, _ in groups:
        rule.after_backward(step)
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # unscales the gradients; skips the step if one is inf/NaN
        scaler.update()
        if scaler.get_scale() < scale:  # an overflow: no step, and so no feedback update
            return value  # (matched would step B on the inf gradient, brsf redraw for nothing)
    _update(layers)
    return value
