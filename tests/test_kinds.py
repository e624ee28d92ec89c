"""Every layer kind with every rule: the layer-kind interface against its oracles (autograd, hand
computations), the contract suite over rules x kinds, the audit, registration, old checkpoints."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop
from asymprop import RULES, convert, feedback_layers, train_step
from asymprop.functional import feedback_conv

f64 = torch.float64
CE = F.cross_entropy

# ------------------------------------------------------------------ models, one per kind


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 6, 3, stride=2, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv1d(6, 8, 3, padding="same", dilation=2, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def _conv2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding="valid"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5),
    )


def _conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate"),
        nn.ReLU(),
        nn.Conv3d(4, 4, (1, 3, 3), stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 2 * 2, 5),
    )


def _conv_transpose1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2),
        nn.ReLU(),
        nn.ConvTranspose1d(4, 4, 3, stride=2, output_padding=1, groups=2, dilation=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16, 5),
    )


def _conv_transpose2d() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 3, groups=2, dilation=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def _conv_transpose3d() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose3d(2, 3, 2, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(3, 5),
    )


class _Tokens(nn.Module):
    """A Linear on (N, T, F) inputs (positions in the middle), then a mean over T."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))).mean(1)


class _Pairs(nn.Module):
    """nn.Bilinear between the two halves of a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bil, self.head = nn.Linear(10, 10), nn.Bilinear(4, 6, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        return self.head(torch.tanh(self.bil(h[:, :4], h[:, 4:])))


KINDS = {
    "bilinear": (_Pairs, (10,)),
    "linear-seq": (_Tokens, (4, 6)),
    "conv1d": (_conv1d, (3, 16)),
    "conv2d": (_conv2d, (3, 8, 8)),
    "conv3d": (_conv3d, (2, 5, 6, 6)),
    "conv_transpose1d": (_conv_transpose1d, (3, 16)),
    "conv_transpose2d": (_conv_transpose2d, (3, 4, 4)),
    "conv_transpose3d": (_conv_transpose3d, (2, 2, 2, 2)),
}


def _data(shape: tuple[int, ...], n: int = 16, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=dtype), torch.randint(
        0, 5, (n,), generator=gen
    )


# ------------------------------------------------------------------ bp is autograd


CONVS = [
    # (dims, transposed, stride, padding, dilation, groups, output_padding)
    (1, False, 2, 1, 1, 1, 0),
    (1, True, 2, 1, 2, 2, 1),
    (2, False, (2, 1), (0, 1), 1, 2, 0),
    (2, True, 2, 1, 1, 1, 1),
    (3, False, 1, 1, 2, 1, 0),
    (3, True, (1, 2, 2), 0, 1, 2, (0, 1, 1)),
]


def _conv_tensors(dims, transposed, groups, dtype=f64):
    cin, cout = 4, 6
    size, kernel = (5, 3) if dims < 3 else (3, 2)  # gradcheck's cost grows fast with dims
    x = torch.randn(2, cin, *([size] * dims), dtype=dtype, requires_grad=True)
    shape = (cin, cout // groups) if transposed else (cout, cin // groups)
    W = torch.randn(*shape, *([kernel] * dims), dtype=dtype, requires_grad=True)
    b = torch.randn(cout, dtype=dtype, requires_grad=True)
    return x, W, b


def _reference(x, W, b, dims, transposed, stride, padding, dilation, groups, output_padding):
    if transposed:
        op = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return op(x, W, b, stride, padding, output_padding, groups, dilation)
    op = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return op(x, W, b, stride, padding, dilation, groups)


@pytest.mark.parametrize("conv", CONVS)
def test_feedback_conv_with_b_equal_w_is_autograd(conv) -> None:
    dims, transposed, stride, padding, dilation, groups, output_padding = conv
    x, W, b = _conv_tensors(dims, transposed, groups)

    def fn(x, W, b):
        return feedback_conv(
            x, W, b, W.detach(), stride, padding, dilation, groups,
            transposed=transposed, output_padding=output_padding,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (x, W, b))
    ref = _reference(x, W, b, dims, transposed, stride, padding, dilation, groups, output_padding)
    torch.testing.assert_close(fn(x, W, b), ref, rtol=0, atol=0)


@pytest.mark.parametrize("conv", CONVS)
def test_fa_conv_input_error_is_the_adjoint_conv_with_b(conv) -> None:
    """Convolution: dL/dx = conv_transpose(g, B); transposed convolution: dL/dx = conv(g, B)."""
    dims, transposed, stride, padding, dilation, groups, output_padding = conv
    x, W, b = _conv_tensors(dims, transposed, groups)
    B = torch.randn_like(W)
    y = feedback_conv(
        x, W, b, B, stride, padding, dilation, groups,
        transposed=transposed, output_padding=output_padding,
    )  # fmt: skip
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    if transposed:
        op = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        expected = op(g, B, None, stride, padding, dilation, groups)
    else:
        op = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        s = (stride,) * dims if isinstance(stride, int) else stride
        p = (padding,) * dims if isinstance(padding, int) else padding
        d = (dilation,) * dims if isinstance(dilation, int) else dilation
        k = W.shape[2:]
        extra = [
            x.shape[2 + i] - ((y.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1)
            for i in range(dims)
        ]
        expected = op(g, B, None, s, p, extra, groups, d)
    torch.testing.assert_close(gx, expected)
    ref = _reference(x, W, b, dims, transposed, stride, padding, dilation, groups, output_padding)
    (rx,) = torch.autograd.grad(ref, x, g)
    assert not torch.allclose(gx, rx)  # really not backprop


@pytest.mark.parametrize("kind", list(KINDS))
def test_bp_whole_model_equals_autograd_in_float64(kind: str) -> None:
    build, shape = KINDS[kind]
    plain = build().double()
    model = convert(copy.deepcopy(plain), "bp")
    x, y = _data(shape, n=4, dtype=f64)
    grads = []
    for net in (plain, model):
        xi = x.clone().requires_grad_(True)
        loss = CE(net(xi), y)
        grads.append(torch.autograd.grad(loss, [xi, *net.parameters()]))
    for ours, ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d"])
def test_fa_with_padding_modes_equals_detach_trick(kind: str) -> None:
    """Padding modes (circular, reflect, replicate, 'same'): the oracle is the detach trick
    ``op(x.detach(), W) + op(x, B) - op(x, B).detach()`` with torch's own layer as op."""
    build, shape = KINDS[kind]
    plain = build().double()
    model = convert(copy.deepcopy(plain), "fa", seed=0)
    first = model[0]
    x = torch.randn(3, *shape, dtype=f64, requires_grad=True)
    B = first.feedback_weight
    y = first(x)
    layer = plain[0]
    trick = (
        layer._conv_forward(x.detach(), layer.weight, layer.bias)
        + layer._conv_forward(x, B, None)
        - layer._conv_forward(x, B, None).detach()
    )
    torch.testing.assert_close(y, trick)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (tx,) = torch.autograd.grad(trick, x, g)
    torch.testing.assert_close(gx, tx)
    # and the interface's input_grad is the same product
    torch.testing.assert_close(first.input_grad(g, B, x), gx)


