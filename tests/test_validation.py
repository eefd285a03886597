"""Great Expectations validation on real digits data: real GX runs, no mocks.

Each `validate_batch` call builds and runs a real GX suite (~2 s for 64 columns), so fixtures
share the spec and the clean report across tests."""

from __future__ import annotations

import json
import os
import pickle

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from normalcy.config import ValidateParams  # noqa: E402
from normalcy.validation.suite import (  # noqa: E402
    DataValidationError,
    ValidationReport,
    build_suite_spec,
    check_batch,
    save_report,
    validate_batch,
)

NAMES = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
SPLIT = 1500  # digits rows [:1500] are the reference, [1500:] (297 rows) the held-out batch


@pytest.fixture(scope="module")
def digits(digits_xy) -> np.ndarray:
    return digits_xy[0]


@pytest.fixture(scope="module")
def spec(digits) -> dict:
    return build_suite_spec(digits[:SPLIT], NAMES, ValidateParams(range_mostly=1.0))


@pytest.fixture(scope="module")
def image_spec(digits) -> dict:
    return build_suite_spec(
        digits[:SPLIT].reshape(-1, 1, 8, 8), NAMES, ValidateParams(range_mostly=1.0)
    )


@pytest.fixture(scope="module")
def held_out(digits) -> np.ndarray:
    return digits[SPLIT:].copy()


@pytest.fixture(scope="module")
def clean_report(held_out, spec) -> ValidationReport:
    return check_batch(held_out, spec, "held_out")


def failures_of(report: ValidationReport, expectation: str) -> list[dict]:
    return [f for f in report.failures if f["expectation"] == expectation]


# -- the spec ------------------------------------------------------------------------------


def test_spec_widens_each_column_range_and_is_json(digits, spec):
    ref = digits[:SPLIT].astype(np.float64)
    assert json.loads(json.dumps(spec, allow_nan=False)) == spec
    assert spec["kind"] == "tabular" and spec["dtype_kind"] == "float"
    assert spec["feature_names"] == NAMES
    assert [c["name"] for c in spec["columns"]] == NAMES
    assert spec["min_rows"] == 1
    j = NAMES.index("pixel_3_3")
    lo, hi = ref[:, j].min(), ref[:, j].max()
    assert hi > lo
    assert spec["columns"][j]["min"] == pytest.approx(lo - 0.1 * (hi - lo))
    assert spec["columns"][j]["max"] == pytest.approx(hi + 0.1 * (hi - lo))
    # pixel_0_0 is always 0 in digits: a constant column still gets a small margin.
    constant = spec["columns"][0]
    assert constant["reference_min"] == constant["reference_max"] == 0.0
    assert constant["min"] < 0.0 < constant["max"] <= 1.0


def test_image_spec_has_shape_channels_and_global_range(image_spec):
    assert image_spec["kind"] == "image"
    assert image_spec["image"]["shape"] == [1, 8, 8]
    assert image_spec["image"]["channels"] == 1
    assert image_spec["image"]["reference_range"] == [0.0, 16.0]
    assert image_spec["image"]["value_range"] == pytest.approx([-1.6, 17.6])
    assert json.loads(json.dumps(image_spec, allow_nan=False)) == image_spec


