"""Analysis on hand-built trial sets with known answers."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest

from study.analysis import (
    CURVE_COLUMNS,
    TRIAL_COLUMNS,
    AnalysisOptions,
    RecordedRun,
    analyze_run,
    fit_linear_trend,
    fit_noise_scale_trend,
    grid_optimum,
    load_runs,
    p_star_sd,
)
from study.spec import StudyFileError

POWERS = [0.8, 0.9, 1.0, 1.1, 1.2, 1.3]


def make_run(
    rows: list[dict], budget: int = 100, curves: pd.DataFrame | None = None
) -> RecordedRun:
    filled = []
    for index, row in enumerate(rows):
        state = row["end_state"]
        steps = row.get("steps_to_target")
        filled.append(
            {
                "number": index,
                "trial_key": f"trial-{index}",
                "mlflow_run_id": None,
                "label": "lm",
                "workload": "lm",
                "lr_max": 1e-3,
                "seed": 0,
                "steps_done": steps if state == "reached" else budget,
                "seconds_done": 2.0 * budget if state != "reached" else None,
                "progress_to_target": (
                    steps * row["batch_size"] * 32 if state == "reached" else None
                ),
                "seconds_to_target": 2.0 * steps if state == "reached" else None,
                "val_loss": 3.0,
                **row,
            }
        )
    return RecordedRun(
        study="batch_power_grid",
        scale="smoke",
        run_id="r1",
        label="lm",
        workload="lm",
        progress_unit="tokens",
        budget_steps=budget,
        target_metric="val/loss",
        target_value=3.5,
        target_mode="min",
        trials=pd.DataFrame(filled, columns=TRIAL_COLUMNS),
        curves=curves,
    )


def reached(batch_size, power, steps, **extra):
    return {
        "batch_size": batch_size,
        "power": power,
        "end_state": "reached",
        "steps_to_target": steps,
        **extra,
    }


def ended(batch_size, power, state, **extra):
    return {"batch_size": batch_size, "power": power, "end_state": state, **extra}


def quadratic_rows(batch_size: int, optimum: float, powers=POWERS) -> list[dict]:
    """log(steps) = 5 (p - optimum)^2 + log(50): an exact parabola in p."""
    return [
        reached(batch_size, p, 50.0 * math.exp(5.0 * (p - optimum) ** 2))
        for p in powers
    ]


def best_row(analysis, batch_size: int):
    return analysis.best.set_index("batch_size").loc[batch_size]


def cell(analysis, batch_size: int, power: float):
    cells = analysis.cells
    return cells[(cells.batch_size == batch_size) & (cells.power == power)].iloc[0]


def test_quadratic_minimum_recovered():
    analysis = analyze_run(make_run(quadratic_rows(16, optimum=1.03)))
    best = best_row(analysis, 16)
    assert best.best_power == 1.0
    assert best.method == "quadratic"
    assert bool(best.bracketed)
    assert best.p_star == pytest.approx(1.03, abs=1e-9)


def test_quadratic_uneven_grid():
    powers = [0.6, 0.9, 1.0, 1.4]
    analysis = analyze_run(make_run(quadratic_rows(8, 0.97, powers)))
    assert best_row(analysis, 8).p_star == pytest.approx(0.97, abs=1e-9)


def test_grid_edge_not_bracketed():
    # Steps fall all the way to the largest power: the minimum lies at or beyond it.
    rows = [reached(32, p, 100 - 50 * (p - 0.8)) for p in POWERS]
    analysis = analyze_run(make_run(rows))
    best = best_row(analysis, 32)
    assert best.best_power == 1.3
    assert not bool(best.bracketed)
    assert best.method == "grid"
    assert best.p_star == 1.3
    # One seed: the sd is the grid spacing alone, h, at the edge.
    assert best.p_star_sd == pytest.approx(0.1)
    assert any("grid edge p=1.3" in note for note in analysis.notes)


def test_censored_neighbour_keeps_grid_power():
    rows = [
        reached(8, 1.0, 40),
        reached(8, 1.1, 30),
        ended(8, 1.2, "censored"),
    ]
    best = best_row(analyze_run(make_run(rows)), 8)
    assert best.best_power == 1.1
    assert bool(best.bracketed)
    assert best.method == "grid"
    assert best.p_star == 1.1


def test_censored_only_batch_size():
    rows = [
        *quadratic_rows(8, 1.1),
        *[ended(16, p, "censored") for p in POWERS],
        *quadratic_rows(32, 0.9),
    ]
    analysis = analyze_run(make_run(rows, budget=1000))
    row16 = best_row(analysis, 16)
    assert np.isnan(row16.best_power)
    assert np.isnan(row16.p_star)
    assert row16.censored == len(POWERS)
    assert cell(analysis, 16, 1.0).state == "censored"
    assert cell(analysis, 16, 1.0).bound == 1000
    assert any("batch size 16: no power reached" in note for note in analysis.notes)
    # The trend uses only the batch sizes that have p*.
    assert analysis.linear is not None
    assert analysis.linear.points == 2
    assert set(analysis.linear.residuals) == {8, 32}


def test_seed_median_known():
    rows = [
        reached(8, 1.0, 30, seed=0),
        reached(8, 1.0, 50, seed=1),
        reached(8, 1.0, 40, seed=2),
        # A censored seed ranks above every reached one: median of 20, 60, inf is 60.
        reached(8, 1.2, 20, seed=0),
        reached(8, 1.2, 60, seed=1),
        ended(8, 1.2, "censored", seed=2),
    ]
    analysis = analyze_run(make_run(rows))
    assert cell(analysis, 8, 1.0).time == 40
    assert cell(analysis, 8, 1.0).spread == pytest.approx(10.0)
    assert cell(analysis, 8, 1.2).time == 60
    best = best_row(analysis, 8)
    assert best.best_power == 1.0
    assert best.time == 40
    assert best.resamples == AnalysisOptions().bootstrap_samples
    assert best.time_ci_low <= 40 <= best.time_ci_high
    # The winner of a resample may be p=1.2, whose seeds span 20 to censored.
    assert 20 <= best.time_ci_low
    assert best.time_ci_high <= 60
    # A cell's own interval stays within its seeds.
    assert cell(analysis, 8, 1.0).ci_low >= 30
    assert cell(analysis, 8, 1.0).ci_high <= 50
    assert cell(analysis, 8, 1.2).ci_high == np.inf


def test_censored_median_is_lower_bound():
    rows = [
        reached(8, 1.0, 40, seed=0),
        reached(8, 1.0, 44, seed=1),
        reached(8, 1.2, 10, seed=0),
        ended(8, 1.2, "censored", seed=1),
    ]
    analysis = analyze_run(make_run(rows))
    censored = cell(analysis, 8, 1.2)
    assert censored.state == "censored"
    # The median of 10 and a value of at least 100 is at least 55.
    assert censored.bound == 55
    best = best_row(analysis, 8)
    assert best.best_power == 1.0
    assert best.time == 42


def test_bootstrap_seeded_and_level():
    rows = [
        reached(8, p, 40 + 10 * abs(p - 1.0) + seed, seed=seed)
        for p in (0.9, 1.0, 1.1)
        for seed in range(5)
    ]
    run = make_run(rows)
    first = best_row(analyze_run(run, AnalysisOptions(bootstrap_seed=3)), 8)
    again = best_row(analyze_run(run, AnalysisOptions(bootstrap_seed=3)), 8)
    wide = best_row(analyze_run(run, AnalysisOptions(confidence=0.99)), 8)
    assert (first.time_ci_low, first.time_ci_high) == (
        again.time_ci_low,
        again.time_ci_high,
    )
    assert first.p_star_ci_low == again.p_star_ci_low
    assert (
        wide.time_ci_high - wide.time_ci_low >= first.time_ci_high - first.time_ci_low
    )


def test_bootstrap_skipped_with_one_seed():
    best = best_row(analyze_run(make_run(quadratic_rows(8, 1.0))), 8)
    assert best.resamples == 0
    assert np.isnan(best.p_star_ci_low)
    # sd is then the grid term alone: h / sqrt(12) inside the grid.
    assert best.p_star_sd == pytest.approx(0.1 / math.sqrt(12))


def test_p_star_sd_rules():
    h = 0.2
    # Grid power inside the grid: uniform error over one cell.
    assert p_star_sd(h, None, False, True) == pytest.approx(h / math.sqrt(12))
    # Grid power at the edge: a whole grid step.
    assert p_star_sd(h, None, False, False) == pytest.approx(h)
    assert p_star_sd(h, 0.01, False, False) == pytest.approx(math.sqrt(h**2 + 0.01))
    # A vertex with seeds: the bootstrap variance alone, floored at h / 10.
    assert p_star_sd(h, 0.03**2, True, True) == pytest.approx(0.03)
    assert p_star_sd(h, 0.0, True, True) == pytest.approx(h / 10)
    # A vertex from one seed: the grid term stands in.
    assert p_star_sd(h, None, True, True) == pytest.approx(h / math.sqrt(12))


def test_planted_trend_slope():
    # p* falls by 0.1 per doubling of batch size: 1.25, 1.15, 1.05, 0.95.
    rows = []
    for index, batch_size in enumerate([8, 16, 32, 64]):
        rows += quadratic_rows(batch_size, 1.25 - 0.1 * index)
    analysis = analyze_run(make_run(rows))
    assert list(analysis.best.p_star) == pytest.approx([1.25, 1.15, 1.05, 0.95])
    trend = analysis.linear
    assert trend.slope == pytest.approx(-0.1, abs=1e-9)
    assert trend.intercept == pytest.approx(1.55, abs=1e-9)
    assert trend.slope_ci[0] <= -0.1 <= trend.slope_ci[1]
    assert max(abs(r) for r in trend.residuals.values()) < 1e-9


def test_weighted_fit_discounts_uncertain_point():
    batch = np.array([8, 16, 32, 64])
    p_star = np.array([1.3, 1.2, 1.1, 1.6])
    sd = np.array([0.01, 0.01, 0.01, 100.0])
    trend = fit_linear_trend(batch, p_star, sd, 0.9)
    assert trend.slope == pytest.approx(-0.1, abs=1e-4)
    assert trend.residuals[64] == pytest.approx(0.6, abs=1e-3)


def test_slope_interval_widens_with_scatter():
    batch = np.array([8, 16, 32, 64, 128])
    sd = np.full(5, 0.01)
    clean = fit_linear_trend(batch, 1.6 - 0.1 * np.log2(batch), sd, 0.9)
    noisy = fit_linear_trend(
        batch, 1.6 - 0.1 * np.log2(batch) + [0.1, -0.1, 0.1, -0.1, 0.1], sd, 0.9
    )
    assert clean.slope_ci[1] - clean.slope_ci[0] < noisy.slope_ci[1] - noisy.slope_ci[0]
    assert noisy.reduced_chi2 > 1


def test_noise_scale_fit_recovers_constants():
    amplitude, sigma_1, eps = 0.4, 1e-3, 1e-8
    batch = np.array([32, 64, 128, 256, 512, 1024])
    log_inverse_sigma = -np.log(sigma_1) + 0.5 * np.log(batch)
    p_star = amplitude * -np.log(eps * log_inverse_sigma) / log_inverse_sigma
    trend = fit_noise_scale_trend(batch, p_star, np.full(6, 0.05), eps)
    assert trend.amplitude == pytest.approx(amplitude, rel=1e-3)
    assert trend.sigma_1 == pytest.approx(sigma_1, rel=1e-2)
    assert not trend.at_bound
    assert max(abs(r) for r in trend.residuals.values()) < 1e-4
    assert list(trend.predict(batch)) == pytest.approx(list(p_star), abs=1e-4)


def test_noise_scale_fit_flags_rising_trend():
    batch = np.array([8, 16, 32, 64])
    trend = fit_noise_scale_trend(batch, [0.8, 0.9, 1.0, 1.1], np.full(4, 0.05), 1e-8)
    assert trend.at_bound


def test_excluded_trials_counted():
    rows = [
        reached(8, 1.0, 40),
        ended(8, 1.2, "diverged"),
        ended(8, 0.8, "failed"),
        reached(16, 1.0, 30),
        reached(16, 1.2, 20),
    ]
    analysis = analyze_run(make_run(rows))
    row8 = best_row(analysis, 8)
    assert row8.best_power == 1.0
    assert row8.diverged == 1
    assert row8.failed == 1
    # A diverged cell ranks last, so 1.0 has a worse neighbour above it; the failed
    # cell leaves the grid, so 1.0 is the lowest power there.
    assert cell(analysis, 8, 1.2).state == "diverged"
    assert 0.8 in set(analysis.cells.power)
    assert analysis.counts() == {
        "reached": 3,
        "censored": 0,
        "diverged": 1,
        "failed": 1,
    }
    assert any("2 trial(s) excluded" in note for note in analysis.notes)


def test_diverged_seed_left_out_of_median():
    rows = [
        reached(8, 1.0, 40, seed=0),
        reached(8, 1.0, 50, seed=1),
        ended(8, 1.0, "diverged", seed=2),
    ]
    analysis = analyze_run(make_run(rows))
    assert cell(analysis, 8, 1.0).time == 45
    assert any("leaves out 1 of 3 seeds" in note for note in analysis.notes)


def test_tie_broken_by_validation_loss():
    rows = [
        reached(8, 1.0, 40, val_loss=3.45),
        reached(8, 1.2, 40, val_loss=3.40),
        reached(8, 0.8, 40, val_loss=3.48),
    ]
    assert best_row(analyze_run(make_run(rows)), 8).best_power == 1.2


def test_tie_named_in_notes():
    rows = [
        reached(8, 1.0, 40, val_loss=3.45),
        reached(8, 1.2, 40, val_loss=3.40),
        reached(8, 1.4, 50, val_loss=3.30),
        reached(16, 1.0, 20, val_loss=3.45),
        reached(16, 1.2, 30, val_loss=3.40),
    ]
    notes = analyze_run(make_run(rows)).notes
    ties = [note for note in notes if "tie" in note]
    assert len(ties) == 1
    assert ties[0].startswith("batch size 8: p=1, p=1.2 tie at 40 steps")
    assert "lower median val/loss" in ties[0]
    assert ties[0].endswith("which chose p=1.2")


def test_run_without_trials_rejected():
    with pytest.raises(StudyFileError, match="no finished trials yet"):
        analyze_run(make_run([]))


def test_grid_optimum_rows_independent():
    powers = np.array([0.8, 1.0, 1.2])
    times = np.array([[3.0, 2.0, 3.0], [np.inf, np.inf, np.inf], [1.0, 2.0, 3.0]])
    best, p_star, bracketed, quadratic = grid_optimum(powers, times, np.zeros((3, 3)))
    assert list(best) == [1, -1, 0]
    assert p_star[0] == pytest.approx(1.0)
    assert np.isnan(p_star[1])
    assert list(bracketed) == [True, False, False]
    assert list(quadratic) == [True, False, False]


def test_seconds_and_tokens_metrics():
    rows = [reached(8, 1.0, 40), reached(8, 1.2, 30), ended(8, 0.8, "censored")]
    run = make_run(rows, budget=100)
    seconds = analyze_run(run, AnalysisOptions(metric="seconds"))
    assert cell(seconds, 8, 1.2).time == 60.0
    assert cell(seconds, 8, 0.8).bound == 200.0
    tokens = analyze_run(run, AnalysisOptions(metric="progress"))
    assert tokens.time_unit == "tokens"
    assert cell(tokens, 8, 1.2).time == 30 * 8 * 32
    assert cell(tokens, 8, 0.8).bound == 100 * 8 * 32


def test_invalid_options_rejected():
    with pytest.raises(StudyFileError, match="time metric"):
        AnalysisOptions(metric="minutes")
    with pytest.raises(StudyFileError, match="confidence"):
        AnalysisOptions(confidence=1.5)
    with pytest.raises(StudyFileError, match="100 or more"):
        AnalysisOptions(bootstrap_samples=5)
    with pytest.raises(StudyFileError, match="bootstrap seed -1 is invalid; use 0"):
        AnalysisOptions(bootstrap_seed=-1)


def _curves(points: dict[str, list[tuple[int, float]]]) -> pd.DataFrame:
    rows = [
        (key, "val/loss", step, value)
        for key, series in points.items()
        for step, value in series
    ]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def test_value_at_best_step():
    rows = [
        reached(8, 1.0, 20),  # trial-0
        reached(8, 1.2, 30),  # trial-1
        ended(8, 0.8, "censored"),  # trial-2
        ended(8, 1.4, "diverged", steps_done=10),  # trial-3
    ]
    curves = _curves(
        {
            "trial-0": [(10, 3.9), (20, 3.4)],
            "trial-1": [(10, 4.0), (15, 3.7), (25, 3.6), (30, 3.45)],
            "trial-2": [(10, 4.2), (20, 3.8), (30, 3.7)],
            "trial-3": [(5, 4.5), (10, 4.4)],
        }
    )
    analysis = analyze_run(make_run(rows, curves=curves))
    view = analysis.at_best_step.set_index("power")
    assert set(view.best_step) == {20.0}
    assert view.loc[1.0, "value"] == 3.4
    # The last evaluation at or before step 20.
    assert view.loc[1.2, "value"] == 3.7
    assert view.loc[0.8, "value"] == 3.8
    # Diverged at step 10, before step 20: left out.
    assert np.isnan(view.loc[1.4, "value"])
    assert view[view.best].index.tolist() == [1.0]


def test_no_curves_skips_view():
    analysis = analyze_run(make_run(quadratic_rows(8, 1.0)))
    assert analysis.at_best_step is None
    assert any("no MLflow histories" in note for note in analysis.notes)


def _record_optuna_study(storage: str, run_id: str, rows: list[dict]) -> None:
    study = optuna.create_study(
        study_name=f"batch_power_grid/smoke/lm/{run_id}", storage=storage
    )
    attributes = {
        "study": "batch_power_grid",
        "scale": "smoke",
        "run_id": run_id,
        "label": "lm",
        "workload": "lm",
        "progress_unit": "tokens",
        "target_metric": "val/loss",
        "target_value": 3.5,
        "target_mode": "min",
        "budget_steps": 100,
        "mlflow_parent_run_id": "parent-1",
    }
    for key, value in attributes.items():
        study.set_user_attr(key, value)
    distributions = {
        "batch_size": optuna.distributions.CategoricalDistribution([8]),
        "power": optuna.distributions.CategoricalDistribution([1.0, 1.2]),
        "lr_max": optuna.distributions.CategoricalDistribution([0.001]),
        "seed": optuna.distributions.CategoricalDistribution([0]),
    }
    for row in rows:
        state = row["end_state"]
        attrs = {"end_state": state, "trial_key": row["key"], "steps_done": 100}
        if state == "reached":
            attrs.update(
                steps_to_target=row["steps"],
                tokens_to_target=row["steps"] * 256,
                seconds_to_target=1.5,
            )
        study.add_trial(
            optuna.trial.create_trial(
                params={
                    "batch_size": 8,
                    "power": row["power"],
                    "lr_max": 0.001,
                    "seed": 0,
                },
                distributions=distributions,
                value=float(row["steps"]) if state == "reached" else None,
                state=(
                    optuna.trial.TrialState.COMPLETE
                    if state == "reached"
                    else optuna.trial.TrialState.PRUNED
                ),
                user_attrs=attrs,
            )
        )


def test_load_runs_latest_and_deduplicated(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    _record_optuna_study(
        storage,
        "20250101-000000-aaaa",
        [{"key": "a", "power": 1.0, "steps": 9, "end_state": "reached"}],
    )
    # A resumed run recorded trial `b` twice; the later record wins.
    _record_optuna_study(
        storage,
        "20250102-000000-bbbb",
        [
            {"key": "a", "power": 1.0, "steps": 40, "end_state": "reached"},
            {"key": "b", "power": 1.2, "steps": 0, "end_state": "censored"},
            {"key": "b", "power": 1.2, "steps": 30, "end_state": "reached"},
        ],
    )
    (run,) = load_runs(storage, "batch_power_grid", "smoke")
    assert run.run_id == "20250102-000000-bbbb"
    assert run.parent_run_id == "parent-1"
    assert sorted(run.trials.trial_key) == ["a", "b"]
    analysis = analyze_run(run)
    assert best_row(analysis, 8).best_power == 1.2
    assert cell(analysis, 8, 1.2).time == 30
    (older,) = load_runs(storage, "batch_power_grid", "smoke", "20250101-000000-aaaa")
    assert list(older.trials.progress_to_target) == [9 * 256]
    with pytest.raises(StudyFileError, match="not recorded"):
        load_runs(storage, "batch_power_grid", "smoke", "missing")
    with pytest.raises(StudyFileError, match="No recorded run"):
        load_runs(storage, "batch_power_grid", "cpu")
