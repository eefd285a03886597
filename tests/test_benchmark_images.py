"""The image benchmarks run end to end on a small synthetic MVTec-layout folder."""

import json
import re
import sys

import numpy as np
import pytest

from tests.image_folders import make_mvtec_folder
from tests.test_benchmarks import REPO, run_benchmark


def test_quality_images_writes_the_issue_s_json(tmp_path):
    make_mvtec_folder(tmp_path / "tiles", n_train=12, n_test_good=4)
    out = tmp_path / "quality.json"
    small = {"image_size": 32, "batch_size": 4}
    detector_params = {
        "patchcore": small,
        "padim": {**small, "random_channels": 16},
        "fastflow": {**small, "n_blocks": 2, "epochs": 2},
    }
    run = run_benchmark(
        "quality_images.py",
        *("--data-dir", tmp_path, "--image-size", "32", "--latency-images", "2"),
        *("--detector-params", json.dumps(detector_params), "--out", out),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["summary"]["default_detector"] in report["results"]["tiles"]
    for name in ("patchcore", "padim", "fastflow"):
        row = report["results"]["tiles"][name]
        for key in ("image_auroc", "image_auprc", "pixel_auroc", "aupro"):
            assert 0.0 <= row[key] <= 1.0, (name, key)
        assert row["fit_seconds"] > 0 and row["score_ms_per_image"] > 0
        assert row["uses_pretrained"] is True
        assert row["per_defect"] == {
            "hole": {"image_auroc": row["per_defect"]["hole"]["image_auroc"], "n": 2},
            "scratch": {"image_auroc": row["per_defect"]["scratch"]["image_auroc"], "n": 3},
        }
    assert "| tiles | patchcore |" in run.stdout


def test_validation_defects_come_with_their_masks():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from image_validation import validation_set

    images = np.full((20, 1, 64, 64), 120.0, dtype=np.float32)
    fit, val, labels, masks, kinds = validation_set(images, seed=0)
    assert len(fit) == 16 and len(val) == 4
    assert labels.tolist() == [0, 1, 0, 1] and kinds.tolist()[::2] == ["good", "good"]
    changed = np.abs(val[:, 0] - 120.0) > 1.0
    assert not changed[labels == 0].any()
    for i in np.flatnonzero(labels):
        assert masks[i].any() and changed[i][masks[i] == 1].mean() > 0.9


def test_every_validation_defect_kind_changes_the_pixels_its_mask_marks():
    """Each kind, the faint Perlin patch included, marks only pixels it changed, and every kind
    turns up among validation images."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from image_validation import DEFECT_KINDS, with_defect

    rng = np.random.default_rng(0)
    image = np.full((1, 64, 64), 120.0, dtype=np.float32)
    donor = rng.uniform(60, 180, size=(1, 64, 64)).astype(np.float32)
    seen = set()
    for _ in range(40):
        defective, mask, kind = with_defect(rng, image, donor)
        seen.add(kind)
        changed = np.abs(defective[0] - 120.0) > 1.0
        assert mask.any() and changed[mask == 1].mean() > 0.9, kind
        assert not changed[mask == 0].any() or kind in ("ellipse", "crack"), kind
    assert seen == set(DEFECT_KINDS)


def test_a_synthetic_crack_covers_the_same_share_of_the_image_at_any_size():
    """Loader sizes are compared on validation defects of the same relative size: a crack's
    width scales with the side, and resizing a defected set keeps its masks binary."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from image_validation import crack, resized

    small, large = (crack(np.random.default_rng(3), size) > 0.5 for size in (128, 256))
    assert 0.8 < large.mean() / small.mean() < 1.25
    masks = resized(np.stack([large, large]).astype(np.uint8), 64, masks=True)
    assert masks.shape == (2, 64, 64) and set(np.unique(masks)) == {0, 1}
    images = resized(np.full((2, 1, 256, 256), 200.0, dtype=np.float32), 64)
    assert images.shape == (2, 1, 64, 64) and np.allclose(images, 200.0)


def test_defective_copies_keep_every_held_out_image_good_beside_its_copies():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from image_validation import validation_set

    images = np.full((20, 1, 64, 64), 120.0, dtype=np.float32)
    fit, val, labels, masks, kinds = validation_set(images, seed=0, copies=2)
    assert len(fit) == 16 and len(val) == 12 and val.dtype == np.float32
    assert labels.tolist() == [0] * 4 + [1] * 8 and (kinds[:4] == "good").all()
    assert np.array_equal(val[:4], images[:4]) and not masks[:4].any()
    for i in range(4, 12):
        changed = np.abs(val[i, 0] - 120.0) > 1.0
        assert masks[i].any() and changed[masks[i] == 1].mean() > 0.9


def test_image_validation_runs_end_to_end_with_paired_copies(tmp_path):
    make_mvtec_folder(tmp_path / "tiles", n_train=15, n_test_good=2)
    out = tmp_path / "validation.json"
    config = {"detector": "padim", "image_size": 32, "random_channels": 16}
    run = run_benchmark(
        "image_validation.py",
        *("--data-dir", tmp_path / "tiles", "--image-size", "32", "--synthesize-size", "64"),
        *("--defective-copies", "1", "--configs", json.dumps([config]), "--out", out),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["image_size"], report["synthesize_size"]) == (32, 64)
    assert report["labels"] == [0, 0, 0, 1, 1, 1]  # 3 held out, each beside a defective copy
    (row,) = report["rows"]
    assert len(row["image_scores"]) == 6 and 0.0 <= row["image_auroc"] <= 1.0


def test_saved_maps_give_a_paired_bootstrap_of_the_pixel_metrics(tmp_path):
    """`--maps-dir` keeps each config's maps beside the masks; `paired_pixel_metrics.py` prints
    the exact pixel metrics of each, close binned ones, and the binned difference."""
    from normalcy.evaluation.pixel_metrics import pixel_metrics

    make_mvtec_folder(tmp_path / "tiles", n_train=15, n_test_good=2)
    configs = [
        {"detector": "padim", "image_size": 32, "random_channels": 16},
        {"detector": "padim", "image_size": 32, "random_channels": 4, "blur_sigma": 0.0},
    ]
    run = run_benchmark(
        "image_validation.py",
        *("--data-dir", tmp_path / "tiles", "--image-size", "32", "--defective-copies", "1"),
        *("--configs", json.dumps(configs), "--maps-dir", tmp_path / "maps"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    masks = np.load(tmp_path / "maps" / "masks.npy")
    maps = [np.load(tmp_path / "maps" / f"{index}.npy") for index in (0, 1)]
    assert masks.shape == maps[0].shape == maps[1].shape == (6, 32, 32) and masks[3:].any()
    exact = [pixel_metrics(m, masks) for m in maps]
    paired = run_benchmark(
        "results/paired_pixel_metrics.py",
        *(tmp_path / "maps" / "0.npy", tmp_path / "maps" / "1.npy", "--resamples", "50"),
    )
    assert paired.returncode == 0, paired.stderr[-3000:]
    lines = paired.stdout.splitlines()
    binned = {}
    for label, figures in zip("AB", exact, strict=True):
        line = next(row for row in lines if row.startswith(f"{label} "))
        for metric in ("pixel_auroc", "aupro"):
            match = re.search(rf"{metric} ([\d.]+) \(binned ([\d.]+)\)", line)
            assert float(match[1]) == pytest.approx(figures[metric], abs=1e-4)
            assert float(match[2]) == pytest.approx(figures[metric], abs=0.02)  # bins' ties
            binned[label, metric] = float(match[2])
    for metric in ("pixel_auroc", "aupro"):
        line = next(row for row in lines if row.startswith(f"{metric}:"))
        delta = float(re.search(r"A - B ([-+][\d.]+)", line)[1])
        assert delta == pytest.approx(binned["A", metric] - binned["B", metric], abs=2e-4)
        assert "(50 resamples, each with defective and good images)" in line


def test_a_faint_crack_keeps_its_mask_and_changes_the_pixels_less():
    """`--crack-opacity` blends a crack partly: the same draws give the same line and mask as
    an opaque crack, and the pixels under it move less (never more)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from image_validation import with_defect

    image = np.full((1, 64, 64), 120.0, dtype=np.float32)
    donor = np.full((1, 64, 64), 90.0, dtype=np.float32)
    fainter = 0
    for seed in range(40):
        opaque, opaque_mask, kind = with_defect(np.random.default_rng(seed), image, donor)
        faint, faint_mask, _ = with_defect(np.random.default_rng(seed), image, donor, 0.2)
        if kind != "crack":
            assert np.array_equal(faint, opaque), kind  # only cracks take the extra draw
            continue
        assert np.array_equal(faint_mask, opaque_mask) and faint_mask.any()
        under = faint_mask == 1
        moved, moved_opaque = np.abs(faint[0] - 120.0)[under], np.abs(opaque[0] - 120.0)[under]
        assert (moved <= moved_opaque + 1e-4).all() and (moved > 0).all()
        fainter += int(moved.mean() < 0.9 * moved_opaque.mean())
    assert fainter > 0


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--crack-opacity", "1.5", "--crack-opacity must be in (0, 1], got 1.5"),
        ("--defect-kinds", "crack,scratch", "--defect-kinds: unknown ['scratch']"),
    ],
)
def test_image_validation_refuses_a_bad_option_before_loading(tmp_path, option, value, message):
    make_mvtec_folder(tmp_path / "tiles", n_train=6, n_test_good=1)
    config = {"detector": "padim", "image_size": 32, "random_channels": 16}
    run = run_benchmark(
        "image_validation.py",
        *("--data-dir", tmp_path / "tiles", "--image-size", "32", option, value),
        *("--configs", json.dumps([config])),
    )
    assert run.returncode == 2 and message in run.stderr
    assert "loading" not in run.stderr  # refused before minutes of loading


def test_a_break_cuts_off_one_side_and_changes_only_its_mask():
    """The large kind, only when asked for: a dark region from the image's border inward,
    4-35% of the area, that changes exactly the pixels its mask marks."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from image_validation import with_defect

    rng = np.random.default_rng(0)
    image = np.full((1, 96, 96), 120.0, dtype=np.float32)
    for _ in range(10):
        defective, mask, kind = with_defect(rng, image, image, kinds=("break",))
        assert kind == "break" and 0.035 < mask.mean() < 0.36
        border = np.r_[mask[0], mask[-1], mask[:, 0], mask[:, -1]]
        assert border.any()  # broken off the edge, not a hole
        changed = np.abs(defective[0] - 120.0) > 1.0
        assert changed[mask == 1].mean() > 0.95 and not changed[mask == 0].any()
        assert defective[0][mask == 1].mean() < 60  # the dark background shows


def test_the_offline_centring_scan_centres_each_map_on_its_own_lower_quantile():
    """`results/centring_quantile_scan.py` chose the quantile on saved maps through the graph's
    `own_quantile`: each map less the lower value at that quantile of its own pixels."""
    sys.path.insert(0, str(REPO / "benchmarks" / "results"))
    from centring_quantile_scan import centred

    maps = np.random.default_rng(0).normal(size=(3, 7, 9))
    for quantile in (0.1, 0.5):
        expected = np.quantile(maps.reshape(3, -1), quantile, axis=1, method="lower")
        np.testing.assert_allclose(centred(maps, quantile), maps - expected[:, None, None])
    assert centred(maps, None) is maps
