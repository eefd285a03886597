"""Saving and loading fitted detectors without pickled objects.

A file holds plain containers only: the detector's registry name, its constructor params, the
input row shape and a flat dict of tensors (`Detector.fitted_state`: network and preprocessing
state_dicts, a kNN bank, forest tables, a mixture, members under `members.<i>.`). It is written
with `torch.save` and read with `torch.load(weights_only=True)`, so loading a file cannot run
code, and renaming a class does not break old files. Loading rebuilds the detector with
`create_detector(name, **params)` and then its fitted state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from normalcy.atomic import atomic_path
from normalcy.detectors.base import Detector
from normalcy.detectors.registry import available_detectors, create_detector

FORMAT = "normalcy.detector"
FORMAT_VERSION = 1
_KEYS = ("format", "version", "detector", "params", "input_shape", "tensors")


def save_detector(detector: Detector, path: str | Path) -> Path:
    """Write a fitted detector to `path` (parents created); returns the path."""
    if detector.input_shape is None:
        raise RuntimeError(f"{detector.name}: call fit() before saving")
    path = Path(path)
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "detector": detector.name,
        "params": detector.constructor_params(),
        "input_shape": list(detector.input_shape),
        "tensors": {
            key: value.detach().cpu().contiguous() for key, value in detector.fitted_state().items()
        },
    }
    with atomic_path(path) as tmp:  # never a half-written file under the final name
        torch.save(record, tmp)
    return path


def load_detector(path: str | Path) -> Detector:
    """The fitted detector saved at `path` by `save_detector`, or a ValueError naming the file
    and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved detector at {path}")
    try:
        record = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # a truncated, corrupted or foreign file: say which and why
        raise ValueError(
            f"{path} is not a readable saved detector ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); save it again "
            "with normalcy.detectors.persistence.save_detector"
        ) from error
    _check_record(record, path)
    name = record["detector"]
    if name not in available_detectors():
        raise ValueError(
            f"{path} holds a detector named {name!r}, which is not registered; expected one of "
            f"{available_detectors()}"
        )
    try:
        detector = create_detector(name, **record["params"])
        detector.load_fitted_state(record["tensors"], tuple(record["input_shape"]))
    except (ValueError, KeyError, RuntimeError, TypeError) as error:
        raise ValueError(
            f"{path}: could not rebuild detector {name!r} from its saved params and state "
            f"({type(error).__name__}: {error})"
        ) from error
    return detector


def _check_record(record: Any, path: Path) -> None:
    """The file's top level is what `save_detector` writes, or a ValueError naming the file."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saved normalcy detector (no {FORMAT!r} record)")
    missing = [key for key in _KEYS if key not in record]
    if missing:
        raise ValueError(f"{path}: saved detector record lacks {missing}")
    if record["version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: saved detector format version {record['version']}, this normalcy reads "
            f"version {FORMAT_VERSION}"
        )
