"""Where a study's results live: MLflow and Optuna stores, Ray results, exports."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def artifact_root(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"

    @property
    def exports(self) -> Path:
        return self.root / "exports"
