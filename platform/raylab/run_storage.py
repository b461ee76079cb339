"""The run's own files next to Ray's checkpoints: metrics.parquet and TensorBoard.

Ray Train V2's `Result` keeps only the reports that carried a checkpoint, so the
main worker keeps the full curve itself: `metrics.parquet` has one row per
report (column `step` plus every metric) and is rewritten whole at each report
through a temporary name, so a reader never sees half a file. Both files live
in `<storage>/<run name>/` on any pyarrow filesystem (local folder or S3).

On resume the log is reloaded and rows past the checkpoint's step are dropped:
those steps are about to be trained again.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

METRICS_FILE = "metrics.parquet"
TENSORBOARD_DIR = "tensorboard"


def run_filesystem(storage_path: str, name: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path of the run folder on it) for a local folder or a URI."""
    if "://" in storage_path:
        fs, root = pafs.FileSystem.from_uri(storage_path)
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(storage_path).expanduser().resolve())
    return fs, f"{root.rstrip('/')}/{name}"


def read_metrics(fs: pafs.FileSystem, run_path: str) -> pd.DataFrame:
    """The run's metrics log, empty if there is none yet."""
    path = f"{run_path}/{METRICS_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return pd.DataFrame()
    with fs.open_input_file(path) as fh:
        return pq.read_table(fh).to_pandas()


def write_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write through a temporary name and move into place: readers never see half a file."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(f"{path}.tmp") as fh:
        fh.write(data)
    fs.move(f"{path}.tmp", path)


class MetricsLog:
    """Append-only (per run attempt) metrics table persisted as Parquet."""

    def __init__(self, fs: pafs.FileSystem, run_path: str, resume_step: int):
        self.fs, self.run_path = fs, run_path
        previous = read_metrics(fs, run_path)
        if not previous.empty and "step" in previous:
            previous = previous[previous["step"] <= resume_step]
        self.rows: list[dict[str, Any]] = previous.to_dict("records") if not previous.empty else []

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        table = pa.Table.from_pandas(pd.DataFrame(self.rows), preserve_index=False)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        write_file(self.fs, f"{self.run_path}/{METRICS_FILE}", buffer.getvalue().to_pybytes())


class TensorBoardLog:
    """TensorBoard event files under `<run>/tensorboard/`.

    Event files are appended to, which object stores cannot do, so for remote
    storage they are written locally and copied up at every report.
    """

    def __init__(self, fs: pafs.FileSystem, run_path: str, resume_step: int):
        from tensorboardX import SummaryWriter

        self.fs, self.remote_dir = fs, f"{run_path}/{TENSORBOARD_DIR}"
        self.is_local = isinstance(fs, pafs.LocalFileSystem)
        self.local_dir = self.remote_dir if self.is_local else tempfile.mkdtemp(prefix="raylab-tb-")
        Path(self.local_dir).mkdir(parents=True, exist_ok=True)
        # purge_step makes TensorBoard hide events a previous attempt wrote past the resume point.
        self.writer = SummaryWriter(self.local_dir, purge_step=resume_step if resume_step > 0 else None)

    def scalars(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, step)

    def sync(self) -> None:
        self.writer.flush()
        if not self.is_local:
            self.fs.create_dir(self.remote_dir, recursive=True)
            pafs.copy_files(self.local_dir, self.remote_dir, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def close(self) -> None:
        self.sync()
        self.writer.close()
        if not self.is_local:
            shutil.rmtree(self.local_dir, ignore_errors=True)
