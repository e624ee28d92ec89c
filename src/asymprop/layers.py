"""Layers whose backward pass sends the error through a feedback weight, one place per kind.

A *feedback layer* is one weight W with its feedback weight B (``feedback_weight``, W's shape,
SCIENCE.md). ``asymprop.convert`` puts them in place of torch's layers: ``FeedbackLinear`` for
``nn.Linear``, ``FeedbackConv1d/2d/3d`` and ``FeedbackConvTranspose1d/2d/3d`` for the
convolutions. They subclass the layer they replace (``isinstance`` checks in user code keep
working) and hold the very same ``weight``/``bias`` Parameter objects. Modules with several
weights (attention, recurrent layers) keep their Parameters and call one feedback layer per
weight (a :class:`LinearSite`, which reads W from its owner), so rules see one kind of object.

The **layer-kind interface** is what every rule may ask of a layer, and all it may ask (rules
never check layer types):

* ``native_forward(x)``: torch's own op (exact backprop);
* ``feedback_forward(x, backward_weight)``: the same value, the input gradient through
  ``backward_weight``;
* ``weight_op(x, weight)``: the op with another weight and the bias blocked (the mirror's drive);
* ``input_grad(grad_output, backward_weight, input)``: the error the op sends to its input
  when it travels through ``backward_weight`` (for an op linear in its input, the adjoint of
  ``weight_op(., backward_weight)``, which reads only the input's shape);
* ``weight_grad(x, grad_output)``: the weight gradient, summed over examples and positions;
* ``pairs(input_shape)``: how many (input, output) pairs each weight entry connects per example
  (1 for a Linear on ``(N, in)``; per kernel tap for a convolution): a "position";
* ``fan_in``: inputs feeding one output unit;
* ``feedback_matrix()``: B as an ``(out, in)`` matrix view when the op is a matrix product on
  the last dimension (closed-form fits), else None.

A new kind registers with :func:`register_layer`; only ``native_forward`` and ``weight_op`` are
required, the rest have exact generic versions built with ``torch.func.vjp``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import _apply, feedback_conv, feedback_linear

if TYPE_CHECKING:
    from .rules import FeedbackRule

__all__ = [
    "FeedbackContainer",
    "FeedbackConv1d",
    "FeedbackConv2d",
    "FeedbackConv3d",
    "FeedbackConvTranspose1d",
    "FeedbackConvTranspose2d",
    "FeedbackConvTranspose3d",
    "FeedbackLayer",
    "FeedbackLinear",
    "InOutLinear",
    "LinearSite",
    "is_feedback_layer",
    "register_layer",
]

_GOLDEN = 0x9E3779B97F4A7C15


def is_sharded(tensor: Tensor) -> bool:
    """``tensor`` is a ``DTensor`` (a Parameter that FSDP2's ``fully_shard`` sharded over ranks).

    Free when torch's distributed tensors were never imported (no DTensor can exist then).
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def whole(tensor: Tensor) -> Tensor:
    """``tensor`` itself, or, if FSDP2 sharded it, all of it (``DTensor.full_tensor``: one
    all-gather on every rank)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def reshard(model: nn.Module) -> None:
    """Give back the whole weights that FSDP2 gathered for a forward pass without backward.

    ``fully_shard``'s root module keeps its weights gathered after its forward pass (backward
    would need them at once) and frees them only after backward. After a forward pass under
    ``torch.no_grad`` (node perturbation's noisy pass, an evaluation) they would stay, and the
    next forward pass would run on them after ``optimizer.step()`` has changed the shards:
    calling this after such a pass frees them (``FSDPModule.reshard``). A no-op without FSDP.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def mix_seed(seed: int, count: int) -> int:
    """One 63-bit generator seed from (seed, count), far from ``manual_seed(seed)``'s stream.

    Mixing matters: ``torch.manual_seed(0)`` then ``convert(model, "fa", seed=0)`` must not draw
    B from the stream that drew W (B would equal W for the first layer).
    """
    return ((seed + 1) * _GOLDEN + count * 0xBF58476D1CE4E5B9) % (2**63)


class _InputError(torch.autograd.Function):
    """Identity on ``output``; backward sends ``input_grad(g, B)`` to ``input`` (generic kinds).

    ``backward_weight`` receives W's gradient when it requires grad (Kolen-Pollack).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        output: Tensor, input: Tensor, backward_weight: Tensor, layer: FeedbackLayer
    ) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _output, input, backward_weight, layer = inputs
        ctx.save_for_backward(input, backward_weight)
        ctx.layer = layer

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, backward_weight = ctx.saved_tensors
        layer: FeedbackLayer = ctx.layer
        grad_input = grad_bw = None
        if ctx.needs_input_grad[1]:
            grad_input = layer.input_grad(grad_output, backward_weight, input)
        if ctx.needs_input_grad[2]:
            grad_bw = layer.weight_grad(input, grad_output)
        return grad_output, grad_input, grad_bw, None


class FeedbackLayer(nn.Module):
    """Behaviour shared by the feedback layers, and the layer-kind interface (module docstring).

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
    #: the op is linear in its input (every kind but the bilinear product): ``input_grad``
    #: then reads only the input's shape, and fits can use ``weight_grad`` as its adjoint.
    linear_in_input: ClassVar[bool] = True

    def forward(self, input: Tensor) -> Tensor:
        if self._exact_backprop:
            return self.native_forward(input)
        return self.rule.forward(self, input)

    @property
    def _torch(self) -> Any:
        """The layer as its torch type (the kind mixins read its attributes: typed Any)."""
        return self

    # --- the layer-kind interface -----------------------------------------------------------
    def native_forward(self, input: Tensor) -> Tensor:
        """The torch layer's own forward (its backward is exact backprop)."""
        raise NotImplementedError(f"{type(self).__name__} must define native_forward")

    def weight_op(self, input: Tensor, weight: Tensor) -> Tensor:
        """The layer's op with ``weight`` in W's place and no bias (linear in both arguments)."""
        raise NotImplementedError(f"{type(self).__name__} must define weight_op")

    def feedback_forward(self, input: Tensor, backward_weight: Tensor) -> Tensor:
        """The same forward value; the input gradient travels through ``backward_weight``.

        Generic version: the native op on a detached input (exact gradients of W and b), then an
        identity node whose backward sends :meth:`input_grad` to the input.
        """
        output = self.native_forward(input.detach())
        if not (input.requires_grad or backward_weight.requires_grad):
            return output
        return _apply(_InputError, output, input, backward_weight, self)

    def input_grad(self, grad_output: Tensor, backward_weight: Tensor, input: Tensor) -> Tensor:
        """``dL/dx`` when the error travels through ``backward_weight``: the vjp of
        ``weight_op(., backward_weight)`` at ``input`` (for an op linear in its input, the
        adjoint, whatever the input's values), of the input's shape."""
        probe = input.detach().to(grad_output.dtype)
        vjp: Any = torch.func.vjp(lambda x: self.weight_op(x, backward_weight), probe)[1]
        return vjp(grad_output)[0]  # type: ignore[no-any-return]

    def weight_grad(self, input: Tensor, grad_output: Tensor) -> Tensor:
        """``dL/dW`` for ``input`` and ``grad_output`` (summed over examples and positions)."""
        weight = self._weight_shaped().to(grad_output.dtype)  # the op is linear in W
        vjp: Any = torch.func.vjp(lambda w: self.weight_op(input, w), weight)[1]
        return vjp(grad_output)[0]  # type: ignore[no-any-return]

    def pairs(self, input_shape: Sequence[int]) -> Tensor:
        """Per weight entry, the (input, output) pairs it connects in one example (W-broadcastable).

        The weight gradient with ones as input and as output gradient counts them exactly, zero
        padding (no neuron) excluded.
        """
        weight = self._weight_shaped()
        ones = weight.new_ones((1, *input_shape[1:]))
        out = self.weight_op(ones, weight)
        return self.weight_grad(ones, torch.ones_like(out))

    def full_weight(self) -> Tensor:
        """W, detached and whole, for rules that read W between steps (sign rules, mirrors).

        Under FSDP2 (``torch.distributed.fsdp.fully_shard``) W is a ``DTensor`` whose rows are
        spread over the ranks between forward passes; it is all-gathered here
        (``DTensor.full_tensor``: one all-gather of W's bytes), so the rule computes on the
        whole W exactly as one process would. Otherwise W itself (no copy).
        """
        weight = self.weight.detach()
        return whole(weight)

    def _weight_shaped(self) -> Tensor:
        """A tensor of W's shape, dtype and device for ops that read only W's shape (a weight
        gradient's kernel argument): W itself, or uninitialised memory when W is sharded."""
        weight = self.weight.detach()
        if is_sharded(weight):
            return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        return weight

    @property
    def fan_in(self) -> int:
        """Inputs feeding one output unit: ``in_features``, or ``C_in/groups * prod(kernel)``."""
        return math.prod(self.weight.shape[1:])  # = weight[0].numel(), also for a sharded W

    def feedback_matrix(self) -> Tensor | None:
        """B as an ``(out, in)`` matrix view if the op is ``x @ W^T`` on the last dim, else None."""
        return None

    def default_input_shape(self) -> list[int] | None:
        """An input shape ``[N, ...]`` known without a forward pass (N = 0), or None."""
        return None

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
            weight = self.weight
            assert isinstance(weight, nn.Parameter)
            self.register_parameter("feedback_weight", weight)
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

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        """No ``feedback_weight`` entry when B *is* W (bp: the alias would be a second name for
        ``weight``, which DDP, ``torch.compile`` and ``torch.distributed.checkpoint`` state
        dicts and safetensors refuse). ``_extra_state`` (the rule's state, a dict) is always
        there, as ``torch.distributed.checkpoint`` expects of a module that has extra state; a
        rule without state has ``{}``, and ``load_state_dict`` accepts its absence, so the
        tensors alone (``{k: v for k, v in state.items() if torch.is_tensor(v)}``) are the
        whole state of such a model, e.g. for ``safetensors.torch.save_file``."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._parameters.get("feedback_weight") is self.weight:
            destination.pop(prefix + "feedback_weight", None)

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        omitted = set()  # bp's alias of W (never saved), and a stateless rule's empty state
        if self._parameters.get("feedback_weight") is self.weight:
            omitted.add(prefix + "feedback_weight")
        if not self.feedback_state:
            omitted.add(prefix + "_extra_state")
        missing_keys[:] = [key for key in missing_keys if key not in omitted]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            key: (list(v) if isinstance(v, list) else v) for key, v in self.feedback_state.items()
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.feedback_state = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, rule={self.rule!r}" if base else f"rule={self.rule!r}"


# ---------------------------------------------------------------------------------------------
# Linear kinds
# ---------------------------------------------------------------------------------------------


class _MatrixKind(FeedbackLayer):
    """Kinds whose op is ``x @ W^T (+ b)`` on the last dimension; any leading dims are positions."""

    def weight_op(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.linear(input, weight)

    def native_forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self._torch.bias)

    def feedback_forward(self, input: Tensor, backward_weight: Tensor) -> Tensor:
        return feedback_linear(input, self.weight, self._torch.bias, backward_weight)

    def input_grad(self, grad_output: Tensor, backward_weight: Tensor, input: Tensor) -> Tensor:
        # (..., out) @ (out, in) -> (..., in)
        return (grad_output @ backward_weight.to(grad_output.dtype)).reshape(input.shape)

    def weight_grad(self, input: Tensor, grad_output: Tensor) -> Tensor:
        g = grad_output.reshape(-1, grad_output.shape[-1])  # (rows, out)
        return g.t() @ input.reshape(-1, input.shape[-1]).to(g.dtype)  # (out, in)

    def pairs(self, input_shape: Sequence[int]) -> Tensor:
        positions = math.prod(input_shape[1:-1])
        return self._weight_shaped().new_full((), float(positions))

    def feedback_matrix(self) -> Tensor | None:
        return self.feedback_weight

    def default_input_shape(self) -> list[int] | None:
        return [0, self.weight.shape[1]]


class FeedbackLinear(_MatrixKind, nn.Linear):
    """``nn.Linear`` whose input gradient is ``grad_out @ backward_weight`` (any leading dims)."""


class LinearSite(_MatrixKind):
    """The feedback layer of one weight matrix of a multi-weight module (attention, RNN).

    ``weight`` and ``bias`` are read from the owner at every use (its Parameters stay where they
    are: ``state_dict`` keys, optimizers and ``load_state_dict(assign=True)`` keep working);
    the site holds only B and the rule's state. ``rows`` selects a block of rows of the owner's
    weight (a packed bias of several sites, e.g. attention's ``in_proj_bias``).

    Args:
        owner: the module holding the Parameters.
        weight_name: name of W in ``owner`` (``(out, in)``).
        bias_name: name of the bias in ``owner``, or None.
        bias_rows: ``(start, stop)`` rows of the owner's bias that belong to this weight.
    """

    def __init__(
        self,
        owner: nn.Module,
        weight_name: str,
        bias_name: str | None = None,
        bias_rows: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self._owner = (owner,)  # a tuple: the owner is not registered as a child (no cycle)
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.bias_rows = bias_rows

    @property  # type: ignore[override]
    def weight(self) -> Tensor:  # type: ignore[override]
        return getattr(self._owner[0], self.weight_name)  # type: ignore[no-any-return]

    @property
    def bias(self) -> Tensor | None:
        if self.bias_name is None:
            return None
        bias: Tensor | None = getattr(self._owner[0], self.bias_name)
        if bias is None or self.bias_rows is None:
            return bias
        return bias[self.bias_rows[0] : self.bias_rows[1]]

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"{self.weight_name}: in={inp}, out={out}, rule={self.rule!r}"


class InOutLinear(FeedbackLayer):
    """A linear layer storing W as ``(in, out)``: ``y = x @ W + b`` (Hugging Face's ``Conv1D``,
    GPT-2's projections). B is stored in W's ``(in, out)`` shape; the error is ``dL/dy @ B^T``.

    Registered for ``transformers.pytorch_utils.Conv1D`` by name, so ``transformers`` is never
    imported by asymprop.
    """

    def native_forward(self, input: Tensor) -> Tensor:
        return _in_out(input, self.weight, self._torch.bias)

    def weight_op(self, input: Tensor, weight: Tensor) -> Tensor:
        return input @ weight  # (..., in) @ (in, out) -> (..., out)

    def feedback_forward(self, input: Tensor, backward_weight: Tensor) -> Tensor:
        # the matrix kind on the transposed views: gradients flow back through .t()
        return feedback_linear(input, self.weight.t(), self._torch.bias, backward_weight.t())

    def input_grad(self, grad_output: Tensor, backward_weight: Tensor, input: Tensor) -> Tensor:
        # (..., out) @ (out, in) -> (..., in)
        return (grad_output @ backward_weight.t().to(grad_output.dtype)).reshape(input.shape)

    def weight_grad(self, input: Tensor, grad_output: Tensor) -> Tensor:
        g = grad_output.reshape(-1, grad_output.shape[-1])  # (rows, out)
        return input.reshape(-1, input.shape[-1]).to(g.dtype).t() @ g  # (in, out)

    def pairs(self, input_shape: Sequence[int]) -> Tensor:
        return self._weight_shaped().new_full((), float(math.prod(input_shape[1:-1])))

    @property
    def fan_in(self) -> int:
        return int(self.weight.shape[0])

    def feedback_matrix(self) -> Tensor | None:
        return self.feedback_weight.t()

    def default_input_shape(self) -> list[int] | None:
        return [0, self.weight.shape[0]]


def _in_out(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W + b`` computed as Hugging Face's ``Conv1D`` does (``addmm`` on 2-D rows)."""
    shape = (*input.shape[:-1], weight.shape[1])
    rows = input.reshape(-1, input.shape[-1])
    out = rows @ weight if bias is None else torch.addmm(bias, rows, weight)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Convolutions: 1-3 spatial dims, plain and transposed
# ---------------------------------------------------------------------------------------------


class _ConvKind(FeedbackLayer):
    """``nn.Conv1d/2d/3d``: every stride, dilation, groups, ``padding="same"/"valid"`` and
    padding mode. Non-zero or asymmetric padding is applied with ``F.pad`` before the
    convolution (as torch's layers do), so autograd handles the pad and the op sees integer
    padding."""

    transposed = False

    def _padded(self, input: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """The input as the op sees it, and the integer padding left to the op."""
        padding: Any = self._torch.padding
        if self._torch.padding_mode == "zeros" and not isinstance(padding, str):
            return input, tuple(int(p) for p in padding)
        pairs = self._torch._reversed_padding_repeated_twice
        dims = len(pairs) // 2
        if self._torch.padding_mode == "zeros":
            # symmetric "same" stays inside the op; asymmetric pads explicitly
            left, right = pairs[0::2], pairs[1::2]
            if left == right:
                return input, tuple(reversed(left))
            return F.pad(input, pairs), (0,) * dims
        return F.pad(input, pairs, mode=self._torch.padding_mode), (0,) * dims

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x, padding = self._padded(input)
        return torch.ops.aten.convolution(
            x,
            weight,
            bias,
            self._torch.stride,
            padding,
            self._torch.dilation,
            False,
            [0] * len(padding),
            self._torch.groups,
        )

    def native_forward(self, input: Tensor) -> Tensor:
        return self._torch._conv_forward(input, self.weight, self._torch.bias)

    def weight_op(self, input: Tensor, weight: Tensor) -> Tensor:
        return self._op(input, weight, None)

    def feedback_forward(self, input: Tensor, backward_weight: Tensor) -> Tensor:
        x, padding = self._padded(input)
        return feedback_conv(
            x,
            self.weight,
            self._torch.bias,
            backward_weight,
            self._torch.stride,
            padding,
            self._torch.dilation,
            self._torch.groups,
            transposed=self.transposed,
            output_padding=self._output_pad(len(padding)),
        )

    def _backward(
        self,
        grad_output: Tensor,
        x: Tensor,
        kernel: Tensor,
        padding: Sequence[int],
        mask: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten.convolution_backward(
            grad_output,
            x,
            kernel.to(grad_output.dtype),
            None,
            list(self._torch.stride),
            list(padding),
            list(self._torch.dilation),
            self.transposed,
            list(self._output_pad(len(padding))),
            self._torch.groups,
            mask,
        )

    def _output_pad(self, dims: int) -> Sequence[int]:
        return [0] * dims

    def input_grad(self, grad_output: Tensor, backward_weight: Tensor, input: Tensor) -> Tensor:
        if self._torch.padding_mode != "zeros" or isinstance(self._torch.padding, str):
            return super().input_grad(grad_output, backward_weight, input)
        probe = grad_output.new_empty(()).expand(input.shape)  # only its shape is read
        return self._backward(
            grad_output, probe, backward_weight, self._torch.padding, [True, False, False]
        )[0]

    def weight_grad(self, input: Tensor, grad_output: Tensor) -> Tensor:
        x, padding = self._padded(input.to(grad_output.dtype))
        kernel = self._weight_shaped()  # only its shape is read
        return self._backward(grad_output, x, kernel, padding, [False, True, False])[1]


class _ConvTransposeKind(_ConvKind):
    """``nn.ConvTranspose1d/2d/3d`` incl. ``output_padding``, groups, dilation and the
    ``output_size`` argument; the input gradient is the convolution of ``dL/dy`` with B."""

    transposed = True

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        self._call_output_padding = None
        if output_size is not None:
            dims = self.weight.dim() - 2
            self._call_output_padding = self._torch._output_padding(
                input,
                output_size,
                self._torch.stride,
                self._torch.padding,
                self._torch.kernel_size,
                dims,
                self._torch.dilation,
            )
        try:
            return super().forward(input)
        finally:
            self._call_output_padding = None

    def _output_pad(self, dims: int) -> Sequence[int]:
        pad = getattr(self, "_call_output_padding", None)
        return tuple(pad) if pad is not None else tuple(self._torch.output_padding)

    def _padded(self, input: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        return input, tuple(int(p) for p in self._torch.padding)

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        padding = self._padded(input)[1]
        return torch.ops.aten.convolution(
            input,
            weight,
            bias,
            self._torch.stride,
            padding,
            self._torch.dilation,
            True,
            list(self._output_pad(len(padding))),
            self._torch.groups,
        )

    def native_forward(self, input: Tensor) -> Tensor:
        return self._op(input, self.weight, self._torch.bias)

    def input_grad(self, grad_output: Tensor, backward_weight: Tensor, input: Tensor) -> Tensor:
        probe = grad_output.new_empty(()).expand(input.shape)  # only its shape is read
        return self._backward(
            grad_output, probe, backward_weight, self._torch.padding, [True, False, False]
        )[0]

    @property
    def fan_in(self) -> int:
        """Inputs feeding one output unit: ``C_in/groups`` times the kernel taps."""
        return self.weight.shape[0] // self._torch.groups * math.prod(self.weight.shape[2:])


class FeedbackConv1d(_ConvKind, nn.Conv1d):
    """``nn.Conv1d`` whose input gradient is the transposed convolution with B."""


class FeedbackConv2d(_ConvKind, nn.Conv2d):
    """``nn.Conv2d`` whose input gradient is the transposed convolution with B."""


class FeedbackConv3d(_ConvKind, nn.Conv3d):
    """``nn.Conv3d`` whose input gradient is the transposed convolution with B."""


class FeedbackConvTranspose1d(_ConvTransposeKind, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` whose input gradient is the convolution with B."""


class FeedbackConvTranspose2d(_ConvTransposeKind, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose input gradient is the convolution with B."""


class FeedbackConvTranspose3d(_ConvTransposeKind, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` whose input gradient is the convolution with B."""


class BilinearSite(FeedbackLayer):
    """The feedback layer of ``nn.Bilinear``: ``y_k = x1^T W_k x2 + b_k``, ``W (out, in1, in2)``.

    Rules see one input, ``x = [x1, x2]`` concatenated on the last dimension (a weight-free op
    in :class:`FeedbackBilinear`), and B of W's shape. The errors sent to the inputs travel
    through B: ``dL/dx1 = sum_k g_k B_k x2`` and ``dL/dx2 = sum_k g_k B_k^T x1`` (each is the
    product of B with the *other* input's activity, which stays exact: no weight is
    transported); ``dL/dW_k = g_k x1 x2^T`` as in autograd. The op is not linear in ``x``, so
    ``input_grad`` reads the input's values. ``fan_in`` is ``in1 * in2``, the products feeding
    one output unit (FA's B is drawn at that scale; torch draws W with ``1/sqrt(in1)``). Weight
    mirrors: for Gaussian noise on both inputs ``E[relu(y_k) x1_i x2_j] = W_kij / 2`` (given
    x2, y_k is symmetric in x1), so B -> W as for a Linear, with heavier-tailed estimates: a
    plateau of 34 degrees at the default batch (mean of 20 seeds, 30-40, for Bilinear(4, 6, 8)
    after 40 mirror steps), against 25 for a Linear.
    """

    linear_in_input = False

    def __init__(self, owner: nn.Bilinear) -> None:
        super().__init__()
        self._owner = (owner,)  # a tuple: the owner is not registered as a child (no cycle)

    @property  # type: ignore[override]
    def weight(self) -> Tensor:  # type: ignore[override]
        return self._owner[0].weight

    @property
    def bias(self) -> Tensor | None:
        return self._owner[0].bias

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n1 = self._owner[0].in1_features
        return x[..., :n1], x[..., n1:]

    def native_forward(self, input: Tensor) -> Tensor:
        return F.bilinear(*self._split(input), self.weight, self.bias)

    def weight_op(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.bilinear(*self._split(input), weight)

    def input_grad(self, grad_output: Tensor, backward_weight: Tensor, input: Tensor) -> Tensor:
        x1, x2 = self._split(input.to(grad_output.dtype))
        B = backward_weight.to(grad_output.dtype)
        # (..., out), (out, in1, in2), (..., in2) -> (..., in1); and the same for x2
        g1 = torch.einsum("...k,kij,...j->...i", grad_output, B, x2)
        g2 = torch.einsum("...k,kij,...i->...j", grad_output, B, x1)
        return torch.cat([g1, g2], -1)

    def weight_grad(self, input: Tensor, grad_output: Tensor) -> Tensor:
        x1, x2 = self._split(input.to(grad_output.dtype))
        return torch.einsum("...k,...i,...j->kij", grad_output, x1, x2)  # (out, in1, in2)

    def pairs(self, input_shape: Sequence[int]) -> Tensor:
        return self._weight_shaped().new_full((), float(math.prod(input_shape[1:-1])))

    def default_input_shape(self) -> list[int] | None:
        return [0, self.weight.shape[1] + self.weight.shape[2]]

    def extra_repr(self) -> str:
        return f"weight: {tuple(self.weight.shape)}, rule={self.rule!r}"


class FeedbackContainer(nn.Module):
    """A converted multi-weight module (attention, recurrent layer): it keeps its Parameters and
    runs each weight matrix through a feedback layer (:class:`LinearSite`), or exactly where the
    user excluded it (named in ``excluded_sites``: parameter name -> reason, for ``audit``)."""

    excluded_sites: dict[str, str]
    #: parameters of 2+ dims through which no error travels (attention's bias_k and bias_v)
    no_transport: ClassVar[frozenset[str]] = frozenset()

    def to_plain(self) -> nn.Module:
        """The torch module with the same Parameters (``asymprop.revert``)."""
        raise NotImplementedError(f"{type(self).__name__} must define to_plain")


class FeedbackBilinear(FeedbackContainer, nn.Bilinear):
    """``nn.Bilinear`` whose weight carries feedback through its :class:`BilinearSite`
    (child ``product``), called on ``[input1, input2]``; the same Parameters stay here."""

    product: BilinearSite

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:
        return self.product(torch.cat([input1, input2], -1))  # (..., in1 + in2) -> (..., out)

    def to_plain(self) -> nn.Module:
        module = take_over(self, nn.Bilinear, drop=("excluded_sites",))
        module._modules.pop("product", None)
        return module


def _convert_bilinear(
    module: nn.Module, make_site: Callable[[str, FeedbackLayer], bool]
) -> nn.Module:
    new = take_over(module, FeedbackBilinear)
    new.excluded_sites = {}
    site = BilinearSite(new)
    if not make_site("product", site):
        return module
    new.product = site
    return new


# ---------------------------------------------------------------------------------------------
# The registry of layer kinds
# ---------------------------------------------------------------------------------------------

#: Module type -> what ``convert`` makes of it: a FeedbackLayer class (single-weight layers) or
#: a callable ``(module, make_site) -> converted module`` (multi-weight modules, see
#: ``register_layer``).
_FEEDBACK_TYPES: dict[type[nn.Module], type[FeedbackLayer]] = {
    nn.Linear: FeedbackLinear,
    nn.Conv1d: FeedbackConv1d,
    nn.Conv2d: FeedbackConv2d,
    nn.Conv3d: FeedbackConv3d,
    nn.ConvTranspose1d: FeedbackConvTranspose1d,
    nn.ConvTranspose2d: FeedbackConvTranspose2d,
    nn.ConvTranspose3d: FeedbackConvTranspose3d,
}

#: Multi-weight module type -> its converter (attention, recurrent layers; ``register_layer``).
Converter = Callable[[nn.Module, Callable[[str, "LinearSite | FeedbackLayer"], bool]], nn.Module]
_CONTAINERS: dict[type[nn.Module], Converter] = {nn.Bilinear: _convert_bilinear}

#: Kinds registered by qualified class name, for libraries asymprop does not import: resolved
#: when a module of that type is met.
_LAZY_KINDS: dict[str, type[FeedbackLayer]] = {"transformers.pytorch_utils.Conv1D": InOutLinear}


def register_layer(
    module_type: type[nn.Module] | str,
    kind: type[FeedbackLayer] | Converter,
) -> None:
    """Teach ``convert`` a new layer kind.

    Single-weight layers: ``kind`` is a mixin subclass of :class:`FeedbackLayer` that defines
    ``native_forward(x)`` and ``weight_op(x, weight)`` (the op with another weight, bias
    blocked, linear in both) and may override the rest of the layer-kind interface (module
    docstring) with faster closed forms. ``convert`` then swaps every *exact* instance of
    ``module_type`` for ``class Feedback<Name>(kind, module_type)`` holding the same Parameters.
    ``module_type`` may be a qualified class name (``"package.module.Class"``), so a library
    need not be imported to register its layers.

    Multi-weight modules: ``kind`` is a callable ``(module, make_site) -> new_module`` that
    returns a module using one feedback layer per weight; ``make_site(name, layer)`` asks
    ``convert`` to attach a rule to the feedback layer ``layer`` named ``name`` (relative to the
    module) and returns False where the user excluded it (the module then runs that weight
    exactly).

    Example (a layer storing W as ``(in, out)``, like GPT-2's ``Conv1D``)::

        class InOutLinear(asymprop.FeedbackLayer):
            def native_forward(self, x):
                return x @ self.weight + self.bias
            def weight_op(self, x, weight):
                return x @ weight
            @property
            def fan_in(self):
                return self.weight.shape[0]

        asymprop.register_layer(MyInOutLinear, InOutLinear)

    Raises:
        TypeError: ``kind`` is neither a FeedbackLayer subclass nor callable.
    """
    if isinstance(kind, type) and issubclass(kind, FeedbackLayer):
        if isinstance(module_type, str):
            _LAZY_KINDS[module_type] = kind
            return
        _FEEDBACK_TYPES[module_type] = _combine(kind, module_type)
        return
    if callable(kind) and not isinstance(module_type, str):
        _CONTAINERS[module_type] = kind  # type: ignore[assignment]
        return
    raise TypeError(
        f"register_layer({module_type!r}, {kind!r}): kind must be a FeedbackLayer subclass "
        "(single-weight layers) or a converter callable (multi-weight modules, given a type)"
    )


def _combine(kind: type[FeedbackLayer], module_type: type[nn.Module]) -> type[FeedbackLayer]:
    if issubclass(kind, module_type):
        return kind
    name = f"Feedback{module_type.__name__}"
    cls = type(name, (kind, module_type), {"__module__": __name__, "__qualname__": name})
    setattr(sys.modules[__name__], name, cls)  # importable by name: pickling whole models works
    return cls


def _qualified_name(module_type: type) -> str:
    return f"{module_type.__module__}.{module_type.__qualname__}"


def feedback_type(module: nn.Module) -> type[FeedbackLayer] | None:
    """The feedback layer class for an exact instance of a registered type, else None."""
    cls = type(module)
    found = _FEEDBACK_TYPES.get(cls)
    if found is None and _qualified_name(cls) in _LAZY_KINDS:
        found = _FEEDBACK_TYPES[cls] = _combine(_LAZY_KINDS.pop(_qualified_name(cls)), cls)
    return found


def container_converter(module: nn.Module) -> Converter | None:
    """The converter of a registered multi-weight module type, else None."""
    return _CONTAINERS.get(type(module))


M = TypeVar("M", bound=nn.Module)


def take_over(module: nn.Module, cls: type[M], *, drop: Iterable[str] = ()) -> M:
    """A new ``cls`` holding ``module``'s whole state but the keys in ``drop``: the same Parameter
    objects (an optimizer keeps working, ``state_dict`` keys stay), hooks, training flag and
    attributes. Its containers (the dicts of parameters, buffers, modules and hooks; torch's
    weight lists) are copied, so ``module`` is left as it was."""
    new = cls.__new__(cls)
    skip = set(drop)
    new.__dict__.update(
        {
            key: (value.copy() if isinstance(value, dict | list) else value)
            for key, value in module.__dict__.items()
            if key not in skip
        }
    )
    return new


def is_feedback_layer(module: nn.Module) -> bool:
    """True for the layers ``convert`` creates."""
    return isinstance(module, FeedbackLayer)


def make_feedback_layer(module: nn.Module, rule: FeedbackRule) -> FeedbackLayer:
    """A feedback layer that takes over ``module``: same Parameter objects, hooks and attributes.

    Only exact instances of registered types are accepted (a subclass may never call
    ``forward``, like attention's ``out_proj``, so swapping it would silently change nothing).
    """
    cls = feedback_type(module)
    if cls is None:
        raise TypeError(
            f"cannot convert {type(module).__name__}: not a registered layer kind "
            "(asymprop.register_layer)"
        )
    layer = take_over(module, cls)
    layer._init_feedback_layer(rule)
    return layer


def attach_rule(layer: FeedbackLayer, rule: FeedbackRule) -> FeedbackLayer:
    """Give a freshly built feedback layer (a :class:`LinearSite`) its rule."""
    layer._init_feedback_layer(rule)
    return layer


def make_plain_layer(layer: FeedbackLayer) -> nn.Module:
    """Undo ``make_feedback_layer``: the torch layer with the same Parameter objects."""
    base = next(t for t, c in _FEEDBACK_TYPES.items() if type(layer) is c)
    return plain_copy(layer, base)


def plain_copy(layer: FeedbackLayer, base: type[M]) -> M:
    """``take_over`` into ``base`` without the feedback state (B, rule, feedback buffers)."""
    module = take_over(
        layer, base, drop=("rule", "feedback_state", "_exact_backprop", "_call_output_padding")
    )
    module._parameters.pop("feedback_weight", None)
    for name in [k for k in module._buffers if k.startswith("feedback")]:
        del module._buffers[name]
    return module
