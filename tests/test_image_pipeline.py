"""Image folders through the pipeline's steps: config, splits on disk, validation, cleaning."""

from __future__ import annotations

import numpy as np
import pytest

from normalcy.cli import main
from normalcy.config import CleanParams, ConfigError, PrepareParams, ValidateParams, load_params
from normalcy.data.image_splits import VALIDATION_PREFIX, split_image_folder
from normalcy.data.sources import DataError, check_source
from normalcy.data.splits import load_splits, save_splits
from normalcy.detectors.registry import create_detector
from normalcy.drift import detect_drift
from normalcy.evaluation.localization import localization, overlay_picks
from normalcy.monitoring import drift_features
from normalcy.pipeline import clean
from normalcy.pipeline.validate import DataValidationFailed, validate
from tests.conftest import REPO_ROOT
from tests.image_folders import make_mvtec_folder
from tests.test_scoring import export_model


def image_params(root, *more):
    return load_params(
        "absent.yaml", ["data.source=mvtec", f"data.path={root}", "data.image_size=16", *more]
    )


@pytest.fixture
def folder(tmp_path):
    return make_mvtec_folder(tmp_path / "cat", n_train=20, n_test_good=12, defects={"cut": 10})


def test_splits_follow_the_folder(folder):
    params = image_params(folder)
    splits = split_image_folder(params.data, params.prepare)
    assert len(splits.train) + len(splits.val) == 20
    assert len(splits.val) == 3  # round(0.15 * 20)
    assert (splits.train.defects == "good").all() and (splits.val.defects == "good").all()
    assert len(splits.test) + len(splits.holdout) == 22
    assert len(splits.holdout) >= 1
    assert all(str(i).startswith("test/") for i in np.r_[splits.test.ids, splits.holdout.ids])
    assert splits.test.masks.shape == (len(splits.test), 16, 16)
    assert splits.train.masks is None
    assert splits.test.y.sum() == (splits.test.defects == "cut").sum()


def test_holdout_is_the_same_at_any_image_size(folder):
    small = image_params(folder)
    large = image_params(folder, "data.image_size=24")
    a = split_image_folder(small.data, small.prepare).holdout.ids
    b = split_image_folder(large.data, large.prepare).holdout.ids
    assert a.tolist() == b.tolist()


def test_validation_folder_adds_labelled_defects(folder, tmp_path):
    extra = make_mvtec_folder(tmp_path / "extra", n_train=0, n_test_good=2, seed=5)
    params = image_params(folder, f"data.validation_path={extra}")
    val = split_image_folder(params.data, params.prepare).val
    assert len(val) == 3 + 7 and val.y.sum() == 5
    assert sum(str(i).startswith(VALIDATION_PREFIX) for i in val.ids) == 7
    assert val.masks.shape == (10, 16, 16) and val.masks[val.y == 1].sum() > 0
    assert val.masks[val.y == 0].sum() == 0


def test_masks_and_defects_survive_the_prepared_files(folder, tmp_path):
    params = image_params(folder)
    splits = split_image_folder(params.data, params.prepare)
    save_splits(splits, tmp_path / "prepared", {"source": "mvtec"})
    loaded = load_splits(tmp_path / "prepared")
    with np.load(tmp_path / "prepared" / "train.npz") as stored:
        assert stored["X"].dtype == np.uint8  # whole pixel values: a quarter of the bytes
    assert loaded.train.X.dtype == np.float32 and np.array_equal(loaded.train.X, splits.train.X)
    assert np.array_equal(loaded.test.masks, splits.test.masks)
    assert loaded.test.defects.tolist() == splits.test.defects.tolist()
    assert loaded.train.masks is None and loaded.train.defects.tolist() == ["good"] * 17


def test_too_few_training_images(tmp_path):
    root = make_mvtec_folder(tmp_path / "cat", n_train=2)
    params = image_params(root)
    with pytest.raises(DataError, match="2 images cannot give both a validation share"):
        split_image_folder(params.data, params.prepare)


