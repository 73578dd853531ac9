"""The workspace of a study: MLflow and Optuna stores, Ray results, exports."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
import sqlalchemy.exc

from study.invocation import command_name
from study.spec import StudyFileError

logger = logging.getLogger("study")

DEFAULT_DATA_CACHE = Path("~/.cache/gradpower-study")
# Contains the workspace id, which MLflow parent runs carry in their
# `workspace_id` tag, and the folder the workspace was last opened at.
IDENTITY_FILE = "workspace.json"
ARTIFACT_FOLDER = "mlartifacts"


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then raise them again.

    For steps that must not stop halfway. MLflow creates a new tracking
    store's tables in several migrations, and an interrupt between two of them
    left a database that no later command could open.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = (signal.SIGINT, signal.SIGTERM)
    handlers = {number: signal.getsignal(number) for number in numbers}
    pending: list[int] = []
    for number in numbers:
        signal.signal(number, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in dict.fromkeys(pending):
            signal.raise_signal(number)


def open_tracking_client(uri: str):
    """Return an MLflow client of the tracking store at `uri` after one query,
    which creates a new store's tables.

    Raises StudyFileError with the fix when the schema cannot be read or
    created.
    """
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - MLflow and SQLAlchemy raise several types
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        # MLflow's own advice follows its first sentence, and the message below
        # gives that fix.
        reason = reason.split(". ")[0].rstrip(".")
        raise StudyFileError(
            f"MLflow tracking store {uri} cannot be opened ({reason}). If a "
            "command was stopped while it created the store and no run is "
            "recorded yet, delete the file and run again. If it contains runs "
            f"of an older MLflow, upgrade it with `mlflow db upgrade {uri}`"
        ) from None
    return client


@dataclass(frozen=True)
class Workspace:
    root: Path
    tracking_uri: str
    optuna_storage: str
    data_cache: Path
    """Token shards and image folders, shared by every workspace of this user."""

    @classmethod
    def open(
        cls,
        root: str | Path,
        tracking_uri: str | None = None,
        optuna_storage: str | None = None,
        data_cache: str | Path | None = None,
        create: bool = True,
    ) -> Workspace:
        """Resolve the workspace; with `create`, make it and check it is writable."""
        path = Path(root).expanduser().resolve()
        cache = Path(data_cache or DEFAULT_DATA_CACHE).expanduser().resolve()
        if cache.exists() and not cache.is_dir():
            raise StudyFileError(
                f"Data cache {cache} is not a directory; pass a directory with "
                "--data-cache DIR"
            )
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StudyFileError(
                    f"Cannot create workspace {path}: {error.strerror}; "
                    "pass a writable directory with --workspace DIR"
                ) from None
            if not os.access(path, os.W_OK | os.X_OK):
                raise StudyFileError(
                    f"Workspace {path} is not writable; "
                    "pass a writable directory with --workspace DIR"
                )
        elif path.exists() and not path.is_dir():
            raise StudyFileError(
                f"Workspace {path} is not a directory; pass the directory that "
                f"`{command_name()} run` wrote to with --workspace DIR"
            )
        elif not path.is_dir():
            raise StudyFileError(
                f"Workspace {path} does not exist; pass the directory that "
                f"`{command_name()} run` wrote to with --workspace DIR"
            )
        workspace = cls(
            root=path,
            tracking_uri=tracking_uri or _sqlite_uri(path / "mlflow.db"),
            optuna_storage=optuna_storage or _sqlite_uri(path / "optuna.db"),
            data_cache=cache,
        )
        _check_sqlite_file(
            workspace.tracking_uri, "MLflow tracking store", tracking_uri
        )
        _check_sqlite_file(workspace.optuna_storage, "Optuna storage", optuna_storage)
        return workspace

    def remove_if_unused(self, study: str, scale: str) -> None:
        """Remove the workspace folder when it contains only this run's lock
        file, as after a command that created it and then stopped before
        recording anything. Call it while holding that lock."""
        lock = self._run_lock_path(study, scale)
        try:
            if [entry.name for entry in self.root.iterdir()] != [lock.name]:
                return
            lock.unlink()
            self.root.rmdir()
        except OSError as error:
            logger.debug("workspace %s not removed: %s", self.root, error)

    @contextlib.contextmanager
    def store_setup_lock(self) -> Iterator[None]:
        """Hold an exclusive lock while creating the stores' tables.

        Two `study run` processes that open a new workspace at the same moment
        would otherwise both run MLflow's and Optuna's schema creation on the
        same sqlite files, and one fails with "table already exists".
        """
        with (self.root / ".stores.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _run_lock_path(self, study: str, scale: str) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{study}-{scale}")
        return self.root / f".run-{name}.lock"

    @contextlib.contextmanager
    def run_lock(self, study: str, scale: str) -> Iterator[None]:
        """Hold this workspace's lock on one study and scale while it runs.

        Two drivers of the same study and scale in one workspace would both
        continue its unfinished Ray Tune experiment and record its trials
        twice. The lock goes when the process ends, also by SIGKILL, so a
        killed run leaves nothing to clean up.
        """
        path = self._run_lock_path(study, scale)
        with path.open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise StudyFileError(
                    f"Another `{command_name()} run` or `resume` of {study} "
                    f"({scale}) is running in workspace {self.root} (process "
                    f"{holder}); wait for it to stop, or pass another --workspace"
                ) from None
            try:
                handle.truncate(0)
                handle.write(f"{os.getpid()}\n")
                handle.flush()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def open_stores(self):
        """Return an MLflow client after creating both stores' tables under
        `store_setup_lock`.

        It also writes the workspace's id file and, where the workspace was
        moved or copied since it recorded its runs, points the artifact
        locations of its own tracking store at this folder.
        """
        from study.recording import open_optuna_storage

        with self.store_setup_lock(), signals_deferred():
            self._update_identity()
            client = open_tracking_client(self.tracking_uri)
            open_optuna_storage(self.optuna_storage)
            self._relocate_artifacts()
        return client

    def require_recorded(self) -> None:
        """Fail, creating nothing, when the workspace's own sqlite stores are missing."""
        for uri in (self.tracking_uri, self.optuna_storage):
            if (
                uri.startswith("sqlite:///")
                and not Path(uri[len("sqlite:///") :]).exists()
            ):
                raise StudyFileError(
                    f"Workspace {self.root} contains no recorded runs "
                    f"({uri[len('sqlite:///') :]} does not exist); run "
                    f"`{command_name()} run` first or pass the right --workspace"
                )

    def require_writable(self, command: str) -> None:
        """Fail, writing nothing, when `command` cannot write to the workspace.

        The folder and, where they exist, exports/ and mlartifacts/ must be
        writable: `resume` records trials, and `export-table` and `report`
        write under exports/ and log the files under mlartifacts/.
        """
        folders = [self.root, self.exports, self.artifact_root]
        for folder in folders:
            if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                raise StudyFileError(
                    f"Workspace {self.root} is not writable ({folder}), and "
                    f"`{command}` writes to it; make it writable, or copy the "
                    "workspace to a writable folder and pass that with "
                    "--workspace DIR"
                )

    def relocate_artifacts(self) -> None:
        """Point the artifact locations of the workspace's own tracking store at
        this folder's mlartifacts/ (see `_relocate_artifacts`).

        It takes the store lock only when a location must change, so a
        read-only workspace that was not moved stays readable.
        """
        if self._tracking_database() is None:
            return
        with self._tracking_connection() as connection:
            if not _stale_artifact_locations(connection, self.artifact_root.as_uri()):
                return
        with self.store_setup_lock():
            self._relocate_artifacts()

    @property
    def owns_stores(self) -> bool:
        """Whether both stores are the workspace's own sqlite files, which no
        other workspace writes to."""
        return self.tracking_uri == _sqlite_uri(
            self.root / "mlflow.db"
        ) and self.optuna_storage == _sqlite_uri(self.root / "optuna.db")

    def read_id(self) -> str | None:
        """Return the id in the workspace's id file, or None before
        `open_stores` wrote it."""
        identity = _read_identity(self.root / IDENTITY_FILE)
        return identity["id"] if identity else None

    def _update_identity(self) -> None:
        """Create the id file, or record this folder in it. Call it under
        `store_setup_lock`.

        The id moves with the folder. A folder whose id file names another
        existing folder with the same id is a copy of that folder, so it gets a
        new id: runs that the original recorded in shared stores stay the
        original's.
        """
        path = self.root / IDENTITY_FILE
        identity = _read_identity(path)
        if identity is None:
            _write_identity(path, uuid.uuid4().hex, self.root)
            return
        recorded_root = Path(identity["root"])
        if recorded_root == self.root:
            return
        if _is_copy_of(self.root, recorded_root, identity["id"]):
            logger.info(
                "workspace %s is a copy of %s; it gets its own id, and runs that "
                "%s recorded in shared stores stay with it",
                self.root,
                recorded_root,
                recorded_root,
            )
            _write_identity(path, uuid.uuid4().hex, self.root)
            return
        logger.info("workspace moved from %s to %s", recorded_root, self.root)
        _write_identity(path, identity["id"], self.root)

    def _relocate_artifacts(self) -> None:
        """Rewrite artifact locations that name another folder's mlartifacts/.
        Call it under `store_setup_lock`.

        MLflow stores each experiment's artifact location and each run's
        artifact URI as absolute file URIs, and has no API to change them.
        `study run` creates every experiment of the workspace's own store with
        WORKSPACE/mlartifacts, so a location that ends in another folder's
        mlartifacts is this workspace's from before a move or copy. Without the
        rewrite, logging exports would write into the old folder, which after
        a copy is the other workspace's.
        """
        if self._tracking_database() is None:
            return
        new_location = self.artifact_root.as_uri()
        with self._tracking_connection() as connection:
            for old_location in _stale_artifact_locations(connection, new_location):
                _replace_location(connection, old_location, new_location)
                logger.info(
                    "MLflow artifact location %s is now %s",
                    old_location,
                    new_location,
                )

    def _tracking_database(self) -> Path | None:
        """Return the workspace's own MLflow sqlite file, or None where the
        tracking store is elsewhere or not created yet."""
        database = self.root / "mlflow.db"
        if self.tracking_uri != _sqlite_uri(database) or not database.exists():
            return None
        return database

    @contextlib.contextmanager
    def _tracking_connection(self) -> Iterator[sqlalchemy.Connection]:
        """Open one transaction on the workspace's own MLflow sqlite file."""
        engine = sqlalchemy.create_engine(
            self.tracking_uri, connect_args={"timeout": 60}
        )
        try:
            with engine.begin() as connection:
                yield connection
        finally:
            engine.dispose()

    @property
    def artifact_root(self) -> Path:
        return self.root / ARTIFACT_FOLDER

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"

    @property
    def exports(self) -> Path:
        return self.root / "exports"


