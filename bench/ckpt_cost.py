"""Checkpoint cost: a checkpoint every 100 batches vs none, and what each checkpoint's time is spent on.

1. A/B, timed from outside (`bench.stamps`, as in `bench.throughput`): the same
   TinyImageNet quick-stage run of `steps` steps inside one long epoch, with
   `checkpoint_every_batches=100` and with 0, in-process and on 1 Ray worker.
   The window runs from the start of step `warmup + 1` to the start of the
   last step, so the checkpoints at batches 100 and 200 fall inside it and the
   final one does not. The cost is the window's growth; on a loaded machine
   that difference is noisy, so:
2. every part of every checkpoint inside the window is stamped in the training
   process (`RAYLAB_BENCH_TRACE=checkpoints`): gathering RNG states and weight
   fingerprints from the workers, serialising (safetensors, optimizer and
   scheduler state), checksums and state.json, and the session's report -- on
   Ray, `ray.train.report`'s upload to storage and its wait for the
   controller's result queue -- plus the retention scan. Their sum over the
   window's length is the checkpoints' share of training time, measured
   directly.
3. the same parts for the quick, medium and full TinyImageNet models (their
   stage's width and image size; a small batch, since it does not change what
   a checkpoint holds), in-process and, for the full model, on Ray: how the
   cost grows with the checkpoint's size.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.harness import (Report, bars, clean_work_dir, format_table, interleave, ratio_pct, raylab_argv, run_command,
                           sets, summarise, warm_up, work_dir)
from bench.stamps import STAMPS_ENV, TRACE_ENV, loss_clock, read_stamps

NAME = "checkpoint"
FULL = dict(per_class=700, batch=32, warmup=10, steps=210, every=100, rounds=3, threads=1,
            sides=("w0_every", "w0_none", "w1_every", "w1_none"), sizes=("quick", "medium", "full"), ray_sizes=("full",))
SMOKE = dict(per_class=8, batch=8, warmup=2, steps=9, every=3, rounds=1, threads=1,
             sides=("w0_every", "w0_none"), sizes=(), ray_sizes=())
LABELS = {"w0_every": "in-process, every {every} batches", "w0_none": "in-process, none", "w1_every": "1 Ray worker, every {every} batches",
          "w1_none": "1 Ray worker, none"}
# The parts of one checkpoint, as stamped by bench.stamps.trace_checkpoints: (label, start event, end event).
PARTS = [
    ("gather RNG + weight fingerprints", "ckpt_start", "ckpt_save_start"),
    ("serialise (safetensors, optimizer)", "ckpt_save_start", "ckpt_save_end"),
    ("checksums + state.json", "ckpt_checksums_start", "ckpt_checksums_end"),
    ("Ray: upload to storage", "ray_upload_start", "ray_upload_end"),
    ("Ray: wait for the report's turn", "ray_wait_turn_start", "ray_wait_turn_end"),
    ("retention scan", "ckpt_retention_start", "ckpt_retention_end"),
    ("whole checkpoint (loop's view)", "ckpt_start", "ckpt_end"),
]


def parts_of(stamps: list[dict[str, Any]], since: float = float("-inf"), until: float = float("inf")) -> list[dict[str, float]]:
    """Per checkpoint written between perf_counter `since` and `until`: seconds per part."""
    events = sorted((s for s in stamps if s["event"].startswith(("ckpt", "ray_upload", "ray_wait"))), key=lambda s: s["pc"])
    out: list[dict[str, float]] = []
    current: dict[str, float] = {}
    for s in events:
        current.setdefault(s["event"], s["pc"])
        if s["event"] == "ckpt_end":
            if since <= current.get("ckpt_start", since - 1) and s["pc"] <= until:
                out.append({label: current[b] - current[a] for label, a, b in PARTS if a in current and b in current})
            current = {}
    return out


def overrides(p: dict[str, Any], every: int) -> dict[str, Any]:
    return {"synthetic_train_per_class": p["per_class"], "synthetic_val_per_class": 2, "per_worker_batch_size": p["batch"],
            "max_steps": p["steps"], "max_epochs": 1, "eval_every_steps": 0, "checkpoint_every_batches": every,
            "num_samples": 0, "keep_checkpoints": 2}


def side(p: dict[str, Any], work: Path, name: str, r: int, env: dict[str, str]) -> dict[str, float]:
    stamps = work / f"{name}-{r}.jsonl"
    workers, every = name[1], p["every"] if name.endswith("every") else 0
    argv = raylab_argv("train", "tinyimagenet", "--stage", "quick", "--workers", workers, "--storage", str(work / "runs"),
                       "--name", f"{name}-{r}", *sets(overrides(p, every)))
    run_command(argv, work / f"{name}-{r}.log", {**env, STAMPS_ENV: str(stamps), TRACE_ENV: "checkpoints"})
    found = read_stamps(stamps)
    clock = loss_clock(found)
    if len(clock) != p["steps"]:
        raise RuntimeError(f"{name}: expected {p['steps']} stamped steps, found {len(clock)} in {stamps}")
    start, end = clock[p["warmup"]], clock[-1]
    inside = parts_of(found, start, end)
    figures = {"window_s": end - start, "checkpoints_in_window": float(len(inside)),
               "checkpoint_s_in_window": sum(c.get("whole checkpoint (loop's view)", 0.0) for c in inside)}
    figures["traced_share_pct"] = 100 * figures["checkpoint_s_in_window"] / figures["window_s"]
    for label, _, _ in PARTS:
        values = [c[label] for c in inside if label in c]
        if values:
            figures[f"part: {label}"] = statistics.mean(values)
    return figures


def by_size(p: dict[str, Any], work: Path, stage: str, workers: int, env: dict[str, str]) -> dict[str, Any]:
    """Parts of the checkpoints of a short run of `stage`'s model (one per batch, after the first)."""
    stamps = work / f"size-{stage}-w{workers}.jsonl"
    # The stage's model (its classes, width, image size); one image per class or two is enough for 4 batches of 4.
    values = {"per_worker_batch_size": 4, "synthetic_train_per_class": {"quick": 2}.get(stage, 1), "synthetic_val_per_class": 1,
              "max_steps": 4, "max_epochs": 1, "checkpoint_every_batches": 1, "eval_every_steps": 0, "num_samples": 0,
              "keep_checkpoints": 2, "data_loader_workers": 0}
    argv = raylab_argv("train", "tinyimagenet", "--stage", stage, "--workers", str(workers), "--storage", str(work / "sizes"),
                       "--name", f"{stage}-w{workers}", *sets(values))
    run_command(argv, work / f"size-{stage}-w{workers}.log", {**env, STAMPS_ENV: str(stamps), TRACE_ENV: "checkpoints"})
    checkpoints = parts_of(read_stamps(stamps))[1:]  # the first one pays one-off imports
    folder = max((d for d in (work / "sizes" / f"{stage}-w{workers}").glob("checkpoint_*") if d.is_dir()), key=lambda d: d.name)
    out: dict[str, Any] = {"size_mb": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6,
                           "checkpoints": len(checkpoints)}
    for label, _, _ in PARTS:
        vals = [c[label] for c in checkpoints if label in c]
        if vals:
            out[label] = statistics.median(vals)
    return out


