"""Warm start across sizes: initialise a fresh run from another run's checkpoint.

Seed 001's full GMAN was to start from the medium one's weights with Keras's
`load_weights(by_name=True, skip_mismatch=True)` -- which Keras 3 no longer has.
raylab does it for every framework the same way: each tensor of the checkpoint
whose name and shape match one of the new model is copied, the rest is skipped,
and a per-tensor report says what happened:

    loaded          same name, same shape: copied
    skipped_shape   same name, other shape (a wider layer, more heads): left at init
    new             only in the new model (an extra block): left at init
    unused          only in the checkpoint (a block the new model lacks)
    kept            the new run's own values, never copied: constants computed from
                    its data (GMAN's normalisation and spatial embedding) and RNG states

The report is written as `warm_start.json` in the new run's folder and
summarised on screen. Only weights move: the optimizer, schedule and position
start fresh. A run that already has checkpoints of its own resumes from them
and ignores `init_from`.

`init_from` (any config, `raylab train --init-from`) is a checkpoint folder, or
a run folder (its newest valid checkpoint), local or `s3://...`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs

from raylab.checkpoint import STATE_FILE, CheckpointError, read_checkpoint_state

WARM_START_FILE = "warm_start.json"


@dataclass
class WarmStartReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[dict] = field(default_factory=list)  # {"name", "saved", "model"}
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kept = f", {len(self.kept)} kept from this run (data constants, RNG states)" if self.kept else ""
        return (f"warm start from {self.source}: {len(self.loaded)} tensors loaded, {len(self.skipped_shape)} skipped "
                f"(shape differs), {len(self.new)} new, {len(self.unused)} unused{kept}")

    def to_json(self) -> bytes:
        counts = {k: len(v) for k, v in asdict(self).items() if isinstance(v, list)}
        return json.dumps({"summary": self.summary(), "counts": counts, **asdict(self)}, indent=2).encode()


def match_tensors(source: str, saved: dict[str, tuple[int, ...]], model: dict[str, tuple[int, ...]],
                  keep: Callable[[str], bool] = lambda name: False) -> WarmStartReport:
    """Decide tensor by tensor what a warm start loads, from names and shapes alone; names
    `keep` accepts stay as the new run has them."""
    report = WarmStartReport(source)
    for name, shape in model.items():
        if keep(name):
            report.kept.append(name)
        elif name not in saved:
            report.new.append(name)
        elif tuple(saved[name]) == tuple(shape):
            report.loaded.append(name)
        else:
            report.skipped_shape.append({"name": name, "saved": list(saved[name]), "model": list(shape)})
    report.unused = [name for name in saved if name not in model and not keep(name)]
    return report


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


@contextlib.contextmanager
def source_checkpoint(location: str) -> Iterator[Path]:
    """`init_from` as a verified local checkpoint folder (a run folder: its newest valid checkpoint)."""
    from raylab.checkpoint_store import local_copy, scan_checkpoints

    try:
        fs, path = _filesystem(location)
        kind = fs.get_file_info(path).type
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"init_from '{location}' cannot be read ({exc}).") from None
    if kind != pafs.FileType.Directory:
        raise CheckpointError(f"init_from '{location}' is not a checkpoint or run folder.")
    if fs.get_file_info(f"{path}/{STATE_FILE}").type != pafs.FileType.File:
        valid = [r for r in scan_checkpoints(fs, path) if r.problem is None]
        if not valid:
            raise CheckpointError(f"init_from '{location}' holds no valid checkpoint (no {STATE_FILE} in it or in a checkpoint_* folder).")
        path = valid[-1].path
    with local_copy(fs, path) as directory:
        read_checkpoint_state(directory, verify=True)
        yield directory


def write_report(fs: pafs.FileSystem, run_path: str, report: WarmStartReport) -> None:
    from raylab.run_storage import write_file

    write_file(fs, f"{run_path}/{WARM_START_FILE}", report.to_json())
