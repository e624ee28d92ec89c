"""``nn.MultiheadAttention`` with feedback: torch's forward and ``bp`` gradients to float64
rounding, FA's errors by hand, transformers that convert completely and train with every rule."""

from __future__ import annotations

import copy
import math
import pickle
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import asymprop
from asymprop import FeedbackLinear, LinearSite, convert, feedback_layers
from asymprop.attention import FeedbackMultiheadAttention  # the import registers the converter
from asymprop.rules import FA

E, HEADS, L, S, N = 8, 2, 5, 4, 3
F64 = torch.float64


# ----------------------------------------------------------------------------- bp == torch


@dataclass(frozen=True)
class Case:
    """One way of calling attention: module options and call arguments."""

    attend: str = "self"  # "self" (query is key is value), "kv" (key is value), "cross"
    kdim: int | None = None  # with vdim: separate projection weights when != E
    vdim: int | None = None
    batch_first: bool = False
    batched: bool = True
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    padding: str | None = None  # key_padding_mask: None, "bool", "float"
    mask: str | None = None  # attn_mask: None, "2d-bool", "2d-float", "3d-bool", "3d-float"
    causal: bool = False  # is_causal with the causal mask
    need_weights: bool = True
    average: bool = True

    def module(self, dropout: float = 0.0) -> nn.MultiheadAttention:
        return nn.MultiheadAttention(
            E, HEADS, dropout, self.bias, self.add_bias_kv, self.add_zero_attn, self.kdim,
            self.vdim, self.batch_first, dtype=F64,
        )  # fmt: skip

    def inputs(self, gen: torch.Generator) -> list[Tensor]:
        """query, key, value (as many distinct tensors as the case has), float64."""
        src = L if self.attend == "self" else S

        def draw(length: int, dim: int) -> Tensor:
            shape = [length, dim]
            if self.batched:
                shape.insert(0 if self.batch_first else 1, N)
            return torch.randn(shape, generator=gen, dtype=F64)

        query = draw(L, E)
        if self.attend == "self":
            return [query]
        key = draw(src, self.kdim or E)
        return [query, key] if self.attend == "kv" else [query, key, draw(src, self.vdim or E)]

    def call_args(self, inputs: list[Tensor], gen: torch.Generator) -> dict[str, Any]:
        query, key, value = _qkv(inputs)
        src = L if self.attend == "self" else S
        kwargs: dict[str, Any] = {
            "query": query,
            "key": key,
            "value": value,
            "need_weights": self.need_weights,
            "average_attn_weights": self.average,
            "is_causal": self.causal,
        }
        if self.padding is not None:
            shape = (N, src) if self.batched else (src,)
            padded = torch.rand(shape, generator=gen) < 0.4
            padded[..., 0] = False  # every query sees at least one key
            # a float mask in float64, like attn_mask's (torch warns about mixed dtypes)
            kwargs["key_padding_mask"] = padded if self.padding == "bool" else padded.to(F64) * -3
        if self.causal:
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
        elif self.mask is not None:
            dims, kind = self.mask.split("-")
            shape = (L, src) if dims == "2d" else ((N if self.batched else 1) * HEADS, L, src)
            if kind == "bool":
                blocked = torch.rand(shape, generator=gen) < 0.3
                blocked[..., 0] = False
                kwargs["attn_mask"] = blocked
            else:
                kwargs["attn_mask"] = torch.randn(shape, generator=gen, dtype=F64)
        return kwargs


