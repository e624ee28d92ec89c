"""The ``asymprop`` command: ``train``, ``compare``, ``report`` and ``list``.

Settings come, later ones winning, from the defaults, a YAML file (``--config FILE`` or the
name of a packaged config, or of one in ``./experiments``), the flags, and trailing
``key=value`` overrides
(``asymprop compare --config digits-all-rules epochs=3 rule_options.brsf.flip=0.25``).

``asymprop train --resume DIR`` continues the run in DIR from its ``checkpoint.pt`` exactly as if
it had never stopped (``--epochs`` may be raised; settings that change the computation may not).

Under ``torchrun --nproc_per_node=N -m asymprop train ...`` each process trains on its share of
every global minibatch (``batch_size`` is the global batch), and only rank 0 writes files and
prints (docs/distributed.md). ``--strategy ddp`` (the default) holds the whole model on every
process (DistributedDataParallel); ``--strategy fsdp`` shards the parameters over the processes
(FSDP2's ``fully_shard``; checkpoints through ``torch.distributed.checkpoint``).

Exit codes:

* 0: done;
* 2: bad input (an unknown rule, model or dataset, a model that does not fit the data, a bad
  setting or rule option, a missing dataset, a missing or damaged checkpoint, an output folder
  that holds results, is in use or cannot be written): one line on stderr naming the valid
  choices or the fix, before any training; a full disk while writing a checkpoint too;
* 3: the run diverged (NaN or inf in the loss, a weight or a feedback weight, or a loss above
  ``explode_factor`` times its first): one line naming rule, step and layer; the last good
  checkpoint is kept;
* 130 (SIGINT, Ctrl-C) or 143 (SIGTERM): stopped after finishing the current step and writing
  a checkpoint; the message gives the ``--resume`` command. A second signal ends it at once
  (the checkpoint on disk stays whole: writes are atomic).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

__all__ = ["main"]

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130; SIGTERM gives 128 + 15 = 143

_PROG = "asymprop"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{self.prog}: error: {message} (see {self.prog} --help)")


class _BadInputError(Exception):
    """Input the user can fix; the message is one line."""


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    if _is_main_process():
        print(_one_line(message), file=sys.stderr)
    sys.exit(code)


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints."""
    return os.environ.get("RANK", "0") == "0"


