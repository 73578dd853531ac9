"""The `study` command: list, run, train, analyze, export-table, report and ui."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from study.invocation import command_name
from study.spec import (
    MAX_SEED,
    SCALES,
    StudyFileError,
    available_studies,
    check_local_resources,
    load_study,
    step_budget,
)
from study.workspace import (
    DEFAULT_DATA_CACHE,
    Workspace,
    check_data_cache_writable,
    check_stores,
    open_tracking_client,
)
from trainers.data.errors import DataUnavailableError

logger = logging.getLogger("study")

# The run ended, but at least one trial ended `failed`.
EXIT_TRIALS_FAILED = 1
EXIT_BAD_INPUT = 2
# 128 + the signal number, as shells report a process that a signal ended.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


class SigtermAsInterrupt:
    """While active, SIGTERM stops the command the way Ctrl-C (SIGINT) does.

    During a Ray Tune run the current SIGINT handler is Tune's, which stops
    the trials and saves the experiment for `study resume`; elsewhere SIGTERM
    raises KeyboardInterrupt. `received` records whether SIGTERM arrived.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous = None

    def __enter__(self) -> Self:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        # None: the previous handler was not installed from Python.
        previous = signal.SIG_DFL if self._previous is None else self._previous
        signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum, frame) -> None:
        self.received = True
        sigint_handler = signal.getsignal(signal.SIGINT)
        if callable(sigint_handler):
            sigint_handler(signal.SIGINT, frame)
        else:
            # SIGINT is ignored (SIG_IGN) or left to the OS (SIG_DFL).
            raise KeyboardInterrupt


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        default="studies",
        help="directory for the MLflow and Optuna stores, Ray results and exports "
        "(default: ./studies)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: sqlite:///WORKSPACE/mlflow.db)",
    )
    parser.add_argument(
        "--optuna-storage",
        help="Optuna storage URL (default: sqlite:///WORKSPACE/optuna.db)",
    )


def _add_study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", help="study name from `study list`, or a study YAML path"
    )
    parser.add_argument(
        "--scale",
        default="cpu",
        help=f"one of {', '.join(SCALES)} (default: cpu)",
    )


# `study` options for the time to target, and the analysis metric each selects.
TIME_METRIC_CHOICES = {
    "steps": "steps",
    "tokens": "progress",
    "examples": "progress",
    "seconds": "seconds",
}
# Both name the progress to the target, which each workload counts in its own
# unit: tokens for language models, examples for image classifiers.
PROGRESS_METRICS = ("tokens", "examples")
TIME_METRIC_HELP = (
    "steps: optimizer steps to the target (default); tokens or examples: the "
    "progress to the target in the workload's unit (tokens for language models, "
    "examples for image classifiers, whichever is given); "
    "seconds: training seconds to the target. Only power_trend studies take "
    "--metric"
)
TABLE_METRIC_CHOICES = [
    *TIME_METRIC_CHOICES,
    "final_loss",
    "final_accuracy",
    "at_best_step",
]
TABLE_METRIC_HELP = (
    "steps: optimizer steps to the target (default); tokens or examples: the "
    "progress to the target in the workload's unit (tokens for language models, "
    "examples for image classifiers, whichever is given); "
    "seconds: training seconds to the target; final_loss, final_accuracy: the last "
    "recorded val/loss or val/accuracy; at_best_step: the target metric at the "
    "step where the row's best power reaches the target. Only power_trend studies "
    "take --metric"
)


def _add_analysis_options(
    parser: argparse.ArgumentParser, metrics: list[str], metric_help: str
) -> None:
    parser.add_argument("--run-id", help="recorded run to read (default: the latest)")
    # The default is None rather than steps, so that a --metric given to a
    # study without times to a target is rejected rather than ignored.
    parser.add_argument("--metric", choices=metrics, help=metric_help)
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.9,
        help="level of the bootstrap and slope confidence intervals (default: 0.9)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=2000,
        help="bootstrap resamples of the seeds (default: 2000)",
    )
    parser.add_argument(
        "--bootstrap-seed",
        type=int,
        default=0,
        help="random seed of the bootstrap (default: 0)",
    )


def _add_lr_from_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lr-from",
        metavar="STUDY",
        help="take each workload's lr_max per batch size from the latest recorded "
        "run of this lr_tune study at the same scale in this workspace",
    )
    parser.add_argument(
        "--lr-from-run",
        metavar="RUN_ID",
        help="with --lr-from: read this run of the tuning study instead of the latest",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="study",
        description="Run the GradPower paper's studies with Ray Tune, "
        "recorded in MLflow and Optuna.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("list", help="list the studies and their scales")

    run = commands.add_parser("run", help="run every trial of a study scale")
    _add_study_options(run)
    _add_store_options(run)
    run.add_argument(
        "--ray-address",
        help="join this Ray cluster (for example `auto`); default: start a local Ray",
    )
    run.add_argument(
        "--max-concurrent",
        type=int,
        help="trials running at once (default: as many as the cluster's CPUs allow)",
    )
    run.add_argument(
        "--data-cache",
        default=str(DEFAULT_DATA_CACHE),
        help="directory for token shards and image folders shared by all workspaces "
        f"(default: {DEFAULT_DATA_CACHE})",
    )
    _add_lr_from_options(run)
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run even if the workspace contains an unfinished run of "
        "this study and scale (default: continue that run)",
    )

    resume = commands.add_parser(
        "resume", help="continue the latest unfinished run of a study scale"
    )
    _add_study_options(resume)
    _add_store_options(resume)
    resume.add_argument(
        "--run-id", help="run to continue (default: the latest unfinished)"
    )
    resume.add_argument("--ray-address", help="join this Ray cluster")
    resume.add_argument("--data-cache", default=str(DEFAULT_DATA_CACHE))
    _add_lr_from_options(resume)

    train = commands.add_parser(
        "train", help="run one grid point in this process, without Ray or recording"
    )
    _add_study_options(train)
    train.add_argument(
        "--workload", help="workload entry of the study (default: the first)"
    )
    train.add_argument("--batch-size", type=int, help="default: the grid's first value")
    train.add_argument("--power", type=float, help="default: the grid's first value")
    train.add_argument("--lr-max", type=float, help="default: the grid's first value")
    train.add_argument("--seed", type=int, help="default: the grid's first value")
    train.add_argument("--data-cache", default=str(DEFAULT_DATA_CACHE))

    analyze = commands.add_parser(
        "analyze", help="best power per batch size and its trend, from recorded trials"
    )
    _add_study_options(analyze)
    _add_store_options(analyze)
    _add_analysis_options(analyze, list(TIME_METRIC_CHOICES), TIME_METRIC_HELP)

    export = commands.add_parser(
        "export-table",
        help="write batch size x power tables under WORKSPACE/exports and log them "
        "on the run's MLflow parent run",
    )
    _add_study_options(export)
    _add_store_options(export)
    _add_analysis_options(export, TABLE_METRIC_CHOICES, TABLE_METRIC_HELP)
    export.add_argument(
        "--format",
        action="append",
        choices=["md", "latex", "csv", "html"],
        help="table format; repeat for several (default: md and csv)",
    )
    export.add_argument(
        "--spread",
        action="store_true",
        help="show median ± standard deviation over seeds in cells with 2+ seeds",
    )

    report = commands.add_parser(
        "report",
        help="write one HTML page with tables, trend fits and plots under "
        "WORKSPACE/exports and log it on the run's MLflow parent run",
    )
    _add_study_options(report)
    _add_store_options(report)
    _add_analysis_options(report, list(TIME_METRIC_CHOICES), TIME_METRIC_HELP)

    ui = commands.add_parser(
        "ui", help="serve the MLflow UI for a workspace on 127.0.0.1"
    )
    _add_store_options(ui)
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    return parser


