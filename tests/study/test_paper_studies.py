"""The fixed-budget studies (final loss after the whole budget) at the smoke scale.

One workspace runs lr_tune, then power_sweep with `--lr-from lr_tune`, then
adam_vs_adampower, muon_power and blockwise_lr, each through Ray Tune, MLflow
and Optuna, and the tests compare the exported tables with the recorded trials.
"""

from __future__ import annotations

import json
import math
import subprocess

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.analysis import load_runs
from study.cli import main
from study.lr_transfer import transfer_learning_rates
from study.spec import StudyFileError, available_studies, load_study
from tests.study.recorded_runs import record_run
from tests.study.resilience_support import child_runs, optuna_trials, study_command

pytestmark = pytest.mark.slow

FIXED_BUDGET_STUDIES = (
    "lr_tune",
    "power_sweep",
    "adam_vs_adampower",
    "muon_power",
    "blockwise_lr",
)


def _run(workspace, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        study_command(
            "run", name, "--scale", "smoke", "--workspace", str(workspace), *extra
        ),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Run every fixed-budget study once in one workspace, in dependency order."""
    workspace = tmp_path_factory.mktemp("paper_studies")
    results = {"lr_tune": _run(workspace, "lr_tune")}
    results["power_sweep"] = _run(workspace, "power_sweep", "--lr-from", "lr_tune")
    for name in ("adam_vs_adampower", "muon_power", "blockwise_lr"):
        results[name] = _run(workspace, name)
    return workspace, results


def _final_losses(workspace, study: str) -> pd.DataFrame:
    rows = []
    for trial in optuna_trials(workspace, study):
        rows.append(
            {
                **trial.params,
                "key": trial.user_attrs["trial_key"],
                "label": trial.user_attrs["trial_key"].split("/")[0],
                "state": trial.user_attrs["end_state"],
                "loss": trial.value,
                "params": trial.user_attrs.get("model_params"),
                "steps": trial.user_attrs["steps_done"],
            }
        )
    return pd.DataFrame(rows)


def _parent_run(workspace, study: str):
    """Return the one MLflow parent run of `study` in the workspace."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    (parent,) = [
        run
        for run in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" not in run.data.tags
    ]
    return parent


def _export(workspace, study: str, suffix: str):
    (path,) = (workspace / "exports").glob(f"{study}-smoke-*{suffix}")
    return path


@pytest.mark.parametrize("name", FIXED_BUDGET_STUDIES)
def test_every_trial_trains_its_whole_budget(studies, name):
    workspace, results = studies
    completed = results[name]
    assert completed.returncode == 0, completed.stderr[-3000:]
    scale = load_study(name).scale("smoke")
    size = sum(entry.grid.size() for entry in scale.workloads.values())
    runs = child_runs(workspace, name)
    assert len(runs) == size
    assert {run.data.tags["end_state"] for run in runs} == {"complete"}
    trials = _final_losses(workspace, name)
    assert len(trials) == size
    assert set(trials.state) == {"complete"}
    budgets = {entry.budget.steps for entry in scale.workloads.values()}
    assert set(trials.steps) == budgets
    for run in runs:
        # The Optuna objective is the final validation loss of the MLflow run.
        trial = trials[trials.key == run.data.tags["trial_key"]].iloc[0]
        assert trial.loss == pytest.approx(run.data.metrics["val/loss"])
    assert (trials.params > 0).all()


def test_lr_tune_picks_the_lowest_final_loss(studies):
    workspace, _ = studies
    trials = _final_losses(workspace, "lr_tune")
    expected = trials.loc[trials.loss.idxmin(), "lr_max"]
    best = json.loads(_export(workspace, "lr_tune", "best_lr.json").read_text())
    assert [(row["batch_size"], row["lr_max"]) for row in best] == [(4, expected)]
    grid = pd.read_csv(_export(workspace, "lr_tune", "-lr-grid.csv"))
    assert sorted(grid.lr_max) == sorted(trials.lr_max)
    assert list(grid[grid.best].lr_max) == [expected]


