"""The only code in asymprop that redefines a backward pass.

Each function computes the ordinary forward pass of its layer, and in the backward pass sends the
error to the layer's input through a separate ``backward_weight`` (the papers' B, stored in W's
shape) instead of ``weight`` (W). The gradients of ``weight`` and ``bias`` are the usual ones, and
``backward_weight`` receives the same gradient as ``weight`` when it requires grad: this is the
Kolen-Pollack circuit (000 Alg. 2), where B is trained by the very signals that train W.

Oracle (STYLE.md): each function equals the "detach trick"
``op(x.detach(), W) + op(x, B) - op(x, B).detach()`` in value and gradient, and equals the plain
op when ``backward_weight is weight``; ``tests/test_functional.py`` checks both with float64
``gradcheck``.

Transforms and the compiler (``tests/test_func.py``). Under ``torch.func`` (``functional_call``,
``grad``, ``vjp``, ``vmap``) the functions behave as eagerly; ``generate_vmap_rule`` runs their
forward and backward per example, so ``vmap(grad(loss), in_dims=(None, 0, 0))`` gives
per-example gradients (KP's B included). ``torch.compile`` traces them whole (``fullgraph=True``
works, any backend). Forward-mode AD (``jvp``, ``jacfwd``) is refused by torch: the backward pass
is not the derivative of the forward pass, so no tangent rule is defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers

__all__ = ["feedback_conv", "feedback_conv2d", "feedback_linear"]

# torch.compiler.is_compiling appeared in torch 2.3; dynamo folds either spelling to True.
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


class _FeedbackLinear(torch.autograd.Function):
    # torch.func.vmap runs forward and backward per example (each is written in vmappable ops):
    # per-example gradients are then vmap(grad(loss)) as for any torch op.
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, backward_weight: Tensor) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, _weight, bias, backward_weight = inputs
        ctx.save_for_backward(x, backward_weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, backward_weight = ctx.saved_tensors
        need_x, need_w, need_b, need_bw = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        # Under autocast grad_out may be bf16/fp16 while the saved tensors are fp32: compute in
        # grad_out's dtype, as autograd's own linear backward does; autograd casts the results.
        dtype = grad_out.dtype
        if need_x:
            # (..., out) @ (out, in) -> (..., in): the error travels through B, not W.
            grad_x = grad_out @ _cast(backward_weight, dtype)
        if grad_out.dim() != 2:  # fold all leading dims into N
            grad_out = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
            x = x.reshape(-1, x.shape[-1])  # (N, in)
        if need_w or need_bw:
            grad_w = grad_out.t().mm(_cast(x, dtype))  # (out, N) @ (N, in) -> (out, in)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum(0)
        # KP: B receives W's gradient (the same tensor: autograd accumulates it separately).
        grad_bw = grad_w if need_bw else None
        return grad_x, (grad_w if need_w else None), grad_b, grad_bw


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``, without a dispatch when it already is (the common case)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _FeedbackConv(torch.autograd.Function):
    """Every convolution torch has (1-3 spatial dims, plain or transposed) as one function."""

    generate_vmap_rule = True  # as _FeedbackLinear: aten.convolution(_backward) batch per example

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        backward_weight: Tensor,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        transposed: bool,
        output_padding: tuple[int, ...],
    ) -> Tensor:
        # aten.convolution is the op every F.conv*d and F.conv_transpose*d call
        return torch.ops.aten.convolution(
            x, weight, bias, stride, padding, dilation, transposed, output_padding, groups
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, _weight, bias, backward_weight, stride, padding, dilation, groups = inputs[:8]
        transposed, output_padding = inputs[8:]
        ctx.save_for_backward(x, backward_weight)
        ctx.conv_args = (stride, padding, dilation, transposed, output_padding, groups)
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, backward_weight = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups = ctx.conv_args
        need_x, need_w, need_b, need_bw = ctx.needs_input_grad[:4]
        # One call computes all three: the input gradient is the adjoint of the convolution
        # with the kernel we pass (B), the weight gradient depends only on x and grad_out (the
        # kernel is used for its shape), the bias gradient sums grad_out. This is autograd's
        # own backward of aten.convolution, with B in the kernel's place.
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            _cast(x, grad_out.dtype),
            _cast(backward_weight, grad_out.dtype),
            ctx.bias_sizes,
            list(stride),
            list(padding),
            list(dilation),
            transposed,
            list(output_padding),
            groups,
            [need_x, need_w or need_bw, need_b and ctx.bias_sizes is not None],
        )
        grad_bw = grad_w if need_bw else None
        return (grad_x, grad_w if need_w else None, grad_b, grad_bw, *([None] * 6))


def _apply(function: type[torch.autograd.Function], *args: Any) -> Tensor:
    """``function.apply(*args)`` without its per-call ``inspect.signature`` binding.

    When a Function defines ``setup_context``, ``Function.apply`` binds the arguments to
    ``forward``'s signature on every call, only to fill in default values (ours have none and get
    every argument positionally). That costs tens of microseconds per call (about 80 us measured
    on the benchmark CPU, several times the C++ apply itself): per layer and per step, a tax that
    a GPU step, whose kernels are short, would feel most. Outside functorch transforms and
    ``torch.compile`` we take the branch ``Function.apply`` itself takes there (unwrap dead
    functorch wrappers, then the C++ apply); under transforms and compilation the public path
    runs, because functorch and dynamo handle ``Function.apply`` specially.
    """
    # is_compiling first: dynamo folds it to True and never traces the functorch query.
    if _is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)  # type: ignore[no-any-return]
    # super(Function, cls).apply is torch._C._FunctionBase.apply bound to our class.
    return super(torch.autograd.Function, function).apply(  # type: ignore[misc,no-any-return]
        *unwrap_dead_wrappers(args)
    )


def feedback_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, backward_weight: Tensor
) -> Tensor:
    """``F.linear(x, weight, bias)`` whose input gradient travels through ``backward_weight``.

    Backward: ``dL/dx = dL/dy @ B`` (B of W's shape ``(out, in)``), ``dL/dW = dL/dy^T x``,
    ``dL/db = sum dL/dy``; ``dL/dB = dL/dW`` when B requires grad (Kolen-Pollack).

    Args:
        x: input of shape ``(*, in)``, any number of leading dimensions.
        weight: W, ``(out, in)``.
        bias: ``(out,)`` or None.
        backward_weight: B, ``(out, in)``.

    Example:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> W, B = torch.randn(2, 3), torch.randn(2, 3)
        >>> feedback_linear(x, W, None, B).sum().backward()
        >>> torch.allclose(x.grad, torch.ones(4, 2) @ B)
        True

    Paper: feedback alignment, 003 eq. (3)-(4); KP, 000 Alg. 2.
    """
    _check_shapes(weight, backward_weight)
    return _apply(_FeedbackLinear, x, weight, bias, backward_weight)


def _check_shapes(weight: Tensor, backward_weight: Tensor) -> None:
    if backward_weight.shape != weight.shape:
        raise ValueError(
            f"backward_weight has shape {tuple(backward_weight.shape)} but weight has "
            f"{tuple(weight.shape)}: B is stored in W's shape (see SCIENCE.md)"
        )


def _tuple(v: int | Sequence[int], dims: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * dims
    out = tuple(int(a) for a in v)
    if len(out) != dims:
        raise ValueError(f"expected an int or {dims} ints, got {tuple(v)!r}")
    return out


def feedback_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    backward_weight: Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    transposed: bool = False,
    output_padding: int | Sequence[int] = 0,
) -> Tensor:
    """Any convolution (``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d``) whose input gradient
    travels through ``backward_weight``.

    Backward: ``dL/dx`` is the adjoint of the convolution with kernel B (for a convolution, the
    transposed convolution of ``dL/dy`` with B; for a transposed convolution, the convolution of
    ``dL/dy`` with B), with the forward's stride, padding, dilation and groups; ``dL/dW`` and
    ``dL/db`` as in autograd; ``dL/dB = dL/dW`` when B requires grad (Kolen-Pollack).

    Args:
        x: ``(N, C_in, *spatial)`` with 1, 2 or 3 spatial dimensions.
        weight: W: ``(C_out, C_in / groups, *kernel)``, or ``(C_in, C_out / groups, *kernel)``
            when ``transposed`` (torch's layouts).
        bias: ``(C_out,)`` or None.
        backward_weight: B, W's shape.
        stride, padding, dilation, groups: as ``F.conv*d`` (integer padding only; the layers
            turn ``"same"``/``"valid"`` and non-zero padding modes into explicit padding).
        transposed: a transposed convolution (``F.conv_transpose*d``).
        output_padding: as ``F.conv_transpose*d``.

    Example:
        >>> x = torch.randn(2, 3, 16, requires_grad=True)
        >>> W, B = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
        >>> feedback_conv(x, W, None, B, stride=2).sum().backward()
        >>> x.grad.shape
        torch.Size([2, 3, 16])

    Paper: 000 App. D.2 (B is a kernel used by the transposed convolution).
    """
    _check_shapes(weight, backward_weight)
    dims = weight.dim() - 2
    return _apply(
        _FeedbackConv,
        x,
        weight,
        bias,
        backward_weight,
        _tuple(stride, dims),
        _tuple(padding, dims),
        _tuple(dilation, dims),
        groups,
        transposed,
        _tuple(output_padding, dims),
    )


def feedback_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    backward_weight: Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d`` whose input gradient is the transposed convolution with ``backward_weight``.

    Backward: ``dL/dx = conv_transpose2d(dL/dy, B)`` with the forward's stride, padding,
    dilation and groups (the output size is taken from x, so no output_padding ambiguity);
    ``dL/dW`` and ``dL/db`` as in autograd; ``dL/dB = dL/dW`` when B requires grad. The 2-D
    case of :func:`feedback_conv`.

    Args:
        x: ``(N, C_in, H, W)``.
        weight: W, ``(C_out, C_in / groups, kH, kW)``.
        bias: ``(C_out,)`` or None.
        backward_weight: B, W's shape.
        stride, padding, dilation, groups: as ``F.conv2d`` (integer padding only).

    Example:
        >>> x = torch.randn(2, 3, 8, 8, requires_grad=True)
        >>> W, B = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
        >>> feedback_conv2d(x, W, None, B, padding=1).sum().backward()

    Paper: 000 App. D.2 (B is a kernel used by the transposed convolution).
    """
    if weight.dim() != 4:
        raise ValueError(f"feedback_conv2d needs a 4-D weight, got {tuple(weight.shape)}")
    return feedback_conv(x, weight, bias, backward_weight, stride, padding, dilation, groups)
