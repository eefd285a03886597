"""Retry I/O that fails for a moment: a server restarting, a dropped connection, a 503.

Why one helper: DVC pushes, MLflow logging and registration all talk to a remote that may blink;
each retries the same way (exponential backoff, a bounded number of attempts from params), and
only errors that can pass are retried, so a wrong credential or a missing model fails at once.
MLflow's own HTTP client retries too (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, default 7 with factor
2: about four minutes of silence per call); `mlflow_http_settings` sizes it from the same policy
so a server that is gone fails within the policy's budget with a clear error."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Words in an error's text that mark a fault of the connection or the server, not of the request.
TRANSIENT_MARKERS = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "max retries exceeded",
    "temporarily unavailable",
    "timed out",
    "timeout",
    "bad gateway",
    "service unavailable",
    "gateway time",
    "too many requests",
    "503",
    "502",
    "504",
    "429",
)


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all; waits base, 2 base, 4 base, ... capped at `max_delay_s`."""

    attempts: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1 (1 = no retry), got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError(
                f"retry delays must be >= 0 s, got base {self.base_delay_s}, max {self.max_delay_s}"
            )

    def delays(self) -> Iterator[float]:
        """The waits between attempts (attempts - 1 of them)."""
        for retry in range(self.attempts - 1):
            yield min(self.base_delay_s * 2**retry, self.max_delay_s)


def is_transient(error: BaseException) -> bool:
    """A connection-level fault or a server answer that says 'try later' (502/503/504/429)."""
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    text = f"{type(error).__name__}: {error}".lower()
    return any(marker in text for marker in TRANSIENT_MARKERS)


def call_with_retry(
    action: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    transient: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`action()`, retried while it raises a transient error and attempts remain; the last
    error is raised with a note of how many attempts `what` took."""
    delays = policy.delays()
    for attempt in range(1, policy.attempts + 1):
        try:
            return action()
        except Exception as error:
            delay = next(delays, None)
            if delay is None or not transient(error):
                if attempt > 1:
                    error.add_note(f"{what}: gave up after {attempt} attempts")
                raise
            log.warning(
                "%s failed (attempt %d of %d: %s); retrying in %.1f s",
                what,
                attempt,
                policy.attempts,
                str(error).splitlines()[0][:200] if str(error) else type(error).__name__,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def mlflow_http_settings(policy: RetryPolicy) -> dict[str, str]:
    """MLflow client settings that retry each HTTP request within the same policy."""
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(policy.attempts - 1),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(round(policy.base_delay_s)),  # an int there
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    }


def apply_mlflow_http_settings(policy: RetryPolicy) -> None:
    """Set those in the environment MLflow reads per request; a value the user set is kept."""
    for key, value in mlflow_http_settings(policy).items():
        os.environ.setdefault(key, value)
