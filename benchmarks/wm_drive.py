"""Weight mirrors' plateau against cost: the Gaussian drive (the paper's) and the orthogonal
antithetic drive, at fractions of the default mirror budget (issue: learned feedback's cost).

For one dense layer (784 -> 1024, the mlp benchmark's first layer) with W fixed: B's angle to W
after 30 mirror steps at the default decay 0.5 (the plateau), and the time of one mirror step
(process CPU time, median of 20, one thread), per drive and per mirror batch (the default
``2 fan_in`` examples and fractions of it).

    python benchmarks/wm_drive.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import asymprop


def measure(drive: str, fraction: float, fan_in: int = 784, out: int = 1024) -> tuple[float, float]:
    torch.manual_seed(0)
    batch = max(2, round(2 * fan_in * fraction))
    layer = asymprop.convert(
        nn.Linear(fan_in, out), "wm", seed=0, warmup_steps=0, drive=drive, mirror_batch=batch
    )
    asymprop.mirror(layer, steps=30)
    angle = asymprop.alignment(layer)[""]["angle_deg"]
    times = []
    for _ in range(20):
        start = time.process_time()
        asymprop.mirror(layer, steps=1)
        times.append(time.process_time() - start)
    return angle, statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    print("| drive | mirror batch (x default 2 fan_in) | angle(B, W) after 30 steps (deg) "
          "| ms per mirror step |")  # fmt: skip
    print("| --- | --- | --- | --- |")
    for drive in ("gaussian", "orthogonal"):
        for fraction in (1.0, 0.5, 0.1):
            angle, ms = measure(drive, fraction)
            print(f"| {drive} | {fraction:g} | {angle:.3g} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