def check_data_cache_writable(data_cache: str | Path | None) -> None:
    """Fail, leaving nothing behind, when the data cache cannot be created or written.

    Besides the permission bits, it creates and removes a probe folder in the
    cache or its nearest existing parent, because root passes every access check
    but still cannot create folders in places such as /proc.
    """
    cache = Path(data_cache or DEFAULT_DATA_CACHE).expanduser().resolve()
    existing = cache
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StudyFileError(
            f"Data cache {cache} cannot be created because {existing} is not a "
            "directory; pass a directory with --data-cache DIR"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudyFileError(
            f"Data cache {cache} is not writable ({existing}); token shards and "
            "image folders are prepared there, so pass a writable directory with "
            "--data-cache DIR"
        )
    _probe_folder(cache, existing)


def _probe_folder(cache: Path, existing: Path) -> None:
    """Create and remove a folder in `existing`, raising StudyFileError naming
    the data cache when that fails."""
    try:
        probe = tempfile.mkdtemp(prefix=".write-check-", dir=existing)
    except OSError as error:
        problem = "is not writable" if existing == cache else "cannot be created"
        raise StudyFileError(
            f"Data cache {cache} {problem}: creating a folder in {existing} failed "
            f"with {error.strerror}. Token shards and image folders are prepared "
            "there, so pass a writable directory with --data-cache DIR"
        ) from None
    os.rmdir(probe)


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def _read_identity(path: Path) -> dict | None:
    """Return the id file's {"id", "root"}, or None where it does not exist."""
    try:
        identity = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise StudyFileError(
            f"Workspace id file {path} cannot be read ({error}); restore it from "
            "a backup, or delete it to give the workspace a new id"
        ) from None
    if not (
        isinstance(identity, dict)
        and isinstance(identity.get("id"), str)
        and isinstance(identity.get("root"), str)
    ):
        raise StudyFileError(
            f"Workspace id file {path} is invalid (expected the keys id and root); "
            "restore it from a backup, or delete it to give the workspace a new id"
        )
    return identity


def _write_identity(path: Path, workspace_id: str, root: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"id": workspace_id, "root": str(root)}) + "\n")
    os.replace(partial, path)


