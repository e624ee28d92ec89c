"""Weight mirrors: the plateau of angle(B, W) against the cost of the whole training step, per
mirror drive and mirror budget, for dense and conv layers (issue 18, goals 1 and 4).

Mirror mode (000 Alg. 1) estimates W from a batch of driven examples, ``B <- (1 - decay) B +
eta_b cov(phi(W x), x)``; with W fixed B settles at a plateau whose angle to W is the estimator's
noise. The drives (``wm`` option ``drive``): ``gaussian`` (the paper's), ``orthogonal``
(antithetic pairs of Haar rows) and ``coordinate`` (antithetic pairs of scaled unit vectors, the
rows of a permutation matrix); the last two apply to dense layers, convolutions keep the
Gaussian drive (``--part conv`` measures why).

* ``--part cost`` (default): the mlp (784-1024-1024-10, batch 256) and the liao-mnist CNN
  (batch 128) of ``benchmarks/bench.py``, one process per model, one torch thread. Variants:
  plain PyTorch and ``wm`` per drive at budgets of 1, 1/2, 1/4 and 1/10 of the default mirror
  batch, chosen per layer (``max(2, ceil(budget * 2 fan_in / P))``, P output positions per
  example; budget 1 is the default). The whole training step is timed against plain PyTorch in
  interleaved A/B rounds (``harness.ab_rounds``, as ``bench.py``; process CPU time; SGD with
  lr 0 so W stays fixed); afterwards 20 more mirror steps and the mean angle(B, W) per layer
  over 10 further ones (the fixed-W plateau). Prints the table, writes
  ``docs/figures/wm-plateau-cost.png``.
* ``--part layer``: one mirror step of one dense layer (784 -> 1024, the mlp's first) per drive,
  ms per step (process CPU time, median of 15, drives interleaved).
* ``--part conv``: what carries over to a convolution, on the CNN's second conv (20 -> 50
  channels, 5x5, 12x12 input, W fixed): one estimate (decay 1) and the plateau (decay 0.5, mean
  over steps 10-40) for the Gaussian drive, antithetic Gaussian pairs, a lattice of sparse
  impulses (one channel, every 5th entry: no patch sees two) at the default batch and at
  ``2 fan_in`` examples, and orthogonal designs of the whole input tensor (Haar rows and unit
  vectors over all C H W entries, antithetic).
* ``--part train``: digits, mlp 256-256, SGD lr 0.05 momentum 0.9, 15 epochs, 3 seeds: bp, and
  ``wm`` with the Gaussian and the coordinate drive: test error and angle(B, W) at the end.

    python benchmarks/wm_plateau.py --part cost       # ~4 min of one core
    python benchmarks/wm_plateau.py --part layer
    python benchmarks/wm_plateau.py --part conv
    python benchmarks/wm_plateau.py --part train      # digits: does an exact B change training?
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    Variant,
    ab_rounds,
    build_variant,
    choose_block,
    choose_rounds,
    make_optimizer,
    make_workload,
    train_and_score,
)
from torch import Tensor, nn

import asymprop
from asymprop.harness.plotting import panels, save_figure
from asymprop.mirror import WM

HERE = Path(__file__).resolve().parent
FIGURE = HERE.parent / "docs" / "figures" / "wm-plateau-cost.png"
DRIVES = ("gaussian", "orthogonal", "coordinate")
BUDGETS = (1.0, 0.5, 0.25, 0.1)


@dataclass
class Site:
    """A weight layer of the benchmark model: kind, fan-in and output positions per example."""

    kind: str  # "dense" or "conv"
    fan_in: int
    positions: int

    def batch(self, budget: float) -> int:
        """The mirror batch at ``budget`` times the default (``WM.noise_shape``'s formula)."""
        return max(2, math.ceil(budget * 2 * self.fan_in / self.positions))


def sites(work_base: nn.Module, inputs: Tensor) -> dict[str, Site]:
    """Each Linear/Conv2d of the model with its fan-in and output positions (one forward)."""
    found: dict[str, Site] = {}
    hooks = []
    for name, module in work_base.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):

            def hook(m: nn.Module, args: object, out: Tensor, name: str = name) -> None:
                if isinstance(m, nn.Conv2d):
                    fan = m.in_channels // m.groups * math.prod(m.kernel_size)
                    found[name] = Site("conv", fan, out.shape[-1] * out.shape[-2])
                else:
                    assert isinstance(m, nn.Linear)
                    found[name] = Site("dense", m.in_features, 1)

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        work_base(inputs[:2])
    for h in hooks:
        h.remove()
    return found


def label(drive: str, budget: float) -> str:
    return f"wm:drive={drive}:budget={budget:g}"


