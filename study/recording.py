"""Record trials in MLflow and Optuna from the Ray driver only.

A single writer means no sqlite lock races between parallel trials, and
workers on other nodes need no database access.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
import optuna
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from study.grid import GRID_AXES, TrialPlan

logger = logging.getLogger(__name__)

# Numeric end-of-trial values copied from the last result into the records.
SUMMARY_KEYS = ("step", "val/loss", "val/accuracy", "train/loss", "time/train_sec")
FLUSH_EVERY_RESULTS = 50


@dataclass(frozen=True)
class RunInfo:
    """Identity of one `study run`: which study, scale and run id it records."""

    study: str
    scale: str
    run_id: str

    def optuna_study_name(self, label: str) -> str:
        return f"{self.study}/{self.scale}/{label}/{self.run_id}"


@dataclass
class TrialRecord:
    mlflow_run_id: str
    pending_metrics: list[Metric] = field(default_factory=list)
    last_result: dict[str, Any] = field(default_factory=dict)
    finished: bool = False


def end_state_of(result: dict[str, Any], errored: bool) -> str:
    """The end state from a trial's last result: the loop's own verdict, else failed."""
    state = result.get("end_state")
    if state in ("reached", "censored", "diverged"):
        return state
    return "failed" if errored else "censored"


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    metrics = {}
    for key, value in result.items():
        if "/" not in key or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics[key] = float(value)
    return metrics


def ensure_experiment(client: MlflowClient, name: str, artifact_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_uri)


class StudyRecorder:
    """Writes one MLflow child run and one Optuna trial per Tune trial."""

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        parent_run_id: str,
        optuna_storage: optuna.storages.BaseStorage | str,
        run: RunInfo,
        plans: list[TrialPlan],
        units: dict[str, str],
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.run = run
        self.plans = {plan.key: plan for plan in plans}
        self.units = units
        self.records: dict[str, TrialRecord] = {}
        self.optuna_studies = self._create_optuna_studies(optuna_storage, plans)

    def _create_optuna_studies(
        self, storage: optuna.storages.BaseStorage | str, plans: list[TrialPlan]
    ) -> dict[str, optuna.Study]:
        studies = {}
        for label in dict.fromkeys(plan.label for plan in plans):
            config = next(p.config for p in plans if p.label == label)
            study = optuna.create_study(
                study_name=self.run.optuna_study_name(label),
                storage=storage,
                direction="minimize",
                load_if_exists=True,
            )
            attributes = {
                "study": self.run.study,
                "scale": self.run.scale,
                "run_id": self.run.run_id,
                "label": label,
                "workload": config["workload"],
                "progress_unit": self.units[label],
                "target_metric": config["target_metric"],
                "target_value": config["target_value"],
                "target_mode": config["target_mode"],
                "budget_steps": config["step_budget"],
                "mlflow_parent_run_id": self.parent_run_id,
            }
            for key, value in attributes.items():
                study.set_user_attr(key, value)
            studies[label] = study
        return studies

    def _distributions(
        self, label: str
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        plans = [plan for plan in self.plans.values() if plan.label == label]
        return {
            axis: optuna.distributions.CategoricalDistribution(
                sorted({plan.params[axis] for plan in plans})
            )
            for axis in GRID_AXES
        }

    def start(self, key: str) -> None:
        if key in self.records:
            return
        plan = self.plans[key]
        params = plan.params
        run_name = (
            f"{plan.label} bs={params['batch_size']} p={params['power']:g} "
            f"lr={params['lr_max']:g} seed={params['seed']}"
        )
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "trial_key": key,
            "study": self.run.study,
            "scale": self.run.scale,
            "study_run_id": self.run.run_id,
            "workload": plan.config["workload"],
            "label": plan.label,
            "end_state": "running",
        }
        mlflow_run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags=tags
        )
        run_id = mlflow_run.info.run_id
        logged_params = {
            **params,
            "workload": plan.config["workload"],
            "label": plan.label,
        }
        for name in ("schedule", "warmup_steps", "step_budget", "weight_decay"):
            logged_params[name] = plan.config[name]
        logged_params["model_preset"] = plan.config["model"].get("preset", "default")
        self.client.log_batch(
            run_id,
            params=[mlflow.entities.Param(k, str(v)) for k, v in logged_params.items()],
        )
        self.records[key] = TrialRecord(run_id)

    def result(self, key: str, result: dict[str, Any]) -> None:
        self.start(key)
        record = self.records[key]
        record.last_result = result
        step = int(result.get("step", 0))
        timestamp = int(time.time() * 1000)
        for name, value in numeric_metrics(result).items():
            record.pending_metrics.append(Metric(name, value, timestamp, step))
        if len(record.pending_metrics) >= FLUSH_EVERY_RESULTS * 4:
            self._flush(record)

    def _flush(self, record: TrialRecord) -> None:
        # MLflow caps one batch at 1000 metrics.
        pending = record.pending_metrics
        for start in range(0, len(pending), 1000):
            self.client.log_batch(
                record.mlflow_run_id, metrics=pending[start : start + 1000]
            )
        record.pending_metrics = []

    def finish(self, key: str, errored: bool, error: str | None = None) -> str:
        """Close the trial's MLflow run and add its Optuna trial; return the end state."""
        self.start(key)
        record = self.records[key]
        if record.finished:
            return record.last_result.get("end_state", "failed")
        self._flush(record)
        result = record.last_result
        state = end_state_of(result, errored)
        unit = self.units[self.plans[key].label]
        summary = {
            "end_state": state,
            "trial_key": key,
            "steps_done": int(result.get("step", 0)),
        }
        if state == "reached":
            summary["steps_to_target"] = int(result["target/steps"])
            summary[f"{unit}_to_target"] = int(result[f"target/{unit}"])
            summary["seconds_to_target"] = float(result["target/train_sec"])
        for name in SUMMARY_KEYS:
            value = result.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                summary[name.replace("/", "_")] = float(value)
        if error:
            summary["error"] = error[-2000:]

        self.client.set_tag(record.mlflow_run_id, "end_state", state)
        if state == "reached":
            self.client.log_metric(
                record.mlflow_run_id, "target/steps", summary["steps_to_target"]
            )
        status = RunStatus.FAILED if state == "failed" else RunStatus.FINISHED
        self.client.set_terminated(record.mlflow_run_id, RunStatus.to_string(status))
        self._add_optuna_trial(key, state, summary)
        record.finished = True
        record.last_result = {**result, "end_state": state}
        return state

    def _add_optuna_trial(self, key: str, state: str, summary: dict[str, Any]) -> None:
        plan = self.plans[key]
        optuna_state = {
            "reached": optuna.trial.TrialState.COMPLETE,
            "censored": optuna.trial.TrialState.PRUNED,
        }.get(state, optuna.trial.TrialState.FAIL)
        trial = optuna.trial.create_trial(
            params=plan.params,
            distributions=self._distributions(plan.label),
            value=float(summary["steps_to_target"]) if state == "reached" else None,
            state=optuna_state,
            user_attrs={**summary, "mlflow_run_id": self.records[key].mlflow_run_id},
        )
        self.optuna_studies[plan.label].add_trial(trial)
