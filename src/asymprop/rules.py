"""Feedback rules: one small class per rule, and the registry ``RULES``.

A rule answers two questions for every layer it owns (STYLE.md's two axes):

* **which matrix carries the error backward** -- ``backward_weight(layer)``: W itself (``bp``),
  a fixed random B (``fa``, ``rndf``), sign(W) times magnitudes (the sign rules), a learned B
  (``kp``, ``wm``, ``np``);
* **how the forward weights get their gradient** -- ``forward(layer, x)``, the estimator: by
  default the backward pass through the feedback layer (``asymprop.functional``); rules such as DFA
  or node perturbation override it, or use the ``before_forward``/``after_backward`` hooks of
  ``asymprop.train_step``.

and says how B changes between steps (``update``, run by ``asymprop.update_feedback`` after
``optimizer.step()``). Rules hold hyperparameters only: every tensor lives in the layer
(``feedback_weight``, ``feedback_*`` buffers, ``feedback_state``) so ``state_dict`` holds it all.

A new rule is one class and one ``@register_rule`` line::

    @register_rule
    @dataclass(frozen=True)
    class Transpose(FeedbackRule):
        name = "transpose"
        def initial_feedback(self, layer, generator):
            return layer.weight.detach().clone()
        def update_layer(self, layer):
            layer.feedback_weight.copy_(layer.weight)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .layers import FeedbackLayer

__all__ = [
    "BP",
    "FA",
    "KP",
    "RULES",
    "USF",
    "BrSF",
    "FeedbackRule",
    "FrSF",
    "NuSF",
    "RndF",
    "StepContext",
    "did_you_mean",
    "make_rule",
    "register_rule",
]


@dataclass
class StepContext:
    """What ``asymprop.train_step`` shows a rule's hooks about the current engaged step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    inputs: Tensor
    targets: Tensor
    layers: list[tuple[str, FeedbackLayer]]
    outputs: Tensor | None = None
    loss: Tensor | None = None


