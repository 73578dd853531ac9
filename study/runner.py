"""The Ray Tune controller: one Tune trial per grid point, recorded from the driver."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ray Tune's legacy console output is silent at verbose=0; the progress lines
# below replace its status tables. Set before Ray is imported.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Tune warns when saving its experiment state is slow on a busy machine. The
# state is still saved, so the warning only adds noise to the progress lines.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import optuna
import ray
import torch
from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient
from ray import tune

from study.grid import TrialPlan, expand
from study.invocation import command_name
from study.metadata import run_metadata
from study.recording import (
    RunInfo,
    StudyRecorder,
    ensure_experiment,
    find_parent_run,
    read_metadata,
)
from study.spec import StudyFileError, StudySpec, ToyNoiseStudy, WorkloadStudy
from study.workspace import Workspace, signals_deferred
from trainers.config import TrialConfig
from trainers.loop import run_trial
from trainers.toy_noise import run_toy_trial
from trainers.workloads import get_workload_class

logger = logging.getLogger("study")


CHECKPOINT_FILE = "training_state.pt"
TOY_WORKLOAD = "toy_noise"


def _tune_report(metrics: dict[str, Any], checkpoint: dict | None = None) -> None:
    """Report to Tune; a training state is saved as a Tune checkpoint folder."""
    if checkpoint is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(checkpoint, Path(directory) / CHECKPOINT_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def train_one(param_space: dict[str, Any]) -> None:
    """Tune function trainable: run one grid point, resuming from Tune's checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    raw_config = param_space["trial"]["config"]
    if raw_config["workload"] == TOY_WORKLOAD:
        settings = {k: v for k, v in raw_config.items() if k != "workload"}
        constants = {"toy/mu": settings["mu"], "toy/eps": settings["eps"]}
        run_toy_trial(
            settings,
            lambda m: tune.report({**m, **constants, "end_state": "complete"}),
        )
        return
    config = TrialConfig.from_dict(raw_config)
    restore = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restore = torch.load(
                Path(directory) / CHECKPOINT_FILE,
                map_location="cpu",
                weights_only=False,
            )
    run_trial(config, report=_tune_report, restore=restore)


def trial_resources(param_space: dict[str, Any]) -> tune.PlacementGroupFactory:
    resources = param_space["trial"]["resources"]
    bundle = {"CPU": resources["cpu"]}
    if resources["gpu"]:
        bundle["GPU"] = resources["gpu"]
    return tune.PlacementGroupFactory([bundle])


class _TuneHintFilter(logging.Filter):
    """Drops two Ray Tune warnings that mislead after an interrupted run.

    Tune suggests `Tuner.restore(...)`, where `study resume` prints its own
    command, and reports that trials which had not started yet have no
    result files.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Experiment has been interrupted"):
            return False
        return not (
            message.startswith("Failed to fetch metrics for")
            and "FileNotFoundError" in message
        )


_TUNE_HINT_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


@contextlib.contextmanager
def _tune_hints_dropped() -> Iterator[None]:
    """Apply `_TuneHintFilter` to Ray Tune's loggers within the block."""
    hint_filter = _TuneHintFilter()
    for name in _TUNE_HINT_LOGGERS:
        logging.getLogger(name).addFilter(hint_filter)
    try:
        yield
    finally:
        for name in _TUNE_HINT_LOGGERS:
            logging.getLogger(name).removeFilter(hint_filter)


