"""``convert``: forward identity, parameter sharing, bp == autograd, and its errors."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import asymprop
from asymprop import FeedbackConv2d, FeedbackLinear, convert, feedback_layers, revert
from conftest import small_cnn, small_mlp, small_resnet

MODELS = {
    "mlp": (small_mlp, (7, 12)),
    "cnn": (small_cnn, (4, 3, 8, 8)),
    "resnet": (small_resnet, (4, 3, 8, 8)),
}


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad.clone()
    return grads


@pytest.mark.parametrize("kind", list(MODELS))
def test_bp_equals_autograd(kind: str) -> None:
    build, shape = MODELS[kind]
    reference = build().double()
    converted = convert(copy.deepcopy(reference), "bp")
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 5, (shape[0],))
    torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=0)
    ours, theirs = _grads(converted, x, y), _grads(reference, x, y)
    assert set(ours) == set(theirs) and len(ours) > 3
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("rule", ["fa", "usf", "frsf"])
def test_forward_is_identical_and_parameters_are_shared(kind: str, rule: str) -> None:
    build, shape = MODELS[kind]
    model = build()
    params = dict(model.named_parameters())
    originals = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    x = torch.randn(*shape)
    before = model(x)
    convert(model, rule, seed=1)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    for name, p in model.named_parameters():
        if not name.endswith("feedback_weight"):
            assert params[name] is p, name  # the same Parameter object, not a copy
    layers = feedback_layers(model)
    assert len(layers) == len(originals)
    for _, layer in layers:
        assert isinstance(layer, FeedbackLinear | FeedbackConv2d)
        assert isinstance(layer, nn.Linear | nn.Conv2d)  # user isinstance checks keep working
        assert layer.feedback_weight.shape == layer.weight.shape


def test_optimizer_built_before_conversion_still_trains_the_layers() -> None:
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    convert(model, "fa", seed=0)
    w0 = model[0].weight.detach().clone()
    asymprop.train_step(
        model, opt, nn.functional.cross_entropy, torch.randn(8, 12), torch.randint(0, 5, (8,))
    )
    assert not torch.equal(model[0].weight, w0)


def test_shared_layer_stays_one_layer() -> None:
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(4, 6), shared, nn.ReLU(), shared, nn.Linear(6, 2))
    convert(model, "fa", seed=0)
    assert model[1] is model[3]
    assert isinstance(model[1], FeedbackLinear)
    assert [n for n, _ in feedback_layers(model)] == ["0", "1", "4"]


def test_shared_block_in_two_parents_is_converted_once() -> None:
    block = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
    model = nn.ModuleDict({"a": nn.Sequential(block, nn.Linear(5, 3)), "b": nn.Sequential(block)})
    convert(model, "fa", seed=0)
    assert model["a"][0] is model["b"][0]
    assert model["a"][0][0] is model["b"][0][0]


def test_root_layer_is_returned() -> None:
    layer = nn.Linear(3, 2)
    new = convert(layer, "fa", seed=0)
    assert isinstance(new, FeedbackLinear) and new.weight is layer.weight


def test_exclude_patterns_keep_exact_backprop() -> None:
    model = small_cnn()
    convert(model, "fa", exclude=["7", "0"], seed=0)
    assert type(model[0]) is nn.Conv2d and type(model[7]) is nn.Linear
    assert isinstance(model[3], FeedbackConv2d)


def test_callable_chooses_rules_per_layer() -> None:
    model = small_mlp()

    def choose(name: str, layer: nn.Module) -> str | None:
        return None if name == "4" else ("usf" if name == "0" else "fa")

    convert(model, choose, seed=0)
    assert model[0].rule.name == "usf" and model[2].rule.name == "fa"
    assert type(model[4]) is nn.Linear


def test_subclasses_are_not_converted_and_are_named(caplog: pytest.LogCaptureFixture) -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with caplog.at_level(logging.WARNING, logger="asymprop.convert"):
        convert(model, "fa", seed=0)
    assert type(model[0]) is MyLinear
    assert "0.weight (subclass MyLinear of Linear" in caplog.text
    assert isinstance(model[2], FeedbackLinear)
    model(torch.randn(2, 4, 8)).sum().backward()


def test_hooks_and_training_flag_survive_conversion() -> None:
    model = small_mlp().eval()
    seen: list[tuple[int, ...]] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    convert(model, "fa", seed=0)
    model(torch.randn(3, 12))
    assert seen == [(3, 16)]
    assert not model[0].training


def test_revert_restores_plain_layers_with_same_parameters() -> None:
    model = small_resnet()
    params = list(model.parameters())
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    before = model(x)
    convert(model, "frsf", seed=0)
    revert(model)
    assert not feedback_layers(model)
    assert all(
        type(m) in (nn.Linear, nn.Conv2d)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    )
    assert list(model.parameters()) == params
    assert not any("feedback" in k for k in model.state_dict())
    torch.testing.assert_close(model(x), before)
    convert(model, "usf")  # can be converted again with another rule


def test_seed_makes_conversion_repeatable_and_differs_from_w() -> None:
    torch.manual_seed(0)
    a = convert(nn.Linear(10, 10), "fa", seed=0)
    torch.manual_seed(0)  # the same global stream that drew W must not draw B
    b = convert(nn.Linear(10, 10), "fa", seed=0)
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.feedback_weight, b.feedback_weight)
    assert not torch.allclose(a.feedback_weight, a.weight)
    c = convert(nn.Linear(10, 10), "fa", seed=1)
    assert not torch.equal(a.feedback_weight, c.feedback_weight)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("padding", ["same", "valid", 1])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
@pytest.mark.parametrize("kernel", [3, 4])
def test_conv_padding_variants_forward_and_bp(padding, padding_mode, kernel) -> None:
    conv = nn.Conv2d(2, 3, kernel, padding=padding, padding_mode=padding_mode).double()
    reference = copy.deepcopy(conv)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    layer = convert(conv, "usf", seed=0)
    out = layer(x)
    torch.testing.assert_close(out, reference(x))
    # with B = W the feedback path must equal autograd, whatever the padding
    layer.feedback_weight.copy_(layer.weight.detach())
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(layer.feedback_forward(x, layer.feedback_weight), x, g)
    (rx,) = torch.autograd.grad(reference(x), x, g)
    torch.testing.assert_close(gx, rx)


# ----------------------------------------------------------------------------- bad input


def test_unknown_rule_lists_valid_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown rule 'nope' \(did you mean 'np'\?\); valid rules: .*bp.*fa"
    ):
        convert(small_mlp(), "nope")


def test_unknown_option_is_named() -> None:
    with pytest.raises(
        TypeError, match=r"rule 'fa' has no option 'flip'; valid options: init, gain"
    ):
        convert(small_mlp(), "fa", flip=0.1)
    with pytest.raises(TypeError, match=r"rule 'bp' has no option 'x'; valid options: none"):
        convert(small_mlp(), "bp", x=1)


@pytest.mark.parametrize(
    ("rule", "options", "error", "pattern"),
    [
        ("brsf", {"flip": "half"}, TypeError, r"option 'flip' must be float, got 'half'"),
        ("frsf", {"flip": 1.5}, ValueError, r"flip=1.5 is out of range: must be in \[0.0, 1.0\]"),
        ("brsf", {"flip": -0.1}, ValueError, r"flip=-0.1 is out of range"),
        (
            "usf",
            {"scale": "huge"},
            TypeError,
            r"option 'scale' must be one of 'none', 'fan_in', 'norm'",
        ),
        ("fa", {"init": "zeros"}, TypeError, r"option 'init' must be one of 'uniform', 'normal'"),
        ("rndf", {"std": 0.0}, ValueError, r"std=0.0 is out of range: must be a finite number > 0"),
        ("fa", {"gain": True}, TypeError, r"option 'gain' must be float, got True"),
    ],
)
def test_ill_typed_or_out_of_range_options(rule, options, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        convert(small_mlp(), rule, **options)


def test_no_convertible_layer() -> None:
    with pytest.raises(
        ValueError, match=r"no layer to convert in Sequential: asymprop converts nn\.Linear"
    ):
        convert(nn.Sequential(nn.ReLU(), nn.Flatten()), "fa")
    with pytest.raises(ValueError, match=r"after exclude=\['\*'\]"):
        convert(small_mlp(), "fa", exclude=["*"])


def test_rule_of_wrong_type() -> None:
    with pytest.raises(TypeError, match="rule must be a rule name"):
        convert(small_mlp(), 3)
    with pytest.raises(TypeError, match="rule callable returned 5 for layer '0'"):
        convert(small_mlp(), lambda name, layer: 5)


def test_converting_twice_is_refused_with_the_fix() -> None:
    model = convert(small_mlp(), "fa")
    with pytest.raises(ValueError, match=r"already converted .* asymprop.revert\(model\)"):
        convert(model, "usf")


def test_rule_object_with_options() -> None:
    rule = asymprop.make_rule("brsf", flip=0.5)
    model = convert(small_mlp(), rule, scale="norm", seed=0)
    assert model[0].rule == asymprop.make_rule("brsf", flip=0.5, scale="norm")
