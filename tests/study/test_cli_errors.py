"""Bad input and unfinished or failed runs end in one `error:` line, not a traceback.

Most runs are recorded in real sqlite stores by the recorder that `study run`
uses (recorded_runs.py), without Ray. The tests of failed trials and of an
unrestorable run train two-trial studies of the tiny language model under
Ray Tune instead.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

import study.runner
import study.workspace
from study.cli import EXIT_BAD_INPUT, EXIT_TRIALS_FAILED, main
from study.grid import TrialPlan
from study.invocation import command_name
from study.recording import RunInfo
from study.runner import Progress
from study.workspace import HTTP2_EMPTY_SETTINGS_FRAME, _check_ray_address
from tests.study.recorded_runs import SCALE, STUDY, record_run
from tests.study.resilience_support import (
    study_command,
    wait_for_file,
    wait_for_line,
    write_study,
)
from tests.trainers.sample_data import save_word_tokenizer, write_c4_shards

LOOPBACK = "127.0.0.1"
TOY_STUDY = "toy_noise_regimes"


def _study_args(command: str, workspace: Path, study: str = STUDY) -> list[str]:
    return [command, study, "--scale", SCALE, "--workspace", str(workspace)]


def _run_args(workspace: Path, *options: str, study: str = STUDY) -> list[str]:
    return _study_args("run", workspace, study) + list(options)


# Recorded workspaces, shared by the module because creating the MLflow tables
# takes seconds. Tests that write copy them first.


@pytest.fixture(scope="module")
def empty_run(tmp_path_factory) -> Path:
    """A workspace whose run stopped before any trial finished."""
    root = tmp_path_factory.mktemp("empty_run") / "ws"
    record_run(root, {})
    return root


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory) -> Path:
    """A workspace whose run finished 4 of its 8 grid points, all of the lm workload."""
    root = tmp_path_factory.mktemp("partial_run") / "ws"
    record_run(root, {index: "reached" for index in range(4)})
    return root


# Threads that listen on 127.0.0.1 for the address checks.


class _Listener:
    """A TCP server on 127.0.0.1 that sends `greeting` to each client and then
    keeps the connection open without reading, until the test ends."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.server = socket.create_server((LOOPBACK, 0))
        # accept() wakes up this often to see whether the test has ended.
        self.server.settimeout(0.1)
        self.stopped = threading.Event()
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(connection)
            if self.greeting:
                connection.sendall(self.greeting)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.server.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def listener() -> Iterator[callable]:
    started: list[_Listener] = []

    def start(greeting: bytes = b"") -> _Listener:
        started.append(_Listener(greeting))
        return started[-1]

    yield start
    for server in started:
        server.close()


# Two-trial studies of the tiny language model, trained by Ray Tune.

TWO_POWERS = {"batch_size": [4], "power": [1.0, 1.2], "lr_max": [0.01]}
BASELINE_KEY = "lm/bs=4/p=1/lr=0.01/seed=0"
FAULTY_KEY = "lm/bs=4/p=1.2/lr=0.01/seed=0"
BOTH_KEYS = sorted([BASELINE_KEY, FAULTY_KEY])
STEPS = 4
INJECTED_ERROR = "RuntimeError: injected fault: error at step 2"


def _write_two_trials(directory: Path, name: str, **workload) -> Path:
    """Write a study of two 4-step trials, p = 1.0 and 1.2, that evaluate once
    at the end. A failed trial is not retried (max_failures: 0)."""
    return write_study(
        directory, name, TWO_POWERS, steps=STEPS, scale={"max_failures": 0}, **workload
    )


@pytest.fixture
def local_ray() -> Iterator[str]:
    """Start the local Ray that `study run` starts, once for the whole test, and
    return its GCS address. Runs in this process use it because Ray is already
    initialized, and a driver in another process joins it with --ray-address."""
    study.runner._start_ray(None)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _recorded_runs(workspace: Path, study_name: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study_name)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _parents_by_run(workspace: Path, study_name: str) -> dict[str, Any]:
    """Map each study run id to its MLflow parent run."""
    return {
        run.data.tags["study_run_id"]: run
        for run in _recorded_runs(workspace, study_name)
        if "mlflow.parentRunId" not in run.data.tags
    }


def _children_by_run(workspace: Path, study_name: str) -> dict[str, list]:
    """Map each study run id to the MLflow child runs of its trials."""
    runs = _recorded_runs(workspace, study_name)
    study_run_ids = {
        run.info.run_id: run.data.tags["study_run_id"]
        for run in runs
        if "mlflow.parentRunId" not in run.data.tags
    }
    children: dict[str, list] = {run_id: [] for run_id in study_run_ids.values()}
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent is not None:
            children[study_run_ids[parent]].append(run)
    return children


def _trials_by_run(workspace: Path, study_name: str) -> dict[str, list]:
    """Map each study run id to the Optuna trials of its studies."""
    storage = f"sqlite:///{workspace / 'optuna.db'}"
    trials: dict[str, list] = {}
    for summary in optuna.get_all_study_summaries(storage):
        if summary.user_attrs.get("study") != study_name:
            continue
        loaded = optuna.load_study(study_name=summary.study_name, storage=storage)
        run_id = summary.user_attrs["run_id"]
        trials.setdefault(run_id, []).extend(loaded.get_trials())
    return trials


def _run_keys(runs: list) -> list[str]:
    return sorted(run.data.tags["trial_key"] for run in runs)


def _trial_keys(trials: list) -> list[str]:
    return sorted(trial.user_attrs["trial_key"] for trial in trials)


# 1. Runs without finished trials, and unfinished runs.


