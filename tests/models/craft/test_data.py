"""Tests for the ICDAR-2015 reader, the CRAFT dataset and the synthetic generator,
all on real files written under tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.craft.data import CraftDataset, DataError, load_split, parse_gt_file, read_rgb
from models.craft.synthetic import MARKER_NAME, draw_word, write_synthetic

# --------------------------------------------------------------------------
# Hand-written ground-truth files
# --------------------------------------------------------------------------


def _write_gt(path: Path, lines: list[str], bom: bool = True, newline: str = "\r\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((("\ufeff" if bom else "") + newline.join(lines) + newline).encode("utf-8"))
    return path


def _write_image(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size[1], size[0], 3), 127, np.uint8))
    return path


def test_bom_commas_and_dont_care_are_read_as_icdar_means_them(tmp_path: Path) -> None:
    gt = _write_gt(tmp_path / "gt_img_1.txt", [
        "377,117,463,117,465,130,378,130,Genaxis Theatre",
        "493,115,519,115,519,131,493,131,[06]",
        "374,155,409,155,409,170,374,170,###",
        "10,20,50,20,50,40,10,40,1,000,000",
    ])
    words = parse_gt_file(gt)
    assert [w.text for w in words] == ["Genaxis Theatre", "[06]", "###", "1,000,000"]
    assert [w.dont_care for w in words] == [False, False, True, False]
    np.testing.assert_array_equal(words[0].quad, [[377, 117], [463, 117], [465, 130], [378, 130]])
    assert words[0].quad.dtype == np.float32
    # The BOM belongs to the encoding, not to the first coordinate.
    assert words[0].quad[0, 0] == 377


def test_lf_files_without_bom_and_blank_lines_also_load(tmp_path: Path) -> None:
    gt = _write_gt(tmp_path / "gt.txt", ["1,2,3,4,5,6,7,8,ab", "", "  ", "1.5,2,3,4,5,6,7,8,c"], bom=False, newline="\n")
    words = parse_gt_file(gt)
    assert [w.text for w in words] == ["ab", "c"]
    assert words[1].quad[0, 0] == 1.5


@pytest.mark.parametrize("line, fragment", [
    ("1,2,3,4,5,6,7,word", "expected 8 coordinates and a transcription"),
    ("1,2,3,4,5,6,7,8", "expected 8 coordinates and a transcription"),
    ("1,2,3,x4,5,6,7,8,word", "'x4' is not a number"),
    ("1,2,3,4,5,6,7,nan,word", "not finite"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    gt = _write_gt(tmp_path / "gt_img_7.txt", ["1,2,3,4,5,6,7,8,fine", "", line])
    with pytest.raises(DataError) as caught:
        parse_gt_file(gt)
    message = str(caught.value)
    assert "gt_img_7.txt line 3" in message and fragment in message, message


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    gt = tmp_path / "gt_img_1.txt"
    gt.write_bytes(b"1,2,3,4,5,6,7,8,caf\xe9\r\n")
    with pytest.raises(DataError, match="gt_img_1.txt is not UTF-8"):
        parse_gt_file(gt)


def _layout(root: Path, images: str = "train_images", gts: str = "train_gts", count: int = 3) -> Path:
    for k in range(1, count + 1):
        _write_image(root / images / f"img_{k}.jpg")
        _write_gt(root / gts / f"gt_img_{k}.txt", [f"{k},1,20,1,20,10,{k},10,w{k}"])
    return root


def test_split_pairs_images_with_their_gt_in_numeric_order(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds", count=11)
    records = load_split(root, "train")
    assert [r.image.name for r in records[:3]] == ["img_1.jpg", "img_2.jpg", "img_3.jpg"]
    assert records[-1].image.name == "img_11.jpg"
    assert all(r.gt.name == f"gt_{r.image.stem}.txt" for r in records)
    assert records[9].words[0].text == "w10"


def test_official_icdar_folder_names_are_accepted(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds", "ch4_test_images", "Challenge4_Test_Task1_GT", count=2)
    assert len(load_split(root, "test")) == 2


def test_missing_gt_for_an_image_names_both(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds")
    (root / "train_gts" / "gt_img_2.txt").unlink()
    with pytest.raises(DataError) as caught:
        load_split(root, "train")
    assert "gt_img_2.txt" in str(caught.value) and "img_2.jpg" in str(caught.value)


def test_malformed_line_inside_a_split_names_the_file(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds")
    _write_gt(root / "train_gts" / "gt_img_3.txt", ["1,2,3,4,5,6,7,8,ok", "1,2,3,4,5,six,7,8,bad"])
    with pytest.raises(DataError, match=r"gt_img_3.txt line 2 .*'six'"):
        load_split(root, "train")


@pytest.mark.parametrize("remove, fragment", [
    ("train_images", "train image folder is missing"),
    ("train_gts", "ground-truth folder"),
])
def test_missing_folders_are_named(tmp_path: Path, remove: str, fragment: str) -> None:
    root = _layout(tmp_path / "ds")
    for path in sorted((root / remove).iterdir()):
        path.unlink()
    (root / remove).rmdir()
    with pytest.raises(DataError, match=fragment):
        load_split(root, "train")


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        load_split(tmp_path / "nowhere", "train")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    root = _layout(tmp_path / "ds")
    (root / "train_images" / "img_2.jpg").write_bytes(b"not a jpeg")
    dataset = CraftDataset(load_split(root, "train"), image_size=64, augment=False, seed=0)
    dataset[0]
    with pytest.raises(DataError, match="img_2.jpg"):
        dataset[1]
    with pytest.raises(DataError, match="img_2.jpg"):
        read_rgb(root / "train_images" / "img_2.jpg")


# --------------------------------------------------------------------------
# CraftDataset
# --------------------------------------------------------------------------


def test_dataset_letterboxes_and_targets_follow_the_image(tmp_path: Path) -> None:
    # A 128x64 image with one dark 4-glyph word: letterboxed to 64 px the scale is 0.5.
    image = np.full((64, 128, 3), 230, np.uint8)
    image[20:36, 40:104] = 20
    (tmp_path / "ds" / "train_images").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "ds" / "train_images" / "img_1.jpg"), image)
    _write_gt(tmp_path / "ds" / "train_gts" / "gt_img_1.txt", ["40,20,104,20,104,36,40,36,ABCD"])
    dataset = CraftDataset(load_split(tmp_path / "ds", "train"), image_size=64, augment=False, seed=0)
    item = dataset.item(0)
    assert item.image.shape == (3, 64, 64) and item.image.dtype == torch.float32
    assert item.region.shape == item.affinity.shape == item.mask.shape == (32, 32)
    assert item.placement.scale == 0.5 and (item.placement.dx, item.placement.dy) == (0, 0)
    # The word sits at x 20..52, y 10..18 of the canvas, x 10..26, y 5..9 of the maps.
    ys, xs = np.nonzero(item.region.numpy() > 0.5)
    assert 10 <= xs.min() and xs.max() <= 26 and 5 <= ys.min() and ys.max() <= 9
    # The bottom half of the canvas is padding: mean colour, 0 after normalisation.
    assert item.image[:, 40:].abs().max() < 1e-5
    image_t, region, affinity, mask = dataset[0]
    torch.testing.assert_close(region, item.region)


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "syn", train_images=6, test_images=2, image_size=64, seed=3)
    records = load_split(root, "train")
    first = CraftDataset(records, 64, augment=True, seed=5)
    second = CraftDataset(records, 64, augment=True, seed=5)
    first.set_epoch(2)
    second.set_epoch(2)
    forward = [first[i] for i in range(6)]
    backward = {i: second[i] for i in reversed(range(6))}
    for i, sample in enumerate(forward):
        for a, b in zip(sample, backward[i]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    second.set_epoch(3)
    assert not all(torch.equal(forward[i][0], second[i][0]) for i in range(6))
    plain = CraftDataset(records, 64, augment=False, seed=5)
    assert not all(torch.equal(forward[i][0], plain[i][0]) for i in range(6))


def test_dataset_batches_through_a_default_data_loader(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "syn", train_images=4, test_images=1, image_size=64, seed=0)
    loader = torch.utils.data.DataLoader(CraftDataset(load_split(root, "train"), 64, True, 0), batch_size=4)
    images, region, affinity, mask = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and region.shape == affinity.shape == mask.shape == (4, 32, 32)


# --------------------------------------------------------------------------
# Synthetic generator
# --------------------------------------------------------------------------

_SMALL = dict(train_images=12, test_images=5, image_size=96, seed=1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("craft") / "syn", **_SMALL)


def test_synthetic_files_are_in_the_icdar_format(synthetic: Path) -> None:
    assert sorted(p.name for p in (synthetic / "train_images").iterdir())[:3] == ["img_1.jpg", "img_10.jpg", "img_11.jpg"]
    assert len(list((synthetic / "test_gts").glob("gt_img_*.txt"))) == 5
    raw = (synthetic / "train_gts" / "gt_img_1.txt").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw
    for line in raw.decode("utf-8-sig").splitlines():
        fields = line.split(",", 8)
        assert all(f.lstrip("-").isdigit() for f in fields[:8]) and fields[8]
    assert (synthetic / "train_images" / "img_1.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG
    assert read_rgb(synthetic / "train_images" / "img_1.jpg").shape == (96, 96, 3)


def test_synthetic_words_have_two_to_five_glyphs_some_dont_care_some_commas(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "syn", train_images=150, test_images=1, image_size=128, seed=0)
    words = [w for r in load_split(root, "train") for w in r.words]
    texts = [w.text for w in words if not w.dont_care]
    assert all(2 <= len(t) <= 5 for t in texts)
    assert 0.05 < sum(w.dont_care for w in words) / len(words) < 0.3
    assert any("," in t for t in texts)
    # Some words are rotated: their top edge is not horizontal.
    assert any(abs(w.quad[1, 1] - w.quad[0, 1]) >= 3 for w in words)
    assert all(1 <= len(r.words) <= 5 for r in load_split(root, "train"))


@pytest.mark.parametrize("cell_w", [9.0, 12.0, 16.0])
def test_glyph_ink_stays_inside_the_even_split_character_cells(cell_w: float) -> None:
    # What the loader's even split rests on: each glyph's ink lies in its own cell,
    # so the cell borders at x = k * cell_w carry no ink, even for wide glyphs.
    cell_h = cell_w / 0.6
    text = "WM,W8"
    pixels = np.full((64, 128, 3), 200.0)
    offset = np.float32([[1, 0, 10], [0, 1, 20]])
    draw_word(pixels, np.random.default_rng(0), text, cell_w, cell_h, offset, faint=False)
    ink = np.abs(pixels - 200.0).max(axis=2) > 20
    ys, xs = np.nonzero(ink)
    assert xs.min() >= 10 and xs.max() < 10 + cell_w * len(text) and ys.min() >= 20 and ys.max() < 20 + cell_h
    for k in range(1, len(text)):
        border = 10 + k * cell_w
        assert not ink[:, int(np.floor(border - 0.5)):int(np.ceil(border + 0.5))].any(), (k, border)
    for k, char in enumerate(text):
        if char != ",":
            assert ink[:, int(10 + k * cell_w):int(10 + (k + 1) * cell_w)].sum() > 5, char


def test_synthetic_is_deterministic_and_reused(tmp_path: Path, synthetic: Path) -> None:
    again = write_synthetic(tmp_path / "again", **_SMALL)
    files = sorted(p.relative_to(synthetic) for p in synthetic.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for relative in files:
        assert (synthetic / relative).read_bytes() == (again / relative).read_bytes(), relative
    before = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    assert write_synthetic(tmp_path / "again", **_SMALL) == again
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    assert json.loads((again / MARKER_NAME).read_text())["train_images"] == 12


def test_synthetic_refuses_foreign_or_different_folders(tmp_path: Path, synthetic: Path) -> None:
    precious = tmp_path / "mine" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("keep")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_synthetic(tmp_path / "mine", **_SMALL)
    assert precious.read_text() == "keep"
    with pytest.raises(DataError, match="different arguments"):
        write_synthetic(synthetic, **{**_SMALL, "seed": 2})