def command_list(args: argparse.Namespace) -> int:
    for name in available_studies():
        spec = load_study(name)
        print(f"{name}: {spec.description.strip()}")
        width = max(len(scale_name) for scale_name in spec.scales)
        for scale_name, scale in spec.scales.items():
            trials = sum(entry.grid.size() for entry in scale.workloads.values())
            workloads = ", ".join(scale.workloads)
            print(
                f"  {scale_name:{width}s} {trials:4d} trials  ({workloads}) "
                f"{scale.description}"
            )
    return 0


def _analysis_options(args: argparse.Namespace):
    from study.analysis import AnalysisOptions

    return AnalysisOptions(
        metric=TIME_METRIC_CHOICES.get(args.metric, "steps"),
        confidence=args.confidence,
        bootstrap_samples=args.bootstrap,
        bootstrap_seed=args.bootstrap_seed,
    )


def _recorded_tracking_uri(workspace: Workspace) -> str | None:
    """Return the tracking URI to read, or None where its sqlite file is missing,
    because opening a missing sqlite file creates an empty store."""
    uri = workspace.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return None
    return uri


def _load_analyses(workspace: Workspace, study: str, scale: str, run_id, options):
    from study.analysis import analyze_run, load_runs

    runs = load_runs(
        workspace.optuna_storage,
        study,
        scale,
        run_id,
        tracking_uri=_recorded_tracking_uri(workspace),
    )
    analyses = []
    for run in runs:
        if run.trials.empty:
            print(f"note: workload {run.label} has no finished trials yet; left out")
            continue
        analyses.append(analyze_run(run, options))
    return analyses


def _log_files(client, analysis, parent_run_id, paths, folder: str) -> None:
    from study.export import log_artifacts

    if client is None:
        return
    parent = parent_run_id or analysis.run.parent_run_id
    if log_artifacts(client, parent, paths, folder):
        print(f"logged {len(paths)} file(s) under {folder}/ on MLflow run {parent}")


def _log_fit_metrics(client, analyses, parent_run_id) -> None:
    """Log each workload's fitted slope and best powers on the run's parent run.

    All workloads go through one `metric_names` call, so labels that give the
    same metric name get distinct names."""
    from study.export import metric_names

    parent = parent_run_id or analyses[0].run.parent_run_id
    if client is None or not parent:
        return
    values = {}
    for analysis in analyses:
        label = analysis.run.label
        if analysis.linear:
            values["fit", label, "slope"] = analysis.linear.slope
            values["fit", label, "slope_ci_low"] = analysis.linear.slope_ci[0]
            values["fit", label, "slope_ci_high"] = analysis.linear.slope_ci[1]
        for row in analysis.best.dropna(subset=["p_star"]).itertuples():
            values["p_star", label, f"batch_{row.batch_size}"] = row.p_star
    for name, value in metric_names(values).items():
        client.log_metric(parent, name, value)


def _write_report(analyses, workspace: Workspace, client, parent_run_id=None) -> None:
    from dashboards.report import write_report

    page, images = write_report(analyses, workspace.exports)
    print(f"report: {page}")
    _log_files(client, analyses[0], parent_run_id, [page, *images], "report")


def _analyze_and_export(
    workspace: Workspace,
    study: str,
    scale: str,
    run_id,
    client=None,
    parent_run_id=None,
) -> list:
    """Print the analysis, write the tables and the report, and log them on the
    run's MLflow parent run when `client` is given."""
    from study.analysis import AnalysisOptions
    from study.export import export_tables, summary_text

    analyses = _load_analyses(workspace, study, scale, run_id, AnalysisOptions())
    for analysis in analyses:
        print("\n" + summary_text(analysis), end="")
    for analysis in analyses:
        paths = export_tables(analysis, workspace.exports)
        print(f"tables: {paths['md']} and {paths['csv']}")
        _log_files(client, analysis, parent_run_id, list(paths.values()), "exports")
    if analyses:
        _log_fit_metrics(client, analyses, parent_run_id)
        try:
            _write_report(analyses, workspace, client, parent_run_id)
        except Exception as error:  # noqa: BLE001 - the trials are recorded already
            logger.warning(
                "writing the report failed (%s: %s); retry with `%s report %s "
                "--scale %s --workspace %s`",
                type(error).__name__,
                error,
                command_name(),
                study,
                scale,
                shlex.quote(str(workspace.root)),
            )
    return analyses


