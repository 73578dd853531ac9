"""Throwaway servers for the team-mode tests, each listening on 127.0.0.1 only.

Each fixture starts its server, waits until it responds and stops it again,
also when the start or a test fails. The servers are module-scoped so that
several tests share one start.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

LOOPBACK = "127.0.0.1"
# The MLflow server took 20-35 s to start on a 2-core machine that also ran
# other test suites.
START_TIMEOUT_SEC = 180
STOP_TIMEOUT_SEC = 30
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no socket was bound to a moment ago."""
    # NOTE: another process can take the port before the server binds it.
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where no server listens, for unreachable addresses."""
    return free_port()


def _log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError as error:
        return f"(log {path} unreadable: {error})"


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


# Processes in their own group: start, watch and stop.


def _start_process_group(
    command: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `command` as the leader of a new process group, output to `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _has_exited(process: subprocess.Popen) -> bool:
    """Check the leader without reaping it, so its PID (the group id) stays taken."""
    return (
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        is not None
    )


def _live_group_members(group_id: int) -> list[int]:
    """PIDs of the processes in the group that have not exited (zombies excluded)."""
    members = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
        except OSError:
            continue
        # The command name is in brackets and may contain spaces, so the
        # fields (state, ppid, pgrp and more) are split after its closing bracket.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == group_id and fields[0] != "Z":
            members.append(int(stat_path.parent.name))
    return members


def _signal_group(group_id: int, signal_number: int) -> None:
    try:
        os.killpg(group_id, signal_number)
    except ProcessLookupError:
        pass


def stop_process_group(
    process: subprocess.Popen, timeout: float = STOP_TIMEOUT_SEC
) -> None:
    """Stop a process started by `_start_process_group` and everything in its group.

    SIGTERM goes to the leader first, so that it can stop its children in
    order, and then to the whole group. SIGKILL follows for whatever still
    runs after `timeout`. The leader is reaped last, so the group id cannot
    be reused by another process while signals are sent to it.
    """
    group_id = process.pid
    try:
        if not _has_exited(process):
            # Not Popen.send_signal: it polls first, which can reap the leader.
            os.kill(process.pid, signal.SIGTERM)
            _wait_until(lambda: _has_exited(process), timeout / 2)
        _signal_group(group_id, signal.SIGTERM)
        if not _wait_until(lambda: not _live_group_members(group_id), timeout / 2):
            _signal_group(group_id, signal.SIGKILL)
            _wait_until(lambda: not _live_group_members(group_id), 10)
    finally:
        process.wait(timeout=10)


# MLflow tracking server.


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    backend_store: Path
    """The server's sqlite file."""
    artifacts: Path
    """The server's --artifacts-destination directory."""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """An `mlflow server` on 127.0.0.1 with its own sqlite store and artifact folder."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    server = MlflowServer(
        uri=f"http://{LOOPBACK}:{port}",
        backend_store=root / "m.db",
        artifacts=root / "art",
    )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{server.backend_store}",
        "--artifacts-destination",
        str(server.artifacts),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # The job runner starts several worker processes that the tests do not
    # use, and the server starts sooner without them.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = root / "server.log"
    process = _start_process_group(command, log_path, env)
    try:
        if not _wait_until(
            lambda: _has_exited(process) or _is_healthy(server.uri),
            START_TIMEOUT_SEC,
        ):
            pytest.fail(
                f"mlflow server on port {port} did not respond to /health within "
                f"{START_TIMEOUT_SEC} s; its log:\n{_log_tail(log_path)}"
            )
        if _has_exited(process):
            pytest.fail(
                f"mlflow server exited at start; its log:\n{_log_tail(log_path)}"
            )
        yield server
    finally:
        stop_process_group(process)


def _is_healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# PostgreSQL.


@dataclass(frozen=True)
class PostgresServer:
    port: int
    bin_dir: Path
    run_as_owner: list[str]
    """Command prefix that runs a program as the cluster's owner (empty when
    that is the current user)."""

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@{LOOPBACK}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database `name` and return its SQLAlchemy URL."""
        command = [
            *self.run_as_owner,
            str(self.bin_dir / "createdb"),
            "-h",
            LOOPBACK,
            "-p",
            str(self.port),
            "-U",
            "postgres",
            name,
        ]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False
        )
        assert completed.returncode == 0, f"createdb {name} failed: {completed.stderr}"
        return self.url(name)


POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "createdb")


