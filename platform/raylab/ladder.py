"""The quick -> medium -> full ladder (`raylab ladder`), each stage a Tune experiment.

    raylab ladder tinyimagenet
    raylab ladder gman --stages quick,medium --storage s3://bucket/runs --name gman-ladder

Each stage runs as a sweep (`raylab.sweep`): one trial, or the search the
experiment file's `search:` section declares for that stage. Its best trial by
the stage's metric is chosen; the next stage warm-starts from that trial's best
checkpoint (`init_from`: tensors whose names and shapes match are loaded, and
each new run folder gets `warm_start.json`, summarised on screen). A gate may
stop the ladder between stages, with the seed's advice and exit code 1.

The experiment file's `ladder:` section (validated before Ray starts):

    ladder:
      metric: val_accuracy            # ranks each stage's trials (mode from the name, or `mode:`)
      quick:
        gate: {above: 0.3, advice: "quick does not converge: fix lr first"}
      medium:
        gate: {above: 0.5, within_steps: 2000}
        carry: [lr]                   # take lr from quick's best trial

The ladder's folder, `<storage>/<name>/` (name default `<model>-ladder`):

    ladder.json        each stage's status, attempt, best trial, best checkpoint, gate result
    quick/ medium/ full/   one sweep folder per stage (Tune state + a run folder per trial)

Running the same command again continues where it stopped: a finished stage is
never repeated, an interrupted one is restored (`Tuner.restore`) and its trials
resume from their own checkpoints. A stage whose config changed since it
stopped (say, lr fixed after a failed gate) starts a new attempt in
`<stage>-<n>/`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylab.config import STAGES, ConfigError, LaunchConfig, metric_mode, read_experiment, validate_config
from raylab.sweep import SweepPlan, SweepResult, fingerprint_digest, join_uri, plan_sweep, resolve_storage, run_sweep

LADDER_FILE = "ladder.json"


class Gate(BaseModel):
    """A target a stage must reach within its budget before the ladder moves up."""

    model_config = ConfigDict(extra="forbid")

    metric: str | None = Field(None, description="Metric the gate checks (None: the ladder's metric).")
    above: float | None = Field(None, description="Pass when the stage's best value is above this (for accuracies, scores).")
    below: float | None = Field(None, description="Pass when the stage's best value is below this (for losses, errors).")
    within_steps: int | None = Field(None, gt=0, description="The value must be reached by this optimizer step (None: anywhere in the stage's budget).")
    advice: str | None = Field(None, description="What to tell the user when the gate fails (None: advice read off the loss curve).")

    @model_validator(mode="after")
    def _one_target(self) -> "Gate":
        if (self.above is None) == (self.below is None):
            raise ValueError("a gate needs exactly one of above or below")
        return self


class LadderStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate: Gate | None = Field(None, description="Target the stage must reach before the next stage starts (None: always move up).")
    carry: list[str] = Field(default_factory=list, description="Config fields taken from the previous stage's best trial (e.g. [lr] after a search).")


class LadderSpec(BaseModel):
    """The experiment file's `ladder:` section."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("val_loss", description="Metric that ranks each stage's trials and that gates check, as named in metrics.parquet.")
    mode: Literal["min", "max"] | None = Field(None, description="Whether lower (min) or higher (max) is better (None: from the metric's name).")
    quick: LadderStage = Field(default_factory=LadderStage, description="The quick stage's gate and carried fields.")
    medium: LadderStage = Field(default_factory=LadderStage, description="The medium stage's gate and carried fields.")
    full: LadderStage = Field(default_factory=LadderStage, description="The full stage's gate and carried fields.")

    def stage(self, name: str) -> LadderStage:
        return getattr(self, name)


class GateFailed(RuntimeError):
    """A stage missed its target; the message carries the advice."""


class LadderError(RuntimeError):
    """A stage could not produce a result (every trial failed)."""


@dataclass
class LadderPlan:
    task_name: str
    stages: list[str]
    name: str
    storage: str
    spec: LadderSpec
    launch: LaunchConfig
    overrides: dict[str, Any]
    experiment: str | None
    init_from: str | None = None  # warm start of the first stage run

    @property
    def uri(self) -> str:
        return join_uri(self.storage, self.name)


