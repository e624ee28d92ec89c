"""The model zoo: every registered model builds, runs and fits (or refuses) its input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import asymprop
from asymprop.harness.models import (
    BasicBlock,
    Bottleneck,
    RecurrentClassifier,
    ResNet,
    TokenTransformer,
    build_model,
    list_models,
    model_options,
)

# A matching input shape per registered model (the shape its paper uses, smaller where it adapts).
SHAPES = {
    "mlp": (1, 8, 8),
    "lansdell-mlp": (1, 28, 28),
    "autoencoder": (1, 28, 28),
    "liao-mnist": (1, 28, 28),
    "liao-cifar": (3, 32, 32),
    "liao-svhn": (3, 32, 32),
    "liao-timit": (1845,),
    "liao-large": (3, 119, 119),
    "crafton-cnn": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet18": (3, 64, 64),
    "resnet50": (3, 64, 64),
    "vit": (1, 28, 28),
    "transformer1d": (1, 40),
    "conv1d": (1, 40),
    "rnn1d": (1, 40),
}
LIAO_CNNS = ["liao-mnist", "liao-cifar", "liao-svhn", "liao-large"]
STANDARD = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Tanh, nn.Sigmoid,
            nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout,
            nn.Sequential, BasicBlock, Bottleneck, ResNet,
            nn.Conv1d, nn.MaxPool1d, nn.LayerNorm, nn.MultiheadAttention, nn.TransformerEncoder,
            nn.TransformerEncoderLayer, nn.ModuleList, nn.GRU, TokenTransformer,
            RecurrentClassifier)  # fmt: skip


def test_every_model_has_a_test_shape():
    assert set(SHAPES) == set(list_models())
    assert list_models() == sorted(list_models())


def slow_if_big(names: list[str]) -> list:
    """resnet50's forward and backward take a few seconds on 2 cores: the slow tier."""
    return [pytest.param(n, marks=pytest.mark.slow) if n == "resnet50" else n for n in names]


@pytest.mark.parametrize("name", slow_if_big(list_models()))
def test_builds_and_runs_forward(name):
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = build_model(name, shape, 7)
    assert model.training
    assert all(isinstance(m, STANDARD) for m in model.modules())
    x = torch.randn(3, *shape)
    out = model(x)
    expected = math.prod(shape) if name == "autoencoder" else 7
    assert out.shape == (3, expected)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(x[:1]).shape == (1, expected)


