"""``torchrun --nproc_per_node=2 -m asymprop train`` on CPU (gloo): issue 8's command line.

Two processes split each global minibatch of 16 digits in halves. Rank 0 alone writes the run
directory (every write into it is logged per rank by a ``sitecustomize`` hook) and prints; the
``metrics.csv`` rows and the weights equal those of a one-process run on the same global batches
up to float rounding (DDP averages the halves' gradients; the test metrics are sums over the
two halves of the test set).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from asymprop.harness.checkpoint import read_checkpoint
from asymprop.harness.experiment import CHECKPOINT, RunConfig, train
from asymprop.harness.records import read_csv

WORLD = 2
ARGS = [
    "--model-opt", "widths=[16]", "--train-size", "128", "--batch-size", "16", "--epochs", "1",
    "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "1e-3", "--device", "cpu",
    "--checkpoint-every", "3", "align_batch_size=32", "threads=1", "--quiet",
]  # fmt: skip

# Logs every file this process opens for writing, creates or renames inside $WATCH_DIR, to
# $WRITES_DIR/rank<RANK>.txt.
SITECUSTOMIZE = textwrap.dedent(
    """
    import builtins, io, os

    _watch = os.path.realpath(os.environ["WATCH_DIR"])
    _log = os.path.join(os.environ["WRITES_DIR"], "rank" + os.environ.get("RANK", "0") + ".txt")
    _open, _os_open, _replace = builtins.open, os.open, os.replace

    def _note(path):
        try:
            real = os.path.realpath(os.fspath(path))
        except TypeError:
            return
        if real.startswith(_watch):
            with _open(_log, "a") as f:
                f.write(real + "\\n")

    def open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _note(file)
        return _open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            _note(path)
        return _os_open(path, flags, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        _note(dst)
        return _replace(src, dst, *args, **kwargs)

    builtins.open = io.open = open
    os.open, os.replace = os_open, replace
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(tmp_path: Path, args: list[str], watch: Path) -> subprocess.CompletedProcess[str]:
    hooks, writes = tmp_path / "hooks", tmp_path / "writes"
    hooks.mkdir(exist_ok=True)
    writes.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
        "WATCH_DIR": str(watch),
        "WRITES_DIR": str(writes),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        f"--master_port={free_port()}", "-m", "asymprop", *args,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def writes_by_rank(tmp_path: Path) -> dict[int, set[str]]:
    found = {}
    for rank in range(WORLD):
        log = tmp_path / "writes" / f"rank{rank}.txt"
        found[rank] = set(log.read_text().split()) if log.exists() else set()
    return found


def one_process(out: Path, rule: str, **changes: Any) -> Path:
    settings: dict[str, Any] = {
        "rule": rule, "model_options": {"widths": [16]}, "train_size": 128, "batch_size": 16,
        "epochs": 1, "optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-3, "device": "cpu",
        "checkpoint_every_steps": 3, "align_batch_size": 32, "threads": 1, "out": str(out),
    }  # fmt: skip
    settings.update(changes)
    train(RunConfig(**settings), plots=False)
    return out


def assert_close_runs(ddp: Path, single: Path) -> None:
    rows, reference = read_csv(ddp / "metrics.csv"), read_csv(single / "metrics.csv")
    assert [list(r) for r in rows] == [list(r) for r in reference]
    for row, ref in zip(rows, reference, strict=True):
        assert row["step"] == ref["step"]
        for key, value in row.items():
            if key not in ("epoch", "step", "seconds"):
                assert value == pytest.approx(ref[key], rel=1e-5, abs=1e-6, nan_ok=True), key
    a, b = read_checkpoint(ddp / CHECKPOINT), read_checkpoint(single / CHECKPOINT)
    assert (a["epoch"], a["step"], a["batch"]) == (b["epoch"], b["step"], b["batch"])
    for key, value in a["model"].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, b["model"][key], rtol=1e-5, atol=1e-6, msg=key)


# kp in the fast tier: its B is a Parameter whose gradient DDP must all-reduce with W's.
@pytest.mark.parametrize("rule", [pytest.param("bp", marks=pytest.mark.slow), "kp"])
def test_torchrun_two_processes_equal_one_on_the_global_batch(rule: str, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done = torchrun(tmp_path, ["train", "--rule", rule, "--out", str(out), *ARGS], out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"wrote {out}:") == 1  # rank 0 alone prints
    names = {"config.yaml", "metrics.csv", "checkpoint.pt", "loss.png", "accuracy.png"}
    assert names <= {p.name for p in out.iterdir()}

    writes = writes_by_rank(tmp_path)
    assert writes[1] == set(), writes[1]  # rank 1 wrote nothing into the run directory
    written = {Path(p).name for p in writes[0]}
    assert {"config.yaml", "metrics.csv", "checkpoint.pt", "loss.png"} <= written

    single = one_process(tmp_path / "single", rule)
    assert [r["step"] for r in read_csv(out / "metrics.csv")] == [0, 8]  # 128 / 16 global steps
    assert_close_runs(out, single)


@pytest.mark.slow
def test_torchrun_resume_continues_the_run(tmp_path: Path) -> None:
    """One epoch under torchrun, then ``--resume --epochs 2`` under torchrun: the result equals
    a 2-epoch one-process run (up to float rounding)."""
    out = tmp_path / "ddp"
    first = torchrun(tmp_path, ["train", "--rule", "kp", "--out", str(out), *ARGS], out)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(tmp_path, ["train", "--resume", str(out), "--epochs", "2", "-q"], out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert writes_by_rank(tmp_path)[1] == set()
    single = one_process(tmp_path / "single", "kp", epochs=2)
    assert [r["epoch"] for r in read_csv(out / "metrics.csv")] == [0, 1, 2]
    assert_close_runs(out, single)