def _one_line(message: str) -> str:
    """A multi-line message as one line: indented lines (a list of folders) joined by commas,
    other lines as sentences."""
    lines = [line.rstrip() for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    text, previous_indented = lines[0].strip(), False
    for line in lines[1:]:
        indented = line[:1].isspace()
        if indented:
            text += (", " if previous_indented else " ") + line.strip()
        else:
            text += (" " if text.endswith((".", ":", ";")) else ". ") + line.strip()
        previous_indented = indented
    return text


# --- parsing ------------------------------------------------------------------------------------


def _value(text: str) -> Any:
    """A command-line value: YAML scalars and lists (``0.25``, ``true``, ``[64, 64]``), and
    numbers YAML 1.1 reads as strings (``1e-3``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _key_value(text: str, what: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise _BadInputError(f"{what} expects KEY=VALUE, got {text!r}")
    return key.strip(), _value(value.strip())


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``rule_options.brsf.flip`` -> ``data["rule_options"]["brsf"]["flip"] = value``."""
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise _BadInputError(f"cannot set {dotted!r}: {key!r} is not a mapping")
        node = child
    node[last] = value


def _list(text: str) -> list[Any]:
    return [_value(part.strip()) for part in text.split(",") if part.strip()]


def _common(parser: argparse.ArgumentParser, *, one_run: bool) -> None:
    """Flags shared by ``train`` and ``compare``; all default to "not given"."""
    s = argparse.SUPPRESS
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of settings, or the name of a packaged config (asymprop list) or of one "
        "in ./experiments; flags override it",
    )
    parser.add_argument(
        "--data-dir",
        dest="data_dir",
        default=s,
        metavar="DIR",
        help="folder holding the dataset files (also $ASYMPROP_DATA)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        default=s,
        help="fetch a missing dataset from its canonical mirror",
    )
    parser.add_argument(
        "--train-size",
        dest="train_size",
        type=int,
        default=s,
        metavar="N",
        help="train on N examples drawn by the seed (default: all)",
    )
    parser.add_argument(
        "--test-size",
        dest="test_size",
        type=int,
        default=s,
        metavar="N",
        help="score on the first N test examples (default: all)",
    )
    parser.add_argument("--epochs", type=int, default=s, metavar="N")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=s, metavar="B")
    parser.add_argument("--lr", type=float, default=s, metavar="LR", help="learning rate")
    parser.add_argument(
        "--optimizer",
        default=s,
        metavar="NAME",
        help="sgd, nesterov, adam, adamw, bm1, bm2 or bm3 (Batch Manhattan)",
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=s,
        metavar="M",
        help="default 0.9 for sgd/nesterov/bm1-3, none for adam",
    )
    parser.add_argument("--weight-decay", dest="weight_decay", type=float, default=s, metavar="WD")
    parser.add_argument("--device", default=s, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument(
        "--amp", default=s, metavar="MODE", help="mixed precision on GPU: bf16, fp16 or none"
    )
    parser.add_argument(
        "--strategy",
        default=s,
        metavar="NAME",
        help="under torchrun: ddp (default; whole model on every process) or fsdp (parameters "
        "sharded over the processes, FSDP2)",
    )
    parser.add_argument(
        "--checkpoint-every",
        dest="checkpoint_every_steps",
        type=int,
        default=s,
        metavar="K",
        help="also write checkpoint.pt every K steps (default: after every epoch only)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=s,
        metavar="N",
        help="torch CPU threads (train: torch's default; compare: 1)",
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        default=s,
        help="also log to OUT/tensorboard (pip install tensorboard)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or epoch lines")
    rule_opt = "KEY=VALUE" if one_run else "[RULE.]KEY=VALUE"
    parser.add_argument(
        "--rule-opt",
        dest="rule_opt",
        action="append",
        default=[],
        metavar=rule_opt,
        help="a rule option, e.g. flip=0.25 (repeatable; see asymprop list)"
        + ("" if one_run else "; without RULE. it applies to every rule that has the option"),
    )
    parser.add_argument(
        "--model-opt",
        dest="model_opt",
        action="append",
        default=[],
        metavar="KEY=VALUE" if one_run else "[MODEL.]KEY=VALUE",
        help="a model option, e.g. widths=[64,64] or batchnorm=true (repeatable)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="any setting of the config file, dotted for nested ones (rule_options.flip=0.25)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="Train PyTorch models without weight transport, and compare the rules.",
        epilog="Run 'asymprop compare' with no arguments for the main job: every registered "
        "rule on the digits dataset, about a minute on a laptop, offline.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    s = argparse.SUPPRESS

    train = sub.add_parser(
        "train",
        help="train one run",
        description="Train one model with one feedback rule; writes config.yaml, metrics.csv "
        "(one row per epoch), checkpoint.pt and plots to --out "
        "(default runs/<rule>-<model>-<data>-seed<seed>).",
        epilog="Exit codes: 0 done, 2 bad input, 3 diverged (last good checkpoint kept), 130 "
        "SIGINT / 143 SIGTERM (checkpoint written after the current step; continue with "
        "--resume DIR). Under torchrun, batch_size is the global batch.",
    )
    train.add_argument("--rule", default=s, help="feedback rule (default bp; see asymprop list)")
    train.add_argument("--model", default=s, help="model (default mlp)")
    train.add_argument("--data", default=s, help="dataset (default digits)")
    train.add_argument("--seed", type=int, default=s)
    train.add_argument("--out", default=s, metavar="DIR", help="run directory")
    train.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its checkpoint.pt (--epochs may be raised)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in --out (removes only the files asymprop wrote there)",
    )
    _common(train, one_run=True)

    compare = sub.add_parser(
        "compare",
        help="run rules x models x datasets x seeds and summarise (no arguments: the main job)",
        description="Run the product of rules, models, datasets and seeds one after another; "
        "writes results.csv, summary.md, accuracy.png, loss.png and alignment.png to --out "
        "(default runs/compare; one that holds results needs --overwrite) and one run directory "
        "per run under OUT/runs. With "
        "no arguments: every registered rule on digits with a 64-128-128-10 MLP, Adam lr 1e-3, "
        "10 epochs, seed 0.",
    )
    compare.add_argument(
        "--rules",
        type=_list,
        default=s,
        metavar="R1,R2",
        help="rules, or 'all' (default: all registered rules)",
    )
    compare.add_argument(
        "--models", type=_list, default=s, metavar="M1,M2", help="models (default mlp)"
    )
    compare.add_argument(
        "--data", type=_list, default=s, metavar="D1,D2", help="datasets (default digits)"
    )
    compare.add_argument(
        "--seeds", type=_list, default=s, metavar="S1,S2", help="seeds (default 0)"
    )
    compare.add_argument(
        "--out", default=s, metavar="DIR", help="output directory (default runs/compare)"
    )
    compare.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a comparison already in --out (removes only the files asymprop wrote)",
    )
    _common(compare, one_run=False)

    report = sub.add_parser(
        "report",
        help="redraw the plots and summary of a compare or train directory",
        description="Redraw the plots and summary.md from the CSV files in DIR and print the "
        "summary table.",
    )
    report.add_argument("directory", metavar="DIR")

    sub.add_parser("list", help="list the rules (with their options), models, datasets, optimizers")

    reproduce = sub.add_parser(
        "reproduce",
        help="re-run the papers' experiments of docs/REPRODUCTION.md (asymprop.harness.reproduce)",
        description="Run the named reproduction items (all when none is named); same as "
        "python -m asymprop.harness.reproduce.",
    )
    reproduce.add_argument("items", nargs="*", metavar="NAME", help="items (default: all)")
    reproduce.add_argument("--quick", action="store_true", help="a reduced version of each")
    reproduce.add_argument(
        "--out", default="runs/reproduce", metavar="DIR", help="output folder (runs/reproduce)"
    )
    reproduce.add_argument(
        "--reuse", action="store_true", help="read back finished runs with the same settings"
    )
    reproduce.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the datasets' files are (as ASYMPROP_DATA): Fashion-MNIST for six items",
    )
    return parser