def _check_lr_from(args: argparse.Namespace, spec) -> None:
    """Reject --lr-from values that cannot work, before any store is opened."""
    if args.lr_from_run and not args.lr_from:
        raise StudyFileError(
            f"--lr-from-run {args.lr_from_run} needs --lr-from STUDY, the tuning "
            "study that run belongs to"
        )
    if args.lr_from is None:
        return
    if not args.lr_from.strip():
        raise StudyFileError(
            "--lr-from is empty; pass the name of a tuning study such as lr_tune"
        )
    if spec.is_toy():
        raise StudyFileError(
            f"--lr-from {args.lr_from}: {spec.name} simulates the toy model and has "
            "no lr_max to set; run it without --lr-from"
        )
    tuning = load_study(args.lr_from)

    if tuning.name == spec.name:
        raise StudyFileError(
            f"--lr-from {args.lr_from} names the study being run; pass the tuning "
            "study, such as lr_tune"
        )
    if tuning.analysis != "lr_tune":
        raise StudyFileError(
            f"--lr-from {args.lr_from}: study {tuning.name!r} has analysis "
            f"{tuning.analysis!r}, not lr_tune; pass a learning-rate tuning study "
            "such as lr_tune"
        )
    tuning.scale(args.scale)

    # The rates come from this workspace's stores, so they must exist already;
    # checking here keeps a failed --lr-from from creating empty stores.
    root = Path(args.workspace).expanduser().resolve()
    try:
        workspace = Workspace.open(
            args.workspace, args.tracking_uri, args.optuna_storage, create=False
        )
    except StudyFileError as error:
        raise StudyFileError(
            f"--lr-from {tuning.name}: {error}. Run "
            f"`{_run_command(args, root, tuning.name)}` first"
        ) from None
    try:
        _require_recorded_run(args, workspace, tuning.name, tuning.name)
    except StudyFileError as error:
        raise StudyFileError(f"--lr-from {tuning.name}: {error}") from None


def _learning_rate_transfer(args, spec, workspace: Workspace, client, run_id):
    """Return the --lr-from rates of this run: new ones, or the ones a continued
    run started with. Raises StudyFileError when the two disagree."""
    from study.lr_transfer import recorded_transfer, transfer_learning_rates

    recorded = (
        recorded_transfer(client, spec.name, args.scale, run_id) if run_id else None
    )
    if not args.lr_from:
        if recorded is not None:
            print(f"run {run_id} took its learning rates from {recorded.source}")
        return recorded
    transfer = transfer_learning_rates(
        workspace.optuna_storage, args.lr_from, spec, args.scale, args.lr_from_run
    )
    if run_id and (recorded is None or recorded.overrides != transfer.overrides):
        started_with = recorded.source if recorded else "the study file's lr_max"
        raise StudyFileError(
            f"run {run_id} of {spec.name} started with {started_with}, not with the "
            f"rates of {transfer.source}; continue it without --lr-from, or pass "
            "--fresh to start a new run with the new rates"
        )
    return transfer


def _run_or_resume(
    args: argparse.Namespace, resume: bool, sigterm: SigtermAsInterrupt
) -> int:
    spec = load_study(args.name)
    spec.scale(args.scale)
    max_concurrent = getattr(args, "max_concurrent", None)
    if max_concurrent is not None and max_concurrent < 1:
        raise StudyFileError(
            f"--max-concurrent {max_concurrent} is invalid; use 1 or more"
        )
    _check_lr_from(args, spec)
    if not args.ray_address and not spec.is_toy():
        check_local_resources(spec.scale(args.scale), args.scale)
    check_stores(args.tracking_uri, args.optuna_storage, args.ray_address)
    if not spec.is_toy():
        check_data_cache_writable(args.data_cache)
    created = not resume and not Path(args.workspace).expanduser().exists()
    workspace = Workspace.open(
        args.workspace,
        args.tracking_uri,
        args.optuna_storage,
        args.data_cache,
        create=not resume,
    )
    if resume:
        _require_recorded_run(args, workspace, spec.name, args.name)
        workspace.require_recorded()
        workspace.require_writable(f"{command_name()} resume")
    with workspace.run_lock(spec.name, args.scale):
        try:
            return _run_or_resume_locked(args, resume, sigterm, spec, workspace)
        finally:
            if created:
                # Data that cannot be read stops `run` before anything is
                # recorded, and the folder that this command made goes again.
                workspace.remove_if_unused(spec.name, args.scale)


