"""Timestamps at a task's step boundary, taken the same way in every process that trains.

The benchmarks time raylab from outside its own clocks. Every side of an A/B
comparison -- the plain PyTorch loop, a bare `TorchTrainer`, `raylab train`
in-process or on Ray workers -- runs the same registered task wrapped in a
subclass that appends a line to a file at the moments that matter:

    build_start / build_end        the task's build (data index + model build)
    sample_start / sample_end      a sampling round
    evaluate_start / evaluate_end  an evaluation
    first_loss                     the first micro-batch's loss call: the first step
    losses                         the wall clock, perf_counter and the process's CPU time at
                                   the start of every loss call since the last flush (kept in
                                   memory, written at the next evaluate / sample, outside any
                                   timed window)

A loop that calls `loss` at the start of every step, whatever it does between
steps (progress, TensorBoard, metrics, checkpoints, Ray reports), is timed by
the same clock at the same point as a loop that does nothing else.

How the wrapper gets into a process: `install()` points every entry of
`raylab.task.TASKS` at a timed subclass (`Timed__<name>`, built lazily by this
module's `__getattr__` so no model is imported early). In a Ray worker it must
happen before the worker asks for its task; `ray_worker_env()` makes the
embedded Ray's raylet start every Python worker with `bench.stamps` preloaded
(Ray's `preload_python_modules` setting), and importing this module with
`RAYLAB_BENCH_STAMPS` set arranges for `install()` to run right after
`raylab.task` is imported there. Nothing here changes raylab's code path; the
preload imports only this stdlib-only module.

    python -m bench.stamps train tinyimagenet --stage quick --workers 1   # = `raylab train ...`, stamped

`python -m bench.stamps` also stamps the driver's phases (imports, Ray start,
fit, plots) and, with `RAYLAB_BENCH_TIMELINE=<file>`, saves Ray's task
timeline after `fit()` (the export's own time is stamped so it can be left out).
With `RAYLAB_BENCH_TRACE=checkpoints`, each part of writing a checkpoint is
stamped too (`trace_checkpoints`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

STAMPS_ENV = "RAYLAB_BENCH_STAMPS"  # RAYLAB_* variables travel to Ray workers with raylab's own config
TIMELINE_ENV = "RAYLAB_BENCH_TIMELINE"
TRACE_ENV = "RAYLAB_BENCH_TRACE"  # "checkpoints": also stamp the parts of every checkpoint (trace_checkpoints)
_PREFIX = "Timed__"
_ORIGINAL: dict[str, str] = {}


def stamp(event: str, **fields: Any) -> None:
    """Append one event to the stamps file (a no-op when none is set)."""
    path = os.environ.get(STAMPS_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pc": time.perf_counter(), "pid": os.getpid(), **fields})
    with open(path, "a", encoding="utf-8") as fh:  # one short append per event: lines never interleave
        fh.write(line + "\n")


def read_stamps(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_clock(stamps: list[dict[str, Any]], rank: int = 0, clock: str = "pcs") -> list[float]:
    """A clock at the start of every loss call of `rank`'s first process, in call order:
    `pcs` (perf_counter: wall time) or `cpus` (process_time: CPU seconds of that process, all its threads)."""
    batches = [s for s in stamps if s["event"] == "losses" and s.get("rank") == rank]
    if not batches:
        return []
    pid = batches[0]["pid"]  # a retried worker would be another process with its own clock
    return [x for s in sorted((s for s in batches if s["pid"] == pid), key=lambda s: s["first_call"]) for x in s.get(clock, [])]


def first(stamps: list[dict[str, Any]], event: str, rank: int | None = None) -> float | None:
    """Wall-clock time of the first `event` (of `rank`, when given)."""
    times = [s["t"] for s in stamps if s["event"] == event and (rank is None or s.get("rank") == rank)]
    return min(times) if times else None


def _timed_subclass(base: type) -> type:
    """`base` with a stamp at the start of build / loss / sample / evaluate; behaviour unchanged."""

    class Timed(base):  # type: ignore[misc, valid-type]
        _bench_rank = 0
        _bench_calls = 0

        def build(self, cfg, ctx):
            self._bench_rank = ctx.world_rank
            self._bench_losses: list[tuple[float, float, float]] = []
            stamp("build_start", rank=self._bench_rank)
            parts = super().build(cfg, ctx)
            stamp("build_end", rank=self._bench_rank)
            return parts

        def loss(self, model, batch):
            self._bench_calls += 1
            self._bench_losses.append((time.time(), time.perf_counter(), time.process_time()))
            if self._bench_calls == 1:
                stamp("first_loss", rank=self._bench_rank)
            return super().loss(model, batch)

        def flush_losses(self) -> None:
            if getattr(self, "_bench_losses", None):
                t, pc, cpu = zip(*self._bench_losses)
                stamp("losses", rank=self._bench_rank, first_call=self._bench_calls - len(t) + 1, times=list(t), pcs=list(pc),
                      cpus=list(cpu))
                self._bench_losses = []

        def evaluate(self, model, ctx):
            self.flush_losses()
            stamp("evaluate_start", rank=self._bench_rank)
            out = super().evaluate(model, ctx)
            stamp("evaluate_end", rank=self._bench_rank)
            return out

        def sample(self, model, n, ctx, options=None):
            self.flush_losses()
            stamp("sample_start", rank=self._bench_rank)
            out = super().sample(model, n, ctx, options) if options is not None else super().sample(model, n, ctx)
            stamp("sample_end", rank=self._bench_rank)
            return out

    Timed.__name__ = Timed.__qualname__ = f"Timed{base.__name__}"
    return Timed


def __getattr__(name: str) -> type:
    # TASKS entries "bench.stamps:Timed__<model>" resolve here, when get_task() asks for them.
    if not name.startswith(_PREFIX) or name[len(_PREFIX):] not in _ORIGINAL:
        raise AttributeError(name)
    module_name, _, class_name = _ORIGINAL[name[len(_PREFIX):]].partition(":")
    cls = _timed_subclass(getattr(importlib.import_module(module_name), class_name))
    cls.__module__, cls.__name__ = __name__, name  # task_name_of() maps it back to its TASKS name
    globals()[name] = cls
    return cls


def install() -> None:
    """Point every registered task at its timed subclass (in this process)."""
    from raylab.task import TASKS

    for name, spec in list(TASKS.items()):
        if spec.startswith(f"{__name__}:"):
            continue
        _ORIGINAL[name] = spec
        TASKS[name] = f"{__name__}:{_PREFIX}{name}"
    if os.environ.get(TRACE_ENV) == "checkpoints":
        trace_checkpoints()


def _stamp_calls(owner: Any, attr: str, event: str) -> None:
    """Stamp `<event>_start` / `<event>_end` around every call of `owner.attr` (a function or method)."""
    inner = getattr(owner, attr)
    if getattr(inner, "_bench_stamped", False):
        return

    def timed(*args, **kwargs):
        stamp(f"{event}_start")
        try:
            return inner(*args, **kwargs)
        finally:
            stamp(f"{event}_end")

    timed._bench_stamped = True  # type: ignore[attr-defined]
    setattr(owner, attr, timed)


def trace_checkpoints() -> None:
    """Stamp each part of writing a checkpoint (`RAYLAB_BENCH_TRACE=checkpoints`).

    raylab's own steps (the gather of RNG states and weight fingerprints precedes the save),
    and inside `ray.train.report` Ray Train V2's two (private) steps: the upload of the
    folder to storage, and the wait for the report's turn on the controller's result queue.
    """
    import raylab.loop_reporting
    import raylab.session
    import raylab.torch_loop

    _stamp_calls(raylab.loop_reporting.Checkpointer, "report", "ckpt")
    _stamp_calls(raylab.torch_loop.TorchStepper, "save", "ckpt_save")
    _stamp_calls(raylab.loop_reporting, "finalize_checkpoint", "ckpt_checksums")
    _stamp_calls(raylab.session.LocalSession, "report", "ckpt_session_report")
    _stamp_calls(raylab.session.RunCheckpoints, "enforce_retention", "ckpt_retention")
    try:
        import raylab.ray_backend
        from ray.train.v2._internal.execution.context import TrainContext
    except ImportError:
        return
    _stamp_calls(raylab.ray_backend.RaySession, "report", "ckpt_session_report")
    _stamp_calls(TrainContext, "_upload_checkpoint", "ray_upload")
    _stamp_calls(TrainContext, "_wait_then_report", "ray_wait_turn")


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Runs `install()` right after `raylab.task` is first imported in this process."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "raylab.task":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            install()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def ray_worker_env() -> dict[str, str]:
    """Environment for a driver whose embedded Ray should start stamped workers.

    Ray preloads modules before it puts the driver's folder on a worker's path, so the
    folder holding `bench` goes on PYTHONPATH, which the raylet's workers inherit.
    """
    root = str(Path(__file__).resolve().parents[1])
    modules = [m for m in os.environ.get("RAY_preload_python_modules", "").split(",") if m]
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"RAY_preload_python_modules": ",".join(modules if __name__ in modules else [*modules, __name__]),
            "PYTHONPATH": os.pathsep.join(paths if root in paths else [root, *paths])}


def _instrument_driver() -> None:
    """Stamp the driver's phases around raylab's functions (wrappers; raylab's code is unchanged)."""
    import raylab.launch
    import raylab.ray_backend

    _stamp_calls(raylab.ray_backend, "ensure_ray", "ray_start")
    _stamp_calls(raylab.launch, "write_curves", "curves")
    fit = raylab.ray_backend.run_on_ray

    def fit_then_timeline(*args, **kwargs):
        stamp("fit_start")
        try:
            return fit(*args, **kwargs)
        finally:
            stamp("fit_end")
            target = os.environ.get(TIMELINE_ENV)
            if target:  # while the run's Ray is still up; stamped, so figures can leave it out
                import ray

                stamp("timeline_start")
                ray.timeline(target)
                stamp("timeline_end")

    raylab.ray_backend.run_on_ray = fit_then_timeline


def main(argv: list[str] | None = None) -> int:
    """`raylab <argv>` in this process, every task stamped, the driver's phases too."""
    stamp("main_start")
    os.environ.update(ray_worker_env())
    install()
    from raylab.cli import app

    _instrument_driver()
    stamp("cli_imported")
    try:
        app(args=list(sys.argv[1:] if argv is None else argv), prog_name="raylab")
        code = 0
    except SystemExit as exc:  # typer ends every command with sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    stamp("main_end", code=code)
    return code


if os.environ.get(STAMPS_ENV) and __name__ != "__main__" and "raylab.task" not in sys.modules:
    # Preloaded into a Ray worker (or imported early elsewhere): wrap tasks once raylab.task exists.
    sys.meta_path.insert(0, _InstallAfterImport())

if __name__ == "__main__":
    # The TASKS entries name `bench.stamps`, so run that module's main, not this __main__ copy.
    from bench.stamps import main as _main

    sys.exit(_main())
