"""Runs that fail well (issue 9, must-show 3 and 4): divergence, signals, bad configs; and the
converted layers against torch on random shapes.

* A huge learning rate with ``usf`` and no batch norm stops with exit code 3, one line naming
  the rule, the step and a layer, and the last good checkpoint kept (loadable, finite).
* A NaN in a feedback weight is found by the scan and named; ``on_divergence: skip`` skips a
  step with a non-finite loss, rolls back to the last checkpoint on a non-finite weight, and
  lowers the learning rate each time.
* SIGTERM finishes the step, writes a checkpoint and exits 143; ``--resume`` completes the run.
* Hypothesis: random bad configs are all rejected with one line and exit code 2, before any
  file is written; random Linear/Conv2d layers converted by ``asymprop.convert`` compute
  torch's forward, and under ``bp`` torch's gradients.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import asymprop
from asymprop.harness.checkpoint import read_checkpoint
from asymprop.harness.cli import main
from asymprop.harness.experiment import (
    CHECKPOINT,
    RunConfig,
    RunDivergedError,
    minibatches,
    prepare,
    train,
)
from asymprop.harness.guard import first_nonfinite
from asymprop.harness.records import read_csv

TINY = ["--train-size", "120", "--model-opt", "widths=[16]", "align_batch_size=32", "threads=1"]


def tiny(out: Path, **changes: Any) -> RunConfig:
    settings_: dict[str, Any] = {
        "model_options": {"widths": [16]},
        "train_size": 120,
        "batch_size": 16,
        "epochs": 2,
        "optimizer": "sgd",
        "lr": 0.05,
        "align_batch_size": 32,
        "threads": 1,
        "out": str(out),
    }
    settings_.update(changes)
    return RunConfig(**settings_)


def assert_finite_checkpoint(out: Path) -> dict[str, Any]:
    state = read_checkpoint(out / CHECKPOINT)
    for key, value in state["model"].items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.isfinite(value).all(), key
    return state


# --- divergence ---------------------------------------------------------------------------------


def test_forced_divergence_exits_3_names_rule_step_layer_and_keeps_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", "--rule", "usf", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "2"]
    code = main([*args, *TINY, "--out", str(out), "--quiet", "check_every_steps=1"])
    err = capsys.readouterr().err
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    # usf's B = sign(W) is tens of times W without batch norm: step 1 with lr 1e30 sends the
    # weights to ~1e29 and the forward pass of step 2 overflows.
    assert re.search(r"rule 'usf' diverged at step 2 \(epoch 1\): loss is (nan|inf)", lines[0])
    assert re.search(r"in layer '(1|3)'", lines[0]), lines[0]
    assert f"the last good checkpoint is {out / CHECKPOINT} (step 0)" in lines[0]
    state = assert_finite_checkpoint(out)
    assert (state["epoch"], state["step"]) == (0, 0)
    assert [r["epoch"] for r in read_csv(out / "metrics.csv")] == [0]


class AtStep:
    """Progress sink calling ``action(run_step)`` once, after training step ``step``."""

    def __init__(self, step: int, action: Any) -> None:
        self.step, self.action, self.n = step, action, 0

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)
        if self.n == self.step:
            self.action()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass


def poison(run: Any, name: str) -> None:
    with torch.no_grad():
        dict(run.module.named_buffers(), **dict(run.module.named_parameters()))[name].fill_(
            math.nan
        )


def test_nan_feedback_is_named_and_the_previous_checkpoint_kept(tmp_path: Path) -> None:
    config = tiny(tmp_path / "run", rule="frsf", checkpoint_every_steps=2, check_every_steps=1)
    run = prepare(config)
    hook = AtStep(5, lambda: poison(run, "3.feedback_magnitude"))
    message = r"rule 'frsf' diverged at step 5 \(epoch 1\): feedback_magnitude of layer '3' is nan"
    with pytest.raises(RunDivergedError, match=message):
        train(config, run=run, progress=hook, plots=False)
    assert assert_finite_checkpoint(tmp_path / "run")["step"] == 4


def test_skip_mode_skips_a_non_finite_loss_and_lowers_the_lr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt training example (inf pixels): the steps whose batch holds it are skipped."""
    config = tiny(tmp_path / "run", rule="fa", on_divergence="skip", lr_backoff=0.25)
    run = prepare(config)
    run.dataset.train.tensors[0][17] = math.inf  # type: ignore[attr-defined]
    bad_steps = [
        epoch_steps * (epoch - 1) + i + 1
        for epoch in (1, 2)
        for i, (x, _) in enumerate(minibatches(run, epoch))
        if not torch.isfinite(x).all()
        for epoch_steps in [run.steps_per_epoch()]
    ]
    assert len(bad_steps) == 2
    with caplog.at_level(logging.WARNING, logger="asymprop.harness.experiment"):
        rows = train(config, run=run, plots=False)
    for step, scale in zip(bad_steps, ("0.25", "0.0625"), strict=True):
        skipped = (
            f"step {step}: loss is nan; step skipped (rule fa); learning rate scaled by {scale}"
        )
        assert skipped in caplog.text
    assert run.lr_scale == 0.25**2 and run.divergence_skips == 2
    assert [r["step"] for r in rows] == [0, 8, 16]
    assert all(math.isfinite(r["train_loss"]) for r in rows[1:])  # the mean of the finite steps
    assert first_nonfinite(run.module) is None
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25**2)


