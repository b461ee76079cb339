"""Startup: command to first step, and the whole quick stage, on Ray vs in-process vs a bare TorchTrainer.

Four commands, each a fresh process run from outside and timed by this
process's clock from just before it is created to its exit:

    raylab_w0       `raylab train tinyimagenet --stage quick --workers 0`  (no Ray)
    raylab_w1       `raylab train tinyimagenet --stage quick --workers 1`  (embedded Ray, raylab's settings)
    ray_defaults    the same with Ray's defaults for every setting raylab changes on its embedded
                    instance (`raylab.ray_backend._EMBEDDED_ENV`): what the settings buy
    bare_trainer    what a user writes without raylab: `ray.init` + a `TorchTrainer` training the same
                    model on the same data for the same 3 epochs, evaluating and reporting a
                    checkpoint after each epoch (`bench.plain_loop --bare-trainer`)

The first step is the first loss call, stamped inside the training process
(`bench.stamps`, same wrapper on every side). Where the seconds go comes from
the same stamps (the task's build, sampling, evaluation), stamps around the
driver's phases (Ray start, fit, plots), and Ray's own task timeline (saved by
the driver after `fit()`; the export's time is left out of every figure): the
Train controller's and worker's actor start-up and the process group.
The synthetic dataset is generated before the first round, so no round pays for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.harness import (Report, clean_work_dir, ray_defaults_env, interleave, python_module, raylab_argv, run_command,
                           sets, summarise, warm_up, work_dir)
from bench.stamps import STAMPS_ENV, TIMELINE_ENV, read_stamps

NAME = "startup"
FULL = dict(rounds=3, threads=1, overrides={}, sides=("raylab_w0", "raylab_w1", "ray_defaults", "bare_trainer"))
SMOKE = dict(rounds=1, threads=1, sides=("raylab_w0", "raylab_w1"),
             overrides={"max_steps": 4, "synthetic_train_per_class": 8, "synthetic_val_per_class": 2, "num_samples": 1})
LABELS = {"raylab_w0": "raylab --workers 0", "raylab_w1": "raylab --workers 1", "ray_defaults": "raylab --workers 1, Ray defaults",
          "bare_trainer": "bare TorchTrainer, 1 worker"}

# Phases of a run, per kind of command: (label, marker that ends it); each phase starts at the
# previous marker the run left (a missing one folds its phase into the next).
_RAY_TRAIN = [
    ("Ray start (ray.init)", "ray_start_end"),
    ("progress queue, trainer, controller actor scheduled", "controller_init_start"),
    ("Train controller init (imports Train, torch)", "controller_init_end"),
    ("worker group: placement group, worker process start", "worker_init_start"),
    ("worker init (imports the train function: raylab, torch)", "worker_ready"),
    ("process group, worker entry (session, loop imports)", "build_start"),
]
_RUN = [
    ("task build: data index + model build", "build_end"),
    ("resume check, metrics and TensorBoard writers", "sample_start"),
    ("first sampling round", "sample_end"),
    ("first batch (DataLoader, DDP wrap)", "first_loss"),
    ("training: steps, evaluations, checkpoints", "train_end"),
]
PHASES = {
    "raylab_w1": [("Python start", "main_start"), ("import raylab's CLI", "cli_imported"),
                  ("check config (imports the model's code: torch)", "fit_start"), ("import ray", "ray_start_start"),
                  *_RAY_TRAIN, *_RUN, ("end of fit: last report, controller and workers stop", "fit_end"),
                  ("read metrics, scan checkpoints", "curves_start"), ("plots (curves.png)", "curves_end"),
                  ("summary table", "main_end"), ("exit (Ray shutdown, Python teardown)", "cmd_end")],
    "raylab_w0": [("Python start", "main_start"), ("import raylab's CLI", "cli_imported"),
                  ("check config (imports the model's code: torch), loop setup", "build_start"), *_RUN,
                  ("last report: evaluation, checkpoint, read metrics", "curves_start"), ("plots (curves.png)", "curves_end"),
                  ("summary table", "main_end"), ("exit (Python teardown)", "cmd_end")],
    "bare_trainer": [("Python start", "main_start"), ("check config (imports the model's code: torch)", "cli_imported"),
                     ("import ray", "ray_start_start"), *_RAY_TRAIN, *_RUN,
                     ("end of fit: last report, controller and workers stop", "fit_end"),
                     ("exit (Ray shutdown, Python teardown)", "cmd_end")],
}
PHASES["ray_defaults"] = PHASES["raylab_w1"]
# Row order of the table: every label, first appearance first.
ROWS = list(dict.fromkeys(label for kind in ("raylab_w1", "raylab_w0", "bare_trainer") for label, _ in PHASES[kind]))


def markers(stamps: list[dict[str, Any]], timeline: Path | None, started: float, ended: float) -> dict[str, float]:
    """Times (s since the command started) of every marker a run left."""
    out: dict[str, float] = {"cmd_start": 0.0, "cmd_end": ended - started}
    worker = [s for s in stamps if s.get("rank") == 0]
    for s in stamps:
        name = s["event"]
        if name in ("main_start", "cli_imported", "fit_start", "ray_start_start", "ray_start_end", "fit_end",
                    "curves_start", "curves_end", "main_end", "timeline_start", "timeline_end", "build_start",
                    "build_end", "sample_start", "sample_end", "first_loss"):
            out.setdefault(name, s["t"] - started)  # the first one: e.g. the first sampling round
    if worker:
        out["train_end"] = max(s["t"] for s in worker) - started
    if timeline is not None and timeline.is_file():
        out.update(_timeline_markers(json.loads(timeline.read_text()), started))
    if "timeline_start" in out and "timeline_end" in out:
        out["timeline_s"] = out["timeline_end"] - out["timeline_start"]
    return out


def _timeline_markers(events: list[dict[str, Any]], started: float) -> dict[str, float]:
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("ph") == "X":
            spans.setdefault(str(e.get("cat")), []).append((e["ts"] / 1e6 - started, (e["ts"] + e.get("dur", 0)) / 1e6 - started))
    out = {}
    for marker, cat, pick in (("controller_init_start", "task::TrainController.__init__", lambda s: min(a for a, _ in s)),
                              ("controller_init_end", "task::TrainController.__init__", lambda s: max(b for _, b in s)),
                              ("worker_init_start", "task::RayTrainWorker.__init__", lambda s: min(a for a, _ in s)),
                              ("worker_ready", "task::RayTrainWorker.init_train_context", lambda s: max(b for _, b in s))):
        if spans.get(cat):
            out[marker] = pick(spans[cat])
    return out


def phases(kind: str, marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase; a phase whose end marker is missing is folded into the next one."""
    out, previous = {}, 0.0
    for label, marker in PHASES[kind]:
        if marker not in marks:
            continue
        seconds = marks[marker] - previous
        if previous <= marks.get("timeline_start", -1) < marks[marker]:
            seconds -= marks.get("timeline_s", 0.0)  # the bench's own export, not the run's work
        out[label] = seconds
        previous = marks[marker]
    return out