@dataclass
class StageOutcome:
    stage: str
    status: str  # done, gate_failed, failed, done earlier
    best_trial: str | None = None
    best: float | None = None
    best_checkpoint: str | None = None
    warm_start: str | None = None
    wall_s: float = 0.0
    message: str = ""
    gate: str = "-"


def read_ladder_spec(experiment: dict[str, Any], path: Path) -> LadderSpec:
    section = experiment.get("ladder") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"experiment file {path}: 'ladder' must be a mapping (metric, mode, and quick/medium/full gates).")
    return validate_config(LadderSpec, section, f"experiment file {path} ladder")  # type: ignore[arg-type,return-value]


def parse_stages(text: str | None, available: list[str]) -> list[str]:
    names = [s.strip() for s in (text or ",".join(s for s in STAGES if s in available)).split(",") if s.strip()]
    for name in names:
        if name not in STAGES:
            raise ConfigError(f"--stages: '{name}' is not one of {', '.join(STAGES)}.")
        if name not in available:
            raise ConfigError(f"--stages: the experiment file has no stage '{name}' (it has: {', '.join(available)}).")
    if len(set(names)) != len(names) or names != sorted(names, key=STAGES.index):
        raise ConfigError(f"--stages '{text}' must list stages once each, in ladder order ({', '.join(STAGES)}).")
    return names


def plan_ladder(task_name: str, stages: str | None = None, launch: LaunchConfig | None = None, overrides: dict[str, Any] | None = None,
                experiment: str | Path | None = None, init_from: str | None = None) -> LadderPlan:
    """Validate a whole ladder -- every stage's config and search, the gates -- without starting Ray."""
    from raylab.launch import check_run_name, find_experiment

    launch = launch or LaunchConfig()
    path = find_experiment(task_name, experiment)
    data = read_experiment(path)
    spec = read_ladder_spec(data, path)
    names = parse_stages(stages, list(data["stages"]))
    plan = LadderPlan(task_name, names, check_run_name(launch.name or f"{task_name}-ladder"), resolve_storage(launch.storage_path),
                      spec, launch, dict(overrides or {}), str(experiment) if experiment else None, init_from)
    for stage in names:
        sweep = stage_plan(plan, stage, "check", None, {})  # validates config, search space and settings
        for name in spec.stage(stage).carry:
            if name not in type(sweep.base).model_fields:
                raise ConfigError(f"experiment file {path} ladder.{stage}.carry: '{name}' is not a field of {type(sweep.base).__name__}.")
    return plan


def stage_metric(spec: LadderSpec, stage: str) -> str:
    gate = spec.stage(stage).gate
    return (gate.metric if gate and gate.metric else None) or spec.metric


def stage_plan(plan: LadderPlan, stage: str, folder: str, init_from: str | None, carried: dict[str, Any]) -> SweepPlan:
    overrides = {**plan.overrides, **carried}
    if init_from:
        overrides["init_from"] = init_from
    launch = plan.launch.model_copy(update={"storage_path": plan.uri, "name": folder})
    metric = stage_metric(plan.spec, stage)
    sweep = plan_sweep(plan.task_name, stage, None, launch, overrides, plan.experiment, default_metric=metric, name=folder)
    if plan.spec.mode and sweep.metric == plan.spec.metric:
        sweep.spec = sweep.spec.model_copy(update={"mode": plan.spec.mode})
    sweep.kind = "ladder stage"
    return sweep


class LadderRecord:
    """ladder.json: where the ladder stands, rewritten after every change."""

    def __init__(self, fs: Any, path: str, plan: LadderPlan):
        from raylab.report import read_json

        self.fs, self.path = fs, path
        self.data = read_json(fs, f"{path}/{LADDER_FILE}") or {
            "kind": "ladder", "model": plan.task_name, "name": plan.name, "metric": plan.spec.metric,
            "mode": plan.spec.mode or metric_mode(plan.spec.metric), "stages": {},
            "started": datetime.now().isoformat(timespec="seconds"),
        }
        if self.data.get("model") != plan.task_name:
            raise ConfigError(f"ladder '{plan.name}' in {plan.uri} is a ladder of '{self.data.get('model')}', not '{plan.task_name}'; choose a new --name.")

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"status": "pending", "attempt": 0})

    def write(self, **update: Any) -> None:
        from raylab.run_storage import write_file

        self.data.update(update)
        write_file(self.fs, f"{self.path}/{LADDER_FILE}", json.dumps(self.data, indent=2, default=str).encode())