@pytest.mark.parametrize("command", ["analyze", "export-table", "report"])
def test_run_without_finished_trials(empty_run, command, capsys):
    assert main(_study_args(command, empty_run)) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith("error: Run ")
    assert "has no finished trials yet" in error
    assert f"resume {STUDY} --scale {SCALE} --workspace {empty_run}" in error
    assert "Traceback" not in error
    assert not (empty_run / "exports").exists()


def test_analyze_unfinished_run_counts_missing(partial_run, capsys):
    assert main(_study_args("analyze", partial_run)) == 0
    output = capsys.readouterr().out
    assert "is unfinished: 4 of 8 grid points have no finished trial yet" in output
    assert f"resume {STUDY} --scale {SCALE}" in output
    assert "workload vision has no finished trials yet" in output


# 2. Failed trials.


def test_failed_trials_exit_nonzero(tmp_path, local_ray, capsys, caplog):
    name = "failing_trial"
    fault = {"error_at_step": 2, "only": {"power": 1.2}}
    path = _write_two_trials(tmp_path, name, fault_injection=fault)
    workspace = tmp_path / "ws"
    code = main(_run_args(workspace, study=str(path)))
    output = capsys.readouterr()
    assert code == EXIT_TRIALS_FAILED, output.err[-3000:]
    assert "1 censored, 1 failed" in output.out
    # The traceback that the summary refers to, logged when the trial failed.
    failures = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith(f"trial {FAULTY_KEY} failed:")
    ]
    assert len(failures) == 1
    assert INJECTED_ERROR in failures[0]
    last_line = output.err.strip().splitlines()[-1]
    assert last_line.startswith(
        f"error: 1 of 2 trials of {name} ({SCALE}) failed: {FAULTY_KEY}. "
    )
    assert "filter the runs with tags.end_state = 'failed'" in last_line
    rerun = (
        f" run {shlex.quote(str(path))} --scale {SCALE} "
        f"--workspace {shlex.quote(str(workspace))} --fresh`"
    )
    assert rerun in last_line

    runs = _children_by_run(workspace, name)
    assert len(runs) == 1
    (first_id,) = runs
    children = runs[first_id]
    by_key = {run.data.tags["trial_key"]: run for run in children}
    assert sorted(by_key) == BOTH_KEYS
    failed = by_key[FAULTY_KEY]
    assert failed.data.tags["end_state"] == "failed"
    assert failed.info.status == "FAILED"
    assert INJECTED_ERROR in failed.data.tags.get("error", "")
    baseline = by_key[BASELINE_KEY]
    assert baseline.data.tags["end_state"] == "censored"
    assert baseline.info.status == "FINISHED"
    assert "error" not in baseline.data.tags
    assert "val/loss" in baseline.data.metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")

    def logged_steps(run) -> list[int]:
        history = client.get_metric_history(run.info.run_id, "train/loss")
        return [metric.step for metric in history]

    assert logged_steps(baseline) == list(range(1, STEPS + 1))
    # Steps 0 and 1 finished; the fault is raised in step 2.
    assert logged_steps(failed) == [1, 2]

    (trials,) = _trials_by_run(workspace, name).values()
    by_key = {trial.user_attrs["trial_key"]: trial for trial in trials}
    assert sorted(by_key) == BOTH_KEYS
    assert by_key[FAULTY_KEY].state == optuna.trial.TrialState.FAIL
    assert by_key[FAULTY_KEY].user_attrs["steps_done"] == 2
    assert INJECTED_ERROR in by_key[FAULTY_KEY].user_attrs.get("error", "")
    assert by_key[BASELINE_KEY].user_attrs["end_state"] == "censored"
    assert by_key[BASELINE_KEY].user_attrs["steps_done"] == STEPS

    # The run is finished, so `study resume` has nothing to continue.
    assert main(_study_args("resume", workspace, str(path))) == EXIT_BAD_INPUT
    assert "contains no unfinished run" in capsys.readouterr().err

    # The printed command, run after removing the fault, starts a new run and
    # leaves the failed run's records as they are.
    _write_two_trials(tmp_path, name)
    hint = last_line.rsplit("run the study again with `", 1)[1].rstrip("`")
    argv = shlex.split(hint)
    assert main(argv[argv.index("run") :]) == 0, capsys.readouterr().err[-3000:]
    runs = _children_by_run(workspace, name)
    assert len(runs) == 2
    assert sorted(run.info.run_id for run in runs[first_id]) == sorted(
        run.info.run_id for run in children
    )
    (second_id,) = set(runs) - {first_id}
    assert _run_keys(runs[second_id]) == BOTH_KEYS
    assert {run.data.tags["end_state"] for run in runs[second_id]} == {"censored"}
    trials = _trials_by_run(workspace, name)
    assert _trial_keys(trials[first_id]) == BOTH_KEYS
    assert _trial_keys(trials[second_id]) == BOTH_KEYS


def test_compare_study_failed_trial_after_complete(tmp_path, local_ray, capsys):
    # The baseline trial finishes first, so the failed trial's progress line
    # reads a best final loss, not a best step count.
    name = "failing_compare"
    fault = {"error_at_step": STEPS - 1, "only": {"power": 1.2}}
    path = _write_two_trials(tmp_path, name, fault_injection=fault)
    spec = yaml.safe_load(path.read_text())
    spec["analysis"] = "compare"
    spec["scales"][SCALE]["max_concurrent_trials"] = 1
    del spec["scales"][SCALE]["workloads"]["lm"]["target"]
    path.write_text(yaml.safe_dump(spec))

    code = main(_run_args(tmp_path / "ws", study=str(path)))

    output = capsys.readouterr()
    assert code == EXIT_TRIALS_FAILED, output.err[-3000:]
    assert "1 complete, 1 failed" in output.out
    assert "Traceback" not in output.err