def test_fa_bilinear_sends_each_input_b_times_the_other_input() -> None:
    """dL/dx1 = sum_k g_k B_k x2 and dL/dx2 = sum_k g_k B_k^T x1; W's gradient is autograd's."""
    plain = nn.Bilinear(3, 4, 5).double()
    model = convert(copy.deepcopy(plain), "fa", seed=0)
    assert isinstance(model, nn.Bilinear) and asymprop.audit(model) == {}
    x1 = torch.randn(2, 7, 3, dtype=f64, requires_grad=True)
    x2 = torch.randn(2, 7, 4, dtype=f64, requires_grad=True)
    y = model(x1, x2)
    torch.testing.assert_close(y, plain(x1, x2))
    g = torch.randn_like(y)
    g1, g2, gW, gb = torch.autograd.grad(y, (x1, x2, model.weight, model.bias), g)
    B = model.product.feedback_weight
    torch.testing.assert_close(g1, torch.einsum("nlk,kij,nlj->nli", g, B, x2))
    torch.testing.assert_close(g2, torch.einsum("nlk,kij,nli->nlj", g, B, x1))
    r1, _, rW, rb = torch.autograd.grad(plain(x1, x2), (x1, x2, plain.weight, plain.bias), g)
    torch.testing.assert_close(gW, rW)
    torch.testing.assert_close(gb, rb)
    assert not torch.allclose(g1, r1)
    assert type(asymprop.revert(model)) is nn.Bilinear


