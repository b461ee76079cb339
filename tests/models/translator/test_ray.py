"""The translator on 2 Ray Train workers (DDP): BLEU is scored over the whole dev split,
gathered from both workers, and the replicas stay in step."""

from __future__ import annotations

import pytest

from raylab.checkpoint import read_checkpoint_state
from raylab.config import LaunchConfig
from raylab.launch import train

pytestmark = pytest.mark.ray


def test_two_workers_gather_every_translation(ray_session, tmp_path, tiny_translator):
    # 16 dev clips split 8 + 8 between the ranks; val_sentences counts what was scored after the gather.
    summary = train("translator", "quick", tiny_translator(per_worker_batch_size=4, max_steps=3),
                    LaunchConfig(num_workers=2, storage_path=str(tmp_path), name="ddp"))
    assert summary.final["val_sentences"] == 16
    assert 0 <= summary.final["val_bleu"] <= 100
    state = read_checkpoint_state(summary.latest_checkpoint)
    assert state["world_size"] == 2 and state["position"]["global_step"] == 3
