"""Great Expectations checks that a batch looks like the training data before any model sees it.

`build_suite_spec` turns the reference (training) data into a JSON-serialisable spec; each call of
`validate_batch` builds a GX suite from that spec in a fresh ephemeral context and runs it. The
spec, not a GX store, is the artifact, so it can be versioned and read without GX.

Tabular data gets GX expectations per column (not null, inside the widened reference range,
numeric dtype) plus the ordered column list and the row count. Images get GX expectations on
per-image statistics, one row per image: mean and std brightness inside their widened reference
ranges, darkest and brightest value inside the widened range of all reference values. So a
batch of large images costs a few checks on n rows. Small images (up to `PER_PIXEL_LIMIT`
values, such as digits) are also checked per channel on a long frame (one row per image pixel),
where a failure names the image and the pixel. Array shapes (height and width after loading,
channels) are invisible to GX, so shape checks run in Python and are reported in the same
failure list.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from normalcy.config import ValidateParams  # noqa: E402
from normalcy.validation.failures import (  # noqa: E402
    EXAMPLES,
    IMAGE_SHAPE_CHECK,
    SHAPE_CHECK,
    UNIQUE_COLUMNS_CHECK,
    image_failure,
    jsonable,
    make_failure,
    sort_key,
    tabular_failure,
)

SPEC_VERSION = 1
PER_PIXEL_LIMIT = 4096  # values per image up to which pixels are checked one by one
IMAGE_STATISTICS = ("mean_brightness", "std_brightness", "darkest", "brightest")
# Numeric numpy dtypes accepted by ExpectColumnValuesToBeInTypeList (bool and object are not).
NUMERIC_TYPES = [
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
]


class DataValidationError(ValueError):
    """A batch failed validation; `.report` holds every failure, str() is the readable summary."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by Prefect/multiprocessing: rebuild from the report, not from the message.
        return (type(self), (self.report,))


@dataclass
class ValidationReport:
    """Outcome of one batch: every failed expectation with examples of the offending data."""

    batch_name: str
    success: bool
    n_rows: int
    failures: list[dict] = field(default_factory=list)
    checked: int = 0

    def to_dict(self) -> dict:
        """Strict JSON (no NaN/inf literals), so any JSON reader can load the report."""
        return jsonable(asdict(self))

    def summary(self) -> str:
        """One header line, then one line per failed expectation."""
        status = "passed" if self.success else "FAILED"
        head = (
            f"batch {self.batch_name!r} {status}: {len(self.failures)} of {self.checked} "
            f"checks failed on {self.n_rows} rows"
        )
        lines = [head]
        for failure in self.failures:
            where = f" [{failure['column']}]" if failure.get("column") is not None else ""
            examples = jsonable(failure.get("examples", []))
            lines.append(
                f"  - {failure['expectation']}{where}: {failure['details']}; examples: {examples}"
            )
        return "\n".join(lines)


# -- spec ----------------------------------------------------------------------------------


