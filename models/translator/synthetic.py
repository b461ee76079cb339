"""A synthetic sign-language dataset written in the real on-disk layout (data.py).

Each word of a small vocabulary is a fixed motion: a few key poses of both
wrists (position and rotation), finger curls and mouth opening, interpolated
over about 8 frames. A sentence of 4-6 words is its words' motions one after
another, each time-warped by 0.7-1.3, rendered onto a COCO-WholeBody skeleton
in pixel coordinates, shifted and scaled per clip, with jitter, occluded joints
(low scores), some all-zero frames (a detector that found no one) and a few
all-zero clips. Clips are `.npy` files and `train.tsv` / `dev.tsv` / `test.tsv`
list them, so training reads them through the same loader as real data.

    from models.translator.synthetic import write_synthetic
    root = write_synthetic("/tmp/signs", words=16, train=800, val=80, seed=0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raylab.datasets import write_once

GENERATOR_VERSION = 1
_WORDS = {
    "en": ("hello", "thank", "you", "please", "house", "water", "friend", "school", "today", "tomorrow", "eat",
           "drink", "go", "come", "family", "work", "happy", "sad", "big", "small", "book", "car", "dog", "cat",
           "mother", "father", "help", "want", "need", "learn", "sign", "time", "morning", "night", "good", "bad",
           "yes", "no", "where", "what"),
    "zh": ("你好", "谢谢", "今天", "明天", "学校", "朋友", "吃饭", "喝水", "家人", "工作", "高兴", "老师", "学习", "手语",
           "早上", "晚上", "帮助", "需要", "喜欢", "时间", "医院", "天气", "下雨", "回家", "电话", "问题", "名字", "北京",
           "多少", "什么", "哪里", "可以", "不要", "妈妈", "爸爸", "孩子", "书", "车", "狗", "猫"),
}
MAX_WORDS = min(len(w) for w in _WORDS.values())
_WORD_FRAMES = 8
_KEY_POSES = 3
_ZERO_FRAME_P = 0.04
_ZERO_CLIP_P = 0.02
_OCCLUDED_P = 0.03


def vocabulary(language: str) -> tuple[str, ...]:
    """Every word the synthetic language can use, in the order `words` takes them."""
    return _WORDS[language]


def _base_pose() -> np.ndarray:
    """A frontal upper body in a 512 x 512 frame: (133, 2) pixel coordinates."""
    p = np.zeros((133, 2), dtype=np.float64)
    p[:17] = [(256, 150), (266, 140), (246, 140), (276, 150), (236, 150), (306, 230), (206, 230), (326, 320),
              (186, 320), (316, 400), (196, 400), (291, 430), (221, 430), (291, 540), (221, 540), (291, 640), (221, 640)]
    p[17:23] = [(300, 700), (285, 700), (291, 690), (212, 700), (227, 700), (221, 690)]
    angles = np.linspace(np.pi * 0.95, np.pi * 0.05, 17)  # jaw: ear to ear below the nose
    p[23:40] = np.stack([256 + 32 * np.cos(angles), 150 + 40 * np.sin(angles)], axis=1)
    p[40:50] = np.stack([np.linspace(228, 284, 10), np.full(10, 128)], axis=1)  # brows
    p[50:59] = np.stack([np.r_[np.full(4, 256), np.linspace(246, 266, 5)], np.r_[np.linspace(134, 152, 4), np.full(5, 158)]], axis=1)
    eye = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    p[59:65] = np.stack([241 + 7 * np.cos(eye), 140 + 3 * np.sin(eye)], axis=1)
    p[65:71] = np.stack([271 + 7 * np.cos(eye), 140 + 3 * np.sin(eye)], axis=1)
    lip = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    p[71:83] = np.stack([256 + 14 * np.cos(lip), 172 + 6 * np.sin(lip)], axis=1)
    inner = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    p[83:91] = np.stack([256 + 9 * np.cos(inner), 172 + 3 * np.sin(inner)], axis=1)
    return p


def word_templates(count: int, seed: int) -> np.ndarray:
    """(count, key poses, 17) motion parameters per word: wrist dx, dy, angle x2, curls x10, mouth."""
    rng = np.random.default_rng([seed, 0x5167])
    params = np.empty((count, _KEY_POSES, 17))
    params[..., 0:4] = rng.uniform(-90, 90, (count, _KEY_POSES, 4))  # left dx, dy, right dx, dy
    params[..., 4:6] = rng.uniform(-1.0, 1.0, (count, _KEY_POSES, 2))  # hand rotations
    params[..., 6:16] = rng.uniform(0.0, 1.0, (count, _KEY_POSES, 10))  # finger curls, 5 per hand
    params[..., 16] = rng.uniform(0.0, 1.0, (count, _KEY_POSES))  # mouth opening
    return params


def _resample(keys: np.ndarray, frames: int) -> np.ndarray:
    """Linear interpolation of (K, P) key poses at `frames` evenly spaced times."""
    t = np.linspace(0, len(keys) - 1, frames)
    return np.stack([np.interp(t, np.arange(len(keys)), keys[:, j]) for j in range(keys.shape[1])], axis=1)


def _hand(wrist: np.ndarray, angle: np.ndarray, curls: np.ndarray, side: float) -> np.ndarray:
    """(T, 21, 2) hand joints: a fan of five fingers from the wrist, each shortened and bent by its curl."""
    t = len(wrist)
    out = np.empty((t, 21, 2))
    out[:, 0] = wrist
    spread = np.array([-0.9, -0.35, 0.0, 0.35, 0.7]) * side
    for f in range(5):
        direction = -np.pi / 2 + angle + spread[f]
        curl = curls[:, f]
        pos = wrist.copy()
        for k in range(4):
            bend = direction + side * curl * 0.9 * k
            length = 14.0 * (1.0 - 0.45 * curl) * (1.2 if k == 0 else 1.0)
            pos = pos + np.stack([np.cos(bend), np.sin(bend)], axis=1) * length[:, None]
            out[:, 1 + 4 * f + k] = pos
    return out


def _render(params: np.ndarray, base: np.ndarray) -> np.ndarray:
    """(T, 133, 2) pixel joints for a (T, 17) parameter trajectory."""
    t = len(params)
    pose = np.repeat(base[None], t, axis=0)
    for side, (wrist, elbow, dxy, rot, curls, first) in enumerate(((9, 7, 0, 4, 6, 91), (10, 8, 2, 5, 11, 112))):
        shift = params[:, dxy:dxy + 2]
        pose[:, wrist] += shift
        pose[:, elbow] += shift / 2
        pose[:, first:first + 21] = _hand(pose[:, wrist], params[:, rot], params[:, curls:curls + 5], 1.0 if side == 0 else -1.0)
    pose[:, 83:91, 1] += (np.sin(np.linspace(0, 2 * np.pi, 8, endpoint=False)) * 8)[None] * params[:, 16:17]
    return pose


def make_clip(words: list[int], templates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A (T, 133, 3) float32 clip signing `words` (indices into `templates`)."""
    pieces = [_resample(templates[w], max(4, round(_WORD_FRAMES * rng.uniform(0.7, 1.3)))) for w in words]
    joints = _render(np.concatenate(pieces), _base_pose())
    centre = np.array([256.0, 300.0])
    joints = (joints - centre) * rng.uniform(0.8, 1.2) + centre + rng.uniform(-40, 40, 2)
    joints += rng.normal(0, 1.5, joints.shape)
    scores = rng.uniform(0.6, 1.0, joints.shape[:2])
    scores[:, 11:23] = rng.uniform(0.0, 0.2, (len(joints), 12))  # legs and feet out of frame
    scores[rng.random(scores.shape) < _OCCLUDED_P] = 0.05
    clip = np.concatenate([joints, scores[..., None]], axis=-1).astype(np.float32)
    clip[rng.random(len(clip)) < _ZERO_FRAME_P] = 0
    return clip


