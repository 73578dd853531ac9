"""The `study` command: list, run, train, analyze, export-table and ui."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from study.spec import SCALES, StudyFileError, available_studies, load_study
from study.workspace import DEFAULT_DATA_CACHE, Workspace
from trainers.data.errors import DataUnavailableError

logger = logging.getLogger("study")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


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
    analyze.add_argument("--run-id", help="recorded run to read (default: the latest)")

    export = commands.add_parser(
        "export-table",
        help="write the batch size x power tables under WORKSPACE/exports",
    )
    _add_study_options(export)
    _add_store_options(export)
    export.add_argument("--run-id", help="recorded run to read (default: the latest)")

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
        for scale_name, scale in spec.scales.items():
            trials = sum(entry.grid.size() for entry in scale.workloads.values())
            workloads = ", ".join(scale.workloads)
            print(
                f"  {scale_name:6s} {trials:4d} trials  ({workloads}) {scale.description}"
            )
    return 0


def _print_analyses(analyses) -> None:
    for analysis in analyses:
        run = analysis.run
        print(
            f"\n{run.label} ({run.workload}): steps to {run.target_metric} "
            f"{run.target_value:g}, budget {run.budget_steps} steps, run {run.run_id}"
        )
        from study.export import power_table, to_markdown

        print(to_markdown(power_table(analysis)), end="")
        print(analysis.fit.describe() if analysis.fit else "no trend fit")
        if analysis.fit:
            print(
                f"slope of best p per doubling of batch size: {analysis.fit.slope:+.3f}"
            )
        for note in analysis.notes:
            print(f"note: {note}")


def _analyze_and_export(
    workspace: Workspace,
    study: str,
    scale: str,
    run_id,
    client=None,
    parent_run_id=None,
) -> list:
    from study.analysis import analyze_run, load_runs
    from study.export import export_tables

    analyses = [
        analyze_run(run)
        for run in load_runs(workspace.optuna_storage, study, scale, run_id)
    ]
    _print_analyses(analyses)
    for analysis in analyses:
        paths = export_tables(analysis, workspace.exports)
        print(f"tables: {paths['markdown']} and {paths['csv']}")
        if client is not None:
            for path in paths.values():
                client.log_artifact(parent_run_id, str(path), "exports")
            if analysis.fit:
                client.log_metric(
                    parent_run_id, f"fit/{analysis.run.label}/slope", analysis.fit.slope
                )
    return analyses


def command_run(args: argparse.Namespace) -> int:
    spec = load_study(args.name)
    spec.scale(args.scale)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise StudyFileError(
            f"--max-concurrent {args.max_concurrent} is invalid; use 1 or more"
        )
    workspace = Workspace.open(
        args.workspace, args.tracking_uri, args.optuna_storage, args.data_cache
    )
    from study.runner import run_study

    result = run_study(
        spec,
        args.scale,
        workspace,
        ray_address=args.ray_address,
        max_concurrent=args.max_concurrent,
    )
    counts = {}
    for state in result.end_states.values():
        counts[state] = counts.get(state, 0) + 1
    print(
        f"\nstudy {spec.name} ({args.scale}) finished in {result.wall_seconds:.0f} s: "
        + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=workspace.tracking_uri)
    _analyze_and_export(
        workspace,
        spec.name,
        args.scale,
        result.run.run_id,
        client,
        result.parent_run_id,
    )
    print(
        f"\nCompare the trials in the MLflow UI: study ui --workspace {workspace.root}"
    )
    return 0


def command_train(args: argparse.Namespace) -> int:
    from study.grid import expand
    from study.runner import prepare_data
    from trainers.config import TrialConfig
    from trainers.loop import run_trial

    spec = load_study(args.name)
    scale = spec.scale(args.scale)
    label = args.workload or next(iter(scale.workloads))
    if label not in scale.workloads:
        raise StudyFileError(
            f"Workload {label!r} is not in scale {args.scale}; choose one of "
            f"{sorted(scale.workloads)}"
        )
    workspace = Workspace.open(Path.cwd(), data_cache=args.data_cache, create=False)
    prepared = prepare_data(spec, args.scale, workspace, labels=[label])
    plan = expand(scale, prepared)[0]
    overrides = {
        "batch_size": args.batch_size,
        "power": args.power,
        "lr_max": args.lr_max,
        "seed": args.seed,
    }
    config = TrialConfig.from_dict(
        {**plan.config, **{k: v for k, v in overrides.items() if v is not None}}
    )
    if config.power <= 0:
        raise StudyFileError(f"--power {config.power} is invalid; use a number > 0")
    if config.batch_size <= 0:
        raise StudyFileError(
            f"--batch-size {config.batch_size} is invalid; use 1 or more"
        )

    def report(metrics: dict) -> None:
        if "val/loss" in metrics or "end_state" in metrics:
            print(json.dumps(metrics, sort_keys=True), flush=True)

    outcome = run_trial(config, report)
    print(f"{outcome.end_state} after {outcome.steps} steps")
    return 0


def command_analyze(args: argparse.Namespace) -> int:
    from study.analysis import analyze_run, load_runs

    spec = load_study(args.name)
    workspace = Workspace.open(
        args.workspace, args.tracking_uri, args.optuna_storage, create=False
    )
    runs = load_runs(workspace.optuna_storage, spec.name, args.scale, args.run_id)
    _print_analyses([analyze_run(run) for run in runs])
    return 0


def command_export(args: argparse.Namespace) -> int:
    spec = load_study(args.name)
    workspace = Workspace.open(
        args.workspace, args.tracking_uri, args.optuna_storage, create=False
    )
    _analyze_and_export(workspace, spec.name, args.scale, args.run_id)
    return 0


def command_ui(args: argparse.Namespace) -> int:
    from dashboards.mlflow_ui import serve_ui

    workspace = Workspace.open(args.workspace, args.tracking_uri, create=False)
    return serve_ui(workspace, args.host, args.port)


COMMANDS = {
    "list": command_list,
    "run": command_run,
    "train": command_train,
    "analyze": command_analyze,
    "export-table": command_export,
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
