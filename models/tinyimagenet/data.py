"""Reading the TinyImageNet-200 folder layout, a deterministic augmenting
Dataset over it, and a generator for small synthetic datasets in that layout.

Layout under a root folder (as distributed by Stanford)::

    wnids.txt                    one wnid per line; its order defines class indices
    words.txt                    "<wnid>\\t<human words>" lines (optional here)
    train/<wnid>/images/*.JPEG
    val/images/*.JPEG
    val/val_annotations.txt      "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" lines

Train and val labels both come from the wnids.txt order.  Pointing an
ImageFolder at val/ instead sees a single class folder ("images"), which is the
0.5 %-accuracy bug this module exists to prevent.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raylab.datasets import DataError, write_once

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PADDING = 4

_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
_VAL_ANNOTATION_FIELDS = 6


# --------------------------------------------------------------------------
# Index of the folder layout
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyImageNetIndex:
    """Every labelled image of a TinyImageNet-style folder.

    `words` maps each wnid of `wnids` to its human-readable name (the wnid
    itself when words.txt has no entry).
    """

    root: Path
    wnids: tuple[str, ...]
    words: dict[str, str]
    train: tuple[tuple[Path, int], ...]
    val: tuple[tuple[Path, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.wnids)


def load_index(root: str | Path) -> TinyImageNetIndex:
    """Index the dataset under `root`, raising DataError on any problem."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset root {root} does not exist or is not a directory.")
    wnids = _read_wnids(root / "wnids.txt")
    class_of = {wnid: index for index, wnid in enumerate(wnids)}
    return TinyImageNetIndex(
        root=root,
        wnids=wnids,
        words=_read_words(root / "words.txt", wnids),
        train=_index_train(root / "train", wnids),
        val=_index_val(root / "val", class_of),
    )


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """Non-blank lines of `path` with their 1-based line numbers."""
    if not path.is_file():
        raise DataError(f"The {what} file {path} is missing.")
    with path.open(encoding="utf-8") as f:
        numbered = [(number, line.rstrip("\r\n")) for number, line in enumerate(f, start=1)]
    return [(number, line) for number, line in numbered if line.strip()]


def _read_wnids(path: Path) -> tuple[str, ...]:
    first_seen: dict[str, int] = {}
    for number, line in _read_lines(path, "class list"):
        wnid = line.strip()
        if wnid in first_seen:
            raise DataError(
                f"{path} line {number} repeats wnid {wnid!r} already listed on line {first_seen[wnid]}."
            )
        first_seen[wnid] = number
    if not first_seen:
        raise DataError(f"The class list {path} is empty.")
    return tuple(first_seen)


def _read_words(path: Path, wnids: tuple[str, ...]) -> dict[str, str]:
    # words.txt only supplies display names, so a dataset without it is usable.
    words: dict[str, str] = {}
    if path.is_file():
        for number, line in _read_lines(path, "class names"):
            fields = line.split("\t", 1)
            if len(fields) != 2:
                raise DataError(f"{path} line {number} is malformed: expected '<wnid><TAB><words>'.")
            words[fields[0].strip()] = fields[1].strip()
    return {wnid: words.get(wnid, wnid) for wnid in wnids}


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
    )


def _index_train(train_dir: Path, wnids: tuple[str, ...]) -> tuple[tuple[Path, int], ...]:
    items: list[tuple[Path, int]] = []
    for label, wnid in enumerate(wnids):
        images_dir = train_dir / wnid / "images"
        if not images_dir.is_dir():
            raise DataError(f"The training image folder {images_dir} for class {wnid} is missing.")
        images = _list_images(images_dir)
        if not images:
            raise DataError(f"The training image folder {images_dir} is an empty class with no images.")
        items.extend((image, label) for image in images)
    return tuple(items)


def _index_val(val_dir: Path, class_of: dict[str, int]) -> tuple[tuple[Path, int], ...]:
    annotations = val_dir / "val_annotations.txt"
    images_dir = val_dir / "images"
    items: dict[Path, int] = {}
    for number, line in _read_lines(annotations, "validation annotations"):
        file_name, wnid = _parse_val_line(line, annotations, number)
        if wnid not in class_of:
            raise DataError(
                f"{annotations} line {number} names wnid {wnid!r}, which is not in wnids.txt."
            )
        image = images_dir / file_name
        if image in items:
            raise DataError(f"{annotations} line {number} lists {file_name} a second time.")
        if not image.is_file():
            raise DataError(
                f"The validation image {image} listed on line {number} of {annotations} is missing."
            )
        items[image] = class_of[wnid]
    return tuple(sorted(items.items()))


