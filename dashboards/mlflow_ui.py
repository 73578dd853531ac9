"""Serve the MLflow UI on a workspace's tracking store and stop it cleanly."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

from study.workspace import Workspace

STARTUP_TIMEOUT_SEC = 60


def start_ui(workspace: Workspace, host: str, port: int) -> subprocess.Popen:
    """Start `mlflow ui` in a child process and wait until it answers HTTP."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            workspace.tracking_uri,
            "--host",
            host,
            "--port",
            str(port),
        ]
    )
    url = f"http://{host}:{port}/health"
    deadline = time.monotonic() + STARTUP_TIMEOUT_SEC
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"mlflow ui exited with code {process.returncode}; is port {port} "
                "already in use? Pass another one with --port"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(
        f"mlflow ui did not answer on {url} within {STARTUP_TIMEOUT_SEC} s"
    )


def stop_ui(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve_ui(workspace: Workspace, host: str, port: int) -> int:
    process = start_ui(workspace, host, port)
    print(f"MLflow UI for {workspace.root}: http://{host}:{port} (Ctrl-C stops it)")
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_ui(process)
