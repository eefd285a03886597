"""`normalcy deploy --pool`: the train, monitor and recalibrate deployments in a work pool, on a
real (temporary) Prefect API."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from normalcy.cli import main
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration
PARAMS = str(REPO_ROOT / "params.yaml")


@pytest.fixture(autouse=True)
def prefect_logging_on_the_real_stderr():
    """Deploying sets Prefect's logging up again, and its console handler keeps the stream it
    found: pytest's capture, closed after the test. Set it up once more afterwards (this
    fixture is torn down after `capsys`), so later flows in the session do not log to a closed
    file."""
    yield
    from prefect.logging.configuration import setup_logging

    setup_logging(incremental=False)


async def _create_process_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


async def _read_deployments() -> dict:
    from prefect.client.orchestration import get_client

    names = ("normalcy-train/train", "normalcy-monitor/monitor", "normalcy-recalibrate/recalibrate")
    async with get_client() as client:
        return {name: await client.read_deployment_by_name(name) for name in names}


def test_deploy_creates_the_three_deployments_in_the_pool(prefect_harness, tmp_path, capsys):
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    asyncio.run(_create_process_pool(pool))
    code = main(
        [
            "deploy",
            "--pool",
            pool,
            "--params",
            PARAMS,
            "--working-dir",
            str(tmp_path),
            "--set",
            "train.epochs=3",
        ]
    )
    assert code == 0
    assert f"3 deployments in work pool {pool!r}" in capsys.readouterr().out
    found = asyncio.run(_read_deployments())
    for name, deployment in found.items():
        assert deployment.work_pool_name == pool, name
        assert deployment.entrypoint.startswith("normalcy.flows."), deployment.entrypoint
        assert deployment.parameters["overrides"] == ["train.epochs=3"]
        assert deployment.parameters["params_path"] == PARAMS
        assert deployment.job_variables["working_dir"] == str(tmp_path)
    assert found["normalcy-train/train"].entrypoint == "normalcy.flows.train.train_flow"
    assert found["normalcy-train/train"].schedules and found["normalcy-monitor/monitor"].schedules
    assert not found["normalcy-recalibrate/recalibrate"].schedules


def test_deploy_to_a_pool_that_does_not_exist_says_so(prefect_harness, capsys):
    assert main(["deploy", "--pool", "no-such-pool", "--params", PARAMS]) == 2
    err = capsys.readouterr().err
    assert "no-such-pool" in err and "create it" in err.lower()


def test_deploy_needs_a_pool():
    with pytest.raises(SystemExit) as exit_:
        main(["deploy", "--params", PARAMS])
    assert exit_.value.code == 2
