"""Model zoo by name: plain ``nn.Module``s of standard torch layers, sized to the dataset.

Every builder returns ordinary ``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm*`` / activation /
pooling layers (the residual blocks are small containers of those), so any feedback rule can
convert them, and every builder takes the dataset's ``input_shape`` and ``num_classes``:
MLPs flatten any input; CNNs size their first fully connected layer with a dry forward pass and
raise ``ValueError`` when the input is too small for their convolutions and pooling.

name          architecture                                           reference (seed file)
mlp           Flatten, [Linear, act] per width, Linear               --
lansdell-mlp  in-50-20-classes, sigmoid, linear output               004, App. C.1
autoencoder   in-200-2-200-in: tanh, identity, tanh, relu            004, App. C.2
liao-mnist    conv5x5x20, pool, conv5x5x50, pool, FC500, FC C        002, Table 1 (MNIST)
liao-cifar    conv5x5x32, max3/2, conv5x5x64, avg3/2, conv5x5x64,    002, Table 1 (CIFAR)
              avg3/2, FC128, FC C (convs padded by 2)
liao-svhn     conv5x5x20, pool, conv7x7x512, pool, FC40, FC C        002, Table 1 (SVHN)
liao-timit    FC512, FC256, FC C                                     002, Table 1 (TIMIT-80)
liao-large    conv9x9x48/2, pool, conv5x5x128, pool,                 002, Table 1 (others)
              FC max(256, 3C), FC 2C, FC C
crafton-cnn   conv3x3x32, max3/2, conv5x5x128, max3/2, conv5x5x256,  004, App. C.4
              max3/2, FC2048, FC2048, FC C (dropout 0.5; optional
              Gaussian activation noise, 004 Table 2b)
resnet20      He et al.'s CIFAR ResNet, 16/32/64 channels            He et al. 2016, Sec. 4.2
resnet18      torchvision's layout and names, BasicBlock             000, App. D.1
resnet50      torchvision's layout and names, Bottleneck (v1.5)      000, App. D.1

(C is ``num_classes``.) Liao et al.'s and the ResNets' ``bn_position`` puts batch norm
``before`` or ``after`` each hidden activation.

Example::

    >>> model = build_model("liao-mnist", (1, 28, 28), 10, batchnorm=True)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, final

import torch
from torch import nn

from ..rules import did_you_mean

__all__ = [
    "MODELS",
    "ActivationNoise",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_model",
    "list_models",
    "model_options",
    "register_model",
]

_Builder = Callable[..., nn.Module]
_B = TypeVar("_B", bound=_Builder)
MODELS: dict[str, _Builder] = {}

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}
_BN_POSITIONS = ("before", "after")


def register_model(name: str) -> Callable[[_B], _B]:
    """Add ``builder(input_shape, num_classes, *, **options) -> nn.Module`` under ``name``."""

    def decorator(builder: _B) -> _B:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(MODELS)


def model_options(name: str) -> dict[str, object]:
    """The options of model ``name`` and their defaults, e.g. ``{"widths": (256, 256), ...}``."""
    _check_name(name)
    params = inspect.signature(MODELS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, **options: object
) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` (one example) and ``num_classes``.

    Args:
        name: one of :func:`list_models`.
        input_shape: shape of one example, channels first, e.g. ``Dataset.input_shape``.
        num_classes: output size (ignored by ``autoencoder``, whose output is the input size).
        **options: the builder's keyword options (see :func:`model_options`).

    Raises:
        ValueError: unknown model, a bad option value, or a model that does not fit the input.
        TypeError: an option the model does not have.

    Example::

        >>> model = build_model("mlp", (1, 8, 8), 10, widths=(32,), activation="tanh")
        >>> [type(m).__name__ for m in model]
        ['Flatten', 'Linear', 'Tanh', 'Linear']
    """
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"model {name!r} has no option {unknown[0]!r}{did_you_mean(unknown[0], valid)}; "
            "valid options: " + (", ".join(sorted(valid)) or "none")
        )
    shape = tuple(int(s) for s in input_shape)
    return MODELS[name](shape, int(num_classes), **options)


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}{did_you_mean(name, list_models())}; valid names: "
            f"{', '.join(list_models())}"
        )


