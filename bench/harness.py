"""What every benchmark shares: A/B interleaving, median and spread, the machine's
state, commands run from outside, tables, JSON and plots.

A measurement module builds a `Report`: variants measured in interleaved rounds
(`interleave`: A B C, then C B A, ... so a drift of the machine's load hits
every variant alike), summarised as median with min..max (`Stats`), plus the
machine, the load average before and after, parameters and notes. `Report.save`
writes `<out>/<name>.json` and, through the module's own plot function,
`<out>/<name>.png`; `Report.print` prints the table.

Figures on a loaded 2-core machine are noisy: every report says how loaded the
machine was, and the spread is printed beside every median.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
NOISE_NOTE = ("figures from a shared, loaded machine are noisy: compare variants of one run "
              "(interleaved rounds), read the spread, not only the median")


@dataclass
class Stats:
    """Median and range of one figure over rounds."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stats":
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how far one round may be from another."""
        return 100.0 * (self.high - self.low) / self.median if self.median else float("nan")

    def text(self, digits: int = 2) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}..{self.high:.{digits}f})"


def ratio_pct(a: float, b: float) -> float:
    """How much larger a is than b, in percent (a / b - 1)."""
    return 100.0 * (a / b - 1.0) if b else float("nan")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        info["cpu_model"] = cpu.split(":", 1)[1].strip()
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    for module in ("torch", "ray"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "platform", "models", "bench",
                                "experiments"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_dirty"] = bool(dirty)  # code changed since that commit: the figures are not that commit's
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def interleave(variants: dict[str, Callable[[int], dict[str, float]]], rounds: int,
               log: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict[str, list[dict[str, Any]]]:
    """Run every variant once per round, the order reversed every other round (A B, B A, ...).

    Each variant function gets the round number and returns its figures for that round;
    every round also records the 1-minute load average before it started.
    """
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            load = os.getloadavg()[0]
            started = time.perf_counter()
            figures = variants[name](r)
            # Headline figures only: names with a ':' are parts (phases of a run, parts of a checkpoint).
            shown = ", ".join(f"{k} {v:.3g}" for k, v in figures.items() if isinstance(v, (int, float)) and ":" not in k)
            log(f"  round {r + 1}/{rounds} {name}: {shown}  (load {load:.1f})")
            out[name].append({"round": r, "load_1m": round(load, 2), "bench_s": round(time.perf_counter() - started, 2), **figures})
    return out


def summarise(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Stats]]:
    """Stats of every numeric figure of every variant."""
    summary: dict[str, dict[str, Stats]] = {}
    for name, rows in rounds.items():
        keys = [k for k in (rows[0] if rows else {}) if k not in ("round", "load_1m", "bench_s")
                and isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)]
        summary[name] = {k: Stats.of(row.get(k) for row in rows) for k in keys}
    return summary


@dataclass
class CommandRun:
    """One command run from outside: when it started and ended by this process's clock."""

    started: float  # time.time() just before the process was created
    ended: float
    returncode: int
    log: str  # stdout and stderr, for a failure message

    @property
    def wall_s(self) -> float:
        return self.ended - self.started


class BenchError(RuntimeError):
    """A benchmarked command failed; the message carries the end of its output."""


