"""Study files: the schema, loading and validation, all before Ray starts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    ValidationError,
    model_validator,
)

from trainers.schedules import SCHEDULES

SEARCH_SPACE_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
SCALES = ("smoke", "cpu", "paper")
# What a study's analysis measures. `power_trend` compares optimizer steps to a
# target between powers; `compare` and `lr_tune` train every trial for its
# whole budget and compare final validation losses.
ANALYSES = ("power_trend", "compare", "lr_tune")
GRID_AXIS_NAMES = ("batch_size", "power", "lr_max", "seed")
# Validation metrics each training workload reports, usable as targets.
TARGET_METRICS = {"lm": ("val/loss",), "vision": ("val/loss", "val/accuracy")}


class StudyFileError(ValueError):
    """A study file or CLI value that cannot run; the message names the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grid(Strict):
    """Axes of the grid; every combination is one trial."""

    batch_size: list[StrictInt] = Field(min_length=1)
    """Examples (sequences or images) per optimizer step."""

    power: list[float] = Field(min_length=1)
    """GradPower exponents; must contain 1.0, the Adam baseline."""

    lr_max: list[float] | dict[int, list[float]] = Field(min_length=1)
    """Peak learning rates: one list for every batch size, or a list per batch size."""

    seed: list[StrictInt] = Field(default=[0], min_length=1)

    @model_validator(mode="after")
    def _check_axes(self) -> Grid:
        for value in self.batch_size:
            if value <= 0:
                raise ValueError(
                    f"batch_size {value} is invalid; use a positive whole number"
                )
        for value in self.power:
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"power {value} is invalid; use a finite number > 0 "
                    "(1.0 is plain Adam, the paper's default is 1.2)"
                )
        if 1.0 not in self.power:
            raise ValueError(
                f"power {self.power} lacks 1.0; add 1.0, the Adam baseline that "
                "every other power is compared with"
            )
        for rates in self.lr_by_batch_size().values():
            for value in rates:
                if not math.isfinite(value) or value <= 0:
                    raise ValueError(f"lr_max {value} is invalid; use a number > 0")
        if isinstance(self.lr_max, dict):
            missing = sorted(set(self.batch_size) - set(self.lr_max))
            if missing:
                raise ValueError(
                    f"lr_max has no learning rates for batch sizes {missing}; "
                    "add an entry for each batch size or give one list for all"
                )
        return self

    def lr_by_batch_size(self) -> dict[int, list[float]]:
        if isinstance(self.lr_max, dict):
            return {
                bs: list(self.lr_max[bs]) for bs in self.batch_size if bs in self.lr_max
            }
        return {bs: list(self.lr_max) for bs in self.batch_size}

    def size(self) -> int:
        lrs = self.lr_by_batch_size()
        return (
            sum(len(lrs[bs]) for bs in self.batch_size)
            * len(self.power)
            * len(self.seed)
        )


class Training(Strict):
    """Fixed hyperparameters shared by every trial of one workload."""

    optimizer: Literal["adampower", "muonpower"] = "adampower"
    """`adampower`, or `muonpower`: Muon on the transformer weight matrices and
    AdamPower on embeddings, output layer, norms and biases."""
    blockwise_lr: bool = False
    """Per-block rates relative to the schedule: embedding x10, QK x8, FFN x6,
    VO x4, everything else x1 (adampower only)."""
    muon_momentum: float = Field(default=0.95, ge=0, lt=1)
    """Nesterov momentum of Muon under muonpower."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """`bf16` autocasts the forward pass; `fp16` also scales the loss."""
    schedule: str = "cos"
    warmup_steps: int = Field(default=0, ge=0)
    lr_min_ratio: float = Field(default=0.1, ge=0, le=1)
    """lr_min as a fraction of lr_max."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    clip_norm: float | None = Field(default=1.0, gt=0)
    micro_batch_size: int | None = Field(default=None, gt=0)
    """Examples per forward pass; must divide every batch size of the grid."""
    log_every_steps: int = Field(default=1, ge=1)
    device: str = "auto"
    inject_nan_loss_at_step: int | None = Field(default=None, ge=0)
    """Fault injection for tests: NaN training loss at this step."""

    @model_validator(mode="after")
    def _check_schedule(self) -> Training:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule {self.schedule!r} is unknown; choose one of {list(SCHEDULES)}"
            )
        if self.blockwise_lr and self.optimizer != "adampower":
            raise ValueError(
                f"blockwise_lr is defined for adampower, not {self.optimizer}; "
                "set optimizer: adampower or blockwise_lr: false"
            )
        return self


