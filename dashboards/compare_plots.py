"""Plots of the fixed-budget comparison studies and the lr_max tuning study.

- `plot_loss_vs_power`: final loss against p, one panel per setting, the
  best p of each line starred;
- `plot_loss_vs_params`: final loss against the number of parameters on
  log-log axes with each variant's fitted power law;
- `plot_loss_vs_lr`: final loss against lr_max on a log x axis, one line per
  (label, batch size), the best lr_max starred;
- `plot_loss_curves`: validation loss against the step, one panel per
  (setting, batch size) and one line per variant, like the paper's loss
  curves of Adam and AdamPower.

The figures use matplotlib's object API with the Agg canvas, so they need no
display and leave pyplot's global state alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

DPI = 110
PANEL_SIZE = (5.2, 3.8)
MAX_COLUMNS = 3


def _panels(count: int) -> tuple[Figure, list]:
    columns = min(max(count, 1), MAX_COLUMNS)
    rows = math.ceil(max(count, 1) / columns)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def _legend(axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")


def _no_data(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)


def _best_point(line: pd.DataFrame, best: pd.DataFrame) -> tuple[float, float]:
    """Return (power, loss) of the line's best power.

    It is the best-power row's power where the analysis has one (3+ powers),
    else the lowest loss of the line with ties to the power nearest 1.
    """
    if len(best) and np.isfinite(best.best_power.iloc[0]):
        power = float(best.best_power.iloc[0])
        return power, float(line.loss[np.isclose(line.power, power)].iloc[0])
    ranked = line.assign(distance=(line.power - 1.0).abs())
    winner = ranked.sort_values(["loss", "distance"]).iloc[0]
    return float(winner.power), float(winner.loss)


def _mark_excluded(axes, excluded: pd.DataFrame) -> None:
    """Mark powers without a loss with an x along the top of the panel."""
    if excluded.empty:
        return
    axes.plot(
        excluded.power,
        np.full(len(excluded), 0.97),
        "x",
        color="tab:red",
        transform=axes.get_xaxis_transform(),
        label="diverged or failed",
    )


def plot_loss_vs_power(
    cells: pd.DataFrame, best_powers: pd.DataFrame, title: str, path: Path
) -> Path:
    """Plot the final loss against p per setting and star each line's best p.

    One line per (batch size, base optimizer, Blockwise LR). `cells` needs
    setting, batch_size, base, blockwise_lr, power, loss, loss_sd and state
    columns, `best_powers` setting, batch_size, base, blockwise_lr and
    best_power.
    """
    settings = sorted(cells.setting.unique()) if len(cells) else []
    figure, axes_list = _panels(len(settings))
    if not settings:
        _no_data(axes_list[0], "no trials")
    keys = ["batch_size", "base", "blockwise_lr"]
    for axes, setting in zip(axes_list, settings):
        in_setting = cells[cells.setting == setting]
        subset = in_setting[np.isfinite(in_setting.loss)]
        for (batch_size, base, blockwise), line in subset.groupby(keys):
            line = line.sort_values("power")
            name = f"{base}{' + Blockwise LR' if blockwise else ''}, B={batch_size}"
            drawn = axes.errorbar(
                line.power,
                line.loss,
                yerr=line.loss_sd.fillna(0.0),
                marker="o",
                capsize=3,
                label=name,
            )
            best = best_powers
            if len(best_powers):
                best = best_powers[
                    (best_powers.setting == setting)
                    & (best_powers.batch_size == batch_size)
                    & (best_powers.base == base)
                    & (best_powers.blockwise_lr == blockwise)
                ]
            power, loss = _best_point(line, best)
            axes.plot(power, loss, "*", markersize=14, color=drawn.lines[0].get_color())
        _mark_excluded(axes, in_setting[~np.isfinite(in_setting.loss)])
        axes.axvline(1.0, color="0.6", linestyle=":", linewidth=1)
        axes.set_title(str(setting), fontsize="medium")
        axes.set_xlabel("power p")
        axes.set_ylabel("final val/loss")
        _legend(axes)
    figure.suptitle(f"{title}: final loss against p (star: best p)")
    return _save(figure, path)


def plot_loss_vs_params(
    cells: pd.DataFrame, fits: pd.DataFrame, title: str, path: Path
) -> Path:
    """Plot the final loss against parameters (log-log) with the fitted lines.

    One panel per (series, batch size) of `fits` (columns series, batch_size,
    variant, amplitude, alpha). The points are the cells of the series with a
    finite loss. A fit with batch_size None uses every batch size of the series.
    """
    groups = list(fits.groupby(["series", "batch_size"], dropna=False))
    figure, axes_list = _panels(len(groups))
    if not groups:
        _no_data(axes_list[0], "no power-law fit")
    for axes, ((series, batch_size), group) in zip(axes_list, groups):
        subset = cells[(cells.series == series) & np.isfinite(cells.loss)]
        has_batch = batch_size is not None and not pd.isna(batch_size)
        if has_batch:
            subset = subset[subset.batch_size == batch_size]
        for fit in group.itertuples():
            points = subset[subset.variant == fit.variant]
            drawn = axes.plot(
                points.model_params, points.loss, "o", label=f"{fit.variant}"
            )
            grid = np.geomspace(points.model_params.min(), points.model_params.max())
            axes.plot(
                grid,
                fit.amplitude * grid ** (-fit.alpha),
                "-",
                color=drawn[0].get_color(),
                label=f"fit: alpha={fit.alpha:.3f}",
            )
        axes.set_xscale("log")
        axes.set_yscale("log")
        # Losses span less than a decade, so plain numbers read better than 10^k.
        axes.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        axes.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
        heading = f"series {series}"
        if has_batch:
            heading += f", B={int(batch_size)}"
        axes.set_title(heading, fontsize="medium")
        axes.set_xlabel("model parameters N")
        axes.set_ylabel("final val/loss")
        _legend(axes)
    figure.suptitle(f"{title}: L(N) = A * N^(-alpha)")
    return _save(figure, path)


def plot_loss_vs_lr(grid: pd.DataFrame, title: str, path: Path) -> Path:
    """Plot the final loss against lr_max, one line per (label, batch size).

    `grid` needs label, batch_size, lr_max, loss, loss_sd and best columns.
    A diverged or failed lr_max has no point.
    """
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    finite = grid[np.isfinite(grid.loss)] if len(grid) else grid
    if finite.empty:
        _no_data(axes, "no lr_max completed")
    for (label, batch_size), line in finite.groupby(["label", "batch_size"]):
        line = line.sort_values("lr_max")
        drawn = axes.errorbar(
            line.lr_max,
            line.loss,
            yerr=line.loss_sd.fillna(0.0),
            marker="o",
            capsize=3,
            label=f"{label}, B={batch_size}",
        )
        best = line[line.best]
        axes.plot(
            best.lr_max,
            best.loss,
            "*",
            markersize=14,
            color=drawn.lines[0].get_color(),
        )
    axes.set_xscale("log")
    axes.set_xlabel("lr_max")
    axes.set_ylabel("final val/loss")
    axes.set_title(f"{title}: Adam final loss against lr_max (star: best)")
    _legend(axes)
    return _save(figure, path)


def plot_loss_curves(histories: pd.DataFrame, title: str, path: Path) -> Path:
    """Plot the validation loss against the step, one panel per (setting, batch
    size) and one line per variant. `histories` needs setting, batch_size,
    variant, step and val_loss columns (median over seeds)."""
    panels = sorted(
        {(str(s), int(b)) for s, b in zip(histories.setting, histories.batch_size)}
    )
    figure, axes_list = _panels(len(panels))
    if not panels:
        _no_data(axes_list[0], "no validation histories")
    for axes, (setting, batch_size) in zip(axes_list, panels):
        panel = histories[
            (histories.setting.astype(str) == setting)
            & (histories.batch_size == batch_size)
        ]
        for variant, line in panel.groupby("variant"):
            line = line.sort_values("step")
            axes.plot(line.step, line.val_loss, label=str(variant))
        axes.set_title(f"{setting}, B={batch_size}", fontsize="medium")
        axes.set_xlabel("step")
        axes.set_ylabel("val/loss (median over seeds)")
        _legend(axes)
    figure.suptitle(f"{title}: validation loss during training")
    return _save(figure, path)
