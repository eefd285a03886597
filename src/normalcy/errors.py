"""Which exceptions are the user's to fix (printed as one message) rather than bugs (traceback)."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Bad params, bad data, failed validation or parity, missing champion, busy lock, DVC."""
    from normalcy.data.versioning import VersioningError
    from normalcy.export import ParityError
    from normalcy.flows.monitor import NoChampionError
    from normalcy.flows.recalibrate import RecalibrationBusy

    # ConfigError, DataError and DataValidationError are ValueErrors.
    return (
        ValueError,
        FileNotFoundError,
        ParityError,
        VersioningError,
        NoChampionError,
        RecalibrationBusy,
    )
