"""Team mode: `study run` against an MLflow tracking server, Optuna on
PostgreSQL and a two-node Ray cluster, all real processes on 127.0.0.1.

Two smoke runs share the servers of conftest.py: `server_run` records on the
MLflow server and in PostgreSQL with a local Ray, and `team_run` adds the
two-node Ray cluster.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from study.spec import available_studies, load_study

pytestmark = pytest.mark.slow

STUDY = "batch_power_grid"
SCALE = "smoke"
END_STATES = {"reached", "censored", "diverged", "failed"}
GRID_AXES = {"batch_size", "power", "lr_max", "seed"}
EXIT_BAD_INPUT = 2
RUN_TIMEOUT_SEC = 600


def grid_sizes() -> dict[str, int]:
    scale = load_study(STUDY).scale(SCALE)
    return {label: entry.grid.size() for label, entry in scale.workloads.items()}


def run_study(
    workspace: Path,
    *options: str,
    study: str = STUDY,
    env: dict[str, str] | None = None,
    timeout: float = RUN_TIMEOUT_SEC,
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "study.cli",
        "run",
        study,
        "--scale",
        SCALE,
        "--workspace",
        str(workspace),
        *options,
    ]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass(frozen=True)
class StudyRun:
    workspace: Path
    completed: subprocess.CompletedProcess
    tracking_uri: str
    optuna_url: str


@functools.cache
def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Return one storage per URL, so that the tests share its connection pool."""
    return optuna.storages.RDBStorage(url)


def optuna_studies(url: str) -> list[optuna.Study]:
    storage = optuna_storage(url)
    return [
        optuna.load_study(study_name=summary.study_name, storage=storage)
        for summary in optuna.get_all_study_summaries(storage)
    ]


def recorded_run_id(run: StudyRun) -> str:
    """Return the study run id that the run's Optuna studies carry.

    Each run writes to its own PostgreSQL database, so every study in it
    belongs to that run.
    """
    run_ids = {study.user_attrs["run_id"] for study in optuna_studies(run.optuna_url)}
    assert len(run_ids) == 1, f"expected one study run id, found {run_ids}"
    return run_ids.pop()


def mlflow_runs(run: StudyRun) -> tuple[list[Run], list[Run]]:
    """Return the parent and child MLflow runs of one study run on the server."""
    client = MlflowClient(tracking_uri=run.tracking_uri)
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None, f"no experiment {STUDY!r} on {run.tracking_uri}"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.study_run_id = '{recorded_run_id(run)}'",
        max_results=1000,
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def max_overlap(runs: list[Run]) -> int:
    """Return the maximum number of runs whose [start_time, end_time] overlap."""
    events = []
    for run in runs:
        events.append((run.info.start_time, 1))
        events.append((run.info.end_time, -1))
    # At equal times an end sorts before a start, so touching runs do not count.
    events.sort()
    running = maximum = 0
    for _, change in events:
        running += change
        maximum = max(maximum, running)
    return maximum


def assert_rejected(
    completed: subprocess.CompletedProcess, workspace: Path, value: str, option: str
) -> None:
    """Check one `error:` line that names the value and the option, exit code 2,
    and nothing written to the workspace."""
    assert completed.returncode == EXIT_BAD_INPUT, completed.stderr[-4000:]
    errors = [
        line for line in completed.stderr.splitlines() if line.startswith("error:")
    ]
    assert len(errors) == 1, completed.stderr[-4000:]
    assert value in errors[0]
    assert option in errors[0]
    assert "Traceback" not in completed.stderr
    written = sorted(workspace.rglob("*")) if workspace.exists() else []
    assert written == []


# A run recorded on the MLflow server and in PostgreSQL, with a local Ray.


@pytest.fixture(scope="module")
def server_run(tmp_path_factory, mlflow_server, postgres_server) -> StudyRun:
    workspace = tmp_path_factory.mktemp("server_run") / "workspace"
    optuna_url = postgres_server.create_database("server_run")
    completed = run_study(
        workspace,
        "--tracking-uri",
        mlflow_server.uri,
        "--optuna-storage",
        optuna_url,
    )
    return StudyRun(workspace, completed, mlflow_server.uri, optuna_url)


def test_server_run_exits_cleanly(server_run):
    assert server_run.completed.returncode == 0, server_run.completed.stderr[-4000:]


def test_mlflow_server_records_child_runs(server_run):
    parents, children = mlflow_runs(server_run)
    assert len(parents) == 1
    assert len(children) == sum(grid_sizes().values())
    keys = {child.data.tags["trial_key"] for child in children}
    assert len(keys) == len(children)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.tags["end_state"] in END_STATES


def test_server_run_writes_no_local_stores(server_run):
    assert not (server_run.workspace / "mlflow.db").exists()
    assert not (server_run.workspace / "optuna.db").exists()


def test_postgres_records_optuna_trials(server_run):
    sizes = grid_sizes()
    studies = optuna_studies(server_run.optuna_url)
    assert sorted(study.user_attrs["label"] for study in studies) == sorted(sizes)
    _, children = mlflow_runs(server_run)
    child_ids = {child.info.run_id for child in children}
    for study in studies:
        trials = study.get_trials()
        assert len(trials) == sizes[study.user_attrs["label"]]
        for trial in trials:
            assert trial.user_attrs["end_state"] in END_STATES
            assert set(trial.params) == GRID_AXES
            assert trial.user_attrs["mlflow_run_id"] in child_ids


def test_mlflow_server_stores_artifacts(server_run, mlflow_server):
    assert list(mlflow_server.artifacts.rglob("metadata.json"))
    assert not (server_run.workspace / "mlartifacts").exists()


# The smoke study in full team mode: server, PostgreSQL and two Ray nodes.


