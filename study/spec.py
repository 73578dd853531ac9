"""Study files: the schema, loading and validation, all before Ray starts."""

from __future__ import annotations

import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from trainers import tables as workload_tables
from trainers.schedules import SCHEDULES
from trainers.tables import MAX_BPE_VOCAB_SIZE, MIN_BPE_VOCAB_SIZE

SEARCH_SPACE_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
# Scale names a study file may use. `paper_large_batch` is optional, and
# batch_power_grid uses it for ResNet-34 at batch sizes above the GradPower
# paper's 32 to 128.
ScaleName = Literal["smoke", "cpu", "paper", "paper_large_batch"]
SCALES: tuple[str, ...] = get_args(ScaleName)
# What a study's analysis measures. `power_trend` compares optimizer steps to a
# target between powers; `compare` and `lr_tune` train every trial for its
# whole budget and compare final validation losses.
ANALYSES = ("power_trend", "compare", "lr_tune")
GRID_AXIS_NAMES = ("batch_size", "power", "lr_max", "seed")
# Validation metrics each training workload reports, usable as targets.
TARGET_METRICS = {"lm": ("val/loss",), "vision": ("val/loss", "val/accuracy")}
# Every trial seeds numpy's global generator (np.random.seed), which accepts
# 0 to 2**32 - 1 and raises ValueError for any other seed.
MAX_SEED = 2**32 - 1
# Values of `train.device`: `auto`, or a torch device type with an optional index.
DEVICE_PATTERN = re.compile(r"auto|cpu|(cuda|mps|xpu)(:[0-9]+)?")
# The ResNet presets that torchvision builds, next to the table of small ones.
TORCHVISION_RESNET_PRESETS = ("resnet34",)


class StudyFileError(ValueError):
    """A study file or CLI value that cannot run; the message names the fix."""


