"""Batch normalization whose feedback path carries only the scale (Akrout et al. 2019, App. D.3).

Between converted layers, batch normalization is weight-free, so by default the error crosses
it through autograd's exact backward pass: BN's full Jacobian, which subtracts the batch mean of
the errors and their projection on the normalized activations (the terms that come from the
batch mean ``mu`` and variance ``sigma^2`` depending on the input). 000 App. D.3 instead
"passed the scaling parameter sigma from the forward to the feedback path (mu was not
needed)": one scalar per channel. `SigmaBatchNorm` is that variant::

    forward:   y = gamma * (x - mu) / sigma + beta          (nn.BatchNorm's value, bit for bit)
    feedback:  dL/dx = dL/dy * gamma / sigma                 (per channel; no mean or variance term)

``sigma = sqrt(var + eps)`` is the batch's (training, or no running statistics) or the running
one (evaluation), as the forward pass used; ``gamma`` is 1 without ``affine``. The gradients of
``gamma`` and ``beta`` are BN's exact ones, and the running statistics are updated by
``nn.functional.batch_norm`` itself. :func:`sigma_batchnorm` swaps every ``nn.BatchNorm1d/2d/3d``
of a model for it (same Parameter and buffer objects, same ``state_dict`` keys), independently of
the rule that converts the weights: apply it before or after :func:`asymprop.convert`.

Paper: 000 App. D.3 (the batch-normalized ResNets of Tables 1-2 and Fig. 3-4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layers import take_over

__all__ = ["SigmaBatchNorm1d", "SigmaBatchNorm2d", "SigmaBatchNorm3d", "sigma_batchnorm"]


class _SigmaOnly:
    """The forward pass of BN on a detached input, plus a zero-valued term carrying the error
    to the input as ``dL/dy * gamma / sigma``."""

    def forward(self, input: Tensor) -> Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        bn._check_input_dim(input)
        momentum = 0.0 if bn.momentum is None else bn.momentum
        use_batch = bn.training or bn.running_mean is None
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(bn.num_batches_tracked)
        update = bn.training and bn.track_running_stats
        output = F.batch_norm(
            input.detach(),
            bn.running_mean if not bn.training or bn.track_running_stats else None,
            bn.running_var if not bn.training or bn.track_running_stats else None,
            bn.weight,
            bn.bias,
            use_batch,
            momentum if update else 0.0,
            bn.eps,
        )
        if not input.requires_grad:
            return output
        channels = [1, -1] + [1] * (input.dim() - 2)
        if use_batch:  # in float32 at least, as batch_norm computes its statistics
            dims = [0, *range(2, input.dim())]
            wide = input.detach().to(torch.promote_types(input.dtype, torch.float32))
            var = wide.var(dim=dims, unbiased=False)
        else:
            assert bn.running_var is not None
            var = bn.running_var
        scale = (var + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.detach()
        # zero in value; its derivative sends dL/dy * gamma / sigma to the input, nothing else
        scale = scale.to(output.dtype).reshape(channels)  # output keeps BN's dtype (bf16, AMP)
        return output + (input - input.detach()).to(output.dtype) * scale


class SigmaBatchNorm1d(_SigmaOnly, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose input error is ``dL/dy * gamma / sigma`` (module docstring)."""


class SigmaBatchNorm2d(_SigmaOnly, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose input error is ``dL/dy * gamma / sigma`` (module docstring)."""


class SigmaBatchNorm3d(_SigmaOnly, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose input error is ``dL/dy * gamma / sigma`` (module docstring)."""


_SWAP: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: SigmaBatchNorm1d,
    nn.BatchNorm2d: SigmaBatchNorm2d,
    nn.BatchNorm3d: SigmaBatchNorm3d,
}


def sigma_batchnorm(model: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` (exact type) in ``model`` for its sigma-only variant.

    Same Parameter and buffer objects (an optimizer built before still holds them), same
    ``state_dict`` keys, same forward values; only the error crossing BN changes (see the
    module docstring). A BatchNorm itself is returned swapped. Subclasses are left alone.

    Returns:
        ``model``, changed in place (or the new module if ``model`` is a BatchNorm).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> type(sigma_batchnorm(net)[1]).__name__
        'SigmaBatchNorm2d'
    """
    if type(model) in _SWAP:
        return take_over(model, _SWAP[type(model)])
    for name, child in list(model.named_children()):
        if type(child) in _SWAP:
            setattr(model, name, take_over(child, _SWAP[type(child)]))
        else:
            sigma_batchnorm(child)
    return model
