"""Autoscaling, seen end to end on one machine with Ray's fake multi-node provider.

A head that offers no CPUs (as in cluster.yaml) gets a 2-worker training job
through `raylab submit`; the autoscaler must add two 1-CPU "nodes" (extra
raylets on this machine), the run must finish on them, and the idle nodes
must be removed again. Node counts come from the cluster's state API (the
same list as `ray.nodes()`), sampled every second:

    python bench/autoscaling_demo.py            # TinyImageNet quick stage, 2 workers
    python bench/autoscaling_demo.py --smoke    # tiny data and model (what the test runs)

Prints the timeline and writes JSON (default bench/results/autoscaling_demo.json).
The cluster is a `raylab.local_cluster.LocalCluster`: its own temp dir, ports
and token, stopped without touching any other Ray process on the machine.
Nothing is asserted here; tests/cluster/test_autoscaling.py asserts on the
smoke run's timeline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from raylab.local_cluster import FakeAutoscaling, LocalCluster

SMOKE_SETS = {"family": "baseline", "width": 4, "image_size": 16, "max_epochs": 2, "per_worker_batch_size": 8,
              "log_every_steps": 2, "num_samples": 0, "eval_batch_size": 32}


def worker_nodes(cluster: LocalCluster) -> int:
    """Alive non-head nodes, from the state API (what `ray list nodes` shows)."""
    reply = requests.get(f"{cluster.dashboard_url}/api/v0/nodes?limit=1000", headers=cluster.auth_headers, timeout=10)
    reply.raise_for_status()
    nodes = reply.json()["data"]["result"]["result"]
    return sum(1 for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"])


def pending_nodes(cluster: LocalCluster) -> int:
    """Nodes the autoscaler has decided to launch that have not joined yet."""
    reply = requests.get(f"{cluster.dashboard_url}/api/cluster_status", headers=cluster.auth_headers, timeout=10)
    reply.raise_for_status()
    report = (reply.json()["data"].get("clusterStatus") or {}).get("autoscalerReport") or {}
    return sum((report.get("pendingLaunches") or {}).values()) + len(report.get("pendingNodes") or [])


def _first(samples: list[dict[str, Any]], test) -> float | None:
    return next((s["t"] for s in samples if test(s)), None)


def run_demo(workdir: Path, sets: dict[str, Any], workers: int = 2, idle_timeout_minutes: float = 0.1,
             scale_down_timeout_s: float = 120.0, poll_s: float = 1.0) -> dict[str, Any]:
    """Start the fake cluster, submit the run, sample node counts until the nodes are gone."""
    storage = workdir / "runs"
    started = time.monotonic()
    clock = lambda: round(time.monotonic() - started, 1)  # noqa: E731
    samples: list[dict[str, Any]] = []
    with LocalCluster(autoscaling=FakeAutoscaling(max_workers=workers, idle_timeout_minutes=idle_timeout_minutes)) as cluster:
        head_up = clock()
        cluster.wait_for_jobs()
        jobs_ready = clock()
        nodes_before = worker_nodes(cluster)
        cmd = [str(Path(sys.executable).parent / "raylab"), "submit", "--address", cluster.dashboard_url, "--",
               "train", "tinyimagenet", "--workers", str(workers), "--storage", str(storage), "--name", "autoscaled",
               *[f"--set={k}={v}" for k, v in sets.items()]]
        submitted = clock()
        with open(workdir / "submit.log", "w") as log:
            job = subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, text=True)
            ended = None
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                samples.append({"t": clock(), "worker_nodes": worker_nodes(cluster), "pending_nodes": pending_nodes(cluster),
                                "job_running": job.poll() is None})
                if job.poll() is not None:
                    ended = ended or clock()
                    if samples[-1]["worker_nodes"] == 0 or clock() - ended > scale_down_timeout_s:
                        break
                time.sleep(poll_s)
            if job.poll() is None:
                job.kill()
            exit_code = job.wait()
        monitor_errors = cluster.monitor_errors()
    stopped = clock()
    all_nodes = _first(samples, lambda s: s["worker_nodes"] >= workers)
    # Idle nodes may go before `raylab submit` returns: the driver still writes curves and a summary.
    gone = _first(samples, lambda s: all_nodes is not None and s["t"] > all_nodes and s["worker_nodes"] == 0)
    return {
        "workers": workers, "idle_timeout_minutes": idle_timeout_minutes, "exit_code": exit_code,
        "head_started_s": head_up, "jobs_ready_s": jobs_ready, "submitted_s": submitted, "job_ended_s": ended,
        "worker_nodes_before": nodes_before,
        "first_queued_s": _first(samples, lambda s: s["pending_nodes"] >= 1),
        "first_node_s": _first(samples, lambda s: s["worker_nodes"] >= 1),
        "all_nodes_s": all_nodes,
        "max_worker_nodes": max((s["worker_nodes"] for s in samples), default=0),
        "nodes_gone_s": gone,
        "cluster_stopped_s": stopped,
        "monitor_traceback": "Traceback" in monitor_errors,
        "checkpoints": sorted(p.name for p in (storage / "autoscaled").glob("checkpoint_*") if p.is_dir()),
        "samples": samples, "submit_log": (workdir / "submit.log").read_text()[-4000:],
    }


def print_timeline(result: dict[str, Any]) -> None:
    rows = [("head started", "head_started_s"), ("job API ready", "jobs_ready_s"), ("run submitted", "submitted_s"),
            ("autoscaler queued nodes", "first_queued_s"), ("first worker node alive", "first_node_s"), (f"{result['workers']} worker nodes alive", "all_nodes_s"),
            ("worker nodes removed", "nodes_gone_s"), ("raylab submit returned", "job_ended_s"), ("cluster stopped", "cluster_stopped_s")]
    print(f"fake multi-node autoscaling: head CPU 0, {result['workers']} x 1-CPU worker nodes, "
          f"idle timeout {result['idle_timeout_minutes']} min; exit code {result['exit_code']}")
    for label, key in rows:
        value = result[key]
        print(f"  {label:<28} {'-' if value is None else f'{value:7.1f} s'}")
    print(f"  worker nodes: {result['worker_nodes_before']} before, at most {result['max_worker_nodes']}; "
          f"checkpoints: {', '.join(result['checkpoints']) or 'none'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny data and model (seconds of training).")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "autoscaling_demo.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raylab-autoscale-") as tmp:
        sets: dict[str, Any] = {}
        if args.smoke:
            from models.tinyimagenet.data import write_synthetic

            data = write_synthetic(Path(tmp) / "data", num_classes=4, train_per_class=24, val_per_class=6, seed=1)
            sets = {"data_dir": str(data), **SMOKE_SETS}
        result = run_demo(Path(tmp), sets)
    result["smoke"] = args.smoke
    print_timeline(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