def find_postgres_bin_dir() -> Path | None:
    """Return the directory with initdb, pg_ctl and createdb, or None.

    Debian keeps them in /usr/lib/postgresql/VERSION/bin, off PATH, and the
    highest version wins. Elsewhere the pg_ctl on PATH decides.
    """
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else -1,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all((directory / name).is_file() for name in POSTGRES_PROGRAMS):
            return directory
    return None


def _postgres_unavailable(reason: str) -> NoReturn:
    """Fail where scripts/install.sh could have installed PostgreSQL, else skip."""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail(
            f"{reason}; run `bash scripts/install.sh`, which installs Debian's "
            "postgresql package on this machine"
        )
    pytest.skip(
        f"{reason}; install Debian's postgresql package "
        "(`sudo apt-get install postgresql`) to run the PostgreSQL tests"
    )


def _cluster_owner() -> tuple[list[str], int | None, int | None]:
    """Return the command prefix, uid and gid to run PostgreSQL with.

    PostgreSQL refuses to run as root, so root runs it as the `postgres`
    system user that Debian's package creates.
    """
    if os.geteuid() != 0:
        return [], None, None
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(
            "PostgreSQL refuses to run as root and the `postgres` system user "
            "is missing; reinstall Debian's postgresql package"
        )
    return ["runuser", "-u", "postgres", "--"], owner.pw_uid, owner.pw_gid


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with trust auth for `postgres`."""
    try:
        import psycopg2  # noqa: F401
    except ModuleNotFoundError:
        pytest.fail(
            "psycopg2 is missing; install the test extra: "
            "`.venv/bin/pip install -e '.[test]'`"
        )
    bin_dir = find_postgres_bin_dir()
    if bin_dir is None:
        _postgres_unavailable(
            "PostgreSQL server programs (initdb, pg_ctl, createdb) not found"
        )
    run_as_owner, uid, gid = _cluster_owner()

    # Not under pytest's tmp_path: its parent is private to the current user,
    # and the `postgres` user must reach the data and socket directories.
    # The short path also keeps the Unix socket path under its length limit.
    root = Path(tempfile.mkdtemp(prefix="pg"))
    if uid is not None:
        os.chown(root, uid, gid)
    data_dir = root / "data"
    log_path = root / "server.log"
    port = free_port()
    server = PostgresServer(port=port, bin_dir=bin_dir, run_as_owner=run_as_owner)
    try:
        _run_as_owner(
            server,
            "initdb",
            ["-D", str(data_dir), "-U", "postgres", "--auth=trust", "--no-sync"],
        )
        try:
            # fsync is off because the cluster is deleted after the tests.
            options = f"-k {root} -h {LOOPBACK} -p {port} -c fsync=off"
            _run_as_owner(
                server,
                "pg_ctl",
                [
                    "-D",
                    str(data_dir),
                    "-l",
                    str(log_path),
                    "-w",
                    "-o",
                    options,
                    "start",
                ],
                log_path,
            )
            yield server
        finally:
            _stop_postgres(server, data_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_as_owner(
    server: PostgresServer,
    program: str,
    arguments: list[str],
    log_path: Path | None = None,
) -> None:
    command = [*server.run_as_owner, str(server.bin_dir / program), *arguments]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False
    )
    if completed.returncode != 0:
        log = f"\nserver log:\n{_log_tail(log_path)}" if log_path else ""
        pytest.fail(
            f"{program} failed with exit code {completed.returncode}:\n"
            f"{completed.stdout}{completed.stderr}{log}"
        )


def _stop_postgres(server: PostgresServer, data_dir: Path) -> None:
    """Stop the cluster with pg_ctl, or kill its postmaster by PID if pg_ctl fails."""
    command = [
        *server.run_as_owner,
        str(server.bin_dir / "pg_ctl"),
        "-D",
        str(data_dir),
        "-m",
        "fast",
        "-w",
        "-t",
        str(STOP_TIMEOUT_SEC),
        "stop",
    ]
    completed = subprocess.run(
        command, capture_output=True, timeout=STOP_TIMEOUT_SEC + 10, check=False
    )
    pid_file = data_dir / "postmaster.pid"
    if completed.returncode != 0 and pid_file.exists():
        # The first line of postmaster.pid is the postmaster's PID. Its child
        # processes exit when it does.
        postmaster = int(pid_file.read_text().splitlines()[0])
        try:
            os.kill(postmaster, signal.SIGKILL)
        except ProcessLookupError:
            pass


# Ray cluster with two nodes.

# Runs in its own process and starts a head and one worker node through
# ray.cluster_utils.Cluster, Ray's helper for several nodes on one machine.
# It writes the GCS address and the node IDs as JSON to the file named by
# argv[3], and stops both nodes on SIGTERM.
RAY_CLUSTER_SCRIPT = """
import json
import os
import signal
import sys
import threading

