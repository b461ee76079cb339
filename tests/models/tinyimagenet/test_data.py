"""Tests for the TinyImageNet folder reader, dataset and synthetic generator
in models.tinyimagenet.data, all on real files written under tmp_path."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.tinyimagenet.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    ImageClassificationDataset,
    TinyImageNetIndex,
    load_index,
    write_synthetic,
)

# --------------------------------------------------------------------------
# Synthetic dataset with the default arguments, shared by the module
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    started = time.perf_counter()
    write_synthetic(root)
    return root, time.perf_counter() - started


@pytest.fixture(scope="module")
def index(synthetic: tuple[Path, float]) -> TinyImageNetIndex:
    return load_index(synthetic[0])


def test_default_synthetic_dataset_is_fast_to_write(synthetic: tuple[Path, float]) -> None:
    assert synthetic[1] < 10.0


def test_synthetic_layout_matches_the_real_one(synthetic: tuple[Path, float]) -> None:
    root = synthetic[0]
    wnids = (root / "wnids.txt").read_text().split()
    assert len(wnids) == 10 and all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    for wnid in wnids:
        assert len(list((root / "train" / wnid / "images").glob(f"{wnid}_*.JPEG"))) == 100
        boxes = (root / "train" / wnid / f"{wnid}_boxes.txt").read_text().splitlines()
        assert len(boxes) == 100 and len(boxes[0].split("\t")) == 5
    annotations = (root / "val" / "val_annotations.txt").read_text().splitlines()
    assert len(annotations) == 200
    name, wnid, *box = annotations[0].split("\t")
    assert name == "val_0.JPEG" and wnid in wnids
    x0, y0, x1, y1 = map(int, box)
    assert 0 <= x0 < x1 < 64 and 0 <= y0 < y1 < 64
    words = dict(line.split("\t") for line in (root / "words.txt").read_text().splitlines())
    assert set(wnids) <= set(words)
    with Image.open(root / "val" / "images" / "val_0.JPEG") as image:
        assert image.format == "JPEG" and image.size == (64, 64)


def test_index_has_the_classes_and_split_sizes(index: TinyImageNetIndex) -> None:
    assert index.num_classes == 10
    assert len(index.train) == 10 * 100
    assert len(index.val) == 10 * 20
    for split in (index.train, index.val):
        labels = [label for _, label in split]
        assert set(labels) == set(range(10))
        assert all(path.is_file() for path, _ in split)
    assert set(index.words) == set(index.wnids)


def test_train_and_val_share_the_wnids_txt_mapping(
    synthetic: tuple[Path, float], index: TinyImageNetIndex
) -> None:
    root = synthetic[0]
    wnids = (root / "wnids.txt").read_text().split()
    assert index.wnids == tuple(wnids)
    val_labels = {path.name: label for path, label in index.val}
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        assert val_labels[name] == wnids.index(wnid)
    for path, label in index.train:
        assert path.parent.parent.name == wnids[label]


def test_wnids_txt_is_not_in_sorted_order(index: TinyImageNetIndex) -> None:
    # Catches label maps derived from sorted folder names instead of wnids.txt.
    assert list(index.wnids) != sorted(index.wnids)


def test_index_order_is_deterministic(synthetic: tuple[Path, float], index: TinyImageNetIndex) -> None:
    assert load_index(synthetic[0]) == index


def test_some_files_are_grayscale_and_load_as_rgb(index: TinyImageNetIndex) -> None:
    for split in (index.train, index.val):
        modes = {}
        for path, _ in split:
            with Image.open(path) as image:
                modes[path] = image.mode
        gray = [path for path, mode in modes.items() if mode == "L"]
        assert 1 <= len(gray) <= 0.1 * len(split)
    dataset = ImageClassificationDataset(index.val, image_size=64, augment=False, seed=0)
    first_gray = next(i for i, (path, _) in enumerate(index.val) if modes[path] == "L")
    image, _ = dataset[first_gray]
    assert image.shape == (3, 64, 64)


def test_classes_are_not_constant_colour_images(index: TinyImageNetIndex) -> None:
    dataset = ImageClassificationDataset(index.train[:50], image_size=64, augment=False, seed=0)
    image, _ = dataset[0]
    assert image.std(dim=(1, 2)).min() > 0.3


# --------------------------------------------------------------------------
# ImageClassificationDataset
# --------------------------------------------------------------------------


def _expected_tensor(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    normalised = (pixels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(normalised.transpose(2, 0, 1).copy())


def test_dataset_yields_normalised_float_chw_and_int_labels(index: TinyImageNetIndex) -> None:
    dataset = ImageClassificationDataset(index.val, image_size=64, augment=False, seed=0)
    assert len(dataset) == 200
    image, label = dataset[5]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert isinstance(label, int) and label == index.val[5][1]
    torch.testing.assert_close(image, _expected_tensor(index.val[5][0], 64))


def test_dataset_resizes_to_image_size(index: TinyImageNetIndex) -> None:
    dataset = ImageClassificationDataset(index.val, image_size=32, augment=False, seed=0)
    image, _ = dataset[0]
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(image, _expected_tensor(index.val[0][0], 32))


def test_no_augmentation_means_epoch_does_not_matter(index: TinyImageNetIndex) -> None:
    dataset = ImageClassificationDataset(index.val[:4], image_size=64, augment=False, seed=0)
    before = [dataset[i][0] for i in range(4)]
    dataset.set_epoch(3)
    for i in range(4):
        torch.testing.assert_close(dataset[i][0], before[i], rtol=0, atol=0)


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index(index: TinyImageNetIndex) -> None:
    items = index.train[::100]
    first = ImageClassificationDataset(items, image_size=64, augment=True, seed=7)
    second = ImageClassificationDataset(items, image_size=64, augment=True, seed=7)
    first.set_epoch(2)
    second.set_epoch(2)
    forward = [first[i][0] for i in range(len(items))]
    backward = {i: second[i][0] for i in reversed(range(len(items)))}
    for i, image in enumerate(forward):
        torch.testing.assert_close(image, backward[i], rtol=0, atol=0)


def test_augmentation_changes_across_epochs_and_seeds(index: TinyImageNetIndex) -> None:
    items = index.train[::100]
    dataset = ImageClassificationDataset(items, image_size=64, augment=True, seed=7)
    epoch0 = torch.stack([dataset[i][0] for i in range(len(items))])
    dataset.set_epoch(1)
    epoch1 = torch.stack([dataset[i][0] for i in range(len(items))])
    other_seed = ImageClassificationDataset(items, image_size=64, augment=True, seed=8)
    seed8 = torch.stack([other_seed[i][0] for i in range(len(items))])
    plain = ImageClassificationDataset(items, image_size=64, augment=False, seed=7)
    unaugmented = torch.stack([plain[i][0] for i in range(len(items))])
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(epoch0, seed8)
    assert not torch.equal(epoch0, unaugmented)
    assert epoch0.shape == unaugmented.shape


def test_augmented_samples_do_not_depend_on_worker_count(index: TinyImageNetIndex) -> None:
    dataset = ImageClassificationDataset(index.train[::125], image_size=32, augment=True, seed=3)
    dataset.set_epoch(5)
    serial = torch.cat([x for x, _ in torch.utils.data.DataLoader(dataset, batch_size=3)])
    parallel = torch.cat(
        [x for x, _ in torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)]
    )
    torch.testing.assert_close(serial, parallel, rtol=0, atol=0)


def test_undecodable_image_raises_data_error_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"this is not a jpeg")
    dataset = ImageClassificationDataset([(broken, 0)], image_size=64, augment=False, seed=0)
    with pytest.raises(DataError, match="broken.JPEG"):
        dataset[0]


# --------------------------------------------------------------------------
# load_index on hand-made broken folders
# --------------------------------------------------------------------------

_WNIDS = ("n00000002", "n00000001")


def _tiny_jpeg(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, 50, 200)).save(path, format="JPEG")


def _make_layout(root: Path) -> Path:
    """A minimal valid dataset: two classes, two train and one val image each."""
    root.mkdir()
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in _WNIDS))
    (root / "words.txt").write_text("n00000001\tone\nn00000002\ttwo\nn00000003\tunused\n")
    for wnid in _WNIDS:
        for k in range(2):
            _tiny_jpeg(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for k, wnid in enumerate(_WNIDS):
        _tiny_jpeg(root / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t15\t15\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    return root


def test_hand_made_layout_loads(tmp_path: Path) -> None:
    index = load_index(_make_layout(tmp_path / "ds"))
    assert index.wnids == _WNIDS
    assert index.words == {"n00000002": "two", "n00000001": "one"}
    assert [label for _, label in index.train] == [0, 0, 1, 1]
    assert [(p.name, label) for p, label in index.val] == [("val_0.JPEG", 0), ("val_1.JPEG", 1)]


def _raises_naming(root: Path, *fragments: str) -> str:
    with pytest.raises(DataError) as caught:
        load_index(root)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_root(tmp_path: Path) -> None:
    _raises_naming(tmp_path / "nowhere", "nowhere")


def test_missing_wnids(tmp_path: Path) -> None:
    root = _make_layout(tmp_path / "ds")
    (root / "wnids.txt").unlink()
    _raises_naming(root, "wnids.txt", "missing")


def test_empty_wnids(tmp_path: Path) -> None:
    root = _make_layout(tmp_path / "ds")
    (root / "wnids.txt").write_text("\n\n")
    _raises_naming(root, "wnids.txt", "empty")


def test_duplicate_wnid(tmp_path: Path) -> None:
    root = _make_layout(tmp_path / "ds")
    (root / "wnids.txt").write_text("n00000002\nn00000001\nn00000002\n")
    _raises_naming(root, "wnids.txt", "line 3", "n00000002")


def test_missing_train_images_folder(tmp_path: Path) -> None:
    root = _make_layout(tmp_path / "ds")
    for image in (root / "train" / "n00000001" / "images").iterdir():
        image.unlink()
    (root / "train" / "n00000001" / "images").rmdir()
    _raises_naming(root, str(Path("train") / "n00000001" / "images"), "missing")


def test_empty_class(tmp_path: Path) -> None:
    root = _make_layout(tmp_path / "ds")
    for image in (root / "train" / "n00000001" / "images").iterdir():
        image.unlink()
    _raises_naming(root, str(Path("n00000001") / "images"), "empty class")


def test_missing_val_annotations(tmp_path: Path) -> None:
    root = _make_layout(tmp_path / "ds")
    (root / "val" / "val_annotations.txt").unlink()
    _raises_naming(root, "val_annotations.txt", "missing")


def test_malformed_val_line(tmp_path: Path) -> None:
    root = _make_layout(tmp_path / "ds")
    with (root / "val" / "val_annotations.txt").open("a") as f:
        f.write("val_2.JPEG n00000001 0 0 15 15\n")
    _raises_naming(root, "val_annotations.txt", "line 3", "malformed")


def test_unknown_val_wnid(tmp_path: Path) -> None:
    root = _make_layout(tmp_path / "ds")
    _tiny_jpeg(root / "val" / "images" / "val_2.JPEG")
    with (root / "val" / "val_annotations.txt").open("a") as f:
        f.write("val_2.JPEG\tn09999999\t0\t0\t15\t15\n")
    _raises_naming(root, "val_annotations.txt", "line 3", "n09999999")


def test_missing_val_image(tmp_path: Path) -> None:
    root = _make_layout(tmp_path / "ds")
    (root / "val" / "images" / "val_1.JPEG").unlink()
    _raises_naming(root, "val_1.JPEG", "line 2", "missing")


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------
# write_synthetic: idempotence, refusal, concurrency
# --------------------------------------------------------------------------

_SMALL = dict(num_classes=3, train_per_class=8, val_per_class=7, seed=1, image_size=32)


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_write_synthetic_is_deterministic(tmp_path: Path) -> None:
    first = write_synthetic(tmp_path / "a", **_SMALL)
    second = write_synthetic(tmp_path / "b", **_SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_grayscale_share_is_at_least_one_per_split_of_20(tmp_path: Path) -> None:
    index = load_index(write_synthetic(tmp_path / "ds", **_SMALL))
    assert len(index.train) == 24 and len(index.val) == 21
    for split in (index.train, index.val):
        modes = []
        for path, _ in split:
            with Image.open(path) as image:
                modes.append(image.mode)
        assert modes.count("L") == 1


def test_second_call_returns_without_rewriting(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "ds", **_SMALL)
    before = _snapshot(root)
    started = time.perf_counter()
    assert write_synthetic(tmp_path / "ds", **_SMALL) == root
    assert time.perf_counter() - started < 0.5
    assert _snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_marker_records_the_arguments(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "ds", **_SMALL)
    marker = json.loads((root / ".raylab_synthetic.json").read_text())
    assert {k: marker[k] for k in _SMALL} == _SMALL
    assert root.stat().st_mode & 0o777 == 0o755


def test_writes_into_an_existing_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    root = write_synthetic(tmp_path / "ds", **_SMALL)
    assert load_index(root).num_classes == 3


def test_refuses_a_non_empty_foreign_folder(tmp_path: Path) -> None:
    precious = tmp_path / "ds" / "precious.txt"
    precious.parent.mkdir()
    precious.write_text("user data")
    with pytest.raises(DataError, match="ds"):
        write_synthetic(tmp_path / "ds", **_SMALL)
    assert precious.read_text() == "user data"
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_refuses_a_synthetic_dataset_with_other_arguments(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "ds", **_SMALL)
    before = _snapshot(root)
    with pytest.raises(DataError, match="different arguments"):
        write_synthetic(root, **{**_SMALL, "seed": 2})
    assert _snapshot(root) == before


def test_refuses_an_incomplete_dataset_without_marker(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "ds", **_SMALL)
    (root / ".raylab_synthetic.json").unlink()
    with pytest.raises(DataError, match="ds"):
        write_synthetic(root, **_SMALL)


def test_concurrent_writers_agree_and_leave_no_temp_folders(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            results.append(write_synthetic(tmp_path / "ds", **_SMALL))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 4 and len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert load_index(results[0]).num_classes == 3