class Target(Strict):
    """When a trial counts as reached."""

    metric: str = "val/loss"
    value: float
    mode: Literal["min", "max"] = "min"


class Budget(Strict):
    steps: int = Field(gt=0)
    """Optimizer steps after which an unfinished trial ends as censored."""


class Resources(Strict):
    cpu: float = Field(default=1, gt=0)
    gpu: float = Field(default=0, ge=0)


class FaultInjection(Strict):
    """Make chosen trials diverge on purpose, to check how a study handles it."""

    nan_loss_at_step: int = Field(ge=0)
    """Replace the training loss with NaN at this optimizer step (0-based)."""
    only: dict[str, float] = Field(default_factory=dict)
    """Grid values a trial must have to be affected, e.g. {power: 1.4}; empty
    means every trial."""


class WorkloadStudy(Strict):
    """One workload's part of a scale: its grid, fixed settings and target."""

    workload: Literal["lm", "vision"] | None = None
    """Workload type; defaults to this entry's key in `workloads`."""
    model: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    grid: Grid
    train: Training = Training()
    target: Target | None = None
    """Stop a trial once it meets this; None trains every trial for the whole
    budget, as the final-loss analyses need."""
    budget: Budget
    setting: str | None = None
    """Row of the comparison table; entries that share a setting (for example
    with and without blockwise_lr) form one row. Defaults to the entry's key."""
    series: str | None = None
    """Entries that share a series (one per model size) form one
    loss-versus-parameters fit."""
    eval_every_steps: int = Field(default=10, ge=1)
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    """Save the whole training state this often; None restarts a crashed trial
    from step 0."""
    fault_injection: FaultInjection | None = None
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _check_fault_injection(self) -> WorkloadStudy:
        if self.fault_injection is not None:
            unknown = sorted(set(self.fault_injection.only) - set(GRID_AXIS_NAMES))
            if unknown:
                raise ValueError(
                    f"fault_injection.only names unknown axes {unknown}; "
                    f"use {list(GRID_AXIS_NAMES)}"
                )
        return self

    @model_validator(mode="after")
    def _check_micro_batch(self) -> WorkloadStudy:
        micro = self.train.micro_batch_size
        if micro is not None:
            bad = [bs for bs in self.grid.batch_size if bs % micro != 0]
            if bad:
                raise ValueError(
                    f"micro_batch_size {micro} does not divide batch sizes {bad}; "
                    "choose a micro-batch size that divides every batch size"
                )
        if self.train.warmup_steps > self.budget.steps:
            raise ValueError(
                f"warmup_steps {self.train.warmup_steps} exceeds the step budget "
                f"{self.budget.steps}; lower warmup_steps or raise budget.steps"
            )
        return self


class ToyGrid(Strict):
    """Axes of the toy noise model; every combination is one trial."""

    noise_ratio: list[float] = Field(min_length=1)
    """Noise-to-signal ratios sigma/mu of the uniform gradient distribution."""
    power: list[float] = Field(min_length=1)
    seed: list[int] = Field(default=[0], min_length=1)

    @model_validator(mode="after")
    def _check_axes(self) -> ToyGrid:
        for value in self.noise_ratio:
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"noise_ratio {value} is invalid; use a finite number > 0"
                )
        for value in self.power:
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"power {value} is invalid; use a finite number > 0")
        return self

    def size(self) -> int:
        return len(self.noise_ratio) * len(self.power) * len(self.seed)