def build_suite_spec(
    reference: np.ndarray, feature_names: list[str], params: ValidateParams
) -> dict:
    """Describe normal data from the reference split: columns, dtype and widened value ranges.

    Ranges are widened by `range_tolerance * (max - min)` so that held-out data slightly beyond
    the training extremes still passes; a constant column gets a small absolute margin instead,
    otherwise any float noise would fail it. Images are described per channel."""
    ref = np.asarray(reference)
    if ref.ndim not in (2, 4):
        raise ValueError(
            f"reference must be [n, d] features or [n, c, h, w] images, got shape {list(ref.shape)}"
        )
    if len(ref) == 0:
        raise ValueError("reference is empty: cannot describe normal data from 0 rows")
    if not np.issubdtype(ref.dtype, np.number) or np.issubdtype(ref.dtype, np.bool_):
        raise ValueError(f"reference has dtype {ref.dtype}; expected a numeric array")
    ref = ref.astype(np.float64)
    if not np.isfinite(ref).all():
        raise ValueError("reference contains NaN or inf: clean it before building the suite")
    tol = params.range_tolerance
    n_features = int(np.prod(ref.shape[1:]))
    names = [str(n) for n in feature_names]
    per_pixel = ref.ndim == 2 or n_features <= PER_PIXEL_LIMIT
    if ref.ndim == 4 and not names and per_pixel:
        c, h, w = ref.shape[1:]
        names = [f"pixel_{k}_{y}_{x}" for k in range(c) for y in range(h) for x in range(w)]
    if len(names) != n_features and per_pixel:
        raise ValueError(
            f"{len(names)} feature names for {n_features} features (shape {list(ref.shape)})"
        )
    if len(set(names)) != len(names):
        raise ValueError("feature names are not unique")

    spec: dict[str, Any] = {
        "version": SPEC_VERSION,
        "kind": "tabular" if ref.ndim == 2 else "image",
        "dtype_kind": "float",
        "feature_names": names,
        "min_rows": params.min_rows,
        "range_tolerance": tol,
        "range_mostly": params.range_mostly,
        "n_reference_rows": len(ref),
    }
    if ref.ndim == 2:
        spec["columns"] = [_range_entry(name, ref[:, j], tol) for j, name in enumerate(names)]
    else:
        c, h, w = (int(s) for s in ref.shape[1:])
        channels = [_range_entry(f"channel_{k}", ref[:, k], tol) for k in range(c)]
        spec["columns"] = channels
        spec["image"] = {
            "shape": [c, h, w],
            "channels": c,
            "value_range": [
                min(ch["min"] for ch in channels),
                max(ch["max"] for ch in channels),
            ],
            "reference_range": [float(ref.min()), float(ref.max())],
            "per_pixel": per_pixel,
            "statistics": _statistics_entries(ref, tol, channels),
        }
    return spec


def _statistics_entries(ref: np.ndarray, tol: float, channels: list[dict]) -> list[dict]:
    """Widened reference ranges of each image's mean and std brightness; each image's darkest
    and brightest value must lie in the widened range of all reference values (a defect may be
    the darkest spot an image has ever had, but not darker than any pixel seen)."""
    stats = image_statistics(ref)
    low, high = min(ch["min"] for ch in channels), max(ch["max"] for ch in channels)
    entries = [_range_entry(name, stats[name].to_numpy(), tol) for name in IMAGE_STATISTICS[:2]]
    for name in IMAGE_STATISTICS[2:]:
        observed = stats[name].to_numpy()
        entries.append(
            {
                "name": name,
                "min": low,
                "max": high,
                "reference_min": float(observed.min()),
                "reference_max": float(observed.max()),
            }
        )
    return entries


def image_statistics(images: np.ndarray, chunk: int = 256) -> pd.DataFrame:
    """One row per image: mean and std brightness over all its values, darkest and brightest
    value (float64, in chunks of images; a NaN anywhere makes the image's statistics NaN)."""
    flat = images.reshape(len(images), -1)
    parts = []
    for start in range(0, len(flat), chunk):
        block = flat[start : start + chunk].astype(np.float64)
        stats = [block.mean(axis=1), block.std(axis=1), block.min(axis=1), block.max(axis=1)]
        parts.append(np.stack(stats, axis=1))
    table = np.concatenate(parts) if parts else np.zeros((0, len(IMAGE_STATISTICS)))
    return pd.DataFrame(table, columns=list(IMAGE_STATISTICS))


def _range_entry(name: str, values: np.ndarray, tol: float) -> dict:
    lo, hi = float(values.min()), float(values.max())
    margin = tol * (hi - lo) if hi > lo else max(tol, 1e-6) * max(abs(lo), 1.0)
    return {
        "name": name,
        "min": lo - margin,
        "max": hi + margin,
        "reference_min": lo,
        "reference_max": hi,
    }


# -- validation ----------------------------------------------------------------------------


def validate_batch(
    batch: np.ndarray | pd.DataFrame, spec: dict, batch_name: str
) -> ValidationReport:
    """Run the spec's GX expectations on `batch`; a bad batch gives success=False, never raises."""
    if spec.get("kind") == "image":
        return _validate_images(batch, spec, batch_name)
    return _validate_tabular(batch, spec, batch_name)


def check_batch(batch: np.ndarray | pd.DataFrame, spec: dict, batch_name: str) -> ValidationReport:
    """validate_batch for callers that must stop on bad data: raises DataValidationError."""
    report = validate_batch(batch, spec, batch_name)
    if not report.success:
        raise DataValidationError(report)
    return report