# ------------------------------------------------------------------ the interface itself


@pytest.mark.parametrize("kind", list(KINDS))
def test_interface_products_equal_autograd(kind: str) -> None:
    """``input_grad`` and ``weight_grad`` equal autograd's vjps of ``weight_op``, ``pairs``
    counts pairs, ``fan_in`` is the inputs per output unit, for every layer of every kind."""
    build, shape = KINDS[kind]
    model = convert(build().double(), "fa", seed=0)
    x = torch.randn(3, *shape, dtype=f64)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
        for name, layer in feedback_layers(model)
    ]
    model(x)
    for h in handles:
        h.remove()
    for name, layer in feedback_layers(model):
        h = inputs[name].detach().requires_grad_(True)
        W = layer.weight.detach().clone().requires_grad_(True)
        out = layer.weight_op(h, W)
        g = torch.randn_like(out)
        gx, gW = torch.autograd.grad(out, (h, W), g)
        B = layer.feedback_weight
        gxB = torch.autograd.grad(layer.weight_op(h, B), h, g)[0]
        torch.testing.assert_close(layer.input_grad(g, B, h), gxB)
        torch.testing.assert_close(layer.weight_grad(h.detach(), g), gW)
        assert gx.shape == h.shape
        ones = torch.ones_like(h[:1])
        n_out = layer.weight_op(ones, W.detach())
        pairs = torch.autograd.grad(layer.weight_op(ones, W), W, torch.ones_like(n_out))[0]
        torch.testing.assert_close(layer.pairs(h.shape).expand_as(W), pairs)
        # fan_in: the inputs one output unit sums (all taps, one group)
        w = layer.weight
        expected = w.shape[1] * math.prod(w.shape[2:])
        if type(layer).__name__.startswith("FeedbackConvTranspose"):
            expected = w.shape[0] // layer.groups * math.prod(w.shape[2:])
        assert layer.fan_in == expected


# ------------------------------------------------------------------ the contract: rules x kinds


def _rules() -> list[str]:
    return sorted(RULES)


