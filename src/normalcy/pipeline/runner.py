"""`normalcy stage NAME`: one step, from the files the step before wrote (what dvc repro runs).
Each step reads only its own params section (dvc.yaml lists exactly those keys)."""

from __future__ import annotations

from collections.abc import Callable

from normalcy.config import Params
from normalcy.pipeline import clean, evaluate, export, prepare, train, validate


def _prepare(params: Params) -> None:
    prepare.prepare(params.data, params.prepare)


def _validate(params: Params) -> None:
    validate.validate(prepare.load_prepared(params.prepare), params.validate_)


def _clean(params: Params) -> None:
    clean.clean(prepare.load_prepared(params.prepare).train, params.clean)


def _train(params: Params) -> None:
    val = prepare.load_prepared(params.prepare).val
    train.train_candidates(clean.load_cleaned_train(), val, params.train)


def _evaluate(params: Params) -> None:
    splits = prepare.load_prepared(params.prepare)
    cleaned = clean.load_cleaned_train()
    evaluate.evaluate(train.load_winner(), splits, params.evaluate, params.calibration, cleaned)


def _export(params: Params) -> None:
    splits = prepare.load_prepared(params.prepare)
    point = evaluate.load_operating_point(params.evaluate)
    export.export_and_gate(train.load_winner(), splits, point, params.export)


_RUNNERS: dict[str, Callable[[Params], None]] = {
    "prepare": _prepare,
    "validate": _validate,
    "clean": _clean,
    "train": _train,
    "evaluate": _evaluate,
    "export": _export,
}
STAGES = tuple(_RUNNERS)


def run_stage(name: str, params: Params) -> None:
    """Run one step by name; an unknown name is refused before any work."""
    if name not in _RUNNERS:
        raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
    _RUNNERS[name](params)