def measure(smoke: bool, rounds: int | None = None) -> Report:
    p = dict(SMOKE if smoke else FULL)
    p["rounds"] = rounds or p["rounds"]
    work = work_dir(NAME)
    env = {"OMP_NUM_THREADS": str(p["threads"]), "RAYLAB_CACHE_DIR": str(work / "cache")}
    try:
        if not smoke:  # smoke figures mean nothing; the first run generates the data
            warm_up("tinyimagenet", "quick", overrides(p, 0), work, env)
        raw = interleave({s: (lambda r, s=s: side(p, work, s, r, env)) for s in p["sides"]}, p["rounds"])
        sizes = {f"{stage} w{w}": by_size(p, work, stage, w, env)
                 for stage in p["sizes"] for w in ((0, 1) if stage in p["ray_sizes"] else (0,))}
    finally:
        clean_work_dir(work)
    stats = summarise(raw)
    report = Report(NAME, f"Checkpoint cost: every {p['every']} batches vs none (TinyImageNet)",
                    f"a checkpoint every {p['every']} batches costs <= 3% of training time",
                    " ".join(__doc__.split("\n\n")[1].split()), p, smoke, plot=_plot, figsize=(10, 4.5))
    report.headers = ["variant", "window s", "vs none", "checkpoints", "traced ckpt s", "traced share"]
    for s in p["sides"]:
        st = stats[s]
        none = stats[s[:2] + "_none"]["window_s"].median
        report.rows.append([LABELS[s].format(**p), st["window_s"].text(2),
                            f"{ratio_pct(st['window_s'].median, none):+.1f}%" if s.endswith("every") else "",
                            f"{st['checkpoints_in_window'].median:.0f}", st["checkpoint_s_in_window"].text(2),
                            f"{st['traced_share_pct'].median:.2f}%"])
    report.figures = {s: dict(stats[s]) for s in p["sides"]}
    report.figures["by_size"] = sizes
    for w in ("w0", "w1"):
        if f"{w}_every" in stats:
            report.figures[f"{w}_ab_cost_pct"] = ratio_pct(stats[f"{w}_every"]["window_s"].median, stats[f"{w}_none"]["window_s"].median)
            report.figures[f"{w}_traced_cost_pct"] = stats[f"{w}_every"]["traced_share_pct"].median
    report.rounds = raw
    parts_table = [["part of one checkpoint, ms", *[LABELS[s].format(**p) for s in p["sides"] if s.endswith("every")],
                    *[f"{k} ({v['size_mb']:.1f} MB)" for k, v in sizes.items()]]]
    for label, _, _ in PARTS:
        cells = [f"{1000 * stats[s][f'part: {label}'].median:.1f}" if f"part: {label}" in stats[s] else ""
                 for s in p["sides"] if s.endswith("every")]
        cells += [f"{1000 * v[label]:.1f}" if label in v else "" for v in sizes.values()]
        parts_table.append([label, *cells])
    report.figures["parts_table"] = parts_table
    report.notes.append("where a checkpoint's time goes (medians; ms):\n" + format_table(parts_table[0], parts_table[1:]))
    report.notes.append(f"{p['steps'] - p['warmup'] - 1} steps timed after {p['warmup']} warm-up steps, batch {p['batch']}, "
                        f"{p['rounds']} interleaved round(s); 'traced share' = the checkpoints' own time inside the window / the window")
    if smoke:
        report.notes.append("smoke: in-process only, a checkpoint every 3 batches, no run per model size")
    return report


def _plot(ax: Any, report: Report) -> None:
    sides = list(report.params["sides"])
    bars(ax, [LABELS[s].format(**report.params) for s in sides], [report.figures[s]["window_s"] for s in sides],
         "seconds for the timed steps (lower is better)", ["tab:orange" if s.endswith("every") else "0.5" for s in sides])

