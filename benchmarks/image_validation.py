"""Choosing image detector params on validation data only: held-out train/good images, half of
them with synthetic defects pasted in. The test folder is never read.

    python benchmarks/image_validation.py --data-dir CATEGORY [--image-size 256]
        [--synthesize-size 448] [--defective-copies 2] [--crack-opacity 0.2]
        [--defect-kinds ellipse,crack,cutpaste,perlin,break]
        --configs '[{"detector": "patchcore", "image_size": 256}, ...]' [--out FILE]
        [--maps-dir DIR]

A seeded fifth of train/good is held out; each config is fitted on the rest (torch, the same
`fit` as the pipeline) and scored on the held-out images, of which every second one gets one
synthetic defect: a dark or bright soft-edged ellipse (a hole or a spot), a thin dark polyline
(a crack), a rectangle cut from another held-out image (a misplaced piece), or an irregular
Perlin-noise patch of another image's texture, 40-100% opaque and 10-40% brighter or darker (a
faint blemish, after DRAEM's anomaly shapes; Zavrtanik et al., ICCV 2021). Masks come from the
drawn shapes. Printed and written: image AUROC, pixel AUROC and AUPRO@0.3 per config, and the
image AUROC of each defect kind against the good images.

Defect sizes are fractions of the side (a crack's width and a Perlin patch's least area are given
at 256 px and scaled), so a defect covers the same share of the image at any size. To compare
loader sizes on the very same defects, `--synthesize-size` loads and defects the images at that
size and then resizes them (and their masks) to `--image-size`, as the loader would.
`--defective-copies K` keeps every held-out image as a good one and adds K defective copies of
each: 2K x the defects, each beside its own clean image, so smaller differences between configs
stand out from the noise (the per-image scores in the JSON allow a paired bootstrap).
`--crack-opacity MIN` blends each crack at an opacity drawn from [MIN, 1]: opaque cracks are
found by every config, so they rank none. `--defect-kinds` picks the kinds drawn; `break` (only
when named) cuts the image beyond a ragged line across one side or corner, 4-35% of its area, and
fills it with the dark background: a large defect, which the other kinds never are."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from quality_images import image_and_pixel_metrics

from normalcy.data.mvtec import load_mvtec
from normalcy.detectors import create_detector

VALIDATION_FRACTION = 0.2
REFERENCE_SIZE = 256  # pixel widths and areas below are given at this side and scaled with it
DEFECT_KINDS = ("ellipse", "crack", "cutpaste", "perlin")  # the default draw, as in earlier runs
LARGE_KINDS = ("break",)  # only when asked for (`--defect-kinds`), so earlier sets stay the same
KNOWN_KINDS = DEFECT_KINDS + LARGE_KINDS


def ellipse(rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft-edged ellipse weights in [0, 1] `[size, size]`, radii 1.5-5% of the side."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    ry, rx = rng.uniform(0.015, 0.05, size=2) * size
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    return np.clip((1.2 - np.hypot(u, v)) / 0.4, 0, 1)


def crack(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin random polyline (3-6 segments, 1-2.5 px half-width at 256 px) as weights in
    [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size]
    point = rng.uniform(0.2, 0.8, size=2) * size
    direction = rng.uniform(0, 2 * np.pi)
    width = rng.uniform(1.0, 2.5) * size / REFERENCE_SIZE
    weights = np.zeros((size, size))
    for _ in range(rng.integers(3, 7)):
        direction += rng.normal(0, 0.6)
        step = rng.uniform(0.03, 0.08) * size
        end = point + step * np.array([np.sin(direction), np.cos(direction)])
        for t in np.linspace(0, 1, int(step) + 2):
            cy, cx = point + t * (end - point)
            weights = np.maximum(weights, np.clip(width + 0.5 - np.hypot(yy - cy, xx - cx), 0, 1))
        point = np.clip(end, 0, size - 1)
    return weights


def perlin_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """2-D gradient (Perlin) noise `[size, size]` in about [-0.7, 0.7], `cells` lattice cells a
    side: random unit gradients at the lattice points, blended with the quintic fade."""
    angles = rng.uniform(0, 2 * np.pi, size=(cells + 1, cells + 1))
    grad_y, grad_x = np.sin(angles), np.cos(angles)
    y, x = np.meshgrid(*(np.arange(size) * cells / size,) * 2, indexing="ij")
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = y - y0, x - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        return grad_y[y0 + dy, x0 + dx] * (fy - dy) + grad_x[y0 + dy, x0 + dx] * (fx - dx)

    u, v = (t**3 * (t * (6 * t - 15) + 10) for t in (fy, fx))
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return top * (1 - u) + bottom * u


def perlin_region(rng: np.random.Generator, size: int) -> np.ndarray:
    """An irregular blob as 0/1 weights: Perlin noise above a threshold, inside a random
    ellipse of 5-15% of the side (DRAEM's anomaly shapes, kept local)."""
    yy, xx = np.mgrid[0:size, 0:size]
    while True:
        noise = perlin_noise(rng, size, int(rng.choice([2, 4, 8, 16])))
        cy, cx = rng.uniform(0.15, 0.85, size=2) * size
        ry, rx = rng.uniform(0.05, 0.15, size=2) * size
        window = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        region = (noise > rng.uniform(0.05, 0.3)) & window
        if region.sum() >= 16 * (size / REFERENCE_SIZE) ** 2:
            return region.astype(float)


def edge_break(rng: np.random.Generator, size: int) -> np.ndarray:
    """0/1 weights of a piece broken off the part: the image beyond a ragged line across one
    side or corner, 4-35% of the area (a chipped tile shows the dark background there). Unlike
    the other kinds it can cover a large share of the image, as real breaks do."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)  # from the centre towards the broken side
    reach = xx * np.cos(angle) + yy * np.sin(angle)
    reach = reach + perlin_noise(rng, size, int(rng.choice([4, 8]))) * rng.uniform(0.05, 0.15)
    return (reach > np.quantile(reach, 1 - rng.uniform(0.04, 0.35))).astype(float)


def with_defect(
    rng: np.random.Generator,
    image: np.ndarray,
    donor: np.ndarray,
    crack_opacity: float = 1.0,
    kinds: tuple[str, ...] = DEFECT_KINDS,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(image `[C, S, S]` with one synthetic defect of one of `kinds`, its 0/1 mask `[S, S]`,
    the defect kind).

    `crack_opacity` below 1 blends each crack at an opacity drawn from [crack_opacity, 1] (its
    mask stays the drawn line): opaque cracks are found by every config (image AUROC 1.000), so
    they rank none; at 1 no draw is added and earlier validation sets come back unchanged."""
    size = image.shape[-1]
    kind = kinds[rng.integers(len(kinds))]
    if kind == "break":  # the dark background, a little uneven
        weights = edge_break(rng, size)
        target = image.mean() * rng.uniform(0.05, 0.35) + rng.normal(0, 4.0, size=image.shape)
    elif kind == "cutpaste":
        h, w = (rng.uniform(0.05, 0.15, size=2) * size).astype(int) + 2
        top, left = rng.integers(0, size - h), rng.integers(0, size - w)
        src_top, src_left = rng.integers(0, size - h), rng.integers(0, size - w)
        weights = np.zeros((size, size))
        weights[top : top + h, left : left + w] = 1
        target = np.zeros_like(image)
        target[:, top : top + h, left : left + w] = donor[
            :, src_top : src_top + h, src_left : src_left + w
        ] * rng.uniform(0.6, 1.4)
    elif kind == "perlin":  # another image's texture, mirrored and shifted, partly opaque
        weights = perlin_region(rng, size) * rng.uniform(0.4, 1.0)
        shift = tuple(rng.integers(size // 4, 3 * size // 4, size=2))
        texture = np.roll(donor[:, :, ::-1], shift, axis=(-2, -1))
        gain = rng.uniform(1.1, 1.4) if rng.random() < 0.5 else rng.uniform(0.6, 0.9)
        target = texture * gain
    else:
        weights = ellipse(rng, size) if kind == "ellipse" else crack(rng, size)
        level = image.mean()
        factor = rng.uniform(0.2, 0.6) if kind == "crack" or rng.random() < 0.6 else 1.6
        target = np.full_like(image, np.clip(level * factor, 0, 255))
    threshold = 0.0 if kind == "perlin" else 0.5  # a faint patch is a defect wherever it is
    mask = (weights > threshold).astype(np.uint8)
    if kind == "crack" and crack_opacity < 1.0:
        weights = weights * rng.uniform(crack_opacity, 1.0)
    blended = image * (1 - weights) + target * weights
    return np.clip(blended, 0, 255).astype(np.float32), mask, kind


def validation_set(
    images: np.ndarray,
    seed: int = 0,
    copies: int = 0,
    crack_opacity: float = 1.0,
    kinds: tuple[str, ...] = DEFECT_KINDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fit images, validation images, labels, masks, defect kinds), all from train/good.

    `copies` 0: every second held-out image gets one defect. `copies` k > 0: every held-out
    image stays as a good one and k defective copies of it are added, so each defect is judged
    beside its own clean image (a paired set, with 2k x the defects of the default).
    `crack_opacity`, `kinds`: see `with_defect`."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    n_val = max(2, int(round(VALIDATION_FRACTION * len(images))))
    fit, val = images[np.sort(order[n_val:])], images[np.sort(order[:n_val])].copy()
    if copies:
        return (fit, *defective_copies(rng, val, copies, crack_opacity, kinds))
    size = val.shape[-1]
    masks = np.zeros((len(val), size, size), dtype=np.uint8)
    labels = np.zeros(len(val), dtype=int)
    kinds = np.array(["good"] * len(val), dtype=object)
    for i in range(1, len(val), 2):
        donor = val[(i + 1) % len(val)]
        val[i], masks[i], kind = with_defect(rng, val[i], donor, crack_opacity, kinds)
        labels[i] = int(masks[i].any())
        kinds[i] = kind if labels[i] else "good"
    return fit, val, labels, masks, kinds.astype(str)


def defective_copies(
    rng: np.random.Generator,
    good: np.ndarray,
    copies: int,
    crack_opacity: float = 1.0,
    kinds: tuple[str, ...] = DEFECT_KINDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, masks, kinds): the `good` images, then `copies` defective copies of
    each (the donor texture from the next image)."""
    n, size = len(good), good.shape[-1]
    images, masks, drawn = [good], [np.zeros((n, size, size), dtype=np.uint8)], ["good"] * n
    for _ in range(copies):
        for i in range(n):
            image, mask, kind = with_defect(rng, good[i], good[(i + 1) % n], crack_opacity, kinds)
            images.append(image[None])
            masks.append(mask[None])
            drawn.append(kind if mask.any() else "good")
    drawn = np.array(drawn)
    return np.concatenate(images), (drawn != "good").astype(int), np.concatenate(masks), drawn


def resized(images: np.ndarray, size: int, masks: bool = False) -> np.ndarray:
    """`[N, C, S, S]` images (bilinear, antialiased like the loader's PIL resize) or `[N, S, S]`
    masks (nearest neighbour, as the loader resizes masks) at `size` a side."""
    tensor = torch.as_tensor(images[:, None] if masks else images, dtype=torch.float32)
    if masks:
        out = F.interpolate(tensor, size=(size, size), mode="nearest")[:, 0]
        return out.numpy().astype(images.dtype)
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
    return out.clamp(0, 255).numpy().astype(images.dtype)


def evaluate(
    config: dict[str, Any], fit: np.ndarray, val: tuple, maps_path: Path | None = None
) -> dict[str, Any]:
    """Fit one config and score the validation images; with `maps_path`, their anomaly maps are
    saved there (float32 `.npy`) for `results/paired_pixel_metrics.py`."""
    params = dict(config)
    name = params.pop("detector")
    images, labels, masks, kinds = val
    start = time.perf_counter()
    detector = create_detector(name, **params).fit(fit)
    fit_seconds = time.perf_counter() - start
    out = detector.predict(images)
    if maps_path is not None:
        np.save(maps_path, np.asarray(out["anomaly_map"], dtype=np.float32))
    metrics = image_and_pixel_metrics(out["score"], out["anomaly_map"], labels, masks, kinds)
    image_scores = np.asarray(out["score"], dtype=float).tolist()  # for paired comparisons
    return {"config": config, **metrics, "fit_seconds": fit_seconds, "image_scores": image_scores}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="one category folder")
    parser.add_argument("--image-size", type=int, default=256, help="loader resize, pixels")
    parser.add_argument(
        "--synthesize-size",
        type=int,
        default=None,
        help="load and add defects at this size, then resize to --image-size (default: the same)",
    )
    parser.add_argument("--configs", type=json.loads, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--defective-copies",
        type=int,
        default=0,
        help="keep every held-out image good and add this many defective copies of each "
        "(0: every second held-out image gets one defect)",
    )
    parser.add_argument(
        "--crack-opacity",
        type=float,
        default=1.0,
        help="least opacity of a synthetic crack, each drawn from [this, 1] (1: opaque cracks, "
        "the sets of earlier runs)",
    )
    parser.add_argument(
        "--defect-kinds",
        type=lambda text: tuple(text.split(",")),
        default=DEFECT_KINDS,
        help=f"comma-separated defect kinds drawn with equal odds, of "
        f"{','.join(KNOWN_KINDS)} (default: {','.join(DEFECT_KINDS)}, the sets of "
        "earlier runs)",
    )
    parser.add_argument(
        "--max-fit-images", type=int, default=None, help="fit on the first N fit images only"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--maps-dir",
        type=Path,
        default=None,
        help="save the masks and each config's maps there (masks.npy, <config index>.npy; about "
        "100 MB a config at 256 px) for a paired bootstrap of the pixel metrics",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not 0.0 < args.crack_opacity <= 1.0:  # before minutes of loading
        parser.error(f"--crack-opacity must be in (0, 1], got {args.crack_opacity}")
    unknown = sorted(set(args.defect_kinds) - set(KNOWN_KINDS))
    if unknown:
        parser.error(f"--defect-kinds: unknown {unknown}, expected {KNOWN_KINDS}")
    synthesize_size = args.synthesize_size or args.image_size
    train = load_mvtec(args.data_dir, "train", synthesize_size)
    fit, images, labels, masks, kinds = validation_set(
        train.X, args.seed, args.defective_copies, args.crack_opacity, args.defect_kinds
    )
    fit = fit[: args.max_fit_images]
    if synthesize_size != args.image_size:
        fit, images = resized(fit, args.image_size), resized(images, args.image_size)
        masks = resized(masks, args.image_size, masks=True)
    logging.info(
        "fit %d images, validation %d (%d with defects)", len(fit), len(images), labels.sum()
    )
    if args.maps_dir:
        args.maps_dir.mkdir(parents=True, exist_ok=True)
        np.save(args.maps_dir / "masks.npy", masks.astype(bool))
    rows = []
    for index, config in enumerate(args.configs):
        maps_path = args.maps_dir / f"{index}.npy" if args.maps_dir else None
        row = evaluate(config, fit, (images, labels, masks, kinds), maps_path)
        rows.append(row)
        by_kind = ", ".join(
            f"{kind} {figures['image_auroc']:.3f} (n={figures['n']})"
            for kind, figures in row["per_defect"].items()
        )
        print(
            f"{json.dumps(row['config'])}: image_auroc {row['image_auroc']:.3f} pixel_auroc "
            f"{row['pixel_auroc']:.3f} aupro {row['aupro']:.3f} fit {row['fit_seconds']:.0f}s; "
            f"image AUROC by kind: {by_kind}",
            flush=True,
        )
        if args.out:
            settings = {
                "image_size": args.image_size,
                "synthesize_size": synthesize_size,
                "defective_copies": args.defective_copies,
                "crack_opacity": args.crack_opacity,
                "defect_kinds": list(args.defect_kinds),
                "labels": labels.tolist(),
                "kinds": kinds.tolist(),
            }
            args.out.write_text(json.dumps({**settings, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