# ---------------------------------------------------------------------------------------------
# Building blocks


@dataclass(frozen=True)
class _BatchNorm:
    """Whether hidden layers get batch norm, and where: ``[w, bn, act]`` or ``[w, act, bn]``."""

    enabled: bool = False
    affine: bool = True
    position: str = "before"

    def __post_init__(self) -> None:
        if self.position not in _BN_POSITIONS:
            raise ValueError(f"bn_position must be one of {_BN_POSITIONS}, not {self.position!r}")


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}{did_you_mean(name, _ACTIVATIONS)}; valid: "
            f"{', '.join(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]()


def _layer(weight: nn.Module, act: nn.Module, norm: nn.Module, bn: _BatchNorm) -> list[nn.Module]:
    if not bn.enabled:
        return [weight, act]
    return [weight, norm, act] if bn.position == "before" else [weight, act, norm]


def _dense(
    in_features: int, out_features: int, activation: str = "relu", bn: _BatchNorm = _BatchNorm()
) -> list[nn.Module]:
    norm = nn.BatchNorm1d(out_features, affine=bn.affine)
    return _layer(nn.Linear(in_features, out_features), _activation(activation), norm, bn)


def _conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    bn: _BatchNorm = _BatchNorm(),
) -> list[nn.Module]:
    """Conv2d with ReLU (and batch norm if ``bn.enabled``)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
    return _layer(conv, nn.ReLU(), nn.BatchNorm2d(out_channels, affine=bn.affine), bn)


def _channels(name: str, input_shape: tuple[int, ...]) -> int:
    """Input channels of an image shape ``(C, H, W)``; a clear error for anything else."""
    if len(input_shape) != 3:
        raise ValueError(
            f"model {name!r} needs image inputs (channels, height, width) and does not fit "
            f"input_shape {input_shape}; use an MLP (e.g. mlp) for other inputs"
        )
    return input_shape[0]


def _flat_size(name: str, features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of features after ``features`` for one input, by a dry forward pass on zeros."""
    was_training = features.training
    features.eval()  # BN in eval mode: the dry run leaves running statistics untouched
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *input_shape))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(
            f"model {name!r} does not fit input_shape {input_shape}: its convolutions and "
            f"pooling shrink the input to nothing ({reason}); use a larger input or a model "
            "that adapts (mlp, resnet20, crafton-cnn)"
        ) from err
    finally:
        features.train(was_training)
    return out[0].numel()


def _cnn(
    name: str,
    input_shape: tuple[int, ...],
    features: list[nn.Module],
    hidden: Sequence[int],
    num_classes: int,
    bn: _BatchNorm = _BatchNorm(),
    dropout: float = 0.0,
    activation_noise: float = 0.0,
) -> nn.Sequential:
    """``features`` -> Flatten -> [Linear, ReLU (, Dropout) (, ActivationNoise)] per ``hidden``
    width -> Linear."""
    feature_stack = nn.Sequential(*features)
    width = _flat_size(name, feature_stack, input_shape)
    classifier: list[nn.Module] = []
    for out in hidden:
        classifier += _dense(width, out, "relu", bn)
        if dropout > 0:
            classifier.append(nn.Dropout(dropout))
        if activation_noise > 0:
            classifier.append(ActivationNoise(activation_noise))
        width = out
    classifier.append(nn.Linear(width, num_classes))
    return nn.Sequential(
        OrderedDict(
            features=feature_stack, flatten=nn.Flatten(), classifier=nn.Sequential(*classifier)
        )
    )


@final
class ActivationNoise(nn.Module):
    """Adds ``std * xi``, ``xi ~ N(0, I)``, to its input while training; the identity in eval.

    The "noise" entries of 004's ablation (Table 2, App. C.5): zero-mean Gaussian noise on the
    hidden activations of BP and FA, of the size ``c_h`` that node perturbation uses to
    estimate its gradients. Drawn from torch's global generator, like dropout (so a seed fixes
    it and a run resumes bit for bit).

    Example::

        >>> noise = ActivationNoise(0.1)
        >>> noise.eval()(torch.ones(2)).tolist()  # no noise at test time
        [1.0, 1.0]
    """

    def __init__(self, std: float) -> None:
        super().__init__()
        if not (std >= 0 and math.isfinite(std)):
            raise ValueError(f"activation noise std must be a finite number >= 0, not {std!r}")
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.std == 0:
            return x
        return x + self.std * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"std={self.std:g}"