def wm_variant(
    base: nn.Module, layers: dict[str, Site], drive: str, budget: float, x: Tensor, y: Tensor
) -> Variant:
    model = copy.deepcopy(base)
    rules = {
        n: WM(warmup_steps=0, drive=drive, mirror_batch=s.batch(budget)) for n, s in layers.items()
    }
    if budget == 1.0:  # the default itself (the same batches: this checks the formula)
        rules = dict.fromkeys(layers, WM(warmup_steps=0, drive=drive))
    asymprop.convert(model, lambda name, layer: rules[name], seed=0)
    optimizer = make_optimizer(model)
    step = lambda: asymprop.train_step(model, optimizer, F.cross_entropy, x, y)  # noqa: E731
    return Variant(label(drive, budget), model, optimizer, step)


def plateau(model: nn.Module, settle: int = 20, average: int = 10) -> dict[str, float]:
    """Mean angle(B, W) per layer over ``average`` mirror steps after ``settle`` more."""
    asymprop.mirror(model, steps=settle)
    sums: dict[str, float] = {}
    for _ in range(average):
        asymprop.mirror(model, steps=1)
        for name, stats in asymprop.alignment(model).items():
            sums[name] = sums.get(name, 0.0) + stats["angle_deg"] / average
    return sums


def part_cost(models: list[str], budget_s: float, rounds: int) -> None:
    device = torch.device("cpu")
    rows = []
    print(f"load average at the start: {os.getloadavg()}")
    for name in models:
        work = make_workload(name, device)
        layers = sites(work.base, work.inputs)
        plain = build_variant(work, "plain")  # the lines of train_step, unconverted
        others = [
            wm_variant(work.base, layers, d, b, work.inputs, work.targets)
            for b in BUDGETS
            for d in DRIVES
        ]
        for v in [plain, *others]:
            for _ in range(2):
                v.step()
        block = choose_block(plain, device, 0.25)
        n = choose_rounds([plain, *others], block, device, budget_s, rounds)
        print(
            f"== {name}: {len(others)} wm variants, {n} A/B rounds of {block} step(s)", flush=True
        )
        start = time.process_time()
        timing = ab_rounds(plain, others, n, block, device)
        print(
            f"   timed in {time.process_time() - start:.0f} s CPU; plain "
            f"{timing.median('plain') * 1e3:.1f} ms/step",
            flush=True,
        )
        for v in others:
            drive, budget = v.label.split(":")[1][6:], float(v.label.split("=")[-1])
            angles = plateau(v.model)
            row = {
                "model": name,
                "drive": drive,
                "budget": budget,
                "batches": "/".join(str(s.batch(budget)) for s in layers.values()),
                "ratio": timing.ratio(v.label),
                "spread": timing.spread(v.label),
                "angles": angles,
                "kinds": {n: s.kind for n, s in layers.items()},
            }
            rows.append(row)
            print(format_row(row), flush=True)
    print(f"load average at the end: {os.getloadavg()}")
    print(
        "\n| model | drive | budget (x default) | mirror batch per layer | step time / plain "
        "| angle(B, W) per layer (deg) | mean dense | mean conv |"
    )
    print("|---|---|---:|---|---:|---|---:|---:|")
    for row in rows:
        print(format_row(row))
    figure(rows)


def kind_mean(row: dict, kind: str) -> float:
    values = [a for n, a in row["angles"].items() if row["kinds"][n] == kind]
    return statistics.fmean(values) if values else float("nan")


def format_row(row: dict) -> str:
    angles = "/".join(f"{a:.3g}" for a in row["angles"].values())
    conv = kind_mean(row, "conv")
    return (
        f"| {row['model']} | {row['drive']} | {row['budget']:g} | {row['batches']} | "
        f"{row['ratio']:.2f} ±{row['spread']:.2f} | {angles} | {kind_mean(row, 'dense'):.3g} | "
        + ("" if math.isnan(conv) else f"{conv:.3g}")
        + " |"
    )


