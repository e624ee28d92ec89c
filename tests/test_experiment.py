"""The run loop, comparisons and records at library level (end-to-end runs: test_cli.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import asymprop
from asymprop.harness.compare import (
    MAIN_JOB_RULE_OPTIONS,
    CompareConfig,
    compare_config,
    plan,
    report,
)
from asymprop.harness.config import CONFIGS
from asymprop.harness.experiment import (
    ConfigError,
    RunConfig,
    check_config,
    config_from_dict,
    evaluate,
    load_checkpoint,
    minibatches,
    prepare,
    train,
)
from asymprop.harness.records import (
    append_row,
    mean_se,
    read_csv,
    read_yaml,
    summarize,
    summary_table,
    write_csv,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny(tmp_path: Path, **changes: object) -> RunConfig:
    """A run of about a second: 200 digits, one hidden layer of 16, one epoch."""
    settings: dict[str, object] = {
        "rule": "fa",
        "model_options": {"widths": [16]},
        "train_size": 200,
        "epochs": 1,
        "align_batch_size": 64,
        "out": str(tmp_path / "run"),
    }
    settings.update(changes)
    return RunConfig(**settings)  # type: ignore[arg-type]


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, path


# --- settings -----------------------------------------------------------------------------------


def test_config_from_dict_names_unknown_keys_and_bad_types() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'epoch'.*valid settings: rule"):
        config_from_dict(RunConfig, {"epoch": 3})
    with pytest.raises(ConfigError, match=r"'epochs' must be an integer"):
        config_from_dict(RunConfig, {"epochs": 2.5})
    with pytest.raises(ConfigError, match=r"'download' must be true or false"):
        config_from_dict(RunConfig, {"download": "yes"})
    config = config_from_dict(RunConfig, {"lr": 1, "momentum": None, "train_size": 100})
    assert (config.lr, config.momentum, config.train_size) == (1, None, 100)


def test_compare_config_lists_from_scalars_and_commas() -> None:
    config = compare_config({"rules": "bp, fa", "seeds": 3, "epochs": 2})
    assert config.rules == ["bp", "fa"] and config.seeds == [3]
    assert config.settings["epochs"] == 2
    with pytest.raises(
        ConfigError, match=r"unknown setting 'rule' \(a comparison takes lists: rules"
    ):
        compare_config({"rule": "bp"})
    with pytest.raises(ConfigError, match=r"'lr' must be a number"):
        compare_config({"lr": "fast"})


def test_main_job_is_every_registered_rule_on_digits() -> None:
    config = CompareConfig()
    assert config.rule_names() == list(asymprop.RULES)
    assert (config.models, config.data, config.seeds) == (["mlp"], ["digits"], [0])
    # its per-rule options still exist (a renamed option would be dropped silently)
    assert config.rule_options == {
        k: v for k, v in MAIN_JOB_RULE_OPTIONS.items() if k in asymprop.RULES
    }
    for rule, options in config.rule_options.items():
        asymprop.make_rule(rule, **options)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rule": "zzz"}, r"unknown rule 'zzz'; valid: .*bp"),
        ({"model": "nope"}, r"unknown model 'nope'; valid: .*mlp"),
        ({"data": "nope"}, r"unknown data 'nope'; valid: .*digits"),
        ({"optimizer": "nope"}, r"unknown optimizer 'nope'; valid: sgd"),
        ({"lr": 0.0}, r"lr must be a finite number > 0"),
        ({"epochs": 0}, r"epochs must be >= 1"),
        ({"optimizer": "adam", "momentum": 0.9}, r"takes no momentum"),
        ({"device": "tpu9"}, r"unknown device"),
        ({"rule": "fa", "rule_options": {"gain": -1.0}}, r"gain"),
        ({"rule": "fa", "rule_options": {"nope": 1}}, r"no option 'nope'"),
    ],
)
def test_check_config_rejects_bad_settings(changes: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        check_config(RunConfig(**changes))  # type: ignore[arg-type]


def test_prepare_rejects_models_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"liao-mnist"):
        prepare(tiny(tmp_path, model="liao-mnist", model_options={}))
    with pytest.raises(ConfigError, match=r"batch_size 500 is larger than the 200"):
        prepare(tiny(tmp_path, batch_size=500))


# --- one run ------------------------------------------------------------------------------------


def test_checkpoint_restores_the_model(tmp_path: Path) -> None:
    config = tiny(tmp_path)
    train(config, plots=False)
    assert config_from_dict(RunConfig, read_yaml(tmp_path / "run" / "config.yaml")) == config
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "step", "batch", "config", "rng", "rows"} <= set(state)
    assert state["epoch"] == 1 and "1.feedback_weight" in state["model"]
    run = prepare(config)  # fresh weights
    load_checkpoint(run, tmp_path / "run" / "checkpoint.pt")
    metrics = read_csv(tmp_path / "run" / "metrics.csv")[-1]
    assert evaluate(run)["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)
    assert run.epoch == 1 and run.step == 7


def test_same_seed_same_metrics_and_evaluation_leaves_rng_alone(tmp_path: Path) -> None:
    first = train(tiny(tmp_path, out=str(tmp_path / "a")), plots=False)
    second = train(tiny(tmp_path, out=str(tmp_path / "b")), plots=False)
    for a, b in zip(first, second, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == pytest.approx(b, nan_ok=True)
    run = prepare(tiny(tmp_path))
    state = torch.get_rng_state()
    evaluate(run)
    assert torch.equal(state, torch.get_rng_state())


def test_data_order_depends_on_seed_and_epoch_only(tmp_path: Path) -> None:
    run = prepare(tiny(tmp_path))
    first = [labels for _, labels in minibatches(run, 3)]
    torch.manual_seed(123)  # the global stream does not matter
    again = [labels for _, labels in minibatches(run, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = torch.cat([labels for _, labels in minibatches(run, 4)])
    assert not torch.equal(torch.cat(first), other)
    assert sorted(other.tolist()) == sorted(torch.cat(first).tolist())  # a permutation


def test_reconstruction_task_has_loss_but_no_accuracy(tmp_path: Path) -> None:
    config = tiny(tmp_path, model="autoencoder", model_options={"hidden": 16})
    run = prepare(config)
    assert run.task == "reconstruction"
    assert float(run.dataset.train[0][0].min()) >= 0.0  # pixels in [0, 1] for the ReLU output
    rows = train(config, run=run)
    assert math.isnan(rows[-1]["test_accuracy"]) and rows[-1]["test_loss"] > 0
    out = tmp_path / "run"
    assert_png(out / "loss.png")
    assert not (out / "accuracy.png").exists()


def test_divergence_keeps_the_last_good_epoch(tmp_path: Path) -> None:
    config = tiny(tmp_path, rule="usf", optimizer="sgd", lr=1e30, epochs=3)
    with pytest.raises(asymprop.DivergenceError):
        train(config)
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert rows and rows[0]["epoch"] == 0
    assert (tmp_path / "run" / "checkpoint.pt").exists()


# --- comparisons --------------------------------------------------------------------------------


def small_comparison(tmp_path: Path, **changes: object) -> CompareConfig:
    settings: dict[str, object] = {
        "rules": ["bp", "fa"],
        "seeds": [0, 1],
        "model_options": {"mlp": {"widths": [16]}},
        "epochs": 1,
        "train_size": 200,
        "align_batch_size": 64,
        "out": str(tmp_path / "cmp"),
    }
    settings.update(changes)
    return compare_config(settings)


def test_plan_checks_every_run_before_training(tmp_path: Path) -> None:
    config = small_comparison(tmp_path, rules=["bp", "nope"])
    with pytest.raises(ConfigError, match="unknown rule 'nope'"):
        plan(config)
    config = small_comparison(tmp_path, rule_options={"nope": {"flip": 0.1}})
    with pytest.raises(ConfigError, match="rule_options names unknown rule 'nope'"):
        plan(config)
    runs = plan(small_comparison(tmp_path))
    assert [steps for _, steps in runs] == [7, 7, 7, 7]
    assert not (tmp_path / "cmp").exists()


def test_report_of_a_train_directory(tmp_path: Path) -> None:
    train(tiny(tmp_path), plots=False)
    table = report(tmp_path / "run")
    assert "| fa | 1 |" in table
    assert_png(tmp_path / "run" / "alignment.png")
    with pytest.raises(ConfigError, match=r"neither results\.csv"):
        report(tmp_path)


# --- records ------------------------------------------------------------------------------------


def test_mean_se_and_summary() -> None:
    assert mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1 / math.sqrt(3), 3))
    mean, se, n = mean_se([4.0, math.nan])
    assert (mean, n) == (4.0, 1) and math.isnan(se)
    rows = [
        {"rule": "fa", "status": "ok", "test_accuracy": 0.9},
        # a run that diverged in epoch 1 keeps its epoch-0 numbers: they are no result
        {"rule": "fa", "status": "diverged", "test_accuracy": 0.1, "failure": "at step 12 (x)"},
        {"rule": "bp", "status": "ok", "test_accuracy": 0.95},
    ]
    summary = summarize(rows, by=["rule"], metrics=["test_accuracy"])
    assert [s["rule"] for s in summary] == ["fa", "bp"]
    assert summary[0]["runs"] == 2 and summary[0]["failed"] == 1
    assert summary[0]["test_accuracy"] == 0.9 and summary[0]["test_accuracy_n"] == 1
    table = summary_table(summary, ["rule"])
    assert "| fa | 2 (1 diverged: at step 12 (x)) | 90.0 |" in table
    assert "| bp | 1 | 95.0 |" in table


def test_csv_round_trip_and_fixed_columns(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    write_csv(path, [{"a": 1, "b": 0.1}, {"a": 2, "c": "s"}], columns=["b"])
    assert read_csv(path)[0]["b"] == 0.1
    assert list(read_csv(path)[0]) == ["b", "a", "c"]
    assert math.isnan(read_csv(path)[0]["c"])
    append_row(path, {"a": 3})
    assert read_csv(path)[-1]["a"] == 3
    with pytest.raises(ValueError, match="not in its header"):
        append_row(path, {"d": 1})


def test_a_last_minibatch_of_one_is_dropped_for_batch_norm(tmp_path: Path) -> None:
    config = tiny(tmp_path, train_size=65, model_options={"widths": [8], "batchnorm": True})
    rows = train(config, plots=False)
    assert rows[-1]["step"] == 2  # 32 + 32, the 65th example left out this epoch


# --- the ImageNet recipes (issue 8) ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["imagenet-resnet18", "imagenet-resnet50"])
def test_imagenet_recipes_hold_the_paper_settings(name: str) -> None:
    """000 App. D.1-D.3: Nesterov 0.9, weight decay 1e-4, global batch 2048, 6 warm-up epochs
    (epochs 3-8 after 2 mirror-only epochs for WM), 10x decays after 32, 62, 82, SS at 0.5,
    WM eta_B 0.1 and lambda 0.5, batch norm after the activation."""
    path = CONFIGS / f"{name}.yaml"
    config = compare_config(read_yaml(path), str(path))
    assert config.rule_names() == ["bp", "fa", "usf", "wm", "kp"]
    model = name.split("-")[1]
    assert config.models == [model] and config.data == ["imagenet"]
    assert config.model_options[model] == {"bn_position": "after"}
    peak: dict[str, float] = {}
    for rule in config.rule_names():
        run = RunConfig(
            **{**config.settings, **config.rule_settings.get(rule, {})},
            rule=rule,
            rule_options=config.rule_options.get(rule, {}),
        )
        check_config(run, world_size=8)
        assert (run.optimizer, run.momentum, run.weight_decay) == ("nesterov", 0.9, 1e-4)
        assert (run.batch_size, run.amp) == (2048, "bf16")
        assert run.lr_reference_batch is not None
        peak[rule] = run.lr * run.batch_size / run.lr_reference_batch
        schedule = run.schedule()
        assert schedule is not None
        assert schedule.milestones == [32, 62, 82] and schedule.gamma == 0.1
        start = 2 if rule == "wm" else 0
        assert run.mirror_warmup_epochs == start
        assert schedule.factor(start, start + 3) == pytest.approx(0.5)  # half-way up the ramp
        assert schedule.factor(start + 5, start + 6) == 1.0
        assert schedule.factor(32, 32.01) == pytest.approx(0.1)  # first step of epoch 33
        assert schedule.factor(89, 90) == pytest.approx(1e-3)
    assert peak == {"bp": 0.8, "fa": 0.8, "usf": 0.5, "wm": 0.8, "kp": 0.8}
    wm = asymprop.make_rule("wm", **config.rule_options["wm"])
    assert (wm.hebbian_rate, wm.decay, wm.noise_std, wm.mirror_batch) == (0.1, 0.5, 1.0, 2048)


def test_lr_schedule_and_reference_batch_set_the_optimizer_lr(tmp_path: Path) -> None:
    schedule = {"warmup_epochs": 2, "milestones": [3], "gamma": 0.5}
    config = tiny(
        tmp_path, optimizer="sgd", lr=0.1, batch_size=50, lr_reference_batch=100,
        lr_schedule=schedule, epochs=4,
    )  # fmt: skip
    run = prepare(config)
    assert run.optimizer.param_groups[0]["initial_lr"] == 0.05
    seen: list[float] = []

    class Recorder:
        def update(self, n: float | None = 1) -> None:
            seen.append(run.optimizer.param_groups[0]["lr"])

        def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
            pass

    train(config, run=run, progress=Recorder(), plots=False)
    steps = run.steps_per_epoch()  # 200 / 50 = 4
    assert steps == 4 and len(seen) == 16
    assert seen[0] == pytest.approx(0.05 * 1 / 8)  # ramp over 8 steps, after the first step
    assert seen[7] == pytest.approx(0.05) and seen[8] == pytest.approx(0.05)
    assert seen[12] == pytest.approx(0.025)  # epoch 4 starts after the milestone 3


def test_bf16_autocast_trains_like_float32(tmp_path: Path) -> None:
    """amp: bf16 runs the forward pass in bfloat16 (the losses differ in the 4th digit) and
    keeps weights, feedback weights and optimizer state in float32."""
    full = train(tiny(tmp_path, rule="kp", out=str(tmp_path / "a")), plots=False)
    half = train(tiny(tmp_path, rule="kp", amp="bf16", out=str(tmp_path / "b")), plots=False)
    assert half[-1]["train_loss"] != full[-1]["train_loss"]
    assert half[-1]["train_loss"] == pytest.approx(full[-1]["train_loss"], abs=0.01)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v))


def test_main_job_gives_kp_weight_decay_unless_the_comparison_sets_it() -> None:
    """Kolen-Pollack's B - W shrinks only by weight decay: the main job gives kp 1e-2; a
    comparison that sets weight_decay (shared or for kp) keeps its own."""
    from asymprop.harness.compare import CompareConfig, compare_config

    assert CompareConfig().rule_settings == {"kp": {"weight_decay": 1e-2}}
    assert compare_config({"rules": ["kp"]}).rule_settings == {"kp": {"weight_decay": 1e-2}}
    assert compare_config({"weight_decay": 1e-4}).rule_settings == {}
    own = compare_config({"rule_settings": {"kp": {"weight_decay": 0.0, "lr": 0.01}}})
    assert own.rule_settings == {"kp": {"weight_decay": 0.0, "lr": 0.01}}
    other = compare_config({"rule_settings": {"usf": {"lr": 0.5}}})
    assert other.rule_settings == {"usf": {"lr": 0.5}, "kp": {"weight_decay": 1e-2}}