class ToySimulation(Strict):
    """AdamPower on one-dimensional uniform gradients, as in the toy example."""

    steps: int = Field(default=10**6, ge=1)
    """The step t at which the update u_t is measured."""
    replicates: int = Field(default=256, ge=2)
    """Independent simulations averaged per trial."""
    mu: float = Field(default=1e-6, gt=0)
    """Mean gradient, the signal."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)


class ToyNoiseStudy(Strict):
    """A workload entry that simulates the toy noise model instead of training."""

    workload: Literal["toy_noise"]
    grid: ToyGrid
    simulation: ToySimulation = ToySimulation()
    resources: Resources = Resources()


def _entry_kind(entry: Any) -> str:
    workload = entry.get("workload") if isinstance(entry, dict) else entry.workload
    return ENTRY_TOY if workload == "toy_noise" else ENTRY_TRAINING


ENTRY_TOY = "<toy entry>"
ENTRY_TRAINING = "<training entry>"
# A workload entry is a training entry unless it sets `workload: toy_noise`.
WorkloadEntry = Annotated[
    Annotated[WorkloadStudy, Tag(ENTRY_TRAINING)]
    | Annotated[ToyNoiseStudy, Tag(ENTRY_TOY)],
    Discriminator(_entry_kind),
]


class Scale(Strict):
    description: str = ""
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    """Trials running at once; None lets the cluster's free resources decide."""
    max_failures: int = Field(default=2, ge=0)
    """Retries of a crashed trial, each from its latest checkpoint."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept per trial; older ones are deleted."""
    workloads: dict[str, WorkloadEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_workloads(self) -> Scale:
        for label, entry in self.workloads.items():
            if isinstance(entry, ToyNoiseStudy):
                continue
            kind = entry.workload or label
            if kind not in TARGET_METRICS:
                raise ValueError(
                    f"workload {label!r} has no type; name the entry lm or vision, "
                    f"or set `workload: lm|vision|toy_noise` in it"
                )
            if entry.target is None:
                continue
            if entry.target.metric not in TARGET_METRICS[kind]:
                raise ValueError(
                    f"target metric {entry.target.metric!r} of workload {label!r} is "
                    f"unknown; the {kind} workload reports {list(TARGET_METRICS[kind])}"
                )
        return self


class StudySpec(Strict):
    name: str
    description: str = ""
    analysis: Literal["power_trend", "compare", "lr_tune"] = "power_trend"
    """`power_trend`: steps to a target per batch size and power, and the best
    power's trend with batch size. `compare`: final validation loss per
    optimizer variant and setting, the gap to the p = 1 baseline and
    loss-versus-parameters fits. `lr_tune`: the best lr_max per model and
    batch size, which `study run --lr-from` feeds to other studies."""
    scales: dict[Literal["smoke", "cpu", "paper"], Scale] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_analysis_needs(self) -> StudySpec:
        for scale_name, scale in self.scales.items():
            for label, entry in scale.workloads.items():
                if isinstance(entry, ToyNoiseStudy):
                    continue
                where = f"scales.{scale_name}.workloads.{label}"
                if self.analysis == "power_trend" and entry.target is None:
                    raise ValueError(
                        f"{where} has no target; the power_trend analysis measures "
                        "steps to a target, so add `target: {metric: val/loss, "
                        "value: ...}` or set `analysis: compare` for final losses"
                    )
                if self.analysis != "power_trend" and entry.target is not None:
                    raise ValueError(
                        f"{where} sets a target, but the {self.analysis} analysis "
                        "compares final losses after the whole budget, and a "
                        "target would stop trials early; remove the target"
                    )
                if self.analysis == "lr_tune" and entry.grid.power != [1.0]:
                    raise ValueError(
                        f"{where}.grid.power is {entry.grid.power}; lr_tune tunes "
                        "the Adam baseline, so set `power: [1.0]`"
                    )
            if self.analysis == "compare":
                _check_settings(scale_name, scale)
                _check_series(scale_name, scale)
        return self

    def is_toy(self) -> bool:
        """True when the study simulates the toy noise model instead of training."""
        return any(
            isinstance(entry, ToyNoiseStudy)
            for scale in self.scales.values()
            for entry in scale.workloads.values()
        )

    def scale(self, name: str) -> Scale:
        if name not in self.scales:
            raise StudyFileError(
                f"Study {self.name!r} has no scale {name!r}; "
                f"choose one of {sorted(self.scales)}"
            )
        return self.scales[name]


def model_identity(workload: str, model: dict[str, Any]) -> dict[str, Any]:
    """Return model settings with the language model's default family filled in,
    so that `{preset: cpu}` and `{family: llama, preset: cpu}` compare equal."""
    if workload == "lm":
        return {"family": "llama", **model}
    return dict(model)


def training_entries(scale: Scale) -> dict[str, WorkloadStudy]:
    """Return the workload entries of a scale that train a model."""
    return {
        label: entry
        for label, entry in scale.workloads.items()
        if isinstance(entry, WorkloadStudy)
    }


def _check_settings(scale_name: str, scale: Scale) -> None:
    """Require a baseline entry (no blockwise_lr) per optimizer in every setting,
    because each gap is measured against that optimizer at p = 1.0."""
    entries = training_entries(scale)
    settings = sorted({entry.setting or label for label, entry in entries.items()})
    optimizers: dict[tuple[str, str], list[bool]] = {}
    for label, entry in entries.items():
        key = (entry.setting or label, entry.train.optimizer)
        optimizers.setdefault(key, []).append(entry.train.blockwise_lr)
    for (setting, optimizer), blockwise in sorted(optimizers.items()):
        if all(blockwise):
            raise ValueError(
                f"scales.{scale_name}: setting {setting!r} has {optimizer} entries "
                "only with blockwise_lr, so its gaps have no baseline; give an "
                f"{optimizer} entry without blockwise_lr the same setting (the "
                f"settings are {settings})"
            )


def _check_series(scale_name: str, scale: Scale) -> None:
    """Require two or more distinct models in every loss-versus-parameters series."""
    members: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for label, entry in training_entries(scale).items():
        if entry.series is not None:
            model = model_identity(entry.workload or label, entry.model)
            members.setdefault(entry.series, []).append((label, model))
    for series, entries in sorted(members.items()):
        labels = [label for label, _ in entries]
        if len(entries) < 2:
            raise ValueError(
                f"scales.{scale_name}: series {series!r} has one entry ({labels[0]}); "
                "a power-law fit needs 2 or more model sizes, so add entries or "
                "remove `series`"
            )
        seen: dict[str, str] = {}
        for label, model in entries:
            key = repr(sorted(model.items()))
            if key in seen:
                raise ValueError(
                    f"scales.{scale_name}: entries {seen[key]!r} and {label!r} of "
                    f"series {series!r} use the same model {model}; each entry of a "
                    "series needs its own model size"
                )
            seen[key] = label


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"Study file {source} is invalid:"]
    for item in error.errors():
        parts = [p for p in item["loc"] if p not in (ENTRY_TOY, ENTRY_TRAINING)]
        location = ".".join(str(part) for part in parts)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling"
        elif item["type"] not in ("value_error",):
            message = f"{message} (got {item.get('input')!r})"
        lines.append(f"  {location}: {message}" if location else f"  {message}")
    return "\n".join(lines)


def available_studies() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SEARCH_SPACE_DIR.glob("*.yaml"))}


def load_study(name_or_path: str) -> StudySpec:
    """Load a study by name (a file in search_spaces/) or by the path of a YAML file."""
    path = Path(name_or_path)
    studies = available_studies()
    if name_or_path in studies:
        path = studies[name_or_path]
    elif not (path.suffix in (".yaml", ".yml") and path.is_file()):
        raise StudyFileError(
            f"Unknown study {name_or_path!r}; choose one of {sorted(studies)} "
            "(see `study list`) or pass the path of a study YAML file"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise StudyFileError(f"Study file {path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise StudyFileError(f"Study file {path} must contain a mapping at the top")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as error:
        raise StudyFileError(_format_validation_error(str(path), error)) from None
