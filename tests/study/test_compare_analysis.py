"""Compare and lr_tune analyses on real Optuna sqlite stores with known results."""

from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pandas as pd
import pytest

from study.compare_analysis import (
    BestRate,
    analyze_compare,
    analyze_lr_tune,
    best_learning_rates,
    fit_power_law,
)
from study.compare_export import (
    compare_markdown,
    export_compare,
    export_lr_tune,
    lr_tune_markdown,
)
from study.spec import StudyFileError

RUN = "20261204-183000-ab12"
LATER_RUN = "20261205-090000-cd34"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def trial(power, loss, seed=0, lr_max=1e-3, batch_size=8, state="complete", **extra):
    return {
        "power": power,
        "val_loss": loss,
        "seed": seed,
        "lr_max": lr_max,
        "batch_size": batch_size,
        "end_state": state,
        **extra,
    }


def record_entry(
    storage: str,
    label: str,
    trials: list[dict],
    *,
    study: str = "adam_vs_adampower",
    scale: str = "cpu",
    run_id: str = RUN,
    analysis: str = "compare",
    setting: str | None = None,
    series: str | None = None,
    optimizer: str = "adampower",
    blockwise_lr: bool = False,
    workload: str = "lm",
    model: dict | None = None,
    data: dict | None = None,
    budget_steps: int = 200,
    power_grid: list[float] | None = None,
) -> None:
    """Record one workload entry as the runner does: one Optuna study, its trials.
    `power_grid` is the entry's whole grid of powers when some are unrecorded."""
    optuna_study = optuna.create_study(
        study_name=f"{study}/{scale}/{label}/{run_id}", storage=storage
    )
    attributes = {
        "study": study,
        "scale": scale,
        "run_id": run_id,
        "label": label,
        "workload": workload,
        "progress_unit": "tokens" if workload == "lm" else "images",
        "mlflow_parent_run_id": "parent-1",
        "budget_steps": budget_steps,
        "analysis": analysis,
        "setting": setting,
        "series": series,
        "optimizer": optimizer,
        "blockwise_lr": blockwise_lr,
        "schedule": "cos",
        "model": json.dumps(model or {"preset": "tiny"}),
        "data": json.dumps(data or {"name": "bible-kjv"}),
    }
    for key, value in attributes.items():
        if value is not None:
            optuna_study.set_user_attr(key, value)
    # Optuna requires one distribution per parameter within a study: the grid.
    distributions = {
        name: optuna.distributions.CategoricalDistribution(
            sorted({row[name] for row in trials})
        )
        for name in ("batch_size", "power", "lr_max", "seed")
        if trials
    }
    if power_grid is not None:
        distributions["power"] = optuna.distributions.CategoricalDistribution(
            power_grid
        )
    for index, row in enumerate(trials):
        params = {name: row[name] for name in distributions}
        state = row["end_state"]
        user_attrs = {
            "end_state": state,
            "trial_key": row.get("trial_key", f"{label}-{index}"),
            "steps_done": budget_steps if state == "complete" else 17,
            "train_loss": 3.0,
            "model_params": float(row.get("model_params", 1.0e6)),
            "time_train_sec": 12.5,
            "mlflow_run_id": f"mlflow-{label}-{index}",
        }
        if row["val_loss"] is not None:
            user_attrs["val_loss"] = row["val_loss"]
        complete = state == "complete"
        optuna_study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                value=row["val_loss"] if complete else None,
                state=(
                    optuna.trial.TrialState.COMPLETE
                    if complete
                    else optuna.trial.TrialState.FAIL
                ),
                user_attrs=user_attrs,
            )
        )


def gap_of(analysis, variant, setting="tiny", batch_size=8) -> pd.Series:
    gaps = analysis.gaps
    rows = gaps[
        (gaps.setting == setting)
        & (gaps.batch_size == batch_size)
        & (gaps.variant == variant)
    ]
    assert len(rows) == 1, f"{variant} in {setting}: {len(rows)} rows"
    return rows.iloc[0]


