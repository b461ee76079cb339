"""Reading ICDAR-2015 text-localisation data, and the dataset CRAFT trains on.

Layout under `data_dir` (either naming works; the second is what the official
zip files unpack to, from rrc.cvc.uab.es, challenge 4, task 1)::

    train_images/img_1.jpg ...   or  ch4_training_images/
    train_gts/gt_img_1.txt ...   or  ch4_training_localization_transcription_gt/
    test_images/img_1.jpg ...    or  ch4_test_images/
    test_gts/gt_img_1.txt ...    or  Challenge4_Test_Task1_GT/

Each `gt_img_N.txt` belongs to `img_N.jpg`: UTF-8 with a byte-order mark,
one word per line, `x1,y1,x2,y2,x3,y3,x4,y4,transcription`, the corners
clockwise from the top-left; the transcription may itself contain commas, and
`###` marks text too blurred to read (don't care). The test split is the
validation split here (ICDAR-2015 has no separate one).

`CraftDataset` yields (image, region map, affinity map, confidence mask): the
image letterboxed (or, with augmentation, randomly scaled and placed) into an
`image_size` square, and the targets of `models.craft.targets` at half that.
Augmentation is a pure function of (seed, epoch, index), so a resumed run
sees the very samples an uninterrupted one would.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from models.craft.targets import Word, make_targets
from raylab.datasets import DataError  # noqa: F401  (the one data error every model raises)

IMAGENET_MEAN = np.float32([0.485, 0.456, 0.406])
IMAGENET_STD = np.float32([0.229, 0.224, 0.225])
SPLIT_FOLDERS = {
    "train": (("train_images", "train_gts"), ("ch4_training_images", "ch4_training_localization_transcription_gt")),
    "test": (("test_images", "test_gts"), ("ch4_test_images", "Challenge4_Test_Task1_GT")),
}
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_COORDINATES = 8


@dataclass(frozen=True)
class ImageRecord:
    """One image and its parsed ground truth."""

    image: Path
    gt: Path
    words: tuple[Word, ...]


def parse_gt_line(line: str, path: Path, number: int) -> Word:
    """One `x1,y1,...,x4,y4,transcription` line; the transcription keeps its commas."""
    fields = line.split(",", _COORDINATES)
    if len(fields) <= _COORDINATES:
        raise DataError(
            f"{path} line {number} is malformed: expected 8 coordinates and a transcription, "
            f"found {len(fields)} comma-separated field(s)."
        )
    try:
        coords = [float(value) for value in fields[:_COORDINATES]]
    except ValueError:
        bad = next(v for v in fields[:_COORDINATES] if not _is_number(v))
        raise DataError(f"{path} line {number} is malformed: coordinate {bad.strip()!r} is not a number.") from None
    if not all(np.isfinite(coords)):
        raise DataError(f"{path} line {number} is malformed: a coordinate is not finite.")
    return Word(np.float32(coords).reshape(4, 2), fields[_COORDINATES])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_gt_file(path: Path) -> tuple[Word, ...]:
    """Every word of one ground-truth file (BOM optional, CRLF or LF line ends)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"The ground-truth file {path} could not be read ({exc.strerror or exc}).") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"The ground-truth file {path} is not UTF-8 text (byte {exc.start}).") from None
    return tuple(
        parse_gt_line(line, path, number)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    )


def _natural_key(path: Path) -> tuple:
    # img_2 before img_10, as the files are numbered.
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def split_folders(data_dir: Path, split: str) -> tuple[Path, Path]:
    """(images folder, ground-truth folder) of `split` ("train" or "test") under `data_dir`."""
    for images, gts in SPLIT_FOLDERS[split]:
        if (data_dir / images).is_dir():
            return data_dir / images, data_dir / gts
    names = " or ".join(images for images, _ in SPLIT_FOLDERS[split])
    raise DataError(f"The {split} image folder is missing: {data_dir} has no {names}.")


