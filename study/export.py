"""Tables like the paper's Table 2: batch sizes as rows, powers as columns."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from study.analysis import PowerAnalysis


def _cell_text(steps: float, state: str, budget: int) -> str:
    if state == "reached":
        return f"{steps:g}"
    if state == "censored":
        return f">{budget}"
    return state


def power_table(analysis: PowerAnalysis) -> pd.DataFrame:
    """Cells are steps to target, `>budget` when censored, or the failure state.

    The `best_power` column names the winner of each row.
    """
    budget = analysis.run.budget_steps
    cells = analysis.cells
    powers = sorted(cells.power.unique())
    rows = []
    for batch_size in sorted(cells.batch_size.unique()):
        row: dict[str, object] = {"batch_size": int(batch_size)}
        for power in powers:
            match = cells[(cells.batch_size == batch_size) & (cells.power == power)]
            if match.empty:
                row[f"p={power:g}"] = ""
                continue
            cell = match.iloc[0]
            row[f"p={power:g}"] = _cell_text(cell.steps, cell.state, budget)
        best = analysis.best[analysis.best.batch_size == batch_size].iloc[0]
        row["best_power"] = (
            "" if math.isnan(best.best_power) else f"{best.best_power:g}"
        )
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table with each row's best cell in bold."""
    columns = list(table.columns)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" for _ in columns) + "|",
    ]
    for _, row in table.iterrows():
        best = row["best_power"]
        cells = []
        for column in columns:
            text = str(row[column])
            if best and column == f"p={best}":
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def export_tables(analysis: PowerAnalysis, directory: Path) -> dict[str, Path]:
    """Write the Markdown and CSV tables of one workload; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    run = analysis.run
    stem = f"{run.study}-{run.scale}-{run.label}-{run.run_id}"
    table = power_table(analysis)
    header = (
        f"# {run.study} ({run.scale}), {run.label}: optimizer steps to "
        f"{run.target_metric} {'<=' if run.target_mode == 'min' else '>='} "
        f"{run.target_value:g}\n\n"
    )
    footer = "\n" + (analysis.fit.describe() if analysis.fit else "no trend fit") + "\n"
    for note in analysis.notes:
        footer += f"\nNote: {note}\n"
    markdown_path = directory / f"{stem}.md"
    markdown_path.write_text(header + to_markdown(table) + footer)
    csv_path = directory / f"{stem}.csv"
    table.to_csv(csv_path, index=False)
    return {"markdown": markdown_path, "csv": csv_path}
