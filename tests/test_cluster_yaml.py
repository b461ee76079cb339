"""cluster.yaml is a valid `ray up` config, installs the pinned raylab on every node,
and never exposes an unauthenticated cluster (CVE-2023-48022, "ShadowRay"): one test
per property, read from the config exactly as Ray's autoscaler reads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"
WORKER_TYPES = ("cpu_worker", "gpu_worker")


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def prepared() -> dict:
    cfg = prepare_config(load())  # merges setup_commands into head/worker lists, as `ray up` does
    validate_config(cfg)
    return cfg


def setup_commands(cfg: dict, node_type: str) -> list[str]:
    """What the autoscaler runs on a node of this type (a type's own list replaces the merged one)."""
    if node_type == cfg["head_node_type"]:
        return cfg["head_setup_commands"]
    return cfg["available_node_types"][node_type].get("worker_setup_commands", cfg["worker_setup_commands"])


def start_commands(cfg: dict) -> list[str]:
    return [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]


def test_cluster_yaml_passes_rays_schema():
    cfg = prepared()
    assert cfg["provider"]["type"] == "aws"


def test_cpu_only_head_and_cpu_and_gpu_workers_that_scale_from_zero():
    types = load()["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    for kind in WORKER_TYPES:
        assert types[kind]["min_workers"] == 0 and types[kind]["max_workers"] > 0
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))


@pytest.mark.parametrize("node_type", ["head", *WORKER_TYPES])
def test_every_node_installs_pinned_raylab_in_a_virtualenv(node_type):
    commands = setup_commands(prepared(), node_type)
    joined = "\n".join(commands)
    assert "python3 -m venv ~/venv" in joined and "export PATH=$HOME/venv/bin:$PATH" in joined
    installs = [c for c in commands if "pip install" in c and "-e " in c]
    assert len(installs) == 1 and "-c constraints.txt" in installs[0] and installs[0].startswith("cd ~/raylab &&")
    if node_type == "gpu_worker":
        # PyPI's torch==2.13.0 is the CUDA build; the CPU index would give the +cpu wheel.
        assert "download.pytorch.org/whl/cpu" not in installs[0] and '"tensorflow[and-cuda]==2.21.0"' in installs[0]
    else:
        assert "--extra-index-url https://download.pytorch.org/whl/cpu" in installs[0] and '".[tensorflow]"' in installs[0]


def test_images_are_current_deep_learning_amis_not_rays_cuda_11_default():
    for name, node in load()["available_node_types"].items():
        image = node["node_config"]["ImageId"]
        assert image.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/") and "ubuntu-24.04" in image, name


def test_every_ray_start_uses_token_auth():
    cfg = prepared()
    starts = start_commands(cfg)
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    # Shells on the nodes (job drivers, `ray exec`) use it too.
    assert any("export RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"])


def test_the_token_reaches_every_node_and_no_other_secret_does():
    cfg = load()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = CLUSTER.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY=", text)


def test_dashboard_and_job_api_listen_on_the_heads_localhost_only():
    cfg = prepared()
    head = [c for c in start_commands(cfg) if "--head" in c]
    assert len(head) == 1 and "--dashboard-host=127.0.0.1" in head[0]
    assert all("--dashboard-host" not in c for c in start_commands(cfg) if "--head" not in c)


def test_nothing_binds_all_interfaces():
    assert "0.0.0.0" not in CLUSTER.read_text() and "::/0" not in CLUSTER.read_text()


def test_no_security_group_opens_more_than_ssh():
    cfg = load()
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all(rule.get("FromPort") == rule.get("ToPort") == 22 for rule in rules)
    for node in cfg["available_node_types"].values():
        assert "NetworkInterfaces" not in node["node_config"]  # no hand-made public interfaces


def test_runs_go_to_s3_and_the_instructions_say_how():
    text = CLUSTER.read_text()
    assert re.search(r"--storage s3://[\w.-]+/", text)
    assert "ray dashboard cluster.yaml" in text and "raylab submit --address http://127.0.0.1:8265" in text
    assert "IamInstanceProfile" in text  # the note on the workers' S3 access
