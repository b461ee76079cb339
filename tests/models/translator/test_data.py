"""The dataset layout (split .tsv files + poses/), frame subsampling, truncation
reports, collate padding and the synthetic generator, on real files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer

from models.translator.data import DataError, TranslationDataset, collate, frame_indices, read_split
from models.translator.metrics import corpus_bleu
from models.translator.synthetic import write_synthetic

TOKENIZER = ByT5Tokenizer()


def encode(text: str) -> list[int]:
    return TOKENIZER(text).input_ids


def write_dataset(root: Path, lines: str, clips: dict[str, int]) -> Path:
    """A dataset folder with `lines` as train.tsv and one .npy clip of the given length per id."""
    (root / "poses").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for sample_id, frames in clips.items():
        clip = np.concatenate([rng.uniform(0, 500, (frames, 133, 2)), rng.uniform(0.5, 1, (frames, 133, 1))], axis=-1)
        np.save(root / "poses" / f"{sample_id}.npy", clip.astype(np.float32))
    (root / "train.tsv").write_text(lines, encoding="utf-8")
    return root


def test_split_reads_npy_pkl_and_openpose_clips_with_chinese_text(tmp_path):
    root = write_dataset(tmp_path / "d", "a\t他今年四岁。\n\nb.mp4\thello there\nc\tan openpose clip\n", {"a": 5})
    (root / "poses" / "b.pkl").write_bytes(pickle.dumps(np.zeros((3, 133, 3), np.float32)))
    (root / "poses" / "c").mkdir()
    (root / "poses" / "c" / "f0.json").write_text(json.dumps({"people": []}))
    examples = read_split(root, "train")
    assert [(e.id, e.clip.name, e.text) for e in examples] == [("a", "a.npy", "他今年四岁。"), ("b.mp4", "b.pkl", "hello there"), ("c", "c", "an openpose clip")]
    data = TranslationDataset(examples, encode, "train", max_length=8, max_target_length=64, train=True)
    assert TOKENIZER.decode(data[0]["labels"], skip_special_tokens=True) == "他今年四岁。"
    assert [len(data[i]["parts"]["body"]) for i in range(3)] == [5, 3, 1]


@pytest.mark.parametrize("lines,message", [
    ("a\tfine\nno tab here\n", r"train\.tsv line 2 is malformed"),
    ("a\t\n", r"train\.tsv line 1 is malformed"),
    ("a\tone\na\ttwo\n", r"line 2 repeats sample 'a' already on line 1"),
    ("a\tfine\nghost\tno clip\n", r"line 2: no clip for sample 'ghost'"),
    ("../a\tescape\n", "must be a relative name"),
    ("\n\n", "lists no samples"),
])
def test_malformed_splits_name_file_and_line(tmp_path, lines, message):
    root = write_dataset(tmp_path / "d", lines, {"a": 3})
    with pytest.raises(DataError, match=message):
        read_split(root, "train")


def test_missing_split_and_folder_are_named(tmp_path):
    root = write_dataset(tmp_path / "d", "a\tx\n", {"a": 3})
    with pytest.raises(DataError, match=r"dev split file .*dev\.tsv is missing"):
        read_split(root, "dev")
    with pytest.raises(DataError, match="does not exist"):
        read_split(tmp_path / "nowhere", "train")


def test_broken_clip_is_named_with_its_sample(tmp_path):
    root = write_dataset(tmp_path / "d", "a\tx\nb\ty\n", {"a": 3})
    (root / "poses" / "b.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"sample 'b': .*b\.npy is not a readable \.npy"):
        TranslationDataset(read_split(root, "train"), encode, "train", 8, 32, train=True)


def test_subsampling_is_sorted_unique_and_deterministic():
    a = frame_indices(100, 16, train=True, seed=1, epoch=2, index=7)
    assert len(a) == 16 and (np.diff(a) > 0).all() and a.min() >= 0 and a.max() < 100
    np.testing.assert_array_equal(a, frame_indices(100, 16, train=True, seed=1, epoch=2, index=7))
    assert not np.array_equal(a, frame_indices(100, 16, train=True, seed=1, epoch=3, index=7))
    assert not np.array_equal(a, frame_indices(100, 16, train=True, seed=1, epoch=2, index=8))
    spaced = frame_indices(100, 16, train=False, seed=1, epoch=2, index=7)
    assert spaced[0] == 0 and spaced[-1] == 99 and (np.diff(spaced) > 0).all()
    np.testing.assert_array_equal(frame_indices(10, 16, train=True, seed=0, epoch=0, index=0), np.arange(10))


def test_dataset_subsamples_per_epoch_and_counts_truncation(tmp_path):
    long_text = "a sentence far longer than the target limit allows"
    root = write_dataset(tmp_path / "d", f"a\tshort\nb\t{long_text}\nc\tok\n", {"a": 40, "b": 10, "c": 25})
    data = TranslationDataset(read_split(root, "train"), encode, "train", max_length=20, max_target_length=12, train=True, seed=5)
    t = data.truncation
    assert (t.clips, t.clips_truncated, t.texts_truncated) == (3, 2, 1)
    assert "2 of 3 clips longer than max_length 20" in t.notice() and "1 target texts longer" in t.notice()
    assert len(data[1]["labels"]) == 12 and data[1]["labels"][-1] == TOKENIZER.eos_token_id
    assert len(data[0]["parts"]["body"]) == 20
    first = data[0]["parts"]["body"]
    torch.testing.assert_close(first, data[0]["parts"]["body"])  # same epoch: same frames
    data.set_epoch(1)
    assert not torch.equal(first, data[0]["parts"]["body"])  # another epoch: other frames


def test_collate_pads_with_the_last_frame_and_masks():
    def sample(frames: int, tokens: int, value: float) -> dict:
        body = torch.arange(frames, dtype=torch.float32)[:, None, None].expand(frames, 9, 3) + value
        parts = {"body": body, "left_hand": torch.zeros(frames, 21, 3), "right_hand": torch.zeros(frames, 21, 3), "face": torch.zeros(frames, 18, 3)}
        return {"id": f"s{frames}", "parts": parts, "labels": torch.arange(1, tokens + 1)}

    batch = collate([sample(3, 2, 0.0), sample(5, 4, 100.0)])
    assert batch["ids"] == ["s3", "s5"]
    assert batch["parts"]["body"].shape == (2, 5, 9, 3)
    assert batch["parts"]["body"][0, :, 0, 0].tolist() == [0, 1, 2, 2, 2]
    assert batch["mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[1, 2, -100, -100], [1, 2, 3, 4]]


def test_synthetic_dataset_is_written_once_in_the_real_layout(tmp_path):
    root = write_synthetic(tmp_path / "s", words=6, train=12, val=4, seed=1)
    files = sorted(p.name for p in root.iterdir())
    assert files == [".raylab_synthetic.json", "dev.tsv", "poses", "test.tsv", "train.tsv"]
    examples = read_split(root, "train")
    assert len(examples) == 12 and all(4 <= len(e.text.split()) <= 6 for e in examples)
    clip = np.load(examples[0].clip)
    assert clip.dtype == np.float32 and clip.shape[1:] == (133, 3)
    stamp = examples[0].clip.stat().st_mtime_ns
    assert write_synthetic(tmp_path / "s", words=6, train=12, val=4, seed=1) == root  # reused, not rewritten
    assert examples[0].clip.stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="different arguments"):
        write_synthetic(tmp_path / "s", words=7, train=12, val=4, seed=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.partial")]


def test_synthetic_data_has_zero_frames_zero_clips_and_chinese(tmp_path):
    root = write_synthetic(tmp_path / "zh", words=8, train=120, val=4, seed=0, language="zh")
    examples = read_split(root, "train")
    clips = [np.load(e.clip) for e in examples]
    zero_frames = sum(int((c == 0).all(axis=(1, 2)).sum()) for c in clips)
    zero_clips = sum(bool((c == 0).all()) for c in clips)
    assert zero_frames > zero_clips and zero_clips >= 1
    assert all(" " not in e.text and len(e.text) >= 4 for e in examples)
    assert corpus_bleu([examples[0].text], [examples[0].text], tokenize="zh") == pytest.approx(100.0)
    data = TranslationDataset(examples, encode, "train", 64, 64, train=True)
    assert TOKENIZER.decode(data[0]["labels"], skip_special_tokens=True) == examples[0].text
