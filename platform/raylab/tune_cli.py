"""`raylab ladder | sweep | report`: the Tune commands, a thin shell over `raylab.ladder`,
`raylab.sweep` and `raylab.report` (registered on the main app in `raylab.cli`).

    raylab ladder tinyimagenet
    raylab sweep tinyimagenet --stage quick --samples 16 --scheduler asha --search optuna \\
        --space 'lr=loguniform(1e-5,1e-2)' --space 'per_worker_batch_size=choice(32,64,128)' --name lr-sweep
    raylab report lr-sweep

Exit codes: 0 success, 1 a stage missed its gate or the trials failed, 2 a
configuration error (reported before Ray starts).
"""

from __future__ import annotations

import shlex
import traceback
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raylab.config import ConfigError, make_launch_config, parse_overrides

out = Console()
err = Console(stderr=True)

_WORKERS = typer.Option(1, help="Ray Train workers per trial.")
_STORAGE = typer.Option("raylab_results", help="Local folder or s3:// URI holding ladders, sweeps and runs.")
_ADDRESS = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray).")
_SET = typer.Option([], "--set", help="Override a config field for every trial: --set key=value (repeatable).")


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _launch(workers: int, gpus: bool, cpus_per_worker: float, storage: str, name: Optional[str], address: Optional[str], max_failures: int):
    return make_launch_config(num_workers=workers, use_gpu=gpus, cpus_per_worker=cpus_per_worker, storage_path=storage,
                              name=name, address=address, max_failures=max_failures)


def _absolute(location: str) -> str:
    return location if "://" in location else str(Path(location).expanduser().resolve())