def test_compare_progress_line_before_any_complete():
    plan = TrialPlan(FAULTY_KEY, "lm", {"batch_size": 4, "power": 1.2}, {}, {})
    compare = dataclasses.replace(plan, study_attrs={"analysis": "compare"})
    progress = Progress([plan], {})

    assert progress._describe(plan, "failed", {"step": 2}) == (
        "failed at step 2",
        "at this batch size no trial reached the target",
    )
    assert progress._describe(compare, "failed", {"step": 2})[1] == (
        "at this batch size no trial is complete yet"
    )


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({}, "fault_injection sets no fault; set nan_loss_at_step or error_at_step"),
        (
            {"only": {"power": 1.2}},
            "fault_injection sets no fault; set nan_loss_at_step or error_at_step",
        ),
        (
            {"nan_loss_at_step": 1, "error_at_step": 1},
            "sets nan_loss_at_step and error_at_step both to step 1",
        ),
        (
            {"error_at_step": STEPS},
            (
                f"fault_injection.error_at_step {STEPS} is never reached, because "
                f"trials stop after budget.steps {STEPS}; use a step below {STEPS}"
            ),
        ),
        (
            {"nan_loss_at_step": STEPS + 1},
            f"fault_injection.nan_loss_at_step {STEPS + 1} is never reached",
        ),
        ({"error_at_step": -1}, "error_at_step"),
        (
            {"error_at_step": 1, "only": {"colour": 1}},
            "fault_injection.only names unknown axes ['colour']",
        ),
    ],
)
def test_invalid_fault_injection_writes_nothing(tmp_path, fault, expected, capsys):
    path = _write_two_trials(tmp_path, "bad_fault", fault_injection=fault)
    workspace = tmp_path / "ws"
    assert main(_run_args(workspace, study=str(path))) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith(f"error: Study file {path} is invalid")
    assert expected in error
    assert not workspace.exists()


# 3. Ray addresses, stores, data cache and read-only workspaces.


@pytest.mark.parametrize(
    "address", ["not an address", "local", "127.0.0.1:0", "host:99999", "ray://"]
)
def test_invalid_ray_address_writes_nothing(tmp_path, address, capsys):
    workspace = tmp_path / "ws"
    code = main(_run_args(workspace, "--ray-address", address, study=TOY_STUDY))
    assert code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"--ray-address {address!r} is invalid" in error
    assert not workspace.exists()


@pytest.mark.parametrize(
    ("greeting", "reason"),
    [
        (b"", "it sent nothing within 1 s"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "responded, but not with HTTP/2"),
    ],
)
def test_ray_address_not_gcs(tmp_path, listener, monkeypatch, greeting, reason, capsys):
    monkeypatch.setattr(study.workspace, "RAY_PROBE_TIMEOUT_SEC", 1)
    server = listener(greeting)
    workspace = tmp_path / "ws"
    address = f"{LOOPBACK}:{server.port}"
    code = main(_run_args(workspace, "--ray-address", address, study=TOY_STUDY))
    assert code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"--ray-address {address} accepts connections but is not a Ray GCS" in error
    assert reason in error
    assert not workspace.exists()


def test_ray_address_probe_accepts_http2(listener):
    # A gRPC server, such as Ray's GCS, responds with a SETTINGS frame.
    server = listener(HTTP2_EMPTY_SETTINGS_FRAME)
    _check_ray_address(f"{LOOPBACK}:{server.port}")


def _parent_runs(workspace: Path, study: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id])


def test_ray_join_failure_records_no_run(tmp_path, listener, monkeypatch, capsys):
    server = listener(HTTP2_EMPTY_SETTINGS_FRAME)
    address = f"{LOOPBACK}:{server.port}"

    def fail_to_connect(address):
        raise ConnectionError("Failed to connect to GCS")

    monkeypatch.setattr("study.runner._start_ray", fail_to_connect)
    workspace = tmp_path / "ws"
    code = main(_run_args(workspace, "--ray-address", address, study=TOY_STUDY))
    assert code == EXIT_BAD_INPUT
    assert f"Cannot join the Ray cluster at --ray-address {address}" in (
        capsys.readouterr().err
    )
    assert _parent_runs(workspace, TOY_STUDY) == []
    storage = f"sqlite:///{workspace / 'optuna.db'}"
    assert optuna.get_all_study_summaries(storage) == []


@pytest.mark.parametrize("left", ["nothing", "tuner only"])
def test_run_not_blocked_by_unrestorable_run(tmp_path, local_ray, capsys, caplog, left):
    name = "unrestorable"
    path = _write_two_trials(tmp_path, name)
    workspace = tmp_path / "ws"

    # A driver killed once it has recorded its run, as by the OOM killer,
    # leaves the MLflow parent run RUNNING.
    log = tmp_path / "killed_driver.log"
    command = study_command(
        *_run_args(workspace, "--ray-address", local_ray, study=str(path))
    )
    with log.open("w") as output:
        driver = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_line(driver, log, f"study {name}, scale {SCALE}, new run", timeout=120)
        (old_id,) = _parents_by_run(workspace, name)
        experiment = (
            workspace / "ray_results" / RunInfo(name, SCALE, old_id).experiment_name
        )
        if left == "tuner only":
            wait_for_file(driver, experiment / "tuner.pkl", timeout=120)
    finally:
        driver.kill()
        driver.wait(timeout=60)
    assert _parents_by_run(workspace, name)[old_id].info.status == "RUNNING"
    if left == "nothing":
        # Removing the experiment's folder, as a user freeing disk space does,
        # leaves nothing to restore.
        shutil.rmtree(experiment, ignore_errors=True)
    else:
        # A driver stopped after Tune wrote tuner.pkl and before it saved the
        # trials' states leaves only tuner.pkl, which Tuner.can_restore takes
        # for a restorable experiment.
        for entry in experiment.iterdir():
            if entry.name != "tuner.pkl":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    code = main(_run_args(workspace, study=str(path)))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    output = captured.out + captured.err + caplog.text
    assert f"unfinished run {old_id} of {name} ({SCALE}) stopped before" in output
    assert "so it cannot be continued" in output
    assert "continuing unfinished run" not in output

    # A new run trained both trials; the old run keeps its parent run and its
    # empty Optuna study, with no trial recorded twice.
    parents = _parents_by_run(workspace, name)
    assert len(parents) == 2
    (new_id,) = set(parents) - {old_id}
    assert parents[new_id].info.status == "FINISHED"
    assert parents[old_id].info.status == "FAILED"
    runs = _children_by_run(workspace, name)
    assert runs[old_id] == []
    assert _run_keys(runs[new_id]) == BOTH_KEYS
    assert {run.data.tags["end_state"] for run in runs[new_id]} == {"censored"}
    trials = _trials_by_run(workspace, name)
    assert trials.get(old_id, []) == []
    assert _trial_keys(trials[new_id]) == BOTH_KEYS