def save_report(reports: list[ValidationReport], path: str | Path) -> Path:
    """Write all batch reports as one JSON file (parents created); success means all passed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "success": all(r.success for r in reports),
        "batches": [r.to_dict() for r in reports],
    }
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def _validate_tabular(
    batch: np.ndarray | pd.DataFrame, spec: dict, batch_name: str
) -> ValidationReport:
    names: list[str] = spec["feature_names"]
    python_checks = 0
    if isinstance(batch, pd.DataFrame):
        frame = batch
        dupes = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
        python_checks += 1
        if dupes:
            failure = make_failure(
                UNIQUE_COLUMNS_CHECK, None, f"duplicate column names {dupes}", dupes
            )
            return _report(batch_name, len(frame), [failure], python_checks)
    else:
        array = np.asarray(batch)
        python_checks += 1
        if array.ndim != 2 or array.shape[1] != len(names):
            detail = f"expected an array of shape [n, {len(names)}], got {list(array.shape)}"
            failure = make_failure(SHAPE_CHECK, None, detail, [list(array.shape)])
            return _report(batch_name, _length(array), [failure], python_checks)
        frame = pd.DataFrame(array, columns=names)
    # An array has one dtype: when it is numeric (the shape check above looked at it), a
    # per-column dtype expectation is 64 GX checks of one fact, a quarter of the suite's time.
    typed_columns = isinstance(batch, pd.DataFrame) or not _is_numeric(frame.dtypes.iloc[0])

    present = set(frame.columns)
    ranges = {col["name"]: col for col in spec["columns"]}
    expectations = _table_expectations(names, spec["min_rows"])
    for name in names:
        if name not in present:
            continue  # the ordered-list expectation names it; nothing to check per value
        expectations += _column_expectations(
            name, frame[name].dtype, ranges[name], spec.get("range_mostly", 1.0), typed_columns
        )
    results = _run_gx(frame, expectations)
    failures = [tabular_failure(r, names, spec["min_rows"]) for r in results if not r.success]
    failures.sort(key=lambda f: sort_key(f, names))
    return _report(batch_name, len(frame), failures, len(results) + python_checks)


def _validate_images(
    batch: np.ndarray | pd.DataFrame, spec: dict, batch_name: str
) -> ValidationReport:
    c, h, w = spec["image"]["shape"]
    array = batch.to_numpy() if isinstance(batch, pd.DataFrame) else np.asarray(batch)
    if array.ndim == 2 and array.shape[1] == c * h * w:
        array = array.reshape(len(array), c, h, w)  # flattened pixels, as in a table
    if array.ndim != 4 or list(array.shape[1:]) != [c, h, w]:
        got = list(array.shape[1:]) if array.ndim == 4 else f"an array of shape {list(array.shape)}"
        detail = f"expected images of shape {[c, h, w]}, got {got}"
        failure = make_failure(IMAGE_SHAPE_CHECK, None, detail, [list(array.shape)])
        return _report(batch_name, _length(array), [failure], 1)

    n = len(array)
    failures, checked = _validate_image_statistics(array, spec)
    if spec["image"].get("per_pixel", True):
        pixel_failures, pixel_checked = _validate_pixels(array, spec)
        failures, checked = failures + pixel_failures, checked + pixel_checked
    return _report(batch_name, n, failures, checked + 1)


def _validate_image_statistics(array: np.ndarray, spec: dict) -> tuple[list[dict], int]:
    """GX on one row per image; a failure lists the offending images. (Specs written before
    per-image statistics existed have none: nothing to check.)"""
    entries = spec["image"].get("statistics")
    if entries is None:
        return [], 0
    frame = image_statistics(array)
    names = [entry["name"] for entry in entries]
    expectations = [
        _gx().expectations.ExpectTableRowCountToBeBetween(min_value=int(spec["min_rows"]))
    ]
    for entry in entries:
        expectations += _column_expectations(
            entry["name"], frame[entry["name"]].dtype, entry, spec.get("range_mostly", 1.0), False
        )
    results = _run_gx(frame, expectations)
    failures = [tabular_failure(r, names, spec["min_rows"]) for r in results if not r.success]
    failures.sort(key=lambda f: sort_key(f, names))
    return failures, len(results)


def _validate_pixels(array: np.ndarray, spec: dict) -> tuple[list[dict], int]:
    """GX per channel on a long frame: one row per (image, pixel); row r is image r // (h*w)."""
    c, h, w = spec["image"]["shape"]
    long = pd.DataFrame(
        {f"channel_{k}": array[:, k].reshape(-1) for k in range(c)},
    )
    channels = [col["name"] for col in spec["columns"]]
    # No column-list expectation: the channel columns are built here from the checked shape.
    # The per-image statistics count the images; a spec from before them counts pixel rows.
    expectations = []
    if "statistics" not in spec["image"]:
        min_rows = int(spec["min_rows"] * h * w)
        expectations.append(_gx().expectations.ExpectTableRowCountToBeBetween(min_value=min_rows))
    for col in spec["columns"]:
        expectations += _column_expectations(
            col["name"], long[col["name"]].dtype, col, spec.get("range_mostly", 1.0)
        )
    results = _run_gx(long, expectations)
    geometry = (h, w, spec["feature_names"])
    failures = [image_failure(r, spec["min_rows"], geometry) for r in results if not r.success]
    failures.sort(key=lambda f: sort_key(f, channels))
    return failures, len(results)