def test_power_sweep_runs_at_the_tuned_rate(studies):
    workspace, results = studies
    tuned = _final_losses(workspace, "lr_tune")
    best_lr = tuned.loc[tuned.loss.idxmin(), "lr_max"]
    assert f"lm: bs 4: {best_lr:g}" in results["power_sweep"].stdout
    sweep = _final_losses(workspace, "power_sweep")
    assert set(sweep.lr_max) == {best_lr}

    parent = _parent_run(workspace, "power_sweep")
    assert parent.data.tags["lr_from"].startswith("lr_tune run ")
    assert json.loads(parent.data.tags["lr_overrides"]) == {"lm": {"4": best_lr}}

    best_power = pd.read_csv(_export(workspace, "power_sweep", "-best-power.csv"))
    assert (
        float(best_power.best_power.iloc[0]) == sweep.loc[sweep.loss.idxmin(), "power"]
    )
    assert _export(workspace, "power_sweep", "-loss-vs-power.png").stat().st_size > 0


def _gaps(workspace, study: str) -> pd.DataFrame:
    return pd.read_csv(_export(workspace, study, "-gaps.csv"))


def test_adam_vs_adampower_gap_and_scaling_fit(studies):
    workspace, results = studies
    trials = _final_losses(workspace, "adam_vs_adampower")
    gaps = _gaps(workspace, "adam_vs_adampower")
    assert set(gaps.setting) == {"llama_tiny", "llama_cpu_s", "qwen2moe_tiny"}
    for label, group in trials.groupby("label"):
        adam = group[group.power == 1.0].loss.iloc[0]
        power = group[group.power == 1.2].loss.iloc[0]
        row = gaps[(gaps.setting == label) & (gaps.variant == "AdamPower")]
        assert float(row.gap.iloc[0]) == pytest.approx(adam - power, abs=1e-4)
    # The two LLaMA sizes of the llama-cos series differ in parameter count.
    sizes = trials[trials.label.isin(["llama_tiny", "llama_cpu_s"])].params
    assert sizes.nunique() == 2
    assert "llama-cos" in results["adam_vs_adampower"].stdout


def _parent_metrics(workspace, study: str) -> dict[str, float]:
    return _parent_run(workspace, study).data.metrics


def test_parent_runs_carry_the_headline_numbers(studies):
    workspace, _ = studies
    gaps = _gaps(workspace, "blockwise_lr")
    metrics = _parent_metrics(workspace, "blockwise_lr")
    names = {
        "AdamPower": "AdamPower",
        "Adam + Blockwise LR": "Adam_Blockwise_LR",
        "AdamPower + Blockwise LR": "AdamPower_Blockwise_LR",
    }
    compared = gaps[gaps.status == "ok"]
    assert set(compared.variant) == set(names)
    for row in compared.itertuples():
        name = f"gap/llama-tiny/bs_4/{names[row.variant]}"
        assert metrics[name] == pytest.approx(row.gap)

    tuned = _final_losses(workspace, "lr_tune")
    best_lr = tuned.loc[tuned.loss.idxmin(), "lr_max"]
    assert _parent_metrics(workspace, "lr_tune") == {"best_lr/llama_tiny/bs_4": best_lr}

    sweep = _parent_metrics(workspace, "power_sweep")
    best_power = pd.read_csv(_export(workspace, "power_sweep", "-best-power.csv"))
    assert sweep["p_star/lm/bs_4/Adam"] == pytest.approx(best_power.p_star.iloc[0])
    assert {name for name in sweep if name.startswith("gap/")} == {
        "gap/lm/bs_4/AdamPower_p_0.8",
        "gap/lm/bs_4/AdamPower_p_1.2",
    }


