"""`normalcy stage NAME`: one stage, from the files the stage before wrote (what dvc repro runs)."""

from __future__ import annotations

import numpy as np

from normalcy import stages
from normalcy.config import Params
from normalcy.data.splits import Split, load_splits
from normalcy.export import require_parity

STAGES = ("prepare", "validate", "clean", "train", "evaluate", "export")


def load_cleaned_train() -> Split:
    """The training split after cleaning, written by the clean stage."""
    with np.load(stages.CLEANED_TRAIN, allow_pickle=False) as archive:
        return Split(archive["X"], archive["y"] if "y" in archive.files else None, archive["ids"])


def run_stage(name: str, params: Params) -> None:
    """Run one stage; each reads only its own params section (and the files before it)."""
    if name == "prepare":
        stages.prepare(params.data, params.prepare)
        return
    splits = load_splits(params.prepare.output_dir)
    if name == "validate":
        stages.validate(splits, params.validate_)
    elif name == "clean":
        stages.clean(splits.train, params.clean)
    elif name == "train":
        stages.train_candidates(load_cleaned_train(), splits.val, params.train)
    elif name == "evaluate":
        stages.evaluate(stages.load_winner(), splits, params.evaluate, params.calibration)
    elif name == "export":
        detector = stages.load_winner()
        threshold, calibration_scores = stages.load_evaluation(params.evaluate)
        metadata = stages.model_metadata(
            detector,
            splits.feature_names,
            splits.test.X,
            threshold,
            params.calibration.target_fpr,
            len(calibration_scores),
            params.export.opset,
        )
        path, report = stages.export(
            detector, threshold, splits.test.X, params.export, metadata, calibration_scores
        )
        require_parity(report)
        if params.export.quantize:  # a failed INT8 gate is reported, never fatal
            stages.quantize(
                detector, threshold, splits.test.X, params.export, calibration_scores, path
            )
    else:
        raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
