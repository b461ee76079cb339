"""CRAFT's training targets: Gaussian heat maps warped into character and affinity boxes.

For every word the region map gets one 2-D isotropic Gaussian per character,
warped by a perspective transform onto the character's quadrilateral; the
affinity map gets one per pair of neighbouring characters, warped onto the
"affinity box" whose corners are the centres of the upper and lower triangles
of the two characters (the paper's Fig. 3). Overlaps take the maximum. Maps are
built at the network's output resolution (half the image), and a confidence
mask is 0 inside don't-care words (`###`) so they are left out of the loss.

Real word-level ground truth (ICDAR-2015) has no character boxes; like CRAFT
without its interim model, `character_boxes` splits a word box evenly along its
long axis by the number of characters.

All quadrilaterals are float arrays of shape (4, 2) holding (x, y) corners in
cyclic order, ICDAR's clockwise-from-top-left for words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

TEMPLATE_SIZE = 64
# The template's Gaussian has sigma = 1/5 of its side (value 0.044 at the middle of an
# edge), cut to the inscribed circle, and is warped onto boxes enlarged 1.5x (affinity
# boxes only across the text line), as in the CRAFT re-implementation whose maps match
# the paper's figures. With these, region >= 0.4 stays within each character and
# affinity >= 0.4 bridges neighbours, so true maps post-process into whole words.
DISTANCE_RATIO = 2.5
REGION_ENLARGE = 1.5
AFFINITY_ENLARGE = 1.5
_MIN_AREA = 1e-3  # px^2 at map scale: smaller boxes have no well-defined warp


@dataclass(frozen=True)
class Word:
    """One ground-truth word: its quadrilateral in image pixels and its transcription."""

    quad: np.ndarray  # (4, 2) float32
    text: str

    @property
    def dont_care(self) -> bool:
        # ICDAR marks illegible text "###"; an empty transcription is equally unusable.
        return self.text == "###" or not self.text.strip()


def gaussian_template(size: int = TEMPLATE_SIZE, distance_ratio: float = DISTANCE_RATIO) -> np.ndarray:
    """A (size, size) isotropic Gaussian peaking at 1 in the centre."""
    centre = (size - 1) / 2.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    distance = np.hypot(xs - centre, ys - centre) / (size / 2.0)
    heat = np.exp(-0.5 * (distance * distance_ratio) ** 2)
    return np.where(distance <= 1.0, heat, 0.0).astype(np.float32)


_TEMPLATE = gaussian_template()
_TEMPLATE_CORNERS = np.float32([[0, 0], [TEMPLATE_SIZE - 1, 0], [TEMPLATE_SIZE - 1, TEMPLATE_SIZE - 1], [0, TEMPLATE_SIZE - 1]])


def quad_area(quad: np.ndarray) -> float:
    """Unsigned area of a quadrilateral (shoelace formula)."""
    points = quad.tolist()  # plain floats: numpy's per-call overhead dominates for 4 points
    twice = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))
    return 0.5 * abs(twice)


def draw_gaussian(heat: np.ndarray, quad: np.ndarray) -> None:
    """Warp the Gaussian template onto `quad` and max it into `heat` in place.

    Only the quad's bounding rectangle (clipped to the map) is warped, so the
    cost follows the box size, not the map size.
    """
    height, width = heat.shape
    if quad_area(quad) < _MIN_AREA:
        return
    x0, y0 = np.floor(quad.min(axis=0)).astype(int)
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        return
    local = (quad - np.float32([x0, y0])).astype(np.float32)
    transform = cv2.getPerspectiveTransform(_TEMPLATE_CORNERS, local)
    warped = cv2.warpPerspective(_TEMPLATE, transform, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderValue=0)
    np.maximum(heat[y0:y1, x0:x1], warped, out=heat[y0:y1, x0:x1])


def character_boxes(quad: np.ndarray, count: int) -> np.ndarray:
    """Split a word quad into `count` equal character quads along its long axis.

    Each character quad is returned as (start-side1, end-side1, end-side2,
    start-side2) along the reading direction, so side 1 and side 2 are the two
    edges parallel to the text line (top and bottom for horizontal text).
    """
    count = max(1, count)
    tl, tr, br, bl = quad.astype(np.float32)
    steps = np.linspace(0.0, 1.0, count + 1, dtype=np.float32)[:, None]
    horizontal = np.linalg.norm(tr - tl) + np.linalg.norm(br - bl) >= np.linalg.norm(bl - tl) + np.linalg.norm(br - tr)
    if horizontal:
        side1, side2 = tl + (tr - tl) * steps, bl + (br - bl) * steps
    else:  # a vertical word reads from the top edge down
        side1, side2 = tl + (bl - tl) * steps, tr + (br - tr) * steps
    return np.stack([side1[:-1], side1[1:], side2[1:], side2[:-1]], axis=1)


def enlarge_box(quad: np.ndarray, factor: float) -> np.ndarray:
    """The quad scaled by `factor` about its centre."""
    centre = quad.mean(axis=0)
    return (centre + (quad - centre) * factor).astype(np.float32)


def enlarge_across(quad: np.ndarray, factor: float) -> np.ndarray:
    """A (side1 start, side1 end, side2 end, side2 start) quad scaled by `factor` across the text line only."""
    a, b, c, d = quad
    mid_ad, mid_bc = (a + d) / 2, (b + c) / 2
    return np.stack([mid_ad + (a - mid_ad) * factor, mid_bc + (b - mid_bc) * factor,
                     mid_bc + (c - mid_bc) * factor, mid_ad + (d - mid_ad) * factor]).astype(np.float32)


def affinity_boxes(chars: np.ndarray) -> np.ndarray:
    """Affinity quads between neighbouring characters (from `character_boxes`), shape (n-1, 4, 2)."""
    if len(chars) < 2:
        return np.zeros((0, 4, 2), np.float32)
    centres = chars.mean(axis=1)
    side1_centres = (chars[:, 0] + chars[:, 1] + centres) / 3.0  # centre of the triangle on side 1
    side2_centres = (chars[:, 3] + chars[:, 2] + centres) / 3.0
    return np.stack([side1_centres[:-1], side1_centres[1:], side2_centres[1:], side2_centres[:-1]], axis=1)


@dataclass
class TargetMaps:
    """Region and affinity heat maps and the confidence mask, all (H/2, W/2) float32."""

    region: np.ndarray
    affinity: np.ndarray
    mask: np.ndarray


def make_targets(words: Sequence[Word], image_height: int, image_width: int) -> TargetMaps:
    """The half-resolution target maps for `words` given in image pixels."""
    height, width = (image_height + 1) // 2, (image_width + 1) // 2
    region = np.zeros((height, width), np.float32)
    affinity = np.zeros((height, width), np.float32)
    mask = np.ones((height, width), np.float32)
    for word in words:
        quad = word.quad.astype(np.float32) * 0.5
        if word.dont_care:
            cv2.fillPoly(mask, [np.round(quad).astype(np.int32)], 0.0)
            continue
        chars = character_boxes(quad, len(word.text.strip()))
        for char in chars:
            draw_gaussian(region, enlarge_box(char, REGION_ENLARGE))
        for box in affinity_boxes(chars):
            draw_gaussian(affinity, enlarge_across(box, AFFINITY_ENLARGE))
    return TargetMaps(region, affinity, mask)
