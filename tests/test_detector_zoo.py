"""Every registered detector, one parametrized suite: a new method cannot skip these checks.

It learns (clear anomalies on generated data rank above normals), it exports with ONNX parity
(or refuses export when it declares `exportable = False`), and it rejects bad input clearly."""

import numpy as np
import pytest

from normalcy.detectors import accepted_params, available_detectors, create_detector
from normalcy.detectors.preprocessing import PREPROCESSING
from normalcy.detectors.registry import _factory
from normalcy.evaluation.metrics import ranking_metrics
from normalcy.export import export_onnx, parity_check
from normalcy.scoring import load_session
from tests.image_cases import pasted_defects, textures

FAST = {"epochs": 40, "seed": 0, "image_size": 64}


def fast_detector(name: str):
    """The detector with a short training budget, for every parameter it accepts."""
    return create_detector(name, **{k: v for k, v in FAST.items() if k in accepted_params(name)})


def low_rank_data(n: int, seed: int, n_features: int = 8) -> np.ndarray:
    """Normal rows live near a 2-d plane inside 8-d space (plus small noise)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(123).normal(size=(2, n_features))
    latent = rng.normal(size=(n, 2))
    return (latent @ basis + 0.1 * rng.normal(size=(n, n_features)) + 5.0).astype(np.float32)


def off_plane_anomalies(n: int, seed: int, n_features: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (low_rank_data(n, seed, n_features) + rng.normal(0, 2.0, size=(n, n_features))).astype(
        np.float32
    )


def reads_images(name: str) -> bool:
    """Detectors on backbone features take images `[N, C, H, W]`, not feature vectors."""
    return getattr(_factory(name), "input_kind", "vector") == "image"


@pytest.fixture(scope="module")
def vectors():
    train = low_rank_data(600, 0)
    val = low_rank_data(150, 1)
    test = np.concatenate([low_rank_data(200, 2), off_plane_anomalies(40, 3)])
    labels = np.r_[np.zeros(200), np.ones(40)]
    return train, val, test, labels


@pytest.fixture(scope="module")
def images():
    """32 x 32 grayscale textures; the anomalies carry a pasted square defect."""
    test = np.concatenate([textures(30, 2), pasted_defects(textures(10, 3), 4)[0]])
    return textures(60, 0), textures(20, 1), test, np.r_[np.zeros(30), np.ones(10)]


@pytest.fixture(scope="module")
def data_for(vectors, images):
    """(train, val, test, labels) of the kind the detector reads."""
    return lambda name: images if reads_images(name) else vectors


@pytest.fixture(scope="module")
def generated(vectors):
    return vectors


@pytest.fixture(scope="module")
def fitted(data_for):
    """Each detector fitted once and shared by the tests below (training dominates the cost)."""
    cache = {}

    def get(name):
        if name not in cache:
            train, val, _, _ = data_for(name)
            cache[name] = fast_detector(name).fit(train, val)
        return cache[name]

    return get


@pytest.mark.parametrize("name", available_detectors())
def test_detector_learns_clear_anomalies(name, data_for, fitted):
    _, _, test, labels = data_for(name)
    scores = fitted(name).score(test)
    assert scores.shape == (len(test),) and np.isfinite(scores).all()
    assert ranking_metrics(labels, scores)["auroc"] > 0.85, name


@pytest.mark.parametrize("name", available_detectors())
def test_detector_exports_with_parity_or_refuses(name, data_for, fitted, tmp_path):
    generated = data_for(name)
    test = generated[2]
    detector = fitted(name)
    if not detector.exportable:
        with pytest.raises(NotImplementedError, match="not exportable"):
            detector.scoring_module()
        return
    module = detector.scoring_module()
    calibration = detector.score(generated[1])  # validation scores: the production graph
    threshold = float(np.quantile(calibration, 0.99))
    path = export_onnx(
        module, threshold, test[:2], tmp_path / f"{name}.onnx", calibration_scores=calibration
    )
    report = parity_check(
        module, threshold, path, test, 1e-4, 1e-3, 1.0, calibration_scores=calibration
    )
    assert report.passed, report.message()
    assert report.spearman > 0.999
    outputs = [o.name for o in load_session(path).get_outputs()]
    explanations = sorted(detector.predict(test[:2]))
    explanations.remove("score")
    assert outputs == ["score", "is_anomaly", "p_value", *explanations]
    assert report.outputs_compared == outputs


@pytest.mark.parametrize("name", available_detectors())
def test_detector_rejects_bad_input(name, data_for, fitted):
    train = data_for(name)[0]
    with pytest.raises(RuntimeError, match="call fit"):
        fast_detector(name).score(train[:3])
    poisoned = train.copy()
    poisoned[5].flat[2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        fast_detector(name).fit(poisoned)
    with pytest.raises(ValueError, match="must be a batch"):
        fast_detector(name).fit(train[0])
    if reads_images(name):  # one image side cut to 5 pixels
        narrow, expected = train[:4, :, :5], r"shape \[1, 5, 32\].*rows of shape \[1, 32, 32\]"
    else:
        narrow, expected = train[:4, :5], r"shape \[5\].*fitted on rows of shape \[8\]"
    with pytest.raises(ValueError, match=expected):
        fitted(name).score(narrow)
    with pytest.raises(ValueError, match="must be numeric"):
        fitted(name).score(np.array([["a"] * 8]))


def preprocessing_case(kind: str, generated) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(preprocessing spec, train, test, labels) for a kind: the generated rows, or for `image`
    the same rows as 1 x 4 x 2 raw images in 0..255, resized to 4 x 4 inside the graph."""
    train, _, test, labels = generated
    if kind != "image":
        return {"kind": kind}, train, test, labels

    def as_images(rows: np.ndarray) -> np.ndarray:
        return np.clip(rows * 25.0, 0, 255).reshape(-1, 1, 4, 2).astype(np.float32)

    return {"kind": "image", "image_size": 4}, as_images(train), as_images(test), labels


@pytest.mark.parametrize("kind", sorted(PREPROCESSING))
@pytest.mark.parametrize("name", ["autoencoder", "knn"])
def test_every_preprocessing_kind_scores_and_exports(name, kind, generated, tmp_path):
    spec, train, test, labels = preprocessing_case(kind, generated)
    detector = create_detector(
        name, preprocessing=spec, **{k: v for k, v in FAST.items() if k in accepted_params(name)}
    ).fit(train)
    scores = detector.score(test)
    assert scores.shape == (len(test),) and np.isfinite(scores).all()
    assert ranking_metrics(labels, scores)["auroc"] > 0.7, (name, kind)
    module = detector.scoring_module()
    threshold = float(np.quantile(scores, 0.9))
    path = export_onnx(module, threshold, test[:2], tmp_path / f"{name}_{kind}.onnx")
    report = parity_check(module, threshold, path, test, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()
