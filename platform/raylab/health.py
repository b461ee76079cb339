"""Training health: the checks that catch a run going silently wrong, and the one object the loop calls.

The loop already stops on a non-finite loss and on workers whose weights
disagree. These checks catch the rest of the seeds' failures (a batch with NaN
keypoints, labels past num_classes, eval mode left on, a frozen or detached
block, an optimizer built for another model, accuracy pinned at chance, a loss
that is flat, diverging or oscillating, a learning rate decayed to its floor
while the loss still falls). Each is a small named check, listed with its
advice in `raylab.health_config.CHECKS`, with a policy in the config's `health`
section (warn | stop | off).

`HealthMonitor` is what the framework-neutral core (`raylab.loop_core`) calls,
at a few named points: `start`, `before_micro_batch`, `after_micro_batch`,
`after_optimizer_step`, `after_inference`. Checks that need framework tensors
(gradients, parameters, modes, the model's output) live in a probe the stepper
supplies (`raylab.torch_health.TorchProbe`; `raylab.tf_health.KerasProbe` for the
gradient checks of TensorFlow tasks); the neutral `ArrayProbe` checks batches and
labels through numpy, and the metric-trend checks (`raylab.health_trends`) need
only the loss, accuracy and lr.

A finding is shown once as a notice, goes into the next metrics.parquet row's
`health` column and into `<run>/health.json` (rank 0 writes). `stop` raises
`HealthCheckFailed`. Every worker stops together: checks whose inputs differ
per worker (batch values, labels) agree on a verdict through a collective
before the forward pass; the trend checks run on statistics gathered from all
workers at each window's end; the rest see inputs identical on every worker.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pyarrow.fs as pafs

from raylab.health_config import CHECKS, Check, HealthConfig
from raylab.health_trends import WindowStats, trend_findings
from raylab.loop_reporting import TrainingHealthError
from raylab.run_storage import write_file

if TYPE_CHECKING:
    from raylab.loop_core import Position, Stepper
    from raylab.loop_reporting import RunRecorder
    from raylab.task import TaskContext

HEALTH_FILE = "health.json"
IGNORE_LABEL = -100  # PyTorch's cross-entropy ignore_index: padding, not a class


@dataclass
class Finding:
    check: str
    step: int
    epoch: int
    message: str
    advice: str
    policy: str

    def line(self) -> str:
        return f"{self.check}: {self.message}"


class HealthCheckFailed(TrainingHealthError):
    """A health check with policy `stop` found a problem; `.finding` holds it."""

    def __init__(self, finding: Finding):
        super().__init__(f"health check {finding.check} at step {finding.step}: {finding.message}; {finding.advice} "
                         f"(or --set health.{finding.check}=warn).")
        self.finding = finding

    def __reduce__(self):  # Ray pickles a worker's exception: rebuild it from the finding, not the message
        return (type(self), (self.finding,))


@dataclass
class TaskFacts:
    """What a task may declare for the checks (all optional; see `raylab.task`). Nothing declared: the
    checks that need it do not apply."""

    num_classes: int | None = None
    class_labels: Callable[[Any], Any] | None = None
    describe_sample: Callable[[int], str] | None = None
    accuracy_metric: str = "accuracy"

    @classmethod
    def of(cls, task: Any) -> "TaskFacts":
        num_classes = getattr(task, "num_classes", None)
        return cls(
            num_classes=int(num_classes) if isinstance(num_classes, (int, np.integer)) and num_classes > 1 else None,
            class_labels=getattr(task, "class_labels", None), describe_sample=getattr(task, "describe_sample", None),
            accuracy_metric=str(getattr(task, "accuracy_metric", "accuracy")),
        )

    def name(self, index: int) -> str:
        if self.describe_sample is not None:
            try:
                return str(self.describe_sample(index))
            except Exception:  # naming must never be what breaks a run
                pass
        return f"#{index}"


def name_list(names: list[str], limit: int = 4) -> str:
    """'a, b, c, d and 3 more': parameter or variable names in a finding."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def leaves(batch: Any, path: str = "batch") -> Iterator[tuple[str, Any]]:
    """Every leaf of a nested batch (dicts, lists, tuples) with its path, e.g. batch['parts']['body']."""
    if isinstance(batch, dict):
        for key, value in batch.items():
            yield from leaves(value, f"{path}[{key!r}]")
    elif isinstance(batch, (list, tuple)) and batch and not isinstance(batch[0], (int, float, str, bytes)):
        for i, value in enumerate(batch):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, batch


