"""From recorded trials to answers: the best power per batch size and its trend.

Only `reached` trials have a time to target. A censored trial means "at least
the budget" and is never averaged in; diverged and failed trials are excluded
and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd

from study.spec import StudyFileError

TRIAL_COLUMNS = [
    "label",
    "workload",
    "batch_size",
    "power",
    "lr_max",
    "seed",
    "end_state",
    "steps_to_target",
    "steps_done",
    "val_loss",
    "trial_key",
]


@dataclass
class RecordedRun:
    """The trials of one study run for one workload, read back from Optuna."""

    study: str
    scale: str
    run_id: str
    label: str
    workload: str
    progress_unit: str
    budget_steps: int
    target_metric: str
    target_value: float
    target_mode: str
    trials: pd.DataFrame


@dataclass
class TrendFit:
    slope: float
    intercept: float
    points: int

    def describe(self) -> str:
        return (
            f"best p = {self.intercept:.3f} {self.slope:+.3f} * log2(batch size) "
            f"(least squares over {self.points} batch sizes)"
        )


@dataclass
class PowerAnalysis:
    run: RecordedRun
    cells: pd.DataFrame
    """One row per (batch_size, power): steps to target and the cell's state."""
    best: pd.DataFrame
    """One row per batch size: the best power, its steps, and trial counts."""
    fit: TrendFit | None
    notes: list[str] = field(default_factory=list)


def _trial_rows(study: optuna.Study, label: str, workload: str) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        rows.append(
            {
                "label": label,
                "workload": workload,
                **trial.params,
                "end_state": attrs.get("end_state", "failed"),
                "steps_to_target": attrs.get("steps_to_target"),
                "steps_done": attrs.get("steps_done"),
                "val_loss": attrs.get("val_loss"),
                "trial_key": attrs.get("trial_key"),
            }
        )
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def load_runs(
    storage: str, study: str, scale: str, run_id: str | None = None
) -> list[RecordedRun]:
    """Read every workload of one study run (the latest one unless `run_id` is set)."""
    summaries = optuna.get_all_study_summaries(
        storage=storage, include_best_trial=False
    )
    matching = [
        s
        for s in summaries
        if s.user_attrs.get("study") == study and s.user_attrs.get("scale") == scale
    ]
    if not matching:
        raise StudyFileError(
            f"No recorded run of study {study!r} at scale {scale!r} in {storage}; "
            "run `study run` first or pass the right --workspace and --scale"
        )
    run_ids = sorted({s.user_attrs["run_id"] for s in matching})
    chosen = run_id or run_ids[-1]
    if chosen not in run_ids:
        raise StudyFileError(
            f"Run {chosen!r} of study {study!r} is not recorded; recorded runs: {run_ids}"
        )
    runs = []
    for summary in matching:
        attrs = summary.user_attrs
        if attrs["run_id"] != chosen:
            continue
        optuna_study = optuna.load_study(study_name=summary.study_name, storage=storage)
        runs.append(
            RecordedRun(
                study=study,
                scale=scale,
                run_id=chosen,
                label=attrs["label"],
                workload=attrs["workload"],
                progress_unit=attrs["progress_unit"],
                budget_steps=int(attrs["budget_steps"]),
                target_metric=attrs["target_metric"],
                target_value=float(attrs["target_value"]),
                target_mode=attrs["target_mode"],
                trials=_trial_rows(optuna_study, attrs["label"], attrs["workload"]),
            )
        )
    return sorted(runs, key=lambda r: r.label)


def _cell_summary(group: pd.DataFrame) -> pd.Series:
    """Summarise one (batch size, power, lr_max) cell over its seeds."""
    reached = group[group.end_state == "reached"]
    if len(reached) == len(group):
        return pd.Series(
            {
                "steps": float(reached.steps_to_target.median()),
                "val_loss": float(reached.val_loss.median()),
                "state": "reached",
            }
        )
    if (group.end_state == "censored").any() or len(reached):
        # A cell with a censored seed has no median time: report it as censored.
        return pd.Series({"steps": np.nan, "val_loss": np.nan, "state": "censored"})
    return pd.Series(
        {"steps": np.nan, "val_loss": np.nan, "state": group.end_state.iloc[0]}
    )


def analyze_run(run: RecordedRun) -> PowerAnalysis:
    """Find the best power per batch size and fit its trend against log2(batch size)."""
    trials = run.trials
    notes = []
    excluded = trials[trials.end_state.isin(["diverged", "failed"])]
    if len(excluded):
        notes.append(
            f"{len(excluded)} trial(s) excluded: "
            + ", ".join(
                f"{k} ({s})" for k, s in zip(excluded.trial_key, excluded.end_state)
            )
        )
    censored = int((trials.end_state == "censored").sum())
    if censored:
        notes.append(
            f"{censored} trial(s) censored at the budget of {run.budget_steps} steps"
        )

    by_lr = (
        trials.groupby(["batch_size", "power", "lr_max"])[
            ["end_state", "steps_to_target", "val_loss"]
        ]
        .apply(_cell_summary)
        .reset_index()
    )
    cells = []
    for (batch_size, power), group in by_lr.groupby(["batch_size", "power"]):
        reached = group[group.state == "reached"]
        if len(reached):
            best_row = reached.sort_values(["steps", "val_loss"]).iloc[0]
            cells.append(
                (
                    batch_size,
                    power,
                    best_row.steps,
                    best_row.val_loss,
                    "reached",
                    best_row.lr_max,
                )
            )
        else:
            censored_cell = (group.state == "censored").any()
            state = "censored" if censored_cell else group.state.iloc[0]
            cells.append((batch_size, power, np.nan, np.nan, state, np.nan))
    cells_frame = pd.DataFrame(
        cells, columns=["batch_size", "power", "steps", "val_loss", "state", "lr_max"]
    )

    best_rows = []
    for batch_size, group in cells_frame.groupby("batch_size"):
        reached = group[group.state == "reached"]
        counts = trials[trials.batch_size == batch_size].end_state.value_counts()
        row = {
            "batch_size": int(batch_size),
            "best_power": np.nan,
            "steps": np.nan,
            "reached": int(counts.get("reached", 0)),
            "censored": int(counts.get("censored", 0)),
            "excluded": int(counts.get("diverged", 0) + counts.get("failed", 0)),
        }
        if len(reached):
            # Ties in steps are common when evaluation is periodic. The lower
            # validation loss at the step of reaching breaks a tie, then the
            # smaller |p - 1|, so the baseline wins when nothing separates them.
            ordered = reached.assign(distance=(reached.power - 1.0).abs())
            winner = ordered.sort_values(["steps", "val_loss", "distance"]).iloc[0]
            row["best_power"] = float(winner.power)
            row["steps"] = float(winner.steps)
        best_rows.append(row)
    best = pd.DataFrame(best_rows)

    fit = None
    fitted = best.dropna(subset=["best_power"])
    if len(fitted) >= 2:
        slope, intercept = np.polyfit(np.log2(fitted.batch_size), fitted.best_power, 1)
        fit = TrendFit(float(slope), float(intercept), len(fitted))
    else:
        notes.append(
            "no trend fit: it needs at least two batch sizes where some trial reached "
            "the target"
        )
    return PowerAnalysis(run, cells_frame, best, fit, notes)
