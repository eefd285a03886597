"""The `normalcy` command: thin shells over the flows and stages, with errors for people."""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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

    check_source(check_params(args).data)  # a missing file or column: before any work
    print_summary(run_flow("train", "train_flow", args.params, args.set))


def cmd_stage(args: argparse.Namespace) -> None:
    from normalcy.config import load_params
    from normalcy.pipeline.runner import run_stage

    run_stage(args.name, load_params(args.params, args.set))


def cmd_monitor(args: argparse.Namespace) -> None:
    from normalcy.data.sources import check_batch_file

    params = check_params(args)
    check_batch_file(args.batch or params.monitor.batch_path)
    result = run_flow("monitor", "monitor_flow", args.batch, args.params, args.set)
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


# --- score / serve / inspect: onnxruntime only -----------------------------------------------


def scoring_sections(args: argparse.Namespace) -> tuple[Any, Any]:
    """(ScoringParams, MlflowParams) from the params file and `--set` overrides.

    Only these two sections are validated: validating every section imports the detectors
    (torch), which a scoring host may not have. A missing params file means the defaults."""
    from pydantic import ValidationError

    from normalcy.config import ConfigError, format_validation_error, load_serving_params

    sections = load_serving_params(args.params, args.set)
    scoring = sections.scoring
    for flag, key in (
        ("chunk_rows", "chunk_rows"),
        ("max_batch", "max_request_rows"),
        ("reload_interval", "reload_interval_s"),
        ("intra_op_threads", "intra_op_threads"),
        ("inter_op_threads", "inter_op_threads"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            try:
                setattr(scoring, key, value)  # validate_assignment: checked like params.yaml
            except ValidationError as exc:
                flag_name = f"--{flag.replace('_', '-')}"
                raise ConfigError(format_validation_error(exc, flag_name)) from None
    return scoring, sections.mlflow


def session_settings(scoring: Any) -> Any:
    """The onnxruntime session settings of the `scoring` params section."""
    from normalcy.scoring import SessionSettings

    return SessionSettings(
        intra_op_threads=scoring.intra_op_threads,
        inter_op_threads=scoring.inter_op_threads,
        execution_mode=scoring.execution_mode,
        graph_optimization=scoring.graph_optimization,
    )


def tracking_uri_for(args: argparse.Namespace, mlflow_params: Any) -> str | None:
    """Where `models:/...` sources are looked up: --tracking-uri, else MLFLOW_TRACKING_URI,
    else the params file's mlflow.tracking_uri (relative sqlite paths against the params
    file's folder). Torch-free: the rule lives in normalcy.scoring, not in the registry."""
    from normalcy.scoring import tracking_uri_for_source

    configured = mlflow_params.tracking_uri if mlflow_params is not None else ""
    return tracking_uri_for_source(args.model, args.tracking_uri, configured, args.params)


def _columns_text(columns: list[str]) -> str:
    """Column names for a person, each output's run `name[0]`..`name[d-1]` shown as one item."""
    groups: list[list[str]] = []
    for column in columns:
        stem = column.split("[", 1)[0]
        if groups and "[" in column and groups[-1][0].split("[", 1)[0] == stem:
            groups[-1].append(column)
        else:
            groups.append([column])
    return ", ".join(g[0] if len(g) == 1 else f"{g[0]}..{g[-1]}" for g in groups)


def cmd_score(args: argparse.Namespace) -> None:
    from normalcy.scoring import check_output_path, load_session, resolve_model, score_file

    scoring, mlflow_params = scoring_sections(args)
    check_output_path(args.output)  # before a download or any reading
    with tempfile.TemporaryDirectory(prefix="normalcy-model-") as model_dir:
        model = resolve_model(args.model, model_dir, tracking_uri_for(args, mlflow_params))
        session = load_session(model.path, settings=session_settings(scoring))
        result = score_file(
            session,
            args.input,
            args.output,
            scoring.chunk_rows,
            progress=not args.quiet,
            explain=args.explain,
        )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    version = f" version {model.version}" if model.version else ""
    share = result.n_anomalies / max(result.n_rows, 1)
    print(
        f"scored {result.n_rows} rows of {args.input} with {model.source}{version}: "
        f"{result.n_anomalies} flagged as anomalies ({share:.2%}); wrote {result.output} "
        f"(columns {_columns_text(result.columns)})"
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from normalcy.serving import serve

    scoring, mlflow_params = scoring_sections(args)
    serve(
        args.model,
        args.host,
        args.port,
        tracking_uri=tracking_uri_for(args, mlflow_params),
        max_batch=scoring.max_request_rows,
        reload_interval=scoring.reload_interval_s,
        settings=session_settings(scoring),
    )


def cmd_inspect(args: argparse.Namespace) -> None:
    from normalcy.scoring import file_digest, load_session, read_metadata, resolve_model
    from normalcy.scoring.describe import model_description

    mlflow_params = scoring_sections(args)[1] if args.model.startswith("models:/") else None
    with tempfile.TemporaryDirectory(prefix="normalcy-model-") as model_dir:
        model = resolve_model(args.model, model_dir, tracking_uri_for(args, mlflow_params))
        session = load_session(model.path)
        metadata = read_metadata(session)
        if args.json:
            print(json.dumps(metadata, indent=2))
            return
        size = model.path.stat().st_size
        where = f"{model.source}" + (f" (version {model.version})" if model.version else "")
        lines = [
            ("model", where),
            ("file", f"{size / 1024:.1f} KiB, sha256 {file_digest(model.path)[:12]}"),
        ]
        if not metadata:
            lines.append(("metadata", "none (not exported by normalcy?); graph inputs/outputs:"))
        lines.extend(model_description(metadata, session))
    width = max(len(label) for label, _ in lines)
    for label, text in lines:
        print(f"{label:>{width}}  {text}")


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
    recalibrate = add(
        "recalibrate", cmd_recalibrate, "re-estimate the champion's threshold on a batch"
    )
    recalibrate.add_argument("--batch", required=True, help="npz/csv/parquet batch")
    promote = add("promote", cmd_promote, "make a registered version champion (a person's call)")
    promote.add_argument("version", help="the model version to serve")
    promote.add_argument("--reason", default="", help="why, kept as a tag on the version")
    add("rollback", cmd_rollback, "move champion back to the version it replaced")
    add("schedule", cmd_schedule, "serve the train and monitor deployments on their cron schedules")

    model_help = "an .onnx file, or a registry model: models:/NAME@ALIAS or models:/NAME/VERSION"
    tracking_help = (
        "MLflow tracking URI for models:/ sources (default: MLFLOW_TRACKING_URI, else "
        "mlflow.tracking_uri of the params file)"
    )

    def add_scoring(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", required=True, help=model_help)
        sub.add_argument("--tracking-uri", default=None, help=tracking_help)
        sub.add_argument(
            "--intra-op-threads",
            type=int,
            default=None,
            help="onnxruntime threads inside an operator (default scoring.intra_op_threads)",
        )
        sub.add_argument(
            "--inter-op-threads",
            type=int,
            default=None,
            help="onnxruntime threads across operators (default scoring.inter_op_threads)",
        )

    score = add(
        "score", cmd_score, "score a csv/parquet/npz file or an image folder with onnxruntime"
    )
    add_scoring(score)
    score.add_argument(
        "--input", required=True, help="csv, parquet or npz file, or a folder of PNG/JPG images"
    )
    score.add_argument(
        "--output", required=True, help="result file: .csv or .parquet (written atomically)"
    )
    score.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help="rows read, scored and written at a time (default scoring.chunk_rows)",
    )
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.add_argument(
        "--explain",
        type=int,
        default=None,
        metavar="K",
        help="add each row's K features with the largest contributions (top1_feature, "
        "top1_contribution, ...); for models with per-feature contributions",
    )

    serve = add("serve", cmd_serve, "serve POST /score, GET /health and GET /metadata over HTTP")
    add_scoring(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="most rows one request may carry; more get HTTP 413 (default "
        "scoring.max_request_rows)",
    )
    serve.add_argument(
        "--reload-interval",
        type=float,
        default=None,
        help="seconds between looks at a models:/NAME@ALIAS alias; when it moves the new "
        "version is swapped in without downtime (default scoring.reload_interval_s)",
    )

    inspect = add("inspect", cmd_inspect, "describe a model: detector, input, threshold, versions")
    inspect.add_argument("model", help=model_help)
    inspect.add_argument("--tracking-uri", default=None, help=tracking_help)
    inspect.add_argument("--json", action="store_true", help="print the raw metadata JSON")
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
