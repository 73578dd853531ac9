"""Text, tables and plots of the comparison and lr_max tuning analyses.

`compare_markdown` and `lr_tune_markdown` return what `study run` and `study
analyze` print. `export_compare` and `export_lr_tune` write the same tables as
Markdown, CSV and LaTeX (booktabs), and the plots, into an export folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path

import pandas as pd

from dashboards.compare_plots import (
    plot_loss_curves,
    plot_loss_vs_lr,
    plot_loss_vs_params,
    plot_loss_vs_power,
)
from study.compare_analysis import (
    CompareAnalysis,
    LrTuneAnalysis,
    base_optimizer_name,
    fits_frame,
)
from study.compare_curves import GAP_RULE, SPIKE_RULE, curve_frame
from study.export import _latex_escape, frame_to_markdown, latex_label, metric_names
from trainers.tables import DOWNSTREAM_COLUMNS

# Table formats that the exports write; html is `study report`'s page.
FORMATS = ("md", "csv", "latex")

GAP_FOOTNOTE = (
    "Final loss: median over seeds at the variant's best lr_max (± sample "
    "standard deviation with 2+ seeds). Gap: baseline loss minus variant loss, "
    "positive when the variant is better. Paired gap: median over seeds of the "
    "same-seed differences."
)
LR_FOOTNOTE = (
    "Cells: median over complete seeds (± sample standard deviation with 2+ "
    "seeds). Bold: the best lr_max of the row. Ties go to the smaller lr_max."
)


def _loss_text(loss: float, spread: float, state: str) -> str:
    if state != "complete" or math.isnan(loss):
        return state
    text = f"{loss:.4f}"
    if not math.isnan(spread):
        text += f" ± {spread:.4f}"
    return text


def _signed(value: float, digits: int = 4) -> str:
    return f"{value:+.{digits}f}"


def _budget_text(trials: pd.DataFrame) -> str:
    budgets = sorted({int(b) for b in trials.budget_steps.dropna()})
    if not budgets:
        return "the step budget"
    return " / ".join(str(b) for b in budgets) + " steps"


def gap_frame(analysis: CompareAnalysis) -> pd.DataFrame:
    """Format the gap table as display text, one row per (setting, batch, variant)."""
    rows = []
    for row in analysis.gaps.itertuples():
        gap = rel = paired = ""
        if row.status == "ok":
            gap = _signed(row.gap)
            rel = f"{row.relative_gap_pct:+.2f}%"
            if row.paired_seeds:
                paired = f"{_signed(row.paired_gap)} ({row.paired_seeds} seeds)"
        elif row.status != "baseline":
            gap = row.status
        rows.append(
            {
                "setting": row.setting,
                "batch size": int(row.batch_size),
                "variant": row.variant,
                "lr_max": "" if math.isnan(row.lr_max) else f"{row.lr_max:g}",
                "final loss": _loss_text(row.loss, row.loss_sd, row.state),
                "seeds": int(row.seeds),
                "baseline": "(baseline)" if row.status == "baseline" else row.baseline,
                "gap": gap,
                "gap %": rel,
                "paired gap": paired,
            }
        )
    columns = [
        "setting",
        "batch size",
        "variant",
        "lr_max",
        "final loss",
        "seeds",
        "baseline",
        "gap",
        "gap %",
        "paired gap",
    ]
    return pd.DataFrame(rows, columns=columns)


def best_power_frame(analysis: CompareAnalysis) -> pd.DataFrame:
    """Format the best power per (setting, batch size, optimizer) as display text."""
    rows = []
    for row in analysis.best_powers.itertuples():
        found = not math.isnan(row.best_power)
        rows.append(
            {
                "setting": row.setting,
                "batch size": int(row.batch_size),
                "base optimizer": base_optimizer_name(row.base, row.blockwise_lr),
                "powers": row.powers,
                "best p": f"{row.best_power:g}" if found else "none",
                "final loss": f"{row.best_loss:.4f}" if found else "",
                "p*": f"{row.p_star:.3f}" if found else "",
                "method": row.method,
            }
        )
    columns = [
        "setting",
        "batch size",
        "base optimizer",
        "powers",
        "best p",
        "final loss",
        "p*",
        "method",
    ]
    return pd.DataFrame(rows, columns=columns)


def fit_frame_text(analysis: CompareAnalysis) -> pd.DataFrame:
    """Format the power-law fits as display text."""
    rows = []
    for fit in analysis.fits:
        rows.append(
            {
                "series": fit.series,
                "batch size": "per size" if fit.batch_size is None else fit.batch_size,
                "variant": fit.variant,
                "points": fit.points,
                "A": f"{fit.amplitude:.4g}",
                "alpha": f"{fit.alpha:.4f}",
                "alpha s.e.": "exact fit" if fit.exact else f"{fit.alpha_stderr:.4f}",
                "R^2": "exact fit" if fit.exact else f"{fit.r_squared:.4f}",
            }
        )
    columns = ["series", "batch size", "variant", "points", "A", "alpha"]
    return pd.DataFrame(rows, columns=[*columns, "alpha s.e.", "R^2"])


def downstream_frame(analysis: CompareAnalysis, bold=str) -> pd.DataFrame:
    """Format the zero-shot accuracies in percent, like the GradPower paper's
    Table 1, with `bold` applied to the best value of each column per
    (setting, batch size)."""
    table = analysis.downstream
    tasks = [
        (task, title, metric)
        for task, (title, metric) in DOWNSTREAM_COLUMNS.items()
        if f"{task}/{metric}" in table.columns
    ]
    columns = ["setting", "batch size", "method", *[t[1] for t in tasks], "Avg."]
    frame = pd.DataFrame(columns=[*columns, "seeds"])
    if table.empty:
        return frame
    for (setting, batch_size), group in table.groupby(["setting", "batch_size"]):
        values = {title: group[f"{task}/{metric}"] for task, title, metric in tasks}
        values["Avg."] = group["average"]
        for index, row in group.iterrows():
            line = {
                "setting": setting,
                "batch size": int(batch_size),
                "method": row["variant"],
                "seeds": int(row["seeds"]),
            }
            for title, column in values.items():
                value = column[index]
                text = "" if math.isnan(value) else f"{100 * value:.2f}"
                best = len(group) > 1 and value == column.max()
                line[title] = bold(text) if text and best else text
            frame.loc[len(frame)] = line
    return frame


def _value_range(values: pd.Series) -> str:
    """Return "N" when all values are N, else "LOW-HIGH"."""
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}-{high}"


def downstream_footnote(analysis: CompareAnalysis) -> str:
    """Say what the downstream table's cells are, how many examples each task
    scored and the binomial standard error that this count allows."""
    table = analysis.downstream

    normalized = [
        title
        for task, (title, metric) in DOWNSTREAM_COLUMNS.items()
        if metric == "acc_norm" and f"{task}/{metric}" in table.columns
    ]
    examples = []
    errors = []
    cut = []
    for task, (title, metric) in DOWNSTREAM_COLUMNS.items():
        if f"{task}/examples" not in table.columns:
            continue
        rows = table.dropna(subset=[f"{task}/examples"])
        counts = rows[f"{task}/examples"].astype(int)
        examples.append(f"{title} {_value_range(counts)}")
        if rows[f"{task}/cut"].max() > 0:
            cut.append(f"{title} {_value_range(rows[f'{task}/cut'].astype(int))}")
        # The binomial standard error of each row's accuracy over its examples;
        # the footnote gives the largest.
        accuracy = rows[f"{task}/{metric}"].astype(float)
        error = (accuracy * (1 - accuracy) / (counts - 1).clip(lower=1)) ** 0.5
        errors.append(f"{title} {100 * error.max():.2f}")

    text = (
        "Zero-shot accuracy in percent on the final weights, mean over the seeds "
        "at the variant's best lr_max; each choice is scored by the summed "
        "log-probability of its tokens"
    )
    if normalized:
        text += f" ({', '.join(normalized)}: divided by its length in characters)"
    text += (
        ". Avg.: mean of the task columns that the row has. Bold: the best of each "
        "column."
    )
    if examples:
        text += f" Examples per task: {', '.join(examples)}."
        text += (
            " Standard error of one seed's accuracy (binomial, in points, the "
            f"largest of the rows): {', '.join(errors)}."
        )
    if cut:
        text += (
            " Requests longer than the model's context, scored without the start "
            f"of their context: {', '.join(cut)}."
        )
    return text


def _count_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    line = (
        f"trials: {total} recorded, {counts['complete']} complete (used), "
        f"{counts['diverged']} diverged, {counts['failed']} failed"
    )
    if counts.get("other"):
        line += f", {counts['other']} in another state"
    return line


def compare_markdown(analysis: CompareAnalysis) -> str:
    """Format a compare analysis as the Markdown text that the CLI prints."""
    parts = [
        (
            f"# {analysis.study} ({analysis.scale}), run {analysis.run_id}: final "
            f"validation loss after {_budget_text(analysis.trials)}"
        ),
        "",
        _count_line(analysis.counts),
        "",
        "## Gap to the baseline",
        "",
        frame_to_markdown(gap_frame(analysis)),
        GAP_FOOTNOTE,
    ]
    if len(analysis.best_powers):
        parts += [
            "",
            "## Best power",
            "",
            frame_to_markdown(best_power_frame(analysis)),
        ]
    if analysis.fits:
        parts += [
            "",
            "## Loss against parameters: L(N) = A * N^(-alpha)",
            "",
            frame_to_markdown(fit_frame_text(analysis)),
        ]
        for row in analysis.fit_gaps.itertuples():
            parts.append(
                f"- series {row.series!r}, {row.variant} vs {row.baseline}: "
                f"predicted gap {_signed(row.predicted_gap)} at N = "
                f"{row.model_params:.4g} ({row.baseline_predicted:.4f} vs "
                f"{row.variant_predicted:.4f})"
            )
    if analysis.curves is not None and len(analysis.curves.gaps):
        parts += [
            "",
            "## Gap during training",
            "",
            frame_to_markdown(curve_frame(analysis.curves)),
            f"Gap: {GAP_RULE}. Spikes: {SPIKE_RULE}.",
        ]
    if len(analysis.downstream):
        parts += [
            "",
            "## Zero-shot downstream accuracy",
            "",
            frame_to_markdown(downstream_frame(analysis, lambda t: f"**{t}**")),
            downstream_footnote(analysis),
        ]
    if analysis.notes:
        parts += ["", "## Notes", ""]
        parts += [f"- {note}" for note in analysis.notes]
    return "\n".join(parts) + "\n"


def lr_table_frame(analysis: LrTuneAnalysis) -> pd.DataFrame:
    """Return rows (label, batch size), columns lr_max, and the best lr_max."""
    lrs = sorted(analysis.grid.lr_max.unique())
    best = {(b.label, b.batch_size): b.lr_max for b in analysis.best}
    rows = []
    for (label, batch_size), group in analysis.grid.groupby(["label", "batch_size"]):
        row: dict[str, object] = {"label": label, "batch size": int(batch_size)}
        by_lr = {cell.lr_max: cell for cell in group.itertuples()}
        for lr_max in lrs:
            cell = by_lr.get(lr_max)
            row[f"lr_max={lr_max:g}"] = (
                "" if cell is None else _loss_text(cell.loss, cell.loss_sd, cell.state)
            )
        chosen = best.get((label, int(batch_size)))
        row["best lr_max"] = "none" if chosen is None else f"{chosen:g}"
        rows.append(row)
    columns = ["label", "batch size", *[f"lr_max={lr:g}" for lr in lrs], "best lr_max"]
    return pd.DataFrame(rows, columns=columns)


def _bold_best_lr(frame: pd.DataFrame, bold) -> pd.DataFrame:
    frame = frame.copy()
    for index, row in frame.iterrows():
        if row["best lr_max"] == "none":
            continue
        column = f"lr_max={row['best lr_max']}"
        frame.at[index, column] = bold(str(row[column]))
    return frame


def lr_tune_markdown(analysis: LrTuneAnalysis) -> str:
    """Format an lr_tune analysis as the Markdown text that the CLI prints."""
    table = _bold_best_lr(lr_table_frame(analysis), lambda text: f"**{text}**")
    parts = [
        (
            f"# {analysis.study} ({analysis.scale}), run {analysis.run_id}: Adam "
            f"(p = 1) final validation loss by lr_max after "
            f"{_budget_text(analysis.trials)}"
        ),
        "",
        _count_line(analysis.counts),
        "",
        frame_to_markdown(table),
        LR_FOOTNOTE,
    ]
    if analysis.notes:
        parts += ["", "## Notes", ""]
        parts += [f"- {note}" for note in analysis.notes]
    return "\n".join(parts) + "\n"


# Files


def frame_to_latex(frame: pd.DataFrame, caption: str, label: str) -> str:
    """Render a text frame as a booktabs `table` float with escaped cells.

    A cell already wrapped in \\textbf{...} keeps its command.
    """
    columns = [str(c) for c in frame.columns]
    lines = [
        "% Needs \\usepackage{booktabs} in the preamble.",
        r"\begin{table}[htbp]",
        r"  \centering",
        f"  \\caption{{{_latex_escape(caption)}}}",
        f"  \\label{{{label}}}",
        f"  \\begin{{tabular}}{{{'l' * len(columns)}}}",
        r"    \toprule",
        "    " + " & ".join(_latex_escape(c) for c in columns) + r" \\",
        r"    \midrule",
    ]
    for _, row in frame.iterrows():
        cells = []
        for value in row:
            text = str(value)
            if text.startswith("\\textbf{") and text.endswith("}"):
                cells.append(f"\\textbf{{{_latex_escape(text[8:-1])}}}")
            else:
                cells.append(_latex_escape(text))
        lines.append("    " + " & ".join(cells) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _latex_label(analysis, name: str) -> str:
    return latex_label(analysis.study, analysis.scale, name)


def _title(analysis) -> str:
    return f"{analysis.study} ({analysis.scale})"


def _write_table_files(
    analysis: CompareAnalysis,
    directory: Path,
    paths: dict[str, Path],
    formats: Collection[str],
    name: str,
    numbers: pd.DataFrame,
    display: pd.DataFrame,
    caption: str,
) -> None:
    """Write one table as `<stem>-<name>.csv` from `numbers` and as
    `<stem>-<name>.tex` from the `display` frame, and add the paths to `paths`
    as `<name>_csv` and `<name>_latex`."""
    key = name.replace("-", "_")
    if "csv" in formats:
        paths[f"{key}_csv"] = directory / f"{analysis.stem}-{name}.csv"
        numbers.to_csv(paths[f"{key}_csv"], index=False)
    if "latex" in formats:
        paths[f"{key}_latex"] = directory / f"{analysis.stem}-{name}.tex"
        paths[f"{key}_latex"].write_text(
            frame_to_latex(
                display,
                f"{_title(analysis)}: {caption}",
                _latex_label(analysis, name),
            )
        )


def export_compare(
    analysis: CompareAnalysis, directory: Path, formats: Collection[str] = FORMATS
) -> dict[str, Path]:
    """Write the compare tables in `formats` (md, csv, latex) and the plots, and
    return the paths.

    The best-power files come only with best-power rows, and the fit files
    and the loss-against-parameters plot only with power-law fits.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = analysis.stem
    paths: dict[str, Path] = {}
    if "md" in formats:
        paths["markdown"] = directory / f"{stem}.md"
        paths["markdown"].write_text(compare_markdown(analysis))
    if "csv" in formats:
        paths["csv"] = directory / f"{stem}-gaps.csv"
        analysis.gaps.to_csv(paths["csv"], index=False)
        paths["trials_csv"] = directory / f"{stem}-trials.csv"
        trials = analysis.trials.copy()
        # JSON like the model and data columns, rather than Python's repr.
        trials["downstream"] = [
            json.dumps(value, sort_keys=True) if isinstance(value, dict) else ""
            for value in trials.downstream
        ]
        trials.to_csv(paths["trials_csv"], index=False)

    caption = (
        f"{_title(analysis)}: final validation loss, median over seeds at the "
        "best lr_max of each variant, and the gap to the baseline (positive: the "
        "variant is better)"
    )
    if "latex" in formats:
        paths["latex"] = directory / f"{stem}-gaps.tex"
        paths["latex"].write_text(
            frame_to_latex(gap_frame(analysis), caption, _latex_label(analysis, "gaps"))
        )
    paths["plot_power"] = plot_loss_vs_power(
        analysis.cells,
        analysis.best_powers,
        _title(analysis),
        directory / f"{stem}-loss-vs-power.png",
    )

    if len(analysis.best_powers):
        _write_table_files(
            analysis,
            directory,
            paths,
            formats,
            "best-power",
            analysis.best_powers,
            best_power_frame(analysis),
            "best power p",
        )
    if analysis.fits:
        fits = fits_frame(analysis.fits)
        _write_table_files(
            analysis,
            directory,
            paths,
            formats,
            "fits",
            fits,
            fit_frame_text(analysis),
            "L(N) = A N^(-alpha)",
        )
        paths["plot_scaling"] = plot_loss_vs_params(
            analysis.cells,
            fits,
            _title(analysis),
            directory / f"{stem}-loss-vs-params.png",
        )
    if len(analysis.downstream):
        _write_table_files(
            analysis,
            directory,
            paths,
            formats,
            "downstream",
            analysis.downstream,
            downstream_frame(analysis, lambda text: f"\\textbf{{{text}}}"),
            downstream_footnote(analysis),
        )
    if analysis.curves is not None and len(analysis.curves.histories):
        if "csv" in formats:
            paths["curves_csv"] = directory / f"{stem}-gap-during-training.csv"
            analysis.curves.gaps.to_csv(paths["curves_csv"], index=False)
        paths["plot_curves"] = plot_loss_curves(
            analysis.curves.histories,
            _title(analysis),
            directory / f"{stem}-loss-curves.png",
        )
    return paths


