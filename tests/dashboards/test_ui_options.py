"""`study ui` rejects a bad workspace or port with one `error:` line before
starting the MLflow UI."""

from __future__ import annotations

import socket

import pytest

from study.cli import EXIT_BAD_INPUT, main

LOOPBACK = "127.0.0.1"


def test_ui_workspace_is_file(tmp_path, capsys):
    path = tmp_path / "mlflow.db"
    path.write_text("")
    assert main(["ui", "--workspace", str(path)]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"error: Workspace {path} is not a directory" in error
    assert "does not exist" not in error


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_ui_port_out_of_range(tmp_path, port, capsys):
    assert main(["ui", "--workspace", str(tmp_path), "--port", port]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith(f"error: --port {port} is invalid")
    assert "1 to 65535" in error


def test_ui_port_in_use(tmp_path, capsys):
    with socket.create_server((LOOPBACK, 0)) as busy:
        port = busy.getsockname()[1]
        code = main(["ui", "--workspace", str(tmp_path), "--port", str(port)])
    assert code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith(f"error: Port {port} on {LOOPBACK} is not available")
    assert "--port" in error
