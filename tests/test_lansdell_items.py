"""The Lansdell et al. (004) items: their configs and claims, the autoencoder's random search,
the fixed-W item's initialisation, tiny end-to-end runs on digits, and the matching rule's
momentum against a hand computation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop
from asymprop.harness.papers.lansdell import (
    _lowest,
    authors_init,
    lansdell_autoencoder,
    lansdell_fixed_w,
    lansdell_mlp,
    search_draws,
    searched_spec,
)
from asymprop.harness.papers.verdicts import KINDS, judge_all
from asymprop.harness.reproduce import ITEMS, item_config

NAMES = ("lansdell-mlp", "lansdell-fixed-w", "lansdell-autoencoder")
METRICS = ("rel_error", "sign_concordance", "delta_angle_deg")


def _measured(name: str, config: dict[str, Any]) -> set[str]:
    """The value names the item computes for its claims (see each config's header)."""
    if name == "lansdell-mlp":
        names = {f"{m} test_error" for m in config["methods"]}
        names |= {f"{m} {x}/{i}" for m in config["methods"] for x in METRICS for i in (2, 3)}
        names |= {f"NP best {w} c rel_error/{i}" for w in ("inner", "end") for i in (2, 3)}
        return names
    if name == "lansdell-fixed-w":
        names = {f"{c} {x}/{i}" for c in config["noise"] for x in METRICS for i in (2, 3)}
        return names | {"widths rel_error/2 spread", "widths worst delta_angle_deg/2"}
    return {*config["methods"], "best entry but NP"}


def _claimed(claim: dict[str, Any]) -> list[str]:
    kind = next(k for k in KINDS if k in claim)
    value = claim[kind]
    return list(value) if isinstance(value, list) else [value]


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_configs_parse_and_claims_name_what_the_item_measures(name: str, quick: bool) -> None:
    assert name in ITEMS
    config = item_config(name, quick)
    measured = _measured(name, config)
    claims = config["claims"]
    assert len(claims) >= 5
    for claim in claims:
        assert claim.get("source", "").startswith("004"), claim
        assert set(_claimed(claim)) <= measured, (claim, sorted(measured))
    fake = {value: [1.0, 2.0, 3.0] for value in measured}
    verdicts = judge_all(claims, fake)  # refuses a malformed claim
    assert len(verdicts) == len(claims)


def test_search_draws_are_seeded_log_uniform_and_shared_by_methods() -> None:
    draws = search_draws(8, 0)
    assert draws.shape == (8, 3)
    assert np.array_equal(draws, search_draws(8, 0))
    assert not np.array_equal(draws, search_draws(8, 1))
    sgd = {"rule": "bp", "search": {"lr": [1e-4, 1e-2]}}
    np_spec = {
        "rule": "np",
        "options": {"warmup_steps": 0},
        "search": {"lr": [1e-4, 1e-2], "lr_b": [1e-6, 1e-3], "noise_std": [0.005, 0.1]},
    }
    for draw in draws:
        a, b = searched_spec(sgd, draw), searched_spec(np_spec, draw)
        assert a["lr"] == b["lr"]  # common random numbers: the same lr for every method
        assert 1e-4 <= a["lr"] <= 1e-2 and "search" not in a and "options" not in a
        assert 1e-6 <= b["options"]["lr_b"] <= 1e-3
        assert 0.005 <= b["options"]["noise_std"] <= 0.1
        assert b["options"]["warmup_steps"] == 0  # fixed options kept
    assert np_spec["options"] == {"warmup_steps": 0}  # the config is not changed
    # log-uniform: the midpoint of the unit interval is the geometric mean
    assert searched_spec(sgd, np.array([0.5, 0.5, 0.5]))["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="'momentum' is not one of lr, lr_b, noise_std"):
        searched_spec({"rule": "bp", "search": {"momentum": [0.5, 0.9]}}, draws[0])
    with pytest.raises(ValueError, match="0 < low <= high"):
        searched_spec({"rule": "bp", "search": {"lr": [1e-2, 1e-4]}}, draws[0])
    with pytest.raises(ValueError, match="configurations must be >= 1"):
        search_draws(0, 0)


def test_lowest_mean_counts_nan_as_worst() -> None:
    values = {"a": [2.0, 3.0], "b": [math.nan, 1.0], "c": [1.0, 2.0]}
    assert _lowest(values, ["a", "b", "c"]) == "c"
    assert _lowest(values, ["a", "b"]) == "a"


def testauthors_init_draws_w_and_b_with_variance_two_over_fan_in() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 300), nn.Sigmoid(), nn.Linear(300, 200))
    authors_init(net)
    for layer in (net[0], net[2]):
        std = math.sqrt(2 / layer.in_features)
        assert float(layer.weight.detach().std()) == pytest.approx(std, rel=0.02)
        assert float(layer.bias.detach().std()) == pytest.approx(std, rel=0.2)