def side(p: dict[str, Any], work: Path, name: str, r: int, env: dict[str, str]) -> dict[str, float]:
    stamps, timeline = work / f"{name}-{r}.jsonl", work / f"{name}-{r}.timeline.json"
    run_env = {**env, STAMPS_ENV: str(stamps)}
    if name == "bare_trainer":
        argv = python_module("bench.plain_loop", "tinyimagenet", "--stage", "quick", "--bare-trainer", "--eval-each-epoch",
                             "--storage", str(work / f"bare-{r}"), *sets(p["overrides"]))
        run_env[TIMELINE_ENV] = str(timeline)
    else:
        argv = raylab_argv("train", "tinyimagenet", "--stage", "quick", "--workers", "0" if name == "raylab_w0" else "1",
                           "--storage", str(work / "runs"), "--name", f"{name}-{r}", *sets(p["overrides"]))
        if name != "raylab_w0":
            run_env[TIMELINE_ENV] = str(timeline)
        if name == "ray_defaults":
            run_env.update(ray_defaults_env())
    run = run_command(argv, work / f"{name}-{r}.log", run_env)
    marks = markers(read_stamps(stamps), timeline, run.started, run.ended)
    if "first_loss" not in marks:
        raise RuntimeError(f"{name}: no first step was stamped ({stamps})")
    figures = {"first_step_s": marks["first_loss"], "command_s": marks["cmd_end"] - marks.get("timeline_s", 0.0)}
    figures.update({f"phase: {k}": v for k, v in phases(name, marks).items()})
    return figures


