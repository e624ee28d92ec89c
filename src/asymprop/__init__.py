"""asymprop: train any PyTorch model without weight transport.

Backprop sends errors down through W^T; asymprop's layers send them through a separate feedback
weight B, chosen or learned by a *rule* (feedback alignment, sign symmetry, Kolen-Pollack, weight
mirrors, node perturbation, ...). See SCIENCE.md for the equations and README.md for a tour.

    >>> import asymprop, torch.nn as nn
    >>> model = asymprop.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "fa")
    >>> sorted(asymprop.RULES)[:3]
    ['bp', 'brsf', 'dfa']
"""

from . import attention, direct, functional, norm, optim, perturbation, recurrent
from .convert import audit, convert, exact_backprop, feedback_layers, revert, unwrap
from .groups import param_groups
from .layers import (
    FeedbackContainer,
    FeedbackConv1d,
    FeedbackConv2d,
    FeedbackConv3d,
    FeedbackConvTranspose1d,
    FeedbackConvTranspose2d,
    FeedbackConvTranspose3d,
    FeedbackLayer,
    FeedbackLinear,
    LinearSite,
    is_feedback_layer,
    register_layer,
)
from .metrics import alignment, angle_deg, delta_alignment
from .mirror import mirror
from .norm import sigma_batchnorm
from .rules import RULES, FeedbackRule, StepContext, make_rule, register_rule
from .train import DivergenceError, feedback_step, train_step, update_feedback

__version__ = "0.1.0"

__all__ = [
    "RULES",
    "DivergenceError",
    "FeedbackContainer",
    "FeedbackConv1d",
    "FeedbackConv2d",
    "FeedbackConv3d",
    "FeedbackConvTranspose1d",
    "FeedbackConvTranspose2d",
    "FeedbackConvTranspose3d",
    "FeedbackLayer",
    "FeedbackLinear",
    "FeedbackRule",
    "LinearSite",
    "StepContext",
    "alignment",
    "angle_deg",
    "attention",
    "audit",
    "convert",
    "delta_alignment",
    "direct",
    "exact_backprop",
    "feedback_layers",
    "feedback_step",
    "functional",
    "is_feedback_layer",
    "make_rule",
    "mirror",
    "norm",
    "optim",
    "param_groups",
    "perturbation",
    "recurrent",
    "register_layer",
    "register_rule",
    "revert",
    "sigma_batchnorm",
    "train_step",
    "unwrap",
    "update_feedback",
]