class SettingError(ValueError):
    """A validator's error about one setting inside the model that raises it.

    `location` is the path from that model to the setting. The error message
    appends it to the model's own location.
    """

    def __init__(self, message: str, location: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.location = location


class Strict(BaseModel):
    # strict: a quoted number such as "1.2" is a string and is rejected, and so
    # is true where a number is expected. Whole numbers are accepted as floats.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def lm_presets() -> dict[str, list[str]]:
    """Return the preset names of each lm model family."""
    tables = {
        "llama": workload_tables.LLAMA_PRESETS,
        "qwen2moe": workload_tables.QWEN2MOE_PRESETS,
    }
    return {family: list(tables[family]) for family in workload_tables.MODEL_FAMILIES}


def vision_presets() -> list[str]:
    """Return the ResNet preset names of the vision workload."""
    return [*workload_tables.SMALL_RESNETS, *TORCHVISION_RESNET_PRESETS]


def _check_unique(name: str, values: list[Any]) -> None:
    seen = set()
    keys: dict[str, Any] = {}
    for value in values:
        if value in seen:
            raise ValueError(
                f"{name} {values} lists {value!r} twice; remove the duplicate, "
                "because Ray would train the same trials twice"
            )
        seen.add(value)
        # Trial keys show numbers to 6 significant digits (study.grid.trial_key).
        key = f"{value:g}" if isinstance(value, float) else str(value)
        if key in keys:
            raise ValueError(
                f"{name} {values} lists {keys[key]!r} and {value!r}, which trial "
                f"keys both show as {key}, so one would be taken for the other; "
                "make them differ within 6 significant digits or remove one"
            )
        keys[key] = value


def _check_seeds(seeds: list[int]) -> list[int]:
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed {seed} is invalid; use 0 to 2**32 - 1")
    _check_unique("seed", seeds)
    return seeds


def _check_name(name: str) -> str:
    """Reject a study name, workload label, setting or series that is blank or
    contains a `/`, a `\\`, a quote or a control character such as a newline.

    Such a name cannot be part of a file name, trial key, Optuna study name or
    MLflow search filter."""
    if not name.strip():
        raise ValueError(
            f"name {name!r} is blank; it names files, trial keys and Optuna "
            "studies, so write one such as lm_small"
        )
    unfit = sorted(
        {c for c in name if c in "/\\'\"" or unicodedata.category(c).startswith("C")}
    )
    if unfit:
        characters = ", ".join(repr(c) for c in unfit)
        raise ValueError(
            f"name {name!r} contains {characters}; it names files, trial keys, "
            "Optuna studies and MLflow searches, so leave out /, \\, quotes and "
            "control characters"
        )
    return name


# A study name, workload label, setting or series.
Name = Annotated[str, AfterValidator(_check_name)]


_LR_LIST = "<list>"
_LR_PER_BATCH_SIZE = "<per batch size>"


def _lr_max_form(value: Any) -> str:
    return _LR_PER_BATCH_SIZE if isinstance(value, dict) else _LR_LIST


RateList = Annotated[list[float], Field(min_length=1)]
# One list of rates for every batch size, or a list per batch size.
LearningRates = Annotated[
    Annotated[RateList, Tag(_LR_LIST)]
    | Annotated[dict[int, RateList], Field(min_length=1), Tag(_LR_PER_BATCH_SIZE)],
    Discriminator(_lr_max_form),
]


class Grid(Strict):
    """Axes of the grid; every combination is one trial."""

    batch_size: list[StrictInt] = Field(min_length=1)
    """Examples (sequences or images) per optimizer step."""

    power: list[float] = Field(min_length=1)
    """GradPower exponents; must contain 1.0, the Adam baseline."""

    lr_max: LearningRates
    """Peak learning rates: one list for every batch size, or a list per batch size."""

    seed: list[StrictInt] = Field(default=[0], min_length=1)

    @field_validator("batch_size")
    @classmethod
    def _check_batch_sizes(cls, values: list[int]) -> list[int]:
        for value in values:
            if value <= 0:
                raise ValueError(
                    f"batch_size {value} is invalid; use a positive whole number"
                )
        _check_unique("batch_size", values)
        return values

    @field_validator("power")
    @classmethod
    def _check_powers(cls, values: list[float]) -> list[float]:
        for value in values:
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"power {value} is invalid; use a finite number > 0 "
                    "(1.0 is plain Adam, the paper's default is 1.2)"
                )
        _check_unique("power", values)
        if 1.0 not in values:
            raise ValueError(
                f"power {values} lacks 1.0; add 1.0, the Adam baseline that "
                "every other power is compared with"
            )
        return values

    @field_validator("lr_max")
    @classmethod
    def _check_rates(
        cls, value: list[float] | dict[int, list[float]]
    ) -> list[float] | dict[int, list[float]]:
        if isinstance(value, dict):
            named = {f"lr_max of batch size {bs}": rates for bs, rates in value.items()}
        else:
            named = {"lr_max": value}
        for name, rates in named.items():
            for rate in rates:
                if not math.isfinite(rate) or rate <= 0:
                    raise ValueError(f"lr_max {rate} is invalid; use a number > 0")
            _check_unique(name, rates)
        return value

    @field_validator("seed")
    @classmethod
    def _check_seed_range(cls, values: list[int]) -> list[int]:
        return _check_seeds(values)

    @model_validator(mode="after")
    def _check_rates_per_batch_size(self) -> Grid:
        if not isinstance(self.lr_max, dict):
            return self
        missing = sorted(set(self.batch_size) - set(self.lr_max))
        if missing:
            raise SettingError(
                f"lr_max has no learning rates for batch sizes {missing}; "
                "add an entry for each batch size or give one list for all",
                ("lr_max",),
            )
        extra = sorted(set(self.lr_max) - set(self.batch_size))
        if extra:
            raise SettingError(
                f"lr_max has learning rates for batch sizes {extra}, which "
                f"batch_size {self.batch_size} lacks; add them to batch_size or "
                "remove their entries",
                ("lr_max",),
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

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(
                f"device {value!r} is unknown; use auto (cuda when available, "
                "else cpu), cpu, cuda, cuda:N, mps or xpu"
            )
        return value

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
    value: float = Field(allow_inf_nan=False)
    mode: Literal["min", "max"] = "min"
    stop: bool = True
    """End a trial when it meets the target. With false it trains to the end
    of its budget and still records the step that met the target. Both the
    time to target and the value after the whole schedule (such as the
    paper's Table 2 accuracies) are then known."""

    @model_validator(mode="after")
    def _check_reachable(self) -> Target:
        if self.metric == "val/loss" and self.value <= 0:
            raise SettingError(
                f"target value {self.value:g} can never be met: a cross-entropy "
                "loss is above 0; use a loss the model can reach, such as 3.5",
                ("value",),
            )
        if self.metric == "val/accuracy" and not 0 <= self.value <= 1:
            raise SettingError(
                f"target value {self.value:g} is not an accuracy: accuracies are "
                "fractions from 0 to 1; write 0.93 for 93%",
                ("value",),
            )
        return self


class Budget(Strict):
    """Training length after which an unfinished trial ends as censored:
    `steps` optimizer steps or `epochs` passes over the training set. Exactly
    one of the two is set."""

    steps: int | None = Field(default=None, gt=0)
    """Optimizer steps, the same for every batch size."""
    epochs: int | None = Field(default=None, gt=0)
    """Passes over the training set, ceil(epochs x train_examples / batch_size)
    steps per trial, so that every batch size trains on the same number of
    examples.
    Vision entries only, because their training-set size is known before
    trials start."""

    @model_validator(mode="after")
    def _check_one_budget(self) -> Budget:
        if self.steps is not None and self.epochs is not None:
            raise ValueError(
                f"budget sets both steps {self.steps} and epochs {self.epochs}; "
                "keep one of them"
            )
        if self.steps is None and self.epochs is None:
            raise ValueError(
                "budget sets neither steps nor epochs; add `steps: N` (optimizer "
                "steps) or, for a vision entry, `epochs: N`"
            )
        return self

    def steps_for(self, batch_size: int, train_examples: int | None) -> int:
        """Return the step budget of a trial with this batch size.

        `train_examples` is the training-set size, which an epoch budget needs.
        """
        if self.steps is not None:
            return self.steps
        if train_examples is None:
            raise ValueError(
                f"budget.epochs {self.epochs} needs the training-set size; use "
                "budget.steps for workloads whose size is unknown before training"
            )
        return -(-self.epochs * train_examples // batch_size)


def train_examples(kind: str, data: dict[str, Any]) -> int | None:
    """Return the training-set size of a workload entry's data, or None where it
    is unknown before the data is prepared (the lm workload's token streams).

    A vision entry's `train_examples` keeps the first that many images, so a
    value above the dataset's size keeps all of them.
    """
    if kind != "vision":
        return None
    merged = {**workload_tables.VISION_DEFAULT_DATA, **data}
    size = workload_tables.IMAGE_TRAIN_EXAMPLES[merged["dataset"]]
    if merged["train_examples"] is not None:
        return min(merged["train_examples"], size)
    return size


def step_budget(label: str, entry: WorkloadStudy, batch_size: int) -> int:
    """Return the step budget of entry `label`'s trials at `batch_size`."""
    kind = entry.workload or label
    return entry.budget.steps_for(batch_size, train_examples(kind, entry.data))


def _check_eval_interval(label: str, entry: WorkloadStudy) -> None:
    """Reject an evaluation interval longer than a trial with a target can
    run: such trials are evaluated only at their last step, so every one that
    reaches the target reaches it at the same step and the powers tie."""
    if entry.target is None:
        return
    budgets = {bs: step_budget(label, entry, bs) for bs in entry.grid.batch_size}
    batch_size = min(budgets, key=budgets.get)
    if entry.eval_every_steps > budgets[batch_size]:
        raise SettingError(
            f"eval_every_steps {entry.eval_every_steps} exceeds the step budget "
            f"{budgets[batch_size]} of batch size {batch_size}, so trials are "
            "evaluated only at their last step and the steps to the target cannot "
            f"differ; set eval_every_steps to {budgets[batch_size]} or less",
            ("eval_every_steps",),
        )


def _check_epoch_budget(kind: str, entry: WorkloadStudy) -> None:
    """Check an epoch budget against the workload kind, the warmup and the
    injected faults, which WorkloadStudy checks only for step budgets because
    an entry does not know its kind."""
    epochs = entry.budget.epochs
    if epochs is None:
        return
    if kind != "vision":
        raise SettingError(
            f"budget.epochs {epochs} is for vision entries, whose training-set "
            f"size is known before trials start; the {kind} workload's is not, "
            "so set budget.steps instead",
            ("budget",),
        )

    # The largest batch size has the smallest step budget.
    examples = train_examples(kind, entry.data)
    budgets = {bs: entry.budget.steps_for(bs, examples) for bs in entry.grid.batch_size}
    largest_batch = max(budgets)
    if entry.train.warmup_steps > budgets[largest_batch]:
        raise SettingError(
            f"warmup_steps {entry.train.warmup_steps} exceeds the step budget "
            f"{budgets[largest_batch]} of batch size {largest_batch} ({epochs} "
            f"epochs of {examples} examples); lower warmup_steps or raise "
            "budget.epochs",
            ("train", "warmup_steps"),
        )

    fault = entry.fault_injection
    if fault is None:
        return
    faulty_batches = [
        bs
        for bs in budgets
        if "batch_size" not in fault.only or fault.only["batch_size"] == bs
    ]
    for name in ("nan_loss_at_step", "error_at_step"):
        step = getattr(fault, name)
        missed = [
            bs for bs in faulty_batches if step is not None and step >= budgets[bs]
        ]
        if missed:
            batch_size = max(missed)
            raise SettingError(
                f"fault_injection.{name} {step} is never reached at batch size "
                f"{batch_size}, whose trials stop after {budgets[batch_size]} "
                f"steps ({epochs} epochs of {examples} examples); use a step "
                f"below {budgets[batch_size]}",
                ("fault_injection", name),
            )


class Resources(Strict):
    cpu: float = Field(default=1, gt=0)
    gpu: float = Field(default=0, ge=0)


class FaultInjection(Strict):
    """Faults injected into chosen trials on purpose, to check how a study
    handles divergence and failure. At least one of the two faults must be set."""

    nan_loss_at_step: int | None = Field(default=None, ge=0)
    """Optimizer step (0-based) whose training loss becomes NaN, so the trial
    ends as diverged."""
    error_at_step: int | None = Field(default=None, ge=0)
    """Optimizer step (0-based) at which the trial raises a RuntimeError, so it
    ends as failed once its retries are spent."""
    only: dict[str, float] = Field(default_factory=dict)
    """Grid values a trial must have to be affected, e.g. {power: 1.4}; empty
    means every trial."""

    @model_validator(mode="after")
    def _check_faults(self) -> FaultInjection:
        if self.nan_loss_at_step is None and self.error_at_step is None:
            raise ValueError(
                "fault_injection sets no fault; set nan_loss_at_step or "
                "error_at_step to a 0-based optimizer step, or remove fault_injection"
            )
        if self.nan_loss_at_step == self.error_at_step:
            raise ValueError(
                f"fault_injection sets nan_loss_at_step and error_at_step both to "
                f"step {self.error_at_step}, so only the error would happen; give "
                "them different steps or remove one"
            )
        return self


class LanguageModelSettings(Strict):
    """`model` of an lm entry: the decoder family and its preset shape."""

    family: str = "llama"
    preset: str | None = None
    """None means the llama family's default preset, `cpu`."""

    @model_validator(mode="after")
    def _check_preset(self) -> LanguageModelSettings:
        presets = lm_presets()
        if self.family not in presets:
            raise SettingError(
                f"family {self.family!r} is unknown; choose one of {list(presets)}",
                ("family",),
            )
        names = presets[self.family]
        if self.preset is None and self.family == "qwen2moe":
            raise SettingError(
                f"the qwen2moe family needs a preset; choose one of {names}",
                ("preset",),
            )
        if self.preset is not None and self.preset not in names:
            raise SettingError(
                f"{self.family} preset {self.preset!r} is unknown; choose one of "
                f"{names}",
                ("preset",),
            )
        return self


class VisionModelSettings(Strict):
    """`model` of a vision entry: the ResNet preset."""

    preset: str = "cpu"

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value: str) -> str:
        names = vision_presets()
        if value not in names:
            raise ValueError(
                f"ResNet preset {value!r} is unknown; choose one of {names}"
            )
        return value


def _check_choice(key: str, value: str, choices: Any) -> str:
    """Return `value` when it is one of the `Literal` type `choices`."""
    names = list(get_args(choices))
    if value not in names:
        raise ValueError(f"{key} {value!r} is unknown; choose one of {names}")
    return value


class TextData(Strict):
    """`data` of an lm entry, checked with the rules that token-shard
    preparation applies, after the workload's DEFAULT_DATA fills unset keys."""

    source: str
    paths: list[str]
    tokenizer: Literal["bpe", "pretrained"]
    vocab_size: int
    tokenizer_path: str | None
    seq_len: int = Field(ge=1)
    val_tokens: int | None
    max_documents: int | None = Field(ge=1)
    max_train_tokens: int | None
    """Tokens in the training split; None tokenizes the whole train split."""

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        return _check_choice("source", value, workload_tables.SourceKind)

    @model_validator(mode="after")
    def _check_combination(self) -> TextData:
        if self.tokenizer == "bpe" and self.vocab_size < MIN_BPE_VOCAB_SIZE:
            raise SettingError(
                f"vocab_size {self.vocab_size} is too small for the bpe tokenizer; "
                f"use {MIN_BPE_VOCAB_SIZE} or more (256 byte tokens plus EOS)",
                ("vocab_size",),
            )
        if self.tokenizer == "bpe" and self.vocab_size > MAX_BPE_VOCAB_SIZE:
            raise SettingError(
                f"vocab_size {self.vocab_size} is too large for the bpe tokenizer, "
                f"whose training would need memory in proportion; use at most "
                f"{MAX_BPE_VOCAB_SIZE} (2**20)",
                ("vocab_size",),
            )
        if self.tokenizer == "pretrained" and not self.tokenizer_path:
            raise SettingError(
                "the pretrained tokenizer needs tokenizer_path, a Hugging Face hub "
                "name or a local directory (for example google-t5/t5-base)",
                ("tokenizer_path",),
            )
        if self.source == "files" and not self.paths:
            raise SettingError(
                "the files source needs paths; add the text files or glob patterns",
                ("paths",),
            )
        if self.source == "c4_local" and not self.paths:
            raise SettingError(
                "the c4_local source needs paths; add the directories that contain "
                "the c4-train.*.json.gz and c4-validation.*.json.gz shards",
                ("paths",),
            )
        window = self.seq_len + 1
        if self.val_tokens is not None and self.val_tokens < window:
            raise SettingError(
                f"val_tokens {self.val_tokens} is shorter than one window of "
                f"seq_len + 1 = {window} tokens; raise val_tokens or lower seq_len",
                ("val_tokens",),
            )
        if self.max_train_tokens is not None and self.max_train_tokens < window:
            raise SettingError(
                f"max_train_tokens {self.max_train_tokens} is shorter than one window "
                f"of seq_len + 1 = {window} tokens; raise max_train_tokens or lower "
                "seq_len",
                ("max_train_tokens",),
            )
        return self


class ImageData(Strict):
    """`data` of a vision entry, after the workload's DEFAULT_DATA fills unset keys."""

    dataset: str
    root: str | None
    source_dir: str | None
    download: bool
    train_examples: int | None = Field(ge=1)
    eval_examples: int | None = Field(ge=1)
    augment: bool

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, value: str) -> str:
        return _check_choice("dataset", value, workload_tables.ImageDatasetName)


