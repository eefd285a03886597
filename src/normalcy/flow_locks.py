"""One change of a model's champion at a time, across machines.

Training and recalibration both end by moving a model's `champion` alias; two at once would
race on it. A Prefect global concurrency limit (one slot per model, created on first use)
serialises them wherever their flows run, as long as they share a Prefect server. A run that
finds the slot taken fails at once with ModelBusy rather than queueing behind it: a scheduled
run that overlaps the previous one is a sign to look at, not to pile up.

A run killed while it holds the slot (SIGKILL, a power cut) cannot release it. A long-lived
Prefect server with its services on frees it when the lease expires (`LEASE_SECONDS`, renewed
in the background by a live holder). A temporary server never does: it keeps leases in memory,
runs no lease-expiry service, and dies with the run, while the slot count stays in the database.
So the holder also writes down who it is, and a later run may free a slot whose holder is
provably dead:

- The record is a Prefect Variable (`holder_variable`): it lives on the same server, in the same
  database, as the slot it describes, so whoever can see the slot can see its holder, on any
  host, with no extra store to configure. It holds host, pid namespace (containers may share a
  host name), pid, process start time (a reused pid is not the holder), since when, and the
  lease id. It is written right after the slot is
  taken and deleted right before the slot is released, so a record always names the holder of
  a taken slot; a taken slot without a record (the moment between taking and writing) is
  treated as busy.
- Only a holder of this host (and pid namespace) whose process is gone is freed
  (`processes.is_gone`). A holder on
  another host, an unreadable record or none at all gives ModelBusy: nothing is freed blindly.
- Freeing never frees twice. The server is asked to renew the dead holder's lease: when it
  knows the lease, the slot is released through it (idempotent, and the server's own
  expiry service goes through the same lease); when it does not (the temporary server that
  issued it is gone), nobody else can ever free it, and the slot count is decremented
  directly, after `RECORD_GRACE_SECONDS` and a check that the slot is still taken and the
  record still names the dead holder (a run that took the slot since would have replaced it).
- A host-local file lock (`host_lock`) serialises "take the slot + write the record" and
  "read the record + free + take" between the processes of one host, so no run of this host
  can see another's slot before its record exists.

Left open (both need a run on another host, and only lose that run its recoverability or slot,
never make two holders): between the decrement and the deletion of the dead holder's record, a
run on another host may take the freed slot and write its record, which is then deleted; that
run is then reported busy-with-no-record, never freed. And a long-lived server's expiry service
frees a dead holder's slot without deleting its record: if a run on another host takes the slot
and has still not written its record `RECORD_GRACE_SECONDS` after a run of the dead holder's
host found the lease unknown, that slot is decremented under it."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from normalcy.errors import ModelBusy
from normalcy.processes import is_gone, pid_namespace, this_process

log = logging.getLogger(__name__)

# A live holder renews its lease in the background; a long-lived server's expiry service frees
# the slot of a holder that stopped renewing after this long (Prefect's own default).
LEASE_SECONDS = 300.0
# Before a slot is decremented directly, a run that took it a moment ago gets this long to
# write its record (one request: well under a second even on a loaded server).
RECORD_GRACE_SECONDS = 2.0
HOLDER_KEYS = ("host", "pid_namespace", "pid", "start", "since", "lease_id")


def limit_name(model_name: str) -> str:
    """The limit's name for a model (Prefect refuses characters such as / % & > <)."""
    return "normalcy-champion-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_name)


def holder_variable(model_name: str) -> str:
    """The name of the Prefect Variable that records who holds the model's slot (variable
    names allow only letters, digits, '-' and '_', at most 255 of them)."""
    return ("normalcy-champion-holder-" + re.sub(r"[^A-Za-z0-9_-]", "-", model_name))[:255]


def _slot_taken(name: str) -> bool:
    """Whether the limit's one slot is held now (by a run of another process or this one)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots >= 1


@contextmanager
def host_lock(name: str) -> Iterator[None]:
    """An exclusive lock between the processes (and threads) of this host, on a file named
    after the limit in the temporary folder; the kernel drops it when its holder dies."""
    path = Path(tempfile.gettempdir()) / f"{name}.lock"
    try:  # read-only, and no O_CREAT on another user's file (fs.protected_regular refuses it)
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def read_holder(model_name: str) -> dict[str, str] | None:
    """The record of the slot's holder, or None when there is none or it is not one of ours."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        variable = client.read_variable_by_name(holder_variable(model_name))
    value: Any = None if variable is None else variable.value
    if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in HOLDER_KEYS):
        return None
    return {key: value[key] for key in HOLDER_KEYS}


def _write_holder(model_name: str, lease_id: UUID) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate
    from prefect.exceptions import ObjectAlreadyExists

    host, pid, start = this_process()
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"host": host, "pid_namespace": pid_namespace(), "pid": str(pid), "start": start,
              "since": since, "lease_id": str(lease_id)}  # fmt: skip
    name = holder_variable(model_name)
    with get_client(sync_client=True) as client:
        try:
            client.create_variable(VariableCreate(name=name, value=record))
        except ObjectAlreadyExists:  # a dead holder's, about to be replaced
            client.update_variable(VariableUpdate(name=name, value=record))


