"""`study run toy_noise_regimes --scale smoke` through Ray Tune, MLflow and Optuna."""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import yaml

from study.spec import StudyFileError, available_studies, load_study
from tests.study.resilience_support import child_runs, optuna_trials, study_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("toy")
    completed = subprocess.run(
        study_command(
            "run",
            "toy_noise_regimes",
            "--scale",
            "smoke",
            "--workspace",
            str(workspace),
        ),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return workspace, completed


def test_toy_study_records_every_point(toy_run):
    workspace, completed = toy_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    size = load_study("toy_noise_regimes").scale("smoke").workloads["toy"].grid.size()
    runs = child_runs(workspace, "toy_noise_regimes")
    assert len(runs) == size
    assert {run.data.tags["end_state"] for run in runs} == {"complete"}
    trials = optuna_trials(workspace, "toy_noise_regimes")
    assert len(trials) == size
    for trial in trials:
        assert trial.value == trial.user_attrs["toy_update_mean"]
        assert set(trial.params) == {"noise_ratio", "power", "seed"}


def test_toy_study_table_and_findings(toy_run):
    workspace, completed = toy_run
    (csv_path,) = (workspace / "exports").glob("toy_noise_regimes-smoke-toy-*.csv")
    table = pd.read_csv(csv_path)
    assert list(table.noise_ratio) == [0.5, 10.0]
    low, high = table.best_power_simulated
    assert low < 1
    assert high > 1
    assert list(table.best_power_limit) == list(table.best_power_simulated)
    assert csv_path.with_suffix(".png").stat().st_size > 0
    assert "simulated p* < 1 at 1 of 1 ratios (holds)" in completed.stdout


def test_toy_spec_rejects_nonpositive_noise_ratio(tmp_path):
    spec = yaml.safe_load(available_studies()["toy_noise_regimes"].read_text())
    spec["scales"]["smoke"]["workloads"]["toy"]["grid"]["noise_ratio"] = [0.0, 1.0]
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyFileError) as error:
        load_study(str(path))
    assert "noise_ratio 0.0 is invalid" in str(error.value)
    assert "workloads.toy.grid" in str(error.value)
