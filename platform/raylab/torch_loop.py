"""The training loop for PyTorch tasks, written once for every model.

It owns what the seed projects got wrong one by one: the data position (epoch,
batch in epoch, global step) and every RNG, so a run resumes mid-epoch on the
exact next batch without reading the skipped ones; train/eval mode; gradient
accumulation with DDP's no_sync; a finite-loss check; a sampling round before
the first step; and the cadence of logs, evaluations, samples and checkpoints.
It runs the same on one worker, on N DDP workers under Ray Train, or in-process.

Data order is a pure function of (seed, epoch, rank, world size): a seeded
permutation, sharded by rank, cut into batches with the remainder dropped so
every worker takes the same number of steps.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from raylab.checkpoint import capture_rng, finalize_checkpoint, load_torch_state, read_checkpoint_state, restore_rng, save_torch_state
from raylab.config import ConfigError, TrainConfig
from raylab.run_storage import MetricsLog, TensorBoardLog, write_file
from raylab.session import Session
from raylab.task import TaskContext, TorchTask


class TrainingHealthError(RuntimeError):
    """Training went numerically wrong (non-finite loss); the message says where."""


@dataclass
class Position:
    epoch: int = 0  # the epoch being trained
    batch_in_epoch: int = 0  # micro-batches of `epoch` already trained
    global_step: int = 0  # optimizer steps taken


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int, multiple_of: int = 1) -> list[list[int]]:
    """This rank's micro-batches (sample indices) for one epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    per_rank = num_samples // world_size
    mine = order[rank::world_size][:per_rank]
    num_batches = (per_rank // batch_size) // multiple_of * multiple_of
    return [mine[i * batch_size:(i + 1) * batch_size].tolist() for i in range(num_batches)]


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """'field old -> new' for every field that differs, '' when none does."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)


def _seed_all(seed: int) -> None:
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


def check_replicas_agree(fingerprints: list[list[float]], step: int) -> None:
    """Raise if any rank's weights differ from rank 0's (gradients not synchronised, or rank-dependent code)."""
    for rank, fp in enumerate(fingerprints[1:], start=1):
        if fp != fingerprints[0]:
            first = next(i for i, (a, b) in enumerate(zip(fingerprints[0], fp)) if a != b)
            raise TrainingHealthError(
                f"worker {rank}'s weights differ from worker 0's at step {step} (first at parameter #{first}): "
                "gradients are not being synchronised across workers, or model code depends on the rank."
            )


class _Window:
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


def train_torch(task: TorchTask, cfg: TrainConfig, session: Session) -> dict[str, Any]:
    """Train `task` with `cfg`, reporting to `session`; returns the last report's metrics."""
    rank, world = session.world_rank, session.world_size
    main = rank == 0
    ctx = TaskContext(rank, world, session.local_rank, session.device, _all_reduce_sum, _all_gather_object)
    # Same seed on every rank for the model init (DDP would broadcast rank 0's anyway).
    _seed_all(cfg.seed)
    parts = task.build(cfg, ctx)
    model = parts.model.to(session.device)
    accum = cfg.grad_accum_steps
    num_samples = len(parts.train_data)
    batches_per_epoch = len(epoch_batches(num_samples, cfg.per_worker_batch_size, cfg.seed, 0, rank, world, accum))
    if batches_per_epoch == 0:
        raise ConfigError(
            f"the training split has {num_samples} samples: too few for {world} worker(s) x per_worker_batch_size "
            f"{cfg.per_worker_batch_size} x grad_accum_steps {accum}; lower per_worker_batch_size."
        )
    steps_per_epoch = batches_per_epoch // accum
    # The schedule's length: the whole run as configured, whatever attempt this is.
    scheduled_steps = steps_per_epoch * cfg.max_epochs
    if cfg.max_steps is not None:
        scheduled_steps = min(scheduled_steps, cfg.max_steps)
    scheduler = parts.make_scheduler(parts.optimizer, scheduled_steps) if parts.make_scheduler else None

    pos = Position()
    last_checkpoint = None
    resume_notice = None
    with session.latest_checkpoint() as ckpt:
        if ckpt is not None:
            state = read_checkpoint_state(ckpt)
            load_torch_state(ckpt, model, parts.optimizer, scheduler, device=session.device)
            pos = Position(**state["position"])
            saved_world = state.get("world_size", world)
            if saved_world == world:
                restore_rng(state["rng"][rank])
            else:
                # Other worker counts shard the data differently: keep the number of samples of
                # this epoch already seen, and fresh (still seeded) RNG streams.
                pos.batch_in_epoch = pos.batch_in_epoch * saved_world // world // accum * accum
                _seed_all(cfg.seed + 1 + rank + 7919 * pos.global_step)
                resume_notice = (
                    f"resuming a {saved_world}-worker checkpoint with {world} worker(s): continuing epoch {pos.epoch} at "
                    f"batch {pos.batch_in_epoch} (same samples seen, approximately the same ones); bit-exact resume needs "
                    f"{saved_world} workers"
                )
            changed = config_changes(state.get("config", {}), cfg.model_dump(mode="json"))
            if changed:
                notice = f"resuming {Path(ckpt).name} with changed config: {changed}"
                resume_notice = f"{resume_notice}; {notice}" if resume_notice else notice
            last_checkpoint = Path(ckpt).name
        else:
            _seed_all(cfg.seed + 1 + rank)  # distinct dropout/noise streams per rank

    train_model: torch.nn.Module = model
    if _distributed():
        device_ids = [torch.device(session.device).index] if session.device.startswith("cuda") else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)

    metrics_log = MetricsLog(session.run_fs, session.run_path, pos.global_step) if main else None
    tensorboard = TensorBoardLog(session.run_fs, session.run_path, pos.global_step) if main else None
    global_batch = cfg.per_worker_batch_size * world
    window = _Window()
    last_metrics: dict[str, Any] = {}
    run_started = time.perf_counter()

    def progress(**extra: Any) -> None:
        if main:
            session.progress({
                **asdict(pos), "total_steps": total_steps, "max_epochs": cfg.max_epochs,
                "batches_per_epoch": batches_per_epoch, "last_checkpoint": last_checkpoint,
                "elapsed_s": time.perf_counter() - run_started, **extra,
            })

    def write_samples() -> None:
        if not (main and cfg.num_samples):
            return
        model.eval()
        with torch.no_grad():
            samples = task.sample(model, cfg.num_samples, ctx)
        model.train()
        payload = json.dumps({"step": pos.global_step, "epoch": pos.epoch, "samples": samples}, indent=2, default=str)
        write_file(session.run_fs, f"{session.run_path}/samples/step_{pos.global_step:08d}.json", payload.encode())

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            result = task.evaluate(model, ctx)
        model.train()
        return {f"val_{k}": float(v) for k, v in result.items()}

    def report(eval_metrics: dict[str, float], with_checkpoint: bool) -> None:
        nonlocal last_checkpoint, last_metrics
        row = {
            "step": pos.global_step, "epoch": pos.epoch + pos.batch_in_epoch / batches_per_epoch,
            "lr": parts.optimizer.param_groups[0]["lr"], **window.read(), **eval_metrics,
            "time_s": time.perf_counter() - run_started,
        }
        window.reset()
        checkpoint_dir, name = None, None
        if with_checkpoint:
            gathered = _all_gather_object((capture_rng(), weights_fingerprint(model)))
            rngs = [rng for rng, _ in gathered]
            check_replicas_agree([fp for _, fp in gathered], pos.global_step)
            if main:
                checkpoint_dir = Path(tempfile.mkdtemp(prefix="raylab-ckpt-"))
                save_torch_state(checkpoint_dir, model, parts.optimizer, scheduler)
                finalize_checkpoint(checkpoint_dir, {
                    "position": asdict(pos), "metrics": row, "rng": rngs, "world_size": world,
                    "config": cfg.model_dump(mode="json"), "task": type(task).__module__,
                })
                name = f"checkpoint_epoch{pos.epoch:04d}_batch{pos.batch_in_epoch:06d}_step{pos.global_step:08d}"
        session.report(row, checkpoint_dir, name)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            last_checkpoint = name
        if main:
            metrics_log.append(row)
            tensorboard.scalars(row, pos.global_step)
            tensorboard.sync()
        last_metrics = row
        progress(**{k: v for k, v in row.items() if k not in ("step", "epoch")})

    def finished() -> bool:
        # Epochs (or max_steps) end a run, not a step total: a resumed run whose batch size
        # changed still trains the epochs it was asked for.
        return pos.epoch >= cfg.max_epochs or (cfg.max_steps is not None and pos.global_step >= cfg.max_steps)

    # What the display counts down to, from where this attempt starts.
    remaining = (batches_per_epoch - min(pos.batch_in_epoch, batches_per_epoch)) // accum + max(0, cfg.max_epochs - pos.epoch - 1) * steps_per_epoch
    total_steps = pos.global_step + remaining if pos.epoch < cfg.max_epochs else pos.global_step
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    if finished() and last_checkpoint:
        complete = f"run already complete at step {pos.global_step} ({last_checkpoint}); nothing to train. Raise max_epochs to continue it"
        resume_notice = f"{resume_notice}; {complete}" if resume_notice else complete
    if resume_notice:
        progress(notice=resume_notice)
    if pos.global_step == 0:
        write_samples()  # fail on a broken sampler now, not after hours of training
    train_model.train()
    done = finished()
    while not done:
        plan = epoch_batches(num_samples, cfg.per_worker_batch_size, cfg.seed, pos.epoch, rank, world, accum)
        if hasattr(parts.train_data, "set_epoch"):
            parts.train_data.set_epoch(pos.epoch)
        loader = DataLoader(
            parts.train_data, batch_sampler=plan[pos.batch_in_epoch:], num_workers=cfg.data_loader_workers,
            collate_fn=parts.collate_fn, pin_memory=session.device.startswith("cuda"),
        )
        tick = time.perf_counter()
        for batch in loader:
            step_ends = (pos.batch_in_epoch + 1) % accum == 0
            sync = nullcontext() if step_ends or train_model is model else train_model.no_sync()
            with sync:
                loss, metrics = task.loss(train_model, _to_device(batch, session.device))
                (loss / accum).backward()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingHealthError(
                    f"loss became {loss_value} at epoch {pos.epoch}, batch {pos.batch_in_epoch}, step {pos.global_step}; "
                    f"lower lr (now {parts.optimizer.param_groups[0]['lr']:.3g}) or set grad_clip_norm."
                )
            window.add({"loss": loss_value, **{k: float(v) for k, v in metrics.items()}}, global_batch)
            pos.batch_in_epoch += 1
            if not step_ends:
                continue
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            pos.global_step += 1
            now = time.perf_counter()
            window.seconds += now - tick
            done = cfg.max_steps is not None and pos.global_step >= cfg.max_steps
            epoch_ends = pos.batch_in_epoch == len(plan)
            if pos.global_step % cfg.log_every_steps == 0:
                if tensorboard is not None:
                    tensorboard.scalars(window.read(), pos.global_step)
                progress(**window.read())
            if cfg.sample_every_steps and pos.global_step % cfg.sample_every_steps == 0:
                write_samples()
            wants_eval = cfg.eval_every_steps > 0 and pos.global_step % cfg.eval_every_steps == 0
            wants_ckpt = cfg.checkpoint_every_batches > 0 and pos.batch_in_epoch % cfg.checkpoint_every_batches == 0
            if epoch_ends:
                break  # the end-of-epoch report below covers this step
            if done or wants_eval or wants_ckpt:
                eval_metrics = evaluate() if (wants_eval or done) else {}
                if eval_metrics and not cfg.sample_every_steps:
                    write_samples()
                report(eval_metrics, with_checkpoint=wants_ckpt or done)
            if done:
                break
            tick = time.perf_counter()
        if pos.batch_in_epoch >= len(plan):
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
            eval_metrics = evaluate()
            if not cfg.sample_every_steps:
                write_samples()
            report(eval_metrics, with_checkpoint=True)
            done = finished()
    if tensorboard is not None:
        tensorboard.close()
    return last_metrics
