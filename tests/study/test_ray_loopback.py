"""The local Ray that `study run` starts must listen on 127.0.0.1 only.

A child process imports ray before the study code, as the CLI does. It starts
the local Ray through `study.runner._start_ray` and runs one task. Then it
reads from /proc the TCP sockets that it and its descendants (GCS server,
raylet, workers) listen on.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc"
)

REPO = Path(__file__).resolve().parents[2]

LISTENER_SCRIPT = textwrap.dedent(
    """
    import json, os
    from pathlib import Path

    import ray  # first, so Ray reads its settings before the study code runs

    from study.runner import _start_ray

    LISTEN = "0A"


    def descendants(root):
        children = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, pending = [], [root]
        while pending:
            pid = pending.pop()
            found.append(pid)
            pending.extend(children.get(pid, []))
        return found


    def socket_inodes(pid):
        inodes = set()
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
        return inodes


    def decode(address, family):
        host, port = address.split(":")
        raw = bytes.fromhex(host)
        if family == "tcp":
            ip = ".".join(str(b) for b in raw[::-1])
        else:
            words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
            ip = b"".join(words).hex()
        return ip, int(port, 16)


    started = _start_ray(None)


    @ray.remote
    def one():
        return 1


    assert ray.get(one.remote()) == 1
    inodes = {}
    for pid in descendants(os.getpid()):
        for inode in socket_inodes(pid):
            inodes[inode] = pid
    listening = []
    for family in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{family}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                ip, port = decode(fields[1], family)
                listening.append([family, ip, port, inodes[fields[9]]])
    ray.shutdown()
    print(json.dumps({"started": started, "listening": listening}))
    """
)

IPV4_LOOPBACK = "127.0.0.1"
# ::1, and ::ffff:127.0.0.1 (an IPv4 loopback socket opened as IPv6), as the
# hex of /proc/net/tcp6.
IPV6_LOOPBACK = {
    "00000000000000000000000000000001",
    "00000000000000000000ffff7f000001",
}


def _run_ray_script(script: str) -> dict:
    """Run `script` in a child Python and return the JSON its last line prints."""
    # A short new temp dir keeps this Ray apart from any other on the machine,
    # and keeps its Unix socket paths within the 107-byte limit.
    ray_tmpdir = tempfile.mkdtemp(prefix="ray")
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
    }
    environment.update({"RAY_TMPDIR": ray_tmpdir, "PYTHONPATH": str(REPO)})
    try:
        completed = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
            check=False,
        )
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)

    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_local_ray_listens_on_loopback_only():
    report = _run_ray_script(LISTENER_SCRIPT)
    assert report["started"] is True
    assert report["listening"], "found no listening socket of the Ray processes"
    exposed = [
        entry
        for entry in report["listening"]
        if not (
            (entry[0] == "tcp" and entry[1] == IPV4_LOOPBACK)
            or (entry[0] == "tcp6" and entry[1] in IPV6_LOOPBACK)
        )
    ]
    assert exposed == [], f"sockets not on loopback (family, ip, port, pid): {exposed}"


SIGTERM_DURING_INIT_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, threading

    import ray

    from study.cli import SigtermAsInterrupt
    from study.runner import _start_ray

    outcome = "returned"
    with SigtermAsInterrupt() as sigterm:
        # ray.init takes seconds; Ray's own handler would be set within the
        # first milliseconds.
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        try:
            _start_ray(None)
        except KeyboardInterrupt:
            outcome = "interrupted"
    print(json.dumps({
        "outcome": outcome,
        "initialized": ray.is_initialized(),
        "received": sigterm.received,
    }))
    ray.shutdown()
    """
)


def test_sigterm_during_ray_start_reaches_caller():
    """A SIGTERM while ray.init runs reaches the CLI's handler afterwards,
    instead of Ray's handler ending the driver with status 15."""
    report = _run_ray_script(SIGTERM_DURING_INIT_SCRIPT)

    assert report["received"] is True
    assert report["outcome"] == "interrupted"
    # The signal was held until ray.init returned, so Ray is up to shut down.
    assert report["initialized"] is True
