"""Experiment creation when two drivers share one tracking store."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from study.recording import ensure_experiment


class FirstReadMissesClient(MlflowClient):
    """A client whose first lookup runs before another driver's create."""

    lookups = 0

    def get_experiment_by_name(self, name):
        self.lookups += 1
        if self.lookups == 1:
            return None
        return super().get_experiment_by_name(name)


def test_ensure_experiment_adopts_a_concurrent_create(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other_driver = MlflowClient(tracking_uri=uri)
    created = other_driver.create_experiment("power_sweep")

    late = FirstReadMissesClient(tracking_uri=uri)
    experiment_id = ensure_experiment(late, "power_sweep", None)

    assert experiment_id == created
    assert late.lookups == 2
    assert len(other_driver.search_experiments()) == 2  # Default and power_sweep


def test_ensure_experiment_creates_once(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    first = ensure_experiment(client, "lr_tune", None)
    second = ensure_experiment(client, "lr_tune", None)

    assert first == second
