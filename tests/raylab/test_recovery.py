"""Failure recovery with 2 Ray Train workers on CPU: a worker SIGKILLed mid-epoch, the
driver SIGKILLed with a checkpoint newer than Ray's registry, a corrupted newest
checkpoint -- each run must end with the very weights of an uninterrupted run, and
the person watching must see one raylab line, not Ray's paragraphs.

Processes are killed by pid, and only processes these tests started (the CLI driver
and the Ray processes its embedded Ray started, found by its session folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import safetensors.torch
import torch

from raylab.checkpoint_store import inspect_checkpoint, scan_checkpoints
from raylab.config import LaunchConfig
from raylab.launch import train
from raylab.recovery import RAY_REGISTRY_FILE, describe_worker_failure, ray_registry_latest, reconcile_ray_registry

LOCAL = pafs.LocalFileSystem()
DEATH_PARAGRAPH = "A worker died or was killed"


def recovery_cfg(tiny, accum: int) -> dict:
    # 96 samples / 2 workers / batch 8 = 6 micro-batches per worker in the one epoch; a checkpoint every 2.
    return tiny(seed=5, max_epochs=1, grad_accum_steps=accum, checkpoint_every_batches=2, keep_checkpoints=3)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    newest = [r for r in scan_checkpoints(LOCAL, str(run), "checksums") if r.valid][-1]
    assert newest.state["position"]["epoch"] == 1, newest.name  # the run finished
    return safetensors.torch.load_file(str(Path(newest.path) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory, tiny_data):
    """Final weights of uninterrupted 2-worker runs, by grad_accum_steps (computed once)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cache: dict[int, dict] = {}

    def get(tiny, accum: int) -> dict[str, torch.Tensor]:
        if accum not in cache:
            train("tinyimagenet", "quick", recovery_cfg(tiny, accum), LaunchConfig(num_workers=2, storage_path=str(root), name=f"a{accum}"))
            cache[accum] = final_weights(root / f"a{accum}")
        return cache[accum]

    return get


