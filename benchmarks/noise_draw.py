"""Node perturbation's noise: Gaussian against Rademacher (the sub-Gaussian alternative 004's
assumption A1 allows; ``np`` option ``noise``), cost and quality (issue: learned feedback's cost).

* ``--part cost``: the time of one draw for a resnet20 activation at batch 128
  (128 x 16 x 32 x 32), one thread, median of 20, including asymprop's two draws;
* ``--part quality``: the estimator at equal steps, Lansdell's fixed-W set-up on digits: an MLP
  64-100-50-10 (ReLU), W fixed (warm-up for ever), ``np`` with SGD fit and ridge fit, 300 steps
  of batch 64, 3 seeds: per layer, B's relative error to W and the delta angle afterwards.

    python benchmarks/noise_draw.py --part cost
    python benchmarks/noise_draw.py --part quality
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import asymprop
from asymprop.harness.data import load_dataset
from asymprop.perturbation import gaussian_noise, rademacher_noise

SHAPE = (128, 16, 32, 32)


def median_ms(draw: Callable[[], torch.Tensor], repeats: int = 20) -> float:
    draw()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        draw()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cost() -> None:
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    draws: dict[str, Callable[[], torch.Tensor]] = {
        "asymprop gaussian_noise": lambda: gaussian_noise(SHAPE, gen, cpu, torch.float32),
        "asymprop rademacher_noise": lambda: rademacher_noise(SHAPE, gen, cpu, torch.float32),
        "gaussian: torch.randn": lambda: torch.randn(SHAPE, generator=gen),
        "rademacher: bernoulli_(0.5) * 2 - 1": lambda: (
            torch.empty(SHAPE).bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
        ),
        "rademacher: randint(0, 2) * 2 - 1": lambda: (
            torch.randint(0, 2, SHAPE, generator=gen, dtype=torch.float32).mul_(2).sub_(1)
        ),
        "rademacher: sign(rand - 0.5)": lambda: torch.rand(SHAPE, generator=gen).sub_(0.5).sign_(),
    }
    print(f"torch {torch.__version__}, one thread, {SHAPE}")
    print("| draw | ms |")
    print("| --- | --- |")
    for name, draw in draws.items():
        print(f"| {name} | {median_ms(draw):.1f} |", flush=True)


def quality() -> None:
    ds = load_dataset("digits")
    x, y = ds.train.tensors  # type: ignore[attr-defined]
    x = x.flatten(1)
    print("| fit | noise | rel. error of B, layers 2 / 4 | delta angle, layers 2 / 4 |")
    print("| --- | --- | --- | --- |")
    for fit in ("sgd", "ridge"):
        for noise in ("gaussian", "rademacher"):
            rel: list[list[float]] = []
            delta: list[list[float]] = []
            for seed in (0, 1, 2):
                torch.manual_seed(seed)
                net = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 50), nn.ReLU(),
                                    nn.Linear(50, 10))  # fmt: skip
                model = asymprop.convert(net, "np", seed=seed, fit=fit, noise=noise,
                                         warmup_steps=10**9, lr_b=1e-3)  # fmt: skip
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                gen = torch.Generator().manual_seed(seed)
                for _ in range(300):
                    idx = torch.randint(0, len(x), (64,), generator=gen)
                    asymprop.train_step(model, opt, F.cross_entropy, x[idx], y[idx])
                stats = asymprop.alignment(model)
                angles = asymprop.delta_alignment(model, F.cross_entropy, x[:256], y[:256])
                rel.append([stats[name]["rel_error"] for name in ("2", "4")])
                delta.append([angles[name] for name in ("2", "4")])
            mean = [statistics.fmean(v) for v in zip(*rel, strict=True)]
            angle = [statistics.fmean(v) for v in zip(*delta, strict=True)]
            print(f"| {fit} | {noise} | {' / '.join(f'{v:.3f}' for v in mean)} | "
                  f"{' / '.join(f'{v:.1f}' for v in angle)} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cost", "quality"], default="cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cost() if args.part == "cost" else quality()


if __name__ == "__main__":
    main()
