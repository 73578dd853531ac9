"""Expand one scale of a study into its trials, each a TrialConfig plus a stable key."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from study.spec import Scale, WorkloadStudy
from trainers.config import TrialConfig

GRID_AXES = ("batch_size", "power", "lr_max", "seed")


@dataclass(frozen=True)
class TrialPlan:
    key: str
    """Stable identity of the grid point, the same across runs and resumes."""
    label: str
    """The workload entry of the study file this trial belongs to."""
    params: dict[str, Any]
    config: dict[str, Any]


def trial_key(label: str, params: dict[str, Any]) -> str:
    return (
        f"{label}/bs={params['batch_size']}/p={params['power']:g}"
        f"/lr={params['lr_max']:g}/seed={params['seed']}"
    )


def _trial_config(
    label: str, entry: WorkloadStudy, data: dict[str, Any], params: dict[str, Any]
) -> TrialConfig:
    train = entry.train.model_dump()
    return TrialConfig(
        workload=entry.workload or label,
        model=dict(entry.model),
        data=data,
        target_metric=entry.target.metric,
        target_value=entry.target.value,
        target_mode=entry.target.mode,
        step_budget=entry.budget.steps,
        eval_every_steps=entry.eval_every_steps,
        threads=max(1, int(entry.resources.cpu)),
        **params,
        **train,
    )


def expand(scale: Scale, prepared_data: dict[str, dict[str, Any]]) -> list[TrialPlan]:
    """All trials of a scale in a fixed order: workload, batch size, lr, power, seed.

    `prepared_data` maps each workload label to the data settings that its
    workload's `prepare` returned; workloads missing from it are left out.
    """
    plans: list[TrialPlan] = []
    for label, entry in scale.workloads.items():
        if label not in prepared_data:
            continue
        lrs = entry.grid.lr_by_batch_size()
        for batch_size in entry.grid.batch_size:
            points = itertools.product(
                lrs[batch_size], entry.grid.power, entry.grid.seed
            )
            for lr_max, power, seed in points:
                params = {
                    "batch_size": batch_size,
                    "power": float(power),
                    "lr_max": float(lr_max),
                    "seed": seed,
                }
                config = _trial_config(label, entry, prepared_data[label], params)
                plans.append(
                    TrialPlan(trial_key(label, params), label, params, config.to_dict())
                )
    return plans