def _numel(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


# ---------------------------------------------------------------------------------------------
# Fully connected models


@register_model("mlp")
def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    widths: Sequence[int] = (256, 256),
    activation: str = "relu",
    batchnorm: bool = False,
    bn_affine: bool = True,
    bn_position: str = "before",
) -> nn.Sequential:
    """A multilayer perceptron on the flattened input; the output layer is linear.

    ``h_{l+1} = act(W_l h_l + b_l)`` for each hidden width, then ``y = W_L h_L + b_L``.

    Args:
        widths: hidden layer sizes; ``()`` gives a linear classifier.
        activation: ``relu``, ``tanh``, ``sigmoid`` or ``identity``.
        batchnorm: add ``BatchNorm1d`` to every hidden layer.
        bn_affine: give the batch norm a learnable scale and shift (PyTorch's default).
        bn_position: batch norm ``before`` or ``after`` the activation.

    Example: ``mlp((1, 8, 8), 10, widths=(64,))`` is Flatten, Linear(64, 64), ReLU, Linear(64, 10).
    """
    if isinstance(widths, str) or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"widths must be positive integers, e.g. (256, 256), not {widths!r}")
    _activation(activation)  # an unknown name fails even when widths is empty
    bn = _BatchNorm(batchnorm, bn_affine, bn_position)
    layers: list[nn.Module] = [nn.Flatten()]
    width = _numel(input_shape)
    for out in widths:
        layers += _dense(width, out, activation, bn)
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("lansdell-mlp")
def lansdell_mlp(
    input_shape: tuple[int, ...], num_classes: int, *, widths: Sequence[int] = (50, 20)
) -> nn.Sequential:
    """Lansdell et al.'s 784-50-20-10 sigmoid network (seed 004, App. C.1 and C.3).

    Sigmoid hidden layers and a linear output: the paper trains it with an MSE loss on one-hot
    targets (use a softmax cross-entropy instead if you prefer; the model is the same).
    ``widths=(N, 50)`` gives the 784-N-50-10 networks of App. C.3.
    """
    return mlp(input_shape, num_classes, widths=widths, activation="sigmoid")


@register_model("autoencoder")
def autoencoder(
    input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 200, latent: int = 2
) -> nn.Sequential:
    """Lansdell et al.'s bottleneck autoencoder 784-200-2-200-784 (seed 004, App. C.2).

    Activations in order tanh, identity, tanh, relu, trained with an MSE reconstruction loss.
    The output is the flattened input, ``(batch, prod(input_shape))``; compare it with
    ``x.flatten(1)``. The final ReLU cannot produce negative values, so feed it pixels in
    [0, 1] (``load_dataset(..., normalize=False)``). ``num_classes`` is ignored.
    """
    size = _numel(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        *_dense(size, hidden, "tanh"),
        *_dense(hidden, latent, "identity"),
        *_dense(latent, hidden, "tanh"),
        *_dense(hidden, size, "relu"),
    )


@register_model("liao-timit")
def liao_timit(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    batchnorm: bool = False,
    bn_affine: bool = False,
    bn_position: str = "before",
) -> nn.Sequential:
    """Liao et al.'s TIMIT-80 network: FC512, FC256, FC classes with ReLU (seed 002, Table 1).

    The paper's input is 1845 features; any input is flattened. ``bn_affine=False``: Liao et al.
    use batch norm without learnable scale/shift except in their plain "BN" entries.
    """
    return mlp(
        input_shape,
        num_classes,
        widths=(512, 256),
        activation="relu",
        batchnorm=batchnorm,
        bn_affine=bn_affine,
        bn_position=bn_position,
    )


# ---------------------------------------------------------------------------------------------
# Liao et al. (seed 002) Table 1 CNNs. ReLU after every conv and hidden FC layer. Batch norm
# (optional) follows every conv and hidden FC layer; ``bn_affine=False`` by default because
# Liao et al. use no learnable BN scale/shift except in their plain "BN"/"BN+BM" entries.


