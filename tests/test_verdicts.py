"""The verdicts of the report: each comparison's three outcomes, the refusals, the notes."""

from __future__ import annotations

import math

import pytest

from asymprop.harness.papers.verdicts import NOT, PARTLY, REPRODUCED, judge, verdict_table

VALUES = {
    "a": [10.0, 11.0, 12.0],  # mean 11, se 0.577
    "b": [15.0, 16.0, 17.0],  # mean 16
    "c": [11.5, 12.0, 12.5],  # mean 12, se 0.289
    "one": [13.0],
    "nan": [10.0, math.nan],
}


@pytest.mark.parametrize(
    ("claim", "verdict"),
    [
        ({"less": ["a", "b"]}, REPRODUCED),  # 5 > 2 * 0.816
        ({"less": ["a", "c"]}, PARTLY),  # 1 < 2 * 0.645 but > 0
        ({"less": ["b", "a"]}, NOT),
        ({"less": ["a", "b"], "by": 6}, PARTLY),  # 5 < by
        ({"less": ["a", "b"], "se": 10}, PARTLY),  # 5 < 10 * 0.816
        ({"less": ["a", "one"]}, PARTLY),  # one seed: at most partly
        ({"less": ["nan", "b"]}, NOT),
        ({"within": ["a", "c"], "tol": 1}, REPRODUCED),
        ({"within": ["a", "b"], "tol": 1, "partly": 5}, PARTLY),
        ({"within": ["a", "b"], "tol": 1, "partly": 4.9}, NOT),
        ({"at_most": "a", "value": 11}, REPRODUCED),
        ({"at_most": "a", "value": 10, "partly": 11.5}, PARTLY),
        ({"at_most": "a", "value": 10}, NOT),
        ({"at_least": "b", "value": 16}, REPRODUCED),
        ({"at_least": "b", "value": 17, "partly": 15}, PARTLY),
        ({"at_least": "nan", "value": 0}, NOT),
    ],
)
def test_each_comparison_gives_its_three_outcomes(claim, verdict):
    assert judge({"claim": "x", **claim}, VALUES).verdict == verdict


@pytest.mark.parametrize(
    "claim",
    [
        {"less": ["a", "b"]},  # no text
        {"claim": "x"},  # no comparison
        {"claim": "x", "less": ["a", "b"], "at_most": "a", "value": 1},  # two
        {"claim": "x", "less": ["a", "b"], "margin": 2},  # unknown key
        {"claim": "x", "less": ["a", "zzz"]},  # not measured
        {"claim": "x", "within": ["a", "b"], "tol": 2, "partly": 1},  # partly stricter
        {"claim": "x", "at_most": "a", "value": 2, "partly": 1},
        {"claim": "x", "at_least": "a", "value": 2, "partly": 3},
        {"claim": "x", "within": ["a", "b"]},  # no tol
        {"claim": "x", "at_most": "a"},  # no value
        {"claim": "x", "less": ["a", "b", "c"]},  # three names
        {"claim": "x", "less": "ab"},  # a string, not two names
    ],
)
def test_a_malformed_claim_is_refused(claim):
    with pytest.raises(ValueError):
        judge(claim, VALUES)


def test_the_table_prints_the_criterion_and_a_changed_criterion():
    verdict = judge({"claim": "A first", "less": ["a", "b"], "changed": "was by 6 s.e."}, VALUES)
    table = verdict_table([verdict])
    assert "mean(a) < mean(b) by > 2 s.e." in table
    assert "criterion set or changed after seeing results: was by 6 s.e." in table
    assert "a 11.00 ± 0.58" in table


def test_a_pipe_inside_a_cell_is_escaped():
    table = verdict_table([judge({"claim": "a|b", "within": ["a", "c"], "tol": 1}, VALUES)])
    row = table.splitlines()[2]
    assert "\\|mean(a) - mean(c)\\| <= 1" in row and "a\\|b" in row
    assert row.replace("\\|", "").count("|") == 5  # four cells


def test_an_equivalence_inside_the_seeds_noise_says_so():
    noisy = {"p": [10.0, 14.0, 18.0], "q": [11.0, 15.0, 19.0]}  # gap 1, s.e. 2.3 each
    verdict = judge({"claim": "alike", "within": ["p", "q"], "tol": 2}, noisy)
    assert verdict.verdict == REPRODUCED  # the committed criterion decides
    assert "equivalence is not shown" in verdict.note and "2 s.e. 6.53" in verdict.measured
    tight = judge({"claim": "alike", "within": ["a", "c"], "tol": 2}, VALUES)
    assert tight.verdict == REPRODUCED and tight.note == ""  # 2 s.e. 1.29 < 2
