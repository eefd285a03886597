"""Greedy k-center coreset speed: normalcy's `greedy_coreset` against anomalib's `KCenterGreedy`
on the same bank of patch features, in seconds per selected centre.

    python benchmarks/coreset_speed.py --anomalib-wheel anomalib-2.7.0-py3-none-any.whl
        [--data-dir CATEGORY] [--image-size 256] [--centres 200] [--anomalib-centres 20]
        [--out FILE]

The bank is PatchCore's (default params) patch features of the category's train/good images
(`--data-dir`), or Gaussian rows `--rows` x `--dim` without it. anomalib is not a dependency:
its two modules (`models/components/sampling/k_center_greedy.py` and
`models/components/dimensionality_reduction/random_projection.py`) are read straight from the
wheel (`pip download anomalib --no-deps`), so none of its package imports (lightning, ...) run.
Both select from a random start; anomalib first projects with its SparseRandomProjection(eps=0.9)
(the Johnson-Lindenstrauss dimension for the bank's row count), normalcy with a Gaussian
projection to `projection_dim` (128 by default); normalcy is timed at both dimensions. The
projection is timed separately from the selection loop, whose time per centre is the figure."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
import types
import zipfile
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from normalcy.detectors.coreset import greedy_coreset, random_projection

ANOMALIB_MODULES = {
    "anomalib.models.components.dimensionality_reduction": (
        "anomalib/models/components/dimensionality_reduction/random_projection.py"
    ),
    "anomalib.models.components.sampling.k_center_greedy": (
        "anomalib/models/components/sampling/k_center_greedy.py"
    ),
}


def anomalib_sampler(wheel: Path, folder: Path) -> type:
    """anomalib's `KCenterGreedy` class, its two modules loaded from the wheel by file."""
    with zipfile.ZipFile(wheel) as archive:
        for member in ANOMALIB_MODULES.values():
            archive.extract(member, folder)
    for name in ("anomalib", "anomalib.models", "anomalib.models.components"):
        sys.modules.setdefault(name, types.ModuleType(name))
    for name, member in ANOMALIB_MODULES.items():
        spec = importlib.util.spec_from_file_location(name, folder / member)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["anomalib.models.components.sampling.k_center_greedy"].KCenterGreedy


def patch_bank(data_dir: Path, image_size: int) -> torch.Tensor:
    """PatchCore's training patch features `[n_patches, D]` for the category's train/good."""
    from normalcy.data.mvtec import load_mvtec
    from normalcy.detectors import create_detector
    from normalcy.detectors.backbones import load_backbone
    from normalcy.detectors.preprocessing import fit_preprocessing

    images = load_mvtec(data_dir, "train", image_size).X
    detector = create_detector("patchcore")
    detector.preprocess = fit_preprocessing(detector.preprocessing, images)
    detector.extractor, _ = load_backbone(detector.backbone, detector.stages, detector.weights)
    patches = detector.patch_features(images)
    return patches.flatten(2).transpose(1, 2).reshape(-1, patches.shape[1]).contiguous()


def time_anomalib(sampler_class: type, bank: torch.Tensor, centres: int) -> dict[str, float]:
    sampler = sampler_class(embedding=bank, sampling_ratio=centres / len(bank))
    start = time.perf_counter()
    sampler.model.fit(bank)
    sampler.features = sampler.model.transform(bank)
    projection_seconds = time.perf_counter() - start
    sampler.reset_distances()
    index = torch.randint(high=len(bank), size=(1,)).squeeze()
    start = time.perf_counter()
    for _ in range(centres - 1):  # the body of KCenterGreedy.select_coreset_idxs
        sampler.update_distances(cluster_center=index)
        index = sampler.get_new_idx()
        sampler.min_distances.scatter_(0, index.unsqueeze(0).unsqueeze(1), 0.0)
    loop = time.perf_counter() - start
    return {
        "projection_dim": int(sampler.features.shape[1]),
        "projection_seconds": projection_seconds,
        "centres": centres,
        "seconds_per_centre": loop / (centres - 1),
    }


def time_normalcy(bank: torch.Tensor, centres: int, dim: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    projected = random_projection(bank, dim, generator)
    projection_seconds = time.perf_counter() - start
    start = time.perf_counter()
    greedy_coreset(projected, centres, generator)  # already projected: no second projection
    loop = time.perf_counter() - start
    return {
        "projection_dim": dim,
        "projection_seconds": projection_seconds,
        "centres": centres,
        "seconds_per_centre": loop / (centres - 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anomalib-wheel", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rows", type=int, default=682_000)
    parser.add_argument("--dim", type=int, default=152)
    parser.add_argument("--centres", type=int, default=200)
    parser.add_argument("--anomalib-centres", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.data_dir is not None:
        bank, source = patch_bank(args.data_dir, args.image_size), str(args.data_dir)
    else:
        bank = torch.randn(args.rows, args.dim, generator=torch.Generator().manual_seed(0))
        source = "gaussian"
    logging.info(
        "bank %s from %s; torch threads %d", list(bank.shape), source, torch.get_num_threads()
    )
    with TemporaryDirectory() as tmp:
        anomalib = time_anomalib(
            anomalib_sampler(args.anomalib_wheel, Path(tmp)), bank, args.anomalib_centres
        )
    rows = {
        "anomalib_kcenter_greedy": anomalib,
        "normalcy_dim128": time_normalcy(bank, args.centres, 128),
        "normalcy_same_dim": time_normalcy(bank, args.centres, anomalib["projection_dim"]),
    }
    print(f"\nbank {list(bank.shape)} ({source}), {torch.get_num_threads()} torch thread(s)")
    print("| sampler | projection dim | projection s | centres timed | s per centre | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        speedup = anomalib["seconds_per_centre"] / row["seconds_per_centre"]
        row["speedup_vs_anomalib"] = speedup
        print(
            f"| {name} | {row['projection_dim']} | {row['projection_seconds']:.1f} | "
            f"{row['centres']} | {row['seconds_per_centre']:.4f} | {speedup:.1f}x |"
        )
    if args.out:
        report = {
            "bank_shape": list(bank.shape),
            "source": source,
            "threads": torch.get_num_threads(),
            "results": rows,
        }
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
