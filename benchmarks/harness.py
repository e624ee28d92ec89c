"""Measurement for the benchmarks: workloads, contestants, interleaved timing, memory.

Used by ``bench.py`` (the suite and its report) and ``analysis.py`` (profiles, cost models,
compile and precision checks). Nothing here prints or decides a target.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import asymprop
except ImportError:  # a checkout that is not installed (e.g. run by another interpreter)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import asymprop
from asymprop.harness.models import build_model

JSON_TAG = "BENCH-JSON "  # a worker's result line on stdout

# ---------------------------------------------------------------------------------------------
# Workloads and variants
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model of the suite: the zoo name, one example's shape, the batch size, builder options."""

    zoo_name: str
    input_shape: tuple[int, ...]
    batch: int
    options: dict[str, Any] = field(default_factory=dict)
    classes: int = 10


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", (1, 28, 28), 256, {"widths": (1024, 1024)}),  # 784-1024-1024-10
    "liao-mnist": ModelSpec("liao-mnist", (1, 28, 28), 128),
    "resnet20": ModelSpec("resnet20", (3, 32, 32), 128),
    "resnet18": ModelSpec("resnet18", (3, 64, 64), 32),
    "mlp-small": ModelSpec("mlp", (1, 8, 8), 32, {"widths": (64, 64)}),  # --quick
    "cnn-small": ModelSpec("liao-mnist", (1, 28, 28), 8),  # features smoke test
}
#: options the benchmark sets unless a spec overrides them: WM's 200 warm-up mirror steps are a
#: one-off cost at the first step, not the per-step cost measured here.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"wm": {"warmup_steps": 0}}
#: BioTorch's name for each rule both libraries have.
BIOTORCH_MODES = {
    "bp": "backpropagation",
    "fa": "fa",
    "usf": "usf",
    "brsf": "brsf",
    "frsf": "frsf",
    "dfa": "dfa",
}
#: lr 0: SGD runs every op of its update (momentum, weight decay, the parameter update) but
#: the weights stay put, so every round times the same numbers and the raw sign rules, whose
#: gradients reach 1e23 in resnet18 (finite, but a step of any size makes them NaN), cannot
#: diverge mid-run.
LR, MOMENTUM, WEIGHT_DECAY = 0.0, 0.9, 5e-4


@dataclass
class Workload:
    name: str
    spec: ModelSpec
    base: nn.Module
    inputs: Tensor
    targets: Tensor
    device: torch.device


def make_workload(name: str, device: torch.device, *, batch: int | None = None) -> Workload:
    """The model (seeded) and one fixed random batch, on ``device``."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    spec = MODELS[name]
    torch.manual_seed(0)
    base = build_model(spec.zoo_name, spec.input_shape, spec.classes, **spec.options).to(device)
    n = batch or spec.batch
    inputs = torch.randn(n, *spec.input_shape, device=device)
    targets = torch.randint(0, spec.classes, (n,), device=device)
    return Workload(name, spec, base, inputs, targets, device)


@dataclass
class Variant:
    """One contestant: a model, its optimizer and its training step (returns the loss)."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], float]


PLAIN_COPY = "plain-copy"


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"wm:schedule=alternate:mirror_steps=2"`` -> ``("wm", {...})`` (benchmark defaults in)."""
    name, *items = spec.split(":")
    options = dict(DEFAULT_OPTIONS.get(name, {}))
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"bad rule spec {spec!r}: options are key=value")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return name, options


def train_and_score(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    epochs: int,
    seed: int,
    batch: int = 64,
) -> tuple[float, float]:
    """Train a converted classifier with :func:`asymprop.train_step` (cross-entropy, a seeded
    permutation per epoch in minibatches of ``batch``); return its test error (%) and the mean
    angle(B, W) over its layers (degrees) at the end. The accuracy checks of the benchmarks
    (``brsf_draw.py``, ``wm_plateau.py --part train``)."""
    (x, y), (x_test, y_test) = train, test
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch):
            asymprop.train_step(model, optimizer, F.cross_entropy, x[idx], y[idx])
    model.eval()
    with torch.no_grad():
        error = float((model(x_test).argmax(1) != y_test).float().mean())
    angles = [a["angle_deg"] for a in asymprop.alignment(model).values()]
    return 100 * error, statistics.fmean(angles)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay over every parameter (KP's B included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def plain_step(
    forward: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    targets: Tensor,
) -> float:
    """The lines of ``asymprop.train_step`` for an unconverted model (same sync on the loss)."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(inputs, targets), targets)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value}")
    loss.backward()
    optimizer.step()
    return value


