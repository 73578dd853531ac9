"""Bad input and unfinished or failed runs end in one `error:` line, not a traceback.

Runs are recorded in real sqlite stores by the recorder that `study run`
uses (recorded_runs.py), so no test here starts Ray.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

import study.workspace
from study.cli import EXIT_BAD_INPUT, EXIT_TRIALS_FAILED, main
from study.invocation import command_name
from study.workspace import HTTP2_EMPTY_SETTINGS_FRAME, _check_ray_address
from tests.study.recorded_runs import FINISHED, SCALE, STUDY, record_run

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


def test_failed_trials_exit_nonzero(tmp_path, monkeypatch, capsys):
    workspace = tmp_path / "ws"

    def record_failed_run(spec, scale, workspace, **options):
        return record_run(
            workspace.root, {i: "failed" for i in range(8)}, parent_status=FINISHED
        )

    monkeypatch.setattr("study.runner.run_study", record_failed_run)
    code = main(_run_args(workspace, "--data-cache", str(tmp_path / "cache")))
    assert code == EXIT_TRIALS_FAILED
    output = capsys.readouterr()
    assert "finished in 1 s: 8 failed" in output.out
    last_line = output.err.strip().splitlines()[-1]
    assert last_line.startswith("error: 8 of 8 trials of batch_power_grid")
    assert "tags.end_state = 'failed'" in last_line
    assert "--fresh" in last_line

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY)
    children = client.search_runs(
        [experiment.experiment_id], "tags.end_state = 'failed'"
    )
    assert len(children) == 8
    assert all(run.data.tags["error"] == "RuntimeError: boom" for run in children)


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


def test_run_not_blocked_by_unrestorable_run(tmp_path, monkeypatch, capsys):
    # A parent run whose Tune experiment was never saved, as when Tune failed
    # to start after the run was recorded.
    workspace = tmp_path / "ws"
    stale = record_run(workspace, {}, parent_status="FAILED")
    calls = []

    def record_new_run(spec, scale, workspace, **options):
        calls.append(options)
        return record_run(
            workspace.root, {i: "reached" for i in range(8)}, parent_status=FINISHED
        )

    monkeypatch.setattr("study.runner.run_study", record_new_run)
    code = main(_run_args(workspace, "--data-cache", str(tmp_path / "cache")))
    assert code == 0
    assert f"unfinished run {stale.run.run_id}" in capsys.readouterr().out
    assert calls[0]["resume_run_id"] is None


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
