"""Checkpoints continue runs exactly (issue 9, must-show 1 and 2).

* A run of 2 epochs and a run of 1 epoch resumed for 1 more give identical ``metrics.csv`` rows
  (all but ``seconds``), weights, feedback weights, rule state and optimizer state, bit for bit,
  for bp, frsf, kp, wm and np; so does a run stopped by SIGINT in the middle of an epoch and
  resumed from that step's checkpoint.
* A ``python -m asymprop train`` process killed with SIGKILL at random moments always leaves a
  loadable checkpoint, and resuming completes the run with the rows and weights of a run never
  interrupted.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from asymprop.harness.checkpoint import TEMP_PREFIX, read_checkpoint, write_atomic
from asymprop.harness.experiment import (
    CHECKPOINT,
    ConfigError,
    Interrupted,
    RunConfig,
    load_checkpoint,
    prepare,
    resume_config,
    train,
)
from asymprop.harness.guard import StopSignals
from asymprop.harness.records import read_csv

RULES: dict[str, dict[str, Any]] = {
    "bp": {},
    "frsf": {"flip": 0.25},
    "kp": {},
    "wm": {"warmup_steps": 20},
    "np": {},
}


def tiny(out: Path, rule: str, **changes: Any) -> RunConfig:
    """About a second a run: 120 digits, batches of 16 (8 steps an epoch), a 16-unit layer.

    SGD with momentum and weight decay, so the optimizer has state that must be restored.
    """
    settings: dict[str, Any] = {
        "rule": rule,
        "rule_options": RULES.get(rule, {}),
        "model_options": {"widths": [16]},
        "train_size": 120,
        "batch_size": 16,
        "epochs": 2,
        "optimizer": "sgd",
        "lr": 0.05,
        "weight_decay": 1e-3,
        "align_batch_size": 32,
        "threads": 1,
        "out": str(out),
    }
    settings.update(changes)
    return RunConfig(**settings)


def without_seconds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_rows(a: Path, b: Path) -> None:
    rows_a, rows_b = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    assert [list(r) for r in rows_a] == [list(r) for r in rows_b]
    # repr-exact CSV cells: equal text means equal floats (NaN compared as text)
    assert str(without_seconds(rows_a)) == str(without_seconds(rows_b))


def assert_same_state(a: Path, b: Path) -> None:
    """Model (weights, B, buffers, feedback_state) and optimizer state, bit for bit."""
    sa = read_checkpoint(a / CHECKPOINT)
    sb = read_checkpoint(b / CHECKPOINT)
    assert sa["step"] == sb["step"] and sa["epoch"] == sb["epoch"]
    assert sa["model"].keys() == sb["model"].keys()
    for key, value in sa["model"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, sb["model"][key]), key
        else:
            assert value == sb["model"][key], key
    opt_a, opt_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for index, state in opt_a.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[index][key]))


def resume(out: Path, **changes: Any) -> list[dict[str, Any]]:
    config = resume_config(out, changes)
    run = prepare(config)
    load_checkpoint(run, out / CHECKPOINT)
    return train(config, run=run, plots=False)


class SignalAt:
    """A progress sink that sends this process ``signum`` after training step ``step``."""

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        self.step, self.signum, self.n = step, signum, 0

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)
        if self.n == self.step:
            os.kill(os.getpid(), self.signum)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted 2-epoch run of each rule."""
    root = tmp_path_factory.mktemp("full")
    outs = {}
    for rule in RULES:
        outs[rule] = root / rule
        train(tiny(outs[rule], rule), plots=False)
    return outs


