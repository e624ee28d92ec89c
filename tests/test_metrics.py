"""Alignment metrics: exact values for bp, ~90 degrees for a large random layer, no side effects."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop
from asymprop import alignment, angle_deg, convert, delta_alignment
from conftest import small_cnn, small_mlp, small_resnet

CE = F.cross_entropy


def test_angle_deg_basics() -> None:
    assert angle_deg(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])) == pytest.approx(90.0)
    assert angle_deg(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])) == pytest.approx(
        0.0, abs=1e-6
    )
    assert angle_deg(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])) == pytest.approx(180.0)
    assert math.isnan(angle_deg(torch.zeros(3), torch.ones(3)))


@pytest.mark.parametrize(("build", "shape"), [(small_mlp, (12,)), (small_resnet, (3, 8, 8))])
def test_bp_metrics_are_exact(build, shape) -> None:
    model = convert(build(), "bp")
    stats = alignment(model)
    assert stats and all(
        s == {"angle_deg": 0.0, "sign_concordance": 1.0, "rel_error": 0.0} for s in stats.values()
    )
    deltas = delta_alignment(model, CE, torch.randn(6, *shape), torch.randint(0, 5, (6,)))
    assert list(deltas) == list(stats)
    assert all(angle == 0.0 for angle in deltas.values())


def test_large_fa_layer_is_near_90_degrees() -> None:
    layer = convert(nn.Linear(500, 400), "fa", seed=0)
    stats = alignment(nn.Sequential(layer))["0"]
    assert abs(stats["angle_deg"] - 90.0) < 1.0
    assert abs(stats["sign_concordance"] - 0.5) < 0.01
    assert stats["rel_error"] == pytest.approx(math.sqrt(2), rel=0.02)  # independent, equal norm


def test_sign_rule_metrics() -> None:
    model = convert(small_mlp(), "usf")
    for stats in alignment(model).values():
        assert stats["sign_concordance"] == 1.0 and 0 < stats["angle_deg"] < 90


def test_delta_alignment_measures_the_rule_not_backprop() -> None:
    model = convert(small_mlp(), "fa", seed=0)
    deltas = delta_alignment(model, CE, torch.randn(32, 12), torch.randint(0, 5, (32,)))
    assert set(deltas) == {"0", "2", "4"}
    assert all(angle > 20 for angle in deltas.values())  # FA's errors are far from BP's at init


@pytest.mark.parametrize("rule", ["fa", "bp", "frsf"])
def test_delta_alignment_leaves_everything_untouched(rule: str) -> None:
    model = convert(small_resnet(), rule, seed=0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    CE(model(x), y).backward()
    opt.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    delta_alignment(model, CE, x, y)
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    for name, value in model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, state[name]), name  # incl. BN running stats, num_batches
        else:
            assert value == state[name], name


def test_delta_alignment_with_dropout_uses_the_same_masks() -> None:
    model = convert(
        nn.Sequential(nn.Linear(12, 30), nn.Dropout(0.5), nn.ReLU(), nn.Linear(30, 5)), "bp"
    )
    model.train()
    deltas = delta_alignment(model, CE, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    assert all(angle == 0.0 for angle in deltas.values())


def test_metrics_need_a_converted_model() -> None:
    with pytest.raises(ValueError, match=r"call asymprop.convert\(model, rule\) first"):
        delta_alignment(small_cnn(), CE, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert alignment(small_cnn()) == {}


# ------------------------------------------- what a rule declares: its backward weight, its tensors


@dataclasses.dataclass(frozen=True)
class _LearnedScaleFA(asymprop.rules.FA):
    """FA with a learned scalar per layer: the error travels through ``feedback_scale * B``."""

    name: typing.ClassVar[str] = "learned-scale-fa"  # not registered: RULES stays as it is

    def init_feedback(self, layer: Any, generator: torch.Generator) -> None:
        super().init_feedback(layer, generator)
        layer.register_parameter("feedback_scale", nn.Parameter(torch.tensor(2.0)))

    def backward_weight(self, layer: Any) -> torch.Tensor:
        return layer.feedback_scale * layer.feedback_weight


def test_alignment_and_param_groups_use_what_the_rule_declares() -> None:
    torch.manual_seed(0)
    model = asymprop.convert(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
                             _LearnedScaleFA(), seed=0)  # fmt: skip
    layer = model[2]
    with torch.no_grad():
        layer.feedback_weight.copy_(layer.weight)  # B = W, so B_eff = 2 W
    stats = asymprop.alignment(model)["2"]
    assert stats["angle_deg"] < 1e-6
    assert math.isclose(stats["rel_error"], 1.0, rel_tol=1e-6)  # ||W - 2W|| / ||W||
    groups = asymprop.param_groups(model, lr=0.5)
    trained = {id(p) for p in groups[1]["params"]}
    assert trained == {id(model[0].feedback_scale), id(model[2].feedback_scale)}
    assert not trained & {id(p) for p in groups[0]["params"]}
