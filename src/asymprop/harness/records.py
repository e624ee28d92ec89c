"""What a run leaves on disk, and the tables made from it: CSV and YAML files, mean +- s.e.

Files (all plain text, readable without asymprop):

* ``metrics.csv`` -- one row per epoch of one run (``epoch`` 0 is the model before training);
  columns in :data:`METRIC_COLUMNS` order, then per converted layer ``angle_deg/<layer>``,
  ``sign_concordance/<layer>``, ``rel_error/<layer>`` and ``delta_angle_deg/<layer>``.
* ``results.csv`` -- one row per run of a comparison: :data:`RESULT_COLUMNS`, then the final
  per-layer columns of its ``metrics.csv``.
* ``config.yaml`` -- the run's or comparison's settings, readable by ``--config``.
* ``code.yaml`` -- the code that made a run: asymprop's version and a hash of its source
  (:func:`code_identity`); ``reproduce --reuse`` reads back only runs of the same code.

Numbers are written with ``repr`` (exact round trip); a missing value is ``nan``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from .folders import user_mode

__all__ = [
    "LAYER_METRICS",
    "METRIC_COLUMNS",
    "RESULT_COLUMNS",
    "append_row",
    "code_identity",
    "format_mean_se",
    "format_values",
    "layer_columns",
    "layers_of",
    "mean_se",
    "read_csv",
    "read_yaml",
    "summarize",
    "summary_table",
    "write_csv",
    "write_yaml",
]

METRIC_COLUMNS = ("epoch", "step", "train_loss", "test_loss", "test_accuracy", "seconds")
"""The leading columns of ``metrics.csv``; ``seconds`` is the wall time of that epoch."""

LAYER_METRICS = ("angle_deg", "sign_concordance", "rel_error", "delta_angle_deg")
"""Per-layer columns, each written ``<metric>/<layer qualified name>``."""

RESULT_COLUMNS = (
    "rule",
    "model",
    "dataset",
    "seed",
    "status",
    "epochs",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "mean_angle_deg",
    "mean_delta_angle_deg",
    "seconds",
    "run_dir",
    "failure",
)
"""The leading columns of ``results.csv`` (final values of each run; ``seconds`` in total;
``failure``: why a run that is not ``ok`` stopped, with its step)."""


@functools.cache
def code_identity() -> dict[str, str]:
    """The code this process runs: asymprop's version and the SHA-256 of its source.

    The hash covers every ``.py`` file of the imported package (its relative path and bytes, in
    sorted order), so an edit anywhere in the library or its harness changes it, while a
    packaged config's claims or comments do not (a run's settings are compared separately, in
    its ``config.yaml``). Computed once per process.

    Example:
        >>> sorted(code_identity())
        ['source_sha256', 'version']
    """
    from .. import __file__ as package_init
    from .. import __version__

    root = Path(package_init).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return {"version": __version__, "source_sha256": digest.hexdigest()}


def layer_columns(layers: Iterable[str]) -> list[str]:
    """``["angle_deg/fc1", ..., "delta_angle_deg/fc2"]``: metric-major, layers in order."""
    names = list(layers)
    return [f"{metric}/{layer}" for metric in LAYER_METRICS for layer in names]


def layers_of(columns: Iterable[str]) -> list[str]:
    """The layer names that appear in ``angle_deg/<layer>`` columns, in column order."""
    prefix = f"{LAYER_METRICS[0]}/"
    return [c[len(prefix) :] for c in columns if c.startswith(prefix)]


# --- CSV ----------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def parse_scalar(text: str) -> Any:
    """A CSV cell or command-line value back to int, float or str."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def write_csv(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] = (),
) -> None:
    """Write ``rows`` to ``path`` atomically; columns: ``columns``, then any others in order seen.

    A row without a column gets ``nan`` there.
    """
    header = list(columns)
    for row in rows:
        header += [key for key in row if key not in header]
    with _atomic(path) as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(key)) for key in header])


def append_row(path: str | os.PathLike[str], row: Mapping[str, Any]) -> None:
    """Append one row to a CSV file, writing the header first if the file is new.

    The columns are fixed by the header already in the file; a key missing from it is an error
    (a run's columns never change between epochs).
    """
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as stream:
            header = next(csv.reader(stream))
        extra = [key for key in row if key not in header]
        if extra:
            raise ValueError(f"{path}: columns {extra} are not in its header")
        with path.open("a", newline="") as stream:
            csv.writer(stream, lineterminator="\n").writerow(
                [_cell(row.get(key)) for key in header]
            )
    else:
        write_csv(path, [row])


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a CSV file as dicts; numbers parsed (``nan`` is ``float('nan')``)."""
    with Path(path).open(newline="") as stream:
        return [
            {key: parse_scalar(value) for key, value in row.items()}
            for row in csv.DictReader(stream)
        ]


# --- YAML ---------------------------------------------------------------------------------------


def write_yaml(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write a mapping as block-style YAML, keys in the given order, atomically."""
    with _atomic(path) as stream:
        yaml.safe_dump(_plain(data), stream, sort_keys=False, default_flow_style=None)


