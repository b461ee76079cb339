"""Results of ladders, sweeps and runs as one table, and pictures of them (`raylab report`).

    raylab report lr-sweep --storage ./raylab_results
    raylab report s3://bucket/runs/gman-ladder?endpoint_override=...

    from raylab.report import load_results
    df = load_results("lr-sweep", storage="./raylab_results")   # one row per trial / stage

The folder may hold a ladder (`ladder.json`, one sweep folder per stage), a
sweep (`sweep.json`, one run folder per trial) or a single run (`metrics.parquet`,
checkpoints). Everything is read from raylab's own files -- each run's
`metrics.parquet` (the whole curve, across restores), `trial.json` and
checkpoint `state.json` -- not from Tune's state, so a report works on a sweep
still running or one whose driver was killed.

`write_report` adds to the folder: `results.parquet` and `results.csv` (config,
final and best metrics, steps, wall time, checkpoint paths),
`learning_curves.png` (the ranking metric against step, per stage and trial)
and, for sweeps, `search_space.png` (best metric against each searched field).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raylab.checkpoint_store import CheckpointRecord, display_path, scan_checkpoints
from raylab.config import ConfigError, metric_mode
from raylab.run_storage import METRICS_FILE, read_metrics, run_filesystem, write_file

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
CURVES_PNG = "learning_curves.png"
SPACE_PNG = "search_space.png"
_LADDER_FILE, _SWEEP_FILE, _TRIAL_FILE, _WARM_FILE = "ladder.json", "sweep.json", "trial.json", "warm_start.json"


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """A JSON file on any filesystem; None when it does not exist."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode("utf-8"))


def best_checkpoint(fs: pafs.FileSystem, run_path: str, metric: str, mode: str) -> tuple[CheckpointRecord | None, bool]:
    """The run's best valid checkpoint by `metric` (as recorded in its state.json), and whether
    the metric chose it; without any checkpoint carrying the metric, the newest valid one."""
    valid = [r for r in scan_checkpoints(fs, run_path, "sizes") if r.valid]
    scored = [r for r in valid if isinstance(r.metrics.get(metric), (int, float)) and math.isfinite(r.metrics[metric])]
    if scored:
        sign = 1 if mode == "max" else -1
        # the best value; among equals the newest (scored is oldest first)
        return max(reversed(scored), key=lambda r: sign * r.metrics[metric]), True
    return (valid[-1] if valid else None), False


def wall_seconds(metrics: pd.DataFrame) -> float:
    """Time in the training loop across attempts: `time_s` restarts at each resume, so sum each attempt's last value."""
    if "time_s" not in metrics or metrics["time_s"].dropna().empty:
        return 0.0
    times = metrics["time_s"].dropna().tolist()
    total, previous = 0.0, times[0]
    for t in times[1:]:
        if t < previous:
            total += previous
        previous = t
    return float(total + previous)


def _wall_since(fs: pafs.FileSystem, run_path: str, started: str | None) -> float | None:
    """Seconds from a trial's first start to its last metrics row (startup, evaluation and restores included)."""
    if not started:
        return None
    info = fs.get_file_info(f"{run_path}/{METRICS_FILE}")
    if info.type != pafs.FileType.File or info.mtime is None:
        return None
    mtime = info.mtime if info.mtime.tzinfo else info.mtime.replace(tzinfo=timezone.utc)
    return max(0.0, (mtime - datetime.fromisoformat(started)).total_seconds())


def run_outcome(fs: pafs.FileSystem, run_path: str, metric: str, mode: str) -> dict[str, Any]:
    """What one run folder says about itself: best/final metric, steps, times, checkpoints, config."""
    metrics = read_metrics(fs, run_path)
    series = metrics[metric].dropna() if metric in metrics else pd.Series(dtype=float)
    record, _ = best_checkpoint(fs, run_path, metric, mode)
    valid = [r for r in scan_checkpoints(fs, run_path, "sizes") if r.valid]
    trial = read_json(fs, f"{run_path}/{_TRIAL_FILE}") or {}
    config = trial.get("config") or (valid[-1].state.get("config") if valid else None) or {}
    warm = read_json(fs, f"{run_path}/{_WARM_FILE}")
    return {
        "run": display_path(fs, run_path),
        "best": float(series.max() if mode == "max" else series.min()) if not series.empty else None,
        "final": float(series.iloc[-1]) if not series.empty else None,
        "steps": int(metrics["step"].max()) if "step" in metrics and not metrics.empty else 0,
        "train_s": wall_seconds(metrics),
        "wall_s": _wall_since(fs, run_path, trial.get("started")) or wall_seconds(metrics),
        "best_checkpoint": record.uri if record else None,
        "best_checkpoint_name": record.name if record else None,
        "latest_checkpoint": valid[-1].uri if valid else None,
        "config": config, "params": trial.get("params", {}), "error": trial.get("error"),
        "warm_start": (warm or {}).get("counts"), "metrics": metrics,
    }


