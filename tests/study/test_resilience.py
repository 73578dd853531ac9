"""Studies survive a killed driver, a killed worker, divergence and concurrency."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study.analysis import analyze_run, load_runs
from study.cli import EXIT_TERMINATED, SigtermAsInterrupt
from study.runner import UNRESTORABLE_TAG
from study.workspace import IDENTITY_FILE
from tests.study.resilience_support import (
    child_runs,
    descendants,
    kill_all,
    optuna_trials,
    start_study,
    study_command,
    wait_for_line,
    write_study,
)
from trainers.config import TrialConfig
from trainers.loop import run_trial

pytestmark = pytest.mark.slow

FOUR_POWERS = {"batch_size": [4], "power": [0.8, 1.0, 1.2, 1.4], "lr_max": [0.01]}


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        study_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _signal_driver(
    tmp_path: Path,
    name: str,
    after_line: str,
    signal_number: int,
    whole_group: bool = False,
) -> tuple[Path, Path, Path, int]:
    """Run a four-trial study, one trial at a time, and send its driver
    `signal_number` once the log shows `after_line`; with `whole_group`, to
    every process of the driver's process group, as `timeout` and systemd do.
    Return the study file, the workspace, the log and the driver's exit status."""
    path = write_study(
        tmp_path, name, FOUR_POWERS, steps=60, scale={"max_concurrent_trials": 1}
    )
    workspace = tmp_path / "ws"
    log = tmp_path / "run.log"
    driver = start_study(path, workspace, log, new_session=whole_group)
    below: list[int] = []
    try:
        wait_for_line(driver, log, after_line, timeout=300)
        below = descendants(driver.pid)
        if whole_group:
            os.killpg(driver.pid, signal_number)
        else:
            driver.send_signal(signal_number)
        code = driver.wait(timeout=120)
    finally:
        # Ray processes that outlive a killed driver would hold the cores.
        kill_all(descendants(driver.pid) + below)
    return path, workspace, log, code