def _run_or_resume_locked(
    args: argparse.Namespace,
    resume: bool,
    sigterm: SigtermAsInterrupt,
    spec,
    workspace: Workspace,
) -> int:
    from study.runner import prepare_data, run_study

    # `resume` needs recorded stores, so the run is chosen and checked before
    # the data is prepared, which can take long. For `run`, data that cannot be
    # read stops the command before the stores exist.
    if resume:
        client = workspace.open_stores()
        run_id, transfer, spec = _choose_run(args, resume, spec, workspace, client)
        prepared = prepare_data(spec, args.scale, workspace)
    else:
        prepared = prepare_data(spec, args.scale, workspace)
        client = workspace.open_stores()
        run_id, transfer, spec = _choose_run(args, resume, spec, workspace, client)
    if run_id is not None:
        _check_data_folders(args, spec, workspace, client, run_id, prepared)
    if transfer is not None:
        print("\n".join(transfer.describe()))

    # The id of the run once it is recorded, for the hint after an interrupt
    # that Ray Tune did not handle, such as a second Ctrl-C while it stops.
    recorded = [run_id] if run_id is not None else []
    try:
        result = run_study(
            spec,
            args.scale,
            workspace,
            ray_address=args.ray_address,
            max_concurrent=getattr(args, "max_concurrent", None),
            resume_run_id=run_id,
            parent_tags=transfer.tags() if transfer else None,
            on_recorded=recorded.append,
            prepared=prepared,
        )
    except KeyboardInterrupt:
        run_recorded = recorded[-1] if recorded else None
        message = _interrupted_message(
            args, spec, workspace, run_recorded, sigterm.received, client
        )
        print(message, file=sys.stderr)
        return EXIT_TERMINATED if sigterm.received else EXIT_INTERRUPTED
    counts: dict[str, int] = {}
    for state in result.end_states.values():
        counts[state] = counts.get(state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    if result.unfinished:
        cause = " by SIGTERM" if sigterm.received else ""
        resume_command = _resume_command(args, workspace, getattr(args, "run_id", None))
        print(
            f"\nstudy {spec.name} ({args.scale}) stopped{cause} after "
            f"{result.wall_seconds:.0f} s with {len(result.unfinished)} of "
            f"{len(result.plans)} trials unfinished ({summary or 'none finished'}); "
            f"continue with: {resume_command}",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if sigterm.received else EXIT_INTERRUPTED
    print(
        f"\nstudy {spec.name} ({args.scale}) finished in "
        f"{result.wall_seconds:.0f} s: {summary}"
    )
    try:
        if _analysis_kind(spec) != "power_trend":
            _analyze_final_states(
                workspace,
                spec,
                args.scale,
                result.run.run_id,
                client,
                result.parent_run_id,
            )
        else:
            _analyze_and_export(
                workspace,
                spec.name,
                args.scale,
                result.run.run_id,
                client,
                result.parent_run_id,
            )
    except KeyboardInterrupt:
        message = _interrupted_message(
            args, spec, workspace, result.run.run_id, sigterm.received, client
        )
        print(message, file=sys.stderr)
        return EXIT_TERMINATED if sigterm.received else EXIT_INTERRUPTED
    print(f"\nCompare the trials in the MLflow UI: {_ui_command(args, workspace)}")
    failed = sorted(
        key for key, state in result.end_states.items() if state == "failed"
    )
    if failed:
        _print_failed_trials(args, spec, workspace, failed, len(result.plans))
        return EXIT_TRIALS_FAILED
    return 0


def _choose_run(
    args: argparse.Namespace, resume: bool, spec, workspace: Workspace, client
) -> tuple[str | None, Any, Any]:
    """Return the run to continue (None for a new one), the rates taken from
    --lr-from and the spec with those rates; stop when that run cannot be
    continued as asked."""
    from study.lr_transfer import apply_transfer
    from study.runner import find_continuable_run

    run_id = getattr(args, "run_id", None)
    if resume and run_id is None:
        run_id = find_continuable_run(client, spec.name, args.scale, workspace)
        if run_id is None:
            raise StudyFileError(
                f"Workspace {workspace.root} contains no unfinished run of "
                f"{spec.name} ({args.scale}) that can be continued; start one "
                f"with `{_run_command(args, workspace)}`"
            )
    elif resume:
        _check_resumable(args, spec, workspace, client, run_id)
    elif not args.fresh:
        run_id = find_continuable_run(client, spec.name, args.scale, workspace)
        if run_id is not None:
            print(
                f"continuing unfinished run {run_id} of {spec.name} "
                f"({args.scale}); pass --fresh to start a new run instead"
            )
    transfer = _learning_rate_transfer(args, spec, workspace, client, run_id)
    checked = spec
    if transfer is not None:
        checked = apply_transfer(spec, args.scale, transfer)
    if run_id is not None:
        _check_settings_unchanged(args, checked, workspace, client, run_id)
    return run_id, transfer, checked


def _check_resumable(
    args: argparse.Namespace, spec, workspace: Workspace, client, run_id: str
) -> None:
    """Fail before Ray starts when `study resume --run-id` names a run that is
    not recorded, is finished, or has no Ray Tune experiment to restore."""
    from study.recording import find_parent_run
    from study.runner import is_restorable

    run = f"Run {run_id} of {spec.name} ({args.scale})"
    parent = find_parent_run(client, spec.name, args.scale, run_id)
    if parent is None:
        from study.runner import unfinished_runs

        unfinished = [
            other.data.tags.get("study_run_id", other.info.run_id)
            for other in unfinished_runs(client, spec.name, args.scale, workspace)
        ]
        if unfinished:
            fix = (
                f"its unfinished runs are {', '.join(unfinished)}; pass one of "
                f"them to --run-id, or continue the latest with "
                f"`{_resume_command(args, workspace)}`"
            )
        else:
            fix = (
                "it holds no unfinished run of this scale; start one with "
                f"`{_run_command(args, workspace)}`"
            )
        raise StudyFileError(
            f"{run} is not recorded in the tracking store of workspace "
            f"{workspace.root}; {fix}"
        )
    if parent.info.status == "FINISHED":
        raise StudyFileError(
            f"{run} is finished, so there is nothing to resume; analyze it with "
            f"`{_analyze_command(args, workspace, run_id)}`, or start a new run "
            f"with `{_run_command(args, workspace, fresh=True)}`"
        )
    if not is_restorable(workspace, spec.name, args.scale, run_id):
        raise StudyFileError(
            f"{run} has no restorable Ray Tune experiment in "
            f"{workspace.ray_results}, because it stopped before Tune saved one; "
            f"start a new run with `{_run_command(args, workspace, fresh=True)}`"
        )


def _interrupted_message(
    args: argparse.Namespace,
    spec,
    workspace: Workspace,
    run_id: str | None,
    by_sigterm: bool,
    client=None,
) -> str:
    """Return the line printed when Ctrl-C or SIGTERM stopped `study run` or
    `study resume` in a way that Ray Tune did not handle: before Tune started,
    a second time while Tune stopped the trials, or after every trial ended.
    `run_id` is the run recorded so far, if any."""
    from study.recording import find_parent_run
    from study.runner import is_restorable

    cause = "terminated by SIGTERM" if by_sigterm else "interrupted"
    stopped = f"study {spec.name} ({args.scale}) {cause}"
    parent = (
        find_parent_run(client, spec.name, args.scale, run_id)
        if client is not None and run_id is not None
        else None
    )
    if parent is not None and parent.info.status == "FINISHED":
        return (
            f"{stopped} after every trial of run {run_id} ended; they are all "
            f"recorded, so print the analysis with: "
            f"{_analyze_command(args, workspace, run_id)}"
        )
    if run_id is None:
        start = _run_command(args, workspace, fresh=getattr(args, "fresh", False))
        return f"{stopped} before its run was recorded; start it again with: {start}"
    if not is_restorable(workspace, spec.name, args.scale, run_id):
        start = _run_command(args, workspace, fresh=True)
        return (
            f"{stopped} before Ray Tune saved the experiment of run {run_id}, so "
            f"it cannot be continued; start a new run with: {start}"
        )
    resume = _resume_command(args, workspace, getattr(args, "run_id", None))
    return f"{stopped}; continue with: {resume}"


def _check_settings_unchanged(
    args: argparse.Namespace, spec, workspace: Workspace, client, run_id: str
) -> None:
    """Stop before run `run_id` continues when the study file now trains
    differently from how the run started, because its trials would keep their
    recorded settings while the analysis read the new ones."""
    from study.runner import changed_settings

    changes = changed_settings(client, spec.name, args.scale, run_id, spec)
    if not changes:
        return
    summary = "; ".join(changes[:5])
    if len(changes) > 5:
        summary += f"; and {len(changes) - 5} more"
    fresh = _run_command(args, workspace, fresh=True)
    raise StudyFileError(
        f"The {args.scale} scale of {spec.name} changed since run {run_id} "
        f"started ({summary}), and a continued run keeps its recorded settings; "
        f"restore those values to continue it, or start a new run with `{fresh}`"
    )


def _check_data_folders(
    args: argparse.Namespace,
    spec,
    workspace: Workspace,
    client,
    run_id: str,
    prepared: dict[str, dict],
) -> None:
    """Say when the data files changed since run `run_id` started: its trials
    keep reading the folders prepared then, so stop before Ray starts when one
    of those is gone, and print a warning when they are all still there."""
    from study.runner import changed_data_folders

    changes = changed_data_folders(client, spec.name, args.scale, run_id, prepared)
    fresh = _run_command(args, workspace, fresh=True)
    for label, key, old, new in changes:
        # Cache folders are named by a hash of what they are built from, so the
        # same name in another place is the same data in a data cache that moved.
        moved = Path(old).name == Path(new).name
        if Path(old).exists():
            if not moved:
                print(
                    f"warning: the data of workload {label} changed since run "
                    f"{run_id} started ({key} is now {new}); its trials keep "
                    f"reading {old}, as when the run started"
                )
            continue
        if moved:
            raise StudyFileError(
                f"Run {run_id} read the {key} of workload {label} from {old}, "
                f"which is gone; the same data is now in {new}. Its trials keep "
                "the folder they started with, so move that folder (or the whole "
                f"data cache) back to continue the run, or start a new run with "
                f"`{fresh}`"
            )
        raise StudyFileError(
            f"The data of workload {label} changed since run {run_id} started: "
            f"its {key} is now {new}, and the run's trials read {old}, which is "
            "gone, so its unfinished trials cannot continue. Start a new run with "
            f"`{fresh}`; the finished trials of run {run_id} stay recorded"
        )


def _hide_password(uri: str) -> str:
    """Replace the password of a URI such as scheme://user:password@host with ***."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", uri)


def _store_words(args: argparse.Namespace, workspace: Workspace | Path) -> list[str]:
    """Return the options that name this command's workspace (a Workspace, or
    its resolved folder) and stores, for a hint that reads the same run."""
    root = workspace.root if isinstance(workspace, Workspace) else workspace
    words = ["--workspace", str(root)]
    for option, value in (
        ("--tracking-uri", args.tracking_uri),
        ("--optuna-storage", args.optuna_storage),
    ):
        if value:
            words += [option, _hide_password(value)]
    return words


def _training_words(args: argparse.Namespace) -> list[str]:
    """Return this command's --ray-address and a non-default --data-cache, for
    a hint that trains again."""
    words = []
    ray_address = getattr(args, "ray_address", None)
    if ray_address:
        words += ["--ray-address", ray_address]
    data_cache = getattr(args, "data_cache", None)
    if data_cache and Path(data_cache).expanduser() != DEFAULT_DATA_CACHE.expanduser():
        words += ["--data-cache", data_cache]
    return words


def _resume_command(
    args: argparse.Namespace, workspace: Workspace, run_id: str | None = None
) -> str:
    """Return the `study resume` command line that continues this run."""
    words = ["resume", args.name, "--scale", args.scale]
    words += _store_words(args, workspace)
    if run_id is not None:
        words += ["--run-id", run_id]
    words += _training_words(args)
    return f"{command_name()} {shlex.join(words)}"


def _run_command(
    args: argparse.Namespace,
    workspace: Workspace | Path,
    name: str | None = None,
    fresh: bool = False,
) -> str:
    """Return the `study run` command line that starts a run of study `name`
    (default: this command's study) at this command's scale and stores."""
    words = ["run", name or args.name, "--scale", args.scale]
    words += _store_words(args, workspace)
    words += _training_words(args)
    if fresh:
        words.append("--fresh")
    return f"{command_name()} {shlex.join(words)}"


def _analyze_command(
    args: argparse.Namespace, workspace: Workspace, run_id: str
) -> str:
    """Return the `study analyze` command line that reads run `run_id`."""
    words = ["analyze", args.name, "--scale", args.scale]
    words += _store_words(args, workspace)
    words += ["--run-id", run_id]
    return f"{command_name()} {shlex.join(words)}"


def _require_recorded_run(
    args: argparse.Namespace, workspace: Workspace, study: str, name: str
) -> None:
    """Fail, creating nothing, when the workspace contains no recorded run of
    study `study` (named `name` on the command line) at this scale, with the
    `study run` command that records one."""
    import optuna

    start = _run_command(args, workspace, name)
    for uri in (workspace.tracking_uri, workspace.optuna_storage):
        if not uri.startswith("sqlite:///"):
            continue
        path = Path(uri[len("sqlite:///") :])
        if not path.exists():
            raise StudyFileError(
                f"Workspace {workspace.root} contains no recorded runs ({path} does "
                f"not exist); start one with `{start}`, or pass the --workspace "
                "that a run wrote to"
            )
    summaries = optuna.get_all_study_summaries(
        workspace.optuna_storage, include_best_trial=False
    )
    if not any(
        summary.user_attrs.get("study") == study
        and summary.user_attrs.get("scale") == args.scale
        for summary in summaries
    ):
        raise StudyFileError(
            f"Workspace {workspace.root} contains no recorded run of {study} "
            f"({args.scale}); start one with `{start}`, or pass the --scale and "
            "--workspace that a run used"
        )


def _ui_command(args: argparse.Namespace, workspace: Workspace) -> str:
    words = ["ui", "--workspace", str(workspace.root)]
    if args.tracking_uri:
        words += ["--tracking-uri", _hide_password(args.tracking_uri)]
    return f"{command_name()} {shlex.join(words)}"


def _print_failed_trials(
    args: argparse.Namespace, spec, workspace: Workspace, failed: list[str], total: int
) -> None:
    named = ", ".join(failed[:5])
    if len(failed) > 5:
        named += f" and {len(failed) - 5} more"
    print(
        f"\nerror: {len(failed)} of {total} trials of {spec.name} ({args.scale}) "
        f"failed: {named}. Their tracebacks are printed above and stored in the "
        "`error` tag of each trial's MLflow run and the `error` attribute of its "
        f"Optuna trial; in `{_ui_command(args, workspace)}` filter the runs with "
        "tags.end_state = 'failed'. After fixing the cause, run the study again "
        f"with `{_run_command(args, workspace, fresh=True)}`",
        file=sys.stderr,
    )


@dataclass(frozen=True)
class FinalStateAnalysis:
    """The functions that analyse and export a toy, compare or lr_tune study."""

    analyze: Callable
    to_markdown: Callable
    export: Callable
    sections: Callable
    """Return the (heading, table) pairs of `study report`'s page."""
    formats: tuple[str, ...]
    """Table formats that `export` writes."""


def _final_state_analysis(analysis_kind: str) -> FinalStateAnalysis:
    if analysis_kind == "toy_noise":
        from study import toy_analysis

        return FinalStateAnalysis(
            toy_analysis.analyze_toy,
            toy_analysis.toy_markdown,
            toy_analysis.export_toy,
            toy_analysis.toy_report_sections,
            ("md", "csv"),
        )
    from study import compare_analysis, compare_export

    if analysis_kind == "lr_tune":
        return FinalStateAnalysis(
            compare_analysis.analyze_lr_tune,
            compare_export.lr_tune_markdown,
            compare_export.export_lr_tune,
            compare_export.report_sections,
            compare_export.FORMATS,
        )
    return FinalStateAnalysis(
        compare_analysis.analyze_compare,
        compare_export.compare_markdown,
        compare_export.export_compare,
        compare_export.report_sections,
        compare_export.FORMATS,
    )


def _analysis_kind(spec) -> str:
    return "toy_noise" if spec.is_toy() else spec.analysis


def _analyze_final_states(
    workspace: Workspace,
    spec,
    scale: str,
    run_id,
    client=None,
    parent_run_id=None,
    formats: tuple[str, ...] | None = None,
    report: bool = False,
) -> None:
    """Print the tables and findings of a toy, compare or lr_tune study, write
    them in `formats` (default: all the study's formats) with the plots, and
    with `report` also one HTML page. Files and headline numbers are logged
    on the run's MLflow parent run when `client` is given."""
    from dashboards.report import write_tables_page

    handler = _final_state_analysis(_analysis_kind(spec))
    result = handler.analyze(workspace.optuna_storage, spec.name, scale, run_id)
    analyses = result if isinstance(result, list) else [result]
    if client is not None and _analysis_kind(spec) == "compare":
        from study.compare_curves import attach_curves

        for analysis in analyses:
            attach_curves(client, analysis)
    for analysis in analyses:
        print(f"\n{spec.name} ({scale}), run {analysis.run_id}")
        print(handler.to_markdown(analysis), end="")
        findings = getattr(analysis, "findings", [])
        for finding in findings:
            print(f"finding: {finding}")
        paths = dict(
            handler.export(
                analysis,
                workspace.exports,
                handler.formats if formats is None else formats,
            )
        )
        if report:
            images = [path for path in paths.values() if path.suffix == ".png"]
            label = getattr(analysis, "label", None)
            stem = "-".join(
                str(part)
                for part in (spec.name, scale, label, analysis.run_id)
                if part is not None
            )
            paths["report"] = write_tables_page(
                f"{spec.name} ({scale}), run {analysis.run_id}",
                handler.sections(analysis),
                [*findings, *getattr(analysis, "notes", [])],
                images,
                workspace.exports / f"{stem}-report.html",
            )
        print(f"tables and plots: {', '.join(str(p) for p in paths.values())}")
        if client is not None and parent_run_id is not None:
            for path in paths.values():
                client.log_artifact(parent_run_id, str(path), "exports")
            _log_summary_metrics(client, parent_run_id, spec, analysis)


def _log_summary_metrics(client, parent_run_id: str, spec, analysis) -> None:
    """Log a comparison's gaps, best powers and exponents, or a tuning run's best
    rates, as metrics of the parent run, so the MLflow UI can chart them."""
    if _analysis_kind(spec) == "toy_noise":
        return
    from mlflow.entities import Metric

    from study.compare_export import summary_metrics

    now = int(time.time() * 1000)
    metrics = [
        Metric(name, value, now, 0) for name, value in summary_metrics(analysis).items()
    ]
    # log_batch takes at most 1000 metrics per call.
    for start in range(0, len(metrics), 1000):
        client.log_batch(parent_run_id, metrics=metrics[start : start + 1000])


def command_run(args: argparse.Namespace) -> int:
    return _run_or_resume_until_stopped(args, resume=False)


def command_resume(args: argparse.Namespace) -> int:
    return _run_or_resume_until_stopped(args, resume=True)


def _run_or_resume_until_stopped(args: argparse.Namespace, resume: bool) -> int:
    """Run or resume a study, stopping it on SIGTERM as on Ctrl-C, and return
    EXIT_TERMINATED when SIGTERM stopped it."""
    with SigtermAsInterrupt() as sigterm:
        try:
            code = _run_or_resume(args, resume, sigterm)
        except KeyboardInterrupt:
            if not sigterm.received:
                raise
            print("terminated by SIGTERM", file=sys.stderr)
            return EXIT_TERMINATED
    return code


def _check_train_overrides(args: argparse.Namespace, label: str, entry) -> None:
    """Reject invalid single-trial values, alone or with the settings of workload
    `label` (`entry`), before any data is prepared."""
    import math

    if args.power is not None and not (math.isfinite(args.power) and args.power > 0):
        raise StudyFileError(
            f"--power {args.power} is invalid; use a finite number > 0"
        )
    if args.batch_size is not None and args.batch_size <= 0:
        raise StudyFileError(
            f"--batch-size {args.batch_size} is invalid; use 1 or more"
        )
    if args.lr_max is not None and not (math.isfinite(args.lr_max) and args.lr_max > 0):
        raise StudyFileError(
            f"--lr-max {args.lr_max} is invalid; use a finite number > 0"
        )
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise StudyFileError(f"--seed {args.seed} is invalid; use 0 to 2**32 - 1")
    if args.batch_size is None:
        return

    micro = entry.train.micro_batch_size
    if micro is not None and args.batch_size % micro != 0:
        raise StudyFileError(
            f"--batch-size {args.batch_size} is not a multiple of workload {label}'s "
            f"train.micro_batch_size {micro}. Pass a multiple of {micro}, such as "
            f"{micro * max(1, round(args.batch_size / micro))}, or change "
            "train.micro_batch_size in the study file"
        )
    rates = entry.grid.lr_max
    if isinstance(rates, dict) and args.lr_max is None and args.batch_size not in rates:
        raise StudyFileError(
            f"--batch-size {args.batch_size} has no learning rate in workload "
            f"{label}'s grid.lr_max, which lists batch sizes {sorted(rates)}. Pass "
            "--lr-max, or one of those batch sizes"
        )
    budget = step_budget(label, entry, args.batch_size)
    if entry.train.warmup_steps > budget:
        raise StudyFileError(
            f"--batch-size {args.batch_size} gives workload {label} a budget of "
            f"{budget} steps, fewer than its train.warmup_steps "
            f"{entry.train.warmup_steps}. Pass a smaller --batch-size, or lower "
            "train.warmup_steps in the study file"
        )


def command_train(args: argparse.Namespace) -> int:
    from study.grid import expand
    from study.runner import prepare_data
    from trainers.config import TrialConfig
    from trainers.loop import run_trial

    spec = load_study(args.name)
    scale = spec.scale(args.scale)
    if spec.is_toy():
        raise StudyFileError(
            f"`study train` trains one grid point of a training study; {spec.name} "
            f"simulates the toy model, so run it with `{command_name()} run "
            f"{spec.name}`"
        )
    label = args.workload or next(iter(scale.workloads))
    if label not in scale.workloads:
        raise StudyFileError(
            f"Workload {label!r} is not in scale {args.scale}; choose one of "
            f"{sorted(scale.workloads)}"
        )
    entry = scale.workloads[label]
    _check_train_overrides(args, label, entry)
    check_data_cache_writable(args.data_cache)
    workspace = Workspace.open(Path.cwd(), data_cache=args.data_cache, create=False)
    prepared = prepare_data(spec, args.scale, workspace, labels=[label])
    plan = expand(scale, prepared)[0]
    overrides = {
        "batch_size": args.batch_size,
        "power": args.power,
        "lr_max": args.lr_max,
        "seed": args.seed,
    }
    if args.batch_size is not None:
        # An epoch budget gives each batch size its own step count.
        overrides["step_budget"] = step_budget(label, entry, args.batch_size)
        if args.lr_max is None and isinstance(entry.grid.lr_max, dict):
            # The first plan's rate belongs to the grid's first batch size.
            overrides["lr_max"] = entry.grid.lr_max[args.batch_size][0]
    config = TrialConfig.from_dict(
        {**plan.config, **{k: v for k, v in overrides.items() if v is not None}}
    )

    def report(metrics: dict, checkpoint: dict | None = None) -> None:
        # A single trial keeps no checkpoints; only the metrics are printed.
        if "val/loss" in metrics or "end_state" in metrics:
            print(json.dumps(metrics, sort_keys=True), flush=True)

    outcome = run_trial(config, report)
    print(f"{outcome.end_state} after {outcome.steps} steps")
    return 0


def _open_recorded_workspace(
    args: argparse.Namespace, spec, writes: str | None = None
) -> Workspace:
    """Open the workspace of a recorded run and check the run's progress.

    `writes` names the command when it writes into the workspace, which must
    then be writable.
    """
    spec.scale(args.scale)  # a scale the study lacks, before the workspace
    workspace = Workspace.open(
        args.workspace, args.tracking_uri, args.optuna_storage, create=False
    )
    _require_recorded_run(args, workspace, spec.name, args.name)
    workspace.require_recorded()
    if writes is not None:
        workspace.require_writable(writes)
    _check_run_progress(args, spec, workspace)
    return workspace


def _planned_trials(workspace: Workspace, spec, scale: str, run_id: str) -> int:
    """Return the number of grid points of a run: the `trials` parameter of its
    MLflow parent run, or the study file's grid where that is not recorded."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from study.recording import find_parent_run

    uri = _recorded_tracking_uri(workspace)
    if uri is not None:
        try:
            parent = find_parent_run(
                MlflowClient(tracking_uri=uri), spec.name, scale, run_id
            )
        except MlflowException as error:
            logger.debug("no MLflow parent run of %s: %s", run_id, error)
            parent = None
        if parent is not None and "trials" in parent.data.params:
            return int(parent.data.params["trials"])
    return sum(entry.grid.size() for entry in spec.scale(scale).workloads.values())


def _check_run_progress(args: argparse.Namespace, spec, workspace: Workspace) -> None:
    """Fail when the run has no finished trial yet, and note how many grid
    points an unfinished run still lacks."""
    from study.analysis import finished_trial_count

    run_id, finished = finished_trial_count(
        workspace.optuna_storage, spec.name, args.scale, args.run_id
    )
    resume = _resume_command(args, workspace, run_id)
    if finished == 0:
        raise StudyFileError(
            f"Run {run_id} of {spec.name} ({args.scale}) has no finished trials "
            f"yet, so there is nothing to analyze; continue it with `{resume}`"
        )
    planned = _planned_trials(workspace, spec, args.scale, run_id)
    if finished < planned:
        print(
            f"note: run {run_id} of {spec.name} ({args.scale}) is unfinished: "
            f"{planned - finished} of {planned} grid points have no finished trial "
            f"yet, so the results below are partial; continue it with `{resume}`"
        )


def command_analyze(args: argparse.Namespace) -> int:
    from study.export import summary_text

    spec = load_study(args.name)
    if _analysis_kind(spec) != "power_trend":
        _reject_table_options(args, spec)
        # These analyses also write their tables under exports/.
        workspace = _open_recorded_workspace(args, spec, f"{command_name()} analyze")
        # The client reads the training curves; without a parent run id
        # nothing is logged.
        client = _mlflow_client(workspace)
        _analyze_final_states(workspace, spec, args.scale, args.run_id, client)
        return 0
    workspace = _open_recorded_workspace(args, spec)
    analyses = _load_analyses(
        workspace, spec.name, args.scale, args.run_id, _analysis_options(args)
    )
    _note_progress_unit(args, analyses)
    print("\n".join(summary_text(analysis) for analysis in analyses), end="")
    return 0


def _mlflow_client(workspace: Workspace):
    """Return a client of the recorded tracking store, or None without one.

    Artifacts logged through it land in this folder's mlartifacts/, also
    after the workspace was moved or copied.
    """
    uri = _recorded_tracking_uri(workspace)
    if uri is None:
        return None
    workspace.relocate_artifacts()
    return open_tracking_client(uri)


def command_export(args: argparse.Namespace) -> int:
    from study.export import DEFAULT_FORMATS, build_table, export_tables, to_markdown

    spec = load_study(args.name)
    workspace = _open_recorded_workspace(args, spec, f"{command_name()} export-table")
    if _analysis_kind(spec) != "power_trend":
        return _export_final_states(args, spec, workspace, report=False)
    analyses = _load_analyses(
        workspace, spec.name, args.scale, args.run_id, _analysis_options(args)
    )
    _note_progress_unit(args, analyses)
    client = _mlflow_client(workspace)
    for analysis in analyses:
        metric = _table_metric(args, analysis)
        if metric == "final_accuracy" and analysis.trials.val_accuracy.isna().all():
            print(
                f"note: workload {analysis.run.label} records no val/accuracy, so "
                "it has no final_accuracy table"
            )
            continue
        table = build_table(analysis, metric, args.spread)
        print(f"\n{table.title}\n{to_markdown(table)}", end="")
        for footnote in table.footnotes:
            print(footnote)
        paths = export_tables(
            analysis,
            workspace.exports,
            tuple(args.format or DEFAULT_FORMATS),
            metric,
            args.spread,
        )
        for path in paths.values():
            print(f"wrote {path}")
        _log_files(client, analysis, None, list(paths.values()), "exports")
    return 0


# The metric in the tables of each analysis kind without times to a target.
FINAL_STATE_TABLES = {
    "compare": "the final validation loss",
    "lr_tune": "the final validation loss per lr_max",
    "toy_noise": "the toy model's update size",
}


def _reject_table_options(args: argparse.Namespace, spec) -> None:
    """Reject --metric and --spread for a toy, compare or lr_tune study, whose
    tables each show one fixed metric."""
    kind = _analysis_kind(spec)
    table_metric = FINAL_STATE_TABLES[kind]
    if args.metric is not None:
        raise StudyFileError(
            f"--metric {args.metric} is invalid for {spec.name}: a {kind} study "
            f"compares final states, and its tables always show {table_metric}. "
            "Leave out --metric, which chooses among the tables of power_trend "
            "studies only"
        )
    if getattr(args, "spread", False):
        raise StudyFileError(
            f"--spread is invalid for {spec.name}: a {kind} study compares final "
            "states. Leave out --spread, which changes the tables of power_trend "
            "studies only"
        )


def _table_metric(args: argparse.Namespace, analysis) -> str:
    """Return the table metric of --metric for one workload: tokens and
    examples both name the progress to the target, in the workload's own unit."""
    if args.metric in PROGRESS_METRICS:
        return analysis.run.progress_unit
    return args.metric or "steps"


def _note_progress_unit(args: argparse.Namespace, analyses) -> None:
    """Print a note for each workload whose progress unit is not the one that
    --metric names, because its table shows its own unit instead."""
    if args.metric not in PROGRESS_METRICS:
        return
    for analysis in analyses:
        run = analysis.run
        if run.progress_unit != args.metric:
            print(
                f"note: workload {run.label} counts its progress in "
                f"{run.progress_unit}, not {args.metric}, so its table shows "
                f"{run.progress_unit} to the target"
            )


def _export_final_states(
    args: argparse.Namespace, spec, workspace: Workspace, report: bool
) -> int:
    """Write the tables and plots of a toy, compare or lr_tune study, or with
    `report` its HTML page, and log them on the MLflow parent run of the run
    they describe. Raises StudyFileError for options that such a study lacks."""
    kind = _analysis_kind(spec)
    handler = _final_state_analysis(kind)
    _reject_table_options(args, spec)
    formats = tuple(getattr(args, "format", None) or handler.formats)
    if "html" in formats:
        report = True
        formats = tuple(name for name in formats if name != "html")
    unsupported = sorted(set(formats) - set(handler.formats))
    if unsupported:
        raise StudyFileError(
            f"--format {', '.join(unsupported)} is not available for {spec.name}; "
            f"choose from {', '.join(handler.formats)} or html"
        )
    if report and not getattr(args, "format", None):
        formats = ()
    client = _mlflow_client(workspace)
    parent_run_id = None
    if client is not None:
        from study.recording import find_parent_run

        parent = find_parent_run(client, spec.name, args.scale, args.run_id)
        parent_run_id = parent.info.run_id if parent is not None else None
    _analyze_final_states(
        workspace,
        spec,
        args.scale,
        args.run_id,
        client,
        parent_run_id,
        formats=formats,
        report=report,
    )
    return 0


def command_report(args: argparse.Namespace) -> int:
    spec = load_study(args.name)
    workspace = _open_recorded_workspace(args, spec, f"{command_name()} report")
    if _analysis_kind(spec) != "power_trend":
        return _export_final_states(args, spec, workspace, report=True)
    analyses = _load_analyses(
        workspace, spec.name, args.scale, args.run_id, _analysis_options(args)
    )
    _note_progress_unit(args, analyses)
    _write_report(analyses, workspace, _mlflow_client(workspace))
    return 0


def command_ui(args: argparse.Namespace) -> int:
    from dashboards.mlflow_ui import UiStartError, check_port_free, serve_ui

    if not 1 <= args.port <= 65535:
        raise StudyFileError(
            f"--port {args.port} is invalid; use a TCP port from 1 to 65535, "
            "for example 5000"
        )
    workspace = Workspace.open(args.workspace, args.tracking_uri, create=False)
    check_port_free(args.host, args.port)
    if _recorded_tracking_uri(workspace) is not None:
        # The MLflow server and the artifact relocation write to the stores.
        workspace.require_writable(f"{command_name()} ui")
        workspace.relocate_artifacts()
    try:
        return serve_ui(workspace, args.host, args.port)
    except UiStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


COMMANDS = {
    "list": command_list,
    "run": command_run,
    "resume": command_resume,
    "train": command_train,
    "analyze": command_analyze,
    "export-table": command_export,
    "report": command_report,
    "ui": command_ui,
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (StudyFileError, DataUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
