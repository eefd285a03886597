"""The `normalcy` command: thin shells over the flows and stages, with errors for people."""

from __future__ import annotations

import argparse
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


def check_params(args: argparse.Namespace) -> None:
    """Fail on bad params before a flow (and Prefect's API) starts."""
    from normalcy.config import load_params

    load_params(args.params, args.set)


def cmd_train(args: argparse.Namespace) -> None:
    from normalcy.flows.train import train_flow

    check_params(args)
    print_summary(train_flow(args.params, args.set))


def cmd_stage(args: argparse.Namespace) -> None:
    from normalcy.config import load_params
    from normalcy.pipeline.runner import run_stage

    run_stage(args.name, load_params(args.params, args.set))


def cmd_monitor(args: argparse.Namespace) -> None:
    from normalcy.flows.monitor import monitor_flow

    check_params(args)
    print(json.dumps(monitor_flow(args.batch, args.params, args.set), indent=2, default=str))


def cmd_recalibrate(args: argparse.Namespace) -> None:
    from normalcy.flows.recalibrate import recalibrate_flow

    check_params(args)
    print(json.dumps(recalibrate_flow(args.batch, args.params, args.set), indent=2, default=str))


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
    else the params file's mlflow.tracking_uri (relative sqlite paths against the cwd)."""
    if not str(args.model).startswith("models:/"):
        return None
    if args.tracking_uri:
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from normalcy.registry import resolve_tracking_uri  # MLflow, not torch

    return resolve_tracking_uri(mlflow_params)[0]


def cmd_score(args: argparse.Namespace) -> None:
    from normalcy.scoring import check_output_path, load_session, resolve_model, score_file

    scoring, mlflow_params = scoring_sections(args)
    check_output_path(args.output)  # before a download or any reading
    with tempfile.TemporaryDirectory(prefix="normalcy-model-") as model_dir:
        model = resolve_model(args.model, model_dir, tracking_uri_for(args, mlflow_params))
        session = load_session(model.path, settings=session_settings(scoring))
        result = score_file(
            session, args.input, args.output, scoring.chunk_rows, progress=not args.quiet
        )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    version = f" version {model.version}" if model.version else ""
    share = result.n_anomalies / max(result.n_rows, 1)
    print(
        f"scored {result.n_rows} rows of {args.input} with {model.source}{version}: "
        f"{result.n_anomalies} flagged as anomalies ({share:.2%}); wrote {result.output} "
        f"(columns {', '.join(result.columns)})"
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


def _metadata_lines(metadata: dict, session: Any) -> Iterator[tuple[str, str]]:
    """(label, text) pairs describing a model for a person; unknown keys come last, raw."""
    from normalcy.scoring import input_spec, onnx_type_name

    meta = dict(metadata)
    used = {"input", "outputs"}
    if "detector" in meta:
        params = meta.get("detector_params") or {}
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        yield "detector", f"{meta['detector']}" + (f" ({shown})" if shown else "")
        used |= {"detector", "detector_params"}
    spec = input_spec(session, meta)
    yield "input", f"'{spec.name}' {spec.describe()}"
    if spec.id_column:
        yield "id column", spec.id_column
    for output in session.get_outputs():
        shape = ", ".join("N" if not isinstance(d, int) else str(d) for d in output.shape)
        yield "output", f"{output.name} {onnx_type_name(output.type)} [{shape}]"
    if "threshold" in meta:
        text = f"{meta['threshold']:.6g} (is_anomaly = score > threshold)"
        extra = []
        if "target_fpr" in meta:
            extra.append(f"target false-positive rate {meta['target_fpr']}")
        if "n_calibration_scores" in meta:
            extra.append(f"from {meta['n_calibration_scores']} calibration scores")
        yield "threshold", text + (f"; {', '.join(extra)}" if extra else "")
        used |= {"threshold", "target_fpr", "n_calibration_scores"}
    if "n_p_value_scores" in meta:
        yield "p-values", f"conformal, against {meta['n_p_value_scores']} calibration scores"
        used.add("n_p_value_scores")
    if meta.get("model_name"):
        version = meta.get("model_version")
        registered = f" version {version}" if version is not None else " (never registered)"
        yield "registered as", f"{meta['model_name']}{registered}"
        used |= {"model_name", "model_version"}
    for key, label in (("data_version", "data version"), ("mlflow_run_id", "MLflow run")):
        if key in meta:
            yield label, str(meta[key])
            used.add(key)
    versions = [
        f"{label} {meta[key]}"
        for key, label in (("normalcy_version", "normalcy"), ("opset", "ONNX opset"))
        if key in meta
    ]
    used |= {"normalcy_version", "opset"}
    producer = session.get_modelmeta().producer_name
    if producer:
        versions.append(f"exported by {producer}")
    if versions:
        yield "versions", ", ".join(versions)
    for key, value in meta.items():
        if key not in used:
            yield key, json.dumps(value, default=str)


def cmd_inspect(args: argparse.Namespace) -> None:
    from normalcy.scoring import file_digest, load_session, read_metadata, resolve_model

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
        lines.extend(_metadata_lines(metadata, session))
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input ends with a one-paragraph error and exit code 2, no traceback."""
    _quiet_environment()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except _user_errors(args.command) as exc:  # evaluated only when something was raised
        print(f"normalcy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
