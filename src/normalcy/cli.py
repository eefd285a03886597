"""The `normalcy` command: thin shells over the flows and stages, with errors for people."""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from normalcy.memory import keep_freed_memory

# Commands that score with onnxruntime alone: they must run where torch is not installed, so
# neither they nor their error handling may import the training side of normalcy.
TORCH_FREE_COMMANDS = ("score", "serve", "inspect")


def _quiet_environment() -> None:
    """No telemetry, no hub retries: this tool must run offline."""
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }.items():
        os.environ.setdefault(key, value)


PROGRESS_LOGGERS = ("normalcy", "prefect.flow_runs", "prefect.task_runs")


def is_progress_or_warning(record: logging.LogRecord) -> bool:
    """Run progress from normalcy and Prefect at INFO; every other library from WARNING on.

    Libraries log their internals at INFO (each HTTP request to the Prefect API, Great
    Expectations' registries; some set their own loggers to INFO), which buried the progress
    lines of a training run. A handler filter holds whatever level a library sets."""
    is_progress = any(
        record.name == name or record.name.startswith(name + ".") for name in PROGRESS_LOGGERS
    )
    return is_progress or record.levelno >= logging.WARNING


def show_progress_logs() -> None:
    """Log to stderr through that filter, unless the caller (an application, pytest) already
    configured logging: then its handlers and levels are left alone."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(is_progress_or_warning)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def print_summary(summary: dict) -> None:
    """The end of `normalcy train`: what won, how well, where things are, how to look."""

    def fmt(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    print("\nnormalcy training summary")
    print("-" * 60)
    for key in (
        "winner",
        "selection_metric",
        "selection_value",
        "test_auroc",
        "test_auprc",
        "threshold",
        "target_fpr",
        "test_fpr_at_threshold",
        "test_recall_at_threshold",
        "data_version",
        "model_name",
        "model_version",
        "promoted",
        "promotion_reason",
        "mlflow_run_id",
        "onnx_path",
    ):
        if key in summary:
            print(f"{key:>26}: {fmt(summary[key])}")
    print("-" * 60)
    print("summary file:   artifacts/summary.json")
    print(
        "MLflow UI:      .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  (http://127.0.0.1:5000)"
    )
    print(
        "Prefect UI:     .venv/bin/prefect server start  (http://127.0.0.1:4200), then rerun with"
    )
    print("                PREFECT_API_URL=http://127.0.0.1:4200/api to see flow runs there")


def check_params(args: argparse.Namespace) -> Any:
    """Fail on bad params before a flow (and Prefect's API) starts; the checked Params."""
    from normalcy.config import load_params

    return load_params(args.params, args.set)


def run_flow(module: str, name: str, *args: Any) -> Any:
    """Run a flow of `normalcy.flows`, its module imported while Prefect's temporary API boots
    beside the import (see normalcy.prefect_api)."""
    import importlib

    from normalcy.prefect_api import start_temporary_api_early

    api = start_temporary_api_early()
    flow = getattr(importlib.import_module(f"normalcy.flows.{module}"), name)
    with api():
        return flow(*args)


def cmd_train(args: argparse.Namespace) -> None:
    from normalcy.data.sources import check_source
    from normalcy.pipeline.worker_start import prestart_worker_forkserver

    params = check_params(args)
    check_source(params.data)  # a missing file or column: before any work
    prestart_worker_forkserver(params.train)  # imports while the flow's module does
    print_summary(run_flow("train", "train_flow", args.params, args.set))


def cmd_stage(args: argparse.Namespace) -> None:
    from normalcy.config import load_params
    from normalcy.pipeline.runner import run_stage

    run_stage(args.name, load_params(args.params, args.set))


def cmd_monitor(args: argparse.Namespace) -> None:
    from normalcy.data.sources import check_batch_file

    params = check_params(args)
    check_batch_file(args.batch or params.monitor.batch_path)
    if args.log and not Path(args.log).exists():  # before the flow runs
        raise FileNotFoundError(f"{args.log}: no prediction log here (nothing logged yet?)")
    result = run_flow("monitor", "monitor_flow", args.batch, args.params, args.set)
    if args.log:
        from normalcy.scoring.prediction_log import read_prediction_log, realised_alert_rates

        rates = realised_alert_rates(read_prediction_log(args.log, args.since))
        result["realised_alert_rates"] = [vars(rate) for rate in rates]
    print(json.dumps(result, indent=2, default=str))


def cmd_recalibrate(args: argparse.Namespace) -> None:
    from normalcy.data.sources import check_batch_file

    check_params(args)
    check_batch_file(args.batch)
    result = run_flow("recalibrate", "recalibrate_flow", args.batch, args.params, args.set)
    print(json.dumps(result, indent=2, default=str))


def cmd_promote(args: argparse.Namespace) -> None:
    from normalcy import promotion, registry

    params = check_params(args)
    registry.setup_tracking(params.mlflow)
    reason = f"promoted by hand: {args.reason}" if args.reason else "promoted by hand"
    previous = promotion.promote_version(params.mlflow.model_name, args.version, reason)
    print(f"{params.mlflow.model_name}: champion v{previous} -> v{args.version}")


def cmd_rollback(args: argparse.Namespace) -> None:
    from normalcy import promotion, registry

    params = check_params(args)
    registry.setup_tracking(params.mlflow)
    version = promotion.rollback(params.mlflow.model_name)
    print(f"{params.mlflow.model_name}: champion is v{version} again")


def cmd_schedule(args: argparse.Namespace) -> None:
    from normalcy.flows.deploy import serve_deployments

    serve_deployments(args.params)


def cmd_deploy(args: argparse.Namespace) -> None:
    from normalcy.flows.deploy import deploy_to_pool

    check_params(args)
    ids = deploy_to_pool(args.pool, args.params, args.set, args.working_dir, args.image)
    print(f"{len(ids)} deployments in work pool {args.pool!r}; start a worker with")
    print(f"  prefect worker start --pool {args.pool}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normalcy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, handler: Callable[[argparse.Namespace], None], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--params", default="params.yaml", help="params file (default params.yaml)"
        )
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a params key, e.g. --set train.epochs=5 (repeatable)",
        )
        sub.set_defaults(handler=handler)
        return sub

    add("train", cmd_train, "run the training flow and register the winner")
    stage = add("stage", cmd_stage, "run one pipeline stage (what dvc repro calls)")
    stage.add_argument("name", choices=_StageNames(), metavar="NAME", help="one of %(choices)s")
    monitor = add("monitor", cmd_monitor, "check a batch for drift against the champion")
    monitor.add_argument(
        "--batch", default=None, help="npz/csv/parquet batch (default monitor.batch_path)"
    )
    monitor.add_argument(
        "--log",
        default=None,
        help="also report each version's realised alert rate from this "
        "prediction log (what score/serve --log write)",
    )
    monitor.add_argument("--since", default=None, help="with --log: rows logged from this ISO time")
    recalibrate = add(
        "recalibrate", cmd_recalibrate, "re-estimate the champion's threshold on a batch"
    )
    recalibrate.add_argument("--batch", required=True, help="npz/csv/parquet batch")
    promote = add("promote", cmd_promote, "make a registered version champion (a person's call)")
    promote.add_argument("version", help="the model version to serve")
    promote.add_argument("--reason", default="", help="why, kept as a tag on the version")
    add("rollback", cmd_rollback, "move champion back to the version it replaced")
    add("schedule", cmd_schedule, "serve the train and monitor deployments on their cron schedules")
    deploy = add(
        "deploy", cmd_deploy, "create the train, monitor and recalibrate deployments in a work pool"
    )
    deploy.add_argument("--pool", required=True, help="Prefect work pool (create it first)")
    deploy.add_argument(
        "--working-dir",
        default=None,
        help="process pools: the folder runs work in (params file and artifacts/ relative to it)",
    )
    deploy.add_argument("--image", default=None, help="container pools: the training image")

    from normalcy.cli_scoring import add_scoring_commands

    add_scoring_commands(add)
    return parser


