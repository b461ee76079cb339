"""ICDAR-2015-style detection scoring: one-to-one matching at IoU > 0.5 with don't-care words.

    counts = match_image(gt_quads, gt_dont_care, det_quads)
    total = counts + other_counts                      # sum over images (and workers)
    total.precision, total.recall, total.hmean

As in the competition's evaluation script (rrc.cvc.uab.es, challenge 4, task 1):
a detection that lies mostly (> 50 % of its own area) inside a don't-care
(`###`) ground-truth box is itself don't-care — neither a hit nor a false
positive; then ground-truth and detection boxes are matched greedily, each at
most once, in ground-truth then detection order, when their polygon IoU is
above 0.5. Precision = matched / cared-for detections, recall = matched /
cared-for ground truth, both summed over the whole dataset before dividing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from shapely.geometry import Polygon

IOU_THRESHOLD = 0.5
DONT_CARE_OVERLAP = 0.5


@dataclass(frozen=True)
class MatchCounts:
    """What precision, recall and H-mean are computed from; add them across images."""

    matched: int = 0
    gt: int = 0  # cared-for ground-truth words
    detections: int = 0  # cared-for detections

    def __add__(self, other: "MatchCounts") -> "MatchCounts":
        return MatchCounts(self.matched + other.matched, self.gt + other.gt, self.detections + other.detections)

    @property
    def precision(self) -> float:
        return self.matched / self.detections if self.detections else 0.0

    @property
    def recall(self) -> float:
        return self.matched / self.gt if self.gt else 0.0

    @property
    def hmean(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _polygon(quad: np.ndarray) -> Polygon:
    polygon = Polygon(np.asarray(quad, np.float64).reshape(-1, 2))
    # A self-intersecting (bow-tie) quad is invalid in shapely; buffer(0) repairs it.
    return polygon if polygon.is_valid else polygon.buffer(0)


def polygon_iou(a: np.ndarray | Polygon, b: np.ndarray | Polygon) -> float:
    """Intersection over union of two polygons (0 when either has no area)."""
    pa = a if isinstance(a, Polygon) else _polygon(a)
    pb = b if isinstance(b, Polygon) else _polygon(b)
    union = pa.area + pb.area
    if pa.area <= 0 or pb.area <= 0:
        return 0.0
    inter = pa.intersection(pb).area
    return inter / (union - inter) if union - inter > 0 else 0.0


def match_image(gt_quads: Sequence[np.ndarray], gt_dont_care: Sequence[bool], det_quads: Sequence[np.ndarray]) -> MatchCounts:
    """Match one image's detections to its ground truth."""
    gts = [_polygon(q) for q in gt_quads]
    dets = [_polygon(q) for q in det_quads]
    ignored_gts = [g for g, dc in zip(gts, gt_dont_care) if dc]
    cared_gts = [g for g, dc in zip(gts, gt_dont_care) if not dc]
    cared_dets = []
    for det in dets:
        if det.area > 0 and any(det.intersection(g).area / det.area > DONT_CARE_OVERLAP for g in ignored_gts):
            continue
        cared_dets.append(det)
    gt_taken = [False] * len(cared_gts)
    det_taken = [False] * len(cared_dets)
    matched = 0
    for i, gt in enumerate(cared_gts):
        for j, det in enumerate(cared_dets):
            if gt_taken[i] or det_taken[j]:
                continue
            if polygon_iou(gt, det) > IOU_THRESHOLD:
                gt_taken[i] = det_taken[j] = True
                matched += 1
    return MatchCounts(matched, len(cared_gts), len(cared_dets))
