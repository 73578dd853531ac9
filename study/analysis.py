"""Analyze recorded trials: the best power per batch size and its trend.

Only `reached` trials have a time to target. A censored trial means "at least
its budget": in a median over seeds it ranks above every reached value, and a
cell whose median falls on a censored seed has only a lower bound. Diverged
and failed trials are excluded from the medians and counted.

Per batch size the analysis reports the best power p on the grid, a
continuous estimate p* from a parabola through log time to target at the grid
minimum and its two neighbours, and, with several seeds, bootstrap confidence
intervals. Across batch sizes it fits p* against log2(batch size) by weighted
least squares, and against the optimum that the high-noise analysis of
AdamPower predicts when the gradient noise scale falls as 1/sqrt(batch size).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd
from scipy import optimize, stats

from study.invocation import command_name
from study.spec import StudyFileError

logger = logging.getLogger(__name__)

TRIAL_COLUMNS = [
    "number",
    "trial_key",
    "mlflow_run_id",
    "label",
    "workload",
    "batch_size",
    "power",
    "lr_max",
    "seed",
    "end_state",
    "steps_to_target",
    "progress_to_target",
    "seconds_to_target",
    "steps_done",
    "seconds_done",
    "val_loss",
    "val_accuracy",
]
CURVE_COLUMNS = ["trial_key", "metric", "step", "value"]
EXCLUDED_STATES = ("diverged", "failed")
TIME_METRICS = ("steps", "progress", "seconds")
# AdamW's epsilon when the run's recorded settings do not name one; it is the
# default of the study file's `train.eps`.
DEFAULT_ADAM_EPS = 1e-8


@dataclass
class RecordedRun:
    """The trials of one study run for one workload, read back from the stores."""

    study: str
    scale: str
    run_id: str
    label: str
    workload: str
    progress_unit: str
    budget_steps: int
    """The step budget; the largest one of the run's batch sizes under an
    epoch budget."""
    target_metric: str
    target_value: float
    target_mode: str
    trials: pd.DataFrame
    parent_run_id: str | None = None
    curves: pd.DataFrame | None = None
    """Evaluation histories from MLflow in long form (CURVE_COLUMNS), or None."""
    adam_eps: float = DEFAULT_ADAM_EPS
    eps_recorded: bool = False
    """Whether `adam_eps` comes from the run's metadata rather than the default."""
    budget_epochs: int | None = None
    """The epoch budget, which sets each batch size's step budget, or None
    under a step budget."""
    target_stop: bool = True
    """Whether trials ended when they met the target; False when they trained
    to the end of their budget (`target.stop: false`)."""

    @property
    def budget_text(self) -> str:
        """The budget as tables and notes state it, such as `40000 steps`."""
        if self.budget_epochs is not None:
            return f"{self.budget_epochs} epochs"
        return f"{self.budget_steps} steps"

    @property
    def stem(self) -> str:
        """File name stem shared by this workload's exports."""
        return f"{self.study}-{self.scale}-{self.label}-{self.run_id}"


@dataclass(frozen=True)
class AnalysisOptions:
    metric: str = "steps"
    """Time to target in `steps`, `progress` (the workload's tokens or examples) or
    `seconds` of training."""
    confidence: float = 0.9
    """Level of the bootstrap and slope confidence intervals."""
    bootstrap_samples: int = 2000
    """Resamples of the seeds; the bootstrap runs only where a cell has 2+ seeds."""
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in TIME_METRICS:
            raise StudyFileError(
                f"time metric {self.metric!r} is invalid; use one of {TIME_METRICS}"
            )
        if not 0.5 <= self.confidence < 1.0:
            raise StudyFileError(
                f"confidence level {self.confidence} is invalid; use a value in "
                "[0.5, 1), for example 0.9"
            )
        if self.bootstrap_samples < 100:
            raise StudyFileError(
                f"{self.bootstrap_samples} bootstrap resamples are too few; use 100 "
                "or more"
            )
        if self.bootstrap_seed < 0:
            raise StudyFileError(
                f"bootstrap seed {self.bootstrap_seed} is invalid; use 0 or more"
            )


@dataclass
class LinearTrend:
    """Weighted least squares p* = intercept + slope * log2(batch size)."""

    slope: float
    intercept: float
    slope_stderr: float
    slope_ci: tuple[float, float]
    confidence: float
    points: int
    reduced_chi2: float
    """Weighted residual sum of squares per degree of freedom; NaN with 2 points."""
    residuals: dict[int, float]

    def predict(self, batch_sizes) -> np.ndarray:
        return self.intercept + self.slope * np.log2(np.asarray(batch_sizes, float))

    def describe(self) -> str:
        low, high = self.slope_ci
        return (
            f"p* = {self.intercept:.3f} {self.slope:+.3f} * log2(batch size), "
            f"slope {self.confidence:.0%} CI [{low:+.3f}, {high:+.3f}] "
            f"(weighted least squares over {self.points} batch sizes)"
        )


