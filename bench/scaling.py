"""Scaling in work: step time as batch and model size grow (quick -> medium -> full), TinyImageNet and DiT.

For each model and stage, `raylab train --workers 0` (in-process) trains the
stage's own model at its own batch size for a handful of steps (the data is
synthetic and cut to what those steps read; no sampling, one evaluation at the
end on a tiny validation split; `data_loader_workers=0`, so the step is
compute, not process start-up). The step time is the median interval between
the starts of consecutive steps after the warm-up (`bench.stamps`).

The work of a step is counted, not guessed: a child process builds the same
task and counts the floating-point operations of one micro-batch's forward and
backward with `torch.utils.flop_counter.FlopCounterMode`. Time per GFLOP
that stays flat means step time grows linearly with the work; where it moves,
the table says by how much, relative to the quick stage.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.harness import Report, clean_work_dir, python_module, raylab_argv, run_command, sets, work_dir
from bench.stamps import STAMPS_ENV, loss_clock, read_stamps

NAME = "scaling"
STAGES = ("quick", "medium", "full")
# Per model: its stage batch sizes and the synthetic-data fields that keep each run to the steps it takes.
DATA = {
    "tinyimagenet": lambda classes, need: {"synthetic_train_per_class": max(1, -(-need // classes)), "synthetic_val_per_class": 1},
    "dit": lambda classes, need: {"synthetic_per_class": max(3, -(-need * 10 // 9 // classes) + 1)},
}
CLASSES = {("tinyimagenet", "quick"): 10, ("tinyimagenet", "medium"): 50, ("tinyimagenet", "full"): 200,
           ("dit", "quick"): 10, ("dit", "medium"): 10, ("dit", "full"): 10}
FULL = dict(models=("tinyimagenet", "dit"), stages=STAGES, steps=8, warmup=2, full_steps=3, full_warmup=1, threads=1)
SMOKE = dict(models=("tinyimagenet",), stages=("quick",), steps=4, warmup=1, full_steps=4, full_warmup=1, threads=1)


def stage_overrides(model: str, stage: str, steps: int) -> dict[str, Any]:
    from raylab.launch import prepare

    _, cfg = prepare(model, stage)
    need = cfg.per_worker_batch_size * cfg.grad_accum_steps * (steps + 1)
    return {**DATA[model](CLASSES[(model, stage)], need), "max_steps": steps, "max_epochs": 1, "num_samples": 0,
            "eval_every_steps": 0, "checkpoint_every_batches": 0, "data_loader_workers": 0, "eval_batch_size": 64}


def count_flops(model: str, stage: str, overrides: dict[str, Any]) -> dict[str, float]:
    """(child process) FLOPs of one micro-batch's forward + backward, and the parameter count."""
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    from raylab.launch import prepare
    from raylab.task import TaskContext

    task, cfg = prepare(model, stage, overrides)
    torch.manual_seed(0)
    parts = task.build(cfg, TaskContext())
    batch = next(iter(DataLoader(parts.train_data, batch_size=cfg.per_worker_batch_size, collate_fn=parts.collate_fn)))
    parts.model.train()
    with FlopCounterMode(display=False) as counter:
        loss, _ = task.loss(parts.model, batch)
        loss.backward()
    return {"gflops_per_step": counter.get_total_flops() * cfg.grad_accum_steps / 1e9,
            "parameters": float(sum(p.numel() for p in parts.model.parameters())),
            "batch": float(cfg.per_worker_batch_size * cfg.grad_accum_steps)}


