"""The framework-neutral half of every training loop: position, plan, cadence, reports.

raylab has one loop per framework only where frameworks differ (forward/backward,
distributed wrapping, optimizer, weights on disk). Everything else lives here
and is written once:

- the position (epoch, batch in epoch, global step) and resuming it from a
  checkpoint, with notices for a changed worker count or config;
- the epoch plan: data order is a pure function of (seed, epoch, rank, world
  size) -- a seeded permutation, sharded by rank, cut into micro-batches with
  the remainder dropped so every worker takes the same number of steps;
- the cadence of progress lines, TensorBoard scalars, evaluations, sampling
  rounds and checkpoints, and the rows of metrics.parquet;
- the checkpoint's `state.json` (position, config, metrics, every worker's RNG,
  checksums) and the replica check (every worker holds worker 0's weights).

A framework loop (`raylab.torch_loop`, `raylab.tf_loop`) supplies a `Stepper`;
`run_loop(stepper, cfg, session, task_name)` trains it. Read `TrainingRun` top
to bottom: it is the whole life of a run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from raylab.checkpoint import read_checkpoint_state
from raylab.config import ConfigError, TrainConfig
from raylab.health import HealthMonitor
from raylab.loop_reporting import Checkpointer, MetricsWindow, RunRecorder, TrainingHealthError, check_replicas_agree, checkpoint_name
from raylab.session import Session
from raylab.task import SampleOutput, TaskContext
from raylab.warm_start import WarmStartReport, source_checkpoint, write_report

__all__ = ["Position", "RunPlan", "Stepper", "TrainingHealthError", "check_replicas_agree", "checkpoint_name", "epoch_batches", "run_loop"]


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


def config_defaults(config_cls: type[TrainConfig]) -> dict[str, Any]:
    """Every field's default, as JSON data (what a checkpoint written before the field existed meant)."""
    out = {}
    for name, info in config_cls.model_fields.items():
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            out[name] = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None) -> str:
    """'field old -> new' for every field that differs, '' when none does. A field the saved
    config lacks (added to raylab since) counts as its default there."""
    saved = {**(defaults or {}), **saved}
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)


class Stepper(Protocol):
    """What a framework loop gives the core: the framework-specific half of a run.

    The stepper has built the task's parts (model, optimizer, data) before the
    core starts; the core calls these in this order: `start_schedule`, then on
    resume `load` + `restore_rng` (or `seed_streams`), `start_training`, then
    for every epoch `batches` and, per micro-batch, `train_micro_batch` and
    (at step boundaries) `optimizer_step`.
    """

    ctx: TaskContext  # rank, world size, device and collectives (all_reduce_sum, all_gather_object)
    num_samples: int  # size of the training split
    framework: str  # recorded in state.json ("torch", "tensorflow")

    def start_schedule(self, scheduled_steps: int) -> None: ...  # LR schedule over the whole run

    def load(self, directory: Path) -> None: ...  # weights, optimizer, schedule (and features such as EMA)

    def warm_start(self, directory: Path, source: str) -> WarmStartReport: ...  # matching weights only (init_from)

    def save(self, directory: Path) -> None: ...  # the same, as plain data files

    def capture_rng(self) -> dict[str, Any]: ...

    def restore_rng(self, state: dict[str, Any]) -> None: ...

    def seed_streams(self, seed: int) -> None: ...  # dropout / noise streams of this worker

    def start_training(self) -> None: ...  # wrap for data parallelism, enter training mode

    def batches(self, epoch: int, plan: list[list[int]]) -> Iterable[Any]: ...  # micro-batches, in plan order

    def train_micro_batch(self, batch: Any, step_ends: bool, accum: int) -> dict[str, float]: ...  # forward + backward; "loss" first

    def optimizer_step(self) -> None: ...  # clip, step, zero grads, scheduler, features

    def learning_rate(self) -> float: ...

    def evaluate(self) -> dict[str, float]: ...  # the task's metrics, model left in training mode

    def sample(self, n: int) -> SampleOutput: ...  # rank 0 only, model left in training mode

    def fingerprint(self) -> list[float]: ...  # per-variable sums: equal on every worker

    def finish(self) -> None: ...