def build_variant(work: Workload, spec: str, *, compile_model: bool = False) -> Variant:
    """``"plain"``, an asymprop rule spec, or ``"biotorch:<rule>"``, on a copy of the weights.

    ``"plain-copy"`` is plain PyTorch again, another copy: timed against ``"plain"`` it is the
    A/A control, the run's floor for a difference that no code causes (placement in memory,
    load).
    """
    model = copy.deepcopy(work.base)
    x, y = work.inputs, work.targets
    if spec in ("plain", PLAIN_COPY) or spec.startswith("biotorch:"):
        forward: Callable[[Tensor, Tensor], Tensor] = lambda inputs, targets: model(inputs)  # noqa: E731
        if spec.startswith("biotorch:"):
            model, forward = biotorch_model(model, spec.split(":", 1)[1], work)
        module = cast(nn.Module, torch.compile(model)) if compile_model else model
        if compile_model:
            forward = lambda inputs, targets: module(inputs)  # noqa: E731
        optimizer = make_optimizer(model)
        return Variant(spec, module, optimizer, lambda: plain_step(forward, optimizer, x, y))
    rule, options = parse_spec(spec)
    asymprop.convert(model, rule, seed=0, **options)
    optimizer = make_optimizer(model)
    module = cast(nn.Module, torch.compile(model)) if compile_model else model
    step = lambda: asymprop.train_step(module, optimizer, F.cross_entropy, x, y)  # noqa: E731
    return Variant(spec, module, optimizer, step)


def biotorch_model(
    model: nn.Module, rule: str, work: Workload
) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]:
    """BioTorch's conversion of ``model`` (same Parameter objects) and its forward call."""
    from biotorch.module.biomodule import BioModule  # only in BioTorch's interpreter

    mode = BIOTORCH_MODES[rule]
    output_dim = work.spec.classes if mode == "dfa" else None
    with contextlib.redirect_stdout(io.StringIO()):  # its converter prints a report
        bio = BioModule(model, mode=mode, output_dim=output_dim).to(work.device)
    if mode == "dfa":  # BioTorch's DFA takes the targets and the loss in forward
        return bio, lambda inputs, targets: bio(inputs, targets, F.cross_entropy)
    return bio, lambda inputs, targets: bio(inputs)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


#: the CPU clock: ``time.process_time`` (default; the CPU seconds of this process, so time the
#: scheduler gives to other processes on a shared machine is not counted) or ``time.perf_counter``.
CLOCK: list[Callable[[], float]] = [time.process_time]


def timed_block(step: Callable[[], object], block: int, device: torch.device) -> float:
    """Seconds per step over ``block`` consecutive steps (CUDA events on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(block):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / block
    begin = CLOCK[0]()
    for _ in range(block):
        step()
    return (CLOCK[0]() - begin) / block


def warm_up(
    work: Workload, specs: Sequence[str], steps: int, **kwargs: Any
) -> tuple[list[Variant], dict[str, str]]:
    """Build and warm up each variant; a rule that refuses the model is reported, not timed."""
    variants, failed = [], {}
    for spec in specs:
        try:
            variant = build_variant(work, spec, **kwargs)
            for _ in range(steps):
                variant.step()
        except (RuntimeError, ValueError, TypeError, FloatingPointError) as error:
            failed[spec] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            continue
        variants.append(variant)
    return variants, failed


def ab_rounds(
    base: Variant, others: Sequence[Variant], rounds: int, block: int, device: torch.device
) -> Timing:
    """Interleaved A/B repetitions: each round times every variant right next to ``base``.

    Round r visits ``others`` in an order rotated by r; each visit times one block of ``base`` and
    one of the variant, ``base`` first on even rounds and second on odd ones. A variant's ratio is
    the median of its blocks over the median of the ``base`` blocks paired with them: load that
    drifts over seconds touches both halves of a pair alike.
    """
    times: dict[str, list[float]] = {base.label: []}
    times.update({v.label: [] for v in others})
    paired: dict[str, list[float]] = {v.label: [] for v in others}
    for r in range(rounds):
        k = r % max(1, len(others))
        for variant in [*others[k:], *others[:k]]:
            first, second = (base, variant) if r % 2 == 0 else (variant, base)
            a = timed_block(first.step, block, device)
            b = timed_block(second.step, block, device)
            base_s, variant_s = (a, b) if first is base else (b, a)
            times[base.label].append(base_s)
            paired[variant.label].append(base_s)
            times[variant.label].append(variant_s)
    return Timing(times, paired, {}, block, base.label)


def choose_block(variant: Variant, device: torch.device, block_seconds: float) -> int:
    """Steps per block so that a block of ``variant`` lasts about ``block_seconds``."""
    seconds = timed_block(variant.step, 1, device)
    return max(1, round(block_seconds / max(seconds, 1e-6)))


def choose_rounds(
    variants: Sequence[Variant], block: int, device: torch.device, budget_s: float, most: int
) -> int:
    """Rounds that fit ``budget_s`` seconds (one block of each variant is timed to estimate a
    round: plain once per pair), at least 5 (or ``most`` if smaller) and at most ``most``."""
    base, *others = variants
    base_s = timed_block(base.step, block, device) * block
    round_s = sum(timed_block(v.step, block, device) * block + base_s for v in others)
    return max(min(5, most), min(most, int(budget_s / max(round_s, 1e-9))))


@dataclass
class Timing:
    """Per-step seconds of the variants of one model, measured in one A/B run (``ab_rounds``)."""

    times: dict[str, list[float]]  # every block of each variant (the base's, pooled)
    paired: dict[str, list[float]]  # for each variant, the base blocks timed next to its own
    failed: dict[str, str]
    block: int
    base: str = "plain"

    def median(self, label: str) -> float:
        return statistics.median(self.times[label])

    def ratio(self, label: str) -> float:
        """Median of the variant's blocks over the median of the base blocks paired with them."""
        return self.median(label) / statistics.median(self.paired[label])

    def spread(self, label: str) -> float:
        """Half the interquartile range of the per-pair ratios: the run's noise on ``ratio``."""
        pairs = [a / b for a, b in zip(self.times[label], self.paired[label], strict=True)]
        if len(pairs) < 4:
            return float("nan")
        q = statistics.quantiles(pairs, n=4)
        return (q[2] - q[0]) / 2

    def to_json(self) -> dict[str, Any]:
        return {
            "times": self.times,
            "paired": self.paired,
            "failed": self.failed,
            "block": self.block,
            "base": self.base,
        }


