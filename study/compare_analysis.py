"""Analysis of the fixed-budget comparison studies and the lr_max tuning study.

Every trial of these studies trains for its whole step budget and ends with
its final validation loss. `analyze_compare` reads the studies recorded with
analysis "compare" (power_sweep, adam_vs_adampower, muon_power, blockwise_lr)
and builds:

- one cell per (setting, batch size, variant): the median final loss over
  seeds at the variant's own best lr_max;
- the gap of each variant to its baseline, the p = 1 variant of the same base
  optimizer without Blockwise LR in the same setting (positive: the variant
  reaches a lower loss);
- the best power per (setting, batch size, base optimizer, Blockwise LR);
- per series of model sizes, a power law L(N) = A * N^(-alpha) in the number
  of model parameters N for each variant.

`analyze_lr_tune` reads the studies recorded with analysis "lr_tune" and
picks the Adam (p = 1) lr_max with the lowest median final loss per (label,
batch size). Diverged and failed trials are counted, shown as such and left
out of every median. `study.compare_export` turns both into tables and plots.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd
import sqlalchemy
from scipy import stats

from study.spec import StudyFileError
from trainers.tables import DOWNSTREAM_COLUMNS

BASELINE_POWER = 1.0
BASE_OPTIMIZERS = {"adampower": "Adam", "muonpower": "Muon"}
BLOCKWISE_SUFFIX = " + Blockwise LR"
END_STATES = ("complete", "diverged", "failed")
# Relative tolerance when two recorded losses count as a tie.
LOSS_TIE_RTOL = 1e-12
# A group of variants gets a best-power row only from this many powers on,
# because with 2 powers the gap table already shows which one is better.
MIN_SWEEP_POWERS = 3

TRIAL_COLUMNS = [
    "number",
    "trial_key",
    "mlflow_run_id",
    "label",
    "setting",
    "series",
    "workload",
    "optimizer",
    "blockwise_lr",
    "schedule",
    "model",
    "data",
    "budget_steps",
    "batch_size",
    "power",
    "lr_max",
    "seed",
    "end_state",
    "val_loss",
    "val_accuracy",
    "train_loss",
    "model_params",
    "steps_done",
    "time_train_sec",
    "planned_powers",
    "downstream",
]


@dataclass
class PowerLawFit:
    """Least squares fit of log L = log A - alpha * log N over model sizes N."""

    series: str
    batch_size: int | None
    """The batch size of every point, or None when the series mixes batch sizes
    (one batch size per model size)."""
    variant: str
    amplitude: float
    """A, in units of the loss."""
    alpha: float
    points: int
    r_squared: float
    """Coefficient of determination of the log-log fit, NaN with 2 points."""
    alpha_stderr: float
    """Standard error of alpha from the residuals, NaN with 2 points."""
    params: list[float]
    losses: list[float]

    @property
    def exact(self) -> bool:
        """Whether the line passes through both of exactly two points."""
        return self.points == 2

    def predict(self, params) -> np.ndarray:
        return self.amplitude * np.asarray(params, dtype=float) ** (-self.alpha)

    def describe(self) -> str:
        text = (
            f"L = {self.amplitude:.4g} * N^(-{self.alpha:.4f}) over "
            f"{self.points} model sizes"
        )
        if self.exact:
            return text + " (exact through 2 points, no error estimate)"
        return text + f", alpha s.e. {self.alpha_stderr:.4f}, R^2 {self.r_squared:.4f}"


@dataclass
class CompareAnalysis:
    study: str
    scale: str
    run_id: str
    trials: pd.DataFrame
    """One row per recorded trial (TRIAL_COLUMNS plus `base` and `variant`)."""
    cells: pd.DataFrame
    """One row per (setting, batch_size, variant): median loss over the seeds of
    the variant's best lr_max, with its spread, the lr_max used and the state."""
    gaps: pd.DataFrame
    """The cells with their baseline, gap, relative gap and paired gap."""
    best_powers: pd.DataFrame
    """One row per (setting, batch_size, base, blockwise_lr) with 3+ powers."""
    fits: list[PowerLawFit]
    fit_gaps: pd.DataFrame
    """Per fitted variant with a fitted baseline: both fits at the largest N."""
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    curves: Any = None
    """The gap during training and the loss spikes (`study.compare_curves`),
    when the run's MLflow histories were read; None otherwise."""
    findings: list[str] = field(default_factory=list)
    downstream: pd.DataFrame = field(default_factory=pd.DataFrame)
    """One row per cell whose trials recorded zero-shot downstream accuracy:
    the mean over those seeds of each task's acc and acc_norm, and `average`."""

    @property
    def stem(self) -> str:
        """File name stem shared by this run's exports."""
        return f"{self.study}-{self.scale}-{self.run_id}"


