"""Experiment creation when two drivers share one tracking store."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from study.grid import expand
from study.recording import (
    MAX_PARAM_VALUE_CHARS,
    StudyRecorder,
    ensure_experiment,
    trial_params,
)
from study.runner import Progress, RecordingCallback
from study.spec import load_study
from tests.study.recorded_runs import SCALE, STUDY, reached_result, record_run


class FirstReadMissesClient(MlflowClient):
    """A client whose first lookup runs before another driver's create."""

    lookups = 0

    def get_experiment_by_name(self, name):
        self.lookups += 1
        if self.lookups == 1:
            return None
        return super().get_experiment_by_name(name)


def test_ensure_experiment_adopts_a_concurrent_create(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other_driver = MlflowClient(tracking_uri=uri)
    created = other_driver.create_experiment("power_sweep")

    late = FirstReadMissesClient(tracking_uri=uri)
    experiment_id = ensure_experiment(late, "power_sweep", None)

    assert experiment_id == created
    assert late.lookups == 2
    assert len(other_driver.search_experiments()) == 2  # Default and power_sweep


def test_ensure_experiment_creates_once(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    first = ensure_experiment(client, "lr_tune", None)
    second = ensure_experiment(client, "lr_tune", None)

    assert first == second


# Child runs, their params and their status across a stop and a resume, in
# real sqlite stores (recorded_runs.py records runs without Ray).


def _recorder(recorded) -> StudyRecorder:
    """Return a new recorder of a recorded run, as a resuming driver opens one."""
    workspace = recorded.workspace
    client = workspace.open_stores()
    experiment_id = ensure_experiment(client, recorded.run.study, None)
    units = {plan.label: "tokens" for plan in recorded.plans}
    recorder = StudyRecorder(
        workspace.tracking_uri,
        workspace.optuna_storage,
        experiment_id,
        recorded.parent_run_id,
        recorded.run,
        recorded.plans,
        units,
    )
    recorder.connect()
    return recorder


def _children(recorded, condition: str = "") -> dict[str, Run]:
    """Map trial keys to the child runs of a recorded run that match `condition`."""
    client = MlflowClient(tracking_uri=recorded.workspace.tracking_uri)
    experiment = client.get_experiment_by_name(recorded.run.study)
    parent = f"tags.mlflow.parentRunId = '{recorded.parent_run_id}'"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"{parent} and {condition}" if condition else parent,
    )
    return {run.data.tags["trial_key"]: run for run in runs}


class FakeTrial:
    """The attributes of a Ray Tune trial that RecordingCallback reads."""

    def __init__(self, key: str, status: str = "RUNNING") -> None:
        self.config = {"trial": {"key": key}}
        self.status = status
        self.error_file = None
        self.last_result: dict = {}

    def get_error(self) -> None:
        return None


PROGRESS_LINE = re.compile(r"^\[(-?\d+) done, (-?\d+) running, (-?\d+) pending\] ")


def test_progress_counts_rerun_trial_once(tmp_path, caplog):
    # A killed driver recorded trials 0 and 1 as finished before Ray Tune saved
    # their end, so the resumed experiment trains trial 1 again.
    recorded = record_run(tmp_path / "ws", {0: "reached", 1: "reached"})
    plans = recorded.plans
    callback = RecordingCallback(_recorder(recorded), Progress(plans, {}))
    callback.setup()
    caplog.set_level(logging.INFO, logger="study")

    rerun = FakeTrial(plans[1].key)
    callback.on_trial_start(0, [], rerun)
    for index, plan in enumerate(plans[2:], start=2):
        trial = FakeTrial(plan.key)
        callback.on_trial_start(0, [], trial)
        if index == 2:
            callback.on_trial_complete(0, [], rerun)
        callback.on_trial_result(0, [], trial, reached_result(plan, 10 + index))
        callback.on_trial_complete(0, [], trial)

    lines = [
        record.getMessage()
        for record in caplog.records
        if PROGRESS_LINE.match(record.getMessage())
    ]
    assert len(lines) == len(plans) - 2
    for line in lines:
        done, running, pending = map(int, PROGRESS_LINE.match(line).groups())
        assert running == 0, line
        assert pending >= 0, line
        assert done + running + pending == len(plans), line
    assert lines[-1].startswith(f"[{len(plans)} done, 0 running, 0 pending] ")


def test_progress_best_counts_earlier_trials(tmp_path, caplog):
    # Trial 0 reached the target in 8 steps before the driver stopped.
    recorded = record_run(tmp_path / "ws", {0: "reached"})
    plans = recorded.plans
    first = plans[0]
    callback = RecordingCallback(_recorder(recorded), Progress(plans, {}))
    callback.setup()
    caplog.set_level(logging.INFO, logger="study")

    later = next(
        plan
        for plan in plans[1:]
        if plan.label == first.label
        and plan.params["batch_size"] == first.params["batch_size"]
    )
    trial = FakeTrial(later.key)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, reached_result(later, 30))
    callback.on_trial_complete(0, [], trial)

    (line,) = [r.getMessage() for r in caplog.records if later.key in r.getMessage()]
    assert line.endswith(
        f"at this batch size best p={first.params['power']:g} (8 steps)"
    ), line


