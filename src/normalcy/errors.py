"""Which exceptions are the user's to fix (printed as one message) rather than bugs (traceback),
and the ones that only the flows raise. Nothing here imports the flows."""

from __future__ import annotations


class NoChampionError(RuntimeError):
    """Monitoring and recalibration need a registered champion."""


class RecalibrationBusy(RuntimeError):
    """Another recalibration holds the lock: two at once would race on the champion alias."""


class ModelBusy(RuntimeError):
    """Another training or recalibration of the same model is changing its champion."""


class RecalibrationRefused(RuntimeError):
    """The batch must not become the new normal (invalid, too small, too contaminated, or a
    scale move beyond the configured limits); the message names every reason."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Bad params, bad data, failed validation or parity, missing champion, busy lock, DVC."""
    from normalcy.data.versioning import VersioningError
    from normalcy.export import ParityError

    # ConfigError, DataError and DataValidationError are ValueErrors.
    return (
        ValueError,
        FileNotFoundError,
        ParityError,
        VersioningError,
        NoChampionError,
        RecalibrationBusy,
        RecalibrationRefused,
        ModelBusy,
    )
