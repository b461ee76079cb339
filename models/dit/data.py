"""DiT's data: an ImageFolder reader, a synthetic image set written in that layout,
and synthetic 8-feature token sequences.

Images (`data_kind: images`) live in the ImageFolder layout:

    DIR/<class name>/<image>.png|.jpg|.jpeg

The class list is the sorted subfolder names (index = position). Each image is
converted to 1 (grayscale) or 3 (RGB) channels, resized to image_size square
and scaled to [-1, 1] for training. A deterministic per-class split holds out
`val_fraction` of each class for validation. An empty class folder or an
unreadable image is a DataError naming the file.

Without a data folder, `write_synthetic_images` writes class patterns (one
oriented grating per class, with per-image contrast, brightness and pixel
noise) as PNG files in that same layout, once and atomically
(`raylab.datasets.write_once`), so the real reader is what trains.

Token sequences (`data_kind: tokens`, seed 000's case) have no standard file
format, so they are generated in memory: each class is a fixed set of 8
waveforms (one per feature, class-specific frequency and phase) with per-sample
amplitude jitter and noise, in [-1, 1], laid out (T, F) like the model's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raylab.datasets import DataError, write_once

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_GENERATOR_VERSION = 1

__all__ = ["DataError", "ImageFolderDataset", "index_image_folder", "write_synthetic_images", "synthetic_tokens"]


# ---------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolderIndex:
    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]
    val: tuple[tuple[Path, int], ...]


def list_classes(root: str | Path) -> tuple[str, ...]:
    """Sorted class folder names of an ImageFolder root (hidden folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"the image folder {root} does not exist or is not a directory.")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(classes) < 1:
        raise DataError(f"the image folder {root} has no class subfolders (expected {root}/<class>/<image>.png).")
    return classes


def index_image_folder(root: str | Path, val_fraction: float, split_seed: int = 0) -> ImageFolderIndex:
    """Every image of every class, split per class into train and val deterministically."""
    root = Path(root)
    classes = list_classes(root)
    train: list[tuple[Path, int]] = []
    val: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not images:
            raise DataError(f"the class folder {folder} is empty: it holds no .png/.jpg/.jpeg image.")
        order = np.random.default_rng([split_seed, label]).permutation(len(images))
        n_val = int(len(images) * val_fraction)
        if val_fraction > 0 and len(images) >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, len(images) - 1)  # every class keeps at least one training image
        held = set(order[:n_val].tolist())
        for k, path in enumerate(images):
            (val if k in held else train).append((path, label))
    return ImageFolderIndex(root, classes, tuple(train), tuple(val))


def load_image(path: Path, channels: int, size: int) -> np.ndarray:
    """(channels, size, size) float32 in [0, 1]; DataError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            image = image.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"the image file {path} could not be read as an image ({exc}).") from None
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


class ImageFolderDataset(torch.utils.data.Dataset):
    """(image in [-1, 1] as float32 (C, H, W), label) pairs read from files on access."""

    def __init__(self, items: tuple[tuple[Path, int], ...], channels: int, size: int):
        self.items, self.channels, self.size = tuple(items), channels, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return torch.from_numpy(np.ascontiguousarray(load_image(path, self.channels, self.size) * 2.0 - 1.0)), label


# ---------------------------------------------------------------------------
# Synthetic images in the ImageFolder layout
# ---------------------------------------------------------------------------


def _class_pattern(c: int, num_classes: int, channels: int, size: int) -> np.ndarray:
    """Class c's template in [0, 1], (channels, size, size): an oriented grating, a class colour."""
    angle = np.pi * c / num_classes
    cycles = (1.5, 2.5)[c % 2]  # periods across the image, whatever its size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    wave = 0.5 + 0.4 * np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + c)
    if channels == 1:
        return wave[None]
    hue = np.array([np.cos(2 * np.pi * (c / num_classes + k / 3)) for k in range(3)])
    tint = 0.65 + 0.35 * hue
    return tint[:, None, None] * wave[None]


def synthetic_image(c: int, num_classes: int, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One sample of class c as uint8 (size, size[, 3]): template with contrast, brightness and noise."""
    template = _class_pattern(c, num_classes, channels, size)
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-0.06, 0.06)
    pixels = 0.5 + contrast * (template - 0.5) + brightness + rng.normal(0.0, 0.04, template.shape)
    pixels = np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)
    return pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)


def write_synthetic_images(root: str | Path, num_classes: int, per_class: int, channels: int, size: int, seed: int) -> Path:
    """Write (or reuse) a synthetic ImageFolder at `root`: `per_class` PNGs per class,
    once and atomically (raylab.datasets.write_once)."""
    params = {"generator": "dit-synthetic-images", "version": _GENERATOR_VERSION, "num_classes": num_classes,
              "per_class": per_class, "channels": channels, "size": size, "seed": seed}

    def write(staging: Path) -> None:
        width = len(str(num_classes - 1))
        for c in range(num_classes):
            folder = staging / f"class_{c:0{width}d}"
            folder.mkdir()
            for k in range(per_class):
                pixels = synthetic_image(c, num_classes, channels, size, np.random.default_rng([seed, c, k]))
                Image.fromarray(pixels, mode="L" if channels == 1 else "RGB").save(folder / f"{k:05d}.png")

    return write_once(root, params, write)


# ---------------------------------------------------------------------------
# Synthetic token sequences (in memory)
# ---------------------------------------------------------------------------


def token_templates(num_classes: int, seq_len: int, features: int, seed: int) -> np.ndarray:
    """(num_classes, seq_len, features) class waveforms in [-0.8, 0.8]."""
    rng = np.random.default_rng([seed, 0x70CE])
    cycles = rng.uniform(0.5, 3.0, size=(num_classes, 1, features))
    phase = rng.uniform(0, 2 * np.pi, size=(num_classes, 1, features))
    time = np.arange(seq_len, dtype=np.float64)[None, :, None] / seq_len
    return 0.8 * np.sin(2 * np.pi * cycles * time + phase)


def synthetic_tokens(num_classes: int, per_class: int, seq_len: int, features: int, seed: int, split: int) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, seq_len, features) float32 in [-1, 1], labels (N,)); `split` 0 = train, 1 = val."""
    templates = token_templates(num_classes, seq_len, features, seed)
    rng = np.random.default_rng([seed, split, 0x5E9])
    labels = np.repeat(np.arange(num_classes), per_class)
    amplitude = rng.uniform(0.85, 1.15, size=(len(labels), 1, features))
    noise = rng.normal(0.0, 0.05, size=(len(labels), seq_len, features))
    x = np.clip(templates[labels] * amplitude + noise, -1.0, 1.0).astype(np.float32)
    return x, labels.astype(np.int64)


class TensorPairs(torch.utils.data.Dataset):
    """(x, label) pairs held in memory."""

    def __init__(self, x: np.ndarray, labels: np.ndarray):
        self.x, self.labels = torch.from_numpy(x), torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], int(self.labels[index])
