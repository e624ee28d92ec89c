"""The reproduction suite (asymprop.harness.reproduce): the papers' robust qualitative claims at
small scale (fast), and the whole ``--quick`` suite end to end (slow)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from asymprop.harness.experiment import DataCache
from asymprop.harness.papers.common import classification_run
from asymprop.harness.papers.convergence import _kp_curve, _wm_curve
from asymprop.harness.records import read_csv
from asymprop.harness.reproduce import (
    ITEMS,
    item_config,
    layer_group,
    liao_entry,
    main,
    study,
    study_verdict,
    study_verdicts,
)

DIGITS: dict[str, Any] = {
    "model": "mlp",
    "model_options": {"widths": [64, 64]},
    "data": "digits",
    "epochs": 3,
    "batch_size": 32,
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 0.001,
    "threads": 1,
}


def test_liao_entry_names_map_to_settings() -> None:
    assert liao_entry("SGD") == {
        "rule": "bp",
        "rule_options": {},
        "batchnorm": False,
        "bn_affine": False,
        "optimizer": "sgd",
        "freeze": None,
    }
    bn_bm = liao_entry("BN+BM")
    assert bn_bm["batchnorm"] and bn_bm["bn_affine"] and bn_bm["optimizer"] == "bm1"
    usf = liao_entry("uSF+BN+BM3")
    assert usf["rule"] == "usf" and usf["batchnorm"] and not usf["bn_affine"]
    assert usf["optimizer"] == "bm3"
    assert liao_entry("frSF@75+BN+BM")["rule_options"] == {"flip": 0.75}
    assert liao_entry("RndF+BN+BM Bottom")["freeze"] == "bottom"
    with pytest.raises(ValueError, match="unknown token"):
        liao_entry("XYZ+BN")


def test_every_item_has_a_config_with_a_quick_section() -> None:
    for name in ITEMS:
        assert item_config(name, quick=True) != item_config(name, quick=False), name


def test_kp_gap_follows_the_geometric_law() -> None:
    """003 eq. 14: under plain SGD with decay lambda, W - B = (1 - lr lambda)^t (W_0 - B_0)."""
    config = {
        "kp": {
            "widths": [32],
            "lr": 0.05,
            "batch_size": 32,
            "steps": 30,
            "log_every": 10,
        }
    }
    from asymprop.harness.data import load_dataset

    x, y = load_dataset("digits").train.tensors  # type: ignore[attr-defined]
    curve = _kp_curve(config, 0.1, x, y)
    assert curve[-1]["step"] == 30
    for row in curve:
        assert row["measured"] == pytest.approx(row["theory"], rel=1e-4)


def test_wm_angle_reaches_the_predicted_plateau() -> None:
    """000 eq. 21: mirror mode takes B to k W, up to the finite-batch noise floor."""
    config = {"wm": {"widths": [32], "mirror_batch": 256, "steps": 30, "log_every": 10}}
    from asymprop.harness.data import load_dataset

    x, _ = load_dataset("digits").train.tensors  # type: ignore[attr-defined]
    curve = _wm_curve(config, {"eta_b": 1.0, "decay": 0.5}, x)
    assert curve[0]["measured"] > 60  # random B
    assert abs(curve[-1]["measured"] - curve[-1]["theory"]) < 8


def _delta_angle(rule: str, tmp_path: Path, cache: DataCache, **extra: Any) -> float:
    settings = {**DIGITS, **extra, "rule": rule, "seed": 0}
    rows = classification_run(settings, tmp_path / rule, cache)
    values = [v for k, v in rows[-1].items() if k.startswith("delta_angle_deg/")]
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite)


def test_kp_and_wm_deltas_stay_far_closer_to_backprop_than_fa(tmp_path: Path) -> None:
    """001 panels c-f: WM and KP keep the deltas near backprop's; FA's stay far."""
    cache: DataCache = {}
    fa = _delta_angle("fa", tmp_path, cache)
    kp = _delta_angle("kp", tmp_path, cache)
    wm = _delta_angle("wm", tmp_path, cache, rule_options={"mirror_batch": 256, "warmup_steps": 50})
    assert fa > 45
    assert kp < fa / 2 and wm < fa / 2, (fa, kp, wm)


def test_usf_bn_bm_keeps_up_with_sgd_and_clamping_stops_random_feedback(tmp_path: Path) -> None:
    """002 Tables 2 and 4: uSF+BN+BM within a few points of SGD on digits; with the last layer
    clamped at random, random feedback learns nothing useful, sign-concordant feedback does."""
    cache: DataCache = {}

    def error(entry: str, lr: float) -> float:
        spec = liao_entry(entry)
        settings = {
            **DIGITS,
            "rule": spec["rule"],
            "optimizer": spec["optimizer"],
            "lr": lr,
            "weight_decay": 0.0,
            "seed": 0,
            "model_options": {
                "widths": [64, 64],
                "batchnorm": spec["batchnorm"],
                "bn_affine": spec["bn_affine"],
            },
        }
        slug = entry.replace(" ", "-").replace("+", "_")
        rows = classification_run(settings, tmp_path / slug, cache, spec["freeze"])
        return 1 - float(rows[-1]["test_accuracy"])

    sgd = error("SGD", 0.05)
    usf = error("uSF+BN+BM", 0.003)
    assert usf < sgd + 0.05, (sgd, usf)
    assert error("uSF+BN+BM Bottom", 0.003) < 0.2
    assert error("RndF Bottom", 0.05) > 0.5


@pytest.mark.slow
def test_quick_suite_runs_every_item(tmp_path: Path) -> None:
    """``python -m asymprop.harness.reproduce --quick``: every item writes tables and figures."""
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ITEMS:
        directory = tmp_path / name
        assert (directory / "table.md").read_text().count("|") > 10
        assert (directory / "results.csv").exists()
        assert list(directory.glob("*.png"))


def test_cli_reproduce_names_the_valid_items(capsys: pytest.CaptureFixture[str]) -> None:
    from asymprop.harness.cli import main as cli_main

    assert cli_main(["reproduce", "no-such-item"]) == 2
    assert "liao-digits" in capsys.readouterr().err


def test_missing_dataset_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import asymprop.harness.reproduce as reproduce
    from asymprop.harness.data import DatasetNotFoundError

    def missing(*args: object, **kwargs: object) -> None:
        raise DatasetNotFoundError("dataset 'fashion-mnist' not found: looked for ...")

    monkeypatch.setattr(reproduce, "run_item", missing)
    monkeypatch.delenv("ASYMPROP_DATA", raising=False)
    code = reproduce.main(["--quick", "--only", "akrout-fashion-mnist", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "item 'akrout-fashion-mnist' needs 'fashion-mnist'" in err[0]
    assert "--data-dir DIR" in err[0] and "ASYMPROP_DATA" in err[0]
    # --data-dir is the documented ASYMPROP_DATA folder (restored after the test)
    monkeypatch.setenv("ASYMPROP_DATA", "unset")
    reproduce.main(["--quick", "--only", "akrout-fashion-mnist", "--data-dir", str(tmp_path)])
    assert reproduce.os.environ["ASYMPROP_DATA"] == str(tmp_path)


# --- beyond the seeds: the modern-architecture study ----------------------------------------------

STUDY_ITEMS = ["study-vit-fashion-mnist", "study-mnist1d-sequence"]


def test_study_verdict_holds_or_fails_by_its_bounds() -> None:
    bp = [0.20, 0.22]  # mean 21%
    assert study_verdict({"max_gap_pp": 3}, [0.22, 0.24], bp, 0.9) == (True, "gap 2.0 <= 3")
    assert study_verdict({"max_gap_pp": 3}, [0.25, 0.25], bp, 0.9) == (False, "gap 4.0 > 3")
    behind = {"claim": "learns, behind bp", "below_chance_pp": 40, "min_gap_pp": 1}
    assert study_verdict(behind, [0.30, 0.30], bp, 0.9)[0]
    assert study_verdict(behind, [0.215, 0.215], bp, 0.9) == (False, "gap 0.5 < 1")
    met, why = study_verdict(behind, [0.55, 0.55], bp, 0.9)
    assert not met and why == "35.0 below chance < 40"
    # a diverged run (NaN) counts as chance: (90 + 20) / 2 = 55%
    assert study_verdict({"max_gap_pp": 30}, [math.nan, 0.20], bp, 0.9) == (False, "gap 34.0 > 30")
    with pytest.raises(ValueError, match="needs one or more of max_gap_pp"):
        study_verdict({"claim": "keeps pace"}, [0.2], bp, 0.9)
    with pytest.raises(ValueError, match="unknown keys: max_gap"):
        study_verdict({"max_gap": 3}, [0.2], bp, 0.9)


def test_study_configs_state_a_criterion_for_every_rule_and_pin_dfa() -> None:
    """Every rule has a machine-readable criterion (written before the runs) and dfa's options
    are pinned, so the results do not depend on a default that may change."""
    for name in STUDY_ITEMS:
        config = item_config(name)
        assert set(config["criteria"]) == set(config["rules"])
        assert {"bp", "fa", "usf", "kp", "wm", "dfa", "np"} <= set(config["rules"])
        assert len(config["seeds"]) == 3
        for criterion in config["criteria"].values():
            study_verdict(criterion, [0.5], [0.5], 0.9)  # well formed
        assert config["rule_options"]["dfa"] == {"init": "uniform", "gain": 1.0, "scale": "input"}


def test_layer_groups_follow_the_module_paths() -> None:
    groups = {
        "encoder.layers.1.self_attn.in_proj": "attention",
        "encoder.layers.1.self_attn.out_proj": "attention",
        "encoder.layers.0.linear2": "transformer MLP",
        "rnn.hh_l0": "recurrent W_hh",
        "rnn.ih_l1_reverse": "recurrent W_ih",
        "embed": "embedding",
        "features.4": "conv",
        "classifier.3": "fully connected",
        "head": "head",
        "something.else": "other",
    }
    assert {name: layer_group(name) for name in groups} == groups


def test_study_items_run_quick_and_verdicts_follow_the_criteria(tmp_path: Path) -> None:
    """``--quick`` on both study items: tables, figures, one row per run; the verdicts in
    results.csv are the criteria applied to the runs' errors, and an impossible criterion on
    the same runs fails."""
    assert main(["--quick", "--only", *STUDY_ITEMS, "--out", str(tmp_path)]) == 0
    for name in STUDY_ITEMS:
        config = item_config(name, quick=True)
        directory = tmp_path / name
        rows = read_csv(directory / "results.csv")
        assert len(rows) == len(config["models"]) * len(config["rules"]) * len(config["seeds"])
        table = (directory / "table.md").read_text()
        assert "gap to bp (pp)" in table and "attention" in table and "delta angle" in table
        assert len(list(directory.glob(f"{name}-*.png"))) == 2
        for label in config["models"]:
            mine = [r for r in rows if r["model"] == label]
            verdicts = study_verdicts(config, mine, 0.9)
            assert {r["rule"]: r["criterion_met"] == "True" for r in mine} == {
                rule: met for rule, (met, _) in verdicts.items()
            }
            impossible = {**config, "criteria": {"fa": {"max_gap_pp": -100}}}
            assert study_verdicts(impossible, mine, 0.9) == {"fa": (False, _fail_text(mine))}


def _fail_text(rows: list[dict[str, Any]]) -> str:
    errors = {rule: [r["test_error"] for r in rows if r["rule"] == rule] for rule in ("fa", "bp")}
    gap = 100 * (sum(errors["fa"]) / len(errors["fa"]) - sum(errors["bp"]) / len(errors["bp"]))
    return f"gap {gap:.1f} > -100"


def test_study_writes_the_verdict_of_a_criterion_that_fails(tmp_path: Path) -> None:
    """The item itself applies the config's criteria: the same runs hold one and fail the other."""
    config = item_config("study-mnist1d-sequence", quick=True)
    config["rules"] = ["bp", "fa"]
    config["models"] = {"gru": config["models"]["gru"]}
    config["criteria"] = {"bp": {"below_chance_pp": -100}, "fa": {"below_chance_pp": 100}}
    result = study("study-mnist1d-sequence", config, tmp_path)
    assert {r["rule"]: r["criterion_met"] for r in result.rows} == {"bp": True, "fa": False}
    assert "| BP |" in result.table and "holds (" in result.table and "fails (" in result.table
