"""The onnxruntime-only commands: `normalcy score`, `serve` and `inspect`.

They must run where torch is not installed, so nothing here (or in what it imports) touches the
training side of normalcy; `cli.py` registers them with `add_scoring_commands`."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from typing import Any

AddCommand = Callable[[str, Callable[[argparse.Namespace], None], str], argparse.ArgumentParser]


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
        ("max_body_bytes", "max_request_bytes"),
        ("workers", "workers"),
        ("batch_window_ms", "batch_window_ms"),
        ("batch_max_rows", "batch_max_rows"),
        ("batch_queue", "batch_queue"),
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
        allow_spinning=scoring.allow_spinning,
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
    from normalcy.scoring import (
        check_output_path,
        file_digest,
        load_session,
        resolve_model,
        score_file,
    )

    scoring, mlflow_params = scoring_sections(args)
    check_output_path(args.output)  # before a download or any reading
    if args.maps is not None:
        from normalcy.scoring.maps import check_maps_target

        check_maps_target(args.maps)
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
            prediction_log=prediction_log(args),
            model_version=model.version or f"sha256:{file_digest(model.path)[:12]}",
            maps=args.maps,
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


def prediction_log(args: argparse.Namespace) -> Any:
    """The `--log` prediction log, or None."""
    from normalcy.scoring.prediction_log import PredictionLog

    return None if args.log is None else PredictionLog(args.log)


def cmd_serve(args: argparse.Namespace) -> None:
    from normalcy.serving import BatchOptions, serve

    scoring, mlflow_params = scoring_sections(args)
    batching = None
    if scoring.batch_window_ms is not None:
        batching = BatchOptions(
            scoring.batch_window_ms, scoring.batch_max_rows, scoring.batch_queue
        )
    serve(
        args.model,
        args.host,
        args.port,
        tracking_uri=tracking_uri_for(args, mlflow_params),
        max_batch=scoring.max_request_rows,
        reload_interval=scoring.reload_interval_s,
        settings=session_settings(scoring),
        prediction_log=args.log,
        max_body_bytes=scoring.max_request_bytes,
        batching=batching,
        token_env=args.token_env,
        workers=scoring.workers,
        log_level=args.log_level,
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


LOG_HELP = (
    "append each row's time, model version, score and decision to this prediction log: a "
    ".sqlite/.db file or a folder of Parquet parts (what `normalcy monitor --log` reads)"
)


def add_scoring_commands(add: AddCommand) -> None:
    """Register score, serve and inspect through `cli.build_parser`'s `add`."""
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
    score.add_argument("--log", default=None, metavar="PATH", help=LOG_HELP)
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
    score.add_argument(
        "--maps",
        default=None,
        metavar="DIR",
        help="also write each image's anomaly map: PNG heatmaps into DIR (new or empty; one "
        "colour scale for all, in DIR/scale.json), or raw maps into one FILE.npz",
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

    serve = add("serve", cmd_serve, "serve POST /score, /health, /metadata and /metrics over HTTP")
    add_scoring(serve)
    serve.add_argument("--log", default=None, metavar="PATH", help=LOG_HELP)
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
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="largest request body; larger gets HTTP 413 before it is parsed (default "
        "scoring.max_request_bytes, 16 MiB)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes; workers x --intra-op-threads must fit the available CPUs "
        "(default scoring.workers)",
    )
    serve.add_argument(
        "--batch-window-ms",
        type=float,
        default=None,
        help="micro-batching: score the rows of requests arriving within this many ms in one "
        "onnxruntime call (0: batch what is queued; default scoring.batch_window_ms, off)",
    )
    serve.add_argument(
        "--batch-max-rows",
        type=int,
        default=None,
        help="most rows in one micro-batch call (default scoring.batch_max_rows)",
    )
    serve.add_argument(
        "--batch-queue",
        type=int,
        default=None,
        help="requests that may wait for a micro-batch; more get HTTP 503 (default "
        "scoring.batch_queue)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level; below info, no access log line per request (default info)",
    )
    serve.add_argument(
        "--token-env",
        default=None,
        metavar="VARIABLE",
        help="require 'Authorization: Bearer <token>' on every path but /health, the token "
        "read from this environment variable (e.g. NORMALCY_SERVE_TOKEN)",
    )

    inspect = add("inspect", cmd_inspect, "describe a model: detector, input, threshold, versions")
    inspect.add_argument("model", help=model_help)
    inspect.add_argument("--tracking-uri", default=None, help=tracking_help)
    inspect.add_argument("--json", action="store_true", help="print the raw metadata JSON")