@dataclass
class NoiseScaleTrend:
    """p* = amplitude * ln(eps * ln(1/sigma)) / ln(sigma), sigma = sigma_1 / sqrt(B).

    The form is the order-of-magnitude optimum of AdamPower's limiting update
    in the high-noise regime (Proposition 4.3 of "GradPower: Powering
    Gradients for Faster Language Model Pre-Training"), which holds up to a
    constant factor: `amplitude`.
    `sigma_1` is the gradient noise scale at batch size 1 in the model's
    gradient units, and `eps` is Adam's epsilon, fixed rather than fitted.
    """

    amplitude: float
    sigma_1: float
    eps: float
    points: int
    weighted_rss: float
    residuals: dict[int, float]
    at_bound: bool = False
    """Whether sigma_1 ended at its search bound or the amplitude at 0, which
    means the form cannot follow the measured trend."""

    def predict(self, batch_sizes) -> np.ndarray:
        batch = np.asarray(batch_sizes, dtype=float)
        return self.amplitude * _noise_scale_shape(
            -math.log(self.sigma_1) + 0.5 * np.log(batch), self.eps
        )

    def describe(self) -> str:
        return (
            f"p* = {self.amplitude:.3f} * ln(eps ln(1/sigma)) / ln(sigma), "
            f"sigma = {self.sigma_1:.3g} / sqrt(batch size), eps = {self.eps:g} "
            f"(weighted least squares over {self.points} batch sizes)"
        )


@dataclass
class PowerAnalysis:
    run: RecordedRun
    options: AnalysisOptions
    trials: pd.DataFrame
    """The recorded trials with `time` (inf unless reached) and `bound` columns."""
    cells: pd.DataFrame
    """One row per (batch_size, power): the time to target of the best lr_max as the
    median over seeds, its lower bound when censored, and its bootstrap CI."""
    best: pd.DataFrame
    """One row per batch size: the best power on the grid, p*, and their spread."""
    at_best_step: pd.DataFrame | None
    """One row per (batch_size, power): the target metric at the step where the best
    cell of the batch size reaches the target; None without MLflow histories."""
    linear: LinearTrend | None
    noise_scale: NoiseScaleTrend | None
    notes: list[str] = field(default_factory=list)

    @property
    def time_unit(self) -> str:
        if self.options.metric == "progress":
            return self.run.progress_unit
        return self.options.metric

    def counts(self) -> dict[str, int]:
        states = self.trials.end_state.value_counts()
        return {
            state: int(states.get(state, 0))
            for state in ("reached", "censored", "diverged", "failed")
        }


# Reading recorded runs


def _trial_rows(
    study: optuna.Study, label: str, workload: str, progress_unit: str
) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        rows.append(
            {
                "number": trial.number,
                "trial_key": attrs.get("trial_key", f"trial-{trial.number}"),
                "mlflow_run_id": attrs.get("mlflow_run_id"),
                "label": label,
                "workload": workload,
                **trial.params,
                "end_state": attrs.get("end_state", "failed"),
                "steps_to_target": attrs.get("steps_to_target"),
                "progress_to_target": attrs.get(f"{progress_unit}_to_target"),
                "seconds_to_target": attrs.get("seconds_to_target"),
                "steps_done": attrs.get("steps_done"),
                "seconds_done": attrs.get("time_train_sec"),
                "val_loss": attrs.get("val_loss"),
                "val_accuracy": attrs.get("val_accuracy"),
            }
        )
    frame = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    # A resumed run may hold a grid point twice; the later record wins.
    return frame.sort_values("number").drop_duplicates("trial_key", keep="last")


