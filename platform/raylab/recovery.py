"""Resuming after a failure: which checkpoint a run continues from, and what to say.

A run continues from the **newest valid** checkpoint folder in its storage --
state.json present and every file's sha256 matching -- whether or not Ray's
registry (`checkpoint_manager_snapshot.json`, what `ray.train.get_checkpoint()`
returns) knows it: a driver killed between a checkpoint's upload and its
registration leaves a complete folder Ray never heard of. A newer folder that
fails the checks is skipped with a one-line note naming it and why; a run
never resumes from a corrupt folder and never silently drops the newest good
one. Both sessions (`LocalSession`, the Ray workers' `RaySession`) call
`newest_valid_checkpoint`; nothing else chooses.

`reconcile_ray_registry` keeps Ray's registry loadable after raylab's retention
deleted folders it lists (Ray refuses to start a run whose registry names a
missing folder). `describe_worker_failure` turns Ray's paragraph about a dead
worker into the few words a person needs.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs

from raylab.checkpoint import CheckpointError, read_checkpoint_state
from raylab.checkpoint_store import CheckpointRecord, display_path, local_copy, scan_checkpoints

RAY_REGISTRY_FILE = "checkpoint_manager_snapshot.json"


@dataclass
class ResumePoint:
    record: CheckpointRecord
    directory: Path  # local, checksums verified
    skipped: list[CheckpointRecord]  # newer folders that failed the checks (each already announced)

    @property
    def name(self) -> str:
        return self.record.name

    def describe(self) -> str:
        step, epoch, batch = self.record.position or (0, 0, 0)
        return f"{self.record.uri} (epoch {epoch}, batch {batch}, step {step})"


@contextlib.contextmanager
def newest_valid_checkpoint(fs: pafs.FileSystem, run_path: str, notify: Callable[[str], None]) -> Iterator[ResumePoint | None]:
    """The newest checkpoint of the run that passes every check, as a local directory.

    Folders are tried newest first; each one skipped is named to `notify` with the
    reason. Yields None when the run has no checkpoint whose save completed, and
    raises CheckpointError when completed ones exist but none is valid: starting
    over would throw the run's progress away without anyone deciding to.
    """
    records = scan_checkpoints(fs, run_path, verify="sizes")
    skipped = []
    for record in reversed(records):
        if record.problem is None:
            with local_copy(fs, record.path) as directory:
                try:
                    read_checkpoint_state(directory, verify=True)
                except CheckpointError as exc:
                    record.problem = str(exc)
                else:
                    record.checked = "checksums"
                    point = ResumePoint(record, directory, skipped)
                    if skipped:
                        notify(f"resuming from {point.describe()} instead")
                    yield point
                    return
        skipped.append(record)
        notify(f"skipping checkpoint {record.uri}: {record.problem}")
    if any(r.state is not None for r in skipped):
        raise CheckpointError(
            f"none of the {len(skipped)} checkpoint folder(s) in {display_path(fs, run_path)} is valid (see the notes above); "
            "see `raylab ckpt list` for each one's problem, then move the broken folders away (nothing deletes them for you: "
            "they may hold the only copy of your progress) or train under a new --name."
        )
    if skipped:  # only saves that never completed: no progress to lose
        notify("no complete checkpoint: starting from the beginning")
    yield None


@contextlib.contextmanager
def named_checkpoint(fs: pafs.FileSystem, run_path: str, name: str) -> Iterator[Path]:
    """A checkpoint another worker chose, as a verified local directory."""
    with local_copy(fs, f"{run_path.rstrip('/')}/{name}") as directory:
        read_checkpoint_state(directory, verify=True)
        yield directory


def reconcile_ray_registry(fs: pafs.FileSystem, run_path: str) -> list[str]:
    """Drop entries for deleted folders from Ray's checkpoint registry, before Ray reads it.

    Ray Train refuses to start (`CheckpointManagerInitializationError`) when its
    snapshot names a folder that no longer exists, which raylab's own retention
    causes by design. Returns the dropped names. A snapshot in a shape this code
    does not know is removed instead: raylab chooses its resume point from storage,
    so Ray starting with an empty registry loses nothing.
    """
    path = f"{run_path.rstrip('/')}/{RAY_REGISTRY_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return []
    with fs.open_input_stream(path) as fh:
        raw = fh.read().decode("utf-8")
    try:
        snapshot = json.loads(raw)
        results = snapshot["checkpoint_results"]
        names = [r["checkpoint_dir_name"] for r in results]
    except (ValueError, KeyError, TypeError):
        fs.delete_file(path)
        return ["<unreadable registry>"]
    present = {
        i.base_name for i in fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True)) if i.type == pafs.FileType.Directory
    }
    gone = [n for n in names if n not in present]
    if not gone:
        return []
    try:
        _drop_from_snapshot(snapshot, set(gone))
    except (KeyError, TypeError, IndexError):
        fs.delete_file(path)
        return gone
    with fs.open_output_stream(path) as fh:
        fh.write(json.dumps(snapshot).encode("utf-8"))
    return gone


def _drop_from_snapshot(snapshot: dict, gone: set[str]) -> None:
    keep = [i for i, r in enumerate(snapshot["checkpoint_results"]) if r["checkpoint_dir_name"] not in gone]
    indices = snapshot["checkpoint_report_indices"]
    snapshot["checkpoint_results"] = [snapshot["checkpoint_results"][i] for i in keep]
    snapshot["checkpoint_report_indices"] = [indices[i] for i in keep]
    latest = snapshot.get("latest_checkpoint_result")
    if latest is not None and latest["checkpoint_dir_name"] in gone:
        # The registry's "latest" must be one of its results; raylab picks its own anyway.
        by_index = sorted(zip(snapshot["checkpoint_report_indices"], snapshot["checkpoint_results"]), key=lambda p: p[0])
        snapshot["latest_checkpoint_result"] = by_index[-1][1] if by_index else None
    pending = snapshot.get("pending_training_results", [])
    specs = snapshot.get("pending_validation_specs", [])
    kept_pending = [i for i, r in enumerate(pending) if r["checkpoint_dir_name"] not in gone]
    snapshot["pending_training_results"] = [pending[i] for i in kept_pending]
    snapshot["pending_validation_specs"] = [specs[i] for i in kept_pending if i < len(specs)]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names", "failed_validation_checkpoint_dir_names"):
        if key in snapshot:
            snapshot[key] = [n for n in snapshot[key] if n not in gone]


def _read_registry(fs: pafs.FileSystem, run_path: str) -> dict | None:
    path = f"{run_path.rstrip('/')}/{RAY_REGISTRY_FILE}"
    try:
        with fs.open_input_stream(path) as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def ray_registry_latest(fs: pafs.FileSystem, run_path: str) -> str | None:
    """The folder name Ray's registry would resume from, None without one."""
    try:
        latest = (_read_registry(fs, run_path) or {}).get("latest_checkpoint_result")
        return latest["checkpoint_dir_name"] if latest else None
    except (KeyError, TypeError, AttributeError):
        return None


