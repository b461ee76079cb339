"""What the person running a sweep or a ladder stage sees: one live table of trials.

On a terminal a rich table is redrawn in place -- one row per trial with its
state, its searched values, its step, the metric's last and best values -- and
a line naming the best trial so far. Where output is a log (CI, `ray job
submit`), a plain line is printed whenever a trial changes state or reports a
new step, so a job log reads as a history of the sweep. Tune's own status
tables are off (`verbose=0`); this is the only display.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

_STATES = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "TERMINATED": "finished", "ERROR": "error"}
_STYLES = {"running": "cyan", "finished": "green", "stopped early": "yellow", "error": "red", "pending": "dim", "paused": "dim"}


@dataclass
class TrialRow:
    """One trial as the display and the sweep's record know it (plain data, no Ray objects)."""

    name: str
    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    params: dict[str, Any] = field(default_factory=dict)
    step: int | None = None
    value: float | None = None  # the metric's last reported value
    best: float | None = None  # the metric's best value so far
    stopped_early: bool = False  # stopped by the scheduler (ASHA, HyperBand, median)
    error: str | None = None

    @property
    def state(self) -> str:
        if self.status == "TERMINATED" and self.stopped_early:
            return "stopped early"
        return _STATES.get(self.status, self.status.lower())


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.best is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.best)


class SweepTable:
    """Feed it lists of TrialRows (`table(rows)`); use as a context manager."""

    def __init__(self, title: str, metric: str, mode: str, fields: list[str], console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.title, self.metric, self.mode, self.fields = title, metric, mode, fields
        self.live = self.console.is_terminal
        self.rows: list[TrialRow] = []
        self._printed: dict[str, tuple[str, Any]] = {}
        self._live = Live(self._render(), console=self.console, refresh_per_second=2) if self.live else None

    def __enter__(self) -> "SweepTable":
        if self._live is not None:
            self._live.start()
        else:
            self.console.print(f"{self.title}: starting (metric {self.metric}, {self.mode})", soft_wrap=True, highlight=False, markup=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True, highlight=False)

    def __call__(self, rows: list[TrialRow]) -> None:
        self.rows = sorted(rows, key=lambda r: r.name)
        if self._live is not None:
            self._live.update(self._render())
            return
        for row in self.rows:
            key = (row.state, row.step)
            if self._printed.get(row.name) == key:
                continue
            self._printed[row.name] = key
            self.console.print(self.line(row), soft_wrap=True, highlight=False, markup=False)

    def line(self, row: TrialRow) -> str:
        params = " ".join(f"{k}={fmt(v)}" for k, v in row.params.items())
        text = f"{self.title}: {row.name} {row.state}"
        if row.step is not None:
            text += f" step {row.step}"
        if row.value is not None:
            text += f" {self.metric}={fmt(row.value)} (best {fmt(row.best)})"
        if params:
            text += f"  [{params}]"
        if row.error:
            text += f"  error: {row.error}"
        return text

    def _render(self) -> Group:
        table = Table(title=self.title, title_justify="left")
        for col in ("trial", "state", *self.fields, "step", self.metric, f"best {self.metric}"):
            table.add_column(col, justify="right" if col not in ("trial", "state") else "left", overflow="fold")
        for row in self.rows:
            style = _STYLES.get(row.state, "")
            table.add_row(row.name, Text(row.state, style=style), *(fmt(row.params.get(f)) for f in self.fields),
                          fmt(row.step), fmt(row.value), fmt(row.best))
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.state] = counts.get(row.state, 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "waiting for trials"
        best = best_row(self.rows, self.mode)
        lead = f"  best so far: {best.name} ({self.metric} {fmt(best.best)})" if best else ""
        errors = [Text(f"{r.name}: {r.error}", style="red") for r in self.rows if r.error]
        return Group(table, Text(f"{len(self.rows)} trials: {summary}.{lead}"), *errors)
