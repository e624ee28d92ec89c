"""Layers whose backward pass sends the error through a feedback weight.

``FeedbackLinear`` and ``FeedbackConv2d`` are the layers ``asymprop.convert`` puts in place of
``nn.Linear`` and ``nn.Conv2d``. They subclass those types (so ``isinstance`` checks in user code
keep working), hold the very same ``weight``/``bias`` Parameter objects as the layer they replace,
and add ``feedback_weight``: the papers' B, stored in W's shape (SCIENCE.md). What the layer does in
its forward/backward pass and how B changes is decided by its ``rule`` (``asymprop.rules``): the
layer itself knows only how to run its op natively or with a given backward weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import feedback_conv2d, feedback_linear

if TYPE_CHECKING:
    from .rules import FeedbackRule

__all__ = ["FeedbackConv2d", "FeedbackLayer", "FeedbackLinear", "is_feedback_layer"]

_GOLDEN = 0x9E3779B97F4A7C15


def mix_seed(seed: int, count: int) -> int:
    """One 63-bit generator seed from (seed, count), far from ``manual_seed(seed)``'s stream.

    Mixing matters: ``torch.manual_seed(0)`` then ``convert(model, "fa", seed=0)`` must not draw
    B from the stream that drew W (B would equal W for the first layer).
    """
    return ((seed + 1) * _GOLDEN + count * 0xBF58476D1CE4E5B9) % (2**63)


class FeedbackLayer(nn.Module):
    """Behaviour shared by the feedback layers (a mixin placed before the torch layer type).

    Attributes:
        rule: the ``FeedbackRule`` that owns this layer's feedback path.
        feedback_weight: B, W's shape unless the rule says otherwise (DFA). A buffer for fixed and
            recomputed rules, a Parameter for rules whose B is trained by the optimizer (KP), and
            the ``weight`` Parameter itself for ``bp``.
        feedback_state: small Python state of the rule (random-stream position, step counters),
            saved in ``state_dict`` as ``_extra_state`` so a reloaded model continues exactly.
    """

    rule: FeedbackRule
    feedback_state: dict[str, Any]
    weight: Tensor
    feedback_weight: Tensor

    def forward(self, input: Tensor) -> Tensor:
        if self._exact_backprop:
            return self.native_forward(input)
        return self.rule.forward(self, input)

    # --- what subclasses provide ----------------------------------------------------------
    def native_forward(self, input: Tensor) -> Tensor:
        """The torch layer's own forward (its backward is exact backprop)."""
        raise NotImplementedError

    def feedback_forward(self, input: Tensor, backward_weight: Tensor) -> Tensor:
        """The same forward value; the input gradient travels through ``backward_weight``."""
        raise NotImplementedError

    @property
    def fan_in(self) -> int:
        """Inputs feeding one output unit: ``in_features``, or ``C_in/groups * kH * kW``."""
        return self.weight[0].numel()

    # --- state ----------------------------------------------------------------------------
    def _init_feedback_layer(self, rule: FeedbackRule) -> None:
        self.rule = rule
        self.feedback_state = {}
        self._exact_backprop = False

    def set_feedback_weight(self, value: Tensor | None, *, trainable: bool = False) -> None:
        """Install B: ``None`` aliases W (backprop), else a buffer or, if trainable, a Parameter.

        Called once per layer by the rule's ``init_feedback``; afterwards rules change B in place.
        """
        for store in (self._parameters, self._buffers):
            store.pop("feedback_weight", None)
        if value is None:
            self.register_parameter("feedback_weight", self.get_parameter("weight"))
        elif trainable:
            self.register_parameter("feedback_weight", nn.Parameter(value.detach().clone()))
        else:
            self.register_buffer("feedback_weight", value.detach().clone())

    def seed_feedback_rng(self, seed: int) -> None:
        """Start this layer's random stream (used by rules that draw during training)."""
        self.feedback_state["rng"] = [int(seed), 0]

    def feedback_generator(self, device: torch.device | None = None) -> torch.Generator:
        """A generator for the next draw of this layer's random stream.

        The stream is a pure function of (seed, draw count), both kept in ``feedback_state``: a
        reloaded model, or every rank of a data-parallel job, draws the same numbers.
        """
        state = self.feedback_state.get("rng")
        if state is None:
            raise RuntimeError(
                f"{type(self.rule).__name__} draws random numbers but this layer's stream was "
                "never seeded: the rule's init_feedback must call layer.seed_feedback_rng(seed)"
            )
        seed, count = state
        state[1] = count + 1
        generator = torch.Generator(device=device or self.weight.device)
        generator.manual_seed(mix_seed(seed, count))
        return generator

    def get_extra_state(self) -> dict[str, Any]:
        return {
            key: (list(v) if isinstance(v, list) else v) for key, v in self.feedback_state.items()
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.feedback_state = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule!r}"