@dataclass(frozen=True)
class FeedbackRule:
    """Base class of all rules: a frozen dataclass of hyperparameters.

    Subclasses set ``name`` and implement ``initial_feedback``; they may override
    ``backward_weight``, ``forward``, ``update``/``update_layer`` and the train-step hooks.
    Options are the dataclass fields; their annotations are checked on construction, and
    ``validate`` checks ranges.
    """

    name: ClassVar[str] = ""
    #: B is an ``nn.Parameter`` updated by the user's optimizer (Kolen-Pollack).
    trainable_feedback: ClassVar[bool] = False
    #: the rule needs ``train_step`` (it must see the batch and the loss), not only
    #: ``update_feedback``.
    needs_train_step: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_option_types(self)
        self.validate()

    def validate(self) -> None:
        """Check option ranges; raise ``ValueError`` naming the option and the valid range."""

    # --- set-up -----------------------------------------------------------------------------
    def init_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> None:
        """Create the layer's feedback state; ``generator`` (CPU) draws anything random."""
        initial = self.initial_feedback(layer, generator)
        if initial is not None:
            initial = initial.to(device=layer.weight.device, dtype=layer.weight.dtype)
        layer.set_feedback_weight(initial, trainable=self.trainable_feedback)

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor | None:
        """B at conversion, in W's shape; ``None`` means B *is* W (exact backprop)."""
        raise NotImplementedError(f"{type(self).__name__} must implement initial_feedback")

    # --- the pass ---------------------------------------------------------------------------
    def backward_weight(self, layer: FeedbackLayer) -> Tensor:
        """The tensor the error travels through on its way to the layer's input."""
        return layer.feedback_weight

    def forward(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        """The estimator: the layer's forward value, with the gradient this rule sends."""
        backward_weight = self.backward_weight(layer)
        if backward_weight is layer.weight:  # exact backprop: torch's own op, no overhead
            return layer.native_forward(input)
        return layer.feedback_forward(input, backward_weight)

    # --- between steps ----------------------------------------------------------------------
    def update(self, layers: Sequence[FeedbackLayer]) -> None:
        """Change B after ``optimizer.step()`` for all layers this rule owns (module order)."""
        with torch.no_grad():
            for layer in layers:
                self.update_layer(layer)

    def update_layer(self, layer: FeedbackLayer) -> None:
        """Change one layer's B in place (default: B is fixed or trained by the optimizer)."""

    def before_forward(self, step: StepContext) -> None:
        """``train_step`` hook, before the engaged forward pass."""

    def after_backward(self, step: StepContext) -> None:
        """``train_step`` hook, after ``loss.backward()`` and before ``optimizer.step()``."""

    #: the rule has a mode that changes only B, without the task's data (weight mirrors'
    #: mirror mode): :func:`asymprop.train.feedback_step` runs it.
    has_feedback_mode: ClassVar[bool] = False

    def feedback_step(
        self, model: nn.Module, layers: Sequence[FeedbackLayer], example_input: Tensor | None
    ) -> None:
        """One step of the feedback-only mode on ``layers`` (``has_feedback_mode`` rules);
        ``example_input``, if given, is a batch from which layers learn their input shapes."""
        raise NotImplementedError(f"rule {self.name!r} has no feedback-only mode")


RULES: dict[str, type[FeedbackRule]] = {}
"""Registry: rule name -> rule class. ``list(asymprop.RULES)`` gives the names."""

R = TypeVar("R", bound=type[FeedbackRule])


def register_rule(cls: R) -> R:
    """Class decorator adding a rule to ``RULES`` under ``cls.name``."""
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` (a non-empty string)")
    if cls.name in RULES and RULES[cls.name] is not cls:
        raise ValueError(f"a rule named {cls.name!r} is already registered ({RULES[cls.name]})")
    RULES[cls.name] = cls
    return cls


def make_rule(rule: str | FeedbackRule, **options: Any) -> FeedbackRule:
    """A rule object from a registered name (with options) or a rule object (options replace).

    Raises:
        ValueError: unknown name (lists the valid ones) or an option out of range.
        TypeError: unknown option (lists the valid ones) or an option of the wrong type.
    """
    if isinstance(rule, FeedbackRule):
        cls: type[FeedbackRule] = type(rule)
        _check_option_names(cls, options)
        return dataclasses.replace(rule, **options) if options else rule
    if isinstance(rule, str):
        key = rule.lower()
        if key not in RULES:
            raise ValueError(
                f"unknown rule {rule!r}{did_you_mean(key, RULES)}; valid rules: "
                f"{', '.join(sorted(RULES))}"
            )
        cls = RULES[key]
        _check_option_names(cls, options)
        return cls(**options)
    raise TypeError(
        f"rule must be a rule name ({', '.join(sorted(RULES))}), a FeedbackRule object or a "
        f"callable (qualified_name, layer) -> rule or None; got {type(rule).__name__}"
    )


def _check_option_names(cls: type[FeedbackRule], options: dict[str, Any]) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in valid:
            choices = ", ".join(valid) if valid else "none"
            raise TypeError(
                f"rule {cls.name!r} has no option {key!r}{did_you_mean(key, valid)}; valid "
                f"options: {choices}"
            )


def _check_option_types(rule: FeedbackRule) -> None:
    hints = typing.get_type_hints(type(rule))
    for field in dataclasses.fields(rule):
        value = getattr(rule, field.name)
        if not _matches(value, hints[field.name]):
            raise TypeError(
                f"rule {rule.name!r} option {field.name!r} must be {_describe(hints[field.name])}, "
                f"got {value!r}"
            )


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``" (did you mean 'kp'?)"`` for the closest of ``choices`` to a mistyped ``name``, or ``""``.

    Every "unknown name" message of asymprop and its harness appends it before listing the
    valid choices.

    Example:
        >>> did_you_mean("dfx", ["bp", "dfa", "fa"])
        " (did you mean 'dfa'?)"
    """
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_positive(rule: FeedbackRule, *options: str) -> None:
    """Each option is a finite number > 0 (``inf`` and NaN are refused: they pass ``> 0`` checks
    and end in a diverged run); raise ``ValueError`` naming the option, its value and the range."""
    for option in options:
        value = getattr(rule, option)
        if value is None:
            continue
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(
                f"rule {rule.name!r} option {option}={value!r} is out of range: must be a finite "
                "number > 0"
            )


def _check_range(
    rule: FeedbackRule, option: str, low: float, high: float, *, open_high: bool = False
) -> None:
    value = getattr(rule, option)
    ok = low <= value < high if open_high else low <= value <= high
    if not ok or math.isnan(value):
        bracket = ")" if open_high else "]"
        raise ValueError(
            f"rule {rule.name!r} option {option}={value!r} is out of range: must be in "
            f"[{low}, {high}{bracket}"
        )


# ---------------------------------------------------------------------------------------------
# The rules of the core issue
# ---------------------------------------------------------------------------------------------


@register_rule
@dataclass(frozen=True)
class BP(FeedbackRule):
    """Exact backpropagation: the backward weight is W itself.

    ``feedback_weight`` is the ``weight`` Parameter (no copy), and the layer runs torch's own op,
    so gradients equal autograd's bit for bit. Useful as the baseline inside a converted model.

    Example: ``asymprop.convert(model, "bp")``. Paper: all seeds (e.g. 003 eq. 2).
    """

    name = "bp"

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> None:
        return None

    def backward_weight(self, layer: FeedbackLayer) -> Tensor:
        return layer.weight


Init = Literal["uniform", "normal", "weight"]


@register_rule
@dataclass(frozen=True)
class FA(FeedbackRule):
    """Feedback alignment: a random B drawn once and never changed.

    ``delta_l = phi'(y_l) * B_{l+1}^T delta_{l+1}`` with fixed B. By default B is drawn from the
    layer's own default initialisation, ``U(-gain/sqrt(fan_in), gain/sqrt(fan_in))``
    (``init="uniform"``), or ``N(0, (gain/sqrt(fan_in))^2)`` (``init="normal"``), or at the
    scale W actually has at conversion, ``N(0, (gain * std(W))^2)`` (``init="weight"``).

    The scale matters: B sends errors of B's size, so a model whose W is initialised far below
    torch's default (Hugging Face models: ``N(0, 0.02^2)``, about 5x smaller than
    ``1/sqrt(fan_in)`` at width 768) gets errors several times larger than backprop's at every
    layer, compounding with depth; ``init="weight"`` keeps them at backprop's size.

    Options:
        init: ``"uniform"``, ``"normal"`` or ``"weight"``.
        gain: multiplies the scale (``1/sqrt(fan_in)``, or W's standard deviation).

    Example: ``asymprop.convert(model, "fa", seed=0)``.
    Paper: Lillicrap et al. 2016, as described in 003 (eq. 3-4) and 004.
    """

    name = "fa"
    init: Init = "uniform"
    gain: float = 1.0

    def validate(self) -> None:
        check_positive(self, "gain")

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        return random_feedback(layer, generator, self.init, self.gain)


def random_feedback(
    layer: FeedbackLayer, generator: torch.Generator, init: str = "uniform", gain: float = 1.0
) -> Tensor:
    """FA's random B in W's shape (on the CPU generator): see :class:`FA` for ``init``.

    Every rule that starts from a random B (``fa``, ``kp``, ``wm``, ``np``, ``sg``, ``matched``)
    draws it here, so one seed gives them the same B.
    """
    shape = layer.weight.shape
    if init == "weight":
        std = float(layer.weight.detach().double().std()) if layer.weight.numel() > 1 else 0.0
        if not std > 0:
            raise ValueError(
                f"init='weight' draws B at W's standard deviation, but W of {type(layer).__name__}"
                f" (shape {tuple(shape)}) has std {std}: use init='uniform' or 'normal'"
            )
        return torch.randn(shape, generator=generator) * (gain * std)
    bound = gain / math.sqrt(layer.fan_in)
    if init == "uniform":
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    return torch.randn(shape, generator=generator) * bound


@register_rule
@dataclass(frozen=True)
class RndF(FeedbackRule):
    """Liao's fixed random feedback: ``B ~ N(0, std^2)``, drawn once, never changed.

    Options:
        std: the standard deviation (Liao used 0.05 in all experiments).

    Example: ``asymprop.convert(model, "rndf", std=0.05)``. Paper: 002 sec. 2, item 6.
    """

    name = "rndf"
    std: float = 0.05

    def validate(self) -> None:
        check_positive(self, "std")

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        return torch.randn(layer.weight.shape, generator=generator) * self.std


Scale = Literal["none", "fan_in", "norm"]


def _buffer(layer: FeedbackLayer, name: str) -> Tensor:
    """A rule's own buffer on the layer (typed access for rule state)."""
    return layer.get_buffer(name)


def _apply_scale(
    rule_scale: str, layer: FeedbackLayer, feedback: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Rescale a sign-rule B in place: as defined (none), / fan_in (NuSF), or to ``||W||_F``.

    In place and without a host sync (the update runs every step on every layer): a zero B
    stays zero under ``norm``.
    """
    if rule_scale == "fan_in":
        feedback.div_(layer.fan_in)
    elif rule_scale == "norm":
        norm = torch.linalg.vector_norm(feedback)
        tiny = torch.finfo(feedback.dtype).tiny
        weight = layer.full_weight() if weight is None else weight
        feedback.mul_(torch.linalg.vector_norm(weight) / norm.clamp_min(tiny))
    return feedback


@register_rule
@dataclass(frozen=True)
class USF(FeedbackRule):
    """Uniform sign-concordant feedback: ``B = sign(W)``, recomputed after every update of W.

    Raw sign(W) is tens of times larger than W, which is why Liao et al. needed batch norm or
    Batch Manhattan. ``scale`` offers alternatives for networks without either.

    Options:
        scale: ``"none"`` (the paper's definition), ``"fan_in"`` (divide by the filter's
            ``w*h*in``, i.e. NuSF) or ``"norm"`` (rescale so ``||B||_F = ||W||_F`` per layer).

    Example: ``asymprop.convert(model, "usf")``. Paper: 002 sec. 2, item 1 (setting 1).
    """

    name = "usf"
    scale: Scale = "none"

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        return _apply_scale(self.scale, layer, torch.sign(layer.weight.detach()))

    def update_layer(self, layer: FeedbackLayer) -> None:
        weight = layer.full_weight()  # all-gathered when FSDP shards W
        _apply_scale(self.scale, layer, torch.sign(weight, out=layer.feedback_weight), weight)


@register_rule
@dataclass(frozen=True)
class NuSF(USF):
    """Normalised uniform sign-concordant feedback: ``B = sign(W) / fan_in``.

    ``fan_in`` is ``in_features`` for Linear, ``C_in/groups * kH * kW`` (the filter's size) for
    Conv2d. Recomputed after every update of W.

    Example: ``asymprop.convert(model, "nusf")``. Paper: 002 Table 2 ("NuSF").
    """

    name = "nusf"
    scale: Scale = "fan_in"


def _flip_signs(
    shape: torch.Size, flip: float, generator: torch.Generator, device: torch.device
) -> Tensor:
    """S_p: each entry -1 with probability ``flip``, else +1."""
    u = torch.rand(shape, generator=generator, device=device)
    return torch.where(u < flip, -1.0, 1.0)


@dataclass(frozen=True)
class _RandomMagnitudeSign(FeedbackRule):
    """``B = M o sign(W) o S_p``: the options and checks brSF and frSF share."""

    flip: float = 0.0
    scale: Scale = "none"

    def validate(self) -> None:
        _check_range(self, "flip", 0.0, 1.0)


@register_rule
@dataclass(frozen=True)
class BrSF(_RandomMagnitudeSign):
    """Batchwise random-magnitude sign-concordant feedback: ``B = M o sign(W) o S_p``.

    ``M ~ U[0, 1]`` (and ``S_p``, -1 with probability ``flip``) are redrawn after each update of
    W, i.e. every minibatch. The draws come from the layer's own seeded stream, so every rank of a
    data-parallel job and a reloaded model draw the same M.

    The redraw runs on every weight every step, so its cost is the rule's cost. ``draw="fast"``
    (default) takes M uniform on the grid ``(k + 1/2) / 2^15``, ``k = 0 .. 2^15 - 1``, from 15
    random bits per weight (four weights per 63-bit word of the generator), and gives it W's
    sign with one ``copysign`` (a weight exactly 0 gets ``+M``, where ``sign(0) = 0`` gives 0):
    the same mean, a variance within 1e-9 of U[0, 1]'s, half the time of ``draw="exact"``,
    torch's float ``uniform_`` (24 random bits) times ``sign(W)``. benchmarks/RESULTS.md and
    docs/rules.md give the step times and the alignment and accuracy of both.

    Options:
        flip: p, the fraction of discordant signs (0 <= p <= 1): ``flip=0.25`` is 75%-concordant
            brSF-p (002 Table 3).
        scale: as for ``usf``.
        draw: ``"fast"`` (15-bit grid, ``copysign``) or ``"exact"`` (``uniform_`` times
            ``sign(W)``).

    Example: ``asymprop.convert(model, "brsf", flip=0.25)``. Paper: 002 sec. 2, items 2 and 4.
    """

    name = "brsf"
    draw: Literal["fast", "exact"] = "fast"

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        layer.seed_feedback_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return torch.zeros_like(layer.weight, device="cpu")

    def init_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> None:
        super().init_feedback(layer, generator)
        with torch.no_grad():
            self.update_layer(layer)

    def update_layer(self, layer: FeedbackLayer) -> None:
        # M is drawn straight into B (no temporaries: the redraw runs on every layer every step)
        weight = layer.full_weight()  # all-gathered when FSDP shards W
        generator = layer.feedback_generator()
        feedback = layer.feedback_weight
        if self.draw == "fast":
            _grid_uniform(feedback, generator)
            torch.copysign(feedback, weight, out=feedback)
        else:
            feedback.uniform_(0.0, 1.0, generator=generator)
            feedback.mul_(torch.sign(weight))
        if self.flip > 0:
            feedback.mul_(_flip_signs(weight.shape, self.flip, generator, weight.device))
        _apply_scale(self.scale, layer, feedback, weight)


_GRID_BITS = 15


def _grid_uniform(out: Tensor, generator: torch.Generator) -> Tensor:
    """Fill ``out`` with ``(k + 1/2) / 2^15``, ``k`` uniform on ``0 .. 2^15 - 1``, in place.

    ``random_`` on int64 gives 63 random bits per word; masking each of its four int16s to its 15
    low bits (one pass over the words; the word's constant bit is masked away) gives four ``k``,
    turned into floats by one fused ``2^-16 + 2^-15 k``.
    """
    words = torch.empty(-(-out.numel() // 4), dtype=torch.int64, device=out.device)
    words.random_(generator=generator).bitwise_and_(0x7FFF_7FFF_7FFF_7FFF)
    k = words.view(torch.int16)[: out.numel()].view(out.shape)
    if out.device.type != "cpu":  # no host-to-device copy of a constant: two passes
        return torch.mul(k, 2.0**-_GRID_BITS, out=out).add_(2.0 ** -(_GRID_BITS + 1))
    half_step = torch.tensor(2.0 ** -(_GRID_BITS + 1), dtype=out.dtype)  # a CPU scalar
    return torch.add(half_step, k, alpha=2.0**-_GRID_BITS, out=out)


@register_rule
@dataclass(frozen=True)
class FrSF(_RandomMagnitudeSign):
    """Fixed random-magnitude sign-concordant feedback: ``B = M o sign(W) o S_p``.

    ``M ~ U[0, 1]`` and ``S_p`` are drawn once (stored together as the buffer
    ``feedback_magnitude`` = M o S_p, saved in ``state_dict``); the signs follow W after every
    update.

    Options:
        flip: p, the fraction of discordant signs, fixed for the run (frSF-p, 002 Table 3).
        scale: as for ``usf``.

    Example: ``asymprop.convert(model, "frsf", seed=0)``. Paper: 002 sec. 2, items 3 and 5.
    """

    name = "frsf"

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        weight = layer.weight.detach()
        magnitude = torch.rand(weight.shape, generator=generator)
        if self.flip > 0:
            magnitude *= _flip_signs(weight.shape, self.flip, generator, torch.device("cpu"))
        layer.register_buffer(
            "feedback_magnitude", magnitude.to(device=weight.device, dtype=weight.dtype)
        )
        return _apply_scale(
            self.scale, layer, _buffer(layer, "feedback_magnitude") * torch.sign(weight)
        )

    def update_layer(self, layer: FeedbackLayer) -> None:
        weight = layer.full_weight()  # all-gathered when FSDP shards W
        feedback = torch.sign(weight, out=layer.feedback_weight)
        _apply_scale(self.scale, layer, feedback.mul_(_buffer(layer, "feedback_magnitude")), weight)


# ---------------------------------------------------------------------------------------------
# Learned feedback (issue 3): Kolen-Pollack. Weight mirrors live in ``asymprop.mirror``.
# ---------------------------------------------------------------------------------------------


@register_rule
@dataclass(frozen=True)
class KP(FeedbackRule):
    """Kolen-Pollack: B is trained by its own local signals, with W's step and W's weight decay.

    ``dW = -eta delta_{l+1} y_l^T - lambda W`` and ``dB = -eta y_l delta_{l+1}^T - lambda B``
    (B stored in W's shape, so both read ``-eta grad - lambda X``). B gets a gradient equal in
    value to W's, computed from the layer's input and output error (never from W), so
    ``B - W`` shrinks by ``(1 - lr * lambda)`` per plain-SGD step: the angle between B and W
    falls at a rate set by ``lr x weight_decay`` (003 eq. 12-18).

    ``feedback_weight`` is an ``nn.Parameter``: any ``torch.optim`` optimizer handed
    ``model.parameters()`` *after* ``convert`` updates it like W (same lr, momentum, weight
    decay). Without weight decay B - W never shrinks (B only looks aligned once the summed
    gradients dwarf the initial weights). ``asymprop.param_groups(model, lr=...)`` gives B its
    own hyperparameters for ablations. B starts random, drawn as for ``fa``.

    Options:
        init: ``"uniform"``, ``"normal"`` or ``"weight"`` (the initial random B, as ``fa``).
        gain: multiplies the initial scale ``1/sqrt(fan_in)``.

    Example:
        >>> net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> model = asymprop.convert(net, "kp", seed=0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        >>> isinstance(model[2].feedback_weight, nn.Parameter)  # trained by opt, as W
        True

    Paper: 000 Alg. 2 and App. B; 001 (KP circuit); 003 eq. (12)-(18).
    """

    name = "kp"
    trainable_feedback = True
    init: Init = "uniform"
    gain: float = 1.0

    def validate(self) -> None:
        check_positive(self, "gain")

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        return random_feedback(layer, generator, self.init, self.gain)

    def before_forward(self, step: StepContext) -> None:
        # An optimizer built before convert() does not hold B: KP would silently become FA.
        held = {id(p) for group in step.optimizer.param_groups for p in group["params"]}
        missing = [
            n
            for n, layer in step.layers
            if layer.rule is self and id(layer.feedback_weight) not in held
        ]
        if missing:
            raise RuntimeError(
                f"rule 'kp' trains B with the optimizer, but the optimizer does not hold the "
                f"feedback weight of {missing[0]!r}: build the optimizer after "
                "asymprop.convert(model, 'kp'), from model.parameters() (or "
                "asymprop.param_groups(model, ...))"
            )
