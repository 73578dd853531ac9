"""Loss spikes and the gap during training (study/compare_curves.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from study.compare_curves import (
    SPIKE_WINDOW,
    CurveAnalysis,
    count_spikes,
    curve_findings,
)


def _falling(steps: int) -> np.ndarray:
    return 4.0 + 2.0 * np.exp(-np.arange(steps) / 40.0)


def test_smooth_falling_loss_has_no_spikes():
    assert count_spikes(_falling(400)) == 0


def test_consecutive_high_steps_are_one_spike():
    losses = _falling(400)
    losses[200:204] *= 1.3  # one spike over four steps
    losses[300] *= 1.15  # a second one
    losses[350] *= 1.05  # below the 10% threshold
    assert count_spikes(losses) == 2


def test_spikes_skip_first_window_and_nan():
    losses = _falling(200)
    losses[SPIKE_WINDOW - 1] *= 2.0  # inside the first window
    losses[120] = np.nan
    assert count_spikes(losses) == 0


def test_short_budget_has_no_spike_count():
    losses = _falling(SPIKE_WINDOW)
    losses[-1] *= 30.0
    assert math.isnan(count_spikes(losses))


def test_spike_window_counts_steps_not_points():
    # Logged every 10 steps: the window of 50 steps contains 5 points.
    losses = pd.Series(_falling(100), index=range(0, 1000, 10))
    losses[600] *= 1.3
    assert count_spikes(losses) == 1


def test_findings_say_whether_the_gap_grew():
    gaps = pd.DataFrame(
        [
            ["lm", 16, "AdamPower", "Adam", 0.01, 0.02, 0.03, 0.04, 0.02, 1.0, 3.0],
            ["lm", 32, "AdamPower", "Adam", np.nan, 0.05, 0.04, 0.03, 0.03, 0.0, 0.0],
        ],
        columns=[
            "setting", "batch_size", "variant", "baseline", "gap_20", "gap_40",
            "gap_60", "gap_80", "gap_100", "spikes", "baseline_spikes",
        ],
    )  # fmt: skip
    first, second = curve_findings(CurveAnalysis(gaps, pd.DataFrame(), []))
    assert first == (
        "lm, batch size 16, AdamPower against Adam: the gap grew from +0.0100 at "
        "20% to +0.0400 at 80% of the budget (+0.0200 at the end); loss spikes 1 "
        "against 3"
    )
    assert "did not grow from +0.0500 at 40% to +0.0300 at 80%" in second
