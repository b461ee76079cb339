"""The quick stage learns to detect words: a short run through the real loop, in-process.

The quick stage's own synthetic data (800 train / 100 val images, 128 px) and
width-/8 model, for 4 of its 5 epochs (400 steps of batch 8). Measured here:
val H-mean 0 after 200 steps, 0.82 after 300, 0.91 after 400 (the full quick
stage: 0.92 after 500). About a minute and a half on an idle 2-core machine.

It runs with one intra-op thread: on a shared, oversubscribed machine (load
average 20-50 here) two OpenMP threads made each step ~10x slower than one,
while on an idle machine one thread costs ~1.5x.
"""

from __future__ import annotations

import pytest
import torch

from raylab.config import LaunchConfig
from raylab.launch import train


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_stage_detects_words_on_synthetic_val(tmp_path, one_thread):
    summary = train(
        "craft", "quick", {"max_epochs": 4, "num_samples": 0},
        LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="craft-learns"),
    )
    curve = summary.metrics.dropna(subset=["val_hmean"])
    shown = curve[["step", "train_loss", "val_loss", "val_precision", "val_recall", "val_hmean"]]
    assert curve["val_loss"].iloc[-1] < 0.7 * curve["val_loss"].iloc[0], shown
    assert summary.best("val_hmean") >= 0.5, shown
    assert curve["val_precision"].iloc[-1] >= 0.5 and curve["val_recall"].iloc[-1] >= 0.5, shown
