"""Training-step benchmarks: every rule against plain PyTorch and against BioTorch (issue 7).

One process times the whole training step -- ``zero_grad``, forward, loss, backward,
``optimizer.step()``, feedback update -- of plain PyTorch (the unconverted model) and of each rule
(``asymprop.train_step``) on the same weights and batch, in interleaved rounds after a warm-up:
round r visits the variants in an order rotated by r, each runs a block of steps timed as a whole,
and the table reports medians over rounds and ratios of medians (rule / plain, same model, same
run). On a GPU the blocks are timed with CUDA events after ``torch.cuda.synchronize``.

    python benchmarks/bench.py                      # the suite (about 30 min on one CPU core);
                                                    # writes benchmarks/RESULTS.md
    python benchmarks/bench.py --quick              # smoke test: a small MLP, fa and kp; no file
    python benchmarks/bench.py --models mlp --rules fa kp wm:schedule=alternate --rounds 30
    python benchmarks/bench.py --profile wm --models mlp   # torch.profiler: plain vs one rule
    python benchmarks/bench.py --compile --models mlp liao-mnist   # + torch.compile section

A rule spec is ``name[:option=value]...`` (options as for ``asymprop.convert``). The sections:
step time; state and peak memory (each variant's peak RSS in its own process); Kolen-Pollack's
optimizer allowance; weight mirrors against their cost model; BioTorch; torch.compile,
channels-last and bf16 autocast (``--compile``, ``--features``).

BioTorch (https://github.com/jsalbert/biotorch, PyPI ``biotorch`` 0.0.16) is never a dependency
of asymprop: it lives in its own virtual environment, which sees this environment's torch and
asymprop, and this script runs it in a subprocess::

    python3 -m venv --system-site-packages VENV
    VENV/bin/pip install --no-deps biotorch==0.0.16   # its layers import without torchvision
    python benchmarks/bench.py --biotorch-python VENV/bin/python
    # or: export ASYMPROP_BIOTORCH_PYTHON=VENV/bin/python

Without one the BioTorch column is skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from analysis import (
    MirrorModel,
    compile_check,
    feature_checks,
    graph_breaks,
    kp_allowance,
    mirror_cost_model,
    profile_table,
)
from harness import (
    BIOTORCH_MODES,
    CLOCK,
    JSON_TAG,
    PLAIN_COPY,
    Timing,
    ab_rounds,
    choose_block,
    choose_rounds,
    make_workload,
    memory_probe,
    run_worker,
    state_bytes,
    time_model,
    warm_up,
    weight_bytes,
)

HERE = Path(__file__).resolve().parent
SUITE_MODELS = ["mlp", "liao-mnist", "resnet20", "resnet18"]
SUITE_RULES = [
    "bp",
    "fa",
    "rndf",
    "usf",
    "nusf",
    "brsf",
    "frsf",
    "kp",
    "dfa",
    "wm",
    "wm:schedule=alternate",
    "np",
]

# ---------------------------------------------------------------------------------------------
# Targets (issue 7)
# ---------------------------------------------------------------------------------------------

FIXED_TARGETS = {
    "bp": 1.02,
    **dict.fromkeys(["fa", "rndf", "usf", "nusf", "brsf", "frsf", "dfa"], 1.05),
    "np": 2.2,
}


@dataclass
class ModelResult:
    """Everything measured on one model."""

    name: str
    timing: Timing
    weights_mb: float = 0.0
    state_mb: dict[str, tuple[float, float]] = field(default_factory=dict)  # extra, feedback
    rss: dict[str, dict[str, float]] = field(default_factory=dict)
    kp: dict[str, float] | None = None
    mirror: dict[str, MirrorModel] = field(default_factory=dict)
    biotorch: Timing | None = None
    biotorch_note: str = ""
    profiles: list[str] = field(default_factory=list)

    def target(self, spec: str) -> float | None:
        """The largest ratio to plain that meets the issue's target (None: no target)."""
        rule = spec.split(":")[0]
        if spec in FIXED_TARGETS:
            return FIXED_TARGETS[spec]
        if rule == "kp" and spec == "kp" and self.kp is not None:
            extra = self.kp["opt_kp_s"] - self.kp["opt_plain_s"]
            return 1.05 + max(0.0, extra) / self.timing.median("plain")
        if spec in self.mirror:
            return 1.10 * self.mirror[spec].derived
        return None

    def missed(self) -> list[str]:
        out = []
        for spec in self.timing.times:
            limit = self.target(spec)
            if limit is not None and self.timing.ratio(spec) > limit:
                out.append(spec)
        return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return "ok" if ok else "**MISS**"


