"""What a run writes besides the training itself: metrics rows, samples, checkpoints.

Part of the framework-neutral loop (`raylab.loop_core`). `RunRecorder` owns
metrics.parquet, TensorBoard, the samples folder and the progress display (on
rank 0; a no-op elsewhere, so the loop never checks the rank). `Checkpointer`
writes a checkpoint folder -- the framework's files plus `state.json` with the
position, config, metrics, every worker's RNG state and checksums -- after
checking that every worker holds worker 0's weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from raylab.checkpoint import finalize_checkpoint
from raylab.config import TrainConfig
from raylab.run_storage import MetricsLog, TensorBoardLog, write_file
from raylab.session import Session
from raylab.task import SampleOutput

if TYPE_CHECKING:
    from raylab.loop_core import Position, RunPlan, Stepper


class TrainingHealthError(RuntimeError):
    """Training went numerically wrong (non-finite loss, diverged workers); the message says where."""


def check_replicas_agree(fingerprints: list[list[float]], step: int) -> None:
    """Raise if any rank's weights differ from rank 0's (gradients not synchronised, or rank-dependent code)."""
    for rank, fp in enumerate(fingerprints[1:], start=1):
        if fp != fingerprints[0]:
            first = next(i for i, (a, b) in enumerate(zip(fingerprints[0], fp)) if a != b)
            raise TrainingHealthError(
                f"worker {rank}'s weights differ from worker 0's at step {step} (first at parameter #{first}): "
                "gradients are not being synchronised across workers, or model code depends on the rank."
            )


def checkpoint_name(pos: Position) -> str:
    return f"checkpoint_epoch{pos.epoch:04d}_batch{pos.batch_in_epoch:06d}_step{pos.global_step:08d}"


class MetricsWindow:
    """Running means of train metrics and throughput since the last read."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.samples = 0
        self.seconds = 0.0

    def add(self, metrics: dict[str, float], samples: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.samples += samples

    def read(self) -> dict[str, float]:
        out = {f"train_{k}": v / self.count for k, v in self.sums.items()} if self.count else {}
        if self.seconds > 0:
            out["samples_per_s"] = self.samples / self.seconds
        return out


class RunRecorder:
    """Everything a run writes besides checkpoints, and what the display hears.

    Rank 0 owns metrics.parquet, TensorBoard, the samples folder and the display;
    on other ranks every method is a no-op, so the loop never checks the rank.
    """

    def __init__(self, session: Session, cfg: TrainConfig, plan: RunPlan, pos: Position, headline: tuple[str, ...]):
        self.session, self.cfg, self.plan, self.pos = session, cfg, plan, pos
        self.main = session.world_rank == 0
        self.metrics_log = MetricsLog(session.run_fs, session.run_path, pos.global_step) if self.main else None
        self.tensorboard = TensorBoardLog(session.run_fs, session.run_path, pos.global_step) if self.main else None
        self.headline = headline
        self.started = time.perf_counter()
        self.total_steps = 0
        self.last_checkpoint: str | None = None
        self.pending: dict[str, float] = {}  # sampling-round metrics waiting for this step's row
        self.row_health: Callable[[], str] = lambda: ""  # health findings since the last row (raylab.health)

    def progress(self, **extra: Any) -> None:
        if self.main:
            self.session.progress({
                **asdict(self.pos), "total_steps": self.total_steps, "max_epochs": self.cfg.max_epochs,
                "batches_per_epoch": self.plan.batches_per_epoch, "last_checkpoint": self.last_checkpoint,
                "headline_metrics": list(self.headline), "elapsed_s": time.perf_counter() - self.started, **extra,
            })

    def train_scalars(self, window: dict[str, float]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.scalars(window, self.pos.global_step)

    def samples(self, output: SampleOutput) -> None:
        """Write a sampling round: samples/step_N.json, a PNG beside it, metrics for this step's row."""
        if not self.main:
            return
        stem = f"{self.session.run_path}/samples/step_{self.pos.global_step:08d}"
        payload = {
            "step": self.pos.global_step, "epoch": self.pos.epoch, "seed": self.cfg.seed,
            "config": self.cfg.model_dump(mode="json"), "metrics": output.metrics, "samples": output.samples,
        }
        write_file(self.session.run_fs, f"{stem}.json", json.dumps(payload, indent=2, default=str).encode())
        if output.png:
            write_file(self.session.run_fs, f"{stem}.png", output.png)
        self.pending.update({k: float(v) for k, v in output.metrics.items()})

    def row(self, lr: float, window: dict[str, float], eval_metrics: dict[str, float]) -> dict[str, Any]:
        row = {
            "step": self.pos.global_step, "epoch": self.pos.epoch + self.pos.batch_in_epoch / self.plan.batches_per_epoch,
            "lr": lr, **window, **eval_metrics, **self.pending, "time_s": time.perf_counter() - self.started,
        }
        self.pending = {}
        return row

    def record(self, row: dict[str, Any]) -> None:
        self.store(row)
        self.announce(row)

    def store(self, row: dict[str, Any]) -> None:
        """The row into metrics.parquet and TensorBoard."""
        if self.main:
            self.metrics_log.append({**row, "health": self.row_health()})
            self.tensorboard.scalars(row, self.pos.global_step)
            self.tensorboard.sync()

    def announce(self, row: dict[str, Any]) -> None:
        """The row to the display."""
        self.progress(**{k: v for k, v in row.items() if k not in ("step", "epoch")})

    def flush_pending(self) -> None:
        """Sampling metrics of a step without a report still get their row."""
        if self.pending and self.main:
            self.record({"step": self.pos.global_step, "epoch": self.pos.epoch + self.pos.batch_in_epoch / self.plan.batches_per_epoch,
                         **self.pending, "time_s": time.perf_counter() - self.started})
        self.pending = {}

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class Checkpointer:
    """Writes a checkpoint folder (the stepper's files + state.json) and hands it to the session."""

    def __init__(self, stepper: Stepper, cfg: TrainConfig, session: Session, task_name: str, metadata: dict[str, Any]):
        self.stepper, self.cfg, self.session = stepper, cfg, session
        self.task_name, self.metadata = task_name, metadata

    def report(self, pos: Position, row: dict[str, Any], with_checkpoint: bool) -> str | None:
        """Report `row` (every worker calls this); returns the checkpoint's name when one was written."""
        ctx = self.stepper.ctx
        if not with_checkpoint:
            self.session.report(row, None, None)
            return None
        gathered = ctx.all_gather_object((self.stepper.capture_rng(), self.stepper.fingerprint()))
        check_replicas_agree([fp for _, fp in gathered], pos.global_step)
        directory, name = None, checkpoint_name(pos)
        if ctx.is_main:
            directory = Path(tempfile.mkdtemp(prefix="raylab-ckpt-"))
            self.stepper.save(directory)
            finalize_checkpoint(directory, {
                "position": asdict(pos), "metrics": row, "rng": [rng for rng, _ in gathered], "world_size": ctx.world_size,
                "config": self.cfg.model_dump(mode="json"), "task": self.task_name, "framework": self.stepper.framework,
                "task_metadata": self.metadata,
            })
        try:
            self.session.report(row, directory, name if directory else None)
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        return name
