"""Seed 003's complaint was models stuck at chance: every family must learn on the
quick stage's synthetic data (10 classes, chance 0.1), through the real loop."""

from __future__ import annotations

import pytest

from raylab.config import LaunchConfig
from raylab.launch import train


@pytest.mark.parametrize("family", ["baseline", "residual", "deeper_wider", "se"])
def test_quick_stage_beats_three_times_chance(tmp_path, family):
    summary = train(
        "tinyimagenet", "quick", {"family": family, "num_samples": 0},
        LaunchConfig(num_workers=0, storage_path=str(tmp_path), name=family),
    )
    assert summary.best("val_accuracy") >= 0.3, summary.metrics[["step", "train_loss", "val_accuracy"]]