def time_model(
    work: Workload,
    specs: Sequence[str],
    *,
    warmup: int,
    block_seconds: float,
    budget_s: float,
    most_rounds: int,
    block: int | None = None,
    rounds: int | None = None,
    **kwargs: Any,
) -> Timing:
    """Warm up ``specs`` (the first is the base), then A/B rounds within the time budget."""
    variants, failed = warm_up(work, specs, warmup, **kwargs)
    if not variants or variants[0].label != specs[0]:
        return Timing({}, {}, failed, 0, specs[0])
    block = block or choose_block(variants[0], work.device, block_seconds)
    if rounds is None:
        rounds = choose_rounds(variants, block, work.device, budget_s, most_rounds)
    timing = ab_rounds(variants[0], variants[1:], rounds, block, work.device)
    timing.failed = failed
    return timing


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _proc_status_mb(key: str) -> float:
    """A ``/proc/self/status`` entry in MB (Linux); ``ru_maxrss`` for the peak elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if key == "VmHWM":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return float("nan")


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Every persistent tensor of a training run: parameters, buffers, grads, optimizer state."""
    found: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        found[name] = p
        if p.grad is not None:
            found[name + ".grad"] = p.grad
    for name, b in model.named_buffers():
        found[name] = b
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                found[f"{names.get(id(param), '?')}.{key}"] = value
    return found


def _nbytes(tensors: Iterable[Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen and t.numel():
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def state_bytes(variant: Variant) -> tuple[int, int]:
    """(all persistent bytes, bytes of feedback tensors with their grads and optimizer state)."""
    found = _tensors(variant.model, variant.optimizer)
    feedback = [t for name, t in found.items() if ".feedback" in f".{name}"]
    return _nbytes(found.values()), _nbytes(feedback)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the Linear/Conv2d weights (one copy of W)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return _nbytes(m.weight for m in layers)


def memory_probe(name: str, spec: str, device: torch.device, steps: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS over a few steps, and RSS growth between steps."""
    work = make_workload(name, device)
    variant = build_variant(work, spec)
    for _ in range(2):
        variant.step()
    after_warmup = _proc_status_mb("VmRSS")
    for _ in range(steps):
        variant.step()
    result = {
        "peak_rss_mb": _proc_status_mb("VmHWM"),
        "growth_mb": _proc_status_mb("VmRSS") - after_warmup,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        variant.step()
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def run_worker(python: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``bench.py`` as a worker under ``python`` and return its JSON result."""
    cmd = [python, str(Path(__file__).resolve().with_name("bench.py")), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(JSON_TAG):
            result: dict[str, Any] = json.loads(line[len(JSON_TAG) :])
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"worker {' '.join(args)} failed (exit {done.returncode}): {tail}")
