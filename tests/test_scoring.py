"""`normalcy.scoring` and `normalcy score` / `normalcy inspect` on real exported models.

Models are trained briefly and exported with the real exporter; files are scored through the
real CLI entry point and compared with onnxruntime run in-process on the same rows.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from PIL import Image

from normalcy.artifact.names import ROW_OUTPUTS
from normalcy.cli import main
from normalcy.scoring import (
    DECISION_NAME,
    P_VALUE_NAME,
    SCORE_NAME,
    InputError,
    SessionSettings,
    check_rows,
    input_spec,
    load_session,
    open_input,
    output_names,
    read_metadata,
    score_onnx,
    score_outputs,
)
from normalcy.scoring.writer import table_columns

N_FEATURES = 64
FEATURES = [f"x{i}" for i in range(N_FEATURES)]


def export_model(
    path: Path,
    X: np.ndarray,
    *,
    feature_names: list[str] | None = None,
    id_column: str | None = None,
    threshold: float | None = None,
    detector: object | None = None,
    epochs: int = 2,
) -> tuple[Path, object]:
    """Train an autoencoder briefly on `X` (or reuse `detector`) and export it with normalcy's
    exporter and metadata of the pipeline's shape. The threshold defaults to the 90% quantile of
    the training scores; the training scores are the calibration scores (p_value output) when
    the exporter takes them. Returns (path, detector)."""
    from normalcy.detectors import create_detector
    from normalcy.export import export_onnx

    if detector is None:
        detector = create_detector("autoencoder", epochs=epochs, seed=0).fit(X)
    scores = detector.score(X)
    threshold = float(np.quantile(scores, 0.9)) if threshold is None else threshold
    metadata = {
        "detector": detector.name,
        "detector_params": {"epochs": detector.epochs, "seed": detector.seed},
        "input": {
            "name": "input",
            "dtype": "float32",
            "shape": ["N", *X.shape[1:]],
            "feature_names": feature_names or [],
            **({"id_column": id_column} if id_column else {}),
        },
        "threshold": threshold,
        "target_fpr": 0.1,
        "n_calibration_scores": len(scores),
        "data_version": "test-data-md5",
    }
    extra = {}
    if "calibration_scores" in inspect.signature(export_onnx).parameters:
        extra["calibration_scores"] = scores
    export_onnx(detector.scoring_module(), threshold, X[:2], path, metadata=metadata, **extra)
    return path, detector


@pytest.fixture(scope="module")
def table_model(digits_xy, tmp_path_factory) -> dict:
    """An autoencoder on digits with named features x0..x63 and the id column 'id'."""
    X = digits_xy[0]
    root = tmp_path_factory.mktemp("table-model")
    path, _ = export_model(root / "model.onnx", X, feature_names=FEATURES, id_column="id")
    session = load_session(path)
    return {"path": path, "session": session, "X": X, "expected": score_outputs(session, X)}


@pytest.fixture(scope="module")
def image_model(digits_xy, tmp_path_factory) -> dict:
    """An autoencoder on digits as 1x8x8 images."""
    images = digits_xy[0].reshape(-1, 1, 8, 8)
    root = tmp_path_factory.mktemp("image-model")
    path, _ = export_model(root / "images.onnx", images, epochs=1)
    return {"path": path, "session": load_session(path), "X": images}


def frame_of(X: np.ndarray, ids: bool = True) -> pd.DataFrame:
    frame = pd.DataFrame(X, columns=FEATURES)
    if ids:
        frame.insert(0, "id", [f"r{i:05d}" for i in range(len(X))])
    return frame


def run_cli(*argv: str) -> int:
    return main(["score", *argv, "--quiet"])


def read_result(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- the library -------------------------------------------------------------------------------


def test_score_outputs_gives_every_output_by_name_whatever_the_chunk(table_model) -> None:
    session, X = table_model["session"], table_model["X"]
    whole = score_outputs(session, X, chunk_rows=len(X))
    assert list(whole) == output_names(session)
    assert {SCORE_NAME, DECISION_NAME, P_VALUE_NAME} <= set(whole)
    for chunk_rows in (1, 7, 500):
        chunked = score_outputs(session, X[:600], chunk_rows=chunk_rows)
        for name, values in whole.items():
            np.testing.assert_array_equal(chunked[name], values[:600])
    assert whole[SCORE_NAME].dtype == np.float32 and whole[SCORE_NAME].shape == (len(X),)
    assert whole[DECISION_NAME].dtype == np.bool_
    p = whole[P_VALUE_NAME]
    assert p.shape == (len(X),) and (p > 0).all() and (p <= 1).all()
    # A larger score is never less surprising: p-values fall as scores rise.
    order = np.argsort(whole[SCORE_NAME])
    assert (np.diff(p[order]) <= 1e-7).all()

    score, flag = score_onnx(session, X)  # the two-output API is unchanged
    np.testing.assert_array_equal(score, whole[SCORE_NAME])
    np.testing.assert_array_equal(flag, whole[DECISION_NAME])

    only = score_outputs(session, X[:5], names=[P_VALUE_NAME])
    assert list(only) == [P_VALUE_NAME]
    assert {k: v.shape for k, v in score_outputs(session, X[:0]).items()} == {
        name: (0, *values.shape[1:]) for name, values in whole.items()
    }
    with pytest.raises(ValueError, match=r"no output\(s\) \['anomaly_map'\]"):
        score_outputs(session, X[:5], names=["anomaly_map"])


def test_session_settings_reach_onnxruntime(table_model) -> None:
    settings = SessionSettings(
        intra_op_threads=2,
        inter_op_threads=3,
        execution_mode="parallel",
        graph_optimization="basic",
    )
    options = load_session(table_model["path"], settings=settings).get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 3
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    default = load_session(table_model["path"]).get_session_options()
    assert default.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert default.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert load_session(table_model["path"], 1).get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match=r"execution_mode 'fast': expected one of"):
        SessionSettings(execution_mode="fast").options()


def test_idle_onnxruntime_threads_do_not_spin_unless_asked() -> None:
    key = "session.intra_op.allow_spinning"
    assert SessionSettings().options().get_session_config_entry(key) == "0"
    assert SessionSettings(allow_spinning=True).options().get_session_config_entry(key) == "1"


def test_input_spec_and_row_checks_name_what_is_wrong(table_model, image_model) -> None:
    spec = input_spec(table_model["session"])
    assert spec.shape == (64,) and spec.feature_names == tuple(FEATURES)
    assert spec.id_column == "id" and spec.dtype == np.float32
    image_spec = input_spec(image_model["session"])
    assert image_spec.shape == (1, 8, 8) and image_spec.is_image

    X = table_model["X"][:10].astype(np.float64)
    assert check_rows(X, spec, "batch").dtype == np.float32
    X[4, 2] = np.nan
    with pytest.raises(InputError, match=r"batch: NaN .* in 'x2' at row 104"):
        check_rows(X, spec, "batch", first_row=100)
    with pytest.raises(InputError, match=r"rows have shape \[63\]; the model expects float32"):
        check_rows(X[:, :63], spec, "batch")
    with pytest.raises(InputError, match="dtype <U3; expected numbers"):
        check_rows(np.full((2, 64), "abc"), spec, "batch")
    pixels = np.zeros((2, 1, 8, 8))
    pixels[1, 0, 3, 5] = np.inf
    with pytest.raises(InputError, match=r"in position \[0, 3, 5\] at row 1"):
        check_rows(pixels, image_spec, "images")


# --- normalcy score ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "parquet", "npz"])
def test_score_cli_matches_onnxruntime_for_each_input_kind(table_model, tmp_path, kind) -> None:
    X, expected = table_model["X"], table_model["expected"]
    source = tmp_path / f"batch.{kind}"
    if kind == "npz":
        np.savez(source, X=X)
    elif kind == "csv":
        frame_of(X).to_csv(source, index=False)
    else:
        frame_of(X).to_parquet(source)
    out = tmp_path / "scores.parquet"
    assert (
        run_cli("--model", str(table_model["path"]), "--input", str(source), "--output", str(out))
        == 0
    )

    result = read_result(out)
    id_name = "row" if kind == "npz" else "id"  # npz has no id column: the row number
    explanations = table_columns({k: v for k, v in expected.items() if k not in ROW_OUTPUTS})
    assert list(result.columns) == [id_name, SCORE_NAME, DECISION_NAME, P_VALUE_NAME, *explanations]
    for column, values in explanations.items():  # the detector's explanation, flattened
        np.testing.assert_array_equal(result[column].to_numpy(values.dtype), values)
    expected_ids = list(range(len(X))) if kind == "npz" else frame_of(X)["id"].tolist()
    assert result[id_name].tolist() == expected_ids
    np.testing.assert_array_equal(result[SCORE_NAME].to_numpy(np.float32), expected[SCORE_NAME])
    np.testing.assert_array_equal(result[DECISION_NAME].to_numpy(), expected[DECISION_NAME])
    np.testing.assert_array_equal(result[P_VALUE_NAME].to_numpy(np.float32), expected[P_VALUE_NAME])


@pytest.mark.parametrize("kind", ["csv", "parquet", "npz"])
def test_chunks_smaller_than_the_file_give_identical_output(table_model, tmp_path, kind) -> None:
    X = table_model["X"]
    source = tmp_path / f"batch.{kind}"
    if kind == "npz":
        np.savez_compressed(source, X=X)  # compressed: read as a stream, not memory-mapped
    elif kind == "csv":
        frame_of(X).to_csv(source, index=False)
    else:
        frame_of(X).to_parquet(source, row_group_size=100)
    outputs = {}
    for chunk_rows in (64, 100000):  # 64 does not divide 1797: the last chunk is partial
        out = tmp_path / f"scores-{chunk_rows}.csv"
        argv = ["--input", str(source), "--output", str(out), "--chunk-rows", str(chunk_rows)]
        assert run_cli("--model", str(table_model["path"]), *argv) == 0
        outputs[chunk_rows] = out.read_bytes()
    assert outputs[64] == outputs[100000]
    assert len(pd.read_csv(tmp_path / "scores-64.csv")) == len(X)


def test_open_input_reads_npz_in_bounded_slices(table_model, tmp_path) -> None:
    X = table_model["X"]
    np.savez(tmp_path / "big.npz", X=X, y=np.zeros(len(X)))
    opened = open_input(tmp_path / "big.npz", input_spec(table_model["session"]), chunk_rows=500)
    sizes = [len(rows) for _, rows in opened.chunks]
    assert opened.total_rows == len(X) and sizes == [500, 500, 500, len(X) - 1500]


def test_extra_columns_are_ignored_and_said(table_model, tmp_path, capsys) -> None:
    frame = frame_of(table_model["X"][:20])[["id", *reversed(FEATURES)]]  # any column order
    frame["label"] = 0
    frame.to_csv(tmp_path / "batch.csv", index=False)
    out = tmp_path / "scores.csv"
    assert (
        run_cli(
            "--model",
            str(table_model["path"]),
            "--input",
            str(tmp_path / "batch.csv"),
            "--output",
            str(out),
        )
        == 0
    )
    np.testing.assert_array_equal(
        pd.read_csv(out)[SCORE_NAME].to_numpy(np.float32), table_model["expected"][SCORE_NAME][:20]
    )
    captured = capsys.readouterr()
    assert "ignored: ['label']" in captured.err
    assert "scored 20 rows" in captured.out and "wrote" in captured.out


def _bad_inputs(tmp_path: Path, X: np.ndarray) -> dict[str, tuple[Path, str]]:
    """Files that must be refused, each with (a fragment of) the message that must name why."""
    cases = {}
    missing = frame_of(X).drop(columns=["x3"])
    missing.to_csv(tmp_path / "missing.csv", index=False)
    cases["missing column"] = (tmp_path / "missing.csv", "missing column(s) ['x3']")

    late_text = frame_of(X)
    late_text["x2"] = late_text["x2"].astype(object)
    late_text.loc[1500, "x2"] = "abc"  # in a late chunk: scoring has started when it is found
    late_text.to_csv(tmp_path / "text.csv", index=False)
    cases["text value"] = (
        tmp_path / "text.csv",
        "column 'x2' is not numeric (value 'abc' at row 1500)",
    )

    nan = frame_of(X)
    nan.loc[1700, "x5"] = np.nan
    nan.to_parquet(tmp_path / "nan.parquet")
    cases["NaN"] = (tmp_path / "nan.parquet", "NaN (a missing value) in 'x5' at row 1700")

    strings = frame_of(X)
    strings["x7"] = strings["x7"].astype(str)
    strings.to_parquet(tmp_path / "strings.parquet")
    cases["string column"] = (tmp_path / "strings.parquet", "non-numeric column(s) {'x7'")

    np.savez(tmp_path / "narrow.npz", X=X[:, :63])
    cases["npz shape"] = (
        tmp_path / "narrow.npz",
        "X has shape [1797, 63]; the model expects float32 [N, 64]",
    )
    np.savez(tmp_path / "text.npz", X=X.astype(str))
    cases["npz dtype"] = (tmp_path / "text.npz", "X has dtype <U")
    np.savez(tmp_path / "noX.npz", features=X)
    cases["npz without X"] = (tmp_path / "noX.npz", "no array 'X' (found ['features'])")
    (tmp_path / "empty.csv").write_text("")
    cases["empty file"] = (tmp_path / "empty.csv", "the file is empty")
    (tmp_path / "header.csv").write_text(",".join(FEATURES) + "\n")
    cases["header only"] = (tmp_path / "header.csv", "no rows")
    (tmp_path / "batch.json").write_text("{}")
    cases["unsupported"] = (tmp_path / "batch.json", "unsupported input '.json'")
    return cases


def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(
    table_model, tmp_path, capsys
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = out_dir / "scores.csv"
    previous.write_text("previous results\n")
    for case, (source, message) in _bad_inputs(tmp_path, table_model["X"]).items():
        code = run_cli(
            "--model",
            str(table_model["path"]),
            "--input",
            str(source),
            "--output",
            str(previous),
            "--chunk-rows",
            "100",
        )
        err = capsys.readouterr().err
        assert code == 2, case
        assert message in err, (case, err)
        assert err.startswith("normalcy score: error:") and "Traceback" not in err
        # Never half-written: the earlier file is intact and no temp file is left behind.
        assert previous.read_text() == "previous results\n", case
        assert files_in(out_dir) == ["scores.csv"], case


def test_bad_output_model_or_params_exit_2_before_any_work(table_model, tmp_path, capsys) -> None:
    np.savez(tmp_path / "batch.npz", X=table_model["X"][:5])
    model, batch = str(table_model["path"]), str(tmp_path / "batch.npz")
    cases = [
        (["--model", model, "--output", str(tmp_path / "s.txt")], "unsupported output '.txt'"),
        (
            ["--model", str(tmp_path / "no.onnx"), "--output", str(tmp_path / "s.csv")],
            "no.onnx: no such model file",
        ),
        (
            ["--model", "models:/bad name@", "--output", str(tmp_path / "s.csv")],
            "not a registry model URI",
        ),
        (
            ["--model", model, "--output", str(tmp_path / "s.csv"), "--chunk-rows", "0"],
            "chunk_rows: Input should be greater than or equal to 1",
        ),
        (
            [
                "--model",
                model,
                "--output",
                str(tmp_path / "s.csv"),
                "--set",
                "scoring.execution_mode=fast",
            ],
            "scoring.execution_mode",
        ),
        (
            ["--model", model, "--output", str(tmp_path / "s.csv"), "--set", "scoring.nope=1"],
            "scoring.nope: unknown key",
        ),
    ]
    for argv, message in cases:
        assert run_cli(*argv, "--input", batch) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert files_in(tmp_path) == ["batch.npz"]


def test_image_folder_is_scored_and_wrong_sizes_refused(image_model, tmp_path, capsys) -> None:
    images = np.round(image_model["X"][:12] * 15).astype(np.uint8)  # digits 0..16 -> 0..240
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    names = [f"sub/{i:02d}.png" if i % 3 == 0 else f"{i:02d}.png" for i in range(len(images))]
    for name, image in zip(names, images, strict=True):
        Image.fromarray(image[0]).save(folder / name)
    out = tmp_path / "scores.csv"
    assert (
        run_cli("--model", str(image_model["path"]), "--input", str(folder), "--output", str(out))
        == 0
    )

    result = pd.read_csv(out)
    order = np.argsort(names)  # files are scored in sorted order of their relative paths
    assert result["file"].tolist() == sorted(names)
    expected = score_outputs(image_model["session"], images[order].astype(np.float32))
    np.testing.assert_array_equal(result[SCORE_NAME].to_numpy(np.float32), expected[SCORE_NAME])

    Image.new("L", (10, 8)).save(folder / "sub" / "wide.png")
    capsys.readouterr()
    assert (
        run_cli(
            "--model",
            str(image_model["path"]),
            "--input",
            str(folder),
            "--output",
            str(tmp_path / "again.csv"),
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "wide.png: image is 8x10 (HxW); the model expects 8x8" in err
    (folder / "sub" / "wide.png").unlink()
    Image.new("RGB", (8, 8)).save(folder / "colour.png")
    assert (
        run_cli(
            "--model",
            str(image_model["path"]),
            "--input",
            str(folder),
            "--output",
            str(tmp_path / "again.csv"),
        )
        == 2
    )
    assert (
        "colour.png: colour mode RGB; the model expects 1-channel images" in capsys.readouterr().err
    )
    assert not (tmp_path / "again.csv").exists()


def test_inspect_prints_a_summary_or_the_raw_json(table_model, capsys) -> None:
    path = str(table_model["path"])
    assert main(["inspect", path]) == 0
    text = capsys.readouterr().out
    for fragment in (
        "detector  autoencoder (",
        "'input' float32 [N, 64], features ['x0', 'x1'",
        "id column  id",
        "output  p_value float32 [N]",
        "target false-positive rate 0.1, from 1797 calibration scores",
        "data version  test-data-md5",
        "sha256",
    ):
        assert fragment in text, (fragment, text)
    assert main(["inspect", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_metadata(path)


def test_scoring_cli_runs_without_torch(table_model, tmp_path) -> None:
    """A scoring host needs no torch: block its import and score, inspect and build the app."""
    np.savez(tmp_path / "batch.npz", X=table_model["X"][:50])
    out = tmp_path / "scores.csv"
    model, batch = str(table_model["path"]), str(tmp_path / "batch.npz")
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from normalcy.cli import main
import normalcy.serving
code = main(["score", "--model", {model!r}, "--input", {batch!r}, "--output", {str(out)!r}])
code += main(["inspect", {model!r}])
normalcy.serving.create_app({model!r}).state.store.stop()
code += main(["score", "--model", {model!r}, "--input", "missing.csv", "--output", {str(out)!r}])
print("torch" in sys.modules and sys.modules["torch"] is not None)
sys.exit(code)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr  # 0 + 0 + 2: the last call is a user error
    assert "missing.csv: file not found" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.strip().endswith("False")
    np.testing.assert_array_equal(
        pd.read_csv(out)[SCORE_NAME].to_numpy(np.float32), table_model["expected"][SCORE_NAME][:50]
    )


def test_score_appends_every_row_to_the_prediction_log(table_model, tmp_path, capsys):
    from normalcy.cli import main
    from normalcy.scoring.prediction_log import read_prediction_log

    data = tmp_path / "rows.csv"
    frame_of(table_model["X"][:120]).to_csv(data, index=False)
    for round_ in range(2):  # a second file appends, it does not replace
        code = main(
            [
                "score",
                "--model",
                str(table_model["path"]),
                "--input",
                str(data),
                "--output",
                str(tmp_path / f"out{round_}.csv"),
                "--log",
                str(tmp_path / "log"),
            ]
        )
        assert code == 0
    logged = read_prediction_log(tmp_path / "log")
    expected = table_model["expected"]
    assert len(logged) == 240
    assert logged["score"][:120].tolist() == pytest.approx(expected[SCORE_NAME][:120].tolist())
    assert logged["row_id"][:3].tolist() == ["r00000", "r00001", "r00002"]
    assert logged["model_version"].str.startswith("sha256:").all()  # a file has no version


def test_monitor_refuses_a_missing_prediction_log_before_any_work(tmp_path, capsys):
    from normalcy.cli import main

    batch = tmp_path / "batch.csv"
    frame_of(np.zeros((3, 64), dtype=np.float32), ids=False).to_csv(batch, index=False)
    code = main(["monitor", "--batch", str(batch), "--log", str(tmp_path / "none.db")])
    assert code == 2
    assert "no prediction log" in capsys.readouterr().err
