"""Learning works on real data: scikit-learn's bundled 8x8 digits (issue 2, must-show 6).

Measured on 2 cores (``pytest tests/test_learning.py -q --durations=0``): each run takes a few
seconds; the accuracies at these seeds are asserted with the issue's thresholds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from asymprop import alignment, convert, train_step
from asymprop.optim import make_optimizer


def _digits() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6  # constant border pixels have std 0
    to = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return to(x_tr), torch.tensor(y_tr), to(x_te), torch.tensor(y_te)


def _mlp(batchnorm: bool) -> nn.Module:
    def block(n_in: int, n_out: int) -> list[nn.Module]:
        # Liao's BN has no learnable scale/shift outside the plain "BN" entries
        norm = [nn.BatchNorm1d(n_out, affine=False)] if batchnorm else []
        return [nn.Linear(n_in, n_out), *norm, nn.ReLU()]

    return nn.Sequential(*block(64, 128), *block(128, 128), nn.Linear(128, 10))


CASES = {
    # rule: (batchnorm, optimizer, lr, threshold)
    "bp": (False, "sgd", 0.05, 0.95),
    "fa": (False, "sgd", 0.05, 0.90),
    "usf": (True, "sgd", 0.01, 0.90),
    "frsf": (True, "bm1", 0.001, 0.90),
}


@pytest.mark.parametrize("rule", list(CASES))
def test_mlp_learns_digits(rule: str) -> None:
    batchnorm, optimizer, lr, threshold = CASES[rule]
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = _digits()
    model = convert(_mlp(batchnorm), rule, seed=0)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _epoch in range(15):
        model.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(32):
            train_step(model, opt, F.cross_entropy, x_tr[idx], y_tr[idx])
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    assert accuracy >= threshold, f"{rule}: test accuracy {accuracy:.3f} < {threshold}"
    if rule != "bp":  # and it learned without being backprop
        assert any(s["angle_deg"] > 1 for s in alignment(model).values())
