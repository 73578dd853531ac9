"""Expand one scale of a study into its trials, each a TrialConfig plus a stable key."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from study.spec import Scale, ToyNoiseStudy, WorkloadStudy, step_budget
from trainers.config import TrialConfig


@dataclass(frozen=True)
class TrialPlan:
    key: str
    """Stable identity of the grid point, the same across runs and resumes."""
    label: str
    """The workload entry of the study file this trial belongs to."""
    params: dict[str, Any]
    config: dict[str, Any]
    study_attrs: dict[str, Any] = field(default_factory=dict)
    """Settings of the trial's workload entry that the analysis groups by,
    stored on the entry's Optuna study."""


def trial_key(label: str, params: dict[str, Any]) -> str:
    if "noise_ratio" in params:
        return f"{label}/noise={params['noise_ratio']:g}/p={params['power']:g}/seed={params['seed']}"
    return (
        f"{label}/bs={params['batch_size']}/p={params['power']:g}"
        f"/lr={params['lr_max']:g}/seed={params['seed']}"
    )


def _trial_config(
    label: str, entry: WorkloadStudy, data: dict[str, Any], params: dict[str, Any]
) -> TrialConfig:
    train = entry.train.model_dump()
    fault = entry.fault_injection
    if fault is not None and all(params[k] == v for k, v in fault.only.items()):
        train["inject_nan_loss_at_step"] = fault.nan_loss_at_step
        train["inject_error_at_step"] = fault.error_at_step
    target: dict[str, Any] = {"target_value": None}
    if entry.target is not None:
        target = {
            "target_metric": entry.target.metric,
            "target_value": entry.target.value,
            "target_mode": entry.target.mode,
            "target_stop": entry.target.stop,
        }
    return TrialConfig(
        workload=entry.workload or label,
        model=dict(entry.model),
        data=data,
        **target,
        # An epoch budget gives each batch size its own step count.
        step_budget=step_budget(label, entry, params["batch_size"]),
        eval_every_steps=entry.eval_every_steps,
        checkpoint_every_steps=entry.checkpoint_every_steps,
        threads=max(1, int(entry.resources.cpu)),
        **params,
        **train,
    )


def _study_attrs(label: str, entry: WorkloadStudy, analysis: str) -> dict[str, Any]:
    downstream = {}
    if entry.downstream is not None:
        settings = entry.downstream.model_dump()
        downstream["downstream"] = json.dumps(settings, sort_keys=True)
    return {
        **downstream,
        "analysis": analysis,
        "setting": entry.setting or label,
        "series": entry.series,
        "optimizer": entry.train.optimizer,
        "blockwise_lr": entry.train.blockwise_lr,
        "schedule": entry.train.schedule,
        "budget_epochs": entry.budget.epochs,
        "model": json.dumps(entry.model, sort_keys=True),
        "data": json.dumps(entry.data, sort_keys=True),
    }


def expand(
    scale: Scale,
    prepared_data: dict[str, dict[str, Any]],
    analysis: str = "power_trend",
) -> list[TrialPlan]:
    """Return all trials of a scale in order of workload, batch size, lr, power, seed.

    `prepared_data` maps each workload label to the data settings that its
    workload's `prepare` returned; workloads missing from it are left out.
    `analysis` is the study's analysis kind, recorded with each entry.
    """
    plans: list[TrialPlan] = []
    for label, entry in scale.workloads.items():
        if isinstance(entry, ToyNoiseStudy):
            plans.extend(_toy_plans(label, entry))
            continue
        if label not in prepared_data:
            continue
        lrs = entry.grid.lr_by_batch_size()
        attrs = _study_attrs(label, entry, analysis)
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
                    TrialPlan(
                        trial_key(label, params),
                        label,
                        params,
                        config.to_dict(),
                        attrs,
                    )
                )
    return plans


def _toy_plans(label: str, entry: ToyNoiseStudy) -> list[TrialPlan]:
    """Toy-model trials in order of noise ratio, power and seed."""
    plans = []
    simulation = entry.simulation.model_dump()
    grid = entry.grid
    for noise_ratio, power, seed in itertools.product(
        grid.noise_ratio, grid.power, grid.seed
    ):
        params = {
            "noise_ratio": float(noise_ratio),
            "power": float(power),
            "seed": seed,
        }
        config = {"workload": "toy_noise", **params, **simulation}
        plans.append(TrialPlan(trial_key(label, params), label, params, config))
    return plans
