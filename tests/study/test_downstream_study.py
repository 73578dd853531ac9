"""A compare study with `downstream:` records zero-shot accuracy per trial and
exports it as Table 1 of the GradPower paper (real Ray, MLflow and Optuna stores)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.cli import _check_data_folders, main
from study.spec import StudyFileError, load_study
from study.workspace import Workspace
from tests.study.resilience_support import TINY_LM, child_runs, optuna_trials
from tests.trainers.sample_data import write_downstream_files
from trainers.downstream import TASK_NAMES

pytestmark = pytest.mark.slow


def _write_study(tmp_path, downstream: dict) -> str:
    entry = {
        **TINY_LM,
        "grid": {"batch_size": [4], "power": [1.0, 1.2], "lr_max": [0.01]},
        "budget": {"steps": 6},
        "eval_every_steps": 3,
        "downstream": downstream,
    }
    del entry["target"], entry["checkpoint_every_steps"]
    spec = {
        "name": "zero_shot",
        "analysis": "compare",
        "scales": {"smoke": {"workloads": {"llama": entry}}},
    }
    path = tmp_path / "zero_shot.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_compare_study_exports_downstream_table(tmp_path, capsys):
    benchmarks = write_downstream_files(tmp_path / "benchmarks", 6)
    path = _write_study(
        tmp_path, {"tasks": list(TASK_NAMES), "dir": str(benchmarks), "max_examples": 5}
    )
    workspace = tmp_path / "ws"
    run = ["run", path, "--scale", "smoke", "--workspace", str(workspace)]

    assert main([*run, "--data-cache", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out

    trials = optuna_trials(workspace, "zero_shot")
    assert len(trials) == 2
    for trial in trials:
        results = trial.user_attrs["downstream"]
        assert sorted(results) == sorted(TASK_NAMES)
        assert all(results[task]["examples"] == 5 for task in TASK_NAMES)
        assert not [name for name in trial.user_attrs if name.startswith("downstream_")]
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    for child in child_runs(workspace, "zero_shot"):
        metrics = child.data.metrics
        assert 0 <= metrics["downstream/hellaswag/acc_norm"] <= 1
        history = client.get_metric_history(child.info.run_id, "downstream/average")
        assert [point.step for point in history] == [6]
        assert child.data.params["downstream.max_examples"] == "5"
    assert "## Zero-shot downstream accuracy" in printed
    assert "| ARC-E | ARC-C | PIQA | HellaSwag | OBQA | WinoGrande | Avg." in printed

    export = ["export-table", path, "--scale", "smoke", "--workspace", str(workspace)]
    assert main(export) == 0
    (table,) = (workspace / "exports").glob("zero_shot-smoke-*-downstream.csv")
    rows = list(csv.DictReader(table.open()))
    by_variant = {row["variant"]: row for row in rows}
    assert sorted(by_variant) == ["Adam", "AdamPower"]
    for trial in trials:
        variant = "Adam" if trial.params["power"] == 1.0 else "AdamPower"
        recorded = trial.user_attrs["downstream"]
        for task in TASK_NAMES:
            exported = float(by_variant[variant][f"{task}/acc"])
            assert exported == pytest.approx(recorded[task]["acc"])
    (trials_csv,) = (workspace / "exports").glob("zero_shot-smoke-*-trials.csv")
    for row in csv.DictReader(trials_csv.open()):
        assert sorted(json.loads(row["downstream"])) == sorted(TASK_NAMES)
    (parent,) = [
        run
        for run in client.search_runs([child.info.experiment_id])
        if "mlflow.parentRunId" not in run.data.tags
    ]
    headline = parent.data.metrics["downstream/llama/bs_4/AdamPower/average"]
    assert headline == pytest.approx(float(by_variant["AdamPower"]["average"]))
    assert main([*export, "--format", "html"]) == 0
    (page,) = (workspace / "exports").glob("zero_shot-smoke-*.html")
    assert "Zero-shot accuracy in percent on the final weights" in page.read_text()
    _check_changed_data_folder(path, workspace, client, parent, capsys)
    (latex,) = (workspace / "exports").glob("zero_shot-smoke-*-downstream.tex")
    caption = latex.read_text()
    assert "Examples per task: ARC-E 5" in caption
    # PIQA's table column is acc: its binomial error over 5 examples.
    error = max(
        100 * math.sqrt(float(row["piqa/acc"]) * (1 - float(row["piqa/acc"])) / 4)
        for row in rows
    )
    assert "(binomial, in points, the largest of the rows): ARC-E" in caption
    assert f"PIQA {error:.2f}" in caption


def _check_changed_data_folder(path, workspace, client, parent, capsys):
    """A run that continues after its benchmark files changed keeps the
    requests it started with, and stops early when they are gone."""
    spec = load_study(path)
    run_id = parent.data.tags["study_run_id"]
    cache = workspace.parent / "cache"
    args = argparse.Namespace(
        name=path,
        scale="smoke",
        tracking_uri=None,
        optuna_storage=None,
        data_cache=str(cache),
    )
    recorded = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "metadata.json")).read_text()
    )["prepared_data"]["llama"]
    old = Path(recorded["downstream_dir"])
    changed = {"llama": {**recorded, "downstream_dir": f"{old}-new"}}
    moved = {"llama": {**recorded, "downstream_dir": f"/elsewhere/{old.name}"}}
    ws = Workspace.open(workspace, data_cache=cache)
    capsys.readouterr()

    _check_data_folders(args, spec, ws, client, run_id, moved)
    _check_data_folders(args, spec, ws, client, run_id, changed)
    printed = capsys.readouterr().out
    shutil.rmtree(old)
    with pytest.raises(StudyFileError) as gone:
        _check_data_folders(args, spec, ws, client, run_id, changed)
    with pytest.raises(StudyFileError) as elsewhere:
        _check_data_folders(args, spec, ws, client, run_id, moved)

    assert printed.count("warning:") == 1
    assert "warning: the data of workload llama changed since run" in printed
    assert f"its trials keep reading {old}" in printed
    assert "which is gone, so its unfinished trials cannot continue" in str(gone.value)
    assert f"--data-cache {cache} --fresh" in str(gone.value)
    assert f"the same data is now in /elsewhere/{old.name}" in str(elsewhere.value)
    _check_data_folders(args, spec, ws, client, run_id, {"llama": recorded})


def test_missing_benchmark_file_stops_early(tmp_path, capsys):
    benchmarks = write_downstream_files(tmp_path / "benchmarks", 3, ["piqa"])
    path = _write_study(
        tmp_path, {"tasks": ["piqa", "winogrande"], "dir": str(benchmarks)}
    )
    workspace = tmp_path / "ws"
    run = ["run", path, "--scale", "smoke", "--workspace", str(workspace)]

    assert main([*run, "--data-cache", str(tmp_path / "cache")]) != 0

    error = capsys.readouterr().err
    assert "downstream task winogrande: no winogrande.jsonl" in error
    # Nothing was recorded, so the workspace that the run created is gone.
    assert not workspace.exists()


def test_vision_entry_rejects_downstream(tmp_path):
    spec = {
        "name": "vision_downstream",
        "analysis": "compare",
        "scales": {
            "smoke": {
                "workloads": {
                    "resnet": {
                        "workload": "vision",
                        "model": {"preset": "tiny"},
                        "grid": {"batch_size": [8], "power": [1.0], "lr_max": [0.01]},
                        "budget": {"steps": 2},
                        "downstream": {"tasks": ["piqa"]},
                    }
                }
            }
        },
    }
    path = tmp_path / "vision_downstream.yaml"
    path.write_text(json.dumps(spec))

    with pytest.raises(StudyFileError) as caught:
        load_study(str(path))
    message = str(caught.value)
    assert "downstream evaluation scores language models" in message
    assert "resnet" in message


def test_unknown_task_lists_choices(tmp_path):
    path = _write_study(tmp_path, {"tasks": ["arc_easy", "mmlu"]})

    with pytest.raises(StudyFileError) as caught:
        load_study(path)
    assert "mmlu" in str(caught.value)
    assert "arc_challenge" in str(caught.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"analysis": "power_trend"},
            "downstream is set, but the power_trend analysis has no downstream table",
        ),
        ({"dir": " "}, "dir is empty; set it to the folder with the task files"),
    ],
)
def test_downstream_setting_errors(tmp_path, change, expected):
    downstream = {"tasks": ["piqa"], **{k: v for k, v in change.items() if k == "dir"}}
    path = Path(_write_study(tmp_path, downstream))
    spec = yaml.safe_load(path.read_text())
    if "analysis" in change:
        spec["analysis"] = change["analysis"]
        spec["scales"]["smoke"]["workloads"]["llama"]["target"] = {
            "metric": "val/loss",
            "value": 1.0,
        }
    path.write_text(yaml.safe_dump(spec))

    with pytest.raises(StudyFileError) as caught:
        load_study(str(path))

    assert expected in str(caught.value)
