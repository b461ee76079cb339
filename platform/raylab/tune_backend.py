"""The Tune boundary: the only module that imports `ray.tune`.

One Tune experiment runs the trials of a sweep (or of one ladder stage). Each
trial is a function that builds the run's Ray Train trainer through
`raylab.ray_backend.make_trainer` -- the same trainer `raylab train` builds, so
every registered task works here -- and fits it; the 2.60 pattern (RAY_NOTES):

- a trial's sampled values become a typed config once, here (`trial_config`);
- each trial's run has a deterministic name, `trial_NNN` (the trial's number in
  the experiment), and a folder of its own under the sweep folder: a Tune retry,
  a restore after a driver kill, even a fresh start after Tune's own state was
  lost, all find the same folder and resume from its newest checkpoint;
- Train reports reach Tune through a `TuneReportCallback` that forwards only
  reports carrying the sweep's metric (mid-epoch checkpoints without an
  evaluation would trip Tune's strict metric check); schedulers measure time in
  raylab's own `step`, which survives restores, unlike `training_iteration`;
- a trial holds one `trial_slot` (a custom resource) instead of a CPU, and the
  search algorithm caps how many run at once;
- Tune prints nothing (`verbose=0`): a callback feeds plain `TrialRow`s to the
  caller's display, found through a module-level sink so the callback pickled in
  Tune's experiment state never holds a live display.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.progress_reporter import TrialProgressCallback

from raylab.config import ConfigError, LaunchConfig
from raylab.search_space import Dimension, trial_config
from raylab.sweep import join_uri
from raylab.sweep_display import TrialRow

TRIAL_FILE = "trial.json"
TUNE_DIR = "tune"
# Tune's own CSV/JSON/TensorBoard loggers duplicate raylab's metrics.parquet and TensorBoard.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Save Tune's experiment state often: a killed driver restores from it.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
# Tune's newer output engine prints an experiment header even at verbose=0; the legacy one is silent.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ctrl+C: Tune's own handler ends fit() as if the experiment were complete (a ladder would move
# on); without it KeyboardInterrupt reaches raylab, and a rerun restores the state saved above.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

# One sweep runs per process at a time; a restored experiment's pickled callback finds it by this key.
_SINK = "raylab-sweep"
_SINKS: dict[str, Callable[[list[TrialRow]], None]] = {}


@dataclass
class TrialPlan:
    """What every trial needs, as plain data (it is shipped to the trial actors)."""

    task: str
    base_config: dict[str, Any]  # the stage's typed config, as JSON data
    launch: dict[str, Any]  # LaunchConfig as JSON data
    runs_storage: str  # the sweep folder (path or URI): trial runs are <runs_storage>/<trial name>
    lr_scaling: str
    metric: str
    env: dict[str, str] = field(default_factory=dict)  # the driver's RAYLAB_* variables
    embedded: bool = False  # on raylab's own local Ray (raylab.ray_embedded), not a cluster


@dataclass
class TuneSettings:
    """How the trials are chosen and stopped."""

    samples: int
    scheduler: str  # asha | hyperband | median | fifo
    search: str  # random | optuna
    metric: str
    mode: str
    max_concurrent: int
    grace_steps: int = 1
    reduction_factor: float = 3.0
    max_steps: int | None = None  # the budget in steps, when known (hyperband needs it)
    seed: int | None = 0
    total_trials: int = 1  # samples x grid size: how many trials a complete experiment has


def trial_name(trial: Any) -> str:
    """trial_NNN from the trial's number in the experiment (saved with Tune's state, so stable)."""
    number = str(trial.experiment_tag).split("_", 1)[0]
    return f"trial_{int(number):03d}" if number.isdigit() else f"trial_{trial.trial_id}"


class TrialFailed(RuntimeError):
    """A trial's failure in one sentence (what the table and the sweep's record show)."""


class _MetricReport(TuneReportCallback):
    """Forward to Tune only the Train reports that carry the sweep's metric."""

    def __init__(self, metric: str):
        super().__init__()
        self._metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self._metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    from raylab.report import read_json

    try:
        return read_json(fs, path)
    except (OSError, ValueError):
        return None


