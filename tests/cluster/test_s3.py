"""Runs stored on S3 (a real S3-compatible server, moto's server mode, on loopback):
train -> driver killed -> resume finishes from the stored checkpoint, paths keep the
s3:// scheme, then `ckpt list`, `ckpt clean`, `sample` and `report` work on the same
s3:// run; a ladder whose first stage is an lr search runs its Tune trials on the head and
warm-starts the next stage from the best checkpoint stored on S3; the network to the server
cut mid-run makes the run fail loudly in one sentence, and once it is back every checkpoint
that was valid before the cut still is and a rerun resumes from the newest valid one.

Runs join a head of this module's own with --address, so a killed driver leaves
nothing behind but what the head's teardown stops.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raylab.local_cluster import LocalCluster, free_port

pytestmark = pytest.mark.ray
RAYLAB = shutil.which("raylab") or "raylab"


@pytest.fixture(scope="module")
def head():
    # Workers inherit the session's fake AWS credentials (tests/conftest.py) through the head's environment.
    with LocalCluster(num_cpus=2) as cluster:
        yield cluster


def train_cmd(head: LocalCluster, storage: str, name: str, sets: dict) -> list[str]:
    return [RAYLAB, "train", "tinyimagenet", "--address", head.address, "--workers", "1", "--storage", storage,
            "--name", name, *[f"--set={k}={v}" for k, v in sets.items()]]


def wait_for_checkpoint(server, prefix: str, proc: subprocess.Popen, timeout_s: float = 300) -> list[str]:
    """Keys of complete checkpoints (state.json is written last) once there is one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [k for k in server.keys(prefix) if re.search(r"/checkpoint_[^/]+/state\.json$", k)]
        if done:
            return done
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its first checkpoint"
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint under {prefix} within {timeout_s} s")


def test_train_kill_resume_then_checkpoint_tools_on_s3(head, s3, tiny, tmp_path):
    storage = s3.uri("kill-resume")
    cmd = train_cmd(head, storage, "run", tiny(max_epochs=4))  # 12 steps per epoch
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=head.env, stdout=log, stderr=subprocess.STDOUT)
        saved = wait_for_checkpoint(s3, "kill-resume/run/", first)
        first.kill()  # SIGKILL: no cleanup, as when a laptop sleeps or a driver node dies
        first.wait()
    assert "checkpoint_epoch0004" not in " ".join(saved)  # killed mid-run

    proc = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # It continued from storage: the first progress line is past the first checkpoint (step 12).
    steps = [int(s) for s in re.findall(r"tinyimagenet quick: step (\d+)/48", out)]
    assert steps and steps[0] > 12 and steps[-1] == 48, out
    keys = s3.keys("kill-resume/run/")
    assert "kill-resume/run/checkpoint_epoch0004_batch000000_step00000048/model.safetensors" in keys
    fs, path = pafs.FileSystem.from_uri(storage)
    with fs.open_input_file(f"{path}/run/metrics.parquet") as fh:
        metrics = pq.read_table(fh).to_pandas()
    assert metrics["step"].is_monotonic_increasing and metrics["step"].min() <= 12 and metrics["step"].max() == 48
    # Printed paths keep the scheme the user gave.
    flat = re.sub(r"[\s│]", "", out)  # the summary table wraps long paths between its borders
    assert "s3://raylab/kill-resume/run/checkpoint_epoch0004_batch000000_step00000048" in flat
    check_tools_on_s3(s3, storage, tmp_path)


