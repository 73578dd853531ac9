"""Write the batch size x power tables, as in Table 2 of "GradPower: Powering
Gradients for Faster Language Model Pre-Training", and the text summary of an
analysis, to files under WORKSPACE/exports."""

from __future__ import annotations

import hashlib
import html
import logging
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from study.analysis import EXCLUDED_STATES, TIE_BREAK_RULE, PowerAnalysis

logger = logging.getLogger(__name__)

# Table metrics. A time to target needs an analysis with the same time metric,
# and `tokens` or `examples` a workload whose progress unit it names. The
# other metrics read the recorded values of the trials.
PROGRESS_TABLE_METRICS = ("tokens", "examples")
TIME_TABLE_METRICS = {
    "steps": "steps",
    "tokens": "progress",
    "examples": "progress",
    "seconds": "seconds",
}
VALUE_TABLE_METRICS = ("final_loss", "final_accuracy", "at_best_step")
TABLE_METRICS = (*TIME_TABLE_METRICS, *VALUE_TABLE_METRICS)
FORMATS = {"md": ".md", "csv": ".csv", "latex": ".tex", "html": ".html"}
DEFAULT_FORMATS = ("md", "csv")
DAGGER = "†"


@dataclass
class Cell:
    text: str
    """Plain text: a number, `>bound` when censored, or the end state."""
    kind: str
    """`value`, `censored` (a lower bound), `unreached` (a value from a trial that
    did not reach the target), or an end state without a value."""
    value: float = np.nan


@dataclass
class PowerTable:
    """One table: `cells[batch_size][power]`, the best power per row, and text."""

    title: str
    powers: list[float]
    batch_sizes: list[int]
    cells: dict[int, dict[float, Cell]]
    best: dict[int, float | None]
    footnotes: list[str] = field(default_factory=list)

    def column(self, power: float) -> str:
        return f"p={power:g}"

    def frame(self) -> pd.DataFrame:
        """Return the text cells; the `best_power` column names each row's winner."""
        rows = []
        for batch_size in self.batch_sizes:
            row: dict[str, object] = {"batch_size": batch_size}
            for power in self.powers:
                cell = self.cells[batch_size].get(power)
                row[self.column(power)] = cell.text if cell else ""
            best = self.best.get(batch_size)
            row["best_power"] = "" if best is None else f"{best:g}"
            rows.append(row)
        return pd.DataFrame(rows)


# Building tables


def _format_number(value: float, metric: str) -> str:
    if metric in ("steps", *PROGRESS_TABLE_METRICS):
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    if metric == "seconds":
        return f"{value:.3g}"
    if metric == "power":
        return f"{value:.3f}"
    return f"{value:.4f}"


def _with_spread(text: str, spread: float, metric: str) -> str:
    if math.isnan(spread):
        return text
    return f"{text} ± {_format_number(spread, metric)}"


def _time_cells(analysis: PowerAnalysis, metric: str, spread: bool) -> dict:
    cells: dict[int, dict[float, Cell]] = {}
    for row in analysis.cells.itertuples():
        if row.state == "reached":
            text = _format_number(row.time, metric)
            if spread:
                text = _with_spread(text, row.spread, metric)
            cell = Cell(text, "value", row.time)
        elif row.state == "censored" and not math.isnan(row.bound):
            cell = Cell(f">{_format_number(row.bound, metric)}", "censored")
        elif row.state == "censored":
            cell = Cell(f">{analysis.run.budget_text}", "censored")
        else:
            cell = Cell(row.state, row.state)
        cells.setdefault(int(row.batch_size), {})[float(row.power)] = cell
    return cells


