"""One long fixed-W fit (004 App. B; docs/REPRODUCTION.md item 4b): does the output layer's
relative error keep falling as 1/sqrt(steps) past the item's 20000 steps?

    python benchmarks/lansdell_fixed_w_long.py --seed 0 --steps 100000

The item's own set-up (``lansdell-fixed-w.yaml``: all Fashion-MNIST training images, batch 32,
gamma 0.1, the authors' initialisation, c_h 0.01, the 784-50-20-10 sigmoid net), only longer;
prints the per-layer relative error and delta angle every ``--every`` steps. Prediction written
before the first run (2026-12-02): from 0.086 at 20000 steps, about 0.054 at 50000 and 0.038 at
100000 if the error falls as 1/sqrt(steps).
"""

from __future__ import annotations

import argparse
import time

import torch

from asymprop.harness.data import load_dataset
from asymprop.harness.papers.lansdell import _lansdell_fixed
from asymprop.harness.reproduce import item_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--every", type=int, default=10000)
    parser.add_argument("--noise", type=float, default=0.01, help="c_h")
    args = parser.parse_args()
    config = item_config("lansdell-fixed-w")
    config.update(steps=args.steps, log_every=args.every)
    data = load_dataset(config["data"], train_size=config["train_size"])
    x, y = data.train.tensors  # type: ignore[attr-defined]
    x_test, y_test = data.test.tensors  # type: ignore[attr-defined]
    torch.set_num_threads(1)
    started = time.perf_counter()
    curve = _lansdell_fixed(
        config, (50, 20), args.noise, args.seed, x, y, (x_test[:256], y_test[:256])
    )
    print("| step | rel. error (2 / 3) | delta angle (deg, 2 / 3) |\n| --- | --- | --- |")
    for row in curve:
        print(
            f"| {row['step']} | {row['rel_error/2']:.3f} / {row['rel_error/3']:.4f} | "
            f"{row['delta_angle_deg/2']:.2f} / {row['delta_angle_deg/3']:.2f} |"
        )
    print(f"{time.perf_counter() - started:.0f} s (seed {args.seed}, c_h {args.noise:g})")


if __name__ == "__main__":
    main()