def measure(smoke: bool, rounds: int | None = None) -> Report:
    p = dict(SMOKE if smoke else FULL)
    p["rounds"] = rounds or p["rounds"]
    work = work_dir(NAME)
    env = {"OMP_NUM_THREADS": str(p["threads"]), "RAYLAB_CACHE_DIR": str(work / "cache")}
    try:
        if not smoke:  # smoke figures mean nothing; the first run generates the data
            warm_up("tinyimagenet", "quick", p["overrides"], work, env)
        raw = interleave({s: (lambda r, s=s: side(p, work, s, r, env)) for s in p["sides"]}, p["rounds"])
    finally:
        clean_work_dir(work)
    stats = summarise(raw)
    report = Report(NAME, "Startup: command to first step and the whole quick stage (TinyImageNet)",
                    "the quick stage through Ray within 2x of --workers 0, and ahead of a bare TorchTrainer",
                    " ".join(__doc__.split("\n\n")[2].split()), {k: v for k, v in p.items()}, smoke, plot=_plot, figsize=(12, 5))
    sides = list(p["sides"])
    report.headers = ["", *[LABELS[s] for s in sides]]
    report.rows.append(["command -> first step, s", *[stats[s]["first_step_s"].text(1) for s in sides]])
    report.rows.append(["whole quick stage, s", *[stats[s]["command_s"].text(1) for s in sides]])
    for label in ROWS:
        cells = [stats[s][f"phase: {label}"].text(1) if f"phase: {label}" in stats[s] else "" for s in sides]
        if any(cells):
            report.rows.append([f"  {label}", *cells])
    report.figures = {s: dict(stats[s]) for s in sides}
    w0, w1 = stats["raylab_w0"]["command_s"].median, stats["raylab_w1"]["command_s"].median
    report.figures["ray_over_in_process"] = w1 / w0
    report.notes.append(f"quick stage through Ray / in-process: {w1 / w0:.2f}x (goal <= 2x)")
    if "bare_trainer" in stats:
        bare = stats["bare_trainer"]
        report.figures["first_step_vs_bare_s"] = stats["raylab_w1"]["first_step_s"].median - bare["first_step_s"].median
        report.figures["quick_stage_vs_bare_s"] = w1 - bare["command_s"].median
        report.notes.append(f"raylab --workers 1 vs a bare TorchTrainer: first step {report.figures['first_step_vs_bare_s']:+.1f} s, "
                            f"whole stage {report.figures['quick_stage_vs_bare_s']:+.1f} s (negative: raylab is ahead)")
    if "ray_defaults" in stats:
        saved = stats["ray_defaults"]["command_s"].median - w1
        report.figures["settings_saved_s"] = saved
        report.notes.append(f"raylab's settings for the embedded Ray save {saved:.1f} s of the quick stage vs Ray's defaults")
    report.rounds = raw
    if smoke:
        report.notes.append("smoke: the quick stage is cut to a few steps; Ray's defaults and the bare TorchTrainer are not run")
    return report


def _plot(ax: Any, report: Report) -> None:
    import matplotlib.cm as cm

    sides = list(report.params["sides"])
    colours = {label: cm.tab20.colors[j % 20] for j, label in enumerate(ROWS)}
    seen: set[str] = set()
    for i, s in enumerate(sides):
        y, left = len(sides) - 1 - i, 0.0
        for label in ROWS:
            stat = report.figures[s].get(f"phase: {label}")
            if stat is None:
                continue
            ax.barh(y, stat.median, left=left, color=colours[label], label=None if label in seen else label)
            seen.add(label)
            left += stat.median
        first = report.figures[s]["first_step_s"].median
        ax.plot([first, first], [y - 0.4, y + 0.4], color="k", lw=2)
    ax.set_yticks(range(len(sides))[::-1], [LABELS[s] for s in sides], fontsize=8)
    ax.set_xlabel("seconds from the command (black tick: first step); medians of the phases")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
