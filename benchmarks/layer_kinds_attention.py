"""What feedback in ``nn.MultiheadAttention`` costs: step and inference times against plain torch.

Rows (median process CPU seconds over ``--repeats`` timed calls after warm-up, robust to other
jobs on a shared machine when run on one thread; and the ratio to plain):

* ``encoder train``: a ``nn.TransformerEncoder`` training step (forward + backward): plain
  torch, and converted with ``bp``, ``fa``, ``kp``.
* ``decoder train``: the same for ``nn.TransformerDecoder``, whose cross-attention runs the
  packed ``in_proj`` once on query and memory side by side (2x the in-projection's products:
  the price of one call per layer, which ``np`` and ``dfa`` need).
* ``encoder eval``: inference without grad. Plain torch takes its fused kernel
  (``torch._transformer_encoder_layer_fwd``); a converted model stays on the Python path, so
  that every rule sees its feedback layers run.

Run (CPU, one thread, about a minute)::

    python benchmarks/layer_kinds_attention.py --threads 1

All numbers are measured by this script; ``--quick`` shrinks the models and repeats. One run
of the defaults (one thread of a shared 2-core machine, 10 repeats): encoder train 0.92-0.94x,
decoder train 1.17-1.18x, encoder eval 1.13-1.14x for bp, fa and kp.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import asymprop
import asymprop.attention  # registers nn.MultiheadAttention with convert

RULES = ["bp", "fa", "kp"]


def median_seconds(fns: list[Callable[[], object]], repeats: int, warmup: int = 5) -> list[float]:
    """Median CPU seconds of each function, timed in turn (drifts of the machine hit all)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seen in zip(fns, times, strict=True):
            start = time.process_time()
            fn()
            seen.append(time.process_time() - start)
    return [statistics.median(seen) for seen in times]


def train_step(model: nn.Module, inputs: tuple[Tensor, ...]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(*inputs).square().mean().backward()

    return step


def inference(model: nn.Module, inputs: tuple[Tensor, ...]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(*inputs)

    return run


def models(width: int, layers: int) -> dict[str, nn.Module]:
    heads, ff = max(2, width // 32), 4 * width
    encoder_layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
    decoder_layer = nn.TransformerDecoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
    return {
        "encoder": nn.TransformerEncoder(encoder_layer, layers),
        "decoder": nn.TransformerDecoder(decoder_layer, layers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="small models, few repeats")
    args = parser.parse_args()
    if args.quick:
        args.width, args.layers, args.seq, args.repeats = 64, 2, 16, 5
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.width)
    memory = torch.randn(args.batch, args.seq, args.width)
    plain = models(args.width, args.layers)
    cases = [
        ("encoder train", "encoder", (x,), train_step, True),
        ("decoder train", "decoder", (x, memory), train_step, True),
        ("encoder eval", "encoder", (x,), inference, False),
    ]
    print(
        f"width {args.width}, {args.layers} layers, batch {args.batch}, sequence {args.seq}, "
        f"{args.threads} thread(s), median of {args.repeats}\n"
    )
    print("| case | plain (ms) | " + " | ".join(f"{r} (ms, x plain)" for r in RULES) + " |")
    print("|---|---:|" + "---:|" * len(RULES))
    for label, kind, inputs, make, training in cases:
        base = plain[kind].train(training)
        converted = [
            asymprop.convert(copy.deepcopy(base), rule, seed=0).train(training) for rule in RULES
        ]
        reference, *seconds = median_seconds(
            [make(model, inputs) for model in (base, *converted)], args.repeats
        )
        cells = [f"{1e3 * s:.1f} ({s / reference:.2f}x)" for s in seconds]
        print(f"| {label} | {1e3 * reference:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
