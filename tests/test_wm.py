"""Weight mirrors (``wm``, ``asymprop.mirror``): 000 Alg. 1, App. C-D; 003 eq. (5)-(11).

Issue 3 must-show 2 (mirror mode aligns B with a fixed W, to the predicted multiple and the
predicted plateau), 3 (delta alignment of ``kp``/``wm`` far below ``fa`` after training) and 5
(stability: a lagging B makes training diverge), plus the mechanics: the covariance of a conv
weight against a brute-force oracle, noise shapes, schedules, warm-up, bounded growth, and that
mirror mode leaves the forward path alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import asymprop
from asymprop.mirror import WM


def _fixed_layer(layer: nn.Module, input_shape: tuple[int, ...], **options: object) -> nn.Module:
    """A single converted layer that has 'seen' an input of ``input_shape``; unless the options
    say otherwise, it mirrors batches of ``input_shape[0]`` examples."""
    options = {"mirror_batch": input_shape[0], **options}
    converted = asymprop.convert(layer, "wm", seed=0, warmup_steps=0, **options)
    converted.feedback_state["input_shape"] = list(input_shape)
    return converted


def _multiple(layer: nn.Module) -> float:
    """k in B = k W + E: the projection of B on W."""
    w, b = layer.weight.detach().double(), layer.feedback_weight.detach().double()
    return float((w * b).sum() / (w * w).sum())


def _plateau_deg(fan_in: int, pairs: int, decay: float) -> float:
    """Predicted angle of B to a fixed W once the mirror has converged (see WM's docstring)."""
    c = 2 - 2 / math.pi  # ReLU drive, batch means subtracted
    return math.degrees(math.atan(math.sqrt(c * fan_in * decay / ((2 - decay) * pairs))))


# ------------------------------------------------------------------ must-show 2: fixed W


LAYERS = {
    "linear": (lambda: nn.Linear(100, 50), (512, 100)),
    "conv-s1": (lambda: nn.Conv2d(16, 32, 3, padding=1), (16, 16, 8, 8)),
    "conv-s2": (lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), (64, 16, 8, 8)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_mirror_aligns_fixed_w_below_10_degrees(kind: str) -> None:
    """Decay 0.1 (B averages ~19 mirror batches), 512 (Linear), 16 x 64 positions (stride 1) or
    64 x 16 positions (stride 2) noise samples per weight and mirror batch; predicted plateaus
    6.7 / 5.7 / 5.8 degrees. Measured after 300 mirror steps (from 90 degrees): 6.9 / 6.1 / 6.1,
    first under 10 degrees after 21-22 steps. The defaults (decay 0.5, 2 fan_in pairs per weight)
    plateau at 25-28 degrees instead, in 3-4 steps."""
    build, shape = LAYERS[kind]
    layer = _fixed_layer(build(), shape, decay=0.1)
    w_before = layer.weight.detach().clone()
    assert asymprop.angle_deg(layer.weight, layer.feedback_weight) > 80
    asymprop.mirror(layer, steps=300)
    assert asymprop.angle_deg(layer.weight, layer.feedback_weight) < 10
    assert torch.equal(layer.weight, w_before)
    assert layer.feedback_state["mirror_updates"] == 300


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, 1.0),  # default eta_b: B -> W
        ({"eta_b": 0.05, "decay": 0.1, "noise_std": 2.0}, 0.05 * 4 * 0.5 / 0.1),
        ({"eta_b": 0.05, "decay": 0.2, "nonlinearity": "identity"}, 0.05 * 1 * 1 / 0.2),
        ({"eta_b": 0.1, "decay": 0.5, "noise_std": 1.0}, 0.1),  # the paper's values: B -> 0.1 W
    ],
)
@pytest.mark.parametrize("kind", ["linear", "conv-s2"])
def test_mirror_converges_to_the_predicted_multiple(
    kind: str, options: dict, expected: float
) -> None:
    """k = eta_b * noise_std^2 * slope / decay; slope = E[phi'] = 1/2 ReLU (Stein), 1 identity."""
    build, shape = LAYERS[kind]
    layer = _fixed_layer(build(), (512 if kind == "linear" else 32, *shape[1:]), **options)
    rule = layer.rule
    assert isinstance(rule, WM)
    assert rule.fixed_point_scale == pytest.approx(expected)
    steps = int(5 / rule.decay)  # converge: (1 - decay)^steps < 1%
    asymprop.mirror(layer, steps=steps)
    samples = []
    for _ in range(20):  # average k over the stationary fluctuation
        asymprop.mirror(layer, steps=1)
        samples.append(_multiple(layer))
    assert sum(samples) / len(samples) == pytest.approx(expected, rel=0.03)


