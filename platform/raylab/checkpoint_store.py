"""Checkpoint folders where they are stored: any pyarrow filesystem (local, s3://).

`raylab.checkpoint` defines what one folder holds; this module finds and judges
folders in a run's storage without assuming they are on this machine:

    scan_checkpoints(fs, run_path)      every checkpoint_* folder of a run, oldest first
    inspect_checkpoint(fs, path, ...)   one folder: position, metrics, size, problems
    local_copy(fs, path)                a local directory holding it (a download for S3)

Two levels of checking, because reading every byte of every checkpoint costs a
download on S3: "sizes" (state.json parses, every file it lists exists with the
recorded size -- catches interrupted saves and truncation from one listing) and
"checksums" (every file's sha256 matches -- catches any altered byte).
Paths shown to people keep their scheme (`s3://bucket/run/...`): `display_path`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow.fs as pafs

from raylab.checkpoint import STATE_FILE

CHECKPOINT_PREFIX = "checkpoint_"
Verify = Literal["sizes", "checksums"]
_NAME_POSITION = re.compile(r"epoch(\d+)_batch(\d+)_step(\d+)")
# pyarrow's filesystem type names -> the URI scheme people write.
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}


def display_path(fs: pafs.FileSystem, path: str) -> str:
    """`path` as a person should see it: `s3://bucket/key` on S3, the plain path on a local disk."""
    scheme = _SCHEMES.get(fs.type_name)
    return f"{scheme}://{path.lstrip('/')}" if scheme else path


@dataclass
class CheckpointRecord:
    """What is known about one checkpoint folder in storage."""

    name: str
    path: str  # on its filesystem
    uri: str  # as shown to people
    position: tuple[int, int, int] | None  # (global_step, epoch, batch_in_epoch); None: unknown
    state: dict[str, Any] | None = field(default=None, repr=False)
    size_bytes: int = 0
    modified: datetime | None = None
    problem: str | None = None  # None: passed the checks in `checked`
    checked: Verify = "sizes"
    bad_files: dict[str, str] = field(default_factory=dict)  # file name -> what is wrong with it

    @property
    def valid(self) -> bool:
        return self.problem is None and self.state is not None

    @property
    def metrics(self) -> dict[str, Any]:
        return dict((self.state or {}).get("metrics") or {})


def position_of(state: dict[str, Any]) -> tuple[int, int, int]:
    """The order of checkpoints in a run: optimizer steps first, then epoch and batch."""
    pos = state["position"]
    return (int(pos["global_step"]), int(pos["epoch"]), int(pos["batch_in_epoch"]))


def _position_from_name(name: str) -> tuple[int, int, int] | None:
    match = _NAME_POSITION.search(name)
    if not match:
        return None
    epoch, batch, step = (int(g) for g in match.groups())
    return (step, epoch, batch)


def list_files(fs: pafs.FileSystem, path: str) -> dict[str, pafs.FileInfo]:
    """Files under `path` keyed by their path relative to it (one LIST on object stores)."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = path.rstrip("/") + "/"
    return {i.path[len(prefix):]: i for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix)}