def _write_json(fs: Any, path: str, data: dict[str, Any]) -> None:
    from raylab.run_storage import write_file

    write_file(fs, path, json.dumps(data, indent=2, default=str).encode())


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """One trial, in its Tune actor: typed config, the run's trainer, fit."""
    from raylab.plots import write_curves
    from raylab.ray_backend import SWEEP_METRIC_ENV, first_worker_error, make_trainer
    from raylab.run_storage import read_metrics, run_filesystem
    from raylab.task import get_task

    os.environ.update(plan.env)
    os.environ[SWEEP_METRIC_ENV] = plan.metric  # the workers stop at the first report that shows it will never come
    task = get_task(plan.task)
    base = task.config_cls.model_validate(plan.base_config)
    name = ray.tune.get_context().get_trial_name()
    try:
        cfg = trial_config(base, params, plan.lr_scaling)
    except ConfigError as exc:
        raise TrialFailed(str(exc)) from None
    fs, run_path = run_filesystem(plan.runs_storage, name)
    earlier = _read_json(fs, f"{run_path}/{TRIAL_FILE}") or {}
    record = {"trial": name, "trial_id": ray.tune.get_context().get_trial_id(), "params": params,
              "config": cfg.model_dump(mode="json"), "lr_scaling": plan.lr_scaling,
              "started": earlier.get("started") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "attempts": int(earlier.get("attempts", 0)) + 1,
              # the trial actor's process: a fifo sweep hands a finished trial's actor the next trial
              "actor": {"host": socket.gethostname(), "pid": os.getpid()}}
    _write_json(fs, f"{run_path}/{TRIAL_FILE}", record)
    trainer = make_trainer(plan.task, cfg, LaunchConfig.model_validate(plan.launch), name, plan.runs_storage,
                           callbacks=(_MetricReport(plan.metric),), embedded=plan.embedded, tune=True)
    try:
        trainer.fit()
    except Exception as exc:
        cause = first_worker_error(exc)
        record["error"] = f"{type(cause).__name__}: {cause}"
        _write_json(fs, f"{run_path}/{TRIAL_FILE}", record)
        raise TrialFailed(record["error"]) from None
    metrics = read_metrics(fs, run_path)
    write_curves(fs, run_path, metrics, f"{plan.task} {name}", tuple(getattr(task, "headline_metrics", ())))
    columns = set(metrics.columns)
    if plan.metric not in columns:
        known = ", ".join(sorted(c for c in columns if c.startswith(("val_", "train_", "sample_")))) or "none"
        record["error"] = f"the run never reported metric '{plan.metric}' (it reports: {known}); choose one of those with --metric, or ladder.metric in the experiment file"
        _write_json(fs, f"{run_path}/{TRIAL_FILE}", record)
        raise TrialFailed(record["error"])


def _domain(dim: Dimension) -> Any:
    low_high = dim.args
    if dim.kind == "uniform":
        return ray.tune.uniform(*low_high)
    if dim.kind == "loguniform":
        return ray.tune.loguniform(*low_high)
    if dim.kind == "randint":
        return ray.tune.randint(low_high[0], low_high[1] + 1)  # raylab's randint includes the upper bound
    if dim.kind == "choice":
        return ray.tune.choice(list(dim.args))
    return ray.tune.grid_search(list(dim.args))


def _scheduler(s: TuneSettings) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    if s.scheduler == "asha":
        max_t = s.max_steps or 10**9  # rungs past the end of training are never reached
        # stop_last_trials=False: a trial that reaches the budget ends by itself (and finishes
        # writing its run folder) instead of being killed at its last report.
        return AsyncHyperBandScheduler(time_attr="step", max_t=max(max_t, s.grace_steps), grace_period=s.grace_steps,
                                       reduction_factor=s.reduction_factor, stop_last_trials=False)
    if s.scheduler == "hyperband":
        # Asynchronous HyperBand: ASHA run over several brackets, each with a grace period
        # reduction_factor times the last, trials spread over them. Tune's synchronous
        # HyperBandScheduler pauses trials until a bracket fills; a paused raylab trial would
        # stop its Ray Train run, and with fewer trials than a bracket holds nothing is ever
        # stopped (seen with 4 trials): the asynchronous form has neither problem. Tune draws
        # each trial's bracket from numpy's global generator: seeded by the sweep's seed, the
        # same sweep spreads its trials the same way.
        if s.seed is not None:
            import numpy as np

            np.random.seed(s.seed)
        return AsyncHyperBandScheduler(time_attr="step", max_t=s.max_steps, grace_period=s.grace_steps,
                                       reduction_factor=s.reduction_factor, brackets=hyperband_brackets(s),
                                       stop_last_trials=False)
    if s.scheduler == "median":
        return MedianStoppingRule(time_attr="step", grace_period=s.grace_steps, min_samples_required=2)
    return FIFOScheduler()