def output_spread(output: np.ndarray) -> float | None:
    """How much a model's output depends on its input: the mean spread (sample std) of each
    output element across the batch, over the output's mean magnitude (None: can't tell)."""
    if output.ndim == 0 or output.shape[0] < 2 or output.dtype.kind != "f":
        return None
    flat = output.astype(np.float64).reshape(output.shape[0], -1)
    scale = float(np.abs(flat).mean())
    if not np.isfinite(scale) or scale < 1e-12:  # all zeros (e.g. DiT's zero-initialised final layer): nothing to compare
        return None
    return float(flat.std(axis=0, ddof=1).mean()) / scale


class ArrayProbe:
    """The framework-neutral probe: batch values through numpy, no model access. Framework probes
    (`raylab.torch_health.TorchProbe`) add the checks that need the model's tensors."""

    on_output: Callable[[int | None, float | None], None] | None = None  # set by the monitor

    def to_numpy(self, value: Any) -> np.ndarray | None:
        if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
            value = value.numpy()
        return value if isinstance(value, np.ndarray) else None

    def nonfinite_rows(self, batch: Any) -> list[tuple[str, list[int]]]:
        out = []
        for path, value in leaves(batch):
            array = self.to_numpy(value)
            if array is not None and array.dtype.kind in "fc" and array.ndim and not np.isfinite(array).all():
                out.append((path, np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1)).tolist()))
        return out

    def not_checked(self, check: str) -> str:
        """Why this probe does not run a check that needs the model ('' when it does)."""
        return "no model probe for this framework"

    def start(self, cfg: HealthConfig) -> list[tuple[str, str]]:
        return []

    def watch(self, training: bool, measure_output: bool, batch: Any = None) -> None:
        pass

    def after_micro_batch(self, cfg: HealthConfig, step_ends: bool, step: int) -> list[tuple[str, str]]:
        return []

    def after_inference(self, cfg: HealthConfig, what: str) -> list[tuple[str, str]]:
        return []

    def window_end(self, cfg: HealthConfig) -> list[tuple[str, str]]:
        return []

    def close(self) -> None:
        pass


class HealthLog:
    """Where findings go on rank 0: a notice on the display, the next metrics row, health.json."""

    def __init__(self, recorder: "RunRecorder | None"):
        self.recorder = recorder
        self.main = recorder is not None and recorder.main
        self.findings: list[Finding] = []
        self.unrecorded: list[Finding] = []
        if self.main:
            saved = _read_json(recorder.session.run_fs, self.path)
            # A resumed run keeps the findings of the steps it does not retrain.
            self.findings = [Finding(**f) for f in saved.get("findings", []) if f.get("step", 0) <= recorder.pos.global_step]

    @property
    def path(self) -> str:
        return f"{self.recorder.session.run_path}/{HEALTH_FILE}"

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)
        self.unrecorded.append(finding)
        if self.main:
            payload = {"findings": [asdict(f) for f in self.findings]}
            write_file(self.recorder.session.run_fs, self.path, json.dumps(payload, indent=2).encode())
            self.recorder.progress(health_notice=f"{finding.line()} -> {finding.advice}", health_findings=len(self.findings))

    def row_text(self) -> str:
        """The findings since the last row, for metrics.parquet's `health` column ('' when none)."""
        text = "; ".join(f.line() for f in self.unrecorded)
        self.unrecorded = []
        return text


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    with fs.open_input_stream(path) as fh:
        try:
            return json.loads(fh.read().decode())
        except ValueError:  # a damaged file from a killed attempt: start a fresh one
            return {}


@dataclass
class _StepTally:
    """This worker's metrics of the current window, gathered at its end."""

    losses: list[float] = field(default_factory=list)  # one per optimizer step
    lrs: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)  # the current step's micro-batch losses
    correct: float = 0.0  # accuracy x batch size, summed
    scored: float = 0.0  # samples of micro-batches that reported accuracy
    samples: float = 0.0
    batch_size: int = 0  # of the current micro-batch
    dependence: float | None = None