@pytest.mark.parametrize("option", ["--optuna-storage", "--tracking-uri"])
def test_sqlite_store_in_missing_folder(tmp_path, option, capsys):
    url = f"sqlite:///{tmp_path}/missing/x/store.db"
    workspace = tmp_path / "ws"
    code = main(_run_args(workspace, option, url, study=TOY_STUDY))
    assert code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"{option} {url}: folder {tmp_path}/missing/x does not exist" in error
    assert not workspace.exists()


@pytest.mark.parametrize("command", ["analyze", "run", "resume"])
def test_store_not_sqlite(tmp_path, command, capsys):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "mlflow.db").write_text("not a database\n")
    assert main(_study_args(command, workspace, TOY_STUDY)) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"{workspace / 'mlflow.db'} is not an SQLite database" in error
    assert sorted(p.name for p in workspace.iterdir()) == ["mlflow.db"]


def test_tracking_server_not_mlflow(tmp_path, capsys):
    handler = http.server.SimpleHTTPRequestHandler
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://{LOOPBACK}:{server.server_address[1]}"
    workspace = tmp_path / "ws"
    try:
        code = main(_run_args(workspace, "--tracking-uri", uri, study=TOY_STUDY))
    finally:
        server.shutdown()
        server.server_close()
    assert code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"--tracking-uri {uri} responded with HTTP 404" in error
    assert "is not an MLflow tracking server" in error
    assert "cannot be reached" not in error
    assert not workspace.exists()


@pytest.mark.parametrize("option", ["--optuna-storage", "--tracking-uri"])
def test_silent_database_server_times_out(tmp_path, monkeypatch, option, capsys):
    # A listener that accepts connections and never sends a byte.
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]
    monkeypatch.setattr("study.workspace.DATABASE_PROBE_TIMEOUT_SEC", 1)
    url = f"postgresql+psycopg2://user@{LOOPBACK}:{port}/db"
    workspace = tmp_path / "ws"
    try:
        code = main(_run_args(workspace, option, url, study=TOY_STUDY))
    finally:
        listener.close()
    assert code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"{url} accepted no database connection within 1 s" in error
    assert f"or pass another {option}" in error
    assert not workspace.exists()


@pytest.mark.parametrize(
    "url",
    ["notaurl", "postgresql+psycopg2://u@127.0.0.1:abc/db", "postgresql://u@h:/db"],
)
def test_unparsable_storage_url_is_named(tmp_path, capsys, url):
    workspace = tmp_path / "ws"
    code = main(_run_args(workspace, "--optuna-storage", url, study=TOY_STUDY))
    assert code == EXIT_BAD_INPUT
    assert f"Optuna storage URL {url!r} is invalid" in capsys.readouterr().err
    assert not workspace.exists()


def _read_only_command(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run `study` with `folder` bind-mounted read-only in a private mount
    namespace, so the mount is gone when the command ends."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    script = (
        'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 99; '
        'shift; exec "$@"'
    )
    command = ["unshare", "--mount", "sh", "-c", script, "sh", str(folder)]
    completed = subprocess.run(
        command + [sys.executable, "-m", "study.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if completed.returncode == 99:
        pytest.skip(f"cannot mount read-only here: {completed.stderr.strip()}")
    return completed


def test_read_only_data_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    workspace = tmp_path / "ws"
    completed = _read_only_command(
        cache, _run_args(workspace, "--data-cache", str(cache))
    )
    assert completed.returncode == EXIT_BAD_INPUT, completed.stderr
    assert completed.stderr.startswith(f"error: Data cache {cache} is not writable")
    assert not workspace.exists()


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("resume", []),
        ("export-table", ["--format", "latex"]),
        ("report", []),
    ],
)
def test_read_only_workspace(partial_run, tmp_path, command, options):
    workspace = tmp_path / "ws"
    shutil.copytree(partial_run, workspace)
    before = sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*"))
    completed = _read_only_command(workspace, _study_args(command, workspace) + options)
    assert completed.returncode == EXIT_BAD_INPUT, completed.stderr
    assert completed.stderr.startswith(f"error: Workspace {workspace} is not writable")
    assert "Traceback" not in completed.stderr
    after = sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*"))
    assert after == before


def test_read_only_workspace_ui(partial_run, tmp_path):
    workspace = tmp_path / "ws"
    shutil.copytree(partial_run, workspace)
    with socket.create_server((LOOPBACK, 0)) as probe:
        port = probe.getsockname()[1]
    argv = ["ui", "--workspace", str(workspace), "--port", str(port)]
    completed = _read_only_command(workspace, argv)
    assert completed.returncode == EXIT_BAD_INPUT, completed.stderr
    assert completed.stderr.startswith(f"error: Workspace {workspace} is not writable")
    assert "ui` writes to it" in completed.stderr
    assert "Traceback" not in completed.stderr


# 5. Hints name the command as it was run.


