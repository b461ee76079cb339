"""`--address` runs on an existing Ray cluster (here: a head this test starts with
`ray start`, token auth on, as on a real cluster) instead of an embedded one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from raylab.local_cluster import LocalCluster

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_head():
    """A head of this test's own (temp dir, ports, token); stopping it stops only its processes."""
    with LocalCluster(num_cpus=2) as cluster:
        yield cluster


def test_train_on_an_existing_cluster_by_address(ray_head, tmp_path, tiny):
    sets = [f"--set={k}={v}" for k, v in tiny(max_epochs=1).items()]
    proc = subprocess.run(
        [shutil.which("raylab") or "raylab", "train", "tinyimagenet", "--address", ray_head.address, "--workers", "2",
         "--storage", str(tmp_path), "--name", "on-cluster", *sets],
        capture_output=True, text=True, timeout=400, env=ray_head.env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = Path(tmp_path / "on-cluster")
    assert (run / "checkpoint_manager_snapshot.json").is_file()
    assert list(run.glob("checkpoint_epoch0001_*/model.safetensors"))


def test_a_token_cluster_refuses_a_driver_without_the_token(ray_head, tmp_path, tiny):
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    proc = subprocess.run(
        [shutil.which("raylab") or "raylab", "train", "tinyimagenet", "--address", ray_head.address, "--workers", "1",
         "--storage", str(tmp_path / "runs"), *[f"--set={k}={v}" for k, v in tiny(max_epochs=1).items()]],
        capture_output=True, text=True, timeout=200, env=env,
    )
    assert proc.returncode == 1
    assert "set RAY_AUTH_MODE=token" in " ".join(proc.stderr.split())
