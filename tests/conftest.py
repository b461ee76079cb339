"""Shared fixtures: one local Ray instance per test session, tiny synthetic data.

Ray takes ~25 s to start on 2 cores, so every test that needs it shares the
instance `ray_session` starts (through raylab's own `ensure_ray`, so tests run
with exactly the settings users get).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def fresh_cache(tmp_path_factory):
    """Generated datasets go to a folder of this session's: a test never depends on what
    ~/.cache holds. Set before Ray starts, so workers and CLI subprocesses inherit it."""
    os.environ["RAYLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("raylab-cache"))
    yield


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from raylab.config import LaunchConfig
    from raylab.ray_backend import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(LaunchConfig())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 4-class synthetic TinyImageNet folder, written once per session."""
    from models.tinyimagenet.data import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("data") / "tiny", num_classes=4, train_per_class=24, val_per_class=6, seed=1)


@pytest.fixture
def tiny(tiny_data):
    """tiny(**overrides): TinyImageNet overrides that train in about a second."""

    def make(**extra) -> dict:
        return {
            "data_dir": str(tiny_data), "family": "baseline", "width": 4, "image_size": 16, "max_epochs": 2,
            "per_worker_batch_size": 8, "log_every_steps": 2, "num_samples": 2, "eval_batch_size": 32, **extra,
        }

    return make
