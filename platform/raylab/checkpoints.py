"""The checkpoint manager: list, inspect, fetch, load and clean a run's checkpoints.

The Python API behind `raylab ckpt ...` (the CLI only formats what these return).
A run is a name under a storage root (default `raylab_results`), a local
folder, or a URI; the same calls work on a local disk and on S3 (credentials
from the usual AWS variables; S3-compatible servers via
`s3://bucket/prefix?endpoint_override=http://host:port&scheme=http`), or on any
pyarrow filesystem passed as `filesystem=` (then paths are paths on it).

    from raylab.checkpoints import list_checkpoints, checkpoint_info, load_weights, clean_runs
    table = list_checkpoints("se-quick")                       # a pandas DataFrame
    info = checkpoint_info(table.uri.iloc[-1])                 # every file's checksum verified
    load_weights(table.uri.iloc[-1], model)                    # into a freshly built torch model
    clean_runs(["se-quick", "se-medium"], keep_latest=2, keep_best=1, metric="val_loss")
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from raylab.checkpoint import STATE_FILE, CheckpointError, read_checkpoint_state
from raylab.checkpoint_store import (
    CheckpointRecord, checkpoint_paths, display_path, download, inspect_checkpoint, local_copy, scan_checkpoints,
)
from raylab.config import ConfigError
from raylab.recovery import ray_registry_names
from raylab.retention import RetentionPlan, RetentionPolicy, apply_plan, plan_retention

DEFAULT_STORAGE = "raylab_results"


def _filesystem_of(uri_or_path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri_or_path:
        try:
            return pafs.FileSystem.from_uri(uri_or_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot open storage '{uri_or_path}': {exc}.") from None
    return pafs.LocalFileSystem(), str(Path(uri_or_path).expanduser().resolve())


def _under_storage(storage: str, *names: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    from raylab.launch import check_run_name

    for name in names:
        check_run_name(name)
    fs, root = (filesystem, storage.rstrip("/")) if filesystem is not None else _filesystem_of(storage)
    return fs, "/".join([root.rstrip("/"), *names])


def _must_exist(fs: pafs.FileSystem, path: str, what: str) -> None:
    try:
        kind = fs.get_file_info(path).type
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {display_path(fs, path)}: {exc}.") from None
    if kind != pafs.FileType.Directory:
        raise ConfigError(f"{what} {display_path(fs, path)} does not exist.")


def locate_run(run: str, storage: str = DEFAULT_STORAGE, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a run given as a name under `storage`, a local folder or a URI."""
    if filesystem is not None and "/" in run:
        fs, path = filesystem, run.rstrip("/")
    elif "://" in run or "/" in run or run in (".", "..") or run.startswith("~"):
        fs, path = _filesystem_of(run)
    else:
        fs, path = _under_storage(storage, run, filesystem=filesystem)
    _must_exist(fs, path, "run")
    return fs, path