def reuse_trial_actors(s: TuneSettings) -> bool:
    """Whether a finished trial's actor runs the next trial (Tune's `reuse_actors`).

    With fifo every trial function returns by itself, so its actor can take the next trial:
    no new Python process, no second import of torch and the task's code (bench/tune_overhead.py
    measures the gain). A scheduler that stops trials early leaves the stopped trial's
    function inside its Ray Train run; Tune would wait 2 s for it, fail to reset the actor
    and error the next trial, so those sweeps keep one actor per trial.
    """
    return s.scheduler == "fifo"


def hyperband_brackets(s: TuneSettings) -> int:
    """How many brackets fit between the grace period and the budget (at most 3): bracket k
    first judges trials at grace_steps * reduction_factor**k steps."""
    brackets, first_rung = 1, s.grace_steps * s.reduction_factor
    while brackets < 3 and s.max_steps and first_rung < s.max_steps:
        brackets, first_rung = brackets + 1, first_rung * s.reduction_factor
    return brackets


def _search(s: TuneSettings) -> Any:
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=s.seed), max_concurrent=s.max_concurrent)
    # max_concurrent_trials is ignored with a BasicVariantGenerator (RAY_NOTES): limit it here.
    return BasicVariantGenerator(max_concurrent=s.max_concurrent, random_state=s.seed)