def test_skip_mode_rolls_back_a_non_finite_weight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny(
        tmp_path / "run", rule="kp", on_divergence="skip", checkpoint_every_steps=4,
        check_every_steps=1,
    )  # fmt: skip
    run = prepare(config)
    hook = AtStep(6, lambda: poison(run, "1.feedback_weight"))
    with caplog.at_level(logging.WARNING, logger="asymprop.harness.experiment"):
        rows = train(config, run=run, progress=hook, plots=False)
    assert (
        "after step 6: feedback_weight of layer '1' is nan; back to the checkpoint of step 4"
        in (caplog.text)
    )
    assert run.lr_scale == 0.5 and first_nonfinite(run.module) is None
    assert [r["step"] for r in rows] == [0, 8, 16]
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "metrics.csv")] == [0, 1, 2]


def test_skip_mode_recovers_from_a_huge_lr_by_rolling_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """usf with lr 1e30: step 1 blows the weights up, steps 2 and 3 have a NaN loss, so the run
    goes back to the checkpoint of step 0 with lr 1e30 * 1e-28 = 100, and trains."""
    config = tiny(tmp_path / "run", rule="usf", lr=1e30, on_divergence="skip", lr_backoff=1e-28)
    with caplog.at_level(logging.WARNING, logger="asymprop.harness.experiment"):
        rows = train(config, plots=False)
    assert "step 2: loss is nan; step skipped" in caplog.text
    assert "steps 2 and 3: loss is nan; back to the checkpoint of step 0" in caplog.text
    state = assert_finite_checkpoint(tmp_path / "run")
    assert state["lr_scale"] == pytest.approx(1e-56) and state["divergence_skips"] == 2
    assert [r["epoch"] for r in rows] == [0, 1, 2] and math.isfinite(rows[-1]["test_loss"])


def test_skip_mode_gives_up_after_max_divergence_skips(tmp_path: Path) -> None:
    config = tiny(
        tmp_path / "run", rule="usf", lr=1e30, on_divergence="skip", max_divergence_skips=3
    )
    with pytest.raises(RunDivergedError, match=r"rule 'usf' diverged at step \d+ \(epoch 1\)"):
        train(config, plots=False)
    assert assert_finite_checkpoint(tmp_path / "run")["step"] == 0


# --- signals ------------------------------------------------------------------------------------


def test_sigterm_checkpoints_exits_143_and_resume_completes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"

    def send_sigterm_after_first_step_checkpoint() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (out / CHECKPOINT).exists() and read_checkpoint(out / CHECKPOINT)["step"] > 0:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    sender = threading.Thread(target=send_sigterm_after_first_step_checkpoint)
    sender.start()
    args = [
        "train",
        "--rule",
        "kp",
        "--batch-size",
        "4",
        "--epochs",
        "30",
        "--checkpoint-every",
        "3",
    ]
    code = main([*args, *TINY, "--out", str(out), "--quiet"])
    sender.join()
    err = capsys.readouterr().err.strip()
    assert code == 143, err
    match = re.fullmatch(
        r"asymprop: stopped by SIGTERM after step (\d+) \(epoch (\d+)\); checkpoint written to "
        + re.escape(f"{out / CHECKPOINT}; continue with: asymprop train --resume {out}"),
        err,
    )
    assert match, err
    assert read_checkpoint(out / CHECKPOINT)["step"] == int(match.group(1))
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    rows = read_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


