"""Pixel AUROC, AUPRO and the per-defect table against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from normalcy.evaluation.pixel_metrics import (
    area_up_to,
    aupro,
    per_defect_metrics,
    pixel_auroc,
    pixel_metrics,
)

# One 1x8 image. Regions: R1 = pixels 0-1 (2 pixels), R2 = pixel 3; 5 defect-free pixels.
HAND_MASK = np.array([[[1, 1, 0, 1, 0, 0, 0, 0]]])
HAND_MAP = np.array([[[0.9, 0.6, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1]]])


def test_aupro_by_hand():
    # Thresholds from the top, (FPR, mean region overlap):
    #   0.9 (R1) -> (0, 0.25)   0.8 (clean) -> (0.2, 0.25)   0.7 (R2) -> (0.2, 0.75)
    #   0.6 (clean and R1, tied) -> (0.4, 1.0)
    # Area to 0.3: 0.2 * 0.25 + 0.1 * (0.75 + 0.875) / 2 = 0.13125 (0.875 interpolated at 0.3),
    # divided by 0.3 -> 0.4375.
    assert aupro(HAND_MAP, HAND_MASK) == pytest.approx(0.4375)


def test_pixel_auroc_by_hand_counts_ties_half():
    # Defect pixels 0.9, 0.7, 0.6 against clean 0.8, 0.6, 0.5, 0.4, 0.1:
    # 5 + 4 + (3 + 0.5) wins out of 15 pairs.
    assert pixel_auroc(HAND_MAP, HAND_MASK) == pytest.approx(12.5 / 15)
    assert pixel_auroc(HAND_MAP, HAND_MASK) == pytest.approx(
        roc_auc_score(HAND_MASK.ravel(), HAND_MAP.ravel())
    )


def test_regions_are_8_connected():
    # Diagonal neighbours join: one region of 3 pixels, of which the top-scoring one is 1/3.
    mask = np.array([[[1, 1, 0], [0, 0, 1], [0, 0, 0]]])
    score = np.zeros((1, 3, 3))
    score[0, 1, 2] = 1.0
    # (0, 1/3) then everything at once -> (1, 1); at 0.3 the overlap is 1/3 + 0.3 * 2/3.
    expected = 0.3 * (1 / 3 + (1 / 3 + 0.2)) / 2 / 0.3
    assert aupro(score, mask) == pytest.approx(expected)


def test_regions_never_join_across_images():
    mask = np.zeros((2, 2, 2), dtype=np.uint8)
    mask[0, 0, 0] = 1
    mask[1, 0, :] = 1  # same place in the next image: a separate region of 2 pixels
    score = np.zeros((2, 2, 2))
    score[0, 0, 0] = 1.0
    # (0, 1/2) -> (1, 1): two regions, mean overlap 1/2 (one region of 3 would give 1/3).
    assert aupro(score, mask) == pytest.approx((0.5 + 0.65) / 2)


def test_perfect_map_scores_one():
    rng = np.random.default_rng(0)
    mask = (rng.random((4, 16, 16)) > 0.9).astype(np.uint8)
    perfect = mask + rng.random(mask.shape) * 0.5
    assert pixel_auroc(perfect, mask) == pytest.approx(1.0)
    assert aupro(perfect, mask) == pytest.approx(1.0)


def test_inverted_and_constant_maps():
    rng = np.random.default_rng(1)
    mask = (rng.random((3, 10, 10)) > 0.8).astype(np.uint8)
    assert pixel_auroc(-mask.astype(float), mask) == pytest.approx(0.0)
    assert aupro(-mask.astype(float), mask) == pytest.approx(0.0)
    flat = np.zeros(mask.shape)
    assert pixel_auroc(flat, mask) == pytest.approx(0.5)
    # One threshold: (0, 0) -> (1, 1), so the overlap at FPR 0.3 is 0.3: area 0.045 / 0.3.
    assert aupro(flat, mask) == pytest.approx(0.15)


def test_fpr_limit_one_is_the_full_area():
    metrics = pixel_metrics(HAND_MAP, HAND_MASK, fpr_limit=1.0)
    # Curve (0,0) (0,.25) (.2,.25) (.2,.75) (.4,1) (.6,1) (.8,1) (1,1): area 0.05 + 0.175 + 0.6.
    assert metrics["aupro"] == pytest.approx(0.825)


def test_area_interpolates_inside_a_segment():
    x, y = np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0])
    assert area_up_to(x, y, 0.25) == pytest.approx(0.25 * 0.5 / 2)
    assert area_up_to(x, y, 0.5) == pytest.approx(0.25)


def test_no_defect_pixels_gives_nan():
    metrics = pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), dtype=np.uint8))
    assert np.isnan(metrics["pixel_auroc"]) and np.isnan(metrics["aupro"])


@pytest.mark.parametrize(
    ("maps", "masks", "message"),
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "same shape"),
        (np.zeros((4, 4)), np.zeros((4, 4)), r"\[n, h, w\]"),
        (np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)), "NaN"),
        (np.zeros((1, 2, 2)), np.full((1, 2, 2), 255), "binarize"),
    ],
)
def test_bad_inputs(maps, masks, message):
    with pytest.raises(ValueError, match=message):
        pixel_metrics(maps, masks)


def test_bad_fpr_limit():
    with pytest.raises(ValueError, match="fpr_limit=0"):
        aupro(HAND_MAP, HAND_MASK, fpr_limit=0)


def test_per_defect_table():
    defects = np.array(["good", "good", "good", "crack", "crack", "hole"])
    scores = np.array([0.1, 0.2, 0.5, 0.6, 0.15, 0.05])
    table = per_defect_metrics(scores, defects)
    assert set(table) == {"crack", "hole"}
    # crack 0.6 beats all 3 good; 0.15 beats one of 3: 4 of 6 pairs.
    assert table["crack"]["image_auroc"] == pytest.approx(4 / 6)
    assert table["crack"]["n"] == 2
    assert table["hole"]["image_auroc"] == pytest.approx(0.0)
    assert table["hole"]["image_auprc"] == pytest.approx(0.25)


def test_per_defect_table_needs_one_name_per_score():
    with pytest.raises(ValueError, match="one defect name per image score"):
        per_defect_metrics(np.zeros(3), np.array(["good", "crack"]))


def naive_aupro(maps, masks, fpr_limit):
    """One threshold at a time, straight from the definition (small inputs only)."""
    from scipy import ndimage

    regions = [
        region
        for image_mask in masks
        for labels, n in [ndimage.label(image_mask, structure=np.ones((3, 3)))]
        for region in (labels == k for k in range(1, n + 1))
    ]
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        fpr = (above & (masks == 0)).sum() / (masks == 0).sum()
        overlap = np.mean([(above[i][region]).mean() for i, region in _where(masks, regions)])
        points.append((fpr, overlap))
    x, y = np.array(points).T
    return area_up_to(x, y, fpr_limit) / fpr_limit


def _where(masks, regions):
    """(image index, region) pairs: each region belongs to the image whose mask holds it."""
    per_image = []
    for region in regions:
        i = next(i for i, m in enumerate(masks) if m[region].all() and region.any())
        per_image.append((i, region))
    return per_image


def test_aupro_matches_the_definition_on_random_maps():
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 12, 12), dtype=np.uint8)
    masks[0, 2:5, 2:6] = 1
    masks[0, 8:10, 8:9] = 1
    masks[2, 5:11, 1:3] = 1
    maps = np.round(rng.random(masks.shape) + masks * 0.4, 2)  # rounding makes ties
    for limit in (0.05, 0.3, 1.0):
        assert aupro(maps, masks, limit) == pytest.approx(naive_aupro(maps, masks, limit))
