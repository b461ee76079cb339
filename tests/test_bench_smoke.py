"""`python -m bench --smoke` runs every measurement end to end and writes its JSON and plots.

Nothing here asserts a timing: the checks are that each measurement's mechanism
produced figures (stamped steps, a traced checkpoint, a resumed run, a memory
peak, a FLOP count, a first step through Ray).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# Marked ray (it is slow), without the shared ray_session fixture: every benchmarked command
# starts its own embedded Ray, as a user's `raylab train` does, and stops it when it exits.
@pytest.mark.ray
def test_bench_smoke_writes_every_measurement(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True
    assert set(summary["measurements"]) == {"throughput", "startup", "checkpoint", "resume", "tune", "memory", "scaling"}
    assert all("error" not in m for m in summary["measurements"].values())
    data = {name: json.loads((out / f"{name}.json").read_text()) for name in summary["measurements"]}
    for name in ("throughput", "startup", "checkpoint", "resume", "memory", "scaling"):
        assert (out / f"{name}.png").stat().st_size > 0, name
        assert data[name]["load_before"] and data[name]["load_after"] and data[name]["machine"]["cpus"] >= 1

    throughput = data["throughput"]["figures"]
    assert throughput["plain"]["samples_per_s"]["median"] > 0 and throughput["raylab_w0"]["samples_per_s"]["median"] > 0
    startup = data["startup"]["figures"]["raylab_w1"]
    # Ray's timeline and the worker's stamps both arrived: the controller's start and the task's build are phases.
    assert 0 < startup["first_step_s"]["median"] < startup["command_s"]["median"]
    assert "phase: Train controller init (imports Train, torch)" in startup
    assert "phase: task build: data index + model build" in startup
    checkpoint = data["checkpoint"]["figures"]["w0_every"]
    assert checkpoint["checkpoints_in_window"]["median"] >= 1 and "part: serialise (safetensors, optimizer)" in checkpoint
    resume = data["resume"]["figures"]
    assert {"batch 2", "batch 8"} <= set(resume) and resume["batch 8"]["resume_to_first_step_s"]["median"] > 0
    assert data["memory"]["figures"]["tinyimagenet"]["w0"]["driver"] > 100  # MB: torch alone is more
    assert data["scaling"]["figures"]["tinyimagenet"]["quick"]["gflops_per_step"] > 0
    assert "raylab --workers 1 within 2%" in proc.stdout  # the tables were printed
