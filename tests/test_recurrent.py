"""``nn.RNN``/``nn.LSTM``/``nn.GRU`` with feedback (``asymprop.recurrent``): ``bp`` equals torch
over every option, FA against hand computations and the detach trick, every rule trains, KP's
recursion, delta alignment, state and copies, weight mirrors, and the refusals."""

from __future__ import annotations

import copy
import io
import itertools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import asymprop
import asymprop.recurrent  # registers the converters
from asymprop import RULES, convert, feedback_layers, train_step
from asymprop.recurrent import FeedbackGRU, FeedbackLSTM, FeedbackRNN

f64 = torch.float64
CE = F.cross_entropy
IN, HID, STEPS, BATCH = 4, 5, 6, 3

KINDS: dict[str, Callable[..., nn.RNNBase]] = {
    "rnn_tanh": lambda *a, **kw: nn.RNN(*a, nonlinearity="tanh", **kw),
    "rnn_relu": lambda *a, **kw: nn.RNN(*a, nonlinearity="relu", **kw),
    "lstm": nn.LSTM,
    "gru": nn.GRU,
}


def _sites(model: nn.Module, kind: str) -> list[nn.Module]:
    """The converted model's ih or hh sites."""
    return [layer for name, layer in feedback_layers(model) if name.split(".")[-1][:3] == kind]


def _per_step(model: nn.Module) -> list[int]:
    """Observe every hh site (a no-op hook): it then runs once per time step. Returns a list
    that counts the calls."""
    calls = [0]

    def count(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        calls[0] += 1

    for site in _sites(model, "hh_"):
        site.register_forward_pre_hook(count)
    return calls


def _inputs(
    module: nn.RNNBase, batched: bool = True, given_h0: bool = True
) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor] | None]:
    shape = (BATCH, STEPS, IN) if module.batch_first else (STEPS, BATCH, IN)
    x = torch.randn(shape if batched else (STEPS, IN), dtype=f64)
    if not given_h0:
        return x, None
    states = module.num_layers * (2 if module.bidirectional else 1)
    hidden = (states, BATCH, HID) if batched else (states, HID)
    h0 = torch.randn(hidden, dtype=f64)
    return x, ((h0, torch.randn(hidden, dtype=f64)) if module.mode == "LSTM" else h0)