class HealthMonitor:
    """The health checks of one run attempt; the loop core calls it at its named points."""

    def __init__(self, cfg: HealthConfig, ctx: "TaskContext", probe: ArrayProbe, facts: TaskFacts, log: HealthLog):
        self.cfg, self.ctx, self.probe, self.facts, self.log = cfg, ctx, probe, facts, log
        self.seen = {f.check for f in log.findings}
        self.pending_stop: Finding | None = None  # a rank-local stop awaiting the collective verdict
        self.relay: list[Finding] = []  # what this worker (not rank 0) found in its own batches, for rank 0 to record
        self.tally = _StepTally()
        self.windows: list[WindowStats] = []
        self.peak_lr = 0.0
        self.pos: Position | None = None
        # A verdict per micro-batch costs a collective: only when a check that applies here may stop.
        labels_apply = bool(facts.num_classes and facts.class_labels is not None)
        self.vote_each_batch = ctx.world_size > 1 and (
            cfg.policy("nonfinite_batch") == "stop" or (labels_apply and cfg.policy("labels") == "stop"))
        probe.on_output = self._on_output

    @classmethod
    def for_run(cls, stepper: "Stepper", cfg: Any, recorder: "RunRecorder | None") -> "HealthMonitor":
        make_probe = getattr(stepper, "health_probe", None)
        probe = make_probe() if make_probe is not None else ArrayProbe()
        return cls(cfg.health, stepper.ctx, probe, TaskFacts.of(getattr(stepper, "task", None)), HealthLog(recorder))

    @property
    def findings(self) -> list[Finding]:
        return self.log.findings

    # -- the policy ------------------------------------------------------------------
    def emit(self, check: str, message: str, this_rank_only: bool = False) -> None:
        policy = self.cfg.policy(check)
        if policy == "off":
            return
        pos = self.pos
        finding = Finding(check, pos.global_step if pos else 0, pos.epoch if pos else 0, message, CHECKS[check].advice, policy)
        if check not in self.seen:  # once per check: a notice per step would drown the display
            self.seen.add(check)
            self.log.add(finding)
            if CHECKS[check].rank_local and not self.ctx.is_main:
                self.relay.append(finding)
        if policy == "stop":
            if (CHECKS[check].rank_local or this_rank_only) and self.ctx.world_size > 1:
                self.pending_stop = self.pending_stop or finding
            else:
                raise HealthCheckFailed(finding)

    def _emit_all(self, found: list[tuple[str, str]], this_rank_only: bool = False) -> None:
        for check, message in found:
            self.emit(check, message, this_rank_only)

    def _collective_stop(self) -> None:
        """Every worker raises together when any worker found a rank-local problem set to stop."""
        if not self.vote_each_batch:
            return
        flagged = self.ctx.all_reduce_sum({"health_stop": 1.0 if self.pending_stop else 0.0})["health_stop"]
        if flagged:
            found = [f for f in self.ctx.all_gather_object(self.pending_stop) if f is not None]
            raise HealthCheckFailed(found[0])

    # -- the hook points ----------------------------------------------------------------
    def start(self, pos: "Position") -> None:
        """Before the first step of this attempt: the optimizer and the parameters as built."""
        self.pos = pos
        self._emit_all(self.probe.start(self.cfg))

    def before_micro_batch(self, batch: Any, indices: list[int], pos: "Position") -> None:
        """The batch the model is about to see: values, labels; arms the probe's forward checks."""
        self.pos = pos
        if self.cfg.active("nonfinite_batch"):
            for path, rows in self.probe.nonfinite_rows(batch):
                self.emit("nonfinite_batch", f"NaN or inf in {path} of training sample(s) {self._names(rows, indices)} "
                                             f"(epoch {pos.epoch}, step {pos.global_step})")
        if self.cfg.active("labels") and self.facts.num_classes and self.facts.class_labels is not None:
            self._check_labels(batch, indices)
        step = pos.global_step + 1  # the step this micro-batch belongs to
        measure = (pos.global_step == 0 or (step % self.cfg.window_steps == 0 and step > self.cfg.warmup_steps)) and (
            self.cfg.active("input_dependence") or self.cfg.active("num_classes"))  # what the output measurement feeds
        self.probe.watch(training=True, measure_output=measure, batch=batch)
        self.tally.samples += len(indices)
        self.tally.batch_size = len(indices)
        self._collective_stop()

    def after_micro_batch(self, metrics: dict[str, float], step_ends: bool, pos: "Position") -> None:
        """After forward + backward (at a step's end the gradients are complete and, under DDP, synchronised)."""
        self.tally.step_loss.append(float(metrics["loss"]))
        accuracy = metrics.get(self.facts.accuracy_metric)
        if accuracy is not None:
            self.tally.correct += float(accuracy) * self.tally.batch_size
            self.tally.scored += self.tally.batch_size
        self._emit_all(self.probe.after_micro_batch(self.cfg, step_ends, pos.global_step + 1))

    def after_optimizer_step(self, pos: "Position", lr: float) -> None:
        self.pos = pos
        tally = self.tally
        tally.losses.append(sum(tally.step_loss) / max(1, len(tally.step_loss)))
        tally.step_loss = []
        tally.lrs.append(lr)
        self.peak_lr = max(self.peak_lr, lr)
        if pos.global_step % self.cfg.window_steps == 0:
            self._end_window(pos)

    def after_inference(self, what: str, pos: "Position") -> None:
        """After evaluation or sampling: it ran in eval mode and left the model in training mode."""
        self.pos = pos
        # Sampling runs on rank 0 alone: its stop waits for the next window's collective verdict.
        self._emit_all(self.probe.after_inference(self.cfg, what), this_rank_only=what == "sampling")

    def take_row_text(self) -> str:
        return self.log.row_text()

    # -- the pieces ---------------------------------------------------------------------
    def _names(self, rows: list[int], indices: list[int]) -> str:
        named = [self.facts.name(indices[r]) if r < len(indices) else f"row {r}" for r in rows[:5]]
        return ", ".join(named) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")

    def _check_labels(self, batch: Any, indices: list[int]) -> None:
        labels = self.probe.to_numpy(self.facts.class_labels(batch))
        if labels is None or labels.size == 0:
            return
        labels = labels.reshape(len(labels), -1)
        c = self.facts.num_classes
        bad = ((labels < 0) | (labels >= c)) & (labels != IGNORE_LABEL)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1)).tolist()
            values = sorted({int(v) for v in labels[bad]})[:5]
            self.emit("labels", f"label value(s) {', '.join(map(str, values))} outside [0, {c}) (num_classes {c}) in "
                                f"training sample(s) {self._names(rows, indices)}")

    def _on_output(self, width: int | None, dependence: float | None) -> None:
        """Called by the probe from inside the model's forward, before the loss can crash on a wrong width."""
        c = self.facts.num_classes
        if width is not None and c and width != c and self.cfg.active("num_classes"):
            self.emit("num_classes", f"the model outputs {width} scores per sample but the task's data has num_classes {c}")
        if dependence is not None:
            self.tally.dependence = dependence

    def _end_window(self, pos: "Position") -> None:
        tally, self.tally = self.tally, _StepTally()
        mine = (tally.losses, tally.correct, tally.scored, tally.samples, tally.dependence, self.pending_stop, self.relay)
        everyone = self.ctx.all_gather_object(mine) if self.ctx.world_size > 1 else [mine]
        self.relay = []
        for rank, (*_, relayed) in enumerate(everyone):
            for finding in relayed if self.ctx.is_main else []:
                if finding.check not in self.seen:
                    self.seen.add(finding.check)
                    self.log.add(replace(finding, message=f"{finding.message} (worker {rank})"))
        stops = [w[5] for w in everyone if w[5] is not None]
        if stops:
            raise HealthCheckFailed(stops[0])
        losses = np.mean([np.asarray(w[0], dtype=float) for w in everyone], axis=0)
        scored = sum(w[2] for w in everyone)
        measured = [w[4] for w in everyone if w[4] is not None]
        self.windows.append(WindowStats(
            end_step=pos.global_step, losses=losses, lrs=np.asarray(tally.lrs, dtype=float), samples=sum(w[3] for w in everyone),
            accuracy=sum(w[1] for w in everyone) / scored if scored else None,
            dependence=float(np.mean(measured)) if measured else None,
        ))
        self._emit_all(self.probe.window_end(self.cfg))
        self._emit_all(trend_findings(self.windows, self.cfg, self.facts.num_classes, self.peak_lr))