class Downstream(Strict):
    """`downstream` of an lm entry: zero-shot benchmarks scored once on each
    trial's final weights (`trainers.downstream`), as in Table 1 of the
    GradPower paper."""

    tasks: list[workload_tables.DownstreamTask] = Field(min_length=1)
    dir: str | None = None
    """Folder with `<task>.jsonl` (or .json, .parquet) files in the hub
    datasets' fields; None downloads the tasks from the Hugging Face hub."""
    max_examples: int | None = Field(default=None, ge=1)
    """Number of examples scored per task, counted from the first; None scores all."""

    @field_validator("dir")
    @classmethod
    def _check_dir(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(
                "dir is empty; set it to the folder with the task files, or leave "
                "it out to download the tasks from the Hugging Face hub"
            )
        return value

    @field_validator("tasks")
    @classmethod
    def _check_unique_tasks(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            repeated = sorted({task for task in values if values.count(task) > 1})
            raise ValueError(f"tasks {values} lists {repeated} twice; remove one")
        return values


# The settings models of each training workload's `model` and `data`, and the
# defaults that fill unset data keys.
WORKLOAD_SETTINGS: dict[str, tuple[type[Strict], type[Strict], dict[str, Any]]] = {
    "lm": (LanguageModelSettings, TextData, workload_tables.LM_DEFAULT_DATA),
    "vision": (VisionModelSettings, ImageData, workload_tables.VISION_DEFAULT_DATA),
}


def _check_settings_model(
    model_class: type[Strict], values: dict[str, Any], location: tuple[str, ...]
) -> None:
    """Validate `values` with `model_class`; raise a SettingError at `location`
    for its first error."""
    try:
        model_class.model_validate(values)
    except ValidationError as error:
        item_location, message = _describe_error(error.errors()[0])
        raise SettingError(message, (*location, *item_location)) from None


def _check_workload_settings(kind: str, entry: WorkloadStudy) -> None:
    """Check an entry's `model` and `data` before the trainers read them, because
    they are free-form mappings in the entry."""
    model_class, data_class, defaults = WORKLOAD_SETTINGS[kind]
    _check_settings_model(model_class, entry.model, ("model",))
    _check_settings_model(data_class, {**defaults, **entry.data}, ("data",))
    if entry.downstream is not None and kind != "lm":
        raise SettingError(
            f"downstream evaluation scores language models, and this is a {kind} "
            "entry; remove downstream or move it to an lm entry",
            ("downstream",),
        )


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
    setting: Name | None = None
    """Row of the comparison table; entries that share a setting (for example
    with and without blockwise_lr) form one row. Defaults to the entry's key."""
    series: Name | None = None
    """Entries that share a series (one per model size) form one
    loss-versus-parameters fit."""
    eval_every_steps: int = Field(default=10, ge=1)
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    """Save the whole training state this often; None restarts a crashed trial
    from step 0."""
    fault_injection: FaultInjection | None = None
    resources: Resources = Resources()
    downstream: Downstream | None = None
    """Zero-shot downstream evaluation of every trial's final weights (lm only)."""

    @model_validator(mode="after")
    def _check_fault_injection(self) -> WorkloadStudy:
        fault = self.fault_injection
        if fault is None:
            return self
        unknown = sorted(set(fault.only) - set(GRID_AXIS_NAMES))
        if unknown:
            raise ValueError(
                f"fault_injection.only names unknown axes {unknown}; "
                f"use {list(GRID_AXIS_NAMES)}"
            )
        steps = {
            "nan_loss_at_step": fault.nan_loss_at_step,
            "error_at_step": fault.error_at_step,
        }
        # Scale checks an epoch budget, where budget.steps is None.
        budget = self.budget.steps
        for name, step in steps.items():
            if step is not None and budget is not None and step >= budget:
                raise ValueError(
                    f"fault_injection.{name} {step} is never reached, because "
                    f"trials stop after budget.steps {self.budget.steps}; use a "
                    f"step below {self.budget.steps}"
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
        # Scale checks an epoch budget, where budget.steps is None.
        budget = self.budget.steps
        if budget is not None and self.train.warmup_steps > budget:
            raise ValueError(
                f"warmup_steps {self.train.warmup_steps} exceeds the step budget "
                f"{self.budget.steps}; lower warmup_steps or raise budget.steps"
            )
        return self

    @model_validator(mode="after")
    def _check_hub_token_cap(self) -> WorkloadStudy:
        """Require max_train_tokens for an lm source streamed from the hub, because
        token-shard preparation otherwise reads the whole train split (hundreds of
        GB for C4) before the first trial starts."""
        hub_sources = ("c4_hub", "openwebtext_hub")
        source = self.data.get("source")
        if self.workload == "vision" or source not in hub_sources:
            return self
        if self.data.get("max_train_tokens") is not None:
            return self
        seq_len = self.data.get("seq_len", workload_tables.LM_DEFAULT_DATA["seq_len"])
        if type(seq_len) is not int or seq_len < 1:
            return self  # TextData reports the invalid seq_len.
        if self.budget.steps is None:
            return self  # Scale rejects an epoch budget on an lm entry.
        batch_size = max(self.grid.batch_size)
        tokens = self.budget.steps * batch_size * seq_len
        raise SettingError(
            f"source {source} streams from the Hugging Face hub and max_train_tokens "
            "is not set, so the whole train split would be tokenized before any "
            "trial starts; set max_train_tokens to "
            f"{tokens}, the most tokens a trial of this entry trains on "
            f"(budget.steps {self.budget.steps} x batch_size {batch_size} x "
            f"seq_len {seq_len})",
            ("data",),
        )


class ToyGrid(Strict):
    """Axes of the toy noise model; every combination is one trial."""

    noise_ratio: list[float] = Field(min_length=1)
    """Noise-to-signal ratios sigma/mu of the uniform gradient distribution."""
    power: list[float] = Field(min_length=1)
    seed: list[int] = Field(default=[0], min_length=1)

    @field_validator("noise_ratio", "power")
    @classmethod
    def _check_positive(cls, values: list[float], info: ValidationInfo) -> list[float]:
        for value in values:
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"{info.field_name} {value} is invalid; use a finite number > 0"
                )
        _check_unique(info.field_name, values)
        return values

    @field_validator("seed")
    @classmethod
    def _check_seed_range(cls, values: list[int]) -> list[int]:
        return _check_seeds(values)

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
    if isinstance(entry, dict):
        workload = entry.get("workload")
    else:
        # A validated entry, or a value that is not a mapping, which the
        # training entry's validation rejects.
        workload = getattr(entry, "workload", None)
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
    workloads: dict[Name, WorkloadEntry] = Field(min_length=1)

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
            try:
                _check_workload_settings(kind, entry)
                _check_epoch_budget(kind, entry)
                _check_eval_interval(label, entry)
            except SettingError as error:
                raise SettingError(
                    str(error), ("workloads", label, *error.location)
                ) from None
            if entry.target is None:
                continue
            if entry.target.metric not in TARGET_METRICS[kind]:
                raise SettingError(
                    f"target metric {entry.target.metric!r} of workload {label!r} is "
                    f"unknown; the {kind} workload reports {list(TARGET_METRICS[kind])}",
                    ("workloads", label, "target", "metric"),
                )
        return self


class StudySpec(Strict):
    name: Name
    description: str = ""
    analysis: Literal["power_trend", "compare", "lr_tune"] = "power_trend"
    """`power_trend`: steps to a target per batch size and power, and the best
    power's trend with batch size. `compare`: final validation loss per
    optimizer variant and setting, the gap to the p = 1 baseline and
    loss-versus-parameters fits. `lr_tune`: the best lr_max per model and
    batch size, which `study run --lr-from` feeds to other studies."""
    scales: dict[ScaleName, Scale] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_analysis_needs(self) -> StudySpec:
        for scale_name, scale in self.scales.items():
            for label, entry in scale.workloads.items():
                if isinstance(entry, ToyNoiseStudy):
                    continue
                where = ("scales", scale_name, "workloads", label)
                if self.analysis == "power_trend" and entry.target is None:
                    raise SettingError(
                        "no target is set; the power_trend analysis measures "
                        "steps to a target, so add `target: {metric: val/loss, "
                        "value: ...}` or set `analysis: compare` for final losses",
                        where,
                    )
                if self.analysis != "power_trend" and entry.target is not None:
                    raise SettingError(
                        f"a target is set, but the {self.analysis} analysis "
                        "compares final losses after the whole budget, and a "
                        "target would stop trials early; remove the target",
                        (*where, "target"),
                    )
                if self.analysis != "compare" and entry.downstream is not None:
                    raise SettingError(
                        f"downstream is set, but the {self.analysis} analysis has "
                        "no downstream table; set `analysis: compare`, which trains "
                        "every trial for its whole budget and tabulates the "
                        "accuracies, or remove downstream",
                        (*where, "downstream"),
                    )
                if self.analysis == "lr_tune" and entry.grid.power != [1.0]:
                    raise SettingError(
                        f"power is {entry.grid.power}; lr_tune tunes the Adam "
                        "baseline, so set `power: [1.0]`",
                        (*where, "grid", "power"),
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


# Tags of the tagged unions, which pydantic puts into error locations.
_UNION_TAGS = frozenset({ENTRY_TOY, ENTRY_TRAINING, _LR_LIST, _LR_PER_BATCH_SIZE})
_MAX_INPUT_REPR = 80
_WHOLE_NUMBER_TYPES = frozenset({"int_type", "int_parsing", "int_from_float"})
_NUMBER_TYPES = frozenset({"float_type", "float_parsing"})


def _describe_error(item: Any) -> tuple[tuple[str | int, ...], str]:
    """Return the location and message of one pydantic error item."""
    # A dict key's error is located at its key, whose line is the entry's.
    location = tuple(
        part for part in item["loc"] if part not in _UNION_TAGS and part != "[key]"
    )
    error = item.get("ctx", {}).get("error")
    if isinstance(error, SettingError):
        location += error.location
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        message = "unknown key; remove it or check its spelling"
    elif item["type"] == "missing":
        message = "required key is missing; add it"
    elif item["type"] != "value_error":
        value = item.get("input")
        input_repr = repr(value)
        if len(input_repr) > _MAX_INPUT_REPR:
            input_repr = input_repr[: _MAX_INPUT_REPR - 3] + "..."
        message = f"{message} (got {input_repr})"
        fix = _type_error_fix(item["type"], value, item.get("ctx", {}))
        if fix:
            message += f"; {fix}"
    return location, message


def _is_number_text(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _type_error_fix(kind: str, value: Any, limits: dict[str, Any]) -> str | None:
    """Return the fix for a pydantic error of type `kind` on `value`, or None."""
    if kind in _WHOLE_NUMBER_TYPES | _NUMBER_TYPES and _is_number_text(value):
        return "write numbers without quotes"
    if kind in _WHOLE_NUMBER_TYPES | _NUMBER_TYPES and isinstance(value, bool):
        return "YAML reads yes, no, on and off as true or false; write a number"
    if kind in _WHOLE_NUMBER_TYPES:
        return "write a whole number, such as 4"
    if kind in _NUMBER_TYPES:
        return "write a number, such as 0.001 or 1e-3"

    if kind in {"bool_type", "bool_parsing"}:
        return "write true or false"
    if kind == "list_type":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"write a list, such as [{value}]"
        return "write a list in square brackets"
    if kind in {"dict_type", "model_type", "model_attributes_type"}:
        return "write a mapping of keys to values, such as {key: value}"
    if kind == "string_type":
        return "write text"

    if kind == "greater_than_equal":
        return f"use {limits['ge']} or more"
    if kind == "greater_than":
        return f"use a value above {limits['gt']}"
    if kind == "less_than_equal":
        return f"use {limits['le']} or less"
    if kind == "less_than":
        return f"use a value below {limits['lt']}"
    if kind == "too_short":
        return f"give at least {limits['min_length']} item(s)"
    if kind == "too_long":
        return f"give at most {limits['max_length']} item(s)"
    return None


def _line_of(root: yaml.Node | None, location: tuple[str | int, ...]) -> int | None:
    """Return the 1-based line of the deepest key or item of `location` that the
    YAML file contains, or None for an empty location."""
    if root is None or not location:
        return None
    node, line = root, None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            pairs = [
                (key, value)
                for key, value in node.value
                if isinstance(key, yaml.ScalarNode) and key.value == str(part)
            ]
            if not pairs:
                break
            key, node = pairs[-1]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_validation_error(
    source: str, error: ValidationError, root: yaml.Node | None = None
) -> str:
    lines = [f"Study file {source} is invalid:"]
    for item in error.errors():
        location, message = _describe_error(item)
        if not location:
            lines.append(f"  {message}")
            continue
        where = ".".join(
            str(part) if str(part).isprintable() else repr(part) for part in location
        )
        line = _line_of(root, location)
        if line is not None:
            where += f" (line {line})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


class DuplicateKeyError(yaml.YAMLError):
    """A key that occurs twice in one YAML mapping."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"key {key!r} on lines {first_line} and {line}")
        self.key = key
        self.first_line = first_line
        self.line = line


class StudyLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes for study files.

    A key repeated in one mapping raises DuplicateKeyError, where PyYAML keeps
    the last value. A number with an exponent and no dot, such as 1e-3, is a
    float as in YAML 1.2, where PyYAML (YAML 1.1) returns the string "1e-3".
    """

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            # Keys merged in with `<<: *anchor` may be overridden, as YAML allows.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first_line = first_lines.get(key)
            except TypeError:
                continue  # an unhashable key, which SafeLoader rejects itself
            line = key_node.start_mark.line + 1
            if first_line is not None:
                raise DuplicateKeyError(key, first_line, line)
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+\Z"),
    list("-+0123456789"),
)


def available_studies() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SEARCH_SPACE_DIR.glob("*.yaml"))}


def _study_path(name_or_path: str) -> Path:
    """Return the file of a bundled study name or of a path to a YAML file."""
    studies = available_studies()
    if name_or_path in studies:
        return studies[name_or_path]
    path = Path(name_or_path)
    is_yaml_name = path.suffix in (".yaml", ".yml")
    if not is_yaml_name and "/" not in name_or_path and os.sep not in name_or_path:
        raise StudyFileError(
            f"Unknown study {name_or_path!r}; choose one of {sorted(studies)} "
            "(see `study list`) or pass the path of a study YAML file"
        )
    if path.is_dir():
        raise StudyFileError(
            f"Study file {path} is a directory; pass the path of a study YAML file"
        )
    if not path.exists():
        raise StudyFileError(
            f"Study file {path} not found; check the path, or pass a study name "
            f"from `study list`: {sorted(studies)}"
        )
    if not is_yaml_name:
        raise StudyFileError(
            f"Study file {path} does not end in .yaml or .yml; rename it so that "
            "it is not taken for a study name"
        )
    return path


def _parse_yaml(stream: BinaryIO) -> tuple[Any, yaml.Node | None]:
    loader = StudyLoader(stream)
    try:
        root = loader.get_single_node()
        raw = None if root is None else loader.construct_document(root)
    finally:
        loader.dispose()
    return raw, root


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Return the data of a YAML file and its node tree, which contains the line
    numbers for error messages."""
    try:
        stream = path.open("rb")
    except OSError as error:
        raise StudyFileError(f"Study file {path} cannot be read: {error}") from None
    # Read as bytes, so that PyYAML decodes the file and reports invalid UTF-8
    # as a YAMLError with the file's name and position.
    with stream:
        try:
            return _parse_yaml(stream)
        except DuplicateKeyError as error:
            raise StudyFileError(
                f"Study file {path} repeats the key {error.key!r} on lines "
                f"{error.first_line} and {error.line} of one mapping, and YAML "
                "would keep only the last value; remove or rename one of them"
            ) from None
        except yaml.YAMLError as error:
            raise StudyFileError(
                f"Study file {path} is not valid YAML: {error}"
            ) from None


def load_study(name_or_path: str) -> StudySpec:
    """Load a study by name (a file in search_spaces/) or by the path of a YAML file."""
    path = _study_path(name_or_path)
    raw, root = _read_yaml(path)
    if not isinstance(raw, dict):
        raise StudyFileError(f"Study file {path} must contain a mapping at the top")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as error:
        raise StudyFileError(_format_validation_error(str(path), error, root)) from None


def check_local_resources(
    scale: Scale,
    scale_name: str,
    cpu_count: int | None = None,
    gpu_count: int | None = None,
) -> None:
    """Reject workloads that need more CPUs or GPUs per trial than this
    machine has.

    `study run` without --ray-address starts a local Ray with os.cpu_count()
    CPUs and the GPUs it finds, and Ray keeps a trial that needs more pending
    forever. `cpu_count` defaults to os.cpu_count(), `gpu_count` to the CUDA
    devices that torch detects, counted only when an entry asks for a GPU.
    """
    available = os.cpu_count() if cpu_count is None else cpu_count
    problems = []
    for label, entry in scale.workloads.items():
        cpus = entry.resources.cpu
        if available is not None and cpus > available:
            problems.append(
                f"scales.{scale_name}.workloads.{label}.resources.cpu {cpus:g} is "
                f"more than the {available} CPUs of this machine, so the local Ray "
                "cluster would never start its trials; lower resources.cpu to "
                f"{available} or less, or pass --ray-address of a Ray cluster "
                "whose nodes have more CPUs"
            )
        gpus = entry.resources.gpu
        if gpus == 0:
            continue
        if gpu_count is None:
            gpu_count = _local_gpu_count()
        if gpus > gpu_count:
            found = f"{gpu_count} GPUs" if gpu_count else "no GPU"
            problems.append(
                f"scales.{scale_name}.workloads.{label}.resources.gpu {gpus:g} is "
                f"more than this machine has ({found} that torch can use), so the "
                "local Ray cluster would never start its trials; run this scale on "
                "a machine with GPUs, or pass --ray-address of a Ray cluster with "
                "GPU nodes"
            )
    if len(problems) == 1:
        raise StudyFileError(problems[0])
    if problems:
        raise StudyFileError(
            f"scale {scale_name!r} needs more than this machine has:\n"
            + "\n".join(f"  {problem}" for problem in problems)
        )


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
