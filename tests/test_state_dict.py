"""state_dict holds tensors only where a rule keeps no other state (safetensors works)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import asymprop

STATEFUL = {"brsf", "dfa", "np", "sg", "wm"}  # seeded streams, step counts: a dict per layer


def _model(rule: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return asymprop.convert(net, rule, seed=0)


@pytest.mark.parametrize("rule", sorted(asymprop.RULES))
def test_only_stateful_rules_keep_extra_state(rule: str) -> None:
    state = _model(rule).state_dict()
    others = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    assert others == (["0._extra_state", "2._extra_state"] if rule in STATEFUL else [])
    if rule == "bp":  # B is W: no second name for the weight
        assert "0.feedback_weight" not in state


@pytest.mark.parametrize("rule", sorted(set(asymprop.RULES) - STATEFUL))
def test_safetensors_round_trip(rule: str, tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model(rule)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    twin = _model(rule)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    twin.load_state_dict(safetensors_torch.load_file(str(path)))  # strict
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_old_checkpoints_with_the_alias_and_empty_extra_state_still_load() -> None:
    model = _model("bp")
    state = dict(model.state_dict())
    state["0.feedback_weight"] = state["0.weight"]
    state["0._extra_state"] = {}
    model.load_state_dict(state)  # strict: the old keys are accepted


def test_a_stateful_layer_still_requires_its_state() -> None:
    state = _model("brsf").state_dict()
    del state["0._extra_state"]
    with pytest.raises(RuntimeError, match="_extra_state"):
        _model("brsf").load_state_dict(state)