def test_command_name_forms(tmp_path, monkeypatch):
    script = tmp_path / "venv" / "bin" / "study"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert command_name(str(script)) == "venv/bin/study"
    assert command_name("venv/bin/study") == "venv/bin/study"
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert command_name(str(script)) == "study"
    cli = Path(sys.modules["study.cli"].__file__)
    assert command_name(str(cli)).endswith(" -m study.cli")
    assert command_name("study") == "study"


def test_hint_runs_as_printed(empty_run, tmp_path):
    script = Path(sys.executable).parent / "study"
    environment = {**os.environ, "PATH": "/usr/bin:/bin"}
    completed = subprocess.run(
        [str(script), *_study_args("analyze", empty_run)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=120,
        check=False,
    )
    assert completed.returncode == EXIT_BAD_INPUT, completed.stderr
    hint = completed.stderr.split("continue it with `", 1)[1].split("`", 1)[0]
    assert hint.startswith(f"{script} resume {STUDY} ")
    # The hint runs outside an activated virtualenv. This run stopped before
    # Ray Tune saved its experiment, so resuming it is rejected before Ray starts.
    resumed = subprocess.run(
        hint,
        shell=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=120,
        check=False,
    )
    assert resumed.returncode == EXIT_BAD_INPUT, resumed.stderr
    assert "has no restorable Ray Tune experiment" in resumed.stderr


# 6. Local data: unreadable shards, tokenizer folders, the data cache and
# single-trial overrides.


def _write_local_data_study(directory: Path, entry: dict[str, Any]) -> Path:
    """Write a one-workload study named local_data with `entry` as the smoke
    scale's only workload."""
    spec = {"name": "local_data", "scales": {"smoke": {"workloads": {"w": entry}}}}
    path = directory / "local_data.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _c4_entry(shards: Path, tokenizer: Path, **train: Any) -> dict[str, Any]:
    return {
        "workload": "lm",
        "model": {"preset": "tiny"},
        "data": {
            "source": "c4_local",
            "paths": [str(shards)],
            "tokenizer": "pretrained",
            "tokenizer_path": str(tokenizer),
            "seq_len": 8,
            "val_tokens": 64,
        },
        "grid": {"batch_size": [4], "power": [1.0], "lr_max": [0.01]},
        "train": {"schedule": "cos", "warmup_steps": 0, **train},
        "target": {"metric": "val/loss", "value": 0.1},
        "budget": {"steps": 2},
        "eval_every_steps": 2,
    }


def _local_c4(directory: Path) -> tuple[Path, Path]:
    """Write valid C4 shards and a saved tokenizer under `directory`, and
    return the shard folder and the tokenizer folder."""
    words = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet"]
    documents = [" ".join(words[index % 7 :] + words) for index in range(40)]
    shards = write_c4_shards(directory / "c4" / "en", documents, documents[:20])
    tokenizer = save_word_tokenizer(directory / "tokenizer", 64, "</s>", 1)
    return shards, tokenizer


def _rewrite_shard(shard: Path, lines: list[str]) -> None:
    with gzip.open(shard, "wt", encoding="utf-8") as output:
        output.write("".join(f"{line}\n" for line in lines))


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _bad_first_shard(directory: Path, damage: str) -> tuple[Path, Path, str]:
    """Write a study whose first training shard has lines without "text"
    (`damage` no_text) or is cut short (truncated). Return the study file, the
    shard and the expected error line."""
    shards, tokenizer = _local_c4(directory)
    shard = shards / "c4-train.00000-of-00002.json.gz"
    fix = "Download the shard again, or remove it from the directories in data.paths."
    if damage == "no_text":
        _rewrite_shard(shard, [json.dumps({"content": "amber"})])
        expected = (
            f"error: {shard}:1 has no \"text\" field (its keys: 'content'). Each "
            'line of a C4 shard must be a JSON object with a "text" string. Rename '
            "the field that contains the document to text."
        )
    else:
        shard.write_bytes(shard.read_bytes()[:-12])
        expected = (
            f"error: C4 shard {shard} is truncated: its gzip stream ends after line "
            f"20. {fix}"
        )
    return (
        _write_local_data_study(directory, _c4_entry(shards, tokenizer)),
        shard,
        expected,
    )


@pytest.mark.parametrize("damage", ["no_text", "truncated"])
def test_train_bad_shard_one_error_line(tmp_path, monkeypatch, damage, capsys):
    monkeypatch.chdir(tmp_path)
    path, _, expected = _bad_first_shard(tmp_path, damage)
    cache = tmp_path / "cache"

    code = main(["train", str(path), "--scale", "smoke", "--data-cache", str(cache)])

    assert code == EXIT_BAD_INPUT
    assert _error_lines(capsys.readouterr().err) == [expected]


def test_run_bad_shard_one_error_line(tmp_path, capsys):
    path, _, expected = _bad_first_shard(tmp_path, "no_text")
    workspace = tmp_path / "ws"
    cache = tmp_path / "cache"

    code = main(_run_args(workspace, "--data-cache", str(cache), study=str(path)))

    assert code == EXIT_BAD_INPUT
    assert _error_lines(capsys.readouterr().err) == [expected]
    assert not (workspace / "ray_results").exists()


def test_run_bad_shard_writes_no_stores(tmp_path):
    path, _, _ = _bad_first_shard(tmp_path, "no_text")
    workspace = tmp_path / "ws"
    cache = tmp_path / "cache"

    code = main(_run_args(workspace, "--data-cache", str(cache), study=str(path)))

    assert code == EXIT_BAD_INPUT
    # The command made the workspace folder, so it removes it again.
    assert not workspace.exists()

    # A folder that existed before keeps what it held.
    workspace.mkdir()
    (workspace / "notes.txt").write_text("mine")
    code = main(_run_args(workspace, "--data-cache", str(cache), study=str(path)))
    assert code == EXIT_BAD_INPUT
    assert sorted(entry.name for entry in workspace.iterdir()) == [
        ".run-local_data-smoke.lock",
        "notes.txt",
    ]


def test_train_empty_tokenizer_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shards, _ = _local_c4(tmp_path)
    empty = tmp_path / "empty_tokenizer"
    empty.mkdir()
    path = _write_local_data_study(tmp_path, _c4_entry(shards, empty))

    code = main(["train", str(path), "--scale", "smoke", "--data-cache", "cache"])

    assert code == EXIT_BAD_INPUT
    expected = (
        f"error: data.tokenizer_path {str(empty)!r} is not a tokenizer folder: it has "
        "neither tokenizer.json nor tokenizer_config.json and is empty. Set "
        "data.tokenizer_path to a folder saved with transformers' save_pretrained, "
        "which contains tokenizer.json or tokenizer_config.json, or to a Hugging "
        "Face Hub name such as google-t5/t5-base."
    )
    assert _error_lines(capsys.readouterr().err) == [expected]
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["run", "train"])
def test_uncreatable_data_cache_writes_nothing(tmp_path, monkeypatch, command, capsys):
    monkeypatch.chdir(tmp_path)
    shards, tokenizer = _local_c4(tmp_path)
    path = _write_local_data_study(tmp_path, _c4_entry(shards, tokenizer))
    workspace = tmp_path / "ws"
    argv = [command, str(path), "--scale", "smoke", "--data-cache", "/proc/nope"]
    if command == "run":
        argv += ["--workspace", str(workspace)]

    assert main(argv) == EXIT_BAD_INPUT

    [line] = _error_lines(capsys.readouterr().err)
    # Root passes the permission check on /proc, where creating a folder fails.
    assert line.startswith("error: Data cache /proc/nope ")
    assert line.endswith("so pass a writable directory with --data-cache DIR")
    assert not workspace.exists()


