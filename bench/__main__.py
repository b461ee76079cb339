"""`python -m bench [--smoke] [--only NAME[,NAME...]] [--out DIR] [--rounds N]`: run the benchmarks.

Measurements (one module each; `--only` takes these names):

    throughput   step throughput from outside: raylab (in-process, 1 and 2 Ray workers) vs a plain PyTorch loop
    startup      command to first step and the whole quick stage: raylab on Ray vs in-process vs a bare
                 TorchTrainer, and where every second goes
    checkpoint   a checkpoint every 100 batches vs none, and what a checkpoint's time is spent on
    resume       resuming at an early vs a late batch of a long epoch
    tune         an 8-trial sweep's wall time vs the sum of its trials' times
    memory       peak RSS of the driver and the Ray workers, quick stage of every model
    scaling      step time as batch and model grow (quick -> medium -> full), TinyImageNet and DiT
    warm_start   full-from-medium vs from scratch, steps to the same accuracy (extra: only with --only)
    autoscaling  a 2-worker run on Ray's fake multi-node autoscaler: nodes added, run, removed (extra)

Each writes <out>/<name>.json and <out>/<name>.png (default out: bench/results/)
and prints its table (the extras write their JSON and print their own way);
`summary.json` lists what ran. Nothing is asserted:
figures are for people to read. `--smoke` runs tiny sizes, one round, and
skips the parts that need minutes (say which in each table's notes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench.harness import REPO, load_average, machine

MEASUREMENTS = ("throughput", "startup", "checkpoint", "resume", "tune", "memory", "scaling")
EXTRAS = ("warm_start", "autoscaling")
MODULES = {"throughput": "bench.throughput", "startup": "bench.startup", "checkpoint": "bench.ckpt_cost",
           "resume": "bench.resume_cost", "tune": "bench.tune_overhead", "memory": "bench.memory",
           "scaling": "bench.scaling", "warm_start": "bench.warm_start", "autoscaling": "bench.autoscaling_demo"}


def run_extra(name: str, smoke: bool, out: Path) -> dict:
    """The demos that keep their own command line (`main(argv)`): they print and write their JSON."""
    target = out / f"{name}.json"
    result = importlib.import_module(MODULES[name]).main((["--smoke"] if smoke else []) + ["--out", str(target)])
    return {"files": [target.name], "figures": {k: v for k, v in result.items() if not isinstance(v, (list, dict))}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that every measurement runs")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(MEASUREMENTS + EXTRAS)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the JSON and PNG files")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per measurement (default: each measurement's own)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(MEASUREMENTS)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        parser.error(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS + EXTRAS)}")
    started = time.perf_counter()
    summary = {"smoke": args.smoke, "machine": machine(), "load_before": load_average(), "measurements": {}}
    failed = []
    for name in names:
        print(f"\n>> {name}: {MODULES[name]}", flush=True)
        t0, load0 = time.perf_counter(), load_average()
        began = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            if name in EXTRAS:
                summary["measurements"][name] = run_extra(name, args.smoke, args.out)
                continue
            report = importlib.import_module(MODULES[name]).measure(args.smoke, args.rounds)
        except Exception as exc:  # one broken measurement must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            summary["measurements"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        report.load_before, report.started = load0, began  # the Report itself is built after the runs
        report.finish(time.perf_counter() - t0)
        files = report.save(args.out)
        report.print()
        summary["measurements"][name] = {"files": [str(f.relative_to(args.out)) for f in files], "figures": report.to_json()["figures"]}
    summary["load_after"] = load_average()
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}/summary.json ({summary['wall_s']:.0f} s)" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
