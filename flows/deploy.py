"""Serve the train and monitor flows as Prefect deployments on the cron schedules in params."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from normalcy.config import Params, load_params
from normalcy.flows.monitor import monitor_flow
from normalcy.flows.train import train_flow


def build_deployments(params: Params, params_path: str = "params.yaml") -> list[RunnerDeployment]:
    """The two scheduled deployments: monitor often, train rarely. Each runs one at a time, so a
    slow monitor (and the recalibration it triggers) never overlaps the next one."""
    timezone = params.schedule.timezone
    return [
        monitor_flow.to_deployment(
            name="monitor",
            schedule=Cron(params.schedule.monitor_cron, timezone=timezone),
            concurrency_limit=1,
            parameters={"batch_path": params.monitor.batch_path, "params_path": params_path},
            description="Drift check of the incoming batch; recalibrates on drift.",
            tags=["normalcy", "monitor"],
        ),
        train_flow.to_deployment(
            name="train",
            schedule=Cron(params.schedule.train_cron, timezone=timezone),
            concurrency_limit=1,
            parameters={"params_path": params_path},
            description="Full retraining: version, validate, clean, train, export, register.",
            tags=["normalcy", "train"],
        ),
    ]


def serve_deployments(params_path: str = "params.yaml") -> None:
    """Register the deployments and run them in this process until stopped (Ctrl+C)."""
    params = load_params(params_path)
    serve(*build_deployments(params, params_path))


if __name__ == "__main__":
    serve_deployments()
