"""`--address` runs on an existing Ray cluster (here: a head this test starts with
`ray start`, token auth on, as on a real cluster) instead of an embedded one."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_processes(marker: str) -> list[int]:
    """PIDs of the Ray processes of this test's head: their command lines name its temp dir."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split() if int(pid) != os.getpid()]


@pytest.fixture
def cluster_env() -> dict[str, str]:
    """Token auth with a token of this test's own: never whatever ~/.ray/auth_token holds."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def ray_head(cluster_env):
    temp_dir = tempfile.mkdtemp(prefix="rlhead-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = cluster_env
    subprocess.run(
        ["ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
        check=True, capture_output=True, env=env, timeout=120,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        # Stop only what this fixture started (never `ray stop`, which stops every Ray on the machine).
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in own_processes(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_train_on_an_existing_cluster_by_address(ray_head, cluster_env, tmp_path, tiny):
    env = cluster_env
    sets = [f"--set={k}={v}" for k, v in tiny(max_epochs=1).items()]
    proc = subprocess.run(
        [shutil.which("raylab") or "raylab", "train", "tinyimagenet", "--address", ray_head, "--workers", "2",
         "--storage", str(tmp_path), "--name", "on-cluster", *sets],
        capture_output=True, text=True, timeout=400, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = Path(tmp_path / "on-cluster")
    assert (run / "checkpoint_manager_snapshot.json").is_file()
    assert list(run.glob("checkpoint_epoch0001_*/model.safetensors"))
