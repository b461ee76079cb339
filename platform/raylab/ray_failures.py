"""Worker failures under Ray Train, as the person running `raylab train` sees them.

Part of the Ray boundary (with `raylab.ray_backend`). Two pieces:

* `FailureReporter`, a Ray Train controller callback. Ray Train V2 runs a
  controller actor that polls the workers; when one dies or raises, its
  failure policy decides to restart the worker group (`RestartingState`, or
  `ReschedulingState` while scheduling) or to give up. The public
  `UserCallback.after_exception` sees errors but not that decision, so this
  hooks `ControllerCallback.after_controller_state_update` (DeveloperAPI) and,
  on each restart, sends one line to the driver's display through the progress
  queue: which worker, how it failed, and `restarting from <checkpoint>
  (restart k of N)` -- the checkpoint raylab's workers will pick (the newest
  complete folder; they also verify checksums and say so if they must skip it).

* `hide_worker_death_paragraphs`. The raylet publishes a long "A worker died or
  was killed ..." paragraph to the driver's error channel, and Ray's driver
  prints it from its error-listener thread even with `log_to_driver=False`
  (`ray._private.worker.listen_error_messages` -> `print_to_stdstream`). That
  call is wrapped so these paragraphs -- and only these -- go to a file in
  Ray's log folder instead of the terminal; every other message still prints.
"""

from __future__ import annotations

import re
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback

from raylab.checkpoint_store import display_path, scan_checkpoints
from raylab.recovery import describe_worker_failure

_DEATH_TEXT = re.compile(r"A worker died or was killed|worker\(s\) were killed due to the node running low on memory")
HIDDEN_LOG = "raylab_hidden_driver_messages.log"


class WorkerDiedError(RuntimeError):
    """A Ray Train worker process died and no restarts were left."""


def _is_death(error: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError) or isinstance(getattr(error, "health_check_failure", None), RayActorError)


def describe_failures(worker_failures: dict[int, BaseException]) -> str:
    """One clause for a failed worker group: the dead worker if any (the others then
    usually fail with collateral errors), else the first rank's exception."""
    deaths = {rank: e for rank, e in worker_failures.items() if _is_death(e)}
    if deaths:
        rank = min(deaths)
        return describe_worker_failure(rank, str(deaths[rank]), died=True)
    rank = min(worker_failures)
    error = worker_failures[rank]
    return describe_worker_failure(rank, f"{type(error).__name__}: {error}", died=False)


def worker_death_error(error: BaseException) -> BaseException | None:
    """A short WorkerDiedError for a training failure caused by a dead worker, else None."""
    failures = getattr(error, "worker_failures", None) or {}
    if any(_is_death(e) for e in failures.values()):
        return WorkerDiedError(describe_failures(failures) + "; no restarts left (raise --max-failures to recover from this)")
    return None


class FailureReporter(ControllerCallback):
    """Sends one line per worker-group restart to the driver's progress queue."""

    def __init__(self, progress_queue: Any, max_failures: int):
        self._queue = progress_queue
        self._max_failures = max_failures
        self._restarts = 0
        self._storage = None

    def after_controller_start(self, train_run_context) -> None:
        self._storage = train_run_context.run_config.storage_context

    def after_controller_state_update(self, previous_state, current_state) -> None:
        from ray.train.v2._internal.execution.controller.state import ReschedulingState, RestartingState

        if not isinstance(current_state, (RestartingState, ReschedulingState)):
            return
        self._restarts += 1
        error = current_state.training_failed_error
        failures = getattr(error, "worker_failures", None)
        what = describe_failures(failures) if failures else f"the run failed: {error}"
        limit = "no limit" if self._max_failures == -1 else f"of {self._max_failures}"
        line = f"{what}; restarting from {self._restart_point()} (restart {self._restarts} {limit})"
        if self._queue is not None:
            try:
                self._queue.put_nowait({"notice": line})
            except Exception:  # a display must never break the controller
                pass

    def _restart_point(self) -> str:
        if self._storage is None:
            return "the newest valid checkpoint"
        fs, run_path = self._storage.storage_filesystem, self._storage.experiment_fs_path
        try:
            complete = [r for r in scan_checkpoints(fs, run_path, "sizes") if r.valid]
        except OSError:
            return "the newest valid checkpoint"
        return complete[-1].name if complete else f"the beginning (no checkpoint in {display_path(fs, run_path)} yet)"


def hide_worker_death_paragraphs() -> None:
    """Route Ray's worker-death paragraphs on this driver to Ray's log folder (idempotent)."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_raylab_filter", False):
        return

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and any(_DEATH_TEXT.search(line) for line in lines):
            _append_to_ray_log(lines)
            return
        original(data, ignore_prefix)

    print_to_stdstream._raylab_filter = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def _append_to_ray_log(lines: list[str]) -> None:
    import time

    import ray._private.worker as ray_worker

    try:
        node = ray_worker._global_node
        with open(f"{node.get_logs_dir_path()}/{HIDDEN_LOG}", "a", encoding="utf-8") as fh:
            for line in lines:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} (raylet) {line}\n")
    except Exception:  # no log folder (e.g. a client connection): the line is dropped, the GCS log keeps the exit
        pass
