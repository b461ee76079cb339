"""cluster.yaml is valid for `ray up` and never exposes an unauthenticated cluster."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_rays_schema():
    validate_config(prepare_config(load()))


def test_autoscaling_cpu_and_gpu_workers():
    types = load()["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    for kind in ("cpu_worker", "gpu_worker"):
        assert types[kind]["min_workers"] == 0 and types[kind]["max_workers"] > 0


def test_every_node_uses_token_auth_and_dashboard_stays_local():
    cfg = load()
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in CLUSTER.read_text()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
