"""Step 2, validate: a Great Expectations suite built from the training split; every split must
pass it before anything is trained."""

from __future__ import annotations

from pathlib import Path

from normalcy.config import ValidateParams
from normalcy.data.sources import DataError
from normalcy.data.splits import Splits
from normalcy.jsonio import write_json
from normalcy.pipeline import artifacts
from normalcy.validation.suite import (
    ValidationReport,
    build_suite_spec,
    save_report,
    validate_batch,
)


class DataValidationFailed(DataError):
    """A split failed its Great Expectations suite; the report names each failed expectation."""

    def __init__(self, reports: list[ValidationReport], report_path: Path) -> None:
        failed = [r for r in reports if not r.success]
        body = "\n".join(r.summary() for r in failed)
        super().__init__(f"data validation failed (report: {report_path}):\n{body}")
        self.reports = reports
        self.report_path = report_path


def validate(splits: Splits, params: ValidateParams) -> tuple[dict, list[ValidationReport]]:
    """(suite spec, one report per split). The spec and the report are written whether or not
    the data passes; a failure raises `DataValidationFailed` before any training."""
    spec = build_suite_spec(splits.train.X, splits.feature_names, params)
    write_json(spec, artifacts.VALIDATION_SPEC)
    reports = [validate_batch(split.X, spec, name) for name, split in splits.items()]
    report_path = save_report(reports, artifacts.validation_report(params))
    if not all(r.success for r in reports):
        raise DataValidationFailed(reports, Path(report_path))
    return spec, reports
