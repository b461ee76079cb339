"""The PyTorch half of the training loop: what `raylab.loop_core` leaves to the framework.

`train_torch(task, cfg, session)` builds the task's parts and hands a
`TorchStepper` to the core. The stepper owns forward/backward with gradient
accumulation (DDP's no_sync on all but the last micro-batch of a step),
clipping, the optimizer and scheduler, train/eval mode, EMA weights
(`ema_decay`), the DataLoader over the core's plan, and the files a checkpoint
holds (model.safetensors, optimizer.pt, scheduler.pt, ema.safetensors). It runs
the same on one worker, on N DDP workers under Ray Train, or in-process.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from raylab.checkpoint import capture_rng, load_torch_state, restore_rng, save_torch_state
from raylab.config import TrainConfig
from raylab.ema import EmaWeights
from raylab.loop_core import Position, TrainingHealthError, check_replicas_agree, epoch_batches, run_loop
from raylab.session import Session
from raylab.task import SampleOutput, TaskContext, TorchTask, task_name_of
from raylab.warm_start import WarmStartReport, match_tensors

__all__ = ["Position", "TrainingHealthError", "check_replicas_agree", "epoch_batches", "train_torch", "TorchStepper"]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: Any, device: str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    if not _distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _all_gather_object(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def weights_fingerprint(model: torch.nn.Module) -> list[float]:
    """Per-parameter float64 sums: identical on every rank when data parallelism is working."""
    with torch.no_grad():
        return [float(p.detach().double().sum()) for p in model.parameters()]


class TorchStepper:
    """The core's `Stepper` for a PyTorch task."""

    framework = "torch"

    def __init__(self, task: TorchTask, cfg: TrainConfig, session: Session):
        self.task, self.cfg, self.device = task, cfg, session.device
        self.ctx = TaskContext(session.world_rank, session.world_size, session.local_rank, session.device, _all_reduce_sum, _all_gather_object)
        # Same seed on every rank for the model init (DDP would broadcast rank 0's anyway).
        seed_all(cfg.seed)
        self.parts = task.build(cfg, self.ctx)
        self.model = self.parts.model.to(self.device)
        self.train_model: torch.nn.Module = self.model
        self.optimizer = self.parts.optimizer
        self.scheduler = None
        self.num_samples = len(self.parts.train_data)
        self.ema = EmaWeights(self.model, cfg.ema_decay) if cfg.ema_decay else None

    # -- schedule, state on disk, RNG ------------------------------------------------
    def start_schedule(self, scheduled_steps: int) -> None:
        if self.parts.make_scheduler:
            self.scheduler = self.parts.make_scheduler(self.optimizer, scheduled_steps)

    def load(self, directory: Path) -> None:
        load_torch_state(directory, self.model, self.optimizer, self.scheduler, device=self.device)
        if self.ema is not None:
            self.ema.load(directory)

    def warm_start(self, directory: Path, source: str) -> WarmStartReport:
        import safetensors.torch

        saved = safetensors.torch.load_file(str(Path(directory) / "model.safetensors"), device=self.device)
        current = self.model.state_dict()
        report = match_tensors(source, {k: tuple(v.shape) for k, v in saved.items()}, {k: tuple(v.shape) for k, v in current.items()})
        self.model.load_state_dict({k: saved[k] for k in report.loaded}, strict=False)
        if self.ema is not None:
            self.ema = EmaWeights(self.model, self.cfg.ema_decay)  # the average starts at the warm weights
        return report

    def save(self, directory: Path) -> None:
        save_torch_state(directory, self.model, self.optimizer, self.scheduler)
        if self.ema is not None:
            self.ema.save(directory)

    def capture_rng(self) -> dict[str, Any]:
        return capture_rng()

    def restore_rng(self, state: dict[str, Any]) -> None:
        restore_rng(state)

    def seed_streams(self, seed: int) -> None:
        seed_all(seed)

    # -- training ---------------------------------------------------------------------
    def start_training(self) -> None:
        if _distributed():
            device_ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        self.train_model.train()

    def batches(self, epoch: int, plan: list[list[int]]) -> Iterable[Any]:
        if hasattr(self.parts.train_data, "set_epoch"):
            self.parts.train_data.set_epoch(epoch)
        # A DataLoader draws its workers' base seed when iterated; from torch's global RNG that
        # draw would shift every dropout mask after a mid-epoch resume (which creates the
        # epoch's loader at another point of the stream). Its own generator, a function of
        # (seed, epoch, rank), keeps the training streams untouched.
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.seed, epoch, self.ctx.world_rank]).integers(2**62)))
        loader = DataLoader(
            self.parts.train_data, batch_sampler=plan, num_workers=self.cfg.data_loader_workers,
            collate_fn=self.parts.collate_fn, pin_memory=self.device.startswith("cuda"), generator=generator,
        )
        for batch in loader:
            yield _to_device(batch, self.device)

    def train_micro_batch(self, batch: Any, step_ends: bool, accum: int) -> dict[str, float]:
        model = self.train_model
        sync = contextlib.nullcontext() if step_ends or model is self.model else model.no_sync()
        with sync:
            loss, metrics = self.task.loss(model, batch)
            (loss / accum).backward()
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}

    def optimizer_step(self) -> None:
        if self.cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update()

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- evaluation and sampling: eval mode, no grad, EMA weights when on -----------------
    @contextlib.contextmanager
    def _inference(self):
        # Evaluation and sampling may draw random numbers (noise, dropout-free sampling paths,
        # subsets); they must not move the training streams, or changing the evaluation
        # cadence, or sampling on rank 0 only, would change the trained weights.
        streams = capture_rng()
        self.model.eval()
        swap = self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()
        try:
            with swap, torch.no_grad():
                yield
        finally:
            self.train_model.train()
            restore_rng(streams)

    def evaluate(self) -> dict[str, float]:
        with self._inference():
            return {k: float(v) for k, v in self.task.evaluate(self.model, self.ctx).items()}

    def sample(self, n: int) -> SampleOutput:
        with self._inference():
            out = self.task.sample(self.model, n, self.ctx)
        return out if isinstance(out, SampleOutput) else SampleOutput(samples=list(out))

    def fingerprint(self) -> list[float]:
        return weights_fingerprint(self.model)

    def health_probe(self):
        """The health checks' view of this model and optimizer (raylab.torch_health)."""
        from raylab.torch_health import TorchProbe

        return TorchProbe(self.model, self.optimizer)

    def finish(self) -> None:
        pass


def train_torch(task: TorchTask, cfg: TrainConfig, session: Session) -> dict[str, Any]:
    """Train `task` with `cfg`, reporting to `session`; returns the last report's metrics."""
    stepper = TorchStepper(task, cfg, session)
    return run_loop(
        stepper, cfg, session, task_name_of(task),
        headline=tuple(getattr(task, "headline_metrics", ("loss", "accuracy"))), metadata=stepper.parts.metadata,
    )