@dataclass
class RunPlan:
    """Sizes of a run, fixed for this attempt."""

    batches_per_epoch: int
    steps_per_epoch: int
    scheduled_steps: int  # the LR schedule's length: the whole run as configured

    @classmethod
    def of(cls, cfg: TrainConfig, num_samples: int, rank: int, world: int) -> "RunPlan":
        accum = cfg.grad_accum_steps
        batches = len(epoch_batches(num_samples, cfg.per_worker_batch_size, cfg.seed, 0, rank, world, accum))
        if batches == 0:
            raise ConfigError(
                f"the training split has {num_samples} samples: too few for {world} worker(s) x per_worker_batch_size "
                f"{cfg.per_worker_batch_size} x grad_accum_steps {accum}; lower per_worker_batch_size."
            )
        steps = batches // accum
        scheduled = steps * cfg.max_epochs
        if cfg.max_steps is not None:
            scheduled = min(scheduled, cfg.max_steps)
        return cls(batches, steps, scheduled)


@dataclass
class Resumed:
    """Where a run starts: from scratch, or from a checkpoint (and what the user should know)."""

    pos: Position = field(default_factory=Position)
    checkpoint: str | None = None
    notices: list[str] = field(default_factory=list)
    warm_start: WarmStartReport | None = None


def resume(stepper: Stepper, cfg: TrainConfig, session: Session) -> Resumed:
    """Restore the newest checkpoint the session offers into `stepper`, or seed a fresh start."""
    rank, world = stepper.ctx.world_rank, stepper.ctx.world_size
    with session.latest_checkpoint() as ckpt:
        if ckpt is None:
            out = Resumed()
            if cfg.init_from:
                with source_checkpoint(cfg.init_from) as source:
                    out.warm_start = stepper.warm_start(source, cfg.init_from)
                out.notices.append(out.warm_start.summary())
            stepper.seed_streams(cfg.seed + 1 + rank)  # distinct dropout/noise streams per rank
            return out
        state = read_checkpoint_state(ckpt)
        stepper.load(Path(ckpt))
        out = Resumed(Position(**state["position"]), Path(ckpt).name)
        saved_world = state.get("world_size", world)
        if saved_world == world:
            stepper.restore_rng(state["rng"][rank])
        else:
            # Other worker counts shard the data differently: keep the number of samples of
            # this epoch already seen, and fresh (still seeded) RNG streams.
            accum = cfg.grad_accum_steps
            out.pos.batch_in_epoch = out.pos.batch_in_epoch * saved_world // world // accum * accum
            stepper.seed_streams(cfg.seed + 1 + rank + 7919 * out.pos.global_step)
            out.notices.append(
                f"resuming a {saved_world}-worker checkpoint with {world} worker(s): continuing epoch {out.pos.epoch} at "
                f"batch {out.pos.batch_in_epoch} (same samples seen, approximately the same ones); bit-exact resume needs "
                f"{saved_world} workers"
            )
        changed = config_changes(state.get("config", {}), cfg.model_dump(mode="json"), config_defaults(type(cfg)))
        if changed:
            out.notices.append(f"resuming {out.checkpoint} with changed config: {changed}")
        return out


@dataclass
class Cadence:
    """What is due after an optimizer step."""

    log: bool
    sample: bool
    evaluate: bool
    checkpoint: bool

    @classmethod
    def after_step(cls, cfg: TrainConfig, pos: Position) -> "Cadence":
        step = pos.global_step
        return cls(
            log=step % cfg.log_every_steps == 0,
            sample=bool(cfg.sample_every_steps) and step % cfg.sample_every_steps == 0,
            evaluate=cfg.eval_every_steps > 0 and step % cfg.eval_every_steps == 0,
            checkpoint=cfg.checkpoint_every_batches > 0 and pos.batch_in_epoch % cfg.checkpoint_every_batches == 0,
        )


