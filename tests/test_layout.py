"""The boundary between the core and the harness (STYLE.md): the core imports no harness."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "src" / "asymprop"
HEAVY = ("matplotlib", "yaml", "tqdm", "pandas", "sklearn", "scipy", "mnist1d")


def test_import_asymprop_loads_no_harness_and_no_plotting_or_yaml() -> None:
    """``import asymprop`` adds none of the harness's modules nor its libraries to what
    ``import torch`` already loads (torch itself imports tqdm)."""
    code = (
        "import sys, json, torch; before = set(sys.modules); import asymprop; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    added = json.loads(subprocess.run([sys.executable, "-c", code], check=True,
                                      capture_output=True, text=True).stdout)  # fmt: skip
    assert not [m for m in added if m.split(".")[0] in HEAVY], added
    assert not [m for m in added if m.startswith("asymprop.harness")], added
    assert "asymprop.attention" in added  # the layer kinds register on import


def test_core_modules_never_import_the_harness() -> None:
    """Statically: no module of the flat core names ``harness`` in an import (``__main__``,
    ``python -m asymprop``, is the command line's entry point)."""
    for path in sorted(CORE.glob("*.py")):
        if path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert "harness" not in (node.module or ""), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                assert not any("harness" in n for n in names), f"{path.name} imports {names}"
