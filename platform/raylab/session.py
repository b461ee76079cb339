"""Where a training loop reports to: Ray Train, or this process.

The loop talks to a `Session` only; `raylab.ray_backend.RaySession` implements
it with `ray.train` (the one place that does), and `LocalSession` implements it
in-process with the same folder layout so the loop can be run and tested
without Ray (`--workers 0`). A local run's checkpoints are plain folders in
`<storage>/<name>/` on any pyarrow filesystem; they are not registered with
Ray, and either kind of run resumes from them (raylab, not Ray's registry,
chooses the resume point: `raylab.recovery`).

Both sessions share `RunCheckpoints`: the resume point (newest valid folder)
and the retention policy applied after every checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import pyarrow.fs as pafs

from raylab.checkpoint_store import CheckpointRecord, scan_checkpoints, upload
from raylab.recovery import ResumePoint, newest_valid_checkpoint
from raylab.retention import RetentionPolicy, apply_plan, plan_retention


class Session(Protocol):
    world_rank: int
    world_size: int
    local_rank: int
    device: str
    run_fs: pafs.FileSystem
    run_path: str

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, checkpoint_name: str | None) -> None: ...

    def progress(self, update: dict[str, Any]) -> None: ...


def checkpoint_sort_key(state: dict[str, Any]) -> tuple[int, int, int]:
    pos = state["position"]
    return (pos["global_step"], pos["epoch"], pos["batch_in_epoch"])


class RunCheckpoints:
    """One run's checkpoint folders as the main worker sees them."""

    def __init__(self, fs: pafs.FileSystem, run_path: str, policy: RetentionPolicy, notify: Callable[[str], None]):
        self.fs, self.run_path, self.policy, self.notify = fs, run_path.rstrip("/"), policy, notify
        self._known: dict[str, CheckpointRecord] = {}

    @contextlib.contextmanager
    def resume_point(self) -> Iterator[ResumePoint | None]:
        with newest_valid_checkpoint(self.fs, self.run_path, self.notify) as point:
            yield point

    def enforce_retention(self) -> list[CheckpointRecord]:
        """Delete what falls outside the policy -- including folders an earlier, killed
        attempt left that Ray never registered. Returns what was deleted."""
        if self.policy.keep_latest is None:
            return []
        records = scan_checkpoints(self.fs, self.run_path, "sizes", known=self._known)
        self._known = {r.name: r for r in records}
        try:
            deleted = apply_plan(self.fs, plan_retention(records, self.policy))
        except OSError as exc:  # storage hiccup: keep training, say so
            self.notify(f"could not delete checkpoints outside the retention policy: {exc}")
            return []
        for record in deleted:
            self._known.pop(record.name, None)
        return deleted


class LocalSession:
    """One worker in this process; checkpoints are moved (or uploaded) into the run folder."""

    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(
        self, run_dir: str | Path, keep_checkpoints: int | None = None, on_progress: Callable[[dict[str, Any]], None] | None = None,
        device: str = "cpu", *, retention: RetentionPolicy | None = None, filesystem: pafs.FileSystem | None = None,
    ):
        self.run_fs = filesystem or pafs.LocalFileSystem()
        if isinstance(self.run_fs, pafs.LocalFileSystem):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            run_dir = Path(run_dir).resolve()
        self.run_path = str(run_dir).rstrip("/")
        self.run_fs.create_dir(self.run_path, recursive=True)
        self.on_progress = on_progress
        self.device = device
        policy = retention or RetentionPolicy(keep_checkpoints)
        self.checkpoints = RunCheckpoints(self.run_fs, self.run_path, policy, lambda text: self.progress({"notice": text}))

    @property
    def run_dir(self) -> Path:
        return Path(self.run_path)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        with self.checkpoints.resume_point() as point:
            yield point.directory if point else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, checkpoint_name: str | None) -> None:
        if checkpoint_dir is None:
            return
        name = checkpoint_name or Path(checkpoint_dir).name
        target = f"{self.run_path}/{name}"
        if self.run_fs.get_file_info(target).type != pafs.FileType.NotFound:
            self.run_fs.delete_dir(target)  # a stale folder at this position (e.g. a corrupt one skipped on resume)
        if isinstance(self.run_fs, pafs.LocalFileSystem):
            # Move under a name scans ignore, then rename: a reader never sees half a folder.
            partial = f"{self.run_path}/.partial-{uuid.uuid4().hex}"
            shutil.move(str(checkpoint_dir), partial)
            os.replace(partial, target)
        else:
            upload(Path(checkpoint_dir), self.run_fs, target)
        self.checkpoints.enforce_retention()

    def progress(self, update: dict[str, Any]) -> None:
        if self.on_progress is not None:
            self.on_progress(update)
