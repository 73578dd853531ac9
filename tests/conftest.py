"""Fixtures shared across test packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smoke_study_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `study run batch_power_grid --scale smoke` that read-only tests share."""
    workspace = tmp_path_factory.mktemp("smoke_workspace")
    completed = subprocess.run(
        [sys.executable, "-m", "study.cli", "run", "batch_power_grid"]
        + ["--scale", "smoke", "--workspace", str(workspace)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return workspace, completed
