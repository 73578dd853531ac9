"""Feed the best lr_max of a recorded `lr_tune` run to another study (`--lr-from`).

Each training entry of the target study gets, for each of its batch sizes, the
best lr_max that the tuning run found for the same workload, model settings and
batch size. When several tuning entries match, the one with the same data
settings wins. The chosen rates replace the entry's lr_max grid, and the run
stores them in a tag of its MLflow parent run, so that `study resume` and a
continued `study run` reuse them without the option.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from study.recording import find_parent_run
from study.spec import (
    StudyFileError,
    StudySpec,
    WorkloadStudy,
    load_study,
    model_identity,
    training_entries,
)

# Tags of the MLflow parent run that record where the rates came from.
TRANSFER_TAG = "lr_from"
OVERRIDES_TAG = "lr_overrides"


@dataclass(frozen=True)
class LrTransfer:
    source: str
    """Name of the tuning study, run and scale that the rates come from."""
    overrides: dict[str, dict[int, float]]
    """lr_max per workload label and batch size."""

    def tags(self) -> dict[str, str]:
        payload = {
            label: {str(batch_size): rate for batch_size, rate in rates.items()}
            for label, rates in self.overrides.items()
        }
        return {
            TRANSFER_TAG: self.source,
            OVERRIDES_TAG: json.dumps(payload, sort_keys=True),
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> LrTransfer | None:
        if OVERRIDES_TAG not in tags:
            return None
        payload = json.loads(tags[OVERRIDES_TAG])
        overrides = {
            label: {int(batch_size): float(rate) for batch_size, rate in rates.items()}
            for label, rates in payload.items()
        }
        return cls(tags.get(TRANSFER_TAG, "an earlier --lr-from"), overrides)

    def describe(self) -> list[str]:
        lines = [f"lr_max from {self.source}:"]
        for label, rates in self.overrides.items():
            pairs = ", ".join(f"bs {bs}: {rate:g}" for bs, rate in rates.items())
            lines.append(f"  {label}: {pairs}")
        return lines


def _match(rates: list, label: str, entry: WorkloadStudy, batch_size: int):
    kind = entry.workload or label
    model = model_identity(kind, entry.model)
    matches = [
        rate
        for rate in rates
        if rate.workload == kind
        and model_identity(rate.workload, rate.model) == model
        and rate.batch_size == batch_size
    ]
    if len(matches) > 1:
        same_data = [rate for rate in matches if rate.data == dict(entry.data)]
        matches = same_data or matches
    return matches


def transfer_learning_rates(
    storage: str,
    lr_study: str,
    spec: StudySpec,
    scale: str,
    run_id: str | None = None,
) -> LrTransfer:
    """Find the tuned lr_max for every training entry and batch size of `spec`.

    Raises StudyFileError, naming the entry, model and batch size, when the
    tuning run has no rate for one of them or has several equally good matches.
    """
    from study.compare_analysis import analyze_lr_tune

    tuning = load_study(lr_study)
    if tuning.analysis != "lr_tune":
        raise StudyFileError(
            f"--lr-from {lr_study}: study {tuning.name!r} is not an lr_tune study"
        )
    analysis = analyze_lr_tune(storage, tuning.name, scale, run_id)
    chosen_run = analysis.run_id
    planned = sum(entry.grid.size() for entry in tuning.scale(scale).workloads.values())
    recorded = len(analysis.trials)
    if recorded < planned:
        raise StudyFileError(
            f"--lr-from {tuning.name}: run {chosen_run} ({scale}) has recorded "
            f"{recorded} of its {planned} trials, so its best rates may be wrong; "
            f"finish it with `study resume {tuning.name} --scale {scale}`, or pass "
            "a finished run with --lr-from-run"
        )
    rates = analysis.best
    overrides: dict[str, dict[int, float]] = {}
    for label, entry in training_entries(spec.scale(scale)).items():
        overrides[label] = {}
        for batch_size in entry.grid.batch_size:
            matches = _match(rates, label, entry, batch_size)
            if len(matches) == 1:
                overrides[label][batch_size] = float(matches[0].lr_max)
                continue
            available = sorted(
                {
                    (json.dumps(rate.model, sort_keys=True), rate.batch_size)
                    for rate in rates
                }
            )
            problem = "several equally close entries" if matches else "no best lr_max"
            raise StudyFileError(
                f"--lr-from {tuning.name}: run {chosen_run} ({scale}) has {problem} "
                f"for workload {label!r} (model {dict(entry.model)}, batch size "
                f"{batch_size}); it tuned (model, batch size) = {available}. Add "
                f"this model and batch size to {tuning.name}'s {scale} grid and run "
                "it, or run without --lr-from"
            )
    return LrTransfer(f"{tuning.name} run {chosen_run} ({scale})", overrides)


def apply_transfer(spec: StudySpec, scale: str, transfer: LrTransfer) -> StudySpec:
    """Return `spec` with each overridden entry's lr_max set to its tuned rates."""
    raw: dict[str, Any] = spec.model_dump(mode="python")
    workloads = raw["scales"][scale]["workloads"]
    for label, rates in transfer.overrides.items():
        if label not in workloads:
            raise StudyFileError(
                f"The learning rates from {transfer.source} name workload {label!r}, "
                f"which scale {scale!r} of {spec.name} does not have; start a new "
                "run with --fresh"
            )
        grid = workloads[label]["grid"]
        missing = sorted(set(grid["batch_size"]) - set(rates))
        if missing:
            raise StudyFileError(
                f"The learning rates from {transfer.source} lack batch sizes "
                f"{missing} of workload {label!r}; start a new run with --fresh"
            )
        grid["lr_max"] = {bs: [rates[bs]] for bs in grid["batch_size"]}
    return StudySpec.model_validate(raw)


def recorded_transfer(client, study: str, scale: str, run_id: str) -> LrTransfer | None:
    """Return the rates that run `run_id` of `study` took with --lr-from, if any."""
    parent = find_parent_run(client, study, scale, run_id)
    return None if parent is None else LrTransfer.from_tags(parent.data.tags)