def _delete_holder(model_name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.delete_variable_by_name(holder_variable(model_name))
        except ObjectNotFound:
            pass


def describe(holder: dict[str, str] | None) -> str:
    """The holder in words, for ModelBusy and the log."""
    if holder is None:
        return "a run that left no record of itself (it may be taking the slot right now)"
    return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"


def _lease_known(lease_id: UUID) -> bool:
    """Whether the server still knows the lease (renewing it for a minute, the shortest it
    allows: the caller releases it at once). A server answers 410 for an unknown lease."""
    import httpx
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            client.renew_concurrency_lease(lease_id, lease_duration=60)
        except httpx.HTTPStatusError as error:
            if error.response.status_code in (404, 410):
                return False
            raise
    return True


def _free_dead_holder(name: str, model_name: str, holder: dict[str, str]) -> None:
    """Free the slot of a holder that is gone: through its lease when the server knows it,
    directly when no server can (call with `host_lock` held)."""
    from prefect.client.orchestration import get_client

    lease_id = UUID(holder["lease_id"])
    with get_client(sync_client=True) as client:
        if _lease_known(lease_id):
            client.release_concurrency_slots_with_lease(lease_id)
        else:
            time.sleep(RECORD_GRACE_SECONDS)
            if read_holder(model_name) != holder:
                return  # another run took the slot and recorded itself meanwhile
            if _slot_taken(name):
                since = datetime.fromisoformat(holder["since"])
                held_s = max((datetime.now(timezone.utc) - since).total_seconds(), 1e-3)
                client.release_concurrency_slots([name], slots=1, occupancy_seconds=held_s)
    _delete_holder(model_name)


def _take(name: str) -> UUID | None:
    """The lease id of the slot, or None when it is held (the server answers 423 Locked).
    One request, no waiting: Prefect's own acquisition retries a held slot until a timeout
    and logs the timeout as an ERROR, which a run that is refused, or a free slot on a slow
    server, should not print."""
    import httpx
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            response = client.increment_concurrency_slots_with_lease(
                [name], 1, "concurrency", LEASE_SECONDS
            )
        except httpx.HTTPStatusError as error:
            if error.response.status_code == 423:
                return None
            raise
    granted = response.json()
    if not granted.get("limits"):  # champion_changes creates it first: deleted meanwhile
        raise RuntimeError(f"the Prefect concurrency limit {name!r} vanished before its slot")
    return UUID(granted["lease_id"])


def _busy(name: str, model_name: str, holder: dict[str, str] | None) -> ModelBusy:
    """The refusal, naming the limit and its holder, so the user knows whom to wait for."""
    return ModelBusy(
        f"another training or recalibration of {model_name!r} holds the Prefect "
        f"concurrency limit {name!r}: {describe(holder)}; try again when it has finished"
    )


def _take_or_free_dead(name: str, model_name: str) -> UUID:
    """The lease id of the slot; a slot held by a dead process of this host is freed first
    (once: a slot taken again is another run's). ModelBusy names a live or unknown holder."""
    lease_id = _take(name)
    if lease_id is not None:
        return lease_id
    holder = read_holder(model_name)
    if (
        holder is None
        or holder["pid_namespace"] != pid_namespace()  # another container: its pids
        or not is_gone(holder["host"], holder["pid"], holder["start"])
    ):
        raise _busy(name, model_name, holder)
    log.warning(
        "the champion lock of %r (Prefect limit %r) was held by %s, a process that is "
        "gone: freeing it",
        model_name,
        name,
        describe(holder),
    )
    _free_dead_holder(name, model_name, holder)
    lease_id = _take(name)
    if lease_id is None:  # a run of another host took it in the meantime
        raise _busy(name, model_name, read_holder(model_name))
    return lease_id


def _release(name: str, model_name: str, lease_id: UUID) -> None:
    """Delete the record, then release the slot. A record that cannot be deleted keeps the
    slot held, so that the record still names its holder (the next run on this host frees it
    once this process is gone)."""
    from prefect.concurrency._asyncio import _discard_cleanup_lease
    from prefect.concurrency._sync import release_concurrency_slots_with_lease

    try:
        _delete_holder(model_name)
    except Exception as error:
        log.warning(
            "could not delete the record of the champion lock %r (%s): the lock stays held "
            "until a run of this host finds this process gone",
            name,
            error,
        )
        return
    release_concurrency_slots_with_lease(lease_id)
    _discard_cleanup_lease(lease_id)


@contextmanager
def champion_changes(model_name: str) -> Iterator[None]:
    """Hold the model's slot for the whole block, or raise ModelBusy at once when a live run
    (or one this host cannot vouch is dead) holds it. A slot left by a dead process of this
    host is freed and taken."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import release_concurrency_slots_with_lease

    name = limit_name(model_name)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with ExitStack() as held:
        with host_lock(name):
            lease_id = _take_or_free_dead(name, model_name)
            try:
                _write_holder(model_name, lease_id)
            except BaseException:  # a slot without a record would look busy forever
                release_concurrency_slots_with_lease(lease_id)
                raise
        held.callback(_release, name, model_name, lease_id)
        held.enter_context(
            maintain_concurrency_lease(lease_id, LEASE_SECONDS, raise_on_lease_renewal_failure=True)
        )
        yield
