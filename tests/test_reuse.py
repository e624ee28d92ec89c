"""``reproduce --reuse`` reads back a run only if the very same code made it (issue 15)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import asymprop
import asymprop.harness.experiment as experiment
import asymprop.harness.papers.common as common
from asymprop.harness.experiment import DataCache
from asymprop.harness.papers.common import classification_run
from asymprop.harness.records import code_identity, read_yaml

SETTINGS: dict[str, Any] = {
    "model": "mlp",
    "model_options": {"widths": [16]},
    "data": "digits",
    "train_size": 200,
    "test_size": 100,
    "epochs": 1,
    "batch_size": 50,
    "rule": "fa",
    "seed": 0,
    "threads": 1,
}


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    trained: list[str] = []
    real_train = common.train

    def counting_train(config: Any, **kwargs: Any) -> Any:
        trained.append(str(config.run_dir))
        return real_train(config, **kwargs)

    monkeypatch.setattr(common, "train", counting_train)
    return trained


def test_every_run_records_the_code_that_made_it(tmp_path: Path) -> None:
    classification_run(SETTINGS, tmp_path / "run", {})
    recorded = read_yaml(tmp_path / "run" / "code.yaml")
    assert recorded == code_identity()
    assert recorded["version"] == asymprop.__version__
    assert len(recorded["source_sha256"]) == 64


def test_reuse_reads_back_a_finished_run_and_only_that(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run of the same settings is read back, not trained again; a run with other
    settings, or one that did not reach its last epoch, is trained."""
    settings = {**SETTINGS, "lr": 0.05}
    cache: DataCache = {}
    first = classification_run(settings, tmp_path / "run", cache)
    trained = _counting(monkeypatch)
    again = classification_run(settings, tmp_path / "run", cache, reuse=True)
    assert trained == []
    assert [r.keys() for r in again] == [r.keys() for r in first]
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in first]
    classification_run({**settings, "lr": 0.01}, tmp_path / "run", cache, reuse=True)
    assert len(trained) == 1  # other settings: trained again, and overwrote the directory
    classification_run({**settings, "lr": 0.01}, tmp_path / "run", cache, reuse=False)
    assert len(trained) == 2  # without reuse: always trained
    (tmp_path / "run" / "metrics.csv").write_text(
        (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0] + "\n"
    )
    classification_run({**settings, "lr": 0.01}, tmp_path / "run", cache, reuse=True)
    assert len(trained) == 3  # unfinished: trained


def test_reuse_refuses_a_run_made_by_different_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache: DataCache = {}
    classification_run(SETTINGS, tmp_path / "run", cache)
    trained = _counting(monkeypatch)
    classification_run(SETTINGS, tmp_path / "run", cache, reuse=True)
    assert trained == []  # same settings, same code: read back
    other = {**code_identity(), "source_sha256": "0" * 64}  # as if a source file had changed
    monkeypatch.setattr(common, "code_identity", lambda: other)
    classification_run(SETTINGS, tmp_path / "run", cache, reuse=True)
    assert len(trained) == 1  # the same settings, other code: trained again
    monkeypatch.undo()
    trained = _counting(monkeypatch)
    (tmp_path / "run" / "code.yaml").unlink()  # a run from before code.yaml existed
    classification_run(SETTINGS, tmp_path / "run", cache, reuse=True)
    assert len(trained) == 1
    older = {**code_identity(), "version": "0.0.1"}  # another version, same source text
    (tmp_path / "run" / "code.yaml").write_text(
        f"version: {older['version']}\nsource_sha256: {older['source_sha256']}\n"
    )
    classification_run(SETTINGS, tmp_path / "run", cache, reuse=True)
    assert len(trained) == 2


def _identity_of(root: Path) -> dict[str, str]:
    script = (
        "import sys; from asymprop.harness.records import code_identity; "
        "import asymprop; assert asymprop.__file__.startswith(sys.argv[1]), asymprop.__file__; "
        "print(code_identity()['source_sha256'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(root)],
        env={"PYTHONPATH": str(root), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    return {"source_sha256": out.stdout.strip()}


def test_the_source_hash_follows_every_python_file_and_only_those(tmp_path: Path) -> None:
    package = Path(asymprop.__file__).parent
    shutil.copytree(package, tmp_path / "asymprop", ignore=shutil.ignore_patterns("__pycache__"))
    before = _identity_of(tmp_path)
    assert before["source_sha256"] == code_identity()["source_sha256"]  # a copy: the same code
    config = next((tmp_path / "asymprop" / "harness" / "configs").glob("*.yaml"))
    config.write_text(config.read_text() + "\n# a comment\n")
    assert _identity_of(tmp_path) == before  # configs are compared as settings, not as code
    deep = tmp_path / "asymprop" / "harness" / "papers" / "common.py"
    deep.write_text(deep.read_text() + "\n")
    assert _identity_of(tmp_path) != before


def test_a_run_resumed_by_other_code_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "code.yaml"
    experiment._write_code(path, None)
    assert read_yaml(path) == code_identity()
    experiment._write_code(path, 2)  # resumed by the same code: unchanged
    assert read_yaml(path) == code_identity()
    other = {"version": "9.9", "source_sha256": "f" * 64}
    monkeypatch.setattr(experiment, "code_identity", lambda: other)
    experiment._write_code(path, 3)
    recorded = read_yaml(path)
    assert {k: recorded[k] for k in other} == code_identity()  # the original stays first
    assert recorded["resumed"] == [{"epoch": 3, **other}]
    experiment._write_code(path, 4)  # the same other code again: nothing new
    assert read_yaml(path)["resumed"] == [{"epoch": 3, **other}]
    assert read_yaml(path) != code_identity()  # so --reuse will not take it


def test_a_resumed_run_without_code_yaml_is_not_credited_to_this_code(tmp_path: Path) -> None:
    path = tmp_path / "code.yaml"  # a run made before code.yaml existed, resumed now
    experiment._write_code(path, 2)
    recorded = read_yaml(path)
    assert recorded["version"] == "unknown" and recorded["source_sha256"] == "unknown"
    assert recorded["resumed"] == [{"epoch": 2, **code_identity()}]
    assert recorded != code_identity()  # --reuse will not take it
    path.write_text("{not yaml: [")  # unreadable: the same
    experiment._write_code(path, 3)
    assert read_yaml(path)["source_sha256"] == "unknown"
