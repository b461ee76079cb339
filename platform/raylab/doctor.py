"""`raylab doctor`: a short pre-flight of a model's real pipeline, before hours depend on it.

    raylab doctor tinyimagenet --stage quick --steps 300
    from raylab.doctor import run_doctor
    report = run_doctor("translator", "quick", {"freeze_encoder": True}, steps=200)
    report.findings, report.exit_code

Seed 003's "5-epoch quick test" made general, in this process (no Ray):

1. one batch: every tensor's shape and dtype, NaN/inf, the label range (tasks
   that declare `num_classes` and `class_labels`);
2. one forward and backward pass: the loss, gradients, parameters without a
   gradient, the optimizer's tensors, the model's mode;
3. the sampling path with 1 and with 3 samples (seed 000 crashed when the
   sample count differed from the training batch);
4. `steps` optimizer steps of the real loop with every in-run health check
   (`raylab.health`), then: did the loss fall, did accuracy leave chance.

The result is a verdict per check (ok / finding / n/a / off) with the evidence
and what to do; `exit_code` is 0 when healthy and 1 on any finding (the CLI
adds 2 for a configuration error). Checks keep the config's policies, except
that `stop` only ends the training phase; a check set to `off` stays off.
The training phase compresses the stage's schedule into `steps`.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raylab.config import TrainConfig
from raylab.health import CHECKS, Finding, HealthCheckFailed, HealthMonitor, TaskFacts, leaves
from raylab.health_trends import WindowStats, at_chance, can_tell_chance
from raylab.loop_core import Position, RunPlan, TrainingRun, epoch_batches
from raylab.loop_reporting import TrainingHealthError
from raylab.session import LocalSession

DOCTOR_ONLY = {
    "batch": "the data pipeline yields batches the model can take",
    "forward_backward": "call the model the way loss() does, then loss.backward(): the message names what broke",
    "sampling": "make sample() build its inputs for any n (seed 000: the layout of n samples differed from training)",
    "training": "read the error's location; rerun with --steps 20 to iterate quickly",
    "loss_falls": "raise lr, check that the loss sees the model's output, or shrink the model (seed 001's flat curve)",
    "accuracy_leaves_chance": "see chance_accuracy; seed 003 called 'learning normally' > 3x chance after a quick test",
}


@dataclass
class Verdict:
    check: str
    result: str  # ok | finding | n/a | off
    evidence: str
    advice: str = ""


@dataclass
class DoctorReport:
    model: str
    stage: str
    steps: int
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def findings(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.result == "finding"]

    @property
    def exit_code(self) -> int:
        return 1 if self.findings else 0

    def verdict(self, check: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.check == check), None)


def where(exc: BaseException) -> str:
    """The innermost frame outside torch/Python itself: usually the line of model or task code at fault."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "site-packages" not in f.filename and "/lib/python" not in f.filename]
    frame = (own or frames)[-1] if frames else None
    return f" (in {frame.name} at {frame.filename}:{frame.lineno})" if frame else ""


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}{where(exc)}"


