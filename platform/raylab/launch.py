"""The Python API behind `raylab train`: resolve a config, run it, summarise it.

    from raylab.launch import train
    from raylab.config import LaunchConfig
    summary = train("tinyimagenet", "quick", {"family": "se"}, LaunchConfig(num_workers=2))

Everything a user can get wrong (model name, stage, field values, run name,
worker count) is checked here, before Ray starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from raylab.checkpoint_store import display_path, scan_checkpoints
from raylab.config import ConfigError, LaunchConfig, TrainConfig, resolve_config
from raylab.plots import write_curves
from raylab.run_storage import read_metrics, run_filesystem
from raylab.task import TorchTask, check_workers, get_task

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def find_experiment(task_name: str, experiment: str | Path | None = None) -> Path:
    """The experiment file: given explicitly, else experiments/<model>.yaml here or in the repo."""
    if experiment is not None:
        return Path(experiment)
    for base in (Path.cwd(), repo_root()):
        candidate = base / "experiments" / f"{task_name}.yaml"
        if candidate.is_file():
            return candidate
    return Path("experiments") / f"{task_name}.yaml"


def check_run_name(name: str) -> str:
    """Run names become folder names under the storage root; keep them inside it."""
    if not _NAME.match(name) or ".." in name:
        raise ConfigError(
            f"run name '{name}' must be 1-128 letters, digits, '.', '_' or '-', start with a letter or digit "
            "and not contain '..' (it becomes a folder under the storage root)."
        )
    return name


def prepare(task_name: str, stage: str, overrides: dict[str, Any] | None = None, experiment: str | Path | None = None) -> tuple[TorchTask, TrainConfig]:
    task = get_task(task_name)
    cfg = resolve_config(task.config_cls, find_experiment(task_name, experiment), stage, overrides or {})
    return task, cfg


def check_storage(fs, run_path: str, storage: str) -> None:
    """Create the run folder and prove it is writable, before any worker starts."""
    probe = f"{run_path}/.raylab-write-check"
    try:
        fs.create_dir(run_path, recursive=True)
        with fs.open_output_stream(probe) as fh:
            fh.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"storage '{storage}' is not writable ({exc}); pass a writable --storage folder or URI.") from None


@contextlib.contextmanager
def in_process_threads(cpus: float) -> Iterator[None]:
    """An in-process run (--workers 0) computes with as many threads as a Ray worker with
    `cpus` CPUs would (Ray sets OMP_NUM_THREADS to a worker's CPUs): the same numbers as
    --workers 1, and no collapse when the machine is oversubscribed (two OpenMP threads
    fighting other processes for 2 cores ran steps 10x slower here). --cpus-per-worker raises it."""
    import torch

    threads = max(1, int(cpus))
    before, before_env = torch.get_num_threads(), os.environ.get("RAYLAB_TF_THREADS")
    torch.set_num_threads(threads)
    os.environ.setdefault("RAYLAB_TF_THREADS", str(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if before_env is None:
            os.environ.pop("RAYLAB_TF_THREADS", None)


@dataclass
class RunSummary:
    name: str
    run_path: str
    wall_s: float
    metrics: pd.DataFrame = field(repr=False)
    latest_checkpoint: str | None = None
    curves: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics.iloc[-1].dropna().to_dict() if not self.metrics.empty else {}

    def best(self, metric: str, mode: str = "max") -> float | None:
        if metric not in self.metrics or self.metrics[metric].dropna().empty:
            return None
        col = self.metrics[metric].dropna()
        return float(col.max() if mode == "max" else col.min())


def train(
    task_name: str, stage: str = "quick", overrides: dict[str, Any] | None = None,
    launch: LaunchConfig | None = None, experiment: str | Path | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Train one stage of a model; returns its metrics and where its checkpoints are."""
    launch = launch or LaunchConfig()
    task, cfg = prepare(task_name, stage, overrides, experiment)
    check_workers(task, cfg, launch.num_workers)
    name = check_run_name(launch.name or f"{task_name}-{stage}-{datetime.now():%Y%m%d-%H%M%S}")
    storage = launch.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    fs, run_path = run_filesystem(storage, name)
    check_storage(fs, run_path, launch.storage_path)
    started = time.perf_counter()
    if launch.num_workers == 0:
        from raylab.retention import RetentionPolicy
        from raylab.session import LocalSession
        from raylab.task import framework_of

        session = LocalSession(run_path, on_progress=on_progress, retention=RetentionPolicy.from_config(cfg), filesystem=fs)
        with in_process_threads(launch.cpus_per_worker):
            if framework_of(task) == "tensorflow":
                from raylab.tf_loop import train_tf

                train_tf(task, cfg, session)
            else:
                from raylab.torch_loop import train_torch

                train_torch(task, cfg, session)
    else:
        from raylab.ray_backend import run_on_ray

        run_on_ray(task_name, cfg, launch, name, storage, on_progress)
    metrics = read_metrics(fs, run_path)
    curves = write_curves(fs, run_path, metrics, f"{task_name} {stage}: {name}", tuple(getattr(task, "headline_metrics", ())))
    # Paths people read keep the scheme they gave (s3://bucket/..., not bucket/...).
    complete = [r for r in scan_checkpoints(fs, run_path, "sizes") if r.valid]
    latest_checkpoint = complete[-1].uri if complete else None
    return RunSummary(name, display_path(fs, run_path), time.perf_counter() - started, metrics, latest_checkpoint,
                      display_path(fs, curves) if curves else None)