def held_pid_dir(tmp_path: Path, monkeypatch) -> Path:
    """A folder where Ray workers write their pids, and where `hold` makes rank 0 wait right
    after announcing its first mid-epoch checkpoint until the test creates `release`
    (raylab.ray_backend): the kill lands mid-epoch however fast the machine trains."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    (pid_dir / "hold").touch()
    monkeypatch.setenv("RAYLAB_TEST_PID_DIR", str(pid_dir))
    return pid_dir


@pytest.mark.ray
@pytest.mark.parametrize("accum", [1, 2])
def test_worker_sigkilled_mid_epoch_restarts_from_newest_checkpoint(uninterrupted, tmp_path, tiny, accum, monkeypatch, capfd):
    pid_dir = held_pid_dir(tmp_path, monkeypatch)
    updates: list[dict] = []
    killed: list[int] = []
    announced: list[str] = []

    def watch(update: dict) -> None:
        updates.append(dict(update))
        # Mid-epoch, after the first checkpoint (where rank 0 now waits): kill worker 1's process, once.
        if not killed and update.get("last_checkpoint") and update.get("epoch") == 0 and update.get("batch_in_epoch", 0) > 0:
            pid = int((pid_dir / "rank1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            announced.append(update["last_checkpoint"])
            (pid_dir / "release").touch()

    train("tinyimagenet", "quick", recovery_cfg(tiny, accum),
          LaunchConfig(num_workers=2, storage_path=str(tmp_path), name="wk", max_failures=2), on_progress=watch)
    assert killed, "the run ended before the test could kill a worker"
    notices = [u["notice"] for u in updates if "notice" in u]
    deaths = [n for n in notices if "died" in n]
    assert len(deaths) == 1, notices
    # Rank 0 held right after announcing its first mid-epoch checkpoint: that is where the group restarts.
    assert announced[0].startswith("checkpoint_epoch0000_batch000002_")
    assert re.search(rf"^worker 1 \(pid {killed[0]}\) died: .*SIGKILL.*; restarting from {announced[0]} \(restart 1 of 2\)$", deaths[0]), deaths[0]
    assert_same_weights(final_weights(tmp_path / "wk"), uninterrupted(tiny, accum))
    # Ray's own paragraph about the death never reached this process's terminal.
    captured = capfd.readouterr()
    assert DEATH_PARAGRAPH not in captured.out + captured.err


@pytest.mark.ray
def test_worker_death_without_restarts_left_fails_in_one_sentence(ray_session, tmp_path, tiny, monkeypatch):
    from raylab.ray_failures import WorkerDiedError

    pid_dir = held_pid_dir(tmp_path, monkeypatch)
    killed: list[int] = []

    def watch(update: dict) -> None:
        if not killed and update.get("last_checkpoint"):
            killed.append(int((pid_dir / "rank0.pid").read_text()))  # the checkpoint writer this time
            os.kill(killed[0], signal.SIGKILL)
            (pid_dir / "release").touch()

    with pytest.raises(WorkerDiedError) as failure:
        train("tinyimagenet", "quick", recovery_cfg(tiny, 1), LaunchConfig(num_workers=2, storage_path=str(tmp_path), name="gone"), on_progress=watch)
    message = str(failure.value)
    assert message.startswith(f"worker 0 (pid {killed[0]}) died: ") and message.endswith("no restarts left (raise --max-failures to recover from this)")
    assert "\n" not in message


def _cli(storage: Path, name: str, cfg: dict) -> list[str]:
    command = [shutil.which("raylab") or sys.executable, *([] if shutil.which("raylab") else ["-m", "raylab.cli"])]
    sets = [f"--set={k}={'null' if v is None else v}" for k, v in cfg.items()]
    return [*command, "train", "tinyimagenet", "--workers", "2", "--storage", str(storage), "--name", name, *sets]


def _complete(run: Path) -> list[str]:
    return [r.name for r in scan_checkpoints(LOCAL, str(run), "sizes") if r.valid]


def _stop_what_the_driver_left(driver_pid: int, worker_pids: list[int], timeout_s: float = 20.0) -> None:
    """Wait for the killed driver's workers to go, then SIGKILL whatever its embedded Ray left
    running: processes whose command line or open files name its session folder (named
    after the driver's pid), and the workers by their pids."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in worker_pids):
        time.sleep(0.5)
    session = re.compile(rf"session_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_{driver_pid}(/|$|\s)")
    victims = set(worker_pids)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            texts = [(proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")]
            texts += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(session.search(t + " ") for t in texts):
            victims.add(int(proc.name))
    for pid in victims:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.ray
@pytest.mark.parametrize("accum", [1, 2])
def test_driver_sigkilled_then_rerun_resumes_from_newest_complete_checkpoint(uninterrupted, tmp_path, tiny, accum):
    run = tmp_path / "dk"
    cfg = recovery_cfg(tiny, accum)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A slower controller poll widens the gap between a checkpoint's upload and its
    # registration, the moment this test kills the driver in.
    first_env = {**env, "RAYLAB_TEST_PID_DIR": str(pid_dir), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "4"}
    driver = subprocess.Popen(_cli(tmp_path, "dk", cfg), env=first_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            registered = ray_registry_latest(LOCAL, str(run))
            complete = _complete(run) if run.is_dir() else []
            if registered and complete and complete[-1] != registered and complete[-1] > registered:
                driver.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        assert driver.wait(timeout=30) == -signal.SIGKILL, "the run ended before a checkpoint got ahead of Ray's registry"
    finally:
        if driver.poll() is None:
            driver.kill()
        _stop_what_the_driver_left(driver.pid, [int(p.read_text()) for p in pid_dir.glob("rank*.pid")])

    newest, registered = _complete(run)[-1], ray_registry_latest(LOCAL, str(run))
    assert newest > registered  # the situation under test: storage is ahead of Ray's registry
    proc = subprocess.run(_cli(tmp_path, "dk", cfg), env=env, capture_output=True, text=True, timeout=400)
    output = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0, output
    assert f"resuming from {run / newest} " in output and f"Ray's registry named {registered}" in output, output
    assert DEATH_PARAGRAPH not in output and "Traceback" not in output
    assert_same_weights(final_weights(run), uninterrupted(tiny, accum))


@pytest.mark.ray
def test_corrupt_newest_checkpoint_is_skipped_with_a_note(uninterrupted, tmp_path, tiny):
    cfg = recovery_cfg(tiny, 1)
    launch = LaunchConfig(num_workers=2, storage_path=str(tmp_path), name="trunc")
    train("tinyimagenet", "quick", {**cfg, "max_steps": 4}, launch)
    run = tmp_path / "trunc"
    newest, previous = _complete(run)[-1], _complete(run)[-2]
    assert newest.endswith("step00000004") and previous.endswith("step00000002")
    weights_file = run / newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])  # truncated, as by a full disk
    updates: list[dict] = []
    train("tinyimagenet", "quick", cfg, launch, on_progress=updates.append)
    notices = [u["notice"] for u in updates if "notice" in u]
    assert any(n.startswith(f"skipping checkpoint {run / newest}: model.safetensors is ") and "truncated" in n for n in notices), notices
    assert any(n.startswith(f"resuming from {run / previous} (epoch 0, batch 2, step 2) instead") for n in notices), notices
    assert_same_weights(final_weights(run), uninterrupted(tiny, 1))


def test_altered_byte_is_caught_by_checksum_and_the_previous_one_used(tmp_path, tiny):
    # Sizes still match: only the sha256 check (on the downloaded/opened copy) can catch it.
    launch = LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="flip")
    train("tinyimagenet", "quick", tiny(max_epochs=1, checkpoint_every_batches=4, max_steps=8), launch)
    run = tmp_path / "flip"
    newest = _complete(run)[-1]
    raw = bytearray((run / newest / "optimizer.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (run / newest / "optimizer.pt").write_bytes(bytes(raw))
    updates: list[dict] = []
    train("tinyimagenet", "quick", tiny(max_epochs=1, checkpoint_every_batches=4), launch, on_progress=updates.append)
    notices = [u["notice"] for u in updates if "notice" in u]
    assert any(newest in n and "optimizer.pt" in n and "checksum" in n for n in notices), notices
    assert any(n.startswith(f"resuming from {run}/checkpoint_epoch0000_batch000004_step00000004") for n in notices), notices
    assert inspect_checkpoint(LOCAL, str(run / newest), "checksums").valid  # rewritten by the resumed run


def test_only_interrupted_saves_start_over_but_only_corrupt_ones_stop_the_run(tmp_path, tiny):
    from raylab.checkpoint import CheckpointError

    launch = LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="bad")
    run = tmp_path / "bad"
    (run / "checkpoint_epoch0000_batch000004_step00000004").mkdir(parents=True)  # a save cut before state.json
    (run / "checkpoint_epoch0000_batch000004_step00000004" / "model.safetensors").write_bytes(b"partial")
    updates: list[dict] = []
    train("tinyimagenet", "quick", tiny(max_epochs=1, checkpoint_every_batches=4, max_steps=4), launch, on_progress=updates.append)
    notices = [u["notice"] for u in updates if "notice" in u]
    assert any("has no state.json" in n for n in notices) and "no complete checkpoint: starting from the beginning" in notices
    assert inspect_checkpoint(LOCAL, str(run / "checkpoint_epoch0000_batch000004_step00000004"), "checksums").valid
    # Now the only checkpoint is complete but corrupt: the run stops instead of silently starting over.
    (run / "checkpoint_epoch0000_batch000004_step00000004" / "scheduler.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoint folder.* is valid"):
        train("tinyimagenet", "quick", tiny(max_epochs=1, checkpoint_every_batches=4), launch)


@pytest.mark.ray
def test_clean_of_registered_checkpoints_then_rerun_through_ray(ray_session, tmp_path, tiny):
    """`raylab ckpt clean` deletes folders Ray's registry lists; the next run must still start."""
    from raylab.checkpoints import clean_runs

    launch = LaunchConfig(num_workers=1, storage_path=str(tmp_path), name="cleaned")
    train("tinyimagenet", "quick", tiny(max_epochs=1, checkpoint_every_batches=4, keep_checkpoints=None), launch)
    run = tmp_path / "cleaned"
    snapshot = json.loads((run / RAY_REGISTRY_FILE).read_text())
    assert len(snapshot["checkpoint_results"]) == 3
    clean_runs(["cleaned"], str(tmp_path), keep_latest=1)
    assert _complete(run) == ["checkpoint_epoch0001_batch000000_step00000012"]
    summary = train("tinyimagenet", "quick", tiny(max_epochs=2, checkpoint_every_batches=4, keep_checkpoints=None), launch)
    assert summary.latest_checkpoint == str(run / "checkpoint_epoch0002_batch000000_step00000024")
    assert summary.metrics["step"].tolist() == [4, 8, 12, 16, 20, 24]  # resumed at 12, nothing redone
    # The registry names only folders that exist.
    names = [r["checkpoint_dir_name"] for r in json.loads((run / RAY_REGISTRY_FILE).read_text())["checkpoint_results"]]
    assert all((run / n).is_dir() for n in names) and reconcile_ray_registry(LOCAL, str(run)) == []


@pytest.mark.ray
def test_ray_worker_death_paragraph_is_kept_off_the_terminal(ray_session, capfd):
    import ray._private.worker as ray_worker

    from raylab.ray_failures import HIDDEN_LOG

    paragraph = f"{DEATH_PARAGRAPH} while executing a task by an unexpected system error. Worker PID: 4242 (raylab test)"
    ray_worker.print_to_stdstream({"lines": [paragraph], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": ["some other raylet warning"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    captured = capfd.readouterr()
    assert DEATH_PARAGRAPH not in captured.out + captured.err
    assert "some other raylet warning" in captured.out  # everything else still prints
    log = Path(ray_worker._global_node.get_logs_dir_path()) / HIDDEN_LOG
    assert "Worker PID: 4242 (raylab test)" in log.read_text()


# Ray's text for a SIGKILLed Ray Train worker, as Ray 2.60 raised it here (trimmed).
_SIGKILLED = (
    "A worker health check failed.\nWorker info: Worker(\n  metadata=ActorMetadata(\n    pid=12460,\n  ),\n)\n"
    "The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tpid: 12460\n"
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker "
    "unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the process was "
    "killed by the OOM killer due to high memory usage, (2) ray stop --force was called"
)


@pytest.mark.parametrize(
    ("text", "died", "expected"),
    [
        (_SIGKILLED, True, "worker 1 (pid 12460) died: its process vanished without an exit status (a signal such as SIGKILL"),
        ("\tpid: 77\nWorker exit type: NODE_OUT_OF_MEMORY Worker exit detail: Task was killed due to the node running low on memory.",
         True, "worker 1 (pid 77) died: killed by Ray's memory monitor"),
        ("\tpid: 78\nWorker exit type: USER_ERROR Worker exit detail: Worker exits with an exit code 3.", True,
         "worker 1 (pid 78) died: its process exited with code 3"),
        ("DataError: /data/train/x.JPEG is not an image\n  more lines", False, "worker 1 failed: DataError: /data/train/x.JPEG is not an image"),
    ],
)
def test_worker_failure_is_described_in_one_clause(text, died, expected):
    line = describe_worker_failure(1, text, died)
    assert line.startswith(expected), line
    assert "\n" not in line