def parse_markdown_tables(text: str) -> list[pd.DataFrame]:
    """Parse every pipe table of a Markdown text, bold markers removed."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            header = [cell.strip() for cell in block[0].strip("|").split("|")]
            rows = [
                [cell.strip().strip("*") for cell in row.strip("|").split("|")]
                for row in block[2:]
            ]
            tables.append(pd.DataFrame(rows, columns=header))
            block = []
    return tables


# Gaps to the baseline


@pytest.fixture
def adam_rows(storage) -> str:
    """Adam, AdamPower and both with Blockwise LR in setting `tiny`, 2 seeds."""
    record_entry(
        storage,
        "adam",
        [trial(1.0, 3.50, seed=0), trial(1.0, 3.54, seed=1)],
        setting="tiny",
    )
    record_entry(
        storage,
        "adampower",
        [trial(1.2, 3.44, seed=0), trial(1.2, 3.42, seed=1)],
        setting="tiny",
    )
    record_entry(
        storage,
        "adam-blockwise",
        [trial(1.0, 3.47, seed=0), trial(1.0, 3.49, seed=1)],
        setting="tiny",
        blockwise_lr=True,
    )
    record_entry(
        storage,
        "adampower-blockwise",
        [trial(1.2, 3.40, seed=0), trial(1.2, 3.36, seed=1)],
        setting="tiny",
        blockwise_lr=True,
    )
    return storage


def test_adam_gaps_and_baselines(adam_rows):
    analysis = analyze_compare(adam_rows, "adam_vs_adampower", "cpu")
    adam_median = (3.50 + 3.54) / 2
    expected = {
        "AdamPower": (3.44 + 3.42) / 2,
        "Adam + Blockwise LR": (3.47 + 3.49) / 2,
        "AdamPower + Blockwise LR": (3.40 + 3.36) / 2,
    }
    baseline = gap_of(analysis, "Adam")
    assert baseline.status == "baseline"
    assert math.isclose(baseline.loss, adam_median)
    for variant, loss in expected.items():
        row = gap_of(analysis, variant)
        assert row.baseline == "Adam", variant
        assert math.isclose(row.loss, loss), variant
        assert math.isclose(row.gap, adam_median - loss), variant
        assert math.isclose(
            row.relative_gap_pct, 100 * (adam_median - loss) / adam_median
        ), variant
    assert len(analysis.gaps) == 4
    assert analysis.counts["complete"] == 8


def test_paired_gap_two_seeds(adam_rows):
    analysis = analyze_compare(adam_rows, "adam_vs_adampower", "cpu")
    row = gap_of(analysis, "AdamPower + Blockwise LR")
    # Same-seed differences: 3.50 - 3.40 and 3.54 - 3.36.
    assert row.paired_seeds == 2
    assert math.isclose(row.paired_gap, np.median([0.10, 0.18]))
    assert math.isclose(row.loss_sd, np.std([3.40, 3.36], ddof=1))


def test_paired_gap_differs_from_gap(storage):
    record_entry(
        storage,
        "adam",
        [trial(1.0, loss, seed=s) for s, loss in enumerate([3.50, 3.52, 3.60])],
        setting="tiny",
    )
    record_entry(
        storage,
        "adampower",
        [trial(1.2, loss, seed=s) for s, loss in enumerate([3.45, 3.40, 3.49])],
        setting="tiny",
    )
    row = gap_of(analyze_compare(storage, "adam_vs_adampower", "cpu"), "AdamPower")
    assert math.isclose(row.gap, 3.52 - 3.45)
    assert math.isclose(row.paired_gap, np.median([0.05, 0.12, 0.11]))
    assert row.paired_seeds == 3


def test_one_seed_has_no_paired_gap(storage):
    record_entry(storage, "adam", [trial(1.0, 3.5)], setting="tiny")
    record_entry(storage, "adampower", [trial(1.2, 3.4)], setting="tiny")
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    row = gap_of(analysis, "AdamPower")
    assert math.isnan(row.paired_gap)
    assert math.isnan(row.loss_sd)
    table = parse_markdown_tables(compare_markdown(analysis))[0]
    assert list(table["final loss"]) == ["3.5000", "3.4000"]
    assert list(table["paired gap"]) == ["", ""]


def test_muon_rows_use_muon_baseline(storage):
    record_entry(storage, "adam", [trial(1.0, 3.30)], setting="mixed")
    record_entry(
        storage, "muon", [trial(1.0, 3.20)], setting="mixed", optimizer="muonpower"
    )
    record_entry(
        storage,
        "muonpower",
        [trial(1.2, 3.15)],
        setting="mixed",
        optimizer="muonpower",
    )
    record_entry(storage, "adampower", [trial(1.2, 3.25)], setting="mixed")
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    muon_power = gap_of(analysis, "MuonPower", setting="mixed")
    assert muon_power.baseline == "Muon"
    assert math.isclose(muon_power.gap, 3.20 - 3.15)
    adam_power = gap_of(analysis, "AdamPower", setting="mixed")
    assert adam_power.baseline == "Adam"
    assert math.isclose(adam_power.gap, 3.30 - 3.25)
    assert gap_of(analysis, "Muon", setting="mixed").status == "baseline"


def test_power_named_when_several(storage):
    record_entry(
        storage,
        "sweep",
        [trial(1.0, 3.5), trial(1.2, 3.4), trial(1.4, 3.45)],
        setting="tiny",
        study="power_sweep",
    )
    analysis = analyze_compare(storage, "power_sweep", "cpu")
    assert set(analysis.gaps.variant) == {
        "Adam",
        "AdamPower (p=1.2)",
        "AdamPower (p=1.4)",
    }
    assert gap_of(analysis, "AdamPower (p=1.4)").baseline == "Adam"


def test_each_variant_uses_best_lr(storage):
    record_entry(
        storage,
        "adam",
        [trial(1.0, 3.50, lr_max=1e-3), trial(1.0, 3.60, lr_max=3e-3)],
        setting="tiny",
    )
    record_entry(
        storage,
        "adampower",
        [trial(1.2, 3.55, lr_max=1e-3), trial(1.2, 3.42, lr_max=3e-3)],
        setting="tiny",
    )
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    row = gap_of(analysis, "AdamPower")
    assert row.lr_max == 3e-3
    assert row.baseline_lr_max == 1e-3
    assert math.isclose(row.gap, 3.50 - 3.42)
    table = parse_markdown_tables(compare_markdown(analysis))[0]
    lr_by_variant = dict(zip(table.variant, table.lr_max))
    assert lr_by_variant == {"Adam": "0.001", "AdamPower": "0.003"}


def test_missing_and_diverged_baseline(storage):
    record_entry(storage, "lonely", [trial(1.2, 3.4)], setting="no-adam")
    record_entry(
        storage,
        "adam",
        [trial(1.0, None, state="diverged"), trial(1.0, None, seed=1, state="failed")],
        setting="unstable",
    )
    record_entry(storage, "adampower", [trial(1.2, 3.4)], setting="unstable")
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    missing = gap_of(analysis, "AdamPower", setting="no-adam")
    assert missing.status == "no baseline: Adam was not run"
    assert math.isnan(missing.gap)
    diverged = gap_of(analysis, "AdamPower", setting="unstable")
    assert diverged.status == "baseline Adam diverged"
    assert math.isnan(diverged.gap)
    assert analysis.counts == {"complete": 2, "diverged": 1, "failed": 1, "other": 0}
    table = parse_markdown_tables(compare_markdown(analysis))[0]
    by_setting = table.set_index(["setting", "variant"])
    assert by_setting.loc[("unstable", "Adam"), "final loss"] == "diverged"
    assert by_setting.loc[("unstable", "AdamPower"), "gap"] == "baseline Adam diverged"
    assert by_setting.loc[("no-adam", "AdamPower"), "gap"] == (
        "no baseline: Adam was not run"
    )


def test_unrecorded_baseline_is_not_missing(storage):
    # The grid has p = 1, but only p = 1.2 finished so far.
    record_entry(
        storage, "sweep", [trial(1.2, 3.4)], setting="partial", power_grid=[1.0, 1.2]
    )
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    pending = gap_of(analysis, "AdamPower", setting="partial")
    assert pending.status == "no baseline: Adam has no recorded trial yet"


def test_diverged_seed_left_out(storage):
    record_entry(
        storage,
        "adam",
        [trial(1.0, 3.5, seed=0), trial(1.0, 3.7, seed=1)],
        setting="tiny",
    )
    record_entry(
        storage,
        "adampower",
        [
            trial(1.2, 3.4, seed=0),
            trial(1.2, float("nan"), seed=1, state="diverged"),
        ],
        setting="tiny",
    )
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    row = gap_of(analysis, "AdamPower")
    assert row.loss == 3.4
    assert row.seeds == 1
    assert row.excluded_seeds == 1
    assert math.isnan(row.paired_gap)
    assert any("1 seed(s) at lr_max 0.001 diverged" in n for n in analysis.notes)
    assert analysis.counts["diverged"] == 1


def test_same_variant_entries_pooled(storage):
    record_entry(storage, "adam-a", [trial(1.0, 3.5, seed=0)], setting="tiny")
    record_entry(storage, "adam-b", [trial(1.0, 3.7, seed=1)], setting="tiny")
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    row = gap_of(analysis, "Adam")
    assert row.seeds == 2
    assert math.isclose(row.loss, 3.6)
    assert any("adam-a, adam-b run the same variant" in n for n in analysis.notes)


def test_resumed_trial_latest_record(storage):
    record_entry(
        storage,
        "adam",
        [
            trial(1.0, None, state="failed", trial_key="k0"),
            trial(1.0, 3.5, trial_key="k0"),
        ],
        setting="tiny",
    )
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    assert len(analysis.trials) == 1
    assert analysis.counts["complete"] == 1
    assert gap_of(analysis, "Adam").loss == 3.5


# The best power


def test_best_power_interior_quadratic(storage):
    powers = [0.8, 1.0, 1.2, 1.4, 1.6]
    record_entry(
        storage,
        "sweep",
        [trial(p, 3.0 + (p - 1.25) ** 2) for p in powers],
        study="power_sweep",
    )
    analysis = analyze_compare(storage, "power_sweep", "cpu")
    (row,) = analysis.best_powers.itertuples()
    assert row.best_power == 1.2
    assert math.isclose(row.p_star, 1.25, abs_tol=1e-9)
    assert not row.at_edge
    assert row.method.startswith("quadratic")
    assert not any("widen the power grid" in n for n in analysis.notes)


def test_best_power_at_edge(storage):
    powers = [0.8, 1.0, 1.2]
    record_entry(
        storage,
        "sweep",
        [trial(p, 4.0 - p) for p in powers],
        study="power_sweep",
    )
    analysis = analyze_compare(storage, "power_sweep", "cpu")
    (row,) = analysis.best_powers.itertuples()
    assert row.best_power == 1.2
    assert row.p_star == 1.2
    assert row.at_edge
    assert "upper edge" in row.method
    assert any(
        "best power 1.2 is at the edge of the grid" in note for note in analysis.notes
    )


def test_best_power_edge_of_unfinished_grid(storage):
    record_entry(
        storage,
        "sweep",
        [trial(p, 4.0 - p) for p in [0.8, 1.0, 1.2]],
        study="power_sweep",
        power_grid=[0.8, 1.0, 1.2, 1.4, 1.6],
    )
    analysis = analyze_compare(storage, "power_sweep", "cpu")
    (row,) = analysis.best_powers.itertuples()
    assert row.best_power == 1.2
    assert not row.at_edge
    assert row.method == (
        "grid, at the upper edge of the recorded powers; p=1.4, p=1.6 not recorded yet"
    )
    assert not any("widen the power grid" in note for note in analysis.notes)


def test_best_power_neighbour_diverged(storage):
    record_entry(
        storage,
        "sweep",
        [
            trial(0.8, 3.6),
            trial(1.0, 3.5),
            trial(1.2, 3.4),
            trial(1.4, None, state="diverged"),
        ],
        study="power_sweep",
    )
    analysis = analyze_compare(storage, "power_sweep", "cpu")
    (row,) = analysis.best_powers.itertuples()
    assert row.best_power == 1.2
    assert row.p_star == 1.2
    assert "p=1.4 has no loss" in row.method


def test_best_power_per_blockwise(storage):
    record_entry(
        storage,
        "sweep",
        [trial(p, 3.0 + (p - 1.05) ** 2) for p in [0.9, 1.0, 1.2]],
        study="power_sweep",
    )
    record_entry(
        storage,
        "sweep-blockwise",
        [trial(p, 3.0 + (p - 0.85) ** 2) for p in [0.9, 1.0, 1.2]],
        study="power_sweep",
        setting="sweep",
        blockwise_lr=True,
    )
    analysis = analyze_compare(storage, "power_sweep", "cpu")
    best = analysis.best_powers.set_index("blockwise_lr")
    assert best.loc[False, "best_power"] == 1.0
    assert math.isclose(best.loc[False, "p_star"], 1.05, abs_tol=1e-9)
    assert best.loc[True, "best_power"] == 0.9
    assert best.loc[True, "at_edge"]


def test_two_powers_no_best_power_row(adam_rows):
    analysis = analyze_compare(adam_rows, "adam_vs_adampower", "cpu")
    assert analysis.best_powers.empty
    assert "## Best power" not in compare_markdown(analysis)


def test_run_without_trials(storage, tmp_path):
    record_entry(storage, "adam", [], setting="tiny")
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    assert analysis.counts == {"complete": 0, "diverged": 0, "failed": 0, "other": 0}
    assert "the run records no trials" in analysis.notes
    assert "trials: 0 recorded" in compare_markdown(analysis)
    paths = export_compare(analysis, tmp_path)
    assert paths["plot_power"].read_bytes()[:8] == PNG_SIGNATURE


# Loss against model size


def scaling_entries(storage, sizes, amplitudes, alpha=0.07, series="llama"):
    for size in sizes:
        for optimizer_label, power in (("adam", 1.0), ("adampower", 1.2)):
            loss = amplitudes[optimizer_label] * size ** (-alpha)
            record_entry(
                storage,
                f"{optimizer_label}-{size:g}",
                [trial(power, loss, model_params=size)],
                setting=f"llama-{size:g}",
                series=series,
            )


def test_power_law_recovers_alpha(storage):
    sizes = [1e6, 1e7, 1e8]
    scaling_entries(storage, sizes, {"adam": 5.0, "adampower": 4.9})
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    fits = {fit.variant: fit for fit in analysis.fits}
    assert set(fits) == {"Adam", "AdamPower"}
    adam = fits["Adam"]
    assert abs(adam.alpha - 0.07) < 1e-6
    assert math.isclose(adam.amplitude, 5.0, rel_tol=1e-6)
    assert adam.points == 3
    assert not adam.exact
    assert math.isclose(adam.r_squared, 1.0, abs_tol=1e-9)
    assert adam.alpha_stderr < 1e-6
    assert abs(fits["AdamPower"].alpha - 0.07) < 1e-6
    (gap,) = analysis.fit_gaps.itertuples()
    assert gap.variant == "AdamPower"
    assert gap.model_params == 1e8
    assert math.isclose(gap.predicted_gap, 0.1 * 1e8**-0.07, rel_tol=1e-6)


def test_power_law_noisy_stderr():
    params = [1e6, 1e7, 1e8, 1e9]
    losses = [4.0, 3.5, 3.2, 2.7]
    fit = fit_power_law(params, losses, "llama", "Adam")
    coefficients, covariance = np.polyfit(np.log(params), np.log(losses), 1, cov=True)
    assert math.isclose(fit.alpha, -coefficients[0], rel_tol=1e-9)
    assert math.isclose(fit.alpha_stderr, math.sqrt(covariance[0, 0]), rel_tol=1e-6)
    residuals = np.log(losses) - np.polyval(coefficients, np.log(params))
    total = np.sum((np.log(losses) - np.mean(np.log(losses))) ** 2)
    assert math.isclose(fit.r_squared, 1 - np.sum(residuals**2) / total, rel_tol=1e-9)
    assert fit.r_squared < 1


def test_power_law_two_points_exact(storage):
    scaling_entries(storage, [1e6, 1e8], {"adam": 5.0, "adampower": 4.9})
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    for fit in analysis.fits:
        assert fit.exact
        assert fit.points == 2
        assert math.isnan(fit.r_squared)
        assert math.isnan(fit.alpha_stderr)
        assert abs(fit.alpha - 0.07) < 1e-9
    fits_table = parse_markdown_tables(compare_markdown(analysis))[1]
    assert set(fits_table["R^2"]) == {"exact fit"}


def test_one_size_series_no_fit(storage):
    scaling_entries(storage, [1e6], {"adam": 5.0, "adampower": 4.9})
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    assert analysis.fits == []
    assert any("no power-law fit" in note for note in analysis.notes)


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="2\\+ distinct model sizes"):
        fit_power_law([1e6, 1e6], [3.0, 3.1], "llama", "Adam")


# The lr_tune analysis


@pytest.fixture
def lr_tune_store(storage) -> str:
    tune = {"study": "lr_tune", "analysis": "lr_tune"}
    record_entry(
        storage,
        "tiny",
        [
            trial(1.0, 3.9, lr_max=1e-4),
            trial(1.0, 3.6, lr_max=3e-4, seed=0),
            trial(1.0, 3.4, lr_max=3e-4, seed=1),
            trial(1.0, 3.45, lr_max=1e-3),
            trial(1.0, None, lr_max=3e-3, state="diverged"),
            # A powered trial, lower than every Adam loss, is left out.
            trial(1.2, 3.0, lr_max=1e-3),
        ],
        model={"preset": "tiny"},
        data={"name": "bible-kjv", "seq_len": 64},
        **tune,
    )
    record_entry(
        storage,
        "tie",
        [
            trial(1.0, 3.6, lr_max=1e-3),
            trial(1.0, 3.5, lr_max=2e-3),
            trial(1.0, 3.5, lr_max=4e-3),
            trial(1.0, 3.55, lr_max=8e-3),
        ],
        model={"preset": "small"},
        **tune,
    )
    record_entry(
        storage,
        "unstable",
        [
            trial(1.0, None, lr_max=1e-3, state="diverged"),
            trial(1.0, None, lr_max=3e-3, state="diverged"),
        ],
        **tune,
    )
    record_entry(
        storage,
        "edge",
        [trial(1.0, 3.6, lr_max=1e-3), trial(1.0, 3.4, lr_max=3e-3)],
        **tune,
    )
    return storage


def test_lr_tune_best_rates(lr_tune_store):
    rates = {r.label: r for r in best_learning_rates(lr_tune_store, "lr_tune", "cpu")}
    assert set(rates) == {"tiny", "tie", "edge"}
    tiny = rates["tiny"]
    # 3e-4 has the median 3.5 over 2 seeds, above the 3.45 of 1e-3.
    assert tiny.lr_max == 1e-3
    assert tiny.val_loss == 3.45
    assert tiny.seeds == 1
    assert tiny.model == {"preset": "tiny"}
    assert tiny.data == {"name": "bible-kjv", "seq_len": 64}
    assert tiny.workload == "lm"
    assert tiny.batch_size == 8
    assert tiny.run_id == RUN
    assert rates["tie"].lr_max == 2e-3
    assert rates["edge"].lr_max == 3e-3


def test_lr_tune_notes(lr_tune_store):
    analysis = analyze_lr_tune(lr_tune_store, "lr_tune", "cpu")
    notes = "\n".join(analysis.notes)
    assert "label 'unstable', batch size 8: no lr_max completed (2 diverged)" in notes
    assert "label 'edge', batch size 8: the best lr_max 0.003 is the largest" in notes
    assert "label 'tie'" not in notes
    assert "label 'tiny', batch size 8: the best" not in notes
    assert "1 trial(s) with power other than 1.0 are left out" in notes
    assert set(analysis.trials.power) == {1.0}
    assert analysis.counts["diverged"] == 3


def test_lr_tune_markdown_table(lr_tune_store):
    analysis = analyze_lr_tune(lr_tune_store, "lr_tune", "cpu")
    text = lr_tune_markdown(analysis)
    table = parse_markdown_tables(text)[0].set_index("label")
    assert table.loc["tiny", "best lr_max"] == "0.001"
    assert (
        table.loc["tiny", "lr_max=0.0003"]
        == f"3.5000 ± {np.std([3.6, 3.4], ddof=1):.4f}"
    )
    assert table.loc["tiny", "lr_max=0.003"] == "diverged"
    assert table.loc["unstable", "best lr_max"] == "none"
    assert "**3.4500**" in text


def test_lr_tune_smallest_edge(storage):
    record_entry(
        storage,
        "low",
        [trial(1.0, 3.3, lr_max=1e-4), trial(1.0, 3.5, lr_max=1e-3)],
        study="lr_tune",
        analysis="lr_tune",
    )
    analysis = analyze_lr_tune(storage, "lr_tune", "cpu")
    assert any("is the smallest of the grid" in note for note in analysis.notes)


def test_lr_tune_without_trials(storage, tmp_path):
    record_entry(storage, "tiny", [], study="lr_tune", analysis="lr_tune")
    analysis = analyze_lr_tune(storage, "lr_tune", "cpu")
    assert analysis.best == []
    assert "trials: 0 recorded" in lr_tune_markdown(analysis)
    paths = export_lr_tune(analysis, tmp_path)
    assert json.loads(paths["best_lr"].read_text()) == []
    assert paths["plot"].read_bytes()[:8] == PNG_SIGNATURE


# Finding the run


def test_missing_run_error(storage):
    record_entry(storage, "other", [trial(1.0, 3.5)], study="power_sweep")
    with pytest.raises(StudyFileError) as error:
        analyze_compare(storage, "adam_vs_adampower", "paper")
    message = str(error.value)
    assert "'adam_vs_adampower'" in message
    assert "'paper'" in message
    assert storage in message
    assert "`study run adam_vs_adampower --scale paper`" in message
    assert "--workspace/--scale" in message


def test_wrong_analysis_error(lr_tune_store):
    with pytest.raises(StudyFileError) as error:
        analyze_compare(lr_tune_store, "lr_tune", "cpu")
    assert "analysis lr_tune" in str(error.value)


def test_unknown_run_id_error(adam_rows):
    with pytest.raises(StudyFileError) as error:
        analyze_compare(adam_rows, "adam_vs_adampower", "cpu", run_id="nope")
    assert "'nope'" in str(error.value)
    assert RUN in str(error.value)


def test_latest_run_selected(storage):
    record_entry(storage, "adam", [trial(1.0, 3.9)], run_id=RUN)
    record_entry(storage, "adam", [trial(1.0, 3.1)], run_id=LATER_RUN)
    latest = analyze_compare(storage, "adam_vs_adampower", "cpu")
    assert latest.run_id == LATER_RUN
    assert latest.gaps.loss.tolist() == [3.1]
    earlier = analyze_compare(storage, "adam_vs_adampower", "cpu", run_id=RUN)
    assert earlier.gaps.loss.tolist() == [3.9]


# Files


def test_export_compare_files(adam_rows, tmp_path):
    record_entry(adam_rows, "adam-x", [trial(1.0, 3.3)], setting="tiny_lm")
    record_entry(
        adam_rows,
        "adampower-x",
        [trial(1.2, float("nan"), state="diverged")],
        setting="tiny_lm",
    )
    analysis = analyze_compare(adam_rows, "adam_vs_adampower", "cpu")
    paths = export_compare(analysis, tmp_path / "exports")
    stem = f"adam_vs_adampower-cpu-{RUN}"
    for path in paths.values():
        assert path.name.startswith(stem), path.name
        assert path.exists(), path
    table = parse_markdown_tables(paths["markdown"].read_text())[0]
    row = table[table.variant == "AdamPower"].set_index("setting")
    assert row.loc["tiny", "gap"] == f"{(3.50 + 3.54) / 2 - (3.44 + 3.42) / 2:+.4f}"
    assert row.loc["tiny_lm", "final loss"] == "diverged"
    frame = pd.read_csv(paths["csv"])
    csv_row = frame[(frame.setting == "tiny") & (frame.variant == "AdamPower")]
    assert math.isclose(float(csv_row.gap.iloc[0]), (3.50 + 3.54 - 3.44 - 3.42) / 2)
    latex = paths["latex"].read_text()
    assert "\\toprule" in latex
    assert "\\bottomrule" in latex
    assert "tiny\\_lm" in latex
    assert "gap \\%" in latex
    assert "$\\pm$" in latex
    assert "tiny_lm" not in latex
    assert paths["plot_power"].read_bytes()[:8] == PNG_SIGNATURE
    assert "plot_scaling" not in paths


def test_export_compare_scaling_plot(storage, tmp_path):
    scaling_entries(storage, [1e6, 1e7, 1e8], {"adam": 5.0, "adampower": 4.9})
    analysis = analyze_compare(storage, "adam_vs_adampower", "cpu")
    paths = export_compare(analysis, tmp_path)
    assert paths["plot_scaling"].read_bytes()[:8] == PNG_SIGNATURE
    fits = pd.read_csv(paths["fits_csv"]).set_index("variant")
    assert abs(fits.loc["Adam", "alpha"] - 0.07) < 1e-6
    assert "alpha" in paths["fits_latex"].read_text()


def test_export_lr_tune_files(lr_tune_store, tmp_path):
    analysis = analyze_lr_tune(lr_tune_store, "lr_tune", "cpu")
    paths = export_lr_tune(analysis, tmp_path)
    for path in paths.values():
        assert path.name.startswith(f"lr_tune-cpu-{RUN}"), path.name
    stored = json.loads(paths["best_lr"].read_text())
    assert [BestRate(**item) for item in stored] == analysis.best
    assert {item["label"] for item in stored} == {"tiny", "tie", "edge"}
    grid = pd.read_csv(paths["csv"])
    best = grid[grid.best]
    assert sorted(zip(best.label, best.lr_max)) == [
        ("edge", 3e-3),
        ("tie", 2e-3),
        ("tiny", 1e-3),
    ]
    latex = paths["latex"].read_text()
    assert "\\textbf{3.4500}" in latex
    assert "lr\\_max=0.001" in latex
    assert paths["markdown"].read_text() == lr_tune_markdown(analysis)
    assert paths["plot"].read_bytes()[:8] == PNG_SIGNATURE
