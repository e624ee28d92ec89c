"""Direct feedback alignment: the output error goes straight to every layer (Nøkland 2016).

Backprop and FA send the error down layer by layer; DFA sends the network's *output* error
``e`` (the gradient at the output layer's pre-activation, ``dL/dy_out``) to every hidden layer
through its own fixed random matrix::

    delta_l = phi'(a_l) * (e @ B_{l+1})        # (N, n_out) @ (n_out, n_l) -> (N, n_l)
    dW_{l+1} = delta_{l+1}^T h_l                # the usual local weight gradient

Storage: layer ``k`` keeps ``feedback_weight`` of shape ``(n_out, *input_shape)`` (one example's
input shape: ``(in_features,)`` for Linear, ``(C, H, W)`` for Conv2d) and sends ``e @ B_k`` to its
input. The output layer's B therefore has W's shape (for it DFA is FA). When the output and the
layer's input share their positions (both ``(N, T, features)``: a sequence model whose output has
a prediction per token), B is ``(n_out, in_features)`` and ``e @ B`` is taken per position, the
error of each token going to that token (Launay et al. 2020's feedback for transformers). B is
drawn at the first backward pass, when ``n_out`` and the input shape are known: until then
``feedback_weight`` is an empty tensor (``alignment`` reports NaN), and the first layer, whose
input is data, never draws one. The draw comes from the layer's seeded stream, so a seed fixes
every B (with the default ``scale="chain"``, up to one factor per layer fixed on the first
batch: see `DFA`).

Any computation graph (no targets in ``forward``, the user's loop is unchanged). Each converted
layer's forward computes ``native_forward(x.detach())`` (exact weight gradient, no error to ``x``
through W) followed by an identity autograd node that, in the backward pass, sends ``e @ B`` to
``x``: **the projected output error replaces the error that would arrive at the layer's input
through W**, while everything between converted layers that carries no weight (nonlinearities,
pooling, normalisation, residual adds, concatenations, attention's activation products, a
recurrent layer's gates) keeps autograd's exact backward. So the error a layer's weights see at
its output, ``delta``, is the exact weight-free path applied to the errors ``e @ B`` injected at
the inputs of the converted layers downstream::

    delta_k = sum over paths k -> j of  J_path^T (e @ B_j)     (J_path: weight-free Jacobians)

On a chain this is Nøkland's ``delta_k = phi'(a_k) * (e @ B_{k+1})`` exactly (and bit for bit the
same computation as before graphs were supported). On a residual block ``x + f(x)`` the
identity path adds the errors injected further up to the branch's, as autograd adds any two
paths; TinyDFA (Launay et al. 2020) instead places explicit feedback points in the model and
sends each the projected error; here every converted layer is one.

``e`` is the output error of the forward pass: the gradient at the output of its *output
layer*, the converted layer called last (a classifier head, an LM head). Converted layers whose
inputs connect (through any weight-free ops) form one graph per forward pass, found by walking
the autograd graph back from each layer's input to the nearest converted layers; graphs that
meet (two towers merged) become one. A layer called several times (weight sharing, a recurrent
weight at every time step) sends ``e @ B`` to the input of each call, with one B.

In the backward pass the output layer records ``e`` before any other layer of its graph runs
(autograd runs a node only after every node that depends on it); if another layer's node runs
first the loss does not depend on the network through its output layer, and that raises. Not
detectable: a hidden output that also reaches the loss without passing a converted layer (an
auxiliary loss on a hidden activation) adds its gradient to that layer's ``delta``. An
unconverted output layer (``exclude``) makes the last converted layer the output. Under
``torch.no_grad`` layers run their plain op.

Transforms and the compiler. Under ``torch.func`` (``functional_call``, ``grad``, ``vmap``) the
chain is found the same way: functorch's copy of the identity node carries the same context.
Under ``vmap`` over examples each example is a batch of one, so call the model on
``x.unsqueeze(0)``; B's first draw runs outside the transforms, once, from the same stream as an
eager pass. ``torch.compile`` runs each layer's DFA part eagerly (the autograd graph it walks
does not exist while dynamo traces): one graph break per layer, the rest compiles, and
``fullgraph=True`` is refused.

Paper: Nøkland 2016, "Direct feedback alignment provides learning in deep neural networks", as
the DFA baseline of 004 (sec. 4.3, Table 1) and its DFA-shaped estimator g_DFA (sec. 3).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from .functional import _apply, _is_compiling
from .rules import FeedbackRule, check_positive, register_rule

if TYPE_CHECKING:
    from .layers import FeedbackLayer

__all__ = [
    "DFA",
    "DirectChain",
    "DirectGraph",
    "direct_feedback",
    "direct_forward",
    "draw_direct_feedback",
    "resize_lazy_feedback",
]

_CALLS = itertools.count()

#: ``draw(layer, shape, generator) -> Tensor``: B's initial value, drawn when first needed.
Draw = Callable[["FeedbackLayer", tuple[int, ...], torch.Generator], Tensor]
#: ``calibrate(layer, sent, delta, is_output) -> factor``: called right after B's draw, with the
#: error ``e @ B`` about to be sent to the layer's input and the error ``delta`` at the layer's
#: output; B (and what is sent) is multiplied by the factor returned, or, for None (nothing to
#: calibrate on), B is emptied again and drawn anew, identically, at the next backward pass.
Calibrate = Callable[["FeedbackLayer", Tensor, Tensor, bool], "float | None"]


@dataclass(eq=False)
class DirectGraph:
    """The converted layers whose inputs connected in one forward pass, and their output error.

    ``calls`` are in call order (the last one is the output layer's); ``error`` is ``dL/dy`` at
    the output layer from the latest backward pass through this graph, ``(N, *out_shape)``. Two
    graphs that meet become one: the absorbed one points to the other (``merged_into``).
    """

    calls: list[_Call] = field(default_factory=list)
    error: Tensor | None = None
    merged_into: DirectGraph | None = None

    def root(self) -> DirectGraph:
        graph = self
        while graph.merged_into is not None:
            graph = graph.merged_into
        return graph

    @property
    def layers(self) -> list[FeedbackLayer]:
        """The layers called, in call order (a layer called twice appears twice)."""
        return [call.layer for call in self.calls]


DirectChain = DirectGraph  # the name before any graph was supported (a chain is one)


@dataclass(eq=False)
class _Call:
    graph: DirectGraph
    layer: FeedbackLayer
    draw: Draw
    calibrate: Calibrate | None = None
    order: int = field(default_factory=lambda: next(_CALLS))  # global call order
    consumed: bool = False  # its output reaches another converted layer's input


class _DirectError(torch.autograd.Function):
    """Identity on the layer's output; in the backward pass it sends ``e @ B`` to the input."""

    generate_vmap_rule = True

    @staticmethod
    def forward(output: Tensor, input: Tensor, call: _Call) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _output, input, call = inputs
        ctx.call = call  # how _direct_producers recognises the node (ctx is the graph's node)
        ctx.input_shape = input.shape

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        call: _Call = ctx.call
        graph = call.graph.root()
        output = graph.calls[-1]
        if call is output:
            graph.error = grad_output.detach()  # the output layer's backward always runs first
        elif not call.consumed:
            raise RuntimeError(
                f"dfa: the output of {_describe(call.layer)} reaches the loss without passing "
                f"through another converted layer, as does that of the output layer "
                f"{_describe(output.layer)}: DFA sends one output error, so the network needs one "
                "output layer (sum two heads' losses through one head, or convert a head with "
                "another rule: convert(model, rule_callable))"
            )
        elif graph.error is None:
            raise RuntimeError(
                f"dfa: the backward pass reached {_describe(call.layer)} before the output layer "
                f"{_describe(output.layer)} (the converted layer called last in the forward "
                "pass): the loss must depend on the network through the output of that layer "
                "(differentiate the model's output, not a hidden activation)"
            )
        grad_input = None
        if ctx.needs_input_grad[1]:
            error = graph.error
            assert error is not None
            input_shape = tuple(ctx.input_shape)
            layer = call.layer
            calibrating = call.calibrate is not None and layer.feedback_weight.numel() == 0
            if calibrating and torch._C._functorch.peek_interpreter_stack() is not None:
                raise RuntimeError(  # before the draw: B stays empty for the eager pass
                    f"dfa: {_describe(layer)} draws B with scale='chain', which fixes B's scale "
                    "on the first batch, inside a torch.func transform: run one ordinary "
                    "backward pass first (e.g. a training step), or convert with scale='input' "
                    "or scale='output'"
                )
            feedback = direct_feedback(layer, error, input_shape, call.draw)
            grad_input = project(error, feedback.to(error.dtype), input_shape)
            if calibrating:
                assert call.calibrate is not None
                factor = call.calibrate(layer, grad_input, grad_output, call is output)
                if factor is None:  # nothing to calibrate on: draw again at the next batch
                    _undraw(layer)
                else:
                    with torch.no_grad(), torch._C._DisableFuncTorch():
                        feedback.mul_(factor)
                    grad_input = grad_input * factor
        return grad_output, grad_input, None


def _undraw(layer: FeedbackLayer) -> None:
    """Empty B again and rewind its stream by the draw, so the next batch draws the same B."""
    with torch.no_grad(), torch._C._DisableFuncTorch():
        layer.feedback_weight.resize_(0)
    layer.feedback_state["rng"][1] -= 1


def _describe(layer: FeedbackLayer) -> str:
    return f"{type(layer).__name__}(weight {tuple(layer.weight.shape)})"


def _call_of(node: Any) -> _Call | None:
    """The call a ``_DirectError`` node belongs to, or None for any other node.

    Eagerly the node is ``_DirectError``'s own; under ``torch.func`` transforms it is the copy
    functorch generates per transform level (``_DirectErrorGeneratedBackward``), whose context
    our ``setup_context`` filled in just the same: so the context, not the node's type, says.
    """
    if not isinstance(node, torch.autograd.function.BackwardCFunction):
        return None  # a built-in op's node (C++)
    call = getattr(node, "call", None)  # set by _DirectError.setup_context only
    return call if isinstance(call, _Call) else None


def _direct_producers(input: Tensor) -> list[_Call]:
    """The calls of the nearest ``_DirectError`` nodes behind ``input`` in the autograd graph."""
    found: list[_Call] = []
    seen: set[Any] = set()  # holds the node objects, so ids are never reused during the walk
    stack = [input.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        call = _call_of(node)
        if call is not None:
            found.append(call)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _per_position(error_shape: Sequence[int], input_shape: Sequence[int]) -> bool:
    """The output error and the layer's input share their positions: ``(N, T.., features)``
    both, with the same leading dimensions (a per-token output, as a language model's)."""
    return len(error_shape) >= 3 and tuple(error_shape[:-1]) == tuple(input_shape[:-1])


def project(error: Tensor, feedback: Tensor, input_shape: Sequence[int]) -> Tensor:
    """``e @ B`` in the layer input's shape: per position when the output has the input's
    positions, else per example over the flattened output and input."""
    if _per_position(error.shape, input_shape):
        return error @ feedback  # (..., n_out) @ (n_out, in) -> (..., in)
    n = error.shape[0]
    # (N, n_out) @ (n_out, prod(input_shape)) -> (N, prod(input_shape)) -> input's shape
    flat = error.reshape(n, -1) @ feedback.reshape(feedback.shape[0], -1)
    return flat.reshape(tuple(input_shape))


def _graph_for(input: Tensor) -> DirectGraph:
    """The graph this call joins: that of the converted layers behind ``input`` (merged into
    one if they belong to several), or a new one when none is (``input`` is data)."""
    calls = _direct_producers(input) if input.requires_grad else []
    graphs: list[DirectGraph] = []
    for call in calls:
        call.consumed = True
        graph = call.graph.root()
        if not any(graph is g for g in graphs):
            graphs.append(graph)
    if not graphs:
        return DirectGraph()
    first, *others = graphs
    for graph in others:  # towers that meet: one graph, calls kept in call order
        graph.merged_into = first
        first.calls.extend(graph.calls)
        graph.calls = []
    if others:
        first.calls.sort(key=lambda call: call.order)
    return first


def direct_forward(
    layer: FeedbackLayer, input: Tensor, draw: Draw, calibrate: Calibrate | None = None
) -> tuple[Tensor, DirectGraph | None]:
    """The layer's output, with DFA's backward pass: ``dL/dx = e_out @ B`` instead of ``dL/dy @ W``.

    The weight and bias gradients are the layer's usual ones for the ``dL/dy`` that reaches it.
    ``draw(layer, shape, generator)`` gives B when it is first needed (see the module docstring);
    ``calibrate``, if given, rescales it once, on that first backward pass (`Calibrate`).

    Returns:
        ``(output, graph)``: ``graph`` is the :class:`DirectGraph` the call joined, or None when
        no graph is recorded (``torch.no_grad``, nothing requires grad).

    Example:
        >>> layer = asymprop.convert(nn.Linear(3, 2), "dfa", seed=0)
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> y, graph = direct_forward(layer, x, lambda l, s, g: torch.randn(s, generator=g))
        >>> graph.layers == [layer]
        True
    """
    if not torch.is_grad_enabled():
        return layer.native_forward(input), None
    if _is_compiling():
        # The chain is found by walking the autograd graph, which exists only when ops run
        # (dynamo traces fake tensors without one), and the backward passes carry state from
        # layer to layer (the output error): so torch.compile runs this part eagerly, one graph
        # break per DFA layer, and compiles the rest. (Disabled here, not with a decorator:
        # that would import dynamo, 1.5 s, with asymprop.) torch.func transforms need nothing
        # special: their graph is real, made of functorch's copies of our node (_call_of).
        return torch.compiler.disable(_direct_call)(layer, input, draw, calibrate)
    return _direct_call(layer, input, draw, calibrate)


def _direct_call(
    layer: FeedbackLayer, input: Tensor, draw: Draw, calibrate: Calibrate | None
) -> tuple[Tensor, DirectGraph | None]:
    output = layer.native_forward(input.detach())  # weight grads only; the error comes via B
    if not (output.requires_grad or input.requires_grad):
        return output, None
    graph = _graph_for(input)
    call = _Call(graph, layer, draw, calibrate)
    graph.calls.append(call)
    return _apply(_DirectError, output, input, call), graph


def direct_feedback(
    layer: FeedbackLayer, error: Tensor, input_shape: tuple[int, ...], draw: Draw
) -> Tensor:
    """The layer's DFA matrix, drawn now if it is still empty: ``(n_out, *input_shape[1:])``, or
    ``(n_out_features, in_features)`` when the output has the input's positions.

    Raises:
        RuntimeError: B was drawn for another output size or input shape.
    """
    if error.shape[0] != input_shape[0]:
        raise RuntimeError(
            f"dfa: the output error has batch size {error.shape[0]} but the input of "
            f"{_describe(layer)} has {input_shape[0]}: the first dimension must be the batch "
            "(under torch.func.vmap over examples, call the model on x.unsqueeze(0))"
        )
    if _per_position(error.shape, input_shape):
        shape: tuple[int, ...] = (error.shape[-1], input_shape[-1])
    else:
        shape = (error[0].numel(), *input_shape[1:])
    feedback = layer.feedback_weight
    if tuple(feedback.shape) == shape:
        return feedback
    if feedback.numel() != 0:
        raise RuntimeError(
            f"dfa: {_describe(layer)} has feedback of shape {tuple(feedback.shape)}, drawn for "
            f"another network output or input size; this pass needs {shape} = (output size, "
            "*input shape)"
        )
    # B is state, not a function of the inputs: under torch.func transforms the draw and the
    # in-place resize run below them (functorch would refuse to mutate a captured buffer, and
    # vmap random ops), so every example of a vmap shares the one B the eager pass would draw.
    with torch.no_grad(), torch._C._DisableFuncTorch():
        drawn = draw(layer, shape, layer.feedback_generator(feedback.device))
        feedback.resize_(shape).copy_(drawn)  # in place: the buffer object stays the same
    return feedback


def draw_direct_feedback(
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    device: torch.device,
    dtype: torch.dtype,
    init: str = "uniform",
    gain: float = 1.0,
    scale: str = "output",
) -> Tensor:
    """A random DFA matrix: ``U(-a, a)`` or ``N(0, a^2)`` (unit variance before ``a``).

    ``scale="output"``: ``a = gain / sqrt(n_out)``, ``n_out = shape[0]`` the output errors summed
    into each entry of ``e @ B``: every unit of ``e @ B`` has about the size of ``e``, so the
    norm of the error sent to a layer grows as ``sqrt(n_in)``, ``n_in = prod(shape[1:])``.
    ``scale="input"``: entries of variance ``gain^2 / n_in`` (``a = gain sqrt(3 / n_in)`` for
    uniform, ``gain / sqrt(n_in)`` for normal), so ``||e @ B|| ~ gain ||e||`` per example
    whatever the layer's width. ``scale="chain"`` draws as ``"input"``; `DFA.calibrate` then
    rescales B once, on the first batch.
    """
    bound = gain / math.sqrt(shape[0])
    if scale in ("input", "chain"):
        units = math.prod(shape[1:])
        bound = gain * math.sqrt((3.0 if init == "uniform" else 1.0) / units)
    if init == "uniform":
        drawn = torch.rand(shape, generator=generator, device=device) * 2 - 1
    else:
        drawn = torch.randn(shape, generator=generator, device=device)
    return (drawn * bound).to(dtype)


def resize_lazy_feedback(
    module: torch.nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """``load_state_dict`` pre-hook: resize ``feedback*`` buffers to the shapes being loaded.

    Buffers whose shape is fixed only at the first backward (DFA's B, regression statistics)
    may be empty in a fresh model and full in a checkpoint, or the other way round.
    """
    for name, buffer in module.named_buffers(recurse=False):
        saved = state_dict.get(prefix + name)
        if not (name.startswith("feedback") and isinstance(saved, Tensor)):
            continue
        if saved.shape != buffer.shape:
            buffer.resize_(saved.shape)


def init_lazy_feedback(layer: FeedbackLayer, generator: torch.Generator) -> None:
    """Seed the layer's stream and install an empty B whose shape the first backward fixes."""
    layer.seed_feedback_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    layer.set_feedback_weight(layer.weight.detach().new_empty(0))
    layer.register_load_state_dict_pre_hook(resize_lazy_feedback)


@register_rule
@dataclass(frozen=True)
class DFA(FeedbackRule):
    """Direct feedback alignment: fixed random matrices carry the output error to each layer.

    ``delta_l = phi'(a_l) * (e_out @ B_{l+1})``; ``B_{l+1}`` of shape ``(n_out, *input_shape)``
    is drawn at the first backward pass from ``U(-a, a)`` (``init="uniform"``) or ``N(0, a^2)``
    (``init="normal"``) and never changes. Works with the ordinary loop
    (``loss.backward(); optimizer.step()``) on any model: residual networks, transformers,
    recurrent layers, shared layers (the module docstring gives the semantics on graphs).

    The scale of B (``scale``) decides whether deep unnormalised networks train:

    * ``"chain"`` (default): B is drawn with entries of variance ``1/n_in`` and, on the first
      batch only, multiplied by the one factor that makes ``||e @ B_l||`` (summed over the
      batch) equal ``rho_l ||delta_l||``: the layer's own output error times its weights' gain
      ``rho_l = sqrt(fan_in mean(W_l^2))``, which is what ``W_l^T`` does to a random error on
      average. Going down the network the errors then shrink (or not) as backprop's do at
      initialisation (checked within 25% on a ReLU LeNet-5 where Nøkland's scale sends 130x
      backprop's to the second conv and trains to chance). It reads one scalar of each W, once,
      and the first batch with a finite, nonzero error (all ranks' under ``torch.distributed``:
      one ``all_reduce`` of two numbers per layer), never W's entries; B is a fixed matrix
      afterwards, so this is DFA with a calibrated gain per layer. ``gain`` scales the output
      layer's factor, and through the calibration every error below it.
    * ``"output"``: ``a = gain / sqrt(n_out)``, Nøkland's: each unit of ``e @ B`` has about the
      size of ``e``. Faster than ``"chain"`` on shallow tanh MLPs trained with SGD (larger
      hidden errors act as a larger learning rate), diverges or dies on deep ReLU convnets at
      learning rates the other rules train at (docs/rules.md gives the measurements).
    * ``"input"``: entries of variance ``gain^2 / n_in``: ``||e @ B|| ~ gain ||e||`` at every
      layer whatever its width.

    Options:
        init: ``"uniform"`` or ``"normal"``.
        gain: multiplies the scale.
        scale: ``"chain"``, ``"output"`` or ``"input"``.

    Example:
        >>> model = asymprop.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)),
        ...                          "dfa", seed=0)
        >>> nn.functional.mse_loss(model(torch.randn(5, 4)), torch.zeros(5, 2)).backward()
        >>> model[2].feedback_weight.shape   # (n_out, in_features): B_2 maps e to h_1
        torch.Size([2, 8])

    Paper: Nøkland 2016; the DFA baseline of 004 (Table 1, 2b).
    """

    name = "dfa"
    init: Literal["uniform", "normal"] = "uniform"
    gain: float = 1.0
    scale: Literal["output", "input", "chain"] = "chain"

    def validate(self) -> None:
        check_positive(self, "gain")

    def init_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> None:
        init_lazy_feedback(layer, generator)

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        """Empty: B's shape ``(n_out, *input_shape)`` is known at the first backward pass."""
        return layer.weight.detach().new_empty(0)

    def forward(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        calibrate = self.calibrate if self.scale == "chain" else None
        return direct_forward(layer, input, self.draw_feedback, calibrate)[0]

    def calibrate(
        self, layer: FeedbackLayer, sent: Tensor, delta: Tensor, is_output: bool
    ) -> float | None:
        """``scale="chain"``: B's factor, fixed on the first batch, so that ``||e @ B||`` equals
        ``rho ||delta||`` (times ``gain`` at the output layer), ``rho^2 = fan_in mean(W^2)``.

        None when the batch gives nothing to match, and B waits for the next one (drawn again,
        the same): a non-finite error (an overflowing float16 step), a zero error sent or
        received, or W all zeros. Under ``torch.distributed`` the two sums are added over ranks
        (one ``all_reduce`` per layer per try), so every rank decides as one process would on
        the global batch.
        """
        weight = layer.full_weight().double()  # all-gathered when FSDP shards W
        rho_squared = layer.fan_in * float(weight.square().mean())
        sums = torch.stack(
            [delta.detach().double().square().sum(), sent.detach().double().square().sum()]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        target, have = float(sums[0]) * rho_squared, float(sums[1])
        if not (math.isfinite(target) and math.isfinite(have) and target > 0 and have > 0):
            return None
        factor = math.sqrt(target / have)
        return factor * self.gain if is_output else factor

    def draw_feedback(
        self, layer: FeedbackLayer, shape: tuple[int, ...], generator: torch.Generator
    ) -> Tensor:
        """B's initial value, drawn at the first backward pass."""
        weight = layer.weight
        return draw_direct_feedback(
            shape,
            generator,
            device=weight.device,
            dtype=weight.dtype,
            init=self.init,
            gain=self.gain,
            scale=self.scale,
        )
