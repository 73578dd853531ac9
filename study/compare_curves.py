"""Training curves of a "compare" run: the gap to the baseline during training
and the loss spikes of each variant.

Section 3.3 of "GradPower: Powering Gradients for Faster Language Model
Pre-Training" reports two observations beside the terminal loss: AdamPower's
advantage over Adam grows through the stable phase of the wsd schedule, and
AdamPower has fewer loss spikes. Both need the histories that
MLflow holds for every trial, so this module reads them for the trials that
the gap table uses (each variant's best lr_max, every usable seed).

Gap during training: at each evaluation step that both cells recorded, the
median validation loss over seeds of the baseline minus that of the variant
(positive: the variant is better). The table shows it at 20%, 40%, 60%, 80%
and 100% of the step budget, each at the last evaluation at or before that
point; 80% is the end of wsd's stable phase.

Loss spike: a logged training step whose loss exceeds the median of the
losses logged in the SPIKE_WINDOW steps before it by more than SPIKE_RISE of
that median. A run of consecutive such steps is one spike. Steps within the
first SPIKE_WINDOW are not judged, because the loss falls fastest there, so a
budget that short has no spike count. NOTE: the GradPower paper defines no
spike, so the window and the 10% rise are this module's choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from study.compare_analysis import CompareAnalysis, chosen_trials

# Shares of the step budget at which the gap is shown.
GAP_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
SPIKE_WINDOW = 50
SPIKE_RISE = 0.10
SPIKE_RULE = (
    f"runs of training steps whose loss exceeds the median of the "
    f"{SPIKE_WINDOW} steps before it by more than {SPIKE_RISE:.0%}; the count "
    "is the median over seeds"
)
GAP_RULE = (
    "baseline minus variant median validation loss over seeds at the last "
    "evaluation at or before each share of the step budget (positive: the "
    "variant is better); 80% is where wsd's stable phase ends"
)


@dataclass
class CurveAnalysis:
    gaps: pd.DataFrame
    """One row per compared cell: setting, batch_size, variant, baseline, the
    gap at each share of GAP_FRACTIONS (columns `gap_20` ...), and the median
    spike counts of the variant and of the baseline."""
    histories: pd.DataFrame
    """Validation loss by step, median over seeds, in long form: setting,
    batch_size, variant, step, val_loss."""
    notes: list[str]


def count_spikes(losses) -> float:
    """Return the number of loss spikes in training losses by step: a Series
    indexed by step, or an array of consecutive steps from 0. NaN when no step
    lies SPIKE_WINDOW steps past the first, so none could be judged."""
    series = losses if isinstance(losses, pd.Series) else pd.Series(losses)
    series = series.astype(float).sort_index()
    if series.empty:
        return math.nan
    steps = series.index.to_numpy(dtype=float)
    values = series.to_numpy()
    judged = np.flatnonzero(steps >= steps[0] + SPIKE_WINDOW)
    if not len(judged):
        return math.nan
    # The first index of each judged step's window; the steps are sorted.
    starts = np.searchsorted(steps, steps[judged] - SPIKE_WINDOW, side="left")
    count, inside = 0, False
    for index, start in zip(judged, starts):
        window = values[start:index]
        window = window[np.isfinite(window)]
        if not len(window) or not math.isfinite(values[index]):
            inside = False
            continue
        spike = values[index] > float(np.median(window)) * (1.0 + SPIKE_RISE)
        if spike and not inside:
            count += 1
        inside = spike
    return float(count)


def _history(client, run_id: str, metric: str) -> pd.Series:
    points = client.get_metric_history(run_id, metric)
    series = pd.Series({int(point.step): float(point.value) for point in points})
    return series.sort_index()


@dataclass
class _CellCurve:
    val_loss: pd.Series
    """Median validation loss over seeds by step."""
    spikes: float
    """Median spike count over seeds."""
    budget_steps: float


def _cell_curve(client, chosen: pd.DataFrame) -> _CellCurve | None:
    """Return the curve of the chosen trials, or None when none has a history."""
    losses, spikes = [], []
    for run_id in chosen.mlflow_run_id.dropna():
        validation = _history(client, run_id, "val/loss")
        if len(validation):
            losses.append(validation)
            spikes.append(count_spikes(_history(client, run_id, "train/loss")))
    if not losses:
        return None
    median = pd.concat(losses, axis=1).median(axis=1, skipna=False).dropna()
    return _CellCurve(
        median, float(np.median(spikes)), float(chosen.budget_steps.max())
    )


def _gap_at(gap: pd.Series, step: float) -> float:
    earlier = gap[gap.index <= step]
    return float(earlier.iloc[-1]) if len(earlier) else math.nan


GAP_COLUMNS = [
    "setting",
    "batch_size",
    "variant",
    "baseline",
    *(f"gap_{round(fraction * 100)}" for fraction in GAP_FRACTIONS),
    "spikes",
    "baseline_spikes",
]
HISTORY_COLUMNS = ["setting", "batch_size", "variant", "step", "val_loss"]


def analyze_curves(client, analysis: CompareAnalysis) -> CurveAnalysis:
    """Read the histories of the gap table's trials from MLflow and compare
    each variant's curve with its baseline's."""
    curves: dict[tuple, _CellCurve | None] = {}

    def curve_of(setting, batch_size, variant: str, lr_max: float):
        key = (setting, batch_size, variant, lr_max)
        if key not in curves:
            chosen = chosen_trials(
                analysis.trials, setting, batch_size, variant, lr_max
            )
            curves[key] = _cell_curve(client, chosen)
        return curves[key]

    rows, notes = [], []
    for row in analysis.gaps.itertuples():
        if row.status != "ok":
            continue
        cell = (row.setting, row.batch_size)
        variant = curve_of(*cell, row.variant, row.lr_max)
        baseline = curve_of(*cell, row.baseline, row.baseline_lr_max)
        if variant is None or baseline is None:
            notes.append(
                f"setting {row.setting!r}, batch size {row.batch_size}, "
                f"{row.variant}: no validation history in MLflow, so no gap "
                "during training"
            )
            continue
        gap = (baseline.val_loss - variant.val_loss).dropna()
        entry = dict(zip(GAP_COLUMNS, (*cell, row.variant, row.baseline)))
        for fraction in GAP_FRACTIONS:
            share = f"gap_{round(fraction * 100)}"
            entry[share] = _gap_at(gap, fraction * variant.budget_steps)
        entry.update(spikes=variant.spikes, baseline_spikes=baseline.spikes)
        rows.append(entry)

    histories = [
        pd.DataFrame(
            {
                "setting": setting,
                "batch_size": batch_size,
                "variant": variant,
                "step": curve.val_loss.index,
                "val_loss": curve.val_loss.values,
            }
        )
        for (setting, batch_size, variant, _), curve in curves.items()
        if curve is not None
    ]
    history = (
        pd.concat(histories, ignore_index=True)
        if histories
        else pd.DataFrame(columns=HISTORY_COLUMNS)
    )
    return CurveAnalysis(pd.DataFrame(rows, columns=GAP_COLUMNS), history, notes)


def curve_findings(curves: CurveAnalysis) -> list[str]:
    """Return one line per compared cell on how its gap moved during training
    and on its spikes against the baseline's."""
    findings = []
    shares = [round(fraction * 100) for fraction in GAP_FRACTIONS]
    for row in curves.gaps.to_dict("records"):
        known = [share for share in shares if not math.isnan(row[f"gap_{share}"])]
        if len(known) < 2 or 80 not in known:
            continue
        first, stable_end = row[f"gap_{known[0]}"], row["gap_80"]
        trend = "grew" if stable_end > first else "did not grow"
        findings.append(
            f"{row['setting']}, batch size {row['batch_size']}, {row['variant']} "
            f"against {row['baseline']}: the gap {trend} from {first:+.4f} at "
            f"{known[0]}% to {stable_end:+.4f} at 80% of the budget "
            f"({row['gap_100']:+.4f} at the end)"
            + _spike_text(row["spikes"], row["baseline_spikes"])
        )
    return findings


