"""np's cheaper paths (issue 18): the Rademacher table lookup gives the same numbers as
unpacking the bits one shift at a time, and the one-pass finiteness check of the fitted B still
stops a fit that blew up, naming the layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop
from asymprop.perturbation import rademacher_noise
from asymprop.train import DivergenceError


def _reference(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype):
    """Bit j of byte b of the 7 low bytes of each random int64 word is entry 8 b + j."""
    n = math.prod(shape)
    words = torch.empty(-(-n // 56), dtype=torch.int64).random_(generator=generator)
    entries = []
    for word in words.tolist():
        for byte in range(7):
            for bit in range(8):
                entries.append(1.0 if (word >> (8 * byte + bit)) & 1 else -1.0)
    return torch.tensor(entries[:n], dtype=dtype).view(shape)


@pytest.mark.parametrize("shape", [(1,), (55,), (56,), (57,), (3, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rademacher_lookup_equals_the_bits_unpacked_one_by_one(shape, dtype) -> None:
    got = rademacher_noise(shape, torch.Generator().manual_seed(7), torch.device("cpu"), dtype)
    want = _reference(shape, torch.Generator().manual_seed(7), dtype)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_fit_that_makes_b_non_finite_stops_the_step_naming_the_layer(bad: float) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = asymprop.convert(net, "np", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    asymprop.train_step(model, optimizer, F.cross_entropy, x, y)  # a healthy step passes
    with torch.no_grad():
        model[4].feedback_weight[1, 2] = bad  # as if the fit had blown up: it keeps it
    with pytest.raises(DivergenceError, match=r"non-finite in .*4"):
        asymprop.train_step(model, optimizer, F.cross_entropy, x, y)
