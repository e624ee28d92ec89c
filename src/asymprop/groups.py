"""Optimizer parameter groups that give trained feedback weights their own hyperparameters.

Kolen-Pollack (``kp``) makes every ``feedback_weight`` an ``nn.Parameter`` that receives W's
gradient, so ``torch.optim.SGD(model.parameters(), ...)`` updates B exactly like W: same learning
rate, momentum and weight decay, which is what makes ``B - W`` decay (000 Alg. 2, 003 eq. 12-18).
For ablations (eta_B != eta_W, another decay for B) hand the optimizer :func:`param_groups`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .convert import feedback_layers

__all__ = ["param_groups"]


def param_groups(model: nn.Module, **feedback_options: Any) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: the model's own parameters, and its trained feedback weights.

    The first group holds every parameter of ``model`` except trained feedback weights and takes
    the optimizer's defaults; the second holds every Parameter a rule registered on a converted
    layer under a ``feedback*`` name (``feedback_weight`` for ``kp``; a new rule's learned
    ``feedback_scale`` as well) and takes ``feedback_options`` (any per-group option of the
    optimizer: ``lr``, ``weight_decay``, ``momentum``, ...). With plain SGD, gradient g and
    ``D = B - W``, one step gives ``D <- (1 - eta_B lambda_B) D - (eta_B - eta_W) g -
    (eta_B lambda_B - eta_W lambda_W) W``: B converges to W only when the two steps agree.

    Args:
        model: a converted model (or a DDP wrapper of one).
        **feedback_options: optimizer options for the feedback group only.

    Returns:
        ``[{"params": [...]}, {"params": [...feedback weights], **feedback_options}]``.

    Raises:
        ValueError: the model has no trained feedback weight (no layer uses ``kp``).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model = asymprop.convert(net, "kp")
        >>> opt = torch.optim.SGD(asymprop.param_groups(model, lr=0.01), lr=0.1, momentum=0.9)
        >>> [len(group["params"]) for group in opt.param_groups]  # W and b of 2 layers; 2 B's
        [4, 2]

    Paper: 000 Alg. 2 (eta_B in line 9).
    """
    feedback: dict[int, nn.Parameter] = {}
    for _, layer in feedback_layers(model):
        for name, tensor in layer.named_parameters(recurse=False):
            if name.startswith("feedback") and tensor is not layer.weight:
                feedback[id(tensor)] = tensor
    if not feedback:
        raise ValueError(
            f"{type(model).__name__} has no trained feedback weights: only rules with trainable "
            "feedback (e.g. 'kp') have them; convert the model with such a rule, or hand the "
            "optimizer model.parameters()"
        )
    others = [p for p in model.parameters() if id(p) not in feedback]
    return [{"params": others}, {"params": list(feedback.values()), **feedback_options}]
