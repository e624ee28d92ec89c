"""Tests for asymprop.optim: Batch Manhattan against a NumPy oracle of the paper's equations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from asymprop.optim import OPTIMIZERS, BatchManhattan, make_optimizer

LR, MOMENTUM, DECAY = 0.05, 0.7, 0.13
N_STEPS = 8


def _problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares 0.5 * ||X w - y||^2 with zero columns in X, so some gradients are exactly 0.

    Returns X (batch=6, features=5), y (6,), w0 (5,); w0[4] = 0 and X[:, 4] = 0, so entry 4 has
    g = 0 and w = 0 at every step: tau stays exactly 0 (sign(0) = 0) in every setting.
    """
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 5))
    X[:, 3] = 0.0  # g_3 = 0 always, but w_3 != 0: only momentum and decay move it
    X[:, 4] = 0.0
    y = rng.standard_normal(6)
    w0 = rng.standard_normal(5)
    w0[4] = 0.0
    return X, y, w0


def _oracle(setting: int, X: np.ndarray, y: np.ndarray, w0: np.ndarray) -> list[np.ndarray]:
    """The paper's recurrences written out in float64 NumPy; returns w(1), ..., w(N_STEPS)."""
    w = w0.copy()
    tau = np.zeros_like(w)  # tau(-1)
    kappa = np.zeros_like(w)  # kappa(-1)
    out = []
    for _ in range(N_STEPS):
        g = X.T @ (X @ w - y)  # (features,)
        if setting == 1:
            tau = -np.sign(g) + MOMENTUM * tau - DECAY * w
        elif setting == 2:
            tau = np.sign(-np.sign(g) + MOMENTUM * tau - DECAY * w)
        else:
            kappa = -np.sign(g) + MOMENTUM * kappa - DECAY * w
            tau = np.sign(kappa)
        w = w + LR * tau
        out.append(w.copy())
    return out


def _loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (X @ w - y).pow(2).sum()


def _run_torch(opt_setting: int, n_steps: int = N_STEPS) -> list[np.ndarray]:
    X, y, w0 = (torch.from_numpy(a) for a in _problem())
    w = torch.nn.Parameter(w0.clone())
    opt = BatchManhattan([w], lr=LR, momentum=MOMENTUM, weight_decay=DECAY, setting=opt_setting)
    out = []
    for _ in range(n_steps):
        opt.zero_grad()
        _loss(w, X, y).backward()
        opt.step()
        out.append(w.detach().numpy().copy())
    return out


@pytest.mark.parametrize("setting", [1, 2, 3])
def test_matches_numpy_oracle(setting: int) -> None:
    X, y, w0 = _problem()
    expected = _oracle(setting, X, y, w0)
    got = _run_torch(setting)
    for t, (e, g) in enumerate(zip(expected, got, strict=True)):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12, err_msg=f"step {t}")
    # The zero-gradient, zero-weight entry never moves (sign(0) = 0).
    assert all(w[4] == 0.0 for w in got)
    # The zero-gradient, nonzero-weight entry does move (momentum and decay act on it).
    assert got[-1][3] != w0[3]


def test_settings_differ() -> None:
    """A wrong implementation (e.g. ignoring `setting`) must fail: the three settings differ.

    Hand case, m = 0.9, d = 0, gradients +1, +1, +1, -1 on one weight starting at 0:
    setting 1: tau = -1, -1.9, -2.71, -1.439 (magnitudes kept);
    setting 2: tau = -1, -1, -1, sign(1 - 0.9) = +1 (momentum on the signed tau flips it);
    setting 3: kappa = -1, -1.9, -2.71, -1.439, tau = sign(kappa) = -1 every step.
    """
    expected = {1: -0.1 * (1 + 1.9 + 2.71 + 1.439), 2: -0.1 * 2, 3: -0.1 * 4}
    for setting, w_end in expected.items():
        w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = BatchManhattan([w], lr=0.1, momentum=0.9, setting=setting)
        for g in (1.0, 1.0, 1.0, -1.0):
            w.grad = torch.tensor([g], dtype=torch.float64)
            opt.step()
        assert w.item() == pytest.approx(w_end, abs=1e-12), f"setting {setting}"
    # On the toy problem too, setting 1 leaves the lattice of multiples of lr that 2 and 3 move on.
    w1, w2, w3 = (_run_torch(s)[-1] for s in (1, 2, 3))
    assert not np.allclose(w1, w2)
    assert not np.allclose(w1, w3)


