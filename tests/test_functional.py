"""The custom autograd functions against their oracles (STYLE.md habit 8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from asymprop.functional import feedback_conv2d, feedback_linear

f64 = torch.float64


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=f64, requires_grad=True)


@pytest.mark.parametrize("x_shape", [(5, 4), (3, 5, 4), (2, 3, 2, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradcheck_with_b_equal_w(x_shape: tuple[int, ...], bias: bool) -> None:
    x, W = _leaf(*x_shape), _leaf(6, 4)
    b = _leaf(6) if bias else None
    inputs = (x, W, b) if bias else (x, W)

    def fn(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return feedback_linear(x, W, b, W.detach())  # B = W: must be exact backprop

    assert torch.autograd.gradcheck(fn, inputs)


CONV_SETTINGS = [
    # (stride, padding, dilation, groups)
    (1, 0, 1, 1),
    (1, 1, 1, 1),
    (2, 1, 1, 1),
    (2, 0, 2, 1),
    (1, (1, 2), (2, 1), 2),
    (3, 2, 1, 4),
    ((2, 1), (0, 1), 1, 4),
]


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), CONV_SETTINGS)
def test_conv2d_gradcheck_with_b_equal_w(stride, padding, dilation, groups) -> None:
    x, W, b = _leaf(2, 4, 9, 8), _leaf(8, 4 // groups, 3, 3), _leaf(8)

    def fn(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return feedback_conv2d(x, W, b, W.detach(), stride, padding, dilation, groups)

    assert torch.autograd.gradcheck(fn, (x, W, b))


def _grads(
    y: torch.Tensor, wrt: tuple[torch.Tensor, ...], g: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(y, wrt, g)


@pytest.mark.parametrize("x_shape", [(5, 4), (3, 5, 4)])
def test_linear_equals_detach_trick_and_hand_computation(x_shape: tuple[int, ...]) -> None:
    x, W, b, B = _leaf(*x_shape), _leaf(6, 4), _leaf(6), _leaf(6, 4)
    y = feedback_linear(x, W, b, B)
    assert torch.equal(y, F.linear(x, W, b))
    g = torch.randn_like(y)
    gx, gW, gb, gB = _grads(y, (x, W, b, B), g)
    trick = F.linear(x.detach(), W, b) + F.linear(x, B) - F.linear(x, B).detach()
    tx, tW, tb = _grads(trick, (x, W, b), g)
    torch.testing.assert_close(gx, tx)
    torch.testing.assert_close(gW, tW)
    torch.testing.assert_close(gb, tb)
    # by hand: the error travels through B, W's gradient is the outer product, B gets W's (KP)
    torch.testing.assert_close(gx, g @ B.detach())
    torch.testing.assert_close(gW, g.reshape(-1, 6).T @ x.detach().reshape(-1, 4))
    torch.testing.assert_close(gB, gW)
    assert not torch.allclose(gx, g @ W.detach())  # really not backprop


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), CONV_SETTINGS)
def test_conv2d_input_grad_is_transposed_conv_with_b(stride, padding, dilation, groups) -> None:
    x, W, b, B = (
        _leaf(2, 4, 9, 8),
        _leaf(8, 4 // groups, 3, 3),
        _leaf(8),
        _leaf(8, 4 // groups, 3, 3),
    )
    y = feedback_conv2d(x, W, b, B, stride, padding, dilation, groups)
    torch.testing.assert_close(y, F.conv2d(x, W, b, stride, padding, dilation, groups))
    g = torch.randn_like(y)
    gx, gW, gb, gB = _grads(y, (x, W, b, B), g)
    # Hand computation through a different public op: conv_transpose2d with B, the
    # output_padding chosen so the result has x's size.
    s = (stride, stride) if isinstance(stride, int) else stride
    p = (padding, padding) if isinstance(padding, int) else padding
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    out_pad = [
        x.shape[2 + i] - ((y.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (3 - 1) + 1)
        for i in range(2)
    ]
    expected = F.conv_transpose2d(g, B.detach(), None, s, p, out_pad, groups, d)
    torch.testing.assert_close(gx, expected)
    # weight and bias gradients are the ordinary ones
    ref = F.conv2d(x, W, b, stride, padding, dilation, groups)
    rx, rW, rb = _grads(ref, (x, W, b), g)
    torch.testing.assert_close(gW, rW)
    torch.testing.assert_close(gb, rb)
    torch.testing.assert_close(gB, gW)
    assert not torch.allclose(gx, rx)


def test_conv2d_equals_detach_trick() -> None:
    x, W, B = _leaf(2, 4, 7, 7), _leaf(6, 2, 3, 3), _leaf(6, 2, 3, 3)
    y = feedback_conv2d(x, W, None, B, 2, 1, 1, 2)
    trick = (
        F.conv2d(x.detach(), W, None, 2, 1, 1, 2)
        + F.conv2d(x, B, None, 2, 1, 1, 2)
        - F.conv2d(x, B, None, 2, 1, 1, 2).detach()
    )
    g = torch.randn_like(y)
    for a, t in zip(_grads(y, (x, W), g), _grads(trick, (x, W), g), strict=True):
        torch.testing.assert_close(a, t)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="backward_weight has shape"):
        feedback_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(3, 4))
    with pytest.raises(ValueError, match="backward_weight has shape"):
        feedback_conv2d(
            torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3), None, torch.randn(4, 2, 1, 1)
        )


def test_bf16_autocast_runs_and_grads_keep_param_dtype() -> None:
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    W, B = torch.randn(5, 3, 3, 3, requires_grad=True), torch.randn(5, 3, 3, 3)
    Wl, Bl = torch.randn(2, 5 * 16, requires_grad=True), torch.randn(2, 5 * 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = feedback_conv2d(x, W, None, B, 2, 1)
        out = feedback_linear(h.flatten(1), Wl, None, Bl)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert W.grad is not None and W.grad.dtype == torch.float32
    assert Wl.grad is not None and x.grad is not None and x.grad.dtype == torch.float32


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    cin_per_group=st.integers(1, 3),
    cout_per_group=st.integers(1, 3),
    groups=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    size=st.tuples(st.integers(5, 9), st.integers(5, 9)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_conv2d_with_b_equal_w_matches_autograd(
    batch, cin_per_group, cout_per_group, groups, kernel, stride, padding, dilation, size, dtype
) -> None:
    cin, cout = cin_per_group * groups, cout_per_group * groups
    x = torch.randn(batch, cin, *size, dtype=dtype, requires_grad=True)
    W = torch.randn(cout, cin_per_group, *kernel, dtype=dtype, requires_grad=True)
    b = torch.randn(cout, dtype=dtype, requires_grad=True)
    ref = F.conv2d(x, W, b, stride, padding, dilation, groups)
    ours = feedback_conv2d(x, W, b, W.detach(), stride, padding, dilation, groups)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    for a, r in zip(_grads(ours, (x, W, b), g), _grads(ref, (x, W, b), g), strict=True):
        torch.testing.assert_close(a, r)