def figure(rows: list[dict]) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = panels(1, len(models), 5.0, 4.0)
    styles = {
        "gaussian": ("tab:blue", "o"),
        "orthogonal": ("tab:red", "s"),
        "coordinate": ("tab:green", "^"),
    }
    for ax, model in zip(axes[0], models, strict=True):
        for kind, line in (("dense", "-"), ("conv", ":")):
            for drive in DRIVES:
                pts = [r for r in rows if r["model"] == model and r["drive"] == drive]
                ys = [max(kind_mean(r, kind), 1e-4) for r in pts]
                if all(math.isnan(v) for v in ys):
                    continue
                color, marker = styles[drive]
                ax.plot(
                    [r["ratio"] for r in pts],
                    ys,
                    line,
                    color=color,
                    marker=marker,
                    label=f"{drive}, {kind} layers",
                )
                for r, v in zip(pts, ys, strict=True):
                    ax.annotate(
                        f"{r['budget']:g}",
                        (r["ratio"], v),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(4, 3),
                    )
        ax.set_yscale("log")
        ax.set_xlabel("whole step time / plain PyTorch (1 thread)")
        ax.set_ylabel("angle(B, W) at the plateau, deg (mean over layers)")
        ax.set_title(
            f"{model}, W fixed: plateau vs cost (labels: budget x default;\n"
            "float rounding, < 1e-4 deg, drawn at 1e-4)",
            fontsize=9,
        )
        ax.axhline(3, color="grey", lw=0.5)
        ax.annotate(
            "3 deg",
            (ax.get_xlim()[0], 3),
            fontsize=7,
            color="grey",
            textcoords="offset points",
            xytext=(2, 2),
        )
        ax.legend(fontsize=7)
    save_figure(fig, FIGURE)
    print(f"wrote {FIGURE}")


# ------------------------------------------------------------------------- one dense layer


def part_layer(repeats: int = 15) -> None:
    """ms per mirror step of Linear(784, 1024) per drive at the default budget, interleaved."""
    layers = {}
    for drive in DRIVES:
        torch.manual_seed(0)
        layer = asymprop.convert(nn.Linear(784, 1024), "wm", seed=0, warmup_steps=0, drive=drive)
        asymprop.mirror(layer, steps=2)
        layers[drive] = layer
    times: dict[str, list[float]] = {d: [] for d in DRIVES}
    for r in range(repeats):
        for drive in DRIVES[r % 3 :] + DRIVES[: r % 3]:
            start = time.process_time()
            asymprop.mirror(layers[drive], steps=1)
            times[drive].append(time.process_time() - start)
    print("| drive | ms per mirror step (784 -> 1024, batch 1568) | angle(B, W) after it (deg) |")
    print("|---|---:|---:|")
    for drive in DRIVES:
        angle = asymprop.alignment(layers[drive])[""]["angle_deg"]
        print(f"| {drive} | {statistics.median(times[drive]) * 1e3:.1f} | {angle:.3g} |")


# ------------------------------------------------------------------------ convolutions


def conv_estimate(layer: nn.Module, x: Tensor, centred: bool) -> Tensor:
    """One mirror covariance of ``layer`` for the drive ``x`` (ReLU, bias blocked), as
    ``WM.mirror_layer`` computes it, divided by ReLU's mean slope 1/2 (so its mean is W)."""
    weight = layer.weight.detach()
    out = layer.weight_op(x, weight).relu_()
    out.sub_(out.mean(0, keepdim=True))
    samples = x.shape[0] if centred else x.shape[0] - 1
    total = layer.weight_grad(x, out)
    return total / (layer.pairs(list(x.shape)).clamp_min(1) * samples) / 0.5


def gaussian(shape: list[int], g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64)