# --- bad configs: one line, exit 2, nothing written ----------------------------------------------

NAN = float("nan")
BAD: dict[str, list[Any]] = {
    "rule": ["nope", 3, None],
    "model": ["nope", 1.5],
    "data": ["nope", []],
    "epochs": [0, -1, 2.5, "x", None, True],
    "batch_size": [0, -3, 10**6, "big", 1.0],
    "lr": [0, -1e-3, NAN, float("inf"), "fast", None],
    "momentum": [1.0, -0.1, 2, "x"],
    "weight_decay": [-1e-4, NAN, "x"],
    "optimizer": ["sgdd", 5],
    "seed": [-1, 1.5, "x"],
    "train_size": [0, -5, 10**7, "x"],
    "align_batch_size": [0, "x"],
    "threads": [0, -2, "x"],
    "workers": [-1, "x"],
    "device": ["tpu9", "cuda:7", 3],
    "amp": ["fp8", "fp16", 16],
    "task": ["regression"],
    "lr_reference_batch": [0, -256, "x"],
    "lr_schedule": [
        {"warmup_epochs": -1}, {"gamma": 0}, {"gamma": 2}, {"milestones": [30, 10]},
        {"bogus": 1}, {"warmup_start_factor": 1.5}, {"milestones": ["x"]}, "fast", [1],
    ],
    "mirror_warmup_epochs": [-1, "x"],
    "checkpoint_every_steps": [0, -10, "x"],
    "check_every_steps": [0, "x"],
    "on_divergence": ["ignore", 1],
    "lr_backoff": [0, 1, 1.5, -0.5, NAN],
    "max_divergence_skips": [-1, "x"],
    "model_options": [
        {"widths": [-3]}, {"widths": "abc"}, {"depth": 3}, {"activation": "nope"}, "x",
    ],
    "rule_options": ["x", [1]],
    "tensorboard": ["yes"],
    "normalize": ["no"],
    "download": ["yes"],
    "epoch": [3],  # not a setting
}  # fmt: skip
BAD_RULE_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("brsf", {"flip": 1.5}), ("frsf", {"flip": -0.1}), ("frsf", {"flip": NAN}),
    ("wm", {"noise_std": 0.0}), ("wm", {"noise_std": -1.0}), ("wm", {"decay": 0.0}),
    ("wm", {"decay": 1.5}), ("wm", {"mirror_batch": 1}), ("fa", {"gain": 0.0}),
    ("kp", {"gain": -1.0}), ("rndf", {"std": 0.0}), ("np", {"noise_std": 0.0}),
    ("np", {"lr_b": -1.0}), ("fa", {"init": "gaussian"}), ("usf", {"scale": "max"}),
    ("bp", {"flip": 0.1}), ("matched", {"lr_b": -0.1}),
    ("bp", {}, ),  # with mirror_warmup_epochs: only for weight mirrors
]  # fmt: skip


def bad_setting() -> st.SearchStrategy[dict[str, Any]]:
    plain = st.sampled_from(sorted(BAD)).flatmap(
        lambda key: st.sampled_from(BAD[key]).map(lambda value: {key: value})
    )
    rules = st.sampled_from(BAD_RULE_OPTIONS).map(
        lambda pair: (
            {"rule": pair[0], "rule_options": pair[1]}
            if pair[1]
            else {"rule": pair[0], "mirror_warmup_epochs": 1}
        )
    )
    every_option = st.sampled_from(sorted(asymprop.RULES)).map(  # a list fits no option
        lambda rule: {"rule": rule, "rule_options": {"unknown_option": 1}}
    )
    return st.one_of(plain, rules, every_option)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bad=st.lists(bad_setting(), min_size=1, max_size=3))
