"""Steady-state training throughput: `raylab train` (1 Ray worker) vs a plain PyTorch loop.

Both sides train the same TinyImageNet model on the same synthetic JPEG folder
with the same dataset class, batch size, optimizer and thread count. Rounds
alternate A, B, A, B... in one invocation so drift of the machine hits both.
Throughput counts only steps after a warm-up (the raylab side reports it from
the loop's own step timer; evaluation and checkpointing are outside the
window); startup (Ray, worker, data index, model build) is reported
separately. The goal is raylab within 2% of the plain loop.

    python bench/train_throughput.py                 # full measurement
    python bench/train_throughput.py --smoke         # seconds; what CI runs

Prints a table and writes JSON (default bench/results/train_throughput.json).
Nothing here is asserted: figures are for people to read.
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

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models.tinyimagenet.data import ImageClassificationDataset, load_index, write_synthetic
from models.tinyimagenet.model import build_model
from raylab.config import LaunchConfig
from raylab.launch import train

FULL = dict(classes=10, per_class=200, family="residual", width=16, image_size=32, batch=64, warmup=10, steps=60, rounds=3)
SMOKE = dict(classes=4, per_class=16, family="baseline", width=4, image_size=16, batch=8, warmup=2, steps=6, rounds=1)


def run_raylab(p: dict, data: Path, storage: Path, threads: int, round_no: int) -> dict:
    overrides = {
        "data_dir": str(data), "family": p["family"], "width": p["width"], "image_size": p["image_size"],
        "per_worker_batch_size": p["batch"], "max_steps": p["steps"], "max_epochs": 100, "augment": True,
        "eval_every_steps": p["warmup"], "num_samples": 0, "log_every_steps": p["steps"], "seed": round_no,
    }
    launch = LaunchConfig(num_workers=1, cpus_per_worker=threads, storage_path=str(storage), name=f"raylab-{round_no}")
    started = time.perf_counter()
    summary = train("tinyimagenet", "quick", overrides, launch)
    wall = time.perf_counter() - started
    last = summary.metrics.iloc[-1]
    # The last report's window covers steps warmup+1..steps: data loading + compute only.
    return {"samples_per_s": float(last["samples_per_s"]), "wall_s": wall, "startup_s": wall - float(last["time_s"])}


def run_plain(p: dict, data: Path, threads: int, round_no: int) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(round_no)
    index = load_index(data)
    dataset = ImageClassificationDataset(index.train, p["image_size"], augment=True, seed=round_no)
    model = build_model(p["family"], index.num_classes, p["width"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=1e-6)
    loader = DataLoader(dataset, batch_size=p["batch"], shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(round_no))
    model.train()
    steps, timed_samples, timed_s = 0, 0, 0.0
    startup = time.perf_counter() - started
    while steps < p["steps"]:
        tick = time.perf_counter()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())  # the raylab loop reads the loss every step; so does this one
            steps += 1
            now = time.perf_counter()
            if steps > p["warmup"]:
                timed_samples += p["batch"]
                timed_s += now - tick
            tick = now
            if steps >= p["steps"]:
                break
    return {"samples_per_s": timed_samples / timed_s, "wall_s": time.perf_counter() - started, "startup_s": startup}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (CI)")
    parser.add_argument("--rounds", type=int, help="A/B rounds (default 3, smoke 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for both sides")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = parser.parse_args(argv)
    p = dict(SMOKE if args.smoke else FULL)
    if args.rounds:
        p["rounds"] = args.rounds
    work = Path(tempfile.mkdtemp(prefix="raylab-bench-"))
    data = write_synthetic(work / "data", p["classes"], p["per_class"], 10, seed=0)

    ray_started = time.perf_counter()
    from raylab.ray_backend import ensure_ray

    ensure_ray(LaunchConfig())
    ray_init_s = time.perf_counter() - ray_started

    rounds = []
    for r in range(p["rounds"]):
        a = run_raylab(p, data, work / "runs", args.threads, r)
        b = run_plain(p, data, args.threads, r)
        rounds.append({"round": r, "raylab": a, "plain": b})

    def med(side: str, key: str) -> float:
        return statistics.median(x[side][key] for x in rounds)

    result = {
        "benchmark": "train_throughput", "smoke": args.smoke, "params": p, "threads": args.threads,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(), "node": platform.node()},
        "ray_init_s": ray_init_s, "rounds": rounds,
        "raylab_samples_per_s": med("raylab", "samples_per_s"), "plain_samples_per_s": med("plain", "samples_per_s"),
        "raylab_startup_s": med("raylab", "startup_s"), "plain_startup_s": med("plain", "startup_s"),
    }
    result["raylab_slowdown_pct"] = 100.0 * (1 - result["raylab_samples_per_s"] / result["plain_samples_per_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"\ntrain throughput, {p['family']} width {p['width']} {p['image_size']}px batch {p['batch']}, "
          f"{p['steps'] - p['warmup']} timed steps x {p['rounds']} rounds, {args.threads} threads")
    print(f"{'side':<10}{'samples/s (median)':>20}{'startup s':>12}{'per round samples/s':>40}")
    for side in ("raylab", "plain"):
        per = ", ".join(f"{x[side]['samples_per_s']:.1f}" for x in rounds)
        print(f"{side:<10}{med(side, 'samples_per_s'):>20.1f}{med(side, 'startup_s'):>12.1f}{per:>40}")
    print(f"raylab slowdown: {result['raylab_slowdown_pct']:+.2f}% (goal <= 2%); Ray init {ray_init_s:.1f} s; JSON: {args.out}")
    return result


if __name__ == "__main__":
    main()
