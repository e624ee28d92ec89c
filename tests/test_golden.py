"""Golden values: every rule's first losses and angles on a fixed seed, against a stored file.

A change that moves any rule's numbers fails here; if the change is meant, regenerate with
``python tests/golden/regenerate.py`` and say why in the commit. float64 throughout, so the
figures hold to ~1e-9 across machines (BLAS order changes only the last bits).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

import asymprop

HERE = Path(__file__).with_name("golden")
spec = importlib.util.spec_from_file_location("golden_regenerate", HERE / "regenerate.py")
assert spec is not None and spec.loader is not None
regenerate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(regenerate)
STORED: dict[str, Any] = json.loads((HERE / "values.json").read_text())


def _close(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            _close(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{where}[{i}]")
    elif want == "nan":
        assert math.isnan(got), where
    else:
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9), (where, got, want)


def test_every_rule_has_golden_values() -> None:
    assert set(STORED) == set(asymprop.RULES)


@pytest.mark.parametrize("rule", sorted(asymprop.RULES))
def test_rule_reproduces_its_golden_values(rule: str) -> None:
    _close(regenerate.figures(rule), STORED[rule], rule)