def export_lr_tune(
    analysis: LrTuneAnalysis, directory: Path, formats: Collection[str] = FORMATS
) -> dict[str, Path]:
    """Write the lr_max table in `formats` (md, csv, latex), the best rates as JSON
    and the plot, and return the paths.

    `best_lr` is a JSON list of BestRate dicts, the input of `--lr-from`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = analysis.stem
    paths: dict[str, Path] = {}
    if "md" in formats:
        paths["markdown"] = directory / f"{stem}.md"
        paths["markdown"].write_text(lr_tune_markdown(analysis))
    if "csv" in formats:
        paths["csv"] = directory / f"{stem}-lr-grid.csv"
        analysis.grid.to_csv(paths["csv"], index=False)
    if "latex" in formats:
        table = _bold_best_lr(
            lr_table_frame(analysis), lambda text: f"\\textbf{{{text}}}"
        )
        paths["latex"] = directory / f"{stem}-lr-grid.tex"
        paths["latex"].write_text(
            frame_to_latex(
                table,
                f"{_title(analysis)}: Adam final validation loss by lr_max (bold: "
                "the best lr_max of the row)",
                _latex_label(analysis, "lr-grid"),
            )
        )
    paths["best_lr"] = directory / f"{stem}-best_lr.json"
    paths["best_lr"].write_text(
        json.dumps([rate.to_dict() for rate in analysis.best], indent=2) + "\n"
    )
    paths["plot"] = plot_loss_vs_lr(
        analysis.grid,
        _title(analysis),
        directory / f"{stem}-loss-vs-lr.png",
    )
    return paths


def summary_metrics(analysis: CompareAnalysis | LrTuneAnalysis) -> dict[str, float]:
    """Return the headline numbers of an analysis as MLflow metric names and values,
    for the run's parent run: gaps, best powers, fitted exponents and average
    downstream accuracies of a comparison, or the best lr_max of each (label, batch size) of a tuning run."""
    values: dict[tuple, float] = {}
    if isinstance(analysis, LrTuneAnalysis):
        for rate in analysis.best:
            values["best_lr", rate.label, f"bs_{rate.batch_size}"] = float(rate.lr_max)
        return metric_names(values)
    for row in analysis.gaps.itertuples():
        if row.status == "ok":
            values["gap", row.setting, f"bs_{row.batch_size}", row.variant] = float(
                row.gap
            )
    for row in analysis.best_powers.itertuples():
        optimizer = base_optimizer_name(row.base, row.blockwise_lr)
        values["p_star", row.setting, f"bs_{row.batch_size}", optimizer] = float(
            row.p_star
        )
    for fit in analysis.fits:
        values["fit", fit.series, fit.variant, "alpha"] = float(fit.alpha)
    for row in analysis.downstream.itertuples():
        where = ("downstream", row.setting, f"bs_{row.batch_size}", row.variant)
        values[(*where, "average")] = float(row.average)
    return metric_names(values)


def report_sections(
    analysis: CompareAnalysis | LrTuneAnalysis,
) -> list[tuple]:
    """Return the (heading, table) pairs of the analysis for `study report`, and
    (heading, table, footnote) for the downstream table."""
    if isinstance(analysis, LrTuneAnalysis):
        return [("Final validation loss by lr_max", lr_table_frame(analysis))]
    sections = [("Gap to the baseline", gap_frame(analysis))]
    if len(analysis.best_powers):
        sections.append(("Best power", best_power_frame(analysis)))
    if analysis.fits:
        sections.append(("Loss against parameters", fit_frame_text(analysis)))
    if analysis.curves is not None and len(analysis.curves.gaps):
        sections.append(("Gap during training", curve_frame(analysis.curves)))
    if len(analysis.downstream):
        sections.append(
            (
                "Zero-shot downstream accuracy",
                downstream_frame(analysis, lambda text: f"*{text}*"),
                downstream_footnote(analysis).replace("Bold:", "Marked with *:"),
            )
        )
    return sections