def machine_note(device: torch.device, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    where = f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s)"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host: " + where
    return f"{where}; Python {platform.python_version()}, torch {torch.__version__}"


def render(
    results: list[ModelResult],
    args: argparse.Namespace,
    device: torch.device,
    loads: tuple[tuple[float, ...], tuple[float, ...]],
    extras: list[str],
) -> str:
    lines = [
        "# Benchmarks: the training step of every rule, against plain PyTorch and BioTorch",
        "",
        f"Generated by `python benchmarks/{Path(__file__).name} {' '.join(args.argv)}` on "
        f"{datetime.date.today().isoformat()}.",
        "",
        f"Machine: {machine_note(device, args.threads)}. Device: {device.type}. Load average "
        f"(1/5/15 min) at the start {'/'.join(f'{x:.1f}' for x in loads[0])}, at the end "
        f"{'/'.join(f'{x:.1f}' for x in loads[1])}: other processes shared the cores, so only "
        "ratios measured in the same interleaved run are compared.",
        "",
        "Method: one process per model builds the model once (seed 0), copies it for plain "
        "PyTorch and for each rule (`asymprop.convert(copy, rule, seed=0)`), and times the whole "
        "training step (zero_grad, forward, cross-entropy, backward, SGD step, `update_feedback`; "
        "`asymprop.train_step` for the rules, the same lines for plain PyTorch) on one fixed "
        "batch. SGD has momentum 0.9, weight decay 5e-4 and lr 0: every op of the update runs "
        "but the weights stay put, so each round times the same numbers and the raw sign rules "
        "(gradients up to 1e23 in resnet18) cannot diverge mid-run. After a warm-up, each round "
        "times one block of steps of every variant, the visiting order rotated per round; a cell "
        "is the median of a rule's blocks over the median of the plain blocks paired with them "
        f"(A/B pairs, plain first in even rounds; as many rounds as fit {args.budget:.0f} s per "
        f"model, 5 to {args.rounds}: the `rounds` row). "
        "`±` is half the interquartile range of the per-round ratios (the noise of the run). "
        + (
            "Clock: the process's CPU time (`time.process_time`, one torch thread), so time the "
            "scheduler gives to other processes is not counted; cache and memory-bandwidth "
            "contention still are. "
            if device.type == "cpu" and args.clock == "cpu"
            else "Clock: wall time (CUDA events on a GPU). "
        )
        + "`wm` runs with `warmup_steps=0` (the one-off warm-up is not a per-step cost).",
        "",
    ]
    summary = step_summary(results, device, machine_note(device, args.threads))
    lines += step_table(summary)
    other = "cuda" if device.type == "cpu" else "cpu"
    saved = HERE / f"step-times-{other}.json"
    if saved.exists():
        lines += step_table(json.loads(saved.read_text()))
    else:
        lines += [
            f"## Step time on {other}",
            "",
            f"Not measured yet ({saved.name} is absent): run `python benchmarks/bench.py "
            f"--device {other}` on a machine with {'a GPU' if other == 'cuda' else 'a CPU'}; "
            "it writes that file and this section.",
            "",
        ]
    lines += _biotorch_section(results)
    lines += _memory_section(results)
    lines += _kp_section(results)
    lines += _mirror_section(results)
    lines += extras
    missed = [(r, spec) for r in results for spec in r.missed()]
    lines += ["## Targets missed", ""]
    if not missed:
        lines += ["None in this run.", ""]
    for r, spec in missed:
        lines += [
            f"- `{spec}` on {r.name}: {r.timing.ratio(spec):.3f} > {r.target(spec):.3f}",
        ]
    lines.append("")
    for r in results:
        for table in r.profiles:
            lines += [table, ""]
    return "\n".join(lines)