@pytest.mark.parametrize("name", list_models())
def test_build_is_deterministic_under_a_seed(name):
    if name == "resnet50":
        pytest.skip("same code path as resnet18, and 25M parameters to compare")
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        states.append(build_model(name, SHAPES[name], 4).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resnet_parameter_counts_match_torchvision():
    resnet18 = build_model("resnet18", (3, 224, 224), 1000)
    resnet50 = build_model("resnet50", (3, 224, 224), 1000)
    assert sum(p.numel() for p in resnet18.parameters()) == 11_689_512
    assert sum(p.numel() for p in resnet50.parameters()) == 25_557_032
    # torchvision's state-dict names, so its checkpoints load.
    keys18, keys50 = resnet18.state_dict().keys(), resnet50.state_dict().keys()
    assert (len(keys18), len(keys50)) == (122, 320)
    for key in ["conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "fc.bias",
                "layer2.0.downsample.0.weight", "layer4.1.bn2.num_batches_tracked"]:  # fmt: skip
        assert key in keys18
    assert "layer3.5.conv3.weight" in keys50 and "layer1.0.downsample.1.bias" in keys50


def test_resnet20_is_he_et_al_with_projection_shortcuts():
    model = build_model("resnet20", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2  # stem, 9 blocks x 2, two 1x1 shortcuts
    # 269,722 with option A's parameter-free shortcuts, plus two 1x1 convs and their BNs.
    assert sum(p.numel() for p in model.parameters()) == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)
    assert model(torch.randn(2, 1, 8, 8).expand(2, 3, 8, 8)).shape == (2, 10)


def test_resnet_bn_after_activation():
    before = build_model("resnet20", (3, 8, 8), 5)
    after = build_model("resnet20", (3, 8, 8), 5, bn_position="after", bn_affine=False)
    assert before.state_dict().keys() >= after.state_dict().keys()
    assert all(not m.affine for m in after.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(4, 3, 8, 8)
    after.load_state_dict(before.state_dict(), strict=False)
    assert not torch.allclose(before(x), after(x))
    assert after(x).shape == (4, 5)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("bn_before", [True, False])
def test_residual_blocks(block, bn_before):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    down = block(8, 4, stride=2, bn_before=bn_before)
    assert down(x).shape == (2, 4 * block.expansion, 3, 3)
    assert down.downsample is not None
    same = block(8, 8 // block.expansion, bn_before=bn_before)
    assert same.downsample is None
    out = same(x)
    assert out.shape == x.shape
    if bn_before:  # the block ends in a ReLU; with BN after, it ends in a batch norm
        assert (out >= 0).all()
    else:
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)


def test_mlp_accepts_any_input_shape():
    for shape in [(64,), (1, 40), (3, 5, 5)]:
        model = build_model("mlp", shape, 3, widths=(8, 4), activation="tanh")
        assert model(torch.randn(2, *shape)).shape == (2, 3)
    linear = build_model("mlp", (1, 8, 8), 10, widths=())
    assert [type(m) for m in linear] == [nn.Flatten, nn.Linear]


def layer_types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if not isinstance(m, (nn.Sequential, nn.Flatten))]


@pytest.mark.parametrize("name", ["mlp", "liao-timit", *LIAO_CNNS])
@pytest.mark.parametrize("bn_position", ["before", "after"])
def test_batchnorm_position(name, bn_position):
    model = build_model(name, SHAPES[name], 10, batchnorm=True, bn_position=bn_position)
    types = layer_types(model)
    bn_at = [i for i, t in enumerate(types) if t in (nn.BatchNorm1d, nn.BatchNorm2d)]
    weights = sum(t in (nn.Linear, nn.Conv2d) for t in types)
    assert len(bn_at) == weights - 1  # every hidden layer, not the output layer
    neighbour = (nn.Linear, nn.Conv2d) if bn_position == "before" else (nn.ReLU,)
    assert all(types[i - 1] in neighbour for i in bn_at)
    # Liao et al. use BN without learnable scale/shift; the generic MLP keeps PyTorch's default.
    affine = {m.affine for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert affine == {name == "mlp"}
    assert model(torch.randn(4, *SHAPES[name])).shape == (4, 10)


def test_dry_forward_leaves_batchnorm_statistics_untouched():
    model = build_model("liao-mnist", (1, 28, 28), 10, batchnorm=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_batches_tracked.item() == 0 and m.running_mean.abs().sum() == 0


def test_paper_architectures():
    lansdell = build_model("lansdell-mlp", (1, 28, 28), 10)
    assert [(m.in_features, m.out_features) for m in lansdell if isinstance(m, nn.Linear)] == [
        (784, 50), (50, 20), (20, 10)]  # fmt: skip
    assert sum(isinstance(m, nn.Sigmoid) for m in lansdell) == 2
    assert isinstance(lansdell[-1], nn.Linear)  # linear output
    ae = build_model("autoencoder", (1, 28, 28), 10)
    sizes = [(m.in_features, m.out_features) for m in ae if isinstance(m, nn.Linear)]
    assert sizes == [(784, 200), (200, 2), (2, 200), (200, 784)]
    acts = [type(m) for m in ae if not isinstance(m, (nn.Linear, nn.Flatten))]
    assert acts == [nn.Tanh, nn.Identity, nn.Tanh, nn.ReLU]
    # Flattened feature sizes after each Table 1 conv stack (seed 002).
    flat = {"liao-mnist": 4 * 4 * 50, "liao-cifar": 4 * 4 * 64, "liao-svhn": 4 * 4 * 512,
            "liao-large": 12 * 12 * 128, "crafton-cnn": 4 * 4 * 256}  # fmt: skip
    for name, size in flat.items():
        assert build_model(name, SHAPES[name], 10).classifier[0].in_features == size
    large = build_model("liao-large", (3, 119, 119), 102)
    fcs = [m.out_features for m in large.classifier if isinstance(m, nn.Linear)]
    assert fcs == [306, 204, 102]  # max(256, 3C), 2C, C
    timit = build_model("liao-timit", (1845,), 80)
    assert [m.out_features for m in timit if isinstance(m, nn.Linear)] == [512, 256, 80]
    crafton = build_model("crafton-cnn", (3, 32, 32), 10)
    assert [m.p for m in crafton.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    no_dropout = build_model("crafton-cnn", (3, 32, 32), 10, dropout=0)
    assert not any(isinstance(m, nn.Dropout) for m in no_dropout.modules())


def test_small_inputs_adapt_or_fail_clearly():
    digits = (1, 8, 8)
    for name in ["liao-cifar", "crafton-cnn", "resnet20", "resnet18"]:
        assert build_model(name, digits, 10)(torch.randn(2, *digits)).shape == (2, 10)
    for name in ["liao-mnist", "liao-svhn", "liao-large"]:
        with pytest.raises(ValueError, match=rf"{name}.*does not fit input_shape \(1, 8, 8\)"):
            build_model(name, digits, 10)
    for name in ["liao-mnist", "resnet18", "crafton-cnn"]:
        with pytest.raises(ValueError, match=rf"{name}.*needs image inputs.*\(1, 40\)"):
            build_model(name, (1, 40), 10)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="'nope'") as err:
        build_model("nope", (1, 8, 8), 10)
    assert all(name in str(err.value) for name in list_models())
    with pytest.raises(TypeError, match=r"'depth'.*valid options: .*widths"):
        build_model("mlp", (1, 8, 8), 10, depth=3)
    with pytest.raises(TypeError, match=r"'widths'.*valid options: activation_noise, dropout$"):
        build_model("crafton-cnn", (3, 32, 32), 10, widths=(3,))
    with pytest.raises(ValueError, match=r"'swish'.*relu, tanh, sigmoid, identity"):
        build_model("mlp", (1, 8, 8), 10, activation="swish")
    with pytest.raises(ValueError, match="widths must be positive integers"):
        build_model("mlp", (1, 8, 8), 10, widths="256,256")
    with pytest.raises(ValueError, match="bn_position"):
        build_model("liao-mnist", (1, 28, 28), 10, batchnorm=True, bn_position="middle")
    with pytest.raises(ValueError, match="bn_position"):
        build_model("resnet20", (3, 32, 32), 10, bn_position="middle")
    assert model_options("mlp")["widths"] == (256, 256)
    assert model_options("liao-mnist") == {
        "batchnorm": False, "bn_affine": False, "bn_position": "before"}  # fmt: skip


# --- the modern architectures of the study beyond the seeds (docs/REPRODUCTION.md) ----------------

MODERN = {  # small options: the contract, not the study's sizes
    "vit": ((1, 28, 28), {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16}),
    "transformer1d": ((1, 40), {"dim": 8, "depth": 2, "heads": 2, "mlp_dim": 8}),
    "conv1d": ((1, 40), {"channels": (4, 8), "hidden": 16}),
    "rnn1d": ((1, 40), {"cell": "gru", "hidden": 8}),
    "lstm": ((1, 40), {"cell": "lstm", "hidden": 8}),
}
STUDY_RULES = ["fa", "usf", "frsf", "kp", "wm", "dfa", "np"]


def modern(key: str, rule: str | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    shape, options = MODERN[key]
    torch.manual_seed(0)
    model = build_model("rnn1d" if key == "lstm" else key, shape, 10, **options)
    return (model if rule is None else asymprop.convert(model, rule, seed=0)), shape


def test_modern_architectures_shapes_and_layers():
    vit = build_model("vit", (1, 28, 28), 10)  # defaults: 16 patches of 7x7, dim 48
    assert vit(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert vit.pos_embed.shape == (1, 17, 48) and vit.cls_token.shape == (1, 1, 48)
    assert isinstance(vit.embed, nn.Conv2d) and vit.embed.stride == (7, 7)
    assert len(vit.encoder.layers) == 2 and vit.encoder.layers[0].norm_first
    mean = build_model("vit", (1, 28, 28), 10, pool="mean", patch=4)
    assert mean.pos_embed.shape == (1, 49, 48) and mean.cls_token is None
    seq = build_model("transformer1d", (1, 40), 10)
    assert seq.pos_embed.shape == (1, 40, 32)  # one token per time step
    assert seq(torch.randn(2, 1, 40)).shape == (2, 10)
    conv = build_model("conv1d", (1, 40), 10)
    types = layer_types(conv)
    assert types.count(nn.Conv1d) == 3 and types.count(nn.BatchNorm1d) == 4
    assert conv.classifier[0].in_features == 64 * 5  # 40 -> 20 -> 10 -> 5 steps
    for cell, kind in [("gru", nn.GRU), ("lstm", nn.LSTM), ("rnn", nn.RNN)]:
        rnn = build_model("rnn1d", (1, 40), 10, cell=cell, hidden=16)
        assert isinstance(rnn.rnn, kind) and rnn(torch.randn(2, 1, 40)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"'conv1d' needs sequence inputs.*\(1, 28, 28\)"):
        build_model("conv1d", (1, 28, 28), 10)
    with pytest.raises(ValueError, match=r"'vit' needs image inputs"):
        build_model("vit", (1, 40), 10)
    with pytest.raises(ValueError, match="patch 5 does not divide"):
        build_model("vit", (1, 28, 28), 10, patch=5)
    with pytest.raises(
        ValueError, match=r"unknown cell 'lru' \(did you mean 'gru'\?\); valid: lstm, gru, rnn"
    ):
        build_model("rnn1d", (1, 40), 10, cell="lru")
    with pytest.raises(ValueError, match="multiple of heads"):
        build_model("transformer1d", (1, 40), 10, dim=10, heads=4)


@pytest.mark.parametrize("key", list(MODERN))
def test_modern_architectures_convert_completely(key):
    """Every weight carries feedback: ``audit`` is {} for every rule the study runs, and bp
    (exact backprop by choice) leaves every weight listed."""
    for rule in STUDY_RULES:
        assert asymprop.audit(modern(key, rule)[0]) == {}, rule
    model, _ = modern(key, "bp")
    weights = [n for n, p in model.named_parameters() if p.dim() >= 2 and p.shape[0] != 1]
    assert sorted(asymprop.audit(model)) == sorted(weights)


@pytest.mark.parametrize("rule", STUDY_RULES)
@pytest.mark.parametrize("key", list(MODERN))
def test_modern_architectures_train_one_converted_step(key, rule):
    """One ``asymprop.train_step`` per rule: a finite loss, every weight moved, all finite."""
    model, shape = modern(key, rule)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    loss = asymprop.train_step(model, optimizer, nn.functional.cross_entropy, x, y)
    assert math.isfinite(loss)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("weight") and p.dim() >= 2:
            assert not torch.equal(p, before[name]), f"{name} did not move under {rule}"
    assert all(torch.isfinite(b).all() for b in model.buffers())
