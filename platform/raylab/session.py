"""Where a training loop reports to: Ray Train, or this process.

The loop talks to a `Session` only; `raylab.ray_backend.RaySession` implements
it with `ray.train` (the one place that does), and `LocalSession` implements it
in-process with the same folder layout so the loop can be run and tested
without Ray (`--workers 0`). A local run's checkpoints are plain folders in
`<storage>/<name>/`; they are not registered with Ray, so a run started with
`--workers 0` resumes with `--workers 0`.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import pyarrow.fs as pafs

from raylab.checkpoint import CheckpointError, read_checkpoint_state


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


class LocalSession:
    """One worker in this process; checkpoints are moved into the run folder."""

    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, run_dir: Path, keep_checkpoints: int | None, on_progress: Callable[[dict[str, Any]], None] | None = None, device: str = "cpu"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_fs, self.run_path = pafs.LocalFileSystem(), str(self.run_dir.resolve())
        self.keep = keep_checkpoints
        self.on_progress = on_progress
        self.device = device

    def _checkpoints(self) -> list[tuple[tuple[int, int, int], Path]]:
        found = []
        for path in self.run_dir.glob("checkpoint_*"):
            try:
                found.append((checkpoint_sort_key(read_checkpoint_state(path, verify=False)), path))
            except CheckpointError:
                continue  # an interrupted save: never resume from it
        return sorted(found)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self._checkpoints()
        yield found[-1][1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, checkpoint_name: str | None) -> None:
        if checkpoint_dir is None:
            return
        target = self.run_dir / (checkpoint_name or Path(checkpoint_dir).name)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(checkpoint_dir), target)
        if self.keep is not None:
            for _, old in self._checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def progress(self, update: dict[str, Any]) -> None:
        if self.on_progress is not None:
            self.on_progress(update)
