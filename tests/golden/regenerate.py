"""Regenerate tests/golden/values.json: a few losses and angles per rule on a fixed seed.

Run after a change that is *meant* to alter a rule's numbers, and say why in the commit:

    python tests/golden/regenerate.py

tests/test_golden.py recomputes the same figures and compares them with this file, so a change
that moves any rule's training trajectory without meaning to is caught.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import asymprop

PATH = Path(__file__).with_name("values.json")
STEPS = 5


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3))


def figures(rule: str) -> dict[str, Any]:
    """Losses of ``STEPS`` training steps (float64, SGD with momentum) and the final angles."""
    torch.manual_seed(0)
    model = asymprop.convert(_net().double(), rule, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 16, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, 16), generator=gen)
    losses = [
        asymprop.train_step(model, optimizer, F.cross_entropy, x[i], y[i]) for i in range(STEPS)
    ]
    angles = {name: stats["angle_deg"] for name, stats in asymprop.alignment(model).items()}
    deltas = asymprop.delta_alignment(model, F.cross_entropy, x[0], y[0])
    return {"losses": losses, "angle_deg": angles, "delta_angle_deg": deltas}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def main() -> int:
    torch.set_num_threads(1)
    values = {rule: _jsonable(figures(rule)) for rule in sorted(asymprop.RULES)}
    PATH.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PATH} ({len(values)} rules, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
