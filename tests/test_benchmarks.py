"""The benchmark suite runs (a smoke test: nothing here asserts anything about speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


def test_quick_run_prints_the_step_time_table(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    cmd = [sys.executable, str(BENCH), "--quick", "--no-profile-misses", "--out", str(out)]
    cmd += ["--biotorch-python", str(tmp_path / "no-such-python")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.strip() in done.stdout
    for row in ("| plain | ", "| fa | ", "| kp | "):
        assert row in text
    assert "BioTorch column skipped" in text  # absent BioTorch: a message, not a failure
    for section in ("## Memory", "## Kolen-Pollack", "## Targets missed"):
        assert section in text


def test_rule_specs_carry_options() -> None:
    sys.path.insert(0, str(BENCH.parent))
    try:
        import harness
    finally:
        sys.path.remove(str(BENCH.parent))
    assert harness.parse_spec("fa") == ("fa", {})
    assert harness.parse_spec("wm:schedule=alternate:mirror_steps=2") == (
        "wm",
        {"warmup_steps": 0, "schedule": "alternate", "mirror_steps": 2},
    )