def test_killed_driver_resumes_exactly_once(tmp_path):
    path, workspace, _, _ = _signal_driver(
        tmp_path, "kill_driver", "[2 done", signal.SIGKILL
    )

    before = {
        run.data.tags["trial_key"]: run for run in child_runs(workspace, "kill_driver")
    }
    finished_before = {
        key: run.info.run_id
        for key, run in before.items()
        if run.data.tags["end_state"] != "running"
    }
    assert len(finished_before) >= 2

    resumed = _run(
        ["resume", str(path), "--scale", "smoke", "--workspace", str(workspace)]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    after = child_runs(workspace, "kill_driver")
    keys = [run.data.tags["trial_key"] for run in after]
    assert len(after) == 4
    assert len(set(keys)) == 4
    by_key = {run.data.tags["trial_key"]: run for run in after}
    for key, run_id in finished_before.items():
        assert by_key[key].info.run_id == run_id
    for run in after:
        assert run.data.tags["end_state"] == "censored"
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    for run in after:
        steps = [
            m.step for m in client.get_metric_history(run.info.run_id, "train/loss")
        ]
        assert len(steps) == len(set(steps)), run.data.tags["trial_key"]
    trials = optuna_trials(workspace, "kill_driver")
    assert sorted(t.user_attrs["trial_key"] for t in trials) == sorted(keys)


def test_interrupted_driver_leaves_trials_for_resume(tmp_path):
    """Ctrl-C stops Ray Tune; the stopped trials stay unfinished, not censored."""
    path, workspace, log, code = _signal_driver(
        tmp_path, "interrupt", "[1 done", signal.SIGINT
    )

    assert code == 130, log.read_text()[-3000:]
    # The hint repeats the command as the test ran it, python -m study.cli.
    assert "-m study.cli resume" in log.read_text()
    for trial in optuna_trials(workspace, "interrupt"):
        # Every recorded trial ran its whole budget.
        assert trial.user_attrs["steps_done"] == 60
    recorded = len(optuna_trials(workspace, "interrupt"))
    assert recorded < 4

    resumed = _run(
        ["resume", str(path), "--scale", "smoke", "--workspace", str(workspace)]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = child_runs(workspace, "interrupt")
    assert len(after) == 4
    assert {run.data.tags["end_state"] for run in after} == {"censored"}
    trials = optuna_trials(workspace, "interrupt")
    assert len(trials) == 4
    assert {t.user_attrs["steps_done"] for t in trials} == {60}


def test_sigterm_handler_stops_like_sigint():
    sigint_calls = []
    previous_sigint = signal.signal(
        signal.SIGINT, lambda signum, frame: sigint_calls.append(signum)
    )
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with SigtermAsInterrupt() as sigterm:
            signal.raise_signal(signal.SIGTERM)
        assert sigint_calls == [signal.SIGINT]
        assert sigterm.received

        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt), SigtermAsInterrupt():
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    assert signal.getsignal(signal.SIGTERM) == previous_sigterm


@dataclass(frozen=True)
class TerminatedRun:
    """A four-trial run whose driver got SIGTERM after the first trial ended,
    as the driver left it."""

    path: Path
    workspace: Path
    code: int
    log: str
    steps_recorded: list[int]
    parent_status: str
    stopped_copy: Path
    """A copy of the workspace as the driver left it, for tests that run after
    test_copied_and_moved_workspaces_resume has moved `workspace`."""


@pytest.fixture(scope="module")
def terminated_run(tmp_path_factory) -> TerminatedRun:
    path, workspace, log, code = _signal_driver(
        tmp_path_factory.mktemp("terminated"), "terminate", "[1 done", signal.SIGTERM
    )
    (parent,) = _parent_runs(workspace, "terminate")
    stopped_copy = shutil.copytree(workspace, workspace.parent / "stopped-copy")
    return TerminatedRun(
        path=path,
        workspace=workspace,
        code=code,
        log=log.read_text(),
        steps_recorded=[
            trial.user_attrs["steps_done"]
            for trial in optuna_trials(workspace, "terminate")
        ],
        parent_status=parent.info.status,
        stopped_copy=stopped_copy,
    )


def _parent_runs(workspace: Path, study: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return [run for run in runs if "mlflow.parentRunId" not in run.data.tags]


def test_terminated_driver_leaves_trials_for_resume(terminated_run):
    """SIGTERM stops Ray Tune as Ctrl-C does, and stopped trials stay unfinished.

    test_copied_and_moved_workspaces_resume resumes this run.
    """
    log = terminated_run.log
    assert terminated_run.code == EXIT_TERMINATED, log[-3000:]
    stopped = [line for line in log.splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1, log[-3000:]
    assert "-m study.cli resume" in stopped[0]
    # Ray's native failure handler prints this header before its stack dump.
    assert "SIGTERM received" not in log
    assert "Traceback" not in log
    # Every recorded trial ran its whole budget.
    assert set(terminated_run.steps_recorded) == {60}
    assert len(terminated_run.steps_recorded) < 4
    assert terminated_run.parent_status == "KILLED"


def test_group_sigterm_stops_like_driver_sigterm(tmp_path):
    """SIGTERM to the driver's whole process group leaves Ray's GCS and raylet
    running until the driver has stopped and saved its trials."""
    _, workspace, log, code = _signal_driver(
        tmp_path, "group_term", "[1 done", signal.SIGTERM, whole_group=True
    )
    text = log.read_text()
    assert code == EXIT_TERMINATED, text[-3000:]
    stopped = [line for line in text.splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1, text[-3000:]
    assert "Failed to connect to GCS" not in text
    (parent,) = _parent_runs(workspace, "group_term")
    assert parent.info.status == "KILLED"


def _file_states(root: Path) -> dict[str, tuple[int, int]]:
    """Map each file below `root` to its size and modification time."""
    states = {}
    for path in root.rglob("*"):
        if path.is_file():
            status = path.stat()
            states[str(path.relative_to(root))] = (status.st_size, status.st_mtime_ns)
    return states


def _assert_recorded_once(workspace: Path, study: str) -> None:
    """Check one finished child run and one Optuna trial per grid point, each
    with the whole budget and no metric step logged twice."""
    runs = child_runs(workspace, study)
    keys = sorted(run.data.tags["trial_key"] for run in runs)
    assert len(keys) == 4
    assert len(set(keys)) == 4
    assert {run.data.tags["end_state"] for run in runs} == {"censored"}
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    for run in runs:
        steps = [
            m.step for m in client.get_metric_history(run.info.run_id, "train/loss")
        ]
        assert len(steps) == len(set(steps)), run.data.tags["trial_key"]
    trials = optuna_trials(workspace, study)
    assert sorted(t.user_attrs["trial_key"] for t in trials) == keys
    assert {t.user_attrs["steps_done"] for t in trials} == {60}
    (parent,) = [
        run
        for run in _parent_runs(workspace, study)
        if UNRESTORABLE_TAG not in run.data.tags
    ]
    assert parent.info.status == "FINISHED"
    root = workspace.resolve()
    assert parent.info.artifact_uri.startswith(root.as_uri() + "/mlartifacts/")
    assert parent.data.tags["workspace"] == str(root)
    exports = client.list_artifacts(parent.info.run_id, "exports")
    assert exports, "the resumed run logged no exports on its parent run"


def _workspace_id(workspace: Path) -> str:
    return json.loads((workspace / IDENTITY_FILE).read_text())["id"]


def _record_unsaved_run(workspace: Path, study: str) -> str:
    """Record a running parent run named `stale` with no Tune experiment, as
    a driver killed while Ray started leaves, and return its MLflow id."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    tags = {"study": study, "scale": "smoke", "study_run_id": "stale"}
    return client.create_run(experiment.experiment_id, tags=tags).info.run_id


def test_copied_and_moved_workspaces_resume(terminated_run, tmp_path):
    original = terminated_run.workspace
    original_id = _workspace_id(original)
    resume = ["resume", str(terminated_run.path), "--scale", "smoke", "--workspace"]

    # A copy resumes on its own files and leaves the original's alone. A newer
    # run in it that stopped before Tune saved its experiment is passed over.
    copy = tmp_path / "copy" / "ws"
    shutil.copytree(original, copy)
    stale = _record_unsaved_run(copy, "terminate")
    before = _file_states(original)
    resumed = _run([*resume, str(copy)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_recorded_once(copy, "terminate")
    assert "unfinished run stale of terminate (smoke) stopped" in resumed.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    stale_run = client.get_run(stale)
    assert stale_run.info.status == "FAILED"
    assert UNRESTORABLE_TAG in stale_run.data.tags
    assert _file_states(original) == before
    assert _workspace_id(copy) != original_id

    # The original, moved, resumes where it is now.
    moved = tmp_path / "moved" / "ws"
    moved.parent.mkdir()
    shutil.move(original, moved)
    resumed = _run([*resume, str(moved)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_recorded_once(moved, "terminate")
    assert _workspace_id(moved) == original_id
    assert not original.exists()


def test_edited_study_file_stops_continuation(terminated_run, tmp_path):
    workspace = tmp_path / "ws"
    shutil.copytree(terminated_run.stopped_copy, workspace)
    # The same study with a shorter budget and more cores per trial; only the
    # budget changes what the trials train.
    edited = write_study(
        tmp_path,
        "terminate",
        FOUR_POWERS,
        steps=40,
        scale={"max_concurrent_trials": 2},
        resources={"cpu": 2},
    )
    children_before = len(child_runs(workspace, "terminate"))

    for command in ("run", "resume"):
        completed = _run(
            [command, str(edited), "--scale", "smoke", "--workspace", str(workspace)]
        )
        assert completed.returncode == 2, completed.stderr[-3000:]
        error = completed.stderr.strip().splitlines()[-1]
        assert error.startswith("error: The smoke scale of terminate changed since run")
        assert "(workloads.lm.budget.steps: 60 -> 40)" in error
        assert f"run {edited} --scale smoke --workspace {workspace} --fresh" in error
        assert "Traceback" not in completed.stderr

    (parent,) = _parent_runs(workspace, "terminate")
    assert parent.info.status == "KILLED"
    assert len(child_runs(workspace, "terminate")) == children_before


def _worker_pid(experiment_dir: Path, min_step: int) -> int | None:
    for result_file in experiment_dir.glob("trial_*/result.json"):
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            if result.get("step", 0) >= min_step:
                return int(result["pid"])
    return None


def test_killed_worker_retries_from_checkpoint(tmp_path):
    grid = {"batch_size": [8], "power": [1.0], "lr_max": [0.01]}
    path = write_study(
        tmp_path,
        "kill_worker",
        grid,
        steps=300,
        scale={"max_failures": 2},
        model={"preset": "cpu"},
        checkpoint_every_steps=20,
        eval_every_steps=50,
    )
    workspace = tmp_path / "ws"
    log = tmp_path / "run.log"
    driver = start_study(path, workspace, log)
    try:
        deadline = time.monotonic() + 300
        pid = None
        while pid is None and time.monotonic() < deadline and driver.poll() is None:
            for experiment_dir in (workspace / "ray_results").glob("kill_worker-*"):
                pid = _worker_pid(experiment_dir, min_step=50)
            time.sleep(0.05)
        assert pid is not None, log.read_text()
        os.kill(pid, signal.SIGKILL)
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        kill_all(descendants(driver.pid))
        if driver.poll() is None:
            driver.kill()
    assert "retrying from its latest checkpoint" in log.read_text()

    (run,) = child_runs(workspace, "kill_worker")
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    logged = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")
    }
    assert sorted(logged) == list(range(1, 301))

    # The same trial uninterrupted, in this process.
    from study.grid import expand
    from study.runner import prepare_data
    from study.spec import load_study
    from study.workspace import Workspace

    spec = load_study(str(path))
    prepared = prepare_data(spec, "smoke", Workspace.open(tmp_path / "plain"))
    config = TrialConfig.from_dict(expand(spec.scale("smoke"), prepared)[0].config)
    uninterrupted: dict[int, float] = {}
    run_trial(
        config,
        lambda m, checkpoint=None: uninterrupted.setdefault(m["step"], m["train/lr"]),
    )
    assert logged == pytest.approx(uninterrupted, rel=1e-12, abs=0)


def test_nan_trial_diverges_and_is_excluded(tmp_path):
    grid = {"batch_size": [4, 8], "power": [1.0, 1.2], "lr_max": [0.01]}
    path = write_study(
        tmp_path,
        "nan_trial",
        grid,
        steps=20,
        fault_injection={
            "nan_loss_at_step": 5,
            "only": {"batch_size": 8, "power": 1.2},
        },
    )
    workspace = tmp_path / "ws"
    completed = _run(
        ["run", str(path), "--scale", "smoke", "--workspace", str(workspace)]
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    states = {
        r.data.tags["trial_key"]: r.data.tags["end_state"]
        for r in child_runs(workspace, "nan_trial")
    }
    assert states.pop("lm/bs=8/p=1.2/lr=0.01/seed=0") == "diverged"
    assert set(states.values()) == {"censored"}
    (run,) = load_runs(f"sqlite:///{workspace / 'optuna.db'}", "nan_trial", "smoke")
    analysis = analyze_run(run)
    assert any(note.startswith("1 trial(s) excluded") for note in analysis.notes)
    assert "1 trial(s) excluded" in completed.stdout


def test_two_studies_share_a_workspace(tmp_path):
    grid = {"batch_size": [2, 4], "power": [0.8, 1.0, 1.2, 1.4], "lr_max": [0.01]}
    workspace = tmp_path / "ws"
    paths = [
        write_study(
            tmp_path,
            name,
            grid,
            steps=30,
            resources={"cpu": 0.25},
            checkpoint_every_steps=5,
        )
        for name in ("concurrent_a", "concurrent_b")
    ]
    processes = [
        subprocess.Popen(
            study_command(
                "run", str(path), "--scale", "smoke", "--workspace", str(workspace)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for path in paths
    ]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
        assert "database is locked" not in output
    for name in ("concurrent_a", "concurrent_b"):
        runs = child_runs(workspace, name)
        assert len(runs) == 8
        assert len({run.data.tags["trial_key"] for run in runs}) == 8
        assert len(optuna_trials(workspace, name)) == 8


def test_stopped_trials_killed_until_resumed(terminated_run, tmp_path):
    """The child runs of trials that SIGTERM stopped are KILLED, not RUNNING,
    and `study resume` continues the same runs to their end."""
    workspace = tmp_path / "ws"
    shutil.copytree(terminated_run.stopped_copy, workspace)
    before = {
        run.data.tags["trial_key"]: run for run in child_runs(workspace, "terminate")
    }
    finished = {key for key, run in before.items() if run.info.status == "FINISHED"}
    assert len(finished) == len(terminated_run.steps_recorded)
    for key, run in before.items():
        if key in finished:
            assert run.data.tags["end_state"] == "censored", key
        else:
            assert run.info.status == "KILLED", key
            assert run.data.tags["end_state"] == "unfinished", key
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("terminate")
    live = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"
    )
    assert live == []

    resumed = _run(
        ["resume", str(terminated_run.path), "--scale", "smoke"]
        + ["--workspace", str(workspace)]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_recorded_once(workspace, "terminate")
    after = {
        run.data.tags["trial_key"]: run for run in child_runs(workspace, "terminate")
    }
    for key, run in before.items():
        assert after[key].info.run_id == run.info.run_id, key
    assert {run.info.status for run in after.values()} == {"FINISHED"}
    censored = client.search_runs(
        [experiment.experiment_id], filter_string="tags.end_state = 'censored'"
    )
    assert len(censored) == 4
    unfinished = client.search_runs(
        [experiment.experiment_id], filter_string="tags.end_state = 'unfinished'"
    )
    assert unfinished == []
