"""The mathematics of weight mirrors' drives (issue 18): the antithetic identity, the orthogonal
designs (Haar rows and unit vectors) giving exactly k W for a layer with W fixed, what of it
holds for convolutions, and the options' validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop
from asymprop.mirror import _coordinate_pairs, _orthogonal_pairs

DESIGNS = ("orthogonal", "coordinate")


# ------------------------------------------------------------------ the antithetic identity


@pytest.mark.parametrize(
    ("phi", "odd_slope"),
    [
        (F.relu, 0.5),
        (F.gelu, 0.5),
        (F.silu, 0.5),
        (lambda z: F.leaky_relu(z, 0.1), 0.55),
        (lambda z: z, 1.0),
    ],
)
def test_the_antithetic_pair_leaves_only_the_odd_part(phi, odd_slope: float) -> None:
    """x phi(Wx)^T + (-x) phi(-Wx)^T = 2 x odd(phi)(Wx)^T; for phi(z) = z g(z) with
    g(z) + g(-z) = 1 (ReLU, GELU, SiLU) the odd part is z / 2 exactly (leaky ReLU: (1 + a) z / 2),
    so a pair gives x (Wx)^T times a constant whatever the drive."""
    torch.manual_seed(0)
    w, x = torch.randn(7, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    pair = phi(x @ w.T).T @ x + phi(-x @ w.T).T @ (-x)
    torch.testing.assert_close(pair, 2 * odd_slope * (x @ w.T).T @ x, rtol=1e-12, atol=1e-12)


def test_an_odd_nonlinearity_is_not_linearised_by_the_pair() -> None:
    """tanh is odd: the pair doubles it instead of cancelling it (no exact identity)."""
    torch.manual_seed(0)
    w, x = torch.randn(7, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    pair = torch.tanh(x @ w.T).T @ x + torch.tanh(-x @ w.T).T @ (-x)
    assert not torch.allclose(pair, (x @ w.T).T @ x, rtol=1e-2)


# ------------------------------------------------------------------ the designs' rows


@pytest.mark.parametrize("design", [_orthogonal_pairs, _coordinate_pairs])
def test_a_design_is_antithetic_and_orthogonal_per_block(design) -> None:
    x = design([8, 3, 5], torch.Generator().manual_seed(0), torch.zeros(1, dtype=torch.float64))
    assert x.shape == (8, 3, 5)
    torch.testing.assert_close(x[4:], -x[:4])  # example n + N/2 is -(example n)
    rows = x[:4].reshape(-1, 5)  # 12 rows: two full 5 x 5 blocks and 2 rows of a third
    for block in (rows[:5], rows[5:10]):
        torch.testing.assert_close(block.T @ block, 5 * torch.eye(5, dtype=torch.float64))
    assert torch.linalg.matrix_rank(rows[10:]) == 2  # a partial block: distinct directions


def test_the_coordinate_design_drives_each_unit_once_per_block() -> None:
    x = _coordinate_pairs(
        [14, 6], torch.Generator().manual_seed(0), torch.zeros(1, dtype=torch.float64)
    )
    rows = x[:7]
    assert set(rows.unique().tolist()) == {0.0, math.sqrt(6)}  # one unit per row, +sqrt(n)
    assert (rows != 0).sum(1).eq(1).all()
    units = rows.argmax(1)
    assert sorted(units[:6].tolist()) == list(range(6))  # a full block: a permutation
    # a new block draws a new order: with another stream the order differs
    other = _coordinate_pairs(
        [14, 6], torch.Generator().manual_seed(1), torch.zeros(1, dtype=torch.float64)
    )
    assert not torch.equal(other[:6].argmax(1), units[:6])


# ------------------------------------------------------------------ exactly k W, W fixed


@pytest.mark.parametrize("drive", DESIGNS)
@pytest.mark.parametrize("nonlinearity", ["relu", "identity"])
@pytest.mark.parametrize("x_shape", [(40,), (3, 40)])
def test_one_mirror_step_of_a_design_gives_exactly_k_w(
    drive: str, nonlinearity: str, x_shape
) -> None:
    """eta_b 0.3, noise_std 2, decay 1: one mirror step at the default budget (one block of
    fan_in rows per half batch; a sequence of 3 positions: 3 blocks) gives B = k W with
    k = eta_b noise_std^2 slope (``WM.fixed_point_scale``), to float64 rounding."""
    layer = asymprop.convert(
        nn.Linear(40, 30).double(),
        "wm",
        seed=0,
        warmup_steps=0,
        decay=1.0,
        eta_b=0.3,
        noise_std=2.0,
        nonlinearity=nonlinearity,
        drive=drive,
    )
    layer.feedback_state["input_shape"] = [8, *x_shape]
    if len(x_shape) == 2:
        layer.rule = dataclasses.replace(layer.rule, mirror_batch=80)
    asymprop.mirror(layer, steps=1)
    k = layer.rule.fixed_point_scale
    assert k == pytest.approx(0.3 * 4 * (0.5 if nonlinearity == "relu" else 1.0))
    torch.testing.assert_close(
        layer.feedback_weight, k * layer.weight.detach(), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("drive", DESIGNS)
def test_a_design_holds_b_at_k_w_where_the_gaussian_drive_plateaus(drive: str) -> None:
    """decay 0.5 (the default): B forgets its random start geometrically and every step's
    estimate is exact, so after 40 steps B = W to rounding; the Gaussian drive sits at its
    ~25-degree plateau."""
    angles = {}
    for d in ("gaussian", drive):
        layer = asymprop.convert(nn.Linear(60, 20).double(), "wm", seed=0, warmup_steps=0, drive=d)
        asymprop.mirror(layer, steps=40)
        angles[d] = asymprop.angle_deg(layer.feedback_weight, layer.weight)
    assert angles[drive] < 1e-6 and 15 < angles["gaussian"] < 40, angles


@pytest.mark.parametrize("drive", DESIGNS)
def test_a_partial_block_is_unbiased_with_equal_squared_error(drive: str) -> None:
    """m < fan_in rows per step: each estimate is (n / m) W P with P a random projection,
    E[P] = (m / n) I, so the mean is W and E||B - W||^2 = (n / m - 1) ||W||^2 for Haar rows and
    unit vectors alike (the docstring's claim; 400 one-step estimates, n = 10, m = 4)."""
    layer = asymprop.convert(
        nn.Linear(10, 6).double(),
        "wm",
        seed=0,
        warmup_steps=0,
        decay=1.0,
        mirror_batch=8,
        drive=drive,
    )
    w = layer.weight.detach()
    estimates = []
    for _ in range(400):
        asymprop.mirror(layer, steps=1)
        estimates.append(layer.feedback_weight.clone())
    stack = torch.stack(estimates)
    assert (stack.mean(0) - w).norm() < 0.15 * w.norm()
    squared = (stack - w).pow(2).sum((1, 2)).mean()
    assert squared / w.pow(2).sum() == pytest.approx(10 / 4 - 1, rel=0.15)


# ------------------------------------------------------------------ convolutions


def _conv_covariance(layer, x: torch.Tensor, phi) -> torch.Tensor:
    """WM's conv covariance of the drive x: weight gradient of (x, centred phi(conv x)), per tap
    divided by its pairs and the examples."""
    out = phi(layer.weight_op(x, layer.weight.detach()))
    out = out - out.mean(0, keepdim=True)
    return layer.weight_grad(x, out) / (layer.pairs(list(x.shape)).clamp_min(1) * x.shape[0])


def test_the_antithetic_identity_holds_at_every_position_of_a_convolution() -> None:
    """With pairs x, -x the ReLU drive's covariance equals half the identity drive's exactly,
    for a strided, padded, dilated, grouped conv: the rectifier's even part cancels."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2).double()
    layer = asymprop.convert(conv, "fa", seed=0)
    half = torch.randn(5, 4, 9, 9, dtype=torch.float64)
    x = torch.cat([half, -half])
    relu, linear = _conv_covariance(layer, x, F.relu), _conv_covariance(layer, x, lambda z: z)
    torch.testing.assert_close(relu, linear / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 1)])
def test_an_impulse_design_gives_exactly_w_for_a_conv(stride, padding) -> None:
    """Patches overlap, so an orthogonal design over fan_in does not make the patches'
    second moment the identity; one over every input entry does: each entry driven alone
    (antithetic, 2 C H W examples), or sparse impulses no patch sees two of (one channel, every
    3rd entry of a 3x3 kernel: 2 C 3^2 = 2 fan_in examples). Both give the covariance W / 2
    (ReLU's slope) exactly, zero padding and stride included; Gaussian noise at the same
    2 fan_in examples does not."""
    torch.manual_seed(0)
    layer = asymprop.convert(
        nn.Conv2d(3, 4, 3, stride=stride, padding=padding).double(), "fa", seed=0
    )
    w, shape = layer.weight.detach(), (3, 7, 7)
    d = math.prod(shape)
    units = torch.eye(d, dtype=torch.float64).mul(math.sqrt(d)).reshape(d, *shape)
    sparse = torch.zeros(27, *shape, dtype=torch.float64)
    for n, (c, i, j) in enumerate((c, i, j) for c in range(3) for i in range(3) for j in range(3)):
        sparse[n, c, i::3, j::3] = math.sqrt(27)
    for half in (units, sparse):
        cov = _conv_covariance(layer, torch.cat([half, -half]), F.relu)
        torch.testing.assert_close(cov, w / 2, rtol=1e-10, atol=1e-12)
    noise = torch.randn(54, *shape, dtype=torch.float64)
    assert asymprop.angle_deg(_conv_covariance(layer, noise, F.relu), w) > 3


@pytest.mark.parametrize("drive", DESIGNS)
def test_convolutions_keep_the_gaussian_drive_and_dense_layers_get_the_design(drive: str) -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = asymprop.convert(net, "wm", seed=0, warmup_steps=0, decay=1.0, drive=drive)
    asymprop.mirror(model, steps=1, example_input=torch.randn(2, 2, 6, 6))
    stats = asymprop.alignment(model)
    assert stats["2"]["angle_deg"] < 1e-3  # exact for the Linear (float32)
    assert stats["0"]["angle_deg"] > 1  # the conv keeps the Gaussian drive's noise


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("drive", DESIGNS)
def test_a_design_refuses_a_baseline(drive: str) -> None:
    with pytest.raises(ValueError, match=f"drive='{drive}' needs baseline=None"):
        asymprop.convert(nn.Linear(3, 2), "wm", drive=drive, baseline=1.0)


def test_an_unknown_drive_names_the_choices() -> None:
    with pytest.raises(TypeError, match="'gaussian', 'orthogonal', 'coordinate'"):
        asymprop.convert(nn.Linear(3, 2), "wm", drive="orthogonl")


@pytest.mark.parametrize("drive", DESIGNS)
def test_a_design_rounds_an_odd_mirror_batch_up_and_replays_from_its_stream(drive: str) -> None:
    def run() -> torch.Tensor:
        torch.manual_seed(0)  # W
        layer = asymprop.convert(
            nn.Linear(12, 5), "wm", seed=3, warmup_steps=0, mirror_batch=7, drive=drive
        )
        assert layer.rule.noise_shape(layer)[0] == 8  # antithetic pairs
        asymprop.mirror(layer, steps=3)
        return layer.feedback_weight.clone()

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)


# ------------------------------------------------------------------ the benchmark's budgets


def test_the_plateau_benchmark_budgets_are_the_rules_default_batches() -> None:
    """benchmarks/wm_plateau.py scales each layer's mirror batch from the default; at budget 1
    its formula must give the batch ``WM.noise_shape`` picks (dense and conv layers)."""
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, here)
    try:
        import wm_plateau
    finally:
        sys.path.remove(here)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 5),
    )
    x = torch.randn(4, 2, 8, 8)
    sites = wm_plateau.sites(net, x)
    assert {n: s.kind for n, s in sites.items()} == {"0": "conv", "2": "conv", "4": "dense"}
    model = asymprop.convert(net, "wm", seed=0, warmup_steps=0)
    asymprop.mirror(model, steps=1, example_input=x)
    layers = dict(asymprop.feedback_layers(model))
    for name, site in sites.items():
        assert site.batch(1.0) == layers[name].rule.noise_shape(layers[name])[0], name
    assert sites["4"].batch(0.1) == max(2, math.ceil(0.1 * 2 * 12))


def test_a_conv_layer_under_a_design_drive_says_once_that_it_keeps_the_gaussian_drive(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    mirror_module = importlib.import_module("asymprop.mirror")  # the module, not the function
    monkeypatch.setattr(mirror_module, "_KEPT", set())
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
    with caplog.at_level("WARNING", logger="asymprop.mirror"):
        asymprop.convert(nn.Sequential(*net, nn.Linear(64, 3)), "wm", drive="coordinate", seed=0)
        asymprop.convert(nn.Sequential(nn.Linear(4, 3)), "wm", drive="coordinate", seed=0)
        asymprop.convert(nn.Sequential(nn.Conv2d(1, 2, 3)), "wm", seed=0)  # gaussian: silent
    kept = [r.getMessage() for r in caplog.records if "keep the Gaussian drive" in r.message]
    assert len(kept) == 1 and "FeedbackConv2d" in kept[0]  # two convs, one line; Linear: none
