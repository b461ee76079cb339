"""Does warm start help? Full-from-medium against full-from-scratch on TinyImageNet.

The ladder's move from medium to full: a "medium" model (ResNet family, residual)
is trained first; the "full" model adds squeeze-excitation layers (family se, same
width), so every residual tensor loads by name and shape and only the SE layers
start at init -- what `init_from` does between ladder stages. The full model is
then trained twice with the same seed, data and steps: from scratch, and from
the medium run's best checkpoint. Both evaluate every `eval_every` steps; the
figure is how many optimizer steps each needs to reach the same validation
accuracy (fractions of the best accuracy both runs reach).

Runs in this process (`--workers 0` semantics: the loop, checkpoints and warm
start are the same code the Ray trials run, without Ray's start-up noise).

    python bench/warm_start.py            # the measurement (minutes on 2 cores)
    python bench/warm_start.py --smoke    # seconds; a check that it runs

Prints a table and writes JSON (default bench/results/warm_start.json). Nothing
is asserted: the figure is reported whatever it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd

from models.tinyimagenet.data import write_synthetic
from raylab.config import LaunchConfig
from raylab.launch import train

FULL = dict(classes=10, per_class=100, val_per_class=30, width=16, image_size=32, batch=32, medium_epochs=6, full_epochs=6,
            eval_every=10, lr=2e-3, seed=0)
SMOKE = dict(classes=4, per_class=12, val_per_class=4, width=4, image_size=16, batch=8, medium_epochs=1, full_epochs=1,
             eval_every=2, lr=2e-3, seed=0)
FRACTIONS = (0.5, 0.75, 0.9, 1.0)


def overrides(p: dict, data: Path, family: str, epochs: int, **extra) -> dict:
    return {"data_dir": str(data), "family": family, "width": p["width"], "image_size": p["image_size"],
            "per_worker_batch_size": p["batch"], "max_epochs": epochs, "eval_every_steps": p["eval_every"], "lr": p["lr"],
            "seed": p["seed"], "num_samples": 0, "log_every_steps": p["eval_every"], "keep_checkpoints": 2,
            "keep_best_checkpoints": 1, "checkpoint_metric": "val_accuracy", "checkpoint_every_batches": p["eval_every"], **extra}


def run(p: dict, data: Path, storage: Path, name: str, family: str, epochs: int, **extra) -> tuple[pd.DataFrame, float, object]:
    started = time.perf_counter()
    summary = train("tinyimagenet", "quick", overrides(p, data, family, epochs, **extra),
                    LaunchConfig(num_workers=0, storage_path=str(storage), name=name))
    curve = summary.metrics[["step", "val_accuracy"]].dropna().reset_index(drop=True)
    return curve, time.perf_counter() - started, summary


def steps_to_reach(curve: pd.DataFrame, target: float) -> int | None:
    """First evaluated step at or above `target`."""
    reached = curve[curve["val_accuracy"] >= target - 1e-12]
    return int(reached["step"].iloc[0]) if not reached.empty else None


def steps_to_stay(curve: pd.DataFrame, target: float) -> int | None:
    """First evaluated step from which the curve never drops below `target` again (less noisy)."""
    below = curve.index[curve["val_accuracy"] < target - 1e-12]
    if len(below) == 0:
        return int(curve["step"].iloc[0])
    after = below[-1] + 1
    return int(curve["step"].iloc[after]) if after < len(curve) else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "warm_start.json"))
    args = parser.parse_args(argv)
    p = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="raylab-bench-ws-") as tmp:
        tmp = Path(tmp)
        data = write_synthetic(tmp / "data", num_classes=p["classes"], train_per_class=p["per_class"],
                               val_per_class=p["val_per_class"], seed=1, image_size=p["image_size"])
        medium_curve, medium_s, medium = run(p, data, tmp / "runs", "medium", "residual", p["medium_epochs"])
        from raylab.report import best_checkpoint
        import pyarrow.fs as pafs

        best, _ = best_checkpoint(pafs.LocalFileSystem(), medium.run_path, "val_accuracy", "max")
        scratch_curve, scratch_s, _ = run(p, data, tmp / "runs", "full-scratch", "se", p["full_epochs"])
        warm_curve, warm_s, warm = run(p, data, tmp / "runs", "full-warm", "se", p["full_epochs"], init_from=best.path)
        warm_report = json.loads((Path(warm.run_path) / "warm_start.json").read_text())["counts"]
    common = min(scratch_curve["val_accuracy"].max(), warm_curve["val_accuracy"].max())
    rows = []
    for fraction in FRACTIONS:
        target = fraction * common
        a, b = steps_to_reach(scratch_curve, target), steps_to_reach(warm_curve, target)
        c, d = steps_to_stay(scratch_curve, target), steps_to_stay(warm_curve, target)
        rows.append({"fraction": fraction, "target_val_accuracy": round(float(target), 4), "scratch_steps": a, "warm_steps": b,
                     "scratch_steps_to_stay": c, "warm_steps_to_stay": d})
    result = {
        "smoke": args.smoke, "params": p, "machine": platform.platform(), "cpus": os.cpu_count(),
        "medium": {"best_val_accuracy": float(medium_curve["val_accuracy"].max()), "wall_s": round(medium_s, 1),
                   "checkpoint": best.name},
        "warm_start": warm_report,
        "scratch": {"curve": scratch_curve.to_dict("records"), "wall_s": round(scratch_s, 1)},
        "warm": {"curve": warm_curve.to_dict("records"), "wall_s": round(warm_s, 1)},
        "steps_to_reach": rows,
        "first_eval": {"scratch": float(scratch_curve["val_accuracy"].iloc[0]), "warm": float(warm_curve["val_accuracy"].iloc[0])},
        "final_eval": {"scratch": float(scratch_curve["val_accuracy"].iloc[-1]), "warm": float(warm_curve["val_accuracy"].iloc[-1])},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"warm start full (se, width {p['width']}) from medium (residual): {warm_report['loaded']} tensors loaded, "
          f"{warm_report['new']} new, {warm_report['skipped_shape']} skipped for shape")
    print(f"val_accuracy at the first evaluation (step {p['eval_every']}): scratch {result['first_eval']['scratch']:.3f}, "
          f"warm {result['first_eval']['warm']:.3f}")
    print("optimizer steps until val_accuracy first reaches / stays at or above the target:")
    print(f"{'target val_acc':>15} {'scratch reach':>14} {'warm reach':>11} {'scratch stay':>13} {'warm stay':>10}")
    for r in rows:
        print(f"{r['target_val_accuracy']:>15.3f} {str(r['scratch_steps']):>14} {str(r['warm_steps']):>11} "
              f"{str(r['scratch_steps_to_stay']):>13} {str(r['warm_steps_to_stay']):>10}")
    print(f"final val_accuracy: scratch {scratch_curve['val_accuracy'].iloc[-1]:.3f}, warm {warm_curve['val_accuracy'].iloc[-1]:.3f}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
