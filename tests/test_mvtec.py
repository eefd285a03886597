"""The MVTec-layout loader on synthetic folders, its errors, and the real magnetic tile set."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from normalcy.data.images import decode_image, encode_png
from normalcy.data.mvtec import load_mvtec
from normalcy.data.sources import DataError
from tests.conftest import shared_data
from tests.image_folders import make_mvtec_folder, save, soft_disk


@pytest.fixture
def folder(tmp_path):
    return make_mvtec_folder(tmp_path / "cat")


def test_train_part_is_good_images_resized(folder):
    data = load_mvtec(folder, "train", image_size=24)
    assert data.X.shape == (10, 1, 24, 24) and data.X.dtype == np.float32
    assert 0 <= data.X.min() and data.X.max() <= 255 and data.X.std() > 1
    assert data.y.tolist() == [0] * 10 and data.masks is None
    assert set(data.defects) == {"good"}
    assert data.ids[0] == "train/good/000.png"
    assert data.is_image


def test_test_part_labels_masks_and_defect_names(folder):
    data = load_mvtec(folder, "test", image_size=40)
    assert data.X.shape == (9, 1, 40, 40)
    assert data.masks.shape == (9, 40, 40) and data.masks.dtype == np.uint8
    assert sorted(set(np.unique(data.masks))) == [0, 1]
    assert data.defects.tolist() == ["good"] * 4 + ["hole"] * 2 + ["scratch"] * 3
    assert data.y.tolist() == [0] * 4 + [1] * 5
    assert data.masks[data.y == 0].sum() == 0
    assert (data.masks[data.y == 1].sum(axis=(1, 2)) > 0).all()
    assert data.ids[4] == "test/hole/000.png"


def test_masks_binarize_above_127_after_nearest_resize(tmp_path):
    root = make_mvtec_folder(tmp_path / "cat", defects={"cut": 1}, sizes=((8, 8),), radius=2)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[0, :] = 127  # not defect
    mask[1, :] = 128  # defect
    mask[2, :] = 255  # defect
    save(mask, root / "ground_truth" / "cut" / "000_mask.png")
    data = load_mvtec(root, "test", image_size=8)
    loaded = data.masks[data.defects == "cut"][0]
    assert loaded[0].sum() == 0 and loaded[1].all() and loaded[2].all()
    assert loaded[3:].sum() == 0


def test_soft_edges_make_the_127_rule_smaller_than_any_nonzero():
    mask = soft_disk(40, 40, 20, 20, 8)
    assert 0 < (mask > 127).sum() < (mask > 0).sum()


def test_channels_as_stored_and_converted(tmp_path):
    gray = make_mvtec_folder(tmp_path / "gray")
    rgb = make_mvtec_folder(tmp_path / "rgb", channels=3, suffix=".jpg")
    assert load_mvtec(gray, "train", 16).X.shape[1] == 1
    assert load_mvtec(rgb, "train", 16).X.shape[1] == 3
    as_rgb = load_mvtec(gray, "train", 16, channels=3).X
    assert as_rgb.shape[1] == 3 and np.array_equal(as_rgb[:, 0], as_rgb[:, 2])
    assert load_mvtec(rgb, "test", 16, channels=1).X.shape[1] == 1


def test_a_folder_mixing_grayscale_and_colour_loads_as_colour(tmp_path):
    root = make_mvtec_folder(tmp_path / "cat")
    save(np.full((20, 20, 3), 90, dtype=np.uint8), root / "train" / "good" / "colour.png")
    assert load_mvtec(root, "train", 16).X.shape[1] == 3


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "train" / "good").rename(root / "train" / "ok"), "train/good"),
        (lambda root: (root / "test").rename(root / "other"), "no folder test"),
    ],
)
def test_missing_folders_name_the_expected_layout(folder, damage, message):
    damage(folder)
    part = "train" if "train" in message else "test"
    with pytest.raises(DataError, match=message) as info:
        load_mvtec(folder, part)
    assert "MVTec-AD layout" in str(info.value)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="not a folder.*MVTec-AD layout"):
        load_mvtec(tmp_path / "absent", "train")


def test_no_images(tmp_path):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    (tmp_path / "cat" / "train" / "good" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images in train/good"):
        load_mvtec(tmp_path / "cat", "train")


def test_test_folder_without_subfolders(tmp_path):
    (tmp_path / "cat" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match="no sub-folders"):
        load_mvtec(tmp_path / "cat", "test")


def test_corrupted_image_is_named(folder):
    (folder / "train" / "good" / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="train/good/004.png: unreadable or corrupted"):
        load_mvtec(folder, "train")


def test_truncated_image_is_named(folder):
    path = folder / "test" / "good" / "001.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="test/good/001.png: unreadable or corrupted"):
        load_mvtec(folder, "test")


def test_defect_image_without_mask(folder):
    (folder / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="test/hole/001.png: defect image without a mask") as info:
        load_mvtec(folder, "test")
    assert "ground_truth/hole/001_mask.png" in str(info.value)


def test_mask_of_another_size(folder):
    save(np.zeros((7, 9), dtype=np.uint8), folder / "ground_truth" / "scratch" / "002_mask.png")
    with pytest.raises(DataError, match="002_mask.png: mask is 9x7.*expected the same"):
        load_mvtec(folder, "test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"part": "val"}, "part='val'"),
        ({"part": "train", "channels": 2}, "channels=2"),
        ({"part": "train", "image_size": 0}, "image_size=0"),
    ],
)
def test_bad_arguments(folder, kwargs, message):
    with pytest.raises(DataError, match=message):
        load_mvtec(folder, **kwargs)


def test_decode_bytes_matches_decode_path(folder):
    path = folder / "train" / "good" / "000.png"
    from_bytes = decode_image(path.read_bytes(), size=20)
    assert np.array_equal(from_bytes, decode_image(path, size=20))
    assert from_bytes.shape == (1, 20, 20) and from_bytes.dtype == np.uint8


def test_decode_keeps_rgb_and_drops_alpha(tmp_path):
    rgba = np.zeros((6, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    decoded = decode_image(tmp_path / "a.png")
    assert decoded.shape == (3, 6, 5) and decoded[0].min() == 200 and decoded[1].max() == 0


def test_png_round_trip():
    array = (np.arange(48, dtype=np.uint8).reshape(1, 6, 8)) * 5
    assert np.array_equal(decode_image(encode_png(array)), array)


def test_sixteen_bit_images_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match="deep.png: I;16 image.*clip"):
        decode_image(tmp_path / "deep.png")


def test_decode_to_height_and_width():
    array = np.zeros((1, 6, 8), dtype=np.uint8)
    assert decode_image(encode_png(array), size=(3, 5)).shape == (1, 3, 5)


def test_decode_garbage_bytes():
    with pytest.raises(DataError, match="<bytes>: unreadable or corrupted"):
        decode_image(b"GIF89a?")


def test_magnetic_tile_counts():
    root = shared_data("images", "magnetic_tile")
    train = load_mvtec(root, "train", image_size=64)
    assert train.X.shape == (666, 1, 64, 64) and train.masks is None
    test = load_mvtec(root, "test", image_size=128)
    names, counts = np.unique(test.defects, return_counts=True)
    assert dict(zip(names.tolist(), counts.tolist(), strict=True)) == {
        "Blowhole": 115,
        "Break": 85,
        "Crack": 57,
        "good": 286,
    }
    assert test.masks[test.y == 0].sum() == 0
    assert (test.masks[test.y == 1].sum(axis=(1, 2)) > 0).mean() > 0.95
