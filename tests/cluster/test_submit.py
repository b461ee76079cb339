"""`raylab submit` against a real head (its own temp dir, ports and token; dashboard on):
a quick run SUCCEEDS with its checkpoints and metrics in storage, a failing run ends
FAILED with raylab's one-sentence cause and a non-zero exit, and plain
`ray job submit -- raylab ...` works too."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from raylab.cli import app
from raylab.local_cluster import LocalCluster
from raylab.submit import entrypoint, job_api_address, runtime_env

REPO = Path(__file__).resolve().parents[2]
RAYLAB = shutil.which("raylab") or "raylab"


@pytest.fixture(scope="module")
def head():
    with LocalCluster(num_cpus=2, dashboard=True) as cluster:
        yield cluster


def sets(values: dict) -> list[str]:
    return [f"--set={k}={v}" for k, v in values.items()]


def run(cmd: list[str], env: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def checkout_copy(tmp_path: Path) -> Path:
    """A raylab checkout whose experiment file differs from the repo's: proves what the job ran."""
    root = tmp_path / "checkout"
    for part in ("platform", "models", "experiments"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    experiment = root / "experiments" / "tinyimagenet.yaml"
    data = yaml.safe_load(experiment.read_text())
    data["defaults"]["keep_checkpoints"] = 1
    experiment.write_text(yaml.safe_dump(data))
    return root


@pytest.mark.ray
def test_submit_quick_run_succeeds_from_an_uploaded_checkout(head, tmp_path, tiny):
    head.wait_for_jobs()
    storage = tmp_path / "runs"
    proc = run([RAYLAB, "submit", "--address", head.dashboard_url, "--working-dir", str(checkout_copy(tmp_path)), "--",
                "train", "tinyimagenet", "--workers", "1", "--storage", str(storage), "--name", "submitted", *sets(tiny())],
               head.env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    job_id = re.search(r"job (raysubmit_\w+) submitted", out).group(1)
    assert f"job {job_id} SUCCEEDED" in out
    assert re.search(r"tinyimagenet quick: step \d+/24", out)  # raylab's plain progress lines, streamed
    assert head.job_client().get_job_status(job_id) == "SUCCEEDED"
    run_dir = storage / "submitted"
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    # keep_checkpoints: 1 comes from the uploaded experiment file (the repo's says 3).
    assert [c.name for c in checkpoints] == ["checkpoint_epoch0002_batch000000_step00000024"]
    assert (checkpoints[0] / "model.safetensors").is_file() and (checkpoints[0] / "state.json").is_file()
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["step"].max() == 24 and "val_accuracy" in metrics


@pytest.mark.ray
def test_failing_job_ends_failed_with_the_cause_and_exit_1(head, tmp_path, tiny):
    head.wait_for_jobs()
    missing = tmp_path / "no-such-data"
    proc = run([RAYLAB, "submit", "--address", head.dashboard_url, "--", "train", "tinyimagenet", "--workers", "1",
                "--storage", str(tmp_path / "runs"), *sets(tiny(data_dir=missing))], head.env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    job_id = re.search(r"job (raysubmit_\w+) submitted", out).group(1)
    assert re.search(rf"job {job_id} FAILED: Job entrypoint command failed with exit code 1\n", out)
    cause = f"Dataset root {missing} does not exist or is not a directory."
    assert cause in out
    assert head.job_client().get_job_status(job_id) == "FAILED"
    assert cause in head.job_client().get_job_logs(job_id)


@pytest.mark.ray
def test_plain_ray_job_submit_runs_raylab(head, tmp_path, tiny):
    head.wait_for_jobs()
    storage = tmp_path / "runs"
    proc = run([str(Path(RAYLAB).parent / "ray"), "job", "submit", "--address", head.dashboard_url, "--",
                "raylab", "train", "tinyimagenet", "--workers", "1", "--storage", str(storage), "--name", "plain",
                *sets(tiny(max_epochs=1))], head.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Job 'raysubmit_" in proc.stdout and "succeeded" in proc.stdout
    assert list((storage / "plain").glob("checkpoint_epoch0001_*/model.safetensors"))


@pytest.mark.ray
def test_no_wait_returns_the_job_id_at_once(head):
    head.wait_for_jobs()
    proc = run([RAYLAB, "submit", "--address", head.dashboard_url, "--no-wait", "--env", "RAYLAB_NOTE=x y", "--",
                "train", "--help"], head.env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"job (raysubmit_\w+) submitted", proc.stdout).group(1)
    assert f"ray job logs {job_id} --address {head.dashboard_url} --follow" in proc.stdout
    client = head.job_client()
    assert client.get_job_info(job_id).runtime_env == {"env_vars": {"RAYLAB_NOTE": "x y"}}
    status = wait_until_terminal(client, job_id)
    assert status == "SUCCEEDED", client.get_job_logs(job_id)
    assert "Usage: raylab train" in client.get_job_logs(job_id)  # it ran on the head


@pytest.mark.ray
def test_submit_the_moment_ray_start_returns_succeeds():
    # A user who submits right after `ray start --head` returns: the job API may not answer yet
    # (raylab submit retries the connection for 15 s) or may refuse with "No available agent to
    # submit job" (it retries until the agent is up). Ray 2.60 here accepted the job at once, so
    # this checks the user's outcome, not which of the retries ran. Its own head, no warm-up job.
    with LocalCluster(num_cpus=1, dashboard=True) as fresh:
        proc = run([RAYLAB, "submit", "--address", fresh.dashboard_url, "--", "models"], fresh.env, timeout=180)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        job_id = re.search(r"job (raysubmit_\w+) submitted", out).group(1)
        assert f"job {job_id} SUCCEEDED" in out
        assert "tinyimagenet" in out and "DiT-S/2" in out  # `raylab models` ran on the head, its table streamed back
        assert "No available agent" not in out and "Traceback" not in out
        assert fresh.job_client().get_job_status(job_id) == "SUCCEEDED"


def wait_until_terminal(client, job_id: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s} s")


@pytest.mark.ray
def test_submit_without_the_token_is_refused_in_one_sentence(head, tmp_path):
    head.wait_for_jobs()
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    proc = run([RAYLAB, "submit", "--address", head.dashboard_url, "--", "models"], env, timeout=120)
    assert proc.returncode == 1
    message = " ".join(proc.stderr.split())
    assert f"the Ray job API at {head.dashboard_url} requires token authentication; set RAY_AUTH_MODE=token" in message
    assert "Traceback" not in proc.stderr


# --- without a cluster ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--", "sumbit"], "'sumbit' is not a raylab command; give one of"),
        (["--", "submit", "--", "train"], "'submit' is not a raylab command"),
        (["--env", "NOEQUALS", "--", "train"], "--env 'NOEQUALS' is not of the form KEY=VALUE."),
        (["--working-dir", "/no/such/dir", "--", "train"], "--working-dir /no/such/dir is not a folder."),
    ],
)
def test_bad_submit_arguments_exit_2(args, message):
    result = CliRunner().invoke(app, ["submit", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_job_address_defaults(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is not the job API
    assert job_api_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    assert job_api_address(None) == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert job_api_address(None) == "http://head:8265"
    assert job_api_address("127.0.0.1:9999") == "http://127.0.0.1:9999"


def test_runtime_env_uploads_the_checkout_and_its_platform_package(tmp_path):
    assert runtime_env(None) == {}
    env = runtime_env(REPO, {"RAYLAB_CACHE_DIR": "/data/cache"})
    assert env == {"working_dir": str(REPO), "py_modules": [str(REPO / "platform" / "raylab")],
                   "env_vars": {"RAYLAB_CACHE_DIR": "/data/cache"}}
    assert entrypoint(["train", "tinyimagenet", "--set", "note=a b"]) == "raylab train tinyimagenet --set 'note=a b'"