@register_model("liao-mnist")
def liao_mnist(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    batchnorm: bool = False,
    bn_affine: bool = False,
    bn_position: str = "before",
) -> nn.Sequential:
    """Liao et al.'s MNIST CNN (seed 002, Table 1): 28x28x1 -> 4x4x50 -> FC500 -> classes.

    Conv 5x5x20/1, max-pool 2x2/2, conv 5x5x50/1, max-pool 2x2/2, FC 500, FC classes; no
    padding, so inputs need at least 16x16 pixels.
    """
    bn = _BatchNorm(batchnorm, bn_affine, bn_position)
    features = [
        *_conv(_channels("liao-mnist", input_shape), 20, 5, bn=bn),
        nn.MaxPool2d(2, 2),
        *_conv(20, 50, 5, bn=bn),
        nn.MaxPool2d(2, 2),
    ]
    return _cnn("liao-mnist", input_shape, features, (500,), num_classes, bn=bn)


@register_model("liao-cifar")
def liao_cifar(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    batchnorm: bool = False,
    bn_affine: bool = False,
    bn_position: str = "before",
) -> nn.Sequential:
    """Liao et al.'s CIFAR-10/100 CNN (seed 002, Table 1): 32x32x3 -> 4x4x64 -> FC128 -> classes.

    Conv 5x5x32, max-pool 3x3/2, conv 5x5x64, avg-pool 3x3/2, conv 5x5x64, avg-pool 3x3/2,
    FC 128, FC classes. Convs are zero-padded by 2; the paper pads each pooling by one unit at
    the right and bottom, which ``ceil_mode=True`` reproduces (32 -> 16 -> 8 -> 4) without
    counting the padding in averages.
    """
    bn = _BatchNorm(batchnorm, bn_affine, bn_position)
    features = [
        *_conv(_channels("liao-cifar", input_shape), 32, 5, padding=2, bn=bn),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        *_conv(32, 64, 5, padding=2, bn=bn),
        nn.AvgPool2d(3, 2, ceil_mode=True),
        *_conv(64, 64, 5, padding=2, bn=bn),
        nn.AvgPool2d(3, 2, ceil_mode=True),
    ]
    return _cnn("liao-cifar", input_shape, features, (128,), num_classes, bn=bn)


@register_model("liao-svhn")
def liao_svhn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    batchnorm: bool = False,
    bn_affine: bool = False,
    bn_position: str = "before",
) -> nn.Sequential:
    """Liao et al.'s SVHN CNN (seed 002, Table 1): 32x32x3 -> 4x4x512 -> FC40 -> classes.

    Conv 5x5x20/1, max-pool 2x2/2, conv 7x7x512/1, max-pool 2x2/2, FC 40, FC classes; no
    padding.
    """
    bn = _BatchNorm(batchnorm, bn_affine, bn_position)
    features = [
        *_conv(_channels("liao-svhn", input_shape), 20, 5, bn=bn),
        nn.MaxPool2d(2, 2),
        *_conv(20, 512, 7, bn=bn),
        nn.MaxPool2d(2, 2),
    ]
    return _cnn("liao-svhn", input_shape, features, (40,), num_classes, bn=bn)


@register_model("liao-large")
def liao_large(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    batchnorm: bool = False,
    bn_affine: bool = False,
    bn_position: str = "before",
) -> nn.Sequential:
    """Liao et al.'s "all others" CNN for 119x119x3 images (seed 002, Table 1).

    Conv 9x9x48/2, max-pool 2x2/2, conv 5x5x128/1, max-pool 2x2/2 (119 -> 12x12x128),
    FC max(256, 3 * classes), FC 2 * classes, FC classes; no padding.
    """
    bn = _BatchNorm(batchnorm, bn_affine, bn_position)
    features = [
        *_conv(_channels("liao-large", input_shape), 48, 9, stride=2, bn=bn),
        nn.MaxPool2d(2, 2),
        *_conv(48, 128, 5, bn=bn),
        nn.MaxPool2d(2, 2),
    ]
    hidden = (max(256, 3 * num_classes), 2 * num_classes)
    return _cnn("liao-large", input_shape, features, hidden, num_classes, bn=bn)


