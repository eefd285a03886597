"""Saved detectors: params + tensors in plain containers, read back with weights_only=True."""

import numpy as np
import pytest
import torch

from normalcy.detectors import accepted_params, available_detectors, create_detector
from normalcy.detectors.persistence import load_detector, save_detector
from tests.image_cases import textures
from tests.test_detector_zoo import low_rank_data, reads_images

TINY = {"epochs": 2, "seed": 0, "n_estimators": 10, "image_size": 32}


@pytest.fixture(scope="module")
def rows():
    return low_rank_data(200, 0), low_rank_data(60, 1), low_rank_data(40, 2)


@pytest.fixture(scope="module")
def images():
    return textures(20, 0), textures(5, 1), textures(6, 2)


def tiny_detector(name: str, **params):
    settings = {k: v for k, v in TINY.items() if k in accepted_params(name)}
    return create_detector(name, **{**settings, **params})


@pytest.mark.parametrize("name", available_detectors())
def test_save_then_load_gives_identical_scores_and_outputs(name, rows, images, tmp_path):
    train, val, test = images if reads_images(name) else rows
    detector = tiny_detector(name).fit(train, val)
    path = save_detector(detector, tmp_path / "nested" / f"{name}.pt")
    record = torch.load(path, weights_only=True)  # plain containers only: nothing to unpickle
    assert record["detector"] == name and record["input_shape"] == list(train.shape[1:])
    assert all(isinstance(value, torch.Tensor) for value in record["tensors"].values())
    loaded = load_detector(path)
    assert type(loaded) is type(detector)
    np.testing.assert_array_equal(loaded.score(test), detector.score(test))
    before, after = detector.predict(test), loaded.predict(test)
    assert list(after) == list(before)
    for output in before:
        np.testing.assert_array_equal(after[output], before[output])


def test_params_and_preprocessing_survive_a_round_trip(rows, tmp_path):
    train, _, test = rows
    detector = tiny_detector("autoencoder", hidden_dims=[5], latent_dim=2, preprocessing="robust")
    loaded = load_detector(save_detector(detector.fit(train), tmp_path / "ae.pt"))
    assert loaded.hidden_dims == [5] and loaded.latent_dim == 2
    assert loaded.preprocessing == "robust"
    np.testing.assert_array_equal(loaded.score(test), detector.score(test))


def test_knn_k_fraction_survives_a_round_trip(rows, tmp_path):
    """The k that k_fraction gives is recomputed from the saved bank, so scores match."""
    train, _, test = rows
    detector = tiny_detector("knn", k_fraction=0.1).fit(train)
    loaded = load_detector(save_detector(detector, tmp_path / "knn.pt"))
    assert loaded.k_fraction == 0.1 and loaded.neighbours(len(loaded.bank)) == 20
    np.testing.assert_array_equal(loaded.score(test), detector.score(test))


def test_an_ensemble_from_fitted_members_saves_their_params(rows, tmp_path):
    from normalcy.detectors.ensemble import Ensemble

    train, val, test = rows
    members = [tiny_detector("knn", k=3), tiny_detector("autoencoder", latent_dim=3)]
    ensemble = Ensemble.from_fitted([m.fit(train, val) for m in members], val)
    loaded = load_detector(save_detector(ensemble, tmp_path / "ensemble.pt"))
    assert loaded.fitted[0].k == 3 and loaded.fitted[1].latent_dim == 3
    np.testing.assert_array_equal(loaded.score(test), ensemble.score(test))


def test_unfitted_detector_is_not_saved(tmp_path):
    with pytest.raises(RuntimeError, match="call fit"):
        save_detector(create_detector("knn"), tmp_path / "knn.pt")


def test_corrupted_or_truncated_file_names_the_file(rows, tmp_path):
    path = save_detector(tiny_detector("knn").fit(rows[0]), tmp_path / "knn.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pt is not a readable saved detector"):
        load_detector(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match=r"garbage\.pt is not a readable saved detector"):
        load_detector(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt is not a saved normalcy detector"):
        load_detector(foreign)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_detector(tmp_path / "missing.pt")


def test_a_pickled_object_is_refused(tmp_path):
    """A file holding an arbitrary object (the old whole-detector pickle) is not executed."""
    path = tmp_path / "pickled.pt"
    torch.save(create_detector("knn"), path)
    with pytest.raises(ValueError, match=r"pickled\.pt is not a readable saved detector"):
        load_detector(path)


def test_unknown_detector_name_names_the_file(rows, tmp_path):
    path = save_detector(tiny_detector("knn").fit(rows[0]), tmp_path / "knn.pt")
    record = torch.load(path, weights_only=True)
    record["detector"] = "no_such_method"
    renamed = tmp_path / "renamed.pt"
    torch.save(record, renamed)
    with pytest.raises(ValueError, match=r"renamed\.pt holds a detector named 'no_such_method'"):
        load_detector(renamed)