def _is_copy_of(root: Path, recorded_root: Path, workspace_id: str) -> bool:
    """Return whether `recorded_root` is another folder whose id file contains
    `workspace_id`, which makes `root` a copy of it.

    A `recorded_root` that no longer exists, is the same folder under another
    path, or contains another id means that the workspace was moved.
    """
    # NOTE: a copy opened only after its original was moved or deleted counts
    # as moved, and keeps the original's id.
    try:
        if os.path.samefile(root, recorded_root):
            return False
        other = _read_identity(recorded_root / IDENTITY_FILE)
    except (OSError, StudyFileError):
        return False
    return other is not None and other["id"] == workspace_id


def _stale_artifact_locations(connection, new_location: str) -> list[str]:
    """Return the experiments' artifact locations that are another folder's
    mlartifacts/, in the tracking store open on `connection`."""
    locations = connection.execute(
        sqlalchemy.text("SELECT artifact_location FROM experiments")
    ).scalars()
    return sorted(
        {
            location.rstrip("/")
            for location in locations
            if location
            and location.startswith("file://")
            and location.rstrip("/").endswith(f"/{ARTIFACT_FOLDER}")
            and location.rstrip("/") != new_location
        }
    )


def _replace_location(connection, old_location: str, new_location: str) -> None:
    """Replace `old_location` with `new_location` as the artifact location of
    experiments and as the prefix of their runs' artifact URIs."""
    prefix = old_location + "/"
    connection.execute(
        sqlalchemy.text(
            "UPDATE runs SET artifact_uri = :new || substr(artifact_uri, :start) "
            "WHERE substr(artifact_uri, 1, :length) = :prefix"
        ),
        {
            "new": new_location + "/",
            "start": len(prefix) + 1,
            "length": len(prefix),
            "prefix": prefix,
        },
    )
    connection.execute(
        sqlalchemy.text(
            "UPDATE experiments SET artifact_location = :new "
            "WHERE artifact_location IN (:old, :prefix)"
        ),
        {"new": new_location, "old": old_location, "prefix": prefix},
    )


