"""Regenerate checkpoints-0.1.0.pt: converted models saved by asymprop 0.1.0 (commit 14197e2,
before the layer-kind interface), for tests/test_kinds.py's checkpoint-compatibility test.

    git worktree add /tmp/old 14197e2
    python tests/data/make_checkpoints_0_1_0.py tests/data/checkpoints-0.1.0.pt

Per rule: the state after two SGD steps, the batch, and the state after a third step.
"""

import copy
import sys

import torch
from torch import nn

sys.path.insert(0, "/tmp/old/src")
import asymprop

torch.set_num_threads(1)  # as the test suite (conftest.py): conv sums are ordered per thread count
out = {}
for rule in ["bp", "fa", "brsf", "frsf", "kp", "wm", "np", "dfa"]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    asymprop.convert(model, rule, seed=1)
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(2):
        asymprop.train_step(model, opt, nn.functional.cross_entropy, x, y)
    state = copy.deepcopy(model.state_dict())
    asymprop.train_step(model, opt, nn.functional.cross_entropy, x, y)
    out[rule] = {"state": state, "x": x, "y": y, "next": copy.deepcopy(model.state_dict())}
torch.save(out, sys.argv[1])
