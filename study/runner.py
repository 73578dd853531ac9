"""The Ray Tune controller: one Tune trial per grid point, recorded from the driver."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

# Ray Tune's legacy console output is silent at verbose=0; the progress lines
# below replace its status tables. Set before Ray is imported.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import optuna
import ray
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune

from study.grid import TrialPlan, expand
from study.metadata import run_metadata
from study.recording import RunInfo, StudyRecorder, ensure_experiment
from study.spec import StudySpec
from study.workspace import Workspace
from trainers.config import TrialConfig
from trainers.loop import run_trial
from trainers.workloads import get_workload_class

logger = logging.getLogger("study")


def train_one(param_space: dict[str, Any]) -> None:
    """Tune function trainable: run one grid point and report through Tune."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = TrialConfig.from_dict(param_space["trial"]["config"])
    run_trial(config, report=tune.report)


def trial_resources(param_space: dict[str, Any]) -> tune.PlacementGroupFactory:
    resources = param_space["trial"]["resources"]
    bundle = {"CPU": resources["cpu"]}
    if resources["gpu"]:
        bundle["GPU"] = resources["gpu"]
    return tune.PlacementGroupFactory([bundle])


class TargetStopper(tune.Stopper):
    """Stops a trial once its result carries an end state or meets its target."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get("end_state"):
            return True
        config = TrialConfig.from_dict(result["config"]["trial"]["config"])
        value = result.get(config.target_metric)
        return value is not None and config.target_met(value)

    def stop_all(self) -> bool:
        return False


class Progress:
    """Counts trial states and prints one line per finished trial."""

    def __init__(self, plans: list[TrialPlan], units: dict[str, str]) -> None:
        self.total = len(plans)
        self.units = units
        self.running: set[str] = set()
        self.done: dict[str, str] = {}
        self.best: dict[tuple[str, int], tuple[int, float]] = {}

    def started(self, key: str) -> None:
        self.running.add(key)

    def finished(self, plan: TrialPlan, state: str, result: dict[str, Any]) -> None:
        self.running.discard(plan.key)
        self.done[plan.key] = state
        params = plan.params
        if state == "reached":
            detail = f"reached the target in {result['target/steps']} steps"
            best_key = (plan.label, params["batch_size"])
            steps = int(result["target/steps"])
            if best_key not in self.best or steps < self.best[best_key][0]:
                self.best[best_key] = (steps, params["power"])
        elif state == "censored":
            detail = f"censored after {result.get('step', '?')} steps"
        else:
            detail = f"{state} at step {result.get('step', '?')}"
        pending = self.total - len(self.done) - len(self.running)
        best = self.best.get((plan.label, params["batch_size"]))
        best_text = (
            f"best p={best[1]:g} ({best[0]} steps)" if best else "no trial reached"
        )
        logger.info(
            "[%d done, %d running, %d pending] %s: %s; at this batch size %s",
            len(self.done),
            len(self.running),
            pending,
            plan.key,
            detail,
            best_text,
        )


class RecordingCallback(tune.Callback):
    """Forwards Tune's trial events to the recorder and the progress printer."""

    def __init__(self, recorder: StudyRecorder, progress: Progress) -> None:
        self.recorder = recorder
        self.progress = progress

    @staticmethod
    def _key(trial) -> str:
        return trial.config["trial"]["key"]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.recorder.start(self._key(trial))
        self.progress.started(self._key(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.recorder.result(self._key(trial), result)

    def _finish(self, trial, errored: bool) -> None:
        key = self._key(trial)
        error = str(trial.get_error()) if errored else None
        state = self.recorder.finish(key, errored=errored, error=error)
        if errored and error:
            logger.warning("trial %s failed:\n%s", key, error)
        self.progress.finished(
            self.recorder.plans[key], state, self.recorder.records[key].last_result
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=True)


@dataclass
class StudyRun:
    run: RunInfo
    workspace: Workspace
    plans: list[TrialPlan]
    parent_run_id: str
    end_states: dict[str, str]
    wall_seconds: float


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def prepare_data(
    spec: StudySpec,
    scale_name: str,
    workspace: Workspace,
    labels: list[str] | None = None,
) -> dict[str, dict]:
    """Fetch or tokenize each workload's data once, before any trial starts."""
    prepared = {}
    for label, entry in spec.scale(scale_name).workloads.items():
        if labels is not None and label not in labels:
            continue
        workload_class = get_workload_class(entry.workload or label)
        logger.info("preparing data for %s (%s)", label, workload_class.name)
        prepared[label] = workload_class.prepare(dict(entry.data), workspace.data_cache)
    return prepared


def _start_ray(address: str | None) -> bool:
    """Connect to `address` or start a local Ray; return True when we started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return False
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return True


def run_study(
    spec: StudySpec,
    scale_name: str,
    workspace: Workspace,
    *,
    ray_address: str | None = None,
    max_concurrent: int | None = None,
) -> StudyRun:
    """Run every trial of one scale under Ray Tune and record them all."""
    started = time.perf_counter()
    scale = spec.scale(scale_name)
    run = RunInfo(spec.name, scale_name, new_run_id())
    prepared = prepare_data(spec, scale_name, workspace)
    plans = expand(scale, prepared)
    units = {
        label: get_workload_class(entry.workload or label).progress_unit
        for label, entry in scale.workloads.items()
    }
    resources = {
        label: entry.resources.model_dump() for label, entry in scale.workloads.items()
    }
    logger.info(
        "study %s, scale %s, run %s: %d trials; workspace %s",
        spec.name,
        scale_name,
        run.run_id,
        len(plans),
        workspace.root,
    )

    client = MlflowClient(tracking_uri=workspace.tracking_uri)
    experiment_id = ensure_experiment(
        client, spec.name, workspace.artifact_root.as_uri()
    )
    parent = client.create_run(
        experiment_id,
        run_name=f"{spec.name}-{scale_name}-{run.run_id}",
        tags={"study": spec.name, "scale": scale_name, "study_run_id": run.run_id},
    )
    parent_run_id = parent.info.run_id
    experiment_name = f"{spec.name}-{scale_name}-{run.run_id}"
    client.log_param(parent_run_id, "trials", len(plans))
    client.log_dict(
        parent_run_id,
        run_metadata(scale.model_dump(mode="json")),
        "metadata.json",
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(workspace.optuna_storage)
    recorder = StudyRecorder(
        client, experiment_id, parent_run_id, storage, run, plans, units
    )
    progress = Progress(plans, units)

    status = RunStatus.FAILED
    started_ray = _start_ray(ray_address)
    logger.info("Ray Tune results: %s", workspace.ray_results / experiment_name)
    try:
        tuner = tune.Tuner(
            tune.with_resources(train_one, trial_resources),
            param_space={
                "trial": tune.grid_search(
                    [
                        {**dataclasses.asdict(plan), "resources": resources[plan.label]}
                        for plan in plans
                    ]
                )
            },
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent or scale.max_concurrent_trials,
                reuse_actors=False,
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=experiment_name,
                storage_path=str(workspace.ray_results),
                stop=TargetStopper(),
                callbacks=[RecordingCallback(recorder, progress)],
                verbose=0,
            ),
        )
        tuner.fit()
        status = RunStatus.FINISHED
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    finally:
        client.set_terminated(parent_run_id, RunStatus.to_string(status))
        if started_ray:
            ray.shutdown()

    end_states = {
        key: record.last_result.get("end_state", "failed")
        for key, record in recorder.records.items()
        if record.finished
    }
    return StudyRun(
        run=run,
        workspace=workspace,
        plans=plans,
        parent_run_id=parent_run_id,
        end_states=end_states,
        wall_seconds=time.perf_counter() - started,
    )
