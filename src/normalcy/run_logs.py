"""Prefect logs a failed task or flow run with its traceback. For a mistake the user has to fix
(bad data, params, a failed gate: the CLI's user errors) the CLI prints one message instead, so
those records are left out; a bug (any other exception) keeps its traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable

PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")

ErrorTypes = Callable[[], tuple[type[BaseException], ...]]


def is_user_error(exc: BaseException, user_errors: tuple[type[BaseException], ...]) -> bool:
    """One of the user-error types, raised as a type normalcy defines (DataError, ConfigError,
    ParityError, ...). A bare ValueError or OSError may come from a bug deep in a library, so
    its traceback stays."""
    return isinstance(exc, user_errors) and type(exc).__module__.startswith("normalcy.")


class UserErrorTracebacks(logging.Filter):
    """Drops a run-failure record whose exception is a user error; the CLI reports it."""

    def __init__(self, user_errors: ErrorTypes) -> None:
        super().__init__()
        self.user_errors = user_errors  # called only when a failure is logged

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not is_user_error(exc, self.user_errors())


def hide_user_error_tracebacks(user_errors: ErrorTypes) -> None:
    """Install the filter on Prefect's task- and flow-run loggers (once)."""
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorTracebacks) for f in logger.filters):
            logger.addFilter(UserErrorTracebacks(user_errors))
