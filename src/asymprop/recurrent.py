"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) whose errors travel through feedback.

``asymprop.convert`` replaces each of them with ``FeedbackRNN``/``FeedbackLSTM``/``FeedbackGRU``:
the same module with the same Parameter objects (``state_dict`` keys unchanged), in which every
weight matrix -- ``weight_ih_l{k}`` and ``weight_hh_l{k}``, and their ``_reverse`` twins -- has a
feedback layer (a :class:`~asymprop.layers.LinearSite`) registered as the child ``ih_l{k}`` or
``hh_l{k}`` (``ih_l{k}_reverse``, ...). Rules see one linear layer per weight, as anywhere else.

The forward pass is torch's (docs of ``nn.RNN``/``nn.LSTM``/``nn.GRU``), for one layer and
direction, with ``x_t`` the input and ``h_{t-1}`` the previous hidden state (``(N, in)`` and
``(N, H)``; gates stacked along the last dimension in torch's order)::

    a_t = W_ih x_t + b_ih                        # the ih site, once for all t: (T, N, gates*H)
    RNN:  h_t = phi(a_t + W_hh h_{t-1} + b_hh)   # phi = tanh or relu
    LSTM: (i, f, g, o) = a_t + W_hh h_{t-1} + b_hh
          c_t = sigma(f) c_{t-1} + sigma(i) tanh(g);   h_t = sigma(o) tanh(c_t)
    GRU:  (r_x, z_x, n_x) = a_t;   (r_h, z_h, n_h) = W_hh h_{t-1} + b_hh
          r = sigma(r_x + r_h);  z = sigma(z_x + z_h);  n = tanh(n_x + r n_h)
          h_t = (1 - z) n + z h_{t-1}

Backward (feedback alignment through time): with ``e_t`` the error at the hh site's output of
step t and ``d_t`` the error at the ih site's output (the gate pre-activations: ``e_t = d_t``
for the RNN and the LSTM; for the GRU they differ in the n block, ``e_t^n = r d_t^n``), the
error that reaches the previous hidden state travels through the recurrent feedback weight,
and the error that reaches the layer's input through the input one::

    dL/dh_{t-1} = e_t @ B_hh  (+ the paths without a weight: c_{t-1}, the GRU's z h_{t-1})
    dL/dx_t     = d_t @ B_ih

``B = W`` is backprop through time. The weight gradients are the usual local ones,
``dW_hh = sum_t e_t^T h_{t-1}`` and ``dW_ih = sum_t d_t^T x_t``, so every rule acts on both
weights as on a Linear layer (Kolen-Pollack's B takes W's gradient, sign rules follow sign(W),
weight mirrors drive each site with noise of its input's shape).

Speed: the ih site runs once per layer and direction on the whole sequence (one product). The
recurrence runs as one autograd function (``_Recurrence``) with a hand-written backward pass
through time: steps without autograd bookkeeping, a few in-place ops per step on buffers
allocated once, the step-independent factors of the backward pass computed for all steps at
once, and one product for ``dW_hh``. This *fused path* is taken when the hh site's rule uses the
default estimator (``FeedbackRule.forward``: the error through ``rule.backward_weight``; every
rule but ``wm``, ``dfa``, ``np`` and ``sg``), no hook watches the site, and neither torch.func
transforms nor torch.compile trace the call. Otherwise the hh site is called once per time step
(``T`` calls per forward pass), a linear layer like any other. The two paths agree to rounding
(``tests/test_recurrent.py``). On one CPU thread the fused LSTM step costs about 1.5-1.8x
``nn.LSTM``'s oneDNN kernel, the GRU and Elman RNN less than theirs (``benchmarks/recurrent.py``).

Rules whose estimator is not layer-wise: ``dfa`` refuses recurrent layers with direct.py's
error (the hidden state of step t "combines the outputs of several converted layers": the ih
and the hh site); ``np`` and ``sg`` run per step and fit ``B_hh`` on all ``T`` calls of the hh
site (one row block per call); ``wm`` runs per step (its forward records each site's input
shape).

Not supported: ``proj_size > 0`` (left on backprop and named by ``asymprop.audit``),
``PackedSequence`` input (``forward`` raises a ``TypeError``: pad the sequences), dropout
masks equal to torch's (torch's kernels draw their own; ours come from ``F.dropout`` and the
global generator), global module hooks (``nn.modules.module.register_module_forward_hook``) on
the fused path's hh sites.

Example:
    >>> import asymprop, asymprop.recurrent
    >>> model = nn.Sequential(nn.LSTM(8, 16, num_layers=2, batch_first=True))
    >>> model = asymprop.convert(model, "fa", seed=0)
    >>> [name for name, _ in asymprop.feedback_layers(model)]
    ['0.ih_l0', '0.hh_l0', '0.ih_l1', '0.hh_l1']

Paper: feedback alignment, Lillicrap et al. 2016 (003 eq. 3-4), applied through time. Learning
rules designed for recurrent networks (RFLO, Murray 2019; e-prop, Bellec et al. 2020) use
eligibility traces forward in time instead; this module is FA through time (BPTT with B).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .functional import _apply, _is_compiling
from .layers import FeedbackContainer, FeedbackLayer, LinearSite, register_layer, take_over
from .rules import FeedbackRule

__all__ = ["FeedbackGRU", "FeedbackLSTM", "FeedbackRNN", "convert_recurrent"]

# ---------------------------------------------------------------------------------------------
# The fused recurrence: one layer, one direction, all time steps
# ---------------------------------------------------------------------------------------------
#
# Buffers are time-major with one slot more than steps for the states: the forward direction
# keeps h_0 in slot 0 and h_t (after step t, 0-based) in slot t + 1; the reverse direction runs
# t = T-1 .. 0, keeps h_0 in slot T and h_t in slot t. So for both, ``out[t] = HS[t + o]`` and
# the state step t reads is ``prev[t] = HS[t + 1 - o]``, o = 0 (reverse) or 1 (forward), and the
# output sequence and the previous states are both (T, N, H) slices of one buffer.


def _slots(T: int, reverse: bool) -> tuple[range, int]:
    """The processing order of the steps and the output offset ``o`` (see above)."""
    return (range(T - 1, -1, -1) if reverse else range(T)), (0 if reverse else 1)


def _lstm_forward(
    pre: Tensor, h0: Tensor, c0: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool
) -> tuple[Tensor, ...]:
    """LSTM steps without grad. Returns ``(G, HS, CS, TC)``: activated gates ``(T, N, 4H)``
    (sigma(i), sigma(f), tanh(g), sigma(o)), hidden and cell states ``(T + 1, N, H)`` and
    tanh(c_t) ``(T, N, H)``."""
    T, N, H = pre.shape[0], pre.shape[1], weight.shape[1]
    steps, o = _slots(T, reverse)
    G = pre + bias if bias is not None else pre.clone()  # (T, N, 4H): a_t + b_hh, then gates
    HS, CS = pre.new_empty(T + 1, N, H), pre.new_empty(T + 1, N, H)
    TC = pre.new_empty(T, N, H)
    HS[T - T * o].copy_(h0)  # slot 0 (forward) or T (reverse)
    CS[T - T * o].copy_(c0)
    wt = weight.t()  # (H, 4H)
    # per-step views, made once: (N, 4H), (N, 2H) sigma(i), sigma(f), (N, H) tanh(g), ...
    g_all, g_if, g_g, g_o = (
        G.unbind(0),
        G[..., : 2 * H].unbind(0),
        G[..., 2 * H : 3 * H].unbind(0),
        G[..., 3 * H :].unbind(0),
    )
    g_i, g_f = G[..., :H].unbind(0), G[..., H : 2 * H].unbind(0)
    hs, cs, tcs = HS.unbind(0), CS.unbind(0), TC.unbind(0)
    for t in steps:
        g_all[t].addmm_(hs[t + 1 - o], wt)  # (N, H) @ (H, 4H) -> (N, 4H), on a_t + b_hh
        g_if[t].sigmoid_()
        g_g[t].tanh_()
        g_o[t].sigmoid_()
        c = torch.mul(g_f[t], cs[t + 1 - o], out=cs[t + o]).addcmul_(g_i[t], g_g[t])
        torch.mul(g_o[t], torch.tanh(c, out=tcs[t]), out=hs[t + o])
    return G, HS, CS, TC


def _lstm_backward(
    saved: Sequence[Tensor],
    grad_out: Tensor,
    grad_cn: Tensor,
    backward_weight: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backprop through time with ``dL/dh_{t-1} = d_t @ B`` (+ the cell path).

    ``grad_out`` (T, N, H) is the error at every output h_t (the caller's h_n is a view of the
    outputs, so its error is in there), ``grad_cn`` (N, H) the one at the last cell state.
    Returns ``(dG, dh_0, dc_0)``: the error at the gate pre-activations ``(T, N, 4H)`` (the same
    for the ih and hh products, as both feed the gates by a sum) and at the initial states.
    """
    G, _, CS, TC = saved
    T, N, H = TC.shape
    steps, o = _slots(T, reverse)
    i, f, g, og = G[..., :H], G[..., H : 2 * H], G[..., 2 * H : 3 * H], G[..., 3 * H :]
    one = G.new_ones(())
    # Local derivatives for all steps at once, (T, N, 4, H): dG_t = [dc, dc, dc, dh]_t * K_t with
    # K = [g sigma'(i), c_{t-1} sigma'(f), i tanh'(g), tanh(c_t) sigma'(o)], sigma' = s - s^2
    K = torch.addcmul(G, G, G, value=-1).view(T, N, 4, H)
    K[:, :, 0].mul_(g)
    K[:, :, 1].mul_(CS[1 - o : T + 1 - o])  # c_{t-1}
    torch.addcmul(one, g, g, value=-1, out=K[:, :, 2]).mul_(i)
    K[:, :, 3].mul_(TC)
    A = torch.addcmul(one, TC, TC, value=-1).mul_(og)  # dc_t/dh_t, through h = o tanh(c)
    dG = torch.empty_like(G)
    dGv = dG.view(T, N, 4, H)
    k3, ko, d3, do = (
        K[:, :, :3].unbind(0),
        K[:, :, 3].unbind(0),
        dGv[:, :, :3].unbind(0),
        dGv[:, :, 3].unbind(0),
    )
    outs, As, fs, dgs = grad_out.unbind(0), A.unbind(0), f.unbind(0), dG.unbind(0)
    order = steps[::-1]
    dh, dc = outs[order[0]], grad_cn  # the errors at h_t and (from the future) at c_t
    for k, t in enumerate(order):
        dc = torch.addcmul(dc, dh, As[t])  # (N, H)
        torch.mul(k3[t], dc.unsqueeze(1), out=d3[t])  # (N, 3, H): i, f, g
        torch.mul(ko[t], dh, out=do[t])  # (N, H): o
        dc = dc * fs[t]
        if k + 1 < T:
            # (N, 4H) @ (4H, H) -> (N, H): the recurrent error travels through B_hh
            dh = torch.addmm(outs[order[k + 1]], dgs[t], backward_weight)
    return dG, dgs[order[-1]] @ backward_weight, dc


def _gru_forward(
    pre: Tensor, h0: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool
) -> tuple[Tensor, ...]:
    """GRU steps without grad. Returns ``(HS, HH, RZ, NG)``: hidden states ``(T + 1, N, H)``,
    ``W_hh h_{t-1} + b_hh`` ``(T, N, 3H)``, sigma(r), sigma(z) ``(T, N, 2H)``, n ``(T, N, H)``."""
    T, N, H = pre.shape[0], pre.shape[1], weight.shape[1]
    steps, o = _slots(T, reverse)
    HS = pre.new_empty(T + 1, N, H)
    HH, RZ, NG = pre.new_empty(T, N, 3 * H), pre.new_empty(T, N, 2 * H), pre.new_empty(T, N, H)
    HS[T - T * o].copy_(h0)
    wt = weight.t()  # (H, 3H)
    hs, hhs, rzs, ngs = HS.unbind(0), HH.unbind(0), RZ.unbind(0), NG.unbind(0)
    x_rz, x_n = pre[..., : 2 * H].unbind(0), pre[..., 2 * H :].unbind(0)
    h_rz, h_n = HH[..., : 2 * H].unbind(0), HH[..., 2 * H :].unbind(0)
    r, z = RZ[..., :H].unbind(0), RZ[..., H:].unbind(0)
    for t in steps:
        h_prev = hs[t + 1 - o]
        if bias is None:
            torch.mm(h_prev, wt, out=hhs[t])  # (N, H) @ (H, 3H) -> (N, 3H)
        else:
            torch.addmm(bias, h_prev, wt, out=hhs[t])
        torch.add(x_rz[t], h_rz[t], out=rzs[t]).sigmoid_()
        torch.addcmul(x_n[t], r[t], h_n[t], out=ngs[t]).tanh_()
        torch.lerp(ngs[t], h_prev, z[t], out=hs[t + o])  # n + z (h_{t-1} - n)
    return HS, HH, RZ, NG


def _gru_backward(
    saved: Sequence[Tensor], grad_out: Tensor, backward_weight: Tensor, reverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Backprop through time for the GRU. Returns ``(dA, dHH, dh_0)``: the errors at the ih
    pre-activations ``a_t`` and at ``W_hh h_{t-1} + b_hh`` (both ``(T, N, 3H)``; they differ in
    the n block), and at h_0."""
    HS, HH, RZ, NG = saved
    T, N, H = NG.shape
    steps, o = _slots(T, reverse)
    r, z, h_n = RZ[..., :H], RZ[..., H:], HH[..., 2 * H :]
    h_prev = HS[1 - o : T + 1 - o]
    # dL/d(pre-activation) = dh_t * K_t, per block, for all steps at once (T, N, 3, H)
    Kn = (1 - z) * (1 - NG * NG)  # n's pre-activation
    Khh = HH.new_empty(T, N, 3, H)
    torch.mul(Kn * h_n, r * (1 - r), out=Khh[:, :, 0])  # r
    torch.mul(h_prev - NG, z * (1 - z), out=Khh[:, :, 1])  # z
    torch.mul(Kn, r, out=Khh[:, :, 2])  # W_hn h + b_hn, inside r * (...)
    dHH = torch.empty_like(HH)
    DH = torch.empty_like(NG)  # the error at h_t, total
    ks, dhhs, dhs = Khh.unbind(0), dHH.view(T, N, 3, H).unbind(0), DH.unbind(0)
    outs, zs, dhh2 = grad_out.unbind(0), z.unbind(0), dHH.unbind(0)
    order = steps[::-1]
    dhs[order[0]].copy_(outs[order[0]])
    for k, t in enumerate(order):
        dh = dhs[t]
        torch.mul(ks[t], dh.unsqueeze(1), out=dhhs[t])
        if k + 1 < T:
            # (N, 3H) @ (3H, H) -> (N, H) through B_hh, plus the direct path z h_{t-1}
            nxt = order[k + 1]
            torch.addmm(outs[nxt], dhh2[t], backward_weight, out=dhs[nxt]).addcmul_(dh, zs[t])
    last = order[-1]
    dh0 = torch.addcmul(dhh2[last] @ backward_weight, dhs[last], zs[last])
    dA = dHH.clone()
    torch.mul(DH, Kn, out=dA[..., 2 * H :])  # the ih n block is outside r * (...)
    return dA, dHH, dh0


def _rnn_forward(
    pre: Tensor, h0: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool, relu: bool
) -> tuple[Tensor, ...]:
    """Elman RNN steps without grad. Returns ``(HS,)``, hidden states ``(T + 1, N, H)``."""
    T, N, H = pre.shape[0], pre.shape[1], weight.shape[1]
    steps, o = _slots(T, reverse)
    P = pre + bias if bias is not None else pre
    HS = pre.new_empty(T + 1, N, H)
    HS[T - T * o].copy_(h0)
    wt, ps, hs = weight.t(), P.unbind(0), HS.unbind(0)
    for t in steps:
        h = torch.addmm(ps[t], hs[t + 1 - o], wt, out=hs[t + o])  # (N, H) @ (H, H)
        h.relu_() if relu else h.tanh_()
    return (HS,)


def _rnn_backward(
    saved: Sequence[Tensor],
    grad_out: Tensor,
    backward_weight: Tensor,
    reverse: bool,
    relu: bool,
) -> tuple[Tensor, Tensor]:
    """Backprop through time for the Elman RNN. Returns ``(dP, dh_0)``."""
    (HS,) = saved
    T = HS.shape[0] - 1
    steps, o = _slots(T, reverse)
    out = HS[o : T + o]
    slope = (out > 0).to(out.dtype) if relu else 1 - out * out  # phi' from phi's output
    dP = torch.empty_like(out)
    dps, slopes, outs = dP.unbind(0), slope.unbind(0), grad_out.unbind(0)
    order = steps[::-1]
    dh = outs[order[0]]
    for k, t in enumerate(order):
        torch.mul(dh, slopes[t], out=dps[t])
        if k + 1 < T:
            dh = torch.addmm(outs[order[k + 1]], dps[t], backward_weight)  # through B_hh
    return dP, dps[order[-1]] @ backward_weight


class _Recurrence(torch.autograd.Function):
    """All time steps of one layer and direction; the recurrent error travels through B.

    Inputs: ``pre`` (T, N, gates*H), the ih site's output ``W_ih x_t + b_ih``; ``h0``, ``c0``
    (N, H) (``c0`` None but for LSTM); ``weight`` W_hh (gates*H, H); ``bias`` b_hh or None;
    ``backward_weight`` B (W_hh's shape; W_hh itself, detached, for exact backprop). Outputs:
    the hidden states (T, N, H), and for the LSTM the last cell state (N, H). B receives W_hh's
    gradient when it requires grad (Kolen-Pollack).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mode: str,
        reverse: bool,
        pre: Tensor,
        h0: Tensor,
        c0: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        backward_weight: Tensor,
    ) -> Tensor | tuple[Tensor, Tensor]:
        T = pre.shape[0]
        _, o = _slots(T, reverse)
        ctx.mode, ctx.reverse, ctx.has_bias = mode, reverse, bias is not None
        if mode == "LSTM":
            assert c0 is not None
            saved = _lstm_forward(pre, h0, c0, weight, bias, reverse)
            HS, CS = saved[1], saved[2]
            result: Tensor | tuple[Tensor, Tensor] = (HS[o : T + o], CS[T * o])
        elif mode == "GRU":
            saved = _gru_forward(pre, h0, weight, bias, reverse)
            result = saved[0][o : T + o]
        else:
            saved = _rnn_forward(pre, h0, weight, bias, reverse, mode == "RNN_RELU")
            result = saved[0][o : T + o]
        ctx.save_for_backward(*saved, backward_weight)
        return result

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_cn: Tensor | None = None) -> tuple[Any, ...]:
        *saved, backward_weight = ctx.saved_tensors
        need = ctx.needs_input_grad  # mode, reverse, pre, h0, c0, weight, bias, backward_weight
        mode, reverse = ctx.mode, ctx.reverse
        HS = saved[1] if mode == "LSTM" else saved[0]
        T = HS.shape[0] - 1
        o = 0 if reverse else 1
        bw = backward_weight.to(grad_out.dtype)
        dc0 = None
        if mode == "LSTM":
            assert grad_cn is not None
            d_pre, dh0, dc0 = _lstm_backward(saved, grad_out, grad_cn, bw, reverse)
            d_hh = d_pre
        elif mode == "GRU":
            d_pre, d_hh, dh0 = _gru_backward(saved, grad_out, bw, reverse)
        else:
            d_pre, dh0 = _rnn_backward(saved, grad_out, bw, reverse, mode == "RNN_RELU")
            d_hh = d_pre
        grad_w = grad_b = None
        if need[5] or need[7]:
            h_prev = HS[1 - o : T + 1 - o]  # (T, N, H)
            # (gates*H, T*N) @ (T*N, H) -> (gates*H, H): one product for all steps
            grad_w = d_hh.reshape(-1, d_hh.shape[-1]).t() @ h_prev.reshape(-1, h_prev.shape[-1])
        if need[6] and ctx.has_bias:
            grad_b = d_hh.sum((0, 1))
        return (
            None,
            None,
            d_pre if need[2] else None,
            dh0 if need[3] else None,
            dc0 if need[4] else None,
            grad_w if need[5] else None,
            grad_b,
            grad_w if need[7] else None,  # Kolen-Pollack: B takes W's gradient
        )


# ---------------------------------------------------------------------------------------------
# The per-step path: the hh site called once per time step (hooks, rules with own estimators)
# ---------------------------------------------------------------------------------------------


def _stepwise(
    mode: str,
    reverse: bool,
    pre: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    hh: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor | None]:
    """The same recurrence with autograd, ``hh(h_{t-1}) = W_hh h_{t-1} + b_hh`` per step.

    Returns the hidden states ``(T, N, H)`` and, for the LSTM, the last cell state.
    """
    T = pre.shape[0]
    steps, _ = _slots(T, reverse)
    outs: list[Tensor] = [pre] * T  # placeholders, all filled below
    h, c = h0, c0
    pres = pre.unbind(0)
    for t in steps:
        x, r = pres[t], hh(h)  # (N, gates*H) each
        if mode == "LSTM":
            assert c is not None
            i, f, g, o = (x + r).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif mode == "GRU":
            x_r, x_z, x_n = x.chunk(3, 1)
            h_r, h_z, h_n = r.chunk(3, 1)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + torch.sigmoid(x_r + h_r) * h_n)
            h = n + z * (h - n)
        else:
            h = torch.relu(x + r) if mode == "RNN_RELU" else torch.tanh(x + r)
        outs[t] = h
    return torch.stack(outs), c


# ---------------------------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------------------------


def _observed(site: nn.Module) -> bool:
    """True if hooks watch the site's calls (then it must be called once per step)."""
    return bool(
        site._forward_hooks
        or site._forward_pre_hooks
        or site._backward_hooks
        or site._backward_pre_hooks
    )


def _traced() -> bool:
    """True under torch.func transforms and torch.compile: the per-step path then runs (plain
    ops and the sites' own functions, which both support), not the in-place fused one."""
    return bool(_is_compiling() or torch._C._are_functorch_transforms_active())


def _fused_backward_weight(site: FeedbackLayer) -> Tensor | None:
    """B for the fused recurrence, or None if the site must run per step.

    The fused path is the default estimator (``FeedbackRule.forward``: the error through
    ``rule.backward_weight``) applied at every step; rules with their own ``forward`` and
    observed sites take the per-step path.
    """
    if _observed(site):
        return None
    if site._exact_backprop:
        return site.weight.detach()
    if type(site.rule).forward is not FeedbackRule.forward:
        return None
    backward_weight = site.rule.backward_weight(site)
    return backward_weight.detach() if backward_weight is site.weight else backward_weight


class _FeedbackRecurrent(FeedbackContainer):
    """Shared forward of ``FeedbackRNN``/``FeedbackLSTM``/``FeedbackGRU`` (module docstring)."""

    #: the torch class this one converts (``to_plain``)
    _plain: type[nn.RNNBase]
    mode: str
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool

    def forward(  # type: ignore[override]
        self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Any]:
        """torch's forward: ``input`` ``(T, N, in)`` (``(N, T, in)`` if ``batch_first``, or
        ``(T, in)`` unbatched), ``hx`` ``(layers * directions, N, H)`` (a pair ``(h0, c0)`` for
        the LSTM) or None for zeros. Returns ``(output, h_n)`` (``(output, (h_n, c_n))``)."""
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"{type(self).__name__} does not take a PackedSequence: pad it "
                "(nn.utils.rnn.pad_packed_sequence) and pass the padded tensor, or exclude this "
                "module from asymprop.convert"
            )
        if input.dim() not in (2, 3):
            got = f"{input.dim()}D tensor" if self._plain is nn.RNN else f"{input.dim()}D"
            raise ValueError(
                f"{self._plain.__name__}: Expected input to be 2D or 3D, got {got} instead"
            )
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        h0, c0 = self._initial_states(input, hx, batched)
        x = input.transpose(0, 1) if self.batch_first else input  # (T, N, in): time-major
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        directions = 2 if self.bidirectional else 1
        zeros = x.new_zeros(x.shape[1], self.hidden_size)  # (N, H): default h0 and c0
        lstm = self.mode == "LSTM"
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                key = f"l{layer}_reverse" if direction else f"l{layer}"
                h = h0[index] if h0 is not None else zeros
                c = (c0[index] if c0 is not None else zeros) if lstm else None
                out, c_last = self._direction(x, h, c, key, reverse=direction == 1)  # (T, N, H)
                outputs.append(out)
                h_n.append(out[0] if direction else out[-1])
                if c_last is not None:
                    c_n.append(c_last)
            x = outputs[0] if directions == 1 else torch.cat(outputs, -1)  # (T, N, D * H)
            if self.dropout > 0 and self.training and layer + 1 < self.num_layers:
                x = F.dropout(x, self.dropout, True)
        output = x.transpose(0, 1) if self.batch_first else x
        hidden = torch.stack(h_n)  # (layers * directions, N, H)
        cell = torch.stack(c_n) if lstm else None
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = hidden.squeeze(1)
            cell = cell.squeeze(1) if cell is not None else None
        return output, ((hidden, cell) if cell is not None else hidden)

    def _initial_states(
        self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None, batched: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """h0 and c0 as ``(layers * directions, N, H)`` (None: zeros), checked as torch does."""
        checks: Any = self  # torch's own checks, for torch's own error messages
        if hx is None:
            checks.check_input(input, None)
            return None, None
        want, kind = (3, "batched 3-D") if batched else (2, "unbatched 2-D")
        if self.mode == "LSTM":
            h0, c0 = hx
            if h0.dim() != want or c0.dim() != want:
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                )
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            checks.check_forward_args(input, (h0, c0), None)
            return h0, c0
        assert isinstance(hx, Tensor)
        if hx.dim() != want:
            raise RuntimeError(
                f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor"
            )
        h0 = hx if batched else hx.unsqueeze(1)
        checks.check_forward_args(input, h0, None)
        return h0, None

    def _direction(
        self, x: Tensor, h0: Tensor, c0: Tensor | None, key: str, reverse: bool
    ) -> tuple[Tensor, Tensor | None]:
        """One layer and direction: ``(T, N, in) -> (T, N, H)``, and the LSTM's last cell state.

        ``key`` is ``l{layer}`` or ``l{layer}_reverse``.
        """
        sites = self._modules
        ih, hh = sites.get(f"ih_{key}"), sites.get(f"hh_{key}")
        weight_hh = getattr(self, f"weight_hh_{key}")
        bias_hh = getattr(self, f"bias_hh_{key}") if self.bias else None
        # (T, N, in) @ (in, gates*H) -> (T, N, gates*H): one product for all steps, whose
        # input error travels through B_ih. The site sees the batch first, (N, T, in), as every
        # feedback layer does (node perturbation draws noise per example, DFA sends the output
        # error per example)
        if ih is not None:
            pre = ih(x.transpose(0, 1)).transpose(0, 1)
        else:  # excluded: exact
            bias_ih = getattr(self, f"bias_ih_{key}") if self.bias else None
            pre = F.linear(x, getattr(self, f"weight_ih_{key}"), bias_ih)
        if hh is None:  # excluded: exact backprop through time
            backward_weight: Tensor | None = weight_hh.detach()
        else:
            assert isinstance(hh, FeedbackLayer)
            backward_weight = _fused_backward_weight(hh)
        if backward_weight is None or _traced():
            # the site adds b_hh; an excluded weight runs torch's op
            step = hh if hh is not None else partial(F.linear, weight=weight_hh, bias=bias_hh)
            return _stepwise(self.mode, reverse, pre, h0, c0, step)
        result = _apply(
            _Recurrence, self.mode, reverse, pre, h0, c0, weight_hh, bias_hh, backward_weight
        )
        return (result[0], result[1]) if isinstance(result, tuple) else (result, None)

    def to_plain(self) -> nn.Module:
        """The torch module with the same Parameters (``asymprop.revert``)."""
        module = take_over(self, self._plain, drop=("excluded_sites",))
        for name in [k for k, m in module._modules.items() if isinstance(m, LinearSite)]:
            del module._modules[name]
        return module


class FeedbackRNN(_FeedbackRecurrent, nn.RNN):  # type: ignore[misc]
    """``nn.RNN`` (tanh or relu) whose errors travel through ``B_ih`` and ``B_hh`` (module doc)."""

    _plain = nn.RNN


class FeedbackLSTM(_FeedbackRecurrent, nn.LSTM):  # type: ignore[misc]
    """``nn.LSTM`` whose errors travel through ``B_ih`` and ``B_hh`` (module docstring)."""

    _plain = nn.LSTM


class FeedbackGRU(_FeedbackRecurrent, nn.GRU):  # type: ignore[misc]
    """``nn.GRU`` whose errors travel through ``B_ih`` and ``B_hh`` (module docstring)."""

    _plain = nn.GRU


_FEEDBACK_CLASSES: dict[type[nn.Module], type[_FeedbackRecurrent]] = {
    nn.RNN: FeedbackRNN,
    nn.LSTM: FeedbackLSTM,
    nn.GRU: FeedbackGRU,
}


def convert_recurrent(
    module: nn.Module, make_site: Callable[[str, FeedbackLayer], bool]
) -> nn.Module:
    """``asymprop.convert``'s converter for ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (registered on
    import).

    The new module takes over ``module``'s state (the same Parameter objects, hooks and
    attributes: ``state_dict`` keys of the weights are unchanged) and asks ``make_site`` for a
    rule for each weight: the site ``ih_l{k}[_reverse]`` for ``weight_ih_l{k}[_reverse]`` and
    ``hh_l{k}[_reverse]`` for ``weight_hh_l{k}[_reverse]``. A site the user excluded is dropped:
    its weight runs exactly and is named in ``excluded_sites`` (``asymprop.audit`` reads it
    there, as for weights left on ``bp``). Returns ``module`` itself if every weight was
    excluded.

    An LSTM with ``proj_size > 0`` is returned unchanged and marked, so ``asymprop.audit`` names
    its weights as unsupported and ``convert(..., strict=True)`` raises.
    """
    if type(module) not in _FEEDBACK_CLASSES:
        raise TypeError(f"convert_recurrent expects nn.RNN, nn.LSTM or nn.GRU, got {type(module)}")
    assert isinstance(module, nn.RNNBase)
    if module.proj_size > 0:  # left on backprop; audit names it, convert(strict=True) raises
        module.__dict__["_asymprop_excluded"] = (
            f"{type(module).__name__} with proj_size={module.proj_size} is not supported "
            "(projections, weight_hr, would need their own feedback path): use proj_size=0"
        )
        return module
    cls = _FEEDBACK_CLASSES[type(module)]
    new = take_over(module, cls, drop=("_asymprop_excluded",))  # torch's weight lists copied too
    new.excluded_sites = {}
    converted = 0
    for layer in range(module.num_layers):
        for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
            for kind in ("ih", "hh"):
                weight_name = f"weight_{kind}_l{layer}{suffix}"
                bias_name = f"bias_{kind}_l{layer}{suffix}" if module.bias else None
                site = LinearSite(new, weight_name, bias_name)
                name = f"{kind}_l{layer}{suffix}"
                if make_site(name, site):
                    new.add_module(name, site)
                    converted += 1
                else:
                    new.excluded_sites[weight_name] = str(site._asymprop_excluded)
    if not converted:  # audit reads a plain module's reason on the module
        module.__dict__["_asymprop_excluded"] = "; ".join(sorted(set(new.excluded_sites.values())))
        return module
    return new


for _torch_type in _FEEDBACK_CLASSES:
    register_layer(_torch_type, convert_recurrent)
