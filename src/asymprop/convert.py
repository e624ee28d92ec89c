"""``convert``: put feedback layers into any module tree, keeping its parameters."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeAlias

import torch
from torch import nn

from .layers import (
    FeedbackLayer,
    is_feedback_layer,
    make_feedback_layer,
    make_plain_layer,
    mix_seed,
)
from .rules import FeedbackRule, make_rule

__all__ = ["convert", "exact_backprop", "feedback_layers", "revert", "unwrap"]

logger = logging.getLogger(__name__)

RuleChoice: TypeAlias = "str | FeedbackRule | Callable[[str, nn.Module], str | FeedbackRule | None]"

_CONVERTIBLE = (nn.Linear, nn.Conv2d)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper (else itself)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
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
    **options: Any,
) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` in ``module`` with a feedback layer.

    The new layers compute the same forward pass with the *same* ``weight``/``bias`` Parameter
    objects (an optimizer built before or after conversion works), and add ``feedback_weight``
    (B, W's shape). A layer used at several places stays one layer. Only exact ``nn.Linear`` and
    ``nn.Conv2d`` are swapped: subclasses (e.g. ``nn.MultiheadAttention``'s ``out_proj``, whose
    ``forward`` is never called) stay exact backprop, and are named in a log message.

    Args:
        module: any module tree (Sequential, nested blocks, residual nets, weight sharing), or a
            single Linear/Conv2d (then the new layer is returned).
        rule: a name from ``asymprop.RULES``, a ``FeedbackRule`` object, or a callable
            ``(qualified_name, layer) -> rule or None`` for per-layer choices (None: leave the
            layer as it is, exact backprop).
        exclude: fnmatch patterns of qualified names that stay exact backprop (plain layers).
        seed: seeds the draws of random feedback (B, M, random streams). ``None`` draws a seed
            from torch's global generator, so ``torch.manual_seed`` makes conversion repeatable.
        **options: options of the rule (e.g. ``flip=0.25`` for ``brsf``).

    Returns:
        ``module`` itself, converted in place (or the new layer if ``module`` is a layer).

    Raises:
        ValueError: unknown rule (lists the valid names), option out of range, no convertible
            layer, or a model that is already converted.
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

    converted: dict[int, nn.Module] = {}  # id(original) -> its replacement (weight sharing)
    skipped: list[str] = []

    def replacement(name: str, child: nn.Module) -> nn.Module | None:
        if id(child) in converted:
            return converted[id(child)]
        if type(child) not in _CONVERTIBLE:
            if isinstance(child, _CONVERTIBLE):
                skipped.append(f"{name} ({type(child).__name__})")
            return None
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return None
        chosen = choose(name, child)
        if chosen is None:
            return None
        layer = make_feedback_layer(child, chosen)
        with torch.no_grad():
            chosen.init_feedback(layer, generator)
        converted[id(child)] = layer
        return layer

    root = replacement("", module)
    if root is None:
        _convert_children(module, "", replacement, set())
    if not converted:
        reason = f" after exclude={patterns}" if patterns else ""
        extra = f" (subclasses left alone: {', '.join(skipped)})" if skipped else ""
        raise ValueError(
            f"no nn.Linear or nn.Conv2d layer to convert in {type(module).__name__}{reason}"
            f"{extra}; asymprop converts exact nn.Linear and nn.Conv2d modules"
        )
    if skipped:
        logger.warning(
            "left as exact backprop (subclasses of Linear/Conv2d are not converted): %s",
            ", ".join(skipped),
        )
    return root if root is not None else module


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
    if is_feedback_layer(module):
        return make_plain_layer(module)  # type: ignore[arg-type]
    done: dict[int, nn.Module] = {}
    for parent in list(_walk(module)):
        for key, child in list(parent._modules.items()):
            if child is not None and is_feedback_layer(child):
                if id(child) not in done:
                    done[id(child)] = make_plain_layer(child)  # type: ignore[arg-type]
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
        >>> with exact_backprop(model):
        ...     loss_fn(model(x), y).backward()  # the gradients of plain backprop
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