def test_child_params_name_training_settings(tmp_path):
    recorded = record_run(
        tmp_path / "ws", {index: "reached" for index in range(4)}, study="blockwise_lr"
    )
    children = _children(recorded)
    assert len(children) == 4
    for key, run in children.items():
        params = run.data.params
        assert params["blockwise_lr"] == str(key.startswith("blockwise/"))
        assert params["optimizer"] == "adampower"
        assert params["precision"] == "fp32"
        assert params["micro_batch_size"] == "None"
        assert params["schedule"] == "cos"
        assert params["model.preset"] == "tiny"
        assert params["model_preset"] == "tiny"
        assert params["data.source"] == "bible"
        # Not set in the study file, so the workload's default.
        assert params["data.tokenizer"] == "bpe"
        assert params["data.seq_len"] == "32"
        for runtime in ("threads", "device", "checkpoint_every_steps"):
            assert runtime not in params
    blockwise = _children(recorded, "params.blockwise_lr = 'True'")
    assert sorted(blockwise) == sorted(k for k in children if "blockwise/" in k)


def test_child_params_name_image_dataset(tmp_path):
    recorded = record_run(tmp_path / "ws", {4: "reached"})
    ((key, run),) = _children(recorded).items()
    assert key.startswith("vision/")
    assert run.data.params["data.dataset"] == "fashion_mnist"
    assert run.data.params["data.train_examples"] == "2048"
    assert run.data.params["workload"] == "vision"


def test_child_params_ignore_data_cache():
    scale = load_study(STUDY).scale(SCALE)
    before = expand(scale, {"lm": {"shards_dir": "/cache/a"}})
    after = expand(scale, {"lm": {"shards_dir": "/moved/cache/b"}})
    assert [trial_params(plan) for plan in before] == [
        trial_params(plan) for plan in after
    ]
    assert not any("shards_dir" in name for name in trial_params(before[0]))


def test_child_param_values_fit_mlflow_limits():
    (plan,) = expand(load_study(STUDY).scale(SCALE), {"lm": {}})[:1]
    long_paths = {"source": "files", "paths": [f"/data/{i:05d}" for i in range(900)]}
    attrs = {**plan.study_attrs, "data": json.dumps(long_paths)}
    params = trial_params(dataclasses.replace(plan, study_attrs=attrs))
    assert len(params["data.paths"]) == MAX_PARAM_VALUE_CHARS
    assert params["data.paths"].endswith("...")
    assert all(len(value) <= MAX_PARAM_VALUE_CHARS for value in params.values())


def test_stopped_child_runs_killed_until_resumed(tmp_path):
    recorded = record_run(tmp_path / "ws", {0: "reached"})
    finished_key, stopped_key = recorded.plans[0].key, recorded.plans[1].key
    recorder = _recorder(recorded)
    recorder.start(stopped_key)
    recorder.result(stopped_key, {"step": 3, "train/loss": 4.0})
    recorder.flush(stopped_key)

    # The driver stops; the stopped trial's child run is no longer RUNNING.
    assert recorder.stop_unfinished() == [stopped_key]
    children = _children(recorded)
    assert children[stopped_key].info.status == "KILLED"
    assert children[stopped_key].data.tags["end_state"] == "unfinished"
    assert children[finished_key].info.status == "FINISHED"
    assert children[finished_key].data.tags["end_state"] == "reached"
    stopped_run_id = children[stopped_key].info.run_id
    params_before = children[stopped_key].data.params

    # A resuming driver reads the same child run back and marks it RUNNING.
    resumed = _recorder(recorded)
    assert resumed.unfinished_keys()[0] == stopped_key
    resumed.start(stopped_key)
    children = _children(recorded)
    assert children[stopped_key].info.run_id == stopped_run_id
    assert children[stopped_key].info.status == "RUNNING"
    assert children[stopped_key].data.tags["end_state"] == "running"
    assert children[stopped_key].data.params == params_before

    plan = recorded.plans[1]
    resumed.result(stopped_key, reached_result(plan, 9))
    assert resumed.finish(stopped_key, errored=False) == "reached"
    children = _children(recorded)
    assert len(children) == 2
    assert children[stopped_key].info.status == "FINISHED"
    reached = _children(recorded, "tags.end_state = 'reached'")
    assert sorted(reached) == sorted([finished_key, stopped_key])
    assert _children(recorded, "tags.end_state = 'unfinished'") == {}
    client = MlflowClient(tracking_uri=recorded.workspace.tracking_uri)
    steps = [m.step for m in client.get_metric_history(stopped_run_id, "train/loss")]
    assert steps == [3, 9]


def test_tune_restore_hint_is_dropped():
    from study.runner import _TuneHintFilter

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord(
            "ray.tune.tune", logging.WARNING, "", 0, message, (), None
        )

    hint_filter = _TuneHintFilter()
    interrupted = (
        "Experiment has been interrupted, but the most recent state was saved.\n"
        'Resume experiment with: Tuner.restore(path="/x", trainable=...)'
    )
    assert not hint_filter.filter(record(interrupted))
    missing = (
        "Failed to fetch metrics for 1 trial(s):\n- t: FileNotFoundError('Could "
        "not fetch metrics for t')"
    )
    assert not hint_filter.filter(record(missing))
    assert hint_filter.filter(record("Failed to fetch metrics for 1 trial(s): OSError"))
    assert hint_filter.filter(record("Stop signal received (e.g. via SIGINT/Ctrl+C)"))
