"""Anomaly maps written by `normalcy score --maps`: one npz (`ids`, `maps` float32 `[N, H, W]`,
raw values) when the target ends in .npz, else a folder of PNG heatmaps, one per input image
(its relative path, `.png`), plus `scale.json`.

Every heatmap uses the same colour scale, the lowest to the highest map value of the whole run,
so colours compare across images (a per-image scale would paint every image's maximum red). So
the maps are kept until the run ends: chunk by chunk in a temporary folder on disk, memory stays
bounded. Torch-free (scoring hosts may lack torch): numpy, PIL and a matplotlib colormap."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from normalcy.atomic import atomic_path
from normalcy.scoring.inputs import InputError

COLORMAP = "jet"


def check_maps_target(path: str | Path) -> Path:
    """An .npz file name whose folder exists, or a folder that is absent or empty; fails before
    any work otherwise (maps are never written over other files)."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        if not path.parent.is_dir():
            raise InputError(f"{path}: folder {path.parent} does not exist")
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(
            f"{path}: exists and is not an empty folder; --maps takes a new or empty folder "
            "(PNG heatmaps) or a file name ending in .npz"
        )
    return path


def heatmap(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 RGB `[h, w, 3]` of a map on the colour scale low (blue) .. high (red)."""
    from matplotlib import colormaps

    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return (colormaps[COLORMAP](np.clip(scaled, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def png_name(image_id: str) -> Path:
    """The heatmap's relative path: the image's relative path with a .png suffix."""
    return Path(str(image_id)).with_suffix(".png")


class MapWriter:
    """Collects maps chunk by chunk (`add`), writes them all at the end (`finish`)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self._folder = tempfile.TemporaryDirectory(prefix="normalcy-maps-")
        self._chunks: list[tuple[np.ndarray, Path]] = []

    def add(self, ids: np.ndarray, maps: np.ndarray) -> None:
        path = Path(self._folder.name) / f"{len(self._chunks)}.npy"
        np.save(path, np.asarray(maps, dtype=np.float32))
        self._chunks.append((np.asarray(ids).astype(str), path))

    def _maps(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(ids, np.load(path, mmap_mode="r")) for ids, path in self._chunks]

    def finish(self) -> str:
        """Write the npz or the heatmaps; a sentence saying what was written."""
        try:
            chunks = self._maps()
            if not chunks:
                return "no maps to write"
            if self.target.suffix.lower() == ".npz":
                with atomic_path(self.target) as tmp, open(tmp, "wb") as handle:
                    np.savez(
                        handle,
                        ids=np.concatenate([ids for ids, _ in chunks]),
                        maps=np.concatenate([maps for _, maps in chunks]),
                    )
                return f"wrote {sum(len(i) for i, _ in chunks)} raw anomaly maps to {self.target}"
            return self._write_heatmaps(chunks)
        finally:
            self._folder.cleanup()

    def _write_heatmaps(self, chunks: list[tuple[np.ndarray, np.ndarray]]) -> str:
        from normalcy.data.images import encode_png

        low = float(min(maps.min() for _, maps in chunks))
        high = float(max(maps.max() for _, maps in chunks))
        self.target.mkdir(parents=True, exist_ok=True)
        n = 0
        for ids, maps in chunks:
            for image_id, values in zip(ids, maps, strict=True):
                path = self.target / png_name(image_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(encode_png(heatmap(np.asarray(values), low, high)))
                n += 1
        scale = {"colormap": COLORMAP, "low": low, "high": high, "maps": n}
        (self.target / "scale.json").write_text(json.dumps(scale, indent=2) + "\n")
        return (
            f"wrote {n} anomaly-map heatmaps to {self.target} (colour scale {low:.4g} .. "
            f"{high:.4g} for every image, in scale.json)"
        )