def load_split(data_dir: str | Path, split: str) -> tuple[ImageRecord, ...]:
    """Every image of a split with its parsed ground truth; any problem is a DataError naming the file."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"The dataset folder {data_dir} does not exist or is not a directory.")
    images_dir, gts_dir = split_folders(data_dir, split)
    if not gts_dir.is_dir():
        raise DataError(f"The {split} ground-truth folder {gts_dir} is missing.")
    images = sorted((p for p in images_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES), key=_natural_key)
    if not images:
        raise DataError(f"The {split} image folder {images_dir} holds no .jpg or .png images.")
    records = []
    for image in images:
        gt = gts_dir / f"gt_{image.stem}.txt"
        if not gt.is_file():
            raise DataError(f"The ground-truth file {gt} for image {image} is missing.")
        records.append(ImageRecord(image, gt, parse_gt_file(gt)))
    return tuple(records)


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file."""
    pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if pixels is None:
        raise DataError(f"The image file {path} is missing or could not be decoded.")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def letterbox_scale(height: int, width: int, size: int) -> float:
    """Scale that fits the longer side of an image into `size`."""
    return size / max(height, width)


@dataclass(frozen=True)
class Placement:
    """How an image was put on the square canvas: canvas = image * scale + (dx, dy)."""

    scale: float
    dx: int
    dy: int


@dataclass(frozen=True)
class CraftSample:
    image: torch.Tensor  # (3, S, S) normalised
    region: torch.Tensor  # (S/2, S/2)
    affinity: torch.Tensor  # (S/2, S/2)
    mask: torch.Tensor  # (S/2, S/2), 0 inside don't-care words
    placement: Placement


class CraftDataset(torch.utils.data.Dataset):
    """(image (3,S,S), region (S/2,S/2), affinity (S/2,S/2), mask (S/2,S/2)) float32 tensors.

    Without augmentation an image is scaled so its longer side is S and placed at
    the top-left (the rest is padding of mean colour, 0 after normalisation).
    With it, the scale is further multiplied by a random factor in
    [min_scale, max_scale] and the image is placed at a random offset (cropped
    where it overflows), with a mild brightness/contrast jitter.
    """

    def __init__(
        self, records: Sequence[ImageRecord], image_size: int, augment: bool, seed: int,
        min_scale: float = 0.75, max_scale: float = 1.25,
    ) -> None:
        if image_size % 2:
            raise ValueError(f"image_size must be even, got {image_size}.")
        self.records = tuple(records)
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.min_scale, self.max_scale = min_scale, max_scale
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def placement(self, height: int, width: int, rng: np.random.Generator | None = None) -> Placement:
        scale = letterbox_scale(height, width, self.image_size)
        if rng is None:
            return Placement(scale, 0, 0)
        scale *= rng.uniform(self.min_scale, self.max_scale)
        new_w, new_h = round(width * scale), round(height * scale)
        # Offsets range over every placement that keeps the canvas overlapping the image.
        dx = int(rng.integers(min(0, self.image_size - new_w), max(0, self.image_size - new_w) + 1))
        dy = int(rng.integers(min(0, self.image_size - new_h), max(0, self.image_size - new_h) + 1))
        return Placement(scale, dx, dy)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.item(i)
        return item.image, item.region, item.affinity, item.mask

    def item(self, i: int) -> "CraftSample":
        """Sample `i` with the placement that maps its image onto the canvas."""
        index = range(len(self.records))[i]
        record = self.records[index]
        pixels = read_rgb(record.image).astype(np.float32) / 255.0
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.augment else None
        where = self.placement(*pixels.shape[:2], rng)
        if rng is not None:
            pixels = np.clip((pixels - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.1, 0.1), 0.0, 1.0)
        canvas = self._place(pixels, where)
        words = [Word(w.quad * where.scale + np.float32([where.dx, where.dy]), w.text) for w in record.words]
        maps = make_targets(words, self.image_size, self.image_size)
        image = torch.from_numpy(np.ascontiguousarray(((canvas - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)))
        return CraftSample(image, torch.from_numpy(maps.region), torch.from_numpy(maps.affinity), torch.from_numpy(maps.mask), where)

    def _place(self, pixels: np.ndarray, where: Placement) -> np.ndarray:
        size = self.image_size
        height, width = pixels.shape[:2]
        new_w, new_h = max(1, round(width * where.scale)), max(1, round(height * where.scale))
        if (new_w, new_h) != (width, height):
            pixels = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_AREA if where.scale < 1 else cv2.INTER_LINEAR)
        canvas = np.empty((size, size, 3), np.float32)
        canvas[:] = IMAGENET_MEAN
        x0, y0 = max(0, where.dx), max(0, where.dy)
        x1, y1 = min(size, where.dx + new_w), min(size, where.dy + new_h)
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = pixels[y0 - where.dy:y1 - where.dy, x0 - where.dx:x1 - where.dx]
        return canvas
