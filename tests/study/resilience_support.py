"""Small study files and process helpers shared by the resilience tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from mlflow.tracking import MlflowClient

TINY_LM = {
    "workload": "lm",
    "model": {"preset": "tiny"},
    "data": {
        "source": "bible",
        "vocab_size": 512,
        "seq_len": 32,
        "val_tokens": 4096,
        "max_documents": 200,
    },
    "train": {"schedule": "cos", "warmup_steps": 2},
    # Unreachable, so every trial runs its whole budget and ends censored.
    "target": {"metric": "val/loss", "value": 0.1},
    "eval_every_steps": 10,
    "checkpoint_every_steps": 10,
}


def write_study(
    directory: Path,
    name: str,
    grid: dict[str, list],
    steps: int,
    scale: dict[str, Any] | None = None,
    **workload: Any,
) -> Path:
    # A short budget is evaluated at its last step, as every budget is.
    interval = min(TINY_LM["eval_every_steps"], steps)
    entry = {
        **TINY_LM,
        "grid": grid,
        "budget": {"steps": steps},
        "eval_every_steps": interval,
        **workload,
    }
    spec = {
        "name": name,
        "scales": {"smoke": {**(scale or {}), "workloads": {"lm": entry}}},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "study.cli", *args]


def start_study(
    path: Path, workspace: Path, log: Path, new_session: bool = False
) -> subprocess.Popen:
    """Start `study run` on the smoke scale in the background, output to `log`;
    with `new_session`, as the leader of its own process group."""
    with log.open("w") as output:
        return subprocess.Popen(
            study_command(
                "run", str(path), "--scale", "smoke", "--workspace", str(workspace)
            ),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def child_runs(workspace: Path, study: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=10000)
    return [run for run in runs if "mlflow.parentRunId" in run.data.tags]


def optuna_trials(workspace: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{workspace / 'optuna.db'}"
    trials = []
    for summary in optuna.get_all_study_summaries(storage):
        if summary.user_attrs.get("study") == study:
            loaded = optuna.load_study(study_name=summary.study_name, storage=storage)
            trials.extend(loaded.get_trials())
    return trials


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children before they orphan)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_file(process: subprocess.Popen, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if process.poll() is not None:
            raise AssertionError(f"process ended before {path} was written")
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {timeout} s")


def wait_for_line(
    process: subprocess.Popen, log: Path, text: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"process ended before {text!r}:\n{log.read_text()}")
        time.sleep(0.2)
    raise AssertionError(
        f"{text!r} did not appear within {timeout} s:\n{log.read_text()}"
    )