def _write(root: Path, words: int, counts: dict[str, int], seed: int, language: str) -> None:
    vocab = _WORDS[language][:words]
    joiner = "" if language == "zh" else " "
    templates = word_templates(words, seed)
    (root / "poses").mkdir(parents=True)
    for split_no, (split, count) in enumerate(counts.items()):
        lines = []
        for k in range(count):
            rng = np.random.default_rng([seed, split_no, k])
            sentence = [int(w) for w in rng.integers(0, words, size=int(rng.integers(4, 7)))]
            clip = make_clip(sentence, templates, rng)
            if rng.random() < _ZERO_CLIP_P:
                clip[:] = 0
            sample_id = f"{split}_{k:05d}"
            np.save(root / "poses" / f"{sample_id}.npy", clip)
            lines.append(f"{sample_id}\t{joiner.join(vocab[w] for w in sentence)}\n")
        (root / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")


def write_synthetic(root: str | Path, words: int = 16, train: int = 800, val: int = 80, seed: int = 0, language: str = "en") -> Path:
    """Write (or reuse) the synthetic dataset with these parameters at `root`; returns `root`.

    Built in a temporary sibling folder and renamed into place, so a concurrent
    writer or a crash never leaves a half-written dataset where a reader looks.
    """
    if language not in _WORDS:
        raise ValueError(f"language must be one of {', '.join(_WORDS)} (got {language!r}).")
    if not 4 <= words <= MAX_WORDS or train < 1 or val < 1:
        raise ValueError(f"need 4 <= words <= {MAX_WORDS}, train >= 1 and val >= 1 (got {words}, {train}, {val}).")
    expected = {"version": GENERATOR_VERSION, "words": words, "train": train, "val": val, "seed": seed, "language": language}
    return write_once(root, expected, lambda staging: _write(staging, words, {"train": train, "dev": val, "test": val}, seed, language))
