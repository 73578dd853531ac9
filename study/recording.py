"""Record trials in MLflow and Optuna from the Ray driver only.

A single writer means no sqlite lock races between parallel trials, and
workers on other nodes need no database access. Every write is keyed by the
trial's stable key, and the recorder reads back what the stores already hold
when it connects, so a resumed or retried study records each trial once.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import OperationalError

from study.grid import TrialPlan
from study.spec import WORKLOAD_SETTINGS

logger = logging.getLogger(__name__)

# `complete` ends a trial that has no target: a toy-model simulation, or a
# training run that used its whole budget for a final-loss comparison.
END_STATES = ("reached", "censored", "diverged", "failed", "complete")
# The end_state tag of a child run whose trial is training, and of one whose
# trial a stopped driver left for `study resume` (its run status is KILLED).
RUNNING_STATE = "running"
UNFINISHED_STATE = "unfinished"
# Numeric end-of-trial values copied from the last result into the records.
SUMMARY_KEYS = (
    "step",
    "val/loss",
    "val/accuracy",
    "train/loss",
    "time/train_sec",
    "model/params",
)
# Metrics are buffered per trial and written in batches of this many values.
# They are also written whenever the trial saves a checkpoint, so a resume
# from that checkpoint leaves no gap in the curves.
FLUSH_EVERY_METRICS = 200
# MLflow caps one log_batch call at 1000 metrics.
MLFLOW_BATCH_LIMIT = 1000
LOCK_RETRIES = 8
# Trial settings left out of a child run's params, because they decide where
# and how often a trial runs or saves, not what it trains. `threads` follows
# the workload's resources, which may change before a run is continued.
UNLOGGED_SETTINGS = frozenset({"threads", "device", "checkpoint_every_steps"})
# MLflow 3.17 rejects a param value longer than 6000 characters and a
# log_batch call with more than 100 params.
MAX_PARAM_VALUE_CHARS = 6000
MAX_PARAMS_PER_BATCH = 100

Result = TypeVar("Result")


def retry_when_locked(function: Callable[..., Result]) -> Callable[..., Result]:
    """Retry a store write that failed because another process held sqlite's lock."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Result:
        for attempt in range(LOCK_RETRIES):
            try:
                return function(*args, **kwargs)
            except (OperationalError, MlflowException) as error:
                if "locked" not in str(error) or attempt == LOCK_RETRIES - 1:
                    raise
                delay = 0.1 * 2**attempt
                logger.warning("store is locked, retrying in %.1f s: %s", delay, error)
                time.sleep(delay)
        raise AssertionError("unreachable")

    return wrapper


@dataclass(frozen=True)
class RunInfo:
    """Identity of one study run: which study, scale and run id it records."""

    study: str
    scale: str
    run_id: str

    def optuna_study_name(self, label: str) -> str:
        return f"{self.study}/{self.scale}/{label}/{self.run_id}"

    @property
    def experiment_name(self) -> str:
        """The Ray Tune experiment folder under the workspace's ray_results."""
        return f"{self.study}-{self.scale}-{self.run_id}"


@dataclass
class TrialRecord:
    mlflow_run_id: str
    pending_metrics: list[Metric] = field(default_factory=list)
    max_logged_step: int = -1
    last_result: dict[str, Any] = field(default_factory=dict)
    mlflow_done: bool = False
    optuna_done: bool = False
    end_state: str | None = None
    mlflow_status: str = "RUNNING"
    """The child run's MLflow status as last written or read back."""

    @property
    def finished(self) -> bool:
        return self.mlflow_done and self.optuna_done


def end_state_of(result: dict[str, Any], errored: bool) -> str | None:
    """Return the end state in a trial's last result, `failed` for an errored
    trial, or None for a trial that Tune stopped before its end (an interrupted
    driver), which stays unfinished so that `study resume` continues it."""
    state = result.get("end_state")
    if state in ("reached", "censored", "diverged", "complete"):
        return state
    return "failed" if errored else None


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    metrics = {}
    for key, value in result.items():
        if "/" not in key or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics[key] = float(value)
    return metrics