def ladder(
    model: str = typer.Argument(..., help="Registered model name (see `raylab models`)."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated stages in order (default: every stage of the experiment file)."),
    set_: List[str] = _SET,
    workers: int = _WORKERS,
    gpus: bool = typer.Option(False, "--gpus", help="Give each worker one GPU."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs reserved per worker."),
    storage: str = _STORAGE,
    name: Optional[str] = typer.Option(None, help="Ladder name (default <model>-ladder); the same name continues where it stopped."),
    address: Optional[str] = _ADDRESS,
    max_failures: int = typer.Option(0, help="Worker-group restarts per trial from its latest checkpoint (-1: forever)."),
    experiment: Optional[str] = typer.Option(None, help="Experiment YAML (default: experiments/<model>.yaml)."),
    init_from: Optional[str] = typer.Option(None, help="Warm start the first stage from this checkpoint or run folder."),
    debug: bool = typer.Option(False, help="Print full tracebacks on failure."),
) -> None:
    """Run the quick -> medium -> full ladder: each stage a Tune experiment, warm-started from the last one's best checkpoint."""
    from raylab.ladder import GateFailed, LadderError, plan_ladder, run_ladder

    try:
        launch = _launch(workers, gpus, cpus_per_worker, storage, name, address, max_failures)
        plan = plan_ladder(model, stages, launch, parse_overrides(set_), experiment, _absolute(init_from) if init_from else None)
    except ConfigError as exc:
        _fail(str(exc), 2)
    say = lambda text: err.print(f"[bold]ladder {plan.name}[/] {escape(text)}", highlight=False, soft_wrap=True)  # noqa: E731
    try:
        outcomes = run_ladder(plan, say)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except GateFailed as exc:
        _fail(f"ladder stopped: {exc}", 1)
    except LadderError as exc:
        _fail(f"ladder stopped: {exc}", 1)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to continue where it stopped.", 130)
    except Exception as exc:
        if debug:
            err.print(traceback.format_exc())
        _fail(f"ladder failed: {type(exc).__name__}: {exc}".rstrip(), 1)
    table = Table(title=f"ladder {plan.name}: done", title_justify="left")
    for col in ("stage", "status", "gate", "best trial", plan.spec.metric, "warm start (tensors)"):
        table.add_column(col, overflow="fold")
    for o in outcomes:
        table.add_row(o.stage, o.status, o.gate, o.best_trial or "-", f"{o.best:.4g}" if o.best is not None else "-", o.warm_start or "-")
    out.print(table)
    for o in outcomes:
        out.print(f"{o.stage} best checkpoint: {o.best_checkpoint}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"report: raylab report {plan.name} --storage {shlex.quote(storage)}", highlight=False, markup=False, soft_wrap=True)


def sweep(
    model: str = typer.Argument(..., help="Registered model name (see `raylab models`)."),
    stage: str = typer.Option("quick", help="Stage whose config the trials start from."),
    space: List[str] = typer.Option([], "--space", help="A searched field: --space 'lr=loguniform(1e-5,1e-2)' (repeatable; replaces the experiment file's search space)."),
    samples: Optional[int] = typer.Option(None, help="Trials (with grid(): repeats of the grid). Default: the experiment file's, else 8."),
    scheduler: Optional[str] = typer.Option(None, help="asha (default), hyperband, median or fifo."),
    search: Optional[str] = typer.Option(None, help="random (default) or optuna."),
    metric: Optional[str] = typer.Option(None, help="Metric that ranks trials (default: the ladder's metric, else val_loss)."),
    mode: Optional[str] = typer.Option(None, help="min or max (default: from the metric's name)."),
    lr_scaling: Optional[str] = typer.Option(None, help="How lr follows a searched batch size: none (default), linear or sqrt."),
    grace_steps: Optional[int] = typer.Option(None, help="Steps before ASHA / the median rule may stop a trial."),
    reduction_factor: Optional[float] = typer.Option(None, help="ASHA / HyperBand: keep 1 in this many trials per rung."),
    max_concurrent: Optional[int] = typer.Option(None, help="Trials at once (default: as many as the cluster fits)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the search's sampling."),
    set_: List[str] = _SET,
    workers: int = _WORKERS,
    gpus: bool = typer.Option(False, "--gpus", help="Give each worker one GPU."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs reserved per worker."),
    storage: str = _STORAGE,
    name: Optional[str] = typer.Option(None, help="Sweep name (default <model>-<stage>-sweep); the same name continues where it stopped."),
    address: Optional[str] = _ADDRESS,
    max_failures: int = typer.Option(0, help="Worker-group restarts per trial from its latest checkpoint (-1: forever)."),
    experiment: Optional[str] = typer.Option(None, help="Experiment YAML (default: experiments/<model>.yaml)."),
    debug: bool = typer.Option(False, help="Print full tracebacks on failure."),
) -> None:
    """Search a stage's learning rate, batch size or any config field with Ray Tune (ASHA, HyperBand, median; random or Optuna)."""
    from raylab.sweep import plan_sweep, run_sweep

    given = dict(samples=samples, scheduler=scheduler, search=search, metric=metric, mode=mode, lr_scaling=lr_scaling,
                 grace_steps=grace_steps, reduction_factor=reduction_factor, max_concurrent=max_concurrent, seed=seed)
    try:
        launch = _launch(workers, gpus, cpus_per_worker, storage, name, address, max_failures)
        plan = plan_sweep(model, stage, {k: v for k, v in given.items() if v is not None}, launch, parse_overrides(set_),
                          experiment, space)
    except ConfigError as exc:
        _fail(str(exc), 2)
    try:
        result = run_sweep(plan)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to continue where it stopped.", 130)
    except Exception as exc:
        if debug:
            err.print(traceback.format_exc())
        _fail(f"sweep failed: {type(exc).__name__}: {exc}".rstrip(), 1)
    best = result.best
    rows = [("sweep", result.name), ("folder", result.uri), ("wall time", f"{result.wall_s:.1f} s"),
            ("trials", ", ".join(f"{n} {s}" for s, n in _count(t.state for t in result.trials).items()))]
    if best is not None:
        rows += [("best trial", f"{best.name} {_params(best.params)}"), (f"best {result.metric}", f"{best.best:.4g}"),
                 ("best checkpoint", best.best_checkpoint or "none")]
    _print_rows(f"{model} {stage} sweep: done", rows)
    failed = [t for t in result.trials if t.state == "error"]
    for t in failed:
        err.print(f"[red]{t.name} failed:[/] {escape(str(t.error))}", highlight=False, soft_wrap=True)
    if best is None:
        _fail(f"no trial reported {result.metric}.", 1)


def report(
    target: str = typer.Argument(..., help="A ladder, sweep or run: its name under --storage, or its folder / URI."),
    storage: str = _STORAGE,
) -> None:
    """Table and plots of every trial and stage: results.parquet, results.csv, learning_curves.png, search_space.png."""
    from raylab.report import write_report

    try:
        result = write_report(target, storage)
    except ConfigError as exc:
        _fail(str(exc), 2)
    table = result.table
    shown = [c for c in ("stage", "trial", "state", *_searched(table), "best", "final", "steps", "wall_s") if c in table]
    view = Table(title=f"{result.kind} {target}: {len(table)} row(s), metric {result.metric}", title_justify="left")
    for col in shown:
        view.add_column(col, overflow="fold")
    for _, row in table.iterrows():
        view.add_row(*(_cell(row[c]) for c in shown))
    out.print(view)
    for path in result.files:
        out.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)


def _searched(table: Any) -> list[str]:
    fixed = {"kind", "stage", "stage_status", "chosen", "trial", "state", "metric", "best", "final", "steps", "wall_s", "train_s",
             "best_checkpoint", "latest_checkpoint", "run", "error", "config"}
    return [c for c in table.columns if c not in fixed and not c.startswith(("final_", "best_", "warm_"))]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"
    return "-" if value is None else str(value)


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_cell(v)}" for k, v in params.items())


def _count(states: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return counts


def _print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
