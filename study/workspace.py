"""The workspace of a study: MLflow and Optuna stores, Ray results, exports."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
import sqlalchemy.exc

from study.spec import StudyFileError

DEFAULT_DATA_CACHE = Path("~/.cache/gradpower-study")


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
        elif not path.is_dir():
            raise StudyFileError(
                f"Workspace {path} does not exist; pass the directory that "
                "`study run` wrote to with --workspace DIR"
            )
        return cls(
            root=path,
            tracking_uri=tracking_uri or f"sqlite:///{path / 'mlflow.db'}",
            optuna_storage=optuna_storage or f"sqlite:///{path / 'optuna.db'}",
            data_cache=cache,
        )

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

    def open_stores(self):
        """Return an MLflow client after creating both stores' tables under
        `store_setup_lock`."""
        from mlflow.tracking import MlflowClient

        from study.recording import open_optuna_storage

        with self.store_setup_lock():
            client = MlflowClient(tracking_uri=self.tracking_uri)
            client.search_experiments(max_results=1)
            open_optuna_storage(self.optuna_storage)
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
                    f"({uri[len('sqlite:///') :]} does not exist); run `study run` "
                    "first or pass the right --workspace"
                )

    @property
    def artifact_root(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"

    @property
    def exports(self) -> Path:
        return self.root / "exports"


STORE_CHECK_TIMEOUT_SEC = 10


TRACKING_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql", "mysql", "mssql")


def _check_tracking_uri(uri: str) -> None:
    if not uri.startswith(TRACKING_SCHEMES):
        raise StudyFileError(
            f"--tracking-uri {uri!r} is not supported; pass an MLflow tracking "
            "server (http://host:port) or a database URI such as sqlite:///path.db"
        )
    if not uri.startswith(("http://", "https://")):
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
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StudyFileError(
            f"MLflow tracking server {shown} cannot be reached ({reason}); start it "
            "(`mlflow server --host 127.0.0.1 --port PORT`) or pass another "
            "--tracking-uri"
        ) from None


def _check_optuna_storage(url: str) -> None:
    if url.startswith("sqlite"):
        return
    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        shown = "<unparsable URL>"
    try:
        engine = sqlalchemy.create_engine(url)
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError):
        raise StudyFileError(
            f"Optuna storage URL {shown!r} is invalid; pass a URL such as "
            "postgresql+psycopg2://user@host:5432/db with --optuna-storage"
        ) from None
    except ModuleNotFoundError as error:
        raise StudyFileError(
            f"Optuna storage {shown!r} needs the database driver module "
            f"{error.name!r}; install it (`pip install 'gradpower-study[postgres]'` "
            "provides psycopg2 for postgresql+psycopg2:// URLs)"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        raise StudyFileError(
            f"Optuna storage {shown} cannot be reached ({reason}); start the "
            "database or pass another --optuna-storage"
        ) from None
    finally:
        engine.dispose()


def _check_ray_address(address: str) -> None:
    """Fail fast on a host:port where no Ray head listens; `auto` and ray://
    addresses are left to Ray."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection(
            (host, int(port)), timeout=STORE_CHECK_TIMEOUT_SEC
        ):
            return
    except (OSError, ValueError) as error:
        raise StudyFileError(
            f"No Ray cluster is reachable at --ray-address {address} ({error}); start "
            "one with `ray start --head` or leave the option out to run locally"
        ) from None


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
