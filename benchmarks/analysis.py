"""Explaining the numbers: profiles, the weight-mirror cost model, Kolen-Pollack's optimizer
allowance, and the torch.compile / channels-last / bf16 autocast checks.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from harness import (
    Variant,
    Workload,
    ab_rounds,
    build_variant,
    choose_block,
    parse_spec,
    timed_block,
    warm_up,
)
from torch import Tensor, nn

import asymprop  # after harness, which finds it in an uninstalled checkout

# ---------------------------------------------------------------------------------------------
# Profiles and the weight-mirror cost model
# ---------------------------------------------------------------------------------------------

#: ops that are the converted layers' matrix products (forward, input and weight gradients).
LAYER_OPS = {
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward",
    "aten::cudnn_convolution",
    "aten::cudnn_convolution_transpose",
    "aten::_convolution",
    "aten::convolution",
}


def profile_ops(
    variant: Variant, steps: int, device: torch.device
) -> tuple[dict[str, float], float]:
    """Self time (s per step) of each op over ``steps`` steps, and the wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        wall = timed_block(variant.step, steps, device)
    ops: dict[str, float] = {}
    for event in prof.key_averages():
        self_us = (
            event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        )
        ops[event.key] = ops.get(event.key, 0.0) + self_us / 1e6 / steps
    return ops, wall


