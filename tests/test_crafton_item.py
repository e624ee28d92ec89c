"""The Crafton-CNN item (004 Table 1 and 2b): its config and claims, the search's shared ranges
and held-out validation data, the run settings of a drawn method, and the CNN's activation noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from asymprop.harness.experiment import RunConfig, prepare
from asymprop.harness.models import ActivationNoise, build_model
from asymprop.harness.papers.crafton import (
    crafton,
    method_settings,
    search_cache,
    searched_method,
)
from asymprop.harness.papers.lansdell import searched_spec
from asymprop.harness.papers.verdicts import KINDS, REPRODUCED, judge_all
from asymprop.harness.reproduce import ITEMS, item_config

NAME = "crafton-fashion-mnist"


def _entries(config: dict) -> list[str]:
    return [*config["methods"], *config.get("noise_ablation", {})]


@pytest.mark.parametrize("quick", [False, True])
def test_config_parses_and_claims_name_its_entries(quick: bool) -> None:
    assert ITEMS[NAME] is crafton
    config = item_config(NAME, quick)
    entries = _entries(config)
    for claim in config["claims"]:
        kind = next(k for k in KINDS if k in claim)
        named = claim[kind] if isinstance(claim[kind], list) else [claim[kind]]
        assert set(named) <= set(entries), claim
    for spec in config["methods"].values():  # every method's search is well formed
        ranged = searched_method(spec, config["search"]["ranges"])
        drawn = searched_spec(ranged, np.full(3, 0.5))
        RunConfig(**method_settings(config["run"], drawn))
    assert set(config["noise_ablation"].values()) <= set(config["methods"])
    assert config["noise_from"] in config["methods"]
    # judged on fake values: NP best but BP, noise changes nothing
    fake = {"BP": 10.0, "BP noise": 10.2, "DFA": 20.0, "DFA noise": 20.3, "NP": 15.0, "SG": 14.0}
    values = {e: [fake[e] - 0.5, fake[e], fake[e] + 0.5] for e in entries}
    verdicts = judge_all(config["claims"], values)
    assert len(verdicts) == len(config["claims"])
    if not quick:
        assert len(verdicts) == 6 and all(v.verdict == REPRODUCED for v in verdicts)


def test_full_config_searches_the_same_ranges_for_every_method() -> None:
    config = item_config(NAME)
    ranges = config["search"]["ranges"]
    specs = {label: searched_method(spec, ranges) for label, spec in config["methods"].items()}
    assert {tuple(spec["search"]) for spec in specs.values()} == {
        ("lr",),
        ("lr", "lr_b"),
        ("lr", "lr_b", "noise_std"),
    }
    draw = np.array([0.3, 0.6, 0.9])
    drawn = {label: searched_spec(spec, draw) for label, spec in specs.items()}
    assert len({d["lr"] for d in drawn.values()}) == 1  # common random numbers
    assert drawn["NP"]["options"]["lr_b"] == drawn["SG"]["options"]["lr_b"]
    assert drawn["NP"]["options"]["shape"] == drawn["SG"]["options"]["shape"] == "dfa"


def test_searched_method_refuses_an_unknown_or_unranged_hyperparameter() -> None:
    with pytest.raises(ValueError, match="momentum"):
        searched_method({"rule": "bp", "tune": ["momentum"]}, {"lr": [1e-4, 1e-3]})
    with pytest.raises(ValueError, match="lr_b"):
        searched_method({"rule": "sg", "tune": ["lr", "lr_b"]}, {"lr": [1e-4, 1e-3]})


def test_method_settings_put_lr_on_the_optimizer_and_the_rest_on_the_rule() -> None:
    drawn = {"rule": "np", "lr": 3e-4, "options": {"shape": "dfa", "lr_b": 1e-3}}
    settings = method_settings({"optimizer": "adam", "lr": 1.0}, drawn)
    assert settings == {
        "optimizer": "adam",
        "lr": 3e-4,
        "rule": "np",
        "rule_options": {"shape": "dfa", "lr_b": 1e-3},
    }


def test_search_cache_trains_and_scores_on_disjoint_parts_of_the_training_split() -> None:
    settings = {"data": "digits", "model": "mlp", "train_size": 300, "test_size": 100}
    search = {"train_size": 300, "val_size": 100, "draw_seed": 0}
    cache = search_cache(settings, search)
    run = prepare(RunConfig(**settings), cache)  # the run looks it up
    x_train, _ = run.dataset.train.tensors
    x_val, _ = run.dataset.test.tensors
    assert len(x_train) == 300 and len(x_val) == 100
    from asymprop.harness.data import load_dataset

    full = load_dataset("digits")
    x_all = full.train.tensors[0].flatten(1)
    x_test = full.test.tensors[0].flatten(1)
    # every validation example comes from the training split, none from the test split
    assert all(bool((x_all == v).all(1).any()) for v in x_val.flatten(1))
    assert not any(bool((x_test == v).all(1).any()) for v in x_val.flatten(1)[:20])
    with pytest.raises(ValueError, match="exceed"):
        search_cache(settings, {**search, "train_size": 2000})


def test_activation_noise_sits_where_np_perturbs_and_only_while_training() -> None:
    torch.manual_seed(0)
    noisy = build_model("crafton-cnn", (1, 28, 28), 10, dropout=0.0, activation_noise=0.5)
    torch.manual_seed(0)
    plain = build_model("crafton-cnn", (1, 28, 28), 10, dropout=0.0)
    modules = list(noisy.features) + list(noisy.classifier)
    weights = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d | nn.Linear)]
    noise = [i for i, m in enumerate(modules) if isinstance(m, ActivationNoise)]
    assert [m.std for m in modules if isinstance(m, ActivationNoise)] == [0.5] * 5
    # one noise module right before every weight layer but the first (features end in noise)
    assert [i + 1 for i in noise] == [*weights[1:3], len(noisy.features), *weights[4:]]
    assert not any(isinstance(m, ActivationNoise) for m in plain.modules())
    x = torch.randn(4, 1, 28, 28)
    noisy.eval()
    plain.eval()
    assert torch.equal(noisy(x), plain(x))  # same weights; eval: no noise
    noisy.train()
    assert not torch.allclose(noisy(x), plain(x))
    with pytest.raises(ValueError, match="activation_noise"):
        build_model("crafton-cnn", (1, 28, 28), 10, activation_noise=-0.1)


@pytest.mark.slow
def test_quick_item_runs(tmp_path: Path) -> None:
    config = item_config(NAME, quick=True)
    result = crafton(NAME, config, tmp_path)
    finals = [r for r in result.rows if r["part"] == "final"]
    assert {r["entry"] for r in finals} == set(_entries(config))
    assert all(0 <= r["test_error"] <= 1 for r in finals)
    noisy = [r for r in finals if r["entry"] == "DFA noise"]
    np_noise = next(r["noise_std"] for r in finals if r["entry"] == "NP")
    assert all(r["activation_noise"] == np_noise for r in noisy)
    assert "| claim | criterion |" in result.table
    assert all(path.is_file() for path in result.figures)


def test_a_noise_ablation_without_a_noise_source_is_refused(tmp_path: Path) -> None:
    config = item_config("crafton-fashion-mnist", quick=True)
    with pytest.raises(ValueError, match=r"noise_from .*'DFA'.*such methods: NP"):
        crafton("crafton-fashion-mnist", {**config, "noise_from": "DFA"}, tmp_path)
    with pytest.raises(ValueError, match=r"noise_ablation names \['XX'\]"):
        crafton("crafton-fashion-mnist", {**config, "noise_ablation": {"X": "XX"}}, tmp_path)