def test_check_source_reads_the_layout_before_a_run(folder, tmp_path):
    check_source(image_params(folder).data)
    with pytest.raises(DataError, match="no folder test"):
        check_source(image_params(folder, f"data.validation_path={tmp_path}").data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.image_size=64"], "data.image_size applies to image folders only"),
        (["data.source=mvtec", "data.path=x", "data.channels=2"], "data.channels"),
        (["data.source=mvtec", "data.path=x", "data.image_size=4"], "data.image_size"),
        (["data.source=mvtec"], "data.path is required"),
        (["data.source=mvtec", "data.path=x", "data.window_dir=w"], "window_dir"),
    ],
)
def test_bad_image_params(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_params("absent.yaml", overrides)


def test_cleaning_is_skipped_for_train_good_with_a_logged_reason(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = image_params(folder)
    train = split_image_folder(params.data, params.prepare).train
    reason = clean.skip_reason(train, CleanParams())
    assert "defect-free by construction" in reason
    cleaned, result = clean.clean(train, CleanParams(log_path=str(tmp_path / "log.json")))
    assert result is None and cleaned is train
    assert "defect-free" in (tmp_path / "log.json").read_text()
    assert len(clean.load_cleaned_train()) == len(train)


def test_validation_checks_per_image_statistics(tmp_path, monkeypatch):
    root = make_mvtec_folder(tmp_path / "cat", n_train=80, n_test_good=20, defects={"cut": 5})
    monkeypatch.chdir(tmp_path)
    params = image_params(root)
    splits = split_image_folder(params.data, PrepareParams())
    spec, reports = validate(splits, ValidateParams())
    assert all(r.success for r in reports)
    splits.test.X[:3] = 0.0  # a dead camera: black images
    with pytest.raises(DataValidationFailed, match=r"test' FAILED(.|\n)*mean_brightness"):
        validate(splits, ValidateParams())
    assert spec["image"]["per_pixel"] is True  # 16 x 16: small enough to check each pixel too
    names = [entry["name"] for entry in spec["image"]["statistics"]]
    assert "mean_brightness" in names and "std_brightness" in names


def test_overlay_picks_take_both_ends_of_each_defect_type():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    defects = np.array(["good", "cut", "good", "good", "cut", "hole"])
    picks = overlay_picks(scores, defects, per_end=1)
    assert picks == [
        (1, "cut", "highest"),
        (4, "cut", "lowest"),
        (2, "good", "highest"),
        (0, "good", "lowest"),
        (5, "hole", "highest"),  # one image: shown once
    ]


def test_localization_without_maps_gives_the_per_defect_table(folder, tmp_path):
    params = image_params(folder)
    test = split_image_folder(params.data, params.prepare).test
    scores = test.X.std(axis=(1, 2, 3))
    located = localization(test, scores, None, tmp_path / "overlays")
    assert set(located.per_defect) == {"cut"} and located.metrics == {}
    assert located.overlays == [] and not (tmp_path / "overlays").exists()
    maps = np.abs(test.X[:, 0] - test.X[:, 0].mean())
    located = localization(test, scores, maps, tmp_path / "overlays")
    assert set(located.metrics) == {"pixel_auroc", "aupro"}
    assert len(located.overlays) == len(list((tmp_path / "overlays").glob("*.png"))) > 0


def test_maps_need_a_model_with_anomaly_maps(digits_xy, tmp_path, capsys):
    images = digits_xy[0].reshape(-1, 1, 8, 8)
    model, _ = export_model(tmp_path / "images.onnx", images, epochs=1)  # no anomaly_map
    batch = tmp_path / "batch.npz"
    np.savez(batch, X=images[:4])
    argv = ["score", "--model", str(model), "--input", str(batch)]
    code = main([*argv, "--output", str(tmp_path / "s.csv"), "--maps", str(tmp_path / "m")])
    assert code == 2
    assert "--maps: the model has no 'anomaly_map' output" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "m").exists()


def test_example_image_params_train_their_candidate(folder):
    params = load_params(
        REPO_ROOT / "examples" / "images.yaml", [f"data.path={folder}", "data.image_size=32"]
    )
    assert params.data.source == "mvtec" and params.train.candidates == ["padim"]
    splits = split_image_folder(params.data, params.prepare)
    detector = create_detector("padim", **params.train.detectors["padim"])
    out = detector.fit(splits.train.X).predict(splits.test.X)
    assert out["score"].shape == (len(splits.test),) and np.isfinite(out["score"]).all()
    assert out["anomaly_map"].shape == (len(splits.test), 32, 32)


def test_example_image_params_need_the_folder():
    with pytest.raises(ConfigError, match="data.path is required when data.source is 'mvtec'"):
        load_params(REPO_ROOT / "examples" / "images.yaml")


def test_large_images_drift_on_per_image_statistics():
    rng = np.random.default_rng(0)
    reference = rng.uniform(60, 200, size=(80, 1, 72, 72)).astype(np.float32)
    same = rng.uniform(60, 200, size=(60, 1, 72, 72)).astype(np.float32)
    darker = same * 0.8  # a camera that lost light
    ref, rows, names = drift_features(reference, darker, [])
    assert ref.shape == (80, 4) and rows.shape == (60, 4) and names[0] == "mean_brightness"
    scores = rng.normal(size=60)
    drifted = detect_drift(ref, rows, names, scores, scores, 0.01)
    assert drifted.drifted and {f.feature for f in drifted.features if f.drifted} >= {
        "mean_brightness"
    }
    ref, rows, names = drift_features(reference, same, [])
    assert not detect_drift(ref, rows, names, scores, scores, 0.01).drifted
    small = rng.uniform(size=(10, 1, 8, 8))  # digits-sized images stay per pixel
    assert drift_features(small, small, ["p"] * 64)[0] is small


def test_image_drift_compares_the_embedding_when_every_statistic_stays(tmp_path):
    """Pixels shuffled within each image keep its mean, std, darkest and brightest exactly: the
    per-image statistics cannot see it; the champion's own backbone embedding does. The
    embedding comes out of the exported graph, scored as the monitor scores a batch."""
    from normalcy.export import export_onnx
    from normalcy.monitoring import ChampionBundle, has_embedding, score_batch
    from normalcy.scoring import score_outputs
    from tests.image_cases import textures

    train, reference, batch = textures(30, 0), textures(40, 1), textures(40, 2)
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(image.ravel()).reshape(image.shape) for image in batch])
    detector = create_detector("padim", image_size=32).fit(train)
    path = export_onnx(detector.scoring_module(), 1.0, train[:2], tmp_path / "padim.onnx")
    assert has_embedding(path)
    embedded = score_outputs(str(path), reference, names=["embedding"])["embedding"]
    width = sum(detector.extractor.channels)  # each stage's channels, averaged over positions
    assert embedded.shape == (40, width)
    champion = ChampionBundle("1", "run", path, {}, reference, np.zeros(1), [], {}, embedded)
    scores = np.zeros(40)
    for images, drifts in ((batch, False), (shuffled, True)):
        scored = score_batch(images, champion)
        assert scored.embeddings.shape == (40, width) and scored.scores.shape == (40,)
        ref, rows, names = drift_features(reference, images, [], (embedded, scored.embeddings))
        assert rows.shape == (40, 4 + width) and names[4] == "embedding_0"
        report = detect_drift(ref, rows, names, scores, scores, 0.01)
        assert report.drifted is drifts
        moved = {f.feature for f in report.features if f.drifted}
        assert not moved & {"mean_brightness", "std_brightness", "darkest", "brightest"}
        assert bool(moved) is drifts
        stats_only = drift_features(reference, images, [])  # 32 px: per pixel, not statistics
        assert stats_only[0] is reference
