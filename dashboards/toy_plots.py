"""Plot of the toy noise study: the update u_t against p per noise ratio."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure


def plot_updates(trials: pd.DataFrame, title: str, path: Path) -> Path:
    """Draw u against p, one line per noise ratio, each curve's maximum starred.

    Each curve is divided by its maximum, because u spans orders of magnitude
    between noise ratios.
    """
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    means = trials.groupby(["noise_ratio", "power"]).update_mean.mean()
    for noise_ratio, series in means.groupby(level="noise_ratio"):
        series = series.droplevel("noise_ratio")
        scaled = series / series.max()
        line = axes.plot(
            scaled.index, scaled.values, marker="o", label=f"σ/μ={noise_ratio:g}"
        )
        axes.plot(scaled.idxmax(), 1.0, "*", markersize=14, color=line[0].get_color())
    axes.set_xlabel("power p")
    axes.set_ylabel("update u_t / max over p")
    axes.set_title(f"{title}: AdamPower update against p")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
