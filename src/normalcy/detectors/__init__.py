"""Detectors: the contract, the registry, and one module per method family."""

from normalcy.detectors import autoencoder, deep_svdd  # noqa: F401  (register the methods)
from normalcy.detectors.base import Detector
from normalcy.detectors.registry import (
    accepted_params,
    available_detectors,
    create_detector,
    register,
)

__all__ = ["Detector", "accepted_params", "available_detectors", "create_detector", "register"]