def _final_value_cells(analysis: PowerAnalysis, metric: str, spread: bool) -> dict:
    """Median over seeds of the last recorded value; the lr_max with the best one."""
    column = "val_loss" if metric == "final_loss" else "val_accuracy"
    lower_is_better = metric == "final_loss"
    trials = analysis.trials
    cells: dict[int, dict[float, Cell]] = {}
    for (batch_size, power), group in trials.groupby(["batch_size", "power"]):
        included = group[~group.end_state.isin(EXCLUDED_STATES)].copy()
        included["metric"] = pd.to_numeric(included[column], errors="coerce")
        included = included.dropna(subset=["metric"])
        if included.empty:
            state = "diverged" if (group.end_state == "diverged").any() else "failed"
            if group[column].isna().all() and state == "failed":
                state = "missing"
            cell = Cell(state, state)
        else:
            per_lr = included.groupby("lr_max").metric.median()
            lr_max = per_lr.idxmin() if lower_is_better else per_lr.idxmax()
            chosen = included[included.lr_max == lr_max]
            value = float(per_lr[lr_max])
            text = _format_number(value, metric)
            if spread and len(chosen) >= 2:
                text = _with_spread(text, float(chosen.metric.std(ddof=1)), metric)
            unreached = (chosen.end_state != "reached").any()
            if unreached:
                text += DAGGER
            cell = Cell(text, "unreached" if unreached else "value", value)
        cells.setdefault(int(batch_size), {})[float(power)] = cell
    return cells


def _at_best_step_cells(analysis: PowerAnalysis) -> dict:
    cells: dict[int, dict[float, Cell]] = {}
    view = analysis.at_best_step
    for row in view.itertuples():
        if math.isnan(row.value):
            cell = Cell("", "missing")
        else:
            cell = Cell(_format_number(row.value, "value"), "value", row.value)
        cells.setdefault(int(row.batch_size), {})[float(row.power)] = cell
    return cells


def _row_best(cells: dict[float, Cell], lower_is_better: bool) -> float | None:
    candidates = [(p, c.value) for p, c in cells.items() if not math.isnan(c.value)]
    if not candidates:
        return None
    sign = 1.0 if lower_is_better else -1.0
    return min(candidates, key=lambda item: (sign * item[1], abs(item[0] - 1.0)))[0]


def _title(analysis: PowerAnalysis, metric: str) -> str:
    run = analysis.run
    relation = "<=" if run.target_mode == "min" else ">="
    target = f"{run.target_metric} {relation} {run.target_value:g}"
    if metric in TIME_TABLE_METRICS:
        unit = {"steps": "optimizer steps", "seconds": "training seconds"}.get(
            metric, run.progress_unit
        )
        description = f"{unit} to {target}"
    elif metric == "at_best_step":
        description = (
            f"{run.target_metric} at the median step at which the seeds of each "
            f"batch size's best power reached {target}"
        )
    else:
        name = "val/loss" if metric == "final_loss" else "val/accuracy"
        when = "last recorded" if run.target_stop else "end-of-budget"
        description = f"{when} {name} (target {target})"
    return f"{run.study} ({run.scale}), {run.label}: {description}"


def power_table_metric(analysis: PowerAnalysis) -> str:
    """Return the table metric that matches the analysis' time metric: for
    `progress`, the workload's unit (tokens or examples)."""
    if analysis.options.metric == "progress":
        return analysis.run.progress_unit
    return analysis.options.metric


