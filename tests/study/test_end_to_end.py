"""`study run batch_power_grid --scale smoke` end to end: real Ray, MLflow, Optuna."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from study.spec import load_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(smoke_study_run) -> tuple[Path, subprocess.CompletedProcess]:
    return smoke_study_run


def _grid_sizes() -> dict[str, int]:
    scale = load_study("batch_power_grid").scale("smoke")
    return {label: entry.grid.size() for label, entry in scale.workloads.items()}


def test_run_exits_cleanly(smoke_run):
    _, completed = smoke_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "slope" in completed.stdout or "no trend fit" in completed.stdout


def test_run_mlflow_child_runs_match_grid(smoke_run):
    workspace, _ = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("batch_power_grid")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert len(children) == sum(_grid_sizes().values())
    keys = {r.data.tags["trial_key"] for r in children}
    assert len(keys) == len(children)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.tags["end_state"] in (
            "reached",
            "censored",
            "diverged",
            "failed",
        )
        for param in ("workload", "batch_size", "power", "lr_max", "seed"):
            assert param in child.data.params
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(history) >= 1
        assert [m.step for m in history] == sorted(m.step for m in history)


def test_run_metrics_logged_by_step(smoke_run):
    workspace, _ = smoke_run
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["batch_power_grid"])
    child = runs[runs["tags.mlflow.parentRunId"].notna()].iloc[0]
    client = MlflowClient()
    for name in ("train/loss", "train/lr", "val/loss"):
        assert client.get_metric_history(child.run_id, name), name


def test_run_optuna_trials_match_grid(smoke_run):
    workspace, _ = smoke_run
    storage = f"sqlite:///{workspace / 'optuna.db'}"
    summaries = optuna.get_all_study_summaries(storage)
    sizes = _grid_sizes()
    assert sorted(s.user_attrs["label"] for s in summaries) == sorted(sizes)
    for summary in summaries:
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials()
        assert len(trials) == sizes[summary.user_attrs["label"]]
        for trial in trials:
            state = trial.user_attrs["end_state"]
            assert state in ("reached", "censored", "diverged", "failed")
            if state == "reached":
                assert trial.value == trial.user_attrs["steps_to_target"]
            else:
                assert trial.value is None
            assert set(trial.params) == {"batch_size", "power", "lr_max", "seed"}


def test_run_exported_table_shape(smoke_run):
    workspace, _ = smoke_run
    scale = load_study("batch_power_grid").scale("smoke")
    for label, entry in scale.workloads.items():
        (csv_path,) = (workspace / "exports").glob(
            f"batch_power_grid-smoke-{label}-*.csv"
        )
        table = pd.read_csv(csv_path)
        assert sorted(table.batch_size) == sorted(entry.grid.batch_size)
        power_columns = [c for c in table.columns if c.startswith("p=")]
        assert len(power_columns) == len(entry.grid.power)
        markdown = csv_path.with_suffix(".md").read_text()
        assert markdown.count("\n|") >= 1 + len(entry.grid.batch_size)


def test_run_exports_logged_on_parent(smoke_run):
    workspace, _ = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("batch_power_grid")
    parent = client.search_runs(
        [experiment.experiment_id], "tags.study_run_id != ''", max_results=1000
    )
    parent = next(r for r in parent if "mlflow.parentRunId" not in r.data.tags)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "metadata.json" in names
    assert "exports" in names


def test_analyze_reads_recorded_run(smoke_run):
    workspace, _ = smoke_run
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "study.cli",
            "analyze",
            "batch_power_grid",
            "--scale",
            "smoke",
            "--workspace",
            str(workspace),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "| batch_size |" in completed.stdout
