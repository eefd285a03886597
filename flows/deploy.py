"""The flows as Prefect deployments: served by one process on the cron schedules in params
(`normalcy schedule`), or created in a work pool whose workers run them (`normalcy deploy`)."""

from __future__ import annotations

from uuid import UUID

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from normalcy.config import Params, load_params
from normalcy.flows.monitor import monitor_flow
from normalcy.flows.recalibrate import recalibrate_flow
from normalcy.flows.train import train_flow


def run_parameters(params_path: str, overrides: list[str] | None) -> dict:
    """The parameters every deployment's runs get by default: the params file and overrides."""
    return {"params_path": params_path, **({"overrides": overrides} if overrides else {})}


def build_deployments(
    params: Params,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    entrypoint_type: EntrypointType = EntrypointType.FILE_PATH,
) -> list[RunnerDeployment]:
    """The two scheduled deployments: monitor often, train rarely. Each runs one at a time, so a
    slow monitor (and the recalibration it triggers) never overlaps the next one."""
    timezone = params.schedule.timezone
    common = run_parameters(params_path, overrides)
    return [
        monitor_flow.to_deployment(
            name="monitor",
            schedule=Cron(params.schedule.monitor_cron, timezone=timezone),
            concurrency_limit=1,
            parameters={"batch_path": params.monitor.batch_path, **common},
            description="Drift check of the incoming batch; recalibrates on drift.",
            tags=["normalcy", "monitor"],
            entrypoint_type=entrypoint_type,
        ),
        train_flow.to_deployment(
            name="train",
            schedule=Cron(params.schedule.train_cron, timezone=timezone),
            concurrency_limit=1,
            parameters=common,
            description="Full retraining: version, validate, clean, train, export, register.",
            tags=["normalcy", "train"],
            entrypoint_type=entrypoint_type,
        ),
    ]


def pool_deployments(
    params: Params, params_path: str, overrides: list[str] | None
) -> list[RunnerDeployment]:
    """The scheduled two and an unscheduled recalibrate (a run names its batch), pointing at the
    installed package by module path: a worker needs normalcy installed, not this source tree."""
    module = EntrypointType.MODULE_PATH
    recalibrate = recalibrate_flow.to_deployment(
        name="recalibrate",
        concurrency_limit=1,
        parameters=run_parameters(params_path, overrides),
        description="New threshold for the champion from a vetted batch (parameter batch_path).",
        tags=["normalcy", "recalibrate"],
        entrypoint_type=module,
    )
    return [*build_deployments(params, params_path, overrides, module), recalibrate]


def deploy_to_pool(
    pool: str,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    working_dir: str | None = None,
    image: str | None = None,
) -> list[UUID]:
    """Create (or update) the deployments in work pool `pool`; their ids. `working_dir`: where
    a process worker runs them (params_path is relative to it); `image`: for pools that run
    containers (Kubernetes, Docker). A pool that does not exist is a ValueError naming it."""
    from prefect import deploy

    params = load_params(params_path, overrides)  # bad params fail here, not in every run
    deployments = pool_deployments(params, params_path, overrides)
    if working_dir:
        for deployment in deployments:
            deployment.job_variables = {**deployment.job_variables, "working_dir": working_dir}
    return deploy(
        *deployments,
        work_pool_name=pool,
        image=image,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )


def serve_deployments(params_path: str = "params.yaml") -> None:
    """Register the deployments and run them in this process until stopped (Ctrl+C)."""
    params = load_params(params_path)
    serve(*build_deployments(params, params_path))


if __name__ == "__main__":
    serve_deployments()
