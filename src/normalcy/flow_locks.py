"""One change of a model's champion at a time, across machines.

Training and recalibration both end by moving a model's `champion` alias; two at once would
race on it. A Prefect global concurrency limit (one slot per model, created on first use)
serialises them wherever their flows run, as long as they share a Prefect server. A run that
finds the slot taken fails at once with ModelBusy rather than queueing behind it: a scheduled
run that overlaps the previous one is a sign to look at, not to pile up."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from normalcy.errors import ModelBusy


def limit_name(model_name: str) -> str:
    """The limit's name for a model (Prefect refuses characters such as / % & > <)."""
    return "normalcy-champion-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_name)


# A timed-out acquisition is retried this many times when the slot turns out to be free: on a
# loaded machine the server's answer alone can take longer than `wait_seconds` (seen at load 12
# on 2 cores: ModelBusy with no other run of the model anywhere).
SLOW_SERVER_RETRIES = 5


def _slot_taken(name: str) -> bool:
    """Whether the limit's one slot is held now (by a run of another process or this one)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots >= 1


@contextmanager
def champion_changes(model_name: str, wait_seconds: float = 1.0) -> Iterator[None]:
    """Hold the model's slot for the whole block, or raise ModelBusy when another run holds
    it. A time-out while the slot is free (a slow server) is retried, not reported as busy."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    name = limit_name(model_name)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with ExitStack() as held:
        for _ in range(SLOW_SERVER_RETRIES + 1):
            try:
                held.enter_context(
                    concurrency(name, occupy=1, timeout_seconds=wait_seconds, strict=True)
                )
                break
            except TimeoutError:
                if _slot_taken(name):
                    raise ModelBusy(
                        f"another training or recalibration of {model_name!r} holds the "
                        f"Prefect concurrency limit {name!r}; try again when it has finished"
                    ) from None
        else:
            raise ModelBusy(
                f"the Prefect concurrency limit {name!r} is free but the server did not grant "
                f"it in {SLOW_SERVER_RETRIES + 1} tries of {wait_seconds:g} s; is it overloaded?"
            )
        yield