def locate_checkpoint(checkpoint: str, storage: str | None = None, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of one checkpoint folder: a local folder, a URI, or
    `<run>/<checkpoint>` under `storage` when a storage is given."""
    if filesystem is not None and storage is None:
        fs, path = filesystem, checkpoint.rstrip("/")
    elif storage is not None and "://" not in checkpoint and not Path(checkpoint).expanduser().is_absolute():
        parts = [p for p in checkpoint.strip("/").split("/") if p]
        if len(parts) != 2:
            raise ConfigError(f"with --storage, give the checkpoint as <run>/<checkpoint folder> (got '{checkpoint}').")
        fs, path = _under_storage(storage, *parts, filesystem=filesystem)
    else:
        fs, path = _filesystem_of(checkpoint)
    _must_exist(fs, path, "checkpoint")
    if fs.get_file_info(f"{path}/{STATE_FILE}").type == pafs.FileType.NotFound and checkpoint_paths(fs, path):
        raise ConfigError(f"{display_path(fs, path)} is a run folder, not a checkpoint; `raylab ckpt list` shows its checkpoints.")
    return fs, path


def list_checkpoints(run: str, storage: str = DEFAULT_STORAGE, verify: bool = True, filesystem: pafs.FileSystem | None = None) -> pd.DataFrame:
    """One row per checkpoint folder of a run, oldest first.

    Columns: checkpoint, epoch, batch, step, valid, problem, size_bytes, modified,
    in_ray_registry (False for a `--workers 0` run's folders, or ones a killed
    driver never registered), uri, then the metrics reported with each checkpoint. `verify` checks every
    file's sha256 (reads every byte; False: sizes only). `attrs` holds `run`
    and `total_bytes`.
    """
    fs, path = locate_run(run, storage, filesystem)
    records = scan_checkpoints(fs, path, "checksums" if verify else "sizes")
    registered = ray_registry_names(fs, path)
    rows = [_row(r) | {"in_ray_registry": r.name in registered} for r in records]
    columns = ["checkpoint", "epoch", "batch", "step", "valid", "problem", "size_bytes", "modified", "in_ray_registry", "uri"]
    table = pd.DataFrame(rows, columns=columns + sorted({k for row in rows for k in row} - set(columns)))
    table.attrs.update(run=display_path(fs, path), total_bytes=int(sum(r.size_bytes for r in records)))
    return table


def _row(record: CheckpointRecord) -> dict[str, Any]:
    step, epoch, batch = record.position or (None, None, None)
    row = {"checkpoint": record.name, "epoch": epoch, "batch": batch, "step": step, "valid": record.valid,
           "problem": record.problem, "size_bytes": record.size_bytes, "modified": record.modified, "uri": record.uri}
    for key, value in record.metrics.items():
        if key not in ("step", "epoch") and isinstance(value, (int, float)):
            row[key] = value
    return row


def checkpoint_info(checkpoint: str, storage: str | None = None, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """Position, config, metrics and every file of one checkpoint, each file's checksum verified.

    `valid` is False and `problem` names the file when anything is missing,
    truncated or altered.
    """
    fs, path = locate_checkpoint(checkpoint, storage, filesystem)
    record = inspect_checkpoint(fs, path, "checksums")
    info: dict[str, Any] = {"checkpoint": record.uri, "valid": record.valid, "problem": record.problem,
                            "size_bytes": record.size_bytes, "modified": record.modified}
    if record.state is None:
        return info | {"files": []}
    state, problems = record.state, record.bad_files
    info.update(
        position=state.get("position"), world_size=state.get("world_size"), task=state.get("task"),
        framework=state.get("framework", "torch"), metrics=state.get("metrics", {}), config=state.get("config", {}),
        task_metadata=state.get("task_metadata", {}),
        files=[{"name": name, "bytes": meta.get("bytes"), "sha256": meta.get("sha256"), "ok": name not in problems,
                "problem": problems.get(name)} for name, meta in sorted(state.get("files", {}).items())],
    )
    return info


def load_checkpoint(checkpoint: str, to: str | Path = ".", storage: str | None = None, filesystem: pafs.FileSystem | None = None) -> Path:
    """Copy a checkpoint into `<to>/<checkpoint name>` and verify every checksum there.

    Nothing is left behind when the copy fails verification (CheckpointError).
    """
    fs, path = locate_checkpoint(checkpoint, storage, filesystem)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    dest = Path(to).expanduser().resolve() / name
    if dest.exists():
        raise ConfigError(f"{dest} already exists; choose another --to folder or remove it.")
    partial = dest.parent / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        download(fs, path, partial)
        read_checkpoint_state(partial, verify=True)
    except CheckpointError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(str(exc).replace(str(partial), display_path(fs, path))) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(dest)
    return dest


def load_weights(checkpoint: str, model: Any, storage: str | None = None, filesystem: pafs.FileSystem | None = None,
                 ema: bool = False, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint's weights into a PyTorch `model` (checksums verified first).

    `ema=True` loads the moving-average weights (`ema.safetensors`) a run with
    `ema_decay` saved. Returns the checkpoint's state.json (position, config, metrics).
    """
    import safetensors.torch

    fs, path = locate_checkpoint(checkpoint, storage, filesystem)
    with local_copy(fs, path) as directory:
        try:
            state = read_checkpoint_state(directory, verify=True)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(str(directory), display_path(fs, path))) from None
        weights = directory / ("ema.safetensors" if ema else "model.safetensors")
        if not weights.is_file():
            raise CheckpointError(f"{display_path(fs, path)} has no {weights.name}" + (" (the run had no ema_decay)." if ema else "."))
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"{display_path(fs, path)}/{weights.name} does not fit the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}; build the model from the checkpoint's config (checkpoint_info(...)['config'])."
            )
    return state


@dataclass
class RunCleanup:
    run: str
    plan: RetentionPlan
    deleted: list[CheckpointRecord]
    dry_run: bool

    @property
    def freed_bytes(self) -> int:
        return self.plan.freed_bytes if self.dry_run else sum(r.size_bytes for r in self.deleted)


def clean_runs(runs: list[str], storage: str = DEFAULT_STORAGE, keep_latest: int = 3, keep_best: int = 0, metric: str | None = None,
               mode: str | None = None, dry_run: bool = False, filesystem: pafs.FileSystem | None = None) -> list[RunCleanup]:
    """Apply the retention policy (`raylab.retention`) to finished or running runs.

    Every checkpoint's checksums are verified first, so the newest *valid* one of
    each run is the one that is always kept. `dry_run` deletes nothing.
    """
    policy = RetentionPolicy(keep_latest, keep_best, metric, mode)  # type: ignore[arg-type]
    located = [locate_run(run, storage, filesystem) for run in runs]  # every name checked before anything is deleted
    scanned = [(fs, path, scan_checkpoints(fs, path, "checksums")) for fs, path in located]
    if keep_best and metric:
        reported = sorted({k for _, _, records in scanned for r in records if r.valid for k in r.metrics})
        if reported and metric not in reported:  # a typo must not turn "keep the best" into "keep none"
            raise ConfigError(f"--metric {metric}: no checkpoint of {', '.join(runs)} reported it; they report {', '.join(reported)}.")
    results = []
    for fs, path, records in scanned:
        plan = plan_retention(records, policy)
        deleted = [] if dry_run else apply_plan(fs, plan)
        results.append(RunCleanup(display_path(fs, path), plan, deleted, dry_run))
    return results
