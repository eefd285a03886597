"""Image decoding, written once: a file path or encoded bytes (PNG, JPEG, ...) -> uint8 `[c, h, w]`.

Used by the MVTec loader, by `normalcy score` on an image folder, and meant for the service's
base64 images. Every failure is a `DataError` that names the image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from normalcy.data.sources import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # more than 8 bits a value


def _open(source: bytes | str | Path, name: str):  # noqa: ANN202 (PIL is imported lazily)
    """A fully decoded PIL image; a truncated or corrupted file fails here, not later."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        image.load()
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"{name}: unreadable or corrupted image ({exc}); expected a PNG/JPEG/BMP/TIFF file"
        ) from None
    return image


def read_header(source: bytes | str | Path, name: str | None = None) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (width, height)) from the header alone, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as im:
            return im.mode, im.size
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: unreadable or corrupted image ({exc})") from None


def stored_channels(source: bytes | str | Path, name: str | None = None) -> int:
    """1 for a grayscale image, 3 otherwise, read from the header alone."""
    return 1 if read_header(source, name)[0] in GRAYSCALE_MODES else 3


def decode_image(
    source: bytes | str | Path,
    channels: int | None = None,
    size: int | tuple[int, int] | None = None,
    name: str | None = None,
    nearest: bool = False,
) -> np.ndarray:
    """uint8 `[c, h, w]`. `channels` None keeps what is stored (grayscale 1, anything else 3,
    alpha dropped); 1 or 3 converts. `size` (an int for a square, or (height, width)) resizes
    (bilinear; `nearest` for masks, whose values must not blend). Other modes go through PIL's
    conversion to L or RGB; 16-bit and float images are refused (PIL would clip them)."""
    if channels not in (None, 1, 3):
        raise DataError(f"channels={channels!r}; expected None (as stored), 1 or 3")
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    image = _open(source, name)
    if image.mode in WIDE_MODES:
        raise DataError(
            f"{name}: {image.mode} image (more than 8 bits a value); expected 8-bit grayscale or "
            "colour images (converting would clip values above 255)"
        )
    if channels is None:
        channels = 1 if image.mode in GRAYSCALE_MODES else 3
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None:
        from PIL import Image

        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
        height, width = (size, size) if isinstance(size, int) else size
        image = image.resize((width, height), resample)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name (hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def encode_png(array: np.ndarray) -> bytes:
    """uint8 `[h, w]`, `[h, w, 3]` or `[c, h, w]` -> PNG bytes (maps and overlays)."""
    from PIL import Image

    array = np.asarray(array, dtype=np.uint8)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
