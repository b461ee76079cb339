"""Sweeps: Tune trials of one stage over a search space (`raylab sweep`, and every ladder stage).

    raylab sweep tinyimagenet --stage quick --samples 16 --scheduler asha --search optuna \\
        --space 'lr=loguniform(1e-5,1e-2)' --space 'per_worker_batch_size=choice(32,64,128)' --name lr-sweep

    from raylab.sweep import plan_sweep, run_sweep
    result = run_sweep(plan_sweep("tinyimagenet", "quick", {"space": {"lr": "loguniform(1e-5,1e-2)"}, "samples": 4}))

A sweep folder (`<storage>/<name>/`, local or s3://):

    sweep.json     what was asked (model, stage, config, space, scheduler) and each trial's state
    tune/          Tune's experiment state: rerunning the same command restores it
    trial_000/...  one raylab run folder per trial: checkpoints, metrics.parquet,
                   TensorBoard, curves, trial.json (its sampled values and config)

`plan_sweep` checks everything a user can get wrong -- model, stage, fields,
search space, scheduler options -- before Ray starts (`ConfigError`, exit 2).
The search settings come from the experiment file's `search:` section for the
stage, overridden by `raylab sweep` options. Only `raylab.tune_backend` touches
`ray.tune`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from raylab.config import ConfigError, LaunchConfig, TrainConfig, metric_mode, read_experiment, validate_config
from raylab.search_space import BATCH_FIELDS, Dimension, LrScaling, check_space, parse_space_mapping, parse_space_option
from raylab.sweep_display import SweepTable, TrialRow
from raylab.task import check_workers

SWEEP_FILE = "sweep.json"
DEFAULT_METRIC = "val_loss"


class SweepSpec(BaseModel):
    """How one stage is searched: an experiment file's `search: {<stage>: ...}` entry, or `raylab sweep` options."""

    model_config = ConfigDict(extra="forbid")

    space: dict[str, str] = Field(default_factory=dict, description="Searched fields, field: distribution, e.g. lr: loguniform(1e-5, 1e-2) (see raylab.search_space); empty: one trial of the stage as it is.")
    samples: int = Field(8, gt=0, description="Trials to run; with grid() dimensions, how many times the whole grid is repeated.")
    scheduler: Literal["asha", "hyperband", "median", "fifo"] = Field("asha", description="Early stopping: ASHA, HyperBand (needs max_steps), the median stopping rule, or fifo (none).")
    search: Literal["random", "optuna"] = Field("random", description="How trial values are chosen: random sampling (and grids), or Optuna's TPE.")
    metric: str | None = Field(None, description="Metric that ranks trials, as named in metrics.parquet (None: the ladder's metric, else val_loss).")
    mode: Literal["min", "max"] | None = Field(None, description="Whether lower (min) or higher (max) metric is better (None: min for losses and errors, max otherwise).")
    lr_scaling: LrScaling = Field("none", description="How lr follows a trial's global batch relative to the stage's: none, linear or sqrt; a searched lr is the lr at the stage's batch.")
    grace_steps: int = Field(1, gt=0, description="Optimizer steps every trial runs before ASHA or the median rule may stop it.")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA/HyperBand: keep 1 in this many trials at each rung.")
    max_concurrent: int | None = Field(None, gt=0, description="Trials running at once (None: as many as the cluster fits; all on an autoscaling cluster).")
    seed: int = Field(0, description="Seed of the search itself (which values trials get), separate from the training seed.")


@dataclass
class SweepPlan:
    """A validated sweep: everything `run_sweep` needs, checked before Ray starts."""

    task_name: str
    stage: str
    name: str
    storage: str  # the storage root (absolute path or URI)
    base: TrainConfig  # the stage's config: defaults, stage, overrides
    dims: list[Dimension]
    spec: SweepSpec  # metric and mode resolved
    launch: LaunchConfig
    experiment: str
    kind: str = "sweep"  # "ladder stage" inside a ladder

    @property
    def metric(self) -> str:
        return self.spec.metric or DEFAULT_METRIC

    @property
    def mode(self) -> str:
        return self.spec.mode or metric_mode(self.metric)

    @property
    def uri(self) -> str:
        return join_uri(self.storage, self.name)

    def fingerprint(self) -> dict[str, Any]:
        """What makes two runs of this command the same sweep (worker counts may change)."""
        spec = self.spec.model_dump(mode="json", exclude={"max_concurrent"})
        return {"model": self.task_name, "stage": self.stage, "config": self.base.model_dump(mode="json"),
                "space": [d.text() for d in self.dims], "search": spec}


