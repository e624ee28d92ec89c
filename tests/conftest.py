"""Shared fixtures: small deterministic models used across the suite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# The suite's models are tiny: one thread beats two (no sync overhead) and leaves the other core
# to a parallel worker.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class BasicBlock(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus a (strided, projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def small_resnet(num_classes: int = 5) -> nn.Module:
    """Stem, two residual blocks (one stride-2 with a grouped conv), pooling, classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8, 8),
        BasicBlock(8, 16, stride=2, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def small_mlp(num_classes: int = 5, width: int = 16, inputs: int = 12) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def small_cnn(num_classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def train_on_shares(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int, world: int
) -> None:
    """``asymprop.train_step`` with SGD (lr 0.1, momentum 0.9, weight decay 1e-3) over
    ``batches``, rank ``rank`` of ``world`` on its share of each global batch (one process:
    ``rank=0, world=1``): the data-parallel tests' loop, DDP's and FSDP's."""
    import torch.nn.functional as F

    import asymprop

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for x, y in batches:
        share = x.shape[0] // world
        part = slice(rank * share, (rank + 1) * share)
        asymprop.train_step(model, opt, F.cross_entropy, x[part], y[part])