def ensure_experiment(client: MlflowClient, name: str, artifact_uri: str | None) -> str:
    """Return the id of experiment `name`, creating it if it does not exist.

    Two drivers that share a tracking server may both find no experiment and
    both create it; the loser of that race reads the winner's experiment.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_uri)
    except MlflowException as error:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        logger.info("experiment %s was created by another driver (%s)", name, error)
        return experiment.experiment_id


def find_parent_run(client: MlflowClient, study: str, scale: str, run_id: str | None):
    """Return the MLflow parent run of study run `run_id`, or the latest parent
    run of the scale when `run_id` is None; None when none is recorded."""
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return None
    condition = f"tags.study = '{study}' and tags.scale = '{scale}'"
    if run_id is not None:
        condition += f" and tags.study_run_id = '{run_id}'"
    parents = [
        parent
        for parent in client.search_runs(
            [experiment.experiment_id], filter_string=condition, max_results=50000
        )
        if "mlflow.parentRunId" not in parent.data.tags
    ]
    if not parents:
        return None
    return max(parents, key=lambda parent: parent.data.tags.get("study_run_id", ""))


def read_metadata(client: MlflowClient, parent_run_id: str) -> dict[str, Any]:
    """Return the metadata.json artifact of MLflow run `parent_run_id`.

    MLflow's download progress bar is turned off, since it would print one
    bar per read in the middle of a command's output. Raises what MLflow and
    json raise when the file is missing or unreadable.
    """
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(parent_run_id, "metadata.json", folder)
            return json.loads(Path(path).read_text())
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def trial_summary(key: str, unit: str, state: str, result: dict[str, Any]) -> dict:
    """Build the end-of-trial attributes stored on the Optuna trial."""
    summary: dict[str, Any] = {
        "end_state": state,
        "trial_key": key,
        "steps_done": int(result.get("step", 0)),
    }
    if state == "complete":
        for name, value in numeric_metrics(result).items():
            # Downstream accuracies are stored grouped by task, below.
            if not name.startswith("downstream/"):
                summary[name.replace("/", "_")] = value
    if state == "reached":
        summary["steps_to_target"] = int(result["target/steps"])
        summary[f"{unit}_to_target"] = int(result[f"target/{unit}"])
        summary["seconds_to_target"] = float(result["target/train_sec"])
    for name in SUMMARY_KEYS:
        value = result.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            summary[name.replace("/", "_")] = float(value)
    downstream = downstream_results(result)
    if downstream:
        summary["downstream"] = downstream
    return summary


def downstream_results(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Group a result's `downstream/<task>/<metric>` values by task."""
    tasks: dict[str, dict[str, float]] = {}
    for name, value in numeric_metrics(result).items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "downstream":
            tasks.setdefault(parts[1], {})[parts[2]] = value
    return tasks


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> None:
    """Add `value` to `into` under `prefix`, a dict's items as `prefix.key`."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, into)
    else:
        into[prefix] = value


def _param_text(value: Any) -> str:
    """Return a param value as MLflow stores it: lists as JSON, the rest as str."""
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    if len(text) > MAX_PARAM_VALUE_CHARS:
        text = text[: MAX_PARAM_VALUE_CHARS - 3] + "..."
    return text


def trial_params(plan: TrialPlan) -> dict[str, str]:
    """Return the MLflow params of a trial's child run: its grid point and every
    setting that decides what it trains.

    `model` and `data` settings are flattened to `model.KEY` and `data.KEY`.
    The data settings are the study file's, filled with the workload's
    defaults, and not the prepared ones, which name the data cache: that may
    move before the run is continued, and MLflow rejects a changed param.
    """
    config = plan.config
    logged: dict[str, Any] = {**plan.params, "label": plan.label}
    for name, value in config.items():
        if name in UNLOGGED_SETTINGS or name in ("model", "data"):
            continue
        logged[name] = value
    if "model" in config:
        logged["model_preset"] = config["model"].get("preset", "default")
        _flatten("model", config["model"], logged)
    if "data" in config:
        data = json.loads(plan.study_attrs.get("data", "{}"))
        settings = WORKLOAD_SETTINGS.get(config["workload"])
        defaults = settings[2] if settings else {}
        _flatten("data", {**defaults, **data}, logged)
    if "downstream" in plan.study_attrs:
        _flatten("downstream", json.loads(plan.study_attrs["downstream"]), logged)
    return {name: _param_text(value) for name, value in logged.items()}


def _step_budget_attr(config: dict[str, Any]) -> dict[str, int]:
    """Return the trial's step budget as an Optuna attribute, or none for a toy trial."""
    if "step_budget" not in config:
        return {}
    return {"step_budget": int(config["step_budget"])}