def diagnose(metrics: Any) -> str:
    """The seed's way of reading a loss curve, as one clause of advice."""
    if metrics is None or "train_loss" not in metrics or metrics["train_loss"].dropna().shape[0] < 2:
        return "check the learning rate first"
    loss = metrics["train_loss"].dropna().to_numpy()
    first, last, low = float(loss[0]), float(loss[-1]), float(loss.min())
    if not math.isfinite(last) or last > 1.5 * low:
        return "the loss rises or oscillates: lower lr or raise the batch size"
    if abs(first - last) <= 0.05 * abs(first):
        return "the loss is flat: raise lr or shrink the model"
    return "the loss is still falling: train longer (raise max_epochs) or raise lr"


def check_gate(stage: str, gate: Gate | None, metric: str, result: SweepResult, fs: Any, base_path: str) -> str | None:
    """None when the stage passes; else the sentence the ladder stops with."""
    from raylab.run_storage import read_metrics

    if gate is None:
        return None
    best = result.best
    metrics = read_metrics(fs, f"{base_path}/{best.name}") if best else None
    column = gate.metric or metric
    values = metrics[[c for c in ("step", column) if c in metrics]].dropna() if metrics is not None and column in metrics else None
    if values is not None and gate.within_steps is not None:
        values = values[values["step"] <= gate.within_steps]
    reached = None
    if values is not None and not values.empty:
        reached = float(values[column].max() if gate.above is not None else values[column].min())
    ok = reached is not None and (reached > gate.above if gate.above is not None else reached < gate.below)
    if ok:
        return None
    target = f"above {gate.above:g}" if gate.above is not None else f"below {gate.below:g}"
    within = f" by step {gate.within_steps}" if gate.within_steps else ""
    got = f"best {reached:.4g}" if reached is not None else "never reported"
    advice = gate.advice or f"{stage} does not converge: {diagnose(metrics)}"
    return f"{stage} did not reach {column} {target}{within} ({got}, trial {best.name if best else '-'}): {advice}."


def run_ladder(plan: LadderPlan, say: Callable[[str], None] = print) -> list[StageOutcome]:
    """Run the plan's stages in order; raises GateFailed or LadderError to stop the ladder."""
    from raylab.launch import check_storage
    from raylab.run_storage import run_filesystem

    fs, path = run_filesystem(plan.storage, plan.name)
    check_storage(fs, path, plan.storage)
    record = LadderRecord(fs, path, plan)
    record.write(status="running", stages_requested=plan.stages)
    outcomes: list[StageOutcome] = []
    previous = _previous_done(record, plan.stages[0])
    init_from = plan.init_from or (previous or {}).get("checkpoint_location")
    for stage in plan.stages:
        state = record.stage(stage)
        carried = _carried(plan, stage, previous, fs, path)
        check = stage_plan(plan, stage, state.get("folder") or stage, init_from, carried)
        digest = fingerprint_digest(check.fingerprint())
        if state["status"] == "done":
            note = "" if state.get("fingerprint") == digest else " (its settings have changed since; it is not rerun -- use a new --name to start over)"
            say(f"{stage}: done earlier -- best {state['best_trial']} {state['metric']} {state['best']:.4g}, checkpoint {state['best_checkpoint']}{note}")
            outcomes.append(StageOutcome(stage, "done earlier", state["best_trial"], state["best"], state["best_checkpoint"],
                                         warm_counts({"counts": state["warm_start"]} if state.get("warm_start") else None),
                                         gate=state.get("gate") or "-"))
            previous, init_from = state, state["checkpoint_location"]
            continue
        if state["attempt"] and state.get("fingerprint") != digest:
            state["attempt"] += 1
            say(f"{stage}: settings changed since attempt {state['attempt'] - 1} stopped; starting attempt {state['attempt']}")
        state["attempt"] = max(1, state["attempt"])
        folder = stage if state["attempt"] == 1 else f"{stage}-{state['attempt']}"
        sweep = stage_plan(plan, stage, folder, init_from, carried)
        state.update(status="running", folder=folder, fingerprint=digest, init_from=init_from, metric=sweep.metric, carried=carried)
        record.write()
        say(f"{stage}: " + (f"warm start from {init_from}" if init_from else "from scratch"))
        outcome = _run_stage(stage, sweep, plan, fs, f"{path}/{folder}", state, say)
        record.write()
        outcomes.append(outcome)
        if outcome.status != "done":
            record.write(status="stopped", stopped_at=stage)
            raise (GateFailed if outcome.status == "gate_failed" else LadderError)(outcome.message)
        previous, init_from = state, state["checkpoint_location"]
    record.write(status="finished")
    return outcomes


