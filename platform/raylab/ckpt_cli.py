"""`raylab ckpt ...`: the checkpoint manager on the command line (seed 004's tool, on Ray storage).

    raylab ckpt list  <run> [--storage S] [--json]
    raylab ckpt info  <checkpoint-folder-or-uri> [--storage S]
    raylab ckpt load  <checkpoint> [--to DIR] [--storage S]
    raylab ckpt clean <run>... --keep-latest K [--keep-best B --metric M --mode min|max] [--dry-run] [--storage S]

A thin shell over `raylab.checkpoints`. Exit codes: 0 success, 1 a checkpoint
is corrupted or storage failed, 2 a usage or configuration mistake.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from raylab.checkpoint import CheckpointError
from raylab.config import ConfigError

ckpt_app = typer.Typer(add_completion=False, no_args_is_help=True, help="List, inspect, fetch and clean checkpoints of runs.")
out = Console()
err = Console(stderr=True)
_STORAGE_HELP = "Local folder or s3:// URI holding the runs (as given to `raylab train --storage`)."


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _call(fn, *args: Any, **kwargs: Any) -> Any:
    """Run an API call; user mistakes exit 2, corrupted checkpoints and storage errors exit 1."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except CheckpointError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(f"storage error: {exc}", 1)


@ckpt_app.command("list")
def list_(
    run: str = typer.Argument(..., help="Run name under --storage, or a run folder / URI."),
    storage: str = typer.Option("raylab_results", help=_STORAGE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON records."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256 (--no-verify: sizes only, no full read)."),
) -> None:
    """Checkpoints of a run: position, metrics, size, valid?, time; and the total size."""
    from raylab.checkpoints import list_checkpoints

    table = _call(list_checkpoints, run, storage, verify)
    if as_json:
        out.print_json(table.to_json(orient="records", date_format="iso"))
        return
    preferred = [c for c in ("val_loss", "val_accuracy") if c in table.columns]
    metrics = (preferred + [c for c in table.columns if c.startswith("val_") and c not in preferred])[:2] or \
        [c for c in ("train_loss",) if c in table.columns]
    view = Table(title=f"checkpoints of {table.attrs['run']}", title_justify="left")
    view.add_column("checkpoint", no_wrap=True)
    # Runs through Ray have a registry of checkpoints; folders it lacks came from `--workers 0` or a killed driver.
    registry = ["registered"] if table["in_ray_registry"].any() else []
    for col in ("step", "epoch", "batch", *metrics, "size", "valid", *registry, "saved"):
        view.add_column(col, justify="left" if col == "valid" else "right")
    for row in table.to_dict("records"):
        cells = [row["checkpoint"], *(_int(row[k]) for k in ("step", "epoch", "batch"))]
        cells += [f"{row[m]:.4g}" if isinstance(row.get(m), float) and row[m] == row[m] else "" for m in metrics]
        saved = row["modified"].strftime("%Y-%m-%d %H:%M:%S") if isinstance(row["modified"], datetime) else ""
        cells += [_size(row["size_bytes"]), "yes" if row["valid"] else "[red]NO[/]"]
        cells += [("yes" if row["in_ray_registry"] else "no") for _ in registry] + [saved]
        view.add_row(*cells)
    if out.width >= 120:
        out.print(view)
    else:  # a narrow terminal: one line per checkpoint reads better than a squeezed table
        out.print(view.title, highlight=False)
        for cells in zip(*(c.cells for c in view.columns)):
            named = [f"{col.header} {cell}" for col, cell in zip(view.columns[1:], cells[1:]) if cell]
            out.print(f"  {cells[0]}  " + "  ".join(named), highlight=False, soft_wrap=True)
    for row in table.to_dict("records"):
        if not row["valid"]:
            out.print(f"[red]invalid[/] {row['checkpoint']}: {row['problem']}", highlight=False, soft_wrap=True)
    out.print(f"{len(table)} checkpoint(s), {_size(table.attrs['total_bytes'])} in total", highlight=False)


def _int(value: Any) -> str:
    return "" if value is None or value != value else str(int(value))


