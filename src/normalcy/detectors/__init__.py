"""Detectors: the contract, the registry, and one module per method family.

Every module of this package is imported here, so a method registers itself just by living in
a file of its own with `@register("name")`; nothing else needs editing to add one."""

import importlib
import pkgutil

from normalcy.detectors.base import Detector
from normalcy.detectors.registry import (
    accepted_params,
    available_detectors,
    create_detector,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Detector", "accepted_params", "available_detectors", "create_detector", "register"]
