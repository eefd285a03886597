"""Saving and loading fitted detectors.

Placeholder with the final interface: the implementation (constructor params + state_dict,
loaded with weights_only=True) replaces the pickle below."""

from __future__ import annotations

from pathlib import Path

import torch

from normalcy.detectors.base import Detector


def save_detector(detector: Detector, path: str | Path) -> Path:
    """Write a fitted detector to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(detector, path)
    return path


def load_detector(path: str | Path) -> Detector:
    """A fitted detector saved by `save_detector`."""
    return torch.load(path, weights_only=False)
