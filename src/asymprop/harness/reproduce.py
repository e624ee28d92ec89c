"""The papers' claims, re-measured: one named experiment per claim, its table and its figure.

    python -m asymprop.harness.reproduce                      # every item (docs/REPRODUCTION.md)
    python -m asymprop.harness.reproduce --quick              # a reduced version of every item
    python -m asymprop.harness.reproduce --only liao-digits   # one item
    python -m asymprop.harness.reproduce --reuse              # train only what this code has not

Each item reads its packaged config ``asymprop/harness/configs/<item>.yaml`` (its ``quick:``
section overrides the rest under ``--quick``), trains its runs one after another on one thread
each, and writes to ``<out>/<item>/``: ``results.csv`` (one row per run), ``table.md`` (the
report's table, mean ± s.e. over seeds) and its figures (PNG, also copied to ``docs/figures/``
for a full run from a checkout).

| item | paper | what |
| --- | --- | --- |
| ``akrout-fashion-mnist`` | 001 a-f, 000 C-D | BP, FA, SS, WM, KP; WM's paper settings, C.2, C.4 |
| ``akrout-fashion-mnist-cnn`` | 001 a-f | the same with Liao's MNIST CNN, BN both ways |
| ``akrout-fashion-mnist-resnet20`` | 001 a-f | the same with a 20-layer ResNet |
| ``akrout-resnet20-bn-feedback`` | 000 App. D.3 | BN's full backward against gamma/sigma only |
| ``akrout-kp-long`` | 001 c-f | KP trained long at the paper's lr x weight decay |
| ``akrout-wm-conv`` | 000 App. B | WM's plateau per conv layer, predicted and measured |
| ``liao-digits`` | 002 Tables 2-5, C2 | sign-concordant, random feedback, BN, BM, clamped layers |
| ``liao-fashion-mnist`` | 002 Tables 2, 4 | the same tables on Fashion-MNIST |
| ``liao-fashion-mnist-cnn`` | 002 Table 2 | Table 2 with their MNIST CNN |
| ``liao-mnist1d`` | 002 Table 2, C1 | Table 2 and random feedback on MNIST-1D |
| ``liao-bm-sweep`` | 002 (VI) | Batch Manhattan against training-set size and batch size |
| ``lansdell-mlp`` | 004 Fig. 2 | NP (five noise levels) vs FA vs BP, 784-50-20-10 sigmoid MSE net |
| ``lansdell-fixed-w`` | 004 App. B, Fig. 4 | NP's ridge fit of B for a fixed W; 784-N-50-10 |
| ``lansdell-autoencoder`` | 004 Table 2a, Fig. 3 | the bottleneck autoencoder, searched |
| ``crafton-fashion-mnist`` | 004 Table 1, 2b | BP, DFA, NP, SG (DFA-shaped), noise ablation |
| ``feedback-convergence`` | 003 eq. 14, 000 eq. 21 | KP's B - W decay, WM's mirror mode: theory |
| ``study-vit-fashion-mnist`` | beyond the seeds | every rule in a small ViT, verdicts vs criteria |
| ``study-mnist1d-sequence`` | beyond the seeds | the same for a conv1d, a transformer and a GRU |

Every item's config states its claims and their criteria (``claims:``, judged by
:mod:`asymprop.harness.papers.verdicts`; the study items' ``criteria:``) before its runs.

Each paper's items live in :mod:`asymprop.harness.papers` (one module per paper); this module
registers them (:data:`ITEMS`), runs them and writes their tables.
Classification items use the ordinary run loop (:func:`asymprop.harness.experiment.train`);
the Lansdell items and KP's convergence measure every few steps, with MSE losses and the
papers' batching, so they share one small loop on :func:`asymprop.train_step`
(:func:`asymprop.harness.papers.common.train_steps`, whose docstring says why).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import CONFIGS
from .data import ENV_VAR, DatasetNotFoundError
from .papers import collect_items
from .papers.common import ItemResult
from .papers.liao import liao_best, liao_entry
from .papers.study import layer_group, study, study_verdict, study_verdicts
from .records import read_yaml, write_csv

__all__ = [
    "ITEMS",
    "ItemResult",
    "item_config",
    "layer_group",
    "liao_best",
    "liao_entry",
    "main",
    "run_item",
    "study",
    "study_verdict",
    "study_verdicts",
]

FIGURES = Path("docs") / "figures"
"""Where the figures of docs/REPRODUCTION.md live, relative to a checkout (the working folder)."""


def item_config(name: str, quick: bool = False) -> dict[str, Any]:
    """The packaged config ``<name>.yaml``, its ``quick:`` section merged over it if ``quick``."""
    path = CONFIGS / f"{name}.yaml"
    config = read_yaml(path)
    overrides = config.pop("quick", {}) or {}
    if quick:
        config.update(overrides)
    return config


# --- the suite ------------------------------------------------------------------------------------

ITEMS: dict[str, Callable[[str, dict[str, Any], Path], ItemResult]] = collect_items()
"""Item name -> its function; the config is the packaged ``configs/<name>.yaml``. Each paper's
module in :mod:`asymprop.harness.papers` declares its own ``ITEMS``; they are run in the order of
:data:`asymprop.harness.papers.PAPERS`."""


def run_item(
    name: str,
    quick: bool = False,
    out: str | Path = "runs/reproduce",
    figures: Path | None = None,
    reuse: bool = False,
) -> ItemResult:
    """Run one item; write ``results.csv``, ``table.md`` and figures to ``out/<name>/``.

    ``figures``: also copy the figures there (``docs/figures`` for the report). ``reuse``: runs
    of the items built on the run loop that already finished in ``out`` with the same settings and
    by the same code (:func:`~asymprop.harness.papers.common.finished_rows`) are read back instead
    of trained again (adding seeds or table entries trains only the new runs).
    """
    if name not in ITEMS:
        raise ValueError(f"unknown item {name!r}; valid: {', '.join(ITEMS)}")
    config = item_config(name, quick)
    config["reuse"] = reuse
    directory = Path(out) / name
    directory.mkdir(parents=True, exist_ok=True)
    result = ITEMS[name](name, config, directory)
    write_csv(directory / "results.csv", result.rows)
    command = f"python -m asymprop.harness.reproduce --only {name}" + (" --quick" if quick else "")
    (directory / "table.md").write_text(
        f"{result.table}\n\nWall time: {result.seconds:.0f} s (`{command}`)\n"
    )
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        for path in result.figures:
            shutil.copy(path, figures / path.name)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m asymprop.harness.reproduce [--quick] [--only ITEM ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m asymprop.harness.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a reduced version of every item")
    parser.add_argument("--only", nargs="+", choices=list(ITEMS), help="run these items only")
    parser.add_argument("--out", default="runs/reproduce", help="output folder")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read back runs that already finished with the same settings and the same code "
        "(asymprop's version and source hash, in each run's code.yaml) instead of training them "
        "again (the items built on the run loop: Akrout, Liao, study)",
    )
    parser.add_argument(
        "--no-figures",
        action="store_true",
        help="do not copy figures to docs/figures (always so under --quick, and outside a "
        "checkout of asymprop)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the datasets' files are (sets ASYMPROP_DATA): the Fashion-MNIST items need "
        "its IDX files (Debian: apt-get install dataset-fashion-mnist)",
    )
    args = parser.parse_args(argv)
    if args.data_dir:
        os.environ[ENV_VAR] = args.data_dir
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("asymprop.harness.experiment").setLevel(logging.WARNING)
    # figures are copied into docs/figures only when run from a checkout (docs/REPRODUCTION.md)
    in_checkout = (FIGURES.parent / "REPRODUCTION.md").is_file()
    figures = None if (args.quick or args.no_figures or not in_checkout) else FIGURES
    names = args.only or list(ITEMS)
    started = time.perf_counter()
    for name in names:
        try:
            result = run_item(name, args.quick, args.out, figures, args.reuse)
        except DatasetNotFoundError as error:
            dataset = str(error).split("'")[1] if "'" in str(error) else "its dataset"
            print(
                f"asymprop reproduce: error: item {name!r} needs {dataset!r}, which is not on "
                f"this machine: pass --data-dir DIR (the folder of its files, or of a "
                f"'{dataset}' folder), set {ENV_VAR}=DIR, or on Debian apt-get install "
                f"dataset-{dataset}",
                file=sys.stderr,
            )
            return 2
        print(f"## {name} ({result.seconds:.0f} s)\n\n{result.table}\n", flush=True)
    where = f"{args.out}/" + ("ITEM" if len(names) > 1 else names[0])
    copied = f"; figures copied to {figures}" if figures is not None else ""
    print(
        f"reproduce: {len(names)} item(s) in {time.perf_counter() - started:.0f} s; tables, "
        f"results.csv and figures in {where}/{copied}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