def check_tools_on_s3(s3, storage: str, tmp_path) -> None:
    """The commands that read runs take the same s3:// --storage (no Ray involved)."""
    def raylab(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([RAYLAB, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    listed = json.loads(raylab("ckpt", "list", "run", "--storage", storage, "--json").stdout)
    assert len(listed) == 3 and all(c["valid"] and c["uri"].startswith("s3://raylab/kill-resume/run/") for c in listed)
    assert listed[-1]["step"] == 48

    raylab("ckpt", "clean", "run", "--keep-latest", "1", "--storage", storage)
    folders = {k.split("/")[2] for k in s3.keys("kill-resume/run/checkpoint_") if k.count("/") >= 3}
    assert folders == {"checkpoint_epoch0004_batch000000_step00000048"}

    bucket_path, query = storage.split("?", 1)
    newest = f"{bucket_path}/run/checkpoint_epoch0004_batch000000_step00000048?{query}"
    raylab("sample", newest, "--n", "2", "--out", str(tmp_path / "samples.json"))
    assert len(json.loads((tmp_path / "samples.json").read_text())["samples"]) == 2

    raylab("report", "run", "--storage", storage)
    assert "kill-resume/run/results.parquet" in s3.keys("kill-resume/run/")


def test_a_ladder_on_s3_searches_then_warm_starts_from_the_stored_best(head, s3, tiny, tmp_path):
    import yaml

    defaults = {k: v for k, v in tiny(max_epochs=1, num_samples=0).items()}  # 12 steps per trial
    body = {"model": "tinyimagenet", "defaults": defaults,
            "stages": {"quick": {}, "medium": {"width": 8}},
            "ladder": {"metric": "val_accuracy"},
            "search": {"quick": {"space": {"lr": "grid(1e-7, 3e-3)"}, "samples": 1, "scheduler": "fifo"}}}
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(body))
    storage = s3.uri("ladder")
    proc = subprocess.run([RAYLAB, "ladder", "tinyimagenet", "--experiment", str(experiment), "--address", head.address,
                           "--storage", storage, "--name", "lad"], env=head.env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fs, path = pafs.FileSystem.from_uri(storage)
    with fs.open_input_stream(f"{path}/lad/ladder.json") as fh:
        state = json.loads(fh.read())
    quick, medium = state["stages"]["quick"], state["stages"]["medium"]
    assert state["status"] == "finished" and quick["params"] == {"lr": 3e-3}  # the search ran, the useful lr won
    assert quick["best_checkpoint"].startswith("s3://raylab/ladder/lad/quick/trial_001/checkpoint_")
    # warm-started from that checkpoint on S3 (the stored URI keeps the server's query, to be read back)
    assert medium["init_from"] == quick["best_checkpoint"] + "?" + storage.split("?", 1)[1]
    with fs.open_input_stream(f"{path}/lad/medium/trial_000/warm_start.json") as fh:
        counts = json.loads(fh.read())["counts"]
    assert counts["skipped_shape"] > 0 and counts["new"] == 0  # width 4 -> 8: matched by name, shapes differ
    keys = s3.keys("ladder/lad/")
    assert any(k.startswith("ladder/lad/medium/trial_000/checkpoint_") for k in keys)
    assert {"ladder/lad/quick/trial_000/metrics.parquet", "ladder/lad/quick/trial_001/metrics.parquet"} <= set(keys)


class TcpRelay:
    """A loopback TCP relay in front of the S3 server: `cut()` resets every open connection and
    refuses new ones (the network to S3 gone, the server and its data untouched), `restore()`
    listens on the same port again."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.target_port = target_port
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port at once
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        with self.lock:
            sockets, self.open = self.open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def valid_checkpoints(storage: str) -> dict[str, int]:
    """{checkpoint folder: step} of the run's checkpoints that pass raylab's checks (`ckpt list`)."""
    proc = subprocess.run([RAYLAB, "ckpt", "list", "run", "--storage", storage, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {c["checkpoint"]: c["step"] for c in json.loads(proc.stdout) if c["valid"]}


@pytest.fixture
def relay(own_s3):
    """A TcpRelay in front of this test's own S3 server, cut when the test ends."""
    relay = TcpRelay(own_s3.port)
    yield relay
    relay.cut()


def test_s3_unreachable_mid_run_fails_in_one_sentence_and_keeps_the_newest_checkpoint(head, own_s3, relay, tiny, tmp_path):
    storage = f"s3://{own_s3.bucket}/outage?endpoint_override=http://127.0.0.1:{relay.port}&scheme=http&region=us-east-1"
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen(train_cmd(head, storage, "run", tiny(max_epochs=60)), env=head.env, stdout=subprocess.DEVNULL,
                                stderr=log, text=True)
        try:
            wait_for_checkpoint(own_s3, "outage/run/", proc)
            before = valid_checkpoints(storage)
            assert before and proc.poll() is None
            relay.cut()  # mid-run, likely mid-upload: the server keeps what it had
            code = proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
    errors = (tmp_path / "run.log").read_text()
    assert code == 1, errors
    error_lines = [line for line in errors.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in errors, errors
    assert re.search(r"error: run failed: .*(bucket 'raylab'|s3://raylab).*(connect|NETWORK_CONNECTION)", " ".join(errors.split())), errors

    relay.restore()
    after = valid_checkpoints(storage)
    assert before.items() <= after.items()  # nothing valid before the outage was lost or damaged by it
    newest = max(after, key=after.get)
    epoch = int(re.search(r"epoch(\d+)", newest).group(1))
    # Rerun, ending one epoch later: it resumes from the newest valid checkpoint, whatever the
    # outage left half-uploaded after it.
    rerun = subprocess.run(train_cmd(head, storage, "run", tiny(max_epochs=epoch + 1)), env=head.env, capture_output=True,
                           text=True, timeout=400)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out
    assert f"resuming {newest} with changed config" in " ".join(out.split()), out
    assert max(valid_checkpoints(storage).values()) == 12 * (epoch + 1)