@pytest.mark.parametrize("rule", list(RULES))
def test_one_epoch_plus_one_resumed_equals_two(
    rule: str, full_runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(tiny(out, rule, epochs=1), plots=False)
    resume(out, epochs=2)
    assert [r["epoch"] for r in read_csv(out / "metrics.csv")] == [0, 1, 2]
    assert_same_rows(full_runs[rule], out)
    assert_same_state(full_runs[rule], out)


@pytest.mark.parametrize("rule", list(RULES))
def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(
    rule: str, full_runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # step 11 is in the middle of epoch 2 (8 steps an epoch); SIGINT is caught after the step
    stopped = r"stopped by SIGINT after step 11 \(epoch 2\)"
    with pytest.raises(Interrupted, match=stopped), StopSignals() as stop:
        train(tiny(out, rule), progress=SignalAt(11), stop=stop, plots=False)
    state = read_checkpoint(out / CHECKPOINT)
    assert (state["epoch"], state["step"], state["batch"]) == (1, 11, 3)
    assert [r["epoch"] for r in read_csv(out / "metrics.csv")] == [0, 1]
    resume(out)
    assert_same_rows(full_runs[rule], out)
    assert_same_state(full_runs[rule], out)


def test_step_checkpoints_and_mirror_warmup_epoch_resume(tmp_path: Path) -> None:
    """Weight mirrors' pure-mirror first epoch, checkpoints every 3 steps, a stop inside the
    mirror epoch: resumed, the run equals the uninterrupted one."""
    changes = {"mirror_warmup_epochs": 1, "checkpoint_every_steps": 3, "epochs": 2}
    full = tmp_path / "full"
    rows = train(tiny(full, "wm", **changes), plots=False)
    assert [r["step"] for r in rows] == [0, 8, 16]
    assert str(rows[1]["train_loss"]) == "nan"  # mirror mode only: no engaged step
    state = read_checkpoint(full / CHECKPOINT)
    layer_state = state["model"]["1._extra_state"]
    assert layer_state["mirror_steps"] >= 8 + 8 and layer_state["warmed_up"]

    out = tmp_path / "run"
    with pytest.raises(Interrupted), StopSignals() as stop:
        train(tiny(out, "wm", **changes), progress=SignalAt(5), stop=stop, plots=False)
    assert read_checkpoint(out / CHECKPOINT)["step"] == 5
    resume(out)
    assert_same_rows(full, out)
    assert_same_state(full, out)


def test_lr_schedule_resumes_exactly(tmp_path: Path) -> None:
    schedule = {"warmup_epochs": 1.5, "milestones": [1.75], "gamma": 0.1}
    changes = {"lr_schedule": schedule, "optimizer": "nesterov", "epochs": 2}
    full = tmp_path / "full"
    train(tiny(full, "fa", **changes), plots=False)
    out = tmp_path / "run"
    with pytest.raises(Interrupted), StopSignals() as stop:
        train(tiny(out, "fa", **changes), progress=SignalAt(13), stop=stop, plots=False)
    resume(out)
    assert_same_rows(full, out)
    assert_same_state(full, out)
    # the schedule reached the last step: warm-up done, one decay
    lr = read_checkpoint(out / CHECKPOINT)["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.05 * 0.1)


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny(out, "fa", epochs=1), plots=False)
    with pytest.raises(ConfigError, match=r"lr cannot change when resuming.*may change: epochs"):
        resume_config(out, {"lr": 0.1})
    assert resume_config(out, {"epochs": 3, "threads": 2}).epochs == 3
    run = prepare(tiny(out, "fa", epochs=1, seed=3))
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        load_checkpoint(run, out / CHECKPOINT)


def test_atomic_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    write_atomic({"step": 1, "w": torch.ones(3)}, path)

    class Exploding:
        def __reduce__(self) -> Any:
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_atomic({"step": 2, "w": torch.zeros(3), "bad": Exploding()}, path)
    assert read_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))  # the temporary file was removed


# --- SIGKILL at random moments --------------------------------------------------------------------

KILL_ARGS = [
    "--rule", "kp", "--model-opt", "widths=[16]", "--train-size", "120", "--batch-size", "8",
    "--epochs", "16", "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "1e-3",
    "--checkpoint-every", "1", "align_batch_size=32", "threads=1", "--quiet",
]  # fmt: skip


def launch(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "asymprop", "train", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def checkpoint_step(out: Path) -> int | None:
    """The step of the run's checkpoint (it is replaced atomically: always a whole file)."""
    try:
        return int(torch.load(out / CHECKPOINT, weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def kill_at_random(
    process: subprocess.Popen[bytes], out: Path, rng: random.Random, before: int | None
) -> bool:
    """SIGKILL ``process`` at a random moment once it has made progress: after it wrote a
    checkpoint past step ``before`` plus 0-2 more steps (progress, not wall time, so the test
    means the same on any machine); False if it finished first."""
    target = (before or 0) + 1 + rng.randrange(3)
    deadline = time.monotonic() + 120
    while process.poll() is None:
        assert time.monotonic() < deadline, f"no checkpoint past step {target} within 120 s"
        step = checkpoint_step(out)
        if step is not None and step >= target:
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.003))  # anywhere in the next step or so, a write included
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)  # reaps it and closes its pipe
    return True


def assert_loadable(out: Path) -> int:
    """The run folder's checkpoint loads into a prepared run; returns its step."""
    run = prepare(resume_config(out))
    load_checkpoint(run, out / CHECKPOINT)
    rows = read_csv(out / "metrics.csv") if (out / "metrics.csv").exists() else []
    assert len(rows) <= len(run.rows)  # metrics.csv never runs ahead of the checkpoint
    return run.step


def reference_run(tmp_path: Path, epochs: int = 16) -> Path:
    """The run of ``KILL_ARGS`` never interrupted, in this process."""
    out = tmp_path / "reference"
    train(tiny(out, "kp", batch_size=8, epochs=epochs, checkpoint_every_steps=1), plots=False)
    return out


def test_sigkill_once_then_resume_completes_the_run(tmp_path: Path) -> None:
    """One subprocess killed at a random moment; resumed here (the fast version)."""
    out = tmp_path / "killed"
    process = launch([*KILL_ARGS, "--epochs", "4", "--out", str(out)])
    if kill_at_random(process, out, random.Random(1), None):
        assert_loadable(out)
        resume(out)
    else:  # it finished before the kill: nothing to resume
        assert process.returncode == 0
    reference = reference_run(tmp_path, epochs=4)
    assert_same_rows(reference, out)
    assert_same_state(reference, out)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_completes_the_run(tmp_path: Path) -> None:
    """Twenty kills of ``python -m asymprop train`` (the first run, then resumed ones), each at
    a random moment after the process made 1-3 steps of progress; a last ``--resume``
    finishes, equal to a run never killed."""
    rng = random.Random(2)
    out = tmp_path / "killed"
    process = launch([*KILL_ARGS, "--out", str(out)])
    steps: list[int] = []
    for _ in range(20):
        if not kill_at_random(process, out, rng, steps[-1] if steps else None):
            break
        steps.append(assert_loadable(out))
        process = launch(["--resume", str(out), "--quiet"])
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()
    assert len(steps) == 20 and steps == sorted(steps), steps  # every kill after progress
    reference = reference_run(tmp_path)
    assert_same_rows(reference, out)
    assert_same_state(reference, out)
