"""README.md tells the truth: CI runs its test command, and its quick start runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one() -> None:
    blocks = _bash_blocks()
    assert len(blocks) == 2, blocks
    install_and_run, install_and_test = blocks
    assert install_and_run.endswith("asymprop compare")
    assert "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci


def test_quick_start_runs() -> None:
    code = re.search(r"```python\n(.*?)```", README, re.S)
    assert code is not None
    lines = code.group(1).strip().splitlines()
    assert len(lines) <= 12  # "a 10-line quick start" (plus imports)
    exec(compile(code.group(1), "README.md", "exec"), {})
