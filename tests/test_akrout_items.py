"""The Akrout items: the run-level BN feedback option (000 App. D.3), the entries of an item
config, the mirror plateau prediction, and the packaged configs' claims."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from asymprop.harness.config import ConfigError
from asymprop.harness.experiment import RunConfig, prepare, train
from asymprop.harness.papers.akrout import (
    ITEMS,
    akrout_entries,
    entry_settings,
    mirror_geometry,
    plateau_deg,
)
from asymprop.harness.papers.verdicts import judge_all
from asymprop.harness.records import read_yaml
from asymprop.harness.reproduce import item_config
from asymprop.norm import SigmaBatchNorm1d

DIGITS = dict(
    model="mlp",
    model_options={"widths": [16], "batchnorm": True},
    data="digits",
    train_size=200,
    test_size=100,
    epochs=1,
    batch_size=50,
    optimizer="sgd",
    lr=0.05,
    threads=1,
)


def test_bn_feedback_refuses_an_unknown_value(tmp_path):
    config = RunConfig(**DIGITS, bn_feedback="mean", out=str(tmp_path))
    with pytest.raises(ConfigError, match=r"bn_feedback must be one of full, sigma, not 'mean'"):
        prepare(config)


def test_bn_feedback_sigma_backward_is_gamma_over_sigma(tmp_path):
    """The prepared model's BN sends dL/dy * gamma / sigma (batch sigma) to its input."""
    run = prepare(RunConfig(**DIGITS, rule="fa", bn_feedback="sigma", out=str(tmp_path)))
    norms = [m for m in run.module.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms and all(type(m) is SigmaBatchNorm1d for m in norms)
    bn = norms[0]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
    x = torch.randn(32, bn.num_features, requires_grad=True)
    g = torch.randn(32, bn.num_features)
    bn.train()
    bn(x).backward(g)
    sigma = (x.detach().var(0, unbiased=False) + bn.eps).sqrt()
    torch.testing.assert_close(x.grad, g * bn.weight.detach() / sigma)


def test_bn_feedback_full_is_the_default_and_recorded(tmp_path):
    run = prepare(RunConfig(**DIGITS, out=str(tmp_path / "full")))
    assert not any(isinstance(m, SigmaBatchNorm1d) for m in run.module.modules())
    config = RunConfig(**DIGITS, bn_feedback="sigma", out=str(tmp_path / "sigma"))
    rows = train(config, plots=False)
    assert math.isfinite(rows[-1]["train_loss"])
    assert read_yaml(tmp_path / "sigma" / "config.yaml")["bn_feedback"] == "sigma"
    assert RunConfig().bn_feedback == "full"


def test_entries_carry_run_settings():
    config = {
        "rules": ["bp", "wm"],
        "rule_options": {"wm": {"warmup_steps": 5}},
        "variants": [
            {"key": "wm-s", "label": "WM s", "rule": "wm", "run": {"bn_feedback": "sigma"}}
        ],
        "run": {"lr": 0.1, "bn_feedback": "full"},
    }
    bp, wm, wm_s = akrout_entries(config)
    assert (bp.label, wm.rule_options) == ("BP", {"warmup_steps": 5})
    settings = entry_settings(config, wm_s, 3)
    assert settings["bn_feedback"] == "sigma" and settings["seed"] == 3
    assert settings["rule_options"] == {}
    with pytest.raises(ValueError, match="unknown keys"):
        akrout_entries({"variants": [{"key": "a", "label": "A", "rule": "bp", "opts": {}}]})
    with pytest.raises(ValueError, match="unique"):
        akrout_entries({"rules": ["bp"], "variants": [{"key": "bp", "label": "B", "rule": "bp"}]})


def test_plateau_prediction_per_layer():
    """The default batch (2 fan_in pairs per weight) predicts 25.5 degrees in every dense layer;
    a fixed batch shrinks it where a conv weight connects many positions."""
    assert plateau_deg(784, 0.5, 2 * 784) == pytest.approx(25.5, abs=0.1)
    assert plateau_deg(10, 0.5, 20, relu=False) < plateau_deg(10, 0.5, 20)
    geometry = mirror_geometry(
        {**DIGITS, "model": "mlp", "rule": "wm", "rule_options": {"mirror_batch": 64}}, {}
    )
    assert [g["fan_in"] for g in geometry] == [64, 16]
    assert [g["N"] for g in geometry] == [64, 64]
    assert geometry[0]["plateau_deg"] == pytest.approx(plateau_deg(64, 0.5, 64))


@pytest.mark.parametrize("name", sorted(ITEMS))
@pytest.mark.parametrize("quick", [False, True])
def test_packaged_claims_are_well_formed(name, quick):
    """Every claim of every Akrout config names values the item measures, and judges fake ones."""
    config = item_config(name, quick)
    entries = akrout_entries(config)
    assert config["claims"], name
    for entry in entries:
        RunConfig(**{**entry_settings(config, entry, 0), "out": None})  # known settings
    fake: dict[str, list[float]] = {}
    for entry in entries:
        for suffix in ("", "/angle", "/delta"):
            fake[entry.key + suffix] = [10.0, 11.0]
        for i in range(1, 20):
            for kind in ("angle", "delta", "plateau"):
                fake[f"{entry.key}/{kind}/{i}"] = [5.0, 6.0]
    verdicts = judge_all(config["claims"], fake)
    assert len(verdicts) == len(config["claims"])
