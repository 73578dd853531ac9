"""`target: {stop: false}`: trials train past the target and record both the
step that met it and the value at the end of the budget (real Ray, MLflow and
Optuna stores)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from study.cli import main
from tests.study.resilience_support import child_runs, optuna_trials, write_study

pytestmark = pytest.mark.slow


def test_stop_false_trains_past_target(tmp_path, capsys):
    grid = {"batch_size": [8], "power": [1.0, 1.2], "lr_max": [0.01], "seed": [0]}
    path = write_study(
        tmp_path,
        "past_target",
        grid,
        steps=20,
        # Met at the first evaluation, after 5 steps.
        target={"metric": "val/loss", "value": 100.0, "stop": False},
        eval_every_steps=5,
    )
    workspace = tmp_path / "ws"
    assert (
        main(["run", str(path), "--scale", "smoke", "--workspace", str(workspace)]) == 0
    )

    trials = optuna_trials(workspace, "past_target")
    assert len(trials) == 2
    for trial in trials:
        assert trial.user_attrs["end_state"] == "reached"
        assert trial.user_attrs["steps_to_target"] == 5
        assert trial.user_attrs["steps_done"] == 20
    runs = child_runs(workspace, "past_target")
    assert sorted(run.data.tags["end_state"] for run in runs) == ["reached"] * 2
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert max(metric.step for metric in history) == 20

    capsys.readouterr()
    export = ["export-table", str(path), "--scale", "smoke", "--workspace"]
    assert main([*export, str(workspace), "--metric", "final_loss"]) == 0
    (table,) = (workspace / "exports").glob("past_target-smoke-*-final_loss.md")
    text = table.read_text()
    assert "end-of-budget val/loss" in text
    assert "value at the end of the budget; trials trained on after meeting" in text
