"""A pose-to-text dataset on disk, the Dataset the loop reads, and its collate function.

Layout of a dataset folder (`data_dir`)::

    train.tsv  dev.tsv  [test.tsv]   one clip a line: <id><TAB><text>, UTF-8, no header
    poses/<id>.npy                   COCO-WholeBody (T, 133, 3) array, or
    poses/<id>.pkl                   the same as a pickle of arrays (keypoints.py), or
    poses/<id>/*.json                OpenPose per-frame JSON files

Blank lines are skipped; an id ending in a video suffix (`.mp4`, `.avi`, ...) may
name its clip with or without it (How2Sign's ids end in `.mp4`). Text is any
Unicode (Chinese included); the tokenizer decides the units.

Each sample is a clip of at most `max_length` frames (longer clips are
subsampled to sorted frame indices: random in training, a pure function of
(seed, epoch, index) so resumed runs see the same frames; evenly spaced in
evaluation) normalised into four parts, and its target token ids cut to
`max_target_length`. `TranslationDataset.truncation` says how many clips and
texts were cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.translator.keypoints import PART_NAMES, KeypointError, clip_length, normalise_parts, read_clip
from raylab.datasets import DataError  # noqa: F401  (the one data error every model raises)

_VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    id: str
    clip: Path
    text: str


def _clip_path(poses: Path, sample_id: str) -> Path | None:
    stems = [sample_id]
    if sample_id.lower().endswith(_VIDEO_SUFFIXES):
        stems.append(sample_id.rsplit(".", 1)[0])
    for stem in stems:
        for candidate in (poses / f"{stem}.npy", poses / f"{stem}.pkl"):
            if candidate.is_file():
                return candidate
        if (poses / stem).is_dir():
            return poses / stem
    return None


def read_split(root: str | Path, split: str) -> list[Example]:
    """The examples of `<root>/<split>.tsv`, each with its clip located under `<root>/poses/`."""
    root = Path(root)
    manifest = root / f"{split}.tsv"
    if not root.is_dir():
        raise DataError(f"the dataset folder {root} does not exist.")
    if not manifest.is_file():
        raise DataError(f"the {split} split file {manifest} is missing (expected '<id><TAB><text>' lines).")
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{manifest} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        sample_id, tab, text = line.partition("\t")
        sample_id, text = sample_id.strip(), text.strip()
        if not tab or not sample_id or not text:
            raise DataError(f"{manifest} line {number} is malformed: expected '<id><TAB><text>' with both non-empty.")
        if sample_id in seen:
            raise DataError(f"{manifest} line {number} repeats sample {sample_id!r} already on line {seen[sample_id]}.")
        if Path(sample_id).is_absolute() or ".." in Path(sample_id).parts:
            raise DataError(f"{manifest} line {number}: sample id {sample_id!r} must be a relative name inside poses/.")
        clip = _clip_path(root / "poses", sample_id)
        if clip is None:
            raise DataError(
                f"{manifest} line {number}: no clip for sample {sample_id!r} "
                f"(looked for poses/{sample_id}.npy, .pkl or an OpenPose folder poses/{sample_id}/)."
            )
        seen[sample_id] = number
        examples.append(Example(sample_id, clip, text))
    if not examples:
        raise DataError(f"the {split} split file {manifest} lists no samples.")
    return examples


@dataclass(frozen=True)
class Truncation:
    """How much of a split the length limits cut."""

    split: str
    clips: int
    clips_truncated: int  # clips longer than max_length frames, subsampled
    max_length: int
    texts_truncated: int  # targets longer than max_target_length tokens, cut
    max_target_length: int

    def notice(self) -> str:
        return (
            f"{self.split}: {self.clips_truncated} of {self.clips} clips longer than max_length {self.max_length} frames "
            f"(subsampled), {self.texts_truncated} target texts longer than max_target_length {self.max_target_length} tokens (cut)"
        )


def frame_indices(length: int, max_length: int, train: bool, seed: int, epoch: int, index: int) -> np.ndarray:
    """Which frames of a `length`-frame clip to keep: all, or `max_length` sorted ones."""
    if length <= max_length:
        return np.arange(length)
    if not train:
        return np.linspace(0, length - 1, max_length).round().astype(np.int64)
    rng = np.random.default_rng([seed, epoch, index])
    return np.sort(rng.choice(length, size=max_length, replace=False))


class TranslationDataset(torch.utils.data.Dataset):
    """Normalised clips and tokenised targets of one split.

    `encode(text) -> list[int]` is the tokenizer (ending in its end-of-sequence
    id). Texts are tokenised once here; clips are read on access.
    """

    def __init__(self, examples: Sequence[Example], encode, split: str, max_length: int, max_target_length: int,
                 train: bool, seed: int = 0, threshold: float = 0.3) -> None:
        self.examples = tuple(examples)
        self.split, self.max_length, self.train, self.seed, self.threshold = split, max_length, train, seed, threshold
        self.epoch = 0
        self.targets: list[list[int]] = []
        texts_cut = 0
        for example in self.examples:
            ids = list(encode(example.text))
            if len(ids) > max_target_length:
                texts_cut += 1
                ids = ids[: max_target_length - 1] + ids[-1:]  # keep the end-of-sequence token
            self.targets.append(ids)
        clips_cut = 0
        for example in self.examples:
            try:
                frames = clip_length(example.clip)
            except KeypointError as exc:
                raise DataError(f"sample {example.id!r}: {exc}") from None
            if frames == 0:
                raise DataError(f"sample {example.id!r}: {example.clip} holds no frames.")
            clips_cut += frames > max_length
        self.truncation = Truncation(split, len(self.examples), clips_cut, max_length, texts_cut, max_target_length)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        try:
            clip = read_clip(example.clip)
        except KeypointError as exc:
            raise DataError(f"sample {example.id!r}: {exc}") from None
        keep = frame_indices(len(clip), self.max_length, self.train, self.seed, self.epoch, index)
        parts = normalise_parts(clip[keep], self.threshold)
        return {
            "id": example.id,
            "parts": {name: torch.from_numpy(parts[name]) for name in PART_NAMES},
            "labels": torch.tensor(self.targets[index], dtype=torch.long),
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples: clips padded by repeating their last frame, with a frame mask; targets padded with -100."""
    frames = [len(s["parts"]["body"]) for s in samples]
    longest = max(frames)
    mask = torch.zeros(len(samples), longest)
    for i, n in enumerate(frames):
        mask[i, :n] = 1
    parts = {}
    for name in PART_NAMES:
        padded = []
        for s, n in zip(samples, frames):
            x = s["parts"][name]
            padded.append(torch.cat([x, x[-1:].expand(longest - n, *x.shape[1:])]) if n < longest else x)
        parts[name] = torch.stack(padded)
    target_len = max(len(s["labels"]) for s in samples)
    labels = torch.full((len(samples), target_len), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        labels[i, : len(s["labels"])] = s["labels"]
    return {"ids": [s["id"] for s in samples], "parts": parts, "mask": mask, "labels": labels}