@dataclass
class TrialOutcome:
    """One trial's result, read from its run folder."""

    name: str
    state: str  # finished, stopped early, error, running, pending
    params: dict[str, Any]
    run: str  # the run folder, as shown to people
    best: float | None = None
    final: float | None = None
    steps: int = 0
    wall_s: float = 0.0
    best_checkpoint: str | None = None  # as shown to people
    checkpoint_location: str | None = None  # what init_from takes (an s3 URI keeps its ?endpoint_override=...)
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    uri: str
    metric: str
    mode: str
    trials: list[TrialOutcome] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def best(self) -> TrialOutcome | None:
        scored = [t for t in self.trials if t.best is not None]
        if not scored:
            return None
        return (max if self.mode == "max" else min)(scored, key=lambda t: t.best)


def yaml_specs(experiment: dict[str, Any], path: Path) -> dict[str, SweepSpec]:
    """The experiment file's `search:` section (stage: spec), every entry validated."""
    section = experiment.get("search")
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"experiment file {path}: 'search' must be a mapping of stage: search settings.")
    specs = {}
    for stage, body in section.items():
        if stage not in experiment["stages"]:
            raise ConfigError(f"experiment file {path}: search.{stage} names no stage of the file (it has: {', '.join(experiment['stages'])}).")
        if not isinstance(body, dict):
            raise ConfigError(f"experiment file {path}: search.{stage} must be a mapping (space, samples, scheduler, ...).")
        specs[stage] = validate_config(SweepSpec, body, f"experiment file {path} search.{stage}")  # type: ignore[arg-type]
    return specs


def join_uri(uri: str, *parts: str) -> str:
    """`uri` + path parts, keeping a query string (s3://b/p?endpoint_override=...) at the end."""
    base, sep, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + (sep + query if sep else "")