def test_setting1_is_sgd_on_sign_of_gradient() -> None:
    """Setting 1 equals torch.optim.SGD (momentum m, weight decay d) fed sign(g) as its gradient."""
    X, y, w0 = (torch.from_numpy(a) for a in _problem())
    w_bm = torch.nn.Parameter(w0.clone())
    w_sgd = torch.nn.Parameter(w0.clone())
    bm = BatchManhattan([w_bm], lr=LR, momentum=MOMENTUM, weight_decay=DECAY, setting=1)
    sgd = torch.optim.SGD([w_sgd], lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    for _ in range(N_STEPS):
        for w, opt in ((w_bm, bm), (w_sgd, sgd)):
            opt.zero_grad()
            _loss(w, X, y).backward()
        w_sgd.grad = torch.sign(w_sgd.grad)
        bm.step()
        sgd.step()
        torch.testing.assert_close(w_bm, w_sgd, rtol=0, atol=1e-12)


@pytest.mark.parametrize("setting", [1, 2, 3])
def test_state_dict_round_trip_continues_identically(setting: int) -> None:
    X, y, w0 = (torch.from_numpy(a) for a in _problem())
    w = torch.nn.Parameter(w0.clone())
    opt = BatchManhattan([w], lr=LR, momentum=MOMENTUM, weight_decay=DECAY, setting=setting)

    def step(param: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        _loss(param, X, y).backward()
        optimizer.step()

    for _ in range(3):
        step(w, opt)
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == ({"tau", "kappa"} if setting == 3 else {"tau"})

    # A fresh optimizer on a copy of the parameter, loaded from the saved state...
    w_re = torch.nn.Parameter(w.detach().clone())
    opt_re = BatchManhattan([w_re], lr=1.0, setting=1)  # hyperparameters come from the state
    opt_re.load_state_dict(saved)
    assert opt_re.param_groups[0]["setting"] == setting
    # ...continues exactly as the original does.
    for _ in range(4):
        step(w, opt)
        step(w_re, opt_re)
        assert torch.equal(w, w_re)
    # And both equal the uninterrupted oracle.
    np.testing.assert_allclose(w.detach().numpy(), _oracle(setting, *_problem())[6], atol=1e-12)


def test_param_groups_and_none_grads() -> None:
    a = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5, 0.25], dtype=torch.float64))
    c = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))  # never gets a gradient
    opt = BatchManhattan(
        [{"params": [a]}, {"params": [b, c], "lr": 0.5, "setting": 2, "weight_decay": 1.0}],
        lr=0.1,
    )
    a.grad = torch.tensor([2.0, -3.0], dtype=torch.float64)
    b.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opt.step()
    # group 0, setting 1, m = d = 0: a -= 0.1 * sign(g)
    torch.testing.assert_close(a.detach(), torch.tensor([0.9, -1.9], dtype=torch.float64))
    # group 1, setting 2, d = 1: tau = sign(-sign(g) - w) = sign([-0.5, -1.25]) = [-1, -1]
    torch.testing.assert_close(b.detach(), torch.tensor([0.0, -0.25], dtype=torch.float64))
    assert c.item() == 3.0
    assert c not in opt.state


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 0.1, "momentum": -0.1}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay"),
        ({"lr": 0.1, "setting": 0}, "valid choices are [1, 2, 3]"),
        ({"lr": 0.1, "setting": 4}, "setting=4"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        BatchManhattan([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_group_override_raises() -> None:
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="setting=5"):
        BatchManhattan([{"params": [p]}, {"params": [q], "setting": 5}], lr=0.1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_make_optimizer_names(name: str) -> None:
    model = torch.nn.Linear(3, 2)
    momentum = 0.0 if name in ("adam", "adamw") else 0.9
    opt = make_optimizer(name, model.parameters(), lr=1e-2, momentum=momentum, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.Optimizer)
    model(torch.randn(4, 3)).pow(2).mean().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)
    expected_type = {
        "sgd": torch.optim.SGD,
        "nesterov": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
    }.get(name, BatchManhattan)
    assert type(opt) is expected_type
    if name.startswith("bm"):
        assert opt.param_groups[0]["setting"] == int(name[2])
    if name == "nesterov":
        assert opt.param_groups[0]["nesterov"] is True


def test_make_optimizer_errors() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="valid names are"):
        make_optimizer("rmsprop", params, lr=0.1)
    with pytest.raises(ValueError, match="momentum > 0"):
        make_optimizer("nesterov", params, lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        make_optimizer("adam", params, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="unexpected keyword"):
        make_optimizer("bm1", params, lr=0.1, nesterov=True)


_finite = st.floats(-10.0, 10.0, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(
    w0=arrays(np.float64, 7, elements=_finite),
    grads=st.lists(arrays(np.float64, 7, elements=_finite), min_size=1, max_size=4),
    lr=st.floats(1e-4, 1.0),
    momentum=st.floats(0.0, 1.0),
    weight_decay=st.floats(0.0, 1.0),
    setting=st.sampled_from([2, 3]),
)
def test_signed_settings_move_by_exactly_lr(
    w0: np.ndarray,
    grads: list[np.ndarray],
    lr: float,
    momentum: float,
    weight_decay: float,
    setting: int,
) -> None:
    """Settings 2 and 3: tau is in {-1, 0, 1}; each entry moves by exactly lr or not at all."""
    w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = BatchManhattan([w], lr=lr, momentum=momentum, weight_decay=weight_decay, setting=setting)
    for g in grads:
        before = w.detach().clone()
        w.grad = torch.from_numpy(g)
        opt.step()
        tau = opt.state[w]["tau"]
        assert set(tau.unique().tolist()) <= {-1.0, 0.0, 1.0}
        # w + lr * (+-1) is one rounding, as torch's add with alpha.
        assert torch.equal(w.detach(), before + lr * tau)
        moved = (w.detach() - before).abs()
        nonzero = tau != 0
        assert torch.all(moved[~nonzero] == 0)
        # |(w + lr) - w| = lr up to the rounding of w + lr.
        slack = 4 * torch.finfo(torch.float64).eps * (before.abs()[nonzero] + lr)
        assert torch.all((moved[nonzero] - lr).abs() <= slack)