def test_random_bad_configs_are_one_line_exit_2(
    bad: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings_: dict[str, Any] = {"epochs": 1, "train_size": 120}
    for part in bad:
        settings_.update(part)
    out = tmp_path / f"out-{abs(hash(str(settings_)))}"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(settings_))
    capsys.readouterr()
    code = main(["train", "--config", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (settings_, err)
    assert len(lines) == 1 and lines[0].startswith("asymprop: error: "), err
    assert "Traceback" not in err
    assert not out.exists()  # rejected before any work


def test_bad_resume_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"asymprop: error: no checkpoint at {tmp_path / CHECKPOINT}: nothing to resume"
    )
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a checkpoint (not a complete torch.save file" in err
    assert len(err.splitlines()) == 1 and "weights_only" not in err


# --- converted layers equal torch's on random shapes ---------------------------------------------

DTYPES = {"float32": (torch.float32, 1e-5), "float64": (torch.float64, 1e-12)}


@st.composite
def linear_case(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...]]:
    layer = nn.Linear(draw(st.integers(1, 9)), draw(st.integers(1, 9)), bias=draw(st.booleans()))
    leading = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))  # 2-D, 3-D, 4-D inputs
    return layer, (*leading, layer.in_features)


@st.composite
def conv_case(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...]]:
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    same = draw(st.booleans())
    stride = (1, 1) if same else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding: Any = "same" if same else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    if draw(st.booleans()) and not same:
        padding = "valid"
    # input big enough for the kernel, and for reflect padding (pad < size)
    reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    size = [draw(st.integers(r + 2, r + 6)) for r in reach]
    layer = nn.Conv2d(
        cin, cout, kernel, stride, padding, dilation, groups, draw(st.booleans()), mode
    )
    return layer, (draw(st.integers(1, 3)), cin, *size)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's
@settings(max_examples=80, deadline=None)
@given(case=st.one_of(linear_case(), conv_case()), dtype=st.sampled_from(sorted(DTYPES)))
def test_converted_layers_match_torch(case: tuple[nn.Module, tuple[int, ...]], dtype: str) -> None:
    """Forward equals torch's for every rule path; under ``bp`` the gradients equal torch's bit
    for bit, and through the feedback op (``fa`` with B set to W) up to rounding."""
    reference, shape = case
    kind, tol = DTYPES[dtype]
    reference = reference.to(kind)
    x = torch.randn(shape, dtype=kind)
    grad_out = torch.randn_like(reference(x))

    def grads(layer: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        params = [layer.weight, layer.bias] if layer.bias is not None else [layer.weight]
        got = torch.autograd.grad(out, [xi, *params], grad_out)
        return out.detach(), list(got[1:]), got[0]

    expected_out, expected_params, expected_x = grads(reference)
    import copy

    exact = asymprop.convert(copy.deepcopy(reference), "bp")
    out, params, gx = grads(exact)
    assert torch.equal(out, expected_out) and torch.equal(gx, expected_x)
    for got, want in zip(params, expected_params, strict=True):
        assert got is not None and want is not None and torch.equal(got, want)

    feedback = asymprop.convert(copy.deepcopy(reference), "fa", seed=0)
    with torch.no_grad():
        feedback.feedback_weight.copy_(feedback.weight)  # B = W: the feedback op is backprop
    out, params, gx = grads(feedback)
    torch.testing.assert_close(out, expected_out, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, expected_x, rtol=tol, atol=tol)
    for got, want in zip(params, expected_params, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_a_run_at_chance_level_is_reported_as_stalled() -> None:
    from asymprop.harness.guard import STALL_EPOCHS, stalled

    def rows(accuracies: list[float]) -> list[dict[str, float]]:
        return [
            {"epoch": e, "test_accuracy": a, "train_loss": 2.3} for e, a in enumerate(accuracies)
        ]

    assert stalled(rows([0.1] * STALL_EPOCHS), 10) is None  # epoch 0 (untrained) does not count
    note = stalled(rows([0.1, 0.09, 0.11, 0.1]), 10)
    assert note is not None and "stopped learning" in note and "chance 10.0%" in note
    assert stalled(rows([0.1, 0.09, 0.11, 0.4]), 10) is None  # it learns again
    assert stalled(rows([0.5, 0.5, 0.51, 0.5]), 2) is not None  # binary: chance is 50%
    assert stalled(rows([float("nan")] * 5), 10) is None  # regression: no accuracy
