"""Resume cost: resuming at an early vs a late batch of a long epoch should cost the same.

raylab's data order is a pure function of (seed, epoch, rank, world size), so a
resumed run slices the epoch's plan at the saved batch and reads none of the
batches it skips. To check, one TinyImageNet quick-stage run trains into a
long epoch (`batches` batches) with a checkpoint every `early` batches; for
each round, copies of its run folder keep only the checkpoint at batch
`early` or at batch `late`, and `raylab train --workers 0` resumes each copy
for a few steps. Timed from outside, by this process's clock and the stamps
of `bench.stamps`: command to the first resumed step, and the task's build
end to the first resumed step (what resuming itself costs: finding and
verifying the checkpoint, loading it, slicing the plan, the first batch).
Early and late resumes run interleaved; in-process, because Ray's start-up
would add its own noise to the same code path.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.harness import (Report, bars, clean_work_dir, interleave, ratio_pct, raylab_argv, run_command, sets, summarise,
                           work_dir)
from bench.stamps import STAMPS_ENV, first, loss_clock, read_stamps

NAME = "resume"
FULL = dict(per_class=1000, batch=32, early=10, late=300, rounds=5, threads=1)
SMOKE = dict(per_class=12, batch=8, early=2, late=8, rounds=1, threads=1)


def overrides(p: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"synthetic_train_per_class": p["per_class"], "synthetic_val_per_class": 2, "per_worker_batch_size": p["batch"],
            "max_epochs": 1, "eval_every_steps": 0, "num_samples": 0, **extra}


def keep_only(source: Path, target: Path, batch: int) -> None:
    """Copy a run folder, keeping only the checkpoint taken at `batch` of epoch 0."""
    shutil.copytree(source, target)
    for folder in target.glob("checkpoint_*"):
        if f"_batch{batch:06d}_" not in folder.name or not folder.name.startswith("checkpoint_epoch0000"):
            shutil.rmtree(folder)


def resume(p: dict[str, Any], work: Path, source: Path, at: int, r: int, env: dict[str, str]) -> dict[str, float]:
    name = f"resume-{at}-{r}"
    keep_only(source, work / "runs" / name, at)
    stamps = work / f"{name}.jsonl"
    argv = raylab_argv("train", "tinyimagenet", "--stage", "quick", "--workers", "0", "--storage", str(work / "runs"),
                       "--name", name, *sets(overrides(p, max_steps=at + 2, checkpoint_every_batches=0)))
    run = run_command(argv, work / f"{name}.log", {**env, STAMPS_ENV: str(stamps)})
    found = read_stamps(stamps)
    first_loss, build_end = first(found, "first_loss"), first(found, "build_end")
    if first_loss is None or build_end is None:
        raise RuntimeError(f"{name}: the resumed run was not stamped ({stamps})")
    trained = len(loss_clock(found))
    if trained != 2:  # a run that did not resume would train all at + 2 steps
        raise RuntimeError(f"{name}: expected 2 resumed steps after batch {at}, the run trained {trained}")
    return {"first_step_s": first_loss - run.started, "resume_to_first_step_s": first_loss - build_end, "command_s": run.wall_s}


def measure(smoke: bool, rounds: int | None = None) -> Report:
    p = dict(SMOKE if smoke else FULL)
    p["rounds"] = rounds or p["rounds"]
    batches = 10 * p["per_class"] // p["batch"]
    if p["late"] + 2 >= batches:
        raise ValueError(f"late batch {p['late']} + 2 steps must stay inside the {batches}-batch epoch")
    work = work_dir(NAME)
    env = {"OMP_NUM_THREADS": str(p["threads"]), "RAYLAB_CACHE_DIR": str(work / "cache")}
    try:
        # The source run: checkpoints every `early` batches up to `late` (both are multiples of `early`).
        argv = raylab_argv("train", "tinyimagenet", "--stage", "quick", "--workers", "0", "--storage", str(work / "runs"),
                           "--name", "source", *sets(overrides(p, max_steps=p["late"], checkpoint_every_batches=p["early"],
                                                                keep_checkpoints=None)))
        run_command(argv, work / "source.log", env)
        source = work / "runs" / "source"
        raw = interleave({f"batch {at}": (lambda r, at=at: resume(p, work, source, at, r, env)) for at in (p["early"], p["late"])},
                         p["rounds"])
    finally:
        clean_work_dir(work)
    stats = summarise(raw)
    early, late = f"batch {p['early']}", f"batch {p['late']}"
    report = Report(NAME, f"Resume cost: early (batch {p['early']}) vs late (batch {p['late']}) of a {batches}-batch epoch",
                    "flat: resuming late costs what resuming early costs", " ".join(__doc__.split("\n\n")[1].split()), p, smoke,
                    plot=_plot)
    report.headers = ["resume at", "command -> first step, s", "build end -> first step, s", "whole command, s"]
    for key in (early, late):
        st = stats[key]
        report.rows.append([key, st["first_step_s"].text(2), st["resume_to_first_step_s"].text(3), st["command_s"].text(1)])
    report.figures = {k: dict(v) for k, v in stats.items()}
    report.figures["late_vs_early_pct"] = ratio_pct(stats[late]["resume_to_first_step_s"].median,
                                                    stats[early]["resume_to_first_step_s"].median)
    report.figures["late_minus_early_s"] = stats[late]["first_step_s"].median - stats[early]["first_step_s"].median
    report.rounds = raw
    report.notes.append(f"late vs early, build end -> first step: {report.figures['late_vs_early_pct']:+.1f}% "
                        f"({report.figures['late_minus_early_s']:+.2f} s command -> first step); "
                        f"{p['rounds']} interleaved round(s), batch {p['batch']}")
    return report


def _plot(ax: Any, report: Report) -> None:
    keys = [k for k in report.figures if k.startswith("batch ")]
    bars(ax, [f"resume at {k}" for k in keys], [report.figures[k]["resume_to_first_step_s"] for k in keys],
         "seconds from the task's build to the first resumed step (lower is better)")
