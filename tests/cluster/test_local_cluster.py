"""LocalCluster starts a usable head of its own and stops exactly its own processes:
the renamed ones too (`ray::DashboardAgent`, idle workers), and nothing of another
Ray instance running beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raylab.local_cluster import LocalCluster, processes_of

pytestmark = pytest.mark.ray


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def alive(pid: int, started: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] != "Z" and int(fields[19]) == started


def test_stops_only_its_own_processes_including_renamed_ones():
    neighbour = LocalCluster(num_cpus=1).start()  # another Ray on the machine: must survive
    try:
        # Its long-lived processes (idle workers may come and go on their own).
        before = {pid: t for pid, t in neighbour.processes().items() if any(
            key in cmdline(pid) for key in ("gcs_server", "/raylet/raylet", "ray::RuntimeEnvAgent", "ray::DashboardAgent"))}
        assert len(before) >= 3
        with LocalCluster(num_cpus=1, dashboard=True) as cluster:
            cluster.wait_for_jobs()
            mine = cluster.processes()
            names = {pid: cmdline(pid) for pid in mine}
            assert any("gcs_server" in c for c in names.values()) and any("/raylet/raylet" in c for c in names.values())
            # Found by open files, not by command line: these no longer name the temp dir.
            renamed = [pid for pid, c in names.items() if c.startswith("ray::DashboardAgent")]
            assert renamed and cluster.temp_dir not in names[renamed[0]]
            assert not set(mine) & set(before) and os.getpid() not in mine
            temp_dir = cluster.temp_dir
        assert not [pid for pid, started in mine.items() if alive(pid, started)]
        assert processes_of(temp_dir) == {} and not Path(temp_dir).exists()
        assert all(alive(pid, started) for pid, started in before.items())  # the neighbour is untouched
        assert neighbour.processes()
    finally:
        neighbour.stop()
    assert not [pid for pid, started in before.items() if alive(pid, started)]


def test_failed_start_leaves_nothing_behind():
    cluster = LocalCluster(num_cpus=1, resources={"CPU": 3})  # Ray refuses CPU among custom resources
    with pytest.raises(RuntimeError, match="ray start --head` failed"):
        cluster.start()
    assert processes_of(cluster.temp_dir) == {} and not Path(cluster.temp_dir).exists()