def step_summary(results: list[ModelResult], device: torch.device, machine: str) -> dict[str, Any]:
    """The step-time table as data (saved per device, so a GPU run can add its own table)."""
    models: dict[str, Any] = {}
    for r in results:
        t = r.timing
        specs: dict[str, Any] = {}
        for spec in [*t.times, *t.failed]:
            if spec in t.failed:
                specs[spec] = {"failed": t.failed[spec]}
            elif spec != "plain":
                limit = r.target(spec)
                specs[spec] = {"ratio": t.ratio(spec), "spread": t.spread(spec), "target": limit}
        plain_ms = t.median("plain") * 1e3 if "plain" in t.times else float("nan")
        rounds = len(t.times[t.base]) // max(1, len(t.paired)) if t.paired else 0
        models[r.name] = {"plain_ms": plain_ms, "rounds": rounds, "specs": specs}
    return {
        "device": device.type,
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "models": models,
    }


def step_table(summary: dict[str, Any]) -> list[str]:
    """Markdown: rules x models, ratio to plain (plain in ms), target met or missed."""
    models = list(summary["models"])
    specs = list(dict.fromkeys(s for m in summary["models"].values() for s in m["specs"]))
    footnotes: dict[str, int] = {}
    lines = [
        f"## Step time on {summary['device']} (ratio to plain PyTorch; plain in ms per step)",
        "",
        f"{summary['machine']}; {summary['date']}.",
        "",
        "| rule | " + " | ".join(models) + " | target |",
        "|---|" + "---:|" * len(models) + "---|",
        "| plain | "
        + " | ".join(f"{summary['models'][m]['plain_ms']:.1f} ms" for m in models)
        + " | |",
        "| rounds | " + " | ".join(str(summary["models"][m]["rounds"]) for m in models) + " | |",
    ]
    for spec in specs:
        cells = []
        for name in models:
            cell = summary["models"][name]["specs"].get(spec)
            if cell is None:
                cells.append("")
            elif "failed" in cell:
                note = footnotes.setdefault(
                    f"{spec} on {name}: {cell['failed']}", len(footnotes) + 1
                )
                cells.append(f"n/a [{note}]")
            else:
                limit = cell["target"]
                mark = "" if limit is None else " " + _mark(cell["ratio"] <= limit)
                cells.append(f"{cell['ratio']:.3f} ±{cell['spread']:.3f}{mark}")
        lines.append(f"| {spec} | " + " | ".join(cells) + f" | {_target_text(spec)} |")
    lines.append("")
    lines += [f"[{number}] {text}" for text, number in footnotes.items()]
    return [*lines, ""]


def _target_text(spec: str) -> str:
    rule = spec.split(":")[0]
    if spec == PLAIN_COPY:
        return "A/A control: plain again (the run's noise floor)"
    if spec in FIXED_TARGETS:
        return f"<= {FIXED_TARGETS[spec]}"
    if spec == "kp":
        return "<= 1.05 + optimizer allowance (below)"
    if rule == "wm":
        return "<= 1.1 x cost model (below)"
    return ""


