"""Splits of an MVTec-layout image folder (`data.source: mvtec`).

The folder already says what is normal: `train/good` trains, `test/` tests. So:
- train: `train/good` less a seeded `prepare.val_fraction` share, which is
- val: those held-out good images, plus every image of `data.validation_path` (an MVTec-layout
  folder whose `test/` holds labelled good and defect images, with masks) when given;
- holdout (promotion only): a `prepare.holdout_fraction` share of `test/`, chosen by a hash of
  each image's relative path, so it holds defects for promotion to rank and an image held out
  now was held out in every earlier run at any image size (see `splits.in_holdout`);
- test: the rest of `test/`. `prepare.test_fraction` does not apply (the folder fixes test).
Masks and defect names travel with every split; `fit` never sees them."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from normalcy.config import DataParams, PrepareParams
from normalcy.data.mvtec import load_mvtec
from normalcy.data.sources import DataError, Dataset
from normalcy.data.splits import Split, Splits, check_no_leakage, in_holdout

log = logging.getLogger(__name__)
VALIDATION_PREFIX = "validation:"  # ids of data.validation_path images (same relative paths)


def path_hashes(ids: np.ndarray) -> np.ndarray:
    """sha1 hex of each relative image path."""
    return np.array([hashlib.sha1(str(i).encode()).hexdigest() for i in ids])


def _rows(data: Dataset, idx: np.ndarray, prefix: str = "") -> Split:
    idx = np.sort(idx)
    ids = data.ids[idx] if not prefix else np.char.add(prefix, data.ids[idx].astype(str))
    masks = None if data.masks is None else data.masks[idx]
    return Split(data.X[idx], data.y[idx], ids, masks, data.defects[idx])


def _joined(a: Split, b: Split) -> Split:
    """`a` then `b`; the masks of train/good images (none stored) are zeros."""
    size = a.X.shape[-2:]
    masks = [
        s.masks if s.masks is not None else np.zeros((len(s), *size), np.uint8) for s in (a, b)
    ]
    return Split(
        np.concatenate([a.X, b.X]),
        np.concatenate([a.y, b.y]),
        np.concatenate([a.ids, b.ids]),
        np.concatenate(masks),
        np.concatenate([a.defects, b.defects]),
    )


def split_image_folder(data: DataParams, params: PrepareParams) -> Splits:
    """Load `data.path` (and `data.validation_path`) and split it as the module says."""
    root, size = Path(data.path), data.loaded_image_size
    good = load_mvtec(root, "train", size, data.channels)
    channels = good.X.shape[1]  # test and validation images load like the training images
    test = load_mvtec(root, "test", size, channels)
    n_val = int(round(params.val_fraction * len(good.X)))
    if n_val < 1 or len(good.X) - n_val < 2:
        raise DataError(
            f"{root}/train/good: {len(good.X)} images cannot give both a validation share "
            f"(prepare.val_fraction {params.val_fraction:g}: {n_val} images) and at least 2 "
            "training images; add images or change prepare.val_fraction"
        )
    val_idx = np.random.default_rng(params.seed).choice(len(good.X), n_val, replace=False)
    train_idx = np.setdiff1d(np.arange(len(good.X)), val_idx)
    val = _rows(good, val_idx)
    if data.validation_path:
        extra = load_mvtec(Path(data.validation_path), "test", size, channels)
        val = _joined(val, _rows(extra, np.arange(len(extra.X)), VALIDATION_PREFIX))
    held = in_holdout(path_hashes(test.ids), params.holdout_fraction)
    splits = Splits(
        _rows(good, train_idx),
        val,
        _rows(test, np.flatnonzero(~held)),
        _rows(test, np.flatnonzero(held)),
        [],
    )
    check_no_leakage(splits)
    counts = {name: f"{len(s)} ({int(s.y.sum())} defects)" for name, s in splits.items()}
    log.info("split %s at %d px: %s images", root, size, counts)
    return splits
