"""What the person running `raylab train` sees: one live line, then a summary.

On a terminal, a rich progress bar shows step, epoch, the task's headline
metrics (loss and accuracy; CRAFT's loss, cls_loss, geo_loss; ...), the
epoch's average loss, samples/s, ETA and the last checkpoint. Where output is a log (CI, `ray job
submit`), the same facts are printed as a plain line at most every 10 s and at
every evaluation, so job logs stay readable.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

_DEFAULT_HEADLINE = ("loss", "accuracy")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def status_text(update: dict[str, Any]) -> str:
    """The facts of one progress update as `key=value` pairs: the task's headline metrics
    (train values as `loss=`, validation values as `val_loss=`), the epoch's average loss,
    throughput and the last checkpoint."""
    parts = [f"epoch {update.get('epoch', 0)}/{update.get('max_epochs', '?')}"]
    headline = update.get("headline_metrics") or _DEFAULT_HEADLINE
    for name in headline:
        if f"train_{name}" in update:
            parts.append(f"{name}={_fmt(update[f'train_{name}'])}")
    if "avg_loss" in update:
        parts.append(f"avg_loss={_fmt(update['avg_loss'])}")
    for name in headline:
        if f"val_{name}" in update:
            parts.append(f"val_{name}={_fmt(update[f'val_{name}'])}")
    for key in sorted(k for k in update if k.startswith("sample_") and isinstance(update[k], float)):
        parts.append(f"{key}={_fmt(update[key])}")
    if "samples_per_s" in update:
        parts.append(f"{update['samples_per_s']:.0f} samples/s")
    if update.get("last_checkpoint"):
        parts.append(f"last checkpoint {update['last_checkpoint']}")
    if update.get("health_findings"):
        parts.append(f"health: {update['health_findings']} finding(s), see health.json")
    return "  ".join(parts)


class LiveProgress:
    """Feed it progress updates from the loop; use as a context manager."""

    def __init__(self, title: str, console: Console | None = None, log_every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.console = console or Console(stderr=True)
        self.title = title
        self.live = self.console.is_terminal
        self.log_every_s = log_every_s
        self._clock = clock
        # None until the first line: monotonic clocks start anywhere (at boot on Linux), so
        # "now - 0.0" says nothing about whether anything was printed yet.
        self._last_log: float | None = None
        # Two lines: the bar with step counts and times, then the metrics, so neither is cut off.
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=30), TextColumn("step"), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
        )
        self._status = Text("starting workers...", overflow="fold")
        self._live = Live(Group(self._progress, self._status), console=self.console, refresh_per_second=4)
        self._task = self._progress.add_task(title, total=None)
        self._last: dict[str, Any] = {}

    def __enter__(self) -> "LiveProgress":
        if self.live:
            self._live.start()
        else:
            self.console.print(f"{self.title}: starting", soft_wrap=True)
        return self

    def __call__(self, update: dict[str, Any]) -> None:
        notice = update.pop("notice", None)
        if notice:
            self.console.print(f"[yellow]note:[/] {notice}", soft_wrap=True, highlight=False)
        health = update.pop("health_notice", None)  # raylab.health: each finding once, with its advice
        if health:
            self.console.print(f"[bold red]health:[/] {health}", soft_wrap=True, highlight=False)
        # Eval rows carry val_* keys; keep the last values so the line never flickers empty.
        self._last.update(update)
        merged = self._last
        if self.live:
            self._progress.update(self._task, completed=merged.get("global_step", 0), total=merged.get("total_steps"))
            self._status.plain = "  " + status_text(merged)
            return
        now = self._clock()
        due = self._last_log is None or now - self._last_log >= self.log_every_s
        if due or any(k.startswith("val_") for k in update):
            self._last_log = now
            self.console.print(f"{self.title}: step {merged.get('global_step', 0)}/{merged.get('total_steps', '?')}  {status_text(merged)}", soft_wrap=True)

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self._live.stop()


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table
