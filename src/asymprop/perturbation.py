"""Feedback learned by regression: node perturbation (004), synthetic gradients, the matching rule.

Node perturbation (``np``, 004 sec. 2-4). Every engaged step of :func:`asymprop.train_step` runs
the ordinary (clean) forward and backward pass, then a second, noisy forward pass in which every
hidden activation is perturbed, ``h_i = sigma(W_i h_{i-1}) + c_h xi_i`` with ``xi_i ~ N(0, I)``:
here the noise is added to the input of every converted layer whose input error is needed (all
but the first). Comparing the losses of the two passes example by example estimates the
gradient at each perturbed activation (004 eq. 2, Theorem 1)::

    lambda_hat_i = (L_noisy - L_clean) xi_i / c_h            # per example, (N, n_i)

and B is fitted so that the error it sends down, ``g(e; B)``, matches it (004 eq. 3)::

    B = argmin  sum_n || g(e_n; B) - lambda_hat_n ||^2  (+ gamma ||B||^2 for ridge)

with two shapes of g (option ``shape``):

* ``"fa"``: ``g = e_{i+1} @ B_{i+1}`` (the papers' ``B^T e``), ``e_{i+1}`` the error at the
  pre-activation of the next layer, itself sent down by the learned B above (004 Theorem 1-2);
  B has W's shape;
* ``"dfa"``: ``g = e_out @ B_{i+1}``, straight from the output error (004 Corollary 1, sec. 4.3);
  B is ``(n_out, *input_shape)`` and routes the error as in :mod:`asymprop.direct`.

and two fits (option ``fit``):

* ``"sgd"`` (the paper's default): one step per minibatch on ``1/2 sum_n ||g_n - lambda_hat_n||^2``
  (a sum over the minibatch, as in the authors' code): ``B -= lr_b e^T (e B - lambda_hat)``. With a
  constant ``lr_b`` B fluctuates around the least-squares solution at a noise floor set by
  ``lr_b`` and the estimator's variance (which grows with the number of perturbed units).
* ``"ridge"`` (004 App. C.3): the exact solution of the regularised problem over *all* examples
  seen so far, ``B = (sum e^T e + gamma I)^{-1} sum e^T lambda_hat``, from running sums kept as
  buffers ``feedback_gram`` ``(p, p)`` and ``feedback_cross`` ``(p, n_in)`` (``p`` = the width of
  ``e``); ``gamma`` is relative to the *sum* over examples, so its pull fades as data accrue.
  Far faster convergence than SGD (no step size, no noise floor) at the cost of one ``p x p``
  solve per layer per step; the statistics never forget, so it suits fixed or slowly changing W
  (the paper used it with W fixed, App. B). Linear layers, or any layer with ``shape="dfa"``.

Scales: every quantity is per example. ``loss_fn`` must be the mean or the sum over examples of a
per-example loss (``F.mse_loss``, ``F.cross_entropy``, ``0.5 * ((y - t)**2).sum()``, ...): the
per-example losses are computed with ``torch.func.vmap(loss_fn)`` over one-example slices, the
reduction is identified from the batch loss (a clear error otherwise), and the regressor ``e``
is autograd's error divided by it (``1/N`` for a mean), so ``lr_b`` and ``gamma`` do not depend
on the reduction. Examples must not interact (no batch norm in training mode: the noise of one
example would reach another's loss).

Reproducibility: each layer draws its noise from its own seeded stream (``feedback_generator``),
so a run, a reloaded checkpoint and every rank of a DDP job draw the same numbers; the noisy pass
replays the clean pass's global random state (same dropout masks) and leaves buffers (batch-norm
statistics) as they were. Under DDP every rank draws the noise of the *global* batch and uses its
own rows, and the fit's sums (SGD gradient, ridge statistics) are all-reduced: training equals one
process on the global batch, and B stays identical on every rank.

The synthetic-gradient baseline ``sg`` fits B the same way to the *true* gradient at each layer's
input (from an extra exact-backprop pass) instead of lambda_hat: not plausible, a reference
(004 Table 2, App. C.5). The matching rule ``matched`` gives B the gradient step W takes, with
weight decay (004 sec. 4.2, App. C.5).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .convert import exact_backprop, unwrap
from .direct import (
    DirectGraph,
    _per_position,
    direct_forward,
    draw_direct_feedback,
    init_lazy_feedback,
    resize_lazy_feedback,
)
from .layers import reshard, whole
from .rules import (
    FeedbackRule,
    Init,
    StepContext,
    check_positive,
    random_feedback,
    register_rule,
)
from .train import DivergenceError

if TYPE_CHECKING:
    from .layers import FeedbackLayer

__all__ = [
    "FITS",
    "NOISES",
    "SHAPES",
    "DFAShape",
    "FAShape",
    "Fit",
    "Matched",
    "NodePerturbation",
    "RegressionRule",
    "RidgeFit",
    "SGDFit",
    "Shape",
    "SyntheticGradient",
    "gaussian_noise",
    "loss_scale",
    "per_example_loss",
    "perturbation_estimate",
    "rademacher_noise",
]


# ---------------------------------------------------------------------------------------------
# The estimator and the per-example losses
# ---------------------------------------------------------------------------------------------


def perturbation_estimate(
    clean_loss: Tensor, noisy_loss: Tensor, noise: Tensor, noise_std: float
) -> Tensor:
    """Node perturbation's estimate of ``dL/dh``: ``(L_noisy - L_clean) xi / c_h``, per example.

    With ``h_noisy = h + c_h xi``, ``xi ~ N(0, I)``, linearising the loss gives
    ``E[lambda_hat | x, y] = dL/dh + O(c_h)`` (004 eq. 1-2, Theorem 1).

    Args:
        clean_loss: ``(N,)`` per-example losses of the clean pass.
        noisy_loss: ``(N,)`` per-example losses of the noisy pass.
        noise: ``(N, *shape)`` the unit-variance noise ``xi`` of the perturbed activation.
        noise_std: ``c_h``.

    Returns:
        ``(N, *shape)``: one estimate of ``dL_n/dh_n`` per example.

    Example:
        >>> h = torch.randn(4, 3); xi = torch.randn(4, 3); c = 1e-3
        >>> loss = lambda h: (h ** 2).sum(1)                   # dL/dh = 2h
        >>> lam = perturbation_estimate(loss(h), loss(h + c * xi), xi, c)  # ~ xi (xi . 2h)

    Paper: 004 eq. (2).
    """
    diff = (noisy_loss - clean_loss).reshape(-1, *([1] * (noise.dim() - 1)))
    return diff * noise / noise_std


def per_example_loss(
    loss_fn: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor
) -> Tensor:
    """``(N,)``: ``loss_fn`` applied to each one-example slice, via ``torch.func.vmap``.

    ``loss_fn`` must accept a batch of one and be vmappable (the torch losses are; Python
    control flow on tensor values, ``.item()`` or in-place writes to captured tensors are not).

    Example:
        >>> outputs, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
        >>> losses = per_example_loss(F.cross_entropy, outputs, labels)
        >>> losses.shape, bool(torch.isclose(losses.mean(), F.cross_entropy(outputs, labels)))
        (torch.Size([5]), True)
    """

    def one(output: Tensor, target: Tensor) -> Tensor:
        return loss_fn(output.unsqueeze(0), target.unsqueeze(0))

    return torch.func.vmap(one)(outputs, targets)


def loss_scale(
    batch_loss: Tensor | float, per_example: Tensor, *, precision: torch.dtype | None = None
) -> float:
    """``dL_batch/dL_n``: ``1/N`` if the batch loss is the mean of ``per_example``, 1 for the sum.

    ``precision``: the dtype the network computed in (its outputs'): under bf16/fp16 autocast
    the two losses agree only to that format's rounding (bf16: 2^-8), so the match allows 2%;
    else 0.1%. Either is far below the factor N between a mean and a sum.

    Raises:
        ValueError: the batch loss is neither (a weighted mean, a penalty term, ...).
    """
    n = per_example.numel()
    total = float(per_example.detach().double().sum())
    value = float(batch_loss.detach()) if isinstance(batch_loss, Tensor) else float(batch_loss)
    rel_tol = 2e-2 if precision in (torch.bfloat16, torch.float16) else 1e-3
    for scale in (1.0 / n, 1.0):
        if math.isclose(value, total * scale, rel_tol=rel_tol, abs_tol=1e-12):
            return scale
    raise ValueError(
        f"the batch loss {value:.6g} is neither the mean ({total / n:.6g}) nor the sum "
        f"({total:.6g}) of the per-example losses loss_fn(outputs[n:n+1], targets[n:n+1]): "
        "node perturbation and synthetic gradients compare losses example by example, so "
        "loss_fn must reduce a per-example loss by mean or sum"
    )


# ---------------------------------------------------------------------------------------------
# What one engaged step records (clean pass) and injects (noisy pass)
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Seen:
    """One layer's calls in the clean pass (several for a layer used at every time step)."""

    input_shapes: list[torch.Size]
    learns: bool  # its input error is needed (an input requires grad): B is used and fitted
    chain: DirectGraph | None
    errors: list[Tensor | None]  # dL/dy at the layer's output per call, from the clean backward
    # per call: its input carries a gradient, so the call is perturbed and fitted (a recurrent
    # layer's first call reads the initial state, which does not)
    call_learns: list[bool] = field(default_factory=list)
    # the inputs per call, kept only for kinds whose input error depends on them (bilinear)
    inputs: list[Tensor] = field(default_factory=list)
    # a layer called once and fed by data only (not learning): its clean (input, output), which
    # the noisy pass reuses instead of recomputing when it sees the same input (the costly
    # first layer)
    clean: tuple[Tensor, Tensor] | None = None


def _store_error(seen: _Seen, call: int, grad: Tensor) -> None:
    seen.errors[call] = grad.detach()


@dataclass(eq=False)
class _Record:
    cpu_rng: Tensor
    cuda_rng: list[Tensor]
    devices: list[torch.device]
    calls: dict[FeedbackLayer, _Seen] = field(default_factory=dict)  # in call order

    def add(
        self, layer: FeedbackLayer, input: Tensor, output: Tensor, chain: DirectGraph | None
    ) -> None:
        seen = self.calls.get(layer)
        if seen is None:
            seen = self.calls[layer] = _Seen([], False, chain, [])
            if not input.requires_grad:  # a copy: an in-place activation may overwrite it next
                seen.clean = (input.detach(), output.detach().clone())
        else:
            seen.clean = None
        seen.learns = seen.learns or input.requires_grad
        seen.input_shapes.append(input.shape)
        seen.call_learns.append(input.requires_grad)
        if not layer.linear_in_input and input.requires_grad:
            seen.inputs.append(input.detach())
        seen.errors.append(None)
        output.register_hook(partial(_store_error, seen, len(seen.errors) - 1))


def gaussian_noise(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``xi ~ N(0, I)``: the papers' activation noise."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


_SIGNS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _signs(device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(256, 8)``: row ``o`` holds ``2 bit_j(o) - 1`` for ``j = 0..7`` (cached per device and
    dtype): one gather turns a random byte into eight +-1 entries."""
    key = (device, dtype)
    if key not in _SIGNS:
        bits = (
            torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)
        ) & 1
        _SIGNS[key] = (bits * 2 - 1).to(dtype)
    return _SIGNS[key]


def rademacher_noise(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``xi`` with independent entries +-1 (probability 1/2 each): zero mean, unit variance, and
    sub-Gaussian, as 004's consistency results assume (A1), from one random bit per entry.

    The bits are 7 bytes of each 63-bit word ``random_`` gives on int64 (the eighth byte has a
    constant top bit), bit ``j`` of a byte giving entry ``j`` of its eight; one table lookup per
    byte writes the eight entries (a tenth of the time of shifting and masking them out).
    """
    n = math.prod(shape)
    words = torch.empty(-(-n // 56), dtype=torch.int64, device=device).random_(generator=generator)
    octets = words.view(torch.uint8).view(-1, 8)[:, :7].reshape(-1)[: -(-n // 8)]
    return _signs(device, dtype).index_select(0, octets.int()).reshape(-1)[:n].view(shape)


#: The activation noise of ``np``, by its option ``noise``.
NOISES: dict[str, Callable[..., Tensor]] = {
    "gaussian": gaussian_noise,
    "rademacher": rademacher_noise,
}


@dataclass(eq=False)
class _NoisyPass:
    noise_std: float
    noise: dict[FeedbackLayer, list[Tensor]]  # layers to perturb -> their unit noise xi per call
    rows: tuple[int, int]  # (global batch size, this rank's first row): DDP ranks share a draw
    record: _Record
    draw: Callable[..., Tensor] = gaussian_noise  # (shape, generator, device, dtype) -> xi
    calls: dict[FeedbackLayer, int] = field(default_factory=dict)  # calls seen in this pass

    def forward(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        if layer in self.noise:
            call = self.calls.get(layer, 0)
            self.calls[layer] = call + 1
            learns = self.record.calls[layer].call_learns
            if call < len(learns) and learns[call]:
                return layer.native_forward(self.perturb(layer, input))
            return layer.native_forward(input)
        seen = self.record.calls.get(layer)
        clean = None if seen is None else seen.clean
        if clean is not None and clean[0].shape == input.shape and torch.equal(clean[0], input):
            return clean[1]  # same input, same W: the clean pass's output
        return layer.native_forward(input)

    def perturb(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        total, first = self.rows
        generator = layer.feedback_generator(input.device)
        shape = (total, *input.shape[1:])  # the global batch's noise; this rank's rows below
        xi = self.draw(shape, generator, input.device, input.dtype)
        xi = xi[first : first + input.shape[0]]
        self.noise[layer].append(xi)
        return input + self.noise_std * xi


# Set by train_step's hooks for the duration of one step; a ContextVar so concurrent threads
# (and nested models) never see each other's step.
_RECORDS: ContextVar[dict[int, _Record] | None] = ContextVar("asymprop_records", default=None)
_NOISY: ContextVar[_NoisyPass | None] = ContextVar("asymprop_noisy_pass", default=None)


@contextmanager
def _replay(step: StepContext, record: _Record) -> Iterator[nn.Module]:
    """Re-run the step's forward pass with the clean pass's random state; buffers untouched."""
    model = unwrap(step.model)
    saved = {
        name: b.detach().clone()
        for name, b in model.named_buffers()
        if not name.rsplit(".", 1)[-1].startswith("feedback")
    }
    try:
        with torch.random.fork_rng(devices=record.devices):
            torch.set_rng_state(record.cpu_rng)
            for device, state in zip(record.devices, record.cuda_rng, strict=True):
                torch.cuda.set_rng_state(state, device)
            yield model
    finally:
        reshard(model)  # FSDP2: the noisy pass had no backward to free the gathered weights
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def _is_data_parallel(model: nn.Module) -> bool:
    """Each rank trains on its share of the batch: DDP, or FSDP2 (``fully_shard``) anywhere in
    the model (``torch.distributed.fsdp`` is looked up only if something imported it)."""
    if not dist.is_initialized():
        return False
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in unwrap(model).modules())


def _sum_over_ranks(model: nn.Module) -> Callable[[Tensor], None]:
    """In-place sum over DDP ranks (the fit's sums then run over the global batch), or nothing."""
    if not _is_data_parallel(model):
        return lambda tensor: None
    return lambda tensor: dist.all_reduce(tensor)


def _global_rows(model: nn.Module, batch: int) -> tuple[int, int]:
    """``(global batch size, index of this rank's first example)``; ``(batch, 0)`` alone."""
    if not _is_data_parallel(model):
        return batch, 0
    sizes = [torch.zeros((), dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(batch, dtype=torch.int64))
    counts = [int(size) for size in sizes]
    return sum(counts), sum(counts[: dist.get_rank()])


def _describe_layer(step: StepContext, layer: FeedbackLayer) -> str:
    name = next((n for n, other in step.layers if other is layer), None)
    return repr(name) if name is not None else f"{type(layer).__name__}"


def _freeze_forward_weights(model: nn.Module) -> None:
    """Warm-up: clear every forward parameter's gradient so ``optimizer.step()`` skips it."""
    for name, param in unwrap(model).named_parameters():
        if not name.rsplit(".", 1)[-1].startswith("feedback"):
            param.grad = None


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


# The estimator axis: which error g(e; B) reads (shape), and how B is fitted to the target (fit).


class Shape:
    """Where ``g(e; B)`` takes its error from: one object per value of the ``shape`` option."""

    name: ClassVar[str] = ""

    def init_feedback(
        self, rule: RegressionRule, layer: FeedbackLayer, generator: torch.Generator
    ) -> None:
        """Install B (and the layer's random stream) at conversion."""
        raise NotImplementedError

    def forward(
        self, rule: RegressionRule, layer: FeedbackLayer, input: Tensor
    ) -> tuple[Tensor, DirectGraph | None]:
        """The clean pass: the layer's output with ``g(e; B)`` as its input gradient."""
        raise NotImplementedError

    def regressor(
        self, rule: RegressionRule, record: _Record, layer: FeedbackLayer
    ) -> Tensor | None:
        """``e`` from the clean backward pass, one row block per learning call (None: none)."""
        raise NotImplementedError

    def design(
        self, rule: RegressionRule, layer: FeedbackLayer, regressor: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(e, t, B)`` as matrices, ``(rows, p)``, ``(rows, n_in)`` and a ``(p, n_in)`` view of
        B, for a fit in closed form; None when g is not a matrix product (a convolution's
        ``shape="fa"``), which only SGD can fit, through the layer kind."""
        raise NotImplementedError


class FAShape(Shape):
    """``g = e_{i+1} @ B_{i+1}``: the error at the next layer's pre-activation, sent down by the
    learned B above (004 Theorem 1-2); B has W's shape, drawn as FA's."""

    name = "fa"

    def init_feedback(
        self, rule: RegressionRule, layer: FeedbackLayer, generator: torch.Generator
    ) -> None:
        initial = random_feedback(layer, generator, rule.init, rule.gain)
        layer.set_feedback_weight(initial.to(device=layer.weight.device, dtype=layer.weight.dtype))
        layer.seed_feedback_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        layer.register_load_state_dict_pre_hook(resize_lazy_feedback)

    def forward(
        self, rule: RegressionRule, layer: FeedbackLayer, input: Tensor
    ) -> tuple[Tensor, DirectGraph | None]:
        return layer.feedback_forward(input, layer.feedback_weight), None

    def regressor(
        self, rule: RegressionRule, record: _Record, layer: FeedbackLayer
    ) -> Tensor | None:
        seen = record.calls[layer]
        learning = [e for e, ok in zip(seen.errors, seen.call_learns, strict=True) if ok]
        if any(error is None for error in learning):
            return None
        errors = [e for e in learning if e is not None]
        return errors[0] if len(errors) == 1 else torch.cat(errors)

    def design(
        self, rule: RegressionRule, layer: FeedbackLayer, regressor: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        matrix = layer.feedback_matrix()  # B as an (out, in) view, or None (a convolution)
        if matrix is None:
            return None
        # rows: every leading position; (rows, out) and (rows, in)
        e = regressor.reshape(-1, regressor.shape[-1])
        return e, target.reshape(-1, target.shape[-1]), matrix


class DFAShape(Shape):
    """``g = e_out @ B_{i+1}``: straight from the output error (004 Corollary 1, sec. 4.3); B is
    ``(n_out, *input_shape)``, drawn at the first backward pass, routed as in `asymprop.direct`."""

    name = "dfa"

    def init_feedback(
        self, rule: RegressionRule, layer: FeedbackLayer, generator: torch.Generator
    ) -> None:
        init_lazy_feedback(layer, generator)

    def forward(
        self, rule: RegressionRule, layer: FeedbackLayer, input: Tensor
    ) -> tuple[Tensor, DirectGraph | None]:
        return direct_forward(layer, input, _draw_direct)

    def regressor(
        self, rule: RegressionRule, record: _Record, layer: FeedbackLayer
    ) -> Tensor | None:
        seen = record.calls[layer]
        if seen.chain is None:
            return None
        graphs = {id(s.chain.root()) for s in record.calls.values() if s.chain is not None}
        if len(graphs) != 1:
            raise RuntimeError(
                f"rule {rule.name!r} with shape='dfa' sends one output error to every layer, but "
                f"this forward pass ran {len(graphs)} separate graphs of converted layers (two "
                "models, or outputs that never meet): use shape='fa'"
            )
        error = seen.chain.root().error
        if error is None:
            return None
        calls = sum(seen.call_learns)  # every learning call regresses on the same output error
        return error if calls == 1 else torch.cat([error] * calls)

    def design(
        self, rule: RegressionRule, layer: FeedbackLayer, regressor: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        if _per_position(regressor.shape, target.shape):  # rows: examples x positions
            e = regressor.reshape(-1, regressor.shape[-1])  # (rows, n_out)
            return e, target.reshape(-1, target.shape[-1]), layer.feedback_weight
        # rows: examples; (N, n_out) and (N, prod(input_shape)); B as a (p, n_in) view
        e = regressor.reshape(regressor.shape[0], -1)
        t = target.reshape(target.shape[0], -1)
        return e, t, layer.feedback_weight.view(e.shape[1], t.shape[1])


def _draw_direct(
    layer: FeedbackLayer, shape: tuple[int, ...], generator: torch.Generator
) -> Tensor:
    """A learned DFA-shaped B's initial value: Nøkland's scale (the fit sets its size)."""
    weight = layer.weight
    return draw_direct_feedback(shape, generator, device=weight.device, dtype=weight.dtype)


class Fit:
    """How B is fitted to the targets: one object per value of the ``fit`` option."""

    name: ClassVar[str] = ""

    def init_feedback(self, layer: FeedbackLayer) -> None:
        """State the fit keeps per layer (buffers), at conversion."""

    def learns(self, rule: RegressionRule) -> bool:
        """Whether this fit changes B at all with the rule's options."""
        return True

    def step(
        self, rule: RegressionRule, e: Tensor, t: Tensor, feedback: Tensor, layer: FeedbackLayer,
        reduce: Callable[[Tensor], None],
    ) -> None:  # fmt: skip
        """Change ``feedback`` (a ``(p, n_in)`` view of B) in place from ``e`` and ``t``."""
        raise NotImplementedError

    def step_kind(
        self, rule: RegressionRule, layer: FeedbackLayer, regressor: Tensor, target: Tensor,
        reduce: Callable[[Tensor], None], inputs: Tensor | None,
    ) -> None:  # fmt: skip
        """Change B when g is not a matrix product (a convolution with ``shape="fa"``)."""
        raise ValueError(
            f"rule {rule.name!r} with fit={self.name!r} and shape='fa' fits a matrix, but "
            f"{type(layer).__name__}(weight {tuple(layer.weight.shape)}) does not send its error "
            "through one (a convolution): use fit='sgd', or shape='dfa' (whose B is a matrix for "
            "any layer)"
        )


class SGDFit(Fit):
    """One step per minibatch on ``1/2 sum_n ||g_n - t_n||^2``: ``B -= lr_b e^T (e B - t)``."""

    name = "sgd"

    def learns(self, rule: RegressionRule) -> bool:
        return rule.lr_b > 0

    def step(
        self, rule: RegressionRule, e: Tensor, t: Tensor, feedback: Tensor, layer: FeedbackLayer,
        reduce: Callable[[Tensor], None],
    ) -> None:  # fmt: skip
        # d/dB 1/2 sum_n ||e_n B - t_n||^2 = e^T (e B - t): (p, N) @ (N, n_in)
        grad = e.t() @ (e @ feedback - t)
        reduce(grad)
        feedback.sub_(rule.lr_b * grad)

    def step_kind(
        self, rule: RegressionRule, layer: FeedbackLayer, regressor: Tensor, target: Tensor,
        reduce: Callable[[Tensor], None], inputs: Tensor | None,
    ) -> None:  # fmt: skip
        """SGD on B for any layer kind (convolutions, ...) through the layer-kind interface.

        ``g = input_grad(e, B)``; for an op linear in its input, ``<input_grad(e, B), r> =
        <e, op(r; B)>``, so ``d/dB 1/2 ||g - t||^2`` is the op's weight gradient for input
        ``r = g - t`` and output gradient ``e``: two products, no third. Other kinds (bilinear)
        take the vjp of ``input_grad``, which is linear in B, at the clean ``inputs``.
        """
        feedback = layer.feedback_weight
        e, t = regressor.to(feedback.dtype), target.to(feedback.dtype)
        if layer.linear_in_input:
            pred = layer.input_grad(e, feedback.detach(), t)  # (N, *input_shape): t's shape
            grad = layer.weight_grad(pred.sub_(t), e)
        else:
            assert inputs is not None
            x = inputs.to(feedback.dtype)
            pred, vjp = torch.func.vjp(lambda b: layer.input_grad(e, b, x), feedback.detach())[:2]
            grad = vjp(pred - t)[0]
        reduce(grad)
        feedback.sub_(rule.lr_b * grad)


class RidgeFit(Fit):
    """The exact regularised solution over all examples seen (004 App. C.3), from running sums
    ``feedback_gram`` ``(p, p)`` and ``feedback_cross`` ``(p, n_in)``, sized at the first fit."""

    name = "ridge"

    def init_feedback(self, layer: FeedbackLayer) -> None:
        layer.register_buffer("feedback_gram", layer.weight.detach().new_zeros(0))
        layer.register_buffer("feedback_cross", layer.weight.detach().new_zeros(0))

    def step(
        self, rule: RegressionRule, e: Tensor, t: Tensor, feedback: Tensor, layer: FeedbackLayer,
        reduce: Callable[[Tensor], None],
    ) -> None:  # fmt: skip
        gram, cross = layer.get_buffer("feedback_gram"), layer.get_buffer("feedback_cross")
        if gram.numel() == 0:
            gram.resize_(e.shape[1], e.shape[1]).zero_()
            cross.resize_(e.shape[1], t.shape[1]).zero_()
        d_gram, d_cross = e.t() @ e, e.t() @ t  # (p, p), (p, n_in)
        reduce(d_gram)
        reduce(d_cross)
        gram.add_(d_gram)
        cross.add_(d_cross)
        eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
        solution = torch.linalg.solve(gram.double() + rule.gamma * eye, cross.double())
        feedback.copy_(solution)


#: The estimator axis, by option value: ``shape`` and ``fit`` of ``np`` and ``sg``.
SHAPES: dict[str, Shape] = {shape.name: shape for shape in (FAShape(), DFAShape())}
FITS: dict[str, Fit] = {fit.name: fit for fit in (SGDFit(), RidgeFit())}


@dataclass(frozen=True)
class RegressionRule(FeedbackRule):
    """Abstract base of ``np`` and ``sg``: B fitted by regression onto a per-layer target.

    Subclasses provide ``targets`` (what ``g(e; B)`` should match at each learning layer's input);
    this class records the clean pass and runs the warm-up, and the two estimator objects do the
    rest: ``estimator_shape`` (`SHAPES`: where g takes its error from) and ``fitter`` (`FITS`: how
    B is fitted). See the module docstring for the equations.
    """

    fit: Literal["sgd", "ridge"] = "sgd"
    gamma: float = 0.1
    lr_b: float = 5e-4
    shape: Literal["fa", "dfa"] = "fa"
    warmup_steps: int = 0
    init: Init = "uniform"
    gain: float = 1.0

    needs_train_step = True

    def validate(self) -> None:
        check_positive(self, "gamma", "gain")
        if not (self.lr_b >= 0 and math.isfinite(self.lr_b)):
            raise ValueError(
                f"rule {self.name!r} option lr_b={self.lr_b!r} must be a finite number >= 0"
            )
        if self.warmup_steps < 0:
            raise ValueError(
                f"rule {self.name!r} option warmup_steps={self.warmup_steps!r} must be >= 0"
            )

    @property
    def estimator_shape(self) -> Shape:
        return SHAPES[self.shape]

    @property
    def fitter(self) -> Fit:
        return FITS[self.fit]

    # --- set-up -----------------------------------------------------------------------------
    def init_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> None:
        self.estimator_shape.init_feedback(self, layer, generator)
        self.fitter.init_feedback(layer)
        layer.feedback_state["steps"] = 0

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        """Not used: the estimator's shape installs B (`Shape.init_feedback`)."""
        raise NotImplementedError("RegressionRule's B is installed by its estimator_shape")

    # --- the pass ---------------------------------------------------------------------------
    def forward(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        noisy = _NOISY.get()
        if noisy is not None:  # the noisy pass of a train_step: no graph, no recording
            return noisy.forward(layer, input)
        output, chain = self.estimator_shape.forward(self, layer, input)
        records = _RECORDS.get()
        record = None if records is None else records.get(id(self))
        if record is not None and output.requires_grad:
            record.add(layer, input, output, chain)
        return output

    # --- train_step hooks -------------------------------------------------------------------
    def before_forward(self, step: StepContext) -> None:
        device = step.inputs.device
        devices = [device] if device.type == "cuda" else []
        record = _Record(
            torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices], devices
        )
        records = dict(_RECORDS.get() or {})
        records[id(self)] = record
        _RECORDS.set(records)

    def after_backward(self, step: StepContext) -> None:
        records = dict(_RECORDS.get() or {})
        record = records.pop(id(self), None)
        _RECORDS.set(records or None)
        if record is None or not record.calls:
            raise RuntimeError(
                f"rule {self.name!r}: the forward pass of train_step did not run through this "
                "rule's layers with gradients enabled in this thread (nn.DataParallel runs "
                "replicas in other threads: use DistributedDataParallel)"
            )
        owned = [layer for _, layer in step.layers if layer.rule is self]
        steps = max(int(layer.feedback_state.get("steps", 0)) for layer in owned)
        if steps < self.warmup_steps:
            _freeze_forward_weights(step.model)
        learning = [layer for layer, seen in record.calls.items() if seen.learns]
        if learning and self.fitter.learns(self):
            targets, scale = self.targets(step, record, learning)
            reduce = _sum_over_ranks(step.model)
            with torch.no_grad():
                for layer in learning:
                    regressor = self.estimator_shape.regressor(self, record, layer)
                    if regressor is not None:
                        inputs = record.calls[layer].inputs
                        clean = None if not inputs else torch.cat(inputs)
                        self._fit(layer, regressor / scale, targets[layer], reduce, clean)
                # min and max are NaN or +-inf iff an entry is: one pass, no (N, ...) mask
                finite = (
                    torch.stack(
                        [torch.stack(torch.aminmax(layer.feedback_weight)) for layer in learning]
                    )
                    .isfinite()
                    .all(dim=1)
                )
                if not bool(finite.all()):  # one host sync per step
                    bad = [
                        _describe_layer(step, layer)
                        for layer, ok in zip(learning, finite.tolist(), strict=True)
                        if not ok
                    ]
                    raise DivergenceError(
                        f"rule {self.name!r}: the fit of B made it non-finite in {', '.join(bad)} "
                        f"(fit={self.fit!r}, lr_b={self.lr_b}); the SGD fit is stable only while "
                        "lr_b times the largest eigenvalue of e^T e (summed over the batch and "
                        "positions) stays below 2: lower lr_b, use fit='ridge', or draw B at "
                        "W's scale with init='weight' if the errors are large"
                    )
        for layer in owned:
            layer.feedback_state["steps"] = steps + 1

    def targets(
        self, step: StepContext, record: _Record, learning: list[FeedbackLayer]
    ) -> tuple[dict[FeedbackLayer, Tensor], float]:
        """What the error at each learning layer's input should be, per example.

        Returns:
            ``({layer: (N, *input_shape)}, scale)``: the targets, and ``dL_batch / dL_n`` (see
            :func:`loss_scale`), which turns autograd's errors into per-example ones.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement targets")

    # --- the fit ----------------------------------------------------------------------------
    def _fit(
        self,
        layer: FeedbackLayer,
        regressor: Tensor,
        target: Tensor,
        reduce: Callable[[Tensor], None],
        inputs: Tensor | None = None,
    ) -> None:
        """One fit of B: in closed form on matrices, or through the layer kind.

        ``inputs``: the clean inputs (row blocks as the regressor's), needed only for kinds whose
        input error depends on them (``layer.linear_in_input`` False).
        """
        design = self.estimator_shape.design(self, layer, regressor, target)
        if design is None:
            self.fitter.step_kind(self, layer, regressor, target, reduce, inputs)
            return
        e, t, feedback = design
        self.fitter.step(self, e.to(feedback.dtype), t.to(feedback.dtype), feedback, layer, reduce)


@register_rule
@dataclass(frozen=True)
class NodePerturbation(RegressionRule):
    """Node perturbation: B learned by regressing the error it sends onto noise-driven estimates.

    Each engaged step: clean pass, backward, then a noisy pass with ``h_i += c_h xi_i`` on every
    hidden activation (the input of every converted layer but the first); per example
    ``lambda_hat_i = (L_noisy - L_clean) xi_i / c_h`` and B is fitted to
    ``argmin sum ||g(e; B) - lambda_hat||^2`` (module docstring: shapes, fits, scales).

    Options:
        fit: ``"sgd"`` (default) or ``"ridge"`` (online ridge regression, App. C.3).
        gamma: the ridge regularisation, relative to the sum over all examples seen.
        noise_std: ``c_h``, the standard deviation of the activation noise.
        noise: the unit noise ``xi``: ``"gaussian"`` (the paper's, N(0, I)) or
            ``"rademacher"`` (+-1 entries: also sub-Gaussian with identity covariance, so the
            estimator keeps its mean, 004 A1; one random bit per entry, cheaper on a CPU).
        lr_b: B's SGD learning rate (the step on a sum over the minibatch); 0 freezes B (FA).
        shape: ``"fa"`` (``B e_{i+1}``, from the next layer) or ``"dfa"`` (``B e_out``).
        warmup_steps: engaged steps at the start during which only B learns (W frozen).

    Needs ``asymprop.train_step`` (it must see the batch and the loss); ``update_feedback``
    alone raises.

    Example:
        >>> net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
        >>> model = asymprop.convert(net, "np", seed=0, fit="ridge", gamma=0.1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> for _ in range(3):
        ...     loss = asymprop.train_step(model, optimizer, F.cross_entropy, x, y)
        >>> model[2].feedback_gram.shape  # the running sums of its input error's regressor e
        torch.Size([4, 4])

    Paper: 004 (Lansdell, Prakash, Kording 2020) sec. 2-4, Theorem 1-2, Corollary 1, App. B-C.
    """

    name = "np"
    noise_std: float = 0.01
    noise: Literal["gaussian", "rademacher"] = "gaussian"

    def validate(self) -> None:
        super().validate()
        check_positive(self, "noise_std")

    def targets(
        self, step: StepContext, record: _Record, learning: list[FeedbackLayer]
    ) -> tuple[dict[FeedbackLayer, Tensor], float]:
        assert step.outputs is not None and step.loss is not None
        rows = _global_rows(step.model, int(step.inputs.shape[0]))
        noisy = _NoisyPass(
            self.noise_std, {layer: [] for layer in learning}, rows, record, NOISES[self.noise]
        )
        token = _NOISY.set(noisy)
        try:
            with _replay(step, record) as model, torch.no_grad():
                outputs = model(step.inputs)
        finally:
            _NOISY.reset(token)
        # one vmapped call for both passes: (2N,) -> clean (N,), noisy (N,)
        both = per_example_loss(
            step.loss_fn,
            torch.cat([step.outputs.detach(), outputs]),
            torch.cat([step.targets, step.targets]),
        )
        clean_loss, noisy_loss = both.chunk(2)
        scale = loss_scale(step.loss, clean_loss, precision=step.outputs.dtype)
        estimates = {}
        for layer, noise in noisy.noise.items():
            if len(noise) != sum(record.calls[layer].call_learns):
                raise RuntimeError(
                    f"rule 'np': the noisy pass called {type(layer).__name__}(weight "
                    f"{tuple(layer.weight.shape)}) {len(noise)} times, the clean pass "
                    f"{sum(record.calls[layer].call_learns)}; the forward pass must not depend "
                    "on chance beyond torch's global generator"
                )
            # one row block per call, in call order (as the regressor's)
            parts = [
                perturbation_estimate(clean_loss, noisy_loss, xi, self.noise_std) for xi in noise
            ]
            estimates[layer] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return estimates, scale


@register_rule
@dataclass(frozen=True)
class SyntheticGradient(RegressionRule):
    """Synthetic-gradient baseline: B fitted to the *true* gradient at each layer's input.

    As ``np``, with ``lambda_hat`` replaced by ``lambda = dL/dh`` from an extra exact-backprop
    pass on the same batch (a forward and a backward pass through W): it uses weight transport
    and exact gradients as supervision, so it is not plausible; it measures what a perfect
    estimator would give (004 Table 2, "SG"; g = B e as in App. C.5, not Jaderberg's B^T h + c).

    Options: ``fit``, ``gamma``, ``lr_b``, ``shape``, ``warmup_steps`` as for ``np``.

    Example:
        >>> net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
        >>> model = asymprop.convert(net, "sg", seed=0, lr_b=1e-3)
        >>> loss = asymprop.train_step(model, torch.optim.SGD(model.parameters(), lr=0.01),
        ...                            F.cross_entropy, x, y)

    Paper: 004 sec. 4.4 and App. C.5 (after Jaderberg et al. 2016).
    """

    name = "sg"

    def targets(
        self, step: StepContext, record: _Record, learning: list[FeedbackLayer]
    ) -> tuple[dict[FeedbackLayer, Tensor], float]:
        assert step.outputs is not None and step.loss is not None
        clean_loss = per_example_loss(step.loss_fn, step.outputs.detach(), step.targets)
        scale = loss_scale(step.loss, clean_loss, precision=step.outputs.dtype)
        inputs: dict[nn.Module, list[Tensor]] = {layer: [] for layer in learning}

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs[module].append(args[0])

        handles = [layer.register_forward_pre_hook(capture) for layer in learning]
        try:
            with _replay(step, record) as model, torch.enable_grad(), exact_backprop(model):
                loss = step.loss_fn(model(step.inputs), step.targets)
                # only the calls that learn (an input with a gradient), as the regressor's rows
                flat = [x for layer in learning for x in inputs[layer] if x.requires_grad]
                grads = dict(
                    zip(
                        map(id, flat),
                        torch.autograd.grad(loss, flat, allow_unused=True),
                        strict=True,
                    )
                )
        finally:
            for handle in handles:
                handle.remove()
        targets: dict[FeedbackLayer, Tensor] = {}
        for layer in learning:  # one row block per learning call, in call order
            parts = []
            for x, learns in zip(inputs[layer], record.calls[layer].call_learns, strict=True):
                if learns:
                    g = grads.get(id(x))
                    parts.append(torch.zeros_like(x) if g is None else g)
            targets[layer] = (parts[0] if len(parts) == 1 else torch.cat(parts)) / scale
        return targets, scale


@register_rule
@dataclass(frozen=True)
class Matched(FeedbackRule):
    """The matching rule: B takes the same gradient step as W, plus weight decay.

    After each ``optimizer.step()`` (``update_feedback``), from the gradient W received
    (``weight.grad``, the local signal ``delta_{l+1} y_l^T``)::

        B <- (1 - weight_decay) B - lr_b dL/dW

    Matching a plain-SGD update of W with learning rate ``lr`` and weight decay ``wd`` (``lr_b =
    lr``, ``weight_decay = lr * wd``), ``B - W`` shrinks by ``(1 - weight_decay)`` every step, as in
    Kolen-Pollack (000, 003), which is what the decay is for; without decay on W, B follows a
    leaky sum of W's gradient steps. Unlike ``kp``, B is not a Parameter: the user's optimizer
    (momentum, Adam) never touches it. B starts as FA's random B; a step without a gradient on W
    (``weight.grad`` None) only decays B.

    With ``momentum`` m > 0, B's step is heavy-ball like PyTorch's SGD (no dampening): a
    velocity ``v`` (buffer ``feedback_velocity``, zero at conversion) accumulates W's gradient,
    ``v <- m v + dL/dW`` and ``B <- (1 - weight_decay) B - lr_b v``, so B can match an SGD
    update of W with the same momentum (004's autoencoder, Table 2a).

    Options:
        lr_b: B's learning rate on W's gradient (set it to W's learning rate).
        weight_decay: B's decay per step, in [0, 1).
        momentum: B's momentum, in [0, 1); 0 (the default) is the plain step above.

    Example:
        >>> net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
        >>> model = asymprop.convert(net, "matched", seed=0, lr_b=0.01, weight_decay=1e-4)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-2)
        >>> F.cross_entropy(model(x), y).backward(); opt.step(); asymprop.update_feedback(model)

    Paper: 004 sec. 4.2, Table 2 and App. C.5 (after Rombouts et al. 2015; Martinolli et al. 2018).
    """

    name = "matched"
    lr_b: float = 0.01
    weight_decay: float = 1e-4
    init: Init = "uniform"
    gain: float = 1.0
    momentum: float = 0.0

    def validate(self) -> None:
        if not (self.lr_b >= 0 and math.isfinite(self.lr_b)):
            raise ValueError(
                f"rule 'matched' option lr_b={self.lr_b!r} must be a finite number >= 0"
            )
        check_positive(self, "gain")
        for option in ("weight_decay", "momentum"):
            value = getattr(self, option)
            if not 0 <= value < 1:
                raise ValueError(
                    f"rule 'matched' option {option}={value!r} is out of range: must be in [0, 1)"
                )

    def init_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> None:
        super().init_feedback(layer, generator)
        if self.momentum > 0:
            layer.register_buffer("feedback_velocity", torch.zeros_like(layer.feedback_weight))

    def initial_feedback(self, layer: FeedbackLayer, generator: torch.Generator) -> Tensor:
        return random_feedback(layer, generator, self.init, self.gain)

    def update_layer(self, layer: FeedbackLayer) -> None:
        feedback = layer.feedback_weight.mul_(1 - self.weight_decay)
        grad = layer.weight.grad
        if grad is not None:
            step = whole(grad)  # FSDP2: W's reduce-scattered gradient, gathered whole
            if self.momentum > 0:
                step = layer.get_buffer("feedback_velocity").mul_(self.momentum).add_(step)
            feedback.sub_(self.lr_b * step)