class _UniqueKeys(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (YAML's last-wins
    would silently drop the first value)."""


def _mapping(loader: _UniqueKeys, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is written twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping (an empty file is ``{}``); a key written twice is refused.

    Raises:
        ValueError: the file is not UTF-8 text, not valid YAML, repeats a key, or is not a
            mapping (the message names the file).
    """
    try:
        with Path(path).open(encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_UniqueKeys)  # a SafeLoader: plain data only
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): not a YAML file") from err
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{path} is not valid YAML: {reason}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings (key: value), not {data!r}")
    return data


def _plain(value: Any) -> Any:
    """Tuples to lists (safe_dump writes no Python tags), recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@contextlib.contextmanager
def _atomic(path: str | os.PathLike[str]) -> Iterator[IO[str]]:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    user_mode(fd)
    try:
        with os.fdopen(fd, "w", newline="") as stream:
            yield stream
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


# --- aggregation --------------------------------------------------------------------------------


def mean_se(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, standard error ``stdev / sqrt(n)`` and count of the finite values.

    NaN mean with no finite value; NaN s.e. with fewer than two.

    Example:
        >>> mean_se([1.0, 2.0, 3.0])
        (2.0, 0.5773502691896258, 3)
    """
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    se = statistics.stdev(finite) / math.sqrt(n) if n > 1 else math.nan
    return statistics.fmean(finite), se, n


def summarize(
    rows: Sequence[Mapping[str, Any]],
    by: Sequence[str] = ("rule", "model", "dataset"),
    metrics: Sequence[str] = (
        "test_accuracy",
        "test_loss",
        "mean_angle_deg",
        "mean_delta_angle_deg",
        "seconds",
    ),
) -> list[dict[str, Any]]:
    """Group ``rows`` by the ``by`` columns (first-seen order) and take mean +- s.e. of ``metrics``.

    Each result row holds the ``by`` values, ``runs`` (rows in the group), ``failed`` (rows whose
    ``status`` is not ``ok``), ``failure`` (the first one's reason, or ""), and per metric
    ``<metric>`` (mean), ``<metric>_se`` and ``<metric>_n`` (finite values used). The metrics
    are those of the runs that finished: a diverged run's last epoch is no result.
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(key) for key in by), []).append(row)
    summary = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(by, key, strict=True))
        entry["runs"] = len(members)
        done = [m for m in members if m.get("status", "ok") == "ok"]
        failed = [m for m in members if m.get("status", "ok") != "ok"]
        entry["failed"] = len(failed)
        entry["failure"] = (
            str(failed[0].get("failure") or failed[0].get("status")) if failed else ""
        )
        for metric in metrics:
            mean, se, n = mean_se(m.get(metric, math.nan) for m in done)
            entry[metric], entry[f"{metric}_se"], entry[f"{metric}_n"] = mean, se, n
        summary.append(entry)
    return summary


def format_mean_se(mean: float, se: float, digits: int = 3, scale: float = 1.0) -> str:
    """``"0.951 ± 0.004"``; just the mean when s.e. is NaN; ``"-"`` when the mean is NaN."""
    if not math.isfinite(mean):
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text if not math.isfinite(se) else f"{text} ± {se * scale:.{digits}f}"


def format_values(values: Iterable[float], digits: int = 3, scale: float = 1.0) -> str:
    """:func:`format_mean_se` of :func:`mean_se` of ``values`` (their finite ones).

    Example:
        >>> format_values([0.25, 0.27], digits=1, scale=100)
        '26.0 ± 1.0'
    """
    mean, se, _ = mean_se(values)
    return format_mean_se(mean, se, digits, scale)


_TABLE_COLUMNS = (
    # (header, metric, digits, scale)
    ("test acc. (%)", "test_accuracy", 1, 100.0),
    ("test loss", "test_loss", 3, 1.0),
    ("angle B,W (deg)", "mean_angle_deg", 1, 1.0),
    ("delta angle (deg)", "mean_delta_angle_deg", 1, 1.0),
    ("seconds", "seconds", 1, 1.0),
)


def summary_table(summary: Sequence[Mapping[str, Any]], by: Sequence[str]) -> str:
    """A Markdown table of :func:`summarize`'s output (mean ± s.e. over seeds).

    Metric columns absent from the summary, or NaN in every row, are left out; angles are the
    mean over the model's converted layers. A group with failed runs says how many.
    """
    shown = [
        col
        for col in _TABLE_COLUMNS
        if any(math.isfinite(row.get(col[1], math.nan)) for row in summary)
    ]
    header = [*by, "runs", *(col[0] for col in shown)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in summary:
        runs = str(row["runs"])
        if row.get("failed"):
            why = f": {row['failure']}" if row.get("failure") else ""
            runs += f" ({row['failed']} diverged{why})"
        cells = [str(row[key]) for key in by] + [runs]
        cells += [
            format_mean_se(row[metric], row[f"{metric}_se"], digits, scale)
            for _, metric, digits, scale in shown
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
