"""``convert``: put feedback layers into any module tree, keeping its parameters."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from .layers import (
    _CONTAINERS,
    _FEEDBACK_TYPES,
    FeedbackContainer,
    FeedbackLayer,
    attach_rule,
    container_converter,
    feedback_type,
    is_feedback_layer,
    make_feedback_layer,
    make_plain_layer,
    mix_seed,
)
from .rules import FeedbackRule, make_rule

__all__ = ["audit", "convert", "exact_backprop", "feedback_layers", "revert", "unwrap"]

logger = logging.getLogger(__name__)

RuleChoice: TypeAlias = "str | FeedbackRule | Callable[[str, nn.Module], str | FeedbackRule | None]"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel/torch.compile wrappers, any nesting (else itself)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # never import dynamo (1.5 s)
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def feedback_layers(model: nn.Module) -> list[tuple[str, FeedbackLayer]]:
    """The converted layers of ``model`` as ``(qualified_name, layer)``, in module order.

    A layer used at several places appears once, under its first name. DDP wrappers are looked
    through (names are those of the wrapped module).
    """
    return [(n, m) for n, m in unwrap(model).named_modules() if is_feedback_layer(m)]  # type: ignore[misc]


def convert(
    module: nn.Module,
    rule: Any,
    *,
    exclude: Iterable[str] = (),
    seed: int | None = None,
    strict: bool = False,
    **options: Any,
) -> nn.Module:
    """Give every weight-bearing layer of ``module`` a feedback path.

    Every exact instance of a registered layer kind is swapped for a feedback layer
    (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, and what
    :func:`asymprop.register_layer` added), and every registered multi-weight module
    (``nn.MultiheadAttention``, ``nn.RNN/LSTM/GRU``) gets one feedback layer per weight matrix.
    The new layers compute the same forward pass with the *same* Parameter objects (an optimizer
    built before or after conversion works, ``state_dict`` keys of the weights are unchanged),
    and add ``feedback_weight`` (B, W's shape). A layer used at several places stays one layer.
    Subclasses of registered types are not swapped (their ``forward`` may be bypassed). One log
    line (logger ``asymprop.convert``, level INFO; WARNING when something is left) says how
    many layers now carry feedback and names every weight still on backprop (:func:`audit`).

    Args:
        module: any module tree (Sequential, nested blocks, residual nets, weight sharing), or a
            single Linear/Conv2d (then the new layer is returned).
        rule: a name from ``asymprop.RULES``, a ``FeedbackRule`` object, or a callable
            ``(qualified_name, layer) -> rule or None`` for per-layer choices (None: leave the
            layer as it is, exact backprop).
        exclude: fnmatch patterns of qualified names that stay exact backprop (plain layers).
        seed: seeds the draws of random feedback (B, M, random streams). ``None`` draws a seed
            from torch's global generator, so ``torch.manual_seed`` makes conversion repeatable.
        strict: raise if any weight is left on exact backprop for a reason other than the
            user's choice (``exclude``, a callable returning None, rule ``bp``).
        **options: options of the rule (e.g. ``flip=0.25`` for ``brsf``).

    Returns:
        ``module`` itself, converted in place (or the new layer if ``module`` is a layer).

    Raises:
        ValueError: unknown rule (lists the valid names), option out of range, no convertible
            layer, a model that is already converted, or (``strict``) weights left on backprop
            (named, with the reason).
        TypeError: unknown or ill-typed option (names it and the valid ones).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model = convert(model, "fa", seed=0)
        >>> model[0].feedback_weight.shape
        torch.Size([8, 4])
    """
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    choose = _rule_chooser(rule, options)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    generator = torch.Generator().manual_seed(mix_seed(int(seed), -1))

    already = [n for n, m in module.named_modules() if is_feedback_layer(m)]
    if already:
        raise ValueError(
            f"{type(module).__name__} is already converted (layer {already[0] or '<root>'!r} "
            "has a feedback rule); call asymprop.revert(model) first to change the rule"
        )

    for old in module.modules():  # marks of an earlier conversion (audit's reasons) go
        old.__dict__.pop("_asymprop_excluded", None)
    converted: dict[int, nn.Module] = {}  # id(original) -> its replacement (weight sharing)
    layers = 0

    def excluded(name: str, child: nn.Module) -> bool:
        pattern = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            child.__dict__["_asymprop_excluded"] = f"excluded by pattern {pattern!r}"
        return pattern is not None

    def attach(name: str, layer: FeedbackLayer, chosen: FeedbackRule) -> None:
        nonlocal layers
        attach_rule(layer, chosen)
        with torch.no_grad():
            chosen.init_feedback(layer, generator)
        layers += 1

    def pick(name: str, module: nn.Module) -> FeedbackRule | None:
        """The rule for ``module``, or None (excluded by a pattern or by the callable)."""
        if excluded(name, module):
            return None
        chosen = choose(name, module)
        if chosen is None:
            module.__dict__["_asymprop_excluded"] = "the rule callable returned None"
        return chosen

    def replacement(name: str, child: nn.Module) -> nn.Module | None:
        if id(child) in converted:
            return converted[id(child)]
        if feedback_type(child) is not None:
            chosen = pick(name, child)
            if chosen is None:
                return None
            layer = make_feedback_layer(child, chosen)
            attach(name, layer, chosen)
            converted[id(child)] = layer
            return layer
        converter = container_converter(child)
        if converter is None:
            return None

        def make_site(relative: str, site: FeedbackLayer) -> bool:
            full = f"{name}.{relative}" if name else relative
            chosen = pick(full, site)
            if chosen is not None:
                attach(full, site, chosen)
            return chosen is not None

        if excluded(name, child):
            return None
        new = converter(child, make_site)
        converted[id(child)] = new
        return new

    root = replacement("", module)
    if root is None:
        _convert_children(module, "", replacement, set())
    result = root if root is not None else module
    left = audit(result)
    if not layers:
        reason = f" after exclude={patterns}" if patterns else ""
        raise ValueError(
            f"no layer to convert in {type(module).__name__}{reason}: asymprop converts "
            f"{_kinds()} and types added with asymprop.register_layer"
            + (f" (left on backprop: {_listing(left)})" if left else "")
        )
    failures = {n: r for n, r in left.items() if not _chosen(r)}
    if strict and failures:
        raise ValueError(
            f"convert(strict=True): {len(failures)} weight(s) left on exact backprop: "
            f"{_listing(failures)}"
        )
    feedback = len(feedback_layers(result))  # a shared layer once
    summary = (
        f"asymprop.convert: {layers} layer(s), {feedback} weight(s) carry feedback; "
        f"left on backprop: {_listing(left) if left else 'none'}"
    )
    logger.log(logging.WARNING if failures else logging.INFO, summary)
    return result


def _chosen(reason: str) -> bool:
    """True for weight transport the user asked for (exclude, callable None, rule bp)."""
    return reason.startswith(("excluded by pattern", "the rule callable", "rule 'bp'"))


def _listing(left: dict[str, str]) -> str:
    return "; ".join(f"{name} ({reason})" for name, reason in left.items())


def _kinds() -> str:
    names = [
        f"nn.{t.__name__}" if t.__module__.startswith("torch") else t.__name__
        for t in (*_FEEDBACK_TYPES, *_CONTAINERS)
    ]
    return ", ".join(names)


#: Module types whose ≥2-D parameters carry no weight transport: no error flows to an
#: embedding's integer input, so its table is never used to send one.
_NO_INPUT_ERROR: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def audit(model: nn.Module) -> dict[str, str]:
    """Every weight still used to send the error to its input (exact backprop), with the reason.

    Lists each parameter with 2 or more dimensions whose module still sends the error through
    that parameter itself: a type asymprop does not support, a subclass of a supported type
    (its ``forward`` may be bypassed, so it is not swapped), a weight excluded by ``exclude`` or
    by a rule callable returning None, a weight of a layer converted with ``bp``. ``{}`` means no
    weight transport is left. Works on converted and unconverted models.

    Not listed, because they carry no weight transport: 1-D parameters (biases, the elementwise
    scales of normalisation layers: a diagonal scale is local to each unit), ``nn.Embedding``
    tables (no error flows below an embedding), and parameters of unknown modules whose first
    dimension is 1 (broadcast additive offsets such as positional embeddings and class tokens).
    A raw parameter used through ``F.linear`` in a custom module is listed under its module's
    type, as asymprop cannot see the call.

    Returns:
        ``{qualified_parameter_name: reason}`` in module order.

    Example:
        >>> asymprop.audit(asymprop.convert(nn.Sequential(nn.Linear(4, 2)), "fa"))
        {}
    """
    root = unwrap(model)
    covered: set[int] = set()
    chosen_bp: set[int] = set()
    for _, layer in feedback_layers(root):
        if layer.rule.name == "bp":
            chosen_bp.add(id(layer.weight))
        elif not layer._exact_backprop:
            covered.add(id(layer.weight))
    left: dict[str, str] = {}
    done: set[int] = set()
    for module_name, module in root.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if param.dim() < 2 or id(param) in covered or id(param) in done:
                continue
            if id(param) in chosen_bp:
                reason: str | None = "rule 'bp' (exact backprop by choice)"
            else:
                reason = _reason(module, param_name, param)
            if reason is not None:
                left[name] = reason
                done.add(id(param))
    return left


def _reason(module: nn.Module, param_name: str, param: Tensor) -> str | None:
    if isinstance(module, _NO_INPUT_ERROR):
        return None
    if is_feedback_layer(module):  # its weight is covered or on bp (audit): a KP B, or another
        layer: Any = module
        if param is layer.feedback_weight:
            return None
        return f"{type(module).__name__} has a second weight {param_name!r} without feedback"
    if isinstance(module, FeedbackContainer):
        if param_name in module.excluded_sites:
            return module.excluded_sites[param_name]
        if param_name in module.no_transport:
            return None
        return f"{type(module).__name__} runs {param_name!r} without a feedback layer"
    mark = getattr(module, "_asymprop_excluded", None)
    if mark is not None:
        return str(mark)
    if feedback_type(module) is not None or container_converter(module) is not None:
        return f"{type(module).__name__} not converted (call asymprop.convert)"
    registered = _registered_base(module)
    if registered is not None:
        return (
            f"subclass {type(module).__name__} of {registered}: not converted, as its forward "
            "may be bypassed (register it with asymprop.register_layer)"
        )
    if type(module).__module__.startswith("torch."):
        return f"type {type(module).__name__} is not supported"
    if param.shape[0] == 1:
        return None  # a broadcast offset (positional embedding, class token): see docstring
    return (
        f"a parameter of {type(module).__name__}, which asymprop does not know: used through a "
        "functional call convert cannot see (register the module with asymprop.register_layer)"
    )


def _registered_base(module: nn.Module) -> str | None:
    for base in (*_FEEDBACK_TYPES, *_CONTAINERS):
        if isinstance(module, base) and not is_feedback_layer(module):
            return base.__name__
    return None


def _convert_children(
    parent: nn.Module,
    prefix: str,
    replacement: Callable[[str, nn.Module], nn.Module | None],
    seen: set[int],
) -> None:
    if id(parent) in seen:  # a shared block is walked once
        return
    seen.add(id(parent))
    for key, child in list(parent._modules.items()):
        if child is None:
            continue
        name = f"{prefix}.{key}" if prefix else key
        new = replacement(name, child)
        if new is not None:
            parent._modules[key] = new
        else:
            _convert_children(child, name, replacement, seen)


def _rule_chooser(
    rule: Any, options: dict[str, Any]
) -> Callable[[str, nn.Module], FeedbackRule | None]:
    if isinstance(rule, str | FeedbackRule):
        fixed = make_rule(rule, **options)
        return lambda name, layer: fixed
    if callable(rule):
        cache: dict[Any, FeedbackRule] = {}

        def choose(name: str, layer: nn.Module) -> FeedbackRule | None:
            chosen = rule(name, layer)
            if chosen is None:
                return None
            if isinstance(chosen, str):  # one rule object per name, shared by its layers
                if chosen not in cache:
                    cache[chosen] = make_rule(chosen, **options)
                return cache[chosen]
            if isinstance(chosen, FeedbackRule):
                return make_rule(chosen, **options)
            raise TypeError(
                f"the rule callable returned {chosen!r} for layer {name!r}; it must return a "
                "rule name, a FeedbackRule object or None"
            )

        return choose
    make_rule(rule, **options)  # not a name, rule or callable: raises the helpful TypeError
    raise AssertionError("unreachable")


def revert(module: nn.Module) -> nn.Module:
    """Undo ``convert``: plain ``nn.Linear``/``nn.Conv2d`` with the same Parameter objects.

    Feedback weights and rule state are dropped. Returns ``module`` (or the plain layer if
    ``module`` itself is a feedback layer).
    """
    if isinstance(module, FeedbackContainer):
        return module.to_plain()
    if is_feedback_layer(module):
        return make_plain_layer(module)  # type: ignore[arg-type]
    done: dict[int, nn.Module] = {}
    for parent in list(_walk(module)):
        for key, child in list(parent._modules.items()):
            if child is None or isinstance(parent, FeedbackContainer):
                continue
            if isinstance(child, FeedbackContainer) or is_feedback_layer(child):
                if id(child) not in done:
                    done[id(child)] = revert(child)
                parent._modules[key] = done[id(child)]
    return module


def _walk(module: nn.Module) -> Iterator[nn.Module]:
    return iter(m for _, m in module.named_modules())


@contextlib.contextmanager
def exact_backprop(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every feedback layer of ``model`` runs torch's own op (exact backprop).

    Rules' forward hooks are bypassed too (no DFA routing, no noise). Used by
    ``asymprop.delta_alignment`` to get backprop's errors on the same batch.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> model = asymprop.convert(net, "fa")
        >>> x, y = torch.randn(5, 4), torch.randn(5, 2)
        >>> with exact_backprop(model):
        ...     F.mse_loss(model(x), y).backward()  # the gradients of plain backprop
        >>> model[0].weight.grad.shape
        torch.Size([8, 4])
    """
    layers = [layer for _, layer in feedback_layers(model)]
    previous = [layer._exact_backprop for layer in layers]
    try:
        for layer in layers:
            layer._exact_backprop = True
        yield model
    finally:
        for layer, value in zip(layers, previous, strict=True):
            layer._exact_backprop = value