def _parse_val_line(line: str, path: Path, number: int) -> tuple[str, str]:
    fields = line.split("\t")
    if len(fields) != _VAL_ANNOTATION_FIELDS:
        raise DataError(
            f"{path} line {number} is malformed: expected {_VAL_ANNOTATION_FIELDS} "
            f"tab-separated fields, found {len(fields)}."
        )
    file_name, wnid, *box = (field.strip() for field in fields)
    if not all(coordinate.lstrip("-").isdigit() for coordinate in box):
        raise DataError(f"{path} line {number} is malformed: the box coordinates are not integers.")
    return file_name, wnid


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------


def load_rgb(path: Path) -> Image.Image:
    """Decode `path` as an RGB image (a few real TinyImageNet files are grayscale)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"The image file {path} could not be decoded ({exc}).") from exc


class ImageClassificationDataset(torch.utils.data.Dataset):
    """(image, label) pairs as normalised float32 CHW tensors.

    With `augment`, each sample gets a random horizontal flip and a random crop
    of the reflect-padded image.  The randomness is a pure function of
    (seed, epoch, index), so neither DataLoader worker count nor sample order
    nor resuming a run changes which augmented samples are produced.  Call
    `set_epoch` before iterating each epoch; workers pick the new epoch up only
    when they are started afresh (the default, persistent_workers=False).
    """

    def __init__(
        self, items: Sequence[tuple[Path, int]], image_size: int, augment: bool, seed: int
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}.")
        self.items = tuple(items)
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
        self._std = np.asarray(IMAGENET_STD, dtype=np.float32)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}.")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = range(len(self.items))[i]
        path, label = self.items[index]
        pixels = self._load_pixels(path)
        if self.augment:
            pixels = self._augment(pixels, np.random.default_rng([self.seed, self.epoch, index]))
        normalised = (pixels.astype(np.float32) / 255.0 - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1))), label

    def _load_pixels(self, path: Path) -> np.ndarray:
        image = load_rgb(path)
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image)

    @staticmethod
    def _augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width, _ = pixels.shape
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        padded = np.pad(
            pixels, ((CROP_PADDING, CROP_PADDING), (CROP_PADDING, CROP_PADDING), (0, 0)), mode="reflect"
        )
        top, left = rng.integers(0, 2 * CROP_PADDING + 1, size=2)
        return padded[top : top + height, left : left + width]


# --------------------------------------------------------------------------
# Synthetic dataset in the real layout
# --------------------------------------------------------------------------

_GENERATOR_VERSION = 1
_GRAYSCALE_FRACTION = 0.05
_JPEG_QUALITY = 90
_NOISE_SIGMA = 14.0
_TRAIN, _VAL = 0, 1


@dataclass(frozen=True)
class _ClassStyle:
    wnid: str
    colour: np.ndarray  # RGB in [0, 255]
    angle: float  # grating orientation in radians
    cycles: float  # grating periods across the patch


def write_synthetic(
    root: str | Path,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    seed: int = 0,
    image_size: int = 64,
) -> Path:
    """Write (or reuse) a synthetic dataset in the TinyImageNet layout at `root`.

    Each class is a distinct colour and grating orientation/frequency drawn in
    a patch at a random position over a noisy background; about 5 % of images
    are saved as grayscale JPEGs like some real ones.  The output is a pure
    function of the arguments.  The dataset is built in a temporary sibling
    folder and renamed into place, so concurrent callers never see a partial
    dataset; a complete dataset with the same arguments is returned as is.
    """
    _check_synthetic_args(num_classes, train_per_class, val_per_class, seed, image_size)
    expected = _marker_content(num_classes, train_per_class, val_per_class, seed, image_size)
    return write_once(root, expected, lambda staging: _write_layout(staging, num_classes, train_per_class, val_per_class, seed, image_size))


def _check_synthetic_args(
    num_classes: int, train_per_class: int, val_per_class: int, seed: int, image_size: int
) -> None:
    if num_classes < 1 or train_per_class < 1 or val_per_class < 0:
        raise ValueError(
            "write_synthetic needs num_classes >= 1, train_per_class >= 1 and val_per_class >= 0."
        )
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}.")


def _marker_content(
    num_classes: int, train_per_class: int, val_per_class: int, seed: int, image_size: int
) -> dict[str, object]:
    return {
        "generator_version": _GENERATOR_VERSION,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
        "image_size": image_size,
    }


def _write_layout(
    root: Path, num_classes: int, train_per_class: int, val_per_class: int, seed: int, image_size: int
) -> None:
    styles = _class_styles(num_classes, seed)
    _write_class_files(root, styles, seed)
    train_total = num_classes * train_per_class
    train_gray = _grayscale_picks(train_total, seed, _TRAIN)
    box_lines: dict[str, list[str]] = {style.wnid: [] for style in styles}
    for k in range(train_total):
        style = styles[k // train_per_class]
        name = f"{style.wnid}_{k % train_per_class}.JPEG"
        images_dir = root / "train" / style.wnid / "images"
        box = _write_image(images_dir / name, style, image_size, (seed, _TRAIN, k), k in train_gray)
        box_lines[style.wnid].append(_tab_join(name, *box))
    for wnid, lines in box_lines.items():
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(lines))
    _write_val(root, styles, val_per_class, seed, image_size)


def _class_styles(num_classes: int, seed: int) -> list[_ClassStyle]:
    rng = np.random.default_rng([seed, 0xC1A55])
    cycle_choices = (2.0, 3.5, 5.0)
    styles = []
    for c in range(num_classes):
        hue = (c / num_classes + rng.uniform(-0.2, 0.2) / num_classes) % 1.0
        colour = np.asarray(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255.0
        styles.append(
            _ClassStyle(
                wnid=f"n{10_000_000 + c:08d}",
                colour=colour,
                angle=np.pi * c / num_classes,
                cycles=cycle_choices[c % len(cycle_choices)],
            )
        )
    return styles


def _write_class_files(root: Path, styles: list[_ClassStyle], seed: int) -> None:
    # Like the real wnids.txt, the class order is not sorted, so code that
    # derives labels from a sorted directory listing gets them wrong.
    order = np.random.default_rng([seed, 0x0D3]).permutation(len(styles))
    (root / "wnids.txt").write_text("".join(f"{styles[c].wnid}\n" for c in order))
    # The real words.txt covers all of WordNet, not just the chosen classes.
    words = [f"{style.wnid}\tsynthetic grating class {c}\n" for c, style in enumerate(styles)]
    words.append("n09999999\tunused entry absent from wnids.txt\n")
    (root / "words.txt").write_text("".join(words))


def _write_val(
    root: Path, styles: list[_ClassStyle], val_per_class: int, seed: int, image_size: int
) -> None:
    images_dir = root / "val" / "images"
    images_dir.mkdir(parents=True)
    classes = np.repeat(np.arange(len(styles)), val_per_class)
    classes = np.random.default_rng([seed, _VAL, 0x5EED]).permutation(classes)
    gray = _grayscale_picks(len(classes), seed, _VAL)
    lines = []
    for k, c in enumerate(classes):
        name = f"val_{k}.JPEG"
        style = styles[int(c)]
        box = _write_image(images_dir / name, style, image_size, (seed, _VAL, k), k in gray)
        lines.append(_tab_join(name, style.wnid, *box))
    (root / "val" / "val_annotations.txt").write_text("".join(lines))


def _grayscale_picks(total: int, seed: int, split: int) -> frozenset[int]:
    count = round(total * _GRAYSCALE_FRACTION)
    if total >= 20:
        count = max(count, 1)
    rng = np.random.default_rng([seed, split, 0x6A7])
    return frozenset(int(k) for k in rng.choice(total, size=count, replace=False))


def _tab_join(*fields: object) -> str:
    return "\t".join(str(field) for field in fields) + "\n"


def _write_image(
    path: Path, style: _ClassStyle, size: int, key: tuple[int, int, int], grayscale: bool
) -> tuple[int, int, int, int]:
    """Render one sample to `path` and return its patch box (x0, y0, x1, y1)."""
    rng = np.random.default_rng(list(key))
    pixels = _noisy_background(rng, size)
    box = _draw_grating(pixels, rng, style)
    pixels += rng.normal(0.0, _NOISE_SIGMA, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    if grayscale:
        image = image.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=_JPEG_QUALITY)
    return box


def _noisy_background(rng: np.random.Generator, size: int) -> np.ndarray:
    # Smooth colour blotches so the background is not a cue by itself.
    coarse = rng.uniform(30, 220, size=(4, 4, 3)).astype(np.uint8)
    smooth = Image.fromarray(coarse, mode="RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.float64).copy()


def _draw_grating(
    pixels: np.ndarray, rng: np.random.Generator, style: _ClassStyle
) -> tuple[int, int, int, int]:
    size = pixels.shape[0]
    side = int(rng.integers(size * 2 // 5, size * 3 // 4 + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    coords = np.arange(side) / side
    xx, yy = np.meshgrid(coords, coords)
    angle = style.angle + rng.normal(0.0, 0.05)
    phase = rng.uniform(0.0, 2 * np.pi)
    wave = np.sin(2 * np.pi * style.cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    brightness = rng.uniform(0.75, 1.15)
    patch = style.colour * brightness * (0.55 + 0.45 * wave)[..., None]
    pixels[y0 : y0 + side, x0 : x0 + side] = patch
    return x0, y0, x0 + side - 1, y0 + side - 1
