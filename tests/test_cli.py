"""The ``asymprop`` command end to end: train, compare, report, configs, and bad input.

Runs are tiny (200 digits, a 16-unit hidden layer, one epoch) so the whole file stays fast.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import asymprop
from asymprop.harness.cli import main
from asymprop.harness.config import CONFIGS
from asymprop.harness.records import (
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    layer_columns,
    read_csv,
    read_yaml,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "1", "--train-size", "200", "align_batch_size=64", "--quiet"]
REPO = Path(__file__).resolve().parents[1]


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, path


def test_train_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["train", "--rule", "usf", "--model-opt", "widths=[16]", "--out", str(out), *TINY])
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    names = {"config.yaml", "metrics.csv", "checkpoint.pt", "accuracy.png", "loss.png"}
    assert names | {"alignment.png"} <= {p.name for p in out.iterdir()}

    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == [*METRIC_COLUMNS, *layer_columns(["1", "3"])]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[1]["step"] == 7 and 0 <= rows[1]["test_accuracy"] <= 1
    assert rows[1]["angle_deg/1"] < 90 and 0.5 < rows[1]["sign_concordance/1"] <= 1.0
    assert all(math.isfinite(rows[1][f"delta_angle_deg/{layer}"]) for layer in ("1", "3"))

    config = read_yaml(out / "config.yaml")
    assert (config["rule"], config["model_options"], config["epochs"]) == (
        "usf",
        {"widths": [16]},
        1,
    )
    for name in ("accuracy.png", "loss.png", "alignment.png"):
        assert_png(out / name)


def test_compare_every_rule_end_to_end_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--seeds", "0,1", "--model-opt", "widths=[16]", "--out", str(out)]
    assert main([*args, *TINY]) == 0
    printed = capsys.readouterr().out
    rules = list(asymprop.RULES)

    results = read_csv(out / "results.csv")
    assert list(results[0])[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS)
    assert {f"angle_deg/{layer}" for layer in ("1", "3")} <= set(results[0])
    assert [(r["rule"], r["seed"]) for r in results] == [(r, s) for r in rules for s in (0, 1)]
    assert all(r["status"] == "ok" and r["model"] == "mlp" for r in results)
    assert all(r["dataset"] == "digits" and r["epochs"] == 1 for r in results)
    bp = next(r for r in results if r["rule"] == "bp")
    assert bp["mean_angle_deg"] == 0.0 and bp["mean_delta_angle_deg"] == 0.0

    summary = (out / "summary.md").read_text()
    for rule in rules:  # every registered rule in the printed table and summary.md
        assert f"| {rule} | 2 |" in printed and f"| {rule} | 2 |" in summary
        assert (out / "runs" / f"{rule}-mlp-digits-seed1" / "metrics.csv").exists()
    assert "±" in printed  # two seeds give a standard error
    for name in ("accuracy.png", "loss.png", "alignment.png"):
        assert_png(out / name)
    assert compare_rules(out) == rules

    # report redraws the plots and summary from the files
    for name in ("accuracy.png", "alignment.png", "summary.md"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    table, said = capsys.readouterr().out.rsplit("wrote ", 1)
    assert table in printed and (out / "summary.md").read_text() == summary
    for name in ("accuracy.png", "alignment.png", "summary.png"):
        assert_png(out / name)
    # it names what it wrote: the figures and summary.md, not the runs' files
    written = "accuracy.png, alignment.png, loss.png, summary.md, summary.png"
    assert said.strip() == f"{out}: {written}"


def compare_rules(out: Path) -> list[str]:
    from asymprop.harness.compare import compare_config

    return compare_config(read_yaml(out / "config.yaml")).rule_names()


def test_config_file_flags_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    settings = {
        "rule": "brsf",
        "rule_options": {"flip": 0.5},
        "model_options": {"widths": [16]},
        "epochs": 3,
        "lr": 0.01,
        "train_size": 100,
    }
    path.write_text(yaml.safe_dump(settings))
    out = tmp_path / "run"
    args = ["train", "--config", str(path), "--epochs", "1", "--rule-opt", "flip=0.25"]
    assert main([*args, "--out", str(out), "-q", "lr=0.005", "optimizer=sgd"]) == 0
    saved = read_yaml(out / "config.yaml")
    assert saved["rule"] == "brsf" and saved["rule_options"] == {"flip": 0.25}
    assert (saved["epochs"], saved["lr"], saved["optimizer"]) == (1, 0.005, "sgd")
    assert saved["train_size"] == 100 and saved["model_options"] == {"widths": [16]}


def test_named_experiment_configs_parse() -> None:
    from asymprop.harness.compare import compare_config
    from asymprop.harness.experiment import RunConfig, check_config

    # the packaged configs also hold those of asymprop.harness.reproduce's items (tested there)
    try:
        from asymprop.harness.reproduce import ITEMS
    except ImportError:
        ITEMS = {}
    files = [p for p in sorted(CONFIGS.glob("*.yaml")) if p.stem not in ITEMS]
    assert any(p.stem == "digits-all-rules" for p in files)
    for path in files:
        config = compare_config(read_yaml(path), str(path))
        for rule in config.rule_names():
            for model in config.models:
                run = RunConfig(
                    **{**config.settings, **config.rule_settings.get(rule, {})},
                    rule=rule,
                    rule_options=config.rule_options.get(rule, {}),
                    model=model,
                    model_options=config.model_options.get(model, {}),
                    data=config.data[0],
                )
                check_config(run)


def test_compare_rule_opt_applies_to_rules_that_have_it(tmp_path: Path) -> None:
    from asymprop.harness.cli import _build_parser, _compare_config

    args = _build_parser().parse_args(
        ["compare", "--rules", "bp,brsf,frsf", "--rule-opt", "flip=0.25", "--rule-opt",
         "frsf.scale=norm", "--out", str(tmp_path)]
    )  # fmt: skip
    config = _compare_config(args)
    assert config.rule_options["brsf"] == {"flip": 0.25}
    assert config.rule_options["frsf"] == {"flip": 0.25, "scale": "norm"}
    assert "bp" not in config.rule_options


# --- bad input: one line on stderr, exit code 2, no traceback -----------------------------------


@pytest.fixture
def no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every dataset search folder at empty ones."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("ASYMPROP_DATA", str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty))
    return empty


BAD_INPUT = [
    (["train", "--rule", "zzz"], r"unknown rule 'zzz'; valid: .*bp.*fa"),
    (["train", "--model", "nope"], r"unknown model 'nope'; valid: .*mlp"),
    (["train", "--data", "nope"], r"unknown data 'nope'; valid: .*digits"),
    (["train", "--model", "liao-mnist"], r"model 'liao-mnist' does not fit input_shape"),
    (["train", "--model", "liao-large"], r"model 'liao-large' does not fit input_shape"),
    (["train", "--rule", "fa", "--rule-opt", "gain=-1"], r"'fa' option gain=-1"),
    (["train", "--rule", "fa", "--rule-opt", "nope=1"], r"no option 'nope'; valid options"),
    (["train", "--rule", "brsf", "--rule-opt", "flip=lots"], r"'flip' must be float"),
    (["train", "--rule-opt", "flip"], r"--rule-opt expects KEY=VALUE"),
    (["train", "--model-opt", "depth=3"], r"model 'mlp' has no option 'depth'"),
    (["train", "--lr", "-1"], r"lr must be a finite number > 0"),
    (["train", "--bogus"], r"unrecognized arguments: --bogus"),
    (
        ["train", "--config", "no-such-config"],
        r"config 'no-such-config' not found: looked for the file 'no-such-config', "
        r"'experiments/no-such-config.yaml' and the packaged .*; packaged configs: ",
    ),
    (["train", "epochs"], r"an override expects KEY=VALUE"),
    (["train", "epoch=3"], r"unknown setting 'epoch'"),
    (["train", "--strategy", "zero3"], r"unknown strategy 'zero3'; valid: ddp, fsdp"),
    (["compare", "--rules", "bp,nope"], r"unknown rule 'nope'"),
    (["compare", "--rules", "bp,fa", "--rule-opt", "flip=0.1"], r"no rule in this comparison"),
    (["compare", "--models", "mlp,liao-svhn"], r"model 'liao-svhn' does not fit"),
    (["report", "no-such-dir"], r"holds neither results\.csv"),
    # typos get "did you mean"
    (["train", "--model", "mpl"], r"unknown model 'mpl' \(did you mean 'mlp'\?\)"),
    (["train", "--data", "fashon-mnist"], r"\(did you mean 'fashion-mnist'\?\)"),
    (["train", "--optimizer", "adan"], r"\(did you mean 'adam'\?\)"),
    (["train", "lrr=0.1"], r"unknown setting 'lrr' \(did you mean 'lr'\?\)"),
    (["train", "--rule", "fa", "--rule-opt", "gian=2"], r"\(did you mean 'gain'\?\)"),
    (["compare", "--rules", "fa,kpp"], r"unknown rule 'kpp' \(did you mean 'kp'\?\)"),
    (["train", "--config", "digits-all-rule"], r"\(did you mean 'digits-all-rules'\?\)"),
]


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import re

    if args[0] in ("train", "compare"):
        args = [*args, "--out", str(tmp_path / "out"), "--quiet"]
    code, err = run_main(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()  # nothing ran


def test_missing_dataset_names_the_fix(no_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if Path("/usr/share/datasets/mnist").exists():
        pytest.skip("MNIST is installed on this machine")
    code, err = run_main(["train", "--data", "mnist", "--quiet"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "dataset 'mnist' not found" in err and "--download" in err and str(no_data) in err


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="installed")
def test_tensorboard_without_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(["train", "--tensorboard", "--quiet"], capsys)
    assert code == 2 and "pip install" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="not installed")
def test_tensorboard_logs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--model-opt", "widths=[16]", "--tensorboard", "--out", str(out), *TINY]
    assert main(args) == 0
    assert any((out / "tensorboard").iterdir())


def test_divergence_exits_3_and_keeps_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", "--rule", "usf", "--optimizer", "sgd", "--lr", "1e30", "--out", str(out)]
    code, err = run_main([*args, *TINY], capsys)
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "diverged" in err and "usf" in err
    assert (out / "checkpoint.pt").exists()


def test_console_entry_point_has_no_traceback() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "asymprop", "train", "--rule", "zzz"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"asymprop: error: unknown rule 'zzz'; valid: {', '.join(sorted(asymprop.RULES))}"
    ]


def test_train_runs_one_run_of_a_comparison_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``asymprop train --config <comparison> --rule R``: R's run, with its rule_options and
    rule_settings (as ``compare`` would run it)."""
    path = tmp_path / "cmp.yaml"
    settings = {
        "rules": ["bp", "brsf"],
        "rule_options": {"brsf": {"flip": 0.25}},
        "rule_settings": {"brsf": {"lr": 0.01}},
        "model_options": {"mlp": {"widths": [16]}},
        "out": str(tmp_path / "cmp"),
    }
    path.write_text(yaml.safe_dump(settings))
    code, err = run_main(["train", "--config", str(path), "--quiet"], capsys)
    assert code == 2 and "compares rules bp, brsf: pick one with --rule" in err
    args = ["train", "--config", str(path), "--rule", "brsf", "--quiet", *TINY[:4]]
    assert main(args) == 0
    saved = read_yaml(tmp_path / "cmp" / "runs" / "brsf-mlp-digits-seed0" / "config.yaml")
    assert (saved["rule"], saved["rule_options"], saved["lr"]) == ("brsf", {"flip": 0.25}, 0.01)
    assert (saved["model_options"], saved["epochs"]) == ({"widths": [16]}, 1)