def test_fixed_w_refuses_an_unknown_init(tmp_path: Path) -> None:
    config = {**item_config("lansdell-fixed-w", quick=True), "init": "xavier"}
    with pytest.raises(ValueError, match="init 'xavier' is not one of authors, torch"):
        lansdell_fixed_w("lansdell-fixed-w", config, tmp_path)


def _tiny(name: str, **overrides: Any) -> dict[str, Any]:
    config = item_config(name, quick=True)
    config.update(data="digits", **overrides)
    return config


def test_tiny_mlp_item_runs_on_digits(tmp_path: Path) -> None:
    config = _tiny("lansdell-mlp", train_size=64, log_every=2)
    result = lansdell_mlp("lansdell-mlp", config, tmp_path)
    assert result.table.count("| reproduced |") + result.table.count("| partly |") + (
        result.table.count("| not reproduced |")
    ) == len(config["claims"])
    assert "the interior c_h with the lowest mean relative error" in result.table
    assert all(path.exists() for path in result.figures)
    assert len(result.rows) == len(config["methods"])


def test_tiny_fixed_w_item_runs_on_digits(tmp_path: Path) -> None:
    config = _tiny("lansdell-fixed-w", train_size=256, steps=12, log_every=4)
    result = lansdell_fixed_w("lansdell-fixed-w", config, tmp_path)
    assert "rel. error 3 at step" in result.table and "| N |" in result.table
    assert len(result.rows) == len(config["noise"]) + len(config["widths"]["N"])
    assert all(path.exists() for path in result.figures)


def test_tiny_autoencoder_search_runs_on_digits(tmp_path: Path) -> None:
    config = _tiny("lansdell-autoencoder", train_size=128, val_size=64, test_size=64)
    result = lansdell_autoencoder("lansdell-autoencoder", config, tmp_path)
    search = [r for r in result.rows if r["part"] == "search"]
    final = [r for r in result.rows if r["part"] == "final"]
    assert len(search) == 2 * len(config["methods"])  # the same budget for every method
    assert len(final) == len(config["seeds"]) * len(config["methods"])
    for label in config["methods"]:  # the final runs use the draw with the lowest val. loss
        mine = [r for r in search if r["method"] == label]
        best = min(mine, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else 1e30)
        assert next(r["lr"] for r in final if r["method"] == label) == best["lr"]
    assert "The best entry but NP:" in result.table


# ----------------------------------------------------------------------------- matched momentum


def _matched_run(momentum: float, steps: int = 3) -> tuple[list[torch.Tensor], torch.Tensor, Any]:
    """Three SGD steps of a small net with ``matched``; W's gradients of the top layer, its B
    at conversion and the converted model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    options = {"lr_b": 0.1, "weight_decay": 0.01}
    model = asymprop.convert(net, "matched", seed=0, momentum=momentum, **options)
    start = model[2].feedback_weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        grads.append(model[2].weight.grad.clone())
        opt.step()
        asymprop.update_feedback(model)
    return grads, start, model


def test_matched_momentum_equals_the_hand_computed_heavy_ball_step() -> None:
    grads, b, model = _matched_run(momentum=0.9)
    velocity = torch.zeros_like(b)
    for g in grads:  # v <- m v + g; B <- (1 - wd) B - lr_b v  (PyTorch SGD's momentum)
        velocity = 0.9 * velocity + g
        b = 0.99 * b - 0.1 * velocity
    torch.testing.assert_close(model[2].feedback_weight, b)
    torch.testing.assert_close(model[2].get_buffer("feedback_velocity"), velocity)


def test_matched_without_momentum_is_unchanged() -> None:
    grads, b, model = _matched_run(momentum=0.0)
    for g in grads:
        b = 0.99 * b - 0.1 * g
    torch.testing.assert_close(model[2].feedback_weight, b)
    assert "feedback_velocity" not in dict(model[2].named_buffers())
    assert asymprop.make_rule("matched").momentum == 0.0  # the default


def test_matched_velocity_is_saved_and_loaded_with_the_model() -> None:
    _, _, model = _matched_run(momentum=0.9)
    _, _, fresh = _matched_run(momentum=0.9, steps=0)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        fresh[2].get_buffer("feedback_velocity"), model[2].get_buffer("feedback_velocity")
    )


@pytest.mark.parametrize("bad", [-0.1, 1.0, math.nan])
def test_matched_refuses_a_momentum_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match=r"option momentum=.* must be in \[0, 1\)"):
        asymprop.make_rule("matched", momentum=bad)
