"""Tune overhead: an 8-trial sweep's wall time vs the sum of its trials' times on the same resources.

The sweep runs through raylab's Python API (`raylab.sweep.plan_sweep` +
`run_sweep`) in a fresh process (`python -m bench.tune_overhead PARAMS OUT`):
8 trials of a tiny TinyImageNet model, 1 Ray worker each, lr sampled at
random, no early stopping (fifo), so every trial does the same work and
their sum is well defined. As many trials run at once as the embedded Ray's
CPUs fit (`concurrency`). Figures, each from this one run:

- sweep wall: `run_sweep` start to end by the process's clock; also without
  the embedded Ray's start (a fixed cost, paid once per sweep);
- a trial's time: its Tune trial actor in Ray's task timeline, from its
  `__init__` (or, in an actor a fifo sweep reuses, the `reset` that hands it
  the trial) to the end of its last `train` call (Tune calls a function
  trainable's `train` once per reported result), which holds Ray Train's
  start-up for the trial, the training and the teardown; and its training alone: the first stamp of the trial's worker
  (task build) to its last (the final evaluation), from `bench.stamps`;
- Tune overhead = sweep wall (after Ray start) x concurrency / sum of trial
  times - 1: what Tune's scheduling, trial actors and bookkeeping add (the
  goal: <= 10%); and the same against the sum of training times: everything
  that is not training, Ray Train's per-trial start-up included.

Rounds repeat the whole sweep; medians and min..max over rounds.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.harness import Report, Stats, bars, clean_work_dir, interleave, python_module, run_command, summarise, work_dir
from bench.stamps import STAMPS_ENV, read_stamps

NAME = "tune"
TRIAL_SETS = {"family": "baseline", "width": 4, "image_size": 16, "synthetic_train_per_class": 20, "synthetic_val_per_class": 2,
              "per_worker_batch_size": 8, "max_epochs": 1, "eval_every_steps": 10, "num_samples": 0, "log_every_steps": 5}
FULL = dict(trials=8, steps=24, rounds=2, threads=1)


def sweep_child(params_path: str, out_path: str) -> None:
    """The measured process: one sweep, stamps on every trial's worker, Ray's timeline at the end."""
    from bench.stamps import install, ray_worker_env, stamp, _stamp_calls

    os.environ.update(ray_worker_env())
    install()
    import raylab.ray_backend
    from raylab.config import LaunchConfig
    from raylab.sweep import plan_sweep, run_sweep

    p = json.loads(Path(params_path).read_text())
    _stamp_calls(raylab.ray_backend, "ensure_ray", "ray_start")
    plan = plan_sweep("tinyimagenet", "quick", {"space": {"lr": "loguniform(1e-4, 1e-2)"}, "samples": p["trials"],
                                                "scheduler": "fifo", "search": "random", "metric": "val_loss"},
                      LaunchConfig(num_workers=1, storage_path=p["storage"], name="sweep"),
                      overrides={**TRIAL_SETS, "max_steps": p["steps"]})
    stamp("sweep_start")
    result = run_sweep(plan)
    stamp("sweep_end")
    import ray

    ray.timeline(p["timeline"])
    Path(out_path).write_text(json.dumps({"wall_s": result.wall_s, "trials": [t.name for t in result.trials],
                                          "states": [t.state for t in result.trials]}))


def trial_times(stamps: list[dict[str, Any]], timeline: list[dict[str, Any]]) -> tuple[list[tuple[float, float]], list[float]]:
    """((start, end) of each trial actor in Ray's timeline, each trial worker's build-to-last-stamp span)."""
    # Tune calls a function trainable's `train` once per reported result; a fifo sweep reuses a
    # finished trial's actor for the next trial (`reset`). A trial is its actor's span from
    # `__init__` (or the `reset` that hands it the trial) to the end of its last `train` call.
    events: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for e in timeline:
        cat = str(e.get("cat", ""))
        if e.get("ph") == "X" and cat.startswith("task::ImplicitFunc."):
            method = cat.rsplit(".", 1)[1]
            if method in ("__init__", "reset", "train"):
                events[e["tid"]].append((e["ts"] / 1e6, (e["ts"] + e.get("dur", 0)) / 1e6, method))
    spans: list[tuple[float, float]] = []
    for tid_events in events.values():
        current: list[float] = []
        for start, end, method in sorted(tid_events):
            if method in ("__init__", "reset") and current:
                spans.append((min(current), max(current)))
                current = []
            current += [start, end]
        if current:
            spans.append((min(current), max(current)))
    by_pid: dict[int, list[float]] = defaultdict(list)
    for s in stamps:
        if s.get("rank") == 0:
            by_pid[s["pid"]].append(s["t"])
    training = [max(ts) - min(ts) for ts in by_pid.values()]
    return spans, training


def sweep(p: dict[str, Any], work: Path, r: int, env: dict[str, str]) -> dict[str, float]:
    stamps, timeline, out = work / f"sweep-{r}.jsonl", work / f"sweep-{r}.timeline.json", work / f"sweep-{r}.json"
    params = work / f"params-{r}.json"
    params.write_text(json.dumps({**p, "storage": str(work / f"runs-{r}"), "timeline": str(timeline)}))
    run_command(python_module("bench.tune_overhead", str(params), str(out)), work / f"sweep-{r}.log", {**env, STAMPS_ENV: str(stamps)},
                timeout_s=3600)
    found = read_stamps(stamps)
    at = {s["event"]: s["t"] for s in found if s["event"] in ("sweep_start", "sweep_end", "ray_start_start", "ray_start_end")}
    spans, training = trial_times(found, json.loads(timeline.read_text()))
    result = json.loads(out.read_text())
    if len(spans) != p["trials"] or len(training) != p["trials"] or set(result["states"]) != {"finished"}:
        raise RuntimeError(f"sweep {r}: {len(spans)} trial spans, {len(training)} stamped trial workers, states {result['states']} "
                           f"for {p['trials']} trials; see {work / f'sweep-{r}.log'}")
    wall = at["sweep_end"] - at["sweep_start"]
    ray_start = at.get("ray_start_end", 0) - at.get("ray_start_start", 0)
    concurrency = min(p["concurrency"], p["trials"])
    after_ray = wall - ray_start
    trials = sum(b - a for a, b in spans)
    # Where Tune's share goes: before the first trial actor starts (after Ray's start), after the
    # last one ends, and the rest: the slots' idle time between one trial and the next.
    before = min(a for a, _ in spans) - at.get("ray_start_end", at["sweep_start"])
    after = at["sweep_end"] - max(b for _, b in spans)
    return {"sweep_wall_s": wall, "ray_start_s": ray_start, "sum_trial_s": trials, "sum_training_s": sum(training),
            "mean_trial_s": trials / len(spans), "mean_training_s": sum(training) / len(training),
            "before_first_trial_s": before, "after_last_trial_s": after,
            "idle_slot_s_between_trials": after_ray * concurrency - trials - (before + after) * concurrency,
            "tune_overhead_pct": 100 * (after_ray * concurrency / trials - 1),
            "non_training_overhead_pct": 100 * (wall * concurrency / sum(training) - 1)}


def measure(smoke: bool, rounds: int | None = None) -> Report:
    p = dict(FULL)
    if smoke:  # a sweep starts Ray with its dashboard and a Train run per trial: minutes, even for 2 tiny trials
        report = Report(NAME, "Tune overhead (not run in smoke mode)", "sweep wall time within 10% of the sum of its trials' times / "
                        "concurrency", "see bench/tune_overhead.py", p, smoke)
        report.notes.append("not run with --smoke: `python -m bench --only tune` runs it")
        return report
    p["rounds"] = rounds or p["rounds"]
    p["concurrency"] = os.cpu_count() or 1  # raylab runs as many 1-worker trials at once as the CPUs fit
    work = work_dir(NAME)
    env = {"OMP_NUM_THREADS": str(p["threads"]), "RAYLAB_CACHE_DIR": str(work / "cache")}
    try:
        raw = interleave({"sweep": lambda r: sweep(p, work, r, env)}, p["rounds"])
    finally:
        clean_work_dir(work)
    st = summarise(raw)["sweep"]
    report = Report(NAME, f"Tune overhead: a {p['trials']}-trial sweep vs the sum of its trials",
                    "sweep wall time within 10% of the sum of its trials' times / concurrency",
                    " ".join(__doc__.split("\n\n")[1].split()), p, smoke, plot=_plot)
    report.headers = ["figure", "seconds or %"]
    report.rows = [
        ["sweep wall time, s", st["sweep_wall_s"].text(1)],
        ["  of which embedded Ray start, s", st["ray_start_s"].text(1)],
        ["sum of trial times (Tune's trial function), s", st["sum_trial_s"].text(1)],
        ["  mean per trial, s", st["mean_trial_s"].text(1)],
        ["sum of training times (build to last evaluation), s", st["sum_training_s"].text(1)],
        ["  mean per trial, s", st["mean_training_s"].text(1)],
        ["Tune's share: before the first trial starts (after Ray's start), s", st["before_first_trial_s"].text(1)],
        ["  after the last trial ends, s", st["after_last_trial_s"].text(1)],
        [f"  idle slot time between trials (all {min(p['concurrency'], p['trials'])} slots), s", st["idle_slot_s_between_trials"].text(1)],
        [f"Tune overhead: wall after Ray start x {min(p['concurrency'], p['trials'])} / sum of trials - 1", f"{st['tune_overhead_pct'].text(1)}%"],
        [f"not training: wall x {min(p['concurrency'], p['trials'])} / sum of training - 1", f"{st['non_training_overhead_pct'].text(1)}%"],
    ]
    report.figures = dict(st)
    report.rounds = raw
    report.notes.append(f"{p['trials']} trials x {p['steps']} steps (TinyImageNet baseline width 4, 16 px, batch 8, an evaluation "
                        f"every 10 steps), 1 worker each, {min(p['concurrency'], p['trials'])} at once, fifo; {p['rounds']} round(s)")
    return report


def _plot(ax: Any, report: Report) -> None:
    f = report.figures
    n = min(report.params["concurrency"], report.params["trials"])
    ideal = lambda s: Stats(s.median / n, s.low / n, s.high / n, s.n)  # noqa: E731
    bars(ax, ["sweep wall time", f"sum of trial times / {n}", f"sum of training times / {n}"],
         [f["sweep_wall_s"], ideal(f["sum_trial_s"]), ideal(f["sum_training_s"])], "seconds",
         ["tab:blue", "tab:orange", "tab:green"])


if __name__ == "__main__":
    sweep_child(sys.argv[1], sys.argv[2])
