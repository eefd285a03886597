"""One champion change per model at a time, through a real Prefect server's concurrency limit."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from uuid import UUID

import pytest

from normalcy.errors import ModelBusy
from normalcy.flow_locks import champion_changes, holder_variable, limit_name, read_holder
from normalcy.processes import pid_namespace


def test_limit_names_are_safe_for_prefect():
    assert limit_name("fraud/v2 & more") == "normalcy-champion-fraud-v2---more"


@pytest.mark.integration
def test_a_second_change_of_the_same_model_is_refused_while_the_first_runs(prefect_harness):
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with champion_changes("fraud"):
                inside.set()
                release.wait(30)
        except BaseException as error:  # surfaced below
            errors.append(error)
            inside.set()

    holder = threading.Thread(target=first)
    holder.start()
    assert inside.wait(30)
    try:
        with pytest.raises(ModelBusy, match="normalcy-champion-fraud"):
            with champion_changes("fraud"):
                pass
        with champion_changes("other-model"):  # another model is not held up
            pass
    finally:
        release.set()
        holder.join(30)
    assert not errors
    with champion_changes("fraud"):  # released when the first block ended
        pass


@pytest.mark.integration
def test_a_refused_change_fails_at_once_and_logs_no_error(prefect_harness, caplog):
    """Prefect's own acquisition waits for a held slot and logs its time-out as an ERROR
    (`ConcurrencySlotAcquisitionWithLeaseService failed ...`); a refused run must only raise."""
    from normalcy.flow_locks import _slot_taken

    with champion_changes("quiet-model"):
        assert _slot_taken(limit_name("quiet-model"))
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(ModelBusy, match="normalcy-champion-quiet-model"):
                with champion_changes("quiet-model"):
                    pass
    assert not _slot_taken(limit_name("quiet-model"))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    with champion_changes("quiet-model"):  # nothing was left held
        pass


# A holder in another process: takes the lock (through its own temporary API when the
# environment names none), says so, and holds it until its stdin closes or it is killed.
HOLDER_SCRIPT = """
import sys
from normalcy.prefect_api import start_temporary_api_early

api = start_temporary_api_early()
with api():
    from normalcy.flow_locks import champion_changes

    with champion_changes(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
"""


def _clean_env(**updates: str) -> dict[str, str]:
    """This environment without any Prefect setting (the test decides which API), plus
    `updates`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **updates}


def _start_holder(model: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A holder process (its own session, so that its temporary server can be ended with it)
    that has taken the lock of `model`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, model],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log_path.open("w"),
        text=True,
        start_new_session=True,
    )
    ready, _, _ = select.select([holder.stdout], [], [], 240)
    line = holder.stdout.readline() if ready else ""
    assert line.strip() == "held", f"the holder did not take the lock: {log_path.read_text()}"
    return holder


def _end_group(process: subprocess.Popen) -> None:
    """SIGKILL the process's session (itself and the temporary server it started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def _active_slots(model: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name(model)).active_slots


def _dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def _record_holder(model: str, value: object) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate

    with get_client(sync_client=True) as client:
        client.create_variable(VariableCreate(name=holder_variable(model), value=value))


def _holder(host: str, pid: str, lease_id: object) -> dict[str, str]:
    """A record as the lock writes it, with a start time no live process has."""
    since = "2026-01-01T00:00:00+00:00"
    return {"host": host, "pid_namespace": pid_namespace(), "pid": pid, "start": "1",
            "since": since, "lease_id": str(lease_id)}  # fmt: skip


@pytest.mark.integration
def test_a_lock_left_by_a_killed_run_is_freed_by_the_next_run_of_this_host(tmp_path, caplog):
    """Two processes, each with its own temporary Prefect API over one SQLite database: the
    first is killed holding the lock, the server that knew its lease is gone with it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from normalcy import prefect_api
    from normalcy.flow_locks import _lease_known

    env = _clean_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    holder = _start_holder("killed-model", env, tmp_path / "holder.log")
    port = prefect_api._free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        prefect_api._server_command(port), env={**env, **prefect_api.SERVER_ENV}
    )
    try:
        os.kill(holder.pid, signal.SIGKILL)  # the holder only: its server lives on, orphaned
        holder.wait(30)  # reaped, as its shell would
        prefect_api._wait_until_healthy(server, api_url, 240)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            assert _active_slots("killed-model") == 1
            dead = read_holder("killed-model")
            assert dead["pid"] == str(holder.pid)
            assert not _lease_known(UUID(dead["lease_id"]))  # so the count is decremented
            with caplog.at_level(logging.WARNING, logger="normalcy.flow_locks"):
                with champion_changes("killed-model"):
                    assert _active_slots("killed-model") == 1  # freed once, taken once
                    assert read_holder("killed-model")["pid"] == str(os.getpid())
            assert f"pid {holder.pid} on host {socket.gethostname()} since" in caplog.text
            assert "gone: freeing it" in caplog.text
            assert _active_slots("killed-model") == 0
            assert read_holder("killed-model") is None
    finally:
        _end_group(holder)
        prefect_api.stop_quickly(server)


