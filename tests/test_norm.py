"""Sigma-only batch normalization (000 App. D.3) against nn.BatchNorm and a hand computation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import asymprop
from asymprop.norm import SigmaBatchNorm2d, sigma_batchnorm


def _pair(affine: bool = True, momentum: float | None = 0.1, track: bool = True):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, affine=affine, momentum=momentum, track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    return bn, sigma_batchnorm(copy.deepcopy(bn))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
def test_training_values_stats_and_parameter_grads_are_bns_input_error_is_gamma_over_sigma(
    affine: bool, momentum: float | None, track: bool
) -> None:
    bn, sigma = _pair(affine, momentum, track)
    assert isinstance(sigma, SigmaBatchNorm2d)
    for step in range(3):
        x = (torch.randn(8, 3, 5, 5, dtype=torch.float64) * 3 + step).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        g = torch.randn(8, 3, 5, 5, dtype=torch.float64)
        y, y2 = bn(x), sigma(x2)
        torch.testing.assert_close(y2, y, rtol=0, atol=0)  # the forward value, bit for bit
        y.backward(g)
        y2.backward(g)
        # by hand: dL/dx = g * gamma / sqrt(var_batch + eps), per channel, nothing else
        var = x.detach().var(dim=(0, 2, 3), unbiased=False)
        gamma = bn.weight.detach() if affine else torch.ones(3, dtype=torch.float64)
        expected = g * (gamma / (var + bn.eps).sqrt()).reshape(1, 3, 1, 1)
        torch.testing.assert_close(x2.grad, expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(x2.grad, x.grad)  # BN's exact Jacobian differs
        if affine:
            torch.testing.assert_close(sigma.weight.grad, bn.weight.grad, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(sigma.bias.grad, bn.bias.grad, rtol=1e-12, atol=1e-12)
    if track:
        torch.testing.assert_close(sigma.running_mean, bn.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(sigma.running_var, bn.running_var, rtol=0, atol=0)
        assert int(sigma.num_batches_tracked) == int(bn.num_batches_tracked) == 3


@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_keeps_batch_norms_dtype(autocast: bool) -> None:
    bn = nn.BatchNorm2d(3)
    sigma = sigma_batchnorm(copy.deepcopy(bn))
    x = torch.randn(4, 3, 5, 5)
    if not autocast:
        bn, sigma, x = bn.bfloat16(), sigma.bfloat16(), x.bfloat16()
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected, got = bn(x), sigma(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_evaluation_divides_by_the_running_sigma() -> None:
    bn, sigma = _pair()
    bn.running_var.uniform_(0.5, 4.0)
    sigma.running_var.copy_(bn.running_var)
    bn.eval(), sigma.eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(sigma(x), bn(x), rtol=0, atol=0)
    sigma(x).sum().backward()
    expected = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().reshape(1, 3, 1, 1)
    torch.testing.assert_close(x.grad, expected.expand_as(x), rtol=1e-12, atol=1e-12)


def test_swap_keeps_parameters_state_dict_and_works_with_a_converted_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip
    params = list(net.parameters())
    keys = list(net.state_dict())
    model = sigma_batchnorm(asymprop.convert(net, "kp", seed=0))
    assert [type(m).__name__ for m in (model[1], model[5])] == [
        "SigmaBatchNorm2d",
        "SigmaBatchNorm1d",
    ]
    assert all(any(p is q for q in model.parameters()) for p in params)
    bn_keys = [k for k in keys if k.startswith(("1.", "5."))]  # the two BatchNorms' entries
    assert [k for k in model.state_dict() if k.startswith(("1.", "5."))] == bn_keys
    loss = nn.functional.cross_entropy(
        model(torch.randn(5, 1, 8, 8)), torch.tensor([0, 1, 2, 0, 1])
    )
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