def _previous_done(record: LadderRecord, first: str) -> dict[str, Any] | None:
    """The stage before `first`, if an earlier run of this ladder finished it (e.g. --stages medium,full later)."""
    before = STAGES[: STAGES.index(first)]
    for stage in reversed(before):
        state = record.data["stages"].get(stage)
        if state and state.get("status") == "done":
            return state
    return None


def _carried(plan: LadderPlan, stage: str, previous: dict[str, Any] | None, fs: Any, path: str) -> dict[str, Any]:
    from raylab.report import read_json

    fields = plan.spec.stage(stage).carry
    if not fields or not previous or not previous.get("best_trial"):
        return {}
    trial = read_json(fs, f"{path}/{previous['folder']}/{previous['best_trial']}/trial.json") or {}
    config = trial.get("config", {})
    return {f: config[f] for f in fields if f in config}


def _run_stage(stage: str, sweep: SweepPlan, plan: LadderPlan, fs: Any, folder: str, state: dict[str, Any], say: Callable[[str], None]) -> StageOutcome:
    from raylab.report import read_json

    result = run_sweep(sweep)
    best = result.best
    state.update(wall_s=state.get("wall_s", 0.0) + result.wall_s)
    if best is None or best.checkpoint_location is None:
        errors = "; ".join(f"{t.name}: {t.error}" for t in result.trials if t.error) or f"no trial reported {sweep.metric} with a checkpoint"
        state.update(status="failed", error=errors)
        return StageOutcome(stage, "failed", message=f"{stage} produced no result: {errors}.", wall_s=result.wall_s)
    warm = read_json(fs, f"{folder}/{best.name}/warm_start.json")
    if warm:
        say(f"{stage}: {warm['summary']}")
    state.update(best_trial=best.name, best=best.best, best_checkpoint=best.best_checkpoint, params=best.params,
                 checkpoint_location=best.checkpoint_location,
                 warm_start=(warm or {}).get("counts"))
    failed = check_gate(stage, plan.spec.stage(stage).gate, sweep.metric, result, fs, folder)
    if failed:
        state.update(status="gate_failed", gate=failed)
        return StageOutcome(stage, "gate_failed", best.name, best.best, best.best_checkpoint, message=failed, wall_s=result.wall_s)
    gate = plan.spec.stage(stage).gate
    state.update(status="done", gate="passed" if gate else None)
    say(f"{stage}: best {best.name} {sweep.metric} {best.best:.4g}{' (gate passed)' if gate else ''} -> {best.best_checkpoint}")
    return StageOutcome(stage, "done", best.name, best.best, best.best_checkpoint, warm_counts(warm), result.wall_s,
                        gate="passed" if gate else "-")


def warm_counts(report: dict[str, Any] | None) -> str | None:
    """'5 loaded, 21 skipped (shape), 0 new, 0 unused' from a warm_start.json."""
    if not report:
        return None
    c = report.get("counts", {})
    return f"{c.get('loaded', 0)} loaded, {c.get('skipped_shape', 0)} skipped (shape), {c.get('new', 0)} new, {c.get('unused', 0)} unused"
