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


# --- S3 storage: a real S3-compatible server (moto's server mode) on loopback ---------------

@pytest.fixture(scope="session", autouse=True)
def fake_aws_credentials():
    """Fake AWS credentials for the whole session, set before any Ray starts (workers inherit
    them): a test can never reach real AWS with a developer's own credentials."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(key, None)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    yield


class MotoServer:
    """`moto_server -H 127.0.0.1 -p PORT` with one bucket, stopped by its pid (never by name).

    `uri(prefix)` is a `--storage` value for Ray and pyarrow:
    s3://BUCKET/PREFIX?endpoint_override=http://127.0.0.1:PORT&scheme=http&region=us-east-1
    """

    def __init__(self, bucket: str = "raylab"):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.bucket = bucket
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout_s: float = 30) -> "MotoServer":
        import subprocess
        import sys
        import time

        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.client().create_bucket(Bucket=self.bucket)
                return self
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.2)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def s3():
    """One S3-compatible server for the session; give each test its own prefix: s3.uri("my-test")."""
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def own_s3():
    """A server of this test's own, for tests that stop it mid-run."""
    server = MotoServer().start()
    yield server
    server.stop()