def _load_curves(client, trials: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Read the evaluation histories of every trial from MLflow."""
    rows = []
    for key, run_id in zip(trials.trial_key, trials.mlflow_run_id):
        if not run_id:
            continue
        for metric in metrics:
            for point in client.get_metric_history(run_id, metric):
                rows.append((key, metric, int(point.step), float(point.value)))
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def _recorded_eps(client, parent_run_id: str, label: str) -> float | None:
    """Adam's epsilon from the run's metadata.json artifact, if it names one."""
    from study.recording import read_metadata

    try:
        config = read_metadata(client, parent_run_id)["config"]
        eps = config["workloads"][label]["train"]["eps"]
    except (OSError, KeyError, TypeError, ValueError) as error:
        logger.debug("no recorded eps for %s: %s", label, error)
        return None
    return float(eps)


def load_runs(
    storage: str,
    study: str,
    scale: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> list[RecordedRun]:
    """Read every workload of one study run (the latest one unless `run_id` is set).

    With `tracking_uri`, also read the validation histories and Adam's epsilon
    from MLflow. Without it, or when MLflow has no record of the run, the
    analysis that needs curves is skipped.
    """
    chosen, matching = _recorded_studies(storage, study, scale, run_id)
    client = None
    if tracking_uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)

    runs = []
    for summary in matching:
        attrs = summary.user_attrs
        optuna_study = optuna.load_study(study_name=summary.study_name, storage=storage)
        run = RecordedRun(
            study=study,
            scale=scale,
            run_id=chosen,
            label=attrs["label"],
            workload=attrs["workload"],
            progress_unit=attrs["progress_unit"],
            budget_steps=int(attrs["budget_steps"]),
            budget_epochs=attrs.get("budget_epochs"),
            target_metric=attrs["target_metric"],
            target_value=float(attrs["target_value"]),
            target_mode=attrs["target_mode"],
            target_stop=bool(attrs.get("target_stop", True)),
            trials=_trial_rows(
                optuna_study, attrs["label"], attrs["workload"], attrs["progress_unit"]
            ),
            parent_run_id=attrs.get("mlflow_parent_run_id"),
        )
        if client is not None:
            _attach_mlflow_records(client, run)
        runs.append(run)
    return sorted(runs, key=lambda r: r.label)


def _recorded_studies(
    storage: str, study: str, scale: str, run_id: str | None
) -> tuple[str, list[optuna.study.StudySummary]]:
    """Return the run id (the latest recorded one unless `run_id` is set) and
    the summaries of its Optuna studies, one per workload."""
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
            f"run `{command_name()} run` first or pass the right --workspace and "
            "--scale"
        )
    run_ids = sorted({s.user_attrs["run_id"] for s in matching})
    chosen = run_id or run_ids[-1]
    if chosen not in run_ids:
        raise StudyFileError(
            f"Run {chosen!r} of study {study!r} is not recorded; recorded runs: {run_ids}"
        )
    return chosen, [s for s in matching if s.user_attrs["run_id"] == chosen]


def finished_trial_count(
    storage: str, study: str, scale: str, run_id: str | None = None
) -> tuple[str, int]:
    """Return the run id (the latest unless `run_id` is set) and how many of its
    grid points have a finished trial recorded in Optuna."""
    chosen, matching = _recorded_studies(storage, study, scale, run_id)
    keys = set()
    for summary in matching:
        recorded = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in recorded.get_trials(deepcopy=False):
            keys.add(
                (summary.study_name, trial.user_attrs.get("trial_key", trial.number))
            )
    return chosen, len(keys)


def _attach_mlflow_records(client, run: RecordedRun) -> None:
    from mlflow.exceptions import MlflowException

    metrics = list(dict.fromkeys(["val/loss", run.target_metric]))
    try:
        run.curves = _load_curves(client, run.trials, metrics)
    except MlflowException as error:
        logger.warning("no MLflow histories for %s: %s", run.label, error)
        return
    if run.parent_run_id:
        try:
            eps = _recorded_eps(client, run.parent_run_id, run.label)
        except MlflowException as error:
            logger.debug("no metadata.json for run %s: %s", run.parent_run_id, error)
            eps = None
        if eps is not None:
            run.adam_eps = eps
            run.eps_recorded = True


# Times to target per trial


def _trial_times(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Add `time` (inf unless reached) and `bound` (a lower bound on the time).

    A censored trial's bound is its budget in the chosen unit. For seconds it
    is the trial's training time. For tokens and examples it is the step
    budget times the batch size times the progress per step and batch
    element of the reached trials, because progress per step grows linearly
    with the batch size.
    """
    frame = trials.copy()
    reached = frame.end_state == "reached"
    column = f"{metric}_to_target"
    frame["time"] = np.where(
        reached, pd.to_numeric(frame[column], errors="coerce"), np.inf
    )
    steps_done = pd.to_numeric(frame.steps_done, errors="coerce")
    if metric == "steps":
        budget = steps_done
    elif metric == "seconds":
        budget = pd.to_numeric(frame.seconds_done, errors="coerce")
    else:
        per_element = (
            frame.progress_to_target[reached].astype(float)
            / frame.steps_to_target[reached].astype(float)
            / frame.batch_size[reached].astype(float)
        )
        rate = float(per_element.median()) if len(per_element) else np.nan
        budget = steps_done * frame.batch_size.astype(float) * rate
    frame["bound"] = np.where(reached, frame.time, budget.astype(float))
    return frame


# Cells, the best power and p* per batch size


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval; `lower`/`higher` ranks keep infinite samples exact."""
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return (np.nan, np.nan)
    tail = (1.0 - confidence) / 2.0
    low = np.quantile(samples, tail, method="lower")
    high = np.quantile(samples, 1.0 - tail, method="higher")
    return (float(low), float(high))


def _median_samples(
    values: np.ndarray, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Row 0: the median over the recorded seeds; rows 1..: bootstrap resamples."""
    count = len(values)
    if resamples == 0:
        return np.array([np.median(values)])
    index = np.vstack([np.arange(count), rng.integers(0, count, (resamples, count))])
    return np.median(values[index], axis=1)


def grid_optimum(
    powers: np.ndarray, times: np.ndarray, ties: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Locate the minimum of time over the power grid, row by row.

    `times` and `ties` have shape (rows, powers); `times` is inf where no
    time is known. Ties in time go to the lower `ties` value (the validation
    loss at the end), then to the power nearest 1. Returns the index of the
    best power (-1 where no time is finite), p*, whether the minimum has a
    grid point on each side, and whether p* comes from a parabola.

    p* is the vertex of the parabola through log time at the minimum and its
    two neighbours. Where a neighbour has no time (censored or diverged) or
    the three points are flat, p* is the grid power itself.
    """
    rows = np.arange(times.shape[0])
    distance = np.broadcast_to(np.abs(powers - 1.0), times.shape)
    best = np.lexsort((distance, ties, times), axis=-1)[:, 0]
    has_winner = np.isfinite(times[rows, best])
    last = len(powers) - 1
    bracketed = (best > 0) & (best < last) & has_winner

    left = np.clip(best - 1, 0, last)
    right = np.clip(best + 1, 0, last)
    x0, x1, x2 = powers[left], powers[best], powers[right]
    with np.errstate(divide="ignore", invalid="ignore"):
        y0 = np.log(times[rows, left])
        y1 = np.log(times[rows, best])
        y2 = np.log(times[rows, right])
        curvature = ((y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)) / (x2 - x0)
        numerator = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
        denominator = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
        vertex = x1 - 0.5 * numerator / denominator
    quadratic = bracketed & np.isfinite(y0) & np.isfinite(y2) & (curvature > 0)
    p_star = np.where(quadratic, vertex, x1)
    p_star = np.where(has_winner, p_star, np.nan)
    return np.where(has_winner, best, -1), p_star, bracketed, quadratic


def p_star_sd(
    spacing: float, seed_variance: float | None, quadratic: bool, bracketed: bool
) -> float:
    """Return the uncertainty of p* that weights the trend fits (1 / sd^2).

    A p* read off the grid carries a grid term: h^2/12, the variance of a
    uniform error within one grid cell of width h, or h^2 at the grid edge,
    where p* may lie beyond the last power. A parabola's vertex has no grid
    term. The bootstrap variance over seeds adds to both; without it (one
    seed) a vertex gets the grid term h^2/12 as a stand-in. The sd is at
    least h/10, so a batch size whose resamples all agree cannot take all
    the weight.
    """
    if quadratic:
        variance = spacing**2 / 12.0 if seed_variance is None else seed_variance
    else:
        variance = spacing**2 / 12.0 if bracketed else spacing**2
        variance += seed_variance or 0.0
    return max(math.sqrt(variance), spacing / 10.0)


def _grid_spacing(powers: np.ndarray, index: int) -> float:
    gaps = []
    if index > 0:
        gaps.append(powers[index] - powers[index - 1])
    if index < len(powers) - 1:
        gaps.append(powers[index + 1] - powers[index])
    return float(np.mean(gaps)) if gaps else np.nan


@dataclass
class _PowerCell:
    """Medians over seeds of every lr_max at one (batch size, power)."""

    power: float
    lr_values: list[float]
    times: list[np.ndarray]
    ties: list[np.ndarray]
    bounds: list[float]
    reached_values: list[np.ndarray]
    states: pd.Series


def _power_cells(
    group: pd.DataFrame, resamples: int, rng: np.random.Generator
) -> list[_PowerCell]:
    cells = []
    for power, at_power in group.groupby("power"):
        cell = _PowerCell(float(power), [], [], [], [], [], at_power.end_state)
        for lr_max, trials in at_power.groupby("lr_max"):
            included = trials[~trials.end_state.isin(EXCLUDED_STATES)]
            if included.empty:
                continue
            cell.lr_values.append(float(lr_max))
            cell.times.append(_median_samples(included.time.to_numpy(), resamples, rng))
            losses = included.val_loss.astype(float).to_numpy()
            cell.ties.append(_median_samples(losses, resamples, rng))
            cell.bounds.append(float(np.median(included.bound.astype(float))))
            cell.reached_values.append(
                included.time[included.end_state == "reached"].values
            )
        cells.append(cell)
    return cells


def _analyze_batch_size(
    batch_size: int,
    group: pd.DataFrame,
    options: AnalysisOptions,
    rng: np.random.Generator,
) -> tuple[list[dict], dict]:
    """Return the cell rows and the best-power row of one batch size."""
    seeds_per_cell = group.groupby(["power", "lr_max"]).size()
    resamples = options.bootstrap_samples if seeds_per_cell.max() >= 2 else 0
    power_cells = _power_cells(group, resamples, rng)

    cell_rows = []
    grid_powers, grid_times, grid_ties = [], [], []
    for cell in power_cells:
        counts = cell.states.value_counts()
        row = {
            "batch_size": batch_size,
            "power": cell.power,
            "lr_max": np.nan,
            "state": "failed",
            "time": np.nan,
            "bound": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "spread": np.nan,
            "seeds": len(cell.states),
            "reached": int(counts.get("reached", 0)),
            "censored": int(counts.get("censored", 0)),
            "excluded": int(sum(counts.get(s, 0) for s in EXCLUDED_STATES)),
        }
        if not cell.times:
            row["state"] = "diverged" if counts.get("diverged", 0) else "failed"
            if row["state"] == "diverged":
                # A diverged cell never reaches the target: it ranks last.
                grid_powers.append(cell.power)
                grid_times.append(np.full(resamples + 1, np.inf))
                grid_ties.append(np.full(resamples + 1, np.inf))
            cell_rows.append(row)
            continue
        times = np.vstack(cell.times)
        ties = np.vstack(cell.ties)
        choice = np.lexsort((ties, times), axis=0)[0]
        columns = np.arange(times.shape[1])
        best_times = times[choice, columns]
        grid_powers.append(cell.power)
        grid_times.append(best_times)
        grid_ties.append(ties[choice, columns])

        chosen = int(choice[0])
        row["lr_max"] = cell.lr_values[chosen]
        if np.isfinite(best_times[0]):
            row["state"] = "reached"
            row["time"] = float(best_times[0])
            reached = cell.reached_values[chosen]
            if len(reached) >= 2:
                row["spread"] = float(np.std(reached, ddof=1))
        else:
            row["state"] = "censored"
            row["bound"] = float(min(cell.bounds))
        if resamples:
            row["ci_low"], row["ci_high"] = _percentile_interval(
                best_times[1:], options.confidence
            )
        cell_rows.append(row)

    counts = group.end_state.value_counts()
    best_row = {
        "batch_size": batch_size,
        "best_power": np.nan,
        "time": np.nan,
        "time_ci_low": np.nan,
        "time_ci_high": np.nan,
        "p_star": np.nan,
        "p_star_ci_low": np.nan,
        "p_star_ci_high": np.nan,
        "p_star_sd": np.nan,
        "method": "none",
        "bracketed": False,
        "lr_max": np.nan,
        "seeds": int(group.seed.nunique()),
        "resamples": resamples,
        "reached": int(counts.get("reached", 0)),
        "censored": int(counts.get("censored", 0)),
        "diverged": int(counts.get("diverged", 0)),
        "failed": int(counts.get("failed", 0)),
        "no_winner_share": np.nan,
    }
    if not grid_powers:
        return cell_rows, best_row

    order = np.argsort(grid_powers)
    powers = np.asarray(grid_powers)[order]
    times = np.vstack(grid_times)[order].T
    ties = np.vstack(grid_ties)[order].T
    best, p_star, bracketed, quadratic = grid_optimum(powers, times, ties)
    if best[0] < 0:
        return cell_rows, best_row

    best_power = float(powers[best[0]])
    best_cell = next(r for r in cell_rows if r["power"] == best_power)
    best_row.update(
        best_power=best_power,
        time=float(times[0, best[0]]),
        p_star=float(p_star[0]),
        method="quadratic" if quadratic[0] else "grid",
        bracketed=bool(bracketed[0]),
        lr_max=best_cell["lr_max"],
    )
    seed_variance = None
    if resamples:
        resampled = p_star[1:]
        finite = resampled[np.isfinite(resampled)]
        if finite.size >= 2:
            seed_variance = float(np.var(finite, ddof=1))
        best_row["p_star_ci_low"], best_row["p_star_ci_high"] = _percentile_interval(
            resampled, options.confidence
        )
        winner_times = times[np.arange(1, times.shape[0]), best[1:]]
        winner_times = np.where(best[1:] >= 0, winner_times, np.inf)
        best_row["time_ci_low"], best_row["time_ci_high"] = _percentile_interval(
            winner_times, options.confidence
        )
        best_row["no_winner_share"] = float(np.mean(best[1:] < 0))
    spacing = _grid_spacing(powers, int(best[0]))
    best_row["p_star_sd"] = p_star_sd(
        spacing, seed_variance, bool(quadratic[0]), bool(bracketed[0])
    )
    return cell_rows, best_row


# The target metric of every trial when the best one reaches the target


def _last_value_at_or_before(curve: pd.DataFrame, step: float) -> float:
    earlier = curve[curve.step <= step]
    if earlier.empty:
        return np.nan
    return float(earlier.sort_values("step").value.iloc[-1])


def values_at_best_step(
    run: RecordedRun, trials: pd.DataFrame, best: pd.DataFrame
) -> pd.DataFrame | None:
    """Read each trial's target metric at the step where its batch size's best
    cell reaches the target. This is how Figure 6 and Table 2 of "GradPower:
    Powering Gradients for Faster Language Model Pre-Training" compare powers
    across batch sizes.

    The step is the median steps to target over the best cell's reached seeds.
    Each trial contributes its last evaluation at or before that step. A trial
    that diverged or failed at or before the step is left out. Per power the
    value is the median over seeds of the lr_max whose median is best.
    """
    if run.curves is None or run.curves.empty:
        return None
    curves = run.curves[run.curves.metric == run.target_metric]
    better_is_lower = run.target_mode == "min"
    rows = []
    for _, best_row in best.dropna(subset=["best_power"]).iterrows():
        batch_size = int(best_row.batch_size)
        at_batch = trials[trials.batch_size == batch_size]
        winners = at_batch[
            (at_batch.power == best_row.best_power)
            & (at_batch.lr_max == best_row.lr_max)
            & (at_batch.end_state == "reached")
        ]
        step = float(np.median(winners.steps_to_target.astype(float)))
        values = []
        for trial in at_batch.itertuples():
            ended_early = trial.end_state in EXCLUDED_STATES and (
                pd.isna(trial.steps_done) or trial.steps_done <= step
            )
            curve = curves[curves.trial_key == trial.trial_key]
            value = np.nan if ended_early else _last_value_at_or_before(curve, step)
            values.append((trial.power, trial.lr_max, value))
        frame = pd.DataFrame(values, columns=["power", "lr_max", "value"])
        for power, at_power in frame.groupby("power"):
            per_lr = at_power.groupby("lr_max").value.median().dropna()
            if per_lr.empty:
                rows.append((batch_size, power, np.nan, np.nan, step))
                continue
            lr_max = per_lr.idxmin() if better_is_lower else per_lr.idxmax()
            rows.append((batch_size, power, float(per_lr[lr_max]), lr_max, step))
    view = pd.DataFrame(
        rows, columns=["batch_size", "power", "value", "lr_max", "best_step"]
    )
    view["best"] = False
    for _, group in view.dropna(subset=["value"]).groupby("batch_size"):
        score = group.value if better_is_lower else -group.value
        ranked = group.assign(score=score, distance=(group.power - 1.0).abs())
        winner = ranked.sort_values(["score", "distance"]).index[0]
        view.loc[winner, "best"] = True
    return view


# Trends across batch sizes


def fit_linear_trend(
    batch_sizes: np.ndarray,
    p_star: np.ndarray,
    sd: np.ndarray,
    confidence: float,
) -> LinearTrend:
    """Fit p* = a + b log2(B) by weighted least squares with weights 1/sd^2.

    The slope's standard error takes the sd values as known (the error of a
    fit to measurements with stated uncertainties) and, with 3+ points, is
    scaled up by sqrt(chi^2 / dof) when the points scatter more than their sd
    explains. The interval uses Student's t with n - 2 degrees of freedom, or the
    normal quantile with 2 points.
    """
    x = np.log2(np.asarray(batch_sizes, dtype=float))
    y = np.asarray(p_star, dtype=float)
    weights = 1.0 / np.asarray(sd, dtype=float) ** 2
    x_mean = np.sum(weights * x) / np.sum(weights)
    y_mean = np.sum(weights * y) / np.sum(weights)
    sxx = np.sum(weights * (x - x_mean) ** 2)
    slope = float(np.sum(weights * (x - x_mean) * (y - y_mean)) / sxx)
    intercept = float(y_mean - slope * x_mean)
    residuals = y - (intercept + slope * x)
    dof = len(x) - 2
    chi2 = float(np.sum(weights * residuals**2))
    stderr = 1.0 / math.sqrt(sxx)
    tail = 1.0 - (1.0 - confidence) / 2.0
    if dof > 0:
        reduced = chi2 / dof
        stderr *= max(1.0, math.sqrt(reduced))
        quantile = float(stats.t.ppf(tail, dof))
    else:
        reduced = np.nan
        quantile = float(stats.norm.ppf(tail))
    return LinearTrend(
        slope=slope,
        intercept=intercept,
        slope_stderr=stderr,
        slope_ci=(slope - quantile * stderr, slope + quantile * stderr),
        confidence=confidence,
        points=len(x),
        reduced_chi2=reduced,
        residuals={int(b): float(r) for b, r in zip(batch_sizes, residuals)},
    )


def _noise_scale_shape(log_inverse_sigma: np.ndarray, eps: float) -> np.ndarray:
    """ln(eps ln(1/sigma)) / ln(sigma) for ln(1/sigma) > 0."""
    return -np.log(eps * log_inverse_sigma) / log_inverse_sigma


def fit_noise_scale_trend(
    batch_sizes: np.ndarray, p_star: np.ndarray, sd: np.ndarray, eps: float
) -> NoiseScaleTrend:
    """Fit the high-noise optimum of AdamPower with sigma = sigma_1 / sqrt(B).

    For a fixed sigma_1 the best amplitude is a weighted least-squares
    solution in closed form, so the fit scans ln(1/sigma) at the smallest
    batch size on a log grid from 1e-3 to 60 (sigma from 0.999 to 1e-26) and
    then refines the best grid point with a bounded scalar search.
    """
    batch = np.asarray(batch_sizes, dtype=float)
    y = np.asarray(p_star, dtype=float)
    weights = 1.0 / np.asarray(sd, dtype=float) ** 2
    half_log_batch = 0.5 * np.log(batch)
    offset = half_log_batch - half_log_batch.min()

    def amplitude_and_rss(log_margin: float) -> tuple[float, float]:
        shape = _noise_scale_shape(math.exp(log_margin) + offset, eps)
        amplitude = max(0.0, np.sum(weights * shape * y) / np.sum(weights * shape**2))
        return amplitude, float(np.sum(weights * (y - amplitude * shape) ** 2))

    grid = np.linspace(math.log(1e-3), math.log(60.0), 400)
    rss = np.array([amplitude_and_rss(value)[1] for value in grid])
    index = int(np.argmin(rss))
    low, high = grid[max(index - 1, 0)], grid[min(index + 1, len(grid) - 1)]
    refined = optimize.minimize_scalar(
        lambda value: amplitude_and_rss(value)[1], bounds=(low, high), method="bounded"
    )
    log_margin = float(refined.x) if refined.fun <= rss[index] else float(grid[index])
    amplitude, weighted_rss = amplitude_and_rss(log_margin)
    # ln(1/sigma_B) = margin + ln(sqrt(B / B_min)), so sigma_1 = sigma_Bmin * sqrt(B_min).
    sigma_1 = math.exp(-math.exp(log_margin) + half_log_batch.min())
    at_bound = amplitude == 0.0 or index in (0, len(grid) - 1)
    trend = NoiseScaleTrend(
        float(amplitude), sigma_1, eps, len(y), weighted_rss, {}, at_bound
    )
    residuals = y - trend.predict(batch)
    trend.residuals = {int(b): float(r) for b, r in zip(batch, residuals)}
    return trend


# The whole analysis of one workload


def _count_notes(run: RecordedRun, trials: pd.DataFrame) -> list[str]:
    notes = []
    excluded = trials[trials.end_state.isin(EXCLUDED_STATES)]
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
            f"{censored} trial(s) censored at the budget of {run.budget_text}; "
            "their cells show lower bounds"
        )
    return notes


TIE_BREAK_RULE = (
    "ties go to the lower median val/loss at the trials' last evaluation, then "
    "to the power nearest 1"
)


def _tie_notes(cells: pd.DataFrame, best: pd.DataFrame, unit: str) -> list[str]:
    """Name the batch sizes whose best power shares its time with other powers,
    and the rule that chose among them (`grid_optimum`)."""
    notes = []
    for row in best.dropna(subset=["best_power"]).itertuples():
        tied = cells[
            (cells.batch_size == row.batch_size)
            & (cells.state == "reached")
            & (cells.time == row.time)
        ]
        if len(tied) < 2:
            continue
        powers = ", ".join(f"p={power:g}" for power in sorted(tied.power))
        notes.append(
            f"batch size {row.batch_size}: {powers} tie at {row.time:g} {unit} "
            f"to the target; {TIE_BREAK_RULE}, which chose p={row.best_power:g}"
        )
    return notes


def analyze_run(
    run: RecordedRun, options: AnalysisOptions | None = None
) -> PowerAnalysis:
    """Find the best power per batch size and fit its trend against batch size."""
    options = options or AnalysisOptions()
    if run.trials.empty:
        raise StudyFileError(
            f"Workload {run.label} of run {run.run_id} of {run.study} ({run.scale}) "
            "has no finished trials yet, so it cannot be analyzed; continue the "
            f"run with `{command_name()} resume` first"
        )
    trials = _trial_times(run.trials, options.metric)
    notes = _count_notes(run, trials)
    rng = np.random.default_rng(options.bootstrap_seed)

    cell_rows, best_rows = [], []
    for batch_size, group in trials.groupby("batch_size"):
        cells, best = _analyze_batch_size(int(batch_size), group, options, rng)
        cell_rows.extend(cells)
        best_rows.append(best)
    cells_frame = pd.DataFrame(cell_rows)
    best = pd.DataFrame(best_rows)

    for row in best.itertuples():
        if math.isnan(row.best_power):
            notes.append(
                f"batch size {row.batch_size}: no power reached the target, so it "
                "has no best p"
            )
        elif not row.bracketed:
            notes.append(
                f"batch size {row.batch_size}: the minimum is at the grid edge "
                f"p={row.best_power:g}, not bracketed; the best p may lie beyond"
            )
    unit = run.progress_unit if options.metric == "progress" else options.metric
    notes.extend(_tie_notes(cells_frame, best, unit))
    two_seeds = best[(best.resamples > 0) & (best.seeds == 2)].batch_size.tolist()
    if two_seeds:
        notes.append(
            f"batch size(s) {', '.join(map(str, two_seeds))}: 2 seeds give at most "
            "3 distinct medians per cell, so read their bootstrap CIs as rough"
        )
    partial = cells_frame[
        (cells_frame.excluded > 0) & (cells_frame.excluded < cells_frame.seeds)
    ]
    for row in partial.itertuples():
        notes.append(
            f"batch size {row.batch_size}, p={row.power:g}: the median leaves out "
            f"{row.excluded} of {row.seeds} seeds that diverged or failed"
        )

    at_best_step = values_at_best_step(run, trials, best)
    if at_best_step is None:
        notes.append(
            "no MLflow histories: the view at the best trial's step is skipped"
        )

    linear = noise_scale = None
    fitted = best.dropna(subset=["p_star", "p_star_sd"])
    if len(fitted) >= 2:
        arguments = (fitted.batch_size.to_numpy(), fitted.p_star, fitted.p_star_sd)
        linear = fit_linear_trend(*arguments, options.confidence)
        noise_scale = fit_noise_scale_trend(*arguments, run.adam_eps)
        if len(fitted) <= 2:
            notes.append(
                "2 batch sizes: each trend has 2 constants, so fitting it to 2 "
                "points tests nothing"
            )
        if noise_scale.at_bound:
            notes.append(
                "the noise-scale fit ended at a bound of its search (sigma_1 or an "
                "amplitude of 0): that form cannot follow this trend"
            )
        if not run.eps_recorded:
            notes.append(
                "Adam's eps could not be read from the run's metadata.json; the "
                f"noise-scale fit assumes the default {DEFAULT_ADAM_EPS:g}"
            )
    else:
        notes.append(
            "no trend fit: it needs p* at 2 or more batch sizes, and here "
            f"{len(fitted)} batch size(s) have one"
        )
    return PowerAnalysis(
        run=run,
        options=options,
        trials=trials,
        cells=cells_frame,
        best=best,
        at_best_step=at_best_step,
        linear=linear,
        noise_scale=noise_scale,
        notes=notes,
    )