@register_model("crafton-cnn")
def crafton_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    dropout: float = 0.5,
    activation_noise: float = 0.0,
) -> nn.Sequential:
    """The CIFAR CNN of Lansdell et al. (seed 004, App. C.4), after Crafton et al. (2019).

    Conv 3x3x32/1, max-pool 3x3/2, conv 5x5x128/1, max-pool 3x3/2, conv 5x5x256/1,
    max-pool 3x3/2, FC 2048, FC 2048, FC classes, ReLU, dropout ``dropout`` after each hidden
    FC layer (the paper's 0.5; set 0 for a deterministic forward pass). The paper gives no
    padding; we use "same" padding (k // 2 for convs, 1 for pools) because without it a
    32x32 input does not survive the third conv: 32 -> 16 -> 8 -> 4, so FC 2048 sees 4096.

    ``activation_noise`` > 0 adds :class:`ActivationNoise` of that std (004's ``c_h``, Table 2b
    "noise") at the input of every weight layer but the first -- after each pooling and each
    hidden dropout, where node perturbation (``np``) perturbs -- while training; 0 (default)
    adds no module.
    """
    if not (activation_noise >= 0 and math.isfinite(activation_noise)):
        raise ValueError(
            f"crafton-cnn option activation_noise={activation_noise!r} must be a finite number >= 0"
        )

    def noise() -> list[nn.Module]:  # at the next weight layer's input, as np perturbs it
        return [ActivationNoise(activation_noise)] if activation_noise > 0 else []

    features = [
        *_conv(_channels("crafton-cnn", input_shape), 32, 3, padding=1),
        nn.MaxPool2d(3, 2, padding=1),
        *noise(),
        *_conv(32, 128, 5, padding=2),
        nn.MaxPool2d(3, 2, padding=1),
        *noise(),
        *_conv(128, 256, 5, padding=2),
        nn.MaxPool2d(3, 2, padding=1),
        *noise(),
    ]
    hidden = (2048, 2048)
    return _cnn(
        "crafton-cnn",
        input_shape,
        features,
        hidden,
        num_classes,
        dropout=dropout,
        activation_noise=activation_noise,
    )


# ---------------------------------------------------------------------------------------------
# ResNets. Parameter names follow torchvision (conv1, bn1, layer1..4, downsample, fc) so its
# state dicts load; torchvision itself is not needed. With ``bn_position="after"`` every batch
# norm moves behind its ReLU (conv -> relu -> bn), as in most of Akrout et al.'s runs (seed 000,
# App. D.3); the residual sum then comes before the block's last ReLU and batch norm.


def _norm_act(x: torch.Tensor, bn: nn.Module, relu: nn.Module, bn_before: bool) -> torch.Tensor:
    return relu(bn(x)) if bn_before else bn(relu(x))


def _downsample(in_channels: int, out_channels: int, stride: int, bn_affine: bool) -> nn.Module:
    # torchvision's (and He et al.'s option B) projection shortcut: 1x1 conv and batch norm.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        nn.BatchNorm2d(out_channels, affine=bn_affine),
    )


@final
class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        bn_affine: bool = True,
        bn_before: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, affine=bn_affine)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, affine=bn_affine)
        self.downsample = (
            _downsample(in_channels, channels, stride, bn_affine)
            if stride != 1 or in_channels != channels
            else None
        )
        self.bn_before = bn_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = _norm_act(self.conv1(x), self.bn1, self.relu, self.bn_before)
        out = self.conv2(out)
        if self.bn_before:
            return self.relu(self.bn2(out) + shortcut)
        return self.bn2(self.relu(out + shortcut))


@final
class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, torchvision's "v1.5"), 1x1 expand by 4, shortcut."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        bn_affine: bool = True,
        bn_before: bool = True,
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, affine=bn_affine)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, affine=bn_affine)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, affine=bn_affine)
        self.relu = nn.ReLU()
        self.downsample = (
            _downsample(in_channels, out_channels, stride, bn_affine)
            if stride != 1 or in_channels != out_channels
            else None
        )
        self.bn_before = bn_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = _norm_act(self.conv1(x), self.bn1, self.relu, self.bn_before)
        out = _norm_act(self.conv2(out), self.bn2, self.relu, self.bn_before)
        out = self.conv3(out)
        if self.bn_before:
            return self.relu(self.bn3(out) + shortcut)
        return self.bn3(self.relu(out + shortcut))


