"""GMAN on Ray Train's TensorflowTrainer with 2 workers (MultiWorkerMirroredStrategy, the shared
local Ray instance): identical weights on both workers with independent dropout, readable
checkpoints, bit-identical mid-epoch resume, and 2 workers x batch B = 1 worker x batch 2B."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from raylab.checkpoint import read_checkpoint_state
from raylab.config import LaunchConfig
from raylab.launch import RunSummary, train

pytestmark = pytest.mark.ray


def run(storage: Path, name: str, overrides: dict, workers: int) -> RunSummary:
    return train("gman", "quick", overrides, LaunchConfig(num_workers=workers, storage_path=str(storage), name=name))


def tensors(checkpoint: str | Path) -> dict[str, np.ndarray]:
    folder = Path(checkpoint)
    return {**safetensors.numpy.load_file(str(folder / "model.safetensors")),
            **safetensors.numpy.load_file(str(folder / "optimizer.safetensors"))}


def tiny(traffic_files, **extra) -> dict:
    h5, se = traffic_files
    return {"data_path": str(h5), "se_path": str(se), "L": 1, "K": 2, "d": 2, "per_worker_batch_size": 8, "output_dropout": 0.1,
            "max_epochs": 1, "max_steps": 10, "log_every_steps": 5, "num_samples": 1, **extra}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gman-ray")


@pytest.fixture(scope="module")
def two_workers(ray_session, storage, traffic_files) -> RunSummary:
    """10 steps on 2 workers, output dropout on, uninterrupted."""
    return run(storage, "whole", tiny(traffic_files, seed=4), workers=2)


def test_two_workers_agree_with_their_own_dropout_masks(two_workers):
    # The run ending at all means the core's replica check passed at its checkpoint: both
    # workers' trainable variables were equal, although each drew its own dropout masks.
    state = read_checkpoint_state(two_workers.latest_checkpoint)
    assert state["world_size"] == 2 and state["framework"] == "tensorflow"
    assert state["position"] == {"epoch": 0, "batch_in_epoch": 10, "global_step": 10}
    seeds = [rng["seed_generators"] for rng in state["rng"]]
    assert seeds[0].keys() == seeds[1].keys() and seeds[0] != seeds[1]
    saved = tensors(two_workers.latest_checkpoint)
    assert int(saved["adam/iteration"]) == 10 and np.isfinite(saved["gman/output/dense_1/kernel"]).all()
    assert (Path(two_workers.run_path) / "checkpoint_manager_snapshot.json").is_file()  # registered with Ray's storage
    assert np.isfinite(two_workers.final["val_mae_h12"])


def test_two_worker_mid_epoch_resume_is_bit_identical(storage, traffic_files, two_workers):
    first = run(storage, "split", tiny(traffic_files, seed=4, max_steps=4), workers=2)
    assert read_checkpoint_state(first.latest_checkpoint)["position"]["global_step"] == 4
    resumed = run(storage, "split", tiny(traffic_files, seed=4), workers=2)
    # Also the 2-worker same-seed check: `split` is a second, independent 2-worker run of the same config.
    a, b = tensors(two_workers.latest_checkpoint), tensors(resumed.latest_checkpoint)
    assert a.keys() == b.keys()
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_two_workers_batch_b_train_like_one_worker_batch_2b(ray_session, storage, traffic_files):
    # Without dropout the two runs see the same global batches (the plan shards each global
    # batch across workers) and take the same steps up to float summation order. Compared:
    # kernels, BatchNorm variances and Adam's first moments of the kernels -- these are linear
    # in the gradients, so a loss divided by each worker's own weight would show (Adam's update
    # itself ignores a constant scale). Biases feeding a BatchNorm are left out: their true
    # gradient is 0, so Adam steps them by +-lr on float noise alone.
    two = run(storage, "b8x2", tiny(traffic_files, seed=9, output_dropout=0.0, num_samples=0), workers=2)
    one = run(storage, "b16x1", tiny(traffic_files, seed=9, output_dropout=0.0, num_samples=0, per_worker_batch_size=16), workers=0)
    a, b = tensors(two.latest_checkpoint), tensors(one.latest_checkpoint)
    assert two.final["train_loss"] == pytest.approx(one.final["train_loss"], rel=1e-4)
    limits = {"/kernel": 1e-3, "moving_variance": 1e-3, "_kernel_momentum": 2e-2}
    worst = {end: max(relative_difference(a[k], b[k]) for k in a if k.endswith(end)) for end in limits}
    assert all(worst[end] < limit for end, limit in limits.items()), worst
    scale = [np.linalg.norm(a[k]) / np.linalg.norm(b[k]) for k in a if k.endswith("_kernel_momentum")]
    assert 0.98 < min(scale) and max(scale) < 1.02, (min(scale), max(scale))