STORE_CHECK_TIMEOUT_SEC = 10
# The first 16 bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"


TRACKING_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql", "mysql", "mssql")


def _sqlite_file(url: str) -> Path | None:
    """Return the database file of an sqlite URL (relative paths are relative to
    the working directory), or None for other databases and in-memory sqlite."""
    if not url.startswith("sqlite"):
        return None
    try:
        database = sqlalchemy.engine.make_url(url).database
    except sqlalchemy.exc.ArgumentError:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _check_sqlite_file(url: str, store: str, option_value: str | None) -> None:
    """Fail when the sqlite file of `url` exists but is no SQLite database, or
    when it does not exist and its folder cannot take it. `option_value` is the
    URL as given on the command line, or None for the workspace's own file."""
    path = _sqlite_file(url)
    if path is None:
        return
    option = "--tracking-uri" if store.startswith("MLflow") else "--optuna-storage"
    fix = (
        f"pass another {option}"
        if option_value
        else "pass another folder with --workspace DIR"
    )

    if path.exists():
        if not path.is_file():
            raise StudyFileError(f"{store} {path} is not a file; {fix}")
        try:
            with path.open("rb") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as error:
            raise StudyFileError(
                f"{store} {path} cannot be read ({error.strerror}); {fix}"
            ) from None
        # SQLite writes an empty file's header on its first write.
        if header and header != SQLITE_HEADER:
            raise StudyFileError(
                f"{store} {path} is not an SQLite database; restore it from a "
                f"backup or move it away, or {fix}"
            )
        return

    if option_value is None:
        # The workspace's own files go into the workspace folder, which
        # `Workspace.open` checks.
        return
    folder = path.parent
    if not folder.is_dir():
        raise StudyFileError(
            f"{option} {option_value}: folder {folder} does not exist; create it "
            f"or pass another {option}"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StudyFileError(
            f"{option} {option_value}: folder {folder} is not writable, so the "
            f"database cannot be created there; pass another {option}"
        )


def _check_tracking_uri(uri: str) -> None:
    if not uri.startswith(TRACKING_SCHEMES):
        raise StudyFileError(
            f"--tracking-uri {uri!r} is not supported; pass an MLflow tracking "
            "server (http://host:port) or a database URI such as sqlite:///path.db"
        )
    _check_sqlite_file(uri, "MLflow tracking store", uri)
    if uri.startswith("sqlite"):
        return
    if not uri.startswith(("http://", "https://")):
        _check_database(uri, "MLflow tracking store", "--tracking-uri")
        return
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(
        parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
        .geturl()
        .rstrip("/")
        + "/health"
    )
    shown = uri
    if parts.username is not None:
        # MLflow passes credentials in the URI as basic authentication.
        token = base64.b64encode(
            f"{parts.username}:{parts.password or ''}".encode()
        ).decode()
        request.add_header("Authorization", f"Basic {token}")
        shown = uri.replace(f":{parts.password}@", ":***@") if parts.password else uri
    try:
        with urllib.request.urlopen(request, timeout=STORE_CHECK_TIMEOUT_SEC):
            return
    except urllib.error.HTTPError as error:
        # The server responded, so it is reachable. An MLflow server returns
        # 200 at /health, also with basic-auth on.
        raise StudyFileError(
            f"--tracking-uri {shown} responded with HTTP {error.code} "
            f"({error.reason}) at /health, so it is not an MLflow tracking server; "
            "pass the URL of "
            "one (`mlflow server --host 127.0.0.1 --port PORT` starts one)"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StudyFileError(
            f"MLflow tracking server {shown} cannot be reached ({reason}); start it "
            "(`mlflow server --host 127.0.0.1 --port PORT`) or pass another "
            "--tracking-uri"
        ) from None


# Seconds that a database server gets to accept a connection.
DATABASE_PROBE_TIMEOUT_SEC = 10


def _check_optuna_storage(url: str) -> None:
    if url.startswith("sqlite"):
        _check_sqlite_file(url, "Optuna storage", url)
        return
    _check_database(url, "Optuna storage", "--optuna-storage")


def _check_database(url: str, store: str, option: str) -> None:
    """Connect to the database at `url` once, giving up after
    DATABASE_PROBE_TIMEOUT_SEC, and raise StudyFileError naming `store` and
    `option` when that fails."""
    try:
        display_url = sqlalchemy.engine.make_url(url).render_as_string(
            hide_password=True
        )
    except (sqlalchemy.exc.ArgumentError, ValueError):
        # A port that is not a number raises ValueError.
        display_url = url
    try:
        engine = sqlalchemy.create_engine(url)
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError):
        raise StudyFileError(
            f"{store} URL {display_url!r} is invalid; pass a URL such as "
            f"postgresql+psycopg2://user@host:5432/db with {option}"
        ) from None
    except ModuleNotFoundError as error:
        raise StudyFileError(
            f"{store} {display_url!r} needs the database driver module "
            f"{error.name!r}; install it (`pip install 'gradpower-study[postgres]'` "
            "provides psycopg2 for postgresql+psycopg2:// URLs)"
        ) from None
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            with engine.connect():
                pass
        except Exception as error:  # noqa: BLE001 - reported by the caller
            errors.append(error)

    # A server that accepts the TCP connection and never responds would block
    # the driver without a timeout, also against Ctrl-C and SIGTERM, so the
    # connection is made in a thread that the driver stops waiting for.
    probe = threading.Thread(target=connect, name="database-probe", daemon=True)
    probe.start()
    probe.join(DATABASE_PROBE_TIMEOUT_SEC)
    if probe.is_alive():
        raise StudyFileError(
            f"{store} {display_url} accepted no database connection within "
            f"{DATABASE_PROBE_TIMEOUT_SEC} s; check that a database server listens "
            f"there, or pass another {option}"
        )
    engine.dispose()
    if errors:
        error = errors[0]
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        raise StudyFileError(
            f"{store} {display_url} cannot be reached ({reason}); start the "
            f"database or pass another {option}"
        )


RAY_ADDRESS_FORMS = (
    "HOST:PORT of the Ray head node's GCS server (for example 127.0.0.1:6379), "
    "auto, or ray://HOST:PORT for Ray Client; leave the option out to start a "
    "local Ray"
)
# Ray's GCS server is a gRPC server, so it speaks HTTP/2 and responds to a
# client's connection preface with a SETTINGS frame (RFC 9113, section 3.4).
HTTP2_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_EMPTY_SETTINGS_FRAME = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_FRAME_HEADER_BYTES = 9
HTTP2_SETTINGS_TYPE = 4
RAY_PROBE_TIMEOUT_SEC = 10


def _parse_host_port(text: str) -> tuple[str, int] | None:
    """Return (host, port) of HOST:PORT or [IPv6]:PORT, or None when `text` is
    not of that form or the port is outside 1..65535."""
    host, separator, port = text.rpartition(":")
    if not separator or not host or not re.fullmatch(r"[0-9]{1,5}", port):
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None
    if not host or re.search(r"[\s/@\[\]]", host):
        return None
    number = int(port)
    if not 1 <= number <= 65535:
        return None
    return host, number


def _read_exactly(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _check_ray_address(address: str) -> None:
    """Fail fast on an invalid address, or on a host:port where nothing listens
    or a server that is not Ray's GCS server responds.

    `auto` and ray:// (Ray Client) addresses are left to Ray after the format
    check. Without this probe, `ray.init` retries a server that is not Ray's
    GCS without end.
    """
    if address == "auto":
        return
    if address.startswith("ray://"):
        if _parse_host_port(address[len("ray://") :].rstrip("/")) is None:
            raise StudyFileError(
                f"--ray-address {address!r} is invalid; pass {RAY_ADDRESS_FORMS}"
            )
        return
    parsed = _parse_host_port(address)
    if parsed is None:
        raise StudyFileError(
            f"--ray-address {address!r} is invalid; pass {RAY_ADDRESS_FORMS}"
        )
    try:
        connection = socket.create_connection(parsed, timeout=STORE_CHECK_TIMEOUT_SEC)
    except OSError as error:
        raise StudyFileError(
            f"No Ray cluster is reachable at --ray-address {address} ({error}); start "
            "one with `ray start --head` or leave the option out to run locally"
        ) from None
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            # NOTE: a TLS GCS server expects a TLS handshake first, so the
            # plain HTTP/2 probe below would fail; only the TCP connect is checked.
            return
        connection.settimeout(RAY_PROBE_TIMEOUT_SEC)
        try:
            connection.sendall(HTTP2_CLIENT_PREFACE + HTTP2_EMPTY_SETTINGS_FRAME)
            header = _read_exactly(connection, HTTP2_FRAME_HEADER_BYTES)
        except TimeoutError:
            reason = f"it sent nothing within {RAY_PROBE_TIMEOUT_SEC} s"
        except OSError as error:
            reason = f"the connection failed: {error.strerror or error}"
        else:
            if (
                len(header) == HTTP2_FRAME_HEADER_BYTES
                and header[3] == HTTP2_SETTINGS_TYPE
            ):
                return
            reason = (
                "it closed the connection"
                if not header
                else "it responded, but not with HTTP/2 as a gRPC server does"
            )
    raise StudyFileError(
        f"--ray-address {address} accepts connections but is not a Ray GCS server "
        f"({reason}); pass the address that `ray start --head` printed (port 6379 "
        "by default) or leave the option out to run locally"
    )


def check_stores(
    tracking_uri: str | None,
    optuna_storage: str | None,
    ray_address: str | None = None,
) -> None:
    """Fail before anything is written when a remote tracking server, database
    or Ray cluster is down; None means the workspace's own files or a local Ray."""
    if tracking_uri:
        _check_tracking_uri(tracking_uri)
    if optuna_storage:
        _check_optuna_storage(optuna_storage)
    if ray_address:
        _check_ray_address(ray_address)
