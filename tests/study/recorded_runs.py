"""Record study runs in a workspace's real sqlite stores without Ray.

The recorder is the one that `study run` uses from its Tune callback, so the
stores hold what an interrupted or finished run leaves behind.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import RunStatus

from study.grid import TrialPlan, expand
from study.recording import RunInfo, StudyRecorder, ensure_experiment
from study.runner import StudyRun, _create_parent_run, new_run_id, progress_unit
from study.spec import load_study
from study.workspace import Workspace

STUDY = "batch_power_grid"
SCALE = "smoke"


def smoke_plans(study: str = STUDY, scale: str = SCALE) -> list[TrialPlan]:
    """Return the grid of a study scale, with each workload's data settings empty
    because no trial is trained."""
    scale_spec = load_study(study).scale(scale)
    return expand(scale_spec, {label: {} for label in scale_spec.workloads})


def reached_result(plan: TrialPlan, steps: int) -> dict:
    return {
        "end_state": "reached",
        "step": steps,
        "target/steps": steps,
        "target/tokens": steps * plan.params["batch_size"] * 32,
        "target/examples": steps * plan.params["batch_size"],
        "target/train_sec": 0.5 * steps,
        "val/loss": 3.0,
        "train/loss": 3.1,
    }


def record_run(
    root: Path,
    finished: dict[int, str],
    study: str = STUDY,
    scale: str = SCALE,
    parent_status: str = "RUNNING",
) -> StudyRun:
    """Record one run of `study` in the workspace at `root`.

    `finished` maps plan indexes to the end state of their trial, `reached`
    or `failed`. The other grid points stay unfinished, as after an
    interrupted run. The MLflow parent run ends with `parent_status`.
    """
    workspace = Workspace.open(root)
    client = workspace.open_stores()
    plans = smoke_plans(study, scale)
    run = RunInfo(study, scale, new_run_id())
    experiment_id = ensure_experiment(client, study, workspace.artifact_root.as_uri())
    spec_scale = load_study(study).scale(scale)
    parent_run_id = _create_parent_run(
        client, experiment_id, run, plans, spec_scale, workspace
    )
    units = {
        label: progress_unit(label, entry)
        for label, entry in spec_scale.workloads.items()
    }
    recorder = StudyRecorder(
        workspace.tracking_uri,
        workspace.optuna_storage,
        experiment_id,
        parent_run_id,
        run,
        plans,
        units,
    )
    recorder.connect()
    end_states = {}
    for index, state in finished.items():
        plan = plans[index]
        recorder.start(plan.key)
        if state == "failed":
            recorder.finish(plan.key, errored=True, error="RuntimeError: boom")
        else:
            recorder.result(plan.key, reached_result(plan, 8 + index))
            recorder.finish(plan.key, errored=False)
        end_states[plan.key] = state
    if parent_status != "RUNNING":
        client.set_terminated(parent_run_id, parent_status)
    return StudyRun(
        run=run,
        workspace=workspace,
        plans=plans,
        parent_run_id=parent_run_id,
        end_states=end_states,
        wall_seconds=1.0,
        unfinished=[p.key for i, p in enumerate(plans) if i not in finished],
    )


FINISHED = RunStatus.to_string(RunStatus.FINISHED)