def _vision_entry(**changes: Any) -> dict[str, Any]:
    """A CIFAR-10 entry whose data folder does not exist, so a check that runs
    after data preparation would fail on the data instead."""
    entry = {
        "workload": "vision",
        "model": {"preset": "tiny"},
        "data": {"dataset": "cifar10", "root": "/nonexistent", "train_examples": 64},
        "grid": {"batch_size": [8, 16], "power": [1.0], "lr_max": [0.01]},
        "train": {"schedule": "cos", "warmup_steps": 4, "micro_batch_size": 4},
        "target": {"metric": "val/loss", "value": 0.1},
        "budget": {"epochs": 1},
        "eval_every_steps": 2,
    }
    return {**entry, **changes}


@pytest.mark.parametrize(
    ("entry", "batch_size", "expected"),
    [
        (
            _vision_entry(),
            "6",
            (
                "--batch-size 6 is not a multiple of workload w's "
                "train.micro_batch_size 4. Pass a multiple of 4, such as 8, or change "
                "train.micro_batch_size in the study file"
            ),
        ),
        (
            _vision_entry(
                grid={"batch_size": [8], "power": [1.0], "lr_max": {8: [0.01]}}
            ),
            "12",
            (
                "--batch-size 12 has no learning rate in workload w's grid.lr_max, "
                "which lists batch sizes [8]. Pass --lr-max, or one of those batch "
                "sizes"
            ),
        ),
        (
            _vision_entry(),
            "32",
            (
                "--batch-size 32 gives workload w a budget of 2 steps, fewer than its "
                "train.warmup_steps 4. Pass a smaller --batch-size, or lower "
                "train.warmup_steps in the study file"
            ),
        ),
    ],
    ids=["micro_batch", "lr_map", "warmup"],
)
def test_train_batch_size_checked_first(
    tmp_path, monkeypatch, entry, batch_size, expected, capsys
):
    monkeypatch.chdir(tmp_path)
    path = _write_local_data_study(tmp_path, entry)

    code = main(["train", str(path), "--scale", "smoke", "--batch-size", batch_size])

    assert code == EXIT_BAD_INPUT
    stderr = capsys.readouterr().err
    assert _error_lines(stderr) == [f"error: {expected}"]
    assert "preparing data" not in stderr


# 7. Hints run as printed, --metric fits the study, and a second interrupt
# still prints the resume command.


def _printed_command(message: str, before: str) -> list[str]:
    """Return the arguments of the command quoted in backticks after `before`,
    without the program name."""
    quoted = message.split(f"{before} `", 1)[1].split("`", 1)[0]
    words = shlex.split(quoted)
    program = shlex.split(command_name())
    assert words[: len(program)] == program, quoted
    for command in ("run", "resume", "analyze"):
        if command in words:
            return words[words.index(command) :]
    raise AssertionError(f"no study command in {quoted!r}")