class _TrialFeed(TrialProgressCallback):
    """Turns Tune's trials into TrialRows for the display registered under `sink`.

    It stands in for Tune's TrialProgressCallback (whose hooks it all overrides):
    Tune adds that one only when none is given, and it prints each trial's last
    result even at verbose=0.
    """

    def __init__(self, sink: str, metric: str, mode: str, max_steps: int | None = None):
        super().__init__(metric=metric)
        self.sink, self.metric, self.mode, self.max_steps = sink, metric, mode, max_steps
        self.stopped: set[str] = set()
        self._last_push = 0.0

    def _push(self, trials: list[Any], force: bool) -> None:
        now = time.monotonic()
        target = _SINKS.get(self.sink)
        if target is None or (not force and now - self._last_push < 0.5):
            return
        self._last_push = now
        target([self.row(t) for t in trials])

    def row(self, trial: Any) -> TrialRow:
        last = trial.last_result or {}
        analysis = (getattr(trial, "metric_analysis", None) or {}).get(self.metric, {})
        error = None
        if trial.status == "ERROR":
            error = _trial_error(trial)
        return TrialRow(
            name=trial.custom_trial_name or str(trial), status=trial.status, params=dict(trial.config),
            step=last.get("step"), value=last.get(self.metric), best=analysis.get(self.mode),
            stopped_early=trial.trial_id in self.stopped, error=error,
        )

    def on_step_end(self, iteration, trials, **info):
        self._push(trials, force=False)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._push(trials, force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Tune marks a result done=True only when a scheduler (or stopper) stops the trial on it:
        # a trial that ends by itself finishes with a duplicate result callbacks never see.
        if result.get("done") and (self.max_steps is None or (result.get("step") or 0) < self.max_steps):
            self.stopped.add(trial.trial_id)
        self._push(trials, force=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._push(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._push(trials, force=True)

    def on_experiment_end(self, trials, **info):
        self._push(trials, force=True)


def _trial_error(trial: Any) -> str:
    """The one line the trial function raised (Tune keeps it with a traceback in error.txt)."""
    text = ""
    path = getattr(trial, "error_file", None) or ""
    try:
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
    except OSError:
        pass
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    marker = f"{TrialFailed.__module__}.{TrialFailed.__name__}: "
    for line in reversed(lines):
        if marker in line:
            return line.split(marker, 1)[1]
    return lines[-1] if lines else "the trial failed (see its error.txt)"


def trial_capacity(launch: LaunchConfig) -> tuple[dict[str, float], int | None]:
    """Start or join Ray for Tune: (resources of one trial actor, how many trials fit at once).

    On the embedded Ray the count is what the CPUs (and GPUs) fit; on a cluster it is
    None (the autoscaler adds nodes). A cluster without the `trial_slot` resource gets
    trial actors of 0.01 CPU instead.
    """
    import ray

    from raylab.ray_backend import TRIAL_RESOURCE, check_resources, ensure_ray

    local = ensure_ray(launch, tune=True)
    check_resources(launch, local)
    total = ray.cluster_resources()
    resources = {TRIAL_RESOURCE: 1} if total.get(TRIAL_RESOURCE) else {"CPU": 0.01}
    if not local:
        return resources, None
    fits = int(total.get("CPU", 0) // (launch.num_workers * launch.cpus_per_worker))
    if launch.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // launch.num_workers))
    return resources, max(1, fits)


def run_trials(sweep_uri: str, plan: TrialPlan, dims: list[Dimension], settings: TuneSettings,
               on_trials: Callable[[list[TrialRow]], None], trial_resources: dict[str, float]) -> list[TrialRow]:
    """Run (or continue, after a driver kill) the Tune experiment `<sweep_uri>/tune`; returns every trial's row."""
    tune_uri = join_uri(sweep_uri, TUNE_DIR)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, plan=plan), trial_resources)
    latest: dict[str, TrialRow] = {}

    def sink(rows: list[TrialRow]) -> None:
        latest.update({r.name: r for r in rows})
        on_trials(list(latest.values()))

    _SINKS[_SINK] = sink
    # Tune logs each trial failure with a traceback; the table and the summary show it in one line.
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)
    try:
        if ray.tune.Tuner.can_restore(tune_uri):
            # Finished trials stay finished; unfinished and failed ones continue from their run folders.
            tuner = ray.tune.Tuner.restore(tune_uri, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = ray.tune.Tuner(
                trainable,
                param_space={d.field: _domain(d) for d in dims},
                tune_config=ray.tune.TuneConfig(
                    metric=settings.metric, mode=settings.mode, num_samples=settings.samples,
                    scheduler=_scheduler(settings), search_alg=_search(settings),
                    trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                    reuse_actors=reuse_trial_actors(settings),
                ),
                run_config=ray.tune.RunConfig(name=TUNE_DIR, storage_path=sweep_uri, verbose=0,
                                              callbacks=[_TrialFeed(_SINK, settings.metric, settings.mode, settings.max_steps)]),
            )
        grid = tuner.fit()
    finally:
        _SINKS.pop(_SINK, None)
        tune_logger.setLevel(level)
    for result in grid:  # trials the feed never saw (an experiment restored complete)
        name = os.path.basename(str(result.path).split("?", 1)[0].rstrip("/"))
        if name not in latest:
            metrics = result.metrics or {}
            latest[name] = TrialRow(name=name, status="ERROR" if result.error else "TERMINATED", params=dict(result.config or {}),
                                    step=metrics.get("step"), value=metrics.get(settings.metric), best=None,
                                    error=str(result.error).strip().splitlines()[-1] if result.error else None)
    rows = sorted(latest.values(), key=lambda r: r.name)
    unfinished = [r.name for r in rows if r.status not in ("TERMINATED", "ERROR")]
    if unfinished or len(rows) < settings.total_trials:
        # e.g. SIGINT handled by Tune after all (TUNE_DISABLE_SIGINT_HANDLER=0): its fit() returns early
        raise KeyboardInterrupt(f"the sweep stopped early: {len(rows)} of {settings.total_trials} trials created, unfinished: {unfinished}")
    return rows