def resolve_storage(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def plan_sweep(
    task_name: str, stage: str = "quick", settings: dict[str, Any] | None = None, launch: LaunchConfig | None = None,
    overrides: dict[str, Any] | None = None, experiment: str | Path | None = None, space_options: list[str] | None = None,
    default_metric: str | None = None, name: str | None = None,
) -> SweepPlan:
    """Validate a sweep of `stage` without starting Ray.

    The search settings are the experiment file's `search:` entry for the stage,
    updated with `settings` (SweepSpec fields, e.g. from `raylab sweep` options);
    `space_options` (`--space` strings) replace its space. With no space and no
    samples anywhere, the sweep is one trial of the stage as it is.
    """
    from raylab.launch import check_run_name, find_experiment, prepare

    launch = launch or LaunchConfig()
    task, base = prepare(task_name, stage, overrides, experiment)
    path = find_experiment(task_name, experiment)
    data = read_experiment(path)
    yaml_spec = yaml_specs(data, path).get(stage)
    values = {**(yaml_spec.model_dump(exclude_unset=True) if yaml_spec else {}), **(settings or {})}
    if not values.get("space") and not space_options:
        values.setdefault("samples", 1)
        values.setdefault("scheduler", "fifo")
    spec = validate_config(SweepSpec, values, "search settings")  # type: ignore[arg-type]
    if space_options:
        dims = [parse_space_option(text) for text in space_options]
        source = {d.field: f"--space '{text}'" for d, text in zip(dims, space_options)}
    else:
        dims = parse_space_mapping(spec.space, f"{path} search.{stage}.space")
        source = {d.field: f"{path} search.{stage}.space.{d.field}" for d in dims}
    metric = spec.metric or default_metric or _ladder_metric(data) or DEFAULT_METRIC
    spec = spec.model_copy(update={"metric": metric, "mode": spec.mode or metric_mode(metric),
                                   "space": {d.field: d.text().split("=", 1)[1] for d in dims}})
    check_space(task.config_cls, base.model_dump(), dims, source)
    base = _keep_best_checkpoint(base, spec)
    _check_settings(spec, dims, base, launch)
    check_workers(task, base, launch.num_workers)
    name = check_run_name(name or launch.name or f"{task_name}-{stage}-sweep")
    return SweepPlan(task_name, stage, name, resolve_storage(launch.storage_path), base, dims, spec, launch, str(path))


def _ladder_metric(data: dict[str, Any]) -> str | None:
    ladder = data.get("ladder")
    return ladder.get("metric") if isinstance(ladder, dict) else None


def _keep_best_checkpoint(base: TrainConfig, spec: SweepSpec) -> TrainConfig:
    """Trials keep their best checkpoint by the sweep's metric (a ladder warm-starts from it)."""
    if base.checkpoint_metric is not None:
        return base
    values = {**base.model_dump(), "keep_best_checkpoints": max(1, base.keep_best_checkpoints),
              "checkpoint_metric": spec.metric, "checkpoint_mode": spec.mode}
    return type(base).model_validate(values)


def _check_settings(spec: SweepSpec, dims: list[Dimension], base: TrainConfig, launch: LaunchConfig) -> None:
    if launch.num_workers < 1:
        raise ConfigError("--workers 0 runs without Ray, but sweep trials run on Ray Train; use --workers 1 or more.")
    if spec.search == "optuna" and any(d.kind == "grid" for d in dims):
        raise ConfigError("grid() dimensions need --search random (Optuna samples; it does not enumerate grids).")
    if spec.scheduler == "hyperband" and base.max_steps is None:
        raise ConfigError("--scheduler hyperband needs the stage's budget in steps: set max_steps (e.g. --set max_steps=200).")
    if base.max_steps is not None and spec.grace_steps > base.max_steps and spec.scheduler in ("asha", "median"):
        raise ConfigError(f"--grace-steps {spec.grace_steps} is beyond the stage's max_steps {base.max_steps}.")


class SweepRecord:
    """sweep.json: the sweep's settings and the last known state of each trial."""

    def __init__(self, fs: Any, path: str, plan: SweepPlan):
        self.fs, self.path, self.plan = fs, path, plan
        self.data: dict[str, Any] = {}
        self._written = 0.0

    def open(self) -> None:
        """Load an earlier run of this sweep (it must be the same sweep) or start a new record."""
        from raylab.report import read_json

        earlier = read_json(self.fs, f"{self.path}/{SWEEP_FILE}")
        mine = self.plan.fingerprint()
        if earlier is not None:
            changed = _differences(earlier.get("fingerprint", {}), mine)
            if changed:
                raise ConfigError(
                    f"{self.plan.kind} '{self.plan.name}' in {self.plan.uri} was started with other settings ({changed}); "
                    "rerun it with the same ones, or choose a new --name."
                )
            self.data = earlier
        else:
            self.data = {"kind": self.plan.kind, "model": self.plan.task_name, "stage": self.plan.stage, "name": self.plan.name,
                         "experiment": self.plan.experiment, "metric": self.plan.metric, "mode": self.plan.mode,
                         "fields": [d.field for d in self.plan.dims], "fingerprint": mine, "trials": {},
                         "started": datetime.now().isoformat(timespec="seconds")}
        self.data["status"] = "running"
        self.write(force=True)

    def merge(self, rows: list[TrialRow]) -> list[TrialRow]:
        """Rows with what earlier drivers saw (a trial stopped before a kill stays 'stopped early')."""
        trials = self.data.setdefault("trials", {})
        for row in rows:
            earlier = trials.get(row.name, {})
            row.stopped_early = row.stopped_early or (earlier.get("stopped_early", False) and row.status == "TERMINATED")
            trials[row.name] = asdict(row)
        return rows

    def write(self, force: bool = False) -> None:
        from raylab.run_storage import write_file

        now = time.monotonic()
        if force or now - self._written > 2.0:
            self._written = now
            write_file(self.fs, f"{self.path}/{SWEEP_FILE}", json.dumps(self.data, indent=2, default=str).encode())


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key} {a!r} -> {b!r}")
    return ", ".join(out)


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_sweep(plan: SweepPlan, display: SweepTable | None = None, on_note: Callable[[str], None] | None = None) -> SweepResult:
    """Run (or continue) the sweep; returns every trial's outcome. Trials that fail do not stop the others."""
    from raylab.cache import raylab_environment
    from raylab.launch import check_storage
    from raylab.report import run_outcome
    from raylab.run_storage import run_filesystem
    from raylab.tune_backend import TrialPlan, TuneSettings, run_trials, trial_capacity

    started = time.perf_counter()
    fs, path = run_filesystem(plan.storage, plan.name)
    check_storage(fs, path, plan.storage)
    record = SweepRecord(fs, path, plan)
    record.open()
    resources, fits = trial_capacity(plan.launch)
    spec = plan.spec
    settings = TuneSettings(
        samples=spec.samples, scheduler=spec.scheduler, search=spec.search, metric=plan.metric, mode=plan.mode,
        max_concurrent=_concurrency(spec, plan.dims, fits),
        grace_steps=spec.grace_steps, reduction_factor=spec.reduction_factor, max_steps=plan.base.max_steps, seed=spec.seed,
        total_trials=spec.samples * _grid_size(plan.dims),
    )
    trial_plan = TrialPlan(plan.task_name, plan.base.model_dump(mode="json"), plan.launch.model_dump(mode="json"),
                           plan.uri, spec.lr_scaling, plan.metric, raylab_environment(), embedded=fits is not None)
    table = display or SweepTable(f"{plan.task_name} {plan.stage} {plan.kind} {plan.name}", plan.metric, plan.mode,
                                  [d.field for d in plan.dims])
    if on_note is None:
        on_note = table.note
    on_note(f"{plan.kind} {plan.name}: {_describe(plan, settings)}; folder {plan.uri}")

    def on_trials(rows: list[TrialRow]) -> None:
        rows = record.merge(rows)
        record.write()
        table(rows)

    with table:
        rows = run_trials(plan.uri, trial_plan, plan.dims, settings, on_trials, resources)
        rows = record.merge(rows)
    result = SweepResult(plan.name, plan.uri, plan.metric, plan.mode, wall_s=time.perf_counter() - started)
    for row in rows:
        outcome = run_outcome(fs, f"{path}/{row.name}", plan.metric, plan.mode)
        result.trials.append(TrialOutcome(
            name=row.name, state=row.state, params=row.params, run=outcome["run"], best=outcome["best"],
            final=outcome["final"], steps=outcome["steps"], wall_s=outcome["wall_s"],
            best_checkpoint=outcome["best_checkpoint"], error=row.error or outcome.get("error"),
            checkpoint_location=join_uri(plan.uri, row.name, outcome["best_checkpoint_name"]) if outcome["best_checkpoint_name"] else None,
        ))
    best = result.best
    record.data.update(status="finished", best=asdict(best) if best else None, wall_s=result.wall_s)
    record.write(force=True)
    return result