def _one_error(capsys) -> str:
    """Return the only line of stderr, which must be an `error:` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_analyze_empty_workspace_hint_runs(tmp_path, capsys):
    from study.cli import build_parser

    workspace = tmp_path / "empty"
    workspace.mkdir()
    tracking = f"sqlite:///{tmp_path / 'other-mlflow.db'}"
    for command in ("analyze", "export-table", "report", "resume"):
        args = _study_args(command, workspace) + ["--tracking-uri", tracking]
        assert main(args) == EXIT_BAD_INPUT
        error = _one_error(capsys)
        assert f"Workspace {workspace} contains no recorded runs" in error
        argv = _printed_command(error, "start one with")
        assert argv == [
            "run",
            STUDY,
            "--scale",
            SCALE,
            "--workspace",
            str(workspace),
            "--tracking-uri",
            tracking,
        ]
        parsed = build_parser().parse_args(argv)
        assert (parsed.name, parsed.scale) == (STUDY, SCALE)
    assert sorted(workspace.iterdir()) == []
    assert not (tmp_path / "other-mlflow.db").exists()


def test_analyze_other_study_hint_names_it(tmp_path, capsys):
    workspace = tmp_path / "ws"
    record_run(workspace, {0: "reached"}, study="blockwise_lr")
    capsys.readouterr()
    assert main(_study_args("analyze", workspace)) == EXIT_BAD_INPUT
    error = _one_error(capsys)
    assert f"contains no recorded run of {STUDY} ({SCALE})" in error
    argv = _printed_command(error, "start one with")
    assert argv == ["run", STUDY, "--scale", SCALE, "--workspace", str(workspace)]


def test_resume_without_unfinished_run_hint(tmp_path, capsys):
    workspace = tmp_path / "ws"
    record_run(workspace, {0: "reached"}, parent_status="FINISHED")
    path = workspace / "my study.yaml"
    path.write_text(Path(load_study_path(STUDY)).read_text())
    capsys.readouterr()
    assert main(_study_args("resume", workspace, str(path))) == EXIT_BAD_INPUT
    error = _one_error(capsys)
    assert "contains no unfinished run of batch_power_grid (smoke)" in error
    argv = _printed_command(error, "start one with")
    assert argv == ["run", str(path), "--scale", SCALE, "--workspace", str(workspace)]


def load_study_path(name: str) -> Path:
    """Return the path of an embedded study file."""
    import search_spaces

    return Path(search_spaces.__file__).parent / f"{name}.yaml"


def test_resume_finished_run_id_rejected(tmp_path, monkeypatch, capsys):
    workspace = tmp_path / "ws"
    recorded = record_run(
        workspace, {index: "reached" for index in range(8)}, parent_status="FINISHED"
    )
    run_id = recorded.run.run_id
    capsys.readouterr()

    def no_ray(address):
        raise AssertionError("Ray started for a run that cannot be resumed")

    monkeypatch.setattr("study.runner._start_ray", no_ray)
    args = _study_args("resume", workspace) + ["--run-id", run_id]
    assert main(args) == EXIT_BAD_INPUT
    error = _one_error(capsys)
    assert error.startswith(
        f"error: Run {run_id} of {STUDY} ({SCALE}) is finished, so there is "
        "nothing to resume; analyze it with `"
    )
    analyze = _printed_command(error, "analyze it with")
    assert analyze == [
        "analyze",
        STUDY,
        "--scale",
        SCALE,
        "--workspace",
        str(workspace),
        "--run-id",
        run_id,
    ]
    fresh = _printed_command(error, "start a new run with")
    assert fresh == ["run", STUDY, "--scale", SCALE, "--workspace", str(workspace)] + [
        "--fresh"
    ]
    assert main(analyze) == 0
    assert f"run {run_id}" in capsys.readouterr().out

    args = _study_args("resume", workspace) + ["--run-id", "20000101-000000-beef"]
    assert main(args) == EXIT_BAD_INPUT
    error = _one_error(capsys)
    assert "Run 20000101-000000-beef of batch_power_grid (smoke) is not recorded" in (
        error
    )
    assert "holds no unfinished run of this scale" in error
    assert _printed_command(error, "start one with")[0] == "run"
    (parent,) = _parent_runs(workspace, STUDY)[:1]
    assert parent.info.status == "FINISHED"


def test_resume_unknown_id_lists_unfinished(tmp_path, monkeypatch, capsys):
    workspace = tmp_path / "ws"
    unfinished = record_run(workspace, {0: "reached"}).run.run_id
    capsys.readouterr()

    def no_data(*args, **kwargs):
        raise AssertionError("data prepared for a run id that is not recorded")

    monkeypatch.setattr("study.runner.prepare_data", no_data)
    args = _study_args("resume", workspace) + ["--run-id", "20000101-000000-beef"]
    assert main(args) == EXIT_BAD_INPUT
    error = _one_error(capsys)
    assert f"its unfinished runs are {unfinished}; pass one of them to --run-id" in (
        error
    )
    assert _printed_command(error, "continue the latest with") == [
        "resume",
        STUDY,
        "--scale",
        SCALE,
        "--workspace",
        str(workspace),
    ]


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory) -> Path:
    """A workspace with a finished run of the blockwise_lr comparison."""
    root = tmp_path_factory.mktemp("compare_run") / "ws"
    record_run(root, {index: "reached" for index in range(4)}, study="blockwise_lr")
    return root


@pytest.mark.parametrize(
    ("command", "options", "option"),
    [
        ("export-table", ["--metric", "steps"], "--metric steps"),
        ("export-table", ["--metric", "final_loss"], "--metric final_loss"),
        ("export-table", ["--metric", "seconds"], "--metric seconds"),
        ("export-table", ["--spread"], "--spread"),
        ("analyze", ["--metric", "steps"], "--metric steps"),
        ("report", ["--metric", "tokens"], "--metric tokens"),
    ],
)
def test_compare_rejects_every_metric(compare_run, command, options, option, capsys):
    args = _study_args(command, compare_run, "blockwise_lr") + options
    assert main(args) == EXIT_BAD_INPUT
    error = _one_error(capsys)
    assert error.startswith(f"error: {option} is invalid for blockwise_lr: ")
    assert "a compare study compares final states" in error
    assert f"Leave out {option.split()[0]}" in error
    assert not (compare_run / "exports").exists()


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory) -> Path:
    """A workspace whose run finished the 4 grid points of the vision workload."""
    root = tmp_path_factory.mktemp("vision_run") / "ws"
    record_run(root, {index: "reached" for index in range(4, 8)})
    return root


def test_export_progress_named_by_unit(vision_run, tmp_path, capsys):
    workspace = tmp_path / "ws"
    shutil.copytree(vision_run, workspace)
    args = _study_args("export-table", workspace) + ["--format", "latex"]

    assert main([*args, "--metric", "examples"]) == 0
    output = capsys.readouterr().out
    written = sorted(path.name for path in (workspace / "exports").iterdir())
    assert len(written) == 1
    assert written[0].endswith("-examples.tex")
    assert "-vision-" in written[0]
    assert "examples to val/loss" in output
    assert "note: workload vision" not in output

    # tokens also names the progress to the target, which the vision workload
    # counts in examples, so it writes the same table and a note about the unit.
    assert main([*args, "--metric", "tokens"]) == 0
    output = capsys.readouterr().out
    assert (
        "note: workload vision counts its progress in examples, not tokens, so "
        "its table shows examples to the target"
    ) in output
    assert "examples to val/loss" in output
    assert sorted(path.name for path in (workspace / "exports").iterdir()) == written


def test_progress_metric_mixed_units(tmp_path, capsys):
    workspace = tmp_path / "ws"
    record_run(workspace, {index: "reached" for index in range(8)})
    capsys.readouterr()
    headings = {
        "analyze": ("lm (lm): tokens to", "vision (vision): examples to"),
        "export-table": ("lm: tokens to", "vision: examples to"),
    }
    for command, (lm_heading, vision_heading) in headings.items():
        args = _study_args(command, workspace) + ["--metric", "examples"]
        assert main(args) == 0
        output = capsys.readouterr().out
        assert "note: workload lm counts its progress in tokens, not examples" in (
            output
        )
        assert "note: workload vision" not in output
        assert lm_heading in output
        assert vision_heading in output
    exports = sorted(path.name for path in (workspace / "exports").iterdir())
    assert any("-lm-" in name and name.endswith("-tokens.md") for name in exports)
    assert any("-vision-" in name and name.endswith("-examples.md") for name in exports)
    assert not any(name.endswith("-examples.md") and "-lm-" in name for name in exports)


def test_second_interrupt_prints_resume(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C while Ray Tune stops the trials ends `study run` with
    the resume command, which continues the run."""
    from study.cli import EXIT_INTERRUPTED
    from study.runner import Progress

    name = "double_interrupt"
    path = write_study(
        tmp_path, name, TWO_POWERS, steps=STEPS, scale={"max_concurrent_trials": 1}
    )
    workspace = tmp_path / "ws"
    finished = Progress.finished

    def interrupt_twice(self, plan, state, result):
        finished(self, plan, state, result)
        # The first Ctrl-C only sets Ray Tune's stop flag; the second raises
        # KeyboardInterrupt in the driver, here after the first trial ended.
        # Raising it directly does not depend on when Tune restores the
        # previous SIGINT handler, which varies with Ray's state in this process.
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "finished", interrupt_twice)
    code = main(_run_args(workspace, study=str(path)))
    output = capsys.readouterr()
    assert code == EXIT_INTERRUPTED, output.err[-3000:]
    lines = [line for line in output.err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, output.err[-3000:]
    assert lines[0].startswith(f"study {name} ({SCALE}) interrupted; continue with: ")
    argv = shlex.split(lines[0].split("continue with: ", 1)[1])
    argv = argv[argv.index("resume") :]
    resume = ["resume", str(path), "--scale", SCALE, "--workspace", str(workspace)]
    assert argv == resume
    (parent,) = _parents_by_run(workspace, name).values()
    assert parent.info.status == "KILLED"
    for child in _children_by_run(workspace, name)[parent.data.tags["study_run_id"]]:
        assert child.info.status != "RUNNING", child.data.tags["trial_key"]

    monkeypatch.setattr(Progress, "finished", finished)
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    (children,) = _children_by_run(workspace, name).values()
    assert _run_keys(children) == BOTH_KEYS
    assert {child.info.status for child in children} == {"FINISHED"}
    assert {child.data.tags["end_state"] for child in children} == {"censored"}
    (trials,) = _trials_by_run(workspace, name).values()
    assert _trial_keys(trials) == BOTH_KEYS


@pytest.mark.parametrize("moment", ["run end", "analysis"])
def test_interrupt_after_trials_names_analyze(
    tmp_path, monkeypatch, capsys, request, moment
):
    """Ctrl-C once every trial has ended, while the driver ends the run or
    analyzes it, leaves the parent run FINISHED and names `study analyze`,
    which reads the run as printed."""
    import signal

    from study.cli import EXIT_INTERRUPTED
    from study.recording import StudyRecorder

    name = "late_interrupt"
    path = write_study(tmp_path, name, TWO_POWERS, steps=STEPS)
    workspace = tmp_path / "ws"
    # Python's own handler, as in a fresh `study` process: an earlier Ray Tune
    # run in this process can leave Tune's handler, which only sets a flag.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous_handler))
    if moment == "run end":
        stop_unfinished = StudyRecorder.stop_unfinished

        def interrupt_then_stop(self):
            # The signal arrives before the parent run is ended and Ray stops.
            signal.raise_signal(signal.SIGINT)
            return stop_unfinished(self)

        monkeypatch.setattr(StudyRecorder, "stop_unfinished", interrupt_then_stop)
    else:

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr("study.cli._analyze_and_export", interrupt)
    code = main(_run_args(workspace, study=str(path)))
    output = capsys.readouterr()
    assert code == EXIT_INTERRUPTED, output.err[-3000:]
    (parent,) = _parents_by_run(workspace, name).values()
    assert parent.info.status == "FINISHED"
    run_id = parent.data.tags["study_run_id"]
    (line,) = [line for line in output.err.splitlines() if "interrupted" in line]
    assert line.startswith(
        f"study {name} ({SCALE}) interrupted after every trial of run {run_id} "
        "ended; they are all recorded, so print the analysis with: "
    )
    argv = shlex.split(line.split("print the analysis with: ", 1)[1])
    argv = argv[argv.index("analyze") :]
    monkeypatch.undo()
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    assert "steps to val/loss" in capsys.readouterr().out