# --- settings -----------------------------------------------------------------------------------

_FLAGS_TRAIN = ("rule", "model", "data", "seed", "out")
_FLAGS_COMPARE = ("rules", "models", "data", "seeds", "out")
_FLAGS_SHARED = (
    "data_dir",
    "download",
    "train_size",
    "test_size",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "device",
    "amp",
    "strategy",
    "checkpoint_every_steps",
    "threads",
    "tensorboard",
)


def _config_file(name: str) -> Path:
    from .config import find_config

    try:
        return find_config(name)
    except FileNotFoundError as error:
        raise _BadInputError(str(error)) from None


def _settings(args: argparse.Namespace, flags: Sequence[str]) -> dict[str, Any]:
    """File < flags < key=value overrides, as one flat dict of settings."""
    from .records import read_yaml

    data: dict[str, Any] = {}
    if args.config:
        path = _config_file(args.config)
        data = read_yaml(path)
        if not data:
            raise _BadInputError(f"config file {path} is empty: it sets nothing")
    if "rule" in flags and "rules" in data:  # train with a comparison's file: one of its runs
        data = _one_run(data, args)
    for name in (*flags, *_FLAGS_SHARED):
        if name in args:
            data[name] = getattr(args, name)
    for text in args.overrides:
        key, value = _key_value(text, "an override")
        _set_dotted(data, key, value)
    return data


