"""Preprocessing modules against numpy, the relative scale floor, and spec checking."""

import numpy as np
import pytest
import torch

from normalcy.detectors import create_detector
from normalcy.detectors.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSING,
    RELATIVE_SCALE_FLOOR,
    build_preprocessing,
    fit_preprocessing,
    output_shape,
)


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(50, 4)) * [1.0, 3.0, 0.5, 10.0] + [0.0, 5.0, -2.0, 100.0]).astype(
        np.float32
    )


def apply(module, x):
    with torch.no_grad():
        return module(torch.as_tensor(x)).numpy()


def test_standardize_robust_minmax_none_match_numpy(table):
    x = table[:7]
    expected = {
        "standardize": (x - table.mean(0)) / table.std(0),
        "robust": (x - np.median(table, 0))
        / (np.quantile(table, 0.75, 0) - np.quantile(table, 0.25, 0)),
        "minmax": (x - table.min(0)) / (table.max(0) - table.min(0)),
        "none": x,
    }
    for kind, want in expected.items():
        np.testing.assert_allclose(
            apply(fit_preprocessing(kind, table), x), want, rtol=1e-5, atol=1e-5
        )


def test_a_nearly_constant_column_gets_the_relative_floor(table):
    sparse = table.copy()
    sparse[:, 2] = 0.0
    sparse[3, 2] = 1e-3  # a pixel that is almost always 0
    module = fit_preprocessing("standardize", sparse)
    stds = sparse.std(0)
    floor = RELATIVE_SCALE_FLOOR * np.median(stds[stds > 0])
    assert module.scale[2].item() == pytest.approx(floor, rel=1e-5)
    np.testing.assert_allclose(module.scale[[0, 1, 3]].numpy(), stds[[0, 1, 3]], rtol=1e-5)
    assert np.abs(apply(module, sparse)[:, 2]).max() < 1.0  # not 1e-3 / 1e-4-ish blown up
    constant = np.zeros((10, 3), dtype=np.float32)
    assert torch.equal(fit_preprocessing("robust", constant).scale, torch.ones(3))


def test_image_scales_resizes_and_normalizes_per_channel():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 3, 4, 4)).astype(np.uint8)
    module = fit_preprocessing({"kind": "image"}, images)
    unit = images.astype(np.float64) / 255.0
    mean, std = unit.mean(axis=(0, 2, 3)), unit.std(axis=(0, 2, 3))
    want = (unit - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(apply(module, images.astype(np.float32)), want, atol=1e-5)

    resized = fit_preprocessing(
        {"kind": "image", "image_size": 2, "normalization": "imagenet"}, images
    )
    assert output_shape(resized, (3, 4, 4)) == (3, 2, 2)
    pooled = unit.reshape(6, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # bilinear 4 -> 2 is 2x2 averaging
    want = (pooled - np.array(IMAGENET_MEAN)[None, :, None, None]) / np.array(IMAGENET_STD)[
        None, :, None, None
    ]
    np.testing.assert_allclose(apply(resized, images.astype(np.float32)), want, atol=1e-5)


def test_unfitted_modules_take_the_fitted_state(table):
    for kind in PREPROCESSING:
        data = table if kind != "image" else np.abs(table).reshape(50, 1, 2, 2)
        fitted = fit_preprocessing(kind, data)
        empty = build_preprocessing(kind, data.shape[1:])
        empty.load_state_dict(fitted.state_dict())
        np.testing.assert_array_equal(apply(empty, data), apply(fitted, data))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zscore", r"unknown preprocessing 'zscore'.*'image', 'minmax', 'none', 'robust'"),
        ({"kind": "image", "size": 3}, r"does not accept option 'size'.*image_size"),
        ({"kind": "image", "normalization": "coco"}, r"invalid normalization='coco'"),
        ({"kind": "image", "image_size": 0}, r"invalid image_size=0"),
    ],
)
def test_bad_preprocessing_fails_at_construction(spec, message):
    for name in ("autoencoder", "knn"):
        with pytest.raises(ValueError, match=message):
            create_detector(name, preprocessing=spec)


def test_image_preprocessing_needs_image_rows(table):
    with pytest.raises(ValueError, match=r"needs rows \[C, H, W\]"):
        fit_preprocessing("image", table)


def test_per_image_intensity_matches_numpy_and_onnxruntime_at_448_px(tmp_path):
    """Each image is brought to the training images' median brightness and contrast; the
    per-image sums are in float64, so onnxruntime computes the same pixels as torch even over
    448 x 448 values (float32 sums there move pixels by about 1e-5: enough to fail embedding
    parity downstream)."""
    import onnxruntime

    rng = np.random.default_rng(0)
    images = np.clip(rng.normal(100, 30, size=(4, 1, 448, 448)), 0, 255).astype(np.float32)
    images[1] = images[1] * 0.2 + 10  # a dim, flat exposure
    spec = {"kind": "image", "normalization": "imagenet", "intensity": "per_image"}
    module = fit_preprocessing(spec, images)
    unit = images.astype(np.float64) / 255.0
    means, stds = unit.mean(axis=(1, 2, 3)), unit.std(axis=(1, 2, 3))
    assert module.typical_brightness.item() == pytest.approx(np.median(means), rel=1e-6)
    assert module.typical_contrast.item() == pytest.approx(np.median(stds), rel=1e-6)
    expected = (unit - means[:, None, None, None]) / stds[:, None, None, None]
    expected = expected * np.median(stds) + np.median(means)
    expected = (expected - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[
        :, None, None
    ]
    np.testing.assert_allclose(apply(module, images), expected, atol=2e-5)
    program = torch.onnx.export(
        module,
        (torch.as_tensor(images[:2]),),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
    )
    program.save(tmp_path / "preprocess.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "preprocess.onnx")
    exported = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert np.abs(exported - apply(module, images)).max() < 1e-6


def test_an_unknown_intensity_is_refused():
    with pytest.raises(ValueError, match=r"preprocessing 'image': invalid intensity='auto'"):
        fit_preprocessing({"kind": "image", "intensity": "auto"}, np.zeros((2, 1, 8, 8)))
