"""From CRAFT's score maps to word boxes (the reference's `getDetBoxes`, re-derived).

    detections = detect_words(region, affinity, PostprocessThresholds())
    boxes = [d.quad * 2 / image_scale for d in detections]   # back to image pixels

A word is a connected component of (region >= low_text) OR (affinity >=
link_threshold), 4-connected. Components smaller than `min_area` pixels or
whose region peak is below `text_threshold` are dropped (noise, or links with
no character). The component minus its link-only pixels is dilated in
proportion to its thickness (character maps only cover the middle of each
character) and its minimum-area rectangle is the word box, in map pixels; the
maps are at half the image resolution, so callers scale by 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

MIN_COMPONENT_AREA = 10
# Rectangles within 10% of square get an arbitrary angle from minAreaRect;
# their axis-aligned box is the stable choice (as in the reference).
_SQUARE_TOLERANCE = 0.1


@dataclass(frozen=True)
class PostprocessThresholds:
    """CRAFT's published defaults."""

    text: float = 0.7  # a word needs a region peak at least this high
    link: float = 0.4  # affinity at or above this joins characters
    low_text: float = 0.4  # region at or above this is text


@dataclass(frozen=True)
class Detection:
    quad: np.ndarray  # (4, 2) float32, clockwise from the top-left corner, map pixels
    score: float  # the region peak inside the word


def order_clockwise(quad: np.ndarray) -> np.ndarray:
    """The same quadrilateral, clockwise on screen (y down), starting at the corner nearest the top-left."""
    quad = np.asarray(quad, np.float32)
    x, y = quad[:, 0], quad[:, 1]
    if float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) < 0:  # counter-clockwise on screen
        quad = quad[::-1]
    start = int(np.argmin(quad.sum(axis=1)))
    return np.roll(quad, -start, axis=0)


def _component_box(pixels: np.ndarray) -> np.ndarray:
    """Minimum-area rectangle around (x, y) pixel coordinates."""
    box = cv2.boxPoints(cv2.minAreaRect(pixels.astype(np.float32)))
    side_a, side_b = np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[1] - box[2])
    if abs(1.0 - max(side_a, side_b) / (min(side_a, side_b) + 1e-5)) <= _SQUARE_TOLERANCE:
        (x0, y0), (x1, y1) = pixels.min(axis=0), pixels.max(axis=0)
        box = np.float32([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return order_clockwise(box)


def detect_words(
    region: np.ndarray, affinity: np.ndarray, thresholds: PostprocessThresholds = PostprocessThresholds(),
    min_area: int = MIN_COMPONENT_AREA,
) -> list[Detection]:
    """Word boxes (map pixels) in two (h, w) score maps."""
    region = np.asarray(region, np.float32)
    affinity = np.asarray(affinity, np.float32)
    text_on = region >= thresholds.low_text
    link_on = affinity >= thresholds.link
    count, labels, stats, _ = cv2.connectedComponentsWithStats((text_on | link_on).astype(np.uint8), connectivity=4)
    height, width = region.shape
    link_only = link_on & ~text_on
    detections = []
    for k in range(1, count):
        area = int(stats[k, cv2.CC_STAT_AREA])
        if area < min_area:
            continue
        x, y, w, h = (int(v) for v in stats[k, :4])
        grow = int(math.sqrt(area * min(w, h) / (w * h)) * 2)
        # Everything happens in the component's window grown by the dilation margin, so an
        # untrained model's thousands of specks cost their own size, not the map's, each.
        x0, y0 = max(0, x - grow), max(0, y - grow)
        x1, y1 = min(width, x + w + grow + 1), min(height, y + h + grow + 1)
        component = labels[y0:y1, x0:x1] == k
        peak = float(region[y0:y1, x0:x1][component].max())
        if peak < thresholds.text:
            continue
        segment = (component & ~link_only[y0:y1, x0:x1]).astype(np.uint8)
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (1 + grow, 1 + grow))
        ys, xs = np.nonzero(cv2.dilate(segment, kernel))
        if len(xs) == 0:
            continue
        detections.append(Detection(_component_box(np.stack([xs + x0, ys + y0], axis=1)), peak))
    return detections
