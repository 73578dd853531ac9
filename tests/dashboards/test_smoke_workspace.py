"""`study ui`, `report`, `export-table` and `analyze` on a real smoke workspace.

One `study run batch_power_grid --scale smoke` feeds every test here. The UI
test opens the runs page in headless Chromium, which the fixture installs
with apt-get where it is missing and the tests run as root.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from study.cli import main

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
UI_START_TIMEOUT_SEC = 120


@pytest.fixture(scope="module")
def workspace(smoke_study_run) -> Path:
    root, completed = smoke_study_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def optuna_trials(workspace) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{workspace / 'optuna.db'}"
    trials = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials.extend(study.get_trials())
    return trials


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def ui_url(workspace, tmp_path_factory):
    """Start `study ui` as a user would, and stop it with Ctrl-C (SIGINT)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "study.cli", "ui", "--workspace", str(workspace)]
            + ["--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_SEC
        url = f"http://127.0.0.1:{port}"
        while f"MLflow UI for {workspace}: {url}" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()[-3000:]
    assert not _port_open(port)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
        ):
            subprocess.run(
                command, env=environment, capture_output=True, timeout=900, check=False
            )
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is missing; install it with `apt-get install chromium`")
    return path


def _browse(chromium: str, profile: Path, url: str, *options: str) -> str:
    """Run headless Chromium on `url` with a fresh profile; return its stdout."""
    completed = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        + ["--window-size=1400,900", "--virtual-time-budget=20000", *options, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def _page_text(dom: str) -> str:
    dom = re.sub(r"(?s)<(script|style)[^>]*>.*?</\1>", " ", dom)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def _api(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _search_runs(url: str, experiment_id: str, filter_string: str = "") -> list:
    body = {
        "experiment_ids": [experiment_id],
        "filter": filter_string,
        "max_results": 1000,
    }
    return _api(url, "runs/search", body).get("runs", [])


def _experiment_id(url: str) -> str:
    query = urllib.parse.urlencode({"experiment_name": "batch_power_grid"})
    return _api(url, f"experiments/get-by-name?{query}")["experiment"]["experiment_id"]


def _tags(run: dict) -> dict:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def test_ui_api_lists_every_trial(ui_url, optuna_trials):
    runs = _search_runs(ui_url, _experiment_id(ui_url))
    trial_keys = [_tags(run).get("trial_key") for run in runs]
    recorded = sorted(trial.user_attrs["trial_key"] for trial in optuna_trials)
    assert sorted(key for key in trial_keys if key) == recorded
    parents = [run for run in runs if "mlflow.parentRunId" not in _tags(run)]
    assert len(parents) == 1


def test_ui_api_filter_by_power(ui_url, optuna_trials):
    runs = _search_runs(ui_url, _experiment_id(ui_url), "params.power = '1.2'")
    expected = sum(trial.params["power"] == 1.2 for trial in optuna_trials)
    assert expected > 0
    assert len(runs) == expected
    for run in runs:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["power"] == "1.2"


def test_ui_runs_page_in_chromium(ui_url, chromium, optuna_trials, tmp_path):
    page = f"{ui_url}/#/experiments/{_experiment_id(ui_url)}/runs"
    screenshot = tmp_path / "runs.png"
    dom = _browse(
        chromium, tmp_path / "profile", page, f"--screenshot={screenshot}", "--dump-dom"
    )
    pixels = imread(screenshot)
    assert pixels.shape[:2] == (900, 1400)
    assert np.std(pixels) > 0.05
    text = _page_text(dom)
    # The runs table counts the parent run and its trial runs.
    assert f"{len(optuna_trials) + 1} matching runs" in text
    assert "batch_power_grid-smoke-" in text


def _parent_artifacts(workspace: Path, folder: str) -> set[str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("batch_power_grid")
    (parent,) = [
        run
        for run in client.search_runs([experiment.experiment_id], max_results=1000)
        if "mlflow.parentRunId" not in run.data.tags
    ]
    return {a.path for a in client.list_artifacts(parent.info.run_id, folder)}


def test_run_writes_report_and_logs_it(workspace):
    (page,) = (workspace / "exports").glob("batch_power_grid-smoke-*-report.html")
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 6
    assert "lm (lm)" in text
    assert "vision (vision)" in text
    logged = _parent_artifacts(workspace, "report")
    assert f"report/{page.name}" in logged
    assert sum(path.endswith(".png") for path in logged) >= 6


def test_export_table_formats_logged(workspace, capsys):
    code = main(
        ["export-table", "batch_power_grid", "--scale", "smoke"]
        + ["--workspace", str(workspace), "--metric", "seconds"]
        + ["--format", "latex", "--format", "html", "--spread"]
    )
    assert code == 0
    output = capsys.readouterr().out
    written = re.findall(r"wrote (\S+)", output)
    assert len(written) == 4
    assert all(
        path.endswith(("-seconds-spread.tex", "-seconds-spread.html"))
        for path in written
    )
    logged = _parent_artifacts(workspace, "exports")
    assert {f"exports/{Path(path).name}" for path in written} <= logged
    tex = Path(written[0]).read_text()
    assert r"\toprule" in tex
    assert r"\textbf{" in tex


def test_analyze_reports_counts_and_view(workspace, optuna_trials, capsys):
    code = main(
        ["analyze", "batch_power_grid", "--scale", "smoke"]
        + ["--workspace", str(workspace), "--metric", "tokens"]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "lm (lm): tokens to val/loss <= " in output
    assert "vision (vision): examples to val/loss <= " in output
    recorded = re.findall(r"trials: (\d+) recorded", output)
    assert sum(map(int, recorded)) == len(optuna_trials)
    assert "at the median step at which the seeds of each batch size's best" in output
    assert "the best power's own cell can miss the target" in output


def test_analyze_missing_run_is_bad_input(workspace, capsys):
    code = main(
        ["analyze", "batch_power_grid", "--scale", "smoke"]
        + ["--workspace", str(workspace), "--run-id", "no-such-run"]
    )
    assert code == 2
    assert "is not recorded" in capsys.readouterr().err


def test_final_accuracy_skips_lm_workload(workspace, tmp_path, capsys):
    # A copy, because other tests count the shared workspace's exports.
    copy = shutil.copytree(workspace, tmp_path / "copy")
    code = main(
        ["export-table", "batch_power_grid", "--scale", "smoke"]
        + ["--workspace", str(copy), "--metric", "final_accuracy"]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "note: workload lm records no val/accuracy" in output
    assert "vision: last recorded val/accuracy" in output
    assert "Cells are the median over seeds of the last recorded value" in output
