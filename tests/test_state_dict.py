"""What state_dict holds: every rule's state, bp without an alias of W; the tensors alone are the
whole state of a stateless rule (safetensors); torch.distributed.checkpoint's state dicts work."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop

STATEFUL = {"brsf", "dfa", "np", "sg", "wm"}  # seeded streams, step counts: a dict per layer


def _model(rule: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return asymprop.convert(net, rule, seed=0)


def _tensors(state: dict[str, object]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("rule", sorted(asymprop.RULES))
def test_extra_state_is_the_rules_state_and_bp_has_no_alias(rule: str) -> None:
    state = _model(rule).state_dict()
    extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert sorted(extra) == ["0._extra_state", "2._extra_state"]
    assert all(bool(v) == (rule in STATEFUL) for v in extra.values()), extra
    if rule == "bp":  # B is W: no second name for the weight
        assert "0.feedback_weight" not in state


@pytest.mark.parametrize("rule", sorted(set(asymprop.RULES) - STATEFUL))
def test_safetensors_round_trip_of_a_stateless_rule(rule: str, tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model(rule)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(_tensors(model.state_dict()), str(path))
    twin = _model(rule)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    twin.load_state_dict(safetensors_torch.load_file(str(path)))  # strict
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name


def test_old_checkpoints_with_the_alias_still_load() -> None:
    model = _model("bp")
    state = dict(model.state_dict())
    state["0.feedback_weight"] = state["0.weight"]
    model.load_state_dict(state)  # strict: the old key is accepted


def test_a_stateful_layer_still_requires_its_state() -> None:
    state = _model("brsf").state_dict()
    del state["0._extra_state"]
    with pytest.raises(RuntimeError, match="_extra_state"):
        _model("brsf").load_state_dict(state)


@pytest.fixture(scope="module")
def process_group() -> object:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


@pytest.mark.parametrize("rule", ["bp", "fa", "kp", "usf", "dfa"])
@pytest.mark.parametrize("wrapper", ["plain", "ddp", "compiled"])
def test_distributed_checkpoint_state_dicts(rule: str, wrapper: str, process_group: object) -> None:
    """get/set_model_state_dict of torch.distributed.checkpoint, sharded and full, on the model,
    a DDP wrapper and a compiled model (a missing ``_extra_state`` or bp's alias broke them)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    model = _model(rule)
    F.cross_entropy(model(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
    wrapped = {
        "plain": lambda m: m,
        "ddp": nn.parallel.DistributedDataParallel,
        "compiled": torch.compile,
    }[wrapper](copy.deepcopy(model))
    for options in (None, StateDictOptions(full_state_dict=True)):
        state = get_model_state_dict(wrapped, options=options)
        assert torch.equal(state["2.weight"], model[2].weight)
        set_model_state_dict(wrapped, state, options=options)  # (it may consume ``state``)
