"""DiT's data (models.dit.data) on real files the tests write: the ImageFolder
reader (grayscale/RGB conversion, resize, errors naming the file), the synthetic
PNG writer, the token generator, and the template classifier behind
sample_label_accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.dit.data import (
    DataError, ImageFolderDataset, index_image_folder, load_image, synthetic_tokens, token_templates, write_synthetic_images,
)
from models.dit.samples import NearestTemplate


def _save(path, mode, size, value, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else tuple([value] * len(mode))
    Image.new(mode, size, colour).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    """Two classes (names out of creation order), mixed PNG/JPEG, grayscale, RGB and RGBA, odd sizes."""
    root = tmp_path / "images"
    _save(root / "zebra" / "a.png", "RGB", (12, 10), 255, "PNG")
    _save(root / "zebra" / "b.JPG", "L", (8, 8), 0, "JPEG")
    _save(root / "zebra" / "c.jpeg", "RGBA", (16, 16), 128, "PNG")  # a PNG named .jpeg still decodes
    _save(root / "apple" / "x.png", "L", (8, 8), 255, "PNG")
    _save(root / "apple" / "y.png", "RGB", (8, 8), 0, "PNG")
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_classes_are_sorted_subfolders_and_labels_follow(folder):
    index = index_image_folder(folder, val_fraction=0.0)
    assert index.classes == ("apple", "zebra")
    assert sorted((p.name, label) for p, label in index.train) == [
        ("a.png", 1), ("b.JPG", 1), ("c.jpeg", 1), ("x.png", 0), ("y.png", 0)]
    assert index.val == ()


@pytest.mark.parametrize("channels", [1, 3])
def test_images_are_converted_resized_and_scaled_to_minus_one_one(folder, channels):
    index = index_image_folder(folder, val_fraction=0.0)
    data = ImageFolderDataset(index.train, channels=channels, size=4)
    for i in range(len(data)):
        x, label = data[i]
        assert x.dtype == torch.float32 and x.shape == (channels, 4, 4)
        assert x.min() >= -1 and x.max() <= 1
    by_name = {p.name: data[i][0] for i, (p, _) in enumerate(index.train)}
    assert torch.allclose(by_name["a.png"], torch.ones(channels, 4, 4))  # white RGB, also as grayscale
    assert torch.allclose(by_name["b.JPG"], -torch.ones(channels, 4, 4), atol=0.02)  # black grayscale JPEG, also as RGB


def test_resize_matches_pil_bilinear(folder):
    pixels = load_image(folder / "zebra" / "a.png", 3, 5)
    with Image.open(folder / "zebra" / "a.png") as image:
        expected = np.asarray(image.convert("RGB").resize((5, 5), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(pixels, expected.transpose(2, 0, 1))


def test_empty_class_folder_is_named(folder):
    (folder / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class.*empty"):
        index_image_folder(folder, 0.1)


def test_missing_or_classless_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        index_image_folder(tmp_path / "nowhere", 0.1)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        index_image_folder(tmp_path / "flat", 0.1)


def test_unreadable_image_is_named_when_read(folder):
    (folder / "apple" / "broken.png").write_bytes(b"\x89PNG but not really")
    index = index_image_folder(folder, 0.0)
    data = ImageFolderDataset(index.train, 1, 4)
    broken = next(i for i, (p, _) in enumerate(index.train) if p.name == "broken.png")
    with pytest.raises(DataError, match=r"broken\.png"):
        data[broken]


def test_split_is_per_class_deterministic_and_disjoint(tmp_path):
    root = write_synthetic_images(tmp_path / "syn", num_classes=3, per_class=10, channels=1, size=8, seed=0)
    first, second = index_image_folder(root, 0.2), index_image_folder(root, 0.2)
    assert first == second
    assert len(first.val) == 6 and len(first.train) == 24
    assert not set(first.train) & set(first.val)
    assert sorted({label for _, label in first.val}) == [0, 1, 2]


def test_synthetic_images_are_real_pngs_written_once(tmp_path):
    root = write_synthetic_images(tmp_path / "syn", num_classes=3, per_class=4, channels=3, size=16, seed=1)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert len(files) == 12 and files[0] == "class_0/00000.png"
    with Image.open(root / files[0]) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (16, 16)
    marker = json.loads((root / ".raylab_synthetic.json").read_text())
    assert marker["per_class"] == 4 and marker["channels"] == 3
    stamp = (root / files[0]).stat().st_mtime_ns
    assert write_synthetic_images(root, 3, 4, 3, 16, 1) == root
    assert (root / files[0]).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="different arguments"):
        write_synthetic_images(root, 3, 4, 3, 16, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no staging folder left behind


def test_synthetic_images_are_deterministic(tmp_path):
    a = write_synthetic_images(tmp_path / "a", 2, 3, 1, 8, 5)
    b = write_synthetic_images(tmp_path / "b", 2, 3, 1, 8, 5)
    for path in a.rglob("*.png"):
        assert path.read_bytes() == (b / path.relative_to(a)).read_bytes()


def test_token_sequences_have_the_seed_layout_and_range():
    x, labels = synthetic_tokens(num_classes=4, per_class=5, seq_len=16, features=8, seed=0, split=0)
    assert x.shape == (20, 16, 8) and x.dtype == np.float32 and labels.tolist() == [c for c in range(4) for _ in range(5)]
    assert x.min() >= -1 and x.max() <= 1
    again, _ = synthetic_tokens(4, 5, 16, 8, 0, 0)
    val, _ = synthetic_tokens(4, 5, 16, 8, 0, 1)
    assert np.array_equal(x, again) and not np.array_equal(x, val)
    assert token_templates(4, 16, 8, 0).shape == (4, 16, 8)


@pytest.mark.parametrize("kind", ["images", "tokens"])
def test_template_classifier_recognises_held_out_real_samples(tmp_path, kind):
    if kind == "images":
        root = write_synthetic_images(tmp_path / "syn", num_classes=10, per_class=30, channels=1, size=8, seed=0)
        index = index_image_folder(root, 0.2)
        train, val = ImageFolderDataset(index.train, 1, 8), ImageFolderDataset(index.val, 1, 8)
    else:
        from models.dit.data import TensorPairs

        train = TensorPairs(*synthetic_tokens(10, 20, 16, 8, 0, 0))
        val = TensorPairs(*synthetic_tokens(10, 10, 16, 8, 0, 1))
    classifier = NearestTemplate.fit(train, 10)
    assert classifier.dataset_accuracy(val) >= 0.95
    # ... and pure noise is not "recognised" as one class per label: chance-level agreement.
    noise = torch.randn(200, *val[0][0].shape).clamp(-1, 1)
    assert classifier.accuracy(noise, torch.arange(200) % 10) < 0.3