def test_baseline_variant_multiple_per_unit() -> None:
    """C.2: input beta + noise, bias b- = beta, beta subtracted: the mean ReLU slope of output
    unit i is P(w_i y + beta > 0) = Phi(beta / (sigma |w_i|)), so row i of B -> k_i w_i."""
    torch.manual_seed(0)
    layer = _fixed_layer(nn.Linear(40, 20), (512, 40), baseline=0.5, eta_b=0.1, decay=0.2)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.5, 3.0, 20)[:, None])  # rows of different norms
    asymprop.mirror(layer, steps=60)
    w, b = layer.weight.detach(), torch.zeros_like(layer.weight)
    for _ in range(20):
        asymprop.mirror(layer, steps=1)
        b += layer.feedback_weight.detach() / 20
    slope = 0.5 * (1 + torch.erf(0.5 / w.norm(dim=1) / math.sqrt(2)))  # Phi
    measured = (w * b).sum(1) / (w * w).sum(1)
    torch.testing.assert_close(measured, 0.1 / 0.2 * slope, rtol=0.05, atol=0.0)


@pytest.mark.parametrize(("batch", "decay"), [(64, 0.5), (256, 0.5), (256, 0.1), (1024, 0.5)])
def test_linear_plateau_follows_batch_and_decay(batch: int, decay: float) -> None:
    """The angle plateau is set by how many noise samples B averages: ~batch * (2 - decay) /
    decay. Measured over 40 steps after convergence, within 10% of the prediction."""
    layer = _fixed_layer(nn.Linear(100, 50), (batch, 100), decay=decay)
    asymprop.mirror(layer, steps=int(6 / decay))
    angles = []
    for _ in range(40):
        asymprop.mirror(layer, steps=1)
        angles.append(asymprop.angle_deg(layer.weight, layer.feedback_weight))
    predicted = _plateau_deg(100, batch, decay)
    assert sum(angles) / len(angles) == pytest.approx(predicted, rel=0.1)


def test_growth_is_bounded_over_long_mirroring() -> None:
    """The decay term forgets old covariances: from a B 100x too large, and over 1500 steps, |B|
    falls to and stays near k |W| (never above its start), with no tuning."""
    layer = _fixed_layer(nn.Conv2d(4, 8, 3, padding=1), (4, 4, 5, 5), decay=0.5)
    with torch.no_grad():
        layer.feedback_weight.mul_(100)
    start = float(layer.feedback_weight.norm())
    w_norm = float(layer.weight.detach().norm())
    norms = []
    for _ in range(150):
        asymprop.mirror(layer, steps=10)
        norms.append(float(layer.feedback_weight.norm()))
    assert max(norms) < start
    assert max(norms[10:]) < 1.5 * w_norm  # k = 1 plus the estimation noise
    assert min(norms[10:]) > 0.7 * w_norm


# ------------------------------------------------------------------ the covariance of a conv


