"""Serve the MLflow UI on a workspace's tracking store and stop it cleanly."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from study.spec import StudyFileError
from study.workspace import Workspace

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SEC = 90
STOP_TIMEOUT_SEC = 15


class UiStartError(RuntimeError):
    """`mlflow ui` exited or did not respond while starting."""


def check_port_free(host: str, port: int) -> None:
    """Raise StudyFileError when `host` cannot be resolved or `port` on it cannot
    be bound, for example because another server listens there."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as error:
        raise StudyFileError(
            f"--host {host} cannot be resolved ({error.strerror}); pass an address "
            "such as 127.0.0.1"
        ) from None
    with socket.socket(family, kind, protocol) as probe:
        # As uvicorn does, so a port with connections in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise StudyFileError(
                f"Port {port} on {host} is not available ({error.strerror}); "
                "pass another one with --port"
            ) from None


def start_ui(workspace: Workspace, host: str, port: int) -> subprocess.Popen:
    """Start `mlflow ui` in its own process group and wait until it answers HTTP.

    One uvicorn worker serves one local user. MLflow's background job runner
    (for GenAI evaluation jobs, on by default since MLflow 3.x) is turned off
    because browsing runs does not need it and it adds a process tree of its
    own. New artifacts go under the workspace's mlartifacts/.
    """
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            workspace.tracking_uri,
            "--artifacts-destination",
            workspace.artifact_root.as_uri(),
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=environment,
        start_new_session=True,
    )
    try:
        _wait_until_serving(process, f"http://{host}:{port}/health", port)
    except BaseException:
        stop_ui(process)
        raise
    return process


def _wait_until_serving(process: subprocess.Popen, url: str, port: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SEC
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UiStartError(
                f"mlflow ui exited with code {process.returncode} while starting; "
                f"its output above says why (a port {port} that another server "
                "took since the check is one cause; pass another one with --port)"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise UiStartError(
        f"mlflow ui did not answer on {url} within {STARTUP_TIMEOUT_SEC} s"
    )


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def stop_ui(process: subprocess.Popen) -> None:
    """Stop the UI's process group: SIGTERM, then SIGKILL after STOP_TIMEOUT_SEC."""
    group = process.pid  # start_new_session made the child its group's leader
    if _group_alive(group):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SEC
    while time.monotonic() < deadline:
        process.poll()
        if not _group_alive(group):
            break
        time.sleep(0.2)
    else:
        logger.warning("mlflow ui did not stop on SIGTERM; sending SIGKILL")
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_ui(workspace: Workspace, host: str, port: int) -> int:
    """Serve until Ctrl-C or SIGTERM, then stop the UI; return 0 or its exit code."""
    previous = {
        number: signal.signal(number, _raise_interrupt)
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    process = None
    try:
        process = start_ui(workspace, host, port)
        print(
            f"MLflow UI for {workspace.root}: http://{host}:{port} (Ctrl-C stops it)",
            flush=True,
        )
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if process is not None:
            stop_ui(process)
        for number, handler in previous.items():
            signal.signal(number, handler)
