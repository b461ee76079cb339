"""Runs through Ray Train on the shared local Ray instance: the CLI end to end,
DDP with 2 workers, determinism, resume through Ray's storage, and failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from raylab.checkpoint import read_checkpoint_state
from raylab.cli import app
from raylab.config import LaunchConfig
from raylab.launch import train

pytestmark = pytest.mark.ray


def run_ray(tmp_path: Path, name: str, overrides: dict, workers: int = 1):
    return train("tinyimagenet", "quick", overrides, LaunchConfig(num_workers=workers, storage_path=str(tmp_path), name=name))


def weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(checkpoint) / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quick_stage_through_the_cli_learns(tmp_path):
    # The installed console script in its own process, with its own embedded Ray: what a user runs.
    command = [shutil.which("raylab") or sys.executable, *([] if shutil.which("raylab") else ["-m", "raylab.cli"])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [*command, "train", "tinyimagenet", "--stage", "quick", "--storage", str(tmp_path), "--name", "quick"],
        capture_output=True, text=True, timeout=540, env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "tinyimagenet quick: done" in output and "val_accuracy" in output
    # One display, no worker log spam or Ray chatter.
    for noise in ("RayTrainWorker", "Failed to query", "(pid=", "WARNING", "Traceback"):
        assert noise not in output, output
    run = tmp_path / "quick"
    metrics = pd.read_parquet(run / "metrics.parquet")
    # 10 synthetic classes: chance is 0.1; the quick stage must reach 3x chance.
    assert metrics["val_accuracy"].iloc[-1] >= 0.3, metrics
    assert (run / "checkpoint_manager_snapshot.json").is_file()  # checkpoints registered with Ray's storage
    checkpoints = sorted(run.glob("checkpoint_epoch*"))
    assert [c.name for c in checkpoints][-1] == "checkpoint_epoch0003_batch000000_step00000093"
    state = read_checkpoint_state(checkpoints[-1])
    assert state["world_size"] == 1 and state["position"]["epoch"] == 3
    assert list(run.glob("tensorboard/events.out.tfevents.*"))
    assert (run / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("workers", [1, 2])
def test_same_seed_same_worker_count_same_weights(ray_session, tmp_path, tiny, workers):
    a = run_ray(tmp_path, "a", tiny(seed=11, max_epochs=1), workers)
    b = run_ray(tmp_path, "b", tiny(seed=11, max_epochs=1), workers)
    assert read_checkpoint_state(a.latest_checkpoint)["world_size"] == workers
    assert same_weights(weights(a.latest_checkpoint), weights(b.latest_checkpoint))
    if workers == 2:  # DDP really split the data: each worker took 48 // 8 = 6 steps per epoch, not 12
        assert int(a.final["step"]) == 6


def test_rerun_with_same_name_resumes_from_ray_checkpoint(ray_session, tmp_path, tiny):
    cfg = tiny(seed=4, checkpoint_every_batches=4)
    whole = run_ray(tmp_path, "whole", cfg)
    first = run_ray(tmp_path, "split", {**cfg, "max_steps": 7})
    assert read_checkpoint_state(first.latest_checkpoint)["position"]["global_step"] == 7
    resumed = run_ray(tmp_path, "split", cfg)
    assert same_weights(weights(whole.latest_checkpoint), weights(resumed.latest_checkpoint))
    # Ray's retention (keep_checkpoints=3 here) applies to checkpoints in storage.
    assert len(list((tmp_path / "split").glob("checkpoint_epoch*"))) == 3


def test_worker_error_reaches_the_user_with_its_cause(ray_session, tmp_path, tiny):
    missing = tmp_path / "no-such-dataset"
    result = CliRunner().invoke(app, ["train", "tinyimagenet", "--storage", str(tmp_path), "--set", f"data_dir={missing}"])
    assert result.exit_code == 1
    assert "run failed: DataError" in result.output and "no-such-dataset" in result.output


def test_workers_that_cannot_fit_fail_fast(ray_session, tmp_path):
    result = CliRunner().invoke(app, ["train", "tinyimagenet", "--storage", str(tmp_path), "--workers", "64"])
    assert result.exit_code == 1
    assert "needs 64 CPUs" in result.output