def _brute_conv_covariance(layer: nn.Conv2d, xp: torch.Tensor, mask: torch.Tensor, padding, out):
    """Per weight, the mean over the (input neuron, output neuron) pairs it connects (D.2)."""
    c_out, c_per_group, kh, kw = layer.weight.shape
    xpp = F.pad(xp, (padding[1], padding[1], padding[0], padding[0]))
    real = F.pad(mask, (padding[1], padding[1], padding[0], padding[0]))[0, 0]
    total = torch.zeros(layer.weight.shape, dtype=torch.float64)
    count = torch.zeros(kh, kw, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            for a in range(out.shape[2]):
                for b in range(out.shape[3]):
                    r = a * layer.stride[0] + i * layer.dilation[0]
                    c = b * layer.stride[1] + j * layer.dilation[1]
                    if real[r, c] == 0:
                        continue  # a zero-padding position is no neuron
                    count[i, j] += 1
                    for o in range(c_out):
                        g = o // (c_out // layer.groups)
                        x_in = xpp[:, g * c_per_group : (g + 1) * c_per_group, r, c]
                        total[o, :, i, j] += (out[:, o, a, b, None] * x_in).sum(0)
    return total / (count * (xp.shape[0] - 1))


@pytest.mark.parametrize(
    "conv",
    [
        {"padding": 1},
        {"padding": 2, "stride": 2},
        {"padding": 1, "dilation": 2, "groups": 2},
        {"padding": "same"},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": (1, 0), "stride": (2, 1)},
    ],
)
def test_conv_covariance_equals_pairwise_average(conv: dict) -> None:
    layer = asymprop.convert(nn.Conv2d(4, 6, 3, **conv).double(), "wm", seed=0)
    x = torch.randn(5, 4, 7, 6, dtype=torch.float64)
    xp, mask, padding = _explicit_padding(layer, x)
    out = F.relu(
        F.conv2d(xp, layer.weight, None, layer.stride, padding, layer.dilation, layer.groups)
    )
    torch.testing.assert_close(out, F.relu(layer.weight_op(x, layer.weight)))
    xc, oc = x - x.mean(0, keepdim=True), out - out.mean(0, keepdim=True)
    # the mirror's covariance through the layer-kind interface: weight_grad / (pairs * samples)
    fast = layer.weight_grad(xc, oc.detach()) / (layer.pairs(x.shape) * 4)
    xpc = xp - xp.mean(0, keepdim=True)
    torch.testing.assert_close(fast, _brute_conv_covariance(layer, xpc, mask, padding, oc.detach()))


def _explicit_padding(layer: nn.Conv2d, x: torch.Tensor):
    """The oracle's padding: x padded as the layer pads it, a mask of real neurons (1; 0 for
    zero padding), and the padding left to the conv op."""
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return x, mask, tuple(layer.padding)
    pad = layer._reversed_padding_repeated_twice
    if layer.padding_mode == "zeros":
        return F.pad(x, pad), F.pad(mask, pad), (0, 0)
    return F.pad(x, pad, mode=layer.padding_mode), F.pad(mask, pad, value=1.0), (0, 0)


# ------------------------------------------------------------------ mechanics


def test_engaged_mode_is_fa_with_the_current_b() -> None:
    layer = asymprop.convert(nn.Linear(6, 4), "wm", seed=0)
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 4) @ layer.feedback_weight.detach())


def test_noise_has_the_shape_of_the_last_training_input() -> None:
    """(C, H, W) of the last training input; the batch is mirror_batch, or by default enough
    examples that a weight averages PAIRS_PER_FAN_IN * fan_in (input, output) pairs."""
    layer = asymprop.convert(nn.Conv2d(3, 4, 3), "wm", seed=0)
    layer(torch.randn(5, 3, 9, 7))
    # fan_in 27, 7 x 5 output positions: ceil(2 * 27 / 35) = 2 examples
    assert layer.rule.noise_shape(layer) == [2, 3, 9, 7]
    layer.eval()
    layer(torch.randn(100, 3, 30, 30))  # an evaluation pass does not change the mirror shape
    assert layer.rule.noise_shape(layer) == [2, 3, 9, 7]
    wide = asymprop.convert(nn.Conv2d(3, 4, 3), "wm", seed=0, mirror_batch=32)
    wide(torch.randn(5, 3, 9, 7))
    assert wide.rule.noise_shape(wide) == [32, 3, 9, 7]
    dense = asymprop.convert(nn.Linear(100, 3), "wm", seed=0)  # never ran: in_features suffice
    assert dense.rule.noise_shape(dense) == [200, 100]
    dense(torch.randn(4, 5, 100))  # a sequence: 5 positions share the weight
    assert dense.rule.noise_shape(dense) == [40, 5, 100]


