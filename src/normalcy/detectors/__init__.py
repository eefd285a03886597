"""Detectors: the contract, the registry, and one module per method family.

Importing this package imports no torch: the registry imports the method modules the first time
a detector is asked for, and each registers itself with `@register("name")` in a file of its
own, so nothing else needs editing to add one. `Detector` (torch) is imported on first use."""

from typing import Any

from normalcy.detectors.registry import (
    accepted_params,
    available_detectors,
    create_detector,
    register,
)

__all__ = ["Detector", "accepted_params", "available_detectors", "create_detector", "register"]


def __getattr__(name: str) -> Any:
    if name == "Detector":
        from normalcy.detectors.base import Detector

        return Detector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