@pytest.mark.integration
def test_a_live_holder_in_another_process_is_named_and_keeps_its_lock(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = _clean_env(PREFECT_API_URL=PREFECT_API_URL.value())
    holder = _start_holder("live-model", env, tmp_path / "holder.log")
    try:
        with pytest.raises(ModelBusy, match=rf"pid {holder.pid} on host .* since "):
            with champion_changes("live-model"):
                pass
        assert _active_slots("live-model") == 1
        assert read_holder("live-model")["pid"] == str(holder.pid)
        holder.stdin.close()  # the holder ends its block normally
        assert holder.wait(60) == 0
        assert _active_slots("live-model") == 0
        assert read_holder("live-model") is None
    finally:
        _end_group(holder)


@pytest.mark.integration
def test_a_dead_holder_whose_lease_the_server_knows_is_released_through_its_lease(
    prefect_harness, caplog
):
    """A long-lived server still holds the dead holder's lease: released through it, once."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease

    from normalcy.flow_locks import _lease_known

    with champion_changes("leased-model"):  # creates the limit
        pass
    lease = acquire_concurrency_slots_with_lease([limit_name("leased-model")], 1, strict=True)
    dead = _dead_pid()
    _record_holder("leased-model", _holder(socket.gethostname(), str(dead), lease.lease_id))
    with caplog.at_level(logging.WARNING, logger="normalcy.flow_locks"):
        with champion_changes("leased-model"):
            assert _active_slots("leased-model") == 1
            assert not _lease_known(lease.lease_id)  # revoked by its release
    assert f"pid {dead} on host" in caplog.text
    assert _active_slots("leased-model") == 0
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease.lease_id)  # idempotent: a no-op
    assert _active_slots("leased-model") == 0


@pytest.mark.integration
@pytest.mark.parametrize(
    "record",
    [
        "another host",  # its process may well be alive: only that host can tell
        "another container",  # same host name, other pids (host networking)
        "no record",  # taken a moment ago, record not yet written
        "unreadable",
    ],
)
def test_a_holder_this_host_cannot_prove_dead_is_never_freed(prefect_harness, record):
    from prefect.client.orchestration import get_client
    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease

    model = "unproven-" + record.replace(" ", "-")
    with champion_changes(model):  # creates the limit
        pass
    lease = acquire_concurrency_slots_with_lease([limit_name(model)], 1, strict=True)
    dead = str(_dead_pid())
    values = {
        "another host": _holder("elsewhere.example", dead, lease.lease_id),
        "another container": {
            **_holder(socket.gethostname(), dead, lease.lease_id),
            "pid_namespace": "pid:[1]",
        },
        "no record": None,
        "unreadable": {"pid": dead},
    }
    if values[record] is not None:
        _record_holder(model, values[record])
    expected = {
        "another host": f"pid {dead} on host elsewhere.example since",
        "another container": f"pid {dead} on host {socket.gethostname()} since",
    }.get(record, "no record")
    with pytest.raises(ModelBusy, match=expected):
        with champion_changes(model):
            pass
    assert _active_slots(model) == 1
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease.lease_id)
    assert _active_slots(model) == 0
