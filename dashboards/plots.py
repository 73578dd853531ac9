"""Draw PNG figures of one workload's analysis.

The first two follow Figures 6 and 2 of "GradPower: Powering Gradients for
Faster Language Model Pre-Training".

- `pstar`: p* against batch size with the linear and the noise-scale trend;
- `time-vs-power`: time to target, and the target metric at the best power's
  step, against p with one line per batch size;
- `heatmap`: the batch size x power table, coloured by time relative to the
  row's best;
- `curves`: the target metric against steps per batch size, one line per p.

The figures use matplotlib's object API with the Agg canvas, so they need no
display and leave pyplot's global state alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from study.analysis import PowerAnalysis
from study.export import build_table, power_table_metric

PLOT_NAMES = ("pstar", "time-vs-power", "heatmap", "curves")
DPI = 110


def _legend(axes, fontsize: str = "small") -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=fontsize)


def _has_view(analysis: PowerAnalysis) -> bool:
    view = analysis.at_best_step
    return view is not None and not view.dropna(subset=["value"]).empty


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.85, max(count, 1))]


def plot_power_trend(analysis: PowerAnalysis, path: Path) -> Path:
    """Plot p* per batch size with its interval, the grid best and both trends."""
    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.add_subplot()
    best = analysis.best.dropna(subset=["p_star"])
    if not best.empty:
        batch = best.batch_size.to_numpy(dtype=float)
        low = best.p_star_ci_low.fillna(best.p_star - best.p_star_sd)
        high = best.p_star_ci_high.fillna(best.p_star + best.p_star_sd)
        errors = np.vstack([best.p_star - low, high - best.p_star]).clip(min=0)
        axes.errorbar(
            batch, best.p_star, yerr=errors, fmt="none", ecolor="0.5", capsize=3
        )
        inside = best.bracketed.to_numpy(dtype=bool)
        axes.plot(batch[inside], best.p_star[inside], "o", color="C0", label="p*")
        powers = analysis.cells.power
        for row in best[~inside].itertuples():
            marker = "^" if row.best_power >= powers.max() else "v"
            axes.plot(row.batch_size, row.p_star, marker, color="C0", mfc="none")
        if (~inside).any():
            axes.plot([], [], "^", color="C0", mfc="none", label="p* at grid edge")
        axes.plot(batch, best.best_power, "x", color="0.3", label="best p on grid")

        dense = np.geomspace(batch.min() / 1.2, batch.max() * 1.2, 200)
        if analysis.linear:
            label = f"linear in log2(B), slope {analysis.linear.slope:+.3f}"
            axes.plot(
                dense, analysis.linear.predict(dense), "-", color="C1", label=label
            )
        if analysis.noise_scale:
            axes.plot(
                dense,
                analysis.noise_scale.predict(dense),
                "--",
                color="C2",
                label="noise-scale form, sigma ~ 1/sqrt(B)",
            )
    axes.axhline(1.0, color="0.7", linewidth=0.8, zorder=0)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size")
    axes.set_ylabel("optimal power p*")
    axes.set_title(f"{analysis.run.label}: p* by {analysis.time_unit} to target")
    _legend(axes)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def plot_time_vs_power(analysis: PowerAnalysis, path: Path) -> Path:
    """Plot time to target against p per batch size, censored cells as bounds."""
    panels = 2 if _has_view(analysis) else 1
    figure = Figure(figsize=(6.0 * panels, 4.4))
    axes = figure.add_subplot(1, panels, 1)
    cells = analysis.cells
    batch_sizes = sorted(cells.batch_size.unique())
    colors = dict(zip(batch_sizes, _colors(len(batch_sizes))))
    for batch_size, group in cells.groupby("batch_size"):
        group = group.sort_values("power")
        color = colors[batch_size]
        reached = group[group.state == "reached"]
        errors = np.vstack(
            [reached.time - reached.ci_low, reached.ci_high - reached.time]
        )
        errors = np.where(np.isfinite(errors), errors, 0.0).clip(min=0)
        axes.errorbar(
            reached.power,
            reached.time,
            yerr=errors,
            fmt="o-",
            color=color,
            capsize=2,
            label=f"B={batch_size}",
        )
        censored = group[group.state == "censored"]
        axes.plot(censored.power, censored.bound, "^", color=color, mfc="none")
    if (cells.state == "censored").any():
        axes.plot([], [], "^", color="0.4", mfc="none", label="censored (lower bound)")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(ScalarFormatter())
    axes.set_xlabel("power p")
    axes.set_ylabel(f"{analysis.time_unit} to target")
    axes.set_title(f"{analysis.run.label}: time to target")
    _legend(axes)

    if panels == 2:
        view_axes = figure.add_subplot(1, panels, 2)
        for batch_size, group in analysis.at_best_step.groupby("batch_size"):
            group = group.sort_values("power")
            view_axes.plot(
                group.power,
                group.value,
                "o-",
                color=colors.get(batch_size),
                label=f"B={batch_size}",
            )
        view_axes.set_xlabel("power p")
        view_axes.set_ylabel(analysis.run.target_metric)
        view_axes.set_title("at the step where the best p reaches the target")
        _legend(view_axes)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def plot_heatmap(analysis: PowerAnalysis, path: Path) -> Path:
    """Draw the table as a heatmap of time / row best, with censored cells grey."""
    table = build_table(analysis, power_table_metric(analysis))
    ratio = np.full((len(table.batch_sizes), len(table.powers)), np.nan)
    for i, batch_size in enumerate(table.batch_sizes):
        row = table.cells[batch_size]
        values = [c.value for c in row.values() if not math.isnan(c.value)]
        best = min(values) if values else np.nan
        for j, power in enumerate(table.powers):
            cell = row.get(power)
            if cell is not None and not math.isnan(cell.value):
                ratio[i, j] = cell.value / best

    figure = Figure(figsize=(1.2 * len(table.powers) + 2.4, 0.6 * len(ratio) + 1.8))
    axes = figure.add_subplot()
    axes.set_facecolor("0.85")
    image = axes.imshow(
        np.ma.masked_invalid(ratio), cmap="viridis_r", aspect="auto", vmin=1.0
    )
    for i, batch_size in enumerate(table.batch_sizes):
        for j, power in enumerate(table.powers):
            cell = table.cells[batch_size].get(power)
            if cell is None:
                continue
            best = table.best.get(batch_size)
            weight = "bold" if best is not None and math.isclose(best, power) else None
            dark = not math.isnan(ratio[i, j]) and image.norm(ratio[i, j]) > 0.6
            color = "white" if dark else "black"
            axes.text(
                j, i, cell.text, ha="center", va="center", color=color, weight=weight
            )
    axes.set_xticks(range(len(table.powers)), [f"{p:g}" for p in table.powers])
    axes.set_yticks(range(len(table.batch_sizes)), table.batch_sizes)
    axes.set_xlabel("power p")
    axes.set_ylabel("batch size")
    axes.set_title(f"{analysis.run.label}: {analysis.time_unit} to target")
    figure.colorbar(image, ax=axes, label="time / best time of the row")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def _median_curve(curves: pd.DataFrame) -> pd.DataFrame:
    """Return the median over seeds at each step, of the seeds still running."""
    return curves.groupby("step").value.median().reset_index()


def plot_curves(analysis: PowerAnalysis, path: Path) -> Path | None:
    """Plot the target metric against steps, a panel per batch size, a line per p.

    Each line is the lr_max chosen for its cell. With several seeds the line
    is the median over the seeds still running at each step, and each seed
    is drawn faintly behind it.
    """
    run = analysis.run
    if run.curves is None or run.curves.empty:
        return None
    curves = run.curves[run.curves.metric == run.target_metric]
    trials = analysis.trials.set_index("trial_key")
    batch_sizes = sorted(analysis.cells.batch_size.unique())
    columns = min(3, len(batch_sizes))
    rows = math.ceil(len(batch_sizes) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.6 * rows))
    powers = sorted(analysis.cells.power.unique())
    colors = dict(zip(powers, _colors(len(powers))))
    best_steps = {}
    if analysis.at_best_step is not None:
        best_steps = analysis.at_best_step.groupby("batch_size").best_step.first()

    for index, batch_size in enumerate(batch_sizes):
        axes = figure.add_subplot(rows, columns, index + 1)
        cells = analysis.cells[analysis.cells.batch_size == batch_size]
        for cell in cells.itertuples():
            keys = trials[
                (trials.batch_size == batch_size)
                & (trials.power == cell.power)
                & (trials.lr_max == cell.lr_max)
            ].index
            selected = curves[curves.trial_key.isin(keys)]
            if selected.empty:
                continue
            color = colors[cell.power]
            if len(keys) > 1:
                for _, seed_curve in selected.groupby("trial_key"):
                    axes.plot(
                        seed_curve.step,
                        seed_curve.value,
                        color=color,
                        alpha=0.25,
                        lw=0.8,
                    )
            line = _median_curve(selected)
            axes.plot(
                line.step, line.value, ".-", color=color, label=f"p={cell.power:g}"
            )
        axes.axhline(run.target_value, color="0.4", linestyle="--", linewidth=0.8)
        if batch_size in best_steps:
            axes.axvline(best_steps[batch_size], color="0.4", linestyle=":", lw=0.8)
        axes.set_title(f"batch size {batch_size}")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(run.target_metric)
        _legend(axes, "x-small")
    figure.suptitle(
        f"{run.label}: {run.target_metric} (dashed: target, dotted: best p reaches it)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def write_plots(analysis: PowerAnalysis, directory: Path) -> dict[str, Path]:
    """Write every figure of one workload as PNG; return the paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = analysis.run.stem
    writers = {
        "pstar": plot_power_trend,
        "time-vs-power": plot_time_vs_power,
        "heatmap": plot_heatmap,
        "curves": plot_curves,
    }
    paths = {}
    for name, writer in writers.items():
        written = writer(analysis, directory / f"{stem}-{name}.png")
        if written is not None:
            paths[name] = written
    return paths