class TargetStopper(tune.Stopper):
    """Stops a trial once its result carries an end state or meets a target
    that ends trials (`target.stop`)."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get("end_state"):
            return True
        raw_config = result["config"]["trial"]["config"]
        if raw_config["workload"] == TOY_WORKLOAD:
            return False
        config = TrialConfig.from_dict(raw_config)
        if not config.target_stop:
            return False
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
        self.best: dict[tuple[str, float], tuple] = {}

    def sync(self, end_states: dict[str, str]) -> None:
        """Count the trials that an earlier process of this run finished."""
        self.done.update(end_states)

    def started(self, key: str) -> None:
        # Tune trains a trial again when a killed driver recorded its end before
        # Tune saved it. Such a trial stays counted as done.
        if key not in self.done:
            self.running.add(key)

    def stopped(self, key: str) -> None:
        self.running.discard(key)

    def recall(self, plan: TrialPlan, state: str, result: dict[str, Any]) -> None:
        """Count a trial that an earlier process of this run finished into the
        best p per batch size, without printing it."""
        self._describe(plan, state, result)

    def _describe(
        self, plan: TrialPlan, state: str, result: dict[str, Any]
    ) -> tuple[str, str]:
        if "noise_ratio" in plan.params:
            if state == "complete":
                return self._toy_detail(plan, result)
            return state, "not counted in the best p"
        if state == "complete":
            return self._final_loss_detail(plan, result)
        return self._training_detail(plan, state, result)

    def finished(self, plan: TrialPlan, state: str, result: dict[str, Any]) -> None:
        self.running.discard(plan.key)
        self.done[plan.key] = state
        detail, best_text = self._describe(plan, state, result)
        pending = self.total - len(self.done) - len(self.running)
        logger.info(
            "[%d done, %d running, %d pending] %s: %s; %s",
            len(self.done),
            len(self.running),
            pending,
            plan.key,
            detail,
            best_text,
        )

    def _training_detail(
        self, plan: TrialPlan, state: str, result: dict[str, Any]
    ) -> tuple[str, str]:
        params = plan.params
        best_key = (plan.label, params["batch_size"])
        if state == "reached":
            detail = f"reached the target in {result['target/steps']} steps"
            # The analysis breaks ties in steps by the validation loss at the
            # step of reaching; the live line uses the same order.
            rank = (int(result["target/steps"]), float(result.get("val/loss", 0.0)))
            if best_key not in self.best or rank < self.best[best_key][0]:
                self.best[best_key] = (rank, params["power"])
        elif state == "censored":
            detail = f"censored after {result.get('step', '?')} steps"
        else:
            detail = f"{state} at step {result.get('step', '?')}"
        best = self.best.get(best_key)
        if best is None and plan.study_attrs.get("analysis") == "compare":
            return detail, "at this batch size no trial is complete yet"
        if best is None:
            return detail, "at this batch size no trial reached the target"
        if not isinstance(best[0], tuple):
            # A compare study ranks complete trials by their final loss.
            return detail, self._lowest_loss_text(plan, best)
        return detail, f"at this batch size best p={best[1]:g} ({best[0][0]} steps)"

    def _final_loss_detail(
        self, plan: TrialPlan, result: dict[str, Any]
    ) -> tuple[str, str]:
        params = plan.params
        loss = float(result.get("val/loss", float("nan")))
        best_key = (plan.label, params["batch_size"])
        if best_key not in self.best or loss < self.best[best_key][0]:
            self.best[best_key] = (loss, params["power"], params["lr_max"])
        detail = f"final val/loss {loss:.4f} after {result.get('step', '?')} steps"
        return detail, self._lowest_loss_text(plan, self.best[best_key])

    @staticmethod
    def _lowest_loss_text(plan: TrialPlan, best: tuple) -> str:
        best_loss, best_power, best_lr = best
        return (
            f"in {plan.label} at this batch size lowest {best_loss:.4f} "
            f"(p={best_power:g}, lr_max={best_lr:g})"
        )

    def _toy_detail(self, plan: TrialPlan, result: dict[str, Any]) -> tuple[str, str]:
        params = plan.params
        value = float(result.get("toy/update_mean", float("nan")))
        best_key = (plan.label, params["noise_ratio"])
        if best_key not in self.best or value > self.best[best_key][0]:
            self.best[best_key] = (value, params["power"])
        best = self.best[best_key]
        return (
            f"update u = {value:.4g}",
            f"at this noise ratio best p={best[1]:g} (u = {best[0]:.4g})",
        )


class RecordingCallback(tune.Callback):
    """Forwards Tune's trial events to the recorder and the progress printer."""

    def __init__(self, recorder: StudyRecorder, progress: Progress) -> None:
        self.recorder = recorder
        self.progress = progress

    @staticmethod
    def _key(trial) -> str:
        return trial.config["trial"]["key"]

    def setup(self, **info) -> None:
        self.recorder.connect()
        finished = {
            key: record
            for key, record in self.recorder.records.items()
            if record.finished
        }
        self.progress.sync({key: record.end_state for key, record in finished.items()})
        for key, record in finished.items():
            self.progress.recall(
                self.recorder.plans[key], record.end_state, record.last_result
            )

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.recorder.start(self._key(trial))
        self.progress.started(self._key(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.recorder.result(self._key(trial), result)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self.recorder.flush(self._key(trial))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.progress.stopped(self._key(trial))
        logger.warning(
            "trial %s crashed; retrying from its latest checkpoint:\n%s",
            self._key(trial),
            _trial_error(trial),
        )

    def on_experiment_end(self, trials, **info) -> None:
        """Record trials that ended while no recorder listened (a driver killed
        between a trial's end and its record)."""
        for trial in trials:
            key = self._key(trial)
            if trial.status not in ("TERMINATED", "ERROR"):
                continue
            if key in self.recorder.unfinished_keys():
                errored = trial.status == "ERROR"
                self.recorder.finish(
                    key,
                    errored=errored,
                    error=_trial_error(trial) if errored else None,
                    last_result=dict(trial.last_result or {}),
                )

    def _finish(self, trial, errored: bool) -> None:
        key = self._key(trial)
        # Tune reports again the trials that an earlier process of this run
        # finished; the progress counts them already.
        recorded_before = key not in self.recorder.unfinished_keys()
        error = _trial_error(trial) if errored else None
        state = self.recorder.finish(key, errored=errored, error=error)
        if errored and error:
            logger.warning("trial %s failed:\n%s", key, error)
        if state is None or recorded_before:
            self.progress.stopped(key)
        if state is None:
            logger.warning(
                "trial %s stopped before its end; it stays unfinished for "
                "`study resume`",
                key,
            )
        elif not recorded_before:
            self.progress.finished(
                self.recorder.plans[key], state, self.recorder.records[key].last_result
            )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=True)


def _trial_error(trial) -> str:
    """Return the traceback of a trial's latest error.

    Ray Tune 2.60 writes it to the trial's local folder and copies it to the
    experiment's storage later. `Trial.get_error` reads only the copy, so it
    returns None while `on_trial_error` runs.
    """
    local_file = trial.error_file
    if local_file and os.path.isfile(local_file):
        text = Path(local_file).read_text(errors="replace").strip()
        if text:
            return text
    stored = trial.get_error()
    if stored:
        return str(stored).strip()
    return "unknown error: Ray Tune kept no error file for this trial"


@dataclass
class StudyRun:
    run: RunInfo
    workspace: Workspace
    plans: list[TrialPlan]
    parent_run_id: str
    end_states: dict[str, str]
    wall_seconds: float
    unfinished: list[str]
    """Trials not finished when the run stopped (interrupted); empty when done."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def progress_unit(label: str, entry: WorkloadStudy | ToyNoiseStudy) -> str:
    if isinstance(entry, ToyNoiseStudy):
        return "simulations"
    return get_workload_class(entry.workload or label).progress_unit


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
        if isinstance(entry, ToyNoiseStudy):
            continue
        workload_class = get_workload_class(entry.workload or label)
        logger.info("preparing data for %s (%s)", label, workload_class.name)
        data = dict(entry.data)
        if entry.downstream is not None:
            data["downstream"] = entry.downstream.model_dump()
        prepared[label] = workload_class.prepare(data, workspace.data_cache)
    return prepared


def _start_ray(address: str | None) -> bool:
    """Connect to `address` or start a local Ray; return True when we started it.

    The SIGTERM handler that the caller installed is kept, and a SIGTERM that
    arrives during `ray.init` reaches it once `ray.init` returns (see
    `_sigterm_kept_during_ray_init`).
    """
    if ray.is_initialized():
        return False
    with _sigterm_kept_during_ray_init():
        if address:
            ray.init(
                address=address, log_to_driver=False, logging_level=logging.WARNING
            )
            return False
        _keep_local_ray_on_loopback()
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        return True


def _keep_local_ray_on_loopback() -> None:
    """Make the local Ray that `ray.init` starts listen on 127.0.0.1 only.

    Ray 2.60 replaces the node address 127.0.0.1 with the machine's routable
    address, and its GCS server, raylet and workers then listen on all
    interfaces, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0. Ray reads that
    variable into `ray_constants.ENABLE_RAY_CLUSTER` once, on import, and this
    module imports Ray before any of its code runs. So the variable is set for
    the processes that Ray starts, and the constant for this one.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    # NOTE: a private constant of Ray 2.60; services.get_node_ip_address
    # reads it on every call.
    ray_constants.ENABLE_RAY_CLUSTER = False


def _join_or_start_ray(address: str | None) -> bool:
    """Run `_start_ray`, and turn a cluster that cannot be joined into a
    StudyFileError that names the address."""
    try:
        return _start_ray(address)
    except ConnectionError as error:
        if not address:
            raise
        raise StudyFileError(
            f"Cannot join the Ray cluster at --ray-address {address} ({error}); "
            "check that its head node runs, or leave the option out to run locally"
        ) from None


def is_restorable(workspace: Workspace, study: str, scale: str, run_id: str) -> bool:
    """Return whether run `run_id` has a Ray Tune experiment that Tune can restore.

    A run has none when it stopped before Tune saved its experiment state.
    """
    experiment = workspace.ray_results / RunInfo(study, scale, run_id).experiment_name
    return _tune_state_saved(experiment)


def _tune_state_saved(experiment: Path) -> bool:
    """Return whether Tune saved both parts of experiment `experiment` that
    `Tuner.restore` reads: the tuner (`tuner.pkl`, written first) and the
    trial states (`experiment_state-<time>.json`, written once the trials are
    set up). `Tuner.can_restore` looks only for the first, and a run stopped
    between the two then fails inside `Tuner.restore`."""
    return tune.Tuner.can_restore(str(experiment)) and any(
        experiment.glob("experiment_state-*.json")
    )


@contextlib.contextmanager
def _sigterm_kept_during_ray_init() -> Iterator[None]:
    """Keep Ray 2.60's `ray.init` from replacing the caller's SIGTERM handler.

    `ray.init` first sets a SIGTERM handler that calls `sys.exit(15)` wherever
    the driver is. A SIGTERM during the seconds that `ray.init` takes then
    ended the driver with status 15 and no message, or was lost when the exit
    landed in a fork callback. Ray's core worker also installs Abseil's failure
    signal handler for SIGTERM. It prints a native stack trace, forwards the
    signal and arms a 3 s alarm that calls abort(), so a driver still cleaning
    up after SIGTERM died with status 134.

    Here Ray's Python handler is not installed, a SIGTERM during `ray.init` is
    held, the caller's handler is installed again afterwards (which also
    replaces Abseil's), and a held SIGTERM is raised again for it.
    """
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread can set signal handlers, so Ray's stay.
        yield
        return
    caller_handler = signal.getsignal(signal.SIGTERM)
    pending_signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: pending_signals.append(signum))
    # NOTE: a private function of Ray 2.60, which ray.init calls to set its
    # SIGTERM handler.
    set_sigterm_handler = ray._private.utils.set_sigterm_handler
    ray._private.utils.set_sigterm_handler = lambda handler: None
    # The processes that ray.init starts inherit this mask, as Ray's own
    # processes inherit a blocked SIGINT. A SIGTERM sent to the whole process
    # group (`timeout`, systemd) then reaches the driver but not the GCS and
    # raylet, which the driver still needs to stop its trials and save them.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        ray._private.utils.set_sigterm_handler = set_sigterm_handler
        signal.signal(
            signal.SIGTERM,
            signal.SIG_DFL if caller_handler is None else caller_handler,
        )
        # A SIGTERM held by the mask reaches the caller's handler here.
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if pending_signals:
            signal.raise_signal(signal.SIGTERM)