def _concurrency(spec: SweepSpec, dims: list[Dimension], fits: int | None) -> int:
    """Trials at once: what the user asked, never more than the local Ray fits (trials wait, never deadlock)."""
    wanted = spec.max_concurrent or fits or spec.samples * _grid_size(dims)
    return max(1, min(wanted, fits) if fits else wanted)


def _grid_size(dims: list[Dimension]) -> int:
    return math.prod(len(d.args) for d in dims if d.kind == "grid")


def _describe(plan: SweepPlan, s: Any) -> str:
    spec = plan.spec
    if not plan.dims and spec.samples == 1:
        return f"one trial, metric {plan.metric} ({plan.mode}), {plan.launch.num_workers} worker(s)"
    space = ", ".join(d.text() for d in plan.dims) or "no searched fields"
    total = spec.samples * _grid_size(plan.dims)
    parts = [f"{total} trial(s) of {space}", f"scheduler {spec.scheduler}", f"search {spec.search}",
             f"metric {plan.metric} ({plan.mode})", f"up to {s.max_concurrent} at once", f"{plan.launch.num_workers} worker(s) each"]
    if any(d.field in BATCH_FIELDS for d in plan.dims):
        parts.append(f"lr scaling {spec.lr_scaling} (relative to global batch {plan.base.per_worker_batch_size * plan.base.grad_accum_steps})")
    return ", ".join(parts)
