"""The `normalcy` command: thin shells over the flows and stages, with errors for people."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence


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
    from normalcy.stage_runner import run_stage

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


def cmd_inspect(args: argparse.Namespace) -> None:
    from normalcy.scoring import read_metadata

    print(json.dumps(read_metadata(args.model), indent=2))


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
    from normalcy.stage_runner import STAGES

    stage.add_argument("name", choices=STAGES)
    monitor = add("monitor", cmd_monitor, "check a batch for drift against the champion")
    monitor.add_argument(
        "--batch", default=None, help="npz/csv/parquet batch (default monitor.batch_path)"
    )
    recalibrate = add(
        "recalibrate", cmd_recalibrate, "re-estimate the champion's threshold on a batch"
    )
    recalibrate.add_argument("--batch", required=True, help="npz/csv/parquet batch")
    add("schedule", cmd_schedule, "serve the train and monitor deployments on their cron schedules")
    inspect = commands.add_parser("inspect", help="print the metadata stored in an ONNX model")
    inspect.add_argument("model", help="path to model.onnx")
    inspect.set_defaults(handler=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input ends with a one-paragraph error and exit code 2, no traceback."""
    _quiet_environment()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    from normalcy.errors import user_errors

    try:
        args.handler(args)
    except user_errors() as exc:
        print(f"normalcy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