# The tag that marks a parent run whose Tune experiment was never saved.
UNRESTORABLE_TAG = "unrestorable"


def unfinished_runs(
    client: MlflowClient, study: str, scale: str, workspace: Workspace
) -> list[Run]:
    """Return the MLflow parent runs of this workspace's unfinished runs of a
    scale, newest first, leaving out those tagged `unrestorable`.

    Runs that other workspaces recorded in shared stores are left out, because
    their Tune experiments live in those workspaces (see `_is_workspace_run`).
    """
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return []
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.study = '{study}' and tags.scale = '{scale}'",
        order_by=["attributes.start_time DESC"],
        max_results=50000,
    )
    workspace_id = workspace.read_id()
    return [
        parent
        for parent in parents
        if "mlflow.parentRunId" not in parent.data.tags
        and UNRESTORABLE_TAG not in parent.data.tags
        and parent.info.status != "FINISHED"
        and _is_workspace_run(parent.data.tags, workspace, workspace_id)
    ]


def find_continuable_run(
    client: MlflowClient, study: str, scale: str, workspace: Workspace
) -> str | None:
    """Return the run id of this workspace's latest unfinished run of a scale
    that Ray Tune can restore.

    A newer unfinished run whose driver stopped before Tune saved its
    experiment can never be continued: it is logged, marked FAILED and tagged
    `unrestorable`, and skipped from then on. The caller has taken the
    workspace's `run_lock`, so no driver is still starting such a run.
    """
    for parent in unfinished_runs(client, study, scale, workspace):
        run_id = parent.data.tags["study_run_id"]
        if is_restorable(workspace, study, scale, run_id):
            return run_id
        logger.warning(
            "unfinished run %s of %s (%s) stopped before Ray Tune saved its "
            "experiment, so it cannot be continued; its records stay, marked FAILED",
            run_id,
            study,
            scale,
        )
        client.set_tag(parent.info.run_id, UNRESTORABLE_TAG, "no Tune experiment")
        client.set_terminated(parent.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    return None


def _is_workspace_run(
    tags: dict[str, str], workspace: Workspace, workspace_id: str | None
) -> bool:
    """Return whether a parent run with `tags` belongs to `workspace`.

    Every run in stores that only this workspace writes is its own, also
    after the folder was moved or copied. In shared stores a run belongs to
    the workspace whose id is in its `workspace_id` tag. A run recorded before
    that tag existed belongs to the folder path in its `workspace` tag.
    """
    if workspace.owns_stores:
        return True
    if "workspace_id" in tags:
        return workspace_id is not None and tags["workspace_id"] == workspace_id
    return tags.get("workspace") == str(workspace.root)


def _workspace_tags(workspace: Workspace) -> dict[str, str]:
    """Return the parent run tags that name the workspace: its folder, for
    people, and its id, which `find_continuable_run` matches."""
    tags = {"workspace": str(workspace.root)}
    workspace_id = workspace.read_id()
    if workspace_id is not None:
        tags["workspace_id"] = workspace_id
    return tags


def _parent_run_id(client: MlflowClient, run: RunInfo) -> str:
    parent = find_parent_run(client, run.study, run.scale, run.run_id)
    if parent is None:
        raise StudyFileError(
            f"Run {run.run_id} of study {run.study!r} has no MLflow parent run in "
            "this tracking store; pass the --workspace and --tracking-uri it used"
        )
    return parent.info.run_id


# Settings that may change between the start of a run and its continuation,
# because they decide where and how fast trials run, not what they train.
_SCALE_SETTINGS_FREE_TO_CHANGE = {
    "description",
    "max_concurrent_trials",
    "max_failures",
    "keep_checkpoints",
}
_ENTRY_SETTINGS_FREE_TO_CHANGE = {"resources"}


def _training_settings(scale_dump: dict[str, Any]) -> dict[str, Any]:
    """Flatten a scale's settings to dotted keys, leaving out those that
    `_SCALE_SETTINGS_FREE_TO_CHANGE` and `_ENTRY_SETTINGS_FREE_TO_CHANGE` name."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value

    for key, value in scale_dump.items():
        if key in _SCALE_SETTINGS_FREE_TO_CHANGE:
            continue
        if key != "workloads":
            walk(key, value)
            continue
        for label, entry in value.items():
            training = {
                name: item
                for name, item in entry.items()
                if name not in _ENTRY_SETTINGS_FREE_TO_CHANGE
            }
            walk(f"workloads.{label}", training)
    return flat


def _recorded_metadata(
    client: MlflowClient, study: str, scale_name: str, run_id: str
) -> dict[str, Any]:
    """Return the metadata.json of run `run_id`'s parent run, or an empty dict
    (with a warning) when it cannot be read."""
    parent = find_parent_run(client, study, scale_name, run_id)
    if parent is None:
        return {}
    try:
        metadata = read_metadata(client, parent.info.run_id)
    except Exception:  # noqa: BLE001 - MLflow raises several types here
        logger.warning(
            "run %s has no readable metadata.json, so its settings and data "
            "are not compared with the study file",
            run_id,
        )
        return {}
    return metadata if isinstance(metadata, dict) else {}


def changed_data_folders(
    client: MlflowClient,
    study: str,
    scale_name: str,
    run_id: str,
    prepared: dict[str, dict],
) -> list[tuple[str, str, str, str]]:
    """Return (workload, key, recorded folder, prepared folder) for each data
    folder that `prepared` names differently from when run `run_id` started.

    Its trials keep reading the recorded folders, because Ray Tune restores
    their settings. Runs recorded before the folders were stored give none.
    """
    recorded = _recorded_metadata(client, study, scale_name, run_id).get(
        "prepared_data"
    )
    if not isinstance(recorded, dict):
        return []
    changes = []
    for label, data in prepared.items():
        old_folders = recorded.get(label) or {}
        for key, new in prepared_folders(data).items():
            old = old_folders.get(key)
            if old is not None and old != new:
                changes.append((label, key, old, new))
    return changes


def changed_settings(
    client: MlflowClient, study: str, scale_name: str, run_id: str, spec: StudySpec
) -> list[str]:
    """Return the training settings of `spec`'s scale that differ from those
    that run `run_id` recorded when it started, as `key: old -> new` lines.

    A setting that the recorded run lacks is left out: it was added to the
    study files after the run started. An empty list also comes back when the
    run recorded no settings.
    """
    metadata = _recorded_metadata(client, study, scale_name, run_id)
    recorded_config = metadata.get("config")
    if not isinstance(recorded_config, dict):
        return []
    recorded = _training_settings(recorded_config)
    current = _training_settings(spec.scale(scale_name).model_dump(mode="json"))
    changes = []
    for key, old in recorded.items():
        new = current.get(key, "(not set)")
        if new != old:
            changes.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return changes


def _create_parent_run(
    client: MlflowClient,
    experiment_id: str,
    run: RunInfo,
    plans,
    scale,
    workspace: Workspace,
    extra_tags: dict[str, str] | None = None,
) -> str:
    parent = client.create_run(
        experiment_id,
        run_name=run.experiment_name,
        tags={
            "study": run.study,
            "scale": run.scale,
            "study_run_id": run.run_id,
            **_workspace_tags(workspace),
            **(extra_tags or {}),
        },
    )
    parent_run_id = parent.info.run_id
    client.log_param(parent_run_id, "trials", len(plans))
    metadata = run_metadata(scale.model_dump(mode="json"))
    metadata["prepared_data"] = {
        plan.label: prepared_folders(plan.config.get("data", {})) for plan in plans
    }
    client.log_dict(parent_run_id, metadata, "metadata.json")
    return parent_run_id


# Keys of a workload's prepared data settings that name a folder its trials
# read: token shards, downstream requests and image datasets.
PREPARED_FOLDER_KEYS = ("shards_dir", "downstream_dir", "root")


def prepared_folders(data: dict[str, Any]) -> dict[str, str]:
    """Return the folders that prepared data settings name, by key."""
    return {key: str(data[key]) for key in PREPARED_FOLDER_KEYS if data.get(key)}


def run_study(
    spec: StudySpec,
    scale_name: str,
    workspace: Workspace,
    *,
    ray_address: str | None = None,
    max_concurrent: int | None = None,
    resume_run_id: str | None = None,
    parent_tags: dict[str, str] | None = None,
    on_recorded: Callable[[str], None] | None = None,
    prepared: dict[str, dict] | None = None,
) -> StudyRun:
    """Run every trial of one scale under Ray Tune and record them all.

    With `resume_run_id`, continue that run's Tune experiment instead:
    finished trials are kept, unfinished and errored ones continue from their
    latest checkpoint, and never-started ones start. `parent_tags` are added
    to a new run's MLflow parent run. `on_recorded` is called with the run id
    once the run's MLflow parent run exists, so that a caller interrupted
    later can name the run to continue. `prepared` is what `prepare_data`
    returned for this spec and scale, when the caller prepared the data.
    """
    started = time.perf_counter()
    scale = spec.scale(scale_name)
    run = RunInfo(spec.name, scale_name, resume_run_id or new_run_id())
    experiment_path = workspace.ray_results / run.experiment_name
    if resume_run_id and not _tune_state_saved(experiment_path):
        raise StudyFileError(
            f"Run {resume_run_id} has no restorable Ray Tune experiment at "
            f"{experiment_path}; start a new run with `{command_name()} run --fresh`"
        )
    if prepared is None:
        prepared = prepare_data(spec, scale_name, workspace)
    plans = expand(scale, prepared, spec.analysis)
    units = {
        label: progress_unit(label, entry) for label, entry in scale.workloads.items()
    }
    resources = {
        label: entry.resources.model_dump() for label, entry in scale.workloads.items()
    }

    # Ray starts before the run is recorded: a Ray that cannot be started or
    # joined leaves no parent run that `study run` would try to continue.
    started_ray = _join_or_start_ray(ray_address)
    client = workspace.open_stores()
    parent_run_id = None

    def open_recorder() -> StudyRecorder:
        """Return a recorder of this run, once its experiment and parent run exist."""
        return StudyRecorder(
            workspace.tracking_uri,
            workspace.optuna_storage,
            experiment_id,
            parent_run_id,
            run,
            plans,
            units,
        )

    try:
        # A tracking server keeps artifacts in its own store; a local database
        # keeps them beside it in the workspace.
        remote = workspace.tracking_uri.startswith(("http://", "https://"))
        artifact_uri = None if remote else workspace.artifact_root.as_uri()
        with workspace.store_setup_lock():
            experiment_id = ensure_experiment(client, spec.name, artifact_uri)
        if resume_run_id:
            parent_run_id = _parent_run_id(client, run)
            client.update_run(parent_run_id, status="RUNNING")
            # A moved or copied workspace, or a run recorded before the
            # workspace_id tag existed, names its current folder and id from now on.
            for name, value in _workspace_tags(workspace).items():
                client.set_tag(parent_run_id, name, value)
        else:
            parent_run_id = _create_parent_run(
                client, experiment_id, run, plans, scale, workspace, parent_tags
            )
        if on_recorded is not None:
            on_recorded(run.run_id)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        recorder = open_recorder()
        recorder.connect()
    except BaseException:
        if parent_run_id is not None:
            client.set_terminated(parent_run_id, RunStatus.to_string(RunStatus.FAILED))
        if started_ray:
            ray.shutdown()
        raise
    logger.info(
        "study %s, scale %s, %s run %s: %d trials (%d already finished); workspace %s",
        spec.name,
        scale_name,
        "resuming" if resume_run_id else "new",
        run.run_id,
        len(plans),
        len(plans) - len(recorder.unfinished_keys()),
        workspace.root,
    )

    status = RunStatus.FAILED
    logger.info("Ray Tune results: %s", experiment_path)
    # Ray Tune installs its own SIGINT handler, which only sets Tune's stop
    # flag, and leaves it in place after a run that no signal stopped. The
    # caller's handler is put back so that Ctrl-C and SIGTERM stop the
    # analysis that follows.
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        trainable = tune.with_resources(train_one, trial_resources)
        callback = RecordingCallback(recorder, Progress(plans, units))
        if resume_run_id:
            _repoint_unstarted_trials(experiment_path)
            with _tune_hints_dropped():
                tuner = tune.Tuner.restore(
                    str(experiment_path),
                    trainable=trainable,
                    resume_unfinished=True,
                    resume_errored=True,
                )
            _replace_restored_callbacks(tuner, callback)
        else:
            tuner = _new_tuner(
                trainable,
                spec,
                scale,
                run,
                plans,
                resources,
                workspace,
                max_concurrent,
                callback,
            )
        with _tune_hints_dropped():
            tuner.fit()
        status = RunStatus.FINISHED
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    finally:
        if sigint_handler is not None and (
            threading.current_thread() is threading.main_thread()
        ):
            signal.signal(signal.SIGINT, sigint_handler)
        # A Ctrl-C here stopped `ray.shutdown` halfway, after which the driver
        # exited with status 1, or came before the parent run was ended and
        # left it RUNNING. Signals wait until these steps are done.
        with signals_deferred():
            # A fresh connection reads what the callback wrote in this process.
            final = open_recorder()
            unfinished = final.unfinished_keys()
            if status == RunStatus.FINISHED and unfinished:
                status = RunStatus.KILLED
            final.stop_unfinished()
            client.set_terminated(parent_run_id, RunStatus.to_string(status))
            if started_ray:
                ray.shutdown()

    end_states = {
        key: record.end_state
        for key, record in final.records.items()
        if record.finished
    }
    return StudyRun(
        run=run,
        workspace=workspace,
        plans=plans,
        parent_run_id=parent_run_id,
        end_states=end_states,
        wall_seconds=time.perf_counter() - started,
        unfinished=unfinished,
    )


# Ray Tune 2.60's BasicVariantGenerator saves its state to this pattern.
SEARCH_STATE_FILES = "basic-variant-state-*.json"


def _repoint_unstarted_trials(experiment_path: Path) -> None:
    """Point the trials that Tune has not created yet at `experiment_path`.

    Tune 2.60 moves the trials that it restores to the experiment folder it
    restores from. The grid points that its search algorithm has not turned
    into trials yet keep the storage of the folder the run started in, so
    after a move or copy their checkpoints would go to that folder. This
    rewrites the search algorithm's saved state before Tune reads it.
    """
    from ray import cloudpickle

    for path in sorted(experiment_path.glob(SEARCH_STATE_FILES)):
        state = cloudpickle.loads(path.read_bytes())
        changed = False
        for storage in _unstarted_trial_storages(state):
            if Path(storage.experiment_fs_path) == experiment_path:
                continue
            # The same fields that Tune updates on the trials it restores.
            storage.storage_fs_path = experiment_path.parent.as_posix()
            storage.experiment_dir_name = experiment_path.name
            changed = True
        if changed:
            partial = path.with_name(f".{path.name}.partial")
            partial.write_bytes(cloudpickle.dumps(state))
            os.replace(partial, path)


def _unstarted_trial_storages(search_state: dict) -> Iterator:
    """Yield the storage contexts in a BasicVariantGenerator's saved state: one
    in each grid's spec and one in each grid point's spec not yet made a trial."""
    # NOTE: this reads private attributes of Ray Tune 2.60's _TrialIterator
    # and _VariantIterator, and was checked against that version only.
    for iterator in search_state.get("_iterators", []):
        specs = [iterator.unresolved_spec]
        variants = getattr(iterator, "variants", None)
        if variants is not None and not variants.lazy_eval:
            specs.extend(spec for _, spec in variants.iterable)
        for spec in specs:
            storage = spec.get("storage")
            if storage is not None:
                yield storage


def _replace_restored_callbacks(tuner: tune.Tuner, callback: RecordingCallback) -> None:
    """Record a restored experiment with this process's recorder.

    Tune restores the callbacks pickled with the experiment, and their
    recorder contains the store URIs of the folder that the run started in. After
    a move those stores are gone, and after a copy they are the other copy's.
    """
    local_tuner = getattr(tuner, "_local_tuner", None)
    if local_tuner is None:
        # NOTE: under Ray Client (ray:// addresses) the tuner lives in the
        # cluster, so the pickled callbacks and their store URIs stay.
        logger.warning(
            "a Ray Client tuner keeps the recorder it was started with; resume "
            "from the workspace path and stores that the run started with"
        )
        return
    local_tuner.get_run_config().callbacks = [callback]


def _new_tuner(
    trainable,
    spec: StudySpec,
    scale,
    run: RunInfo,
    plans: list[TrialPlan],
    resources: dict[str, dict],
    workspace: Workspace,
    max_concurrent: int | None,
    callback: RecordingCallback,
) -> tune.Tuner:
    grid = [
        {**dataclasses.asdict(plan), "resources": resources[plan.label]}
        for plan in plans
    ]
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent or scale.max_concurrent_trials,
            reuse_actors=False,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=run.experiment_name,
            storage_path=str(workspace.ray_results),
            stop=TargetStopper(),
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=scale.keep_checkpoints),
            verbose=0,
        ),
    )


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"