class _StageNames:
    """The stage names, looked up only when `normalcy stage` needs them: they live beside the
    stage code, which imports torch, and the scoring commands must start without it."""

    def _names(self) -> tuple[str, ...]:
        from normalcy.pipeline.runner import STAGES

        return STAGES

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def _user_errors(command: str) -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's to fix for `command` (printed as one paragraph)."""
    if command in TORCH_FREE_COMMANDS:
        # Bad model, input, params or output path; registry lookups and unreachable stores.
        return (ValueError, OSError)
    from normalcy.errors import user_errors

    return user_errors()


def _is_user_error(command: str, exc: Exception) -> bool:
    """Bad params or data are the user's to fix whatever the command; they are told apart
    first, so that reporting them does not import the training side (torch, the flows)."""
    from normalcy.config import ConfigError
    from normalcy.data.sources import DataError

    return isinstance(exc, ConfigError | DataError) or isinstance(exc, _user_errors(command))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input ends with a one-paragraph error and exit code 2, no traceback."""
    _quiet_environment()
    keep_freed_memory()  # before any large allocation: see normalcy.memory
    show_progress_logs()
    args = build_parser().parse_args(argv)
    if args.command not in TORCH_FREE_COMMANDS:
        from normalcy.run_logs import hide_user_error_tracebacks

        hide_user_error_tracebacks(lambda: _user_errors(args.command))
    try:
        args.handler(args)
    except Exception as exc:
        if not _is_user_error(args.command, exc):
            raise
        print(f"normalcy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The console script: `main`, then a prompt exit.

    After a command that loaded torch, MLflow, Prefect and Great Expectations, the interpreter's
    own teardown of those modules took 6 s of a 54 s training run here (2.4 s after the imports
    alone) and does nothing a user needs. So exit handlers run (Prefect's temporary server stops,
    MLflow ends its run, logs flush), output is flushed, and the process ends without it.
    Callers of `main()` (tests, other Python code) keep the normal interpreter exit."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