@pytest.mark.parametrize("rule", _rules())
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_rule_trains_every_kind(rule: str, kind: str) -> None:
    build, shape = KINDS[kind]
    torch.manual_seed(0)
    model = convert(build(), rule, seed=0, strict=True)
    assert asymprop.audit(model) == ({} if rule != "bp" else asymprop.audit(model))
    x, y = _data(shape, n=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = CE(model(x), y).item()
    losses = [train_step(model, opt, CE, x, y) for _ in range(25)]
    assert all(math.isfinite(v) for v in losses), losses
    assert CE(model(x), y).item() < first, (first, losses[-3:])
    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("kind", list(KINDS))
def test_delta_alignment_reports_every_converted_layer(kind: str) -> None:
    build, shape = KINDS[kind]
    for rule in ("bp", "fa"):
        model = convert(build().double(), rule, seed=0)
        x, y = _data(shape, n=8, dtype=f64)
        angles = asymprop.delta_alignment(model, CE, x, y)
        names = [n for n, _ in feedback_layers(model)]
        assert list(angles) == names
        # the first layer's input is data: it has an error all the same (a leaf of our own)
        assert all(math.isfinite(a) for a in angles.values()), angles
        if rule == "bp":
            assert max(angles.values()) < 1e-5
        else:
            assert max(angles.values()) > 1.0  # fa really differs below the output layer


@pytest.mark.parametrize("kind", ["conv1d", "conv_transpose2d", "conv3d"])
def test_kp_difference_shrinks_by_one_minus_lr_lambda(kind: str) -> None:
    build, shape = KINDS[kind]
    model = convert(build().double(), "kp", seed=0)
    lr, wd = 0.1, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    x, y = _data(shape, n=8, dtype=f64)
    before = {n: (m.feedback_weight - m.weight).detach().clone() for n, m in feedback_layers(model)}
    train_step(model, opt, CE, x, y)
    for name, layer in feedback_layers(model):
        after = (layer.feedback_weight - layer.weight).detach()
        torch.testing.assert_close(after, (1 - lr * wd) * before[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(KINDS))
def test_wm_with_w_fixed_reaches_its_plateau_on_every_kind(kind: str) -> None:
    """With the defaults every weight averages >= 2 fan_in pairs per mirror step, so the
    predicted plateau is atan(sqrt((2 - 2/pi) 0.5 / (1.5 * 2))) = 25 degrees or less."""
    build, shape = KINDS[kind]
    torch.manual_seed(0)
    model = convert(build(), "wm", seed=0, warmup_steps=0)
    x, _ = _data(shape, n=4)
    asymprop.mirror(model, steps=30, example_input=x)
    plateau = math.degrees(math.atan(math.sqrt((2 - 2 / math.pi) * 0.5 / (1.5 * 2))))
    for name, stats in asymprop.alignment(model).items():
        # the bilinear product's estimates are heavier-tailed: 34 degrees, 30-40 over seeds
        bound = 45 if name == "bil.product" else plateau + 8
        assert stats["angle_deg"] < bound, (name, stats["angle_deg"], plateau)


# ------------------------------------------------------------------ the audit


class _RawLinear(nn.Module):
    """A model that uses its own Parameter through F.linear: convert cannot see the call."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(F.linear(x, self.w)))


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nd,kde->nke", x, self.table).flatten(1)


def test_audit_is_empty_for_supported_models_and_lists_what_is_left() -> None:
    for build, _ in KINDS.values():
        assert asymprop.audit(convert(build(), "fa", seed=0)) == {}
    assert asymprop.audit(nn.Sequential(nn.Linear(4, 2))) == {
        "0.weight": "Linear not converted (call asymprop.convert)"
    }
    raw = convert(_RawLinear(), "fa", seed=0)
    left = asymprop.audit(raw)
    assert list(left) == ["w"] and "_RawLinear" in left["w"] and "functional call" in left["w"]
    model = convert(nn.Sequential(_Custom(), nn.Linear(24, 3)), "fa", seed=0)
    assert list(asymprop.audit(model)) == ["0.table"]
    # exclusions are reported as such; the embedding table and norm scales are not listed
    model = nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.Linear(6, 2))
    convert(model, "fa", seed=0, exclude=["2"])
    assert asymprop.audit(model) == {"2.weight": "excluded by pattern '2'"}
    bp = convert(nn.Sequential(nn.Linear(4, 2)), "bp")
    assert asymprop.audit(bp) == {"0.weight": "rule 'bp' (exact backprop by choice)"}


def test_strict_raises_naming_every_parameter_left(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(
        ValueError, match=r"strict=True.*1 weight\(s\).*w \(a parameter of _RawLinear"
    ):
        convert(_RawLinear(), "fa", seed=0, strict=True)
    # exclusions and bp are the user's choice: strict accepts them
    convert(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "fa", exclude=["0"], strict=True)
    convert(nn.Sequential(nn.Linear(4, 2)), "bp", strict=True)
    with caplog.at_level(logging.INFO, logger="asymprop.convert"):
        convert(_RawLinear(), "fa", seed=0)
    assert "1 layer(s), 1 weight(s) carry feedback; left on backprop: w (" in caplog.text


# ------------------------------------------------------------------ registering a new kind


class InOut(nn.Module):
    """A layer asymprop does not know: W stored as (in, out), y = x @ W + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class InOutKind(asymprop.FeedbackLayer):
    """Only what register_layer requires, plus fan_in: the rest is the generic interface."""

    def native_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias

    def weight_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight

    @property
    def fan_in(self) -> int:
        return int(self.weight.shape[0])


@pytest.fixture
def registered_in_out():
    asymprop.register_layer(InOut, InOutKind)
    yield
    from asymprop import layers

    layers._FEEDBACK_TYPES.pop(InOut, None)


def _in_out_net() -> nn.Module:
    return nn.Sequential(InOut(12, 16), nn.Tanh(), InOut(16, 5))


def test_registered_kind_fa_sends_the_error_through_b(registered_in_out) -> None:
    model = convert(_in_out_net().double(), "fa", seed=0, strict=True)
    assert isinstance(model[0], InOut) and asymprop.audit(model) == {}
    x = torch.randn(4, 12, dtype=f64, requires_grad=True)
    h = model[0](x)
    g = torch.randn_like(h)
    (gx,) = torch.autograd.grad(h, x, g)
    torch.testing.assert_close(gx, g @ model[0].feedback_weight.t())  # B in (in, out)
    plain = convert(_in_out_net().double(), "bp")
    ref = copy.deepcopy(plain)
    x, y = _data((12,), n=4, dtype=f64)
    ga = torch.autograd.grad(CE(plain(x), y), list(plain.parameters()))
    gb = torch.autograd.grad(CE(ref(x), y), list(ref.parameters()))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rule", _rules())
def test_registered_kind_trains_under_every_rule(registered_in_out, rule: str) -> None:
    torch.manual_seed(0)
    model = convert(_in_out_net(), rule, seed=0, strict=True)
    x, y = _data((12,), n=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = CE(model(x), y).item()
    for _ in range(25):
        assert math.isfinite(train_step(model, opt, CE, x, y))
    assert CE(model(x), y).item() < first


def test_kind_registered_by_name_is_resolved_lazily() -> None:
    from asymprop import layers

    name = f"{__name__}.LazyLinear"
    asymprop.register_layer(name, InOutKind)
    try:
        cls = type("LazyLinear", (InOut,), {"__module__": __name__})
        model = convert(nn.Sequential(cls(4, 3)), "fa", seed=0, strict=True)
        assert isinstance(model[0], asymprop.FeedbackLayer) and isinstance(model[0], cls)
    finally:
        layers._LAZY_KINDS.pop(name, None)
        for key in [k for k in layers._FEEDBACK_TYPES if k.__name__ == "LazyLinear"]:
            layers._FEEDBACK_TYPES.pop(key)


def test_register_layer_rejects_a_kind_that_is_not_one() -> None:
    with pytest.raises(TypeError, match="kind must be a FeedbackLayer subclass"):
        asymprop.register_layer(InOut, 3)  # type: ignore[arg-type]


# ------------------------------------------------------------------ checkpoints of 0.1.0


CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints-0.1.0.pt"


@pytest.mark.parametrize("rule", ["bp", "fa", "brsf", "frsf", "kp", "wm", "np", "dfa"])
def test_checkpoints_of_0_1_0_load_and_continue_exactly(rule: str) -> None:
    """State dicts saved before the layer-kind interface (tests/data/make_checkpoints_0_1_0.py)
    load (strict), and one more step gives the state 0.1.0 gave, bit for bit. Today's keys are
    0.1.0's but bp's alias of W."""
    saved = torch.load(CHECKPOINTS, weights_only=False)[rule]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    convert(model, rule, seed=1, **({"draw": "exact"} if rule == "brsf" else {}))  # 0.1.0's M
    alias = [k for k in saved["state"] if rule == "bp" and k.endswith("feedback_weight")]
    assert list(model.state_dict()) == [k for k in saved["state"] if k not in alias]
    model.load_state_dict(saved["state"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-3)
    train_step(model, opt, CE, saved["x"], saved["y"])
    for key, value in model.state_dict().items():
        expected = saved["next"][key]
        if torch.is_tensor(value):
            assert torch.equal(value, expected), key
        else:
            assert value == expected, key


@pytest.mark.parametrize("rule", _rules())
def test_no_rule_but_bp_is_secretly_backprop(rule: str) -> None:
    """The first layer's weight gradient (its error came through every feedback path above)
    differs from autograd's for every rule but bp, and equals it for bp."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 5)).double()  # fmt: skip
    model = convert(copy.deepcopy(plain), rule, seed=0)
    x, y = _data((12,), n=16, dtype=f64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: W stays plain's
    train_step(model, opt, CE, x, y)  # rules that need the step's hooks (np, wm's warm-up)
    CE(plain(x), y).backward()
    ours, exact = model[0].weight.grad, plain[0].weight.grad
    assert ours is not None and exact is not None
    if rule == "bp":
        torch.testing.assert_close(ours, exact)
    else:
        assert not torch.allclose(ours, exact, rtol=1e-3, atol=1e-8), rule


def test_a_reconversion_forgets_the_earlier_exclusions() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    convert(model, "fa", exclude=["0"])
    assert asymprop.audit(model) == {"0.weight": "excluded by pattern '0'"}
    asymprop.revert(model)
    convert(model, "fa", exclude=["1"])
    assert asymprop.audit(model) == {"1.weight": "excluded by pattern '1'"}