def _grads(
    module: nn.Module, x: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None, names: list[str]
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Every gradient of a fixed random loss on all outputs: input, h0/c0, the named weights.
    Also returns the outputs (output, h_n[, c_n])."""
    x = x.clone().requires_grad_(True)
    states = [] if hx is None else [s.clone().requires_grad_(True) for s in _tuple(hx)]
    given = None if hx is None else (tuple(states) if isinstance(hx, tuple) else states[0])
    output, hidden = module(x, given)
    outputs = [output, *_tuple(hidden)]
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=f64)).sum() for o in outputs)
    params = dict(module.named_parameters())
    wrt = [x, *states, *(params[n] for n in names)]
    grads = torch.autograd.grad(loss, wrt)
    keys = ["<input>", *(f"<state {i}>" for i in range(len(states))), *names]
    return dict(zip(keys, grads, strict=True)), [o.detach() for o in outputs]


def _tuple(value: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _assert_same(ours: dict[str, Tensor], theirs: dict[str, Tensor], context: str) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12, msg=context)


# ------------------------------------------------------------------ bp is torch, every option


@pytest.mark.parametrize("path", ["fused", "per_step"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bp_equals_torch(kind: str, num_layers: int, bidirectional: bool, bias: bool, path: str):
    """Outputs, final states and every gradient (input, h0/c0, each weight) equal torch's module,
    for batch_first or not, batched or not, h0 given or not."""
    for batch_first, batched, given_h0 in itertools.product([False, True], repeat=3):
        reference = KINDS[kind](
            IN, HID, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
        ).double()
        model = convert(copy.deepcopy(reference), "bp")
        calls = _per_step(model) if path == "per_step" else [0]
        x, hx = _inputs(reference, batched, given_h0)
        names = [n for n, _ in reference.named_parameters()]
        theirs, expected = _grads(reference, x, hx, names)
        ours, outputs = _grads(model, x, hx, names)
        context = f"batch_first={batch_first}, batched={batched}, h0={given_h0}"
        for out, ref in zip(outputs, expected, strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14, msg=context)
        _assert_same(ours, theirs, context)
        directions = 2 if bidirectional else 1
        assert calls[0] == (STEPS * num_layers * directions if path == "per_step" else 0)


def test_conversion_gives_the_feedback_classes_with_one_site_per_weight() -> None:
    model = nn.ModuleList(
        [nn.RNN(3, 4), nn.LSTM(3, 4, num_layers=2, bidirectional=True), nn.GRU(3, 4)]
    )
    convert(model, "fa", seed=0)
    assert [type(m) for m in model] == [FeedbackRNN, FeedbackLSTM, FeedbackGRU]
    assert isinstance(model[1], nn.LSTM)  # user isinstance checks keep working
    assert [n for n, _ in feedback_layers(model[1])] == [
        f"{kind}_l{layer}{suffix}"
        for layer in (0, 1)
        for suffix in ("", "_reverse")
        for kind in ("ih", "hh")
    ]
    for _, site in feedback_layers(model):
        assert site.feedback_weight.shape == site.weight.shape
    assert asymprop.audit(model) == {}


def test_fused_path_never_calls_the_hh_site() -> None:
    model = convert(nn.LSTM(IN, HID, num_layers=2).double(), "fa", seed=0)
    calls: list[Tensor] = []
    for site in _sites(model, "hh_"):  # an instance attribute: no hook, the fused path stays

        def counting(h: Tensor, forward: Callable[[Tensor], Tensor] = site.forward) -> Tensor:
            calls.append(h)
            return forward(h)

        site.forward = counting  # type: ignore[method-assign]
    x = torch.randn(STEPS, BATCH, IN, dtype=f64)
    model(x)[0].sum().backward()
    assert calls == []
    for site in _sites(model, "ih_"):
        assert site.weight.grad is not None


# ------------------------------------------------------------------ fa: by hand and the oracle


def _capture_output(site: nn.Module) -> list[Tensor]:
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        output.retain_grad()
        seen.append(output)

    site.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("kind", list(KINDS))
def test_fa_input_error_is_the_gate_error_times_b_ih(kind: str) -> None:
    """dL/dx_t = (dL/da_t) @ B_ih, with a_t = W_ih x_t + b_ih the ih site's output."""
    model = convert(KINDS[kind](IN, HID, batch_first=True).double(), "fa", seed=0)
    seen = _capture_output(model.ih_l0)
    x = torch.randn(BATCH, STEPS, IN, dtype=f64, requires_grad=True)
    output, _ = model(x)
    output.pow(2).sum().backward()
    pre = seen[0]  # (N, T, gates * H): the site sees the batch first, as every feedback layer
    # (N, T, gates*H) @ (gates*H, in) -> (N, T, in)
    expected = pre.grad @ model.ih_l0.feedback_weight
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm"])
def test_fa_recurrent_error_travels_through_b_hh(kind: str) -> None:
    """Backprop through time by hand: for the RNN and the LSTM the gate pre-activations are
    a_t + W_hh h_{t-1} + b_hh, so the ih site's output error is the gate error d_t and
    dL/dh_0 = d_0 @ B_hh; for tanh, d_t = (dL/dout_t + d_{t+1} @ B_hh) * (1 - h_t^2)."""
    model = convert(KINDS[kind](IN, HID).double(), "fa", seed=0)
    seen = _capture_output(model.ih_l0)
    x = torch.randn(STEPS, BATCH, IN, dtype=f64)
    h0 = torch.randn(1, BATCH, HID, dtype=f64, requires_grad=True)
    hx = (h0, torch.randn(1, BATCH, HID, dtype=f64)) if kind == "lstm" else h0
    output, _ = model(x, hx)
    weights = torch.randn(output.shape, dtype=f64)
    (output * weights).sum().backward()
    d = seen[0].grad.transpose(0, 1)  # the site's (N, T, gates * H) -> (T, N, gates * H)
    B = model.hh_l0.feedback_weight
    assert h0.grad is not None and d is not None
    torch.testing.assert_close(h0.grad[0], d[0] @ B, rtol=1e-12, atol=1e-14)
    if kind == "rnn_tanh":
        for t in range(STEPS):
            recurrent = d[t + 1] @ B if t + 1 < STEPS else 0
            expected = (weights[t] + recurrent) * (1 - output[t].detach() ** 2)
            torch.testing.assert_close(d[t], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fa_with_b_equal_to_w_is_backprop_and_random_b_is_not(kind: str) -> None:
    reference = KINDS[kind](IN, HID, 2, bidirectional=True).double()
    model = convert(copy.deepcopy(reference), "fa", seed=0)
    names = [n for n, _ in reference.named_parameters()]
    x, hx = _inputs(reference)
    theirs, _ = _grads(reference, x, hx, names)
    random_b, _ = _grads(model, x, hx, names)
    assert not torch.allclose(random_b["<input>"], theirs["<input>"])
    assert not torch.allclose(random_b["<state 0>"], theirs["<state 0>"])
    with torch.no_grad():
        for _, site in feedback_layers(model):
            site.feedback_weight.copy_(site.weight)
    ours, _ = _grads(model, x, hx, names)
    _assert_same(ours, theirs, "B = W")


def test_exact_backprop_and_no_grad_run_torch_s_numbers() -> None:
    """Inside ``asymprop.exact_backprop`` the fused path sends the error through W; under
    ``torch.no_grad`` the forward value is unchanged."""
    reference = nn.LSTM(IN, HID, 2, bidirectional=True).double()
    model = convert(copy.deepcopy(reference), "kp", seed=0)
    names = [n for n, _ in reference.named_parameters()]
    x, hx = _inputs(reference)
    theirs, expected = _grads(reference, x, hx, names)
    with asymprop.exact_backprop(model):
        ours, _ = _grads(model, x, hx, names)
    _assert_same(ours, theirs, "exact_backprop")
    with torch.no_grad():
        output, (h, c) = model(x, hx)
    for ours_out, ref in zip([output, h, c], expected, strict=True):
        torch.testing.assert_close(ours_out, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_per_example_grads_under_torch_func_equal_a_loop(kind: str) -> None:
    """Under torch.func the recurrence runs per step (plain ops and the sites' functions):
    ``vmap(grad(loss))`` gives each example's ordinary ``backward`` gradients, KP's B included."""
    model = convert(_Classifier(kind, 1, True).double(), "kp", seed=0)
    x, y = _task(n=3, dtype=f64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return CE(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        model.zero_grad()
        CE(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            torch.testing.assert_close(per_example[name][i], p.grad, rtol=1e-9, atol=1e-12)


def _detach_trick(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
    """F.linear whose input gradient travels through ``feedback`` (STYLE.md's oracle)."""
    return (
        F.linear(x.detach(), weight, bias) + F.linear(x, feedback) - F.linear(x, feedback).detach()
    )


def _reference(
    module: nn.RNNBase, feedback: dict[str, Tensor], x: Tensor, h0: Tensor, c0: Tensor
) -> list[Tensor]:
    """torch's equations step by step, every weight through the detach trick; time-major."""
    directions = 2 if module.bidirectional else 1
    hs, cs = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            key = f"l{layer}" + ("_reverse" if direction else "")

            def linear(v: Tensor, kind: str, key: str = key) -> Tensor:
                bias = getattr(module, f"bias_{kind}_{key}") if module.bias else None
                weight = getattr(module, f"weight_{kind}_{key}")
                return _detach_trick(v, weight, bias, feedback[f"weight_{kind}_{key}"])

            a = linear(x, "ih")
            h, c = h0[layer * directions + direction], c0[layer * directions + direction]
            out: list[Tensor] = [a] * STEPS
            for t in range(STEPS - 1, -1, -1) if direction else range(STEPS):
                r = linear(h, "hh")
                if module.mode == "LSTM":
                    i, f, g, o = (a[t] + r).chunk(4, -1)
                    c = f.sigmoid() * c + i.sigmoid() * g.tanh()
                    h = o.sigmoid() * c.tanh()
                elif module.mode == "GRU":
                    (xr, xz, xn), (hr, hz, hn) = a[t].chunk(3, -1), r.chunk(3, -1)
                    z = (xz + hz).sigmoid()
                    n = (xn + (xr + hr).sigmoid() * hn).tanh()
                    h = (1 - z) * n + z * h
                else:
                    h = (a[t] + r).relu() if module.mode == "RNN_RELU" else (a[t] + r).tanh()
                out[t] = h
            outputs.append(torch.stack(out))
            hs.append(h)
            cs.append(c)
        x = torch.cat(outputs, -1)
    return [x, torch.stack(hs), torch.stack(cs)] if module.mode == "LSTM" else [x, torch.stack(hs)]


def _weighted(outputs: list[Tensor], weights: list[Tensor]) -> Tensor:
    return sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))  # type: ignore[return-value]


@pytest.mark.parametrize("path", ["fused", "per_step"])
@pytest.mark.parametrize("rule", ["fa", "kp", "usf"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_rules_equal_the_detach_trick_through_time(kind: str, rule: str, path: str) -> None:
    """Two bidirectional layers: every gradient (input, states, weights, KP's B) equals the
    step-by-step reference whose every weight sends its input error through B."""
    model = convert(KINDS[kind](IN, HID, 2, bidirectional=True).double(), rule, seed=0)
    if path == "per_step":
        _per_step(model)
    x = torch.randn(STEPS, BATCH, IN, dtype=f64, requires_grad=True)
    h0 = torch.randn(4, BATCH, HID, dtype=f64, requires_grad=True)
    c0 = torch.randn(4, BATCH, HID, dtype=f64, requires_grad=True)
    hx = (h0, c0) if kind == "lstm" else h0
    feedback = {site.weight_name: site.feedback_weight for _, site in feedback_layers(model)}
    params = list(model.parameters())  # weights, and KP's B
    wrt = [x, h0, c0, *params] if kind == "lstm" else [x, h0, *params]
    output, hidden = model(x, hx)
    outputs = [output, *_tuple(hidden)]
    expected = _reference(model, feedback, x, h0, c0)
    weights = [torch.randn(o.shape, dtype=f64) for o in outputs]
    ours = torch.autograd.grad(_weighted(outputs, weights), wrt)
    theirs = torch.autograd.grad(_weighted(expected, weights), wrt)
    for a, b in zip(outputs, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ the contract: every rule


class _Classifier(nn.Module):
    """(N, T, in) -> recurrent layer -> last output -> Linear."""

    def __init__(self, kind: str, layers: int = 1, bidirectional: bool = False) -> None:
        super().__init__()
        self.rnn = KINDS[kind](IN, 8, layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(8 * (2 if bidirectional else 1), 3)

    def forward(self, x: Tensor) -> Tensor:
        output, _ = self.rnn(x)
        return self.head(output[:, -1])  # type: ignore[no-any-return]


def _task(n: int = 48, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Three classes from running sums of two input features: needs memory over the sequence."""
    x = torch.randn(n, STEPS, IN, generator=torch.Generator().manual_seed(0), dtype=dtype)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, :, 1].sum(1) > 1).long()
    return x, y


def _trained_rules() -> list[str]:
    return sorted(RULES)


@pytest.mark.parametrize("rule", _trained_rules())
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_every_rule_trains_a_recurrent_classifier(kind: str, rule: str) -> None:
    torch.manual_seed(0)
    model = convert(_Classifier(kind), rule, seed=0, strict=True)
    left = asymprop.audit(model)
    if rule == "bp":
        assert set(left) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"}
        assert all(reason.startswith("rule 'bp'") for reason in left.values())
    else:
        assert left == {}
    x, y = _task()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = CE(model(x), y).item()
    losses = [train_step(model, opt, CE, x, y) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses), losses
    assert CE(model(x), y).item() < first - 0.05, (first, losses[-3:])
    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


def test_dfa_sends_e_b_to_every_time_step() -> None:
    """DFA through time: every call of the hh site (one per step) gets e @ B_hh at its input,
    the ih site's input (the whole sequence) e @ B_ih, one B each; the gates stay exact."""
    model = convert(_Classifier("gru").double(), "dfa", seed=0)
    x = torch.randn(4, STEPS, IN, dtype=torch.float64)
    inputs: list[Tensor] = []

    def capture(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if args[0].requires_grad:
            args[0].retain_grad()
            inputs.append(args[0])

    handle = model.rnn.hh_l0.register_forward_pre_hook(capture)  # hooks: the per-step path
    y = model(x)
    y.retain_grad()
    y.pow(2).sum().backward()
    handle.remove()
    e, B = y.grad, model.rnn.hh_l0.feedback_weight
    assert B.shape == (3, 8) and len(inputs) == STEPS - 1  # h0 carries no gradient
    # the last hidden state also feeds the head: its error adds the head's e @ B_head
    for h in inputs[:-1]:
        later = h.grad  # h_t feeds step t+1 (e @ B_hh) and the gates of step t+1 (exact)
        assert later is not None and torch.isfinite(later).all()
    assert model.rnn.ih_l0.feedback_weight.numel() == 0  # its input is data: never drawn
    assert torch.isfinite(model.rnn.weight_hh_l0.grad).all()
    assert not torch.equal(e @ B, torch.zeros_like(e @ B))


# ------------------------------------------------------------------ KP, delta alignment, WM


@pytest.mark.parametrize("kind", list(KINDS))
def test_kp_difference_shrinks_by_one_minus_lr_lambda(kind: str) -> None:
    """Plain SGD with weight decay: after every step B - W = (1 - lr wd) (B - W), for the ih
    and the hh weights (B takes W's gradient: 000 Alg. 2, 003 eq. 12-18)."""
    model = convert(_Classifier(kind, 2, True).double(), "kp", seed=0)
    lr, wd = 0.1, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    x, y = _task(n=8, dtype=f64)
    for _ in range(3):
        before = {
            n: (m.feedback_weight - m.weight).detach().clone() for n, m in feedback_layers(model)
        }
        train_step(model, opt, CE, x, y)
        for name, layer in feedback_layers(model):
            assert layer.feedback_weight.grad is not None, name
            after = (layer.feedback_weight - layer.weight).detach()
            torch.testing.assert_close(after, (1 - lr * wd) * before[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_delta_alignment_reports_every_site(kind: str) -> None:
    for rule in ("bp", "fa"):
        model = convert(_Classifier(kind, 2, True).double(), rule, seed=0)
        x, y = _task(n=8, dtype=f64)
        angles = asymprop.delta_alignment(model, CE, x, y)
        assert list(angles) == [n for n, _ in feedback_layers(model)]
        assert len(angles) == 9  # 2 layers x 2 directions x (ih, hh), and the head
        assert all(math.isfinite(a) for a in angles.values()), angles
        if rule == "bp":
            assert max(angles.values()) < 1e-5, angles
        else:
            assert max(angles.values()) > 1.0


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_wm_with_w_fixed_aligns_every_recurrent_weight(kind: str) -> None:
    """Mirror mode alone brings B within the plateau of mirror.py's formula, for ih and hh:
    every weight averages >= 2 fan_in pairs per step, so atan(sqrt((2 - 2/pi) 0.5 / 3)) = 25
    degrees (the hh site exactly: it sees (N, H) inputs, one pair per example)."""
    torch.manual_seed(0)
    model = convert(_Classifier(kind), "wm", seed=0, warmup_steps=0)
    x, _ = _task(n=16)
    model(x)  # each site records the input shape of its calls
    assert model.rnn.hh_l0.feedback_state["input_shape"] == [16, 8]
    assert model.rnn.ih_l0.feedback_state["input_shape"] == [16, STEPS, IN]  # batch first
    weights = {n: layer.weight.detach().clone() for n, layer in feedback_layers(model)}
    before = asymprop.alignment(model)
    asymprop.mirror(model, steps=40)
    plateau = math.degrees(math.atan(math.sqrt((2 - 2 / math.pi) * 0.5 / (1.5 * 2))))
    after = asymprop.alignment(model)
    for name in ("rnn.ih_l0", "rnn.hh_l0"):
        assert before[name]["angle_deg"] > 60
        assert after[name]["angle_deg"] < min(40, plateau + 8), (name, after[name], plateau)
    for name, layer in feedback_layers(model):
        assert torch.equal(layer.weight, weights[name])  # mirror mode never touches W


# ------------------------------------------------------------------ state, copies, revert


def test_state_dict_keys_parameters_revert_dtype_and_copies() -> None:
    reference = nn.LSTM(IN, HID, 2, bidirectional=True)
    model = convert(copy.deepcopy(reference), "kp", seed=0)
    originals = copy.deepcopy(reference).state_dict()
    state = model.state_dict()
    # the weights keep their keys; the sites add B and their rule state
    assert set(originals) <= set(state)
    assert {k.split(".", 1)[1] for k in set(state) - set(originals)} == {
        "feedback_weight",
        "_extra_state",
    }
    x = torch.randn(STEPS, BATCH, IN)
    torch.testing.assert_close(model(x)[0], reference(x)[0], rtol=1e-6, atol=1e-7)

    # a copy reads its own weights; a pickled model works
    twin = copy.deepcopy(model)
    for _, site in feedback_layers(twin):
        assert site._owner[0] is twin
    twin(x)[0].sum().backward()
    assert all(p.grad is None for p in model.parameters())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)

    # to(float64): the sites read the converted weights, B follows
    model.to(f64)
    assert all(site.feedback_weight.dtype == f64 for _, site in feedback_layers(model))
    reference64 = copy.deepcopy(reference).double()
    torch.testing.assert_close(model(x.double())[0], reference64(x.double())[0])

    # revert: the torch module with the same Parameters
    params = dict(model.named_parameters())
    plain = asymprop.revert(model)
    assert type(plain) is nn.LSTM and not list(plain.children())
    assert not hasattr(plain, "excluded_sites")
    for name, p in plain.named_parameters():
        assert params[name] is p
    torch.testing.assert_close(plain(x.double())[0], reference64(x.double())[0])


def test_load_state_dict_continues_with_the_same_feedback() -> None:
    torch.manual_seed(0)
    model = convert(_Classifier("gru"), "fa", seed=0)
    fresh = convert(_Classifier("gru"), "fa", seed=1)
    fresh.load_state_dict(model.state_dict())
    x, y = _task(n=8)
    grads = []
    for m in (model, fresh):
        CE(m(x), y).backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ exclusion and refusals


def test_an_excluded_weight_runs_exactly_and_audit_names_it() -> None:
    reference = nn.GRU(IN, HID, batch_first=True).double()
    model = convert(nn.Sequential(copy.deepcopy(reference)), "fa", seed=0, exclude=["0.hh_l0"])
    gru = model[0]
    assert isinstance(gru, FeedbackGRU) and not hasattr(gru, "hh_l0")
    assert gru.excluded_sites == {"weight_hh_l0": "excluded by pattern '0.hh_l0'"}
    assert asymprop.audit(model) == {"0.weight_hh_l0": "excluded by pattern '0.hh_l0'"}
    convert(asymprop.revert(model), "fa", seed=0, exclude=["0.hh_l0"], strict=True)  # chosen
    with torch.no_grad():
        gru.ih_l0.feedback_weight.copy_(gru.ih_l0.weight)  # the only feedback path left: B = W
    names = [n for n, _ in reference.named_parameters()]
    x, hx = _inputs(reference)
    ours, _ = _grads(gru, x, hx, names)
    theirs, _ = _grads(reference, x, hx, names)
    _assert_same(ours, theirs, "hh excluded, B_ih = W_ih")


def test_excluding_every_weight_leaves_the_torch_module() -> None:
    model = nn.Sequential(nn.LSTM(IN, HID), nn.Linear(HID, 2))
    convert(model, "fa", seed=0, exclude=["0.*"])
    assert type(model[0]) is nn.LSTM
    left = asymprop.audit(model)
    assert set(left) == {"0.weight_ih_l0", "0.weight_hh_l0"}
    assert all(reason == "excluded by pattern '0.*'" for reason in left.values())


def test_proj_size_is_left_on_backprop_named_by_the_audit() -> None:
    model = convert(nn.Sequential(nn.LSTM(IN, HID, proj_size=2), nn.Linear(2, 2)), "fa")
    assert type(model[0]) is nn.LSTM  # the rest of the model is converted
    left = asymprop.audit(model)
    assert set(left) == {"0.weight_ih_l0", "0.weight_hh_l0", "0.weight_hr_l0"}
    assert all("LSTM with proj_size=2 is not supported" in reason for reason in left.values())
    with pytest.raises(ValueError, match=r"strict=True.*LSTM with proj_size=2 is not supported"):
        convert(nn.Sequential(nn.LSTM(IN, HID, proj_size=2), nn.Linear(2, 2)), "fa", strict=True)


def test_packed_sequences_are_refused_with_the_fix() -> None:
    model = convert(nn.LSTM(IN, HID), "fa", seed=0)
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, IN), torch.randn(2, IN)])
    with pytest.raises(TypeError, match="PackedSequence: pad it"):
        model(packed)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m(torch.randn(2, 3, 4, IN)),  # 4-D input
        lambda m: m(torch.randn(STEPS, BATCH, IN), torch.zeros(BATCH, HID)),  # 2-D h0
        lambda m: m(torch.randn(STEPS, BATCH, IN), torch.zeros(1, BATCH + 1, HID)),  # batch
        lambda m: m(torch.randn(STEPS, BATCH, IN + 1)),  # features
        lambda m: m(torch.randn(STEPS, BATCH, IN, dtype=f64)),  # dtype
        lambda m: m(torch.randn(0, BATCH, IN)),  # no steps
    ],
)
def test_bad_arguments_raise_torch_s_own_errors(call: Callable[[nn.Module], object]) -> None:
    for kind in ("gru", "rnn_tanh"):
        reference = KINDS[kind](IN, HID)
        model = convert(copy.deepcopy(reference), "fa", seed=0)
        with pytest.raises((RuntimeError, ValueError)) as theirs:
            call(reference)
        with pytest.raises(theirs.type) as ours:
            call(model)
        assert str(ours.value) == str(theirs.value)


def test_dropout_between_layers_and_eval_mode() -> None:
    reference = nn.LSTM(IN, HID, 3, dropout=0.5).double()
    model = convert(copy.deepcopy(reference), "fa", seed=0)
    x = torch.randn(STEPS, BATCH, IN, dtype=f64, requires_grad=True)
    output, (h, c) = model(x)
    assert output.shape == (STEPS, BATCH, HID) and h.shape == c.shape == (3, BATCH, HID)
    output.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], reference.eval()(x)[0])  # masks drawn in train
        torch.testing.assert_close(model.eval()(x)[0], reference(x)[0], rtol=1e-12, atol=1e-14)


def test_np_perturbs_per_example_when_the_sequence_is_longer_than_the_batch() -> None:
    """The ih site sees (N, T, in): node perturbation's noise is drawn per example (rows of the
    batch), also when T > N."""
    torch.manual_seed(0)
    model = convert(_Classifier("lstm"), "np", seed=0)
    x, y = _task(n=3)  # N = 3 < T = 6
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.rnn.hh_l0.feedback_weight.clone()
    for _ in range(3):
        assert math.isfinite(train_step(model, opt, CE, x, y))
    assert not torch.equal(before, model.rnn.hh_l0.feedback_weight)  # B_hh was fitted