def test_named_configs_are_packaged_and_found_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./experiments here: the packaged configs answer
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert f"packaged in {CONFIGS}" in listing
    assert "digits-all-rules" in listing and "imagenet-resnet18" in listing
    from asymprop.harness.config import find_config

    assert find_config("digits-all-rules") == CONFIGS / "digits-all-rules.yaml"
    own = tmp_path / "experiments" / "digits-all-rules.yaml"  # the user's own wins
    own.parent.mkdir()
    own.write_text("rules: [bp]\n")
    assert find_config("digits-all-rules") == Path("experiments/digits-all-rules.yaml")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        find_config("experiments")


def test_train_and_compare_share_the_main_jobs_model(tmp_path: Path) -> None:
    from asymprop.harness.compare import MAIN_JOB_MODEL_OPTIONS
    from asymprop.harness.records import read_yaml

    assert main(["train", "--out", str(tmp_path / "t"), *TINY]) == 0
    saved = read_yaml(tmp_path / "t" / "config.yaml")
    assert saved["model"] == "mlp"
    assert saved["model_options"] == {k: list(v) for k, v in MAIN_JOB_MODEL_OPTIONS["mlp"].items()}
    assert main(["train", "--out", str(tmp_path / "u"), "--model-opt", "widths=[8]", *TINY]) == 0
    assert read_yaml(tmp_path / "u" / "config.yaml")["model_options"] == {"widths": [8]}