def antithetic(shape: list[int], g: torch.Generator) -> Tensor:
    half = torch.randn([shape[0] // 2, *shape[1:]], generator=g, dtype=torch.float64)
    return torch.cat([half, -half])


def whole_tensor(shape: list[int], g: torch.Generator, haar: bool) -> Tensor:
    """Antithetic rows of an orthogonal design over all ``D = prod(shape[1:])`` input entries:
    Haar rows, or unit vectors (each entry driven alone); ``shape[0] = 2 D`` makes it exact."""
    d = math.prod(shape[1:])
    if haar:
        q, r = torch.linalg.qr(torch.randn((d, d), generator=g, dtype=torch.float64))
        rows = q * torch.sign(torch.diagonal(r))
    else:
        rows = torch.eye(d, dtype=torch.float64)[torch.randperm(d, generator=g)]
    half = rows[: shape[0] // 2].mul(math.sqrt(d)).reshape(-1, *shape[1:])
    return torch.cat([half, -half])


def lattice(shape: list[int], g: torch.Generator, spacing: int = 5) -> Tensor:
    """Antithetic sparse impulses: each example drives one channel at every ``spacing``-th entry
    (rows and columns from a random offset), ``spacing >= `` the kernel's extent so no patch sees
    two; the ``C spacing^2`` (channel, offset) combinations in a random order. All of them (``2 C
    spacing^2 = 2 fan_in`` examples) drive every entry once: exact, as the whole-tensor design."""
    channels = shape[1]
    combos = [(c, i, j) for c in range(channels) for i in range(spacing) for j in range(spacing)]
    order = torch.randperm(len(combos), generator=g).tolist()
    half = torch.zeros([shape[0] // 2, *shape[1:]], dtype=torch.float64)
    for n in range(half.shape[0]):
        c, i, j = combos[order[n % len(combos)]]
        half[n, c, i::spacing, j::spacing] = math.sqrt(channels * spacing**2)
    return torch.cat([half, -half])


def part_conv(steps: int = 40) -> None:
    torch.manual_seed(0)
    layer = asymprop.convert(nn.Conv2d(20, 50, 5).double(), "fa", seed=0)
    weight = layer.weight.detach()
    fan_in, positions, shape = 500, 64, [0, 20, 12, 12]
    default = max(2, math.ceil(2 * fan_in / positions))  # 16 examples, 1024 pairs per weight
    d = math.prod(shape[1:])
    c = 2 - 2 / math.pi
    print(
        "| drive | mirror batch | pairs per weight | one estimate (decay 1), deg | plateau "
        "(decay 0.5), deg | independent-pairs formula, deg |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    cases = [
        ("gaussian", default, gaussian, False),
        ("antithetic gaussian", default, antithetic, True),
        ("gaussian", 4 * default, gaussian, False),
        ("antithetic gaussian", 4 * default, antithetic, True),
        ("impulse lattice (spacing 5), antithetic", default, lattice, True),
        ("impulse lattice (spacing 5), antithetic", 2 * fan_in, lattice, True),
        ("whole-tensor Haar rows, antithetic", 2 * d, lambda s, g: whole_tensor(s, g, True), True),
        (
            "whole-tensor unit vectors, antithetic",
            2 * d,
            lambda s, g: whole_tensor(s, g, False),
            True,
        ),
    ]
    for name, batch, draw, centred in cases:
        g = torch.Generator().manual_seed(1)
        one = asymprop.angle_deg(
            conv_estimate(layer, draw([batch, *shape[1:]], g), centred), weight
        )
        expensive = batch > 2 * fan_in
        angles, b = [], torch.zeros_like(weight)
        for t in range(2 if expensive else steps):
            b = 0.5 * b + 0.5 * conv_estimate(layer, draw([batch, *shape[1:]], g), centred)
            if expensive or t >= 10:
                angles.append(asymprop.angle_deg(b, weight))
        tail = angles[-1] if expensive else statistics.fmean(angles)
        pred = math.degrees(math.atan(math.sqrt(c * fan_in * 0.5 / (1.5 * batch * positions))))
        print(
            f"| {name} | {batch} | {batch * positions} | {one:.3g} | {tail:.3g} | {pred:.3g} |",
            flush=True,
        )


# ------------------------------------------------------------------------ training


def part_train(seeds: int = 3, epochs: int = 15) -> None:
    """Does an exact B change training? digits, mlp 256-256 (ReLU), SGD lr 0.05, momentum 0.9
    (the setting where B's lag decides stability, docs/rules.md), batch 64; bp, ``wm`` with the
    Gaussian drive and with the coordinate drive (other options default); test error % and the
    mean angle(B, W) at the end, mean +- s.e. over seeds."""
    from asymprop.harness.data import load_dataset
    from asymprop.harness.models import build_model

    ds = load_dataset("digits")
    x, y = ds.train.tensors  # type: ignore[attr-defined]
    xt, yt = ds.test.tensors  # type: ignore[attr-defined]
    print("| rule | test error % | mean angle(B, W) deg | CPU s |")
    print("|---|---|---|---:|")
    for rule, options in (
        ("bp", {}),
        ("wm", {"drive": "gaussian"}),
        ("wm", {"drive": "coordinate"}),
    ):
        errors, angles, start = [], [], time.process_time()
        for seed in range(seeds):
            torch.manual_seed(seed)
            net = build_model("mlp", tuple(x.shape[1:]), 10, widths=[256, 256])
            model = asymprop.convert(net, rule, seed=seed, **options)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            error, angle = train_and_score(model, opt, (x, y), (xt, yt), epochs, seed)
            errors.append(error)
            angles.append(angle)
        cells = [
            f"{statistics.fmean(v):.3g} +- {statistics.stdev(v) / len(v) ** 0.5:.2g}"
            for v in (errors, angles)
        ]
        name = rule + "".join(f", {k}={v}" for k, v in options.items())
        print(
            f"| {name} | {cells[0]} | {cells[1]} | {time.process_time() - start:.0f} |", flush=True
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=["cost", "layer", "conv", "train"], default="cost")
    p.add_argument("--models", nargs="+", default=["mlp", "liao-mnist"])
    p.add_argument("--budget", type=float, default=90, help="seconds of A/B rounds per model")
    p.add_argument("--rounds", type=int, default=8, help="most A/B rounds per model")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if args.part == "cost":
        part_cost(args.models, args.budget, args.rounds)
    elif args.part == "layer":
        part_layer()
    elif args.part == "train":
        part_train()
    else:
        part_conv()


if __name__ == "__main__":
    main()