@dataclass
class Target:
    fs: pafs.FileSystem
    path: str
    kind: str  # ladder | sweep | run
    info: dict[str, Any]


def locate(target: str, storage: str | None = None) -> Target:
    """A ladder, sweep or run folder: a path or URI, else a name under `storage`."""
    if "://" in target or Path(target).expanduser().exists():
        fs, path = run_filesystem(target, "")
        path = path.rstrip("/")
    else:
        fs, path = run_filesystem(storage or "raylab_results", target)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ConfigError(f"'{target}' is not a ladder, sweep or run folder (looked in {display_path(fs, path)}); pass its path or --storage.")
    for kind, name in (("ladder", _LADDER_FILE), ("sweep", _SWEEP_FILE)):
        info = read_json(fs, f"{path}/{name}")
        if info is not None:
            return Target(fs, path, kind, info)
    has_run = fs.get_file_info(f"{path}/{METRICS_FILE}").type == pafs.FileType.File or scan_checkpoints(fs, path)
    if not has_run:
        raise ConfigError(f"{display_path(fs, path)} holds no ladder.json, sweep.json, metrics.parquet or checkpoint: nothing to report.")
    return Target(fs, path, "run", {})


def _metric_columns(metrics: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in metrics.columns:
        if not col.startswith(("val_", "sample_")) and col != "train_loss":
            continue
        series = pd.to_numeric(metrics[col], errors="coerce").dropna()
        if series.empty:
            continue
        out[f"final_{col}"] = float(series.iloc[-1])
        if col != "train_loss":
            out[f"best_{col}"] = float(series.max() if metric_mode(col) == "max" else series.min())
    return out


def _row(base: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    row = {**base, **{k: v for k, v in outcome["params"].items()}}
    row.update(_metric_columns(outcome["metrics"]))
    row.update(steps=outcome["steps"], wall_s=round(outcome["wall_s"], 1), train_s=round(outcome["train_s"], 1),
               best_checkpoint=outcome["best_checkpoint"],
               latest_checkpoint=outcome["latest_checkpoint"], run=outcome["run"], error=outcome["error"],
               config=json.dumps(outcome["config"], sort_keys=True, default=str))
    if outcome["warm_start"]:
        row.update({f"warm_{k}": v for k, v in outcome["warm_start"].items()})
    return row


def _sweep_rows(fs: pafs.FileSystem, path: str, info: dict[str, Any], base: dict[str, Any]) -> tuple[list[dict], list[tuple[str, pd.DataFrame]]]:
    metric, mode = info.get("metric", "val_loss"), info.get("mode", "min")
    rows, curves = [], []
    trials = info.get("trials", {})
    names = sorted(set(trials) | _trial_folders(fs, path))
    for name in names:
        outcome = run_outcome(fs, f"{path}/{name}", metric, mode)
        state = (trials.get(name) or {})
        label = _state(state)
        rows.append(_row({**base, "trial": name, "state": label, "metric": metric,
                          "best": outcome["best"], "final": outcome["final"]}, outcome))
        curves.append((f"{base.get('stage', '')} {name}".strip(), outcome["metrics"]))
    return rows, curves


def _state(trial: dict[str, Any]) -> str:
    status = trial.get("status")
    if status is None:
        return "unknown"
    if status == "TERMINATED":
        return "stopped early" if trial.get("stopped_early") else "finished"
    return {"ERROR": "error", "RUNNING": "running", "PENDING": "pending", "PAUSED": "paused"}.get(status, status.lower())


def _trial_folders(fs: pafs.FileSystem, path: str) -> set[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("trial_")}


def collect(target: Target) -> tuple[pd.DataFrame, list[tuple[str, pd.DataFrame]], str]:
    """(results table, [(label, metrics)] curves, ranking metric) of a located folder."""
    fs, path, info = target.fs, target.path, target.info
    if target.kind == "sweep":
        rows, curves = _sweep_rows(fs, path, info, {"kind": "sweep", "stage": info.get("stage")})
        return pd.DataFrame(rows), curves, info.get("metric", "val_loss")
    if target.kind == "ladder":
        rows, curves = [], []
        for stage, state in info.get("stages", {}).items():
            folder = state.get("folder")
            sweep = read_json(fs, f"{path}/{folder}/{_SWEEP_FILE}") if folder else None
            if sweep is None:
                continue
            more, more_curves = _sweep_rows(fs, f"{path}/{folder}", sweep, {"kind": "ladder", "stage": stage,
                                            "stage_status": state.get("status"), "chosen": None})
            for row in more:
                row["chosen"] = row["trial"] == state.get("best_trial")
            rows += more
            curves += more_curves
        return pd.DataFrame(rows), curves, info.get("metric", "val_loss")
    metrics = read_metrics(fs, path)
    metric = "val_loss" if "val_loss" in metrics else next((c for c in metrics.columns if c.startswith("val_")), "train_loss")
    outcome = run_outcome(fs, path, metric, metric_mode(metric))
    row = _row({"kind": "run", "trial": path.rsplit("/", 1)[-1], "state": "run", "metric": metric,
                "best": outcome["best"], "final": outcome["final"]}, outcome)
    return pd.DataFrame([row]), [(row["trial"], metrics)], metric


def load_results(target: str, storage: str | None = None) -> pd.DataFrame:
    """Every trial and stage of a ladder, sweep or run as one DataFrame (for notebooks)."""
    table, _, _ = collect(locate(target, storage))
    return table


def _plot_curves(curves: list[tuple[str, pd.DataFrame]], metric: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    for label, frame in curves:
        stage = label.split(" ", 1)[0] if " " in label else ""
        stages.setdefault(stage, []).append((label, frame))
    panels = list(stages.items()) or [("", [])]
    rows = [metric] + (["train_loss"] if metric != "train_loss" else [])
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.5 * len(panels), 3.3 * len(rows)), squeeze=False)
    for c, (stage, items) in enumerate(panels):
        for r, col in enumerate(rows):
            ax = axes[r][c]
            for label, frame in items:
                if col in frame and "step" in frame:
                    series = frame[["step", col]].dropna()
                    ax.plot(series["step"], series[col], marker="o", markersize=2.5, label=label.split(" ")[-1])
            ax.set_title(f"{stage} {col}".strip())
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if items and r == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def _plot_space(table: pd.DataFrame, fields: list[str], log_fields: set[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fields), figsize=(4.2 * len(fields), 3.4), squeeze=False)
    colors = {"finished": "tab:green", "stopped early": "tab:orange", "error": "tab:red"}
    for ax, name in zip(axes[0], fields):
        values = table[name]
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().all():
            x = numeric
            if name in log_fields or ((x > 0).all() and x.max() / x.min() > 20):
                ax.set_xscale("log")
            ax.tick_params(axis="x", labelrotation=30)
        else:
            cats = sorted(values.astype(str).unique())
            x = values.astype(str).map({c: i for i, c in enumerate(cats)})
            ax.set_xticks(range(len(cats)), cats)
        for state, group in table.assign(_x=x).groupby("state"):
            ax.scatter(group["_x"], group["best"], label=state, color=colors.get(state, "tab:gray"))
        ax.set_xlabel(name)
        ax.set_ylabel(f"best {table['metric'].iloc[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


@dataclass
class Report:
    table: pd.DataFrame
    kind: str
    metric: str
    files: list[str]


def write_report(target: str, storage: str | None = None) -> Report:
    """Write results.parquet, results.csv and the PNGs into the folder; returns the table and file paths."""
    located = locate(target, storage)
    table, curves, metric = collect(located)
    fs, path = located.fs, located.path
    files = []
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), sink)
    for name, data in ((RESULTS_PARQUET, sink.getvalue().to_pybytes()), (RESULTS_CSV, table.to_csv(index=False).encode())):
        write_file(fs, f"{path}/{name}", data)
        files.append(f"{path}/{name}")
    title = f"{located.kind} {path.rsplit('/', 1)[-1]}"
    write_file(fs, f"{path}/{CURVES_PNG}", _plot_curves(curves, metric, title))
    files.append(f"{path}/{CURVES_PNG}")
    fields = _searched_fields(located)
    if fields and not table.empty and table["best"].notna().any():
        space = located.info.get("fingerprint", {}).get("space", [])
        log_fields = {text.split("=", 1)[0] for text in space if "=loguniform(" in text}
        write_file(fs, f"{path}/{SPACE_PNG}", _plot_space(table, [f for f in fields if f in table], log_fields, title))
        files.append(f"{path}/{SPACE_PNG}")
    return Report(table, located.kind, metric, [display_path(fs, f) for f in files])


def _searched_fields(target: Target) -> list[str]:
    if target.kind == "sweep":
        return list(target.info.get("fields", []))
    return []
