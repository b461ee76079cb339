"""A Ray cluster of its own on this machine, stopped without touching anyone else's.

Tests and demos need a real `ray start --head` (jobs, `--address`, fake
multi-node autoscaling) on a machine where other Ray instances may be running
(a colleague's test session, a user's own cluster). `LocalCluster` starts one
with its own short temp dir (Ray's socket paths have a length limit), free
ports for every server, and token authentication with a token of its own
(passed in the environment it hands out; `~/.ray/auth_token` is never read or
written). It stops only its own processes, in Ray's order, never with
`ray stop` (which stops every Ray of the user):

    with LocalCluster(num_cpus=2, dashboard=True) as cluster:
        cluster.wait_for_jobs()                     # the job agent answers
        subprocess.run(["raylab", "submit", "--address", cluster.dashboard_url, "--", ...], env=cluster.env)

    with LocalCluster(autoscaling=FakeAutoscaling(max_workers=2)) as cluster: ...

Its processes are found by their command lines naming the temp dir, by their
open files under it (`/proc/PID/fd`: workers and agents rename themselves,
e.g. `ray::DashboardAgent`, and no longer name it), and as descendants of
those (the fake nodes' raylets are children of the autoscaler monitor).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# Ray's shutdown order: the autoscaler first (else it starts replacement nodes),
# then every raylet (each stops its own workers), then the rest, the GCS last
# (the others exit cleanly once they can still tell it goodbye).
_STOP_ORDER = ("autoscaler/_private/monitor.py", "/raylet/raylet", None, "gcs_server")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeAutoscaling:
    """Ray's fake multi-node provider: worker "nodes" are extra raylets on this machine."""

    max_workers: int = 2
    worker_cpus: int = 1
    idle_timeout_minutes: float = 0.1
    object_store_memory: int = 150_000_000

    def config(self, gcs_address: str) -> dict[str, Any]:
        """The autoscaling config, written by hand: Ray's AutoscalingCluster helper runs `ray stop --force`.

        Every key below must be present, even empty, or the monitor dies with a
        KeyError while `ray start` still reports success (see RAY_NOTES).
        """
        return {
            "cluster_name": "raylab-fake",
            "max_workers": self.max_workers,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                # Without it new nodes dial port 6379 and the autoscaler loop hangs silently.
                "gcs_address": gcs_address,
            },
            "auth": {},
            "head_node_type": "ray.head.default",
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                "ray.worker.cpu": {
                    "resources": {"CPU": self.worker_cpus, "object_store_memory": self.object_store_memory},
                    "node_config": {}, "min_workers": 0, "max_workers": self.max_workers,
                },
            },
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, None if it is gone."""
    raw = _read(f"/proc/{pid}/stat").decode(errors="replace")
    if not raw:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the name in parentheses may contain spaces
    return int(fields[1]), fields[0], int(fields[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _names_dir(pid: int, marker: str) -> bool:
    """Whether the process's command line names `marker` or it holds a file under it open."""
    if marker.encode() in _read(f"/proc/{pid}/cmdline"):
        return True
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(marker):
                return True
        except OSError:
            continue
    return False


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        info = _stat(pid)
        if info is None:
            break
        pid = info[0]
    return seen