from ray.cluster_utils import Cluster

head_args, worker_args = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args=head_args)
try:
    worker = cluster.add_node(**worker_args)
    cluster.wait_for_nodes()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    started = {
        "address": cluster.address,
        "node_ids": [cluster.head_node.node_id, worker.node_id],
    }
    partial = sys.argv[3] + ".partial"
    with open(partial, "w") as started_file:
        json.dump(started, started_file)
    os.replace(partial, sys.argv[3])
    stopping.wait()
finally:
    cluster.shutdown()
"""

# Prints the nodes of the cluster at the GCS address argv[1] as JSON.
RAY_NODES_SCRIPT = """
import json
import sys

import ray

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes = [
    {"node_id": node["NodeID"], "alive": node["Alive"],
     "cpus": node["Resources"].get("CPU", 0.0)}
    for node in ray.nodes()
]
print(json.dumps(nodes))
"""


@dataclass(frozen=True)
class RayCluster:
    address: str
    """GCS address, host:port, for `ray.init(address=...)` and `--ray-address`."""
    node_ids: list[str]
    """IDs of the head and the worker node, in hex."""
    env: dict[str, str]
    """Environment of every process that starts a node or joins the cluster."""
    process: subprocess.Popen

    def is_running(self) -> bool:
        return not _has_exited(self.process)

    def nodes(self) -> list[dict]:
        """Return node_id, alive and cpus of every node the cluster has known."""
        completed = subprocess.run(
            [sys.executable, "-c", RAY_NODES_SCRIPT, self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert completed.returncode == 0, f"ray.nodes() failed:\n{completed.stderr}"
        return json.loads(completed.stdout.strip().splitlines()[-1])


def _ray_node_args() -> dict:
    """Arguments of one node: 1 CPU, 127.0.0.1, and free ports where Ray's
    defaults are fixed numbers that another Ray on this machine may hold."""
    return {
        "num_cpus": 1,
        "node_ip_address": LOOPBACK,
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port(),
    }


def _ray_env(root: Path) -> dict[str, str]:
    """Return the environment for the cluster's nodes and for drivers that join it."""
    token_path = root / "auth_token"
    token_path.write_text(os.urandom(32).hex())
    token_path.chmod(0o600)
    return {
        **os.environ,
        # Ray 2.60 replaces 127.0.0.1 in a node address, and in the address
        # given to ray.init, with the machine's routable address, and its
        # servers then listen on all interfaces. This switch keeps nodes and
        # drivers on 127.0.0.1. `ray start` rejects it for worker nodes, so
        # the nodes are started through ray.cluster_utils instead.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Sessions and the ray_current_cluster file stay in `root`, so a
        # plain ray.init() elsewhere on this machine does not join this cluster.
        "RAY_TMPDIR": str(root),
        # The cluster's own token, so nothing in ~/.ray is read or written.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A Ray cluster of a head and a worker node, 1 CPU each, on 127.0.0.1."""
    # Short path: Ray's Unix sockets live below it, within the path length limit.
    root = Path(tempfile.mkdtemp(prefix="ray"))
    try:
        env = _ray_env(root)
        head_args = {
            **_ray_node_args(),
            "gcs_server_port": free_port(),
            "include_dashboard": False,
        }
        started_path = root / "started.json"
        log_path = root / "cluster.log"
        command = [
            sys.executable,
            "-c",
            RAY_CLUSTER_SCRIPT,
            json.dumps(head_args),
            json.dumps(_ray_node_args()),
            str(started_path),
        ]

        process = _start_process_group(command, log_path, env)
        try:
            if not _wait_until(
                lambda: _has_exited(process) or started_path.exists(),
                START_TIMEOUT_SEC,
            ):
                pytest.fail(
                    f"the Ray cluster did not start within {START_TIMEOUT_SEC} s; "
                    f"its log:\n{_log_tail(log_path)}"
                )
            if _has_exited(process):
                pytest.fail(
                    f"the Ray cluster exited at start; its log:\n{_log_tail(log_path)}"
                )
            started = json.loads(started_path.read_text())
            yield RayCluster(
                address=started["address"],
                node_ids=started["node_ids"],
                env=env,
                process=process,
            )
        finally:
            stop_process_group(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)
