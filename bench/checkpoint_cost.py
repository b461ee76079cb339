"""What checkpoints cost: throughput with a checkpoint every N batches vs none, and the
time to resume early vs late in a long epoch (seed 004's trade-offs, measured on raylab).

1. Throughput: the same TinyImageNet run of S steps (all inside one epoch, so no
   epoch-end evaluation) with `checkpoint_every_batches=N` and with 0 (only the
   final checkpoint, which both sides write). Rounds alternate A, B, A, B so drift
   of the machine hits both; the figure is the median of the loop's own clock
   (`time_s` of the last report). `--workers 1` measures through Ray Train, where
   every report also waits for the controller's next poll
   (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2 s).
2. Resume: checkpoints at an early and a late batch of the epoch, then the time from
   the resumed `train()` call to its first trained step. raylab skips the batches an
   epoch already trained by slicing the epoch's plan, without reading them, so the
   two should match.

    python bench/checkpoint_cost.py                  # full measurement, in-process
    python bench/checkpoint_cost.py --workers 1      # through Ray Train
    python bench/checkpoint_cost.py --smoke          # seconds

Prints a table and writes JSON (default bench/results/checkpoint_cost[_ray].json).
Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from models.tinyimagenet.data import write_synthetic
from raylab.config import LaunchConfig
from raylab.launch import train

FULL = dict(classes=10, per_class=1000, width=8, image_size=32, batch=32, steps=300, every=100, early=10, late=290, rounds=3)
SMOKE = dict(classes=4, per_class=40, width=4, image_size=16, batch=8, steps=16, every=5, early=2, late=14, rounds=1)


def overrides(p: dict, data: Path, **extra) -> dict:
    return {"data_dir": str(data), "family": "residual", "width": p["width"], "image_size": p["image_size"],
            "per_worker_batch_size": p["batch"], "max_epochs": 1, "num_samples": 0, "log_every_steps": 10**6,
            "eval_batch_size": 256, "keep_checkpoints": None, **extra}


def timed_run(p: dict, data: Path, storage: Path, name: str, workers: int, every: int) -> float:
    summary = train("tinyimagenet", "quick", overrides(p, data, max_steps=p["steps"], checkpoint_every_batches=every),
                    LaunchConfig(num_workers=workers, storage_path=str(storage), name=name))
    return float(summary.metrics.iloc[-1]["time_s"])


def resume_time(p: dict, data: Path, storage: Path, name: str, workers: int, at: int) -> float:
    launch = LaunchConfig(num_workers=workers, storage_path=str(storage), name=name)
    train("tinyimagenet", "quick", overrides(p, data, max_steps=at, checkpoint_every_batches=at), launch)
    first_step: list[float] = []

    def watch(update: dict) -> None:
        if not first_step and update.get("global_step", 0) > at:
            first_step.append(time.perf_counter())

    started = time.perf_counter()
    train("tinyimagenet", "quick", overrides(p, data, max_steps=at + 2, log_every_steps=1), launch, on_progress=watch)
    return first_step[0] - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--workers", type=int, default=0, help="0: in-process (default); 1: through Ray Train")
    parser.add_argument("--rounds", type=int, help="A/B rounds (default 3, smoke 1)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    p = dict(SMOKE if args.smoke else FULL)
    if args.rounds:
        p["rounds"] = args.rounds
    out = args.out or Path(__file__).parent / "results" / f"checkpoint_cost{'_ray' if args.workers else ''}.json"
    work = Path(tempfile.mkdtemp(prefix="raylab-bench-ckpt-"))
    data = write_synthetic(work / "data", p["classes"], p["per_class"], 4, seed=0)
    batches = p["classes"] * p["per_class"] // p["batch"]
    assert p["steps"] < batches and p["late"] + 2 < batches, "every measured step must fall inside the first epoch"

    rounds = []
    for r in range(p["rounds"]):
        with_ckpt = timed_run(p, data, work / "runs", f"every-{r}", args.workers, p["every"])
        without = timed_run(p, data, work / "runs", f"none-{r}", args.workers, 0)
        early = resume_time(p, data, work / "runs", f"early-{r}", args.workers, p["early"])
        late = resume_time(p, data, work / "runs", f"late-{r}", args.workers, p["late"])
        rounds.append({"round": r, "loop_s_every": with_ckpt, "loop_s_none": without, "resume_s_early": early, "resume_s_late": late})

    def med(key: str) -> float:
        return statistics.median(x[key] for x in rounds)

    extra_checkpoints = (p["steps"] - 1) // p["every"]
    result = {
        "benchmark": "checkpoint_cost", "smoke": args.smoke, "workers": args.workers, "params": p,
        "batches_per_epoch": batches, "extra_checkpoints": extra_checkpoints, "rounds": rounds,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        **{f"median_{k}": med(k) for k in ("loop_s_every", "loop_s_none", "resume_s_early", "resume_s_late")},
        "checkpoint_size_bytes": sum(f.stat().st_size for f in next((work / "runs" / "none-0").glob("checkpoint_*")).iterdir()),
    }
    result["throughput_cost_pct"] = 100.0 * (result["median_loop_s_every"] / result["median_loop_s_none"] - 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    where = "in-process" if args.workers == 0 else f"Ray Train, {args.workers} worker(s)"
    print(f"\ncheckpoint cost ({where}): {p['steps']} steps of a {batches}-batch epoch, residual width {p['width']} "
          f"{p['image_size']}px batch {p['batch']}, {p['rounds']} round(s), checkpoint {result['checkpoint_size_bytes'] / 1e6:.2f} MB")
    print(f"{'variant':<34}{'loop s (median)':>16}{'per round':>30}")
    for key, label in (("loop_s_every", f"checkpoint every {p['every']} batches"), ("loop_s_none", "no mid-epoch checkpoint")):
        print(f"{label:<34}{med(key):>16.2f}{', '.join(f'{x[key]:.2f}' for x in rounds):>30}")
    print(f"throughput cost of {extra_checkpoints} extra checkpoint(s): {result['throughput_cost_pct']:+.2f}% (goal <= 3%)")
    for key, label in (("resume_s_early", f"resume at batch {p['early']}"), ("resume_s_late", f"resume at batch {p['late']}")):
        print(f"{label:<34}{med(key):>16.2f}{', '.join(f'{x[key]:.2f}' for x in rounds):>30}   (s to first step)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; JSON: {out}")
    return result


if __name__ == "__main__":
    main()