def test_a_conv_that_never_ran_needs_an_input_size() -> None:
    model = asymprop.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)), "wm")
    with pytest.raises(RuntimeError, match=r"example_input=.*input_shapes="):
        asymprop.mirror(model, steps=1)
    asymprop.mirror(model, steps=1, example_input=torch.randn(4, 1, 8, 8))
    assert model[2].feedback_state["input_shape"] == [4, 2, 6, 6]
    fresh = asymprop.convert(nn.Sequential(nn.Conv2d(1, 2, 3)), "wm")
    asymprop.mirror(fresh, steps=2, input_shapes={"0": (3, 1, 5, 5)})
    assert fresh[0].feedback_state["mirror_updates"] == 2
    with pytest.raises(ValueError, match="valid names: 0"):
        asymprop.mirror(fresh, steps=1, input_shapes={"nope": (3, 1, 5, 5)})


def test_mirror_needs_a_wm_model() -> None:
    with pytest.raises(ValueError, match="convert it with"):
        asymprop.mirror(asymprop.convert(nn.Linear(3, 2), "fa"), steps=1)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("decay", 0.0),
        ("decay", 1.5),
        ("eta_b", 0.0),
        ("noise_std", -1.0),
        ("mirror_batch", 1),
        ("mirror_steps", -1),
        ("warmup_steps", -2),
        ("baseline", 0.0),
    ],
)
def test_options_out_of_range_are_named(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        asymprop.convert(nn.Linear(3, 2), "wm", **{option: value})


def _bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def test_mirror_mode_leaves_the_forward_path_alone() -> None:
    """Weights, biases, their .grad, BN running statistics and train/eval flags are untouched;
    only feedback weights and rule counters change."""
    model = asymprop.convert(_bn_cnn(), "wm", seed=0, warmup_steps=0)
    model.train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()  # sets BN stats, grads, input shapes
    model[4].eval()  # a mixed train/eval model keeps its flags
    forward = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    forward = {k: v for k, v in forward.items() if "feedback" not in k}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    modes = [m.training for m in model.modules()]
    feedback = [layer.feedback_weight.clone() for _, layer in asymprop.feedback_layers(model)]
    asymprop.mirror(model, steps=3, example_input=torch.randn(9, 1, 8, 8))
    for key, value in model.state_dict().items():
        if key in forward:
            assert torch.equal(value, forward[key]), key
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.equal(p.grad, grads[name]), name
    assert [m.training for m in model.modules()] == modes
    after = [layer.feedback_weight for _, layer in asymprop.feedback_layers(model)]
    assert all(not torch.equal(a, b) for a, b in zip(after, feedback, strict=True))


def test_alternate_schedule_mirrors_every_second_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model = asymprop.convert(model, "wm", seed=0, schedule="alternate", mirror_batch=8)
    layers = [layer for _, layer in asymprop.feedback_layers(model)]
    before = [layer.feedback_weight.clone() for layer in layers]
    asymprop.mirror(model, steps=1)  # step 0: layers 0 and 2
    changed = [not torch.equal(a, b.feedback_weight) for a, b in zip(before, layers, strict=True)]
    assert changed == [True, False, True]
    asymprop.mirror(model, steps=3)
    assert [layer.feedback_state["mirror_updates"] for layer in layers] == [2, 2, 2]
    assert all(layer.feedback_state["mirror_steps"] == 4 for layer in layers)


def test_warm_up_runs_before_the_first_engaged_step_and_counts_explicit_mirroring() -> None:
    torch.manual_seed(0)
    model = asymprop.convert(_bn_cnn(), "wm", seed=0, warmup_steps=30, mirror_steps=2)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    bn_mean = model[1].running_mean.clone()
    seen: list[float] = []

    def spy(module: nn.Module, args: tuple) -> None:  # angles just before the engaged forward
        if torch.is_grad_enabled() and not seen:
            seen.extend(a["angle_deg"] for a in asymprop.alignment(model).values())

    handle = model[0].register_forward_pre_hook(spy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    asymprop.train_step(model, optimizer, F.cross_entropy, x, y)
    handle.remove()
    assert max(seen) < 45  # aligned (from ~90) before W ever learned from B
    assert not torch.equal(model[1].running_mean, bn_mean)  # one engaged update only
    counts = [
        layer.feedback_state["mirror_updates"] for _, layer in asymprop.feedback_layers(model)
    ]
    assert counts == [32, 32, 32]
    asymprop.train_step(model, optimizer, F.cross_entropy, x, y)
    assert model[0].feedback_state["mirror_updates"] == 34
    # steps of asymprop.mirror count towards the warm-up
    other = asymprop.convert(_bn_cnn(), "wm", seed=0, warmup_steps=30, mirror_steps=1)
    asymprop.mirror(other, steps=25, example_input=x)
    asymprop.train_step(other, torch.optim.SGD(other.parameters(), lr=0.01), F.cross_entropy, x, y)
    assert other[0].feedback_state["mirror_updates"] == 31


def test_custom_loop_warm_up_runs_at_the_first_update_feedback() -> None:
    model = asymprop.convert(
        nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)),
        "wm",
        seed=0,
        warmup_steps=10,
        mirror_steps=1,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(4, 5)), torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    asymprop.update_feedback(model)
    assert [
        layer.feedback_state["mirror_updates"] for _, layer in asymprop.feedback_layers(model)
    ] == [11, 11]


