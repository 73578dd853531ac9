"""Where a study's results live: MLflow and Optuna stores, Ray results, exports."""

from __future__ import annotations

import contextlib
import fcntl
import os
import urllib.error
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
            data_cache=Path(data_cache or DEFAULT_DATA_CACHE).expanduser().resolve(),
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


def _check_tracking_uri(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=STORE_CHECK_TIMEOUT_SEC):
            return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StudyFileError(
            f"MLflow tracking server {uri} cannot be reached ({reason}); start it "
            "(`mlflow server --host 127.0.0.1 --port PORT`) or pass another "
            "--tracking-uri"
        ) from None


def _check_optuna_storage(url: str) -> None:
    if url.startswith("sqlite"):
        return
    try:
        engine = sqlalchemy.create_engine(url)
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as error:
        raise StudyFileError(
            f"Optuna storage URL {url!r} is invalid ({error}); pass a URL such as "
            "postgresql+psycopg2://user@host:5432/db with --optuna-storage"
        ) from None
    except ModuleNotFoundError as error:
        raise StudyFileError(
            f"Optuna storage {url!r} needs the database driver module {error.name!r}; "
            "install it (psycopg2-binary provides psycopg2, psycopg[binary] "
            "provides psycopg)"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        raise StudyFileError(
            f"Optuna storage {url} cannot be reached ({reason}); start the database "
            "or pass another --optuna-storage"
        ) from None
    finally:
        engine.dispose()


def check_stores(tracking_uri: str | None, optuna_storage: str | None) -> None:
    """Fail before anything is written when a remote tracking server or
    database is down; None means the workspace's own sqlite file."""
    if tracking_uri:
        _check_tracking_uri(tracking_uri)
    if optuna_storage:
        _check_optuna_storage(optuna_storage)