@final
class ResNet(nn.Module):
    """A stem, stages of residual blocks, global average pooling and a linear classifier.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        blocks: number of blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        widths: channels per stage (before the block's expansion).
        in_channels, num_classes: input channels and output size.
        imagenet_stem: 7x7/2 conv and 3x3/2 max-pool (ImageNet) instead of one 3x3 conv (CIFAR).
        bn_affine, bn_before: batch norm with learnable scale/shift; before (True) or after the
            ReLU.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks: Sequence[int],
        widths: Sequence[int],
        in_channels: int,
        num_classes: int,
        imagenet_stem: bool = True,
        bn_affine: bool = True,
        bn_before: bool = True,
    ) -> None:
        super().__init__()
        self.bn_before = bn_before
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], affine=bn_affine)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        channels = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block(channels, width, stride, bn_affine, bn_before))
                channels = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(_norm_act(self.conv1(x), self.bn1, self.relu, self.bn_before))
        for i in range(self.num_stages):
            x = self.get_submodule(f"layer{i + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))  # (batch, channels) -> (batch, classes)


def _resnet(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    bn_affine: bool,
    bn_position: str,
    **arch: object,
) -> ResNet:
    _BatchNorm(True, bn_affine, bn_position)  # validates bn_position
    return ResNet(
        in_channels=_channels(name, input_shape),
        num_classes=num_classes,
        bn_affine=bn_affine,
        bn_before=bn_position == "before",
        **arch,  # type: ignore[arg-type]
    )


@register_model("resnet20")
def resnet20(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    bn_affine: bool = True,
    bn_position: str = "before",
) -> ResNet:
    """He et al.'s (2016) CIFAR ResNet-20: 3x3 conv 16, three stages of 3 BasicBlocks (16/32/64).

    Uses 1x1-conv projection shortcuts (option B) where the shape changes, so every weight is
    an ordinary ``nn.Conv2d`` a feedback rule can convert (option A's zero padding has none).
    Global average pooling adapts to any image size. Paper: He et al., "Deep Residual Learning
    for Image Recognition", Sec. 4.2; used as a small stand-in for seed 000's ResNets.
    """
    return _resnet(
        "resnet20",
        input_shape,
        num_classes,
        bn_affine,
        bn_position,
        block=BasicBlock,
        blocks=(3, 3, 3),
        widths=(16, 32, 64),
        imagenet_stem=False,
    )


@register_model("resnet18")
def resnet18(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    bn_affine: bool = True,
    bn_position: str = "before",
) -> ResNet:
    """ResNet-18 in torchvision's layout (11,689,512 parameters for 1000 classes; seed 000, D.1).

    ``bn_position="after"`` puts batch norm after the ReLU, as in most of seed 000's runs.
    """
    return _resnet(
        "resnet18",
        input_shape,
        num_classes,
        bn_affine,
        bn_position,
        block=BasicBlock,
        blocks=(2, 2, 2, 2),
        widths=(64, 128, 256, 512),
    )


@register_model("resnet50")
def resnet50(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    bn_affine: bool = True,
    bn_position: str = "before",
) -> ResNet:
    """ResNet-50 in torchvision's layout (25,557,032 parameters for 1000 classes; seed 000, D.1).

    Bottleneck blocks with the stride on the 3x3 conv (torchvision's "v1.5").
    """
    return _resnet(
        "resnet50",
        input_shape,
        num_classes,
        bn_affine,
        bn_position,
        block=Bottleneck,
        blocks=(3, 4, 6, 3),
        widths=(64, 128, 256, 512),
    )


# ---------------------------------------------------------------------------------------------
# Modern architectures for the study beyond the seeds (docs/REPRODUCTION.md, issue 14): a small
# vision transformer, a transformer, a Conv1d net and a recurrent net over MNIST-1D's 40 time
# steps. Only standard layers carry weights (nn.Conv1d/2d, nn.Linear, nn.MultiheadAttention
# inside nn.TransformerEncoder, nn.LSTM/GRU), so every rule converts them completely; the class
# token and positional embeddings are broadcast offsets (first dimension 1), which carry no
# weight transport (``asymprop.audit``).


def _sequence_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(channels, length)`` of a sequence shape; a clear error for anything else."""
    if len(input_shape) != 2:
        raise ValueError(
            f"model {name!r} needs sequence inputs (channels, length), e.g. MNIST-1D's (1, 40), "
            f"and does not fit input_shape {input_shape}"
        )
    return input_shape[0], input_shape[1]


def _encoder(dim: int, depth: int, heads: int, mlp_dim: int) -> nn.TransformerEncoder:
    """``depth`` pre-norm blocks ``x + MHA(LN(x))``, ``x + MLP(LN(x))`` (GELU, no dropout)."""
    if dim % heads:
        raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
    block = nn.TransformerEncoderLayer(
        dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    # enable_nested_tensor is a fast path for padded batches that pre-norm blocks cannot use
    return nn.TransformerEncoder(block, depth, enable_nested_tensor=False)


@final
class TokenTransformer(nn.Module):
    """Tokens from a patch embedding, a transformer encoder, pooling and a linear head.

    ``tokens = embed(x)`` gives ``(N, T, dim)``; a learned positional embedding is added (and a
    class token prepended when ``pool="cls"``); ``depth`` pre-norm encoder blocks follow, then a
    LayerNorm and ``head``: ``logits = head(LN(pool(blocks(tokens))))``, pooled by the class
    token or the mean over tokens. The embedding is an ``nn.Conv2d`` (image patches, ViT) or an
    ``nn.Conv1d`` (windows of a sequence); its output channels are the token features.

    Args:
        embed: the patch embedding, ``(N, C, ...) -> (N, dim, ...)``.
        tokens: ``T``, the number of positions it produces.
        dim, depth, heads, mlp_dim: the encoder's width, blocks, attention heads, MLP width.
        num_classes: the head's outputs.
        pool: ``"cls"`` or ``"mean"``.
    """

    def __init__(
        self,
        embed: nn.Module,
        tokens: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        num_classes: int,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', not {pool!r}")
        self.pool = pool
        self.embed = embed
        # first dimension 1: broadcast offsets, no weight transport (asymprop.audit)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        extra = 1 if pool == "cls" else 0
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + extra, dim))
        self.encoder = _encoder(dim, depth, heads, mlp_dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, dim, ...) -> (N, T, dim)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.encoder(tokens + self.pos_embed)  # (N, T', dim)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)  # (N, dim)
        return self.head(self.norm(pooled))


@register_model("vit")
def vit(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    patch: int = 7,
    dim: int = 48,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 96,
    pool: str = "cls",
) -> TokenTransformer:
    """A small vision transformer (Dosovitskiy et al. 2021) for 28x28 images.

    Non-overlapping ``patch x patch`` patches embedded by an ``nn.Conv2d`` (kernel = stride =
    ``patch``: 28x28 -> 4x4 = 16 tokens of ``dim``), a class token, learned positional
    embeddings, ``depth`` pre-norm ``nn.TransformerEncoderLayer`` blocks (LayerNorm, ``heads``
    attention heads, a GELU MLP of ``mlp_dim``), a final LayerNorm and a linear head. The
    defaults have 42k weights: a ViT that two CPU cores train on Fashion-MNIST in minutes.

    Example: ``vit((1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)``.
    """
    channels = _channels("vit", input_shape)
    height, width = input_shape[1:]
    if height % patch or width % patch:
        raise ValueError(f"model 'vit': patch {patch} does not divide the image {height}x{width}")
    embed = nn.Conv2d(channels, dim, patch, stride=patch)
    tokens = (height // patch) * (width // patch)
    return TokenTransformer(embed, tokens, dim, depth, heads, mlp_dim, num_classes, pool)


@register_model("transformer1d")
def transformer1d(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    window: int = 5,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 64,
    pool: str = "mean",
) -> TokenTransformer:
    """A transformer over the time steps of a sequence (one token per step), e.g. MNIST-1D's 40.

    Each step's token is an ``nn.Conv1d`` of the ``window`` steps around it (padding keeps all
    ``L`` steps), plus a learned positional embedding; then ``depth`` pre-norm encoder blocks
    (LayerNorm, ``heads`` heads, GELU MLP of ``mlp_dim``), mean pooling over the steps (or a
    class token, ``pool="cls"``), LayerNorm and a linear head.

    Example: ``transformer1d((1, 40), 10)(torch.zeros(2, 1, 40)).shape == (2, 10)``.
    """
    channels, length = _sequence_shape("transformer1d", input_shape)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, not {window}")
    embed = nn.Conv1d(channels, dim, window, padding=window // 2)
    return TokenTransformer(embed, length, dim, depth, heads, mlp_dim, num_classes, pool)


@register_model("conv1d")
def conv1d(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    channels: Sequence[int] = (32, 32, 64),
    kernel_size: int = 5,
    batchnorm: bool = True,
    hidden: int = 128,
) -> nn.Sequential:
    """A 1-D convnet for sequences (MNIST-1D): per stage Conv1d, BatchNorm1d, ReLU, max-pool 2.

    ``channels`` stages of ``nn.Conv1d`` (kernel ``kernel_size``, "same" padding), each followed
    by ``BatchNorm1d`` (if ``batchnorm``), ReLU and ``MaxPool1d(2)`` (40 -> 20 -> 10 -> 5 steps),
    then Flatten, a hidden ``Linear`` of ``hidden`` units (with BN and ReLU) and a linear output.
    Greydanus 2020 (MNIST-1D) reports a small CNN far ahead of an MLP on this task.

    Example: ``conv1d((1, 40), 10)(torch.zeros(2, 1, 40)).shape == (2, 10)``.
    """
    in_channels, _ = _sequence_shape("conv1d", input_shape)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, not {kernel_size}")
    features: list[nn.Module] = []
    for out in channels:
        conv = nn.Conv1d(in_channels, out, kernel_size, padding=kernel_size // 2)
        features += _layer(conv, nn.ReLU(), nn.BatchNorm1d(out), _BatchNorm(batchnorm))
        features.append(nn.MaxPool1d(2))
        in_channels = out
    stack = nn.Sequential(*features)
    width = _flat_size("conv1d", stack, input_shape)
    return nn.Sequential(
        OrderedDict(
            features=stack,
            flatten=nn.Flatten(),
            classifier=nn.Sequential(
                *_dense(width, hidden, "relu", _BatchNorm(batchnorm)),
                nn.Linear(hidden, num_classes),
            ),
        )
    )


_CELLS: dict[str, Callable[..., nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@final
class RecurrentClassifier(nn.Module):
    """A recurrent layer read over the time steps, its last hidden state to a linear head.

    ``(N, C, L)`` is read as ``L`` steps of ``C`` features: ``h_t = cell(x_t, h_{t-1})`` and
    ``logits = head(h_L)``.
    """

    def __init__(self, rnn: nn.RNNBase, num_classes: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x.transpose(1, 2))  # (N, C, L) -> (N, L, C) -> (N, L, hidden)
        return self.head(states[:, -1])


@register_model("rnn1d")
def rnn1d(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    cell: str = "gru",
    hidden: int = 64,
    layers: int = 1,
) -> RecurrentClassifier:
    """A recurrent classifier over a sequence's time steps (``nn.GRU``, ``nn.LSTM`` or ``nn.RNN``).

    ``cell`` reads the ``L`` steps of ``C`` features (MNIST-1D: 40 steps of one value) with
    ``hidden`` units in ``layers`` layers; the last step's hidden state goes to a linear head.
    Every weight (``weight_ih``, ``weight_hh`` of each layer, the head) gets feedback.

    Example: ``rnn1d((1, 40), 10, cell="lstm")(torch.zeros(2, 1, 40)).shape == (2, 10)``.
    """
    if cell not in _CELLS:
        raise ValueError(
            f"unknown cell {cell!r}{did_you_mean(cell, _CELLS)}; valid: {', '.join(_CELLS)}"
        )
    channels, _ = _sequence_shape("rnn1d", input_shape)
    rnn = _CELLS[cell](channels, hidden, num_layers=layers, batch_first=True)
    return RecurrentClassifier(rnn, num_classes)
