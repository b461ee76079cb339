"""raylab's own local Ray (raylab.ray_embedded): it starts neither the processes nor the
controller's actors that only a cluster needs, trains the same weights as Ray's stock
controller, and its shutdown leaves no process of the instance running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from raylab.config import LaunchConfig
from raylab.launch import train
from raylab.ray_embedded import STOCK_ENV

pytestmark = pytest.mark.ray

DEFAULT_AGENT_PORT = 52365  # ray._private.ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT
CLUSTER_ONLY = {"DatasetManager", "PlacementGroupCleaner", "_AutoscalingCoordinatorActor"}


def _actors() -> dict[str, str]:
    import ray

    return {actor_id: info["ActorClassName"] for actor_id, info in ray._private.state.actors().items()}


def _run_and_new_actors(tmp_path: Path, name: str, overrides: dict) -> tuple[set[str], dict[str, torch.Tensor]]:
    before = _actors()
    summary = train("tinyimagenet", "quick", overrides, LaunchConfig(num_workers=1, storage_path=str(tmp_path), name=name))
    started = {cls for actor_id, cls in _actors().items() if actor_id not in before}
    return started, safetensors.torch.load_file(str(Path(summary.latest_checkpoint) / "model.safetensors"))


def test_the_embedded_controller_starts_no_cluster_only_actor_and_trains_alike(ray_session, tmp_path, tiny, monkeypatch):
    lean, lean_weights = _run_and_new_actors(tmp_path, "lean", tiny(max_epochs=1))
    assert {"TrainController", "RayTrainWorker"} <= lean, lean
    assert not lean & CLUSTER_ONLY, lean

    monkeypatch.setenv(STOCK_ENV, "1")  # Ray's stock controller, as on a cluster
    stock, stock_weights = _run_and_new_actors(tmp_path, "stock", tiny(max_epochs=1))
    assert {"DatasetManager", "PlacementGroupCleaner"} <= stock, stock
    assert lean_weights.keys() == stock_weights.keys()
    assert all(torch.equal(lean_weights[k], stock_weights[k]) for k in lean_weights)


def test_embedded_instance_starts_only_what_a_run_uses_and_shutdown_stops_it_all(tmp_path):
    """No autoscaler monitor or API server on a `raylab train` instance (Ray's stock set with
    RAYLAB_STOCK_RAY=1); the dashboard agent binds a port of its own even where Ray's default
    (52365) is taken, as by another Ray instance; shutdown_embedded leaves nothing running."""
    script = textwrap.dedent("""
        import json, os, sys
        import ray
        from raylab.config import LaunchConfig
        from raylab.ray_backend import ensure_ray
        from raylab.ray_embedded import STOCK_ENV, shutdown_embedded

        out = {}
        for side in ("lean", "stock"):
            os.environ[STOCK_ENV] = "1" if side == "stock" else ""
            assert ensure_ray(LaunchConfig())
            node = ray._private.worker._global_node
            processes = [p.process for infos in node.all_processes.values() for p in infos]
            kinds, agent_port = sorted(node.all_processes), node._ray_params.dashboard_agent_listen_port
            shutdown_embedded()
            out[side] = {"kinds": kinds, "agent_port": agent_port, "initialized": ray.is_initialized(),
                         "running": [p.pid for p in processes if p.poll() is None]}
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with socket.socket() as blocker:
        try:  # Ray's default agent port, held as another Ray instance on this machine would hold it
            blocker.bind(("0.0.0.0", DEFAULT_AGENT_PORT))
            blocker.listen()
        except OSError:
            pass  # already held by another process: the same situation
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lean, stock = result["lean"], result["stock"]
    assert {"gcs_server", "raylet"} <= set(lean["kinds"]) and not {"monitor", "dashboard"} & set(lean["kinds"]), lean
    assert {"monitor", "dashboard"} <= set(stock["kinds"]), stock
    for side in (lean, stock):
        assert side["agent_port"] not in (DEFAULT_AGENT_PORT, -1, 0, None), side  # -1: the agent gave up binding
        assert not side["initialized"] and side["running"] == [], side
