"""A claim, its criterion written in the item's config before the runs, and the verdict.

Every item of the report states in its config, under ``claims:``, what it tests and how it will
judge it; the item measures named values (per-seed numbers, e.g. test error in % per entry) and
:func:`judge_all` turns each claim into a :class:`Verdict`: "reproduced", "partly" or "not
reproduced", with the criterion printed beside it (:func:`verdict_table`). A claim is a mapping
with ``claim`` (its text), optionally ``source`` (where the paper says it) and ``changed`` (a
note, printed with the verdict, when the criterion was set or changed after seeing results), and
exactly one comparison:

``less: [A, B]`` (``se``: k, default 2; ``by``: d, default 0)
    A's mean is below B's. Reproduced when ``mean(B) - mean(A) > max(d, k * SE)`` with
    ``SE = sqrt(se(A)^2 + se(B)^2)``; partly when ``mean(B) - mean(A) > 0``; else not. With a
    single value on either side there is no s.e.: the verdict is at most "partly".
``within: [A, B]``, ``tol: t`` (``partly``: t2 > t)
    A's mean is within t of B's. Reproduced when ``|mean(A) - mean(B)| <= t``; partly when
    ``<= t2``; else not. When twice the s.e. of the difference exceeds t the verdict says so
    (the seeds cannot tell a gap of t from none: equivalence is not shown).
``at_most: A``, ``value: v`` (``partly``: v2 > v)
    Reproduced when ``mean(A) <= v``; partly when ``<= v2``; else not.
``at_least: A``, ``value: v`` (``partly``: v2 < v)
    Reproduced when ``mean(A) >= v``; partly when ``>= v2``; else not.

Values are in the units the item reports (its config says which); a value that is not finite
(a diverged run the item did not map to chance) makes the verdict "not reproduced".

Example:
    >>> claims = [{"claim": "NP beats DFA", "less": ["np", "dfa"]}]
    >>> values = {"np": [10.0, 11.0, 12.0], "dfa": [15.0, 16.0, 17.0]}
    >>> print(verdict_table(judge_all(claims, values)))
    | claim | criterion | measured | verdict |
    | --- | --- | --- | --- |
    | NP beats DFA | mean(np) < mean(dfa) by > 2 s.e. of the difference (partly: by > 0) \
| np 11.00 ± 0.58, dfa 16.00 ± 0.58: difference 5.00, 2 s.e. 1.63 | reproduced |
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..records import mean_se

KINDS = ("less", "within", "at_most", "at_least")
"""The comparisons a claim can make (module docstring)."""
REPRODUCED, PARTLY, NOT = "reproduced", "partly", "not reproduced"


@dataclass(frozen=True)
class Verdict:
    """One claim judged: its text, its criterion in words, what was measured, the verdict."""

    claim: str
    criterion: str
    measured: str
    verdict: str
    note: str = ""


def _stats(values: Mapping[str, Sequence[float]], name: str) -> tuple[float, float, int]:
    if name not in values:
        raise ValueError(
            f"claim names {name!r}, which the item did not measure; measured: "
            f"{', '.join(values) or 'nothing'}"
        )
    numbers = [float(v) for v in values[name]]
    if not numbers:
        raise ValueError(f"claim names {name!r}, which has no values")
    if not all(math.isfinite(v) for v in numbers):
        return math.nan, math.nan, len(numbers)
    mean, se, n = mean_se(numbers)
    return mean, se, n


def _num(x: float) -> str:
    return f"{x:.2f}" if x == 0 or abs(x) >= 0.01 or not math.isfinite(x) else f"{x:.2g}"


def _fmt(name: str, mean: float, se: float, n: int) -> str:
    spread = f" ± {_num(se)}" if n > 1 and math.isfinite(se) else " (one value)"
    return f"{name} {_num(mean)}{spread}"


def judge(claim: Mapping[str, Any], values: Mapping[str, Sequence[float]]) -> Verdict:
    """The verdict on one ``claim`` (module docstring) given the item's measured ``values``.

    A claim with no comparison, two comparisons, an unknown key or a ``partly`` bound on the
    wrong side of its ``tol``/``value`` is refused (ValueError naming it).
    """
    kinds = [k for k in KINDS if k in claim]
    allowed = {"claim", "source", "changed", "se", "by", "tol", "value", "partly", *KINDS}
    unknown = sorted(set(claim) - allowed)
    if len(kinds) != 1 or unknown or "claim" not in claim:
        raise ValueError(
            f"claim {dict(claim)} needs a 'claim' text and exactly one of {', '.join(KINDS)}; "
            f"unknown keys: {', '.join(unknown) or 'none'}"
        )
    kind = kinds[0]
    text, note = str(claim["claim"]), str(claim.get("changed", ""))
    if note:
        note = f"criterion set or changed after seeing results: {note}"
    names = claim[kind]
    if kind in ("less", "within") and (
        isinstance(names, str) or not isinstance(names, Sequence) or len(names) != 2
    ):
        raise ValueError(f"claim {text!r}: {kind} needs a list of two value names, not {names!r}")
    needed = {"within": "tol", "at_most": "value", "at_least": "value"}.get(kind)
    if needed is not None and needed not in claim:
        raise ValueError(f"claim {text!r}: {kind} needs {needed!r} (the bound)")
    if kind == "less":
        a, b = claim["less"]
        k, by = float(claim.get("se", 2.0)), float(claim.get("by", 0.0))
        (ma, sa, na), (mb, sb, nb) = _stats(values, a), _stats(values, b)
        diff = mb - ma
        criterion = (
            f"mean({a}) < mean({b}) by > "
            + (
                f"max({by:g}, {k:g} s.e. of the difference)"
                if by
                else f"{k:g} s.e. of the difference"
            )
            + " (partly: by > 0)"
        )
        one_seed = na < 2 or nb < 2
        se = math.sqrt(sa**2 + sb**2) if not one_seed else math.nan
        measured = f"{_fmt(a, ma, sa, na)}, {_fmt(b, mb, sb, nb)}: difference {_num(diff)}"
        measured += f", {k:g} s.e. {_num(k * se)}" if not one_seed else ", no s.e. (one value)"
        if not math.isfinite(diff):
            verdict = NOT
        elif not one_seed and diff > max(by, k * se):
            verdict = REPRODUCED
        else:
            verdict = PARTLY if diff > 0 else NOT
        return Verdict(text, criterion, measured, verdict, note)
    if kind == "within":
        a, b = claim["within"]
        tol = float(claim["tol"])
        partly = float(claim.get("partly", tol))
        if partly < tol:
            raise ValueError(f"claim {text!r}: partly {partly:g} must be >= tol {tol:g}")
        (ma, sa, na), (mb, sb, nb) = _stats(values, a), _stats(values, b)
        gap = abs(ma - mb)
        criterion = f"|mean({a}) - mean({b})| <= {tol:g}" + (
            f" (partly: <= {partly:g})" if partly > tol else ""
        )
        measured = f"{_fmt(a, ma, sa, na)}, {_fmt(b, mb, sb, nb)}: gap {_num(gap)}"
        verdict = REPRODUCED if gap <= tol else PARTLY if gap <= partly else NOT  # NaN: not
        if na > 1 and nb > 1:
            two_se = 2 * math.sqrt(sa**2 + sb**2)
            measured += f", 2 s.e. {_num(two_se)}"
            if verdict != NOT and two_se > tol:  # disclosed, not a change of the criterion
                noise = f"the gap's 2 s.e. ({_num(two_se)}) exceeds the tolerance: equivalence "
                noise += "is not shown beyond the seeds' noise"
                note = f"{note}; {noise}" if note else noise
        return Verdict(text, criterion, measured, verdict, note)
    name = claim[kind]
    bound = float(claim["value"])
    partly = float(claim.get("partly", bound))
    below = kind == "at_most"
    if (partly < bound) if below else (partly > bound):
        raise ValueError(f"claim {text!r}: partly {partly:g} is stricter than value {bound:g}")
    mean, se, n = _stats(values, name)
    sign = "<=" if below else ">="
    criterion = f"mean({name}) {sign} {bound:g}" + (
        f" (partly: {sign} {partly:g})" if partly != bound else ""
    )

    def holds(limit: float) -> bool:
        return mean <= limit if below else mean >= limit

    verdict = REPRODUCED if holds(bound) else PARTLY if holds(partly) else NOT
    return Verdict(text, criterion, _fmt(name, mean, se, n), verdict, note)


def judge_all(
    claims: Sequence[Mapping[str, Any]], values: Mapping[str, Sequence[float]]
) -> list[Verdict]:
    """:func:`judge` on each of ``claims`` (an item config's ``claims:``)."""
    return [judge(claim, values) for claim in claims]


def verdict_table(verdicts: Sequence[Verdict]) -> str:
    """Markdown: one line per verdict, the criterion beside it (and a note if it changed); a
    ``|`` inside a cell (``|mean(a) - mean(b)|``) is escaped so that it does not split the cell."""
    lines = ["| claim | criterion | measured | verdict |", "| --- | --- | --- | --- |"]
    for v in verdicts:
        verdict = f"{v.verdict} ({v.note})" if v.note else v.verdict
        cells = [c.replace("|", "\\|") for c in (v.claim, v.criterion, v.measured, verdict)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
