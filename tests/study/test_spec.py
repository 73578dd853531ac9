"""Study files and CLI values are rejected before Ray starts, with the fix named."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study.cli import main
from study.grid import expand
from study.spec import (
    StudyFileError,
    available_studies,
    check_local_resources,
    load_study,
)


def _write_study(tmp_path: Path, **changes) -> Path:
    spec = yaml.safe_load(available_studies()["batch_power_grid"].read_text())
    lm = spec["scales"]["smoke"]["workloads"]["lm"]
    for dotted, value in changes.items():
        node = lm
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bundled_studies_validate():
    for name in available_studies():
        spec = load_study(name)
        assert spec.name == name


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"grid.power": [1.0, -0.5]}, "power -0.5 is invalid"),
        ({"grid.power": [1.0, 0.0]}, "power 0.0 is invalid"),
        ({"grid.power": [1.0, 1.2, 1.2000001]}, "both show as 1.2"),
        ({"grid.lr_max": [0.001, 0.0010000001]}, "both show as 0.001"),
        ({"grid.power": [0.8, 1.2]}, "add 1.0"),
        ({"grid.batch_size": [0, 8]}, "batch_size 0 is invalid"),
        ({"grid.lr_max": [-1.0]}, "lr_max -1.0 is invalid"),
        ({"budget.steps": 0}, "budget.steps"),
        ({"train.micro_batch_size": 3}, "micro_batch_size 3 does not divide"),
        ({"train.schedule": "linear"}, "schedule 'linear' is unknown"),
        ({"grid.colour": [1]}, "unknown key"),
        ({"grid.power": "fast"}, "grid.power"),
        ({"grid.batch_size": [True, 8]}, "grid.batch_size"),
        ({"target.metric": "val/lost"}, "target metric 'val/lost'"),
    ],
)
def test_spec_rejects_invalid_value(tmp_path, change, expected):
    path = _write_study(tmp_path, **change)
    with pytest.raises(StudyFileError) as error:
        load_study(str(path))
    assert expected in str(error.value)


def test_spec_unknown_study_lists_choices():
    with pytest.raises(StudyFileError) as error:
        load_study("no_such_study")
    assert "batch_power_grid" in str(error.value)


def test_spec_unknown_scale_lists_choices():
    with pytest.raises(StudyFileError) as error:
        load_study("batch_power_grid").scale("huge")
    assert "'cpu'" in str(error.value)


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    workspace = tmp_path / "ws"
    path = _write_study(tmp_path, **{"grid.power": [1.0, -1.0]})
    code = main(["run", str(path), "--scale", "smoke", "--workspace", str(workspace)])
    assert code == 2
    assert "power -1.0 is invalid" in capsys.readouterr().err
    assert not workspace.exists()


def test_cli_rejects_more_cpus_than_machine(tmp_path, capsys):
    workspace = tmp_path / "ws"
    too_many = (os.cpu_count() or 1) + 1
    path = _write_study(tmp_path, **{"resources.cpu": too_many})
    code = main(["run", str(path), "--scale", "smoke", "--workspace", str(workspace)])
    assert code == 2
    assert f"resources.cpu {too_many} is more than" in capsys.readouterr().err
    assert not workspace.exists()


def test_cli_unknown_scale_writes_nothing(tmp_path, capsys):
    workspace = tmp_path / "ws"
    code = main(
        ["run", "batch_power_grid", "--scale", "huge", "--workspace", str(workspace)]
    )
    assert code == 2
    assert "has no scale 'huge'" in capsys.readouterr().err
    assert not workspace.exists()


def test_cli_unwritable_workspace_is_rejected(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(
        [
            "run",
            "batch_power_grid",
            "--scale",
            "smoke",
            "--workspace",
            str(blocker / "ws"),
        ]
    )
    assert code == 2
    assert "--workspace" in capsys.readouterr().err


def test_cli_list_shows_scales():
    output = subprocess.run(
        [sys.executable, "-m", "study.cli", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "batch_power_grid" in output
    for scale in ("smoke", "cpu", "paper"):
        assert scale in output


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["train", "batch_power_grid", "--scale", "smoke", "--power", "nan"],
            "--power nan",
        ),
        (
            ["train", "batch_power_grid", "--scale", "smoke", "--lr-max", "0"],
            "--lr-max 0.0",
        ),
        (
            ["train", "batch_power_grid", "--scale", "smoke", "--seed", "-1"],
            "--seed -1",
        ),
        (
            ["train", "toy_noise_regimes", "--scale", "smoke"],
            "study run toy_noise_regimes",
        ),
    ],
)
def test_cli_train_rejects_before_data(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_cli_analyze_empty_workspace_writes_nothing(tmp_path, capsys):
    code = main(["analyze", "batch_power_grid", "--workspace", str(tmp_path)])
    assert code == 2
    assert "contains no recorded runs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--tracking-uri", "garbage"], "--tracking-uri 'garbage' is not supported"),
        (["--data-cache", "FILE"], "is not a directory"),
        (
            ["--tracking-uri", "http://alice:s3cret@127.0.0.1:1"],
            "alice:***@127.0.0.1:1",
        ),
    ],
)
def test_cli_bad_store_option_writes_nothing(tmp_path, capsys, option, expected):
    blocker = tmp_path / "file"
    blocker.write_text("")
    option = [str(blocker) if value == "FILE" else value for value in option]
    workspace = tmp_path / "ws"
    argv = [
        "run",
        "batch_power_grid",
        "--scale",
        "smoke",
        "--workspace",
        str(workspace),
    ]
    assert main(argv + option) == 2
    error = capsys.readouterr().err
    assert expected in error
    assert "s3cret" not in error
    assert not workspace.exists()


def _write_entry(tmp_path: Path, study: str, label: str, change) -> Path:
    """Write a copy of a bundled study after `change` edits its smoke entry `label`."""
    spec = yaml.safe_load(available_studies()[study].read_text())
    change(spec["scales"]["smoke"]["workloads"][label])
    path = tmp_path / f"{study}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _load_error(path: Path | str) -> str:
    with pytest.raises(StudyFileError) as error:
        load_study(str(path))
    return str(error.value)


# Each case: the dotted changes to the smoke lm entry of batch_power_grid, the
# location the message names and the words that name the value and the fix.
INVALID_LM_SETTINGS = [
    ({"grid.seed": [-1]}, "lm.grid.seed", "seed -1 is invalid; use 0 to 2**32 - 1"),
    (
        {"grid.seed": [8589934592]},
        "lm.grid.seed",
        "seed 8589934592 is invalid; use 0 to 2**32 - 1",
    ),
    ({"model": {"preset": "huge"}}, "lm.model.preset", "'huge' is unknown"),
    (
        {"model": {"family": "qwen2moe", "preset": "huge"}},
        "lm.model.preset",
        "'0.5b'",
    ),
    (
        {"model": {"family": "qwen2moe"}},
        "lm.model.preset",
        "qwen2moe family needs a preset",
    ),
    ({"model": {"family": "gpt"}}, "lm.model.family", "'gpt'"),
    ({"model": {"size": "tiny"}}, "lm.model.size", "unknown key"),
    ({"data.source": "wikipedia"}, "lm.data.source", "'wikipedia' is unknown"),
    ({"data.seq_len": 0}, "lm.data.seq_len", "(got 0); use 1 or more"),
    ({"data.vocab_size": 2}, "lm.data.vocab_size", "vocab_size 2 is too small"),
    ({"data.tokenizer": "pretrained"}, "lm.data.tokenizer_path", "tokenizer_path"),
    ({"data.source": "files"}, "lm.data.paths", "add the text files"),
    ({"data.val_tokens": 16}, "lm.data.val_tokens", "val_tokens 16 is shorter"),
    ({"data.max_documents": 0}, "lm.data.max_documents", "(got 0)"),
    ({"data.vocab_size": 100}, "lm.data.vocab_size", "use 257 or more"),
    (
        {"data.vocab_size": 10**9},
        "lm.data.vocab_size",
        "vocab_size 1000000000 is too large for the bpe tokenizer",
    ),
    (
        {"data.max_train_tokens": 32},
        "lm.data.max_train_tokens",
        "max_train_tokens 32 is shorter than one window of seq_len + 1 = 33",
    ),
    ({"data.seqlen": 32}, "lm.data.seqlen", "unknown key"),
    (
        {"grid.power": [1.0, 1.0, 1.2]},
        "lm.grid.power",
        "power [1.0, 1.0, 1.2] lists 1.0 twice",
    ),
    ({"grid.power": [1, 1.0, 1.2]}, "lm.grid.power", "lists 1.0 twice"),
    ({"grid.batch_size": [8, 8]}, "lm.grid.batch_size", "lists 8 twice"),
    ({"grid.lr_max": [0.01, 0.01]}, "lm.grid.lr_max", "lists 0.01 twice"),
    ({"grid.lr_max": {4: [0.01, 0.01], 8: [0.01]}}, "lm.grid.lr_max", "lists 0.01"),
    ({"grid.lr_max": {4: [0.01], 8: [0.01], 16: [0.01]}}, "lm.grid.lr_max", "[16]"),
    ({"grid.seed": [0, 1, 0]}, "lm.grid.seed", "lists 0 twice"),
    ({"grid.power": ["1.2", 1.0]}, "lm.grid.power.0", "(got '1.2')"),
    ({"grid.lr_max": ["0.01"]}, "lm.grid.lr_max.0", "(got '0.01')"),
    ({"grid.seed": ["0"]}, "lm.grid.seed.0", "(got '0')"),
    ({"budget.steps": "16"}, "lm.budget.steps", "(got '16')"),
    ({"target.value": float("nan")}, "lm.target.value", "nan"),
    ({"target.value": -5.0}, "lm.target.value", "target value -5 can never be met"),
    ({"train.device": "gpu"}, "lm.train.device", "device 'gpu' is unknown"),
]


@pytest.mark.parametrize(("change", "location", "expected"), INVALID_LM_SETTINGS)
def test_spec_rejects_invalid_lm_setting(tmp_path, change, location, expected):
    message = _load_error(_write_study(tmp_path, **change))
    assert f"scales.smoke.workloads.{location}" in message
    assert expected in message


@pytest.mark.parametrize(
    ("change", "location", "expected"),
    [
        ({"preset": "resnet50"}, "vision.model.preset", "'resnet50' is unknown"),
        ({"dataset": "mnist"}, "vision.data.dataset", "'mnist' is unknown"),
        ({"train_examples": 0}, "vision.data.train_examples", "(got 0)"),
    ],
)
def test_spec_rejects_invalid_vision_setting(tmp_path, change, location, expected):
    def edit(entry):
        key = "model" if "preset" in change else "data"
        entry[key].update(change)

    message = _load_error(_write_entry(tmp_path, "batch_power_grid", "vision", edit))
    assert f"scales.smoke.workloads.{location}" in message
    assert expected in message


def test_spec_lists_preset_choices(tmp_path):
    message = _load_error(_write_study(tmp_path, model={"preset": "huge"}))
    assert "'tiny'" in message
    assert "'0.2b'" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"noise_ratio": [0.5, 0.5]}, "noise_ratio [0.5, 0.5] lists 0.5 twice"),
        ({"power": [1.0, 1, 1.2]}, "lists 1.0 twice"),
        ({"seed": [-1]}, "seed -1 is invalid"),
        ({"power": ["1.2"]}, "(got '1.2')"),
    ],
)
def test_toy_spec_rejects_invalid_grid(tmp_path, change, expected):
    path = _write_entry(
        tmp_path, "toy_noise_regimes", "toy", lambda entry: entry["grid"].update(change)
    )
    message = _load_error(path)
    assert "scales.smoke.workloads.toy.grid" in message
    assert expected in message


MINIMAL_STUDY = """\
name: custom
scales:
  smoke:
    workloads:
      lm:
        model: {preset: tiny}
        grid:
          batch_size: [8]
          power: [1.0, 1.2]
          lr_max: [1e-3]
        target: {metric: val/loss, value: 5.0}
        budget: {steps: 10}