def _biotorch_section(results: list[ModelResult]) -> list[str]:
    lines = ["## Against BioTorch 0.0.16 (same rule, same model, same run)", ""]
    notes = {r.biotorch_note for r in results if r.biotorch_note}
    if all(r.biotorch is None for r in results):
        return [*lines, *(sorted(notes) or ["BioTorch was not run."]), ""]
    lines += [
        "One process (BioTorch's interpreter) times plain PyTorch, the asymprop rule and "
        "BioTorch's layers for the same rule, interleaved as above. Differences of definition, "
        "not of cost: BioTorch's `usf` scales sign(W) by its init's std; it recomputes "
        "sign(W) (usf, frsf) and "
        "redraws a full random tensor per layer (brsf) in every forward pass, where asymprop "
        "updates B once per step after `optimizer.step()`; its `dfa` takes the loss gradient in "
        "`forward` through a second `autograd.grad` and replaces conv input gradients in "
        "backward hooks.",
        "",
        "| model | rule | plain ms | asymprop / plain | BioTorch / plain | "
        "BioTorch time / asymprop time | faster |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        t = r.biotorch
        if t is None:
            continue
        for rule in BIOTORCH_MODES:
            ours, theirs = rule, f"biotorch:{rule}"
            if ours not in t.times and theirs not in t.times:
                continue
            if ours not in t.times or theirs not in t.times:
                why = t.failed.get(ours) or t.failed.get(theirs) or "not run"
                side = "asymprop" if ours in t.failed else "BioTorch"
                lines.append(f"| {r.name} | {rule} | | | | n/a ({side}: {why}) | |")
                continue
            speed = t.median(theirs) / t.median(ours)
            lines.append(
                f"| {r.name} | {rule} | {t.median('plain') * 1e3:.1f} | {t.ratio(ours):.3f} | "
                f"{t.ratio(theirs):.3f} | {speed:.2f}x | {_mark(speed > 1)} |"
            )
    return [*lines, "", *sorted(notes), ""]


def _memory_section(results: list[ModelResult]) -> list[str]:
    lines = [
        "## Memory",
        "",
        "Extra state: bytes of every persistent tensor (parameters, buffers, gradients, optimizer "
        "state) beyond plain PyTorch's, after the timed steps; feedback: the part held by "
        "`feedback*` tensors and, for a trainable B, its gradient and momentum. The target is "
        "met when the feedback tensors are all of the extra state. Peak RSS: each variant in a "
        "fresh process (same imports, model and batch), minus plain's; growth: RSS after the "
        "last of the probe's steps minus RSS after its two warm-up steps.",
        "",
        "| model | rule | W (MB) | extra state (MB) | feedback (MB) | feedback / W | only feedback "
        "| peak RSS - plain (MB) | RSS growth (MB) | peak CUDA - plain (MB) |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    nan = float("nan")
    for r in results:
        plain = r.rss.get("plain", {})
        for spec, (extra, feedback) in r.state_mb.items():
            rss = r.rss.get(spec, {})
            peak = rss.get("peak_rss_mb", nan) - plain.get("peak_rss_mb", nan)
            cuda = rss.get("peak_cuda_mb", nan) - plain.get("peak_cuda_mb", nan)
            ok = abs(extra - feedback) < 1e-3
            lines.append(
                f"| {r.name} | {spec} | {r.weights_mb:.2f} | {extra:.2f} | {feedback:.2f} | "
                f"{feedback / r.weights_mb:.2f} | {_mark(ok)} | {peak:.1f} | "
                f"{rss.get('growth_mb', nan):.1f} | {cuda:.1f} |"
            )
    return [*lines, ""]


def _kp_section(results: list[ModelResult]) -> list[str]:
    rows = [r for r in results if r.kp is not None]
    if not rows:
        return []
    lines = [
        "## Kolen-Pollack: the optimizer's allowance and the gradient copy",
        "",
        "KP's B is a Parameter, so `optimizer.step()` updates twice as many weights; the target "
        "is 1.05 plus that extra optimizer time over plain's step time (optimizer steps timed "
        "alone, interleaved). B's gradient equals W's and the backward function returns one "
        "tensor for both; autograd stores it as one `.grad` and copies it into the other "
        "(AccumulateGrad). The copy cannot be dropped without aliasing `W.grad` and `B.grad`, "
        "which would make in-place gradient code (clipping, accumulation over micro-batches, "
        "`maximize`) act twice; it costs one memcpy of the weights per step (last column).",
        "",
        "| model | SGD step plain (ms) | SGD step kp (ms) | allowance | kp target | kp measured "
        "| gradient copy (ms) | copy / plain step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        assert r.kp is not None
        plain_step_s = r.timing.median("plain")
        allowance = max(0.0, r.kp["opt_kp_s"] - r.kp["opt_plain_s"]) / plain_step_s
        target = r.target("kp")
        measured = f"{r.timing.ratio('kp'):.3f}" if "kp" in r.timing.times else "n/a"
        lines.append(
            f"| {r.name} | {r.kp['opt_plain_s'] * 1e3:.2f} | {r.kp['opt_kp_s'] * 1e3:.2f} | "
            f"{allowance:.3f} | {target:.3f} | {measured} | {r.kp['grad_copy_s'] * 1e3:.2f} | "
            f"{r.kp['grad_copy_s'] / plain_step_s:.3f} |"
        )
    return [*lines, ""]


def _mirror_section(results: list[ModelResult]) -> list[str]:
    rows = [(r, m) for r in results for m in r.mirror.values()]
    if not rows:
        return []
    lines = [
        "## Weight mirrors against their cost model",
        "",
        "000 App. B: an engaged step of a fully connected layer is three matrix products of the "
        "batch (forward, input gradient through B, weight gradient); a mirror step is two (the "
        "noise through W, and the covariance, a weight-gradient-shaped product) on `mirror_batch` "
        "examples. So a step with `s = mirror_steps` costs `1 + (2/3) r s` times backprop, "
        "`r = mirror_batch / batch`, and half the extra with `schedule='alternate'` (every second "
        "layer per mirror step, C.4).",
        "",
        "Conv analogue (derived here): the forward, input-gradient and weight-gradient "
        "convolutions of a layer have the same multiply-adds (`N Ho Wo C_out C_in/g kH kW`); a "
        "mirror step is one forward convolution of noise shaped like the layer's input and one "
        "weight-gradient convolution (000 App. D.2), so again two of the three, `r` scaling N. "
        "Three corrections make the model exact for any network: the first layer's engaged step "
        "has no input gradient (2 products, not 3); the mirror batch may differ per layer (the "
        "rule's `noise_shape`; `r` in the table is the product-weighted mean); and mirror mode "
        "repeats only the layers' products -- not batch norm, activations, pooling, the loss or "
        "the optimizer. So the derived model is `1 + s (mirror products / engaged products) f`, "
        "products counted per layer at its own mirror batch, `f` the share of the plain step "
        "spent in the layers' products (torch.profiler self time of the matmul/conv ops, median "
        "of 5 profiled steps). The target: measured <= 1.1 x derived model.",
        "",
        "| model | rule | r | f | measured | paper model `1+(2/3)rs` | derived model | measured / "
        "derived | within 10% |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r, m in rows:
        if m.spec not in r.timing.times:
            continue
        measured = r.timing.ratio(m.spec)
        lines.append(
            f"| {r.name} | {m.spec} | {m.mirror_batch:.2f} | {m.layer_share:.2f} | "
            f"{measured:.3f} | {m.paper:.3f} | {m.derived:.3f} | {measured / m.derived:.3f} | "
            f"{_mark(measured <= 1.1 * m.derived)} |"
        )
    return [*lines, ""]


def compile_section(
    device: torch.device,
    models: Sequence[str],
    specs: Sequence[str],
    timed: Sequence[str],
    rounds: int,
) -> list[str]:
    lines = [
        "## torch.compile",
        "",
        "Graph breaks: `torch._dynamo.explain` on the converted model's forward (one graph and no "
        "break means the layers compile whole). Gradients: one backward through "
        "`torch.compile(model)` (inductor) against eager, relative error of the worst parameter. "
        "Speed-up: eager step time / compiled step time (forward and backward compiled; the "
        "optimizer and `update_feedback` eager), interleaved as above.",
        "",
        "| model | rule | graphs | breaks | first break | grad rel. error | compile (s) | eager ms "
        "| compiled ms | speed-up |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name in models:
        work = make_workload(name, device)
        for spec in specs:
            graphs, breaks, reason = graph_breaks(work, spec)
            cells = ["", "", "", "", ""]
            if spec in timed and graphs >= 0:
                result = compile_check(work, spec, rounds)
                if "error" not in result:
                    cells = [
                        f"{result['grad_err']:.1e}",
                        f"{result['compile_s']:.0f}",
                        f"{result['eager_s'] * 1e3:.1f}",
                        f"{result['compiled_s'] * 1e3:.1f}",
                        f"{result['eager_s'] / result['compiled_s']:.2f}x",
                    ]
            reason = reason.replace("|", "/")[:90]
            lines.append(
                f"| {name} | {spec} | {graphs} | {breaks} | {reason} | " + " | ".join(cells) + " |"
            )
            print(lines[-1], flush=True)
    return [*lines, ""]


def features_section(
    device: torch.device, models: Sequence[str], specs: Sequence[str], rounds: int
) -> list[str]:
    lines = [
        "## channels-last and bf16 autocast on conv models",
        "",
        "Gradients of one backward from the same weights: channels-last (model and input) against "
        "the contiguous fp32 run (relative error of the worst parameter), and bf16 autocast "
        "against fp32 (lowest cosine similarity over parameters; all finite?). Speed: fp32 "
        "contiguous step time over the channels-last / bf16 step time (>1 is faster).",
        "",
        "| model | rule | channels-last grad rel. error | bf16 min cosine | bf16 finite | "
        "channels-last speed | bf16 speed |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for name in models:
        work = make_workload(name, device)
        for spec in specs:
            result = feature_checks(work, spec, rounds)
            if "error" in result:
                lines.append(f"| {name} | {spec} | n/a: {result['error']} | | | | |")
            else:
                lines.append(
                    f"| {name} | {spec} | {result['cl_err']:.1e} | {result['bf16_cos']:.4f} | "
                    f"{result['bf16_finite']} | {result['cl_speed']:.2f} | "
                    f"{result['bf16_speed']:.2f} |"
                )
            print(lines[-1], flush=True)
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def find_biotorch_python(option: str | None) -> tuple[str | None, str]:
    """The interpreter that has BioTorch, or None and the reason the column is skipped."""
    how = (
        "create one with `python3 -m venv --system-site-packages VENV && VENV/bin/pip install "
        "--no-deps biotorch==0.0.16` and pass `--biotorch-python VENV/bin/python`"
    )
    candidate = option or os.environ.get("ASYMPROP_BIOTORCH_PYTHON")
    if candidate:
        if not Path(candidate).exists():
            return None, f"BioTorch column skipped: {candidate} does not exist ({how})."
        return candidate, ""
    with contextlib.suppress(ImportError):
        import biotorch  # noqa: F401

        return sys.executable, ""
    return None, f"BioTorch column skipped: no BioTorch interpreter given ({how})."


def run_model(
    name: str, args: argparse.Namespace, device: torch.device, biotorch_python: str | None
) -> ModelResult:
    work = make_workload(name, device)
    specs = ["plain", PLAIN_COPY, *args.rules]
    variants, failed = warm_up(work, specs, args.warmup)
    block = args.block or choose_block(variants[0], device, args.block_seconds)
    rounds = choose_rounds(variants, block, device, args.budget, args.rounds)
    print(f"\n== {name}: {len(variants)} variants, {rounds} A/B rounds of {block} step(s)")
    timing = ab_rounds(variants[0], variants[1:], rounds, block, device)
    timing.failed = failed
    result = ModelResult(name, timing, weights_mb=weight_bytes(work.base) / 2**20)
    plain_state = state_bytes(variants[0])[0]
    for v in variants:
        if v.label == PLAIN_COPY:
            continue
        total, feedback = state_bytes(v)
        result.state_mb[v.label] = ((total - plain_state) / 2**20, feedback / 2**20)
    del variants
    for spec in timing.times:
        if spec != "plain":
            print(f"  {spec:24s} {timing.ratio(spec):.3f} ±{timing.spread(spec):.3f}", flush=True)
    for spec, why in failed.items():
        print(f"  {spec:24s} n/a: {why}", flush=True)
    if "kp" in timing.times:
        result.kp = kp_allowance(work, max(5, args.rounds // 2))
    share = None
    for spec in timing.times:
        if spec.split(":")[0] == "wm":
            result.mirror[spec] = mirror_cost_model(work, spec, share)
            share = result.mirror[spec].layer_share
    if args.rss:
        for spec in specs:
            if spec in timing.failed or spec == PLAIN_COPY:
                continue
            worker = ["--worker", "memory", "--models", name, "--rules", spec]
            worker += ["--threads", str(args.threads), "--device", device.type]
            worker += ["--clock", args.clock]
            result.rss[spec] = run_worker(sys.executable, worker, timeout=1200)
    if biotorch_python is not None:
        rules = [r for r in args.rules if r in BIOTORCH_MODES]
        if rules:
            print(f"== {name}: BioTorch ({', '.join(rules)})", flush=True)
            worker = ["--worker", "biotorch", "--models", name, "--rules", *rules]
            worker += ["--rounds", str(args.rounds), "--budget", str(args.budget)]
            worker += ["--warmup", str(args.warmup), "--block", str(block)]
            worker += ["--threads", str(args.threads)]
            worker += ["--device", device.type, "--clock", args.clock]
            try:
                data = run_worker(biotorch_python, worker, timeout=7200)
                result.biotorch = Timing(**data["timing"])
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                result.biotorch_note = f"BioTorch run failed on {name}: {error}"
    if args.profile_misses:
        for spec in result.missed():
            print(f"== {name}: profiling missed target {spec}", flush=True)
            result.profiles.append(profile_table(work, spec))
    return result


def worker(args: argparse.Namespace, device: torch.device) -> int:
    """The subprocess side: ``memory`` (one variant) or ``biotorch`` (timing with BioTorch)."""
    warnings.simplefilter("ignore")  # BioTorch's deprecated backward hooks
    name = args.models[0]
    if args.worker == "memory":
        data: dict[str, Any] = memory_probe(name, args.rules[0], device, args.probe_steps)
    else:
        from importlib.metadata import version

        work = make_workload(name, device)
        specs = ["plain", *args.rules, *(f"biotorch:{r}" for r in args.rules)]
        timing = time_model(
            work,
            specs,
            warmup=args.warmup,
            block_seconds=args.block_seconds,
            budget_s=args.budget,
            most_rounds=args.rounds,
            block=args.block,
        )
        data = {"timing": timing.to_json(), "version": version("biotorch")}
    print(JSON_TAG + json.dumps(data), flush=True)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(SUITE_MODELS)}")
    p.add_argument("--rules", nargs="+", default=None, help="rule specs name[:key=value]...")
    p.add_argument("--rounds", type=int, default=30, help="most A/B rounds per model")
    p.add_argument(
        "--budget", type=float, default=300, help="seconds of A/B rounds per model (>= 5 rounds)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--block", type=int, default=0, help="steps per block (0: ~--block-seconds)")
    p.add_argument("--block-seconds", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="CPU timing: process CPU time (default, immune to preemption) or wall time",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: small MLP, fa and kp")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--biotorch-python", default=None, help="interpreter with BioTorch installed")
    p.add_argument("--no-biotorch", action="store_true")
    p.add_argument(
        "--rss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="peak-RSS probes, one process per variant (default: on, off with --quick)",
    )
    p.add_argument("--probe-steps", type=int, default=5)
    p.add_argument("--no-profile-misses", dest="profile_misses", action="store_false")
    p.add_argument("--profile", default=None, help="print plain vs this rule's profile and exit")
    p.add_argument("--compile", action="store_true", help="add the torch.compile section")
    p.add_argument("--compile-models", nargs="+", default=["mlp", "liao-mnist"])
    p.add_argument("--compile-rules", nargs="+", default=["plain", "bp", "fa", "kp"])
    p.add_argument("--features", action="store_true", help="add channels-last / bf16 section")
    p.add_argument("--feature-models", nargs="+", default=["liao-mnist", "resnet20"])
    p.add_argument("--feature-rules", nargs="+", default=["plain", "bp", "fa", "usf", "kp"])
    p.add_argument("--worker", choices=["memory", "biotorch"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.models = args.models or ["mlp-small"]
        args.rules = args.rules or ["fa", "kp"]
        args.rounds, args.warmup = min(args.rounds, 3), 1
        args.rss = bool(args.rss)
        args.compile_models = args.feature_models = ["cnn-small"]
        args.compile_rules = args.feature_rules = ["plain", "fa"]
    args.rss = args.rss is not False
    args.models = args.models or SUITE_MODELS
    args.rules = list(dict.fromkeys(args.rules or SUITE_RULES))  # labels must be unique
    return args


def kept_sections(text: str) -> str:
    """The ``<!-- begin NAME -->`` ... ``<!-- end NAME -->`` sections of a RESULTS.md."""
    kept, inside = [], False
    for line in text.splitlines(keepends=True):
        inside = inside or line.startswith("<!-- begin ")
        if inside:
            kept.append(line)
        if line.startswith("<!-- end "):
            inside = False
    return "".join(kept)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.worker:
        return worker(args, device)
    if args.profile:
        for name in args.models:
            print(profile_table(make_workload(name, device), args.profile, rows=15), "\n")
        return 0
    biotorch_python, note = (None, "BioTorch column skipped (--no-biotorch).")
    if not args.no_biotorch:
        biotorch_python, note = find_biotorch_python(args.biotorch_python)
    if note:
        print(note, flush=True)
    load_start = os.getloadavg()
    results = []
    for name in args.models:
        result = run_model(name, args, device, biotorch_python)
        result.biotorch_note = result.biotorch_note or note
        results.append(result)
    extras: list[str] = []
    if args.compile:
        extras += compile_section(
            device,
            args.compile_models,
            ["plain", *args.rules],
            args.compile_rules,
            max(5, args.rounds // 3),
        )
    if args.features:
        extras += features_section(
            device, args.feature_models, args.feature_rules, max(5, args.rounds // 3)
        )
    text = render(results, args, device, (load_start, os.getloadavg()), extras)
    print("\n" + text)
    if not args.no_write and not (args.quick and args.out is None):
        out = args.out or HERE / "RESULTS.md"
        # sections other scripts keep in this file (layer_kinds.py) survive a rewrite
        kept = kept_sections(out.read_text()) if out.exists() else ""
        out.write_text(text + "\n" + kept)
        if args.out is None:  # the suite's own run: keep this device's table for the other's
            summary = step_summary(results, device, machine_note(device, args.threads))
            saved = HERE / f"step-times-{device.type}.json"
            saved.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