def one(p: dict[str, Any], work: Path, model: str, stage: str, env: dict[str, str]) -> dict[str, float]:
    steps, warmup = (p["full_steps"], p["full_warmup"]) if stage == "full" else (p["steps"], p["warmup"])
    values = stage_overrides(model, stage, steps)
    stamps = work / f"{model}-{stage}.jsonl"
    argv = raylab_argv("train", model, "--stage", stage, "--workers", "0", "--storage", str(work / "runs"),
                       "--name", f"{model}-{stage}", *sets(values))
    run_command(argv, work / f"{model}-{stage}.log", {**env, STAMPS_ENV: str(stamps)}, timeout_s=3600)
    clock = loss_clock(read_stamps(stamps))
    intervals = [b - a for a, b in zip(clock[warmup:], clock[warmup + 1:])]
    if not intervals:
        raise RuntimeError(f"{model} {stage}: {len(clock)} stamped steps, too few to time")
    out = work / f"{model}-{stage}.flops.json"
    run_command(python_module("bench.scaling", model, stage, json.dumps(values), str(out)), work / f"{model}-{stage}.flops.log", env)
    flops = json.loads(out.read_text())
    step_s = statistics.median(intervals)
    return {**flops, "step_s": step_s, "steps_timed": float(len(intervals)), "low_s": min(intervals), "high_s": max(intervals),
            "s_per_gflop": step_s / flops["gflops_per_step"] if flops["gflops_per_step"] else float("nan")}


def measure(smoke: bool, rounds: int | None = None) -> Report:
    p = dict(SMOKE if smoke else FULL)
    work = work_dir(NAME)
    env = {"OMP_NUM_THREADS": str(p["threads"]), "RAYLAB_CACHE_DIR": str(work / "cache")}
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for model in p["models"]:
            results[model] = {}
            for stage in p["stages"]:
                results[model][stage] = r = one(p, work, model, stage, env)
                print(f"  {model} {stage}: {r['step_s']:.3f} s/step, {r['gflops_per_step']:.2f} GFLOP/step", flush=True)
    finally:
        clean_work_dir(work)
    report = Report(NAME, "Scaling in work: step time vs FLOPs per step, quick -> medium -> full (in-process)",
                    "step time grows linearly with the work of a step; say where it does not",
                    " ".join(__doc__.split("\n\n")[1].split()), p, smoke, plot=_plot)
    report.headers = ["model", "stage", "batch", "parameters", "GFLOP/step", "s/step (min..max)", "ms per GFLOP", "vs quick"]
    for model, stages in results.items():
        base = stages[p["stages"][0]]["s_per_gflop"]
        for stage, r in stages.items():
            report.rows.append([model, stage, f"{r['batch']:.0f}", f"{r['parameters']:,.0f}", f"{r['gflops_per_step']:.2f}",
                                f"{r['step_s']:.3f} ({r['low_s']:.3f}..{r['high_s']:.3f})", f"{1000 * r['s_per_gflop']:.1f}",
                                f"{r['s_per_gflop'] / base:.2f}x"])
    report.figures = results
    report.notes.append(f"{p['steps'] - p['warmup'] - 1} step intervals timed after {p['warmup']} warm-up steps "
                        f"({p['full_steps'] - p['full_warmup'] - 1} after {p['full_warmup']} for the full stage), "
                        f"{p['threads']} torch thread(s); one pass (no rounds): the min..max of the step intervals is the spread")
    if smoke:
        report.notes.append("smoke: TinyImageNet quick only")
    return report


def _plot(ax: Any, report: Report) -> None:
    for model, stages in report.figures.items():
        xs = [r["gflops_per_step"] for r in stages.values()]
        ys = [r["step_s"] for r in stages.values()]
        ax.loglog(xs, ys, "o-", label=model)
        for stage, x, y in zip(stages, xs, ys):
            ax.annotate(stage, (x, y), fontsize=7, textcoords="offset points", xytext=(4, -8))
        k = ys[0] / xs[0]
        ax.loglog([min(xs), max(xs)], [k * min(xs), k * max(xs)], ":", color="0.5")
    ax.set_xlabel("GFLOP per step (forward + backward)")
    ax.set_ylabel("seconds per step")
    ax.legend(fontsize=8, title="dotted: linear from quick", title_fontsize=7)


if __name__ == "__main__":
    result = count_flops(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    Path(sys.argv[4]).write_text(json.dumps(result))
