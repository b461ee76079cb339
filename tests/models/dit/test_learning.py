"""Seed 000 trained a DiT without ever checking its samples. The quick stage, run
through the real loop on CPU, must take conditional samples from chance to
recognisable: sample_label_accuracy (nearest class template, 10 classes) from
about 0.1 at the round before step 0 to >= 0.9."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raylab.config import LaunchConfig
from raylab.launch import train

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def one_thread():
    """A tiny model on a shared 2-core machine: a second intra-op thread only adds contention
    (measured here under load: 0.27 s/step with 1 thread, 5.8 s/step with 2). Results are the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("experiment", ["dit.yaml", "dit_tokens.yaml"])  # 8x8 images (`raylab train dit`'s default), 8-feature tokens
def test_quick_stage_goes_from_chance_to_recognisable_samples(tmp_path, one_thread, experiment):
    summary = train("dit", "quick", {}, LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="quick"),
                    experiment=REPO / "experiments" / experiment)
    rounds = summary.metrics.dropna(subset=["sample_label_accuracy"])
    table = rounds[["step", "sample_label_accuracy", "sample_label_accuracy_guided"]]
    assert rounds["step"].iloc[0] == 0 and rounds["sample_label_accuracy"].iloc[0] <= 0.3, table
    assert rounds["sample_label_accuracy"].iloc[-1] >= 0.9, table
    assert rounds["sample_label_accuracy_guided"].iloc[-1] >= 0.9, table
    assert summary.metrics["val_loss"].dropna().iloc[-1] < summary.metrics["val_loss"].dropna().iloc[0]
