"""One champion change per model at a time, through a real Prefect server's concurrency limit."""

from __future__ import annotations

import threading

import pytest

from normalcy.errors import ModelBusy
from normalcy.flow_locks import champion_changes, limit_name


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
            with champion_changes("fraud", wait_seconds=0.5):
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
def test_a_free_slot_that_times_out_is_not_called_busy(prefect_harness):
    """A time-out while nobody holds the slot is the server's slowness: said as such."""
    from normalcy.flow_locks import _slot_taken

    with champion_changes("slow-model"):
        assert _slot_taken(limit_name("slow-model"))
    assert not _slot_taken(limit_name("slow-model"))
    with pytest.raises(ModelBusy, match="is free but the server did not grant it"):
        with champion_changes("slow-model", wait_seconds=1e-6):
            pass
    with champion_changes("slow-model"):  # nothing was left held
        pass