def doctor_config(cfg: TrainConfig, steps: int) -> TrainConfig:
    """The stage's config for a `steps`-step training phase: warm-up and windows scaled to fit unless set."""
    health = cfg.health
    explicit = health.model_fields_set
    if steps < health.warmup_steps + 2 * health.window_steps:
        update = {}
        if "warmup_steps" not in explicit:
            update["warmup_steps"] = steps // 3
        if "window_steps" not in explicit:
            update["window_steps"] = max(2, steps // 6)
        health = health.model_copy(update=update)
    return cfg.model_copy(update={"max_steps": steps, "checkpoint_every_batches": 0, "keep_checkpoints": 1, "health": health})


def warn_only(cfg: TrainConfig) -> TrainConfig:
    """Pre-flight: every active check reports and none stops, so one pass shows everything."""
    policies = {name: "warn" for name in CHECKS if cfg.health.active(name)}
    return cfg.model_copy(update={"health": cfg.health.model_copy(update=policies)})


def make_stepper(task: Any, cfg: TrainConfig, session: LocalSession) -> Any:
    """The framework loop's stepper for this task."""
    from raylab.task import framework_of

    if framework_of(task) == "tensorflow":
        from raylab.tf_loop import TfStepper

        return TfStepper(task, cfg, session)
    from raylab.torch_loop import TorchStepper

    return TorchStepper(task, cfg, session)


def batch_evidence(batch: Any, facts: TaskFacts, probe: Any) -> str:
    parts = []
    for path, value in leaves(batch):
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            parts.append(f"{path} {str(value.dtype).replace('torch.', '')} {list(value.shape)}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{path} list of {len(value)}")
    if facts.class_labels is not None and facts.num_classes:
        labels = probe.to_numpy(facts.class_labels(batch))
        if labels is not None and labels.size:
            parts.append(f"labels {labels.min()}..{labels.max()} (num_classes {facts.num_classes})")
    return "; ".join(parts)


class Doctor:
    """One doctor run: pre-flight on one stepper, the training phase on a fresh one."""

    def __init__(self, task: Any, cfg: TrainConfig, report: DoctorReport, workdir: Path,
                 on_progress: Callable[[dict[str, Any]], None] | None):
        self.task, self.cfg, self.report, self.workdir, self.on_progress = task, cfg, report, workdir, on_progress
        self.found: list[Finding] = []
        self.facts = TaskFacts()
        self.probe_gaps: dict[str, str] = {}  # model check -> why the framework's probe does not run it ('' when it does)
        self.frozen = ""
        self.windows: list[WindowStats] = []

    def add(self, check: str, result: str, evidence: str, advice: str = "") -> None:
        self.report.verdicts.append(Verdict(check, result, evidence, advice or DOCTOR_ONLY.get(check.split(" ")[0], "")))

    def keep(self, findings: list[Finding]) -> None:
        self.found += [f for f in findings if all(f.check != g.check for g in self.found)]

    def preflight(self) -> bool:
        """Batch, forward/backward, sampling; False when the pipeline cannot train at all."""
        cfg = warn_only(self.cfg)
        try:
            stepper = make_stepper(self.task, cfg, LocalSession(self.workdir / "preflight", keep_checkpoints=1))
        except Exception as exc:  # bad data files end here as well as bad model code
            self.add("build", "finding", f"building the model and data failed: {describe_error(exc)}",
                     "fix the file or field the message names")
            return False
        # Enough epochs for `steps`: the schedule then spans exactly the training phase.
        per_epoch = RunPlan.of(cfg, stepper.num_samples, 0, 1).steps_per_epoch
        self.cfg = self.cfg.model_copy(update={"max_epochs": math.ceil(self.report.steps / per_epoch)})
        monitor = HealthMonitor.for_run(stepper, cfg, None)
        self.facts, probe = monitor.facts, monitor.probe
        self.probe_gaps = {name: probe.not_checked(name) for name, check in CHECKS.items() if "model" in check.needs}
        try:
            return self._first_batch(stepper, monitor, cfg)
        finally:
            self.keep(monitor.findings)
            if hasattr(probe, "frozen_summary"):
                self.frozen = probe.frozen_summary()
                trainable, total = probe.trainable_count()
                self.add("parameters", "ok", f"{trainable:,} of {total:,} train" + (f"; frozen: {self.frozen}" if self.frozen else ""))
            probe.close()

    def _first_batch(self, stepper: Any, monitor: HealthMonitor, cfg: TrainConfig) -> bool:
        pos = Position()
        plan = epoch_batches(stepper.num_samples, cfg.per_worker_batch_size, cfg.seed, 0, 0, 1)
        try:
            batch = next(iter(stepper.batches(0, plan[:1])))
            self.add("batch", "ok", f"{stepper.num_samples} training samples; " + batch_evidence(batch, monitor.facts, monitor.probe))
        except Exception as exc:
            self.add("batch", "finding", f"reading the first batch failed: {describe_error(exc)}")
            return False
        try:
            stepper.start_schedule(self.report.steps)
            stepper.start_training()
            monitor.start(pos)
            monitor.before_micro_batch(batch, plan[0], pos)
            loss = stepper.train_micro_batch(batch, True, 1)["loss"]
            monitor.after_micro_batch({"loss": loss}, True, pos)
        except Exception as exc:
            self.add("forward_backward", "finding", describe_error(exc))
            return False
        finite = math.isfinite(loss)
        self.add("forward_backward", "ok" if finite else "finding", f"loss {loss:.4g}" + ("" if finite else ": not finite"),
                 "" if finite else "see nonfinite_batch / nonfinite_grads; lower lr")
        for n in (1, 3):
            check = f"sampling n={n}"
            try:
                out = stepper.sample(n)
                monitor.after_inference("sampling", pos)
                self.add(check, "ok", f"{len(out.samples)} sample(s)")
            except Exception as exc:
                self.add(check, "finding", f"task.sample(model, {n}, ...) raised {describe_error(exc)}")
        return True

    def train(self) -> None:
        """The real loop for `steps` steps with the config's own policies."""
        session = LocalSession(self.workdir / "run", keep_checkpoints=1, on_progress=self.on_progress)
        run = None
        try:
            stepper = make_stepper(self.task, self.cfg, session)
            run = TrainingRun(stepper, self.cfg, session, type(self.task).__name__,
                              tuple(getattr(self.task, "headline_metrics", ("loss", "accuracy"))), {})
            run.run()
            self.add("training", "ok", f"{run.pos.global_step} steps over {run.pos.epoch} epoch(s)")
        except HealthCheckFailed as exc:
            self.add("training", "finding", f"stopped at step {exc.finding.step} by {exc.finding.check} (policy stop)",
                     exc.finding.advice)
        except TrainingHealthError as exc:
            self.add("training", "finding", str(exc), "lower lr or set grad_clip_norm; see nonfinite_batch")
        except Exception as exc:
            step = run.pos.global_step if run is not None else 0
            self.add("training", "finding", f"failed at step {step}: {describe_error(exc)}")
        if run is not None:
            self.keep(run.health.findings)
            self.windows = run.health.windows
            run.health.probe.close()

    def judge_training(self) -> None:
        windows = self.windows
        if len(windows) < 2:
            self.add("loss_falls", "n/a", "fewer than two windows of training; raise --steps")
        else:
            first, last = windows[0], windows[-1]
            falls = last.median < 0.95 * first.median
            evidence = f"median loss {first.median:.4g} ({first.span}) -> {last.median:.4g} ({last.span})"
            if not falls and self.frozen:
                evidence += f"; frozen: {self.frozen}"
            advice = DOCTOR_ONLY["loss_falls"] + ("; frozen blocks fed by trainable layers cannot adapt to their features "
                                                  "(seed 002: unfreeze the encoder)" if self.frozen else "")
            self.add("loss_falls", "ok" if falls else "finding", evidence, advice)
        c = self.facts.num_classes
        if not c or not windows or windows[-1].accuracy is None:
            self.add("accuracy_leaves_chance", "n/a", "the task declares no num_classes or reports no accuracy")
        elif not can_tell_chance(windows[-1], c, self.cfg.health.chance_sigmas):
            self.add("accuracy_leaves_chance", "n/a", f"{windows[-1].samples:.0f} samples over {windows[-1].span} cannot tell "
                     f"chance (1/{c}) from twice chance: raise --steps or the batch size")
        else:
            last = windows[-1]
            result = "finding" if at_chance(last, c, self.cfg.health.chance_sigmas) else "ok"
            self.add("accuracy_leaves_chance", result, f"training accuracy {last.accuracy:.2%} over {last.span} vs chance {1 / c:.2%}")

    def not_applicable(self, check: str) -> str:
        """Why a check had nothing to look at ('' when it applied)."""
        needs = CHECKS[check].needs
        if "classes" in needs and not self.facts.num_classes:
            return "n/a: the task declares no num_classes"
        if "labels" in needs and self.facts.class_labels is None:
            return "n/a: the task declares no class_labels(batch)"
        if "model" in needs and self.probe_gaps.get(check, "no model probe for this framework"):
            return f"n/a: {self.probe_gaps.get(check, 'no model probe for this framework')}"
        if "trend" in needs and not any(w.start_step > self.cfg.health.warmup_steps for w in self.windows):
            return f"n/a: no window past the {self.cfg.health.warmup_steps}-step warm-up; raise --steps"
        return ""

    def checks_table(self) -> None:
        """One row per in-run check: its finding, or ok / off / n/a."""
        for name, check in CHECKS.items():
            hit = next((f for f in self.found if f.check == name), None)
            if hit is not None:
                self.add(name, "finding", f"step {hit.step}: {hit.message}", check.advice)
            elif not self.cfg.health.active(name):
                self.add(name, "off", f"health.{name} is off")
            else:
                why = self.not_applicable(name)
                self.add(name, "n/a" if why else "ok", why[len("n/a: "):] if why else check.what)


def run_doctor(model: Any, stage: str = "quick", overrides: dict[str, Any] | None = None, steps: int = 300,
               experiment: str | Path | None = None, cfg: TrainConfig | None = None,
               on_progress: Callable[[dict[str, Any]], None] | None = None, workdir: str | Path | None = None) -> DoctorReport:
    """Pre-flight a model: a registered name (its experiment's `stage` + `overrides`), or a task object with `cfg`.

    Raises `ConfigError` for a bad config; everything the pipeline gets wrong is a finding in the report.
    """
    if isinstance(model, str):
        from raylab.launch import prepare

        task, base = prepare(model, stage, overrides, experiment)
        name = model
    else:
        task, base, name = model, cfg or model.config_cls.model_validate(overrides or {}), type(model).__name__
    if steps < 1:
        from raylab.config import ConfigError

        raise ConfigError(f"--steps must be at least 1 (got {steps}).")
    report = DoctorReport(name, stage, steps)
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="raylab-doctor-"))
    doctor = Doctor(task, doctor_config(base, steps), report, folder, on_progress)
    try:
        if doctor.preflight():
            doctor.train()
            doctor.judge_training()
        doctor.checks_table()
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return report


def verdict_table(report: DoctorReport):
    """The report as a rich table: check, result, evidence, what to do."""
    from rich.table import Table

    colour = {"ok": "green", "finding": "bold red", "n/a": "dim", "off": "dim"}
    title = f"raylab doctor {report.model} {report.stage} ({report.steps} steps): " + (
        f"{len(report.findings)} finding(s)" if report.findings else "healthy")
    table = Table(title=title, title_justify="left")
    for col in ("check", "result", "evidence", "what to do"):
        table.add_column(col, overflow="fold")
    for v in report.verdicts:
        table.add_row(v.check, f"[{colour.get(v.result, '')}]{v.result}[/]", v.evidence, v.advice if v.result == "finding" else "")
    return table
