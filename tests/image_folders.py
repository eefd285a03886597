"""Small synthetic MVTec-layout folders for tests: striped noisy textures, defects pasted as
bright or dark blobs, and soft-edged masks (0 outside, 255 inside, a ramp at the border)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def texture(rng: np.random.Generator, height: int, width: int, channels: int = 1) -> np.ndarray:
    """uint8 `[h, w]` or `[h, w, 3]`: diagonal stripes plus noise, a different phase each time."""
    yy, xx = np.mgrid[0:height, 0:width]
    phase, brightness = rng.uniform(0, 2 * np.pi), rng.uniform(100, 150)
    base = brightness + rng.uniform(25, 55) * np.sin((xx + yy) / 3.0 + phase)
    layers = [base + rng.normal(0, 8, (height, width)) for _ in range(channels)]
    image = np.stack(layers, axis=-1) if channels == 3 else layers[0]
    return np.clip(image, 0, 255).astype(np.uint8)


def soft_disk(height: int, width: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """uint8 mask: 255 inside `radius - 1`, 0 beyond `radius + 1`, a linear ramp between."""
    yy, xx = np.mgrid[0:height, 0:width]
    distance = np.hypot(yy - cy, xx - cx)
    return (255 * np.clip((radius + 1 - distance) / 2, 0, 1)).astype(np.uint8)


def paste_defect(
    rng: np.random.Generator, image: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """(image with a dark or bright blob, inside the range normal textures reach, so a defect
    is an anomaly, not a broken camera; its soft-edged mask)."""
    height, width = image.shape[:2]
    cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
    mask = soft_disk(height, width, cy, cx, radius)
    weight = mask.astype(np.float64) / 255
    if image.ndim == 3:
        weight = weight[..., None]
    value = image.mean() + (40.0 if rng.random() < 0.5 else -40.0)
    blended = image * (1 - weight) + value * weight
    return blended.astype(np.uint8), mask


def save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_mvtec_folder(
    root: Path,
    n_train: int = 10,
    n_test_good: int = 4,
    defects: dict[str, int] | None = None,
    sizes: tuple[tuple[int, int], ...] = ((40, 48), (36, 30)),
    channels: int = 1,
    suffix: str = ".png",
    radius: float = 5.0,
    seed: int = 0,
) -> Path:
    """An MVTec-layout category folder under `root`; sizes (h, w) cycle over the images."""
    rng = np.random.default_rng(seed)
    defects = {"scratch": 3, "hole": 2} if defects is None else defects
    counter = 0

    def next_texture() -> np.ndarray:
        nonlocal counter
        height, width = sizes[counter % len(sizes)]
        counter += 1
        return texture(rng, height, width, channels)

    for i in range(n_train):
        save(next_texture(), root / "train" / "good" / f"{i:03d}{suffix}")
    for i in range(n_test_good):
        save(next_texture(), root / "test" / "good" / f"{i:03d}{suffix}")
    for defect, count in defects.items():
        for i in range(count):
            image, mask = paste_defect(rng, next_texture(), radius)
            save(image, root / "test" / defect / f"{i:03d}{suffix}")
            save(mask, root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root