@ckpt_app.command()
def info(
    checkpoint: str = typer.Argument(..., help="Checkpoint folder or URI (or <run>/<checkpoint> with --storage)."),
    storage: Optional[str] = typer.Option(None, help=_STORAGE_HELP),
) -> None:
    """Position, config, metrics and files of one checkpoint, with every checksum verified."""
    from raylab.checkpoints import checkpoint_info

    data = _call(checkpoint_info, checkpoint, storage)
    pos = data.get("position") or {}
    view = Table(title=data["checkpoint"], show_header=False, title_justify="left")
    view.add_column(style="bold")
    view.add_column(overflow="fold")
    for key, value in (("position", f"epoch {pos.get('epoch')}, batch {pos.get('batch_in_epoch')}, step {pos.get('global_step')}" if pos else "unknown"),
                       ("task", data.get("task")), ("framework", data.get("framework")), ("workers", data.get("world_size")),
                       ("size", _size(data["size_bytes"]))):
        view.add_row(key, str(value))
    for key, value in sorted((data.get("metrics") or {}).items()):
        view.add_row(f"metric {key}", f"{value:.6g}" if isinstance(value, float) else str(value))
    view.add_row("config", json.dumps(data.get("config") or {}, sort_keys=True))
    out.print(view)
    files = Table(title="files (sha256 verified)", title_justify="left")
    for col in ("file", "bytes", "sha256", "status"):
        files.add_column(col, overflow="fold")
    for f in data["files"]:
        files.add_row(f["name"], f"{f['bytes']:,}" if f["bytes"] is not None else "?", (f["sha256"] or "")[:16],
                      "ok" if f["ok"] else f"[red]CORRUPTED: {f['problem']}[/]")
    out.print(files)
    if not data["valid"]:
        _fail(f"checkpoint {data['checkpoint']} is corrupted: {data['problem']}.", 1)


@ckpt_app.command()
def load(
    checkpoint: str = typer.Argument(..., help="Checkpoint folder or URI (or <run>/<checkpoint> with --storage)."),
    to: str = typer.Option(".", help="Folder to copy the checkpoint into (as <to>/<checkpoint name>)."),
    storage: Optional[str] = typer.Option(None, help=_STORAGE_HELP),
) -> None:
    """Copy a checkpoint to a local folder, verify it, and print how to load it from Python."""
    from raylab.checkpoints import load_checkpoint

    dest = _call(load_checkpoint, checkpoint, to, storage)
    out.print(f"copied {checkpoint} to {dest} (every checksum verified)", highlight=False, soft_wrap=True)
    out.print(
        "load it from Python:\n"
        "    from raylab.checkpoints import checkpoint_info, load_weights\n"
        f"    cfg = checkpoint_info({str(dest)!r})['config']   # the run's config, to build the model\n"
        f"    load_weights({str(dest)!r}, model)           # model: a torch.nn.Module built from cfg\n"
        f"or read the tensors directly: safetensors.torch.load_file({str(dest / 'model.safetensors')!r})",
        highlight=False, soft_wrap=True,
    )


@ckpt_app.command()
def clean(
    runs: List[str] = typer.Argument(..., help="Run names under --storage, or run folders / URIs."),
    keep_latest: int = typer.Option(..., help="Keep this many of the newest valid checkpoints of each run."),
    keep_best: int = typer.Option(0, help="Also keep this many best checkpoints by --metric."),
    metric: Optional[str] = typer.Option(None, help="Metric ranking checkpoints for --keep-best (e.g. val_loss)."),
    mode: Optional[str] = typer.Option(None, help="min or max: which --metric values are better (default: min for losses/errors, else max)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be deleted."),
    storage: str = typer.Option("raylab_results", help=_STORAGE_HELP),
) -> None:
    """Apply a retention policy to runs after the fact; the newest valid checkpoint of a run is never deleted."""
    from raylab.checkpoints import clean_runs

    results = _call(clean_runs, runs, storage, keep_latest, keep_best, metric, mode, dry_run)
    verb = "would delete" if dry_run else "deleted"
    for result in results:
        out.print(f"[bold]{result.run}[/]", highlight=False)
        for record, why in result.plan.keep:
            out.print(f"  kept    {record.name}  ({why})", highlight=False, soft_wrap=True)
        for record, why in result.plan.delete:
            out.print(f"  {verb} {record.name}  {_size(record.size_bytes)}  ({why})", highlight=False, soft_wrap=True)
    total = sum(r.freed_bytes for r in results)
    count = sum(len(r.plan.delete) for r in results)
    out.print(f"{verb} {count} checkpoint(s) in {len(results)} run(s); {_size(total)} {'would be ' if dry_run else ''}freed", highlight=False)