def test_muon_power_compares_with_muon(studies):
    workspace, _ = studies
    gaps = _gaps(workspace, "muon_power")
    assert list(gaps.variant) == ["Muon", "MuonPower"]
    assert gaps.baseline.iloc[1] == "Muon"


def test_blockwise_lr_puts_four_variants_in_one_row(studies):
    workspace, _ = studies
    gaps = _gaps(workspace, "blockwise_lr")
    assert set(gaps.setting) == {"llama-tiny"}
    assert set(gaps.variant) == {
        "Adam",
        "AdamPower",
        "Adam + Blockwise LR",
        "AdamPower + Blockwise LR",
    }
    assert set(gaps.baseline.dropna()) - {"(baseline)"} == {"Adam"}


def test_lr_from_rejects_a_run_started_without_it(studies, capsys):
    """Continuing an unfinished run with other rates would change its grid."""
    workspace, _ = studies
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    parent = _parent_run(workspace, "blockwise_lr")
    before = len(child_runs(workspace, "blockwise_lr"))
    client.update_run(parent.info.run_id, status="RUNNING")
    try:
        code = main(
            ["run", "blockwise_lr", "--scale", "smoke", "--workspace", str(workspace)]
            + ["--lr-from", "lr_tune"]
        )
    finally:
        client.set_terminated(parent.info.run_id)
    assert code == 2
    error = capsys.readouterr().err
    assert "started with the study file's lr_max" in error
    assert "--fresh" in error
    assert len(child_runs(workspace, "blockwise_lr")) == before


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--lr-from", "batch_power_grid"], "has analysis 'power_trend', not lr_tune"),
        (["--lr-from", "no_such_study"], "Unknown study 'no_such_study'"),
        (["--lr-from-run", "20260101-000000-abcd"], "needs --lr-from STUDY"),
        (["--lr-from", "power_sweep"], "names the study being run"),
        (["--lr-from", ""], "--lr-from is empty"),
    ],
)
def test_lr_from_rejects_bad_values(tmp_path, capsys, extra, expected):
    code = main(
        ["run", "power_sweep", "--scale", "smoke", "--workspace", str(tmp_path)] + extra
    )
    assert code == 2
    assert expected in capsys.readouterr().err
    # Rejected before the workspace's stores were created.
    assert not (tmp_path / "mlflow.db").exists()


def test_lr_from_without_a_recorded_tuning_run(tmp_path, capsys):
    code = main(
        ["run", "power_sweep", "--scale", "smoke", "--workspace", str(tmp_path)]
        + ["--lr-from", "lr_tune"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "lr_tune" in error
    assert "study run lr_tune --scale smoke" in error
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "optuna.db").exists()


def test_lr_from_rejects_an_unfinished_tuning_run(studies, tmp_path):
    """A tuning run with fewer recorded trials than its grid is not used."""
    workspace, _ = studies
    tuning = _bundled("lr_tune")
    entry = tuning["scales"]["smoke"]["workloads"]["llama_tiny"]
    entry["grid"]["lr_max"] = [*entry["grid"]["lr_max"], 0.1]
    path = tmp_path / "lr_tune.yaml"
    path.write_text(yaml.safe_dump(tuning))

    with pytest.raises(StudyFileError, match="has recorded 3 of its 4 trials"):
        transfer_learning_rates(
            f"sqlite:///{workspace / 'optuna.db'}",
            str(path),
            load_study("power_sweep"),
            "smoke",
        )


def _bundled(name: str) -> dict:
    return yaml.safe_load(available_studies()[name].read_text())


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        (
            "power_sweep",
            lambda lm: lm.update(target={"metric": "val/loss", "value": 4.0}),
            r"workloads\.lm\.target \(line \d+\): a target is set, but the compare",
        ),
        (
            "lr_tune",
            lambda lm: lm["grid"].update(power=[1.0, 1.2]),
            r"llama_tiny\.grid\.power \(line \d+\): power is .* lr_tune tunes",
        ),
        (
            "batch_power_grid",
            lambda lm: lm.pop("target"),
            r"workloads\.lm \(line \d+\): no target is set; the power_trend",
        ),
    ],
)
def test_analysis_kind_checks_the_target(tmp_path, name, change, expected):
    spec = _bundled(name)
    entry = next(iter(spec["scales"]["smoke"]["workloads"].values()))
    change(entry)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyFileError, match=expected):
        load_study(str(path))


