"""Figures (harness/plotting.py): what they contain, not how they look."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from asymprop.harness import plotting
from asymprop.harness.plotting import Curve, plot_curves


def _rows(final_accuracy: float, angle: float, epochs: int = 3) -> list[dict[str, float]]:
    rows = []
    for epoch in range(epochs + 1):
        t = epoch / epochs
        rows.append({
            "epoch": epoch, "step": 10 * epoch, "train_loss": 2.0 - t, "test_loss": 2.1 - t,
            "test_accuracy": 0.02 + t * (final_accuracy - 0.02), "seconds": 1.0,
            "angle_deg/fc1": angle, "delta_angle_deg/fc1": angle + 1.0,
            "angle_deg/fc2": angle, "delta_angle_deg/fc2": angle + 3.0,
        })  # fmt: skip
    return rows


def test_styles_give_twenty_rules_distinct_colour_and_marker() -> None:
    styles = plotting._styles([f"rule{i}" for i in range(20)])
    assert len({(str(colour), marker) for colour, _, marker in styles.values()}) == 20
    assert len({str(colour) for colour, _, _ in styles.values()}) == 20


def test_final_values_are_the_last_epoch_mean_and_se_over_seeds() -> None:
    curve = Curve("fa", "mlp / digits", [_rows(0.80, 40.0), _rows(0.90, 50.0)])
    accuracy, accuracy_se, angle, angle_se, finished = plotting._final(curve)
    assert math.isclose(accuracy, 85.0) and math.isclose(accuracy_se, 5.0) and finished == 2
    # delta angles per seed: mean over layers of (a + 1, a + 3) = a + 2
    assert math.isclose(angle, 47.0) and math.isclose(angle_se, 5.0)


def test_comparison_writes_a_summary_figure_at_150_dpi(tmp_path: Path) -> None:
    curves = [
        Curve("bp", "mlp / digits", [_rows(0.95, 0.0), _rows(0.94, 0.0)]),
        Curve("fa", "mlp / digits", [_rows(0.85, 60.0), _rows(0.80, 65.0)]),
    ]
    written = plot_curves(curves, tmp_path)
    assert [p.name for p in written] == ["accuracy.png", "loss.png", "alignment.png", "summary.png"]
    height, width, _ = matplotlib.image.imread(tmp_path / "summary.png").shape
    assert (width, height) == (11 * 150, int(4.2 * 150))  # figsize (11, 4.2) at 150 dpi


@pytest.mark.parametrize("labels", [["bp"], ["bp", "fa"]])
def test_accuracy_axis_holds_epoch_zero(
    tmp_path: Path, labels: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The axis once started at the lowest value after epoch 0: chance fell off the plot."""
    from matplotlib.figure import Figure

    seen: list[tuple[float, float]] = []
    original = Figure.savefig

    def spy(fig: Figure, *args: Any, **kwargs: Any) -> None:
        if fig.axes and fig.axes[0].get_ylabel() == "test accuracy (%)":
            seen.append(fig.axes[0].get_ylim())
            ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= 3]
            assert all(float(t).is_integer() for t in ticks), ticks
        original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    written = plot_curves([Curve(label, "g", [_rows(0.9, 10.0)]) for label in labels], tmp_path)
    low, high = seen[0]
    assert low < 2.0 and high > 90.0  # epoch 0's 2% and the final 90% both inside
    assert ("summary.png" in {p.name for p in written}) == (len(labels) > 1)


def test_ranking_says_how_many_seeds_a_mean_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A diverged seed (no final accuracy) is left out of the mean: the label says so."""
    diverged = _rows(0.8, 40.0)
    diverged[-1]["test_accuracy"] = math.nan
    curves = [
        Curve("bp", "g", [_rows(0.95, 0.0), _rows(0.94, 0.0)]),
        Curve("fa", "g", [_rows(0.85, 60.0), diverged]),
    ]
    from matplotlib.figure import Figure

    labels: list[str] = []
    original = Figure.savefig

    def spy(fig: Figure, *args: Any, **kwargs: Any) -> None:
        if len(fig.axes) >= 2 and fig.axes[1].get_xlabel() == "final test accuracy (%)":
            labels.extend(t.get_text() for t in fig.axes[1].get_yticklabels())
        original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    plot_curves(curves, tmp_path)
    assert labels == ["fa (1 of 2 seeds)", "bp"]
