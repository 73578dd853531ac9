"""A workspace keeps its runs when its folder is moved, and a copy is independent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

from study.cli import EXIT_BAD_INPUT, main
from study.recording import ensure_experiment
from study.runner import unfinished_runs
from study.spec import StudyFileError
from study.workspace import IDENTITY_FILE, Workspace, _is_copy_of, signals_deferred

STUDY = "relocation"
SCALE = "smoke"


def _identity(root: Path) -> dict:
    return json.loads((root / IDENTITY_FILE).read_text())


def _record_parent_run(workspace: Workspace, run_id: str, tags: dict) -> str:
    """Record an unfinished parent run with a metadata artifact, as `study run`
    does, and return its MLflow run id."""
    client = workspace.open_stores()
    experiment_id = ensure_experiment(client, STUDY, workspace.artifact_root.as_uri())
    parent = client.create_run(
        experiment_id,
        tags={"study": STUDY, "scale": SCALE, "study_run_id": run_id, **tags},
    )
    client.log_dict(parent.info.run_id, {"run": run_id}, "metadata.json")
    return parent.info.run_id


def _unfinished(client, study: str, scale: str, workspace: Workspace) -> list[str]:
    runs = unfinished_runs(client, study, scale, workspace)
    return [run.data.tags["study_run_id"] for run in runs]


def _forget_artifact_repos() -> None:
    """Drop MLflow's per-process cache of run id to artifact location, as a new
    `study` process starts without it."""
    tracking_utils._artifact_repos_cache.clear()


def _artifact_locations(root: Path) -> tuple[str, str]:
    """Return the experiment's artifact location and its parent run's
    artifact URI, read from the workspace's own tracking store."""
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY)
    (run,) = client.search_runs([experiment.experiment_id])
    return experiment.artifact_location, run.info.artifact_uri


def test_identity_written_once(tmp_path):
    workspace = Workspace.open(tmp_path / "ws")
    assert workspace.read_id() is None
    workspace.open_stores()
    first = _identity(workspace.root)
    assert first["root"] == str(workspace.root)
    workspace.open_stores()
    assert _identity(workspace.root) == first
    assert workspace.read_id() == first["id"]


def test_moved_workspace_keeps_id(tmp_path):
    original = Workspace.open(tmp_path / "a" / "ws")
    original.open_stores()
    workspace_id = original.read_id()
    moved_root = tmp_path / "b" / "ws"
    moved_root.parent.mkdir()
    shutil.move(original.root, moved_root)

    moved = Workspace.open(moved_root)
    moved.open_stores()
    assert _identity(moved_root) == {"id": workspace_id, "root": str(moved_root)}


def test_copied_workspace_gets_new_id(tmp_path):
    original = Workspace.open(tmp_path / "a" / "ws")
    original.open_stores()
    recorded = _identity(original.root)
    copy_root = tmp_path / "b" / "ws"
    shutil.copytree(original.root, copy_root)

    copy = Workspace.open(copy_root)
    copy.open_stores()
    assert copy.read_id() != recorded["id"]
    assert _identity(copy_root)["root"] == str(copy_root)
    assert _identity(original.root) == recorded


def test_moved_folder_is_not_copy(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / IDENTITY_FILE).write_text(json.dumps({"id": "x", "root": str(root)}))
    link = tmp_path / "link"
    link.symlink_to(root)
    assert not _is_copy_of(root, link, "x")
    assert not _is_copy_of(root, tmp_path / "gone", "x")


def test_invalid_identity_file_rejected(tmp_path):
    workspace = Workspace.open(tmp_path / "ws")
    (workspace.root / IDENTITY_FILE).write_text("{not json")
    with pytest.raises(StudyFileError, match=IDENTITY_FILE):
        workspace.open_stores()


def test_moved_workspace_artifacts_follow(tmp_path):
    original = Workspace.open(tmp_path / "a" / "ws")
    parent_run_id = _record_parent_run(
        original, "r1", {"workspace": str(original.root)}
    )
    moved_root = tmp_path / "b" / "ws"
    moved_root.parent.mkdir()
    shutil.move(original.root, moved_root)

    _forget_artifact_repos()
    moved = Workspace.open(moved_root)
    client = moved.open_stores()
    location, artifact_uri = _artifact_locations(moved_root)
    assert location == moved.artifact_root.as_uri()
    assert artifact_uri == f"{location}/{parent_run_id}/artifacts"
    export = tmp_path / "table.md"
    export.write_text("| p |\n")
    client.log_artifact(parent_run_id, str(export), "exports")
    stored = moved.artifact_root / parent_run_id / "artifacts"
    assert (stored / "exports" / "table.md").is_file()
    assert (stored / "metadata.json").is_file()
    assert not original.root.exists()


def test_copied_workspace_artifacts_stay_apart(tmp_path):
    original = Workspace.open(tmp_path / "a" / "ws")
    parent_run_id = _record_parent_run(
        original, "r1", {"workspace": str(original.root)}
    )
    recorded = _artifact_locations(original.root)
    copy_root = tmp_path / "b" / "ws"
    shutil.copytree(original.root, copy_root)

    _forget_artifact_repos()
    copy = Workspace.open(copy_root)
    client = copy.open_stores()
    location, _ = _artifact_locations(copy_root)
    assert location == copy.artifact_root.as_uri()
    assert _artifact_locations(original.root) == recorded
    export = tmp_path / "table.md"
    export.write_text("| p |\n")
    client.log_artifact(parent_run_id, str(export), "exports")
    assert (copy.artifact_root / parent_run_id / "artifacts" / "exports").is_dir()
    assert not (
        original.artifact_root / parent_run_id / "artifacts" / "exports"
    ).exists()