@dataclass
class BestRate:
    """The best Adam lr_max of one (label, batch size) of an lr_tune run."""

    label: str
    workload: str
    model: dict
    data: dict
    batch_size: int
    lr_max: float
    val_loss: float
    """Median final validation loss over the complete seeds at `lr_max`."""
    seeds: int
    """Number of complete seeds behind `val_loss`."""
    run_id: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LrTuneAnalysis:
    study: str
    scale: str
    run_id: str
    trials: pd.DataFrame
    """One row per recorded trial with power 1.0 (TRIAL_COLUMNS)."""
    grid: pd.DataFrame
    """One row per (label, batch_size, lr_max): median loss, seeds, state."""
    best: list[BestRate]
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        """File name stem shared by this run's exports."""
        return f"{self.study}-{self.scale}-{self.run_id}"


# Reading recorded runs


def _shown_storage(storage: str) -> str:
    """Return the storage URL with any password replaced by ***."""
    try:
        return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<unparsable storage URL>"


def _json_attribute(value, name: str, study_name: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as error:
        raise StudyFileError(
            f"Optuna study {study_name!r} records an invalid JSON {name!r} "
            f"attribute ({error}): {value!r}"
        ) from None
    if not isinstance(parsed, dict):
        raise StudyFileError(
            f"Optuna study {study_name!r} records {name!r} as {parsed!r}; "
            "expected a JSON object of settings"
        )
    return parsed


def _load_studies(
    storage: str, study: str, scale: str, run_id: str | None, analysis: str
) -> tuple[str, list[tuple[dict, optuna.Study]]]:
    """Return the chosen run id and the (user_attrs, study) pairs of that run."""
    summaries = [
        s
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if s.user_attrs.get("study") == study and s.user_attrs.get("scale") == scale
    ]
    matching = [s for s in summaries if s.user_attrs.get("analysis") == analysis]
    if not matching:
        found = sorted({str(s.user_attrs.get("analysis")) for s in summaries})
        other = (
            f" (its recorded runs have analysis {', '.join(found)})" if found else ""
        )
        raise StudyFileError(
            f"No recorded run of study {study!r} (analysis {analysis}) at scale {scale!r} "
            f"in {_shown_storage(storage)}{other}; run `study run {study} --scale "
            f"{scale}` first or pass the right --workspace/--scale"
        )
    run_ids = sorted({s.user_attrs["run_id"] for s in matching})
    chosen = run_id or run_ids[-1]
    if chosen not in run_ids:
        raise StudyFileError(
            f"Run {chosen!r} of study {study!r} at scale {scale!r} is not recorded "
            f"in {_shown_storage(storage)}; recorded runs: {run_ids}"
        )
    loaded = [
        (
            dict(s.user_attrs),
            optuna.load_study(study_name=s.study_name, storage=storage),
        )
        for s in matching
        if s.user_attrs["run_id"] == chosen
    ]
    return chosen, sorted(loaded, key=lambda pair: pair[0].get("label", ""))


def _float_or_nan(value) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _trial_rows(attrs: dict, optuna_study: optuna.Study) -> list[dict]:
    name = optuna_study.study_name
    label = attrs.get("label", name)
    setting = attrs.get("setting") or label
    rows = []
    for trial in optuna_study.get_trials(deepcopy=False):
        trial_attrs = trial.user_attrs
        loss = trial_attrs.get("val_loss", trial.value)
        rows.append(
            {
                "number": trial.number,
                "trial_key": trial_attrs.get("trial_key", f"{name}/{trial.number}"),
                "mlflow_run_id": trial_attrs.get("mlflow_run_id"),
                "label": label,
                "setting": str(setting),
                "series": attrs.get("series") or None,
                "workload": attrs.get("workload"),
                "optimizer": attrs.get("optimizer", "adampower"),
                "blockwise_lr": bool(attrs.get("blockwise_lr", False)),
                "schedule": attrs.get("schedule"),
                "model": json.dumps(_json_attribute(attrs.get("model"), "model", name)),
                "data": json.dumps(_json_attribute(attrs.get("data"), "data", name)),
                # The trial's own step budget; older runs stored only the entry's.
                "budget_steps": trial_attrs.get(
                    "step_budget", attrs.get("budget_steps")
                ),
                "batch_size": trial.params.get("batch_size"),
                "power": _float_or_nan(trial.params.get("power")),
                "lr_max": _float_or_nan(trial.params.get("lr_max")),
                "seed": trial.params.get("seed"),
                # A trial without an end state never finished recording.
                "end_state": trial_attrs.get("end_state", "failed"),
                "val_loss": _float_or_nan(loss),
                "val_accuracy": _float_or_nan(trial_attrs.get("val_accuracy")),
                "train_loss": _float_or_nan(trial_attrs.get("train_loss")),
                "model_params": _float_or_nan(trial_attrs.get("model_params")),
                "steps_done": trial_attrs.get("steps_done"),
                "time_train_sec": _float_or_nan(trial_attrs.get("time_train_sec")),
                # The entry's whole power grid, finished or not.
                "planned_powers": _planned(trial, "power"),
                # {task: {"acc": ..., "acc_norm": ...}} of an entry with downstream.
                "downstream": trial_attrs.get("downstream") or None,
            }
        )
    return rows


def _planned(trial: optuna.trial.FrozenTrial, axis: str) -> tuple | None:
    distribution = trial.distributions.get(axis)
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return tuple(sorted(float(choice) for choice in distribution.choices))
    return None


def _read_trials(
    loaded: list[tuple[dict, optuna.Study]], notes: list[str]
) -> pd.DataFrame:
    rows = []
    for attrs, optuna_study in loaded:
        frame = pd.DataFrame(_trial_rows(attrs, optuna_study), columns=TRIAL_COLUMNS)
        # A resumed run may contain a grid point twice, and the later record wins.
        frame = frame.sort_values("number").drop_duplicates("trial_key", keep="last")
        rows.append(frame)
    trials = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if trials.empty:
        notes.append("the run records no trials")
        return pd.DataFrame(columns=[*TRIAL_COLUMNS, "usable"])
    complete = trials.end_state == "complete"
    finite = np.isfinite(trials.val_loss.astype(float))
    trials["usable"] = complete & finite
    unusable = trials[complete & ~finite]
    if len(unusable):
        notes.append(
            f"{len(unusable)} complete trial(s) record no finite val_loss and are "
            f"left out: {', '.join(unusable.trial_key)}"
        )
    unknown = sorted(set(trials.end_state) - set(END_STATES))
    if unknown:
        notes.append(
            f"end state(s) {unknown} are not complete, diverged or failed; "
            "those trials are left out"
        )
    return trials


def _counts(trials: pd.DataFrame) -> dict[str, int]:
    states = trials.end_state.value_counts()
    counts = {state: int(states.get(state, 0)) for state in END_STATES}
    counts["other"] = int(len(trials) - sum(counts.values()))
    return counts


def _excluded_note(trials: pd.DataFrame) -> str | None:
    excluded = trials[trials.end_state.isin(("diverged", "failed"))]
    if excluded.empty:
        return None
    names = ", ".join(
        f"{k} ({s})" for k, s in zip(excluded.trial_key, excluded.end_state)
    )
    return f"left out of every median: {names}"


# Variants and cells


def _is_baseline_power(power: float) -> bool:
    return math.isclose(power, BASELINE_POWER, rel_tol=0.0, abs_tol=1e-9)


def _baseline_mask(trials: pd.DataFrame) -> pd.Series:
    """Return a boolean Series, True where the trial's power is 1."""
    return trials.power.map(_is_baseline_power).astype(bool)


def base_optimizer_name(base: str, blockwise_lr: bool) -> str:
    """Return the base optimizer's display name, with Blockwise LR when it is on."""
    return base + (BLOCKWISE_SUFFIX if blockwise_lr else "")


def _name_variants(trials: pd.DataFrame) -> pd.DataFrame:
    """Add `base` (Adam or Muon) and `variant` (the display name) to each trial.

    A powered variant carries its power in the name only where its setting
    runs more than one power other than 1 with the same base optimizer.
    """
    trials = trials.copy()
    trials["base"] = [
        BASE_OPTIMIZERS.get(optimizer, str(optimizer)) for optimizer in trials.optimizer
    ]
    powered = trials[~_baseline_mask(trials)]
    power_counts = powered.groupby(["setting", "base"]).power.nunique()
    names = []
    for row in trials.itertuples():
        name = row.base
        if not _is_baseline_power(row.power):
            name += "Power"
            if power_counts.get((row.setting, row.base), 0) > 1:
                name += f" (p={row.power:g})"
        if row.blockwise_lr:
            name += BLOCKWISE_SUFFIX
        names.append(name)
    trials["variant"] = names
    return trials


def _best_lr(usable: pd.DataFrame) -> float:
    """Return the lr_max with the lowest median loss, ties to the smaller lr_max."""
    medians = usable.groupby("lr_max").val_loss.median().sort_index()
    lowest = medians.min()
    tied = medians[np.isclose(medians, lowest, rtol=LOSS_TIE_RTOL, atol=0.0)]
    return float(tied.index[0])


def _failed_state(group: pd.DataFrame) -> str:
    return "diverged" if (group.end_state == "diverged").any() else "failed"


CELL_KEYS = ["setting", "batch_size", "variant"]


def _cell_row(keys: tuple, group: pd.DataFrame) -> dict:
    first = group.iloc[0]
    lrs = sorted(group.lr_max.unique())
    row = {
        **dict(zip(CELL_KEYS, keys)),
        "base": first.base,
        "power": float(first.power),
        "blockwise_lr": bool(first.blockwise_lr),
        "series": first.series,
        "workload": first.workload,
        "lr_grid": len(lrs),
        "lr_max": math.nan,
        "loss": math.nan,
        "loss_sd": math.nan,
        "accuracy": math.nan,
        "seeds": 0,
        "excluded_seeds": 0,
        "model_params": float(group.model_params.median()),
        "state": _failed_state(group),
    }
    usable = group[group.usable]
    if usable.empty:
        return row
    lr_max = _best_lr(usable)
    chosen = usable[usable.lr_max == lr_max]
    row.update(
        lr_max=lr_max,
        loss=float(chosen.val_loss.median()),
        loss_sd=float(chosen.val_loss.std(ddof=1)) if len(chosen) >= 2 else math.nan,
        accuracy=float(chosen.val_accuracy.median()),
        seeds=len(chosen),
        excluded_seeds=int((group.lr_max == lr_max).sum() - len(chosen)),
        model_params=float(chosen.model_params.median()),
        state="complete",
    )
    return row


CELL_COLUMNS = [
    *CELL_KEYS,
    "base",
    "power",
    "blockwise_lr",
    "series",
    "workload",
    "lr_grid",
    "lr_max",
    "loss",
    "loss_sd",
    "accuracy",
    "seeds",
    "excluded_seeds",
    "model_params",
    "state",
]


def _build_cells(trials: pd.DataFrame) -> pd.DataFrame:
    rows = [_cell_row(keys, group) for keys, group in trials.groupby(CELL_KEYS)]
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


# Gaps to the baseline


def chosen_trials(
    trials: pd.DataFrame, setting, batch_size, variant: str, lr_max: float
) -> pd.DataFrame:
    """Return the usable trials of one cell at one lr_max."""
    return trials[
        (trials.setting == setting)
        & (trials.batch_size == batch_size)
        & (trials.variant == variant)
        & (trials.lr_max == lr_max)
        & trials.usable
    ]


def _chosen_losses(trials: pd.DataFrame, cell: pd.Series) -> pd.Series:
    """Return the usable losses by seed at the cell's lr_max."""
    selected = chosen_trials(
        trials, cell.setting, cell.batch_size, cell.variant, cell.lr_max
    )
    return selected.groupby("seed").val_loss.median()


def _build_downstream(cells: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Average each cell's downstream accuracies over the seeds of its chosen
    trials, in the column order of the GradPower paper's Table 1.

    A task that some of those trials did not record is left out of the cell.
    """
    rows = []
    for cell in cells.itertuples():
        if math.isnan(cell.lr_max):
            continue
        chosen = chosen_trials(
            trials, cell.setting, cell.batch_size, cell.variant, cell.lr_max
        )
        results = [result for result in chosen.downstream if isinstance(result, dict)]
        if not results:
            continue
        row: dict[str, Any] = {
            "setting": cell.setting,
            "batch_size": cell.batch_size,
            "variant": cell.variant,
            "lr_max": cell.lr_max,
            "seeds": len(results),
        }
        table_values = []
        for task, (_, metric) in DOWNSTREAM_COLUMNS.items():
            if not all(task in result for result in results):
                continue
            for name in ("acc", "acc_norm"):
                values = [float(result[task].get(name, math.nan)) for result in results]
                row[f"{task}/{name}"] = float(np.mean(values))
            for name in ("examples", "cut"):
                values = [float(result[task].get(name, math.nan)) for result in results]
                row[f"{task}/{name}"] = max(values)
            table_values.append(row[f"{task}/{metric}"])
        row["average"] = float(np.mean(table_values)) if table_values else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _planned_powers(trials: pd.DataFrame) -> set[float]:
    """Return every power of the grids of `trials`, recorded or not."""
    return {
        float(power) for powers in trials.planned_powers.dropna() for power in powers
    }


def _gap_row(cell: pd.Series, cells: pd.DataFrame, trials: pd.DataFrame) -> dict:
    row = {
        **cell.to_dict(),
        "baseline": str(cell.base),
        "baseline_lr_max": math.nan,
        "baseline_loss": math.nan,
        "gap": math.nan,
        "relative_gap_pct": math.nan,
        "paired_gap": math.nan,
        "paired_seeds": 0,
        "status": "",
    }

    if cell.variant == row["baseline"]:
        row["status"] = "baseline"
        return row
    matches = cells[
        (cells.setting == cell.setting)
        & (cells.batch_size == cell.batch_size)
        & (cells.variant == row["baseline"])
    ]
    if matches.empty:
        same_sweep = trials[
            (trials.setting == cell.setting)
            & (trials.batch_size == cell.batch_size)
            & (trials.base == cell.base)
        ]
        if BASELINE_POWER in _planned_powers(same_sweep):
            row["status"] = f"no baseline: {row['baseline']} has no recorded trial yet"
        else:
            row["status"] = f"no baseline: {row['baseline']} was not run"
        return row

    baseline = matches.iloc[0]
    row["baseline_lr_max"] = baseline.lr_max
    row["baseline_loss"] = baseline.loss
    if baseline.state != "complete":
        row["status"] = f"baseline {row['baseline']} {baseline.state}"
        return row
    if cell.state != "complete":
        row["status"] = str(cell.state)
        return row

    row["gap"] = float(baseline.loss - cell.loss)
    row["relative_gap_pct"] = 100.0 * row["gap"] / float(baseline.loss)
    paired = (_chosen_losses(trials, baseline) - _chosen_losses(trials, cell)).dropna()
    if len(paired) >= 2:
        row["paired_gap"] = float(paired.median())
        row["paired_seeds"] = len(paired)
    row["status"] = "ok"
    return row


def _build_gaps(cells: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    rows = [_gap_row(cell, cells, trials) for _, cell in cells.iterrows()]
    gaps = pd.DataFrame(rows)
    if gaps.empty:
        return gaps
    # Baseline first, then the other variants by name, within each row.
    gaps["order"] = (gaps.status != "baseline").astype(int)
    gaps = gaps.sort_values(["setting", "batch_size", "base", "order", "variant"])
    return gaps.drop(columns="order").reset_index(drop=True)


# The best power


def _parabola_vertex(x: np.ndarray, y: np.ndarray) -> float | None:
    """Return the vertex of the parabola through 3 points, or None unless convex."""
    (x0, x1, x2), (y0, y1, y2) = x, y
    curvature = ((y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)) / (x2 - x0)
    if not curvature > 0:
        return None
    numerator = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    denominator = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    return float(x1 - 0.5 * numerator / denominator)


def _best_power_row(keys: tuple, group: pd.DataFrame, planned: set[float]) -> dict:
    """Return the best power of one sweep; `planned` contains every power of its
    grid, also those not recorded yet."""
    setting, batch_size, base, blockwise = keys
    powers = np.array(sorted(group.power.unique()), dtype=float)
    losses = group.groupby("power").loss.min().reindex(powers).to_numpy(dtype=float)
    row = {
        "setting": setting,
        "batch_size": batch_size,
        "base": base,
        "blockwise_lr": bool(blockwise),
        "powers": len(powers),
        "best_power": math.nan,
        "best_loss": math.nan,
        "p_star": math.nan,
        "method": "none: every power diverged or failed",
        "at_edge": False,
    }
    finite = np.isfinite(losses)
    if not finite.any():
        return row

    # Ties go to the power nearest 1, the smaller change from the baseline.
    order = np.lexsort(
        (np.abs(powers - BASELINE_POWER), np.where(finite, losses, np.inf))
    )
    index = int(order[0])
    row.update(
        best_power=float(powers[index]),
        best_loss=float(losses[index]),
        p_star=float(powers[index]),
    )

    if index == 0 or index == len(powers) - 1:
        side = "lower" if index == 0 else "upper"
        beyond = sorted(
            p for p in planned if (p < powers[0] if index == 0 else p > powers[-1])
        )
        if beyond:
            listed = ", ".join(f"p={p:g}" for p in beyond)
            row["method"] = (
                f"grid, at the {side} edge of the recorded powers; {listed} not "
                "recorded yet"
            )
            return row
        row["method"] = f"grid, at the {side} edge of the grid"
        row["at_edge"] = True
        return row

    neighbours = [index - 1, index + 1]
    missing = [powers[i] for i in neighbours if not finite[i]]
    if missing:
        listed = ", ".join(f"p={p:g}" for p in missing)
        row["method"] = f"grid, neighbour {listed} has no loss"
        return row

    window = [index - 1, index, index + 1]
    vertex = _parabola_vertex(powers[window], losses[window])
    if vertex is None:
        row["method"] = "grid, the three losses around the minimum are not convex"
        return row
    row["p_star"] = vertex
    row["method"] = "quadratic through the minimum and its neighbours"
    return row


def _build_best_powers(cells: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    keys = ["setting", "batch_size", "base", "blockwise_lr"]
    planned = {key: _planned_powers(group) for key, group in trials.groupby(keys)}
    rows = [
        _best_power_row(key, group, planned.get(key, set()))
        for key, group in cells.groupby(keys)
        if group.power.nunique() >= MIN_SWEEP_POWERS
    ]
    columns = [*keys, "powers", "best_power", "best_loss", "p_star", "method"]
    return pd.DataFrame(rows, columns=[*columns, "at_edge"])


# Loss against model size


def fit_power_law(
    params, losses, series: str, variant: str, batch_size: int | None = None
) -> PowerLawFit:
    """Fit L = A * N^(-alpha) by least squares on log L against log N."""
    x = np.log(np.asarray(params, dtype=float))
    y = np.log(np.asarray(losses, dtype=float))
    if len(np.unique(x)) < 2:
        raise ValueError(
            f"a power-law fit needs 2+ distinct model sizes, got {len(np.unique(x))}"
        )
    result = stats.linregress(x, y)
    points = len(x)
    r_squared = alpha_stderr = math.nan
    if points >= 3:
        r_squared = float(result.rvalue**2)
        alpha_stderr = float(result.stderr)
    return PowerLawFit(
        series=series,
        batch_size=batch_size,
        variant=variant,
        amplitude=float(math.exp(result.intercept)),
        alpha=float(-result.slope),
        points=points,
        r_squared=r_squared,
        alpha_stderr=alpha_stderr,
        params=[float(v) for v in params],
        losses=[float(v) for v in losses],
    )


def _series_groups(cells: pd.DataFrame) -> list[tuple[str, int | None, pd.DataFrame]]:
    """Split the cells of each series into the point sets of its fits.

    A series with several batch sizes at one model size gets one fit per
    batch size, else one fit over all its cells, whose batch size may change
    with the model size.
    """
    groups = []
    with_series = cells[cells.series.notna()]
    for series, group in with_series.groupby("series"):
        sizes_per_params = group.groupby("model_params").batch_size.nunique()
        if (sizes_per_params > 1).any():
            for batch_size, part in group.groupby("batch_size"):
                groups.append((str(series), int(batch_size), part))
        else:
            groups.append((str(series), None, group))
    return groups


def _build_fits(cells: pd.DataFrame, notes: list[str]) -> list[PowerLawFit]:
    fits = []
    if "series" not in cells or cells.series.isna().all():
        return fits
    for series, batch_size, group in _series_groups(cells):
        for variant, points in group.groupby("variant"):
            usable = points[np.isfinite(points.loss) & np.isfinite(points.model_params)]
            sizes = usable.model_params.nunique()
            if sizes < 2:
                where = f"series {series!r}"
                if batch_size is not None:
                    where += f", batch size {batch_size}"
                notes.append(
                    f"{where}, {variant}: {sizes} model size(s) with a finite loss, "
                    "so no power-law fit"
                )
                continue
            fits.append(
                fit_power_law(
                    usable.model_params, usable.loss, series, variant, batch_size
                )
            )
    return fits


def _build_fit_gaps(fits: list[PowerLawFit], cells: pd.DataFrame) -> pd.DataFrame:
    by_key = {(f.series, f.batch_size, f.variant): f for f in fits}
    bases = dict(zip(cells.variant, cells.base))
    rows = []
    for fit in fits:
        baseline_name = bases.get(fit.variant)
        if fit.variant == baseline_name:
            continue
        baseline = by_key.get((fit.series, fit.batch_size, baseline_name))
        if baseline is None:
            continue
        largest = max(max(fit.params), max(baseline.params))
        baseline_loss = float(baseline.predict(largest))
        variant_loss = float(fit.predict(largest))
        rows.append(
            {
                "series": fit.series,
                "batch_size": fit.batch_size,
                "variant": fit.variant,
                "baseline": baseline_name,
                "model_params": largest,
                "baseline_predicted": baseline_loss,
                "variant_predicted": variant_loss,
                "predicted_gap": baseline_loss - variant_loss,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "series",
            "batch_size",
            "variant",
            "baseline",
            "model_params",
            "baseline_predicted",
            "variant_predicted",
            "predicted_gap",
        ],
    )


def fits_frame(fits: list[PowerLawFit]) -> pd.DataFrame:
    """Return one row per power-law fit with its parameters."""
    rows = [
        {
            "series": fit.series,
            "batch_size": fit.batch_size,
            "variant": fit.variant,
            "amplitude": fit.amplitude,
            "alpha": fit.alpha,
            "alpha_stderr": fit.alpha_stderr,
            "r_squared": fit.r_squared,
            "points": fit.points,
            "exact": fit.exact,
        }
        for fit in fits
    ]
    return pd.DataFrame(
        rows,
        columns=[
            "series",
            "batch_size",
            "variant",
            "amplitude",
            "alpha",
            "alpha_stderr",
            "r_squared",
            "points",
            "exact",
        ],
    )


# The compare analysis


def _compare_notes(
    trials: pd.DataFrame, gaps: pd.DataFrame, best: pd.DataFrame, notes: list[str]
) -> None:
    excluded = _excluded_note(trials)
    if excluded:
        notes.append(excluded)
    labels = trials.groupby(CELL_KEYS).label.unique()
    for (setting, batch_size, variant), names in labels.items():
        if len(names) > 1:
            notes.append(
                f"setting {setting!r}, batch size {batch_size}, {variant}: the "
                f"entries {', '.join(sorted(names))} run the same variant, so their "
                "trials are pooled into one cell"
            )
    for row in gaps.itertuples():
        if row.status.startswith(("no baseline", "baseline ")):
            notes.append(
                f"setting {row.setting!r}, batch size {row.batch_size}, "
                f"{row.variant}: {row.status}, so no gap"
            )
        if row.excluded_seeds:
            notes.append(
                f"setting {row.setting!r}, batch size {row.batch_size}, "
                f"{row.variant}: {row.excluded_seeds} seed(s) at lr_max "
                f"{row.lr_max:g} diverged or failed; the median uses the other "
                f"{row.seeds}"
            )
    for row in best.itertuples() if len(best) else ():
        if row.at_edge:
            notes.append(
                f"setting {row.setting!r}, batch size {row.batch_size}, "
                f"{base_optimizer_name(row.base, row.blockwise_lr)}: the best power "
                f"{row.best_power:g} is at the edge of the grid; widen the power grid"
            )


def analyze_compare(
    storage: str, study: str, scale: str, run_id: str | None = None
) -> CompareAnalysis:
    """Analyze one "compare" run (the latest unless `run_id` is set) of a study."""
    chosen, loaded = _load_studies(storage, study, scale, run_id, "compare")
    notes: list[str] = []
    trials = _name_variants(_read_trials(loaded, notes))
    cells = _build_cells(trials)
    gaps = _build_gaps(cells, trials)
    best = _build_best_powers(cells, trials)
    fits = _build_fits(cells, notes)
    fit_gaps = _build_fit_gaps(fits, cells)
    _compare_notes(trials, gaps, best, notes)
    return CompareAnalysis(
        study=study,
        scale=scale,
        run_id=chosen,
        trials=trials,
        cells=cells,
        gaps=gaps,
        best_powers=best,
        fits=fits,
        fit_gaps=fit_gaps,
        counts=_counts(trials),
        notes=notes,
        downstream=_build_downstream(cells, trials),
    )


# The lr_tune analysis


def _lr_grid(trials: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (label, batch_size, lr_max), group in trials.groupby(
        ["label", "batch_size", "lr_max"]
    ):
        usable = group[group.usable]
        rows.append(
            {
                "label": label,
                "batch_size": batch_size,
                "lr_max": lr_max,
                "loss": float(usable.val_loss.median()) if len(usable) else math.nan,
                "loss_sd": (
                    float(usable.val_loss.std(ddof=1)) if len(usable) >= 2 else math.nan
                ),
                "seeds": len(usable),
                "excluded_seeds": len(group) - len(usable),
                "state": "complete" if len(usable) else _failed_state(group),
                "best": False,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "label",
            "batch_size",
            "lr_max",
            "loss",
            "loss_sd",
            "seeds",
            "excluded_seeds",
            "state",
            "best",
        ],
    )


def _pick_rates(
    trials: pd.DataFrame, grid: pd.DataFrame, run_id: str, notes: list[str]
) -> list[BestRate]:
    best = []
    for (label, batch_size), group in grid.groupby(["label", "batch_size"]):
        where = f"label {label!r}, batch size {batch_size}"
        lrs = sorted(group.lr_max)
        usable = trials[
            (trials.label == label) & (trials.batch_size == batch_size) & trials.usable
        ]
        if usable.empty:
            states = trials[
                (trials.label == label) & (trials.batch_size == batch_size)
            ].end_state.value_counts()
            listed = ", ".join(f"{n} {s}" for s, n in states.items())
            notes.append(
                f"{where}: no lr_max completed ({listed}), so it gets no best lr_max; "
                "lower the lr_max grid"
            )
            continue
        lr_max = _best_lr(usable)
        chosen = usable[usable.lr_max == lr_max]
        grid.loc[
            (grid.label == label)
            & (grid.batch_size == batch_size)
            & (grid.lr_max == lr_max),
            "best",
        ] = True
        first = chosen.iloc[0]
        best.append(
            BestRate(
                label=str(label),
                workload=str(first.workload),
                model=json.loads(first.model),
                data=json.loads(first.data),
                batch_size=int(batch_size),
                lr_max=float(lr_max),
                val_loss=float(chosen.val_loss.median()),
                seeds=len(chosen),
                run_id=run_id,
            )
        )
        if len(lrs) == 1:
            notes.append(f"{where}: only lr_max {lr_max:g} was run; widen the grid")
        elif lr_max == lrs[0]:
            notes.append(
                f"{where}: the best lr_max {lr_max:g} is the smallest of the grid; "
                "widen the grid below it"
            )
        elif lr_max == lrs[-1]:
            notes.append(
                f"{where}: the best lr_max {lr_max:g} is the largest of the grid; "
                "widen the grid above it"
            )
    return best


def analyze_lr_tune(
    storage: str, study: str, scale: str, run_id: str | None = None
) -> LrTuneAnalysis:
    """Pick the best Adam lr_max per (label, batch size) of one "lr_tune" run.

    Only trials with power 1.0 count. The best lr_max has the lowest median
    final loss over its complete seeds, and ties go to the smaller lr_max.
    """
    chosen, loaded = _load_studies(storage, study, scale, run_id, "lr_tune")
    notes: list[str] = []
    trials = _read_trials(loaded, notes)
    powered = trials[~_baseline_mask(trials)]
    if len(powered):
        notes.append(
            f"{len(powered)} trial(s) with power other than 1.0 are left out of the "
            "Adam lr_max choice"
        )
    trials = trials[_baseline_mask(trials)].reset_index(drop=True)
    grid = _lr_grid(trials)
    best = _pick_rates(trials, grid, chosen, notes)
    excluded = _excluded_note(trials)
    if excluded:
        notes.append(excluded)
    return LrTuneAnalysis(
        study=study,
        scale=scale,
        run_id=chosen,
        trials=trials,
        grid=grid,
        best=best,
        counts=_counts(trials),
        notes=notes,
    )


def best_learning_rates(
    storage: str, study: str, scale: str, run_id: str | None = None
) -> list[BestRate]:
    """Return the best Adam lr_max per (label, batch size) of an lr_tune run."""
    return analyze_lr_tune(storage, study, scale, run_id).best
