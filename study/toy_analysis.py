"""Analysis of the toy noise study: which power maximises AdamPower's update.

For each noise-to-signal ratio sigma/mu it compares the simulated best power
on the grid with the best power of the exact beta2 -> 1 limit, the continuous
optimum of that limit, and the high-noise estimate of the toy example's
second proposition, then checks the two regimes the paper describes:
p* < 1 when sigma/mu <= 1 and p* > 1 when noise dominates.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd

from dashboards.toy_plots import plot_updates
from study.spec import StudyFileError
from trainers.toy_noise import (
    high_noise_optimal_power,
    optimal_power_continuous,
)

OPTIMUM_SEARCH_LOW = 0.05
# Noise ratios at or above this count as the high-noise regime for the check.
HIGH_NOISE_RATIO = 10.0


@dataclass
class ToyAnalysis:
    study: str
    scale: str
    run_id: str
    label: str
    trials: pd.DataFrame
    """One row per trial: noise_ratio, power, seed, update mean and stderr."""
    rows: pd.DataFrame
    """One row per noise ratio: simulated and closed-form best powers."""
    findings: list[str] = field(default_factory=list)


def _load(storage: str, study: str, scale: str, run_id: str | None) -> list[tuple]:
    summaries = [
        s
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if s.user_attrs.get("study") == study
        and s.user_attrs.get("scale") == scale
        and s.user_attrs.get("workload") == "toy_noise"
    ]
    if not summaries:
        raise StudyFileError(
            f"No recorded toy run of study {study!r} at scale {scale!r} in {storage}; "
            "run `study run` first or pass the right --workspace and --scale"
        )
    chosen = run_id or max(s.user_attrs["run_id"] for s in summaries)
    return [
        (
            s.user_attrs["label"],
            chosen,
            optuna.load_study(study_name=s.study_name, storage=storage),
        )
        for s in summaries
        if s.user_attrs["run_id"] == chosen
    ]


def analyze_toy(
    storage: str, study: str, scale: str, run_id: str | None = None
) -> list[ToyAnalysis]:
    analyses = []
    for label, chosen, optuna_study in _load(storage, study, scale, run_id):
        records = []
        for trial in optuna_study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            if attrs.get("end_state") != "complete":
                continue
            records.append(
                {
                    **trial.params,
                    "update_mean": attrs["toy_update_mean"],
                    "update_stderr": attrs["toy_update_stderr"],
                    "limit_update": attrs["toy_limit_update"],
                    "mu": attrs["toy_mu"],
                    "eps": attrs["toy_eps"],
                }
            )
        trials = pd.DataFrame(records)
        analyses.append(
            ToyAnalysis(study, scale, chosen, label, trials, _best_rows(trials))
        )
        analyses[-1].findings = _findings(analyses[-1].rows)
    return analyses


def _best_rows(trials: pd.DataFrame) -> pd.DataFrame:
    rows = []
    mu = float(trials.mu.iloc[0])
    eps = float(trials.eps.iloc[0])
    means = trials.groupby(["noise_ratio", "power"])[
        ["update_mean", "limit_update"]
    ].mean()
    for noise_ratio, group in means.groupby(level="noise_ratio"):
        group = group.droplevel("noise_ratio")
        row = {
            "noise_ratio": noise_ratio,
            "best_power_simulated": float(group.update_mean.idxmax()),
            "best_power_limit": float(group.limit_update.idxmax()),
            "optimum_limit": optimal_power_continuous(
                noise_ratio, mu=mu, eps=eps, bounds=(OPTIMUM_SEARCH_LOW, 4.0)
            ),
            "optimum_high_noise": math.nan,
        }
        try:
            row["optimum_high_noise"] = high_noise_optimal_power(
                noise_ratio, mu=mu, eps=eps
            ).power
        except ValueError:
            pass
        rows.append(row)
    return pd.DataFrame(rows)


def _findings(rows: pd.DataFrame) -> list[str]:
    low = rows[rows.noise_ratio <= 1]
    high = rows[rows.noise_ratio >= HIGH_NOISE_RATIO]
    findings = []
    if len(low):
        held = bool((low.best_power_simulated < 1).all())
        findings.append(
            f"low noise (sigma/mu <= 1): simulated p* < 1 at "
            f"{int((low.best_power_simulated < 1).sum())} of {len(low)} ratios "
            f"({'holds' if held else 'does not hold'})"
        )
    if len(high):
        held = bool((high.best_power_simulated > 1).all())
        findings.append(
            f"high noise (sigma/mu >= {HIGH_NOISE_RATIO:g}): simulated p* > 1 at "
            f"{int((high.best_power_simulated > 1).sum())} of {len(high)} ratios "
            f"({'holds' if held else 'does not hold'})"
        )
    return findings


def toy_table(analysis: ToyAnalysis) -> pd.DataFrame:
    """Rows noise ratios, columns powers, cells the simulated mean update."""
    table = analysis.trials.pivot_table(
        index="noise_ratio", columns="power", values="update_mean", aggfunc="mean"
    )
    table.columns = [f"p={power:g}" for power in table.columns]
    table = table.reset_index()
    return table.merge(analysis.rows, on="noise_ratio")


def _optimum_text(value: float) -> str:
    # optimal_power_continuous searches p in [0.05, 4]; an optimum on the lower
    # end means u keeps growing as p falls towards 0.
    if value <= OPTIMUM_SEARCH_LOW + 1e-6:
        return f"<= {OPTIMUM_SEARCH_LOW:g}"
    return f"{value:.3f}"


def toy_markdown(analysis: ToyAnalysis) -> str:
    table = toy_table(analysis)
    power_columns = [c for c in table.columns if c.startswith("p=")]
    header = [
        "sigma/mu",
        *power_columns,
        "best p (sim)",
        "best p (limit)",
        "p* (limit)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for _, row in table.iterrows():
        best = f"p={row.best_power_simulated:g}"
        cells = [f"{row.noise_ratio:g}"]
        for column in power_columns:
            text = f"{row[column]:.4g}"
            cells.append(f"**{text}**" if column == best else text)
        cells += [
            f"{row.best_power_simulated:g}",
            f"{row.best_power_limit:g}",
            _optimum_text(row.optimum_limit),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def export_toy(
    analysis: ToyAnalysis, directory: Path, formats: Collection[str] = ("md", "csv")
) -> dict[str, Path]:
    """Write the table in `formats` (md, csv) and the plot, and return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{analysis.study}-{analysis.scale}-{analysis.label}-{analysis.run_id}"
    paths: dict[str, Path] = {}
    if "md" in formats:
        paths["markdown"] = directory / f"{stem}.md"
        body = (
            toy_markdown(analysis)
            + "\n"
            + "\n".join(f"- {f}" for f in analysis.findings)
        )
        paths["markdown"].write_text(
            f"# {analysis.study} ({analysis.scale}): update u_t by power\n\n{body}\n"
        )
    if "csv" in formats:
        paths["csv"] = directory / f"{stem}.csv"
        toy_table(analysis).to_csv(paths["csv"], index=False)
    paths["plot"] = plot_updates(
        analysis.trials, analysis.study, directory / f"{stem}.png"
    )
    return paths


def toy_report_sections(analysis: ToyAnalysis) -> list[tuple[str, pd.DataFrame]]:
    """Return the (heading, table) pairs of the analysis for `study report`."""
    return [(f"{analysis.label}: best power per noise ratio", toy_table(analysis))]