def test_relocate_artifacts_without_store(tmp_path):
    workspace = Workspace.open(tmp_path / "ws")
    workspace.relocate_artifacts()
    assert not (workspace.root / "mlflow.db").exists()


def test_own_stores_find_run_after_move(tmp_path):
    original = Workspace.open(tmp_path / "a" / "ws")
    # A run recorded before the workspace_id tag existed.
    _record_parent_run(original, "r1", {"workspace": str(original.root)})
    moved_root = tmp_path / "b" / "ws"
    moved_root.parent.mkdir()
    shutil.move(original.root, moved_root)

    moved = Workspace.open(moved_root)
    client = moved.open_stores()
    assert moved.owns_stores
    assert _unfinished(client, STUDY, SCALE, moved) == ["r1"]


def _shared_workspace(root: Path, tracking_uri: str) -> Workspace:
    workspace = Workspace.open(root, tracking_uri=tracking_uri)
    workspace.open_stores()
    return workspace


def test_shared_store_matches_workspace_id(tmp_path):
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    original = _shared_workspace(tmp_path / "a" / "ws", shared)
    assert not original.owns_stores
    _record_parent_run(
        original,
        "own",
        {"workspace": str(original.root), "workspace_id": original.read_id()},
    )
    other = _shared_workspace(tmp_path / "other" / "ws", shared)
    _record_parent_run(
        other, "other", {"workspace": str(other.root), "workspace_id": other.read_id()}
    )
    # A teammate's run that names no workspace.
    _record_parent_run(other, "teammate", {})
    client = MlflowClient(tracking_uri=shared)
    assert _unfinished(client, STUDY, SCALE, original) == ["own"]

    copy_root = tmp_path / "copy" / "ws"
    shutil.copytree(original.root, copy_root)
    copy = _shared_workspace(copy_root, shared)
    assert _unfinished(client, STUDY, SCALE, copy) == []

    moved_root = tmp_path / "moved" / "ws"
    moved_root.parent.mkdir()
    shutil.move(original.root, moved_root)
    moved = _shared_workspace(moved_root, shared)
    assert _unfinished(client, STUDY, SCALE, moved) == ["own"]


def test_shared_store_legacy_run_matches_path(tmp_path):
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    workspace = _shared_workspace(tmp_path / "a" / "ws", shared)
    _record_parent_run(workspace, "legacy", {"workspace": str(workspace.root)})
    client = MlflowClient(tracking_uri=shared)
    assert _unfinished(client, STUDY, SCALE, workspace) == ["legacy"]

    elsewhere = _shared_workspace(tmp_path / "b" / "ws", shared)
    assert _unfinished(client, STUDY, SCALE, elsewhere) == []


def test_run_lock_refuses_second_driver(tmp_path, capsys):
    workspace = Workspace.open(tmp_path / "ws")
    args = ["run", "toy_noise_regimes", "--scale", "smoke"]
    with workspace.run_lock("toy_noise_regimes", "smoke"):
        # Another study, or another scale, may run beside it.
        with workspace.run_lock("toy_noise_regimes", "paper"):
            pass
        code = main([*args, "--workspace", str(workspace.root)])
    assert code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert (
        f"of toy_noise_regimes (smoke) is running in workspace {workspace.root} "
        f"(process {os.getpid()}); wait for it to stop" in error
    )
    assert not (workspace.root / "mlflow.db").exists()


def test_run_lock_released_when_holder_is_killed(tmp_path):
    workspace = Workspace.open(tmp_path / "ws")
    hold = (
        "import sys, time\n"
        "from study.workspace import Workspace\n"
        f"with Workspace.open({str(workspace.root)!r}).run_lock('s', 'smoke'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(300)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with (
            pytest.raises(StudyFileError, match=f"process {holder.pid}"),
            workspace.run_lock("s", "smoke"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with workspace.run_lock("s", "smoke"):
        pass


def test_half_migrated_tracking_store_is_one_error(tmp_path):
    workspace = tmp_path / "ws"
    Workspace.open(workspace).open_stores()
    with sqlite3.connect(workspace / "mlflow.db") as connection:
        # An older schema revision, as an interrupted migration leaves.
        connection.execute("UPDATE alembic_version SET version_num = '75868b020152'")
    # A new process, because MLflow checks a store's schema once per process.
    completed = subprocess.run(
        [sys.executable, "-m", "study.cli", "run", "toy_noise_regimes"]
        + ["--scale", "smoke", "--workspace", str(workspace)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == EXIT_BAD_INPUT, completed.stderr[-2000:]
    (error,) = [
        line for line in completed.stderr.splitlines() if line.startswith("error:")
    ]
    assert error.startswith(f"error: MLflow tracking store sqlite:///{workspace}")
    assert "Detected out-of-date database schema" in error
    assert "delete the file and run again" in error
    assert "Traceback" not in completed.stderr


def test_signals_wait_for_store_creation():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(1))
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            assert received == []
        assert received == [1]
    finally:
        signal.signal(signal.SIGTERM, previous)
