"""train_step's gradient scaler: the same step as without one, and refused where it would lie."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop


def _model(rule: str, **options: object) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return asymprop.convert(net, rule, seed=0, **options)


@pytest.mark.parametrize("rule", ["fa", "kp", "usf", "matched"])
def test_a_scaled_step_is_the_unscaled_step(rule: str) -> None:
    """Loss x 2^10 for backward, gradients / 2^10 before the step: the same weights and B."""
    plain = _model(rule)
    scaled = copy.deepcopy(plain)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_scaled = torch.optim.SGD(scaled.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=gen)
        a = asymprop.train_step(plain, opt_plain, F.cross_entropy, x, y)
        b = asymprop.train_step(scaled, opt_scaled, F.cross_entropy, x, y, scaler=scaler)
        assert a == b  # the unscaled loss
    for (name, p), q in zip(plain.state_dict().items(), scaled.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("rule", ["usf", "matched", "brsf", "wm"])
def test_an_overflow_skips_the_step_and_the_feedback_update(rule: str) -> None:
    """matched would step B on the inf gradient, brsf redraw M, wm mirror: none may happen
    (wm without its one-off warm-up, which runs before the first forward pass)."""
    model = _model(rule, **({"warmup_steps": 0} if rule == "wm" else {})).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])

    def huge(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets) * 1e30  # finite; x 2^100 overflows float32

    asymprop.train_step(model, opt, huge, x, y, scaler=scaler)
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[name]), name  # skipped: W and B unchanged
        else:  # no random draw either (wm records its input shape in the forward pass)
            assert value.get("rng") == before[name].get("rng"), name
    assert scaler.get_scale() < 2.0**100  # and the scale backed off


def test_rules_that_regress_on_the_errors_refuse_a_scaler() -> None:
    model = _model("np")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="np"):
        asymprop.train_step(model, opt, F.cross_entropy, x, y, scaler=torch.amp.GradScaler("cpu"))