def ray_registry_names(fs: pafs.FileSystem, run_path: str) -> set[str]:
    """Folder names Ray's registry lists (empty without a registry)."""
    try:
        return {r["checkpoint_dir_name"] for r in (_read_registry(fs, run_path) or {}).get("checkpoint_results", [])}
    except (KeyError, TypeError, AttributeError):
        return set()


_PID = re.compile(r"\bpid[:=]\s*(\d+)")
_EXIT = re.compile(r"Worker exit type: (\w+)(?: Worker exit detail: (.*?)(?:\. Some common causes|$))?", re.S)
_EXIT_CODE = re.compile(r"exit(?:ed)? (?:with )?(?:an )?(?:exit )?code (-?\d+)", re.I)


def describe_worker_failure(rank: int, error_text: str, died: bool) -> str:
    """One clause: which worker failed and how, from Ray's error text.

    A worker that raised an exception is named with it. For a dead process Ray
    reports an exit type: the memory monitor's kills say so, a clean exit carries
    its code, but a process killed by a signal (SIGKILL, the kernel's OOM killer, a
    segfault) only shows up as a lost connection -- Ray itself cannot tell those apart.
    """
    if not died:
        first = error_text.strip().splitlines()[0] if error_text.strip() else "an error"
        return f"worker {rank} failed: {first[:300]}"
    pid = _PID.search(error_text)
    who = f"worker {rank}" + (f" (pid {pid.group(1)})" if pid else "")
    exit_match = _EXIT.search(error_text)
    kind = exit_match.group(1) if exit_match else ""
    detail = (exit_match.group(2) or "").strip() if exit_match else ""
    lowered = error_text.lower()
    if kind == "NODE_OUT_OF_MEMORY" or "low on memory" in lowered or "outofmemory" in lowered:
        how = "killed by Ray's memory monitor (the node ran out of memory)"
    elif "preempt" in lowered:
        how = "its node was preempted"
    elif (code := _EXIT_CODE.search(detail)) is not None:
        how = f"its process exited with code {code.group(1)}"
    elif kind == "SYSTEM_ERROR" and "connection" in detail.lower():
        how = "its process vanished without an exit status (a signal such as SIGKILL, a crash, or the kernel's OOM killer; Ray cannot tell which)"
    elif "node" in lowered and "died" in lowered:
        how = "its node died"
    else:
        how = f"Ray reports {kind or 'an unknown cause'}" + (f": {detail}" if detail else "")
    return f"{who} died: {how}"