def profile_table(work: Workload, spec: str, rows: int = 10, reps: int = 5) -> str:
    """Markdown: the ops where ``spec``'s step spends more time than plain's (ms per step).

    The profiler's self times are wall-clock: on a shared machine a preemption lands in some op.
    So plain and the rule are profiled ``reps`` times each, alternately, one step each, and each
    op's time is its median over the repetitions.
    """
    variants, failed = warm_up(work, ["plain", spec], 2)
    if failed:
        return f"(profile failed: {failed})"
    samples: dict[str, list[dict[str, float]]] = {"plain": [], spec: []}
    walls = []
    for r in range(reps):
        for v in variants if r % 2 == 0 else variants[::-1]:
            ops, wall = profile_ops(v, 1, work.device)
            samples[v.label].append(ops)
            if v.label == spec:
                walls.append(wall)

    def median_ops(runs: list[dict[str, float]]) -> dict[str, float]:
        keys = set().union(*runs)
        return {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys}

    plain, rule = median_ops(samples["plain"]), median_ops(samples[spec])
    keys = sorted(set(plain) | set(rule), key=lambda k: rule.get(k, 0) - plain.get(k, 0))
    lines = [
        f"Profile of `{spec}` on {work.name} (torch.profiler self time, ms per step, median of "
        f"{reps} profiled steps each; the rule's profiled step took "
        f"{statistics.median(walls) * 1e3:.1f} ms):",
        "",
        "| op | plain | " + spec + " | difference |",
        "|---|---:|---:|---:|",
    ]
    for key in reversed(keys[-rows:]):
        a, b = plain.get(key, 0.0) * 1e3, rule.get(key, 0.0) * 1e3
        lines.append(f"| `{key}` | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return "\n".join(lines)


def layer_products(
    work: Workload, mirror_batch: Callable[[str], int] | None = None
) -> tuple[float, float, float]:
    """Multiply-adds of the Linear/Conv2d layers: (engaged step, mirror step at the engaged batch,
    mirror step at each layer's own mirror batch ``mirror_batch(name)``).

    Engaged: forward, weight gradient and, when the layer's input needs one, input gradient --
    three products of equal size (two for the first layer). Mirror: a forward of noise and a
    weight-gradient-shaped covariance -- two (000 App. B; for a conv, App. D.2).
    """
    engaged = mirror = mirror_own = 0.0
    batch = work.inputs.shape[0]
    handles = []

    def hook(name: str, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal engaged, mirror, mirror_own
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            assert isinstance(module, nn.Linear)
            per_output = module.in_features
        macs = float(output.numel() * per_output)
        engaged += macs * (3 if inputs[0].requires_grad else 2)
        mirror += 2 * macs
        mirror_own += 2 * macs * (mirror_batch(name) / batch if mirror_batch else 1.0)

    for name, m in work.base.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            handles.append(m.register_forward_hook(functools.partial(hook, name)))
    try:
        F.cross_entropy(work.base(work.inputs), work.targets).backward()
    finally:
        for h in handles:
            h.remove()
        work.base.zero_grad(set_to_none=True)
    return engaged, mirror, mirror_own


def layer_share(work: Workload, reps: int = 5) -> float:
    """f: the share of plain's step spent in the layers' products (median of ``reps`` profiles)."""
    variants, _ = warm_up(work, ["plain"], 2)
    shares = []
    for _ in range(reps):
        ops, wall = profile_ops(variants[0], 1, work.device)
        shares.append(min(1.0, sum(t for k, t in ops.items() if k in LAYER_OPS) / wall))
    return statistics.median(shares)


@dataclass
class MirrorModel:
    """The predicted cost of a weight-mirror step relative to plain backprop."""

    spec: str
    paper: float  # 1 + (2/3) r s
    derived: float  # 1 + s (mirror products / engaged products) f
    layer_share: float  # f
    mirror_batch: float  # r, weighted by the layers' products


def mirror_cost_model(work: Workload, spec: str, share: float | None = None) -> MirrorModel:
    """000 App. B's cost model, and the same model with counted products and layer share.

    ``r`` = mirror batch / engaged batch, per layer as the rule chooses it (``noise_shape``),
    averaged with the layers' products as weights; ``s = mirror_steps`` (halved for
    ``schedule="alternate"``, 000 App. C.4). ``f`` is the share of the plain step spent in the
    layers' products (profiled): mirror mode repeats only those, never batch norm, activations,
    pooling, the loss or the optimizer.
    """
    _, options = parse_spec(spec)
    s = float(options.get("mirror_steps", 1))
    if options.get("schedule", "layerwise") == "alternate":
        s /= 2
    variants, _ = warm_up(work, [spec], 1)  # records each layer's input shape
    layers = dict(asymprop.feedback_layers(variants[0].model))

    def mirror_batch(name: str) -> int:
        layer = layers[name]
        return int(layer.rule.noise_shape(layer)[0])  # type: ignore[attr-defined]

    engaged, mirror, mirror_own = layer_products(work, mirror_batch)
    r = mirror_own / mirror
    f = layer_share(work) if share is None else share
    return MirrorModel(spec, 1 + 2 / 3 * r * s, 1 + s * mirror_own / engaged * f, f, r)


# ---------------------------------------------------------------------------------------------
# Kolen-Pollack's optimizer allowance
# ---------------------------------------------------------------------------------------------


def kp_allowance(work: Workload, rounds: int) -> dict[str, float]:
    """The optimizer's own extra cost for B, and the cost of one copy of every weight gradient.

    KP's B is a Parameter: ``optimizer.step()`` updates twice the weights (momentum, decay). Its
    gradient equals W's, returned once by the backward function; autograd's AccumulateGrad keeps
    that tensor as one ``.grad`` and copies it for the other (``.grad`` tensors must not alias:
    in-place gradient ops such as clipping or accumulation would hit both).
    """
    variants, _ = warm_up(work, ["plain", "kp"], 2)
    plain, kp = variants
    block = 5
    opt_times: dict[str, list[float]] = {"plain": [], "kp": []}
    copy_times = []
    grads = [m.weight.grad for m in plain.model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    for r in range(rounds):
        for v in (plain, kp) if r % 2 == 0 else (kp, plain):
            opt_times[v.label].append(timed_block(v.optimizer.step, block, work.device))
        copy_times.append(
            timed_block(lambda: [g.clone() for g in grads if g is not None], 1, work.device)
        )
    return {
        "opt_plain_s": statistics.median(opt_times["plain"]),
        "opt_kp_s": statistics.median(opt_times["kp"]),
        "grad_copy_s": statistics.median(copy_times),
    }


# ---------------------------------------------------------------------------------------------
# torch.compile, channels-last, bf16 autocast
# ---------------------------------------------------------------------------------------------


def graph_breaks(work: Workload, spec: str) -> tuple[int, int, str]:
    """(graphs, graph breaks, first reason) of dynamo on the converted model's forward."""
    variants, failed = warm_up(work, [spec], 0)
    if failed:
        return -1, -1, failed[spec]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(variants[0].model)(work.inputs)
    reason = ""
    if explained.break_reasons:
        reason = str(explained.break_reasons[0].reason).strip().splitlines()[0]
    return explained.graph_count, explained.graph_break_count, reason


def gradients(model: nn.Module, run: Callable[[], Tensor]) -> dict[str, Tensor]:
    """The gradient of every parameter after one backward of ``run()``'s loss (fp32 copies)."""
    model.zero_grad(set_to_none=True)
    run().backward()
    grads = {
        n: p.grad.detach().float().clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return grads


def compare(reference: dict[str, Tensor], other: dict[str, Tensor]) -> tuple[float, float]:
    """(max relative error, min cosine similarity) over parameters, each relative to its norm."""
    worst_err, worst_cos = 0.0, 1.0
    for name, ref in reference.items():
        got = other[name]
        scale = ref.norm().item() or 1.0
        worst_err = max(worst_err, (got - ref).norm().item() / scale)
        cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
        worst_cos = min(worst_cos, cos)
    return worst_err, worst_cos


def feature_checks(work: Workload, spec: str, rounds: int) -> dict[str, Any]:
    """channels-last and bf16 autocast on a conv model: gradients against fp32 and step times.

    Three copies of the converted model (fp32 contiguous, channels-last, bf16 autocast around
    forward and loss), the same weights; gradients of one backward, then interleaved steps.
    """
    x, y = work.inputs, work.targets
    x_cl = x.contiguous(memory_format=torch.channels_last)
    variants, failed = warm_up(work, [spec] * 3, 0)
    if failed:
        return {"error": failed[spec]}
    fp32, cl, bf16 = (v.model for v in variants)
    cl.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def autocast_loss(model: nn.Module, inputs: Tensor) -> Tensor:
        with torch.autocast(work.device.type, dtype=torch.bfloat16):
            return F.cross_entropy(model(inputs), y)

    losses: dict[str, Callable[[], Tensor]] = {
        "fp32": lambda: F.cross_entropy(fp32(x), y),
        "channels_last": lambda: F.cross_entropy(cl(x_cl), y),
        "bf16": lambda: autocast_loss(bf16, x),
    }
    models = {"fp32": fp32, "channels_last": cl, "bf16": bf16}
    grads = {k: gradients(models[k], loss) for k, loss in losses.items()}
    optimizers = {k: v.optimizer for k, v in zip(losses, variants, strict=True)}

    def step_of(k: str) -> Callable[[], float]:
        return lambda: _step(models[k], optimizers[k], losses[k])

    steps = [Variant(k, models[k], optimizers[k], step_of(k)) for k in losses]
    for v in steps:
        v.step()
    timing = ab_rounds(steps[0], steps[1:], rounds, 1, work.device)
    return {
        "cl_err": compare(grads["fp32"], grads["channels_last"])[0],
        "bf16_cos": compare(grads["fp32"], grads["bf16"])[1],
        "bf16_finite": all(bool(torch.isfinite(g).all()) for g in grads["bf16"].values()),
        "cl_speed": 1 / timing.ratio("channels_last"),
        "bf16_speed": 1 / timing.ratio("bf16"),
    }


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Callable[[], Tensor]) -> float:
    """The user's loop with the loss computed by ``loss()`` (autocast goes around the forward)."""
    optimizer.zero_grad(set_to_none=True)
    value = loss()
    value.backward()
    optimizer.step()
    if asymprop.feedback_layers(model):
        asymprop.update_feedback(model)
    return float(value.detach())


def compile_check(work: Workload, spec: str, rounds: int) -> dict[str, Any]:
    """Gradients of the compiled model against eager, and the compiled step's speed-up."""
    variants, failed = warm_up(work, [spec], 0)
    if failed:
        return {"error": failed[spec]}
    eager_model = variants[0].model
    torch._dynamo.reset()
    compiled_model = torch.compile(eager_model)
    x, y = work.inputs, work.targets
    eager = gradients(eager_model, lambda: F.cross_entropy(eager_model(x), y))
    begin = time.perf_counter()
    compiled = gradients(eager_model, lambda: F.cross_entropy(compiled_model(x), y))
    compile_s = time.perf_counter() - begin
    return {
        "grad_err": compare(eager, compiled)[0],
        "compile_s": compile_s,
        **_time_compiled(work, spec, rounds),
    }


def _time_compiled(work: Workload, spec: str, rounds: int) -> dict[str, float]:
    torch._dynamo.reset()
    eager = build_variant(work, spec)
    compiled = build_variant(work, spec, compile_model=True)
    compiled.label = "compiled"
    for v in (eager, compiled):
        for _ in range(3):
            v.step()
    block = choose_block(eager, work.device, 0.3)
    timing = ab_rounds(eager, [compiled], rounds, block, work.device)
    return {
        "eager_s": statistics.median(timing.paired["compiled"]),
        "compiled_s": timing.median("compiled"),
    }
