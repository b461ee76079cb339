"""Fixtures of the translator tests: a tiny synthetic dataset on disk and tiny model overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.translator.synthetic import write_synthetic


@pytest.fixture(scope="session")
def tiny_signs(tmp_path_factory) -> Path:
    """8 words, 64 training and 16 dev sentences as real .npy clips + .tsv files, written once per session."""
    return write_synthetic(tmp_path_factory.mktemp("signs") / "tiny", words=8, train=64, val=16, seed=3)


@pytest.fixture
def tiny_translator(tiny_signs):
    """tiny_translator(**overrides): a ~30K-parameter translator config that trains a step in well under a second."""

    def make(**extra) -> dict:
        return {
            "data_dir": str(tiny_signs), "d_model": 32, "d_kv": 8, "d_ff": 64, "encoder_layers": 2, "decoder_layers": 2,
            "num_heads": 4, "feed_forward": "relu", "gcn_channels": 8, "gcn_blocks": 1, "max_length": 32,
            "max_target_length": 48, "num_beams": 1, "eval_batch_size": 16, "per_worker_batch_size": 8, "max_epochs": 1,
            "num_samples": 0, "dropout": 0.0, "lr": 3e-3, "warmup_steps": 0, "lr_schedule": "constant",
            "log_every_steps": 4, **extra,
        }

    return make
