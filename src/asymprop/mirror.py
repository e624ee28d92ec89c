"""Weight mirrors (Akrout et al. 2019): the ``wm`` rule and pure mirror mode, :func:`mirror`.

A weight-mirror network alternates two modes (000 Alg. 1):

* **engaged mode** is feedback alignment with the current B: the error travels down through B;
* **mirror mode** teaches B the transpose of W without transporting it. Noise
  ``y_l ~ N(0, sigma^2)`` is fed into a layer's input, the layer drives its output
  ``y_{l+1} = phi(W y_l)`` with the bias blocked, the batch means are subtracted from both, and B
  takes a Hebbian step on their covariance with weight decay::

      B <- (1 - decay) B + eta_b * cov(y_{l+1}, y_l)          (B in W's shape, (out, in))

  For Gaussian noise, Stein's lemma gives ``E[cov] = sigma^2 E[phi'(W y_l)] W`` exactly; with the
  bias blocked the mean slope of ReLU is 1/2 (the paper's ``phi'(0)``, 003 eq. 11), of the
  identity 1. So B converges to ``(eta_b sigma^2 slope / decay) W``: the paper's values (eta_b 0.1,
  decay 0.5, sigma 1, ReLU) give ``B = 0.1 W``. Our default ``eta_b=None`` picks the eta_b that
  makes the multiple 1, so errors keep backprop's scale in networks without batch norm.

Noise has the shape (channels, height, width; or features) of the input the layer saw in its
last training forward pass. Its batch is ``mirror_batch`` examples, or by default as many as make
every weight average ``PAIRS_PER_FAN_IN * fan_in`` input/output pairs per mirror step (a conv
weight gets one pair per output position and example). Conv layers estimate, for each shared
weight, the covariance averaged over the input/output pairs it connects (000 App. D.2): a
weight-gradient op with the noise as input and the driven output as output gradient, divided per
kernel tap by the number of pairs that tap connects (zero padding is no neuron) times the batch.

Mirror mode reads W and writes B only: it runs without grad, calls the layer's op directly (never
the model's forward), so batch norm, its running statistics, dropout and every other part of the
forward path are bypassed and untouched. In engaged mode the error crosses batch-norm layers
through autograd's own batch-norm backward (BN is a per-channel op with no weight matrix to
transport, and is not converted); 000 App. D.3 passed only BN's scale to the feedback path.

All random numbers come from each layer's own stream (``layer.feedback_generator()``), a pure
function of the conversion seed and the layer's draw count, saved in ``state_dict``: every rank
of a data-parallel job, and a reloaded model, mirrors identically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.grad
from torch import Tensor, nn

from .convert import feedback_layers, unwrap
from .layers import FeedbackLayer, reshard
from .rules import (
    FeedbackRule,
    Init,
    StepContext,
    _check_range,
    check_positive,
    random_feedback,
    register_rule,
)

__all__ = ["PAPER_OPTIONS", "WM", "mirror"]

logger = logging.getLogger(__name__)
_KEPT: set[tuple[str, str]] = set()
"""(drive, layer kind) pairs already told that they keep the Gaussian drive."""

Nonlinearity = Literal["relu", "identity"]
Drive = Literal["gaussian", "orthogonal", "coordinate"]
Schedule = Literal["layerwise", "alternate"]

PAIRS_PER_FAN_IN = 2.0
"""With ``mirror_batch=None``, each weight's covariance averages this many input/output pairs per
fan-in in one mirror step (see ``WM.noise_shape``); with decay 0.5 and ReLU the predicted plateau
angle is then ``atan(sqrt((2 - 2/pi) decay / ((2 - decay) PAIRS_PER_FAN_IN)))`` = 25 degrees."""

PAPER_OPTIONS: dict[str, Any] = {
    "eta_b": 0.1,
    "decay": 0.5,
    "noise_std": 1.0,
    "mirror_batch": 2048,
    "warmup_steps": 1250,
    "nonlinearity": "relu",
    "baseline": None,
}
"""The ImageNet values of 000 App. D.2, as ``wm`` options: ``WM.paper()`` or
``asymprop.convert(model, "wm", **PAPER_OPTIONS)``. ``warmup_steps=1250`` is the paper's two
warm-up epochs of ImageNet at 2048 examples per batch (2 x 1.28M / 2048). B converges to
``0.1 W``: every hidden error is scaled by 0.1 in a network without batch norm."""


@register_rule
@dataclass(frozen=True)
class WM(FeedbackRule):
    """Weight mirrors: FA with a feedback weight B that mirror mode keeps proportional to W.

    Engaged mode sends the error through the current B. After every ``optimizer.step()``,
    ``asymprop.update_feedback`` (or ``train_step``) runs ``mirror_steps`` mirror steps; before
    the first engaged step each layer gets ``warmup_steps`` pure mirror steps (the paper's
    warm-up epochs; steps already run by :func:`mirror` count). One mirror update of a layer::

        y_l = noise_std * N(0, I)                    # (mirror_batch, *input_shape[1:])
        y_{l+1} = phi(W y_l)                         # the layer's op, bias blocked
        d_l, d_{l+1} = y_l - mean(y_l), y_{l+1} - mean(y_{l+1})     # batch means
        B <- (1 - decay) B + eta_b * d_{l+1}^T d_l / (N - 1)         # (out, in), W's shape

    B converges to ``k W`` with ``k = eta_b * noise_std^2 * slope / decay`` (slope 1/2 for ReLU,
    1 for identity; see the module docstring), and stays bounded for any W: the decay term
    forgets old covariances geometrically. Two trade-offs set the defaults (measured in
    ``docs/rules.md``):

    * **noise**: B averages the covariances of the last ``~(2 - decay) / decay`` mirror batches,
      so for a fixed W its angle to W plateaus at ``atan(sqrt(c fan_in decay / ((2 - decay)
      N P)))``, with N examples per mirror batch, P output positions per example sharing a
      weight (1 for Linear), c = 2 - 2/pi for ReLU and 1 for identity;
    * **lag**: B is an exponential average of past W's, ``(1 - decay) / decay`` mirror steps
      old on average. A B more than about one engaged step stale makes training with momentum
      diverge even without noise, while its angle to W stays under a few degrees.

    Defaults: ``decay=0.5`` (lag of one step) and a per-layer mirror batch of ``2 fan_in / P``
    examples (plateau 25 degrees), which kept ``wm`` within 0.5 points of ``bp`` on
    Fashion-MNIST (``benchmarks/learned_feedback.py``).

    Options:
        eta_b: Hebbian rate. ``None`` (default): ``decay / (noise_std^2 * slope)``, so B -> W.
        decay: lambda_WM in (0, 1], the weight decay of B per mirror update.
        noise_std: sigma, the standard deviation of the mirror noise.
        mirror_batch: examples per mirror batch. ``None`` (default): per layer,
            ``max(2, ceil(PAIRS_PER_FAN_IN * fan_in / P))``; a conv layer of many positions then
            needs only a few examples, a dense layer ``2 fan_in``.
        mirror_steps: mirror steps after each engaged step.
        warmup_steps: pure mirror steps before the first engaged step (20: a random B is
            forgotten geometrically, (1 - decay)^20 ~ 1e-6 at decay 0.5).
        nonlinearity: phi of the drive, ``"relu"`` (paper) or ``"identity"``.
        schedule: ``"layerwise"`` (every layer mirrored once per mirror step, each with its own
            noise, 000 Alg. 1) or ``"alternate"`` (every second layer per mirror step, the other
            half on the next: 000 App. C.4; half the cost per step, half the updates per layer).
        baseline: ``None`` subtracts batch means (000 Alg. 1 lines 14-15). A number beta > 0
            uses the non-negative-signal variant of 000 App. C.2 (eq. 23-24): the input fires
            ``beta + noise``, the bias is set to the default bias b- = beta (phi(b-) = beta,
            phi'(b-) = 1 for ReLU and identity), and beta is subtracted from both signals
            instead of the batch means. The mean slope of ReLU is then
            ``Phi(beta / (noise_std |w_i|))`` for output unit i (so row i of B -> k_i w_i);
            ``eta_b=None`` assumes the linearised slope ``phi'(b-) = 1``.
        drive: the mirror noise. ``"gaussian"`` (the paper's): i.i.d. N(0, noise_std^2).
            ``"orthogonal"``: antithetic pairs of scaled rows of random orthogonal matrices, for
            layers whose op is a matrix product on the input's last dimension (Linear,
            attention and recurrent weights, Conv1D); convolutions and the bilinear product keep
            the Gaussian drive. Example ``n`` and ``n + N/2`` are opposite (``x`` and ``-x``),
            so ``x relu(Wx)^T + (-x) relu(-Wx)^T = x (Wx)^T`` cancels the rectifier's even part
            and every position's batch mean is zero; the rows of one orthogonal block satisfy
            ``sum x x^T = fan_in noise_std^2 I``. With one block per ``fan_in`` rows (the
            default batch, ``2 fan_in`` examples, is exactly one), one mirror step gives
            ``cov = noise_std^2 slope W``: no sampling noise, so B's angle to a fixed W is float
            rounding instead of the 25-degree plateau. Biology: a pair of opposite drives
            reads as the ON and OFF channels of one input (a unit and its mirror-image
            partner); an orthogonal set of patterns across a batch has no such reading (it is
            an experimental design, not a plausible noise source).
            ``"coordinate"``: the same antithetic design with the rows of a signed permutation
            (an orthogonal matrix too) in place of Haar rows: ``sqrt(fan_in) e_j`` and its
            negative, every input unit once per block (a random subset of units for a block
            that is not full). No Gaussian draw and no QR; it converges to the same ``k W``
            (exactly at whole blocks; at partial blocks unbiased, with the same expected squared
            error per step as Haar rows, since both make ``sum x x^T`` ``fan_in`` times a
            random projection ``P`` with ``E[P] = (rows / fan_in) I``). Biology: each input
            unit driven alone, ON then OFF, a unit-by-unit stimulation protocol.
        init, gain: the initial random B, as for ``fa``.

    Example:
        >>> net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
        >>> model = asymprop.convert(net, "wm", seed=0)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> asymprop.mirror(model, steps=20, example_input=x)    # optional explicit warm-up
        >>> loss = asymprop.train_step(model, opt, F.cross_entropy, x, y)  # + mirror steps

    Paper: 000 Alg. 1, App. B-D; 001 (weight mirror); 003 eq. (5)-(11).
    """

    name = "wm"
    eta_b: float | None = None
    decay: float = 0.5
    noise_std: float = 1.0
    mirror_batch: int | None = None
    mirror_steps: int = 1
    warmup_steps: int = 20
    nonlinearity: Nonlinearity = "relu"
    schedule: Schedule = "layerwise"
    baseline: float | None = None
    drive: Drive = "gaussian"
    init: Init = "uniform"
    gain: float = 1.0

    def validate(self) -> None:
        check_positive(self, "eta_b", "noise_std", "gain")  # eta_b may be None
        if not 0 < self.decay <= 1:
            raise ValueError(
                f"rule {self.name!r} option decay={self.decay!r} is out of range: must be in "
                "(0, 1] (decay > 0 keeps B bounded)"
            )
        if self.mirror_batch is not None and self.mirror_batch < 2:
            raise ValueError(
                f"rule {self.name!r} option mirror_batch={self.mirror_batch!r} must be >= 2 "
                "(batch means are subtracted) or None (chosen per layer: 2 fan_in pairs per weight)"
            )
        if self.mirror_steps < 1:
            raise ValueError(
                f"rule {self.name!r} option mirror_steps={self.mirror_steps!r} is out of range: "
                "must be >= 1 (0 would never mirror after the warm-up, so B would go stale as W "
                "learns; for a B that never changes use 'fa')"
            )
        _check_range(self, "warmup_steps", 0, float("inf"))
        if self.baseline is not None and self.nonlinearity == "relu" and not self.baseline > 0:
            raise ValueError(
                f"rule {self.name!r} option baseline={self.baseline!r} must be > 0 with "
                "nonlinearity='relu' (the default bias b- = baseline needs phi'(b-) > 0)"
            )
        if self.drive != "gaussian" and self.baseline is not None:
            raise ValueError(
                f"rule {self.name!r} option drive={self.drive!r} needs baseline=None: the "
                "antithetic identity holds for a drive around zero, not around a baseline"
            )
        tracking = 1 - (1 - self.decay) ** self.mirror_steps  # B's decay per engaged step
        if 0 < tracking < 0.5:
            logger.warning(
                "wm with decay=%s and mirror_steps=%s lets B lag W by ~%.0f engaged steps; a B "
                "more than ~1 step stale made training diverge at lr 0.01-0.05 with momentum 0.9 "
                "in our tests (docs/rules.md): raise decay or mirror_steps so that "
                "1 - (1 - decay)**mirror_steps >= 0.5",
                self.decay,
                self.mirror_steps,
                (1 - tracking) / tracking,
            )

    @classmethod
    def paper(cls, **overrides: Any) -> WM:
        """The paper's ImageNet values (``PAPER_OPTIONS``, 000 App. D.2), options overridable.

        Example: ``asymprop.convert(model, WM.paper(warmup_steps=100))``.
        """
        return cls(**{**PAPER_OPTIONS, **overrides})

    # --- derived constants ------------------------------------------------------------------
    @property
    def slope(self) -> float:
        """Mean slope of phi over the drive: 1/2 for ReLU with the bias blocked, else 1."""
        return 0.5 if self.nonlinearity == "relu" and self.baseline is None else 1.0

    @property
    def hebbian_rate(self) -> float:
        """eta_b, resolved: the option, or the value that makes B converge to W."""
        if self.eta_b is not None:
            return self.eta_b
        return self.decay / (self.noise_std**2 * self.slope)

    @property
    def fixed_point_scale(self) -> float:
        """k in ``B -> k W`` (for fixed W): ``eta_b * noise_std^2 * slope / decay``."""
        return self.hebbian_rate * self.noise_std**2 * self.slope / self.decay

    # --- set-up -----------------------------------------------------------------------------
    def init_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> None:
        super().init_feedback(layer, generator)
        kept = (self.drive, type(layer).__name__)
        if self.drive != "gaussian" and not self._orthogonal(layer) and kept not in _KEPT:
            _KEPT.add(kept)  # once per process and layer kind
            logger.warning(
                "wm drive=%r: %s layers are not a matrix product on their input's last "
                "dimension (convolutions, bilinear products), so they keep the Gaussian drive "
                "(docs/rules.md, 'Variance-reduced drives')",
                *kept,
            )

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        layer.seed_feedback_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        layer.feedback_state.update(mirror_steps=0, mirror_updates=0, warmed_up=False)
        return random_feedback(layer, generator, self.init, self.gain)

    # --- engaged mode -----------------------------------------------------------------------
    def forward(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        # Mirror noise is shaped like the last training input (a list: saved in state_dict);
        # evaluation passes, often with bigger batches, only fill in a missing shape.
        if layer.training or "input_shape" not in layer.feedback_state:
            layer.feedback_state["input_shape"] = list(input.shape)
        return layer.feedback_forward(input, layer.feedback_weight)

    def before_forward(self, step: StepContext) -> None:
        layers = [layer for _, layer in step.layers if layer.rule is self]
        pending = [layer for layer in layers if not layer.feedback_state["warmed_up"]]
        if not pending:
            return
        if any(self._needs_shape(layer) for layer in pending):
            record_input_shapes(step.model, step.inputs)
        self.warm_up(layers)

    def update(self, layers: Sequence[FeedbackLayer]) -> None:
        """After ``optimizer.step()``: any pending warm-up, then ``mirror_steps`` mirror steps."""
        self.warm_up(layers)
        self.mirror_steps_(layers, self.mirror_steps)

    # --- mirror mode ------------------------------------------------------------------------
    def warm_up(self, layers: Sequence[FeedbackLayer]) -> None:
        """Top up to ``warmup_steps`` mirror steps the layers that never had an engaged step."""
        pending = [layer for layer in layers if not layer.feedback_state["warmed_up"]]
        if not pending:
            return
        done = min(layer.feedback_state["mirror_steps"] for layer in pending)
        self.mirror_steps_(layers, max(0, self.warmup_steps - done), only=pending)
        for layer in pending:
            layer.feedback_state["warmed_up"] = True

    has_feedback_mode = True

    def feedback_step(
        self, model: nn.Module, layers: Sequence[FeedbackLayer], example_input: Tensor | None
    ) -> None:
        """One step of mirror mode (000 App. D.2's pre-training) on ``layers``."""
        if example_input is not None:
            record_input_shapes(model, example_input)
        self.mirror_steps_(layers, 1)

    def mirror_steps_(
        self,
        layers: Sequence[FeedbackLayer],
        steps: int,
        *,
        only: Sequence[FeedbackLayer] | None = None,
    ) -> None:
        """Run ``steps`` mirror steps over ``layers`` (module order) following ``schedule``.

        ``only`` restricts the updates to some of the layers; positions (for the alternate
        schedule) are still those in ``layers``.
        """
        chosen = None if only is None else {id(layer) for layer in only}
        with torch.no_grad():
            for _ in range(steps):
                for position, layer in enumerate(layers):
                    if chosen is not None and id(layer) not in chosen:
                        continue
                    state = layer.feedback_state
                    count = state["mirror_steps"]
                    state["mirror_steps"] = count + 1
                    if self.schedule == "alternate" and (count + position) % 2:
                        continue
                    self.mirror_layer(layer)
                    state["mirror_updates"] += 1

    def mirror_layer(self, layer: FeedbackLayer) -> None:
        """One mirror update of one layer's B (000 Alg. 1 lines 12-16), in place, without grad.

        Written against the layer-kind interface only (``weight_op``, ``weight_grad``,
        ``pairs``): it works for every kind ``convert`` knows.
        """
        weight = layer.full_weight()  # all-gathered when FSDP shards W
        shape = self.noise_shape(layer)
        generator = layer.feedback_generator(weight.device)
        orthogonal = self._orthogonal(layer)
        if orthogonal and self.drive == "coordinate":
            x = _coordinate_pairs(shape, generator, weight)
        elif orthogonal:
            x = _orthogonal_pairs(shape, generator, weight)
        else:
            x = torch.randn(shape, generator=generator, device=weight.device, dtype=weight.dtype)
        if self.noise_std != 1.0:
            x.mul_(self.noise_std)  # y_l - beta: the baseline cancels on the input side
        drive = layer.weight_op(x, weight)  # (N, *out_shape): the layer's op, bias blocked
        if self.baseline is not None:
            drive.add_(self.baseline)  # the default bias b- with phi(b-) = beta
        out = drive.relu_() if self.nonlinearity == "relu" else drive
        if self.baseline is None:
            # Batch means per unit (per position for conv); unbiased covariance: / (N - 1). Only
            # the output is centred: its deviations sum to zero over the batch, so the input's
            # batch mean cancels from sum_n (out_n - mean) (x_n - mean) exactly (one pass less
            # over the largest tensor).
            out.sub_(out.mean(0, keepdim=True))
            # the antithetic design's batch mean is exactly zero: no degree of freedom is lost
            samples = shape[0] if orthogonal else shape[0] - 1
        else:
            out.sub_(self.baseline)
            samples = shape[0]
        # cov(out, x) per shared weight, averaged over the input/output pairs it connects (D.2):
        # the weight gradient with the noise as input and the driven output as output gradient
        # sums over examples and positions; each entry is divided by its pairs per example
        # (zero padding is no neuron) times the examples.
        total = layer.weight_grad(x, out)
        covariance = total.div_(_pairs(layer, shape).clamp_min(1).mul(samples))
        feedback = layer.feedback_weight
        feedback.mul_(1 - self.decay).add_(covariance.to(feedback.dtype), alpha=self.hebbian_rate)

    def _orthogonal(self, layer: FeedbackLayer) -> bool:
        """This layer gets an antithetic orthogonal drive (the option, and a matrix kind)."""
        return self.drive != "gaussian" and layer.feedback_matrix() is not None

    def noise_shape(self, layer: FeedbackLayer) -> list[int]:
        """The mirror batch's shape: the last input's shape with ``mirror_batch`` examples.

        With ``mirror_batch=None`` the batch is chosen per layer so that every weight averages
        about ``PAIRS_PER_FAN_IN * fan_in`` input/output pairs per mirror step: ``N = max(2,
        ceil(PAIRS_PER_FAN_IN * fan_in / positions))``, positions being the output positions
        one example gives a weight (``H_out * W_out`` for a conv, 1 for a Linear on 2-D input).
        """
        recorded = layer.feedback_state.get("input_shape") or layer.default_input_shape()
        if recorded is None:
            raise RuntimeError(
                f"weight mirrors does not know the input size of this {type(layer).__name__} "
                f"(weight {tuple(layer.weight.shape)}): it has not run a forward pass yet. Run a "
                "batch through the model first, or call "
                "asymprop.mirror(model, steps, example_input=batch) or "
                "asymprop.mirror(model, steps, input_shapes={name: (N, C, H, W)})"
            )
        shape = list(recorded)
        if self.mirror_batch is not None:
            shape[0] = self.mirror_batch
        else:
            pairs = PAIRS_PER_FAN_IN * layer.fan_in
            shape[0] = max(2, math.ceil(pairs / _positions(layer, shape)))
        if self._orthogonal(layer) and shape[0] % 2:
            shape[0] += 1  # antithetic pairs
        return shape

    def _needs_shape(self, layer: FeedbackLayer) -> bool:
        return "input_shape" not in layer.feedback_state and layer.default_input_shape() is None


def _orthogonal_pairs(shape: Sequence[int], generator: torch.Generator, like: Tensor) -> Tensor:
    """The orthogonal drive: ``(N, ..., n_in)`` whose examples ``n`` and ``n + N/2`` are opposite
    and whose first-half rows (all positions) are rows of Haar-random orthogonal ``n_in x n_in``
    matrices scaled by ``sqrt(n_in)`` (unit variance per entry, as the Gaussian drive); a last
    block of ``m < n_in`` rows is ``m`` Haar-random orthonormal rows."""
    half, n_in = shape[0] // 2, shape[-1]
    rows = half * math.prod(shape[1:-1])
    # the QR in the weights' precision (float32 halves its cost), never below float32
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    blocks, drawn = [], 0
    while drawn < rows:
        # a block of fan_in rows, or the last rows only: the reduced QR of an (n_in, m) Gaussian
        # is a Haar-random set of m orthonormal vectors at O(n_in m^2) instead of O(n_in^3)
        m = min(n_in, rows - drawn)
        gaussian = torch.randn((n_in, m), generator=generator, device=like.device, dtype=dtype)
        q, r = torch.linalg.qr(gaussian)
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # Haar: signs of R's diagonal
        drawn += m
    pairs = torch.empty((2, rows, n_in), device=like.device, dtype=like.dtype)
    torch.mul(torch.cat(blocks), math.sqrt(n_in), out=pairs[0])
    torch.neg(pairs[0], out=pairs[1])
    return pairs.reshape(2 * half, *shape[1:])


def _coordinate_pairs(shape: Sequence[int], generator: torch.Generator, like: Tensor) -> Tensor:
    """The coordinate drive: ``(N, ..., n_in)`` whose examples ``n`` and ``n + N/2`` are opposite
    and whose first-half rows (all positions) are ``sqrt(n_in) e_j``, each unit ``j`` once per
    block of ``n_in`` rows in a random order (the rows of a random permutation matrix; a partial
    last block is a random subset of units). Unit variance per entry on average, as the Gaussian
    drive; the sign of a row is not drawn, since its pair holds the other sign."""
    half, n_in = shape[0] // 2, shape[-1]
    rows = half * math.prod(shape[1:-1])
    blocks = -(-rows // n_in)
    order = torch.rand((blocks, n_in), generator=generator, device=like.device).argsort(dim=1)
    # both halves in one scatter: +sqrt(n_in) into the first, -sqrt(n_in) into the second
    x = torch.zeros((2, rows, n_in), device=like.device, dtype=like.dtype)
    index = order.reshape(1, -1, 1)[:, :rows].expand(2, rows, 1)
    values = torch.tensor([math.sqrt(n_in), -math.sqrt(n_in)], device=like.device, dtype=like.dtype)
    x.scatter_(2, index, values.reshape(2, 1, 1).expand(2, rows, 1))
    return x.reshape(2 * half, *shape[1:])


def _pairs(layer: FeedbackLayer, shape: Sequence[int]) -> Tensor:
    """``layer.pairs(shape)``, cached per input shape (it is the same every mirror step)."""
    key = (tuple(shape[1:]), layer.weight.dtype, layer.weight.device)
    cache: dict[Any, Tensor] = layer.__dict__.setdefault("_mirror_pairs", {})
    if key not in cache:
        cache.clear()
        cache[key] = layer.pairs(shape)
    return cache[key]


def _positions(layer: FeedbackLayer, shape: Sequence[int]) -> int:
    """Output positions per example that share each weight: the largest pair count of any
    weight entry (``H_out * W_out`` for a conv without padding, the middle (sequence)
    dimensions for a Linear, 1 for a Linear on ``(N, in)``)."""
    return max(1, int(_pairs(layer, shape).max()))


def record_input_shapes(model: nn.Module, inputs: Tensor) -> None:
    """Run ``model(inputs)`` once to let every layer record its input shape, changing nothing.

    Every module is put in eval mode (batch norm uses and keeps its running statistics, dropout
    is off) and grad is off; the train/eval flags are restored afterwards.
    """
    module = unwrap(model)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            module(inputs)
        reshard(module)  # FSDP2: no backward frees the weights this pass gathered
    finally:
        for m, training in modes:
            m.training = training


def mirror(
    model: nn.Module,
    steps: int,
    *,
    example_input: Tensor | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Run ``steps`` steps of pure mirror mode on every weight-mirror layer of ``model``.

    This is the paper's warm-up before engaged training (000 App. D.2: two epochs of mirror mode
    bring random B into alignment), or extra mirroring at any time. Each step follows the rule's
    ``schedule``; B changes in place, nothing of the forward path (weights, biases, batch-norm
    statistics, ``.grad``) is touched. Steps run here count towards the rule's ``warmup_steps``.

    Args:
        model: a model converted with ``"wm"`` (other layers are ignored).
        steps: mirror steps (>= 0).
        example_input: a batch to run through the model once (eval mode, no grad) so layers that
            have not run yet learn their input shape.
        input_shapes: ``{qualified_name: (N, C, H, W) or (N, in)}``, input shapes given
            explicitly (N is replaced by the rule's ``mirror_batch`` when that is set).

    Raises:
        ValueError: no weight-mirror layer, a negative ``steps`` or an unknown layer name.
        RuntimeError: a conv layer's input size is unknown (names the fix).

    Example:
        >>> net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
        >>> model = asymprop.convert(net, "wm", seed=0, warmup_steps=0)
        >>> asymprop.alignment(model)["2"]["angle_deg"] > 60  # a random B: near 90
        True
        >>> asymprop.mirror(model, steps=500, example_input=x[:8])
        >>> asymprop.alignment(model)["2"]["angle_deg"] < 45  # mirrored: the ~25-degree plateau
        True

    Paper: 000 Alg. 1 (mirror mode), App. C.4 and D.2.
    """
    if steps < 0:
        raise ValueError(f"steps={steps!r} must be >= 0")
    named = [(name, layer) for name, layer in feedback_layers(model) if isinstance(layer.rule, WM)]
    if not named:
        raise ValueError(
            f"{type(model).__name__} has no weight-mirror layers: convert it with "
            "asymprop.convert(model, 'wm') first"
        )
    if input_shapes:
        by_name = dict(named)
        for name, shape in input_shapes.items():
            if name not in by_name:
                raise ValueError(
                    f"input_shapes names {name!r}, which is not a weight-mirror layer; "
                    f"valid names: {', '.join(by_name)}"
                )
            by_name[name].feedback_state["input_shape"] = [int(s) for s in shape]
    if example_input is not None:
        record_input_shapes(model, example_input)
    groups: dict[int, tuple[WM, list[FeedbackLayer]]] = {}
    for _, layer in named:
        rule = layer.rule
        assert isinstance(rule, WM)
        groups.setdefault(id(rule), (rule, []))[1].append(layer)
    for rule, layers in groups.values():
        rule.mirror_steps_(layers, steps)