def _qkv(inputs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """[x] -> (x, x, x); [q, kv] -> (q, kv, kv); [q, k, v] -> (q, k, v)."""
    if len(inputs) == 1:
        return inputs[0], inputs[0], inputs[0]
    return inputs[0], inputs[1], inputs[-1]


def _cases() -> list[Case]:
    separate = {"kdim": 3, "vdim": 6}
    cases = [
        Case(),
        Case(batch_first=True),
        Case(batched=False),
        Case(attend="kv"),
        Case(attend="cross", batch_first=True),
        Case(attend="cross", batched=False, need_weights=False),
        Case(attend="kv", kdim=6, vdim=6),
        Case(attend="cross", **separate),
        Case(attend="cross", batch_first=True, bias=False, **separate),
        Case(attend="cross", batched=False, padding="bool", **separate),
        Case(bias=False),
        Case(add_bias_kv=True),
        Case(add_zero_attn=True, attend="kv"),
        Case(add_bias_kv=True, add_zero_attn=True, padding="bool", mask="2d-bool"),
        Case(attend="cross", add_bias_kv=True, add_zero_attn=True, mask="3d-float", **separate),
        Case(padding="bool"),
        Case(padding="float", batch_first=True),
        Case(padding="bool", need_weights=False, attend="kv"),
        Case(mask="2d-bool"),
        Case(mask="2d-float", attend="cross", batch_first=True),
        Case(mask="3d-bool", need_weights=False),
        Case(mask="3d-float", batched=False),
        Case(mask="3d-bool", batched=False, need_weights=False),
        Case(padding="float", mask="2d-float", need_weights=False),
        Case(padding="bool", mask="3d-bool", average=False),
        Case(causal=True),
        Case(causal=True, need_weights=False),
        Case(causal=True, need_weights=False, padding="float", batch_first=True),
        Case(causal=True, batched=False, need_weights=False),
        Case(average=False),
        Case(average=False, batched=False, attend="cross"),
        Case(need_weights=False, batch_first=True, add_bias_kv=True),
    ]
    return cases


def _case_id(case: Case) -> str:
    default = Case()
    return (
        "-".join(f"{k}={v}" for k, v in vars(case).items() if getattr(default, k) != v) or "default"
    )


def _ramp(t: Tensor) -> Tensor:
    return torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view_as(t)


def _run(module: nn.Module, case: Case, inputs: list[Tensor], seed: int) -> dict[str, Tensor]:
    """Outputs, attention weights and every gradient of one call, keyed by name."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    gen = torch.Generator().manual_seed(seed)
    kwargs = case.call_args(leaves, gen)
    module.zero_grad(set_to_none=True)
    out, weights = module(**kwargs)
    # a loss that weighs every output differently, so no symmetry hides a wrong gradient
    loss = (out * _ramp(out)).sum()
    if weights is not None:
        loss = loss + (weights * _ramp(weights)).sum()
    loss.backward()
    found = {"out": out.detach(), **{f"input{i}": x.grad for i, x in enumerate(leaves)}}
    if weights is not None:
        found["weights"] = weights.detach()
    for name, param in module.named_parameters():
        if param.grad is not None and not name.endswith("feedback_weight"):
            found[name] = param.grad
    return found


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_bp_equals_torch_attention(case: Case) -> None:
    reference = case.module()
    converted = convert(copy.deepcopy(reference), "bp")
    assert isinstance(converted, FeedbackMultiheadAttention)
    inputs = case.inputs(torch.Generator().manual_seed(1))
    ours, theirs = _run(converted, case, inputs, 2), _run(reference, case, inputs, 2)
    assert set(ours) == set(theirs) and ("in_proj_bias" in theirs) == case.bias
    assert ("weights" in theirs) == case.need_weights
    for name, expected in theirs.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_draws_torch_masks(need_weights: bool) -> None:
    case = Case(attend="kv", batch_first=True, need_weights=need_weights)
    reference = case.module(dropout=0.4).train()
    converted = convert(copy.deepcopy(reference), "fa", seed=0)
    inputs = case.inputs(torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    theirs = _run(reference, case, inputs, 2)
    torch.manual_seed(5)
    ours = _run(converted, case, inputs, 2)
    torch.testing.assert_close(ours["out"], theirs["out"], rtol=1e-9, atol=1e-12)
    assert not torch.equal(ours["out"], _run(reference.eval(), case, inputs, 2)["out"])


@pytest.mark.parametrize("rule", ["fa", "usf", "kp"])
@pytest.mark.parametrize(
    "case", [Case(attend="cross", batch_first=True), Case(attend="cross", kdim=3, vdim=6)]
)
def test_forward_is_torch_for_every_rule(rule: str, case: Case) -> None:
    reference = case.module()
    params = dict(reference.named_parameters())
    converted = convert(copy.deepcopy(reference), rule, seed=0)
    inputs = case.inputs(torch.Generator().manual_seed(1))
    kwargs = case.call_args(inputs, torch.Generator())
    out, weights = converted(**kwargs)
    ref_out, ref_weights = reference(**kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-12, atol=1e-12)
    same = dict(convert(reference, rule, seed=0).named_parameters())
    assert all(same[n] is p for n, p in params.items())  # converted in place: same Parameters


# ----------------------------------------------------------------------------- fa by hand


def _capture(module: nn.Module, store: dict[str, Tensor], name: str) -> None:
    """Store the gradient at ``module``'s output and at its input under ``name``."""

    def forward_hook(mod: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        store[f"{name}.x"] = args[0]
        output.register_hook(lambda g: store.__setitem__(f"{name}.g", g))
        if args[0].requires_grad:
            args[0].register_hook(lambda g: store.__setitem__(f"{name}.dx", g))

    module.register_forward_hook(forward_hook)


@pytest.mark.parametrize("attend", ["self", "kv", "cross"])
def test_fa_errors_travel_through_b(attend: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True, dtype=F64)
    model = convert(mha, "fa", seed=0)
    site, out_proj = model.in_proj, model.out_proj
    assert isinstance(site, LinearSite) and isinstance(out_proj, FeedbackLinear)
    seen: dict[str, Tensor] = {}
    _capture(site, seen, "in")
    _capture(out_proj, seen, "out")
    lengths = {"self": [L], "kv": [L, S], "cross": [L, S, S]}[attend]
    xs = [torch.randn(N, n, E, dtype=F64, requires_grad=True) for n in lengths]
    out, _ = model(*_qkv(xs), need_weights=False)
    out.backward(torch.randn_like(out))

    g_in, g_out = seen["in.g"], seen["out.g"]  # (N, sum(lengths), 3E), (N, L, E)
    assert g_in.shape == (N, sum(lengths), 3 * E)  # one call of the site per pass
    # the error at out_proj's input is g_out @ B_out, not g_out @ W_out
    torch.testing.assert_close(seen["out.dx"], g_out @ out_proj.feedback_weight)
    # only the diagonal blocks get an error: rows of q columns 0:E, of k E:2E, of v 2E:3E
    columns = {"self": [(0, 3)], "kv": [(0, 1), (1, 3)], "cross": [(0, 1), (1, 2), (2, 3)]}
    blocks = g_in.split(lengths, dim=1)
    for block, (start, stop) in zip(blocks, columns[attend], strict=True):
        assert torch.all(block[..., : start * E] == 0) and torch.all(block[..., stop * E :] == 0)
    # dL/dx = g_q @ B_q + g_k @ B_k + g_v @ B_v for each input tensor
    B = site.feedback_weight
    for x, block in zip(xs, blocks, strict=True):
        torch.testing.assert_close(x.grad, block @ B)
    if attend == "self":  # spelled out per projection
        g_q, g_k, g_v = g_in.chunk(3, dim=-1)
        B_q, B_k, B_v = B.chunk(3)
        torch.testing.assert_close(xs[0].grad, g_q @ B_q + g_k @ B_k + g_v @ B_v)
    bp = g_in @ mha.in_proj_weight.detach()
    assert not torch.allclose(seen["in.dx"], bp, atol=1e-3)  # secretly backprop fails
    # W's gradients are autograd's for the same upstream errors
    for name, weight in (("in", mha.in_proj_weight), ("out", out_proj.weight)):
        x, g = seen[f"{name}.x"].detach(), seen[f"{name}.g"]
        (want,) = torch.autograd.grad(F.linear(x, weight), weight, g)
        torch.testing.assert_close(weight.grad, want)


def test_fa_separate_projections_each_use_their_b() -> None:
    torch.manual_seed(0)
    model = convert(nn.MultiheadAttention(E, HEADS, kdim=3, vdim=6, dtype=F64), "fa", seed=0)
    seen: dict[str, Tensor] = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        _capture(getattr(model, name), seen, name)
    query = torch.randn(L, N, E, dtype=F64, requires_grad=True)
    key = torch.randn(S, N, 3, dtype=F64, requires_grad=True)
    value = torch.randn(S, N, 6, dtype=F64, requires_grad=True)
    out, _ = model(query, key, value)
    out.backward(torch.randn_like(out))
    for name, x in (("q_proj", query), ("k_proj", key), ("v_proj", value)):
        # the site sees (N, *, dim), batch first; the error arrives in the caller's layout
        want = (seen[f"{name}.g"] @ getattr(model, name).feedback_weight).transpose(0, 1)
        torch.testing.assert_close(x.grad, want)


# ----------------------------------------------------------------------------- transformers


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean(1))


class Decoder(nn.Module):
    """Decodes the first three positions against the whole sequence (cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.body = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x[:, :3], x).mean(1))


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(3)
        return self.head(self.body(x, x[:, :3], tgt_mask=mask, tgt_is_causal=True).mean(1))


class Chain(nn.Module):
    """Linear -> self-attention (no residual) -> mean over the sequence -> Linear: a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


TRANSFORMERS = {"encoder": Encoder, "decoder": Decoder, "transformer": Seq2Seq}
LAYERWISE = sorted(set(asymprop.RULES) - {"np"})  # np: its own test below (fewer steps)


def _task(features: int = 16) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 6, features, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _train(model: nn.Module, x: Tensor, y: Tensor, steps: int = 20) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return [asymprop.train_step(model, optimizer, F.cross_entropy, x, y) for _ in range(steps)]


@pytest.mark.parametrize("rule", LAYERWISE)
@pytest.mark.parametrize("arch", list(TRANSFORMERS))
def test_transformers_convert_completely_and_train(arch: str, rule: str) -> None:
    torch.manual_seed(0)
    model = convert(TRANSFORMERS[arch](), rule, seed=0, strict=True)
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attention and all(isinstance(m, FeedbackMultiheadAttention) for m in attention)
    left = asymprop.audit(model)
    if rule == "bp":  # every weight on backprop, by choice
        assert left and all(reason.startswith("rule 'bp'") for reason in left.values())
    else:
        assert left == {}
    losses = _train(model, *_task())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_np_trains_residual_transformers() -> None:
    torch.manual_seed(0)
    model = convert(Encoder(), "np", seed=0)
    losses = _train(model, *_task())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("rule", ["dfa", "np"])
def test_chain_with_attention_trains_with_dfa_and_np(rule: str) -> None:
    torch.manual_seed(0)
    model = convert(Chain(), rule, seed=0, strict=True)
    assert asymprop.audit(model) == {}
    start = {n: layer.feedback_weight.clone() for n, layer in feedback_layers(model)}
    losses = _train(model, *_task(features=6))
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.85 * losses[0], losses  # measured: 0.68 (dfa), 0.75 (np)
    for name in ("attn.in_proj", "attn.out_proj"):
        feedback = dict(feedback_layers(model))[name].feedback_weight
        if rule == "dfa":  # drawn at the first backward: (n_out, *input_shape[1:])
            assert feedback.shape == (3, 6, 16), name
        else:  # fitted to the perturbation estimates
            assert not torch.equal(feedback, start[name]), name


# ----------------------------------------------------------------------------- fused paths


@dataclass(frozen=True)
class Counting(FA):
    """FA that counts the calls of each layer (no hook: a hook would change the path)."""

    name = "counting"

    def forward(self, layer: Any, input: Tensor) -> Tensor:
        layer.feedback_state["calls"] = layer.feedback_state.get("calls", 0) + 1
        return super().forward(layer, input)


def _calls(model: nn.Module) -> dict[str, int]:
    """Calls of each layer of the transformer body since the last look."""
    layers = feedback_layers(model)
    return {n: layer.feedback_state.pop("calls", 0) for n, layer in layers if n.startswith("body")}


def test_eval_without_grad_runs_the_feedback_layers_not_torch_fused_kernels() -> None:
    torch.manual_seed(0)
    reference = Encoder().eval()
    model = convert(copy.deepcopy(reference), Counting(), seed=0).eval()
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        assert set(_calls(model).values()) == {1}  # every layer ran once, attention included
        # the oracle: without the converter's hook torch takes its fused kernel
        for attention in (m for m in model.modules() if isinstance(m, FeedbackMultiheadAttention)):
            attention._forward_pre_hooks.clear()
        model(x)
        assert set(_calls(model).values()) == {0}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_eval_without_grad_with_padding_mask_handles_nested_inputs() -> None:
    """TransformerEncoder turns a padded batch into nested tensors in eval mode without grad."""
    torch.manual_seed(0)
    reference = Encoder().eval()
    model = convert(copy.deepcopy(reference), Counting(), seed=0).eval()
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = padding[1, 5:] = True
    with torch.no_grad():
        ours = model.body(x, src_key_padding_mask=padding)
        torch.testing.assert_close(ours, reference.body(x, src_key_padding_mask=padding))
        assert set(_calls(model).values()) == {1}
        # with grad: the plain path; real positions agree with the nested result
    with_grad = model.body(x, src_key_padding_mask=padding)
    keep = ~padding
    torch.testing.assert_close(with_grad[keep], ours[keep], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- kp, metrics


def _diffs(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: (layer.feedback_weight - layer.weight).detach().clone()
        for name, layer in feedback_layers(model)
    }


@pytest.mark.parametrize("kind", ["packed-self", "packed-cross", "separate"])
def test_kp_difference_shrinks_by_one_minus_lr_lambda(kind: str) -> None:
    torch.manual_seed(0)
    kdim = 3 if kind == "separate" else None
    mha = convert(nn.MultiheadAttention(E, HEADS, kdim=kdim, vdim=kdim, dtype=F64), "kp", seed=0)
    query = torch.randn(L, N, E, dtype=F64)
    key = query if kind == "packed-self" else torch.randn(S, N, kdim or E, dtype=F64)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, q: Tensor) -> Tensor:
            return self.mha(q, key if kind != "packed-self" else q, key)[0].mean(0)

    model = Wrap()
    names = {"packed-self": 2, "packed-cross": 2, "separate": 4}[kind]
    assert len(feedback_layers(model)) == names
    lr, decay = 0.1, 0.05
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=decay)
    for _ in range(2):
        before = _diffs(model)
        asymprop.train_step(model, optimizer, F.mse_loss, query, torch.zeros(N, E, dtype=F64))
        for name, after in _diffs(model).items():
            torch.testing.assert_close(
                after, (1 - lr * decay) * before[name], rtol=1e-12, atol=1e-14, msg=name
            )