"""


def _write_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return path


def test_spec_reads_exponent_without_dot_as_number(tmp_path):
    spec = load_study(str(_write_text(tmp_path, MINIMAL_STUDY)))
    assert spec.scales["smoke"].workloads["lm"].grid.lr_max == [0.001]


def test_spec_rejects_duplicate_yaml_key(tmp_path):
    text = MINIMAL_STUDY.replace(
        "power: [1.0, 1.2]\n", "power: [1.0, 1.2]\n          power: [1.0]\n"
    )
    path = _write_text(tmp_path, text)
    message = _load_error(path)
    assert str(path) in message
    assert "'power'" in message
    assert "lines 9 and 10" in message


def test_spec_rejects_duplicate_workload_key(tmp_path):
    lm_entry = MINIMAL_STUDY.split("    workloads:\n")[1]
    path = _write_text(tmp_path, MINIMAL_STUDY + lm_entry)
    message = _load_error(path)
    assert "'lm'" in message
    assert "lines 5 and 13" in message


def test_spec_yaml_syntax_error_names_file(tmp_path):
    path = _write_text(tmp_path, MINIMAL_STUDY + "      vision: [\n")
    message = _load_error(path)
    assert f'"{path}"' in message
    assert "<unicode string>" not in message


def test_spec_invalid_utf8_names_file(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    message = _load_error(path)
    assert f"Study file {path} is not valid YAML" in message
    assert "position 6" in message


def test_spec_missing_field_message_is_short(tmp_path):
    path = _write_text(
        tmp_path, MINIMAL_STUDY.replace("        budget: {steps: 10}\n", "")
    )
    message = _load_error(path)
    assert "scales.smoke.workloads.lm.budget (line 5)" in message
    assert "required key is missing" in message
    assert "batch_size" not in message
    assert len(message.splitlines()) == 2


def test_spec_quoted_number_names_fix(tmp_path):
    message = _load_error(_write_study(tmp_path, **{"grid.power": [1.0, "1.2"]}))
    assert "grid.power.1" in message
    assert "write numbers without quotes" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"eval_every_steps": 2.5}, "(got 2.5); write a whole number"),
        ({"eval_every_steps": "often"}, "(got 'often'); write a whole number"),
        ({"train.weight_decay": "none"}, "(got 'none'); write a number"),
        ({"grid.power": 1.2}, "(got 1.2); write a list, such as [1.2]"),
        ({"grid.power": "all"}, "(got 'all'); write a list in square brackets"),
        ({"model": "tiny"}, "(got 'tiny'); write a mapping of keys to values"),
        ({"target.stop": "maybe"}, "(got 'maybe'); write true or false"),
        ({"eval_every_steps": True}, "(got True); YAML reads yes, no, on and off"),
    ],
)
def test_spec_type_error_names_fix(tmp_path, change, expected):
    assert expected in _load_error(_write_study(tmp_path, **change))


def test_cli_list_skips_torch():
    """`study list` validates every study without importing the trainers."""
    code = (
        "import sys; from study.cli import main; main(['list']); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.splitlines()[-1] == "[]"


def test_spec_error_names_line(tmp_path):
    path = _write_text(
        tmp_path, MINIMAL_STUDY.replace("batch_size: [8]", "batch_size: [0]")
    )
    message = _load_error(path)
    assert "scales.smoke.workloads.lm.grid.batch_size (line 8)" in message


@pytest.mark.parametrize("entry", ["5", "null"])
def test_spec_rejects_non_mapping_entry(tmp_path, entry):
    text = MINIMAL_STUDY.split("      lm:\n")[0] + f"      lm: {entry}\n"
    message = _load_error(_write_text(tmp_path, text))
    assert "scales.smoke.workloads.lm" in message


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("missing/study.yaml", "not found"),
        ("missing.yaml", "not found"),
        ("DIR", "is a directory"),
    ],
)
def test_spec_missing_path_is_not_found(tmp_path, argument, expected):
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    argument = str(directory) if argument == "DIR" else str(tmp_path / argument)
    message = _load_error(argument)
    assert argument in message
    assert expected in message
    assert "Unknown study" not in message


@pytest.mark.parametrize(
    ("scale_name", "label"), [("paper", "lm"), ("paper_large_batch", "vision")]
)
def test_spec_rejects_more_cpus_than_local_machine(scale_name, label):
    scale = load_study("batch_power_grid").scale(scale_name)
    with pytest.raises(StudyFileError) as error:
        check_local_resources(scale, scale_name, cpu_count=2)
    message = str(error.value)
    assert f"scales.{scale_name}.workloads.{label}.resources.cpu 8" in message
    assert "--ray-address" in message


@pytest.mark.parametrize("scale_name", ["paper", "paper_large_batch"])
def test_spec_rejects_gpu_scale_without_gpus(scale_name):
    scale = load_study("batch_power_grid").scale(scale_name)
    with pytest.raises(StudyFileError) as error:
        check_local_resources(scale, scale_name, cpu_count=64, gpu_count=0)
    message = str(error.value)
    assert f"scales.{scale_name}.workloads." in message
    assert "resources.gpu 1 is more than this machine has (no GPU" in message
    assert "--ray-address" in message


def test_spec_names_all_missing_resources():
    scale = load_study("batch_power_grid").scale("paper")
    with pytest.raises(StudyFileError) as error:
        check_local_resources(scale, "paper", cpu_count=2, gpu_count=0)
    lines = str(error.value).splitlines()
    assert lines[0] == "scale 'paper' needs more than this machine has:"
    assert [line.split(" is more")[0].strip() for line in lines[1:]] == [
        "scales.paper.workloads.lm.resources.cpu 8",
        "scales.paper.workloads.lm.resources.gpu 1",
        "scales.paper.workloads.vision.resources.cpu 4",
        "scales.paper.workloads.vision.resources.gpu 0.5",
    ]


def test_spec_accepts_gpus_the_machine_has():
    scale = load_study("batch_power_grid").scale("paper")
    check_local_resources(scale, "paper", cpu_count=64, gpu_count=1)
    with pytest.raises(StudyFileError, match="lm.resources.gpu 1 is more"):
        check_local_resources(scale, "paper", cpu_count=64, gpu_count=0)


def test_spec_accepts_cpus_the_machine_has():
    scale = load_study("batch_power_grid").scale("smoke")
    check_local_resources(scale, "smoke", cpu_count=1)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"grid.seed": [-1]}, "seed -1 is invalid"),
        ({"model": {"preset": "huge"}}, "'huge' is unknown"),
        ({"data.source": "wikipedia"}, "'wikipedia' is unknown"),
        ({"grid.power": [1.0, 1.0, 1.2]}, "lists 1.0 twice"),
    ],
)
def test_cli_invalid_setting_writes_nothing(tmp_path, capsys, change, expected):
    workspace = tmp_path / "ws"
    path = _write_study(tmp_path, **change)
    code = main(["run", str(path), "--scale", "smoke", "--workspace", str(workspace)])
    assert code == 2
    error = capsys.readouterr().err
    assert expected in error
    assert error.count("error:") == 1
    assert not workspace.exists()


# Settings of the smoke lm entry of batch_power_grid that stream a hub corpus:
# 100 steps x batch_size 8 (the larger of 4 and 8) x seq_len 32 = 25600 tokens.
HUB_SETTINGS = {
    "data.tokenizer": "pretrained",
    "data.tokenizer_path": "google-t5/t5-base",
    "budget.steps": 100,
}


@pytest.mark.parametrize("source", ["c4_hub", "openwebtext_hub"])
def test_spec_hub_source_needs_max_train_tokens(tmp_path, source):
    path = _write_study(tmp_path, **HUB_SETTINGS, **{"data.source": source})

    message = _load_error(path)

    assert "scales.smoke.workloads.lm.data" in message
    assert f"source {source} streams from the Hugging Face hub" in message
    assert "max_train_tokens is not set" in message
    assert "before any trial starts" in message
    assert "set max_train_tokens to 25600" in message
    assert "budget.steps 100 x batch_size 8 x seq_len 32" in message


def test_spec_capped_hub_source_loads(tmp_path):
    changes = {**HUB_SETTINGS, "data.source": "c4_hub", "data.max_train_tokens": 25600}
    path = _write_study(tmp_path, **changes)

    entry = load_study(str(path)).scale("smoke").workloads["lm"]

    assert entry.data["max_train_tokens"] == 25600


def _write_vision_budget(tmp_path: Path, budget: dict, **settings) -> Path:
    """Write batch_power_grid with `budget` and `settings` in its smoke vision entry."""

    def edit(entry):
        entry["budget"] = budget
        for key, value in settings.items():
            if isinstance(value, dict):
                value = {**entry.get(key, {}), **value}
            entry[key] = value

    return _write_entry(tmp_path, "batch_power_grid", "vision", edit)


def _step_budgets(scale, label: str) -> dict[int, int]:
    plans = expand(scale, {label: {}})
    return {plan.params["batch_size"]: plan.config["step_budget"] for plan in plans}


def test_epoch_budget_cifar10_steps_per_batch_size():
    scale = load_study("batch_power_grid").scale("paper")

    budgets = _step_budgets(scale, "vision")

    # 200 epochs of CIFAR-10's 50,000 training images.
    assert budgets == {32: 312500, 64: 156250, 128: 78125}


@pytest.mark.parametrize(
    ("train_examples", "expected"),
    [
        # 3 epochs x 2000 images / batch 32 = 187.5 steps, rounded up.
        (2000, {16: 375, 32: 188}),
        # Fashion-MNIST has 60,000 training images, so a larger value keeps all.
        (100000, {16: 11250, 32: 5625}),
    ],
)
def test_epoch_budget_train_examples(tmp_path, train_examples, expected):
    data = {"train_examples": train_examples}
    path = _write_vision_budget(tmp_path, {"epochs": 3}, data=data)
    scale = load_study(str(path)).scale("smoke")

    assert _step_budgets(scale, "vision") == expected


def test_step_budget_same_for_every_batch_size():
    scale = load_study("batch_power_grid").scale("smoke")

    assert _step_budgets(scale, "vision") == {16: 16, 32: 16}


@pytest.mark.parametrize(
    ("budget", "settings", "location", "expected"),
    [
        ({"steps": 16, "epochs": 3}, {}, "budget", "sets both steps 16 and epochs 3"),
        ({}, {}, "budget", "sets neither steps nor epochs; add `steps: N`"),
        ({"epochs": 0}, {}, "budget.epochs", "(got 0)"),
        (
            {"epochs": 1},
            {"train": {"warmup_steps": 100}},
            "train.warmup_steps",
            "warmup_steps 100 exceeds the step budget 64 of batch size 32",
        ),
        (
            {"epochs": 1},
            {"eval_every_steps": 100},
            "eval_every_steps",
            (
                "eval_every_steps 100 exceeds the step budget 64 of batch size 32, "
                "so trials are evaluated only at their last step"
            ),
        ),
        (
            {"steps": 16},
            {"eval_every_steps": 17},
            "eval_every_steps",
            "set eval_every_steps to 16 or less",
        ),
        (
            {"epochs": 1},
            {"fault_injection": {"nan_loss_at_step": 100}},
            "fault_injection.nan_loss_at_step",
            (
                "nan_loss_at_step 100 is never reached at batch size 32, whose "
                "trials stop after 64 steps"
            ),
        ),
    ],
)
def test_spec_rejects_invalid_vision_budget(
    tmp_path, budget, settings, location, expected
):
    message = _load_error(_write_vision_budget(tmp_path, budget, **settings))

    assert f"scales.smoke.workloads.vision.{location}" in message
    assert expected in message


def test_spec_rejects_lm_epoch_budget(tmp_path):
    message = _load_error(_write_study(tmp_path, budget={"epochs": 3}))

    assert "scales.smoke.workloads.lm.budget" in message
    assert "budget.epochs 3 is for vision entries" in message
    assert "set budget.steps instead" in message


def test_spec_rejects_toy_budget(tmp_path):
    def edit(entry):
        entry["budget"] = {"epochs": 3}

    path = _write_entry(tmp_path, "toy_noise_regimes", "toy", edit)
    message = _load_error(path)

    assert "budget" in message
    assert "unknown key" in message


def test_paper_large_batch_scale_grid():
    scale = load_study("batch_power_grid").scale("paper_large_batch")
    plans = expand(scale, {"vision": {}})
    rates = {plan.params["batch_size"]: plan.params["lr_max"] for plan in plans}

    assert set(scale.workloads) == {"vision"}
    assert len(plans) == 6 * 7
    assert sorted(rates) == [256, 512, 1024, 2048, 4096, 8192]
    assert rates[512] == 5e-4
    for batch_size, rate in rates.items():
        assert rate == pytest.approx(5e-4 * math.sqrt(batch_size / 512), rel=2e-3)
    assert _step_budgets(scale, "vision") == {
        256: 39063,
        512: 19532,
        1024: 9766,
        2048: 4883,
        4096: 2442,
        8192: 1221,
    }
    assert {plan.config["micro_batch_size"] for plan in plans} == {256}
    assert {plan.config["model"]["preset"] for plan in plans} == {"resnet34"}
    assert scale.workloads["vision"].resources.gpu == 1


def test_cli_list_shows_paper_large_batch(capsys):
    assert main(["list"]) == 0

    output = capsys.readouterr().out
    assert "paper_large_batch   42 trials  (vision)" in output


@pytest.mark.parametrize(
    ("where", "name", "expected"),
    [
        ("study", "a/b", "name 'a/b' contains '/'"),
        ("study", "", "name '' is blank"),
        ("label", "lm/x", "scales.smoke.workloads.lm/x (line "),
        ("label", "a\nb", "scales.smoke.workloads.'a\\nb' (line "),
        ("label", " ", "name ' ' is blank"),
        ("setting", "x\\y", ".setting (line "),
        ("series", "s\tt", "contains '\\t'"),
        ("study", "x'y", 'contains "\'"'),
        ("label", 'a"b', "contains '\"'"),
    ],
)
def test_spec_rejects_names_unfit_for_files_and_keys(tmp_path, where, name, expected):
    spec = yaml.safe_load(available_studies()["adam_vs_adampower"].read_text())
    workloads = spec["scales"]["smoke"]["workloads"]
    label = next(iter(workloads))
    if where == "study":
        spec["name"] = name
    elif where == "label":
        workloads[name] = workloads.pop(label)
    else:
        workloads[label][where] = name
    path = tmp_path / "names.yaml"
    path.write_text(yaml.safe_dump(spec))
    message = _load_error(path)
    assert expected in message
    assert "leave out /" in message or "write one such as" in message


def test_spec_accepts_names_with_spaces_and_signs(tmp_path):
    spec = yaml.safe_load(available_studies()["batch_power_grid"].read_text())
    workloads = spec["scales"]["smoke"]["workloads"]
    workloads["lm a+b=ü"] = dict(workloads.pop("lm"), workload="lm")
    path = tmp_path / "names.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert "lm a+b=ü" in load_study(str(path)).scale("smoke").workloads


def test_spec_rejects_accuracy_target_in_percent(tmp_path):
    def edit(entry):
        entry["target"] = {"metric": "val/accuracy", "value": 93, "mode": "max"}

    message = _load_error(_write_entry(tmp_path, "batch_power_grid", "vision", edit))
    assert "scales.smoke.workloads.vision.target.value" in message
    assert "target value 93 is not an accuracy" in message
    assert "write 0.93 for 93%" in message


@pytest.mark.parametrize("command", ["analyze", "export-table", "report"])
def test_cli_reading_command_rejects_unknown_scale(tmp_path, capsys, command):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    argv = [command, "batch_power_grid", "--scale", "huge"]
    code = main([*argv, "--workspace", str(workspace)])
    assert code == 2
    error = capsys.readouterr().err
    assert "has no scale 'huge'; choose one of" in error
    assert "study run" not in error
    assert list(workspace.iterdir()) == []