def _spike_text(spikes: float, baseline_spikes: float) -> str:
    if math.isnan(spikes) or math.isnan(baseline_spikes):
        return f"; loss spikes not counted, the budget is under {SPIKE_WINDOW} steps"
    return f"; loss spikes {spikes:g} against {baseline_spikes:g}"


def attach_curves(client, analysis: CompareAnalysis) -> None:
    """Add the curve analysis of `analysis`'s run, its findings and notes."""
    analysis.curves = analyze_curves(client, analysis)
    analysis.findings.extend(curve_findings(analysis.curves))
    analysis.notes.extend(analysis.curves.notes)


def curve_frame(curves: CurveAnalysis) -> pd.DataFrame:
    """Return the gap-during-training table as printed, gaps signed to 4 places."""
    frame = curves.gaps.copy()
    shares = [f"gap_{round(fraction * 100)}" for fraction in GAP_FRACTIONS]
    for share in shares:
        frame[share] = frame[share].map(
            lambda value: "" if math.isnan(value) else f"{value:+.4f}"
        )
    for count in ("spikes", "baseline_spikes"):
        frame[count] = frame[count].map(
            lambda value: "n/a" if math.isnan(value) else f"{value:g}"
        )
    return frame.rename(
        columns={
            "batch_size": "batch size",
            **{share: f"gap at {share[4:]}%" for share in shares},
            "baseline_spikes": "baseline spikes",
        }
    )
