"""The metric-trend health checks: verdicts on a window of training steps, framework-neutral.

`raylab.health.HealthMonitor` closes a window every `health.window_steps`
optimizer steps with every worker's per-step losses, accuracy counts, learning
rates and (on the window's last step) the model's input dependence, gathered
from all workers so every worker reaches the same verdict. Past the warm-up,
`trend_findings` reads the windows the way seed 001 reads a curve:

- flat (pinned) -> raise lr or shrink the model; oscillating -> lower lr or
  raise the batch; diverging -> lower lr;
- accuracy within noise of chance, or the loss pinned at ln(num_classes): the
  model predicts the same thing whatever it sees (seed 003);
- output spread across the batch tiny next to its magnitude: input-independent;
- the learning rate sat at a floor while the loss was still falling
  (seed 001's decay_epoch too small).

Each verdict is a pure function of the numbers, so it is tested on numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raylab.health_config import HealthConfig


@dataclass
class WindowStats:
    """One window of optimizer steps, averaged over workers."""

    end_step: int
    losses: np.ndarray  # mean training loss of each step
    lrs: np.ndarray  # learning rate after each step
    samples: float  # training samples seen in the window, all workers
    accuracy: float | None = None  # mean training accuracy over those samples (None: the task reports none)
    dependence: float | None = None  # output spread / magnitude, measured on the window's last step

    @property
    def start_step(self) -> int:
        return self.end_step - len(self.losses) + 1

    @property
    def span(self) -> str:
        return f"steps {self.start_step}-{self.end_step}"

    @property
    def median(self) -> float:
        return float(np.median(self.losses))

    @property
    def spread(self) -> float:
        """The 10-90% range of the window's step losses."""
        low, high = np.percentile(self.losses, [10, 90])
        return float(high - low)


def chance_margin(window: WindowStats, num_classes: int, sigmas: float) -> float:
    """`sigmas` binomial standard deviations of guessing's accuracy over the window's samples."""
    p = 1.0 / num_classes
    return sigmas * math.sqrt(p * (1 - p) / max(window.samples, 1e-9))


def can_tell_chance(window: WindowStats, num_classes: int, sigmas: float) -> bool:
    """Whether the window has the samples to tell guessing from twice chance (from chance + 2
    accuracy points with many classes): 16 samples of 4 classes cannot separate 25% from 50%,
    so such a window gives no chance verdict; 160 samples of 200 classes separate 0.5% from 2.2%."""
    allowed = max(1.0 / num_classes, 0.02)
    return window.accuracy is not None and window.samples > 0 and chance_margin(window, num_classes, sigmas) <= allowed


def at_chance(window: WindowStats, num_classes: int, sigmas: float) -> bool:
    """Accuracy not distinguishable from guessing: below 1/C + `sigmas` binomial standard deviations
    (only for windows that can tell, see `can_tell_chance`)."""
    if not can_tell_chance(window, num_classes, sigmas):
        return False
    return window.accuracy <= 1.0 / num_classes + chance_margin(window, num_classes, sigmas)


def class_findings(windows: list[WindowStats], cfg: HealthConfig, num_classes: int) -> list[tuple[str, str]]:
    """Chance-level accuracy (two windows in a row past warm-up) and a loss pinned at ln(C)."""
    last, out = windows[-1], []
    ln_c = math.log(num_classes)
    if cfg.active("chance_loss") and abs(last.median - ln_c) <= cfg.chance_loss_tolerance * ln_c:
        out.append(("chance_loss", f"training loss {last.median:.4f} over {last.span} is pinned at ln({num_classes}) = "
                                   f"{ln_c:.4f}: a uniform prediction"))
    recent = [w for w in windows[-2:] if w.start_step > cfg.warmup_steps]
    if cfg.active("chance_accuracy") and len(recent) == 2 and all(at_chance(w, num_classes, cfg.chance_sigmas) for w in recent):
        out.append(("chance_accuracy", f"training accuracy {last.accuracy:.2%} over {last.span} ({last.samples:.0f} samples) is "
                                       f"within {cfg.chance_sigmas:g} sigma of chance (1/{num_classes} = {1 / num_classes:.2%})"))
    return out


def loss_findings(windows: list[WindowStats], cfg: HealthConfig) -> list[tuple[str, str]]:
    """Flat, diverging or oscillating, from the last window against the earlier ones."""
    last, first, out = windows[-1], windows[0], []
    median, spread = last.median, last.spread
    lr = float(last.lrs[-1]) if len(last.lrs) else float("nan")
    if median <= 1e-8:
        return out  # nothing left to learn: a pinned or swinging zero loss is no problem
    if cfg.active("loss_flat") and spread < cfg.flat_tolerance * median:
        out.append(("loss_flat", f"training loss pinned at {median:.4g} (10-90% spread {spread:.2g}) over {last.span} at lr {lr:.3g}"))
    earlier = windows[:-1]
    best = min(earlier, key=lambda w: w.median) if earlier else None
    diverging = best is not None and median > cfg.diverge_factor * best.median
    if diverging and cfg.active("loss_diverging"):
        out.append(("loss_diverging", f"training loss rose to a median of {median:.4g} over {last.span} from {best.median:.4g} "
                                      f"over {best.span}, at lr {lr:.3g}"))
    stuck = median > 0.5 * first.median  # no real progress since the first window
    if stuck and spread > cfg.oscillation_ratio * median and cfg.active("loss_oscillating"):
        out.append(("loss_oscillating", f"training loss swings over {spread:.4g} (10-90%) around a median of {median:.4g} over "
                                        f"{last.span} without progress (first window's median {first.median:.4g}), at lr {lr:.3g}"))
    return out


def lr_floor_finding(windows: list[WindowStats], cfg: HealthConfig, peak_lr: float) -> list[tuple[str, str]]:
    """The learning rate sat still far below its peak for a whole window while the loss kept falling."""
    if len(windows) < 2 or not cfg.active("lr_floor") or peak_lr <= 0:
        return []
    last, previous = windows[-1], windows[-2]
    lrs = last.lrs
    if not len(lrs) or lrs.max() - lrs.min() > 1e-9 * lrs.max() or lrs[-1] >= cfg.lr_floor_fraction * peak_lr:
        return []
    if previous.median <= 0 or last.median > previous.median * (1 - cfg.lr_floor_min_drop):
        return []
    drop = 1 - last.median / previous.median
    return [("lr_floor", f"lr sat at {lrs[-1]:.3g} ({lrs[-1] / peak_lr:.1%} of its peak {peak_lr:.3g}) through {last.span} "
                         f"while the training loss still fell {drop:.0%} ({previous.median:.4g} -> {last.median:.4g})")]


def trend_findings(windows: list[WindowStats], cfg: HealthConfig, num_classes: int | None, peak_lr: float) -> list[tuple[str, str]]:
    """Every trend verdict on the newest window, once it starts past the warm-up."""
    last = windows[-1]
    if last.start_step <= cfg.warmup_steps or not len(last.losses):
        return []
    out: list[tuple[str, str]] = []
    if last.dependence is not None and cfg.active("input_dependence") and last.dependence < cfg.min_input_dependence:
        out.append(("input_dependence", f"the model's output hardly depends on its input: its spread across a batch is "
                                        f"{last.dependence:.1e} of its magnitude at step {last.end_step} "
                                        f"(threshold {cfg.min_input_dependence:g}; healthy models show 1e-2 and more)"))
    if num_classes:
        out += class_findings(windows, cfg, num_classes)
    out += loss_findings(windows, cfg)
    out += lr_floor_finding(windows, cfg, peak_lr)
    return out