def build_table(
    analysis: PowerAnalysis, metric: str = "steps", spread: bool = False
) -> PowerTable:
    """Build the batch size x power table of one workload for one metric.

    A time metric must match the analysis: `tokens` or `examples` needs an
    analysis with metric `progress` of a workload with that progress unit
    (raises ValueError otherwise). With `spread`, a
    cell with 2+ seeds shows `median ± sd` of its seeds. The bold cell of a
    row is the best power of the analysis for a time metric, else the row's
    lowest loss or highest accuracy.
    """
    if metric not in TABLE_METRICS:
        raise ValueError(
            f"table metric {metric!r} is invalid; use one of {TABLE_METRICS}"
        )
    footnotes = []
    if metric in TIME_TABLE_METRICS:
        expected = TIME_TABLE_METRICS[metric]
        if analysis.options.metric != expected:
            raise ValueError(
                f"table metric {metric!r} needs an analysis with metric {expected!r}, "
                f"got {analysis.options.metric!r}"
            )
        unit = analysis.run.progress_unit
        if metric in PROGRESS_TABLE_METRICS and metric != unit:
            raise ValueError(
                f"table metric {metric!r} does not fit workload {analysis.run.label}, "
                f"which counts its progress in {unit}; use {unit!r}"
            )
        cells = _time_cells(analysis, metric, spread)
        best = {
            int(row.batch_size): None if math.isnan(row.best_power) else row.best_power
            for row in analysis.best.itertuples()
        }
        unit = {"steps": "optimizer steps", "seconds": "training seconds"}.get(
            metric, analysis.run.progress_unit
        )
        footnotes.append(
            f"Cells are the {unit} to the target: the median over seeds, at the "
            f"lr_max with the lowest median. '>x': censored, the budget of "
            f"{analysis.run.budget_text} ran out first and x is a lower "
            f"bound. Bold: the best power of the row; {TIE_BREAK_RULE}."
        )
    elif metric == "at_best_step":
        if analysis.at_best_step is None:
            raise ValueError(
                "the at_best_step table needs MLflow histories; load the run with "
                "its tracking URI"
            )
        cells = _at_best_step_cells(analysis)
        view = analysis.at_best_step
        best = {int(b): None for b in view.batch_size.unique()}
        for row in view[view.best].itertuples():
            best[int(row.batch_size)] = float(row.power)
        footnotes.append(
            "The step of a row is the median over the seeds of its best power of "
            "their steps to the target. Cells are the median over seeds of each "
            "power's last evaluation at or before that step, so with several seeds "
            "the best power's own cell can miss the target. Bold: the best value of "
            "the row."
        )
    else:
        cells = _final_value_cells(analysis, metric, spread)
        lower_is_better = metric == "final_loss"
        best = {b: _row_best(row, lower_is_better) for b, row in cells.items()}
        if analysis.run.target_stop:
            footnotes.append(
                f"Cells are the median over seeds of the last recorded value. "
                f"{DAGGER}: a seed of the cell did not reach the target, so the value "
                "is at the budget rather than at the target. Bold: the best value "
                "of the row."
            )
        else:
            footnotes.append(
                "Cells are the median over seeds of the value at the end of the "
                "budget; trials trained on after meeting the target. "
                f"{DAGGER}: a seed of the cell never met the target. Bold: the best "
                "value of the row."
            )
    if spread:
        footnotes.append("'± s': standard deviation over the seeds of the cell.")
    powers = sorted({p for row in cells.values() for p in row})
    return PowerTable(
        title=_title(analysis, metric),
        powers=powers,
        batch_sizes=sorted(cells),
        cells=cells,
        best=best,
        footnotes=footnotes,
    )


def power_table(analysis: PowerAnalysis) -> pd.DataFrame:
    """Return the time-to-target table as text cells, with a `best_power` column."""
    return build_table(analysis, power_table_metric(analysis)).frame()


# Rendering


def _is_best(table: PowerTable, batch_size: int, power: float) -> bool:
    best = table.best.get(batch_size)
    return best is not None and math.isclose(best, power)


