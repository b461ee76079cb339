"""A synthetic text-detection dataset written in the ICDAR-2015 on-disk format.

    root = write_synthetic(cache_dir("craft-synthetic", "..."), train_images=800, test_images=100)
    records = models.craft.data.load_split(root, "train")       # the real loader reads it

Each `image_size` px JPEG holds 2-5 words of 2-5 glyphs (uppercase letters
and digits, now and then a comma inside a word so transcriptions carry commas)
on a blotchy background with distractor strokes and shapes. Glyphs are drawn
one per fixed-width cell, so splitting a word box evenly by its character
count — what the loader does for real ICDAR words — gives the true character
boxes. Words are rotated by up to 30 degrees about half of the time. About one
word in seven is drawn faint and blurred and labelled `###` (don't care), as
illegible words are in ICDAR-2015. Ground-truth files are UTF-8 with a BOM and
CRLF line ends like the real ones, corners clockwise from the text's top-left.

The output is a pure function of the arguments. It is written into a temporary
sibling folder and renamed into place, so concurrent writers never see half a
dataset, and a complete dataset with the same arguments is reused as is.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from shapely.geometry import Polygon

from raylab.datasets import MARKER_NAME, write_once

GENERATOR_VERSION = 2
GLYPHS = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX)
_DONT_CARE_FRACTION = 0.15
_COMMA_FRACTION = 0.08
_ROTATED_FRACTION = 0.5
_MAX_ANGLE_DEG = 30.0
_JPEG_QUALITY = 90
_PLACEMENT_TRIES = 40
_MAX_INK_WIDTH = 0.8  # of a glyph's cell


def _marker(train_images: int, test_images: int, image_size: int, seed: int) -> dict[str, object]:
    return {"generator": "craft-synthetic", "version": GENERATOR_VERSION, "train_images": train_images,
            "test_images": test_images, "image_size": image_size, "seed": seed}


def write_synthetic(root: str | Path, train_images: int = 800, test_images: int = 100, image_size: int = 128, seed: int = 0) -> Path:
    """Write (or reuse) the dataset at `root`; returns `root`."""
    if train_images < 1 or test_images < 1:
        raise ValueError("train_images and test_images must be at least 1.")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 px, got {image_size}.")
    expected = _marker(train_images, test_images, image_size, seed)

    def write(staging: Path) -> None:
        for split, count, split_id in (("train", train_images, 0), ("test", test_images, 1)):
            _write_split(staging, split, count, image_size, seed, split_id)

    return write_once(root, expected, write)


def _write_split(root: Path, split: str, count: int, size: int, seed: int, split_id: int) -> None:
    images_dir, gts_dir = root / f"{split}_images", root / f"{split}_gts"
    images_dir.mkdir(parents=True)
    gts_dir.mkdir()
    for k in range(1, count + 1):
        rng = np.random.default_rng([seed, split_id, k])
        pixels, words = render_image(rng, size)
        cv2.imwrite(str(images_dir / f"img_{k}.jpg"), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        lines = [",".join(str(int(v)) for v in quad.reshape(-1)) + "," + text for quad, text in words]
        (gts_dir / f"gt_img_{k}.txt").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))


def render_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """(H, W, 3) uint8 RGB pixels and [(integer quad (4, 2), transcription)] of one image."""
    pixels = _background(rng, size)
    placed: list[Polygon] = []
    words: list[tuple[np.ndarray, str]] = []
    for _ in range(int(rng.integers(2, 6))):
        word = _place_word(rng, size, placed)
        if word is None:
            continue
        quad, text, cell_w, cell_h, transform = word
        dont_care = rng.random() < _DONT_CARE_FRACTION
        draw_word(pixels, rng, text, cell_w, cell_h, transform, faint=dont_care)
        words.append((np.round(quad).astype(np.int32), "###" if dont_care else text))
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * 6.0
    return np.clip(pixels + noise, 0, 255).astype(np.uint8), words


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(40, 215, size=(4, 4, 3)).astype(np.float32)
    pixels = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    # Strokes and blobs that are not text, so "anything with edges" is not a winning rule.
    for _ in range(int(rng.integers(1, 4))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        p0, p1 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        if rng.random() < 0.5:
            cv2.line(pixels, tuple(int(v) for v in p0), tuple(int(v) for v in p1), colour, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            cv2.circle(pixels, tuple(int(v) for v in p0), int(rng.integers(4, size // 6)), colour, -1, cv2.LINE_AA)
    return np.clip(pixels, 0, 255)


def _random_text(rng: np.random.Generator) -> str:
    chars = [GLYPHS[int(i)] for i in rng.integers(0, len(GLYPHS), int(rng.integers(2, 6)))]
    if len(chars) >= 3 and rng.random() < _COMMA_FRACTION:
        chars[int(rng.integers(1, len(chars) - 1))] = ","
    return "".join(chars)


def _place_word(rng: np.random.Generator, size: int, placed: list[Polygon]):
    """A non-overlapping position for a new word, or None after enough tries."""
    for _ in range(_PLACEMENT_TRIES):
        text = _random_text(rng)
        cell_h = float(rng.uniform(0.1, 0.17) * size)
        cell_w = cell_h * float(rng.uniform(0.6, 0.8))
        width = cell_w * len(text)
        angle = float(rng.uniform(-_MAX_ANGLE_DEG, _MAX_ANGLE_DEG)) if rng.random() < _ROTATED_FRACTION else 0.0
        centre = rng.uniform(0.1 * size, 0.9 * size, 2)
        # Word frame -> image: rotate about the word's centre, then move it to `centre`.
        cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        transform = np.float32([[cos, -sin, 0], [sin, cos, 0]])
        transform[:, 2] = centre - transform[:, :2] @ np.float32([width / 2, cell_h / 2])
        corners = np.float32([[0, 0], [width, 0], [width, cell_h], [0, cell_h]])
        quad = corners @ transform[:, :2].T + transform[:, 2]
        if quad.min() < 1 or quad.max() > size - 2:
            continue
        polygon = Polygon(quad)
        if any(polygon.buffer(2).intersects(other) for other in placed):
            continue
        placed.append(polygon)
        return quad, text, cell_w, cell_h, transform
    return None


def _upsampling(cell_h: float) -> int:
    # Small glyphs are drawn 4x larger and averaged down for clean edges; big ones need less.
    return 4 if cell_h < 32 else max(1, round(128 / cell_h))


def _glyph(char: str, cell_w: float, cell_h: float, font: int, thickness: int, up: int) -> np.ndarray:
    """A (cell_h, cell_w) x `up` uint8 ink mask with `char` centred in it."""
    w, h = max(1, round(cell_w * up)), max(1, round(cell_h * up))
    scale = 0.62 * h / 22.0  # Hershey capitals are ~22 px tall at scale 1
    canvas = np.zeros((h * 2, w * 2), np.uint8)
    cv2.putText(canvas, char, (w // 2, int(h * 1.4)), font, scale, 255, thickness * up, cv2.LINE_AA)
    ys, xs = np.nonzero(canvas)
    cell = np.zeros((h, w), np.uint8)
    if len(xs):
        ink = canvas[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        # Wide glyphs (W, M) are shrunk to keep a margin, so no ink crosses into a neighbour's cell.
        fit = min(1.0, _MAX_INK_WIDTH * w / ink.shape[1], h / ink.shape[0])
        if fit < 1.0:
            ink = cv2.resize(ink, (max(1, int(ink.shape[1] * fit)), max(1, int(ink.shape[0] * fit))), interpolation=cv2.INTER_AREA)
        # Capitals and digits are centred; a comma sits on the baseline like in print.
        top = (h - ink.shape[0]) // 2 if char != "," else int(h * 0.81) - ink.shape[0] // 2
        top = min(max(top, 0), h - ink.shape[0])
        left = (w - ink.shape[1]) // 2
        cell[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    return cell


def draw_word(pixels: np.ndarray, rng: np.random.Generator, text: str, cell_w: float, cell_h: float,
               transform: np.ndarray, faint: bool) -> None:
    """Draw `text` one glyph per `cell_w` x `cell_h` cell; `transform` (2x3) maps the word's frame into `pixels`."""
    font = _FONTS[int(rng.integers(0, len(_FONTS)))]
    thickness = int(rng.integers(1, 3))
    up = _upsampling(cell_h)
    glyphs = [_glyph(c, cell_w, cell_h, font, thickness, up) for c in text]
    # Cells are placed by their real-valued offsets, so the word stays monospaced at any size.
    up_w = sum(g.shape[1] for g in glyphs)
    mask = np.zeros((glyphs[0].shape[0], max(up_w, round(cell_w * up * len(text)))), np.uint8)
    for i, glyph in enumerate(glyphs):
        x = round(i * cell_w * up)
        mask[:, x:x + glyph.shape[1]] = np.maximum(mask[:, x:x + glyph.shape[1]], glyph[:, :mask.shape[1] - x])
    # Down to word-frame pixels by area averaging (warpAffine alone would alias), then into the image.
    small = cv2.resize(mask, (max(1, round(cell_w * len(text))), max(1, round(cell_h))), interpolation=cv2.INTER_AREA)
    # Only the word's bounding window (plus a blur margin) is warped and blended.
    corners = np.float32([[0, 0], [small.shape[1], 0], [small.shape[1], small.shape[0]], [0, small.shape[0]]])
    spots = corners @ transform[:, :2].T + transform[:, 2]
    x0, y0 = np.maximum(np.floor(spots.min(axis=0)).astype(int) - 4, 0)
    x1, y1 = np.minimum(np.ceil(spots.max(axis=0)).astype(int) + 5, [pixels.shape[1], pixels.shape[0]])
    if x1 <= x0 or y1 <= y0:
        return
    shifted = transform.copy()
    shifted[:, 2] -= np.float32([x0, y0])
    alpha = cv2.warpAffine(small, shifted, (int(x1 - x0), int(y1 - y0)), flags=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    if faint:
        alpha = cv2.GaussianBlur(alpha, (0, 0), 1.2) * 0.45
    window = pixels[y0:y1, x0:x1]
    local = window[alpha > 0.1].mean(axis=0) if (alpha > 0.1).any() else window.mean(axis=(0, 1))
    # Ink contrasts with what is under it: dark text on light ground and vice versa.
    ink = rng.uniform(0, 50, 3) if local.mean() > 128 else rng.uniform(205, 255, 3)
    window[:] = window * (1 - alpha[..., None]) + ink * alpha[..., None]