def processes_of(temp_dir: str) -> dict[int, int]:
    """{pid: start time} of every live process of the Ray instance under `temp_dir`, with descendants.

    The calling process and its ancestors are left out: a driver connected to
    the cluster holds files under its temp dir too.
    """
    marker = temp_dir.rstrip("/") + "/"
    stats = {pid: s for pid in _all_pids() if (s := _stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    roots = [pid for pid, (_, state, _) in stats.items() if state != "Z" and _names_dir(pid, marker)]
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    found -= _ancestors(os.getpid())
    return {pid: stats[pid][2] for pid in found if stats[pid][1] != "Z"}


def _alive(pid: int, started: int) -> bool:
    info = _stat(pid)
    return info is not None and info[2] == started and info[1] != "Z"


def _signal(pids: dict[int, int], sig: int) -> None:
    for pid, started in pids.items():
        if _alive(pid, started):  # the same process, not a reused pid
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _wait_gone(pids: dict[int, int], timeout_s: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    left = dict(pids)
    while left and time.monotonic() < deadline:
        left = {p: s for p, s in left.items() if _alive(p, s)}
        if left:
            time.sleep(0.1)
    return left


def stop_processes(temp_dir: str, grace_s: float = 5.0) -> list[int]:
    """Stop the Ray instance under `temp_dir` (only its processes), in Ray's order; returns the pids stopped."""
    everything = processes_of(temp_dir)
    groups: list[dict[int, int]] = []
    rest = dict(everything)
    for needle in _STOP_ORDER:
        if needle is None:
            groups.append({})  # filled with what is left after the named groups
            continue
        group = {p: s for p, s in rest.items() if needle.encode() in _read(f"/proc/{p}/cmdline")}
        groups.append(group)
        rest = {p: s for p, s in rest.items() if p not in group}
    groups[_STOP_ORDER.index(None)] = rest
    for group in groups:
        _signal(group, signal.SIGTERM)
        _signal(_wait_gone(group, grace_s), signal.SIGKILL)
    # Stragglers: anything that appeared while stopping (a worker started late).
    for _ in range(20):
        left = processes_of(temp_dir)
        if not left:
            break
        _signal(left, signal.SIGKILL)
        _wait_gone(left, 1.0)
    return sorted(everything)


class LocalCluster:
    """`ray start --head` with its own temp dir, ports and token; `stop()` stops only its processes."""

    def __init__(
        self, num_cpus: float = 2, dashboard: bool = False, autoscaling: FakeAutoscaling | None = None,
        resources: dict[str, float] | None = None, object_store_memory: int = 200_000_000,
        extra_env: dict[str, str] | None = None,
    ):
        self.num_cpus = 0 if autoscaling else num_cpus
        self.dashboard = dashboard or autoscaling is not None  # jobs are how work reaches fake nodes
        self.autoscaling = autoscaling
        self.resources = resources or {}
        self.object_store_memory = object_store_memory
        self.token = secrets.token_hex(32)
        self.temp_dir = ""
        self.gcs_port = self.dashboard_port = 0
        self.started = False
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, **(extra_env or {})}
        env.pop("RAY_ADDRESS", None)  # never join whatever cluster the caller points at
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        env.update({
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
            # Job entrypoints (`raylab ...`, `python ...`) resolve to this interpreter's environment.
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
        })
        if autoscaling:
            env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self.env: dict[str, str] = env

    @property
    def address(self) -> str:
        """The GCS address, for `ray.init(address=...)` / `raylab train --address`."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard / job API, for `raylab submit --address` / `ray job submit --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _ray_executable(self) -> str:
        beside = Path(sys.executable).parent / "ray"
        return str(beside) if beside.is_file() else (shutil.which("ray") or "ray")

    def _command(self) -> list[str]:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        cmd = [
            self._ray_executable(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus:g}",
            f"--object-store-memory={self.object_store_memory}", "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
        ]
        if self.dashboard:
            cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += ["--include-dashboard=false"]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        if self.autoscaling:
            path = Path(self.temp_dir) / "autoscaling.yaml"
            path.write_text(json.dumps(self.autoscaling.config(self.address), indent=2))  # JSON is YAML
            cmd.append(f"--autoscaling-config={path}")
        return cmd

    def start(self, timeout_s: float = 120, attempts: int = 3) -> "LocalCluster":
        """Start the head. Ray gives a new raylet a fixed 30 s to register with the GCS,
        which an overloaded machine can miss: such a start is cleaned up and retried."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except RuntimeError as exc:
                if attempt == attempts or "timed out during startup" not in str(exc):
                    raise
                time.sleep(5.0 * attempt)
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> "LocalCluster":
        # Short on purpose: Ray's unix socket paths under it must stay below ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
        self.started = True
        try:
            proc = subprocess.run(self._command(), env=self.env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"`ray start --head` did not finish within {timeout_s:g} s (temp dir {self.temp_dir}).") from None
        if proc.returncode != 0:
            self.stop()
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError("`ray start --head` failed: " + " | ".join(tail))
        return self

    def monitor_errors(self) -> str:
        """The autoscaler's stderr: with the fake provider, a traceback there is the only sign it died."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.err"))
        return logs[-1].read_text(errors="replace") if logs else ""

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.auth_headers)

    def wait_for_jobs(self, timeout_s: float = 120) -> float:
        """Block until a trivial job runs to SUCCEEDED; returns the seconds it took.

        For ~15 s after `ray start` the job API answers but refuses
        submissions ("No available agent to submit job").
        """
        from ray.job_submission import JobStatus

        started = time.monotonic()
        deadline = started + timeout_s
        last_error = ""
        while time.monotonic() < deadline:
            try:
                client = self.job_client()
                job_id = client.submit_job(entrypoint="true")
                while time.monotonic() < deadline:
                    status = client.get_job_status(job_id)
                    if status.is_terminal():
                        break
                    time.sleep(0.5)
                if status == JobStatus.SUCCEEDED:
                    return time.monotonic() - started
                last_error = f"probe job ended {status}: {client.get_job_logs(job_id)[-500:]}"
            except Exception as exc:  # not up yet: connection refused, no agent, ...
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(1.0)
        raise TimeoutError(f"the job API at {self.dashboard_url} did not run a job within {timeout_s:g} s; last error: {last_error}")

    def processes(self) -> dict[int, int]:
        """{pid: start time} of this cluster's live processes."""
        return processes_of(self.temp_dir) if self.temp_dir else {}

    def stop(self) -> list[int]:
        """Stop this cluster's processes (only those) and delete its temp dir; returns the pids stopped."""
        if not self.started:
            return []
        stopped = stop_processes(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.started = False
        return stopped

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Iterable[Any]) -> None:
        self.stop()