def _one_run(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The settings of one run of a comparison's config file, picked by ``--rule``, ``--model``,
    ``--data`` and ``--seed`` (each may be left out when the file names only one)."""
    from .compare import compare_config

    config = compare_config(data, f"config {args.config}")
    picked = {}
    for flag, axis, values in (
        ("rule", "rules", config.rule_names()),
        ("model", "models", config.models),
        ("data", "data", config.data),
        ("seed", "seeds", config.seeds),
    ):
        if flag in args:
            picked[flag] = getattr(args, flag)
        elif len(values) == 1 or flag == "seed":
            picked[flag] = values[0]
        else:
            choices = ", ".join(map(str, values))
            raise _BadInputError(
                f"config {args.config} compares {axis} {choices}: pick one with --{flag}"
            )
    rule, model = picked["rule"], picked["model"]
    return {
        **config.settings,
        **config.rule_settings.get(rule, {}),
        **picked,
        "rule_options": dict(config.rule_options.get(rule, {})),
        "model_options": dict(config.model_options.get(model, {})),
        "out": str(
            Path(config.out) / "runs" / f"{rule}-{model}-{picked['data']}-seed{picked['seed']}"
        ),
    }


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    data = _settings(args, _FLAGS_TRAIN)
    for text in args.rule_opt:
        key, value = _key_value(text, "--rule-opt")
        data.setdefault("rule_options", {})[key] = value
    for text in args.model_opt:
        key, value = _key_value(text, "--model-opt")
        data.setdefault("model_options", {})[key] = value
    return data


def _train_config(args: argparse.Namespace) -> Any:
    from .experiment import RunConfig, config_from_dict, resume_config

    data = _train_settings(args)
    if args.resume:
        if "out" in data:
            raise _BadInputError(
                f"--resume {args.resume} continues in that folder; leave out --out"
            )
        saved = resume_config(args.resume)
        for name in ("rule_options", "model_options"):  # merged into the saved ones
            if name in data:
                data[name] = {**getattr(saved, name), **data[name]}
        return resume_config(args.resume, data)
    source = f"config {args.config}" if args.config else "settings"
    if not args.config and data.get("model", "mlp") == "mlp" and "model_options" not in data:
        from .compare import MAIN_JOB_MODEL_OPTIONS  # the main job's model: train == compare

        data["model_options"] = dict(MAIN_JOB_MODEL_OPTIONS["mlp"])
    return config_from_dict(RunConfig, data, source)


def _compare_config(args: argparse.Namespace) -> Any:
    from ..rules import RULES
    from .compare import compare_config

    data = _settings(args, _FLAGS_COMPARE)
    config = compare_config(data, f"config {args.config}" if args.config else "settings")
    rules = config.rule_names()
    for text in args.rule_opt:
        key, value = _key_value(text, "--rule-opt")
        rule, _, option = key.rpartition(".")
        targets = [rule] if rule else [r for r in rules if r in RULES and _has_option(r, option)]
        if not targets:
            listing = "; ".join(
                f"{r}: {', '.join(_options(r)) or 'none'}" for r in rules if r in RULES
            )
            raise _BadInputError(
                f"--rule-opt {key}: no rule in this comparison has option {option!r} ({listing})"
            )
        for target in targets:
            config.rule_options.setdefault(target, {})[option] = value
    for text in args.model_opt:
        key, value = _key_value(text, "--model-opt")
        model, _, option = key.rpartition(".")
        for target in [model] if model else config.models:
            config.model_options.setdefault(target, {})[option] = value
    return config


def _options(rule: str) -> list[str]:
    import dataclasses

    from ..rules import RULES

    return [f.name for f in dataclasses.fields(RULES[rule])]


def _has_option(rule: str, option: str) -> bool:
    return option in _options(rule)


# --- commands -----------------------------------------------------------------------------------


def _bar(total: int, quiet: bool, desc: str, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        disable=quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
        leave=False,
    )


def _check(action: Any) -> Any:
    """Run ``action`` (config checks, data loading, model building): bad input exits 2."""
    from .data import DatasetNotFoundError
    from .experiment import ConfigError

    try:
        return action()
    except (_BadInputError, ConfigError, DatasetNotFoundError) as err:
        _fail(f"{_PROG}: error: {err}")
    except (ValueError, TypeError, ImportError) as err:  # the library's messages name the fix
        _fail(f"{_PROG}: error: {err}")


def _epoch_line(row: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}"]
    if math.isfinite(row["train_loss"]):
        parts.append(f"train loss {row['train_loss']:.4f}")
    parts.append(f"test loss {row['test_loss']:.4f}")
    if math.isfinite(row["test_accuracy"]):
        parts.append(f"test accuracy {100 * row['test_accuracy']:.2f}%")
    angles = [v for k, v in row.items() if k.startswith("angle_deg/") and math.isfinite(v)]
    if angles:
        parts.append(f"mean angle(B, W) {sum(angles) / len(angles):.1f} deg")
    return ", ".join(parts)


def _cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .experiment import CHECKPOINT, Interrupted, RunDivergedError, load_checkpoint, prepare
    from .experiment import train as train_run
    from .guard import StopSignals

    config = _check(lambda: _train_config(args))
    with _distributed(config.device) as info, contextlib.ExitStack() as folder:
        main = info is None or info.rank == 0
        quiet = args.quiet or not main
        if main:  # before any data is loaded: a folder it may write, and no one else's run
            claim = _folder(config.run_dir, "run", bool(args.resume), args.overwrite)
            _check(lambda: folder.enter_context(claim))
        run = _check(lambda: prepare(config, dist_info=info))
        out = config.run_dir
        if args.resume:
            _check(lambda: load_checkpoint(run, out / CHECKPOINT))
        total = run.steps_per_epoch() * config.epochs
        bar = _bar(total, quiet, config.rule, initial=min(run.step, total))

        def on_epoch(row: dict[str, Any]) -> None:
            if not quiet:
                bar.write(_epoch_line(row), file=sys.stderr)

        if not quiet:
            what = f"resuming {out} after step {run.step}" if args.resume else "training"
            world = f" on {info.world_size} processes" if info is not None else ""
            print(f"{what} {config.rule} on {config.model}/{config.data}{world} -> {out}",
                  file=sys.stderr)  # fmt: skip
            if run.epoch >= config.epochs:
                print(f"{out} has finished its {config.epochs} epochs; raise --epochs to train "
                      "further", file=sys.stderr)  # fmt: skip
        try:
            with bar, StopSignals() as stop:
                train_run(config, run=run, progress=bar, on_epoch=on_epoch, stop=stop)
        except RunDivergedError as err:
            kept = (
                f"the last good checkpoint is {out / CHECKPOINT} (step {run.saved_step})"
                if run.saved_step is not None
                else "no checkpoint was written"
            )
            _fail(
                f"{_PROG}: error: {err}; {kept}; start again with a smaller --lr, batch norm or "
                f"--optimizer bm1 (--overwrite replaces this run), or resume with: asymprop "
                f"train --resume {out} on_divergence=skip (back to the last checkpoint at a "
                "lower lr)",
                EXIT_DIVERGED,
            )
        except Interrupted as stopped:
            _fail(
                f"{_PROG}: {stopped}; checkpoint written to {out / CHECKPOINT}; continue with: "
                f"asymprop train --resume {out}",
                128 + stopped.signum,
            )
        except KeyboardInterrupt:
            _fail(f"{_PROG}: interrupted; finished epochs are in {out}", EXIT_INTERRUPTED)
        except CheckpointError as err:  # a write failed (full disk, I/O): nothing half-written
            _fail(f"{_PROG}: error: {err}")
    if main:
        files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name[0] != ".")
        print(f"wrote {out}: {', '.join(files)}")
    return 0


def _folder(out: Path, what: str, resume: bool, overwrite: bool) -> Any:
    from .folders import claim

    return claim(out, what=what, resume=resume, overwrite=overwrite)


@contextlib.contextmanager
def _distributed(device: str) -> Iterator[Any]:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` > 1), else None.

    ``device``: the run's setting; ``cpu`` trains on CPUs (gloo), anything else on
    ``cuda:LOCAL_RANK`` when CUDA is available (NCCL).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    import torch.distributed as dist

    from .distributed import init

    info = init(device="cpu" if device == "cpu" else None)
    try:
        yield info
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, plan

    started = time.perf_counter()
    config = _check(lambda: _compare_config(args))
    device = str(config.settings.get("device", "auto"))
    with _distributed(device) as info, contextlib.ExitStack() as stack:
        main = info is None or info.rank == 0
        quiet = args.quiet or not main
        cache: dict[tuple[Any, ...], Any] = {}
        world = info.world_size if info is not None else 1
        if main:
            claim = _folder(Path(config.out), "comparison", False, args.overwrite)
            _check(lambda: stack.enter_context(claim))
        runs = _check(lambda: plan(config, cache, world))
        if not quiet:
            print(
                f"comparing {len(runs)} runs: rules {', '.join(config.rule_names())}; models "
                f"{', '.join(config.models)}; data {', '.join(config.data)}; seeds "
                f"{', '.join(map(str, config.seeds))} -> {config.out}",
                file=sys.stderr,
            )
        bar = _bar(sum(steps for _, steps in runs), quiet, "compare")
        try:
            with bar:
                results, table = compare(
                    config, runs=runs, cache=cache, progress=bar, dist_info=info
                )
        except KeyboardInterrupt:
            _fail(
                f"{_PROG}: interrupted; finished runs are in {config.out}/results.csv",
                EXIT_INTERRUPTED,
            )
    if not main:
        return 0
    print(table, end="")
    out = Path(config.out)
    files = ", ".join(p.name for p in sorted(out.iterdir()) if p.is_file() and p.name[0] != ".")
    failed = sum(1 for r in results if r["status"] != "ok")
    note = f"; {failed} run(s) diverged" if failed else ""
    print(f"wrote {out}: {files} ({time.perf_counter() - started:.0f} s{note})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .compare import report

    started = time.time()
    table = _check(lambda: report(args.directory))
    print(table, end="")
    out = Path(args.directory)
    written = [
        p.name for p in sorted(out.iterdir()) if p.is_file() and p.stat().st_mtime >= started
    ]
    print(f"wrote {out}: {', '.join(written) or 'nothing'}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import dataclasses

    from ..optim import OPTIMIZERS
    from ..rules import RULES
    from .config import CONFIGS, named_configs
    from .data import list_datasets
    from .models import list_models, model_options
    from .records import read_yaml

    print("rules (--rule, --rule-opt KEY=VALUE):")
    for name, cls in RULES.items():
        options = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:10} {summary}" + (f"\n  {'':10} options: {options}" if options else ""))
    print("models (--model, --model-opt KEY=VALUE):")
    for name in list_models():
        options = ", ".join(f"{k}={v!r}" for k, v in model_options(name).items())
        print(f"  {name:14} {options}")
    print(f"datasets (--data): {', '.join(list_datasets())}")
    print(f"optimizers (--optimizer): {', '.join(OPTIMIZERS)}")
    print(f"named configs (--config NAME; packaged in {CONFIGS}):")
    for name in named_configs():
        path = CONFIGS / f"{name}.yaml"
        print(f"  {name:30} {_config_summary(read_yaml(path)) or _first_comment(path)}")
    return 0


def _first_comment(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next((line.lstrip("# ").strip() for line in lines if line.startswith("#")), "")


def _config_summary(config: Any) -> str:
    """One line about a named config: what it compares or runs."""
    if not isinstance(config, dict):
        return ""
    parts = []
    for key in ("rules", "rule", "model", "models", "data", "epochs"):
        value = config.get(key)
        if value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{key}={text}")
    return " ".join(parts)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import main as reproduce_main  # matplotlib and the suite only when asked

    argv = [
        "--out",
        args.out,
        *(["--quick"] if args.quick else []),
        *(["--reuse"] if args.reuse else []),
        *(["--data-dir", args.data_dir] if args.data_dir else []),
    ]
    return reproduce_main([*argv, *(["--only", *args.items] if args.items else [])])


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parse_args``, but ``key=value`` overrides may also come after flags
    (``asymprop train --lr 0.1 epochs=3 --quiet threads=1``)."""
    args, extras = parser.parse_known_args(argv)
    unknown = [e for e in extras if e.startswith("-") or "=" not in e]
    if unknown or (extras and "overrides" not in args):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extras)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asymprop`` command; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    parser = _build_parser()
    commands = {
        "train": _cmd_train,
        "compare": _cmd_compare,
        "report": _cmd_report,
        "list": _cmd_list,
        "reproduce": _cmd_reproduce,
    }
    try:
        args = _parse(parser, argv)
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        return commands[args.command](args)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
