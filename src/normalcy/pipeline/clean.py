"""Step 3, clean: iteratively drop the contaminated tail of the training split (audit-logged)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from normalcy.config import CleanParams
from normalcy.data.mvtec import GOOD
from normalcy.data.splits import Split, load_split, split_arrays
from normalcy.detectors import Detector
from normalcy.detectors.registry import create_with_settings
from normalcy.jsonio import write_json
from normalcy.pipeline import artifacts
from normalcy.validation.cleaning import CleaningResult, clean_training_split

log = logging.getLogger(__name__)


def cleaning_detector(params: CleanParams) -> Callable[[], Detector]:
    """A factory of fresh cleaning detectors, one per cleaning iteration."""

    def make() -> Detector:
        settings = {"epochs": params.epochs, "seed": params.seed, "threads": params.threads}
        return create_with_settings(params.detector, params.detector_params, settings)

    return make


def skip_reason(train: Split, params: CleanParams) -> str | None:
    """Why cleaning does not run on this training split, or None when it does."""
    if not params.enabled:
        return "clean.enabled is false"
    if train.defects is not None and (train.defects == GOOD).all():
        return (
            "the training images are the train/good folder of an image folder, defect-free by "
            "construction"
        )
    return None


def clean(train: Split, params: CleanParams) -> tuple[Split, CleaningResult | None]:
    """(cleaned training split, what each iteration removed; None when cleaning is skipped).

    Writes the audit log and the cleaned split for the train step."""
    reason = skip_reason(train, params)
    if reason is None:
        cleaned, result = clean_training_split(train, cleaning_detector(params), params)
    else:
        log.info("cleaning skipped: %s", reason)
        cleaned, result = train, None
    record = result.to_dict() if result else {"enabled": False, "skipped": reason}
    write_json(record, artifacts.cleaning_log(params))
    artifacts.CLEANED_TRAIN.parent.mkdir(parents=True, exist_ok=True)
    np.savez(artifacts.CLEANED_TRAIN, **split_arrays(cleaned))
    return cleaned, result


def load_cleaned_train() -> Split:
    """The training split after cleaning, written by `clean`."""
    return load_split(artifacts.CLEANED_TRAIN)
