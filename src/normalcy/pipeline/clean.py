"""Step 3, clean: iteratively drop the contaminated tail of the training split (audit-logged)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from normalcy.config import CleanParams
from normalcy.data.splits import Split
from normalcy.detectors import Detector
from normalcy.detectors.registry import create_with_settings
from normalcy.jsonio import write_json
from normalcy.pipeline import artifacts
from normalcy.validation.cleaning import CleaningResult, clean_training_split


def cleaning_detector(params: CleanParams) -> Callable[[], Detector]:
    """A factory of fresh cleaning detectors, one per cleaning iteration."""

    def make() -> Detector:
        settings = {"epochs": params.epochs, "seed": params.seed, "threads": params.threads}
        return create_with_settings(params.detector, params.detector_params, settings)

    return make


def clean(train: Split, params: CleanParams) -> tuple[Split, CleaningResult | None]:
    """(cleaned training split, what each iteration removed; None when cleaning is off).

    Writes the audit log and the cleaned split for the train step."""
    if not params.enabled:
        cleaned, result = train, None
    else:
        cleaned, result = clean_training_split(train, cleaning_detector(params), params)
    write_json(result.to_dict() if result else {"enabled": False}, artifacts.cleaning_log(params))
    arrays = {"X": cleaned.X, "ids": cleaned.ids}
    if cleaned.y is not None:
        arrays["y"] = cleaned.y
    artifacts.CLEANED_TRAIN.parent.mkdir(parents=True, exist_ok=True)
    np.savez(artifacts.CLEANED_TRAIN, **arrays)
    return cleaned, result


def load_cleaned_train() -> Split:
    """The training split after cleaning, written by `clean`."""
    with np.load(artifacts.CLEANED_TRAIN, allow_pickle=False) as archive:
        return Split(archive["X"], archive["y"] if "y" in archive.files else None, archive["ids"])