def test_same_seed_mirrors_identically_and_reload_continues() -> None:
    """Noise comes from each layer's own stream: twins (e.g. DDP ranks) and a reloaded model
    draw the same numbers."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return asymprop.convert(_bn_cnn(), "wm", seed=3, warmup_steps=0)

    a, b = make(), make()
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(123)  # the global generator must not matter
    asymprop.mirror(a, steps=3, example_input=x)
    torch.manual_seed(456)
    asymprop.mirror(b, steps=3, example_input=x)
    for (_, la), (_, lb) in zip(
        asymprop.feedback_layers(a), asymprop.feedback_layers(b), strict=True
    ):
        assert torch.equal(la.feedback_weight, lb.feedback_weight)
    c = make()
    c.load_state_dict(a.state_dict())
    asymprop.mirror(a, steps=2)
    asymprop.mirror(c, steps=2)
    for (_, la), (_, lc) in zip(
        asymprop.feedback_layers(a), asymprop.feedback_layers(c), strict=True
    ):
        assert torch.equal(la.feedback_weight, lc.feedback_weight)


# ------------------------------------------------------------------ shared training helpers


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = ((x - x.mean()) / x.std()).reshape(-1, 1, 8, 8)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _fashion(train_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from asymprop.harness.data import DatasetNotFoundError, load_dataset

    try:
        data = load_dataset("fashion-mnist")
    except DatasetNotFoundError as error:
        pytest.skip(str(error))
    x, y = data.train.tensors
    x_test, y_test = data.test.tensors
    return x[:train_size], y[:train_size], x_test[:2000], y_test[:2000]


def _train(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    batch: int = 32,
) -> float:
    """SGD with momentum 0.9; returns test accuracy (0 once the loss is NaN/inf)."""
    x, y, x_test, y_test = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(0)
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=order)
            for i in range(0, len(x) - batch + 1, batch):
                idx = perm[i : i + batch]
                asymprop.train_step(model, optimizer, F.cross_entropy, x[idx], y[idx])
    except asymprop.DivergenceError:
        return 0.0
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    model.train()
    return accuracy


def _digits_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _delta_angles(build, rule: str, data: tuple[torch.Tensor, ...], **train: float) -> list[float]:
    torch.manual_seed(0)
    model = asymprop.convert(build(), rule, seed=0)
    _train(model, data, **train)
    _, _, x_test, y_test = data
    return list(asymprop.delta_alignment(model, F.cross_entropy, x_test, y_test).values())


def _far_below_fa(deltas: dict[str, list[float]]) -> None:
    """Every layer: kp and wm under 0.7 x fa's angle; on average under half of fa's."""
    for rule in ("kp", "wm"):
        for ours, fa in zip(deltas[rule], deltas["fa"], strict=True):
            assert ours < 0.7 * fa, (rule, deltas)
        assert sum(deltas[rule]) < 0.5 * sum(deltas["fa"]), (rule, deltas)


# ------------------------------------------------------------------ must-show 3: delta alignment


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_delta_alignment_of_kp_and_wm_far_below_fa_on_digits(arch: str) -> None:
    """Digits, 4 epochs, SGD lr 0.05, momentum 0.9, weight decay 1e-2, default options. Measured
    delta angles (degrees per layer, input layer first; the input layer's is the error reaching
    the pixels): mlp: fa 89/61/41, kp 13/13/13, wm 27/26/27; cnn: fa 90/89/82/43,
    kp 9/14/13/14, wm 19/30/28/25."""
    build = _digits_mlp if arch == "mlp" else _digits_cnn
    data = _digits()
    deltas = {
        rule: _delta_angles(build, rule, data, epochs=4, lr=0.05, weight_decay=1e-2)
        for rule in ("fa", "kp", "wm")
    }
    _far_below_fa(deltas)


def _fashion_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _fashion_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_delta_alignment_of_kp_and_wm_far_below_fa_on_fashion_mnist(arch: str) -> None:
    """Fashion-MNIST, 1 epoch of the 60000 training images, SGD lr 0.01, momentum 0.9, weight
    decay 1e-2 (KP's B - W shrinks by exp(-lr decay steps / (1 - momentum)) = exp(-0.94)),
    batch 64, default options; delta angles on 2000 test images. Measured (degrees per layer,
    input layer first): mlp: fa 90/50/53, kp 16/18/20, wm 24/24/26; cnn: fa 90/90/86/43,
    kp 17/20/15/21, wm 19/31/26/27."""
    build = _fashion_mlp if arch == "mlp" else _fashion_cnn
    data = _fashion(60000)
    deltas = {
        rule: _delta_angles(build, rule, data, epochs=1, lr=0.01, weight_decay=1e-2, batch=64)
        for rule in ("fa", "kp", "wm")
    }
    _far_below_fa(deltas)


# ------------------------------------------------------------------ must-show 5: stability


@dataclass(frozen=True)
class _StaleFeedback(WM):
    """B is exactly W as it was ``stale`` engaged steps ago: WM's lag, without noise."""

    stale: int = 2

    def update(self, layers) -> None:
        with torch.no_grad():
            for layer in layers:
                history = layer.__dict__.setdefault("_test_history", [])
                history.append(layer.weight.detach().clone())
                del history[: -(self.stale + 1)]
                layer.feedback_weight.copy_(history[0])


@dataclass(frozen=True)
class _NoiseFreeMirror(WM):
    """The mirror's expected step, ``B <- (1 - decay) B + decay W``: WM's lag, without noise."""

    def mirror_layer(self, layer) -> None:
        layer.feedback_weight.mul_(1 - self.decay).add_(layer.weight, alpha=self.decay)
        layer.feedback_state["mirror_updates"] += 1


def test_a_stale_feedback_weight_makes_training_fail() -> None:
    """The cause of WM's divergence: lag, not noise. Digits CNN, SGD lr 0.05, momentum 0.9,
    3 epochs. Measured test accuracy: bp 0.96; B = W of 0 / 1 / 2 engaged steps ago: 0.96 /
    0.96 / 0.08 (B within a degree of W throughout); the noise-free mirror, B an exponential
    average of W with mean lag (1 - decay) / decay steps: decay 0.05 / 0.1 / 0.2 / 0.5:
    0.25 / 0.08 / 0.45 / 0.97; the real ``wm`` (defaults) 0.97, ``kp`` 0.96."""
    data = _digits()

    def accuracy(rule) -> float:
        torch.manual_seed(0)
        return _train(asymprop.convert(_digits_cnn(), rule, seed=0), data, epochs=3, lr=0.05)

    assert accuracy("bp") > 0.9
    assert accuracy(_StaleFeedback(stale=1, warmup_steps=0)) > 0.9
    assert accuracy(_StaleFeedback(stale=2, warmup_steps=0)) < 0.5
    assert accuracy(_NoiseFreeMirror(decay=0.05, warmup_steps=0)) < 0.5
    assert accuracy(_NoiseFreeMirror(decay=0.5, warmup_steps=0)) > 0.9


@pytest.mark.slow
@pytest.mark.data
def test_wm_stability_in_a_small_cnn_on_fashion_mnist() -> None:
    """The trial of issue 3: a small CNN on Fashion-MNIST (30000 images, 1 epoch, SGD lr 0.01,
    momentum 0.9, batch 64). bp and kp train; wm with decay 0.05 (well aligned: angles under
    ~20 degrees, |B| ~ |W|) diverges, and so does its noise-free version (the lag alone); the
    default wm (decay 0.5) trains. Measured test accuracy (2000 images): bp 0.839, kp 0.840,
    wm decay 0.05 0.107 (dead; angles 1-9 degrees at the end), noise-free decay 0.05 0.168,
    wm default 0.842."""
    data = _fashion(30000)

    def accuracy(rule, **options: object) -> float:
        torch.manual_seed(0)
        model = asymprop.convert(_fashion_cnn(), rule, seed=0, **options)
        return _train(model, data, epochs=1, lr=0.01, batch=64)

    assert accuracy("bp") > 0.8
    assert accuracy("kp") > 0.8
    assert accuracy("wm", decay=0.05) < 0.5
    assert accuracy(_NoiseFreeMirror(decay=0.05)) < 0.5
    assert accuracy("wm") > 0.78


def test_wm_in_a_residual_net_with_batch_norm() -> None:
    """Stride-2, grouped and 1x1 shortcut convs between BN layers: train_step warms every B up
    (from ~90 degrees) before the first engaged pass and training stays finite."""
    from conftest import small_resnet

    torch.manual_seed(0)
    model = asymprop.convert(small_resnet(), "wm", seed=0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        assert math.isfinite(asymprop.train_step(model, optimizer, F.cross_entropy, x, y))
    angles = [a["angle_deg"] for a in asymprop.alignment(model).values()]
    assert max(angles) < 40, angles


# ------------------------------------------------------------------ the orthogonal drive


@pytest.mark.parametrize("nonlinearity", ["relu", "identity"])
@pytest.mark.parametrize("x_shape", [(100,), (3, 100)])
def test_orthogonal_antithetic_drive_gives_exactly_k_w(nonlinearity: str, x_shape) -> None:
    """x relu(Wx)^T + (-x) relu(-Wx)^T = x (Wx)^T and sum x x^T = fan_in I over one orthogonal
    block: one mirror step (decay 1) at the default budget gives B = k W to float rounding,
    where the Gaussian drive is ~40 degrees off (the issue's 39.5 on one estimate)."""
    angles = {}
    for drive in ("gaussian", "orthogonal"):
        layer = asymprop.convert(nn.Linear(100, 50).double(), "wm", seed=0, warmup_steps=0,
                        decay=1.0, nonlinearity=nonlinearity, drive=drive)  # fmt: skip
        # a sequence has positions too: 100 examples x 3 positions = 3 blocks in the first half
        layer.feedback_state["input_shape"] = [8, *x_shape]
        if len(x_shape) == 2:
            layer.rule = dataclasses.replace(layer.rule, mirror_batch=200)
        asymprop.mirror(layer, steps=1)
        angles[drive] = asymprop.angle_deg(layer.feedback_weight, layer.weight)
        if drive == "orthogonal":
            B, W = layer.feedback_weight, layer.weight.detach()
            torch.testing.assert_close(B, W, rtol=1e-10, atol=1e-12)
    assert angles["orthogonal"] < 1e-6 and angles["gaussian"] > 20, angles


def test_orthogonal_drive_pairs_examples_and_keeps_the_gaussian_for_convolutions() -> None:
    from asymprop.mirror import _orthogonal_pairs

    x = _orthogonal_pairs([6, 4, 5], torch.Generator().manual_seed(0), torch.zeros(1))
    assert x.shape == (6, 4, 5)
    torch.testing.assert_close(x[3:], -x[:3])  # example n + N/2 is -(example n)
    rows = x[:3].reshape(-1, 5)  # 12 rows: two full 5 x 5 blocks and 2 rows of a third
    torch.testing.assert_close(rows[:5].T @ rows[:5], 5 * torch.eye(5), atol=1e-5, rtol=0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = asymprop.convert(net, "wm", seed=0, warmup_steps=0, decay=1.0, drive="orthogonal")
    asymprop.mirror(model, steps=1, example_input=torch.randn(2, 2, 6, 6))
    stats = asymprop.alignment(model)
    assert stats["2"]["angle_deg"] < 1e-3  # exact for the Linear
    assert stats["0"]["angle_deg"] > 1  # the conv keeps the Gaussian drive's noise
    with pytest.raises(ValueError, match="drive='orthogonal' needs baseline=None"):
        asymprop.convert(nn.Linear(3, 2), "wm", drive="orthogonal", baseline=1.0)