class FeedbackLinear(FeedbackLayer, nn.Linear):
    """``nn.Linear`` whose input gradient is ``grad_out @ backward_weight`` (any leading dims)."""

    def native_forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)

    def feedback_forward(self, input: Tensor, backward_weight: Tensor) -> Tensor:
        return feedback_linear(input, self.weight, self.bias, backward_weight)


class FeedbackConv2d(FeedbackLayer, nn.Conv2d):
    """``nn.Conv2d`` whose input gradient is the transposed convolution with ``backward_weight``.

    Every stride, dilation, groups, ``padding="same"/"valid"`` and padding mode is supported:
    non-zero or asymmetric padding is applied with ``F.pad`` before the convolution (as
    ``nn.Conv2d`` does), so autograd handles the pad and the feedback op sees integer padding.
    """

    def native_forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def feedback_forward(self, input: Tensor, backward_weight: Tensor) -> Tensor:
        padding: Any = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            left, right, top, bottom = self._reversed_padding_repeated_twice
            if self.padding_mode == "zeros" and left == right and top == bottom:
                padding = (top, left)
            else:
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
                padding = (0, 0)
        return feedback_conv2d(
            input,
            self.weight,
            self.bias,
            backward_weight,
            self.stride,
            padding,
            self.dilation,
            self.groups,
        )


_FEEDBACK_TYPES: dict[type[nn.Module], type[FeedbackLayer]] = {
    nn.Linear: FeedbackLinear,
    nn.Conv2d: FeedbackConv2d,
}


def is_feedback_layer(module: nn.Module) -> bool:
    """True for the layers ``convert`` creates."""
    return isinstance(module, FeedbackLayer)


def make_feedback_layer(module: nn.Module, rule: FeedbackRule) -> FeedbackLayer:
    """A feedback layer that takes over ``module``: same Parameter objects, hooks and attributes.

    Only exact ``nn.Linear``/``nn.Conv2d`` are accepted (a subclass may never call ``forward``,
    like attention's ``out_proj``, so swapping it would silently change nothing).
    """
    cls = _FEEDBACK_TYPES.get(type(module))
    if cls is None:
        raise TypeError(
            f"cannot convert {type(module).__name__}: only exact nn.Linear and nn.Conv2d are "
            "converted"
        )
    layer = cls.__new__(cls)
    # Take the module's whole state: the same Parameter objects (the optimizer keeps working),
    # hooks, training flag, attributes. The dicts are copied so the old module is left as it was.
    layer.__dict__.update(
        {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    )
    layer._init_feedback_layer(rule)
    return layer


def make_plain_layer(layer: FeedbackLayer) -> nn.Module:
    """Undo ``make_feedback_layer``: the torch layer with the same Parameter objects."""
    base = next(t for t, c in _FEEDBACK_TYPES.items() if isinstance(layer, c))
    module = base.__new__(base)
    state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in layer.__dict__.items()}
    for key in ("rule", "feedback_state", "_exact_backprop"):
        state.pop(key, None)
    state["_parameters"].pop("feedback_weight", None)
    state["_buffers"] = {k: v for k, v in state["_buffers"].items() if not k.startswith("feedback")}
    module.__dict__.update(state)
    return module