def remaining_steps(cfg: TrainConfig, plan: RunPlan, pos: Position) -> int:
    """Optimizer steps this attempt will take, for the display's countdown."""
    if pos.epoch >= cfg.max_epochs:
        total = pos.global_step
    else:
        this_epoch = (plan.batches_per_epoch - min(pos.batch_in_epoch, plan.batches_per_epoch)) // cfg.grad_accum_steps
        total = pos.global_step + this_epoch + (cfg.max_epochs - pos.epoch - 1) * plan.steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps is not None else total


class TrainingRun:
    """One attempt of a run: resume, then epochs of micro-batches, reports on the cadence."""

    def __init__(self, stepper: Stepper, cfg: TrainConfig, session: Session, task_name: str,
                 headline: tuple[str, ...], metadata: dict[str, Any]):
        self.stepper, self.cfg, self.ctx = stepper, cfg, stepper.ctx
        self.plan = RunPlan.of(cfg, stepper.num_samples, self.ctx.world_rank, self.ctx.world_size)
        stepper.start_schedule(self.plan.scheduled_steps)
        self.start = resume(stepper, cfg, session)
        self.pos = self.start.pos
        self.recorder = RunRecorder(session, cfg, self.plan, self.pos, headline)
        self.health = HealthMonitor.for_run(stepper, cfg, self.recorder)  # raylab.health: the checks, at named points
        self.recorder.row_health = self.health.take_row_text
        self.recorder.total_steps = remaining_steps(cfg, self.plan, self.pos)
        self.recorder.last_checkpoint = self.start.checkpoint
        self.checkpointer = Checkpointer(stepper, cfg, session, task_name, metadata)
        self.window = MetricsWindow()
        self.epoch_loss = [0.0, 0]  # running mean of this epoch's loss, for the display
        self.last_row: dict[str, Any] = {}

    def finished(self) -> bool:
        # Epochs (or max_steps) end a run, not a step total: a resumed run whose batch size
        # changed still trains the epochs it was asked for.
        cfg, pos = self.cfg, self.pos
        if pos.epoch >= cfg.max_epochs or (cfg.max_steps is not None and pos.global_step >= cfg.max_steps):
            return True
        # Optional stepper hook: early stopping decided from the evaluations so far (tf_loop: the task's should_stop).
        return bool(getattr(self.stepper, "should_stop", lambda: False)())

    def run(self) -> dict[str, Any]:
        # The task's own notes about this run (TorchParts.metadata['notices']: trainable parameters,
        # truncated clips...), then where the run starts from.
        notices = [*self.checkpointer.metadata.get("notices", []), *self.start.notices]
        if self.finished() and self.start.checkpoint:
            notices.append(f"run already complete at step {self.pos.global_step} ({self.start.checkpoint}); "
                           "nothing to train. Raise max_epochs to continue it")
        if self.start.warm_start is not None and self.ctx.is_main:
            write_report(self.recorder.session.run_fs, self.recorder.session.run_path, self.start.warm_start)
        if notices:
            self.recorder.progress(notice="; ".join(notices))
        if self.pos.global_step == 0:
            self.sample_round()  # fail on a broken sampler now, not after hours of training
            self.recorder.flush_pending()
        self.stepper.start_training()
        self.health.start(self.pos)
        while not self.finished():
            self.train_epoch()
        self.recorder.close()
        self.stepper.finish()
        return self.last_row

    def train_epoch(self) -> None:
        cfg, pos, ctx = self.cfg, self.pos, self.ctx
        plan = epoch_batches(self.stepper.num_samples, cfg.per_worker_batch_size, cfg.seed, pos.epoch,
                             ctx.world_rank, ctx.world_size, cfg.grad_accum_steps)
        tick = time.perf_counter()
        # A resume with a larger batch size can start past the end of the plan: the epoch is over.
        for batch in self.stepper.batches(pos.epoch, plan[pos.batch_in_epoch:]):
            step_ends = (pos.batch_in_epoch + 1) % cfg.grad_accum_steps == 0
            self.health.before_micro_batch(batch, plan[pos.batch_in_epoch], pos)
            self.train_micro_batch(batch, step_ends)
            if not step_ends:
                continue
            self.stepper.optimizer_step()
            pos.global_step += 1
            self.health.after_optimizer_step(pos, self.stepper.learning_rate())
            self.window.seconds += time.perf_counter() - tick
            epoch_ends = pos.batch_in_epoch == len(plan)
            if not self.after_step(epoch_ends) or epoch_ends:
                break
            tick = time.perf_counter()
        if pos.batch_in_epoch >= len(plan):
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
            self.epoch_loss = [0.0, 0]
            self.report(evaluate=True, checkpoint=True)

    def train_micro_batch(self, batch: Any, step_ends: bool) -> None:
        pos = self.pos
        metrics = self.stepper.train_micro_batch(batch, step_ends, self.cfg.grad_accum_steps)
        loss = metrics["loss"]
        if not math.isfinite(loss):
            raise TrainingHealthError(
                f"loss became {loss} at epoch {pos.epoch}, batch {pos.batch_in_epoch}, step {pos.global_step}; "
                f"lower lr (now {self.stepper.learning_rate():.3g}) or set grad_clip_norm."
            )
        self.health.after_micro_batch(metrics, step_ends, pos)
        self.window.add(metrics, self.cfg.per_worker_batch_size * self.ctx.world_size)
        self.epoch_loss[0] += loss
        self.epoch_loss[1] += 1
        pos.batch_in_epoch += 1

    def after_step(self, epoch_ends: bool) -> bool:
        """Logs, samples, evaluations and checkpoints due after this optimizer step; False to stop."""
        cfg, pos = self.cfg, self.pos
        due = Cadence.after_step(cfg, pos)
        stop = cfg.max_steps is not None and pos.global_step >= cfg.max_steps
        if due.log:
            self.recorder.train_scalars(self.window.read())
            self.recorder.progress(**self.window.read(), avg_loss=self.epoch_loss[0] / self.epoch_loss[1])
        if due.sample:
            self.sample_round()
        if not epoch_ends:  # the end-of-epoch report covers the last step of an epoch
            if stop or due.evaluate or due.checkpoint:
                self.report(evaluate=due.evaluate or stop, checkpoint=due.checkpoint or stop)
            self.recorder.flush_pending()
        return not stop

    def sample_round(self) -> None:
        if self.cfg.num_samples and self.ctx.is_main:
            self.recorder.samples(self.stepper.sample(self.cfg.num_samples))
            self.health.after_inference("sampling", self.pos)

    def report(self, evaluate: bool, checkpoint: bool) -> None:
        eval_metrics = {f"val_{k}": float(v) for k, v in self.stepper.evaluate().items()} if evaluate else {}
        if evaluate:
            self.health.after_inference("evaluation", self.pos)
        if evaluate and not self.cfg.sample_every_steps:
            self.sample_round()  # sample_every_steps 0: a round with every evaluation
        row = self.recorder.row(self.stepper.learning_rate(), self.window.read(), eval_metrics)
        self.window.reset()
        # The row is stored before the checkpoint that holds its step: a run killed in between
        # resumes from an earlier checkpoint, which drops the row; never the other way round
        # (a checkpoint whose row metrics.parquet lacks).
        self.recorder.store(row)
        name = self.checkpointer.report(self.pos, row, checkpoint)
        if name:
            self.recorder.last_checkpoint = name
        self.recorder.announce(row)
        self.last_row = row


def run_loop(stepper: Stepper, cfg: TrainConfig, session: Session, task_name: str,
             headline: tuple[str, ...] = ("loss", "accuracy"), metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `stepper` with `cfg`, reporting to `session`; returns the last report's row."""
    return TrainingRun(stepper, cfg, session, task_name, headline, metadata or {}).run()