def to_markdown(table: PowerTable) -> str:
    """Render a GitHub Markdown table with each row's best cell in bold."""
    frame = table.frame()
    columns = list(frame.columns)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" for _ in columns) + "|",
    ]
    for batch_size, (_, row) in zip(table.batch_sizes, frame.iterrows()):
        cells = [str(batch_size)]
        for power in table.powers:
            text = str(row[table.column(power)])
            if text and _is_best(table, batch_size, power):
                text = f"**{text}**"
            cells.append(text)
        cells.append(str(row["best_power"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_markdown_table(text: str) -> pd.DataFrame:
    """Parse a table written by `to_markdown` back into text cells, bold removed."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells)))
    frame = pd.DataFrame(rows, columns=header)
    frame["batch_size"] = frame.batch_size.astype(int)
    return frame


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _latex_escape(text: str) -> str:
    escaped = "".join(_LATEX_SPECIAL.get(char, char) for char in text)
    escaped = (
        escaped.replace("<=", r"$\le$")
        .replace(">=", r"$\ge$")
        .replace("±", r"$\pm$")
        .replace(">", r"$>$")
        .replace(DAGGER, r"$^\dagger$")
    )
    # A quote that opens a word is typeset as an opening quote; the others, as
    # in "trials' last", stay apostrophes.
    return re.sub(r"(?<![\w.])'", "`", escaped)


def latex_label(*parts: object) -> str:
    """Return a `\\label` key `tab:<parts joined by ->` in which every character
    other than an ASCII letter, digit, `.` or `-` of the study, scale and
    workload names becomes `-`, so that any name gives a key LaTeX reads.

    Where a character other than `_` was replaced, the key ends in `-` and six
    hex digits of a hash of the names, so that labels `lm a` and `lm+a` give
    two keys."""
    key = "-".join(str(part) for part in parts)
    label = re.sub(r"[^A-Za-z0-9.-]", "-", key)
    if label != key.replace("_", "-"):
        label += "-" + hashlib.sha1(key.encode()).hexdigest()[:6]
    return "tab:" + label


def to_latex(table: PowerTable, label: str) -> str:
    """Render a `table` float for a LaTeX document that loads booktabs."""
    count = len(table.powers)
    header = " & ".join(f"$p={p:g}$" for p in table.powers)
    caption = _latex_escape(f"{table.title}. {' '.join(table.footnotes)}")
    lines = [
        "% Needs \\usepackage{booktabs} in the preamble.",
        r"\begin{table}[htbp]",
        r"  \centering",
        f"  \\caption{{{caption}}}",
        f"  \\label{{{label}}}",
        f"  \\begin{{tabular}}{{r{'r' * count}}}",
        r"    \toprule",
        f"    & \\multicolumn{{{count}}}{{c}}{{power $p$}} \\\\",
        f"    \\cmidrule(lr){{2-{count + 1}}}",
        f"    batch size & {header} \\\\",
        r"    \midrule",
    ]
    for batch_size in table.batch_sizes:
        cells = [str(batch_size)]
        for power in table.powers:
            cell = table.cells[batch_size].get(power)
            text = _latex_escape(cell.text) if cell else ""
            if cell and _is_best(table, batch_size, power):
                text = f"\\textbf{{{text}}}"
            cells.append(text)
        lines.append("    " + " & ".join(cells) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html_table(table: PowerTable) -> str:
    """Render an HTML table with the best cell of each row in <strong>."""
    head = "".join(f"<th>p = {p:g}</th>" for p in table.powers)
    lines = [
        '<table class="power-table">',
        f"<caption>{html.escape(table.title)}</caption>",
        f"<thead><tr><th>batch size</th>{head}</tr></thead>",
        "<tbody>",
    ]
    for batch_size in table.batch_sizes:
        cells = [f"<th>{batch_size}</th>"]
        for power in table.powers:
            cell = table.cells[batch_size].get(power)
            if cell is None:
                cells.append("<td></td>")
                continue
            text = html.escape(cell.text)
            if _is_best(table, batch_size, power):
                text = f"<strong>{text}</strong>"
            cells.append(f'<td class="{cell.kind}">{text}</td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody>")
    lines.append("</table>")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in table.footnotes)
    return "\n".join(lines) + "\n" + notes + "\n"


HTML_STYLE = """
body { font-family: sans-serif; max-width: 70em; margin: 2em auto; }
table.power-table { border-collapse: collapse; margin: 1em 0; }
table.power-table th, table.power-table td {
  border-top: 1px solid #999; border-bottom: 1px solid #999;
  padding: 0.3em 0.8em; text-align: right; }
table.power-table caption { text-align: left; font-weight: bold; }
td.censored, td.unreached { color: #555; font-style: italic; }
td.diverged, td.failed { color: #a00; }
p.note { color: #444; font-size: 0.9em; }
"""


def to_html_page(table: PowerTable) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(table.title)}</title>"
        f"<style>{HTML_STYLE}</style></head><body>\n"
        + to_html_table(table)
        + "</body></html>\n"
    )


# Text summary and files


def _format_interval(low: float, high: float, metric: str) -> str:
    if math.isnan(low):
        return ""
    upper = "inf" if math.isinf(high) else _format_number(high, metric)
    return f"[{_format_number(low, metric)}, {upper}]"


def best_power_frame(analysis: PowerAnalysis) -> pd.DataFrame:
    """Format the best power and p* of each batch size as display text."""
    unit = analysis.time_unit
    metric = power_table_metric(analysis)
    rows = []
    for row in analysis.best.itertuples():
        if math.isnan(row.best_power):
            rows.append({"batch_size": row.batch_size, "best p": "none"})
            continue
        method = row.method if row.bracketed else f"{row.method}, at grid edge"
        rows.append(
            {
                "batch_size": row.batch_size,
                "best p": f"{row.best_power:g}",
                unit: _format_number(row.time, metric),
                f"{unit} CI": _format_interval(
                    row.time_ci_low, row.time_ci_high, metric
                ),
                "p*": f"{row.p_star:.3f}",
                "p* CI": _format_interval(
                    row.p_star_ci_low, row.p_star_ci_high, "power"
                ),
                "p* sd": f"{row.p_star_sd:.3f}",
                "method": method,
                "seeds": row.seeds,
            }
        )
    return pd.DataFrame(rows).fillna("")


def frame_to_markdown(frame: pd.DataFrame) -> str:
    columns = [str(c) for c in frame.columns]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _residual_text(residuals: dict[int, float]) -> str:
    return ", ".join(f"B={b}: {r:+.3f}" for b, r in residuals.items())


def trend_lines(analysis: PowerAnalysis) -> list[str]:
    lines = []
    if analysis.linear:
        lines.append(f"linear trend: {analysis.linear.describe()}")
        lines.append(f"  residuals: {_residual_text(analysis.linear.residuals)}")
    if analysis.noise_scale:
        lines.append(f"noise-scale trend: {analysis.noise_scale.describe()}")
        lines.append(f"  residuals: {_residual_text(analysis.noise_scale.residuals)}")
    if not lines:
        lines.append("no trend fit")
    return lines


def count_line(analysis: PowerAnalysis) -> str:
    counts = analysis.counts()
    excluded = counts["diverged"] + counts["failed"]
    return (
        f"trials: {len(analysis.trials)} recorded, {counts['reached']} reached (used), "
        f"{counts['censored']} censored (lower bounds), {excluded} excluded "
        f"({counts['diverged']} diverged, {counts['failed']} failed)"
    )


def summary_text(analysis: PowerAnalysis) -> str:
    """Format one workload's analysis as the text that `study analyze` prints."""
    run = analysis.run
    options = analysis.options
    relation = "<=" if run.target_mode == "min" else ">="
    heading = (
        f"{run.label} ({run.workload}): {analysis.time_unit} to {run.target_metric} "
        f"{relation} {run.target_value:g}, budget {run.budget_text}, "
        f"run {run.run_id}"
    )
    table = build_table(analysis, power_table_metric(analysis))
    parts = [
        heading,
        count_line(analysis),
        "",
        to_markdown(table),
        *table.footnotes,
        "",
    ]
    bootstrapped = analysis.best.resamples.max() if len(analysis.best) else 0
    best_heading = "best power per batch size"
    if bootstrapped:
        best_heading += (
            f" ({options.confidence:.0%} bootstrap CIs over seeds, "
            f"{options.bootstrap_samples} resamples, seed {options.bootstrap_seed})"
        )
    parts += [best_heading + ":", frame_to_markdown(best_power_frame(analysis))]
    if analysis.at_best_step is not None and not analysis.at_best_step.empty:
        table = build_table(analysis, "at_best_step")
        parts += [table.title.split(": ", 1)[1] + ":", to_markdown(table)]
        parts += table.footnotes
    parts += trend_lines(analysis)
    parts += [f"note: {note}" for note in analysis.notes]
    return "\n".join(parts) + "\n"


def export_tables(
    analysis: PowerAnalysis,
    directory: Path,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    metric: str | None = None,
    spread: bool = False,
) -> dict[str, Path]:
    """Write one workload's table in each format; return the paths by format."""
    metric = metric or power_table_metric(analysis)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"table format(s) {unknown} invalid; use {list(FORMATS)}")
    directory.mkdir(parents=True, exist_ok=True)
    run = analysis.run
    table = build_table(analysis, metric, spread)
    stem = run.stem if metric == "steps" else f"{run.stem}-{metric}"
    if spread:
        stem += "-spread"
    footer = "".join(f"\n{note}\n" for note in table.footnotes)
    if metric in TIME_TABLE_METRICS:
        # The trend fits and the notes describe the best powers by time to
        # the target, which only these tables show.
        footer = "\n" + "\n".join(trend_lines(analysis)) + "\n" + footer
        footer += "".join(f"\nNote: {note}\n" for note in analysis.notes)
    paths = {}
    for name in formats:
        path = directory / f"{stem}{FORMATS[name]}"
        if name == "md":
            path.write_text(f"# {table.title}\n\n" + to_markdown(table) + footer)
        elif name == "csv":
            table.frame().to_csv(path, index=False)
        elif name == "latex":
            label = latex_label(run.study, run.scale, run.label, metric)
            path.write_text(to_latex(table, label))
        else:
            path.write_text(to_html_page(table))
        paths[name] = path
    return paths


def _metric_segment(text: object) -> str:
    """Return `text` as one segment of an MLflow metric name: each run of
    characters other than letters, digits, `-` and `.` becomes one `_`."""
    return re.sub(r"[^\w\-.]+", "_", str(text)).strip("_") or "_"


def metric_names(values: dict[tuple, float]) -> dict[str, float]:
    """Return MLflow metric names and values for `values`, keyed by tuples of
    name segments (setting, variant, ...) in any text.

    Segments join with `/` after `_metric_segment`. Two keys can give one name,
    as settings `a b` and `a+b` do. Each such name then ends in `-` and six hex
    digits of a hash of its key: neither value overwrites the other, and the
    name is the same in every run. Values that are not finite are left out."""
    named: dict[str, list[tuple[tuple, float]]] = {}
    for key, value in values.items():
        name = "/".join(_metric_segment(segment) for segment in key)
        named.setdefault(name, []).append((key, value))
    metrics = {}
    for name, entries in named.items():
        for key, value in entries:
            if len(entries) > 1:
                text = "\0".join(str(segment) for segment in key)
                name_of_key = f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"
            else:
                name_of_key = name
            if math.isfinite(value):
                metrics[name_of_key] = float(value)
    return metrics


def log_artifacts(client, parent_run_id: str | None, paths, folder: str) -> bool:
    """Log files on the study run's MLflow parent run; return whether it did.

    It logs nothing when the run records no parent run, or when the
    experiment's local artifact directory (ARTIFACT_ROOT in
    ARTIFACT_ROOT/RUN_ID/artifacts) does not exist. A workspace's own tracking
    store follows a move or copy of its folder (`Workspace.relocate_artifacts`),
    so this happens when a tracking store outside the workspace names a
    workspace that was moved.
    """
    from mlflow.exceptions import MlflowException

    if not parent_run_id:
        logger.warning(
            "the run records no MLflow parent run; %d file(s) not logged", len(paths)
        )
        return False
    try:
        artifact_uri = client.get_run(parent_run_id).info.artifact_uri
    except MlflowException as error:
        logger.warning("MLflow parent run %s not found: %s", parent_run_id, error)
        return False
    location = urllib.parse.urlparse(artifact_uri)
    if location.scheme in ("", "file"):
        root = Path(urllib.parse.unquote(location.path)).parents[1]
        if not root.is_dir():
            logger.warning(
                "artifact location %s of MLflow run %s does not exist (was the "
                "workspace moved while its tracking store is elsewhere?); %d "
                "file(s) not logged",
                artifact_uri,
                parent_run_id,
                len(paths),
            )
            return False
    for path in paths:
        client.log_artifact(parent_run_id, str(path), folder)
    return True
