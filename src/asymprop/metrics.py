"""How well feedback aligns with the forward weights, per converted layer.

* ``alignment``: angle between vec(B) and vec(W) (000/001 "angles of matrices"), sign concordance
  (004 Fig. 2C) and relative error ``||W - B||_F / ||W||_F`` (004 Fig. 2A, 4A);
* ``delta_alignment``: angle between the error a rule sends to each layer's input and the error
  exact backprop sends, on the same batch (000/001 "angles of deltas").

All computed in float64.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .convert import exact_backprop, feedback_layers
from .layers import whole

__all__ = ["alignment", "angle_deg", "delta_alignment"]


def angle_deg(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between ``vec(a)`` and ``vec(b)``: ``acos(<a, b> / (|a| |b|))``.

    NaN when either vector is zero (the angle is undefined).

    Example:
        >>> angle_deg(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
        90.0
    """
    a64, b64 = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    a_norm, b_norm = a64.norm(), b64.norm()
    if a_norm == 0 or b_norm == 0:
        return math.nan
    # Kahan's formula, 2 atan2(|u - v|, |u + v|) for unit u, v: exact near 0 and 180 degrees,
    # where acos of a rounded cosine is off by ~1e-6 degrees.
    u, v = a64 / a_norm, b64 / b_norm
    return math.degrees(2 * math.atan2(float((u - v).norm()), float((u + v).norm())))


def alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per converted layer: ``angle_deg``, ``sign_concordance`` and ``rel_error`` of B vs W.

    B is what the rule declares the error travels through, ``rule.backward_weight(layer)``:
    ``feedback_weight`` for the built-in rules, W for ``bp``, and whatever a new rule computes
    (e.g. a learned scale times a fixed matrix). ``angle_deg`` is the angle between vec(B) and
    vec(W) in degrees;
    ``sign_concordance`` the fraction of entries with ``sign(B) == sign(W)``, in [0, 1];
    ``rel_error`` is ``||W - B||_F / ||W||_F``. For rules whose B is not W's shape (DFA maps the
    output error straight to a layer) the three are NaN.

    Returns:
        ``{qualified_name: {"angle_deg": .., "sign_concordance": .., "rel_error": ..}}`` in
        module order.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> model = asymprop.convert(net, "bp")
        >>> alignment(model)["0"]["angle_deg"]
        0.0

    Paper: 000/001 (angle figures), 004 Fig. 2 and 4.
    """
    result: dict[str, dict[str, float]] = {}
    for name, layer in feedback_layers(model):
        with torch.no_grad():
            weight = layer.full_weight()  # all-gathered when FSDP shards W
            feedback = whole(layer.rule.backward_weight(layer).detach())  # kp's B is sharded
        if feedback.shape != weight.shape:
            result[name] = {
                "angle_deg": math.nan,
                "sign_concordance": math.nan,
                "rel_error": math.nan,
            }
            continue
        w64, b64 = weight.double(), feedback.double()
        w_norm = float(w64.norm())
        result[name] = {
            "angle_deg": angle_deg(w64, b64),
            "sign_concordance": float((torch.sign(w64) == torch.sign(b64)).double().mean()),
            "rel_error": float((w64 - b64).norm()) / w_norm if w_norm > 0 else math.nan,
        }
    return result


def delta_alignment(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> dict[str, float]:
    """Per converted layer, the angle (degrees) between the rule's and backprop's input error.

    The error that reaches a layer's input is ``dL/dx`` for the tensor ``x`` the layer receives
    (for a layer used several times, all its calls together). It is computed twice on the same
    batch, with the same random state (dropout masks, noise): once with the model's rules and once
    with every layer running exact backprop. Parameters, their ``.grad``, feedback weights, rule
    state and all buffers (batch-norm running statistics) are left untouched, and the model's
    train/eval mode is kept.

    A compiled model (``torch.compile(model)`` or ``model.compile()``) is measured on the
    module it compiles, run eagerly: the same parameters and the same numbers, names without the
    wrapper's ``_orig_mod.`` prefix, and the compiled code is neither re-traced nor invalidated
    (the capture needs hooks that compiled code would not run).

    Returns:
        ``{qualified_name: angle_deg}`` in module order; NaN where an error is zero.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        >>> model = asymprop.convert(net, "fa", seed=0)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> angles = delta_alignment(model, nn.functional.cross_entropy, x, y)
        >>> sorted(angles), all(a > 45.0 for a in angles.values())  # random B: far from backprop
        (['0', '2'], True)

    Paper: 000/001 (angles of deltas), 004 Fig. 2B.
    """
    model = _uncompiled(model)
    layers = feedback_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no feedback layers: call asymprop.convert(model, rule) "
            "first"
        )
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    saved_states = [layer.get_extra_state() for _, layer in layers]
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    try:
        # fork_rng: the caller's random stream is not consumed
        with torch.random.fork_rng(devices=devices), _force_eager():
            seed = int(torch.randint(0, 2**62, (1,)))
            torch.manual_seed(seed)
            rule_errors = _input_errors(model, layers, loss_fn, inputs, targets)
            torch.manual_seed(seed)
            with exact_backprop(model):
                bp_errors = _input_errors(model, layers, loss_fn, inputs, targets)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                saved = saved_buffers[name]
                if b.shape != saved.shape:  # shaped by this pass's backward (dfa's lazy B)
                    b.resize_(saved.shape)
                b.copy_(saved)
        for (_, layer), state in zip(layers, saved_states, strict=True):
            layer.set_extra_state(state)
    angles: dict[str, float] = {}
    for name, _ in layers:
        ours, exact = rule_errors[name], bp_errors[name]
        angles[name] = math.nan if ours is None or exact is None else angle_deg(ours, exact)
    return angles


# Importing dynamo takes 1.5 s: it is looked up, never imported. Anything compiled has loaded it.
_DYNAMO = "torch._dynamo.eval_frame"


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s ``OptimizedModule`` wrapper(s) (else itself)."""
    eval_frame = sys.modules.get(_DYNAMO)
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def _force_eager() -> AbstractContextManager[Any]:
    """Run any compiled code called inside eagerly (``model.compile()``, compiled submodules).

    The capture adds forward hooks and switches layers to exact backprop: compiled code would
    skip the hooks or recompile for every switch. ``torch.compiler.set_stance`` appeared in
    torch 2.6; before it, compiled code in place (``model.compile()``) recompiles instead.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or _DYNAMO not in sys.modules:
        return nullcontext()
    return set_stance("force_eager")


def _input_errors(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> dict[str, Tensor | None]:
    """``dL/dx`` at every feedback layer's input, without touching any ``.grad``."""
    seen: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    handles = []

    def capture(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], tuple[Tensor, ...]]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            x = args[0]
            if not x.requires_grad:  # data entering the net: a leaf of our own
                x = x.detach().requires_grad_(True)
            seen[name].append(x)
            return (x, *args[1:])

        return hook

    for name, layer in layers:
        handles.append(layer.register_forward_pre_hook(capture(name)))
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            flat = [x for name, _ in layers for x in seen[name]]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    errors: dict[str, Tensor | None] = {}
    it = iter(grads)
    for name, _ in layers:
        parts = [next(it) for _ in seen[name]]
        present = [g.reshape(-1) for g in parts if g is not None]
        errors[name] = torch.cat(present) if present else None
    return errors
