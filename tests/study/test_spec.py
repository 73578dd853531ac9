"""Study files and CLI values are rejected before Ray starts, with the fix named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study.cli import main
from study.spec import StudyFileError, available_studies, load_study


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
