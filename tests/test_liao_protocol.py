"""Liao et al.'s items (002): the learning-rate protocol (selection seed, grid extended at an
edge, held-out seeds reported) and every Liao config's claims, judged on made-up values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from asymprop.harness.papers.common import CHANCE_ERROR
from asymprop.harness.papers.liao import (
    ITEMS,
    liao,
    liao_best,
    liao_bm_sweep,
    lr_grid,
    select_lr,
)
from asymprop.harness.papers.verdicts import judge_all
from asymprop.harness.records import format_values
from asymprop.harness.reproduce import item_config


def test_lr_grid_is_the_papers_four_decades_around_the_base() -> None:
    assert lr_grid(0.01, [100, 10, 1, 0.1, 0.01]) == [1e-4, 1e-3, 1e-2, 0.1, 1.0]
    assert lr_grid(3e-4, [100, 10, 1, 0.1, 0.01]) == [3e-6, 3e-5, 3e-4, 3e-3, 3e-2]
    with pytest.raises(ValueError, match="positive"):
        lr_grid(0.0, [1])


def test_select_lr_extends_at_an_edge_at_most_twice_and_records_every_lr() -> None:
    calls: list[float] = []

    def falling(lr: float) -> float:  # lower error for every smaller lr
        calls.append(lr)
        return lr

    lr, tried = select_lr(falling, [1e-3, 1e-2, 0.1], extensions=2)
    assert lr == 1e-5 and sorted(tried) == [1e-5, 1e-4, 1e-3, 1e-2, 0.1]
    assert calls == [1e-3, 1e-2, 0.1, 1e-4, 1e-5]  # one new decade per extension
    lr, tried = select_lr(lambda lr: -lr, [1e-3, 1e-2], extensions=1)
    assert lr == 0.1 and sorted(tried) == [1e-3, 1e-2, 0.1]  # the high edge


def test_select_lr_stops_inside_the_grid_and_never_chooses_a_diverged_lr() -> None:
    lr, tried = select_lr(lambda lr: abs(math.log10(lr) + 2), [1e-3, 1e-2, 0.1])
    assert lr == 1e-2 and len(tried) == 3  # best inside: nothing added
    lr, tried = select_lr(lambda lr: math.nan if lr > 0.05 else 0.95, [1e-2, 0.1], 0)
    assert tried == {1e-2: 0.95, 0.1: math.inf} and lr == 1e-2  # diverged: never chosen
    lr, tried = select_lr(lambda lr: math.nan, [1e-2, 0.1], 0)
    assert lr == 1e-2  # every run diverged: the smallest lr (reported as chance)
    with pytest.raises(ValueError, match="non-empty"):
        select_lr(lambda lr: 0.0, [], 2)


def test_liao_best_chooses_on_the_selection_seed_and_reports_the_held_out_seeds() -> None:
    rows: list[dict[str, Any]] = [
        {"entry": "SGD", "stage": "select", "lr": 0.1, "seed": 0, "test_error": 0.05},
        {"entry": "SGD", "stage": "select", "lr": 0.01, "seed": 0, "test_error": 0.10},
        {"entry": "SGD", "stage": "report", "lr": 0.1, "seed": 1, "test_error": 0.07},
        {"entry": "SGD", "stage": "report", "lr": 0.1, "seed": 2, "test_error": math.nan},
    ]
    assert liao_best(rows, ["SGD"]) == {"SGD": (0.1, [0.07, CHANCE_ERROR])}
    # rows without a stage: the best mean over seeds, as before the protocol
    old = [{k: v for k, v in r.items() if k != "stage"} for r in rows]
    assert liao_best(old, ["SGD"])["SGD"][0] == 0.01


def _fake_values(name: str, config: dict[str, Any]) -> dict[str, list[float]]:
    """Every value the item would measure, made up (three seeds)."""
    if name == "liao-bm-sweep":
        names = []
        for size in config["train_sizes"]:
            for batch in config["batch_sizes"]:
                for plain, with_bm in config["pairs"]:
                    point = f"n{size} b{batch}"
                    names += [f"{plain} {point}", f"{with_bm} {point}"]
                    names.append(f"gain {plain}->{with_bm} {point}")
    else:
        names = [e for entries in config["tables"].values() for e in entries]
        names += [f"{a} - {b}" for a, b in config.get("differences", [])]
    return {n: [1.0 + i, 2.0 + i, 3.0 + i] for i, n in enumerate(names)}


@pytest.mark.parametrize("name", sorted(ITEMS))
@pytest.mark.parametrize("quick", [False, True])
def test_every_liao_config_states_its_protocol_and_well_formed_claims(
    name: str, quick: bool
) -> None:
    config = item_config(name, quick=quick)
    protocol = config["protocol"]
    assert protocol["select_seed"] not in protocol["seeds"]
    assert set(config["lr_base"]) == {"sgd", "bm"}
    if not quick:
        assert protocol["seeds"] == [1, 2, 3]
        assert len(protocol["factors"]) >= 3 and protocol["extensions"] == 2
    assert config["claims"], name
    verdicts = judge_all(config["claims"], _fake_values(name, config))
    assert len(verdicts) == len(config["claims"])


def test_a_tiny_liao_item_reports_held_out_seeds_and_every_lr_tried(tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "protocol": {"select_seed": 0, "seeds": [1, 2], "factors": [10, 1], "extensions": 1},
        "lr_base": {"sgd": 0.01, "bm": 0.0003},
        "run": {
            "model": "mlp",
            "model_options": {"widths": [16]},
            "data": "digits",
            "train_size": 200,
            "epochs": 1,
            "batch_size": 50,
            "momentum": 0.9,
            "threads": 1,
        },
        "tables": {"t": ["SGD", "BM", "BM1"]},
        "claims": [{"claim": "BM no worse", "at_most": "BM - SGD", "value": 100.0}],
        "differences": [["BM", "SGD"]],
    }
    result = liao("liao-tiny", config, tmp_path)
    select = [r for r in result.rows if r["entry"] == "SGD" and r["stage"] == "select"]
    assert {r["seed"] for r in select} == {0} and len(select) in (2, 3)
    report = [r for r in result.rows if r["entry"] == "SGD" and r["stage"] == "report"]
    assert [r["seed"] for r in report] == [1, 2]
    assert len({r["lr"] for r in report}) == 1
    # BM and BM1 are the same settings: trained once, both reported alike
    assert liao_best(result.rows, ["BM"])["BM"] == liao_best(result.rows, ["BM1"])["BM1"]
    bm = [r["test_error"] for r in result.rows if r["entry"] == "BM"]
    assert bm == [r["test_error"] for r in result.rows if r["entry"] == "BM1"]
    assert len(list((tmp_path / "runs").glob("BM1-*"))) == 0
    assert "lrs tried" in result.table and "| reproduced |" in result.table


def test_a_tiny_bm_sweep_judges_gains_seed_by_seed(tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "protocol": {"select_seed": 0, "seeds": [1, 2], "factors": [1], "extensions": 0},
        "lr_base": {"sgd": 0.1, "bm": 0.003},
        "run": {
            "model": "mlp",
            "model_options": {"widths": [16]},
            "data": "digits",
            "epochs": 1,
            "momentum": 0.9,
            "threads": 1,
        },
        "pairs": [["SGD", "BM"]],
        "train_sizes": [100, 200],
        "batch_sizes": [50],
        "claims": [{"claim": "c", "less": ["gain SGD->BM n200 b50", "gain SGD->BM n100 b50"]}],
    }
    result = liao_bm_sweep("liao-bm-tiny", config, tmp_path)
    assert {r["train_size"] for r in result.rows} == {100, 200}

    def report(entry: str) -> list[float]:
        rows = result.rows
        return [
            r["test_error"]
            for r in rows
            if r["entry"] == entry and r["train_size"] == 100 and r["stage"] == "report"
        ]

    gain = [100 * (a - b) for a, b in zip(report("SGD"), report("BM"), strict=True)]
    assert f"| SGD -> BM, n100 | {format_values(gain, 2)} |" in result.table
    assert result.figures[0].exists()