def test_spec_refuses_reference_with_nan(digits):
    ref = digits[:100].copy()
    ref[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        build_suite_spec(ref, NAMES, ValidateParams())


def test_spec_refuses_wrong_number_of_names(digits):
    with pytest.raises(ValueError, match="63 feature names for 64 features"):
        build_suite_spec(digits[:100], NAMES[:63], ValidateParams())


# -- tabular batches -----------------------------------------------------------------------


def test_clean_held_out_batch_passes(clean_report):
    assert clean_report.success, clean_report.summary()
    assert clean_report.failures == []
    assert clean_report.n_rows == 297
    # shape and dtype of the array + column list + row count + 64 columns x (not null, finite,
    # range): a numeric array's single dtype is checked once, not per column
    assert clean_report.checked == 1 + 2 + 64 * 3


def test_nan_fails_naming_the_column(held_out, spec):
    batch = held_out.copy()
    batch[3, 10] = np.nan
    report = validate_batch(batch, spec, "nan")
    assert not report.success
    assert report.failures == [
        {
            "expectation": "expect_column_values_to_not_be_null",
            "column": "pixel_1_2",
            "details": "1 of 297 values are null/NaN (rows [3])",
            "examples": [3],
        }
    ]


def test_inf_fails_as_out_of_range(held_out, spec):
    batch = held_out.copy()
    batch[4, 20] = np.inf
    batch[[5, 6], 21] = -np.inf
    report = validate_batch(batch, spec, "inf")
    by_column = {f["column"]: f for f in report.failures}
    assert set(by_column) == {"pixel_2_4", "pixel_2_5"}
    assert by_column["pixel_2_4"]["expectation"] == "expect_column_values_to_be_between"
    assert by_column["pixel_2_4"]["examples"] == ["inf"]
    assert by_column["pixel_2_5"]["examples"] == ["-inf", "-inf"]
    assert "2 of 297 values outside" in by_column["pixel_2_5"]["details"]


def test_out_of_range_value_fails_with_example(held_out, spec):
    batch = held_out.copy()
    batch[7, 30] = 99.0
    report = validate_batch(batch, spec, "range")
    [failure] = report.failures
    assert failure["expectation"] == "expect_column_values_to_be_between"
    assert failure["column"] == "pixel_3_6"
    assert failure["examples"] == [99.0]
    assert "(rows [7])" in failure["details"]
    assert "pixel_3_6" in report.summary() and "99.0" in report.summary()


def test_missing_and_extra_dataframe_columns_fail_naming_them(held_out, spec):
    frame = pd.DataFrame(held_out, columns=NAMES).drop(columns=["pixel_4_4"])
    frame["sensor_x"] = 1.0
    report = validate_batch(frame, spec, "columns")
    [failure] = report.failures
    assert failure["expectation"] == "expect_table_columns_to_match_ordered_list"
    assert "missing columns ['pixel_4_4']" in failure["details"]
    assert "unexpected columns ['sensor_x']" in failure["details"]
    assert failure["examples"] == ["pixel_4_4", "sensor_x"]
    # The missing column's own checks are skipped, the 63 others still run.
    assert report.checked == 1 + 2 + 63 * 4


def test_reordered_columns_fail(held_out, spec):
    frame = pd.DataFrame(held_out, columns=NAMES)
    swapped = NAMES[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    report = validate_batch(frame[swapped], spec, "order")
    [failure] = report.failures
    assert failure["expectation"] == "expect_table_columns_to_match_ordered_list"
    assert "out of order" in failure["details"]
    assert "'pixel_0_0' at position 0, found 'pixel_0_1'" in failure["details"]


def test_string_column_fails_its_dtype_check(held_out, spec):
    frame = pd.DataFrame(held_out, columns=NAMES)
    frame["pixel_5_5"] = frame["pixel_5_5"].map(lambda v: f"{v:.0f}px")
    report = validate_batch(frame, spec, "dtype")
    [failure] = report.failures
    assert failure["expectation"] == "expect_column_values_to_be_in_type_list"
    assert failure["column"] == "pixel_5_5"
    assert "expected a numeric dtype" in failure["details"]


def test_array_with_wrong_width_fails_without_crashing(held_out, spec):
    report = validate_batch(held_out[:, :63], spec, "narrow")
    assert not report.success
    [failure] = report.failures
    assert failure["details"] == "expected an array of shape [n, 64], got [297, 63]"


def test_too_few_rows_fails(held_out, digits):
    spec = build_suite_spec(digits[:SPLIT], NAMES, ValidateParams(min_rows=500))
    report = validate_batch(held_out, spec, "short")
    [failure] = report.failures
    assert failure["expectation"] == "expect_table_row_count_to_be_between"
    assert failure["details"] == "297 rows, need at least 500"


# -- images --------------------------------------------------------------------------------


def test_clean_images_pass(digits, held_out):
    spec = build_suite_spec(digits[:SPLIT].reshape(-1, 1, 8, 8), NAMES, ValidateParams())
    assert validate_batch(held_out.reshape(-1, 1, 8, 8), spec, "images").success


def test_a_bad_pixel_is_located(held_out, image_spec):
    images = held_out.reshape(-1, 1, 8, 8).copy()
    images[3, 0, 2, 5] = np.nan
    images[9, 0, 7, 7] = -40.0
    report = validate_batch(images, image_spec, "bad_images")
    null, out_of_range = [f for f in report.failures if f["column"] == "channel_0"]
    assert null["expectation"] == "expect_column_values_to_not_be_null"
    assert "image 3 pixel_2_5" in null["details"] and null["examples"] == [3]
    assert out_of_range["expectation"] == "expect_column_values_to_be_between"
    assert "image 9 pixel_7_7" in out_of_range["details"]
    assert out_of_range["examples"] == [-40.0]


def test_image_statistics_name_the_images(held_out, image_spec):
    images = held_out.reshape(-1, 1, 8, 8).copy()
    images[5] = 16.0  # a white image: brightness far above any digit's
    images[7, 0, 0, 0] = np.nan
    report = validate_batch(images, image_spec, "odd_images")
    by_column = {}
    for failure in report.failures:
        by_column.setdefault(failure["column"], []).append(failure)
    [null] = [f for f in by_column["mean_brightness"] if "null" in f["expectation"]]
    assert "rows [7]" in null["details"]
    [bright] = [f for f in by_column["mean_brightness"] if "between" in f["expectation"]]
    assert "rows [5" in bright["details"] and 16.0 in bright["examples"]


def test_large_images_are_checked_by_statistics_alone():
    rng = np.random.default_rng(0)
    images = rng.uniform(50, 200, size=(20, 1, 80, 80)).astype(np.float32)
    spec = build_suite_spec(images, [], ValidateParams())
    assert spec["image"]["per_pixel"] is False and spec["feature_names"] == []
    names = [entry["name"] for entry in spec["image"]["statistics"]]
    assert names == ["mean_brightness", "std_brightness", "darkest", "brightest"]
    assert validate_batch(images[:10], spec, "same").success
    dark = images[:10] * 0.2
    report = validate_batch(dark, spec, "dark")
    assert {f["column"] for f in report.failures} >= {"mean_brightness", "brightest"}
    assert all(f["column"] != "channel_0" for f in report.failures)


def test_images_with_wrong_shape_fail(image_spec):
    report = validate_batch(np.zeros((5, 3, 8, 8)), image_spec, "rgb")
    assert not report.success
    assert report.n_rows == 5
    [failure] = report.failures
    assert failure["details"] == "expected images of shape [1, 8, 8], got [3, 8, 8]"


# -- raising and reporting -----------------------------------------------------------------


def test_check_batch_raises_listing_each_failure(held_out, spec):
    batch = held_out.copy()
    batch[0, 40] = np.nan
    batch[1, 41] = 1e6
    with pytest.raises(DataValidationError) as caught:
        check_batch(batch, spec, "bad")
    message = str(caught.value)
    assert "batch 'bad' FAILED: 2 of" in message
    assert "expect_column_values_to_not_be_null [pixel_5_0]" in message
    assert "expect_column_values_to_be_between [pixel_5_1]" in message
    assert "1000000.0" in message
    assert caught.value.report.failures[1]["column"] == "pixel_5_1"
    # Survives pickling (Prefect moves exceptions between processes).
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == message and again.report == caught.value.report


def test_save_report_writes_strict_readable_json(tmp_path, clean_report):
    bad = ValidationReport(
        "val",
        False,
        3,
        [
            {
                "expectation": "expect_column_values_to_be_between",
                "column": "pixel_0_1",
                "details": "1 of 3 values outside [0, 1]",
                "examples": [np.float32(np.inf), np.int64(7)],
            }
        ],
        5,
    )
    path = save_report([clean_report, bad], tmp_path / "nested" / "report.json")

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=no_constants)
    assert data["success"] is False
    assert [b["batch_name"] for b in data["batches"]] == ["held_out", "val"]
    assert data["batches"][0]["success"] is True
    assert data["batches"][1]["failures"][0]["examples"] == ["inf", 7]
    assert "\n  " in path.read_text()  # indented for people


def test_rare_values_pass_under_mostly_but_not_when_strict():
    """A sparse pixel that is always 0 in the reference may be non-zero in a few held-out rows:
    tolerated under range_mostly, an error when every value must be in range."""
    from sklearn.datasets import load_digits

    from normalcy.config import ValidateParams

    X = load_digits().data
    reference, batch = X[:1500], X[1500:].copy()
    batch[0, 0] = 16.0  # pixel_0 is always 0 in the reference
    names = [f"p{i}" for i in range(64)]
    lenient = build_suite_spec(reference, names, ValidateParams(range_mostly=0.99))
    strict = build_suite_spec(reference, names, ValidateParams(range_mostly=1.0))
    assert validate_batch(batch, lenient, "b").success
    report = validate_batch(batch, strict, "b")
    assert not report.success and report.failures[0]["column"] == "p0"
    batch[1, 0] = np.inf  # infinity is never tolerated
    assert not validate_batch(batch, lenient, "b").success
