"""The cost of drawing node perturbation's noise on a CPU: Gaussian against Rademacher draws
(the sub-Gaussian alternative 004's assumption A1 allows), for one resnet20 activation at
batch 128 (128 x 16 x 32 x 32), one thread, median of 20 (issue: learned feedback's cost).

    python benchmarks/noise_draw.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

SHAPE = (128, 16, 32, 32)


def median_ms(draw: Callable[[], torch.Tensor], repeats: int = 20) -> float:
    draw()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        draw()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    draws: dict[str, Callable[[], torch.Tensor]] = {
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


if __name__ == "__main__":
    main()
