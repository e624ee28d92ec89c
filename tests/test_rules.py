"""Each rule of the core issue against its definition, and a contract suite over ``RULES``."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop
from asymprop import RULES, convert, feedback_layers, train_step, update_feedback
from conftest import small_cnn, small_mlp

CE = F.cross_entropy


def _batch(n: int = 16, shape: tuple[int, ...] = (12,)) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, *shape), torch.randint(0, 5, (n,))


def _train(
    model: nn.Module, steps: int = 3, lr: float = 0.05, shape=(12,), opt=None
) -> torch.optim.Optimizer:
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x = torch.randn(16, *shape, generator=gen)
        y = torch.randint(0, 5, (16,), generator=gen)
        train_step(model, opt, CE, x, y)
    return opt


# ----------------------------------------------------------------------------- fa / rndf


@pytest.mark.parametrize("x_shape", [(6, 12), (3, 4, 12)])
def test_fa_linear_input_grad_is_grad_out_times_b(x_shape: tuple[int, ...]) -> None:
    layer = convert(nn.Linear(12, 7), "fa", seed=0)
    x = torch.randn(*x_shape, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, g @ layer.feedback_weight)
    bp = g @ layer.weight.detach()
    assert not torch.allclose(x.grad, bp, atol=1e-3)  # a rule that is secretly backprop fails


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"),
    [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (2, 1, 1, 2)],
)
def test_fa_conv_input_grad_is_transposed_conv_with_b(stride, padding, dilation, groups) -> None:
    layer = convert(nn.Conv2d(4, 6, 3, stride, padding, dilation, groups), "fa", seed=0)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    out_pad = [
        x.shape[2 + i] - ((out.shape[2 + i] - 1) * stride - 2 * padding + dilation * 2 + 1)
        for i in range(2)
    ]
    expected = F.conv_transpose2d(
        g, layer.feedback_weight, None, stride, padding, out_pad, groups, dilation
    )
    torch.testing.assert_close(x.grad, expected)
    bp = F.conv_transpose2d(
        g, layer.weight.detach(), None, stride, padding, out_pad, groups, dilation
    )
    assert not torch.allclose(x.grad, bp, atol=1e-3)


@pytest.mark.parametrize("rule", ["fa", "rndf"])
def test_fixed_feedback_never_changes_while_w_learns(rule: str) -> None:
    model = convert(small_mlp(), rule, seed=0)
    before = {n: layer.feedback_weight.clone() for n, layer in feedback_layers(model)}
    w_before = model[0].weight.detach().clone()
    _train(model, steps=5)
    assert not torch.equal(model[0].weight, w_before)
    for n, layer in feedback_layers(model):
        assert torch.equal(layer.feedback_weight, before[n])
        assert not layer.feedback_weight.requires_grad
        assert "feedback_weight" in dict(layer.named_buffers())


def test_fa_and_rndf_distributions() -> None:
    fa = convert(nn.Linear(400, 300), "fa", seed=0).feedback_weight
    bound = 1 / math.sqrt(400)
    assert fa.abs().max() <= bound and fa.abs().max() > 0.99 * bound
    normal = convert(nn.Linear(400, 300), "fa", init="normal", gain=2.0, seed=0).feedback_weight
    assert abs(normal.std().item() - 2 * bound) < 0.02 * bound * 2
    rndf = convert(nn.Linear(400, 300), "rndf", seed=0).feedback_weight
    assert abs(rndf.std().item() - 0.05) < 0.001 and abs(rndf.mean().item()) < 0.001


def test_fa_gradients_differ_from_backprop_in_a_network() -> None:
    ref = small_mlp()
    fa = convert(copy.deepcopy(ref), "fa", seed=0)
    x, y = _batch()
    CE(ref(x), y).backward()
    CE(fa(x), y).backward()
    torch.testing.assert_close(fa[4].weight.grad, ref[4].weight.grad)  # the top layer sees e itself
    assert not torch.allclose(fa[0].weight.grad, ref[0].weight.grad, atol=1e-4)


# ----------------------------------------------------------------------------- sign rules


@pytest.mark.parametrize("build,shape", [(small_mlp, (12,)), (small_cnn, (3, 8, 8))])
def test_usf_and_nusf_follow_sign_of_w_after_updates(build, shape) -> None:
    for rule in ("usf", "nusf"):
        model = convert(build(), rule, seed=0)
        signs_before = [torch.sign(layer.weight).clone() for _, layer in feedback_layers(model)]
        _train(model, steps=3, shape=shape, lr=0.5)
        changed = False
        for (_, layer), before in zip(feedback_layers(model), signs_before, strict=True):
            expected = torch.sign(layer.weight)
            if rule == "nusf":
                expected = expected / layer.fan_in
            torch.testing.assert_close(layer.feedback_weight, expected, rtol=0, atol=0)
            changed |= not torch.equal(before, torch.sign(layer.weight))
        assert changed, "the test must see some signs flip to mean anything"


def test_nusf_fan_in_is_filter_size() -> None:
    conv = convert(nn.Conv2d(8, 4, (3, 5), groups=2), "nusf", seed=0)
    assert conv.fan_in == 4 * 3 * 5
    torch.testing.assert_close(conv.feedback_weight.abs().max(), torch.tensor(1 / 60))


def _magnitudes(layer: nn.Module) -> torch.Tensor:
    return layer.feedback_weight / torch.sign(layer.weight)


def test_brsf_redraws_m_every_update_and_frsf_never() -> None:
    br = convert(small_mlp(), "brsf", seed=0)
    fr = convert(small_mlp(), "frsf", seed=0)
    for model in (br, fr):
        for _, layer in feedback_layers(model):
            m = _magnitudes(layer)
            assert (m >= 0).all() and (m <= 1).all()
    br_history = [_magnitudes(br[0]).clone()]
    fr_history = [_magnitudes(fr[0]).clone()]
    opt_br = torch.optim.SGD(br.parameters(), lr=0.01)
    opt_fr = torch.optim.SGD(fr.parameters(), lr=0.01)
    for _ in range(3):
        _train(br, steps=1, opt=opt_br)
        _train(fr, steps=1, opt=opt_fr)
        br_history.append(_magnitudes(br[0]).clone())
        fr_history.append(_magnitudes(fr[0]).clone())
    for a, b in itertools.pairwise(br_history):
        assert not torch.allclose(a, b)
    for m in fr_history[1:]:
        torch.testing.assert_close(m, fr_history[0])
    for model in (br, fr):
        for stats in asymprop.alignment(model).values():
            assert stats["sign_concordance"] == 1.0


@pytest.mark.parametrize("rule", ["brsf", "frsf"])
@pytest.mark.parametrize("flip", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_flip_gives_concordance_one_minus_p(rule: str, flip: float) -> None:
    model = convert(
        nn.Sequential(nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 50)), rule, flip=flip, seed=3
    )
    for _ in range(2):  # after updates too (brsf redraws S_p)
        for stats in asymprop.alignment(model).values():
            n = 100 * 50  # the smaller layer has 5000 entries: use its tolerance for both
            tolerance = 5 * math.sqrt(flip * (1 - flip) / n) + 1e-12
            assert abs(stats["sign_concordance"] - (1 - flip)) <= tolerance
        update_feedback(model)


def test_brsf_fast_draw_is_uniform_on_the_15_bit_grid() -> None:
    """M = (k + 1/2) / 2^15: k an integer in [0, 2^15); each of its 15 bits a fair coin at each
    of the four positions a 63-bit word feeds (5 sigma); the moments of U[0, 1]."""
    layer = convert(nn.Linear(1024, 1024, bias=False), "brsf", seed=0)
    k = layer.feedback_weight.detach().abs().double() * 2**15 - 0.5
    assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= 2**15 - 1
    k = k.long().flatten()
    for position in range(4):  # the int16s of one int64 word
        part = k[position::4]
        sigma = 0.5 / math.sqrt(part.numel())
        for bit in range(15):
            assert abs(float(((part >> bit) & 1).double().mean()) - 0.5) < 5 * sigma, (
                position,
                bit,
            )
    m = layer.feedback_weight.detach().abs().double()
    assert abs(float(m.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / m.numel())
    assert abs(float(m.var()) - 1 / 12) < 1e-3


def test_brsf_exact_draw_and_the_sign_of_a_zero_weight() -> None:
    fast = convert(nn.Linear(64, 32), "brsf", seed=0)
    exact = convert(nn.Linear(64, 32), "brsf", seed=0, draw="exact")
    grid = exact.feedback_weight.detach().abs().double() * 2**15 - 0.5
    assert not torch.equal(grid, grid.round())  # torch's uniform_: not on the 15-bit grid
    for layer in (fast, exact):
        with torch.no_grad():
            layer.weight[0, 0] = 0.0
            layer.weight[0, 1] = -0.5
        update_feedback(layer)
        assert layer.feedback_weight[0, 1] < 0
    assert exact.feedback_weight[0, 0] == 0  # sign(0) = 0
    assert fast.feedback_weight[0, 0] > 0  # copysign(M, +0.0) = +M, as documented
    with pytest.raises(TypeError, match="draw"):
        convert(nn.Linear(4, 2), "brsf", draw="bits")


def test_sign_scale_options() -> None:
    for rule in ("usf", "brsf", "frsf"):
        layer = convert(nn.Linear(50, 40), rule, scale="norm", seed=0)
        torch.testing.assert_close(layer.feedback_weight.norm(), layer.weight.norm().detach())
        layer = convert(nn.Linear(50, 40), rule, scale="fan_in", seed=0)
        assert layer.feedback_weight.abs().max() <= 1 / 50
    raw = convert(nn.Linear(50, 40), "usf", seed=0)
    assert raw.feedback_weight.norm() > 10 * raw.weight.norm()  # why Liao needed BN / BM


# ----------------------------------------------------------------------------- contract suite

CONTRACT_MODELS = {"mlp": (small_mlp, (12,)), "cnn": (small_cnn, (3, 8, 8))}


def _contract_rules() -> list[str]:
    return sorted(RULES)


@pytest.mark.parametrize("rule", _contract_rules())
@pytest.mark.parametrize("kind", list(CONTRACT_MODELS))
def test_contract_shapes_dtypes_and_no_nan(rule: str, kind: str) -> None:
    build, shape = CONTRACT_MODELS[kind]
    model = convert(build().double(), rule, seed=0)
    for _, layer in feedback_layers(model):
        assert layer.feedback_weight.dtype == torch.float64
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, *shape, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        loss = train_step(model, opt, CE, x, y)
        assert math.isfinite(loss)
    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("rule", _contract_rules())
def test_contract_state_dict_round_trip_continues_exactly(rule: str) -> None:
    build, shape = CONTRACT_MODELS["cnn"]
    torch.manual_seed(1)
    a = convert(build(), rule, seed=0)
    opt_a = _train(a, steps=2, shape=shape)
    torch.manual_seed(2)  # a differently initialised twin, then loaded from a's state
    b = convert(build(), rule, seed=99)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if from a file
    _train(a, steps=2, shape=shape, opt=opt_a)
    _train(b, steps=2, shape=shape, opt=opt_b)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if torch.is_tensor(ta):
            assert torch.equal(ta, tb), name
        else:
            assert ta == tb, name


@pytest.mark.parametrize("rule", _contract_rules())
def test_contract_deterministic_under_seed(rule: str) -> None:
    results = []
    for _ in range(2):
        torch.manual_seed(5)
        model = convert(small_mlp(), rule, seed=7)
        _train(model, steps=3)
        results.append(
            torch.cat(
                [p.detach().flatten() for p in model.state_dict().values() if torch.is_tensor(p)]
            )
        )
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("rule", _contract_rules())
def test_contract_loss_decreases(rule: str) -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(12, 5)
    x = torch.randn(256, 12)
    y = teacher(x).argmax(1)
    model = convert(
        nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5)),
        rule,
        seed=0,
    )
    opt = asymprop.optim.make_optimizer("sgd", model.parameters(), lr=0.05, momentum=0.9)
    first = CE(model(x), y).item()
    for _ in range(60):
        train_step(model, opt, CE, x, y)
    assert CE(model(x), y).item() < 0.7 * first