def test_lr_from_rejects_the_toy_study(tmp_path, capsys):
    code = main(
        ["run", "toy_noise_regimes", "--scale", "smoke", "--workspace", str(tmp_path)]
        + ["--lr-from", "lr_tune"]
    )
    assert code == 2
    assert "has no lr_max to set" in capsys.readouterr().err


def _write_variant(tmp_path, name: str, change) -> str:
    spec = _bundled(name)
    change(spec["scales"]["smoke"]["workloads"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_setting_without_a_baseline_is_rejected(tmp_path):
    """A misspelt setting leaves the blockwise entry without its Adam baseline."""
    path = _write_variant(
        tmp_path,
        "blockwise_lr",
        lambda workloads: workloads["blockwise"].update(setting="llama-tny"),
    )
    with pytest.raises(StudyFileError) as error:
        load_study(path)
    message = str(error.value)
    assert "setting 'llama-tny' has adampower entries only with blockwise_lr" in message
    assert "['llama-tiny', 'llama-tny']" in message


def test_series_with_one_model_twice_is_rejected(tmp_path):
    path = _write_variant(
        tmp_path,
        "adam_vs_adampower",
        lambda workloads: workloads["llama_cpu_s"].update(model={"preset": "tiny"}),
    )
    with pytest.raises(StudyFileError, match="use the same model"):
        load_study(path)


def test_series_with_one_entry_is_rejected(tmp_path):
    path = _write_variant(
        tmp_path,
        "adam_vs_adampower",
        lambda workloads: workloads["llama_cpu_s"].update(series="other"),
    )
    with pytest.raises(StudyFileError, match="has one entry"):
        load_study(path)


def test_report_writes_one_page_per_run(studies, capsys):
    workspace, _ = studies
    code = main(
        ["report", "blockwise_lr", "--scale", "smoke", "--workspace", str(workspace)]
    )
    assert code == 0
    page = _export(workspace, "blockwise_lr", "-report.html").read_text()
    assert "Gap to the baseline" in page
    assert "AdamPower + Blockwise LR" in page
    assert "data:image/png;base64," in page


def _export_muon_power(workspace, *options: str) -> int:
    scale = ["--scale", "smoke", "--workspace", str(workspace)]
    return main(["export-table", "muon_power", *scale, *options])


def test_export_table_writes_the_chosen_format(studies, tmp_path, capsys):
    workspace, _ = studies
    for path in (workspace / "exports").glob("muon_power-smoke-*"):
        path.unlink()
    code = _export_muon_power(workspace, "--format", "latex")
    assert code == 0
    written = {
        path.suffix for path in (workspace / "exports").glob("muon_power-smoke-*")
    }
    assert written == {".tex", ".png"}


def test_export_table_rejects_time_metrics_on_comparisons(studies, capsys):
    workspace, _ = studies
    code = _export_muon_power(workspace, "--metric", "seconds")
    assert code == 2
    assert "compares final states" in capsys.readouterr().err


def test_epoch_budget_recorded_per_trial(tmp_path):
    # Plans 0 and 41 are the first and last grid points: batch 256 and 8192.
    workspace = tmp_path / "ws"
    recorded = record_run(
        workspace,
        {0: "reached", 41: "reached"},
        study="batch_power_grid",
        scale="paper_large_batch",
    )
    keys = {recorded.plans[0].key: 39063, recorded.plans[41].key: 1221}

    trials = optuna_trials(workspace, "batch_power_grid")
    params = {
        run.data.tags["trial_key"]: run.data.params["step_budget"]
        for run in child_runs(workspace, "batch_power_grid")
    }
    [run] = load_runs(
        recorded.workspace.optuna_storage, "batch_power_grid", "paper_large_batch"
    )

    assert {t.user_attrs["trial_key"]: t.user_attrs["step_budget"] for t in trials} == (
        keys
    )
    assert params == {key: str(steps) for key, steps in keys.items()}
    assert run.budget_epochs == 200
    assert run.budget_steps == 39063
    assert run.budget_text == "200 epochs"


@pytest.mark.parametrize(
    "study",
    [
        "batch_power_grid",
        "power_sweep",
        "muon_power",
        "blockwise_lr",
        "adam_vs_adampower",
    ],
)
def test_lr_tune_covers_paper_entries(study):
    """Every batch size of the paper scales that take --lr-from finds exactly one
    tuning entry; batch_power_grid's above 512 take the entry with its data."""
    from study.compare_analysis import BestRate
    from study.lr_transfer import _match
    from study.spec import training_entries

    tuning = training_entries(load_study("lr_tune").scale("paper"))
    rates = [
        BestRate(label, entry.workload or label, dict(entry.model), dict(entry.data),
                 batch_size, 0.001, 3.0, 1, "run")
        for label, entry in tuning.items()
        for batch_size in entry.grid.batch_size
    ]  # fmt: skip
    for label, entry in training_entries(load_study(study).scale("paper")).items():
        for batch_size in entry.grid.batch_size:
            matches = _match(rates, label, entry, batch_size)
            assert len(matches) == 1, (label, batch_size, [m.label for m in matches])
            if study == "batch_power_grid" and batch_size > 512:
                assert matches[0].label in {
                    "llama_0.2b_c4_batch_grid",
                    "resnet34_cifar10",
                }


def test_curve_gap_ends_at_final_gap(studies):
    """The curve table's gap at 100% of the budget is the gap table's final gap
    (one seed, evaluated at the last step), read from the MLflow histories."""
    workspace, results = studies
    assert "## Gap during training" in results["adam_vs_adampower"].stdout
    gaps = _gaps(workspace, "adam_vs_adampower")
    curves = pd.read_csv(
        _export(workspace, "adam_vs_adampower", "-gap-during-training.csv")
    )
    assert len(curves) == len(gaps[gaps.status == "ok"])
    for row in curves.itertuples():
        final = gaps[(gaps.setting == row.setting) & (gaps.variant == row.variant)]
        assert row.gap_100 == pytest.approx(float(final.gap.iloc[0]), abs=1e-6)
        # Budgets of 50 steps or fewer have no step to judge for spikes.
        assert math.isnan(row.spikes)
        assert math.isnan(row.baseline_spikes)
    assert _export(workspace, "adam_vs_adampower", "-loss-curves.png").stat().st_size
    output = results["adam_vs_adampower"].stdout
    assert "finding: llama_tiny, batch size" in output
    assert "loss spikes not counted, the budget is under 50 steps" in output


def test_table1_scores_2b_c4_model():
    """Table 1 of the GradPower paper evaluates its C4 LLaMA-2B models on six benchmarks."""
    from study.spec import training_entries
    from trainers.tables import DOWNSTREAM_COLUMNS

    paper = training_entries(load_study("adam_vs_adampower").scale("paper"))
    scored = {label: entry for label, entry in paper.items() if entry.downstream}

    assert list(scored) == ["llama_2b_c4_cos"]
    entry = scored["llama_2b_c4_cos"]
    assert entry.model == {"family": "llama", "preset": "2b"}
    assert entry.grid.power == [1.0, 1.2]
    assert entry.downstream.tasks == list(DOWNSTREAM_COLUMNS)
    assert entry.downstream.dir is None
    assert entry.downstream.max_examples is None
