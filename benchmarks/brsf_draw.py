"""brsf's fast draw (15-bit grid, copysign) against the exact one (uniform_ times sign(W)):
does the cheaper draw change accuracy or alignment? (issue: learned feedback's cost, goal 3)

Per dataset, 3 seeds per draw, the harness's models and data, Adam lr 1e-3, batch 64, one
thread: test error (mean +- s.e. over seeds) and the mean angle(B, W) over layers at the end.

* digits: the mlp (256-256), 30 epochs of the 1437 training digits;
* fashion-mnist: the liao-mnist CNN with batch norm, 2 epochs (needs
  ``apt-get install dataset-fashion-mnist``).

    python benchmarks/brsf_draw.py
"""

from __future__ import annotations

import statistics
import time

import torch
from harness import train_and_score

import asymprop
from asymprop.harness.data import load_dataset
from asymprop.harness.models import build_model

SETTINGS = {
    "digits": ("mlp", {"widths": [256, 256]}, 30),
    "fashion-mnist": ("liao-mnist", {"batchnorm": True}, 2),
}


def run(data: str, draw: str, seed: int) -> tuple[float, float]:
    model_name, options, epochs = SETTINGS[data]
    ds = load_dataset(data)
    x, y = ds.train.tensors  # type: ignore[attr-defined]
    xt, yt = ds.test.tensors  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    net = build_model(model_name, tuple(x.shape[1:]), 10, **options)
    model = asymprop.convert(net, "brsf", seed=seed, draw=draw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return train_and_score(model, opt, (x, y), (xt, yt), epochs, seed)


def _mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / len(values) ** 0.5
    return f"{statistics.fmean(values):.2f} +- {se:.2f}"


def main() -> None:
    torch.set_num_threads(1)
    print("| data | draw | test error % | mean angle(B, W) deg | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for data in SETTINGS:
        for draw in ("exact", "fast"):
            start = time.perf_counter()
            results = [run(data, draw, seed) for seed in (0, 1, 2)]
            errors, angles = [r[0] for r in results], [r[1] for r in results]
            seconds = time.perf_counter() - start
            print(f"| {data} | {draw} | {_mean_se(errors)} | {_mean_se(angles)} | {seconds:.0f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