def _read_state(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    with fs.open_input_stream(f"{path}/{STATE_FILE}") as fh:
        return json.loads(fh.read().decode("utf-8"))


def sha256_of(fs: pafs.FileSystem, path: str) -> str:
    """sha256 of one stored file, streamed: nothing is written to disk."""
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_problems(fs: pafs.FileSystem, path: str, state: dict[str, Any], files: dict[str, pafs.FileInfo], verify: Verify) -> dict[str, str]:
    """{file name: what is wrong with it} for every file state.json lists; empty when all pass."""
    problems = {}
    for name, info in sorted(state.get("files", {}).items()):
        stored = files.get(name)
        if stored is None:
            problems[name] = "is missing"
        elif "bytes" in info and stored.size != info["bytes"]:
            problems[name] = f"is {stored.size:,} bytes but state.json recorded {info['bytes']:,} (truncated or altered)"
        elif verify == "checksums" and sha256_of(fs, f"{path}/{name}") != info["sha256"]:
            problems[name] = "does not match its sha256 in state.json (altered)"
    return problems


def inspect_checkpoint(fs: pafs.FileSystem, path: str, verify: Verify = "sizes", state: dict[str, Any] | None = None) -> CheckpointRecord:
    """Judge one stored checkpoint folder; `state` may be passed when already read."""
    path = path.rstrip("/")
    name = path.rsplit("/", 1)[-1]
    record = CheckpointRecord(name, path, display_path(fs, path), _position_from_name(name), checked=verify)
    files = list_files(fs, path)
    record.size_bytes = sum(i.size or 0 for i in files.values())
    if STATE_FILE not in files:
        record.problem = f"has no {STATE_FILE} (an interrupted save)" if files else "is empty or missing"
        return record
    record.modified = _mtime(files[STATE_FILE])
    try:
        record.state = state if state is not None else _read_state(fs, path)
        record.position = position_of(record.state)
    except (ValueError, KeyError, TypeError) as exc:
        record.state = None
        record.problem = f"has an unreadable {STATE_FILE} ({type(exc).__name__}: {exc})"
        return record
    problems = record.bad_files = file_problems(fs, path, record.state, files, verify)
    if problems:
        record.problem = "; ".join(f"{file} {why}" for file, why in problems.items())
    return record


def _mtime(info: pafs.FileInfo) -> datetime | None:
    mtime = info.mtime
    if mtime is None:
        return None
    return mtime if mtime.tzinfo else mtime.replace(tzinfo=timezone.utc)


def checkpoint_paths(fs: pafs.FileSystem, run_path: str) -> list[str]:
    """Paths of the run's checkpoint_* folders (any state), unordered."""
    infos = fs.get_file_info(pafs.FileSelector(run_path.rstrip("/"), recursive=False, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)]


def order_key(record: CheckpointRecord) -> tuple[int, tuple[int, int, int], str]:
    """Oldest first; folders of unknown position sort before all others."""
    return (0, (0, 0, 0), record.name) if record.position is None else (1, record.position, record.name)


def scan_checkpoints(fs: pafs.FileSystem, run_path: str, verify: Verify = "sizes", known: dict[str, CheckpointRecord] | None = None) -> list[CheckpointRecord]:
    """Every checkpoint folder of a run, oldest first.

    `known` (name -> record) lets a caller that scans after every report reuse what
    it already read: a valid folder's files never change once written.
    """
    records = []
    for path in checkpoint_paths(fs, run_path):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        cached = (known or {}).get(name)
        if cached is not None and cached.valid and cached.checked in (verify, "checksums"):
            records.append(cached)
            continue
        records.append(inspect_checkpoint(fs, path, verify))
    return sorted(records, key=order_key)


@contextlib.contextmanager
def local_copy(fs: pafs.FileSystem, path: str) -> Iterator[Path]:
    """A local directory with the checkpoint's files: the folder itself on a local
    filesystem, else a temporary download, under the checkpoint's own folder name (what
    messages name), that is removed afterwards."""
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="raylab-ckpt-dl-"))
    try:
        folder = tmp / (path.rstrip("/").rsplit("/", 1)[-1] or "checkpoint")
        download(fs, path, folder)
        yield folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(fs: pafs.FileSystem, path: str, dest: Path) -> None:
    """Copy a stored checkpoint folder into the local directory `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def upload(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """Copy a local checkpoint folder to `path` on `fs` (state.json last, so a reader
    never sees a complete-looking folder with files still missing)."""
    fs.create_dir(path, recursive=True)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    for source in sorted(files, key=lambda p: p.name == STATE_FILE):
        target = f"{path}/{source.relative_to(local).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(source, "rb") as src, fs.open_output_stream(target) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def delete_checkpoint(fs: pafs.FileSystem, path: str) -> None:
    fs.delete_dir(path)