def _table_expectations(columns: list[str], min_rows: int) -> list:
    gx = _gx()
    return [
        gx.expectations.ExpectTableColumnsToMatchOrderedList(column_list=list(columns)),
        gx.expectations.ExpectTableRowCountToBeBetween(min_value=int(min_rows)),
    ]


def _is_numeric(dtype: Any) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _column_expectations(
    name: str, dtype: Any, bounds: dict, mostly: float = 1.0, check_type: bool = True
) -> list:
    """Per-column checks. The range check runs only on numeric columns: GX raises comparing
    strings with numbers, and the dtype expectation already fails such a column."""
    gx = _gx()
    expectations = [gx.expectations.ExpectColumnValuesToNotBeNull(column=name)]
    if check_type:
        expectations.insert(
            0,
            gx.expectations.ExpectColumnValuesToBeInTypeList(column=name, type_list=NUMERIC_TYPES),
        )
    if _is_numeric(dtype):
        # GX skips nulls here (NaN is caught above) but +/-inf is out of any finite range.
        # The range may tolerate a few rare values (`mostly`); infinity never is.
        largest = float(np.finfo(np.float64).max)
        expectations += [
            gx.expectations.ExpectColumnValuesToBeBetween(
                column=name, min_value=-largest, max_value=largest
            ),
            gx.expectations.ExpectColumnValuesToBeBetween(
                column=name,
                min_value=float(bounds["min"]),
                max_value=float(bounds["max"]),
                mostly=float(mostly),
            ),
        ]
    return expectations


def _run_gx(frame: pd.DataFrame, expectations: list) -> list:
    """Every expectation's result; failed ones carry SUMMARY details (examples).

    GX's cost is per expectation, and SUMMARY results cost ~1.7x a pass/fail answer, while
    almost every batch passes. So all expectations run pass/fail first, and only the failed ones
    run again for their examples: the same results at about 60% of the time."""
    results = _run_suite(frame, expectations, {"result_format": "BOOLEAN_ONLY"})
    failed = [i for i, result in enumerate(results) if not result.success]
    if failed:
        # Copies: GX sets its id on an expectation object, so two suites must not share one.
        detailed = _run_suite(
            frame,
            [copy.copy(expectations[i]) for i in failed],
            {"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES},
        )
        for i, result in zip(failed, detailed, strict=True):
            results[i] = result
    return results


def _run_suite(frame: pd.DataFrame, expectations: list, result_format: dict) -> list:
    """One ephemeral context per call: nothing is written to disk or shared between batches."""
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("normalcy")
        .add_dataframe_asset("batch")
        .add_batch_definition_whole_dataframe("whole")
    )
    # The list goes to the constructor: suite.add_expectation is quadratic (dedup on add).
    suite = context.suites.add(gx.ExpectationSuite(name="normalcy", expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(data=batch_definition, suite=suite, name="normalcy")
    )
    result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
    return list(result.results)


def _gx() -> Any:
    # Imported on first use: GX takes seconds to import, and spec building does not need it.
    import great_expectations as gx

    return gx


def _report(batch_name: str, n_rows: int, failures: list[dict], checked: int) -> ValidationReport:
    return ValidationReport(batch_name, not failures, int(n_rows), failures, checked)


def _length(array: np.ndarray) -> int:
    return int(array.shape[0]) if array.ndim >= 1 else 0