@dataclass(frozen=True)
class TeamRun(StudyRun):
    node_ids: list[str]
    """IDs of the cluster's nodes when it started."""
    nodes_after: list[dict]
    cluster_running_after: bool


@pytest.fixture(scope="module")
def team_run(tmp_path_factory, mlflow_server, postgres_server, ray_cluster) -> TeamRun:
    workspace = tmp_path_factory.mktemp("team_run") / "workspace"
    optuna_url = postgres_server.create_database("team_run")
    completed = run_study(
        workspace,
        "--tracking-uri",
        mlflow_server.uri,
        "--optuna-storage",
        optuna_url,
        "--ray-address",
        ray_cluster.address,
        env=ray_cluster.env,
    )
    return TeamRun(
        workspace=workspace,
        completed=completed,
        tracking_uri=mlflow_server.uri,
        optuna_url=optuna_url,
        node_ids=ray_cluster.node_ids,
        nodes_after=ray_cluster.nodes(),
        cluster_running_after=ray_cluster.is_running(),
    )


def test_team_run_exits_cleanly(team_run):
    assert team_run.completed.returncode == 0, team_run.completed.stderr[-4000:]


def test_team_run_records_every_trial(team_run):
    total = sum(grid_sizes().values())
    parents, children = mlflow_runs(team_run)
    assert len(parents) == 1
    assert len(children) == total
    for child in children:
        assert child.data.tags["end_state"] in END_STATES
    trials = [t for s in optuna_studies(team_run.optuna_url) for t in s.get_trials()]
    assert len(trials) == total
    assert not (team_run.workspace / "mlflow.db").exists()
    assert not (team_run.workspace / "optuna.db").exists()


def test_team_run_tune_storage_in_workspace(team_run):
    results_dir = team_run.workspace / "ray_results"
    (experiment,) = [path for path in results_dir.iterdir() if path.is_dir()]
    assert list(experiment.glob("experiment_state-*.json"))
    results = list(experiment.glob("*/result.json"))
    assert len(results) == sum(grid_sizes().values())
    for result in results:
        assert result.stat().st_size > 0, result


def test_team_run_uses_both_nodes(team_run):
    alive = [node for node in team_run.nodes_after if node["alive"]]
    assert len(alive) == 2
    assert [node["cpus"] for node in alive] == [1.0, 1.0]
    # Every node has 1 CPU and every trial takes 1 CPU, so two trials that
    # ran at the same time ran on different nodes.
    _, children = mlflow_runs(team_run)
    assert all(child.info.end_time for child in children)
    assert max_overlap(children) == 2


def test_ray_cluster_survives_team_run(team_run):
    assert team_run.cluster_running_after
    alive_after = {node["node_id"] for node in team_run.nodes_after if node["alive"]}
    assert alive_after == set(team_run.node_ids)


# Stores and clusters that cannot be reached.


def test_unreachable_tracking_uri_rejected(tmp_path, closed_port):
    workspace = tmp_path / "workspace"
    uri = f"http://127.0.0.1:{closed_port}"
    completed = run_study(workspace, "--tracking-uri", uri, timeout=120)
    assert_rejected(completed, workspace, uri, "--tracking-uri")


def test_unreachable_optuna_storage_rejected(tmp_path, closed_port):
    workspace = tmp_path / "workspace"
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{closed_port}/x"
    completed = run_study(workspace, "--optuna-storage", url, timeout=120)
    assert_rejected(completed, workspace, url, "--optuna-storage")


def test_rejection_hides_storage_password(tmp_path, closed_port):
    password = "team-mode-secret"
    url = f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{closed_port}/x"
    completed = run_study(tmp_path / "workspace", "--optuna-storage", url, timeout=120)
    assert completed.returncode == EXIT_BAD_INPUT, completed.stderr[-4000:]
    assert password not in completed.stdout
    assert password not in completed.stderr


def test_unreachable_ray_address_rejected(tmp_path, closed_port):
    workspace = tmp_path / "workspace"
    address = f"127.0.0.1:{closed_port}"
    # Should the check let the address through, this keeps ray.init from
    # replacing 127.0.0.1 with the machine's routable address.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    completed = run_study(workspace, "--ray-address", address, env=env, timeout=120)
    assert_rejected(completed, workspace, address, "--ray-address")


# A teammate's run on the shared tracking server.


def write_one_trial_study(directory: Path, name: str) -> Path:
    """Write the smoke scale's first workload, cut to one grid point, as study `name`."""
    raw = yaml.safe_load(available_studies()[STUDY].read_text())
    smoke = raw["scales"][SCALE]
    label, entry = next(iter(smoke["workloads"].items()))
    entry["grid"] = {axis: values[:1] for axis, values in entry["grid"].items()}
    smoke["workloads"] = {label: entry}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": name, "scales": {SCALE: smoke}}))
    return path


def test_run_ignores_other_workspace_run(tmp_path, mlflow_server):
    name = "team_mode_probe"
    teammate_run_id = "20000101-000000-0000"
    study_file = write_one_trial_study(tmp_path, name)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment_id = client.create_experiment(name)
    # A teammate's run in progress: a parent run that has not ended.
    teammate_parent = client.create_run(
        experiment_id,
        tags={"study": name, "scale": SCALE, "study_run_id": teammate_run_id},
    )
    completed = run_study(
        tmp_path / "workspace",
        "--tracking-uri",
        mlflow_server.uri,
        study=str(study_file),
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    parents = [
        run
        for run in client.search_runs([experiment_id], max_results=100)
        if "mlflow.parentRunId" not in run.data.tags
        and run.data.tags["study_run_id"] != teammate_run_id
    ]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    teammate_status = client.get_run(teammate_parent.info.run_id).info.status
    assert teammate_status == "RUNNING"