def process_tree(root: int) -> list[int]:
    """`root` and every live process below it (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))  # the name may hold ')'
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a command and everything it started, by pid: Ray's workers leave the command's
    session (setsid) but stay its descendants."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_command(argv: list[str], log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 1800) -> CommandRun:
    """Run `argv` from the repository root with `env` added to this environment; raise if it fails.

    Its output goes to `log_path` (raylab's live display included), not to this terminal.
    """
    with open(log_path, "w", encoding="utf-8") as fh:
        started = time.time()
        # A session of its own: on a timeout, the command and every process it started (its
        # embedded Ray included) are stopped together, and nothing else.
        proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except KeyboardInterrupt:
            stop_tree(proc)
            raise
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            raise BenchError(f"{' '.join(argv[:6])} ... ran past {timeout_s:.0f} s and was stopped; see {log_path}") from None
        ended = time.time()
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:6])} ... exited {proc.returncode}; the end of {log_path}:\n{text[-3000:]}")
    return CommandRun(started, ended, proc.returncode, text)


# Ray's own defaults for what raylab changes on its embedded instance (ray/train/v2/_internal/constants.py).
_RAY_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_METRICS_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}


def ray_defaults_env() -> dict[str, str]:
    """Environment that undoes raylab's settings for the embedded Ray (`_EMBEDDED_ENV`, applied with
    setdefault, so these win) and its lean controller and shutdown (`raylab.ray_embedded`): the
    "Ray defaults" side of an A/B."""
    from raylab.ray_backend import _EMBEDDED_ENV
    from raylab.ray_embedded import STOCK_ENV

    unknown = set(_EMBEDDED_ENV) - set(_RAY_DEFAULTS)
    if unknown:
        raise BenchError(f"bench.harness does not know Ray's default of {sorted(unknown)}: add it to _RAY_DEFAULTS")
    return {**{k: _RAY_DEFAULTS[k] for k in _EMBEDDED_ENV}, STOCK_ENV: "1"}


def warm_up(model: str, stage: str, overrides: dict[str, Any], work: Path, env: dict[str, str]) -> None:
    """One untimed step of `raylab train --workers 0`: generates the stage's synthetic data into
    the cache and warms the file cache, so no timed round pays for either."""
    argv = raylab_argv("train", model, "--stage", stage, "--workers", "0", "--storage", str(work / "warm-up"),
                       *sets({**overrides, "max_steps": 1, "num_samples": 0}))
    run_command(argv, work / f"warm-up-{model}-{stage}.log", env)


def python_module(module: str, *args: str) -> list[str]:
    """argv running `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def raylab_argv(*args: str) -> list[str]:
    """argv of `raylab <args>` in a fresh process, every task stamped (bench.stamps)."""
    return python_module("bench.stamps", *args)


def sets(values: dict[str, Any]) -> list[str]:
    """`--set key=value` options for raylab's CLI."""
    out: list[str] = []
    for key, value in values.items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        out += ["--set", f"{key}={text}"]
    return out


@dataclass
class Report:
    """One measurement's results: what was compared, how, and what came out."""

    name: str
    title: str
    goal: str
    method: str
    params: dict[str, Any]
    smoke: bool
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # headline numbers (JSON)
    rounds: dict[str, Any] = field(default_factory=dict)  # raw per-round figures (JSON)
    notes: list[str] = field(default_factory=list)
    load_before: list[float] = field(default_factory=load_average)
    load_after: list[float] = field(default_factory=list)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    wall_s: float = 0.0
    plot: Callable[[Any, "Report"], None] | None = field(default=None, repr=False)
    figsize: tuple[float, float] = (8, 4.5)

    def finish(self, wall_s: float) -> "Report":
        self.load_after = load_average()
        self.wall_s = round(wall_s, 1)
        return self

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("plot", "figsize")}
        data["machine"] = machine()
        data["noise"] = NOISE_NOTE
        return data

    def save(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{self.name}.json"]
        paths[0].write_text(json.dumps(self.to_json(), indent=2, default=_json_default) + "\n")
        if self.plot is not None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=self.figsize)
            self.plot(ax, self)
            ax.set_title(self.title, fontsize=10)
            fig.text(0.01, 0.01, f"load {self.load_before[0]:.0f} -> {self.load_after[0]:.0f} on {os.cpu_count()} CPUs; "
                     "bars: median, whiskers: min..max", fontsize=7, color="0.4")
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            fig.savefig(out / f"{self.name}.png", dpi=110)
            plt.close(fig)
            paths.append(out / f"{self.name}.png")
        return paths

    def print(self) -> None:
        print(f"\n== {self.title} ==")
        print(f"goal: {self.goal}")
        if self.headers:
            print(format_table(self.headers, self.rows))
        for note in self.notes:
            print(f"- {note}")
        print(f"load average {self.load_before[0]:.1f} before, {self.load_after[0]:.1f} after, on {os.cpu_count()} CPUs "
              f"({self.wall_s:.0f} s); {NOISE_NOTE}.")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Stats):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-able: {type(obj).__name__}")


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def bars(ax: Any, labels: list[str], stats: list[Stats], unit: str, colors: list[str] | None = None) -> None:
    """Horizontal bars of medians with min..max whiskers (the plot most reports draw)."""
    ys = list(range(len(labels)))[::-1]
    med = [s.median for s in stats]
    err = [[s.median - s.low for s in stats], [s.high - s.median for s in stats]]
    ax.barh(ys, med, xerr=err, color=colors or "tab:blue", alpha=0.8, capsize=4)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel(unit)
    for y, s in zip(ys, stats):
        ax.text(s.median, y, f" {s.median:.3g}", va="center", ha="left", fontsize=7)


def work_dir(prefix: str) -> Path:
    """A fresh scratch folder for a measurement's runs (removed by `clean_work_dir`)."""
    base = Path(os.environ.get("RAYLAB_BENCH_WORK", "/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"raylab-bench-{prefix}-", dir=base))


def clean_work_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