@pytest.mark.parametrize("rule", ["bp", "fa"])
def test_delta_alignment_reports_every_projection(rule: str) -> None:
    torch.manual_seed(0)
    model = convert(Encoder().double(), rule, seed=0)
    x, y = _task()
    deltas = asymprop.delta_alignment(model, F.cross_entropy, x.double(), y)
    for i in range(2):
        assert f"body.layers.{i}.self_attn.in_proj" in deltas
        assert f"body.layers.{i}.self_attn.out_proj" in deltas
    if rule == "bp":
        assert all(angle < 1e-5 for angle in deltas.values()), deltas
    else:
        assert deltas["body.layers.0.self_attn.in_proj"] > 5


# ----------------------------------------------------------------------------- state


def test_state_dict_keys_loading_and_revert() -> None:
    torch.manual_seed(0)
    plain = Seq2Seq()
    plain_keys = set(plain.state_dict())
    params = dict(plain.named_parameters())
    model = convert(copy.deepcopy(plain), "frsf", seed=0)
    keys = set(model.state_dict())
    assert plain_keys <= keys
    extra = keys - plain_keys
    assert extra and all(".feedback_" in k or k.endswith("._extra_state") for k in extra)
    assert "body.encoder.layers.0.self_attn.in_proj.feedback_weight" in extra
    assert "body.decoder.layers.0.multihead_attn.out_proj.feedback_weight" in extra
    result = model.load_state_dict(plain.state_dict(), strict=False)
    # missing: B; not frsf's empty rule state, whose absence load_state_dict accepts
    assert set(result.missing_keys) == {k for k in extra if not k.endswith("._extra_state")}
    assert not result.unexpected_keys
    # a pickled converted model (the hook is a module-level function) runs the same
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), model(x))

    model = convert(plain, "fa", seed=0)  # in place
    asymprop.revert(model)
    attention = [m for m in plain.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attention) == 3
    assert all(type(m) is nn.MultiheadAttention and not m._forward_pre_hooks for m in attention)
    assert all(
        type(m.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear for m in attention
    )
    assert dict(plain.named_parameters()) == params  # the very same Parameter objects
    assert set(plain.state_dict()) == plain_keys
    assert asymprop.audit(plain)  # plain again: attention weights on backprop
    convert(plain, "usf", seed=0)  # and convertible again


def test_excluded_weights_run_exactly_and_are_named() -> None:
    torch.manual_seed(0)
    case = Case(attend="cross", batch_first=True)
    reference = case.module()
    model = nn.Sequential(copy.deepcopy(reference))
    convert(model, "fa", seed=0, exclude=["0.in_proj"], strict=True)
    mha = model[0]
    assert isinstance(mha, FeedbackMultiheadAttention) and "in_proj" not in mha._modules
    assert asymprop.audit(model) == {"0.in_proj_weight": "excluded by pattern '0.in_proj'"}
    with torch.no_grad():  # out_proj's B = W: every gradient is torch's iff in_proj is exact
        mha.out_proj.feedback_weight.copy_(mha.out_proj.weight)
    inputs = case.inputs(torch.Generator().manual_seed(1))
    ours, theirs = _run(mha, case, inputs, 2), _run(reference, case, inputs, 2)
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-9, atol=1e-12, msg=name)

    everything = nn.Sequential(nn.MultiheadAttention(E, HEADS), nn.Linear(E, 2))
    convert(everything, "fa", seed=0, exclude=["0.*"])
    assert type(everything[0]) is nn.MultiheadAttention  # nothing converted: left as it was
    assert asymprop.audit(everything) == {
        "0.in_proj_weight": "excluded by pattern '0.*'",
        "0.out_proj.weight": "excluded by pattern '0.*'",
    }


