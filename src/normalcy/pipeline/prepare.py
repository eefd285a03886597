"""Step 1, prepare: load the source (and the training window's folded batches), split it
(seeded, leakage-checked), write it. An image folder is split by its own layout
(`data.image_splits`)."""

from __future__ import annotations

from normalcy.config import DataParams, PrepareParams
from normalcy.data.image_splits import split_image_folder
from normalcy.data.sources import load_dataset
from normalcy.data.splits import Splits, load_splits, save_splits, split_dataset
from normalcy.data.window import with_window


def prepare(data: DataParams, params: PrepareParams) -> Splits:
    """The splits of the configured source, written to `prepare.output_dir` for the next steps."""
    if data.source == "mvtec":
        splits = split_image_folder(data, params)
    else:
        splits = split_dataset(with_window(load_dataset(data), data.window_dir), params)
    save_splits(splits, params.output_dir, {"source": data.source, "path": data.path})
    return splits


def load_prepared(params: PrepareParams) -> Splits:
    """The splits the prepare step wrote (what a later `normalcy stage` starts from)."""
    return load_splits(params.output_dir)
