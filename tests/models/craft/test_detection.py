"""Tests for map -> word-box post-processing (models.craft.postprocess) and the
ICDAR-style IoU matching (models.craft.evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.craft.data import CraftDataset, load_split
from models.craft.evaluation import MatchCounts, match_image, polygon_iou
from models.craft.postprocess import PostprocessThresholds, detect_words, order_clockwise
from models.craft.synthetic import write_synthetic
from models.craft.targets import Word, make_targets
from models.craft.task import to_image_coords


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.float32([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


# --------------------------------------------------------------------------
# IoU and matching on hand-computed boxes
# --------------------------------------------------------------------------


def test_iou_of_hand_computed_boxes() -> None:
    a = _rect(0, 0, 10, 10)
    assert polygon_iou(a, a) == pytest.approx(1.0)
    assert polygon_iou(a, _rect(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert polygon_iou(a, _rect(20, 20, 30, 30)) == 0.0
    diamond = np.float32([[5, 0], [10, 5], [5, 10], [0, 5]])  # area 50, inside the square
    assert polygon_iou(a, diamond) == pytest.approx(0.5)
    assert polygon_iou(a, _rect(3, 3, 3, 3)) == 0.0  # no area
    bow_tie = np.float32([[0, 0], [10, 10], [10, 0], [0, 10]])  # self-intersecting: repaired, not a crash
    assert 0.0 <= polygon_iou(a, bow_tie) <= 1.0


def test_matching_needs_iou_above_one_half() -> None:
    gt = [_rect(0, 0, 10, 10)]
    # IoU exactly 0.5 (a 10x10 box against a 10x20 one holding it) does not match; 0.6 does.
    assert match_image(gt, [False], [_rect(0, 0, 10, 20)]) == MatchCounts(0, 1, 1)
    assert match_image(gt, [False], [_rect(0, 0, 10, 10 / 0.6)]) == MatchCounts(1, 1, 1)


def test_matching_is_one_to_one() -> None:
    gt = [_rect(0, 0, 10, 10)]
    dets = [_rect(0, 0, 10, 11), _rect(0, 0, 10, 9)]
    counts = match_image(gt, [False], dets)
    assert counts == MatchCounts(matched=1, gt=1, detections=2)
    assert counts.precision == 0.5 and counts.recall == 1.0 and counts.hmean == pytest.approx(2 / 3)


def test_detections_on_dont_care_words_are_ignored_not_false_positives() -> None:
    gt = [_rect(0, 0, 10, 10), _rect(20, 0, 40, 10)]
    dont_care = [False, True]
    dets = [_rect(0, 0, 10, 10), _rect(22, 0, 38, 10), _rect(50, 50, 60, 60)]
    counts = match_image(gt, dont_care, dets)
    # The ### word neither needs finding nor punishes the box on it; the far box is a false positive.
    assert counts == MatchCounts(matched=1, gt=1, detections=2)
    # A box mostly outside a ### word still counts.
    assert match_image(gt, dont_care, [_rect(30, 0, 60, 10)]) == MatchCounts(0, 1, 1)


def test_counts_add_over_images_before_dividing() -> None:
    total = MatchCounts(3, 4, 3) + MatchCounts(0, 4, 5)
    assert total == MatchCounts(3, 8, 8)
    assert total.precision == total.recall == total.hmean == pytest.approx(3 / 8)
    assert MatchCounts().hmean == 0.0 and MatchCounts(0, 5, 0).precision == 0.0


def test_order_clockwise_starts_top_left() -> None:
    counter_clockwise = np.float32([[0, 0], [0, 10], [20, 10], [20, 0]])
    np.testing.assert_array_equal(order_clockwise(counter_clockwise), _rect(0, 0, 20, 10))
    np.testing.assert_array_equal(order_clockwise(np.roll(_rect(0, 0, 20, 10), 2, axis=0)), _rect(0, 0, 20, 10))


# --------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------


def test_two_words_on_true_maps_become_two_boxes_close_to_the_truth() -> None:
    words = [Word(_rect(20, 20, 100, 44), "ABCD"), Word(_rect(30, 70, 90, 94), "XYZ")]
    maps = make_targets(words, 128, 128)
    detections = detect_words(maps.region, maps.affinity)
    assert len(detections) == 2
    boxes = sorted((d.quad * 2 for d in detections), key=lambda q: q[0, 1])
    for box, word in zip(boxes, words):
        assert polygon_iou(box, word.quad) > 0.7
    assert all(d.score > 0.9 for d in detections)


def test_text_threshold_drops_weak_components_and_links_alone_are_not_words() -> None:
    region = np.zeros((32, 32), np.float32)
    affinity = np.zeros((32, 32), np.float32)
    region[4:10, 4:14] = 0.6  # text-like but never confident: dropped by text 0.7
    affinity[20:26, 4:20] = 0.9  # a link with no character: its region peak is 0
    region[20:26, 24:30] = 0.8
    region[29:31, 29:31] = 0.95  # 4 px: below the minimum area of 10
    detections = detect_words(region, affinity)
    assert len(detections) == 1 and detections[0].score == pytest.approx(0.8)
    assert len(detect_words(region, affinity, PostprocessThresholds(text=0.5))) == 2


def test_empty_maps_give_no_boxes_and_hmean_zero() -> None:
    empty = np.zeros((64, 64), np.float32)
    assert detect_words(empty, empty) == []
    assert match_image([_rect(0, 0, 10, 10)], [False], []).hmean == 0.0


# --------------------------------------------------------------------------
# The ceiling: true maps through post-processing and the evaluator
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def val_set(tmp_path_factory: pytest.TempPathFactory) -> CraftDataset:
    root = write_synthetic(tmp_path_factory.mktemp("craft") / "syn", train_images=2, test_images=40, image_size=128, seed=4)
    return CraftDataset(load_split(root, "test"), 128, augment=False, seed=0)


def _score_maps(dataset: CraftDataset, maps_of) -> MatchCounts:
    total = MatchCounts()
    for i, record in enumerate(dataset.records):
        item = dataset.item(i)
        region, affinity = maps_of(item)
        detections = [to_image_coords(d.quad, item.placement) for d in detect_words(region, affinity)]
        total += match_image([w.quad for w in record.words], [w.dont_care for w in record.words], detections)
    return total


def test_ground_truth_maps_reach_a_high_hmean(val_set: CraftDataset) -> None:
    counts = _score_maps(val_set, lambda item: (item.region.numpy(), item.affinity.numpy()))
    assert counts.gt > 60
    assert counts.hmean >= 0.85, counts


def test_ground_truth_maps_at_another_scale_still_match_in_image_pixels(val_set: CraftDataset) -> None:
    larger = CraftDataset(val_set.records, 192, augment=False, seed=0)
    assert _score_maps(larger, lambda item: (item.region.numpy(), item.affinity.numpy())).hmean >= 0.85


def test_empty_and_garbage_maps_score_zero(val_set: CraftDataset) -> None:
    zeros = np.zeros((64, 64), np.float32)
    assert _score_maps(val_set, lambda item: (zeros, zeros)).hmean == 0.0
    ones = np.ones((64, 64), np.float32)  # everything is text: one image-sized box
    counts = _score_maps(val_set, lambda item: (ones, ones))
    assert counts.matched == 0 and counts.detections == len(val_set)
    rng = np.random.default_rng(0)
    noise = _score_maps(val_set, lambda item: (rng.random((64, 64), np.float32), rng.random((64, 64), np.float32)))
    assert noise.matched == 0 and noise.hmean == 0.0
