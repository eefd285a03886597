"""Small synthetic images for the image detectors' tests: striped textures (grayscale, 0..255)
and the same textures with a pasted square defect and its mask."""

import numpy as np


def textures(n: int, seed: int, size: int = 32) -> np.ndarray:
    """`[n, 1, size, size]` float32 stripes of random phase and frequency plus pixel noise."""
    rng = np.random.default_rng(seed)
    _, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    frequency = rng.uniform(0.5, 0.7, size=(n, 1, 1))
    images = 128 + 40 * np.sin(frequency * xx + phase) + rng.normal(0, 8, size=(n, size, size))
    return np.clip(images, 0, 255)[:, None].astype(np.float32)


def pasted_defects(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, masks `[n, S, S]` uint8): a dark or bright square of a fifth of the side pasted
    at a random place in each image."""
    rng = np.random.default_rng(seed)
    images, size = images.copy(), images.shape[-1]
    masks = np.zeros((len(images), size, size), dtype=np.uint8)
    side = size // 5
    for i in range(len(images)):
        top, left = rng.integers(0, size - side, size=2)
        images[i, :, top : top + side, left : left + side] = rng.choice([10.0, 245.0])
        masks[i, top : top + side, left : left + side] = 1
    return images, masks
