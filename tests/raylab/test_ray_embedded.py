"""raylab's own local Ray (raylab.ray_embedded): its controller leaves out the actors only a
cluster needs, trains the same weights as Ray's stock controller, and its shutdown leaves
no process of the instance running."""

from __future__ import annotations

import json
import os
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


def test_shutdown_embedded_stops_every_process_of_the_instance(tmp_path):
    script = textwrap.dedent("""
        import json, sys
        import ray
        from raylab.config import LaunchConfig
        from raylab.ray_backend import ensure_ray
        from raylab.ray_embedded import shutdown_embedded

        assert ensure_ray(LaunchConfig())
        processes = [p.process for infos in ray._private.worker._global_node.all_processes.values() for p in infos]
        shutdown_embedded()
        print(json.dumps({"initialized": ray.is_initialized(), "kinds": len(processes),
                          "running": [p.pid for p in processes if p.poll() is None]}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kinds"] >= 4 and not result["initialized"]  # GCS, raylet, monitor, log monitor, ...
    assert result["running"] == [], result
