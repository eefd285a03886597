"""MVTec-AD layout image folders: `train/good/*`, `test/<defect or good>/*` and
`ground_truth/<defect>/<stem>_mask.png` (the layout of MVTec AD and of the magnetic tile set).

Images of any size are resized to `image_size` x `image_size` (bilinear, PIL). Masks are resized
with nearest neighbour and then binarized: a pixel is defect when its mask value is > 127. Masks
have soft edges (values 1-254 at the border); anomalib counts any value > 0 as defect, which
makes defect areas 1.1-1.5x larger, so pixel metrics from the two rules differ."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from normalcy.data.images import GRAYSCALE_MODES, decode_image, list_images, read_header
from normalcy.data.sources import DataError, Dataset

log = logging.getLogger(__name__)
PARTS = ("train", "test")
GOOD = "good"
MASK_THRESHOLD = 127  # mask value > 127 is defect
PROGRESS_EVERY = 200  # a log line per this many images
LAYOUT = (
    "expected the MVTec-AD layout: train/good/<images>, test/<defect or good>/<images>, "
    "ground_truth/<defect>/<image stem>_mask.png"
)


def _entries(root: Path, part: str) -> list[tuple[Path, str]]:
    """(image path, defect name or 'good') for every image of `part`, sorted."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; {LAYOUT}")
    if part == "train":
        folder = root / "train" / GOOD
        if not folder.is_dir():
            raise DataError(f"{root}: no folder train/good; {LAYOUT}")
        groups = [(folder, GOOD)]
    else:
        folder = root / "test"
        if not folder.is_dir():
            raise DataError(f"{root}: no folder test; {LAYOUT}")
        groups = [(d, d.name) for d in sorted(folder.iterdir()) if d.is_dir()]
        if not groups:
            raise DataError(f"{folder}: no sub-folders (good or a defect name); {LAYOUT}")
    entries = [(path, defect) for group, defect in groups for path in list_images(group)]
    if not entries:
        searched = ", ".join(str(g.relative_to(root)) for g, _ in groups)
        raise DataError(
            f"{root}: no images in {searched}; expected .png/.jpg/.jpeg/.bmp/.tif files"
        )
    return entries


def check_folder(root: Path, parts: tuple[str, ...] = PARTS) -> None:
    """The layout is there and holds images; read before a flow starts (no image decoded)."""
    for part in parts:
        _entries(Path(root), part)


def mask_path(root: Path, image: Path, defect: str) -> Path:
    return root / "ground_truth" / defect / f"{image.stem}_mask.png"


def _channels(entries: list[tuple[Path, str]], root: Path) -> int:
    """As stored: 1 when every image is grayscale, else 3 (grayscale ones are converted)."""
    modes = [read_header(path, str(path.relative_to(root)))[0] for path, _ in entries]
    gray = [m in GRAYSCALE_MODES for m in modes]
    if any(gray) and not all(gray):
        log.info(
            "%s: %d grayscale and %d colour images; loading all as 3 channels",
            root,
            sum(gray),
            len(gray) - sum(gray),
        )
    return 1 if all(gray) else 3


def _mask(root: Path, image: Path, defect: str, image_size: int) -> np.ndarray:
    """The binarized uint8 0/1 mask of a defect image, resized to the loaded image size."""
    path = mask_path(root, image, defect)
    name = str(image.relative_to(root))
    if not path.is_file():
        raise DataError(
            f"{name}: defect image without a mask; expected {path.relative_to(root)} ({LAYOUT})"
        )
    image_wh = read_header(image, name)[1]
    mask_wh = read_header(path, str(path.relative_to(root)))[1]
    if image_wh != mask_wh:
        raise DataError(
            f"{path.relative_to(root)}: mask is {mask_wh[0]}x{mask_wh[1]} (w x h) but its image "
            f"{name} is {image_wh[0]}x{image_wh[1]}; expected the same size"
        )
    values = decode_image(path, 1, image_size, str(path.relative_to(root)), nearest=True)[0]
    return (values > MASK_THRESHOLD).astype(np.uint8)


def load_mvtec(
    root: Path, part: str, image_size: int = 256, channels: int | None = None
) -> Dataset:
    """One part ("train" or "test") of an MVTec-layout category folder.

    `X` float32 0..255 `[n, c, S, S]`; `y` 1 for defect images; `ids` the paths relative to
    `root`; `defects` "good" or the defect folder name; `masks` uint8 0/1 `[n, S, S]` (zeros
    for good images) on the test part, None on train. `channels` None keeps what is stored."""
    root = Path(root)
    if part not in PARTS:
        raise DataError(f"part={part!r}; expected one of {list(PARTS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size={image_size!r}; expected a positive number of pixels")
    if channels not in (None, 1, 3):
        raise DataError(f"channels={channels!r}; expected None (as stored), 1 or 3")
    entries = _entries(root, part)
    channels = channels or _channels(entries, root)
    n = len(entries)
    X = np.empty((n, channels, image_size, image_size), dtype=np.float32)
    masks = None if part == "train" else np.zeros((n, image_size, image_size), dtype=np.uint8)
    size = f"{image_size} px, {channels} channel(s)"
    log.info("%s/%s: loading %d images at %s", root, part, n, size)
    for i, (path, defect) in enumerate(entries):
        X[i] = decode_image(path, channels, image_size, str(path.relative_to(root)))
        if masks is not None and defect != GOOD:
            masks[i] = _mask(root, path, defect, image_size)
        if (i + 1) % PROGRESS_EVERY == 0 and i + 1 < n:
            log.info("%s/%s: %d of %d images loaded", root, part, i + 1, n)
    defects = np.array([defect for _, defect in entries], dtype=str)
    counts = dict(zip(*np.unique(defects, return_counts=True), strict=True))
    log.info("%s/%s: %d images loaded %s", root, part, n, {k: int(v) for k, v in counts.items()})
    return Dataset(
        X,
        (defects != GOOD).astype(np.int64),
        [],
        np.array([str(path.relative_to(root)) for path, _ in entries], dtype=str),
        f"{root}/{part}",
        masks=masks,
        defects=defects,
    )