class StudyRecorder:
    """Writes one MLflow child run and one Optuna trial per grid point.

    It holds only plain settings when pickled (Ray Tune stores its callbacks
    with the experiment), and reconnects to the stores on first use.
    """

    def __init__(
        self,
        tracking_uri: str,
        optuna_storage: str,
        experiment_id: str,
        parent_run_id: str,
        run: RunInfo,
        plans: list[TrialPlan],
        units: dict[str, str],
    ) -> None:
        self.tracking_uri = tracking_uri
        self.optuna_storage = optuna_storage
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.run = run
        self.plans = {plan.key: plan for plan in plans}
        self.units = units
        self._connected = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("client", "optuna_studies", "records"):
            state.pop(name, None)
        state["_connected"] = False
        return state

    def connect(self) -> None:
        """Open the stores, create the Optuna studies and read what is recorded."""
        if self._connected:
            return
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        storage = open_optuna_storage(self.optuna_storage)
        self.optuna_studies = self._create_optuna_studies(storage)
        self.records: dict[str, TrialRecord] = {}
        self._read_back_records()
        self._connected = True

    def _create_optuna_studies(self, storage) -> dict[str, optuna.Study]:
        studies = {}
        plan_attrs = {plan.label: plan.study_attrs for plan in self.plans.values()}
        for label, entry_attrs in plan_attrs.items():
            config = next(p.config for p in self.plans.values() if p.label == label)
            toy = config["workload"] == "toy_noise"
            study = retry_when_locked(optuna.create_study)(
                study_name=self.run.optuna_study_name(label),
                storage=storage,
                # Training trials minimise steps to target; toy trials
                # maximise the update size.
                direction="maximize" if toy else "minimize",
                load_if_exists=True,
            )
            attributes = {
                "study": self.run.study,
                "scale": self.run.scale,
                "run_id": self.run.run_id,
                "label": label,
                "workload": config["workload"],
                "progress_unit": self.units[label],
                "mlflow_parent_run_id": self.parent_run_id,
            }
            if not toy:
                if config["target_value"] is not None:
                    attributes["target_metric"] = config["target_metric"]
                    attributes["target_value"] = config["target_value"]
                    attributes["target_mode"] = config["target_mode"]
                    attributes["target_stop"] = config["target_stop"]
                # Under an epoch budget each batch size has its own step budget,
                # so the entry records the largest and each trial its own.
                attributes["budget_steps"] = max(
                    plan.config["step_budget"]
                    for plan in self.plans.values()
                    if plan.label == label
                )
                attributes.update(entry_attrs)
            for key, value in attributes.items():
                if study.user_attrs.get(key) != value:
                    retry_when_locked(study.set_user_attr)(key, value)
            studies[label] = study
        return studies

    def _read_back_records(self) -> None:
        """Adopt the child runs and Optuna trials that an earlier process wrote."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
            max_results=50000,
        )
        for mlflow_run in runs:
            key = mlflow_run.data.tags.get("trial_key")
            if key not in self.plans:
                continue
            record = TrialRecord(mlflow_run.info.run_id)
            record.end_state = mlflow_run.data.tags.get("end_state")
            record.mlflow_status = mlflow_run.info.status
            record.mlflow_done = record.end_state in END_STATES
            if record.mlflow_done:
                # The latest value of each metric, as the trial's last result.
                record.last_result = dict(mlflow_run.data.metrics)
            else:
                history = self.client.get_metric_history(
                    record.mlflow_run_id, "train/loss"
                )
                record.max_logged_step = max((m.step for m in history), default=-1)
            self.records[key] = record
        for study in self.optuna_studies.values():
            for trial in study.get_trials(deepcopy=False):
                key = trial.user_attrs.get("trial_key")
                if key in self.records:
                    self.records[key].optuna_done = True
        if self.records:
            finished = sum(record.finished for record in self.records.values())
            logger.debug(
                "recorder found %d trials already recorded, %d of them finished",
                len(self.records),
                finished,
            )

    def _distributions(
        self, label: str
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        plans = [plan for plan in self.plans.values() if plan.label == label]
        return {
            axis: optuna.distributions.CategoricalDistribution(
                sorted({plan.params[axis] for plan in plans})
            )
            for axis in plans[0].params
        }

    def start(self, key: str) -> None:
        """Create the trial's child run, or mark a stopped one RUNNING again."""
        self.connect()
        record = self.records.get(key)
        if record is not None:
            if not record.mlflow_done and record.mlflow_status != "RUNNING":
                retry_when_locked(self.client.update_run)(
                    record.mlflow_run_id, status="RUNNING"
                )
                retry_when_locked(self.client.set_tag)(
                    record.mlflow_run_id, "end_state", RUNNING_STATE
                )
                record.mlflow_status = "RUNNING"
            return
        plan = self.plans[key]
        run_name = plan.key.replace("/", " ")
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "trial_key": key,
            "study": self.run.study,
            "scale": self.run.scale,
            "study_run_id": self.run.run_id,
            "workload": plan.config["workload"],
            "label": plan.label,
            "end_state": RUNNING_STATE,
        }
        mlflow_run = retry_when_locked(self.client.create_run)(
            self.experiment_id, run_name=run_name, tags=tags
        )
        run_id = mlflow_run.info.run_id
        params = [Param(name, value) for name, value in trial_params(plan).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            retry_when_locked(self.client.log_batch)(
                run_id, params=params[start : start + MAX_PARAMS_PER_BATCH]
            )
        self.records[key] = TrialRecord(run_id)

    def result(self, key: str, result: dict[str, Any]) -> None:
        self.start(key)
        record = self.records[key]
        if record.mlflow_done:
            # Tune reruns a trial whose end it had not saved before a driver
            # crash; its run is already complete in the stores.
            return
        record.last_result = result
        step = int(result.get("step", 0))
        if step <= record.max_logged_step:
            # A retried or resumed trial repeats the steps after its checkpoint;
            # the first values of those steps are already stored.
            return
        timestamp = int(time.time() * 1000)
        for name, value in numeric_metrics(result).items():
            record.pending_metrics.append(Metric(name, value, timestamp, step))
        record.max_logged_step = step
        if len(record.pending_metrics) >= FLUSH_EVERY_METRICS:
            self.flush(key)

    def flush(self, key: str) -> None:
        self.connect()
        record = self.records.get(key)
        if record is None or not record.pending_metrics:
            return
        pending = record.pending_metrics
        for start in range(0, len(pending), MLFLOW_BATCH_LIMIT):
            batch = pending[start : start + MLFLOW_BATCH_LIMIT]
            retry_when_locked(self.client.log_batch)(
                record.mlflow_run_id, metrics=batch
            )
        record.pending_metrics = []

    def finish(
        self,
        key: str,
        errored: bool,
        error: str | None = None,
        last_result: dict[str, Any] | None = None,
    ) -> str | None:
        """Close the trial's MLflow run and add its Optuna trial, each once.

        Return the end state, or None for a trial stopped before its end, which
        is left unrecorded. `last_result` replaces the result seen through
        `result()`, for trials that ended while no recorder was listening.
        """
        self.start(key)
        record = self.records[key]
        if last_result is not None:
            record.last_result = last_result
        self.flush(key)
        if record.finished and record.end_state in END_STATES:
            return record.end_state
        result = record.last_result
        state = end_state_of(result, errored)
        if state is None:
            return None
        unit = self.units[self.plans[key].label]
        summary = trial_summary(key, unit, state, result)
        if error:
            summary["error"] = error[-2000:]

        if not record.optuna_done:
            self._add_optuna_trial(key, state, summary)
            record.optuna_done = True
        if not record.mlflow_done:
            if state == "reached":
                retry_when_locked(self.client.log_metric)(
                    record.mlflow_run_id, "target/steps", summary["steps_to_target"]
                )
            retry_when_locked(self.client.set_tag)(
                record.mlflow_run_id, "end_state", state
            )
            if error:
                # The UI shows tags, so a failed trial's traceback is readable
                # there as well as in the Optuna trial.
                retry_when_locked(self.client.set_tag)(
                    record.mlflow_run_id, "error", summary["error"]
                )
            status = RunStatus.FAILED if state == "failed" else RunStatus.FINISHED
            retry_when_locked(self.client.set_terminated)(
                record.mlflow_run_id, RunStatus.to_string(status)
            )
            record.mlflow_status = RunStatus.to_string(status)
            record.mlflow_done = True
        record.end_state = state
        record.last_result = {**result, "end_state": state}
        return state

    def _add_optuna_trial(self, key: str, state: str, summary: dict[str, Any]) -> None:
        plan = self.plans[key]
        optuna_state = {
            "reached": optuna.trial.TrialState.COMPLETE,
            "complete": optuna.trial.TrialState.COMPLETE,
            "censored": optuna.trial.TrialState.PRUNED,
        }.get(state, optuna.trial.TrialState.FAIL)
        trial = optuna.trial.create_trial(
            params=plan.params,
            distributions=self._distributions(plan.label),
            value=_objective_value(state, summary),
            state=optuna_state,
            user_attrs={
                **summary,
                **_step_budget_attr(plan.config),
                "mlflow_run_id": self.records[key].mlflow_run_id,
            },
        )
        retry_when_locked(self.optuna_studies[plan.label].add_trial)(trial)

    def stop_unfinished(self) -> list[str]:
        """Mark the child runs of unfinished trials KILLED, with end_state
        `unfinished`, so that the MLflow UI does not show them as training.

        `start` marks them RUNNING again when `study resume` continues them.
        Return the keys of the trials marked.
        """
        self.connect()
        stopped = []
        for key, record in self.records.items():
            if record.mlflow_done or record.mlflow_status != "RUNNING":
                continue
            retry_when_locked(self.client.set_tag)(
                record.mlflow_run_id, "end_state", UNFINISHED_STATE
            )
            retry_when_locked(self.client.set_terminated)(
                record.mlflow_run_id, RunStatus.to_string(RunStatus.KILLED)
            )
            record.mlflow_status = RunStatus.to_string(RunStatus.KILLED)
            stopped.append(key)
        return stopped

    def unfinished_keys(self) -> list[str]:
        self.connect()
        return [
            key
            for key in self.plans
            if key not in self.records or not self.records[key].finished
        ]


def open_optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Open Optuna's RDB storage; sqlite waits up to a minute for another writer."""
    engine_kwargs = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    )
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def _objective_value(state: str, summary: dict[str, Any]) -> float | None:
    if state == "reached":
        return float(summary["steps_to_target"])
    if state == "complete":
        # A toy simulation's objective is its update; a training run's is its
        # final validation loss.
        value = summary.get("toy_update_mean", summary.get("val_loss"))
        return None if value is None else float(value)
    return None
