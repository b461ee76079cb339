"""Step throughput, timed from outside: `raylab train` (in-process, 1 and 2 Ray workers) vs a plain PyTorch loop.

How it is timed. Every side is a fresh command (`python -m bench.plain_loop`,
`python -m bench.stamps train ...` = `raylab train ...`) training the same
TinyImageNet task, stage quick, on the same synthetic JPEG folder, with the
same batch size, optimizer and torch threads (`OMP_NUM_THREADS`, inherited by
Ray's workers). The task is wrapped (`bench.stamps`) so that the start of
every loss call -- the step boundary -- is stamped with `time.perf_counter()`
in every process alike. Throughput is the window from the start of step
`warmup + 1` to the start of the last step: every step in it is a whole step
of each loop, including whatever the loop does between steps (raylab's
progress updates, TensorBoard scalars, metrics, health checks, Ray's report
machinery). Startup and the final evaluation/checkpoint fall outside the
window, and there is no evaluation or checkpoint inside it on either side
(`eval_every_steps=0`, `checkpoint_every_batches=0`, no sampling, and the
window ends before the first epoch does).

Beside wall time, the same stamps carry the training process's CPU time
(`time.process_time()`, all its threads): CPU ms per step is what the loop
itself costs, and is far less sensitive than wall time to how much of the
machine other work takes. On Ray it leaves out the controller's and the
progress queue's processes (their share is in the wall time).

Sides run interleaved (A B C D, D C B A, ...); figures are medians over rounds
with min..max. With 2 workers each worker takes the same per-worker batch, so
samples/s doubles at perfect scaling -- on a 2-core machine also running other
people's work, it cannot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import (Report, bars, clean_work_dir, interleave, python_module, ratio_pct, ray_defaults_env,
                           raylab_argv, run_command, sets, summarise, warm_up, work_dir)
from bench.stamps import STAMPS_ENV, loss_clock, read_stamps

NAME = "throughput"
FULL = dict(per_class=1040, batch=32, warmup=10, steps=160, rounds=5, threads=1,
            sides=("plain", "raylab_w0", "raylab_w1", "raylab_w1_ray_defaults", "raylab_w2"))
SMOKE = dict(per_class=8, batch=8, warmup=2, steps=8, rounds=1, threads=1, sides=("plain", "raylab_w0"))
LABELS = {"plain": "plain PyTorch loop", "raylab_w0": "raylab --workers 0 (in-process)",
          "raylab_w1": "raylab --workers 1 (Ray Train)", "raylab_w2": "raylab --workers 2 (Ray Train)",
          "raylab_w1_ray_defaults": "raylab --workers 1, Ray's defaults"}


def overrides(p: dict[str, Any]) -> dict[str, Any]:
    return {"synthetic_train_per_class": p["per_class"], "synthetic_val_per_class": 2, "per_worker_batch_size": p["batch"],
            "max_steps": p["steps"], "max_epochs": 1, "eval_every_steps": 0, "checkpoint_every_batches": 0, "num_samples": 0,
            "keep_checkpoints": 1}


def side(p: dict[str, Any], work: Path, name: str, r: int, env: dict[str, str]) -> dict[str, float]:
    stamps = work / f"{name}-{r}.jsonl"
    args = sets(overrides(p))
    if name == "plain":
        argv = python_module("bench.plain_loop", "tinyimagenet", "--stage", "quick", *args)
    else:
        workers = name.split("_")[1][1]
        argv = raylab_argv("train", "tinyimagenet", "--stage", "quick", "--workers", workers, "--storage", str(work / "runs"),
                           "--name", f"{name}-{r}", *args)
    extra = ray_defaults_env() if name.endswith("ray_defaults") else {}
    run = run_command(argv, work / f"{name}-{r}.log", {**env, **extra, STAMPS_ENV: str(stamps)})
    found = read_stamps(stamps)
    clock, cpu = loss_clock(found), loss_clock(found, clock="cpus")
    if len(clock) != p["steps"] or len(cpu) != p["steps"]:
        raise RuntimeError(f"{name}: expected {p['steps']} stamped steps, found {len(clock)} in {stamps}")
    intervals = p["steps"] - p["warmup"] - 1
    window = clock[-1] - clock[p["warmup"]]
    workers = max(1, int(name.split("_")[1][1])) if name.startswith("raylab") else 1
    return {"ms_per_step": 1000 * window / intervals, "samples_per_s": intervals * p["batch"] * workers / window,
            "cpu_ms_per_step": 1000 * (cpu[-1] - cpu[p["warmup"]]) / intervals, "command_s": run.wall_s}


def measure(smoke: bool, rounds: int | None = None) -> Report:
    p = dict(SMOKE if smoke else FULL)
    p["rounds"] = rounds or p["rounds"]
    work = work_dir(NAME)
    env = {"OMP_NUM_THREADS": str(p["threads"]), "RAYLAB_CACHE_DIR": str(work / "cache")}
    try:
        if not smoke:  # smoke figures mean nothing; the first run generates the data
            warm_up("tinyimagenet", "quick", overrides(p), work, env)
        raw = interleave({s: (lambda r, s=s: side(p, work, s, r, env)) for s in p["sides"]}, p["rounds"])
    finally:
        clean_work_dir(work)
    stats = summarise(raw)
    base = stats["plain"]["samples_per_s"].median
    report = Report(NAME, "Step throughput from outside: raylab vs a plain PyTorch loop (TinyImageNet quick model)",
                    "raylab --workers 1 within 2% of the plain loop's samples/s", __doc__.split("\n\n")[1].replace("\n", " "),
                    p, smoke, plot=_plot)
    cpu_base = stats["plain"]["cpu_ms_per_step"].median
    report.headers = ["side", "ms/step", "samples/s", "slowdown vs plain", "CPU ms/step", "CPU vs plain", "command s"]
    for s in p["sides"]:
        st = stats[s]
        report.rows.append([LABELS[s], st["ms_per_step"].text(1), st["samples_per_s"].text(1),
                            "" if s == "plain" else f"{-ratio_pct(st['samples_per_s'].median, base):+.1f}%",
                            st["cpu_ms_per_step"].text(1),
                            "" if s == "plain" else f"{ratio_pct(st['cpu_ms_per_step'].median, cpu_base):+.1f}%",
                            st["command_s"].text(1)])
    report.figures = {s: {k: v for k, v in stats[s].items()} for s in p["sides"]}
    report.figures["slowdown_pct_vs_plain"] = {s: -ratio_pct(stats[s]["samples_per_s"].median, base) for s in p["sides"] if s != "plain"}
    report.figures["cpu_pct_vs_plain"] = {s: ratio_pct(stats[s]["cpu_ms_per_step"].median, cpu_base) for s in p["sides"] if s != "plain"}
    report.rounds = raw
    report.notes.append(f"{p['steps'] - p['warmup'] - 1} steps timed after {p['warmup']} warm-up steps, batch {p['batch']} "
                        f"per worker, {p['threads']} torch thread(s) per process, {p['rounds']} interleaved round(s)")
    if "raylab_w1" in stats and "raylab_w2" in stats:
        speedup = stats["raylab_w2"]["samples_per_s"].median / stats["raylab_w1"]["samples_per_s"].median
        report.figures["w2_over_w1"] = speedup
        report.notes.append(f"2 workers vs 1: {speedup:.2f}x the samples/s (2.0x would be perfect scaling; "
                            "this machine has 2 cores shared with other work)")
    return report


def _plot(ax: Any, report: Report) -> None:
    sides = list(report.params["sides"])
    bars(ax, [LABELS[s] for s in sides], [report.figures[s]["samples_per_s"] for s in sides], "samples/s (higher is better)",
         ["0.5" if s == "plain" else "tab:blue" for s in sides])
