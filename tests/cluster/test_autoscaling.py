"""Autoscaling on Ray's fake multi-node provider: a head with no CPUs gets a 2-worker
run; the autoscaler adds two worker nodes, the run finishes on them, and the idle
nodes are removed (node counts sampled from the cluster's state API every second)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "autoscaling_demo.py"

pytestmark = pytest.mark.ray


def load_demo():
    spec = importlib.util.spec_from_file_location("autoscaling_demo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nodes_are_added_for_the_run_and_removed_when_idle(tmp_path, tiny_data):
    demo = load_demo()
    result = demo.run_demo(tmp_path, {"data_dir": str(tiny_data), **demo.SMOKE_SETS}, workers=2, idle_timeout_minutes=0.1)
    demo.print_timeline(result)
    assert result["exit_code"] == 0, result["submit_log"]
    assert not result["monitor_traceback"]
    assert result["worker_nodes_before"] == 0  # the head alone cannot run a single worker
    assert result["max_worker_nodes"] == 2
    # Nodes came after the submission and went after being used, without anyone stopping them.
    assert result["submitted_s"] < result["all_nodes_s"] < result["nodes_gone_s"]
    assert result["samples"][-1]["worker_nodes"] == 0 and not result["samples"][-1]["job_running"]
    assert result["checkpoints"] == ["checkpoint_epoch0001_batch000000_step00000006",
                                     "checkpoint_epoch0002_batch000000_step00000012"]
    assert "SUCCEEDED" in result["submit_log"]
