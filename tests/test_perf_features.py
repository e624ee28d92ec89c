"""torch.compile, channels-last and bf16 autocast on converted models: correctness, not speed.

The oracle is the same model run eagerly, contiguous, in fp32. ``benchmarks/bench.py --compile
--features`` measures the speed of the same paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop
from conftest import small_cnn, small_resnet

#: rules whose layers must compile whole (dfa and np walk the autograd graph or read context
#: variables in forward, which dynamo cannot trace; see benchmarks/RESULTS.md).
COMPILABLE = ["bp", "fa", "rndf", "usf", "nusf", "brsf", "frsf", "kp", "wm"]


def converted(rule: str, factory=small_resnet) -> nn.Module:
    torch.manual_seed(0)
    options = {"warmup_steps": 0} if rule == "wm" else {}
    return asymprop.convert(factory(), rule, seed=0, **options)


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, run=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = (run or model)(x)
    F.cross_entropy(out.float(), y).backward()
    found = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return found


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 8, 8), torch.randint(0, 5, (n,))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    """Each gradient within ``rtol`` of the reference, relative to the reference's norm.

    Elementwise tolerances fail on sums that cancel (uSF's raw sign(W) errors are large), where
    a different summation order (channels-last, compiled kernels) moves a near-zero entry.
    """
    assert a.keys() == b.keys()
    for name in a:
        error = (b[name] - a[name]).norm() / a[name].norm().clamp_min(1e-12)
        assert error < rtol, (name, float(error))


@pytest.mark.parametrize("rule", COMPILABLE)
def test_layers_compile_without_graph_breaks(rule: str) -> None:
    model = converted(rule)
    x, _ = batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("rule", ["fa", "kp", "usf"])
def test_compiled_gradients_equal_eager(rule: str) -> None:
    # aot_eager traces forward and backward (our backward functions included) through
    # AOTAutograd without generating code: the same graphs inductor compiles, in seconds.
    model = converted(rule)
    x, y = batch()
    eager = grads(model, x, y)
    torch._dynamo.reset()
    compiled = grads(model, x, y, run=torch.compile(model, backend="aot_eager"))
    assert_close(eager, compiled, rtol=1e-5)
    if rule == "kp":  # B's gradient is W's, in the compiled graph too
        for name, _ in asymprop.feedback_layers(model):
            torch.testing.assert_close(
                compiled[f"{name}.feedback_weight"], compiled[f"{name}.weight"]
            )


@pytest.mark.slow
def test_inductor_training_step_matches_eager() -> None:
    model = converted("fa", small_cnn)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    eager = grads(model, x, y)
    torch._dynamo.reset()
    compiled = grads(model, x, y, run=torch.compile(model))
    assert_close(eager, compiled, rtol=1e-4)


@pytest.mark.parametrize("rule", ["bp", "fa", "kp", "usf", "brsf"])
def test_channels_last_gradients_equal_contiguous(rule: str) -> None:
    model = converted(rule)
    x, y = batch()
    reference = grads(model, x, y)
    model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert_close(reference, grads(model, x_cl, y), rtol=1e-5)


@pytest.mark.parametrize("rule", ["bp", "fa", "kp", "usf"])
def test_bf16_autocast_runs_and_follows_fp32(rule: str) -> None:
    model = converted(rule)
    x, y = batch(16)
    reference = grads(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    model.zero_grad(set_to_none=True)
    F.cross_entropy(out.float(), y).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == reference.keys()
    for name, grad in got.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        # bf16 keeps ~3 digits: batch-norm biases (sums that cancel) drift most; torch's own
        # autocast backprop (rule bp) reaches a cosine of ~0.95 on them in this network.
        cos = F.cosine_similarity(grad.flatten(), reference[name].flatten(), dim=0)
        assert cos > 0.9, (name, float(cos))
    flat = torch.cat([g.flatten() for g in got.values()])
    flat_ref = torch.cat([reference[n].flatten() for n in got])
    assert F.cosine_similarity(flat, flat_ref, dim=0) > 0.99


def test_bf16_autocast_sends_the_error_through_b() -> None:
    # Under autocast the input gradient is grad_out @ B computed in bf16: compare with FA's
    # definition evaluated by hand in bf16.
    torch.manual_seed(0)
    layer = asymprop.convert(nn.Linear(16, 8), "fa", seed=0)
    x = torch.randn(32, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = (grad_out @ layer.feedback_weight.to(torch.bfloat16)).float()
    torch.testing.assert_close(x.grad, expected)


def test_functorch_grad_goes_through_the_public_apply() -> None:
    # Outside transforms feedback_linear skips Function.apply's argument binding; under
    # torch.func it must take the public path and still send the error through B.
    x, W, B = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2, 3)
    grad_x = torch.func.grad(lambda x: asymprop.functional.feedback_linear(x, W, None, B).sum())(x)
    torch.testing.assert_close(grad_x, torch.ones(4, 2) @ B)
