"""Analysis and export on hand-built trial sets with known answers."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from study.analysis import TRIAL_COLUMNS, RecordedRun, analyze_run
from study.export import export_tables, power_table


def _run(rows: list[dict], budget: int = 100) -> RecordedRun:
    filled = []
    for index, row in enumerate(rows):
        filled.append(
            {
                "label": "lm",
                "workload": "lm",
                "lr_max": 1e-3,
                "seed": 0,
                "steps_done": row.get("steps_to_target") or budget,
                "val_loss": 3.0,
                "trial_key": f"trial-{index}",
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
    )


def _reached(batch_size, power, steps, **extra):
    return {
        "batch_size": batch_size,
        "power": power,
        "end_state": "reached",
        "steps_to_target": steps,
        **extra,
    }


def _ended(batch_size, power, state):
    return {"batch_size": batch_size, "power": power, "end_state": state}


def test_analysis_planted_trend_slope():
    # The best power falls by 0.1 per doubling of batch size: 1.3, 1.2, 1.1, 1.0.
    rows = []
    for index, batch_size in enumerate([8, 16, 32, 64]):
        best = 1.3 - 0.1 * index
        for power in [0.9, 1.0, 1.1, 1.2, 1.3]:
            steps = 50 + round(2000 * (power - best) ** 2)
            rows.append(_reached(batch_size, power, steps))
    analysis = analyze_run(_run(rows))
    assert list(analysis.best.best_power) == pytest.approx([1.3, 1.2, 1.1, 1.0])
    assert analysis.fit is not None
    assert analysis.fit.slope == pytest.approx(-0.1, abs=1e-9)
    assert analysis.fit.intercept == pytest.approx(1.6, abs=1e-9)


def test_analysis_censored_row_has_no_best():
    rows = [
        _reached(8, 1.0, 40),
        _reached(8, 1.2, 30),
        _ended(16, 1.0, "censored"),
        _ended(16, 1.2, "censored"),
    ]
    analysis = analyze_run(_run(rows))
    row16 = analysis.best[analysis.best.batch_size == 16].iloc[0]
    assert np.isnan(row16.best_power)
    assert row16.censored == 2
    assert analysis.fit is None
    table = power_table(analysis)
    assert list(table[table.batch_size == 16]["p=1.2"]) == [">100"]
    assert list(table[table.batch_size == 8]["best_power"]) == ["1.2"]


def test_analysis_excludes_diverged_and_counts_them():
    rows = [
        _reached(8, 1.0, 40),
        _ended(8, 1.2, "diverged"),
        _reached(16, 1.0, 30),
        _reached(16, 1.2, 20),
    ]
    analysis = analyze_run(_run(rows))
    assert analysis.best[analysis.best.batch_size == 8].iloc[0].best_power == 1.0
    assert analysis.best[analysis.best.batch_size == 8].iloc[0].excluded == 1
    assert any("1 trial(s) excluded" in note for note in analysis.notes)


def test_analysis_censored_seed_makes_cell_censored():
    rows = [
        _reached(8, 1.0, 40, seed=0),
        _reached(8, 1.0, 44, seed=1),
        _reached(8, 1.2, 10, seed=0),
        {**_ended(8, 1.2, "censored"), "seed": 1},
    ]
    analysis = analyze_run(_run(rows))
    best = analysis.best.iloc[0]
    assert best.best_power == 1.0
    assert best.steps == 42


def test_analysis_tie_broken_by_validation_loss():
    rows = [
        _reached(8, 1.0, 40, val_loss=3.45),
        _reached(8, 1.2, 40, val_loss=3.40),
        _reached(8, 0.8, 40, val_loss=3.48),
    ]
    assert analyze_run(_run(rows)).best.iloc[0].best_power == 1.2


def test_export_markdown_and_csv_round_trip(tmp_path):
    rows = [
        _reached(bs, p, 10 * bs + int(10 * p)) for bs in (8, 16) for p in (1.0, 1.2)
    ]
    analysis = analyze_run(_run(rows))
    paths = export_tables(analysis, tmp_path)
    csv = pd.read_csv(paths["csv"])
    assert list(csv.batch_size) == [8, 16]
    assert list(csv.columns) == ["batch_size", "p=1", "p=1.2", "best_power"]
    markdown = paths["markdown"].read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    parsed = pd.read_csv(
        io.StringIO("\n".join(table_lines)), sep="|", skipinitialspace=True
    ).dropna(axis=1, how="all")
    assert len(parsed) - 1 == 2
    assert "**90**" in markdown
    assert "**170**" in markdown