def test_audit_leaves_out_the_added_key_and_value() -> None:
    model = convert(nn.MultiheadAttention(E, HEADS, add_bias_kv=True), "fa", seed=0)
    assert asymprop.audit(model) == {}  # bias_k, bias_v: appended keys, no error through them


# ----------------------------------------------------------------------------- wm


def test_wm_mirrors_attention_weights_to_the_predicted_plateau() -> None:
    torch.manual_seed(0)
    model = convert(Encoder(), "wm", seed=0, warmup_steps=0)
    x = torch.randn(4, 6, 16)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = asymprop.alignment(model)
    asymprop.mirror(model, 30, example_input=x)  # eval, no grad: the shapes are recorded
    rule = asymprop.make_rule("wm")
    angles = asymprop.alignment(model)
    for name, layer in feedback_layers(model):
        if "attn" not in name:
            continue
        assert layer.feedback_state["input_shape"] == [4, 6, 16], name
        shape = layer.rule.noise_shape(layer)
        batch, positions = shape[0], math.prod(shape[1:-1])
        c = 2 - 2 / math.pi  # ReLU
        plateau = math.degrees(
            math.atan(
                math.sqrt(c * layer.fan_in * rule.decay / ((2 - rule.decay) * batch * positions))
            )
        )
        # measured: 25-27 degrees against a predicted 24.2 (one draw of a fluctuating B)
        assert start[name]["angle_deg"] > 80
        assert angles[name]["angle_deg"] < min(40.0, plateau + 6.0), (name, plateau, angles[name])
    for n, p in model.named_parameters():  # mirror mode reads W only
        if "feedback" not in n:
            assert torch.equal(p, weights[n]), n
